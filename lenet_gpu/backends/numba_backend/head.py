"""head: LeNet-5's dense head trained as one op (the Numba face of kernels/head.cu).

  h1 = act(x·w1ᵀ + b1) (B,H1); h2 = act(h1·w2ᵀ + b2) (B,H2); logits = h2·w3ᵀ + b3 (B,NC)
  dz3 = (softmax(logits) − onehot(labels))/B; dz2 = (dz3·w3)·act'(h2); dz1 = (dz2·w2)·act'(h1); dx = dz1·w1
  dw3 = dz3ᵀ·h2, db3 = Σ dz3; dw2 = dz2ᵀ·h1, db2; dw1 = dz1ᵀ·x, db1 (overwritten)
  dz_conv (B,C,H,W) = route(dx through S4's 2×2 pooling: the argmax tap, or dx/4 each) · act'(yconv); 0 off-window
  yconv=None (max only, the routed step of docs/routed_backward.md): dz_conv (B,C,Hp,Wp) = gz = dx · act'(x)
  stats[STEP_IN_EPOCH mod S] = [Σ_b loss_b, #rows whose first maximal logit is the label] (overwritten)
x (B,C,Hp,Wp) is the pooled map S4, read as (B,I); labels (B,) int32; argmax (B,C,Hp,Wp) uint8 (max only).

Two launches, no atomics, no tickets:
- head_train_v1 ("rows"): a block owns ``rows`` rows of the batch (tiles of rows, block-stride over the grid)
  and runs the whole chain for them, one thread per output of each phase, operands from global memory, the
  intermediates in the outputs and in scratch (dz1, dz2, dz3, the per-row [loss, hit]); barriers between phases.
  Every array flat, every index uint32 (common.U): no int64 index arithmetic, no 64-bit division, no wraparound
  selects (sm_90: 89 → 40 registers). C5's weights are read coalesced: C5_CHUNK columns at a time staged in
  shared memory by consecutive threads (the plain loop's lanes read w1 400 floats apart), each output still
  summed in input order.
- head_train_wgrad_v1: one thread per element of [dw1|db1], [dw2|db2], [dw3|db3] (the bias = a column of ones),
  each a sum over the batch in row order; one more thread sums the per-row loss and hit in row order.

``head_train(be, ...)`` is the launch wrapper with the protocol's signature (first parameter the backend), so a
backend binds it as a method with one line. It launches the kernel objects itself (they are not in the backend's
KERNELS table) and counts each launch in ``be.counters``; scratch is allocated at the first call at a shape.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numba
import numpy as np
from numba import cuda, float32

from ...stepstate import STEP_IN_EPOCH
from ..base import ACT_CODES, POOL_CODES, check_act, check_mode
from ._compat import import_cuda_array_module
from .common import ACT_IDENTITY, ONE, POOL_MAX, U0, U1, ZERO, U, act_grad, activate, ceil_div

if not numba.config.ENABLE_CUDASIM:
    import_cuda_array_module()  # before the first compile (NumPy 2.5 with numba-cuda 0.30: see _compat)

QUARTER = np.float32(0.25)
#: head_train_v1's mode code for max pooling with the routed backward (yconv=None: dz_conv at x's shape)
POOL_ROUTED = 2
#: threads per block of the rows kernel and of the weight-gradient kernel
HEAD_THREADS = 128
WG_THREADS = 128
#: head_train_v1: columns of C5's weights staged in shared memory at a time (coalesced reads), and the most
#: dynamic shared memory that staging may take (otherwise the plain loop)
C5_CHUNK = 32
C5_MAX_SMEM = 48 * 1024
#: rows per block: the fewest of 1..8 that keep the grid within this many blocks (two per SM of an H100)
FILL_BLOCKS = 2 * 132

# ---------------------------------------------------------------------------------------------- v1: rows


@cuda.jit(device=True, inline="always")
def _fwd_layer(a, w, b, out, r0, nr, nout, nin, act, tid, nt):
    """out[r, o] = act(Σ_i a[r, i] w[o, i] + b[o]) for o < nout, i < nin and the tile's rows r0 .. r0+nr−1,
    threads striding (flat row-major arrays, uint32 offsets)."""
    t = tid
    while t < U(nr * nout):
        rr = U(t // nout)
        o = U(t - rr * nout)
        r = U(r0 + rr)
        abase = U(r * nin)
        wbase = U(o * nin)
        acc = b[o]
        for i in range(nin):
            acc += a[U(abase + U(i))] * w[U(wbase + U(i))]
        out[U(r * nout + o)] = activate(acc, act)
        t = U(t + nt)


@cuda.jit(device=True, inline="always")
def _fwd_layer_staged(a, w, b, out, sw, r0, nr, nout, nin, act, tid, nt):
    """_fwd_layer with w read coalesced (C5: lanes of the plain loop read w 400 floats apart): chunks of C5_CHUNK
    columns of w are staged in shared memory by consecutive threads (row o at o·(C5_CHUNK+1): the padding keeps
    the reads of consecutive o conflict-free); the partial sums wait in out between chunks (each thread keeps
    the same outputs), so each output still sums i in order, as _fwd_layer does."""
    t = tid
    while t < U(nr * nout):
        rr = U(t // nout)
        o = U(t - rr * nout)
        out[U((r0 + rr) * nout + o)] = b[o]
        t = U(t + nt)
    i0 = U0
    while i0 < nin:
        ic = U(min(U(C5_CHUNK), U(nin - i0)))
        cuda.syncthreads()  # nobody still reads the previous chunk
        e = tid
        while e < U(nout * ic):
            o = U(e // ic)
            ii = U(e - o * ic)
            sw[U(o * U(C5_CHUNK + 1) + ii)] = w[U(o * nin + i0 + ii)]
            e = U(e + nt)
        cuda.syncthreads()
        t = tid
        while t < U(nr * nout):
            rr = U(t // nout)
            o = U(t - rr * nout)
            r = U(r0 + rr)
            po = U(r * nout + o)
            abase = U(r * nin + i0)
            sbase = U(o * U(C5_CHUNK + 1))
            acc = out[po]
            for ii in range(ic):
                acc += a[U(abase + U(ii))] * sw[U(sbase + U(ii))]
            out[po] = acc
            t = U(t + nt)
        i0 = U(i0 + U(C5_CHUNK))
    t = tid
    while t < U(nr * nout):
        rr = U(t // nout)
        po = U((r0 + rr) * nout + t - rr * nout)
        out[po] = activate(out[po], act)
        t = U(t + nt)


@cuda.jit(device=True, inline="always")
def _back_layer(dz, w, h, dz_below, r0, nr, nout, nin, act, tid, nt):
    """dz_below[r, i] = (Σ_o dz[r, o] w[o, i]) · act'(h[r, i]) for o < nout, i < nin and the tile's rows,
    threads striding (consecutive threads: consecutive i, so the w reads coalesce)."""
    t = tid
    while t < U(nr * nin):
        rr = U(t // nin)
        i = U(t - rr * nin)
        r = U(r0 + rr)
        dbase = U(r * nout)
        acc = ZERO
        for o in range(nout):
            acc += dz[U(dbase + U(o))] * w[U(U(o) * nin + i)]
        e = U(r * nin + i)
        dz_below[e] = acc * act_grad(h[e], act)
        t = U(t + nt)


@cuda.jit
def head_train_v1(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3,
                  rowstat, nb, cc, hh, ww, nh1, nh2, nc, act, mode, rows, staged):
    # dynamic shared memory (staged == 1): nh1·(C5_CHUNK+1) floats, the C5 weights' chunk
    sw = cuda.shared.array(0, float32)
    # every array flat (row-major), every index uint32 (common.U); x (B, I) with I = cc·hp·wp; yconv, dz_conv
    # (B, cc, hh, ww) — in routed mode x itself and dz_conv at x's shape (hh, ww = hp, wp)
    unb, u1, u2, uc = U(nb), U(nh1), U(nh2), U(nc)
    uhh, uww = U(hh), U(ww)
    hp = U(uhh >> U1)
    wp = U(uww >> U1)
    if mode == POOL_ROUTED:  # yconv is x itself (B,C,Hp,Wp): dz_conv receives gz = dx·act'(x) at x's shape
        hp = uhh
        wp = uww
    pp = U(hp * wp)
    ni = U(U(cc) * pp)
    plane = U(uhh * uww)
    tid, nt = U(cuda.threadIdx.x), U(cuda.blockDim.x)
    urows = U(rows)
    ntiles = U(U(unb + urows - U1) // urows)
    inv_b = ONE / float32(nb)
    tile = U(cuda.blockIdx.x)
    while tile < ntiles:  # block-uniform
        r0 = U(tile * urows)
        nr = U(min(urows, U(unb - r0)))
        if staged == 1:  # h1 = act(x w1ᵀ + b1)
            _fwd_layer_staged(x, w1, b1, h1, sw, r0, nr, u1, ni, act, tid, nt)
        else:
            _fwd_layer(x, w1, b1, h1, r0, nr, u1, ni, act, tid, nt)
        cuda.syncthreads()
        _fwd_layer(h1, w2, b2, h2, r0, nr, u2, u1, act, tid, nt)  # h2 = act(h1 w2ᵀ + b2)
        cuda.syncthreads()
        _fwd_layer(h2, w3, b3, logits, r0, nr, uc, u2, ACT_IDENTITY, tid, nt)  # logits = h2 w3ᵀ + b3
        cuda.syncthreads()
        r = U(r0 + tid)
        while r < U(r0 + nr):  # the loss row and dz3 = dlogits
            lb = U(r * uc)
            mx = logits[lb]
            best = U0
            for c in range(U1, uc):
                if logits[U(lb + U(c))] > mx:
                    mx = logits[U(lb + U(c))]
                    best = U(c)
            se = ZERO
            for c in range(uc):
                se += math.exp(logits[U(lb + U(c))] - mx)
            lab = U(labels[r])
            inv_se = ONE / se
            for c in range(uc):
                p = math.exp(logits[U(lb + U(c))] - mx) * inv_se
                if U(c) == lab:
                    p -= ONE
                dz3[U(lb + U(c))] = p * inv_b
            rowstat[U(r + r)] = math.log(se) - (logits[U(lb + lab)] - mx)
            rowstat[U(r + r + U1)] = ONE if best == lab else ZERO
            r = U(r + nt)
        cuda.syncthreads()
        _back_layer(dz3, w3, h2, dz2, r0, nr, uc, u2, act, tid, nt)  # dz2 = (dz3 w3)·act'(h2)
        cuda.syncthreads()
        _back_layer(dz2, w2, h1, dz1, r0, nr, u2, u1, act, tid, nt)  # dz1 = (dz2 w2)·act'(h1)
        cuda.syncthreads()
        t = tid
        while t < U(nr * ni):  # dx = dz1 w1, routed through S4's pooling into dz_conv
            rr = U(t // ni)
            i = U(t - rr * ni)
            r = U(r0 + rr)
            db1 = U(r * u1)
            g = ZERO
            for o in range(u1):
                g += dz1[U(db1 + U(o))] * w1[U(U(o) * ni + i)]
            e = U(r * ni + i)
            if mode == POOL_ROUTED:  # the routed gradient: max pooling's act' at the routed tap is act'(x)
                dz_conv[e] = g * act_grad(yconv[e], act)
            else:
                c = U(i // pp)
                q = U(i - c * pp)
                ph = U(q // wp)
                pw = U(q - ph * wp)
                base = U((r * U(cc) + c) * plane + U(ph + ph) * uww + U(pw + pw))
                am = U(argmax[e]) if mode == POOL_MAX else U0
                for tap in range(4):
                    o = U(base + U(tap >> 1) * uww + U(tap & 1))
                    if mode == POOL_MAX:
                        v = g if am == U(tap) else ZERO
                    else:
                        v = g * QUARTER
                    dz_conv[o] = v * act_grad(yconv[o], act)
            t = U(t + nt)
        if mode != POOL_ROUTED and (U(hp + hp) != uhh or U(wp + wp) != uww):  # taps no window covers: 0
            per = U(U(cc) * plane)
            t = tid
            while t < U(nr * per):
                rr = U(t // per)
                e = U(t - rr * per)
                e2 = U(e // uww)
                yy = U(e2 - U(e2 // uhh) * uhh)
                xx = U(e - e2 * uww)
                if yy >= U(hp + hp) or xx >= U(wp + wp):
                    dz_conv[U((r0 + rr) * per + e)] = ZERO
                t = U(t + nt)
        cuda.syncthreads()  # the next tile's phases read this tile's nothing, but keep the phases apart
        tile = U(tile + U(cuda.gridDim.x))


# ---------------------------------------------------------------------------------------------- v1: wgrad


@cuda.jit(device=True, inline="always")
def _wgrad_elem(dz, a, o, i, dw, db, nb, nout, na):
    """dw[o, i] = Σ_b dz[b, o] a[b, i] (i < na), or db[o] = Σ_b dz[b, o] (i == na), rows in order (flat arrays,
    uint32 offsets walked by adding the row lengths)."""
    acc = ZERO
    pd = o
    if i < na:
        pa = i
        for _ in range(nb):
            acc += dz[pd] * a[pa]
            pd = U(pd + nout)
            pa = U(pa + na)
        dw[U(o * na + i)] = acc
    else:
        for _ in range(nb):
            acc += dz[pd]
            pd = U(pd + nout)
        db[o] = acc


@cuda.jit
def head_train_wgrad_v1(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, nb, ni, nh1,
                        nh2, nc):
    unb, uni, u1, u2, uc = U(nb), U(ni), U(nh1), U(nh2), U(nc)
    n1 = U(u1 * U(uni + U1))
    n2 = U(u2 * U(u1 + U1))
    n3 = U(uc * U(u2 + U1))
    e = U(cuda.grid(1))
    while e < U(n1 + n2 + n3 + U1):
        if e < n1:
            o = U(e // U(uni + U1))
            _wgrad_elem(dz1, x, o, U(e - o * U(uni + U1)), dw1, db1, unb, u1, uni)
        elif e < U(n1 + n2):
            f = U(e - n1)
            o = U(f // U(u1 + U1))
            _wgrad_elem(dz2, h1, o, U(f - o * U(u1 + U1)), dw2, db2, unb, u2, u1)
        elif e < U(n1 + n2 + n3):
            f = U(e - n1 - n2)
            o = U(f // U(u2 + U1))
            _wgrad_elem(dz3, h2, o, U(f - o * U(u2 + U1)), dw3, db3, unb, uc, u2)
        else:  # the stats row, summed in row order
            loss = ZERO
            hit = ZERO
            for b in range(unb):
                loss += rowstat[U(U(b) + U(b))]
                hit += rowstat[U(U(b) + U(b) + U1)]
            s = stats.shape[0]
            row = state[STEP_IN_EPOCH] % s  # Python-style modulo: never negative
            stats[row, 0] = loss
            stats[row, 1] = hit
        e = U(e + U(cuda.gridsize(1)))


# ------------------------------------------------------------------------------------ variant table

_F2 = "float32[:,::1]"
_F1 = "float32[::1]"
_F4 = "float32[:,:,:,::1]"
SIGNATURES = {
    "head_train_v1": f"void({_F1}, int32[::1], {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, "
    f"uint8[::1], {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {', '.join(['int32'] * 11)})",
    "head_train_wgrad_v1": f"void({_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, "
    f"{_F1}, {_F1}, {_F2}, int32[::1], int32, int32, int32, int32, int32)",
}
KERNELS = {"head_train_v1": head_train_v1, "head_train_wgrad_v1": head_train_wgrad_v1}
LAUNCH_BOUNDS: dict[str, tuple[int, ...]] = {}
VARIANTS = {"head_train": ("v1",)}
DEFAULT_VARIANTS = {"head_train": "v1"}

# ------------------------------------------------------------------------------------------ launch wrapper

_SCRATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DUMMY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def launch_kernel(be: Any, name: str, kernel: Any, grid: int, block: int, shmem: int, *args: Any) -> None:
    """Launch ``kernel`` (named ``name``) through the backend's ``_launch`` (which finds it in FUSED_KERNELS),
    so counters, the launch log, ``record`` and ``graph`` see it like every other launch. A backend without
    ``_launch`` gets the same treatment here: the grid capped at ``be.max_blocks`` (every fused kernel loops
    over its work), the launch counted, logged when ``be.launch_log`` is a list, synchronised when ``be.debug``."""
    if hasattr(be, "_launch"):
        op, variant = name.rsplit("_", 1)
        be._launch(op, variant, grid, block, shmem, *args)
        return
    cap = getattr(be, "max_blocks", None)
    if cap is not None:
        grid = min(grid, cap)
    be.counters.launches += 1
    log = getattr(be, "launch_log", None)
    if log is not None:
        log.append((name, tuple(numba.typeof(a) for a in args)))
    kernel[max(1, grid), block, 0, shmem](*args)
    if getattr(be, "debug", False):
        cuda.synchronize()


def _check(a: Any, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
    if a is None:
        raise ValueError(f"{name}: missing array")
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a device array of this backend, got a host NumPy array (use to_device)")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(a.shape)} does not match the expected {tuple(shape)}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{name}: must be C-contiguous")


def c5_smem(nh1: int) -> int:
    """head_train_v1's dynamic shared memory: C5's staged weight chunk, or 0 (the plain loop) when too big."""
    need = nh1 * (C5_CHUNK + 1) * 4
    return need if need <= C5_MAX_SMEM else 0


def rows_per_block(batch: int) -> int:
    """Rows a block of head_train_v1 owns: 1 until the grid reaches FILL_BLOCKS blocks, then more (at most 8)."""
    return max(1, min(8, ceil_div(batch, FILL_BLOCKS)))


def head_train(
    be: Any, x: Any, labels: Any, w1: Any, b1: Any, w2: Any, b2: Any, w3: Any, b3: Any, h1: Any, h2: Any,
    logits: Any, argmax: Any, yconv: Any, dz_conv: Any, dw1: Any, db1: Any, dw2: Any, db2: Any, dw3: Any, db3: Any,
    stats: Any, state: Any, act: str, mode: str, variant: str | None = None,
) -> None:
    """reference.head_train as one op (two launches); the protocol's optional op (lenet_gpu.backends.base)."""
    v = variant or getattr(be, "default_variants", {}).get("head_train") or DEFAULT_VARIANTS["head_train"]
    if v not in VARIANTS["head_train"]:
        raise ValueError(f"head_train: unknown variant {v!r}; choose one of {', '.join(VARIANTS['head_train'])}")
    check_act(act)
    check_mode(mode)
    if yconv is None and mode != "max":
        raise ValueError("head_train: yconv=None (the routed gradient) needs max pooling")
    n, c, hp, wp = x.shape
    ni = c * hp * wp
    nh1, nh2, nc = w1.shape[0], w2.shape[0], w3.shape[0]
    if yconv is None:  # the routed step (docs/routed_backward.md): dz_conv receives gz at x's shape
        yconv, hc, wc = x, hp, wp
    else:
        hc, wc = yconv.shape[2], yconv.shape[3]
    routed = yconv is x
    if not routed and (hc // 2, wc // 2) != (hp, wp):
        raise ValueError(f"head_train: yconv {tuple(yconv.shape)} does not pool to x {tuple(x.shape)}")
    for name, a, shape in (
        ("x", x, (n, c, hp, wp)), ("w1", w1, (nh1, ni)), ("b1", b1, (nh1,)), ("w2", w2, (nh2, nh1)),
        ("b2", b2, (nh2,)), ("w3", w3, (nc, nh2)), ("b3", b3, (nc,)), ("h1", h1, (n, nh1)), ("h2", h2, (n, nh2)),
        ("logits", logits, (n, nc)), ("yconv", yconv, (n, c, hc, wc)), ("dz_conv", dz_conv, (n, c, hc, wc)),
        ("dw1", dw1, (nh1, ni)), ("db1", db1, (nh1,)), ("dw2", dw2, (nh2, nh1)), ("db2", db2, (nh2,)),
        ("dw3", dw3, (nc, nh2)), ("db3", db3, (nc,)),
    ):
        _check(a, name, shape)
    _check(labels, "labels", (n,), np.int32)
    _check(stats, "stats", (stats.shape[0], 2))
    _check(state, "state", (state.shape[0],), np.int32)
    if n < 1 or stats.shape[0] < 1 or state.shape[0] <= STEP_IN_EPOCH:
        raise ValueError("head_train: needs a batch of at least one row, one stats row and a full step state")
    if mode == "max":
        _check(argmax, "argmax", (n, c, hp, wp), np.uint8)
        am1 = argmax.reshape(n * ni)
    else:  # avg never reads argmax: a one-element stand-in of the declared type
        am1 = _DUMMY.get(be)
        if am1 is None:
            am1 = _DUMMY[be] = be.empty((1,), np.uint8)
    key = (n, nh1, nh2, nc)
    per_be = _SCRATCH.setdefault(be, {})
    ws = per_be.get(key)
    if ws is None:  # dz1, dz2, dz3 and the per-row [loss, hit]: allocated at the first call at a shape
        ws = per_be[key] = (be.empty((n, nh1)), be.empty((n, nh2)), be.empty((n, nc)), be.empty((n, 2)))
    dz1, dz2, dz3, rowstat = ws
    rows = rows_per_block(n)

    def flat(a: Any) -> Any:
        return a.reshape(a.size)

    smem = c5_smem(nh1)
    launch_kernel(be, "head_train_v1", head_train_v1, ceil_div(n, rows), HEAD_THREADS, smem, flat(x), labels, flat(w1),
                  b1, flat(w2), b2, flat(w3), b3, flat(h1), flat(h2), flat(logits), am1, flat(yconv), flat(dz_conv),
                  flat(dz1), flat(dz2), flat(dz3), flat(rowstat), *(np.int32(v) for v in (n, c, hc, wc, nh1, nh2, nc)),
                  np.int32(ACT_CODES[act]), np.int32(POOL_ROUTED if routed else POOL_CODES[mode]), np.int32(rows),
                  np.int32(smem > 0))
    total = nh1 * (ni + 1) + nh2 * (nh1 + 1) + nc * (nh2 + 1) + 1
    launch_kernel(be, "head_train_wgrad_v1", head_train_wgrad_v1, ceil_div(total, WG_THREADS), WG_THREADS, 0, flat(x),
                  flat(h1), flat(h2), flat(dz1), flat(dz2), flat(dz3), flat(rowstat), flat(dw1), db1, flat(dw2), db2,
                  flat(dw3), db3, stats, state, *(np.int32(v) for v in (n, ni, nh1, nh2, nc)))
