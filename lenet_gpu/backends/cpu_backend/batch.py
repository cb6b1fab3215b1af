"""batch: gather, shift, pad and normalise a batch (reference.batch_prepare), and the step counter.

  batch_prepare_v1  one image per iteration (prange over images); the augmentation shift is the uint32 hash
                    of reference.augment_shift, in uint64 arithmetic masked to 32 bits after every step
  step_advance_v1   the state words of lenet_gpu.stepstate.advance

The pixel arithmetic is the numpy backend's, p·scale + shift in float32 without contraction, so a
batch is bit-identical to the numpy backend's.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ...stepstate import EPOCH, OFFSET, SEED, SHIFT, step_advance_words
from .common import JIT_EXACT, njit

MASK32 = np.uint64(0xFFFFFFFF)
M1 = np.uint64(0x7FEB352D)
M2 = np.uint64(0x846CA68B)
LOW16 = np.uint64(0xFFFF)
SH15 = np.uint64(15)
SH16 = np.uint64(16)


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def mix32(h):
    """reference.mix32 on a uint64 holding any value (its low 32 bits are mixed)."""
    h = h & MASK32
    h ^= h >> SH16
    h = (h * M1) & MASK32
    h ^= h >> SH15
    h = (h * M2) & MASK32
    h ^= h >> SH16
    return h


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def word32(v):
    """The low 32 bits of an int32 state word (two's complement) as a uint64."""
    return np.uint64(np.int64(v) & np.int64(0xFFFFFFFF))


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def augment_shift(h1, index, max_shift):
    """(dy, dx) of sample ``index`` given h1 = mix32(mix32(seed) + epoch) (reference.augment_shift)."""
    span = np.uint64(2 * max_shift + 1)
    h = mix32((h1 + word32(index)) & MASK32)
    dy = np.int64((h & LOW16) % span) - max_shift
    dx = np.int64((h >> SH16) % span) - max_shift
    return dy, dx


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def prepare_image(images, labels, perm, x, y, r, offset, max_shift, h1, scale, shift):
    """Row r of batch_prepare_v1 (and of step4.step_fwd_v1): image perm[(offset + r) % M], shifted, padded and
    normalised into x[r], its label into y[r]. A function of its own, compiled without contraction: the same
    bits wherever it is called from."""
    XH, XW = x.shape[2], x.shape[3]
    _, IH, IW = images.shape
    pad = (XH - IH) // 2
    j = perm[(offset + r) % perm.shape[0]]
    y[r] = labels[j]
    dy, dx = (0, 0)
    if max_shift > 0:
        dy, dx = augment_shift(h1, j, max_shift)
    h0 = pad + dy
    v0 = pad + dx
    img = images[j]
    for h in range(XH):
        xr = x[r, 0, h]
        ih = h - h0
        if ih < 0 or ih >= IH:
            for v in range(XW):
                xr[v] = shift
        else:
            ir = img[ih]
            for v in range(XW):
                iv = v - v0
                if iv >= 0 and iv < IW:
                    xr[v] = np.float32(ir[iv]) * scale + shift
                else:
                    xr[v] = shift


@njit(parallel=True, **JIT_EXACT)
def batch_prepare_v1(images, labels, perm, state, x, y, scale, shift):
    B = x.shape[0]
    offset = np.int64(state[OFFSET])
    max_shift = np.int64(state[SHIFT])
    h1 = mix32(mix32(word32(state[SEED])) + word32(state[EPOCH]))
    for r in prange(B):
        # r as int64 also in the loop body (Numba's gufunc), whose index is uint64: one specialisation, not two
        prepare_image(images, labels, perm, x, y, np.int64(r), offset, max_shift, h1, scale, shift)


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def canvas_lane(img, xt, lane, pad, scale, shift):
    """xt[h, v, lane] (a (H, W, L) canvas) = img (uint8) padded by ``pad`` and normalised: p·scale + shift,
    shift outside the image. A function of its own, compiled without contraction: the same bits as
    batch_prepare_v1 wherever it is called from."""
    IH, IW = img.shape
    for h in range(xt.shape[0]):
        row = xt[h]
        ih = h - pad
        for v in range(xt.shape[1]):
            iv = v - pad
            if ih >= 0 and ih < IH and iv >= 0 and iv < IW:
                row[v, lane] = np.float32(img[ih, iv]) * scale + shift
            else:
                row[v, lane] = shift


#: the numpy backend's step_advance, compiled
step_advance_v1 = njit(**JIT_EXACT)(step_advance_words)


KERNELS = {"batch_prepare_v1": batch_prepare_v1, "step_advance_v1": step_advance_v1}
VARIANTS = {"batch_prepare": ("v1",), "step_advance": ("v1",)}
