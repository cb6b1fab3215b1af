"""The four-kernel step (docs/step4.md) on the host: the references, the numpy backend's ops against them (every
input set of both profiles), tests that show these checks fail on wrong ops, and the model's step4 path against the
nine-op routed step. The CUDA C kernels are checked in tests/test_step_fwd_update.py and tests/test_step_bwd.py,
and the whole cupy-host step at the end of this file (in a child process: the harness compiles once there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.backends import BackendUnavailable
from lenet_gpu.backends.base import STEP_OPS
from lenet_gpu.backends.numpy_backend import NumpyBackend
from lenet_gpu.model import LeNet5
from lenet_gpu.selftest.checks import CheckFailed, input_sets, run_case
from lenet_gpu.spec import conv_prefix, param_layout, views
from tests.conftest import require
from tests.parity import assert_close

ROOT = Path(__file__).resolve().parent.parent
ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
CHILD_ENV = "LENET_STEP4_HOST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"


def batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


class Grouped(NumpyBackend):
    """The numpy backend asking for ``groups`` partial rows (as a GPU backend's step_groups does)."""

    def __init__(self, groups: int) -> None:
        super().__init__(threads=1)
        self.groups = groups

    def step_groups(self, batch: int) -> int:
        return self.groups


# ------------------------------------------------------------------------------------------------ references
def test_step_groups_cover_the_batch_in_order():
    for b in (1, 5, 64, 67):
        for s in (1, 2, 3, 8, 70):
            gs = ref.step_groups(b, s)
            assert len(gs) == s and gs[0].start == 0 and gs[-1].stop == b
            assert all(g.stop == h.start for g, h in zip(gs, gs[1:]))
            assert max(g.stop - g.start for g in gs) == -(-b // s)
    with pytest.raises(ValueError):
        ref.step_groups(4, 0)


def test_conv_prefix_is_the_conv_layers_with_their_padding():
    specs = {s.name: s for s in param_layout()[0]}
    assert conv_prefix() == specs["c5.w"].offset == 2624
    assert specs["c3.b"].offset + specs["c3.b"].size <= conv_prefix()
    assert ref.STEP_BWD_WIDTH == conv_prefix()
    assert ref.STEP_BWD_OFFSETS == {n: specs[n].offset for n in ("c1.w", "c1.b", "c3.w", "c3.b")}


@pytest.mark.parametrize("act", ACTS)
def test_reference_step_bwd_rows_sum_to_the_routed_ops(act):
    """step_bwd's rows, summed, are the three routed ops on the whole batch; padding columns are 0."""
    rng = np.random.default_rng(5)
    b = 5
    x = rng.standard_normal((b, 1, 32, 32))
    p1 = np.tanh(rng.standard_normal((b, 6, 14, 14))) * 0.5  # inside every activation's range
    if act in ("relu", "sigmoid"):
        p1 = np.abs(p1)
    gz3, w3 = rng.standard_normal((b, 16, 5, 5)), rng.standard_normal((16, 6, 5, 5)) * 0.1
    m3, m1 = rng.integers(0, 4, (b, 16, 5, 5)), rng.integers(0, 4, (b, 6, 14, 14))
    gp = ref.step_bwd(x, p1, gz3, m3, m1, w3, act, 3)
    total = gp.sum(axis=0)
    v = views(np.concatenate([total, np.zeros(param_layout()[1] - conv_prefix())]))
    dw3, db3 = ref.conv2d_bwd_weight_routed(p1, gz3, m3, 5, 5)
    gz1 = ref.conv2d_bwd_data_routed(gz3, w3, m3, p1, act)
    dw1, db1 = ref.conv2d_bwd_weight_routed(x, gz1, m1, 5, 5)
    for name, want in (("c1.w", dw1), ("c1.b", db1), ("c3.w", dw3), ("c3.b", db3)):
        np.testing.assert_allclose(v[name], want, rtol=1e-12, atol=1e-12, err_msg=name)
    used = np.zeros(conv_prefix(), bool)
    for s in param_layout()[0]:
        if s.offset < conv_prefix():
            used[s.offset : s.offset + s.size] = True
    assert not gp[:, ~used].any()


# --------------------------------------------------------------------------------------- numpy ops, parity
@pytest.mark.parametrize("op", STEP_OPS)
def test_numpy_step_ops_match_the_reference(op):
    be = NumpyBackend(threads=1)
    n = 0
    for profile in ("tiny", "full"):
        for s in input_sets([op], profile):
            run_case(be, op, "v1", s)
            n += 1
    assert n >= 4


def test_the_checks_fail_on_wrong_step_ops():
    """Each builder catches a wrong op: groups written in reverse order, an unwritten schedule row, partials
    added in another order, a state not advanced."""

    class Wrong(NumpyBackend):
        def step_bwd(self, x, p1, gz3, m3, m1, w3, gpart, act, variant=None):
            super().step_bwd(x, p1, gz3, m3, m1, w3, gpart, act)
            gpart[...] = gpart[::-1].copy()

        def step_fwd(self, *args, variant=None):
            srow = args[5]
            super().step_fwd(*args)
            srow[...] = np.nan

        def step_adam(self, p, g, gpart, m, v, srow, state, batch, *rest, variant=None):
            super().step_adam(p, g, gpart[::-1].copy(), m, v, srow, state, batch, *rest)

        def step_sgd(self, p, g, gpart, m, srow, state, batch, *rest, variant=None):
            st = state.copy()
            super().step_sgd(p, g, gpart, m, srow, state, batch, *rest)
            state[...] = st

    be = Wrong(threads=1)
    for op in STEP_OPS:
        sets = [s for s in input_sets([op], "full") if op != "step_bwd" or "in 1 groups" not in s.desc]
        with pytest.raises(CheckFailed):
            for s in sets:
                run_case(be, op, "v1", s)


# -------------------------------------------------------------------------------------------------- model
def test_step4_selection():
    assert LeNet5(backend="numpy").step4  # the default wherever the routed step runs and the ops exist
    assert not LeNet5(backend="numpy", step4=False).step4
    assert not LeNet5(backend="numpy", pool="avg").step4
    assert not LeNet5(backend="numpy", routed=False).step4
    assert LeNet5(backend="cpu").step4 and not LeNet5(backend="cpu", step4=False).step4
    with pytest.raises(ValueError, match="routed step is off"):
        LeNet5(backend="numpy", pool="avg", step4=True)
    lacking = NumpyBackend(threads=1)
    lacking.variants = {k: v for k, v in lacking.variants.items() if k != "step_fwd"}
    with pytest.raises(ValueError, match="lacks step_fwd"):
        LeNet5(backend=lacking, step4=True)
    with pytest.raises(ValueError, match="step4 must be"):
        LeNet5(backend="numpy", step4="yes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENET_GPU_STEP4", "0")
        assert not LeNet5(backend="numpy").step4 and LeNet5(backend="numpy", step4=True).step4
    model = LeNet5(backend=Grouped(3))
    ws = model.workspace(7)
    assert ws.gpart.shape == (3, conv_prefix()) and ws.srow.shape == (4,) and ws.gz1 is None
    assert model.ops_per_step() == 4


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_numpy_step4_equals_the_routed_step(opt):
    """One partial row: the four-op step is the nine-op routed step bit for bit (the same ops composed); three
    rows: the same up to float32 summation order. Four launches a step."""
    images, labels = batch(7, seed=6)
    kw = dict(activation="tanh", seed=3, optimizer=opt, weight_decay=1e-4)
    nine = LeNet5(backend=NumpyBackend(threads=1), step4=False, **kw)
    one = LeNet5(backend=NumpyBackend(threads=1), **kw)
    three = LeNet5(backend=Grouped(3), **kw)
    assert one.step4 and three.step4 and not nine.step4
    for step in range(3):
        before = one.backend.counters.launches
        losses = [mdl.train_step(images, labels) for mdl in (nine, one, three)]
        assert one.backend.counters.launches - before == 4
        assert losses[0] == losses[1] and losses[2] == pytest.approx(losses[0], rel=1e-6), step
    np.testing.assert_array_equal(one.parameters(), nine.parameters())
    assert_close(three.parameters(), nine.parameters(), atol=1e-6, rtol=1e-5, what="params, 3 groups")


def test_numpy_step4_run_matches_routed_run():
    """A device-resident run (replayed launches, the step state on the device, augmentation on, an epoch
    boundary crossed) of the step4 model equals the nine-op routed run bit for bit with one group: parameters,
    Adam's moments, the per-step statistics and the state words."""
    images, labels = batch(40, seed=8)
    out = []
    for step4 in (True, False):
        model = LeNet5(backend=NumpyBackend(threads=1), seed=2, step4=step4)
        assert model.step4 == step4
        data = model.upload_dataset(images, labels)
        model.begin_run(data, 8, shift=2)
        for epoch in range(2):
            model.begin_epoch(data, np.random.default_rng(epoch).permutation(40))
            model.run_steps(data, 5)
        out.append((model.parameters(), model.backend.to_host(model.m), model.step_stats(0, 5),
                    model.backend.to_host(model._run.state)))
    for a, b in zip(out[0], out[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(out[0][0] - LeNet5(backend="numpy", seed=2).parameters()).max() > 1e-4  # it trained


# ------------------------------------------------------------------------------------ the cupy-host step
def _cupy_host_backend():
    """The CPU-harness cupy backend, or a skip when its one named missing capability (g++ >= 12) is absent."""
    from lenet_gpu.backends.cupy_backend import CupyBackend

    try:
        return CupyBackend(host=True)
    except BackendUnavailable as e:  # a named missing capability, not any error
        pytest.skip(str(e))


@pytest.mark.skipif(not IN_CHILD, reason="runs in the child process of test_cupy_host_step4")
@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_child_cupy_host_step4_matches_numpy(act):
    from lenet_gpu.backends.cupy_backend import CupyBackend

    images, labels = batch(9, seed=11)
    kw = dict(activation=act, seed=5)
    host = LeNet5(backend=CupyBackend(host=True), **kw)
    ref_model = LeNet5(backend=Grouped(host.backend.step_groups(9)), **kw)
    assert host.step4 and ref_model.step4
    for step in range(2):
        c = host.backend.counters.launches
        lh, ln = host.train_step(images, labels), ref_model.train_step(images, labels)
        assert host.backend.counters.launches - c == 5, "step_fwd, head_train (2), step_bwd, step_adam"
        assert lh == pytest.approx(ln, rel=1e-5), step
    assert_close(host.parameters(), ref_model.parameters(), atol=2e-6, rtol=1e-4, what=f"params ({act})")
    again = LeNet5(backend=CupyBackend(host=True), **kw)
    for _ in range(2):
        again.train_step(images, labels)
    np.testing.assert_array_equal(again.parameters(), host.parameters())


@pytest.mark.skipif(not IN_CHILD, reason="runs in the child process of test_cupy_host_step4")
def test_child_cupy_host_step4_run_matches_numpy():
    """Recorded replays over two epochs (the schedule row, the epoch wrap) against numpy with the same groups."""
    from lenet_gpu.backends.cupy_backend import CupyBackend

    images, labels = batch(40, seed=3)
    out = []
    for be in (CupyBackend(host=True), Grouped(8)):
        model = LeNet5(backend=be, seed=2, optimizer="sgd")
        assert model.step4 and model.backend.step_groups(8) == 8
        data = model.upload_dataset(images, labels)
        model.begin_run(data, 8, shift=2)
        for epoch in range(2):
            model.begin_epoch(data, np.random.default_rng(epoch).permutation(40))
            c = be.counters.launches
            model.run_steps(data, 5)
            if not isinstance(be, Grouped):
                assert be.counters.launches - c == 25, "5 launches a step"
        out.append((model.parameters(), model.step_stats(0, 5), model.backend.to_host(model._run.state)))
    np.testing.assert_array_equal(out[0][2], out[1][2])
    assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-5, what="step stats")
    assert_close(out[0][0], out[1][0], atol=2e-6, rtol=1e-4, what="params")


def test_cupy_host_step4():
    """The whole four-kernel step on the CPU harness against numpy's (child process)."""
    be = _cupy_host_backend()
    missing = [op for op in STEP_OPS if op not in be.variants]
    assert not missing, f"cupy-host lacks {missing}"
    env = {**os.environ, CHILD_ENV: "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "child_cupy"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.search(r"\b3 passed", r.stdout), r.stdout[-2000:]


# ------------------------------------------------------------------------------------------ the numba step
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.mark.skipif(not (IN_CHILD and SIM), reason="runs in the simulator child process of test_numba_sim_step4")
def test_child_numba_sim_step4_matches_numpy():
    from lenet_gpu.backends import get_backend

    images, labels = batch(3, seed=13)
    be = get_backend("numba")  # the simulator's quick plan: v1 kernels, at most 2 blocks a launch
    kw = dict(activation="tanh", seed=4, use_graphs=False)
    model = LeNet5(backend=be, **kw)
    ref_model = LeNet5(backend=Grouped(be.step_groups(3)), **kw)
    assert model.step4 and ref_model.step4
    c = be.counters.launches  # one step (~9 s simulated): the state's advance is checked on the harness's two epochs
    ln, lr = model.train_step(images, labels), ref_model.train_step(images, labels)
    assert be.counters.launches - c == 5, "step_fwd, head_train (2), step_bwd, step_adam"
    assert ln == pytest.approx(lr, rel=1e-5)
    assert_close(model.parameters(), ref_model.parameters(), atol=2e-6, rtol=1e-4, what="params")


def test_numba_sim_step4():
    """The numba backend's four-kernel step (one model step, batch 3, tanh) in the CUDA simulator against
    numpy's with the same groups (child process: the simulator is set before numba is imported)."""
    require("numba")
    env = {**os.environ, CHILD_ENV: "1", "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "child_numba", "-W", "ignore::DeprecationWarning"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.search(r"\b1 passed", r.stdout), r.stdout[-2000:]
