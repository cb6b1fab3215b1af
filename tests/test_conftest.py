"""conftest's CUDA detection: "no device" skips the gpu tests, a CUDA stack that is there but broken fails them;
``require`` skips only for a package that is not installed; a simulator child's time limit (tests/sim_child.py)."""

from __future__ import annotations

import os
import sys
import types

import pytest

from tests import conftest


def test_no_device_and_no_driver_are_absent(monkeypatch):
    cupy = conftest.require("cupy")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    for code, state in ((100, "absent"), (35, "absent"), (3, "broken"), (999, "broken"), (803, "broken")):
        def raises(code=code):
            raise CUDARuntimeError(code)

        monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", raises)
        got, why = conftest.cuda_state()
        assert got == state, (code, got, why)
        if state == "broken":
            assert "broken" in why and str(CUDARuntimeError(code)).split(":")[0] in why
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    assert conftest.cuda_state()[0] == "absent"
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 2)
    assert conftest.cuda_state() == ("present", "")


def test_cupy_that_does_not_import_is_broken(monkeypatch):
    if not conftest._installed("cupy"):
        pytest.skip("cupy is not installed")
    broken = types.ModuleType("cupy")

    def boom(name):
        raise OSError("libcudart.so.12: cannot open shared object file")

    broken.__getattr__ = boom  # `cupy.cuda` raises, like a wheel whose runtime libraries are missing
    monkeypatch.setitem(sys.modules, "cupy", broken)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    got, why = conftest.cuda_state()
    assert got == "broken" and "libcudart" in why, (got, why)


def test_broken_cuda_fails_gpu_tests():
    """pytest_runtest_setup fails (not skips) a gpu-marked test when the state is broken."""
    item = types.SimpleNamespace(keywords={"gpu": True})
    old = conftest.CUDA_STATE, conftest.CUDA_REASON
    conftest.CUDA_STATE, conftest.CUDA_REASON = "broken", "CUDA is present but broken: test"
    try:
        with pytest.raises(pytest.fail.Exception, match="present but broken"):
            conftest.pytest_runtest_setup(item)
        items = [types.SimpleNamespace(keywords={"gpu": True}, add_marker=lambda m: pytest.fail("marked skip"))]
        conftest.pytest_collection_modifyitems(None, items)  # no skip marker added
    finally:
        conftest.CUDA_STATE, conftest.CUDA_REASON = old


def test_require_skips_only_what_is_not_installed():
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        conftest.require("no_such_package_lenet_gpu_xyz")
    assert conftest.require("numpy").__name__ == "numpy"


class _Script:
    """A stand-in for a simulator child: ``python -c code`` with the child's limit (tests/sim_child.py's _run)."""

    def __init__(self, code: str, timeout: int) -> None:
        self.code, self.timeout = code, timeout

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code]

    def environ(self) -> dict[str, str]:
        return dict(os.environ)


def test_background_child_limit_counts_cpu_time_not_waiting():
    """A child started in the background waits for a core without being timed out (its limit counts CPU time, with
    three times the limit as a wall bound); a child that uses its CPU time past the limit is killed, either way."""
    from tests import sim_child

    waits = _Script("import time; time.sleep(2.5); print('done')", timeout=1)
    r = sim_child._run(waits, background=True)  # type: ignore[arg-type]
    assert r.returncode == 0 and r.stdout.strip() == "done", r
    r = sim_child._run(waits)  # type: ignore[arg-type]
    assert r.returncode == -9 and "killed after 1 s" in r.stderr, r
    spins = _Script("while True: pass", timeout=1)
    r = sim_child._run(spins, background=True)  # type: ignore[arg-type]
    assert r.returncode == -9 and "s of CPU time" in r.stderr, r
