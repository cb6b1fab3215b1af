"""The cupy backend: the CUDA C kernels of kernels/*.cu behind the Backend protocol.

``CupyBackend()`` runs them on the GPU through CuPy (CupyRuntime); ``CupyBackend(host=True)`` — the
``cupy-host`` backend — runs the same kernels, launched by the same code below, on the CPU harness
(HostRuntime). Each op is a thin launch wrapper (STYLE.md §4): check shapes, dtypes and contiguity,
take the preallocated outputs, compute the grid with ceil_div, pass explicitly typed scalars, launch
once. No op allocates (after its first call at a shape: the scratch of a last-block reduction), copies
or synchronises. Nothing that changes from step to step is a kernel argument: the kernels read the step
state (lenet_gpu.stepstate) from the device.

Compile-time parameters of each kernel file are set per module in ``MODULE_DEFINES`` (``-DNAME=VALUE``);
``launch_plan`` computes every launch shape from the op's shapes (and is what the static compile report
uses to know each kernel's block size and dynamic shared memory).

Cheap launches. The first call of an op at given shapes, variant and options builds a plan entry
(kernel handle, grid, block, shared memory, the typed scalar arguments, the expected array shapes); a
later call with the same key checks its arrays against the entry and launches. ``record(fn)`` goes
further: the runtime keeps fn's launches (final typed arguments) and replays them with no checks at all.
``graph(fn, steps)`` captures ``steps`` calls of fn as one CUDA graph (on by default; off with
``graphs=False`` or LENET_GPU_CUDA_GRAPHS=0, and then ``graph`` returns None); on the CPU harness the
"graph" runs fn with the capture rules enforced on every call (no allocation, copy or sync).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...stepstate import SCHED_COLS, STATE_WORDS
from ..base import ACT_CODES, OPS, POOL_CODES, ROUTED_OPS, STEP_OPS, check_act, check_mode
from . import fused, staging
from .runtime import DEFAULT_SM_COUNT, NULL_POINTER, CupyRuntime, HostRuntime, Runtime, define_options
from .runtime import check_array as _check

i32, f32 = np.int32, np.float32

#: Compile-time parameters per kernel file (the #ifndef defaults at the top of each .cu, made explicit).
#: 0 = chosen per launch by ``launch_plan`` (K_BLOCK of the conv v2 kernels, C_BLOCK of bwd_data v2).
MODULE_DEFINES: dict[str, dict[str, int]] = {
    "batch": {},
    "conv2d": {"K_BLOCK": 0, "C_BLOCK": 0, "J_BLOCK": 13, "BWD_THREADS": 256},
    "pool2x2": {},
    "dense": {"TILE_O": 16, "TILE_N": 16, "RN": 4, "TILE_I": 32, "VEC": 4},
    "loss": {"LOSS_THREADS": 256},
    "optim": {},
    "step_fwd": {},
    "step_bwd": {},
    "step_update": {},
}
#: Register-blocking widths the planner picks from when K_BLOCK / C_BLOCK are 0 (auto).
K_BLOCKS = (8, 6, 4, 2)
C_BLOCKS = (8, 6, 4, 2)

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
    "conv2d_bwd_data_pool": ("conv2d", ("v1", "v2")),
    "conv2d_bwd_weight": ("conv2d", ("v1", "v2", "v3")),
    # the routed backward of max pooling (docs/routed_backward.md)
    "conv2d_bwd_weight_routed": ("conv2d", ("v1", "v2")),
    "conv2d_bwd_data_routed": ("conv2d", ("v1", "v2")),
    "adam_step": ("optim", ("v1", "v2")),
    "sgd_step": ("optim", ("v1", "v2")),
    "step_advance": ("optim", ("v1",)),
    # the four-kernel step (docs/step4.md)
    "step_fwd": ("step_fwd", ("v1", "v2")),
    "step_bwd": ("step_bwd", ("v1", "v2")),
    "step_adam": ("step_update", ("v1",)),
    "step_sgd": ("step_update", ("v1",)),
    # the fused ops of fused.py (two and one launches of their own; listed here for the compile checks)
    "head_train": (fused.STEMS["head_train"], fused.VARIANTS["head_train"]),
    "lenet_fwd": (fused.STEMS["lenet_fwd"], fused.VARIANTS["lenet_fwd"]),
}
MODULE_DEFINES.update(fused.DEFINES)
#: ops whose launches fused.py makes (the rest launch through CupyBackend._launch)
FUSED_OPS = ("conv2d_pool_fwd", "conv2d_bwd_data_pool", "head_train", "lenet_fwd")
assert set(ROUTED_OPS) <= set(OP_KERNELS)

#: The default variant per op (the fastest by design; to be confirmed by the GPU benchmarks).
DEFAULT_VARIANTS: dict[str, str] = {op: vs[-1] for op, (_, vs) in OP_KERNELS.items()}
DEFAULT_VARIANTS["dense_fwd"] = "v2"  # v3 (warp per output) only pays off at batch ≲ 16
DEFAULT_VARIANTS.update(fused.DEFAULT_VARIANTS)  # head_train: v3's plan (v4's rows kernel at large batch)
DEFAULT_VARIANTS["step_fwd"] = "v1"  # the default runs step_fwd_v2 at large batch (CupyBackend.step_fwd_kernel)

THREADS = 256  # block size of the 1-D elementwise kernels
SMEM_LIMIT = 48 * 1024  # dynamic + static shared memory per block without an opt-in
SM_COUNT = DEFAULT_SM_COUNT  # planned for where no device says otherwise (H100 SXM / H200: 132)
MIN_WARPS = 4  # a conv tile block aims for at least this many warps (several images packed when small)
_TILE_THREADS = 256  # the threads a conv tile block aims for at most (more, smaller blocks fill the SMs evenly)
_SMEM_TARGET = 32 * 1024  # shared memory a conv tile aims for (several blocks per SM)


#: conv2d.cu's routed v2 kernels: block sizes, and the limits of their compile-time geometry (register
#: accumulators: R*S + 1 per wgrad thread, its (R*S + 1) * 8 reduction segments within one block; C per dgrad thread)
RT_THREADS, RT_DATA_THREADS = 256, 128
RT_MAX_TAPS = RT_THREADS // 8 - 1
RT_MAX_C = 16


def routed_v2_fits(op: str, C: int, R: int, S: int) -> bool:  # noqa: N803
    """Whether the routed v2 kernel of ``op`` compiles for this geometry (else v1 runs)."""
    return R * S <= RT_MAX_TAPS and (op != "conv2d_bwd_data_routed" or C <= RT_MAX_C)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_warp(n: int) -> int:
    return min(1024, max(32, ceil_div(n, 32) * 32))


@dataclass(frozen=True)
class Launch:
    """One launch's shape: grid, block, dynamic shared memory bytes, the tile arguments it implies, and the
    compile-time parameters its kernel is built with for this launch (e.g. K_BLOCK chosen for the shape)."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0
    extra: tuple[int, ...] = ()  # trailing int arguments of the kernel (tile rows, channel chunk)
    defines: tuple[tuple[str, int], ...] = ()

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]


def _grid1d(n: int, threads: int = THREADS) -> Launch:
    return Launch((max(1, ceil_div(n, threads)), 1, 1), (threads, 1, 1))


def _row_splits(rows_total: int) -> list[tuple[int, int]]:
    """(rows, tiles) for each distinct balanced split of rows_total rows into tiles."""
    out, seen = [], set()
    for tiles in range(1, rows_total + 1):
        rows = ceil_div(rows_total, tiles)
        if rows not in seen:
            seen.add(rows)
            out.append((rows, ceil_div(rows_total, rows)))
    return out


def _best(cands: list[tuple[tuple, Any]]) -> Any:
    if not cands:
        raise ValueError("no launch shape fits the shared memory; use variant v1")
    return max(cands, key=lambda c: c[0])[1]


def _score(threads: int, used: int, blocks: int, waste: int, width: int, sm_count: int) -> tuple:
    """Launch shapes are ranked by: a block of >= MIN_WARPS warps; the grid filling the SMs (blocks / SMs,
    up to 1); no register-blocking lane wasted (K or C a multiple of the width); a wider register block
    (more reuse per load); fewer idle threads; more blocks."""
    return (threads >= 32 * MIN_WARPS, min(1.0, blocks / sm_count), -waste, width, used / threads, blocks)


def _conv_fwd_tiles(N: int, C: int, H: int, W: int, K: int, R: int, S: int, pooled: bool, widths: tuple[int, ...],
                    sm_count: int) -> tuple[int, int, int, int, int, int]:
    """The tile of conv2d_fwd_v2 / conv2d_pool_fwd_v2: (K_BLOCK, rows, tiles, imgs, c_chunk, smem bytes).
    A block owns ``rows`` output rows (pooled rows: 2 conv rows each) of ``imgs`` images (imgs > 1 only when a
    tile is a whole map) for K_BLOCK filters; it stages c_chunk input channels at a time."""
    P, Q = H - R + 1, W - S + 1
    rows_total, row_len, mult = (ceil_div(P, 2), ceil_div(Q, 2), 2) if pooled else (P, Q, 1)
    cap = max(_TILE_THREADS, _round_warp(row_len))
    cands = []
    for kb in widths:
        groups = ceil_div(K, kb)
        for rows, tiles in _row_splits(rows_total):
            tile = rows * row_len  # more than 1024: the block's threads loop over it
            if tile > cap and rows > 1:
                continue
            for imgs in range(1, (max(1, min(N, cap // tile)) if tiles == 1 else 1) + 1):
                threads = _round_warp(imgs * tile)
                per_c = imgs * (rows * mult + R - 1) * W + R * S * kb  # floats per staged channel
                if 4 * per_c > SMEM_LIMIT:
                    continue
                c_chunk = max(1, min(C, (_SMEM_TARGET // 4) // per_c))
                blocks = ceil_div(N, imgs) * tiles * groups
                cands.append((_score(threads, imgs * tile, blocks, groups * kb - K, kb, sm_count),
                              (kb, rows, tiles, imgs, c_chunk, 4 * c_chunk * per_c)))
    return _best(cands)


def _bwd_data_tiles(N: int, C: int, H: int, W: int, K: int, R: int, S: int, widths: tuple[int, ...], sm_count: int,
                    max_threads: int) -> tuple[int, int, int, int, int]:
    """The tile of conv2d_bwd_data_v2 / conv2d_bwd_data_pool_v2 over dx (H x W): (C_BLOCK, rows, tiles,
    k_chunk, smem bytes). A block owns ``rows`` rows of dx of one image for C_BLOCK channels."""
    Q = W - S + 1
    cap = min(max_threads, max(_TILE_THREADS, _round_warp(W)))
    cands = []
    for cb in widths:
        groups = ceil_div(C, cb)
        for rows, tiles in _row_splits(H):
            threads = min(cap, _round_warp(rows * W))  # a row longer than that: the threads loop over it
            if rows * W > cap and rows > 1:
                continue
            per_k = (rows + R - 1) * (Q + 2 * (S - 1)) + R * S * cb  # floats per staged filter
            if 4 * per_k > SMEM_LIMIT:
                continue
            k_chunk = max(1, min(K, (_SMEM_TARGET // 4) // per_k))
            cands.append((_score(threads, rows * W, N * tiles * groups, groups * cb - C, cb, sm_count),
                          (cb, rows, tiles, k_chunk, 4 * k_chunk * per_k)))
    return _best(cands)


def _widths(fixed: int, candidates: tuple[int, ...]) -> tuple[int, ...]:
    return (fixed,) if fixed else candidates


def launch_plan(
    op: str, variant: str, shapes: dict[str, int], defines: dict[str, dict[str, int]] | None = None,
    sm_count: int = SM_COUNT,
) -> Launch:
    """The launch shape of ``op``/``variant`` at the given sizes (N, C, H, W, K, R, S, I, O, n, B, ...) on a
    device of ``sm_count`` SMs: conv tiles of >= MIN_WARPS warps (small maps packed several to a block) that
    fill the SMs where the batch allows, register-blocking widths (K_BLOCK, C_BLOCK) chosen per launch unless
    ``defines`` fixes them, and optimizer grids that cover the SMs."""
    d = {stem: {**v, **(defines or {}).get(stem, {})} for stem, v in MODULE_DEFINES.items()}
    g = shapes.get
    if op == "batch_prepare":
        return _grid1d(g("B") * g("XH") * g("XW"))
    if op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "conv2d_bwd_data_pool", "conv2d_bwd_weight"):
        N, C, H, W, K, R, S = (g(k) for k in "NCHWKRS")
        P, Q = H - R + 1, W - S + 1
        dc = d["conv2d"]
        if op == "conv2d_fwd" and variant == "v1":
            return _grid1d(N * K * P * Q)
        if op == "conv2d_pool_fwd" and variant == "v1":
            return _grid1d(N * K * ceil_div(P, 2) * ceil_div(Q, 2))
        if op in ("conv2d_fwd", "conv2d_pool_fwd"):
            pooled = op == "conv2d_pool_fwd"
            kb, rows, tiles, imgs, c_chunk, smem = _conv_fwd_tiles(N, C, H, W, K, R, S, pooled,
                                                                   _widths(dc["K_BLOCK"], K_BLOCKS), sm_count)
            row_len = ceil_div(Q, 2) if pooled else Q
            return Launch((ceil_div(N, imgs) * tiles, ceil_div(K, kb), 1), (_round_warp(imgs * rows * row_len), 1, 1),
                          smem, (rows, c_chunk, imgs), (("K_BLOCK", kb),))
        if op == "conv2d_bwd_data" and variant == "v1":
            return _grid1d(N * C * H * W)
        if op == "conv2d_bwd_data_pool" and variant == "v1":
            return _grid1d(N * C * (H // 2) * (W // 2))
        if op in ("conv2d_bwd_data", "conv2d_bwd_data_pool"):
            # H, W are dx's (the convolution's input): for the fused op, the pooled map of yconv
            if op == "conv2d_bwd_data_pool":
                H, W = H // 2, W // 2
            cap = 512 if op == "conv2d_bwd_data_pool" else 1024  # the kernels' launch bounds
            cb, rows, tiles, k_chunk, smem = _bwd_data_tiles(N, C, H, W, K, R, S, _widths(dc["C_BLOCK"], C_BLOCKS),
                                                             sm_count, cap)
            return Launch((N * tiles, ceil_div(C, cb), 1), (min(cap, _round_warp(rows * W)), 1, 1), smem,
                          (rows, k_chunk), (("C_BLOCK", cb),))
        if variant == "v1":
            return _grid1d(K * C * R * S + K)
        jb, bt = dc["J_BLOCK"], dc["BWD_THREADS"]
        base = ceil_div(C * R * S, jb) * K
        if variant == "v2":
            return Launch((ceil_div(C * R * S, jb), K, 1), (bt, 1, 1))
        # v3: split the batch so that a few blocks per SM run, each with >= 8 positions per thread
        splits = max(1, min(N, ceil_div(4 * sm_count, base), (N * P * Q) // (bt * 8), 65535))
        chunk = ceil_div(N, splits)
        return Launch((ceil_div(C * R * S, jb), K, ceil_div(N, chunk)), (bt, 1, 1), 0, (chunk,))
    if op in ("conv2d_bwd_weight_routed", "conv2d_bwd_data_routed"):
        N, C, H, W, K, R, S = (g(k) for k in "NCHWKRS")
        if op == "conv2d_bwd_weight_routed":
            if variant == "v1":  # a thread per dw / db element
                return _grid1d(K * C * R * S + K)
            # v2 phase 0 (the partials): a block per (k, c, batch split); enough splits for ~4 blocks an SM, each
            # thread keeping >= 4 routed windows; phase 1 (the ordered sum of the splits): routed_wgrad_reduce
            hw = ((H - R + 1) // 2) * ((W - S + 1) // 2)
            splits = max(1, min(N, ceil_div(4 * sm_count, K * C), (N * hw) // (RT_THREADS * 4), 65535))
            chunk = ceil_div(N, splits)
            return Launch((K, C, ceil_div(N, chunk)), (RT_THREADS, 1, 1), 0, (chunk, ceil_div(N, chunk), 0),
                          (("RT_R", R), ("RT_S", S)))
        if variant == "v1":  # a thread per gz_below element
            return _grid1d(N * C * H * W)
        return Launch((ceil_div(N * H * W, RT_DATA_THREADS), 1, 1), (RT_DATA_THREADS, 1, 1), 0, (),
                      (("RT_C", C), ("RT_R", R), ("RT_S", S)))
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
    if op == "step_advance":
        return Launch((1, 1, 1), (1, 1, 1))  # one thread
    if op in ("adam_step", "sgd_step"):
        # one element (v1) or float4 (v2) per thread, blocks sized so the grid covers the SMs: a block gets
        # items / SMs threads rounded down to warps (32..256), so a small buffer still spreads over every SM
        items = ceil_div(g("n"), 1 if variant == "v1" else 4)
        threads = max(32, min(THREADS, (items // sm_count) // 32 * 32))
        return Launch((max(1, min(ceil_div(items, threads), 65535)), 1, 1), (threads, 1, 1))
    raise ValueError(f"unknown op {op!r}")


def routed_wgrad_reduce(part: Launch, K: int, C: int, R: int, S: int) -> Launch:  # noqa: N803
    """conv2d_bwd_weight_routed_v2's second launch (phase 1): a thread per dw / db element adding the splits."""
    chunk, splits, _ = part.extra
    return Launch((ceil_div(K * C * R * S + K, RT_THREADS), 1, 1), (RT_THREADS, 1, 1), 0, (chunk, splits, 1),
                  part.defines)


def _address(arr: Any) -> int:
    data = getattr(arr, "data", None)
    ptr = getattr(data, "ptr", None)  # CuPy
    return int(ptr) if ptr is not None else int(arr.ctypes.data)


def _check_aligned(arr: Any, name: str, nbytes: int) -> None:
    if _address(arr) % nbytes:
        raise ValueError(f"{name}: address not {nbytes}-byte aligned (vectorised variant); use variant v1")


class _Entry:
    """A cached launch: kernel handle, grid, block, shared memory, the typed trailing scalar arguments,
    the scratch buffers of a last-block reduction, and (name, shape, dtype) of each array argument
    (None: not checked, e.g. an optional array that is absent)."""

    __slots__ = ("kernel", "grid", "block", "shared_mem", "tail", "scratch", "expect", "launch", "aligned",
                 "optional")

    def __init__(self, kernel: Any, launch: Launch, tail: tuple, expect: tuple, scratch: tuple = (),
                 aligned: int = 0) -> None:
        self.kernel, self.launch = kernel, launch
        self.grid, self.block, self.shared_mem = launch.grid, launch.block, launch.shared_mem
        self.tail = tail + tuple(i32(e) for e in launch.extra)
        self.scratch = scratch
        self.expect = expect
        self.optional = any(ex is None for ex in expect)
        self.aligned = aligned  # the first `aligned` arrays must be 16-byte aligned (float4 variants)


def _arg(name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> tuple[str, tuple[int, ...], np.dtype]:
    return (name, tuple(int(d) for d in shape), np.dtype(dtype))


class CupyBackend:
    """CUDA C kernels (kernels/*.cu) on the GPU through CuPy, or on the CPU harness with ``host=True``.

    Args:
        host: run on the CPU harness (the ``cupy-host`` backend) instead of the GPU.
        graphs: ``graph(fn, steps)`` captures CUDA graphs (on the harness: runs fn under the capture
            rules). Default: on, unless the environment sets LENET_GPU_CUDA_GRAPHS=0; off: ``graph``
            returns None.
        fused: offer the fused ops ``conv2d_pool_fwd``, ``conv2d_bwd_data_pool``, ``head_train`` and
            ``lenet_fwd`` (the model then uses them: 10 launches a training step instead of 19), and the
            routed ops ``conv2d_bwd_weight_routed`` and ``conv2d_bwd_data_routed`` (with max pooling the model
            then takes the routed step, docs/routed_backward.md: 10 launches, no un-pooled map kept).
        variants: op → variant overriding ``DEFAULT_VARIANTS``.
        defines: kernel file stem → {NAME: value} overriding ``MODULE_DEFINES``.
        runtime: a Runtime to use instead of the one ``host`` selects (e.g. for reports, host timing).
        sanitize: the harness sanitizer for ``host`` ("address", "thread", "undefined"; default from
            $CUDACPU_SANITIZE).
        sm_count: the SM count launch shapes are planned for (default: the device's, queried once; 132 where
            there is no device).
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
        sm_count: int | None = None,
    ) -> None:
        if graphs is None:
            graphs = os.environ.get("LENET_GPU_CUDA_GRAPHS", "1") != "0"
        if runtime is None:
            runtime = HostRuntime(sanitize=sanitize) if host else CupyRuntime(graphs=graphs)
        self.runtime = runtime
        self.name = "cupy" if runtime.is_gpu else "cupy-host"
        self.is_gpu = runtime.is_gpu
        self.counters = runtime.counters
        self.graphs = bool(graphs)
        self.sm_count = int(sm_count or runtime.sm_count)
        self.defines = {stem: {**d, **(defines or {}).get(stem, {})} for stem, d in MODULE_DEFINES.items()}
        self._kernels: dict[tuple, Any] = {}
        self._plans: dict[tuple, _Entry] = {}
        ops = [*OPS, *((*FUSED_OPS, *ROUTED_OPS, *STEP_OPS) if fused else ())]
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

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn's launches recorded at its first call (kernel, grid, block, shared memory, typed arguments) and
        replayed as they are on later calls: no checks, plans or conversions."""
        return self.runtime.record(fn)

    def launch_list(self, fn: Callable[[], None]) -> list[tuple[str, Callable[[], None]]]:
        """fn's kernel launches, run once and recorded, each as (kernel name, a callable that issues that one launch
        again): the self-test's per-kernel profile without CUPTI times them one at a time."""
        return self.runtime.launch_list(fn)

    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None] | None:
        """``steps`` consecutive calls of fn as one CUDA graph, captured at the first call and replayed after
        (fn already warmed up); None when graphs are off. On the CPU harness: fn under the capture rules."""
        return self.runtime.graph(fn, steps) if self.graphs else None

    # ------------------------------------------------------------------ launch helpers
    def _variant(self, op: str, variant: str | None) -> str:
        v = variant or self.default_variants[op]
        if v not in self.variants.get(op, ()):
            raise ValueError(f"{op}: unknown variant {v!r}; this backend has {self.variants.get(op, ())}")
        return v

    def options(self, stem: str, launch_defines: tuple[tuple[str, int], ...] = ()) -> tuple[str, ...]:
        """The compile options of kernels/<stem>.cu for a launch: the module's defines (those set to 0, chosen
        per launch, left out) with the launch's own (e.g. the K_BLOCK its shape was planned with)."""
        merged = {k: v for k, v in self.defines[stem].items() if v}
        merged.update(launch_defines)
        return define_options(merged)

    def _kernel(self, op: str, variant: str, launch_defines: tuple[tuple[str, int], ...] = ()) -> Any:
        key = (op, variant, launch_defines)
        k = self._kernels.get(key)
        if k is None:
            stem = OP_KERNELS[op][0]
            k = self._kernels[key] = self.runtime.get_kernel(stem, f"{op}_{variant}",
                                                              self.options(stem, launch_defines))
        return k

    def _launch(self, op: str, variant: str, launch: Launch, args: tuple) -> None:
        """Launch ``{op}_{variant}`` with ``args`` followed by the plan's typed tile arguments."""
        self.runtime.launch(self._kernel(op, variant, launch.defines), launch.grid, launch.block,
                            args + tuple(i32(e) for e in launch.extra), launch.shared_mem)

    def plan(self, op: str, variant: str, **shapes: int) -> Launch:
        return launch_plan(op, variant, shapes, self.defines, self.sm_count)

    def _entry(self, op: str, variant: str, tail: tuple, expect: tuple, scratch: tuple = (), **shapes: int) -> _Entry:
        plan = self.plan(op, variant, **shapes)
        return _Entry(self._kernel(op, variant, plan.defines), plan, tail, expect, scratch)

    def _run(self, e: _Entry, arrays: tuple) -> None:
        """Check the arrays against the cached entry and issue its launch (the scalars are typed already)."""
        for a, ex in zip(arrays, e.expect):
            if ex is None:
                continue
            if a is None or a.shape != ex[1] or a.dtype != ex[2] or not a.flags.c_contiguous:
                _check(a, *ex)
        for a, ex in zip(arrays[: e.aligned], e.expect):
            _check_aligned(a, ex[0], 16)
        if e.optional:  # an optional array: absent is a null pointer
            arrays = tuple(NULL_POINTER if a is None else a for a in arrays)
        self.runtime.issue(e.kernel, e.grid, e.block, arrays + e.scratch + e.tail, e.shared_mem)

    def ticket_buffers(self, op: str) -> list[Any]:
        """The last-block ticket buffers (uint64) of ``op``'s cached launches (softmax_xent v2,
        conv2d_bwd_weight v3): for tests that poison them and for debugging."""
        return [e.scratch[-1] for key, e in self._plans.items() if key[0] == op and e.scratch]

    # ------------------------------------------------------------------ ops
    def batch_prepare(self, images, labels, perm, state, x, y, mean, std, variant=None) -> None:
        key = ("batch_prepare", variant, images.shape, perm.shape, x.shape, float(mean), float(std))
        e = self._plans.get(key)
        if e is None:
            v = self._variant("batch_prepare", variant)
            n, ih, iw = images.shape
            b, _, xh, xw = x.shape
            pad = (xh - ih) // 2
            if xh != ih + 2 * pad or xw != iw + 2 * pad or pad < 0:
                raise ValueError(f"batch_prepare: x {tuple(x.shape)} is not images {tuple(images.shape)} padded")
            (m,) = perm.shape
            if m < 1:
                raise ValueError("batch_prepare: empty permutation")
            expect = (_arg("images", (n, ih, iw), np.uint8), _arg("labels", (n,), np.uint8),
                      _arg("perm", (m,), np.int32), _arg("state", (STATE_WORDS,), np.int32),
                      _arg("x", (b, 1, xh, xw)), _arg("y", (b,), np.int32))
            tail = (i32(m), i32(b), i32(ih), i32(iw), i32(pad), f32(1.0 / (255.0 * std)), f32(-mean / std))
            e = self._plans[key] = self._entry("batch_prepare", v, tail, expect, B=b, XH=xh, XW=xw)
        self._run(e, (images, labels, perm, state, x, y))

    def _conv_shapes(self, x, w, b) -> tuple[int, ...]:
        n, c, h, wd = x.shape
        k, c2, r, s = w.shape
        if c2 != c or h < r or wd < s:
            raise ValueError(f"conv2d: x {tuple(x.shape)} and w {tuple(w.shape)} do not agree")
        return n, c, h, wd, k, r, s

    def conv2d_fwd(self, x, w, b, y, act, variant=None) -> None:
        key = ("conv2d_fwd", variant, x.shape, w.shape, act)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("conv2d_fwd", variant)
            check_act(act)
            n, c, h, wd, k, r, s = dims = self._conv_shapes(x, w, b)
            expect = (_arg("x", (n, c, h, wd)), _arg("w", (k, c, r, s)), _arg("b", (k,)),
                      _arg("y", (n, k, h - r + 1, wd - s + 1)))
            tail = (*(i32(d) for d in dims), i32(ACT_CODES[act]))
            e = self._plans[key] = self._entry("conv2d_fwd", v, tail, expect, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
        self._run(e, (x, w, b, y))

    #: the fused dense head (kernels/head.cu, two launches) and the whole-network inference pass
    #: (kernels/lenet_fwd.cu, one launch): their wrappers live in fused.py
    head_train = fused.head_train
    lenet_fwd = fused.lenet_fwd
    lenet_eval = fused.lenet_eval  # evaluation's loss and correct count, summed on the device
    stager = staging.stager  # host batches for inference through pinned, overlapped staging

    def conv2d_pool_fwd(self, x, w, b, yconv, ypool, argmax, act, mode, variant=None) -> None:
        """Fused conv2d_fwd + pool2x2_fwd: yconv (may be None: not written) = act(conv + b); ypool and,
        for max, argmax = the 2×2/2 subsampling of it."""
        key = ("conv2d_pool_fwd", variant, x.shape, w.shape, act, mode, yconv is None)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("conv2d_pool_fwd", variant)
            check_act(act)
            check_mode(mode)
            n, c, h, wd, k, r, s = dims = self._conv_shapes(x, w, b)
            p, q = h - r + 1, wd - s + 1
            expect = (_arg("x", (n, c, h, wd)), _arg("w", (k, c, r, s)), _arg("b", (k,)),
                      None if yconv is None else _arg("yconv", (n, k, p, q)), _arg("ypool", (n, k, p // 2, q // 2)),
                      _arg("argmax", (n, k, p // 2, q // 2), np.uint8) if mode == "max" else None)
            tail = (*(i32(d) for d in dims), i32(ACT_CODES[act]), i32(POOL_CODES[mode]))
            e = self._plans[key] = self._entry("conv2d_pool_fwd", v, tail, expect, N=n, C=c, H=h, W=wd, K=k, R=r,
                                               S=s)
        self._run(e, (x, w, b, yconv, ypool, argmax if mode == "max" else None))

    def conv2d_bwd_data(self, dz, w, dx, variant=None) -> None:
        key = ("conv2d_bwd_data", variant, dx.shape, w.shape)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("conv2d_bwd_data", variant)
            n, c, h, wd = dims = dx.shape
            k, c2, r, s = w.shape
            if c2 != c or h < r or wd < s:
                raise ValueError(f"conv2d_bwd_data: w {tuple(w.shape)} and dx {tuple(dx.shape)} do not agree")
            expect = (_arg("dz", (n, k, h - r + 1, wd - s + 1)), _arg("w", (k, c, r, s)), _arg("dx", dims))
            tail = tuple(i32(d) for d in (n, c, h, wd, k, r, s))
            e = self._plans[key] = self._entry("conv2d_bwd_data", v, tail, expect, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
        self._run(e, (dz, w, dx))

    def conv2d_bwd_data_pool(self, dz, w, argmax, yconv, dz_below, mode, act, variant=None) -> None:
        """Fused conv2d_bwd_data + pool2x2_bwd: dz_below (yconv's shape) = the data gradient of the convolution
        (whose input is the 2×2 pooling of yconv) routed through that pooling and multiplied by act'(yconv)
        (reference.conv2d_bwd_data_pool). argmax is None for avg."""
        key = ("conv2d_bwd_data_pool", variant, dz.shape, w.shape, yconv.shape, mode, act)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("conv2d_bwd_data_pool", variant)
            check_mode(mode)
            check_act(act)
            n, c, h, wd = yconv.shape
            k, c2, r, s = w.shape
            hp, wp = h // 2, wd // 2
            if c2 != c or hp < r or wp < s:
                raise ValueError(f"conv2d_bwd_data_pool: w {tuple(w.shape)} and yconv {tuple(yconv.shape)} "
                                 "do not agree")
            expect = (_arg("dz", (n, k, hp - r + 1, wp - s + 1)), _arg("w", (k, c, r, s)),
                      _arg("argmax", (n, c, hp, wp), np.uint8) if mode == "max" else None,
                      _arg("yconv", (n, c, h, wd)), _arg("dz_below", (n, c, h, wd)))
            tail = (*(i32(d) for d in (n, c, h, wd, k, r, s)), i32(POOL_CODES[mode]), i32(ACT_CODES[act]))
            e = self._plans[key] = self._entry("conv2d_bwd_data_pool", v, tail, expect, N=n, C=c, H=h, W=wd, K=k,
                                               R=r, S=s)
        self._run(e, (dz, w, argmax if mode == "max" else None, yconv, dz_below))

    def conv2d_bwd_weight(self, x, dz, dw, db, state=None, variant=None) -> None:
        """dw, db of a convolution. ``state``: the step state, whose STEP tags the last-block ticket of v3 (a
        launch never relies on the previous one having reset it); None: generation 0."""
        key = ("conv2d_bwd_weight", variant, x.shape, dw.shape, state is None)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("conv2d_bwd_weight", variant)
            n, c, h, wd = x.shape
            k, c2, r, s = dw.shape
            if c2 != c or h < r or wd < s:
                raise ValueError(f"conv2d_bwd_weight: x {tuple(x.shape)} and dw {tuple(dw.shape)} do not agree")
            expect = (_arg("x", (n, c, h, wd)), _arg("dz", (n, k, h - r + 1, wd - s + 1)), _arg("dw", (k, c, r, s)),
                      _arg("db", (k,)))
            tail = tuple(i32(d) for d in (n, c, h, wd, k, r, s))
            plan = self.plan("conv2d_bwd_weight", v, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
            scratch: tuple = ()
            if v == "v3":  # per-split partial sums and the column tickets: allocated once per shape
                scratch = (self.runtime.empty((plan.grid[2] * k * (c * r * s + 1),)),
                           self.runtime.zeros((plan.grid[0] * k,), np.uint64))
                expect += (None if state is None else _arg("state", (STATE_WORDS,), np.int32),)
            e = self._plans[key] = _Entry(self._kernel("conv2d_bwd_weight", v, plan.defines), plan, tail, expect,
                                          scratch)
        self._run(e, (x, dz, dw, db, state) if e.scratch else (x, dz, dw, db))

    # ------------------------------------------------------------------ routed ops (docs/routed_backward.md)
    def _routed_dims(self, op: str, x_shape: tuple, w_shape: tuple, gz_shape: tuple) -> tuple[int, ...]:
        n, c, h, wd = x_shape
        k, c2, r, s = w_shape
        if c2 != c or h < r or wd < s:
            raise ValueError(f"{op}: the conv input {tuple(x_shape)} and w {tuple(w_shape)} do not agree")
        hp, wp = (h - r + 1) // 2, (wd - s + 1) // 2
        if hp < 1 or wp < 1:
            raise ValueError(f"{op}: the conv output {h - r + 1}x{wd - s + 1} is smaller than a 2x2 window")
        if tuple(gz_shape) != (n, k, hp, wp):
            raise ValueError(f"{op}: gz {tuple(gz_shape)} is not the pooled conv output {(n, k, hp, wp)}")
        return n, c, h, wd, k, r, s

    def conv2d_bwd_weight_routed(self, x, gz, argmax, dw, db, state=None, variant=None) -> None:
        """dw, db of a conv + 2x2 max pool from the routed gradient gz (B,K,Hp,Wp) and the routes
        (reference.conv2d_bwd_weight_routed). Overwrites dw, db. ``state`` is accepted for the protocol
        (no launch of this op keeps a ticket)."""
        op = "conv2d_bwd_weight_routed"
        key = (op, variant, x.shape, dw.shape)
        e = self._plans.get(key)
        if e is None:
            n, c, h, wd, k, r, s = dims = self._routed_dims(op, x.shape, dw.shape, gz.shape)
            v = self._routed_variant(op, variant, c, r, s)
            hp, wp = (h - r + 1) // 2, (wd - s + 1) // 2
            expect = (_arg("x", (n, c, h, wd)), _arg("gz", (n, k, hp, wp)), _arg("argmax", (n, k, hp, wp), np.uint8),
                      _arg("dw", (k, c, r, s)), _arg("db", (k,)))
            if v == "v1":
                e = self._plans[key] = (self._entry(op, v, tuple(i32(d) for d in dims), expect, N=n, C=c, H=h, W=wd,
                                                    K=k, R=r, S=s),)
            else:  # two launches of one kernel: the partials (phase 0), their ordered sum (phase 1)
                part = self.plan(op, v, N=n, C=c, H=h, W=wd, K=k, R=r, S=s)
                scratch = (self.runtime.empty((part.grid[2] * k * (c * r * s + 1),)),)  # once per shape
                kern = self._kernel(op, v, part.defines)
                tail = tuple(i32(d) for d in (n, c, h, wd, k))
                e = self._plans[key] = (_Entry(kern, part, tail, expect, scratch),
                                        _Entry(kern, routed_wgrad_reduce(part, k, c, r, s), tail, expect, scratch))
        for entry in e:
            self._run(entry, (x, gz, argmax, dw, db))

    def _routed_variant(self, op: str, variant: str | None, c: int, r: int, s: int) -> str:
        v = self._variant(op, variant)
        if v == "v2" and not routed_v2_fits(op, c, r, s):
            if variant is not None:
                raise ValueError(f"{op}_v2: compiled for at most {RT_MAX_TAPS} filter taps"
                                 f"{f' and {RT_MAX_C} channels' if op == 'conv2d_bwd_data_routed' else ''}; use v1")
            v = "v1"  # the default does not fit this geometry: the baseline takes any
        return v

    def conv2d_bwd_data_routed(self, gz, w, argmax, y_below, gz_below, act, variant=None) -> None:
        """gz_below (y_below's shape, the conv's input) = the data gradient of the scattered routed gradient
        gz times act'(y_below): the routed gradient of the layer below (reference.conv2d_bwd_data_routed)."""
        key = ("conv2d_bwd_data_routed", variant, y_below.shape, w.shape, act)
        e = self._plans.get(key)
        if e is None:
            check_act(act)
            n, c, h, wd, k, r, s = dims = self._routed_dims("conv2d_bwd_data_routed", y_below.shape, w.shape,
                                                            gz.shape)
            v = self._routed_variant("conv2d_bwd_data_routed", variant, c, r, s)
            hp, wp = (h - r + 1) // 2, (wd - s + 1) // 2
            expect = (_arg("gz", (n, k, hp, wp)), _arg("w", (k, c, r, s)), _arg("argmax", (n, k, hp, wp), np.uint8),
                      _arg("y_below", (n, c, h, wd)), _arg("gz_below", (n, c, h, wd)))
            # v2 has C, R, S compiled in (RT_C, RT_R, RT_S)
            tail = (*(i32(d) for d in (dims if v == "v1" else (n, h, wd, k))), i32(ACT_CODES[act]))
            e = self._plans[key] = self._entry("conv2d_bwd_data_routed", v, tail, expect, N=n, C=c, H=h, W=wd, K=k,
                                               R=r, S=s)
        self._run(e, (gz, w, argmax, y_below, gz_below))

    def step_bwd(self, x, p1, gz3, m3, m1, w3, gpart, act, variant=None) -> None:
        """The conv backward of the four-kernel step (docs/step4.md, reference.step_bwd) in one launch of
        kernels/step_bwd.cu: a block per image group (gpart's S rows; chunk = ceil(B / S), empty groups give zero
        rows) writes its row of C1's and C3's weight and bias gradients at their flat-layout offsets (padding 0).
        x (B,1,32,32), p1 (B,6,14,14), gz3 (B,16,5,5) float32; m3 (B,16,5,5), m1 (B,6,14,14) uint8;
        w3 (16,6,5,5); gpart (S, conv_prefix) float32. LeNet-5's geometry is compiled in."""
        from ...spec import conv_prefix

        op = "step_bwd"
        key = (op, variant, x.shape, gpart.shape, act)
        e = self._plans.get(key)
        if e is None:
            check_act(act)
            v = self._variant(op, variant)
            if len(x.shape) != 4 or len(gpart.shape) != 2:
                raise ValueError(f"{op}: x must be (B,1,32,32) and gpart (S, {conv_prefix()}); got x {tuple(x.shape)}, "
                                 f"gpart {tuple(gpart.shape)}")
            b, (s, width) = int(x.shape[0]), gpart.shape
            if tuple(x.shape[1:]) != (1, 32, 32) or b < 1:
                raise ValueError(f"{op}: x must be (B,1,32,32) with B >= 1 (LeNet-5's C1 input); got {tuple(x.shape)}")
            if width != conv_prefix() or s < 1:
                raise ValueError(f"{op}: gpart must be (S, {conv_prefix()}) with S >= 1 (the flat layout's conv "
                                 f"prefix); got {tuple(gpart.shape)}")
            expect = (_arg("x", (b, 1, 32, 32)), _arg("p1", (b, 6, 14, 14)), _arg("gz3", (b, 16, 5, 5)),
                      _arg("m3", (b, 16, 5, 5), np.uint8), _arg("m1", (b, 6, 14, 14), np.uint8),
                      _arg("w3", (16, 6, 5, 5)), _arg("gpart", (s, width)))
            chunk = ceil_div(b, s)  # on the host: the kernel divides by no run-time value
            launch = Launch((s, 1, 1), (256, 1, 1))  # step_bwd.cu's SB_THREADS
            e = self._plans[key] = _Entry(self._kernel(op, v), launch, (i32(b), i32(chunk), i32(ACT_CODES[act])),
                                          expect)
        self._run(e, (x, p1, gz3, m3, m1, w3, gpart))

    def step_groups(self, batch: int) -> int:
        """The rows S of step_bwd's partials at ``batch``: a block per group, so the grid should fill the SMs
        and each block should get enough images to amortise staging w3 (9.6 KB) and writing its 10.5 KB row (which
        step_adam / step_sgd then add). Up to 2 blocks per SM (v1's 128 registers x 256 threads allow 2 on sm_90;
        v2's 80 would allow 3: the groups stay v1's, so both variants write the same rows) one image each:
        S = batch for batch <= 2 * sm_count; beyond, groups of ceil(batch / (2 * sm_count)) images,
        S = ceil(batch / chunk) <= 2 * sm_count (one wave; no empty group). Always 1 <= S <= batch."""
        batch = int(batch)
        if batch < 1:
            raise ValueError(f"step_groups: batch must be >= 1 (got {batch})")
        chunk = ceil_div(batch, 2 * self.sm_count)
        return ceil_div(batch, chunk)

    def pool2x2_fwd(self, x, y, argmax, mode, variant=None) -> None:
        key = ("pool2x2_fwd", variant, x.shape, mode)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("pool2x2_fwd", variant)
            check_mode(mode)
            n, c, h, wd = x.shape
            expect = (_arg("x", (n, c, h, wd)), _arg("y", (n, c, h // 2, wd // 2)),
                      _arg("argmax", (n, c, h // 2, wd // 2), np.uint8) if mode == "max" else None)
            tail = (i32(n * c), i32(h), i32(wd), i32(POOL_CODES[mode]))
            e = self._plans[key] = self._entry("pool2x2_fwd", v, tail, expect, NC=n * c, H=h, W=wd)
        self._run(e, (x, y, argmax if mode == "max" else None))

    def pool2x2_bwd(self, dy, argmax, yconv, dz, mode, act, variant=None) -> None:
        key = ("pool2x2_bwd", variant, dz.shape, mode, act)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("pool2x2_bwd", variant)
            check_mode(mode)
            check_act(act)
            n, c, h, wd = dz.shape
            expect = (_arg("dy", (n, c, h // 2, wd // 2)),
                      _arg("argmax", (n, c, h // 2, wd // 2), np.uint8) if mode == "max" else None,
                      _arg("yconv", (n, c, h, wd)), _arg("dz", (n, c, h, wd)))
            tail = (i32(n * c), i32(h), i32(wd), i32(POOL_CODES[mode]), i32(ACT_CODES[act]))
            e = self._plans[key] = self._entry("pool2x2_bwd", v, tail, expect, NC=n * c, H=h, W=wd)
        self._run(e, (dy, argmax if mode == "max" else None, yconv, dz))

    def dense_fwd(self, x, w, b, y, act, variant=None) -> None:
        key = ("dense_fwd", variant, x.shape, w.shape, act)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("dense_fwd", variant)
            check_act(act)
            n, i = x.shape
            o = w.shape[0]
            expect = (_arg("x", (n, i)), _arg("w", (o, i)), _arg("b", (o,)), _arg("y", (n, o)))
            tail = (i32(n), i32(i), i32(o), i32(ACT_CODES[act]))
            e = self._plans[key] = self._entry("dense_fwd", v, tail, expect, N=n, I=i, O=o)
        self._run(e, (x, w, b, y))

    def dense_bwd(self, x, w, y, dy, dx, dw, db, act, variant=None) -> None:
        key = ("dense_bwd", variant, x.shape, w.shape, act, dx is None)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("dense_bwd", variant)
            check_act(act)
            n, i = x.shape
            o = w.shape[0]
            expect = (_arg("x", (n, i)), _arg("w", (o, i)), _arg("y", (n, o)), _arg("dy", (n, o)),
                      None if dx is None else _arg("dx", (n, i)), _arg("dw", (o, i)), _arg("db", (o,)))
            tail = (i32(n), i32(i), i32(o), i32(ACT_CODES[act]))
            e = self._plans[key] = self._entry("dense_bwd", v, tail, expect, N=n, I=i, O=o, dx=int(dx is not None))
        self._run(e, (x, w, y, dy, dx, dw, db))

    def softmax_xent(self, logits, labels, dlogits, stats, state, variant=None) -> None:
        """dlogits and the step's [Σ loss, correct] into stats row STEP_IN_EPOCH mod S (overwritten)."""
        key = ("softmax_xent", variant, logits.shape, stats.shape)
        e = self._plans.get(key)
        if e is None:
            v = self._variant("softmax_xent", variant)
            n, nc = logits.shape
            if stats.ndim != 2 or stats.shape[1] != 2 or stats.shape[0] < 1:
                raise ValueError(f"softmax_xent: stats must be (S, 2), got {tuple(stats.shape)}")
            rows = stats.shape[0]
            expect = (_arg("logits", (n, nc)), _arg("labels", (n,), np.int32), _arg("dlogits", (n, nc)),
                      _arg("stats", (rows, 2)), _arg("state", (STATE_WORDS,), np.int32))
            plan = self.plan("softmax_xent", v, N=n)
            scratch: tuple = ()
            if v == "v2":  # block partials and the last-block ticket: allocated at the first call at this shape
                scratch = (self.runtime.empty((2 * plan.grid[0],)), self.runtime.zeros((1,), np.uint64))
            e = self._plans[key] = _Entry(self._kernel("softmax_xent", v, plan.defines), plan,
                                          (i32(rows), i32(n), i32(nc)), expect, scratch)
        self._run(e, (logits, labels, dlogits, stats, state))

    def _optim_entry(self, op: str, variant: str | None, names: tuple[str, ...], size: int, sched: Any,
                     hyper: tuple[float, ...]) -> _Entry:
        v = self._variant(op, variant)
        if sched.ndim != 2 or sched.shape[1] != SCHED_COLS or sched.shape[0] < 1:
            raise ValueError(f"{op}: sched must be (T, {SCHED_COLS}), got {tuple(sched.shape)}")
        expect = (*(_arg(nm, (size,)) for nm in names), _arg("sched", tuple(sched.shape)),
                  _arg("state", (STATE_WORDS,), np.int32))
        tail = (i32(size), i32(sched.shape[0]), *(f32(h) for h in hyper))
        # the float4 variants need 16-byte aligned buffers (the flat parameter buffers are)
        aligned = 0 if v == "v1" else len(names)
        plan = self.plan(op, v, n=size)
        return _Entry(self._kernel(op, v, plan.defines), plan, tail, expect, aligned=aligned)

    def adam_step(self, p, g, m, v, sched, state, beta1, beta2, eps, weight_decay, variant=None) -> None:
        """One Adam step over the flat buffers; [lr, bc1, bc2] from sched's row of this step (device)."""
        key = ("adam_step", variant, p.shape, sched.shape, beta1, beta2, eps, weight_decay)
        e = self._plans.get(key)
        if e is None:
            e = self._plans[key] = self._optim_entry("adam_step", variant, ("p", "g", "m", "v"), p.shape[0], sched,
                                                     (beta1, beta2, eps, weight_decay))
        self._run(e, (p, g, m, v, sched, state))

    def sgd_step(self, p, g, m, sched, state, momentum, weight_decay, variant=None) -> None:
        """One SGD-with-momentum step over the flat buffers; lr from sched's row of this step (device)."""
        key = ("sgd_step", variant, p.shape, sched.shape, momentum, weight_decay)
        e = self._plans.get(key)
        if e is None:
            e = self._plans[key] = self._optim_entry("sgd_step", variant, ("p", "g", "m"), p.shape[0], sched,
                                                     (momentum, weight_decay))
        self._run(e, (p, g, m, sched, state))

    def step_advance(self, state, batch, variant=None) -> None:
        """One thread moves the step state on (lenet_gpu.stepstate.advance)."""
        key = ("step_advance", variant, int(batch))
        e = self._plans.get(key)
        if e is None:
            v = self._variant("step_advance", variant)
            e = self._plans[key] = self._entry("step_advance", v, (i32(batch),),
                                               (_arg("state", (STATE_WORDS,), np.int32),))
        self._run(e, (state,))

    # ------------------------------------------------------------------ the four-kernel step (docs/step4.md)
    #: step_fwd.cu's block size (SF_THREADS): a block per image (v1), per SF2_IMGS images (v2)
    STEP_FWD_THREADS = 256
    STEP_FWD_V2_IMGS = 2
    #: blocks of step_fwd.cu an SM holds (SF_MIN_BLOCKS: its registers allow 4 x 256 threads)
    STEP_FWD_BLOCKS_PER_SM = 4

    def step_fwd_kernel(self, variant: str | None, batch: int) -> str:
        """The kernel a step_fwd call runs: a variant by name always; the default (variant None, the backend's
        default v1) takes v2's kernel (two images a block) where its blocks still fill every SM's four slots once
        (⌈B/2⌉ ≥ 4 · SMs: batch ≥ 1,055 on 132 SMs), else v1's block per image (more blocks for a latency-bound
        small batch)."""
        v = self._variant("step_fwd", variant)
        fills = ceil_div(batch, self.STEP_FWD_V2_IMGS) >= self.STEP_FWD_BLOCKS_PER_SM * self.sm_count
        return "v2" if variant is None and v == "v1" and fills else v

    def step_fwd(self, images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, mean, std, act,
                 variant=None) -> None:
        """batch_prepare + C1 + act + 2×2 max pool + C3 + act + 2×2 max pool (LeNet-5's geometry), and this
        step's schedule row into srow: one launch (kernels/step_fwd.cu), a block per image (v1) or per two
        images (v2: ``step_fwd_kernel``)."""
        key = ("step_fwd", variant, images.shape, perm.shape, sched.shape, x.shape, float(mean), float(std), act)
        e = self._plans.get(key)
        if e is None:
            v = self.step_fwd_kernel(variant, x.shape[0])
            check_act(act)
            n = images.shape[0]
            b = x.shape[0]
            (m,) = perm.shape
            if m < 1 or b < 1:
                raise ValueError("step_fwd: empty permutation or batch")
            if sched.ndim != 2 or sched.shape[1] != SCHED_COLS or sched.shape[0] < 1:
                raise ValueError(f"step_fwd: sched must be (T, {SCHED_COLS}), got {tuple(sched.shape)}")
            u8 = np.uint8
            expect = (_arg("images", (n, 28, 28), u8), _arg("labels", (n,), u8), _arg("perm", (m,), np.int32),
                      _arg("state", (STATE_WORDS,), np.int32), _arg("sched", tuple(sched.shape)),
                      _arg("srow", (SCHED_COLS,)), _arg("x", (b, 1, 32, 32)), _arg("y", (b,), np.int32),
                      _arg("w1", (6, 1, 5, 5)), _arg("b1", (6,)), _arg("p1", (b, 6, 14, 14)),
                      _arg("m1", (b, 6, 14, 14), u8), _arg("w3", (16, 6, 5, 5)), _arg("b3", (16,)),
                      _arg("p3", (b, 16, 5, 5)), _arg("m3", (b, 16, 5, 5), u8))
            tail = (i32(m), i32(sched.shape[0]), i32(ACT_CODES[act]), f32(1.0 / (255.0 * std)), f32(-mean / std))
            if v == "v2":
                tail += (i32(b),)
            grid = b if v == "v1" else ceil_div(b, self.STEP_FWD_V2_IMGS)
            launch = Launch((grid, 1, 1), (self.STEP_FWD_THREADS, 1, 1))
            e = self._plans[key] = _Entry(self._kernel("step_fwd", v), launch, tail, expect)
        self._run(e, (images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3))

    def _update_entry(self, op: str, variant: str | None, names: tuple[str, ...], p: Any, gpart: Any,
                      tail: tuple) -> _Entry:
        v = self._variant(op, variant)
        (size,) = p.shape
        if gpart.ndim != 2 or gpart.shape[0] < 1:
            raise ValueError(f"{op}: gpart must be (S >= 1, conv_prefix), got {tuple(gpart.shape)}")
        s, nc = (int(d) for d in gpart.shape)
        if nc % 4 or nc > size:
            raise ValueError(f"{op}: gpart's row length {nc} must be a multiple of 4 and at most {size}")
        expect = (_arg("p", (size,)), _arg("g", (size,)), _arg("gpart", (s, nc)),
                  *(_arg(nm, (size,)) for nm in names), _arg("srow", (SCHED_COLS,)),
                  _arg("state", (STATE_WORDS,), np.int32))
        # adam_step_v2's grid (a thread per float4, the grid covering the SMs); float4 loads: 16-byte aligned
        plan = self.plan("adam_step", "v2", n=size)
        return _Entry(self._kernel(op, v), plan, (i32(size), i32(nc), i32(s), *tail), expect, aligned=3 + len(names))

    def step_adam(self, p, g, gpart, m, v, srow, state, batch, beta1, beta2, eps, weight_decay, variant=None) -> None:
        """g[:NC] = Σ_s gpart[s] (float32, group order), Adam with [lr, bc1, bc2] = srow[:3], step_advance: one
        launch (kernels/step_update.cu)."""
        key = ("step_adam", variant, p.shape, gpart.shape, int(batch), beta1, beta2, eps, weight_decay)
        e = self._plans.get(key)
        if e is None:
            e = self._plans[key] = self._update_entry(
                "step_adam", variant, ("m", "v"), p, gpart,
                (f32(beta1), f32(beta2), f32(eps), f32(weight_decay), i32(batch)))
        self._run(e, (p, g, gpart, m, v, srow, state))

    def step_sgd(self, p, g, gpart, m, srow, state, batch, momentum, weight_decay, variant=None) -> None:
        """g[:NC] = Σ_s gpart[s] (float32, group order), SGD with momentum with lr = srow[0], step_advance: one
        launch (kernels/step_update.cu)."""
        key = ("step_sgd", variant, p.shape, gpart.shape, int(batch), momentum, weight_decay)
        e = self._plans.get(key)
        if e is None:
            e = self._plans[key] = self._update_entry(
                "step_sgd", variant, ("m",), p, gpart, (f32(momentum), f32(weight_decay), i32(batch)))
        self._run(e, (p, g, gpart, m, srow, state))
