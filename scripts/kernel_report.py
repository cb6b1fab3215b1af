"""Static kernel report: registers, shared memory, stack, spills, block size and theoretical occupancy of
every kernel of the cupy (CUDA C, NVRTC) and numba backends, at the launch shapes the backends use at
LeNet sizes. Needs no GPU.

Writes reports/kernels.json (one record per backend × kernel × arch) and reports/kernels.md (a table).
With --fill, also the fill table: every launch of one training step and one inference pass at batch
64, 128, 256 and 1024 with its grid, block, waves on the SMs, registers, shared memory and theoretical
occupancy (reports/fill.json, reports/fill.md).

    python scripts/kernel_report.py                 # both backends, sm_80 and sm_90
    python scripts/kernel_report.py --arch sm_90 --backend cupy
    python scripts/kernel_report.py --fill --arch sm_90 --backend numba
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BACKEND_MODULES = {
    "cupy": "lenet_gpu.backends.cupy_backend.compile_report",
    "numba": "lenet_gpu.backends.numba_backend.compile_report",
}
COLUMNS = ("backend", "kernel", "arch", "registers", "shared_bytes", "stack_bytes", "spill_stores", "spill_loads",
           "block_threads", "occupancy")


def collect(backends: Sequence[str], archs: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Records of every backend whose compile_report can be imported, and notes on those skipped."""
    records, notes = [], []
    for name in backends:
        try:
            mod = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as e:
            notes.append(f"{name}: skipped ({e})")
            continue
        records += mod.compile_report(archs=tuple(archs))
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


# ------------------------------------------------------------------------------------------ fill table
#
# One record per launch: backend, pass ("train": one training step, "infer": one inference pass), batch,
# index (launch order), kernel, grid_blocks, block_threads, waves, registers, shared_bytes (static +
# dynamic), occupancy (theoretical, on the arch). waves = grid blocks / (SMs × blocks resident per SM at
# that occupancy): 1.0 fills every SM once. Each backend adds a ``<backend>_fill_records`` function.

FILL_BATCHES = (64, 128, 256, 1024)
FILL_SMS = 132  # an H100 / H200 SXM
FILL_COLUMNS = ("backend", "pass", "batch", "index", "kernel", "grid_blocks", "block_threads", "waves", "registers",
                "shared_bytes", "occupancy")


def _waves(grid: int, threads: int, occupancy: float, sms: int) -> float:
    per_sm = occupancy * 64 / math.ceil(threads / 32)  # resident blocks per SM (64 warp slots)
    return round(grid / (sms * per_sm), 3) if per_sm > 0 else math.inf


def numba_fill_records(batches: Sequence[int] = FILL_BATCHES, arch: str = "sm_90", sms: int = FILL_SMS) -> list[dict]:
    """The numba backend's launches (backend.lenet_launches: the default variants, both fused ops) with
    each kernel's ptxas figures (compile_report.compile_kernel, cached per process)."""
    from lenet_gpu.backends.numba_backend import compile_report as ncr
    from lenet_gpu.backends.numba_backend.backend import lenet_launches

    records = []
    for batch in batches:
        for pass_name, training in (("train", True), ("infer", False)):
            for index, (op, variant, grid, block, dyn) in enumerate(lenet_launches(batch, training)):
                name = f"{op}_{variant}"
                res = ncr.parse_ptxas(ncr.compile_kernel(name, arch)[1])
                threads = math.prod(block) if isinstance(block, tuple) else int(block)
                shared = res["shared_bytes"] + dyn
                occ = ncr._occupancy(res["registers"], shared, threads, arch)
                records.append({
                    "backend": "numba", "pass": pass_name, "batch": batch, "index": index, "kernel": name,
                    "grid_blocks": grid, "block_threads": threads, "waves": _waves(grid, threads, occ, sms),
                    "registers": res["registers"], "shared_bytes": shared, "occupancy": round(occ, 4),
                })
    return records


FILL_BACKENDS = {"numba": numba_fill_records}


def fill_markdown(records: list[dict], arch: str, sms: int = FILL_SMS) -> str:
    lines = [
        f"# Launch fill ({arch}, {sms} SMs; static: grids from the launch plans, registers from ptxas)",
        "",
        "waves = grid blocks / (SMs × blocks resident per SM at the theoretical occupancy); 1.0 fills every SM",
        "once. One training step and one inference pass per batch size, launches in order.",
        "",
        "| " + " | ".join(FILL_COLUMNS) + " |",
        "| " + " | ".join("---" for _ in FILL_COLUMNS) + " |",
    ]
    for r in records:
        lines.append("| " + " | ".join(str(r[c]) for c in FILL_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--fill", action="store_true", help="also the fill table of every launch (first --arch)")
    args = p.parse_args(argv)
    records, notes = collect(args.backend, args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(records, indent=1) + "\n")
    md = markdown(records, notes)
    (args.out / "kernels.md").write_text(md)
    print(md)
    if args.fill:
        fill = [r for b in args.backend if b in FILL_BACKENDS for r in FILL_BACKENDS[b](arch=args.arch[0])]
        (args.out / "fill.json").write_text(json.dumps(fill, indent=1) + "\n")
        fmd = fill_markdown(fill, args.arch[0])
        (args.out / "fill.md").write_text(fmd)
        print(fmd)
    bad = [r["kernel"] for r in records if r.get("spill_stores") or r.get("spill_loads")]
    if bad:
        print(f"spills in: {', '.join(sorted(set(bad)))}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
