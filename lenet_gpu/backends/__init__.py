"""Backends: where the ops of LeNet-5 run. ``get_backend(name)`` is the one way to get one.

Names: ``numpy`` (the CPU, vectorised NumPy), ``cpu`` (the CPU, Numba @njit kernels), ``numba`` (Numba
@cuda.jit kernels; under ``NUMBA_ENABLE_CUDASIM=1`` the CUDA simulator), ``cupy`` (CUDA C kernels in
kernels/ loaded by CuPy RawModule), ``cupy-host`` (the same CUDA C kernels and launch code run on the CPU
by the harness in lenet_gpu.harness: slow, for tests and debugging), and ``auto`` (cupy, then numba,
when a CUDA device is present; cpu otherwise, or numpy where Numba is not installed).
"""

from __future__ import annotations

import importlib

from .base import OPS, OPTIONAL_OPS, Backend, BackendUnavailable, Counters

BACKENDS = ("numpy", "cpu", "numba", "cupy", "cupy-host", "auto")

# name → (module, class, keyword arguments)
_REGISTRY = {
    "numpy": ("lenet_gpu.backends.numpy_backend", "NumpyBackend", {}),
    "cpu": ("lenet_gpu.backends.cpu_backend", "CpuBackend", {}),
    "numba": ("lenet_gpu.backends.numba_backend", "NumbaBackend", {"quick_simulation": True}),
    "cupy": ("lenet_gpu.backends.cupy_backend", "CupyBackend", {}),
    "cupy-host": ("lenet_gpu.backends.cupy_backend", "CupyBackend", {"host": True}),
}


def _make(name: str, **kwargs) -> Backend:
    module, cls, defaults = _REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {name!r} needs packages that are not installed ({e.name or e}); "
            "install them with pip install 'lenet_gpu[cuda12]', or use --backend numpy"
        ) from e
    return getattr(mod, cls)(**{**defaults, **kwargs})


def get_backend(name: str | Backend = "auto", **kwargs) -> Backend:
    """Return a backend by name (or pass a Backend instance through).

    Raises BackendUnavailable with a one-line reason when the backend cannot run on this machine,
    and ValueError for an unknown name.
    """
    if not isinstance(name, str):
        return name
    if name == "auto":
        for candidate in ("cupy", "numba"):
            try:
                be = _make(candidate, **kwargs)
            except BackendUnavailable:
                continue
            if be.is_gpu:
                return be
        try:
            return _make("cpu", **kwargs)
        except BackendUnavailable:
            return _make("numpy", **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _make(name, **kwargs)


__all__ = ["BACKENDS", "OPS", "OPTIONAL_OPS", "Backend", "BackendUnavailable", "Counters", "get_backend"]
