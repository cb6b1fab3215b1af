"""loss: softmax cross-entropy over a batch, with the loss and the correct count kept on the device.

  dlogits (B,K) = (softmax(logits) − onehot(labels)) / B
  stats[STEP_IN_EPOCH mod S] = [Σ_b (logsumexp(logits[b]) − logits[b, labels[b]]),
                                #{b : first argmax of logits[b] == labels[b]}]   (overwritten)
logits (B,K) float32, labels (B,) int32, stats (S,2) float32 (one row per step of an epoch, read by the
host when it logs), state (STATE_WORDS,) int32 (lenet_gpu.stepstate).

Versions:
- softmax_xent_v1: one block; each thread owns rows b = tid, tid + T, … (max-subtracted, so any
  finite logits are safe) and keeps its partial loss and count in order; a fixed-order shared-memory
  tree reduction and one thread's write of the step's stats row follow: deterministic, no atomics.
"""

from __future__ import annotations

import math

from numba import cuda, float32

from ...stepstate import STEP_IN_EPOCH
from .common import ONE, ZERO

#: threads of the single block (a power of two: the tree reduction halves it)
SM_THREADS = 128

# ---------------------------------------------------------------------------------------------- v1


@cuda.jit
def softmax_xent_v1(logits, labels, dlogits, stats, state):
    sloss = cuda.shared.array(SM_THREADS, float32)
    scorrect = cuda.shared.array(SM_THREADS, float32)
    nb, ncls = logits.shape
    tid = cuda.threadIdx.x
    inv_n = ONE / float32(nb)
    loss = ZERO
    correct = ZERO
    for row in range(tid, nb, SM_THREADS):
        mx = logits[row, 0]
        best = 0
        for c in range(1, ncls):
            v = logits[row, c]
            if v > mx:
                mx = v
                best = c
        se = ZERO
        for c in range(ncls):
            se += math.exp(logits[row, c] - mx)
        lab = labels[row]
        loss += math.log(se) - (logits[row, lab] - mx)
        if best == lab:
            correct += ONE
        inv_se = ONE / se
        for c in range(ncls):
            p = math.exp(logits[row, c] - mx) * inv_se
            if c == lab:
                p -= ONE
            dlogits[row, c] = p * inv_n
    sloss[tid] = loss
    scorrect[tid] = correct
    cuda.syncthreads()
    stride = SM_THREADS // 2
    while stride > 0:
        if tid < stride:
            sloss[tid] += sloss[tid + stride]
            scorrect[tid] += scorrect[tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        row = state[STEP_IN_EPOCH] % stats.shape[0]
        stats[row, 0] = sloss[0]
        stats[row, 1] = scorrect[0]


# ------------------------------------------------------------------------------------ variant table

SIGNATURES = {"softmax_xent_v1": "void(float32[:,::1], int32[::1], float32[:,::1], float32[:,::1], int32[::1])"}
KERNELS = {"softmax_xent_v1": softmax_xent_v1}
VARIANTS = {"softmax_xent": ("v1",)}
