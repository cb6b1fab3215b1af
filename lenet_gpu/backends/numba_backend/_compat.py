"""Work-arounds for the numba-cuda versions this backend meets in the wild.

numba-cuda ≤ 0.30.x registers an overload for ``np.row_stack`` when its array module is imported,
and NumPy 2.5 removed that alias. The import happens lazily, at the first kernel compile (the typing
context loads the CUDA lowering registry), so every launch then fails with
``AttributeError: module 'numpy' has no attribute 'row_stack'`` — seen on the first real-GPU run of
this project (NumPy 2.5.2, numba-cuda 0.30.4). We give NumPy the alias back for the duration of
that one import, then take it away again, so nothing else sees a changed NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def import_cuda_array_module() -> None:
    """Import numba-cuda's array lowering with ``np.row_stack`` present (a no-op where NumPy has it,
    under the simulator, or where numba-cuda's layout differs)."""
    if hasattr(np, "row_stack"):  # noqa: NPY201 - the alias is what numba-cuda needs
        return
    np.row_stack = np.vstack  # noqa: NPY201
    try:
        import numba.cuda.np.arrayobj  # noqa: F401
    except ImportError:  # the simulator, or another numba-cuda layout: nothing to patch
        pass
    finally:
        delattr(np, "row_stack")


#: the simulator's own FakeCUDAShared.array, kept when fix_simulator_shared_arrays replaces it (its test
#: shows the race on it)
SIMULATOR_SHARED_ARRAY: Any = None


def fix_simulator_shared_arrays() -> bool:
    """Make the CUDA simulator's ``cuda.shared.array`` give every thread of a block the same array.

    numba-cuda's simulator (0.30.x) looks a shared array up by its source line and creates it on a
    miss with ``get``, then ``np.empty``, then a store. Its threads are Python threads, so two of
    them can both miss and each keep its own private ``np.empty`` array: the block then reduces
    through memory its other threads never wrote, and returns garbage (seen in CI: 8 of 36 weights of
    ``conv2d_bwd_weight_v2`` near 1e32 in one run out of many). On a GPU there is one array per block
    and the kernel is right. Here the lookup keeps the simulator's key (file, line) and its
    limitations, and stores with ``dict.setdefault``, which is atomic in CPython, so every thread
    gets the array that won. It also reads the caller's frame directly instead of formatting the
    whole stack, which makes a simulated kernel with shared memory a little faster.

    Returns True when the patch was applied (under the simulator), False otherwise.
    """
    import sys

    import numba

    if not numba.config.ENABLE_CUDASIM:
        return False
    from numba.cuda.simulator import kernelapi

    global SIMULATOR_SHARED_ARRAY
    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_lenet_gpu_fixed", False):
        return True
    SIMULATOR_SHARED_ARRAY = shared.array

    def array(self, shape, dtype, alignment=None):  # type: ignore[no-untyped-def]
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if isinstance(dtype, kernelapi.types.Type):  # the simulator's own types and numpy_support
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        if shape == 0:  # dynamic shared memory: one buffer for all, as the simulator does
            count = self._dynshared_size // dtype.itemsize
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
        frame = sys._getframe(1)
        key = (frame.f_code.co_filename, frame.f_lineno)
        hit = self._allocations.get(key)
        if hit is None:
            hit = self._allocations.setdefault(key, np.empty(shape, dtype))
        return hit

    array._lenet_gpu_fixed = True  # type: ignore[attr-defined]
    shared.array = array
    return True
