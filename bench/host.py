"""Host overhead per training step: what Python spends issuing a step, with the device taken away.

``python -m bench.run --host`` (also part of ``--quick``). The cupy backend runs over ``NullRuntime``, a
Runtime whose launches, copies and allocations do nothing, so the time measured is the host's alone:
the backend's op wrappers (plan lookup, array checks, argument tuples) and the runtime's launch path,
up to the call that would go to CuPy. Modes, each timed per training step at batch ``BATCH``:

- ``cupy eager (direct op calls)``: the ops of a step called one by one (cached launch plans);
- ``cupy eager (recorded replay)``: ``backend.record(step)``: the step's launches replayed as recorded
  (kernel, grid, block, shared memory, typed arguments), no op code at all;
- ``cupy graph (K=100, amortised)``: ``backend.graph(step, K)``: one graph launch per chunk of K steps,
  the time of one chunk divided by K;
- ``epoch host work``: what the host does per 60,000-image epoch outside the graphs (a permutation and
  its upload), per epoch and per step.

What a NullRuntime cannot show: CuPy's own cost per kernel call (its argument packing and the driver's
cuLaunchKernel), and the driver's cost of a graph launch; on a GPU those come on top.

The step is lenet_program.LeNetProgram's (the model's training-step order over preallocated buffers);
once the model's ``run_steps`` lands it can be timed the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lenet_gpu.backends.cupy_backend import CupyBackend, Runtime
from lenet_gpu.backends.cupy_backend.lenet_program import LeNetProgram

BATCH = 64
GRAPH_STEPS = 100  # K: steps per captured graph
EPOCH_IMAGES = 60_000


class _NullKernel:
    __slots__ = ("stem", "name", "options")

    def __init__(self, stem: str, name: str, options: tuple[str, ...]) -> None:
        self.stem, self.name, self.options = stem, name, options


class _NullGraph:
    def launch(self, stream: Any = None) -> None:
        pass


class NullRuntime(Runtime):
    """A Runtime that does nothing: kernels are handles, launches return at once, copies copy nothing and
    allocations hand out uninitialised host arrays (the backend's checks need shapes and dtypes). It
    counts everything as the real runtimes do, and ``graph`` mirrors CupyRuntime.graph's host path
    (capture once, then one graph launch per call)."""

    name = "null"
    is_gpu = True  # plans and counters as on a GPU

    def get_kernel(self, stem: str, name: str, options: Any = ()) -> Any:
        key = (stem, tuple(options), name)
        k = self._kernels.get(key)
        if k is None:
            k = self._kernels[key] = _NullKernel(stem, name, tuple(options))
        return k

    def _launch(self, kernel, grid, block, args, shared_mem) -> None:
        pass

    def _empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def _zeros(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def _to_device(self, host):
        return np.empty(host.shape, dtype=host.dtype)

    def _upload(self, dst, host) -> None:
        pass

    def _to_host(self, arr) -> np.ndarray:
        return np.empty(arr.shape, dtype=arr.dtype)

    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None]:
        state: dict[str, Any] = {"graph": None, "launches": 0}

        def run() -> None:
            if state["graph"] is None:
                before = self.counters.launches
                self.capturing = True
                try:
                    for _ in range(steps):
                        fn()
                finally:
                    self.capturing = False
                state["graph"], state["launches"] = _NullGraph(), self.counters.launches - before
            else:
                self.counters.launches += state["launches"]
            state["graph"].launch(stream=None)

        return run


def _time_calls(fn: Callable[[], None], calls: int, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) seconds per call over ``repeats`` samples of ``calls`` calls each."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    samples.sort()
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else [samples[0]] * 4
    return statistics.median(samples), q[0], q[3]


def bench_host(batch: int = BATCH, graph_steps: int = GRAPH_STEPS, repeats: int = 7, quick: bool = False,
               fused: bool = True) -> list[dict[str, Any]]:
    """One entry per mode: mode, us_per_step (median, p20, p80), launches_per_step (as the host issues
    them: kernels, or graph launches), kernels_per_step, and a note."""
    rt = NullRuntime()
    be = CupyBackend(runtime=rt, graphs=True, fused=fused)
    prog = LeNetProgram(be, batch, n=2 * batch)
    prog.step()  # warm-up: plans, first-call scratch
    before = rt.counters.launches
    prog.step()
    kernels = rt.counters.launches - before
    steps_eager = 200 if quick else 1000
    rows = []

    def row(mode: str, per_step: tuple[float, float, float], launches: float, note: str) -> None:
        med, p20, p80 = (1e6 * x for x in per_step)
        rows.append({"mode": mode, "backend": "cupy", "runtime": "null", "batch": batch, "us_per_step": med,
                     "us_per_step_p20": p20, "us_per_step_p80": p80, "launches_per_step": launches,
                     "kernels_per_step": kernels,
                     "us_per_launch": med / kernels if "graph" not in mode else None, "note": note})

    row("cupy eager (direct op calls)", _time_calls(prog.step, steps_eager, repeats), kernels,
        "each op: plan-cache lookup, array checks, argument tuple, Runtime.launch")
    rec = be.record(prog.step)
    rec()  # records
    row("cupy eager (recorded replay)", _time_calls(rec, steps_eager, repeats), kernels,
        "backend.record(step): the recorded launches replayed as they are")
    g = be.graph(prog.step, graph_steps)
    g()  # captures
    chunks = 50 if quick else 300
    med, p20, p80 = _time_calls(g, chunks, repeats)
    row(f"cupy graph (K={graph_steps}, amortised)", (med / graph_steps, p20 / graph_steps, p80 / graph_steps),
        1 / graph_steps, f"backend.graph(step, {graph_steps}): one graph launch per {graph_steps} steps")
    # the host work per epoch outside the graphs: a fresh permutation and its upload into the resident buffer
    perm_buf = be.empty((EPOCH_IMAGES,), np.int32)
    rng = np.random.default_rng(0)

    def epoch_work() -> None:
        be.upload(perm_buf, rng.permutation(EPOCH_IMAGES).astype(np.int32))

    med, p20, p80 = _time_calls(epoch_work, 3 if quick else 10, repeats)
    steps_per_epoch = EPOCH_IMAGES // batch
    rows.append({"mode": "epoch host work (permutation + upload, outside graphs)", "backend": "cupy",
                 "runtime": "null", "batch": batch, "us_per_epoch": 1e6 * med, "us_per_epoch_p20": 1e6 * p20,
                 "us_per_epoch_p80": 1e6 * p80, "us_per_step": 1e6 * med / steps_per_epoch,
                 "launches_per_step": 0.0, "kernels_per_step": 0, "steps_per_epoch": steps_per_epoch,
                 "note": f"rng.permutation({EPOCH_IMAGES}) + backend.upload (the copy itself is a no-op here); "
                         f"per step: / {steps_per_epoch}"})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report.md section."""
    if not rows:
        return ""
    lines = [
        "\n## Host overhead per training step (cupy over a no-op runtime)\n\n",
        "Python's time to issue one training step with the device taken away (`bench/host.py`: launches, "
        "copies and allocations do nothing). CuPy's own per-call cost and the driver's come on top on a GPU.\n\n",
        "| mode | batch | host µs/step (p20–p80) | launches/step as issued | kernels/step | µs/launch |\n",
        "| --- | --- | --- | --- | --- | --- |\n",
    ]
    for r in rows:
        per_launch = f"{r['us_per_launch']:.2f}" if r.get("us_per_launch") else "—"
        extra = f"; {r['us_per_epoch']:.0f} µs/epoch" if "us_per_epoch" in r else ""
        lines.append(f"| {r['mode']} | {r['batch']} | {r['us_per_step']:.3g} ({r['us_per_step_p20']:.3g}–"
                     f"{r['us_per_step_p80']:.3g}){extra} | {r['launches_per_step']:g} | {r['kernels_per_step']} | "
                     f"{per_launch} |\n"
                     if "us_per_step_p20" in r else
                     f"| {r['mode']} | {r['batch']} | {r['us_per_step']:.3g}{extra} | {r['launches_per_step']:g} | "
                     f"{r['kernels_per_step']} | {per_launch} |\n")
    return "".join(lines)


def main() -> None:  # pragma: no cover - a convenience: python -m bench.host
    rows = bench_host()
    print(markdown(rows))


if __name__ == "__main__":  # pragma: no cover
    main()
