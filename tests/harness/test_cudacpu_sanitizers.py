"""Sanitizer builds of the CPU harness find memory errors and races in kernels, and stay quiet on
correct ones. Each case runs in a subprocess: ASan aborts the process at the first error, and ASan
and TSan must be preloaded before Python starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lenet_gpu.harness.cudacpu import CpuModule, CudaCpuError, sanitizer_env, sanitizer_runtime_loaded

from .helpers import BAD_CU, OK_CU, needs_gxx, run_python

pytestmark = needs_gxx


def line_of(path: object, marker: str) -> int:
    """1-based line number of the first line of ``path`` that contains ``marker``."""
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if marker in line:
            return i
    raise AssertionError(f"{marker!r} not in {path}")


def run_sanitized(kind: str, body: str, report_dir: Path | None = None) -> tuple[int, str]:
    # build only the modules the body uses: every sanitizer build costs seconds
    modules = "".join(
        f"{var} = CpuModule({str(path)!r})\n" for var, path in (("ok", OK_CU), ("bad", BAD_CU)) if f"{var}." in body
    )
    code = (
        "import numpy as np\n"
        "from lenet_gpu.harness.cudacpu import CpuModule\n"
        + modules
        + "f32, i32 = np.float32, np.int32\n"
        + body
        + "\nprint('FINISHED')\n"
    )
    r = run_python(code, env=sanitizer_env(kind, report_dir=report_dir))
    return r.returncode, r.stdout + r.stderr


CLEAN_RUNS = """
rng = np.random.default_rng(0)
x = rng.standard_normal(1000).astype(f32); out = np.zeros(8, f32)
ok.get_function("block_sum")((8,), (128,), (x, out, i32(1000)), shared_mem=512)
a = rng.standard_normal((37, 45)).astype(f32); b = rng.standard_normal((45, 29)).astype(f32)
c = np.zeros((37, 29), f32)
ok.get_function("tiled_matmul")((2, 3), (16, 16), (a, b, c, i32(37), i32(29), i32(45)))
assert np.allclose(c, a @ b, atol=1e-4)
d = np.zeros(32, f32); xa = np.zeros(1000, f32)
ok.get_function("warp_sums")((8,), (128,), (x, d, xa, i32(1000)))
v = np.zeros(4, np.uint32); ok.get_function("votes")((1,), (64,), (v,))
s = np.zeros(1, f32); ok.get_function("atomic_sum")((4,), (256,), (x, s, i32(1000)))
p = np.zeros(128, f32); ok.get_function("read_dynamic_smem")((2,), (64,), (p,), shared_mem=256)
"""


def test_sanitizer_build_needs_the_preloaded_runtime() -> None:
    if sanitizer_runtime_loaded("address"):
        pytest.skip("this process already runs under ASan")
    with pytest.raises(CudaCpuError, match="LD_PRELOAD=.*libasan"):
        CpuModule(OK_CU, sanitize="address")
    with pytest.raises(CudaCpuError, match="unknown sanitizer"):
        CpuModule(OK_CU, sanitize="memory")


def test_asan_finds_global_out_of_bounds_write() -> None:
    rc, out = run_sanitized("address", 'bad.get_function("global_oob")((2,), (256,), (np.zeros(256, f32), i32(256)))')
    assert rc != 0 and "FINISHED" not in out
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in out
    assert f"harness_bad.cu:{line_of(BAD_CU, '// off by one')}" in out
    assert "in global_oob" in out


def test_asan_finds_dynamic_shared_memory_overrun() -> None:
    rc, out = run_sanitized(
        "address", 'bad.get_function("smem_overrun")((1,), (64,), (np.zeros(64, f32), i32(64)), shared_mem=64)'
    )
    assert rc != 0 and "FINISHED" not in out
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in out
    assert f"harness_bad.cu:{line_of(BAD_CU, 'buf[threadIdx.x] = 1.0f;')}" in out


def test_asan_is_quiet_on_correct_kernels() -> None:
    rc, out = run_sanitized("address", CLEAN_RUNS)
    assert rc == 0, out
    assert "FINISHED" in out and "AddressSanitizer" not in out


def test_tsan_finds_missing_barrier(tmp_path: Path) -> None:
    # reports go to files (report_dir), as under pytest, which would swallow them from stderr
    rc, stdio = run_sanitized(
        "thread",
        """
a = np.ones((64, 64), f32); b = np.ones((64, 64), f32); c = np.zeros((64, 64), f32)
bad.get_function("matmul_missing_sync")((4, 4), (16, 16), (a, b, c, i32(64), i32(64), i32(64)))
""",
        report_dir=tmp_path,
    )
    files = list(tmp_path.glob("thread.*"))
    assert len(files) == 1, stdio
    out = files[0].read_text() + stdio
    assert "WARNING: ThreadSanitizer" not in stdio
    assert "WARNING: ThreadSanitizer: data race" in out
    assert "in matmul_missing_sync" in out or "matmul_missing_sync " in out
    racy_lines = {
        line_of(BAD_CU, "sA[ty][tx] = (row < M"),
        line_of(BAD_CU, "sB[ty][tx] = (t * TILE"),
        line_of(BAD_CU, "acc += sA[ty][k] * sB[k][tx]"),
    }
    assert any(f"harness_bad.cu:{n}" in out for n in racy_lines), out[-3000:]
    assert "FINISHED" in out  # TSan reports and goes on; the exit status says races were found
    assert rc != 0


def test_tsan_is_quiet_on_correct_kernels() -> None:
    """The harness's own synchronisation (pool, barriers, shuffles) must not produce reports."""
    rc, out = run_sanitized("thread", CLEAN_RUNS)
    assert "ThreadSanitizer" not in out, out[-4000:]
    assert rc == 0 and "FINISHED" in out


def test_ubsan_finds_signed_overflow() -> None:
    rc, out = run_sanitized(
        "undefined", 'bad.get_function("int_overflow")((1,), (4,), (np.zeros(4, i32), i32(2**31 - 2)))'
    )
    assert "runtime error: signed integer overflow" in out
    assert f"harness_bad.cu:{line_of(BAD_CU, 'big + (int)threadIdx.x')}" in out
    assert "FINISHED" in out


# the production kernels under the sanitizers: the act × pool × variant matrix of the dense kernels (v2/v3: shared
# memory tiles, barriers, warp shuffles) through tests/test_cupy_backend.py's cupy-host child, which preloads the
# runtime (CUDACPU_SANITIZE). A subset that fits the suite's budget: a sanitizer build of the conv2d module alone
# takes minutes on two cores (the whole cupy-host suite: CUDACPU_SANITIZE=address|thread pytest
# tests/test_cupy_backend.py -k host, see that file's docstring).
PRODUCTION_SUBSET = {
    "address": "act_pool_matrix and (dense_fwd or dense_bwd or pool2x2_bwd)",
    "thread": "act_pool_matrix and dense_bwd",
}


@pytest.mark.parametrize("kind", sorted(PRODUCTION_SUBSET))
def test_production_kernels_under_sanitizer(kind: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CUDACPU_SANITIZE": kind, "LENET_CUPY_HOST_K": PRODUCTION_SUBSET[kind],
           "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           str(root / "tests" / "test_cupy_backend.py"), "-k", "host_suite"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "1 passed" in out, out[-3000:]
    assert "Sanitizer" not in out, out[-6000:]


def test_vector_loads_of_the_convolutions_are_aligned_under_ubsan() -> None:
    """The convolutions read shared memory as float2 / float4 (load_row2's window rows, the weights): on a GPU a
    misaligned one is a fault ("misaligned address"); on the CPU a g++ float2 has alignof 8 (cudacpu.h), so UBSan's
    alignment check sees the same fault. lenet_fwd (v3 and v4 through lf_conv: run-time image pitches) and
    step_fwd v1/v2 (static arrays) run clean under -fsanitize=undefined; a window read one float off
    (``load_row2(xin + 1, ...)``) reports "load of misaligned address" here (checked 2026-12-07)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CUDACPU_SANITIZE": "undefined", "PYTHONPATH": str(root)}
    # -s: UBSan writes its reports to fd 2 from inside the harness; pytest's capture would keep them to itself
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o", "addopts=",
           str(root / "tests" / "test_lenet_fwd_v4.py"), str(root / "tests" / "test_step_fwd_update.py"),
           "-k", "(same_bits and 13) or (equals_composition and relu)"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "3 passed" in out, out[-3000:]
    assert "runtime error" not in out, out[-6000:]
