"""conv2d: valid 2-D cross-correlation, stride 1, NCHW, with bias and activation fused (forward),
and its two gradients.

  fwd:         y[n,k,i,j] = act(b[k] + Σ_{c,r,s} w[k,c,r,s]·x[n,c,i+r,j+s])
               x (N,C,H,W), w (K,C,R,S), b (K,) → y (N,K,Ho,Wo), Ho = H−R+1, Wo = W−S+1
  bwd_data:    dx[n,c,h,v] = Σ_{k,r,s} dz[n,k,h−r,v−s]·w[k,c,r,s]   (taps outside dz count 0)
  bwd_weight:  dw[k,c,r,s] = Σ_{n,i,j} dz[n,k,i,j]·x[n,c,i+r,j+s];  db[k] = Σ_{n,i,j} dz[n,k,i,j]
  pool_fwd:    the forward with the 2×2/2 subsampling fused (the optional op conv2d_pool_fwd):
               y as above (written unless the caller passes none: backward needs it for act'),
               yp (N,K,Ho//2,Wo//2) = max (argmax: first maximum's row-major tap) or mean of y's windows
dz is the gradient w.r.t. the pre-activation (pool2x2_bwd has already applied act').

Versions:
- conv2d_fwd_v1: one thread per output, consecutive threads → consecutive output columns (coalesced).
- conv2d_fwd_v2: the block's slice of weights (KB filters × a chunk of channels) in shared memory,
  read as warp broadcasts; register blocking: each thread computes KB output channels of one pixel,
  so every input load feeds KB FMAs.
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
"""

from __future__ import annotations

from numba import cuda, float32, int32, uint8

from .common import POOL_MAX, ZERO, activate

#: conv2d_fwd_v2: output channels per thread (register blocking)
KB = 8
#: conv2d_fwd_v2: shared-memory budget for one weight slice (KB × channel chunk × R × S floats)
FWD_SMEM_FLOATS = 4096
#: conv2d_fwd_v3: shared-memory budget for one channel chunk (weights + input band), in floats
V3_SMEM_FLOATS = 8192
#: conv2d_pool_fwd_v2: filters per thread (× 4 window taps = 16 accumulators in registers)
PKB = 4
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
def conv2d_fwd_v2(x, w, b, y, act, cb):
    # dynamic shared memory: KB·cb·R·S floats (the launch passes its size)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(KB, float32)
    nb, kout, ho, wo = y.shape
    cin, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    rs = r_ * s_
    plane = ho * wo
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = (plane + nthreads - 1) // nthreads
    nkg = (kout + KB - 1) // KB
    nitems = nb * nkg * nchunks
    # work item = (image n, group of KB filters, chunk of blockDim pixels); block-stride loop
    for item in range(cuda.blockIdx.x, nitems, cuda.gridDim.x):
        pc = item % nchunks
        t = item // nchunks
        kg = t % nkg
        n = t // nkg
        k0 = kg * KB
        pos = pc * nthreads + tid
        valid = pos < plane
        i = pos // wo
        j = pos % wo
        for q in range(KB):
            acc[q] = b[k0 + q] if k0 + q < kout else ZERO
        for c0 in range(0, cin, cb):
            cn = min(cb, cin - c0)
            span = cn * rs
            cuda.syncthreads()  # nobody still reads the previous slice
            for e in range(tid, KB * span, nthreads):
                q = e // span
                rem = e - q * span
                c = c0 + rem // rs
                rem = rem % rs
                if k0 + q < kout:
                    sw[e] = w[k0 + q, c, rem // s_, rem % s_]
                else:
                    sw[e] = ZERO
            cuda.syncthreads()
            if valid:
                for c in range(cn):
                    for r in range(r_):
                        for s in range(s_):
                            xv = x[n, c0 + c, i + r, j + s]
                            off = (c * r_ + r) * s_ + s
                            for q in range(KB):
                                acc[q] += xv * sw[q * span + off]
        if valid:
            for q in range(KB):
                if k0 + q < kout:
                    y[n, k0 + q, i, j] = activate(acc[q], act)


@cuda.jit(device=True, inline="always")
def _stage_chunk(x, w, sm, n, c0, cn, k0, kb, row0, nrows, wslot):
    """Stage, with the whole block, the kb filters' taps of channels c0..c0+cn (sm[0 : kb·cn·R·S],
    filter-major) and input rows row0..row0+nrows of those channels of image n (from sm[wslot])."""
    kout, r_, s_ = w.shape[0], w.shape[2], w.shape[3]
    wd = x.shape[3]
    rs = r_ * s_
    span = cn * rs
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    for e in range(tid, kb * span, nthreads):
        q = e // span
        rem = e - q * span
        c = c0 + rem // rs
        rem = rem % rs
        if k0 + q < kout:
            sm[e] = w[k0 + q, c, rem // s_, rem % s_]
        else:
            sm[e] = ZERO
    band = nrows * wd
    for e in range(tid, cn * band, nthreads):
        c = e // band
        rem = e - c * band
        sm[wslot + e] = x[n, c0 + c, row0 + rem // wd, rem % wd]


@cuda.jit
def conv2d_fwd_v3(x, w, b, y, act, cb, wslot):
    # dynamic shared memory: [weights: KB·cb·R·S floats (wslot)][input band: cb·band·W floats]
    sm = cuda.shared.array(0, float32)
    acc = cuda.local.array(KB, float32)
    nb, kout, ho, wo = y.shape
    cin, wd = x.shape[1], x.shape[3]
    r_, s_ = w.shape[2], w.shape[3]
    rs = r_ * s_
    plane = ho * wo
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = (plane + nthreads - 1) // nthreads
    nkg = (kout + KB - 1) // KB
    nitems = nb * nkg * nchunks
    for item in range(cuda.blockIdx.x, nitems, cuda.gridDim.x):
        pc = item % nchunks
        t = item // nchunks
        kg = t % nkg
        n = t // nkg
        k0 = kg * KB
        pos = pc * nthreads + tid
        valid = pos < plane
        i = pos // wo
        j = pos % wo
        row0 = (pc * nthreads) // wo  # first output row of the chunk = first input row it reads
        nrows = (min(pc * nthreads + nthreads, plane) - 1) // wo - row0 + r_  # input rows it reads
        for q in range(KB):
            acc[q] = b[k0 + q] if k0 + q < kout else ZERO
        for c0 in range(0, cin, cb):
            cn = min(cb, cin - c0)
            span = cn * rs
            cuda.syncthreads()  # nobody still reads the previous chunk
            _stage_chunk(x, w, sm, n, c0, cn, k0, KB, row0, nrows, wslot)
            cuda.syncthreads()
            if valid:
                for c in range(cn):
                    for r in range(r_):
                        base = wslot + (c * nrows + i - row0 + r) * wd + j
                        for s in range(s_):
                            xv = sm[base + s]
                            off = (c * r_ + r) * s_ + s
                            for q in range(KB):
                                acc[q] += xv * sm[q * span + off]
        if valid:
            for q in range(KB):
                if k0 + q < kout:
                    y[n, k0 + q, i, j] = activate(acc[q], act)


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
def conv2d_pool_fwd_v2(x, w, b, y, yp, argmax, act, mode, has_y, cb, wslot):
    # dynamic shared memory: [weights: PKB·cb·R·S floats (wslot)][input band: cb·rows·W floats]
    sm = cuda.shared.array(0, float32)
    a0 = cuda.local.array(PKB, float32)  # the window's 4 taps × PKB filters
    a1 = cuda.local.array(PKB, float32)
    a2 = cuda.local.array(PKB, float32)
    a3 = cuda.local.array(PKB, float32)
    nb, cin, wd = x.shape[0], x.shape[1], x.shape[3]
    kout, r_, s_ = w.shape[0], w.shape[2], w.shape[3]
    ho, wo = x.shape[2] - r_ + 1, wd - s_ + 1
    hp, wp = yp.shape[2], yp.shape[3]
    hw2 = (ho + 1) // 2
    ww2 = (wo + 1) // 2
    plane2 = hw2 * ww2
    rs = r_ * s_
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = (plane2 + nthreads - 1) // nthreads
    nkg = (kout + PKB - 1) // PKB
    for item in range(cuda.blockIdx.x, nb * nkg * nchunks, cuda.gridDim.x):
        pc = item % nchunks
        t = item // nchunks
        k0 = (t % nkg) * PKB
        n = t // nkg
        pos = pc * nthreads + tid
        valid = pos < plane2
        i2 = pos // ww2
        j2 = pos % ww2
        row0 = 2 * ((pc * nthreads) // ww2)  # first conv row = first input row of the band
        nrows = min(2 * ((min(pc * nthreads + nthreads, plane2) - 1) // ww2) + 2, ho) - row0 + r_ - 1
        down = 2 * i2 + 1 < ho  # the window's second row / column exist
        right = 2 * j2 + 1 < wo
        for q in range(PKB):
            bias = b[k0 + q] if k0 + q < kout else ZERO
            a0[q] = bias
            a1[q] = bias
            a2[q] = bias
            a3[q] = bias
        for c0 in range(0, cin, cb):
            cn = min(cb, cin - c0)
            span = cn * rs
            cuda.syncthreads()  # nobody still reads the previous chunk
            _stage_chunk(x, w, sm, n, c0, cn, k0, PKB, row0, nrows, wslot)
            cuda.syncthreads()
            if valid:
                for c in range(cn):
                    for r in range(r_):
                        base = wslot + (c * nrows + 2 * i2 - row0 + r) * wd + 2 * j2
                        for s in range(s_):
                            x0 = sm[base + s]
                            x1 = sm[base + s + 1] if right else ZERO
                            x2 = sm[base + wd + s] if down else ZERO
                            x3 = sm[base + wd + s + 1] if down and right else ZERO
                            off = (c * r_ + r) * s_ + s
                            for q in range(PKB):
                                wv = sm[q * span + off]
                                a0[q] += x0 * wv
                                a1[q] += x1 * wv
                                a2[q] += x2 * wv
                                a3[q] += x3 * wv
        if valid:
            i = 2 * i2
            j = 2 * j2
            for q in range(PKB):
                k = k0 + q
                if k < kout:
                    v0 = activate(a0[q], act)
                    v1 = activate(a1[q], act)
                    v2 = activate(a2[q], act)
                    v3 = activate(a3[q], act)
                    if has_y:
                        y[n, k, i, j] = v0
                        if right:
                            y[n, k, i, j + 1] = v1
                        if down:
                            y[n, k, i + 1, j] = v2
                            if right:
                                y[n, k, i + 1, j + 1] = v3
                    if i2 < hp and j2 < wp:
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
                            yp[n, k, i2, j2] = best
                            argmax[n, k, i2, j2] = uint8(tap)
                        else:
                            yp[n, k, i2, j2] = (v0 + v1 + v2 + v3) * QUARTER


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
def conv2d_bwd_data_v2(dz, w, dx, kb):
    # dynamic shared memory: CB·kb·R·S floats (the launch passes its size)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(CB, float32)
    nb, cin, h, wd = dx.shape
    kout, r_, s_ = w.shape[0], w.shape[2], w.shape[3]
    ho, wo = dz.shape[2], dz.shape[3]
    rs = r_ * s_
    plane = h * wd
    nthreads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    nchunks = (plane + nthreads - 1) // nthreads
    ncg = (cin + CB - 1) // CB
    # work item = (image n, group of CB input channels, chunk of blockDim pixels); block-stride loop
    for item in range(cuda.blockIdx.x, nb * ncg * nchunks, cuda.gridDim.x):
        pc = item % nchunks
        t = item // nchunks
        c0 = (t % ncg) * CB
        n = t // ncg
        pos = pc * nthreads + tid
        valid = pos < plane
        u = pos // wd
        v = pos % wd
        for q in range(CB):
            acc[q] = ZERO
        for k0 in range(0, kout, kb):
            kn = min(kb, kout - k0)
            span = kn * rs
            cuda.syncthreads()  # nobody still reads the previous slice
            for e in range(tid, CB * span, nthreads):
                q = e // span
                rem = e - q * span
                k = k0 + rem // rs
                rem = rem % rs
                if c0 + q < cin:
                    sw[e] = w[k, c0 + q, rem // s_, rem % s_]
                else:
                    sw[e] = ZERO
            cuda.syncthreads()
            if valid:
                for kk in range(kn):
                    for r in range(r_):
                        i = u - r
                        if i >= 0 and i < ho:
                            for s in range(s_):
                                j = v - s
                                if j >= 0 and j < wo:
                                    g = dz[n, k0 + kk, i, j]
                                    off = (kk * r_ + r) * s_ + s
                                    for q in range(CB):
                                        acc[q] += g * sw[q * span + off]
        if valid:
            for q in range(CB):
                if c0 + q < cin:
                    dx[n, c0 + q, u, v] = acc[q]


# --------------------------------------------------------------------------------------- bwd weight


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


# ------------------------------------------------------------------------------------ variant table

_X4 = "float32[:,:,:,::1]"
SIGNATURES = {
    "conv2d_fwd_v1": f"void({_X4}, {_X4}, float32[::1], {_X4}, int32)",
    "conv2d_fwd_v2": f"void({_X4}, {_X4}, float32[::1], {_X4}, int32, int32)",
    "conv2d_fwd_v3": f"void({_X4}, {_X4}, float32[::1], {_X4}, int32, int32, int32)",
    "conv2d_pool_fwd_v1": f"void({_X4}, {_X4}, float32[::1], {_X4}, {_X4}, uint8[:,:,:,::1], int32, int32, int32)",
    "conv2d_pool_fwd_v2": f"void({_X4}, {_X4}, float32[::1], {_X4}, {_X4}, uint8[:,:,:,::1], int32, int32, int32, "
    "int32, int32)",
    "conv2d_bwd_data_v1": f"void({_X4}, {_X4}, {_X4})",
    "conv2d_bwd_data_v2": f"void({_X4}, {_X4}, {_X4}, int32)",
    "conv2d_bwd_weight_v1": f"void({_X4}, {_X4}, {_X4}, float32[::1])",
    "conv2d_bwd_weight_v2": f"void(float32[::1], {_X4}, {_X4}, float32[::1])",
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
}
VARIANTS = {
    "conv2d_fwd": ("v1", "v2", "v3"),
    "conv2d_pool_fwd": ("v1", "v2"),
    "conv2d_bwd_data": ("v1", "v2"),
    "conv2d_bwd_weight": ("v1", "v2"),
}
