"""The routed backward on the cupy backend (kernels/conv2d.cu's *_routed_v<N>, head.cu's null-yconv branch):
NVRTC for sm_80 / sm_90 in this process; the kernels on the CPU harness (``cupy-host``) in a child pytest
process (``LENET_ROUTED_HOST_CHILD=1`` runs them directly): parity against the float64 reference for every
activation, batch 1, odd batches and odd map sizes, LeNet-5 shapes at a small batch; the whole routed step
against the numpy backend's; recorded replay and graph equal to eager; two runs bit for bit; the launch and
allocation counts of a step. ``pytest -m gpu tests/test_routed_cupy.py`` runs the same on a device."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.backends.cupy_backend import OP_KERNELS, CupyBackend, fused, launch_plan
from tests import sim_child
from tests.host_child import check_host_suite, host_suite
from tests.parity import TOL, assert_close, assert_equal, nan_like, rand

CHILD_ENV = "LENET_ROUTED_HOST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["cupy-host"] if IN_CHILD else [pytest.param("cupy", marks=pytest.mark.gpu)]
parent_only = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process")
ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
ROUTED = ("conv2d_bwd_weight_routed", "conv2d_bwd_data_routed")
F64 = np.float64

_BACKENDS: dict[str, CupyBackend] = {}


@pytest.fixture(params=BACKENDS)
def be(request):
    if request.param not in _BACKENDS:  # one backend per process: modules compile once
        _BACKENDS[request.param] = CupyBackend(host=request.param == "cupy-host")
    return _BACKENDS[request.param]


HOST_SUITE = host_suite(__file__, CHILD_ENV)


@parent_only
@sim_child.early(*filter(None, [HOST_SUITE]))
def test_host_suite_in_subprocess():
    """Every test below on the CPU harness, in a child process (a wild pointer kills the process running it)."""
    check_host_suite(HOST_SUITE, __file__, CHILD_ENV, "routed")


# NVRTC (sm_80 / sm_90, warnings are errors, no spills) of the routed kernels and of head.cu's null-yconv branch:
# tests/test_kernels_compile.py (every kernel of conv2d.cu) and tests/test_fused.py (head.cu per HEAD_ROWS).


def test_launch_plans_cover_the_outputs():
    from lenet_gpu.backends.cupy_backend.backend import routed_wgrad_reduce

    c3 = dict(C=6, H=14, W=14, K=16, R=5, S=5)
    p = launch_plan("conv2d_bwd_weight_routed", "v1", dict(N=64, **c3))
    assert p.blocks * p.threads >= 16 * 150 + 16
    for n, shape, splits in ((64, c3, 1), (4096, c3, 6), (64, dict(C=1, H=32, W=32, K=6, R=5, S=5), 11),
                             (4096, dict(C=1, H=32, W=32, K=6, R=5, S=5), 88), (1, c3, 1)):
        p = launch_plan("conv2d_bwd_weight_routed", "v2", dict(N=n, **shape), sm_count=132)
        chunk = p.extra[0]
        assert p.grid == (shape["K"], shape["C"], splits) and p.extra == (chunk, splits, 0), (n, shape, p)
        assert (splits - 1) * chunk < n <= splits * chunk
        assert p.defines == (("RT_R", 5), ("RT_S", 5))
        red = routed_wgrad_reduce(p, shape["K"], shape["C"], 5, 5)
        assert red.blocks * red.threads >= shape["K"] * (shape["C"] * 25 + 1) and red.extra == (chunk, splits, 1)
    for v in OP_KERNELS["conv2d_bwd_data_routed"][1]:
        p = launch_plan("conv2d_bwd_data_routed", v, dict(N=64, **c3))
        assert p.blocks * p.threads >= 64 * 14 * 14 * (6 if v == "v1" else 1)


# ------------------------------------------------------------------------------------------- op parity
def routed_inputs(xs: tuple, ws: tuple, act: str, seed: int):
    """x (the conv's input, an activated map), w, the conv's pooled output's routes and a routed gradient."""
    n, c, h, wd = xs
    k, _, r, s = ws
    x = ref.activate(rand(xs, seed), act).astype(np.float32)
    w = rand(ws, seed + 1, float(1 / np.sqrt(c * r * s)))
    y = ref.conv2d_fwd(x.astype(F64), w.astype(F64), rand((k,), seed + 2).astype(F64), act)
    if act == "relu":
        y[:, :, ::3, ::2] = 0.0  # ties inside windows: the first maximum is the route
    p, m = ref.pool2x2_fwd(y, "max")
    gz = (rand(p.shape, seed + 3) * ref.activation_grad(p, act)).astype(np.float32)
    return x, w, m, gz


def check_routed_ops(be, variant: str | None, xs: tuple, ws: tuple, act: str, seed: int = 0) -> None:
    x, w, m, gz = routed_inputs(xs, ws, act, seed)
    k, c, r, s = ws
    what = f"{variant} {act} x{xs} w{ws}"
    dx, dgz, dm, dw_ = be.to_device(x), be.to_device(gz), be.to_device(m), be.to_device(w)
    dw, db = be.to_device(nan_like(ws)), be.to_device(nan_like((k,)))
    be.conv2d_bwd_weight_routed(dx, dgz, dm, dw, db, variant=variant)
    rdw, rdb = ref.conv2d_bwd_weight_routed(x.astype(F64), gz.astype(F64), m, r, s)
    assert_close(be.to_host(dw), rdw, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight_routed {what} dw")
    assert_close(be.to_host(db), rdb, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight_routed {what} db")
    out = be.to_device(nan_like(xs))
    be.conv2d_bwd_data_routed(dgz, dw_, dm, dx, out, act, variant=variant)
    want = ref.conv2d_bwd_data_routed(gz.astype(F64), w.astype(F64), m, x.astype(F64), act)
    assert_close(be.to_host(out), want, *TOL["conv2d_bwd_data"], what=f"conv2d_bwd_data_routed {what}")


SHAPES = [  # (x, w): LeNet's C1 and C3, odd batches, odd conv outputs (a trailing row / column in no window);
    # v2 (RT_R, RT_S, RT_C compiled per launch) builds a module per geometry
    ((1, 1, 32, 32), (6, 1, 5, 5)),
    ((3, 6, 14, 14), (16, 6, 5, 5)),
    ((5, 2, 9, 8), (3, 2, 3, 2)),
    ((2, 3, 7, 11), (4, 3, 2, 4)),
]


@pytest.mark.parametrize("variant", OP_KERNELS["conv2d_bwd_weight_routed"][1])
@pytest.mark.parametrize("act", ACTS)
def test_routed_ops_match_reference(be, variant, act):
    for i, (xs, ws) in enumerate(SHAPES):
        check_routed_ops(be, variant, xs, ws, act, seed=i)


def test_routed_v2_falls_back_to_v1_beyond_its_geometry(be):
    """6x6 filters (36 taps) exceed v2's accumulators: the default runs v1, asking for v2 is an error."""
    check_routed_ops(be, None, (2, 2, 10, 9), (3, 2, 6, 6), "tanh", seed=5)
    x, w, m, gz = routed_inputs((2, 2, 10, 9), (3, 2, 6, 6), "tanh", 5)
    with pytest.raises(ValueError, match="use v1"):
        be.conv2d_bwd_weight_routed(be.to_device(x), be.to_device(gz), be.to_device(m), be.to_device(nan_like(w.shape)),
                                    be.to_device(nan_like((3,))), variant="v2")


def test_routed_ops_repeat_bit_for_bit(be):
    x, w, m, gz = routed_inputs((3, 6, 14, 14), (16, 6, 5, 5), "tanh", 9)
    args = [be.to_device(a) for a in (x, gz, m, w)]
    outs = []
    for _ in range(2):
        dw, db, gb = be.to_device(nan_like(w.shape)), be.to_device(nan_like((16,))), be.to_device(nan_like(x.shape))
        be.conv2d_bwd_weight_routed(args[0], args[1], args[2], dw, db)
        be.conv2d_bwd_data_routed(args[1], args[3], args[2], args[0], gb, "tanh")
        outs.append([be.to_host(a) for a in (dw, db, gb)])
    for a, b in zip(*outs, strict=True):
        assert_equal(a, b, "repeat")


def test_routed_ops_refuse_bad_shapes(be):
    x, w, m, gz = routed_inputs((2, 6, 14, 14), (16, 6, 5, 5), "relu", 1)
    dx, dgz, dm = be.to_device(x), be.to_device(gz), be.to_device(m)
    with pytest.raises(ValueError, match="pooled"):
        be.conv2d_bwd_weight_routed(dx, dgz, dm, be.to_device(nan_like((16, 6, 3, 3))), be.to_device(nan_like((16,))))
    with pytest.raises(ValueError, match="pooled"):
        be.conv2d_bwd_data_routed(dgz, be.to_device(w), dm, be.to_device(nan_like((2, 6, 16, 14))),
                                  be.to_device(nan_like((2, 6, 16, 14))), "relu")


@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 16, 10, 10, 120, 84, 10), (5, 3, 7, 6, 9, 33, 4)], ids=str)
def test_head_train_routed_gradient(be, variant, act, shape):
    """yconv=None: dz_conv at x's shape = dL/dx·act'(x) (the reference's), every other output equal to the
    dense call's bit for bit (same kernels, same order)."""
    from tests.fused_helpers import head_inputs

    b, c, h, w, h1, h2, nc = shape
    inp = head_inputs(b, c, h, w, h1, h2, nc, act, "max", seed=b + h1)
    dev = {k: be.to_device(v) for k, v in inp.items()}
    state = be.to_device(np.zeros(8, np.int32))
    got = {}
    for key, yc, dz_shape in (("dense", dev["yconv"], (b, c, h, w)), ("routed", None, inp["x"].shape)):
        o = {n: be.to_device(nan_like(sh)) for n, sh in (("h1", (b, h1)), ("h2", (b, h2)), ("logits", (b, nc)),
                                                         ("dz", dz_shape), ("dw1", inp["w1"].shape), ("db1", (h1,)),
                                                         ("dw2", inp["w2"].shape), ("db2", (h2,)),
                                                         ("dw3", inp["w3"].shape), ("db3", (nc,)), ("stats", (2, 2)))}
        fused.head_train(be, dev["x"], dev["labels"], dev["w1"], dev["b1"], dev["w2"], dev["b2"], dev["w3"], dev["b3"],
                         o["h1"], o["h2"], o["logits"], dev["argmax"], yc, o["dz"], o["dw1"], o["db1"], o["dw2"],
                         o["db2"], o["dw3"], o["db3"], o["stats"], state, act, "max", variant=variant)
        got[key] = {n: be.to_host(a) for n, a in o.items()}
    for n in ("h1", "h2", "logits", "dw1", "db1", "dw2", "db2", "dw3", "db3"):
        assert_equal(got["routed"][n], got["dense"][n], f"head_train_{variant} routed {n}")
    assert_equal(got["routed"]["stats"][0], got["dense"]["stats"][0], "stats row")
    want = ref.head_train(inp["x"].astype(F64), inp["labels"], *(inp[k].astype(F64) for k in
                                                                 ("w1", "b1", "w2", "b2", "w3", "b3")),
                          inp["argmax"], None, act, "max")
    assert_close(got["routed"]["dz"], want["dz_conv"], *TOL["head_train"], what=f"head_train_{variant} {act} gz")
    scattered = ref.pool2x2_bwd(got["routed"]["dz"], inp["argmax"], "max", (h, w))
    assert_close(scattered, got["dense"]["dz"], 1e-7, 1e-6, what="scattered gz vs dense dz_conv")
    with pytest.raises(ValueError, match="max pooling"):
        fused.head_train(be, dev["x"], dev["labels"], dev["w1"], dev["b1"], dev["w2"], dev["b2"], dev["w3"],
                         dev["b3"], o["h1"], o["h2"], o["logits"], None, None, o["dz"], o["dw1"], o["db1"], o["dw2"],
                         o["db2"], o["dw3"], o["db3"], o["stats"], state, act, "avg", variant=variant)


# ------------------------------------------------------------------------------------------- whole steps
def _start(models, n: int = 7, batch: int = 3):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), rng.integers(0, 10, n).astype(np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    datas = []
    for m in models:
        d = m.upload_dataset(images, labels)
        m.begin_run(d, batch, seed=5, shift=2)
        m.begin_epoch(d, perm)
        datas.append(d)
    return datas


@pytest.mark.parametrize("act,optimizer", [("relu", "sgd"), ("sigmoid", "adam")])
def test_routed_step_matches_numpy(be, act, optimizer):
    """3 routed steps (batch 3 of 7 images, augmentation on) on cupy and on numpy: parameters, state, stats."""
    from lenet_gpu.model import LeNet5

    opts = dict(activation=act, seed=1, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    # the nine-op routed step (the four-kernel step: tests/test_step4.py)
    cu, npm = (LeNet5(backend=be, routed=True, step4=False, **opts),
               LeNet5(backend="numpy", routed=True, step4=False, **opts))
    assert cu.routed and npm.routed  # (routed vs dense steps: tests/test_routed.py, on numpy)
    datas = _start((cu, npm))
    for step in range(3):
        for m, d in zip((cu, npm), datas, strict=True):
            m.run_steps(d, 1)
        if optimizer == "sgd":  # Adam's first steps are lr·sign(g): compared below through the gradients
            assert_close(cu.parameters(), npm.parameters(), 2e-5, 2e-4, what=f"params after step {step + 1}")
        g, gn = cu.backend.to_host(cu.grads), npm.backend.to_host(npm.grads)
        assert_close(g, gn, 1e-5 * np.abs(gn).max(), 1e-3, what=f"grads step {step + 1}")
        assert_equal(be.to_host(cu._run.state), npm.backend.to_host(npm._run.state), "state")
    got, want = cu.step_stats(0, 2), npm.step_stats(0, 2)
    assert_equal(got[:, 1], want[:, 1], "correct counts")
    assert_close(got[:, 0], want[:, 0], 1e-4, 1e-4, what="loss sums")


def test_routed_step_counts_replays_and_repeats(be):
    """A routed step is 12 launches (head_train: 2, each routed weight gradient v2: 2) and nothing else after
    warm-up; recorded replay and the
    graph of 2 steps equal eager launches (the model's self-check), and two runs agree bit for bit."""
    from lenet_gpu.model import LeNet5

    runs = []
    for _ in range(2):
        model = LeNet5(backend=be, seed=3, graph_steps=2, step4=False)
        assert model.routed and model.ops_per_step() == 9
        ws = model.workspace(3)
        assert ws.a1 is None and ws.a3 is None and ws.gz1 is not None
        (data,) = _start((model,), n=12)
        model.run_steps(data, 1)  # warm-up
        model.run_steps(data, 2)  # the graph: self-check (2 eager vs 2 replayed, bit for bit) and capture
        assert model.graph_check()[0], model.graph_check()
        before = be.counters.snapshot()
        model.run_steps(data, 2)
        assert be.counters.since(before) == {"launches": 24, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
        runs.append((model.parameters(), model.step_stats(0, 4), be.to_host(model.m)))
    for a, b in zip(*runs, strict=True):
        assert_equal(a, b, "two routed runs")


def test_avg_pool_keeps_the_dense_step(be):
    from lenet_gpu.model import LeNet5

    model = LeNet5(backend=be, pool="avg")
    assert not model.routed and model.workspace(2).a1 is not None
    with pytest.raises(ValueError, match="max pooling"):
        LeNet5(backend=be, pool="avg", routed=True)
