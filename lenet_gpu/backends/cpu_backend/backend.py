"""CpuBackend: the Backend protocol (lenet_gpu.backends.base) over the Numba @njit kernels of this package.

Arrays are NumPy arrays. Each op wrapper looks up a plan for its argument shapes (the kernel, compiled on
first use or loaded from Numba's disk cache, and its workspaces), made once per shape: the checks run
then, and the workspaces are allocated then (counted in ``counters.allocs``), so a training step after
warm-up allocates nothing. Kernels run on Numba's thread pool (``threads``, else LENET_GPU_NUM_THREADS, else Numba's
default); their results do not depend on the number of threads (see common.py).
"""

from __future__ import annotations

import os
from typing import Any

import numba
import numpy as np

from ...spec import conv_prefix, param_layout
from ..base import ACT_CODES, OPS, OPTIONAL_OPS, POOL_CODES, STEP_OPS, Counters, HostMemory, check_act, check_mode
from . import batch, conv2d, dense, head, launch, lenet_fwd, loss, native, optim, pool2x2, routed, step4, warm
from .common import L, nchunks

F32 = np.float32

#: kernels of fixed shape, by name; the register-blocked ones are made per block size (conv2d.make_*)
KERNELS: dict[str, Any] = {}
for _m in (batch, loss, optim, pool2x2, dense, head, step4):
    KERNELS.update(_m.KERNELS)
KERNELS.update({
    "conv2d_fwd_v1": conv2d.conv2d_fwd_v1,
    "conv2d_bwd_data_v1": conv2d.conv2d_bwd_data_v1,
    "conv2d_bwd_weight_v1": conv2d.conv2d_bwd_weight_v1,
})

VARIANTS: dict[str, tuple[str, ...]] = {
    "batch_prepare": ("v1",),
    "conv2d_fwd": ("v1",),
    "pool2x2_fwd": ("v1",),
    "dense_fwd": ("v1",),
    "softmax_xent": ("v1",),
    "dense_bwd": ("v1",),
    "pool2x2_bwd": ("v1",),
    "conv2d_bwd_data": ("v1",),
    "conv2d_bwd_weight": ("v1", "v2", "v3"),
    "adam_step": ("v1",),
    "sgd_step": ("v1",),
    "step_advance": ("v1",),
    "conv2d_pool_fwd": ("v1", "v2"),
    "head_train": ("v1",),
    "conv2d_bwd_data_pool": ("v1",),
    "lenet_fwd": ("v1",),
    "conv2d_bwd_weight_routed": ("v1", "v2", "v3"),
    "conv2d_bwd_data_routed": ("v1",),
    **step4.VARIANTS,
}
#: the routed backward of max pooling (docs/routed_backward.md): optional ops of this backend
ROUTED_OPS = ("conv2d_bwd_weight_routed", "conv2d_bwd_data_routed")
assert set(OPS) | set(OPTIONAL_OPS) <= set(VARIANTS) <= set(OPS) | set(OPTIONAL_OPS) | set(ROUTED_OPS) | set(STEP_OPS)

#: "auto": the kernel is chosen by shape: the lanes kernel for narrow maps, the rows kernel for wide ones
DEFAULT_VARIANTS = {op: ("auto" if len(vs) > 1 else vs[0]) for op, vs in VARIANTS.items()}
#: output maps at least this wide use the rows kernels (LeNet: C1's 28 columns; C3's 10 use lanes)
ROWS_MIN_WIDTH = 24


def _default_threads() -> int | None:
    env = os.environ.get("LENET_GPU_NUM_THREADS")
    return max(1, int(env)) if env else None


def _act(act: str) -> int:
    code = ACT_CODES.get(act)
    if code is None:
        check_act(act)  # raises
    return code


def _mode(mode: str) -> int:
    code = POOL_CODES.get(mode)
    if code is None:
        check_mode(mode)  # raises
    return code


def _need(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {msg}")


def _check_arrays(op: str, **arrays: Any) -> None:
    for name, a in arrays.items():
        if a is None:
            continue
        _need(isinstance(a, np.ndarray), op, f"{name} must be a NumPy array, got {type(a).__name__}")
        _need(a.flags.c_contiguous, op, f"{name} must be C-contiguous")


def _check_f32(op: str, **arrays: Any) -> None:
    _check_arrays(op, **arrays)
    for name, a in arrays.items():
        if a is not None:
            _need(a.dtype == np.float32, op, f"{name} must be float32, got {a.dtype}")


class CpuBackend(HostMemory):
    """The CPU backend in Numba @njit kernels (see the package docstring)."""

    name = "cpu"
    is_gpu = False

    def __init__(self, threads: int | None = None) -> None:
        self.counters = Counters()
        self.variants: dict[str, tuple[str, ...]] = dict(VARIANTS)
        self.default_variants: dict[str, str] = dict(DEFAULT_VARIANTS)
        threads = threads or _default_threads()
        if threads:  # else Numba's own setting (NUMBA_NUM_THREADS, default: the cores)
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.threads = numba.get_num_threads()
        #: per-thread workspaces are sized for every thread Numba may run
        self._slots = numba.config.NUMBA_NUM_THREADS
        self._plans: dict[tuple, tuple] = {}
        self._dummy_f = np.zeros((1, 1, 1, 1), np.float32)
        self._dummy_u8 = np.zeros((1, 1, 1, 1), np.uint8)

    def first_run_note(self) -> str | None:
        """A line for the user when the first step will compile the kernels (an empty Numba cache)."""
        if not warm.cache_is_cold():
            return None
        # measured with bench.cpu_peak's first-run children: 8-9 s on two cores of an AVX-512 Zen 4, 15.6 s on a 2-core
        # Zen 1 (2026-12-06/07); serially 13-14 s and 27-29 s
        took = "8-16 s on 2 cores, compiling on two" if warm.enabled() else "13-29 s on one core"
        return (f"first run: the first step compiles the cpu kernels into Numba's cache ({took}); later runs "
                "load them in under a second")

    def compile_ahead(self, options: dict[str, Any], fused: bool, step: warm.ScratchStep) -> None:
        """Before a model's first step: with an empty Numba cache, compile its step's kernels on two cores
        through the model's scratch ``step`` (warm.compile_ahead; once per process, nothing when the cache is
        warm)."""
        warm.compile_ahead(options, fused, self.threads, step)

    def _ws(self, *shape: int, dtype: Any = np.float32) -> np.ndarray:
        """A zeroed workspace, 64-byte aligned (counted as an allocation; made once per plan)."""
        return self.zeros(shape, dtype)

    def _check_variant(self, op: str, variant: str | None) -> None:
        """Every op's first line: None, "auto" and the op's variants run; another name is an error, before anything
        is counted or run."""
        if variant is not None and variant != "auto" and variant not in self.variants[op]:
            have = ", ".join(self.variants[op])
            raise ValueError(f"{op}: unknown variant {variant!r}; expected one of {have} or auto")

    def _variant(self, op: str, variant: str | None, width: int) -> str:
        """The variant an op of two or more runs (its name checked already): "auto" (or None, where it is the
        default) by the output width."""
        v = variant or self.default_variants[op]
        if v == "auto":
            return self.variants[op][-1] if width >= ROWS_MIN_WIDTH else self.variants[op][-2]
        return v

    # ------------------------------------------------------------------ ops: batch, loss, optimizers
    def batch_prepare(self, images, labels, perm, state, x, y, mean, std, variant=None) -> None:
        self._check_variant("batch_prepare", variant)
        self.counters.launches += 1
        key = ("batch_prepare", images.shape, perm.shape, x.shape, y.shape)
        if key not in self._plans:
            op = "batch_prepare"
            _check_arrays(op, images=images, labels=labels, perm=perm, state=state, x=x, y=y)
            _need(images.dtype == np.uint8 and labels.dtype == np.uint8, op, "images and labels must be uint8")
            _need(perm.dtype == np.int32 and state.dtype == np.int32 and y.dtype == np.int32, op,
                  "perm, state and y must be int32")
            _need(x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == 1 and y.shape == (x.shape[0],), op,
                  f"x must be (B,1,H,W) float32 and y (B,), got {x.shape}, {y.shape}")
            _need(x.shape[2] >= images.shape[1] and x.shape[3] >= images.shape[2], op, "x smaller than the images")
            self._plans[key] = ()
        batch.batch_prepare_v1(images, labels, perm, state, x, y, F32(1.0 / (255.0 * std)), F32(-mean / std))

    def step_advance(self, state, batch_size, variant=None) -> None:
        self._check_variant("step_advance", variant)
        self.counters.launches += 1
        batch.step_advance_v1(state, batch_size)

    def softmax_xent(self, logits, labels, dlogits, stats, state, variant=None) -> None:
        self._check_variant("softmax_xent", variant)
        self.counters.launches += 1
        key = ("softmax_xent", logits.shape, stats.shape)
        plan = self._plans.get(key)
        if plan is None:
            _check_f32("softmax_xent", logits=logits, dlogits=dlogits, stats=stats)
            _need(labels.shape == (logits.shape[0],) and dlogits.shape == logits.shape, "softmax_xent",
                  "labels (B,) and dlogits (B, NC) must match logits")
            plan = self._plans[key] = (self._ws(nchunks(logits.shape[0]), 2, dtype=np.float64),)
        loss.softmax_xent_v1(logits, labels, dlogits, stats, state, plan[0])

    def adam_step(self, p, g, m, v, sched, state, beta1, beta2, eps, weight_decay, variant=None) -> None:
        self._check_variant("adam_step", variant)
        self.counters.launches += 1
        key = ("adam_step", p.shape)
        if key not in self._plans:
            _check_f32("adam_step", p=p, g=g, m=m, v=v, sched=sched)
            _need(p.shape == g.shape == m.shape == v.shape, "adam_step", "p, g, m, v must have one shape")
            self._plans[key] = ()
        optim.adam_step_v1(p, g, m, v, sched, state, F32(beta1), F32(beta2), F32(eps), F32(weight_decay),
                           F32(1 - beta1), F32(1 - beta2))

    def sgd_step(self, p, g, m, sched, state, momentum, weight_decay, variant=None) -> None:
        self._check_variant("sgd_step", variant)
        self.counters.launches += 1
        key = ("sgd_step", p.shape)
        if key not in self._plans:
            _check_f32("sgd_step", p=p, g=g, m=m, sched=sched)
            _need(p.shape == g.shape == m.shape, "sgd_step", "p, g, m must have one shape")
            self._plans[key] = ()
        optim.sgd_step_v1(p, g, m, sched, state, F32(momentum), F32(weight_decay))

    # ------------------------------------------------------------------ ops: unfused layers (v1)
    def conv2d_fwd(self, x, w, b, y, act, variant=None) -> None:
        self._check_variant("conv2d_fwd", variant)
        self.counters.launches += 1
        code = _act(act)
        self._check_conv("conv2d_fwd", x, w, y, b=b)
        conv2d.conv2d_fwd_v1(x, w, b, y, code)

    def conv2d_bwd_data(self, dz, w, dx, variant=None) -> None:
        self._check_variant("conv2d_bwd_data", variant)
        self.counters.launches += 1
        self._check_conv("conv2d_bwd_data", dx, w, dz)
        conv2d.conv2d_bwd_data_v1(dz, w, dx)

    def conv2d_bwd_weight(self, x, dz, dw, db, state=None, variant=None) -> None:
        self._check_variant("conv2d_bwd_weight", variant)
        v = self._variant("conv2d_bwd_weight", variant, dz.shape[3])
        self.counters.launches += 1
        key = ("conv2d_bwd_weight", v, x.shape, dz.shape, dw.shape)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan_bwd_weight(v, x, dz, dw, db)
        fn, *ws = plan
        fn(x, dz, dw, db, *ws)

    def _check_conv(self, op: str, x, w, y, b=None) -> None:
        key = (op, x.shape, w.shape, y.shape)
        if key in self._plans:
            return
        _check_f32(op, x=x, w=w, y=y, b=b)
        _need(x.ndim == 4 and w.ndim == 4 and x.shape[1] == w.shape[1], op, f"x {x.shape} and w {w.shape} disagree")
        ho, wo = x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1
        want = (x.shape[0], w.shape[0], ho, wo)
        _need(y.shape == want, op, f"output shape {y.shape}, want {want}")
        _need(b is None or b.shape == (w.shape[0],), op, "b must be (K,)")
        self._plans[key] = ()

    def _plan_bwd_weight(self, v: str, x, dz, dw, db) -> tuple:
        op = "conv2d_bwd_weight"
        self._check_conv(op, x, dw, dz)
        _check_f32(op, db=db)
        _need(db.shape == (dw.shape[0],), op, "db must be (K,)")
        B, C, H, W = x.shape
        K, _, R, S = dw.shape
        Ho, Wo = dz.shape[2], dz.shape[3]
        part = self._ws(nchunks(B), K * C * R * S + K)
        if v == "v1":
            return conv2d.conv2d_bwd_weight_v1, part
        kb, kp = conv2d.block_size(K, (4, 3))
        T = self._slots
        parts = conv2d.bwd_weight_parts(v, kb)
        if v == "v2":
            fn = conv2d.make_conv2d_bwd_weight_v2(kb, parts.abi)
            return fn, self._ws(T, C, H, W, L), self._ws(T, kp, Ho, Wo, L), part, *parts.addresses
        nv = -(-Wo // L)
        fn = conv2d.make_conv2d_bwd_weight_v3(kb, parts.abi)
        return fn, self._ws(T, L, C, H, nv * L + S - 1), self._ws(T, L, kp, Ho, nv * L), part, *parts.addresses

    def pool2x2_fwd(self, x, y, argmax, mode, variant=None) -> None:
        self._check_variant("pool2x2_fwd", variant)
        self.counters.launches += 1
        code = _mode(mode)
        self._check_pool("pool2x2_fwd", x, y, argmax, mode)
        pool2x2.pool2x2_fwd_v1(x, y, argmax if argmax is not None else self._dummy_u8, code)

    def pool2x2_bwd(self, dy, argmax, yconv, dz, mode, act, variant=None) -> None:
        self._check_variant("pool2x2_bwd", variant)
        self.counters.launches += 1
        code, acode = _mode(mode), _act(act)
        self._check_pool("pool2x2_bwd", yconv, dy, argmax, mode)
        _need(dz.shape == yconv.shape, "pool2x2_bwd", "dz must have yconv's shape")
        pool2x2.pool2x2_bwd_v1(dy, argmax if argmax is not None else self._dummy_u8, yconv, dz, code, acode)

    def _check_pool(self, op: str, x, y, argmax, mode: str) -> None:
        key = (op, x.shape, y.shape, mode)
        if key in self._plans:
            return
        _check_f32(op, x=x, y=y)
        n, c, h, w = x.shape
        _need(y.shape == (n, c, h // 2, w // 2) and h >= 2 and w >= 2, op, f"pooled shape {y.shape} for {x.shape}")
        if mode == "max":
            _need(argmax is not None and argmax.shape == y.shape and argmax.dtype == np.uint8, op,
                  "max pooling needs a uint8 argmax with the pooled shape")
            _check_arrays(op, argmax=argmax)
        self._plans[key] = ()

    def dense_fwd(self, x, w, b, y, act, variant=None) -> None:
        self._check_variant("dense_fwd", variant)
        self.counters.launches += 1
        code = _act(act)
        self._check_dense("dense_fwd", x, w, y, b=b)
        dense.dense_fwd_v1(x, w, b, y, code)

    def dense_bwd(self, x, w, y, dy, dx, dw, db, act, variant=None) -> None:
        self._check_variant("dense_bwd", variant)
        self.counters.launches += 1
        code = _act(act)
        self._check_dense("dense_bwd", x, w, y, dy=dy, dx=dx, dw=dw, db=db)
        dense.dense_bwd_v1(x, w, y, dy, dx if dx is not None else x, dw, db, code, dx is not None)

    def _check_dense(self, op: str, x, w, y, b=None, dy=None, dx=None, dw=None, db=None) -> None:
        key = (op, x.shape, w.shape, y.shape, dx is None)
        if key in self._plans:
            return
        _check_f32(op, x=x, w=w, y=y, b=b, dy=dy, dx=dx, dw=dw, db=db)
        _need(x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[1], op, f"x {x.shape} and w {w.shape} disagree")
        _need(y.shape == (x.shape[0], w.shape[0]), op, f"y must be {(x.shape[0], w.shape[0])}")
        for name, a, want in (("b", b, (w.shape[0],)), ("dy", dy, y.shape), ("dx", dx, x.shape),
                              ("dw", dw, w.shape), ("db", db, (w.shape[0],))):
            _need(a is None or a.shape == want, op, f"{name} must be {want}")
        self._plans[key] = ()

    # ------------------------------------------------------------------ fused ops
    def conv2d_pool_fwd(self, x, w, b, yconv, ypool, argmax, act, mode, variant=None) -> None:
        self._check_variant("conv2d_pool_fwd", variant)
        v = self._variant("conv2d_pool_fwd", variant, x.shape[3] - w.shape[3] + 1)
        self.counters.launches += 1
        acode, mcode = _act(act), _mode(mode)
        key = ("conv2d_pool_fwd", v, x.shape, w.shape, ypool.shape, yconv is None, mode)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan_conv_pool(v, x, w, b, yconv, ypool, argmax, mode)
        fn, *ws = plan
        fn(x, w, b, yconv if yconv is not None else self._dummy_f, ypool,
           argmax if argmax is not None else self._dummy_u8, acode, mcode, yconv is not None, *ws)

    def _plan_conv_pool(self, v: str, x, w, b, yconv, ypool, argmax, mode: str) -> tuple:
        op = "conv2d_pool_fwd"
        _check_f32(op, x=x, w=w, b=b, yconv=yconv, ypool=ypool)
        _need(x.ndim == 4 and w.ndim == 4 and x.shape[1] == w.shape[1], op, f"x {x.shape} and w {w.shape} disagree")
        B, C, H, W = x.shape
        K, _, R, S = w.shape
        Ho, Wo = H - R + 1, W - S + 1
        _need(Ho >= 2 and Wo >= 2, op, f"the conv output of x {x.shape} and w {w.shape} ({Ho}×{Wo}) has no 2×2 window")
        _need(b.shape == (K,), op, "b must be (K,)")
        _need(yconv is None or yconv.shape == (B, K, Ho, Wo), op, f"yconv must be {(B, K, Ho, Wo)}")
        _need(ypool.shape == (B, K, Ho // 2, Wo // 2), op, f"ypool must be {(B, K, Ho // 2, Wo // 2)}")
        if mode == "max":
            _need(argmax is not None and argmax.shape == ypool.shape and argmax.dtype == np.uint8, op,
                  "max pooling needs a uint8 argmax with ypool's shape")
            _check_arrays(op, argmax=argmax)
        kb, kp = conv2d.block_size(K)
        T = self._slots
        wp, bp = self._ws(kp, C, R, S), self._ws(kp)
        parts = conv2d.pool_fwd_parts(v, kb)
        if v == "v1":
            return (conv2d.make_conv2d_pool_fwd_v1(kb, parts.abi), self._ws(T, C, H + Ho % 2, W + Wo % 2, L), wp, bp,
                    *parts.addresses)
        nvp = -(-Wo // (2 * L))
        return (conv2d.make_conv2d_pool_fwd_v2(kb, parts.abi), self._ws(T, C, Ho + Ho % 2 + R - 1, nvp * 2 * L + S - 1),
                wp, bp, *parts.addresses)

    def conv2d_bwd_data_pool(self, dz, w, argmax, yconv, dz_below, mode, act, variant=None) -> None:
        self._check_variant("conv2d_bwd_data_pool", variant)
        self.counters.launches += 1
        acode, mcode = _act(act), _mode(mode)
        key = ("conv2d_bwd_data_pool", dz.shape, w.shape, yconv.shape, mode)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan_bwd_data_pool(dz, w, argmax, yconv, dz_below, mode)
        fn, *ws = plan
        fn(dz, w, argmax if argmax is not None else self._dummy_u8, yconv, dz_below, mcode, acode, *ws)

    def _plan_bwd_data_pool(self, dz, w, argmax, yconv, dz_below, mode: str) -> tuple:
        op = "conv2d_bwd_data_pool"
        _check_f32(op, dz=dz, w=w, yconv=yconv, dz_below=dz_below)
        B, K, Ho, Wo = dz.shape
        _need(w.ndim == 4 and w.shape[0] == K, op, f"w {w.shape} and dz {dz.shape} disagree")
        _, C, R, S = w.shape
        Hx, Wx = Ho + R - 1, Wo + S - 1
        _need(yconv.shape[:2] == (B, C) and yconv.shape[2] // 2 == Hx and yconv.shape[3] // 2 == Wx, op,
              f"yconv {yconv.shape} is not the map the pooled input {(B, C, Hx, Wx)} came from")
        _need(dz_below.shape == yconv.shape, op, "dz_below must have yconv's shape")
        if mode == "max":
            _need(argmax is not None and argmax.shape == (B, C, Hx, Wx) and argmax.dtype == np.uint8, op,
                  f"max pooling needs a uint8 argmax {(B, C, Hx, Wx)}")
            _check_arrays(op, argmax=argmax)
        kb, cp = conv2d.block_size(C)
        T = self._slots
        hxp = Hx + Hx % 2  # whole pairs of rows
        if Wx <= L:  # two images' framed dz one above the other; dx of both
            ws_dz, ws_dx = self._ws(T, K, 2 * (hxp + R - 1), L + S - 1), self._ws(T, 2, cp, hxp, L)
        else:
            nv2 = 2 * -(-Wx // (2 * L))
            ws_dz, ws_dx = self._ws(T, K, hxp + R - 1, nv2 * L + S - 1), self._ws(T, 1, cp, hxp, nv2 * L)
        parts = conv2d.bwd_data_pool_parts(kb)
        return conv2d.make_conv2d_bwd_data_pool_v1(kb, parts.abi), ws_dz, ws_dx, self._ws(cp, K, R, S), *parts.addresses

    # ------------------------------------------------------------------ the routed backward (max pooling)
    def conv2d_bwd_weight_routed(self, x, gz, argmax, dw, db, state=None, variant=None) -> None:
        self._check_variant("conv2d_bwd_weight_routed", variant)
        self.counters.launches += 1
        if variant in (None, "auto"):  # v3 where a whole patch fits two AVX-512 vectors (C1), else v1 (C3) or v2
            K, C, R, S = dw.shape
            variant = ("v3" if routed.stack_width(R, S, C) <= 32
                       else "v1" if 2 * C * S > routed.patch_width(S, C) else "v2")
        key = ("conv2d_bwd_weight_routed", variant, x.shape, gz.shape, dw.shape)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan_bwd_weight_routed(variant, x, gz, argmax, dw, db)
        fn, *ws = plan
        fn(x, gz, argmax, dw, db, *ws)

    def _check_routed(self, op: str, x, gz, argmax, w) -> None:
        """x (B,C,H,W) the conv's input, gz/argmax (B,K,Hp,Wp) at the pooled size of its output, w (K,C,R,S)."""
        _check_f32(op, x=x, gz=gz, w=w)
        _check_arrays(op, argmax=argmax)
        _need(x.ndim == 4 and w.ndim == 4 and x.shape[1] == w.shape[1], op, f"x {x.shape} and w {w.shape} disagree")
        B, C, H, W = x.shape
        K, _, R, S = w.shape
        Ho, Wo = H - R + 1, W - S + 1
        _need(Ho >= 2 and Wo >= 2, op, f"the conv output of {x.shape} and w {w.shape} ({Ho}×{Wo}) has no 2×2 window")
        want = (B, K, Ho // 2, Wo // 2)
        _need(gz.shape == want, op, f"gz {gz.shape}, want {want} (the pooled size)")
        _need(argmax is not None and argmax.shape == want and argmax.dtype == np.uint8, op,
              f"argmax must be uint8 {want}")

    def _plan_bwd_weight_routed(self, v: str, x, gz, argmax, dw, db) -> tuple:
        op = "conv2d_bwd_weight_routed"
        self._check_routed(op, x, gz, argmax, dw)
        _check_f32(op, db=db)
        _need(db.shape == (dw.shape[0],), op, "db must be (K,)")
        B, C, H, W = x.shape
        K, _, R, S = dw.shape
        if v == "v2":  # conv2d_bwd_weight_v3's kernel and workspaces, dz made from gz and the routes
            kb, kp = conv2d.block_size(K, (4, 3))
            nv = -(-(W - S + 1) // L)
            T = self._slots
            parts = conv2d.bwd_weight_parts("routed_v2", kb)
            return (conv2d.make_conv2d_bwd_weight_routed_v2(kb, parts.abi), self._ws(T, L, C, H, nv * L + S - 1),
                    self._ws(T, L, kp, H - R + 1, nv * L), self._ws(nchunks(B), K * C * R * S + K), *parts.addresses)
        if v == "v3":  # whole patches from a row stack (Ho rows of W·C·R floats and a margin), per-filter sums
            pv = routed.stack_width(R, S, C)
            _need(pv <= routed.PV_MAX, op, f"a patch of {R * S * C} floats is too big for v3 (at most "
                                           f"{routed.PV_MAX})")
            parts = routed.bwd_weight_stack_parts(pv)
            fn = routed.make_conv2d_bwd_weight_routed_v3(pv, parts.abi)
            Hs = 2 * gz.shape[2]
            return (fn, self._ws(self._slots, Hs, W * C * R + pv), self._ws(self._slots, K, pv),
                    self._ws(nchunks(B), K * C * R * S + K), *parts.addresses)
        pw = routed.patch_width(S, C)
        kb = routed.routed_block(K, R, pw)
        _need(kb * R * pw <= routed.RT_TILE, op, f"a patch of {R} rows × {S * C} floats is too big")
        parts = routed.bwd_weight_parts(kb, R, pw)
        fn = routed.make_conv2d_bwd_weight_routed_v1(kb, R, pw, parts.abi)
        return fn, self._ws(self._slots, L, H, W * C + pw), self._ws(nchunks(B), K * C * R * S + K), *parts.addresses

    def conv2d_bwd_data_routed(self, gz, w, argmax, y_below, gz_below, act, variant=None) -> None:
        self._check_variant("conv2d_bwd_data_routed", variant)
        self.counters.launches += 1
        acode = _act(act)
        key = ("conv2d_bwd_data_routed", gz.shape, w.shape, y_below.shape)
        plan = self._plans.get(key)
        if plan is None:
            op = "conv2d_bwd_data_routed"
            self._check_routed(op, y_below, gz, argmax, w)
            _check_f32(op, gz_below=gz_below)
            _need(gz_below.shape == y_below.shape, op, "gz_below must have y_below's shape")
            _, C, H, W = y_below.shape
            K, _, R, S = w.shape
            pw = routed.patch_width(S, C)
            _need(R * pw <= routed.RT_TILE, op, f"a filter of {R} rows × {S * C} floats is too big")
            parts = routed.bwd_data_parts(R, pw)
            plan = self._plans[key] = (routed.make_conv2d_bwd_data_routed_v1(R, pw, parts.abi),
                                       self._ws(self._slots, H, W * C + pw), self._ws(K, R, pw), *parts.addresses)
        fn, *ws = plan
        fn(gz, w, argmax, y_below, gz_below, acode, *ws)

    def head_train(self, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
                   dw1, db1, dw2, db2, dw3, db3, stats, state, act, mode, variant=None) -> None:
        self._check_variant("head_train", variant)
        self.counters.launches += 1
        acode, mcode = _act(act), _mode(mode)
        routed_ = yconv is None  # the routed step: dz_conv gets gz = dL/dx · act'(x) at x's shape
        key = ("head_train", x.shape, w1.shape, w2.shape, w3.shape, None if routed_ else yconv.shape, stats.shape,
               mode)
        plan = self._plans.get(key)
        fresh = plan is None
        if fresh:
            plan = self._plans[key] = self._plan_head(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax,
                                                      yconv, dz_conv, dw1, db1, dw2, db2, dw3, db3, stats, state, mode)
        fn, tt, *ws = plan
        args = (x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax if argmax is not None else self._dummy_u8,
                yconv if not routed_ else self._dummy_f, dz_conv, dw1, db1, dw2, db2, dw3, db3, stats, state, acode,
                mcode, *ws)
        if fresh:
            launch.check_args("head_train", tt, args)
        fn(*args)

    def _plan_head(self, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
                   dw1, db1, dw2, db2, dw3, db3, stats, state, mode: str) -> tuple:
        op = "head_train"
        _check_f32(op, x=x, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, h1=h1, h2=h2, logits=logits, yconv=yconv,
                   dz_conv=dz_conv, dw1=dw1, db1=db1, dw2=dw2, db2=db2, dw3=dw3, db3=db3, stats=stats)
        B, C, Hp, Wp = x.shape
        I = C * Hp * Wp
        H1, H2, NC = w1.shape[0], w2.shape[0], w3.shape[0]
        _need(w1.shape == (H1, I) and w2.shape == (H2, H1) and w3.shape == (NC, H2), op,
              f"weights {w1.shape}, {w2.shape}, {w3.shape} do not chain from {I} inputs")
        for name, a, want in (("b1", b1, (H1,)), ("b2", b2, (H2,)), ("b3", b3, (NC,)), ("h1", h1, (B, H1)),
                              ("h2", h2, (B, H2)), ("logits", logits, (B, NC)), ("labels", labels, (B,)),
                              ("dw1", dw1, w1.shape), ("db1", db1, (H1,)), ("dw2", dw2, w2.shape),
                              ("db2", db2, (H2,)), ("dw3", dw3, w3.shape), ("db3", db3, (NC,))):
            _need(a.shape == want, op, f"{name} must be {want}, got {a.shape}")
        if yconv is None:
            _need(mode == "max", op, "yconv=None (the routed step) needs max pooling")
            _need(dz_conv.shape == x.shape, op, "with yconv=None, dz_conv must have x's shape")
        else:
            _need(yconv.shape[:2] == (B, C) and yconv.shape[2] // 2 == Hp and yconv.shape[3] // 2 == Wp, op,
                  f"yconv {yconv.shape} is not the map x {x.shape} pools")
            _need(dz_conv.shape == yconv.shape, op, "dz_conv must have yconv's shape")
        _need(stats.ndim == 2 and stats.shape[1] == 2, op, "stats must be (S, 2)")
        if mode == "max" and yconv is not None:
            _need(argmax is not None and argmax.shape == x.shape and argmax.dtype == np.uint8, op,
                  "max pooling needs a uint8 argmax with x's shape")
            _check_arrays(op, argmax=argmax)
        T = self._slots

        def pad8(n: int) -> int:
            return -(-n // dense.OB) * dense.OB

        routed_ = yconv is None
        parts = head.parts(routed_)
        ws = (self._ws(T, I, L), self._ws(T, H1, L), self._ws(T, H2, L), self._ws(T, NC, L), self._ws(T, H1, L),
              self._ws(T, H2, L), self._ws(T, I, L), self._ws(T, C, Hp, Wp), self._ws(B, pad8(H1)),
              self._ws(B, pad8(H2)), self._ws(B, pad8(NC)), self._ws(nchunks(B), 2, dtype=np.float64),
              head.dw_tasks(((H1, I), (H2, H1), (NC, H2))), *parts.addresses)
        # the kernel's arguments as head_train passes them (values aside): the type of the tuple its tasks read
        am = argmax if argmax is not None else self._dummy_u8
        yc = yconv if not routed_ else self._dummy_f
        tt = launch.task_type((x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, am, yc, dz_conv, dw1, db1, dw2, db2,
                               dw3, db3, stats, state, 0, 0, *ws, 0, 0, 0))
        tasks = [native.address(t, launch.TASK_ARGS) for t in head.make_head_tasks(routed_, tt)]
        return (head.make_head_train_v1(routed_, parts.abi), tt, *ws, *tasks, launch.par_address())

    def lenet_fwd(self, images, params: dict, logits, mean, std, act, mode, variant=None) -> None:
        self._check_variant("lenet_fwd", variant)
        self.counters.launches += 1
        acode, mcode = _act(act), _mode(mode)
        p = [params[k] for k in ("c1.w", "c1.b", "c3.w", "c3.b", "c5.w", "c5.b", "f6.w", "f6.b", "out.w", "out.b")]
        key = ("lenet_fwd", images.shape, p[0].shape, p[2].shape, p[6].shape, logits.shape)
        plan = self._plans.get(key)
        fresh = plan is None
        if fresh:
            plan = self._plans[key] = self._plan_lenet_fwd(images, p, logits)
        fn, tt, *ws = plan
        args = (images, *p, logits, F32(1.0 / (255.0 * std)), F32(-mean / std), acode, mcode, *ws)
        if fresh:
            launch.check_args("lenet_fwd", tt, args)
        fn(*args)

    def _plan_lenet_fwd(self, images, p: list, logits) -> tuple:
        op = "lenet_fwd"
        _check_arrays(op, images=images)
        _need(images.dtype == np.uint8 and images.ndim == 3, op, "images must be (N, H, W) uint8")
        _check_f32(op, logits=logits, **{f"p{i}": a for i, a in enumerate(p)})
        w1, w3, w5, w6, w7 = p[0], p[2], p[4], p[6], p[8]
        N, IH, IW = images.shape
        XH, XW = IH + 4, IW + 4  # the canvas: pad 2 (spec.PAD)
        K1, C1, R1, S1 = w1.shape
        K3, C3, R3, S3 = w3.shape
        H2, W2 = (XH - R1 + 1) // 2, (XW - S1 + 1) // 2
        H4, W4 = (H2 - R3 + 1) // 2, (W2 - S3 + 1) // 2
        _need(C1 == 1 and C3 == K1, op, f"c1.w {w1.shape} and c3.w {w3.shape} disagree")
        _need(w5.shape[1] == K3 * H4 * W4 and w6.shape[1] == w5.shape[0] and w7.shape[1] == w6.shape[0], op,
              "the dense layers do not chain")
        _need(logits.shape == (N, w7.shape[0]), op, f"logits must be {(N, w7.shape[0])}")
        kb1, k1p = conv2d.block_size(K1)
        kb3, k3p = conv2d.block_size(K3)
        T = self._slots
        parts = lenet_fwd.parts(kb1, kb3)
        ws = (self._ws(T, 1, XH, XW, L), self._ws(T, K1, H2, W2, L), self._ws(T, K3 * H4 * W4, L),
              self._ws(T, w5.shape[0], L), self._ws(T, w6.shape[0], L), self._ws(T, w7.shape[0], L),
              self._ws(k1p, C1, R1, S1), self._ws(k1p), self._ws(k3p, C3, R3, S3), self._ws(k3p), *parts.addresses)
        # the kernel's arguments as lenet_fwd passes them (values aside): the type of the tuple its task reads
        tt = launch.task_type((images, *p, logits, F32(0), F32(0), 0, 0, *ws, 0, 0))
        a_task = native.address(lenet_fwd.make_lenet_fwd_task(kb1, kb3, tt), launch.TASK_ARGS)
        return (lenet_fwd.make_lenet_fwd_v1(kb1, kb3, parts.abi), tt, *ws, a_task, launch.par_address())

    # ------------------------------------------------------------------ the four-kernel step (docs/step4.md)
    def step_groups(self, batch: int) -> int:
        """The image groups of step_bwd: one per chunk of 16 images (the routed step's chunks where 16 divides the
        batch). A function of the batch alone: the partials, and their sum, do not depend on the thread count."""
        return nchunks(batch)

    def step_fwd(self, images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, mean, std,
                 act, variant=None) -> None:
        self._check_variant("step_fwd", variant)
        self.counters.launches += 1
        acode = _act(act)
        key = ("step_fwd", images.shape, perm.shape, x.shape, sched.shape)
        plan = self._plans.get(key)
        fresh = plan is None
        if fresh:
            plan = self._plans[key] = self._plan_step_fwd(images, labels, perm, state, sched, srow, x, y, w1, b1,
                                                          p1, m1, w3, b3, p3, m3)
        fn, tt, *ws = plan
        args = (images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3,
                F32(1.0 / (255.0 * std)), F32(-mean / std), acode, POOL_CODES["max"], False, *ws)
        if fresh:
            launch.check_args("step_fwd", tt, args)
        fn(*args)

    def _plan_step_fwd(self, images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3,
                       m3) -> tuple:
        op = "step_fwd"
        _check_arrays(op, images=images, labels=labels, perm=perm, state=state, y=y, m1=m1, m3=m3)
        _check_f32(op, sched=sched, srow=srow, x=x, w1=w1, b1=b1, p1=p1, w3=w3, b3=b3, p3=p3)
        _need(images.dtype == np.uint8 and labels.dtype == np.uint8 and images.ndim == 3, op,
              "images (N,H,W) and labels must be uint8")
        _need(perm.dtype == np.int32 and state.dtype == np.int32 and y.dtype == np.int32, op,
              "perm, state and y must be int32")
        B = x.shape[0]
        for name, a, want in (("x", x, (B, 1, 32, 32)), ("y", y, (B,)), ("w1", w1, (6, 1, 5, 5)), ("b1", b1, (6,)),
                              ("p1", p1, (B, 6, 14, 14)), ("m1", m1, (B, 6, 14, 14)), ("w3", w3, (16, 6, 5, 5)),
                              ("b3", b3, (16,)), ("p3", p3, (B, 16, 5, 5)), ("m3", m3, (B, 16, 5, 5)),
                              ("srow", srow, (sched.shape[1],) if sched.ndim == 2 else (-1,))):
            _need(a.shape == want, op, f"{name} must be {want}, got {a.shape}")
        _need(m1.dtype == np.uint8 and m3.dtype == np.uint8, op, "m1 and m3 must be uint8")
        _need(x.shape[2] >= images.shape[1] and x.shape[3] >= images.shape[2], op, "x smaller than the images")
        T = self._slots
        # C1 and C3: conv2d_pool_fwd_v1's chunk (lanes), whose relu-max path is a function of its own
        kb1, k1p = conv2d.block_size(6)
        kb3, k3p = conv2d.block_size(16)
        ws1 = self._ws(T, 1, 32, 32, L)
        ws3 = self._ws(T, 6, 14, 14, L)
        parts = step4.fwd_parts(kb1, kb3)
        ws = (ws1, self._ws(k1p, 1, 5, 5), self._ws(k1p), ws3, self._ws(k3p, 6, 5, 5), self._ws(k3p),
              *parts.addresses)
        # the kernel's arguments as step_fwd passes them (values aside): the type of the tuple its task reads
        tt = launch.task_type((images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, F32(0),
                               F32(0), 0, 0, False, *ws, 0, 0))
        a_task = native.address(step4.make_step_fwd_task(kb1, kb3, tt), launch.TASK_ARGS)
        return (step4.make_step_fwd_v1(kb1, kb3, parts.abi), tt, *ws, a_task, launch.par_address())

    def step_bwd(self, x, p1, gz3, m3, m1, w3, gpart, act, variant=None) -> None:
        self._check_variant("step_bwd", variant)
        self.counters.launches += 1
        acode = _act(act)
        key = ("step_bwd", x.shape, gpart.shape)
        plan = self._plans.get(key)
        fresh = plan is None
        if fresh:
            plan = self._plans[key] = self._plan_step_bwd(x, p1, gz3, m3, m1, w3, gpart)
        fn, tt, chunk, offs, *ws = plan
        args = (x, p1, gz3, m3, m1, w3, gpart, acode, chunk, *offs, *ws)
        if fresh:
            launch.check_args("step_bwd", tt, args)
        fn(*args)

    def _plan_step_bwd(self, x, p1, gz3, m3, m1, w3, gpart) -> tuple:
        op = "step_bwd"
        _check_f32(op, x=x, p1=p1, gz3=gz3, w3=w3, gpart=gpart)
        _check_arrays(op, m3=m3, m1=m1)
        B = x.shape[0]
        nc = conv_prefix()
        for name, a, want in (("x", x, (B, 1, 32, 32)), ("p1", p1, (B, 6, 14, 14)), ("gz3", gz3, (B, 16, 5, 5)),
                              ("m3", m3, (B, 16, 5, 5)), ("m1", m1, (B, 6, 14, 14)), ("w3", w3, (16, 6, 5, 5))):
            _need(a.shape == want, op, f"{name} must be {want}, got {a.shape}")
        _need(m1.dtype == np.uint8 and m3.dtype == np.uint8, op, "m1 and m3 must be uint8")
        _need(gpart.ndim == 2 and gpart.shape[0] >= 1 and gpart.shape[1] == nc, op,
              f"gpart must be (groups, {nc}), got {gpart.shape}")
        off = {s.name: s.offset for s in param_layout()[0]}
        T = self._slots
        # C3: conv2d_bwd_weight_routed_v1's and conv2d_bwd_data_routed_v1's chunks (patch rows of 5 × 6 floats);
        # C1: conv2d_bwd_weight_routed_v3's chunk (whole patches of 25 floats from a row stack of 28 rows)
        pv1, kb3, r3, pw = step4.bwd_blocks()
        parts = step4.bwd_parts()
        fn = step4.make_step_bwd_v1(pv1, kb3, r3, pw, parts.abi)
        chunk = -(-B // gpart.shape[0])
        offs = (off["c1.w"], off["c1.b"], off["c3.w"], off["c3.b"])
        ws = (self._ws(T, L, 14, 14 * 6 + pw), self._ws(T, 14, 14 * 6 + pw), self._ws(T, L, 6, 14, 14),
              self._ws(T, 28, 32 * 5 + pv1), self._ws(T, 6, pv1), self._ws(T, 16 * 6 * 25 + 16), self._ws(16, 5, pw),
              *parts.addresses)
        # the kernel's arguments as step_bwd passes them (values aside): the type of the tuple its task reads
        tt = launch.task_type((x, p1, gz3, m3, m1, w3, gpart, 0, chunk, *offs, *ws, 0, 0))
        a_task = native.address(step4.make_step_bwd_task(pv1, kb3, r3, pw, tt), launch.TASK_ARGS)
        return (fn, tt, chunk, offs, *ws, a_task, launch.par_address())

    def step_adam(self, p, g, gpart, m, v, srow, state, batch, beta1, beta2, eps, weight_decay, variant=None) -> None:
        self._check_variant("step_adam", variant)
        self.counters.launches += 1
        key = ("step_adam", p.shape, gpart.shape)
        if key not in self._plans:
            self._check_step_update("step_adam", p, g, gpart, m, v, srow, state)
            self._plans[key] = ()
        step4.step_adam_v1(p, g, gpart, m, v, srow, state, int(batch), F32(beta1), F32(beta2), F32(eps),
                           F32(weight_decay), F32(1 - beta1), F32(1 - beta2))

    def step_sgd(self, p, g, gpart, m, srow, state, batch, momentum, weight_decay, variant=None) -> None:
        self._check_variant("step_sgd", variant)
        self.counters.launches += 1
        key = ("step_sgd", p.shape, gpart.shape)
        if key not in self._plans:
            self._check_step_update("step_sgd", p, g, gpart, m, None, srow, state)
            self._plans[key] = ()
        step4.step_sgd_v1(p, g, gpart, m, srow, state, int(batch), F32(momentum), F32(weight_decay))

    def _check_step_update(self, op: str, p, g, gpart, m, v, srow, state) -> None:
        _check_f32(op, p=p, g=g, gpart=gpart, m=m, v=v, srow=srow)
        _check_arrays(op, state=state)
        _need(p.ndim == 1 and p.shape == g.shape == m.shape and (v is None or v.shape == p.shape), op,
              "p, g, m (and v) must be one flat shape")
        _need(gpart.ndim == 2 and gpart.shape[0] >= 1 and gpart.shape[1] <= p.shape[0], op,
              f"gpart must be (groups, n ≤ {p.shape[0]}), got {gpart.shape}")
        _need(srow.ndim == 1 and srow.shape[0] >= 3, op, "srow must hold lr, bc1, bc2")
        _need(state.dtype == np.int32, op, "state must be int32")
