"""pytest-benchmark: end-to-end forward pass and training step, ours and (when installed) PyTorch.

``pytest bench --benchmark-only -k model``. The group of each benchmark is the batch size, so
pytest-benchmark's table puts ours and the peer side by side.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from bench import model as e2e
from bench import peer as peermod
from bench.conftest import CFG, backend_or_reason, batches, train_batches


@cache
def _data() -> e2e.BenchData:
    from lenet_gpu import load_dataset

    ds = load_dataset("mnist-sample", progress=False)
    n = max([*batches(), *train_batches(), ds.train_images.shape[0]])
    return e2e.BenchData.from_dataset(ds.train_images, ds.train_labels, n)


@cache
def _net(name: str) -> e2e.OurNet:
    be = backend_or_reason(name)
    if isinstance(be, str):
        pytest.skip(be)
    return e2e.OurNet(be, CFG, _data())


@cache
def _torch_peer() -> Any:
    torch = peermod.torch_or_none()
    if torch is None:
        pytest.skip("PyTorch is not installed")
    net = _net("numpy")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = _data()
    return peermod.TorchLeNet(CFG, net.model.param_dict(), d.images, d.labels, d.mean, d.std, device=dev)


def test_forward(benchmark: Any, e2e_backend: str, fwd_batch: int) -> None:
    net = _net(e2e_backend)
    net.check_forward(fwd_batch, {})
    benchmark.group = f"forward b={fwd_batch}"
    benchmark.extra_info.update(backend=e2e_backend, batch=fwd_batch)
    benchmark(lambda: (net.forward(fwd_batch), net.synchronize()))


def test_train_step(benchmark: Any, e2e_backend: str, train_batch: int) -> None:
    net = _net(e2e_backend)
    net.check_grads(train_batch, {})
    benchmark.group = f"train b={train_batch}"
    benchmark.extra_info.update(backend=e2e_backend, batch=train_batch)
    benchmark(lambda: (net.train_step(train_batch), net.synchronize()))


def test_forward_torch(benchmark: Any, fwd_batch: int) -> None:
    pr = _torch_peer()
    benchmark.group = f"forward b={fwd_batch}"
    benchmark.extra_info.update(backend="torch", batch=fwd_batch)
    benchmark(lambda: (pr.forward(0, fwd_batch), pr.synchronize()))


def test_train_step_torch(benchmark: Any, train_batch: int) -> None:
    pr = _torch_peer()
    benchmark.group = f"train b={train_batch}"
    benchmark.extra_info.update(backend="torch", batch=train_batch)
    benchmark(lambda: (pr.train_step(0, train_batch), pr.synchronize()))
