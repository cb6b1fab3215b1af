"""The self-test's driver: parse the command line, check for a GPU, run each phase in a child process with
its time budget and a hard limit, and rewrite results.json and report.md after every phase."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .common import EMULATED_LABELS, GPU_LABELS, LABELS, PHASES, SHARES, SHARES_EMULATED, first_lines, kill_group

PROG = "python -m lenet_gpu.selftest"
DEFAULT_BUDGET, QUICK_BUDGET = 420.0, 120.0
EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """Printed as one line; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Prove and time both GPU backends (cupy: the CUDA C kernels; numba: the Numba kernels) on this "
        "machine's GPU: environment, compile and load every kernel, op parity against the float64 reference, whole "
        "training steps (against numpy, CUDA graphs against eager launches, determinism, counters), the default "
        "training recipe, and a benchmark against PyTorch. Writes report.md and results.json as it goes.",
    )
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help=f"total time; the phases are sized to end inside it (default {DEFAULT_BUDGET:.0f}, "
                   f"{QUICK_BUDGET:.0f} with --quick)")
    p.add_argument("--quick", action="store_true", help="about two minutes: fewer cases, sizes and batch sizes")
    p.add_argument("--out", default="reports/selftest", metavar="DIR",
                   help="where report.md, results.json, logs/ and train/ go (default reports/selftest)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="also train on the dataset in this folder (MNIST or Fashion-MNIST IDX files)")
    p.add_argument("--emulate", action="store_true",
                   help="no GPU: run the same phases on cupy-host (the CUDA C kernels on CPU threads) and the Numba "
                   "CUDA simulator, at tiny sizes (what CI runs)")
    p.add_argument("--backends", nargs="+", choices=LABELS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--phases", nargs="+", choices=[ph for ph in PHASES if ph != "summary"], default=None,
                   help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------ the GPU probe
_PROBE = r"""
import json
out = {}
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    out["cupy"] = [n > 0, "" if n > 0 else "no CUDA device"]
except ImportError as e:
    out["cupy"] = [False, f"CuPy is not installed ({e.name or e})"]
except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else ""
    out["cupy"] = [False, f"{type(e).__name__}: {msg}"]
try:
    from numba import cuda
    ok = bool(cuda.is_available())
    out["numba"] = [ok, "" if ok else "numba.cuda.is_available() is False"]
except ImportError as e:
    out["numba"] = [False, f"Numba is not installed ({e.name or e})"]
except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else ""
    out["numba"] = [False, f"{type(e).__name__}: {msg}"]
print("PROBE " + json.dumps(out))
"""


def probe_gpu(env: dict[str, str], timeout_s: float = 120.0) -> dict[str, tuple[bool, str]]:
    """label → (sees a GPU, why not), asked in a child process (a driver that hangs cannot hang us)."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=timeout_s,
                           check=False)
    except subprocess.TimeoutExpired:
        return {"cupy": (False, f"the GPU probe did not answer in {timeout_s:.0f} s"), "numba": (False, "")}
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return {k: (bool(v[0]), str(v[1])) for k, v in json.loads(line[6:]).items()}
    return {"cupy": (False, f"the GPU probe failed: {first_lines(r.stderr, 1)}"), "numba": (False, "")}


# ------------------------------------------------------------------------------------ child processes
def package_root() -> Path:
    return Path(__file__).resolve().parents[2]


def child_env(mode: str, phase: str, backends: list[str]) -> dict[str, str]:
    """The environment of a phase's process: the simulator switched on (emulated, not for compile: the
    simulator cannot compile) or off (a GPU), and this lenet_gpu importable from a plain checkout."""
    env = dict(os.environ)
    root = package_root()
    if not any(part in ("site-packages", "dist-packages") for part in root.parts):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    if mode == "emulate" and "numba-sim" in backends and phase != "compile":
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env




def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_phase(phase: str, ctx: dict[str, Any], soft_s: float, hard_s: float, out: Path) -> dict[str, Any]:
    """Run one phase in a child process; return its results (what it wrote, plus how it ended)."""
    work, logs = out / ".work", out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    result_path = work / f"{phase}.json"
    if result_path.exists():
        result_path.unlink()
    ctx = {**ctx, "phase": phase, "budget_s": soft_s, "result_path": str(result_path)}
    ctx_path = work / f"{phase}.ctx.json"
    ctx_path.write_text(json.dumps(ctx))
    log_path = logs / f"{phase}.log"
    t0 = time.monotonic()
    killed = interrupted = False
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "lenet_gpu.selftest.child", str(ctx_path)], stdout=log,
                             stderr=subprocess.STDOUT, env=child_env(ctx["mode"], phase, ctx["backends"]),
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, hard_s))
        except subprocess.TimeoutExpired:
            kill_group(p)
            rc, killed = p.returncode, True
        except KeyboardInterrupt:
            kill_group(p)
            rc, interrupted = p.returncode, True
    seconds = time.monotonic() - t0
    try:
        res = json.loads(result_path.read_text())
    except (OSError, ValueError):
        res = {"phase": phase, "cases": [], "counts": {}, "data": {}, "notes": [], "missing": True}
    res.update({"seconds": round(seconds, 2), "budget_s": round(soft_s, 1), "hard_limit_s": round(hard_s, 1),
                "returncode": rc, "log": str(log_path.relative_to(out))})
    if killed:
        res["killed"] = (f"did not finish within its hard limit of {hard_s:.0f} s (a hang?); killed. Cases that "
                         f"finished are kept. Last output:\n{_tail(log_path, 6)}")
    if interrupted:
        res["interrupted"] = "interrupted (Ctrl-C)"
    if killed or interrupted:
        res.pop("missing", None)  # one failure to report: the kill
    elif res.get("missing") or (rc != 0 and not res.get("crash")):
        res["crash"] = res.get("crash") or f"the phase process exited with status {rc}:\n{_tail(log_path, 12)}"
    return res


# ------------------------------------------------------------------------------------ the run
def allocate(phase: str, remaining: list[str], left_s: float, shares: dict[str, float] = SHARES,
             slack: float = 0.15, min_grace: float = 4.0) -> tuple[float, float]:
    """(soft, hard) seconds for ``phase`` out of ``left_s``: its share of what is left among the phases still
    to run. The phase starts no case past the soft limit and is killed at the hard one; between them
    (``slack`` of its share, at least ``min_grace``) a case that started in time may finish."""
    share = shares[phase] / sum(shares[p] for p in remaining)
    target = max(left_s * share, 12.0) if phase != remaining[-1] else max(left_s, 5.0)
    soft = max(1.0, target * (1.0 - slack))
    hard = target if phase == remaining[-1] else max(target, soft + min_grace)
    if phase == "environment":  # imports only; it needs a few seconds whatever the budget
        soft, hard = max(soft, min(20.0, left_s * 0.3)), max(hard, min(40.0, left_s * 0.4))
    return soft, hard


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = args.budget if args.budget is not None else (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    if not budget > 0:
        raise UsageError(f"--budget must be > 0 (got {budget})")
    backends = list(args.backends or (EMULATED_LABELS if args.emulate else GPU_LABELS))
    if args.emulate and any(b in GPU_LABELS for b in backends):
        raise UsageError("--emulate runs the emulators only (cupy-host, numba-sim)")
    if "numba" in backends and "numba-sim" in backends:
        raise UsageError("numba (a GPU) and numba-sim (the simulator) cannot run in the same self-test")
    mode = "gpu" if any(b in GPU_LABELS for b in backends) else "emulate"
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: not a folder")
    t_start = time.monotonic()
    if mode == "gpu":
        seen = probe_gpu(child_env("gpu", "probe", backends))
        if not any(seen.get(b, (False, ""))[0] for b in backends):
            why = "; ".join(f"{b}: {seen.get(b, (False, '?'))[1]}" for b in backends)
            print(f"lenet_gpu.selftest: no CUDA GPU found ({why}); it needs an NVIDIA GPU. Use --emulate to run the "
                  "same phases on the CPU emulators (cupy-host, the Numba simulator) at tiny sizes.", file=sys.stderr)
            return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = [p for p in PHASES if p != "summary" and (args.phases is None or p in args.phases)]
    command = PROG + (" " + shlex.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    results: dict[str, Any] = {
        "format": report.FORMAT, "version": report.VERSION, "command": command,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "finished": None, "mode": mode,
        "backends": backends, "budget_s": budget, "quick": args.quick, "elapsed_s": 0.0,
        "phases": {p: None for p in PHASES},
    }
    ctx: dict[str, Any] = {"mode": mode, "backends": backends, "quick": args.quick, "out": str(out.resolve()),
                           "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
                           "profile": "full" if mode == "gpu" or backends == ["numpy"] else "tiny",
                           "max_tier": 2 if args.quick else 3, "previous": {}}
    end = t_start + budget - min(5.0, 0.02 * budget)  # what is left is for the summary
    report.write(out, results)
    print(f"lenet_gpu self-test: {mode}, backends {', '.join(backends)}, budget {budget:.0f} s; "
          f"report in {out}/report.md", flush=True)
    code = 0
    for i, phase in enumerate(phases):
        # the emulators: cases take seconds each, so more of each phase's share is kept for the one in flight
        soft, hard = (allocate(phase, phases[i:], end - time.monotonic()) if mode == "gpu" else
                      allocate(phase, phases[i:], end - time.monotonic(), SHARES_EMULATED, slack=0.35, min_grace=6.0))
        print(f"[{i + 1}/{len(phases) + 1}] {phase} (budget {soft:.0f} s) ...", end=" ", flush=True)
        res = run_phase(phase, ctx, soft, hard, out)
        results["phases"][phase] = res
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if phase in ("compile", "whole_step"):  # what later phases size their cases from
            keep = ("unbuilt_modules", "module_build_s", "step_seconds")
            ctx["previous"][phase] = {"data": {k: v for k, v in res.get("data", {}).items() if k in keep}}
        report.write(out, results)
        c = res.get("counts", {})
        print(f"{report.phase_status(res)} ({res['seconds']:.0f} s: {c.get('pass', 0)} passed, {c.get('fail', 0)} "
              f"failed, {c.get('skip', 0)} skipped)", flush=True)
        if res.get("interrupted"):
            code = EXIT_INTERRUPTED
            break
    summary = report.summarize(results)
    results["phases"]["summary"] = {**summary, "seconds": 0.0}
    results["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    results["status"] = summary["status"]
    report.write(out, results)
    print(f"[{len(phases) + 1}/{len(phases) + 1}] summary: {summary['status']} in {results['elapsed_s']:.0f} s — "
          f"{out}/report.md, {out}/results.json", flush=True)
    for f in summary["failures"][:10]:
        print(f"  FAIL {f['phase']}: {f['what']}: {f['lines'].splitlines()[0] if f['lines'] else ''}")
    if code:
        return code
    return 0 if summary["status"] == "PASS" else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as e:
        print(f"lenet_gpu.selftest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lenet_gpu.selftest: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
