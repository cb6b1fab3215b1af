"""step_bwd: the conv backward of the four-kernel training step (docs/step4.md) in ONE launch (the Numba face of
kernels/step_bwd.cu: the same algorithm, launch plan, name and determinism).

What it computes (reference.step_bwd). From the head's routed gradient gz3 (B,16,5,5) and the forward's routes
m3 (B,16,5,5) / m1 (B,6,14,14) (uint8, 0..3 row-major in the 2x2 window), for each image group
s = images [s*chunk, min(B, (s+1)*chunk)) (reference.step_groups):
  dw3[k,c,r,s] = sum gz3[n,k,i,j] * p1[n,c,2i+a/2+r,2j+a%2+s]  (a = m3[n,k,i,j]);  db3[k] = sum gz3[n,k,:,:]
  gz1[n,c,h,v] = (sum over the routed C3 outputs (p,q) within the filter's reach of gz3 * w3[k,c,h-p,v-q])
                 * act'(p1[n,c,h,v])          -- kept in shared memory only, never written to global memory
  dw1[k,0,r,s] = sum gz1[n,k,i,j] * x[n,0,2i+a/2+r,2j+a%2+s]    (a = m1[n,k,i,j]);  db1[k] = sum gz1[n,k,:,:]
and writes row s of gpart (S, 2624): dw1 at [0,150), db1 at [160,166), dw3 at [192,2592), db3 at [2592,2608),
0 in the padding columns [150,160), [166,192), [2608,2624) (spec.param_layout; spec.conv_prefix() = 2624).
An empty group (s*chunk >= B) writes a row of zeros.

- step_bwd_v1: grid (S, 1, 1), block (THREADS = 256, 1, 1), static shared memory only; scalars B, chunk =
  ceil(B / S) (on the host: no index divides by a run-time value; LeNet's geometry is compile-time, so every
  division is by a constant) and S. A block owns group blockIdx.x; the groups are walked block-stride (``while
  s < S: ... s += gridDim.x``) so a grid capped below S (NumbaBackend.max_blocks, the simulator's
  quick_simulation) still writes every row: at the backend's grid (S blocks) each block takes one group, as
  step_bwd.cu's. Every index and size is uint32 (common.U): no 64-bit or signed division, no wraparound selects.
  Two exceptions, each a uint32 plus a compile-time constant summed in int64 (zero-extended, never negative: no
  wraparound select), which LLVM folds into the loads' immediate offsets (LDS [R+0x64] ...; a uint32 sum could
  wrap, so it cannot): the 6 weights of a tap in gz1's gather (wo + c*25) and the windows of a dw3 chain.
- step_bwd_v2 (the default; step_bwd.cu's step_bwd_v2): v1 but for which thread owns which of C3's 2,400 weight
  gradients in phase A.1 and in the row's write. Thread t < 240 owns the 10 weights o = k*150 + l + 15u
  (k = t // 15, l = t % 15, u = 0..9; _w3_index, step_bwd.cu's sb_w3_index<true>) of ONE filter k, so per window
  it loads gz3[k*25 + w] and the route off3[k*25 + w] once and makes its 10 FMAs (_filter3: 12 shared loads for 10
  MACs, v1 30); threads 240..255 add no dw3 and write none (their o is >= 2400). Each weight's sum is v1's
  (windows in order from 0 for the image, then added to the group's total), so v2 writes v1's bits exactly
  (tests/test_numba_step_bwd.py checks it in the simulator and, with -m gpu, on a device). Everything else
  (staging, db3, phase A.2, phase B, padding, launch shape) is v1's. Launch bounds (256, 3), as step_bwd.cu's.
  Both kernels are one body (_body(..., v2), step_bwd.cu's step_bwd_body<V2>): each passes a constant bool, which
  Numba types as a literal (Literal[bool](False) / (True) in the mangled name), so it compiles a body for each and
  prunes the other variant's branches; v1's PTX is the one it had as its own kernel, instruction for instruction
  (only the unused environment globals of the new device functions are added), and ptxas gives it the same
  registers.

Accumulators and determinism (as step_bwd.cu). Every output has exactly one owner thread that keeps it in a
register: per image it sums the image's windows in a fixed order from 0, then adds that to the group's total,
images in order n0, n0+1, ... There is no cross-thread reduction, no float atomic and no ticket, so two runs
agree bit for bit whatever the schedule.
  dw3: thread t owns o = t + 256u (u = 0..9, o < 2400): 10 registers (the last only for t < 96); v2: thread
       t < 240 owns o = k*150 + l + 15u (t = 15k + l, u = 0..9): 10 registers, one filter's weights;
  db3: thread t < 16 owns db3[t]; dw1 / db1: thread t < 150 owns dw1[t], 150 <= t < 156 owns db1[t-150].
The products are cuda.fma (fma.rn.f32: fmaf's single rounding); the sums as step_bwd.cu's.

Per image (shared memory staged once per image, after a barrier that protects the previous image's data):
  stage: x (1x32x32, rows padded to XS = 37 floats: the 25 taps of C1's weight gradient fall in 25 different
         banks), p1 (6x14x14), gz3 and m3 (16x5x5), m3's routed offsets into a p1 plane (off3) and m1's routed
         offsets into x (off1). w3 (16x6x5x5) is staged once per block.
  phase A (one barrier): C3's weight gradient (v1: every thread, its <= 10 weights over the 25 windows, a chain
         each; v2: threads t < 240, one filter's 10 weights, the 25 windows in a loop of 10 FMAs each); threads
         t < 16 add db3; threads t < 196 = (h, v) of S2 compute gz1[:, h, v] (6 channel accumulators, the
         <= 3x3 pooled C3 windows within the filter's reach, k = 0..15 in order) into shared memory.
  phase B (one barrier): threads t < 156 add dw1 / db1 over the 196 windows of their filter.
Shared memory (static): w3 9,600 B + x 4,736 + p1 4,704 + gz3 1,600 + off3 1,600 + m3 400 + gz1 4,704
+ off1 4,704 = 32,048 B per block, as step_bwd.cu's (offsets uint32 here, int there).

What Numba cannot say as the CUDA C does, and what stands in for it:
- ``#pragma unroll`` (and ``unroll 4``): Numba has no unroll control; LLVM unrolls a loop with a constant trip
  count when the unrolled body is small enough, innermost loops first. So a register array (cuda.local.array:
  the 6 gz1 channels; the dw3 accumulators, their rows and taps) is indexed only by constants or inside a small
  constant-trip range() loop (unrolled: no stack frame; tests/test_numba_step_bwd.py checks ptxas's report), and
  C3's weight gradient, step_bwd.cu's two nested unrolled loops (10 weights x 25 windows), is written out as 10
  calls of the inline device function _chain3 whose 25-window loop LLVM unrolls fully (a loop of 10 around it is
  not unrolled, which would put the 10 accumulators in local memory). Each chain keeps its window index in int64
  (the uint32 row plus the unrolled constant), so the gz3 and route loads take immediate offsets: the phase is
  250 FFMA + 750 LDS + ~500 integer/address instructions on sm_90, ~6.05 a MAC, as step_bwd.cu's ~6.06 (static
  SASS counts of the ptxas output, cuobjdump -sass; with the windows in a loop of uint32 index arithmetic it
  took ~11). The other fixed-count loops (16 filters, 196 windows) are while loops on a uint32 counter: a range()
  keeps a 64-bit counter with two selects an iteration, which LLVM copies into every unrolled body.
- ``__launch_bounds__(256)``: cuda.jit(launch_bounds=(256,)) (not in the simulator, whose jit takes none); v2's
  ``__launch_bounds__(256, 3)``: launch_bounds=(256, 3) (LAUNCH_BOUNDS).
- ``template <bool V2>``: _body's bool argument, a literal at each kernel's call (see step_bwd_v2 above).
- v2's ``#pragma unroll 5`` over the 25 windows: a while loop on a uint32 window index (a range() here kept an
  int64 index with selects and a negative-index wraparound in every load's address); LLVM peels the first window
  and unrolls the rest by 2, the 10 weights unrolled inside (10 FFMA + 12 LDS a window).
- ``fmaf``: cuda.fma (the simulator computes it as a*b + c in float32: two roundings).
- ``__restrict__`` / ``const``: no equivalent (Numba marks no kernel pointer noalias); loads are plain ld.global.

Work and bytes per image as step_bwd.cu (149,400 MACs; 11,976 B read, + w3 9,600 B per block; 10,496 B written
per block). Its time estimate (shared-memory bound, ~6 us an image per SM at 2 blocks an SM) is the CUDA C's
ESTIMATE, not a measurement of this kernel; what occupancy the Numba kernel reaches depends on its registers
(measured with compile_ptx + ptxas -v of CUDA 12.9, launch bounds (256,): 128 registers on sm_90, as step_bwd.cu's,
so 2 blocks of 256 threads an SM (step_groups' plan); 109 on sm_80; no spill, no stack; 32,048 B static shared
memory; tests/test_numba_step_bwd.py prints them and bounds them at 128). step_bwd_v2 at launch bounds (256, 3):
80 registers on sm_90 (step_bwd.cu's v2: 80), 79 on sm_80, no spill, no stack, so 3 blocks an SM fit (the
test bounds it at 80); without launch bounds 96 registers; at (256,) or (256, 4) ptxas takes 64 registers and
spills 16 B on sm_80 (none on sm_90). step_bwd.cu's v2 estimate (ESTIMATED, NOT MEASURED: C3's weight gradient
1.2 shared loads a MAC instead of 3, ~0.13-0.15 ms at batch 4096 against v1's ~0.18-0.20) is likewise the CUDA
C's, not this kernel's.

``step_bwd(be, ...)`` is the launch wrapper with the protocol's signature (first parameter the backend), bound
as a method by NumbaBackend; ``step_groups(batch, sm_count)`` is the group plan (CupyBackend.step_groups').
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import cuda, float32, uint8, uint32

from ..base import ACT_CODES, check_act
from .common import U0, U1, ZERO, U, act_grad, ceil_div, device_function
from .head import _check, launch_kernel

THREADS = 256  # step_bwd.cu's SB_THREADS
# LeNet-5 geometry (compile time)
K3 = 16  # C3 filters
C3 = 6  # C3 input channels = C1 filters
R = 5  # filter rows = columns (both layers)
XH = 32  # x rows = columns
XS = 37  # x row stride in shared memory (bank-conflict-free C1 taps)
P1 = 14  # p1 rows = columns (S2)
P3 = 5  # p3 / gz3 rows = columns (S4)
# flat parameter layout offsets (spec.param_layout; reference.STEP_BWD_OFFSETS)
OFF_W1 = 0
OFF_B1 = 160
OFF_W3 = 192
OFF_B3 = 2592
PREFIX = 2624

RS = R * R  # 25 taps
P1HW = P1 * P1  # 196 windows of C1 / positions of S2
P3HW = P3 * P3  # 25 windows of C3
W3 = K3 * C3 * RS  # 2400
W1 = C3 * RS  # 150
G3 = K3 * P3HW  # 400
G1 = C3 * P1HW  # 1176
XBUF = XH * XS  # 1184: x staged with padded rows
U3 = (W3 + THREADS - 1) // THREADS  # 10 dw3 registers per thread
assert U3 == 10, "step_bwd_v1 writes its 10 dw3 chains out (phase A.1)"
LAST3 = W3 - THREADS * (U3 - 1)  # 96: the threads that own a 10th dw3 weight
# padding columns: [150,160) 10, [166,192) 26, [2608,2624) 16
PA = OFF_B1 - W1
PB = OFF_W3 - OFF_B1 - C3
PC = PREFIX - OFF_B3 - K3
assert THREADS >= P1HW and THREADS >= W1 + C3, "step_bwd: one thread per S2 position / C1 output"
assert THREADS >= PA + PB + PC, "step_bwd: one thread per padding column"
V2_PER_K = W1 // U3  # v2: 15 threads a filter, 10 weights each (step_bwd.cu's SB_V2_PER_K)
V2_THREADS = K3 * V2_PER_K  # 240: the threads that own dw3 weights in v2
assert V2_PER_K * U3 == W1 and V2_THREADS <= THREADS, "step_bwd v2: 15 x 10 weights a filter"
#: launch bounds: 256 threads a block (step_bwd.cu's __launch_bounds__(SB_THREADS)); v2 at 3 blocks an SM
#: (step_bwd.cu's __launch_bounds__(SB_THREADS, 3))
LAUNCH_BOUNDS = {"step_bwd_v1": (THREADS,), "step_bwd_v2": (THREADS, 3)}


def _jit(name: str) -> Any:
    """cuda.jit with the kernel's launch bounds (the simulator's cuda.jit takes none)."""
    return cuda.jit if numba.config.ENABLE_CUDASIM else cuda.jit(launch_bounds=LAUNCH_BOUNDS[name])


@device_function
def _chain3(s_gz3, s_p1, s_off3, row, tap):
    """One dw3 weight's sum over an image's 25 windows in order: gz3[k, w] * p1[c, routed tap of w + (r, s)], with
    row = k*25 and tap = c*196 + r*14 + s (uint32). The window index is an int64 sum (row zero-extended plus the
    unrolled constant w): the loads of gz3 and of the route offsets take immediate offsets."""
    a = ZERO
    for w in range(P3HW):
        g = row + w
        a = cuda.fma(s_gz3[g], s_p1[U(tap + s_off3[g])], a)
    return a


@device_function
def _filter3(s_gz3, s_p1, s_off3, row, p1tap, acc3):
    """v2's phase A.1: one filter's 10 dw3 weights (row = k*25; p1tap[u] = c*196 + r*14 + s of weight u) over an
    image's 25 windows in order: a window's gz3 and route are loaded once for its 10 FMAs. Each weight's sum is
    _chain3's (windows in order from 0, then added to acc3[u]): the same bits as v1."""
    a = cuda.local.array(U3, float32)
    for u in range(U3):
        a[u] = ZERO
    g = row
    while g < U(row + U(P3HW)):  # a uint32 counter (a range() keeps an int64 one, with selects; see the header)
        gz = s_gz3[g]
        off = s_off3[g]
        for u in range(U3):
            a[u] = cuda.fma(gz, s_p1[U(p1tap[u] + off)], a[u])
        g = U(g + U1)
    for u in range(U3):
        acc3[u] += a[u]


@device_function
def _w3_index(tid, u, v2):
    """Thread tid's u-th dw3 weight (flat (k, c, r, s) index; step_bwd.cu's sb_w3_index): v1 tid + 256u; v2
    k*150 + l + 15u for tid = 15k + l (>= 2400 for tid >= 240, which own none)."""
    if v2:
        k = U(tid // U(V2_PER_K))
        return U(k * U(W1 - V2_PER_K) + tid + U(V2_PER_K * u))  # k*150 + (tid - 15k) + 15u
    return U(tid + U(THREADS * u))


def _body(x, p1, gz3, m3, m1, w3, gpart, nb, chunk, ngroups, act, v2):
    """step_bwd_v1 (v2 False) and step_bwd_v2 (v2 True), as step_bwd.cu's step_bwd_body<V2>: each kernel calls it
    with a constant v2, which Numba types as a literal: one body compiled for each, the other's branches pruned
    (then inlined by NVVM: a device_function outside the simulator, the plain function in it)."""
    # every array flat; every index uint32 (common.U); stride loops are while loops (a range() with a run-time
    # step computes its trip count with a 64-bit division)
    s_w3 = cuda.shared.array(W3, float32)
    s_x = cuda.shared.array(XBUF, float32)
    s_p1 = cuda.shared.array(G1, float32)
    s_gz3 = cuda.shared.array(G3, float32)
    s_off3 = cuda.shared.array(G3, uint32)  # routed C3 output's offset inside a p1 plane: (2i + a/2)*14 + 2j + a%2
    s_m3 = cuda.shared.array(G3, uint8)
    s_gz1 = cuda.shared.array(G1, float32)
    s_off1 = cuda.shared.array(G1, uint32)  # routed C1 output's offset inside s_x: (2i + a/2)*XS + 2j + a%2
    g3row = cuda.local.array(U3, uint32)  # registers (every index is a constant once unrolled)
    p1tap = cuda.local.array(U3, uint32)
    acc3 = cuda.local.array(U3, float32)
    g1 = cuda.local.array(C3, float32)

    tid = U(cuda.threadIdx.x)
    nbu = U(nb)
    uchunk = U(chunk)
    ng = U(ngroups)

    e = tid
    while e < U(W3):
        s_w3[e] = w3[e]
        e = U(e + U(THREADS))

    # this thread's dw3 weights: o = tid + 256u (v2: k*150 + l + 15u) -> (k, c, r, s); gz3 row k*25, p1 tap
    # c*196 + r*14 + s
    for u in range(U3):
        o = U(min(_w3_index(tid, u, v2), U(W3 - 1)))
        k = U(o // U(C3 * RS))
        t = U(o - k * U(C3 * RS))
        c = U(t // U(RS))
        rs = U(t - c * U(RS))
        r = U(rs // U(R))
        g3row[u] = U(k * U(P3HW))
        p1tap[u] = U(c * U(P1HW) + r * U(P1) + rs - r * U(R))
    has_last = tid < U(LAST3)
    # C1: tid < 150 owns dw1[tid] = (k, r, s); 150 <= tid < 156 owns db1[tid - 150]
    k1 = U(tid // U(RS)) if tid < U(W1) else U(min(U(tid - U(W1)), U(C3 - 1)))
    rs1 = U(tid - U(tid // U(RS)) * U(RS))
    r1 = U(rs1 // U(R))
    x1tap = U(r1 * U(XS) + rs1 - r1 * U(R))
    g1row = U(k1 * U(P1HW))
    # dgrad: tid < 196 is S2 position (h, v); the pooled C3 windows whose 2x2 taps its filters can reach:
    # i from floor((h - R + 1) / 2) (>= 0) to min(P3 - 1, h / 2), likewise j
    h = U(tid // U(P1))
    v = U(tid - h * U(P1))
    i0 = U(U(h - U(R - 1)) >> U1) if h >= U(R - 1) else U0
    i1 = U(min(U(P3 - 1), U(h >> U1)))
    j0 = U(U(v - U(R - 1)) >> U1) if v >= U(R - 1) else U0
    j1 = U(min(U(P3 - 1), U(v >> U1)))

    grp = U(cuda.blockIdx.x)
    while grp < ng:  # block-uniform; at the backend's grid (S blocks) one group a block
        for u in range(U3):
            acc3[u] = ZERO
        accb3 = ZERO  # db3[tid] (tid < 16)
        acc1 = ZERO  # dw1[tid] (tid < 150) or db1[tid - 150] (tid < 156)
        n0 = U(min(nbu, U(grp * uchunk)))
        n1 = U(min(nbu, U(n0 + uchunk)))
        n = n0
        while n < n1:
            cuda.syncthreads()  # the previous image's shared data is consumed (and s_w3 is staged)
            xb = U(n * U(XH * XH))
            e = tid
            while e < U(XH * XH):
                row = U(e // U(XH))
                s_x[U(row * U(XS) + e - row * U(XH))] = x[U(xb + e)]
                e = U(e + U(THREADS))
            pb = U(n * U(G1))
            e = tid
            while e < U(G1):
                s_p1[e] = p1[U(pb + e)]
                a = U(m1[U(pb + e)])
                cpl = U(e // U(P1HW))
                ij = U(e - cpl * U(P1HW))
                i = U(ij // U(P1))
                j = U(ij - i * U(P1))
                s_off1[e] = U(U(i + i + (a >> U1)) * U(XS) + j + j + (a & U1))
                e = U(e + U(THREADS))
            gb = U(n * U(G3))
            e = tid
            while e < U(G3):
                a = U(m3[U(gb + e)])
                kk = U(e // U(P3HW))
                ij = U(e - kk * U(P3HW))
                i = U(ij // U(P3))
                j = U(ij - i * U(P3))
                s_gz3[e] = gz3[U(gb + e)]
                s_m3[e] = m3[U(gb + e)]
                s_off3[e] = U(U(i + i + (a >> U1)) * U(P1) + j + j + (a & U1))
                e = U(e + U(THREADS))
            cuda.syncthreads()

            # phase A.1: C3's weight gradient, windows in order (this image's sum, then added to the group's)
            if v2:  # one filter's 10 weights: a window's gz3 and route loaded once for them
                if tid < U(V2_THREADS):
                    _filter3(s_gz3, s_p1, s_off3, g3row[0], p1tap, acc3)
            else:  # the 10 chains written out: Numba cannot force an unroll, see the header
                acc3[0] += _chain3(s_gz3, s_p1, s_off3, g3row[0], p1tap[0])
                acc3[1] += _chain3(s_gz3, s_p1, s_off3, g3row[1], p1tap[1])
                acc3[2] += _chain3(s_gz3, s_p1, s_off3, g3row[2], p1tap[2])
                acc3[3] += _chain3(s_gz3, s_p1, s_off3, g3row[3], p1tap[3])
                acc3[4] += _chain3(s_gz3, s_p1, s_off3, g3row[4], p1tap[4])
                acc3[5] += _chain3(s_gz3, s_p1, s_off3, g3row[5], p1tap[5])
                acc3[6] += _chain3(s_gz3, s_p1, s_off3, g3row[6], p1tap[6])
                acc3[7] += _chain3(s_gz3, s_p1, s_off3, g3row[7], p1tap[7])
                acc3[8] += _chain3(s_gz3, s_p1, s_off3, g3row[8], p1tap[8])
                if has_last:
                    acc3[9] += _chain3(s_gz3, s_p1, s_off3, g3row[9], p1tap[9])
            if tid < U(K3):
                a3 = ZERO
                w = U0
                while w < U(P3HW):
                    a3 += s_gz3[U(tid * U(P3HW) + w)]
                    w = U(w + U1)
                accb3 += a3
            # phase A.2: gz1 = C3's routed data gradient * act'(p1), at S2 position (h, v), all 6 channels
            if tid < U(P1HW):
                for c in range(C3):
                    g1[c] = ZERO
                k = U0
                while k < U(K3):
                    i = i0
                    while i <= i1:  # the <= 3 x 3 windows in order (i1 - i0 <= 2, likewise j)
                        j = j0
                        while j <= j1:
                            eg = U(k * U(P3HW) + i * U(P3) + j)
                            a = U(s_m3[eg])
                            tr = U(i + i + (a >> U1))  # the routed tap's row and column in S2
                            tc = U(j + j + (a & U1))
                            if tr <= h and tc <= v:
                                r = U(h - tr)
                                s = U(v - tc)
                                if r < U(R) and s < U(R):  # the route lies under the filter
                                    gg = s_gz3[eg]
                                    wo = U(k * U(C3 * RS) + r * U(R) + s)
                                    for c in range(C3):  # wo + c*25 in int64: immediate offsets (header)
                                        g1[c] = cuda.fma(gg, s_w3[wo + c * RS], g1[c])
                            j = U(j + U1)
                        i = U(i + U1)
                    k = U(k + U1)
                for c in range(C3):
                    q = U(U(c * P1HW) + tid)
                    s_gz1[q] = g1[c] * act_grad(s_p1[q], act)
            cuda.syncthreads()

            # phase B: C1's weight / bias gradient from gz1, windows (i, j) of filter k1 in order
            if tid < U(W1):
                a1 = ZERO
                q = g1row
                while q < U(g1row + U(P1HW)):
                    a1 = cuda.fma(s_gz1[q], s_x[U(s_off1[q] + x1tap)], a1)
                    q = U(q + U1)
                acc1 += a1
            elif tid < U(W1 + C3):
                a1 = ZERO
                q = g1row
                while q < U(g1row + U(P1HW)):
                    a1 += s_gz1[q]
                    q = U(q + U1)
                acc1 += a1
            n = U(n + U1)

        # the group's row: every column written once (padding 0)
        rb = U(grp * U(PREFIX))
        for u in range(U3):
            o = _w3_index(tid, u, v2)
            if o < U(W3):  # v2: false for every u of threads 240..255 (o >= 2400)
                gpart[U(rb + U(OFF_W3) + o)] = acc3[u]
        if tid < U(K3):
            gpart[U(rb + U(OFF_B3) + tid)] = accb3
        if tid < U(W1):
            gpart[U(rb + U(OFF_W1) + tid)] = acc1
        elif tid < U(W1 + C3):
            gpart[U(rb + U(OFF_B1 - W1) + tid)] = acc1
        if tid < U(PA):
            gpart[U(rb + U(W1) + tid)] = ZERO
        elif tid < U(PA + PB):
            gpart[U(rb + U(OFF_B1 + C3 - PA) + tid)] = ZERO
        elif tid < U(PA + PB + PC):
            gpart[U(rb + U(OFF_B3 + K3 - PA - PB) + tid)] = ZERO
        grp = U(grp + U(cuda.gridDim.x))


if numba.config.ENABLE_CUDASIM:
    # the simulator calls a device function through a context manager that rescans the module's globals (common.py):
    # the plain functions do the same arithmetic (cuda.fma and cuda.shared are the simulator's while a kernel runs)
    _chain3 = _chain3.py_func  # noqa: F811
    _filter3 = _filter3.py_func  # noqa: F811
    _w3_index = _w3_index.py_func  # noqa: F811
else:
    _body = device_function(_body)


@_jit("step_bwd_v1")
def step_bwd_v1(x, p1, gz3, m3, m1, w3, gpart, nb, chunk, ngroups, act):
    _body(x, p1, gz3, m3, m1, w3, gpart, nb, chunk, ngroups, act, False)


@_jit("step_bwd_v2")
def step_bwd_v2(x, p1, gz3, m3, m1, w3, gpart, nb, chunk, ngroups, act):
    _body(x, p1, gz3, m3, m1, w3, gpart, nb, chunk, ngroups, act, True)


# ------------------------------------------------------------------------------------ variant table

_F = "float32[::1]"
_SIG = f"void({_F}, {_F}, {_F}, uint8[::1], uint8[::1], {_F}, {_F}, int32, int32, int32, int32)"
SIGNATURES = {"step_bwd_v1": _SIG, "step_bwd_v2": _SIG}
KERNELS = {"step_bwd_v1": step_bwd_v1, "step_bwd_v2": step_bwd_v2}
VARIANTS = {"step_bwd": ("v1", "v2")}
DEFAULT_VARIANTS = {"step_bwd": "v2"}


# ------------------------------------------------------------------------------------------ launch wrappers


def step_groups(batch: int, sm_count: int) -> int:
    """The rows S of step_bwd's partials at ``batch`` on ``sm_count`` SMs (CupyBackend.step_groups' plan): a block
    per group, up to 2 blocks an SM, one image each: S = batch for batch <= 2 * sm_count; beyond, groups of
    ceil(batch / (2 * sm_count)) images, S = ceil(batch / chunk) <= 2 * sm_count (one wave; no empty group).
    Always 1 <= S <= batch."""
    batch = int(batch)
    if batch < 1:
        raise ValueError(f"step_groups: batch must be >= 1 (got {batch})")
    chunk = ceil_div(batch, 2 * int(sm_count))
    return ceil_div(batch, chunk)


def step_bwd(be: Any, x: Any, p1: Any, gz3: Any, m3: Any, m1: Any, w3: Any, gpart: Any, act: str,
             variant: str | None = None) -> None:
    """The conv backward of the four-kernel step (docs/step4.md, reference.step_bwd) in one launch of step_bwd_v1 or
    step_bwd_v2 (``variant``; by default the backend's, v2; both write the same bits): a block per image group
    (gpart's S rows; chunk = ceil(B / S), empty groups give zero rows) writes its row of C1's and C3's weight and
    bias gradients at their flat-layout offsets (padding 0). x (B,1,32,32), p1
    (B,6,14,14), gz3 (B,16,5,5) float32; m3 (B,16,5,5), m1 (B,6,14,14) uint8; w3 (16,6,5,5); gpart
    (S, conv_prefix) float32. LeNet-5's geometry is compiled in."""
    op = "step_bwd"
    v = variant or getattr(be, "default_variants", {}).get(op) or DEFAULT_VARIANTS[op]
    if v not in VARIANTS[op]:
        raise ValueError(f"{op}: unknown variant {v!r}; choose one of {', '.join(VARIANTS[op])}")
    check_act(act)
    if x is None or gpart is None or len(x.shape) != 4 or len(gpart.shape) != 2:
        raise ValueError(f"{op}: x must be (B,1,32,32) and gpart (S, {PREFIX})")
    b, s = int(x.shape[0]), int(gpart.shape[0])
    if tuple(x.shape[1:]) != (1, XH, XH) or b < 1:
        raise ValueError(f"{op}: x must be (B,1,32,32) with B >= 1 (LeNet-5's C1 input); got {tuple(x.shape)}")
    if gpart.shape[1] != PREFIX or s < 1:
        raise ValueError(f"{op}: gpart must be (S, {PREFIX}) with S >= 1 (the flat layout's conv prefix); "
                         f"got {tuple(gpart.shape)}")
    for name, a, shape, dtype in (
        ("x", x, (b, 1, XH, XH), np.float32), ("p1", p1, (b, C3, P1, P1), np.float32),
        ("gz3", gz3, (b, K3, P3, P3), np.float32), ("m3", m3, (b, K3, P3, P3), np.uint8),
        ("m1", m1, (b, C3, P1, P1), np.uint8), ("w3", w3, (K3, C3, R, R), np.float32),
        ("gpart", gpart, (s, PREFIX), np.float32),
    ):
        _check(a, name, shape, dtype)
    if x.size >= 2**31 or gpart.size >= 2**31:
        raise ValueError(f"{op}: an array has 2³¹ elements or more (the kernel's offsets are uint32 < 2³¹)")
    chunk = ceil_div(b, s)  # on the host: the kernel divides by no run-time value

    def flat(a: Any) -> Any:
        return a.reshape(a.size)

    launch_kernel(be, f"{op}_{v}", KERNELS[f"{op}_{v}"], s, THREADS, 0, flat(x), flat(p1), flat(gz3), flat(m3),
                  flat(m1), flat(w3), flat(gpart), np.int32(b), np.int32(chunk), np.int32(s),
                  np.int32(ACT_CODES[act]))
