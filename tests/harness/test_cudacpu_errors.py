"""The CPU harness reports what would corrupt or hang a GPU launch: wrong argument types, invalid
launch configurations, divergent barriers, deadlocks, traps, wild pointers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lenet_gpu.harness.cudacpu import CpuModule, CudaCpuError

from .helpers import BAD_CU, OK_CU, needs_gxx, run_python

pytestmark = needs_gxx

f32, i32 = np.float32, np.int32


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "n, expect",
    [
        (100, "expected np.int32, got Python int"),
        (np.int64(100), "expected np.int32, got np.int64"),
        (np.int16(100), "expected np.int32, got np.int16"),
        (100.0, "expected np.int32, got Python float"),
    ],
)
def test_int_parameter_rejects_other_types(ok_module: CpuModule, n: object, expect: str) -> None:
    x, out = np.zeros(32, f32), np.zeros(1, f32)
    with pytest.raises(CudaCpuError, match="corrupt a real GPU launch") as e:
        ok_module.get_function("block_sum")((1,), (32,), (x, out, n), shared_mem=128)
    assert expect in str(e.value)
    assert "argument #2 (int)" in str(e.value)


@pytest.mark.parametrize("value", [2.5, np.float64(2.5), np.float16(2.5)])
def test_float_parameter_rejects_other_types(ok_module: CpuModule, value: object) -> None:
    y = np.zeros(4, f32)
    with pytest.raises(CudaCpuError, match=r"argument #1 \(float\): expected np.float32.*corrupt a real GPU"):
        ok_module.get_function("fill<float>")((1,), (32,), (y, value, i32(4)))


def test_pointer_parameters_check_layout_dtype_and_constness(ok_module: CpuModule) -> None:
    k = ok_module.get_function("block_sum")
    x, out = np.zeros(64, f32), np.zeros(1, f32)
    with pytest.raises(CudaCpuError, match="not C-contiguous"):
        k((1,), (32,), (x[::2], out, i32(32)), shared_mem=128)
    with pytest.raises(CudaCpuError, match="not C-contiguous"):
        k((1,), (32,), (np.zeros((8, 8), f32).T, out, i32(32)), shared_mem=128)
    with pytest.raises(CudaCpuError, match="dtype float64 does not match the pointee type float32"):
        k((1,), (32,), (x.astype(np.float64), out, i32(32)), shared_mem=128)
    with pytest.raises(CudaCpuError, match="expected a NumPy array"):
        k((1,), (32,), (x.tolist(), out, i32(32)), shared_mem=128)
    readonly = np.zeros(1, f32)
    readonly.flags.writeable = False
    with pytest.raises(CudaCpuError, match="read-only array passed for a non-const pointer"):
        k((1,), (32,), (x, readonly, i32(32)), shared_mem=128)
    x.flags.writeable = False  # fine for `const float*`
    k((1,), (32,), (x, out, i32(32)), shared_mem=128)
    with pytest.raises(CudaCpuError, match="expected 3 arguments"):
        k((1,), (32,), (x, out), shared_mem=128)


# ------------------------------------------------------------------------------------ launch configuration


@pytest.mark.parametrize(
    "grid, block, match",
    [
        ((1,), (1025,), "1025 threads"),
        ((1,), (33, 32), "1056 threads"),
        ((1,), (1, 1, 65), r"limits are 1024 threads and \(1024, 1024, 64\)"),
        ((0,), (32,), "zero or negative dimension"),
        ((1, 0), (32,), "zero or negative dimension"),
        ((1,), (0,), "zero or negative dimension"),
        ((1, 65536), (32,), "exceeds the limits"),
        ((1, 2, 3, 4), (32,), "tuple of 1 to 3 ints"),
        ((1.0,), (32,), "must be ints"),
    ],
)
def test_invalid_launch_configurations(ok_module: CpuModule, grid: tuple, block: tuple, match: str) -> None:
    out = np.zeros(4, np.uint32)
    with pytest.raises(CudaCpuError, match=match):
        ok_module.get_function("votes")(grid, block, (out,))


def test_dynamic_shared_memory_limit_and_opt_in() -> None:
    # a separate module so that the attribute does not leak into other tests
    k = CpuModule(OK_CU).get_function("block_sum")
    x, out = np.ones(32, f32), np.zeros(1, f32)
    k((1,), (32,), (x, out, i32(32)), shared_mem=48 * 1024)  # the default maximum is allowed
    with pytest.raises(CudaCpuError, match="needs kernel.max_dynamic_shared_size_bytes set first"):
        k((1,), (32,), (x, out, i32(32)), shared_mem=48 * 1024 + 4)
    k.max_dynamic_shared_size_bytes = 100 * 1024
    k((1,), (32,), (x, out, i32(32)), shared_mem=100 * 1024)
    assert out[0] == 32.0
    with pytest.raises(CudaCpuError, match="exceed the kernel's limit of 102400"):
        k((1,), (32,), (x, out, i32(32)), shared_mem=100 * 1024 + 4)
    with pytest.raises(CudaCpuError, match="outside"):
        k.max_dynamic_shared_size_bytes = 227 * 1024 + 1
    with pytest.raises(CudaCpuError, match="non-negative int"):
        k((1,), (32,), (x, out, i32(32)), shared_mem=-1)


# ------------------------------------------------------------------------------------ device-side errors


def test_divergent_barrier_is_reported_in_strict_mode() -> None:
    out = np.zeros(256, f32)
    strict = CpuModule(BAD_CU, strict=True)
    with pytest.raises(CudaCpuError, match=r"divergent __syncthreads in block \(0,0,0\).*between 0 and 1 barriers"):
        strict.get_function("early_return")((1,), (256,), (out, i32(100)))
    CpuModule(BAD_CU, strict=False).get_function("early_return")((1,), (256,), (out, i32(100)))
    assert out[99] == 0.0  # s[(99 + 1) % 100] = s[0]
    assert out[5] == 6.0


def test_deadlock_becomes_an_error_within_the_timeout() -> None:
    mod = CpuModule(BAD_CU, timeout=1.0)
    out = np.zeros(32, f32)
    t0 = time.perf_counter()
    with pytest.raises(CudaCpuError, match=r"deadlock.*16 threads waiting in __syncthreads, 16 in warp intrinsics"):
        mod.get_function("divergent_shuffle")((1,), (32,), (out,))
    assert time.perf_counter() - t0 < 5.0
    # all threads were parked in barriers: the pool recovers and the next launch works
    ok = CpuModule(OK_CU).get_function("votes")
    res = np.zeros(4, np.uint32)
    ok((1,), (32,), (res,))
    assert res[1] == 10


def test_trap_reports_thread_and_block(ok_module: CpuModule) -> None:
    out = np.zeros(1, f32)
    with pytest.raises(CudaCpuError, match=r"trap_at: thread \(3,1,0\) of block \(1,0,0\): __trap\(\) called"):
        ok_module.get_function("trap_at")((2, 2), (4, 2), (out,))


def test_spin_loop_breaks_the_pool_and_later_launches_fail() -> None:
    # threads stuck outside a barrier cannot be stopped: run it where it cannot hurt other tests
    r = run_python(
        f"""
        import numpy as np
        from lenet_gpu.harness.cudacpu import CpuModule, CudaCpuError
        mod = CpuModule({str(BAD_CU)!r}, timeout=0.5)
        flag = np.zeros(1, np.int32)
        for attempt in range(2):
            try:
                mod.get_function("spin_forever")((1,), (32,), (flag,))
            except CudaCpuError as e:
                print("ERROR", e)
        """
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR")]
    assert len(lines) == 2
    assert "1 running" in lines[0] and "pool is broken" in lines[0]
    assert "restart the process" in lines[1]


def test_wild_pointer_crash_names_the_thread() -> None:
    r = run_python(
        f"""
        import numpy as np
        from lenet_gpu.harness.cudacpu import CpuModule
        out = np.zeros(64, np.float32)
        CpuModule({str(BAD_CU)!r}).get_function("wild_write")((3,), (32,), (out,))
        print("survived")
        """
    )
    assert r.returncode != 0
    assert "survived" not in r.stdout
    assert "illegal memory access (SIGSEGV" in r.stderr
    assert "kernel 'wild_write', thread (7,0,0) of block (2,0,0)" in r.stderr


# ------------------------------------------------------------------------------------ ISO C++ only


@pytest.mark.parametrize(
    "body, expect",
    [
        ("float acc[0]; acc[0] = 1.0f; a[0] = 0.0f;", "zero-size array"),  # NVRTC: "size of an array ... zero"
        ("float acc[n]; acc[0] = 1.0f; a[0] = acc[0];", "variable length array"),  # NVRTC: no VLAs either
    ],
)
def test_gnu_extensions_that_nvrtc_rejects_fail_the_build(body: str, expect: str) -> None:
    """g++ builds with -pedantic-errors: what compiles here must compile for the GPU (issue 16)."""
    code = f'extern "C" __global__ void k(float* a, int n) {{ {body} }}'
    with pytest.raises(CudaCpuError, match=expect):
        CpuModule(code=code)
