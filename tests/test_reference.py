"""The NumPy reference: finite differences in float64, hand-computed answers, edge rules."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from lenet_gpu import reference as R

ACTS = R.ACTIVATIONS
RNG = np.random.default_rng(1234)  # replaced before every test by _own_rng: no test depends on another's draws


@pytest.fixture(autouse=True)
def _own_rng(request):
    """Each test draws from its own generator, seeded by its own id (order-independent, reproducible)."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def num_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar f() w.r.t. every element of x (modified in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def away_from_kinks(z: np.ndarray, act: str) -> np.ndarray:
    """Push relu pre-activations away from 0 so finite differences don't straddle the kink."""
    if act == "relu":
        return np.where(np.abs(z) < 1e-3, 1e-3 * np.sign(z + 1e-12), z)
    return z


@pytest.mark.parametrize("act", ACTS)
def test_conv2d_bwd_matches_finite_differences(act):
    x = RNG.standard_normal((2, 2, 6, 7))
    w = RNG.standard_normal((3, 2, 3, 2)) * 0.5
    b = RNG.standard_normal(3) * 0.1
    proj = RNG.standard_normal((2, 3, 4, 6))  # L = Σ y·proj

    def loss():
        return float((R.conv2d_fwd(x, w, b, act) * proj).sum())

    y = R.conv2d_fwd(x, w, b, act)
    if act == "relu":  # no pre-activation on the kink
        assert np.all(np.abs(R.conv2d_fwd(x, w, b, "identity")) > 1e-4)
    dx, dw, db = R.conv2d_bwd(x, w, y, proj, act)
    assert rel_err(dx, num_grad(loss, x)) < 1e-6
    assert rel_err(dw, num_grad(loss, w)) < 1e-6
    assert rel_err(db, num_grad(loss, b)) < 1e-6


@pytest.mark.parametrize("act", ACTS)
def test_dense_bwd_matches_finite_differences(act):
    x = RNG.standard_normal((3, 7))
    w = RNG.standard_normal((5, 7)) * 0.4
    b = RNG.standard_normal(5) * 0.1
    proj = RNG.standard_normal((3, 5))

    def loss():
        return float((R.dense_fwd(x, w, b, act) * proj).sum())

    y = R.dense_fwd(x, w, b, act)
    dx, dw, db = R.dense_bwd(x, w, y, proj, act)
    assert rel_err(dx, num_grad(loss, x)) < 1e-6
    assert rel_err(dw, num_grad(loss, w)) < 1e-6
    assert rel_err(db, num_grad(loss, b)) < 1e-6


@pytest.mark.parametrize("mode", R.POOL_MODES)
@pytest.mark.parametrize("hw", [(6, 8), (5, 7)])
def test_pool2x2_bwd_matches_finite_differences(mode, hw):
    x = RNG.standard_normal((2, 3, *hw))  # continuous values: no ties
    proj = RNG.standard_normal((2, 3, hw[0] // 2, hw[1] // 2))

    def loss():
        return float((R.pool2x2_fwd(x, mode)[0] * proj).sum())

    _, am = R.pool2x2_fwd(x, mode)
    dx = R.pool2x2_bwd(proj, am, mode, out_shape=hw)
    assert dx.shape == x.shape
    assert rel_err(dx, num_grad(loss, x)) < 1e-6


def test_softmax_xent_matches_finite_differences():
    logits = RNG.standard_normal((4, 10)) * 3
    labels = np.array([0, 3, 9, 3])
    _, d = R.softmax_xent(logits, labels)
    assert rel_err(d, num_grad(lambda: R.softmax_xent(logits, labels)[0], logits)) < 1e-6


@pytest.mark.parametrize("act", ACTS)
def test_activation_grad_matches_finite_differences(act):
    z = away_from_kinks(RNG.standard_normal(50) * 2, act)
    eps = 1e-6
    num = (R.activate(z + eps, act) - R.activate(z - eps, act)) / (2 * eps)
    assert rel_err(R.activation_grad(R.activate(z, act), act), num) < 1e-6


# ----------------------------------------------------------------------------- known answers


def test_conv2d_known_answer():
    # 1 image, 1 channel 3×3, one 2×2 filter: by hand
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)  # 0 1 2 / 3 4 5 / 6 7 8
    w = np.array([[[[1.0, 0.0], [0.0, -1.0]]]])  # x[i,j] - x[i+1,j+1]
    y = R.conv2d_fwd(x, w, np.array([0.5]))
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), -4.0 + 0.5))
    y2 = R.conv2d_fwd(x, np.ones((1, 1, 2, 2)), np.zeros(1), "relu")
    np.testing.assert_array_equal(y2[0, 0], [[8, 12], [20, 24]])
    # gradients of sum(y2) with identity: dw[r,s] = Σ over the 4 windows of x at offset (r,s)
    dx, dw, db = R.conv2d_bwd(x, np.ones((1, 1, 2, 2)), y2, np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(dw[0, 0], [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(db, [4.0])
    np.testing.assert_array_equal(dx[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_dense_known_answer():
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]])
    y = R.dense_fwd(x, w, np.array([0.0, 1.0, -3.0]), "relu")
    np.testing.assert_array_equal(y, [[0.0, 2.5, 0.0]])
    dx, dw, db = R.dense_bwd(x, w, y, np.ones((1, 3)), "relu")
    np.testing.assert_array_equal(db, [0, 1, 0])
    np.testing.assert_array_equal(dw, [[0, 0], [1, 2], [0, 0]])
    np.testing.assert_array_equal(dx, [[0.5, 0.5]])


def test_pool_known_answer_and_avg():
    x = np.array([[[[1.0, 5.0, 2.0, 2.0], [3.0, 4.0, 2.0, 2.0]]]])
    y, am = R.pool2x2_fwd(x, "max")
    np.testing.assert_array_equal(y, [[[[5.0, 2.0]]]])
    np.testing.assert_array_equal(am, [[[[1, 0]]]])
    ya, ama = R.pool2x2_fwd(x, "avg")
    assert ama is None
    np.testing.assert_array_equal(ya, [[[[13 / 4, 2.0]]]])
    dx = R.pool2x2_bwd(np.array([[[[10.0, 20.0]]]]), am, "max")
    np.testing.assert_array_equal(dx, [[[[0, 10, 20, 0], [0, 0, 0, 0]]]])
    dxa = R.pool2x2_bwd(np.array([[[[4.0, 8.0]]]]), None, "avg")
    np.testing.assert_array_equal(dxa, [[[[1, 1, 2, 2], [1, 1, 2, 2]]]])


def test_pool_argmax_first_maximum_wins():
    # every tie pattern of a 2×2 window: the first (row-major) maximum wins
    pats = np.array([[a, b, c, d] for a in (0, 1) for b in (0, 1) for c in (0, 1) for d in (0, 1)], float)
    x = pats.reshape(16, 1, 2, 2)  # windows (a b / c d)
    _, am = R.pool2x2_fwd(x, "max")
    want = [int(np.flatnonzero(p == p.max())[0]) for p in pats]
    np.testing.assert_array_equal(am.ravel(), want)
    assert am.dtype == np.uint8
    # a flat background: all zeros → tap 0
    _, am0 = R.pool2x2_fwd(np.zeros((1, 1, 4, 4)), "max")
    assert np.all(am0 == 0)


def test_softmax_known_answer_and_extremes():
    loss, d = R.softmax_xent(np.zeros((2, 10)), np.array([1, 2]))
    assert loss == pytest.approx(np.log(10))
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-15)
    big = np.array([[1e4, -1e4] + [0.0] * 8, [-1e4, 1e4] + [0.0] * 8])
    for dtype in (np.float32, np.float64):
        loss, d = R.softmax_xent(big.astype(dtype), np.array([1, 1]))
        assert np.isfinite(loss) and np.all(np.isfinite(d))
        assert loss == pytest.approx(1e4, rel=1e-6)  # one row is right, one is 2e4 off: mean 1e4
        assert d.dtype == dtype


def test_activations_known_values():
    z = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(R.activate(z, "relu"), [0, 0, 2])
    np.testing.assert_allclose(R.activate(z, "lecun_tanh"), 1.7159 * np.tanh(2 * z / 3))
    np.testing.assert_allclose(R.activate(z, "sigmoid"), 1 / (1 + np.exp(-z)))
    # sigmoid at huge |z| neither overflows nor NaNs
    s = R.activate(np.array([-1000.0, 1000.0], np.float32), "sigmoid")
    assert np.all(np.isfinite(s)) and s[0] == 0 and s[1] == 1
    with pytest.raises(ValueError, match="unknown activation"):
        R.activate(z, "gelu")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_keep_dtype(dtype):
    x = RNG.standard_normal((1, 2, 6, 6)).astype(dtype)
    w = RNG.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = np.zeros(3, dtype)
    y = R.conv2d_fwd(x, w, b, "tanh")
    assert y.dtype == dtype
    assert all(a.dtype == dtype for a in R.conv2d_bwd(x, w, y, y, "tanh"))
    assert R.pool2x2_fwd(y, "max")[0].dtype == dtype
    assert R.pool2x2_fwd(y, "avg")[0].dtype == dtype
    xd = x.reshape(1, -1)
    wd = RNG.standard_normal((4, xd.shape[1])).astype(dtype)
    yd = R.dense_fwd(xd, wd, np.zeros(4, dtype), "sigmoid")
    assert yd.dtype == dtype
    assert all(a.dtype == dtype for a in R.dense_bwd(xd, wd, yd, yd, "sigmoid"))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="shapes do not agree"):
        R.conv2d_fwd(np.zeros((1, 2, 5, 5)), np.zeros((1, 3, 3, 3)), np.zeros(1))
    with pytest.raises(ValueError, match="shapes do not agree"):
        R.dense_fwd(np.zeros((1, 4)), np.zeros((2, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        R.softmax_xent(np.zeros((2, 10)), np.array([0, 10]))


def test_optimizers_match_torch_formulas():
    p, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    m, v = np.zeros(2), np.zeros(2)
    p1, m1, v1 = R.adam_update(p, g, m, v, t=1, lr=0.1)
    # first Adam step moves each parameter by lr·sign(g) (bias-corrected m/√v = g/|g|)
    np.testing.assert_allclose(p1, p - 0.1 * np.sign(g), rtol=1e-6)
    p2, buf = R.sgd_update(p, g, np.zeros(2), lr=0.1, momentum=0.9, weight_decay=0.5)
    np.testing.assert_allclose(buf, g + 0.5 * p)
    np.testing.assert_allclose(p2, p - 0.1 * (g + 0.5 * p))


# ------------------------------------------------------------------------- fused-op compositions


@pytest.mark.parametrize("act", [a for a in ACTS if a != "identity"])
@pytest.mark.parametrize("mode", R.POOL_MODES)
def test_head_train_matches_finite_differences(act, mode):
    """head_train's gradients (the weights, and dz_conv at the conv's pre-activation below the pooling)
    against central differences of its own loss: x = pool(act(z)) with z the conv pre-activation."""
    rng = np.random.default_rng(5)
    n, c, h, w, h1, h2 = 3, 2, 4, 6, 5, 4
    z = away_from_kinks(rng.standard_normal((n, c, h, w)), act)
    labels = rng.integers(0, 10, n)
    w1, b1 = rng.standard_normal((h1, c * 2 * 3)) * 0.5, rng.standard_normal(h1) * 0.1
    w2, b2 = rng.standard_normal((h2, h1)) * 0.5, rng.standard_normal(h2) * 0.1
    w3, b3 = rng.standard_normal((10, h2)) * 0.5, rng.standard_normal(10) * 0.1

    def run():
        yconv = R.activate(z, act)
        x, am = R.pool2x2_fwd(yconv, mode)
        return R.head_train(x, labels, w1, b1, w2, b2, w3, b3, am, yconv, act, mode)

    out = run()
    loss = lambda: run()["loss_sum"] / n  # noqa: E731 - the gradients are of the mean loss
    assert rel_err(out["dz_conv"], num_grad(loss, z)) < 1e-5
    grads = {"dw1": w1, "db1": b1, "dw2": w2, "db2": b2, "dw3": w3, "db3": b3}
    assert {k for k in out if k.startswith("d")} == {"dz_conv", "dx", "dlogits", *grads}, sorted(out)  # all of them
    yc0 = R.activate(z, act)
    x0, am0 = R.pool2x2_fwd(yc0, mode)
    loss_x = lambda: R.head_train(x0, labels, w1, b1, w2, b2, w3, b3, am0, yc0, act, mode)["loss_sum"] / n  # noqa: E731
    assert rel_err(out["dx"].reshape(x0.shape), num_grad(loss_x, x0)) < 1e-5
    lg = out["logits"].copy()
    assert rel_err(out["dlogits"], num_grad(lambda: R.softmax_xent(lg, labels)[0], lg)) < 1e-5
    for name, p in grads.items():
        assert rel_err(out[name], num_grad(loss, p)) < 1e-5, name
    assert out["correct"] == int((np.argmax(out["logits"], 1) == labels).sum())


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", R.POOL_MODES)
def test_conv2d_bwd_data_pool_matches_finite_differences(act, mode):
    """dz_below of L = Σ g·conv(pool(act(z_below))) w.r.t. z_below equals conv2d_bwd_data_pool(g, ...)."""
    rng = np.random.default_rng(6)
    z = away_from_kinks(rng.standard_normal((2, 3, 9, 10)), act)  # odd height: a row no window covers
    wt, b = rng.standard_normal((4, 3, 3, 2)), np.zeros(4)
    g = rng.standard_normal((2, 4, 2, 4))  # conv output of the (2,3,4,5) pooled map

    def loss():
        pooled, _ = R.pool2x2_fwd(R.activate(z, act), mode)
        return float((g * R.conv2d_fwd(pooled, wt, b)).sum())

    yconv = R.activate(z, act)
    _, am = R.pool2x2_fwd(yconv, mode)
    got = R.conv2d_bwd_data_pool(g, wt, am, yconv, mode, act)
    assert got.shape == z.shape
    assert rel_err(got, num_grad(loss, z)) < 1e-6


def test_lenet_fwd_is_the_model_forward():
    from lenet_gpu import LeNet5
    from lenet_gpu.spec import views

    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for act, mode in (("relu", "max"), ("tanh", "avg")):
        model = LeNet5(backend="numpy", activation=act, pool=mode, seed=4, mean=0.2, std=0.35)
        params = views(model.parameters(), model.cfg)
        got = R.lenet_fwd(images, params, 0.2, 0.35, act, mode)
        np.testing.assert_allclose(got, model.logits(images), rtol=1e-4, atol=1e-5)
