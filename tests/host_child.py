"""The cupy-host child process the harness suites run in: a wild pointer in a kernel kills the process that runs
it, so a test file runs its cupy-host tests in a child pytest (its ``child_env`` variable set) and the parent asserts
that the child passed. ``CUDACPU_SANITIZE=address|thread`` runs the child under that sanitizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import sim_child

ROOT = Path(__file__).resolve().parent.parent


def host_suite(test_file: str | Path, child_env: str, k: str = "") -> sim_child.Child | None:
    """``test_file``'s cupy-host child as a child that conftest starts early, in the background (tests/sim_child.py:
    since the harness runs a block's threads as fibers, such a child is one busy core, like a simulator child), or
    None under ``CUDACPU_SANITIZE=address|thread``, whose child needs the sanitizer's runtime preloaded
    (run_host_child). ``k``: pytest's -k in the child (empty: every test)."""
    if os.environ.get("CUDACPU_SANITIZE", "") in ("address", "thread"):
        return None
    return sim_child.Child(str(test_file), k, env=((child_env, "1"),), args=("-rs",), sim=False)


def check_host_suite(suite: sim_child.Child | None, test_file: str | Path, child_env: str, what: str, k: str = "",
                     timeout: int = 900) -> str:
    """The suite test's body: the early child's result, or (sanitizers) a run now, with pytest's -k ``k``."""
    if suite is None:
        return run_host_child(test_file, child_env, what, timeout, k)
    out = sim_child.result(suite)
    print(out[-3000:])
    return out


def run_host_child(test_file: str | Path, child_env: str, what: str, timeout: int = 900, k: str = "") -> str:
    """Run ``test_file`` in a child pytest with ``child_env=1`` (and -k ``k`` where given); fail unless it exits 0
    with tests passed and none failed. Returns the child's output."""
    env = dict(os.environ)
    env[child_env] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    kind = os.environ.get("CUDACPU_SANITIZE", "")
    if kind in ("address", "thread"):
        from lenet_gpu.harness.cudacpu import sanitizer_env

        env = sanitizer_env(kind, env)
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           *(["-k", k] if k else [])]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = r.stdout + r.stderr
    print(out[-3000:])
    assert r.returncode == 0, f"{what} cupy-host child pytest exited with {r.returncode}:\n{out[-12000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout, out[-3000:]
    return out
