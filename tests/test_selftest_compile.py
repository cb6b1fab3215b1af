"""The self-test's compile phase compiles what runs (issue 16): the define sets the cupy launch planner gives
LeNet-5's launches, and MODULE_DEFINES as written (0 = chosen per launch) either compiles or stops at an #error
that names the define to set. The H200 self-test once failed 11 kernels of conv2d.cu with `float acc[K_BLOCK]`
at K_BLOCK=0, which g++ (a GNU extension) and the tests never saw. No GPU needed."""

from __future__ import annotations

import pytest

from lenet_gpu.backends.cupy_backend import OP_KERNELS, kernel_source, kernels_dir
from lenet_gpu.backends.cupy_backend.backend import MODULE_DEFINES
from lenet_gpu.backends.cupy_backend.compile_report import module_option_sets
from lenet_gpu.backends.cupy_backend.runtime import define_options
from lenet_gpu.selftest.compiling import defaults_outcome, planned_option_sets

K_BLOCK_ERROR = "K_BLOCK must be >= 1"


def _nvrtc():
    from lenet_gpu.harness import nvrtc  # part of the package: an import error here is a failure

    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed")
    return nvrtc


@pytest.fixture(scope="module")
def planned():
    return planned_option_sets(132)


def test_planned_sets_cover_every_kernel_and_set_no_zero(planned):
    """Every kernel of the backend is launched with some planned set, and no planned set passes a 0."""
    want = {f"{op}_{v}" for op, (_, vs) in OP_KERNELS.items() for v in vs}
    got = {n for names in planned.values() for n in names}
    assert want <= got, sorted(want - got)
    for (stem, opts), _ in planned.items():
        assert not any(o.endswith("=0") for o in opts), (stem, opts)
    # the conv tiles' widths are chosen per launch: more than one K_BLOCK is used over 2 .. 4096
    kb = {o for (stem, opts) in planned if stem == "conv2d" for o in opts if o.startswith("-DK_BLOCK=")}
    assert len(kb) >= 2, kb


def test_planned_sets_are_compiled_by_the_nvrtc_test(planned):
    """tests/test_kernels_compile.py compiles every set of module_option_sets with NVRTC for sm_80 and sm_90
    (warnings are errors, no spills): every set the planner gives LeNet-5's launches is among them."""
    sets = {(stem, opts) for stem, all_sets in module_option_sets().items() for opts in all_sets}
    assert set(planned) <= sets, sorted(set(planned) - sets)


def test_conv2d_with_k_block_0_stops_at_one_error_on_the_harness():
    from lenet_gpu.harness.cudacpu import CpuModule, CudaCpuError

    with pytest.raises(CudaCpuError) as info:
        CpuModule(path=kernels_dir() / "conv2d.cu", options=("-DK_BLOCK=0",))
    text = str(info.value)
    assert K_BLOCK_ERROR in text and "zero-size" not in text
    ok, how = defaults_outcome(text, {"K_BLOCK": 0})
    assert ok and K_BLOCK_ERROR in how, how


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_conv2d_with_k_block_0_stops_at_one_error_under_nvrtc(arch):
    nvrtc = _nvrtc()
    with pytest.raises(nvrtc.NvrtcError) as info:
        nvrtc.compile_cuda(kernel_source("conv2d"), arch=arch, options=("-DK_BLOCK=0",))
    log = info.value.log
    assert K_BLOCK_ERROR in log and "size of an array" not in log
    ok, how = defaults_outcome(log, {"K_BLOCK": 0})
    assert ok and how.count("#error") == 1, how


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_module_defines_as_written_compile_or_stop_at_an_error_naming_the_define(arch):
    """What the H200 self-test compiled: each module with MODULE_DEFINES as written (-DK_BLOCK=0 ...). A
    module whose options are a set the NVRTC test compiles anyway is not compiled twice."""
    nvrtc = _nvrtc()
    covered = {(stem, opts) for stem, all_sets in module_option_sets().items() for opts in all_sets}
    zero_modules = 0
    for stem, defines in MODULE_DEFINES.items():
        opts = define_options(defines)
        if (stem, opts) in covered:
            assert all(defines.values()), (stem, defines)
            continue
        zero_modules += 1
        try:
            nvrtc.compile_cuda(kernel_source(stem), arch=arch, options=opts)
            err = None
        except nvrtc.NvrtcError as e:
            err = e.log
        ok, how = defaults_outcome(err, defines)
        assert ok, f"{stem}.cu with {' '.join(opts)}: {how}"
    assert zero_modules >= 1  # conv2d: K_BLOCK and C_BLOCK are chosen per launch


def test_defaults_outcome_fails_what_it_must():
    # the H200 failure: a zero-size array, no #error
    log = ("conv2d.cu(136): error: the size of an array must be greater than zero\n"
           "          float acc[K_BLOCK];\n                    ^\n\n1 error detected in the compilation of \"x\".")
    assert defaults_outcome(log, {"K_BLOCK": 0, "C_BLOCK": 0})[0] is False
    # an #error, but it names no define that was 0
    log = 'conv2d.cu(60): catastrophic error: #error directive: "TILE must be even"\n  #error "TILE must be even"\n   ^'
    assert defaults_outcome(log, {"K_BLOCK": 0})[0] is False
    # an #error naming the define, followed by other errors
    log = ('conv2d.cu:70:2: error: #error "K_BLOCK must be >= 1"\n   70 | #error "K_BLOCK must be >= 1"\n'
           "conv2d.cu:137:19: error: ISO C++ forbids zero-size array 'acc'")
    assert defaults_outcome(log, {"K_BLOCK": 0})[0] is False
    assert defaults_outcome(None, {"K_BLOCK": 8}) == (True, "compiles")
