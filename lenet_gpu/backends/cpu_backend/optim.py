"""optim: Adam and SGD with momentum over the flat parameter buffer, the step's lr and bias corrections read
from the schedule table row clamp(STEP − SCHED_BASE, 0, T − 1).

  adam_step_v1  one element per iteration, the numpy backend's float32 arithmetic (bit-identical to it)
  sgd_step_v1   likewise
"""

from __future__ import annotations

import numpy as np

from ...stepstate import SCHED_BASE, STEP
from .common import JIT_EXACT, njit


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def sched_index(sched, state):
    i = np.int64(state[STEP]) - np.int64(state[SCHED_BASE])
    return min(max(i, 0), sched.shape[0] - 1)


@njit(**JIT_EXACT)
def adam_step_v1(p, g, m, v, sched, state, beta1, beta2, eps, wd, c1, c2):
    """c1 = float32(1 − β1), c2 = float32(1 − β2), as the numpy backend rounds them."""
    t = sched_index(sched, state)
    lr = sched[t, 0]
    bc1 = sched[t, 1]
    bc2 = sched[t, 2]
    use_wd = wd != 0
    for e in range(p.shape[0]):
        gg = g[e] + wd * p[e] if use_wd else g[e]
        me = beta1 * m[e] + c1 * gg
        ve = beta2 * v[e] + c2 * gg * gg
        m[e] = me
        v[e] = ve
        den = np.sqrt(ve / bc2) + eps
        p[e] = p[e] - lr * (me / bc1) / den


@njit(**JIT_EXACT)
def sgd_step_v1(p, g, m, sched, state, momentum, wd):
    lr = sched[sched_index(sched, state), 0]
    use_wd = wd != 0
    for e in range(p.shape[0]):
        me = momentum * m[e] + g[e]
        if use_wd:
            me = me + wd * p[e]
        m[e] = me
        p[e] = p[e] - lr * me


KERNELS = {"adam_step_v1": adam_step_v1, "sgd_step_v1": sgd_step_v1}
VARIANTS = {"adam_step": ("v1",), "sgd_step": ("v1",)}
