"""The Backend protocol: what every backend (numpy, numba, cupy, cupy-host) provides.

A backend owns memory and runs ops. Every op writes into preallocated outputs and never allocates
(after its first call, when a backend may compile or cache). Arrays are "device arrays" of the
backend: NumPy arrays for numpy and cupy-host, Numba device arrays for numba, CuPy arrays for cupy.
All float data is float32, C-contiguous, NCHW.

Per-step scalars are explicit arguments (offset into the permutation, learning rate, Adam's bias
corrections), so a training step needs no host↔device copy. A backend that can capture a CUDA graph
does so for the forward+backward part only (see ``Backend.graph``); the batch gather and the
optimizer, whose scalars change every step, are launched normally around the replay.

Reductions (dw, db, loss) run in a fixed order with no float atomics, so a run repeats bit for bit on
the same device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: The ops of the protocol, in the order a training step launches them.
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
)
#: Optional ops a backend may add; the model uses them when present in ``backend.variants``.
OPTIONAL_OPS = ("conv2d_pool_fwd",)


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no CUDA device, package missing). The message is one clear line."""


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
    """The contract between the model and a backend (DESIGN.md §3).

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
    def graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A callable equivalent to ``fn`` (no arguments, launches only). A GPU backend may capture
        it once as a CUDA graph and replay it; others return ``fn``."""

    # ---- ops
    def batch_prepare(
        self, images: Any, labels: Any, perm: Any, offset: int, x: Any, y: Any, mean: float, std: float,
        variant: str | None = None,
    ) -> None:
        """Gather a batch on the device. images (N,28,28) uint8, labels (N,) uint8, perm (M,) int32.
        For r < B: j = perm[offset + r]; x[r,0] (B,1,32,32) = (pad2(images[j])/255 − mean)/std
        (the padding is pixel value 0); y[r] (B,) int32 = labels[j]."""
    def conv2d_fwd(self, x: Any, w: Any, b: Any, y: Any, act: str, variant: str | None = None) -> None:
        """y (B,K,H-R+1,W-S+1) = act(conv(x (B,C,H,W), w (K,C,R,S)) + b (K,))."""
    # optional (listed in ``variants`` when present): the fused forward of C1+S2 and C3+S4
    # def conv2d_pool_fwd(self, x, w, b, yconv: Any | None, ypool, argmax, act, mode, variant=None) -> None:
    #     """ypool, argmax = pool2x2_fwd(conv2d_fwd(x, w, b, act), mode) in one launch; also writes the
    #     activated conv output yconv (which the backward pass needs for act') unless it is None."""

    def conv2d_bwd_data(self, dz: Any, w: Any, dx: Any, variant: str | None = None) -> None:
        """dx (B,C,H,W) = full correlation of dz (B,K,Ho,Wo) with the flipped w: the input gradient.
        dz is the gradient w.r.t. the convolution's pre-activation."""
    def conv2d_bwd_weight(self, x: Any, dz: Any, dw: Any, db: Any, variant: str | None = None) -> None:
        """dw (K,C,R,S) = Σ_{b,i,j} dz[b,k,i,j]·x[b,c,i+r,j+s]; db (K,) = Σ dz. Overwrites dw, db."""
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
    def softmax_xent(self, logits: Any, labels: Any, dlogits: Any, stats: Any, variant: str | None = None) -> None:
        """dlogits (B,10) = (softmax(logits) − onehot(labels))/B; stats (2,) float32 += [Σ_b loss_b,
        number of rows whose first maximal logit is the label]."""
    def adam_step(
        self, p: Any, g: Any, m: Any, v: Any, lr: float, beta1: float, beta2: float, eps: float,
        weight_decay: float, bc1: float, bc2: float, variant: str | None = None,
    ) -> None:
        """One launch over the flat buffers: g' = g + wd·p; m = β1·m + (1−β1)·g'; v = β2·v + (1−β2)·g'²;
        p −= lr·(m/bc1)/(√(v/bc2) + eps), with bc1 = 1−β1^t, bc2 = 1−β2^t computed by the caller."""
    def sgd_step(
        self, p: Any, g: Any, m: Any, lr: float, momentum: float, weight_decay: float,
        variant: str | None = None,
    ) -> None:
        """g' = g + wd·p; m = momentum·m + g'; p −= lr·m."""


def check_act(act: str) -> None:
    from ..reference import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def check_mode(mode: str) -> None:
    if mode not in ("max", "avg"):
        raise ValueError(f"unknown pool mode {mode!r}; expected 'max' or 'avg'")


#: Integer codes the kernels of every GPU backend use for the string options.
ACT_CODES = {"identity": 0, "relu": 1, "tanh": 2, "lecun_tanh": 3, "sigmoid": 4}
POOL_CODES = {"max": 0, "avg": 1}
