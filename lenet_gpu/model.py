"""LeNet5: parameters, gradients, optimizer state, workspaces and the step state; forward, backward and
training steps over any backend.

The model talks to the Backend protocol only (lenet_gpu.backends.base); it knows nothing of CUDA.
Parameters, gradients and optimizer moments are each one flat float32 device buffer with per-layer
views (lenet_gpu.spec), so the optimizer is one launch and a checkpoint is one array plus its layout.

A training step takes no host scalar: what changes from step to step (the step counter, the batch's
offset in the permutation, the epoch for augmentation, the learning rate and Adam's bias corrections)
lives in the device step state (lenet_gpu.stepstate), and the step's last launch advances it. So the
launches of a step are the same at every step: the model records them once and replays them
(``backend.record``: no checks or plans per launch), and on a backend with CUDA graphs captures K
steps as one graph and replays that (``backend.graph``), after a bit-for-bit self-check against
eager launches.

Two ways to train:
- ``train_step(images_u8, labels)``: one step on a host batch (uploads the batch, reads the loss back);
- the device-resident path the training program uses: ``upload_dataset`` once, ``begin_run`` once
  (schedule, augmentation, where the run starts), then per epoch ``begin_epoch(data, perm)`` (one
  upload) and ``run_steps(data, count)`` per chunk — no allocation, copy or synchronisation —, and
  ``step_stats(first, count)`` when logging: each step's [loss sum, correct count].
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import arrays
from .backends import Backend, get_backend
from .backends.base import COMPILE_AHEAD, ROUTED_OPS, STEP_OPS, step_groups_of
from .spec import (
    IMAGE_HW,
    INPUT_HW,
    NUM_CLASSES,
    NetConfig,
    conv_prefix,
    init_params,
    layout_signature,
    param_layout,
    views,
)
from .stepstate import NO_WRAP, SCHED_COLS, HostState, StepState, schedule_table

CHECKPOINT_FORMAT = "lenet_gpu-checkpoint"
CHECKPOINT_VERSION = 1
#: MNIST's pixel statistics (on [0,1]); the training program replaces them with the training set's.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
OPTIMIZERS = ("adam", "sgd")
#: Steps per CUDA graph (and per read of the statistics) on a GPU backend.
GRAPH_STEPS = 100
#: Fewer steps than this run as replayed launches rather than as a graph of their own.
MIN_GRAPH_STEPS = 8

#: backend name → (ok, message) of the graph self-check, done once per process and backend
_GRAPH_CHECKS: dict[str, tuple[bool, str]] = {}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that was written for another layout or program."""


@dataclass
class DeviceData:
    """A dataset resident on the device: uint8 images, labels and the current permutation."""

    images: Any  # (N,28,28) uint8
    labels: Any  # (N,) uint8
    perm: Any  # (N,) int32
    n: int


class _Workspace:
    """Every activation and gradient buffer of one batch size, allocated once.

    In routed mode (docs/routed_backward.md) the un-pooled conv outputs C1, C3 and their dense gradients are
    not kept: a1, a3, dz3, dp1, dz1 are None, and the routed gradients gz3 (S4's shape) and gz1 (S2's shape)
    take their place. The four-kernel step (docs/step4.md) keeps no gz1 either (step_bwd holds it on chip): its
    conv weight gradients come as per-group partials ``gpart`` (groups, spec.conv_prefix()), and ``srow`` holds
    the step's schedule row."""

    def __init__(self, be: Backend, batch: int, cfg: NetConfig, routed: bool = False, step4: bool = False) -> None:
        e = be.empty
        f6 = cfg.f6
        self.batch = batch
        self.routed = routed
        self.x = e((batch, 1, INPUT_HW, INPUT_HW))
        self.y = e((batch,), np.int32)
        self.a1 = None if routed else e((batch, 6, 28, 28))  # C1 activated output
        self.p1 = e((batch, 6, 14, 14))  # S2
        self.m1 = e((batch, 6, 14, 14), np.uint8)  # S2 argmax
        self.a3 = None if routed else e((batch, 16, 10, 10))  # C3
        self.p3 = e((batch, 16, 5, 5))  # S4
        self.m3 = e((batch, 16, 5, 5), np.uint8)
        self.a5 = e((batch, 120))  # C5
        self.a6 = e((batch, f6))  # F6
        self.logits = e((batch, NUM_CLASSES))
        # gradients
        self.dlogits = e((batch, NUM_CLASSES))
        self.da6 = e((batch, f6))
        self.da5 = e((batch, 120))
        self.dp3 = e((batch, 16, 5, 5))
        self.dz3 = None if routed else e((batch, 16, 10, 10))
        self.dp1 = None if routed else e((batch, 6, 14, 14))
        self.dz1 = None if routed else e((batch, 6, 28, 28))
        # routed gradients: dL/d(pooled output)·act′ at S4 and S2
        self.gz3 = e((batch, 16, 5, 5)) if routed else None
        self.gz1 = e((batch, 6, 14, 14)) if routed and not step4 else None
        # the four-kernel step: per-group conv gradient partials and this step's schedule row
        groups = step_groups_of(be, batch) if step4 else 1
        self.gpart = e((groups, conv_prefix())) if step4 else None
        self.srow = e((SCHED_COLS,)) if step4 else None
        # S4 flattened is C5's input (C5 is the 5×5 convolution on the 5×5 map = a dense layer)
        self.p3_flat = self.p3.reshape(batch, 400)
        self.dp3_flat = self.dp3.reshape(batch, 400)


class _Program:
    """The recorded launches of one training step over one dataset, and graphs of several such steps
    (by their number of steps: K, and the epoch's tail)."""

    def __init__(self, eager: Callable[[], None], batch: int) -> None:
        self.eager = eager
        self.batch = batch
        self.graphs: dict[int, Callable[[], None] | None] = {}  # steps → graph (None: could not be made)
        self.warm = False


class LeNet5:
    """LeNet-5 (docs/DESIGN.md §1) on a backend.

    ``fused=False`` makes the model use only the unfused ops of the protocol even where the backend
    offers fused ones (the readable baseline; tests compare the two). ``routed`` ("auto", True, False):
    with max pooling, train through the routed backward (docs/routed_backward.md: the gradients at the
    pooled size plus the routes, no un-pooled conv outputs kept) where the backend has the routed ops and
    conv2d_pool_fwd/head_train; "auto" does so wherever it can (unless the environment sets
    LENET_GPU_ROUTED=0), True insists (an error where it cannot), False keeps the dense step. It gives
    the dense step's gradients up to float32 summation order and is not stored in checkpoints.
    ``step4`` ("auto", True, False): run the routed step as the four-kernel step (docs/step4.md: step_fwd,
    head_train, step_bwd, step_adam/step_sgd) where the backend has those ops; "auto" unless the environment
    sets LENET_GPU_STEP4=0. The same mathematics, the conv gradients summed per image group; not stored either.
    ``use_graphs=False`` never captures CUDA graphs; ``graph_steps`` is K, the steps per graph.

    >>> model = LeNet5(backend="numpy", seed=0)
    >>> model.num_parameters
    61706
    """

    def __init__(
        self,
        backend: str | Backend = "auto",
        activation: str = "relu",
        pool: str = "max",
        f6: int = 84,
        seed: int = 0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        use_graphs: bool = True,
        init: str = "torch",
        fused: bool = True,
        graph_steps: int = GRAPH_STEPS,
        routed: bool | str = "auto",
        step4: bool | str = "auto",
    ) -> None:
        self.cfg = NetConfig(activation=activation, pool=pool, f6=f6)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'adam' or 'sgd' (got {optimizer!r})")
        for label, val in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not np.isfinite(val) or val < 0:
                raise ValueError(f"{label} must be a finite number >= 0 (got {val!r})")
        if not std > 0:
            raise ValueError(f"std must be > 0 (got {std!r})")
        if int(graph_steps) < 1:
            raise ValueError(f"graph_steps must be >= 1 (got {graph_steps!r})")
        self.backend: Backend = get_backend(backend)
        self.seed = int(seed)
        self.optimizer = optimizer
        self.lr, self.weight_decay, self.momentum = float(lr), float(weight_decay), float(momentum)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.mean, self.std = float(mean), float(std)
        self.use_graphs = bool(use_graphs)
        self.graph_steps = int(graph_steps)
        #: why graphs are not used (None while they are, or before the first attempt)
        self.graph_note: str | None = None
        self.specs, self.size = param_layout(self.cfg)
        be = self.backend
        self.init = init
        self.params = be.to_device(init_params(self.cfg, self.seed, init))
        self.grads = be.zeros((self.size,))
        self.m = be.zeros((self.size,))
        self.v = be.zeros((self.size,)) if optimizer == "adam" else None
        self._pv = views(self.params, self.cfg)
        self._gv = views(self.grads, self.cfg)
        self._ws: dict[int, _Workspace] = {}
        self._programs: dict[tuple[int, int], _Program] = {}
        self._run = StepState(be)  # the device-resident training run
        self._host = StepState(be)  # host batches (train_step)
        self._eval = StepState(be)  # evaluation and inference over device data
        self._host_data: dict[int, DeviceData] = {}  # staging for host batches, by batch size
        self._run_batch = 0
        ops = getattr(be, "variants", {}) if fused else {}
        self.fused = {op: op in ops for op in ("conv2d_pool_fwd", "head_train", "conv2d_bwd_data_pool", "lenet_fwd")}
        #: whether training steps take the routed backward (docs/routed_backward.md)
        self.routed = self._use_routed(routed, ops)
        #: whether the routed step runs as the four-kernel step (docs/step4.md)
        self.step4 = self._use_step4(step4, ops)
        #: optimizer steps taken (Adam's t)
        self.step_count = 0

    def _use_routed(self, routed: bool | str, ops: dict) -> bool:
        if routed not in ("auto", True, False):
            raise ValueError(f"routed must be 'auto', True or False (got {routed!r})")
        if routed == "auto" and os.environ.get("LENET_GPU_ROUTED", "1") == "0":
            routed = False  # the dense step everywhere (A/B measurements without code changes)
        if routed is False:
            return False
        need = ("conv2d_pool_fwd", "head_train", *ROUTED_OPS)
        missing = [op for op in need if op not in ops]
        if self.cfg.pool == "max" and not missing:
            return True
        if routed is True:
            why = ("it needs max pooling" if self.cfg.pool != "max"
                   else f"the {self.backend.name} backend lacks {', '.join(missing)}"
                   + (" (fused=False)" if not ops else ""))
            raise ValueError(f"routed=True: the routed step is not available here: {why}")
        return False

    def _use_step4(self, step4: bool | str, ops: dict) -> bool:
        if step4 not in ("auto", True, False):
            raise ValueError(f"step4 must be 'auto', True or False (got {step4!r})")
        if step4 == "auto" and os.environ.get("LENET_GPU_STEP4", "1") == "0":
            step4 = False  # the nine-op routed step (A/B measurements without code changes)
        if step4 is False:
            return False
        missing = [op for op in STEP_OPS if op not in ops]
        if self.routed and not missing:
            return True
        if step4 is True:
            why = ("the routed step is off (it needs max pooling and the routed ops)" if not self.routed
                   else f"the {self.backend.name} backend lacks {', '.join(missing)}")
            raise ValueError(f"step4=True: the four-kernel step is not available here: {why}")
        return False

    # ------------------------------------------------------------------ info
    @property
    def num_parameters(self) -> int:
        return sum(s.size for s in self.specs)

    @property
    def activation(self) -> str:
        return self.cfg.activation

    @property
    def pool(self) -> str:
        return self.cfg.pool

    def options(self) -> dict:
        """Everything needed to rebuild this model (stored in checkpoints)."""
        return {
            **self.cfg.to_dict(),
            "seed": self.seed,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "mean": self.mean,
            "std": self.std,
            "init": self.init,
        }

    def ops_per_step(self) -> int:
        """Backend op calls of one training step with the ops this model uses (a fused op may launch more
        than one kernel: head_train launches two on the GPU backends; the counters count kernels)."""
        f = self.fused
        if self.step4:  # step_fwd, head_train, step_bwd, step_adam / step_sgd (docs/step4.md)
            return 4
        if self.routed:  # batch, 2 conv2d_pool_fwd, head_train, wgrad C3, dgrad C3, wgrad C1, optimizer, advance
            return 9
        fwd = 2 if f["conv2d_pool_fwd"] else 4
        head = 1 if f["head_train"] else 8  # 3 dense_fwd, softmax_xent, 3 dense_bwd, pool2x2_bwd
        bwd_data = 1 if f["conv2d_bwd_data_pool"] else 2
        return 1 + fwd + head + 1 + bwd_data + 1 + 1 + 1  # batch, ..., 2 bwd_weight, optimizer, advance

    # ------------------------------------------------------------------ workspaces
    def workspace(self, batch: int) -> _Workspace:
        ws = self._ws.get(batch)
        if ws is None:
            ws = self._ws[batch] = _Workspace(self.backend, batch, self.cfg, self.routed, self.step4)
        return ws

    # ------------------------------------------------------------------ the ops of a step
    def _forward_convs(self, ws: _Workspace) -> None:
        be, p, act, pool = self.backend, self._pv, self.cfg.activation, self.cfg.pool
        if self.fused["conv2d_pool_fwd"]:
            be.conv2d_pool_fwd(ws.x, p["c1.w"], p["c1.b"], ws.a1, ws.p1, ws.m1, act, pool)
            be.conv2d_pool_fwd(ws.p1, p["c3.w"], p["c3.b"], ws.a3, ws.p3, ws.m3, act, pool)
        else:
            be.conv2d_fwd(ws.x, p["c1.w"], p["c1.b"], ws.a1, act)
            be.pool2x2_fwd(ws.a1, ws.p1, ws.m1, pool)
            be.conv2d_fwd(ws.p1, p["c3.w"], p["c3.b"], ws.a3, act)
            be.pool2x2_fwd(ws.a3, ws.p3, ws.m3, pool)

    def _forward_dense(self, ws: _Workspace) -> None:
        be, p, act = self.backend, self._pv, self.cfg.activation
        be.dense_fwd(ws.p3_flat, p["c5.w"], p["c5.b"], ws.a5, act)
        be.dense_fwd(ws.a5, p["f6.w"], p["f6.b"], ws.a6, act)
        be.dense_fwd(ws.a6, p["out.w"], p["out.b"], ws.logits, "identity")

    def _train_ops(self, ws: _Workspace, data: DeviceData, ss: StepState) -> None:
        """Every launch of one training step, in order. All per-step values come from ``ss``."""
        be, p, g, act, pool = self.backend, self._pv, self._gv, self.cfg.activation, self.cfg.pool
        m1 = ws.m1 if pool == "max" else None
        m3 = ws.m3 if pool == "max" else None
        if self.step4:
            self._step4_ops(ws, data, ss)
            return
        be.batch_prepare(data.images, data.labels, data.perm, ss.state, ws.x, ws.y, self.mean, self.std)
        self._forward_convs(ws)
        if self.routed:
            self._routed_backward(ws, ss)
            self._optimizer_step(ss, ws.batch)
            return
        if self.fused["head_train"]:
            be.head_train(ws.p3, ws.y, p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"], p["out.b"],
                          ws.a5, ws.a6, ws.logits, m3, ws.a3, ws.dz3, g["c5.w"], g["c5.b"], g["f6.w"], g["f6.b"],
                          g["out.w"], g["out.b"], ss.stats, ss.state, act, pool)
        else:
            self._forward_dense(ws)
            be.softmax_xent(ws.logits, ws.y, ws.dlogits, ss.stats, ss.state)
            be.dense_bwd(ws.a6, p["out.w"], ws.logits, ws.dlogits, ws.da6, g["out.w"], g["out.b"], "identity")
            be.dense_bwd(ws.a5, p["f6.w"], ws.a6, ws.da6, ws.da5, g["f6.w"], g["f6.b"], act)
            be.dense_bwd(ws.p3_flat, p["c5.w"], ws.a5, ws.da5, ws.dp3_flat, g["c5.w"], g["c5.b"], act)
            be.pool2x2_bwd(ws.dp3, m3, ws.a3, ws.dz3, pool, act)
        be.conv2d_bwd_weight(ws.p1, ws.dz3, g["c3.w"], g["c3.b"], state=ss.state)
        if self.fused["conv2d_bwd_data_pool"]:
            be.conv2d_bwd_data_pool(ws.dz3, p["c3.w"], m1, ws.a1, ws.dz1, pool, act)
        else:
            be.conv2d_bwd_data(ws.dz3, p["c3.w"], ws.dp1)
            be.pool2x2_bwd(ws.dp1, m1, ws.a1, ws.dz1, pool, act)
        be.conv2d_bwd_weight(ws.x, ws.dz1, g["c1.w"], g["c1.b"], state=ss.state)
        self._optimizer_step(ss, ws.batch)

    def _routed_backward(self, ws: _Workspace, ss: StepState) -> None:
        """The head and the routed backward of the two conv+max-pool layers (docs/routed_backward.md): the
        gradients stay at the pooled sizes (gz3 at S4, gz1 at S2) and go through the routes m3, m1."""
        be, p, g, act = self.backend, self._pv, self._gv, self.cfg.activation
        be.head_train(ws.p3, ws.y, p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"], p["out.b"],
                      ws.a5, ws.a6, ws.logits, ws.m3, None, ws.gz3, g["c5.w"], g["c5.b"], g["f6.w"], g["f6.b"],
                      g["out.w"], g["out.b"], ss.stats, ss.state, act, "max")
        be.conv2d_bwd_weight_routed(ws.p1, ws.gz3, ws.m3, g["c3.w"], g["c3.b"], state=ss.state)
        be.conv2d_bwd_data_routed(ws.gz3, p["c3.w"], ws.m3, ws.p1, ws.gz1, act)
        be.conv2d_bwd_weight_routed(ws.x, ws.gz1, ws.m1, g["c1.w"], g["c1.b"], state=ss.state)

    def _step4_ops(self, ws: _Workspace, data: DeviceData, ss: StepState) -> None:
        """The four-kernel step (docs/step4.md): the routed step's mathematics in four ops."""
        be, p, g, act = self.backend, self._pv, self._gv, self.cfg.activation
        be.step_fwd(data.images, data.labels, data.perm, ss.state, ss.sched, ws.srow, ws.x, ws.y, p["c1.w"],
                    p["c1.b"], ws.p1, ws.m1, p["c3.w"], p["c3.b"], ws.p3, ws.m3, self.mean, self.std, act)
        be.head_train(ws.p3, ws.y, p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"], p["out.b"],
                      ws.a5, ws.a6, ws.logits, ws.m3, None, ws.gz3, g["c5.w"], g["c5.b"], g["f6.w"], g["f6.b"],
                      g["out.w"], g["out.b"], ss.stats, ss.state, act, "max")
        be.step_bwd(ws.x, ws.p1, ws.gz3, ws.m3, ws.m1, p["c3.w"], ws.gpart, act)
        if self.optimizer == "adam":
            be.step_adam(self.params, self.grads, ws.gpart, self.m, self.v, ws.srow, ss.state, ws.batch,
                         self.beta1, self.beta2, self.eps, self.weight_decay)
        else:
            be.step_sgd(self.params, self.grads, ws.gpart, self.m, ws.srow, ss.state, ws.batch, self.momentum,
                        self.weight_decay)

    def _optimizer_step(self, ss: StepState, batch: int) -> None:
        be = self.backend
        if self.optimizer == "adam":
            be.adam_step(self.params, self.grads, self.m, self.v, ss.sched, ss.state, self.beta1, self.beta2,
                         self.eps, self.weight_decay)
        else:
            be.sgd_step(self.params, self.grads, self.m, ss.sched, ss.state, self.momentum, self.weight_decay)
        be.step_advance(ss.state, batch)

    def _program(self, data: DeviceData, batch: int, ss: StepState) -> _Program:
        key = (id(data), batch)
        prog = self._programs.get(key)
        if prog is None:
            ahead = getattr(self.backend, COMPILE_AHEAD, None)
            if ahead is not None and not self._programs:
                # the step this model takes (routed, step4: not among the options a checkpoint keeps)
                ahead({**self.options(), "routed": self.routed, "step4": self.step4}, any(self.fused.values()),
                      scratch_step)
            ws = self.workspace(batch)
            prog = self._programs[key] = _Program(self.backend.record(lambda: self._train_ops(ws, data, ss)), batch)
            prog.data = data  # keeps id(data) from being reused while the program lives
        return prog

    # ------------------------------------------------------------------ device-resident training
    def upload_dataset(self, images: np.ndarray, labels: np.ndarray) -> DeviceData:
        """Upload a dataset once as uint8 (images (N,28,28), labels (N,)); its order starts as stored."""
        images, labels = _check_batch(images, labels)
        be = self.backend
        n = images.shape[0]
        return DeviceData(be.to_device(images), be.to_device(labels), be.to_device(np.arange(n, dtype=np.int32)), n)

    def begin_run(
        self, data: DeviceData, batch: int, lrs: np.ndarray | float | None = None, seed: int = 0, shift: int = 0,
        epoch: int = 0, step_in_epoch: int = 0,
    ) -> None:
        """Set up a training run over ``data`` at ``batch`` images a step (the last partial batch of an
        epoch is dropped): ``lrs`` the learning rate of every step from the model's current step on (an
        array), or one value for all (default: the model's lr); augmentation ``shift`` (pixels, 0 = off)
        drawn from ``seed``; the run starts at ``epoch``, ``step_in_epoch``. Uploads the schedule table
        and the state words (once per run)."""
        batch = int(batch)
        if not 1 <= batch <= data.n:
            raise ValueError(f"batch must be in 1..{data.n} (got {batch})")
        spe = data.n // batch
        if not 0 <= step_in_epoch < spe:
            raise ValueError(f"step_in_epoch must be in 0..{spe - 1} (got {step_in_epoch})")
        lrs = np.atleast_1d(np.asarray(self.lr if lrs is None else lrs, dtype=np.float64))
        if not np.all(np.isfinite(lrs)) or (lrs < 0).any():
            raise ValueError("learning rates must be finite and >= 0")
        self._run.set_schedule(schedule_table(lrs, self.step_count, self.beta1, self.beta2))
        self._run.ensure_stats(spe)
        self._run.set(HostState(step=self.step_count, sched_base=self.step_count, step_in_epoch=int(step_in_epoch),
                                offset=int(step_in_epoch) * batch, epoch=int(epoch), steps_per_epoch=spe,
                                seed=int(seed), shift=int(shift)))
        self._run_batch = batch

    @property
    def run_position(self) -> HostState:
        """Where the run stands (the host's mirror of the device state: epoch, step_in_epoch, step)."""
        return HostState(**vars(self._run.host))

    def begin_epoch(self, data: DeviceData, perm: np.ndarray) -> None:
        """Install this epoch's order of the samples (one copy per epoch)."""
        perm = np.asarray(perm, dtype=np.int32)
        if perm.shape != (data.n,):
            raise ValueError(f"perm must have shape ({data.n},)")
        self.backend.upload(data.perm, perm)

    def run_steps(self, data: DeviceData, count: int) -> None:
        """Issue ``count`` training steps of the run set up by ``begin_run``: whole graphs of K steps where
        the backend has them, replayed recorded launches for the rest. No allocation (after the first
        steps at a batch size), copy or synchronisation."""
        if self._run_batch == 0:
            raise RuntimeError("run_steps: call begin_run first")
        batch = self._run_batch
        prog = self._program(data, batch, self._run)
        done = 0
        if not prog.warm and count > 0:  # the first call records (and compiles, allocates scratch)
            prog.eager()
            prog.warm = True
            done = 1
        k = self.graph_steps
        while count - done >= k and (graph := self._graph(prog, k)) is not None:
            graph()
            done += k
        rest = count - done
        if rest >= MIN_GRAPH_STEPS and (graph := self._graph(prog, rest)) is not None:
            graph()  # an epoch's tail: the same number of steps every epoch, so one more graph
            done += rest
        while done < count:
            prog.eager()
            done += 1
        self._run.issued(batch, count)
        self.step_count += count

    def _graph(self, prog: _Program, steps: int) -> Callable[[], None] | None:
        """The graph of ``steps`` steps of ``prog`` (captured at its first call), once the backend's graphs
        passed the self-check in this process; None where graphs are off or unavailable."""
        if not self.use_graphs:
            return None
        if steps in prog.graphs:
            return prog.graphs[steps]
        be = self.backend
        graph = prog.graphs[steps] = be.graph(prog.eager, steps)
        if graph is None:
            return None
        ok, msg = _GRAPH_CHECKS.get(be.name, (None, ""))
        if ok is None:
            ok, msg = self._graph_self_check(prog, graph, steps)
            _GRAPH_CHECKS[be.name] = (ok, msg)
        if not ok:
            self.graph_note = msg
            prog.graphs[steps] = None
            self.use_graphs = False
            return None
        return graph

    def _graph_self_check(self, prog: _Program, graph: Callable[[], None], k: int) -> tuple[bool, str]:
        """k steps replayed through ``graph`` against the same k steps launched eagerly, bit for bit, from
        the same starting point (parameters, moments, state), which is restored afterwards."""
        saved = self._snapshot()
        try:
            for _ in range(k):
                prog.eager()
            eager = self._snapshot()
            self._restore(saved)
            graph()  # captures, then replays
            replay = self._snapshot()
        except Exception as e:  # noqa: BLE001 - capture can fail in many ways; training goes on eagerly
            self._restore(saved)
            return False, f"CUDA graphs off: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        self._restore(saved)
        bad = [name for name in eager if not np.array_equal(eager[name], replay[name], equal_nan=True)]
        if bad:
            return False, f"CUDA graphs off: {k} replayed steps differ from {k} eager steps in {', '.join(bad)}"
        return True, f"CUDA graphs on: {k} replayed steps equal {k} eager steps bit for bit"

    def graph_check(self) -> tuple[bool, str]:
        """The graph self-check's verdict in this process ((False, why) where none ran or none applies)."""
        be = self.backend
        if be.name in _GRAPH_CHECKS:
            return _GRAPH_CHECKS[be.name]
        return False, self.graph_note or f"no CUDA graph has been captured on {be.name}"

    def _snapshot(self) -> dict[str, np.ndarray]:
        be = self.backend
        snap = {"params": be.to_host(self.params), "m": be.to_host(self.m), "state": be.to_host(self._run.state),
                "stats": be.to_host(self._run.stats), "grads": be.to_host(self.grads)}
        if self.v is not None:
            snap["v"] = be.to_host(self.v)
        return snap

    def _restore(self, snap: dict[str, np.ndarray]) -> None:
        be = self.backend
        be.upload(self.params, snap["params"])
        be.upload(self.m, snap["m"])
        be.upload(self._run.state, snap["state"])
        be.upload(self._run.stats, snap["stats"])
        be.upload(self.grads, snap["grads"])
        if self.v is not None:
            be.upload(self.v, snap["v"])

    def step_stats(self, first: int, count: int) -> np.ndarray:
        """(count, 2) float64: [loss sum, correct count] of the run's steps first .. first+count−1 of the
        current epoch (one copy; waits for them)."""
        return self._run.read_stats(first, count)

    def evaluate(self, data: DeviceData, batch_size: int = 1000) -> tuple[float, int]:
        """(loss sum, correct count) over a device-resident dataset in its stored order.

        Where the backend has lenet_fwd and lenet_eval (cupy, numba), the whole set runs on the device: one lenet_fwd
        launch into a logits buffer kept per size, one lenet_eval launch that sums the loss and the correct
        count in double in a fixed order, one 16-byte copy back (``batch_size`` is not used). Elsewhere the
        logits come from the backend ``batch_size`` images at a time and are summed on the host in float64.
        Training state is left alone."""
        be = self.backend
        ev = getattr(be, "lenet_eval", None)
        if ev is not None and self.fused["lenet_fwd"]:
            logits, out = self._eval_buffers(data.n)
            be.lenet_fwd(data.images, self._pv, logits, self.mean, self.std, self.cfg.activation, self.cfg.pool)
            ev(logits, data.labels, out)
            loss, correct = be.to_host(out)
            return float(loss), int(correct)
        logits = self._device_logits(data.images, data.n, batch_size)
        labels = be.to_host(data.labels)
        return _loss_and_correct(logits, labels)

    def _eval_buffers(self, n: int) -> tuple[Any, Any]:
        """Device logits (n,10) and the (2,) float64 sums of evaluation, allocated at the first pass of a size."""
        bufs = getattr(self, "_eval_bufs", None)
        if bufs is None or bufs[0].shape[0] != n:
            be = self.backend
            bufs = self._eval_bufs = (be.empty((n, NUM_CLASSES)), be.empty((2,), np.float64))
        return bufs

    def _device_logits(self, images: Any, n: int, batch_size: int) -> np.ndarray:
        """(n, 10) host logits of device images in stored order."""
        be = self.backend
        out = np.empty((n, NUM_CLASSES), np.float32)
        if self.fused["lenet_fwd"]:
            for s in range(0, n, batch_size):
                b = min(batch_size, n - s)
                ws = self.workspace(b)
                be.lenet_fwd(images[s : s + b], self._pv, ws.logits, self.mean, self.std, self.cfg.activation,
                             self.cfg.pool)
                out[s : s + b] = be.to_host(ws.logits)
            return out
        labels = self._eval_labels(n)
        perm = self._eval_perm(n)
        self._eval.set(HostState(steps_per_epoch=NO_WRAP))
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            ws = self.workspace(b)
            be.batch_prepare(images, labels, perm, self._eval.state, ws.x, ws.y, self.mean, self.std)
            self._forward_convs(ws)
            self._forward_dense(ws)
            be.step_advance(self._eval.state, b)
            out[s : s + b] = be.to_host(ws.logits)
        return out

    def _eval_perm(self, n: int) -> Any:
        perm = getattr(self, "_eval_perm_buf", None)
        if perm is None or perm.shape[0] != n:
            perm = self._eval_perm_buf = self.backend.to_device(np.arange(n, dtype=np.int32))
        return perm

    def _eval_labels(self, n: int) -> Any:
        lab = getattr(self, "_eval_labels_buf", None)
        if lab is None or lab.shape[0] != n:
            lab = self._eval_labels_buf = self.backend.zeros((n,), np.uint8)
        return lab

    # ------------------------------------------------------------------ host-batch API
    def _staging(self, n: int) -> DeviceData:
        d = self._host_data.get(n)
        if d is None:
            be = self.backend
            d = self._host_data[n] = DeviceData(be.empty((n, IMAGE_HW, IMAGE_HW), np.uint8), be.zeros((n,), np.uint8),
                                                be.to_device(np.arange(n, dtype=np.int32)), n)
        return d

    def train_step(self, images_u8: np.ndarray, labels: np.ndarray, lr: float | None = None) -> float:
        """One optimizer step on a host batch (N,28,28) uint8, without augmentation; returns the batch's
        mean loss."""
        images_u8, labels = _check_batch(images_u8, labels)
        n = images_u8.shape[0]
        be = self.backend
        data = self._staging(n)
        be.upload(data.images, images_u8)
        be.upload(data.labels, labels)
        ss = self._host
        ss.set_schedule(schedule_table([self.lr if lr is None else lr], self.step_count, self.beta1, self.beta2))
        ss.set(HostState(step=self.step_count, sched_base=self.step_count, steps_per_epoch=NO_WRAP))
        self._program(data, n, ss).eager()
        self.step_count += 1
        return float(ss.read_stats(0, 1)[0, 0]) / n

    def logits(self, images: Any, batch_size: int | None = None) -> Any:
        """(N,10) float32 logits of images (N,28,28): uint8 pixels, or float32 already normalised as
        ``(p/255 - mean)/std`` (lenet_gpu.arrays). A host array (NumPy, or a CPU DLPack producer) gives a NumPy
        array; a device array on the model's GPU (CuPy, PyTorch, JAX through DLPack; Numba and others through
        ``__cuda_array_interface__``) gives an array of the same kind, computed on the device without a host
        copy. ``batch_size`` tiles host inputs only (default: the backend's choice; on cupy, chunks of
        cupy_backend.staging.CHUNK images through pinned buffers, copies overlapped with compute)."""
        inc = self._incoming(images)
        if inc.where == "device":
            return arrays.export(self.forward_device(inc), inc.kind, self.backend)
        return self._host_logits(inc, batch_size)

    def predict(self, images: Any, batch_size: int | None = None) -> Any:
        """Class ids (N,) int64 (the first maximal logit) of images as for ``logits``: a NumPy array for a host
        input, an array of the input's kind for a device input (where the backend fuses the argmax into the
        forward kernel, no logits are written)."""
        inc = self._incoming(images)
        if inc.where == "device":
            return arrays.export(self.forward_device(inc, classes=True), inc.kind, self.backend)
        return np.argmax(self._host_logits(inc, batch_size), axis=1)

    def forward_device(self, images: Any, classes: bool = False) -> Any:
        """The backend's own device array of logits (N,10) float32, or of class ids (N,) int64 with
        ``classes``, for a device input on the model's device (an ``arrays.Incoming`` or any array
        ``logits`` takes): one launch over the whole batch where the backend has lenet_fwd, no host copy,
        no synchronisation, one allocation (the result). What the benchmarks time."""
        inc = images if isinstance(images, arrays.Incoming) else self._incoming(images)
        if inc.where != "device":
            raise arrays.ArrayInputError("forward_device: images must be a device array on the model's device")
        be = self.backend
        adopt = getattr(be, "adopt_array", None)
        x = adopt(inc) if adopt is not None else arrays.adopt(be, inc)
        n = inc.n
        fwd = getattr(be, "lenet_fwd", None) if self.fused["lenet_fwd"] else None
        feats = getattr(fwd, "features", ())
        if fwd is not None and (inc.dtype == "uint8" or "float32" in feats):
            if classes and "classes" in feats:
                out = be.empty((n,), np.int64)
                fwd(x, self._pv, None, self.mean, self.std, self.cfg.activation, self.cfg.pool, classes=out)
                return out
            out = be.empty((n, NUM_CLASSES))
            fwd(x, self._pv, out, self.mean, self.std, self.cfg.activation, self.cfg.pool)
        else:
            raise arrays.ArrayInputError(
                f"images: {inc.dtype} device arrays need a fused lenet_fwd that takes them (the cupy and numba "
                f"backends'); {be.name} has {'no lenet_fwd' if fwd is None else 'a uint8-only lenet_fwd'}")
        if classes:
            return _device_argmax(out)
        return out

    def score(self, images: Any, labels: Any, batch_size: int | None = None) -> tuple[float, int]:
        """(Σ softmax cross-entropy, correct count) of images and their labels (N,) class ids, of any kind
        ``logits`` takes (both on the host, or both on the model's device). On a device with lenet_eval (cupy,
        numba): one forward launch, one lenet_eval launch summing in double in a fixed order, one 16-byte copy
        back (non-uint8 labels are converted on the device: one documented copy; a Numba device array, which has
        no astype, through the host). On the host: the logits of ``logits`` summed in float64 on the host."""
        inc = self._incoming(images)
        lab = arrays.classify_labels(labels, inc.n, inc)
        if inc.where == "host":
            y = np.asarray(lab.host)
            if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
                raise arrays.ArrayInputError("labels must be class ids in 0..9")
            return _loss_and_correct(self._host_logits(inc, batch_size), y)
        be = self.backend
        logits = self.forward_device(inc)
        adopt = getattr(be, "adopt_array", None)
        y = adopt(lab) if adopt is not None else arrays.adopt(be, lab)
        ev = getattr(be, "lenet_eval", None)
        if ev is None:  # no device reduction on this backend: the logits come back once
            return _loss_and_correct(be.to_host(logits), be.to_host(y))
        if y.dtype != np.uint8:  # one conversion (class ids 0..9 fit): on the device, or (Numba) via the host
            y = y.astype(np.uint8) if hasattr(y, "astype") else be.to_device(be.to_host(y).astype(np.uint8))
        out = getattr(self, "_score_out", None)
        if out is None:
            out = self._score_out = be.empty((2,), np.float64)
        ev(logits, y, out)
        loss, correct = be.to_host(out)
        return float(loss), int(correct)

    def _incoming(self, images: Any) -> arrays.Incoming:
        be = self.backend
        return arrays.classify(images, arrays.backend_device(be), be.name, arrays.pointer_device(be))

    def _host_logits(self, inc: arrays.Incoming, batch_size: int | None) -> np.ndarray:
        """(N,10) host logits of a host input, ``batch_size`` images an upload."""
        images = np.ascontiguousarray(inc.host)
        n = images.shape[0]
        be = self.backend
        stager = getattr(be, "stager", None)
        if stager is not None and images.dtype == np.uint8 and self.fused["lenet_fwd"]:
            # chunks through pinned buffers, copy overlapped with compute, one copy back (cupy_backend/staging.py)
            st = stager()
            pv, mean, std, act, pool = self._pv, self.mean, self.std, self.cfg.activation, self.cfg.pool
            return st.run(images, st.output(n, NUM_CLASSES),
                          lambda x, out: be.lenet_fwd(x, pv, out, mean, std, act, pool), batch_size)
        batch_size = batch_size or 1024
        out = np.empty((n, NUM_CLASSES), np.float32)
        if images.dtype == np.float32:
            self._host_float_logits(images, out, batch_size)
            return out
        for s in range(0, n, batch_size):
            chunk = images[s : s + batch_size]
            data = self._staging(chunk.shape[0])
            self.backend.upload(data.images, chunk)
            out[s : s + chunk.shape[0]] = self._device_logits(data.images, chunk.shape[0], chunk.shape[0])
        return out

    def _host_float_logits(self, images: np.ndarray, out: np.ndarray, batch_size: int) -> None:
        """Normalised float32 images (N,28,28): padded on the host with the normalised value of pixel 0
        (-mean/std) into the workspace's input, then the layer-by-layer forward pass."""
        be = self.backend
        pad = np.float32(-self.mean / self.std)
        for s in range(0, images.shape[0], batch_size):
            chunk = images[s : s + batch_size]
            b = chunk.shape[0]
            x = np.full((b, 1, INPUT_HW, INPUT_HW), pad, np.float32)
            x[:, 0, 2 : 2 + IMAGE_HW, 2 : 2 + IMAGE_HW] = chunk
            ws = self.workspace(b)
            be.upload(ws.x, x)
            self._forward_convs(ws)
            self._forward_dense(ws)
            out[s : s + b] = be.to_host(ws.logits)

    def activations(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage's output for a few images, from the same backend code that trains.

        Keys: input (N,1,32,32), C1, S2, C3, S4, C5, F6, output (logits).
        """
        images, _ = _check_batch(images, None)
        n = images.shape[0]
        ws = self.workspace(n)
        be = self.backend
        data = self._staging(n)
        be.upload(data.images, images)
        self._eval.set(HostState(steps_per_epoch=NO_WRAP))
        be.batch_prepare(data.images, data.labels, data.perm, self._eval.state, ws.x, ws.y, self.mean, self.std)
        self._forward_convs(ws)
        self._forward_dense(ws)
        a1, a3 = ws.a1, ws.a3
        if a1 is None:  # routed mode keeps no un-pooled conv outputs: compute them here, with the dense op
            p, act = self._pv, self.cfg.activation
            a1, a3 = be.empty((n, 6, 28, 28)), be.empty((n, 16, 10, 10))
            be.conv2d_fwd(ws.x, p["c1.w"], p["c1.b"], a1, act)
            be.conv2d_fwd(ws.p1, p["c3.w"], p["c3.b"], a3, act)
        pairs = (("input", ws.x), ("C1", a1), ("S2", ws.p1), ("C3", a3), ("S4", ws.p3),
                 ("C5", ws.a5), ("F6", ws.a6), ("output", ws.logits))
        return {k: be.to_host(v) for k, v in pairs}

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> np.ndarray:
        """A host copy of the flat float32 parameter buffer (with its alignment padding)."""
        return self.backend.to_host(self.params)

    def param_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter tensor by name (c1.w, c1.b, ..., out.b)."""
        return {k: np.array(v) for k, v in views(self.parameters(), self.cfg).items()}

    def set_parameters(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat, dtype=np.float32)
        if flat.shape != (self.size,):
            raise ValueError(f"parameters must have shape ({self.size},), got {flat.shape}")
        self.backend.upload(self.params, flat)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        be = self.backend
        state = {"m": be.to_host(self.m), "step": np.array(self.step_count, np.int64)}
        if self.v is not None:
            state["v"] = be.to_host(self.v)
        return state

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        be = self.backend
        be.upload(self.m, np.asarray(state["m"], np.float32))
        if self.v is not None:
            be.upload(self.v, np.asarray(state["v"], np.float32))
        self.step_count = int(state["step"])

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write a checkpoint atomically: one .npz (no pickle) with the parameters, the layout, the
        options, the optimizer state and ``extra`` (any JSON-serialisable dict)."""
        path = Path(path)
        arrays = {
            "format": np.array(CHECKPOINT_FORMAT),
            "version": np.array(CHECKPOINT_VERSION),
            "layout": layout_signature(self.cfg),
            "options": np.array(json.dumps(self.options())),
            "extra": np.array(json.dumps(extra or {})),
            "params": self.parameters(),
            **{f"opt_{k}": v for k, v in self.optimizer_state().items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | Backend = "auto", **overrides) -> LeNet5:
        """Rebuild a model from a checkpoint. ``overrides`` replace stored options (e.g. lr)."""
        model, _ = cls.load_with_extra(path, backend, **overrides)
        return model

    @classmethod
    def load_with_extra(
        cls, path: str | os.PathLike, backend: str | Backend = "auto", **overrides
    ) -> tuple[LeNet5, dict]:
        """Like ``load``, also returning the ``extra`` dict the checkpoint was saved with."""
        ck = read_checkpoint(path)
        opts = {**ck["options"], **overrides}
        model = cls(backend=backend, **opts)
        if not np.array_equal(ck["layout"], layout_signature(model.cfg)):
            raise CheckpointError(f"{path}: parameter layout does not match this version of lenet_gpu")
        model.set_parameters(ck["params"])
        if "opt_m" in ck["arrays"] and ck["options"].get("optimizer") == model.optimizer:
            model.set_optimizer_state({k[4:]: v for k, v in ck["arrays"].items() if k.startswith("opt_")})
        return model, ck["extra"]


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint file without building a model (no pickle is ever loaded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # a checkpoint is an .npz (a zip archive); np.load would take anything else for a pickle
        what = "it is empty" if not magic else "it is not an .npz archive"
        raise CheckpointError(f"{path}: not a lenet_gpu checkpoint ({what})")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a lenet_gpu checkpoint ({_npz_reason(e)})") from None
    except Exception as e:  # zipfile.BadZipFile and friends
        raise CheckpointError(f"{path}: not a lenet_gpu checkpoint ({_npz_reason(e)})") from None
    if "format" not in arrays or str(arrays["format"]) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lenet_gpu checkpoint (it was written by another program)")
    if int(arrays.get("version", -1)) != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {arrays.get('version')} is not supported")
    for key in ("layout", "options", "params"):
        if key not in arrays:
            raise CheckpointError(f"{path}: checkpoint is missing {key!r}")
    try:
        options = json.loads(str(arrays["options"]))
        extra = json.loads(str(arrays.get("extra", "{}")))
        cfg = NetConfig(options["activation"], options["pool"], int(options["f6"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: checkpoint options are unreadable ({e})") from None
    if not np.array_equal(arrays["layout"], layout_signature(cfg)):
        raise CheckpointError(f"{path}: parameter layout does not match this version of lenet_gpu")
    params = arrays["params"]
    if params.dtype != np.float32 or params.shape != (param_layout(cfg)[1],):
        raise CheckpointError(f"{path}: parameter buffer has the wrong dtype or size")
    if not np.all(np.isfinite(params)):
        raise CheckpointError(f"{path}: parameters contain NaN or inf")
    return {"options": options, "extra": extra, "layout": arrays["layout"], "params": params, "arrays": arrays}


def _npz_reason(e: BaseException) -> str:
    """Why NumPy could not read a file as a checkpoint, in a few words of one line (NumPy's own message about
    pickles advises allow_pickle=True, which a checkpoint never needs and this program never does)."""
    text = str(e)
    if "allow_pickle" in text:
        return "it holds pickled Python objects, which are never loaded"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"cannot read it as .npz: {first[:120]}"


def _check_batch(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray | None]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_HW, IMAGE_HW):
        raise ValueError(f"images must be uint8 of shape (N,28,28), got {images.dtype} {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image")
    images = np.ascontiguousarray(images)
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError("labels must be class ids in 0..9")
    return images, np.ascontiguousarray(labels, dtype=np.uint8)


def _loss_and_correct(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(Σ softmax cross-entropy, rows whose first maximal logit is the label), in float64 on the host."""
    z = logits.astype(np.float64)
    lab = np.asarray(labels).astype(np.intp)
    mx = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - mx).sum(axis=1)) + mx[:, 0]
    loss = float((lse - z[np.arange(z.shape[0]), lab]).sum())
    return loss, int((np.argmax(logits, axis=1) == lab).sum())


def scratch_step(backend: Backend, options: dict, fused: bool, batch: int) -> None:
    """One training step and one inference of a model with ``options`` on ``backend``, on zero images: the
    model's half of a backend's ``compile_ahead`` hook (backends/base.py), which compiles a model's kernels
    ahead of its first step without knowing the model (cpu_backend/warm.py runs it, here or in a helper
    process that imports it by name)."""
    model = LeNet5(backend=backend, **options, fused=fused, use_graphs=False)
    images = np.zeros((batch, IMAGE_HW, IMAGE_HW), np.uint8)
    model.train_step(images, np.zeros(batch, np.uint8))
    model.logits(images, batch_size=batch)


def _device_argmax(logits: Any) -> Any:
    """Class ids (N,) int64 of device logits (the first maximal logit, as np.argmax), on the device."""
    if isinstance(logits, np.ndarray):  # a host backend's "device" array (the harness)
        return np.argmax(logits, axis=1)
    if arrays.producer_kind(logits) == "cupy":
        return logits.argmax(axis=1)
    import cupy  # a numba device array: CuPy reads it through __cuda_array_interface__ without a copy

    return cupy.asarray(logits).argmax(axis=1)
