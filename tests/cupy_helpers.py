"""Op-level parity checks for the cupy backend (GPU or CPU harness), shared by tests/test_cupy_backend.py.

Every check builds seeded inputs, poisons the outputs with NaN, launches the backend op once on device
copies, and compares against the float64 reference of lenet_gpu.reference with tests/parity.py's TOL.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lenet_gpu import reference as ref
from lenet_gpu.stepstate import HostState, advance, schedule_table
from tests.parity import TOL, assert_close, assert_equal, nan_like, rand

F64 = np.float64


def d64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=F64)


def _wscale(ws: tuple[int, ...]) -> float:
    """Weights scaled like the network's init (1/sqrt(fan_in)), so outputs stay O(1) at any C·R·S."""
    return float(1.0 / np.sqrt(np.prod(ws[1:])))


def activated(shape: tuple[int, ...], act: str, seed: int) -> np.ndarray:
    """A plausible activated output of ``act`` (so that act'(y) is meaningful), float32."""
    return ref.activate(rand(shape, seed), act).astype(np.float32)


class Dev:
    """Moves arrays to and from a backend's device (the cupy and fused op checks)."""

    def __init__(self, be: Any) -> None:
        self.be = be

    def put(self, a: np.ndarray | None) -> Any:
        return None if a is None else self.be.to_device(np.ascontiguousarray(a))

    def get(self, a: Any) -> np.ndarray:
        return self.be.to_host(a)


def check_conv2d_fwd(be: Any, variant: str, xs: tuple, ws: tuple, act: str, seed: int = 0) -> None:
    d = Dev(be)
    x, w, b = rand(xs, seed), rand(ws, seed + 1, _wscale(ws)), rand((ws[0],), seed + 2)
    n, _, h, wd = xs
    k, _, r, s = ws
    y = d.put(nan_like((n, k, h - r + 1, wd - s + 1)))
    be.conv2d_fwd(d.put(x), d.put(w), d.put(b), y, act, variant=variant)
    want = ref.conv2d_fwd(d64(x), d64(w), d64(b), act)
    assert_close(d.get(y), want, *TOL["conv2d_fwd"], what=f"conv2d_fwd_{variant} {act} x{xs} w{ws}")


def check_conv2d_pool_fwd(be: Any, variant: str, xs: tuple, ws: tuple, act: str, mode: str, seed: int = 0) -> None:
    d = Dev(be)
    x, w, b = rand(xs, seed), rand(ws, seed + 1, _wscale(ws)), rand((ws[0],), seed + 2)
    n, _, h, wd = xs
    k, _, r, s = ws
    p, q = h - r + 1, wd - s + 1
    what = f"conv2d_pool_fwd_{variant} {act} {mode} x{xs} w{ws}"
    dx, dw, db = d.put(x), d.put(w), d.put(b)
    yconv = d.put(nan_like((n, k, p, q)))
    ypool = d.put(nan_like((n, k, p // 2, q // 2)))
    am = d.put(nan_like((n, k, p // 2, q // 2), np.uint8))
    be.conv2d_pool_fwd(dx, dw, db, yconv, ypool, am, act, mode, variant=variant)
    yc = d.get(yconv)
    assert_close(yc, ref.conv2d_fwd(d64(x), d64(w), d64(b), act), *TOL["conv2d_fwd"], what=what + " yconv")
    # pooling is checked exactly against the reference pool of the kernel's own conv output (a float64
    # conv could order near-ties differently)
    want_pool, want_am = ref.pool2x2_fwd(yc, mode)
    got_pool = d.get(ypool)
    if mode == "max":
        assert_equal(got_pool, want_pool, what + " ypool")
        assert_equal(d.get(am), want_am, what + " argmax")
    else:
        assert_close(got_pool, d64(want_pool), *TOL["pool2x2_bwd"], what=what + " ypool")
    # inference form: yconv None → the same pool, nothing else written
    ypool2 = d.put(nan_like((n, k, p // 2, q // 2)))
    am2 = d.put(nan_like((n, k, p // 2, q // 2), np.uint8))
    be.conv2d_pool_fwd(dx, dw, db, None, ypool2, am2, act, mode, variant=variant)
    assert_equal(d.get(ypool2), got_pool, what + " ypool (yconv=None)")
    if mode == "max":
        assert_equal(d.get(am2), want_am, what + " argmax (yconv=None)")


def check_pool2x2_fwd(be: Any, variant: str, xs: tuple, mode: str, seed: int = 0) -> None:
    d = Dev(be)
    x = rand(xs, seed)
    x[..., ::3, ::2] = 0.5  # ties: the first maximum must win
    n, c, h, w = xs
    y = d.put(nan_like((n, c, h // 2, w // 2)))
    am = d.put(nan_like((n, c, h // 2, w // 2), np.uint8))
    be.pool2x2_fwd(d.put(x), y, am, mode, variant=variant)
    want, want_am = ref.pool2x2_fwd(d64(x), mode)
    what = f"pool2x2_fwd_{variant} {mode} x{xs}"
    if mode == "max":
        assert_close(d.get(y), want, *TOL["pool2x2_fwd"], what=what)
        assert_equal(d.get(am), want_am, what + " argmax")
    else:  # a float32 mean of 4 is not exact: the elementwise tolerance of pool2x2_bwd
        assert_close(d.get(y), want, *TOL["pool2x2_bwd"], what=what)


def check_pool2x2_bwd(be: Any, variant: str, zs: tuple, mode: str, act: str, seed: int = 0) -> None:
    d = Dev(be)
    n, c, h, w = zs
    dy = rand((n, c, h // 2, w // 2), seed)
    am = np.random.default_rng(seed).integers(0, 4, size=dy.shape).astype(np.uint8)
    yconv = activated(zs, act, seed + 1)
    dz = d.put(nan_like(zs))
    be.pool2x2_bwd(d.put(dy), d.put(am), d.put(yconv), dz, mode, act, variant=variant)
    want = ref.pool2x2_bwd(d64(dy), am if mode == "max" else None, mode, (h, w)) * ref.activation_grad(d64(yconv), act)
    assert_close(d.get(dz), want, *TOL["pool2x2_bwd"], what=f"pool2x2_bwd_{variant} {mode} {act} dz{zs}")


def check_dense_fwd(be: Any, variant: str, n: int, i: int, o: int, act: str, seed: int = 0) -> None:
    d = Dev(be)
    x, w, b = rand((n, i), seed), rand((o, i), seed + 1, 1 / np.sqrt(i)), rand((o,), seed + 2)
    y = d.put(nan_like((n, o)))
    be.dense_fwd(d.put(x), d.put(w), d.put(b), y, act, variant=variant)
    assert_close(d.get(y), ref.dense_fwd(d64(x), d64(w), d64(b), act), *TOL["dense_fwd"],
                 what=f"dense_fwd_{variant} {act} ({n},{i})->{o}")


def check_dense_bwd(be: Any, variant: str, n: int, i: int, o: int, act: str, with_dx: bool, seed: int = 0) -> None:
    d = Dev(be)
    x, w = rand((n, i), seed), rand((o, i), seed + 1, 1 / np.sqrt(i))
    y, dy = activated((n, o), act, seed + 2), rand((n, o), seed + 3)
    dx = d.put(nan_like((n, i))) if with_dx else None
    dw, db = d.put(nan_like((o, i))), d.put(nan_like((o,)))
    be.dense_bwd(d.put(x), d.put(w), d.put(y), d.put(dy), dx, dw, db, act, variant=variant)
    wdx, wdw, wdb = ref.dense_bwd(d64(x), d64(w), d64(y), d64(dy), act)
    what = f"dense_bwd_{variant} {act} ({n},{i})->{o}"
    if with_dx:
        assert_close(d.get(dx), wdx, *TOL["dense_bwd"], what=what + " dx")
    assert_close(d.get(dw), wdw, *TOL["dense_bwd"], what=what + " dw")
    assert_close(d.get(db), wdb, *TOL["dense_bwd"], what=what + " db")


def check_conv2d_bwd_data(be: Any, variant: str, xs: tuple, ws: tuple, seed: int = 0) -> None:
    d = Dev(be)
    n, c, h, wd = xs
    k, _, r, s = ws
    dzs = (n, k, h - r + 1, wd - s + 1)
    dz, w = rand(dzs, seed), rand(ws, seed + 1, _wscale(ws))
    dx = d.put(nan_like(xs))
    be.conv2d_bwd_data(d.put(dz), d.put(w), dx, variant=variant)
    want, _, _ = ref.conv2d_bwd(np.zeros(xs), d64(w), np.zeros(dzs), d64(dz), "identity")
    assert_close(d.get(dx), want, *TOL["conv2d_bwd_data"], what=f"conv2d_bwd_data_{variant} x{xs} w{ws}")


def check_conv2d_bwd_data_pool(be: Any, variant: str, ys: tuple, ws: tuple, mode: str, act: str,
                               seed: int = 0) -> None:
    """dz_below (yconv's shape ys) = reference.conv2d_bwd_data_pool: the data gradient of a convolution over
    the 2×2 pooling of yconv, routed back through that pooling, times act'(yconv). NaN-poisoned output."""
    d = Dev(be)
    n, c, h, wd = ys
    k, _, r, s = ws
    hp, wp = h // 2, wd // 2
    dzs = (n, k, hp - r + 1, wp - s + 1)
    dz, w = rand(dzs, seed), rand(ws, seed + 1, _wscale(ws))
    yconv = activated(ys, act, seed + 2)
    am = np.random.default_rng(seed).integers(0, 4, size=(n, c, hp, wp)).astype(np.uint8)
    out = d.put(nan_like(ys))
    be.conv2d_bwd_data_pool(d.put(dz), d.put(w), d.put(am) if mode == "max" else None, d.put(yconv), out, mode, act,
                            variant=variant)
    want = ref.conv2d_bwd_data_pool(d64(dz), d64(w), am if mode == "max" else None, d64(yconv), mode, act)
    assert_close(d.get(out), want, *TOL["conv2d_bwd_data"],
                 what=f"conv2d_bwd_data_pool_{variant} {mode} {act} yconv{ys} w{ws}")


def check_conv2d_bwd_weight(be: Any, variant: str, xs: tuple, ws: tuple, seed: int = 0) -> tuple:
    d = Dev(be)
    n, c, h, wd = xs
    k, _, r, s = ws
    dzs = (n, k, h - r + 1, wd - s + 1)
    x, dz = rand(xs, seed), rand(dzs, seed + 1, 0.1)
    dw, db = d.put(nan_like(ws)), d.put(nan_like((k,)))
    be.conv2d_bwd_weight(d.put(x), d.put(dz), dw, db, variant=variant)
    _, wdw, wdb = ref.conv2d_bwd(d64(x), np.zeros(ws), np.zeros(dzs), d64(dz), "identity")
    what = f"conv2d_bwd_weight_{variant} x{xs} w{ws}"
    got_dw, got_db = d.get(dw), d.get(db)
    assert_close(got_dw, wdw, *TOL["conv2d_bwd_weight"], what=what + " dw")
    assert_close(got_db, wdb, *TOL["conv2d_bwd_weight"], what=what + " db")
    return got_dw, got_db


def state_array(**words: int) -> np.ndarray:
    """An int32 step state (lenet_gpu.stepstate.HostState fields as keywords; the seed may be any int)."""
    return HostState(**words).to_array()


def schedule(rows: int, first_step: int, beta1: float = 0.9, beta2: float = 0.999, seed: int = 0) -> np.ndarray:
    """A (rows, 4) schedule table with distinct learning rates per row."""
    lrs = 1e-3 * (1.0 + np.random.default_rng(seed).random(rows))
    return schedule_table(lrs, first_step, beta1, beta2)


def check_softmax_xent(be: Any, variant: str, n: int, nc: int, seed: int = 0, rows: int = 3,
                       step_in_epoch: int = 4, step: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """dlogits, and the stats row STEP_IN_EPOCH mod S overwritten with [Σ loss, correct]; the other rows
    untouched. Returns the host (dlogits, stats)."""
    d = Dev(be)
    logits = rand((n, nc), seed, 3.0)
    logits[0, :] = 1.0  # a row of ties: the first maximum is the prediction
    labels = np.random.default_rng(seed).integers(0, nc, size=n).astype(np.int32)
    labels[0] = 0
    dl = d.put(nan_like((n, nc)))
    stats0 = np.full((rows, 2), 7.5, np.float32)  # stale values: the row must be overwritten, not added to
    stats = d.put(stats0)
    state = d.put(state_array(step=step, step_in_epoch=step_in_epoch))
    be.softmax_xent(d.put(logits), d.put(labels), dl, stats, state, variant=variant)
    loss, want = ref.softmax_xent(d64(logits), labels)
    what = f"softmax_xent_{variant} ({n},{nc})"
    got_dl = d.get(dl)
    assert_close(got_dl, want, *TOL["softmax_xent"], what=what + " dlogits")
    correct = int((np.argmax(logits, axis=1) == labels).sum())
    got = d.get(stats)
    row = step_in_epoch % rows
    assert_close(got[row], np.array([loss * n, correct]), 1e-5, 1e-5, what=what + f" stats[{row}]")
    others = np.delete(got, row, axis=0)
    assert_equal(others, np.delete(stats0, row, axis=0), what + " other stats rows")
    return got_dl, got


def check_adam(be: Any, variant: str, size: int, seed: int = 0) -> None:
    """The row of the schedule table the state selects: STEP − SCHED_BASE inside, below and past the table."""
    d = Dev(be)
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    base, rows = 5, 4
    sched = schedule(rows, base, b1, b2, seed)
    dsched = d.put(sched)
    for step, row in ((base + 2, 2), (base - 3, 0), (base + 9, rows - 1)):
        p, g, m = rand((size,), seed), rand((size,), seed + 1), rand((size,), seed + 2, 0.1)
        v = np.abs(rand((size,), seed + 3, 0.01))
        dp, dm, dv = d.put(p), d.put(m), d.put(v)
        state = d.put(state_array(step=step, sched_base=base))
        be.adam_step(dp, d.put(g), dm, dv, dsched, state, b1, b2, eps, wd, variant=variant)
        t = base + row + 1
        wp, wm, wv = ref.adam_update(d64(p), d64(g), d64(m), d64(v), t, float(sched[row, 0]), b1, b2, eps, wd)
        what = f"adam_step_{variant} n={size} step={step} (row {row})"
        for name, got, want in (("p", dp, wp), ("m", dm, wm), ("v", dv, wv)):
            assert_close(d.get(got), want, *TOL["adam_step"], what=f"{what} {name}")


def check_sgd(be: Any, variant: str, size: int, seed: int = 0) -> None:
    d = Dev(be)
    mom, wd = 0.9, 0.01
    base, rows = 2, 3
    sched = schedule(rows, base, seed=seed)
    dsched = d.put(sched)
    for step, row in ((base + 1, 1), (base - 2, 0), (base + 7, rows - 1)):
        p, g, m = rand((size,), seed), rand((size,), seed + 1), rand((size,), seed + 2, 0.1)
        dp, dm = d.put(p), d.put(m)
        state = d.put(state_array(step=step, sched_base=base))
        be.sgd_step(dp, d.put(g), dm, dsched, state, mom, wd, variant=variant)
        wp, wm = ref.sgd_update(d64(p), d64(g), d64(m), float(sched[row, 0]), mom, wd)
        for name, got, want in (("p", dp, wp), ("m", dm, wm)):
            assert_close(d.get(got), want, *TOL["sgd_step"], what=f"sgd_step_{variant} n={size} step={step} {name}")


def check_batch_prepare(be: Any, variant: str, n: int, b: int, offset: int, seed: int = 0, aug_seed: int = 0,
                        epoch: int = 0, shift: int = 0, m: int | None = None) -> None:
    """j = perm[(OFFSET + r) mod M], shifted by reference.augment_shift(SEED, EPOCH, j, SHIFT). Random
    pixels: a shift off by one pixel, or a wrong sample, fails the comparison."""
    d = Dev(be)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    m = n if m is None else m
    perm = rng.integers(0, n, size=m).astype(np.int32)
    mean, std = 0.1307, 0.3081
    x, y = d.put(nan_like((b, 1, 32, 32))), d.put(nan_like((b,), np.int32))
    state = d.put(state_array(offset=offset, epoch=epoch, seed=aug_seed, shift=shift))
    be.batch_prepare(d.put(images), d.put(labels), d.put(perm), state, x, y, mean, std, variant=variant)
    taken = perm[(offset + np.arange(b)) % m]  # the modulo keeps a stale offset in bounds
    want_x, want_y = ref.batch_prepare(images, labels, taken, 0, b, mean, std, seed=aug_seed, epoch=epoch,
                                       max_shift=shift)
    what = f"batch_prepare_{variant} seed={aug_seed} epoch={epoch} shift={shift} offset={offset}"
    assert_close(d.get(x), want_x, *TOL["batch_prepare"], what=what + " x")
    assert_equal(d.get(y), want_y, what + " y")


def check_step_advance(be: Any, variant: str, words: dict[str, int], batch: int, steps: int = 1) -> None:
    """The device state after ``steps`` step_advance launches equals stepstate.advance applied as often."""
    d = Dev(be)
    host = HostState(**words)
    state = d.put(host.to_array())
    for _ in range(steps):
        be.step_advance(state, batch, variant=variant)
        host = advance(host, batch)
    assert_equal(d.get(state), host.to_array(), f"step_advance_{variant} from {words} batch {batch} x{steps}")


def poison_tickets(be: Any, op: str, value: int) -> int:
    """Overwrite the last-block tickets of every cached ``op`` launch with ``value`` (as an aborted launch
    could leave them). Returns how many ticket buffers were poisoned."""
    count = 0
    for tickets in be.ticket_buffers(op):
        be.upload(tickets, np.full(tickets.shape, value, np.uint64))
        count += 1
    return count
