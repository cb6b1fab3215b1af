"""NVRTC static checks: compile for real GPU architectures without a GPU, read the ptxas report,
compute occupancy."""

from __future__ import annotations

import pytest

from lenet_gpu.harness import nvrtc
from lenet_gpu.harness.nvrtc import (
    NvrtcError,
    compile_cuda,
    max_active_blocks,
    nvrtc_available,
    parse_ptxas_log,
    theoretical_occupancy,
)

from .helpers import BAD_CU, KERNELS, OK_CU

needs_nvrtc = pytest.mark.skipif(not nvrtc_available(), reason="NVRTC (cuda-bindings) is not installed")

# An NVRTC 12.9 log for sm_80: two template instantiations, a non-inlined device function (_Z1ff,
# not an entry: skipped), an extern "C" kernel and a C++ kernel.
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem, 256 bytes cmem[3]
ptxas info    : Compiling entry function '_Z2tkIfLi128EEvPKT_PS0_i' for 'sm_80'
ptxas info    : Function properties for _Z2tkIfLi128EEvPKT_PS0_i
ptxas         .     160 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 160 bytes cumulative stack size, 512 bytes smem, 372 bytes cmem[0]
ptxas info    : Compile time = 8.484 ms
ptxas info    : Function properties for _Z1ff
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'ck' for 'sm_80'
ptxas info    : Function properties for ck
ptxas         .     0 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 368 bytes cmem[0]
ptxas info    : Compile time = 1.338 ms
ptxas info    : Compiling entry function '_Z4cppkPf' for 'sm_80'
ptxas info    : Function properties for _Z4cppkPf
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0], 8 bytes cmem[2]
"""


def test_parse_ptxas_log() -> None:
    ks = parse_ptxas_log(PTXAS_LOG, "sm_80")
    assert [k.kernel for k in ks] == ["tk<float, 128>", "ck", "cppk"]
    tk, ck, cppk = ks
    assert (tk.arch, tk.registers, tk.shared_bytes, tk.stack_bytes, tk.barriers, tk.cmem_bytes) == (
        "sm_80",
        32,
        512,
        160,
        1,
        372,
    )
    assert (tk.spill_stores, tk.spill_loads) == (0, 0)  # the device function's spills are not the kernel's
    assert (ck.registers, ck.spill_stores, ck.spill_loads, ck.shared_bytes) == (255, 12, 16, 0)
    assert cppk.cmem_bytes == 368 and cppk.mangled == "_Z4cppkPf"
    assert parse_ptxas_log("", "sm_90") == []


def test_demangle() -> None:
    assert nvrtc.demangle("_Z2tkIdLi64EEvPKT_PS0_i") == "tk<double, 64>"
    assert nvrtc.demangle("_Z4cppkPf") == "cppk"
    assert nvrtc.demangle("plain_c_name") == "plain_c_name"


@pytest.mark.parametrize(
    "regs, smem, threads, arch, expect",
    [
        (32, 0, 256, "sm_90", 1.0),  # 8 blocks x 8 warps: warps and registers both allow 64 warps
        (64, 0, 256, "sm_90", 0.5),  # 2048 regs/warp: 8 warps per sub-partition -> 32 warps
        (40, 0, 128, "sm_90", 0.75),  # 1280 regs/warp: floor(16384/1280)=12 per sub-partition -> 48 warps
        (40, 0, 32, "sm_90", 0.5),  # 32 resident blocks of 1 warp: the block limit binds
        (32, 48 * 1024, 128, "sm_90", 0.25),  # (48 KiB + 1 KiB reserved) -> 4 blocks in 228 KiB
        (32, 48 * 1024, 128, "sm_80", 0.1875),  # 3 blocks in 164 KiB
        (32, 0, 1024, "sm_90", 1.0),
        (64, 0, 1024, "sm_90", 0.5),
        (65, 0, 1024, "sm_90", 0.0),  # 2304 regs/warp x 32 warps > 65536: cannot launch
        (32, 228 * 1024, 128, "sm_90", 0.0),  # above the 227 KiB opt-in maximum
        (32, 0, 256, "sm_86", 1.0),  # 1536 threads/SM: 6 blocks x 8 warps = 48 of 48
        (32, 0, 100, "sm_90", 1.0),  # 100 threads allocate 4 warps: 16 blocks x 4 warps = 64
    ],
)
def test_theoretical_occupancy(regs: int, smem: int, threads: int, arch: str, expect: float) -> None:
    assert theoretical_occupancy(regs, smem, threads, arch) == pytest.approx(expect)


def test_occupancy_limiter_and_errors() -> None:
    assert max_active_blocks(32, 0, 32, "sm_90") == (32, "blocks")
    assert max_active_blocks(128, 0, 256, "sm_90") == (2, "registers")
    assert max_active_blocks(16, 100 * 1024, 64, "sm_90") == (2, "shared memory")
    assert max_active_blocks(16, 0, 512, "sm_90") == (4, "warps")
    assert theoretical_occupancy(32, 0, 256, "sm_90a") == 1.0
    with pytest.raises(ValueError, match="block_threads"):
        theoretical_occupancy(32, 0, 1025)
    with pytest.raises(ValueError, match="no occupancy limits"):
        theoretical_occupancy(32, 0, 256, "sm_61")


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles_the_test_kernels(arch: str) -> None:
    res = compile_cuda(path=OK_CU, arch=arch, name_expressions=("fill<float>", "fill<double>"))
    assert res.cubin is not None and res.cubin[:4] == b"\x7fELF"
    assert ".entry block_sum" in res.ptx
    by_name = {k.kernel: k for k in res.kernels}
    assert {"block_sum", "tiled_matmul", "warp_sums", "fill<float>", "fill<double>"} <= set(by_name)
    assert res.lowered_names["fill<double>"].startswith("_Z")
    for k in res.kernels:
        assert k.arch == arch
        assert 0 < k.registers <= 255
        assert (k.spill_stores, k.spill_loads) == (0, 0), k
    assert by_name["tiled_matmul"].shared_bytes == (16 * 16 + 16 * 17) * 4
    assert by_name["block_sum"].barriers == 1
    assert 0 < by_name["tiled_matmul"].occupancy(256) <= 1.0


@needs_nvrtc
def test_broken_kernels_are_still_valid_cuda() -> None:
    res = compile_cuda(path=BAD_CU, arch="sm_90")
    assert len(res.kernels) == BAD_CU.read_text().count("__global__ void") == 9


@needs_nvrtc
def test_syntax_error_raises_with_the_log() -> None:
    src = 'extern "C" __global__ void k(float* a) { a[0] = undefined_thing; }\n'
    with pytest.raises(NvrtcError, match="NVRTC_ERROR_COMPILATION") as e:
        compile_cuda(src)
    assert 'identifier "undefined_thing" is undefined' in str(e.value)
    assert "<source>.cu(1): error" in e.value.log


@needs_nvrtc
def test_warnings_are_errors_unless_allowed() -> None:
    src = 'extern "C" __global__ void k(float* a) { int unused = 3; a[0] = 1.0f; }\n'
    with pytest.raises(NvrtcError, match="treated as errors") as e:
        compile_cuda(src, arch="sm_80")
    assert 'warning #177-D: variable "unused" was declared but never referenced' in e.value.log
    res = compile_cuda(src, arch="sm_80", warnings_as_errors=False)
    assert "warning" in res.log and res.kernels[0].kernel == "k"
    clean = compile_cuda('extern "C" __global__ void k(float* a) { a[0] = 1.0f; }\n', arch="sm_80")
    assert "warning" not in clean.log.lower()


@needs_nvrtc
def test_options_includes_spills_and_virtual_arch() -> None:
    src = '#include "harness_common.cuh"\nextern "C" __global__ void k(float* a) { a[0] = scaled(a[0]); }\n'
    with pytest.raises(NvrtcError, match="cannot open source file"):
        compile_cuda(src)
    res = compile_cuda(src, include_dirs=[KERNELS], options=("-DSCALE=3",))
    assert "3.0" in res.ptx or "0f40400000" in res.ptx  # the constant 3.0f in PTX
    heavy = """
    extern "C" __global__ void heavy(const float* x, float* y) {
        float v[24];
    #pragma unroll
        for (int i = 0; i < 24; ++i) v[i] = x[threadIdx.x * 24 + i];
        float acc = 0.0f;
    #pragma unroll
        for (int i = 0; i < 24; ++i)
    #pragma unroll
            for (int j = 0; j < 24; ++j) acc += v[i] * v[j] * (i + 1);
    #pragma unroll
        for (int i = 0; i < 24; ++i) y[threadIdx.x * 24 + i] = v[i] * acc;
    }
    """
    (k,) = compile_cuda(heavy, options=("--maxrregcount=24",)).kernels
    assert k.registers <= 24 and k.spill_stores > 0 and k.spill_loads > 0
    ptx_only = compile_cuda(heavy, arch="compute_90")
    assert ptx_only.cubin is None and ".entry heavy" in ptx_only.ptx and ptx_only.kernels == []


@needs_nvrtc
def test_command_line_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = nvrtc.main([str(OK_CU), "--arch", "sm_90", "--name-expression", "fill<float>", "--block", "128"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "harness_ok.cu:tiled_matmul" in out and "occ@128" in out and "fill<float>" in out
    assert nvrtc.main([str(OK_CU), "--arch", "sm_90", "-D", "SCALE=(", "--block", "64"]) == 1


@needs_nvrtc
def test_an_empty_log_leaves_python_intact() -> None:
    """NVRTC writes each output into the buffer it is given. A one-byte log (just its NUL) once went into
    ``b" " * 1`` — CPython's interned single-space bytes object — so every later ``b" "`` in the process
    was a NUL byte, and NumPy wrote .npy headers padded with NULs that it could not read back."""
    res = compile_cuda('extern "C" __global__ void k(float* a) { a[0] = 1.0f; }', arch="compute_90")
    assert ".entry k" in res.ptx  # PTX only: no ptxas report, so the log is empty
    assert b" " * 3 == bytes([32, 32, 32])
