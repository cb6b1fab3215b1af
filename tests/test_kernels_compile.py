"""Every kernels/*.cu compiles with NVRTC for sm_80 and sm_90 with each option set the cupy backend uses
(a warning is a failure), and the ptxas report of the kernels at their LeNet launch shapes has no spills
and fits the shared memory a block gets without an opt-in. No GPU needed."""

from __future__ import annotations

import pytest

from lenet_gpu.backends.cupy_backend import OP_KERNELS, kernel_source, kernels_dir
from lenet_gpu.backends.cupy_backend.compile_report import module_option_sets
from lenet_gpu.harness import nvrtc  # noqa: E402 - part of the package: an import error here is a failure

if not nvrtc.nvrtc_available():
    pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed", allow_module_level=True)

ARCHS = ("sm_80", "sm_90")
#: The option sets of the backend, plus the non-default ones the parity tests use.
ALT = {
    "conv2d": {"K_BLOCK": 4, "C_BLOCK": 4, "J_BLOCK": 3, "BWD_THREADS": 64},
    "dense": {"TILE_O": 8, "TILE_N": 4, "RN": 3, "TILE_I": 5, "VEC": 3},
    "loss": {"LOSS_THREADS": 32},
}
OPTION_SETS = sorted(
    {(stem, opts) for d in (None, ALT) for stem, sets in module_option_sets(d).items() for opts in sets}
)


def test_every_kernel_file_is_covered():
    stems = {p.stem for p in kernels_dir().glob("*.cu")}
    assert stems == {stem for stem, _ in OPTION_SETS}
    assert stems == {stem for stem, _ in OP_KERNELS.values()}


def _compile(key: tuple[str, tuple[str, ...], str]) -> object:
    stem, options, arch = key
    try:
        return nvrtc.compile_cuda(kernel_source(stem), arch=arch, options=options, warnings_as_errors=True)
    except nvrtc.NvrtcError as e:  # raised again by the test of this build
        return e


@pytest.fixture(scope="module")
def compiled(request) -> dict:
    """NVRTC's results for the builds the selected tests check, compiled on two threads when the first of them
    runs (NVRTC releases the GIL: about 150 s of compiles take half the time where a core is idle)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = sorted({(it.callspec.params["stem"], it.callspec.params["options"], it.callspec.params["arch"])
                   for it in request.session.items
                   if getattr(it, "originalname", "") == "test_compiles_without_warnings"})
    with ThreadPoolExecutor(2) as ex:
        return dict(zip(keys, ex.map(_compile, keys), strict=True))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem,options", OPTION_SETS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_compiles_without_warnings(stem, options, arch, compiled):
    res = compiled.get((stem, options, arch)) or _compile((stem, options, arch))
    if isinstance(res, Exception):
        raise res
    names = {k.kernel for k in res.kernels}
    want = {f"{op}_{v}" for op, (s, vs) in OP_KERNELS.items() if s == stem for v in vs}
    assert want <= names, f"{stem}.cu lacks kernels {sorted(want - names)}"
    for k in res.kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0, f"{k.kernel} spills on {arch}: {k}"


def test_compile_errors_are_readable():
    with pytest.raises(nvrtc.NvrtcError, match="undefined_thing"):
        nvrtc.compile_cuda('extern "C" __global__ void k(float* a) { a[0] = undefined_thing; }', arch="sm_90")


@pytest.fixture(scope="module")
def report():
    from bench.launches import cupy_kernel_records

    return cupy_kernel_records(archs=ARCHS)


def test_report_covers_every_kernel(report):
    want = {f"{op}_{v}" for op, (_, vs) in OP_KERNELS.items() for v in vs}
    # head_train's second kernel: v1's and v2's own; v3's and v4's plans launch wgrad v4 (wgrad v3, v3's bits, is in no
    # plan since 2026-12-07: compiled and checked above with its module, and in tests/test_head_v3.py)
    want |= {f"head_train_wgrad_{'v4' if v in ('v3', 'v4') else v}" for v in OP_KERNELS["head_train"][1]}
    for arch in ARCHS:
        assert {r["kernel"] for r in report if r["arch"] == arch} == want


def test_report_resources(report):
    keys = {"backend", "op", "kernel", "variant", "arch", "registers", "shared_bytes", "stack_bytes",
            "spill_stores", "spill_loads", "block_threads", "occupancy"}
    for r in report:
        assert keys <= r.keys()
        assert r["backend"] == "cupy"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared_bytes"] <= 48 * 1024, r  # no launch opts in to more
        assert 32 <= r["block_threads"] <= 1024 or r["kernel"] == "step_advance_v1", r  # that one: 1 thread
        assert r["registers"] * r["block_threads"] <= 65536, r
        assert r["occupancy"] > 0, r


def test_state_words_match_stepstate():
    """common.cuh's ST_* word indices are lenet_gpu.stepstate's (the kernels read the same state)."""
    import re

    from lenet_gpu import stepstate

    text = (kernels_dir() / "common.cuh").read_text()
    words = {m[1]: int(m[2]) for m in re.finditer(r"#define ST_([A-Z_]+) (\d+)", text)}
    want = {f.upper(): getattr(stepstate, f.upper()) for f in stepstate.FIELDS}
    assert words == want


def test_fill_table():
    """The fill table (scripts/kernel_report.py): every launch of a training step and an inference pass at
    batch 256 with its grid, registers from ptxas and a positive occupancy; the conv tile launches give every
    one of 132 SMs a block; the summary counts the launches under one block per SM."""
    from bench.launches import cupy_fill_records, fill_markdown, fill_summary

    rows = cupy_fill_records(batches=(256,), arch="sm_90", sm_count=132)
    train = [r for r in rows if r["pass"] == "train"]
    assert [r["index"] for r in train] == list(range(len(train)))
    # the default step with max pooling: the four-kernel step (docs/step4.md), head_train being two kernels
    assert [r["kernel"] for r in train] == ["step_fwd_v1", "head_train_v3", "head_train_wgrad_v4", "step_bwd_v2",
                                            "step_adam_v1"]
    assert {r["pass"] for r in rows} == {"train", "infer"}
    for r in rows:
        assert r["registers"] > 0 and r["occupancy"] > 0 and r["resident_blocks_per_sm"] >= 1, r
        assert r["backend"] == "cupy" and r["waves"] == round(r["blocks"] / (132 * r["resident_blocks_per_sm"]), 3)
        if r["op"] in ("conv2d_pool_fwd", "conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_data_pool",
                       "conv2d_bwd_weight", "batch_prepare", "adam_step", "step_fwd", "step_bwd", "step_adam"):
            assert r["blocks"] >= 132, r
    summary = {(s["pass"], s["batch"]): s for s in fill_summary(rows) if s["backend"] == "cupy"}
    assert summary[("train", 256)]["launches"] == len(train)
    assert summary[("train", 256)]["under_one_block_per_sm"] == sum(r["blocks"] < 132 for r in train)
    assert "| cupy | train | 256 |" in fill_markdown(rows)
