"""Static kernel report: registers, shared memory, stack, spills, block size and theoretical occupancy of
every kernel of the cupy (CUDA C, NVRTC) and numba backends, at the launch shapes the backends use at
LeNet sizes. Needs no GPU.

Writes reports/kernels.json (one record per backend × kernel × arch) and reports/kernels.md (a table); with
the fill table of both backends, reports/fill.json and reports/fill.md: every launch of one training
step and one inference pass at batch 64, 128, 256 and 1024 with its blocks, threads, registers, shared
memory, resident blocks per SM, theoretical occupancy and waves on 132 SMs, and per pass how many launches
leave SMs without a block.

    python scripts/kernel_report.py                 # both backends, sm_80 and sm_90, and the fill table
    python scripts/kernel_report.py --arch sm_90 --backend cupy
    python scripts/kernel_report.py --backend cupy --fill-batches 256 --sm-count 132
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: backend → (module, function) giving its kernel table at LeNet's launch shapes
BACKEND_MODULES = {
    "cupy": ("bench.launches", "cupy_kernel_records"),
    "numba": ("lenet_gpu.backends.numba_backend.compile_report", "compile_report"),
}
COLUMNS = ("backend", "kernel", "arch", "registers", "shared_bytes", "stack_bytes", "spill_stores", "spill_loads",
           "block_threads", "occupancy")


def collect(backends: Sequence[str], archs: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Records of every backend whose compile_report can be imported, and notes on those skipped."""
    records, notes = [], []
    for name in backends:
        module, func = BACKEND_MODULES[name]
        try:
            mod = importlib.import_module(module)
            records += getattr(mod, func)(archs=tuple(archs))
        except ImportError as e:
            notes.append(f"{name}: skipped ({e})")
    return records, notes


def markdown(records: list[dict], notes: Sequence[str] = ()) -> str:
    lines = [
        "# Kernel resources (static: NVRTC / Numba + ptxas, no GPU)",
        "",
        "shared_bytes = static + dynamic shared memory of the launch at LeNet sizes; occupancy = theoretical",
        "(resident warps / max warps per SM) from registers, shared memory and block size.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for r in sorted(records, key=lambda r: (r["backend"], r["op"], r["kernel"], r["arch"])):
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    spills = [r for r in records if r.get("spill_stores") or r.get("spill_loads")]
    lines += ["", f"{len(records)} records; {len(spills)} with spills."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_fill(out: Path, backends: Sequence[str], batches: Sequence[int], arch: str, sm_count: int) -> list[dict]:
    """The fill table of every launch of a training step and an inference pass (bench.launches) to
    OUT/fill.json and OUT/fill.md; prints its summary."""
    from bench.launches import fill_markdown, fill_records, fill_summary

    rows, notes = fill_records(backends, batches, arch, sm_count)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fill.json").write_text(json.dumps({"rows": rows, "summary": fill_summary(rows), "notes": notes},
                                              indent=1) + "\n")
    md = fill_markdown(rows, notes)
    (out / "fill.md").write_text(md)
    print(md.split("\n\nwaves =")[0] + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes OUT/kernels.json and OUT/kernels.md.",
    )
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="architectures (default: sm_80 sm_90)")
    p.add_argument("--backend", nargs="+", choices=sorted(BACKEND_MODULES), default=sorted(BACKEND_MODULES),
                   help="backends to report (default: all whose compile_report imports)")
    p.add_argument("--out", type=Path, default=ROOT / "reports", help="output folder (default: reports/)")
    p.add_argument("--fill-batches", type=lambda v: [int(x) for x in v.split(",") if x.strip()],
                   default=[64, 128, 256, 1024],
                   help="batch sizes of the fill table (default 64,128,256,1024; an empty string: no table)")
    p.add_argument("--sm-count", type=int, default=132, help="SMs the fill table plans for (default 132, an H100)")
    p.add_argument("--fill-arch", default="sm_90", help="architecture of the fill table's registers (default sm_90)")
    args = p.parse_args(argv)
    if args.fill_batches:
        write_fill(args.out, args.backend, args.fill_batches, args.fill_arch, args.sm_count)
    records, notes = collect(args.backend, args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(records, indent=1) + "\n")
    md = markdown(records, notes)
    (args.out / "kernels.md").write_text(md)
    print(md)
    bad = [r["kernel"] for r in records if r.get("spill_stores") or r.get("spill_loads")]
    if bad:
        print(f"spills in: {', '.join(sorted(set(bad)))}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
