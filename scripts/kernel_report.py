"""Static kernel report: registers, shared memory, stack, spills, block size and theoretical occupancy of
every kernel of the cupy (CUDA C, NVRTC) and numba backends, at the launch shapes the backends use at
LeNet sizes. Needs no GPU.

Writes reports/kernels.json (one record per backend × kernel × arch) and reports/kernels.md (a table); with
the fill table of both backends, reports/fill.json and reports/fill.md: every launch of one training
step and one inference pass at batch 64, 128, 256 and 1024 with its blocks, threads, registers, shared
memory, resident blocks per SM, theoretical occupancy and waves on 132 SMs, and per pass how many launches
leave SMs without a block; then each kernel of the default cupy training step at batch 64 and 4096 with its
latency, estimated (the method named) or measured (the run named): bench/estimates.py; and reports/smem_banks.md,
the shared-memory wavefronts of the convolutions' window reads (bench/smem_banks.py's bank model).

    python scripts/kernel_report.py                 # both backends, sm_80 and sm_90, and the fill table
    python scripts/kernel_report.py --arch sm_90 --backend cupy
    python scripts/kernel_report.py --backend cupy --fill-batches 256 --sm-count 132
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import smem_banks  # noqa: E402
from bench.kernels import BACKEND_MODULES, collect, markdown, write_fill  # noqa: E402


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
        smem_banks.write_markdown(args.out)  # the convolutions' shared-memory wavefronts (a model, no compile)
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
