"""The routed (sparse max-pool) backward, docs/routed_backward.md: the float64 references against the dense
references and finite differences, the numpy backend's routed ops against the references, and the model's
routed step against its dense step."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import reference as R

from .parity import assert_close

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
