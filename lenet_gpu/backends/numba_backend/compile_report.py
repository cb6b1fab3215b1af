"""Static compile checks for the Numba kernels, with no GPU: every kernel is compiled to PTX by
``numba.cuda.compile_ptx`` with the exact signature its launches use (``SIGNATURES``), for each
architecture, then assembled by ptxas (from the nvidia-cuda-nvcc-cu12 wheel) with ``-v`` for its
resource report.

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
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backend import KERNELS, SIGNATURES, VARIANTS, launch_config

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
}

_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_F64 = re.compile(r"\.f64\b")


def ptxas_path() -> str:
    """ptxas from the nvidia-cuda-nvcc-cu12 wheel, else from PATH."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    for root in (spec.submodule_search_locations or []) if spec else []:
        exe = Path(root) / "bin" / "ptxas"
        if exe.is_file():
            return str(exe)
    exe = shutil.which("ptxas")
    if exe is None:
        raise FileNotFoundError("ptxas not found: install nvidia-cuda-nvcc-cu12 (the cuda12 extra)")
    return exe


def f64_lines(ptx: str) -> list[str]:
    """PTX lines (comments stripped) that declare or use float64: any of add.f64, mul.f64, fma.rn.f64,
    cvt.f64.f32, cvt.rn.f32.f64, setp.*.f64, ld/st .f64, .reg .f64, ..."""
    out = []
    for line in ptx.splitlines():
        code = line.split("//", 1)[0]
        if _F64.search(code):
            out.append(code.strip())
    return out


@functools.cache
def compile_kernel(name: str, arch: str, signature: str | None = None) -> tuple[str, str]:
    """(PTX, ptxas -v log) of kernel ``name`` for ``arch`` (e.g. "sm_90"); cached per process."""
    from numba import cuda

    cc = (int(arch[3:-1]), int(arch[-1]))
    ptx, _ = cuda.compile_ptx(KERNELS[name].py_func, signature or SIGNATURES[name], cc=cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [ptxas_path(), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / f"{name}.cubin")],
            capture_output=True, text=True, check=False,
        )
    if res.returncode != 0:
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
    for shapes in LENET_LAUNCHES[op]:
        _, block, sh = launch_config(op, variant, shapes)
        threads = max(threads, math.prod(block) if isinstance(block, tuple) else int(block))
        dyn = max(dyn, sh)
    return threads, dyn


def compile_report(archs: Sequence[str] = ("sm_80", "sm_90"), include_ptx: bool = False) -> list[dict]:
    """One record per kernel × arch (see the module docstring). ``include_ptx`` adds the PTX text."""
    records = []
    for op, variants in VARIANTS.items():
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
