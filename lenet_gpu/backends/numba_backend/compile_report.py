"""Static compile checks for the Numba kernels, with no GPU: every kernel is compiled to PTX by
``numba.cuda.compile_ptx`` with the exact signature its launches use (``SIGNATURES``), for each
architecture, then assembled by ptxas with ``-v`` for its resource report: the ptxas of the same CUDA
as the NVVM that made the PTX (``find_ptxas``: the CUDA 12 and CUDA 13 wheel layouts, $CUDA_HOME, PATH).

Each record: backend, op, kernel, variant, arch, registers, shared_bytes (static, plus the dynamic
shared memory the launch asks for at LeNet-5 shapes), stack_bytes, spill_stores, spill_loads,
block_threads (the launch's block at LeNet-5 shapes), occupancy (theoretical, on that arch) and
f64_instructions (PTX lines that use float64: must be 0 for these float32 kernels).

Must run in a process where NUMBA_ENABLE_CUDASIM is not set (the simulator has no compiler).

    python -m lenet_gpu.backends.numba_backend.compile_report --json numba_kernels.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import head as _head
from . import routed as _routed
from . import step4_bwd as _step4_bwd
from . import step4_fwd as _step4_fwd
from .backend import KERNELS, SIGNATURES, VARIANTS, launch_config, lenet_launches

#: the fused ops' kernels the report covers, op → variants: the dense head's two launches (head.py: the rows kernel
#: and the weight gradients; v2's table entry is its 1-row kernel, v3's and v4's LeNet-5's geometry, v4 its 8-row
#: kernel and "v4_r16", "v4_r32" its 16- and 32-row kernels (head.REPORT_KERNELS); wgrad v4, the plan's for v3 and
#: v4: v3's sums, the staging pipelined) and the four-kernel step's (step4_fwd.py, step4_bwd.py; docs/step4.md)
FUSED_REPORT_VARIANTS: dict[str, tuple[str, ...]] = {
    "head_train": (*_head.VARIANTS["head_train"], *(n[len("head_train_"):] for n in _head.REPORT_KERNELS)),
    "head_train_wgrad": _head.VARIANTS["head_train"],
    **_step4_fwd.VARIANTS, **_step4_bwd.VARIANTS,
}
#: the inference kernel (lenet_fwd.py): v1-v4 (uint8 images) and v3's and v4's float32-image specialisations
#: ("f32_v3", "f32_v4": lenet_fwd.REPORT_KERNELS). lenet_eval_v1 is left out: float64 by contract (its sums in
#: double), which this report flags
INFER_REPORT_VARIANTS: dict[str, tuple[str, ...]] = {"lenet_fwd": ("v1", "v2", "v3", "v4", "f32_v3", "f32_v4")}
#: the batch whose launch gives lenet_fwd's block and dynamic shared memory in the report: the largest tiles each
#: kernel runs (v1 4 images a block; v2 and v3's tiles 4; v4 16 images, past 48 KiB)
INFER_REPORT_BATCH = 10_000
#: the ops the report covers: the backend's table, the routed backward (routed.py, an optional op pair), the fused
#: kernels above and the inference kernel
REPORT_VARIANTS: dict[str, tuple[str, ...]] = {**VARIANTS, **_routed.VARIANTS, **FUSED_REPORT_VARIANTS,
                                               **INFER_REPORT_VARIANTS}

#: one launch of each op per LeNet-5 layer that uses it, at batch 64 (for block size and dynamic
#: shared memory)
LENET_LAUNCHES: dict[str, list[dict[str, Any]]] = {
    "batch_prepare": [{"x": (64, 1, 32, 32)}],
    "conv2d_fwd": [{"y": (64, 6, 28, 28), "w": (6, 1, 5, 5)}, {"y": (64, 16, 10, 10), "w": (16, 6, 5, 5)}],
    "conv2d_pool_fwd": [{"y": (64, 6, 28, 28), "w": (6, 1, 5, 5)}, {"y": (64, 16, 10, 10), "w": (16, 6, 5, 5)}],
    "conv2d_bwd_data": [{"dx": (64, 6, 14, 14), "w": (16, 6, 5, 5)}],
    "conv2d_bwd_weight": [{"dw": (6, 1, 5, 5)}, {"dw": (16, 6, 5, 5)}],
    "pool2x2_fwd": [{"y": (64, 6, 14, 14)}, {"y": (64, 16, 5, 5)}],
    "pool2x2_bwd": [{"dz": (64, 6, 28, 28)}, {"dz": (64, 16, 10, 10)}],
    "dense_fwd": [{"y": (64, 120)}, {"y": (64, 84)}, {"y": (64, 10)}],
    "dense_bwd": [{"x": (64, 400), "w": (120, 400), "dx": True}, {"x": (64, 120), "w": (84, 120), "dx": True}],
    "softmax_xent": [{}],
    "adam_step": [{"p": (62080,)}],
    "sgd_step": [{"p": (62080,)}],
    "step_advance": [{}],
    "conv2d_bwd_data_pool": [{"dzb": (64, 6, 28, 28), "w": (16, 6, 5, 5)}],
    "conv2d_bwd_weight_routed": [{"dw": (16, 6, 5, 5), "gz": (64, 16, 5, 5)},
                                 {"dw": (6, 1, 5, 5), "gz": (64, 6, 14, 14)}],
    "conv2d_bwd_data_routed": [{"gzb": (64, 6, 14, 14), "w": (16, 6, 5, 5)}],
}
#: the fused kernels: their launch in a LeNet-5 training step at batch 64 (backend.lenet_launches; head_train_v1
#: and _v2 from head.plan at batch 64, v2 its 1-row kernel; step_sgd's from the SGD step)
LENET_LAUNCHES.update({op: [{"batch": 64}] for op in FUSED_REPORT_VARIANTS})


def all_kernels() -> dict[str, tuple[Any, str]]:
    """Every kernel the report covers by name: (dispatcher, the signature its launches use)."""
    from . import lenet_fwd

    kernels = {**KERNELS, **_head.KERNELS, **_head.REPORT_KERNELS, **lenet_fwd.KERNELS, **lenet_fwd.REPORT_KERNELS,
               **_routed.KERNELS, **_step4_fwd.KERNELS, **_step4_bwd.KERNELS}
    signatures = {**SIGNATURES, **_head.SIGNATURES, **_head.REPORT_SIGNATURES, **lenet_fwd.SIGNATURES,
                  **lenet_fwd.REPORT_SIGNATURES, **_routed.SIGNATURES, **_step4_fwd.SIGNATURES,
                  **_step4_bwd.SIGNATURES}
    return {name: (k, signatures[name]) for name, k in kernels.items()}


def all_launch_bounds() -> dict[str, tuple[int, ...]]:
    """The launch bounds of every kernel that the GPU build compiles with some (by name)."""
    from . import lenet_fwd

    return {**_head.LAUNCH_BOUNDS, **lenet_fwd.LAUNCH_BOUNDS, **_routed.LAUNCH_BOUNDS, **_step4_fwd.LAUNCH_BOUNDS,
            **_step4_bwd.LAUNCH_BOUNDS}


_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_F64 = re.compile(r"\.f64\b")


# ------------------------------------------------------------------------------------ which ptxas
#
# numba-cuda compiles with the libNVVM it finds (cuda-pathfinder: the wheels first, then CUDA_HOME and the
# system), and that NVVM decides the PTX ISA version of the output (CUDA 12.9: .version 8.8; CUDA 13.x:
# .version 9.x). A ptxas older than the NVVM refuses it ("Unsupported .version 9.5"), so the ptxas must
# come from the same CUDA as the NVVM. Where the wheels keep them:
#   CUDA 12: nvidia-cuda-nvcc-cu12    → nvidia/cuda_nvcc/bin/ptxas, NVVM in nvidia/cuda_nvcc/nvvm/lib64/
#   CUDA 13: nvidia-cuda-nvcc (13.x)  → nvidia/cu13/bin/ptxas, NVVM (nvidia-nvvm) in nvidia/cu13/lib/
#   (numba-cuda[cu13] brings NVVM but no ptxas: cuda-toolkit[nvcc]==13.* adds it)
# A toolkit install keeps both under one root: <root>/bin/ptxas and <root>/nvvm/lib64/libnvvm.so.

#: ptxas relative to the ``nvidia`` namespace package, in the wheel layouts above, newest CUDA first
WHEEL_PTXAS = ("cu13/bin/ptxas", "cuda_nvcc/bin/ptxas")
_RELEASE = re.compile(r"release (\d+)\.(\d+)")
_PTX_VERSION = re.compile(r"^\s*\.version\s+(\d+)\.(\d+)", re.M)


class PtxasMismatch(RuntimeError):
    """No ptxas here can assemble the PTX that the NVVM in use makes. The message is one line."""


@dataclass(frozen=True)
class Ptxas:
    """A ptxas binary, the CUDA release it belongs to (None where ``--version`` said nothing readable), and
    where it was found."""

    path: str
    version: tuple[int, int] | None
    origin: str

    @property
    def version_str(self) -> str:
        return "CUDA " + ".".join(map(str, self.version)) if self.version else "CUDA version unknown"


def ptx_isa(ptx: str) -> tuple[int, int] | None:
    """The PTX ISA version a PTX text declares (``.version 9.5`` → (9, 5))."""
    m = _PTX_VERSION.search(ptx)
    return (int(m[1]), int(m[2])) if m else None


def min_cuda_for_isa(isa: tuple[int, int]) -> tuple[int, int]:
    """The first CUDA release whose ptxas accepts PTX ISA ``isa`` (PTX ISA 9.x is CUDA 13.x; 8.0–8.5 are
    CUDA 12.0–12.5, 8.6 12.7, 8.7 12.8, 8.8 12.9; 7.x is CUDA 11.x)."""
    major, minor = isa
    if major >= 9:
        return (major + 4, minor)
    if major == 8:
        return {6: (12, 7), 7: (12, 8), 8: (12, 9)}.get(minor, (12, minor) if minor <= 5 else (12, 9))
    if major == 7:
        return (11, minor)
    return (10, 0)


@functools.cache
def ptxas_version(exe: str) -> tuple[int, int] | None:
    """The CUDA release of a ptxas binary, from ``ptxas --version`` ("... release 13.5, V13.5.37")."""
    try:
        res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _RELEASE.search(res.stdout + res.stderr)
    return (int(m[1]), int(m[2])) if m else None


def nvvm_in_use() -> Path | None:
    """The libNVVM numba-cuda compiles with (None where it cannot be found)."""
    try:
        from numba.cuda.cuda_paths import get_cuda_paths

        info = get_cuda_paths()["nvvm"].info
    except Exception:  # noqa: BLE001 - no NVVM, or another numba-cuda layout
        return None
    return Path(info) if info else None


def nvidia_roots() -> list[Path]:
    """The folders of the ``nvidia`` namespace package (where the CUDA wheels install)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def ptxas_candidates(nvvm: Path | None = None, roots: Sequence[Path] | None = None, cuda_home: str | None = None,
                     path_env: str | None = None) -> list[Ptxas]:
    """Every ptxas here, most fitting first: beside the NVVM in use (the same CUDA), then the wheel layouts
    (newest CUDA first), then $CUDA_HOME/$CUDA_PATH, then PATH. Defaults: what this process uses."""
    found: list[tuple[Path, str]] = []
    if nvvm is not None:  # <root>/lib/libnvvm.so (CUDA 13 wheel) or <root>/nvvm/lib64/libnvvm.so
        for parent in list(Path(nvvm).parents)[1:4]:
            found.append((parent / "bin" / "ptxas", f"beside the NVVM in use ({nvvm})"))
    for root in nvidia_roots() if roots is None else roots:
        for rel in WHEEL_PTXAS:
            found.append((Path(root) / rel, f"wheel layout nvidia/{rel}"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = cuda_home if var == "CUDA_HOME" and cuda_home is not None else os.environ.get(var)
        if home:
            found.append((Path(home) / "bin" / "ptxas", f"${var}"))
    on_path = shutil.which("ptxas", path=path_env)
    if on_path:
        found.append((Path(on_path), "PATH"))
    out, seen = [], set()
    for exe, origin in found:
        if exe.is_file() and os.access(exe, os.X_OK):
            key = exe.resolve()
            if key not in seen:
                seen.add(key)
                out.append(Ptxas(str(exe), ptxas_version(str(exe)), origin))
    return out


_AUTO = Path("<the NVVM numba-cuda uses>")


def find_ptxas(ptx: str | None = None, *, nvvm: Path | None = _AUTO, roots: Sequence[Path] | None = None,
               cuda_home: str | None = None, path_env: str | None = None) -> Ptxas:
    """The ptxas to assemble ``ptx`` with: the first candidate (ptxas_candidates) whose CUDA release accepts
    the PTX's ISA version; without ``ptx``, the first candidate. ``nvvm`` defaults to the NVVM numba-cuda
    uses (None: none). Raises FileNotFoundError (no ptxas at all) or PtxasMismatch (none new enough), each
    one line."""
    nvvm = nvvm_in_use() if nvvm is _AUTO else nvvm
    cands = ptxas_candidates(nvvm, roots, cuda_home, path_env)
    if not cands:
        raise FileNotFoundError(
            "ptxas not found: install the ptxas of the CUDA that NVVM comes from (CUDA 12: nvidia-cuda-nvcc-cu12, "
            "the cuda12 extra; CUDA 13: cuda-toolkit[nvcc]==13.*), or put one on PATH")
    isa = ptx_isa(ptx) if ptx else None
    if isa is None:
        return cands[0]
    need = min_cuda_for_isa(isa)
    for c in cands:
        if c.version is not None and c.version >= need:
            return c
    for c in cands:
        if c.version is None:
            return c  # cannot tell: let it try (compile_kernel turns a refusal into PtxasMismatch)
    raise PtxasMismatch(_mismatch(isa, need, nvvm, cands))


def _mismatch(isa: tuple[int, int], need: tuple[int, int], nvvm: Path | None, cands: Sequence[Ptxas]) -> str:
    have = ", ".join(f"{c.path} ({c.version_str})" for c in cands)
    wheel = (f"cuda-toolkit[nvcc]=={need[0]}.* (ptxas in nvidia/cu{need[0]}/bin)" if need[0] >= 13
             else "nvidia-cuda-nvcc-cu12 (ptxas in nvidia/cuda_nvcc/bin)")
    return (f"no ptxas here can assemble PTX ISA {isa[0]}.{isa[1]} from NVVM {nvvm or '(unknown)'}: it needs CUDA >= "
            f"{need[0]}.{need[1]}, found {have}; install {wheel}, the same CUDA as the NVVM")


def ptxas_path() -> str:
    """The first ptxas candidate (see find_ptxas; FileNotFoundError where there is none)."""
    return find_ptxas().path


def f64_lines(ptx: str) -> list[str]:
    """PTX lines (comments stripped) that declare or use float64: any of add.f64, mul.f64, fma.rn.f64,
    cvt.f64.f32, cvt.rn.f32.f64, setp.*.f64, ld/st .f64, .reg .f64, ..."""
    out = []
    for line in ptx.splitlines():
        code = line.split("//", 1)[0]
        if _F64.search(code):
            out.append(code.strip())
    return out


_OPCODE = re.compile(r"^\s*(?:@%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*)", re.M)


def int_arith_stats(ptx: str) -> dict[str, int]:
    """Counts of the PTX instructions that betray 64-bit or signed index arithmetic in a Numba kernel: integer
    divisions and remainders by width and sign (``div.s64`` ... ``rem.u32``; a division by a constant becomes
    a multiply, so these are divisions by run-time values), ``selp`` (Numba's wraparound of signed subscripts
    and Python's floor-division fix-ups compile to selects), and 64-bit integer arithmetic (``add``, ``sub``,
    ``mul``, ``mad``, ``shl``, ``shr`` on .s64/.u64, which includes the address arithmetic of every load)."""
    ops = _OPCODE.findall(ptx[ptx.find(".entry"):])
    out = {f"{d}.{t}": 0 for d in ("div", "rem") for t in ("s64", "u64", "s32", "u32")}
    out.update(selp=0, int64_ops=0)
    for op in ops:
        parts = op.split(".")
        key = f"{parts[0]}.{parts[-1]}"
        if key in out:
            out[key] += 1
        if parts[0] == "selp":
            out["selp"] += 1
        if parts[0] in ("add", "sub", "mul", "mad", "shl", "shr") and parts[-1] in ("s64", "u64"):
            out["int64_ops"] += 1
    return out


#: compile_kernel's results in this process, by (name, arch, signature)
_COMPILED: dict[tuple[str, str, str | None], tuple[str, str]] = {}
#: the kernels that take longest to compile (5 to 13 s each on the 2-core machine, 2026-12-05), started first by
#: prefetch so that the pool's workers finish together
SLOW_FIRST = ("head_train_v4_r32", "head_train_v4_r16", "head_train_v4", "head_train_v2", "lenet_fwd_v2",
              "lenet_fwd_v3", "lenet_fwd_f32_v3", "head_train_wgrad_v2", "head_train_wgrad_v3", "step_fwd_v1",
              "head_train_v3", "step_bwd_v1", "head_train_v1")


def compile_kernel(name: str, arch: str, signature: str | None = None) -> tuple[str, str]:
    """(PTX, ptxas -v log) of kernel ``name`` for ``arch`` (e.g. "sm_90"); cached per process (and filled ahead by
    ``prefetch``)."""
    key = (name, arch, signature)
    if key not in _COMPILED:
        _COMPILED[key] = _compile_kernel(name, arch, signature)
    return _COMPILED[key]


def prefetch(pairs: Sequence[tuple[str, str]], workers: int | None = None) -> None:
    """Compile these (kernel, arch) pairs into compile_kernel's cache on ``workers`` processes (default: this
    process's cores, at most 8). Numba compiles one kernel at a time in a process (a global compiler lock), and a
    compile is seconds of one core (NVVM), so a report of 38 kernels × 2 archs on one core takes about 150 s.
    With one worker, or one pair to do, it compiles here. A worker's failure is raised here as it would be by
    compile_kernel."""
    todo = [(n, a) for n, a in dict.fromkeys(pairs) if (n, a, None) not in _COMPILED]
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers <= 1 or len(todo) <= 1:
        for n, a in todo:
            compile_kernel(n, a)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    rank = {n: i for i, n in enumerate(SLOW_FIRST)}
    todo.sort(key=lambda p: rank.get(p[0], len(SLOW_FIRST)))
    # spawn: a worker starts clean (no threads, no CUDA state of this process), imports this module, compiles
    # a worker takes a kernel's archs together: one lowering, one NVVM + ptxas per arch (_lowered)
    archs: dict[str, list[str]] = {}
    for n, a in todo:
        archs.setdefault(n, []).append(a)
    with cf.ProcessPoolExecutor(min(workers, len(archs)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_compile_archs, n, tuple(a)): n for n, a in archs.items()}
        for f in cf.as_completed(futures):
            for a, built in f.result().items():
                _COMPILED[(futures[f], a, None)] = built


def _compile_archs(name: str, archs: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """prefetch's work item: kernel ``name`` for each of ``archs``, in one worker (one lowering)."""
    return {a: _compile_kernel(name, a) for a in archs}


#: kernels lowered in this process (Numba's typing and LLVM lowering, ~95% of a compile: 10 s of 10.5 for
#: head_train_v3, 29 of 30.5 for lenet_fwd_v3 on the 2-core machine, 2026-12-06, when Numba still inlined the device
#: functions; 4.7 s and 1.7 s whole since NVVM inlines them, 2026-12-07), by (name, signature, which side of
#: numba-cuda's two arch thresholds the arch is on): NVVM makes each arch's PTX from the same library, so a second arch
#: costs its NVVM and ptxas (1 to 2 s), not a second lowering. numba-cuda's lowering reads the arch only at 6.0
#: (float64 atomics) and 7.5 (fastmath tanh), so sm_80 and sm_90 lower alike (test_numba_compile's
#: test_shared_lowering_gives_compile_ptx_code checks it against compile_ptx)
_LIBS: dict[tuple[str, str | None, bool, bool], Any] = {}


def _lowered(name: str, signature: str | None, cc: tuple[int, int]) -> Any:
    """The code library of kernel ``name`` (its signature, its launch bounds) lowered for ``cc``'s class; None where
    this numba-cuda has no _compile_pyfunc_with_fixup (compile_ptx then lowers once per arch)."""
    key = (name, signature, cc >= (6, 0), cc >= (7, 5))
    if key not in _LIBS:
        try:
            from numba.cuda.compiler import _compile_pyfunc_with_fixup
        except ImportError:
            _LIBS[key] = None
        else:
            kernel, sig = all_kernels()[name]
            # compile_ptx's own call for a kernel, with its defaults (numba-cuda 0.30), less its last step (the
            # library's PTX for cc)
            _LIBS[key], _ = _compile_pyfunc_with_fixup(
                kernel.py_func, signature or sig, debug=None, lineinfo=False, device=False, fastmath=False, cc=cc,
                opt=None, abi="numba", abi_info=None, forceinline=False, launch_bounds=all_launch_bounds().get(name),
                lto=False)
    return _LIBS[key]


def _compile_kernel(name: str, arch: str, signature: str | None = None) -> tuple[str, str]:
    from numba import cuda

    cc = (int(arch[3:-1]), int(arch[-1]))
    lib = _lowered(name, signature, cc)
    if lib is not None:
        ptx = lib.get_asm_str(cc=cc)
    else:
        kernel, sig = all_kernels()[name]  # the fused, routed and step ops' kernels have their own tables
        # with the launch bounds the kernel is compiled with for the GPU (its registers depend on them)
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature or sig, cc=cc, launch_bounds=all_launch_bounds().get(name))
    ptxas = find_ptxas(ptx)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [ptxas.path, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / f"{name}.cubin")],
            capture_output=True, text=True, check=False,
        )
    if res.returncode != 0:
        isa = ptx_isa(ptx)
        if "Unsupported .version" in res.stderr and isa is not None:
            raise PtxasMismatch(_mismatch(isa, min_cuda_for_isa(isa), nvvm_in_use(), [ptxas]))
        raise RuntimeError(f"ptxas failed for {name} ({arch}):\n{res.stderr}")
    return ptx, res.stderr


def parse_ptxas(log: str) -> dict[str, int]:
    """registers, static shared_bytes, stack_bytes, spill_stores, spill_loads of the one kernel in log."""
    regs = _REGS.search(log)
    frame = _FRAME.search(log)
    smem = _SMEM.search(log)
    if regs is None or frame is None:
        raise ValueError(f"unexpected ptxas output:\n{log}")
    return {
        "registers": int(regs[1]),
        "shared_bytes": int(smem[1]) if smem else 0,
        "stack_bytes": int(frame[1]),
        "spill_stores": int(frame[2]),
        "spill_loads": int(frame[3]),
    }


def _occupancy(registers: int, shared_bytes: int, block_threads: int, arch: str) -> float:
    try:
        from lenet_gpu.harness.nvrtc import theoretical_occupancy
    except ImportError:  # pragma: no cover - the harness ships with the package
        return _occupancy_fallback(registers, shared_bytes, block_threads)
    return theoretical_occupancy(registers, shared_bytes, block_threads, arch)


def _occupancy_fallback(registers: int, shared_bytes: int, block_threads: int) -> float:
    """sm_80/sm_90 limits: 64K registers, 2048 threads, 32 blocks, ~227 KiB shared per SM."""
    warps = -(-block_threads // 32)
    by_regs = 65536 // max(1, -(-max(registers, 1) * 32 // 256) * 256 * warps)
    by_smem = (227 * 1024) // shared_bytes if shared_bytes else 32
    blocks = min(32, 2048 // (warps * 32), by_regs, by_smem)
    return blocks * warps / 64


def _launch_facts(op: str, variant: str) -> tuple[int, int]:
    """(block threads, most dynamic shared bytes) over the LeNet-5 launches of op/variant."""
    threads, dyn = 0, 0
    if op in INFER_REPORT_VARIANTS:
        from . import lenet_fwd

        v = variant.removeprefix("f32_")
        n, sms = INFER_REPORT_BATCH, lenet_fwd.DEFAULT_SM_COUNT
        if v == "v3":  # lenet_fwd_v3's own tiles (v3's plan runs lenet_fwd_v4 at this batch)
            return lenet_fwd.THREADS_V2, lenet_fwd.plan_v2(n, 120, 84, sms)[2]
        _, block, sh = lenet_fwd.launch_shape(v, n, 120, 84, sms)
        return block, sh
    if op in FUSED_REPORT_VARIANTS:
        if f"{op}_{variant}" in _head.REPORT_KERNELS:  # v4's 16- and 32-row kernels: static shared memory only
            return _head.V4_REPORT_ROWS[f"{op}_{variant}"] * 8, 0
        if op.startswith("head_train"):
            launch = _head.plan(variant, 64, 400, 120, 84, 10)[op == "head_train_wgrad"]
            return launch[2], launch[3]
        if op == "step_fwd":  # the variant's own block (batch 64's plan runs v1 only)
            from . import step4_fwd

            return step4_fwd.SF_THREADS, step4_fwd.step_fwd_smem(variant)
        plan = lenet_launches(64, optimizer="sgd" if op == "step_sgd" else "adam")
        _, _, _, block, sh = next(p for p in plan if p[0] == op)
        return int(block), sh
    for shapes in LENET_LAUNCHES[op]:
        _, block, sh = launch_config(op, variant, shapes)
        threads = max(threads, math.prod(block) if isinstance(block, tuple) else int(block))
        dyn = max(dyn, sh)
    return threads, dyn


def compile_report(archs: Sequence[str] = ("sm_80", "sm_90"), include_ptx: bool = False) -> list[dict]:
    """One record per kernel × arch (see the module docstring). ``include_ptx`` adds the PTX text."""
    records = []
    prefetch([(f"{op}_{v}", arch) for op, vs in REPORT_VARIANTS.items() for v in vs for arch in archs])
    for op, variants in REPORT_VARIANTS.items():
        for variant in variants:
            name = f"{op}_{variant}"
            threads, dyn = _launch_facts(op, variant)
            for arch in archs:
                ptx, log = compile_kernel(name, arch)
                res = parse_ptxas(log)
                shared = res.pop("shared_bytes") + dyn
                rec: dict[str, Any] = {
                    "backend": "numba", "op": op, "kernel": name, "variant": variant, "arch": arch,
                    "registers": res["registers"], "shared_bytes": shared, **res,
                    "block_threads": threads,
                    "occupancy": round(_occupancy(res["registers"], shared, threads, arch), 4),
                    "f64_instructions": len(f64_lines(ptx)),
                }
                if include_ptx:
                    rec["ptx"] = ptx
                records.append(rec)
    return records


def format_table(records: list[dict]) -> str:
    cols = ["kernel", "arch", "registers", "shared_bytes", "stack_bytes", "spill_stores", "spill_loads",
            "block_threads", "occupancy", "f64_instructions"]
    rows = [cols] + [[str(r[c]) for c in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lenet_gpu.backends.numba_backend.compile_report",
        description="Compile every Numba kernel with compile_ptx + ptxas -v (no GPU needed) and report "
        "registers, shared memory, stack, spills, block size, occupancy and float64 use.",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the records to this JSON file")
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="architectures (default: sm_80 sm_90)")
    args = parser.parse_args(argv)
    import numba

    if numba.config.ENABLE_CUDASIM:
        print("compile_report: unset NUMBA_ENABLE_CUDASIM (the simulator cannot compile)", file=sys.stderr)
        return 2
    records = compile_report(tuple(args.arch))
    print(format_table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    bad = [r["kernel"] + "@" + r["arch"] for r in records
           if r["spill_stores"] or r["spill_loads"] or r["f64_instructions"]]
    if bad:
        print(f"spills or float64 in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
