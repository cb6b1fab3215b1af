"""The CPU harness runs correct CUDA C kernels correctly (barriers, shuffles, atomics, smem, options)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lenet_gpu.harness.cudacpu import CpuModule, CudaCpuError

from .helpers import OK_CU, needs_gxx

pytestmark = needs_gxx

f32, i32 = np.float32, np.int32
rng = np.random.default_rng(1234)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_kernels_found_and_signatures(ok_module: CpuModule) -> None:
    names = ok_module.kernel_names
    assert {"block_sum", "tiled_matmul", "warp_sums", "votes", "fill<float>", "fill<double>"} <= set(names)
    assert "segment_ops" not in names  # a __device__ template, not a kernel
    assert ok_module.get_function("block_sum").signature == ["const f4*", "f4*", "i4"]
    assert ok_module.get_function("fill<double>").signature == ["f8*", "f8", "i4"]
    with pytest.raises(CudaCpuError, match="not found"):
        ok_module.get_function("no_such_kernel")


@pytest.mark.parametrize("n, block", [(1, 32), (1000, 128), (4099, 256), (777, 1024)])
def test_shared_memory_tree_reduction(ok_module: CpuModule, n: int, block: int) -> None:
    x = rng.standard_normal(n).astype(f32)
    nblocks = cdiv(n, block)
    out = np.full(nblocks, np.nan, f32)
    ok_module.get_function("block_sum")((nblocks,), (block,), (x, out, i32(n)), shared_mem=block * 4)
    ref = np.add.reduceat(x.astype(np.float64), np.arange(0, n, block))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (37, 29, 45), (16, 48, 33)])
def test_tiled_matmul_static_shared_2d_blocks(ok_module: CpuModule, m: int, n: int, k: int) -> None:
    a = rng.standard_normal((m, k)).astype(f32)
    b = rng.standard_normal((k, n)).astype(f32)
    c = np.full((m, n), np.nan, f32)
    ok_module.get_function("tiled_matmul")((cdiv(n, 16), cdiv(m, 16)), (16, 16), (a, b, c, i32(m), i32(n), i32(k)))
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def test_warp_shuffle_reductions(ok_module: CpuModule) -> None:
    n, block = 1000, 128  # last warp partly outside n: its lanes still take part with 0
    nwarps = cdiv(n, block) * block // 32
    x = rng.standard_normal(n).astype(f32)
    down = np.full(nwarps, np.nan, f32)
    xor_all = np.full(n, np.nan, f32)
    ok_module.get_function("warp_sums")((cdiv(n, block),), (block,), (x, down, xor_all, i32(n)))
    padded = np.zeros(nwarps * 32, np.float64)
    padded[:n] = x
    sums = padded.reshape(nwarps, 32).sum(1)
    np.testing.assert_allclose(down, sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xor_all, np.repeat(sums, 32)[:n], rtol=1e-5, atol=1e-5)


def test_shuffle_up_and_idx_with_width(ok_module: CpuModule) -> None:
    x = rng.standard_normal(64).astype(f32)
    scan = np.full(64, np.nan, f32)
    first = np.full(64, np.nan, f32)
    ok_module.get_function("warp_scan8")((1,), (64,), (x, scan, first))
    seg = x.astype(np.float64).reshape(8, 8)
    np.testing.assert_allclose(scan, np.cumsum(seg, axis=1).ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(first, np.repeat(x[::8], 8))


def test_votes(ok_module: CpuModule) -> None:
    out = np.zeros(4, np.uint32)
    ok_module.get_function("votes")((1,), (32,), (out,))
    ballot = sum(1 << t for t in range(32) if t % 3 == 0)
    assert out.tolist() == [ballot, 10, 1, 1]


def test_atomic_add_float(ok_module: CpuModule) -> None:
    n = 5000
    x = rng.integers(-8, 9, n).astype(f32)  # small integers: the sum is exact in any order
    out = np.zeros(1, f32)
    ok_module.get_function("atomic_sum")((cdiv(n, 256),), (256,), (x, out, i32(n)))
    assert out[0] == x.astype(np.float64).sum()


def test_dynamic_shared_memory_is_poisoned_per_block(ok_module: CpuModule) -> None:
    out = np.zeros(2 * 64, f32)
    ok_module.get_function("read_dynamic_smem")((2,), (64,), (out,), shared_mem=64 * 4)
    out = out.reshape(2, 64)
    for b in range(2):
        written = np.arange(64) % 2 == b
        assert np.all(out[b, written] == 1.0)
        assert np.all(np.isnan(out[b, ~written])), "unwritten dynamic smem must read as NaN"


@pytest.mark.skipif(
    os.environ.get("CUDACPU_SANITIZE") == "address", reason="ASan builds check static smem bounds instead"
)
def test_static_shared_memory_is_poisoned_per_block(ok_module: CpuModule) -> None:
    out = np.zeros(2 * 64, f32)
    ok_module.get_function("read_static_smem")((2,), (64,), (out,))
    out = out.reshape(2, 64)
    for b in range(2):
        written = np.arange(64) % 2 == b
        assert np.all(out[b, written] == 1.0)
        assert np.all(np.isnan(out[b, ~written])), "unwritten static smem must read as NaN"


def test_define_options_include_and_constant_memory() -> None:
    mod = CpuModule(OK_CU, options=("-DSCALE=3", "-std=c++17", "--use_fast_math", "-arch=sm_90"))
    coeffs = mod.get_global("c_coeffs", np.float32)
    assert coeffs.shape == (4,)
    coeffs[:] = [2.0, 0.0, 0.0, 0.0]
    x = rng.standard_normal(100).astype(f32)
    y = np.full_like(x, np.nan)
    mod.get_function("scaled_copy")((1,), (128,), (x, y, i32(100)))
    np.testing.assert_allclose(y, 6.0 * x, rtol=1e-6)
    with pytest.raises(CudaCpuError, match="not understood"):
        CpuModule(OK_CU, options=("--frobnicate",))


def test_template_kernels_via_name_expressions(ok_module: CpuModule) -> None:
    y = np.zeros(70, np.float64)
    ok_module.get_function("fill<double>")((3,), (32,), (y, np.float64(2.5), i32(70)))
    assert np.all(y == 2.5)
    yf = np.zeros(5, f32)
    ok_module.get_function("fill<float>")((1,), (32,), (yf, f32(-1.0), i32(5)))
    assert np.all(yf == -1.0)


def test_thread_and_block_coordinates_3d(ok_module: CpuModule) -> None:
    grid, block = (2, 3, 2), (4, 2, 3)
    nthreads = int(np.prod(grid) * np.prod(block))
    out = np.full((nthreads, 6), -1, i32)
    ok_module.get_function("coords")(grid, block, (out,))
    expect = [
        (tx, ty, tz, bx, by, bz)
        for bz in range(grid[2])
        for by in range(grid[1])
        for bx in range(grid[0])
        for tz in range(block[2])
        for ty in range(block[1])
        for tx in range(block[0])
    ]
    assert out.tolist() == [list(e) for e in expect]


def test_device_assert_passes_and_fails(ok_module: CpuModule) -> None:
    k = ok_module.get_function("checked_store")
    out = np.zeros(8, f32)
    k((1,), (8,), (np.arange(8, dtype=i32), out, i32(8)))
    assert np.all(out == 1.0)
    bad = np.arange(8, dtype=i32)
    bad[6] = 99
    with pytest.raises(CudaCpuError, match=r"thread \(6,0,0\) of block \(0,0,0\): assertion .*failed"):
        k((1,), (8,), (bad, out, i32(8)))


def test_launch_counters(ok_module: CpuModule) -> None:
    k = ok_module.get_function("votes")
    before_k, before_m = k.launches, ok_module.launches
    out = np.zeros(4, np.uint32)
    for _ in range(3):
        k((1,), (32,), (out,))
    assert k.launches == before_k + 3
    assert ok_module.launches == before_m + 3


def test_a_build_is_found_from_another_checkout(tmp_path, monkeypatch) -> None:
    """The build cache is keyed by content and by paths as seen from the working directory: a second clone of the
    same sources, run from its root, finds the first one's builds (CI's fresh clone finds the developer's)."""
    from .helpers import OK_CU

    paths = []
    for name in ("one", "two"):
        root = tmp_path / name
        (root / "kernels").mkdir(parents=True)
        for f in OK_CU.parent.iterdir():
            (root / "kernels" / f.name).write_bytes(f.read_bytes())
        monkeypatch.chdir(root)
        paths.append(CpuModule(root / "kernels" / OK_CU.name).so_path)
    assert paths[0] == paths[1]
    common = tmp_path / "two" / "kernels" / "harness_common.cuh"
    common.write_text("// changed\n" + common.read_text())
    assert CpuModule(tmp_path / "two" / "kernels" / OK_CU.name).so_path != paths[0]
