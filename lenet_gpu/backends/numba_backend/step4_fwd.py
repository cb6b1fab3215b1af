"""step4_fwd: the forward op and the update ops of the four-kernel training step (docs/step4.md), the Numba face
of kernels/step_fwd.cu (step_fwd_v1, step_fwd_v2) and kernels/step_update.cu (step_adam_v1, step_sgd_v1).

  step_fwd   batch_prepare  j = perm[(OFFSET + n) mod M]; (dy, dx) = the shift of sample j in epoch EPOCH
                            (batch.py's hash); x[n,0,h,v] = pix·scale + shift, pix = images[j, h−2−dy, v−2−dx]
                            (x = shift outside the image); y[n] = labels[j]
             C1 + S2        p1, m1 = 2×2/2 max pool of act(conv5x5(x; c1.w) + c1.b)   (6,14,14), a1 never stored
             C3 + S4        p3, m3 = 2×2/2 max pool of act(conv5x5(p1; c3.w) + c3.b)  (16,5,5), a3 never stored
             srow           block 0, thread 0: srow[0..3] = sched[clamp(STEP − SCHED_BASE, 0, T−1)]
  step_adam  g[i] = Σ_s gpart[s, i] for i < NC (float32, group order from 0.0: reference.step_reduce), written
  step_sgd   back into g; g's other entries read as they are; then adam_step's / sgd_step's update with
             [lr, bc1, bc2] = srow[0..2] (the row step_fwd copied: no block reads the step counter, which this
             launch moves on); then step_advance by thread 0 of block 0.

Bit parity is with this backend's own ops, not with the CUDA C kernels:
- step_fwd's arithmetic is that of batch.py's batch_prepare_v1 (x = shift outside the image, pix·scale + shift
  inside) and of conv2d.py's conv2d_pool_fwd (each conv output: acc = bias; acc += x·w over (channel, tap row,
  tap column) in that order; act(acc); the first maximum in row-major tap order wins), so its outputs equal
  batch_prepare + 2 × conv2d_pool_fwd(yconv=None) of this backend bit for bit. (step_fwd.cu starts its sums at
  0.0 and adds the bias last, as the CUDA C conv kernels do: the two backends round differently.) step_fwd_v2 sums
  each output as v1 does (the same device functions), so its outputs equal v1's bit for bit.
- step_adam / step_sgd use optim.py's expressions (adam: 1 − β passed from the host as float32; sgd:
  m = μ·m + (g + wd·p)), so with the same g they equal adam_step / sgd_step of this backend bit for bit.

Every index and size is uint32 (common.U), the stride loops are while loops, LeNet-5's geometry is compile-time
(the module constants): no 64-bit or signed division, no integer division by a run-time value at all.

step_fwd_v1  one block per image (the images block-stride over the grid: any grid is correct, the simulator caps it),
             SF_THREADS = 256 threads, launch bounds (256, 4): ≤ 64 registers. Shared memory (dynamic, 19,296 B,
             step_fwd.cu's static arrays as regions of one block: SM_*, step_fwd_smem): C1's weights as [25 taps][8] (6
             filters + 2 zeros), C3's as [6 channels][25 taps][16 filters] (read from global memory in their own order,
             coalesced, and scattered), the biases, the image x (32×32) and p1 (6×14×14), which C3 reads from shared
             memory. The block stages the weights once (before its first image). Register blocking as step_fwd.cu: C1 a
             thread per pooled pixel × all 6 filters (its 2×2 window: 24 accumulators; 196 items), C3 a thread per
             pooled pixel × 2 filters (8 accumulators; 200 items), each stage one round of the block. Barriers: 2 an
             image (after the gather, after C1; the next image's gather waits for nobody: C1 is done with x, and the
             next C1 writes p1 only after the barrier every C3 thread reaches first).
             What Numba cannot write as step_fwd.cu does, and the nearest equivalent here:
             - no float4 / float2 loads from a float32 array: since 2026-12-07 the shared memory is dynamic, so an
               int64 array aliases it and the convolutions read a window row as 3 and a tap's weights for a pair
               of filters as one 64-bit load (common.ld_pair; step_fwd.cu: float2 rows, a float4 + float2 / a
               float2 / float4 of weights). ptxas had already merged many of the old scalar loads of the static
               arrays into 64/128-bit ones, so the gain is modest: on sm_90 (nvdisasm) v1 5,072 → 4,968
               instructions in the code (LDS 132 → 114, none 32-bit), v2 6,336 → 6,176 (LDS 137 → 114);
               step_fwd.cu's v1 has 3,960, v2 5,056;
             - no #pragma unroll (Numba leaves a range(5) tap loop a loop; a while loop is unrolled by 2) and no
               templates: a filter row's 5 taps are written out (_window_row, C1 and C3: the 2×2 window's top and bottom
               input rows as 12 scalars, step_fwd.cu's ra / rb), called once a row; the accumulators are
               cuda.local.array indexed by constants only (registers: the PTX has no local memory). The compiler
               merges the loads of an input row shared by two filter rows: C1 loads 36 inputs a thread, as
               step_fwd.cu; C3's channel loop stays a loop (step_fwd.cu: #pragma unroll 1);
             - the two run-time moduli of the gather, without integer division: (OFFSET + n) mod M by
               common.fast_div (magic numbers from the host: exact while OFFSET + n < 2³¹, which the step state
               keeps: OFFSET < the dataset size), and the shift's two (mod 2·SHIFT + 1) of values < 2¹⁶ by a
               float32 quotient (exact operands; off by at most one) corrected to exact, where step_fwd.cu uses
               a double quotient (no float64 here);
             - the stages are device functions shared with v2 (_stage_weights, _gather, _c1, and C3's _c3 / _c3_4
               from one factory, _c3_stage: no templates, the filters a thread a closure constant). Their callers
               compute the shared and global offsets: a _c1 that derived them from its pixel index made NVVM keep
               C1's input addresses in 64 bits (v1: 96 B of spills on sm_80, 40 on sm_90).
step_fwd_v2  large batch (step_fwd.cu's v2): two images a block (SF2_IMGS; the pairs block-stride over the grid, so
             any grid is correct), 256 threads, launch bounds (256, 4): ≤ 64 registers. The weights are staged once
             for both images (half v1's staging an image); then the gather of both images (a loop: step_fwd.cu
             #pragma unroll 1) into x[2][32×32]; C1 over both images' 392 pooled pixels (item = image · 196 +
             pixel) in C1_ROUNDS = 2 rounds of the block, a barrier at the top of every round and every thread in
             every round (step_fwd.cu: it keeps NVVM from hoisting C1's 150 shared weights into registers across
             rounds); C3 a thread per (image, 4 filters, pooled pixel): a 4 × 4 register tile (4 window outputs ×
             4 filters: 16 accumulators), 200 items in one round. A pair of one image (an odd batch's last) leaves its
             second image's items idle (block-uniform: every thread still meets every barrier). Shared memory (dynamic):
             28,096 B (step_fwd.cu's static 28,088: v1's weights and biases, two images' x and p1). Barriers: 3 a pair
             (the next pair's gather waits for nobody, as v1's next image).
             Numba's limits are v1's: C3's 4 weights a tap are 2 64-bit shared loads (step_fwd.cu: one float4
             feeding 16 FMAs).
             The plan (step_fwd_kernel: CupyBackend.step_fwd_kernel's): a variant by name runs its own kernel at
             every batch; the default (variant None, the backend's default v1) runs v2's kernel where its ⌈B/2⌉
             blocks fill every SM's 4 slots once (⌈B/2⌉ ≥ 4 · SMs: batch ≥ 1,055 on 132 SMs), v1's below. Grid
             (step_fwd_grid): B for v1, ⌈B/2⌉ for v2.
step_adam_v1 step_update.cu's launch plan (CupyBackend.step_adam: adam_step v2's grid): a thread per 4 elements,
step_sgd_v1  blocks of max(32, min(256, (⌈n/4⌉ / SMs) rounded down to warps)) threads, grid-stride. Numba has no
             float4 loads, so a thread's 4 elements are a block's width apart (a tile of 4·blockDim elements a
             block: 4 coalesced scalar loads an array where step_update.cu does one 16-byte load); every
             element's arithmetic is its own (the partial sum of element i is over s only), so the mapping
             changes no result, and the n % 4 tail needs no loop of its own.

Cost: the work and the memory traffic of step_fwd.cu's and step_update.cu's headers. Instructions (estimated from the
sm_90 PTX before the 64-bit loads, not measured; ptxas merged part of these loads, see above): a C1 thread issues 600
FMA and 192 shared loads (step_fwd.cu ~92: its weights come as a float4 and a float2 a tap), a C3 thread 1,200 FMA and
518 shared loads (step_fwd.cu ~368): ~2,510 against ~2,260 for the longest thread's conv loops, ~11% more issue slots in
the stages that bound the batch-4096 launch. v2's C3 thread issues 2,400 FMA and 820 shared loads (step_fwd.cu ~370): by
warp-instructions an image, C1 ~5.1K (13 warp-rounds a pair; v1 7 warps: ~5.5K) and C3 ~11.3K (7 warps a pair; v1
~12.0K), the staging halved: ~7% fewer issue slots than v1 at batch 4096 (step_fwd.cu's v2 against its v1: ~10%).
Registers (ptxas, sm_90 and sm_80): step_fwd_v1 64 under its launch bounds (step_fwd.cu 56; 80 without bounds),
step_fwd_v2 64 (step_fwd.cu 64; 71 without bounds), no spills, no local memory: 4 blocks an SM, as step_fwd.cu;
step_adam_v1 32 / 27, step_sgd_v1 30 / 23.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
from numba import cuda, float32, int32, int64, uint8, uint32

from ...stepstate import (
    EPOCH,
    OFFSET,
    SCHED_BASE,
    SCHED_COLS,
    SEED,
    SHIFT,
    STATE_WORDS,
    STEP,
    STEP_IN_EPOCH,
    STEPS_PER_EPOCH,
)
from ..base import ACT_CODES, check_act
from .batch import M16, M32, SH16, epoch_hash, low32, mix32
from .common import U0, U1, ZERO, U, activate, ceil_div, device_function, div_magic, fast_div, ld_pair
from .head import launch_kernel

# LeNet-5's geometry (compile-time, as step_fwd.cu's SF_* constants)
SF_IH = 28  # image side
SF_X = 32  # padded side
SF_PAD = 2
SF_K1 = 6  # C1 filters
SF_R = 5  # filter side
SF_TAPS = SF_R * SF_R  # 25
SF_C1 = 28  # C1 output side
SF_P2 = 14  # S2 side
SF_K3 = 16  # C3 filters
SF_C3 = 10  # C3 output side
SF_P4 = 5  # S4 side
SF_KB3 = 2  # C3 filters a thread
SF_W1 = 8  # floats a tap of C1's staged weights (6 filters + 2 zeros)
SF_THREADS = 256  # ≥ each conv stage's items: one round each
SF_MIN_BLOCKS = 4  # blocks an SM the registers must allow (4 × 256 threads: ≤ 64 registers)
PL2 = SF_P2 * SF_P2  # 196
PL4 = SF_P4 * SF_P4  # 25
KG = SF_K3 // SF_KB3  # 8 C3 filter pairs
IMG = SF_IH * SF_IH  # 784
XPL = SF_X * SF_X  # 1024
S2 = SF_K1 * PL2  # 1176
S4 = SF_K3 * PL4  # 400
W3 = SF_K3 * SF_K1 * SF_TAPS  # 2400
W1S = SF_TAPS * SF_W1  # 200: C1's staged weights
A1 = 4 * SF_K1  # C1's accumulators
A3 = 4 * SF_KB3  # C3's accumulators
assert SF_C1 == SF_X - SF_R + 1 and SF_P2 * 2 == SF_C1, "C1 geometry"
assert SF_C3 == SF_P2 - SF_R + 1 and SF_P4 * 2 == SF_C3, "C3 geometry"
assert PL2 <= SF_THREADS and KG * PL4 <= SF_THREADS, "one round a stage"
# step_fwd_v2 (step_fwd.cu's SF2_* section)
SF2_IMGS = 2  # images a block
SF2_KB3 = 4  # C3 filters a thread: the 4 × 4 register tile (4 window outputs × 4 filters)
KG2 = SF_K3 // SF2_KB3  # 4 C3 filter groups
A3V2 = 4 * SF2_KB3  # C3's accumulators (16)
XPL2 = SF2_IMGS * XPL  # the block's images x (shared)
C1_ROUNDS = -(-SF2_IMGS * PL2 // SF_THREADS)  # 2 rounds of the block over both images' 392 pooled pixels
assert SF_K3 % SF2_KB3 == 0 and SF2_IMGS * KG2 * PL4 <= SF_THREADS, "C3: one round of the block"
# The block's dynamic shared memory (floats), step_fwd.cu's static arrays one after another: C1's weights [25 taps][8],
# C1's biases (8, 6 used), C3's weights [channel][tap][filter], C3's biases, then the images' x (imgs × 32×32) and
# their p1 (imgs × 6×14×14). Every region starts on 16 bytes, and every window row, tap and filter pair the
# convolutions read sits at an even float offset: they read them as 64-bit loads (common.ld_pair).
SM_W1 = 0
SM_B1 = SM_W1 + W1S  # 200
SM_W3 = SM_B1 + 8  # 208
SM_B3 = SM_W3 + W3  # 2608
SM_X = SM_B3 + SF_K3  # 2624
SM_P1_V1 = SM_X + XPL  # one image (v1)
SM_P1_V2 = SM_X + XPL2  # two images (v2)
assert all(o % 4 == 0 for o in (SM_B1, SM_W3, SM_B3, SM_X, SM_P1_V1, SM_P1_V2, XPL, S2)), "16-byte regions"

#: launch bounds (threads, blocks an SM): step_fwd.cu's __launch_bounds__(SF_THREADS, SF_MIN_BLOCKS)
LAUNCH_BOUNDS = {"step_fwd_v1": (SF_THREADS, SF_MIN_BLOCKS), "step_fwd_v2": (SF_THREADS, SF_MIN_BLOCKS)}
#: step_adam_v1 / step_sgd_v1: elements a thread (step_update.cu's float4)
SU_VEC = 4
SU_MAX_THREADS = 256


def _jit(name: str) -> Any:
    """cuda.jit with the kernel's launch bounds (the simulator's cuda.jit takes none)."""
    if numba.config.ENABLE_CUDASIM or name not in LAUNCH_BOUNDS:
        return cuda.jit
    return cuda.jit(launch_bounds=LAUNCH_BOUNDS[name])


# ---------------------------------------------------------------------------------------------- step_fwd


@device_function
def _mod_small(a, m):
    """a mod m for 0 ≤ a < 2¹⁶ and m ≥ 1 without integer division: q = trunc(a / m) in float32 (a exact, the
    quotient off by at most one), then corrected. step_fwd.cu's sf_mod, in float32 (no float64 here)."""
    q = uint32(float32(a) / float32(m))
    r = int64(a) - int64(q) * int64(m)
    if r < 0:
        r += int64(m)
    if r >= int64(m):
        r -= int64(m)
    return int32(r)


@device_function
def _window_max(v0, v1, v2, v3):
    """The first maximum of a 2×2 window's activated outputs (row-major taps) and its tap."""
    best = v0
    tap = 0
    if v1 > best:
        best = v1
        tap = 1
    if v2 > best:
        best = v2
        tap = 2
    if v3 > best:
        best = v3
        tap = 3
    return best, tap


def _window_row(nk: int, xs: int, ws: int) -> Any:
    """One filter row for a thread's 2×2 window, for C1 (nk = 6 filters, x rows xs = 32 apart, a tap's weights
    ws = 8 apart) and C3 (nk = kb filters, p1 rows 14 apart, 16 apart): the window's top and bottom input rows
    (6 columns at float offset 2·oh and 2·oh + xs: step_fwd.cu's ra / rb) × the row's 5 taps, in column order, ×
    the nk filters (tap s's weights at 2·wh + ws·s + q). oh and wh are offsets of float pairs in the block's dynamic
    shared memory, read through sm64 (the same bytes as int64) as 64-bit loads (common.ld_pair): an input row is 3
    loads, a tap's weights for a pair of filters one (step_fwd.cu: float2 rows, a float2 / float4 of a tap's
    weights). The callers pass oh as (the window's pair offset) + a constant a row, so row r's bottom loads and
    row r + 1's top loads are one expression, and NVVM loads each input row once. Numba has
    no templates: nk, xs and ws are closure constants (Numba freezes them), so the filter loop unrolls and every
    accumulator index is a constant; written out, since Numba's loops of this size are not unrolled and the
    accumulators must stay in registers. acc: 4·nk accumulators [window tap][filter]; each accumulator adds its 5
    taps in column order, as before the pair loads. The simulator runs it as the plain Python function it is (see
    below); compiled code inlines it (NVVM)."""

    def taps(acc, q, w0, w1, w2, w3, w4, t0, t1, t2, t3, t4, t5, u0, u1, u2, u3, u4, u5):
        """filter q's 5 taps (weights w0..w4) into its 4 accumulators"""
        c0 = acc[q]
        c1 = acc[nk + q]
        c2 = acc[2 * nk + q]
        c3 = acc[3 * nk + q]
        c0 += t0 * w0
        c1 += t1 * w0
        c2 += u0 * w0
        c3 += u1 * w0
        c0 += t1 * w1
        c1 += t2 * w1
        c2 += u1 * w1
        c3 += u2 * w1
        c0 += t2 * w2
        c1 += t3 * w2
        c2 += u2 * w2
        c3 += u3 * w2
        c0 += t3 * w3
        c1 += t4 * w3
        c2 += u3 * w3
        c3 += u4 * w3
        c0 += t4 * w4
        c1 += t5 * w4
        c2 += u4 * w4
        c3 += u5 * w4
        acc[q] = c0
        acc[nk + q] = c1
        acc[2 * nk + q] = c2
        acc[3 * nk + q] = c3

    taps = taps if numba.config.ENABLE_CUDASIM else device_function(taps)

    def row(acc, sm64, oh, wh):
        t0, t1 = ld_pair(sm64, oh)
        t2, t3 = ld_pair(sm64, U(oh + U1))
        t4, t5 = ld_pair(sm64, U(oh + U(2)))
        bh = U(oh + U(xs // 2))
        u0, u1 = ld_pair(sm64, bh)
        u2, u3 = ld_pair(sm64, U(bh + U1))
        u4, u5 = ld_pair(sm64, U(bh + U(2)))
        for h in range(nk // 2):  # a pair of filters: each tap's two weights in one load
            a0, b0 = ld_pair(sm64, U(wh + U(h)))
            a1, b1 = ld_pair(sm64, U(wh + U(ws // 2 + h)))
            a2, b2 = ld_pair(sm64, U(wh + U(ws + h)))
            a3, b3 = ld_pair(sm64, U(wh + U(3 * ws // 2 + h)))
            a4, b4 = ld_pair(sm64, U(wh + U(2 * ws + h)))
            taps(acc, 2 * h, a0, a1, a2, a3, a4, t0, t1, t2, t3, t4, t5, u0, u1, u2, u3, u4, u5)
            taps(acc, 2 * h + 1, b0, b1, b2, b3, b4, t0, t1, t2, t3, t4, t5, u0, u1, u2, u3, u4, u5)

    return row if numba.config.ENABLE_CUDASIM else device_function(row)


_c1_row = _window_row(SF_K1, SF_X, SF_W1)  # C1: the 6 filters, x rows 32 apart, a tap's weights 8 apart


def _c3_stage(kb: int) -> tuple[Any, Any]:
    """C3's row and stage device functions for ``kb`` filters a thread (v1: 2, v2: 4): Numba has no templates, so a
    factory; kb is a closure constant (Numba freezes it), so the filter loops unroll and every accumulator index is a
    constant. Returns (row, stage)."""

    row = _window_row(kb, SF_P2, SF_K3)  # p1 rows 14 apart, a tap's 16 filters' weights

    def c3(a3, sm, sm64, xb, act, k0, p3, m3, po):
        """C3 + act + pool of one pooled pixel and filters k0 .. k0 + kb − 1: its 2×2 window's input at sm[xb]
        (channel 0's top left p1; sm64 the same shared memory as int64), each output from its bias, then (channel,
        tap row, tap column) in that order; the S4 values into p3[po + q·25], the routes into m3 alike. a3: 4·kb
        accumulators [window tap][filter]. The caller computes the offsets (as _c1's)."""
        for q in range(kb):
            bq = sm[U(U(SM_B3) + k0 + U(q))]
            a3[q] = bq
            a3[kb + q] = bq
            a3[2 * kb + q] = bq
            a3[3 * kb + q] = bq
        xh = U(xb >> U1)
        kh = U(k0 >> U1)  # k0 = kb·kg, kb even
        c = U0
        while c < U(SF_K1):  # a loop (step_fwd.cu: #pragma unroll 1)
            xc = U(xh + c * U(PL2 // 2))  # pairs: xb, PL2 and every row offset are even
            wc = U(U(SM_W3 // 2) + c * U(SF_TAPS * SF_K3 // 2) + kh)
            row(a3, sm64, xc, wc)
            row(a3, sm64, U(xc + U(SF_P2 // 2)), U(wc + U(SF_R * SF_K3 // 2)))
            row(a3, sm64, U(xc + U(2 * SF_P2 // 2)), U(wc + U(2 * SF_R * SF_K3 // 2)))
            row(a3, sm64, U(xc + U(3 * SF_P2 // 2)), U(wc + U(3 * SF_R * SF_K3 // 2)))
            row(a3, sm64, U(xc + U(4 * SF_P2 // 2)), U(wc + U(4 * SF_R * SF_K3 // 2)))
            c = U(c + U1)
        for q in range(kb):
            best, tap = _window_max(activate(a3[q], act), activate(a3[kb + q], act),
                                    activate(a3[2 * kb + q], act), activate(a3[3 * kb + q], act))
            p3[U(po + U(q * PL4))] = best
            m3[U(po + U(q * PL4))] = uint8(tap)

    return row, device_function(c3)


_c3_row, _c3 = _c3_stage(SF_KB3)  # v1: 2 filters a thread (8 accumulators)
_c3_row4, _c3_4 = _c3_stage(SF2_KB3)  # v2: 4 filters a thread (the 4 × 4 register tile)


@device_function
def _sched_row(state, sched, srow, nsched):
    """This step's schedule row into srow (the update reads it: it never reads the counter); the caller's thread 0
    of block 0."""
    i = int64(state[STEP]) - int64(state[SCHED_BASE])
    i = min(max(i, int64(0)), int64(nsched) - int64(1))
    for c in range(SCHED_COLS):
        srow[c] = sched[U(U(i) * U(SCHED_COLS) + U(c))]


@device_function
def _stage_weights(w1, b1, w3, b3, sm, tid):
    """The weights into the block's shared memory (the SM_* regions), threads tid, tid + 256, ...: C1's as [tap][8];
    C3's read in their own order (coalesced) and scattered to [channel·tap][filter]; the biases."""
    t = tid
    while t < U(W1S):
        k = U(t & U(SF_W1 - 1))
        sm[U(U(SM_W1) + t)] = w1[U(k * U(SF_TAPS) + (t >> U(3)))] if k < U(SF_K1) else ZERO
        t = U(t + U(SF_THREADS))
    t = tid
    while t < U(W3):
        k = U(t // U(SF_K1 * SF_TAPS))  # a constant divisor: a multiply
        sm[U(U(SM_W3) + (t - k * U(SF_K1 * SF_TAPS)) * U(SF_K3) + k)] = w3[t]
        t = U(t + U(SF_THREADS))
    if tid < U(SF_K1):
        sm[U(U(SM_B1) + tid)] = b1[tid]
    if tid < U(SF_K3):
        sm[U(U(SM_B3) + tid)] = b3[tid]


@device_function
def _gather(images, labels, perm, x, y, sm, xs, n, tid, offset, nperm, mperm, shperm, max_shift, h1, scale, shift):
    """Batch row n (batch.py's arithmetic) into sm[xs : xs + 1024] and x[n], y[n], threads tid, tid + 256, ...:
    every thread computes the image's sample and shift (h1: the step's epoch_hash)."""
    a = U(offset + n)
    j = U(perm[U(a - fast_div(a, mperm, shperm) * U(nperm))])
    dy = int32(0)
    dx = int32(0)
    if max_shift > 0:
        span = U(U(max_shift) + U(max_shift) + U1)
        hh = mix32((h1 + low32(j)) & M32)
        dy = int32(_mod_small(uint32(hh & M16), span) - max_shift)
        dx = int32(_mod_small(uint32(hh >> SH16), span) - max_shift)
    img = U(j * U(IMG))
    xo = U(n * U(XPL))
    t = tid
    while t < U(XPL):
        ih = int32(int32(t >> U(5)) - int32(SF_PAD) - dy)  # t // 32 − pad − dy
        iw = int32(int32(t & U(SF_X - 1)) - int32(SF_PAD) - dx)
        v = shift
        if ih >= 0 and ih < SF_IH and iw >= 0 and iw < SF_IH:
            v = float32(images[U(img + U(ih) * U(SF_IH) + U(iw))]) * scale + shift
        sm[U(xs + t)] = v
        x[U(xo + t)] = v
        t = U(t + U(SF_THREADS))
    if tid == U0:
        y[n] = int32(labels[j])


@device_function
def _c1(a1, sm, sm64, xb, act, so, p1, m1, po):
    """C1 + act + pool of one pooled pixel, all 6 filters: its 2×2 window's input at sm[xb] (the window's top left
    x; sm64 the same shared memory as int64), each output from its bias, then (tap row, tap column); the S2 values
    into sm[so + k·196] (p1 in shared memory, for C3) and p1[po + k·196], the routes into m1 alike. a1: 24
    accumulators [window tap][filter]. The caller computes the offsets."""
    for k in range(SF_K1):
        bk = sm[U(U(SM_B1) + U(k))]
        a1[k] = bk
        a1[SF_K1 + k] = bk
        a1[2 * SF_K1 + k] = bk
        a1[3 * SF_K1 + k] = bk
    # the 25 taps written out (Numba unrolls no loop of that size): row r's taps read x rows 2·ph + r and
    # 2·ph + r + 1, so the unrolled loads of the same address are one load (step_fwd.cu's sliding window)
    xh = U(xb >> U1)  # float pairs: xb, SF_X and SM_W1 are even
    _c1_row(a1, sm64, xh, U(SM_W1 // 2))
    _c1_row(a1, sm64, U(xh + U(SF_X // 2)), U((SM_W1 + SF_R * SF_W1) // 2))
    _c1_row(a1, sm64, U(xh + U(2 * SF_X // 2)), U((SM_W1 + 2 * SF_R * SF_W1) // 2))
    _c1_row(a1, sm64, U(xh + U(3 * SF_X // 2)), U((SM_W1 + 3 * SF_R * SF_W1) // 2))
    _c1_row(a1, sm64, U(xh + U(4 * SF_X // 2)), U((SM_W1 + 4 * SF_R * SF_W1) // 2))
    for k in range(SF_K1):
        best, tap = _window_max(activate(a1[k], act), activate(a1[SF_K1 + k], act),
                                activate(a1[2 * SF_K1 + k], act), activate(a1[3 * SF_K1 + k], act))
        sm[U(so + U(k * PL2))] = best
        p1[U(po + U(k * PL2))] = best
        m1[U(po + U(k * PL2))] = uint8(tap)


if numba.config.ENABLE_CUDASIM:
    # The simulator calls a device function through a context manager that rescans its module's globals on every
    # call (~150 µs; common.py): these use no cuda.* API, so the simulator runs them as the plain Python functions
    # they are (C3 alone calls _c3_row 6,000 times an image). Compiled code inlines the decorated versions.
    _mod_small = _mod_small.py_func
    _window_max = _window_max.py_func
    _c3 = _c3.py_func
    _c3_4 = _c3_4.py_func
    _sched_row = _sched_row.py_func
    _stage_weights = _stage_weights.py_func
    _gather = _gather.py_func
    _c1 = _c1.py_func
    epoch_hash = epoch_hash.py_func
    low32 = low32.py_func
    mix32 = mix32.py_func


@_jit("step_fwd_v1")
def step_fwd_v1(images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, nb, nperm, nsched,
                act, scale, shift, mperm, shperm):
    # (mperm, shperm): common.div_magic(M); every array flat, every index uint32 (module docstring)
    sm = cuda.shared.array(0, float32)  # the SM_* regions (dynamic: step_fwd_smem("v1") bytes)
    sm64 = cuda.shared.array(0, int64)  # the same bytes: the convolutions' 64-bit loads (ld_pair)
    a1 = cuda.local.array(A1, float32)  # C1: [window tap][filter] (registers: constant indices only)
    a3 = cuda.local.array(A3, float32)  # C3: [window tap][filter of the pair]
    tid = U(cuda.threadIdx.x)
    blk = U(cuda.blockIdx.x)
    if blk == U0 and tid == U0:
        _sched_row(state, sched, srow, nsched)
    _stage_weights(w1, b1, w3, b3, sm, tid)  # once a block
    offset = U(state[OFFSET])
    max_shift = int32(state[SHIFT])
    h1 = epoch_hash(state[SEED], state[EPOCH])  # the same for every image of the step
    n = blk
    while n < U(nb):  # block-stride over the images (block-uniform)
        _gather(images, labels, perm, x, y, sm, U(SM_X), n, tid, offset, nperm, mperm, shperm, max_shift, h1, scale,
                shift)
        cuda.syncthreads()  # x staged (and, the first time, the weights)
        # C1 + act + pool -> p1 (shared and global), m1: a thread per pooled pixel, all 6 filters
        if tid < U(PL2):
            ph = U(tid // U(SF_P2))
            _c1(a1, sm, sm64, U(U(SM_X) + ph * U(2 * SF_X) + U(tid - ph * U(SF_P2)) * U(2)), act,
                U(U(SM_P1_V1) + tid), p1, m1, U(n * U(S2) + tid))
        cuda.syncthreads()  # p1 staged
        # C3 + act + pool -> p3, m3: a thread per (2 filters, pooled pixel)
        if tid < U(KG * PL4):
            kg = U(tid // U(PL4))
            pp = U(tid - kg * U(PL4))
            ph = U(pp // U(SF_P4))
            k0 = U(kg * U(SF_KB3))
            _c3(a3, sm, sm64, U(U(SM_P1_V1) + ph * U(2 * SF_P2) + U(pp - ph * U(SF_P4)) * U(2)), act, k0, p3, m3,
                U((n * U(SF_K3) + k0) * U(PL4) + pp))
        n = U(n + U(cuda.gridDim.x))


@_jit("step_fwd_v2")
def step_fwd_v2(images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, nb, nperm, nsched,
                act, scale, shift, mperm, shperm):
    # step_fwd_v1's arguments (nb: step_fwd.cu v2's B); two images a block (module docstring)
    sm = cuda.shared.array(0, float32)  # the SM_* regions, x and p1 for two images (step_fwd_smem("v2") bytes)
    sm64 = cuda.shared.array(0, int64)
    a1 = cuda.local.array(A1, float32)
    a3 = cuda.local.array(A3V2, float32)  # C3: [window tap][filter of the 4]: the 4 × 4 register tile
    tid = U(cuda.threadIdx.x)
    blk = U(cuda.blockIdx.x)
    if blk == U0 and tid == U0:
        _sched_row(state, sched, srow, nsched)
    _stage_weights(w1, b1, w3, b3, sm, tid)  # once a block, for all its images
    offset = U(state[OFFSET])
    max_shift = int32(state[SHIFT])
    h1 = epoch_hash(state[SEED], state[EPOCH])
    npairs = U(U(U(nb) + U(SF2_IMGS - 1)) // U(SF2_IMGS))
    pr = blk
    while pr < npairs:  # block-stride over the image pairs (block-uniform)
        n0 = U(pr * U(SF2_IMGS))
        ni = min(U(U(nb) - n0), U(SF2_IMGS))  # images in this pair: 1 in an odd batch's last (block-uniform)
        im = U0
        while im < ni:  # the gather of each image (step_fwd.cu: #pragma unroll 1)
            _gather(images, labels, perm, x, y, sm, U(U(SM_X) + im * U(XPL)), U(n0 + im), tid, offset, nperm, mperm,
                    shperm, max_shift, h1, scale, shift)
            im = U(im + U1)
        # C1: items it = image · 196 + pooled pixel, in rounds of the block; every thread runs every round
        rnd = U0
        while rnd < U(C1_ROUNDS):
            cuda.syncthreads()  # round 0: the gather's; then: keeps the weights' loads inside the round
            it = U(rnd * U(SF_THREADS) + tid)
            im = U(it // U(PL2))  # a constant divisor: a multiply
            if it < U(SF2_IMGS * PL2) and im < ni:
                px = U(it - im * U(PL2))
                ph = U(px // U(SF_P2))
                _c1(a1, sm, sm64, U(U(SM_X) + im * U(XPL) + ph * U(2 * SF_X) + U(px - ph * U(SF_P2)) * U(2)), act,
                    U(U(SM_P1_V2) + im * U(S2) + px), p1, m1, U((n0 + im) * U(S2) + px))
            rnd = U(rnd + U1)
        cuda.syncthreads()  # p1 staged
        # C3: items (image, filter group of 4, pooled pixel): 200, one round
        if tid < U(SF2_IMGS * KG2 * PL4):
            im = U(tid // U(KG2 * PL4))
            r = U(tid - im * U(KG2 * PL4))
            kg = U(r // U(PL4))
            if im < ni:
                pp = U(r - kg * U(PL4))
                ph = U(pp // U(SF_P4))
                k0 = U(kg * U(SF2_KB3))
                _c3_4(a3, sm, sm64, U(U(SM_P1_V2) + im * U(S2) + ph * U(2 * SF_P2) + U(pp - ph * U(SF_P4)) * U(2)),
                      act, k0, p3, m3, U((U(n0 + im) * U(SF_K3) + k0) * U(PL4) + pp))
        pr = U(pr + U(cuda.gridDim.x))


# ---------------------------------------------------------------------------------------------- update


@device_function
def _advance(state, batch):
    """The state's advance (batch.py's step_advance_v1), by thread 0 of block 0 of the launch."""
    if cuda.threadIdx.x == 0 and cuda.blockIdx.x == 0:
        state[STEP] += 1
        state[OFFSET] += batch
        k = state[STEP_IN_EPOCH] + 1
        if k == state[STEPS_PER_EPOCH]:
            k = 0
            state[OFFSET] = 0
            state[EPOCH] += 1
        state[STEP_IN_EPOCH] = k


@device_function
def _grad(g, gpart, i, nc, ngroups):
    """g[i]: the partials' sum where i < NC (float32, group order, from 0.0: reference.step_reduce), written
    back; else g[i] as it is."""
    if i >= U(nc):
        return g[i]
    acc = ZERO
    s = U0
    o = i
    while s < U(ngroups):
        acc += gpart[o]
        o = U(o + U(nc))
        s = U(s + U1)
    g[i] = acc
    return acc



if numba.config.ENABLE_CUDASIM:
    _grad = _grad.py_func  # as above

@cuda.jit
def step_adam_v1(p, g, gpart, m, v, srow, state, n, nc, ngroups, beta1, one_m_beta1, beta2, one_m_beta2, eps, wd,
                 batch):
    lr = srow[0]
    bc1 = srow[1]
    bc2 = srow[2]
    un = U(n)
    nt = U(cuda.blockDim.x)
    tile = U(nt * U(SU_VEC))
    base = U(U(cuda.blockIdx.x) * tile + U(cuda.threadIdx.x))
    stride = U(U(cuda.gridDim.x) * tile)
    while base < un:
        for e in range(SU_VEC):  # the thread's 4 elements, a block's width apart (coalesced)
            idx = U(base + U(e) * nt)
            if idx < un:
                pi = p[idx]
                gi = _grad(g, gpart, idx, nc, ngroups) + wd * pi
                mi = beta1 * m[idx] + one_m_beta1 * gi
                vi = beta2 * v[idx] + one_m_beta2 * gi * gi
                m[idx] = mi
                v[idx] = vi
                p[idx] = pi - lr * (mi / bc1) / (math.sqrt(vi / bc2) + eps)
        base = U(base + stride)
    _advance(state, batch)


@cuda.jit
def step_sgd_v1(p, g, gpart, m, srow, state, n, nc, ngroups, momentum, wd, batch):
    lr = srow[0]
    un = U(n)
    nt = U(cuda.blockDim.x)
    tile = U(nt * U(SU_VEC))
    base = U(U(cuda.blockIdx.x) * tile + U(cuda.threadIdx.x))
    stride = U(U(cuda.gridDim.x) * tile)
    while base < un:
        for e in range(SU_VEC):
            idx = U(base + U(e) * nt)
            if idx < un:
                pi = p[idx]
                mi = momentum * m[idx] + (_grad(g, gpart, idx, nc, ngroups) + wd * pi)
                m[idx] = mi
                p[idx] = pi - lr * mi
        base = U(base + stride)
    _advance(state, batch)


# ------------------------------------------------------------------------------------ variant table

_F = "float32[::1]"
_U8 = "uint8[::1]"
_I = "int32[::1]"
#: step_fwd_v1's and step_fwd_v2's (v2 needs no argument more: nb is step_fwd.cu v2's B)
_FWD = (f"void({_U8}, {_U8}, {_I}, {_I}, {_F}, {_F}, {_F}, {_I}, {_F}, {_F}, {_F}, {_U8}, {_F}, {_F}, {_F}, {_U8}, "
        "int32, int32, int32, int32, float32, float32, uint32, uint32)")
SIGNATURES = {
    "step_fwd_v1": _FWD,
    "step_fwd_v2": _FWD,
    "step_adam_v1": f"void({_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_I}, int32, int32, int32, "
    + ", ".join(["float32"] * 6) + ", int32)",
    "step_sgd_v1": f"void({_F}, {_F}, {_F}, {_F}, {_F}, {_I}, int32, int32, int32, float32, float32, int32)",
}
KERNELS = {"step_fwd_v1": step_fwd_v1, "step_fwd_v2": step_fwd_v2, "step_adam_v1": step_adam_v1,
           "step_sgd_v1": step_sgd_v1}
VARIANTS = {"step_fwd": ("v1", "v2"), "step_adam": ("v1",), "step_sgd": ("v1",)}
DEFAULT_VARIANTS = {op: vs[-1] for op, vs in VARIANTS.items()}
DEFAULT_VARIANTS["step_fwd"] = "v1"  # the default runs step_fwd_v2's kernel at large batch (step_fwd_kernel)


# ------------------------------------------------------------------------------------ launch helpers


def update_threads(n: int, sm_count: int) -> int:
    """step_adam_v1 / step_sgd_v1's block: ⌈n/4⌉ / SMs threads rounded down to warps, 32 .. 256 (adam_step v2's
    plan in the cupy backend: a small buffer still spreads over every SM)."""
    items = ceil_div(n, SU_VEC)
    return max(32, min(SU_MAX_THREADS, (items // sm_count) // 32 * 32))


def update_plan(n: int, sm_count: int) -> tuple[int, int]:
    """(blocks, threads) of step_adam_v1 / step_sgd_v1 for a buffer of n floats."""
    threads = update_threads(n, sm_count)
    return max(1, min(ceil_div(ceil_div(n, SU_VEC), threads), 65535)), threads


def step_fwd_kernel(variant: str | None, batch: int, sm_count: int, default: str = DEFAULT_VARIANTS["step_fwd"],
                    variants: tuple[str, ...] = VARIANTS["step_fwd"]) -> str:
    """The kernel a step_fwd call runs (CupyBackend.step_fwd_kernel's plan): a variant by name always; the default
    (variant None, the backend's default ``default`` being v1) takes v2's kernel (two images a block) where its
    ⌈B/2⌉ blocks still fill every SM's four slots once (⌈B/2⌉ ≥ 4 · SMs: batch ≥ 1,055 on 132 SMs), else v1's
    block per image (more blocks for a latency-bound small batch)."""
    v = variant or default
    fills = ceil_div(batch, SF2_IMGS) >= SF_MIN_BLOCKS * int(sm_count)
    return "v2" if variant is None and v == "v1" and "v2" in variants and fills else v


def step_fwd_smem(kernel: str) -> int:
    """step_fwd's dynamic shared memory in bytes (the SM_* regions): v1 19,296 (one image), v2 28,096 (two)."""
    imgs = 1 if kernel == "v1" else SF2_IMGS
    return 4 * (SM_X + imgs * (XPL + S2))


def step_fwd_grid(kernel: str, batch: int) -> int:
    """step_fwd's grid (cupy's): a block per image (v1) or per SF2_IMGS images (v2). Both kernels block-stride over
    their images (pairs), so a capped grid is correct too."""
    return int(batch) if kernel == "v1" else ceil_div(batch, SF2_IMGS)


def _sm_count(be: Any) -> int:
    """The SMs step_fwd's plan is sized for: the backend's ``sm_count`` (NumbaBackend sets it from the device; a
    test may set it), else DEFAULT_SMS."""
    s = getattr(be, "sm_count", None)
    return s if isinstance(s, int) and s > 0 else DEFAULT_SMS


def _variant(be: Any, op: str, variant: str | None) -> str:
    v = variant or getattr(be, "default_variants", {}).get(op) or DEFAULT_VARIANTS[op]
    if v not in VARIANTS[op]:
        raise ValueError(f"{op}: unknown variant {v!r}; choose one of {', '.join(VARIANTS[op])}")
    return v


def _check(a: Any, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
    """A C-contiguous device array of this shape and dtype (never a host array)."""
    if a is None:
        raise ValueError(f"{name}: missing array")
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a device array of this backend, got a host NumPy array (use to_device)")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(a.shape)} does not match the expected {tuple(shape)}")
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{name}: must be C-contiguous")


def _flat(be: Any, a: Any) -> Any:
    f = getattr(be, "_flat_view", None)
    return f(a) if f is not None else a.reshape(a.size)


def _launch(be: Any, name: str, grid: int, block: int, *args: Any, shmem: int = 0) -> None:
    launch_kernel(be, name, KERNELS[name], grid, block, shmem, *args)


def step_fwd(be: Any, images: Any, labels: Any, perm: Any, state: Any, sched: Any, srow: Any, x: Any, y: Any,
             w1: Any, b1: Any, p1: Any, m1: Any, w3: Any, b3: Any, p3: Any, m3: Any, mean: float, std: float,
             act: str, variant: str | None = None) -> None:
    """batch_prepare + C1 + act + 2×2 max pool + C3 + act + 2×2 max pool (LeNet-5's geometry), and this step's
    schedule row into srow: one launch (docs/step4.md), a block per image (v1) or per two images (v2); variant
    None: the backend's default, which runs v2's kernel at large batch (step_fwd_kernel)."""
    v = _variant(be, "step_fwd", variant)
    check_act(act)
    if getattr(images, "ndim", 0) != 3 or getattr(x, "ndim", 0) != 4 or getattr(perm, "ndim", 0) != 1:
        raise ValueError("step_fwd: images (N,28,28), perm (M,) and x (B,1,32,32) expected")
    nimg, b, (m,) = images.shape[0], x.shape[0], perm.shape
    if m < 1 or b < 1:
        raise ValueError("step_fwd: empty permutation or batch")
    if getattr(sched, "ndim", 0) != 2 or sched.shape[1] != SCHED_COLS or sched.shape[0] < 1:
        raise ValueError(f"step_fwd: sched must be (T, {SCHED_COLS}), got {tuple(getattr(sched, 'shape', ()))}")
    u8 = np.uint8
    for a, name, shape, dt in (
        (images, "images", (nimg, SF_IH, SF_IH), u8), (labels, "labels", (nimg,), u8), (perm, "perm", (m,), np.int32),
        (state, "state", (STATE_WORDS,), np.int32), (sched, "sched", tuple(sched.shape), np.float32),
        (srow, "srow", (SCHED_COLS,), np.float32), (x, "x", (b, 1, SF_X, SF_X), np.float32),
        (y, "y", (b,), np.int32), (w1, "w1", (SF_K1, 1, SF_R, SF_R), np.float32), (b1, "b1", (SF_K1,), np.float32),
        (p1, "p1", (b, SF_K1, SF_P2, SF_P2), np.float32), (m1, "m1", (b, SF_K1, SF_P2, SF_P2), u8),
        (w3, "w3", (SF_K3, SF_K1, SF_R, SF_R), np.float32), (b3, "b3", (SF_K3,), np.float32),
        (p3, "p3", (b, SF_K3, SF_P4, SF_P4), np.float32), (m3, "m3", (b, SF_K3, SF_P4, SF_P4), u8),
    ):
        _check(a, name, shape, dt)
    if images.size >= 2**31 or x.size >= 2**31 or m >= 2**31:
        raise ValueError("step_fwd: an array has 2³¹ elements or more (the kernel's offsets are uint32 < 2³¹)")
    f = lambda a: _flat(be, a)  # noqa: E731
    k = step_fwd_kernel(variant, b, _sm_count(be), default=v,
                        variants=getattr(be, "variants", {}).get("step_fwd", VARIANTS["step_fwd"]))
    _launch(be, f"step_fwd_{k}", step_fwd_grid(k, b), SF_THREADS, f(images), labels, perm, state, f(sched), srow,
            f(x), y, f(w1), b1, f(p1), f(m1), f(w3), b3, f(p3), f(m3), np.int32(b), np.int32(m),
            np.int32(sched.shape[0]), np.int32(ACT_CODES[act]), np.float32(1.0 / (255.0 * std)),
            np.float32(-mean / std), *div_magic(m), shmem=step_fwd_smem(k))


def _update_checks(op: str, p: Any, g: Any, gpart: Any, opt: tuple[tuple[str, Any], ...], srow: Any, state: Any,
                   batch: int) -> tuple[int, int, int]:
    if getattr(p, "ndim", 0) != 1:
        raise ValueError(f"{op}: p must be a flat buffer")
    (size,) = p.shape
    if getattr(gpart, "ndim", 0) != 2 or gpart.shape[0] < 1:
        raise ValueError(f"{op}: gpart must be (S >= 1, conv_prefix), got {tuple(getattr(gpart, 'shape', ()))}")
    s, nc = (int(d) for d in gpart.shape)
    if nc % 4 or nc > size:
        raise ValueError(f"{op}: gpart's row length {nc} must be a multiple of 4 and at most {size}")
    for a, name in ((p, "p"), (g, "g"), *((a, nm) for nm, a in opt)):
        _check(a, name, (size,))
    _check(gpart, "gpart", (s, nc))
    _check(srow, "srow", (SCHED_COLS,))
    _check(state, "state", (STATE_WORDS,), np.int32)
    if int(batch) < 1:
        raise ValueError(f"{op}: batch must be >= 1, got {batch}")
    if size >= 2**31 or gpart.size >= 2**31:
        raise ValueError(f"{op}: a buffer has 2³¹ elements or more (the kernel's offsets are uint32)")
    return size, nc, s


#: the SM count the update grid is sized for when the caller gives none (backend.DEFAULT_SM_COUNT: an H100 / H200)
DEFAULT_SMS = 132


def step_adam(be: Any, p: Any, g: Any, gpart: Any, m: Any, v: Any, srow: Any, state: Any, batch: int, beta1: float,
              beta2: float, eps: float, weight_decay: float, variant: str | None = None,
              sms: int = DEFAULT_SMS) -> None:
    """g[:NC] = Σ_s gpart[s] (float32, group order), Adam with [lr, bc1, bc2] = srow[:3], step_advance: one
    launch (docs/step4.md); the grid is sized for ``sms`` SMs (the backend passes the device's)."""
    var = _variant(be, "step_adam", variant)
    size, nc, s = _update_checks("step_adam", p, g, gpart, (("m", m), ("v", v)), srow, state, batch)
    blocks, threads = update_plan(size, sms)
    f = np.float32
    _launch(be, f"step_adam_{var}", blocks, threads, p, g, _flat(be, gpart), m, v, srow, state, np.int32(size),
            np.int32(nc), np.int32(s), f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2), f(eps), f(weight_decay),
            np.int32(batch))


def step_sgd(be: Any, p: Any, g: Any, gpart: Any, m: Any, srow: Any, state: Any, batch: int, momentum: float,
             weight_decay: float, variant: str | None = None, sms: int = DEFAULT_SMS) -> None:
    """g[:NC] = Σ_s gpart[s] (float32, group order), SGD with momentum with lr = srow[0], step_advance: one
    launch (docs/step4.md); the grid is sized for ``sms`` SMs (the backend passes the device's)."""
    var = _variant(be, "step_sgd", variant)
    size, nc, s = _update_checks("step_sgd", p, g, gpart, (("m", m),), srow, state, batch)
    blocks, threads = update_plan(size, sms)
    f = np.float32
    _launch(be, f"step_sgd_{var}", blocks, threads, p, g, _flat(be, gpart), m, srow, state, np.int32(size),
            np.int32(nc), np.int32(s), f(momentum), f(weight_decay), np.int32(batch))
