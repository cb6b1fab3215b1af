"""The Backend protocol: what every backend (numpy, cpu, numba, cupy, cupy-host) provides.

A backend owns memory and runs ops. Every op writes into preallocated outputs and never allocates
(after its first call, when a backend may compile or cache). Arrays are "device arrays" of the
backend: NumPy arrays for numpy, cpu and cupy-host, Numba device arrays for numba, CuPy arrays for
cupy. All float data is float32, C-contiguous, NCHW.

Nothing that changes from step to step is a kernel argument. The step counter, the batch's offset in
the permutation, the epoch, the learning rate and Adam's bias corrections live in device buffers
(lenet_gpu.stepstate: ``state``, ``sched``, ``stats``) that the kernels read, and ``step_advance``
moves the counters on at the end of a step. So the launches of a step are the same at every step:
``record`` replays them with no per-launch work on the host, and ``graph`` captures many steps as one
CUDA graph.

Reductions (dw, db, loss) run in a fixed order with no float atomics, so a run repeats bit for bit on
the same device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import BackendUnavailable as BackendUnavailable  # defined below the backends (and the harness)

#: The ops of the protocol, in the order an unfused training step launches them.
OPS = (
    "batch_prepare",
    "conv2d_fwd",
    "pool2x2_fwd",
    "dense_fwd",
    "softmax_xent",
    "dense_bwd",
    "pool2x2_bwd",
    "conv2d_bwd_data",
    "conv2d_bwd_weight",
    "adam_step",
    "sgd_step",
    "step_advance",
)
#: Optional fused ops a backend may add; the model uses each one when it is in ``backend.variants``:
#: conv2d_pool_fwd (conv2d_fwd + pool2x2_fwd), head_train (C5 → F6 → output → loss → their backward,
#: down to C3's pre-activation gradient), conv2d_bwd_data_pool (conv2d_bwd_data + pool2x2_bwd) and
#: lenet_fwd (the whole forward pass, for inference).
OPTIONAL_OPS = ("conv2d_pool_fwd", "head_train", "conv2d_bwd_data_pool", "lenet_fwd")
#: Optional routed ops (max pooling's sparsity, docs/routed_backward.md). A backend that lists both in
#: ``variants`` also takes ``yconv=None`` in conv2d_pool_fwd and head_train; the model then trains with
#: max pooling through the routed step (when the backend also has conv2d_pool_fwd and head_train).
ROUTED_OPS = ("conv2d_bwd_weight_routed", "conv2d_bwd_data_routed")
#: Optional ops of the four-kernel step (docs/step4.md; max pooling only): a backend that lists all four (and the
#: routed ops) trains with max pooling through step_fwd, head_train, step_bwd and step_adam / step_sgd.
#: ``backend.step_groups(batch)``, where present, gives the rows of step_bwd's partials (else 1).
STEP_OPS = ("step_fwd", "step_bwd", "step_adam", "step_sgd")


def step_groups_of(backend: Any, batch: int) -> int:
    """The rows of step_bwd's partials at ``batch`` on ``backend``: its ``step_groups(batch)``, else 1."""
    planner = getattr(backend, "step_groups", None)
    return int(planner(batch)) if planner is not None else 1

#: Optional hook: ``backend.compile_ahead(options, fused, step)``, called by the model before its first step
#: with ``LeNet5.options()``, whether it uses the fused ops, and the model's scratch step (a module-level
#: ``step(backend, options, fused, batch)``: one training step and one inference of such a model on that
#: backend); a backend that compiles on first use may compile that model's kernels then, knowing nothing of
#: the model (the cpu backend: on two cores, cpu_backend/warm.py).
COMPILE_AHEAD = "compile_ahead"
#: Optional hook: ``backend.launch_list(fn)`` runs fn once and returns its kernel launches, each as (kernel name, a
#: callable that issues that one launch again): the per-kernel profile without CUPTI (lenet_gpu.perf.profile) times
#: them one at a time. The GPU backends (and cupy-host) have it; a backend without it is profiled op call by op call.
LAUNCH_LIST = "launch_list"


@dataclass
class Counters:
    """What a backend did: kernel launches, copies each way, allocations, synchronisations."""

    launches: int = 0
    h2d: int = 0
    d2h: int = 0
    allocs: int = 0
    syncs: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Counts accumulated since a ``snapshot()``."""
        now = self.snapshot()
        return {k: now[k] - before[k] for k in now}


@runtime_checkable
class Backend(Protocol):
    """The contract between the model and a backend (docs/DESIGN.md §3).

    Shapes use B = batch, and every op takes ``variant=None`` (the backend's default, the best
    measured) or one of ``variants[op]``.
    """

    name: str
    is_gpu: bool
    counters: Counters
    #: op name → the kernel variants it has, e.g. {"conv2d_fwd": ("v1", "v2"), ...}
    variants: dict[str, tuple[str, ...]]
    #: op name → the variant used when ``variant`` is None
    default_variants: dict[str, str]

    # ---- memory
    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any: ...
    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any: ...
    def to_device(self, host: np.ndarray) -> Any:
        """A new device array holding a copy of ``host`` (one allocation, one h2d copy)."""
    def upload(self, dst: Any, host: np.ndarray) -> None:
        """Copy ``host`` into the existing device array ``dst`` (same shape and dtype)."""
    def to_host(self, arr: Any) -> np.ndarray:
        """A host copy of ``arr`` (a d2h copy; waits for the work that writes it)."""
    def synchronize(self) -> None: ...
    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A callable equivalent to ``fn``: no arguments, ops only, and the same arguments at every call
        (what changes lives in the step state). A GPU backend runs fn once, recording each launch
        (kernel, grid, block, shared memory, typed arguments), and later calls replay that list with
        no checks, plans or conversions: the cheapest eager dispatch. CPU backends return fn."""
    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None] | None:
        """A callable that runs ``fn`` ``steps`` times in a row as one CUDA graph, captured at its first
        call and replayed after; None where the backend cannot capture graphs. fn as for ``record``,
        and already run once (warm-up: compiles and first-call allocations happen outside capture)."""

    # ---- ops
    def batch_prepare(
        self, images: Any, labels: Any, perm: Any, state: Any, x: Any, y: Any, mean: float, std: float,
        variant: str | None = None,
    ) -> None:
        """Gather a batch on the device (reference.batch_prepare). images (N,28,28) uint8, labels (N,)
        uint8, perm (M,) int32, state (STATE_WORDS,) int32. For r < B: j = perm[(OFFSET + r) mod M] (the
        host never asks past M; the modulo keeps a stale state in bounds); (dy, dx) =
        reference.augment_shift(SEED, EPOCH, j, SHIFT), (0, 0) when SHIFT is 0;
        x[r,0,h,v] (B,1,32,32) = (p/255 − mean)/std with p = images[j, h−2−dy, v−2−dx], 0 outside the
        image; y[r] (B,) int32 = labels[j]. mean and std are fixed for a run."""
    def conv2d_fwd(self, x: Any, w: Any, b: Any, y: Any, act: str, variant: str | None = None) -> None:
        """y (B,K,H-R+1,W-S+1) = act(conv(x (B,C,H,W), w (K,C,R,S)) + b (K,))."""
    def conv2d_bwd_data(self, dz: Any, w: Any, dx: Any, variant: str | None = None) -> None:
        """dx (B,C,H,W) = full correlation of dz (B,K,Ho,Wo) with the flipped w: the input gradient.
        dz is the gradient w.r.t. the convolution's pre-activation."""
    def conv2d_bwd_weight(
        self, x: Any, dz: Any, dw: Any, db: Any, state: Any | None = None, variant: str | None = None
    ) -> None:
        """dw (K,C,R,S) = Σ_{b,i,j} dz[b,k,i,j]·x[b,c,i+r,j+s]; db (K,) = Σ dz. Overwrites dw, db.
        A backend whose fixed-order reduction ends in a last-block ticket tags the ticket with the
        state's STEP, so a launch aborted midway cannot poison later ones."""
    def pool2x2_fwd(self, x: Any, y: Any, argmax: Any, mode: str, variant: str | None = None) -> None:
        """y (B,C,H//2,W//2) = 2×2/2 max or mean of x; for max, argmax (uint8, y's shape) = the
        row-major tap 0..3 of the first maximum. avg leaves argmax untouched."""
    def pool2x2_bwd(
        self, dy: Any, argmax: Any, yconv: Any, dz: Any, mode: str, act: str, variant: str | None = None
    ) -> None:
        """dz (yconv's shape) = route(dy) · act'(yconv): the pooling gradient times the derivative of the
        activation of the convolution that produced yconv. Taps outside every window get 0."""
    def dense_fwd(self, x: Any, w: Any, b: Any, y: Any, act: str, variant: str | None = None) -> None:
        """y (B,O) = act(x (B,I) · wᵀ (O,I) + b (O,))."""
    def dense_bwd(
        self, x: Any, w: Any, y: Any, dy: Any, dx: Any | None, dw: Any, db: Any, act: str,
        variant: str | None = None,
    ) -> None:
        """dz = dy·act'(y); dx (B,I) = dz·w (skipped when dx is None); dw (O,I) = dzᵀ·x; db = Σ_b dz."""
    def softmax_xent(
        self, logits: Any, labels: Any, dlogits: Any, stats: Any, state: Any, variant: str | None = None
    ) -> None:
        """dlogits (B,NC) = (softmax(logits) − onehot(labels))/B; stats (S,2) float32: row
        STEP_IN_EPOCH mod S = [Σ_b loss_b, number of rows whose first maximal logit is the label]
        (overwritten, summed in a fixed order)."""
    def adam_step(
        self, p: Any, g: Any, m: Any, v: Any, sched: Any, state: Any, beta1: float, beta2: float, eps: float,
        weight_decay: float, variant: str | None = None,
    ) -> None:
        """One launch over the flat buffers, with [lr, bc1, bc2] = sched[clamp(STEP − SCHED_BASE, 0, T−1), :3]:
        g' = g + wd·p; m = β1·m + (1−β1)·g'; v = β2·v + (1−β2)·g'²; p −= lr·(m/bc1)/(√(v/bc2) + eps)."""
    def sgd_step(
        self, p: Any, g: Any, m: Any, sched: Any, state: Any, momentum: float, weight_decay: float,
        variant: str | None = None,
    ) -> None:
        """lr = sched[clamp(STEP − SCHED_BASE, 0, T−1), 0]; g' = g + wd·p; m = momentum·m + g'; p −= lr·m."""
    def step_advance(self, state: Any, batch: int, variant: str | None = None) -> None:
        """One thread: STEP += 1; STEP_IN_EPOCH += 1; OFFSET += batch; when STEP_IN_EPOCH reaches
        STEPS_PER_EPOCH: STEP_IN_EPOCH = 0, OFFSET = 0, EPOCH += 1 (lenet_gpu.stepstate.advance)."""

    # optional fused ops (listed in ``variants`` when present):
    # def conv2d_pool_fwd(self, x, w, b, yconv: Any | None, ypool, argmax, act, mode, variant=None) -> None:
    #     """ypool, argmax = pool2x2_fwd(conv2d_fwd(x, w, b, act), mode) in one launch; also writes the
    #     activated conv output yconv (which the backward pass needs for act') unless it is None."""
    # def conv2d_bwd_data_pool(self, dz, w, argmax, yconv, dz_below, mode, act, variant=None) -> None:
    #     """dz_below (yconv's shape) = pool2x2_bwd(conv2d_bwd_data(dz, w), argmax, yconv, mode, act):
    #     the data gradient of a convolution routed through the pooling below it and that layer's
    #     activation (reference.conv2d_bwd_data_pool). argmax is None for avg."""
    # def head_train(self, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
    #                dw1, db1, dw2, db2, dw3, db3, stats, state, act, mode, variant=None) -> None:
    #     """reference.head_train as one op: x (B,C,Hp,Wp) pooled map (read as (B,I)), labels (B,) int32;
    #     writes the activations h1 (B,H1), h2 (B,H2), logits (B,NC); the loss statistics into stats row
    #     STEP_IN_EPOCH as softmax_xent does; the gradients dw1..db3 (overwritten); and dz_conv (yconv's
    #     shape) = pool2x2_bwd(dL/dx, argmax, yconv, mode, act). argmax is None for avg."""
    #     With yconv=None (max mode, a backend with ROUTED_OPS) dz_conv has x's shape and receives the routed
    #     gradient gz = dL/dx · act'(x) (reference.head_train with yconv=None).
    # def lenet_fwd(self, images, params: dict, logits, mean, std, act, mode, variant=None) -> None:
    #     """reference.lenet_fwd: uint8 images (N,28,28) → logits (N,NC), the whole forward pass in one op
    #     (one launch per batch tile on a GPU). params maps c1.w ... out.b to device arrays."""
    #
    # optional routed ops (ROUTED_OPS; max pooling only; docs/routed_backward.md), gz at the pooled size:
    # def conv2d_bwd_weight_routed(self, x, gz, argmax, dw, db, state=None, variant=None) -> None:
    #     """dw[k,c,r,s] = Σ_{b,i,j} gz[b,k,i,j]·x[b,c,2i+a//2+r,2j+a%2+s], a = argmax[b,k,i,j]; db[k] = Σ gz.
    #     Overwrites dw, db (reference.conv2d_bwd_weight_routed)."""
    # def conv2d_bwd_data_routed(self, gz, w, argmax, y_below, gz_below, act, variant=None) -> None:
    #     """gz_below (y_below's shape (B,C,H,W), the conv's input) = data gradient of the scattered gz times
    #     act'(y_below): the routed gradient of the layer below (reference.conv2d_bwd_data_routed)."""


#: the alignment of every host "device" array (bytes): a cache line, and one AVX-512 vector. NumPy's own
#: allocations are only 16-byte aligned, so a 16-float lane vector (64 bytes) of a kernel's workspace straddled
#: two cache lines: every second 32-byte AVX2 load, and every 64-byte AVX-512 load, read two lines. Measured on
#: a Zen 3 (AVX2), lenet_fwd on one thread, 1,000 images, 4 interleaved pairs of processes (2026-12-07): the
#: fastest call 16.0–17.8 ms with NumPy's alignment, 14.7–14.8 ms at 64 bytes.
HOST_ALIGN = 64


def aligned_empty(shape: tuple[int, ...] | int, dtype: Any = np.float32, zero: bool = False) -> np.ndarray:
    """A C-contiguous array whose data starts at a multiple of HOST_ALIGN bytes (a view into a slightly larger
    byte buffer, which it keeps alive); zeroed with ``zero``."""
    dt = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = (np.zeros if zero else np.empty)(nbytes + HOST_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % HOST_ALIGN
    return raw[off : off + nbytes].view(dt).reshape(shape)


class HostMemory:
    """The memory half of the protocol for the CPU backends (numpy, cpu): "device" arrays are NumPy arrays,
    each aligned to HOST_ALIGN bytes, and every allocation, copy and synchronisation is counted in
    ``self.counters`` as on a GPU."""

    counters: Counters

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        self.counters.allocs += 1
        return aligned_empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        self.counters.allocs += 1
        return aligned_empty(shape, dtype, zero=True)

    def to_device(self, host: np.ndarray) -> np.ndarray:
        self.counters.allocs += 1
        self.counters.h2d += 1
        host = np.asarray(host)
        out = aligned_empty(host.shape, host.dtype)
        out[...] = host
        return out

    def upload(self, dst: np.ndarray, host: np.ndarray) -> None:
        if dst.shape != np.shape(host):
            raise ValueError(f"upload: shape {np.shape(host)} does not match {dst.shape}")
        self.counters.h2d += 1
        dst[...] = host

    def to_host(self, arr: np.ndarray) -> np.ndarray:
        self.counters.d2h += 1
        return np.array(arr, copy=True)

    def synchronize(self) -> None:
        self.counters.syncs += 1

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn  # a CPU op's dispatch is small beside its work: nothing to record

    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None] | None:
        return None  # no graphs on the CPU


def check_act(act: str) -> None:
    from ..reference import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def check_mode(mode: str) -> None:
    if mode not in ("max", "avg"):
        raise ValueError(f"unknown pool mode {mode!r}; expected 'max' or 'avg'")


def check_lenet_fwd_outputs(logits: Any, classes: Any, n: int, nc: int,
                            check_array: Callable[[Any, str, tuple[int, ...], Any], None]) -> None:
    """The output checks of a GPU backend's lenet_fwd (cupy's and numba's, the same contract): logits (n, nc) float32
    and/or classes (n,) int64, at least one of them given (ValueError), each given one checked by the backend's own
    ``check_array(array, name, shape, dtype)`` (present, shape, dtype, C-contiguous: its messages and exception
    types), and at least one image (ValueError)."""
    if logits is None and classes is None:
        raise ValueError("lenet_fwd: give logits, classes or both")
    if logits is not None:
        check_array(logits, "logits", (n, nc), np.float32)
    if classes is not None:
        check_array(classes, "classes", (n,), np.int64)
    if n < 1:
        raise ValueError("lenet_fwd: needs at least one image")


def check_lenet_eval_args(logits: Any, labels: Any, out: Any,
                          check_array: Callable[[Any, str, tuple[int, ...], Any], None]) -> tuple[int, int]:
    """The argument checks of a GPU backend's lenet_eval (cupy's and numba's): logits (N, NC) float32, labels (N,)
    uint8, out (2,) float64, each checked by the backend's own ``check_array`` (see check_lenet_fwd_outputs), and
    at least one row (ValueError). Returns (N, NC)."""
    n, nc = logits.shape
    check_array(logits, "logits", (n, nc), np.float32)
    check_array(labels, "labels", (n,), np.uint8)
    check_array(out, "out", (2,), np.float64)
    if n < 1:
        raise ValueError("lenet_eval: needs at least one row")
    return n, nc


#: Integer codes the kernels of every GPU backend use for the string options.
ACT_CODES = {"identity": 0, "relu": 1, "tanh": 2, "lecun_tanh": 3, "sigmoid": 4}
POOL_CODES = {"max": 0, "avg": 1}
