"""A test file's simulator tests in a child pytest process (NUMBA_ENABLE_CUDASIM=1), written once, started early.

Each file with Numba kernels runs its ``sim_*`` tests in a child process with the CUDA simulator on (the simulator
must be chosen before Numba is imported, and a kernel that writes out of bounds should take a child down, not
pytest). A simulator run holds one core: it runs a block's threads as Python threads under one GIL. So that the
suite does not wait for them one after another, conftest.py starts the children of every selected suite test at
the session's start (``start_early``), one at a time on a background thread, while the main process runs its own
tests; the suite test then takes its child's result (``result``), or runs the child itself if the background thread
has not started it yet (so that two children run while the main process waits), and fails as before on a child
that failed, printing the child's output. A suite test whose child was not started early (a single test run by node id,
``LENET_TESTS_EARLY_CHILDREN=0``) runs its child when it runs. A child started early runs at the lowest priority
(nice 19): it uses the cores the main process leaves idle, and gives way to the main process's own threads; its
time limit then counts the CPU time it used, not the time it waited for a core.

    SUITE = Child(__file__, "sim_")

    @sim_child.early(SUITE)
    def test_simulator_suite():
        print(sim_child.result(SUITE))
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: set in every child: a child starts no children of its own (conftest.py)
CHILD_ENV = "LENET_TESTS_CHILD"
#: output kept from a child's stdout and stderr for the report
KEEP_OUT, KEEP_ERR = 20000, 5000


@dataclass(frozen=True)
class Child:
    """The child run of ``file``'s tests selected by ``-k k``, with extra environment ``env`` (pairs) and pytest
    arguments ``args``, given ``timeout`` seconds."""

    file: str
    k: str
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()
    timeout: int = 900
    #: run with the CUDA simulator on (False: a CUDA C harness child, tests/host_child.py)
    sim: bool = True

    @property
    def name(self) -> str:
        extra = " ".join(f"{a}={b}" for a, b in self.env)
        return f"{Path(self.file).name} -k {self.k!r}" + (f" ({extra})" if extra else "")

    def command(self) -> list[str]:
        k = ["-k", self.k] if self.k else []
        return [sys.executable, "-m", "pytest", str(self.file), "-q", "-p", "no:cacheprovider", *k,
                "--durations=5", "-o", "addopts=", "-W", "ignore::DeprecationWarning", *self.args]

    def environ(self) -> dict[str, str]:
        sim = {"NUMBA_ENABLE_CUDASIM": "1"} if self.sim else {}
        return {**os.environ, **sim, "PYTHONPATH": str(ROOT), CHILD_ENV: "1", **dict(self.env)}


def early(*children: Child) -> Callable[[Any], Any]:
    """Mark a test as the one that checks these children: conftest starts them at the session's start."""

    def mark(fn: Any) -> Any:
        fn.sim_children = children
        return fn

    return mark


#: the niceness of a child started early, in the background (conftest.py applies it in the child)
BACKGROUND_NICE = 19


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system) a running process has used so far, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


#: a child started in the background may wait this many times its timeout (wall clock) for a core
BACKGROUND_WALL_FACTOR = 3


def _run(child: Child, background: bool = False) -> subprocess.CompletedProcess:
    """Run the child; kill it past ``child.timeout`` seconds. A background child (nice 19) gets the cores the main
    process leaves, so its limit counts the CPU time it used (where /proc tells it), with ``BACKGROUND_WALL_FACTOR``
    times the timeout as a wall-clock bound: a busy main process must not time it out (CI, 2026-12-06: the numba
    backend's suite killed at 800 s wall, 41% done)."""
    env = child.environ()
    if background:
        env["LENET_TESTS_CHILD_NICE"] = str(BACKGROUND_NICE)
    start = time.monotonic()
    p = subprocess.Popen(child.command(), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out_err: list[str] = ["", ""]

    def drain() -> None:
        out_err[0], out_err[1] = p.communicate()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    why = ""
    while reader.is_alive():
        reader.join(1.0)
        if not reader.is_alive():
            break
        wall = time.monotonic() - start
        cpu = _cpu_seconds(p.pid) if background else None
        used = wall if cpu is None else cpu
        if used > child.timeout or wall > BACKGROUND_WALL_FACTOR * child.timeout:
            why = (f"killed after {child.timeout} s" if cpu is None else
                   f"killed after {cpu:.0f} s of CPU time, {wall:.0f} s wall; limit {child.timeout} s of CPU")
            p.kill()
            reader.join()
            break
    if why:
        return subprocess.CompletedProcess(p.args, -9, out_err[0], out_err[1] + f"\n({why})")
    return subprocess.CompletedProcess(p.args, p.returncode, out_err[0], out_err[1])


class _Early:
    """The children started at the session's start, run one at a time on a background thread. A suite test that
    comes to a child still waiting in the queue takes it out and runs it itself (at normal priority), beside the one
    the background thread runs: the main process would otherwise wait with a core idle."""

    def __init__(self) -> None:
        self.results: dict[Child, subprocess.CompletedProcess] = {}
        self.done: dict[Child, threading.Event] = {}
        self.pending: list[Child] = []
        self.stopped = False
        self.lock = threading.Lock()

    def start(self, children: list[Child]) -> None:
        for c in children:
            self.done[c] = threading.Event()
        self.pending = list(children)
        threading.Thread(target=self._worker, name="sim-children", daemon=True).start()

    def _worker(self) -> None:
        while True:
            with self.lock:
                if self.stopped or not self.pending:
                    return
                c = self.pending.pop(0)
            try:
                self.results[c] = _run(c, background=True)
            finally:
                self.done[c].set()

    def take(self, child: Child) -> bool:
        """True if ``child`` was still waiting in the queue: it is now the caller's to run."""
        with self.lock:
            if child in self.pending:
                self.pending.remove(child)
                return True
        return False

    def stop(self) -> None:
        with self.lock:
            self.stopped = True


_EARLY = _Early()


def start_early(children: list[Child]) -> None:
    """Start these children now, one after another in a background thread (conftest, at collection's end)."""
    if children and os.environ.get("LENET_TESTS_EARLY_CHILDREN", "1") != "0":
        _EARLY.start(children)


def stop_early() -> None:
    """Start no more children (the session ends)."""
    _EARLY.stop()


def result(child: Child) -> str:
    """The child's output tail, after checking that it passed: its early run's (waiting for it), else a run now."""
    done = _EARLY.done.get(child)
    res = None
    if done is not None and not _EARLY.take(child):
        done.wait()
        res = _EARLY.results.get(child)
    if res is None:
        res = _run(child)
    out = res.stdout[-KEEP_OUT:] + ("\n--- stderr ---\n" + res.stderr[-KEEP_ERR:] if res.stderr.strip() else "")
    what = "simulator" if child.sim else "CUDA C harness"
    assert res.returncode == 0, f"{child.name}: the {what} child failed (exit {res.returncode}):\n{out}"
    assert " passed" in res.stdout and " failed" not in res.stdout, out
    return out
