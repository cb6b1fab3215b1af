"""The peer: the same LeNet-5 in PyTorch, measured in the same run as ours.

Same layers (conv 5×5 1→6 + act, pool 2, conv 5×5 6→16 + act, pool 2, dense 400→120→F6→10), same
input pipeline (gather uint8 images from a resident dataset by index, pad 28→32 with pixel 0,
normalise), same initial parameters (copied from our model, so both start from the same point), same
optimizer (Adam, torch.optim.Adam defaults otherwise), same batch. On a GPU the model runs with cuDNN
(``torch.backends.cudnn.benchmark = True``) and, when asked, under ``torch.compile``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lenet_gpu.spec import NetConfig


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


class TorchLeNet:
    """LeNet-5 in PyTorch with our parameters, a resident uint8 dataset and Adam."""

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
        compile_model: bool = False,
    ) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812
        from torch import nn

        self.torch, self.F = torch, F
        self.device = torch.device(device)
        self.cfg = cfg
        self.mean, self.std = float(mean), float(std)
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

        self.net = Net().to(self.device)
        self.set_parameters(params)
        self.step_fn: Callable[..., Any] = self.net
        if compile_model:
            self.step_fn = torch.compile(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.perm = torch.arange(images.shape[0], device=self.device)

    def set_parameters(self, params: dict[str, np.ndarray]) -> None:
        torch = self.torch
        with torch.no_grad():
            for name in ("c1", "c3", "c5", "f6", "out"):
                layer = getattr(self.net, name)
                layer.weight.copy_(torch.from_numpy(np.asarray(params[f"{name}.w"], np.float32)))
                layer.bias.copy_(torch.from_numpy(np.asarray(params[f"{name}.b"], np.float32)))

    def set_perm(self, perm: np.ndarray) -> None:
        self.perm = self.torch.from_numpy(perm.astype(np.int64)).to(self.device)

    def prepare(self, offset: int, batch: int) -> tuple[Any, Any]:
        """Gather, pad with pixel 0, normalise: the same pipeline as batch_prepare."""
        idx = self.perm[offset : offset + batch]
        x = self.F.pad(self.images[idx], (2, 2, 2, 2)).unsqueeze(1).float()
        x = (x * (1.0 / (255.0 * self.std))) - (self.mean / self.std)
        return x, self.labels[idx]

    def forward(self, offset: int, batch: int) -> Any:
        with self.torch.inference_mode():
            x, _ = self.prepare(offset, batch)
            return self.step_fn(x)

    def train_step(self, offset: int, batch: int, lr: float | None = None) -> Any:
        if lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        x, y = self.prepare(offset, batch)
        self.opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.step_fn(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
        torch = self.torch
        correct = 0
        with torch.inference_mode():
            for s in range(0, images.shape[0], batch):
                x = torch.from_numpy(images[s : s + batch]).to(self.device)
                x = self.F.pad(x, (2, 2, 2, 2)).unsqueeze(1).float()
                x = (x * (1.0 / (255.0 * self.std))) - (self.mean / self.std)
                pred = self.step_fn(x).argmax(1).cpu().numpy()
                correct += int((pred == labels[s : s + batch]).sum())
        return correct / images.shape[0]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def logits(self, offset: int, batch: int) -> np.ndarray:
        out = self.forward(offset, batch)
        return out.float().cpu().numpy()


def compile_time_s(peer: TorchLeNet, batch: int) -> float:
    """Time of the first (compiling) training step."""
    t0 = time.perf_counter()
    peer.train_step(0, batch)
    peer.synchronize()
    return time.perf_counter() - t0
