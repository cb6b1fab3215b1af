"""lenet_fwd: the whole LeNet-5 forward pass in one launch, uint8 images → logits (the Numba face of
kernels/lenet_fwd.cu: v1 its v1, v2 its v3's plan without the float32 input and the fused argmax, v3 its v3, v4 its
v4);
and lenet_eval, evaluation's device reduction over the logits (lenet_fwd.cu's lenet_eval_v1).

  x = pad2(image)·scale + shift (1,32,32), scale = 1/(255·std), shift = −mean/std (as batch_prepare)
  S2 = pool(act(C1(x))) (6,14,14); S4 = pool(act(C3(S2))) (16,5,5); h1 = act(C5·S4) (H1); h2 = act(F6·h1) (H2);
  logits = out·h2 (NC)
images (N,28,28) uint8; c1.w (6,1,5,5), c3.w (16,6,5,5), c5.w (H1,400), f6.w (H2,H1), out.w (NC,H2); logits (N,NC).

Versions:
- lenet_fwd_v1: a block owns a tile of ``imgs`` images (tiles block-stride over the grid) and runs every stage
  for them, one thread per output of each stage (a pooled output computes its 2×2 conv outputs). C1's and C3's
  weights and every intermediate live in dynamic shared memory: per image a region X (the padded input, then S4
  and h1) and a region Y (S2, then h2); C5's, F6's and the output's weights are read from global memory (cached).
  Every index and size is uint32 (common.U) and the stride loops are while loops: no 64-bit division, no
  wraparound selects (sm_90 without launch bounds: 156 → 71 registers, 15 → 0 div.s64).

- lenet_fwd_v2: lenet_fwd.cu's v3 plan (cupy_backend/fused.py lenet_fwd_plan) with v2's register
  blocking, 224 threads. Images a block by batch size (plan_v2): 1 while N ≤ 2·SMs (a small batch spreads over
  the GPU), 2 up to 4·SMs, else 4. C1: a thread per (image, pooled pixel) × all 6 filters (24 accumulators; the
  6 weights of a tap adjacent in shared memory, each input load feeding 6-12 FMAs); C3: a thread per (image,
  pooled pixel, 4 filters) (16 accumulators: lenet_fwd.cu's LF_KB3 default; with 8: 80 registers, 8 bytes
  spilled under the launch bounds); both slide a 2-row window of the input; C3's weights staged with coalesced
  reads. The dense stages: one warp per F = 8/imgs outputs with the tile's images as rows (coalesced weight rows,
  each weight feeding imgs FMAs, the k loop unrolled 4 deep), 8 partial sums a lane reduced by a
  transpose-butterfly of 9 shuffles (rows_gemv.cuh; the simulator, which has no shuffles, exchanges through
  shared memory).
  The tile size and F are compile-time constants (closures: one specialised body per tile size, chosen by a
  launch-uniform branch). The convolutions add in v1's order (bias, then c, r, s): S2 and S4 equal v1's; the
  dense sums add in another order (logits within float32 rounding of v1's). uint8 images and logits only
  (v3 adds float32 input and the fused argmax). ptxas: sm_90 72 registers with or without the launch
  bounds, sm_80 64 (70 under them); no spills, no local memory, no float64, no 64-bit or signed division.
  compile_ptx takes ~7 s of CPU for v2 (v1 ~3 s; v3 ~2 s more once v2's device functions are compiled; 2026-12-07,
  the AVX2-only machine). v2's and
  v3's body is written once, as three device functions both kernels call in their tile loop (_setup_v2, _convs_v2,
  _dense_layers). Device functions are compiled once each and inlined by NVVM (common.device_function): when Numba
  inlined them (``inline="always"``) it deep-copied a callee's IR into every call site, and compile_ptx took
  33-36 s a specialisation, for the same instructions.

- lenet_fwd_v3 (the default): v2 (the same plan, launch bounds, device functions and sum orders) with what
  lenet_fwd.cu's v3 adds over its v2: float32 input already normalised (the border −mean/std: ``pad``; scale 1 and
  shift 0, exact) beside uint8 pixels, and the argmax fused: with ``classes`` (N,) int64 the output layer also writes
  its logits to shared memory (X[0, NC), S4's place, free after C5) and one thread per image writes the first maximal
  class (as np.argmax, a NaN wins); ``logits`` may be None (none written). Where Numba cannot do what CUDA C does:
  - no ``void*`` with a run-time dtype switch: uint8 and float32 images are two specialisations of one dispatcher
    (Numba types the argument; compile_ptx builds each: SIGNATURES "lenet_fwd_v3", REPORT_SIGNATURES
    "lenet_fwd_f32_v3"; the on-disk kernel cache keys them by signature);
  - no null pointer argument: an absent output is a zero-size array (``_absent``: Numba passes a null pointer and
    allocates nothing) and the launch-uniform ``outs`` (OUT_GLOBAL | OUT_SHARED) says what is written. The outputs are
    run-time switches, not compile-time ones (closures of a kernel factory would share one on-disk cache entry per
    signature: the factory's kernels have one source line and one signature), tested in the output layer's epilogue (a
    lane's one store) and once a tile for the argmax: with uint8 images and logits, v3's logits are v2's bit for bit
    (tests/test_numba_lenet_fwd_v2.py); ptxas: 72 registers on sm_90 (v2 72) and on sm_80 under the launch bounds (v2
    70: both allow 4 blocks of 224 an SM), the float32 specialisation the same; no spills, no local memory, no
    float64, no 64-bit or signed division (v2 passes the constant OUT_GLOBAL: its switches fold away);
  - as in v2: no float4/float2 vector loads of shared memory: since 2026-12-07 the convolutions (_convs, every
    version from v2) read a window row (6 floats) and a tap's weights (C1 6, C3 4) as 64-bit loads of the dynamic
    shared memory viewed as int64 (ld_pair: ld.shared.u64, the halves reinterpreted), where lenet_fwd.cu uses float2 /
    float4 loads. A thread's window loads: C1 36 → 18, C3 216 → 108; C3's weights 600 → 300 (C1's constant-offset
    weights ptxas had already merged into 128/64-bit loads). v3 on sm_90 (nvdisasm of ptxas's code): 32-bit LDS 46
    → 22, LDS.64 6 → 18, LDS.128 12 → 12 in the code, 3,160 → 3,104 instructions. The same values, so the same
    bits; 72 registers still, no spills (the simulator views its bytes as float32 instead); no warp shuffles in the
    simulator (shared-memory stand-ins), no ``__ldg``/``__restrict__`` (the dense weights are read through the
    ordinary path).
- lenet_fwd_v4 (large batches; v3's plan, the default, runs it): lenet_fwd.cu's v4. A block holds NI = 8 or 16
  images (``imgs``) and runs the convolutions LF4_G = 2 images at a time through v3's exact conv code (``_convs``,
  the body of v2/v3's ``_convs_v2``, which now takes the images' first index and count and where S4 goes: image m's
  at s4b + m·s4s); S4 of image g + m goes to a rows region [NI][SR], SR = round4(max(400, NC)); the next group's
  staging overlaps C3 (it writes X only). Then the dense stages once over all NI rows (h1 and h2 in the conv
  scratch, free by then), then the output layer (logits global and/or into the rows region for the fused argmax, one
  thread per image). Shared memory (floats): the C1/C3 weights (2624) | scratch max(2·2200, NI·(round4(H1) +
  round4(H2))) | rows NI·SR: 53,696 B at LeNet-5 sizes and 16 images, past the 48 KiB a block gets by default.
  Plan (``plan_v4``, cupy's fused.lenet_fwd_plan exactly): v3 takes v4 where ⌈N/NI⌉ ≥ 3·SMs for NI = 16 or 8 (132 SMs:
  16 from 6,321, 8 from 3,161) and its shared memory fits LF4_SMEM_MAX (99 KiB), else v3's tiles; "v4" by name runs
  it at every batch (8 images below v3's threshold), v3's tiles where its rows do not fit (F6 ≳ 2,400). Same
  arguments as v3 but (imgs, scratch, sr) for (imgs, xr, yr).
  The dense stage (``_make_dense_v4``): a lane holds 16 partial sums in two groups of 8: at 8 rows a warp takes
  F = 2 outputs (a group each), at 16 rows F = 1 (rows 0-7, 8-15): each weight load feeds 16 FMAs (CUDA C's
  rows_gemv<NI, 32/NI> feeds NI, with 32 sums a lane and a 5-level transpose); each group is reduced by v3's
  ``_transpose_sum8``. So v4 gives v3's bits exactly: every output is the same chain per lane over k = lane,
  lane + 32, ... from 0, then the butterfly over lane bits 16, 8, 4, 2, 1 (float adds commute: how many rows or
  outputs a warp holds does not change a sum), + bias, then the activation; the convolutions are v3's code
  (tests/test_numba_lenet_fwd_v4.py: bit for bit with v3 under the simulator, uint8 and float32 images). k loop
  not unrolled (UNROLL4 = 1, as lenet_fwd.cu's LF4_U). Where Numba cannot do what CUDA C does:
  - the opt-in past 48 KiB: numba-cuda 0.30.4 has no API for cudaFuncAttributeMaxDynamicSharedMemorySize;
    ``allow_shared`` sets CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES on the compiled overload's cufunc with
    numba's ``driver.cuKernelSetAttribute`` (the pattern of CudaPythonFunction.set_shared_memory_carveout), once
    per specialisation before its first launch past 48 KiB (NumbaBackend._launch, head.launch_kernel); recorded
    launches and graphs reuse the cufunc, so the attribute holds for them. Under the simulator it is a no-op (the
    simulator has no such limit). Not yet run on a GPU (no device in the session that wrote it, 2026-12-07).
    Since the path is numba-cuda's internals, ``lenet_fwd`` tries the opt-in itself (``_opt_in``) and, where it
    fails, warns once and plans within 48 KiB (``plan_within_default_shared``: v4 at 8 images a block, the same
    bits) instead of failing the inference; the GPU test asserts that it did not fail;
  - the rest as v3 (two specialisations by image dtype, ``_absent`` outputs and ``outs``, no float4 loads, the
    simulator's shuffle stand-in: the dense rounds are block-uniform).
  ptxas (compile_ptx, launch bounds (224, 4), 2026-12-07): 72 registers on sm_80 and sm_90, uint8 and float32
  images alike; no spills, no local memory, no float64, no 64-bit or signed division. v2's and v3's registers are
  unchanged by the refactor of their conv stage (sm_80 71, sm_90 72).
- lenet_eval_v1: out (2,) float64 = [Σ softmax cross-entropy, correct count] of logits (N,NC) and uint8 labels:
  one block of 256 threads, thread t takes rows t, t + 256, ... in turn, then a fixed tree over the threads
  (double accumulation; float64 by contract, its only float64 kernel here), no launch bounds (lenet_fwd.cu's:
  with them ptxas spilled the double exp/log temporaries there). An evaluation: one lenet_fwd launch, one
  lenet_eval launch, one 16-byte copy back.

Cost of one image (LeNet-5: H1 120, H2 84, NC 10): 416,520 MACs (C1 117,600; C3 240,000; C5 48,000; F6 10,080;
output 840) = 0.83 MFLOP; 784 bytes in, 40 out; the dense weights (59,134 floats, 237 KB) read once a tile (from
L2, or L1 when the SM's other blocks just read them), C1's and C3's (10 KB) once a block.

ESTIMATED, NOT MEASURED (H200: 132 SMs, 1.98 GHz, 4 warp instructions a clock an SM):
- batch 10,000 (4 images a block, 2,500 blocks, 4 resident an SM: 4.7 waves). Issue slots: v2 issues ~1.35
  instructions an FMA in the convolutions (C1: 36 shared loads per 120 FMAs; C3: 26 per 80) and ~1.75 in the
  dense stages, at ~88% lane use (C1's 784 items take 4 rounds of 224; C3's 400, 2): ~23,000 warp instructions an
  image, 22 ns at the full issue rate; shared loads ~3,900 warp loads an image (15 ns at one a clock an SM); L2:
  59 KB of dense weights an image, 590 MB at 10,000 (~110 µs at ~5.5 TB/s, overlapped). So ~235 µs at full issue
  (with the waves' tail), ~400-500 µs at the 50-60% of peak such kernels reach: 20-25 M images/s, against v1's
  measured 3,240 µs (3.1 M/s; v1 issues 2 shared loads per MAC, 22,000 warp loads an image, and reads its dense
  weights uncoalesced, a row per thread).
- batch 64 (a block per image, 64 blocks: half of the SMs, one block each). Chain length: staging ~1 µs, C1 one
  round (~850 instructions a thread, 2 warps a scheduler: ~0.9 µs), C3 one round (6 × 536 instructions: ~2.5 µs),
  C5 3 rounds of 4 unrolled trips of L2 latency (~3.6 µs), F6 ~1.2 µs, output ~0.9 µs: ~10 µs plus the launch,
  against v1's measured 250 µs (16 blocks each running 4 images' stages one output a thread) and cupy v2's 55 µs.

``lenet_fwd(be, ...)`` is the launch wrapper with the protocol's signature (first parameter the backend).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numba
import numpy as np
from numba import cuda, float32, float64, int64

from ..base import ACT_CODES, POOL_CODES, check_act, check_lenet_eval_args, check_lenet_fwd_outputs, check_mode
from .common import POOL_MAX, U0, U1, U, activate, ceil_div, device_function, ld_pair
from .head import _check, launch_kernel

QUARTER = np.float32(0.25)
THREADS = 128  # threads per block
IMAGE, XS, PAD = 28, 32, 2  # input side, padded side
K1, RS, P2 = 6, 5, 14  # C1 filters, filter side, S2 side
K3, P4 = 16, 5  # C3 filters, S4 side
I5 = K3 * P4 * P4  # 400
S2 = K1 * P2 * P2  # 1176
WEIGHTS = 2576  # staged C1 + C3 weights and biases (150 + 6 + 2400 + 16, rounded up to a multiple of 4)
SMEM_LIMIT = 48 * 1024
MAX_IMGS = 4
#: launch bounds of lenet_fwd_v1: 128 threads, 4 blocks an SM (what 4 images' ~45 KiB of shared memory allow):
#: at most 128 registers (the uint32 kernel takes 71 without them; with int64 indices it took 156)
LAUNCH_BOUNDS = {"lenet_fwd_v1": (THREADS, 4)}


def regions(h1: int, h2: int) -> tuple[int, int]:
    """Floats of an image's regions X (input, then S4 and h1) and Y (S2, then h2), multiples of 4."""
    return ceil_div(max(XS * XS, I5 + h1), 4) * 4, ceil_div(max(S2, h2), 4) * 4


def plan(n: int, h1: int, h2: int) -> tuple[int, int, int]:
    """(blocks, images per block, dynamic shared bytes): 4 images a block, fewer where F6 is too wide for 48 KiB."""
    xr, yr = regions(h1, h2)
    imgs = MAX_IMGS
    while imgs > 1 and 4 * (WEIGHTS + imgs * (xr + yr)) > SMEM_LIMIT:
        imgs //= 2
    smem = 4 * (WEIGHTS + imgs * (xr + yr))
    if smem > SMEM_LIMIT:
        raise ValueError(f"lenet_fwd: one image needs {smem} bytes of shared memory (> {SMEM_LIMIT})")
    return ceil_div(n, imgs), imgs, smem


@device_function
def _pool(a, b, c, d, mode):
    if mode == POOL_MAX:
        return max(max(a, b), max(c, d))
    return (a + b + c + d) * QUARTER


@device_function
def _conv_pool(sm, xb, xh, xw, wb, bb, cin, k, ph, pw, act, mode):
    """The pooled output (ph, pw) of filter k: the four 5×5 convolutions of its window, each + bias and
    activated, then pooled. In shared memory: the input's channel c, row y at xb + (c·xh + y)·xw, the
    filter's weights at wb + ((k·cin + c)·RS + r)·RS + s, its bias at bb + k. Every offset uint32."""
    o0 = float32(0.0)
    o1 = float32(0.0)
    o2 = float32(0.0)
    o3 = float32(0.0)
    for q in range(4):
        oh = U(ph + ph + U(U(q) >> U1))  # 2·ph + q // 2
        owc = U(pw + pw + U(U(q) & U1))  # 2·pw + q % 2
        acc = sm[U(bb + k)]
        for c in range(cin):
            for r in range(RS):
                for s in range(RS):
                    wv = sm[U(wb + ((k * U(cin) + U(c)) * U(RS) + U(r)) * U(RS) + U(s))]
                    acc += sm[U(xb + (U(c) * U(xh) + oh + U(r)) * U(xw) + owc + U(s))] * wv
        v = activate(acc, act)
        if q == 0:
            o0 = v
        elif q == 1:
            o1 = v
        elif q == 2:
            o2 = v
        else:
            o3 = v
    return _pool(o0, o1, o2, o3, mode)


# (the simulator's cuda.jit takes no launch bounds)
@(cuda.jit if numba.config.ENABLE_CUDASIM else cuda.jit(launch_bounds=LAUNCH_BOUNDS["lenet_fwd_v1"]))
def lenet_fwd_v1(images, c1w, c1b, c3w, c3b, c5w, c5b, f6w, f6b, ow, ob, logits, act, mode, scale, shift, imgs,
                 xr, yr):
    # every index and size uint32 (common.U); thread- and block-stride loops are while loops (a range() with a
    # run-time step computes its trip count with a 64-bit division)
    sm = cuda.shared.array(0, float32)  # [w1 150][b1 6][w3 2400][b3 16] pad | image m: X at m*IS, Y at m*IS + xr
    nimg = U(images.shape[0])
    nh1, nh2, nc = U(c5w.shape[0]), U(f6w.shape[0]), U(ow.shape[0])
    uimgs, uxr = U(imgs), U(xr)
    isz = U(uxr + U(yr))
    tid, nt = U(cuda.threadIdx.x), U(cuda.blockDim.x)
    ob1, ow3, ob3 = U(K1 * 25), U(K1 * 25 + K1), U(K1 * 25 + K1 + K3 * K1 * 25)
    t = tid
    while t < U(K1 * 25):
        sm[t] = c1w[U(t // U(25)), 0, U(U(t // U(RS)) % U(RS)), U(t % U(RS))]
        t = U(t + nt)
    t = tid
    while t < U(K1):
        sm[U(ob1 + t)] = c1b[t]
        t = U(t + nt)
    t = tid
    while t < U(K3 * K1 * 25):
        sm[U(ow3 + t)] = c3w[U(t // U(150)), U(U(t // U(25)) % U(K1)), U(U(t // U(RS)) % U(RS)), U(t % U(RS))]
        t = U(t + nt)
    t = tid
    while t < U(K3):
        sm[U(ob3 + t)] = c3b[t]
        t = U(t + nt)
    ntiles = U(U(nimg + uimgs - U1) // uimgs)
    tile = U(cuda.blockIdx.x)
    while tile < ntiles:  # block-uniform
        n0 = U(tile * uimgs)
        ni = U(min(uimgs, U(nimg - n0)))
        cuda.syncthreads()  # the weights are staged; the previous tile is done with the image regions
        t = tid
        while t < U(uimgs * U(XS * XS)):  # the tile's images, padded and normalised (zeros past the batch)
            m = U(t // U(XS * XS))
            p = U(t - m * U(XS * XS))
            ph = U(p // U(XS))  # ih + PAD
            pw = U(p - ph * U(XS))  # iw + PAD
            pix = float32(0.0)
            if m < ni and ph >= U(PAD) and ph < U(IMAGE + PAD) and pw >= U(PAD) and pw < U(IMAGE + PAD):
                pix = float32(images[U(n0 + m), U(ph - U(PAD)), U(pw - U(PAD))])
            sm[U(U(WEIGHTS) + m * isz + p)] = pix * scale + shift
            t = U(t + nt)
        cuda.syncthreads()
        t = tid
        while t < U(uimgs * U(S2)):  # C1 + act + pool -> S2 (Y)
            m = U(t // U(S2))
            e = U(t - m * U(S2))
            k = U(e // U(P2 * P2))
            ph = U(U(e // U(P2)) % U(P2))
            pw = U(e % U(P2))
            xb = U(U(WEIGHTS) + m * isz)
            sm[U(xb + uxr + e)] = _conv_pool(sm, xb, 0, XS, U0, ob1, 1, k, ph, pw, act, mode)
            t = U(t + nt)
        cuda.syncthreads()
        t = tid
        while t < U(uimgs * U(I5)):  # C3 + act + pool -> S4 (X, [0, 400))
            m = U(t // U(I5))
            e = U(t - m * U(I5))
            k = U(e // U(P4 * P4))
            ph = U(U(e // U(P4)) % U(P4))
            pw = U(e % U(P4))
            xb = U(U(WEIGHTS) + m * isz)
            sm[U(xb + e)] = _conv_pool(sm, U(xb + uxr), P2, P2, ow3, ob3, K1, k, ph, pw, act, mode)
            t = U(t + nt)
        cuda.syncthreads()
        t = tid
        while t < U(uimgs * nh1):  # C5 -> h1 (X, [400, 400 + H1))
            m = U(t // nh1)
            o = U(t - m * nh1)
            base = U(U(WEIGHTS) + m * isz)
            acc = c5b[o]
            for i in range(I5):
                acc += c5w[o, U(i)] * sm[U(base + U(i))]
            sm[U(base + U(I5) + o)] = activate(acc, act)
            t = U(t + nt)
        cuda.syncthreads()
        t = tid
        while t < U(uimgs * nh2):  # F6 -> h2 (Y, [0, H2))
            m = U(t // nh2)
            j = U(t - m * nh2)
            base = U(U(WEIGHTS) + m * isz)
            acc = f6b[j]
            for o in range(nh1):
                acc += f6w[j, U(o)] * sm[U(base + U(I5) + U(o))]
            sm[U(base + uxr + j)] = activate(acc, act)
            t = U(t + nt)
        cuda.syncthreads()
        t = tid
        while t < U(ni * nc):  # output -> logits
            m = U(t // nc)
            c = U(t - m * nc)
            base = U(U(WEIGHTS) + m * isz + uxr)
            acc = ob[c]
            for j in range(nh2):
                acc += ow[c, U(j)] * sm[U(base + U(j))]
            logits[U(n0 + m), c] = acc
            t = U(t + nt)
        tile = U(tile + U(cuda.gridDim.x))


# ------------------------------------------------------------------------------------------ v2
THREADS_V2 = 224  # lenet_fwd.cu LF_THREADS_V2: a 4-image tile's 784 C1 items take 4 rounds, its 200 C3 items one
WEIGHTS_V2 = 2624  # [25 taps][8] + 8 + [6 channels][25 taps][16 filters] + 16 (lenet_fwd.cu LF_W_V2)
OW3_V2, OB3_V2 = 208, 2608  # offsets of C3's staged weights and biases
KB3 = 4  # C3 filters a thread (× a 2×2 window: 16 accumulators; lenet_fwd.cu LF_KB3, its default)
KG3 = K3 // KB3  # C3 filter groups
DF = 8  # dense stages: R·F partial sums a lane (R the tile's images, F = DF/R outputs a warp)
UNROLL = 4  # dense stages: the k loop's unroll
FULL = 0xFFFFFFFF  # a whole warp's shuffle mask
RS1 = RS + 1  # a window's input row: 2 outputs × 5 taps
OUT_GLOBAL, OUT_SHARED = 1, 2  # where the output layer writes (lenet_fwd_v3's ``outs``: the logits, the argmax)
#: launch bounds of lenet_fwd_v2: 224 threads, 4 blocks an SM (a 4-image tile's ~45 KiB of shared memory allows 4)
LAUNCH_BOUNDS["lenet_fwd_v2"] = (THREADS_V2, 4)
LAUNCH_BOUNDS["lenet_fwd_v3"] = (THREADS_V2, 4)  # v2's plan


def plan_v2(n: int, h1: int, h2: int, sms: int) -> tuple[int, int, int]:
    """(blocks, images per block, dynamic shared bytes) of lenet_fwd_v2, as lenet_fwd.cu's v3 plans
    (cupy_backend/fused.py lenet_fwd_imgs): a block per image while N ≤ 2·SMs (a small batch spreads over the
    GPU), 2 images up to 4·SMs, else 4 (the dense weights streamed once per 4 images); halved until 48 KiB fit."""
    xr, yr = regions(h1, h2)
    imgs = 1 if n <= 2 * sms else 2 if n <= 4 * sms else 4
    while imgs > 1 and 4 * (WEIGHTS_V2 + imgs * (xr + yr)) > SMEM_LIMIT:
        imgs //= 2
    smem = 4 * (WEIGHTS_V2 + imgs * (xr + yr))
    if smem > SMEM_LIMIT:
        raise ValueError(f"lenet_fwd: one image needs {smem} bytes of shared memory (> {SMEM_LIMIT})")
    return ceil_div(n, imgs), imgs, smem


def launch_shape(variant: str, n: int, h1: int, h2: int, sms: int, nc: int = 10) -> tuple[int, int, int]:
    """(grid blocks, threads a block, dynamic shared bytes) of lenet_fwd's launch with ``variant``
    (backend.lenet_launches; v3 and v4: plan_v4, whose kernel ``launch_kernel_name`` names)."""
    if variant == "v1":
        blocks, _, smem = plan(n, h1, h2)
        return blocks, THREADS, smem
    if variant in ("v3", "v4"):
        _, blocks, _, smem = plan_v4(variant, n, h1, h2, sms, nc)
        return blocks, THREADS_V2, smem
    blocks, _, smem = plan_v2(n, h1, h2, sms)
    return blocks, THREADS_V2, smem


def launch_kernel_name(variant: str, n: int, h1: int, h2: int, sms: int, nc: int = 10) -> str:
    """The kernel lenet_fwd launches with ``variant`` (v3's plan runs lenet_fwd_v4 at large batches, "v4" falls
    back to lenet_fwd_v3's tiles where its rows do not fit)."""
    if variant in ("v3", "v4"):
        return plan_v4(variant, n, h1, h2, sms, nc)[0]
    return f"lenet_fwd_{variant}"


if numba.config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def _shfl_xor(mask, v, off):
        """The simulator's stand-in for cuda.shfl_xor_sync (it has no warp shuffles): the value of thread
        (thread ^ off) through a shared array, between two barriers. So every thread of the block must call it
        the same number of times: the dense stages' rounds are block-uniform (on a GPU they need only be
        warp-uniform)."""
        buf = cuda.shared.array(THREADS_V2, float32)
        tid = cuda.threadIdx.x
        buf[tid] = v
        cuda.syncthreads()
        got = buf[tid ^ off]
        cuda.syncthreads()
        return got
else:
    _shfl_xor = cuda.shfl_xor_sync


@device_function
def _transpose_sum8(v, lane):
    """Warp-wide sums of the DF = 8 partial sums v[0..8) of every lane (rows_gemv.cuh's warp_transpose_sum<8>):
    returns, on lane l, the sum over the warp of value l // 4. Three transpose levels (keep half of the values,
    send the other half to lane ^ off, add what comes back), then a butterfly over the 4 lanes that share a value;
    a fixed tree (bit-for-bit repeatable), 7 + 2 shuffles."""
    up = (lane & U(16)) != U0
    for k in range(4):
        send = v[k] if up else v[k + 4]
        keep = v[k + 4] if up else v[k]
        v[k] = keep + _shfl_xor(FULL, send, 16)
    up = (lane & U(8)) != U0
    for k in range(2):
        send = v[k] if up else v[k + 2]
        keep = v[k + 2] if up else v[k]
        v[k] = keep + _shfl_xor(FULL, send, 8)
    up = (lane & U(4)) != U0
    send = v[0] if up else v[1]
    keep = v[1] if up else v[0]
    s = keep + _shfl_xor(FULL, send, 4)
    s += _shfl_xor(FULL, s, 2)
    s += _shfl_xor(FULL, s, 1)
    return s


@device_function
def _put_all(sm, base, plane, nk, a0, a1, a2, a3, act, mode):
    """The nk filters' pooled outputs of the window: filter k's at sm[base + k·plane], pool(act(a0[k]), act(a1[k]),
    act(a2[k]), act(a3[k])). The loop may stay rolled (its body is big), so it never indexes the accumulators by
    k (a run-time index would put them in local memory): it takes element 0 and shifts the arrays down by one
    (constant indices: they stay in registers, the shift is register moves)."""
    for k in range(nk):
        sm[U(base + U(k) * plane)] = _pool(activate(a0[0], act), activate(a1[0], act), activate(a2[0], act),
                                           activate(a3[0], act), mode)
        for j in range(nk - 1):
            a0[j] = a0[j + 1]
            a1[j] = a1[j + 1]
            a2[j] = a2[j + 1]
            a3[j] = a3[j + 1]


def _make_dense(R: int) -> Any:
    """The dense layer of lenet_fwd_v2 for a tile of R images (rows_gemv.cuh with F = DF/R, U = UNROLL):
    out[r][o] = act(b[o] + Σ_k in[r][k]·W[o][k]) for r < R, o < O; W (O,K) a flat global array. A warp takes F
    consecutive outputs a round; its lanes stride k (each weight load one coalesced row segment, feeding R FMAs);
    each lane ends with R·F = 8 partial sums v[r·F + f], reduced by _transpose_sum8. R and F are compile-time
    constants (closure variables), so every small loop unrolls and v, x stay in registers. The rounds are
    block-uniform (a warp past O skips the sums but reaches every shuffle: the simulator's stand-in barriers).
    in[r][k] = sm[ib + r·isz + k]; out: sm[ob + r·isz + o] (layers 0, 1: C5, F6) or g[(n0 + r)·O + o] for r < nr
    (layer 2: the logits; ``outs`` says where layer 2 writes: OUT_GLOBAL g, OUT_SHARED sm[ob + r·isz + o] as the
    other layers, or both; v2 passes the constant OUT_GLOBAL, which folds away). W and b are the layer's of
    (w0, w1, w2), (b0, b1, b2): one call site serves the three layers (every call site is a copy of the three
    bodies, and Numba's inlining is what makes compiling slow).
    """
    F = DF // R
    FB = F.bit_length() - 1  # log2 F

    @device_function
    def _k_step(sm, w0, w1, w2, layer, v, x, ib, isz, wrow, last, K, k):
        for r in range(R):
            x[r] = sm[U(ib + U(r) * isz + k)]
        for f in range(F):
            i = U(U(wrow + U(min(U(f), last)) * K) + k)
            wv = w0[i] if layer == U0 else (w1[i] if layer == U1 else w2[i])
            for r in range(R):
                v[r * F + f] += x[r] * wv

    @device_function
    def dense(sm, w0, w1, w2, b0, b1, b2, layer, g, O, K, ib, ob, isz, n0, nr, act, tid, nt, outs):
        lane = U(tid & U(31))
        warp = U(tid >> U(5))
        per = U(U(nt >> U(5)) * U(F))  # outputs a round
        rounds = U(U(O + per - U1) // per)
        v = cuda.local.array(DF, float32)
        x = cuda.local.array(DF, float32)  # x[r], r < R: the rows' input at k
        rd = U0
        while rd < rounds:  # block-uniform
            o0 = U(rd * per + warp * U(F))
            for j in range(DF):
                v[j] = float32(0.0)
            if o0 < O:
                last = U(O - U1 - o0)  # outputs past O re-read the last row (their sums are not written)
                wrow = U(o0 * K)
                k = lane
                while U(k + U(32 * (UNROLL - 1))) < K:  # UNROLL k steps a trip: their loads in flight together
                    for u in range(UNROLL):
                        _k_step(sm, w0, w1, w2, layer, v, x, ib, isz, wrow, last, K, U(k + U(32 * u)))
                    k = U(k + U(32 * UNROLL))
                while k < K:
                    _k_step(sm, w0, w1, w2, layer, v, x, ib, isz, wrow, last, K, k)
                    k = U(k + U(32))
            s = _transpose_sum8(v, lane)
            val = U(lane >> U(2))  # the value this lane holds: row val // F, output o0 + val % F
            r = U(val >> U(FB))
            o = U(o0 + U(val & U(F - 1)))
            if U(lane & U(3)) == U0 and o < O:
                bo = b0[o] if layer == U0 else (b1[o] if layer == U1 else b2[o])
                y = activate(s + bo, act)
                if layer < U(2):
                    sm[U(ob + r * isz + o)] = y
                else:  # the output layer (v2: OUT_GLOBAL, a constant: the branches fold to v2's own store)
                    if U(outs & U(OUT_SHARED)) != U0:
                        sm[U(ob + r * isz + o)] = y
                    if U(outs & U(OUT_GLOBAL)) != U0 and r < nr:
                        g[U(U(n0 + r) * O + o)] = y
            rd = U(rd + U1)

    return dense


_dense1, _dense2, _dense4 = _make_dense(1), _make_dense(2), _make_dense(4)


@device_function
def _dense_layers(sm, c5w, f6w, ow, c5b, f6b, ob, logits, n0, ni, nh1, nh2, unc, uxr, isz, act, tid, nt, uimgs, outs):
    """The tile's dense stages, its images as the rows (images past the batch compute on the padding, never
    written): C5 X[0, 400) -> X[400, 400 + H1), F6 -> Y[0, H2), the output -> logits (OUT_GLOBAL) and/or X[0, NC)
    (OUT_SHARED: S4's place, free after C5), each stage followed by a barrier. One call site of the dense layer in a
    loop over the layers, and in it one specialised body per tile size (uimgs 1, 2 or 4: uniform over the launch):
    every call site is a copy of the three bodies."""
    base = U(WEIGHTS_V2)
    for layer in range(3):
        if layer == 0:
            no, nk, ib, obase, lact = nh1, U(I5), base, U(base + U(I5)), act
        elif layer == 1:
            no, nk, ib, obase, lact = nh2, nh1, U(base + U(I5)), U(base + uxr), act
        else:
            no, nk, ib, obase, lact = unc, nh2, U(base + uxr), base, 0
        if uimgs == U1:
            _dense1(sm, c5w, f6w, ow, c5b, f6b, ob, U(layer), logits, no, nk, ib, obase, isz, n0, ni, lact, tid, nt,
                    outs)
        elif uimgs == U(2):
            _dense2(sm, c5w, f6w, ow, c5b, f6b, ob, U(layer), logits, no, nk, ib, obase, isz, n0, ni, lact, tid, nt,
                    outs)
        else:
            _dense4(sm, c5w, f6w, ow, c5b, f6b, ob, U(layer), logits, no, nk, ib, obase, isz, n0, ni, lact, tid, nt,
                    outs)
        cuda.syncthreads()


@device_function
def _setup_v2(c1w, c1b, c3w, c3b, n, imgs, xr, yr):
    """The start of lenet_fwd_v2 and _v3: stages C1's and C3's weights and biases in the block's dynamic shared
    memory and returns (sm, tid, nt, nimg, uimgs, uxr, isz, ntiles), every size uint32.
    sm: [w1 25 taps × 8][b1 8][w3 6 × 25 taps × 16][b3 16] | image m: X at W + m·IS, Y at W + m·IS + xr."""
    sm = cuda.shared.array(0, float32)
    nimg, uimgs, uxr = U(n), U(imgs), U(xr)
    isz = U(uxr + U(yr))
    tid, nt = U(cuda.threadIdx.x), U(cuda.blockDim.x)
    t = tid
    while t < U(25 * 8):  # C1 tap-major: a tap's 6 filter weights adjacent (a broadcast each)
        tap = U(t >> U(3))
        k = U(t & U(7))
        sm[t] = c1w[U(k * U(25) + tap)] if k < U(K1) else float32(0.0)
        t = U(t + nt)
    t = tid
    while t < U(8):
        sm[U(U(200) + t)] = c1b[t] if t < U(K1) else float32(0.0)
        t = U(t + nt)
    t = tid
    while t < U(K3 * K1 * 25):  # C3 read in its own order (coalesced), scattered to [c·25 + tap][k]
        k = U(t // U(K1 * 25))
        ct = U(t - k * U(K1 * 25))
        sm[U(U(OW3_V2) + ct * U(K3) + k)] = c3w[t]
        t = U(t + nt)
    t = tid
    while t < U(K3):
        sm[U(U(OB3_V2) + t)] = c3b[t]
        t = U(t + nt)
    return sm, tid, nt, nimg, uimgs, uxr, isz, U(U(nimg + uimgs - U1) // uimgs)


@device_function
def _convs_v2(sm, images, tile, nimg, uimgs, uxr, isz, act, mode, scale, shift, pad, tid, nt):
    """The convolution stages of tile ``tile``; returns (n0, ni), its first image and its image count. A barrier
    (the weights are staged; the previous tile is done with the image regions), ``_convs`` over the tile's images
    (S4 into X[0, 400) of each: base W, stride isz), a barrier."""
    n0 = U(tile * uimgs)
    ni = U(min(uimgs, U(nimg - n0)))
    cuda.syncthreads()  # the weights are staged; the previous tile is done with the image regions
    _convs(sm, images, n0, ni, uimgs, uxr, isz, U(WEIGHTS_V2), isz, act, mode, scale, shift, pad, tid, nt)
    cuda.syncthreads()
    return n0, ni


@device_function
def _convs(sm, images, n0, ni, uimgs, uxr, isz, s4b, s4s, act, mode, scale, shift, pad, tid, nt):
    """The convolutions of ``uimgs`` images from image n0 of the batch (ni of them real: the others compute on
    ``pad``), lenet_fwd.cu's lf_conv: the images padded and normalised into X of image region m (sm[W + m·isz]:
    pixel·scale + shift; the border and past the batch ``pad``, the normalised pixel 0), a barrier, C1 + act +
    pool -> S2 (Y: + uxr), a barrier, C3 + act + pool -> S4, image m's 400 floats at sm[s4b + m·s4s]. No barrier
    before the staging or after C3 (the callers': v2/v3 put one on each side; v4 stages its next group while C3
    runs, as C3 reads only Y)."""
    c0 = cuda.local.array(K1, float32)  # C1: the 2×2 window's four conv outputs × the 6 filters
    c1 = cuda.local.array(K1, float32)
    c2 = cuda.local.array(K1, float32)
    c3 = cuda.local.array(K1, float32)
    a0 = cuda.local.array(KB3, float32)  # C3: the window's four conv outputs × the thread's KB3 filters
    a1 = cuda.local.array(KB3, float32)
    a2 = cuda.local.array(KB3, float32)
    a3 = cuda.local.array(KB3, float32)
    ra = cuda.local.array(RS1, float32)  # two input rows of the window (6 wide: 2 outputs × 5 taps)
    rb = cuda.local.array(RS1, float32)
    wk = cuda.local.array(K1, float32)  # a tap's weights (C1: 6 filters, C3: KB3)
    sm64 = cuda.shared.array(0, int64)  # the same bytes as sm: its 64-bit loads (ld_pair)
    t = tid
    while t < U(uimgs * U(XS * XS)):  # the tile's images, padded and normalised (the border and past the
        m = U(t // U(XS * XS))  # batch: pad, the normalised pixel 0; uint8: pad = shift, as v1 writes it)
        p = U(t - m * U(XS * XS))
        ph = U(p >> U(5))  # ih + PAD
        pw = U(p & U(XS - 1))  # iw + PAD
        pix = pad
        if m < ni and ph >= U(PAD) and ph < U(IMAGE + PAD) and pw >= U(PAD) and pw < U(IMAGE + PAD):
            # uint8: the pixel · scale + shift; float32 already normalised: scale 1, shift 0 (exact)
            pix = float32(images[U(U(n0 + m) * U(IMAGE * IMAGE) + U(ph - U(PAD)) * U(IMAGE) + pw - U(PAD))]) \
                * scale + shift
        sm[U(U(WEIGHTS_V2) + m * isz + p)] = pix
        t = U(t + nt)
    cuda.syncthreads()
    # C1 + act + pool -> S2 (Y): a thread per (image, pooled pixel), all 6 filters, its 2×2 window of outputs
    t = tid
    while t < U(uimgs * U(P2 * P2)):
        m = U(t // U(P2 * P2))
        pp = U(t - m * U(P2 * P2))
        ph = U(pp // U(P2))
        pw = U(pp - ph * U(P2))
        xb = U(U(WEIGHTS_V2) + m * isz + ph * U(2 * XS) + pw + pw)
        for k in range(K1):
            bias = sm[U(200 + k)]
            c0[k] = bias
            c1[k] = bias
            c2[k] = bias
            c3[k] = bias
        xh = U(xb >> U1)  # xb is even (the window's column, XS, isz and WEIGHTS_V2 are): 64-bit loads
        for j in range(RS1 // 2):
            ra[2 * j], ra[2 * j + 1] = ld_pair(sm64, U(xh + U(j)))
        for r in range(RS):
            for j in range(RS1 // 2):
                rb[2 * j], rb[2 * j + 1] = ld_pair(sm64, U(xh + U((r + 1) * (XS // 2) + j)))
            for s in range(RS):
                for j in range(K1 // 2):  # the tap's 6 weights, 3 64-bit loads (lenet_fwd.cu: a float4 + a float2)
                    wk[2 * j], wk[2 * j + 1] = ld_pair(sm64, U((r * RS + s) * 4 + j))
                for k in range(K1):
                    wv = wk[k]
                    c0[k] += ra[s] * wv
                    c1[k] += ra[s + 1] * wv
                    c2[k] += rb[s] * wv
                    c3[k] += rb[s + 1] * wv
            for j in range(RS1):
                ra[j] = rb[j]
        ybase = U(U(WEIGHTS_V2) + m * isz + uxr + pp)
        _put_all(sm, ybase, U(P2 * P2), K1, c0, c1, c2, c3, act, mode)
        t = U(t + nt)
    cuda.syncthreads()
    # C3 + act + pool -> S4 (X, [0, 400)): a thread per (image, KB3 filters, pooled pixel)
    t = tid
    while t < U(uimgs * U(KG3 * P4 * P4)):
        m = U(t // U(KG3 * P4 * P4))
        e = U(t - m * U(KG3 * P4 * P4))
        kg = U(e // U(P4 * P4))
        pp = U(e - kg * U(P4 * P4))
        ph = U(pp // U(P4))
        pw = U(pp - ph * U(P4))
        for k in range(KB3):
            bias = sm[U(U(OB3_V2) + kg * U(KB3) + U(k))]
            a0[k] = bias
            a1[k] = bias
            a2[k] = bias
            a3[k] = bias
        s2 = U(U(WEIGHTS_V2) + m * isz + uxr + ph * U(2 * P2) + pw + pw)
        c = U0
        while c < U(K1):
            xh = U(U(s2 + c * U(P2 * P2)) >> U1)  # even, as C1's
            wh = U(U(U(OW3_V2) + c * U(25 * K3) + kg * U(KB3)) >> U1)  # even (16-byte aligned)
            for j in range(RS1 // 2):
                ra[2 * j], ra[2 * j + 1] = ld_pair(sm64, U(xh + U(j)))
            for r in range(RS):
                for j in range(RS1 // 2):
                    rb[2 * j], rb[2 * j + 1] = ld_pair(sm64, U(xh + U((r + 1) * (P2 // 2) + j)))
                for s in range(RS):
                    for j in range(KB3 // 2):  # the tap's KB3 weights as 64-bit loads (lenet_fwd.cu: a float4)
                        wk[2 * j], wk[2 * j + 1] = ld_pair(sm64, U(wh + U((r * RS + s) * (K3 // 2) + j)))
                    for k in range(KB3):
                        wv = wk[k]
                        a0[k] += ra[s] * wv
                        a1[k] += ra[s + 1] * wv
                        a2[k] += rb[s] * wv
                        a3[k] += rb[s + 1] * wv
                for j in range(RS1):
                    ra[j] = rb[j]
            c = U(c + U1)
        obase = U(s4b + m * s4s + kg * U(KB3 * P4 * P4) + pp)
        _put_all(sm, obase, U(P4 * P4), KB3, a0, a1, a2, a3, act, mode)
        t = U(t + nt)


@device_function
def _argmax(sm, z, unc):
    """The first maximal of the unc logits at sm[z:] (as np.argmax: the first maximum, the first NaN wins)."""
    bv = sm[z]
    best = U0
    c = U1
    while c < unc:
        v = sm[U(z + c)]
        if v > bv or (v != v and bv == bv):
            bv = v
            best = c
        c = U(c + U1)
    return best


# (the simulator's cuda.jit takes no launch bounds)
@(cuda.jit if numba.config.ENABLE_CUDASIM else cuda.jit(launch_bounds=LAUNCH_BOUNDS["lenet_fwd_v2"]))
def lenet_fwd_v2(images, c1w, c1b, c3w, c3b, c5w, c5b, f6w, f6b, ow, ob, logits, n, h1, h2, nc, act, mode, scale,
                 shift, imgs, xr, yr):
    # flat arrays; every index and size uint32, the stride loops while loops (as v1). v3's body (_setup_v2,
    # _convs_v2, _dense_layers) with uint8 images, the border the normalised pixel 0 (pad = shift: 0·scale + shift,
    # as v1 writes it) and the logits only (outs the constant OUT_GLOBAL: the output layer's switches fold away)
    sm, tid, nt, nimg, uimgs, uxr, isz, ntiles = _setup_v2(c1w, c1b, c3w, c3b, n, imgs, xr, yr)
    tile = U(cuda.blockIdx.x)
    while tile < ntiles:  # block-uniform
        n0, ni = _convs_v2(sm, images, tile, nimg, uimgs, uxr, isz, act, mode, scale, shift, shift, tid, nt)
        _dense_layers(sm, c5w, f6w, ow, c5b, f6b, ob, logits, n0, ni, U(h1), U(h2), U(nc), uxr, isz, act, tid, nt,
                      uimgs, U(OUT_GLOBAL))
        tile = U(tile + U(cuda.gridDim.x))


# (the simulator's cuda.jit takes no launch bounds)
@(cuda.jit if numba.config.ENABLE_CUDASIM else cuda.jit(launch_bounds=LAUNCH_BOUNDS["lenet_fwd_v3"]))
def lenet_fwd_v3(images, c1w, c1b, c3w, c3b, c5w, c5b, f6w, f6b, ow, ob, logits, classes, n, h1, h2, nc, act, mode,
                 scale, shift, pad, imgs, xr, yr, outs):
    # v2 (the same device functions) with: images uint8 or float32 (one specialisation each: Numba types the
    # argument), the border ``pad``; the output layer written where ``outs`` says (OUT_GLOBAL: logits, OUT_SHARED:
    # X[0, NC) for the argmax), then, with OUT_SHARED, classes[n] = the first maximal logit. logits and classes are
    # flat arrays (zero-size where absent: never touched then). Every index and size uint32 (as v1 and v2)
    sm, tid, nt, nimg, uimgs, uxr, isz, ntiles = _setup_v2(c1w, c1b, c3w, c3b, n, imgs, xr, yr)
    unc, uouts = U(nc), U(outs)
    tile = U(cuda.blockIdx.x)
    while tile < ntiles:  # block-uniform
        n0, ni = _convs_v2(sm, images, tile, nimg, uimgs, uxr, isz, act, mode, scale, shift, pad, tid, nt)
        _dense_layers(sm, c5w, f6w, ow, c5b, f6b, ob, logits, n0, ni, U(h1), U(h2), unc, uxr, isz, act, tid, nt,
                      uimgs, uouts)
        if U(uouts & U(OUT_SHARED)) != U0 and tid < ni:  # the argmax: a thread per image of the tile
            classes[U(n0 + tid)] = numba.int64(_argmax(sm, U(U(WEIGHTS_V2) + tid * isz), unc))
        # (the next tile's first barrier keeps its staging from X until every argmax has read it)
        tile = U(tile + U(cuda.gridDim.x))


# ------------------------------------------------------------------------------------------ v4: large batches
#: lenet_fwd.cu's v4 (cupy_backend/fused.py LF4_*): images a block, most first; v3's plan takes v4 where its grid still
#: gives LF4_BLOCKS_PER_SM blocks to every SM; LF4_G images a conv group; the plan keeps v4's shared memory within
#: LF4_SMEM_MAX (the smallest opt-in limit of the GPUs it may run on: sm_86 / sm_89, 99 KiB a block)
LF4_IMGS_CHOICES = (16, 8)
LF4_BLOCKS_PER_SM = 3
LF4_G = 2
LF4_SMEM_MAX = 99 * 1024
UNROLL4 = 1  # v4's dense stages: the k loop's unroll (16 partial sums, 8-16 loads a step; lenet_fwd.cu LF4_U)
DF2 = 2 * DF  # v4: partial sums a lane (two groups of DF), rows at most
LAUNCH_BOUNDS["lenet_fwd_v4"] = (THREADS_V2, 4)  # 4 blocks an SM: by registers (<= 72) and 4 × 53.7 KB of shared


def _round4(n: int) -> int:
    return ceil_div(n, 4) * 4


def v4_rows_stride(nc: int) -> int:
    """Floats of an image's row in v4's rows region (S4, later the logits): round4(max(400, NC))."""
    return _round4(max(I5, nc))


def v4_scratch(imgs: int, h1: int, h2: int) -> int:
    """Floats of v4's conv scratch: LF4_G images' X (1024) and Y (1176), later h1 [imgs][round4(H1)] and h2
    [imgs][round4(H2)] (the larger of the two uses)."""
    return max(LF4_G * (XS * XS + S2), imgs * (_round4(h1) + _round4(h2)))


def v4_smem(imgs: int, h1: int, h2: int, nc: int) -> int:
    """lenet_fwd_v4's dynamic shared memory in bytes (fused.lenet_fwd_v4_smem): the staged conv weights, the
    scratch, the rows [imgs][v4_rows_stride(NC)]. LeNet-5 at 16 images: 53,696 B (past 48 KiB: ``allow_shared``)."""
    return 4 * (WEIGHTS_V2 + v4_scratch(imgs, h1, h2) + imgs * v4_rows_stride(nc))


def v4_imgs(n: int, sms: int) -> int | None:
    """v4's images a block at batch n (fused.lenet_fwd_v4_imgs): the most of 16, 8 whose grid still gives
    LF4_BLOCKS_PER_SM blocks to every SM (132 SMs: 16 from n = 6,321, 8 from 3,161); None below (v3's tiles)."""
    for imgs in LF4_IMGS_CHOICES:
        if ceil_div(n, imgs) >= LF4_BLOCKS_PER_SM * (sms or DEFAULT_SM_COUNT):
            return imgs
    return None


def plan_v4(variant: str, n: int, h1: int, h2: int, sms: int, nc: int = 10) -> tuple[str, int, int, int]:
    """(kernel, blocks, images a block, dynamic shared bytes) of lenet_fwd "v3" or "v4", as cupy's
    fused.lenet_fwd_plan: v3 (the default) runs lenet_fwd_v4 where ``v4_imgs`` gives 8 or 16 images a block and
    v4's shared memory fits LF4_SMEM_MAX, else v3's tiles (plan_v2); "v4" by name runs lenet_fwd_v4 at every batch
    (8 images a block below v3's threshold), v3's tiles where its rows do not fit (an F6 of ~2,400 or wider). v3
    and v4 give the same bits."""
    if variant not in ("v3", "v4"):
        raise ValueError(f"plan_v4: v3 or v4, not {variant!r}")
    imgs4 = v4_imgs(n, sms)
    if variant == "v4" or imgs4 is not None:
        imgs4 = imgs4 or LF4_IMGS_CHOICES[-1]
        smem = v4_smem(imgs4, h1, h2, nc)
        if smem <= LF4_SMEM_MAX:
            return "lenet_fwd_v4", ceil_div(n, imgs4), imgs4, smem
    blocks, imgs, smem = plan_v2(n, h1, h2, sms)
    return "lenet_fwd_v3", blocks, imgs, smem


def plan_within_default_shared(n: int, h1: int, h2: int, sms: int, nc: int = 10) -> tuple[str, int, int, int]:
    """plan_v4's fallback where the opt-in past 48 KiB failed (``_opt_in``): lenet_fwd_v4 at the fewest images a
    block (8) where that fits 48 KiB, else v3's tiles (plan_v2). Both give plan_v4's bits (v3 and v4 at any images a
    block are the same sums); only the speed differs."""
    imgs = LF4_IMGS_CHOICES[-1]
    smem = v4_smem(imgs, h1, h2, nc)
    if smem <= SMEM_LIMIT:
        return "lenet_fwd_v4", ceil_div(n, imgs), imgs, smem
    blocks, imgs, smem = plan_v2(n, h1, h2, sms)
    return "lenet_fwd_v3", blocks, imgs, smem


#: why the opt-in past 48 KiB failed in this process (empty: it has not): lenet_fwd then plans within 48 KiB
OPT_IN_FAILURE: list[str] = []
#: (image dtype, bytes) that _opt_in has done: the specialisation is the image dtype's (every other argument's type
#: is fixed), so later calls skip it (NumbaBackend._launch's own allow_shared still checks the device's cufunc)
_OPTED_IN: set[tuple[str, int]] = set()


def _opt_in(args: tuple, smem: int) -> bool:
    """Opt lenet_fwd_v4's specialisation for ``args`` in to ``smem`` bytes of dynamic shared memory (common.
    allow_shared, through numba-cuda internals that a version may move: ``_codelibrary.get_cufunc``,
    ``driver.cuKernelSetAttribute``). True when done (or already done); False, with one RuntimeWarning a process
    naming the cause, where it fails: the caller then plans within 48 KiB (plan_within_default_shared), so an
    inference never fails for want of the opt-in, and gives the same bits."""
    if OPT_IN_FAILURE:
        return False
    key = (args[0].dtype.str, int(smem))
    if key in _OPTED_IN:
        return True
    from .common import allow_shared

    try:
        allow_shared(lenet_fwd_v4, args, smem)
    except Exception as e:  # noqa: BLE001 - any failure of the private path means: stay within 48 KiB
        import warnings

        OPT_IN_FAILURE.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"lenet_fwd_v4: the opt-in to {smem} bytes of shared memory failed ({OPT_IN_FAILURE[0]}); "
                      "inference plans within 48 KiB from now on (8 images a block: the same results, slower)",
                      RuntimeWarning, stacklevel=3)
        return False
    _OPTED_IN.add(key)
    return True


def _make_dense_v4(RB: int) -> Any:
    """v4's dense layer for R = 8·RB rows (8 or 16 images): out[r][o] = act(b[o] + Σ_k in[r][k]·W[o][k]), W (O,K)
    flat global. A lane holds 16 partial sums in two groups of 8 (va, vb): at 8 rows a warp takes F = 2 outputs
    a round (va output o0, vb o0 + 1, the 8 rows each), at 16 rows F = 1 (va rows 0-7, vb rows 8-15): each weight
    load feeds 16 FMAs either way (lenet_fwd.cu's rows_gemv<NI, 32/NI> feeds NI). Each group is reduced by
    _transpose_sum8 (lane l gets row l // 4 of it), as v3's one group: every output is the same sum as v3's (a
    lane's chain over k = lane, lane + 32, ... from 0, then the butterfly over lane bits 16, 8, 4, 2, 1; float
    adds commute), so v4's bits are v3's. in[r][k] = sm[ib + r·istr + k]; out to sm[ob + r·ostr + o] (layers 0,
    1; layer 2 where ``outs`` has OUT_SHARED) and g[(n0 + r)·O + o] for r < nr (layer 2, OUT_GLOBAL). Rounds
    block-uniform (the simulator's shuffle stand-in is a barrier)."""
    F = 2 // RB

    @device_function
    def _k_step(sm, w0, w1, w2, layer, va, vb, x, ib, istr, wrow, last, K, k):
        for r in range(8 * RB):
            x[r] = sm[U(ib + U(r) * istr + k)]
        i = U(wrow + k)
        wa = w0[i] if layer == U0 else (w1[i] if layer == U1 else w2[i])
        if F == 2:
            i = U(U(wrow + U(min(U1, last)) * K) + k)
            wb = w0[i] if layer == U0 else (w1[i] if layer == U1 else w2[i])
            for r in range(8):
                va[r] += x[r] * wa
                vb[r] += x[r] * wb
        else:
            for r in range(8):
                va[r] += x[r] * wa
                vb[r] += x[r + 8] * wa

    @device_function
    def _emit(sm, g, b0, b1, b2, layer, s, r, o, O, ob, ostr, n0, nr, act, outs):
        if o < O:
            bo = b0[o] if layer == U0 else (b1[o] if layer == U1 else b2[o])
            y = activate(s + bo, act)
            if layer < U(2) or U(outs & U(OUT_SHARED)) != U0:
                sm[U(ob + r * ostr + o)] = y
            if layer == U(2) and U(outs & U(OUT_GLOBAL)) != U0 and r < nr:
                g[U(U(n0 + r) * O + o)] = y

    @device_function
    def dense(sm, w0, w1, w2, b0, b1, b2, layer, g, O, K, ib, istr, ob, ostr, n0, nr, act, tid, nt, outs):
        lane = U(tid & U(31))
        warp = U(tid >> U(5))
        per = U(U(nt >> U(5)) * U(F))  # outputs a round
        rounds = U(U(O + per - U1) // per)
        va = cuda.local.array(DF, float32)
        vb = cuda.local.array(DF, float32)
        x = cuda.local.array(DF2, float32)  # x[r], r < R: the rows' input at k
        rd = U0
        while rd < rounds:  # block-uniform
            o0 = U(rd * per + warp * U(F))
            for j in range(DF):
                va[j] = float32(0.0)
                vb[j] = float32(0.0)
            if o0 < O:
                last = U(O - U1 - o0)  # an output past O re-reads the last row (its sums are not written)
                wrow = U(o0 * K)
                k = lane
                while U(k + U(32 * (UNROLL4 - 1))) < K:
                    for u in range(UNROLL4):
                        _k_step(sm, w0, w1, w2, layer, va, vb, x, ib, istr, wrow, last, K, U(k + U(32 * u)))
                    k = U(k + U(32 * UNROLL4))
                while k < K:
                    _k_step(sm, w0, w1, w2, layer, va, vb, x, ib, istr, wrow, last, K, k)
                    k = U(k + U(32))
            sa = _transpose_sum8(va, lane)
            sb = _transpose_sum8(vb, lane)
            r = U(lane >> U(2))  # the row this lane holds (of its group)
            if U(lane & U(3)) == U0:
                _emit(sm, g, b0, b1, b2, layer, sa, r, o0, O, ob, ostr, n0, nr, act, outs)
                if F == 2:
                    _emit(sm, g, b0, b1, b2, layer, sb, r, U(o0 + U1), O, ob, ostr, n0, nr, act, outs)
                else:
                    _emit(sm, g, b0, b1, b2, layer, sb, U(r + U(8)), o0, O, ob, ostr, n0, nr, act, outs)
            rd = U(rd + U1)

    return dense


_dense_r8, _dense_r16 = _make_dense_v4(1), _make_dense_v4(2)


@device_function
def _dense_layers_v4(sm, c5w, f6w, ow, c5b, f6b, ob, logits, n0, ni, nh1, nh2, unc, rows, usr, act, tid, nt, uimgs,
                     outs):
    """v4's dense stages over the block's uimgs (8 or 16) rows (images past the batch compute on the border value,
    never written): C5 rows [uimgs][usr] (S4) -> h1 (the scratch: sm[W + r·H1S]), F6 -> h2 (sm[W + uimgs·H1S +
    r·H2S]), the output -> logits (OUT_GLOBAL) and/or the rows (OUT_SHARED, for the argmax); a barrier after each.
    One call site of the layer, its body specialised by the launch-uniform uimgs (as v3's _dense_layers)."""
    h1s = U(U(nh1 + U(3)) & U(0xFFFFFFFC))
    h2s = U(U(nh2 + U(3)) & U(0xFFFFFFFC))
    s_h1 = U(WEIGHTS_V2)
    s_h2 = U(s_h1 + uimgs * h1s)
    for layer in range(3):
        if layer == 0:
            no, nk, ib, istr, obase, ostr, lact = nh1, U(I5), rows, usr, s_h1, h1s, act
        elif layer == 1:
            no, nk, ib, istr, obase, ostr, lact = nh2, nh1, s_h1, h1s, s_h2, h2s, act
        else:
            no, nk, ib, istr, obase, ostr, lact = unc, nh2, s_h2, h2s, rows, usr, 0
        if uimgs == U(8):
            _dense_r8(sm, c5w, f6w, ow, c5b, f6b, ob, U(layer), logits, no, nk, ib, istr, obase, ostr, n0, ni, lact,
                      tid, nt, outs)
        else:
            _dense_r16(sm, c5w, f6w, ow, c5b, f6b, ob, U(layer), logits, no, nk, ib, istr, obase, ostr, n0, ni, lact,
                       tid, nt, outs)
        cuda.syncthreads()


# (the simulator's cuda.jit takes no launch bounds)
@(cuda.jit if numba.config.ENABLE_CUDASIM else cuda.jit(launch_bounds=LAUNCH_BOUNDS["lenet_fwd_v4"]))
def lenet_fwd_v4(images, c1w, c1b, c3w, c3b, c5w, c5b, f6w, f6b, ow, ob, logits, classes, n, h1, h2, nc, act, mode,
                 scale, shift, pad, imgs, scratch, sr, outs):
    # v3's arguments, but (imgs, scratch, sr) for (imgs, xr, yr): imgs 8 or 16 images a block, scratch the floats of
    # the conv scratch (v4_scratch), sr the rows' stride (v4_rows_stride). sm: the staged C1/C3 weights (W floats) |
    # scratch: LF4_G images' X | Y (isz = 2200 floats each), later h1 and h2 | rows [imgs][sr]: S4, later the logits
    sm, tid, nt, nimg, uimgs, uxr, isz, ntiles = _setup_v2(c1w, c1b, c3w, c3b, n, imgs, XS * XS, S2)
    unc, uouts, usr = U(nc), U(outs), U(sr)
    rows = U(U(WEIGHTS_V2) + U(scratch))
    tile = U(cuda.blockIdx.x)
    while tile < ntiles:  # block-uniform
        n0 = U(tile * uimgs)
        ni = U(min(uimgs, U(nimg - n0)))
        g = U0
        while g < uimgs:  # the conv groups: LF4_G images each through v3's conv code, S4 of image g + m to row g + m
            # (no barrier before the staging: it writes X only, which the previous group's C3 does not read; the
            # barrier after it orders this group's C1 after that C3's reads of Y)
            gi = U(ni - g) if ni > g else U0
            _convs(sm, images, U(n0 + g), gi, U(LF4_G), uxr, isz, U(rows + g * usr), usr, act, mode, scale, shift,
                   pad, tid, nt)
            g = U(g + U(LF4_G))
        cuda.syncthreads()
        _dense_layers_v4(sm, c5w, f6w, ow, c5b, f6b, ob, logits, n0, ni, U(h1), U(h2), unc, rows, usr, act, tid, nt,
                         uimgs, uouts)
        if U(uouts & U(OUT_SHARED)) != U0 and tid < ni:  # the argmax: a thread per image of the tile
            classes[U(n0 + tid)] = numba.int64(_argmax(sm, U(rows + tid * usr), unc))
        # (a next tile's C3 writes the rows two barriers after its staging: the argmax has read them by then)
        tile = U(tile + U(cuda.gridDim.x))


# ------------------------------------------------------------------------------------------ evaluation
EVAL_THREADS = 256  # lenet_fwd.cu LF_EVAL_THREADS: lenet_eval_v1's one block


# (no launch bounds, as lenet_fwd.cu's lenet_eval_v1: with them ptxas spilled its double temporaries there)
@cuda.jit
def lenet_eval_v1(logits, labels, n, nc, out):
    """out[0] = Σ_n softmax cross-entropy of logits[n] (flat (N·NC,)) against labels[n] (uint8), out[1] = the rows
    whose first maximal logit (as np.argmax) is the label; both float64, in a fixed order: thread t takes rows
    t, t + T, ... in turn, then a fixed tree over the block's threads (lenet_fwd.cu's lenet_eval_v1). One block of
    EVAL_THREADS: an evaluation ends with one launch and one 16-byte copy back. float64 by contract."""
    s_loss = cuda.shared.array(EVAL_THREADS, float64)
    s_hit = cuda.shared.array(EVAL_THREADS, float64)
    tid, nt = U(cuda.threadIdx.x), U(cuda.blockDim.x)
    un, unc = U(n), U(nc)
    loss = float64(0.0)
    hit = float64(0.0)
    r = tid
    while r < un:
        z = U(r * unc)
        bv = logits[z]
        best = U0
        m = float64(bv)
        c = U1
        while c < unc:
            v = logits[U(z + c)]
            if v > bv or (v != v and bv == bv):  # as np.argmax: the first maximum, the first NaN wins
                bv = v
                best = c
            dv = float64(v)
            if m != m or dv > m:  # fmax(m, v): a NaN operand loses
                m = dv
            c = U(c + U1)
        s = float64(0.0)
        c = U0
        while c < unc:
            s += math.exp(float64(logits[U(z + c)]) - m)
            c = U(c + U1)
        y = U(labels[r])
        loss += math.log(s) + m - float64(logits[U(z + y)])
        hit += float64(1.0) if best == y else float64(0.0)
        r = U(r + nt)
    s_loss[tid] = loss
    s_hit[tid] = hit
    cuda.syncthreads()
    h = U(EVAL_THREADS // 2)
    while h > U0:
        if tid < h:
            s_loss[tid] += s_loss[U(tid + h)]
            s_hit[tid] += s_hit[U(tid + h)]
        cuda.syncthreads()
        h = U(h >> U1)
    if tid == U0:
        out[0] = s_loss[0]
        out[1] = s_hit[0]


# ------------------------------------------------------------------------------------ variant table

_F4 = "float32[:,:,:,::1]"
_F2 = "float32[:,::1]"
_F1 = "float32[::1]"
SIGNATURES = {
    "lenet_fwd_v1": f"void(uint8[:,:,::1], {_F4}, {_F1}, {_F4}, {_F1}, {_F2}, {_F1}, {_F2}, {_F1}, {_F2}, {_F1}, "
    f"{_F2}, int32, int32, float32, float32, int32, int32, int32)",
    "lenet_fwd_v2": f"void(uint8[::1], {', '.join([_F1] * 11)}, {', '.join(['int32'] * 6)}, float32, float32, int32, "
    "int32, int32)",
}


def _v3_signature(images: str) -> str:
    return (f"void({images}[::1], {', '.join([_F1] * 11)}, int64[::1], {', '.join(['int32'] * 6)}, float32, float32, "
            "float32, int32, int32, int32, int32)")


SIGNATURES["lenet_fwd_v3"] = _v3_signature("uint8")
SIGNATURES["lenet_fwd_v4"] = _v3_signature("uint8")  # v3's types: (imgs, scratch, sr, outs) for (imgs, xr, yr, outs)
KERNELS = {"lenet_fwd_v1": lenet_fwd_v1, "lenet_fwd_v2": lenet_fwd_v2, "lenet_fwd_v3": lenet_fwd_v3,
           "lenet_fwd_v4": lenet_fwd_v4, "lenet_eval_v1": lenet_eval_v1}
#: the compile report's other entries (compile_report.all_kernels; SIGNATURES holds the float32-free kernels):
#: lenet_fwd_v3's and _v4's float32-image specialisations (the same dispatchers, typed by the argument) and
#: lenet_eval_v1 (float64 by contract)
REPORT_KERNELS = {"lenet_fwd_f32_v3": lenet_fwd_v3, "lenet_fwd_f32_v4": lenet_fwd_v4}
REPORT_SIGNATURES = {"lenet_fwd_f32_v3": _v3_signature("float32"), "lenet_fwd_f32_v4": _v3_signature("float32"),
                     "lenet_eval_v1": "void(float32[::1], uint8[::1], int32, int32, float64[::1])"}
LAUNCH_BOUNDS["lenet_fwd_f32_v3"] = LAUNCH_BOUNDS["lenet_fwd_v3"]
LAUNCH_BOUNDS["lenet_fwd_f32_v4"] = LAUNCH_BOUNDS["lenet_fwd_v4"]
#: lenet_eval is lenet_fwd's companion (one variant, not an op of the protocol's variant table). The default is v3
#: (not the last): its plan runs lenet_fwd_v4 at large batches (plan_v4), as lenet_fwd.cu's; "v4" by name runs v4
#: at every batch
VARIANTS = {"lenet_fwd": ("v1", "v2", "v3", "v4")}
DEFAULT_VARIANTS = {"lenet_fwd": "v3"}


#: the SM count v2's plan is sized for where the caller has none (backend.DEFAULT_SM_COUNT: an H100 / H200)
DEFAULT_SM_COUNT = 132


def _sm_count(be: Any) -> int:
    """The SM count v2's plan is sized for: the backend's ``sm_count`` (NumbaBackend sets it from the device;
    a test's shim may), else DEFAULT_SM_COUNT. (No import of backend.py here: it imports this module.)"""
    s = getattr(be, "sm_count", None)
    return s if isinstance(s, int) else DEFAULT_SM_COUNT




@functools.cache
def _absent(dtype: Any) -> Any:
    """lenet_fwd_v3's stand-in for an absent output: a zero-size device array, Numba's null pointer (no device
    memory, nothing allocated; the simulator bounds-checks it, so a write to it fails there). The kernel's ``outs``
    keeps it untouched. Typed as a C-contiguous 1-d array, as the outputs it stands for (the launch takes the
    declared signature's specialisation): the simulator types a zero-size array 'A', so there it is a zero-length
    slice of a 1-element one (host memory). Made once per dtype (it points at nothing), not per launch."""
    if numba.config.ENABLE_CUDASIM:
        return cuda.device_array((1,), dtype)[:0]
    return cuda.device_array((0,), dtype)


def lenet_fwd(be: Any, images: Any, params: dict, logits: Any, mean: float, std: float, act: str, mode: str,
              variant: str | None = None, classes: Any = None) -> None:
    """reference.lenet_fwd in one launch; the protocol's optional op (lenet_gpu.backends.base), with cupy's
    extensions (cupy_backend/fused.lenet_fwd): images (N,28,28) uint8 pixels, normalised as batch_prepare does
    (pixel·scale + shift, scale = 1/(255·std), shift = −mean/std in float32, the border the normalised pixel 0),
    or, v3 and v4, float32 already normalised (the border −mean/std); logits (N,NC) float32 and/or, v3 and v4,
    classes (N,) int64 (the first maximal logit, as np.argmax; logits may then be None: no logits written). Without
    a ``variant``, float32 images, classes and logits=None take v3. v3 and v4 launch what plan_v4 says: v3's tiles
    or lenet_fwd_v4 (the same bits)."""
    v = variant or getattr(be, "default_variants", {}).get("lenet_fwd") or DEFAULT_VARIANTS["lenet_fwd"]
    if v not in VARIANTS["lenet_fwd"]:
        raise ValueError(f"lenet_fwd: unknown variant {v!r}; choose one of {', '.join(VARIANTS['lenet_fwd'])}")
    check_act(act)
    check_mode(mode)
    dt = getattr(images, "dtype", None)
    if dt not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise TypeError(f"lenet_fwd: images dtype {dt}; expected uint8 pixels or float32 normalised images")
    in_f32 = dt == np.float32
    if (in_f32 or classes is not None or logits is None) and v not in ("v3", "v4"):
        if variant is not None:
            raise ValueError(f"lenet_fwd_{v}: float32 images, classes and logits=None need v3 or v4")
        v = "v3"
    n = images.shape[0]
    _check(images, "images", (n, IMAGE, IMAGE), dt)
    p = params
    nh1, nh2, nc = p["c5.w"].shape[0], p["f6.w"].shape[0], p["out.w"].shape[0]
    for name, shape in (("c1.w", (K1, 1, RS, RS)), ("c1.b", (K1,)), ("c3.w", (K3, K1, RS, RS)), ("c3.b", (K3,)),
                        ("c5.w", (nh1, I5)), ("c5.b", (nh1,)), ("f6.w", (nh2, nh1)), ("f6.b", (nh2,)),
                        ("out.w", (nc, nh2)), ("out.b", (nc,))):
        _check(p[name], name, shape)
    check_lenet_fwd_outputs(logits, classes, n, nc, _check)
    xr, yr = regions(nh1, nh2)
    code, pool = np.int32(ACT_CODES[act]), np.int32(POOL_CODES[mode])
    scale, shift = np.float32(1.0 / (255.0 * std)), np.float32(-mean / std)

    def flat(a: Any) -> Any:
        return a.reshape(a.size)

    weights = tuple(flat(p[k]) for k in ("c1.w", "c1.b", "c3.w", "c3.b", "c5.w", "c5.b", "f6.w", "f6.b", "out.w",
                                        "out.b"))
    dims = tuple(np.int32(e) for e in (n, nh1, nh2, nc))
    if v in ("v3", "v4"):
        kname, blocks, imgs, smem = plan_v4(v, n, nh1, nh2, _sm_count(be), nc)
        pad = shift  # the normalised pixel 0
        if in_f32:
            scale, shift = np.float32(1.0), np.float32(0.0)
        outs = (OUT_GLOBAL if logits is not None else 0) | (OUT_SHARED if classes is not None else 0)
        lg = flat(logits) if logits is not None else _absent(np.float32)
        cl = classes if classes is not None else _absent(np.int64)
        head = (flat(images), *weights, lg, cl, *dims, code, pool, scale, shift, pad)

        def v4_args(imgs: int) -> tuple:
            return (*head, np.int32(imgs), np.int32(v4_scratch(imgs, nh1, nh2)), np.int32(v4_rows_stride(nc)),
                    np.int32(outs))

        if kname == "lenet_fwd_v4" and smem > SMEM_LIMIT and not _opt_in(v4_args(imgs), smem):
            kname, blocks, imgs, smem = plan_within_default_shared(n, nh1, nh2, _sm_count(be), nc)
        if kname == "lenet_fwd_v4":  # > 48 KiB at 16 images: opted in above (allow_shared)
            launch_kernel(be, kname, lenet_fwd_v4, blocks, THREADS_V2, smem, *v4_args(imgs))
        else:
            launch_kernel(be, kname, lenet_fwd_v3, blocks, THREADS_V2, smem, *head, np.int32(imgs), np.int32(xr),
                          np.int32(yr), np.int32(outs))
        return
    if v == "v2":
        blocks, imgs, smem = plan_v2(n, nh1, nh2, _sm_count(be))
        launch_kernel(be, "lenet_fwd_v2", lenet_fwd_v2, blocks, THREADS_V2, smem, flat(images), *weights,
                      flat(logits), *dims, code, pool, scale, shift, np.int32(imgs), np.int32(xr), np.int32(yr))
        return
    blocks, imgs, smem = plan(n, nh1, nh2)
    launch_kernel(be, "lenet_fwd_v1", lenet_fwd_v1, blocks, THREADS, smem, images, p["c1.w"], p["c1.b"], p["c3.w"],
                  p["c3.b"], p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"], p["out.b"], logits,
                  code, pool, scale, shift, np.int32(imgs), np.int32(xr), np.int32(yr))


#: what the model may ask of this lenet_fwd beyond the protocol (LeNet5.forward_device reads it), as cupy's
lenet_fwd.features = ("float32", "classes")  # type: ignore[attr-defined]


def lenet_eval(be: Any, logits: Any, labels: Any, out: Any) -> None:
    """out (2,) float64 = [Σ softmax cross-entropy of logits (N,NC) against labels (N,) uint8, the rows whose first
    maximal logit is the label], summed in double on the device in a fixed order (one launch, one block): cupy's
    lenet_eval (cupy_backend/fused.py), the same contract and checks."""
    n, nc = check_lenet_eval_args(logits, labels, out, _check)
    launch_kernel(be, "lenet_eval_v1", lenet_eval_v1, 1, EVAL_THREADS, 0, logits.reshape(logits.size), labels,
                  np.int32(n), np.int32(nc), out)
