"""optim: one launch over the flat parameter buffer for each optimizer step.

  adam: g' = g + wd·p;  m = β1·m + (1−β1)·g';  v = β2·v + (1−β2)·g'²;
        p −= lr·(m/bc1)/(√(v/bc2) + eps)
  sgd:  g' = g + wd·p;  m = μ·m + g';  p −= lr·m
p, g, m, v (P,) float32. What changes from step to step comes from the device: [lr, bc1, bc2] =
sched[clamp(STEP − SCHED_BASE, 0, T − 1)] (sched (T,4) float32, state (STATE_WORDS,) int32; see
lenet_gpu.stepstate), so the launch's arguments are the same at every step. β1, β2, eps, wd, μ are fixed
for a run: float32 arguments.

Versions:
- adam_step_v1, sgd_step_v1: one thread per element (grid-stride), fully coalesced; each thread reads
  the schedule row (the same 16 bytes for every thread: one cached load).
"""

from __future__ import annotations

import math

from numba import cuda

from ...stepstate import SCHED_BASE, STEP
from .common import device_function


@device_function
def sched_row(sched, state):
    """The schedule row of the state's step: clamp(STEP − SCHED_BASE, 0, T − 1)."""
    i = state[STEP] - state[SCHED_BASE]
    return min(max(i, 0), sched.shape[0] - 1)


# ---------------------------------------------------------------------------------------------- v1


@cuda.jit
def adam_step_v1(p, g, m, v, sched, state, beta1, one_m_beta1, beta2, one_m_beta2, eps, wd):
    row = sched_row(sched, state)
    lr = sched[row, 0]
    bc1 = sched[row, 1]
    bc2 = sched[row, 2]
    for idx in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pi = p[idx]
        gi = g[idx] + wd * pi
        mi = beta1 * m[idx] + one_m_beta1 * gi
        vi = beta2 * v[idx] + one_m_beta2 * gi * gi
        m[idx] = mi
        v[idx] = vi
        p[idx] = pi - lr * (mi / bc1) / (math.sqrt(vi / bc2) + eps)


@cuda.jit
def sgd_step_v1(p, g, m, sched, state, momentum, wd):
    lr = sched[sched_row(sched, state), 0]
    for idx in range(cuda.grid(1), p.shape[0], cuda.gridsize(1)):
        pi = p[idx]
        mi = momentum * m[idx] + (g[idx] + wd * pi)
        m[idx] = mi
        p[idx] = pi - lr * mi


# ------------------------------------------------------------------------------------ variant table

_V = "float32[::1]"
_T = "float32[:,::1], int32[::1]"  # sched, state
SIGNATURES = {
    "adam_step_v1": f"void({_V}, {_V}, {_V}, {_V}, {_T}, " + ", ".join(["float32"] * 6) + ")",
    "sgd_step_v1": f"void({_V}, {_V}, {_V}, {_T}, float32, float32)",
}
KERNELS = {"adam_step_v1": adam_step_v1, "sgd_step_v1": sgd_step_v1}
VARIANTS = {"adam_step": ("v1",), "sgd_step": ("v1",)}
