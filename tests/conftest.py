"""Shared test configuration: GPU tests skip, with a clear reason, where there is no CUDA device, and fail where
CUDA is there but broken.

Three states, told apart explicitly (never by catching whatever an import raises):
- ``present``: a CUDA device answers (CuPy's ``getDeviceCount() > 0``, or Numba's driver where CuPy is not
  installed);
- ``absent``: no device to use (neither CuPy nor Numba installed; ``cudaErrorNoDevice`` or
  ``cudaErrorInsufficientDriver`` (no driver library) from the CUDA runtime; Numba's "driver library cannot be
  found"; or the CUDA simulator switched on): the ``gpu`` tests skip, naming it;
- ``broken``: anything else (a CUDA package that does not import, a driver that fails to initialise): the ``gpu``
  tests fail with that message instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the GIL switch interval of a simulator run (NUMBA_ENABLE_CUDASIM=1), for numba-cuda's own block runner (one
#: Python thread per CUDA thread, barriers that busy-poll them): the interval sets how long a thread that waits holds
#: the GIL; too short and the threads spend their time switching. With greenlet installed (the test group) the
#: backend runs a block's threads as greenlets on one thread instead (numba_backend/_compat.py) and the interval
#: hardly matters. Measured with the OS threads on the 2-core machine (2026-12-05, one lenet_fwd
#: matrix cell, seconds v1 / v2): 1e-4 9.2 / 2.2, 5e-4 3.1 / 2.0, 1e-3 2.3 / 2.2, 2e-3 2.0 / 2.9, Python's default
#: 5e-3 1.9 / 5.6.
SIM_SWITCH_INTERVAL = 1e-3
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    sys.setswitchinterval(SIM_SWITCH_INTERVAL)
#: a child started early in the background (tests/sim_child.py: the simulator suites and, since the CUDA C harness
#: runs a block's threads as fibers, its host suites) runs at the lowest priority, so that it takes only the cores the
#: main process leaves idle. When the harness still ran OS threads whose barriers yield, the cupy host suite took 267 s
#: beside one busy core at nice 0, 59 s beside it at nice 19, 48 s alone (2026-12-06, 2 cores).
if os.environ.get("LENET_TESTS_CHILD_NICE") and hasattr(os, "nice"):
    os.nice(int(os.environ["LENET_TESTS_CHILD_NICE"]))

#: CUDA runtime errors that mean "no device here" (the rest mean a CUDA stack that is present but broken)
NO_DEVICE_ERRORS = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver")
#: Numba's driver-init messages that mean "no driver / no device"
NUMBA_NO_DEVICE = ("CUDA driver library cannot be found", "no CUDA-capable device", "CUDA_ERROR_NO_DEVICE")
NO_GPU = "no CUDA device on this machine (run `pytest -m gpu` on a GPU machine)"


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def cuda_state() -> tuple[str, str]:
    """("present" | "absent" | "broken", why). Errors other than the named "no device" ones are "broken"."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "absent", "NUMBA_ENABLE_CUDASIM=1 is set (simulator, not a GPU)"
    if _installed("cupy"):
        try:
            import cupy
            from cupy_backends.cuda.api.runtime import CUDARuntimeError

            runtime = cupy.cuda.runtime
        except Exception as e:  # noqa: BLE001 - installed but does not import: broken, reported with the error
            return "broken", f"cupy is installed but does not import: {type(e).__name__}: {e}"
        try:
            n = runtime.getDeviceCount()
        except CUDARuntimeError as e:
            if str(e).startswith(NO_DEVICE_ERRORS):
                return "absent", f"{NO_GPU}: {str(e).split(':')[0]}"
            return "broken", f"CUDA is present but broken: cupy getDeviceCount() raised {e}"
        return ("present", "") if n > 0 else ("absent", NO_GPU)
    if _installed("numba.cuda"):
        try:
            from numba.cuda.cudadrv import driver
            from numba.cuda.cudadrv.error import CudaSupportError
        except Exception as e:  # noqa: BLE001 - installed but does not import: broken
            return "broken", f"numba.cuda is installed but does not import: {type(e).__name__}: {e}"
        try:
            n = driver.driver.get_device_count()
        except CudaSupportError as e:
            if any(s in str(e) for s in NUMBA_NO_DEVICE):
                return "absent", NO_GPU
            return "broken", f"CUDA is present but broken: numba's driver init raised {e}"
        return ("present", "") if n > 0 else ("absent", NO_GPU)
    return "absent", f"{NO_GPU}: neither cupy nor numba-cuda is installed"


CUDA_STATE, CUDA_REASON = cuda_state()
HAS_GPU = CUDA_STATE == "present"
NO_GPU_REASON = CUDA_REASON


def pytest_collection_modifyitems(config, items):
    if CUDA_STATE != "absent":
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the simulator children of the selected suite tests now, in the background (tests/sim_child.py)."""
    if (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or os.environ.get("LENET_TESTS_CHILD") == "1"
            or session.config.option.collectonly):
        return  # a child does not start children of its own
    from tests import sim_child

    children: list = []
    for item in session.items:
        for c in getattr(getattr(item, "function", None), "sim_children", ()):
            if c not in children and not item.get_closest_marker("skip"):
                children.append(c)
    sim_child.start_early(children)


def pytest_sessionfinish(session, exitstatus):
    from tests import sim_child

    sim_child.stop_early()


def pytest_runtest_setup(item):
    if CUDA_STATE == "broken" and "gpu" in item.keywords:
        pytest.fail(CUDA_REASON, pytrace=False)


def require(module: str, why: str = "") -> object:
    """Import ``module``, skipping the test only where it is not installed (``find_spec`` finds nothing); an
    installed module that raises on import fails the test with its error, as does any error in project code."""
    if not _installed(module):
        pytest.skip(f"{module} is not installed{': ' + why if why else ''}", allow_module_level=True)
    return importlib.import_module(module)


def numba_compile_report() -> object:
    """lenet_gpu.backends.numba_backend.compile_report where Numba's real compiler and a ptxas of its CUDA are here
    (the compile checks need both); else a skip with the reason: the simulator is on, numba-cuda is not installed,
    or no ptxas is found (compile_report.ptxas_path says where it looked)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("compile checks need the real compiler")
    require("numba.cuda")
    from lenet_gpu.backends.numba_backend import compile_report as cr

    try:
        cr.ptxas_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return cr
