"""Op parity for the self-test: every op × variant × activation × pool mode of a backend against the
float64 reference, outputs poisoned with NaN, with the worst error of every case.

The ops and their variants come from ``backend.variants``, so a new variant is checked without
editing this file. Each op of the protocol (lenet_gpu.backends.base, the optional fused ops included)
has a builder here that makes seeded host inputs and the expected outputs for one input set: shapes,
activation, pool mode. ``run_case`` uploads them, launches the op once on the device, reads every
output back and compares (lenet_gpu.parity tolerances); ops with reductions or last-block tickets are
launched a second time and must repeat bit for bit.

Input sets come in tiers, so a run cut short by its time budget has covered every op and variant
before it spends time on more activations and shapes: tier 0 is one set per op at its first shape
(relu, max), tier 1 every activation and pool mode at that shape, tier 2 the other shapes (relu), tier
3 the other shapes with every activation and pool mode.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import reference as ref
from ..parity import TOL, error_stats, nan_like, rand
from ..spec import NetConfig, conv_prefix, param_layout
from ..stepstate import SEED, STATE_WORDS, HostState, advance, schedule_table

F64 = np.float64
ACTS = ref.ACTIVATIONS  # identity, relu, tanh, lecun_tanh, sigmoid
MODEL_ACTS = tuple(a for a in ACTS if a != "identity")
MODES = ref.POOL_MODES
#: a value written into rows and words an op must leave alone
SENTINEL = 1234.5
MEAN, STD = 0.1307, 0.3081


# ------------------------------------------------------------------------------------ case description
@dataclass
class Arg:
    """One positional argument of an op call: an input array ("in"), an output poisoned with NaN
    ("out"), an array the op reads and writes ("inout"), None, a plain value, or a dict of input
    arrays ("params", lenet_fwd)."""

    kind: str
    name: str = ""
    value: Any = None


@dataclass
class Expect:
    """An output compared with its reference: within (atol, rtol), or ``exact`` (bit for bit). ``want``
    may be a function of every output read back (e.g. the pooling of the kernel's own conv output);
    ``mask`` (a function of the outputs too) limits the comparison to some elements."""

    name: str
    want: Any
    atol: float = 0.0
    rtol: float = 0.0
    exact: bool = False
    label: str = ""
    mask: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None


@dataclass
class Spec:
    """One input set of one op: the call and what its outputs must be."""

    args: list[Arg]
    expect: list[Expect]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: the step state passed as keyword ``state`` where the op takes it (conv2d_bwd_weight)
    state_kw: np.ndarray | None = None
    #: launch twice: the outputs must repeat bit for bit (reductions, tickets)
    repeat: bool = False


@dataclass
class InputSet:
    """An op at one set of shapes, activation and pool mode; ``build`` makes its Spec (cached)."""

    op: str
    tier: int
    desc: str
    act: str | None
    pool: str | None
    build: Callable[[], Spec]
    _spec: Spec | None = None

    def spec(self) -> Spec:
        if self._spec is None:
            self._spec = self.build()
        return self._spec

    def release(self) -> None:
        self._spec = None


class CheckFailed(AssertionError):
    """An op's outputs are out of tolerance; the message names every bad output (first lines)."""


# ------------------------------------------------------------------------------------ helpers
def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _d64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=F64)


def _wscale(ws: tuple[int, ...]) -> float:
    """Weights scaled like the network's init (1/sqrt(fan_in)), so outputs stay O(1) at any C·R·S."""
    return float(1.0 / np.sqrt(np.prod(ws[1:])))


def _activated(shape: tuple[int, ...], act: str, seed: int) -> np.ndarray:
    """A plausible activated output of ``act`` (so that act'(y) means something), float32."""
    return ref.activate(rand(shape, seed), act).astype(np.float32)


def _state(**words: int) -> np.ndarray:
    s = HostState(**words).to_array()
    assert s.shape == (STATE_WORDS,)
    return s


def _stats(rows: int) -> np.ndarray:
    return np.full((rows, 2), SENTINEL, np.float32)


def _decisive(ypool_want: np.ndarray, yconv64: np.ndarray, gap: float) -> np.ndarray:
    """Windows whose largest tap beats the second largest by more than ``gap`` (there float32 and
    float64 must pick the same argmax); ties within ``gap`` are left to the own-output check."""
    n, c, h, w = yconv64.shape
    ho, wo = ypool_want.shape[2], ypool_want.shape[3]
    win = yconv64[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).transpose(0, 1, 2, 4, 3, 5)
    taps = np.sort(win.reshape(n, c, ho, wo, 4), axis=-1)
    return (taps[..., 3] - taps[..., 2]) > gap


def _pool_expects(prefix: str, ypool: str, am: str | None, yconv64: np.ndarray, mode: str,
                  own_y: str | None) -> list[Expect]:
    """A pooled output: against the reference pooling of the float64 conv (the conv's tolerance), and
    where the kernel also wrote its conv output, exactly against the pooling of that output (max: copy
    and argmax; avg: one rounding). For max without the conv output, argmax must match the reference
    where the window is decisive. For avg, argmax must be left as it was (poisoned)."""
    tol = TOL["conv2d_fwd"]
    want64, am64 = ref.pool2x2_fwd(yconv64, mode)
    out = [Expect(ypool, want64, *tol, label=f"{prefix} pooled vs reference")]
    if own_y is not None:
        def own(o: dict, which: int) -> np.ndarray:
            return ref.pool2x2_fwd(o[own_y].astype(F64), mode)[which]
        if mode == "max":
            out.append(Expect(ypool, lambda o: own(o, 0), exact=True, label=f"{prefix} pooled vs its own conv"))
            if am is not None:
                out.append(Expect(am, lambda o: own(o, 1).astype(np.uint8), exact=True, label=f"{prefix} argmax"))
        else:
            out.append(Expect(ypool, lambda o: own(o, 0), *TOL["pool2x2_bwd"],
                              label=f"{prefix} pooled vs its own conv"))
    elif mode == "max" and am is not None:
        gap = 4 * (tol[0] + tol[1] * float(np.abs(yconv64).max()))
        decisive = _decisive(want64, yconv64, gap)
        out.append(Expect(am, am64.astype(np.uint8), exact=True, label=f"{prefix} argmax (decisive windows)",
                          mask=lambda o: decisive))
    if mode == "avg" and am is not None:
        poison = np.full(want64.shape, 255, np.uint8)
        out.append(Expect(am, poison, exact=True, label=f"{prefix} argmax left alone (avg)"))
    return out


# ------------------------------------------------------------------------------------ builders per op
def _batch_prepare(n: int, b: int, offset: int, shift: int, seed: int, epoch: int, s: int) -> Spec:
    rng = np.random.default_rng(s)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    state = _state(offset=offset, seed=seed, epoch=epoch, shift=shift, step=5, step_in_epoch=offset // max(b, 1))
    # the op reads perm[(OFFSET + r) mod M]: the reference reads the same entries from a doubled perm
    x_want, y_want = ref.batch_prepare(images, labels, np.concatenate([perm, perm]), offset, b, MEAN, STD,
                                       seed=int(state[SEED]), epoch=epoch, max_shift=shift)
    return Spec(
        args=[Arg("in", "images", images), Arg("in", "labels", labels), Arg("in", "perm", perm),
              Arg("in", "state", state), Arg("out", "x", nan_like((b, 1, 32, 32))),
              Arg("out", "y", nan_like((b,), np.int32)), Arg("value", "mean", MEAN), Arg("value", "std", STD)],
        expect=[Expect("x", x_want, *TOL["batch_prepare"]), Expect("y", y_want.astype(np.int32), exact=True)],
    )


def _conv2d_fwd(xs: tuple, ws: tuple, act: str, s: int) -> Spec:
    x, w, b = rand(xs, s), rand(ws, s + 1, _wscale(ws)), rand((ws[0],), s + 2)
    n, _, h, wd = xs
    k, _, r, q = ws
    return Spec(
        args=[Arg("in", "x", x), Arg("in", "w", w), Arg("in", "b", b),
              Arg("out", "y", nan_like((n, k, h - r + 1, wd - q + 1))), Arg("value", "act", act)],
        expect=[Expect("y", ref.conv2d_fwd(_d64(x), _d64(w), _d64(b), act), *TOL["conv2d_fwd"])],
    )


def _conv2d_pool_fwd(xs: tuple, ws: tuple, act: str, mode: str, with_y: bool, s: int) -> Spec:
    x, w, b = rand(xs, s), rand(ws, s + 1, _wscale(ws)), rand((ws[0],), s + 2)
    if act == "relu":
        b -= 2.0  # many zeros after relu: ties inside windows, where the first maximum must win
    n, _, h, wd = xs
    k, _, r, q = ws
    ys = (n, k, h - r + 1, wd - q + 1)
    ps = (n, k, ys[2] // 2, ys[3] // 2)
    y64 = ref.conv2d_fwd(_d64(x), _d64(w), _d64(b), act)
    expect = _pool_expects("", "ypool", "argmax", y64, mode, "yconv" if with_y else None)
    if with_y:
        expect.insert(0, Expect("yconv", y64, *TOL["conv2d_pool_fwd"]))
    return Spec(
        args=[Arg("in", "x", x), Arg("in", "w", w), Arg("in", "b", b),
              Arg("out", "yconv", nan_like(ys)) if with_y else Arg("none", "yconv"),
              Arg("out", "ypool", nan_like(ps)), Arg("out", "argmax", nan_like(ps, np.uint8)),
              Arg("value", "act", act), Arg("value", "mode", mode)],
        expect=expect,
    )


def _pool2x2_fwd(xs: tuple, mode: str, s: int) -> Spec:
    x = rand(xs, s)
    x[..., ::3, ::2] = 0.5  # ties: the first maximum must win
    n, c, h, w = xs
    ps = (n, c, h // 2, w // 2)
    want, want_am = ref.pool2x2_fwd(_d64(x), mode)
    expect = [Expect("y", want, *(TOL["pool2x2_fwd"] if mode == "max" else TOL["pool2x2_bwd"]))]
    if mode == "max":
        expect.append(Expect("argmax", want_am.astype(np.uint8), exact=True))
    else:
        expect.append(Expect("argmax", np.full(ps, 255, np.uint8), exact=True, label="argmax left alone (avg)"))
    return Spec(args=[Arg("in", "x", x), Arg("out", "y", nan_like(ps)), Arg("out", "argmax", nan_like(ps, np.uint8)),
                      Arg("value", "mode", mode)], expect=expect)


def _pool2x2_bwd(zs: tuple, mode: str, act: str, s: int) -> Spec:
    n, c, h, w = zs
    dy = rand((n, c, h // 2, w // 2), s)
    am = np.random.default_rng(s).integers(0, 4, size=dy.shape).astype(np.uint8)
    yconv = _activated(zs, act, s + 1)
    routed = ref.pool2x2_bwd(_d64(dy), am if mode == "max" else None, mode, (h, w))
    want = routed * ref.activation_grad(_d64(yconv), act)
    return Spec(args=[Arg("in", "dy", dy), Arg("in", "argmax", am), Arg("in", "yconv", yconv),
                      Arg("out", "dz", nan_like(zs)), Arg("value", "mode", mode), Arg("value", "act", act)],
                expect=[Expect("dz", want, *TOL["pool2x2_bwd"])])


def _dense_fwd(n: int, i: int, o: int, act: str, s: int) -> Spec:
    x, w, b = rand((n, i), s), rand((o, i), s + 1, 1 / np.sqrt(i)), rand((o,), s + 2)
    return Spec(args=[Arg("in", "x", x), Arg("in", "w", w), Arg("in", "b", b), Arg("out", "y", nan_like((n, o))),
                      Arg("value", "act", act)],
                expect=[Expect("y", ref.dense_fwd(_d64(x), _d64(w), _d64(b), act), *TOL["dense_fwd"])])


def _dense_bwd(n: int, i: int, o: int, act: str, with_dx: bool, s: int) -> Spec:
    x, w = rand((n, i), s), rand((o, i), s + 1, 1 / np.sqrt(i))
    y, dy = _activated((n, o), act, s + 2), rand((n, o), s + 3)
    wdx, wdw, wdb = ref.dense_bwd(_d64(x), _d64(w), _d64(y), _d64(dy), act)
    tol = TOL["dense_bwd"]
    expect = [Expect("dw", wdw, *tol), Expect("db", wdb, *tol)]
    if with_dx:
        expect.insert(0, Expect("dx", wdx, *tol))
    return Spec(args=[Arg("in", "x", x), Arg("in", "w", w), Arg("in", "y", y), Arg("in", "dy", dy),
                      Arg("out", "dx", nan_like((n, i))) if with_dx else Arg("none", "dx"),
                      Arg("out", "dw", nan_like((o, i))), Arg("out", "db", nan_like((o,))), Arg("value", "act", act)],
                expect=expect, repeat=True)


def _conv2d_bwd_data(xs: tuple, ws: tuple, s: int) -> Spec:
    n, c, h, wd = xs
    k, _, r, q = ws
    dzs = (n, k, h - r + 1, wd - q + 1)
    dz, w = rand(dzs, s), rand(ws, s + 1, _wscale(ws))
    want, _, _ = ref.conv2d_bwd(np.zeros(xs), _d64(w), np.zeros(dzs), _d64(dz), "identity")
    return Spec(args=[Arg("in", "dz", dz), Arg("in", "w", w), Arg("out", "dx", nan_like(xs))],
                expect=[Expect("dx", want, *TOL["conv2d_bwd_data"])])


def _conv2d_bwd_weight(xs: tuple, ws: tuple, s: int) -> Spec:
    n, c, h, wd = xs
    k, _, r, q = ws
    dzs = (n, k, h - r + 1, wd - q + 1)
    x, dz = rand(xs, s), rand(dzs, s + 1, 0.1)
    _, wdw, wdb = ref.conv2d_bwd(_d64(x), np.zeros(ws), np.zeros(dzs), _d64(dz), "identity")
    tol = TOL["conv2d_bwd_weight"]
    return Spec(args=[Arg("in", "x", x), Arg("in", "dz", dz), Arg("out", "dw", nan_like(ws)),
                      Arg("out", "db", nan_like((k,)))],
                expect=[Expect("dw", wdw, *tol), Expect("db", wdb, *tol)],
                state_kw=_state(step=7), repeat=True)


def _conv2d_bwd_data_pool(dzs: tuple, ws: tuple, ys: tuple, act: str, mode: str, s: int) -> Spec:
    n, k, ho, wo = dzs
    _, c, r, q = ws
    ps = (n, c, ho + r - 1, wo + q - 1)
    assert ps[2] == ys[2] // 2 and ps[3] == ys[3] // 2, (dzs, ws, ys)
    dz, w = rand(dzs, s), rand(ws, s + 1, _wscale(ws))
    am = np.random.default_rng(s).integers(0, 4, size=ps).astype(np.uint8)
    yconv = _activated(ys, act, s + 2)
    want = ref.conv2d_bwd_data_pool(_d64(dz), _d64(w), am if mode == "max" else None, _d64(yconv), mode, act)
    return Spec(args=[Arg("in", "dz", dz), Arg("in", "w", w),
                      Arg("in", "argmax", am) if mode == "max" else Arg("none", "argmax"),
                      Arg("in", "yconv", yconv), Arg("out", "dz_below", nan_like(ys)),
                      Arg("value", "mode", mode), Arg("value", "act", act)],
                expect=[Expect("dz_below", want, *TOL["conv2d_bwd_data_pool"])])


def _routed_inputs(xs: tuple, ws: tuple, s: int, gscale: float = 0.1) -> tuple[tuple, np.ndarray, np.ndarray]:
    """The routed gradient gz (N,K,Hp,Wp) of a conv of ``xs`` by ``ws`` + 2x2 max pool (standard normal times
    ``gscale``), and random routes."""
    n, _, h, wd = xs
    k, _, r, q = ws
    gs = (n, k, (h - r + 1) // 2, (wd - q + 1) // 2)
    gz = rand(gs, s + 1, gscale)
    am = np.random.default_rng(s + 2).integers(0, 4, size=gs).astype(np.uint8)
    return gs, gz, am


def _conv2d_bwd_weight_routed(xs: tuple, ws: tuple, s: int, gscale: float = 0.1) -> Spec:
    k, _, r, q = ws
    x = rand(xs, s)
    _, gz, am = _routed_inputs(xs, ws, s, gscale)
    wdw, wdb = ref.conv2d_bwd_weight_routed(_d64(x), _d64(gz), am, r, q)
    tol = TOL["conv2d_bwd_weight_routed"]
    return Spec(args=[Arg("in", "x", x), Arg("in", "gz", gz), Arg("in", "argmax", am), Arg("out", "dw", nan_like(ws)),
                      Arg("out", "db", nan_like((k,)))],
                expect=[Expect("dw", wdw, *tol), Expect("db", wdb, *tol)],
                state_kw=_state(step=7), repeat=True)


def _conv2d_bwd_data_routed(xs: tuple, ws: tuple, act: str, s: int, gscale: float = 0.1) -> Spec:
    _, gz, am = _routed_inputs(xs, ws, s, gscale)
    w = rand(ws, s + 3, _wscale(ws))
    y_below = _activated(xs, act, s + 4)
    want = ref.conv2d_bwd_data_routed(_d64(gz), _d64(w), am, _d64(y_below), act)
    return Spec(args=[Arg("in", "gz", gz), Arg("in", "w", w), Arg("in", "argmax", am), Arg("in", "y_below", y_below),
                      Arg("out", "gz_below", nan_like(xs)), Arg("value", "act", act)],
                expect=[Expect("gz_below", want, *TOL["conv2d_bwd_data_routed"])], repeat=True)


def _softmax_xent(n: int, nc: int, s: int) -> Spec:
    logits = rand((n, nc), s, 3.0)
    logits[0, :] = 1.0  # a row of ties: the first maximum is the prediction
    labels = np.random.default_rng(s).integers(0, nc, size=n).astype(np.int32)
    labels[0] = 0
    loss, want = ref.softmax_xent(_d64(logits), labels)
    correct = int((np.argmax(logits, axis=1) == labels).sum())
    rows, step_in_epoch = 5, 7  # the op writes row 7 mod 5 = 2 and leaves the others alone
    stats_want = _stats(rows).astype(F64)
    stats_want[step_in_epoch % rows] = (loss * n, correct)
    return Spec(args=[Arg("in", "logits", logits), Arg("in", "labels", labels),
                      Arg("out", "dlogits", nan_like((n, nc))), Arg("inout", "stats", _stats(rows)),
                      Arg("in", "state", _state(step_in_epoch=step_in_epoch))],
                expect=[Expect("dlogits", want, *TOL["softmax_xent"]),
                        Expect("stats", stats_want, *TOL["softmax_xent"], label="stats (row 2 written, others kept)")],
                repeat=True)


def _adam_step(size: int, wd: float, clamp: bool, s: int) -> Spec:
    p, g, m = rand((size,), s), rand((size,), s + 1), rand((size,), s + 2, 0.1)
    v = np.abs(rand((size,), s + 3, 0.01))
    b1, b2, eps = 0.9, 0.999, 1e-8
    base, rows = 10, 4
    sched = schedule_table(np.array([1e-3, 2e-3, 3e-3, 4e-3]), base, b1, b2)
    step = base + (rows + 3 if clamp else 2)  # clamp: past the table's end the last row is used
    row = sched[min(step - base, rows - 1)]
    t = base + 1 + min(step - base, rows - 1)  # the t of the row the op reads
    wp, wm, wv = ref.adam_update(_d64(p), _d64(g), _d64(m), _d64(v), t, float(row[0]), b1, b2, eps, wd)
    tol = TOL["adam_step"]
    return Spec(args=[Arg("inout", "p", p), Arg("in", "g", g), Arg("inout", "m", m), Arg("inout", "v", v),
                      Arg("in", "sched", sched), Arg("in", "state", _state(step=step, sched_base=base)),
                      Arg("value", "beta1", b1), Arg("value", "beta2", b2), Arg("value", "eps", eps),
                      Arg("value", "weight_decay", wd)],
                expect=[Expect("p", wp, *tol), Expect("m", wm, *tol), Expect("v", wv, *tol)])


def _sgd_step(size: int, wd: float, clamp: bool, s: int) -> Spec:
    p, g, m = rand((size,), s), rand((size,), s + 1), rand((size,), s + 2, 0.1)
    base = 3
    sched = schedule_table(np.array([0.05, 0.04, 0.03]), base, 0.9, 0.999)
    step = base + (9 if clamp else 1)
    lr = float(sched[min(step - base, 2), 0])
    wp, wm = ref.sgd_update(_d64(p), _d64(g), _d64(m), lr, 0.9, wd)
    tol = TOL["sgd_step"]
    return Spec(args=[Arg("inout", "p", p), Arg("in", "g", g), Arg("inout", "m", m), Arg("in", "sched", sched),
                      Arg("in", "state", _state(step=step, sched_base=base)), Arg("value", "momentum", 0.9),
                      Arg("value", "weight_decay", wd)],
                expect=[Expect("p", wp, *tol), Expect("m", wm, *tol)])


def _step_advance(batch: int, wrap: bool) -> Spec:
    spe = 5
    st = HostState(step=41, sched_base=3, step_in_epoch=spe - 1 if wrap else 2, offset=(spe - 1 if wrap else 2) * batch,
                   epoch=6, steps_per_epoch=spe, seed=-7, shift=2)
    return Spec(args=[Arg("inout", "state", st.to_array()), Arg("value", "batch", batch)],
                expect=[Expect("state", advance(st, batch).to_array(), exact=True)])


def _head_train(b: int, c: int, hp: int, wp: int, h: int, w: int, h1: int, h2: int, act: str, mode: str,
                s: int, routed: bool = False) -> Spec:
    """routed (max only): yconv=None, and dz_conv at x's shape receives the routed gradient dx·act'(x)."""
    nc = 10
    i = c * hp * wp
    x = rand((b, c, hp, wp), s)
    labels = np.random.default_rng(s).integers(0, nc, size=b).astype(np.int32)
    w1, b1 = rand((h1, i), s + 1, 1 / np.sqrt(i)), rand((h1,), s + 2, 0.1)
    w2, b2 = rand((h2, h1), s + 3, 1 / np.sqrt(h1)), rand((h2,), s + 4, 0.1)
    w3, b3 = rand((nc, h2), s + 5, 1 / np.sqrt(h2)), rand((nc,), s + 6, 0.1)
    am = np.random.default_rng(s + 7).integers(0, 4, size=(b, c, hp, wp)).astype(np.uint8)
    yconv = _activated((b, c, h, w), act, s + 8)
    r = ref.head_train(_d64(x), labels, *map(_d64, (w1, b1, w2, b2, w3, b3)), am if mode == "max" else None,
                       None if routed else _d64(yconv), act, mode)
    rows, step_in_epoch = 4, 6
    stats_want = _stats(rows).astype(F64)
    stats_want[step_in_epoch % rows] = (r["loss_sum"], r["correct"])
    tol = TOL["head_train"]
    outs = [("h1", (b, h1)), ("h2", (b, h2)), ("logits", (b, nc))]
    grads = [("dw1", w1.shape), ("db1", b1.shape), ("dw2", w2.shape), ("db2", b2.shape), ("dw3", w3.shape),
             ("db3", b3.shape)]
    return Spec(
        args=[Arg("in", "x", x), Arg("in", "labels", labels), Arg("in", "w1", w1), Arg("in", "b1", b1),
              Arg("in", "w2", w2), Arg("in", "b2", b2), Arg("in", "w3", w3), Arg("in", "b3", b3),
              *(Arg("out", nm, nan_like(sh)) for nm, sh in outs),
              Arg("in", "argmax", am) if mode == "max" else Arg("none", "argmax"),
              Arg("none", "yconv") if routed else Arg("in", "yconv", yconv),
              Arg("out", "dz_conv", nan_like(x.shape if routed else yconv.shape)),
              *(Arg("out", nm, nan_like(sh)) for nm, sh in grads),
              Arg("inout", "stats", _stats(rows)), Arg("in", "state", _state(step_in_epoch=step_in_epoch)),
              Arg("value", "act", act), Arg("value", "mode", mode)],
        expect=[*(Expect(nm, r[nm], *tol) for nm, _ in outs), Expect("dz_conv", r["dz_conv"], *tol),
                *(Expect(nm, r[nm], *tol) for nm, _ in grads),
                Expect("stats", stats_want, *tol, label="stats (row 2 written, others kept)")],
        repeat=True,
    )


def _lenet_fwd(b: int, act: str, mode: str, s: int) -> Spec:
    from ..spec import init_params, views

    cfg = NetConfig(activation=act, pool=mode)
    params = {k: np.ascontiguousarray(v) for k, v in views(init_params(cfg, s % 1000), cfg).items()}
    images = np.random.default_rng(s).integers(0, 256, (b, 28, 28), dtype=np.uint8)
    want = ref.lenet_fwd(images, {k: _d64(v) for k, v in params.items()}, MEAN, STD, act, mode)
    return Spec(args=[Arg("in", "images", images), Arg("params", "params", params),
                      Arg("out", "logits", nan_like((b, 10))), Arg("value", "mean", MEAN), Arg("value", "std", STD),
                      Arg("value", "act", act), Arg("value", "mode", mode)],
                expect=[Expect("logits", want, *TOL["lenet_fwd"])])


# -------------------------------------------------------------- the four-kernel step (docs/step4.md)
def _step_params(s: int) -> dict[str, np.ndarray]:
    return {"c1.w": rand((6, 1, 5, 5), s, 0.2), "c1.b": rand((6,), s + 1, 0.1),
            "c3.w": rand((16, 6, 5, 5), s + 2, 1 / np.sqrt(150)), "c3.b": rand((16,), s + 3, 0.1)}


def _step_fwd(b: int, offset: int, shift: int, act: str, s: int) -> Spec:
    rng = np.random.default_rng(s)
    n = b + 4
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    state = _state(offset=offset, seed=s % 1000 - 500, epoch=3, shift=shift, step=12, sched_base=10)
    sched = schedule_table(np.array([1e-3, 2e-3, 3e-3, 4e-3]), 10, 0.9, 0.999)
    p = _step_params(s)
    want = ref.step_fwd(images, labels, perm, state, sched, b, p, MEAN, STD, act)
    a1 = ref.conv2d_fwd(want["x"], _d64(p["c1.w"]), _d64(p["c1.b"]), act)
    a3 = ref.conv2d_fwd(want["p1"], _d64(p["c3.w"]), _d64(p["c3.b"]), act)
    tol = TOL["step_fwd"]
    return Spec(
        args=[Arg("in", "images", images), Arg("in", "labels", labels), Arg("in", "perm", perm),
              Arg("inout", "state", state), Arg("in", "sched", sched), Arg("out", "srow", nan_like((4,))),
              Arg("out", "x", nan_like((b, 1, 32, 32))), Arg("out", "y", nan_like((b,), np.int32)),
              Arg("in", "w1", p["c1.w"]), Arg("in", "b1", p["c1.b"]), Arg("out", "p1", nan_like((b, 6, 14, 14))),
              Arg("out", "m1", nan_like((b, 6, 14, 14), np.uint8)), Arg("in", "w3", p["c3.w"]),
              Arg("in", "b3", p["c3.b"]), Arg("out", "p3", nan_like((b, 16, 5, 5))),
              Arg("out", "m3", nan_like((b, 16, 5, 5), np.uint8)), Arg("value", "mean", MEAN),
              Arg("value", "std", STD), Arg("value", "act", act)],
        expect=[Expect("x", want["x"], *TOL["batch_prepare"]), Expect("y", want["y"], exact=True),
                Expect("srow", want["srow"], exact=True), Expect("state", state.copy(), exact=True,
                                                                  label="state left alone"),
                *_pool_expects("S2", "p1", "m1", a1, "max", None),
                *[Expect(e.name, e.want, *(tol if e.name == "p3" else (e.atol, e.rtol)), exact=e.exact,
                         label=e.label, mask=e.mask) for e in _pool_expects("S4", "p3", "m3", a3, "max", None)]],
    )


def _step_bwd(b: int, groups: int, act: str, s: int, gscale: float = 1.0) -> Spec:
    rng = np.random.default_rng(s)
    x = rand((b, 1, 32, 32), s)
    p1 = _activated((b, 6, 14, 14), act, s + 1)
    gz3 = rand((b, 16, 5, 5), s + 2, gscale)
    m3 = rng.integers(0, 4, (b, 16, 5, 5)).astype(np.uint8)
    m1 = rng.integers(0, 4, (b, 6, 14, 14)).astype(np.uint8)
    w3 = rand((16, 6, 5, 5), s + 3, 1 / np.sqrt(150))
    want = ref.step_bwd(_d64(x), _d64(p1), _d64(gz3), m3, m1, _d64(w3), act, groups)
    return Spec(args=[Arg("in", "x", x), Arg("in", "p1", p1), Arg("in", "gz3", gz3), Arg("in", "m3", m3),
                      Arg("in", "m1", m1), Arg("in", "w3", w3), Arg("out", "gpart", nan_like((groups, conv_prefix()))),
                      Arg("value", "act", act)],
                expect=[Expect("gpart", want, *TOL["step_bwd"])], repeat=True)


def _step_update(op: str, b: int, groups: int, wd: float, s: int, size: int | None = None) -> Spec:
    """``size``: the flat parameter buffer's (default: LeNet-5's at F6 = 84)."""
    size, nc = size or param_layout()[1], conv_prefix()
    p, g, m = rand((size,), s), rand((size,), s + 1), rand((size,), s + 2, 0.1)
    gpart = rand((groups, nc), s + 4, 0.5)
    srow = np.array([2e-3, 0.19, 0.0199, 0.0], np.float32)  # lr, bc1, bc2 of some step t
    spe = 5
    st = HostState(step=41, sched_base=3, step_in_epoch=spe - 1, offset=(spe - 1) * b, epoch=6, steps_per_epoch=spe,
                   seed=-7, shift=2)
    g_want = _d64(g).copy()
    g_want[:nc] = ref.step_reduce(gpart)  # float32, in group order: every backend adds them so
    state_want = advance(st, b).to_array()
    if op == "step_adam":
        v = np.abs(rand((size,), s + 3, 0.01))
        b1, b2, eps = 0.9, 0.999, 1e-8
        # Adam with srow's [lr, bc1, bc2] (reference.adam_update takes t; the update written out takes the row)
        gg = g_want + wd * _d64(p)
        wm = b1 * _d64(m) + (1 - b1) * gg
        wv = b2 * _d64(v) + (1 - b2) * gg * gg
        wp = _d64(p) - float(srow[0]) * (wm / float(srow[1])) / (np.sqrt(wv / float(srow[2])) + eps)
        tol = TOL["adam_step"]
        return Spec(args=[Arg("inout", "p", p), Arg("inout", "g", g), Arg("in", "gpart", gpart), Arg("inout", "m", m),
                          Arg("inout", "v", v), Arg("in", "srow", srow), Arg("inout", "state", st.to_array()),
                          Arg("value", "batch", b), Arg("value", "beta1", b1), Arg("value", "beta2", b2),
                          Arg("value", "eps", eps), Arg("value", "weight_decay", wd)],
                    expect=[Expect("g", g_want, exact=True, label="g: the partials added in group order"),
                            Expect("p", wp, *tol), Expect("m", wm, *tol), Expect("v", wv, *tol),
                            Expect("state", state_want, exact=True)])
    wp, wm = ref.sgd_update(_d64(p), g_want, _d64(m), float(srow[0]), 0.9, wd)
    tol = TOL["sgd_step"]
    return Spec(args=[Arg("inout", "p", p), Arg("inout", "g", g), Arg("in", "gpart", gpart), Arg("inout", "m", m),
                      Arg("in", "srow", srow), Arg("inout", "state", st.to_array()), Arg("value", "batch", b),
                      Arg("value", "momentum", 0.9), Arg("value", "weight_decay", wd)],
                expect=[Expect("g", g_want, exact=True, label="g: the partials added in group order"),
                        Expect("p", wp, *tol), Expect("m", wm, *tol), Expect("state", state_want, exact=True)])


# ------------------------------------------------------------------------------------ shapes per profile
#: "full": LeNet-5's sizes at batch 1 and an odd batch, and odd shapes that are no multiple of any tile
#: (on a GPU, and for the numpy debug backend); "tiny": small odd shapes for the emulators (cupy-host,
#: the Numba simulator), where every simulated thread costs CPU time.
SHAPES: dict[str, dict[str, list]] = {
    "full": {
        "conv": [((1, 1, 32, 32), (6, 1, 5, 5)), ((7, 6, 14, 14), (16, 6, 5, 5)), ((7, 1, 32, 32), (6, 1, 5, 5)),
                 ((1, 6, 14, 14), (16, 6, 5, 5)), ((2, 3, 13, 11), (5, 3, 3, 4)), ((1, 2, 7, 40), (9, 2, 2, 3)),
                 ((3, 10, 6, 5), (2, 10, 1, 1))],
        "conv_pool": [((1, 1, 32, 32), (6, 1, 5, 5)), ((7, 6, 14, 14), (16, 6, 5, 5)), ((7, 1, 32, 32), (6, 1, 5, 5)),
                      ((2, 3, 13, 11), (5, 3, 3, 4)), ((1, 2, 7, 40), (9, 2, 2, 3))],
        "pool": [(1, 6, 28, 28), (7, 16, 10, 10), (7, 6, 28, 28), (2, 3, 7, 9)],
        "dense": [(1, 400, 120), (7, 120, 84), (7, 84, 10), (67, 400, 120), (5, 29, 7), (37, 29, 45)],
        "softmax": [(1, 10), (7, 10), (67, 10), (300, 10), (5, 7)],
        "optim": [61888, 1, 3, 1000],
        "batch": [(100, 1, 0, 0, 0, 0), (100, 7, 97, 2, -5, 3), (100, 67, 50, 2, 123456789, 1)],
        "bwd_data_pool": [((1, 16, 10, 10), (16, 6, 5, 5), (1, 6, 28, 28)),
                          ((7, 16, 10, 10), (16, 6, 5, 5), (7, 6, 28, 28)),
                          ((2, 5, 4, 3), (5, 3, 3, 3), (2, 3, 13, 11))],
        "head": [(1, 16, 5, 5, 10, 10, 120, 84), (7, 16, 5, 5, 10, 10, 120, 84), (67, 16, 5, 5, 10, 10, 120, 84),
                 (3, 5, 3, 3, 7, 6, 17, 11)],
        "lenet": [1, 7, 67],
        "step_fwd": [(1, 0, 0), (7, 95, 2), (67, 40, 2)],
        "step_bwd": [(1, 1), (7, 3), (7, 7), (7, 9), (67, 8)],
        "step_update": [(1, 0.0), (3, 0.0), (5, 0.01)],
    },
    "tiny": {
        "conv": [((1, 1, 8, 9), (2, 1, 3, 3)), ((2, 3, 7, 6), (3, 3, 3, 2))],
        "conv_pool": [((1, 1, 8, 9), (2, 1, 3, 3)), ((2, 3, 7, 6), (3, 3, 3, 2))],
        "pool": [(1, 2, 6, 5), (2, 3, 5, 4)],
        "dense": [(1, 9, 5), (3, 7, 4)],
        "softmax": [(3, 10), (2, 7)],
        "optim": [37, 3],
        "batch": [(10, 3, 8, 2, -5, 3), (10, 1, 0, 0, 0, 0)],
        "bwd_data_pool": [((1, 3, 2, 1), (3, 2, 3, 3), (1, 2, 9, 7)), ((2, 2, 2, 2), (2, 3, 2, 2), (2, 3, 6, 7))],
        "head": [(2, 2, 2, 2, 4, 5, 5, 4), (1, 2, 2, 2, 4, 4, 5, 4)],
        "lenet": [1],
        "step_fwd": [(1, 0, 0), (3, 7, 2)],
        "step_bwd": [(1, 1), (3, 2), (3, 5)],
        "step_update": [(1, 0.0), (3, 0.01)],
    },
}


def _sets_for(op: str, sh: dict[str, list]) -> Iterator[tuple[int, str, str | None, str | None, Callable[[], Spec]]]:
    """(tier, description, act, pool, build) of every input set of ``op``."""

    def grid(shapes: list, acts: tuple, modes: tuple) -> Iterator[tuple[int, Any, str | None, str | None]]:
        a0 = "relu" if "relu" in acts else (acts[0] if acts else None)
        m0 = modes[0] if modes else None
        for si, shape in enumerate(shapes):
            for a in acts or (None,):
                for m in modes or (None,):
                    first = si == 0
                    if first and a == a0 and m == m0:
                        tier = 0
                    elif first:
                        tier = 1
                    elif a == a0:
                        tier = 2
                    else:
                        tier = 3
                    yield tier, shape, a, m

    if op == "batch_prepare":
        for i, (n, b, off, shift, seed, epoch) in enumerate(sh["batch"]):
            desc = f"N={n} B={b} offset={off} shift={shift} seed={seed} epoch={epoch}"
            yield (0 if i == 0 else 2), desc, None, None, \
                (lambda a=(n, b, off, shift, seed, epoch): _batch_prepare(*a, s=_seed(op, a)))
    elif op == "conv2d_fwd":
        for tier, (xs, ws), a, _ in grid(sh["conv"], ACTS, ()):
            yield tier, f"x{xs} w{ws}", a, None, \
                (lambda xs=xs, ws=ws, a=a: _conv2d_fwd(xs, ws, a, _seed(op, xs, ws, a)))
    elif op == "conv2d_pool_fwd":
        for tier, (xs, ws), a, m in grid(sh["conv_pool"], ACTS, MODES):
            yield tier, f"x{xs} w{ws}", a, m, \
                (lambda xs=xs, ws=ws, a=a, m=m: _conv2d_pool_fwd(xs, ws, a, m, True, _seed(op, xs, ws, a, m)))
            if tier in (0, 1):  # the inference form: no conv output
                yield tier + 2, f"x{xs} w{ws} yconv=None", a, m, \
                    (lambda xs=xs, ws=ws, a=a, m=m: _conv2d_pool_fwd(xs, ws, a, m, False, _seed(op, xs, ws, a, m)))
    elif op == "pool2x2_fwd":
        for tier, xs, _, m in grid(sh["pool"], (), MODES):
            yield tier, f"x{xs}", None, m, (lambda xs=xs, m=m: _pool2x2_fwd(xs, m, _seed(op, xs, m)))
    elif op == "pool2x2_bwd":
        for tier, zs, a, m in grid(sh["pool"], ACTS, MODES):
            yield tier, f"dz{zs}", a, m, (lambda zs=zs, a=a, m=m: _pool2x2_bwd(zs, m, a, _seed(op, zs, m, a)))
    elif op == "dense_fwd":
        for tier, (n, i, o), a, _ in grid(sh["dense"], ACTS, ()):
            yield tier, f"({n},{i})->{o}", a, None, \
                (lambda n=n, i=i, o=o, a=a: _dense_fwd(n, i, o, a, _seed(op, n, i, o, a)))
    elif op == "dense_bwd":
        for tier, (n, i, o), a, _ in grid(sh["dense"], ACTS, ()):
            yield tier, f"({n},{i})->{o}", a, None, \
                (lambda n=n, i=i, o=o, a=a: _dense_bwd(n, i, o, a, True, _seed(op, n, i, o, a)))
            if tier == 0:
                yield 2, f"({n},{i})->{o} dx=None", a, None, \
                    (lambda n=n, i=i, o=o, a=a: _dense_bwd(n, i, o, a, False, _seed(op, n, i, o, a)))
    elif op == "conv2d_bwd_data":
        for tier, (xs, ws), _, _ in grid(sh["conv"], (), ()):
            yield tier, f"dx{xs} w{ws}", None, None, (lambda xs=xs, ws=ws: _conv2d_bwd_data(xs, ws, _seed(op, xs, ws)))
    elif op == "conv2d_bwd_weight":
        for tier, (xs, ws), _, _ in grid(sh["conv"], (), ()):
            yield tier, f"x{xs} dw{ws}", None, None, \
                (lambda xs=xs, ws=ws: _conv2d_bwd_weight(xs, ws, _seed(op, xs, ws)))
    elif op == "conv2d_bwd_data_pool":
        for tier, (dzs, ws, ys), a, m in grid(sh["bwd_data_pool"], ACTS, MODES):
            yield tier, f"dz{dzs} w{ws} yconv{ys}", a, m, \
                (lambda dzs=dzs, ws=ws, ys=ys, a=a, m=m:
                 _conv2d_bwd_data_pool(dzs, ws, ys, a, m, _seed(op, dzs, ws, a, m)))
    elif op == "conv2d_bwd_weight_routed":  # max pooling only: the routes are its pooling
        for tier, (xs, ws), _, _ in grid(sh["conv_pool"], (), ()):
            yield tier, f"x{xs} dw{ws} routed", None, None, \
                (lambda xs=xs, ws=ws: _conv2d_bwd_weight_routed(xs, ws, _seed(op, xs, ws)))
    elif op == "conv2d_bwd_data_routed":
        for tier, (xs, ws), a, _ in grid(sh["conv_pool"], ACTS, ()):
            yield tier, f"y_below{xs} w{ws} routed", a, None, \
                (lambda xs=xs, ws=ws, a=a: _conv2d_bwd_data_routed(xs, ws, a, _seed(op, xs, ws, a)))
    elif op == "softmax_xent":
        for tier, (n, nc), _, _ in grid(sh["softmax"], (), ()):
            yield tier, f"({n},{nc})", None, None, (lambda n=n, nc=nc: _softmax_xent(n, nc, _seed(op, n, nc)))
    elif op in ("adam_step", "sgd_step"):
        make = _adam_step if op == "adam_step" else _sgd_step
        for i, size in enumerate(sh["optim"]):
            for wd in (0.0, 0.01):
                for clamp in (False, True):
                    tier = 0 if (i, wd, clamp) == (0, 0.0, False) else (1 if i == 0 else 2)
                    yield tier, f"n={size} wd={wd}{' step past the table' if clamp else ''}", None, None, \
                        (lambda size=size, wd=wd, clamp=clamp: make(size, wd, clamp, _seed(op, size, wd, clamp)))
    elif op == "step_advance":
        for tier, (b, wrap) in ((0, (64, False)), (0, (3, True)), (2, (1, False))):
            yield tier, f"batch={b}{' end of epoch' if wrap else ''}", None, None, \
                (lambda b=b, wrap=wrap: _step_advance(b, wrap))
    elif op == "head_train":
        for tier, dims, a, m in grid(sh["head"], MODEL_ACTS, MODES):
            b, c, hp, wp, h, w, h1, h2 = dims
            yield tier, f"x({b},{c},{hp},{wp}) yconv({h},{w}) {c * hp * wp}->{h1}->{h2}->10", a, m, \
                (lambda dims=dims, a=a, m=m: _head_train(*dims, a, m, _seed(op, dims, a, m)))
            if m == "max" and tier in (0, 1):  # the routed form (the routed step): gz at x's shape
                yield tier + 2, f"x({b},{c},{hp},{wp}) yconv=None (routed) {c * hp * wp}->{h1}->{h2}->10", a, m, \
                    (lambda dims=dims, a=a: _head_train(*dims, a, "max", _seed(op, dims, a, "routed"), routed=True))
    elif op == "step_fwd":  # max pooling only (the four-kernel step): no pool mode to vary
        for tier, (b, off, shift), a, _ in grid(sh["step_fwd"], MODEL_ACTS, ()):
            yield tier, f"images -> x({b},1,32,32) -> S2 -> S4 offset={off} shift={shift}", a, None, \
                (lambda b=b, off=off, shift=shift, a=a: _step_fwd(b, off, shift, a, _seed(op, b, off, a)))
    elif op == "step_bwd":
        for tier, (b, groups), a, _ in grid(sh["step_bwd"], MODEL_ACTS, ()):
            yield tier, f"batch {b} in {groups} groups -> gpart", a, None, \
                (lambda b=b, groups=groups, a=a: _step_bwd(b, groups, a, _seed(op, b, groups, a)))
    elif op in ("step_adam", "step_sgd"):
        for i, (groups, wd) in enumerate(sh["step_update"]):
            yield (0 if i == 0 else 1), f"{groups} partial rows wd={wd}", None, None, \
                (lambda groups=groups, wd=wd: _step_update(op, 3, groups, wd, _seed(op, groups, wd)))
    elif op == "lenet_fwd":
        for tier, b, a, m in grid(sh["lenet"], MODEL_ACTS, MODES):
            yield tier, f"images({b},28,28)", a, m, (lambda b=b, a=a, m=m: _lenet_fwd(b, a, m, _seed(op, b, a, m)))


#: every op a builder knows
KNOWN_OPS = ("batch_prepare", "conv2d_fwd", "conv2d_pool_fwd", "pool2x2_fwd", "pool2x2_bwd", "dense_fwd", "dense_bwd",
             "conv2d_bwd_data", "conv2d_bwd_weight", "conv2d_bwd_data_pool", "softmax_xent", "adam_step", "sgd_step",
             "step_advance", "head_train", "lenet_fwd", "conv2d_bwd_weight_routed", "conv2d_bwd_data_routed",
             "step_fwd", "step_bwd", "step_adam", "step_sgd")


def input_sets(ops: list[str], profile: str, max_tier: int = 3) -> list[InputSet]:
    """Every input set of ``ops`` (in the given order) up to ``max_tier``, sorted by tier."""
    sh = SHAPES[profile]
    sets = [InputSet(op, tier, desc, act, pool, build)
            for op in ops for tier, desc, act, pool, build in _sets_for(op, sh) if tier <= max_tier]
    return sorted(sets, key=lambda s: s.tier)  # stable: op order kept within a tier


# ------------------------------------------------------------------------------------ running a case
def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name`` (False where its signature cannot be read)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _launch(be: Any, op: str, variant: str, spec: Spec) -> dict[str, Any]:
    """Upload the spec's arrays, launch the op once, return the device arrays by name."""
    dev: dict[str, Any] = {}
    args: list[Any] = []
    for a in spec.args:
        if a.kind in ("in", "out", "inout"):
            dev[a.name] = be.to_device(np.ascontiguousarray(a.value))
            args.append(dev[a.name])
        elif a.kind == "params":
            args.append({k: be.to_device(np.ascontiguousarray(v)) for k, v in a.value.items()})
        elif a.kind == "none":
            args.append(None)
        else:
            args.append(a.value)
    fn = getattr(be, op)
    kwargs = dict(spec.kwargs)
    if spec.state_kw is not None and accepts(fn, "state"):
        kwargs["state"] = be.to_device(spec.state_kw)
    fn(*args, variant=variant, **kwargs)
    return dev


def _read(be: Any, spec: Spec, dev: dict[str, Any]) -> dict[str, np.ndarray]:
    return {a.name: be.to_host(dev[a.name]) for a in spec.args if a.kind in ("out", "inout")}


def _v(x: Any) -> str:
    """A value for a message: 0.1234567 (9 digits) or an integer, with no NumPy type around it."""
    x = np.asarray(x)
    return f"{float(x):.9g}" if np.issubdtype(x.dtype, np.floating) else str(int(x))


def _compare(spec: Spec, got: dict[str, np.ndarray], what: str) -> dict[str, Any]:
    """Every Expect of the spec: per-output error statistics; raises CheckFailed naming the bad ones."""
    outputs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for e in spec.expect:
        label = e.label or e.name
        out = got[e.name]
        want = e.want(got) if callable(e.want) else e.want
        want = np.asarray(want)
        if e.mask is not None:
            m = np.asarray(e.mask(got), dtype=bool)
            out, want = out[m], want[m]
        if out.shape != want.shape:
            problems.append(f"{label}: shape {out.shape} != reference {want.shape}")
            outputs[label] = {"max_abs": None, "ratio": None, "bad": -1}
            continue
        if e.exact:
            neq = ~((out == want) | (np.isnan(out.astype(F64)) & np.isnan(want.astype(F64))))
            bad = int(neq.sum())
            diff = np.abs(out.astype(F64) - want.astype(F64))
            st = {"max_abs": float(np.max(diff, initial=0.0)) if not bad else None,
                  "ratio": 0.0 if not bad else float("inf"), "bad": bad, "exact": True}
            if bad:
                idx = [tuple(int(j) for j in i) for i in np.argwhere(neq)[:3]]
                first = "; ".join(f"at {i}: got {_v(out[i])}, want {_v(want[i])}" for i in idx)
                problems.append(f"{label}: {bad} of {out.size} elements differ (must be exact); {first}")
        else:
            st = error_stats(out, want, e.atol, e.rtol)
            if st["bad"]:
                w = st["worst"]
                problems.append(f"{label}: {st['bad']} of {st['size']} elements out of tolerance (atol={e.atol}, "
                                f"rtol={e.rtol}); worst at {w}: got {_v(out[w])}, want {_v(want[w])}")
            st = {k: st[k] for k in ("max_abs", "ratio", "bad")}
        outputs[label] = st
    if problems:
        raise CheckFailed(f"{what}:\n  " + "\n  ".join(problems))
    return outputs


def run_case(be: Any, op: str, variant: str, iset: InputSet) -> dict[str, Any]:
    """Launch ``op``/``variant`` on one input set and compare. Returns {outputs, worst_ratio, max_abs};
    raises CheckFailed (out of tolerance) or whatever the op raises."""
    spec = iset.spec()
    what = f"{op}_{variant} {iset.desc}" + (f" {iset.act}" if iset.act else "") + (f" {iset.pool}" if iset.pool else "")
    dev = _launch(be, op, variant, spec)
    got = _read(be, spec, dev)
    outputs = _compare(spec, got, what)
    if spec.repeat:  # the same launch again, from the same inputs: bit for bit
        again = _read(be, spec, _launch(be, op, variant, spec))
        differ = [k for k in got if not np.array_equal(got[k], again[k], equal_nan=True)]
        if differ:
            raise CheckFailed(f"{what}: a second launch on the same inputs gave different bits in {', '.join(differ)} "
                              "(a reduction that is not in a fixed order, or a ticket left set)")
        outputs["repeat"] = {"bit_for_bit": True}
    ratios = [v["ratio"] for v in outputs.values() if isinstance(v.get("ratio"), float)]
    absd = [v["max_abs"] for v in outputs.values() if isinstance(v.get("max_abs"), float)]
    return {"outputs": outputs, "worst_ratio": max(ratios, default=0.0), "max_abs": max(absd, default=0.0)}


def timing_call(be: Any, op: str, variant: str, iset: InputSet) -> Callable[[], None]:
    """A no-argument callable that launches ``op``/``variant`` on device copies of one input set (for the
    benchmark: the same inputs the parity check uses; uploaded once)."""
    spec = iset.spec()
    args: list[Any] = []
    for a in spec.args:
        if a.kind in ("in", "out", "inout"):
            args.append(be.to_device(np.ascontiguousarray(a.value)))
        elif a.kind == "params":
            args.append({k: be.to_device(np.ascontiguousarray(v)) for k, v in a.value.items()})
        elif a.kind == "none":
            args.append(None)
        else:
            args.append(a.value)
    fn = getattr(be, op)
    kwargs = dict(spec.kwargs, variant=variant)
    if spec.state_kw is not None and accepts(fn, "state"):
        kwargs["state"] = be.to_device(spec.state_kw)
    return lambda: fn(*args, **kwargs)


#: the op shapes of one LeNet-5 training step at batch B (for per-op timings): op → [(label, input set)]
def lenet_sets(op: str, batch: int, groups: int = 1, act: str = "relu", mode: str = "max",
               f6: int = 84) -> list[tuple[str, InputSet]]:
    """The input sets of ``op`` where a training step of LeNet-5 calls it, at ``batch``: the self-test's per-op
    timings and the benchmark's cases of the fused ops (lenet_gpu.perf.ops). ``groups`` is the backend's
    ``step_groups(batch)`` (the rows of step_bwd's partials, which step_adam / step_sgd add up); ``act``, ``mode``
    and ``f6`` the network's. The gradients that enter a weight gradient carry the 1/B of the mean loss, as in
    training, so a batch-long sum stays O(1) and the tolerances hold at every batch size. The routed ops, the
    routed head and the four-kernel step's ops exist for max pooling only: with ``mode="avg"`` they have no set."""
    b, m, mx = batch, mode, mode == "max"
    P = param_layout(NetConfig(activation=act, pool=mode, f6=f6))[1]  # the flat parameter buffer, padded
    table: dict[str, list[tuple[str, Callable[[], Spec]]]] = {
        "batch_prepare": [("input", lambda: _batch_prepare(max(b, 100), b, 0, 2, 0, 0, 1))],
        "conv2d_fwd": [("C1", lambda: _conv2d_fwd((b, 1, 32, 32), (6, 1, 5, 5), act, 1)),
                       ("C3", lambda: _conv2d_fwd((b, 6, 14, 14), (16, 6, 5, 5), act, 2))],
        "conv2d_pool_fwd": [("C1+S2", lambda: _conv2d_pool_fwd((b, 1, 32, 32), (6, 1, 5, 5), act, m, True, 1)),
                            ("C3+S4", lambda: _conv2d_pool_fwd((b, 6, 14, 14), (16, 6, 5, 5), act, m, True, 2))],
        "pool2x2_fwd": [("S2", lambda: _pool2x2_fwd((b, 6, 28, 28), m, 1)),
                        ("S4", lambda: _pool2x2_fwd((b, 16, 10, 10), m, 2))],
        "pool2x2_bwd": [("S2", lambda: _pool2x2_bwd((b, 6, 28, 28), m, act, 1)),
                        ("S4", lambda: _pool2x2_bwd((b, 16, 10, 10), m, act, 2))],
        "dense_fwd": [("C5", lambda: _dense_fwd(b, 400, 120, act, 1)),
                      ("F6", lambda: _dense_fwd(b, 120, f6, act, 2)),
                      ("out", lambda: _dense_fwd(b, f6, 10, "identity", 3))],
        "dense_bwd": [("C5", lambda: _dense_bwd(b, 400, 120, act, True, 1)),
                      ("F6", lambda: _dense_bwd(b, 120, f6, act, True, 2)),
                      ("out", lambda: _dense_bwd(b, f6, 10, "identity", True, 3))],
        "conv2d_bwd_data": [("C3", lambda: _conv2d_bwd_data((b, 6, 14, 14), (16, 6, 5, 5), 1))],
        "conv2d_bwd_weight": [("C1", lambda: _conv2d_bwd_weight((b, 1, 32, 32), (6, 1, 5, 5), 1)),
                              ("C3", lambda: _conv2d_bwd_weight((b, 6, 14, 14), (16, 6, 5, 5), 2))],
        "conv2d_bwd_data_pool": [("C3->S2->C1", lambda: _conv2d_bwd_data_pool((b, 16, 10, 10), (16, 6, 5, 5),
                                                                              (b, 6, 28, 28), act, m, 1))],
        "conv2d_bwd_weight_routed": [
            ("C1", lambda: _conv2d_bwd_weight_routed((b, 1, 32, 32), (6, 1, 5, 5), 1, 1.0 / b)),
            ("C3", lambda: _conv2d_bwd_weight_routed((b, 6, 14, 14), (16, 6, 5, 5), 2, 1.0 / b))] if mx else [],
        "conv2d_bwd_data_routed": [
            ("C3->S2", lambda: _conv2d_bwd_data_routed((b, 6, 14, 14), (16, 6, 5, 5), act, 1, 1.0 / b))] if mx else [],
        "softmax_xent": [("loss", lambda: _softmax_xent(b, 10, 1))],
        "adam_step": [("params", lambda: _adam_step(P, 0.0, False, 1))],
        "sgd_step": [("params", lambda: _sgd_step(P, 0.0, False, 1))],
        "step_advance": [("state", lambda: _step_advance(b, False))],
        "head_train": [("C5..loss..dS4", lambda: _head_train(b, 16, 5, 5, 10, 10, 120, f6, act, m, 1)),
                       *([("C5..loss..gS4 routed",
                           lambda: _head_train(b, 16, 5, 5, 10, 10, 120, f6, act, m, 2, routed=True))] if mx else [])],
        "lenet_fwd": [("network", lambda: _lenet_fwd(b, act, m, 1))],
        # the four-kernel step (max pooling only)
        "step_fwd": [("input..S4", lambda: _step_fwd(b, 0, 2, act, 1))] if mx else [],
        "step_bwd": [("S4..C3..C1", lambda: _step_bwd(b, groups, act, 1, 1.0 / b))] if mx else [],
        "step_adam": [("gpart+params", lambda: _step_update("step_adam", b, groups, 0.0, 1, P))] if mx else [],
        "step_sgd": [("gpart+params", lambda: _step_update("step_sgd", b, groups, 0.0, 1, P))] if mx else [],
    }
    return [(label, InputSet(op, 0, f"{label} batch {b}", act, mode, build)) for label, build in table.get(op, [])]


def check_outputs(spec: Spec, got: dict[str, np.ndarray], what: str) -> dict[str, Any]:
    """Every Expect of ``spec`` against the outputs read back (``got``: name → host array); raises CheckFailed
    (an AssertionError) naming the bad outputs. Returns the per-output error statistics."""
    return _compare(spec, got, what)


__all__ = ["KNOWN_OPS", "SHAPES", "CheckFailed", "InputSet", "accepts", "check_outputs", "input_sets", "lenet_sets",
           "run_case", "timing_call"]
