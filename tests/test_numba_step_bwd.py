"""step_bwd on the numba backend (lenet_gpu/backends/numba_backend/step4_bwd.py, the Numba port of
kernels/step_bwd.cu; docs/step4.md): the four-kernel step's conv backward in one launch.

- In this process (the real compiler, no GPU): compile_ptx of step_bwd_v1 and step_bwd_v2 for sm_80 / sm_90 with the
  launch's signature and launch bounds, then ptxas -v: no spills, no stack frame or .local, no float64, no integer
  division at all (64-bit, signed or by a run-time value), the 32,048 B of static shared memory, and registers that
  keep 2 blocks of 256 threads an SM for v1 (step_bwd.cu's 128 at 2 blocks/SM) and 3 for v2 (at most 80, its
  launch bounds (256, 3), as step_bwd.cu's).
- In Numba's CUDA simulator (``test_step_bwd_simulator_suites`` re-runs the ``sim_*`` tests of this file in a
  subprocess with NUMBA_ENABLE_CUDASIM=1, and the ``u32_*`` tests in another with true uint32 scalars and
  overflow warnings as errors): parity against reference.step_bwd (float64), v1 and v2, for two activations at
  batch 1 and 5 with S = 1, 2, B, and S > B (empty groups: zero rows), padding columns exactly 0; v2's partials bit
  for bit equal to v1's (several images in a group, several groups, an empty group); the rows summed against the
  numba routed ops on the whole batch (the nine-op routed step's C3 weight gradient, gz1, C1 weight gradient); a
  grid capped at one block (the block-stride walk over the groups); a recorded replay bit for bit equal to the
  eager launch, one launch and no allocation a call, with the argument types of the declared signature; shape
  errors; step_groups.
- ``pytest -m gpu tests/test_numba_step_bwd.py`` runs the parity checks at LeNet batch sizes on a device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.spec import conv_prefix, param_layout
from tests import fused_helpers as F
from tests import sim_child
from tests.parity import TOL, assert_close, assert_equal, nan_like

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
SIM_U32 = SIM and os.environ.get("LENET_GPU_SIM_UINT32") == "1"
ROOT = Path(__file__).resolve().parent.parent
F64 = np.float64
ARCHS = ("sm_80", "sm_90")

sim = pytest.mark.skipif(not SIM or SIM_U32, reason="runs inside test_step_bwd_simulator_suites' simulator run")
sim_u32 = pytest.mark.skipif(not SIM_U32, reason="runs inside test_step_bwd_simulator_suites' uint32 simulator run")
parent = pytest.mark.skipif(SIM, reason="runs in the parent pytest process (the real compiler)")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


#: the sim_* tests (Python-int indices in the simulator: common.py's default there) and the u32_* tests (true uint32
#: scalars: a wraparound would warn, and the warning fails)
SUITES = (sim_child.Child(__file__, "sim_", timeout=600),
          sim_child.Child(__file__, "u32_", (("LENET_GPU_SIM_UINT32", "1"),), ("-W", "error::RuntimeWarning"), 600))


@pytest.mark.sim
@parent
@sim_child.early(*SUITES)
def test_step_bwd_simulator_suites():
    """The sim_* and u32_* tests in two simulator subprocesses (SUITES)."""
    for suite in SUITES:
        print(suite.name, sim_child.result(suite))


# ------------------------------------------------------------------------------------------------ inputs
NAMES = ("x", "p1", "gz3", "m3", "m1", "w3")
_SPECS = {s.name: s for s in param_layout()[0]}


step_inputs = F.step_bwd_inputs  # x, p1, gz3, routes m3 / m1, w3 (shared with the other backend's tests)


def reference(inp: dict, groups: int, act: str) -> np.ndarray:
    return ref.step_bwd(*(inp[k].astype(F64) if inp[k].dtype == np.float32 else inp[k] for k in NAMES), act, groups)


def run_step_bwd(be, inp: dict, groups: int, act: str, variant: str | None = None) -> np.ndarray:
    dev = [be.to_device(inp[k]) for k in NAMES]
    gpart = be.to_device(nan_like((groups, conv_prefix())))  # unwritten columns stay NaN and fail
    be.step_bwd(*dev, gpart, act, variant=variant)
    return be.to_host(gpart)


def check_rows(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Each gradient within its routed op's tolerance (TOL["step_bwd"] is the same bound), every padding column
    exactly 0, and every row of an empty group exactly 0."""
    assert got.shape == want.shape, (got.shape, want.shape)
    pad = np.ones(conv_prefix(), bool)
    for name in ("c1.w", "c1.b", "c3.w", "c3.b"):
        sp = _SPECS[name]
        sl = slice(sp.offset, sp.offset + sp.size)
        pad[sl] = False
        assert sp.offset == ref.STEP_BWD_OFFSETS[name]
        assert_close(got[:, sl], want[:, sl], *TOL["step_bwd"], what=f"{what} {name}")
    assert pad.sum() == conv_prefix() - (150 + 6 + 2400 + 16)
    assert_equal(got[:, pad], np.zeros_like(got[:, pad]), f"{what} padding columns")


def check_parity(be, b: int, groups: int, act: str, seed: int, variant: str | None = None) -> np.ndarray:
    inp = step_inputs(b, act, seed)
    got = run_step_bwd(be, inp, groups, act, variant)
    check_rows(got, reference(inp, groups, act), f"numba step_bwd {variant or 'default'} {act} B={b} S={groups}")
    for s, g in enumerate(ref.step_groups(b, groups)):
        if g.start == g.stop:
            assert_equal(got[s], np.zeros(conv_prefix(), np.float32), f"empty group {s} row")
    return got


def check_rows_sum_to_routed_ops(be, b: int, groups: int, act: str, seed: int, variant: str | None = None) -> None:
    """step_reduce(gpart) against the numba routed ops on the whole batch, as the nine-op routed step calls them
    (model._routed_backward): conv2d_bwd_weight_routed (C3), conv2d_bwd_data_routed (gz1),
    conv2d_bwd_weight_routed (C1)."""
    inp = step_inputs(b, act, seed)
    total = ref.step_reduce(run_step_bwd(be, inp, groups, act))
    d = {k: be.to_device(inp[k]) for k in NAMES}
    dw3, db3 = be.to_device(nan_like((16, 6, 5, 5))), be.to_device(nan_like((16,)))
    be.conv2d_bwd_weight_routed(d["p1"], d["gz3"], d["m3"], dw3, db3, variant=variant)
    gz1 = be.to_device(nan_like((b, 6, 14, 14)))
    be.conv2d_bwd_data_routed(d["gz3"], d["w3"], d["m3"], d["p1"], gz1, act)
    dw1, db1 = be.to_device(nan_like((6, 1, 5, 5))), be.to_device(nan_like((6,)))
    be.conv2d_bwd_weight_routed(d["x"], gz1, d["m1"], dw1, db1, variant=variant)
    for name, arr in (("c1.w", dw1), ("c1.b", db1), ("c3.w", dw3), ("c3.b", db3)):
        sp = _SPECS[name]
        assert_close(total[sp.offset : sp.offset + sp.size], be.to_host(arr).ravel(),
                     *TOL["conv2d_bwd_weight_routed"], what=f"step_reduce(step_bwd) vs numba routed ops {name}")


def _backend(max_blocks=None):
    from lenet_gpu.backends.numba_backend import NumbaBackend

    return NumbaBackend(max_blocks=max_blocks)


# ------------------------------------------------------------------------------------------- simulator


@sim
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("act,cases", [
    ("relu", ((1, 1), (5, 1), (5, 2), (5, 5))),  # batch 1; batch 5 in 1, 2 (3 + 2 images) and B groups
    ("lecun_tanh", ((1, 1), (5, 2), (2, 3))),  # S > B: chunk 1, group 2 empty (a zero row)
])
def test_sim_step_bwd_matches_reference(act, cases, variant):
    be = _backend()
    for b, groups in cases:
        check_parity(be, b, groups, act, seed=b + 3 * groups, variant=variant)


@sim
@pytest.mark.parametrize("b,groups,act", [
    (4, 1, "tanh"),  # 4 images in one group: each weight's per-image sums added in turn
    (5, 3, "relu"),  # 3 groups of 2, 2, 1 images
    (2, 3, "sigmoid"),  # S > B: an empty group (a zero row in both)
])
def test_sim_step_bwd_v2_same_bits_as_v1(b, groups, act):
    """v2 changes only which thread owns which dw3 weight (one filter's 10 weights a thread, a window's gz3 and route
    loaded once for them); each weight's sum is v1's, windows in order from 0 for each image, then added to the
    group's total: the partials are v1's bit for bit (every column, padding and the other gradients included)."""
    be = _backend()
    inp = step_inputs(b, act, seed=19 + b)
    v1 = run_step_bwd(be, inp, groups, act, "v1")
    v2 = run_step_bwd(be, inp, groups, act, "v2")
    check_rows(v2, reference(inp, groups, act), f"numba step_bwd v2 {act} B={b} S={groups}")
    assert_equal(v2.view(np.uint32), v1.view(np.uint32), f"step_bwd v2 vs v1 bits, B={b} S={groups}")


@sim
def test_sim_step_bwd_one_block_walks_every_group():
    """A grid capped at one block (max_blocks; the simulator's quick_simulation caps at 2): the block takes the
    groups in turn, the empty one included."""
    check_parity(_backend(max_blocks=1), 2, 3, "sigmoid", seed=7)


@sim
def test_sim_rows_sum_to_the_routed_ops():
    check_rows_sum_to_routed_ops(_backend(max_blocks=2), 3, 2, "tanh", seed=11, variant="v1")


@sim
def test_sim_record_replays_bit_for_bit_one_launch_no_allocation():
    """The eager launch and a recorded replay (NumbaBackend.record: the kernel found by name in FUSED_KERNELS)
    write the same bits; each call is one launch, no copy and no allocation; the launch's argument types are the
    declared signature's (what the compile checks compile)."""
    from numba.core import sigutils

    from lenet_gpu.backends.numba_backend import step4_bwd

    be = _backend()
    inp = step_inputs(3, "tanh", seed=5)
    dev = [be.to_device(inp[k]) for k in NAMES]
    gpart = be.to_device(nan_like((2, conv_prefix())))
    be.launch_log = []
    rec = be.record(lambda: be.step_bwd(*dev, gpart, "tanh"))
    outs = []
    for _ in range(2):
        gpart.copy_to_device(nan_like((2, conv_prefix())))
        before = be.counters.snapshot()
        rec()
        after = be.counters.snapshot()
        delta = {k: after[k] - before[k] for k in after}
        assert delta == {"launches": 1, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}, delta
        outs.append(be.to_host(gpart))
    assert_equal(outs[0], outs[1], "step_bwd: recorded replay vs eager launch")
    check_rows(outs[0], reference(inp, 2, "tanh"), "numba step_bwd record")
    assert [n for n, _ in be.launch_log] == ["step_bwd_v2"], be.launch_log  # the default variant
    want, _ = sigutils.normalize_signature(step4_bwd.SIGNATURES["step_bwd_v2"])
    assert tuple(be.launch_log[0][1]) == tuple(want), be.launch_log[0][1]


@sim
def test_sim_backend_lists_step_bwd_and_its_groups():
    from lenet_gpu.backends.numba_backend import backend as B

    be = _backend()
    assert be.variants["step_bwd"] == ("v1", "v2") and be.default_variants["step_bwd"] == "v2"
    assert B.FUSED_KERNELS["step_bwd_v1"] is B._step4_bwd.step_bwd_v1
    assert B.FUSED_KERNELS["step_bwd_v2"] is B._step4_bwd.step_bwd_v2
    assert B.sm_count() == B.DEFAULT_SM_COUNT == 132  # the simulator asks no device
    for batch, want in ((1, 1), (5, 5), (64, 64), (264, 264), (265, 133), (4096, 256), (60000, 264)):
        got = be.step_groups(batch)
        assert got == want, (batch, got)
        assert all(g.stop > g.start for g in ref.step_groups(batch, got)), batch  # no empty group
        assert -(-batch // got) == -(-batch // (2 * 132))
    with pytest.raises(ValueError):
        be.step_groups(0)


@sim
def test_sim_step_bwd_refuses_bad_arguments():
    be = _backend(max_blocks=1)
    inp = step_inputs(2, "relu", seed=5)
    dev = {k: be.to_device(inp[k]) for k in NAMES}
    args = [dev[k] for k in NAMES]
    gp = be.to_device(nan_like((2, conv_prefix())))
    with pytest.raises(ValueError, match="gpart"):
        be.step_bwd(*args, be.to_device(nan_like((2, conv_prefix() - 1))), "relu")
    with pytest.raises(ValueError, match="gpart"):
        be.step_bwd(*args, be.to_device(nan_like((0, conv_prefix()))), "relu")
    with pytest.raises(ValueError, match="x"):
        be.step_bwd(be.to_device(nan_like((2, 1, 28, 28))), *args[1:], gp, "relu")
    with pytest.raises(ValueError, match="p1"):
        be.step_bwd(dev["x"], be.to_device(nan_like((2, 6, 14, 13))), *args[2:], gp, "relu")
    with pytest.raises(ValueError, match="gz3"):
        be.step_bwd(*args[:2], be.to_device(nan_like((3, 16, 5, 5))), *args[3:], gp, "relu")
    with pytest.raises(TypeError, match="m3"):
        be.step_bwd(*args[:3], be.to_device(inp["m3"].astype(np.float32)), *args[4:], gp, "relu")
    with pytest.raises(ValueError, match="w3"):
        be.step_bwd(*args[:5], be.to_device(nan_like((16, 6, 3, 3))), gp, "relu")
    with pytest.raises(TypeError, match="host"):
        be.step_bwd(inp["x"], *args[1:], gp, "relu")
    with pytest.raises(ValueError, match="activation"):
        be.step_bwd(*args, gp, "softplus")
    with pytest.raises(ValueError, match="variant"):
        be.step_bwd(*args, gp, "relu", variant="v9")
    assert np.isnan(be.to_host(gp)).all()  # nothing was launched


@sim_u32
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_u32_step_bwd_one_block_two_groups(variant):
    """True uint32 scalars in the simulated kernel (common.U): any index that wrapped around would warn (an error
    here). Batch 1 in 2 groups on one block: the image's group and an empty one."""
    check_parity(_backend(max_blocks=1), 1, 2, "lecun_tanh", seed=2, variant=variant)


# --------------------------------------------------------------------------------------- compile checks


#: kernel -> (most registers, blocks of 256 threads an SM on sm_90 at those registers): v1 at launch bounds (256,)
#: (step_bwd.cu: 128 at 2 blocks/SM), v2 at (256, 3) (step_bwd.cu: 80 at 3 blocks/SM)
REGISTER_BOUNDS = {"step_bwd_v1": (128, 2), "step_bwd_v2": (80, 3)}


@parent
@pytest.mark.parametrize("name", sorted(REGISTER_BOUNDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_compile_ptx_no_spills_no_local_no_f64_no_division(arch, name):
    """step_bwd_v1 / _v2 as launched (their signature and launch bounds: (256,) / (256, 3)): every array in registers
    or shared memory (ptxas: no spill, no stack frame; no .local in the PTX), no float64, no integer division or
    remainder of any width or sign (LeNet's geometry is compiled in: every division is by a constant), 32,048 B of
    static shared memory, and at most 128 registers for v1, so 2 blocks of 256 threads fit an SM (step_bwd.cu: 128
    at 2 blocks/SM), at most 80 for v2, so 3 fit (step_bwd.cu's v2: 80 at 3 blocks/SM)."""
    from tests.conftest import numba_compile_report

    cr = numba_compile_report()
    from lenet_gpu.backends.numba_backend import step4_bwd as m

    ptx, log = cr.compile_kernel(name, arch)  # the backend's build (its signature, launch bounds), one lowering
    assert f".target {arch}" in ptx and ".entry" in ptx
    bad = cr.f64_lines(ptx)
    assert not bad, f"{name} ({arch}) has float64 in its PTX:\n" + "\n".join(bad[:10])
    assert ".local" not in ptx, f"{name} ({arch}) uses local memory"
    stats = cr.int_arith_stats(ptx)
    divs = {k: n for k, n in stats.items() if k.startswith(("div.", "rem.")) and n}
    assert not divs, f"{name} ({arch}) divides integers: {stats}"
    assert "fma.rn.f32" in ptx  # cuda.fma: fmaf's single rounding
    res = cr.parse_ptxas(log)
    print(f"{name} {arch}: {res}")
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, res
    assert res["shared_bytes"] == 32048, res
    regs, blocks = REGISTER_BOUNDS[name]
    assert cr.all_launch_bounds()[name] == m.LAUNCH_BOUNDS[name] == ((m.THREADS,) if blocks == 2 else (m.THREADS, 3))
    assert 0 < res["registers"] <= regs, res
    if arch == "sm_90":
        occ = cr._occupancy(res["registers"], res["shared_bytes"], m.THREADS, arch)
        assert occ >= blocks * m.THREADS / 2048, f"{name}: occupancy {occ} (< {blocks} blocks of 256 threads an SM)"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("act", ["relu", "tanh", "lecun_tanh", "sigmoid"])
def test_gpu_step_bwd_matches_reference(act, variant):
    """Batch 1, 5 (S = 1, 2, 5, 7), 64 in one group (the longest chains) and 257 in step_groups' plan."""
    be = _backend()
    for b, groups in ((1, 1), (5, 1), (5, 2), (5, 5), (5, 7), (64, 1), (257, be.step_groups(257))):
        check_parity(be, b, groups, act, seed=b + groups, variant=variant)


@pytest.mark.gpu
def test_gpu_step_bwd_v2_same_bits_as_v1():
    """On the device (fma.rn.f32: one rounding) v2's partials are v1's bit for bit: 64 images in one group, 257 and
    4096 in step_groups' plan, 5 in 7 groups (empty ones)."""
    be = _backend()
    for b, groups, act in ((64, 1, "lecun_tanh"), (257, be.step_groups(257), "relu"),
                           (4096, be.step_groups(4096), "sigmoid"), (5, 7, "tanh")):
        inp = step_inputs(b, act, seed=b)
        v1, v2 = (run_step_bwd(be, inp, groups, act, v) for v in ("v1", "v2"))
        assert_equal(v2.view(np.uint32), v1.view(np.uint32), f"step_bwd v2 vs v1 bits on the GPU, B={b} S={groups}")


@pytest.mark.gpu
def test_gpu_rows_sum_to_the_routed_ops_and_repeat():
    be = _backend()
    check_rows_sum_to_routed_ops(be, 64, be.step_groups(64), "lecun_tanh", seed=13)
    inp = step_inputs(300, "sigmoid", seed=3)
    groups = be.step_groups(300)
    a, b = (run_step_bwd(be, inp, groups, "sigmoid") for _ in range(2))
    assert_equal(a, b, "numba step_bwd repeat on the GPU")
    check_rows(a, reference(inp, groups, "sigmoid"), "numba step_bwd B=300")


@pytest.mark.gpu
def test_gpu_record_and_graph_replay_bit_for_bit():
    """The prepared launch (record) and a CUDA graph of it (graph) write the eager launch's bits."""
    be = _backend()
    inp = step_inputs(64, "relu", seed=17)
    dev = [be.to_device(inp[k]) for k in NAMES]
    groups = be.step_groups(64)
    gpart = be.to_device(nan_like((groups, conv_prefix())))

    def fn():
        be.step_bwd(*dev, gpart, "relu")

    fn()
    eager = be.to_host(gpart)
    rec = be.record(fn)
    rec()
    rec()
    assert_equal(be.to_host(gpart), eager, "record replay")
    g = be.graph(rec)
    if g is not None:  # the CUDA driver bindings are present
        gpart.copy_to_device(nan_like((groups, conv_prefix())))
        g()
        assert_equal(be.to_host(gpart), eager, "graph replay")


@pytest.mark.gpu
def test_gpu_times_against_the_cuda_c_kernel(capsys):
    """Device µs of one step_bwd launch (lenet_gpu.perf.timing: CUDA events, L2 flushed; median, cold and hot) on
    the numba backend (its default, v2, and v1) and on the cupy backend (kernels/step_bwd.cu, its default) at batch
    64, 256 and 4096 in step_groups' plan, printed for the report, and how far apart their partials are (both are
    checked against the reference above; the same sums in the same order with the same fma may agree bit for bit,
    which this prints, not asserts)."""
    from lenet_gpu.perf.timing import TimingConfig, make_timer, measure_us

    nb = _backend()
    try:
        from lenet_gpu.backends.cupy_backend import CupyBackend

        cu = CupyBackend()
    except Exception as e:  # noqa: BLE001 - no cupy on this machine: the numba figures alone
        cu = None
        print(f"cupy backend unavailable ({type(e).__name__}: {e}): numba figures only")
    cfg = TimingConfig(target_s=0.2)
    for batch in (64, 256, 4096):
        inp = step_inputs(batch, "relu", seed=batch)
        groups = nb.step_groups(batch)
        row = {}
        outs = {}
        for label, be, variant in (("numba", nb, None), ("numba_v1", nb, "v1"), ("cupy", cu, None)):
            if be is None:
                continue
            assert be.step_groups(batch) == groups
            dev = [be.to_device(inp[k]) for k in NAMES]
            gpart = be.to_device(nan_like((groups, conv_prefix())))
            kw = {} if variant is None else {"variant": variant}

            def fn(be=be, dev=dev, gpart=gpart, kw=kw):
                be.step_bwd(*dev, gpart, "relu", **kw)

            fn()
            outs[label] = be.to_host(gpart)
            t = measure_us(make_timer(be), fn, cfg)
            row[label] = {k: round(t[k], 1) for k in ("median_us", "p20_us", "p80_us", "hot_median_us")}
        if "cupy" in outs:
            d = np.abs(outs["numba"].astype(F64) - outs["cupy"])
            row["max_abs_diff"] = float(d.max())
            row["bit_identical"] = bool(np.array_equal(outs["numba"].view(np.uint32), outs["cupy"].view(np.uint32)))
        with capsys.disabled():
            print(f"\nstep_bwd batch {batch} ({groups} groups): {row}")
        assert row["numba"]["median_us"] > 0
