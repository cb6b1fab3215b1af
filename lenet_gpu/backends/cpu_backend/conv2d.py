"""conv2d: valid 2-D convolution, stride 1 (reference.conv2d_fwd / conv2d_bwd), as Numba @njit kernels.

x (B,C,H,W), w (K,C,R,S), b (K,) → y (B,K,Ho,Wo), Ho = H−R+1, Wo = W−S+1. Every kernel runs over fixed
chunks of L = 16 images (``prange``); sums over the batch are taken per chunk, then over the chunks in
chunk order, so no result depends on the thread count.

  conv2d_fwd_v1          one output row at a time: the row is the accumulator, the loop along it innermost
  conv2d_bwd_data_v1     dx as the scatter of each dz row times each tap, row loops innermost
  conv2d_bwd_weight_v1   one dw element at a time: sums along each row, then over rows and images
  conv2d_bwd_weight_v2   lanes: 16 images a vector; KB filters × 5 taps of accumulators in registers
  conv2d_bwd_weight_v3   rows: 16 columns a vector (wide maps); the same blocking, images of a chunk in turn
  conv2d_bwd_weight_routed_v2  v3 on max pooling's routed gradient (routed.py): dz rows made from gz and the routes
  conv2d_pool_fwd_v1     lanes: conv + bias + act + 2×2 pool; one pooling window × KB filters in registers
  conv2d_pool_fwd_v2     rows: 2 rows × 32 columns × KB filters in registers, pooled in the epilogue (wide maps)
  conv2d_bwd_data_pool_v1  rows: dx in blocks of 2 rows of two images (or 2 rows × 32 columns) × KB channels in
                         registers, then routed through the 2×2 pool's argmax and the activation's derivative

"Lanes" kernels transpose their inputs into a per-thread workspace (C, H, W, 16) and scatter their
outputs back to NCHW; "rows" kernels read NCHW directly and waste the columns a vector runs past the
map's edge. Lanes suit small maps (C3: 10×10), rows wide ones (C1: 28×28): the backend picks by shape.
The register-blocked kernels are made per block size KB by ``make_*(KB, ABI)`` (a closure, cached per KB); each
calls its chunk function through the address of its compiled code (native.py: ``*_parts``), so it compiles once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import carray, get_thread_id, literally, prange, types

from . import native
from .common import (
    AVG,
    JIT,
    JIT_INLINE,
    JIT_INNER,
    MAX,
    QUARTER,
    RELU,
    WIDE_VECTORS,
    ZERO,
    L,
    act,
    act_grad,
    act_tile,
    njit,
    stack_tile,
)

#: taps per block in the weight-gradient kernels (a block holds KB filters × TB taps of accumulators)
TB = 5


# --------------------------------------------------------------------------------------------- v1: simple


@njit(parallel=True, **JIT)
def conv2d_fwd_v1(x, w, b, y, act_code):
    B, C, H, W = x.shape
    K, _, R, S = w.shape
    Ho, Wo = y.shape[2], y.shape[3]
    for ci in prange((B + L - 1) // L):
        for bb in range(ci * L, min(B, ci * L + L)):
            for k in range(K):
                for i in range(Ho):
                    yr = y[bb, k, i]
                    for j in range(Wo):
                        yr[j] = b[k]
                    for c in range(C):
                        for r in range(R):
                            xr = x[bb, c, i + r]
                            for s in range(S):
                                wv = w[k, c, r, s]
                                xs = xr[s : s + Wo]
                                for j in range(Wo):
                                    yr[j] += wv * xs[j]
                    for j in range(Wo):
                        yr[j] = act(yr[j], act_code)


@njit(parallel=True, **JIT)
def conv2d_bwd_data_v1(dz, w, dx):
    B, K, Ho, Wo = dz.shape
    _, C, R, S = w.shape
    for ci in prange((B + L - 1) // L):
        for bb in range(ci * L, min(B, ci * L + L)):
            d = dx[bb]
            for c in range(C):
                for h in range(d.shape[1]):
                    for v in range(d.shape[2]):
                        d[c, h, v] = ZERO
            for k in range(K):
                for i in range(Ho):
                    g = dz[bb, k, i]
                    for c in range(C):
                        for r in range(R):
                            for s in range(S):
                                wv = w[k, c, r, s]
                                dr = d[c, i + r, s : s + Wo]
                                for j in range(Wo):
                                    dr[j] += wv * g[j]


@njit(parallel=True, **JIT)
def conv2d_bwd_weight_v1(x, dz, dw, db, part):
    B, C, H, W = x.shape
    K, _, R, S = dw.shape
    Ho, Wo = dz.shape[2], dz.shape[3]
    n = K * C * R * S
    nch = (B + L - 1) // L
    for ci in prange(nch):
        p = part[ci]
        b1 = min(B, ci * L + L)
        for k in range(K):
            for c in range(C):
                for r in range(R):
                    for s in range(S):
                        a = ZERO
                        for bb in range(ci * L, b1):
                            for i in range(Ho):
                                g = dz[bb, k, i]
                                xr = x[bb, c, i + r]
                                t = ZERO  # a row's sum first: short sums, small rounding errors
                                for j in range(Wo):
                                    t += g[j] * xr[j + s]
                                a += t
                        p[((k * C + c) * R + r) * S + s] = a
            a = ZERO
            for bb in range(ci * L, b1):
                for i in range(Ho):
                    g = dz[bb, k, i]
                    t = ZERO
                    for j in range(Wo):
                        t += g[j]
                    a += t
            p[n + k] = a
    _sum_parts(part, nch, dw, db)


@njit(**JIT_INNER)
def _sum_parts(part, nch, dw, db):
    """dw, db = Σ over the chunks, in chunk order, of part[ci] = [dw (flat) | db]."""
    K = dw.shape[0]
    n = part.shape[1] - K
    dwf = dw.reshape(n)
    p0 = part[0]
    for e in range(n):
        dwf[e] = p0[e]
    for k in range(K):
        db[k] = p0[n + k]
    for ci in range(1, nch):
        p = part[ci]
        for e in range(n):
            dwf[e] += p[e]
        for k in range(K):
            db[k] += p[n + k]


# ------------------------------------------------------------------------------- shared by the fast kernels


@njit(**JIT_INNER)
def _pad_weights(w, b, wp, bp):
    """wp[:K], bp[:K] = w, b (the rest of wp/bp stays zero: filters that pad K to the block size)."""
    K, C, R, S = w.shape
    for k in range(K):
        bp[k] = b[k]
        for c in range(C):
            for r in range(R):
                for s in range(S):
                    wp[k, c, r, s] = w[k, c, r, s]


@njit(**JIT_INNER)
def _flip_weights(w, wf):
    """wf[c, k, r, s] = w[k, c, R−1−r, S−1−s]: the data gradient as a forward convolution."""
    K, C, R, S = w.shape
    for k in range(K):
        for c in range(C):
            for r in range(R):
                for s in range(S):
                    wf[c, k, r, s] = w[k, c, R - 1 - r, S - 1 - s]


@njit(**JIT_INNER)
def to_lanes(src, b0, nb, dst):
    """dst[c, h, v, l] = src[b0 + l, c, h, v] for l < nb (src (B,C,H,W) NCHW, dst (≥C, ≥H, ≥W, L))."""
    _, C, H, W = src.shape
    for l in range(nb):
        for c in range(C):
            for h in range(H):
                s = src[b0 + l, c, h]
                d = dst[c, h]
                for v in range(W):
                    d[v, l] = s[v]


@njit(**JIT_INNER)
def zero_lanes(dst, nb):
    """dst[..., l] = 0 for l ≥ nb (dst (C,H,W,L)): spare lanes of a partial chunk, before a reduction."""
    C, H, W, _ = dst.shape
    for c in range(C):
        for h in range(H):
            for v in range(W):
                for l in range(nb, L):
                    dst[c, h, v, l] = ZERO


@njit(**JIT_INLINE)
def window_lanes(xt, w, k0, i, j, acc, KB):
    """acc[4q + t] += Σ_{c,r,s} w[k0+q, c, r, s] · xt[c, i+di+r, j+dj+s] for the four pixels
    t = (di, dj) = (0,0), (0,1), (1,0), (1,1) of a 2×2 window, 16 images a vector, KB filters."""
    C = xt.shape[0]
    R, S = w.shape[2], w.shape[3]
    for c in range(C):
        for r in range(R):
            x0 = xt[c, i + r]
            x1 = xt[c, i + 1 + r]
            for s in range(S):
                p00 = x0[j + s]
                p01 = x0[j + s + 1]
                p10 = x1[j + s]
                p11 = x1[j + s + 1]
                for lane in range(L):
                    v00 = p00[lane]
                    v01 = p01[lane]
                    v10 = p10[lane]
                    v11 = p11[lane]
                    for q in range(KB):
                        wq = w[np.uint64(k0 + q), c, r, s]
                        acc[4 * q, lane] += wq * v00
                        acc[4 * q + 1, lane] += wq * v01
                        acc[4 * q + 2, lane] += wq * v10
                        acc[4 * q + 3, lane] += wq * v11


@njit(**JIT_INLINE)
def window_rows(xp, w, k0, i, j, a0, b0, a1, b1, a2, b2, a3, b3, r_lo, r_hi, acc, KB):
    """acc[4q + t] += Σ_{c, r_lo ≤ r < r_hi, s} w[k0+q, c, r, s] · xp[c, i+a_t+r, j+b_t+s : +16] for four
    16-column vectors at row/column offsets (a_t, b_t) of an NCHW map, KB filters (taps of rows that are all
    zero may be left out by the caller: r_lo, r_hi). Unsigned indices: no negative-index fix-ups in the
    loop, so the lane loop is one plain vector load per vector."""
    C = xp.shape[0]
    S = w.shape[3]
    for c in range(C):
        for r in range(r_lo, r_hi):
            x0 = xp[c, i + a0 + r]
            x1 = xp[c, i + a1 + r]
            x2 = xp[c, i + a2 + r]
            x3 = xp[c, i + a3 + r]
            for s in range(S):
                o0 = j + b0 + s
                o1 = j + b1 + s
                o2 = j + b2 + s
                o3 = j + b3 + s
                for lane in range(L):
                    v0 = x0[np.uint64(o0 + lane)]
                    v1 = x1[np.uint64(o1 + lane)]
                    v2 = x2[np.uint64(o2 + lane)]
                    v3 = x3[np.uint64(o3 + lane)]
                    for q in range(KB):
                        wq = w[np.uint64(k0 + q), c, r, s]
                        acc[4 * q, lane] += wq * v0
                        acc[4 * q + 1, lane] += wq * v1
                        acc[4 * q + 2, lane] += wq * v2
                        acc[4 * q + 3, lane] += wq * v3


@njit(**JIT_INLINE)
def bias_init(acc, bp, k0, KB):
    for q in range(KB):
        bq = bp[k0 + q]
        for t in range(4):
            for lane in range(L):
                acc[4 * q + t, lane] = bq


@njit(**JIT_INNER)
def pool4(y0, y1, y2, y3, mode):
    """(pooled value, argmax tap) of the four taps of a window: the first maximum wins; avg sums in order."""
    if mode == AVG:
        return (((y0 + y1) + y2) + y3) * QUARTER, ZERO
    m = y0
    a = ZERO
    if y1 > m:
        m = y1
        a = np.float32(1.0)
    if y2 > m:
        m = y2
        a = np.float32(2.0)
    if y3 > m:
        m = y3
        a = np.float32(3.0)
    return m, a


def block_size(n: int, sizes: tuple[int, ...] = (6, 4), wide: bool | None = None) -> tuple[int, int]:
    """The register block for n filters (or channels): the first size dividing n, else 2 with n padded to
    even. Returns (KB, n padded to a multiple of KB).

    The sizes are for AVX-512 code (``wide``, default common.WIDE_VECTORS): a lane kernel's tile of 4 pixels × 6
    filters is 24 of its 32 zmm registers. With AVX2 code a lane vector is two of 16 ymm registers, so that tile
    spills and every kernel takes one filter a block (KB 1: 8 ymm accumulators). Measured with AVX2 code on the
    AVX-512 machine (NUMBA_CPU_FEATURES=+avx,+avx2,+fma, 2026-12-05, python -m bench.cpu_peak, one thread, two runs
    minutes apart, not interleaved): training 19,865 against 18,671 img/s with these sizes (+6 %), inference
    50,725 against 44,030 (+15 %)."""
    if not (WIDE_VECTORS if wide is None else wide):
        return 1, n
    for kb in sizes:
        if n % kb == 0:
            return kb, n
    return 2, n + n % 2


# ------------------------------------------------------------------------ conv2d_pool_fwd: lanes and rows
#
# Each fast kernel is a small parallel function (``make_*(KB, ABI)``, a closure over the block size, cached per
# KB) whose prange body calls the serial chunk function below with KB; the chunk function asks for KB as a
# literal (``literally``), so its loops over the block are unrolled and its accumulator tile becomes
# registers. Keeping the parallel function small keeps Numba's parfor passes cheap: compile time is mostly
# the chunk functions', compiled once per KB. The kernel calls the chunk function through the address of its
# compiled code (native.py), its last argument a_chunk, so the chunk compiles once, not again into each of the
# kernel's four modules; ``*_parts(...)`` compiles it with the argument types the kernel passes, ABI is its .abi.

#: the largest register block: accumulator tiles are sized for it (the unused part is optimised away)
KB_MAX = 6
W_TILE = 4 * KB_MAX * L  # a window's four pixels × KB filters × 16 lanes
P_TILE = 2 * KB_MAX * L
BW_TILE = 4 * TB * L  # the weight-gradient block: up to 4 filters × TB taps
_MADE: dict[tuple[str, int, str], Any] = {}

#: the argument types the kernels pass their chunk functions (native.Parts): C-contiguous arrays, int64 for ints
F1, F2, F3, F4 = (types.Array(types.float32, n, "C") for n in (1, 2, 3, 4))
U4, I8, BOOL = types.Array(types.uint8, 4, "C"), types.int64, types.boolean


@njit(**JIT_INLINE)
def window_relu_max(xt, wp, bp, k0, wi, wj, acc, pt, KB):
    """Window (wi, wj) of filters k0 … k0+KB−1 in xt's lanes, relu + 2×2 max pooling: pt[2q] = the pooled value,
    pt[2q + 1] = its route (pool4: the first maximum wins), the same bits as the general loop's act_tile then pool4.
    Only the first pixel goes through relu: from a running maximum m ≥ +0, z > m holds exactly when relu(z) > m
    (relu(NaN) = relu(−0) = +0 never exceed it), so relu on the other three changes neither value nor route. The
    accumulators are read at constant indices only (they stay in registers)."""
    bias_init(acc, bp, k0, KB)
    window_lanes(xt, wp, k0, 2 * wi, 2 * wj, acc, KB)
    for q in range(KB):
        for lane in range(L):
            z0 = acc[4 * q, lane]
            m, a = pool4(z0 if z0 > ZERO else ZERO, acc[4 * q + 1, lane], acc[4 * q + 2, lane], acc[4 * q + 3, lane],
                         MAX)
            pt[2 * q, lane] = m
            pt[2 * q + 1, lane] = a


@njit(**JIT_INNER)
def _pool_lanes_relu_max(xt, wp, bp, pf, af, b0, nb, K, Hp, Wp, KB):
    """The pooled maps and routes of relu + 2×2 max pooling, no un-pooled map: pf, af (the flat (B, K, Hp, Wp) ypool
    and argmax) for the nb images of the chunk at b0 in xt's lanes. A function of its own, for the default step's
    speed: inside the general chunk function, whose loops also hold act's calls and the un-pooled map's stores, LLVM
    spilled the loop state and kept the accumulators in memory (lenet_fwd.py measured the same split: C1 47 against
    80 µs, C3 85 against 112 µs for 16 images)."""
    literally(KB)
    Kp = wp.shape[0]
    acc = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    pt = carray(stack_tile(P_TILE), (2 * KB_MAX, L))
    for wi in range(Hp):
        for wj in range(Wp):
            for k0 in range(0, Kp, KB):
                window_relu_max(xt, wp, bp, k0, wi, wj, acc, pt, KB)
                for q in range(min(KB, K - k0)):
                    k = k0 + q
                    for lane in range(nb):
                        op = np.uint64((((b0 + lane) * K + k) * Hp + wi) * Wp + wj)
                        pf[op] = pt[2 * q, lane]
                        af[op] = np.uint8(pt[2 * q + 1, lane])


@njit(**JIT_INNER)
def _pool_fwd_lanes_chunk(x, wp, bp, yconv, ypool, argmax, act_code, mode, write_conv, xt, b0, K, KB):
    literally(KB)
    B, C, H, W = x.shape
    R, S = wp.shape[2], wp.shape[3]
    Ho, Wo = H - R + 1, W - S + 1
    Hp, Wp = Ho // 2, Wo // 2
    Kp = wp.shape[0]
    nb = min(L, B - b0)
    to_lanes(x, b0, nb, xt)
    yf = yconv.reshape(yconv.size)
    pf = ypool.reshape(ypool.size)
    af = argmax.reshape(argmax.size)
    if act_code == RELU and mode == MAX and not write_conv:
        _pool_lanes_relu_max(xt, wp, bp, pf, af, b0, nb, K, Hp, Wp, KB)
        return
    acc = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    vt = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    pt = carray(stack_tile(P_TILE), (2 * KB_MAX, L))
    for wi in range((Ho + 1) // 2):
        i = 2 * wi
        for wj in range((Wo + 1) // 2):
            j = 2 * wj
            for k0 in range(0, Kp, KB):
                bias_init(acc, bp, k0, KB)
                window_lanes(xt, wp, k0, i, j, acc, KB)
                act_tile(acc, vt, 4 * KB, act_code)
                for q in range(KB):
                    if mode == MAX:  # the mode a constant in each loop: both loops are vector code
                        for lane in range(L):
                            m, a = pool4(vt[4 * q, lane], vt[4 * q + 1, lane], vt[4 * q + 2, lane],
                                         vt[4 * q + 3, lane], MAX)
                            pt[2 * q, lane] = m
                            pt[2 * q + 1, lane] = a
                    else:
                        for lane in range(L):
                            m, _ = pool4(vt[4 * q, lane], vt[4 * q + 1, lane], vt[4 * q + 2, lane],
                                         vt[4 * q + 3, lane], AVG)
                            pt[2 * q, lane] = m
                            pt[2 * q + 1, lane] = ZERO
                pooled = wi < Hp and wj < Wp
                full = j + 1 < Wo and i + 1 < Ho
                for q in range(min(KB, K - k0)):
                    k = k0 + q
                    for lane in range(nb):  # flat offsets, unsigned: a few integer ops a store
                        bb = b0 + lane
                        if write_conv:
                            o = np.uint64(((bb * K + k) * Ho + i) * Wo + j)
                            yf[o] = vt[4 * q, lane]
                            if full:
                                yf[o + 1] = vt[4 * q + 1, lane]
                                yf[o + Wo] = vt[4 * q + 2, lane]
                                yf[o + Wo + 1] = vt[4 * q + 3, lane]
                            else:
                                if j + 1 < Wo:
                                    yf[o + 1] = vt[4 * q + 1, lane]
                                if i + 1 < Ho:
                                    yf[o + Wo] = vt[4 * q + 2, lane]
                        if pooled:
                            op = np.uint64(((bb * K + k) * Hp + wi) * Wp + wj)
                            pf[op] = pt[2 * q, lane]
                            if mode == MAX:
                                af[op] = np.uint8(pt[2 * q + 1, lane])


_call_pool_lanes = native.caller(_pool_fwd_lanes_chunk)


def pool_fwd_parts(v: str, KB: int) -> native.Parts:
    """conv2d_pool_fwd_<v>'s chunk function (v1: lanes, v2: rows) compiled for the argument types its kernel (and
    step4.step_fwd_v1) passes it: its address is the kernel's argument a_chunk."""
    fn, ws = (_pool_fwd_lanes_chunk, F4) if v == "v1" else (_pool_fwd_rows_chunk, F3)
    return native.Parts((fn, (F4, F4, F1, F4, F4, U4, I8, I8, BOOL, ws, I8, I8, types.literal(KB))))


def make_conv2d_pool_fwd_v1(KB: int, ABI: str) -> Any:
    """conv2d_pool_fwd_v1 (lanes) for blocks of KB filters; ABI: pool_fwd_parts("v1", KB).abi."""
    key = ("conv2d_pool_fwd_v1", KB, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_pool_fwd_v1(x, w, b, yconv, ypool, argmax, act_code, mode, write_conv, ws_x, wp, bp, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            B = x.shape[0]
            _pad_weights(w, b, wp, bp)
            for ci in prange((B + L - 1) // L):
                _call_pool_lanes(a_chunk, (x, wp, bp, yconv, ypool, argmax, act_code, mode, write_conv,
                                           ws_x[get_thread_id()], np.int64(ci) * L, w.shape[0], KB))

        _MADE[key] = conv2d_pool_fwd_v1
    return _MADE[key]


@njit(**JIT_INNER)
def _pool_fwd_rows_chunk(x, wp, bp, yconv, ypool, argmax, act_code, mode, write_conv, xp, b0, K, KB):
    literally(KB)
    B, C, H, W = x.shape
    R, S = wp.shape[2], wp.shape[3]
    Ho, Wo = H - R + 1, W - S + 1
    Hp, Wp = Ho // 2, Wo // 2
    Kp = wp.shape[0]
    acc = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    # the activated tile, two views: by the accumulators' rows (va, for act_tile) and by the map's rows (vt, for the
    # pooling): va[4q + t] is vt[q, t // 2, (t % 2)·16 : +16], filter q's row i + t // 2, columns (t % 2)·16 …
    vtile = stack_tile(W_TILE)
    va = carray(vtile, (4 * KB_MAX, L))
    vt = carray(vtile, (KB_MAX, 2, 2 * L))
    for bb in range(b0, min(B, b0 + L)):
        for c in range(C):
            for h in range(H):
                s_ = x[bb, c, h]
                d_ = xp[c, h]
                for v in range(W):
                    d_[v] = s_[v]
        for wi in range((Ho + 1) // 2):
            i = 2 * wi
            for j0 in range(0, Wo, 2 * L):
                ncol = min(2 * L, Wo - j0)
                npool = min(L, Wp - j0 // 2)
                for k0 in range(0, Kp, KB):
                    bias_init(acc, bp, k0, KB)
                    window_rows(xp, wp, k0, i, j0, 0, 0, 0, L, 1, 0, 1, L, 0, R, acc, KB)
                    act_tile(acc, va, 4 * KB, act_code)
                    for q in range(min(KB, K - k0)):
                        k = k0 + q
                        r0 = vt[q, 0]
                        r1 = vt[q, 1]
                        if write_conv:
                            yr = yconv[bb, k, i, j0 : j0 + ncol]
                            for jj in range(ncol):
                                yr[jj] = r0[jj]
                            if i + 1 < Ho:
                                yr = yconv[bb, k, i + 1, j0 : j0 + ncol]
                                for jj in range(ncol):
                                    yr[jj] = r1[jj]
                        if wi < Hp and npool > 0:
                            pr = ypool[bb, k, wi, j0 // 2 : j0 // 2 + npool]
                            if mode == MAX:
                                ar = argmax[bb, k, wi, j0 // 2 : j0 // 2 + npool]
                                for m in range(npool):
                                    v, a = pool4(r0[2 * m], r0[2 * m + 1], r1[2 * m], r1[2 * m + 1], MAX)
                                    pr[m] = v
                                    ar[m] = np.uint8(a)
                            else:
                                for m in range(npool):
                                    v, _ = pool4(r0[2 * m], r0[2 * m + 1], r1[2 * m], r1[2 * m + 1], AVG)
                                    pr[m] = v


_call_pool_rows = native.caller(_pool_fwd_rows_chunk)


def make_conv2d_pool_fwd_v2(KB: int, ABI: str) -> Any:
    """conv2d_pool_fwd_v2 (rows) for blocks of KB filters; ABI: pool_fwd_parts("v2", KB).abi."""
    key = ("conv2d_pool_fwd_v2", KB, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_pool_fwd_v2(x, w, b, yconv, ypool, argmax, act_code, mode, write_conv, ws_x, wp, bp, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            B = x.shape[0]
            _pad_weights(w, b, wp, bp)
            for ci in prange((B + L - 1) // L):
                _call_pool_rows(a_chunk, (x, wp, bp, yconv, ypool, argmax, act_code, mode, write_conv,
                                          ws_x[get_thread_id()], np.int64(ci) * L, w.shape[0], KB))

        _MADE[key] = conv2d_pool_fwd_v2
    return _MADE[key]


# -------------------------------------------------------------------- conv2d_bwd_weight: lanes and rows


@njit(**JIT_INNER)
def _taps(t0, S, ntap):
    """The (r, s) of taps t0 .. t0+4 (taps past R·S read tap 0; their sums are dropped)."""
    r0, s0 = divmod(t0, S) if t0 < ntap else (0, 0)
    r1, s1 = divmod(t0 + 1, S) if t0 + 1 < ntap else (0, 0)
    r2, s2 = divmod(t0 + 2, S) if t0 + 2 < ntap else (0, 0)
    r3, s3 = divmod(t0 + 3, S) if t0 + 3 < ntap else (0, 0)
    r4, s4 = divmod(t0 + 4, S) if t0 + 4 < ntap else (0, 0)
    return r0, s0, r1, s1, r2, s2, r3, s3, r4, s4


@njit(**JIT_INNER)
def _bwd_weight_lanes_chunk(x, dz, xt, dzt, p, b0, K, KB):
    literally(KB)
    B, C, H, W = x.shape
    Ho, Wo = dz.shape[2], dz.shape[3]
    Kp = dzt.shape[0]
    R, S = H - Ho + 1, W - Wo + 1
    ntap = R * S
    nb = min(L, B - b0)
    to_lanes(x, b0, nb, xt)
    to_lanes(dz, b0, nb, dzt)
    if nb < L:
        zero_lanes(dzt, nb)
    acc = carray(stack_tile(BW_TILE), (4 * TB, L))
    for k0 in range(0, Kp, KB):
        for c in range(C):
            for t0 in range(0, ntap, TB):
                r0, s0, r1, s1, r2, s2, r3, s3, r4, s4 = _taps(t0, S, ntap)
                for e in range(KB * TB):
                    for lane in range(L):
                        acc[e, lane] = ZERO
                for i in range(Ho):
                    x0 = xt[c, i + r0]
                    x1 = xt[c, i + r1]
                    x2 = xt[c, i + r2]
                    x3 = xt[c, i + r3]
                    x4 = xt[c, i + r4]
                    for j in range(Wo):
                        for lane in range(L):
                            v0 = x0[np.uint64(j + s0), lane]
                            v1 = x1[np.uint64(j + s1), lane]
                            v2 = x2[np.uint64(j + s2), lane]
                            v3 = x3[np.uint64(j + s3), lane]
                            v4 = x4[np.uint64(j + s4), lane]
                            for q in range(KB):
                                d = dzt[np.uint64(k0 + q), i, j, lane]
                                acc[TB * q, lane] += d * v0
                                acc[TB * q + 1, lane] += d * v1
                                acc[TB * q + 2, lane] += d * v2
                                acc[TB * q + 3, lane] += d * v3
                                acc[TB * q + 4, lane] += d * v4
                _store_taps(acc, p, k0, c, t0, K, C, ntap, KB)
    _store_bias(dzt, p, K * C * ntap, K, Ho, Wo)


_call_weight_lanes = native.caller(_bwd_weight_lanes_chunk)


def make_conv2d_bwd_weight_v2(KB: int, ABI: str) -> Any:
    """conv2d_bwd_weight_v2 (lanes) for blocks of KB filters × TB taps; ABI: bwd_weight_parts("v2", KB).abi."""
    key = ("conv2d_bwd_weight_v2", KB, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_weight_v2(x, dz, dw, db, ws_x, ws_dz, part, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            nch = (x.shape[0] + L - 1) // L
            for ci in prange(nch):
                tid = get_thread_id()
                _call_weight_lanes(a_chunk, (x, dz, ws_x[tid], ws_dz[tid], part[ci], np.int64(ci) * L, dw.shape[0],
                                             KB))
            _sum_parts(part, nch, dw, db)

        _MADE[key] = conv2d_bwd_weight_v2
    return _MADE[key]


@njit(**JIT_INLINE)
def _store_taps(acc, p, k0, c, t0, K, C, ntap, KB):
    """p[dw index of (k0+q, c, tap t0+t)] = Σ_lanes acc[TB q + t] (lanes summed in order)."""
    for q in range(KB):
        k = k0 + q
        if k < K:
            for t in range(TB):
                if t0 + t < ntap:
                    a = ZERO
                    for lane in range(L):
                        a += acc[TB * q + t, lane]
                    p[(k * C + c) * ntap + t0 + t] = a


@njit(**JIT_INNER)
def _store_bias(dzt, p, n, K, Ho, Wo):
    """p[n + k] = Σ_{i,j,lanes} dzt[k, i, j] (lanes summed in order at the end)."""
    s = carray(stack_tile(L), (L,))
    for k in range(K):
        for lane in range(L):
            s[lane] = ZERO
        for i in range(Ho):
            for j in range(Wo):
                g = dzt[k, i, j]
                for lane in range(L):
                    s[lane] += g[lane]
        a = ZERO
        for lane in range(L):
            a += s[lane]
        p[n + k] = a


@njit(**JIT_INNER)
def _bwd_weight_rows_chunk(x, dz, xs, ds, p, b0, K, KB):
    literally(KB)
    B, C, H, W = x.shape
    Ho, Wo = dz.shape[2], dz.shape[3]
    nb = min(L, B - b0)
    for e in range(nb):  # the chunk's images: x zero past column W, dz zero past column Wo and filter K
        for c in range(C):
            for h in range(H):
                s_ = x[b0 + e, c, h]
                d_ = xs[e, c, h]
                for v in range(W):
                    d_[v] = s_[v]
        for k in range(K):
            for h in range(Ho):
                s_ = dz[b0 + e, k, h]
                d_ = ds[e, k, h]
                for v in range(Wo):
                    d_[v] = s_[v]
    _bwd_weight_rows_sums(xs, ds, p, nb, C, H, W, Ho, Wo, K, KB)


@njit(**JIT_INNER)
def _bwd_weight_rows_routed_chunk(x, gz, argmax, xs, ds, p, b0, Ho, Wo, K, KB):
    """_bwd_weight_rows_chunk on the routed gradient: each image's dz rows made in the workspace from gz and
    the routes (zeros, then gz at the routed taps) instead of copied from a dense dz."""
    literally(KB)
    B, C, H, W = x.shape
    Hp, Wp = gz.shape[2], gz.shape[3]
    nb = min(L, B - b0)
    for e in range(nb):
        for c in range(C):
            for h in range(H):
                s_ = x[b0 + e, c, h]
                d_ = xs[e, c, h]
                for v in range(W):
                    d_[v] = s_[v]
        for k in range(K):
            for h in range(Ho):
                d_ = ds[e, k, h]
                for v in range(Wo):
                    d_[v] = ZERO
            for i in range(Hp):
                for j in range(Wp):
                    a = argmax[b0 + e, k, i, j] & 3
                    ds[e, k, 2 * i + (a >> 1), 2 * j + (a & 1)] = gz[b0 + e, k, i, j]
    _bwd_weight_rows_sums(xs, ds, p, nb, C, H, W, Ho, Wo, K, KB)


@njit(**JIT_INNER)
def _bwd_weight_rows_sums(xs, ds, p, nb, C, H, W, Ho, Wo, K, KB):
    literally(KB)
    Kp = ds.shape[1]
    NV = ds.shape[3] // L
    R, S = H - Ho + 1, W - Wo + 1
    ntap = R * S
    acc = carray(stack_tile(BW_TILE), (4 * TB, L))
    for k0 in range(0, Kp, KB):
        for c in range(C):
            for t0 in range(0, ntap, TB):
                r0, s0, r1, s1, r2, s2, r3, s3, r4, s4 = _taps(t0, S, ntap)
                for e in range(KB * TB):
                    for lane in range(L):
                        acc[e, lane] = ZERO
                for e in range(nb):
                    for i in range(Ho):
                        x0 = xs[e, c, i + r0]
                        x1 = xs[e, c, i + r1]
                        x2 = xs[e, c, i + r2]
                        x3 = xs[e, c, i + r3]
                        x4 = xs[e, c, i + r4]
                        for j in range(0, NV * L, L):
                            for lane in range(L):
                                v0 = x0[np.uint64(j + s0 + lane)]
                                v1 = x1[np.uint64(j + s1 + lane)]
                                v2 = x2[np.uint64(j + s2 + lane)]
                                v3 = x3[np.uint64(j + s3 + lane)]
                                v4 = x4[np.uint64(j + s4 + lane)]
                                for q in range(KB):
                                    d = ds[e, np.uint64(k0 + q), i, np.uint64(j + lane)]
                                    acc[TB * q, lane] += d * v0
                                    acc[TB * q + 1, lane] += d * v1
                                    acc[TB * q + 2, lane] += d * v2
                                    acc[TB * q + 3, lane] += d * v3
                                    acc[TB * q + 4, lane] += d * v4
                _store_taps(acc, p, k0, c, t0, K, C, ntap, KB)
    sv = carray(stack_tile(L), (L,))
    for k in range(K):
        for lane in range(L):
            sv[lane] = ZERO
        for e in range(nb):
            for i in range(Ho):
                g1 = ds[e, k, i]
                for j in range(0, NV * L, L):
                    for lane in range(L):
                        sv[lane] += g1[np.uint64(j + lane)]
        a = ZERO
        for lane in range(L):
            a += sv[lane]
        p[K * C * ntap + k] = a


_call_weight_rows = native.caller(_bwd_weight_rows_chunk)
_call_weight_rows_routed = native.caller(_bwd_weight_rows_routed_chunk)


def bwd_weight_parts(v: str, KB: int) -> native.Parts:
    """conv2d_bwd_weight_<v>'s chunk function (v2: lanes, v3: rows, routed_v2: rows on the routed gradient, as
    step4.step_bwd_v1 calls it too) compiled for the argument types its kernel passes it: its address is the
    kernel's argument a_chunk."""
    if v == "routed_v2":
        return native.Parts((_bwd_weight_rows_routed_chunk, (F4, F4, U4, F4, F4, F1, I8, I8, I8, I8,
                                                             types.literal(KB))))
    fn = _bwd_weight_lanes_chunk if v == "v2" else _bwd_weight_rows_chunk
    return native.Parts((fn, (F4, F4, F4, F4, F1, I8, I8, types.literal(KB))))


def make_conv2d_bwd_weight_v3(KB: int, ABI: str) -> Any:
    """conv2d_bwd_weight_v3 (rows) for blocks of KB filters × TB taps; ABI: bwd_weight_parts("v3", KB).abi."""
    key = ("conv2d_bwd_weight_v3", KB, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_weight_v3(x, dz, dw, db, ws_x, ws_dz, part, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            nch = (x.shape[0] + L - 1) // L
            for ci in prange(nch):
                tid = get_thread_id()
                _call_weight_rows(a_chunk, (x, dz, ws_x[tid], ws_dz[tid], part[ci], np.int64(ci) * L, dw.shape[0],
                                            KB))
            _sum_parts(part, nch, dw, db)

        _MADE[key] = conv2d_bwd_weight_v3
    return _MADE[key]


def make_conv2d_bwd_weight_routed_v2(KB: int, ABI: str) -> Any:
    """conv2d_bwd_weight_routed_v2 (rows, cpu_backend/routed.py): conv2d_bwd_weight_v3 on the routed gradient,
    its dz rows made from gz and the routes in the workspace (no dense dz); ABI: bwd_weight_parts("routed_v2",
    KB).abi."""
    key = ("conv2d_bwd_weight_routed_v2", KB, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_weight_routed_v2(x, gz, argmax, dw, db, ws_x, ws_dz, part, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            nch = (x.shape[0] + L - 1) // L
            Ho, Wo = x.shape[2] - dw.shape[2] + 1, x.shape[3] - dw.shape[3] + 1
            for ci in prange(nch):
                tid = get_thread_id()
                _call_weight_rows_routed(a_chunk, (x, gz, argmax, ws_x[tid], ws_dz[tid], part[ci], np.int64(ci) * L,
                                                   Ho, Wo, dw.shape[0], KB))
            _sum_parts(part, nch, dw, db)

        _MADE[key] = conv2d_bwd_weight_routed_v2
    return _MADE[key]


# -------------------------------------------------------------------------------- conv2d_bwd_data_pool


@njit(**JIT_INNER)
def _bwd_data_pool_chunk(dz, wf, argmax, yconv, dzb, mode, act_code, dzp, dxw, b0, C, KB):
    literally(KB)
    B, K, Ho, Wo = dz.shape
    R, S = wf.shape[2], wf.shape[3]
    Hx, Wx = Ho + R - 1, Wo + S - 1
    H2, W2 = yconv.shape[2], yconv.shape[3]
    Cp = wf.shape[0]
    b1 = min(B, b0 + L)
    acc = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    if Wx <= L:
        # narrow maps: a block is 2 rows × 16 columns of two images at once (their framed dz one above the
        # other in dzp, Hd rows apart), × KB channels: no wasted rows, only the columns past Wx
        Hd = dzp.shape[1] // 2
        for e0 in range(b0, b1, 2):
            for h in range(2):
                if e0 + h < b1:
                    _frame(dz[e0 + h], dzp, h * Hd, R, S)
            for i0 in range(0, Hx, 2):
                # the block's two rows read framed rows i0 + r and i0 + 1 + r: taps whose both rows are frame
                # (zero) are left out (a quarter of them at LeNet's sizes)
                r_lo, r_hi = max(0, R - 2 - i0), min(R, R - 1 + Ho - i0)
                for c0 in range(0, Cp, KB):
                    for e in range(4 * KB):
                        for lane in range(L):
                            acc[e, lane] = ZERO
                    window_rows(dzp, wf, c0, i0, 0, 0, 0, 1, 0, Hd, 0, Hd + 1, 0, r_lo, r_hi, acc, KB)
                    for q in range(KB):
                        for t in range(4):
                            d_ = dxw[t // 2, c0 + q, i0 + t % 2]
                            for lane in range(L):
                                d_[lane] = acc[4 * q + t, lane]
            for h in range(2):
                if e0 + h < b1:
                    _route(dxw[h], argmax, yconv, dzb, e0 + h, C, Hx, Wx, H2, W2, mode, act_code)
    else:
        # wide maps: 2 rows × 32 columns of one image
        for bb in range(b0, b1):
            _frame(dz[bb], dzp, np.int64(0), R, S)  # not a literal 0: the narrow maps' specialisation
            for i0 in range(0, Hx, 2):
                r_lo, r_hi = max(0, R - 2 - i0), min(R, R - 1 + Ho - i0)
                for j0 in range(0, Wx, 2 * L):
                    for c0 in range(0, Cp, KB):
                        for e in range(4 * KB):
                            for lane in range(L):
                                acc[e, lane] = ZERO
                        window_rows(dzp, wf, c0, i0, j0, 0, 0, 0, L, 1, 0, 1, L, r_lo, r_hi, acc, KB)
                        for q in range(KB):
                            for t in range(4):
                                d_ = dxw[0, c0 + q, i0 + t // 2, j0 + L * (t % 2) : j0 + L * (t % 2) + L]
                                for lane in range(L):
                                    d_[lane] = acc[4 * q + t, lane]
            _route(dxw[0], argmax, yconv, dzb, bb, C, Hx, Wx, H2, W2, mode, act_code)


@njit(**JIT_INNER)
def _frame(g, dzp, h0, R, S):
    """dzp[k, h0 + R−1 + a, S−1 + b] = g[k, a, b]: dz framed by R−1 rows and S−1 columns of zeros (the frame
    is never written, so it stays zero)."""
    K, Ho, Wo = g.shape
    for k in range(K):
        for a in range(Ho):
            s_ = g[k, a]
            d_ = dzp[k, h0 + R - 1 + a]
            for v in range(Wo):
                d_[S - 1 + v] = s_[v]


_call_data_pool = native.caller(_bwd_data_pool_chunk)


def bwd_data_pool_parts(KB: int) -> native.Parts:
    """conv2d_bwd_data_pool_v1's chunk function compiled for the argument types the kernel passes it: its address is
    the kernel's argument a_chunk."""
    return native.Parts((_bwd_data_pool_chunk, (F4, F4, U4, F4, F4, I8, I8, F3, F4, I8, I8, types.literal(KB))))


def make_conv2d_bwd_data_pool_v1(KB: int, ABI: str) -> Any:
    """conv2d_bwd_data_pool_v1 (rows) for blocks of KB channels; ABI: bwd_data_pool_parts(KB).abi."""
    key = ("conv2d_bwd_data_pool_v1", KB, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_data_pool_v1(dz, w, argmax, yconv, dzb, mode, act_code, ws_dz, ws_dx, wf, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            _flip_weights(w, wf)
            for ci in prange((dz.shape[0] + L - 1) // L):
                tid = get_thread_id()
                _call_data_pool(a_chunk, (dz, wf, argmax, yconv, dzb, mode, act_code, ws_dz[tid], ws_dx[tid],
                                          np.int64(ci) * L, w.shape[1], KB))

        _MADE[key] = conv2d_bwd_data_pool_v1
    return _MADE[key]


@njit(**JIT_INNER)
def _route(dxw, argmax, yconv, dzb, bb, C, Hx, Wx, H2, W2, mode, act_code):
    """dzb[bb] = pool2x2_bwd(dx, argmax) · act'(yconv[bb]): every 2×2 window gets its dx at the argmax tap
    (max) or a quarter of it at every tap (avg), times the derivative there; uncovered taps get 0.
    Max: the plane is zeroed (one vector loop) and each window's one value stored."""
    for c in range(C):
        plane = dzb[bb, c]
        if mode == MAX:
            flat = plane.reshape(H2 * W2)
            for e in range(H2 * W2):
                flat[e] = ZERO
            y = yconv[bb, c]
            for i in range(Hx):
                d = dxw[c, i]
                am = argmax[bb, c, i]
                for j in range(Wx):
                    a = am[j] & 3  # a corrupt argmax stays inside its window
                    h = 2 * i + (a >> 1)
                    v = 2 * j + (a & 1)
                    plane[h, v] = act_grad(d[j], y[h, v], act_code)
        else:
            for i in range(Hx):
                d = dxw[c, i]
                ya = yconv[bb, c, 2 * i]
                yb = yconv[bb, c, 2 * i + 1]
                oa = plane[2 * i]
                ob = plane[2 * i + 1]
                for j in range(Wx):
                    g = d[j] * QUARTER
                    oa[2 * j] = act_grad(g, ya[2 * j], act_code)
                    oa[2 * j + 1] = act_grad(g, ya[2 * j + 1], act_code)
                    ob[2 * j] = act_grad(g, yb[2 * j], act_code)
                    ob[2 * j + 1] = act_grad(g, yb[2 * j + 1], act_code)
                if W2 > 2 * Wx:
                    oa[W2 - 1] = ZERO
                    ob[W2 - 1] = ZERO
            if H2 > 2 * Hx:
                o = plane[H2 - 1]
                for v in range(W2):
                    o[v] = ZERO
