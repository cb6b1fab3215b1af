"""The numba backend's routed backward (docs/routed_backward.md): conv2d_bwd_weight_routed,
conv2d_bwd_data_routed and head_train with yconv=None, against the float64 reference — the dense reference
ops on the scattered gradient dz = pool2x2_bwd(gz, argmax, "max", (Ho, Wo)) (the routed ops' definition).

As in test_numba_backend.py: ``test_routed_simulator_suite`` re-runs the ``sim_*`` tests of this file in a
subprocess with NUMBA_ENABLE_CUDASIM=1 (tiny, odd shapes: batch 1, odd batches, odd conv outputs whose last
row/column no window covers, one block taking every work item); the ``gpu_*`` tests are the same checks at
LeNet-5 sizes on a device.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests import sim_child

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ROOT = Path(__file__).resolve().parent.parent

sim = pytest.mark.skipif(not SIM, reason="runs inside test_routed_simulator_suite's NUMBA_ENABLE_CUDASIM=1 subprocess")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
ACTS = ("identity", "relu", "tanh", "lecun_tanh", "sigmoid")


#: true uint32 scalars in the simulated kernels (routed.py): a wraparound would show, and a uint32 overflow warning
#: in a simulated kernel fails
SUITE = sim_child.Child(__file__, "sim_", (("LENET_GPU_SIM_UINT32", "1"),), ("-W", "error::RuntimeWarning"), 600)


@pytest.mark.sim
@sim_child.early(SUITE)
def test_routed_simulator_suite():
    """Run the sim_* tests of this file in a subprocess with the CUDA simulator on."""
    if SIM:
        pytest.skip("this is the simulator run")
    print(sim_child.result(SUITE))


# ------------------------------------------------------------------------------------------------ checks
F64 = np.float64


def _routed_inputs(n, k, ho, wo, seed, relu_ties=False):
    """gz (n,k,Ho//2,Wo//2) and argmax (uint8) from max-pooling a seeded conv output."""
    from lenet_gpu import reference as R
    from tests.parity import rand

    y = rand((n, k, ho, wo), seed + 7)
    if relu_ties:
        y = np.maximum(y, 0).astype(np.float32)  # zero windows: ties, the first tap wins
    _, am = R.pool2x2_fwd(y.astype(F64), "max")
    gz = rand(am.shape, seed + 8)
    return gz, am.astype(np.uint8)


def check_bwd_weight_routed(be, xshape, wshape, seed=0, state=None, variant="v2"):
    from lenet_gpu import reference as R
    from lenet_gpu.stepstate import STATE_WORDS
    from tests.parity import TOL, assert_close, nan_like, rand

    n, c, h, wd = xshape
    k, _, r, s = wshape
    ho, wo = h - r + 1, wd - s + 1
    x = rand(xshape, seed)
    gz, am = _routed_inputs(n, k, ho, wo, seed, relu_ties=seed % 2 == 1)
    dw = be.to_device(nan_like(wshape))
    db = be.to_device(nan_like((k,)))
    dstate = be.to_device(np.zeros(STATE_WORDS, np.int32) if state is None else state)
    be.launch_log = []
    be.conv2d_bwd_weight_routed(be.to_device(x), be.to_device(gz), be.to_device(am), dw, db, dstate, variant=variant)
    _check_log(be, f"conv2d_bwd_weight_routed_{variant}")
    dz = R.pool2x2_bwd(gz.astype(F64), am, "max", (ho, wo))
    _, rdw, rdb = R.conv2d_bwd(x.astype(F64), np.zeros(wshape), np.zeros(dz.shape), dz, "identity")
    what = f"conv2d_bwd_weight_routed_{variant} {xshape} {wshape}"
    assert_close(be.to_host(dw), rdw, *TOL["conv2d_bwd_weight"], what + " dw")
    assert_close(be.to_host(db), rdb, *TOL["conv2d_bwd_weight"], what + " db")
    return be.to_host(dw), be.to_host(db)


def check_bwd_data_routed(be, yshape, wshape, act, seed=0):
    """yshape (N,C,H,W): the conv's input y_below (the pooled activated map of the layer below)."""
    from lenet_gpu import reference as R
    from tests.parity import TOL, assert_close, nan_like, rand

    n, c, h, wd = yshape
    k, _, r, s = wshape
    ho, wo = h - r + 1, wd - s + 1
    w = rand(wshape, seed + 1, 0.3)
    yb = R.activate(rand(yshape, seed + 2).astype(F64), act).astype(np.float32)
    if act == "relu":
        yb[:, :, ::3, ::2] = 0.0  # act' = 0 there
    gz, am = _routed_inputs(n, k, ho, wo, seed, relu_ties=seed % 2 == 1)
    gzb = be.to_device(nan_like(yshape))
    be.launch_log = []
    be.conv2d_bwd_data_routed(be.to_device(gz), be.to_device(w), be.to_device(am), be.to_device(yb), gzb, act)
    _check_log(be, "conv2d_bwd_data_routed_v1")
    dz = R.pool2x2_bwd(gz.astype(F64), am, "max", (ho, wo))
    dx, _, _ = R.conv2d_bwd(np.zeros(yshape), w.astype(F64), np.zeros(dz.shape), dz, "identity")
    ref = dx * R.activation_grad(yb.astype(F64), act)
    assert_close(be.to_host(gzb), ref, *TOL["conv2d_bwd_data"], f"conv2d_bwd_data_routed {act} {yshape} {wshape}")


def _check_log(be, name):
    """One launch, with the argument types of the kernel's declared signature (what the compile checks build)."""
    from numba.core import sigutils

    from lenet_gpu.backends.numba_backend import routed

    assert len(be.launch_log) == 1, be.launch_log
    got, types = be.launch_log[0]
    be.launch_log = None
    assert got == name
    want, _ = sigutils.normalize_signature(routed.SIGNATURES[name])
    assert tuple(types) == tuple(want), f"{name}: launched with {types}, declared {want}"


def check_head_train_routed(be, b, c, h, w, h1, h2, nc, act, seed=0):
    """head_train with yconv=None: every output as the dense head's, and dz_conv (x's shape) = dx·act'(x)."""
    from lenet_gpu import reference as R
    from lenet_gpu.stepstate import STATE_WORDS, STEP_IN_EPOCH
    from tests.fused_helpers import TOL_HEAD, head_inputs
    from tests.parity import assert_close, nan_like

    inp = head_inputs(b, c, h, w, h1, h2, nc, act, "max", seed)
    d64 = {k: np.asarray(v, F64) for k, v in inp.items() if k not in ("labels", "argmax")}
    want = R.head_train(d64["x"], inp["labels"], d64["w1"], d64["b1"], d64["w2"], d64["b2"], d64["w3"], d64["b3"],
                        inp["argmax"], d64["yconv"], act, "max")
    gz_ref = want["dx"] * R.activation_grad(d64["x"], act)
    put = be.to_device
    xs = inp["x"].shape
    out = {"h1": put(nan_like((b, h1))), "h2": put(nan_like((b, h2))), "logits": put(nan_like((b, nc))),
           "dz_conv": put(nan_like(xs)), "dw1": put(nan_like(inp["w1"].shape)), "db1": put(nan_like((h1,))),
           "dw2": put(nan_like(inp["w2"].shape)), "db2": put(nan_like((h2,))),
           "dw3": put(nan_like(inp["w3"].shape)), "db3": put(nan_like((nc,)))}
    stats = put(np.full((3, 2), -7.0, np.float32))
    st = np.zeros(STATE_WORDS, np.int32)
    st[STEP_IN_EPOCH] = 4
    dev = {k: put(inp[k]) for k in ("x", "labels", "w1", "b1", "w2", "b2", "w3", "b3", "argmax")}
    be.head_train(dev["x"], dev["labels"], dev["w1"], dev["b1"], dev["w2"], dev["b2"], dev["w3"], dev["b3"],
                  out["h1"], out["h2"], out["logits"], dev["argmax"], None, out["dz_conv"], out["dw1"], out["db1"],
                  out["dw2"], out["db2"], out["dw3"], out["db3"], stats, put(st), act, "max")
    what = f"head_train routed {act} B={b} x{xs[1:]}"
    got = {k: be.to_host(v) for k, v in out.items()}
    for k in ("h1", "h2", "logits"):
        assert_close(got[k], want[k], *TOL_HEAD[k], what=f"{what} {k}")
    for k in ("dw1", "dw2", "dw3"):
        assert_close(got[k], want[k], *TOL_HEAD["dw"], what=f"{what} {k}")
    for k in ("db1", "db2", "db3"):
        assert_close(got[k], want[k], *TOL_HEAD["db"], what=f"{what} {k}")
    assert_close(got["dz_conv"], gz_ref, *TOL_HEAD["dz_conv"], what=f"{what} dz_conv")
    row = be.to_host(stats)[4 % 3]
    assert_close(row[0], want["loss_sum"], *TOL_HEAD["loss_sum"], what=f"{what} loss sum")
    assert row[1] == want["correct"]


def _backend(max_blocks=2):
    from lenet_gpu.backends.numba_backend import NumbaBackend

    return NumbaBackend(max_blocks=max_blocks)


# ------------------------------------------------------------------------------------------- simulator


@sim
@pytest.mark.parametrize("xshape,wshape,max_blocks", [
    ((1, 1, 8, 8), (2, 1, 3, 3), 2),       # batch 1; conv 6x6 → 3x3 windows
    ((3, 2, 7, 6), (3, 2, 2, 3), 1),       # odd batch; conv 6x4; one block takes every item
    ((2, 3, 6, 7), (2, 3, 3, 2), 3),       # odd conv output 4x6 / odd width
    ((5, 2, 9, 9), (2, 2, 4, 4), 4),       # conv 6x6, bias column inside a chunk; splits > 1
])
def test_sim_bwd_weight_routed(xshape, wshape, max_blocks):
    be = _backend(max_blocks)
    check_bwd_weight_routed(be, xshape, wshape, seed=sum(xshape))
    check_bwd_weight_routed(be, xshape, wshape, seed=sum(xshape), variant="v1")


@sim
def test_sim_bwd_weight_routed_splits_are_deterministic(monkeypatch):
    """Forced splits (the ticketed fixed-order sum over them): every block order gives bit-identical dw, db,
    and a second launch on the same scratch (tickets reset) gives the same bits again."""
    from lenet_gpu.backends.numba_backend import backend as B

    monkeypatch.setattr(B, "bw_splits", lambda dw, gz: 3)
    be = _backend(2)
    a = check_bwd_weight_routed(be, (3, 1, 8, 8), (1, 1, 3, 3), seed=4)
    b = check_bwd_weight_routed(be, (3, 1, 8, 8), (1, 1, 3, 3), seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


@sim
@pytest.mark.parametrize("act", ACTS)
def test_sim_bwd_data_routed(act):
    shapes = {"identity": ((1, 2, 6, 6), (2, 2, 3, 3)), "relu": ((3, 7, 7, 6), (2, 7, 3, 2)),
              "tanh": ((2, 3, 7, 7), (3, 3, 2, 2)), "lecun_tanh": ((1, 6, 6, 5), (2, 6, 3, 3)),
              "sigmoid": ((3, 1, 5, 6), (2, 1, 2, 3))}
    xshape, wshape = shapes[act]
    check_bwd_data_routed(_backend(2), xshape, wshape, act, seed=len(act))


@sim
@pytest.mark.parametrize("act", ACTS)
def test_sim_head_train_routed(act):
    b = {"identity": 1, "relu": 3, "tanh": 2, "lecun_tanh": 5, "sigmoid": 1}[act]
    check_head_train_routed(_backend(2), b, 2, 4, 6, 5, 4, 3, act, seed=b)


@sim
def test_sim_routed_argument_errors():
    from tests.parity import rand

    be = _backend(1)
    x = be.to_device(rand((2, 1, 8, 8), 0))
    gz = be.to_device(rand((2, 2, 3, 3), 1))
    am = be.to_device(np.zeros((2, 2, 3, 3), np.uint8))
    dw, db = be.to_device(rand((2, 1, 3, 3), 2)), be.to_device(rand((2,), 3))
    with pytest.raises(ValueError, match="gz"):
        be.conv2d_bwd_weight_routed(x, be.to_device(rand((2, 2, 2, 3), 1)), am, dw, db)
    with pytest.raises(TypeError, match="argmax"):
        be.conv2d_bwd_weight_routed(x, gz, be.to_device(np.zeros((2, 2, 3, 3), np.int32)), dw, db)
    with pytest.raises(TypeError, match="host"):
        be.conv2d_bwd_weight_routed(np.zeros((2, 1, 8, 8), np.float32), gz, am, dw, db)
    with pytest.raises(ValueError, match="variant"):
        be.conv2d_bwd_data_routed(gz, be.to_device(rand((2, 1, 3, 3), 4)), am, x, x, "relu", variant="v9")
    with pytest.raises(ValueError, match="max pooling"):
        be.head_train(*([None] * 12), None, None, *([None] * 8), "relu", "avg")


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 257])
def test_gpu_routed_ops_at_lenet_sizes(batch):
    from lenet_gpu.backends.numba_backend import NumbaBackend

    be = NumbaBackend()
    for v in ("v1", "v2"):
        check_bwd_weight_routed(be, (batch, 6, 14, 14), (16, 6, 5, 5), seed=batch, variant=v)
        check_bwd_weight_routed(be, (batch, 1, 32, 32), (6, 1, 5, 5), seed=batch + 1, variant=v)
    for act in ACTS:
        check_bwd_data_routed(be, (batch, 6, 14, 14), (16, 6, 5, 5), act, seed=batch)
        check_head_train_routed(be, batch, 16, 10, 10, 120, 84, 10, act, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("batch", [3, 64])
def test_gpu_model_routed_step_equals_numpy_routed_step(act, batch):
    """Two LeNet-5 training steps through the model's routed step on numba and on numpy (routed too): the same
    losses and, to float32 summation order, the same gradients and parameters. (In the simulator, batch 3,
    relu and lecun_tanh, it passed once in 380 s: conv2d_bwd_weight_routed_v2's barriers take 69 s of a
    simulated step, too slow for the suite.)"""
    from lenet_gpu.backends import get_backend
    from lenet_gpu.model import LeNet5
    from tests.parity import assert_close

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.uint8)
    models = [LeNet5(backend=b, activation=act, seed=4, routed=True, use_graphs=False)
              for b in (get_backend("numba"), get_backend("numpy"))]
    assert all(m.routed for m in models)
    for step in range(2):
        losses = [m.train_step(images, labels) for m in models]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), step
        g = [m.backend.to_host(m.grads) for m in models]
        assert_close(g[0], g[1], atol=1e-5 * float(np.abs(g[1]).max()), rtol=1e-4, what=f"grads step {step}")
    assert_close(models[0].parameters(), models[1].parameters(), atol=1e-5, rtol=1e-4, what="params")


@sim
@pytest.mark.parametrize("staged", [True, False])
def test_sim_head_train_c5_chunks(monkeypatch, staged):
    """head_train_v1's C5 layer with its weights staged in shared memory C5_CHUNK columns at a time: x of 60
    features (a full and a partial chunk) against reference.head_train, dense (avg) and routed (max); staged=False
    forces the plain loop (what a C5 too wide for shared memory takes)."""
    from lenet_gpu.backends.numba_backend import head
    from tests.fused_helpers import check_head_train

    if not staged:
        monkeypatch.setattr(head, "C5_MAX_SMEM", 0)
    assert (head.c5_smem(7) > 0) == staged
    be = _backend(2)
    check_head_train(be, lambda b, *a, **k: b.head_train(*a, **k), None, 3, 3, 8, 11, 7, 5, 4, "tanh", "avg")
    check_head_train_routed(be, 2, 3, 8, 10, 7, 5, 4, "sigmoid", seed=3)
