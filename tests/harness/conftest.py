"""Fixtures for the CPU harness tests: the test kernel modules, built once per session."""

from __future__ import annotations

import pytest

from lenet_gpu.harness.cudacpu import CpuModule

from .helpers import BAD_CU, OK_CU


@pytest.fixture(scope="session")
def ok_module() -> CpuModule:
    return CpuModule(OK_CU, name_expressions=("fill<float>", "fill<double>"))


@pytest.fixture(scope="session")
def bad_module() -> CpuModule:
    return CpuModule(BAD_CU)
