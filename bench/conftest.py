"""pytest-benchmark entry points: ``pytest bench --benchmark-only``.

The project's test suite does not collect this folder (testpaths = ["tests"]). Which backends and
batch sizes are parametrized is set by environment variables:

- ``LENET_BENCH_BACKENDS`` (comma-separated; default: numpy, plus cupy and numba when they run on a
  GPU here; add cupy-host, or numba with NUMBA_ENABLE_CUDASIM=1, by naming them: they are slow);
- ``LENET_BENCH_BATCHES`` (default 1,64,256) for the per-op and forward benchmarks;
- ``LENET_BENCH_TRAIN_BATCHES`` (default 64,128) for the training step.

pytest-benchmark times with the host clock (after a device sync on a GPU); ``python -m bench.run``
is the source of reported figures (device events, L2 flush, interleaved peer rounds).
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import ops as opsmod  # noqa: E402
from lenet_gpu.backends import BackendUnavailable, get_backend  # noqa: E402
from lenet_gpu.spec import NetConfig  # noqa: E402

CFG = NetConfig()


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


@cache
def backend_or_reason(name: str) -> Any:
    try:
        return get_backend(name)
    except BackendUnavailable as e:
        return str(e)


def bench_backends() -> list[str]:
    if "LENET_BENCH_BACKENDS" in os.environ:
        return _env_list("LENET_BENCH_BACKENDS", "")
    names = ["numpy"]
    for gpu in ("cupy", "numba"):
        be = backend_or_reason(gpu)
        if not isinstance(be, str) and be.is_gpu:
            names.append(gpu)
    return names


def batches() -> list[int]:
    return [int(b) for b in _env_list("LENET_BENCH_BATCHES", "1,64,256")]


def train_batches() -> list[int]:
    return [int(b) for b in _env_list("LENET_BENCH_TRAIN_BATCHES", "64,128")]


def op_params() -> list[Any]:
    """(backend, op, site, variant, batch) for every op case, with skips for unavailable backends."""
    out = []
    for name in bench_backends():
        be = backend_or_reason(name)
        if isinstance(be, str):
            out.append(pytest.param((name, None, None, None, None), id=f"{name}-unavailable",
                                    marks=pytest.mark.skip(reason=be)))
            continue
        for op in opsmod.all_ops(be):
            for site in opsmod.sites(op, CFG):
                for variant in be.variants[op]:
                    for b in [None] if op in opsmod.PER_STEP_OPS else batches():
                        key = (name, op, site, variant, b)
                        out.append(pytest.param(key, id=f"{name}-{op}-{site}-{variant}-b{b}"))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "op_case_key" in metafunc.fixturenames:
        metafunc.parametrize("op_case_key", op_params())
    if "e2e_backend" in metafunc.fixturenames:
        metafunc.parametrize("e2e_backend", bench_backends())
    if "fwd_batch" in metafunc.fixturenames:
        metafunc.parametrize("fwd_batch", batches())
    if "train_batch" in metafunc.fixturenames:
        metafunc.parametrize("train_batch", train_batches())


def sync_timer_setup(be: Any) -> Any:
    """An L2 flush to run before each round on a GPU backend (None on the CPU)."""
    from bench.timing import GpuEventTimer, gpu_library

    lib = gpu_library(be)
    return GpuEventTimer(be, lib).flush if lib else None
