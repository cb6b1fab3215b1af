"""Run the benchmarks and write the report: ``python -m bench.run [--quick] [options]``.

Sections (all by default): ``ops`` (every op × site × variant × backend × batch, validated, then
timed), ``forward`` and ``train`` (end-to-end images/s, ours against PyTorch in alternating rounds),
``epoch`` (full-epoch time and time to a target test accuracy with the default recipe), ``counters``
(launches, copies, allocations, syncs per step and per forward pass), ``kernels`` (the static compile
table), ``host`` (the host's µs per training step with the device taken away: bench/host.py; ``--host``
runs it alone). Output: ``results.json``, ``report.md`` and PNG plots in ``--out`` (default reports/bench/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from lenet_gpu.backends import BACKENDS, BackendUnavailable, get_backend
from lenet_gpu.perf import model as e2e
from lenet_gpu.perf import ops as opsmod
from lenet_gpu.perf import peer as peermod
from lenet_gpu.perf.timing import (
    CpuTimer,
    GpuEventTimer,
    LoadMonitor,
    TimingConfig,
    clock_name,
    cpu_fp32_peak,
    gpu_library,
    set_clock,
    spread,
    wait_for_quiet,
)
from lenet_gpu.spec import NetConfig, forward_flops

from . import host as host_mod
from . import kernels as kernels_mod
from .report import write_all

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("ops", "forward", "infer-host", "infer-device", "train", "epoch", "counters", "profile", "kernels",
            "host")
FULL = {
    "batches": [1, 64, 256, 1024, 4096],
    "train_batches": [64, 128, 256],
    "rounds": 10,
    "min_sample_s": 0.05,
    "target_s": 0.3,
    "max_case_s": 10.0,
    "max_epochs": None,  # the recipe's epoch count
    "target_acc": 0.97,  # mnist-sample, default recipe: about epoch 8 of 15 (98% at the end)
    "epoch_budget_s": 900.0,
}
QUICK = {
    "batches": [1, 64, 256],
    "train_batches": [64, 128],
    "rounds": 4,
    "min_sample_s": 0.02,
    "target_s": 0.05,
    "max_case_s": 2.0,
    "max_epochs": 1,
    "target_acc": None,  # one epoch is timed; time to accuracy is the full run's (or give --target-acc)
    "epoch_budget_s": 60.0,
}


def _ints(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return sorted(set(vals))


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark lenet_gpu: per-op kernels (FLOPs, bytes, H100 floor), end-to-end forward and "
        "training throughput, epochs and time to accuracy, against the same LeNet-5 in PyTorch. "
        "Writes results.json, report.md and PNG plots.",
        epilog="Examples: python -m bench.run --quick;  python -m bench.run --backends numpy --batches 1,64,256 "
        "--train-batches 128;  NUMBA_ENABLE_CUDASIM=1 python -m bench.run --backends numba --batches 1 "
        "--sections ops --ops dense_fwd",
    )
    p.add_argument("--quick", action="store_true",
                   help="short run: batches 1,64,256; training 64,128; fewer rounds; one epoch timed (no time to "
                        "accuracy)")
    p.add_argument("--backends", type=_names, default=None,
                   help=f"comma-separated backends (default: every registered one that can run here — "
                        f"{', '.join(b for b in BACKENDS if b != 'auto')} — except CPU emulators such as "
                        "cupy-host and the Numba simulator, which run only when named)")
    p.add_argument("--batches", type=_ints, default=None,
                   help="batch sizes of the per-op and forward benchmarks (default 1,64,256,1024,4096)")
    p.add_argument("--train-batches", type=_ints, default=None, help="training-step batch sizes (default 64,128,256)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench", help="output folder (default reports/bench)")
    p.add_argument("--sections", type=_names, default=list(SECTIONS),
                   help=f"what to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--host", action="store_true",
                   help="only the host-overhead section: host µs per training step over a no-op runtime")
    p.add_argument("--ops", type=_names, default=None, help="only these ops (default: every op of every backend)")
    p.add_argument("--no-peer", action="store_true", help="do not run PyTorch even when it is installed")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads (default: the CPUs this process may use, as NumPy's BLAS uses)")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                   help="also time torch.compile on a GPU (auto: on a GPU in a full run)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of the end-to-end timings")
    p.add_argument("--min-samples", type=int, default=5, help="timed samples per op at least (default 5)")
    p.add_argument("--max-case-s", type=float, default=None,
                   help="skip a case whose estimated time exceeds this (default 10 s, quick 2 s)")
    p.add_argument("--dataset", default="mnist-sample", help="dataset of the end-to-end runs (default mnist-sample)")
    p.add_argument("--epochs", type=int, default=None,
                   help="most epochs of the time-to-accuracy run (default: the recipe's; quick: 1)")
    p.add_argument("--epoch-samples", type=int, default=None,
                   help="use only the first N training images for the epoch run (default: all)")
    p.add_argument("--target-acc", type=float, default=None,
                   help="target test accuracy of the time-to-accuracy run (default 0.97, not in --quick: the "
                        "default recipe takes mnist-sample's 4,000 training images to about 98%% in its 15 "
                        "epochs, past 97%% near epoch 8; use 0.985 or more with --dataset mnist)")
    p.add_argument("--activation", default="relu", help="network activation (default relu)")
    p.add_argument("--pool", default="max", help="network subsampling (default max)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--single-thread", action="store_true",
                   help="one thread everywhere (OpenBLAS/OpenMP/MKL and torch; the process re-executes itself "
                        "with the variables set) and CPU-time clocks: figures that hold on a busy shared machine")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to use < 25%% of the CPUs (default 0)")
    return p


# ---------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _blas() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        info = {"name": b.get("name"), "version": b.get("version")}
    except Exception:  # noqa: BLE001 - old NumPy
        pass
    try:
        from threadpoolctl import threadpool_info

        info["threads"] = [t.get("num_threads") for t in threadpool_info() if t.get("user_api") == "blas"]
    except ImportError:
        keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        env = {k: os.environ[k] for k in keys if k in os.environ}
        info["threads"] = env or "library default (one per usable CPU)"
    return info


def _git() -> dict[str, Any]:
    def run(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": run("rev-parse", "HEAD"), "branch": run("rev-parse", "--abbrev-ref", "HEAD"),
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def machine_info() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": _mem_gb(),
        "numpy": np.__version__,
        "blas": _blas(),
        "gpu": None,
        "git": _git(),
    }
    try:
        import cupy

        if cupy.cuda.is_available():
            props = cupy.cuda.runtime.getDeviceProperties(0)
            info["gpu"] = {"name": props["name"].decode(), "sm": f"{props['major']}{props['minor']}",
                           "memory_gb": round(props["totalGlobalMem"] / 2**30, 1),
                           "l2_bytes": props.get("l2CacheSize")}
    except Exception:  # noqa: BLE001 - no usable GPU
        pass
    return info


# ---------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: A CPU backend whose probe (pool2x2_fwd at S2, batch 8) is this many times slower than NumPy's is an
#: emulator (the cupy-host harness: ~100×; the Numba simulator: ~10,000×) and is left out by default.
EMULATED_FACTOR = 20.0


def probe_seconds(be: Any, repeats: int = 3) -> float:
    """Best of a few validated launches of a small op: tells an emulated backend from a real one."""
    variant = be.default_variants.get("pool2x2_fwd") or be.variants["pool2x2_fwd"][0]
    case = opsmod.build_case(be, "pool2x2_fwd", "S2", 8, variant, NetConfig())
    case.validate()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        case.launch()
        be.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def open_backends(names: list[str], named: bool = True) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Instantiate each backend; unavailable ones are recorded with their one-line reason. When the
    names were not given on the command line (``named`` False), emulated CPU backends (a tiny launch
    slower than EMULATED_PROBE_S: the cupy-host harness, the Numba simulator) are left out, with a note."""
    live: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    ref_probe = None
    if not named:
        from lenet_gpu.backends.numpy_backend import NumpyBackend

        ref_probe = probe_seconds(NumpyBackend(), repeats=20)
    for name in names:
        try:
            be = get_backend(name)
        except BackendUnavailable as e:
            info[name] = {"available": False, "reason": str(e)}
            log(f"backend {name}: unavailable: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - a backend that breaks on construction is a failure of the run
            info[name] = {"available": False, "failed": True, "reason": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()}
            log(f"backend {name}: FAILED to start: {e}")
            continue
        if ref_probe is not None and not be.is_gpu and name != "numpy":
            try:
                t = probe_seconds(be)
            except Exception as e:  # noqa: BLE001 - a probe that crashes or fails validation is a failure
                info[name] = {"available": False, "failed": True, "reason": f"probe failed: {type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()}
                log(f"backend {name}: FAILED its probe: {e}")
                continue
            if t > EMULATED_FACTOR * ref_probe:
                info[name] = {"available": False, "reason": f"emulated on the CPU (a small pool launch takes "
                              f"{t * 1e3:.2f} ms, {t / ref_probe:.0f}× NumPy's): left out of a default run; "
                              "name it in --backends to include it"}
                log(f"backend {name}: left out (emulated, {t / ref_probe:.0f}× NumPy on a small launch)")
                continue
        live[name] = be
        info[name] = {
            "available": True,
            "is_gpu": bool(be.is_gpu),
            "variants": {k: list(v) for k, v in be.variants.items()},
            "default_variants": dict(be.default_variants),
            "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and name == "numba",
        }
        log(f"backend {name}: {'GPU' if be.is_gpu else 'CPU'}, {sum(len(v) for v in be.variants.values())} variants")
    return live, info


class Budget:
    """Estimates a case's time from the same series at a smaller batch; skips what would overrun."""

    def __init__(self, max_case_s: float) -> None:
        self.max_case_s = max_case_s
        self.last: dict[tuple, tuple[int, float]] = {}

    def estimate(self, key: tuple, batch: int, calls: int) -> float | None:
        prev = self.last.get(key)
        if prev is None:
            return None
        b0, t0 = prev
        return t0 * max(1.0, batch / b0) * calls

    def too_long(self, key: tuple, batch: int, calls: int) -> str | None:
        est = self.estimate(key, batch, calls)
        if est is not None and est > self.max_case_s:
            return f"estimated {est:.1f} s > --max-case-s {self.max_case_s:g} s"
        return None

    def record(self, key: tuple, batch: int, seconds: float) -> None:
        self.last[key] = (batch, seconds)


# ---------------------------------------------------------------------------------------- sections


def bench_ops(
    backends: dict[str, Any], cfg: NetConfig, batches: list[int], only: list[str] | None, tcfg: TimingConfig,
    budget: Budget, cpu_peak_flops: float | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every op × site × variant × backend × batch, validated, then timed. A GPU row is set beside the H100
    floor of its op (floor_s, floor_frac); a CPU row beside the CPU's own FP32 peak (cpu_peak_frac).
    Returns (rows, skipped, failed): a skip has a reason that is not an error (no case defined, over the time
    budget); a case that raises or fails its validation is a failure."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    timers: dict[str, Any] = {}
    for name, be in backends.items():
        lib = gpu_library(be)
        timers[name] = GpuEventTimer(be, lib) if lib else CpuTimer(be.synchronize)
    op_names: list[str] = []
    for be in backends.values():
        op_names += [op for op in opsmod.all_ops(be) if op not in op_names]
    if only:
        op_names = [op for op in op_names if op in only]
    for op in op_names:
        site_list = opsmod.sites(op, cfg)
        if not site_list:
            why = (f"the op runs with max pooling only (this run: {cfg.pool})" if op in opsmod.MAX_ONLY_OPS
                   else "no benchmark case is defined for this op (lenet_gpu/perf/ops.py)")
            skipped.append({"op": op, "reason": why})
            continue
        op_batches: list[int | None] = [None] if op in opsmod.PER_STEP_OPS else list(batches)
        for site in site_list:
            for batch in op_batches:
                specs: dict[int, Any] = {}  # by the backend's partial rows (opsmod.op_groups), made once each
                for name, be in backends.items():
                    for variant in be.variants.get(op, ()):
                        key = (name, op, site, variant)
                        where = {"backend": name, "op": op, "site": site, "variant": variant, "batch": batch}
                        why = budget.too_long(key, batch or 1, 2 + tcfg.min_warmup + tcfg.min_samples)
                        if why:
                            skipped.append({**where, "reason": why})
                            continue
                        try:
                            groups = opsmod.op_groups(be, op, batch or 1)
                            if groups not in specs:
                                specs[groups] = opsmod.make_spec(op, site, batch or 1, cfg, groups)
                            case = opsmod.build_case(be, op, site, batch, variant, cfg, specs[groups])
                            t0 = time.perf_counter()
                            case.validate()
                            t_val = time.perf_counter() - t0
                            if t_val * (tcfg.min_warmup + tcfg.min_samples) > budget.max_case_s * 2:
                                # the first call may have compiled (Numba's JIT): what counts is a warm launch
                                t0 = time.perf_counter()
                                case.launch()
                                be.synchronize()
                                t_val = time.perf_counter() - t0
                        except AssertionError as e:
                            failed.append({**where, "error": f"FAILED validation: {e}"})
                            log(f"  {name} {op} {site} {variant} batch {batch}: FAILED validation")
                            continue
                        except Exception as e:  # noqa: BLE001 - a broken variant fails, and the run goes on
                            failed.append({**where, "error": f"crashed: {type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()})
                            log(f"  {name} {op} {site} {variant} batch {batch}: CRASHED: {type(e).__name__}: {e}")
                            continue
                        if t_val * (tcfg.min_warmup + tcfg.min_samples) > budget.max_case_s * 2:
                            why = f"one warm call took {t_val:.2f} s; timing it would exceed the budget"
                            skipped.append({**where, "reason": why})
                            budget.record(key, batch or 1, t_val)
                            continue
                        try:
                            rows.append(_time_case(be, case, timers[name], where, tcfg, budget, key, cpu_peak_flops))
                        except Exception as e:  # noqa: BLE001
                            failed.append({**where, "error": f"crashed while timed: {type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()})
                            log(f"  {name} {op} {site} {variant} batch {batch}: CRASHED while timed: {e}")
                            continue
                        row = rows[-1]
                        log(f"  {name:9s} {op:18s} {site:6s} {variant:4s} b={batch!s:5s} "
                            f"{row['median_s'] * 1e6:10.1f} µs  {row['gflops']:7.2f} GFLOP/s")
    return rows, skipped, failed


def _time_case(be: Any, case: Any, timer: Any, where: dict[str, Any], tcfg: TimingConfig, budget: Budget, key: tuple,
               cpu_peak_flops: float | None) -> dict[str, Any]:
    """Time one validated op case; its row."""
    op, variant, batch = where["op"], where["variant"], where["batch"]
    row = {**where, "default": be.default_variants.get(op) == variant, "validated": True,
           "flops": case.cost.flops, "bytes": case.cost.bytes,
           "floor_s": opsmod.floor_seconds(case.cost), "timer": timer.kind}
    if isinstance(timer, GpuEventTimer):
        cold, hot = timer.measure(case.launch, tcfg)
        row.update(cold.to_dict())
        row.update(hot.to_dict("hot_"))
        row["l2_flush_bytes"] = timer.flush_bytes
        st = cold
    else:
        st = timer.measure(case.launch, tcfg)
        row.update(st.to_dict())
    budget.record(key, batch or 1, st.median)
    row["gflops"] = case.cost.flops / st.median / 1e9
    row["gbs"] = case.cost.bytes / st.median / 1e9
    row["floor_frac"] = row["floor_s"] / st.median
    if not be.is_gpu and cpu_peak_flops:
        row["cpu_peak_frac"] = case.cost.flops / st.median / cpu_peak_flops
    return row


class Peers:
    """PyTorch peers by device and mode, built on first use: on the CPU ``torch-cpu`` (eager); on a GPU
    ``torch-cuda`` (eager), ``torch-graph`` (the whole step as one CUDA graph) and ``torch-compile``
    (torch.compile; by default in a full run only: it compiles for minutes). A mode that cannot be built
    is skipped with its reason (``skipped``), never silently."""

    GPU_MODES = {"torch-cuda": "eager", "torch-graph": "graph", "torch-compile": "compile"}

    def __init__(self, torch: Any, cfg: NetConfig, compile_mode: str, quick: bool) -> None:
        self.torch, self.cfg = torch, cfg
        self.compile_mode, self.quick = compile_mode, quick
        self.cache: dict[tuple[str, int], Any] = {}
        self.notes: list[str] = []
        self.skipped: list[dict[str, Any]] = []

    def kinds(self, gpu: bool) -> dict[str, str]:
        """Contender name → peer mode for a backend on the GPU (``gpu``) or the CPU."""
        if not gpu:
            return {"torch-cpu": "eager"}
        compile_on = self.compile_mode == "on" or (self.compile_mode == "auto" and not self.quick)
        return {k: m for k, m in self.GPU_MODES.items() if m != "compile" or compile_on}

    def for_backend(self, net: e2e.OurNet) -> dict[str, Any]:
        """Contender name → TorchLeNet, for the device our backend runs on."""
        if self.torch is None:
            return {}
        gpu = bool(net.backend.is_gpu) and self.torch.cuda.is_available()
        out = {}
        params = net.model.param_dict()
        for kind, mode in self.kinds(gpu).items():
            key = (kind, id(net.bench))
            if key not in self.cache:
                try:
                    self.cache[key] = peermod.TorchLeNet(
                        self.cfg, params, net.bench.images, net.bench.labels, net.bench.mean, net.bench.std,
                        device="cuda" if gpu else "cpu", lr=net.model.lr, mode=mode)
                except Exception as e:  # noqa: BLE001 - PyTorch's failure: the peer is skipped with its reason
                    self.skip(kind, None, f"could not be built ({type(e).__name__}: {e})")
                    self.cache[key] = None
            if self.cache[key] is not None:
                out[kind] = self.cache[key]
        return out

    def skip(self, kind: str, batch: int | None, reason: str) -> None:
        self.skipped.append({"peer": kind, "batch": batch, "reason": f"PyTorch peer {kind}: {reason}"})
        self.notes.append(f"{kind}{'' if batch is None else f' batch {batch}'}: {reason}")
        log(f"  peer {kind}: skipped: {reason}")


def _cycle(batch: int, n: int) -> Any:
    state = {"k": 0}
    nb = max(1, n // batch)

    def nxt() -> int:
        k = state["k"]
        state["k"] = (k + 1) % nb
        return k * batch

    return nxt


def _side(samples: list[float], batch: int) -> dict[str, Any]:
    """A contender's figures from its per-call samples: median, p20, p80, images/s, best, spread."""
    st = np.percentile(samples, [20, 50, 80])
    return {"median_s": float(st[1]), "p20_s": float(st[0]), "p80_s": float(st[2]),
            "images_per_s": batch / float(st[1]), "images_per_s_p20": batch / float(st[2]),
            "images_per_s_p80": batch / float(st[0]), "min_s": float(np.min(samples)),
            "images_per_s_best": batch / float(np.min(samples)), "spread": spread(samples)}


def bench_e2e(
    kind: str, nets: dict[str, e2e.OurNet], peers: Peers, batches: list[int], rounds: int, min_sample_s: float,
    budget: Budget,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """kind 'forward' or 'train': for each backend and batch, validate against a reference computed afresh
    from that backend's parameters, then time ours and the peers in interleaved rounds. Rows hold ours and
    each peer with images/s, spreads and ratios ours/peer. Returns (rows, skipped, failed)."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for name, net in nets.items():
        peer_map = peers.for_backend(net)
        for batch in batches:
            where = {"backend": name, "batch": batch, "section": kind}
            key = (kind, name)
            if kind == "infer-device" and not net.backend.is_gpu:
                skipped.append({**where, "reason": "no device arrays on a host backend"})
                continue
            why = budget.too_long(key, batch, rounds + 4)
            if why:
                skipped.append({**where, "reason": why})
                continue
            try:
                row = _e2e_row(kind, name, net, peer_map, peers, batch, rounds, min_sample_s, budget, key)
            except AssertionError as e:
                failed.append({**where, "error": f"FAILED validation: {e}"})
                log(f"  {name} {kind} batch {batch}: FAILED validation: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - our crash is a failure; the run goes on
                failed.append({**where, "error": f"crashed: {type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()})
                log(f"  {name} {kind} batch {batch}: CRASHED: {type(e).__name__}: {e}")
                continue
            rows.append(row)
            extra = "  ".join(
                f"{p}: {v['images_per_s']:,.0f} img/s (ours/{p} {v['ratio']['median']:.2f}"
                f"{'' if v['ratio']['reliable'] else ', unreliable'})" for p, v in row["peers"].items())
            log(f"  {kind:7s} {name:9s} b={batch:<5d} {row['images_per_s']:12,.0f} img/s  {extra}")
    return rows, skipped, failed


def _e2e_row(kind: str, name: str, net: e2e.OurNet, peer_map: dict[str, Any], peers: Peers, batch: int, rounds: int,
             min_sample_s: float, budget: Budget, key: tuple) -> dict[str, Any]:
    """One row: kind 'forward' (inference, kernel only: resident uint8 images in, logits left on the device),
    'infer-host' (inference through the API from host arrays: host uint8 in, host logits out, copies included),
    'infer-device' (through the API from device arrays: a device uint8 array in, logits of the same kind out,
    no host copy; PyTorch: its network on resident device tensors) or 'train' (a training step)."""
    host_x = np.ascontiguousarray(net.bench.images[:batch])
    dev_x = net.backend.to_device(host_x) if kind == "infer-device" else None
    if kind == "train":
        err, ref_logits = net.check_grads(batch), None
    else:
        err, ref_logits = net.check_forward(batch)
    if kind == "infer-host":  # the API path too, against the same reference
        err = max(err, e2e._rel_err(net.model.logits(host_x, batch_size=batch), ref_logits))
        if not err <= e2e.FORWARD_TOL:
            raise AssertionError(f"{name} logits(host images) at batch {batch}: off by {err:.2e} (relative)")
    if kind == "infer-device":  # the device path, against the same reference
        err = max(err, e2e._rel_err(net.backend.to_host(net.model.forward_device(dev_x)), ref_logits))
        if not err <= e2e.FORWARD_TOL:
            raise AssertionError(f"{name} logits(device images) at batch {batch}: off by {err:.2e} (relative)")
    contenders: dict[str, tuple[Any, Any]] = {}
    if kind == "forward":
        contenders[name] = (lambda n=net, b=batch: n.forward(b), net.synchronize)
    elif kind == "infer-host":
        contenders[name] = (lambda n=net, b=batch, x=host_x: n.model.logits(x, batch_size=b), net.synchronize)
    elif kind == "infer-device":
        contenders[name] = (lambda n=net, x=dev_x: n.model.logits(x), net.synchronize)
    else:
        contenders[name] = (lambda n=net, b=batch: n.train_step(b), net.synchronize)
    peer_err: dict[str, float] = {}
    for pname, pr in peer_map.items():
        nxt = _cycle(batch, net.data.n)
        if kind in ("forward", "infer-device"):  # PyTorch's API takes device tensors: its kernel-only path
            fn = lambda p=pr, b=batch, nx=nxt: p.forward(nx(), b)  # noqa: E731
        elif kind == "infer-host":
            fn = lambda p=pr, x=host_x: p.logits_from_host(x)  # noqa: E731
        else:
            fn = lambda p=pr, b=batch, nx=nxt: p.train_step(nx(), b)  # noqa: E731
        try:
            if ref_logits is not None:
                # the peer is the same network: given our parameters, its logits match the same reference
                pr.set_parameters(net.model.param_dict())
                got = pr.logits(0, batch) if kind != "infer-host" else pr.logits_from_host(host_x)
                peer_err[pname] = e2e._rel_err(got, ref_logits)
            fn()  # a first call (compiles, captures) outside the timed rounds: a mode that fails is skipped
            pr.synchronize()
        except Exception as e:  # noqa: BLE001 - PyTorch's failure, not ours
            peers.skip(pname, batch, f"failed at {kind} batch {batch} ({type(e).__name__}: {str(e).splitlines()[0]})")
            continue
        contenders[pname] = (fn, pr.synchronize)
    res = e2e.interleaved(contenders, rounds, min_sample_s)
    samples = res["samples"]
    spc = net.steps_per_call if kind == "train" else 1
    if spc > 1:  # a call was one graph of spc steps: per-step figures, as the peer's
        samples[name] = [t / spc for t in samples[name]]
    ours = samples[name]
    row: dict[str, Any] = {"backend": name, "batch": batch, "validation_rel_err": err, "rounds": rounds,
                           "number": res["numbers"][name], "steps_per_call": spc, **_side(ours, batch), "peers": {}}
    budget.record(key, batch, row["median_s"])
    if kind != "train":
        row["gflops"] = forward_flops(net.cfg) * batch / row["median_s"] / 1e9
    for pname in contenders:
        if pname == name:
            continue
        theirs = samples[pname]
        row["peers"][pname] = {
            **_side(theirs, batch), "number": res["numbers"][pname],
            "ratio_best": float(np.min(theirs) / np.min(ours)),
            "ratio": e2e.ratio_stats(ours, theirs),
            **({"validation_rel_err": peer_err[pname]} if pname in peer_err else {}),
        }
    if row["peers"]:  # the headline: ours against the fastest PyTorch mode at this batch
        fastest = max(row["peers"], key=lambda p: row["peers"][p]["images_per_s"])
        row["fastest_peer"] = fastest
    return row


def bench_epochs(
    backends: dict[str, Any], cfg: NetConfig, ds: Any, torch: Any, args: argparse.Namespace, settings: dict[str, Any],
    train_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    recipe = e2e.default_recipe(ds.name)
    n = args.epoch_samples or ds.train_images.shape[0]
    tr_x, tr_y = ds.train_images[:n], ds.train_labels[:n]
    max_epochs = args.epochs or settings["max_epochs"] or int(recipe["epochs"])
    target = args.target_acc if args.target_acc is not None else settings["target_acc"]
    out: dict[str, Any] = {"dataset": ds.name, "train_images": int(n), "test_images": int(ds.test_images.shape[0]),
                           "recipe": recipe, "max_epochs": max_epochs, "target_acc": target, "runs": {}, "skipped": []}
    steps = n // min(int(recipe["batch_size"]), n)
    for name, be in backends.items():
        per_step = next((r["median_s"] for r in train_rows
                         if r["backend"] == name and r["batch"] == recipe["batch_size"]), None)
        if per_step is not None and per_step * steps * max_epochs > settings["epoch_budget_s"]:
            out["skipped"].append({"backend": name, "reason": f"estimated {per_step * steps * max_epochs:.0f} s > "
                                                             f"{settings['epoch_budget_s']:.0f} s budget"})
            continue
        if per_step is None and not be.is_gpu and name != "numpy":
            out["skipped"].append({"backend": name,
                                   "reason": "no training-step timing to estimate from (slow backend)"})
            continue
        log(f"epochs: {name} ...")
        runner = e2e.OurEpochRunner(be, cfg, tr_x, tr_y, recipe)
        init = runner.model.param_dict()
        out["runs"][name] = e2e.epochs_to_accuracy(tr_x, tr_y, ds.test_images, ds.test_labels, runner, recipe,
                                                   max_epochs, target)
        if torch is not None and not args.no_peer and "torch-" + ("cuda" if be.is_gpu else "cpu") not in out["runs"]:
            pname = "torch-" + ("cuda" if be.is_gpu and torch.cuda.is_available() else "cpu")
            pr = peermod.TorchLeNet(cfg, init, tr_x, tr_y, runner.model.mean, runner.model.std,
                                    device="cuda" if pname == "torch-cuda" else "cpu", lr=float(recipe["lr"]))
            log(f"epochs: {pname} ...")
            out["runs"][pname] = e2e.epochs_to_accuracy(tr_x, tr_y, ds.test_images, ds.test_labels,
                                                        e2e.TorchEpochRunner(pr, recipe), recipe, max_epochs, target)
    return out


def bench_counters(nets: dict[str, e2e.OurNet], batch: int, budget: Budget) -> dict[str, Any]:
    """Counters at ``batch``; a slow backend (estimated > 5× the per-case budget, at least 60 s) is skipped."""
    out: dict[str, Any] = {"batch": batch, "backends": {}, "skipped": [], "failed": []}
    lenient = Budget(max(60.0, 5 * budget.max_case_s))
    lenient.last = budget.last
    for name, net in nets.items():
        why = lenient.too_long(("train", name), batch, 8) or lenient.too_long(("forward", name), batch, 8)
        if why:
            out["skipped"].append({"backend": name, "reason": why})
            continue
        try:
            out["backends"][name] = e2e.counters_for(net, batch)
        except Exception as e:  # noqa: BLE001 - a crash is a failure of the run, listed with the others
            out["failed"].append({"backend": name, "error": f"crashed: {type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()})
    return out


def bench_profile(nets: dict[str, e2e.OurNet], batches: list[int], torch: Any, tcfg: TimingConfig,
                  budget: Budget) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Where a training step's time goes, per backend and training batch (lenet_gpu.perf.profile.profile_net):
    CUPTI's device µs per kernel inside the graphed step on a GPU with PyTorch, else each op call of the step
    recorded once and replayed on its own (CUDA events on a GPU, the CPU clock on a host backend), summed against
    the step's wall time. A replay repeats the optimizer on the net's parameters: it runs after the sections that
    time training. A backend whose step is estimated past the budget is skipped."""
    from lenet_gpu.perf.profile import profile_net

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    lenient = Budget(max(30.0, 3 * budget.max_case_s))
    lenient.last = budget.last
    for name, net in nets.items():
        for b in batches:
            where = {"section": "profile", "backend": name, "batch": b}
            why = lenient.too_long(("train", name), b, 30)  # ~10 timed calls of each of a step's ops, and the step
            if why:
                skipped.append({**where, "reason": why})
                continue
            try:
                prof = profile_net(net, "train", b, torch, tcfg)
            except Exception as e:  # noqa: BLE001 - a crash is a failure of the run, listed with the others
                failed.append({**where, "error": f"crashed: {type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()})
                log(f"  profile {name} b={b}: CRASHED: {type(e).__name__}: {e}")
                continue
            rows.append({"backend": name, "batch": b, **prof})
            log(f"  profile {name:9s} b={b:<5d} {prof['device_us_sum']:10.1f} µs in the rows, a step "
                f"{prof['wall_us']:.1f} µs; top: {prof['top3']}")
    return rows, skipped, failed


# ---------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(QUICK if args.quick else FULL)
    if args.batches:
        settings["batches"] = args.batches
    if args.train_batches:
        settings["train_batches"] = args.train_batches
    if args.rounds:
        settings["rounds"] = args.rounds
    if args.max_case_s:
        settings["max_case_s"] = args.max_case_s
    if args.host:
        args.sections = ["host"]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench.run: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = NetConfig(activation=args.activation, pool=args.pool)
    names = args.backends or [b for b in BACKENDS if b != "auto"]
    argv = sys.argv[1:] if args._from_cli else args._argv
    started = _dt.datetime.now(_dt.timezone.utc)
    log(f"bench: {' '.join(sys.argv)}  (out {args.out})")
    waited = wait_for_quiet(args.wait_quiet, log=log) if args.wait_quiet > 0 else None
    monitor = LoadMonitor()
    monitor.start()

    backends, binfo = open_backends(names, named=bool(args.backends))
    if args.single_thread and any(be.is_gpu for be in backends.values()):
        raise SystemExit("bench.run: --single-thread measures CPU time: use it for CPU backends only")
    torch = None if args.no_peer else peermod.torch_or_none()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    set_clock("cpu" if args.single_thread else "wall")
    if torch is not None:
        torch.set_num_threads(1 if args.single_thread else (args.torch_threads or usable))
    tcfg = TimingConfig(target_s=settings["target_s"], min_samples=args.min_samples,
                        max_samples=max(args.min_samples, 50))
    budget = Budget(settings["max_case_s"])
    results: dict[str, Any] = {
        "schema": 1,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *(shlex.quote(a) for a in argv)]),
        "machine": machine_info(),
        "settings": {**settings, "clock": clock_name(), "single_thread": bool(args.single_thread),
                     "sections": args.sections, "ops": args.ops, "activation": cfg.activation,
                     "pool": cfg.pool, "f6": cfg.f6, "timing": tcfg.__dict__},
        "peaks": {"h100_fp32_flops": opsmod.H100_FP32_FLOPS, "h100_hbm_bytes_per_s": opsmod.H100_HBM_BYTES_PER_S,
                  "note": opsmod.H100_NOTE, "cpu_fp32": cpu_fp32_peak()},
        "backends": binfo,
        "torch": peermod.torch_info(torch) if torch is not None else None,
        "torch_note": None if torch is not None else
        ("--no-peer given" if args.no_peer else "PyTorch is not installed: no peer figures"),
        "skipped": [],
        # every failure of the run: a case that crashed or failed its validation, a section that raised, a
        # backend that broke on construction. Any entry makes the exit status 1 and heads the report.
        "errors": [{"section": "backends", "backend": b, "error": i["reason"], "traceback": i.get("traceback")}
                   for b, i in binfo.items() if i.get("failed")],
    }

    def section(name: str, fn: Any) -> None:
        if name not in args.sections:
            return
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            results["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()})
            log(f"section {name} failed: {e}")
        log(f"== {name} done in {time.perf_counter() - t0:.1f} s")

    def do_ops() -> None:
        peak = results["peaks"]["cpu_fp32"]
        rows, skipped, failed = bench_ops(backends, cfg, settings["batches"], args.ops, tcfg, budget,
                                          peak["flops"] if peak else None)
        results["ops"] = rows
        results["skipped"] += [{"section": "ops", **s} for s in skipped]
        results["errors"] += [{"section": "ops", **f} for f in failed]

    ds = None
    nets: dict[str, e2e.OurNet] = {}
    peers = Peers(torch, cfg, args.torch_compile, args.quick)

    def need_nets() -> None:
        nonlocal ds
        if nets or not backends:
            return
        from lenet_gpu import load_dataset

        ds = load_dataset(args.dataset, progress=False)
        n = max([*settings["batches"], *settings["train_batches"], ds.train_images.shape[0]])
        data = e2e.BenchData.from_dataset(ds.train_images, ds.train_labels, n)
        results["dataset"] = {"name": ds.name, "source": ds.source, "images_resident": int(data.images.shape[0]),
                              "mean": data.mean, "std": data.std}
        for name, be in backends.items():
            nets[name] = e2e.OurNet(be, cfg, data)

    def do_e2e(kind: str) -> None:
        need_nets()
        b = settings["train_batches"] if kind == "train" else settings["batches"]
        rows, skipped, failed = bench_e2e(kind, nets, peers, b, settings["rounds"], settings["min_sample_s"], budget)
        results[kind] = rows
        results["skipped"] += skipped
        results["errors"] += failed

    def do_counters() -> None:
        need_nets()
        results["counters"] = bench_counters(nets, min(settings["train_batches"]), budget)
        results["errors"] += [{"section": "counters", **f} for f in results["counters"].pop("failed")]

    def do_profile() -> None:
        need_nets()
        rows, skipped, failed = bench_profile(nets, settings["train_batches"], torch, tcfg, budget)
        results["profile"] = rows
        results["skipped"] += skipped
        results["errors"] += failed

    def do_epochs() -> None:
        need_nets()
        if ds is None:
            return
        results["epoch"] = bench_epochs(backends, cfg, ds, None if args.no_peer else torch, args, settings,
                                        results.get("train", []))

    def do_kernels() -> None:
        # built in this run (NVRTC + ptxas over every kernel), never read from an older report
        results["kernels"] = kernels_mod.load_kernel_table(build=True)
        # the fill table: every launch of a training step and an inference pass, both GPU backends
        from .launches import fill_records, fill_summary

        batches = (64, 256) if args.quick else (64, 128, 256, 1024)
        try:
            rows, notes = fill_records(("cupy", "numba"), batches)
        except Exception as e:  # noqa: BLE001 - the table is optional: say why it is missing
            rows, notes = [], [f"fill table failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
        results["fill"] = {"rows": rows, "summary": fill_summary(rows), "notes": notes}

    section("ops", do_ops)
    section("forward", lambda: do_e2e("forward"))
    section("infer-host", lambda: do_e2e("infer-host"))
    section("infer-device", lambda: do_e2e("infer-device"))
    section("train", lambda: do_e2e("train"))
    section("counters", do_counters)
    section("profile", do_profile)
    section("epoch", do_epochs)
    section("kernels", do_kernels)
    section("host", lambda: results.__setitem__("host", host_mod.bench_host(quick=args.quick)))
    results["peer_notes"] = peers.notes
    results["skipped"] += [{"section": "peer", **sk} for sk in peers.skipped]
    results["load"] = monitor.stop()
    results["load"]["wait_quiet"] = waited
    results["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results["wall_s"] = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
    return results


SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.single_thread and argv is None and any(os.environ.get(k) != v for k, v in SINGLE_THREAD_ENV.items()):
        # BLAS thread pools are sized when NumPy is imported: start again with the variables set
        os.execve(sys.executable, [sys.executable, "-m", "bench.run", *sys.argv[1:]],
                  {**os.environ, **SINGLE_THREAD_ENV})
    args._from_cli = argv is None
    args._argv = list(argv or [])
    results = run(args)
    paths = write_all(results, args.out, plots=not args.no_plots)
    log(f"wrote {', '.join(str(p) for p in paths)}")
    if results["load"]["busy"]:
        log(f"note: the machine was {results['load']['note']}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
