"""The cpu backend (Numba @njit kernels): every op and variant against the float64 reference (LeNet sizes,
batch 1, batches that leave a partial chunk of 16, odd sizes, NaN-poisoned outputs), batch_prepare and the
optimizers against the numpy backend bit for bit, the same results on 1 and 2 threads bit for bit, no allocation in
a training step after warm-up, and packed FMAs in the machine code of the register-blocked kernels.

The first run compiles every kernel (minutes on a busy machine); later runs load them from Numba's cache.
"""

from __future__ import annotations

import inspect

import numba
import numpy as np
import pytest

from lenet_gpu import backends, spec
from lenet_gpu import reference as R
from lenet_gpu.backends import BackendUnavailable, get_backend
from lenet_gpu.backends.cpu_backend import VARIANTS, CpuBackend, common
from lenet_gpu.backends.numpy_backend import NumpyBackend
from lenet_gpu.stepstate import STATE_WORDS, HostState, advance, sched_row, schedule_table

from . import host_checks as H
from .host_checks import activated, f64
from .parity import TOL, assert_close, assert_equal, nan_like, rand

ACTS = R.ACTIVATIONS
MODES = R.POOL_MODES
BE = get_backend("cpu")
NP = NumpyBackend(threads=1)

#: fused ops: float32 through the same sums as the unfused ops (a few more for the head's chain)
FUSED_TOL = {
    "conv2d_pool_fwd": TOL["conv2d_fwd"],
    "conv2d_bwd_data_pool": TOL["conv2d_bwd_data"],
    "head_train": (1e-5, 1e-4),
    "lenet_fwd": (1e-4, 1e-4),  # eight layers in float32
}

# (N, C, H, W, K, R, S): LeNet's C1 and C3 at batch 1, 3 and 17/19 (two chunks of 16, the second partial),
# odd sizes, and a wide odd map (rows kernels with two vector pairs, lanes kernels with odd windows)
CONV_SHAPES = [
    (1, 1, 32, 32, 6, 5, 5),
    (3, 6, 14, 14, 16, 5, 5),
    (17, 1, 32, 32, 6, 5, 5),
    (19, 6, 14, 14, 16, 5, 5),
    (2, 3, 9, 7, 5, 3, 4),
    (2, 2, 41, 38, 3, 5, 4),
]



def conv_case(shape, seed=1):
    n, c, h, w, k, r, s = shape
    return rand((n, c, h, w), seed), rand((k, c, r, s), seed + 1, 0.3), rand((k,), seed + 2, 0.1)



# ------------------------------------------------------------------------------------------- conv2d


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_conv2d_unfused(shape, act):
    x, wt, b = conv_case(shape)
    n, c, h, w, k, r, s = shape
    y = nan_like((n, k, h - r + 1, w - s + 1))
    BE.conv2d_fwd(x, wt, b, y, act)
    ref = R.conv2d_fwd(*f64(x, wt, b), act)
    assert_close(y, ref, *TOL["conv2d_fwd"], what=f"conv2d_fwd {shape} {act}")
    dz = rand(y.shape, 4)
    dx = nan_like(x.shape)
    BE.conv2d_bwd_data(dz, wt, dx)
    rdx, rdw, rdb = R.conv2d_bwd(*f64(x, wt), ref, dz.astype(np.float64), "identity")
    assert_close(dx, rdx, *TOL["conv2d_bwd_data"], what="conv2d_bwd_data")


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS["conv2d_bwd_weight"] + ("auto",))
def test_conv2d_bwd_weight(shape, variant):
    x, wt, _ = conv_case(shape)
    n, c, h, w, k, r, s = shape
    dz = rand((n, k, h - r + 1, w - s + 1), 4)
    dw, db = nan_like(wt.shape), nan_like((k,))
    BE.conv2d_bwd_weight(x, dz, dw, db, None, variant=variant)
    _, rdw, rdb = R.conv2d_bwd(*f64(x, wt), np.zeros(dz.shape), dz.astype(np.float64), "identity")
    assert_close(dw, rdw, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight {variant} dw {shape}")
    assert_close(db, rdb, *TOL["conv2d_bwd_weight"], what=f"conv2d_bwd_weight {variant} db {shape}")


def check_pool_argmax(am, yconv, what):
    """argmax is the first maximum of each window of the kernel's own float32 conv output."""
    _, ram = R.pool2x2_fwd(yconv.astype(np.float64), "max")
    assert_equal(am, ram, what=what)


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS["conv2d_pool_fwd"] + ("auto",))
@pytest.mark.parametrize("act,mode", [("relu", "max"), ("tanh", "avg")])
def test_conv2d_pool_fwd(shape, variant, act, mode):
    run_conv2d_pool_fwd(shape, variant, act, mode)


@pytest.mark.parametrize("variant", VARIANTS["conv2d_pool_fwd"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
def test_conv2d_pool_fwd_activations(variant, act, mode):
    run_conv2d_pool_fwd((3, 2, 11, 10, 4, 3, 3), variant, act, mode)


def run_conv2d_pool_fwd(shape, variant, act, mode):
    x, wt, b = conv_case(shape)
    n, c, h, w, k, r, s = shape
    ho, wo = h - r + 1, w - s + 1
    if act == "relu":
        x[0, :, :4, :4] = 0.0  # flat patches: ties, first maximum wins
    yconv = nan_like((n, k, ho, wo))
    ypool = nan_like((n, k, ho // 2, wo // 2))
    am = nan_like(ypool.shape, np.uint8)
    BE.conv2d_pool_fwd(x, wt, b, yconv, ypool, am, act, mode, variant=variant)
    ref = R.conv2d_fwd(*f64(x, wt, b), act)
    rpool, _ = R.pool2x2_fwd(ref, mode)
    what = f"conv2d_pool_fwd {variant} {shape} {act} {mode}"
    assert_close(yconv, ref, *FUSED_TOL["conv2d_pool_fwd"], what=what + " yconv")
    assert_close(ypool, rpool, *FUSED_TOL["conv2d_pool_fwd"], what=what + " ypool")
    if mode == "max":
        check_pool_argmax(am, yconv, what + " argmax")
    else:
        assert np.all(am == 255), "avg leaves argmax untouched"
    # without yconv: the same pooled outputs
    ypool2, am2 = nan_like(ypool.shape), nan_like(ypool.shape, np.uint8)
    BE.conv2d_pool_fwd(x, wt, b, None, ypool2, am2 if mode == "max" else None, act, mode, variant=variant)
    assert_equal(ypool2, ypool, what=what + " without yconv")
    if mode == "max":
        assert_equal(am2, am, what=what + " argmax without yconv")


# (N, K, C, R, S, H2, W2): dz (N,K,Ho,Wo) → the pooled map (N,C,H2//2,W2//2) → dz_below (N,C,H2,W2).
# LeNet's C3 → S2 → C1 at batch 1 and 17, an odd yconv and odd filter, and a map wider than 16 (rows of 32)
BWD_POOL_SHAPES = [
    (1, 16, 6, 5, 5, 28, 28),
    (17, 16, 6, 5, 5, 28, 28),
    (3, 4, 3, 3, 2, 29, 27),
    (2, 3, 2, 5, 5, 70, 67),
]


@pytest.mark.parametrize("shape", BWD_POOL_SHAPES)
@pytest.mark.parametrize("act,mode", [("relu", "max"), ("tanh", "avg"), ("sigmoid", "max"), ("lecun_tanh", "avg")])
def test_conv2d_bwd_data_pool(shape, act, mode):
    n, k, c, r, s, h2, w2 = shape
    hx, wx = h2 // 2, w2 // 2
    dz = rand((n, k, hx - r + 1, wx - s + 1), 5)
    wt = rand((k, c, r, s), 6, 0.3)
    yconv = activated((n, c, h2, w2), act, 7)
    _, am = R.pool2x2_fwd(yconv.astype(np.float64), "max")
    am = am if mode == "max" else None
    out = nan_like(yconv.shape)
    BE.conv2d_bwd_data_pool(dz, wt, am, yconv, out, mode, act)
    ref = R.conv2d_bwd_data_pool(*f64(dz, wt), am, yconv.astype(np.float64), mode, act)
    assert_close(out, ref, *FUSED_TOL["conv2d_bwd_data_pool"], what=f"conv2d_bwd_data_pool {shape} {act} {mode}")


# ------------------------------------------------------------------------------------------- the head


def head_case(n, f6, act, mode, seed=8):
    yconv = activated((n, 16, 10, 10), act, seed)
    x, am = R.pool2x2_fwd(yconv.astype(np.float64), mode)
    labels = np.random.default_rng(seed).integers(0, 10, n).astype(np.int32)
    ws = [rand((120, 400), seed + 1, 0.05), rand((120,), seed + 2, 0.1), rand((f6, 120), seed + 3, 0.1),
          rand((f6,), seed + 4, 0.1), rand((10, f6), seed + 5, 0.2), rand((10,), seed + 6, 0.1)]
    return x.astype(np.float32), labels, ws, am, yconv


def run_head(be, x, labels, ws, am, yconv, act, mode, step_in_epoch=2, rows=4):
    n, f6 = x.shape[0], ws[2].shape[0]
    out = {"h1": nan_like((n, 120)), "h2": nan_like((n, f6)), "logits": nan_like((n, 10)),
           "dz_conv": nan_like(yconv.shape)}
    grads = [nan_like(w.shape) for w in ws]
    stats = np.full((rows, 2), -7.0, np.float32)
    state = HostState(step_in_epoch=step_in_epoch).to_array()
    be.head_train(x, labels, *ws, out["h1"], out["h2"], out["logits"], am, yconv, out["dz_conv"], *grads, stats, state,
                  act, mode)
    out.update(zip(("dw1", "db1", "dw2", "db2", "dw3", "db3"), grads))
    out["stats"] = stats
    return out


@pytest.mark.parametrize("n", [1, 17])
@pytest.mark.parametrize("f6", [84, 13])
@pytest.mark.parametrize("act,mode", [("relu", "max"), ("tanh", "avg"), ("sigmoid", "max"), ("lecun_tanh", "avg")])
def test_head_train(n, f6, act, mode):
    x, labels, ws, am, yconv = head_case(n, f6, act, mode)
    out = run_head(BE, x, labels, ws, am, yconv, act, mode, step_in_epoch=6)
    ref = R.head_train(x.astype(np.float64), labels, *f64(*ws), am, yconv.astype(np.float64), act, mode)
    rtol = FUSED_TOL["head_train"][1]
    for key in ("h1", "h2", "logits", "dz_conv", "dw1", "db1", "dw2", "db2", "dw3", "db3"):
        # atol scaled to the output: a float32 chain's rounding is relative to the size of what it sums, and the
        # gradients of the mean loss are small (a fixed 1e-5 would pass most of dz_conv unchecked at small sizes)
        atol = rtol * float(np.abs(ref[key]).max())
        assert_close(out[key], ref[key], atol, rtol, what=f"head_train {key} n={n} {act} {mode}")
    row = 6 % 4
    assert_close(out["stats"][row, 0], ref["loss_sum"], *TOL["softmax_xent"], what="loss sum")
    assert out["stats"][row, 1] == int((np.argmax(out["logits"], axis=1) == labels).sum())
    others = np.delete(out["stats"], row, axis=0)
    assert np.all(others == -7.0), "only row STEP_IN_EPOCH mod S is written"


# ------------------------------------------------------------------------------------------ lenet_fwd


def net_params(f6, seed=20):
    cfg = spec.NetConfig(f6=f6)
    flat = spec.init_params(cfg, seed)
    return spec.views(flat, cfg)


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("f6", [84, 13])
@pytest.mark.parametrize("act,mode", [("relu", "max"), ("tanh", "avg"), ("lecun_tanh", "max"), ("sigmoid", "avg")])
def test_lenet_fwd(n, f6, act, mode):
    params = net_params(f6)
    images = np.random.default_rng(21).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    logits = nan_like((n, 10))
    BE.lenet_fwd(images, params, logits, 0.1307, 0.3081, act, mode)
    ref = R.lenet_fwd(images, params, 0.1307, 0.3081, act, mode)
    atol = FUSED_TOL["lenet_fwd"][0] * float(np.abs(ref).max())
    assert_close(logits, ref, atol, FUSED_TOL["lenet_fwd"][1], what=f"lenet_fwd n={n} f6={f6} {act} {mode}")


# --------------------------------------------------------------------------------- unfused pool, dense


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 6, 28, 28), (17, 16, 10, 10), (2, 3, 7, 9)])
def test_pool2x2(shape, act, mode):
    H.check_pool2x2(BE, shape, act, mode)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 400, 120), (17, 120, 84), (3, 17, 10)])
def test_dense(shape, act):
    H.check_dense(BE, shape, act)


# ------------------------------------------------------------------------- state-driven ops, bit-exact


@pytest.mark.parametrize("n", [1, 7, 64])
def test_softmax_xent(n):
    H.check_softmax_xent(BE, n)


def test_softmax_xent_extreme_logits():
    H.check_softmax_xent_extreme_logits(BE)


@pytest.mark.parametrize("shift", [0, 2, 3])
@pytest.mark.parametrize("seed", [0, 12345, -7, 2**40 + 5])
def test_batch_prepare(shift, seed):
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (23, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 23).astype(np.uint8)
    perm = rng.permutation(23).astype(np.int32)
    state = HostState(offset=20, epoch=3, seed=seed, shift=shift).to_array()
    x, y = nan_like((7, 1, 32, 32)), nan_like((7,), np.int32)
    BE.batch_prepare(images, labels, perm, state, x, y, 0.1307, 0.3081)
    # rows past the permutation's end wrap around (the modulo keeps a stale state in bounds)
    wrapped = np.concatenate([perm[20:], perm[:4]])
    rx, ry = R.batch_prepare(images, labels, wrapped, 0, 7, 0.1307, 0.3081, seed=seed, epoch=3, max_shift=shift)
    assert_close(x, rx, *TOL["batch_prepare"], what="batch_prepare x")
    assert_equal(y, ry, what="labels")
    x2, y2 = nan_like(x.shape), nan_like(y.shape, np.int32)
    NP.batch_prepare(images, labels, perm, state, x2, y2, 0.1307, 0.3081)
    assert_equal(x, x2, what="x, numpy backend")
    assert_equal(y, y2, what="y, numpy backend")


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("step", [0, 2, 50])
def test_optimizers(wd, step):
    p, g = rand((70,), 14), rand((70,), 15)
    m, v = rand((70,), 16, 0.1), np.abs(rand((70,), 17, 0.1))
    lrs = np.linspace(1e-2, 2e-3, 10)
    sched = schedule_table(lrs, 1, 0.9, 0.999)  # rows for steps 1..10
    state = HostState(step=step, sched_base=1).to_array()
    lr, bc1, bc2 = (float(a) for a in sched_row(state, sched)[:3])
    t = min(max(step, 1), 10) + 1  # the clamped row's Adam t
    p1, m1, v1 = p.copy(), m.copy(), v.copy()
    BE.adam_step(p1, g, m1, v1, sched, state, 0.9, 0.999, 1e-8, wd)
    rp, rm, rv = R.adam_update(*f64(p, g, m, v), t=t, lr=lr, weight_decay=wd)
    assert abs(bc1 - (1 - 0.9**t)) < 1e-6 and abs(bc2 - (1 - 0.999**t)) < 1e-6
    for got, want, name in ((p1, rp, "p"), (m1, rm, "m"), (v1, rv, "v")):
        assert_close(got, want, *TOL["adam_step"], what=f"adam {name}")
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    NP.adam_step(p2, g, m2, v2, sched, state, 0.9, 0.999, 1e-8, wd)
    for got, want, name in ((p1, p2, "p"), (m1, m2, "m"), (v1, v2, "v")):
        assert_equal(got, want, what=f"adam {name}, numpy backend")
    p3, m3 = p.copy(), m.copy()
    BE.sgd_step(p3, g, m3, sched, state, 0.9, wd)
    rp, rm = R.sgd_update(*f64(p, g, m), lr=lr, momentum=0.9, weight_decay=wd)
    assert_close(p3, rp, *TOL["sgd_step"], what="sgd p")
    assert_close(m3, rm, *TOL["sgd_step"], what="sgd m")
    p4, m4 = p.copy(), m.copy()
    NP.sgd_step(p4, g, m4, sched, state, 0.9, wd)
    assert_equal(p3, p4, what="sgd p, numpy backend")


def test_step_advance():
    hs = HostState(step=5, step_in_epoch=1, offset=64, epoch=2, steps_per_epoch=3, seed=9, shift=2)
    state = hs.to_array()
    for _ in range(4):
        BE.step_advance(state, 32)
        hs = advance(hs, 32)
        assert_equal(state, hs.to_array(), what="step_advance")
    assert state.shape == (STATE_WORDS,) and hs.epoch == 3  # wrapped once


# ------------------------------------------------------------------------------ a training step, threads


class Step:
    """One training step of the fused ops on the cpu backend, in the model's order."""

    def __init__(self, be, batch=19, act="relu", mode="max", seed=3):
        cfg = spec.NetConfig(activation=act, pool=mode)
        rng = np.random.default_rng(seed)
        self.be, self.batch, self.act, self.mode = be, batch, act, mode
        self.images = be.to_device(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8))
        self.labels = be.to_device(rng.integers(0, 10, 50).astype(np.uint8))
        self.perm = be.to_device(rng.permutation(50).astype(np.int32))
        self.state = be.to_device(HostState(steps_per_epoch=50 // batch, seed=seed, shift=2).to_array())
        self.sched = be.to_device(schedule_table(np.full(100, 1e-3), 0, 0.9, 0.999))
        self.stats = be.zeros((50 // batch, 2))
        self.p = be.to_device(spec.init_params(cfg, seed))
        self.g, self.m, self.v = (be.zeros(self.p.shape) for _ in range(3))
        self.P, self.G = spec.views(self.p, cfg), spec.views(self.g, cfg)
        b = batch
        self.x, self.y = be.empty((b, 1, 32, 32)), be.empty((b,), np.int32)
        self.a1, self.s2 = be.empty((b, 6, 28, 28)), be.empty((b, 6, 14, 14))
        self.a3, self.s4 = be.empty((b, 16, 10, 10)), be.empty((b, 16, 5, 5))
        self.am1, self.am3 = be.empty((b, 6, 14, 14), np.uint8), be.empty((b, 16, 5, 5), np.uint8)
        self.h1, self.h2, self.logits = be.empty((b, 120)), be.empty((b, 84)), be.empty((b, 10))
        self.dz3, self.dz1 = be.empty((b, 16, 10, 10)), be.empty((b, 6, 28, 28))

    def step(self):
        be, P, G, act, mode = self.be, self.P, self.G, self.act, self.mode
        am1 = self.am1 if mode == "max" else None
        am3 = self.am3 if mode == "max" else None
        be.batch_prepare(self.images, self.labels, self.perm, self.state, self.x, self.y, 0.13, 0.31)
        be.conv2d_pool_fwd(self.x, P["c1.w"], P["c1.b"], self.a1, self.s2, am1, act, mode)
        be.conv2d_pool_fwd(self.s2, P["c3.w"], P["c3.b"], self.a3, self.s4, am3, act, mode)
        be.head_train(self.s4, self.y, P["c5.w"], P["c5.b"], P["f6.w"], P["f6.b"], P["out.w"], P["out.b"],
                      self.h1, self.h2, self.logits, am3, self.a3, self.dz3, G["c5.w"], G["c5.b"], G["f6.w"],
                      G["f6.b"], G["out.w"], G["out.b"], self.stats, self.state, act, mode)
        be.conv2d_bwd_weight(self.s2, self.dz3, G["c3.w"], G["c3.b"], self.state)
        be.conv2d_bwd_data_pool(self.dz3, P["c3.w"], am1, self.a1, self.dz1, mode, act)
        be.conv2d_bwd_weight(self.x, self.dz1, G["c1.w"], G["c1.b"], self.state)
        be.adam_step(self.p, self.g, self.m, self.v, self.sched, self.state, 0.9, 0.999, 1e-8, 0.0)
        be.step_advance(self.state, self.batch)


def test_training_step_allocates_nothing_after_warmup():
    be = CpuBackend()
    s = Step(be)
    s.step()
    before = be.counters.snapshot()
    for _ in range(3):
        s.step()
    d = be.counters.since(before)
    assert d["allocs"] == 0 and d["h2d"] == 0 and d["d2h"] == 0 and d["syncs"] == 0, d
    assert d["launches"] == 3 * 9
    assert np.all(np.isfinite(s.p)) and np.all(np.isfinite(s.stats))


def test_host_arrays_and_workspaces_are_aligned():
    """Every array the host backends make (empty, zeros, to_device, the cpu backend's float workspaces) starts on a
    64-byte boundary: a lane vector of 16 floats is then one cache line, not two (base.HOST_ALIGN)."""
    from lenet_gpu.backends.base import HOST_ALIGN, aligned_empty

    assert HOST_ALIGN == 64
    for shape, dt in (((3, 5), np.float32), ((7,), np.uint8), ((0, 4), np.float32), ((2, 3, 5), np.int64)):
        for zero in (False, True):
            a = aligned_empty(shape, dt, zero=zero)
            assert a.shape == shape and a.dtype == dt and a.flags.c_contiguous and a.flags.writeable
            assert a.ctypes.data % HOST_ALIGN == 0 or a.size == 0
            if zero:
                assert not a.any()
    for be in (CpuBackend(), NumpyBackend(threads=1)):
        made = [be.empty((3, 5)), be.zeros((1, 17), np.uint8), be.to_device(np.arange(10.0)[::2])]
        assert np.array_equal(made[2], np.arange(10.0)[::2])
        assert all(a.ctypes.data % 64 == 0 for a in made), [a.ctypes.data % 64 for a in made]
    be = CpuBackend()
    model_images = np.zeros((20, 28, 28), np.uint8)
    from lenet_gpu.model import LeNet5

    m = LeNet5(backend=be)
    m.logits(model_images)
    m.train_step(model_images[:16], np.zeros(16, np.uint8))
    ws = [a for plan in be._plans.values() for a in (plan if isinstance(plan, tuple) else (plan,))
          if isinstance(a, np.ndarray) and a.dtype.kind == "f"]  # (head_train's int64 task list is no vector data)
    assert len(ws) > 10
    assert [a.shape for a in ws if a.ctypes.data % 64] == []


def _state_of(s: Step) -> list[np.ndarray]:
    return [a.copy() for a in (s.p, s.g, s.m, s.v, s.stats, s.state, s.dz1, s.dz3, s.a1, s.logits)]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread here")
@pytest.mark.parametrize("act,mode", [("relu", "max"), ("tanh", "avg")])
def test_same_bits_on_one_and_two_threads(act, mode):
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            s = Step(CpuBackend(), batch=37, act=act, mode=mode)  # two full chunks and a partial one
            for _ in range(2):
                s.step()
            out = _state_of(s)
            logits = nan_like((45, 10))
            s.be.lenet_fwd(np.asarray(s.images)[:45], s.P, logits, 0.13, 0.31, act, mode)
            out.append(logits)
            dw = [nan_like(s.G["c1.w"].shape) for _ in range(3)]
            db = [nan_like(s.G["c1.b"].shape) for _ in range(3)]
            for i, v in enumerate(VARIANTS["conv2d_bwd_weight"]):
                s.be.conv2d_bwd_weight(s.x, s.dz1, dw[i], db[i], variant=v)
            runs.append(out + dw + db)
    finally:
        numba.set_num_threads(before)
    for i, (a, b) in enumerate(zip(*runs)):
        assert_equal(a, b, what=f"array {i}: 1 thread vs 2 threads")


# --------------------------------------------------------------------------------- the machine code


def _host_has_fma() -> bool:
    import llvmlite.binding as ll  # numba's dependency: installed with the cpu backend

    feats = ll.get_host_cpu_features()
    return bool(feats.get("fma", False)) and bool(feats.get("avx2", False))


def _host_has_avx512() -> bool:
    try:
        import llvmlite.binding as ll

        return bool(ll.get_host_cpu_features().get("avx512f", False))
    except Exception:  # noqa: BLE001
        return False


def fresh_at(chunk, addr: int):
    """``chunk`` compiled afresh (serially, no cache, at the backend's OPT_LEVEL) for the signature of its overload
    whose compiled code is at ``addr``: the function a kernel calls through that address (native.py)."""
    from lenet_gpu.backends.cpu_backend import native

    sigs = [sig for sig in chunk.overloads if native.address(chunk, sig) == addr]
    assert len(sigs) == 1, (chunk.py_func.__name__, list(chunk.overloads))
    fresh = common.njit(**dict(common.JIT_INNER, cache=False))(chunk.py_func)
    fresh.compile(sigs[0])
    return fresh


@pytest.mark.skipif(not _host_has_fma(), reason="the host CPU has no AVX2/FMA")
@pytest.mark.parametrize("kernel", ["conv2d_pool_fwd_v1", "conv2d_pool_fwd_v2", "conv2d_bwd_weight_v2",
                                    "conv2d_bwd_weight_v3", "conv2d_bwd_data_pool_v1", "lenet_fwd_v1"])
def test_register_blocked_kernels_use_packed_fma(kernel):
    """The register-blocked kernels' chunk functions, which the kernels call through the addresses of their
    compiled code (native.py), compiled afresh (serially, no cache, at the backend's optimisation level) with the
    signature the kernel calls when a training step gives it its arguments, hold packed FMAs and no scalar ones:
    the lane loops vectorised and the accumulator tiles became registers."""
    from lenet_gpu.backends.cpu_backend import conv2d, lenet_fwd

    be = CpuBackend()
    s = Step(be, batch=3)
    s.step()  # every buffer holds what a step leaves there; the plans exist
    calls = {
        "conv2d_pool_fwd_v1": lambda: be.conv2d_pool_fwd(s.s2, s.P["c3.w"], s.P["c3.b"], s.a3, s.s4, s.am3, "relu",
                                                         "max", variant="v1"),
        "conv2d_pool_fwd_v2": lambda: be.conv2d_pool_fwd(s.x, s.P["c1.w"], s.P["c1.b"], s.a1, s.s2, s.am1, "relu",
                                                         "max", variant="v2"),
        "conv2d_bwd_weight_v2": lambda: be.conv2d_bwd_weight(s.s2, s.dz3, s.G["c3.w"], s.G["c3.b"], variant="v2"),
        "conv2d_bwd_weight_v3": lambda: be.conv2d_bwd_weight(s.x, s.dz1, s.G["c1.w"], s.G["c1.b"], variant="v3"),
        "conv2d_bwd_data_pool_v1": lambda: be.conv2d_bwd_data_pool(s.dz3, s.P["c3.w"], s.am1, s.a1, s.dz1, "max",
                                                                   "relu"),
        "lenet_fwd_v1": lambda: be.lenet_fwd(np.asarray(s.images)[:3], s.P, nan_like((3, 10)), 0.13, 0.31, "relu",
                                             "max"),
    }
    calls[kernel]()  # makes the plan
    seen = []
    chunk_caller = []
    for key, plan in be._plans.items():  # wrap the planned kernel to catch its arguments
        if plan and getattr(plan[0], "py_func", None) is not None and plan[0].py_func.__name__ == kernel:
            fn = plan[0]
            chunk_caller.append(fn)
            be._plans[key] = (lambda *a, _fn=fn: (seen.append(a), _fn(*a))[1], *plan[1:])
    calls[kernel]()
    assert seen, f"{kernel} was not called"
    chunk = {"conv2d_pool_fwd_v1": conv2d._pool_fwd_lanes_chunk, "conv2d_pool_fwd_v2": conv2d._pool_fwd_rows_chunk,
             "conv2d_bwd_weight_v2": conv2d._bwd_weight_lanes_chunk,
             "conv2d_bwd_weight_v3": conv2d._bwd_weight_rows_chunk,
             "conv2d_bwd_data_pool_v1": conv2d._bwd_data_pool_chunk, "lenet_fwd_v1": lenet_fwd._lenet_chunk}
    names = list(inspect.signature(chunk_caller[0].py_func).parameters)
    # the chunk's address: the kernel's argument a_chunk where it has one (lenet_fwd_v1, whose last two are its task's
    # and launch.par_tasks's addresses), else its last argument
    addr = seen[0][names.index("a_chunk")] if "a_chunk" in names else seen[0][-1]
    counts = common.inspect_fma(fresh_at(chunk[kernel], addr))
    # one register block's FMAs at least: (FMAs a filter or channel takes per 16-lane vector) × the planner's block
    # × the registers a 16-lane vector takes (one zmm in AVX-512 code; two ymm in AVX2 code, on a host without
    # AVX-512, where the blocks are 1: conv2d.block_size)
    per, n, sizes = {"conv2d_pool_fwd_v1": (4, 16, (6, 4)), "conv2d_pool_fwd_v2": (4, 6, (6, 4)),
                     "conv2d_bwd_weight_v2": (5, 16, (4, 3)), "conv2d_bwd_weight_v3": (5, 6, (4, 3)),
                     "conv2d_bwd_data_pool_v1": (4, 6, (6, 4)), "lenet_fwd_v1": (4, 6, (6, 4))}[kernel]
    block = per * conv2d.block_size(n, sizes)[0] * (1 if common.WIDE_VECTORS else 2)
    assert counts["fma_zmm"] + counts["fma_ymm"] >= block, (counts, block)
    assert counts["fma_scalar"] == 0, counts
    if kernel in ("conv2d_pool_fwd_v1", "conv2d_pool_fwd_v2", "lenet_fwd_v1"):
        # the epilogue's relu (and lenet_fwd's max pool) in vector code: act_tile and lenet_fwd's relu_max loop
        # (act called per lane keeps its switch inside the loop, and the loop scalar)
        assert counts["max_packed"] >= 1, counts
    # at the machine's widest vectors: zmm where AVX-512 is present, ymm (and no zmm) where AVX2 is the best
    if _host_has_avx512():
        assert counts["fma_zmm"] >= block, counts
    else:
        assert counts["fma_ymm"] >= block and counts["fma_zmm"] == 0, counts


@pytest.mark.skipif(not _host_has_fma(), reason="the host CPU has no AVX2/FMA")
def test_the_relu_max_functions_are_vector_code():
    """The default path's functions of their own (lenet_fwd._pool_relu_max: inference's C1 and C3;
    conv2d._pool_lanes_relu_max: the training step's C3), compiled afresh with the argument types their callers pass
    and the LeNet layers' register blocks: packed FMAs at the machine's widest vectors, no scalar FMA, the pooling in
    packed maxima. (tests/test_cpu_target.py checks their zmm code for an AVX-512 CPU.)"""
    from numba import types

    from lenet_gpu.backends.cpu_backend import conv2d, lenet_fwd

    f4, f2, f1, i8 = conv2d.F4, conv2d.F2, conv2d.F1, conv2d.I8
    u1 = types.Array(types.uint8, 1, "C")
    kb1, kb3 = conv2d.block_size(6)[0], conv2d.block_size(16)[0]
    sigs = {lenet_fwd._pool_relu_max: [(f4, f4, f1, i8, i8, i8, f2, types.literal(kb)) for kb in {kb1, kb3}],
            conv2d._pool_lanes_relu_max: [(f4, f4, f1, f1, u1, i8, i8, i8, i8, i8, types.literal(kb3))]}
    for fn, fn_sigs in sigs.items():
        fresh = common.njit(**dict(common.JIT_INNER, cache=False))(fn.py_func)
        for sig in fn_sigs:
            fresh.compile(sig)
        counts = common.inspect_fma(fresh)
        wide = "fma_zmm" if _host_has_avx512() else "fma_ymm"
        assert counts[wide] >= 8 and counts["fma_scalar"] == 0, (fn.py_func.__name__, counts)
        assert counts["max_packed"] >= 1, (fn.py_func.__name__, counts)


# ------------------------------------------------------------------------------------------- misc


def test_kernels_compile_at_the_backend_opt_level():
    """common.njit compiles at OPT_LEVEL (and puts Numba's level back after); numba.njit is untouched."""
    import numba
    from numba.core import codegen, config

    seen: list[int] = []
    orig = codegen.JITCPUCodegen._pass_builder

    def spy(self, **kw):
        seen.append(int(kw.get("opt", config.OPT)))
        return orig(self, **kw)

    def add(a, b):
        return a + b

    before = int(config.OPT)
    codegen.JITCPUCodegen._pass_builder = spy
    try:
        common.njit(cache=False)(add)(1, 2)
        ours = set(seen) - {0}  # the cheap pre-pass runs at 0 whatever the level
        seen.clear()
        numba.njit(cache=False)(add)(1.0, 2.0)
        theirs = set(seen) - {0}
    finally:
        codegen.JITCPUCodegen._pass_builder = orig
    assert int(config.OPT) == before
    want = int(common.OPT_LEVEL) if common.OPT_LEVEL is not None else before
    assert ours == {want}, ours
    assert theirs == {before}, theirs


def test_bad_options_are_rejected():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="pool mode"):
        BE.pool2x2_fwd(x, np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.uint8), "min")
    with pytest.raises(ValueError, match="activation"):
        BE.dense_fwd(np.zeros((1, 2), np.float32), np.zeros((2, 2), np.float32), np.zeros(2, np.float32),
                     np.zeros((1, 2), np.float32), "gelu")
    with pytest.raises(ValueError, match="variant"):
        BE.conv2d_bwd_weight(np.zeros((1, 1, 6, 6), np.float32), np.zeros((1, 2, 2, 2), np.float32),
                             np.zeros((2, 1, 5, 5), np.float32), np.zeros(2, np.float32), variant="v9")
    with pytest.raises(ValueError, match="ypool"):
        BE.conv2d_pool_fwd(np.zeros((1, 1, 8, 8), np.float32), np.zeros((2, 1, 3, 3), np.float32),
                           np.zeros(2, np.float32), None, np.zeros((1, 2, 2, 2), np.float32),
                           np.zeros((1, 2, 2, 2), np.uint8), "relu", "max")


def test_get_backend_and_auto(monkeypatch):
    be = get_backend("cpu")
    assert be.name == "cpu" and not be.is_gpu
    assert be.record(test_get_backend_and_auto) is test_get_backend_and_auto
    assert be.graph(test_get_backend_and_auto, 3) is None
    for op, vs in be.variants.items():
        assert be.default_variants[op] in vs + ("auto",), op
    # auto without a GPU backend: cpu, or numpy where the cpu backend cannot load
    make = backends._make
    no_gpu = {"cupy", "numba"}

    def fake(name, **kw):
        if name in no_gpu:
            raise BackendUnavailable(f"{name}: no GPU in this test")
        return make(name, **kw)

    monkeypatch.setattr(backends, "_make", fake)
    assert get_backend("auto").name == "cpu"
    no_gpu.add("cpu")
    assert get_backend("auto").name == "numpy"


# ------------------------------------------------------------------------------ the model on the cpu backend


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize("act,pool", [("relu", "max"), ("tanh", "avg"), ("sigmoid", "max"), ("lecun_tanh", "avg")])
def test_model_step_matches_reference(act, pool):
    from lenet_gpu import LeNet5

    from .test_model import reference_step

    model = LeNet5(backend="cpu", activation=act, pool=pool, seed=3)
    assert all(model.fused.values()), model.fused
    images, labels = _batch(19, seed=1)
    p0 = model.parameters()
    loss = model.train_step(images, labels)
    rloss, rg = reference_step(model, p0, images, labels)
    assert loss == pytest.approx(rloss, rel=1e-5)
    assert_close(model.backend.to_host(model.grads), rg, atol=1e-6 * np.abs(rg).max(), rtol=1e-4,
                 what=f"grads {act}/{pool}")


@pytest.mark.parametrize("act,pool", [("relu", "max"), ("tanh", "avg")])
def test_model_run_matches_numpy_and_unfused(act, pool):
    """A device-resident run with augmentation: the cpu backend's fused step, its unfused step and the numpy
    backend reach the same parameters and per-step statistics (float32 sums in other orders: close, not equal)."""
    from lenet_gpu import LeNet5

    images, labels = _batch(100, seed=4)
    runs = {}
    for name, backend, fused in (("cpu", "cpu", True), ("cpu-unfused", "cpu", False), ("numpy", "numpy", True)):
        m = LeNet5(backend=backend, activation=act, pool=pool, seed=2, fused=fused)
        data = m.upload_dataset(images, labels)
        m.begin_run(data, 32, np.linspace(1e-3, 2e-3, 6), seed=5, shift=2)
        m.begin_epoch(data, np.random.default_rng(1).permutation(100))
        m.run_steps(data, 3)
        m.begin_epoch(data, np.random.default_rng(2).permutation(100))
        m.run_steps(data, 3)
        runs[name] = (m.parameters(), m.step_stats(0, 3), m.logits(images[:40], batch_size=16))
    p_np, st_np, lg_np = runs["numpy"]
    for name in ("cpu", "cpu-unfused"):
        p, st, lg = runs[name]
        assert_close(p, p_np, atol=2e-5, rtol=1e-4, what=f"{name} params vs numpy")
        assert_close(st, st_np, atol=1e-4, rtol=1e-4, what=f"{name} stats vs numpy")
        assert_close(lg, lg_np, atol=1e-4, rtol=1e-4, what=f"{name} logits vs numpy")


def test_model_counters_and_repeatability():
    from lenet_gpu import LeNet5

    images, labels = _batch(80, seed=6)
    params = []
    for _ in range(2):
        m = LeNet5(backend="cpu", seed=1)
        data = m.upload_dataset(images, labels)
        m.begin_run(data, 16, 1e-3, seed=3, shift=2)
        m.begin_epoch(data, np.arange(80))
        m.run_steps(data, 1)  # warm-up: the workspaces
        before = m.backend.counters.snapshot()
        m.run_steps(data, 4)
        d = m.backend.counters.since(before)
        assert d == {"launches": 4 * 4, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}, d
        assert m.step4 and m.ops_per_step() == 4  # the four-kernel step (docs/step4.md)
        params.append(m.parameters())
    assert_equal(params[0], params[1], what="two runs")


def test_train_cli_interrupt_and_resume_are_bit_exact(tmp_path):
    from lenet_gpu.model import read_checkpoint

    from .test_cli import run

    common = ["--dataset", "mnist-sample", "--backend", "cpu", "--no-progress", "--limit", "256", "--epochs", "2",
              "--batch-size", "32", "--log-every", "1"]
    full = tmp_path / "full.npz"
    p = run("lenet_gpu.train", *common, "--checkpoint", str(full))
    assert p.returncode == 0, p.stderr
    part = tmp_path / "part.npz"
    p = run("lenet_gpu.train", *common, "--checkpoint", str(part), "--stop-after", "11")  # mid epoch 2
    assert p.returncode == 130, p.stderr
    r = run("lenet_gpu.train", "--resume", str(part), "--backend", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert_equal(read_checkpoint(part)["params"], read_checkpoint(full)["params"], what="resumed vs uninterrupted")


def test_block_size_follows_the_vector_width():
    """AVX-512 code: the first size dividing n (else 2, n padded); AVX2 code: one filter a block."""
    from lenet_gpu.backends.cpu_backend import common, conv2d

    assert conv2d.block_size(6, wide=True) == (6, 6) and conv2d.block_size(16, wide=True) == (4, 16)
    assert conv2d.block_size(6, (4, 3), wide=True) == (3, 6) and conv2d.block_size(7, (4, 3), wide=True) == (2, 8)
    assert conv2d.block_size(6, wide=False) == (1, 6) and conv2d.block_size(16, (4, 3), wide=False) == (1, 16)
    assert conv2d.block_size(16) == conv2d.block_size(16, wide=common.WIDE_VECTORS)


@pytest.mark.parametrize("act,pool", [("relu", "max"), ("tanh", "avg")])
def test_narrow_vector_blocks_give_the_same_bits(monkeypatch, act, pool):
    """The register blocks of AVX2 code (one filter a block, conv2d.block_size) on this CPU: a training step and
    inference give the bits of the AVX-512 blocks (a block changes which filters share a pass, not any output's
    order of sums)."""
    from lenet_gpu import LeNet5
    from lenet_gpu.backends.cpu_backend import conv2d

    images, labels = _batch(35, seed=6)
    out = {}
    for wide in (True, False):
        monkeypatch.setattr(conv2d, "WIDE_VECTORS", wide)
        m = LeNet5(backend="cpu", activation=act, pool=pool, seed=4)
        loss = m.train_step(images, labels)
        out[wide] = (loss, m.parameters(), m.logits(images))
    assert out[True][0] == out[False][0]
    assert np.array_equal(out[True][1], out[False][1]) and np.array_equal(out[True][2], out[False][2])


def test_dense_lane_blocks_of_4_and_8_give_the_same_bits(monkeypatch):
    """The dense lane kernels compiled with AVX2 code's block (dense.OB = 4 outputs) and AVX-512's (8) give the same
    bits: a block changes which outputs share a pass, not any output's order of sums. Counts that are not multiples
    of either block (10 outputs, 84 inputs) give both a partial last block, and rows_dw an overlapping last vector."""
    from lenet_gpu.backends.cpu_backend import common, dense

    rng = np.random.default_rng(5)
    O, I, B = 10, 84, 21
    w = rng.standard_normal((O, I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    xt = rng.standard_normal((I, common.L)).astype(np.float32)
    dt = rng.standard_normal((O, common.L)).astype(np.float32)
    dzr = np.zeros((B, O + 8), np.float32)  # columns up to o0 + OB, zero past O (rows_dw's contract)
    dzr[:, :O] = rng.standard_normal((B, O))
    xr = rng.standard_normal((B, I)).astype(np.float32)
    out = {}
    for ob in (4, 8):
        monkeypatch.setattr(dense, "OB", ob)
        monkeypatch.setattr(dense, "OB_TILE", ob * common.L)
        fresh = {name: common.njit(**dict(common.JIT, cache=False))(getattr(dense, name).py_func)
                 for name in ("lane_dense", "lane_dense_t", "rows_dw")}
        yt = np.full((O, common.L), np.nan, np.float32)
        fresh["lane_dense"](w, b, xt, yt, common.TANH)
        gt = np.full((I, common.L), np.nan, np.float32)
        fresh["lane_dense_t"](w, dt, gt)
        dw = np.full((O, I), np.nan, np.float32)
        db = np.full(O, np.nan, np.float32)
        for o0 in range(0, O, ob):
            fresh["rows_dw"](dzr, xr, dw, db, o0, 0, I, B)
        out[ob] = (yt, gt, dw, db)
        assert not any(np.isnan(a).any() for a in out[ob]), ob
    for a4, a8 in zip(out[4], out[8], strict=True):
        assert np.array_equal(a4, a8)
    assert np.allclose(out[8][0], np.tanh(w.astype(np.float64) @ xt + b[:, None]), rtol=1e-5, atol=1e-6)
