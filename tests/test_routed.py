"""The routed (sparse max-pool) backward, docs/routed_backward.md: the float64 references against the dense
references and finite differences, the numpy backend's routed ops against the references, and the model's
routed step against its dense step."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import LeNet5, get_backend
from lenet_gpu import reference as R
from lenet_gpu.spec import views

from .parity import TOL, assert_close, assert_equal, nan_like

ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
RNG = np.random.default_rng(2026)


def routed_case(n: int, c: int, h: int, w: int, k: int, r: int, s: int, act: str, seed: int = 0):
    """x (n,c,h,w), w (k,c,r,s), the conv's activated output, its max pool and routes, and a routed
    gradient gz at the pooled size (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((k, c, r, s)) * 0.5
    y = R.conv2d_fwd(x, wt, rng.standard_normal(k) * 0.1, act)
    p, m = R.pool2x2_fwd(y, "max")
    gz = rng.standard_normal(p.shape) * R.activation_grad(p, act)
    return x, wt, y, p, m, gz


# ------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(3, 2, 11, 12, 4, 3, 3), (1, 1, 8, 8, 2, 5, 5), (2, 3, 9, 7, 5, 2, 4)])
def test_reference_wgrad_equals_dense_on_scattered_gradient(act, shape):
    n, c, h, w, k, r, s = shape
    x, _, y, _, m, gz = routed_case(n, c, h, w, k, r, s, act)
    dz = R.pool2x2_bwd(gz, m, "max", y.shape[2:])
    _, dw_dense, db_dense = R.conv2d_bwd(x, np.zeros((k, c, r, s)), y, dz, "identity")
    dw, db = R.conv2d_bwd_weight_routed(x, gz, m, r, s)
    assert_close(dw, dw_dense, atol=1e-12, rtol=1e-12, what="routed dw")
    assert_close(db, db_dense, atol=1e-12, rtol=1e-12, what="routed db")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(3, 2, 11, 12, 4, 3, 3), (1, 1, 8, 8, 2, 5, 5), (2, 3, 9, 7, 5, 2, 4)])
def test_reference_dgrad_equals_dense_on_scattered_gradient(act, shape):
    n, c, h, w, k, r, s = shape
    rng = np.random.default_rng(5)
    y_below = R.activate(rng.standard_normal((n, c, h, w)), act)  # the conv's input: an activated map
    _, wt, y, _, m, gz = routed_case(n, c, h, w, k, r, s, act)
    dz = R.pool2x2_bwd(gz, m, "max", y.shape[2:])
    dx, _, _ = R.conv2d_bwd(y_below, wt, y, dz, "identity")
    got = R.conv2d_bwd_data_routed(gz, wt, m, y_below, act)
    assert_close(got, dx * R.activation_grad(y_below, act), atol=1e-12, rtol=1e-12, what="routed gz_below")


@pytest.mark.parametrize("act", ACTS)
def test_reference_head_train_routed_gradient(act):
    """yconv=None: dz_conv = dx·act'(x) at x's shape, and scattered by the routes it is the dense dz_conv."""
    rng = np.random.default_rng(3)
    n, c, hp, wp = 3, 4, 2, 3
    yconv = R.activate(rng.standard_normal((n, c, 2 * hp + 1, 2 * wp)), act)  # odd trailing row
    x, m = R.pool2x2_fwd(yconv, "max")
    i, h1, h2, nc = c * hp * wp, 7, 5, 4
    ws = [rng.standard_normal(sh) * 0.3 for sh in ((h1, i), (h1,), (h2, h1), (h2,), (nc, h2), (nc,))]
    labels = rng.integers(0, nc, n)
    dense = R.head_train(x, labels, *ws, m, yconv, act, "max")
    routed = R.head_train(x, labels, *ws, m, None, act, "max")
    assert routed["dz_conv"].shape == x.shape
    assert_close(routed["dz_conv"], dense["dx"] * R.activation_grad(x, act), atol=1e-15, rtol=1e-15, what="gz")
    assert_close(R.pool2x2_bwd(routed["dz_conv"], m, "max", yconv.shape[2:]), dense["dz_conv"], atol=1e-15,
                 rtol=1e-15, what="scattered gz")
    with pytest.raises(ValueError, match="max pooling"):
        R.head_train(x, labels, *ws, None, None, act, "avg")


def test_reference_routed_ops_refuse_mismatched_shapes():
    x, wt, y, _, m, gz = routed_case(1, 2, 8, 8, 3, 3, 3, "relu")
    with pytest.raises(ValueError, match="pooled size"):
        R.conv2d_bwd_weight_routed(x, gz, m, 4, 4)
    with pytest.raises(ValueError, match="argmax"):
        R.conv2d_bwd_data_routed(gz, wt, m[:, :1], x, "relu")


def num_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


@pytest.mark.parametrize("act", ACTS)
def test_routed_backward_of_two_layers_matches_finite_differences(act):
    """conv → act → max pool → conv → act → max pool → L = Σ proj·p2, backward through the routed ops only."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 2, 11, 12))
    w1, b1 = rng.standard_normal((3, 2, 3, 3)) * 0.5, rng.standard_normal(3) * 0.1
    w2, b2 = rng.standard_normal((4, 3, 2, 2)) * 0.5, rng.standard_normal(4) * 0.1
    proj = rng.standard_normal((2, 4, 1, 2))

    def forward():
        p1, m1 = R.pool2x2_fwd(R.conv2d_fwd(x, w1, b1, act), "max")
        p2, m2 = R.pool2x2_fwd(R.conv2d_fwd(p1, w2, b2, act), "max")
        return p1, m1, p2, m2

    def loss():
        return float((forward()[2] * proj).sum())

    p1, m1, p2, m2 = forward()
    if act == "relu":  # finite differences must not straddle a kink
        assert np.abs(R.conv2d_fwd(x, w1, b1, "identity")).min() > 1e-4
    gz2 = proj * R.activation_grad(p2, act)
    dw2, db2 = R.conv2d_bwd_weight_routed(p1, gz2, m2, 2, 2)
    gz1 = R.conv2d_bwd_data_routed(gz2, w2, m2, p1, act)
    dw1, db1 = R.conv2d_bwd_weight_routed(x, gz1, m1, 3, 3)
    for name, got, param in (("dw1", dw1, w1), ("db1", db1, b1), ("dw2", dw2, w2), ("db2", db2, b2)):
        num = num_grad(loss, param)
        assert np.abs(num).max() > 1e-3, name  # the check can fail: the gradient is not trivially 0
        assert_close(got, num, atol=1e-7, rtol=1e-5, what=name)


# ------------------------------------------------------------------------------------------ numpy backend


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", [1, 37])  # batch 1; two chunks of the numpy backend (32 + 5)
def test_numpy_routed_ops_match_reference(act, n):
    be = get_backend("numpy")
    x, wt, y, _, m, gz = routed_case(n, 3, 12, 11, 5, 3, 2, act, seed=n)
    y_below = R.activate(np.random.default_rng(1).standard_normal(x.shape), act)
    f = np.float32
    dw, db = nan_like(wt.shape), nan_like((wt.shape[0],))
    be.conv2d_bwd_weight_routed(x.astype(f), gz.astype(f), m, dw, db)
    rdw, rdb = R.conv2d_bwd_weight_routed(x.astype(f).astype(np.float64), gz.astype(f).astype(np.float64), m, 3, 2)
    assert_close(dw, rdw, *TOL["conv2d_bwd_weight"], what="dw")
    assert_close(db, rdb, *TOL["conv2d_bwd_weight"], what="db")
    out = nan_like(x.shape)
    be.conv2d_bwd_data_routed(gz.astype(f), wt.astype(f), m, y_below.astype(f), out, act)
    ref = R.conv2d_bwd_data_routed(gz.astype(f).astype(np.float64), wt.astype(f).astype(np.float64), m,
                                   y_below.astype(f).astype(np.float64), act)
    assert_close(out, ref, *TOL["conv2d_bwd_data"], what="gz_below")


@pytest.mark.parametrize("act", ACTS)
def test_numpy_fused_ops_without_yconv(act):
    """conv2d_pool_fwd with yconv=None pools the same map; head_train with yconv=None gives the routed
    gradient, and its other outputs equal the dense call's bit for bit."""
    be = get_backend("numpy")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 9, 10)).astype(np.float32)
    w, b = (rng.standard_normal((4, 2, 3, 3)) * 0.4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    yconv, p, m, p2, m2 = nan_like((3, 4, 7, 8)), nan_like((3, 4, 3, 4)), np.zeros((3, 4, 3, 4), np.uint8), \
        nan_like((3, 4, 3, 4)), np.zeros((3, 4, 3, 4), np.uint8)
    be.conv2d_pool_fwd(x, w, b, yconv, p, m, act, "max")
    be.conv2d_pool_fwd(x, w, b, None, p2, m2, act, "max")
    assert_equal(p2, p, "ypool without yconv")
    assert_equal(m2, m, "argmax without yconv")
    i, h1n, h2n, nc = 48, 7, 5, 4
    ws = [(rng.standard_normal(sh) * 0.3).astype(np.float32) for sh in ((h1n, i), (h1n,), (h2n, h1n), (h2n,),
                                                                      (nc, h2n), (nc,))]
    labels = rng.integers(0, nc, 3).astype(np.int32)
    state = np.zeros(16, np.int32)
    outs = {}
    for key, yc, dz in (("dense", yconv, nan_like(yconv.shape)), ("routed", None, nan_like(p.shape))):
        o = [nan_like(s) for s in ((3, h1n), (3, h2n), (3, nc))] + [dz] + [nan_like(a.shape) for a in ws] + \
            [nan_like((4, 2))]
        be.head_train(p, labels, *ws, *o[:3], m, yc, o[3], *o[4:10], o[10], state, act, "max")
        outs[key] = o
    for a, b_ in zip(outs["dense"][:3] + outs["dense"][4:10], outs["routed"][:3] + outs["routed"][4:10],
                     strict=True):
        assert_equal(b_, a, "head_train outputs other than dz_conv")
    assert_equal(outs["routed"][10][0], outs["dense"][10][0], "stats row 0")
    ref = R.head_train(p.astype(np.float64), labels, *[a.astype(np.float64) for a in ws], m, None, act, "max")
    assert_close(outs["routed"][3], ref["dz_conv"], *TOL["head_train"], what="routed gz")
    assert_close(R.pool2x2_bwd(outs["routed"][3], m, "max", (7, 8)), outs["dense"][3], 1e-7, 1e-6,
                 what="scattered gz vs dense dz_conv")
    with pytest.raises(ValueError, match="max pooling"):
        be.head_train(p, labels, *ws, *outs["routed"][:3], None, None, outs["routed"][3], *outs["routed"][4:10],
                      outs["routed"][10], state, act, "avg")


# ----------------------------------------------------------------------------------------------- model


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def test_routed_mode_selection():
    assert LeNet5(backend="numpy").routed
    assert not LeNet5(backend="numpy", routed=False).routed
    assert not LeNet5(backend="numpy", pool="avg").routed  # "auto": the dense step for avg
    assert not LeNet5(backend="numpy", fused=False).routed
    with pytest.raises(ValueError, match="max pooling"):
        LeNet5(backend="numpy", pool="avg", routed=True)
    with pytest.raises(ValueError, match="lacks"):
        LeNet5(backend="numpy", fused=False, routed=True)
    with pytest.raises(ValueError, match="routed must be"):
        LeNet5(backend="numpy", routed="yes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENET_GPU_ROUTED", "0")
        assert not LeNet5(backend="numpy").routed and LeNet5(backend="numpy", routed=True).routed
    ws = LeNet5(backend="numpy", step4=False).workspace(3)  # the nine-op routed step (the default is step4)
    assert ws.a1 is None and ws.a3 is None and ws.dz1 is None and ws.dz3 is None
    assert ws.gz3.shape == (3, 16, 5, 5) and ws.gz1.shape == (3, 6, 14, 14)


@pytest.mark.parametrize("act", ACTS)
def test_numpy_routed_step_equals_dense_step(act):
    """Three steps of the routed step and of the dense step from the same start: the same losses and
    gradients up to float32 summation order, and the parameters after them."""
    images, labels = batch(6, seed=2)
    models = [LeNet5(backend="numpy", activation=act, seed=4, routed=r) for r in (True, False)]
    for step in range(3):
        losses = [mdl.train_step(images, labels) for mdl in models]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6), step
        g = [mdl.backend.to_host(mdl.grads) for mdl in models]
        gv = [views(gg, models[0].cfg) for gg in g]
        for name in gv[0]:
            scale = np.abs(gv[1][name]).max()
            assert_close(gv[0][name], gv[1][name], atol=1e-5 * scale + 1e-12, rtol=1e-4, what=f"{name} step {step}")
    assert_close(models[0].parameters(), models[1].parameters(), atol=1e-6, rtol=1e-5, what="params")


def test_numpy_routed_run_is_deterministic_and_activations_work():
    images, labels = batch(40, seed=3)
    snaps = []
    for _ in range(2):
        model = LeNet5(backend="numpy", seed=1)
        data = model.upload_dataset(images, labels)
        model.begin_run(data, 8, shift=2)
        model.begin_epoch(data, np.random.default_rng(0).permutation(40))
        model.run_steps(data, 5)
        snaps.append((model.parameters(), model.step_stats(0, 5), model.backend.to_host(model.m)))
    for a, b in zip(snaps[0], snaps[1], strict=True):
        assert_equal(a, b, "two routed runs")
    dense = LeNet5(backend="numpy", seed=1, routed=False)
    dense.set_parameters(snaps[0][0])
    acts, ref = model.activations(images[:3]), dense.activations(images[:3])
    for k in ref:
        assert_equal(acts[k], ref[k], f"activations {k}")
