"""pool2x2: 2×2 subsampling with stride 2 (max or average), NCHW; an odd trailing row/column of the
input is dropped.

  fwd: y (N,C,H//2,W//2) = max or mean of each 2×2 window of x (N,C,H,W); for max, argmax (uint8,
       y's shape) = the row-major tap 0..3 of the first maximum (avg leaves argmax untouched).
  bwd: dz (N,C,H,W) = route(dy)·act'(yconv): dy goes to the argmax tap (max) or dy/4 to every tap
       (avg), times the derivative of the activation that produced yconv (the convolution's
       activated output) — the pooling gradient and the activation gradient in one pass. Taps
       outside every window get 0.

Versions:
- pool2x2_fwd_v1: one thread per output (grid-stride), consecutive threads → consecutive outputs.
- pool2x2_bwd_v1: one thread per input-gradient element (a gather from its window: no scatter, no
  zero-fill pass), consecutive threads → consecutive dz columns.
"""

from __future__ import annotations

from numba import cuda, float32, uint8

from .common import POOL_MAX, ZERO, act_grad

QUARTER = float32(0.25)

# ---------------------------------------------------------------------------------------------- fwd


@cuda.jit
def pool2x2_fwd_v1(x, y, argmax, mode):
    nb, ch, ho, wo = y.shape
    total = nb * ch * ho * wo
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        j = idx % wo
        t = idx // wo
        i = t % ho
        t = t // ho
        c = t % ch
        n = t // ch
        a = x[n, c, 2 * i, 2 * j]
        b = x[n, c, 2 * i, 2 * j + 1]
        d = x[n, c, 2 * i + 1, 2 * j]
        e = x[n, c, 2 * i + 1, 2 * j + 1]
        if mode == POOL_MAX:
            best = a
            tap = 0
            if b > best:
                best = b
                tap = 1
            if d > best:
                best = d
                tap = 2
            if e > best:
                best = e
                tap = 3
            y[n, c, i, j] = best
            argmax[n, c, i, j] = uint8(tap)
        else:
            y[n, c, i, j] = (a + b + d + e) * QUARTER


# ---------------------------------------------------------------------------------------------- bwd


@cuda.jit
def pool2x2_bwd_v1(dy, argmax, yconv, dz, mode, act):
    nb, ch, h, wd = dz.shape
    ho, wo = dy.shape[2], dy.shape[3]
    total = nb * ch * h * wd
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        v = idx % wd
        t = idx // wd
        u = t % h
        t = t // h
        c = t % ch
        n = t // ch
        i = u // 2
        j = v // 2
        g = ZERO
        if i < ho and j < wo:
            if mode == POOL_MAX:
                if argmax[n, c, i, j] == (u - 2 * i) * 2 + (v - 2 * j):
                    g = dy[n, c, i, j]
            else:
                g = dy[n, c, i, j] * QUARTER
        dz[n, c, u, v] = g * act_grad(yconv[n, c, u, v], act)


# ------------------------------------------------------------------------------------ variant table

_X4 = "float32[:,:,:,::1]"
_U4 = "uint8[:,:,:,::1]"
SIGNATURES = {
    "pool2x2_fwd_v1": f"void({_X4}, {_X4}, {_U4}, int32)",
    "pool2x2_bwd_v1": f"void({_X4}, {_U4}, {_X4}, {_X4}, int32, int32)",
}
KERNELS = {"pool2x2_fwd_v1": pool2x2_fwd_v1, "pool2x2_bwd_v1": pool2x2_bwd_v1}
VARIANTS = {"pool2x2_fwd": ("v1",), "pool2x2_bwd": ("v1",)}
