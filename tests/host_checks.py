"""Op checks shared by the tests of the host backends (numpy, cpu): the same inputs and the same assertions
against the float64 reference, NaN-poisoned outputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from lenet_gpu import reference as R
from lenet_gpu.stepstate import HostState

from .parity import TOL, assert_close, assert_equal, nan_like, rand


def f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.astype(np.float64) for a in arrays]


def activated(shape: tuple[int, ...], act: str, seed: int) -> np.ndarray:
    """A plausible output of ``act`` (so that act'(y) means something), float32."""
    return R.activate(rand(shape, seed).astype(np.float64), act).astype(np.float32)


def check_pool2x2(be: Any, shape: tuple[int, int, int, int], act: str, mode: str) -> None:
    """pool2x2_fwd (with ties: the first maximum wins) and pool2x2_bwd through act' (no argmax for avg)."""
    n, c, h, w = shape
    yconv = activated(shape, act, 5)
    yconv[0, 0, :4, :4] = yconv[0, 0, 0, 0]  # a flat patch: ties, first maximum wins
    out = nan_like((n, c, h // 2, w // 2))
    am = nan_like(out.shape, np.uint8)
    be.pool2x2_fwd(yconv, out, am, mode)
    ref, ram = R.pool2x2_fwd(yconv.astype(np.float64), mode)
    assert_close(out, ref, *TOL["pool2x2_fwd"], what=f"pool2x2_fwd {mode}")
    if mode == "max":
        assert_equal(am, ram, what="argmax")
    dy = rand(out.shape, 6)
    dz = nan_like(shape)
    be.pool2x2_bwd(dy, am if mode == "max" else None, yconv, dz, mode, act)
    rdz = R.pool2x2_bwd(dy.astype(np.float64), ram, mode, out_shape=(h, w)) * R.activation_grad(
        yconv.astype(np.float64), act)
    assert_close(dz, rdz, *TOL["pool2x2_bwd"], what=f"pool2x2_bwd {mode} {act}")


def check_dense(be: Any, shape: tuple[int, int, int], act: str) -> None:
    """dense_fwd, then dense_bwd with dx and without it (the same dw, db)."""
    n, i, o = shape
    x, w, b = rand((n, i), 7), rand((o, i), 8, 0.2), rand((o,), 9, 0.1)
    y = nan_like((n, o))
    be.dense_fwd(x, w, b, y, act)
    ref = R.dense_fwd(*f64(x, w, b), act)
    assert_close(y, ref, *TOL["dense_fwd"], what=f"dense_fwd {act}")
    dy = rand((n, o), 10)
    dx, dw, db = nan_like(x.shape), nan_like(w.shape), nan_like(b.shape)
    be.dense_bwd(x, w, y, dy, dx, dw, db, act)
    rdx, rdw, rdb = R.dense_bwd(*f64(x, w, y, dy), act)
    for got, want, name in ((dx, rdx, "dx"), (dw, rdw, "dw"), (db, rdb, "db")):
        assert_close(got, want, *TOL["dense_bwd"], what=f"dense_bwd {name} {act}")
    dw2, db2 = nan_like(w.shape), nan_like(b.shape)
    be.dense_bwd(x, w, y, dy, None, dw2, db2, act)  # dx is optional
    assert_equal(dw2, dw)


def check_softmax_xent(be: Any, n: int) -> None:
    """dlogits against the reference; the step's stats row (STEP_IN_EPOCH mod rows) overwritten, the others
    untouched; a row of ties predicts class 0."""
    logits = rand((n, 10), 11, 4.0)
    logits[0, :] = 0.0  # a row of ties: the first maximum (class 0) is the prediction
    labels = np.random.default_rng(12).integers(0, 10, n).astype(np.int32)
    d = nan_like(logits.shape)
    stats = nan_like((5, 2))
    be.softmax_xent(logits, labels, d, stats, HostState(step_in_epoch=7).to_array())  # row 7 mod 5 = 2
    loss, rd = R.softmax_xent(logits.astype(np.float64), labels)
    assert_close(d, rd, *TOL["softmax_xent"], what="dlogits")
    assert_close(stats[2, 0], loss * n, *TOL["softmax_xent"], what="loss sum")
    assert stats[2, 1] == int((np.argmax(logits, axis=1) == labels).sum())
    assert np.isnan(np.delete(stats, 2, axis=0)).all()  # the other rows are untouched


def check_softmax_xent_extreme_logits(be: Any) -> None:
    """Logits of ±1e4: finite gradients and loss, the right count."""
    logits = np.array([[1e4, -1e4] + [0] * 8, [-1e4, 1e4] + [0] * 8], np.float32)
    d, stats = nan_like(logits.shape), np.zeros((1, 2), np.float32)
    be.softmax_xent(logits, np.array([0, 0], np.int32), d, stats, HostState().to_array())
    assert np.all(np.isfinite(d)) and np.isfinite(stats[0, 0])
    assert stats[0, 1] == 1
