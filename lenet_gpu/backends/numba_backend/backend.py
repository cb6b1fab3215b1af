"""NumbaBackend: the Backend protocol (lenet_gpu.backends.base) over the Numba CUDA kernels of this
package — device memory, counters, and one thin launch wrapper per op.

Each wrapper checks shapes, dtypes, contiguity and that every array is a device array (Numba would
silently copy a host NumPy array to the device and back), takes the preallocated output, computes the
grid with ``ceil_div``, passes explicitly typed scalars (np.float32 / np.int32, so a launch never
types a scalar as float64 or int64), and launches once. Everything runs on the default stream, so a
training step needs no synchronisation. Nothing that changes from step to step is an argument: the
ops read the step state (lenet_gpu.stepstate) on the device, so ``record`` replays a step's launches
with no per-launch work on the host and ``graph`` captures many steps as one CUDA graph (launch.py).
Under ``NUMBA_ENABLE_CUDASIM=1`` the same code runs in Numba's CUDA simulator (``is_gpu`` is False then).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import cuda

from ...stepstate import SCHED_COLS, STATE_WORDS
from .. import base as _base
from ..base import ACT_CODES, OPS, OPTIONAL_OPS, POOL_CODES, BackendUnavailable, Counters, check_act, check_mode
from . import batch, conv2d, dense, loss, optim, pool2x2
from . import head as _head
from . import kernel_cache as _kernel_cache
from . import launch as _launchmod
from . import lenet_fwd as _lenet_fwd
from . import routed as _routed
from . import step4_bwd as _step4_bwd
from . import step4_fwd as _step4_fwd
from ._compat import import_cuda_array_module
from .common import allow_shared, ceil_div, div_magic

if not numba.config.ENABLE_CUDASIM:
    import_cuda_array_module()  # before the first compile: NumPy 2.5 and numba-cuda 0.30 (see _compat)

MODULES = (batch, conv2d, pool2x2, dense, loss, optim)
#: every kernel by name (``<op>_v<N>``) and the launch signature the wrappers use
KERNELS: dict[str, Any] = {}
SIGNATURES: dict[str, str] = {}
VARIANTS: dict[str, tuple[str, ...]] = {}
for _m in MODULES:
    KERNELS.update(_m.KERNELS)
    SIGNATURES.update(_m.SIGNATURES)
    VARIANTS.update(_m.VARIANTS)
assert set(OPS) <= set(VARIANTS) <= set(OPS) | set(OPTIONAL_OPS), sorted(set(OPS) ^ set(VARIANTS))
assert set(KERNELS) == set(SIGNATURES) == {f"{op}_{v}" for op, vs in VARIANTS.items() for v in vs}

#: the variant each op uses by default: the faster design where there is one (chosen by design; the
#: benchmarks on a GPU decide in the end)
DEFAULT_VARIANTS = {op: vs[-1] for op, vs in VARIANTS.items()}

#: the fused dense head (head.py: head_train, two kernels) and the whole-network forward (lenet_fwd.py): their
#: kernels launch through NumbaBackend._launch too, found here by name (their compile checks are their own)
FUSED_KERNELS: dict[str, Any] = {**_head.KERNELS, **_lenet_fwd.KERNELS, **_routed.KERNELS}
FUSED_KERNELS.update(_step4_fwd.KERNELS)  # the four-kernel step's forward and update (docs/step4.md)
#: the routed backward (routed.py, docs/routed_backward.md): its ops are advertised in ``variants`` (so the
#: model takes the routed step with max pooling) as the protocol names them (base.ROUTED_OPS)
ROUTED_OPS: tuple[str, ...] = tuple(op for op in _routed.VARIANTS if op in getattr(_base, "ROUTED_OPS", ()))
FUSED_VARIANTS: dict[str, tuple[str, ...]] = {**_head.VARIANTS, **_lenet_fwd.VARIANTS,
                                              **{op: _routed.VARIANTS[op] for op in ROUTED_OPS}}
#: the four-kernel step's ops (docs/step4.md; step4_fwd.py: step_fwd, step_adam, step_sgd; step4_bwd.py: step_bwd):
#: launched through _launch like the fused ops, advertised in ``variants`` as base.STEP_OPS names them (the model
#: takes the four-kernel step only where all of them are)
FUSED_KERNELS.update(_step4_bwd.KERNELS)
FUSED_VARIANTS.update(_step4_bwd.VARIANTS)
FUSED_VARIANTS.update({op: vs for op, vs in _step4_fwd.VARIANTS.items() if op in getattr(_base, "STEP_OPS", ())})
#: their defaults, as each module names them (not always its last variant: head_train's is v3, whose plan runs v4's
#: rows kernel at large batches; step_fwd's is v1, whose default plan runs v2's kernel there)
FUSED_DEFAULTS: dict[str, str] = {op: vs[-1] for op, vs in FUSED_VARIANTS.items()}
for _m in (_head, _lenet_fwd, _routed, _step4_bwd, _step4_fwd):
    FUSED_DEFAULTS.update({op: v for op, v in _m.DEFAULT_VARIANTS.items() if op in FUSED_VARIANTS})


def all_dispatchers() -> list[Any]:
    """Every kernel dispatcher of the backend (its ops', the fused ops' and the routed ops')."""
    return list({id(k): k for k in (*KERNELS.values(), *FUSED_KERNELS.values())}.values())


def _kernel(name: str) -> Any:
    k = KERNELS.get(name)
    return FUSED_KERNELS[name] if k is None else k

#: threads per block of the one-thread-per-element (grid-stride) kernels
THREADS = 256
#: conv2d_fwd_v2 threads per block (pixels of one image plane per work item)
CONV_FWD_V2_THREADS = 128
#: conv2d_bwd_data_v2 threads per block (pixels of one input plane per work item)
CONV_BWD_DATA_V2_THREADS = 128
#: the most dynamic shared memory a launch may ask for without opting in
MAX_DYNAMIC_SMEM = 48 * 1024

UNAVAILABLE = (
    "numba backend: no CUDA GPU found (numba.cuda.is_available() is False); use --backend numpy, "
    "or set NUMBA_ENABLE_CUDASIM=1 for tiny debugging runs in Numba's CUDA simulator"
)


def simulator_enabled() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)


if simulator_enabled():
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _DeviceArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DeviceArray


def _band_rows(ho: int, wo: int, r: int) -> int:
    """conv2d_fwd_v3: the most input rows a chunk of CONV_FWD_V2_THREADS output pixels reads."""
    return min(ho, (CONV_FWD_V2_THREADS - 1) // wo + 2) + r - 1


def conv_fwd_chunks(variant: str, yshape: tuple[int, ...], wshape: tuple[int, ...]) -> tuple[int, int]:
    """(channels per shared-memory chunk, floats of the weight slot) of conv2d_fwd_v2/v3."""
    _, _, ho, wo = yshape
    _, c, r, s = wshape
    if variant == "v2":
        cb = max(1, min(c, conv2d.FWD_SMEM_FLOATS // (conv2d.KB * r * s)))
    else:
        per_channel = conv2d.KB * r * s + _band_rows(ho, wo, r) * (wo + s - 1)
        cb = max(1, min(c, conv2d.V3_SMEM_FLOATS // per_channel))
    return cb, conv2d.KB * cb * r * s


def _pool_band_rows(ho: int, wo: int, r: int) -> int:
    """conv2d_pool_fwd_v2: the most input rows a chunk of CONV_FWD_V2_THREADS windows reads."""
    return min(ho, 2 * ((CONV_FWD_V2_THREADS - 1) // ((wo + 1) // 2) + 2)) + r - 1


def conv_pool_chunks(yshape: tuple[int, ...], wshape: tuple[int, ...]) -> tuple[int, int, int]:
    """conv2d_pool_fwd_v2: (channels per chunk, floats of the weight slot, shared bytes)."""
    _, _, ho, wo = yshape
    _, c, r, s = wshape
    band = _pool_band_rows(ho, wo, r) * (wo + s - 1)
    cb = max(1, min(c, conv2d.V3_SMEM_FLOATS // (conv2d.PKB * r * s + band)))
    wslot = conv2d.PKB * cb * r * s
    # + one input row and one float: the missing tap of an odd output's last window reads past the band
    return cb, wslot, (wslot + cb * band + wo + s) * 4


def bwd_data_chunk(wshape: tuple[int, ...]) -> int:
    """conv2d_bwd_data_v2 and conv2d_bwd_data_pool_v2: filters per shared-memory chunk."""
    k, _, r, s = wshape
    return max(1, min(k, conv2d.BWD_DATA_SMEM_FLOATS // (conv2d.CB * r * s)))


#: the SM count launch shapes are sized for where no device can be asked (an H100 / H200 SXM)
DEFAULT_SM_COUNT = 132
_sm_count: int | None = None


def sm_count() -> int:
    """The current device's multiprocessor count, asked once; DEFAULT_SM_COUNT without a device (and in
    the simulator)."""
    global _sm_count
    if _sm_count is None:
        n = DEFAULT_SM_COUNT
        if not simulator_enabled():
            try:
                if cuda.is_available():
                    n = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
            except Exception:  # noqa: BLE001 - no usable device: the documented default
                pass
        _sm_count = n
    return _sm_count


#: the occupancy the int32 kernels are built for (≤ 64 registers: half of an SM's 2048 threads)
TARGET_OCCUPANCY = 0.5


def wave_blocks(block_threads: int) -> int:
    """Blocks of ``block_threads`` that fill every SM to TARGET_OCCUPANCY once: one wave."""
    return sm_count() * max(1, int(2048 * TARGET_OCCUPANCY) // block_threads)


#: conv2d_bwd_weight_v3: the fewest positions a thread reduces in a split (below, the split's own
#: tree reduction and ticket cost more than they save)
BW_MIN_PER_THREAD = 8


def bw_splits(dw_shape: tuple[int, ...], dz_shape: tuple[int, ...]) -> int:
    """conv2d_bwd_weight_v3: splits of the batch's positions per (k, column chunk) item, so that the grid
    is about a wave (wave_blocks) and each thread still reduces BW_MIN_PER_THREAD positions or more."""
    k, c, r, s = dw_shape
    n, _, ho, wo = dz_shape
    items = k * ceil_div(c * r * s + 1, conv2d.BW_COLS)
    most = max(1, n * ho * wo // (conv2d.BW_THREADS * BW_MIN_PER_THREAD))
    return max(1, min(ceil_div(wave_blocks(conv2d.BW_THREADS), items), most))


def launch_config(op: str, variant: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, Any, int]:
    """(blocks, block, dynamic shared bytes) of a launch of ``op``/``variant`` at the given shapes,
    before any cap on the grid. ``shapes`` names the arrays of the op as the wrappers do."""
    if op == "batch_prepare":
        return ceil_div(math.prod(shapes["x"]), THREADS), THREADS, 0
    if op == "conv2d_fwd":
        n, k, ho, wo = shapes["y"]
        if variant == "v1":
            return ceil_div(n * k * ho * wo, THREADS), THREADS, 0
        items = n * ceil_div(k, conv2d.KB) * ceil_div(ho * wo, CONV_FWD_V2_THREADS)
        cb, wslot = conv_fwd_chunks(variant, shapes["y"], shapes["w"])
        if variant == "v2":
            return items, CONV_FWD_V2_THREADS, wslot * 4
        _, _, r, s = shapes["w"]
        return items, CONV_FWD_V2_THREADS, (wslot + cb * _band_rows(ho, wo, r) * (wo + s - 1)) * 4
    if op == "conv2d_pool_fwd":
        n, k, ho, wo = shapes["y"]
        windows = ((ho + 1) // 2) * ((wo + 1) // 2)
        if variant == "v1":
            return ceil_div(n * k * windows, THREADS), THREADS, 0
        items = n * ceil_div(k, conv2d.PKB) * ceil_div(windows, CONV_FWD_V2_THREADS)
        return items, CONV_FWD_V2_THREADS, conv_pool_chunks(shapes["y"], shapes["w"])[2]
    if op == "conv2d_bwd_data":
        if variant == "v1":
            return ceil_div(math.prod(shapes["dx"]), THREADS), THREADS, 0
        n, c, h, wd = shapes["dx"]
        items = n * ceil_div(c, conv2d.CB) * ceil_div(h * wd, CONV_BWD_DATA_V2_THREADS)
        return items, CONV_BWD_DATA_V2_THREADS, conv2d.CB * bwd_data_chunk(shapes["w"]) * 4 * math.prod(shapes["w"][2:])
    if op == "conv2d_bwd_weight":
        k, c, r, s = shapes["dw"]
        if variant == "v1":
            return ceil_div(k * (c * r * s + 1), THREADS), THREADS, 0
        items = k * ceil_div(c * r * s + 1, conv2d.BW_COLS)
        if variant == "v2":
            return items, conv2d.BW_THREADS, 0
        splits = bw_splits(shapes["dw"], shapes["dz"]) if "dz" in shapes else 1
        return items * splits, conv2d.BW_THREADS, 0
    if op == "conv2d_bwd_data_pool":
        if variant == "v1":
            return ceil_div(math.prod(shapes["dzb"]), THREADS), THREADS, 0
        n, c, h, wd = shapes["dzb"]
        k, _, r, s = shapes["w"]
        items = ceil_div(c, conv2d.CB) * ceil_div(n * (h // 2) * (wd // 2), CONV_BWD_DATA_V2_THREADS)
        return items, CONV_BWD_DATA_V2_THREADS, conv2d.CB * bwd_data_chunk(shapes["w"]) * r * s * 4
    if op == "conv2d_bwd_weight_routed":  # shapes: dw, and gz (the pooled gradient) when known
        k, c, r, s = shapes["dw"]
        if variant == "v1":
            return ceil_div(k * (c * r * s + 1), THREADS), THREADS, 0
        items = k * ceil_div(c * r * s + 1, _routed.RW_COLS)
        splits = bw_splits(shapes["dw"], shapes["gz"]) if "gz" in shapes else 1
        return items * splits, _routed.RW_THREADS, 0
    if op == "conv2d_bwd_data_routed":  # shapes: gzb (the gradient below: the conv's input), w
        n, c, h, wd = shapes["gzb"]
        k, _, r, s = shapes["w"]
        items = ceil_div(c, _routed.RCB) * ceil_div(n * h * wd, _routed.RD_THREADS)
        return items, _routed.RD_THREADS, _routed.RCB * _routed.data_chunk(shapes["w"]) * r * s * 4
    if op == "pool2x2_fwd":
        return ceil_div(math.prod(shapes["y"]), THREADS), THREADS, 0
    if op == "pool2x2_bwd":
        return ceil_div(math.prod(shapes["dz"]), THREADS), THREADS, 0
    if op == "dense_fwd":
        n, o = shapes["y"]
        if variant == "v1":
            return ceil_div(n * o, THREADS), THREADS, 0
        return ceil_div(n, dense.TILE) * ceil_div(o, dense.TILE), (dense.TILE, dense.TILE), 0
    if op == "dense_bwd":
        n, i = shapes["x"]
        o = shapes["w"][0]
        if variant == "v1":
            return ceil_div((n * i if shapes.get("dx") else 0) + o * i + o, THREADS), THREADS, 0
        t = dense.TILE
        tiles = (ceil_div(n, t) * ceil_div(i, t) if shapes.get("dx") else 0) + ceil_div(o, t) * ceil_div(i + 1, t)
        return tiles, (t, t), 0
    if op == "softmax_xent":
        return 1, loss.SM_THREADS, 0
    if op == "step_advance":
        return 1, 1, 0
    if op in ("adam_step", "sgd_step"):
        return ceil_div(shapes["p"][0], THREADS), THREADS, 0
    raise ValueError(f"unknown op {op!r}")


def lenet_launches(
    batch: int, training: bool = True, variants: dict[str, str] | None = None, f6: int = 84, optimizer: str = "adam"
) -> list[tuple[str, str, int, Any, int]]:
    """(op, variant, grid blocks, block, dynamic shared bytes) of every launch of one LeNet-5 training step
    (or, ``training=False``, one inference pass: lenet_fwd, or batch_prepare, the two conv+pool layers and
    the three dense layers), as the wrappers launch them with ``variants`` (op → variant; default: every
    op of the backend with its default; an optional op missing from it is not fused). Grids before any
    cap. The simulator tests compare this plan with the launches a step makes."""
    v = dict({**DEFAULT_VARIANTS, **FUSED_DEFAULTS} if variants is None else variants)
    b = batch
    out: list[tuple[str, str, int, Any, int]] = []

    def add(op: str, **shapes: Any) -> None:
        var = v[op]
        grid, block, sh = launch_config(op, var, shapes)
        if var != "v1" and sh > MAX_DYNAMIC_SMEM:  # the wrappers step down to a variant that fits
            var = "v1" if op != "conv2d_fwd" else next(
                c for c in ("v3", "v2", "v1") if launch_config(op, c, shapes)[2] <= MAX_DYNAMIC_SMEM)
            grid, block, sh = launch_config(op, var, shapes)
        out.append((op, var, grid, block, sh))

    if not training and "lenet_fwd" in v:  # the whole forward pass in one launch
        blocks, threads, smem = _lenet_fwd.launch_shape(v["lenet_fwd"], b, 120, f6, sm_count())
        kname = _lenet_fwd.launch_kernel_name(v["lenet_fwd"], b, 120, f6, sm_count())  # v3's plan: v4 at large b
        out.append(("lenet_fwd", kname[len("lenet_fwd_"):], blocks, threads, smem))
        return out
    routed = training and "head_train" in v and all(op in v for op in _routed.VARIANTS)
    step4 = routed and all(op in v for op in getattr(_base, "STEP_OPS", ()))
    if step4:  # the four-kernel step (docs/step4.md): step_fwd, head_train (2 kernels), step_bwd, step_adam/sgd
        from ...spec import NetConfig, param_layout

        upd = "step_adam" if optimizer == "adam" else "step_sgd"
        ublocks, uthreads = _step4_fwd.update_plan(param_layout(NetConfig(f6=f6))[1], sm_count())
        sk = _step4_fwd.step_fwd_kernel(None, b, sm_count(), default=v["step_fwd"])  # the op's default plan
        return [("step_fwd", sk, _step4_fwd.step_fwd_grid(sk, b), _step4_fwd.SF_THREADS, _step4_fwd.step_fwd_smem(sk)),
                *_head.launches(v["head_train"], b, nh2=f6),
                ("step_bwd", v["step_bwd"], _step4_bwd.step_groups(b, sm_count()), _step4_bwd.THREADS, 0),
                (upd, v[upd], ublocks, uthreads, 0)]
    add("batch_prepare", x=(b, 1, 32, 32))
    for yshape, wshape in (((b, 6, 28, 28), (6, 1, 5, 5)), ((b, 16, 10, 10), (16, 6, 5, 5))):
        if "conv2d_pool_fwd" in v:
            add("conv2d_pool_fwd", y=yshape, w=wshape)
        else:
            add("conv2d_fwd", y=yshape, w=wshape)
            add("pool2x2_fwd", y=(b, yshape[1], yshape[2] // 2, yshape[3] // 2))
    if training and "head_train" in v:  # C5 → F6 → output → loss → back to C3: two kernels
        out.extend(_head.launches(v["head_train"], b, nh2=f6))  # head.py's plan (v2, v3: cupy's)
        if routed:  # the routed step (docs/routed_backward.md): gradients at the pooled size + the routes
            add("conv2d_bwd_weight_routed", dw=(16, 6, 5, 5), gz=(b, 16, 5, 5))
            add("conv2d_bwd_data_routed", gzb=(b, 6, 14, 14), w=(16, 6, 5, 5))
            add("conv2d_bwd_weight_routed", dw=(6, 1, 5, 5), gz=(b, 6, 14, 14))
    else:
        for o in (120, f6, 10):
            add("dense_fwd", y=(b, o))
        if not training:
            return out
        add("softmax_xent")
        for i, o in ((f6, 10), (120, f6), (400, 120)):
            add("dense_bwd", x=(b, i), w=(o, i), dx=True)
        add("pool2x2_bwd", dz=(b, 16, 10, 10))
    if not routed:
        add("conv2d_bwd_weight", dw=(16, 6, 5, 5), dz=(b, 16, 10, 10))
        if "conv2d_bwd_data_pool" in v:
            add("conv2d_bwd_data_pool", dzb=(b, 6, 28, 28), w=(16, 6, 5, 5))
        else:
            add("conv2d_bwd_data", dx=(b, 6, 14, 14), w=(16, 6, 5, 5))
            add("pool2x2_bwd", dz=(b, 6, 28, 28))
        add("conv2d_bwd_weight", dw=(6, 1, 5, 5), dz=(b, 6, 28, 28))
    from ...spec import NetConfig, param_layout

    add("adam_step" if optimizer == "adam" else "sgd_step", p=(param_layout(NetConfig(f6=f6))[1],))
    add("step_advance")
    return out


class NumbaBackend:
    """Numba CUDA kernels on a GPU, or in the CUDA simulator under ``NUMBA_ENABLE_CUDASIM=1``.

    ``max_blocks`` caps the grid of every launch (every kernel loops over its work with a grid- or
    block-stride loop, so any grid is correct); it exists for the simulator, which runs one Python
    thread per CUDA thread. ``debug=True`` synchronises after each launch so an error names its op.
    ``fuse_conv_pool=False`` leaves out the optional fused op conv2d_pool_fwd, so the model launches
    conv2d_fwd and pool2x2_fwd separately; ``fuse_bwd_data_pool=False`` leaves out conv2d_bwd_data_pool
    (conv2d_bwd_data and pool2x2_bwd then); a step of the unfused ops is 19 launches, 16 with both.
    ``quick_simulation=True`` (what ``get_backend("numba")`` passes) makes a simulator run practical:
    under ``NUMBA_ENABLE_CUDASIM=1`` every op defaults to its v1 kernel and a launch has at most 2
    blocks (the simulator runs a Python thread per CUDA thread and a barrier of a faster variant costs
    ~50 ms; a batch-4 training step drops from ~230 s to ~20 s). It changes nothing on a GPU.
    """

    name = "numba"

    def __init__(
        self,
        max_blocks: int | None = None,
        debug: bool = False,
        fuse_conv_pool: bool = True,
        quick_simulation: bool = False,
        fuse_bwd_data_pool: bool = True,
    ) -> None:
        self.simulator = simulator_enabled()
        if not self.simulator and not cuda.is_available():
            raise BackendUnavailable(UNAVAILABLE)
        self.is_gpu = not self.simulator
        if self.is_gpu and "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
            _quiet_low_occupancy_warnings()
        #: kernels whose compiled code is cached on disk (kernel_cache.py; 0 in the simulator or when off)
        self.cached_kernels = _kernel_cache.enable(all_dispatchers()) if self.is_gpu else 0
        self.counters = Counters()
        self.variants: dict[str, tuple[str, ...]] = {**VARIANTS, **FUSED_VARIANTS}
        self.default_variants: dict[str, str] = {**DEFAULT_VARIANTS, **FUSED_DEFAULTS}
        for op, keep in (("conv2d_pool_fwd", fuse_conv_pool), ("conv2d_bwd_data_pool", fuse_bwd_data_pool)):
            if not keep:  # the model uses a fused op when the backend lists it
                del self.variants[op], self.default_variants[op]
        self.max_blocks = max_blocks
        #: the SMs launch shapes are sized for (the device's; DEFAULT_SM_COUNT without one): lenet_fwd's plan
        self.sm_count: int = sm_count()
        if self.simulator and quick_simulation:
            self.default_variants = {op: "v1" for op in self.default_variants}
            self.max_blocks = max_blocks or 2
        self.debug = debug
        #: when a list, every launch appends (kernel name, Numba types of its arguments): the tests
        #: compare them with SIGNATURES, the types the compile checks use
        self.launch_log: list[tuple[str, tuple[Any, ...]]] | None = None
        self._dummy_u8: Any = None  # argmax stand-in for avg pooling when the caller passes None
        self._flat: dict[int, tuple[Any, Any]] = {}  # id(x) → (x, flat view of x)
        self._scratch: dict[tuple[int, int], tuple[Any, Any, Any]] = {}  # conv2d_bwd_weight_v3's, per dw
        self._state0: Any = None  # the state conv2d_bwd_weight_v3 tags its tickets with when given none
        #: while ``record`` runs a step for the first time: the prepared launches, in order
        self._recording: list[Any] | None = None
        #: while ``graph`` captures: the capturing stream (launches go there, prepared, not through Numba)
        self._capture: Any = None
        self._default_stream: Any = _launchmod.cu_stream(0) if self.is_gpu and _launchmod.bindings_available() else None
        self._capture_stream: Any = None  # the Numba stream graphs are captured on (created at first use)

    # ------------------------------------------------------------------ memory
    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        self.counters.allocs += 1
        return cuda.device_array(tuple(int(s) for s in np.atleast_1d(shape)), dtype=np.dtype(dtype))

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        # Numba has no device memset: the zeros are copied from the host (one allocation + one h2d)
        self.counters.allocs += 1
        self.counters.h2d += 1
        return cuda.to_device(np.zeros(shape, dtype=dtype))

    def to_device(self, host: np.ndarray) -> Any:
        if not isinstance(host, np.ndarray):
            raise TypeError(f"to_device takes a NumPy array, got {type(host).__name__}")
        self.counters.allocs += 1
        self.counters.h2d += 1
        return cuda.to_device(np.ascontiguousarray(host))

    def upload(self, dst: Any, host: np.ndarray) -> None:
        host = np.asarray(host)
        if tuple(dst.shape) != host.shape:
            raise ValueError(f"upload: shape {host.shape} does not match {tuple(dst.shape)}")
        self.counters.h2d += 1
        dst.copy_to_device(np.ascontiguousarray(host, dtype=dst.dtype))

    def to_host(self, arr: Any) -> np.ndarray:
        self.counters.d2h += 1
        return arr.copy_to_host()

    def synchronize(self) -> None:
        self.counters.syncs += 1
        cuda.synchronize()

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A callable equivalent to ``fn`` (ops only, the same arguments at every call). Its first call runs
        ``fn`` and prepares each launch (launch.PreparedLaunch: the compiled kernel, its parameters packed
        once); later calls issue the prepared launches with one cuLaunchKernel each, no typing, checks or
        conversions. Under the simulator a replay calls the simulated kernels with the recorded arguments.
        The counters count every replayed launch."""
        return _Recorded(self, fn)

    def launch_list(self, fn: Callable[[], None]) -> list[tuple[str, Callable[[], None]]]:
        """fn's kernel launches, run once and recorded (as ``record`` does), each as (kernel name, a callable that
        issues that one launch again): the self-test's per-kernel profile without CUPTI times them one at a time."""
        rec = _Recorded(self, fn)
        rec()
        out = []
        for launch in rec.launches or []:
            # a PreparedLaunch on a GPU; (kernel, grid, block, shmem, args) under the simulator
            name = launch.name if self.is_gpu else getattr(launch[0], "__name__", str(launch[0]))
            out.append((str(name), self._replay_fn([launch])))
        return out

    def _replay_fn(self, launches: list[Any]) -> Callable[[], None]:
        if not self.is_gpu:
            def replay_sim() -> None:
                for kernel, grid, block, sh, args in launches:
                    kernel[grid, block, 0, sh](*args)

            return replay_sim
        if self._default_stream is None or self.debug:
            def replay_slow() -> None:  # cuda.bindings missing, or debug: each launch is checked
                for p in launches:
                    p.issue(self._current_stream())
                    if self.debug:
                        cuda.synchronize()

            return replay_slow
        return _launchmod.replay_fn(launches, self._current_stream)

    def _current_stream(self) -> Any:
        return self._default_stream if self._capture is None else self._capture

    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None] | None:
        """A callable that runs ``fn`` ``steps`` times as one CUDA graph: at its first call the launches of
        ``steps`` calls of fn are captured on a private stream (prepared launches, as ``record`` issues
        them) and the graph is instantiated; every call (the first included) is one cuGraphLaunch on the
        default stream. fn must have run once before (compiles). None under the simulator or where the
        CUDA driver bindings are missing. The counters count the graph's kernels as launches."""
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"graph: steps must be >= 1, got {steps}")
        if not self.is_gpu or self._default_stream is None:
            return None
        slot: dict[str, Any] = {}

        def run() -> None:
            g = slot.get("graph")
            if g is None:
                g = slot["graph"] = self._capture_graph(fn, steps)
            else:
                self.counters.launches += g.launches
            g.launch(self._current_stream())

        return run

    def _capture_graph(self, fn: Callable[[], None], steps: int) -> Any:
        if self._capture is not None:
            raise RuntimeError("graph: already capturing (a graph inside a graph is not supported)")
        if self._capture_stream is None:
            self._capture_stream = cuda.stream()  # blocking: ordered with the legacy default stream
        stream = _launchmod.cu_stream(int(self._capture_stream.handle))
        before = self.counters.launches
        _launchmod.begin_capture(stream)
        self._capture = stream
        ok = False
        try:
            for _ in range(steps):
                fn()
            ok = True
        finally:
            self._capture = None
            g = _launchmod.end_capture(stream, self.counters.launches - before, ok)
        return g

    # ------------------------------------------------------------------ launch plumbing
    def _variant(self, op: str, variant: str | None) -> str:
        v = self.default_variants[op] if variant is None else variant
        if v not in self.variants[op]:
            raise ValueError(f"{op}: unknown variant {v!r}; choose one of {', '.join(self.variants[op])}")
        return v

    def _launch(self, op: str, variant: str, grid: int, block: Any, shmem: int, *args: Any, kernel: Any = None) -> None:
        """Launch kernel ``<op>_<variant>`` (every launch of the backend, and of the fused-op modules, goes
        through here): eagerly through Numba; while ``record`` records, also prepared for replay; while
        ``graph`` captures, prepared and issued onto the capturing stream. ``kernel``: the dispatcher to launch
        where it is not the table's (head.py's head_train_v3 compiled for another geometry than LeNet-5's)."""
        name = f"{op}_{variant}"
        k = _kernel(name) if kernel is None else kernel
        if self.max_blocks is not None:
            grid = min(grid, self.max_blocks)
        grid = max(1, grid)
        self.counters.launches += 1
        if self.launch_log is not None:
            self.launch_log.append((name, tuple(numba.typeof(a) for a in args)))
        if shmem > MAX_DYNAMIC_SMEM:  # lenet_fwd_v4 at 16 images: the kernel opted in first (once; simulated: no-op)
            allow_shared(k, args, shmem)
        if self._capture is not None:
            prepared = _launchmod.PreparedLaunch.for_gpu(name, k, grid, block, shmem, args)
            prepared.issue(self._capture)
        else:
            k[grid, block, 0, shmem](*args)
            if self.debug:
                cuda.synchronize()
            if self._recording is None:
                return
            if self.is_gpu:
                prepared = _launchmod.PreparedLaunch.for_gpu(name, k, grid, block, shmem, args)
            else:
                prepared = (k, grid, block, shmem, args)
        if self._recording is not None:
            self._recording.append(prepared)

    def _flat_view(self, x: Any) -> Any:
        hit = self._flat.get(id(x))
        if hit is None or hit[0] is not x:
            if len(self._flat) >= 64:  # a model has a few such inputs; tests make many
                self._flat.clear()
            hit = self._flat[id(x)] = (x, x.reshape(x.size))
        return hit[1]

    def _uint8_dummy(self) -> Any:
        if self._dummy_u8 is None:
            self._dummy_u8 = self.empty((1, 1, 1, 1), np.uint8)
        return self._dummy_u8

    # ------------------------------------------------------------------ ops
    def batch_prepare(
        self, images: Any, labels: Any, perm: Any, state: Any, x: Any, y: Any, mean: float, std: float,
        variant: str | None = None,
    ) -> None:
        v = self._variant("batch_prepare", variant)
        _dev("images", images, np.uint8, 3)
        _dev("labels", labels, np.uint8, 1)
        _dev("perm", perm, np.int32, 1)
        _state("state", state)
        _dev("x", x, np.float32, 4)
        _dev("y", y, np.int32, 1)
        b = x.shape[0]
        _shape("x", x, (b, 1, x.shape[2], x.shape[3]))
        _shape("y", y, (b,))
        _shape("labels", labels, (images.shape[0],))
        if x.shape[2] < images.shape[1] or x.shape[3] < images.shape[2]:
            raise ValueError(f"batch_prepare: x {x.shape} is smaller than the images {images.shape}")
        if perm.shape[0] == 0:
            raise ValueError("batch_prepare: perm is empty")
        scale, shift = np.float32(1.0 / (255.0 * std)), np.float32(-mean / std)
        grid, block, sh = launch_config("batch_prepare", v, {"x": x.shape})
        self._launch("batch_prepare", v, grid, block, sh, images, labels, perm, state, x, y, scale, shift)

    def _int32_variant(self, op: str, v: str, variant: str | None, *arrays: Any) -> str:
        """The int32-offset variants (all but v1) need every array under 2³¹ elements: otherwise the
        default steps down to v1 (int64 indexing); an explicitly asked variant is an error."""
        if v == "v1" or all(a.size < 2**31 for a in arrays):
            return v
        if variant is not None:
            raise ValueError(f"{op}_{v}: an array has 2³¹ elements or more (int32 offsets); use v1")
        return "v1"

    def conv2d_fwd(self, x: Any, w: Any, b: Any, y: Any, act: str, variant: str | None = None) -> None:
        v = self._variant("conv2d_fwd", variant)
        check_act(act)
        _dev("x", x, np.float32, 4)
        _dev("w", w, np.float32, 4)
        _dev("b", b, np.float32, 1)
        _dev("y", y, np.float32, 4)
        n, c, h, wd = x.shape
        k, _, r, s = w.shape
        _shape("w", w, (k, c, r, s))
        _shape("b", b, (k,))
        _shape("y", y, (n, k, h - r + 1, wd - s + 1))
        shapes = {"y": y.shape, "w": w.shape}
        if variant is None and launch_config("conv2d_fwd", v, shapes)[2] > MAX_DYNAMIC_SMEM:
            # the default's shared memory does not fit these shapes: the next variant down that fits
            order = self.variants["conv2d_fwd"]
            v = next(c for c in order[order.index(v) :: -1] if launch_config("conv2d_fwd", c, shapes)[2]
                     <= MAX_DYNAMIC_SMEM)
        v = self._int32_variant("conv2d_fwd", v, variant, x, y)
        grid, block, sh = launch_config("conv2d_fwd", v, shapes)
        act_code = np.int32(ACT_CODES[act])
        if v == "v1":
            self._launch("conv2d_fwd", v, grid, block, sh, x, w, b, y, act_code)
            return
        if sh > MAX_DYNAMIC_SMEM:
            raise ValueError(f"conv2d_fwd_{v}: these shapes need {sh} bytes of shared memory (> {MAX_DYNAMIC_SMEM})")
        cb, wslot = conv_fwd_chunks(v, y.shape, w.shape)
        args = (self._flat_view(x), self._flat_view(w), b, self._flat_view(y), *_i32(n, c, h, wd, k, r, s), act_code,
                np.int32(cb))
        if v == "v2":
            self._launch("conv2d_fwd", v, grid, block, sh, *args)
        else:
            self._launch("conv2d_fwd", v, grid, block, sh, *args, np.int32(wslot))

    #: the fused dense head and the whole-network forward pass (head.py, lenet_fwd.py: v3 also takes float32
    #: images and fuses the argmax, ``lenet_fwd.features``), and evaluation's device reduction (lenet_eval)
    head_train = _head.head_train
    lenet_fwd = _lenet_fwd.lenet_fwd
    lenet_eval = _lenet_fwd.lenet_eval

    def conv2d_pool_fwd(
        self, x: Any, w: Any, b: Any, yconv: Any | None, ypool: Any, argmax: Any | None, act: str, mode: str,
        variant: str | None = None,
    ) -> None:
        """conv2d_fwd and pool2x2_fwd in one launch: yconv (B,K,Ho,Wo) = act(conv(x, w) + b) (not
        written when None), ypool (B,K,Ho//2,Wo//2) and, for max, argmax = its 2×2/2 subsampling."""
        v = self._variant("conv2d_pool_fwd", variant)
        check_act(act)
        check_mode(mode)
        _dev("x", x, np.float32, 4)
        _dev("w", w, np.float32, 4)
        _dev("b", b, np.float32, 1)
        _dev("ypool", ypool, np.float32, 4)
        n, c, h, wd = x.shape
        k, _, r, s = w.shape
        _shape("w", w, (k, c, r, s))
        _shape("b", b, (k,))
        yshape = (n, k, h - r + 1, wd - s + 1)
        _shape("ypool", ypool, (n, k, yshape[2] // 2, yshape[3] // 2))
        if yconv is not None:
            _dev("yconv", yconv, np.float32, 4)
            _shape("yconv", yconv, yshape)
        if argmax is None:
            if mode == "max":
                raise ValueError("conv2d_pool_fwd: max pooling needs an argmax output")
            argmax = self._uint8_dummy()
        else:
            _dev("argmax", argmax, np.uint8, 4)
            if mode == "max":
                _shape("argmax", argmax, ypool.shape)
        shapes = {"y": yshape, "w": w.shape}
        grid, block, sh = launch_config("conv2d_pool_fwd", v, shapes)
        if v != "v1" and sh > MAX_DYNAMIC_SMEM:
            if variant is not None:
                raise ValueError(f"conv2d_pool_fwd_{v}: these shapes need {sh} bytes of shared memory")
            v = "v1"  # the default does not fit: the simple variant needs no shared memory
        ys = ypool if yconv is None else yconv
        v = self._int32_variant("conv2d_pool_fwd", v, variant, x, ys)
        grid, block, sh = launch_config("conv2d_pool_fwd", v, shapes)
        codes = (np.int32(ACT_CODES[act]), np.int32(POOL_CODES[mode]), np.int32(yconv is not None))
        if v == "v1":
            self._launch("conv2d_pool_fwd", v, grid, block, sh, x, w, b, ys, ypool, argmax, *codes)
        else:
            cb, wslot, _ = conv_pool_chunks(yshape, w.shape)
            f = self._flat_view
            self._launch("conv2d_pool_fwd", v, grid, block, sh, f(x), f(w), b, f(ys), f(ypool), f(argmax),
                         *_i32(n, c, h, wd, k, r, s), *codes, np.int32(cb), np.int32(wslot))

    def conv2d_bwd_data(self, dz: Any, w: Any, dx: Any, variant: str | None = None) -> None:
        v = self._variant("conv2d_bwd_data", variant)
        _dev("dz", dz, np.float32, 4)
        _dev("w", w, np.float32, 4)
        _dev("dx", dx, np.float32, 4)
        n, c, h, wd = dx.shape
        k, _, r, s = w.shape
        _shape("w", w, (k, c, r, s))
        _shape("dz", dz, (n, k, h - r + 1, wd - s + 1))
        grid, block, sh = launch_config("conv2d_bwd_data", v, {"dx": dx.shape, "w": w.shape})
        if v != "v1" and sh > MAX_DYNAMIC_SMEM:
            if variant is not None:
                raise ValueError(f"conv2d_bwd_data_{v}: a {r}x{s} filter needs {sh} bytes of shared memory")
            v = "v1"  # the default does not fit: the simple variant needs no shared memory
        v = self._int32_variant("conv2d_bwd_data", v, variant, dz, dx)
        grid, block, sh = launch_config("conv2d_bwd_data", v, {"dx": dx.shape, "w": w.shape})
        if v == "v1":
            self._launch("conv2d_bwd_data", v, grid, block, sh, dz, w, dx)
            return
        f = self._flat_view
        self._launch("conv2d_bwd_data", v, grid, block, sh, f(dz), f(w), f(dx), *_i32(n, c, h, wd, k, r, s),
                     np.int32(bwd_data_chunk(w.shape)))

    def conv2d_bwd_weight(
        self, x: Any, dz: Any, dw: Any, db: Any, state: Any = None, variant: str | None = None
    ) -> None:
        """dw, db of a convolution (overwritten). ``state`` is the step state: v3's last-block ticket is
        tagged with its STEP (without one, a private zero state: the ticket still resets itself); the
        other variants ignore it."""
        v = self._variant("conv2d_bwd_weight", variant)
        _dev("x", x, np.float32, 4)
        _dev("dz", dz, np.float32, 4)
        _dev("dw", dw, np.float32, 4)
        _dev("db", db, np.float32, 1)
        if state is not None:
            _state("state", state)
        n, c, h, wd = x.shape
        k, _, r, s = dw.shape
        _shape("dw", dw, (k, c, r, s))
        _shape("db", db, (k,))
        _shape("dz", dz, (n, k, h - r + 1, wd - s + 1))
        if v == "v3":
            v = self._int32_variant("conv2d_bwd_weight", v, variant, x, dz)
        grid, block, sh = launch_config("conv2d_bwd_weight", v, {"dw": dw.shape, "dz": dz.shape})
        if v == "v1":
            self._launch("conv2d_bwd_weight", v, grid, block, sh, x, dz, dw, db)
        elif v == "v2":
            self._launch("conv2d_bwd_weight", v, grid, block, sh, self._flat_view(x), dz, dw, db)
        else:
            splits = bw_splits(dw.shape, dz.shape)
            partial, tickets = self._bw_scratch(dw, splits)
            if state is None:
                state = self._zero_state()
            self._launch("conv2d_bwd_weight", v, grid, block, sh, self._flat_view(x), self._flat_view(dz), dw, db,
                         partial, tickets, state, *_i32(n, c, h, wd, k, r, s), np.int32(splits))

    def _bw_scratch(self, dw: Any, splits: int) -> tuple[Any, Any]:
        """conv2d_bwd_weight_v3's partials and tickets for this dw (one pair per call site, allocated at its
        first call; the tickets start at 0 and every launch leaves them at count 0)."""
        key = (id(dw), splits)
        hit = self._scratch.get(key)
        if hit is None or hit[0] is not dw:
            k, c, r, s = dw.shape
            items = k * ceil_div(c * r * s + 1, conv2d.BW_COLS)
            hit = self._scratch[key] = (dw, self.empty((items * splits * conv2d.BW_COLS,)),
                                        self.zeros((items,), np.int64))
        return hit[1], hit[2]

    def _zero_state(self) -> Any:
        if self._state0 is None:
            self._state0 = self.zeros((STATE_WORDS,), np.int32)
        return self._state0

    def conv2d_bwd_data_pool(
        self, dz: Any, w: Any, argmax: Any | None, yconv: Any, dz_below: Any, mode: str, act: str,
        variant: str | None = None,
    ) -> None:
        """dz_below (yconv's shape (B,C,H,W)) = pool2x2_bwd(conv2d_bwd_data(dz, w), argmax, yconv, mode, act):
        the convolution's data gradient routed through the 2×2 pooling below it and that layer's
        activation, in one launch (reference.conv2d_bwd_data_pool). The convolution's input is the
        pooled map (B,C,H//2,W//2); argmax (its shape) is None for avg."""
        v = self._variant("conv2d_bwd_data_pool", variant)
        check_mode(mode)
        check_act(act)
        _dev("dz", dz, np.float32, 4)
        _dev("w", w, np.float32, 4)
        _dev("yconv", yconv, np.float32, 4)
        _dev("dz_below", dz_below, np.float32, 4)
        n, c, h, wd = yconv.shape
        k, _, r, s = w.shape
        _shape("w", w, (k, c, r, s))
        _shape("dz_below", dz_below, yconv.shape)
        hp, wp = h // 2, wd // 2
        if hp < r or wp < s:
            raise ValueError(f"conv2d_bwd_data_pool: the pooled map {(hp, wp)} is smaller than the filter {(r, s)}")
        _shape("dz", dz, (n, k, hp - r + 1, wp - s + 1))
        argmax = self._argmax_arg("conv2d_bwd_data_pool", argmax, mode, (n, c, hp, wp))
        shapes = {"dzb": dz_below.shape, "w": w.shape}
        grid, block, sh = launch_config("conv2d_bwd_data_pool", v, shapes)
        if v != "v1" and sh > MAX_DYNAMIC_SMEM:
            if variant is not None:
                raise ValueError(f"conv2d_bwd_data_pool_{v}: a {r}x{s} filter needs {sh} bytes of shared memory")
            v = "v1"
        v = self._int32_variant("conv2d_bwd_data_pool", v, variant, dz, dz_below)
        grid, block, sh = launch_config("conv2d_bwd_data_pool", v, shapes)
        codes = (np.int32(POOL_CODES[mode]), np.int32(ACT_CODES[act]))
        if v == "v1":
            self._launch("conv2d_bwd_data_pool", v, grid, block, sh, dz, w, argmax, yconv, dz_below, *codes)
            return
        f = self._flat_view
        self._launch("conv2d_bwd_data_pool", v, grid, block, sh, f(dz), f(w), f(argmax), f(yconv), f(dz_below),
                     *_i32(n, c, h, wd, k, r, s), *codes, np.int32(bwd_data_chunk(w.shape)))

    def _routed_variant(self, op: str, variant: str | None) -> str:
        """The routed ops' variant: from ``variants`` where they are advertised, else routed.py's table (the
        ops work before the protocol lists them)."""
        if op in self.variants:
            return self._variant(op, variant)
        v = _routed.DEFAULT_VARIANTS[op] if variant is None else variant
        if v not in _routed.VARIANTS[op]:
            raise ValueError(f"{op}: unknown variant {v!r}; choose one of {', '.join(_routed.VARIANTS[op])}")
        return v

    def conv2d_bwd_weight_routed(
        self, x: Any, gz: Any, argmax: Any, dw: Any, db: Any, state: Any = None, variant: str | None = None
    ) -> None:
        """dw, db of a conv + 2×2 max-pool layer from its routed gradient gz (B,K,Hp,Wp) and routes argmax
        (docs/routed_backward.md; overwritten): the dense conv2d_bwd_weight of the scattered gradient,
        touching only the routed taps. ``state`` as for conv2d_bwd_weight (the split's ticket tag)."""
        v = self._routed_variant("conv2d_bwd_weight_routed", variant)
        _dev("x", x, np.float32, 4)
        _dev("gz", gz, np.float32, 4)
        _dev("argmax", argmax, np.uint8, 4)
        _dev("dw", dw, np.float32, 4)
        _dev("db", db, np.float32, 1)
        if state is not None:
            _state("state", state)
        n, c, h, wd = x.shape
        k, _, r, s = dw.shape
        _shape("dw", dw, (k, c, r, s))
        _shape("db", db, (k,))
        hp, wp = (h - r + 1) // 2, (wd - s + 1) // 2
        if hp < 1 or wp < 1:
            raise ValueError(f"conv2d_bwd_weight_routed: the conv output of x {tuple(x.shape)} has no 2x2 window")
        _shape("gz", gz, (n, k, hp, wp))
        _shape("argmax", argmax, gz.shape)
        _int32_sizes("conv2d_bwd_weight_routed", x, gz)
        shapes = {"dw": dw.shape, "gz": gz.shape}
        grid, block, sh = launch_config("conv2d_bwd_weight_routed", v, shapes)
        f = self._flat_view
        if v == "v1":
            self._launch("conv2d_bwd_weight_routed", v, grid, block, sh, f(x), f(gz), f(argmax), f(dw), db,
                         *_i32(n, c, h, wd, k, r, s))
            return
        splits = bw_splits(dw.shape, gz.shape)
        partial, tickets = self._bw_scratch(dw, splits)
        if state is None:
            state = self._zero_state()
        self._launch("conv2d_bwd_weight_routed", v, grid, block, sh, f(x), f(gz), f(argmax), f(dw), db, partial,
                     tickets, state, *_i32(n, c, h, wd, k, r, s), np.int32(splits), *div_magic(hp * wp),
                     *div_magic(wp))

    def conv2d_bwd_data_routed(
        self, gz: Any, w: Any, argmax: Any, y_below: Any, gz_below: Any, act: str, variant: str | None = None
    ) -> None:
        """gz_below (y_below's shape (B,C,H,W)) = the data gradient of the conv whose input is y_below, from
        its routed gradient gz and routes argmax (B,K,Hp,Wp), times act'(y_below): the routed gradient of the
        layer below (docs/routed_backward.md)."""
        v = self._routed_variant("conv2d_bwd_data_routed", variant)
        check_act(act)
        _dev("gz", gz, np.float32, 4)
        _dev("w", w, np.float32, 4)
        _dev("argmax", argmax, np.uint8, 4)
        _dev("y_below", y_below, np.float32, 4)
        _dev("gz_below", gz_below, np.float32, 4)
        n, c, h, wd = y_below.shape
        k, _, r, s = w.shape
        _shape("w", w, (k, c, r, s))
        _shape("gz_below", gz_below, y_below.shape)
        hp, wp = (h - r + 1) // 2, (wd - s + 1) // 2
        if hp < 1 or wp < 1:
            raise ValueError(f"conv2d_bwd_data_routed: the conv output of {tuple(y_below.shape)} has no 2x2 window")
        _shape("gz", gz, (n, k, hp, wp))
        _shape("argmax", argmax, gz.shape)
        _int32_sizes("conv2d_bwd_data_routed", gz, gz_below)
        shapes = {"gzb": gz_below.shape, "w": w.shape}
        grid, block, sh = launch_config("conv2d_bwd_data_routed", v, shapes)
        if sh > MAX_DYNAMIC_SMEM:
            raise ValueError(f"conv2d_bwd_data_routed_{v}: a {r}x{s} filter needs {sh} bytes of shared memory")
        f = self._flat_view
        self._launch("conv2d_bwd_data_routed", v, grid, block, sh, f(gz), f(w), f(argmax), f(y_below), f(gz_below),
                     *_i32(n, c, h, wd, k, r, s), np.int32(ACT_CODES[act]), np.int32(_routed.data_chunk(w.shape)),
                     *div_magic(h * wd), *div_magic(wd))

    #: the four-kernel step's conv backward in one launch (step4_bwd.py; docs/step4.md)
    step_bwd = _step4_bwd.step_bwd

    def step_groups(self, batch: int) -> int:
        """The rows S of step_bwd's partials at ``batch`` (step4_bwd.step_groups: up to 2 blocks of one image an SM,
        then groups of ceil(batch / (2 * sm_count)) images; sm_count() is DEFAULT_SM_COUNT without a device)."""
        return _step4_bwd.step_groups(batch, sm_count())

    def _argmax_arg(self, op: str, argmax: Any, mode: str, shape: tuple[int, ...]) -> Any:
        """The argmax array to launch with: checked for max pooling, a dummy when avg passes None."""
        if argmax is None:
            if mode == "max":
                raise ValueError(f"{op}: max pooling needs an argmax array")
            return self._uint8_dummy()
        _dev("argmax", argmax, np.uint8, 4)
        if mode == "max":
            _shape("argmax", argmax, shape)
        return argmax

    def pool2x2_fwd(self, x: Any, y: Any, argmax: Any, mode: str, variant: str | None = None) -> None:
        v = self._variant("pool2x2_fwd", variant)
        check_mode(mode)
        _dev("x", x, np.float32, 4)
        _dev("y", y, np.float32, 4)
        n, c, h, wd = x.shape
        _shape("y", y, (n, c, h // 2, wd // 2))
        argmax = self._argmax_arg("pool2x2_fwd", argmax, mode, y.shape)
        grid, block, sh = launch_config("pool2x2_fwd", v, {"y": y.shape})
        self._launch("pool2x2_fwd", v, grid, block, sh, x, y, argmax, np.int32(POOL_CODES[mode]))

    def pool2x2_bwd(
        self, dy: Any, argmax: Any, yconv: Any, dz: Any, mode: str, act: str, variant: str | None = None
    ) -> None:
        v = self._variant("pool2x2_bwd", variant)
        check_mode(mode)
        check_act(act)
        _dev("dy", dy, np.float32, 4)
        _dev("yconv", yconv, np.float32, 4)
        _dev("dz", dz, np.float32, 4)
        n, c, h, wd = dz.shape
        _shape("yconv", yconv, dz.shape)
        _shape("dy", dy, (n, c, h // 2, wd // 2))
        argmax = self._argmax_arg("pool2x2_bwd", argmax, mode, dy.shape)
        grid, block, sh = launch_config("pool2x2_bwd", v, {"dz": dz.shape})
        self._launch("pool2x2_bwd", v, grid, block, sh, dy, argmax, yconv, dz, np.int32(POOL_CODES[mode]),
                     np.int32(ACT_CODES[act]))

    def dense_fwd(self, x: Any, w: Any, b: Any, y: Any, act: str, variant: str | None = None) -> None:
        v = self._variant("dense_fwd", variant)
        check_act(act)
        _dev("x", x, np.float32, 2)
        _dev("w", w, np.float32, 2)
        _dev("b", b, np.float32, 1)
        _dev("y", y, np.float32, 2)
        n, i = x.shape
        o = w.shape[0]
        _shape("w", w, (o, i))
        _shape("b", b, (o,))
        _shape("y", y, (n, o))
        grid, block, sh = launch_config("dense_fwd", v, {"y": y.shape})
        self._launch("dense_fwd", v, grid, block, sh, x, w, b, y, np.int32(ACT_CODES[act]))

    def dense_bwd(
        self, x: Any, w: Any, y: Any, dy: Any, dx: Any | None, dw: Any, db: Any, act: str,
        variant: str | None = None,
    ) -> None:
        v = self._variant("dense_bwd", variant)
        check_act(act)
        for label, a in (("x", x), ("w", w), ("y", y), ("dy", dy), ("dw", dw)):
            _dev(label, a, np.float32, 2)
        _dev("db", db, np.float32, 1)
        n, i = x.shape
        o = w.shape[0]
        _shape("w", w, (o, i))
        _shape("y", y, (n, o))
        _shape("dy", dy, (n, o))
        _shape("dw", dw, (o, i))
        _shape("db", db, (o,))
        if dx is not None:
            _dev("dx", dx, np.float32, 2)
            _shape("dx", dx, (n, i))
        grid, block, sh = launch_config("dense_bwd", v, {"x": x.shape, "w": w.shape, "dx": dx is not None})
        self._launch("dense_bwd", v, grid, block, sh, x, w, y, dy, dw if dx is None else dx, dw, db,
                     np.int32(ACT_CODES[act]), np.int32(dx is not None))

    def softmax_xent(
        self, logits: Any, labels: Any, dlogits: Any, stats: Any, state: Any, variant: str | None = None
    ) -> None:
        v = self._variant("softmax_xent", variant)
        _dev("logits", logits, np.float32, 2)
        _dev("labels", labels, np.int32, 1)
        _dev("dlogits", dlogits, np.float32, 2)
        _dev("stats", stats, np.float32, 2)
        _state("state", state)
        _shape("labels", labels, (logits.shape[0],))
        _shape("dlogits", dlogits, logits.shape)
        if stats.shape[1] != 2 or stats.shape[0] < 1:
            raise ValueError(f"stats: shape {tuple(stats.shape)} is not (S, 2) with S >= 1")
        grid, block, sh = launch_config("softmax_xent", v, {})
        self._launch("softmax_xent", v, grid, block, sh, logits, labels, dlogits, stats, state)

    def adam_step(
        self, p: Any, g: Any, m: Any, v: Any, sched: Any, state: Any, beta1: float, beta2: float, eps: float,
        weight_decay: float, variant: str | None = None,
    ) -> None:
        var = self._variant("adam_step", variant)
        for label, a in (("p", p), ("g", g), ("m", m), ("v", v)):
            _dev(label, a, np.float32, 1)
            _shape(label, a, p.shape)
        _sched("sched", sched)
        _state("state", state)
        f = np.float32
        grid, block, sh = launch_config("adam_step", var, {"p": p.shape})
        self._launch("adam_step", var, grid, block, sh, p, g, m, v, sched, state, f(beta1), f(1.0 - beta1),
                     f(beta2), f(1.0 - beta2), f(eps), f(weight_decay))

    def sgd_step(
        self, p: Any, g: Any, m: Any, sched: Any, state: Any, momentum: float, weight_decay: float,
        variant: str | None = None,
    ) -> None:
        var = self._variant("sgd_step", variant)
        for label, a in (("p", p), ("g", g), ("m", m)):
            _dev(label, a, np.float32, 1)
            _shape(label, a, p.shape)
        _sched("sched", sched)
        _state("state", state)
        f = np.float32
        grid, block, sh = launch_config("sgd_step", var, {"p": p.shape})
        self._launch("sgd_step", var, grid, block, sh, p, g, m, sched, state, f(momentum), f(weight_decay))

    def step_advance(self, state: Any, batch: int, variant: str | None = None) -> None:
        v = self._variant("step_advance", variant)
        _state("state", state)
        if int(batch) < 1:
            raise ValueError(f"step_advance: batch must be >= 1, got {batch}")
        grid, block, sh = launch_config("step_advance", v, {})
        self._launch("step_advance", v, grid, block, sh, state, np.int32(batch))

    # ------------------------------------------------------------------ the four-kernel step (docs/step4.md)
    def step_fwd(
        self, images: Any, labels: Any, perm: Any, state: Any, sched: Any, srow: Any, x: Any, y: Any, w1: Any,
        b1: Any, p1: Any, m1: Any, w3: Any, b3: Any, p3: Any, m3: Any, mean: float, std: float, act: str,
        variant: str | None = None,
    ) -> None:
        """batch_prepare + C1 + act + 2×2 max pool + C3 + act + 2×2 max pool (LeNet-5's geometry), and this
        step's schedule row into srow: one launch, a block per image (step4_fwd.step_fwd_v1), or per two images
        (step_fwd_v2: by name, or the default at large batch, step4_fwd.step_fwd_kernel)."""
        self._variant("step_fwd", variant)  # a variant this backend lists; None (its default) goes through as None
        _step4_fwd.step_fwd(self, images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3,
                            mean, std, act, variant=variant)

    def step_adam(
        self, p: Any, g: Any, gpart: Any, m: Any, v: Any, srow: Any, state: Any, batch: int, beta1: float,
        beta2: float, eps: float, weight_decay: float, variant: str | None = None,
    ) -> None:
        """g[:NC] = Σ_s gpart[s] (float32, group order), Adam with [lr, bc1, bc2] = srow[:3], step_advance: one
        launch (step4_fwd.step_adam_v1)."""
        _step4_fwd.step_adam(self, p, g, gpart, m, v, srow, state, batch, beta1, beta2, eps, weight_decay,
                             variant=self._variant("step_adam", variant), sms=sm_count())

    def step_sgd(
        self, p: Any, g: Any, gpart: Any, m: Any, srow: Any, state: Any, batch: int, momentum: float,
        weight_decay: float, variant: str | None = None,
    ) -> None:
        """g[:NC] = Σ_s gpart[s] (float32, group order), SGD with momentum with lr = srow[0], step_advance: one
        launch (step4_fwd.step_sgd_v1)."""
        _step4_fwd.step_sgd(self, p, g, gpart, m, srow, state, batch, momentum, weight_decay,
                            variant=self._variant("step_sgd", variant), sms=sm_count())


class _Recorded:
    """What ``NumbaBackend.record`` returns: the first call runs fn and records its launches
    (``launches``: launch.PreparedLaunch objects on a GPU, (kernel, grid, block, shmem, args) under the
    simulator); later calls replay them."""

    def __init__(self, be: NumbaBackend, fn: Callable[[], None]) -> None:
        self.be = be
        self.fn = fn
        self.launches: list[Any] | None = None
        self._replay: Callable[[], None] | None = None

    def __call__(self) -> None:
        be = self.be
        if self._replay is not None:
            if be._recording is not None:  # replayed inside another recording: part of it
                be._recording.extend(self.launches)
            self._replay()
            be.counters.launches += len(self.launches)
            return
        outer = be._recording
        be._recording = []
        try:
            self.fn()
            launches = be._recording
        finally:
            be._recording = outer
        if outer is not None:
            outer.extend(launches)
        self.launches = launches
        self._replay = be._replay_fn(launches)


def _quiet_low_occupancy_warnings() -> None:
    """LeNet's launches are small by nature (softmax_xent is one block, batch 1 steps a few blocks):
    Numba's "grid of fewer than 128 blocks" performance warning would fire on most of them. The
    environment variable NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=1 keeps it on."""
    try:
        from numba.cuda.core import config as cuda_config
    except ImportError:  # older numba-cuda: the setting lives in numba.core.config
        cuda_config = numba.config
    cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0


def _dev(label: str, a: Any, dtype: Any, ndim: int) -> None:
    """A C-contiguous device array of the given dtype and rank (never a host array)."""
    if not isinstance(a, _DeviceArray):
        kind = "a host NumPy array" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{label}: expected a device array of this backend, got {kind} (use to_device)")
    if a.dtype != np.dtype(dtype) or a.ndim != ndim:
        raise TypeError(f"{label}: expected {ndim}-d {np.dtype(dtype)}, got {a.ndim}-d {a.dtype}")
    if not a.flags["C_CONTIGUOUS"]:
        raise ValueError(f"{label}: must be C-contiguous")


def _int32_sizes(op: str, *arrays: Any) -> None:
    """Kernels with int32 offsets only (the routed ops): every array under 2³¹ elements."""
    if any(a.size >= 2**31 for a in arrays):
        raise ValueError(f"{op}: an array has 2³¹ elements or more (the kernel's offsets are int32)")


def _i32(*values: int) -> tuple[np.int32, ...]:
    return tuple(np.int32(v) for v in values)


def _state(label: str, a: Any) -> None:
    """The int32 step state (lenet_gpu.stepstate)."""
    _dev(label, a, np.int32, 1)
    _shape(label, a, (STATE_WORDS,))


def _sched(label: str, a: Any) -> None:
    """The float32 (T, 4) schedule table (lenet_gpu.stepstate)."""
    _dev(label, a, np.float32, 2)
    if a.shape[0] < 1 or a.shape[1] != SCHED_COLS:
        raise ValueError(f"{label}: shape {tuple(a.shape)} is not (T, {SCHED_COLS}) with T >= 1")


def _shape(label: str, a: Any, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{label}: shape {tuple(a.shape)} does not match the expected {tuple(shape)}")
