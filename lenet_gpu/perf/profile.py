"""Device time per kernel inside a timed call (a graphed training step, an inference pass), from CUPTI through
``torch.profiler``: which kernels the step's time goes to, and how their sum compares with the step's wall
time (the rest is launch gaps and host work the device waits for).

CUPTI's activity records cover every kernel of the process (CuPy's, Numba's and PyTorch's alike), kernels
inside CUDA graphs included (``kernel_profile``; GPU only). Without PyTorch, ``replay_profile`` is the fallback:
the kernel launches of one training step are recorded (``backend.launch_list``: cupy, cupy-host and numba list
theirs), then each launch is replayed on its own and timed, with CUDA events on a GPU (``perf.timing.make_timer``:
the L2 flushed before each sample, and back to back) and with the CPU clock on a host backend: rows per kernel, as
CUPTI's. A backend that lists no launches (numpy, cpu) is replayed op call by op call (``record_calls``: each op of
the backend wrapped for one eager step): rows per op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.base import LAUNCH_LIST


def unavailable(torch: Any) -> str | None:
    """Why no CUPTI kernel profile can be taken here (None: it can; else ``replay_profile`` is the fallback)."""
    if torch is None:
        return "PyTorch is not installed: the per-kernel profile reads CUPTI through torch.profiler"
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


# ------------------------------------------------------------------------ the fallback: recorded op calls, replayed
@dataclass
class OpCall:
    """One op call of a recorded step: the backend method, its arguments, the variant that ran (the call's, else the
    backend's default) and the kernel launches it made (the backend's counters)."""

    op: str
    args: tuple
    kwargs: dict
    variant: str
    launches: int

    @property
    def label(self) -> str:
        return f"{self.op}_{self.variant}"


def record_calls(backend: Any, fn: Callable[[], None]) -> list[OpCall]:
    """The op calls ``fn`` makes on ``backend``, in order: every op in ``backend.variants`` is wrapped on the instance
    while fn runs once (eagerly: a replayed CUDA graph or recorded launch list calls no op), then unwrapped. An op
    that an op calls inside itself (a host backend's fused op composed of its unfused ones) is not recorded again."""
    calls: list[OpCall] = []
    depth = [0]
    wrapped: list[str] = []
    counters = getattr(backend, "counters", None)

    def wrap(op: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return orig(*args, **kwargs)
            before = counters.launches if counters is not None else 0
            depth[0] += 1
            try:
                return orig(*args, **kwargs)
            finally:
                depth[0] -= 1
                after = counters.launches if counters is not None else 0
                variant = kwargs.get("variant") or getattr(backend, "default_variants", {}).get(op, "?")
                calls.append(OpCall(op, args, kwargs, str(variant), after - before))
        return call

    for op in backend.variants:
        if op in vars(backend):  # already shadowed on the instance: leave it be
            continue
        setattr(backend, op, wrap(op, getattr(backend, op)))
        wrapped.append(op)
    try:
        fn()
    finally:
        for op in wrapped:
            delattr(backend, op)
    return calls


def replay_profile(backend: Any, items: list[tuple[str, Callable[[], None], int]], step: Callable[[], None],
                   tcfg: Any, units_per_step: int = 1, what: str = "op call") -> dict[str, Any]:
    """Each recorded item (label, a callable that issues it again, the kernel launches it makes) replayed on its own
    and timed (``perf.timing.make_timer(backend)``: CUDA events on a GPU, the L2 flushed before each cold sample; the
    CPU clock otherwise); ``step`` (one timed call of the real step, warm: ``units_per_step`` steps) timed as well.
    Rows in the format of ``kernel_profile``: a row per label, ``device_us`` per step (cold; ``hot_us`` back to back on
    a GPU), most first, their sum against the wall time per step. ``what`` names an item in ``source``. A replay
    repeats a launch on the step's own arrays (the optimizer moves the parameters on): run it on a model kept for
    profiling."""
    from .timing import CpuTimer, GpuEventTimer, make_timer

    timer = make_timer(backend)
    per: dict[str, dict[str, Any]] = {}
    for label, fn, launches in items:
        if isinstance(timer, GpuEventTimer):
            cold, hot = timer.measure(fn, tcfg)
            us, hot_us = cold.median * 1e6, hot.median * 1e6
        else:
            us = timer.measure(fn, tcfg).median * 1e6
            hot_us = us
        r = per.setdefault(label, {"kernel": label, "calls": 0, "device_us": 0.0, "hot_us": 0.0, "launches": 0})
        r["calls"] += 1
        r["device_us"] += us
        r["hot_us"] += hot_us
        r["launches"] += launches
    # the step's wall time as kernel_profile takes it: the CPU clock around calls, synchronized at the end
    wall_us = CpuTimer(backend.synchronize).measure(step, tcfg).median * 1e6 / max(1, units_per_step)
    rows = [{**r, "device_us": round(r["device_us"], 3), "hot_us": round(r["hot_us"], 3)} for r in per.values()]
    rows.sort(key=lambda r: -r["device_us"])
    total = sum(r["device_us"] for r in rows)
    clock = "CUDA events" if isinstance(timer, GpuEventTimer) else "the CPU clock"
    return {"kernels": rows, "device_us_sum": round(total, 3), "wall_us": round(wall_us, 3),
            "device_fraction": round(total / wall_us, 4) if wall_us > 0 else None, "units": 1,
            "launches": sum(r["launches"] for r in rows),
            "source": f"{clock} around each recorded {what}, replayed one at a time (no CUPTI)"}


def op_items(backend: Any, calls: list[OpCall]) -> list[tuple[str, Callable[[], None], int]]:
    """Recorded op calls as replay items (label ``op_variant``)."""
    def again(c: OpCall) -> Callable[[], None]:
        fn = getattr(backend, c.op)
        return lambda: fn(*c.args, **c.kwargs)

    return [(c.label, again(c), c.launches) for c in calls]


def profile_net(net: Any, what: str, batch: int, torch: Any, tcfg: Any) -> dict[str, Any]:
    """The per-kernel profile of an ``OurNet`` (``perf.model``) at ``batch``: a training step (``what="train"``, one
    timed call = ``net.steps_per_call`` steps) or an inference pass (``"infer"``). CUPTI (``kernel_profile``) where
    ``unavailable(torch)`` is None. Else a replay: of each recorded kernel launch where the backend lists its launches
    (``backend.launch_list``: the GPU backends and cupy-host), of each recorded op call otherwise. Adds ``top3``."""
    if what not in ("train", "infer"):
        raise ValueError(f"what must be 'train' or 'infer' (got {what!r})")
    run = (lambda: net.train_step(batch)) if what == "train" else (lambda: net.forward(batch))
    units = net.steps_per_call if what == "train" else 1
    if unavailable(torch) is None:
        prof = kernel_profile(torch, run, net.synchronize, 3 if what == "train" else 20, units)
        return {**prof, "top3": top(prof)}
    run()  # warm: compiled, planned, captured, scratch allocated
    net.synchronize()
    be = net.backend
    if hasattr(be, LAUNCH_LIST):
        launches = net.record_launches(batch) if what == "train" else be.launch_list(run)
        prof = replay_profile(be, [(name, fn, 1) for name, fn in launches], run, tcfg, units, "kernel launch")
    else:
        calls = net.record_step(batch) if what == "train" else record_calls(be, run)
        prof = replay_profile(be, op_items(be, calls), run, tcfg, units, "op call")
    return {**prof, "top3": top(prof)}
