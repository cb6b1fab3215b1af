"""bench/estimates.py: every kernel of the default cupy training step has a latency row at batch 64 and 4096,
each row says whether it is an estimate (with its method and the header that counts it) or a measurement."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.estimates import BATCHES, LATENCY, KernelLatency, latency_markdown, step_latency

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sequences():
    from bench.launches import cupy_launch_sequence

    return {b: [launch[2] for launch in cupy_launch_sequence(b, 132)["train"]] for b in BATCHES}


def test_every_default_step_kernel_has_a_row(sequences):
    for b, kernels in sequences.items():
        missing = [k for k in kernels if k not in LATENCY or b not in LATENCY[k].us]
        assert not missing, f"batch {b}: no latency row for {missing} (add it to bench/estimates.py)"
        assert step_latency(kernels, b) is not None


@pytest.mark.parametrize("kernel", sorted(LATENCY))
def test_rows_name_their_method(kernel):
    row = LATENCY[kernel]
    assert row.method.startswith(("estimate: ", "measured: ")), row.method
    assert (ROOT / row.source).is_file(), row.source
    assert row.us and set(row.us) <= set(BATCHES)
    for b in row.us:
        lo, hi = row.us[b]
        assert 0 < lo <= hi
        if row.measured:
            assert lo == hi, f"{kernel}: a measurement is one figure"
    if not row.measured:  # the header the row cites writes the estimate out
        assert "estimat" in (ROOT / row.source).read_text().lower(), row.source


def test_sum_and_markdown():
    rows = {"a_v1": KernelLatency("a_v1", "x", {64: (1.0, 2.0), 4096: (3.0, 3.0)}, "estimate: y", "README.md")}
    LATENCY.update(rows)
    try:
        assert step_latency(["a_v1", "a_v1"], 64) == (2.0, 4.0, False)
        assert step_latency(["a_v1", "nope_v9"], 64) is None
        md = latency_markdown({64: ["a_v1", "nope_v9"], 4096: ["a_v1"]})
        assert "| a_v1 | x | ~1–2 | 3 | estimate: y | README.md |" in md
        assert "| nope_v9 | — | no estimate | no estimate | — | — |" in md
        assert "The step's kernels at batch 4096: 3–3 µs" in md
    finally:
        del LATENCY["a_v1"]


def test_fill_report_carries_the_latency_section(sequences):
    from bench.kernels import latency_section

    md = latency_section(132)
    for k in sequences[64]:
        assert f"| {k} |" in md
    assert "The step's kernels at batch 64:" in md and "The step's kernels at batch 4096:" in md
