"""LeNet5: parameters, gradients, optimizer state and workspaces; forward, backward and training steps
over any backend.

The model talks to the Backend protocol only (lenet_gpu.backends.base); it knows nothing of CUDA.
Parameters, gradients and optimizer moments are each one flat float32 device buffer with per-layer
views (lenet_gpu.spec), so the optimizer is one launch and a checkpoint is one array plus its layout.

Two ways to train:
- ``train_step(images_u8, labels)``: one step on a host batch (uploads the batch, reads the loss back);
- the device-resident path the training program uses: ``upload_dataset`` once, then per epoch
  ``begin_epoch(data, perm)`` and ``step(data, offset, lr)`` for each batch — a step makes no
  allocation, no host↔device copy and no synchronisation — and ``read_stats()`` when logging.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .spec import IMAGE_HW, INPUT_HW, NUM_CLASSES, NetConfig, init_params, layout_signature, param_layout, views

CHECKPOINT_FORMAT = "lenet_gpu-checkpoint"
CHECKPOINT_VERSION = 1
#: MNIST's pixel statistics (on [0,1]); the training program replaces them with the training set's.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
OPTIMIZERS = ("adam", "sgd")


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
    """Every activation and gradient buffer of one batch size, allocated once."""

    def __init__(self, be: Backend, batch: int, cfg: NetConfig) -> None:
        e = be.empty
        f6 = cfg.f6
        self.batch = batch
        self.x = e((batch, 1, INPUT_HW, INPUT_HW))
        self.y = e((batch,), np.int32)
        self.a1 = e((batch, 6, 28, 28))  # C1 activated output
        self.p1 = e((batch, 6, 14, 14))  # S2
        self.m1 = e((batch, 6, 14, 14), np.uint8)  # S2 argmax
        self.a3 = e((batch, 16, 10, 10))  # C3
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
        self.dz3 = e((batch, 16, 10, 10))
        self.dp1 = e((batch, 6, 14, 14))
        self.dz1 = e((batch, 6, 28, 28))
        # S4 flattened is C5's input (C5 is the 5×5 convolution on the 5×5 map = a dense layer)
        self.p3_flat = self.p3.reshape(batch, 400)
        self.dp3_flat = self.dp3.reshape(batch, 400)
        # staging for host batches (train_step / logits on host arrays)
        self.host_images = e((batch, IMAGE_HW, IMAGE_HW), np.uint8)
        self.host_labels = e((batch,), np.uint8)
        self.identity = be.to_device(np.arange(batch, dtype=np.int32))
        self.fwd_bwd = None  # the (possibly graph-captured) forward+backward callable


class LeNet5:
    """LeNet-5 (DESIGN.md §1) on a backend.

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
    ) -> None:
        self.cfg = NetConfig(activation=activation, pool=pool, f6=f6)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'adam' or 'sgd' (got {optimizer!r})")
        for label, val in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not np.isfinite(val) or val < 0:
                raise ValueError(f"{label} must be a finite number >= 0 (got {val!r})")
        if not std > 0:
            raise ValueError(f"std must be > 0 (got {std!r})")
        self.backend: Backend = get_backend(backend)
        self.seed = int(seed)
        self.optimizer = optimizer
        self.lr, self.weight_decay, self.momentum = float(lr), float(weight_decay), float(momentum)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.mean, self.std = float(mean), float(std)
        self.use_graphs = use_graphs
        self.specs, self.size = param_layout(self.cfg)
        be = self.backend
        self.init = init
        self.params = be.to_device(init_params(self.cfg, self.seed, init))
        self.grads = be.zeros((self.size,))
        self.m = be.zeros((self.size,))
        self.v = be.zeros((self.size,)) if optimizer == "adam" else None
        self.stats = be.zeros((2,))  # [loss sum, correct] since the last read_stats
        self.step_count = 0  # optimizer steps taken
        self._pv = views(self.params, self.cfg)
        self._gv = views(self.grads, self.cfg)
        self._ws: dict[int, _Workspace] = {}
        self._eval_stats = None
        self._fused = "conv2d_pool_fwd" in getattr(be, "variants", {})

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

    # ------------------------------------------------------------------ workspaces
    def workspace(self, batch: int) -> _Workspace:
        ws = self._ws.get(batch)
        if ws is None:
            ws = self._ws[batch] = _Workspace(self.backend, batch, self.cfg)
            fn = lambda: self._forward_backward(ws)  # noqa: E731
            ws.fwd_bwd = self.backend.graph(fn) if self.use_graphs else fn
        return ws

    # ------------------------------------------------------------------ passes
    def _prepare(self, ws: _Workspace, images: Any, labels: Any, perm: Any, offset: int) -> None:
        self.backend.batch_prepare(images, labels, perm, offset, ws.x, ws.y, self.mean, self.std)

    def _forward(self, ws: _Workspace) -> None:
        be, p, act, pool = self.backend, self._pv, self.cfg.activation, self.cfg.pool
        if self._fused:
            be.conv2d_pool_fwd(ws.x, p["c1.w"], p["c1.b"], ws.a1, ws.p1, ws.m1, act, pool)
            be.conv2d_pool_fwd(ws.p1, p["c3.w"], p["c3.b"], ws.a3, ws.p3, ws.m3, act, pool)
        else:
            be.conv2d_fwd(ws.x, p["c1.w"], p["c1.b"], ws.a1, act)
            be.pool2x2_fwd(ws.a1, ws.p1, ws.m1, pool)
            be.conv2d_fwd(ws.p1, p["c3.w"], p["c3.b"], ws.a3, act)
            be.pool2x2_fwd(ws.a3, ws.p3, ws.m3, pool)
        be.dense_fwd(ws.p3_flat, p["c5.w"], p["c5.b"], ws.a5, act)
        be.dense_fwd(ws.a5, p["f6.w"], p["f6.b"], ws.a6, act)
        be.dense_fwd(ws.a6, p["out.w"], p["out.b"], ws.logits, "identity")

    def _backward(self, ws: _Workspace) -> None:
        be, p, g, act, pool = self.backend, self._pv, self._gv, self.cfg.activation, self.cfg.pool
        be.softmax_xent(ws.logits, ws.y, ws.dlogits, self.stats)
        be.dense_bwd(ws.a6, p["out.w"], ws.logits, ws.dlogits, ws.da6, g["out.w"], g["out.b"], "identity")
        be.dense_bwd(ws.a5, p["f6.w"], ws.a6, ws.da6, ws.da5, g["f6.w"], g["f6.b"], act)
        be.dense_bwd(ws.p3_flat, p["c5.w"], ws.a5, ws.da5, ws.dp3_flat, g["c5.w"], g["c5.b"], act)
        be.pool2x2_bwd(ws.dp3, ws.m3, ws.a3, ws.dz3, pool, act)
        be.conv2d_bwd_weight(ws.p1, ws.dz3, g["c3.w"], g["c3.b"])
        be.conv2d_bwd_data(ws.dz3, p["c3.w"], ws.dp1)
        be.pool2x2_bwd(ws.dp1, ws.m1, ws.a1, ws.dz1, pool, act)
        be.conv2d_bwd_weight(ws.x, ws.dz1, g["c1.w"], g["c1.b"])

    def _forward_backward(self, ws: _Workspace) -> None:
        self._forward(ws)
        self._backward(ws)

    def _optimize(self, lr: float) -> None:
        be = self.backend
        self.step_count += 1
        if self.optimizer == "adam":
            t = self.step_count
            bc1, bc2 = 1.0 - self.beta1**t, 1.0 - self.beta2**t
            be.adam_step(
                self.params, self.grads, self.m, self.v, lr, self.beta1, self.beta2, self.eps,
                self.weight_decay, bc1, bc2,
            )
        else:
            be.sgd_step(self.params, self.grads, self.m, lr, self.momentum, self.weight_decay)

    # ------------------------------------------------------------------ device-resident training
    def upload_dataset(self, images: np.ndarray, labels: np.ndarray) -> DeviceData:
        """Upload a dataset once as uint8 (images (N,28,28), labels (N,))."""
        images, labels = _check_batch(images, labels)
        be = self.backend
        n = images.shape[0]
        return DeviceData(be.to_device(images), be.to_device(labels), be.to_device(np.arange(n, dtype=np.int32)), n)

    def begin_epoch(self, data: DeviceData, perm: np.ndarray) -> None:
        """Install this epoch's order of the samples (one copy per epoch)."""
        perm = np.asarray(perm, dtype=np.int32)
        if perm.shape != (data.n,):
            raise ValueError(f"perm must have shape ({data.n},)")
        self.backend.upload(data.perm, perm)

    def replace_images(self, data: DeviceData, images: np.ndarray) -> None:
        """Overwrite the device images of ``data`` in place (e.g. an epoch's augmented copy): one copy."""
        images, _ = _check_batch(images, None)
        if images.shape[0] != data.n:
            raise ValueError(f"replace_images: need {data.n} images, got {images.shape[0]}")
        self.backend.upload(data.images, images)

    def step(self, data: DeviceData, offset: int, batch: int, lr: float | None = None) -> None:
        """One training step on samples perm[offset:offset+batch] of device data.

        Launches only: no allocation (after the first step at this batch size), copy or sync.
        """
        ws = self.workspace(batch)
        self._prepare(ws, data.images, data.labels, data.perm, offset)
        ws.fwd_bwd()
        self._optimize(self.lr if lr is None else lr)

    def read_stats(self, reset: bool = True) -> tuple[float, int]:
        """(loss sum, correct count) accumulated by training steps since the last reset (syncs)."""
        host = self.backend.to_host(self.stats)
        if reset:
            self.backend.upload(self.stats, np.zeros(2, np.float32))
        return float(host[0]), int(round(float(host[1])))

    def evaluate(self, data: DeviceData, batch_size: int = 1000) -> tuple[float, int]:
        """(loss sum, correct count) over a device-resident dataset in its stored order (syncs once).

        Uses the forward pass and softmax_xent of the training step; the last, smaller batch gets a
        workspace of its own size. Training statistics are left alone.
        """
        if self._eval_stats is None:
            self._eval_stats = self.backend.zeros((2,))
        be = self.backend
        be.upload(self._eval_stats, np.zeros(2, np.float32))
        for off in range(0, data.n, batch_size):
            ws = self.workspace(min(batch_size, data.n - off))
            self._prepare(ws, data.images, data.labels, data.perm, off)
            self._forward(ws)
            be.softmax_xent(ws.logits, ws.y, ws.dlogits, self._eval_stats)
        host = be.to_host(self._eval_stats)
        return float(host[0]), int(round(float(host[1])))

    # ------------------------------------------------------------------ host-batch API
    def train_step(self, images_u8: np.ndarray, labels: np.ndarray, lr: float | None = None) -> float:
        """One optimizer step on a host batch (N,28,28) uint8; returns the batch's mean loss."""
        images_u8, labels = _check_batch(images_u8, labels)
        n = images_u8.shape[0]
        ws = self.workspace(n)
        be = self.backend
        be.upload(ws.host_images, images_u8)
        be.upload(ws.host_labels, labels)
        be.upload(self.stats, np.zeros(2, np.float32))
        self._prepare(ws, ws.host_images, ws.host_labels, ws.identity, 0)
        ws.fwd_bwd()
        self._optimize(self.lr if lr is None else lr)
        loss_sum, _ = self.read_stats(reset=False)  # zeroed above: one h2d, not two
        return loss_sum / n

    def logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """(N,10) float32 logits for uint8 images (N,28,28)."""
        images, _ = _check_batch(images, None)
        out = np.empty((images.shape[0], NUM_CLASSES), np.float32)
        for s in range(0, images.shape[0], batch_size):
            chunk = images[s : s + batch_size]
            ws = self.workspace(chunk.shape[0])
            self.backend.upload(ws.host_images, chunk)
            self._prepare(ws, ws.host_images, ws.host_labels, ws.identity, 0)
            self._forward(ws)
            out[s : s + chunk.shape[0]] = self.backend.to_host(ws.logits)
        return out

    def predict(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Class ids (N,) int64 for uint8 images (N,28,28)."""
        return np.argmax(self.logits(images, batch_size), axis=1)

    def activations(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage's output for a few images, from the same backend code that trains.

        Keys: input (N,1,32,32), C1, S2, C3, S4, C5, F6, output (logits).
        """
        images, _ = _check_batch(images, None)
        ws = self.workspace(images.shape[0])
        be = self.backend
        be.upload(ws.host_images, images)
        self._prepare(ws, ws.host_images, ws.host_labels, ws.identity, 0)
        self._forward(ws)
        pairs = (("input", ws.x), ("C1", ws.a1), ("S2", ws.p1), ("C3", ws.a3), ("S4", ws.p3),
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
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a lenet_gpu checkpoint (cannot read it as .npz: {e})") from None
    except Exception as e:  # zipfile.BadZipFile and friends
        raise CheckpointError(f"{path}: not a lenet_gpu checkpoint ({type(e).__name__}: {e})") from None
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
