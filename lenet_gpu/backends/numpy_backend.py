"""The numpy backend: every op of the protocol in vectorised float32 NumPy on the CPU.

It is the CPU product (train and evaluate anywhere) and the second oracle for whole-step parity of
the GPU backends. Convolutions are im2col (one strided copy per filter tap) + one BLAS product per
image, written straight into NCHW; the weight gradient rebuilds the col matrix rather than caching it
from the forward pass (a cache could go stale if a caller changed x in between). Batch-sized ops run
on all cores by splitting the batch. NumPy temporaries inside an op are not counted as allocations
(there is no device memory here); ``empty``/``zeros``/``to_device`` are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..reference import augment_shift, step_groups, step_reduce
from ..spec import conv_prefix, param_layout
from ..stepstate import EPOCH, OFFSET, SCHED_BASE, SEED, SHIFT, STEP, STEP_IN_EPOCH, step_advance_words
from .base import OPS, ROUTED_OPS, STEP_OPS, Counters, HostMemory, check_act, check_mode

F32 = np.float32
LECUN_A = F32(1.7159)
LECUN_S = F32(2.0 / 3.0)
CHUNK = 32  # images per work item: a C1 im2col of 32 images (2.5 MB) stays in L2/L3 cache


def _activate_(z: np.ndarray, act: str) -> None:
    """Apply the activation in place."""
    if act == "relu":
        np.maximum(z, F32(0), out=z)
    elif act == "tanh":
        np.tanh(z, out=z)
    elif act == "lecun_tanh":
        z *= LECUN_S
        np.tanh(z, out=z)
        z *= LECUN_A
    elif act == "sigmoid":
        # 1/(1+e^-z), clipped so exp cannot overflow (float32 sigmoid saturates long before ±88)
        np.clip(z, F32(-88), F32(88), out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        z += F32(1)
        np.reciprocal(z, out=z)
    elif act != "identity":
        check_act(act)


def _mul_act_grad_(dz: np.ndarray, y: np.ndarray, act: str) -> None:
    """dz *= act'(y) in place, with the derivative written through the activated output y."""
    if act == "identity":
        return
    if act == "relu":
        dz *= y > 0
    elif act == "tanh":
        dz *= F32(1) - y * y
    elif act == "lecun_tanh":
        dz *= LECUN_S * (LECUN_A - y * y / LECUN_A)
    elif act == "sigmoid":
        dz *= y * (F32(1) - y)
    else:
        check_act(act)


def _im2col(x: np.ndarray, r: int, s: int) -> np.ndarray:
    """(B,C,H,W) → cols (B, C·R·S, Ho·Wo): for each image, one row per filter tap (c, r, s) holding
    the input pixels that tap sees at every output position. Built with one strided copy per tap
    (R·S copies of B·C·Ho·Wo floats), which beats a 6-D transpose by about 2×."""
    b, c, h, w = x.shape
    ho, wo = h - r + 1, w - s + 1
    cols = np.empty((b, c, r, s, ho, wo), dtype=x.dtype)
    for i in range(r):
        for j in range(s):
            cols[:, :, i, j] = x[:, :, i : i + ho, j : j + wo]
    return cols.reshape(b, c * r * s, ho * wo)


def _im2col_pooled(x: np.ndarray, r: int, s: int, a: int, hp: int, wp: int) -> np.ndarray:
    """(B,C,H,W) → cols (B, C·R·S, Hp·Wp) of the conv outputs at tap ``a`` (0..3, row-major) of every 2×2
    pooling window: row (c, r, s) holds x[b, c, 2i + a//2 + r, 2j + a%2 + s] at column (i, j)."""
    b, c = x.shape[:2]
    i0, j0 = a // 2, a % 2
    cols = np.empty((b, c, r, s, hp, wp), dtype=x.dtype)
    for i in range(r):
        for j in range(s):
            cols[:, :, i, j] = x[:, :, i0 + i : i0 + i + 2 * hp : 2, j0 + j : j0 + j + 2 * wp : 2]
    return cols.reshape(b, c * r * s, hp * wp)


def _pool_fwd(xs: np.ndarray, ys: np.ndarray, am: np.ndarray | None, mode: str) -> None:
    """2×2/2 pooling of xs into ys (and the first maximum's tap into am for max)."""
    ho, wo = ys.shape[2], ys.shape[3]
    t0 = xs[:, :, 0 : 2 * ho : 2, 0 : 2 * wo : 2]
    t1 = xs[:, :, 0 : 2 * ho : 2, 1 : 2 * wo : 2]
    t2 = xs[:, :, 1 : 2 * ho : 2, 0 : 2 * wo : 2]
    t3 = xs[:, :, 1 : 2 * ho : 2, 1 : 2 * wo : 2]
    if mode == "avg":
        np.add(t0, t1, out=ys)
        ys += t2
        ys += t3
        ys *= F32(0.25)
        return
    np.maximum(t0, t1, out=ys)
    np.maximum(ys, t2, out=ys)
    np.maximum(ys, t3, out=ys)
    # first maximum wins: the index is the number of leading taps that are not the maximum
    miss = t0 != ys
    np.copyto(am, miss)
    miss &= t1 != ys
    am += miss
    miss &= t2 != ys
    am += miss


def _pool_bwd(g: np.ndarray, am: np.ndarray | None, yconv: np.ndarray, d: np.ndarray, mode: str, act: str) -> None:
    """d (yconv's shape) = route(g) · act'(yconv)."""
    ho, wo = g.shape[2], g.shape[3]
    if 2 * ho != d.shape[2] or 2 * wo != d.shape[3]:
        d[...] = 0  # the odd trailing row/column belongs to no window
    for t, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        tap = d[:, :, i : 2 * ho : 2, j : 2 * wo : 2]
        if mode == "max":
            np.multiply(g, am == t, out=tap)
        else:
            np.multiply(g, F32(0.25), out=tap)
    _mul_act_grad_(d, yconv, act)


def _dense_fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray, act: str) -> None:
    np.matmul(x, w.T, out=y)
    y += b
    _activate_(y, act)


def _dense_bwd(x, w, y, dy, dx, dw, db, act: str) -> None:
    dz = dy.copy()
    _mul_act_grad_(dz, y, act)
    np.matmul(dz.T, x, out=dw)
    np.sum(dz, axis=0, out=db)
    if dx is not None:
        np.matmul(dz, w, out=dx)


def _softmax_xent(logits, labels, dlogits, stats, state) -> None:
    n = logits.shape[0]
    rows = np.arange(n)
    lab = labels.astype(np.intp)
    mx = logits.max(axis=1, keepdims=True)
    np.subtract(logits, mx, out=dlogits)
    lse = np.log(np.exp(dlogits).sum(axis=1))  # log Σ e^(z − max)
    loss_sum = float((lse - dlogits[rows, lab]).sum(dtype=np.float64))
    correct = int((np.argmax(logits, axis=1) == lab).sum())
    np.exp(dlogits, out=dlogits)
    dlogits /= dlogits.sum(axis=1, keepdims=True)
    dlogits[rows, lab] -= F32(1)
    dlogits *= F32(1.0 / n)
    stats[int(state[STEP_IN_EPOCH]) % stats.shape[0]] = (F32(loss_sum), F32(correct))


#: The optional ops the numpy backend has beside the protocol's (each composes the code of the unfused ops,
#: so on numpy a fused op gives the unfused ops' numbers bit for bit).
NUMPY_OPTIONAL = ("conv2d_pool_fwd", "head_train", *ROUTED_OPS, *STEP_OPS)


def _default_threads() -> int:
    env = os.environ.get("LENET_GPU_NUM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class NumpyBackend(HostMemory):
    """CPU backend in NumPy. All arrays are NumPy arrays; ``to_device`` is a copy.

    The batch-sized ops work on chunks of ``CHUNK`` images, spread over ``threads`` threads (NumPy's
    loops and BLAS release the GIL; ``LENET_GPU_NUM_THREADS``, default: the usable cores, at most 4).
    The chunks depend only on the batch size and partial sums are added in chunk order, so results
    repeat bit for bit whatever the thread count.
    """

    name = "numpy"
    is_gpu = False

    def __init__(self, threads: int | None = None) -> None:
        self.counters = Counters()
        self.variants: dict[str, tuple[str, ...]] = {op: ("v1",) for op in (*OPS, *NUMPY_OPTIONAL)}
        self.default_variants: dict[str, str] = {op: "v1" for op in self.variants}
        self.threads = threads or _default_threads()
        self._pool = None
        if self.threads > 1:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # no way to stop BLAS from oversubscribing: stay single-threaded
                self.threads = 1
            else:
                controller = ThreadpoolController()
                self._blas_single = lambda: controller.limit(limits=1, user_api="blas")
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lenet-np")

    def _chunks(self, n: int, fn: Callable[[slice], Any]) -> list[Any]:
        """Run fn over consecutive slices of CHUNK images (so each slice's im2col stays in cache),
        spread over the thread pool; results come back in slice order."""
        slices = [slice(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]
        if self._pool is None or len(slices) == 1:
            return [fn(sl) for sl in slices]
        # our threads already fill the cores: BLAS threads on top would oversubscribe them (measured:
        # 4,400 img/s with single-threaded BLAS inside the chunks, 2,500 without)
        with self._blas_single():
            return list(self._pool.map(fn, slices))

    # ------------------------------------------------------------------ ops
    def batch_prepare(self, images, labels, perm, state, x, y, mean, std, variant=None) -> None:
        self.counters.launches += 1
        b, _, xh, xw = x.shape
        n, ih, iw = images.shape
        pad = (xh - ih) // 2
        m = perm.shape[0]
        j = perm[(int(state[OFFSET]) + np.arange(b)) % m]
        scale, shift = F32(1.0 / (255.0 * std)), F32(-mean / std)
        x[...] = shift
        y[...] = labels[j]
        max_shift = int(state[SHIFT])
        if max_shift == 0:
            np.multiply(images[j], scale, out=x[:, 0, pad : pad + ih, pad : pad + iw], casting="unsafe")
            x[:, 0, pad : pad + ih, pad : pad + iw] += shift
            return
        dy, dx = augment_shift(int(state[SEED]), int(state[EPOCH]), j, max_shift)
        for r in range(b):  # x[r, 0, h, v] = p(images[j, h − pad − dy, v − pad − dx])
            h0, v0 = pad + int(dy[r]), pad + int(dx[r])
            hs, vs = max(0, h0), max(0, v0)  # the part of the shifted image inside the canvas
            he, ve = min(xh, h0 + ih), min(xw, v0 + iw)
            dst = x[r, 0, hs:he, vs:ve]
            np.multiply(images[j[r], hs - h0 : he - h0, vs - v0 : ve - v0], scale, out=dst, casting="unsafe")
            dst += shift

    def conv2d_fwd(self, x, w, b, y, act, variant=None) -> None:
        self.counters.launches += 1
        self._chunks(y.shape[0], lambda sl: self._conv_part(x[sl], w, b, y[sl], act))

    @staticmethod
    def _conv_part(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray, act: str) -> None:
        # one (K × CRS)·(CRS × HoWo) product per image, written straight into NCHW y
        k, c, r, s = w.shape
        bsz, _, ho, wo = y.shape
        ym = y.reshape(bsz, k, ho * wo)
        np.matmul(w.reshape(k, c * r * s), _im2col(x, r, s), out=ym)
        ym += b.reshape(1, k, 1)
        _activate_(ym, act)

    def conv2d_pool_fwd(self, x, w, b, yconv, ypool, argmax, act, mode, variant=None) -> None:
        """conv2d_fwd then pool2x2_fwd, a chunk at a time; the conv output goes to yconv, or to a chunk-sized
        temporary when yconv is None (the routed step does not keep it)."""
        self.counters.launches += 1
        check_mode(mode)
        k, _, r, s = w.shape
        ho, wo = x.shape[2] - r + 1, x.shape[3] - s + 1

        def part(sl: slice) -> None:
            xs = x[sl]
            y = yconv[sl] if yconv is not None else np.empty((xs.shape[0], k, ho, wo), F32)
            self._conv_part(xs, w, b, y, act)
            _pool_fwd(y, ypool[sl], argmax[sl] if mode == "max" else None, mode)

        self._chunks(x.shape[0], part)

    def conv2d_bwd_weight(self, x, dz, dw, db, state=None, variant=None) -> None:
        self.counters.launches += 1
        k, c, r, s = dw.shape
        bsz, _, ho, wo = dz.shape
        dzm = dz.reshape(bsz, k, ho * wo)

        def part(sl: slice) -> tuple[np.ndarray, np.ndarray]:
            cols = _im2col(x[sl], r, s)  # (b, CRS, HoWo)
            # Σ_b dz_b · cols_bᵀ: per-image products summed over the chunk's images
            return np.matmul(dzm[sl], cols.transpose(0, 2, 1)).sum(axis=0), dzm[sl].sum(axis=(0, 2))

        parts = self._chunks(bsz, part)
        dwm = dw.reshape(k, c * r * s)
        dwm[...] = parts[0][0]
        db[...] = parts[0][1]
        for pw, pb in parts[1:]:  # fixed order: bit-for-bit repeatable
            dwm += pw
            db += pb

    def conv2d_bwd_data(self, dz, w, dx, variant=None) -> None:
        self.counters.launches += 1
        k, c, r, s = w.shape
        bsz, _, ho, wo = dz.shape
        wt = w.reshape(k, c * r * s).T
        dzm = dz.reshape(bsz, k, ho * wo)

        def part(sl: slice) -> None:
            # col2im: every output gradient times its filter, scattered back over its receptive field
            dcols = np.matmul(wt, dzm[sl]).reshape(-1, c, r, s, ho, wo)
            d = dx[sl]
            d[...] = 0
            for i in range(r):
                for j in range(s):
                    d[:, :, i : i + ho, j : j + wo] += dcols[:, :, i, j]

        self._chunks(bsz, part)

    def pool2x2_fwd(self, x, y, argmax, mode, variant=None) -> None:
        self.counters.launches += 1
        check_mode(mode)
        self._chunks(x.shape[0], lambda sl: _pool_fwd(x[sl], y[sl], argmax[sl] if mode == "max" else None, mode))

    def pool2x2_bwd(self, dy, argmax, yconv, dz, mode, act, variant=None) -> None:
        self.counters.launches += 1
        check_mode(mode)
        self._chunks(dy.shape[0], lambda sl: _pool_bwd(dy[sl], argmax[sl] if argmax is not None else None,
                                                       yconv[sl], dz[sl], mode, act))

    def dense_fwd(self, x, w, b, y, act, variant=None) -> None:
        self.counters.launches += 1
        _dense_fwd(x, w, b, y, act)

    def dense_bwd(self, x, w, y, dy, dx, dw, db, act, variant=None) -> None:
        self.counters.launches += 1
        _dense_bwd(x, w, y, dy, dx, dw, db, act)

    def softmax_xent(self, logits, labels, dlogits, stats, state, variant=None) -> None:
        self.counters.launches += 1
        _softmax_xent(logits, labels, dlogits, stats, state)

    def head_train(self, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
                   dw1, db1, dw2, db2, dw3, db3, stats, state, act, mode, variant=None) -> None:
        """reference.head_train as one op: the unfused ops' code in a row (the same numbers bit for bit).
        yconv=None (max only): dz_conv has x's shape and gets the routed gradient dx·act'(x)."""
        self.counters.launches += 1
        check_mode(mode)
        if yconv is None and mode != "max":
            raise ValueError("head_train: yconv=None (the routed gradient) needs max pooling")
        n = x.shape[0]
        xf = x.reshape(n, -1)
        _dense_fwd(xf, w1, b1, h1, act)
        _dense_fwd(h1, w2, b2, h2, act)
        _dense_fwd(h2, w3, b3, logits, "identity")
        dl, d2, d1, dx = np.empty_like(logits), np.empty_like(h2), np.empty_like(h1), np.empty_like(xf)
        _softmax_xent(logits, labels, dl, stats, state)
        _dense_bwd(h2, w3, logits, dl, d2, dw3, db3, "identity")
        _dense_bwd(h1, w2, h2, d2, d1, dw2, db2, act)
        _dense_bwd(xf, w1, h1, d1, dx, dw1, db1, act)
        dx = dx.reshape(x.shape)
        if yconv is None:
            dz_conv[...] = dx
            _mul_act_grad_(dz_conv, x, act)
        else:
            _pool_bwd(dx, argmax, yconv, dz_conv, mode, act)

    # ------------------------------------------------------------------ routed ops (docs/routed_backward.md)
    def conv2d_bwd_weight_routed(self, x, gz, argmax, dw, db, state=None, variant=None) -> None:
        """dw, db from the routed gradient gz (B,K,Hp,Wp): per chunk, for each window tap a, the products of
        gz where argmax = a with the im2col of the conv outputs at tap a; chunks added in order."""
        self.counters.launches += 1
        k, c, r, s = dw.shape
        bsz, _, hp, wp = gz.shape
        gm, am = gz.reshape(bsz, k, hp * wp), argmax.reshape(bsz, k, hp * wp)

        def part(sl: slice) -> tuple[np.ndarray, np.ndarray]:
            g, m = gm[sl], am[sl]
            acc = np.zeros((k, c * r * s), F32)
            for a in range(4):
                cols = _im2col_pooled(x[sl], r, s, a, hp, wp)  # (b, CRS, HpWp)
                acc += np.matmul(g * (m == a), cols.transpose(0, 2, 1)).sum(axis=0)
            return acc, g.sum(axis=(0, 2))

        parts = self._chunks(bsz, part)
        dwm = dw.reshape(k, c * r * s)
        dwm[...] = parts[0][0]
        db[...] = parts[0][1]
        for pw, pb in parts[1:]:  # fixed order: bit-for-bit repeatable
            dwm += pw
            db += pb

    def conv2d_bwd_data_routed(self, gz, w, argmax, y_below, gz_below, act, variant=None) -> None:
        """gz_below = data gradient of the scattered gz, times act'(y_below): per chunk and window tap a, the
        col2im of wᵀ·(gz where argmax = a) onto the strided positions of tap a."""
        self.counters.launches += 1
        k, c, r, s = w.shape
        bsz, _, hp, wp = gz.shape
        wt = w.reshape(k, c * r * s).T
        gm, am = gz.reshape(bsz, k, hp * wp), argmax.reshape(bsz, k, hp * wp)

        def part(sl: slice) -> None:
            g, m, d = gm[sl], am[sl], gz_below[sl]
            d[...] = 0
            for a in range(4):
                dcols = np.matmul(wt, g * (m == a)).reshape(-1, c, r, s, hp, wp)
                i0, j0 = a // 2, a % 2
                for i in range(r):
                    for j in range(s):
                        d[:, :, i0 + i : i0 + i + 2 * hp : 2, j0 + j : j0 + j + 2 * wp : 2] += dcols[:, :, i, j]
            _mul_act_grad_(d, y_below[sl], act)

        self._chunks(bsz, part)

    @staticmethod
    def _sched(sched, state) -> np.ndarray:
        i = int(state[STEP]) - int(state[SCHED_BASE])
        return sched[min(max(i, 0), sched.shape[0] - 1)]

    def adam_step(self, p, g, m, v, sched, state, beta1, beta2, eps, weight_decay, variant=None) -> None:
        self.counters.launches += 1
        lr, bc1, bc2 = self._sched(sched, state)[:3]
        gg = g + F32(weight_decay) * p if weight_decay else g
        m *= F32(beta1)
        m += F32(1 - beta1) * gg
        v *= F32(beta2)
        v += F32(1 - beta2) * gg * gg
        denom = np.sqrt(v / bc2)
        denom += F32(eps)
        p -= lr * (m / bc1) / denom

    def sgd_step(self, p, g, m, sched, state, momentum, weight_decay, variant=None) -> None:
        self.counters.launches += 1
        lr = self._sched(sched, state)[0]
        m *= F32(momentum)
        m += g
        if weight_decay:
            m += F32(weight_decay) * p
        p -= lr * m

    def step_advance(self, state, batch, variant=None) -> None:
        self.counters.launches += 1
        step_advance_words(state, batch)

    # ------------------------------------------------------------------ the four-kernel step (docs/step4.md)
    # Compositions of the ops above (so on numpy the four-op step gives the routed step's numbers, up to the
    # group order of step_bwd's partials); each counts as one launch.
    def _one_launch(self, fn: Callable[[], None]) -> None:
        before = self.counters.launches
        fn()
        self.counters.launches = before + 1

    def step_fwd(self, images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, mean, std,
                 act, variant=None) -> None:
        def run() -> None:
            self.batch_prepare(images, labels, perm, state, x, y, mean, std)
            self.conv2d_pool_fwd(x, w1, b1, None, p1, m1, act, "max")
            self.conv2d_pool_fwd(p1, w3, b3, None, p3, m3, act, "max")
            srow[...] = self._sched(sched, state)

        self._one_launch(run)

    def step_bwd(self, x, p1, gz3, m3, m1, w3, gpart, act, variant=None) -> None:
        check_act(act)
        nc = conv_prefix()
        if gpart.ndim != 2 or gpart.shape[1] != nc:
            raise ValueError(f"step_bwd: gpart must be (groups, {nc}), got {gpart.shape}")
        specs = {s.name: s for s in param_layout()[0]}

        def view(row: np.ndarray, name: str) -> np.ndarray:
            sp = specs[name]
            return row[sp.offset : sp.offset + sp.size].reshape(sp.shape)

        def run() -> None:
            gpart[...] = 0
            for s, g in enumerate(step_groups(x.shape[0], gpart.shape[0])):
                if g.start == g.stop:
                    continue
                row = gpart[s]
                self.conv2d_bwd_weight_routed(p1[g], gz3[g], m3[g], view(row, "c3.w"), view(row, "c3.b"))
                gz1 = np.empty(p1[g].shape, F32)
                self.conv2d_bwd_data_routed(gz3[g], w3, m3[g], p1[g], gz1, act)
                self.conv2d_bwd_weight_routed(x[g], gz1, m1[g], view(row, "c1.w"), view(row, "c1.b"))

        self._one_launch(run)

    def step_adam(self, p, g, gpart, m, v, srow, state, batch, beta1, beta2, eps, weight_decay,
                  variant=None) -> None:
        def run() -> None:
            g[: gpart.shape[1]] = step_reduce(gpart)
            self.adam_step(p, g, m, v, srow.reshape(1, -1), _ROW0, beta1, beta2, eps, weight_decay)
            self.step_advance(state, batch)

        self._one_launch(run)

    def step_sgd(self, p, g, gpart, m, srow, state, batch, momentum, weight_decay, variant=None) -> None:
        def run() -> None:
            g[: gpart.shape[1]] = step_reduce(gpart)
            self.sgd_step(p, g, m, srow.reshape(1, -1), _ROW0, momentum, weight_decay)
            self.step_advance(state, batch)

        self._one_launch(run)


#: a state whose STEP − SCHED_BASE is 0: row 0 of a one-row schedule (the update ops read srow, not the state)
_ROW0 = np.zeros(8, np.int32)
