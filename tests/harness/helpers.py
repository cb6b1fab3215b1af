"""Paths and a subprocess runner shared by the harness tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = Path(__file__).resolve().parent / "kernels"
OK_CU = KERNELS / "harness_ok.cu"
BAD_CU = KERNELS / "harness_bad.cu"

needs_gxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler (g++)")


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter, so that a crash or a sanitizer abort is a test result
    instead of a lost test process. The repository is on sys.path; ``env`` defaults to this
    process's environment without ``CUDACPU_SANITIZE``."""
    prelude = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "CUDACPU_SANITIZE"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
