"""LeNet launch profiles: what one training step and one inference pass launch on each GPU backend, and
the static kernel tables joined with those launches. Needs no GPU.

This lives in bench/ because it drives the model: a backend knows nothing of LeNet (docs/DESIGN.md §2).

- cupy: LeNet5 runs over a CupyBackend whose Runtime computes nothing and records each launch
  (cupy_backend.compile_report.RecordingRuntime / SequenceRuntime): the launches are exactly the ones a
  real step issues, planned for the SM count given.
- numba: the backend's launch plan of a LeNet step (numba_backend.backend.lenet_launches, checked in the
  simulator against what a step really launches).

Registers and static shared memory come from ptxas (NVRTC for CUDA C, Numba's NVVM for Numba).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lenet_gpu.model import LeNet5

#: Batch size of the recorded launches of the kernel table (shapes other than grids do not depend on it).
REPORT_BATCH = 64
#: Batch sizes of the fill table.
FILL_BATCHES = (64, 128, 256, 1024)
#: SMs of an H100 / H200 SXM: the default the fill table plans for.
SM_COUNT = 132
FILL_COLUMNS = ("backend", "pass", "batch", "index", "kernel", "blocks", "threads", "registers", "shared_bytes",
                "resident_blocks_per_sm", "occupancy", "blocks_per_sm", "waves")


# ---------------------------------------------------------------------------------------------- cupy


def cupy_recorded_launches(batch: int = REPORT_BATCH, defines: dict[str, dict[str, int]] | None = None) -> dict:
    """Every kernel launch of LeNet training steps over all cupy variants: (stem, options, kernel) → launches."""
    from lenet_gpu.backends.cupy_backend import OP_KERNELS, CupyBackend
    from lenet_gpu.backends.cupy_backend.compile_report import RecordingRuntime

    rt = RecordingRuntime()
    depth = max(len(vs) for _, vs in OP_KERNELS.values())
    images = np.zeros((2 * batch, 28, 28), np.uint8)
    labels = np.zeros(2 * batch, np.uint8)
    for i in range(depth):
        chosen = {op: vs[min(i, len(vs) - 1)] for op, (_, vs) in OP_KERNELS.items()}
        # the four-kernel step (the default with max pooling; adam and sgd), the nine-op routed step, the
        # dense fused step and the unfused one
        for fused, optimizer, routed, step4 in ((True, "adam", True, True), (True, "sgd", True, True),
                                                (True, "adam", True, False), (True, "adam", False, False),
                                                (False, "sgd", False, False)):
            be = CupyBackend(runtime=rt, fused=fused, variants=chosen, defines=defines, graphs=False)
            model = LeNet5(backend=be, optimizer=optimizer, use_graphs=False, fused=fused, routed=routed,
                           step4=step4)
            data = model.upload_dataset(images, labels)
            model.begin_run(data, batch, shift=2)
            model.run_steps(data, 1)
            model.logits(images[:batch], batch_size=batch)
    return rt.launched


def cupy_kernel_records(archs: Sequence[str] = ("sm_80", "sm_90"), batch: int = REPORT_BATCH,
                        defines: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """The cupy kernel table: one record per (kernel, arch) at its LeNet launch shapes."""
    from lenet_gpu.backends.cupy_backend.compile_report import kernel_records

    return kernel_records(cupy_recorded_launches(batch, defines), archs)


def cupy_launch_sequence(batch: int, sm_count: int = SM_COUNT, optimizer: str = "adam",
                         fused: bool = True) -> dict[str, list[tuple]]:
    """The launches of one LeNet5 training step and of one inference pass at ``batch``, in issue order, as
    the default cupy backend plans them for ``sm_count`` SMs: {"train": [...], "infer": [...]} of
    (stem, options, kernel, grid, block, dynamic shared bytes)."""
    from lenet_gpu.backends.cupy_backend import CupyBackend
    from lenet_gpu.backends.cupy_backend.compile_report import SequenceRuntime

    out = {}
    for what in ("train", "infer"):
        rt = SequenceRuntime()
        be = CupyBackend(runtime=rt, fused=fused, graphs=False, sm_count=sm_count)
        model = LeNet5(backend=be, optimizer=optimizer, use_graphs=False, fused=fused)
        images = np.zeros((2 * batch, 28, 28), np.uint8)
        if what == "train":
            data = model.upload_dataset(images, np.zeros(2 * batch, np.uint8))
            model.begin_run(data, batch, shift=2)
            model.run_steps(data, 1)  # the first step records (and sizes scratch); the next replays
            del rt.sequence[:]
            model.run_steps(data, 1)
        else:
            model.logits(images[:batch], batch_size=batch)  # warm-up: staging buffers
            del rt.sequence[:]
            model.logits(images[:batch], batch_size=batch)
        out[what] = list(rt.sequence)
    return out


def cupy_fill_records(batches: Sequence[int] = FILL_BATCHES, arch: str = "sm_90",
                      sm_count: int = SM_COUNT) -> list[dict]:
    from lenet_gpu.backends.cupy_backend.runtime import kernel_source
    from lenet_gpu.harness.nvrtc import compile_cuda, max_active_blocks

    compiled: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    rows = []
    for batch in batches:
        for what, seq in cupy_launch_sequence(batch, sm_count).items():
            for i, (stem, options, name, grid, block, dyn) in enumerate(seq):
                key = (stem, options)
                if key not in compiled:
                    compiled[key] = {k.kernel: k for k in compile_cuda(kernel_source(stem), arch=arch,
                                                                       options=options).kernels}
                k = compiled[key][name]
                threads = int(np.prod(block))
                smem = k.shared_bytes + dyn
                resident, _ = max_active_blocks(k.registers, smem, threads, arch)
                rows.append(_fill_row("cupy", what, batch, i, name, int(np.prod(grid)), threads, k.registers, smem,
                                      resident, sm_count, arch))
    return rows


# --------------------------------------------------------------------------------------------- numba


def numba_fill_records(batches: Sequence[int] = FILL_BATCHES, arch: str = "sm_90",
                       sm_count: int = SM_COUNT) -> list[dict]:
    """The numba backend's launches (backend.lenet_launches: the default variants, both fused ops) with each
    kernel's ptxas figures (compile_report.compile_kernel, cached per process)."""
    from lenet_gpu.backends.numba_backend import compile_report as ncr
    from lenet_gpu.backends.numba_backend.backend import lenet_launches

    rows = []
    for batch in batches:
        for what, training in (("train", True), ("infer", False)):
            for i, (op, variant, grid, block, dyn) in enumerate(lenet_launches(batch, training)):
                name = f"{op}_{variant}"
                res = ncr.parse_ptxas(ncr.compile_kernel(name, arch)[1])
                threads = math.prod(block) if isinstance(block, tuple) else int(block)
                smem = res["shared_bytes"] + dyn
                occ = ncr._occupancy(res["registers"], smem, threads, arch)
                resident = int(occ * 64 // math.ceil(threads / 32))  # blocks per SM at that occupancy (64 warps)
                rows.append(_fill_row("numba", what, batch, i, name, int(grid), threads, res["registers"], smem,
                                      resident, sm_count, arch))
    return rows


# ---------------------------------------------------------------------------------------------- both

FILL_BACKENDS = {"cupy": cupy_fill_records, "numba": numba_fill_records}


def _fill_row(backend: str, what: str, batch: int, index: int, kernel: str, blocks: int, threads: int,
              registers: int, smem: int, resident: int, sm_count: int, arch: str) -> dict:
    warps_per_sm = 64  # sm_80 and sm_90
    occupancy = min(1.0, resident * math.ceil(threads / 32) / warps_per_sm)
    return {"backend": backend, "pass": what, "batch": batch, "index": index, "kernel": kernel,
            "op": kernel.rsplit("_", 1)[0], "blocks": blocks, "threads": threads, "registers": registers,
            "shared_bytes": smem, "resident_blocks_per_sm": resident, "occupancy": round(occupancy, 4),
            "blocks_per_sm": round(blocks / sm_count, 3), "waves": round(blocks / (sm_count * max(1, resident)), 3),
            "arch": arch, "sm_count": sm_count}


def fill_records(backends: Sequence[str] = ("cupy", "numba"), batches: Sequence[int] = FILL_BATCHES,
                 arch: str = "sm_90", sm_count: int = SM_COUNT) -> tuple[list[dict], list[str]]:
    """The fill table of each backend that can be compiled here, and a note per backend skipped."""
    rows, notes = [], []
    for name in backends:
        try:
            rows += FILL_BACKENDS[name](batches, arch, sm_count)
        except ImportError as e:
            notes.append(f"{name}: fill table skipped ({e})")
    return rows, notes


def fill_summary(rows: list[dict]) -> list[dict]:
    """Per (backend, pass, batch): launches, and how many launch fewer blocks than there are SMs."""
    out: dict[tuple[str, str, int], dict] = {}
    for r in rows:
        s = out.setdefault((r["backend"], r["pass"], r["batch"]), {
            "backend": r["backend"], "pass": r["pass"], "batch": r["batch"], "launches": 0,
            "under_one_block_per_sm": 0, "kernels_under": []})
        s["launches"] += 1
        if r["blocks"] < r["sm_count"]:
            s["under_one_block_per_sm"] += 1
            s["kernels_under"].append(r["kernel"])
    return list(out.values())


def fill_markdown(rows: list[dict], notes: Sequence[str] = ()) -> str:
    """The fill table as markdown: a summary per backend, pass and batch, then every launch."""
    if not rows:
        return "# Launch fill\n\nNo backend could be compiled here.\n" + "".join(f"- {n}\n" for n in notes)
    sm, arch = rows[0]["sm_count"], rows[0]["arch"]
    lines = [f"# Launch fill ({arch}, {sm} SMs; static: ptxas registers and shared memory, the backends' launch "
             "plans)", "", f"Launches per pass, and how many launch fewer than {sm} blocks (some SMs idle):", "",
             "| backend | pass | batch | launches | < 1 block per SM | those kernels |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in fill_summary(rows):
        lines.append(f"| {s['backend']} | {s['pass']} | {s['batch']} | {s['launches']} | "
                     f"{s['under_one_block_per_sm']} | {', '.join(s['kernels_under'])} |")
    lines += ["", "waves = blocks / (SMs × resident blocks per SM); occupancy = theoretical (resident warps / 64).",
              "", "| " + " | ".join(FILL_COLUMNS) + " |", "| " + " | ".join("---" for _ in FILL_COLUMNS) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in FILL_COLUMNS) + " |")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
