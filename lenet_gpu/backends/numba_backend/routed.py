"""The routed backward of a conv + 2×2 max-pool layer (docs/routed_backward.md): the gradients at the *pooled*
size plus the routes (argmax), so only the routed positions are touched.

  gz (B,K,Hp,Wp): dL/d(pooled output)·act'(pooled output); a = argmax[b,k,i,j] (0..3, row-major in the window)
  conv2d_bwd_weight_routed: dw[k,c,r,s] = Σ_{b,i,j} gz[b,k,i,j]·x[b,c,2i+a//2+r,2j+a%2+s]; db[k] = Σ gz
  conv2d_bwd_data_routed:   gz_below[b,c,u,v] = Σ_{k,i,j} gz[b,k,i,j]·w[k,c,u−2i−a//2,v−2j−a%2] (taps inside
                            the filter only) · act'(y_below[b,c,u,v])
Both equal the dense ops on the scattered gradient dz = pool2x2_bwd(gz, argmax, "max", (Ho, Wo)).

Every array is a flat view and every size an int32 argument; every index and size inside is uint32 (the
backend checks that no array has 2³¹ elements): unsigned subscripts need no wraparound select, unsigned
`//` no floor fix-up, and nothing is widened to int64 (Numba widens int32 arithmetic; uint32(…) of each
intermediate lets LLVM keep it 32-bit). A difference that could go negative is compared first. The hot
loops divide by run-time sizes with common.fast_div (magic numbers from the host), and block-stride loops
are while loops (a range() with a run-time step divides in 64 bits for its trip count). Deterministic:
every sum has a fixed order, no float atomics.

- conv2d_bwd_weight_routed_v1: one thread per weight (and one per bias), each summing over the batch's
  pooled positions in order: no barriers (the simulator's choice: quick_simulation makes v1 the default).
- conv2d_bwd_weight_routed_v2: conv2d_bwd_weight_v3's work split, at the pooled size: one block per
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

from numba import cuda, float32, int32, uint32

from ...stepstate import STEP
from .common import U0, U1, ZERO, U, act_grad, device_function, fast_div
from .conv2d import _last_arrival

#: conv2d_bwd_weight_routed_v2: threads per block (RW_GROUPS groups of RW_COLS threads in the reduction)
RW_THREADS = 128
#: conv2d_bwd_weight_routed_v2: columns of c·r·s (+ the bias) per block (the dense v3's BW_COLS: the backend
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
def conv2d_bwd_weight_routed_v1(xf, gzf, amf, dw, db, nb, cin, h, wd, kout, r_, s_):
    hp = U((U(h) - U(r_) + U1) >> U1)
    wp = U((U(wd) - U(s_) + U1) >> U1)
    rs = U(U(r_) * U(s_))
    crs = U(U(cin) * rs)
    hw = U(U(h) * U(wd))
    total = U(U(kout) * U(crs + U1))
    idx = U(cuda.grid(1))
    while idx < total:
        k = U(idx // U(crs + U1))
        q = U(idx - k * U(crs + U1))
        off = U0  # the column's offset from the routed tap (0 for the bias column, whose product is dropped)
        if q < crs:
            c = U(q // rs)
            t = U(q - c * rs)
            r = U(t // U(s_))
            off = U(c * hw + r * U(wd) + t - r * U(s_))
        acc = ZERO
        for n in range(U(nb)):
            for i in range(hp):
                for j in range(wp):
                    gi = U(((n * U(kout) + k) * hp + U(i)) * wp + U(j))
                    g = gzf[gi]
                    if q == crs:
                        acc += g
                    else:
                        a = U(amf[gi])
                        acc += g * xf[U(U(n) * U(cin) * hw + (U(i + i) + (a >> U1)) * U(wd) + U(j + j) + (a & U1)
                                        + off)]
        _store_column(dw, db, q, crs, k, acc)
        idx = U(idx + U(cuda.gridsize(1)))


@cuda.jit
def conv2d_bwd_weight_routed_v2(xf, gzf, amf, dw, db, partial, tickets, state, nb, cin, h, wd, kout, r_, s_,
                                splits, mpp, shpp, mwp, shwp):
    # (mpp, shpp), (mwp, shwp): common.div_magic of the pooled plane Hp·Wp and of Wp
    part = cuda.shared.array((RW_COLS, RW_THREADS), float32)
    part2 = cuda.shared.array((RW_COLS, RW_GROUPS), float32)
    last = cuda.shared.array(1, int32)
    acc = cuda.local.array(RW_COLS, float32)
    xoff = cuda.local.array(RW_COLS, uint32)  # unrolled: registers
    hp = U((U(h) - U(r_) + U1) >> U1)
    wp = U((U(wd) - U(s_) + U1) >> U1)
    ns = U(splits)
    ur, us, uw = U(r_), U(s_), U(wd)
    rs = U(ur * us)
    crs = U(U(cin) * rs)
    hw = U(U(h) * uw)
    chw = U(U(cin) * hw)
    pplane = U(hp * wp)
    kpp = U(U(kout) * pplane)
    total = U(U(nb) * pplane)
    per = U(U(total + ns - U1) // ns)
    nchunks = U(U(crs + U(RW_COLS)) // U(RW_COLS))  # ceil((crs + 1) / RW_COLS)
    tag = state[STEP]
    tid = U(cuda.threadIdx.x)
    nwork = U(U(kout) * nchunks * ns)
    work = U(cuda.blockIdx.x)
    # block-stride loops are while loops: a range() with a run-time step computes its trip count with a
    # 64-bit division
    while work < nwork:
        item = U(work // ns)
        sp = U(work - item * ns)
        k = U(item // nchunks)
        q0 = U((item - k * nchunks) * U(RW_COLS))
        # column q0+p reads x[b, c, t+r, t'+s], at offset c·H·W + r·W + s from x[b, 0, t, t'] (t, t' the
        # routed tap); the bias column and columns past the end read offset 0 (their products are dropped)
        for p in range(RW_COLS):
            q = U(q0 + U(p))
            acc[p] = ZERO
            xoff[p] = U0
            if q < crs:
                c = U(q // rs)
                t = U(q - c * rs)
                r = U(t // us)
                xoff[p] = U(c * hw + r * uw + t - r * us)
        gsum = ZERO  # Σ gz: the bias column
        m0 = U(sp * per)
        m1 = U(min(total, U(m0 + per)))
        m = U(m0 + tid)
        while m < m1:
            n = fast_div(m, mpp, shpp)
            pos = U(m - n * pplane)
            i = fast_div(pos, mwp, shwp)
            j = U(pos - i * wp)
            gi = U(n * kpp + k * pplane + pos)
            g = gzf[gi]
            a = U(amf[gi])
            base = U(n * chw + (U(i + i) + (a >> U1)) * uw + U(j + j) + (a & U1))
            gsum += g
            for p in range(RW_COLS):
                acc[p] += g * xf[U(base + xoff[p])]
            m = U(m + U(RW_THREADS))
        for p in range(RW_COLS):
            part[p, tid] = gsum if q0 + U(p) == crs else acc[p]
        cuda.syncthreads()
        # fixed-order reduction: thread (p, grp) sums part[p, 8·grp .. 8·grp+7], then thread p the 16 groups
        pc = U(tid & U(RW_COLS - 1))
        grp = U(tid >> U(3))
        s8 = ZERO
        for e in range(RW_COLS):
            s8 += part[pc, U(grp * U(RW_COLS) + U(e))]
        part2[pc, grp] = s8
        cuda.syncthreads()
        if tid < U(RW_COLS):
            s16 = ZERO
            for e in range(RW_GROUPS):
                s16 += part2[tid, U(e)]
            partial[U((item * ns + sp) * U(RW_COLS) + tid)] = s16
        if ns == U1:  # no other block shares the item: write it
            if tid < U(RW_COLS):
                _store_column(dw, db, U(q0 + tid), crs, k, partial[U(item * U(RW_COLS) + tid)])
        else:
            cuda.threadfence()  # the partials are visible before the ticket says so
            cuda.syncthreads()
            if tid == U0:
                last[0] = _last_arrival(tickets, int32(item), tag, splits)
            cuda.syncthreads()
            if last[0] == 1:
                cuda.threadfence()
                if tid < U(RW_COLS):
                    s = ZERO
                    for sp2 in range(ns):  # fixed order
                        s += partial[U((item * ns + U(sp2)) * U(RW_COLS) + tid)]
                    _store_column(dw, db, U(q0 + tid), crs, k, s)
        cuda.syncthreads()  # part, part2 and last are reused by the block's next item
        work = U(work + U(cuda.gridDim.x))


@device_function
def _store_column(dw, db, q, crs, k, v):
    """dw's column q of filter k (flat over c·r·s), or db[k] for the bias column q == crs."""
    if q < crs:
        dw[U(k * crs + q)] = v
    elif q == crs:
        db[k] = v


@cuda.jit
def conv2d_bwd_data_routed_v1(gzf, wf, amf, ybf, gzbf, nb, cin, h, wd, kout, r_, s_, act, kb, mpl, shpl, mw,
                              shw):
    # (mpl, shpl), (mw, shw): common.div_magic of the plane H·W and of W
    # dynamic shared memory: kb·R·S·RCB floats, [k][r][s][q] (the launch passes its size)
    sw = cuda.shared.array(0, float32)
    acc = cuda.local.array(RCB, float32)
    ur, us, uw, uc = U(r_), U(s_), U(wd), U(cin)
    hp = U((U(h) - ur + U1) >> U1)
    wp = U((uw - us + U1) >> U1)
    pplane = U(hp * wp)
    plane = U(U(h) * uw)
    rs = U(ur * us)
    total = U(U(nb) * plane)
    nthreads = U(cuda.blockDim.x)
    tid = U(cuda.threadIdx.x)
    nchunks = U(U(total + nthreads - U1) // nthreads)
    ncg = U(U(uc + U(RCB - 1)) // U(RCB))
    nitems = U(ncg * nchunks)
    item = U(cuda.blockIdx.x)
    while item < nitems:  # block-stride (a while loop: see conv2d_bwd_weight_routed_v2)
        cg = U(item // nchunks)  # block-uniform: the channel group
        c0 = U(cg * U(RCB))
        m = U((item - cg * nchunks) * nthreads + tid)
        valid = m < total
        n = fast_div(m, mpl, shpl)
        pos = U(m - n * plane)
        u = fast_div(pos, mw, shw)
        v = U(pos - u * uw)
        # the pooled windows (i, j) whose routed tap (2i + a//2, 2j + a%2) can lie in rows u−R+1 .. u and
        # columns v−S+1 .. v: i from ⌈(u−R)/2⌉ to ⌊u/2⌋ (within the map), likewise j
        i0 = U((u + U1 - ur) >> U1) if u + U1 >= ur else U0
        i1 = U(min(U(hp - U1), U(u >> U1)))
        j0 = U((v + U1 - us) >> U1) if v + U1 >= us else U0
        j1 = U(min(U(wp - U1), U(v >> U1)))
        for q in range(RCB):
            acc[q] = ZERO
        k0 = U0
        while k0 < U(kout):
            kn = U(min(U(kb), U(U(kout) - k0)))
            cuda.syncthreads()  # nobody still reads the previous chunk
            e = tid
            while e < U(kn * rs * U(RCB)):  # sw[(kk·rs + t)·RCB + q] = w[k0+kk, c0+q, t]
                f = U(e // U(RCB))
                q = U(e - f * U(RCB))
                kk = U(f // rs)
                c = U(c0 + q)
                sw[e] = wf[U(((k0 + kk) * uc + c) * rs + f - kk * rs)] if c < uc else ZERO
                e = U(e + nthreads)
            cuda.syncthreads()
            if valid:
                for kk in range(kn):
                    gbase = U((n * U(kout) + k0 + U(kk)) * pplane)
                    for i in range(i0, U(i1 + U1)):
                        for j in range(j0, U(j1 + U1)):
                            gi = U(gbase + U(i) * wp + U(j))
                            a = U(amf[gi])
                            t = U(U(i + i) + (a >> U1))  # the routed tap's row and column
                            t2 = U(U(j + j) + (a & U1))
                            if t <= u and t2 <= v:
                                r = U(u - t)
                                s = U(v - t2)
                                if r < ur and s < us:
                                    g = gzf[gi]
                                    wo = U((U(U(kk) * ur + r) * us + s) * U(RCB))
                                    for q in range(RCB):
                                        acc[q] += g * sw[U(wo + U(q))]
            k0 = U(k0 + U(kb))
        if valid:
            for q in range(RCB):
                c = U(c0 + U(q))
                if c < uc:
                    o = U((n * uc + c) * plane + pos)
                    gzbf[o] = acc[q] * act_grad(ybf[o], act)
        item = U(item + U(cuda.gridDim.x))


# ------------------------------------------------------------------------------------ variant table

_F = "float32[::1]"
_I7 = ", ".join(["int32"] * 7)  # nb, cin, h, w, kout, r, s
SIGNATURES = {
    "conv2d_bwd_weight_routed_v1": f"void({_F}, {_F}, uint8[::1], {_F}, {_F}, {_I7})",
    "conv2d_bwd_weight_routed_v2": f"void({_F}, {_F}, uint8[::1], {_F}, {_F}, {_F}, int64[::1], int32[::1], {_I7}, "
    "int32, uint32, uint32, uint32, uint32)",
    "conv2d_bwd_data_routed_v1": f"void({_F}, {_F}, uint8[::1], {_F}, {_F}, {_I7}, int32, int32, uint32, uint32, "
    "uint32, uint32)",
}
KERNELS = {
    "conv2d_bwd_weight_routed_v1": conv2d_bwd_weight_routed_v1,
    "conv2d_bwd_weight_routed_v2": conv2d_bwd_weight_routed_v2,
    "conv2d_bwd_data_routed_v1": conv2d_bwd_data_routed_v1,
}
LAUNCH_BOUNDS: dict[str, tuple[int, ...]] = {}
VARIANTS = {"conv2d_bwd_weight_routed": ("v1", "v2"), "conv2d_bwd_data_routed": ("v1",)}
DEFAULT_VARIANTS = {op: vs[-1] for op, vs in VARIANTS.items()}


def data_chunk(wshape: tuple[int, ...]) -> int:
    """conv2d_bwd_data_routed_v1: filters per shared-memory chunk."""
    k, _, r, s = wshape
    return max(1, min(k, RD_SMEM_FLOATS // (RCB * r * s)))
