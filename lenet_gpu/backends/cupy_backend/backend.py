"""The cupy backend: the CUDA C kernels of kernels/*.cu behind the Backend protocol.

``CupyBackend()`` runs them on the GPU through CuPy (CupyRuntime); ``CupyBackend(host=True)`` — the
``cupy-host`` backend — runs the same kernels, launched by the same code below, on the CPU harness
(HostRuntime). Each op is a thin launch wrapper (STYLE.md §4): check shapes, dtypes and contiguity,
take the preallocated outputs, compute the grid with ceil_div, pass explicitly typed scalars, launch
once. No op allocates, copies or synchronises.

Compile-time parameters of each kernel file are set per module in ``MODULE_DEFINES`` (``-DNAME=VALUE``);
``launch_plan`` computes every launch shape from the op's shapes (and is what the static compile report
uses to know each kernel's block size and dynamic shared memory).

CUDA Graphs: on a GPU, ``graph(fn)`` runs fn once eagerly, then captures it once on the backend's
non-default stream and replays the graph on every later call. It is OFF by default until it has been
proven on a GPU (this project's CI has none; the `gpu` test "graph replay equals eager launches bit for
bit" is the proof to run): turn it on with ``graphs=True`` or ``LENET_GPU_CUDA_GRAPHS=1`` (the training
program's ``--cuda-graphs``). On the CPU harness ``graph`` returns fn wrapped so that
any allocation, copy or sync inside it raises, as it would under capture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import ACT_CODES, OPS, POOL_CODES, check_act, check_mode
from .runtime import CupyRuntime, HostRuntime, Runtime, define_options

i32, f32 = np.int32, np.float32

#: Compile-time parameters per kernel file (the #ifndef defaults at the top of each .cu, made explicit).
MODULE_DEFINES: dict[str, dict[str, int]] = {
    "batch": {},
    "conv2d": {"K_BLOCK": 8, "C_BLOCK": 6, "J_BLOCK": 13, "BWD_THREADS": 256},
    "pool2x2": {},
    "dense": {"TILE_O": 16, "TILE_N": 16, "RN": 4, "TILE_I": 32, "VEC": 4},
    "loss": {"LOSS_THREADS": 256},
    "optim": {},
}

#: op → (kernel file stem, variants). Kernel name = f"{op}_{variant}".
OP_KERNELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "batch_prepare": ("batch", ("v1",)),
    "conv2d_fwd": ("conv2d", ("v1", "v2")),
    "conv2d_pool_fwd": ("conv2d", ("v1", "v2")),
    "pool2x2_fwd": ("pool2x2", ("v1",)),
    "dense_fwd": ("dense", ("v1", "v2", "v3")),
    "softmax_xent": ("loss", ("v1", "v2")),
    "dense_bwd": ("dense", ("v1", "v2", "v3")),
    "pool2x2_bwd": ("pool2x2", ("v1",)),
    "conv2d_bwd_data": ("conv2d", ("v1", "v2")),
    "conv2d_bwd_weight": ("conv2d", ("v1", "v2", "v3")),
    "adam_step": ("optim", ("v1", "v2")),
    "sgd_step": ("optim", ("v1", "v2")),
}

#: The default variant per op (the fastest by design; to be confirmed by the GPU benchmarks).
DEFAULT_VARIANTS: dict[str, str] = {op: vs[-1] for op, (_, vs) in OP_KERNELS.items()}
DEFAULT_VARIANTS["dense_fwd"] = "v2"  # v3 (warp per output) only pays off at batch ≲ 16

THREADS = 256  # block size of the 1-D elementwise kernels
SMEM_LIMIT = 48 * 1024  # dynamic + static shared memory per block without an opt-in
_TILE_TARGET = 256  # pixels (threads) a conv tile aims for
_SMEM_TARGET = 24 * 1024  # shared memory a conv tile aims for (several blocks per SM)
_FILL_BLOCKS = 4 * 132  # blocks that fill an H100 (132 SMs) a few times over


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_warp(n: int) -> int:
    return min(1024, max(32, ceil_div(n, 32) * 32))


@dataclass(frozen=True)
class Launch:
    """One launch's shape: grid, block, dynamic shared memory bytes and the tile arguments it implies."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0
    extra: tuple[int, ...] = ()  # trailing int arguments of the kernel (tile rows, channel chunk)


def _grid1d(n: int, threads: int = THREADS) -> Launch:
    return Launch((max(1, ceil_div(n, threads)), 1, 1), (threads, 1, 1))


def _conv_tile(rows_total: int, row_len: int, in_extra_rows: int, rows_mult: int, N: int, W: int, C: int, R: int,
               S: int, K: int, k_block: int, min_blocks: int) -> tuple[int, int, int, int, int]:
    """Tile ``rows_total`` rows of ``row_len`` threads into blocks of ≈ _TILE_TARGET threads: ``rows`` rows
    per tile (``tiles`` per image), or, when one tile is a whole small map, ``imgs`` images per block (but
    not so many that the grid drops under ``min_blocks`` blocks); the
    ``c_chunk`` channels staged at a time keep shared memory ≤ _SMEM_TARGET (always ≤ SMEM_LIMIT).
    Returns (rows, tiles, imgs, c_chunk, smem_bytes)."""
    rows = max(1, min(rows_total, _TILE_TARGET // max(1, row_len)))
    tiles = ceil_div(rows_total, rows)
    rows = ceil_div(rows_total, tiles)  # balance: the last tile is not a sliver
    imgs = 1
    if tiles == 1:
        fill = max(1, N * ceil_div(K, k_block) // min_blocks)  # images per block that still fill the GPU
        imgs = max(1, min(N, _TILE_TARGET // (rows * row_len), fill))
    in_rows = rows * rows_mult + in_extra_rows
    while True:
        per_c = imgs * in_rows * W + R * S * k_block  # floats per staged channel
        if 4 * per_c <= _SMEM_TARGET or imgs == 1:
            break
        imgs = max(1, imgs // 2)
    c_chunk = max(1, min(C, (_SMEM_TARGET // 4) // per_c))
    smem = 4 * c_chunk * per_c
    if smem > SMEM_LIMIT:
        raise ValueError(f"conv2d: one input channel of {in_rows} rows x {W} does not fit {SMEM_LIMIT} bytes of "
                         "shared memory; use variant v1")
    return rows, tiles, imgs, c_chunk, smem


def launch_plan(
    op: str, variant: str, shapes: dict[str, int], defines: dict[str, dict[str, int]] | None = None,
    min_blocks: int = _FILL_BLOCKS,
) -> Launch:
    """The launch shape of ``op``/``variant`` at the given sizes (N, C, H, W, K, R, S, I, O, n, B, ...).
    ``min_blocks``: the conv tiles pack several small maps per block only while the grid keeps this many."""
    d = {**MODULE_DEFINES, **(defines or {})}
    g = shapes.get
    if op == "batch_prepare":
        return _grid1d(g("B") * g("XH") * g("XW"))
    if op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"):
        N, C, H, W, K, R, S = (g(k) for k in "NCHWKRS")
        P, Q = H - R + 1, W - S + 1
        kb = d["conv2d"]["K_BLOCK"]
        if op == "conv2d_fwd" and variant == "v1":
            return _grid1d(N * K * P * Q)
        if op == "conv2d_fwd":
            rows, tiles, imgs, c_chunk, smem = _conv_tile(P, Q, R - 1, 1, N, W, C, R, S, K, kb, min_blocks)
            return Launch((ceil_div(N, imgs) * tiles, ceil_div(K, kb), 1), (_round_warp(imgs * rows * Q), 1, 1),
                          smem, (rows, c_chunk, imgs))
        if op == "conv2d_pool_fwd" and variant == "v1":
            return _grid1d(N * K * ceil_div(P, 2) * ceil_div(Q, 2))
        if op == "conv2d_pool_fwd":
            ww = ceil_div(Q, 2)
            rows2, tiles, imgs, c_chunk, smem = _conv_tile(
                ceil_div(P, 2), ww, R - 1, 2, N, W, C, R, S, K, kb, min_blocks
            )
            return Launch((ceil_div(N, imgs) * tiles, ceil_div(K, kb), 1), (_round_warp(imgs * rows2 * ww), 1, 1),
                          smem, (rows2, c_chunk, imgs))
        if op == "conv2d_bwd_data" and variant == "v1":
            return _grid1d(N * C * H * W)
        if op == "conv2d_bwd_data":
            cb = d["conv2d"]["C_BLOCK"]
            rows = max(1, min(H, _TILE_TARGET // W))
            tiles = ceil_div(H, rows)
            rows = ceil_div(H, tiles)
            per_k = (rows + R - 1) * (Q + 2 * (S - 1)) + R * S * cb  # floats per staged filter
            k_chunk = max(1, min(K, (_SMEM_TARGET // 4) // per_k))
            if 4 * k_chunk * per_k > SMEM_LIMIT:
                raise ValueError("conv2d_bwd_data: one staged filter does not fit shared memory; use variant v1")
            return Launch((N * tiles, ceil_div(C, cb), 1), (_round_warp(rows * W), 1, 1), 4 * k_chunk * per_k,
                          (rows, k_chunk))
        if variant == "v1":
            return _grid1d(K * C * R * S + K)
        jb, bt = d["conv2d"]["J_BLOCK"], d["conv2d"]["BWD_THREADS"]
        base = ceil_div(C * R * S, jb) * K
        if variant == "v2":
            return Launch((ceil_div(C * R * S, jb), K, 1), (bt, 1, 1))
        # v3: split the batch so that ≈ _FILL_BLOCKS blocks run, each with ≥ 8 positions per thread
        splits = max(1, min(N, ceil_div(_FILL_BLOCKS, base), (N * P * Q) // (bt * 8), 65535))
        chunk = ceil_div(N, splits)
        return Launch((ceil_div(C * R * S, jb), K, ceil_div(N, chunk)), (bt, 1, 1), 0, (chunk,))
    if op in ("pool2x2_fwd",):
        return _grid1d(g("NC") * (g("H") // 2) * (g("W") // 2))
    if op == "pool2x2_bwd":
        return _grid1d(g("NC") * g("H") * g("W"))
    if op == "dense_fwd":
        N, O = g("N"), g("O")
        if variant == "v1":
            return _grid1d(N * O)
        if variant == "v2":
            dd = d["dense"]
            return Launch((ceil_div(O, dd["TILE_O"]), ceil_div(N, dd["TILE_N"] * dd["RN"]), 1),
                          (dd["TILE_O"], dd["TILE_N"], 1))
        return Launch((ceil_div(N * O, THREADS // 32), 1, 1), (THREADS, 1, 1))
    if op == "dense_bwd":
        N, I, O = g("N"), g("I"), g("O")
        if variant == "v3":  # 32 x 32 tiles of dx and dw, then db blocks (BT_* are fixed in dense.cu)
            tn = ceil_div(I, 32)
            blocks = (ceil_div(N, 32) * tn if g("dx", 1) else 0) + ceil_div(O, 32) * tn + ceil_div(O, THREADS)
            return Launch((blocks, 1, 1), (THREADS, 1, 1))
        row = I if variant == "v1" else ceil_div(I, d["dense"]["VEC"])  # threads per row of dx / dw
        return _grid1d((N * row if g("dx", 1) else 0) + O * row + O)
    if op == "softmax_xent":
        lt = d["loss"]["LOSS_THREADS"]
        return Launch((1 if variant == "v1" else ceil_div(g("N"), lt), 1, 1), (lt, 1, 1))
    if op in ("adam_step", "sgd_step"):
        per_thread = 1 if variant == "v1" else 4  # v2: one float4 per thread
        return Launch((max(1, min(ceil_div(g("n"), THREADS * per_thread), 4096)), 1, 1), (THREADS, 1, 1))
    raise ValueError(f"unknown op {op!r}")


def _check(arr: Any, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
    if arr is None:
        raise ValueError(f"{name}: missing array")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: not C-contiguous")


def _address(arr: Any) -> int:
    data = getattr(arr, "data", None)
    ptr = getattr(data, "ptr", None)  # CuPy
    return int(ptr) if ptr is not None else int(arr.ctypes.data)


def _check_aligned(arr: Any, name: str, nbytes: int) -> None:
    if _address(arr) % nbytes:
        raise ValueError(f"{name}: address not {nbytes}-byte aligned (vectorised variant); use variant v1")


class CupyBackend:
    """CUDA C kernels (kernels/*.cu) on the GPU through CuPy, or on the CPU harness with ``host=True``.

    Args:
        host: run on the CPU harness (the ``cupy-host`` backend) instead of the GPU.
        graphs: capture the forward+backward part as a CUDA graph (GPU only; see the module doc).
            Default: off, unless the environment sets LENET_GPU_CUDA_GRAPHS=1.
        fused: offer the fused ``conv2d_pool_fwd`` op (the model then uses it: 16 launches per step
            instead of 18).
        variants: op → variant overriding ``DEFAULT_VARIANTS``.
        defines: kernel file stem → {NAME: value} overriding ``MODULE_DEFINES``.
        runtime: a Runtime to use instead of the one ``host`` selects (e.g. for reports).
        sanitize: the harness sanitizer for ``host`` ("address", "thread", "undefined"; default from
            $CUDACPU_SANITIZE).
        min_blocks: conv v2 tiles pack several small maps into one block only while the grid keeps at
            least this many blocks (default: enough to fill an H100 a few times over).
    """

    def __init__(
        self,
        host: bool = False,
        graphs: bool | None = None,
        fused: bool = True,
        variants: dict[str, str] | None = None,
        defines: dict[str, dict[str, int]] | None = None,
        runtime: Runtime | None = None,
        sanitize: str | None = None,
        min_blocks: int = _FILL_BLOCKS,
    ) -> None:
        if graphs is None:
            graphs = os.environ.get("LENET_GPU_CUDA_GRAPHS", "0") == "1"
        if runtime is None:
            runtime = HostRuntime(sanitize=sanitize) if host else CupyRuntime(graphs=graphs)
        self.runtime = runtime
        self.name = "cupy" if runtime.is_gpu else "cupy-host"
        self.is_gpu = runtime.is_gpu
        self.counters = runtime.counters
        self.graphs = graphs
        self._scratch: dict[tuple, tuple[Any, ...]] = {}  # per-shape kernel workspaces
        self.min_blocks = int(min_blocks)
        self.defines = {stem: {**d, **(defines or {}).get(stem, {})} for stem, d in MODULE_DEFINES.items()}
        ops = [*OPS, *(("conv2d_pool_fwd",) if fused else ())]
        self.variants: dict[str, tuple[str, ...]] = {op: OP_KERNELS[op][1] for op in ops}
        self.default_variants: dict[str, str] = {op: DEFAULT_VARIANTS[op] for op in ops}
        for op, v in (variants or {}).items():
            if op in self.variants:
                self._variant(op, v)
                self.default_variants[op] = v

    # ------------------------------------------------------------------ memory
    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        return self.runtime.empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        return self.runtime.zeros(shape, dtype)

    def to_device(self, host: np.ndarray) -> Any:
        return self.runtime.to_device(host)

    def upload(self, dst: Any, host: np.ndarray) -> None:
        self.runtime.upload(dst, host)

    def to_host(self, arr: Any) -> np.ndarray:
        return self.runtime.to_host(arr)

    def synchronize(self) -> None:
        self.runtime.synchronize()

    def graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        # the harness always applies the capture rules (no allocation, copy or sync inside fn), so every
        # cupy-host step in CI proves the step could be captured; on a GPU only when graphs are on
        return self.runtime.graph(fn) if (self.graphs or not self.is_gpu) else fn

    # ------------------------------------------------------------------ launch helpers
    def _variant(self, op: str, variant: str | None) -> str:
        v = variant or self.default_variants[op]
        if v not in self.variants.get(op, ()):
            raise ValueError(f"{op}: unknown variant {v!r}; this backend has {self.variants.get(op, ())}")
        return v

    def _launch(self, op: str, variant: str, launch: Launch, args: tuple) -> None:
        stem = OP_KERNELS[op][0]
        kernel = self.runtime.get_kernel(stem, f"{op}_{variant}", define_options(self.defines[stem]))
        self.runtime.launch(kernel, launch.grid, launch.block, args + tuple(i32(e) for e in launch.extra),
                            launch.shared_mem)

    def plan(self, op: str, variant: str, **shapes: int) -> Launch:
        return launch_plan(op, variant, shapes, self.defines, self.min_blocks)

    # ------------------------------------------------------------------ ops
    def batch_prepare(self, images, labels, perm, offset, x, y, mean, std, variant=None) -> None:
        v = self._variant("batch_prepare", variant)
        n, ih, iw = images.shape
        b, _, xh, xw = x.shape
        pad = (xh - ih) // 2
        _check(images, "images", (n, ih, iw), np.uint8)
        _check(labels, "labels", (n,), np.uint8)
        _check(perm, "perm", (perm.shape[0],), np.int32)
        _check(x, "x", (b, 1, ih + 2 * pad, iw + 2 * pad))
        _check(y, "y", (b,), np.int32)
        offset = int(offset)
        if offset < 0 or offset + b > perm.shape[0]:
            raise IndexError(f"batch_prepare: perm has {perm.shape[0]} entries, need {offset + b}")
        scale, shift = f32(1.0 / (255.0 * std)), f32(-mean / std)
        self._launch("batch_prepare", v, self.plan("batch_prepare", v, B=b, XH=xh, XW=xw),
                     (images, labels, perm, i32(offset), x, y, i32(b), i32(ih), i32(iw), i32(pad), scale, shift))

    def _conv_shapes(self, x, w, b) -> tuple[int, ...]:
        n, c, h, wd = x.shape
        k, c2, r, s = w.shape
        if c2 != c or h < r or wd < s:
            raise ValueError(f"conv2d: x {tuple(x.shape)} and w {tuple(w.shape)} do not agree")
        _check(x, "x", (n, c, h, wd))
        _check(w, "w", (k, c, r, s))
        if b is not None:
            _check(b, "b", (k,))
        return n, c, h, wd, k, r, s

    def conv2d_fwd(self, x, w, b, y, act, variant=None) -> None:
        v = self._variant("conv2d_fwd", variant)
        check_act(act)
        n, c, h, wd, k, r, s = self._conv_shapes(x, w, b)
        _check(y, "y", (n, k, h - r + 1, wd - s + 1))
        plan = self.plan("conv2d_fwd", v, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
        self._launch("conv2d_fwd", v, plan,
                     (x, w, b, y, *(i32(e) for e in (n, c, h, wd, k, r, s)), i32(ACT_CODES[act])))

    def conv2d_pool_fwd(self, x, w, b, yconv, ypool, argmax, act, mode, variant=None) -> None:
        """Fused conv2d_fwd + pool2x2_fwd: yconv (may be None: not written) = act(conv + b); ypool and,
        for max, argmax = the 2×2/2 subsampling of it."""
        v = self._variant("conv2d_pool_fwd", variant)
        check_act(act)
        check_mode(mode)
        n, c, h, wd, k, r, s = self._conv_shapes(x, w, b)
        p, q = h - r + 1, wd - s + 1
        if yconv is not None:
            _check(yconv, "yconv", (n, k, p, q))
        _check(ypool, "ypool", (n, k, p // 2, q // 2))
        if mode == "max":
            _check(argmax, "argmax", (n, k, p // 2, q // 2), np.uint8)
        plan = self.plan("conv2d_pool_fwd", v, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
        self._launch("conv2d_pool_fwd", v, plan,
                     (x, w, b, yconv, ypool, argmax if mode == "max" else None,
                      *(i32(e) for e in (n, c, h, wd, k, r, s)), i32(ACT_CODES[act]), i32(POOL_CODES[mode])))

    def conv2d_bwd_data(self, dz, w, dx, variant=None) -> None:
        v = self._variant("conv2d_bwd_data", variant)
        n, c, h, wd = dx.shape
        k, c2, r, s = w.shape
        if c2 != c:
            raise ValueError(f"conv2d_bwd_data: w {tuple(w.shape)} and dx {tuple(dx.shape)} do not agree")
        _check(dz, "dz", (n, k, h - r + 1, wd - s + 1))
        _check(w, "w", (k, c, r, s))
        _check(dx, "dx", (n, c, h, wd))
        plan = self.plan("conv2d_bwd_data", v, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
        self._launch("conv2d_bwd_data", v, plan, (dz, w, dx, *(i32(e) for e in (n, c, h, wd, k, r, s))))

    def conv2d_bwd_weight(self, x, dz, dw, db, variant=None) -> None:
        v = self._variant("conv2d_bwd_weight", variant)
        n, c, h, wd = x.shape
        k, c2, r, s = dw.shape
        if c2 != c:
            raise ValueError(f"conv2d_bwd_weight: x {tuple(x.shape)} and dw {tuple(dw.shape)} do not agree")
        _check(x, "x", (n, c, h, wd))
        _check(dz, "dz", (n, k, h - r + 1, wd - s + 1))
        _check(dw, "dw", (k, c, r, s))
        _check(db, "db", (k,))
        plan = self.plan("conv2d_bwd_weight", v, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
        shapes = tuple(i32(e) for e in (n, c, h, wd, k, r, s))
        if v != "v3":
            self._launch("conv2d_bwd_weight", v, plan, (x, dz, dw, db, *shapes))
            return
        # per-split partial sums and the tickets of the last-block reduction: allocated on the first call
        # at a shape (warm-up), reused after; the kernel leaves the tickets at zero
        key = ("conv2d_bwd_weight", n, c, h, wd, k, r, s)
        ws = self._scratch.get(key)
        if ws is None:
            ws = self._scratch[key] = (self.runtime.empty((plan.grid[2] * k * (c * r * s + 1),)),
                                       self.runtime.zeros((plan.grid[0] * k,), np.uint32))
        self._launch("conv2d_bwd_weight", v, plan, (x, dz, dw, db, *ws, *shapes))

    def pool2x2_fwd(self, x, y, argmax, mode, variant=None) -> None:
        v = self._variant("pool2x2_fwd", variant)
        check_mode(mode)
        n, c, h, wd = x.shape
        _check(x, "x", (n, c, h, wd))
        _check(y, "y", (n, c, h // 2, wd // 2))
        if mode == "max":
            _check(argmax, "argmax", (n, c, h // 2, wd // 2), np.uint8)
        plan = self.plan("pool2x2_fwd", v, NC=n * c, H=h, W=wd)
        self._launch("pool2x2_fwd", v, plan, (x, y, argmax if mode == "max" else None, i32(n * c), i32(h), i32(wd),
                                              i32(POOL_CODES[mode])))

    def pool2x2_bwd(self, dy, argmax, yconv, dz, mode, act, variant=None) -> None:
        v = self._variant("pool2x2_bwd", variant)
        check_mode(mode)
        check_act(act)
        n, c, h, wd = dz.shape
        _check(dz, "dz", (n, c, h, wd))
        _check(yconv, "yconv", (n, c, h, wd))
        _check(dy, "dy", (n, c, h // 2, wd // 2))
        if mode == "max":
            _check(argmax, "argmax", (n, c, h // 2, wd // 2), np.uint8)
        plan = self.plan("pool2x2_bwd", v, NC=n * c, H=h, W=wd)
        self._launch("pool2x2_bwd", v, plan, (dy, argmax if mode == "max" else None, yconv, dz, i32(n * c), i32(h),
                                              i32(wd), i32(POOL_CODES[mode]), i32(ACT_CODES[act])))

    def dense_fwd(self, x, w, b, y, act, variant=None) -> None:
        v = self._variant("dense_fwd", variant)
        check_act(act)
        n, i = x.shape
        o = w.shape[0]
        _check(x, "x", (n, i))
        _check(w, "w", (o, i))
        _check(b, "b", (o,))
        _check(y, "y", (n, o))
        plan = self.plan("dense_fwd", v, N=n, I=i, O=o)
        self._launch("dense_fwd", v, plan, (x, w, b, y, i32(n), i32(i), i32(o), i32(ACT_CODES[act])))

    def dense_bwd(self, x, w, y, dy, dx, dw, db, act, variant=None) -> None:
        v = self._variant("dense_bwd", variant)
        check_act(act)
        n, i = x.shape
        o = w.shape[0]
        _check(x, "x", (n, i))
        _check(w, "w", (o, i))
        _check(y, "y", (n, o))
        _check(dy, "dy", (n, o))
        if dx is not None:
            _check(dx, "dx", (n, i))
        _check(dw, "dw", (o, i))
        _check(db, "db", (o,))
        plan = self.plan("dense_bwd", v, N=n, I=i, O=o, dx=int(dx is not None))
        self._launch("dense_bwd", v, plan, (x, w, y, dy, dx, dw, db, i32(n), i32(i), i32(o), i32(ACT_CODES[act])))

    def softmax_xent(self, logits, labels, dlogits, stats, variant=None) -> None:
        v = self._variant("softmax_xent", variant)
        n, nc = logits.shape
        _check(logits, "logits", (n, nc))
        _check(labels, "labels", (n,), np.int32)
        _check(dlogits, "dlogits", (n, nc))
        _check(stats, "stats", (2,))
        plan = self.plan("softmax_xent", v, N=n)
        scratch: tuple = ()
        if v == "v2":  # block partials and the last-block ticket: allocated at the first call at this batch
            key = ("softmax_xent", plan.grid[0])
            scratch = self._scratch.get(key) or self._scratch.setdefault(
                key, (self.runtime.empty((2 * plan.grid[0],)), self.runtime.zeros((1,), np.uint32)))
        self._launch("softmax_xent", v, plan, (logits, labels, dlogits, stats, *scratch, i32(n), i32(nc)))

    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, bc1, bc2, variant=None) -> None:
        var = self._variant("adam_step", variant)
        (size,) = p.shape
        for name, a in (("p", p), ("g", g), ("m", m), ("v", v)):
            _check(a, name, (size,))
            if var != "v1":
                _check_aligned(a, name, 16)
        self._launch("adam_step", var, self.plan("adam_step", var, n=size),
                     (p, g, m, v, i32(size), f32(lr), f32(beta1), f32(beta2), f32(eps), f32(weight_decay), f32(bc1),
                      f32(bc2)))

    def sgd_step(self, p, g, m, lr, momentum, weight_decay, variant=None) -> None:
        var = self._variant("sgd_step", variant)
        (size,) = p.shape
        for name, a in (("p", p), ("g", g), ("m", m)):
            _check(a, name, (size,))
            if var != "v1":
                _check_aligned(a, name, 16)
        self._launch("sgd_step", var, self.plan("sgd_step", var, n=size),
                     (p, g, m, i32(size), f32(lr), f32(momentum), f32(weight_decay)))
