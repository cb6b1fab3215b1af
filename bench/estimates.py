"""Latency of each kernel of the default cupy training step at batch 64 and 4096: estimated or measured, never
mixed up. The fill table (``scripts/kernel_report.py``) prints it beside each launch's waves and occupancy.

An estimate names its method (issue slots, shared-memory slots, DRAM/L2 bytes, chain length, waves) and the
kernel header where its count is written out; a measurement names the run it comes from. No GPU has run the
four-kernel step's kernels yet (2026-12-05), nor step_fwd_v2, head_train_v4 and step_bwd_v2 (2026-12-07): their rows are
estimates.
head_train_v2's two kernels ran inside the graphed step of 2026-12-04 (a CUPTI profile on an H200), so theirs are
measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: the batch sizes every row gives a figure for
BATCHES: tuple[int, int] = (64, 4096)


@dataclass(frozen=True)
class KernelLatency:
    kernel: str
    #: one thread's work (FMAs, loads) at LeNet-5's shapes, as the kernel header counts it
    per_thread: str
    #: batch -> (low, high) µs on an H200 (132 SMs); low == high for a measurement
    us: dict[int, tuple[float, float]] = field(default_factory=dict)
    #: "estimate: <method>" or "measured: <run>"
    method: str = ""
    #: where the count is written out
    source: str = ""

    @property
    def measured(self) -> bool:
        return self.method.startswith("measured")


_PROFILE = ("measured: CUPTI profile of the graphed cupy step, H200, 2026-12-04 "
            "(docs/gpu/kernel-profile-h200-2026-12-04.md)")

LATENCY: dict[str, KernelLatency] = {k.kernel: k for k in (
    KernelLatency(
        "step_fwd_v1", "C1 600 FMA + ~68 shared loads, C3 1,200 FMA + ~260 shared loads (window rows as 64-bit "
        "loads; a block of 256 per image)",
        {64: (5.0, 6.0), 4096: (70.0, 90.0)},
        "estimate: issue slots (~16.2 K warp-instructions an image, 4 a clock an SM; ~17.5 K before the 64-bit "
        "window rows, a shift inside this range), DRAM bytes (12.8 KB an image), latency at 64 blocks on 132 SMs",
        "kernels/step_fwd.cu"),
    KernelLatency(
        "step_fwd_v2", "two images a block: C1 as v1's in two rounds, C3 4 filters x 4 outputs a thread (a float4 of "
        "weights feeding 16 FMAs)",
        {4096: (60.0, 80.0)},
        "estimate: issue slots (~15.3 K warp-instructions an image against v1's ~16.2 K, both with 64-bit window "
        "rows; ~15.8 K before them); the default runs it from batch 1,055 (2 images a block, 4 blocks an SM)",
        "kernels/step_fwd.cu"),
    KernelLatency(
        "head_train_v2", "rows: C5/F6/out forward warp-cooperative, backward one thread per column x rows",
        {64: (21.7, 21.7), 4096: (148.6, 148.6)}, _PROFILE, "kernels/head.cu"),
    KernelLatency(
        "head_train_wgrad_v2", "16x32 tiles, 2x2 outputs a thread, 4 batch groups",
        {64: (3.4, 3.4), 4096: (92.3, 92.3)}, _PROFILE, "kernels/head.cu"),
    KernelLatency(
        "head_train_v3", "a row a block, 512 threads: C5 forward and data gradient split over 15 warps, 104 "
        "unrolled loads a lane; ~1.1 K instructions a thread (from the PTX)",
        {64: (5.0, 7.0)},
        "estimate: L2 bytes (27.7 MB at 5.5-7 TB/s), chain length (9 barriers), issue slots; at batch > 264 the "
        "launcher runs v2's rows kernel (its row)", "kernels/head.cu"),
    KernelLatency(
        "head_train_v4", "16 rows a block, a warp per 4 rows: 4 x 4 (C5, dz1) and 4 x 7 (dx) register tiles; ~24.5 K "
        "instructions a thread (kernels/head.cu)",
        {4096: (31.0, 50.0)},
        "estimate: issue slots (1,024 warps, ~2 a scheduler, 49 K instructions each at 0.5-0.8 a clock), L2 bytes "
        "(~120 MB at 5.5-7 TB/s, overlapped); the default plan runs it from batch 1,049 (v3's rows kernel at 64)",
        "kernels/head.cu"),
    KernelLatency(
        "head_train_wgrad_v3", "v2's 16x32 tiles and sum order, the geometry compiled in",
        {64: (3.0, 3.5), 4096: (88.0, 93.0)},
        "estimate: v2's kernel (measured 3.4 / 92.3 µs) with its loops unrolled: no slower", "kernels/head.cu"),
    KernelLatency(
        "head_train_wgrad_v4", "v3's tiles and sums; the next 32-row chunk (4 + 8 values a thread) fetched into "
        "registers before this chunk's 32 unrolled k steps (2 LDS.64 + 4 FMA each)",
        {64: (3.0, 3.5), 4096: (25.0, 45.0)},
        "estimate: issue slots (~270 instructions a thread a round, 4 warps a scheduler: ~0.55 µs a round) against "
        "an L2 round trip of ~0.5-0.8 µs that v4 overlaps and v3 adds, 32 rounds at 4096; v3's measured 92 µs "
        "exceeds that count for v3 too (~40-48 µs), so the range keeps some of the unexplained rest; batch 64 is one "
        "round (nothing to overlap: v3's figure)", "kernels/head.cu"),
    KernelLatency(
        "step_bwd_v1", "~584 FMA an image a thread (149,400 MAC / 256), ~3 shared loads per wgrad FMA",
        {64: (8.0, 10.0), 4096: (180.0, 200.0)},
        "estimate: shared-memory slots (~11.7 K LDS clocks an image), issue slots, chain length at one image a "
        "block (batch 64), one wave of 256 groups at 2 blocks an SM (batch 4096)", "kernels/step_bwd.cu"),
    KernelLatency(
        "step_bwd_v2", "v1's sums; a thread owns one filter's 10 C3 weights: a window's gz3 and route loaded once "
        "for its 10 FMAs (~1.2 shared loads a C3 wgrad MAC, v1 3); 80 registers, 3 blocks an SM",
        {64: (6.0, 8.0), 4096: (130.0, 150.0)},
        "estimate: shared-memory slots (~8.4 K LDS clocks an image against v1's ~11.7 K), issue slots, chain length "
        "(batch 64: phase A.1 25 windows x 12 loads a thread, not 10 x 25 x 3)", "kernels/step_bwd.cu"),
    KernelLatency(
        "step_adam_v1", "4 parameters (float4) a thread; the 656 conv-prefix threads add S rows of partials",
        {64: (4.0, 6.0), 4096: (8.0, 12.0)},
        "estimate: launch latency + chain length (S / 8 rounds of L2 loads, S = 64 / 256 groups)",
        "kernels/step_update.cu"),
    KernelLatency(
        "step_sgd_v1", "as step_adam_v1, SGD's 4 FLOPs a parameter",
        {64: (4.0, 6.0), 4096: (8.0, 12.0)},
        "estimate: as step_adam_v1 (the same loads, fewer FLOPs)", "kernels/step_update.cu"),
)}


def step_latency(kernels: list[str], batch: int) -> tuple[float, float, bool] | None:
    """The step's (low, high) µs as the sum of its kernels' rows at ``batch`` and whether every term was
    measured; None when a kernel has no row (a variant nobody has estimated)."""
    lo = hi = 0.0
    measured = True
    for k in kernels:
        row = LATENCY.get(k)
        if row is None or batch not in row.us:
            return None
        lo, hi = lo + row.us[batch][0], hi + row.us[batch][1]
        measured = measured and row.measured
    return lo, hi, measured


def latency_markdown(sequences: dict[int, list[str]]) -> str:
    """The latency section of the fill table: ``sequences`` maps a batch to the kernels of its training step."""
    lines = ["## Latency per kernel of the default training step (H200, 132 SMs)", "",
             "Estimates and measurements kept apart: a row says which it is and its method.", "",
             "| kernel | per thread | " + " | ".join(f"µs @ {b}" for b in BATCHES) + " | method | where |",
             "| --- | --- | " + " | ".join("---" for _ in BATCHES) + " | --- | --- |"]
    seen: list[str] = []
    for b in BATCHES:
        seen += [k for k in sequences.get(b, []) if k not in seen]
    for k in seen:
        row = LATENCY.get(k)
        if row is None:
            lines.append(f"| {k} | — | " + " | ".join("no estimate" for _ in BATCHES) + " | — | — |")
            continue
        figs = []
        for b in BATCHES:
            if b not in row.us:
                figs.append("— (not launched)")
                continue
            lo, hi = row.us[b]
            figs.append(f"{lo:g}" if lo == hi else f"~{lo:g}–{hi:g}")
        lines.append(f"| {k} | {row.per_thread} | " + " | ".join(figs) + f" | {row.method} | {row.source} |")
    for b in BATCHES:
        total = step_latency(sequences.get(b, []), b)
        if total is not None:
            lo, hi, measured = total
            kind = "measured" if measured else "an estimate: the sum of the rows, some of them estimates"
            lines.append(f"\nThe step's kernels at batch {b}: {lo:g}–{hi:g} µs ({kind}; graph nodes between "
                         f"kernels not counted), {b / hi:.2f}–{b / lo:.2f}M img/s.")
    return "\n".join(lines) + "\n"
