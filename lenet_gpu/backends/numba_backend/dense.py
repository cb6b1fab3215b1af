"""dense: fully connected layer with bias and activation fused (forward), and its gradients.

  fwd: y (N,O) = act(x (N,I) · wᵀ + b),  w (O,I), b (O,)
  bwd: dz = dy·act'(y);  dx (N,I) = dz·w (skipped when the caller passes no dx);  dw (O,I) = dzᵀ·x;
       db (O,) = Σ_n dz — all three in one launch.

Versions:
- dense_fwd_v1: one thread per output y[n,o], consecutive threads → consecutive o.
- dense_fwd_v2: shared-memory tiles: a TILE×TILE block loads TILE×TILE tiles of x and w along I with
  coalesced reads, every element then feeds TILE FMAs from shared memory (w's tile is padded by one
  column, so reading it transposed has no bank conflicts).
- dense_bwd_v1: one thread per element of dx, dw and db (three ranges of one grid), each a
  fixed-order sum that recomputes dz = dy·act'(y) on the fly; consecutive threads → consecutive i
  (coalesced reads of w and x, writes of dx and dw). No atomics, so it is deterministic.
- dense_bwd_v2: shared-memory tiles, as dense_fwd_v2, for both products of one launch: blocks of the
  first range compute TILE×TILE tiles of dx = dz·w, the rest tiles of [dw | db] = dzᵀ·[x | 1] (the
  bias as one more column of ones); dz = dy·act'(y) is formed once per tile load instead of once
  per FMA, and each loaded element feeds TILE FMAs. Fixed-order sums, no atomics.
"""

from __future__ import annotations

from numba import cuda, float32

from .common import ONE, ZERO, act_grad, activate

#: dense_fwd_v2: tile edge (the block is TILE × TILE threads)
TILE = 16
TILE_PAD = TILE + 1  # w's tile row stride: +1 column so transposed reads hit distinct banks

# ---------------------------------------------------------------------------------------------- fwd


@cuda.jit
def dense_fwd_v1(x, w, b, y, act):
    nb, nin = x.shape
    nout = w.shape[0]
    for idx in range(cuda.grid(1), nb * nout, cuda.gridsize(1)):
        o = idx % nout
        n = idx // nout
        acc = b[o]
        for i in range(nin):
            acc += x[n, i] * w[o, i]
        y[n, o] = activate(acc, act)


@cuda.jit
def dense_fwd_v2(x, w, b, y, act):
    sx = cuda.shared.array((TILE, TILE), float32)
    sw = cuda.shared.array((TILE, TILE_PAD), float32)
    nb, nin = x.shape
    nout = w.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tiles_o = (nout + TILE - 1) // TILE
    tiles_n = (nb + TILE - 1) // TILE
    for item in range(cuda.blockIdx.x, tiles_o * tiles_n, cuda.gridDim.x):
        o0 = (item % tiles_o) * TILE
        n0 = (item // tiles_o) * TILE
        o = o0 + tx  # this thread's output is y[n0+ty, o0+tx]
        n = n0 + ty
        acc = ZERO
        for i0 in range(0, nin, TILE):
            i = i0 + tx
            # row ty of each tile, read along I by consecutive threads
            sx[ty, tx] = x[n, i] if n < nb and i < nin else ZERO
            sw[ty, tx] = w[o0 + ty, i] if o0 + ty < nout and i < nin else ZERO
            cuda.syncthreads()
            for kk in range(TILE):
                acc += sx[ty, kk] * sw[tx, kk]
            cuda.syncthreads()
        if n < nb and o < nout:
            y[n, o] = activate(acc + b[o], act)


# ---------------------------------------------------------------------------------------------- bwd


@cuda.jit
def dense_bwd_v1(x, w, y, dy, dx, dw, db, act, has_dx):
    nb, nin = x.shape
    nout = w.shape[0]
    ndx = nb * nin if has_dx else 0
    ndw = nout * nin
    for idx in range(cuda.grid(1), ndx + ndw + nout, cuda.gridsize(1)):
        acc = ZERO
        if idx < ndx:  # dx[n, i] = Σ_o dz[n, o]·w[o, i]
            i = idx % nin
            n = idx // nin
            for o in range(nout):
                acc += dy[n, o] * act_grad(y[n, o], act) * w[o, i]
            dx[n, i] = acc
        elif idx < ndx + ndw:  # dw[o, i] = Σ_n dz[n, o]·x[n, i]
            e = idx - ndx
            i = e % nin
            o = e // nin
            for n in range(nb):
                acc += dy[n, o] * act_grad(y[n, o], act) * x[n, i]
            dw[o, i] = acc
        else:  # db[o] = Σ_n dz[n, o]
            o = idx - ndx - ndw
            for n in range(nb):
                acc += dy[n, o] * act_grad(y[n, o], act)
            db[o] = acc


@cuda.jit
def dense_bwd_v2(x, w, y, dy, dx, dw, db, act, has_dx):
    sa = cuda.shared.array((TILE, TILE_PAD), float32)  # a tile of dz
    sb = cuda.shared.array((TILE, TILE_PAD), float32)  # a tile of w (dx) or of [x | 1] (dw, db)
    nb, nin = x.shape
    nout = w.shape[0]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tiles_i = (nin + TILE - 1) // TILE
    tiles_dx = ((nb + TILE - 1) // TILE) * tiles_i if has_dx else 0
    tiles_i1 = (nin + 1 + TILE - 1) // TILE  # columns of [dw | db]
    tiles_dw = ((nout + TILE - 1) // TILE) * tiles_i1
    for item in range(cuda.blockIdx.x, tiles_dx + tiles_dw, cuda.gridDim.x):
        acc = ZERO
        if item < tiles_dx:  # dx[n0+ty, i0+tx] = Σ_o dz[n, o]·w[o, i]
            n0 = (item // tiles_i) * TILE
            i0 = (item % tiles_i) * TILE
            n = n0 + ty
            i = i0 + tx
            for o0 in range(0, nout, TILE):
                o = o0 + tx
                if n < nb and o < nout:
                    sa[ty, tx] = dy[n, o] * act_grad(y[n, o], act)
                else:
                    sa[ty, tx] = ZERO
                sb[ty, tx] = w[o0 + ty, i] if o0 + ty < nout and i < nin else ZERO
                cuda.syncthreads()
                for kk in range(TILE):
                    acc += sa[ty, kk] * sb[kk, tx]
                cuda.syncthreads()
            if n < nb and i < nin:
                dx[n, i] = acc
        else:  # [dw | db][o0+ty, i0+tx] = Σ_n dz[n, o]·[x | 1][n, i]
            e = item - tiles_dx
            o0 = (e // tiles_i1) * TILE
            i0 = (e % tiles_i1) * TILE
            o = o0 + ty
            i = i0 + tx
            for n0 in range(0, nb, TILE):
                n = n0 + ty
                if n < nb and o0 + tx < nout:
                    sa[ty, tx] = dy[n, o0 + tx] * act_grad(y[n, o0 + tx], act)
                else:
                    sa[ty, tx] = ZERO
                if n < nb and i < nin:
                    sb[ty, tx] = x[n, i]
                elif n < nb and i == nin:
                    sb[ty, tx] = ONE
                else:
                    sb[ty, tx] = ZERO
                cuda.syncthreads()
                for kk in range(TILE):
                    acc += sa[kk, ty] * sb[kk, tx]
                cuda.syncthreads()
            if o < nout:
                if i < nin:
                    dw[o, i] = acc
                elif i == nin:
                    db[o] = acc


# ------------------------------------------------------------------------------------ variant table

_M = "float32[:,::1]"
SIGNATURES = {
    "dense_fwd_v1": f"void({_M}, {_M}, float32[::1], {_M}, int32)",
    "dense_fwd_v2": f"void({_M}, {_M}, float32[::1], {_M}, int32)",
    "dense_bwd_v1": f"void({_M}, {_M}, {_M}, {_M}, {_M}, {_M}, float32[::1], int32, int32)",
    "dense_bwd_v2": f"void({_M}, {_M}, {_M}, {_M}, {_M}, {_M}, float32[::1], int32, int32)",
}
KERNELS = {
    "dense_fwd_v1": dense_fwd_v1,
    "dense_fwd_v2": dense_fwd_v2,
    "dense_bwd_v1": dense_bwd_v1,
    "dense_bwd_v2": dense_bwd_v2,
}
VARIANTS = {"dense_fwd": ("v1", "v2"), "dense_bwd": ("v1", "v2")}
