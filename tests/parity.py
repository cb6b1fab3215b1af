"""The one parity helper every kernel test uses (STYLE.md §5).

``assert_close(out, ref, atol, rtol, what)`` checks |out − ref| ≤ atol + rtol·|ref| elementwise and,
on failure, names the worst element and the first few mismatches. Inputs come from ``rand``, seeded.
``nan_like`` makes the NaN-poisoned outputs every launch must overwrite.
"""

from __future__ import annotations

import numpy as np

#: Tolerances per op for a float32 kernel against the float64 reference (atol, rtol). The sums in
#: these ops have at most a few thousand terms of O(1) values, so a few ulps of 1e-7 per term is
#: enough; argmax must match exactly.
TOL = {
    "batch_prepare": (1e-6, 1e-6),
    "conv2d_fwd": (1e-5, 1e-5),
    "conv2d_bwd_data": (1e-5, 1e-5),
    "conv2d_bwd_weight": (1e-4, 1e-5),  # sums over batch × 28 × 28 positions
    "pool2x2_fwd": (1e-6, 1e-6),  # max is a copy (exact); avg rounds once. argmax must match exactly
    "pool2x2_bwd": (1e-6, 1e-6),
    "dense_fwd": (1e-5, 1e-5),
    "dense_bwd": (1e-5, 1e-5),
    "softmax_xent": (1e-6, 1e-5),
    "adam_step": (1e-6, 1e-5),
    "sgd_step": (1e-6, 1e-6),
}


def rand(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Seeded standard-normal float32 data."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def nan_like(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An output buffer poisoned with NaN (or 0xFF for integer types) so unwritten elements show."""
    if np.issubdtype(np.dtype(dtype), np.floating):
        return np.full(shape, np.nan, dtype=dtype)
    return np.full(shape, np.iinfo(dtype).max, dtype=dtype)


def assert_close(out, ref, atol: float, rtol: float, what: str = "", max_report: int = 5) -> None:
    """|out − ref| ≤ atol + rtol·|ref| everywhere, NaN in out always failing."""
    out = np.asarray(out)
    ref = np.asarray(ref)
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {out.shape} != reference {ref.shape}")
    o = out.astype(np.float64)
    r = ref.astype(np.float64)
    err = np.abs(o - r)
    bound = atol + rtol * np.abs(r)
    bad = ~(err <= bound)  # NaN compares False → bad
    if bad.any():
        idx = np.argwhere(bad)
        excess = np.where(np.isnan(err), np.inf, err - bound)
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        lines = [
            f"{what}: {bad.sum()} of {bad.size} elements out of tolerance (atol={atol}, rtol={rtol})",
            f"  worst at {tuple(int(i) for i in worst)}: got {o[worst]!r}, want {r[worst]!r}",
        ]
        for i in idx[:max_report]:
            t = tuple(int(j) for j in i)
            lines.append(f"  at {t}: got {o[t]!r}, want {r[t]!r}")
        raise AssertionError("\n".join(lines))


def assert_equal(out, ref, what: str = "") -> None:
    out = np.asarray(out)
    ref = np.asarray(ref)
    if out.shape != ref.shape or not np.array_equal(out, ref):
        bad = np.argwhere(out != ref) if out.shape == ref.shape else []
        raise AssertionError(f"{what}: arrays differ (shape {out.shape} vs {ref.shape}); first: {bad[:5]}")
