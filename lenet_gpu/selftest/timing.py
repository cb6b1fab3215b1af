"""Timers for the self-test's benchmark phase, in the package so the self-test runs where bench/ is absent.

- GPU backends: device events on the backend's stream around the launches, after warm-up. ``cold``: one
  launch per sample after the L2 cache is flushed (a write of 2× its size on the same stream); ``hot``:
  many back-to-back launches per sample (warm L2; bound by the launch rate at small sizes).
- CPU backends (the emulators, numpy): perf_counter around ``number`` calls and a synchronize.
- Statistics: median with p20/p80 over the samples, in microseconds.

(bench/timing.py is the full benchmark's timer with machine-load monitoring; this is the part the
self-test needs.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def summarize_us(per_call_s: list[float], number: int) -> dict[str, float | int]:
    a = np.asarray(per_call_s, dtype=np.float64) * 1e6
    p20, med, p80 = np.percentile(a, [20, 50, 80])
    return {"median_us": round(float(med), 3), "p20_us": round(float(p20), 3), "p80_us": round(float(p80), 3),
            "samples": int(a.size), "number": int(number)}


def gpu_library(backend: Any) -> str | None:
    """'cupy' or 'numba' for a GPU backend (by the type of its arrays); None otherwise."""
    if not getattr(backend, "is_gpu", False):
        return None
    mod = type(backend.empty((1,))).__module__
    return "cupy" if mod.startswith("cupy") else ("numba" if mod.startswith("numba") else None)


def _stream(backend: Any) -> Any:
    for owner in (backend, getattr(backend, "runtime", None)):
        s = getattr(owner, "stream", None)
        if s is not None:
            return s
    return None


class WallTimer:
    """perf_counter around ``number`` calls followed by the backend's synchronize."""

    kind = "perf_counter"

    def __init__(self, backend: Any) -> None:
        self.sync = backend.synchronize

    def _sample(self, fn: Callable[[], None], number: int) -> float:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        self.sync()
        return time.perf_counter() - t0

    def measure(self, fn: Callable[[], None], target_s: float = 0.2, min_samples: int = 3,
                max_samples: int = 30, warmup: int = 2) -> dict[str, Any]:
        t1 = 0.0
        for _ in range(max(1, warmup)):  # warm-up (compiles, first-call allocations)
            t1 = self._sample(fn, 1)
        number = max(1, int(1e-3 / max(t1, 1e-9))) if t1 < 1e-3 else 1
        samples: list[float] = []
        t_end = time.perf_counter() + target_s
        while len(samples) < max_samples and (len(samples) < min_samples or time.perf_counter() < t_end):
            samples.append(self._sample(fn, number) / number)
        return {"clock": self.kind, **summarize_us(samples, number)}


class EventTimer:
    """Device events around launches on the backend's stream (CuPy or Numba), L2 flushed for ``cold``."""

    kind = "cuda-events"

    def __init__(self, backend: Any, lib: str) -> None:
        self.lib = lib
        stream = _stream(backend)
        if lib == "cupy":
            import cupy as cp

            self.cp = cp
            self.stream = stream if stream is not None else cp.cuda.get_current_stream()
            try:
                l2 = int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id).get("l2CacheSize") or 0)
            except Exception:  # noqa: BLE001 - fall back to an H100's 50 MB
                l2 = 0
            self.flush_bytes = 2 * (l2 or 50 * 2**20)
            with self.stream:
                self._buf = cp.empty(self.flush_bytes, dtype=cp.uint8)
        else:
            from numba import cuda

            self.cuda = cuda
            self.stream = stream if stream is not None else cuda.default_stream()
            try:
                l2 = int(cuda.get_current_device().L2_CACHE_SIZE)
            except Exception:  # noqa: BLE001
                l2 = 0
            self.flush_bytes = 2 * (l2 or 50 * 2**20)
            self._src = cuda.device_array(self.flush_bytes, dtype=np.uint8, stream=self.stream)
            self._dst = cuda.device_array(self.flush_bytes, dtype=np.uint8, stream=self.stream)

    def flush(self) -> None:
        if self.lib == "cupy":
            with self.stream:
                self._buf.fill(1)
        else:
            self._dst.copy_to_device(self._src, stream=self.stream)

    def _pair(self) -> tuple[Any, Any]:
        if self.lib == "cupy":
            return self.cp.cuda.Event(), self.cp.cuda.Event()
        return self.cuda.event(timing=True), self.cuda.event(timing=True)

    def _sample(self, fn: Callable[[], None], number: int, flush: bool) -> float:
        if flush:
            self.flush()
        a, b = self._pair()
        if self.lib == "cupy":
            a.record(self.stream)
            for _ in range(number):
                fn()
            b.record(self.stream)
            b.synchronize()
            return float(self.cp.cuda.get_elapsed_time(a, b)) * 1e-3
        a.record(stream=self.stream)
        for _ in range(number):
            fn()
        b.record(stream=self.stream)
        b.synchronize()
        return float(a.elapsed_time(b)) * 1e-3

    def measure(self, fn: Callable[[], None], target_s: float = 0.2, min_samples: int = 5,
                max_samples: int = 50, warmup: int = 3) -> dict[str, Any]:
        for _ in range(max(1, warmup)):
            self._sample(fn, 1, False)  # warm-up
        cold: list[float] = []
        t_end = time.perf_counter() + target_s / 2
        while len(cold) < max_samples and (len(cold) < min_samples or time.perf_counter() < t_end):
            cold.append(self._sample(fn, 1, True))
        t1 = max(float(np.median(cold)), 1e-6)
        number = max(1, min(1000, int(np.ceil(1e-3 / t1))))
        hot: list[float] = []
        t_end = time.perf_counter() + target_s / 2
        while len(hot) < max_samples and (len(hot) < min_samples or time.perf_counter() < t_end):
            hot.append(self._sample(fn, number, False) / number)
        c, h = summarize_us(cold, 1), summarize_us(hot, number)
        return {"clock": self.kind, **c, **{f"hot_{k}": v for k, v in h.items()}}


def make_timer(backend: Any) -> WallTimer | EventTimer:
    lib = gpu_library(backend)
    return EventTimer(backend, lib) if lib else WallTimer(backend)
