"""The numpy backend, op by op, against the float64 reference (the same checks the GPU backends get)."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import reference as R
from lenet_gpu.backends import get_backend
from lenet_gpu.stepstate import HostState, advance, advance_by, schedule_table

from . import host_checks as H
from .host_checks import f64
from .parity import TOL, assert_close, assert_equal, nan_like, rand

ACTS = R.ACTIVATIONS
BE = get_backend("numpy")
CONV_SHAPES = [  # (N, C, H, W, K, R, S): LeNet's C1 and C3, batch 1, odd sizes
    (1, 1, 32, 32, 6, 5, 5),
    (3, 6, 14, 14, 16, 5, 5),
    (2, 3, 9, 7, 5, 3, 4),
]



@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_conv2d(shape, act):
    n, c, h, w, k, r, s = shape
    x, wt, b = rand((n, c, h, w), 1), rand((k, c, r, s), 2, 0.3), rand((k,), 3, 0.1)
    y = nan_like((n, k, h - r + 1, w - s + 1))
    BE.conv2d_fwd(x, wt, b, y, act)
    ref = R.conv2d_fwd(*f64(x, wt, b), act)
    assert_close(y, ref, *TOL["conv2d_fwd"], what=f"conv2d_fwd {shape} {act}")
    dz = rand(y.shape, 4)
    dx = nan_like(x.shape)
    dw, db = nan_like(wt.shape), nan_like(b.shape)
    BE.conv2d_bwd_data(dz, wt, dx)
    BE.conv2d_bwd_weight(x, dz, dw, db)
    rdx, rdw, rdb = R.conv2d_bwd(*f64(x, wt), ref, dz.astype(np.float64), "identity")
    assert_close(dx, rdx, *TOL["conv2d_bwd_data"], what="conv2d_bwd_data")
    assert_close(dw, rdw, *TOL["conv2d_bwd_weight"], what="conv2d_bwd_weight dw")
    assert_close(db, rdb, *TOL["conv2d_bwd_weight"], what="conv2d_bwd_weight db")


@pytest.mark.parametrize("mode", R.POOL_MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 6, 28, 28), (3, 16, 10, 10), (2, 3, 7, 9)])
def test_pool2x2(shape, act, mode):
    H.check_pool2x2(BE, shape, act, mode)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 400, 120), (5, 120, 84), (3, 17, 10)])
def test_dense(shape, act):
    H.check_dense(BE, shape, act)


def _state(**kw) -> np.ndarray:
    return HostState(**kw).to_array()


@pytest.mark.parametrize("n", [1, 7, 64])
def test_softmax_xent(n):
    H.check_softmax_xent(BE, n)


def test_softmax_xent_extreme_logits():
    H.check_softmax_xent_extreme_logits(BE)


@pytest.mark.parametrize("shift", [0, 2, 4])
def test_batch_prepare(shift):
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 9).astype(np.uint8)
    perm = np.array([4, 2, 8, 0, 1], np.int32)
    x, y = nan_like((3, 1, 32, 32)), nan_like((3,), np.int32)
    BE.batch_prepare(images, labels, perm, _state(offset=1, epoch=5, seed=2**31 + 3, shift=shift), x, y, 0.1307,
                     0.3081)
    ref, ry = R.batch_prepare(images, labels, perm, 1, 3, 0.1307, 0.3081, seed=2**31 + 3, epoch=5, max_shift=shift)
    assert_close(x, ref, *TOL["batch_prepare"], what="batch_prepare x")
    assert_equal(y, labels[[2, 8, 0]].astype(np.int32), what="labels")
    assert_equal(y, ry, what="labels vs reference")


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_optimizers(wd):
    p, g = rand((70,), 14), rand((70,), 15)
    m, v = rand((70,), 16, 0.1), np.abs(rand((70,), 17, 0.1))
    p1, m1, v1 = p.copy(), m.copy(), v.copy()
    t = 3  # the state's STEP is t − 1 = 2; the table starts at step 1, so row 1 is read
    sched = schedule_table([5e-3, 1e-2, 7e-3], 1, 0.9, 0.999)
    BE.adam_step(p1, g, m1, v1, sched, _state(step=t - 1, sched_base=1), 0.9, 0.999, 1e-8, wd)
    rp, rm, rv = R.adam_update(*f64(p, g, m, v), t=t, lr=1e-2, weight_decay=wd)
    for got, want, name in ((p1, rp, "p"), (m1, rm, "m"), (v1, rv, "v")):
        assert_close(got, want, *TOL["adam_step"], what=f"adam {name}")
    p2, m2 = p.copy(), m.copy()
    BE.sgd_step(p2, g, m2, schedule_table([0.05], 0, 0.9, 0.999), _state(step=40), 0.9, wd)  # clamped: row 0
    rp, rm = R.sgd_update(*f64(p, g, m), lr=0.05, momentum=0.9, weight_decay=wd)
    assert_close(p2, rp, *TOL["sgd_step"], what="sgd p")
    assert_close(m2, rm, *TOL["sgd_step"], what="sgd m")


def test_step_advance_wraps_at_the_end_of_an_epoch():
    st = _state(step=10, step_in_epoch=2, offset=16, epoch=4, steps_per_epoch=3, seed=9, shift=2)
    BE.step_advance(st, 8)
    assert HostState.from_array(st) == HostState(step=11, step_in_epoch=0, offset=0, epoch=5, steps_per_epoch=3,
                                                 seed=9, shift=2)
    BE.step_advance(st, 8)
    assert HostState.from_array(st) == advance(HostState(step=11, epoch=5, steps_per_epoch=3, seed=9, shift=2), 8)
    assert advance_by(HostState(step_in_epoch=1, steps_per_epoch=3), 8, 7) == HostState(
        step=7, step_in_epoch=2, offset=16, epoch=2, steps_per_epoch=3)


def test_bad_options_are_rejected():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="pool mode"):
        BE.pool2x2_fwd(x, np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.uint8), "min")
    with pytest.raises(ValueError, match="activation"):
        BE.dense_fwd(np.zeros((1, 2), np.float32), np.zeros((2, 2), np.float32), np.zeros(2, np.float32),
                     np.zeros((1, 2), np.float32), "gelu")
