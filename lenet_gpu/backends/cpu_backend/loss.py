"""loss: softmax cross-entropy (reference.softmax_xent) with the step's statistics.

  softmax_xent_v1  one row per iteration (prange over chunks of 16 rows); per-chunk loss sums (float64) and
                   correct counts, summed in chunk order into stats row STEP_IN_EPOCH mod S

A row's arithmetic is the numpy backend's: z − max, exp, the sum, log; dlogits = (e/Σe − onehot)·(1/B).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ...stepstate import STEP_IN_EPOCH
from .common import JIT_EXACT, ONE, L, njit


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def softmax_row(z, label, d, inv_n):
    """d = (softmax(z) − onehot(label))·inv_n; returns (loss of the row, 1 if its first maximum is label)."""
    nc = z.shape[0]
    mx = z[0]
    am = 0
    for o in range(1, nc):
        if z[o] > mx:
            mx = z[o]
            am = o
    se = np.float32(0.0)
    for o in range(nc):
        e = np.exp(z[o] - mx)
        d[o] = e
        se += e
    loss = np.log(se) - (z[label] - mx)
    for o in range(nc):
        d[o] = d[o] / se
    d[label] -= ONE
    for o in range(nc):
        d[o] = d[o] * inv_n
    return loss, 1 if am == label else 0


@njit(**JIT_EXACT)
def write_stats_row(part, nch, stats, state):
    """stats[STEP_IN_EPOCH mod S] = the chunks' [loss sum, correct] added in chunk order (deterministic)."""
    s = 0.0
    c = 0.0
    for ci in range(nch):
        s += part[ci, 0]
        c += part[ci, 1]
    row = state[STEP_IN_EPOCH] % stats.shape[0]
    stats[row, 0] = np.float32(s)
    stats[row, 1] = np.float32(c)


@njit(parallel=True, **JIT_EXACT)
def softmax_xent_v1(logits, labels, dlogits, stats, state, part):
    n = logits.shape[0]
    inv_n = np.float32(1.0 / n)
    nch = (n + L - 1) // L
    for ci in prange(nch):
        s = 0.0
        c = 0
        for r in range(ci * L, min(n, ci * L + L)):
            loss, ok = softmax_row(logits[r], labels[r], dlogits[r], inv_n)
            s += np.float64(loss)
            c += ok
        part[ci, 0] = s
        part[ci, 1] = c
    write_stats_row(part, nch, stats, state)


KERNELS = {"softmax_xent_v1": softmax_xent_v1}
VARIANTS = {"softmax_xent": ("v1",)}
