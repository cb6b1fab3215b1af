#!/usr/bin/env python3
"""Run the project's CUDA C kernels under AddressSanitizer and ThreadSanitizer on the CPU harness.

Three steps, each in fresh Python processes started with the sanitizer runtime preloaded
(``lenet_gpu.harness.cudacpu.sanitizer_env``):

1. build: every kernel file (default ``kernels/*.cu``) is compiled and loaded with the sanitizer;
2. tests: pytest runs the host-harness parity tests (default ``tests/test_cupy_*.py -k host``) with
   ``CUDACPU_SANITIZE`` set, so every kernel launch in them is checked; the output is scanned for
   sanitizer reports and the pytest summary;
3. ``--self-test``: the broken kernels of ``tests/harness/kernels`` show that an out-of-bounds
   write is caught by ASan and a missing ``__syncthreads`` by TSan, and that correct kernels run
   clean under both.

Full logs go to ``reports/sanitize/``. Exit status: 0 when everything ran clean, 1 when a build
failed, a test failed or a sanitizer reported something, 2 for a usage or environment problem.

Examples::

    python scripts/sanitize_kernels.py
    python scripts/sanitize_kernels.py --self-test
    python scripts/sanitize_kernels.py --sanitizers thread --pytest "tests/test_cupy_backend.py -k 'host and conv'"
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lenet_gpu.harness.cudacpu import CudaCpuError, sanitizer_env  # noqa: E402

DEFAULT_PYTEST = "tests/test_cupy_*.py -k host"
HARNESS_KERNELS = ROOT / "tests" / "harness" / "kernels"

# What a sanitizer report looks like in a process's output.
REPORT_PATTERNS = {
    "address": re.compile(r"ERROR: AddressSanitizer: .*"),
    "thread": re.compile(r"WARNING: ThreadSanitizer: .*"),
    "undefined": re.compile(r".*runtime error: .*"),
}
SUMMARY_LINE = re.compile(r"^SUMMARY: (?:Address|Thread|UndefinedBehavior)Sanitizer: .*$", re.MULTILINE)
PYTEST_TOTALS = re.compile(
    r"^(?:=+ )?((?:\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)|no tests ran)"
    r"[^\n]*?) in [\d.]+s",
    re.MULTILINE,
)


@dataclass
class Outcome:
    step: str
    sanitizer: str
    ok: bool
    detail: str
    reports: list[str] = field(default_factory=list)
    log: Path | None = None


EXTRA_ENV: dict[str, str] = {}  # --env NAME=VALUE


def _env(kind: str, report_dir: Path) -> dict[str, str]:
    env = sanitizer_env(kind, {**os.environ, **EXTRA_ENV}, report_dir=report_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONFAULTHANDLER", "1")
    return env


def _run(cmd: list[str], kind: str, log: Path, timeout: float) -> tuple[int | None, str]:
    """Runs ``cmd`` under sanitizer ``kind``; returns (exit status or None on timeout, output).

    The sanitizer reports of every process of the run (pytest children included) go to files in
    ``<log>.reports/`` (pytest would swallow them from stderr) and are appended to the output.
    """
    report_dir = log.with_suffix(".reports")
    shutil.rmtree(report_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(kind, report_dir), cwd=ROOT, timeout=timeout)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = _text(e.stdout) + _text(e.stderr) + f"\n[timed out after {timeout:.0f} s]\n"
    for f in sorted(report_dir.glob("*")) if report_dir.is_dir() else []:
        out += f"\n----- sanitizer report file {f.name} -----\n" + f.read_text(errors="replace")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {shlex.join(cmd)}\n# {kind}, {time.perf_counter() - t0:.1f} s, exit {rc}\n\n{out}")
    return rc, out


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _reports(kind: str, out: str) -> list[str]:
    """One line per sanitizer report: its SUMMARY line where there is one, else the header."""
    summaries = SUMMARY_LINE.findall(out)
    if summaries:
        return [s.removeprefix("SUMMARY: ") for s in summaries]
    return [m.group(0).strip() for m in REPORT_PATTERNS[kind].finditer(out)]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# --------------------------------------------------------------------------------------------- steps


def build_step(files: list[Path], kinds: list[str], options: list[str], log_dir: Path, timeout: float) -> list[Outcome]:
    outcomes = []
    code = f"""
    import sys
    from lenet_gpu.harness.cudacpu import CpuModule, CudaCpuError
    failed = 0
    for path in {[str(f) for f in files]!r}:
        try:
            m = CpuModule(path, options={tuple(options)!r})
            for name in m.kernel_names:
                m.get_function(name)
            print("BUILT", path, len(m.kernel_names), "kernels")
        except CudaCpuError as e:
            failed += 1
            print("FAILED", path, str(e).splitlines()[0][:300])
    sys.exit(1 if failed else 0)
    """
    for kind in kinds:
        rc, out = _run(_python(code), kind, log_dir / f"build-{kind}.log", timeout)
        built = sum(ln.startswith("BUILT ") for ln in out.splitlines())
        failed = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
        reports = _reports(kind, out)
        ok = rc == 0 and not reports
        detail = f"{built}/{len(files)} files built and loaded"
        if failed:
            detail += "; " + "; ".join(failed)
        elif rc != 0 and not reports:
            detail += f"; exit status {rc}"
        outcomes.append(Outcome("build", kind, ok, detail, reports, log_dir / f"build-{kind}.log"))
    return outcomes


def pytest_step(args: list[str], kinds: list[str], log_dir: Path, timeout: float) -> list[Outcome]:
    outcomes = []
    for kind in kinds:
        # the sanitizers slow everything down: pytest-timeout follows --timeout
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", f"timeout={timeout:.0f}", *args]
        log = log_dir / f"pytest-{kind}.log"
        rc, out = _run(cmd, kind, log, timeout)
        totals = PYTEST_TOTALS.findall(out)
        reports = _reports(kind, out)
        if rc is None:
            detail = "timed out"
        elif totals:
            detail = totals[-1]
        elif reports:
            detail = f"pytest was stopped by the sanitizer (exit status {rc})"
        else:
            detail = f"pytest exit status {rc}"
        # pytest exit 5 = nothing collected: not a sanitizer failure, but say so
        ok = rc in (0, 5) and not reports
        if rc == 5:
            detail += " (no tests selected)"
        outcomes.append(Outcome("pytest", kind, ok, detail, reports, log))
    return outcomes


_SELF_TEST_PRELUDE = f"""
import numpy as np
from lenet_gpu.harness.cudacpu import CpuModule
K = {str(HARNESS_KERNELS)!r}
f32, i32 = np.float32, np.int32
"""
_CLEAN = """
ok = CpuModule(K + "/harness_ok.cu")
rng = np.random.default_rng(0)
x = rng.standard_normal(1000).astype(f32); out = np.zeros(8, f32)
ok.get_function("block_sum")((8,), (128,), (x, out, i32(1000)), shared_mem=512)
a = rng.standard_normal((37, 45)).astype(f32); b = rng.standard_normal((45, 29)).astype(f32)
c = np.zeros((37, 29), f32)
ok.get_function("tiled_matmul")((2, 3), (16, 16), (a, b, c, i32(37), i32(29), i32(45)))
d = np.zeros(32, f32); xa = np.zeros(1000, f32)
ok.get_function("warp_sums")((8,), (128,), (x, d, xa, i32(1000)))
print("correct kernels ran; max |C - A@B| =", float(np.abs(c - a @ b).max()))
"""
_OOB = """
bad = CpuModule(K + "/harness_bad.cu")
bad.get_function("global_oob")((2,), (256,), (np.zeros(256, f32), i32(256)))
"""
_SMEM = """
bad = CpuModule(K + "/harness_bad.cu")
bad.get_function("smem_overrun")((1,), (64,), (np.zeros(64, f32), i32(64)), shared_mem=64)
"""
_RACE = """
bad = CpuModule(K + "/harness_bad.cu")
a = np.ones((64, 64), f32); b = np.ones((64, 64), f32); c = np.zeros((64, 64), f32)
bad.get_function("matmul_missing_sync")((4, 4), (16, 16), (a, b, c, i32(64), i32(64), i32(64)))
"""
SELF_TESTS = [
    # (sanitizer, what, code, expected report or None for "runs clean")
    ("address", "out-of-bounds global write (global_oob)", _OOB, "heap-buffer-overflow"),
    ("address", "dynamic shared memory overrun (smem_overrun)", _SMEM, "heap-buffer-overflow"),
    ("address", "correct kernels run clean", _CLEAN, None),
    ("thread", "missing __syncthreads (matmul_missing_sync)", _RACE, "data race"),
    ("thread", "correct kernels run clean", _CLEAN, None),
]


def self_test_step(kinds: list[str], log_dir: Path, timeout: float) -> list[Outcome]:
    outcomes = []
    for i, (kind, what, code, expect) in enumerate(SELF_TESTS):
        if kind not in kinds:
            continue
        log = log_dir / f"self-test-{i}-{kind}.log"
        rc, out = _run(_python(_SELF_TEST_PRELUDE + code), kind, log, timeout)
        reports = _reports(kind, out)
        if expect is None:
            ok = rc == 0 and not reports
            detail = what + (": clean" if ok else f": exit status {rc}")
        else:
            ok = any(expect in r for r in reports)
            detail = what + (": caught" if ok else ": NOT caught")
        outcomes.append(Outcome("self-test", kind, ok, detail, reports, log))
    return outcomes


# --------------------------------------------------------------------------------------------- main


def _print(outcomes: list[Outcome], verbose: bool) -> None:
    for o in outcomes:
        mark = "ok  " if o.ok else "FAIL"
        print(f"[{mark}] {o.step:9s} {o.sanitizer:9s} {o.detail}")
        distinct = Counter(o.reports)  # the same line is often reported for several thread pairs
        shown = list(distinct.items()) if verbose else list(distinct.items())[:3]
        for r, n in shown:
            print(f"           report: {r}" + (f"  (x{n})" if n > 1 else ""))
        if len(distinct) > len(shown):
            print(f"           ... {len(distinct) - len(shown)} more distinct reports (-v lists them)")
        if (not o.ok or o.reports) and o.log:
            print(f"           log: {o.log.relative_to(ROOT) if o.log.is_relative_to(ROOT) else o.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Builds every kernel file with each sanitizer, runs the "
        "host-harness tests under it and summarizes the reports.",
        epilog="Logs: reports/sanitize/. See lenet_gpu/harness/cudacpu.py for the harness itself.",
    )
    parser.add_argument(
        "kernels", nargs="*", type=Path, help="kernel files to build (default: every kernels/*.cu of the repo)"
    )
    parser.add_argument(
        "--sanitizers",
        nargs="+",
        choices=["address", "thread", "undefined"],
        default=["address", "thread"],
        help="sanitizers to use (default: address thread)",
    )
    parser.add_argument(
        "--pytest",
        default=None,
        metavar="ARGS",
        help=f"pytest arguments, one shell-quoted string, globs expanded (default: {DEFAULT_PYTEST!r} "
        "when such files exist)",
    )
    parser.add_argument("--no-build", action="store_true", help="skip the build step")
    parser.add_argument("--no-pytest", action="store_true", help="skip the pytest step")
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="only show on tests/harness/kernels that ASan catches an out-of-bounds write and TSan a "
        "missing barrier (and that correct kernels run clean)",
    )
    parser.add_argument(
        "-O", "--option", dest="options", action="append", default=[], metavar="OPT", help="kernel build option (-D...)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the subprocesses, e.g. LENET_CUPY_HOST_K='conv2d_fwd or dense_bwd' to narrow "
        "the cupy-host child suite (sanitized runs are 5-20x slower)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per subprocess and per test (default 3600)"
    )
    parser.add_argument("--log-dir", type=Path, default=ROOT / "reports" / "sanitize", help="where logs go")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every report, not the first three")
    args = parser.parse_args(argv)

    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env expects NAME=VALUE, got {item!r}")
        EXTRA_ENV[name] = value
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        print("no C++ compiler: install g++ (>= 12) or set CXX", file=sys.stderr)
        return 2
    try:
        for kind in args.sanitizers:
            sanitizer_env(kind)  # fails early when the runtime library is missing
    except CudaCpuError as e:
        print(e, file=sys.stderr)
        return 2

    outcomes: list[Outcome] = []
    if args.self_test:
        outcomes += self_test_step(args.sanitizers, args.log_dir, args.timeout)
    else:
        if not args.no_build:
            files = args.kernels or sorted((ROOT / "kernels").glob("*.cu"))
            if files:
                outcomes += build_step(
                    [f.resolve() for f in files], args.sanitizers, args.options, args.log_dir, args.timeout
                )
            else:
                print("build: no kernels/*.cu yet, nothing to build")
        if not args.no_pytest:
            pytest_args = shlex.split(args.pytest if args.pytest is not None else DEFAULT_PYTEST)
            expanded: list[str] = []
            for a in pytest_args:
                hits = sorted(glob.glob(str(ROOT / a))) if any(c in a for c in "*?[") and not a.startswith("-") else []
                expanded += [str(Path(h).relative_to(ROOT)) for h in hits] if hits else [a]
            if any(any(c in a for c in "*?[") and not a.startswith("-") for a in expanded):
                print(f"pytest: no files match {args.pytest or DEFAULT_PYTEST!r}, skipping the test step")
            else:
                outcomes += pytest_step(expanded, args.sanitizers, args.log_dir, args.timeout)

    _print(outcomes, args.verbose)
    if not outcomes:
        return 0
    bad = [o for o in outcomes if not o.ok]
    print(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} checks as expected" + (f", {len(bad)} failed" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
