"""Per-op parity checks of the numba backend against the float64 reference (lenet_gpu.reference).

Each ``check_*`` takes a backend and shapes, makes seeded inputs, fills the outputs with NaN, runs
the op once and compares with tests/parity.py tolerances. It also checks that the launch passed
exactly the argument types of the kernel's declared signature (what the compile checks compile), so
the PTX checked statically is the code that runs. Used by the simulator tests and the GPU tests alike.
"""

from __future__ import annotations

import numpy as np
from numba.core import sigutils

from lenet_gpu import reference as R
from lenet_gpu.backends.numba_backend import SIGNATURES
from tests.parity import TOL, assert_close, assert_equal, nan_like, rand

F64 = np.float64
#: avg pooling sums four float32 taps (rounded) before ×0.25, so it is not bit-exact against the
#: float64 reference as max pooling is: a few ulps of the result
POOL_AVG_TOL = (1e-6, 1e-6)


def _f64(*arrays):
    return [a.astype(F64) for a in arrays]


def launched(be, fn, *args, **kwargs):
    """Run one op, check it made exactly one launch, and that the launch's argument types are the
    kernel's declared signature."""
    be.launch_log = []
    before = be.counters.launches
    fn(*args, **kwargs)
    assert be.counters.launches == before + 1
    assert len(be.launch_log) == 1
    name, types = be.launch_log[0]
    be.launch_log = None
    want, _ = sigutils.normalize_signature(SIGNATURES[name])
    assert tuple(types) == tuple(want), f"{name}: launched with {types}, declared {want}"
    return name


def check_batch_prepare(be, n, b, offset, seed=0, variant=None):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    mean, std = 0.1307, 0.3081
    x = be.to_device(nan_like((b, 1, 32, 32)))
    y = be.to_device(nan_like((b,), np.int32))
    launched(be, be.batch_prepare, be.to_device(images), be.to_device(labels), be.to_device(perm), offset, x, y,
             mean, std, variant=variant)
    idx = perm[offset : offset + b]
    ref = (np.pad(images[idx].astype(F64), ((0, 0), (2, 2), (2, 2))) / 255.0 - mean) / std
    assert_close(be.to_host(x), ref[:, None], *TOL["batch_prepare"], "batch_prepare x")
    assert_equal(be.to_host(y), labels[idx].astype(np.int32), "batch_prepare y")


def check_conv2d_fwd(be, xshape, wshape, act, variant, seed=0):
    x, w, b = rand(xshape, seed), rand(wshape, seed + 1, 0.5), rand(wshape[:1], seed + 2)
    n, _, h, wd = xshape
    y = be.to_device(nan_like((n, wshape[0], h - wshape[2] + 1, wd - wshape[3] + 1)))
    launched(be, be.conv2d_fwd, be.to_device(x), be.to_device(w), be.to_device(b), y, act, variant=variant)
    ref = R.conv2d_fwd(*_f64(x, w, b), act)
    assert_close(be.to_host(y), ref, *TOL["conv2d_fwd"], f"conv2d_fwd {variant} {act} {xshape} {wshape}")


def check_conv2d_bwd_data(be, xshape, wshape, variant, seed=0):
    n, _, h, wd = xshape
    yshape = (n, wshape[0], h - wshape[2] + 1, wd - wshape[3] + 1)
    w, dz = rand(wshape, seed), rand(yshape, seed + 1)
    dx = be.to_device(nan_like(xshape))
    launched(be, be.conv2d_bwd_data, be.to_device(dz), be.to_device(w), dx, variant=variant)
    ref, _, _ = R.conv2d_bwd(np.zeros(xshape), w.astype(F64), np.zeros(yshape), dz.astype(F64), "identity")
    assert_close(be.to_host(dx), ref, *TOL["conv2d_bwd_data"], f"conv2d_bwd_data {variant} {xshape} {wshape}")


def check_conv2d_bwd_weight(be, xshape, wshape, variant, seed=0, dz_scale=1.0):
    n, _, h, wd = xshape
    yshape = (n, wshape[0], h - wshape[2] + 1, wd - wshape[3] + 1)
    x, dz = rand(xshape, seed), rand(yshape, seed + 1, dz_scale)
    dw = be.to_device(nan_like(wshape))
    db = be.to_device(nan_like(wshape[:1]))
    launched(be, be.conv2d_bwd_weight, be.to_device(x), be.to_device(dz), dw, db, variant=variant)
    _, rdw, rdb = R.conv2d_bwd(x.astype(F64), np.zeros(wshape), np.zeros(yshape), dz.astype(F64), "identity")
    what = f"conv2d_bwd_weight {variant} {xshape} {wshape}"
    assert_close(be.to_host(dw), rdw, *TOL["conv2d_bwd_weight"], what + " dw")
    assert_close(be.to_host(db), rdb, *TOL["conv2d_bwd_weight"], what + " db")


def _pool_input(shape, seed):
    """Small integers: many ties inside windows, so the first-maximum rule is exercised."""
    return np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float32)


def check_pool2x2_fwd(be, xshape, mode, variant, seed=0):
    x = _pool_input(xshape, seed)
    n, c, h, w = xshape
    y = be.to_device(nan_like((n, c, h // 2, w // 2)))
    am = be.to_device(nan_like((n, c, h // 2, w // 2), np.uint8))
    launched(be, be.pool2x2_fwd, be.to_device(x), y, am, mode, variant=variant)
    ref, ref_am = R.pool2x2_fwd(x.astype(F64), mode)
    what = f"pool2x2_fwd {variant} {mode} {xshape}"
    if mode == "max":
        assert_close(be.to_host(y), ref, *TOL["pool2x2_fwd"], what)
        assert_equal(be.to_host(am), ref_am, what + " argmax")
    else:
        assert_close(be.to_host(y), ref, *POOL_AVG_TOL, what)
        assert np.all(be.to_host(am) == 255), what + ": avg pooling wrote argmax"


def check_pool2x2_bwd(be, xshape, mode, act, variant, seed=0):
    n, c, h, w = xshape
    pshape = (n, c, h // 2, w // 2)
    _, am = R.pool2x2_fwd(_pool_input(xshape, seed).astype(F64), "max")
    am = am.astype(np.uint8)
    yconv = R.activate(rand(xshape, seed + 1).astype(F64), act).astype(np.float32)
    dy = rand(pshape, seed + 2)
    dz = be.to_device(nan_like(xshape))
    launched(be, be.pool2x2_bwd, be.to_device(dy), be.to_device(am), be.to_device(yconv), dz, mode, act,
             variant=variant)
    ref = R.pool2x2_bwd(dy.astype(F64), am, mode, (h, w)) * R.activation_grad(yconv.astype(F64), act)
    assert_close(be.to_host(dz), ref, *TOL["pool2x2_bwd"], f"pool2x2_bwd {variant} {mode} {act} {xshape}")


def check_dense_fwd(be, n, i, o, act, variant, seed=0):
    x, w, b = rand((n, i), seed), rand((o, i), seed + 1, 0.3), rand((o,), seed + 2)
    y = be.to_device(nan_like((n, o)))
    launched(be, be.dense_fwd, be.to_device(x), be.to_device(w), be.to_device(b), y, act, variant=variant)
    ref = R.dense_fwd(*_f64(x, w, b), act)
    assert_close(be.to_host(y), ref, *TOL["dense_fwd"], f"dense_fwd {variant} {act} {(n, i, o)}")


def check_dense_bwd(be, n, i, o, act, with_dx, variant, seed=0):
    x, w = rand((n, i), seed), rand((o, i), seed + 1, 0.3)
    y = R.activate(rand((n, o), seed + 2).astype(F64), act).astype(np.float32)
    dy = rand((n, o), seed + 3)
    dx = be.to_device(nan_like((n, i))) if with_dx else None
    dw, db = be.to_device(nan_like((o, i))), be.to_device(nan_like((o,)))
    launched(be, be.dense_bwd, be.to_device(x), be.to_device(w), be.to_device(y), be.to_device(dy), dx, dw, db,
             act, variant=variant)
    rdx, rdw, rdb = R.dense_bwd(*_f64(x, w, y, dy), act)
    what = f"dense_bwd {variant} {act} {(n, i, o)}"
    if with_dx:
        assert_close(be.to_host(dx), rdx, *TOL["dense_bwd"], what + " dx")
    assert_close(be.to_host(dw), rdw, *TOL["dense_bwd"], what + " dw")
    assert_close(be.to_host(db), rdb, *TOL["dense_bwd"], what + " db")


def check_softmax_xent(be, n, ncls, variant, seed=0):
    logits = rand((n, ncls), seed, 3.0)
    logits[0, 1] = logits[0, 0] = logits[0].max() + 1  # a tie for the maximum: the first one counts
    labels = np.random.default_rng(seed).integers(0, ncls, n).astype(np.int32)
    labels[0] = 1
    d = be.to_device(nan_like((n, ncls)))
    stats = be.to_device(np.array([1.5, 2.0], np.float32))  # accumulates: += the batch's sums
    launched(be, be.softmax_xent, be.to_device(logits), be.to_device(labels), d, stats, variant=variant)
    loss, rd = R.softmax_xent(logits.astype(F64), labels)
    correct = int((np.argmax(logits, axis=1) == labels).sum())
    st = be.to_host(stats)
    assert_close(be.to_host(d), rd, *TOL["softmax_xent"], f"softmax_xent {variant} dlogits")
    assert_close(st[0] - 1.5, loss * n, *TOL["softmax_xent"], "softmax_xent loss sum")
    assert st[1] - 2.0 == correct, f"correct count {st[1] - 2.0} != {correct}"


def check_adam_step(be, size, weight_decay, variant, seed=0):
    p, g, m = rand((size,), seed), rand((size,), seed + 1), rand((size,), seed + 2, 0.1)
    v = np.abs(rand((size,), seed + 3, 0.01))
    lr, b1, b2, eps, t = 1e-2, 0.9, 0.999, 1e-8, 3
    dp, dm, dv = be.to_device(p), be.to_device(m), be.to_device(v)
    launched(be, be.adam_step, dp, be.to_device(g), dm, dv, lr, b1, b2, eps, weight_decay, 1 - b1**t, 1 - b2**t,
             variant=variant)
    rp, rm, rv = R.adam_update(*_f64(p, g, m, v), t, lr, b1, b2, eps, weight_decay)
    tol = TOL["adam_step"]
    assert_close(be.to_host(dm), rm, *tol, "adam m")
    assert_close(be.to_host(dv), rv, *tol, "adam v")
    assert_close(be.to_host(dp), rp, *tol, "adam p")


def check_sgd_step(be, size, weight_decay, variant, seed=0):
    p, g, m = rand((size,), seed), rand((size,), seed + 1), rand((size,), seed + 2, 0.1)
    dp, dm = be.to_device(p), be.to_device(m)
    launched(be, be.sgd_step, dp, be.to_device(g), dm, 1e-2, 0.9, weight_decay, variant=variant)
    rp, rm = R.sgd_update(*_f64(p, g, m), 1e-2, 0.9, weight_decay)
    assert_close(be.to_host(dm), rm, *TOL["sgd_step"], "sgd m")
    assert_close(be.to_host(dp), rp, *TOL["sgd_step"], "sgd p")


def check_conv2d_pool_fwd(be, xshape, wshape, act, mode, variant, with_y=True, seed=0):
    """The fused op: y against the reference convolution; the pooled output and argmax against the
    pooling of the kernel's own y (so max and argmax are exact), and the pooled output against the
    reference too."""
    x, w, b = rand(xshape, seed), rand(wshape, seed + 1, 0.5), rand(wshape[:1], seed + 2)
    if act == "relu":
        b -= 2.0  # many zeros after relu: ties inside windows, where the first maximum must win
    n, _, h, wd = xshape
    yshape = (n, wshape[0], h - wshape[2] + 1, wd - wshape[3] + 1)
    pshape = (n, wshape[0], yshape[2] // 2, yshape[3] // 2)
    y = be.to_device(nan_like(yshape)) if with_y else None
    yp = be.to_device(nan_like(pshape))
    am = be.to_device(nan_like(pshape, np.uint8))
    launched(be, be.conv2d_pool_fwd, be.to_device(x), be.to_device(w), be.to_device(b), y, yp, am, act, mode,
             variant=variant)
    what = f"conv2d_pool_fwd {variant} {act} {mode} {xshape} {wshape}"
    ref_y = R.conv2d_fwd(*_f64(x, w, b), act)
    ref_p, _ = R.pool2x2_fwd(ref_y, mode)
    assert_close(be.to_host(yp), ref_p, *TOL["conv2d_fwd"], what + " pooled vs reference")
    if not with_y:
        return
    got_y = be.to_host(y)
    assert_close(got_y, ref_y, *TOL["conv2d_fwd"], what + " y")
    own_p, own_am = R.pool2x2_fwd(got_y.astype(F64), mode)
    if mode == "max":
        assert_close(be.to_host(yp), own_p, 0.0, 0.0, what + " pooled vs its own y")
        assert_equal(be.to_host(am), own_am, what + " argmax")
    else:
        assert_close(be.to_host(yp), own_p, *POOL_AVG_TOL, what + " pooled vs its own y")
        assert np.all(be.to_host(am) == 255), what + ": avg pooling wrote argmax"
