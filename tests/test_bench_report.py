"""bench: the CPU peak estimate, the load verdict and the report's comparisons (no timing here)."""

from __future__ import annotations

import os

import pytest

from bench import report
from lenet_gpu.perf.timing import cpu_fp32_peak, fma_latency_cycles, load_verdict

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: {model}
model name\t: Some CPU
cpu MHz\t\t: 2500.000
siblings\t: {siblings}
cpu cores\t: {cores}
flags\t\t: fpu sse sse2 {flags}

processor\t: 1
cpu MHz\t\t: 3000.000
"""


def info(vendor: str = "GenuineIntel", flags: str = "avx avx2 fma", siblings: int = 2, cores: int = 2,
         family: int = 6, model: int = 85) -> str:
    return CPUINFO.format(vendor=vendor, flags=flags, siblings=siblings, cores=cores, family=family, model=model)


@pytest.mark.parametrize(
    ("kw", "cpus", "units", "lanes", "gflops"),
    [
        ({}, 4, 2, 8, 4 * 2 * 8 * 2 * 3.0),  # AVX2 + FMA: 2 units of 8 lanes, at the highest MHz line
        ({"flags": "avx avx2 fma avx512f"}, 2, 2, 16, 2 * 2 * 16 * 2 * 3.0),
        ({"vendor": "AuthenticAMD", "flags": "avx avx2 fma avx512f"}, 2, 1, 16, 2 * 1 * 16 * 2 * 3.0),
        ({"flags": "avx"}, 1, 1, 8, 1 * 1 * 8 * 2 * 3.0),  # no FMA: a mul and an add pipe
        ({"flags": ""}, 1, 1, 4, 1 * 1 * 4 * 2 * 3.0),  # SSE
        ({"siblings": 4, "cores": 2}, 4, 2, 8, 2 * 2 * 8 * 2 * 3.0),  # SMT: 4 logical CPUs are 2 cores
        # Zen 1 (family 23 model 1, this project's AVX2 machine): 256-bit operations on 128-bit units
        ({"vendor": "AuthenticAMD", "family": 23, "model": 1}, 2, 2, 4, 2 * 2 * 4 * 2 * 3.0),
        ({"vendor": "AuthenticAMD", "family": 23, "model": 49}, 2, 2, 8, 2 * 2 * 8 * 2 * 3.0),  # Zen 2: 256-bit
    ],
)
def test_cpu_peak_formula(kw: dict, cpus: int, units: int, lanes: int, gflops: float) -> None:
    p = cpu_fp32_peak(info(**kw), usable_cpus=cpus)
    assert p is not None
    assert (p["fma_units"], p["simd_lanes"]) == (units, lanes)
    assert p["flops"] == pytest.approx(gflops * 1e9)
    assert p["formula"].endswith(f"= {gflops:,.0f} GFLOP/s") and "estimate" in p["note"]


def test_cpu_peak_given_clock_and_missing_info() -> None:
    assert cpu_fp32_peak(info(), usable_cpus=1, max_ghz=4.0)["flops"] == pytest.approx(1 * 2 * 8 * 2 * 4.0e9)
    assert cpu_fp32_peak("processor\t: 0\n", usable_cpus=1) is None  # no flags, no clock: no estimate
    assert cpu_fp32_peak() is None or cpu_fp32_peak()["flops"] > 0  # this machine, whatever it is


def test_load_verdict_never_contradicts_itself() -> None:
    busy, note = load_verdict(0.0, 0.0, 0.01, [120.0, 100.0, 50.0], 2)
    assert not busy and note.startswith("quiet: other processes used 0% of the 2 CPUs")
    assert "load average was 120.00" in note  # context, explained, not a verdict
    busy, note = load_verdict(0.6, 0.0, 0.0, [0.1], 2)
    assert busy and note == "busy: other processes used 60% of the 2 CPUs during the run"
    busy, note = load_verdict(0.0, 0.25, 0.0, None, 4)
    assert busy and "steal" in note and "0%" not in note
    busy, note = load_verdict(0.02, 0.0, 0.3, None, 2)
    assert busy and note == "busy: a fixed calibration workload took 30% longer at the end than at the start"
    for args in ((0.5, 0.0, 0.0, [9.0], 2), (0.0, 0.0, 0.0, [9.0], 2), (None, None, 0.0, None, 1)):
        busy, note = load_verdict(*args)
        assert note.startswith("busy: " if busy else "quiet: ")


def _op_row(backend: str, gpu: bool) -> dict:
    row = {"backend": backend, "op": "dense_fwd", "site": "C5", "variant": "v1", "batch": 64, "default": True,
           "median_s": 1e-3, "p20_s": 9e-4, "p80_s": 1.1e-3, "flops": 1e8, "bytes": 1e6, "gflops": 100.0,
           "gbs": 1.0, "floor_s": 1.5e-6, "floor_frac": 1.5e-3, "timer": "cuda-events" if gpu else "perf_counter"}
    if gpu:
        row["hot_median_s"] = 9e-4
    else:
        row["cpu_peak_frac"] = 100e9 / 200e9
    return row


def _results(backends: dict[str, bool]) -> dict:
    return {
        "backends": {b: {"available": True, "is_gpu": g} for b, g in backends.items()},
        "peaks": {"note": "H100 SXM5 datasheet ...", "h100_fp32_flops": 67e12,
                  "cpu_fp32": {"flops": 200e9, "formula": "2 cores × ... = 200 GFLOP/s",
                               "clock_source": "given"}},
        "ops": [_op_row(b, g) for b, g in backends.items()],
        "load": {"busy": False, "note": "quiet: other processes used 1% of the 2 CPUs, calibration drift +0%"},
    }


def test_cpu_rows_beside_the_cpu_peak_gpu_rows_beside_the_h100() -> None:
    md = report.markdown(_results({"numpy": False}))
    assert "CPU FP32 peak, an estimate from /proc/cpuinfo: 2 cores × ... = 200 GFLOP/s" in md
    assert "H100" not in md.split("## Method")[0].replace("H100 floor of that op", "")
    assert "| of CPU FP32 peak (est.) |" in md and "| 50% |" in md
    md = report.markdown(_results({"numpy": False, "cupy": True}))
    assert "- GPU floors: H100 SXM5" in md
    cupy = md.split("### cupy")[1]
    assert "| H100 floor | floor/time |" in cupy and "| 0.15% |" in cupy and "CPU FP32" not in cupy
    md = report.markdown(_results({"cupy": True}))
    assert "CPU FP32 peak" not in md


def test_quick_epoch_section_has_no_target() -> None:
    run = {"batch": 64, "steps_per_epoch": 62, "epochs": [{"epoch": 1, "seconds": 2.0, "test_acc": 0.8,
                                                           "images_per_s": 2000.0}],
           "epoch_s_median": 2.0, "final_test_acc": 0.8, "reached_target": False}
    ep = {"dataset": "mnist-sample", "train_images": 4000, "test_images": 1000, "max_epochs": 1,
          "target_acc": None, "runs": {"numpy": run}, "skipped": [],
          "recipe": {"optimizer": "adam", "lr": 2e-3, "schedule": "onecycle", "epochs": 15, "batch_size": 64,
                     "seed": 0}}
    md = report.markdown({**_results({"numpy": False}), "epoch": ep})
    assert "## Epoch time" in md and "not reached" not in md and "time to target" not in md
    assert "numpy epoch (4000 images, batch 64): 2 s; test accuracy 0.8000 after 1 epoch(s)" in md
    md = report.markdown({**_results({"numpy": False}), "epoch": {**ep, "target_acc": 0.97}})
    assert "## Epochs and time to 97.0% test accuracy" in md and "97.0% not reached in 1 epochs" in md


def _e2e_row(backend: str, batch: int, ours_ips: float, peers: dict[str, tuple[float, bool]]) -> dict:
    def side(ips: float) -> dict:
        return {"images_per_s": ips, "images_per_s_p20": ips * 0.95, "images_per_s_p80": ips * 1.05,
                "median_s": batch / ips, "p20_s": batch / ips * 0.95, "p80_s": batch / ips * 1.05, "spread": 0.1}

    row = {"backend": backend, "batch": batch, **side(ours_ips), "peers": {}}
    for p, (ips, reliable) in peers.items():
        r = ours_ips / ips
        row["peers"][p] = {**side(ips), "ratio": {"median": r, "p20": r * 0.9, "p80": r * 1.1, "reliable": reliable,
                                                  "ours_spread": 0.1, "theirs_spread": 0.1 if reliable else 0.6}}
    row["fastest_peer"] = max(row["peers"], key=lambda p: row["peers"][p]["images_per_s"])
    return row


def test_headline_against_the_fastest_peer_and_unreliable_ratios() -> None:
    res = {**_results({"cupy": True}), "ops": [],
           "train": [_e2e_row("cupy", 64, 9000.0, {"torch-cuda": (1000.0, True), "torch-graph": (3000.0, True)}),
                     _e2e_row("cupy", 256, 9000.0, {"torch-cuda": (4500.0, False)})]}
    md = report.markdown(res)
    head = md.split("## Headline")[1].split("\n## ")[0]
    assert "| cupy | 64 | 9,000 ±5% | torch-graph | 3,000 ±5% | **3.00 (2.70–3.30)** |" in head
    assert "| cupy | 256 |" in head and "unreliable: 2.00 (1.80–2.20), rounds spread 10% (ours) / 60% (peer)" in head
    assert "**2.00" not in md  # an unreliable ratio is never printed bare
    assert md.split("\n")[2].startswith("**OK**")


def test_failures_head_the_report() -> None:
    res = {**_results({"numpy": False}),
           "errors": [{"section": "ops", "backend": "numpy", "op": "adam_step", "site": "params", "variant": "v1",
                       "batch": None, "error": "crashed: TypeError: bad call", "traceback": "Traceback ..."}]}
    md = report.markdown(res)
    top = md.split("- date")[0]
    assert "**FAILED: 1 failure**" in top and "ops numpy adam_step params v1: crashed: TypeError: bad call" in top
    assert "## Failures" in md and "Traceback ..." in md


@pytest.mark.parametrize(("kw", "cycles"), [
    ({}, 4),  # Skylake-SP (family 6 model 85)
    ({"model": 0x3F}, 5),  # Haswell-EP
    ({"vendor": "AuthenticAMD", "family": 23, "model": 1}, 5),  # Zen 1
    ({"vendor": "AuthenticAMD", "family": 25, "model": 17}, 4),  # Zen 4
])
def test_fma_latency_by_cpu(kw: dict, cycles: int) -> None:
    """The FMA chain's cycles that bench.cpu_peak turns into a clock (a chain of 2.04 ns an FMA on the Zen 1 machine
    is 2.45 GHz at 5 cycles, which a chain of dependent integer adds confirmed at 2.34-2.45 GHz; at 4 it read 1.96)."""
    assert fma_latency_cycles(info(**kw)) == cycles


def test_cpu_peak_startup_reports_the_median_first_run_each_on_an_empty_cache(monkeypatch, tmp_path) -> None:
    """bench.cpu_peak.startup: every first run gets a cache of its own, the cached run reuses the first one's, the
    serial run compiles with LENET_GPU_COMPILE_AHEAD=0, and the figure reported is the median first run."""
    import json
    import subprocess

    from bench import cpu_peak

    walls = iter([12.0, 0.7, 9.0, 10.5, 20.0])  # first0, cached, first1, first2, serial
    seen = []

    def fake_run(cmd, env, **kw):
        seen.append((os.path.basename(env["NUMBA_CACHE_DIR"]), env["LENET_GPU_COMPILE_AHEAD"]))
        wall = next(walls)
        return subprocess.CompletedProcess(cmd, 0, stdout="noise\n" + json.dumps([wall, wall / 2, {"ran": True}]))

    monkeypatch.setattr(cpu_peak.subprocess, "run", fake_run)
    out = cpu_peak.startup(str(tmp_path), 128, runs=3)
    assert seen == [("first0", "1"), ("first0", "1"), ("first1", "1"), ("first2", "1"), ("serial", "0")]
    assert out["first_runs_s"] == [12.0, 9.0, 10.5]
    assert out["first_run_to_first_step_s"] == 10.5
    assert out["first_run_cpu_s"] == 5.25
    assert out["cached_run_to_first_step_s"] == 0.7
    assert out["first_run_serial_to_first_step_s"] == 20.0
