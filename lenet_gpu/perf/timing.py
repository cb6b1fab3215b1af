"""Timing done right, on the CPU and on a GPU.

- CPU backends (numpy, cupy-host, the Numba simulator) and end-to-end throughput: ``time.perf_counter``
  around ``number`` calls followed by ``backend.synchronize()``, after warm-up; ``number`` is chosen so
  a sample lasts at least ``min_sample_s`` (timer resolution and call overhead amortised).
- GPU backends, per op: device events recorded on the backend's stream around each launch, after
  warm-up, with the L2 cache flushed before every repeat (a write of 2× the L2 size, repeated so the
  device is still busy flushing while the host enqueues the launch: host launch overhead stays out of
  the event interval). A second figure, ``hot``, times ``number`` back-to-back launches with one pair of
  events (warm L2, launch-rate bound at small sizes).
- Statistics: median with p20/p80 over the samples.
- Machine load: the CPU time other processes used during the run (from /proc/stat minus this
  process's own CPU time), the hypervisor's steal, and a fixed calibration workload timed at the start
  and the end; a run is flagged busy when one of them says so. The load average is shown as context.
- The CPU's FP32 peak, estimated from /proc/cpuinfo (``cpu_fp32_peak``): what a CPU backend's
  GFLOP/s are compared with (a GPU backend's are compared with an H100's floor, bench/ops.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The clock of CPU measurements: "wall" (time.perf_counter, default) or "cpu" (time.process_time: the
#: CPU time of this process, all its threads; with one thread everywhere it is what the work costs,
#: whatever else the machine is running — the figure to use on a shared, busy machine).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"name": "wall", "fn": time.perf_counter}


def set_clock(name: str) -> None:
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}")
    _clock["name"], _clock["fn"] = name, CLOCKS[name]


def clock_name() -> str:
    return _clock["name"]


def now() -> float:
    """The current reading of the CPU-measurement clock (see set_clock)."""
    return _clock["fn"]()


@dataclass
class Stats:
    """Seconds per call: median, p20, p80 over ``n`` samples."""

    median: float
    p20: float
    p80: float
    n: int
    number: int  # calls per sample

    def to_dict(self, prefix: str = "", unit: str = "s") -> dict[str, float | int]:
        """median, p20, p80 in seconds (``unit`` "s") or microseconds rounded to ns ("us"), samples, number."""
        conv = (lambda v: v) if unit == "s" else (lambda v: round(v * 1e6, 3))
        out: dict[str, float | int] = {f"{prefix}{k}_{unit}": conv(getattr(self, k)) for k in ("median", "p20", "p80")}
        return {**out, f"{prefix}samples": self.n, f"{prefix}number": self.number}

    def to_us(self, prefix: str = "") -> dict[str, float | int]:
        """The same in microseconds (the self-test's tables)."""
        return self.to_dict(prefix, "us")


#: A ratio of two timings is reliable when each side's p20–p80 spread is at most this fraction of its median.
RATIO_MAX_SPREAD = 0.25


def spread(samples: list[float] | np.ndarray) -> float:
    """(p80 − p20) / median of a set of timings: how much repeated rounds of one measurement disagree."""
    p20, med, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
    return float((p80 - p20) / med) if med > 0 else float("inf")


def summarize(per_call: list[float] | np.ndarray, number: int = 1) -> Stats:
    """Median, p20 and p80 of per-call times."""
    a = np.asarray(per_call, dtype=np.float64)
    p20, med, p80 = np.percentile(a, [20, 50, 80])
    return Stats(float(med), float(p20), float(p80), int(a.size), int(number))


@dataclass
class TimingConfig:
    """How long to measure: warm-up time, samples (min..max) and the time budget per measurement."""

    warmup_s: float = 0.05
    min_warmup: int = 1
    min_samples: int = 5
    max_samples: int = 50
    target_s: float = 0.5  # total time of the timed samples
    min_sample_s: float = 1e-3  # a CPU sample lasts at least this long (number of calls per sample)


# ---------------------------------------------------------------------------------------- CPU timer


class CpuTimer:
    """perf_counter around ``number`` calls + ``backend.synchronize()`` (also used for GPU end to end)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.kind = "perf_counter" if clock_name() == "wall" else "process_time"

    def sample(self, fn: Callable[[], None], number: int = 1) -> float:
        """Seconds for ``number`` calls (synchronized at the end)."""
        t0 = now()
        for _ in range(number):
            fn()
        self.sync()
        return now() - t0

    def measure(self, fn: Callable[[], None], cfg: TimingConfig) -> Stats:
        """Warm up, pick ``number``, take samples until ``cfg.target_s`` (within min..max samples)."""
        t_call = _warmup(self.sample, fn, cfg)
        number = max(1, int(np.ceil(cfg.min_sample_s / max(t_call, 1e-9)))) if t_call < cfg.min_sample_s else 1
        samples: list[float] = []
        t_end = time.perf_counter() + cfg.target_s
        while len(samples) < cfg.max_samples and (len(samples) < cfg.min_samples or time.perf_counter() < t_end):
            samples.append(self.sample(fn, number) / number)
        return summarize(samples, number)


def _warmup(sample: Callable[[Callable[[], None], int], float], fn: Callable[[], None], cfg: TimingConfig) -> float:
    """Run ``fn`` at least ``cfg.min_warmup`` times and for ``cfg.warmup_s``; return the last call's time."""
    t_call, k = 0.0, 0
    t0 = time.perf_counter()
    while k < cfg.min_warmup or time.perf_counter() - t0 < cfg.warmup_s:
        t_call = sample(fn, 1)
        k += 1
        if k >= 1000:
            break
    return t_call


# ---------------------------------------------------------------------------------------- GPU timer


def gpu_library(backend: Any) -> str | None:
    """Which CUDA library owns the backend's arrays: 'cupy', 'numba' or None (not a GPU backend)."""
    if not getattr(backend, "is_gpu", False):
        return None
    probe = backend.empty((1,))
    mod = type(probe).__module__
    if mod.startswith("cupy"):
        return "cupy"
    if mod.startswith("numba"):
        return "numba"
    return None


def backend_stream(backend: Any) -> Any:
    """The stream a backend launches on: ``backend.stream`` or ``backend.runtime.stream`` (None: default)."""
    for owner in (backend, getattr(backend, "runtime", None)):
        stream = getattr(owner, "stream", None)
        if stream is not None:
            return stream
    return None


class GpuEventTimer:
    """Device events around each launch on the backend's stream, L2 flushed before every repeat."""

    kind = "cuda-events"

    def __init__(self, backend: Any, lib: str, flush_passes: int = 4) -> None:
        self.backend = backend
        self.lib = lib
        self.flush_passes = flush_passes
        stream = backend_stream(backend)
        if lib == "cupy":
            import cupy as cp

            self._cp = cp
            self.stream = stream if stream is not None else cp.cuda.get_current_stream()
            try:
                self.l2_bytes = int(cp.cuda.Device().attributes.get("L2CacheSize") or 50 * 2**20)
            except Exception:  # noqa: BLE001 - fall back to the H100's 50 MB
                self.l2_bytes = 50 * 2**20
            self._flush_buf = cp.empty(2 * self.l2_bytes, dtype=cp.uint8)
        else:
            from numba import cuda

            self._cuda = cuda
            self.stream = stream if stream is not None else cuda.default_stream()
            try:
                self.l2_bytes = int(cuda.get_current_device().L2_CACHE_SIZE)
            except Exception:  # noqa: BLE001 - fall back to the H100's 50 MB
                self.l2_bytes = 50 * 2**20
            self._flush_src = cuda.device_array(2 * self.l2_bytes, dtype=np.uint8, stream=self.stream)
            self._flush_dst = cuda.device_array(2 * self.l2_bytes, dtype=np.uint8, stream=self.stream)

    @property
    def flush_bytes(self) -> int:
        return 2 * self.l2_bytes

    def flush(self) -> None:
        """Write 2× L2 (``flush_passes`` times) on the timing stream."""
        for _ in range(self.flush_passes):
            if self.lib == "cupy":
                with self.stream:
                    self._flush_buf.fill(1)
            else:
                self._flush_dst.copy_to_device(self._flush_src, stream=self.stream)

    def _events(self) -> tuple[Any, Any]:
        if self.lib == "cupy":
            return self._cp.cuda.Event(), self._cp.cuda.Event()
        try:
            return self._cuda.event(timing=True), self._cuda.event(timing=True)
        except TypeError:  # the CUDA simulator's Event takes no arguments
            return self._cuda.event(), self._cuda.event()

    def _record(self, ev: Any) -> None:
        if self.lib == "cupy":
            ev.record(self.stream)
        else:
            ev.record(stream=self.stream)

    def _elapsed_s(self, a: Any, b: Any) -> float:
        b.synchronize()
        if self.lib == "cupy":
            return float(self._cp.cuda.get_elapsed_time(a, b)) * 1e-3
        return float(a.elapsed_time(b)) * 1e-3

    def sample(self, fn: Callable[[], None], number: int = 1, flush: bool = False) -> float:
        if flush:
            self.flush()
        a, b = self._events()
        self._record(a)
        for _ in range(number):
            fn()
        self._record(b)
        return self._elapsed_s(a, b)

    def measure(self, fn: Callable[[], None], cfg: TimingConfig) -> tuple[Stats, Stats]:
        """(cold: one launch per sample after an L2 flush, hot: back-to-back launches)."""
        _warmup(lambda f, n: self.sample(f, n), fn, cfg)
        cold: list[float] = []
        t_end = time.perf_counter() + cfg.target_s / 2
        while len(cold) < cfg.max_samples and (len(cold) < cfg.min_samples or time.perf_counter() < t_end):
            cold.append(self.sample(fn, 1, flush=True))
        t1 = max(float(np.median(cold)), 1e-6)  # at least 1 µs (a launch) whatever the events say
        number = max(1, min(1000, int(np.ceil(1e-3 / t1))))
        hot: list[float] = []
        t_end = time.perf_counter() + cfg.target_s / 2
        while len(hot) < cfg.max_samples and (len(hot) < cfg.min_samples or time.perf_counter() < t_end):
            hot.append(self.sample(fn, number) / number)
        return summarize(cold, 1), summarize(hot, number)


def make_timer(backend: Any) -> CpuTimer | GpuEventTimer:
    """Device events (L2 flushed) on a GPU backend, the CPU clock around calls + synchronize otherwise."""
    lib = gpu_library(backend)
    return GpuEventTimer(backend, lib) if lib else CpuTimer(backend.synchronize)


def measure_us(timer: CpuTimer | GpuEventTimer, fn: Callable[[], None], cfg: TimingConfig) -> dict[str, Any]:
    """``timer.measure`` in microseconds: median, p20, p80 (a GPU timer: cold, and hot_ for back to back)."""
    if isinstance(timer, GpuEventTimer):
        cold, hot = timer.measure(fn, cfg)
        return {"clock": timer.kind, **cold.to_us(), **hot.to_us("hot_")}
    return {"clock": timer.kind, **timer.measure(fn, cfg).to_us()}


# ---------------------------------------------------------------------------------------- machine load


def _proc_stat_busy() -> tuple[float, float, float] | None:
    """(busy, total, steal) CPU seconds of the whole machine since boot, from /proc/stat. Steal is time the
    hypervisor gave this machine's virtual CPUs to someone else (it is not counted as busy)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [float(v) for v in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
    steal = vals[7] if len(vals) > 7 else 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(vals) - idle - steal) / hz, sum(vals) / hz, steal / hz


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def busy_fraction(window_s: float = 2.0) -> float | None:
    """Fraction of the machine's CPUs that other processes kept busy over the next ``window_s``."""
    a, own0, t0 = _proc_stat_busy(), _own_cpu_s(), time.perf_counter()
    if a is None:
        return None
    time.sleep(window_s)
    b = _proc_stat_busy()
    if b is None:
        return None
    wall = time.perf_counter() - t0
    return max(0.0, (b[0] - a[0] - (_own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, log: Callable[[str], None] | None = None) -> dict:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` of the CPUs."""
    t0 = time.perf_counter()
    frac = busy_fraction()
    while frac is not None and frac >= threshold and time.perf_counter() - t0 < max_wait_s:
        if log:
            log(f"waiting for a quiet machine: other processes use {frac:.0%} of the CPUs")
        time.sleep(5.0)
        frac = busy_fraction()
    return {"waited_s": time.perf_counter() - t0, "busy_fraction_at_start": frac,
            "quiet": frac is not None and frac < threshold}


def calibration_s(repeats: int = 5) -> float:
    """Median time of a fixed workload (a 256×256 float32 matmul chain plus a Python loop)."""
    a = np.full((256, 256), 1.0 / 256, dtype=np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        b = a
        for _ in range(20):
            b = b @ a
        s = 0
        for i in range(50_000):
            s += i
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class LoadMonitor:
    """Whether other work competed with this run, measured during it: other processes' CPU time and the
    hypervisor's steal (both from /proc/stat, this process excluded), and a calibration workload timed at
    start and end. The load average before the run is reported beside them, as context only: it is a
    decaying average of runnable and waiting tasks, and can be high while nothing else runs."""

    BUSY_OTHER_FRAC = 0.10  # other processes used more than 10 % of the machine's CPU
    BUSY_STEAL_FRAC = 0.10  # the hypervisor took more than 10 % of the CPU time
    BUSY_CALIBRATION = 0.10  # the calibration workload changed by more than 10 %

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._stat0 = _proc_stat_busy()
        self._own0 = _own_cpu_s()
        self.result = {
            "loadavg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "calibration_start_s": calibration_s(),
        }

    def stop(self) -> dict[str, Any]:
        r = self.result
        r["calibration_end_s"] = calibration_s()
        r["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        wall = time.perf_counter() - self._t0
        stat1 = _proc_stat_busy()
        ncpu = os.cpu_count() or 1
        other = steal = None
        if self._stat0 is not None and stat1 is not None and wall > 0:
            own = _own_cpu_s() - self._own0
            other = max(0.0, (stat1[0] - self._stat0[0] - own) / (wall * ncpu))
            steal = max(0.0, (stat1[2] - self._stat0[2]) / (wall * ncpu))
        r["wall_s"] = wall
        r["other_processes_cpu_frac"] = other
        r["steal_cpu_frac"] = steal
        drift = r["calibration_end_s"] / r["calibration_start_s"] - 1.0
        r["calibration_drift"] = drift
        r["busy"], r["note"] = load_verdict(other, steal, drift, r["loadavg_before"], ncpu)
        return r


def load_verdict(
    other: float | None, steal: float | None, drift: float, loadavg: list[float] | None, ncpu: int
) -> tuple[bool, str]:
    """(busy, one sentence): busy when a measure taken during the run says so; the sentence gives the
    measures that decided, and never calls a run busy or quiet against its own figures."""
    reasons = []
    if other is not None and other > LoadMonitor.BUSY_OTHER_FRAC:
        reasons.append(f"other processes used {other:.0%} of the {ncpu} CPUs during the run")
    if steal is not None and steal > LoadMonitor.BUSY_STEAL_FRAC:
        reasons.append(f"the hypervisor took {steal:.0%} of the CPU time (steal)")
    if abs(drift) > LoadMonitor.BUSY_CALIBRATION:
        reasons.append(f"a fixed calibration workload took {drift:.0%} longer at the end than at the start"
                       if drift > 0 else f"a fixed calibration workload took {-drift:.0%} less time at the end "
                       "than at the start")
    measured = []
    if other is not None and other <= LoadMonitor.BUSY_OTHER_FRAC:
        measured.append(f"other processes used {other:.0%} of the {ncpu} CPUs")
    if steal is not None and steal <= LoadMonitor.BUSY_STEAL_FRAC and steal > 0.005:
        measured.append(f"steal {steal:.0%}")
    context = ""
    if loadavg is not None and loadavg[0] > 0.5 * ncpu and not reasons:
        context = (f" (the 1-minute load average was {loadavg[0]:.2f} on {ncpu} CPUs before the run, but that "
                   "counts waiting tasks and decays slowly; the measures above, taken during the run, decide)")
    if reasons:
        return True, "busy: " + "; ".join(reasons)
    what = ", ".join(measured) if measured else "no other load measured"
    return False, f"quiet: {what}, calibration drift {drift:+.0%}{context}"


# ---------------------------------------------------------------------------------------- CPU peak


def _cpuinfo_fields(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), []).append(v.strip())
    return fields


def _cpu_id(cpuinfo: str) -> tuple[str, int, int]:
    """(vendor, family, model) of the first CPU in /proc/cpuinfo's text."""
    f = _cpuinfo_fields(cpuinfo)

    def num(key: str) -> int:
        try:
            return int((f.get(key) or ["0"])[0], 0)
        except ValueError:
            return 0

    return (f.get("vendor_id") or [""])[0], num("cpu family"), num("model")


def zen1_datapath(cpuinfo: str) -> bool:
    """AMD Zen 1 or Zen+ (family 0x17 below model 0x30; Hygon Dhyana, family 0x18): 128-bit FP units, which split each
    256-bit operation into two halves. Zen 2 (family 0x17 from model 0x30) has 256-bit units."""
    vendor, family, model = _cpu_id(cpuinfo)
    return (vendor == "AuthenticAMD" and family == 0x17 and model < 0x30) or (vendor == "HygonGenuine"
                                                                              and family == 0x18)


def fma_latency_cycles(cpuinfo: str) -> int:
    """The latency of a dependent FP32 FMA in cycles: 5 on AMD family 0x17 (Zen 1, Zen+, Zen 2), Hygon and Intel's
    Haswell and Broadwell; 4 on Zen 3 and 4 and on Intel since Skylake (the published figures)."""
    vendor, family, model = _cpu_id(cpuinfo)
    if vendor in ("AuthenticAMD", "HygonGenuine") and family in (0x17, 0x18):
        return 5
    if vendor == "GenuineIntel" and family == 6 and model in (0x3C, 0x3F, 0x45, 0x46, 0x3D, 0x47, 0x4F, 0x56):
        return 5
    return 4


def _max_freq_ghz() -> tuple[float | None, str]:
    """The highest clock the kernel reports (cpufreq's cpuinfo_max_freq), if it reports one."""
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().split()[0])
        return khz / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError, IndexError):
        return None, ""


def cpu_fp32_peak(
    cpuinfo: str | None = None, usable_cpus: int | None = None, max_ghz: float | None = None
) -> dict[str, Any] | None:
    """An **estimate** of the FP32 peak of the CPUs this process may use, from /proc/cpuinfo:

        peak = cores × FMA units per core × SIMD lanes (FP32) × 2 (an FMA is 2 FLOPs) × GHz

    - cores: the usable logical CPUs × (``cpu cores`` / ``siblings``): SMT siblings share a core's units;
    - SIMD lanes: 16 with ``avx512f``, 8 with ``avx``/``avx2``, 4 with SSE;
    - FMA units: 2 where there is ``fma`` (Intel since Haswell, AMD Zen); AMD's 512-bit operations issue
      on its two 256-bit units together (Zen 4), counted as 16 lanes × 1 unit; without ``fma``, 1 (an
      add and a multiply pipe, the same 2 FLOPs a cycle); AMD Zen 1 and Zen+ (``zen1_datapath``: family 0x17
      below model 0x30, and Hygon's family 0x18) split a 256-bit operation into two halves on 128-bit units,
      counted as 4 lanes;
    - GHz: cpufreq's maximum when the kernel exposes it, else the highest ``cpu MHz`` (the current
      clock: turbo above it is not counted).

    Real chips vary (some Xeons have one 512-bit unit; clocks drop under AVX-512), hence an estimate:
    it says what fraction of the machine's arithmetic a kernel uses, within a factor of about two.
    Returns None when /proc/cpuinfo cannot be read or lacks what the formula needs (not Linux x86).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    f = _cpuinfo_fields(cpuinfo)
    flags = set((f.get("flags") or [""])[0].split())
    mhz = [float(v) for v in f.get("cpu MHz", []) if v.replace(".", "", 1).isdigit()]
    if not flags or not (mhz or max_ghz):
        return None
    if usable_cpus is None:
        usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        smt = max(1, int(f["siblings"][0]) // max(1, int(f["cpu cores"][0])))
    except (KeyError, ValueError, IndexError):
        smt = 1
    cores = max(1.0, usable_cpus / smt)
    amd = (f.get("vendor_id") or [""])[0] == "AuthenticAMD"
    if "avx512f" in flags:
        isa, lanes, units = "AVX-512", 16, (1 if amd else 2)
    elif "avx" in flags or "avx2" in flags:
        isa, lanes, units = ("AVX2" if "avx2" in flags else "AVX"), 8, (2 if "fma" in flags else 1)
        if zen1_datapath(cpuinfo):
            isa, lanes = isa + " on 128-bit units", 4
    else:
        isa, lanes, units = "SSE", 4, 1
    if "fma" not in flags and isa != "SSE":
        units = 1
    clock_src = ""
    if max_ghz is None:
        max_ghz, clock_src = _max_freq_ghz()
    if max_ghz is None:
        max_ghz, clock_src = max(mhz) / 1e3, "/proc/cpuinfo cpu MHz (current clock)"
    flops = cores * units * lanes * 2 * max_ghz * 1e9
    cores_txt = f"{cores:g}" + (f" (of {usable_cpus} logical CPUs, {smt} per core)" if smt > 1 else "")
    return {
        "flops": flops, "cores": cores, "fma_units": units, "simd_lanes": lanes, "isa": isa, "ghz": max_ghz,
        "clock_source": clock_src or "given",
        "formula": f"{cores_txt} cores × {units} FMA unit{'s' if units > 1 else ''} × {lanes} FP32 lanes ({isa}) "
                   f"× 2 × {max_ghz:.2f} GHz = {flops / 1e9:,.0f} GFLOP/s",
        "note": "an estimate from /proc/cpuinfo (flags, clock), not a measured or datasheet figure",
    }
