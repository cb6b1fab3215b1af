"""Static report tools for the cupy backend's kernels: NVRTC + ptxas resources joined with recorded launch
shapes. Needs no GPU, and knows nothing of LeNet: bench/launches.py drives the model over a
``RecordingRuntime`` (a Runtime that computes nothing and records each launch: kernel, grid, block,
dynamic shared memory) and hands the recorded launches to ``kernel_records``.

Each kernel is compiled with NVRTC, with exactly the options the backend loads it with, for each
architecture, and the ptxas report (registers, static shared memory, stack, spills) is joined with the
recorded launches: ``shared_bytes`` = static + the largest dynamic shared memory of its launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import fused
from .backend import C_BLOCKS, K_BLOCKS, OP_KERNELS, CupyBackend
from .runtime import Runtime, define_options, kernel_source


class _RecordedKernel:
    def __init__(self, stem: str, name: str, options: tuple[str, ...]) -> None:
        self.stem, self.name, self.options = stem, name, options
        #: as a CuPy kernel's: Runtime.allow_shared raises it for a launch past 48 KiB (lenet_fwd_v4)
        self.max_dynamic_shared_size_bytes = 48 * 1024


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


def kernel_records(launched: dict[tuple[str, tuple[str, ...], str], list[tuple[tuple, tuple, int]]],
                   archs: Sequence[str] = ("sm_80", "sm_90")) -> list[dict]:
    """One record per (recorded kernel, arch): backend, op, kernel, variant, arch, registers, shared_bytes
    (static + the dynamic smem of its recorded launches), stack_bytes, spill_stores, spill_loads,
    block_threads, occupancy; plus static/dynamic shared bytes, barriers and the compile options.
    ``launched`` is a RecordingRuntime's ``launched``."""
    from ...harness.nvrtc import compile_cuda, theoretical_occupancy

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
        if stem in fused.DEFINES:  # fused.py's modules: its defines, and head_train_v2 per rows per block
            base = {**fused.DEFINES[stem], **(defines or {}).get(stem, {})}
            sets = [define_options(base)]
            if stem == fused.STEMS["head_train"]:
                sets += [define_options({**base, "HEAD_ROWS": r}) for r in fused.HEAD_ROWS_CHOICES]
                # v3: LeNet-5's geometry compiled in (head_train_v3 at one row a block, v2's rows kernel beyond)
                geom = dict(fused.head_v3_defines(fused.HEAD_LENET_GEOM, 120, 84, 10))
                sets += [define_options({**base, **geom})]
                sets += [define_options({**base, **geom, "HEAD_ROWS": r}) for r in fused.HEAD_ROWS_CHOICES[1:]]
                # v4's rows kernel (v3's plan at large batches, v4 by name) at each rows a block
                sets += [define_options({**base, **geom, "HEAD4_ROWS": r}) for r in fused.HEAD4_ROWS_CHOICES]
            out[stem] = tuple(dict.fromkeys(sets))
            continue
        sets = [be.options(stem)]
        for name in (k for k, v in d.items() if not v):
            sets += [be.options(stem, ((name, w),)) for w in widths[name]]
        if stem == OP_KERNELS["conv2d_bwd_weight_routed"][0]:  # the routed v2 kernels' compile-time geometry
            sets += [be.options(stem, extra) for extra in ROUTED_GEOMETRY]
        out[stem] = tuple(dict.fromkeys(sets))
    return out


#: the per-launch defines of the routed v2 kernels at LeNet-5's layers (backend.plan): the weight gradient of
#: C1 and C3 (both 5x5: RT_R, RT_S) and C3's data gradient into S2 (6 channels: RT_C)
ROUTED_GEOMETRY: tuple[tuple[tuple[str, int], ...], ...] = (
    (("RT_R", 5), ("RT_S", 5)),
    (("RT_C", 6), ("RT_R", 5), ("RT_S", 5)),
)


class SequenceRuntime(RecordingRuntime):
    """A RecordingRuntime that also keeps the launches in issue order: (stem, options, kernel, grid, block,
    dynamic shared memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence: list[tuple[str, tuple[str, ...], str, tuple, tuple, int]] = []

    def _launch(self, kernel, grid, block, args, shared_mem) -> None:
        super()._launch(kernel, grid, block, args, shared_mem)
        self.sequence.append((kernel.stem, kernel.options, kernel.name, tuple(grid), tuple(block), int(shared_mem)))
