"""routed: the backward of a conv + 2×2 max pool that touches only the routed taps (docs/routed_backward.md).

gz (B,K,Hp,Wp) is the routed gradient at the pooled size, argmax (B,K,Hp,Wp) the tap each window chose; the
dense ops' dz is gz scattered to those taps, 3/4 zeros. These kernels take one routed position at a time:

  conv2d_bwd_weight_routed_v1  patch rows: dw[k] += gz · (the input patch at the routed tap), the input copied
                               channels-last so that a patch row of S·C floats is contiguous (C3: 30 floats, two
                               16-float vectors); R rows × PW floats of accumulators in registers
  conv2d_bwd_weight_routed_v2  conv2d.make_conv2d_bwd_weight_routed_v2: the dense rows kernel (conv2d_bwd_weight_v3)
                               with each image's dz rows made in its workspace from gz and the routes: for narrow
                               patch rows (C = 1: 5 of 16 floats), where v1 loses (LeNet's C1, batch 128, one
                               thread: v1 took 5 to 6 times the dense kernel's time; LLVM compiles its 16-float
                               row to scalar FMAs); the dense multiply-adds, no dense dz
  conv2d_bwd_weight_routed_v3  whole patches: each image copied into a row stack zs[h, (w·C + c)·R + r] = x[c, h + r, w]
                               (each row made from the one before: shifted by one float, the new last taps
                               written), so that the patch at a routed tap is R·S·C contiguous floats, padded to
                               PV (C1: 25 of 32 floats, two AVX-512 or four AVX2 vectors against v1's 5 rows of
                               16); two accumulator sets (even and odd window columns) against the FMA latency.
                               For C = 1 (LeNet's C1) where v2 runs the dense multiply-adds: routed, C1's weight
                               gradient takes 30K multiply-adds an image instead of 118K (batch 128, two
                               threads, AVX2 machine, 2026-12-07: 0.65 ms against v2's 1.40-1.69 ms)
  conv2d_bwd_data_routed_v1    patch rows: dx (channels-last, per image) += gz · (the filter's rows, S·C floats),
                               then gz_below = dx · act'(y_below) back to NCHW

What they improve on the dense kernels (conv2d_bwd_weight_v2/v3, conv2d_bwd_data_pool_v1): a quarter of the
multiply-adds (LeNet's C3 data gradient and weight gradient: 480K → 120K an image; C1's weight gradient 118K → 30K,
v3), and no dense dz, no yconv. The vector runs along a patch row, so the routed tap is one scalar
offset (a vector over images or output columns would need a gather, or a select of 4 taps: the dense cost). The
cost: a patch row of S·C floats is padded to PW (a multiple of the vector), which wastes 2/32 at C3 (C = 6).

Every chunk of 16 images is one prange task; the weight gradient is summed per chunk, then over the chunks in
chunk order (no result depends on the thread count); the data gradient is per image. A kernel calls its chunk
function through the address of its compiled code (native.py; ``*_parts``, ABI), so the chunk compiles once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import carray, get_thread_id, literally, prange, types

from . import native
from .common import JIT, JIT_INNER, RELU, ZERO, L, act_grad, njit, stack_tile
from .conv2d import F1, F2, F3, F4, I8, U4, _sum_parts

#: the accumulator tile: up to 4 filters × 5 rows × 32 floats (KB · R · PW ≤ RT_TILE)
RT_TILE = 4 * 5 * 32
_MADE: dict[tuple[str, int, int, int, str], Any] = {}


def patch_width(S: int, C: int, vector: int = 16) -> int:
    """PW: a patch row of S·C floats rounded up to whole vectors (16 floats: one AVX-512 register, two AVX2)."""
    return -(-(S * C) // vector) * vector


def routed_block(K: int, R: int, PW: int) -> int:
    """KB: filters a block of conv2d_bwd_weight_routed_v1. 1: its R · PW / 16 accumulators (C3: 10 vectors) stay
    in registers; with 2 or 4 LLVM keeps the block's loop and the tile in memory (measured at LeNet's C3, batch
    128, one thread, interleaved on a loaded machine: KB 1, 2, 4 took 1.33, 2.18, 2.36 ms, the dense v2 3.74 ms).
    A divisor of K in any case (the kernel has no partial block)."""
    return 1


@njit(**JIT_INNER)
def to_channels_last(src, bb, dst):
    """dst[h, w·C + c] = src[bb, c, h, w] (dst (≥H, ≥W·C)); the rest of dst is left as it is (zero)."""
    _, C, H, W = src.shape
    for c in range(C):
        for h in range(H):
            s_ = src[bb, c, h]
            d_ = dst[h]
            for w in range(W):
                d_[w * C + c] = s_[w]


@njit(**JIT_INNER)
def _bwd_weight_routed_chunk(x, gz, argmax, xs, p, b0, K, S, KB, R, PW):
    literally(KB)
    literally(R)
    literally(PW)
    B, C, H, W = x.shape
    Hp, Wp = gz.shape[2], gz.shape[3]
    n = K * C * R * S
    nb = min(L, B - b0)
    for e in range(nb):
        to_channels_last(x, b0 + e, xs[e])
    acc = carray(stack_tile(RT_TILE), (RT_TILE // PW, PW))
    for k0 in range(0, K, KB):  # KB divides K
        for t in range(KB * R):
            for v in range(PW):
                acc[t, v] = ZERO
        for q in range(KB):
            p[n + k0 + q] = ZERO
        for e in range(nb):
            bb = b0 + e
            xe = xs[e]
            for i in range(Hp):
                for j in range(Wp):
                    for q in range(KB):
                        k = k0 + q
                        a = argmax[bb, k, i, j] & 3  # a corrupt argmax stays inside its window
                        g = gz[bb, k, i, j]
                        p[n + k] += g  # db[k], summed images, rows, columns in order
                        h0 = 2 * i + (a >> 1)
                        o = np.uint64((2 * j + (a & 1)) * C)
                        for r in range(R):
                            row = xe[h0 + r]
                            for v in range(PW):
                                acc[q * R + r, v] += g * row[o + np.uint64(v)]
        for q in range(KB):
            k = k0 + q
            for r in range(R):
                for s in range(S):
                    for c in range(C):
                        p[((k * C + c) * R + r) * S + s] = acc[q * R + r, s * C + c]


_call_weight = native.caller(_bwd_weight_routed_chunk)


def bwd_weight_parts(KB: int, R: int, PW: int) -> native.Parts:
    """conv2d_bwd_weight_routed_v1's chunk function compiled for the argument types its kernel (and
    step4.step_bwd_v1) passes it: its address is the kernel's argument a_chunk."""
    return native.Parts((_bwd_weight_routed_chunk, (F4, F4, U4, F3, F1, I8, I8, I8, types.literal(KB),
                                                    types.literal(R), types.literal(PW))))


def make_conv2d_bwd_weight_routed_v1(KB: int, R: int, PW: int, ABI: str) -> Any:
    """conv2d_bwd_weight_routed_v1 for blocks of KB filters, R patch rows of PW floats; ABI: bwd_weight_parts(KB, R,
    PW).abi."""
    key = ("conv2d_bwd_weight_routed_v1", KB, R, PW, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_weight_routed_v1(x, gz, argmax, dw, db, ws_x, part, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            nch = (x.shape[0] + L - 1) // L
            for ci in prange(nch):
                _call_weight(a_chunk, (x, gz, argmax, ws_x[get_thread_id()], part[ci], np.int64(ci) * L, dw.shape[0],
                                       dw.shape[3], KB, R, PW))
            _sum_parts(part, nch, dw, db)

        _MADE[key] = conv2d_bwd_weight_routed_v1
    return _MADE[key]


@njit(**JIT_INNER)
def _bwd_data_routed_chunk(gz, wt, argmax, y_below, gzb, act_code, dxs, b0, R, PW):
    literally(R)
    literally(PW)
    B, K, Hp, Wp = gz.shape
    _, C, H, W = y_below.shape
    # the filter's rows on the stack: they alias nothing, so the row update needs no run-time overlap check
    wk = carray(stack_tile(RT_TILE), (RT_TILE // PW, PW))
    for bb in range(b0, min(B, b0 + L)):
        for h in range(dxs.shape[0]):
            d_ = dxs[h]
            for v in range(dxs.shape[1]):
                d_[v] = ZERO
        for k in range(K):
            for r in range(R):
                for v in range(PW):
                    wk[r, v] = wt[k, r, v]
            for i in range(Hp):
                for j in range(Wp):
                    a = argmax[bb, k, i, j] & 3
                    g = gz[bb, k, i, j]
                    h0 = 2 * i + (a >> 1)
                    o = np.uint64((2 * j + (a & 1)) * C)
                    for r in range(R):
                        row = dxs[h0 + r]
                        for v in range(PW):
                            row[o + np.uint64(v)] += g * wk[r, v]
        for c in range(C):
            for h in range(H):
                d_ = dxs[h]
                y_ = y_below[bb, c, h]
                o_ = gzb[bb, c, h]
                if act_code == RELU:  # the default: no switch on the activation an element (act_grad's)
                    for w in range(W):
                        d = d_[np.uint64(w * C + c)]
                        o_[w] = d if y_[w] > ZERO else ZERO
                else:
                    for w in range(W):
                        o_[w] = act_grad(d_[w * C + c], y_[w], act_code)


@njit(**JIT_INNER)
def _rows_of_filters(w, wt):
    """wt[k, r, s·C + c] = w[k, c, r, s] (the rest of wt stays zero)."""
    K, C, R, S = w.shape
    for k in range(K):
        for c in range(C):
            for r in range(R):
                for s in range(S):
                    wt[k, r, s * C + c] = w[k, c, r, s]


_call_data = native.caller(_bwd_data_routed_chunk)


def bwd_data_parts(R: int, PW: int) -> native.Parts:
    """conv2d_bwd_data_routed_v1's chunk function compiled for the argument types its kernel (and step4.step_bwd_v1)
    passes it: its address is the kernel's argument a_chunk."""
    return native.Parts((_bwd_data_routed_chunk, (F4, F3, U4, F4, F4, I8, F2, I8, types.literal(R),
                                                  types.literal(PW))))


def make_conv2d_bwd_data_routed_v1(R: int, PW: int, ABI: str) -> Any:
    """conv2d_bwd_data_routed_v1 for R filter rows of PW floats; ABI: bwd_data_parts(R, PW).abi."""
    key = ("conv2d_bwd_data_routed_v1", 0, R, PW, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_data_routed_v1(gz, w, argmax, y_below, gzb, act_code, ws_dx, wt, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            _rows_of_filters(w, wt)
            for ci in prange((gz.shape[0] + L - 1) // L):
                _call_data(a_chunk, (gz, wt, argmax, y_below, gzb, act_code, ws_dx[get_thread_id()], np.int64(ci) * L,
                                     R, PW))

        _MADE[key] = conv2d_bwd_data_routed_v1
    return _MADE[key]


# ------------------------------------------------------------------------------ conv2d_bwd_weight_routed_v3

#: the accumulators of conv2d_bwd_weight_routed_v3: a whole patch of R·S·C floats, padded to a multiple of 16
PV_MAX = 160


def stack_width(R: int, S: int, C: int) -> int:
    """PV: a patch of R·S·C floats rounded up to whole 16-float vectors (C1: 25 → 32; C3: 150 → 160)."""
    return -(-(R * S * C) // 16) * 16


@njit(**JIT_INNER)
def _bwd_weight_stack_chunk(x, gz, argmax, zs, accw, p, b0, R, S, PV):
    """dw, db of images b0 … b0+15 into p = [dw (flat, K·C·R·S) | db (K)]: per image the row stack zs (Ho rows of
    W·C·R floats and a margin of PV), then per filter every routed tap's g × its patch, the window columns of one
    row alternating between two accumulator sets; accw[k] carries filter k's sums from image to image. db[k] is summed
    in the same loop (images, rows, columns in order, as a separate pass over gz summed them: the same bits), where its
    adds overlap the multiply-adds (that separate pass took 0.18 of 1.23 ms: C1, batch 128, one thread, AVX2 machine,
    2026-12-07; 1.05 ms without it). R, S: the filter's size."""
    literally(PV)
    B, C, H, W = x.shape
    K, Hp, Wp = gz.shape[1], gz.shape[2], gz.shape[3]
    n = W * C * R
    Ho = 2 * Hp  # the rows a routed tap can start on
    t0 = carray(stack_tile(PV), (PV,))
    t1 = carray(stack_tile(PV), (PV,))
    nb = min(L, B - b0)
    nw = K * C * R * S
    for k in range(K):
        for v in range(PV):
            accw[k, v] = ZERO
        p[nw + k] = ZERO
    for h in range(Ho):  # the margin: what the last patches' padding reads (then discarded)
        for v in range(n, zs.shape[1]):
            zs[h, v] = ZERO
    for e in range(nb):
        bb = b0 + e
        # unsigned indices: no negative-index fix-ups in these scalar loops (they were half of the chunk's time with
        # them: perf, C1, batch 128, one thread, Zen 3, 2026-12-07)
        for w in range(W):
            for c in range(C):
                for r in range(R):
                    zs[0, np.uint64((w * C + c) * R + r)] = x[bb, c, r, w]
        for h in range(1, Ho):
            zh = zs[h]
            zp = zs[h - 1]
            for t in range(n - 1):
                zh[np.uint64(t)] = zp[np.uint64(t + 1)]
            for c in range(C):
                xr = x[bb, c, h + R - 1]
                for w in range(W):
                    zh[np.uint64((w * C + c) * R + R - 1)] = xr[np.uint64(w)]
        for k in range(K):
            for v in range(PV):
                t0[v] = accw[k, v]
                t1[v] = ZERO
            bs = p[nw + k]  # db[k]: this filter's g summed images, rows, columns in order
            for i in range(Hp):
                for j in range(0, Wp - 1, 2):
                    a = argmax[bb, k, i, j] & 3  # a corrupt argmax stays inside its window
                    g = gz[bb, k, i, j]
                    h0 = 2 * i + (a >> 1)
                    o0 = np.uint64((2 * j + (a & 1)) * C * R)
                    a2 = argmax[bb, k, i, j + 1] & 3
                    g2 = gz[bb, k, i, j + 1]
                    h2 = 2 * i + (a2 >> 1)
                    o2 = np.uint64((2 * j + 2 + (a2 & 1)) * C * R)
                    bs += g
                    bs += g2
                    for v in range(PV):
                        t0[v] += g * zs[h0, o0 + np.uint64(v)]
                        t1[v] += g2 * zs[h2, o2 + np.uint64(v)]
                if Wp % 2:
                    j = Wp - 1
                    a = argmax[bb, k, i, j] & 3
                    g = gz[bb, k, i, j]
                    h0 = 2 * i + (a >> 1)
                    o0 = np.uint64((2 * j + (a & 1)) * C * R)
                    bs += g
                    for v in range(PV):
                        t0[v] += g * zs[h0, o0 + np.uint64(v)]
            for v in range(PV):
                accw[k, v] = t0[v] + t1[v]
            p[nw + k] = bs
    for k in range(K):  # accumulator s·C·R + c·R + r is dw[k, c, r, s]
        for c in range(C):
            for r in range(R):
                for s_ in range(S):
                    p[((k * C + c) * R + r) * S + s_] = accw[k, (s_ * C + c) * R + r]


_call_stack = native.caller(_bwd_weight_stack_chunk)


def bwd_weight_stack_parts(PV: int) -> native.Parts:
    """conv2d_bwd_weight_routed_v3's chunk function compiled for the argument types its kernel (and
    step4.step_bwd_v1) passes it: its address is the kernel's argument a_chunk."""
    return native.Parts((_bwd_weight_stack_chunk, (F4, F4, U4, F2, F2, F1, I8, I8, I8, types.literal(PV))))


def make_conv2d_bwd_weight_routed_v3(PV: int, ABI: str) -> Any:
    """conv2d_bwd_weight_routed_v3 with patches of PV floats (stack_width); ABI: bwd_weight_stack_parts(PV).abi."""
    key = ("conv2d_bwd_weight_routed_v3", PV, ABI)
    if key not in _MADE:

        @njit(parallel=True, **JIT)
        def conv2d_bwd_weight_routed_v3(x, gz, argmax, dw, db, ws_zs, ws_acc, part, a_chunk):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            nch = (x.shape[0] + L - 1) // L
            for ci in prange(nch):
                tid = get_thread_id()
                _call_stack(a_chunk, (x, gz, argmax, ws_zs[tid], ws_acc[tid], part[ci], np.int64(ci) * L, dw.shape[2],
                                      dw.shape[3], PV))
            _sum_parts(part, nch, dw, db)

        _MADE[key] = conv2d_bwd_weight_routed_v3
    return _MADE[key]
