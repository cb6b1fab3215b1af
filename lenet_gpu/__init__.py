"""lenet_gpu: LeNet-5 trained and run on hand-written CUDA kernels, each proven against NumPy.

    from lenet_gpu import LeNet5, get_backend, load_dataset
    ds = load_dataset("mnist-sample")
    model = LeNet5(backend="auto")
    loss = model.train_step(ds.train_images[:64], ds.train_labels[:64])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends import BackendUnavailable, get_backend
from .model import LeNet5

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .data import Dataset


def load_dataset(name: str | None = None, **kwargs: Any) -> Dataset:
    """Load a dataset by name (see lenet_gpu.data.load_dataset)."""
    from .data import load_dataset as _load

    return _load(name, **kwargs)


__all__ = ["BackendUnavailable", "LeNet5", "get_backend", "load_dataset", "__version__"]
