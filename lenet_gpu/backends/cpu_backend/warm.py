"""Compiling ahead on two cores: the first run's compile of a training step, split between this process and
a helper process.

Numba compiles one function at a time in a process (it holds a global compiler lock), so a first run
compiles the step's kernels one after the other on one core: about 23 s on this project's 2-core machine.
Before a model's first step with an empty cache, ``compile_ahead`` starts a helper Python process that
compiles one share of the step's ops into Numba's disk cache, while this process compiles the rest; it then
waits for the helper, and the step itself loads every kernel from the cache. Each process compiles its share
by running one training step of a scratch model of the same options on 16 zero images, with the ops of the
other share made no-ops (every buffer of the scratch model is zeroed, so an op that reads what a skipped op
would have written reads zeros: valid indices, no garbage). Numba specialises kernels on argument types,
not sizes, and the cpu backend picks its variants by map widths, which a scratch step shares with the real
one; so the real step finds its kernels compiled.

The backend knows nothing of LeNet (docs/DESIGN.md §2): the model hands its own scratch step in, a function
``step(backend, options, fused, batch)`` at the top level of a module (``lenet_gpu.model.scratch_step``), and the
helper process imports that function by its name. This module builds the backend, makes the other share's ops
no-ops and zeroes the buffers; the step builds the model and runs it.

It changes nothing but the time to the first step: a helper that fails, or takes too long, leaves its share
to be compiled here as before (``last_report`` says what happened). Set LENET_GPU_COMPILE_AHEAD=0 to compile
serially.

    python -m lenet_gpu.backends.cpu_backend.warm '<json>'    # the helper (started by compile_ahead)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: a model's scratch step: ``step(backend, options, fused, batch)`` runs one training step and one inference of
#: a model with these options on ``backend`` (lenet_gpu.model.scratch_step)
ScratchStep = Callable[[Any, dict, bool, int], None]

#: the helper's share, by op name. Compile times of the step's ops at the first run (2 cores, OPT_LEVEL 2,
#: one run, both variants where a step uses two): head_train 7.8 s, conv2d_bwd_weight 4.8 s,
#: conv2d_pool_fwd 5.5 s, conv2d_bwd_data_pool 3.5 s, lenet_fwd 3 s, the rest about 1.5 s. The helper also
#: pays for its own start (about 1.5 s), so it takes the first two and this process the rest.
#: The routed step (max pooling) takes conv2d_bwd_weight_routed in conv2d_bwd_weight's place: both here.
HELPER_OPS: tuple[str, ...] = ("head_train", "conv2d_bwd_weight", "conv2d_bwd_weight_routed")
#: images of the scratch step (one chunk of lanes)
SCRATCH_BATCH = 16
#: seconds to wait for the helper before compiling its share here
HELPER_TIMEOUT_S = 300.0

#: what the last compile_ahead in this process did (None before it ran)
last_report: dict[str, Any] | None = None
_done = False


def enabled() -> bool:
    return os.environ.get("LENET_GPU_COMPILE_AHEAD", "1") not in ("0", "false", "no", "off")


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cache_is_cold() -> bool:
    """Whether Numba's cache has no usable entry for the head kernel (the largest of a step): a first
    run, or the first after the kernels' source changed. False where the cache cannot be read."""
    try:
        from numba.core.registry import cpu_target

        from .head import head_train_v1

        magic = cpu_target.target_context.codegen().magic_tuple()
        index = head_train_v1._cache._cache_file._load_index()
        return not any(key[1] == magic for key in index)
    except Exception:  # noqa: BLE001 - Numba's cache internals differ: assume warm, compile as usual
        return False


def scratch_step(step: ScratchStep, options: dict[str, Any], fused: bool, run: set[str] | None, skip: set[str],
                 threads: int) -> None:
    """One training step (and one inference) of a scratch model with these options, through the model's
    ``step``, running only the ops in ``run`` (None: all) and not in ``skip``: compiles their kernels into the
    cache."""
    from .. import get_backend
    from ..base import OPS, OPTIONAL_OPS, ROUTED_OPS

    be = get_backend("cpu", threads=threads)
    be.empty = be.zeros  # type: ignore[method-assign] - zeros wherever a skipped op would have written
    be.compile_ahead = lambda *a, **k: None  # type: ignore[method-assign] - the scratch model is the warm-up

    def skipped(*args: Any, **kwargs: Any) -> None:
        return None

    for op in (*OPS, *OPTIONAL_OPS, *ROUTED_OPS):
        if (run is not None and op not in run) or op in skip:
            setattr(be, op, skipped)
    step(be, options, fused, SCRATCH_BATCH)


def step_name(step: ScratchStep) -> str:
    """``module:function``, how the helper process finds the step (a function at the top of a module)."""
    name = f"{step.__module__}:{step.__qualname__}"
    if "<" in step.__qualname__ or "." in step.__qualname__:
        raise ValueError(f"the scratch step must be a module-level function (got {name})")
    return name


def step_by_name(name: str) -> ScratchStep:
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(module), func)


def compile_ahead(options: dict[str, Any], fused: bool, threads: int, step: ScratchStep) -> dict[str, Any]:
    """Before the first step of a model with these options: with an empty cache, compile the step's kernels
    on two cores, each share through the model's scratch ``step`` (see the module docstring). Once per
    process; returns (and keeps in ``last_report``) what it did."""
    global _done, last_report
    if _done:
        return last_report or {"ran": False, "why": "done before"}
    _done = True
    t0 = time.perf_counter()
    if not enabled():
        last_report = {"ran": False, "why": "LENET_GPU_COMPILE_AHEAD=0"}
        return last_report
    if not cache_is_cold():
        last_report = {"ran": False, "why": "cache warm"}
        return last_report
    if _cores() < 2:
        last_report = {"ran": False, "why": "one core: nothing to compile on in parallel"}
        return last_report
    helper = _start_helper(options, fused, threads, step_name(step))
    report: dict[str, Any] = {"ran": True, "helper_ops": list(HELPER_OPS)}
    try:
        scratch_step(step, options, fused, None, set(HELPER_OPS) if helper is not None else set(), threads)
    except BaseException:  # Ctrl-C or an error: stop the helper now rather than wait for it
        if helper is not None:
            helper.kill()
            helper.communicate()
        raise
    report["own_share_s"] = round(time.perf_counter() - t0, 2)
    report["helper"] = _wait(helper)
    report["total_s"] = round(time.perf_counter() - t0, 2)
    last_report = report
    return report


def _start_helper(options: dict[str, Any], fused: bool, threads: int, step: str) -> subprocess.Popen | None:
    import numba

    root = str(Path(__file__).resolve().parents[3])  # the directory holding the lenet_gpu package
    env = dict(os.environ, LENET_GPU_COMPILE_AHEAD="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
    arg = json.dumps({"options": options, "fused": fused, "threads": threads, "ops": list(HELPER_OPS),
                      "step": step})
    try:
        return subprocess.Popen([sys.executable, "-m", __name__, arg], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError:
        return None


def _wait(helper: subprocess.Popen | None) -> str:
    if helper is None:
        return "not started"
    try:
        out, err = helper.communicate(timeout=HELPER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.communicate()
        return f"timed out after {HELPER_TIMEOUT_S:.0f} s"
    if helper.returncode != 0:
        tail = (err or "").strip().splitlines()[-1:] or [""]
        return f"failed (exit {helper.returncode}): {tail[0][:200]}"
    return f"ok ({out.strip()})"


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    scratch_step(step_by_name(args["step"]), args["options"], bool(args["fused"]), set(args["ops"]), set(),
                 int(args["threads"]))
    print(f"{time.perf_counter() - t0:.2f} s after its imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
