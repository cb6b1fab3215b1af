"""Shared test configuration: GPU tests skip with a clear reason where there is no CUDA device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cuda_device_present() -> tuple[bool, str]:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1 is set (simulator, not a GPU)"
    try:
        import cupy

        if cupy.cuda.is_available():
            return True, ""
    except Exception:  # noqa: BLE001 - any failure means no usable device
        pass
    try:
        from numba import cuda

        if cuda.is_available():
            return True, ""
    except Exception:  # noqa: BLE001
        pass
    return False, "no CUDA device on this machine (run `pytest -m gpu` on a GPU machine)"


HAS_GPU, NO_GPU_REASON = _cuda_device_present()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
