"""What the phases of the self-test share: the phase list, backend labels, and the recorder that writes a
phase's results to disk as it goes (so a phase killed at any moment keeps every finished case)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The phases, in order (docs/DESIGN.md §4d).
PHASES = ("environment", "compile", "op_parity", "whole_step", "training", "benchmark", "summary")
TITLES = {
    "environment": "Environment",
    "compile": "Compile and load every kernel",
    "op_parity": "Op parity against the float64 reference",
    "whole_step": "Whole training steps",
    "training": "Training (the default recipe)",
    "benchmark": "Benchmark",
    "summary": "Summary",
}
#: Share of the time budget each phase gets (of what is left when it starts; see runner.allocate), on a GPU
#: and on the emulators (where a training step takes seconds and timings mean little).
SHARES = {"environment": 0.05, "compile": 0.14, "op_parity": 0.15, "whole_step": 0.13, "training": 0.30,
          "benchmark": 0.23}
SHARES_EMULATED = {"environment": 0.05, "compile": 0.11, "op_parity": 0.14, "whole_step": 0.27, "training": 0.28,
                   "benchmark": 0.15}

#: Backend labels: the GPU backends, their emulators, and the numpy backend (a hidden debug option).
GPU_LABELS = ("cupy", "numba")
EMULATED_LABELS = ("cupy-host", "numba-sim")
LABELS = GPU_LABELS + EMULATED_LABELS + ("numpy",)

PASS, FAIL, SKIP = "pass", "fail", "skip"


def backend_name(label: str) -> str:
    """The get_backend name of a label: numba-sim is the numba backend under NUMBA_ENABLE_CUDASIM=1."""
    return "numba" if label == "numba-sim" else label


def make_backend(label: str, **kwargs: Any) -> Any:
    """The backend of a label (raises BackendUnavailable with a one-line reason)."""
    from ..backends import BackendUnavailable, get_backend

    if label == "numba-sim" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        raise BackendUnavailable("numba-sim needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
    if label == "numba" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise BackendUnavailable("numba on a GPU needs NUMBA_ENABLE_CUDASIM unset")
    return get_backend(backend_name(label), **kwargs)


def first_lines(text: str, n: int = 12, width: int = 400) -> str:
    lines = [ln[:width] for ln in str(text).strip().splitlines()]
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))


def describe_exception(exc: BaseException, n: int = 12) -> str:
    """The first lines of a failure: an AssertionError's own message (it names what differs); for anything
    else the exception and where it was raised (the innermost frames of the traceback)."""
    if isinstance(exc, AssertionError) and str(exc):
        return first_lines(str(exc), n)
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = [f"  at {Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames]
    return first_lines("\n".join([head, *where]), n)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_jsonable(obj: Any) -> Any:
    """NumPy scalars and arrays, tuples, Paths and non-finite floats made JSON-safe."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


class PhaseRecorder:
    """The results of one phase, written to ``path`` (atomically) as cases finish.

    A case is a dict with ``name``, ``status`` (pass, fail, skip), ``seconds``, ``error`` (the first lines
    of a failure) or ``reason`` (of a skip), and any figures of its own. ``data`` holds the phase's other
    results (tables, environment facts). The phase's clock: ``time_left()`` against its budget; a phase
    skips what it has not started when the budget is spent (``skip``), which is not a failure.
    """

    def __init__(self, name: str, path: Path | None, budget_s: float, flush_every_s: float = 0.5) -> None:
        self.name = name
        self.path = path
        self.budget_s = float(budget_s)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.budget_s
        self.cases: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}
        self.notes: list[str] = []
        self.crash: str | None = None
        self.done = False
        self._flush_every = flush_every_s
        self._last_flush = 0.0

    # ---- the clock
    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, need_s: float = 0.0) -> bool:
        return self.time_left() <= need_s

    # ---- cases
    def add(self, name: str, status: str, seconds: float | None = None, **fields: Any) -> dict[str, Any]:
        case = {"name": name, "status": status, **({"seconds": round(seconds, 4)} if seconds is not None else {}),
                **fields}
        self.cases.append(case)
        self.flush()
        return case

    def skip(self, name: str, reason: str, **fields: Any) -> dict[str, Any]:
        return self.add(name, SKIP, reason=reason, **fields)

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None], **fields: Any) -> dict[str, Any]:
        """Run one case: pass with the figures ``fn`` returns, or fail with the first lines of what it raised."""
        t = time.perf_counter()
        try:
            figures = fn() or {}
        except Exception as e:  # noqa: BLE001 - a failing case is recorded, the phase goes on
            return self.add(name, FAIL, time.perf_counter() - t, **fields, error=describe_exception(e))
        status = figures.pop("status", PASS)
        return self.add(name, status, time.perf_counter() - t, **fields, **figures)

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.flush()

    # ---- output
    def result(self) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.cases if c["status"] == s) for s in (PASS, FAIL, SKIP)}
        return {"phase": self.name, "done": self.done, "crash": self.crash, "budget_s": round(self.budget_s, 1),
                "seconds": round(time.monotonic() - self.t0, 2), "counts": counts, "notes": self.notes,
                "data": self.data, "cases": self.cases}

    def flush(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last_flush < self._flush_every:
            return
        self._last_flush = now
        atomic_write(self.path, json.dumps(to_jsonable(self.result()), indent=1))

    def finish(self) -> None:
        self.done = True
        self.flush(force=True)


def kill_group(p: subprocess.Popen) -> None:
    """End a child we started in its own session, and whatever it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
