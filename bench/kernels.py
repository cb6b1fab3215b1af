"""The static kernel table: registers, shared memory, spills and theoretical occupancy per kernel.

It comes from the compile reports of both GPU backends, written by scripts/kernel_report.py to
reports/kernels.json (records: backend, op, kernel, variant, arch, registers, shared_bytes,
stack_bytes, spill_stores, spill_loads, block_threads, occupancy). This module reads that file, or
asks scripts/kernel_report.py to build it, and keeps the sm_90 rows (the H100's architecture).
"""

from __future__ import annotations

import importlib
import json
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


def _from_script() -> tuple[list[dict[str, Any]] | None, str]:
    """Ask scripts/kernel_report.py for its sm_90 records (``collect(backends, archs)``)."""
    try:
        mod = importlib.import_module("scripts.kernel_report")
    except Exception as e:  # noqa: BLE001 - any failure means the report is not available
        return None, f"scripts/kernel_report.py is not importable ({type(e).__name__}: {e})"
    collect = getattr(mod, "collect", None)
    if callable(collect):
        try:
            records, notes = collect(sorted(getattr(mod, "BACKEND_MODULES", ("cupy", "numba"))), [ARCH])
        except Exception as e:  # noqa: BLE001
            return None, f"scripts.kernel_report.collect() failed ({type(e).__name__}: {e})"
        extra = f" ({'; '.join(notes)})" if notes else ""
        return _records(records), f"scripts.kernel_report.collect(..., ['{ARCH}']){extra}"
    for name in ("kernel_records", "build_report", "report", "records"):
        fn = getattr(mod, name, None)
        if callable(fn):
            try:
                return _records(fn()), f"scripts.kernel_report.{name}()"
            except Exception as e:  # noqa: BLE001
                return None, f"scripts.kernel_report.{name}() failed ({type(e).__name__}: {e})"
    return None, "scripts/kernel_report.py has no function this harness knows (kernel_records, collect, ...)"


def load_kernel_table(path: Path | None = None, build: bool = False, allow_build: bool = True) -> dict[str, Any]:
    """{'available', 'source', 'note', 'records'}: the sm_90 rows of the compile report.

    Reads ``path`` (default reports/kernels.json); with ``build``, or when the file is missing and
    ``allow_build``, runs scripts/kernel_report.py's ``collect`` instead (NVRTC + ptxas: about a minute).
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
        records, why = _from_script()
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
