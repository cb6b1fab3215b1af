"""The cupy backend: CUDA C kernels (kernels/*.cu) on the GPU through CuPy, or on the CPU harness.

``get_backend("cupy")`` = ``CupyBackend()``; ``get_backend("cupy-host")`` = ``CupyBackend(host=True)``.
"""

from .backend import DEFAULT_VARIANTS, MODULE_DEFINES, OP_KERNELS, CupyBackend, launch_plan
from .runtime import CupyRuntime, HostRuntime, Runtime, kernel_source, kernels_dir

__all__ = [
    "DEFAULT_VARIANTS",
    "MODULE_DEFINES",
    "OP_KERNELS",
    "CupyBackend",
    "CupyRuntime",
    "HostRuntime",
    "Runtime",
    "kernel_source",
    "kernels_dir",
    "launch_plan",
]
