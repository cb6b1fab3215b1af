"""conv2d: valid 2-D cross-correlation, stride 1, NCHW, with bias and activation fused (forward),
and its two gradients.

  fwd:         y[n,k,i,j] = act(b[k] + Σ_{c,r,s} w[k,c,r,s]·x[n,c,i+r,j+s])
               x (N,C,H,W), w (K,C,R,S), b (K,) → y (N,K,Ho,Wo), Ho = H−R+1, Wo = W−S+1
  bwd_data:    dx[n,c,h,v] = Σ_{k,r,s} dz[n,k,h−r,v−s]·w[k,c,r,s]   (taps outside dz count 0)
  bwd_weight:  dw[k,c,r,s] = Σ_{n,i,j} dz[n,k,i,j]·x[n,c,i+r,j+s];  db[k] = Σ_{n,i,j} dz[n,k,i,j]
  pool_fwd:    the forward with the 2×2/2 subsampling fused (the optional op conv2d_pool_fwd):
               y as above (written unless the caller passes none: backward needs it for act'),
               yp (N,K,Ho//2,Wo//2) = max (argmax: first maximum's row-major tap) or mean of y's windows
  bwd_data_pool: the data gradient routed through the 2×2 pooling below and that layer's activation
               (the optional op conv2d_bwd_data_pool, reference.conv2d_bwd_data_pool):
               dzb (N,C,H,W) = pool2x2_bwd(bwd_data(dz, w), argmax, mode)·act'(yconv), the convolution's
               input being the pooled map (N,C,H//2,W//2) of yconv (N,C,H,W)
dz is the gradient w.r.t. the pre-activation (pool2x2_bwd has already applied act').

The faster variants take flat arrays and int32 sizes and compute every offset in int32 (Numba widens
integer arithmetic to int64, and 64-bit indexing took 91–121 registers; the backend checks that every
array has fewer than 2³¹ elements). Their launches are sized from the SM count (backend.sm_count).
conv2d_pool_fwd_v2, conv2d_bwd_data_pool_v2, conv2d_bwd_weight_v3 and the staging / accumulation helpers go
further, as routed.py does: every index and size uint32 (common.U; a difference that could be negative is
compared first) and block-stride loops as while loops (a range() with a run-time step divides in 64 bits for
its trip count): no 64-bit division, no wraparound selects (sm_90: 63 → 48, 56 → 47, 64 → 44 registers).

Versions:
- conv2d_fwd_v1: one thread per output, consecutive threads → consecutive output columns (coalesced).
- conv2d_fwd_v2: the block's slice of weights (KB filters × a chunk of channels) in shared memory,
  read as warp broadcasts; register blocking: each thread computes KB output channels of one pixel,
  so every input load feeds KB FMAs; int32 offsets.
- conv2d_fwd_v3: v2 plus the input in shared memory too: the block stages the band of input rows
  its pixels read (coalesced: a channel's band is contiguous), so each input element is loaded once
  per block and then read R·S times from shared memory, conflict-free along a row.
- conv2d_pool_fwd_v1: fusion: one thread per 2×2 window computes its 4 outputs, writes them, pools
  them and writes the argmax: one launch instead of two, and y is never read back.
- conv2d_pool_fwd_v2: the v3 tiling (input band + weights in shared memory) with the pooling fused:
  one thread per window keeps 4 taps × PKB filters of accumulators, so each weight read from shared
  memory feeds 4 FMAs and each input read PKB.
- conv2d_bwd_data_v1: one thread per input-gradient element (a gather: no atomics).
- conv2d_bwd_data_v2: the weights of CB input channels in shared memory (broadcast reads) and
  register blocking: each thread computes CB input channels of one pixel, so every dz load feeds
  CB FMAs (the mirror of conv2d_fwd_v2).
- conv2d_bwd_weight_v1: one thread per weight (and one per bias), each summing over N·Ho·Wo in order.
- conv2d_bwd_weight_v2: one block per (k, chunk of BW_COLS columns of c·r·s, the bias as one more
  column); its threads stride over the N·Ho·Wo positions (coalesced), each keeping BW_COLS partial
  sums in registers, then a fixed-order shared-memory tree reduction: deterministic, no atomics.
- conv2d_bwd_weight_v3: v2 split over the batch: each (item, split) block reduces its share of the
  positions into partials; the item's last block (an int64 compare-and-swap ticket tagged with the
  step state's STEP) sums the splits in a fixed order. C1's 24 blocks of 784 positions a thread
  become about a wave of blocks; int32 offsets.
- conv2d_bwd_data_pool_v1: one thread per element of dzb: the bwd_data sum of its pooled position
  when it is the routed tap (max) or always (avg), times act'.
- conv2d_bwd_data_pool_v2: one thread per pooled position of the batch with CB channels in registers
  and the weights in shared memory (as conv2d_bwd_data_v2): each dx is computed once and written to
  its 4 taps; no dx round trip through memory, one launch instead of two.
"""

from __future__ import annotations

from numba import cuda, float32, int32, int64, uint8, uint32

from ...stepstate import STEP
from .common import POOL_MAX, U0, U1, ZERO, U, act_grad, activate, device_function

#: conv2d_fwd_v2: output channels per thread (register blocking)
KB = 8
#: conv2d_fwd_v2: shared-memory budget for one weight slice (KB × channel chunk × R × S floats)
FWD_SMEM_FLOATS = 4096
#: conv2d_fwd_v3: shared-memory budget for one channel chunk (weights + input band), in floats
V3_SMEM_FLOATS = 8192
#: conv2d_pool_fwd_v2: filters per thread (× 4 window taps = 12 accumulators in registers; 4 took 66
#: registers on sm_90, 3 takes 63, and divides C1's 6 filters)
PKB = 3
QUARTER = float32(0.25)
#: conv2d_bwd_data_v2: input channels per thread (register blocking)
CB = 8
#: conv2d_bwd_data_v2: shared-memory budget for one weight slice (CB × filter chunk × R × S floats)
BWD_DATA_SMEM_FLOATS = 4096
#: conv2d_bwd_weight_v2: threads per block (a power of two: the tree reduction halves it)
BW_THREADS = 128
#: conv2d_bwd_weight_v2: columns of c·r·s (+ the bias) reduced by one block
BW_COLS = 8

# ---------------------------------------------------------------------------------------------- fwd


@cuda.jit
def conv2d_fwd_v1(x, w, b, y, act):
    nb, kout, ho, wo = y.shape
    cin, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    total = nb * kout * ho * wo
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        j = idx % wo
        t = idx // wo
        i = t % ho
        t = t // ho
        k = t % kout
        n = t // kout
        acc = b[k]
        for c in range(cin):
            for r in range(r_):
                for s in range(s_):
                    acc += x[n, c, i + r, j + s] * w[k, c, r, s]
        y[n, k, i, j] = activate(acc, act)


@cuda.jit
def conv2d_fwd_v2(xf, wf, b, yf, nb, cin, h, wd, kout, r_, s_, act, cb):
    # flat arrays, int32 offsets; dynamic shared memory: KB·cb·R·S floats (the launch passes its size)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(KB, float32)
    ho = int32(h - r_ + 1)
    wo = int32(wd - s_ + 1)
    rs = int32(r_ * s_)
    crs = int32(cin * rs)
    plane = int32(ho * wo)
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = int32((plane + nthreads - 1) // nthreads)
    nkg = int32((kout + KB - 1) // KB)
    # work item = (image n, group of KB filters, chunk of blockDim pixels); block-stride loop
    for item in range(cuda.blockIdx.x, int32(nb * nkg * nchunks), cuda.gridDim.x):
        pc = int32(item % nchunks)
        t = int32(item // nchunks)
        k0 = int32((t % nkg) * KB)
        n = int32(t // nkg)
        pos = int32(pc * nthreads + tid)
        valid = pos < plane
        i = int32(pos // wo)
        j = int32(pos - i * wo)
        for q in range(KB):
            acc[q] = b[k0 + q] if k0 + q < kout else ZERO
        for c0 in range(int32(0), cin, cb):
            cn = int32(min(cb, cin - c0))
            span = int32(cn * rs)
            cuda.syncthreads()  # nobody still reads the previous slice
            _stage_weights(wf, sw, k0, KB, kout, int32(k0 * crs + c0 * rs), crs, span)
            cuda.syncthreads()
            if valid:
                for c in range(cn):
                    for r in range(r_):
                        xrow = int32(((n * cin + c0 + c) * h + i + r) * wd + j)
                        off0 = int32((c * r_ + r) * s_)
                        for s in range(s_):
                            xv = xf[int32(xrow + s)]
                            for q in range(KB):
                                acc[q] += xv * sw[int32(q * span + off0 + s)]
        if valid:
            for q in range(KB):
                if k0 + q < kout:
                    yf[int32(((n * kout + k0 + q) * ho + i) * wo + j)] = activate(acc[q], act)


@device_function
def _stage_weights(wf, sm, k0, kb, kout, wbase, crs, span):
    """Stage, with the whole block, kb filters' taps of a channel chunk (span = channels·R·S floats per
    filter, from wf[wbase + q·crs]) into sm[0 : kb·span], filter-major; filters past kout are 0."""
    tid = U(cuda.threadIdx.x)
    nthreads = U(cuda.blockDim.x)
    uspan = U(span)
    e = tid
    while e < U(U(kb) * uspan):  # uint32, a while loop: no 64-bit division (module docstring)
        q = U(e // uspan)
        if U(U(k0) + q) < U(kout):
            sm[e] = wf[U(U(wbase) + q * U(crs) + (e - q * uspan))]
        else:
            sm[e] = ZERO
        e = U(e + nthreads)


@device_function
def _stage_band(xf, sm, xbase, hw, band, cn, wslot):
    """Stage, with the whole block, cn channels' bands of ``band`` contiguous input floats (from
    xf[xbase + c·hw]) into sm[wslot:], channel-major."""
    tid = U(cuda.threadIdx.x)
    nthreads = U(cuda.blockDim.x)
    uband = U(band)
    e = tid
    while e < U(U(cn) * uband):
        c = U(e // uband)
        sm[U(U(wslot) + e)] = xf[U(U(xbase) + c * U(hw) + (e - c * uband))]
        e = U(e + nthreads)


@cuda.jit
def conv2d_fwd_v3(xf, wf, b, yf, nb, cin, h, wd, kout, r_, s_, act, cb, wslot):
    # dynamic shared memory: [weights: KB·cb·R·S floats (wslot)][input band: cb·rows·W floats]
    sm = cuda.shared.array(0, float32)
    acc = cuda.local.array(KB, float32)
    ho = int32(h - r_ + 1)
    wo = int32(wd - s_ + 1)
    rs = int32(r_ * s_)
    crs = int32(cin * rs)
    hw = int32(h * wd)
    plane = int32(ho * wo)
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = int32((plane + nthreads - 1) // nthreads)
    nkg = int32((kout + KB - 1) // KB)
    for item in range(cuda.blockIdx.x, int32(nb * nkg * nchunks), cuda.gridDim.x):
        pc = int32(item % nchunks)
        t = int32(item // nchunks)
        k0 = int32((t % nkg) * KB)
        n = int32(t // nkg)
        pos = int32(pc * nthreads + tid)
        valid = pos < plane
        i = int32(pos // wo)
        j = int32(pos - i * wo)
        row0 = int32((pc * nthreads) // wo)  # first output row of the chunk = first input row it reads
        nrows = int32((min(pc * nthreads + nthreads, plane) - 1) // wo - row0 + r_)  # input rows it reads
        band = int32(nrows * wd)
        for q in range(KB):
            acc[q] = b[k0 + q] if k0 + q < kout else ZERO
        for c0 in range(int32(0), cin, cb):
            cn = int32(min(cb, cin - c0))
            span = int32(cn * rs)
            cuda.syncthreads()  # nobody still reads the previous chunk
            _stage_weights(wf, sm, k0, KB, kout, int32(k0 * crs + c0 * rs), crs, span)
            _stage_band(xf, sm, int32((n * cin + c0) * hw + row0 * wd), hw, band, cn, wslot)
            cuda.syncthreads()
            if valid:
                for c in range(cn):
                    for r in range(r_):
                        base = int32(wslot + (c * nrows + i - row0 + r) * wd + j)
                        off0 = int32((c * r_ + r) * s_)
                        for s in range(s_):
                            xv = sm[int32(base + s)]
                            for q in range(KB):
                                acc[q] += xv * sm[int32(q * span + off0 + s)]
        if valid:
            for q in range(KB):
                if k0 + q < kout:
                    yf[int32(((n * kout + k0 + q) * ho + i) * wo + j)] = activate(acc[q], act)


@cuda.jit
def conv2d_pool_fwd_v1(x, w, b, y, yp, argmax, act, mode, has_y):
    nb, kout = x.shape[0], w.shape[0]
    cin, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    ho, wo = x.shape[2] - r_ + 1, x.shape[3] - s_ + 1
    hp, wp = yp.shape[2], yp.shape[3]
    hw2 = (ho + 1) // 2  # windows over y, with an odd trailing row/column (written, not pooled)
    ww2 = (wo + 1) // 2
    for idx in range(cuda.grid(1), nb * kout * hw2 * ww2, cuda.gridsize(1)):
        j2 = idx % ww2
        t = idx // ww2
        i2 = t % hw2
        t = t // hw2
        k = t % kout
        n = t // kout
        best = ZERO
        tap_best = 0
        total = ZERO
        for tap in range(4):
            i = 2 * i2 + tap // 2
            j = 2 * j2 + tap % 2
            if i < ho and j < wo:
                acc = b[k]
                for c in range(cin):
                    for r in range(r_):
                        for s in range(s_):
                            acc += x[n, c, i + r, j + s] * w[k, c, r, s]
                v = activate(acc, act)
                if has_y:
                    y[n, k, i, j] = v
                if tap == 0 or v > best:  # the first maximum wins
                    best = v
                    tap_best = tap
                total += v
        if i2 < hp and j2 < wp:
            if mode == POOL_MAX:
                yp[n, k, i2, j2] = best
                argmax[n, k, i2, j2] = uint8(tap_best)
            else:
                yp[n, k, i2, j2] = total * QUARTER


@cuda.jit
def conv2d_pool_fwd_v2(xf, wf, b, yf, ypf, amf, nb, cin, h, wd, kout, r_, s_, act, mode, has_y, cb, wslot):
    # dynamic shared memory: [weights: PKB·cb·R·S floats (wslot)][input band: cb·rows·W floats]
    # every index and size uint32 (common.U), the block-stride loops while loops (module docstring)
    sm = cuda.shared.array(0, float32)
    a0 = cuda.local.array(PKB, float32)  # the window's 4 taps × PKB filters
    a1 = cuda.local.array(PKB, float32)
    a2 = cuda.local.array(PKB, float32)
    a3 = cuda.local.array(PKB, float32)
    ur, us, uw, ucin, uk, ucb = U(r_), U(s_), U(wd), U(cin), U(kout), U(cb)
    uwslot = U(wslot)
    ho = U(U(h) - ur + U1)
    wo = U(uw - us + U1)
    hp = U(ho >> U1)
    wp = U(wo >> U1)
    hw2 = U(U(ho + U1) >> U1)  # windows over y, with an odd trailing row/column (written, not pooled)
    ww2 = U(U(wo + U1) >> U1)
    plane2 = U(hw2 * ww2)
    rs = U(ur * us)
    crs = U(ucin * rs)
    hw = U(U(h) * uw)
    nthreads = U(cuda.blockDim.x)
    tid = U(cuda.threadIdx.x)
    nchunks = U(U(plane2 + nthreads - U1) // nthreads)
    nkg = U(U(uk + U(PKB - 1)) // U(PKB))
    nitems = U(U(nb) * nkg * nchunks)
    item = U(cuda.blockIdx.x)
    while item < nitems:
        t = U(item // nchunks)
        pc = U(item - t * nchunks)
        n = U(t // nkg)
        k0 = U((t - n * nkg) * U(PKB))
        pos = U(pc * nthreads + tid)
        valid = pos < plane2
        i2 = U(pos // ww2)
        j2 = U(pos - i2 * ww2)
        row0 = U(U(U(pc * nthreads) // ww2) << U1)  # first conv row = first input row of the band
        nrows = U(min(U(U(U(min(U(pc * nthreads + nthreads), plane2) - U1) // ww2) << U1) + U(2), ho) - row0 + ur
                  - U1)
        band = U(nrows * uw)
        down = U(i2 + i2 + U1) < ho  # the window's second row / column exist
        right = U(j2 + j2 + U1) < wo
        for q in range(PKB):
            bias = b[U(k0 + U(q))] if U(k0 + U(q)) < uk else ZERO
            a0[q] = bias
            a1[q] = bias
            a2[q] = bias
            a3[q] = bias
        c0 = U0
        while c0 < ucin:
            cn = U(min(ucb, U(ucin - c0)))
            span = U(cn * rs)
            cuda.syncthreads()  # nobody still reads the previous chunk
            _stage_weights(wf, sm, k0, PKB, uk, U(k0 * crs + c0 * rs), crs, span)
            _stage_band(xf, sm, U((n * ucin + c0) * hw + row0 * uw), hw, band, cn, uwslot)
            cuda.syncthreads()
            if valid:
                for c in range(cn):
                    for r in range(ur):
                        # 2·i2 ≥ row0 for a valid position
                        base = U(uwslot + (U(c) * nrows + i2 + i2 - row0 + U(r)) * uw + j2 + j2)
                        off0 = U((U(c) * ur + U(r)) * us)
                        for s in range(us):
                            # a window's missing column / row (odd conv output) reads past the band
                            # (the launch pads it): those taps are never written nor pooled
                            x0 = sm[U(base + U(s))]
                            x1 = sm[U(base + U(s) + U1)]
                            x2 = sm[U(base + uw + U(s))]
                            x3 = sm[U(base + uw + U(s) + U1)]
                            for q in range(PKB):
                                wv = sm[U(U(q) * span + off0 + U(s))]
                                a0[q] += x0 * wv
                                a1[q] += x1 * wv
                                a2[q] += x2 * wv
                                a3[q] += x3 * wv
            c0 = U(c0 + ucb)
        if valid:
            i = U(i2 + i2)
            j = U(j2 + j2)
            for q in range(PKB):
                k = U(k0 + U(q))
                if k < uk:
                    v0 = activate(a0[q], act)
                    v1 = activate(a1[q], act)
                    v2 = activate(a2[q], act)
                    v3 = activate(a3[q], act)
                    if has_y:
                        yo = U(((n * uk + k) * ho + i) * wo + j)
                        yf[yo] = v0
                        if right:
                            yf[U(yo + U1)] = v1
                        if down:
                            yf[U(yo + wo)] = v2
                            if right:
                                yf[U(yo + wo + U1)] = v3
                    if i2 < hp and j2 < wp:
                        po = U(((n * uk + k) * hp + i2) * wp + j2)
                        if mode == POOL_MAX:
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
                            ypf[po] = best
                            amf[po] = uint8(tap)
                        else:
                            ypf[po] = (v0 + v1 + v2 + v3) * QUARTER
        item = U(item + U(cuda.gridDim.x))


# ----------------------------------------------------------------------------------------- bwd data


@cuda.jit
def conv2d_bwd_data_v1(dz, w, dx):
    nb, cin, h, wd = dx.shape
    kout, r_, s_ = w.shape[0], w.shape[2], w.shape[3]
    ho, wo = dz.shape[2], dz.shape[3]
    total = nb * cin * h * wd
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        v = idx % wd
        t = idx // wd
        u = t % h
        t = t // h
        c = t % cin
        n = t // cin
        acc = ZERO
        for k in range(kout):
            for r in range(r_):
                i = u - r
                if i >= 0 and i < ho:
                    for s in range(s_):
                        j = v - s
                        if j >= 0 and j < wo:
                            acc += dz[n, k, i, j] * w[k, c, r, s]
        dx[n, c, u, v] = acc


@cuda.jit
def conv2d_bwd_data_v2(dzf, wf, dxf, nb, cin, h, wd, kout, r_, s_, kb):
    # flat arrays, int32 offsets; dynamic shared memory: CB·kb·R·S floats (the launch passes its size)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(CB, float32)
    ho = int32(h - r_ + 1)
    wo = int32(wd - s_ + 1)
    plane = int32(h * wd)
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = int32((plane + nthreads - 1) // nthreads)
    ncg = int32((cin + CB - 1) // CB)
    # work item = (image n, group of CB input channels, chunk of blockDim pixels); block-stride loop
    for item in range(cuda.blockIdx.x, int32(nb * ncg * nchunks), cuda.gridDim.x):
        pc = int32(item % nchunks)
        t = int32(item // nchunks)
        c0 = int32((t % ncg) * CB)
        n = int32(t // ncg)
        pos = int32(pc * nthreads + tid)
        valid = pos < plane
        u = int32(pos // wd)
        v = int32(pos - u * wd)
        _accumulate_dx(dzf, wf, sw, acc, n, c0, cin, u, v, valid, kout, kb, ho, wo, r_, s_)
        if valid:
            for q in range(CB):
                if c0 + q < cin:
                    dxf[int32(((n * cin + c0 + q) * h + u) * wd + v)] = acc[q]


@device_function
def _stage_weights_t(wf, sm, c0, cin, k0, rs, span):
    """Stage, with the whole block, the taps of CB input channels c0.. of filters k0..k0+span/rs into
    sm[0 : CB·span], channel-major (w (K,C,R,S) read transposed); channels past cin are 0."""
    tid = U(cuda.threadIdx.x)
    nthreads = U(cuda.blockDim.x)
    uspan, urs = U(span), U(rs)
    e = tid
    while e < U(U(CB) * uspan):
        q = U(e // uspan)
        rem = U(e - q * uspan)
        kk = U(rem // urs)
        if U(U(c0) + q) < U(cin):
            sm[e] = wf[U(((U(k0) + kk) * U(cin) + U(c0) + q) * urs + rem - kk * urs)]
        else:
            sm[e] = ZERO
        e = U(e + nthreads)


# --------------------------------------------------------------------------------------- bwd weight


@device_function
def _accumulate_dx(dzf, wf, sw, acc, n, c0, cin, u, v, valid, kout, kb, ho, wo, r_, s_):
    """acc[q] = the data gradient of channel c0 + q at (u, v) of image n: Σ_k Σ_{r,s} dz[n,k,u−r,v−s]·w[k,c,r,s],
    the filters staged in shared memory kb at a time (every thread of the block calls it: it has barriers).
    Shared by conv2d_bwd_data_v2 and conv2d_bwd_data_pool_v2."""
    # uint32 (the callers' int32 values cast): u − r and v − s are formed only once r ≤ u, s ≤ v
    ur, us, uk, ukb, uho, uwo, uu, uv = U(r_), U(s_), U(kout), U(kb), U(ho), U(wo), U(u), U(v)
    rs = U(ur * us)
    for q in range(CB):
        acc[q] = ZERO
    k0 = U0
    while k0 < uk:
        kn = U(min(ukb, U(uk - k0)))
        span = U(kn * rs)
        cuda.syncthreads()  # nobody still reads the previous slice
        _stage_weights_t(wf, sw, c0, cin, k0, rs, span)
        cuda.syncthreads()
        if valid:
            for kk in range(kn):
                dzb = U((U(n) * uk + k0 + U(kk)) * uho * uwo)
                for r in range(ur):
                    if U(r) <= uu:
                        i = U(uu - U(r))
                        if i < uho:
                            off0 = U((U(kk) * ur + U(r)) * us)
                            for s in range(us):
                                if U(s) <= uv:
                                    j = U(uv - U(s))
                                    if j < uwo:
                                        g = dzf[U(dzb + i * uwo + j)]
                                        for q in range(CB):
                                            acc[q] += g * sw[U(U(q) * span + off0 + U(s))]
        k0 = U(k0 + ukb)


@cuda.jit
def conv2d_bwd_weight_v1(x, dz, dw, db):
    nb, kout, ho, wo = dz.shape
    cin, r_, s_ = dw.shape[1], dw.shape[2], dw.shape[3]
    rs = r_ * s_
    crs = cin * rs
    total = kout * (crs + 1)
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        q = idx % (crs + 1)
        k = idx // (crs + 1)
        acc = ZERO
        if q == crs:  # the bias column
            for n in range(nb):
                for i in range(ho):
                    for j in range(wo):
                        acc += dz[n, k, i, j]
            db[k] = acc
        else:
            c = q // rs
            r = (q % rs) // s_
            s = q % s_
            for n in range(nb):
                for i in range(ho):
                    for j in range(wo):
                        acc += dz[n, k, i, j] * x[n, c, i + r, j + s]
            dw[k, c, r, s] = acc


@cuda.jit
def conv2d_bwd_weight_v2(xf, dz, dw, db):
    # xf: x (N,C,H,W) as a flat view, so a column's tap is one precomputed offset
    part = cuda.shared.array((BW_COLS, BW_THREADS), float32)
    acc = cuda.local.array(BW_COLS, float32)
    xoff = cuda.local.array(BW_COLS, int32)
    nb, kout, ho, wo = dz.shape
    cin, r_, s_ = dw.shape[1], dw.shape[2], dw.shape[3]
    wd = wo + s_ - 1
    hw = (ho + r_ - 1) * wd
    rs = r_ * s_
    crs = cin * rs
    plane = ho * wo
    nchunks = (crs + 1 + BW_COLS - 1) // BW_COLS
    tid = cuda.threadIdx.x
    for item in range(cuda.blockIdx.x, kout * nchunks, cuda.gridDim.x):
        q0 = (item % nchunks) * BW_COLS
        k = item // nchunks
        # column q0+p reads x[n, c, i+r, j+s], at offset c·H·W + r·W + s from x[n, 0, i, j];
        # −1 marks the bias column, −2 a column past the end
        for p in range(BW_COLS):
            q = q0 + p
            acc[p] = ZERO
            if q < crs:
                xoff[p] = (q // rs) * hw + ((q % rs) // s_) * wd + q % s_
            elif q == crs:
                xoff[p] = -1
            else:
                xoff[p] = -2
        for m in range(tid, nb * plane, BW_THREADS):
            n = m // plane
            pos = m % plane
            i = pos // wo
            base = n * cin * hw + i * wd + (pos - i * wo)
            g = dz[n, k, i, pos - i * wo]
            for p in range(BW_COLS):
                o = xoff[p]
                if o >= 0:
                    acc[p] += g * xf[base + o]
                elif o == -1:
                    acc[p] += g
        for p in range(BW_COLS):
            part[p, tid] = acc[p]
        cuda.syncthreads()
        stride = BW_THREADS // 2
        while stride > 0:
            if tid < stride:
                for p in range(BW_COLS):
                    part[p, tid] += part[p, tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid < BW_COLS:
            q = q0 + tid
            if q < crs:
                dw[k, q // rs, (q % rs) // s_, q % s_] = part[tid, 0]
            elif q == crs:
                db[k] = part[tid, 0]
        cuda.syncthreads()  # part is reused by the block's next item


@device_function
def _last_arrival(tickets, item, tag, arrivals):
    """Count this block's arrival at work item ``item`` and return 1 for the last of ``arrivals``. The
    ticket word is (tag << 32) | count, tag = the step state's STEP: a word with another tag (left by an
    earlier step, or never written) counts as 0, and the last arrival resets the count to 0, so neither
    a stale nor a garbage word from another step can make a block last too early or never."""
    base = int64(tag) << 32
    while True:
        old = tickets[item]
        count = int64(0)
        if (old >> 32) == int64(tag):
            count = old & int64(0xFFFFFFFF)
        count += 1
        new = base if count == arrivals else base | count
        if cuda.atomic.cas(tickets, item, old, new) == old:
            return 1 if count == arrivals else 0


@cuda.jit
def conv2d_bwd_weight_v3(xf, dzf, dw, db, partial, tickets, state, nb, cin, h, wd, kout, r_, s_, splits):
    # per-split partials of v2's (k, column chunk) items, then a fixed-order sum over the splits by the
    # item's last block (ticket): the same result whichever block arrives last. The inner loop has no
    # branch: every column reads x at its offset, and the bias column keeps Σ dz on the side.
    # Every index and size uint32 (common.U), the stride loops while loops (module docstring)
    part = cuda.shared.array((BW_COLS, BW_THREADS), float32)
    last = cuda.shared.array(1, int32)
    xoff = cuda.shared.array(BW_COLS, uint32)  # the item's column offsets, read as broadcasts
    acc = cuda.local.array(BW_COLS, float32)
    ur, us, uw, ucin, uk, ns = U(r_), U(s_), U(wd), U(cin), U(kout), U(splits)
    ho = U(U(h) - ur + U1)
    wo = U(uw - us + U1)
    rs = U(ur * us)
    crs = U(ucin * rs)
    hw = U(U(h) * uw)
    chw = U(ucin * hw)
    plane = U(ho * wo)
    total = U(U(nb) * plane)
    per = U(U(total + ns - U1) // ns)
    nchunks = U(U(crs + U(BW_COLS)) // U(BW_COLS))  # ceil((crs + 1) / BW_COLS)
    tag = state[STEP]
    tid = U(cuda.threadIdx.x)
    nwork = U(uk * nchunks * ns)
    work = U(cuda.blockIdx.x)
    while work < nwork:
        item = U(work // ns)
        sp = U(work - item * ns)
        k = U(item // nchunks)
        q0 = U((item - k * nchunks) * U(BW_COLS))
        # column q0+p reads x[n, c, i+r, j+s], at offset c·H·W + r·W + s from x[n, 0, i, j];
        # the bias column and columns past the end read offset 0 (their products are dropped)
        if tid < U(BW_COLS):
            q = U(q0 + tid)
            xoff[tid] = U0
            if q < crs:
                c = U(q // rs)
                t = U(q - c * rs)
                r = U(t // us)
                xoff[tid] = U(c * hw + r * uw + t - r * us)
        for p in range(BW_COLS):
            acc[p] = ZERO
        gsum = ZERO  # Σ dz: the bias column
        cuda.syncthreads()
        m1 = U(min(total, U(sp * per + per)))
        m = U(sp * per + tid)
        while m < m1:
            n = U(m // plane)
            pos = U(m - n * plane)
            i = U(pos // wo)
            base = U(n * chw + i * uw + pos - i * wo)
            g = dzf[U((n * uk + k) * plane + pos)]
            gsum += g
            for p in range(BW_COLS):
                acc[p] += g * xf[U(base + xoff[p])]
            m = U(m + U(BW_THREADS))
        for p in range(BW_COLS):
            part[p, tid] = gsum if U(q0 + U(p)) == crs else acc[p]
        cuda.syncthreads()
        stride = U(BW_THREADS // 2)
        while stride > U0:
            if tid < stride:
                for p in range(BW_COLS):
                    part[p, tid] += part[p, U(tid + stride)]
            cuda.syncthreads()
            stride = U(stride >> U1)
        if tid < U(BW_COLS):
            partial[U((item * ns + sp) * U(BW_COLS) + tid)] = part[tid, 0]
        cuda.threadfence()  # the partials are visible before the ticket says so
        cuda.syncthreads()
        if tid == U0:
            last[0] = _last_arrival(tickets, int32(item), tag, splits)
        cuda.syncthreads()
        if last[0] == 1:
            cuda.threadfence()
            if tid < U(BW_COLS):
                q = U(q0 + tid)
                s = ZERO
                for sp2 in range(ns):  # fixed order
                    s += partial[U((item * ns + U(sp2)) * U(BW_COLS) + tid)]
                if q < crs:
                    c = U(q // rs)
                    t = U(q - c * rs)
                    r = U(t // us)
                    dw[k, c, r, U(t - r * us)] = s
                elif q == crs:
                    db[k] = s
        cuda.syncthreads()  # part and last are reused by the block's next item
        work = U(work + U(cuda.gridDim.x))


# ------------------------------------------------------------------------------- bwd data + pooling


@cuda.jit
def conv2d_bwd_data_pool_v1(dz, w, argmax, yconv, dzb, mode, act):
    nb, cin, hh, ww = dzb.shape
    kout, r_, s_ = w.shape[0], w.shape[2], w.shape[3]
    ho, wo = dz.shape[2], dz.shape[3]
    hp, wp = hh // 2, ww // 2  # the pooled map: the convolution's input
    for idx in range(cuda.grid(1), nb * cin * hh * ww, cuda.gridsize(1)):
        v = idx % ww
        t = idx // ww
        u = t % hh
        t = t // hh
        c = t % cin
        n = t // cin
        pu = u // 2
        pv = v // 2
        g = ZERO
        if pu < hp and pv < wp:  # an odd trailing row/column belongs to no window: 0
            if mode != POOL_MAX or argmax[n, c, pu, pv] == (u % 2) * 2 + v % 2:
                for k in range(kout):
                    for r in range(r_):
                        i = pu - r
                        if i >= 0 and i < ho:
                            for s in range(s_):
                                j = pv - s
                                if j >= 0 and j < wo:
                                    g += dz[n, k, i, j] * w[k, c, r, s]
                if mode != POOL_MAX:
                    g *= QUARTER
        dzb[n, c, u, v] = g * act_grad(yconv[n, c, u, v], act)


@cuda.jit
def conv2d_bwd_data_pool_v2(dzf, wf, amf, ycf, dzbf, nb, cin, hh, ww, kout, r_, s_, mode, act, kb):
    # flat arrays; dynamic shared memory: CB·kb·R·S floats (the launch passes its size); every index and size
    # uint32 (common.U), the block-stride loop a while loop (module docstring)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(CB, float32)
    ucin, uhh, uww = U(cin), U(hh), U(ww)
    hp = U(uhh >> U1)
    wp = U(uww >> U1)
    ho = U(hp - U(r_) + U1)
    wo = U(wp - U(s_) + U1)
    pplane = U(hp * wp)
    total = U(U(nb) * pplane)
    nthreads = U(cuda.blockDim.x)
    tid = U(cuda.threadIdx.x)
    nchunks = U(U(total + nthreads - U1) // nthreads)
    ncg = U(U(ucin + U(CB - 1)) // U(CB))
    nitems = U(ncg * nchunks)
    # work item = (group of CB channels, chunk of blockDim pooled positions of the whole batch)
    item = U(cuda.blockIdx.x)
    while item < nitems:
        cg = U(item // nchunks)
        c0 = U(cg * U(CB))
        m = U((item - cg * nchunks) * nthreads + tid)
        valid = m < total
        n = U(m // pplane)
        pos = U(m - n * pplane)
        pu = U(pos // wp)
        pv = U(pos - pu * wp)
        _accumulate_dx(dzf, wf, sw, acc, n, c0, cin, pu, pv, valid, kout, kb, ho, wo, r_, s_)
        if valid:
            for q in range(CB):
                c = U(c0 + U(q))
                if c < ucin:
                    _route_window(amf, ycf, dzbf, acc[q], U((n * ucin + c) * pplane + pos), U((n * ucin + c) * uhh),
                                  pu, pv, hp, wp, uhh, uww, mode, act)
        item = U(item + U(cuda.gridDim.x))


@device_function
def _route_window(amf, ycf, dzbf, dx, pidx, plane0, pu, pv, hp, wp, hh, ww, mode, act):
    """Write the 4 taps of pooled position (pu, pv) (flat index pidx; its plane starts at row plane0 of
    dzb): dx to the argmax tap (max) or dx/4 to every tap (avg), times act'(yconv); an odd trailing
    row / column of the plane gets 0. Offsets and sizes uint32."""
    tap = -1  # avg: every tap
    gv = dx * QUARTER
    if mode == POOL_MAX:
        tap = int32(amf[pidx])
        gv = dx
    o = U((plane0 + pu + pu) * ww + pv + pv)
    dzbf[o] = (gv if tap < 0 or tap == 0 else ZERO) * act_grad(ycf[o], act)
    dzbf[U(o + U1)] = (gv if tap < 0 or tap == 1 else ZERO) * act_grad(ycf[U(o + U1)], act)
    dzbf[U(o + ww)] = (gv if tap < 0 or tap == 2 else ZERO) * act_grad(ycf[U(o + ww)], act)
    dzbf[U(o + ww + U1)] = (gv if tap < 0 or tap == 3 else ZERO) * act_grad(ycf[U(o + ww + U1)], act)
    if U(pu + U1) == hp and hh > U(hp + hp):
        o2 = U((plane0 + hh - U1) * ww + pv + pv)
        dzbf[o2] = ZERO
        dzbf[U(o2 + U1)] = ZERO
    if U(pv + U1) == wp and ww > U(wp + wp):
        o2 = U((plane0 + pu + pu) * ww + ww - U1)
        dzbf[o2] = ZERO
        dzbf[U(o2 + ww)] = ZERO
        if U(pu + U1) == hp and hh > U(hp + hp):
            dzbf[U((plane0 + hh - U1) * ww + ww - U1)] = ZERO


# ------------------------------------------------------------------------------------ variant table

_X4 = "float32[:,:,:,::1]"
_F = "float32[::1]"
_I7 = ", ".join(["int32"] * 7)  # nb, cin, h, w, kout, r, s
SIGNATURES = {
    "conv2d_fwd_v1": f"void({_X4}, {_X4}, float32[::1], {_X4}, int32)",
    "conv2d_fwd_v2": f"void({_F}, {_F}, {_F}, {_F}, {_I7}, int32, int32)",
    "conv2d_fwd_v3": f"void({_F}, {_F}, {_F}, {_F}, {_I7}, int32, int32, int32)",
    "conv2d_pool_fwd_v1": f"void({_X4}, {_X4}, float32[::1], {_X4}, {_X4}, uint8[:,:,:,::1], int32, int32, int32)",
    "conv2d_pool_fwd_v2": f"void({_F}, {_F}, {_F}, {_F}, {_F}, uint8[::1], {_I7}, int32, int32, int32, int32, int32)",
    "conv2d_bwd_data_v1": f"void({_X4}, {_X4}, {_X4})",
    "conv2d_bwd_data_v2": f"void({_F}, {_F}, {_F}, {_I7}, int32)",
    "conv2d_bwd_weight_v1": f"void({_X4}, {_X4}, {_X4}, float32[::1])",
    "conv2d_bwd_weight_v2": f"void(float32[::1], {_X4}, {_X4}, float32[::1])",
    "conv2d_bwd_weight_v3": f"void({_F}, {_F}, {_X4}, {_F}, {_F}, int64[::1], int32[::1], {_I7}, int32)",
    "conv2d_bwd_data_pool_v1": f"void({_X4}, {_X4}, uint8[:,:,:,::1], {_X4}, {_X4}, int32, int32)",
    "conv2d_bwd_data_pool_v2": f"void({_F}, {_F}, uint8[::1], {_F}, {_F}, {_I7}, int32, int32, int32)",
}
KERNELS = {
    "conv2d_fwd_v1": conv2d_fwd_v1,
    "conv2d_fwd_v2": conv2d_fwd_v2,
    "conv2d_fwd_v3": conv2d_fwd_v3,
    "conv2d_pool_fwd_v1": conv2d_pool_fwd_v1,
    "conv2d_pool_fwd_v2": conv2d_pool_fwd_v2,
    "conv2d_bwd_data_v1": conv2d_bwd_data_v1,
    "conv2d_bwd_data_v2": conv2d_bwd_data_v2,
    "conv2d_bwd_weight_v1": conv2d_bwd_weight_v1,
    "conv2d_bwd_weight_v2": conv2d_bwd_weight_v2,
    "conv2d_bwd_weight_v3": conv2d_bwd_weight_v3,
    "conv2d_bwd_data_pool_v1": conv2d_bwd_data_pool_v1,
    "conv2d_bwd_data_pool_v2": conv2d_bwd_data_pool_v2,
}
VARIANTS = {
    "conv2d_fwd": ("v1", "v2", "v3"),
    "conv2d_pool_fwd": ("v1", "v2"),
    "conv2d_bwd_data": ("v1", "v2"),
    "conv2d_bwd_weight": ("v1", "v2", "v3"),
    "conv2d_bwd_data_pool": ("v1", "v2"),
}
