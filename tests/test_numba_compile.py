"""Static checks of every Numba kernel, with no GPU: compile_ptx for sm_80 and sm_90 with the exact
signature its launches use, no float64 in the PTX, no register spills (ptxas -v), and the
compile_report table and CLI. Runs in the main pytest process, where the simulator is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile checks need the real compiler (NUMBA_ENABLE_CUDASIM is set)", allow_module_level=True)
require("numba.cuda")

from lenet_gpu.backends.numba_backend import KERNELS, SIGNATURES, VARIANTS  # noqa: E402
from lenet_gpu.backends.numba_backend import compile_report as cr  # noqa: E402

ARCHS = ("sm_80", "sm_90")
#: the backend's kernels and the routed backward's (the report covers both: cr.REPORT_VARIANTS)
KERNEL_NAMES = sorted({f"{op}_{v}" for op, vs in cr.REPORT_VARIANTS.items() for v in vs})


@pytest.fixture(scope="module")
def report() -> dict[tuple[str, str], dict]:
    """Every kernel compiled once per arch for the whole module (compile_ptx is ~1 s a kernel)."""
    try:
        cr.ptxas_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return {(r["kernel"], r["arch"]): r for r in cr.compile_report(ARCHS, include_ptx=True)}


def test_every_kernel_has_a_signature_and_a_variant_entry():
    assert set(KERNELS) == set(SIGNATURES)
    assert set(KERNELS) == {f"{op}_{v}" for op, vs in VARIANTS.items() for v in vs}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_compiles_without_float64_or_spills(report, kernel, arch):
    r = report[(kernel, arch)]
    assert f".target {arch}" in r["ptx"]
    assert ".entry" in r["ptx"]
    bad = cr.f64_lines(r["ptx"])
    assert not bad, f"{kernel} ({arch}) has float64 in its PTX:\n" + "\n".join(bad[:10])
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{kernel} ({arch}) spills: {r}"
    assert r["stack_bytes"] == 0, f"{kernel} ({arch}) uses a stack frame (local arrays not in registers?): {r}"
    assert 0 < r["registers"] <= 128, r
    assert 0 < r["occupancy"] <= 1 and r["block_threads"] > 0, r


#: the kernels a training step runs by default, with their int32 offsets: ≤ 64 registers on sm_90, so
#: 128-thread blocks reach half of an SM's warps (the occupancy their launch shapes are sized for).
#: (sm_80's ptxas gives conv2d_pool_fwd_v2 66: occupancy 0.44 there.)
HOT_KERNELS = ("conv2d_fwd_v3", "conv2d_pool_fwd_v2", "conv2d_bwd_data_v2", "conv2d_bwd_weight_v3",
               "conv2d_bwd_data_pool_v2", "conv2d_bwd_weight_routed_v2", "conv2d_bwd_data_routed_v1")


#: the default four-kernel step's kernels (docs/step4.md) that meet the same bound: the forward at both batch plans,
#: the head's small-batch kernel and its weight gradients, the update
STEP4_HOT_KERNELS = ("step_fwd_v1", "step_fwd_v2", "head_train_v3", "head_train_wgrad_v4", "step_adam_v1")
#: the step's kernels that do not, by design, with their register budget on sm_90 and why (issue #19's target of 64
#: is not met by these two):
#: - head_train_v4 (the head at batch ≥ 1,049): 4 rows × up to 7 columns of accumulators a thread and 4 k steps of
#:   loads in flight; at 64 registers ptxas spills 84-100 bytes. Its occupancy is bounded by its grid, not its
#:   registers, up to batch ~8,400 (a warp per 4 rows: 1,024 warps at batch 4,096, ~8 an SM, where 128 registers
#:   allow 16), so per-thread ILP is what hides latency there. A 64-register build that does not spill exists (4
#:   columns a lane, 2 k steps unrolled, the staging loops strided at run time), but it issues ~27% more
#:   instructions in dx and keeps a third of the loads in flight a warp: slower by that count at the batches it runs.
#: - step_bwd_v2: 80 registers (3 blocks an SM); the plan (step_groups) gives 2 blocks an SM and the kernel is
#:   bound by shared-memory loads (its header), so 64 registers (which Numba reaches without spills at launch
#:   bounds (256, 4), CUDA C not) would change nothing at today's plan.
STEP4_REGISTER_BUDGETS = {"head_train_v4": 128, "head_train_v4_r16": 128, "head_train_v4_r32": 128, "step_bwd_v2": 80}


@pytest.mark.parametrize("kernel", HOT_KERNELS + STEP4_HOT_KERNELS)
def test_hot_kernels_fit_64_registers_and_half_occupancy_on_sm90(report, kernel):
    arch = "sm_90"
    r = report[(kernel, arch)]
    assert r["registers"] <= 64, f"{kernel} ({arch}): {r['registers']} registers"
    assert r["occupancy"] >= 0.5, f"{kernel} ({arch}): occupancy {r['occupancy']}"


@pytest.mark.parametrize("kernel", sorted(STEP4_REGISTER_BUDGETS))
def test_step4_kernels_past_64_registers_stay_within_their_budget(report, kernel):
    """The exceptions above: no more registers than their documented budget (a growth is a regression), and each
    still past 64 (once one fits, it belongs in STEP4_HOT_KERNELS)."""
    r = report[(kernel, "sm_90")]
    assert 64 < r["registers"] <= STEP4_REGISTER_BUDGETS[kernel], (kernel, r["registers"])


def test_report_records_have_the_documented_fields(report):
    keys = {"backend", "op", "kernel", "variant", "arch", "registers", "shared_bytes", "stack_bytes",
            "spill_stores", "spill_loads", "block_threads", "occupancy"}
    assert len(report) == len(KERNEL_NAMES) * len(ARCHS)
    for r in report.values():
        assert keys <= set(r), sorted(keys - set(r))
        assert r["backend"] == "numba" and r["kernel"] == f"{r['op']}_{r['variant']}"
    # kernels that stage data in shared memory report it (static, or dynamic at LeNet shapes)
    for k in ("conv2d_fwd_v2", "conv2d_fwd_v3", "conv2d_pool_fwd_v2", "conv2d_bwd_data_v2", "conv2d_bwd_weight_v2",
              "conv2d_bwd_weight_v3", "conv2d_bwd_data_pool_v2", "dense_fwd_v2", "dense_bwd_v2", "softmax_xent_v1"):
        assert report[(k, "sm_90")]["shared_bytes"] > 0, k


def test_step_fwd_reports_its_own_dynamic_shared_memory(report):
    """step_fwd's shared memory is dynamic (step4_fwd.step_fwd_smem): each variant's record has its own launch's
    bytes (v2 two images' x and p1), not batch 64's plan's (which runs v1)."""
    from lenet_gpu.backends.numba_backend import step4_fwd

    for v, want in (("v1", 19296), ("v2", 28096)):
        assert step4_fwd.step_fwd_smem(v) == want
        for arch in ARCHS:
            assert report[(f"step_fwd_{v}", arch)]["shared_bytes"] == want, (v, arch)


def _normalised(ptx: str) -> str:
    """PTX less what differs between two compiles of the same code: the mangled names (with a per-compile
    counter) and the numbered shared-memory symbols."""
    import re

    return re.sub(r"_cudapy_smem_\d+", "SMEM", re.sub(r"_ZN\w+", "NAME", ptx))


@pytest.mark.parametrize("kernel", ["dense_fwd_v2", "step_bwd_v1"])
def test_shared_lowering_gives_compile_ptx_code(report, kernel):
    """compile_report lowers a kernel once and asks its library for each arch's PTX (_lowered): for sm_90 that is
    compile_ptx's code for sm_90 (its own lowering), instruction for instruction. step_bwd_v1 has launch bounds
    (.maxntid, .minnctapersm) and static shared memory; dense_fwd_v2 neither."""
    from numba import cuda

    k, sig = cr.all_kernels()[kernel]
    lib = cr._lowered(kernel, None, (8, 0))
    assert lib is not None  # this numba-cuda has the internal call (else compile_report falls back to compile_ptx)
    ref, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0), launch_bounds=cr.all_launch_bounds().get(kernel))
    assert ".target sm_90" in ref
    assert _normalised(lib.get_asm_str(cc=(9, 0))) == _normalised(ref)
    assert _normalised(report[(kernel, "sm_90")]["ptx"]) == _normalised(ref)  # the report's, made by its workers


def test_f64_lint_catches_a_float64_kernel():
    """The lint has teeth: a bare Python float literal promotes float32 arithmetic to float64."""
    from numba import cuda

    def leaky(a):
        i = cuda.grid(1)
        if i < a.shape[0]:
            a[i] = a[i] * 0.5 + 1.0  # Python floats are float64 in Numba

    ptx, _ = cuda.compile_ptx(leaky, "void(float32[::1])", cc=(9, 0))
    assert any("f64" in line for line in cr.f64_lines(ptx)), "a float64 kernel passed the lint"


def test_parse_ptxas():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
        "ptxas info    : Function properties for k\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 2112 bytes smem, 400 bytes cmem[0]\n"
    )
    assert cr.parse_ptxas(log) == {"registers": 40, "shared_bytes": 2112, "stack_bytes": 8,
                                   "spill_stores": 4, "spill_loads": 4}


def test_cli_writes_json(tmp_path, report, capsys):
    """The CLI entry on one arch (in-process: compile_kernel's cache reuses the fixture's builds)."""
    out = tmp_path / "numba_kernels.json"
    assert cr.main(["--arch", "sm_90", "--json", str(out)]) == 0
    assert "conv2d_fwd_v2" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert {r["kernel"] for r in records} == set(KERNEL_NAMES)
    assert all(r["arch"] == "sm_90" for r in records)
    for r in records:
        assert r["registers"] == report[(r["kernel"], "sm_90")]["registers"]


def test_cli_help():
    res = subprocess.run(
        [sys.executable, "-m", "lenet_gpu.backends.numba_backend.compile_report", "--help"],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0 and "--json" in res.stdout


_ROW_STACK_PROBE = """
import numpy as np
delattr(np, "row_stack")  # as NumPy 2.5 does
{setup}
from numba import cuda

def k(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = np.float32(1)

cuda.compile_ptx(k, "void(float32[::1])", cc=(9, 0))
print("compiled")
"""


@pytest.mark.parametrize("patched", [True, False])
def test_kernels_compile_when_numpy_has_no_row_stack(patched):
    """NumPy 2.5 removed np.row_stack, which numba-cuda 0.30 still names: the first compile failed on the
    first real GPU. Importing the backend patches it; without the patch the same compile fails."""
    import numpy as np

    if not hasattr(np, "row_stack"):  # noqa: NPY201
        pytest.skip("this NumPy has no row_stack to take away")
    setup = "import lenet_gpu.backends.numba_backend" if patched else ""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", _ROW_STACK_PROBE.format(setup=setup)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if patched:
        assert p.returncode == 0 and "compiled" in p.stdout, p.stderr[-2000:]
    else:
        assert p.returncode != 0 and "row_stack" in p.stderr, (p.stdout, p.stderr[-2000:])
