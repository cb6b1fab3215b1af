"""Host overhead per training step: what Python spends issuing a step, with the device taken away.

``python -m bench.run --host`` (also part of ``--quick``). The model (``LeNet5.run_steps``) trains over a
cupy backend whose Runtime does nothing (``NullRuntime``: launches, copies and allocations return at
once), so the time measured is the host's alone: the model's step loop, the backend's op wrappers or
the recorded replay, and the runtime's launch path up to the call that would go to CuPy. Modes, each
timed per training step at batch ``BATCH``:

- ``cupy eager (direct op calls)``: every op of a step called through the backend (cached launch plans,
  array checks) — what a step costs without ``record``;
- ``cupy eager (recorded replay)``: ``run_steps`` with graphs off: the step's launches recorded once
  (``backend.record``) and replayed as they are (kernel, grid, block, shared memory, typed arguments);
- ``cupy graph (K=100, amortised)``: ``run_steps`` with graphs on: one graph launch per chunk of K steps,
  the time of a chunk divided by K;
- ``epoch host work``: what the host does per 60,000-image epoch outside the graphs: a permutation and
  ``begin_epoch`` (its upload), per epoch and per step.

What a NullRuntime cannot show: CuPy's own cost per kernel call (argument packing, the driver's
cuLaunchKernel) and the driver's cost of a graph launch; on a GPU those come on top.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from lenet_gpu.backends.cupy_backend import CupyBackend, Runtime
from lenet_gpu.model import LeNet5

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
        return np.zeros(arr.shape, dtype=arr.dtype)  # zeros: the model's graph self-check sees equal copies

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


class _UnrecordedBackend(CupyBackend):
    """``record`` returns fn itself: every step calls every op through the backend."""

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn


def null_backend(record: bool = True, graphs: bool = True, fused: bool = True) -> CupyBackend:
    """The cupy backend over a NullRuntime (named cupy-null: nothing it does is taken for a GPU's)."""
    cls = CupyBackend if record else _UnrecordedBackend
    be = cls(runtime=NullRuntime(), graphs=graphs, fused=fused)
    be.name = "cupy-null"
    return be


def _time_calls(fn: Callable[[], None], calls: int, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) seconds per call over ``repeats`` samples of ``calls`` calls each."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else [samples[0]] * 4
    return statistics.median(samples), q[0], q[3]


def _model(be: CupyBackend, batch: int, n: int, graph_steps: int) -> tuple[LeNet5, object]:
    model = LeNet5(backend=be, graph_steps=graph_steps, use_graphs=be.graphs)
    data = model.upload_dataset(np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.uint8))
    model.begin_run(data, batch, lrs=np.full(10_000_000 // batch, 1e-3), shift=2)
    model.begin_epoch(data, np.arange(n, dtype=np.int32))
    return model, data


def bench_host(batch: int = BATCH, graph_steps: int = GRAPH_STEPS, repeats: int = 7, quick: bool = False,
               fused: bool = True) -> list[dict[str, Any]]:
    """One entry per mode: mode, us_per_step (median, p20, p80), launches_per_step (as the host issues
    them: kernels, or graph launches), kernels_per_step, us_per_launch, and a note."""
    rows: list[dict[str, Any]] = []
    eager_steps = 100 if quick else 500

    def row(mode: str, per_step: tuple[float, float, float], launches: float, kernels: int, note: str) -> None:
        med, p20, p80 = (1e6 * x for x in per_step)
        rows.append({"mode": mode, "backend": "cupy", "runtime": "null", "batch": batch, "us_per_step": med,
                     "us_per_step_p20": p20, "us_per_step_p80": p80, "launches_per_step": launches,
                     "kernels_per_step": kernels, "us_per_launch": None if "graph" in mode else med / kernels,
                     "note": note})

    for mode, record, note in (
        ("cupy eager (direct op calls)", False, "every op through the backend: plan lookup, array checks, launch"),
        ("cupy eager (recorded replay)", True, "run_steps, graphs off: backend.record's launches replayed as they are"),
    ):
        be = null_backend(record=record, graphs=False, fused=fused)
        model, data = _model(be, batch, 4 * batch, graph_steps)
        model.run_steps(data, 2)  # warm-up: records
        before = be.counters.launches
        model.run_steps(data, 1)
        kernels = be.counters.launches - before
        med, p20, p80 = _time_calls(partial(model.run_steps, data, eager_steps), 1, repeats)
        row(mode, (med / eager_steps, p20 / eager_steps, p80 / eager_steps), kernels, kernels, note)

    be = null_backend(graphs=True, fused=fused)
    model, data = _model(be, batch, 2 * graph_steps * batch, graph_steps)
    model.run_steps(data, graph_steps + 1)  # warm-up, the graph self-check, the capture
    ok, msg = model.graph_check()
    if not ok:
        raise RuntimeError(f"bench.host: the graph path did not engage ({msg})")
    chunks = 20 if quick else 100
    med, p20, p80 = _time_calls(lambda: model.run_steps(data, graph_steps * chunks), 1, repeats)
    k = graph_steps * chunks
    row(f"cupy graph (K={graph_steps}, amortised)", (med / k, p20 / k, p80 / k), 1 / graph_steps, kernels,
        f"run_steps, graphs on: one graph launch per {graph_steps} steps")

    # the host work per epoch outside the graphs: a fresh permutation and its upload (begin_epoch)
    be = null_backend(graphs=False, fused=fused)
    model = LeNet5(backend=be, use_graphs=False)
    data = model.upload_dataset(np.zeros((EPOCH_IMAGES, 28, 28), np.uint8), np.zeros(EPOCH_IMAGES, np.uint8))
    rng = np.random.default_rng(0)
    med, p20, p80 = _time_calls(lambda: model.begin_epoch(data, rng.permutation(EPOCH_IMAGES)), 3 if quick else 10,
                                repeats)
    steps_per_epoch = EPOCH_IMAGES // batch
    rows.append({"mode": "epoch host work (permutation + upload, outside graphs)", "backend": "cupy",
                 "runtime": "null", "batch": batch, "us_per_epoch": 1e6 * med, "us_per_epoch_p20": 1e6 * p20,
                 "us_per_epoch_p80": 1e6 * p80, "us_per_step": 1e6 * med / steps_per_epoch,
                 "us_per_step_p20": 1e6 * p20 / steps_per_epoch, "us_per_step_p80": 1e6 * p80 / steps_per_epoch,
                 "launches_per_step": 0.0, "kernels_per_step": 0, "us_per_launch": None,
                 "steps_per_epoch": steps_per_epoch,
                 "note": f"rng.permutation({EPOCH_IMAGES}) + model.begin_epoch (the copy itself is a no-op here); "
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
                     f"{per_launch} |\n")
    return "".join(lines)


def main() -> None:  # pragma: no cover - a convenience: python -m bench.host
    rows = bench_host()
    print(markdown(rows))


if __name__ == "__main__":  # pragma: no cover
    main()
