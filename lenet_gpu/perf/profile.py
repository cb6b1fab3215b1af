"""Device time per kernel inside a timed call (a graphed training step, an inference pass), from CUPTI through
``torch.profiler``: which kernels the step's time goes to, and how their sum compares with the step's wall
time (the rest is launch gaps and host work the device waits for).

CUPTI's activity records cover every kernel of the process (CuPy's, Numba's and PyTorch's alike), kernels
inside CUDA graphs included. Without PyTorch there is no profile (``unavailable`` says so): the fallback the
design names (CUDA events around each recorded launch in a replay) is not written.

GPU only; not run on a machine without one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def unavailable(torch: Any) -> str | None:
    """Why no kernel profile can be taken here (None: it can)."""
    if torch is None:
        return ("PyTorch is not installed: the per-kernel profile reads CUPTI through torch.profiler (a CUDA-event "
                "fallback per recorded launch is not written)")
    if not torch.cuda.is_available():
        return "torch.cuda is not available"
    return None


def _is_device(ev: Any) -> bool:
    return str(getattr(ev, "device_type", "")).split(".")[-1] in ("CUDA", "PrivateUse1")


def kernel_profile(torch: Any, fn: Callable[[], None], sync: Callable[[], None], calls: int,
                   units_per_call: int = 1) -> dict[str, Any]:
    """Profile ``calls`` calls of ``fn`` (already warm: compiled, captured). Returns, per unit (a step: a call
    of a graph of K steps is K units), every kernel's calls and device µs (most first), their sum, and the
    wall time per unit of the same calls timed without the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    units = max(1, calls * units_per_call)
    wall_us = (time.perf_counter() - t0) * 1e6 / units
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if not _is_device(ev):
            continue
        per.setdefault(ev.name, []).append(float(ev.time_range.elapsed_us()))
    rows = [{"kernel": k, "calls": round(len(v) / units, 3), "device_us": round(sum(v) / units, 3)}
            for k, v in per.items()]
    rows.sort(key=lambda r: -r["device_us"])
    total = sum(r["device_us"] for r in rows)
    return {"kernels": rows, "device_us_sum": round(total, 3), "wall_us": round(wall_us, 3),
            "device_fraction": round(total / wall_us, 4) if wall_us > 0 else None, "units": units,
            "source": "CUPTI via torch.profiler"}


def top(profile: dict[str, Any], n: int = 3) -> str:
    """The ``n`` kernels with the most device time, as one line."""
    total = profile.get("device_us_sum") or 0.0
    parts = [f"{r['kernel'][:60]} {r['device_us']:.1f} µs ({r['device_us'] / total:.0%})" if total else r["kernel"]
             for r in profile.get("kernels", [])[:n]]
    return "; ".join(parts)
