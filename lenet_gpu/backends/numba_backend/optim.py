"""optim: one launch over the flat parameter buffer for each optimizer step.

  adam: g' = g + wd·p;  m = β1·m + (1−β1)·g';  v = β2·v + (1−β2)·g'²;
        p −= lr·(m/bc1)/(√(v/bc2) + eps)      (bc1 = 1−β1^t, bc2 = 1−β2^t from the caller)
  sgd:  g' = g + wd·p;  m = μ·m + g';  p −= lr·m
p, g, m, v (P,) float32; every scalar a float32 argument (they change per step: no recompile, no
copy).

Versions:
- adam_step_v1, sgd_step_v1: one thread per element (grid-stride), fully coalesced.
"""

from __future__ import annotations

import math

from numba import cuda

# ---------------------------------------------------------------------------------------------- v1


@cuda.jit
def adam_step_v1(p, g, m, v, lr, beta1, one_m_beta1, beta2, one_m_beta2, eps, wd, bc1, bc2):
    for idx in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pi = p[idx]
        gi = g[idx] + wd * pi
        mi = beta1 * m[idx] + one_m_beta1 * gi
        vi = beta2 * v[idx] + one_m_beta2 * gi * gi
        m[idx] = mi
        v[idx] = vi
        p[idx] = pi - lr * (mi / bc1) / (math.sqrt(vi / bc2) + eps)


@cuda.jit
def sgd_step_v1(p, g, m, lr, momentum, wd):
    for idx in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pi = p[idx]
        mi = momentum * m[idx] + (g[idx] + wd * pi)
        m[idx] = mi
        p[idx] = pi - lr * mi


# ------------------------------------------------------------------------------------ variant table

_V = "float32[::1]"
SIGNATURES = {
    "adam_step_v1": f"void({_V}, {_V}, {_V}, {_V}, " + ", ".join(["float32"] * 9) + ")",
    "sgd_step_v1": f"void({_V}, {_V}, {_V}, float32, float32, float32)",
}
KERNELS = {"adam_step_v1": adam_step_v1, "sgd_step_v1": sgd_step_v1}
VARIANTS = {"adam_step": ("v1",), "sgd_step": ("v1",)}
