"""Compiling ahead on two cores: the first run's compile of a training step, split between this process and
a helper process.

Numba compiles one function at a time in a process (it holds a global compiler lock), so a first run
compiles the step's kernels one after the other on one core: about 14 s on this project's 2-core machine (23 s
before 2026-12-06).
Before a model's first step with an empty cache, ``compile_ahead`` starts a helper Python process that
compiles one share of the step's ops into Numba's disk cache, while this process compiles the rest; it then
waits for the helper's share, and the step itself loads every kernel from the cache. What the first step
does not run (inference, LATER_OPS) neither process compiles before it: the helper compiles it into the
cache after its share, while this process goes on with its first steps (it is stopped if this process
exits first). Each process compiles its share
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

import atexit
import faulthandler
import importlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import step4

#: a model's scratch step: ``step(backend, options, fused, batch)`` runs one training step and one inference of
#: a model with these options on ``backend`` (lenet_gpu.model.scratch_step)
ScratchStep = Callable[[Any, dict, bool, int], None]

#: the helper's share, by op name. Compile times of the routed step's ops at the first run (CPU seconds of
#: one process compiling them all, empty cache, OPT_LEVEL 2, both variants where a step uses two; measured
#: with bench/compile_times.py): head_train 8.6, conv2d_pool_fwd 5.6 (C1 2.5 + C3 3.1),
#: conv2d_bwd_weight_routed 5.6 (2.8 + 2.8), batch_prepare 1.4, conv2d_bwd_data_routed 1.4, adam_step and
#: step_advance 0.3; lenet_fwd (inference, not in the step) 4.9. The helper also pays for its start (about
#: 0.8 s CPU), so it takes head_train, conv2d_bwd_data_routed and batch_prepare (11.4 + 0.8 s) and this
#: process the rest (11.5 s). Measured end to end on the 2-core machine (interleaved runs): the first step
#: after 16.1 s with head_train and conv2d_bwd_weight_routed here (and inference compiled before the first
#: step), 12.9-13.7 s with head_train and conv2d_bwd_data_routed, this process then the longer share.
#: The dense step (average pooling) takes conv2d_bwd_weight (4.8 s) in conv2d_bwd_weight_routed's place, and
#: conv2d_bwd_data_pool (3.5 s) in conv2d_bwd_data_routed's: the former there, the latter here.
#: The four-kernel step (the default with max pooling, docs/step4.md; same measure): head_train 9.3, step_bwd 7.7
#: (its chunk functions 2.6), step_fwd 6.2, step_adam 0.7. Whole ops would split 10.1 (+ start) against 14.6, so
#: the helper first compiles step_bwd's chunk functions (PARTS_FIRST), then head_train: 0.8 + 2.6 + 9.3 s there,
#: step_fwd, step_bwd's own compile (5.2 s) and step_adam here, which finds the chunk functions in the cache
#: (step_fwd comes first: the helper has cached them by then). Measured, 12 interleaved pairs of first runs on the
#: 2-core machine under heavy load from other jobs (load average 50 to 700, so wall times say little): the larger of
#: the two processes' CPU times, median 13.97 s against the nine-op routed step's 14.74 s (per-pair ratio median 0.96,
#: 0.72 to 1.09). Since 2026-12-06 the same serial compile takes 12.5 s instead of 22-23 s (head_train specialised on
#: the routed step; parallel kernels at -O1 with prange passes only, common.PARALLEL_OPT_LEVEL; chunk functions called
#: through their addresses, native.py): head_train 3.8 (its functions 2.3), step_fwd 4.2 (its chunk functions 2.5),
#: step_bwd 3.6 (its chunk functions 2.2), step_adam 0.3. The shares stay as they are: the helper 0.8 + 2.2 + 3.8 s,
#: this process about 0.9 s of imports, then 4.2 + 1.4 + 0.3 s. Since 2026-12-07 step_fwd, step_bwd and head_train are
#: serial kernels whose loops run as tasks of launch.par_tasks, the one parallel kernel (each process compiles it once,
#: 0.4 s, instead of Numba's parfor passes for every op: step_fwd_v1 2.4 s, step_bwd_v1 2.1, head_train_v1 2.4 before,
#: against 0.7-0.8 s each for the serial kernel and its task): on the 2-vCPU Zen 3 VM (Numba's compile events timed in
#: both processes) this process's share took 7.2 s and the helper's 7.6 s after its imports.
HELPER_OPS: tuple[str, ...] = ("head_train", "conv2d_bwd_data_routed", "batch_prepare", "conv2d_bwd_weight")
#: ops of this process's share whose inner functions the helper compiles before its own share, when the step runs
#: them: op → a function that compiles them into the cache with the signatures the op's kernel calls them with
PARTS_FIRST: dict[str, Callable[[], None]] = {"step_bwd": step4.compile_bwd_parts}
#: ops that the first training step does not run (inference): the helper compiles them after its share,
#: while this process trains (see compile_ahead); a first step waits for none of them
LATER_OPS: tuple[str, ...] = ("lenet_fwd",)
#: the line the helper prints when its share of the step is in the cache
SHARE_DONE = "share done"
#: images of the scratch step (one chunk of lanes)
SCRATCH_BATCH = 16
#: seconds to wait for the helper before compiling its share here
HELPER_TIMEOUT_S = 300.0

#: what the last compile_ahead in this process did (None before it ran)
last_report: dict[str, Any] | None = None
#: the helper while it compiles LATER_OPS after its share (None when there is none)
background: subprocess.Popen | None = None
#: where that helper writes what it prints from then on (kept, and named on stderr, when it fails)
background_log: str | None = None
_done = False


def enabled() -> bool:
    return os.environ.get("LENET_GPU_COMPILE_AHEAD", "1") not in ("0", "false", "no", "off")


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cache_is_cold() -> bool:
    """Whether Numba's cache has no usable entry for the head's chunk function (the largest function of a step): a
    first run, or the first after head.py changed. False where the cache cannot be read."""
    try:
        from numba.core.registry import cpu_target

        from .head import _head_chunk

        codegen = cpu_target.target_context.codegen()
        cache = _head_chunk._cache
        index = cache._cache_file._load_index()
        return not any(key == cache._index_key(key[0], codegen) for key in index)
    except Exception:  # noqa: BLE001 - Numba's cache internals differ: assume warm, compile as usual
        return False


def scratch_step(step: ScratchStep, options: dict[str, Any], fused: bool, run: set[str] | None, skip: set[str],
                 threads: int, called: set[str] | None = None) -> None:
    """One training step (and one inference) of a scratch model with these options, through the model's
    ``step``, running only the ops in ``run`` (None: all) and not in ``skip``: compiles their kernels into the
    cache. The names of the ops it skips are added to ``called`` (where given)."""
    from .. import get_backend
    from ..base import OPS, OPTIONAL_OPS, ROUTED_OPS, STEP_OPS

    be = get_backend("cpu", threads=threads)
    be.empty = be.zeros  # type: ignore[method-assign] - zeros wherever a skipped op would have written
    be.compile_ahead = lambda *a, **k: None  # type: ignore[method-assign] - the scratch model is the warm-up

    def skipper(op: str) -> Callable[..., None]:
        def skipped(*args: Any, **kwargs: Any) -> None:
            if called is not None:
                called.add(op)

        return skipped

    for op in (*OPS, *OPTIONAL_OPS, *ROUTED_OPS, *STEP_OPS):
        if (run is not None and op not in run) or op in skip:
            setattr(be, op, skipper(op))
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
    report: dict[str, Any] = {"ran": True, "helper_ops": list(HELPER_OPS), "later_ops": list(LATER_OPS)}
    skip = set(LATER_OPS) | (set(HELPER_OPS) if helper is not None else set())
    try:
        scratch_step(step, options, fused, None, skip, threads)
    except BaseException:  # Ctrl-C or an error: stop the helper now rather than wait for it
        if helper is not None:
            helper.kill()
            helper.communicate()
            _remove_log(helper)
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
    fd, log = tempfile.mkstemp(prefix="lenet_gpu_compile_helper_", suffix=".log")
    os.close(fd)
    arg = json.dumps({"options": options, "fused": fused, "threads": threads, "ops": list(HELPER_OPS),
                      "later": list(LATER_OPS), "step": step, "log": log})
    try:
        helper = subprocess.Popen([sys.executable, "-m", __name__, arg], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    except OSError:
        os.unlink(log)
        return None
    helper.log = log  # type: ignore[attr-defined]
    return helper


def _read_until_share_done(helper: subprocess.Popen, deadline: float) -> tuple[str | None, str, bool]:
    """Read the helper's stdout and stderr until it prints SHARE_DONE, exits, or the deadline passes:
    (the SHARE_DONE line or None, stderr so far, timed out)."""
    assert helper.stdout is not None and helper.stderr is not None
    fds = {helper.stdout.fileno(): bytearray(), helper.stderr.fileno(): bytearray()}
    open_fds = set(fds)
    out_fd = helper.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        for fd in open_fds:
            sel.register(fd, selectors.EVENT_READ)
        while open_fds:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None, fds[helper.stderr.fileno()].decode(errors="replace"), True
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
                    continue
                fds[key.fd] += chunk
                if key.fd == out_fd:
                    # whole lines only: the pipes are closed once SHARE_DONE is read, and a helper whose stdout is
                    # unbuffered (PYTHONUNBUFFERED=1) writes print's text and its newline in two writes; the newline
                    # then met a closed pipe, and the helper died of BrokenPipeError (exit 1, its log empty)
                    whole = fds[out_fd][: fds[out_fd].rfind(b"\n") + 1]
                    for line in whole.decode(errors="replace").splitlines():
                        if line.startswith(SHARE_DONE):
                            return line, fds[helper.stderr.fileno()].decode(errors="replace"), False
    return None, fds[helper.stderr.fileno()].decode(errors="replace"), False


def _wait(helper: subprocess.Popen | None) -> str:
    """Wait for the helper's share of the step: until it prints SHARE_DONE (it then goes on to compile
    LATER_OPS in the background, see _in_background) or exits."""
    if helper is None:
        return "not started"
    done, err, timed_out = _read_until_share_done(helper, time.perf_counter() + HELPER_TIMEOUT_S)
    if timed_out:
        helper.kill()
        helper.communicate()
        _remove_log(helper)
        return f"timed out after {HELPER_TIMEOUT_S:.0f} s"
    if done is not None:
        _in_background(helper)
        return f"ok ({done})"
    helper.wait()
    logged = _log_tail(helper)  # a crash in its share: faulthandler wrote it to the log, not to the pipes
    _remove_log(helper)
    if helper.returncode != 0:
        tail = (err or "").strip().splitlines()[-1:] or logged[-1:] or [""]
        return f"failed (exit {helper.returncode}): {tail[0][:200]}"
    return "ok (exited)"


def _in_background(helper: subprocess.Popen) -> None:
    """The helper goes on compiling LATER_OPS (inference) into the cache while this process trains; it writes
    nothing more to its pipes (closed here), but to its log. Stopped when this process exits (a first run of one
    step need not wait for it: the cache then lacks what it had not finished, compiled when first used). Its log is
    removed then, unless it had failed: then it is kept and named on stderr (a failure costs only time: what it
    did not compile compiles when first used)."""
    global background, background_log
    for pipe in (helper.stdout, helper.stderr):
        if pipe is not None:
            pipe.close()
    background = helper
    background_log = getattr(helper, "log", None)
    atexit.register(_stop_background, helper)


def _stop_background(helper: subprocess.Popen) -> None:
    """At exit: stop the helper if it still compiles; keep its log and name it if it failed, else remove it."""
    if helper.poll() is None:
        helper.kill()
        helper.wait()
    elif helper.returncode != 0 and getattr(helper, "log", None) is not None:
        tail = _log_tail(helper)
        said = "\n  ".join(tail) if tail else "(empty: it wrote nothing after its share)"
        print(f"lenet_gpu: the background compile helper failed (exit {helper.returncode}); its output: "
              f"{helper.log}\n  {said}", file=sys.stderr)  # type: ignore[attr-defined]
        return
    _remove_log(helper)


def _log_tail(helper: subprocess.Popen, lines: int = 3) -> list[str]:
    """The last lines of the helper's log ([] if it has none, or it is empty)."""
    log = getattr(helper, "log", None)
    if log is None:
        return []
    try:
        with open(log, errors="replace") as f:
            return f.read().strip().splitlines()[-lines:]
    except OSError as e:
        return [f"(cannot read {log}: {e})"]


def _remove_log(helper: subprocess.Popen | None) -> None:
    log = getattr(helper, "log", None)
    if log is not None and os.path.exists(log):
        os.unlink(log)


def _parts_first(step: ScratchStep, options: dict[str, Any], fused: bool, share: set[str], threads: int) -> list[str]:
    """In the helper, before its share: the inner functions of the other share's ops in PARTS_FIRST that the step
    runs (found by a scratch step that runs no op). Returns those ops."""
    called: set[str] = set()
    scratch_step(step, options, fused, set(), set(LATER_OPS), threads, called)
    ops = sorted(op for op in called if op in PARTS_FIRST and op not in share)
    for op in ops:
        PARTS_FIRST[op]()
    return ops


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    # the log, open from the start: a crash (a signal, a fatal error) is written there by faulthandler, whichever
    # phase it comes in, rather than to pipes that nobody reads after the share
    log = open(args["log"], "a", buffering=1) if args.get("log") else None  # noqa: SIM115 (open until exit)
    if log is not None:
        faulthandler.enable(file=log)
    step = step_by_name(args["step"])
    _parts_first(step, args["options"], bool(args["fused"]), set(args["ops"]), int(args["threads"]))
    scratch_step(step, args["options"], bool(args["fused"]), set(args["ops"]), set(), int(args["threads"]))
    # one write of the whole line (print writes its end separately where stdout is unbuffered)
    sys.stdout.write(f"{SHARE_DONE}: {time.perf_counter() - t0:.2f} s after its imports, "
                     f"{time.process_time():.2f} s CPU\n")
    sys.stdout.flush()
    if args.get("later"):
        # nobody reads the pipes from now on (the first step is under way): write to the log
        fd = log.fileno() if log is not None else os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        print(f"compiling {', '.join(args['later'])} after the share", flush=True)
        try:
            scratch_step(step, args["options"], bool(args["fused"]), set(args["later"]), set(), int(args["threads"]))
        except BaseException:
            traceback.print_exc(file=log if log is not None else sys.stderr)
            return 1
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
