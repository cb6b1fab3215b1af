"""scripts/gpu_check.sh, the one prepared run for a lent GPU: its syntax, the test files it names, and a run here
(no GPU: the self-test stops at once, the GPU twins skip) that still brings back one tar with every log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses_and_names_existing_gpu_tests():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    files = re.search(r'TESTS="([^"]+)"', SCRIPT.read_text()).group(1).split()
    assert len(files) >= 8
    for f in files:
        text = (ROOT / f).read_text()
        assert "gpu" in text, f  # each has GPU twins to run


def test_run_without_a_gpu_packs_every_log(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), BUDGET="20", PYTEST_S="120", PYTHON=sys.executable,
               LENET_TESTS_EARLY_CHILDREN="0")
    p = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
        steps = tar.extractfile("gpu-check/steps.txt").read().decode()
    assert {"gpu-check/env.txt", "gpu-check/selftest.log", "gpu-check/steps.txt"} <= names, names
    assert "selftest rc" in steps and "start" in steps
    assert not (tmp_path / "gpu-check").exists()  # only the tar is left
