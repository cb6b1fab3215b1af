"""The static kernel table: registers, shared memory, spills and theoretical occupancy per kernel.

It comes from the compile reports of both GPU backends (``collect``: NVRTC / Numba + ptxas, no GPU), which
scripts/kernel_report.py writes to reports/kernels.json (records: backend, op, kernel, variant, arch,
registers, shared_bytes, stack_bytes, spill_stores, spill_loads, block_threads, occupancy) with
``markdown`` and ``write_fill``. ``load_kernel_table`` reads that file, or builds the records with
``collect``, and keeps the sm_90 rows (the H100's architecture). The script is the command line over this
module; nothing here imports the script.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "reports" / "kernels.json"
FIELDS = ("backend", "op", "kernel", "variant", "arch", "registers", "shared_bytes", "stack_bytes",
          "spill_stores", "spill_loads", "block_threads", "occupancy")
ARCH = "sm_90"


def _records(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, dict):
        for key in ("records", "kernels", "rows"):
            if isinstance(obj.get(key), list):
                return obj[key]
        return []
    return obj if isinstance(obj, list) else []


def _collected() -> tuple[list[dict[str, Any]] | None, str]:
    """The sm_90 records of both backends, built now (``collect``)."""
    try:
        records, notes = collect(sorted(BACKEND_MODULES), [ARCH])
    except Exception as e:  # noqa: BLE001 - any failure means the table is not available; say why
        return None, f"bench.kernels.collect() failed ({type(e).__name__}: {e})"
    extra = f" ({'; '.join(notes)})" if notes else ""
    return _records(records), f"bench.kernels.collect(..., ['{ARCH}']){extra}"


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
    from .launches import fill_markdown, fill_records, fill_summary

    rows, notes = fill_records(backends, batches, arch, sm_count)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fill.json").write_text(json.dumps({"rows": rows, "summary": fill_summary(rows), "notes": notes},
                                              indent=1) + "\n")
    md = fill_markdown(rows, notes)
    if "cupy" in backends:
        md += "\n" + latency_section(sm_count)
    (out / "fill.md").write_text(md)
    print(md.split("\n\nwaves =")[0] + "\n")
    return rows


def latency_section(sm_count: int) -> str:
    """The default cupy training step's kernels at bench.estimates' batch sizes, each with its estimated or
    measured µs (bench.estimates), as markdown."""
    from .estimates import BATCHES, latency_markdown
    from .launches import cupy_launch_sequence

    seqs = {b: [launch[2] for launch in cupy_launch_sequence(b, sm_count)["train"]] for b in BATCHES}
    return latency_markdown(seqs)


def load_kernel_table(path: Path | None = None, build: bool = False, allow_build: bool = True) -> dict[str, Any]:
    """{'available', 'source', 'note', 'records'}: the sm_90 rows of the compile report.

    Reads ``path`` (default reports/kernels.json); with ``build``, or when the file is missing and
    ``allow_build``, runs ``collect`` instead (NVRTC + ptxas: about a minute).
    """
    path = Path(path) if path else DEFAULT_PATH
    records: list[dict[str, Any]] | None = None
    source = ""
    if path.is_file() and not build:
        try:
            records = _records(json.loads(path.read_text()))
            source = str(path)
        except (OSError, ValueError) as e:
            source = f"{path} is unreadable ({e})"
    if records is None and not allow_build:
        return {"available": False, "source": None, "records": [],
                "note": f"{path} does not exist (run `python scripts/kernel_report.py` to write it)"}
    if records is None:
        records, why = _collected()
        source = why if records is None else why
        if records is None:
            return {"available": False, "source": None, "records": [],
                    "note": f"no static kernel report: {path} does not exist and {why}. "
                            "Run scripts/kernel_report.py to write it."}
    rows = [{k: r.get(k) for k in FIELDS} for r in records if isinstance(r, dict)]
    arch_rows = [r for r in rows if str(r.get("arch") or "").replace("compute_", "sm_") in (ARCH, "90", "9.0")]
    note = f"{len(arch_rows)} kernels compiled for {ARCH} (of {len(rows)} records)"
    if rows and not arch_rows:
        note = f"the report has {len(rows)} records but none for {ARCH}; all are shown"
        arch_rows = rows
    return {"available": bool(rows), "source": source, "records": arch_rows, "note": note}
