"""The fused ops of the cupy backend: ``head_train`` (kernels/head.cu) and ``lenet_fwd`` (kernels/lenet_fwd.cu).

Each is a function whose first parameter is the backend and whose others are those of the protocol's optional op
(lenet_gpu.backends.base), so a backend class binds it as a method with one line (``head_train = fused.head_train``)
and lists its variants with ``variants.update(fused.VARIANTS)``. They launch through the backend's runtime
(``runtime.get_kernel`` + ``runtime.launch``), so the counters, the capture rules and the CPU harness apply as to
every other op. Like every op wrapper: check shapes, dtypes and contiguity, take the preallocated outputs, compute
the launch shape (``head_plan``, ``lenet_fwd_plan``), pass explicitly typed scalars, launch.

head_train makes two launches (rows: forward, loss, backward data and dz_conv; then the weight gradients and the
stats row) and keeps its scratch (dz of each layer, the per-row loss) in ``be._scratch``, allocated at the first
call at a shape. lenet_fwd makes one launch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import ACT_CODES, POOL_CODES, check_act, check_lenet_eval_args, check_lenet_fwd_outputs, check_mode
from .runtime import DEFAULT_SM_COUNT, define_options
from .runtime import check_array as _check

i32, f32 = np.int32, np.float32

#: op → its variants (v1 the readable baseline); the default is the last
VARIANTS: dict[str, tuple[str, ...]] = {"head_train": ("v1", "v2", "v3", "v4"), "lenet_fwd": ("v1", "v2", "v3", "v4")}
DEFAULT_VARIANTS: dict[str, str] = {op: vs[-1] for op, vs in VARIANTS.items()}
#: head_train's default is v3's plan, which runs v4's rows kernel at large batches (head_plan); "v4" by name runs
#: v4's rows kernel at every batch
DEFAULT_VARIANTS["head_train"] = "v3"
#: lenet_fwd's too: v3's plan runs v4's kernel at large batches (lenet_fwd_plan), v3's tiles below
DEFAULT_VARIANTS["lenet_fwd"] = "v3"
#: op → the kernel file stem (kernels/<stem>.cu)
STEMS: dict[str, str] = {"head_train": "head", "lenet_fwd": "lenet_fwd"}
#: compile-time parameters per kernel file (the #ifndef defaults of each .cu, made explicit)
DEFINES: dict[str, dict[str, int]] = {"head": {"HEAD_THREADS": 256}, "lenet_fwd": {}}

SMEM_LIMIT = 48 * 1024  # static + dynamic shared memory of a block without an opt-in
HEAD_WG_THREADS = {"v1": 128, "v2": 512, "v3": 512, "v4": 512}  # head.cu WG_THREADS, WG2_THREADS (v2 to v4)
HEAD3_THREADS = 512  # head.cu HEAD3_THREADS: head_train_v3's block (one row of the batch)
#: head.cu's compile-time geometry of v3 (HEAD_C, HEAD_HP, HEAD_WP, HEAD_H, HEAD_W): LeNet-5's S4 and C3
HEAD_LENET_GEOM = (16, 5, 5, 10, 10)
HEAD_WG_TO, HEAD_WG_TI = 16, 32  # head.cu wgrad v2 tile
#: head_train v2 picks the fewest rows per block (1, 2, 4, 8) that keeps the grid within this many blocks: two
#: blocks per SM of an H100 (132 SMs) before a block takes more rows
HEAD_FILL_BLOCKS = 2 * 132
#: head_train v4 (head.cu HEAD4_ROWS, HEAD4_KC, HEAD4_THREADS = 8 rows): rows a block, most first; v3's plan takes
#: v4's rows kernel where blocks of its fewest rows still give a block to every SM (⌈B/8⌉ >= this)
HEAD4_ROWS_CHOICES = (32, 16, 8)
HEAD4_KC = 20
HEAD4_FILL_BLOCKS = DEFAULT_SM_COUNT

# lenet_fwd.cu's fixed LeNet-5 geometry and tile parameters
LF_IMAGE = 28  # input images 28 x 28, padded by 2 to 32 x 32
LF_SHAPES = {"c1.w": (6, 1, 5, 5), "c1.b": (6,), "c3.w": (16, 6, 5, 5), "c3.b": (16,)}
LF_I5 = 16 * 5 * 5  # S4 flattened: the input width of C5
LF_THREADS = {"v1": 256, "v2": 224, "v3": 224, "v4": 224}  # lenet_fwd.cu LF_THREADS_V1 / LF_THREADS_V2
#: C1 + C3 weights and biases as staged (LF_W_V1 / LF_W_V2)
LF_WEIGHT_FLOATS = {"v1": 2576, "v2": 2624, "v3": 2624, "v4": 2624}
LF_MAX_IMGS = 4  # images per block at most in v1-v3 (the v2 kernel is specialised for 1, 2, 4)
#: lenet_fwd v4 (large batches): images a block, most first; v3's plan takes v4 where the grid of its blocks still
#: gives LF4_BLOCKS_PER_SM blocks to every SM; LF4_G images a conv group (lenet_fwd.cu LF4_G)
LF4_IMGS_CHOICES = (16, 8)
LF4_BLOCKS_PER_SM = 3
LF4_G = 2
#: v4's dynamic shared memory goes past the 48 KiB a block gets by default (the runtime opts the kernel in); the
#: plan keeps it within the smallest opt-in limit of the GPUs it may run on (sm_86 / sm_89: 99 KiB a block)
LF4_SMEM_MAX = 99 * 1024


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round4(n: int) -> int:
    return ceil_div(n, 4) * 4


@dataclass(frozen=True)
class FusedLaunch:
    """One launch: the kernel, grid, block, dynamic shared memory bytes, the trailing int arguments of the kernel
    and the compile-time parameters it is specialised on (added to DEFINES of its file)."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0
    extra: tuple[int, ...] = ()
    defines: tuple[tuple[str, int], ...] = ()

    def options(self, stem: str) -> tuple[str, ...]:
        """The NVRTC options of the module this launch needs."""
        return define_options({**DEFINES[stem], **dict(self.defines)})


# ---------------------------------------------------------------------------------------------- plumbing
def _variant(be: Any, op: str, variant: str | None) -> str:
    v = variant or getattr(be, "default_variants", {}).get(op) or DEFAULT_VARIANTS[op]
    if v not in VARIANTS[op]:
        raise ValueError(f"{op}: unknown variant {v!r}; this backend has {VARIANTS[op]}")
    return v


def _launch(be: Any, op: str, launch: FusedLaunch, args: tuple) -> None:
    stem = STEMS[op]
    kernel = be.runtime.get_kernel(stem, launch.kernel, launch.options(stem))
    be.runtime.launch(kernel, launch.grid, launch.block, args + tuple(i32(e) for e in launch.extra), launch.shared_mem)


_SCRATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scratch(be: Any) -> dict:
    """The backend's per-shape kernel workspaces (``be._scratch``, or a dict of our own keyed by the backend)."""
    d = getattr(be, "_scratch", None)
    if isinstance(d, dict):
        return d
    return _SCRATCH.setdefault(be, {})


# ---------------------------------------------------------------------------------------------- head_train
#: the rows per block head_train_v2 is compiled for (HEAD_ROWS)
HEAD_ROWS_CHOICES = (1, 2, 4, 8)


def head_rows_per_block(batch: int, fill_blocks: int | None = None) -> int:
    """head_train v2: rows per block, the fewest of 1, 2, 4, 8 that keep the grid within ``fill_blocks`` blocks
    (default HEAD_FILL_BLOCKS)."""
    fill_blocks = HEAD_FILL_BLOCKS if fill_blocks is None else fill_blocks
    for r in (1, 2, 4):
        if ceil_div(batch, r) <= fill_blocks:
            return r
    return 8


def head_v2_smem(rows: int, i: int, h1: int, h2: int, nc: int) -> int:
    """Dynamic shared memory of head_train_v2 (bytes): the rows and every intermediate of the block."""
    return 4 * rows * (i + 2 * h1 + 2 * h2 + 2 * nc)


def _pow2_group(o: int, warps: int) -> int:
    f = 1
    while f * warps < o and f < 32:
        f *= 2
    return f


def head_v3_smem(i: int, h1: int, h2: int, nc: int) -> int:
    """Dynamic shared memory of head_train_v3 (bytes; head.cu namespace head3's SMEM_FLOATS): x, w2 (or C5's
    backward partials, a row of I per warp holding C5 outputs), w3, h1, h2, z, d3, d2, d1 and a column-product
    partial per thread."""
    warps = HEAD3_THREADS // 32
    groups = ceil_div(h1, _pow2_group(h1, warps))
    return 4 * (i + max(h2 * h1, min(groups, warps) * i) + nc * h2 + 2 * h1 + 2 * h2 + 2 * nc + HEAD3_THREADS)


def head_v3_defines(geom: tuple[int, int, int, int, int], h1: int, h2: int, nc: int) -> tuple[tuple[str, int], ...]:
    """head.cu's compile-time geometry for v3's module: geom = (C, Hp, Wp, H, W) (x (B,C,Hp,Wp), yconv (B,C,H,W);
    H = 2·Hp, W = 2·Wp for the routed form), and the widths H1, H2, NC."""
    c, hp, wp, h, w = geom
    return (("HEAD_C", c), ("HEAD_H", h), ("HEAD_H1", h1), ("HEAD_H2", h2), ("HEAD_HP", hp), ("HEAD_NC", nc),
            ("HEAD_W", w), ("HEAD_WP", wp))


def head4_rows(batch: int, fill_blocks: int | None = None) -> int:
    """head_train v4: rows per block, the most of HEAD4_ROWS_CHOICES that still gives ``fill_blocks`` blocks (default
    HEAD4_FILL_BLOCKS: one an SM), else the fewest."""
    fill_blocks = HEAD4_FILL_BLOCKS if fill_blocks is None else fill_blocks
    for r in HEAD4_ROWS_CHOICES:
        if ceil_div(batch, r) >= fill_blocks:
            return r
    return HEAD4_ROWS_CHOICES[-1]


def head_v4_smem(rows: int, h1: int, h2: int, nc: int) -> int:
    """Static shared memory of head_train_v4 (bytes; head.cu namespace head4's SMEM_FLOATS): h1 and h2 of the block's
    rows, z, d3, a chunk of the rows ([KC][rows + 4]) and of the weights ([KC][32 * columns a lane + 1])."""
    jp = max(min(ceil_div(h1, 32), 4), min(ceil_div(h2, 32), 4))
    off_a = _round4(rows * (h1 + h2 + 2 * nc))
    return 4 * (off_a + HEAD4_KC * (rows + 4) + HEAD4_KC * (32 * jp + 1))


def head_plan(variant: str, B: int, I: int, H1: int, H2: int, NC: int,  # noqa: E741, N803
              geom: tuple[int, int, int, int, int] | None = None,
              tiled: bool = True) -> tuple[FusedLaunch, FusedLaunch]:
    """The two launches of head_train: (rows kernel, weight-gradient kernel). v1's rows kernel takes its rows per
    block as an argument, v2's is compiled for it (HEAD_ROWS). Raises ValueError when v2's rows do not fit shared
    memory even one row per block (v1 needs none).

    v3 is compiled for the geometry (``geom`` = (C, Hp, Wp, H, W) with C·Hp·Wp = I; default LeNet-5's when I = 400,
    else a flat (I, 1, 1, 2, 2)): head_train_v3 (a row a block) where v2 would take one row a block (batch ≤
    HEAD_FILL_BLOCKS) and its shared memory fits 48 KiB; otherwise v2's rows kernel at v2's rows per block (v3 has
    no multi-row body), in the same module; then head_train_wgrad_v4 (wgrad v3's sums and bits, its chunk staging
    pipelined; until 2026-12-07 the plan took head_train_wgrad_v3). Beyond v3's batches, where ``tiled`` and
    v4's 8-row blocks fill the SMs (⌈B/8⌉ ≥ HEAD4_FILL_BLOCKS: B ≥ 1,049) and its shared memory fits, v3's plan
    takes v4's rows kernel (register-tiled products over head4_rows(B) rows a block) instead of v2's.
    ``tiled=False``: v3's plan without v4 (for a backend that has no v4 kernel; numba has one since 2026-12-07).

    v4 by name: head_train_v4's rows kernel at every batch (head4_rows(B) rows a block) where its shared memory fits,
    else v2's rows kernel as v3's plan; head_train_wgrad_v4; one module (the geometry's and HEAD4_ROWS)."""
    threads = DEFINES["head"]["HEAD_THREADS"]
    if variant in ("v3", "v4"):
        geom = geom or (HEAD_LENET_GEOM if I == 16 * 5 * 5 else (I, 1, 1, 2, 2))
        if geom[0] * geom[1] * geom[2] != I:
            raise ValueError(f"head_train_{variant}: geometry {geom} does not give I = {I}")
        gdefs = head_v3_defines(geom, H1, H2, NC)
        smem = head_v3_smem(I, H1, H2, NC)
        rows4 = head4_rows(B)
        v4_fits = head_v4_smem(rows4, H1, H2, NC) <= SMEM_LIMIT
        if variant == "v3" and head_rows_per_block(B) == 1 and smem <= SMEM_LIMIT:
            a = FusedLaunch("head_train_v3", (B, 1, 1), (HEAD3_THREADS, 1, 1), smem, (), gdefs)
        elif v4_fits and (variant == "v4" or (tiled and ceil_div(B, HEAD4_ROWS_CHOICES[-1]) >= HEAD4_FILL_BLOCKS)):
            a = FusedLaunch("head_train_v4", (ceil_div(B, rows4), 1, 1), (8 * rows4, 1, 1), 0, (),
                            gdefs + (("HEAD4_ROWS", rows4),))
        else:
            a = head_plan("v2", B, I, H1, H2, NC)[0]
            a = FusedLaunch(a.kernel, a.grid, a.block, a.shared_mem, a.extra, a.defines + gdefs)
        tiles = sum(ceil_div(o, HEAD_WG_TO) * ceil_div(k + 1, HEAD_WG_TI) for o, k in ((H1, I), (H2, H1), (NC, H2)))
        wt = HEAD_WG_THREADS[variant]  # the rows launch's defines: one module for both kernels
        return a, FusedLaunch("head_train_wgrad_v4", (tiles + 1, 1, 1), (wt, 1, 1), 0, (), a.defines)
    if variant == "v1":
        rows = max(1, min(8, ceil_div(B, HEAD_FILL_BLOCKS)))
        a = FusedLaunch("head_train_v1", (ceil_div(B, rows), 1, 1), (threads, 1, 1), 0, (rows,))
        total = H1 * (I + 1) + H2 * (H1 + 1) + NC * (H2 + 1) + 1
        wt = HEAD_WG_THREADS["v1"]
        return a, FusedLaunch("head_train_wgrad_v1", (ceil_div(total, wt), 1, 1), (wt, 1, 1))
    rows = head_rows_per_block(B)
    while rows > 1 and head_v2_smem(rows, I, H1, H2, NC) > SMEM_LIMIT:
        rows //= 2
    smem = head_v2_smem(rows, I, H1, H2, NC)
    if smem > SMEM_LIMIT:
        raise ValueError(f"head_train_v2: one row needs {smem} bytes of shared memory (> {SMEM_LIMIT}); use v1")
    a = FusedLaunch("head_train_v2", (ceil_div(B, rows), 1, 1), (threads, 1, 1), smem, (), (("HEAD_ROWS", rows),))
    tiles = sum(ceil_div(o, HEAD_WG_TO) * ceil_div(k + 1, HEAD_WG_TI) for o, k in ((H1, I), (H2, H1), (NC, H2)))
    return a, FusedLaunch("head_train_wgrad_v2", (tiles + 1, 1, 1), (HEAD_WG_THREADS["v2"], 1, 1))


#: head_train's launch plans by call shape and variant (head_plan is a pure function of them and the fill targets)
_HEAD_PLANS: dict[tuple, tuple[FusedLaunch, FusedLaunch]] = {}


def head_train(
    be: Any, x: Any, labels: Any, w1: Any, b1: Any, w2: Any, b2: Any, w3: Any, b3: Any, h1: Any, h2: Any,
    logits: Any, argmax: Any, yconv: Any, dz_conv: Any, dw1: Any, db1: Any, dw2: Any, db2: Any, dw3: Any, db3: Any,
    stats: Any, state: Any, act: str, mode: str, variant: str | None = None,
) -> None:
    """reference.head_train as one op (two launches): x (B,C,Hp,Wp) the pooled map S4 (read as (B,I)), labels (B,)
    int32; writes h1 (B,H1), h2 (B,H2), logits (B,NC); stats[STEP_IN_EPOCH mod S] = [Σ loss, correct] (S,2);
    dw1..db3 (overwritten); dz_conv (yconv's shape (B,C,H,W)) = pool2x2_bwd(dL/dx, argmax, mode) · act'(yconv).
    argmax (B,C,Hp,Wp) uint8 for max, None for avg. state (8,) int32 (lenet_gpu.stepstate).
    yconv=None (max only: the routed step, docs/routed_backward.md): dz_conv has x's shape and gets the routed
    gradient dL/dx · act'(x) (the kernel's null-yconv branch)."""
    v = _variant(be, "head_train", variant)
    check_act(act)
    check_mode(mode)
    n, c, hp, wp = x.shape
    i = c * hp * wp
    h1n, h2n, nc = w1.shape[0], w2.shape[0], w3.shape[0]
    _check(x, "x", (n, c, hp, wp))
    _check(labels, "labels", (n,), np.int32)
    _check(w1, "w1", (h1n, i))
    _check(b1, "b1", (h1n,))
    _check(w2, "w2", (h2n, h1n))
    _check(b2, "b2", (h2n,))
    _check(w3, "w3", (nc, h2n))
    _check(b3, "b3", (nc,))
    _check(h1, "h1", (n, h1n))
    _check(h2, "h2", (n, h2n))
    _check(logits, "logits", (n, nc))
    if yconv is None:
        if mode != "max":
            raise ValueError("head_train: yconv=None (the routed gradient) needs max pooling")
        hc, wc = 2 * hp, 2 * wp
        _check(dz_conv, "dz_conv", (n, c, hp, wp))
    else:
        hc, wc = yconv.shape[2], yconv.shape[3]
        if (hc // 2, wc // 2) != (hp, wp):
            raise ValueError(f"head_train: yconv {tuple(yconv.shape)} does not pool to x {tuple(x.shape)}")
        _check(yconv, "yconv", (n, c, hc, wc))
        _check(dz_conv, "dz_conv", (n, c, hc, wc))
    if mode == "max":
        _check(argmax, "argmax", (n, c, hp, wp), np.uint8)
    for name, a, shape in (("dw1", dw1, w1.shape), ("db1", db1, b1.shape), ("dw2", dw2, w2.shape),
                           ("db2", db2, b2.shape), ("dw3", dw3, w3.shape), ("db3", db3, b3.shape)):
        _check(a, name, tuple(shape))
    s = stats.shape[0]
    _check(stats, "stats", (s, 2))
    _check(state, "state", (state.shape[0],), np.int32)
    if n < 1 or s < 1 or state.shape[0] < 3:
        raise ValueError("head_train: needs a batch of at least one row, one stats row and a full step state")
    # the plan, once per shape (a step calls head_train with the same shapes every time); the fill targets are in
    # the key, so a plan follows them when they change (the tests lower them)
    pkey = (v, variant is None, n, i, h1n, h2n, nc, c, hp, wp, hc, wc, HEAD_FILL_BLOCKS, HEAD4_FILL_BLOCKS)
    plan = _HEAD_PLANS.get(pkey)
    if plan is None:
        try:
            plan = head_plan(v, n, i, h1n, h2n, nc, (c, hp, wp, hc, wc))
        except ValueError:
            if variant is not None:
                raise
            plan = head_plan("v1", n, i, h1n, h2n, nc)  # the default does not fit shared memory: v1 needs none
        _HEAD_PLANS[pkey] = plan
    rows_launch, wgrad_launch = plan
    key = ("head_train", n, h1n, h2n, nc)
    ws = _scratch(be).get(key)
    if ws is None:  # dz1, dz2, dz3 and the per-row [loss, hit]: allocated at the first call at a shape
        rt = be.runtime
        ws = _scratch(be)[key] = (rt.empty((n, h1n)), rt.empty((n, h2n)), rt.empty((n, nc)), rt.empty((n, 2)))
    dz1, dz2, dz3, rowstat = ws
    dims = tuple(i32(e) for e in (n, i, h1n, h2n, nc))
    _launch(be, "head_train", rows_launch,
            (x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax if mode == "max" else None, yconv, dz_conv,
             dz1, dz2, dz3, rowstat, *dims, i32(c), i32(hc), i32(wc), i32(ACT_CODES[act]), i32(POOL_CODES[mode])))
    _launch(be, "head_train", wgrad_launch,
            (x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, *dims, i32(s)))


# ---------------------------------------------------------------------------------------------- lenet_fwd
def lenet_fwd_regions(h1: int, h2: int) -> tuple[int, int]:
    """Floats of an image's two shared regions in lenet_fwd: X (the padded input, then S4 and C5's output) and
    Y (S2, then F6's output), each a multiple of 4 (float4 alignment)."""
    return _round4(max(32 * 32, LF_I5 + h1)), _round4(max(6 * 14 * 14, h2))


def lenet_fwd_smem(variant: str, imgs: int, h1: int, h2: int) -> int:
    x, y = lenet_fwd_regions(h1, h2)
    return 4 * (LF_WEIGHT_FLOATS[variant] + imgs * (x + y))


def lenet_fwd_imgs(variant: str, N: int, sm_count: int | None = None) -> int:  # noqa: N803
    """Images per block of v1-v3 before the shared-memory limit: v1 and v2 always 4; v3 by batch size: 1 while N is
    at most 2 x SMs (a block per image: a small batch spreads over the GPU), 2 up to 4 x SMs, else 4 (the dense
    weights streamed once per 4 images). At large N v3's plan runs v4 instead (``lenet_fwd_v4_imgs``)."""
    if variant != "v3":
        return LF_MAX_IMGS
    sms = sm_count or DEFAULT_SM_COUNT
    return 1 if N <= 2 * sms else 2 if N <= 4 * sms else 4


def lenet_fwd_v4_smem(imgs: int, h1: int, h2: int, nc: int) -> int:
    """lenet_fwd_v4's dynamic shared memory in bytes (lenet_fwd.cu lf4_scratch, lf4_rows_stride): the staged conv
    weights, the scratch of LF4_G images' X and Y (later h1 and h2 of every image), and [imgs][max(400, NC)] rows
    (S4, later the logits)."""
    scratch = max(LF4_G * (32 * 32 + 6 * 14 * 14), imgs * (_round4(h1) + _round4(h2)))
    return 4 * (LF_WEIGHT_FLOATS["v4"] + scratch + imgs * _round4(max(LF_I5, nc)))


def lenet_fwd_v4_imgs(N: int, sm_count: int | None = None) -> int | None:  # noqa: N803
    """v4's images a block at batch N: the most of 16, 8 whose grid still gives LF4_BLOCKS_PER_SM blocks to every SM
    (on 132 SMs: 16 from N = 6,321, 8 from 3,161); None below that (v3's tiles fill the GPU better)."""
    sms = sm_count or DEFAULT_SM_COUNT
    for imgs in LF4_IMGS_CHOICES:
        if ceil_div(N, imgs) >= LF4_BLOCKS_PER_SM * sms:
            return imgs
    return None


def lenet_fwd_plan(variant: str, N: int, H1: int, H2: int, sm_count: int | None = None,  # noqa: N803
                   NC: int = 10) -> FusedLaunch:  # noqa: N803
    """The one launch of lenet_fwd. v1-v3: ``lenet_fwd_tile_plan``. v3 (the default) runs v4's kernel at large batches
    (``lenet_fwd_v4_imgs``: 8 or 16 images a block, > 48 KiB of shared memory) where its shared memory fits
    LF4_SMEM_MAX; "v4" by name runs v4 at every batch (8 images a block below v3's threshold). Where v4's rows do
    not fit (an F6 of ~2,400 or wider), both run v3's tiles, which give the same bits."""
    if variant in ("v3", "v4"):
        imgs4 = lenet_fwd_v4_imgs(N, sm_count)
        if variant == "v4" or imgs4 is not None:
            imgs4 = imgs4 or LF4_IMGS_CHOICES[-1]
            smem = lenet_fwd_v4_smem(imgs4, H1, H2, NC)
            if smem <= LF4_SMEM_MAX:
                return FusedLaunch("lenet_fwd_v4", (ceil_div(N, imgs4), 1, 1), (LF_THREADS["v4"], 1, 1), smem,
                                   (imgs4,))
    # below v4's threshold, or an F6 too wide for v4's rows: v3's tiles (for "v4" by name too: same bits)
    return lenet_fwd_tile_plan("v3" if variant == "v4" else variant, N, H1, H2, sm_count)


def lenet_fwd_tile_plan(variant: str, N: int, H1: int, H2: int,  # noqa: N803
                        sm_count: int | None = None) -> FusedLaunch:
    """v1-v3's launch: a block per tile of ``imgs`` images (``lenet_fwd_imgs``, halved until the tile fits 48 KiB
    of shared memory); what v3's plan runs below v4's threshold."""
    if variant not in ("v1", "v2", "v3"):
        raise ValueError(f"lenet_fwd_tile_plan: v1, v2 or v3, not {variant!r}")
    imgs = lenet_fwd_imgs(variant, N, sm_count)
    while imgs > 1 and lenet_fwd_smem(variant, imgs, H1, H2) > SMEM_LIMIT:
        imgs //= 2
    smem = lenet_fwd_smem(variant, imgs, H1, H2)
    if smem > SMEM_LIMIT:
        raise ValueError(f"lenet_fwd: one image needs {smem} bytes of shared memory (> {SMEM_LIMIT})")
    t = LF_THREADS[variant]
    return FusedLaunch(f"lenet_fwd_{variant}", (ceil_div(N, imgs), 1, 1), (t, 1, 1), smem, (imgs,))


def lenet_fwd(be: Any, images: Any, params: dict, logits: Any, mean: float, std: float, act: str, mode: str,
              variant: str | None = None, classes: Any = None) -> None:
    """reference.lenet_fwd in one launch: images (N,28,28) → logits (N,NC) and/or classes (N,) int64 (the first
    maximal logit, as np.argmax). params maps c1.w, c1.b, c3.w, c3.b, c5.w (H1,400), c5.b, f6.w (H2,H1), f6.b,
    out.w (NC,H2), out.b to device arrays. uint8 images are normalised as batch_prepare does: pixel·scale + shift
    with scale = 1/(255·std), shift = −mean/std in float32, the border the normalised pixel 0. v3 and v4 also take
    float32 images already normalised (the border −mean/std), and ``classes`` (the argmax fused; ``logits`` may then
    be None: no logits written); v1 and v2 take uint8 and logits only. The launch: ``lenet_fwd_plan``."""
    v = _variant(be, "lenet_fwd", variant)
    check_act(act)
    check_mode(mode)
    n = images.shape[0]
    in_f32 = images.dtype == np.float32
    if (in_f32 or classes is not None or logits is None) and v in ("v1", "v2"):
        if variant is not None:
            raise ValueError(f"lenet_fwd_{v}: float32 images, classes and logits=None need v3 or v4")
        v = "v3"
    _check(images, "images", (n, LF_IMAGE, LF_IMAGE), np.float32 if in_f32 else np.uint8)
    for k, shape in LF_SHAPES.items():
        _check(params[k], k, shape)
    h1n, h2n, nc = params["c5.w"].shape[0], params["f6.w"].shape[0], params["out.w"].shape[0]
    _check(params["c5.w"], "c5.w", (h1n, LF_I5))
    _check(params["c5.b"], "c5.b", (h1n,))
    _check(params["f6.w"], "f6.w", (h2n, h1n))
    _check(params["f6.b"], "f6.b", (h2n,))
    _check(params["out.w"], "out.w", (nc, h2n))
    _check(params["out.b"], "out.b", (nc,))
    check_lenet_fwd_outputs(logits, classes, n, nc, _check)
    scale, shift = f32(1.0 / (255.0 * std)), f32(-mean / std)
    plan = lenet_fwd_plan(v, n, h1n, h2n, getattr(be, "sm_count", None), nc)
    p = params
    weights = (p["c1.w"], p["c1.b"], p["c3.w"], p["c3.b"], p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"],
               p["out.b"])
    tail = (i32(n), i32(h1n), i32(h2n), i32(nc), i32(ACT_CODES[act]), i32(POOL_CODES[mode]))
    if v in ("v1", "v2"):
        _launch(be, "lenet_fwd", plan, (images, *weights, logits, *tail, scale, shift))
        return
    if in_f32:
        scale, shift = f32(1.0), f32(0.0)
    pad = f32(-mean / std)  # the normalised pixel 0 (for uint8: equal to shift)
    _launch(be, "lenet_fwd", plan, (images, i32(in_f32), *weights, logits, classes, *tail, scale, shift, pad))


#: what the model may ask of this lenet_fwd beyond the protocol (LeNet5.forward_device reads it)
lenet_fwd.features = ("float32", "classes")


LF_EVAL_THREADS = 256  # lenet_fwd.cu LF_EVAL_THREADS


def lenet_eval(be: Any, logits: Any, labels: Any, out: Any) -> None:
    """out (2,) float64 = [Σ softmax cross-entropy of logits (N,NC) against labels (N,) uint8, the rows whose first
    maximal logit is the label], summed in double on the device in a fixed order (one launch, one block)."""
    n, nc = check_lenet_eval_args(logits, labels, out, _check)
    _launch(be, "lenet_fwd", FusedLaunch("lenet_eval_v1", (1, 1, 1), (LF_EVAL_THREADS, 1, 1)),
            (logits, labels, i32(n), i32(nc), out))
