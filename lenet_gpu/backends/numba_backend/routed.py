"""The routed backward of a conv + 2×2 max-pool layer (docs/routed_backward.md): the gradients at the *pooled*
size plus the routes (argmax), so only the routed positions are touched.

  gz (B,K,Hp,Wp): dL/d(pooled output)·act'(pooled output); a = argmax[b,k,i,j] (0..3, row-major in the window)
  conv2d_bwd_weight_routed: dw[k,c,r,s] = Σ_{b,i,j} gz[b,k,i,j]·x[b,c,2i+a//2+r,2j+a%2+s]; db[k] = Σ gz
  conv2d_bwd_data_routed:   gz_below[b,c,u,v] = Σ_{k,i,j} gz[b,k,i,j]·w[k,c,u−2i−a//2,v−2j−a%2] (taps inside
                            the filter only) · act'(y_below[b,c,u,v])
Both equal the dense ops on the scattered gradient dz = pool2x2_bwd(gz, argmax, "max", (Ho, Wo)).

Every array is a flat view and every size an int32 argument; offsets are int32 (the backend checks that no
array has 2³¹ elements) and nonnegative by construction. Deterministic: every sum has a fixed order, no
float atomics.

- conv2d_bwd_weight_routed_v1: conv2d_bwd_weight_v3's work split, at the pooled size: one block per
  (filter k, chunk of RW_COLS columns of c·r·s + the bias, split of the batch's pooled positions); a thread
  strides over the split's positions, reads gz and its route once and feeds RW_COLS FMAs from x at the
  routed tap (the column offsets live in registers, not shared memory); the block reduces in a fixed
  order (two barriers: 16 groups of 8, then the 16 group sums), writes its split's partials, and the
  item's last block (conv2d._last_arrival: an int64 compare-and-swap ticket tagged with the step state's
  STEP) sums the splits in split order.
- conv2d_bwd_data_routed_v1: a gather (no atomics): one thread per input position (b, u, v) and RCB
  channels in registers; the block's channel group of the filters is staged in shared memory, tap-major
  ([k][r][s][q], so a tap's RCB weights are adjacent); for each filter the thread visits the ≤ 3×3 pooled
  windows whose routed tap can reach (u, v), and adds gz·w when the tap lies inside the filter.
"""

from __future__ import annotations

from numba import cuda, float32, int32

from ...stepstate import STEP
from .common import ZERO, act_grad
from .conv2d import _last_arrival

#: conv2d_bwd_weight_routed_v1: threads per block (RW_GROUPS groups of RW_COLS threads in the reduction)
RW_THREADS = 128
#: conv2d_bwd_weight_routed_v1: columns of c·r·s (+ the bias) per block (the dense v3's BW_COLS: the backend
#: shares its partials/tickets scratch)
RW_COLS = 8
RW_GROUPS = RW_THREADS // RW_COLS
#: conv2d_bwd_data_routed_v1: input channels per thread (LeNet-5's S2 has 6: no idle lane)
RCB = 6
#: conv2d_bwd_data_routed_v1: threads per block
RD_THREADS = 128
#: conv2d_bwd_data_routed_v1: shared-memory budget for one filter chunk (kb filters × R·S taps × RCB floats)
RD_SMEM_FLOATS = 4096


@cuda.jit
def conv2d_bwd_weight_routed_v1(xf, gzf, amf, dw, db, partial, tickets, state, nb, cin, h, wd, kout, r_, s_,
                                splits):
    part = cuda.shared.array((RW_COLS, RW_THREADS), float32)
    part2 = cuda.shared.array((RW_COLS, RW_GROUPS), float32)
    last = cuda.shared.array(1, int32)
    acc = cuda.local.array(RW_COLS, float32)
    xoff = cuda.local.array(RW_COLS, int32)  # unrolled: registers
    hp = int32((h - r_ + 1) >> 1)
    wp = int32((wd - s_ + 1) >> 1)
    rs = int32(r_ * s_)
    crs = int32(cin * rs)
    hw = int32(h * wd)
    pplane = int32(hp * wp)
    total = int32(nb * pplane)
    per = int32((total + splits - 1) // splits)
    nchunks = int32((crs + RW_COLS) // RW_COLS)  # ceil((crs + 1) / RW_COLS)
    tag = state[STEP]
    tid = int32(cuda.threadIdx.x)
    for work in range(int32(cuda.blockIdx.x), int32(kout * nchunks * splits), int32(cuda.gridDim.x)):
        item = int32(work // splits)
        sp = int32(work - item * splits)
        k = int32(item // nchunks)
        q0 = int32((item - k * nchunks) * RW_COLS)
        # column q0+p reads x[b, c, t+r, t'+s], at offset c·H·W + r·W + s from x[b, 0, t, t'] (t, t' the
        # routed tap); the bias column and columns past the end read offset 0 (their products are dropped)
        for p in range(RW_COLS):
            q = int32(q0 + p)
            acc[p] = ZERO
            xoff[p] = 0
            if q < crs:
                c = int32(q // rs)
                t = int32(q - c * rs)
                r = int32(t // s_)
                xoff[p] = int32(c * hw + r * wd + t - r * s_)
        gsum = ZERO  # Σ gz: the bias column
        m0 = int32(sp * per)
        m1 = int32(min(total, m0 + per))
        for m in range(int32(m0 + tid), m1, RW_THREADS):
            n = int32(m // pplane)
            pos = int32(m - n * pplane)
            i = int32(pos // wp)
            j = int32(pos - i * wp)
            gi = int32((n * kout + k) * pplane + pos)
            g = gzf[gi]
            a = int32(amf[gi])
            base = int32(n * cin * hw + (2 * i + (a >> 1)) * wd + 2 * j + (a & 1))
            gsum += g
            for p in range(RW_COLS):
                acc[p] += g * xf[int32(base + xoff[p])]
        for p in range(RW_COLS):
            part[p, tid] = gsum if q0 + p == crs else acc[p]
        cuda.syncthreads()
        # fixed-order reduction: thread (p, grp) sums part[p, 8·grp .. 8·grp+7], then thread p the 16 groups
        p = int32(tid & (RW_COLS - 1))
        grp = int32(tid >> 3)
        s8 = ZERO
        for e in range(RW_COLS):
            s8 += part[p, grp * RW_COLS + e]
        part2[p, grp] = s8
        cuda.syncthreads()
        if tid < RW_COLS:
            s16 = ZERO
            for e in range(RW_GROUPS):
                s16 += part2[tid, e]
            partial[int32((item * splits + sp) * RW_COLS + tid)] = s16
        if splits == 1:  # no other block shares the item: write it
            if tid < RW_COLS:
                _store_column(dw, db, int32(q0 + tid), crs, rs, k, s_, partial[int32(item * RW_COLS + tid)])
            cuda.syncthreads()  # part, part2 are reused by the block's next item
            continue
        cuda.threadfence()  # the partials are visible before the ticket says so
        cuda.syncthreads()
        if tid == 0:
            last[0] = _last_arrival(tickets, item, tag, splits)
        cuda.syncthreads()
        if last[0] == 1:
            cuda.threadfence()
            if tid < RW_COLS:
                s = ZERO
                for sp2 in range(splits):  # fixed order
                    s += partial[int32((item * splits + sp2) * RW_COLS + tid)]
                _store_column(dw, db, int32(q0 + tid), crs, rs, k, s_, s)
        cuda.syncthreads()  # part, part2 and last are reused by the block's next item


@cuda.jit(device=True, inline="always")
def _store_column(dw, db, q, crs, rs, k, s_, v):
    """dw's column q of filter k (flat over c·r·s), or db[k] for the bias column q == crs."""
    if q < crs:
        dw[int32(k * crs + q)] = v
    elif q == crs:
        db[k] = v


@cuda.jit
def conv2d_bwd_data_routed_v1(gzf, wf, amf, ybf, gzbf, nb, cin, h, wd, kout, r_, s_, act, kb):
    # dynamic shared memory: kb·R·S·RCB floats, [k][r][s][q] (the launch passes its size)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(RCB, float32)
    hp = int32((h - r_ + 1) >> 1)
    wp = int32((wd - s_ + 1) >> 1)
    pplane = int32(hp * wp)
    plane = int32(h * wd)
    rs = int32(r_ * s_)
    total = int32(nb * plane)
    nthreads = int32(cuda.blockDim.x)
    tid = int32(cuda.threadIdx.x)
    nchunks = int32((total + nthreads - 1) // nthreads)
    ncg = int32((cin + RCB - 1) // RCB)
    for item in range(int32(cuda.blockIdx.x), int32(ncg * nchunks), int32(cuda.gridDim.x)):
        cg = int32(item // nchunks)  # block-uniform: the channel group
        c0 = int32(cg * RCB)
        m = int32((item - cg * nchunks) * nthreads + tid)
        valid = m < total
        n = int32(m // plane)
        pos = int32(m - n * plane)
        u = int32(pos // wd)
        v = int32(pos - u * wd)
        # the pooled windows (i, j) whose routed tap (2i + a//2, 2j + a%2) can lie in rows u−R+1 .. u and
        # columns v−S+1 .. v: i from ⌈(u−R)/2⌉ to ⌊u/2⌋ (within the map), likewise j
        i0 = int32((u - r_ + 1) >> 1) if u + 1 >= r_ else int32(0)
        i1 = int32(min(hp - 1, u >> 1))
        j0 = int32((v - s_ + 1) >> 1) if v + 1 >= s_ else int32(0)
        j1 = int32(min(wp - 1, v >> 1))
        for q in range(RCB):
            acc[q] = ZERO
        for k0 in range(int32(0), kout, kb):
            kn = int32(min(kb, kout - k0))
            cuda.syncthreads()  # nobody still reads the previous chunk
            for e in range(tid, int32(kn * rs * RCB), nthreads):  # sw[(kk·rs + t)·RCB + q] = w[k0+kk, c0+q, t]
                q = int32(e % RCB)
                f = int32(e // RCB)
                kk = int32(f // rs)
                c = int32(c0 + q)
                sw[e] = wf[int32(((k0 + kk) * cin + c) * rs + f - kk * rs)] if c < cin else ZERO
            cuda.syncthreads()
            if valid:
                for kk in range(kn):
                    gbase = int32((n * kout + k0 + kk) * pplane)
                    for i in range(i0, i1 + 1):
                        for j in range(j0, j1 + 1):
                            gi = int32(gbase + i * wp + j)
                            a = int32(amf[gi])
                            r = int32(u - 2 * i - (a >> 1))
                            s = int32(v - 2 * j - (a & 1))
                            if r >= 0 and r < r_ and s >= 0 and s < s_:
                                g = gzf[gi]
                                wo = int32(((kk * r_ + r) * s_ + s) * RCB)
                                for q in range(RCB):
                                    acc[q] += g * sw[int32(wo + q)]
        if valid:
            for q in range(RCB):
                c = int32(c0 + q)
                if c < cin:
                    o = int32((n * cin + c) * plane + pos)
                    gzbf[o] = acc[q] * act_grad(ybf[o], act)


# ------------------------------------------------------------------------------------ variant table

_F = "float32[::1]"
_I7 = ", ".join(["int32"] * 7)  # nb, cin, h, w, kout, r, s
SIGNATURES = {
    "conv2d_bwd_weight_routed_v1": f"void({_F}, {_F}, uint8[::1], {_F}, {_F}, {_F}, int64[::1], int32[::1], {_I7}, "
    "int32)",
    "conv2d_bwd_data_routed_v1": f"void({_F}, {_F}, uint8[::1], {_F}, {_F}, {_I7}, int32, int32)",
}
KERNELS = {
    "conv2d_bwd_weight_routed_v1": conv2d_bwd_weight_routed_v1,
    "conv2d_bwd_data_routed_v1": conv2d_bwd_data_routed_v1,
}
LAUNCH_BOUNDS: dict[str, tuple[int, ...]] = {}
VARIANTS = {"conv2d_bwd_weight_routed": ("v1",), "conv2d_bwd_data_routed": ("v1",)}
DEFAULT_VARIANTS = {op: vs[-1] for op, vs in VARIANTS.items()}


def data_chunk(wshape: tuple[int, ...]) -> int:
    """conv2d_bwd_data_routed_v1: filters per shared-memory chunk."""
    k, _, r, s = wshape
    return max(1, min(k, RD_SMEM_FLOATS // (RCB * r * s)))
