"""The peer: the same LeNet-5 in PyTorch, measured in the same run as ours (bench/ and the self-test).

Same layers (conv 5×5 1→6 + act, pool 2, conv 5×5 6→16 + act, pool 2, dense 400→120→F6→10), same
input pipeline (gather uint8 images from a resident dataset by index, pad 28→32 with pixel 0,
normalise), same initial parameters (copied from our model, so both start from the same point), same
optimizer (Adam, torch.optim.Adam defaults otherwise), same batch. On a GPU the model runs with cuDNN
(``torch.backends.cudnn.benchmark = True``), in one of three modes (``MODES``):

- ``eager``: plain PyTorch, one Python dispatch per op;
- ``compile``: the module under ``torch.compile`` (its forward and, through AOTAutograd, its backward;
  the gather, the optimizer and no_grad stay outside the compiled region);
- ``graph`` (CUDA only): the whole training step — gather, forward, loss, backward and Adam with
  ``capturable=True`` — captured as ONE CUDA graph per batch size (``torch.cuda.graph``), replayed with
  the batch's offset in a device scalar; inference likewise (gather + forward as one graph). The
  strongest PyTorch has for a network this small: no Python and no launch overhead per op.

Used only when torch is installed; nothing here imports it at module level.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..spec import NetConfig

MODES = ("eager", "compile", "graph")


def torch_or_none() -> Any:
    """The torch module, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_info(torch: Any) -> dict[str, Any]:
    info = {
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda": bool(torch.cuda.is_available()),
        "mkldnn": bool(getattr(torch.backends, "mkldnn", None) and torch.backends.mkldnn.is_available()),
    }
    if info["cuda"]:
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def mode_unavailable(torch: Any, mode: str, device: str) -> str | None:
    """Why a peer mode cannot run here (None: it can)."""
    if torch is None:
        return "PyTorch is not installed"
    if mode not in MODES:
        return f"unknown mode {mode!r}"
    if device == "cuda" and not torch.cuda.is_available():
        return "torch.cuda is not available"
    if mode == "graph" and device != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def lenet_module(cfg: NetConfig) -> Any:
    """LeNet-5 as a torch.nn.Module (PyTorch's default initialisation), layers c1, c3, c5, f6, out."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    act = {
        "relu": F.relu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "lecun_tanh": lambda z: 1.7159 * torch.tanh(z * (2.0 / 3.0)),
    }[cfg.activation]
    pool = F.max_pool2d if cfg.pool == "max" else F.avg_pool2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 6, 5)
            self.c3 = nn.Conv2d(6, 16, 5)
            self.c5 = nn.Linear(400, 120)
            self.f6 = nn.Linear(120, cfg.f6)
            self.out = nn.Linear(cfg.f6, 10)

        def forward(self, x: Any) -> Any:
            x = pool(act(self.c1(x)), 2)
            x = pool(act(self.c3(x)), 2)
            x = x.flatten(1)
            x = act(self.c5(x))
            x = act(self.f6(x))
            return self.out(x)

    return Net()


class TorchLeNet:
    """LeNet-5 in PyTorch with our parameters, a resident uint8 dataset and Adam, in one of ``MODES``."""

    def __init__(
        self,
        cfg: NetConfig,
        params: dict[str, np.ndarray],
        images: np.ndarray,
        labels: np.ndarray,
        mean: float,
        std: float,
        device: str = "cpu",
        lr: float = 1e-3,
        mode: str = "eager",
    ) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812

        why = mode_unavailable(torch, mode, device)
        if why:
            raise ValueError(f"torch peer mode {mode} on {device}: {why}")
        self.torch, self.F = torch, F
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.cfg, self.mode = cfg, mode
        self.mean, self.std = float(mean), float(std)
        self.net = lenet_module(cfg).to(self.device)
        self.set_parameters(params)
        self.step_fn: Callable[..., Any] = torch.compile(self.net) if mode == "compile" else self.net
        # capturable: Adam's step count and bias corrections stay on the device, so its update can be captured
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, capturable=mode == "graph")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.perm = torch.arange(images.shape[0], device=self.device)
        self._graphs: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def set_parameters(self, params: dict[str, np.ndarray]) -> None:
        torch = self.torch
        with torch.no_grad():
            for name in ("c1", "c3", "c5", "f6", "out"):
                layer = getattr(self.net, name)
                layer.weight.copy_(torch.from_numpy(np.asarray(params[f"{name}.w"], np.float32)))
                layer.bias.copy_(torch.from_numpy(np.asarray(params[f"{name}.b"], np.float32)))

    def set_perm(self, perm: np.ndarray) -> None:
        self.perm = self.torch.from_numpy(perm.astype(np.int64)).to(self.device)
        self._graphs.clear()  # the graphs read the old permutation's memory

    def _normalise(self, u8: Any) -> Any:
        x = self.F.pad(u8, (2, 2, 2, 2)).unsqueeze(1).float()
        return (x * (1.0 / (255.0 * self.std))) - (self.mean / self.std)

    def prepare(self, offset: int, batch: int) -> tuple[Any, Any]:
        """Gather, pad with pixel 0, normalise: the same pipeline as batch_prepare."""
        idx = self.perm[offset : offset + batch]
        return self._normalise(self.images[idx]), self.labels[idx]

    def _prepare_at(self, off: Any, arange: Any) -> tuple[Any, Any]:
        """prepare() with the offset in a device scalar (what a captured graph can replay)."""
        idx = self.perm[(arange + off) % self.perm.shape[0]]
        return self._normalise(self.images[idx]), self.labels[idx]

    # ---- CUDA graphs
    def _capture(self, kind: str, batch: int) -> tuple[Any, Any, Any]:
        """The graph of one training step (kind 'train') or one inference pass ('infer') at ``batch``:
        warm-up on a side stream (cuDNN picks its algorithms, Adam allocates its state), then capture."""
        key = (kind, batch)
        if key in self._graphs:
            return self._graphs[key]
        torch, F = self.torch, self.F
        off = torch.zeros((), dtype=torch.int64, device=self.device)
        arange = torch.arange(batch, device=self.device)

        def body() -> Any:
            if kind == "infer":
                with torch.no_grad():
                    return self.net(self._prepare_at(off, arange)[0])
            x, y = self._prepare_at(off, arange)
            loss = F.cross_entropy(self.net(x), y)
            loss.backward()
            self.opt.step()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                if kind == "train":
                    self.opt.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if kind == "train":  # the captured backward allocates (and at every replay overwrites) the gradients
            self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            out = body()
        self._graphs[key] = (graph, off, out)
        return self._graphs[key]

    def _replay(self, kind: str, offset: int, batch: int) -> Any:
        graph, off, out = self._capture(kind, batch)
        off.fill_(offset)
        graph.replay()
        return out

    # ---- the timed calls
    def forward(self, offset: int, batch: int) -> Any:
        """Logits of ``batch`` resident images from ``offset`` (left on the device)."""
        if self.mode == "graph":
            return self._replay("infer", offset, batch)
        with self.torch.inference_mode():
            x, _ = self.prepare(offset, batch)
            return self.step_fn(x)

    def train_step(self, offset: int, batch: int, lr: float | None = None) -> Any:
        if self.mode == "graph":
            if lr is not None:
                raise ValueError("the graph peer's learning rate is fixed at construction")
            return self._replay("train", offset, batch)
        if lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        x, y = self.prepare(offset, batch)
        self.opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.step_fn(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def logits_from_host(self, images: np.ndarray) -> np.ndarray:
        """Inference through host arrays, copies included: uint8 images (N,28,28) in, float32 logits out."""
        torch = self.torch
        with torch.inference_mode():
            x = self._normalise(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
            return self.step_fn(x).float().cpu().numpy()

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
        correct = 0
        for s in range(0, images.shape[0], batch):
            pred = self.logits_from_host(images[s : s + batch]).argmax(1)
            correct += int((pred == labels[s : s + batch]).sum())
        return correct / images.shape[0]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def logits(self, offset: int, batch: int) -> np.ndarray:
        out = self.forward(offset, batch)
        return out.float().cpu().numpy()


def compile_time_s(peer: TorchLeNet, batch: int) -> float:
    """Time of the first (compiling or capturing) training step."""
    t0 = time.perf_counter()
    peer.train_step(0, batch)
    peer.synchronize()
    return time.perf_counter() - t0
