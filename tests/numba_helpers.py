"""Per-op parity checks of the numba backend against the float64 reference (lenet_gpu.reference).

Each ``check_*`` takes a backend and shapes, makes seeded inputs, fills the outputs with NaN, runs
the op once and compares with tests/parity.py tolerances. It also checks that the launch passed
exactly the argument types of the kernel's declared signature (what the compile checks compile), so
the PTX checked statically is the code that runs. Used by the simulator tests and the GPU tests alike.
"""

from __future__ import annotations

import numpy as np
from numba import cuda
from numba.core import sigutils

from lenet_gpu import reference as R
from lenet_gpu.backends.numba_backend import SIGNATURES, batch
from lenet_gpu.stepstate import SCHED_COLS, HostState, advance, sched_row
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


def state_array(**words) -> np.ndarray:
    """A step state (int32 words) with the given fields (lenet_gpu.stepstate.HostState's names)."""
    return HostState(**words).to_array()


def check_batch_prepare(be, n, b, offset, seed=0, epoch=0, shift=0, variant=None, data_seed=0):
    """x, y against reference.batch_prepare with the state's OFFSET, EPOCH, SEED, SHIFT; an OFFSET + b past
    the permutation's end wraps (the kernel reads perm[(OFFSET + r) mod M])."""
    rng = np.random.default_rng(data_seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    mean, std = 0.1307, 0.3081
    state = state_array(offset=offset, epoch=epoch, seed=seed, shift=shift, step=11, step_in_epoch=3)
    dstate = be.to_device(state)
    x = be.to_device(nan_like((b, 1, 32, 32)))
    y = be.to_device(nan_like((b,), np.int32))
    launched(be, be.batch_prepare, be.to_device(images), be.to_device(labels), be.to_device(perm), dstate, x, y,
             mean, std, variant=variant)
    wrapped = np.concatenate([perm] * (1 + (offset + b) // n))  # perm[(offset + r) mod n] = wrapped[offset + r]
    ref_x, ref_y = R.batch_prepare(images, labels, wrapped, offset, b, mean, std, seed=seed, epoch=epoch,
                                   max_shift=shift)
    what = f"batch_prepare n={n} b={b} offset={offset} seed={seed} epoch={epoch} shift={shift}"
    assert_close(be.to_host(x), ref_x, *TOL["batch_prepare"], what + " x")
    assert_equal(be.to_host(y), ref_y, what + " y")
    assert_equal(be.to_host(dstate), state, what + ": the state is read only")


@cuda.jit
def _shift_probe(words, idx, out):
    """(dy, dx) of every index by the kernels' hash; words = [seed, epoch, max shift]."""
    i = cuda.grid(1)
    if i < idx.shape[0]:
        h1 = batch.epoch_hash(words[0], words[1])
        dy, dx = batch.sample_shift(h1, idx[i], words[2])
        out[i, 0] = dy
        out[i, 1] = dx


def check_augment_shift(seed, epoch, indices, max_shift):
    """The kernels' hash (batch.epoch_hash + batch.sample_shift, run by a probe kernel, one thread per
    index) against reference.augment_shift, exactly."""
    idx = np.asarray(indices, np.int32)
    words = np.array([HostState(seed=seed).to_array()[6], np.int64(epoch).astype(np.int32), max_shift], np.int32)
    out = cuda.to_device(np.full((idx.size, 2), 99, np.int32))
    _shift_probe[(idx.size + 127) // 128, 128](cuda.to_device(words), cuda.to_device(idx), out)
    dy, dx = R.augment_shift(seed, epoch, idx.astype(np.int64), max_shift)
    assert_equal(out.copy_to_host(), np.stack([dy, dx], axis=1).astype(np.int32),
                 f"augment_shift seed={seed} epoch={epoch} shift={max_shift}")


def check_step_advance(be, batch, **words):
    """One step_advance against lenet_gpu.stepstate.advance, bit for bit."""
    host = HostState(**words)
    dstate = be.to_device(host.to_array())
    launched(be, be.step_advance, dstate, batch)
    want = advance(host, batch).to_array()
    assert_equal(be.to_host(dstate), want, f"step_advance batch={batch} {words}")


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
    # weights at the scale of a conv layer's (C3's init bound is 1/√150 ≈ 0.08): with N(0, 1) weights, C3's
    # 400-term sums of O(1) products cancel to O(0.1) results whose float32 rounding (FMA-contracted on a
    # GPU) exceeds TOL's atol, which is written for O(1) terms (seen on an H200 at batch 64)
    w, dz = rand(wshape, seed, 0.3), rand(yshape, seed + 1)
    dx = be.to_device(nan_like(xshape))
    launched(be, be.conv2d_bwd_data, be.to_device(dz), be.to_device(w), dx, variant=variant)
    ref, _, _ = R.conv2d_bwd(np.zeros(xshape), w.astype(F64), np.zeros(yshape), dz.astype(F64), "identity")
    assert_close(be.to_host(dx), ref, *TOL["conv2d_bwd_data"], f"conv2d_bwd_data {variant} {xshape} {wshape}")


def check_conv2d_bwd_weight(be, xshape, wshape, variant, seed=0, dz_scale=1.0, state=None):
    n, _, h, wd = xshape
    yshape = (n, wshape[0], h - wshape[2] + 1, wd - wshape[3] + 1)
    x, dz = rand(xshape, seed), rand(yshape, seed + 1, dz_scale)
    dw = be.to_device(nan_like(wshape))
    db = be.to_device(nan_like(wshape[:1]))
    dstate = be.to_device(state_array() if state is None else state)
    launched(be, be.conv2d_bwd_weight, be.to_device(x), be.to_device(dz), dw, db, dstate, variant=variant)
    _, rdw, rdb = R.conv2d_bwd(x.astype(F64), np.zeros(wshape), np.zeros(yshape), dz.astype(F64), "identity")
    what = f"conv2d_bwd_weight {variant} {xshape} {wshape}"
    assert_close(be.to_host(dw), rdw, *TOL["conv2d_bwd_weight"], what + " dw")
    assert_close(be.to_host(db), rdb, *TOL["conv2d_bwd_weight"], what + " db")


def check_conv2d_bwd_data_pool(be, yshape, wshape, mode, act, variant, seed=0):
    """The fused data gradient through pooling against reference.conv2d_bwd_data_pool. yshape (N,C,H,W) is
    the lower layer's conv output (odd H or W: a trailing row/column that no window owns); the
    convolution's input is the pooled map (N,C,H//2,W//2)."""
    n, c, h, wd = yshape
    k, _, r, s = wshape
    dzshape = (n, k, h // 2 - r + 1, wd // 2 - s + 1)
    dz, w = rand(dzshape, seed), rand(wshape, seed + 1, 0.3)
    yconv = R.activate(rand(yshape, seed + 2).astype(F64), act).astype(np.float32)
    _, am = R.pool2x2_fwd(_pool_input(yshape, seed + 3).astype(F64), "max")
    am = am.astype(np.uint8) if mode == "max" else None
    dzb = be.to_device(nan_like(yshape))
    launched(be, be.conv2d_bwd_data_pool, be.to_device(dz), be.to_device(w), None if am is None else be.to_device(am),
             be.to_device(yconv), dzb, mode, act, variant=variant)
    ref = R.conv2d_bwd_data_pool(dz.astype(F64), w.astype(F64), am, yconv.astype(F64), mode, act)
    assert_close(be.to_host(dzb), ref, *TOL["conv2d_bwd_data"],
                 f"conv2d_bwd_data_pool {variant} {mode} {act} {yshape} {wshape}")


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


def check_softmax_xent(be, n, ncls, variant, seed=0, rows=3, step_in_epoch=4):
    """dlogits against the reference; the step's [loss sum, correct] in stats row STEP_IN_EPOCH mod S
    (overwritten: the row starts as NaN), every other row untouched."""
    logits = rand((n, ncls), seed, 3.0)
    logits[0, 1] = logits[0, 0] = logits[0].max() + 1  # a tie for the maximum: the first one counts
    labels = np.random.default_rng(seed).integers(0, ncls, n).astype(np.int32)
    labels[0] = 1
    d = be.to_device(nan_like((n, ncls)))
    stats0 = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + 0.5
    row = step_in_epoch % rows
    stats0[row] = np.nan
    stats = be.to_device(stats0)
    state = be.to_device(state_array(step_in_epoch=step_in_epoch, step=99))
    launched(be, be.softmax_xent, be.to_device(logits), be.to_device(labels), d, stats, state, variant=variant)
    loss, rd = R.softmax_xent(logits.astype(F64), labels)
    correct = int((np.argmax(logits, axis=1) == labels).sum())
    st = be.to_host(stats)
    assert_close(be.to_host(d), rd, *TOL["softmax_xent"], f"softmax_xent {variant} dlogits")
    assert_close(st[row, 0], loss * n, *TOL["softmax_xent"], "softmax_xent loss sum")
    assert st[row, 1] == correct, f"correct count {st[row, 1]} != {correct}"
    others = np.arange(rows) != row
    assert_equal(st[others], stats0[others], "softmax_xent: other stats rows")


def _sched_state(step, sched_base, rows, seed):
    """A schedule table of ``rows`` distinct rows and a state at ``step``; the row the kernels must read."""
    rng = np.random.default_rng(seed)
    sched = np.zeros((rows, SCHED_COLS), np.float32)
    sched[:, 0] = rng.uniform(1e-3, 2e-2, rows)
    sched[:, 1] = rng.uniform(0.1, 1.0, rows)
    sched[:, 2] = rng.uniform(1e-3, 1.0, rows)
    state = state_array(step=step, sched_base=sched_base)
    return sched, state, sched_row(state, sched)


#: (step, sched_base): inside the table, before it (clamped to row 0), past its end (clamped to T − 1)
SCHED_CASES = ((7, 5), (2, 5), (40, 5))


def check_adam_step(be, size, weight_decay, variant, seed=0, step=7, sched_base=5, rows=4):
    p, g, m = rand((size,), seed), rand((size,), seed + 1), rand((size,), seed + 2, 0.1)
    v = np.abs(rand((size,), seed + 3, 0.01))
    b1, b2, eps = 0.9, 0.999, 1e-8
    sched, state, row = _sched_state(step, sched_base, rows, seed)
    dp, dm, dv = be.to_device(p), be.to_device(m), be.to_device(v)
    launched(be, be.adam_step, dp, be.to_device(g), dm, dv, be.to_device(sched), be.to_device(state), b1, b2, eps,
             weight_decay, variant=variant)
    lr, bc1, bc2 = (float(e) for e in row[:3])
    gg = g.astype(F64) + weight_decay * p.astype(F64)
    rm = b1 * m.astype(F64) + (1 - b1) * gg
    rv = b2 * v.astype(F64) + (1 - b2) * gg * gg
    rp = p.astype(F64) - lr * (rm / bc1) / (np.sqrt(rv / bc2) + eps)
    tol = TOL["adam_step"]
    what = f"adam step={step} base={sched_base}"
    assert_close(be.to_host(dm), rm, *tol, what + " m")
    assert_close(be.to_host(dv), rv, *tol, what + " v")
    assert_close(be.to_host(dp), rp, *tol, what + " p")


def check_sgd_step(be, size, weight_decay, variant, seed=0, step=7, sched_base=5, rows=4):
    p, g, m = rand((size,), seed), rand((size,), seed + 1), rand((size,), seed + 2, 0.1)
    sched, state, row = _sched_state(step, sched_base, rows, seed)
    dp, dm = be.to_device(p), be.to_device(m)
    launched(be, be.sgd_step, dp, be.to_device(g), dm, be.to_device(sched), be.to_device(state), 0.9, weight_decay,
             variant=variant)
    rp, rm = R.sgd_update(*_f64(p, g, m), float(row[0]), 0.9, weight_decay)
    what = f"sgd step={step} base={sched_base}"
    assert_close(be.to_host(dm), rm, *TOL["sgd_step"], what + " m")
    assert_close(be.to_host(dp), rp, *TOL["sgd_step"], what + " p")


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


# ------------------------------------------------------------------------------- whole training steps


class StepRig:
    """A training step made of the protocol's ops, with the step state on the device: batch_prepare reads
    OFFSET/EPOCH/SEED/SHIFT, softmax_xent writes stats[STEP_IN_EPOCH], the optimizer reads its schedule
    row, step_advance moves the state on. Every launch has the same arguments at every step, so the step
    can be recorded (``be.record``) and captured (``be.graph``). Works on any backend.

    ``net="lenet"``: LeNet-5 (the fused conv2d_pool_fwd and conv2d_bwd_data_pool where the backend lists
    them). ``net="tiny"``: the
    same state-driven ops around one dense layer on the 32×32 canvas (batch_prepare → dense_fwd →
    softmax_xent → dense_bwd → conv2d_bwd_weight of a 1→2 channel 3×3 filter on the canvas → optimizer →
    step_advance): small enough for the simulator. The dataset is random digits-shaped data; n // batch
    steps make an epoch, and the schedule table is shorter than the run (the optimizer's clamp).
    """

    def __init__(self, be, net="lenet", n=24, batch=4, seed=0, act="relu", mode="max", optimizer="adam",
                 shift=2, aug_seed=2**31 + 7, epoch=0, sched_rows=5, weight_decay=1e-4):
        from lenet_gpu import spec
        from lenet_gpu.stepstate import schedule_table

        self.be, self.net, self.batch, self.act, self.mode = be, net, batch, act, mode
        self.optimizer, self.weight_decay = optimizer, weight_decay
        self.b1, self.b2, self.eps, self.momentum = 0.9, 0.999, 1e-8, 0.9
        self.mean, self.std = 0.1307, 0.3081
        rng = np.random.default_rng(seed)
        self.images = be.to_device(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        self.labels = be.to_device(rng.integers(0, 10, n, dtype=np.uint8))
        self.perm = be.to_device(rng.permutation(n).astype(np.int32))
        host = HostState(steps_per_epoch=n // batch, seed=aug_seed, shift=shift, epoch=epoch, sched_base=1)
        self.state = be.to_device(host.to_array())
        self.stats = be.to_device(np.full((n // batch, 2), np.nan, np.float32))
        lrs = np.linspace(2e-3, 1e-3, sched_rows)
        self.sched = be.to_device(schedule_table(lrs, 1, self.b1, self.b2))
        e = be.empty
        b = batch
        self.x, self.y = e((b, 1, 32, 32)), e((b,), np.int32)
        if net == "lenet":
            self.cfg = spec.NetConfig(activation=act, pool=mode)
            flat = spec.init_params(self.cfg, seed)
            self.views = spec.views
        else:
            self.cfg = None
            flat = (rng.standard_normal(10 * 1024 + 10 + 2 * 9 + 2) * 0.02).astype(np.float32)
            self.views = self._tiny_views
        self.params = be.to_device(flat)
        self.grads = be.to_device(np.zeros_like(flat))
        self.m = be.to_device(np.zeros_like(flat))
        self.v = be.to_device(np.zeros_like(flat))
        self.p = self.views(self.params, self.cfg)
        self.g = self.views(self.grads, self.cfg)
        if net == "lenet":
            f6 = self.cfg.f6
            self.a1, self.p1 = e((b, 6, 28, 28)), e((b, 6, 14, 14))
            self.m1 = e((b, 6, 14, 14), np.uint8)
            self.a3, self.p3 = e((b, 16, 10, 10)), e((b, 16, 5, 5))
            self.m3 = e((b, 16, 5, 5), np.uint8)
            self.a5, self.a6, self.logits = e((b, 120)), e((b, f6)), e((b, 10))
            self.dlogits, self.da6, self.da5 = e((b, 10)), e((b, f6)), e((b, 120))
            self.dp3, self.dz3, self.dp1, self.dz1 = e((b, 16, 5, 5)), e((b, 16, 10, 10)), e((b, 6, 14, 14)), e(
                (b, 6, 28, 28))
            self.p3_flat, self.dp3_flat = self.p3.reshape(b, 400), self.dp3.reshape(b, 400)
        else:
            self.x_flat = self.x.reshape(b, 1024)
            self.logits, self.dlogits = e((b, 10)), e((b, 10))
            self.dz = be.to_device(rng.standard_normal((b, 2, 30, 30)).astype(np.float32) * 0.01)

    @staticmethod
    def _tiny_views(flat, cfg=None):
        return {"w": flat[:10240].reshape(10, 1024), "b": flat[10240:10250],
                "cw": flat[10250:10268].reshape(2, 1, 3, 3), "cb": flat[10268:10270]}

    def step(self) -> None:
        be, p, g, act, mode = self.be, self.p, self.g, self.act, self.mode
        be.batch_prepare(self.images, self.labels, self.perm, self.state, self.x, self.y, self.mean, self.std)
        if self.net == "lenet":
            if "conv2d_pool_fwd" in be.variants:
                be.conv2d_pool_fwd(self.x, p["c1.w"], p["c1.b"], self.a1, self.p1, self.m1, act, mode)
                be.conv2d_pool_fwd(self.p1, p["c3.w"], p["c3.b"], self.a3, self.p3, self.m3, act, mode)
            else:
                be.conv2d_fwd(self.x, p["c1.w"], p["c1.b"], self.a1, act)
                be.pool2x2_fwd(self.a1, self.p1, self.m1, mode)
                be.conv2d_fwd(self.p1, p["c3.w"], p["c3.b"], self.a3, act)
                be.pool2x2_fwd(self.a3, self.p3, self.m3, mode)
            be.dense_fwd(self.p3_flat, p["c5.w"], p["c5.b"], self.a5, act)
            be.dense_fwd(self.a5, p["f6.w"], p["f6.b"], self.a6, act)
            be.dense_fwd(self.a6, p["out.w"], p["out.b"], self.logits, "identity")
            be.softmax_xent(self.logits, self.y, self.dlogits, self.stats, self.state)
            be.dense_bwd(self.a6, p["out.w"], self.logits, self.dlogits, self.da6, g["out.w"], g["out.b"], "identity")
            be.dense_bwd(self.a5, p["f6.w"], self.a6, self.da6, self.da5, g["f6.w"], g["f6.b"], act)
            be.dense_bwd(self.p3_flat, p["c5.w"], self.a5, self.da5, self.dp3_flat, g["c5.w"], g["c5.b"], act)
            be.pool2x2_bwd(self.dp3, self.m3, self.a3, self.dz3, mode, act)
            be.conv2d_bwd_weight(self.p1, self.dz3, g["c3.w"], g["c3.b"], self.state)
            if "conv2d_bwd_data_pool" in be.variants:
                am1 = self.m1 if mode == "max" else None
                be.conv2d_bwd_data_pool(self.dz3, p["c3.w"], am1, self.a1, self.dz1, mode, act)
            else:
                be.conv2d_bwd_data(self.dz3, p["c3.w"], self.dp1)
                be.pool2x2_bwd(self.dp1, self.m1, self.a1, self.dz1, mode, act)
            be.conv2d_bwd_weight(self.x, self.dz1, g["c1.w"], g["c1.b"], self.state)
        else:
            be.dense_fwd(self.x_flat, p["w"], p["b"], self.logits, "identity")
            be.softmax_xent(self.logits, self.y, self.dlogits, self.stats, self.state)
            be.dense_bwd(self.x_flat, p["w"], self.logits, self.dlogits, None, g["w"], g["b"], "identity")
            be.conv2d_bwd_weight(self.x, self.dz, g["cw"], g["cb"], self.state)
        if self.optimizer == "adam":
            be.adam_step(self.params, self.grads, self.m, self.v, self.sched, self.state, self.b1, self.b2, self.eps,
                         self.weight_decay)
        else:
            be.sgd_step(self.params, self.grads, self.m, self.sched, self.state, self.momentum, self.weight_decay)
        be.step_advance(self.state, self.batch)

    def snapshot(self) -> dict:
        """Host copies of everything a step changes."""
        be = self.be
        return {k: be.to_host(getattr(self, k)) for k in ("params", "grads", "m", "v", "state", "stats", "x", "y",
                                                         "logits")}


def assert_snapshots_equal(a: dict, b: dict, what: str) -> None:
    """Bit for bit (NaN == NaN)."""
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


# ------------------------------------------------------------------------------------ dispatch figures


def _per_call_us(fn, reps: int, sync=None) -> float:
    import time

    if sync:
        sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t) / reps * 1e6


def dispatch_figures(be, repeats: int = 200, k: int = 8) -> dict[str, float]:
    """Host µs of the ways to issue a LeNet-5 training step (batch 64, 17 launches) on a GPU:

    - ``*_host``: the lowest-level launch call mocked to do nothing (cuda.core's ``launch`` that Numba
      calls, and cuLaunchKernel for replays), so only the host's work is timed;
    - ``*_real``: real launches, synchronised at the end (end to end: whichever of host and device is
      slower);
    - ``noop_*``: one launch of an empty one-argument kernel, real, by each route: Numba's
      ``kernel[grid, block]``, the compiled ``_Kernel.launch``, cuda.core's ``launch`` with a
      precomputed config and arguments, and a prepared cuLaunchKernel.
    """
    import numba.cuda.dispatcher as nd
    from numba import cuda

    from lenet_gpu.backends.numba_backend import launch as L

    rig = StepRig(be, net="lenet", n=64 * 8, batch=64)
    rig.step()
    sync = cuda.synchronize
    out: dict[str, float] = {}
    rec = be.record(rig.step)
    rec()
    g = be.graph(rec, k)
    g()
    nl = len(rec.launches)
    out["launches_per_step"] = float(nl)
    out["eager_step_real"] = _per_call_us(rig.step, repeats // 4, sync)
    out["record_step_real"] = _per_call_us(rec, repeats // 4, sync)
    out["graph_step_real"] = _per_call_us(g, max(2, repeats // (4 * k)), sync) / k
    out["graph_launch_host"] = _per_call_us(g, 10)  # host time of one cuGraphLaunch of k steps (no sync)
    sync()

    # host only: the lowest-level launch does nothing
    real_core_launch, real_drv = nd.launch, L._drv

    class _NoLaunch:
        @staticmethod
        def cuLaunchKernel(*args):  # noqa: N802 - the driver's name
            return (0,)

        def __getattr__(self, name):
            return getattr(real_drv, name)

    nd.launch = lambda *a, **kw: None
    L._drv = _NoLaunch()
    try:
        rec2 = be.record(rig.step)
        rec2()
        out["eager_step_host"] = _per_call_us(rig.step, repeats)
        out["record_step_host"] = _per_call_us(rec2, repeats)
        from lenet_gpu.backends.numba_backend.backend import KERNELS

        raw = [(KERNELS[p.name], p.grid, p.block, p.shmem, p.args) for p in rec2.launches]

        def numba_launches():
            for disp, grid, block, sh, args in raw:
                disp[grid, block, 0, sh](*args)

        out["numba_step_host"] = _per_call_us(numba_launches, repeats)
    finally:
        nd.launch, L._drv = real_core_launch, real_drv
    out["numba_per_launch"] = out["numba_step_host"] / nl
    out["eager_wrapper_per_launch"] = out["eager_step_host"] / nl
    out["record_per_launch"] = out["record_step_host"] / nl

    # one empty kernel, real launches, by each route
    @cuda.jit
    def noop(a):
        pass

    arr = be.zeros((8,), np.int32)
    noop[1, 32](arr)
    sync()
    kernel = next(iter(noop.overloads.values()))
    kernelargs: list = []
    kernel._prepare_args(kernel.argument_types[0], arr, 0, [], kernelargs)
    config = nd.LaunchConfig(grid=(1, 1, 1), block=(32, 1, 1), shmem_size=0)
    core_kernel = kernel._codelibrary.get_cufunc().kernel
    from numba.cuda.cudadrv.driver import _to_core_stream

    stream = _to_core_stream(0)
    prepared = L.PreparedLaunch.for_gpu("noop", noop, 1, 32, 0, (arr,))
    s0 = L.cu_stream(0)
    reps = repeats * 10
    out["noop_numba"] = _per_call_us(lambda: noop[1, 32](arr), reps, sync)
    out["noop_kernel_launch"] = _per_call_us(lambda: kernel.launch((arr,), (1, 1, 1), (32, 1, 1), stream, 0), reps,
                                             sync)
    out["noop_cuda_core"] = _per_call_us(lambda: nd.launch(stream, config, core_kernel, *kernelargs), reps, sync)
    out["noop_prepared"] = _per_call_us(lambda: prepared.issue(s0), reps, sync)
    # host time only: few enough launches that the launch queue never fills, no sync inside the timing
    for key, fn in (("noop_numba_host", lambda: noop[1, 32](arr)),
                    ("noop_cuda_core_host", lambda: nd.launch(stream, config, core_kernel, *kernelargs)),
                    ("noop_prepared_host", lambda: prepared.issue(s0))):
        sync()
        out[key] = _per_call_us(fn, 200)
    sync()
    return out


def kernel_times(be, batch: int, reps: int = 50, k: int = 8) -> dict:
    """Device µs of each launch of a recorded LeNet-5 training step at ``batch`` (each prepared launch
    issued ``reps`` times between two CUDA events) and of a whole step (a graph of k steps, replayed)."""
    from numba import cuda

    rig = StepRig(be, net="lenet", n=batch * 8, batch=batch)
    rig.step()
    rec = be.record(rig.step)
    rec()
    stream = be._default_stream
    e0, e1 = cuda.event(), cuda.event()
    per_launch = []
    for p in rec.launches:
        e0.record()
        for _ in range(reps):
            p.issue(stream)
        e1.record()
        e1.synchronize()
        per_launch.append((p.name, p.grid[0] * p.grid[1], round(cuda.event_elapsed_time(e0, e1) * 1e3 / reps, 2)))
    g = be.graph(rec, k)
    g()
    e0.record()
    for _ in range(reps // k + 1):
        g()
    e1.record()
    e1.synchronize()
    step = cuda.event_elapsed_time(e0, e1) * 1e3 / ((reps // k + 1) * k)
    return {"batch": batch, "step_us": round(step, 1), "launches": per_launch}
