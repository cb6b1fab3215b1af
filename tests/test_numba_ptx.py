"""What the Numba kernels' index arithmetic compiles to (numba.cuda.compile_ptx, sm_80/sm_90, no GPU): the hot
kernels divide no 64-bit integers (``div``/``rem`` ``.s64``/``.u64``: what Numba makes of ``//`` and ``%`` on its
int64-widened integers, and of a ``range`` with a run-time step), fit 64 registers on sm_90 (half of an SM's
threads with 128-thread blocks) without spills, and use no float64. compile_report.int_arith_stats counts the
instructions; test_int_arith_stats_sees_signed_int64_division shows the proxy catches the int64 style."""

from __future__ import annotations

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX checks need the real compiler (NUMBA_ENABLE_CUDASIM is set)", allow_module_level=True)
pytest.importorskip("numba.cuda")

from lenet_gpu.backends.numba_backend import compile_report as cr  # noqa: E402

#: kernels whose index arithmetic is uint32 (routed.py: every index and size, and common.fast_div)
UINT32_KERNELS = ("conv2d_bwd_weight_routed_v1", "conv2d_bwd_data_routed_v1")
DIV64 = ("div.s64", "div.u64", "rem.s64", "rem.u64")


@pytest.fixture(scope="module")
def ptxas():
    try:
        return cr.ptxas_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kernel", UINT32_KERNELS)
def test_no_int64_division_in_uint32_kernels(ptxas, kernel, arch):
    ptx, log = cr.compile_kernel(kernel, arch)
    stats = cr.int_arith_stats(ptx)
    assert all(stats[k] == 0 for k in DIV64), f"{kernel} ({arch}): {stats}"
    assert stats["div.s32"] == 0 and stats["rem.s32"] == 0, f"{kernel} ({arch}) divides signed: {stats}"
    res = cr.parse_ptxas(log)
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, res
    assert not cr.f64_lines(ptx)
    if arch == "sm_90":
        assert res["registers"] <= 64, f"{kernel}: {res['registers']} registers on sm_90"


def test_int_arith_stats_sees_signed_int64_division(ptxas):
    """The proxy has teeth: the plain Numba style (int32 arguments, ``//`` and ``%``, a grid-stride range)
    compiles to 64-bit signed division and wraparound selects; the uint32 style with common.fast_div to none."""
    from numba import cuda, uint32

    from lenet_gpu.backends.numba_backend.common import fast_div

    def plain(a, n, w):
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            a[i] = a[i // w] + a[i % w]

    def unsigned(a, n, w, m, sh):
        i = uint32(cuda.grid(1))
        if i < uint32(n):
            q = fast_div(i, m, sh)
            a[i] = a[q] + a[uint32(i - q * uint32(w))]

    p1, _ = cuda.compile_ptx(plain, "void(float32[::1], int32, int32)", cc=(9, 0))
    p2, _ = cuda.compile_ptx(unsigned, "void(float32[::1], int32, int32, uint32, uint32)", cc=(9, 0))
    s1, s2 = cr.int_arith_stats(p1), cr.int_arith_stats(p2)
    assert s1["div.s64"] + s1["rem.s64"] >= 2 and s1["selp"] > 0, s1
    assert sum(s2[k] for k in DIV64) == 0 and s2["div.u32"] == 0 and s2["rem.u32"] == 0, s2
    assert s2["int64_ops"] < s1["int64_ops"], (s1, s2)


def test_div_magic_divides_exactly():
    """x // d == (x · M) >> shift for x < 2³¹: small divisors densely, powers of two and their neighbours,
    random divisors; the dividends around every multiple boundary."""
    import numpy as np

    from lenet_gpu.backends.numba_backend.common import div_magic

    rng = np.random.default_rng(0)
    ds = [*range(1, 600), *(2**k for k in range(31)), *(2**k - 1 for k in range(2, 32)),
          *(2**k + 1 for k in range(2, 31)), *rng.integers(1, 2**31 - 1, 300).tolist()]
    for d in ds:
        m, sh = div_magic(d)
        q = np.arange(0, (2**31 - 1) // d + 1, max(1, (2**31 // d) // 500), dtype=np.uint64)
        xs = np.concatenate([q * d, q * d + d - 1, rng.integers(0, 2**31, 200).astype(np.uint64),
                             np.array([2**31 - 1], np.uint64)])
        xs = xs[xs < 2**31]
        got = (xs * np.uint64(m)) >> np.uint64(sh)
        assert np.array_equal(got, xs // np.uint64(d)), d
    with pytest.raises(ValueError):
        div_magic(0)
