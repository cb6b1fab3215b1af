"""Tools to check the project's CUDA C kernels without a GPU.

- :mod:`lenet_gpu.harness.cudacpu`: run unchanged kernels on the CPU (g++ + ``cudacpu.h``), with a
  CuPy ``RawModule``-like API; optional AddressSanitizer / ThreadSanitizer builds.
- :mod:`lenet_gpu.harness.nvrtc`: compile them with NVRTC for real GPU architectures and read the
  ptxas resource report (registers, spills, shared memory, occupancy).

Neither import needs a GPU; ``nvrtc`` needs ``cuda-bindings`` only when called.
"""

from typing import Any

from .cudacpu import CpuKernel, CpuModule, CudaCpuError, CudaCpuWarning, sanitizer_env

_NVRTC_NAMES = {
    "CompileResult",
    "KernelResources",
    "NvrtcError",
    "compile_cuda",
    "nvrtc_available",
    "parse_ptxas_log",
    "theoretical_occupancy",
}


def __getattr__(name: str) -> Any:
    # imported on first use, so that `python -m lenet_gpu.harness.nvrtc` runs it only once
    if name in _NVRTC_NAMES:
        from . import nvrtc

        return getattr(nvrtc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CompileResult",
    "CpuKernel",
    "CpuModule",
    "CudaCpuError",
    "CudaCpuWarning",
    "KernelResources",
    "NvrtcError",
    "compile_cuda",
    "nvrtc_available",
    "parse_ptxas_log",
    "sanitizer_env",
    "theoretical_occupancy",
]
