"""The numba backend's four-kernel step ops step_fwd, step_adam and step_sgd (step4_fwd.py, docs/step4.md).

- step_fwd_v1 against ``reference.step_fwd`` (batch 1 and odd batches, augmentation, an OFFSET whose batch wraps
  around the permutation, relu's tied windows, the schedule row inside the table and clamped at both ends) and bit
  for bit against this backend's batch_prepare + 2 × conv2d_pool_fwd (yconv=None); outputs start as NaN / 0xFF, the
  state is left alone; a grid capped below the batch (the images block-stride).
- step_fwd_v2 (two images a block) against the reference at an odd batch (a last pair of one image), on a grid of
  one block (the pairs block-stride) and of ⌈B/2⌉, and bit for bit against step_fwd_v1 (x, y, srow, p1, m1, p3, m3);
  the default plan (CupyBackend.step_fwd_kernel's: v2's kernel where ⌈B/2⌉ ≥ 4 · SMs, v1's below, a variant by
  name its own) as plain Python against the cupy backend's, and once in the simulator on a backend of one SM.
- step_adam / step_sgd bit for bit against reference.step_reduce + adam_step / sgd_step (a one-row schedule whose
  row is srow) + step_advance on this backend: p, m, v, g and the state; weight decay on and off, 1 and 5 groups,
  an advance that starts an epoch and one that does not, a buffer with a tail past the last full 4-element item,
  one block striding over the buffer.
- one launch an op with the declared argument types, no allocation on a second call; shape and dtype errors; the
  self-test's parity builders (lenet_gpu/selftest/checks.py) for step_adam / step_sgd (step_fwd's run in the
  act × pool matrix of test_numba_backend.py's simulator child).
- compile_ptx + ptxas (sm_80, sm_90, as the kernels are built: step_fwd_v1 / _v2 with their launch bounds): no
  spills, no local memory, no float64, no 64-bit or signed integer division, step_fwd_v1 / _v2 no integer division
  at all, ≤ 64 registers, step_fwd.cu's static shared memory; the launch plans are the CUDA C ones (cupy backend).

``test_step4_fwd_simulator_suite`` runs the ``sim_*`` tests in NUMBA_ENABLE_CUDASIM=1 children: the ``sim_uint32_*``
ones with true uint32 scalars (LENET_GPU_SIM_UINT32=1, ~4x slower), the others with Python ints; an overflow warning
fails either. ``pytest -m gpu`` runs the ``gpu_*`` tests on a device.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.spec import conv_prefix, param_layout
from lenet_gpu.stepstate import HostState, advance
from tests import fused_helpers as F
from tests import sim_child
from tests.parity import TOL, assert_close, assert_equal, nan_like

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ROOT = Path(__file__).resolve().parent.parent
sim = pytest.mark.skipif(not SIM, reason="runs inside test_step4_fwd_simulator_suite's NUMBA_ENABLE_CUDASIM=1 child")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

MEAN, STD = 0.1307, 0.3081
HYPER_ADAM = (0.9, 0.999, 1e-8)


#: sim_uint32_* with true uint32 scalars (LENET_GPU_SIM_UINT32=1: a wraparound would index out of range, an overflow
#: warning fails; ~4x slower), the others with Python ints (common.U's simulator default)
SUITES = {u: sim_child.Child(__file__, "sim_uint32_" if u else "sim_ and not sim_uint32_",
                             (("LENET_GPU_SIM_UINT32", str(int(u))),), ("-W", "error::RuntimeWarning"), 600)
          for u in (False, True)}


@pytest.mark.sim
@pytest.mark.parametrize("uint32", [False, True], ids=["int", "uint32"])
@sim_child.early(*SUITES.values())
def test_step4_fwd_simulator_suite(uint32):
    """Run the sim_* tests of this file in a subprocess with the CUDA simulator on (SUITES)."""
    if SIM:
        pytest.skip("this is the simulator run")
    print(sim_child.result(SUITES[uint32]))


# ------------------------------------------------------------------------------------------- helpers
def _launched(be, fn, *args, **kwargs) -> list[str]:
    """Run one op: exactly one launch, with the argument types of its kernel's declared signature."""
    from numba.core import sigutils

    from lenet_gpu.backends.numba_backend.step4_fwd import SIGNATURES

    be.launch_log = []
    before = be.counters.launches
    try:
        fn(*args, **kwargs)
        log = be.launch_log
    finally:
        be.launch_log = None
    assert be.counters.launches == before + 1 and len(log) == 1, log
    name, types = log[0]
    want, _ = sigutils.normalize_signature(SIGNATURES[name])
    assert tuple(types) == tuple(want), f"{name}: launched with {types}, declared {want}"
    return [name]


def _fwd_inputs(data_seed: int, batch: int, **state):
    rng = np.random.default_rng(data_seed)
    n, m = 13, 11
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, :3] = 0  # a blank border, as digits have: shifted-in zeros and real zeros both occur
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    perm = rng.permutation(n)[:m].astype(np.int32)
    words = dict(step=7, sched_base=3, step_in_epoch=2, offset=m - 2, epoch=5, seed=987654321, shift=2)
    words.update(state)
    sched = rng.random((6, 4), dtype=np.float32)
    params = {"c1.w": (rng.standard_normal((6, 1, 5, 5)) * 0.3).astype(np.float32),
              "c1.b": (rng.standard_normal(6) * 0.1).astype(np.float32),
              "c3.w": (rng.standard_normal((16, 6, 5, 5)) * 0.12).astype(np.float32),
              "c3.b": (rng.standard_normal(16) * 0.1).astype(np.float32)}
    return images, labels, perm, HostState(**words).to_array(), sched, params


FWD_OUT = {"srow": ((4,), np.float32), "x": ((1, 32, 32), np.float32), "y": ((), np.int32),
           "p1": ((6, 14, 14), np.float32), "m1": ((6, 14, 14), np.uint8), "p3": ((16, 5, 5), np.float32),
           "m3": ((16, 5, 5), np.uint8)}


def _fwd_outputs(be, batch: int) -> dict:
    return {k: be.to_device(nan_like(s if k == "srow" else (batch, *s), dt)) for k, (s, dt) in FWD_OUT.items()}


def _run_fwd(be, dev: dict, out: dict, act: str, variant: str | None = None, op=None) -> None:
    """be.step_fwd (or ``op``, e.g. step4_fwd.step_fwd on ``be``) with these arrays."""
    args = (dev["images"], dev["labels"], dev["perm"], dev["state"], dev["sched"], out["srow"], out["x"], out["y"],
            dev["c1.w"], dev["c1.b"], out["p1"], out["m1"], dev["c3.w"], dev["c3.b"], out["p3"], out["m3"], MEAN,
            STD, act)
    if op is None:
        be.step_fwd(*args, variant=variant)
    else:
        op(be, *args, variant=variant)


def _fwd_run(be, batch: int, act: str, data_seed: int, variant: str | None, op=None, **state) -> tuple[str, dict]:
    """(the kernel launched, the outputs on the host) of one step_fwd on _fwd_inputs(data_seed, batch, **state)."""
    images, labels, perm, st, sched, params = _fwd_inputs(data_seed, batch, **state)
    dev = {k: be.to_device(v) for k, v in dict(images=images, labels=labels, perm=perm, state=st, sched=sched,
                                                **params).items()}
    out = _fwd_outputs(be, batch)
    (name,) = _launched(be, _run_fwd, be, dev, out, act, variant, op)
    return name, {k: be.to_host(v) for k, v in out.items()}


def _assert_same_outputs(got: dict, want: dict, what: str) -> None:
    """Every output of step_fwd bit for bit (x, y, srow, p1, m1, p3, m3)."""
    assert set(got) == set(want) == set(FWD_OUT)
    for k in FWD_OUT:
        assert_equal(got[k], want[k], f"{what}: {k}")


def _routes_where_clear(route, conv, want, margin: float, what: str) -> None:
    """route == want wherever the reference's winning value leads the runner-up of its 2x2 window by > margin."""
    n, k, h, w = conv.shape
    win = conv.reshape(n, k, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, k, h // 2, w // 2, 4)
    win = np.sort(win, axis=-1)
    clear = (win[..., 3] - win[..., 2]) > margin
    assert clear.mean() > 0.5, f"{what}: too few clear windows to test"
    assert_equal(np.asarray(route)[clear], np.asarray(want)[clear], what)


def check_step_fwd(be, batch: int, act: str, data_seed: int, row: int, composition: str | None = "v1",
                   variant: str = "v1", **state) -> dict:
    """step_fwd ``variant`` (by name: that kernel) against reference.step_fwd (srow = sched[row]: the clamped row)
    and, with ``composition``, bit for bit against batch_prepare + 2 × conv2d_pool_fwd(yconv=None) of that variant
    on the same backend. Returns the outputs (host)."""
    images, labels, perm, st, sched, params = _fwd_inputs(data_seed, batch, **state)
    dev = {k: be.to_device(v) for k, v in dict(images=images, labels=labels, perm=perm, state=st, sched=sched,
                                                **params).items()}
    out = _fwd_outputs(be, batch)
    assert _launched(be, _run_fwd, be, dev, out, act, variant) == [f"step_fwd_{variant}"]
    got = {k: be.to_host(v) for k, v in out.items()}
    r = ref.step_fwd(images, labels, perm, st, sched, batch, params, MEAN, STD, act)
    what = f"step_fwd_{variant} batch={batch} {act}"
    assert_equal(got["srow"], sched[row], what + " srow")
    assert_equal(got["srow"], r["srow"], what + " srow (reference)")
    assert_equal(be.to_host(dev["state"]), st, what + ": the state is read only")
    assert_close(got["x"], r["x"], *TOL["batch_prepare"], what=what + " x")
    assert_equal(got["y"], r["y"], what + " y")
    assert_close(got["p1"], r["p1"], *TOL["conv2d_pool_fwd"], what=what + " p1")
    assert_close(got["p3"], r["p3"], *TOL["lenet_fwd"], what=what + " p3")  # two convolutions from uint8 pixels
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    _routes_where_clear(got["m1"], ref.conv2d_fwd(r["x"], p["c1.w"], p["c1.b"], act), r["m1"], 1e-4, what + " m1")
    _routes_where_clear(got["m3"], ref.conv2d_fwd(r["p1"], p["c3.w"], p["c3.b"], act), r["m3"], 1e-4, what + " m3")
    assert got["m1"].max() <= 3 and got["m3"].max() <= 3
    if composition is None:
        return got
    comp = _fwd_outputs(be, batch)
    be.batch_prepare(dev["images"], dev["labels"], dev["perm"], dev["state"], comp["x"], comp["y"], MEAN, STD)
    be.conv2d_pool_fwd(comp["x"], dev["c1.w"], dev["c1.b"], None, comp["p1"], comp["m1"], act, "max",
                       variant=composition)
    be.conv2d_pool_fwd(comp["p1"], dev["c3.w"], dev["c3.b"], None, comp["p3"], comp["m3"], act, "max",
                       variant=composition)
    for k in ("x", "y", "p1", "m1", "p3", "m3"):
        assert_equal(got[k], be.to_host(comp[k]), f"{what} {k}: step_fwd vs the composition ({composition})")
    return got


def check_v2_equals_v1(be, batch: int, act: str, data_seed: int, row: int, **state) -> None:
    """step_fwd_v2 against the reference (check_step_fwd), then bit for bit against step_fwd_v1 on the same inputs:
    every output (the same sums in the same order: each from its bias, channel, tap row, tap column)."""
    got = check_step_fwd(be, batch, act, data_seed, row, composition=None, variant="v2", **state)
    name, want = _fwd_run(be, batch, act, data_seed, "v1", **state)
    assert name == "step_fwd_v1"
    _assert_same_outputs(got, want, f"step_fwd_v2 vs step_fwd_v1, batch={batch} {act}")


_update_inputs = F.step_update_inputs  # p, g, gpart, m, v, the schedule row, the state (both backends)


def check_step_update(be, opt: str, n: int, nc: int, groups: int, wd: float, wrap: bool, seed: int) -> None:
    """step_adam / step_sgd bit for bit against step_reduce + adam_step / sgd_step + step_advance (same backend)."""
    batch = 8
    p, g, gpart, m, v, srow, state = _update_inputs(n, nc, groups, seed, wrap)
    d = {k: be.to_device(a) for k, a in dict(p=p, g=g, gpart=gpart, m=m, v=v, srow=srow, state=state).items()}
    if opt == "adam":
        _launched(be, be.step_adam, d["p"], d["g"], d["gpart"], d["m"], d["v"], d["srow"], d["state"], batch,
                  *HYPER_ADAM, wd)
    else:
        _launched(be, be.step_sgd, d["p"], d["g"], d["gpart"], d["m"], d["srow"], d["state"], batch, 0.9, wd)
    g_red = g.copy()
    g_red[:nc] = ref.step_reduce(gpart)
    c = {k: be.to_device(a) for k, a in dict(p=p, g=g_red, m=m, v=v, sched=srow[None, :], state=state).items()}
    if opt == "adam":
        be.adam_step(c["p"], c["g"], c["m"], c["v"], c["sched"], c["state"], *HYPER_ADAM, wd)
    else:
        be.sgd_step(c["p"], c["g"], c["m"], c["sched"], c["state"], 0.9, wd)
    be.step_advance(c["state"], batch)
    what = f"step_{opt} n={n} nc={nc} S={groups} wd={wd} wrap={wrap}"
    assert_equal(be.to_host(d["g"]), g_red, what + " g")
    for k in ("p", "m", "v", "state") if opt == "adam" else ("p", "m", "state"):
        assert_equal(be.to_host(d[k]), be.to_host(c[k]), f"{what} {k}")
    if opt == "sgd":
        assert_equal(be.to_host(d["v"]), v, what + ": v untouched")
    new = HostState.from_array(be.to_host(d["state"]))
    assert new == advance(HostState.from_array(state), batch)
    assert (new.epoch, new.offset, new.step_in_epoch, new.step) == ((3, 0, 0, 12) if wrap else (2, 48, 5, 12))
    assert not np.array_equal(be.to_host(d["p"]), p), what + ": the step moved the parameters"


# ------------------------------------------------------------------------------------------- simulator
@functools.cache
def _backend(max_blocks: int | None = None):
    from lenet_gpu.backends.numba_backend import NumbaBackend

    return NumbaBackend(max_blocks=max_blocks)


@sim
def test_sim_step_fwd_wraps_shifts_and_block_strides():
    """Batch 3 on a grid capped at 2 blocks (one block takes two images); the OFFSET wraps the permutation, the
    shift is on, the schedule row lies inside the table (STEP 7 − SCHED_BASE 3 = row 4). Composition: the v2
    conv (the GPU default)."""
    check_step_fwd(_backend(2), 3, "tanh", data_seed=1, row=4, composition="v2")


@sim
def test_sim_step_fwd_relu_ties_row_clamped_below():
    """Batch 1, relu (zero windows: ties, the first tap wins), no shift, OFFSET 0; STEP before SCHED_BASE: row 0."""
    check_step_fwd(_backend(), 1, "relu", data_seed=2, row=0, step=2, sched_base=5, offset=0, shift=0)


@sim
def test_sim_step_fwd_row_clamped_above():
    """Batch 2, lecun_tanh, the hash's largest shift used here (3) at a seed ≥ 2³¹ (a negative int32 word); STEP
    past the table: row T − 1."""
    check_step_fwd(_backend(), 2, "lecun_tanh", data_seed=3, row=5, step=100, sched_base=0, offset=3, shift=3,
                   seed=2**31 + 12345)


@sim
@pytest.mark.parametrize(("act", "batch", "max_blocks"), [("tanh", 5, 1), ("relu", 3, None)],
                         ids=["tanh-b5-1block", "relu-b3-grid2"])
def test_sim_step_fwd_v2_odd_batch_equals_v1(act, batch, max_blocks):
    """step_fwd_v2 at odd batches: the last pair holds one image (its second idle). Batch 5 on one block striding
    over the 3 pairs (tanh), batch 3 on the ⌈3/2⌉ = 2 blocks of its plan (relu: tied zero windows); the batch wraps
    the permutation, the shift is on. Against the reference, then every output bit for bit against step_fwd_v1."""
    check_v2_equals_v1(_backend(max_blocks), batch, act, data_seed=21, row=4)


@sim
def test_sim_step_fwd_default_plan_on_one_sm():
    """The op's default plan on a backend of one SM (sm_count = 1; every default v1, at most 2 blocks: the
    simulator's quick backend): batch 7 (⌈7/2⌉ = 4 ≥ 4 · 1) launches step_fwd_v2 and gives step_fwd_v1's bits (v1
    by name at batch 7 launches v1); batch 6 (3 < 4) launches v1. step4_fwd.step_fwd, as the backend calls it with
    variant None."""
    from lenet_gpu.backends.numba_backend import NumbaBackend
    from lenet_gpu.backends.numba_backend import step4_fwd as S

    be = NumbaBackend(quick_simulation=True)
    be.sm_count = 1
    assert be.default_variants["step_fwd"] == "v1" and be.max_blocks == 2
    name, got = _fwd_run(be, 7, "sigmoid", 31, None, op=S.step_fwd)
    assert name == "step_fwd_v2"
    name, want = _fwd_run(be, 7, "sigmoid", 31, "v1", op=S.step_fwd)
    assert name == "step_fwd_v1"
    _assert_same_outputs(got, want, "the default (v2) vs v1, batch 7")
    assert _fwd_run(be, 6, "relu", 32, None, op=S.step_fwd)[0] == "step_fwd_v1"


#: backend.py's part of step_fwd's default plan: the backend's default step_fwd variant is step4_fwd.DEFAULT_VARIANTS'
#: "v1" (backend.FUSED_DEFAULTS), NumbaBackend.step_fwd passes variant None through to step4_fwd.step_fwd (which
#: applies step_fwd_kernel), and lenet_launches' step_fwd entry is step_fwd_kernel's kernel with step_fwd_grid's grid.


@sim
def test_sim_backend_default_plan_on_one_sm():
    """NumbaBackend.step_fwd with variant None (the model's call) on a backend of one SM: its default is v1, and
    batch 7 launches step_fwd_v2, batch 1 step_fwd_v1; v2 by name at batch 1 launches v2."""
    be = _backend(2)
    assert be.default_variants["step_fwd"] == "v1", be.default_variants["step_fwd"]
    sms, be.sm_count = be.sm_count, 1
    try:
        assert _fwd_run(be, 7, "tanh", 33, None)[0] == "step_fwd_v2"
        assert _fwd_run(be, 1, "tanh", 34, None)[0] == "step_fwd_v1"
        assert _fwd_run(be, 1, "tanh", 34, "v2")[0] == "step_fwd_v2"
    finally:
        be.sm_count = sms


@sim
@pytest.mark.parametrize(("opt", "groups", "wd", "wrap"), [("adam", 1, 0.0, True), ("adam", 5, 5e-4, False),
                                                          ("sgd", 1, 5e-4, True), ("sgd", 5, 0.0, False)])
def test_sim_step_update_equals_composition(opt, groups, wd, wrap):
    """LeNet-5's conv prefix and a buffer 130 floats longer (its grid: a block of 32 threads, 22 blocks)."""
    check_step_update(_backend(), opt, conv_prefix() + 130, conv_prefix(), groups, wd, wrap, seed=groups + 7 * wrap)


@sim
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_sim_step_update_one_block_and_a_tail(opt):
    """One block of 32 threads striding over 1,003 floats (7 tiles of 128 and a partial one), a prefix of 512."""
    check_step_update(_backend(1), opt, 1003, 512, 3, 1e-3, True, seed=11)


@sim
@pytest.mark.parametrize("op", ["step_adam", "step_sgd"])
def test_sim_selftest_builders(op):
    """The self-test's parity cases (lenet_gpu/selftest/checks.py, tiny profile) on the backend get_backend gives
    under the simulator (quick_simulation: at most 2 blocks)."""
    from lenet_gpu.backends import get_backend
    from lenet_gpu.selftest.checks import input_sets, run_case

    be = get_backend("numba")
    sets = input_sets([op], "tiny")
    assert sets
    for s in sets:
        run_case(be, op, "v1", s)


@sim
def test_sim_backend_lists_the_ops_one_launch_each_no_allocation():
    from lenet_gpu.backends.numba_backend import backend as B

    be = _backend()
    for op in ("step_fwd", "step_adam", "step_sgd"):
        assert be.variants[op] == (("v1", "v2") if op == "step_fwd" else ("v1",))
        assert all(f"{op}_{v}" in B.FUSED_KERNELS for v in be.variants[op])
    for op in ("step_adam", "step_sgd"):  # step_fwd's default: test_sim_backend_default_plan_on_one_sm
        assert be.default_variants[op] == "v1"
    batch = 1
    images, labels, perm, st, sched, params = _fwd_inputs(5, batch)
    dev = {k: be.to_device(v) for k, v in dict(images=images, labels=labels, perm=perm, state=st, sched=sched,
                                                **params).items()}
    out = _fwd_outputs(be, batch)
    n, nc = 260, 128
    p, g, gpart, m, v, srow, state = _update_inputs(n, nc, 2, seed=6, wrap=False)
    u = {k: be.to_device(a) for k, a in dict(p=p, g=g, gpart=gpart, m=m, v=v, srow=srow, state=state).items()}
    before = be.counters.snapshot()
    _run_fwd(be, dev, out, "relu")
    be.step_adam(u["p"], u["g"], u["gpart"], u["m"], u["v"], u["srow"], u["state"], batch, *HYPER_ADAM, 1e-4)
    be.step_sgd(u["p"], u["g"], u["gpart"], u["m"], u["srow"], u["state"], batch, 0.9, 1e-4)
    assert be.counters.since(before) == {"launches": 3, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}


@sim
def test_sim_uint32_step_fwd():
    """True uint32 scalars: batch 1, shift on, an OFFSET past the permutation's end (14 mod 11 = 3)."""
    check_step_fwd(_backend(1), 1, "tanh", data_seed=8, row=4, composition=None, offset=14)


@sim
def test_sim_uint32_step_fwd_v2():
    """True uint32 scalars: step_fwd_v2 at batch 3 on one block (both pairs, the last of one image), shift on."""
    check_step_fwd(_backend(1), 3, "lecun_tanh", data_seed=9, row=4, composition=None, variant="v2", offset=14)


@sim
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_sim_uint32_step_update(opt):
    """True uint32 scalars: one block over 203 floats (a partial tile), 3 groups."""
    check_step_update(_backend(1), opt, 203, 64, 3, 1e-3, False, seed=12)


@sim
def test_sim_step_ops_reject_bad_arguments():
    be = _backend()
    batch = 2
    images, labels, perm, st, sched, params = _fwd_inputs(4, batch)
    dev = {k: be.to_device(v) for k, v in dict(images=images, labels=labels, perm=perm, state=st, sched=sched,
                                                **params).items()}
    out = _fwd_outputs(be, batch)
    bad = dict(out, p3=be.to_device(nan_like((batch, 16, 4, 4))))
    with pytest.raises(ValueError, match="p3"):
        _run_fwd(be, dev, bad, "relu")
    with pytest.raises(TypeError, match="m1"):
        _run_fwd(be, dev, dict(out, m1=be.to_device(nan_like((batch, 6, 14, 14)))), "relu")
    with pytest.raises(TypeError, match="host"):
        _run_fwd(be, dict(dev, images=images), out, "relu")
    with pytest.raises(ValueError, match="sched"):
        _run_fwd(be, dict(dev, sched=be.to_device(sched[:, :3].copy())), out, "relu")
    with pytest.raises(ValueError, match="activation"):
        _run_fwd(be, dev, out, "swish")
    with pytest.raises(ValueError, match="unknown variant"):
        be.step_fwd(*(dev[k] for k in ("images", "labels", "perm", "state", "sched")), out["srow"], out["x"],
                    out["y"], dev["c1.w"], dev["c1.b"], out["p1"], out["m1"], dev["c3.w"], dev["c3.b"], out["p3"],
                    out["m3"], MEAN, STD, "relu", variant="v9")
    n, nc = 104, 40
    p, g, gpart, m, v, srow, state = _update_inputs(n, nc, 2, seed=9, wrap=False)
    d = {k: be.to_device(a) for k, a in dict(p=p, g=g, m=m, v=v, srow=srow, state=state).items()}
    with pytest.raises(ValueError, match="multiple of 4"):
        be.step_adam(d["p"], d["g"], be.to_device(np.zeros((2, nc - 2), np.float32)), d["m"], d["v"], d["srow"],
                     d["state"], 4, *HYPER_ADAM, 0.0)
    with pytest.raises(ValueError, match="at most"):
        be.step_sgd(d["p"], d["g"], be.to_device(np.zeros((1, n + 4), np.float32)), d["m"], d["srow"], d["state"],
                    4, 0.9, 0.0)
    with pytest.raises(ValueError, match="v"):
        be.step_adam(d["p"], d["g"], be.to_device(gpart), d["m"], be.to_device(v[:-1].copy()), d["srow"],
                     d["state"], 4, *HYPER_ADAM, 0.0)
    with pytest.raises(TypeError, match="state"):
        be.step_sgd(d["p"], d["g"], be.to_device(gpart), d["m"], d["srow"], be.to_device(state.astype(np.int64)), 4,
                    0.9, 0.0)
    with pytest.raises(ValueError, match="batch"):
        be.step_sgd(d["p"], d["g"], be.to_device(gpart), d["m"], d["srow"], d["state"], 0, 0.9, 0.0)


# ------------------------------------------------------------------------------------------- no device
def test_launch_plans_are_the_cuda_c_ones():
    """step_fwd: step_fwd.cu's block (SF_THREADS) and geometry; the update: adam_step v2's grid (CupyBackend's)."""
    pytest.importorskip("numba")
    from lenet_gpu.backends.cupy_backend.backend import CupyBackend, launch_plan
    from lenet_gpu.backends.cupy_backend.runtime import kernel_source
    from lenet_gpu.backends.numba_backend import step4_fwd as S

    src = kernel_source("step_fwd")
    for name in ("SF_THREADS", "SF_MIN_BLOCKS", "SF_K1", "SF_K3", "SF_KB3", "SF_P2", "SF_P4", "SF_X", "SF_IH",
                 "SF2_IMGS"):
        assert getattr(S, name) == int(re.search(rf"#define {name} (\d+)", src).group(1)), name
    assert "sf_c3<4>" in src and S.SF2_KB3 == 4  # v2's C3 register tile: 4 filters a thread
    assert S.SF_THREADS == CupyBackend.STEP_FWD_THREADS
    assert S.SF2_IMGS == CupyBackend.STEP_FWD_V2_IMGS and S.SF_MIN_BLOCKS == CupyBackend.STEP_FWD_BLOCKS_PER_SM
    assert S.LAUNCH_BOUNDS["step_fwd_v1"] == S.LAUNCH_BOUNDS["step_fwd_v2"] == (S.SF_THREADS, S.SF_MIN_BLOCKS)
    assert S.SIGNATURES["step_fwd_v2"] == S.SIGNATURES["step_fwd_v1"]  # nb is v2's B
    for n in (1, 3, 130, 1003, conv_prefix() + 130, param_layout()[1], 10**6):
        for sms in (132, 108, 1):
            lp = launch_plan("adam_step", "v2", {"n": n}, sm_count=sms)
            assert S.update_plan(n, sms) == (lp.grid[0], lp.block[0]), (n, sms)


def test_step_fwd_default_plan_is_cupys():
    """step4_fwd.step_fwd_kernel is CupyBackend.step_fwd_kernel: the default (v1) takes v2's kernel where ⌈B/2⌉ ≥ 4 ·
    SMs (batch ≥ 1,055 on 132 SMs), v1's below; a variant by name its own at every batch; the grid a block per image
    (v1) or per pair (v2)."""
    pytest.importorskip("numba")
    from lenet_gpu.backends.cupy_backend.backend import CupyBackend
    from lenet_gpu.backends.numba_backend import step4_fwd as S

    assert S.VARIANTS["step_fwd"] == ("v1", "v2") and S.DEFAULT_VARIANTS["step_fwd"] == "v1"
    for b, want in ((1, "v1"), (64, "v1"), (1054, "v1"), (1055, "v2"), (1056, "v2"), (4096, "v2")):
        assert S.step_fwd_kernel(None, b, 132) == want, b
    assert S.step_fwd_kernel(None, 7, 1) == "v2" and S.step_fwd_kernel(None, 6, 1) == "v1"
    assert S.step_fwd_kernel("v1", 4096, 132) == "v1" and S.step_fwd_kernel("v2", 1, 132) == "v2"
    assert S.step_fwd_kernel(None, 1, 132, default="v2") == "v2"  # a backend whose default is v2: v2 throughout
    assert S.step_fwd_kernel(None, 4096, 132, variants=("v1",)) == "v1"  # a backend that lists no v2
    for sms in (1, 2, 108, 132):
        cbe = CupyBackend(host=True, sm_count=sms)
        for b in (*range(1, 20), 4 * sms * 2 - 2, 4 * sms * 2 - 1, 4 * sms * 2, 1054, 1055, 4096):
            for variant in (None, "v1", "v2"):
                assert S.step_fwd_kernel(variant, b, sms) == cbe.step_fwd_kernel(variant, b), (sms, b, variant)
    for b in (1, 2, 3, 7, 1055, 4096):
        assert S.step_fwd_grid("v1", b) == b and S.step_fwd_grid("v2", b) == (b + 1) // 2


def test_backend_step4_plan_takes_v2_at_large_batch():
    """backend.lenet_launches' four-kernel step: step_fwd's entry is the default plan's kernel and grid (132 SMs
    without a device): v1 a block per image at batch 64, v2 a block per pair at 4,096."""
    pytest.importorskip("numba")
    from lenet_gpu.backends.numba_backend import backend as B

    assert B.sm_count() == 132
    assert B.lenet_launches(64)[0] == ("step_fwd", "v1", 64, 256, STEP_FWD_SHARED["step_fwd_v1"])
    assert B.lenet_launches(4096)[0] == ("step_fwd", "v2", 2048, 256, STEP_FWD_SHARED["step_fwd_v2"])


# ------------------------------------------------------------------------------------------- PTX (no device)
ARCHS = ("sm_80", "sm_90")
KERNELS = ("step_fwd_v1", "step_fwd_v2", "step_adam_v1", "step_sgd_v1")
#: the kernels' dynamic shared memory: step_fwd.cu's static arrays (v1: the weights, x, p1; v2: the weights and two
#: images' x and p1: 19,288 and 28,088 B) as 16-byte-aligned regions of one block, C1's 6 biases padded to 8 (+8 B)
STEP_FWD_SHARED = {"step_fwd_v1": 19296, "step_fwd_v2": 28096}
#: 64-bit shared loads (common.ld_pair) in the PTX: the window rows and the weights of every conv row call (5 C1
#: rows: 3 + 3 input + 15 weight loads; 5 C3 rows: 3 + 3 input + 5·kb/2 weight loads), less the input rows NVVM
#: loads once for two row calls (a row's bottom is the next row's top)
STEP_FWD_PAIR_LOADS = {"step_fwd_v1": 136, "step_fwd_v2": 161}
#: integer division or remainder in PTX (any width and sign)
INT_DIV = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)(?:\.[a-z]+)*\.[su](?:32|64)\b", re.M)


def _compiled(name: str, arch: str) -> tuple[str, dict]:
    """(PTX, ptxas -v figures) of a kernel as the backend builds it (its signature, step_fwd_v1 with its launch
    bounds): compile_report's build, which lowers a kernel once for both archs."""
    from lenet_gpu.backends.numba_backend import compile_report as cr

    ptx, log = cr.compile_kernel(name, arch)
    assert f".target {arch}" in ptx
    return ptx, cr.parse_ptxas(log)


@pytest.mark.skipif(SIM, reason="PTX checks need the real compiler")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_ptx_no_spills_no_local_no_f64_no_division(kernel, arch):
    pytest.importorskip("numba.cuda")
    from lenet_gpu.backends.numba_backend import compile_report as cr

    try:
        cr.find_ptxas()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ptx, res = _compiled(kernel, arch)
    print(f"{kernel} {arch}: {res}")
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, res
    assert ".local" not in ptx, f"{kernel} ({arch}) uses local memory"
    assert not cr.f64_lines(ptx), cr.f64_lines(ptx)[:3]
    stats = cr.int_arith_stats(ptx)
    assert all(stats[k] == 0 for k in ("div.s64", "div.u64", "rem.s64", "rem.u64", "div.s32", "rem.s32")), stats
    assert res["registers"] <= 64, f"{kernel} ({arch}): {res['registers']} registers"
    if kernel in STEP_FWD_SHARED:
        assert not INT_DIV.findall(ptx), INT_DIV.findall(ptx)[:5]  # step_fwd.cu's test: no integer div/rem at all
        from lenet_gpu.backends.numba_backend import step4_fwd as S

        assert res["shared_bytes"] == 0, res  # all dynamic: an int64 view of it gives the 64-bit loads
        assert S.step_fwd_smem(kernel.removeprefix("step_fwd_")) == STEP_FWD_SHARED[kernel]
        assert ptx.count("ld.shared.u64") == STEP_FWD_PAIR_LOADS[kernel], ptx.count("ld.shared.u64")


# ------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gbe():
    from lenet_gpu.backends.numba_backend import NumbaBackend

    return NumbaBackend()


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["relu", "tanh", "lecun_tanh", "sigmoid"])
@pytest.mark.parametrize("batch", [1, 64, 257])
def test_gpu_step_fwd(gbe, act, batch):
    check_step_fwd(gbe, batch, act, data_seed=batch, row=4, composition="v2")


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["relu", "tanh", "lecun_tanh", "sigmoid"])
@pytest.mark.parametrize("batch", [1, 3, 257])
def test_gpu_step_fwd_v2(gbe, act, batch):
    """v2 by name: the reference, the composition (v2 conv) and step_fwd_v1's bits."""
    check_step_fwd(gbe, batch, act, data_seed=batch, row=4, composition="v2", variant="v2")
    check_v2_equals_v1(gbe, batch, act, data_seed=batch + 1, row=4)


@pytest.mark.gpu
def test_gpu_step_fwd_default_plan(gbe):
    """On the device's SMs, the backend's default (variant None): v2 from 8 · SMs − 1 images (⌈B/2⌉ = 4 · SMs), with
    step_fwd_v1's bits; v1 one image below."""
    edge = 8 * gbe.sm_count - 1
    name, got = _fwd_run(gbe, edge, "tanh", 41, None)
    assert name == "step_fwd_v2"
    _assert_same_outputs(got, _fwd_run(gbe, edge, "tanh", 41, "v1")[1], f"the default (v2) vs v1 at batch {edge}")
    assert _fwd_run(gbe, edge - 1, "tanh", 42, None)[0] == "step_fwd_v1"


@pytest.mark.gpu
@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("groups", [1, 16])
def test_gpu_step_update(gbe, opt, groups):
    check_step_update(gbe, opt, param_layout()[1], conv_prefix(), groups, 5e-4, groups == 1, seed=groups)
    check_step_update(gbe, opt, conv_prefix() + 130, conv_prefix(), groups, 0.0, groups != 1, seed=groups + 1)
