"""Compiling ahead on two cores (cpu_backend/warm.py): a first run with an empty Numba cache compiles the
helper's share in another process, the step then loads it from the cache, and the trained parameters are
the same bits as a run that compiled everything itself; a helper that fails leaves its share to this
process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.backends.cpu_backend import warm
from lenet_gpu.model import LeNet5, scratch_step

ROOT = Path(__file__).resolve().parent.parent

#: a first run in a fresh process: one training step, then what warm did, whether the helper's kernels came
#: from the cache, and the parameters' bytes
FIRST_RUN = """
import hashlib, json
import numpy as np
from lenet_gpu.model import LeNet5
from lenet_gpu.backends.cpu_backend import head, lenet_fwd, routed, warm
m = LeNet5(backend="cpu", activation="tanh", optimizer="sgd", seed=3)
rng = np.random.default_rng(7)
x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
y = rng.integers(0, 10, 40).astype(np.uint8)
loss = m.train_step(x, y)
# max pooling: the four-kernel step; head_train in the helper's share, and step_bwd's chunk functions (PARTS_FIRST)
helper = [head.make_head_train_v1(True), routed._bwd_weight_routed_chunk, routed._bwd_data_routed_chunk,
          routed._bwd_weight_stack_chunk]
params = hashlib.sha256(m.parameters().tobytes()).hexdigest()
# the helper compiles inference after its share, while this process goes on: wait for it, then infer
if warm.background is None or warm.background.wait(timeout=300) != 0:
    log = open(warm.background_log).read()[-2000:] if warm.background_log else "(no log)"
    rc = None if warm.background is None else warm.background.returncode
    raise SystemExit(f"the background helper: {warm.last_report}, exit {rc}, its output: {log}")
m.logits(x, batch_size=40)
print(json.dumps({
    "report": warm.last_report,
    "infer_loaded": [sum(f.stats.cache_hits.values()) for f in lenet_fwd._MADE.values()],
    "loaded": [sum(f.stats.cache_hits.values()) for f in helper],
    "compiled_here": [sum(f.stats.cache_misses.values()) for f in helper],
    "loss": loss,
    "params": params,
}))
"""


def _first_run(tmp_path: Path, ahead: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / f"cache-{ahead}"), PYTHONPATH=str(ROOT),
               LENET_GPU_COMPILE_AHEAD=ahead)
    res = subprocess.run([sys.executable, "-c", FIRST_RUN], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_first_run_compiles_on_two_processes_and_trains_the_same(tmp_path):
    got = _first_run(tmp_path, "1")
    report = got["report"]
    assert report["ran"] is True, report
    assert report["helper"].startswith("ok"), report
    assert all(n > 0 for n in got["loaded"]), got  # the helper's kernels came from the cache it filled
    assert not any(got["compiled_here"]), got
    assert got["infer_loaded"] and all(n > 0 for n in got["infer_loaded"]), got  # compiled by the helper
    # the same step here, with kernels compiled (or cached) by this process as usual
    m = LeNet5(backend="cpu", activation="tanh", optimizer="sgd", seed=3)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    loss = m.train_step(x, rng.integers(0, 10, 40).astype(np.uint8))
    assert got["loss"] == loss
    assert got["params"] == hashlib.sha256(m.parameters().tobytes()).hexdigest()


def test_a_failing_helper_is_reported_and_not_fatal():
    bad = subprocess.Popen([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert warm._wait(bad) == "failed (exit 3): boom"
    assert warm._wait(None) == "not started"


def test_a_failed_background_helper_keeps_its_log_and_says_where(tmp_path, capsys):
    """What the helper prints after its share goes to a log: removed at exit when it succeeded or was stopped,
    kept and named on stderr when it failed."""
    for code, kept in ((0, False), (3, True)):
        log = tmp_path / f"helper-{code}.log"
        log.write_text("")
        with open(log, "a") as out:
            helper = subprocess.Popen([sys.executable, "-c", f"import sys; print('compiling'); sys.exit({code})"],
                                      stdout=out, stderr=out)
        helper.log = str(log)
        helper.wait()
        warm._stop_background(helper)
        assert log.exists() is kept
        err = capsys.readouterr().err
        assert (f"failed (exit 3); its output: {log}\n  compiling" in err) is kept  # its last lines quoted
        if kept:
            assert log.read_text() == "compiling\n"


def test_share_done_is_taken_as_a_whole_line_only():
    """The parent closes the helper's pipes once it reads SHARE_DONE: it must wait for the line's end, or a helper
    that writes the text and its newline apart (print where stdout is unbuffered) dies writing the newline."""
    code = (f"import sys, time; sys.stdout.write({warm.SHARE_DONE!r} + ': 1 s'); sys.stdout.flush(); "
            "time.sleep(0.3); sys.stdout.write('\\n'); sys.stdout.flush(); time.sleep(0.3)")
    helper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line, _, timed_out = warm._read_until_share_done(helper, time.perf_counter() + 60)
    assert line == f"{warm.SHARE_DONE}: 1 s" and not timed_out
    helper.stdout.close()  # what _in_background does next
    helper.stderr.close()
    assert helper.wait(timeout=60) == 0  # its newline was read, not written into a closed pipe


HELPER_LATER = """
import json, os, signal, sys
from lenet_gpu.backends.cpu_backend import warm
warm.step_by_name = lambda name: None
warm._parts_first = lambda *a: []
def fake(step, options, fused, run, skip, threads, called=None):
    if run == {"lenet_fwd"}:  # the later phase
        if sys.argv[2] == "raise":
            raise RuntimeError("later boom")
        os.kill(os.getpid(), signal.SIGSEGV)
warm.scratch_step = fake
sys.exit(warm.main([json.dumps({"options": {}, "fused": False, "threads": 1, "ops": ["head_train"],
                                "later": ["lenet_fwd"], "step": "x", "log": sys.argv[1]})]))
"""


@pytest.mark.parametrize("how", ["raise", "crash"])
def test_a_helper_that_fails_after_its_share_says_why_in_its_log(tmp_path, how):
    """After its share, nobody reads the helper's pipes: an exception (its traceback) or a crash (faulthandler's
    report) in the later phase is written to its log, after a line that says the phase began."""
    log = tmp_path / "helper.log"
    log.write_text("")
    res = subprocess.run([sys.executable, "-c", HELPER_LATER, str(log), how], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert warm.SHARE_DONE in res.stdout, res
    text = log.read_text()
    assert text.startswith("compiling lenet_fwd after the share\n"), text
    if how == "raise":
        assert res.returncode == 1 and "RuntimeError: later boom" in text, (res, text)
    else:
        assert res.returncode == -signal.SIGSEGV and "Segmentation fault" in text, (res, text)


def test_scratch_step_runs_only_its_share(monkeypatch):
    """The scratch model runs the ops of its share and none of the others."""
    from lenet_gpu.backends.cpu_backend import backend as cpu

    calls: list[str] = []
    for op in ("batch_prepare", "conv2d_pool_fwd", "head_train", "conv2d_bwd_data_pool", "conv2d_bwd_weight",
               "conv2d_bwd_weight_routed", "conv2d_bwd_data_routed", "adam_step", "step_advance", "lenet_fwd"):
        orig = getattr(cpu.CpuBackend, op)
        monkeypatch.setattr(cpu.CpuBackend, op, lambda self, *a, _op=op, _f=orig, **k: (calls.append(_op),
                                                                                        _f(self, *a, **k))[1])
    # the nine-op routed step (max pooling, step4=False, docs/routed_backward.md)
    options = {**LeNet5(backend="numpy").options(), "step4": False}
    warm.scratch_step(scratch_step, options, True, set(warm.HELPER_OPS), set(), 1)
    assert sorted(set(calls)) == ["batch_prepare", "conv2d_bwd_data_routed", "head_train"], calls
    calls.clear()
    # this process's share: the rest of the step, and no inference (the helper compiles it afterwards)
    warm.scratch_step(scratch_step, options, True, None, set(warm.HELPER_OPS) | set(warm.LATER_OPS), 1)
    assert set(calls) == {"conv2d_pool_fwd", "conv2d_bwd_weight_routed", "adam_step", "step_advance"}, calls
    assert calls.count("conv2d_bwd_weight_routed") == 2, calls
    calls.clear()
    warm.scratch_step(scratch_step, options, True, set(warm.LATER_OPS), set(), 1)
    assert set(calls) == {"lenet_fwd"}, calls
    assert warm._parts_first(scratch_step, options, True, set(warm.HELPER_OPS), 1) == []


def test_scratch_step_of_the_four_kernel_step(monkeypatch):
    """The default options train through the four-kernel step (docs/step4.md): head_train there, step_bwd's chunk
    functions compiled there first, the rest here."""
    from lenet_gpu.backends.cpu_backend import backend as cpu

    calls: list[str] = []
    for op in ("head_train", "step_fwd", "step_bwd", "step_adam", "step_sgd", "lenet_fwd"):
        orig = getattr(cpu.CpuBackend, op)
        monkeypatch.setattr(cpu.CpuBackend, op, lambda self, *a, _op=op, _f=orig, **k: (calls.append(_op),
                                                                                        _f(self, *a, **k))[1])
    options = LeNet5(backend="numpy").options()
    warm.scratch_step(scratch_step, options, True, set(warm.HELPER_OPS), set(), 1)
    assert calls == ["head_train"], calls
    calls.clear()
    warm.scratch_step(scratch_step, options, True, None, set(warm.HELPER_OPS) | set(warm.LATER_OPS), 1)
    assert calls == ["step_fwd", "step_bwd", "step_adam"], calls
    calls.clear()
    parts: list[str] = []
    monkeypatch.setitem(warm.PARTS_FIRST, "step_bwd", lambda: parts.append("step_bwd"))
    assert warm._parts_first(scratch_step, options, True, set(warm.HELPER_OPS), 1) == ["step_bwd"]
    assert parts == ["step_bwd"] and not calls  # no op ran


def test_nothing_runs_twice_or_when_switched_off(monkeypatch):
    monkeypatch.setattr(warm, "_done", False)
    monkeypatch.setenv("LENET_GPU_COMPILE_AHEAD", "0")
    assert warm.compile_ahead({}, True, 1, scratch_step) == {"ran": False, "why": "LENET_GPU_COMPILE_AHEAD=0"}
    assert warm.compile_ahead({}, True, 1, scratch_step)["ran"] is False  # once per process
    assert isinstance(warm.cache_is_cold(), bool)


def test_an_interrupted_first_run_stops_the_helper(monkeypatch):
    """Ctrl-C while this process compiles its share: the helper is killed at once, the interrupt goes on."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(warm, "_done", False)
    monkeypatch.setenv("LENET_GPU_COMPILE_AHEAD", "1")
    monkeypatch.setattr(warm, "cache_is_cold", lambda: True)
    monkeypatch.setattr(warm, "_start_helper", lambda *a: sleeper)
    monkeypatch.setattr(warm, "scratch_step", interrupted)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        warm.compile_ahead({}, True, 1, scratch_step)
    assert sleeper.poll() is not None and time.perf_counter() - t0 < 30


def test_the_helper_finds_the_step_by_its_name():
    """The backend knows nothing of the model: the helper process imports the model's scratch step by name."""
    assert warm.step_name(scratch_step) == "lenet_gpu.model:scratch_step"
    assert warm.step_by_name("lenet_gpu.model:scratch_step") is scratch_step
    with pytest.raises(ValueError, match="module-level"):
        warm.step_name(lambda be, options, fused, batch: None)
