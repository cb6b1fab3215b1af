"""dense: fully connected layers (reference.dense_fwd / dense_bwd), and the lane kernels the head and the
whole-network forward pass are made of.

  dense_fwd_v1  one output per iteration, a dot product of a row of x with a row of w (prange over chunks)
  dense_bwd_v1  dz = dy·act'(y) recomputed where used; dx rows as sums of w rows (prange over chunks of
                images), dw rows as sums of x rows over the batch in order (prange over outputs), db likewise

Lane kernels (16 images a vector, see common.py): ``lane_dense`` y = act(w·x + b) and ``lane_dense_t``
y = wᵀ·d with OB outputs (8 with AVX-512 code, 4 with AVX2) × 16 images of accumulators in registers, and
``rows_dw`` (dw = Σ_b dz_bᵀ x_b over the batch in order, OB rows × 16 columns in registers).
"""

from __future__ import annotations

import numpy as np
from numba import carray, prange

from .common import JIT, JIT_INNER, WIDE_VECTORS, ZERO, L, act, act_grad, act_tile, njit, stack_tile

#: outputs per register block of the lane kernels. 8 outputs × 16 lanes are 8 of AVX-512's 32 zmm registers; with AVX2
#: code (a lane vector is two of 16 ymm registers) 8 outputs would take all 16 and spill, so AVX2 takes 4. Measured on
#: the 2-core AMD Zen 4 (2026-12-05, CPU time of one thread, batch 128, two interleaved rounds each): with AVX2 code
#: (NUMBA_CPU_FEATURES=+avx,+avx2,+fma) head_train 0.67-0.69 ms a step with 4 against 1.49-1.50 with 8 (1.17 with 6),
#: the training step 5.24-5.30 against 6.30-6.45 ms, lenet_fwd on 1,000 images 15.0 against 17.2-18.4 ms; with
#: AVX-512 code 8 stays (head_train 0.62-0.63 ms against 0.67-0.68 with 4). No output's order of sums depends on it
#: (tests/test_cpu_backend.py checks the bits)
OB = 8 if WIDE_VECTORS else 4
OB_TILE = OB * L


@njit(parallel=True, **JIT)
def dense_fwd_v1(x, w, b, y, act_code):
    B, I = x.shape
    O = w.shape[0]
    for ci in prange((B + L - 1) // L):
        for bb in range(ci * L, min(B, ci * L + L)):
            xr = x[bb]
            for o in range(O):
                wr = w[o]
                a = b[o]
                for i in range(I):
                    a += xr[i] * wr[i]
                y[bb, o] = act(a, act_code)


@njit(parallel=True, **JIT)
def dense_bwd_v1(x, w, y, dy, dx, dw, db, act_code, want_dx):
    B, I = x.shape
    O = w.shape[0]
    if want_dx:
        for ci in prange((B + L - 1) // L):
            for bb in range(ci * L, min(B, ci * L + L)):
                d = dx[bb]
                for i in range(I):
                    d[i] = ZERO
                for o in range(O):
                    g = act_grad(dy[bb, o], y[bb, o], act_code)
                    wr = w[o]
                    for i in range(I):
                        d[i] += g * wr[i]
    for o in prange(O):
        d = dw[o]
        for i in range(I):
            d[i] = ZERO
        s = ZERO
        for bb in range(B):
            g = act_grad(dy[bb, o], y[bb, o], act_code)
            s += g
            xr = x[bb]
            for i in range(I):
                d[i] += g * xr[i]
        db[o] = s


# ------------------------------------------------------------------------------------------ lane kernels


@njit(**JIT_INNER)
def lane_dense(w, b, xt, yt, act_code):
    """yt (O, L) = act(w (O, I) · xt (I, L) + b) in blocks of OB outputs; the last block repeats row O − 1
    where it runs past O (every block is the same vector code) and stores only the rows that exist."""
    O, I = w.shape
    acc = carray(stack_tile(OB_TILE), (OB, L))
    vt = carray(stack_tile(OB_TILE), (OB, L))
    for o0 in range(0, O, OB):
        for q in range(OB):
            bq = b[min(o0 + q, O - 1)]
            for lane in range(L):
                acc[q, lane] = bq
        for i in range(I):
            xv = xt[i]
            for lane in range(L):
                v = xv[lane]
                for q in range(OB):
                    acc[q, lane] += w[min(o0 + q, O - 1), i] * v
        act_tile(acc, vt, OB, act_code)  # the tile read at constant rows only: it stays in registers
        for q in range(min(OB, O - o0)):
            yr = yt[o0 + q]
            for lane in range(L):
                yr[lane] = vt[q, lane]


@njit(**JIT_INNER)
def lane_dense_t(w, dt, yt):
    """yt (I, L) = wᵀ (I, O) · dt (O, L): the input gradient of a dense layer, in blocks of OB inputs (the
    last block as in lane_dense)."""
    O, I = w.shape
    acc = carray(stack_tile(OB_TILE), (OB, L))
    for i0 in range(0, I, OB):
        for q in range(OB):
            for lane in range(L):
                acc[q, lane] = ZERO
        for o in range(O):
            dv = dt[o]
            for lane in range(L):
                v = dv[lane]
                for q in range(OB):
                    acc[q, lane] += w[o, min(i0 + q, I - 1)] * v
        for q in range(min(OB, I - i0)):
            yr = yt[i0 + q]
            for lane in range(L):
                yr[lane] = acc[q, lane]


@njit(**JIT_INNER)
def rows_dw(dzr, xr, dw, db, o0, i0, i1, B):
    """dw[o0:o0+OB, i0:i1] = Σ_b dzr[b, o0:o0+OB]ᵀ · xr[b, i0:i1] (b in order), and db[o0:o0+OB] = Σ_b dzr[b]
    when i0 == 0. Rows past dw's end are dropped: dzr must have columns up to o0 + OB (zero past O). The
    columns past the last whole vector are one more vector ending at i1 (overlapping the one before it;
    only its new columns are stored), or scalar sums where the matrix is narrower than a vector."""
    O, I = dw.shape
    nq = min(OB, O - o0)
    acc = carray(stack_tile(OB_TILE), (OB, L))
    i = i0
    while i < i1:
        j = i if i + L <= i1 else i1 - L
        if j < 0:
            break
        for q in range(OB):
            for lane in range(L):
                acc[q, lane] = ZERO
        for bb in range(B):
            xv = xr[bb]
            dv = dzr[bb]
            for lane in range(L):
                v = xv[np.uint64(j + lane)]
                for q in range(OB):
                    acc[q, lane] += dv[np.uint64(o0 + q)] * v
        for q in range(nq):
            d = dw[o0 + q]
            for lane in range(i - j, L):
                d[np.uint64(j + lane)] = acc[q, lane]
        i = j + L
    for q in range(nq):  # only where the matrix is narrower than a vector
        for ii in range(i, i1):
            a = ZERO
            for bb in range(B):
                a += dzr[bb, o0 + q] * xr[bb, ii]
            dw[o0 + q, ii] = a
    if i0 == 0:
        for q in range(nq):
            a = ZERO
            for bb in range(B):
                a += dzr[bb, o0 + q]
            db[o0 + q] = a


KERNELS = {"dense_fwd_v1": dense_fwd_v1, "dense_bwd_v1": dense_bwd_v1}
VARIANTS = {"dense_fwd": ("v1",), "dense_bwd": ("v1",)}
