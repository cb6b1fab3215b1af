"""Static report of the cupy backend's kernels: NVRTC + ptxas resources joined with the launch shapes the
backend really uses at LeNet sizes. Needs no GPU.

How the launch shapes are found: LeNet5 training steps (``run_steps``) run on a CupyBackend whose Runtime
only records launches (``RecordingRuntime``: kernel, block, dynamic shared memory; nothing is computed),
once per variant set (all v1, then each op's v2, v3 where it has one), fused and unfused, adam and sgd.
Each kernel is then compiled with NVRTC, with exactly the options the backend loads it with, for each
architecture, and the ptxas report (registers, static shared memory, stack, spills) is joined with the
recorded launch: ``shared_bytes`` = static + the largest dynamic shared memory of its LeNet launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import C_BLOCKS, K_BLOCKS, OP_KERNELS, CupyBackend
from .runtime import Runtime, kernel_source

#: Batch size of the recorded LeNet launches (launch shapes other than grids do not depend on it).
REPORT_BATCH = 64


class _RecordedKernel:
    def __init__(self, stem: str, name: str, options: tuple[str, ...]) -> None:
        self.stem, self.name, self.options = stem, name, options


class RecordingRuntime(Runtime):
    """A Runtime that computes nothing: arrays are uninitialised NumPy arrays, launches are recorded."""

    name = "recording"
    is_gpu = False

    def __init__(self) -> None:
        super().__init__()
        #: (stem, options, kernel) → list of (grid, block, shared_mem)
        self.launched: dict[tuple[str, tuple[str, ...], str], list[tuple[tuple, tuple, int]]] = {}
        self._stems: dict[tuple[str, tuple[str, ...]], str] = {}

    def get_kernel(self, stem: str, name: str, options: Sequence[str] = ()) -> Any:
        return _RecordedKernel(stem, name, tuple(options))

    def _launch(self, kernel, grid, block, args, shared_mem) -> None:
        key = (kernel.stem, kernel.options, kernel.name)
        self.launched.setdefault(key, []).append((tuple(grid), tuple(block), shared_mem))

    def _empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def _zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def _to_device(self, host):
        return np.array(host, copy=True)

    def _upload(self, dst, host) -> None:
        dst[...] = host

    def _to_host(self, arr):
        return np.array(arr, copy=True)


def record_lenet_launches(
    batch: int = REPORT_BATCH, defines: dict[str, dict[str, int]] | None = None
) -> dict[tuple[str, tuple[str, ...], str], list[tuple[tuple, tuple, int]]]:
    """Every kernel launch of LeNet training steps over all variants: (stem, options, kernel) → launches."""
    from ...model import LeNet5

    rt = RecordingRuntime()
    depth = max(len(vs) for _, vs in OP_KERNELS.values())
    images = np.zeros((2 * batch, 28, 28), np.uint8)
    labels = np.zeros(2 * batch, np.uint8)
    for i in range(depth):
        chosen = {op: vs[min(i, len(vs) - 1)] for op, (_, vs) in OP_KERNELS.items()}
        for fused, optimizer in ((True, "adam"), (False, "sgd")):
            be = CupyBackend(runtime=rt, fused=fused, variants=chosen, defines=defines, graphs=False)
            model = LeNet5(backend=be, optimizer=optimizer, use_graphs=False, fused=fused)
            data = model.upload_dataset(images, labels)
            model.begin_run(data, batch, shift=2)
            model.run_steps(data, 1)
    return rt.launched


def compile_report(archs: Sequence[str] = ("sm_80", "sm_90"), batch: int = REPORT_BATCH,
                   defines: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """One record per (kernel, arch): backend, op, kernel, variant, arch, registers, shared_bytes (static +
    the dynamic smem of its LeNet launches), stack_bytes, spill_stores, spill_loads, block_threads,
    occupancy; plus static/dynamic shared bytes, barriers and the compile options."""
    from ...harness.nvrtc import compile_cuda, theoretical_occupancy

    launched = record_lenet_launches(batch, defines)
    modules: dict[tuple[str, tuple[str, ...]], dict[str, list]] = {}
    for (stem, options, name), launches in launched.items():
        modules.setdefault((stem, options), {})[name] = launches
    records = []
    for (stem, options), kernels in sorted(modules.items()):
        src = kernel_source(stem)
        for arch in archs:
            res = compile_cuda(src, arch=arch, options=options)
            by_name = {k.kernel: k for k in res.kernels}
            for name in sorted(kernels):
                k = by_name[name]
                # the launch needing the most dynamic shared memory (then the most threads)
                grid, block, dyn = max(kernels[name], key=lambda g: (g[2], int(np.prod(g[1]))))
                threads = int(np.prod(block))
                smem = k.shared_bytes + dyn
                op, variant = name.rsplit("_", 1)
                records.append({
                    "backend": "cupy",
                    "op": op,
                    "kernel": name,
                    "variant": variant,
                    "arch": arch,
                    "registers": k.registers,
                    "shared_bytes": smem,
                    "stack_bytes": k.stack_bytes,
                    "spill_stores": k.spill_stores,
                    "spill_loads": k.spill_loads,
                    "block_threads": threads,
                    "occupancy": round(theoretical_occupancy(k.registers, smem, threads, arch), 4),
                    "static_shared_bytes": k.shared_bytes,
                    "dynamic_shared_bytes": dyn,
                    "barriers": k.barriers,
                    "file": f"kernels/{stem}.cu",
                    "options": list(options),
                })
    return records


def module_option_sets(defines: dict[str, dict[str, int]] | None = None) -> dict[str, tuple[tuple[str, ...], ...]]:
    """kernel file stem → every option set the backend may compile it with: the module's defines, and for each
    parameter chosen per launch (K_BLOCK, C_BLOCK set to 0) one set per width the planner picks from."""
    be = CupyBackend(runtime=RecordingRuntime(), defines=defines)
    widths = {"K_BLOCK": K_BLOCKS, "C_BLOCK": C_BLOCKS}
    out = {}
    for stem, d in be.defines.items():
        sets = [be.options(stem)]
        for name in (k for k, v in d.items() if not v):
            sets += [be.options(stem, ((name, w),)) for w in widths[name]]
        out[stem] = tuple(dict.fromkeys(sets))
    return out


# ------------------------------------------------------------------------------------------- fill table
#: Batch sizes of the fill table.
FILL_BATCHES = (64, 128, 256, 1024)


class SequenceRuntime(RecordingRuntime):
    """A RecordingRuntime that also keeps the launches in issue order: (stem, options, kernel, grid, block,
    dynamic shared memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence: list[tuple[str, tuple[str, ...], str, tuple, tuple, int]] = []

    def _launch(self, kernel, grid, block, args, shared_mem) -> None:
        super()._launch(kernel, grid, block, args, shared_mem)
        self.sequence.append((kernel.stem, kernel.options, kernel.name, tuple(grid), tuple(block), int(shared_mem)))


def lenet_launch_sequence(batch: int, sm_count: int, optimizer: str = "adam",
                          fused: bool = True) -> dict[str, list[tuple]]:
    """The launches of one LeNet5 training step and of one inference pass at ``batch``, in issue order, as
    the default cupy backend plans them for ``sm_count`` SMs: {"train": [...], "infer": [...]}."""
    from ...model import LeNet5

    out = {}
    for what in ("train", "infer"):
        rt = SequenceRuntime()
        be = CupyBackend(runtime=rt, fused=fused, graphs=False, sm_count=sm_count)
        model = LeNet5(backend=be, optimizer=optimizer, use_graphs=False, fused=fused)
        images = np.zeros((2 * batch, 28, 28), np.uint8)
        if what == "train":
            data = model.upload_dataset(images, np.zeros(2 * batch, np.uint8))
            model.begin_run(data, batch, shift=2)
            del rt.sequence[:]
            model.run_steps(data, 1)
        else:
            model.logits(images[:batch], batch_size=batch)  # warm-up: staging buffers
            del rt.sequence[:]
            model.logits(images[:batch], batch_size=batch)
        out[what] = list(rt.sequence)
    return out


def fill_table(batches: Sequence[int] = FILL_BATCHES, arch: str = "sm_90", sm_count: int = 132) -> list[dict]:
    """One record per launch of a training step and of an inference pass at each batch size: the kernel, its
    grid (blocks) and block (threads), registers and static shared memory from the NVRTC ptxas report of the
    options it is built with, the dynamic shared memory of the launch, the blocks resident per SM and the
    theoretical occupancy they give, and the waves on ``sm_count`` SMs (blocks / (SMs x resident blocks);
    ``blocks_per_sm`` = blocks / SMs: below 1, some SMs get no block)."""
    from ...harness.nvrtc import compile_cuda, max_active_blocks, theoretical_occupancy

    compiled: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    rows = []
    for batch in batches:
        for what, seq in lenet_launch_sequence(batch, sm_count).items():
            for i, (stem, options, name, grid, block, dyn) in enumerate(seq):
                key = (stem, options)
                if key not in compiled:
                    compiled[key] = {k.kernel: k for k in compile_cuda(kernel_source(stem), arch=arch,
                                                                       options=options).kernels}
                k = compiled[key][name]
                blocks, threads = int(np.prod(grid)), int(np.prod(block))
                smem = k.shared_bytes + dyn
                resident, limiter = max_active_blocks(k.registers, smem, threads, arch)
                rows.append({
                    "batch": batch, "pass": what, "index": i, "kernel": name, "op": name.rsplit("_", 1)[0],
                    "options": list(options), "grid": list(grid), "block": list(block), "blocks": blocks,
                    "threads": threads, "registers": k.registers, "static_shared_bytes": k.shared_bytes,
                    "dynamic_shared_bytes": dyn, "shared_bytes": smem, "resident_blocks_per_sm": resident,
                    "limiter": limiter, "occupancy": round(theoretical_occupancy(k.registers, smem, threads, arch), 4),
                    "blocks_per_sm": round(blocks / sm_count, 3),
                    "waves": round(blocks / (sm_count * max(1, resident)), 3), "arch": arch, "sm_count": sm_count,
                })
    return rows


def fill_summary(rows: list[dict]) -> list[dict]:
    """Per (pass, batch): launches, and how many launch fewer blocks than there are SMs."""
    out: dict[tuple[str, int], dict] = {}
    for r in rows:
        s = out.setdefault((r["pass"], r["batch"]), {"pass": r["pass"], "batch": r["batch"], "launches": 0,
                                                     "under_one_block_per_sm": 0, "kernels_under": []})
        s["launches"] += 1
        if r["blocks"] < r["sm_count"]:
            s["under_one_block_per_sm"] += 1
            s["kernels_under"].append(r["kernel"])
    return list(out.values())


def fill_markdown(rows: list[dict]) -> str:
    """The fill table as markdown: a summary, then every launch."""
    if not rows:
        return ""
    sm = rows[0]["sm_count"]
    lines = [f"# Launch fill (cupy, {rows[0]['arch']}, {sm} SMs; static: NVRTC ptxas + the backend's launch plans)",
             "", f"Launches per pass, and how many launch fewer than {sm} blocks (some SMs idle):", "",
             "| pass | batch | launches | < 1 block per SM | those kernels |", "| --- | --- | --- | --- | --- |"]
    for s in fill_summary(rows):
        lines.append(f"| {s['pass']} | {s['batch']} | {s['launches']} | {s['under_one_block_per_sm']} | "
                     f"{', '.join(s['kernels_under'])} |")
    cols = ("batch", "pass", "index", "kernel", "blocks", "threads", "registers", "shared_bytes",
            "resident_blocks_per_sm", "occupancy", "blocks_per_sm", "waves")
    lines += ["", "waves = blocks / (SMs × resident blocks per SM); occupancy = theoretical (resident warps / 64).",
              "", "| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
