"""The numba backend: every op of the protocol as Numba CUDA kernels (``@cuda.jit``), one module per
op family with the stems of the CUDA C files (batch, conv2d, pool2x2, dense, loss, optim); the
NumbaBackend class in backend.py; static compile checks in compile_report.py.

Under ``NUMBA_ENABLE_CUDASIM=1`` (set before Numba is imported) everything runs in Numba's CUDA
simulator: slow, for tiny debugging runs and the CI parity tests.
"""

from .backend import DEFAULT_VARIANTS, KERNELS, SIGNATURES, VARIANTS, NumbaBackend

__all__ = ["DEFAULT_VARIANTS", "KERNELS", "SIGNATURES", "VARIANTS", "NumbaBackend"]
