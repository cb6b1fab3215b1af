"""Work-arounds for the numba-cuda versions this backend meets in the wild.

numba-cuda ≤ 0.30.x registers an overload for ``np.row_stack`` when its array module is imported,
and NumPy 2.5 removed that alias. The import happens lazily, at the first kernel compile (the typing
context loads the CUDA lowering registry), so every launch then fails with
``AttributeError: module 'numpy' has no attribute 'row_stack'`` — seen on the first real-GPU run of
this project (NumPy 2.5.2, numba-cuda 0.30.4). We give NumPy the alias back for the duration of
that one import, then take it away again, so nothing else sees a changed NumPy.
"""

from __future__ import annotations

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
