"""The ops of LeNet-5 as benchmark cases: what each costs (FLOPs, bytes) and how to run and check it.

Costs. One function per op, the formula in its docstring. Conventions:

- a multiply-add is 2 FLOPs; a bias add, a comparison, a select and a scale are 1 FLOP each;
- an activation costs ``ACT_FWD_FLOPS[act]`` per element forward (exp/tanh count as one op) and
  ``ACT_BWD_FLOPS[act]`` per element backward (evaluating act'(y) from y and multiplying it in);
- bytes are the compulsory traffic: every input read once and every output written once (float32 =
  4 bytes, uint8 argmax / image pixels = 1 byte, int32 labels and indices = 4 bytes). A kernel that
  re-reads data from DRAM moves more; one that hits in cache may move less of the re-reads, never less
  than this.

The floor of an op on an H100 is ``max(flops / H100_FP32_FLOPS, bytes / H100_HBM_BYTES_PER_S)``, the time
a perfect kernel bounded by either the FP32 (non-tensor) pipes or HBM would take. It ignores launch
latency (a few µs per kernel), which dominates every LeNet op at small batches.

Hand check against LeNet counts (B = batch), default network (relu, max, F6 = 84):

====================== ======================================= ===========================
op at its site          FLOPs                                   bytes
====================== ======================================= ===========================
conv2d_fwd C1           2·B·6·28·28·25 + 2·B·4704 = 244,608·B     4·(1024·B + 156 + 4704·B)
conv2d_fwd C3           2·B·16·10·10·150 + 2·B·1600 = 483,200·B   4·(1176·B + 2416 + 1600·B)
dense_fwd C5            2·B·400·120 + 2·B·120 = 96,240·B          4·(400·B + 48,120 + 120·B)
forward (convs+dense)   2·(117,600 + 240,000 + 48,000 + 10,080 + 840) = 833,040·B (spec.forward_flops)
====================== ======================================= ===========================

Cases. ``build_case(backend, op, site, batch, variant)`` makes seeded inputs at the LeNet shape of a
call site (C1, C3, S2, ...), allocates the outputs on the backend, and returns an ``OpCase`` whose
``validate()`` re-uploads the inputs, poisons the outputs with NaN, launches once and compares every
output with the float64 reference (tests/parity.py's tolerances), and whose ``launch()`` is the bare
launch that gets timed. Sites are where the model calls the op in a training step.

The fused ops of the routed and four-kernel steps (head_train in both forms, the routed ops, step_fwd, step_bwd,
step_adam, step_sgd: the kernels of the default step) take their inputs and their comparison from the self-test's
builders at the same LeNet shapes (``lenet_gpu.selftest.checks.lenet_sets``), so the benchmark and the self-test's
per-op timings launch the same cases. step_bwd writes, and step_adam / step_sgd add up, the partial rows the
backend plans for the batch (``op_groups``: its ``step_groups``), as the model's workspace holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import reference as ref
from ..backends.base import OPS, OPTIONAL_OPS, step_groups_of
from ..model import MNIST_MEAN, MNIST_STD
from ..parity import TOL, assert_close, assert_equal, nan_like
from ..selftest import checks
from ..spec import NetConfig, init_params, param_layout, views
from ..stepstate import HostState, advance, schedule_table

#: H100 SXM5 datasheet rates used for the floors: FP32 (non-tensor) 66.9 TFLOP/s, HBM3 3.35 TB/s.
H100_FP32_FLOPS = 67e12
H100_HBM_BYTES_PER_S = 3.35e12
H100_NOTE = (
    "H100 SXM5 datasheet: FP32 non-tensor 67 TFLOP/s, HBM3 3.35 TB/s; "
    "floor = max(FLOPs / 67e12, bytes / 3.35e12), launch latency not included"
)

F4 = 4  # bytes of a float32 / int32
ACT_FWD_FLOPS = {"identity": 0, "relu": 1, "tanh": 1, "lecun_tanh": 3, "sigmoid": 3}
ACT_BWD_FLOPS = {"identity": 0, "relu": 1, "tanh": 3, "lecun_tanh": 4, "sigmoid": 3}
#: ops whose size does not depend on the batch (one launch over the flat parameter buffer)
PER_STEP_OPS = ("adam_step", "sgd_step", "step_advance")
#: the batch step_advance's case moves the offset on by
STEP_ADVANCE_BATCH = 64


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def floor_seconds(cost: Cost) -> float:
    """The H100 floor of an op: max(flops / FP32 peak, bytes / HBM bandwidth)."""
    return max(cost.flops / H100_FP32_FLOPS, cost.bytes / H100_HBM_BYTES_PER_S)


# ------------------------------------------------------------------------------------------ costs


def batch_prepare_cost(b: int) -> Cost:
    """Gather, pad 28→32, normalise.

    FLOPs = 2·B·32·32 (one multiply and one add per output pixel, the padding included).
    Bytes = B·28·28 (uint8 pixels) + B (uint8 label) + 4·B (int32 perm entry)
            + 4·B·32·32 (x) + 4·B (int32 y).
    """
    return Cost(2 * b * 32 * 32, b * 28 * 28 + b + F4 * b + F4 * b * 32 * 32 + F4 * b)


def conv2d_fwd_cost(b: int, c: int, h: int, w: int, k: int, r: int, s: int, act: str) -> Cost:
    """Direct valid convolution + bias + activation, Ho = H−R+1, Wo = W−S+1.

    FLOPs = 2·B·K·Ho·Wo·C·R·S + B·K·Ho·Wo·(1 + act_fwd).
    Bytes = 4·(B·C·H·W + K·C·R·S + K + B·K·Ho·Wo).
    C1: 2·B·6·28·28·25 = 235,200·B, plus 2·4,704·B for bias and relu = 244,608·B.
    """
    ho, wo = h - r + 1, w - s + 1
    out = b * k * ho * wo
    return Cost(2 * out * c * r * s + out * (1 + ACT_FWD_FLOPS[act]), F4 * (b * c * h * w + k * c * r * s + k + out))


def conv2d_bwd_data_cost(b: int, c: int, h: int, w: int, k: int, r: int, s: int) -> Cost:
    """dx = full correlation of dz with the flipped filters.

    FLOPs = 2·B·K·Ho·Wo·C·R·S (each dz element meets each of its C·R·S taps once; the zero padding of
    the full correlation is not counted). C3: 2·B·16·10·10·150 = 480,000·B.
    Bytes = 4·(B·K·Ho·Wo + K·C·R·S + B·C·H·W).
    """
    ho, wo = h - r + 1, w - s + 1
    return Cost(2 * b * k * ho * wo * c * r * s, F4 * (b * k * ho * wo + k * c * r * s + b * c * h * w))


def conv2d_bwd_weight_cost(b: int, c: int, h: int, w: int, k: int, r: int, s: int) -> Cost:
    """dw = Σ_{b,i,j} dz·x over every output position, db = Σ dz.

    FLOPs = 2·B·K·Ho·Wo·C·R·S + B·K·Ho·Wo. C1: 235,200·B + 4,704·B.
    Bytes = 4·(B·C·H·W + B·K·Ho·Wo + K·C·R·S + K).
    """
    ho, wo = h - r + 1, w - s + 1
    out = b * k * ho * wo
    return Cost(2 * out * c * r * s + out, F4 * (b * c * h * w + out + k * c * r * s + k))


def pool2x2_fwd_cost(b: int, c: int, h: int, w: int, mode: str) -> Cost:
    """2×2 stride-2 subsampling, Ho = H//2, Wo = W//2.

    FLOPs = 3·B·C·Ho·Wo (max: three comparisons) or 4·B·C·Ho·Wo (avg: three adds and a scale).
    Bytes = 4·B·C·H·W + 4·B·C·Ho·Wo + (max: B·C·Ho·Wo uint8 argmax).
    """
    out = b * c * (h // 2) * (w // 2)
    return Cost((3 if mode == "max" else 4) * out, F4 * b * c * h * w + F4 * out + (out if mode == "max" else 0))


def pool2x2_bwd_cost(b: int, c: int, h: int, w: int, mode: str, act: str) -> Cost:
    """Route dy to its tap (or spread dy/4), times act'(yconv) of the convolution below.

    FLOPs = B·C·H·W·(1 + act_bwd) (one select or scale per tap, then the derivative).
    Bytes = 4·B·C·Ho·Wo (dy) + (max: B·C·Ho·Wo argmax) + 4·B·C·H·W (yconv) + 4·B·C·H·W (dz).
    """
    out = b * c * (h // 2) * (w // 2)
    full = b * c * h * w
    return Cost(full * (1 + ACT_BWD_FLOPS[act]), F4 * out + (out if mode == "max" else 0) + 2 * F4 * full)


def dense_fwd_cost(b: int, i: int, o: int, act: str) -> Cost:
    """y = act(x·wᵀ + b). FLOPs = 2·B·I·O + B·O·(1 + act_fwd). Bytes = 4·(B·I + O·I + O + B·O).

    C5: 2·B·400·120 + 2·B·120 = 96,240·B.
    """
    return Cost(2 * b * i * o + b * o * (1 + ACT_FWD_FLOPS[act]), F4 * (b * i + o * i + o + b * o))


def dense_bwd_cost(b: int, i: int, o: int, act: str, with_dx: bool = True) -> Cost:
    """dz = dy·act'(y); dw = dzᵀ·x; db = Σ_b dz; dx = dz·w (when asked).

    FLOPs = B·O·act_bwd + 2·B·O·I (dw) + B·O (db) + 2·B·O·I (dx).
    Bytes = 4·(B·I (x) + 2·B·O (y, dy) + O·I + O (dw, db)) + 4·(O·I (w) + B·I (dx)) when dx is asked.
    """
    flops = b * o * ACT_BWD_FLOPS[act] + 2 * b * o * i + b * o + (2 * b * o * i if with_dx else 0)
    nbytes = F4 * (b * i + 2 * b * o + o * i + o) + (F4 * (o * i + b * i) if with_dx else 0)
    return Cost(flops, nbytes)


def softmax_xent_cost(b: int, n: int = 10) -> Cost:
    """Row max, subtract, exp, sum, divide, minus one-hot, scale by 1/B, loss and argmax.

    FLOPs = 6·B·N + 4·B (log, pick, add to the loss, compare to the label).
    Bytes = 4·B·N (logits) + 4·B (labels) + 4·B·N (dlogits) + 2·2·4 (stats read and written).
    """
    return Cost(6 * b * n + 4 * b, F4 * (2 * b * n + b) + 16)


def adam_step_cost(n: int) -> Cost:
    """Adam over n parameters: weight decay 2, m 3, v 4, bias corrections 2, sqrt 1, +eps 1,
    divide 1, ×lr 1, subtract 1 = 16 FLOPs per parameter. Bytes = 4·n·(4 read: p, g, m, v + 3 written)."""
    return Cost(16 * n, F4 * 7 * n)


def sgd_step_cost(n: int) -> Cost:
    """SGD with momentum over n parameters: m = μ·m + g + wd·p (4), p −= lr·m (2) = 6 FLOPs per
    parameter. Bytes = 4·n·(3 read: p, g, m + 2 written)."""
    return Cost(6 * n, F4 * 5 * n)


def lenet_fwd_cost(b: int, cfg: NetConfig) -> Cost:
    """The whole forward pass from uint8 images to logits (one op): the layers' FLOPs (convolutions, pools,
    dense layers, with bias and activation, and the normalisation's 2 per input pixel); bytes = the images,
    the parameters and the logits only (the activations stay on chip: that is the point of the fusion)."""
    act, mode = cfg.activation, cfg.pool
    flops = (2 * b * 32 * 32 + conv2d_fwd_cost(b, 1, 32, 32, 6, 5, 5, act).flops
             + pool2x2_fwd_cost(b, 6, 28, 28, mode).flops + conv2d_fwd_cost(b, 6, 14, 14, 16, 5, 5, act).flops
             + pool2x2_fwd_cost(b, 16, 10, 10, mode).flops + dense_fwd_cost(b, 400, 120, act).flops
             + dense_fwd_cost(b, 120, cfg.f6, act).flops + dense_fwd_cost(b, cfg.f6, 10, "identity").flops)
    return Cost(flops, b * 28 * 28 + F4 * param_layout(cfg)[1] + F4 * b * 10)


def conv2d_bwd_data_pool_cost(b: int, c: int, h: int, k: int, r: int, mode: str, act: str) -> Cost:
    """conv2d_bwd_data into the pooled map (C, h/2 − … ) routed through pool2x2_bwd and act' in one launch:
    the two ops' FLOPs; bytes = dz, w, argmax, yconv read and dz_below written (the pooled-size data
    gradient between them never reaches memory). h is yconv's size (28 at S2), the convolution's input
    is h/2."""
    hp = h // 2
    data = conv2d_bwd_data_cost(b, c, hp, hp, k, r, r)
    pool = pool2x2_bwd_cost(b, c, h, h, mode, act)
    inter = F4 * b * c * hp * hp  # dx at the pooled size: written by one, read by the other when unfused
    return Cost(data.flops + pool.flops, data.bytes + pool.bytes - 2 * inter)


def step_advance_cost() -> Cost:
    """One thread moves the step state on: 3 increments, a compare, at most 3 writes more = 7 integer ops
    (counted as FLOPs). Bytes = 4·8 (the state words read) + 4·8 (written back)."""
    return Cost(7, 2 * F4 * 8)


def conv2d_pool_fwd_cost(b: int, c: int, h: int, w: int, k: int, r: int, s: int, act: str, mode: str) -> Cost:
    """Fused convolution + pooling: the convolution's FLOPs plus the pooling's; bytes as the
    convolution's (its output yconv is still written: backward needs it) plus ypool and argmax written
    (the pooling's read of yconv is saved)."""
    conv = conv2d_fwd_cost(b, c, h, w, k, r, s, act)
    ho, wo = h - r + 1, w - s + 1
    pool = pool2x2_fwd_cost(b, k, ho, wo, mode)
    return Cost(conv.flops + pool.flops, conv.bytes + pool.bytes - F4 * b * k * ho * wo)


def conv2d_bwd_weight_routed_cost(b: int, c: int, h: int, k: int, r: int) -> Cost:
    """The weight gradient from the routed gradient gz (B,K,Hp,Wp) of a conv + 2×2 max pool: each routed window
    meets its C·R·S taps once (a quarter of the dense op's windows).

    FLOPs = 2·B·K·Hp·Wp·C·R·S + B·K·Hp·Wp (db). C3: 2·B·16·25·150 = 120,000·B + 400·B; C1: 2·B·6·196·25 = 58,800·B
    + 1,176·B. Bytes = 4·B·C·H·H (x) + 5·B·K·Hp·Wp (gz and its uint8 route) + 4·(K·C·R·S + K) (dw, db written).
    """
    hp = (h - r + 1) // 2
    g = b * k * hp * hp
    return Cost(2 * g * c * r * r + g, F4 * b * c * h * h + (F4 + 1) * g + F4 * (k * c * r * r + k))


def conv2d_bwd_data_routed_cost(b: int, c: int, h: int, k: int, r: int, act: str) -> Cost:
    """The routed gradient of the layer below, gz_below (B,C,H,H) = data gradient of the scattered gz · act'(y_below).

    FLOPs = 2·B·K·Hp·Wp·C·R·S (each routed output feeds its C·R·S taps: C3 60,000 MACs an image, a quarter of the
    dense 240,000) + B·C·H·H·act_bwd. Bytes = 5·B·K·Hp·Wp (gz, route) + 4·K·C·R·S (w) + 4·B·C·H·H (y_below read)
    + 4·B·C·H·H (gz_below written)."""
    hp = (h - r + 1) // 2
    g = b * k * hp * hp
    below = b * c * h * h
    return Cost(2 * g * c * r * r + below * ACT_BWD_FLOPS[act], (F4 + 1) * g + F4 * k * c * r * r + 2 * F4 * below)


def head_train_cost(b: int, cfg: NetConfig, routed: bool) -> Cost:
    """C5 → F6 → output → softmax cross-entropy → their backward → S4's gradient, in one op.

    FLOPs = the three dense layers forward and backward (dx included down to S4), the loss, and the gradient
    routed into the conv below: routed (yconv None) B·400·act_bwd (gz = dx·act'(S4)); dense, pool2x2_bwd's at S4.
    Bytes (compulsory): S4 4·400·B and the labels 4·B read; the head's weights read and their gradients written
    (4·2·(48,120 + (120 + 1)·F6 + (F6 + 1)·10)); h1, h2 and the logits written 4·B·(120 + F6 + 10); the loss row 8;
    the gradient into the conv: routed 4·400·B written; dense the conv output (4·1,600·B) and the routes (400·B)
    read and 4·1,600·B written."""
    act, f6 = cfg.activation, cfg.f6
    layers = ((400, 120, act), (120, f6, act), (f6, 10, "identity"))
    flops = sum(dense_fwd_cost(b, i, o, a).flops + dense_bwd_cost(b, i, o, a).flops for i, o, a in layers)
    flops += softmax_xent_cost(b).flops
    weights = sum(o * i + o for i, o, _ in layers)
    nbytes = F4 * 400 * b + F4 * b + 2 * F4 * weights + F4 * b * (120 + f6 + 10) + 2 * F4
    if routed:
        return Cost(flops + b * 400 * ACT_BWD_FLOPS[act], nbytes + F4 * 400 * b)
    route = pool2x2_bwd_cost(b, 16, 10, 10, cfg.pool, act)
    return Cost(flops + route.flops, nbytes + route.bytes - F4 * 400 * b)  # dS4 stays on chip


def step_fwd_cost(b: int, cfg: NetConfig) -> Cost:
    """The four-kernel step's forward: batch_prepare (gather, shift, pad, normalise) → C1 → act → max pool → C3 →
    act → max pool, in one op.

    FLOPs = batch_prepare's 2·B·1,024 + C1 + S2 + C3 + S4 (conv2d_pool_fwd's). Bytes: the gathered pixels
    784·B, labels B and perm entries 4·B read; the conv weights 4·(156 + 2,416) read; x 4·1,024·B and y 4·B
    written (step_bwd reads x); S2 and its routes 5·1,176·B, S4 and its routes 5·400·B written; the step state,
    schedule row and srow ≈ 64 (the un-pooled conv outputs never reach memory)."""
    act = cfg.activation
    flops = (2 * b * 32 * 32 + conv2d_pool_fwd_cost(b, 1, 32, 32, 6, 5, 5, act, "max").flops
             + conv2d_pool_fwd_cost(b, 6, 14, 14, 16, 5, 5, act, "max").flops)
    nbytes = (b * 28 * 28 + b + F4 * b + F4 * (156 + 2416) + F4 * b * 1024 + F4 * b
              + (F4 + 1) * b * 1176 + (F4 + 1) * b * 400 + 64)
    return Cost(flops, nbytes)


def step_bwd_cost(b: int, groups: int, act: str) -> Cost:
    """The four-kernel step's conv backward, from S4's routed gradient: C3's routed weight gradient (60,000 MACs an
    image), C3's routed data gradient (60,000) times act'(S2), C1's routed weight gradient (29,400), and the two
    bias sums, into ``groups`` partial rows of 2,624 floats.

    FLOPs = 2·149,400·B + B·1,176·act_bwd + B·(400 + 1,176) (db3, db1). Bytes: x 4·1,024·B, S2 4·1,176·B, gz3
    4·400·B and the routes 400·B + 1,176·B read; w3 4·2,400; the partials 4·2,624·groups written."""
    flops = 2 * 149_400 * b + b * 1176 * ACT_BWD_FLOPS[act] + b * (400 + 1176)
    nbytes = b * (F4 * 1024 + F4 * 1176 + F4 * 400 + 400 + 1176) + F4 * 2400 + F4 * 2624 * groups
    return Cost(flops, nbytes)


def step_update_cost(op: str, groups: int, n: int) -> Cost:
    """The four-kernel step's update: the conv gradients' partial rows added in group order into g's first 2,624
    entries, then Adam (or SGD) over the n parameters and step_advance, in one op.

    FLOPs = 2,624·groups (the sum) + the optimizer's + step_advance's 7. Bytes = 4·2,624·groups (the partials
    read) + 4·2,624 (g's conv prefix written) + the optimizer's + the schedule row 16 + the state 2·32."""
    opt = adam_step_cost(n) if op == "step_adam" else sgd_step_cost(n)
    adv = step_advance_cost()
    return Cost(2624 * groups + opt.flops + adv.flops, F4 * 2624 * groups + F4 * 2624 + opt.bytes + 16 + adv.bytes)


# ------------------------------------------------------------------------------------------ sites


@dataclass(frozen=True)
class ConvSite:
    c: int
    h: int
    k: int
    r: int

    @property
    def ho(self) -> int:
        return self.h - self.r + 1


CONV_SITES = {"C1": ConvSite(1, 32, 6, 5), "C3": ConvSite(6, 14, 16, 5)}
POOL_SITES = {"S2": (6, 28), "S4": (16, 10)}  # (channels, input size)


def dense_sites(cfg: NetConfig) -> dict[str, tuple[int, int, str]]:
    """(in, out, activation) of the three dense layers."""
    return {"C5": (400, 120, cfg.activation), "F6": (120, cfg.f6, cfg.activation), "OUT": (cfg.f6, 10, "identity")}


def sites(op: str, cfg: NetConfig) -> list[str]:
    """Where a training step calls ``op`` (empty for an op this module has no case for)."""
    return {
        "batch_prepare": ["input"],
        "conv2d_fwd": ["C1", "C3"],
        "conv2d_pool_fwd": ["C1+S2", "C3+S4"],
        "pool2x2_fwd": ["S2", "S4"],
        "dense_fwd": ["C5", "F6", "OUT"],
        "softmax_xent": ["OUT"],
        "dense_bwd": ["OUT", "F6", "C5"],
        "pool2x2_bwd": ["S4", "S2"],
        "conv2d_bwd_data": ["C3"],
        "conv2d_bwd_weight": ["C3", "C1"],
        "adam_step": ["params"],
        "sgd_step": ["params"],
        "step_advance": ["state"],
        "conv2d_bwd_data_pool": ["C3+S2"],
        "lenet_fwd": ["network"],
    }.get(op) or [label for label, _ in checks.lenet_sets(op, 1, 1, cfg.activation, cfg.pool, cfg.f6)
                  if op in FUSED_FROM_CHECKS]


#: ops cased through the self-test's builders (lenet_gpu.selftest.checks.lenet_sets) at LeNet-5's shapes: the
#: routed ops, the routed head and the four-kernel step's ops (all for max pooling only), and head_train
FUSED_FROM_CHECKS = ("head_train", "conv2d_bwd_weight_routed", "conv2d_bwd_data_routed", "step_fwd", "step_bwd",
                     "step_adam", "step_sgd")
#: ops whose partial rows depend on the backend's plan (``backend.step_groups(batch)``)
GROUPED_OPS = ("step_bwd", "step_adam", "step_sgd")
#: ops that exist for max pooling only (no case under avg)
MAX_ONLY_OPS = ("conv2d_bwd_weight_routed", "conv2d_bwd_data_routed", "step_fwd", "step_bwd", "step_adam",
                "step_sgd")


def op_groups(backend: Any, op: str, batch: int) -> int:
    """The partial rows ``op`` works on at ``batch`` on ``backend`` (its ``step_groups``, as the model's
    workspace), 1 for an op without partials."""
    return step_groups_of(backend, batch) if op in GROUPED_OPS else 1


def op_cost(op: str, site: str, batch: int, cfg: NetConfig, groups: int = 1) -> Cost:
    """FLOPs and bytes of one call of ``op`` at ``site`` (batch ignored for the optimizer ops; ``groups``: the
    partial rows of the four-kernel step's ops)."""
    act, mode = cfg.activation, cfg.pool
    if op == "head_train":
        return head_train_cost(batch, cfg, routed=site.endswith("routed"))
    if op == "conv2d_bwd_weight_routed":
        cs = CONV_SITES[site]
        return conv2d_bwd_weight_routed_cost(batch, cs.c, cs.h, cs.k, cs.r)
    if op == "conv2d_bwd_data_routed":
        return conv2d_bwd_data_routed_cost(batch, 6, 14, 16, 5, act)
    if op == "step_fwd":
        return step_fwd_cost(batch, cfg)
    if op == "step_bwd":
        return step_bwd_cost(batch, groups, act)
    if op in ("step_adam", "step_sgd"):
        return step_update_cost(op, groups, param_layout(cfg)[1])
    if op == "batch_prepare":
        return batch_prepare_cost(batch)
    if op in ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight", "conv2d_pool_fwd"):
        cs = CONV_SITES[site.split("+")[0]]
        geo = (batch, cs.c, cs.h, cs.h, cs.k, cs.r, cs.r)
        if op == "conv2d_fwd":
            return conv2d_fwd_cost(*geo, act)
        if op == "conv2d_bwd_data":
            return conv2d_bwd_data_cost(*geo)
        if op == "conv2d_bwd_weight":
            return conv2d_bwd_weight_cost(*geo)
        return conv2d_pool_fwd_cost(*geo, act, mode)
    if op in ("pool2x2_fwd", "pool2x2_bwd"):
        c, h = POOL_SITES[site]
        if op == "pool2x2_fwd":
            return pool2x2_fwd_cost(batch, c, h, h, mode)
        return pool2x2_bwd_cost(batch, c, h, h, mode, act)
    if op in ("dense_fwd", "dense_bwd"):
        i, o, a = dense_sites(cfg)[site]
        return dense_fwd_cost(batch, i, o, a) if op == "dense_fwd" else dense_bwd_cost(batch, i, o, a)
    if op == "softmax_xent":
        return softmax_xent_cost(batch)
    if op == "step_advance":
        return step_advance_cost()
    if op == "lenet_fwd":
        return lenet_fwd_cost(batch, cfg)
    if op == "conv2d_bwd_data_pool":
        return conv2d_bwd_data_pool_cost(batch, 6, 28, 16, 5, mode, act)
    n = param_layout(cfg)[1]
    if op == "adam_step":
        return adam_step_cost(n)
    if op == "sgd_step":
        return sgd_step_cost(n)
    raise KeyError(f"no cost formula for op {op!r}")


def all_ops(backend: Any) -> list[str]:
    """The ops a backend offers, in training-step order (protocol ops, then optional, then any other)."""
    have = list(getattr(backend, "variants", {}))
    known = [op for op in (*OPS, *OPTIONAL_OPS) if op in have]
    return known + [op for op in have if op not in known]


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Spec:
    """Host-side inputs, output shapes, the reference answer and how to call the op."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, tuple[tuple[int, ...], Any]]
    expect: dict[str, np.ndarray]
    call: Callable[[Any, dict[str, Any], str], None]
    tol: dict[str, tuple[float, float]] = field(default_factory=dict)
    exact: tuple[str, ...] = ()  # outputs compared for equality
    #: where set, the validation instead: check(outputs read back by name, what) raises AssertionError
    check: Callable[[dict[str, np.ndarray], str], None] | None = None


def _rng(op: str, site: str, batch: int | None) -> np.random.Generator:
    key = [sum(map(ord, op)), sum(map(ord, site)), batch or 0]
    return np.random.default_rng(key)


def _randn(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def _spec_from_checks(op: str, site: str, batch: int, cfg: NetConfig, groups: int) -> Spec:
    """The self-test's input set of ``op`` at ``site`` (lenet_gpu.selftest.checks.lenet_sets), as a case: its
    arrays uploaded by name, its call bound positionally, its own comparison as the validation."""
    found = [iset for label, iset in checks.lenet_sets(op, batch, groups, cfg.activation, cfg.pool, cfg.f6)
             if label == site]
    if not found:
        raise KeyError(f"no benchmark case for op {op!r} at site {site!r} ({cfg.pool} pooling)")
    cs = found[0].spec()
    inputs = {a.name: a.value for a in cs.args if a.kind in ("in", "inout")}
    outputs = {a.name: (a.value.shape, a.value.dtype) for a in cs.args if a.kind == "out"}
    if cs.state_kw is not None:
        inputs["state_kw"] = cs.state_kw

    def call(be: Any, arrs: dict[str, Any], variant: str) -> None:
        args = [arrs[a.name] if a.kind in ("in", "out", "inout") else None if a.kind == "none" else a.value
                for a in cs.args]
        kwargs = dict(cs.kwargs)
        if cs.state_kw is not None and checks.accepts(getattr(be, op), "state"):
            kwargs["state"] = arrs["state_kw"]
        getattr(be, op)(*args, variant=variant, **kwargs)

    def check(got: dict[str, np.ndarray], what: str) -> None:
        checks.check_outputs(cs, got, what)

    return Spec(inputs, outputs, {}, call, check=check)


def make_spec(op: str, site: str, batch: int, cfg: NetConfig, groups: int = 1) -> Spec:
    """Seeded inputs at the LeNet shape of ``site`` and the float64 reference answer (``groups``: the partial rows
    of the four-kernel step's ops, ``op_groups``)."""
    if op in FUSED_FROM_CHECKS:
        return _spec_from_checks(op, site, batch, cfg, groups)
    rng = _rng(op, site, batch)
    act, mode, b = cfg.activation, cfg.pool, batch
    t = TOL.get(op, (1e-5, 1e-5))

    if op == "batch_prepare":
        n = b + 7  # a dataset a little larger than the batch, read at an offset through a permutation
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        perm = rng.permutation(n).astype(np.int32)
        off = 3 if n - 3 >= b else 0
        idx = perm[off : off + b]
        x = (np.pad(images[idx].astype(np.float64), ((0, 0), (2, 2), (2, 2))) / 255.0 - MNIST_MEAN) / MNIST_STD
        state = HostState(offset=off).to_array()  # the batch's offset lives in the device step state
        return Spec(
            {"images": images, "labels": labels, "perm": perm, "state": state},
            {"x": ((b, 1, 32, 32), np.float32), "y": ((b,), np.int32)},
            {"x": x[:, None], "y": labels[idx].astype(np.int32)},
            lambda be, a, v: be.batch_prepare(
                a["images"], a["labels"], a["perm"], a["state"], a["x"], a["y"], MNIST_MEAN, MNIST_STD, variant=v
            ),
            {"x": t},
            exact=("y",),
        )

    if op in ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight", "conv2d_pool_fwd"):
        cs = CONV_SITES[site.split("+")[0]]
        xs, ws, ys = (b, cs.c, cs.h, cs.h), (cs.k, cs.c, cs.r, cs.r), (b, cs.k, cs.ho, cs.ho)
        w = _randn(rng, ws, (1.0 / (cs.c * cs.r * cs.r)) ** 0.5)
        if op == "conv2d_fwd":
            x, bias = _randn(rng, xs), _randn(rng, (cs.k,), 0.1)
            y = ref.conv2d_fwd(_f64(x), _f64(w), _f64(bias), act)
            return Spec(
                {"x": x, "w": w, "b": bias}, {"y": (ys, np.float32)}, {"y": y},
                lambda be, a, v: be.conv2d_fwd(a["x"], a["w"], a["b"], a["y"], act, variant=v), {"y": t},
            )
        if op == "conv2d_pool_fwd":
            x, bias = _randn(rng, xs), _randn(rng, (cs.k,), 0.1)
            y = ref.conv2d_fwd(_f64(x), _f64(w), _f64(bias), act)
            yp, am = ref.pool2x2_fwd(y, mode)
            ps = (b, cs.k, cs.ho // 2, cs.ho // 2)
            outs = {"yconv": (ys, np.float32), "ypool": (ps, np.float32), "argmax": (ps, np.uint8)}
            expect = {"yconv": y, "ypool": yp}
            if mode == "max":
                expect["argmax"] = am
            return Spec(
                {"x": x, "w": w, "b": bias}, outs, expect,
                lambda be, a, v: be.conv2d_pool_fwd(
                    a["x"], a["w"], a["b"], a["yconv"], a["ypool"], a["argmax"], act, mode, variant=v
                ),
                {"yconv": TOL["conv2d_fwd"], "ypool": TOL["conv2d_fwd"]},
                exact=("argmax",),
            )
        # upstream gradients carry the 1/B of the mean loss, as in training: the batch-long reductions of
        # the weight gradient then stay O(1) and parity.TOL holds at every batch size
        dz = _randn(rng, ys, 1.0 / b)
        x = _randn(rng, xs)
        dx, dw, db = ref.conv2d_bwd(_f64(x), _f64(w), _f64(dz), _f64(dz), "identity")
        if op == "conv2d_bwd_data":
            return Spec(
                {"dz": dz, "w": w}, {"dx": (xs, np.float32)}, {"dx": dx},
                lambda be, a, v: be.conv2d_bwd_data(a["dz"], a["w"], a["dx"], variant=v), {"dx": t},
            )
        return Spec(
            {"x": x, "dz": dz}, {"dw": (ws, np.float32), "db": ((cs.k,), np.float32)}, {"dw": dw, "db": db},
            lambda be, a, v: be.conv2d_bwd_weight(a["x"], a["dz"], a["dw"], a["db"], variant=v),
            {"dw": t, "db": t},
        )

    if op in ("pool2x2_fwd", "pool2x2_bwd"):
        c, h = POOL_SITES[site]
        xs, ps = (b, c, h, h), (b, c, h // 2, h // 2)
        x = _randn(rng, xs)
        yp, am = ref.pool2x2_fwd(_f64(x), mode)
        if op == "pool2x2_fwd":
            expect = {"y": yp}
            if mode == "max":
                expect["argmax"] = am
            return Spec(
                {"x": x}, {"y": (ps, np.float32), "argmax": (ps, np.uint8)}, expect,
                lambda be, a, v: be.pool2x2_fwd(a["x"], a["y"], a["argmax"], mode, variant=v),
                {"y": t}, exact=("argmax",),
            )
        dy = _randn(rng, ps)
        yconv = ref.activate(_randn(rng, xs), act).astype(np.float32)
        argmax = am if am is not None else np.zeros(ps, np.uint8)
        dz = ref.pool2x2_bwd(_f64(dy), am, mode, (h, h)) * ref.activation_grad(_f64(yconv), act)
        return Spec(
            {"dy": dy, "argmax": argmax, "yconv": yconv}, {"dz": (xs, np.float32)}, {"dz": dz},
            lambda be, a, v: be.pool2x2_bwd(a["dy"], a["argmax"], a["yconv"], a["dz"], mode, act, variant=v),
            {"dz": t},
        )

    if op in ("dense_fwd", "dense_bwd"):
        i, o, a_ = dense_sites(cfg)[site]
        x, w, bias = _randn(rng, (b, i)), _randn(rng, (o, i), (1.0 / i) ** 0.5), _randn(rng, (o,), 0.1)
        if op == "dense_fwd":
            return Spec(
                {"x": x, "w": w, "b": bias}, {"y": ((b, o), np.float32)},
                {"y": ref.dense_fwd(_f64(x), _f64(w), _f64(bias), a_)},
                lambda be, a, v: be.dense_fwd(a["x"], a["w"], a["b"], a["y"], a_, variant=v), {"y": t},
            )
        y = ref.activate(_randn(rng, (b, o)), a_).astype(np.float32)
        dy = _randn(rng, (b, o), 1.0 / b)  # the 1/B of the mean loss, as in training
        dx, dw, db = ref.dense_bwd(_f64(x), _f64(w), _f64(y), _f64(dy), a_)
        return Spec(
            {"x": x, "w": w, "y": y, "dy": dy},
            {"dx": ((b, i), np.float32), "dw": ((o, i), np.float32), "db": ((o,), np.float32)},
            {"dx": dx, "dw": dw, "db": db},
            lambda be, a, v: be.dense_bwd(a["x"], a["w"], a["y"], a["dy"], a["dx"], a["dw"], a["db"], a_, variant=v),
            {"dx": t, "dw": t, "db": t},
        )

    if op == "softmax_xent":
        logits = _randn(rng, (b, 10), 3.0)
        labels = rng.integers(0, 10, b).astype(np.int32)
        loss, dlogits = ref.softmax_xent(_f64(logits), labels)
        first_max = np.argmax(logits, axis=1)
        # one stats row: the op writes row STEP_IN_EPOCH mod 1 = 0 (STEP_IN_EPOCH 3 checks the modulo)
        stats = np.array([[loss * b, float((first_max == labels).sum())]])
        return Spec(
            {"logits": logits, "labels": labels, "state": HostState(step_in_epoch=3).to_array()},
            {"dlogits": ((b, 10), np.float32), "stats": ((1, 2), np.float32)},
            {"dlogits": dlogits, "stats": stats},
            lambda be, a, v: be.softmax_xent(a["logits"], a["labels"], a["dlogits"], a["stats"], a["state"], variant=v),
            # the loss sum is a float32 sum of B terms: allow a relative 1e-5·log2(B)-ish slack
            {"dlogits": t, "stats": (1e-4, 1e-4)},
        )

    if op in ("adam_step", "sgd_step"):
        n = param_layout(cfg)[1]
        p, g = _randn(rng, (n,), 0.1), _randn(rng, (n,), 0.01)
        if op == "adam_step":
            m, v2 = _randn(rng, (n,), 1e-3), np.abs(_randn(rng, (n,), 1e-4))
            step, lr, b1, b2, eps, wd = 3, 1e-3, 0.9, 0.999, 1e-8, 0.0
            # Adam's t = 3: the state's STEP is 2, and the schedule's one row (lr, bc1, bc2) is that step's
            sched = schedule_table(np.array([lr]), step - 1, b1, b2)
            state = HostState(step=step - 1, sched_base=step - 1).to_array()
            pe, me, ve = ref.adam_update(_f64(p), _f64(g), _f64(m), _f64(v2), step, lr, b1, b2, eps, wd)
            return Spec(
                {"p": p, "g": g, "m": m, "v": v2, "sched": sched, "state": state}, {}, {"p": pe, "m": me, "v": ve},
                lambda be, a, v: be.adam_step(a["p"], a["g"], a["m"], a["v"], a["sched"], a["state"], b1, b2, eps, wd,
                                              variant=v),
                {"p": t, "m": t, "v": t},
            )
        m = _randn(rng, (n,), 1e-3)
        lr, mom, wd = 0.05, 0.9, 0.0
        pe, me = ref.sgd_update(_f64(p), _f64(g), _f64(m), lr, mom, wd)
        sched = schedule_table(np.array([lr]), 0, 0.9, 0.999)  # sgd reads the lr column only
        return Spec(
            {"p": p, "g": g, "m": m, "sched": sched, "state": HostState().to_array()}, {}, {"p": pe, "m": me},
            lambda be, a, v: be.sgd_step(a["p"], a["g"], a["m"], a["sched"], a["state"], mom, wd, variant=v),
            {"p": t, "m": t},
        )

    if op == "lenet_fwd":
        images = rng.integers(0, 256, (b, 28, 28), dtype=np.uint8)
        params = {k: np.ascontiguousarray(v) for k, v in views(init_params(cfg, 0), cfg).items()}
        logits = ref.lenet_fwd(images, params, MNIST_MEAN, MNIST_STD, act, mode)
        return Spec(
            {"images": images, **params}, {"logits": ((b, 10), np.float32)}, {"logits": logits},
            lambda be, a, v: be.lenet_fwd(a["images"], {k: a[k] for k in params}, a["logits"], MNIST_MEAN, MNIST_STD,
                                          act, mode, variant=v),
            {"logits": TOL["lenet_fwd"]},
        )

    if op == "conv2d_bwd_data_pool":
        # C3's pre-activation gradient routed down through S2 and C1's activation: dz (B,16,10,10), yconv C1's
        # activated output (B,6,28,28) and the argmax of its pooling
        yconv = ref.activate(_randn(rng, (b, 6, 28, 28)), act).astype(np.float32)
        _, am = ref.pool2x2_fwd(_f64(yconv), mode)
        w = _randn(rng, (16, 6, 5, 5), (1.0 / 150) ** 0.5)
        dz = _randn(rng, (b, 16, 10, 10), 1.0 / b)
        argmax = am if am is not None else np.zeros((b, 6, 14, 14), np.uint8)
        want = ref.conv2d_bwd_data_pool(_f64(dz), _f64(w), am, _f64(yconv), mode, act)
        return Spec(
            {"dz": dz, "w": w, "argmax": argmax, "yconv": yconv}, {"dz_below": ((b, 6, 28, 28), np.float32)},
            {"dz_below": want},
            lambda be, a, v: be.conv2d_bwd_data_pool(a["dz"], a["w"], None if mode == "avg" else a["argmax"],
                                                     a["yconv"], a["dz_below"], mode, act, variant=v),
            {"dz_below": TOL["conv2d_bwd_data_pool"]},
        )

    if op == "step_advance":
        # the last step of an epoch: the counters move on and wrap to the next epoch
        before = HostState(step=41, sched_base=3, step_in_epoch=6, offset=6 * STEP_ADVANCE_BATCH, epoch=2,
                           steps_per_epoch=7, seed=5, shift=2)
        after = advance(before, STEP_ADVANCE_BATCH)
        return Spec(
            {"state": before.to_array()}, {}, {"state": after.to_array()},
            lambda be, a, v: be.step_advance(a["state"], STEP_ADVANCE_BATCH, variant=v),
            exact=("state",),
        )

    raise KeyError(f"no benchmark case for op {op!r}")


@dataclass
class OpCase:
    """One op at one site, batch and variant on one backend: ``validate()`` then time ``launch()``."""

    op: str
    site: str
    batch: int | None
    variant: str
    cost: Cost
    launch: Callable[[], None]
    validate: Callable[[], None]


def build_case(
    backend: Any, op: str, site: str, batch: int | None, variant: str, cfg: NetConfig, spec: Spec | None = None
) -> OpCase:
    """Upload ``spec``'s inputs (``make_spec`` when not given), allocate outputs, bind the launch. A given spec
    must have been made with this backend's ``op_groups``."""
    b = 1 if batch is None else batch
    groups = op_groups(backend, op, b)
    spec = spec or make_spec(op, site, b, cfg, groups)
    be = backend
    arrays: dict[str, Any] = {k: be.to_device(v) for k, v in spec.inputs.items()}
    for name, (shape, dtype) in spec.outputs.items():
        arrays[name] = be.to_device(nan_like(shape, dtype))

    def launch() -> None:
        spec.call(be, arrays, variant)

    def validate() -> None:
        for k, v in spec.inputs.items():
            be.upload(arrays[k], v)
        for name, (shape, dtype) in spec.outputs.items():
            be.upload(arrays[name], nan_like(shape, dtype))
        launch()
        be.synchronize()
        where = f"{be.name} {op} {site} batch {batch} variant {variant}"
        if spec.check is not None:
            names = [*(k for k in spec.inputs if k != "state_kw"), *spec.outputs]
            spec.check({k: be.to_host(arrays[k]) for k in names}, where)
        for name, want in spec.expect.items():
            got = be.to_host(arrays[name])
            if name in spec.exact:
                assert_equal(got, want, f"{where}: {name}")
            else:
                atol, rtol = spec.tol.get(name, TOL.get(op, (1e-5, 1e-5)))
                assert_close(got, want, atol, rtol, f"{where}: {name}")

    return OpCase(op, site, batch, variant, op_cost(op, site, b, cfg, groups), launch, validate)
