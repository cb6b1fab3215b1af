"""The CPU harness without a C++ compiler: one line that says what to do, as a BackendUnavailable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lenet_gpu.backends import BackendUnavailable
from lenet_gpu.harness import cudacpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    cxx = str(tmp_path / "no-such-g++")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("CUDACPU_CACHE", str(tmp_path / "cache"))
    cudacpu._compiler_id.cache_clear()
    yield cxx
    cudacpu._compiler_id.cache_clear()


def test_missing_compiler_is_one_line(no_compiler: str) -> None:
    for attempt in (cudacpu.check_compiler, lambda: cudacpu.CpuModule(code="__global__ void k(float* x) {}")):
        with pytest.raises(cudacpu.CompilerUnavailable) as e:
            attempt()
        msg = str(e.value)
        assert isinstance(e.value, BackendUnavailable) and isinstance(e.value, cudacpu.CudaCpuError)
        assert "\n" not in msg and e.value.__cause__ is None
        assert f"{no_compiler!r} ($CXX) is not found" in msg and "g++ >= 12" in msg and "--backend numpy" in msg


def test_failing_compiler_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", "false")  # runs, exits 1
    cudacpu._compiler_id.cache_clear()
    try:
        with pytest.raises(cudacpu.CompilerUnavailable, match="'false' \\(\\$CXX\\) exits with status 1"):
            cudacpu.check_compiler()
    finally:
        cudacpu._compiler_id.cache_clear()


def test_train_without_compiler_says_one_line(tmp_path: Path) -> None:
    """The training program on backend cupy-host with CXX pointing at nothing: one line, status 2."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CXX": str(tmp_path / "missing-g++"),
           "CUDACPU_CACHE": str(tmp_path / "cache"), "LENET_GPU_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lenet_gpu.train", "--backend", "cupy-host", "--dataset", "mnist-sample",
                        "--limit", "16", "--epochs", "1", "--batch-size", "8", "--no-progress",
                        "--checkpoint", str(tmp_path / "c.npz")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "g++ >= 12" in lines[0] and "missing-g++" in lines[0], r.stderr
