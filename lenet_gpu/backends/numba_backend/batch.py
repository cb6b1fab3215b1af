"""batch_prepare: gather a training batch on the device, shift it (augmentation), pad it and normalise it;
and step_advance, the one-thread kernel that moves the step state on at the end of a step.

batch_prepare, for r < B, with OFFSET, EPOCH, SEED, SHIFT read from the step state (lenet_gpu.stepstate):
  j = perm[(OFFSET + r) mod M];  (dy, dx) = reference.augment_shift(SEED, EPOCH, j, SHIFT), (0, 0) when
  SHIFT is 0;
  x[r, 0, h, v] (B,1,HP,WP) float32 = p·scale + shift with p = images[j, h − top − dy, v − left − dx]
  (0 outside the image), scale = 1/(255·std), shift = −mean/std;
  y[r] (B,) int32 = labels[j].
images (N,H,W) uint8, labels (N,) uint8, perm (M,) int32, state (STATE_WORDS,) int32; the padding is
centred ((HP−H)//2 rows above, (WP−W)//2 columns left): 28×28 → 32×32 for LeNet.

The shift is the reference's counter hash (lowbias32, three rounds) in exact uint32 arithmetic: Numba
widens integers to 64 bits, so the values are kept in uint64 and masked to 32 bits after every
multiply and add (uint64 products of two 32-bit values never overflow).

step_advance(state, batch): STEP += 1; STEP_IN_EPOCH += 1; OFFSET += batch; when STEP_IN_EPOCH reaches
STEPS_PER_EPOCH: STEP_IN_EPOCH = 0, OFFSET = 0, EPOCH += 1 (lenet_gpu.stepstate.advance).

Versions:
- batch_prepare_v1: one thread per output pixel (grid-stride), consecutive threads write consecutive x
  columns; the thread of pixel (0, 0) of a row also writes its label.
- step_advance_v1: one thread.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32, int64, uint64

from ...stepstate import EPOCH, OFFSET, SEED, SHIFT, STEP, STEP_IN_EPOCH, STEPS_PER_EPOCH
from .common import device_function

M32 = np.uint64(0xFFFFFFFF)
M16 = np.uint64(0xFFFF)
MIX_A = np.uint64(0x7FEB352D)
MIX_B = np.uint64(0x846CA68B)
SH15 = np.uint64(15)
SH16 = np.uint64(16)


@device_function
def mix32(x):
    """reference.mix32 on a uint64 holding a 32-bit value."""
    x = x ^ (x >> SH16)
    x = (x * MIX_A) & M32
    x = x ^ (x >> SH15)
    x = (x * MIX_B) & M32
    return x ^ (x >> SH16)


@device_function
def low32(v):
    """The low 32 bits of a signed integer (two's complement) as a uint64."""
    return uint64(int64(v) & int64(0xFFFFFFFF))


@device_function
def epoch_hash(seed, epoch):
    """h1 = mix32(mix32(seed) + epoch): the part of reference.augment_shift shared by an epoch's samples."""
    return mix32((mix32(low32(seed)) + low32(epoch)) & M32)


@device_function
def sample_shift(h1, j, max_shift):
    """(dy, dx) of sample j (reference.augment_shift), given the epoch's h1; (0, 0) when max_shift is 0."""
    if max_shift <= 0:
        return 0, 0
    span = 2 * max_shift + 1
    h = mix32((h1 + low32(j)) & M32)
    return int32(h & M16) % span - max_shift, int32(h >> SH16) % span - max_shift


# ---------------------------------------------------------------------------------------------- v1


@cuda.jit
def batch_prepare_v1(images, labels, perm, state, x, y, scale, shift):
    nb, hp, wp = x.shape[0], x.shape[2], x.shape[3]
    h, w = images.shape[1], images.shape[2]
    m = perm.shape[0]
    top = (hp - h) // 2
    left = (wp - w) // 2
    offset = state[OFFSET]
    max_shift = state[SHIFT]
    h1 = epoch_hash(state[SEED], state[EPOCH])  # the same for every sample
    total = nb * hp * wp
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        px = idx % wp
        t = idx // wp
        py = t % hp
        r = t // hp
        j = perm[(offset + r) % m]
        dy, dx = sample_shift(h1, j, max_shift)
        iy = py - top - dy
        ix = px - left - dx
        v = shift
        if iy >= 0 and iy < h and ix >= 0 and ix < w:
            v = float32(images[j, iy, ix]) * scale + shift
        x[r, 0, py, px] = v
        if py == 0 and px == 0:
            y[r] = int32(labels[j])


@cuda.jit
def step_advance_v1(state, batch):
    if cuda.grid(1) == 0:
        state[STEP] += 1
        state[OFFSET] += batch
        k = state[STEP_IN_EPOCH] + 1
        if k == state[STEPS_PER_EPOCH]:
            k = 0
            state[OFFSET] = 0
            state[EPOCH] += 1
        state[STEP_IN_EPOCH] = k


# ------------------------------------------------------------------------------------ variant table

_S = "int32[::1]"
#: launch signature of every kernel (what the wrappers pass; compiled as-is by the compile checks)
SIGNATURES = {
    "batch_prepare_v1": f"void(uint8[:,:,::1], uint8[::1], int32[::1], {_S}, float32[:,:,:,::1], int32[::1], "
    "float32, float32)",
    "step_advance_v1": f"void({_S}, int32)",
}
KERNELS = {"batch_prepare_v1": batch_prepare_v1, "step_advance_v1": step_advance_v1}
VARIANTS = {"batch_prepare": ("v1",), "step_advance": ("v1",)}
