"""lenet_fwd: the whole LeNet-5 forward pass in one launch, uint8 images → logits (the Numba face of
kernels/lenet_fwd.cu).

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

``lenet_fwd(be, ...)`` is the launch wrapper with the protocol's signature (first parameter the backend).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import cuda, float32

from ..base import ACT_CODES, POOL_CODES, check_act, check_mode
from .common import POOL_MAX, U0, U1, U, activate, ceil_div
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


@cuda.jit(device=True, inline="always")
def _pool(a, b, c, d, mode):
    if mode == POOL_MAX:
        return max(max(a, b), max(c, d))
    return (a + b + c + d) * QUARTER


@cuda.jit(device=True, inline="always")
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


# ------------------------------------------------------------------------------------ variant table

_F4 = "float32[:,:,:,::1]"
_F2 = "float32[:,::1]"
_F1 = "float32[::1]"
SIGNATURES = {
    "lenet_fwd_v1": f"void(uint8[:,:,::1], {_F4}, {_F1}, {_F4}, {_F1}, {_F2}, {_F1}, {_F2}, {_F1}, {_F2}, {_F1}, "
    f"{_F2}, int32, int32, float32, float32, int32, int32, int32)",
}
KERNELS = {"lenet_fwd_v1": lenet_fwd_v1}
VARIANTS = {"lenet_fwd": ("v1",)}
DEFAULT_VARIANTS = {"lenet_fwd": "v1"}


def lenet_fwd(be: Any, images: Any, params: dict, logits: Any, mean: float, std: float, act: str, mode: str,
              variant: str | None = None) -> None:
    """reference.lenet_fwd in one launch; the protocol's optional op (lenet_gpu.backends.base)."""
    v = variant or getattr(be, "default_variants", {}).get("lenet_fwd") or DEFAULT_VARIANTS["lenet_fwd"]
    if v not in VARIANTS["lenet_fwd"]:
        raise ValueError(f"lenet_fwd: unknown variant {v!r}; choose one of {', '.join(VARIANTS['lenet_fwd'])}")
    check_act(act)
    check_mode(mode)
    n = images.shape[0]
    _check(images, "images", (n, IMAGE, IMAGE), np.uint8)
    p = params
    nh1, nh2, nc = p["c5.w"].shape[0], p["f6.w"].shape[0], p["out.w"].shape[0]
    for name, shape in (("c1.w", (K1, 1, RS, RS)), ("c1.b", (K1,)), ("c3.w", (K3, K1, RS, RS)), ("c3.b", (K3,)),
                        ("c5.w", (nh1, I5)), ("c5.b", (nh1,)), ("f6.w", (nh2, nh1)), ("f6.b", (nh2,)),
                        ("out.w", (nc, nh2)), ("out.b", (nc,))):
        _check(p[name], name, shape)
    _check(logits, "logits", (n, nc))
    if n < 1:
        raise ValueError("lenet_fwd: needs at least one image")
    blocks, imgs, smem = plan(n, nh1, nh2)
    xr, yr = regions(nh1, nh2)
    launch_kernel(be, "lenet_fwd_v1", lenet_fwd_v1, blocks, THREADS, smem, images, p["c1.w"], p["c1.b"], p["c3.w"],
                  p["c3.b"], p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"], p["out.b"], logits,
                  np.int32(ACT_CODES[act]), np.int32(POOL_CODES[mode]), np.float32(1.0 / (255.0 * std)),
                  np.float32(-mean / std), np.int32(imgs), np.int32(xr), np.int32(yr))
