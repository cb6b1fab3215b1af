"""The CPU harness reports what would corrupt or hang a GPU launch: wrong argument types, invalid
launch configurations, divergent barriers, deadlocks, traps, wild pointers."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

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
    # fibers report it as soon as no thread can go on, OS threads after the timeout
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


# ------------------------------------------------------------------------------------ how a block's threads run


def _expected_block_threads() -> str:
    if os.environ.get("CUDACPU_THREADS") == "os" or os.environ.get("CUDACPU_SANITIZE") in ("address", "thread"):
        return "os"
    return "fibers" if platform.machine() == "x86_64" else "os"


def test_block_threads_are_fibers_where_the_build_can_have_them(ok_module: CpuModule) -> None:
    assert ok_module.block_threads == _expected_block_threads()


needs_fibers = pytest.mark.skipif(_expected_block_threads() != "fibers",
                                  reason="fibers only: x86-64, no CUDACPU_THREADS=os, no ASan/TSan build")


@needs_fibers
def test_fiber_order_exposes_a_missing_barrier_from_both_sides() -> None:
    """Threads run in an order that changes from block to block, so a read that lacks its barrier finds the
    neighbour's value missing in some places and present in others (in thread order it is always missing)."""
    blocks, threads = 16, 128
    x = np.arange(blocks * threads, dtype=f32)
    out = np.zeros_like(x)
    CpuModule(BAD_CU).get_function("neighbour_without_barrier")((blocks,), (threads,), (x, out))
    want = (x.reshape(blocks, threads)[:, (np.arange(threads) + 1) % threads]).ravel()
    stale = np.isnan(out)
    assert np.array_equal(out[~stale], want[~stale])
    assert 0.25 < stale.mean() < 0.75, stale.mean()


@needs_fibers
def test_fiber_order_breaks_a_matmul_missing_its_second_barrier() -> None:
    """The write-after-read race of matmul_missing_sync: the next tile overwrites what slower threads still read.
    OS threads on the CPU often get it right; fibers resumed in a shuffled order do not."""
    rng = np.random.default_rng(0)
    m, n, k = 32, 32, 64
    a, b = rng.standard_normal((m, k)).astype(f32), rng.standard_normal((k, n)).astype(f32)
    c = np.zeros((m, n), f32)
    CpuModule(BAD_CU).get_function("matmul_missing_sync")((2, 2), (16, 16), (a, b, c, i32(m), i32(n), i32(k)))
    assert not np.allclose(c, a @ b, rtol=1e-4, atol=1e-4)


@needs_fibers
def test_fiber_stack_overflow_names_the_thread() -> None:
    """A fiber has 1 MiB of stack (a GPU thread at most 512 KiB of local memory): an overflow far past it is a
    SIGSEGV reported with the thread's coordinates. (Not shown here: that the guard page or the runner's alternate
    signal stack is what catches it; with either removed this test still passes, the writes landing in memory that
    is not mapped.)"""
    kernel = (
        'extern "C" __global__ void deep(float* out) {\n'
        "    volatile float big[1 << 19];  // 2 MiB\n"
        "    for (int i = 0; i < (1 << 19); i += 1024) big[i] = i;\n"
        "    out[threadIdx.x] = big[threadIdx.x * 1024];\n"
        "}\n"
    )
    r = run_python(
        f"""
        import numpy as np
        from lenet_gpu.harness.cudacpu import CpuModule
        m = CpuModule(code={kernel!r})
        m.get_function("deep")((1,), (4,), (np.zeros(4, np.float32),))
        print("FINISHED")
        """
    )
    assert r.returncode != 0 and "FINISHED" not in r.stdout
    assert re.search(r"illegal memory access \(SIGSEGV at 0x[0-9a-f]+\) in kernel 'deep', thread \([0-3],0,0\) of "
                     r"block \(0,0,0\)", r.stderr), r.stderr


@pytest.mark.skipif(os.environ.get("CUDACPU_THREADS") == "os", reason="already the OS-thread run")
def test_os_threads_pass_the_harness_tests() -> None:
    """The OS-thread pool (sanitizer builds, ``CUDACPU_THREADS=os``) passes this file and test_cudacpu.py too."""
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "CUDACPU_SANITIZE"}
    env["CUDACPU_THREADS"] = "os"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        str(here / "test_cudacpu.py"), str(here / "test_cudacpu_errors.py")],
                       capture_output=True, text=True, env=env, cwd=here.parents[1], timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


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
