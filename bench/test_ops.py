"""pytest-benchmark: every op × site × variant × backend × batch (``pytest bench --benchmark-only -k conv2d``).

Each case is validated against lenet_gpu.reference before it is timed; FLOPs, bytes, the H100 floor
and the achieved GFLOP/s and GB/s go into the benchmark's extra_info (``--benchmark-json``).
"""

from __future__ import annotations

from typing import Any

from bench import ops as opsmod
from bench.conftest import CFG, backend_or_reason, sync_timer_setup


def test_op(benchmark: Any, op_case_key: tuple) -> None:
    name, op, site, variant, batch = op_case_key
    be = backend_or_reason(name)
    case = opsmod.build_case(be, op, site, batch, variant, CFG)
    case.validate()

    def run() -> None:
        case.launch()
        be.synchronize()

    flush = sync_timer_setup(be)
    if flush is not None:
        benchmark.pedantic(run, setup=flush, rounds=50, warmup_rounds=5)
    else:
        benchmark(run)
    benchmark.extra_info.update(
        backend=name, op=op, site=site, variant=variant, batch=batch, flops=case.cost.flops,
        bytes=case.cost.bytes, h100_floor_s=opsmod.floor_seconds(case.cost),
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        med = stats.stats.median
        benchmark.extra_info.update(gflops=case.cost.flops / med / 1e9, gbs=case.cost.bytes / med / 1e9)
