"""head: LeNet-5's dense head trained as one op (the Numba face of kernels/head.cu).

  h1 = act(x·w1ᵀ + b1) (B,H1); h2 = act(h1·w2ᵀ + b2) (B,H2); logits = h2·w3ᵀ + b3 (B,NC)
  dz3 = (softmax(logits) − onehot(labels))/B; dz2 = (dz3·w3)·act'(h2); dz1 = (dz2·w2)·act'(h1); dx = dz1·w1
  dw3 = dz3ᵀ·h2, db3 = Σ dz3; dw2 = dz2ᵀ·h1, db2; dw1 = dz1ᵀ·x, db1 (overwritten)
  dz_conv (B,C,H,W) = route(dx through S4's 2×2 pooling: the argmax tap, or dx/4 each) · act'(yconv); 0 off-window
  yconv=None (max only, the routed step of docs/routed_backward.md): dz_conv (B,C,Hp,Wp) = gz = dx · act'(x)
  stats[STEP_IN_EPOCH mod S] = [Σ_b loss_b, #rows whose first maximal logit is the label] (overwritten)
x (B,C,Hp,Wp) is the pooled map S4, read as (B,I); labels (B,) int32; argmax (B,C,Hp,Wp) uint8 (max only).

Two launches, no atomics, no tickets:
- head_train_v1 ("rows"): a block owns ``rows`` rows of the batch (tiles of rows, block-stride over the grid)
  and runs the whole chain for them, one thread per output of each phase, operands from global memory, the
  intermediates in the outputs and in scratch (dz1, dz2, dz3, the per-row [loss, hit]); barriers between phases.
  Every array flat, every index uint32 (common.U): no int64 index arithmetic, no 64-bit division, no wraparound
  selects (sm_90: 89 → 40 registers). C5's weights are read coalesced: C5_CHUNK columns at a time staged in
  shared memory by consecutive threads (the plain loop's lanes read w1 400 floats apart), each output still
  summed in input order.
- head_train_wgrad_v1: one thread per element of [dw1|db1], [dw2|db2], [dw3|db3] (the bias = a column of ones),
  each a sum over the batch in row order; one more thread sums the per-row loss and hit in row order.
- head_train_v2 / head_train_wgrad_v2 (kernels/head.cu's v2, kernel for kernel): rows: the block's R rows (1, 2, 4
  or 8, compiled in: one kernel per R) and every intermediate in shared memory; the three forward products
  warp-cooperative (rows_gemv.cuh: a warp per 4 outputs, lanes along the reduction axis, so every weight load is a
  coalesced row segment feeding R FMAs, against v1's thread-per-output loops; a fixed transpose-butterfly of
  the partial sums); the backward products a column a thread with R register accumulators (coalesced weight
  reads, each weight feeding R rows). wgrad: 16×32 tiles of [dw|db] over 32-row chunks staged in shared memory,
  2×2 outputs a thread, 4 groups of 128 threads splitting the batch (partials added in group order), against
  v1's thread per element re-reading the batch column; one more block sums the stats with a fixed tree.
- head_train_v3 / head_train_wgrad_v3 (head.cu's v3): rows: a row a block of 512 threads, the geometry (C, Hp, Wp,
  H, W, H1, H2, NC) compiled in (make_v3: constant trip counts and divisors); x, w2 and w3 staged in shared
  memory in one round trip (w2 read once, not twice as in v2); C5's forward split over 15 warps of 8 outputs,
  lanes along the row (13 coalesced loads × 8 outputs a lane); F6 and the output layer from the staged copies;
  the small backward products split in parts of ≥ 8 terms (partials added in part order); C5's data gradient
  with the forward's warp/lane footprint of w1, per-warp partials added in warp order. wgrad: v2's tiles with
  the sizes compiled in. sm_90 (compile_ptx + ptxas, no launch bounds): 64 registers, no stack, no spills.
  head.cu's estimate for its v3 at batch 64 on an H200 (ESTIMATED there, not measured; this port unmeasured):
  rows kernel ~5-7 µs against its v2's measured 21.7 µs.
- head_train_wgrad_v4 (head.cu's v4 wgrad, the plan's for v3 and v4 since 2026-12-07): v3's tiles, groups, chunk
  order and sums with the staging pipelined: the next round's chunk is fetched into registers (4 dz and 8 input
  values a thread, _wgrad_fetch) right after the barrier that publishes this round's, so its loads are in flight
  during this round's k steps, and the k loop runs all 32 steps (zero rows past the batch add exactly +0): v3's
  bits (the simulator test). head.cu's estimate at batch 4096 (ESTIMATED, not measured): ~25-45 µs against v3's
  sums' measured 92 µs (as v2, 2026-12-04); this port unmeasured.
- head_train_v4 (head.cu's v4, "rows, large batch"; wgrad: head_train_wgrad_v4): 8, 16 or 32 rows a block
  (HEAD4_ROWS, compiled in with the geometry: make_v4, one kernel per rows value and geometry), 8·rows threads, a
  warp per 4 rows; every product a register-tiled GEMM (4 rows × up to 4 columns of 32 a thread in C5/F6, K staged
  in chunks of 20 in shared memory; 4 × up to 7 in dz1/dx, w2/w1 read from global memory along their rows) instead
  of v2's warp per output / thread per column; the output layer, the loss rows and dz2 a thread per element;
  dz1 in place over h1, dz2 over h2; dx routed into dz_conv. Static shared memory (fused.head_v4_smem), launch
  bounds (8·rows, 512/(8·rows)): sm_80/sm_90 (compile_ptx + ptxas) ≤ 128 registers, no stack, no spills.
  head.cu's estimate at batch 4096, 16 rows (ESTIMATED, not measured; this port unmeasured): ~31-50 µs against
  v2's rows kernel's measured 149 µs.
- The plan (``plan``): v1 this module's; v2, v3 and v4 cupy's (cupy_backend/fused.head_plan, called, not copied,
  with v4: ``tiled=True``): v3's rows kernel while v2 would take one row a block (batch ≤ fused.HEAD_FILL_BLOCKS
  = 264) and its 49,040 B of shared memory fit; beyond, v4's rows kernel once its 8-row blocks fill the SMs (batch
  ≥ 1,049; fused.head4_rows rows a block), else v2's rows kernel (then head_train_wgrad_v4); v4 by name: v4's rows
  kernel at every batch; v2/v3/v4 fall back to v1 where v2's rows do not fit shared memory (wide F6) and no
  variant was named. The default is v3 (as cupy's).
Every v2/v3/v4 sum is in a fixed order (no atomics): the bits repeat from launch to launch and whatever the grid.

``head_train(be, ...)`` is the launch wrapper with the protocol's signature (first parameter the backend), so a
backend binds it as a method with one line. It launches the kernel objects itself (they are not in the backend's
KERNELS table) and counts each launch in ``be.counters``; scratch is allocated at the first call at a shape.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numba
import numpy as np
from numba import cuda, float32

from ...stepstate import STEP_IN_EPOCH
from ..base import ACT_CODES, POOL_CODES, check_act, check_mode
from ._compat import import_cuda_array_module
from .common import ACT_IDENTITY, ONE, POOL_MAX, U0, U1, ZERO, U, act_grad, activate, ceil_div, device_function

if not numba.config.ENABLE_CUDASIM:
    import_cuda_array_module()  # before the first compile (NumPy 2.5 with numba-cuda 0.30: see _compat)

QUARTER = np.float32(0.25)
#: head_train_v1's mode code for max pooling with the routed backward (yconv=None: dz_conv at x's shape)
POOL_ROUTED = 2
#: threads per block of the rows kernel and of the weight-gradient kernel
HEAD_THREADS = 128
WG_THREADS = 128
#: head_train_v1: columns of C5's weights staged in shared memory at a time (coalesced reads), and the most
#: dynamic shared memory that staging may take (otherwise the plain loop)
C5_CHUNK = 32
C5_MAX_SMEM = 48 * 1024
#: rows per block: the fewest of 1..8 that keep the grid within this many blocks (two per SM of an H100)
FILL_BLOCKS = 2 * 132
#: launch bounds of the kernels that have them (the GPU's cuda.jit; compile_report compiles without them)
LAUNCH_BOUNDS: dict[str, tuple[int, ...]] = {}

# ---------------------------------------------------------------------------------------------- v1: rows


@device_function
def _fwd_layer(a, w, b, out, r0, nr, nout, nin, act, tid, nt):
    """out[r, o] = act(Σ_i a[r, i] w[o, i] + b[o]) for o < nout, i < nin and the tile's rows r0 .. r0+nr−1,
    threads striding (flat row-major arrays, uint32 offsets)."""
    t = tid
    while t < U(nr * nout):
        rr = U(t // nout)
        o = U(t - rr * nout)
        r = U(r0 + rr)
        abase = U(r * nin)
        wbase = U(o * nin)
        acc = b[o]
        for i in range(nin):
            acc += a[U(abase + U(i))] * w[U(wbase + U(i))]
        out[U(r * nout + o)] = activate(acc, act)
        t = U(t + nt)


@device_function
def _fwd_layer_staged(a, w, b, out, sw, r0, nr, nout, nin, act, tid, nt):
    """_fwd_layer with w read coalesced (C5: lanes of the plain loop read w 400 floats apart): chunks of C5_CHUNK
    columns of w are staged in shared memory by consecutive threads (row o at o·(C5_CHUNK+1): the padding keeps
    the reads of consecutive o conflict-free); the partial sums wait in out between chunks (each thread keeps
    the same outputs), so each output still sums i in order, as _fwd_layer does."""
    t = tid
    while t < U(nr * nout):
        rr = U(t // nout)
        o = U(t - rr * nout)
        out[U((r0 + rr) * nout + o)] = b[o]
        t = U(t + nt)
    i0 = U0
    while i0 < nin:
        ic = U(min(U(C5_CHUNK), U(nin - i0)))
        cuda.syncthreads()  # nobody still reads the previous chunk
        e = tid
        while e < U(nout * ic):
            o = U(e // ic)
            ii = U(e - o * ic)
            sw[U(o * U(C5_CHUNK + 1) + ii)] = w[U(o * nin + i0 + ii)]
            e = U(e + nt)
        cuda.syncthreads()
        t = tid
        while t < U(nr * nout):
            rr = U(t // nout)
            o = U(t - rr * nout)
            r = U(r0 + rr)
            po = U(r * nout + o)
            abase = U(r * nin + i0)
            sbase = U(o * U(C5_CHUNK + 1))
            acc = out[po]
            for ii in range(ic):
                acc += a[U(abase + U(ii))] * sw[U(sbase + U(ii))]
            out[po] = acc
            t = U(t + nt)
        i0 = U(i0 + U(C5_CHUNK))
    t = tid
    while t < U(nr * nout):
        rr = U(t // nout)
        po = U((r0 + rr) * nout + t - rr * nout)
        out[po] = activate(out[po], act)
        t = U(t + nt)


@device_function
def _back_layer(dz, w, h, dz_below, r0, nr, nout, nin, act, tid, nt):
    """dz_below[r, i] = (Σ_o dz[r, o] w[o, i]) · act'(h[r, i]) for o < nout, i < nin and the tile's rows,
    threads striding (consecutive threads: consecutive i, so the w reads coalesce)."""
    t = tid
    while t < U(nr * nin):
        rr = U(t // nin)
        i = U(t - rr * nin)
        r = U(r0 + rr)
        dbase = U(r * nout)
        acc = ZERO
        for o in range(nout):
            acc += dz[U(dbase + U(o))] * w[U(U(o) * nin + i)]
        e = U(r * nin + i)
        dz_below[e] = acc * act_grad(h[e], act)
        t = U(t + nt)


@cuda.jit
def head_train_v1(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3,
                  rowstat, nb, cc, hh, ww, nh1, nh2, nc, act, mode, rows, staged):
    # dynamic shared memory (staged == 1): nh1·(C5_CHUNK+1) floats, the C5 weights' chunk
    sw = cuda.shared.array(0, float32)
    # every array flat (row-major), every index uint32 (common.U); x (B, I) with I = cc·hp·wp; yconv, dz_conv
    # (B, cc, hh, ww) — in routed mode x itself and dz_conv at x's shape (hh, ww = hp, wp)
    unb, u1, u2, uc = U(nb), U(nh1), U(nh2), U(nc)
    uhh, uww = U(hh), U(ww)
    hp = U(uhh >> U1)
    wp = U(uww >> U1)
    if mode == POOL_ROUTED:  # yconv is x itself (B,C,Hp,Wp): dz_conv receives gz = dx·act'(x) at x's shape
        hp = uhh
        wp = uww
    pp = U(hp * wp)
    ni = U(U(cc) * pp)
    plane = U(uhh * uww)
    tid, nt = U(cuda.threadIdx.x), U(cuda.blockDim.x)
    urows = U(rows)
    ntiles = U(U(unb + urows - U1) // urows)
    inv_b = ONE / float32(nb)
    tile = U(cuda.blockIdx.x)
    while tile < ntiles:  # block-uniform
        r0 = U(tile * urows)
        nr = U(min(urows, U(unb - r0)))
        if staged == 1:  # h1 = act(x w1ᵀ + b1)
            _fwd_layer_staged(x, w1, b1, h1, sw, r0, nr, u1, ni, act, tid, nt)
        else:
            _fwd_layer(x, w1, b1, h1, r0, nr, u1, ni, act, tid, nt)
        cuda.syncthreads()
        _fwd_layer(h1, w2, b2, h2, r0, nr, u2, u1, act, tid, nt)  # h2 = act(h1 w2ᵀ + b2)
        cuda.syncthreads()
        _fwd_layer(h2, w3, b3, logits, r0, nr, uc, u2, ACT_IDENTITY, tid, nt)  # logits = h2 w3ᵀ + b3
        cuda.syncthreads()
        r = U(r0 + tid)
        while r < U(r0 + nr):  # the loss row and dz3 = dlogits
            lb = U(r * uc)
            loss, hit = _xent_row(logits, lb, U(labels[r]), dz3, lb, U1, uc, inv_b)
            rowstat[U(r + r)] = loss
            rowstat[U(r + r + U1)] = hit
            r = U(r + nt)
        cuda.syncthreads()
        _back_layer(dz3, w3, h2, dz2, r0, nr, uc, u2, act, tid, nt)  # dz2 = (dz3 w3)·act'(h2)
        cuda.syncthreads()
        _back_layer(dz2, w2, h1, dz1, r0, nr, u2, u1, act, tid, nt)  # dz1 = (dz2 w2)·act'(h1)
        cuda.syncthreads()
        t = tid
        while t < U(nr * ni):  # dx = dz1 w1, routed through S4's pooling into dz_conv
            rr = U(t // ni)
            i = U(t - rr * ni)
            r = U(r0 + rr)
            db1 = U(r * u1)
            g = ZERO
            for o in range(u1):
                g += dz1[U(db1 + U(o))] * w1[U(U(o) * ni + i)]
            e = U(r * ni + i)
            if mode == POOL_ROUTED:  # the routed gradient: max pooling's act' at the routed tap is act'(x)
                dz_conv[e] = g * act_grad(yconv[e], act)
            else:
                c = U(i // pp)
                q = U(i - c * pp)
                ph = U(q // wp)
                pw = U(q - ph * wp)
                base = U((r * U(cc) + c) * plane + U(ph + ph) * uww + U(pw + pw))
                am = U(argmax[e]) if mode == POOL_MAX else U0
                for tap in range(4):
                    o = U(base + U(tap >> 1) * uww + U(tap & 1))
                    if mode == POOL_MAX:
                        v = g if am == U(tap) else ZERO
                    else:
                        v = g * QUARTER
                    dz_conv[o] = v * act_grad(yconv[o], act)
            t = U(t + nt)
        if mode != POOL_ROUTED and (U(hp + hp) != uhh or U(wp + wp) != uww):  # taps no window covers: 0
            per = U(U(cc) * plane)
            t = tid
            while t < U(nr * per):
                rr = U(t // per)
                e = U(t - rr * per)
                e2 = U(e // uww)
                yy = U(e2 - U(e2 // uhh) * uhh)
                xx = U(e - e2 * uww)
                if yy >= U(hp + hp) or xx >= U(wp + wp):
                    dz_conv[U((r0 + rr) * per + e)] = ZERO
                t = U(t + nt)
        cuda.syncthreads()  # the next tile's phases read this tile's nothing, but keep the phases apart
        tile = U(tile + U(cuda.gridDim.x))


# ---------------------------------------------------------------------------------------------- v1: wgrad


@device_function
def _wgrad_elem(dz, a, o, i, dw, db, nb, nout, na):
    """dw[o, i] = Σ_b dz[b, o] a[b, i] (i < na), or db[o] = Σ_b dz[b, o] (i == na), rows in order (flat arrays,
    uint32 offsets walked by adding the row lengths)."""
    acc = ZERO
    pd = o
    if i < na:
        pa = i
        for _ in range(nb):
            acc += dz[pd] * a[pa]
            pd = U(pd + nout)
            pa = U(pa + na)
        dw[U(o * na + i)] = acc
    else:
        for _ in range(nb):
            acc += dz[pd]
            pd = U(pd + nout)
        db[o] = acc


@cuda.jit
def head_train_wgrad_v1(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, nb, ni, nh1,
                        nh2, nc):
    unb, uni, u1, u2, uc = U(nb), U(ni), U(nh1), U(nh2), U(nc)
    n1 = U(u1 * U(uni + U1))
    n2 = U(u2 * U(u1 + U1))
    n3 = U(uc * U(u2 + U1))
    e = U(cuda.grid(1))
    while e < U(n1 + n2 + n3 + U1):
        if e < n1:
            o = U(e // U(uni + U1))
            _wgrad_elem(dz1, x, o, U(e - o * U(uni + U1)), dw1, db1, unb, u1, uni)
        elif e < U(n1 + n2):
            f = U(e - n1)
            o = U(f // U(u1 + U1))
            _wgrad_elem(dz2, h1, o, U(f - o * U(u1 + U1)), dw2, db2, unb, u2, u1)
        elif e < U(n1 + n2 + n3):
            f = U(e - n1 - n2)
            o = U(f // U(u2 + U1))
            _wgrad_elem(dz3, h2, o, U(f - o * U(u2 + U1)), dw3, db3, unb, uc, u2)
        else:  # the stats row, summed in row order
            loss = ZERO
            hit = ZERO
            for b in range(unb):
                loss += rowstat[U(U(b) + U(b))]
                hit += rowstat[U(U(b) + U(b) + U1)]
            s = stats.shape[0]
            row = state[STEP_IN_EPOCH] % s  # Python-style modulo: never negative
            stats[row, 0] = loss
            stats[row, 1] = hit
        e = U(e + U(cuda.gridsize(1)))


# ------------------------------------------------------------------------------ v2 and v3: shared pieces
#
# kernels/head.cu's v2 and v3, kernel for kernel (the same phases, work split, shared-memory layout, launch plans
# and summation orders). What Numba cannot say, and what stands in for it:
# - no __ldg / const __restrict__: plain global loads (NVVM cannot prove the weights read-only, so no ld.global.nc);
# - no float2/float4 loads: wgrad's 2×2 outputs read their two shared-memory pairs as four scalar loads;
# - no #pragma unroll / unroll(N): loops with compile-time trip counts (closure constants) that LLVM unrolls, and the
#   k loops unrolled by hand (UNROLL steps a trip, then the rest) where head.cu asks for a partial unroll;
#   register arrays indexed by a loop variable stay in registers only where the loop unrolls (the compile checks
#   assert no stack frame); v3's forward re-reads its input value from shared memory per 32-column step instead
#   of preloading all of them into registers (a preload array would have to be indexed by the unrolled step);
# - no templates / -D defines: HEAD_ROWS and v3's geometry are closure constants of kernel factories (make_v2,
#   make_v3), one dispatcher per row count (v2_bounds: head.cu's launch bounds for it) and per geometry; the tables
#   hold the 1-row v2 and LeNet-5's v3 (built at import), the others are built at their first launch and launched
#   with ``kernel=`` (launch_kernel). Only the tables' kernels are in the on-disk kernel cache.
# Two additions for this backend's contract (a backend's ``max_blocks`` caps every grid): the rows kernels loop
# over their rows (v3) / tiles (v2) with a block stride and the wgrad kernels over their tiles; on an uncapped
# launch each block runs one iteration, as head.cu's.

SIM = bool(numba.config.ENABLE_CUDASIM)
FULL = 0xFFFFFFFF  # a whole warp's shuffle mask
#: head.cu HEAD_F: outputs a warp takes at once in v2's forward products
HEAD_F = 4
#: cupy's HEAD_THREADS define for head.cu (cupy_backend/fused.DEFINES): v2's rows block
HEAD2_THREADS = 256
HEAD3_THREADS = 512  # head.cu HEAD3_THREADS: v3's rows block (one row of the batch, 16 warps)
WG_TO, WG_TI, WG_KC, WG2_GROUPS = 16, 32, 32, 4  # head.cu wgrad v2 tile, chunk and batch groups
WG2_THREADS = WG_THREADS * WG2_GROUPS  # 512
WG_SDZ = WG2_GROUPS * WG_KC * WG_TO  # wgrad's shared arrays (floats): the staged dz chunks, input chunks, partials
WG_SA = WG2_GROUPS * WG_KC * WG_TI
WG_SPART = (WG2_GROUPS - 1) * WG_THREADS * 4


def v2_bounds(rows: int) -> tuple[int, int]:
    """head.cu's launch bounds of head_train_v2 at HEAD_ROWS = rows: 512 threads an SM (≤ 128 registers) at 1 or 2
    rows, 768 (≤ 85) at 4 or 8."""
    return HEAD2_THREADS, (512 if rows <= 2 else 768) // HEAD2_THREADS


#: launch bounds (the GPU's jit; compile_report compiles without them): v2's table entry (1 row), v3's (512, 2):
#: ≤ 64 registers
LAUNCH_BOUNDS["head_train_v2"] = v2_bounds(1)
LAUNCH_BOUNDS["head_train_v3"] = (HEAD3_THREADS, 2)
# the wgrad kernels take none (head.cu: __launch_bounds__(WG2_THREADS)): with .maxntid 512 ptxas (CUDA 13, sm_90)
# gives head_train_wgrad_v3 40 registers and an 8-byte spill; without, 48 and none (a 512-thread block allows 128)


def _jit(name: str) -> Any:
    """cuda.jit with the kernel's launch bounds (if any) on a GPU (the simulator's cuda.jit takes none)."""
    return cuda.jit if SIM or name not in LAUNCH_BOUNDS else cuda.jit(launch_bounds=LAUNCH_BOUNDS[name])


if SIM:

    @cuda.jit(device=True)
    def _shfl_xor(mask, v, off):
        """The simulator's stand-in for cuda.shfl_xor_sync (it has none): thread (tid ^ off)'s value through shared
        memory between two barriers, so every thread of the block calls it equally often: the simulator runs the
        warp-uniform reductions block-uniformly (the SIM branches below)."""
        buf = cuda.shared.array(HEAD3_THREADS, float32)
        tid = cuda.threadIdx.x
        buf[tid] = v
        cuda.syncthreads()
        got = buf[tid ^ off]
        cuda.syncthreads()
        return got
else:
    _shfl_xor = cuda.shfl_xor_sync


def _make_level(n: int, off: int) -> Any:
    keep_n = off * n // 32

    @device_function
    def level(v, lane):
        """rows_gemv.cuh transpose_level<N, OFF>: keep half of the values, send the other half to lane ^ OFF."""
        up = (lane & U(off)) != U0
        for k in range(keep_n):
            send = v[k] if up else v[k + keep_n]
            keep = v[k + keep_n] if up else v[k]
            v[k] = keep + _shfl_xor(FULL, send, off)

    return level


def _make_tsum(n: int) -> Any:
    """rows_gemv.cuh warp_transpose_sum<N> (N a power of two ≤ 32): returns, on lane l, the warp's sum of value
    l·N/32; log2 N transpose levels, then a butterfly over the 32/N lanes sharing a value. A fixed tree."""
    l16, l8, l4, l2, l1 = (_make_level(n, o) for o in (16, 8, 4, 2, 1))
    lanes_log = (32 // n).bit_length() - 1

    @device_function
    def tsum(v, lane):
        if n >= 2:
            l16(v, lane)
        if n >= 4:
            l8(v, lane)
        if n >= 8:
            l4(v, lane)
        if n >= 16:
            l2(v, lane)
        if n >= 32:
            l1(v, lane)
        s = v[0]
        for q in range(lanes_log):
            s += _shfl_xor(FULL, s, (16 // n) >> q)
        return s

    return tsum


@device_function
def _xent_row(z, zo, lab, d, do, ds, nc, inv_b):
    """common.cuh xent_row: d[do + c·ds] = (softmax(z)_c − [c == lab])·inv_b for the row z[zo .. zo+nc); returns
    (loss = logsumexp − z[lab], hit = [the first maximal logit is lab])."""
    mx = z[zo]
    best = U0
    for c in range(U1, nc):
        if z[U(zo + U(c))] > mx:
            mx = z[U(zo + U(c))]
            best = U(c)
    se = ZERO
    for c in range(nc):
        se += math.exp(z[U(zo + U(c))] - mx)
    inv_se = ONE / se
    for c in range(nc):
        p = math.exp(z[U(zo + U(c))] - mx) * inv_se
        if U(c) == lab:
            p -= ONE
        d[U(do + U(c) * ds)] = p * inv_b
    return math.log(se) - (z[U(zo + lab)] - mx), ONE if best == lab else ZERO


@device_function
def _route(dz_conv, yconv, argmax, g, r, i, ni, pp, wp, cc, plane, uww, act, mode):
    """head.cu head_route: dz_conv of pooled element i of row r's 2×2 window (c, ph, pw) = route(g) · act'(yconv):
    max → the argmax tap gets g, avg → g/4 each tap (v3 passes its geometry as constants: no run-time division)."""
    c = U(i // pp)
    q = U(i - c * pp)
    ph = U(q // wp)
    pw = U(q - ph * wp)
    base = U(U(U(r * cc) + c) * plane + U(ph + ph) * uww + U(pw + pw))
    am = U(argmax[U(r * ni + i)]) if mode == POOL_MAX else U0
    for tap in range(4):
        o = U(base + U(tap >> 1) * uww + U(tap & 1))
        if mode == POOL_MAX:
            v = g if am == U(tap) else ZERO
        else:
            v = g * QUARTER
        dz_conv[o] = v * act_grad(yconv[o], act)


@device_function
def _zero_trailing(dz_conv, r0, nr, per, uhh, uww, hp, wp, tid, nt):
    """head.cu head_zero_trailing: 0 in the taps of rows r0 .. r0+nr−1 that no 2×2 window covers (odd H or W)."""
    t = tid
    while t < U(nr * per):
        rr = U(t // per)
        e = U(t - rr * per)
        e2 = U(e // uww)
        yy = U(e2 - U(e2 // uhh) * uhh)
        xx = U(e - e2 * uww)
        if yy >= U(hp + hp) or xx >= U(wp + wp):
            dz_conv[U(U(r0 + rr) * per + e)] = ZERO
        t = U(t + nt)


# ---------------------------------------------------------------------------------------------- v2: rows


def _make_rows_gemv(R: int, F: int, unroll: int) -> Any:
    """rows_gemv.cuh rows_gemv<R, F, U> over the block's R rows in shared memory: out[r][o] = act(bias[o] +
    Σ_k in[r][k]·W[o][k]). A warp takes F consecutive outputs a round, its lanes stride k (coalesced weight rows,
    each weight feeding R FMAs, ``unroll`` k steps a trip), R·F partial sums a lane, reduced by the transpose tree.
    in: sm[ib + r·isz + k]; out: sm[ob + r·osz + o] and g[go + r·O + o] for r < nr."""
    N = R * F
    lanes = 32 // N
    lanes_log = lanes.bit_length() - 1
    f_log = F.bit_length() - 1
    tsum = _make_tsum(N)

    @device_function
    def kstep(w, sm, ib, isz, v, xin, wb, last, K, k):
        for r in range(R):
            xin[r] = sm[U(ib + U(r) * isz + k)]
        for f in range(F):
            wv = w[U(wb + U(min(U(f), last)) * K + k)]
            for r in range(R):
                v[r * F + f] = cuda.fma(xin[r], wv, v[r * F + f])

    @device_function
    def gemv(w, bias, O, K, sm, ib, isz, ob, osz, g, go, nr, act, lane, warp, nwarps):
        v = cuda.local.array(N, float32)
        xin = cuda.local.array(R, float32)
        per = U(nwarps * U(F))
        base = U0
        while base < O:  # block-uniform rounds (the simulator's shuffles are barriers)
            o0 = U(base + warp * U(F))
            for j in range(N):
                v[j] = ZERO
            active = o0 < O
            if active:
                wb = U(o0 * K)
                last = U(O - U1 - o0)  # outputs past O re-read the last row (their sums are not written)
                k = lane
                if unroll > 1:
                    while U(k + U(32 * (unroll - 1))) < K:
                        for u in range(unroll):
                            kstep(w, sm, ib, isz, v, xin, wb, last, K, U(k + U(32 * u)))
                        k = U(k + U(32 * unroll))
                while k < K:
                    kstep(w, sm, ib, isz, v, xin, wb, last, K, k)
                    k = U(k + U(32))
            if active or SIM:
                s = tsum(v, lane)
                val = U(lane >> U(lanes_log))
                r = U(val >> U(f_log))
                o = U(o0 + U(val & U(F - 1)))
                if U(lane & U(lanes - 1)) == U0 and o < O:
                    y = activate(s + bias[o], act)
                    sm[U(ob + r * osz + o)] = y
                    if r < nr:
                        g[U(go + r * O + o)] = y
            base = U(base + per)

    return gemv


def _make_rows_v2(R: int) -> Any:
    """head.cu head_rows_v2<R>: the block's R rows (tiles of R rows, block-stride) through the whole chain, every
    operand of the block in dynamic shared memory: s_x [R][I], s_h1 [R][H1], s_h2 [R][H2], s_z [R][NC], then the
    backward operands column-major: s_d3 [NC][R], s_d2 [H2][R], s_d1 [H1][R]."""
    gemv = _make_rows_gemv(R, HEAD_F, 4 if R * HEAD_F * HEAD_F <= 32 else 1)

    @device_function
    def back(sm, di, w, nout, nin, hofs, dno, dz, r0, nr, act, tid, nt):
        """head_back_layer<R>: s_din[j][r] = dz[r0+r][j] = (Σ_o s_dout[o][r]·w[o][j])·act'(s_h[r][j]), a column j
        a thread, the R rows in registers (coalesced weight reads)."""
        acc = cuda.local.array(R, float32)
        j = tid
        while j < nin:
            for r in range(R):
                acc[r] = ZERO
            for o in range(nout):
                wv = w[U(U(o) * nin + j)]
                for r in range(R):
                    acc[r] = cuda.fma(sm[U(di + U(o) * U(R) + U(r))], wv, acc[r])
            for r in range(R):
                d = acc[r] * act_grad(sm[U(hofs + U(r) * nin + j)], act)
                sm[U(dno + j * U(R) + U(r))] = d
                if U(r) < nr:
                    dz[U(U(r0 + U(r)) * nin + j)] = d
            j = U(j + nt)

    @device_function
    def rows(sm, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3, rowstat,
             nb, cc, hh, ww, nh1, nh2, nc, act, mode):
        unb, u1, u2, uc = U(nb), U(nh1), U(nh2), U(nc)
        uhh, uww = U(hh), U(ww)
        hp = U(uhh >> U1)
        wp = U(uww >> U1)
        if mode == POOL_ROUTED:  # x itself is yconv; dz_conv at x's shape gets dx·act'(x)
            hp = uhh
            wp = uww
        pp = U(hp * wp)
        ni = U(U(cc) * pp)
        plane = U(uhh * uww)
        per = U(U(cc) * plane)
        o_h1 = U(U(R) * ni)
        o_h2 = U(o_h1 + U(R) * u1)
        o_z = U(o_h2 + U(R) * u2)
        o_d3 = U(o_z + U(R) * uc)
        o_d2 = U(o_d3 + uc * U(R))
        o_d1 = U(o_d2 + u2 * U(R))
        tid, nt = U(cuda.threadIdx.x), U(cuda.blockDim.x)
        lane = U(tid & U(31))
        warp = U(tid >> U(5))
        nwarps = U(nt >> U(5))
        inv_b = ONE / float32(nb)
        acc = cuda.local.array(R, float32)
        ntiles = U(U(unb + U(R - 1)) // U(R))
        tile = U(cuda.blockIdx.x)
        while tile < ntiles:  # block-uniform
            r0 = U(tile * U(R))
            nr = U(min(U(R), U(unb - r0)))
            t = tid
            while t < U(U(R) * ni):  # rows past the batch are zeros: every phase may run all R rows
                sm[t] = x[U(r0 * ni + t)] if t < U(nr * ni) else ZERO
                t = U(t + nt)
            cuda.syncthreads()
            gemv(w1, b1, u1, ni, sm, U0, ni, o_h1, u1, h1, U(r0 * u1), nr, act, lane, warp, nwarps)
            cuda.syncthreads()
            gemv(w2, b2, u2, u1, sm, o_h1, u1, o_h2, u2, h2, U(r0 * u2), nr, act, lane, warp, nwarps)
            cuda.syncthreads()
            gemv(w3, b3, uc, u2, sm, o_h2, u2, o_z, uc, logits, U(r0 * uc), nr, ACT_IDENTITY, lane, warp, nwarps)
            cuda.syncthreads()
            if tid < U(R):  # one thread a row: the loss row and dz3 (zeros for rows past the batch)
                if tid < nr:
                    r = U(r0 + tid)
                    loss, hit = _xent_row(sm, U(o_z + tid * uc), U(labels[r]), sm, U(o_d3 + tid), U(R), uc, inv_b)
                    rowstat[U(r + r)] = loss
                    rowstat[U(r + r + U1)] = hit
                    for c in range(uc):
                        dz3[U(r * uc + U(c))] = sm[U(o_d3 + U(c) * U(R) + tid)]
                else:
                    for c in range(uc):
                        sm[U(o_d3 + U(c) * U(R) + tid)] = ZERO
            cuda.syncthreads()
            back(sm, o_d3, w3, uc, u2, o_h2, o_d2, dz2, r0, nr, act, tid, nt)  # dz2 = (dz3 w3)·act'(h2)
            cuda.syncthreads()
            back(sm, o_d2, w2, u2, u1, o_h1, o_d1, dz1, r0, nr, act, tid, nt)  # dz1 = (dz2 w2)·act'(h1)
            cuda.syncthreads()
            i = tid
            while i < ni:  # dx = dz1 w1, a column a thread, routed through S4's pooling into dz_conv
                for r in range(R):
                    acc[r] = ZERO
                for o in range(u1):
                    wv = w1[U(U(o) * ni + i)]
                    for r in range(R):
                        acc[r] = cuda.fma(sm[U(o_d1 + U(o) * U(R) + U(r))], wv, acc[r])
                for r in range(R):
                    if U(r) < nr:
                        if mode == POOL_ROUTED:  # the routed gradient at S4's shape (launch-uniform branch)
                            dz_conv[U(U(r0 + U(r)) * ni + i)] = acc[r] * act_grad(sm[U(U(r) * ni + i)], act)
                        else:
                            _route(dz_conv, yconv, argmax, acc[r], U(r0 + U(r)), i, ni, pp, wp, U(cc), plane, uww,
                                   act, mode)
                i = U(i + nt)
            if mode != POOL_ROUTED and (U(hp + hp) != uhh or U(wp + wp) != uww):
                _zero_trailing(dz_conv, r0, nr, per, uhh, uww, hp, wp, tid, nt)
            cuda.syncthreads()  # the next tile restages s_x
            tile = U(tile + U(cuda.gridDim.x))

    return rows


def make_v2(R: int) -> Any:
    """head_train_v2 compiled for R rows a block (head.cu's HEAD_ROWS: 1, 2, 4 or 8; one dispatcher each, as
    head.cu's one kernel per HEAD_ROWS). ``rows`` (the launch's) must equal R."""
    if R not in (1, 2, 4, 8):
        raise ValueError(f"head_train_v2: rows {R} is not 1, 2, 4 or 8")
    body = _make_rows_v2(R)

    def head_train_v2(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3,
                      rowstat, nb, cc, hh, ww, nh1, nh2, nc, act, mode, rows):
        # dynamic shared memory: R·(I + 2·H1 + 2·H2 + 2·NC) floats (cupy_backend/fused.head_v2_smem)
        sm = cuda.shared.array(0, float32)
        body(sm, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3, rowstat,
             nb, cc, hh, ww, nh1, nh2, nc, act, mode)

    return cuda.jit(head_train_v2) if SIM else cuda.jit(launch_bounds=v2_bounds(R))(head_train_v2)


_V2: dict[int, Any] = {}


def v2_kernel(rows: int) -> Any:
    """head_train_v2 for ``rows`` rows a block (built at the first call; 1 row at import: KERNELS' entry)."""
    k = _V2.get(rows)
    if k is None:
        k = _V2[rows] = make_v2(rows)
    return k


#: the table's head_train_v2 (compile checks, the kernel cache): the 1-row body (v2's kernel at batch ≤ 264); 2, 4
#: and 8 rows: v2_kernel(rows), compiled at their first launch
head_train_v2 = v2_kernel(1)


# ---------------------------------------------------------------------------------------------- v2: wgrad


@device_function
def _wg_put(s, o, i, nout, na, dw, db):
    if o < nout and i < na:
        dw[U(o * na + i)] = s
    elif o < nout and i == na:
        db[o] = s


@device_function
def _wg_input(a, b, i, nb, na):
    """Element (b, i) of a wgrad operand as the tiles stage it: a[b, i] (a (B, A) flat), 1 in column A (the bias), 0
    past the batch."""
    val = ZERO
    if b < nb:
        if i < na:
            val = a[U(b * na + i)]
        elif i == na:
            val = ONE
    return val


@device_function
def _wgrad_coords(tile, na, tid):
    """A wgrad tile's first output row o0 and column i0 (tiles row-major over [dw | db], ⌈(A+1)/TI⌉ a row) and the
    thread's group g, its index lt in the group, its pair of rows ty and of columns tx (2×2 outputs a thread)."""
    tiles_i = U(U(na + U(WG_TI)) // U(WG_TI))  # ⌈(A+1)/TI⌉
    ot = U(tile // tiles_i)
    lt = U(tid & U(WG_THREADS - 1))
    return (U(ot * U(WG_TO)), U(U(tile - ot * tiles_i) * U(WG_TI)), U(tid >> U(7)), lt, U(lt >> U(4)),  # TI/2 = 16
            U(lt & U(15)))


@device_function
def _wgrad_tile(dz, a, nb, nout, na, tile, dw, db, s_dz, s_a, s_part, tid):
    """head.cu head_wgrad_tile: one WG_TO × WG_TI tile of [dw | db] (the bias: a column of ones). WG2_GROUPS groups
    of 128 threads take chunks g, g + 4, ... of WG_KC rows (staged in shared memory), 2×2 outputs a thread, each
    summed in row order; group 0 adds the groups' partials in group order. (v3 passes its sizes as constants.)"""
    o0, i0, g, lt, ty, tx = _wgrad_coords(tile, na, tid)
    a0 = ZERO
    a1 = ZERO
    a2 = ZERO
    a3 = ZERO
    nchunks = U(U(nb + U(WG_KC - 1)) // U(WG_KC))
    rounds = U(U(nchunks + U(WG2_GROUPS - 1)) // U(WG2_GROUPS))
    gd = U(g * U(WG_KC * WG_TO))
    ga = U(g * U(WG_KC * WG_TI))
    for rd in range(rounds):  # every thread runs every round: the barriers are block-wide
        b0 = U(U(U(rd) * U(WG2_GROUPS) + g) * U(WG_KC))
        t = lt
        while t < U(WG_KC * WG_TO):
            k = U(t >> U(4))
            oo = U(t & U(WG_TO - 1))
            o = U(o0 + oo)
            b = U(b0 + k)
            s_dz[U(gd + t)] = dz[U(b * nout + o)] if b < nb and o < nout else ZERO
            t = U(t + U(WG_THREADS))
        t = lt
        while t < U(WG_KC * WG_TI):
            k = U(t >> U(5))
            i = U(i0 + U(t & U(WG_TI - 1)))
            b = U(b0 + k)
            s_a[U(ga + t)] = _wg_input(a, b, i, nb, na)
            t = U(t + U(WG_THREADS))
        cuda.syncthreads()
        kn = U(min(U(WG_KC), U(nb - b0))) if b0 < nb else U0
        pd = U(gd + ty + ty)
        pa = U(ga + tx + tx)
        for _ in range(kn):
            d0 = s_dz[pd]
            d1 = s_dz[U(pd + U1)]
            v0 = s_a[pa]
            v1 = s_a[U(pa + U1)]
            a0 = cuda.fma(d0, v0, a0)
            a1 = cuda.fma(d0, v1, a1)
            a2 = cuda.fma(d1, v0, a2)
            a3 = cuda.fma(d1, v1, a3)
            pd = U(pd + U(WG_TO))
            pa = U(pa + U(WG_TI))
        cuda.syncthreads()
    _wgrad_finish(a0, a1, a2, a3, g, lt, U(o0 + ty + ty), U(i0 + tx + tx), nout, na, dw, db, s_part)


@device_function
def _wgrad_finish(a0, a1, a2, a3, g, lt, o, i, nout, na, dw, db, s_part):
    """head.cu head_wgrad_finish: groups 1..3 leave their 2×2 partials in shared memory, group 0 adds them to its own
    in group order and writes the thread's outputs (o, i) .. (o + 1, i + 1) of [dw | db] (column na: the bias)."""
    if g > U0:
        p = U(U(U(g - U1) * U(WG_THREADS) + lt) * U(4))
        s_part[p] = a0
        s_part[U(p + U1)] = a1
        s_part[U(p + U(2))] = a2
        s_part[U(p + U(3))] = a3
    cuda.syncthreads()
    if g == U0:
        for gg in range(1, WG2_GROUPS):
            p = U(U(U(gg - 1) * WG_THREADS + lt) * U(4))
            a0 += s_part[p]
            a1 += s_part[U(p + U1)]
            a2 += s_part[U(p + U(2))]
            a3 += s_part[U(p + U(3))]
        _wg_put(a0, o, i, nout, na, dw, db)
        _wg_put(a1, o, U(i + U1), nout, na, dw, db)
        _wg_put(a2, U(o + U1), i, nout, na, dw, db)
        _wg_put(a3, U(o + U1), U(i + U1), nout, na, dw, db)


#: wgrad v4: a thread's share of a group's chunk, dz values and input values (head.cu's ND, NA)
WG_ND = WG_KC * WG_TO // WG_THREADS  # 4
WG_NA = WG_KC * WG_TI // WG_THREADS  # 8
assert WG_ND * WG_THREADS == WG_KC * WG_TO and WG_NA * WG_THREADS == WG_KC * WG_TI, "wgrad v4: whole chunks"


@device_function
def _wgrad_fetch(dz, a, nb, nout, na, b0, o0, i0, lt, pd, pa):
    """head.cu head_wgrad_fetch: the thread's share of the chunk of rows b0 .. b0 + WG_KC into registers: pd[j] =
    dz element t = lt + 128·j of the [k][WG_TO] chunk, pa[j] = input element t of the [k][WG_TI] chunk (column na: 1,
    the bias; rows past the batch: 0), as _wgrad_tile stages them."""
    for j in range(WG_ND):
        t = U(lt + U(j * WG_THREADS))
        b = U(b0 + U(t >> U(4)))
        o = U(o0 + U(t & U(WG_TO - 1)))
        pd[j] = dz[U(b * nout + o)] if b < nb and o < nout else ZERO
    for j in range(WG_NA):
        t = U(lt + U(j * WG_THREADS))
        b = U(b0 + U(t >> U(5)))
        i = U(i0 + U(t & U(WG_TI - 1)))
        pa[j] = _wg_input(a, b, i, nb, na)


@device_function
def _wgrad_tile_v4(dz, a, nb, nout, na, tile, dw, db, s_dz, s_a, s_part, tid):
    """head.cu head_wgrad_tile_v4: _wgrad_tile's tile, groups, chunk order and sums with the staging pipelined: the
    next round's chunk is fetched into registers (_wgrad_fetch: 4 + 8 a thread) right after the barrier that
    publishes this round's, so its loads are in flight during this round's k steps; the k loop runs all WG_KC steps
    (rows past the batch are zeros in both operands: each adds exactly +0 to a sum that is never −0), so every sum
    is v3's, bit for bit. (v4 passes its sizes as constants, as v3.)"""
    o0, i0, g, lt, ty, tx = _wgrad_coords(tile, na, tid)
    a0 = ZERO
    a1 = ZERO
    a2 = ZERO
    a3 = ZERO
    pd = cuda.local.array(WG_ND, float32)
    pa = cuda.local.array(WG_NA, float32)
    nchunks = U(U(nb + U(WG_KC - 1)) // U(WG_KC))
    rounds = U(U(nchunks + U(WG2_GROUPS - 1)) // U(WG2_GROUPS))
    gd = U(g * U(WG_KC * WG_TO))
    ga = U(g * U(WG_KC * WG_TI))
    _wgrad_fetch(dz, a, nb, nout, na, U(g * U(WG_KC)), o0, i0, lt, pd, pa)
    rd = U0
    while rd < rounds:  # every thread runs every round: the barriers are block-wide (uint32, as every stride loop)
        for j in range(WG_ND):
            s_dz[U(gd + U(lt + U(j * WG_THREADS)))] = pd[j]
        for j in range(WG_NA):
            s_a[U(ga + U(lt + U(j * WG_THREADS)))] = pa[j]
        cuda.syncthreads()
        if U(rd + U1) < rounds:  # the next round's chunk, in flight during this round's k steps
            _wgrad_fetch(dz, a, nb, nout, na, U(U(U(U(rd + U1) * U(WG2_GROUPS)) + g) * U(WG_KC)), o0, i0, lt, pd, pa)
        pdz = U(gd + ty + ty)
        pax = U(ga + tx + tx)
        for k in range(WG_KC):
            d0 = s_dz[U(pdz + U(k * WG_TO))]
            d1 = s_dz[U(pdz + U(k * WG_TO + 1))]
            v0 = s_a[U(pax + U(k * WG_TI))]
            v1 = s_a[U(pax + U(k * WG_TI + 1))]
            a0 = cuda.fma(d0, v0, a0)
            a1 = cuda.fma(d0, v1, a1)
            a2 = cuda.fma(d1, v0, a2)
            a3 = cuda.fma(d1, v1, a3)
        cuda.syncthreads()
        rd = U(rd + U1)
    _wgrad_finish(a0, a1, a2, a3, g, lt, U(o0 + ty + ty), U(i0 + tx + tx), nout, na, dw, db, s_part)


@device_function
def _wgrad_stats(rowstat, stats, state, nb, s_part, tid):
    """head.cu's stats block: thread t sums a contiguous run of rows in order, then a fixed tree over the threads;
    stats[STEP_IN_EPOCH mod S] = [Σ loss, Σ hit]."""
    per = U(U(nb + U(WG2_THREADS - 1)) // U(WG2_THREADS))
    lo = ZERO
    hi = ZERO
    b = U(tid * per)
    end = U(min(nb, U(U(tid + U1) * per)))
    while b < end:
        lo += rowstat[U(b + b)]
        hi += rowstat[U(b + b + U1)]
        b = U(b + U1)
    s_part[tid] = lo
    s_part[U(tid + U(WG2_THREADS))] = hi
    cuda.syncthreads()
    half = U(WG2_THREADS // 2)
    while half > U0:
        if tid < half:
            s_part[tid] += s_part[U(tid + half)]
            s_part[U(tid + U(WG2_THREADS))] += s_part[U(tid + U(WG2_THREADS) + half)]
        cuda.syncthreads()
        half = U(half >> U1)
    if tid == U0:
        s = U(stats.shape[0])
        v = state[STEP_IN_EPOCH]
        row = U(U(v) % s) if v >= 0 else U(s - U1 - U(U(-(v + 1)) % s))  # common.cuh pos_mod
        stats[row, 0] = s_part[0]
        stats[row, 1] = s_part[WG2_THREADS]


def _make_wgrad_body(tile_fn: Any) -> Any:
    """The wgrad launch with ``tile_fn`` for its tiles (_wgrad_tile: v2 and v3; _wgrad_tile_v4: v4): block b < tiles
    a tile of [dw1|db1], then [dw2|db2], [dw3|db3] (row-major tiles); the block after them the stats row; blocks
    stride over them (a capped grid)."""

    @device_function
    def body(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, nb, ni, nh1, nh2, nc):
        s_dz = cuda.shared.array(WG_SDZ, float32)
        s_a = cuda.shared.array(WG_SA, float32)
        s_part = cuda.shared.array(WG_SPART, float32)
        tid = U(cuda.threadIdx.x)
        t1 = U(U(U(nh1 + U(WG_TO - 1)) // U(WG_TO)) * U(U(ni + U(WG_TI)) // U(WG_TI)))
        t2 = U(U(U(nh2 + U(WG_TO - 1)) // U(WG_TO)) * U(U(nh1 + U(WG_TI)) // U(WG_TI)))
        t3 = U(U(U(nc + U(WG_TO - 1)) // U(WG_TO)) * U(U(nh2 + U(WG_TI)) // U(WG_TI)))
        tile = U(cuda.blockIdx.x)
        while tile <= U(t1 + t2 + t3):  # block-uniform branches: the barriers inside are reached by the whole block
            if tile < t1:
                tile_fn(dz1, x, nb, nh1, ni, tile, dw1, db1, s_dz, s_a, s_part, tid)
            elif tile < U(t1 + t2):
                tile_fn(dz2, h1, nb, nh2, nh1, U(tile - t1), dw2, db2, s_dz, s_a, s_part, tid)
            elif tile < U(t1 + t2 + t3):
                tile_fn(dz3, h2, nb, nc, nh2, U(tile - t1 - t2), dw3, db3, s_dz, s_a, s_part, tid)
            else:
                _wgrad_stats(rowstat, stats, state, nb, s_part, tid)
            cuda.syncthreads()  # s_part is the next tile's too
            tile = U(tile + U(cuda.gridDim.x))

    return body


_wgrad_body = _make_wgrad_body(_wgrad_tile)
_wgrad_body_v4 = _make_wgrad_body(_wgrad_tile_v4)


@_jit("head_train_wgrad_v2")
def head_train_wgrad_v2(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, nb, ni, nh1,
                        nh2, nc):
    _wgrad_body(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, U(nb), U(ni), U(nh1),
                U(nh2), U(nc))


# ---------------------------------------------------------------------------------------------- v3


def _group(o: int, nw: int) -> int:
    """head.cu head3::group: outputs a warp takes at once, the power of two (≤ 32) spreading O over the warps."""
    f = 1
    while f * nw < o and f < 32:
        f *= 2
    return f


def _parts(o: int, k: int, t: int) -> int:
    """head.cu head3::parts: threads per output of a column product (as many as the block holds, ≥ 8 terms each)."""
    return max(1, min(t // o, k // 8))


#: head_train_v3's geometry (C, Hp, Wp, H, W, H1, H2, NC): x (B,C,Hp,Wp), yconv (B,C,H,W); LeNet-5's
LENET_GEOM = (16, 5, 5, 10, 10, 120, 84, 10)


def v3_layout(geom: tuple[int, ...]) -> dict[str, int]:
    """head.cu namespace head3's shared-memory offsets (floats) for a geometry, and SMEM_FLOATS."""
    c, hp, wp, _, _, n1, n2, nc = geom
    i = c * hp * wp
    nw = HEAD3_THREADS // 32
    fw1 = _group(n1, nw)
    pw1 = min(-(-n1 // fw1), nw)
    off = {"W2": i}
    off["W3"] = off["W2"] + max(n2 * n1, pw1 * i)
    off["H1"] = off["W3"] + nc * n2
    off["H2"] = off["H1"] + n1
    off["Z"] = off["H2"] + n2
    off["D3"] = off["Z"] + nc
    off["D2"] = off["D3"] + nc
    off["D1"] = off["D2"] + n2
    off["CP"] = off["D1"] + n1
    off["SMEM_FLOATS"] = off["CP"] + HEAD3_THREADS
    return off


def _make_fwd3(O: int, K: int) -> Any:
    """head.cu head3_fwd<O, K>: out[o] = act(bias[o] + Σ_k in[k]·W[o][k]); warp w takes groups w, w + NW, ... of
    F = group(O) outputs, lane l the terms k = l + 32j (j unrolled: F·⌈K/32⌉ independent coalesced loads a lane),
    in j order; then the transpose tree. W at w[wo + o·K + k] (global, or the staged copy in shared memory).
    Writes sm[oo + o] and g[go + o]."""
    T = HEAD3_THREADS
    NW = T // 32
    F = _group(O, NW)
    KJ = -(-K // 32)
    G = -(-O // F)
    ROUNDS = -(-G // NW)
    lanes = 32 // F
    lanes_log = lanes.bit_length() - 1
    tsum = _make_tsum(F)

    @device_function
    def fwd(w, wo, bias, sm, io, oo, g, go, act, lane, warp):
        v = cuda.local.array(F, float32)
        for rd in range(ROUNDS):
            grp = U(U(rd * NW) + warp)
            active = grp < U(G)
            if active or SIM:  # warp-uniform (block-uniform in the simulator)
                o0 = U(grp * U(F))
                o = U(o0 + U(lane >> U(lanes_log)))
                writer = U(lane & U(lanes - 1)) == U0 and o < U(O)
                bo = bias[o] if writer else ZERO  # issued before the sums' loads
                for f in range(F):
                    v[f] = ZERO
                if active:
                    for j in range(KJ):
                        k = U(lane + U(32 * j))
                        if K % 32 == 0 or j < KJ - 1 or k < U(K):
                            xv = sm[U(io + k)]
                            for f in range(F):
                                row = U(o0 + U(f)) if O % F == 0 else U(min(U(o0 + U(f)), U(O - 1)))
                                v[f] = cuda.fma(xv, w[U(wo + row * U(K) + k)], v[f])
                s = tsum(v, lane)
                if writer:
                    y = activate(s + bo, act)
                    sm[U(oo + o)] = y
                    g[U(go + o)] = y

    return fwd


def _make_col3(O: int, K: int) -> Any:
    """head.cu head3_col<O, K>: sm[dn + o] = g[go + o] = (Σ_k sm[do + k]·sm[wo + k·O + o])·act'(sm[ho + o]), the
    layer's weights (K, O) in shared memory; P = parts(O, K) threads an output each sum a run of KC terms in k order,
    their partials (sm[po ..], P·O ≤ T floats) added in part order."""
    T = HEAD3_THREADS
    P = _parts(O, K, T)
    KC = -(-K // P)
    ROUNDS = -(-O // T)

    @device_function
    def col(sm, wo, do, ho, dn, g, go, po, act, t):
        if P == 1:
            for rd in range(ROUNDS):
                o = U(t + U(rd * T))
                if o < U(O):
                    acc = ZERO
                    for k in range(K):
                        acc = cuda.fma(sm[U(do + U(k))], sm[U(wo + U(k * O) + o)], acc)
                    d = acc * act_grad(sm[U(ho + o)], act)
                    sm[U(dn + o)] = d
                    g[U(go + o)] = d
        else:
            if t < U(P * O):
                p = U(t // U(O))  # a constant divisor
                o = U(t - p * U(O))
                acc = ZERO
                for kk in range(KC):
                    k = U(p * U(KC) + U(kk))
                    if K % P == 0 or k < U(K):
                        acc = cuda.fma(sm[U(do + k)], sm[U(wo + k * U(O) + o)], acc)
                sm[U(po + p * U(O) + o)] = acc
            cuda.syncthreads()
            for rd in range(ROUNDS):
                o = U(t + U(rd * T))
                if o < U(O):
                    acc = sm[U(po + o)]
                    for p in range(1, P):
                        acc += sm[U(po + U(p * O) + o)]
                    d = acc * act_grad(sm[U(ho + o)], act)
                    sm[U(dn + o)] = d
                    g[U(go + o)] = d

    return col


def make_v3(geom: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """(head_train_v3, head_train_wgrad_v3, head_train_wgrad_v4) compiled for ``geom`` = (C, Hp, Wp, H, W, H1, H2,
    NC) (head.cu's HEAD_* defines): every loop a constant trip count, every divisor a constant. H = 2·Hp or 2·Hp + 1
    (likewise W); the routed form (mode POOL_ROUTED: dz_conv at x's shape) reads no yconv and is compiled with
    H = 2·Hp, W = 2·Wp."""
    C, HP, WP, H, W, N1, N2, NC = (int(v) for v in geom)
    if min(geom) < 1 or H not in (2 * HP, 2 * HP + 1) or W not in (2 * WP, 2 * WP + 1):
        raise ValueError(f"head_train_v3: geometry {geom} is not (C, Hp, Wp, H, W, H1, H2, NC) with yconv pooling to x")
    T = HEAD3_THREADS
    NW = T // 32
    I = C * HP * WP  # noqa: E741
    PP = HP * WP
    PER = C * H * W
    lay = v3_layout(geom)
    OW2, OW3, OH1, OH2, OZ = lay["W2"], lay["W3"], lay["H1"], lay["H2"], lay["Z"]
    OD3, OD2, OD1, OCP = lay["D3"], lay["D2"], lay["D1"], lay["CP"]
    FW1 = _group(N1, NW)
    GW1 = -(-N1 // FW1)
    PW1 = min(GW1, NW)
    GR1 = -(-GW1 // NW)
    KJ = -(-I // 32)
    RI, R21, R32 = -(-I // T), -(-(N2 * N1) // T), -(-(NC * N2) // T)
    ODD = H != 2 * HP or W != 2 * WP
    RPER = -(-PER // T)
    fwd1, fwd2, fwd3 = _make_fwd3(N1, I), _make_fwd3(N2, N1), _make_fwd3(NC, N2)
    col2, col1 = _make_col3(N2, NC), _make_col3(N1, N2)

    def head_train_v3(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3,
                      rowstat, nb, act, mode):
        # dynamic shared memory: SMEM_FLOATS floats (v3_layout; cupy_backend/fused.head_v3_smem)
        sm = cuda.shared.array(0, float32)
        t = U(cuda.threadIdx.x)
        lane = U(t & U(31))
        warp = U(t >> U(5))
        unb = U(nb)
        inv_b = ONE / float32(nb)
        acc = cuda.local.array(KJ, float32)
        r = U(cuda.blockIdx.x)
        while r < unb:  # a row a block (block-stride only under a capped grid)
            for q in range(RI):  # stage x, w2, w3: every load issued before the barrier (one round trip)
                e = U(t + U(q * T))
                if e < U(I):
                    sm[e] = x[U(r * U(I) + e)]
            for q in range(R21):
                e = U(t + U(q * T))
                if e < U(N2 * N1):
                    sm[U(U(OW2) + e)] = w2[e]
            for q in range(R32):
                e = U(t + U(q * T))
                if e < U(NC * N2):
                    sm[U(U(OW3) + e)] = w3[e]
            cuda.syncthreads()
            fwd1(w1, U0, b1, sm, U0, U(OH1), h1, U(r * U(N1)), act, lane, warp)  # h1 = act(x w1ᵀ + b1)
            cuda.syncthreads()
            fwd2(sm, U(OW2), b2, sm, U(OH1), U(OH2), h2, U(r * U(N2)), act, lane, warp)  # h2 = act(h1 w2ᵀ + b2)
            cuda.syncthreads()
            fwd3(sm, U(OW3), b3, sm, U(OH2), U(OZ), logits, U(r * U(NC)), ACT_IDENTITY, lane, warp)  # z
            cuda.syncthreads()
            if t == U0:  # the loss row and dz3
                loss, hit = _xent_row(sm, U(OZ), U(labels[r]), sm, U(OD3), U1, U(NC), inv_b)
                rowstat[U(r + r)] = loss
                rowstat[U(r + r + U1)] = hit
            cuda.syncthreads()
            if t < U(NC):
                dz3[U(r * U(NC) + t)] = sm[U(U(OD3) + t)]
            col2(sm, U(OW3), U(OD3), U(OH2), U(OD2), dz2, U(r * U(N2)), U(OCP), act, t)  # dz2 = (dz3 w3)·act'(h2)
            cuda.syncthreads()
            col1(sm, U(OW2), U(OD2), U(OH1), U(OD1), dz1, U(r * U(N1)), U(OCP), act, t)  # dz1 = (dz2 w2)·act'(h1)
            cuda.syncthreads()
            # dx = dz1 w1: warp w (< PW1) takes the C5 outputs of its groups (the forward's footprint of w1), lane l
            # the columns i = l + 32j; its partials over w2's no longer needed copy, [PW1][I]
            if warp < U(PW1):
                for j in range(KJ):
                    acc[j] = ZERO
                for gi in range(GR1):
                    grp = U(warp + U(gi * NW))
                    if grp < U(GW1):
                        for f in range(FW1):
                            o = U(grp * U(FW1) + U(f))
                            if N1 % FW1 == 0 or o < U(N1):
                                d = sm[U(U(OD1) + o)]
                                for j in range(KJ):
                                    i = U(lane + U(32 * j))
                                    if I % 32 == 0 or j < KJ - 1 or i < U(I):
                                        acc[j] = cuda.fma(d, w1[U(o * U(I) + i)], acc[j])
                for j in range(KJ):
                    i = U(lane + U(32 * j))
                    if I % 32 == 0 or i < U(I):
                        sm[U(U(OW2) + warp * U(I) + i)] = acc[j]
            cuda.syncthreads()
            for q in range(RI):  # the sum in warp order, routed through S4's pooling into dz_conv
                i = U(t + U(q * T))
                if i < U(I):
                    g = sm[U(U(OW2) + i)]
                    for wq in range(1, PW1):
                        g += sm[U(U(OW2 + wq * I) + i)]
                    if mode == POOL_ROUTED:  # the routed gradient at S4's shape (launch-uniform branch)
                        dz_conv[U(r * U(I) + i)] = g * act_grad(sm[i], act)
                    else:
                        _route(dz_conv, yconv, argmax, g, r, i, U(I), U(PP), U(WP), U(C), U(H * W), U(W), act, mode)
            if ODD and mode != POOL_ROUTED:  # taps no 2×2 window covers: 0
                for q in range(RPER):
                    e = U(t + U(q * T))
                    if e < U(PER):
                        e2 = U(e // U(W))
                        yy = U(e2 - U(e2 // U(H)) * U(H))
                        xx = U(e - e2 * U(W))
                        if yy >= U(2 * HP) or xx >= U(2 * WP):
                            dz_conv[U(r * U(PER) + e)] = ZERO
            cuda.syncthreads()  # the next row restages
            r = U(r + U(cuda.gridDim.x))

    def head_train_wgrad_v3(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, nb, ni,
                            nh1, nh2, nc):
        # v2's tiles and stats block with the sizes compiled in (ni .. nc: the launch's, unused)
        _wgrad_body(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, U(nb), U(I), U(N1),
                    U(N2), U(NC))

    def head_train_wgrad_v4(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, nb, ni,
                            nh1, nh2, nc):
        # v3's tiles, sums and stats block, the chunk staging pipelined (_wgrad_tile_v4)
        _wgrad_body_v4(x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, U(nb), U(I),
                       U(N1), U(N2), U(NC))

    return (_jit("head_train_v3")(head_train_v3), _jit("head_train_wgrad_v3")(head_train_wgrad_v3),
            _jit("head_train_wgrad_v4")(head_train_wgrad_v4))


_V3: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}


def v3_kernels(geom: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """head_train_v3's kernels for a geometry (built at the first call; LeNet-5's at import): the rows kernel, wgrad
    v3 and wgrad v4 (the plan's since 2026-12-07: v3's bits, the staging pipelined)."""
    geom = tuple(int(v) for v in geom)
    k = _V3.get(geom)
    if k is None:
        k = _V3[geom] = make_v3(geom)
    return k


head_train_v3, head_train_wgrad_v3, head_train_wgrad_v4 = v3_kernels(LENET_GEOM)


# ---------------------------------------------------------------------------------------------- v4
#
# head.cu's head_train_v4 ("v4: rows, large batch"), kernel for kernel: HEAD4_ROWS rows of the batch a block (8, 16
# or 32), 8·rows threads, a warp per 4 rows; every product a register-tiled GEMM over the block's rows (thread (warp
# w, lane l): rows 4w .. 4w+3 × columns l + 32j): C5 and F6 4 × jp(O) tiles over K chunks of HEAD4_KC staged in shared
# memory; dz1 and dx 4 × J tiles with w2 / w1 read from global memory along their rows. One static shared array laid
# out as head.cu's namespace head4 (v4_layout: 4·SMEM_FLOATS bytes = fused.head_v4_smem). Every output summed over k
# in order from 0, the bias added last (head.cu's order; the same sums, not necessarily the same bits: FMA contraction
# and the order of the activations' float ops are the compilers'). What Numba cannot say (see also v2/v3's notes):
# - no float4: s_a's four rows of a k step are four scalar shared loads (head.cu: one float4 load; NVVM fuses none
#   into ld.shared.v4); no __ldg: plain global loads (ld.global, not .nc);
# - no #pragma unroll: the tiles' u (4) and j (JP, J) loops have closure-constant trip counts that LLVM unrolls (the
#   tiles stay in registers: the compile checks assert no stack frame); the KC k steps of a chunk are unrolled 4 a
#   trip by hand (head.cu: all 20; NVVM unrolled them by 2 by itself), the backward tiles' k loop 4 a trip by hand
#   (head.cu: #pragma unroll 4: 4·(4 + J) loads issued before their 16·J FMAs), then K % 4 steps; head.cu's
#   "#pragma unroll 1" loops (the column passes, the K chunks) are loops;
# - dx's epilogue (7 columns × 4 rows, each routed through S4's pooling) is too big for LLVM to unroll, and a read of
#   tile[u·J + j] at a run-time j would put the whole tile in local memory (a 112-byte stack): each column is read at
#   j = 0 and the tile then shifted one column (constant indices: register moves);
# - backward tiles' columns ≥ N re-read column N − 1 instead of loading 0 under a condition (their sums are never
#   stored): a conditional load is a branch in NVVM's output, which kept the step's loads from issuing together.
# The tile loop: a block takes tiles blockIdx.x, + gridDim.x, ... (a capped grid; one tile a block uncapped, as
# head.cu); no barrier between two tiles (the next tile's first shared-memory writes, the chunk staging, come after
# the barrier that ended the last chunk's reads, and its h1 after a barrier that every thread reaches only once done
# with this tile).


def v4_bounds(rows: int) -> tuple[int, int]:
    """head.cu's launch bounds of head_train_v4 at HEAD4_ROWS = rows: __launch_bounds__(8·rows, 512 / (8·rows)),
    512 threads an SM, so ≤ 128 registers a thread."""
    return 8 * rows, 512 // (8 * rows)


#: head.cu HEAD4_ROWS (cupy_backend/fused.HEAD4_ROWS_CHOICES), HEAD4_KC (forward products: K staged in chunks of
#: this many terms), HEAD4_JMAX (backward products: columns of 32 a lane per pass)
HEAD4_ROWS_CHOICES = (8, 16, 32)
HEAD4_KC = 20
HEAD4_JMAX = 7
#: v4's LeNet-5 rows kernels in the compile report, name → rows: the table's (8 rows) and REPORT_KERNELS' (16, 32)
V4_REPORT_ROWS = {"head_train_v4": 8, "head_train_v4_r16": 16, "head_train_v4_r32": 32}
LAUNCH_BOUNDS.update({name: v4_bounds(rows) for name, rows in V4_REPORT_ROWS.items()})


def _jp(o: int) -> int:
    """head.cu head4::jp: columns of 32 a lane takes per pass of a forward product (at most 4)."""
    return min(-(-o // 32), 4)


def v4_layout(geom: tuple[int, ...], rows: int) -> dict[str, int]:
    """head.cu namespace head4's shared-memory layout (floats) for a geometry and HEAD4_ROWS: h1 (then dz1) [R][H1],
    h2 (then dz2) [R][H2], z [R][NC], d3 [NC][R], a chunk of the rows [KC][RA] (RA = R + 4, 16-byte aligned), a
    chunk of the weights [KC][BW] (BW = 32·max(jp(H1), jp(H2)) + 1, odd); SMEM_FLOATS in all."""
    n1, n2, nc = (int(v) for v in geom[5:])
    off = {"H1": 0, "H2": rows * n1}
    off["Z"] = off["H2"] + rows * n2
    off["D3"] = off["Z"] + rows * nc
    off["A"] = (off["D3"] + nc * rows + 3) // 4 * 4
    off["RA"] = rows + 4
    off["BW"] = 32 * max(_jp(n1), _jp(n2)) + 1
    off["B"] = off["A"] + HEAD4_KC * off["RA"]
    off["SMEM_FLOATS"] = off["B"] + HEAD4_KC * off["BW"]
    return off


def _make_fwd4(R: int, O: int, K: int, lay: dict[str, int], OO: int) -> Any:
    """head.cu head4_fwd<O, K>: sm[OO + r·O + o] = act(bias[o] + Σ_k a[ao + r·K + k]·w[o·K + k]) for the block's R
    rows (rows ≥ nr read as 0) and o < O; the nr real rows also to g[go + r·O + o]. Passes of OP = 32·jp(O) columns;
    K in chunks of KC: the rows' chunk staged as [k][row] (s_a), the weights' transposed to [k][column] (s_b), then
    each thread's 4 × JP tile: a k step's 4 row values and JP weights feed 4·JP FMAs. Sums in k order from 0, the
    bias added last."""
    T = 8 * R
    KC = HEAD4_KC
    JP = _jp(O)
    OP = 32 * JP
    NO = -(-O // OP)
    NK = -(-K // KC)
    SA = -(-(R * KC) // T)
    SB = -(-(OP * KC) // T)
    TILE = 4 * JP  # the register tile's size (local arrays need a constant)
    OA, OB, RA, BW = lay["A"], lay["B"], lay["RA"], lay["BW"]
    assert KC % 4 == 0

    @device_function
    def kstep(sm, acc, lane, rb, kk):
        """One k step of the tile: 4 rows' values (s_a[kk][rb ..]) and JP weights (s_b[kk][lane + 32j]), 4·JP FMAs."""
        av = cuda.local.array(4, float32)
        pa = U(U(U(OA) + kk * U(RA)) + rb)
        for u in range(4):
            av[u] = sm[U(pa + U(u))]
        pb = U(U(U(OB) + kk * U(BW)) + lane)
        for j in range(JP):
            wv = sm[U(pb + U(32 * j))]
            for u in range(4):
                acc[u * JP + j] = cuda.fma(av[u], wv, acc[u * JP + j])

    @device_function
    def fwd(a, ao, nr, w, bias, sm, g, go, act, t, lane, rb):
        acc = cuda.local.array(TILE, float32)
        for p in range(NO):
            o0 = U(p * OP)
            for q in range(TILE):
                acc[q] = ZERO
            for c in range(NK):
                k0 = U(c * KC)
                for q in range(SA):  # the rows' chunk, [kk][r] (head.cu: constant divisor)
                    e = U(t + U(q * T))
                    if (R * KC) % T == 0 or e < U(R * KC):
                        r = U(e // U(KC))
                        kk = U(e - r * U(KC))
                        k = U(k0 + kk)
                        v = ZERO
                        if r < nr and (K % KC == 0 or k < U(K)):
                            v = a[U(ao + U(r * U(K)) + k)]
                        sm[U(U(OA) + U(kk * U(RA)) + r)] = v
                for q in range(SB):  # the weights' chunk transposed, [kk][column]
                    e = U(t + U(q * T))
                    if (OP * KC) % T == 0 or e < U(OP * KC):
                        oc = U(e // U(KC))
                        kk = U(e - oc * U(KC))
                        o = U(o0 + oc)
                        k = U(k0 + kk)
                        v = ZERO
                        if (O % OP == 0 or o < U(O)) and (K % KC == 0 or k < U(K)):
                            v = w[U(U(o * U(K)) + k)]
                        sm[U(U(OB) + U(kk * U(BW)) + oc)] = v
                cuda.syncthreads()
                for kq in range(KC // 4):  # the register tile, 4 rows × JP columns: k steps 4 a trip, by hand
                    kk = U(kq * 4)
                    kstep(sm, acc, lane, rb, kk)
                    kstep(sm, acc, lane, rb, U(kk + U1))
                    kstep(sm, acc, lane, rb, U(kk + U(2)))
                    kstep(sm, acc, lane, rb, U(kk + U(3)))
                cuda.syncthreads()
            for j in range(JP):  # the epilogue: act(acc + bias) into shared memory and the global rows
                o = U(U(o0 + U(32 * j)) + lane)
                if o < U(O):
                    bo = bias[o]
                    for u in range(4):
                        r = U(rb + U(u))
                        y = activate(acc[u * JP + j] + bo, act)
                        sm[U(U(OO) + U(r * U(O)) + o)] = y
                        if r < nr:
                            g[U(go + U(r * U(O)) + o)] = y

    return fwd


def _make_bwd4(K: int, N: int, JN: int) -> Any:
    """head.cu head4_bwd_tile<K, N, JN>: acc[u·JN + j] = Σ_k sm[db + u·K + k]·w[k·N + n0 + lane + 32j] for k in order
    from 0 (w (K, N) row-major from global memory along its rows: lanes read consecutive columns; db = the thread's
    first row of the operand in shared memory). Columns ≥ N re-read column N − 1 (head.cu reads 0): their sums are
    never stored, and the loads stay unconditional (a conditional load here is a branch, which keeps the step's loads
    from being issued together). The k loop unrolled by 4 by hand (head.cu: #pragma unroll 4): 4·(4 + JN) loads
    before their 16·JN FMAs."""
    KU = K // 4
    KR = K - 4 * KU
    TILE = 4 * JN
    EXACT = N % (32 * JN) == 0  # every pass's columns < N: no clamp

    @device_function
    def step(sm, db, w, n0, lane, acc, k):
        d = cuda.local.array(4, float32)
        for u in range(4):
            d[u] = sm[U(U(db + U(u * K)) + k)]
        for j in range(JN):
            n = U(U(n0 + U(32 * j)) + lane)
            if not EXACT:
                n = U(min(n, U(N - 1)))
            wv = w[U(U(k * U(N)) + n)]
            for u in range(4):
                acc[u * JN + j] = cuda.fma(d[u], wv, acc[u * JN + j])

    @device_function
    def tile(sm, db, w, n0, lane, acc):
        for q in range(TILE):
            acc[q] = ZERO
        for kq in range(KU):  # 4 steps a trip, by hand
            k = U(kq * 4)
            step(sm, db, w, n0, lane, acc, k)
            step(sm, db, w, n0, lane, acc, U(k + U1))
            step(sm, db, w, n0, lane, acc, U(k + U(2)))
            step(sm, db, w, n0, lane, acc, U(k + U(3)))
        for s in range(KR):
            step(sm, db, w, n0, lane, acc, U(4 * KU + s))

    return tile


def make_v4(geom: tuple[int, ...], R: int) -> Any:
    """head_train_v4 compiled for ``geom`` = (C, Hp, Wp, H, W, H1, H2, NC) (head.cu's HEAD_* defines, as make_v3) and
    R = HEAD4_ROWS rows a block (8, 16 or 32): block 8·R threads, grid ⌈B/R⌉ (cupy_backend/fused.head_plan), static
    shared memory v4_layout's SMEM_FLOATS floats, launch bounds v4_bounds(R). Phases, a barrier after each: C5 | F6 |
    output | the loss rows | dz2 | dz1 | dx routed into dz_conv (then the taps no window covers, odd yconv only)."""
    C, HP, WP, H, W, N1, N2, NC = (int(v) for v in geom)
    if min(geom) < 1 or H not in (2 * HP, 2 * HP + 1) or W not in (2 * WP, 2 * WP + 1):
        raise ValueError(f"head_train_v4: geometry {geom} is not (C, Hp, Wp, H, W, H1, H2, NC) with yconv pooling to x")
    if R not in HEAD4_ROWS_CHOICES:
        raise ValueError(f"head_train_v4: rows {R} is not one of {HEAD4_ROWS_CHOICES}")
    T = 8 * R
    I = C * HP * WP  # noqa: E741
    PP = HP * WP
    PER = C * H * W
    lay = v4_layout(geom, R)
    OH1, OH2, OZ, OD3, SMEM = lay["H1"], lay["H2"], lay["Z"], lay["D3"], lay["SMEM_FLOATS"]
    J1 = min(-(-N1 // 32), HEAD4_JMAX)  # dz1: columns of 32 a lane per pass, passes
    NP1 = -(-N1 // (32 * J1))
    JX = min(-(-I // 32), HEAD4_JMAX)  # dx
    NPX = -(-I // (32 * JX))
    RZ, R2 = -(-(R * NC) // T), -(-(R * N2) // T)
    TILE1, TILEX, JX1 = 4 * J1, 4 * JX, JX - 1  # the backward register tiles' sizes
    ODD = H != 2 * HP or W != 2 * WP
    fwd1, fwd2 = _make_fwd4(R, N1, I, lay, OH1), _make_fwd4(R, N2, N1, lay, OH2)
    bwd1, bwdx = _make_bwd4(N2, N1, J1), _make_bwd4(N1, I, JX)

    def head_train_v4(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3,
                      rowstat, nb, act, mode):
        sm = cuda.shared.array(SMEM, float32)
        t = U(cuda.threadIdx.x)
        lane = U(t & U(31))
        rb = U(U(t >> U(5)) * U(4))  # the warp's first row
        unb = U(nb)
        inv_b = ONE / float32(nb)
        acc1 = cuda.local.array(TILE1, float32)
        accx = cuda.local.array(TILEX, float32)
        ntiles = U(U(unb + U(R - 1)) // U(R))
        tile = U(cuda.blockIdx.x)
        while tile < ntiles:  # a tile of R rows a block (block-stride only under a capped grid)
            r0 = U(tile * U(R))
            nr = U(min(U(R), U(unb - r0)))
            fwd1(x, U(r0 * U(I)), nr, w1, b1, sm, h1, U(r0 * U(N1)), act, t, lane, rb)  # h1 = act(x w1ᵀ + b1)
            cuda.syncthreads()
            fwd2(sm, U(OH1), nr, w2, b2, sm, h2, U(r0 * U(N2)), act, t, lane, rb)  # h2 = act(h1 w2ᵀ + b2)
            cuda.syncthreads()
            for q in range(RZ):  # z = h2 w3ᵀ + b3, a thread per (row, class)
                e = U(t + U(q * T))
                if (R * NC) % T == 0 or e < U(R * NC):
                    r = U(e // U(NC))
                    c = U(e - r * U(NC))
                    acc = ZERO
                    for k in range(N2):
                        acc = cuda.fma(sm[U(U(OH2 + k) + U(r * U(N2)))], w3[U(U(c * U(N2)) + U(k))], acc)
                    z = acc + b3[c]
                    sm[U(U(OZ) + e)] = z
                    if r < nr:
                        logits[U(U(U(r0 + r) * U(NC)) + c)] = z
            cuda.syncthreads()
            if t < U(R):  # a thread a row: the loss row and dz3 (zeros for rows past the batch)
                if t < nr:
                    r = U(r0 + t)
                    loss, hit = _xent_row(sm, U(U(OZ) + U(t * U(NC))), U(labels[r]), sm, U(U(OD3) + t), U(R), U(NC),
                                          inv_b)
                    rowstat[U(r + r)] = loss
                    rowstat[U(r + r + U1)] = hit
                    for c in range(NC):
                        dz3[U(U(r * U(NC)) + U(c))] = sm[U(U(OD3 + c * R) + t)]
                else:
                    for c in range(NC):
                        sm[U(U(OD3 + c * R) + t)] = ZERO
            cuda.syncthreads()
            for q in range(R2):  # dz2 = (dz3 w3)·act'(h2), a thread per (row, column), in place over h2
                e = U(t + U(q * T))
                if (R * N2) % T == 0 or e < U(R * N2):
                    r = U(e // U(N2))
                    j = U(e - r * U(N2))
                    acc = ZERO
                    for c in range(NC):
                        acc = cuda.fma(sm[U(U(OD3 + c * R) + r)], w3[U(U(c * N2) + j)], acc)
                    d = acc * act_grad(sm[U(U(OH2) + e)], act)
                    sm[U(U(OH2) + e)] = d
                    if r < nr:
                        dz2[U(U(r0 * U(N2)) + e)] = d
            cuda.syncthreads()
            for p in range(NP1):  # dz1 = (dz2 w2)·act'(h1), 4 × J1 tiles, in place over h1 (each element its thread's)
                n0 = U(p * 32 * J1)
                bwd1(sm, U(U(OH2) + U(rb * U(N2))), w2, n0, lane, acc1)
                for j in range(J1):
                    n = U(U(n0 + U(32 * j)) + lane)
                    if n < U(N1):
                        for u in range(4):
                            r = U(rb + U(u))
                            e = U(U(OH1) + U(r * U(N1)) + n)
                            d = acc1[u * J1 + j] * act_grad(sm[e], act)
                            sm[e] = d
                            if r < nr:
                                dz1[U(U(U(r0 + r) * U(N1)) + n)] = d
            cuda.syncthreads()
            for p in range(NPX):  # dx = dz1 w1, 4 × JX tiles, routed through S4's pooling into dz_conv
                n0 = U(p * 32 * JX)
                bwdx(sm, U(U(OH1) + U(rb * U(N1))), w1, n0, lane, accx)
                for j in range(JX):  # column j's 4 values are accx[u·JX] (see the shift below)
                    i = U(U(n0 + U(32 * j)) + lane)
                    if i < U(I):
                        for u in range(4):
                            rr = U(rb + U(u))
                            if rr < nr:
                                r = U(r0 + rr)
                                g = accx[u * JX]
                                if mode == POOL_ROUTED:  # the routed gradient at S4's shape (launch-uniform)
                                    dz_conv[U(U(r * U(I)) + i)] = g * act_grad(x[U(U(r * U(I)) + i)], act)
                                else:
                                    _route(dz_conv, yconv, argmax, g, r, i, U(I), U(PP), U(WP), U(C), U(H * W), U(W),
                                           act, mode)
                    # the next column to the front: this loop's body (the routing) is too big for LLVM to unroll
                    # (head.cu: #pragma unroll), so a read of accx[u·JX + j] would be a dynamic index and put the
                    # tile in local memory; the shift's indices are constants (register moves)
                    for u in range(4):
                        for jj in range(JX1):
                            accx[u * JX + jj] = accx[u * JX + jj + 1]
            if ODD and mode != POOL_ROUTED:  # taps no 2×2 window covers: 0
                e = t
                while e < U(nr * U(PER)):
                    e2 = U(e // U(W))
                    yy = U(e2 - U(e2 // U(H)) * U(H))
                    xx = U(e - e2 * U(W))
                    if yy >= U(2 * HP) or xx >= U(2 * WP):
                        dz_conv[U(U(r0 * U(PER)) + e)] = ZERO
                    e = U(e + U(T))
            tile = U(tile + U(cuda.gridDim.x))

    return cuda.jit(head_train_v4) if SIM else cuda.jit(launch_bounds=v4_bounds(R))(head_train_v4)


_V4: dict[tuple[tuple[int, ...], int], Any] = {}


def v4_kernel(geom: tuple[int, ...], rows: int) -> Any:
    """head_train_v4 for a geometry and rows a block (built at the first call; LeNet-5's at 8, 16, 32 at import)."""
    key = (tuple(int(v) for v in geom), int(rows))
    k = _V4.get(key)
    if k is None:
        k = _V4[key] = make_v4(*key)
    return k


#: the table's head_train_v4: LeNet-5's at 8 rows (what v4's plan takes at batch 64 and v3's from batch 1,049); 16
#: and 32 rows: REPORT_KERNELS (the compile report), launched with ``kernel=`` (launch_kernel)
head_train_v4 = v4_kernel(LENET_GEOM, 8)
REPORT_KERNELS = {name: v4_kernel(LENET_GEOM, rows) for name, rows in V4_REPORT_ROWS.items() if rows != 8}


# ------------------------------------------------------------------------------------ variant table

_F2 = "float32[:,::1]"
_F1 = "float32[::1]"
_F4 = "float32[:,:,:,::1]"
SIGNATURES = {
    "head_train_v1": f"void({_F1}, int32[::1], {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, "
    f"uint8[::1], {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {', '.join(['int32'] * 11)})",
    "head_train_wgrad_v1": f"void({_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, {_F1}, "
    f"{_F1}, {_F1}, {_F2}, int32[::1], int32, int32, int32, int32, int32)",
}
_ROWS_ARRAYS = SIGNATURES["head_train_v1"].split(", int32, ")[0]  # the 18 arrays of every rows kernel
SIGNATURES["head_train_v2"] = f"{_ROWS_ARRAYS}, {', '.join(['int32'] * 10)})"
SIGNATURES["head_train_v3"] = SIGNATURES["head_train_v4"] = f"{_ROWS_ARRAYS}, int32, int32, int32)"
SIGNATURES["head_train_wgrad_v2"] = SIGNATURES["head_train_wgrad_v3"] = SIGNATURES["head_train_wgrad_v1"]
SIGNATURES["head_train_wgrad_v4"] = SIGNATURES["head_train_wgrad_v1"]
KERNELS = {"head_train_v1": head_train_v1, "head_train_wgrad_v1": head_train_wgrad_v1,
           "head_train_v2": head_train_v2, "head_train_wgrad_v2": head_train_wgrad_v2,
           "head_train_v3": head_train_v3, "head_train_wgrad_v3": head_train_wgrad_v3,
           "head_train_v4": head_train_v4, "head_train_wgrad_v4": head_train_wgrad_v4}
#: the compile report's v4 rows kernels at 16 and 32 rows (REPORT_KERNELS; compile_report.all_kernels)
REPORT_SIGNATURES = {name: SIGNATURES["head_train_v4"] for name in REPORT_KERNELS}
#: the default (backend.FUSED_DEFAULTS takes it from here): v3, as cupy's default (cupy_backend/fused.DEFAULT_VARIANTS:
#: v3's plan, which runs v4's rows kernel at large batches); v4 by name runs v4's rows kernel at every batch. Both
#: plans' weight gradients: head_train_wgrad_v4 (v3's sums and bits, the chunk staging pipelined; since 2026-12-07).
VARIANTS = {"head_train": ("v1", "v2", "v3", "v4")}
DEFAULT_VARIANTS = {"head_train": "v3"}

# ------------------------------------------------------------------------------------------ launch wrapper

_SCRATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DUMMY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def launch_kernel(be: Any, name: str, kernel: Any, grid: int, block: int, shmem: int, *args: Any) -> None:
    """Launch ``kernel`` (named ``name``) through the backend's ``_launch`` (which finds it in FUSED_KERNELS, or
    takes it as ``kernel=`` where it is not that table's: head_train_v2 at 2, 4, 8 rows, v3 at another geometry, v4
    at 16 or 32 rows or another geometry), so counters, the launch log, ``record`` and ``graph`` see it like every
    other launch. A backend without
    ``_launch`` gets the same treatment here: the grid capped at ``be.max_blocks`` (every fused kernel loops
    over its work), the launch counted, logged when ``be.launch_log`` is a list, synchronised when ``be.debug``."""
    if hasattr(be, "_launch"):
        op, variant = name.rsplit("_", 1)
        if name in KERNELS and KERNELS[name] is not kernel:  # head_train_v2/_v3/_v4 built for another R / geometry
            be._launch(op, variant, grid, block, shmem, *args, kernel=kernel)
        else:
            be._launch(op, variant, grid, block, shmem, *args)
        return
    cap = getattr(be, "max_blocks", None)
    if cap is not None:
        grid = min(grid, cap)
    be.counters.launches += 1
    log = getattr(be, "launch_log", None)
    if log is not None:
        log.append((name, tuple(numba.typeof(a) for a in args)))
    if shmem > 48 * 1024:  # lenet_fwd_v4 at 16 images: opted in to its shared memory first (a no-op simulated)
        from .common import allow_shared

        allow_shared(kernel, args, shmem)
    kernel[max(1, grid), block, 0, shmem](*args)
    if getattr(be, "debug", False):
        cuda.synchronize()


def _check(a: Any, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
    if a is None:
        raise ValueError(f"{name}: missing array")
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a device array of this backend, got a host NumPy array (use to_device)")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(a.shape)} does not match the expected {tuple(shape)}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{name}: must be C-contiguous")


def c5_smem(nh1: int) -> int:
    """head_train_v1's dynamic shared memory: C5's staged weight chunk, or 0 (the plain loop) when too big."""
    need = nh1 * (C5_CHUNK + 1) * 4
    return need if need <= C5_MAX_SMEM else 0


def rows_per_block(batch: int) -> int:
    """Rows a block of head_train_v1 owns: 1 until the grid reaches FILL_BLOCKS blocks, then more (at most 8)."""
    return max(1, min(8, ceil_div(batch, FILL_BLOCKS)))


def plan(variant: str, n: int, ni: int, nh1: int, nh2: int, nc: int,
         geom: tuple[int, int, int, int, int] | None = None) -> tuple[tuple[str, int, int, int, int], ...]:
    """The two launches of head_train_<variant>: (kernel name, grid, block, dynamic shared bytes, rows a block).
    v1: this module's plan (rows_per_block, HEAD_THREADS, c5_smem). v2, v3 and v4: cupy's (cupy_backend/fused.head_plan
    with its default ``tiled=True``, reused, not copied: the same grids, blocks, shared memory and batch rule): v3's
    rows kernel (a row a block) while v2 would take one row a block (batch ≤ fused.HEAD_FILL_BLOCKS) and its shared
    memory fits; beyond, v4's rows kernel (fused.head4_rows(n) rows a block: the ``rows`` field) once its 8-row
    blocks fill the SMs (⌈n/8⌉ ≥ fused.HEAD4_FILL_BLOCKS: n ≥ 1,049) and its shared memory fits, else v2's rows
    kernel; v4 by name: v4's rows kernel at every batch (v2's where its shared memory does not fit); ValueError where
    v2's rows do not fit shared memory (v1 needs none). ``geom`` = (C, Hp, Wp, H, W) (default as cupy's: LeNet-5's
    at I = 400, else (I, 1, 1, 2, 2))."""
    if variant == "v1":
        rows = rows_per_block(n)
        total = nh1 * (ni + 1) + nh2 * (nh1 + 1) + nc * (nh2 + 1) + 1
        return (("head_train_v1", ceil_div(n, rows), HEAD_THREADS, c5_smem(nh1), rows),
                ("head_train_wgrad_v1", ceil_div(total, WG_THREADS), WG_THREADS, 0, 0))
    from ..cupy_backend import fused

    # once per call shape (a step calls head_train with the same shapes every time), as cupy's fused.head_train;
    # the fill targets are in the key, so the plan follows them when they change (the tests lower them)
    key = (variant, n, ni, nh1, nh2, nc, geom, fused.HEAD_FILL_BLOCKS, fused.HEAD4_FILL_BLOCKS)
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    a, w = fused.head_plan(variant, n, ni, nh1, nh2, nc, geom)  # tiled: cupy's plan, v4's rows kernel included
    defines = dict(a.defines)
    rows = defines["HEAD4_ROWS"] if a.kernel == "head_train_v4" else defines.get("HEAD_ROWS", 1)
    out = ((a.kernel, a.grid[0], a.block[0], a.shared_mem, rows), (w.kernel, w.grid[0], w.block[0], w.shared_mem, 0))
    _PLANS[key] = out
    return out


#: plan's results for v2-v4 by call shape and fill targets (a ValueError is not cached: it is raised again)
_PLANS: dict[tuple, tuple[tuple[str, int, int, int, int], ...]] = {}


def launches(variant: str, n: int, ni: int = 400, nh1: int = 120, nh2: int = 84, nc: int = 10,
             explicit: bool = False) -> list[tuple[str, str, int, int, int]]:
    """head_train's two launches as the backend logs them, (op, variant, grid, block, dynamic shared bytes), at
    LeNet-5's geometry with F6 ``nh2`` (backend.lenet_launches); where the variant does not fit shared memory and
    was not asked for by name, v1's (as head_train falls back)."""
    try:
        p = plan(variant, n, ni, nh1, nh2, nc)
    except ValueError:
        if explicit:
            raise
        p = plan("v1", n, ni, nh1, nh2, nc)
    return [(*name.rsplit("_", 1), grid, block, smem) for name, grid, block, smem, _ in p]


def _kernel_for(name: str, geom: tuple[int, ...], rows: int = 1) -> Any:
    if name == "head_train_v4":
        return v4_kernel(geom, rows)
    if name == "head_train_wgrad_v4":
        return v3_kernels(geom)[2]
    if name.endswith("_v3"):
        return v3_kernels(geom)[name.startswith("head_train_wgrad")]
    return KERNELS[name]


def head_train(
    be: Any, x: Any, labels: Any, w1: Any, b1: Any, w2: Any, b2: Any, w3: Any, b3: Any, h1: Any, h2: Any,
    logits: Any, argmax: Any, yconv: Any, dz_conv: Any, dw1: Any, db1: Any, dw2: Any, db2: Any, dw3: Any, db3: Any,
    stats: Any, state: Any, act: str, mode: str, variant: str | None = None,
) -> None:
    """reference.head_train as one op (two launches); the protocol's optional op (lenet_gpu.backends.base)."""
    v = variant or getattr(be, "default_variants", {}).get("head_train") or DEFAULT_VARIANTS["head_train"]
    if v not in VARIANTS["head_train"]:
        raise ValueError(f"head_train: unknown variant {v!r}; choose one of {', '.join(VARIANTS['head_train'])}")
    check_act(act)
    check_mode(mode)
    if yconv is None and mode != "max":
        raise ValueError("head_train: yconv=None (the routed gradient) needs max pooling")
    n, c, hp, wp = x.shape
    ni = c * hp * wp
    nh1, nh2, nc = w1.shape[0], w2.shape[0], w3.shape[0]
    if yconv is None:  # the routed step (docs/routed_backward.md): dz_conv receives gz at x's shape
        yconv, hc, wc = x, hp, wp
    else:
        hc, wc = yconv.shape[2], yconv.shape[3]
    routed = yconv is x
    if not routed and (hc // 2, wc // 2) != (hp, wp):
        raise ValueError(f"head_train: yconv {tuple(yconv.shape)} does not pool to x {tuple(x.shape)}")
    for name, a, shape in (
        ("x", x, (n, c, hp, wp)), ("w1", w1, (nh1, ni)), ("b1", b1, (nh1,)), ("w2", w2, (nh2, nh1)),
        ("b2", b2, (nh2,)), ("w3", w3, (nc, nh2)), ("b3", b3, (nc,)), ("h1", h1, (n, nh1)), ("h2", h2, (n, nh2)),
        ("logits", logits, (n, nc)), ("yconv", yconv, (n, c, hc, wc)), ("dz_conv", dz_conv, (n, c, hc, wc)),
        ("dw1", dw1, (nh1, ni)), ("db1", db1, (nh1,)), ("dw2", dw2, (nh2, nh1)), ("db2", db2, (nh2,)),
        ("dw3", dw3, (nc, nh2)), ("db3", db3, (nc,)),
    ):
        _check(a, name, shape)
    _check(labels, "labels", (n,), np.int32)
    _check(stats, "stats", (stats.shape[0], 2))
    _check(state, "state", (state.shape[0],), np.int32)
    if n < 1 or stats.shape[0] < 1 or state.shape[0] <= STEP_IN_EPOCH:
        raise ValueError("head_train: needs a batch of at least one row, one stats row and a full step state")
    if mode == "max":
        _check(argmax, "argmax", (n, c, hp, wp), np.uint8)
        am1 = argmax.reshape(n * ni)
    else:  # avg never reads argmax: a one-element stand-in of the declared type
        am1 = _DUMMY.get(be)
        if am1 is None:
            am1 = _DUMMY[be] = be.empty((1,), np.uint8)
    key = (n, nh1, nh2, nc)
    per_be = _SCRATCH.setdefault(be, {})
    ws = per_be.get(key)
    if ws is None:  # dz1, dz2, dz3 and the per-row [loss, hit]: allocated at the first call at a shape
        ws = per_be[key] = (be.empty((n, nh1)), be.empty((n, nh2)), be.empty((n, nc)), be.empty((n, 2)))
    dz1, dz2, dz3, rowstat = ws
    geom = (c, hp, wp, 2 * hp if routed else hc, 2 * wp if routed else wc, nh1, nh2, nc)  # v3's (cupy's for routed)
    try:
        (rname, rgrid, rblock, rsmem, rows), (wname, wgrid, wblock, wsmem, _) = plan(v, n, ni, nh1, nh2, nc, geom[:5])
    except ValueError:
        if variant is not None:
            raise
        (rname, rgrid, rblock, rsmem, rows), (wname, wgrid, wblock, wsmem, _) = plan("v1", n, ni, nh1, nh2, nc)

    def flat(a: Any) -> Any:
        return a.reshape(a.size)

    mode_code = np.int32(POOL_ROUTED if routed else POOL_CODES[mode])
    arrays = (flat(x), labels, flat(w1), b1, flat(w2), b2, flat(w3), b3, flat(h1), flat(h2), flat(logits), am1,
              flat(yconv), flat(dz_conv), flat(dz1), flat(dz2), flat(dz3), flat(rowstat))
    if rname == "head_train_v1":
        tail: tuple[Any, ...] = (*(np.int32(v) for v in (n, c, hc, wc, nh1, nh2, nc)), np.int32(ACT_CODES[act]),
                                 mode_code, np.int32(rows), np.int32(rsmem > 0))
    elif rname == "head_train_v2":
        tail = (*(np.int32(v) for v in (n, c, hc, wc, nh1, nh2, nc)), np.int32(ACT_CODES[act]), mode_code,
                np.int32(rows))
    else:
        tail = (np.int32(n), np.int32(ACT_CODES[act]), mode_code)
    kernel = v2_kernel(rows) if rname == "head_train_v2" else _kernel_for(rname, geom, rows)
    launch_kernel(be, rname, kernel, rgrid, rblock, rsmem, *arrays, *tail)
    launch_kernel(be, wname, _kernel_for(wname, geom), wgrid, wblock, wsmem, flat(x), flat(h1), flat(h2), flat(dz1),
                  flat(dz2), flat(dz3), flat(rowstat), flat(dw1), db1, flat(dw2), db2, flat(dw3), db3, stats, state,
                  *(np.int32(v) for v in (n, ni, nh1, nh2, nc)))
