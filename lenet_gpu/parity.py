"""The one parity helper every kernel check uses (STYLE.md §5): the tests and ``python -m lenet_gpu.selftest``.

``assert_close(out, ref, atol, rtol, what)`` checks |out − ref| ≤ atol + rtol·|ref| elementwise and,
on failure, names the worst element and the first few mismatches; ``error_stats`` measures the same
thing without raising (the self-test records the worst error of every case). Inputs come from
``rand``, seeded. ``nan_like`` makes the NaN-poisoned outputs every launch must overwrite.

It lives in the package (not in tests/) so that the self-test can use it where the package is
installed and tests/ is absent; tests/parity.py re-exports it.
"""

from __future__ import annotations

from typing import Any

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
    # the fused ops chain the ops above, so each output carries the error of the chain that makes it:
    # conv2d_pool_fwd is one convolution (its pooling is checked exactly against its own conv output)
    "conv2d_pool_fwd": (1e-5, 1e-5),
    # a data gradient (≤ K·R·S terms) routed through pooling and act': conv2d_bwd_data's error
    "conv2d_bwd_data_pool": (1e-5, 1e-5),
    # three dense layers, the loss and three backward layers: a float32 composition of the reference
    # ops (batch 1, 7, 67; every activation and pool mode) stays under 1/50 of this bound
    "head_train": (2e-5, 2e-5),
    # the routed ops sum the same terms as their dense counterparts minus the zeros (a routed weight
    # gradient: ≤ batch × Hp × Wp terms per weight; a routed data gradient: ≤ K·R·S terms, then act'), so
    # they carry the dense ops' bounds
    "conv2d_bwd_weight_routed": (1e-4, 1e-5),
    "conv2d_bwd_data_routed": (1e-5, 1e-5),
    # eight layers from uint8 pixels to logits: the same measure stays under 1/50 of this bound
    "lenet_fwd": (2e-5, 2e-5),
    # the four-kernel step: step_fwd's S4 is two convolutions deep (C3 sums 150 products of S2, itself one
    # convolution: the bound of lenet_fwd's chain); step_bwd's partials are two routed weight gradients and the
    # routed data gradient between them (C1's weights sum products of gz1, itself ≤ 400 terms: the routed weight
    # gradient's bound)
    "step_fwd": (2e-5, 2e-5),
    "step_bwd": (1e-4, 1e-5),
}


def rand(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Seeded standard-normal float32 data."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def nan_like(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An output buffer poisoned with NaN (or 0xFF for integer types) so unwritten elements show."""
    if np.issubdtype(np.dtype(dtype), np.floating):
        return np.full(shape, np.nan, dtype=dtype)
    return np.full(shape, np.iinfo(dtype).max, dtype=dtype)


def error_stats(out: Any, ref: Any, atol: float, rtol: float) -> dict[str, Any]:
    """How far ``out`` is from ``ref`` under the bound atol + rtol·|ref| (NaN in out always counts as bad).

    Returns max_abs (the largest |out − ref|, inf where out has a NaN the reference has not), ratio (the
    largest |out − ref| / bound: ≤ 1 passes), bad (elements out of bound), size, and worst (the index
    of the element furthest past its bound, or of the largest ratio when none is)."""
    out = np.asarray(out)
    ref = np.asarray(ref)
    if out.shape != ref.shape:
        raise ValueError(f"shape {out.shape} != reference {ref.shape}")
    o = out.astype(np.float64)
    r = ref.astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(o - r)
    err = np.where(np.isnan(err) & ~(np.isnan(o) & np.isnan(r)), np.inf, np.nan_to_num(err, nan=0.0))
    bound = atol + rtol * np.abs(np.nan_to_num(r))
    bad = ~(err <= bound)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))
    if out.size == 0:
        return {"max_abs": 0.0, "ratio": 0.0, "bad": 0, "size": 0, "worst": ()}
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    return {"max_abs": float(err.max()), "ratio": float(ratio.max()), "bad": int(bad.sum()), "size": int(out.size),
            "worst": tuple(int(i) for i in worst)}


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


__all__ = ["TOL", "assert_close", "assert_equal", "error_stats", "nan_like", "rand"]
