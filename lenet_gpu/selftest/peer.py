"""The peer of the self-test's benchmark: the same LeNet-5 in PyTorch (eager with cuDNN, and torch.compile),
trained and run the same way as ours: a resident uint8 dataset, the batch gathered by index, padded with
pixel 0 and normalised on the device, Adam, our initial parameters. Used only when torch is installed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


class TorchLeNet:
    """LeNet-5 (relu, max pooling, F6 = 84) in PyTorch on ``device`` with our parameters."""

    def __init__(self, params: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray, mean: float, std: float,
                 device: str, compile_model: bool = False, lr: float = 1e-3) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812
        from torch import nn

        self.torch, self.F = torch, F
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.c1, self.c3 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
                self.c5, self.f6, self.out = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

            def forward(self, x: Any) -> Any:
                x = F.max_pool2d(F.relu(self.c1(x)), 2)
                x = F.max_pool2d(F.relu(self.c3(x)), 2).flatten(1)
                return self.out(F.relu(self.f6(F.relu(self.c5(x)))))

        self.net = Net().to(self.device)
        with torch.no_grad():
            for name in ("c1", "c3", "c5", "f6", "out"):
                layer = getattr(self.net, name)
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(params[f"{name}.w"], np.float32)))
                layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(params[f"{name}.b"], np.float32)))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.n = images.shape[0]
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std

        def batch(offset: int, b: int) -> tuple[Any, Any]:
            idx = torch.arange(offset, offset + b, device=self.device) % self.n
            x = F.pad(self.images[idx], (2, 2, 2, 2)).unsqueeze(1).float() * self.scale - self.shift
            return x, self.labels[idx]

        # torch.compile wraps the module (its forward, and through AOTAutograd its backward); the batch
        # gather, the optimizer and no_grad stay outside the compiled region (a compiled function that enters
        # inference_mode itself failed in inductor on torch 2.11 + CUDA 13)
        net = torch.compile(self.net) if compile_model else self.net

        def train_step(offset: int, b: int) -> Any:
            x, y = batch(offset, b)
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            self.opt.step()
            return loss

        def infer(offset: int, b: int) -> Any:
            with torch.no_grad():
                return net(batch(offset, b)[0]).argmax(1)

        self.train_step, self.infer = train_step, infer

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def throughput(fn: Any, sync: Any, batch: int, n_images: int, min_s: float = 0.3, max_calls: int = 2000) -> dict:
    """Images per second of ``fn(offset, batch)`` over consecutive batches, after warm-up (3 calls, which
    also compile under torch.compile: their time is reported as ``first_call_s``)."""
    t0 = time.perf_counter()
    fn(0, batch)
    sync()
    first = time.perf_counter() - t0
    for i in range(2):
        fn((i + 1) * batch % n_images, batch)
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(calls * batch % n_images, batch)
        calls += 1
        if calls % 10 == 0 or calls >= max_calls:
            sync()
            if time.perf_counter() - t0 >= min_s or calls >= max_calls:
                break
    sync()
    dt = time.perf_counter() - t0
    return {"images_per_s": calls * batch / dt, "calls": calls, "seconds": round(dt, 4),
            "first_call_s": round(first, 3)}
