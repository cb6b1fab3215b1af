"""pool2x2: 2×2 subsampling with stride 2 (reference.pool2x2_fwd / pool2x2_bwd), unfused.

  pool2x2_fwd_v1  one output row per iteration (prange over chunks of images): max with the first-maximum
                  argmax, or the mean
  pool2x2_bwd_v1  one window row per iteration: the gradient to the argmax tap (max) or a quarter to every
                  tap (avg), times act'(yconv); taps in no window get 0
"""

from __future__ import annotations

from numba import prange

from .common import JIT_EXACT, MAX, QUARTER, ZERO, L, act_grad, njit
from .conv2d import pool4


@njit(parallel=True, **JIT_EXACT)
def pool2x2_fwd_v1(x, y, argmax, mode):
    B, C, H, W = x.shape
    Ho, Wo = y.shape[2], y.shape[3]
    for ci in prange((B + L - 1) // L):
        for bb in range(ci * L, min(B, ci * L + L)):
            for c in range(C):
                for i in range(Ho):
                    r0 = x[bb, c, 2 * i]
                    r1 = x[bb, c, 2 * i + 1]
                    yr = y[bb, c, i]
                    if mode == MAX:
                        ar = argmax[bb, c, i]
                        for j in range(Wo):
                            v, a = pool4(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], mode)
                            yr[j] = v
                            ar[j] = a
                    else:
                        for j in range(Wo):
                            v, _ = pool4(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1], mode)
                            yr[j] = v


@njit(parallel=True, **JIT_EXACT)
def pool2x2_bwd_v1(dy, argmax, yconv, dz, mode, act_code):
    B, C, Ho, Wo = dy.shape
    H, W = dz.shape[2], dz.shape[3]
    for ci in prange((B + L - 1) // L):
        for bb in range(ci * L, min(B, ci * L + L)):
            for c in range(C):
                for i in range(Ho):
                    g = dy[bb, c, i]
                    ya = yconv[bb, c, 2 * i]
                    yb = yconv[bb, c, 2 * i + 1]
                    oa = dz[bb, c, 2 * i]
                    ob = dz[bb, c, 2 * i + 1]
                    if mode == MAX:
                        am = argmax[bb, c, i]
                        for j in range(Wo):
                            a = am[j]
                            oa[2 * j] = act_grad(g[j], ya[2 * j], act_code) if a == 0 else ZERO
                            oa[2 * j + 1] = act_grad(g[j], ya[2 * j + 1], act_code) if a == 1 else ZERO
                            ob[2 * j] = act_grad(g[j], yb[2 * j], act_code) if a == 2 else ZERO
                            ob[2 * j + 1] = act_grad(g[j], yb[2 * j + 1], act_code) if a == 3 else ZERO
                    else:
                        for j in range(Wo):
                            q = g[j] * QUARTER
                            oa[2 * j] = act_grad(q, ya[2 * j], act_code)
                            oa[2 * j + 1] = act_grad(q, ya[2 * j + 1], act_code)
                            ob[2 * j] = act_grad(q, yb[2 * j], act_code)
                            ob[2 * j + 1] = act_grad(q, yb[2 * j + 1], act_code)
                    if W > 2 * Wo:
                        oa[W - 1] = ZERO
                        ob[W - 1] = ZERO
                if H > 2 * Ho:
                    o = dz[bb, c, H - 1]
                    for v in range(W):
                        o[v] = ZERO


KERNELS = {"pool2x2_fwd_v1": pool2x2_fwd_v1, "pool2x2_bwd_v1": pool2x2_bwd_v1}
VARIANTS = {"pool2x2_fwd": ("v1",), "pool2x2_bwd": ("v1",)}
