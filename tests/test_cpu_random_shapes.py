"""The cpu backend's convolution ops on random shapes: every variant of conv2d_fwd, conv2d_bwd_data,
conv2d_bwd_weight, conv2d_pool_fwd (max and avg, with and without yconv), conv2d_bwd_data_pool (max and avg) and the
routed backward (weight and data) against the float64 reference, on shapes drawn from a fixed seed (batches that leave
partial chunks of 16, odd maps, non-square filters, every activation). test_cpu_backend.py covers LeNet's shapes and
chosen odd ones; this file covers the shapes nobody chose.

Both register blockings run on every CPU: AVX2 code's (one filter a block) and AVX-512 code's (blocks of 6, 4, 3 or 2
filters, K padded to even where no size divides it: conv2d.block_size). The blocks follow conv2d.WIDE_VECTORS when a
plan is made, so a fresh backend with it set compiles the other machine's blocks here (the kernels then run in ymm
code, with the other machine's blocks); without that, a CPU would only ever run its own.

A variant that cannot take a shape must say so (a ValueError naming the op and why, as v3 of the routed weight
gradient does for a patch of more than 160 floats), and "auto" must then take it. A conv output with no 2×2 window
(one row or column) is refused by every pooling op, "auto" included.
"""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import reference as R
from lenet_gpu.backends.cpu_backend import CpuBackend, conv2d

from .parity import TOL, assert_close, assert_equal

ACTS = R.ACTIVATIONS
#: a seed whose shapes cover the edges (test_cases_cover_the_edges)
SEED = 20261359
N_CASES = 14


def draw_cases(seed: int, n: int) -> list[tuple[int, ...]]:
    """(B, C, K, R, S, H, W, act index) of n random convolutions, each with an output of at least 1 × 1 (some too
    small to pool)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        B = int(rng.choice([1, 2, 5, 15, 16, 17, 33]))
        C, K = int(rng.integers(1, 8)), int(rng.integers(1, 18))
        Rr, S = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        H, W = int(rng.integers(Rr, Rr + 14)), int(rng.integers(S, S + 14))
        cases.append((B, C, K, Rr, S, H, W, int(rng.integers(len(ACTS)))))
    return cases


CASES = draw_cases(SEED, N_CASES)


def case_id(case: tuple[int, ...]) -> str:
    B, C, K, Rr, S, H, W, a = case
    return f"B{B}-C{C}-K{K}-{Rr}x{S}-{H}x{W}-{ACTS[a]}"


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


@pytest.fixture(params=[False, True], ids=["avx2-blocks", "avx512-blocks"])
def be(request, monkeypatch):
    """A fresh cpu backend whose plans take AVX2 code's register blocks, or AVX-512 code's."""
    monkeypatch.setattr(conv2d, "WIDE_VECTORS", request.param)
    return CpuBackend()


def run_variants(be, op: str, call) -> list[str]:
    """call(variant) for every variant of op and "auto"; the variants that refused the shape with a ValueError
    naming op. "auto" may not refuse."""
    refused = []
    for v in (*be.variants[op], "auto"):
        try:
            call(v)
        except ValueError as e:
            if v == "auto" or not str(e).startswith(f"{op}:"):
                raise
            refused.append(f"{v}: {e}")
    return refused


@pytest.fixture(params=CASES, ids=[case_id(c) for c in CASES])
def case(request):
    B, C, K, Rr, S, H, W, a = request.param
    rng = np.random.default_rng(request.param_index + SEED)
    x = f32(rng.standard_normal((B, C, H, W)))
    w = f32(rng.standard_normal((K, C, Rr, S)) * 0.3)
    b = f32(rng.standard_normal(K) * 0.1)
    return rng, x, w, b, ACTS[a]


def test_conv2d(be, case):
    rng, x, w, b, act = case
    B, C, H, W = x.shape
    K, _, Rr, S = w.shape
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    yref = R.conv2d_fwd(x64, w64, b.astype(np.float64), act)

    def fwd(v):
        y = np.full(yref.shape, np.nan, np.float32)
        be.conv2d_fwd(x, w, b, y, act, variant=v)
        assert_close(y, yref, *TOL["conv2d_fwd"], what=f"conv2d_fwd {v}")

    dz = f32(rng.standard_normal(yref.shape))
    dx_ref, dw_ref, db_ref = R.conv2d_bwd(x64, w64, dz.astype(np.float64), dz.astype(np.float64))

    def data(v):
        dx = np.full(x.shape, np.nan, np.float32)
        be.conv2d_bwd_data(dz, w, dx, variant=v)
        assert_close(dx, dx_ref, *TOL["conv2d_bwd_data"], what=f"conv2d_bwd_data {v}")

    def weight(v):
        dw = np.full(w.shape, np.nan, np.float32)
        db = np.full(b.shape, np.nan, np.float32)
        be.conv2d_bwd_weight(x, dz, dw, db, variant=v)
        assert_close(dw, dw_ref, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight dw {v}")
        assert_close(db, db_ref, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight db {v}")

    assert run_variants(be, "conv2d_fwd", fwd) == []
    assert run_variants(be, "conv2d_bwd_data", data) == []
    assert run_variants(be, "conv2d_bwd_weight", weight) == []


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_conv2d_pool_fwd(be, case, mode):
    _, x, w, b, act = case
    yref = R.conv2d_fwd(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), act)
    if min(yref.shape[2:]) < 2:  # nothing to pool: every variant says so
        B, K, Ho, Wo = yref.shape
        yp = np.zeros((B, K, Ho // 2, Wo // 2), np.float32)
        for v in (*be.variants["conv2d_pool_fwd"], "auto"):
            with pytest.raises(ValueError, match=r"^conv2d_pool_fwd: .* has no 2×2 window"):
                be.conv2d_pool_fwd(x, w, b, None, yp, yp.astype(np.uint8), act, mode, variant=v)
        return
    yp_ref, _ = R.pool2x2_fwd(yref, mode)

    def fused(v):
        yc = np.full(yref.shape, np.nan, np.float32)
        yp = np.full(yp_ref.shape, np.nan, np.float32)
        am = np.zeros(yp_ref.shape, np.uint8)
        be.conv2d_pool_fwd(x, w, b, yc, yp, am, act, mode, variant=v)
        assert_close(yc, yref, *TOL["conv2d_fwd"], what=f"conv2d_pool_fwd yconv {v}")
        assert_close(yp, yp_ref, *TOL["conv2d_fwd"], what=f"conv2d_pool_fwd ypool {v}")
        yp2 = np.full(yp_ref.shape, np.nan, np.float32)
        am2 = np.zeros(yp_ref.shape, np.uint8)
        be.conv2d_pool_fwd(x, w, b, None, yp2, am2, act, mode, variant=v)  # no yconv: the same pooled bits
        assert_equal(yp2, yp, what=f"conv2d_pool_fwd ypool without yconv {v}")
        if mode == "max":
            assert_equal(am2, am, what=f"conv2d_pool_fwd argmax without yconv {v}")

    assert run_variants(be, "conv2d_pool_fwd", fused) == []


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_conv2d_bwd_data_pool(be, case, mode):
    """The data gradient of a conv whose input x was pooled from yconv (2H or 2H + 1 rows: odd maps too), through
    the pooling and act'(yconv)."""
    rng, x, w, b, act = case
    B, C, H, W = x.shape
    K, _, Rr, S = w.shape
    yconv = f32(R.activate(rng.standard_normal((B, C, 2 * H + (B + K) % 2, 2 * W + (C + Rr) % 2)), act))
    _, am = R.pool2x2_fwd(yconv.astype(np.float64), "max")
    am = am if mode == "max" else None
    dz = f32(rng.standard_normal((B, K, H - Rr + 1, W - S + 1)))
    ref = R.conv2d_bwd_data_pool(dz.astype(np.float64), w.astype(np.float64), am, yconv.astype(np.float64), mode, act)

    def fused(v):
        out = np.full(yconv.shape, np.nan, np.float32)
        be.conv2d_bwd_data_pool(dz, w, am, yconv, out, mode, act, variant=v)
        assert_close(out, ref, *TOL["conv2d_bwd_data"], what=f"conv2d_bwd_data_pool {v}")

    assert run_variants(be, "conv2d_bwd_data_pool", fused) == []


def test_routed_backward(be, case):
    rng, x, w, b, act = case
    B, C, H, W = x.shape
    K, _, Rr, S = w.shape
    Ho, Wo = H - Rr + 1, W - S + 1
    if min(Ho, Wo) < 2:  # nothing was pooled: both ops say so
        gz = np.zeros((B, K, Ho // 2, Wo // 2), np.float32)
        for v in (*be.variants["conv2d_bwd_weight_routed"], "auto"):
            with pytest.raises(ValueError, match=r"^conv2d_bwd_weight_routed: .* has no 2×2 window"):
                be.conv2d_bwd_weight_routed(x, gz, gz.astype(np.uint8), np.zeros_like(w), np.zeros_like(b), variant=v)
        with pytest.raises(ValueError, match=r"^conv2d_bwd_data_routed: .* has no 2×2 window"):
            be.conv2d_bwd_data_routed(gz, w, gz.astype(np.uint8), x, np.zeros_like(x), act)
        return
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    # the routes of a max pool over the float32 activated conv output
    yc = f32(R.conv2d_fwd(x64, w64, b.astype(np.float64), act))
    _, am = R.pool2x2_fwd(yc.astype(np.float64), "max")
    gz = f32(rng.standard_normal((B, K, Ho // 2, Wo // 2)))
    rdw, rdb = R.conv2d_bwd_weight_routed(x64, gz.astype(np.float64), am, Rr, S)

    def weight(v):
        dw = np.full(w.shape, np.nan, np.float32)
        db = np.full(b.shape, np.nan, np.float32)
        be.conv2d_bwd_weight_routed(x, gz, am, dw, db, variant=v)
        assert_close(dw, rdw, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight_routed dw {v}")
        assert_close(db, rdb, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight_routed db {v}")

    # the data gradient's act' is taken through the layer below's activated output: kept off relu's kink at 0
    y_below = f32(np.abs(x) + 0.01) if act == "relu" else x
    rref = R.conv2d_bwd_data_routed(gz.astype(np.float64), w64, am, y_below.astype(np.float64), act)

    def data(v):
        out = np.full(x.shape, np.nan, np.float32)
        be.conv2d_bwd_data_routed(gz, w, am, y_below, out, act, variant=v)
        assert_close(out, rref, *TOL["conv2d_bwd_data"], what=f"conv2d_bwd_data_routed {v}")

    refused = run_variants(be, "conv2d_bwd_weight_routed", weight)
    assert all(r.startswith("v3: ") and "too big for v3" in r for r in refused), refused
    assert run_variants(be, "conv2d_bwd_data_routed", data) == []


def test_an_unknown_variant_is_an_error():
    """Ops of one variant refuse another name, as the ops of several do; a refused call counts no launch."""
    be = CpuBackend()
    x, w, b = np.zeros((1, 1, 6, 6), np.float32), np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.float32)
    y, yp, am = np.zeros((1, 2, 4, 4), np.float32), np.zeros((1, 2, 2, 2), np.float32), np.zeros((1, 2, 2, 2), np.uint8)
    dw = np.zeros_like(w)
    for op, call in (("conv2d_fwd", lambda v: be.conv2d_fwd(x, w, b, y, "relu", variant=v)),
                     ("conv2d_bwd_weight", lambda v: be.conv2d_bwd_weight(x, y, dw, b.copy(), variant=v)),
                     ("conv2d_bwd_weight_routed", lambda v: be.conv2d_bwd_weight_routed(x, yp, am, dw, b.copy(),
                                                                                        variant=v)),
                     ("conv2d_bwd_data", lambda v: be.conv2d_bwd_data(y, w, x, variant=v)),
                     ("conv2d_pool_fwd", lambda v: be.conv2d_pool_fwd(x, w, b, None, yp, am, "relu", "max",
                                                                      variant=v))):
        call("auto")
        call(be.variants[op][0])
        with pytest.raises(ValueError, match=rf"^{op}: unknown variant 'v9'"):
            call("v9")
    assert be.counters.launches == 10


def test_every_op_checks_its_variant_first():
    """Every op of the backend, the four-kernel step's included, refuses an unknown variant on every call (not only
    when its plan is made), before it reads an argument or counts a launch: None stands in for every argument."""
    import inspect

    be = CpuBackend()
    assert len(be.variants) >= 20
    for op in be.variants:
        fn = getattr(be, op)
        n = sum(1 for p in inspect.signature(fn).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD)
        with pytest.raises(ValueError, match=rf"^{op}: unknown variant 'v9'"):
            fn(*([None] * n), variant="v9")
    assert be.counters.launches == 0


def test_cases_cover_the_edges():
    """The drawn shapes hold what they are for: a batch that leaves a partial chunk, several chunks, maps too small
    to pool, a patch too big for the routed v3, and every activation."""
    Bs = [c[0] for c in CASES]
    assert any(b % 16 for b in Bs) and any(b > 16 for b in Bs)
    assert any(min(H - Rr + 1, W - S + 1) < 2 for _, _, _, Rr, S, H, W, _ in CASES)
    assert any(C * Rr * S > 160 for _, C, _, Rr, S, _, _, _ in CASES)
    assert len({c[7] for c in CASES}) == len(ACTS)
