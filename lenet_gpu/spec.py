"""LeNet-5 as data: the layer table, per-image shapes, the flat parameter layout, and initialisation.

Parameters, gradients and optimizer moments each live in one flat float32 buffer; every tensor is a
view at a fixed offset. Offsets are aligned to ``ALIGN`` floats (128 bytes) so kernels may use
vector loads on any tensor; the padding is zero and stays zero under every optimizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .reference import ACTIVATIONS, POOL_MODES

ALIGN = 32  # floats
INPUT_HW = 32  # 28×28 digits padded by 2 on each side
IMAGE_HW = 28
PAD = 2
NUM_CLASSES = 10


@dataclass(frozen=True)
class NetConfig:
    """The options of the network (docs/DESIGN.md §1)."""

    activation: str = "relu"
    pool: str = "max"
    f6: int = 84

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS or self.activation == "identity":
            raise ValueError(
                f"activation must be one of relu, tanh, lecun_tanh, sigmoid (got {self.activation!r})"
            )
        if self.pool not in POOL_MODES:
            raise ValueError(f"pool must be 'max' or 'avg' (got {self.pool!r})")
        if not isinstance(self.f6, int) or not 1 <= self.f6 <= 4096:
            raise ValueError(f"f6 must be an integer in 1..4096 (got {self.f6!r})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layer:
    """One stage of the network: its name, kind and per-image output shape."""

    name: str
    kind: str  # input, conv, pool, dense
    out_shape: tuple[int, ...]
    params: int


def layer_table(cfg: NetConfig | None = None) -> list[Layer]:
    """The stages of LeNet-5 with per-image output shapes and parameter counts."""
    cfg = cfg or NetConfig()
    f6 = cfg.f6
    return [
        Layer("input", "input", (1, 32, 32), 0),
        Layer("C1", "conv", (6, 28, 28), 6 * 25 + 6),
        Layer("S2", "pool", (6, 14, 14), 0),
        Layer("C3", "conv", (16, 10, 10), 16 * 6 * 25 + 16),
        Layer("S4", "pool", (16, 5, 5), 0),
        Layer("C5", "dense", (120,), 400 * 120 + 120),
        Layer("F6", "dense", (f6,), 120 * f6 + f6),
        Layer("output", "dense", (NUM_CLASSES,), f6 * NUM_CLASSES + NUM_CLASSES),
    ]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor inside the flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    fan_in: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def param_shapes(cfg: NetConfig | None = None) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, fan_in) of every parameter tensor, in buffer order."""
    f6 = (cfg or NetConfig()).f6
    return [
        ("c1.w", (6, 1, 5, 5), 25),
        ("c1.b", (6,), 25),
        ("c3.w", (16, 6, 5, 5), 150),
        ("c3.b", (16,), 150),
        ("c5.w", (120, 400), 400),
        ("c5.b", (120,), 400),
        ("f6.w", (f6, 120), 120),
        ("f6.b", (f6,), 120),
        ("out.w", (NUM_CLASSES, f6), f6),
        ("out.b", (NUM_CLASSES,), f6),
    ]


def param_layout(cfg: NetConfig | None = None) -> tuple[list[ParamSpec], int]:
    """The flat layout: (specs, total buffer length in floats, including alignment padding)."""
    specs, off = [], 0
    for name, shape, fan_in in param_shapes(cfg):
        specs.append(ParamSpec(name, shape, off, fan_in))
        off += -(-int(np.prod(shape)) // ALIGN) * ALIGN
    return specs, off


def conv_prefix() -> int:
    """Floats of the flat buffer before c5.w: c1.w, c1.b, c3.w, c3.b and their padding (2,624). The conv layers'
    shapes do not depend on the config, so neither does this: the row length of the four-kernel step's
    gradient partials (docs/step4.md)."""
    return next(s.offset for s in param_layout()[0] if s.name == "c5.w")


def num_parameters(cfg: NetConfig | None = None) -> int:
    """Trainable parameters, without padding (61,706 for the default network)."""
    return sum(s.size for s in param_layout(cfg)[0])


def layout_signature(cfg: NetConfig | None = None) -> np.ndarray:
    """The layout as an int64 array (offset, size per tensor): stored in checkpoints and compared on load."""
    specs, total = param_layout(cfg)
    return np.array([[s.offset, s.size] for s in specs] + [[total, 0]], dtype=np.int64)


INIT_SCHEMES = ("torch", "he")


def init_params(cfg: NetConfig, seed: int, scheme: str = "torch") -> np.ndarray:
    """A fresh flat float32 parameter buffer, fixed by ``seed``.

    - ``torch``: PyTorch's default for Conv2d and Linear, He-uniform with a = √5: weights and biases
      uniform in ±1/√fan_in. On Fashion-MNIST with Adam 1e-3, batch 64, it tracks PyTorch's LeNet-5
      (test accuracy 0.905 against PyTorch's 0.906 at epoch 9, 0.901 against 0.902 at epoch 10), where ``he``
      reached 0.897 and 0.895. On mnist-sample both reach 0.980 with the default recipe.
    - ``he``: N(0, gain/fan_in) weights — He (gain 2) for relu, LeCun (gain 1) for the tanh family and
      sigmoid, 1 for the logits layer — and zero biases.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {', '.join(INIT_SCHEMES)} (got {scheme!r})")
    specs, total = param_layout(cfg)
    rng = np.random.default_rng(seed)
    flat = np.zeros(total, dtype=np.float32)
    for s in specs:
        view = flat[s.offset : s.offset + s.size]
        if scheme == "torch":
            bound = 1.0 / np.sqrt(s.fan_in)
            view[:] = rng.uniform(-bound, bound, s.size)
        elif s.name.endswith(".w"):
            gain = 1.0 if (s.name == "out.w" or cfg.activation != "relu") else 2.0
            view[:] = rng.normal(0.0, np.sqrt(gain / s.fan_in), s.size)
    return flat


def views(flat, cfg: NetConfig | None = None) -> dict:
    """Per-tensor views of a flat buffer (NumPy, CuPy or Numba device array alike)."""
    specs, total = param_layout(cfg)
    if flat.shape != (total,):
        raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({total},)")
    return {s.name: flat[s.offset : s.offset + s.size].reshape(s.shape) for s in specs}


def forward_flops(cfg: NetConfig | None = None) -> int:
    """Multiply-adds ×2 of one forward pass over one image (convolutions and dense layers)."""
    f6 = (cfg or NetConfig()).f6
    conv = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150
    dense = 400 * 120 + 120 * f6 + f6 * NUM_CLASSES
    return 2 * (conv + dense)
