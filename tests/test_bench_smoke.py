"""No rot: the benchmark runs at a tiny size on every backend that can run here and writes its report.

Checks that results.json holds finite positive numbers under the expected keys, that report.md and the
PNG plots exist — not that anything is fast. numpy runs in-process; the Numba CUDA simulator and the
cupy-host harness run in subprocesses (a wild pointer in the harness kills its process, and the
simulator is switched on by an environment variable read at import). A backend that cannot run here
is skipped with its reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite_positive(v: Any, what: str) -> None:
    assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{what}: not a number ({v!r})"
    assert math.isfinite(v) and v > 0, f"{what}: not finite and positive ({v!r})"


def check_report(out: Path, backend: str, sections: tuple[str, ...]) -> dict[str, Any]:
    """The report exists and holds numbers; returns the parsed JSON."""
    res = json.loads((out / "results.json").read_text())
    for key in ("schema", "date", "command", "machine", "settings", "peaks", "backends", "load", "skipped", "errors"):
        assert key in res, f"results.json lacks {key!r}"
    assert res["errors"] == [], [(e.get("error"), e.get("traceback")) for e in res["errors"]]
    info = res["backends"][backend]
    if not info["available"]:
        pytest.skip(f"backend {backend} cannot run here: {info['reason']}")
    # a skip is for a reason that is not an error: no crash, no failed validation hides among them
    bad = [s for s in res["skipped"] if any(w in s.get("reason", "") for w in ("FAILED", "Error", "error", "crash"))]
    assert not bad, bad
    md_head = (out / "report.md").read_text().split("\n- date")[0]
    assert "**OK**" in md_head and "FAILED" not in md_head
    _finite_positive(res["load"]["calibration_start_s"], "calibration")

    if "ops" in sections:
        rows = [r for r in res["ops"] if r["backend"] == backend]
        assert rows, "no op was timed"
        for r in rows:
            assert r["validated"] is True
            for k in ("median_s", "p20_s", "p80_s", "flops", "bytes", "gflops", "gbs", "floor_s", "floor_frac"):
                _finite_positive(r[k], f"{r['op']} {r['site']} {k}")
            assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
    for kind in ("forward", "train"):
        if kind in sections:
            rows = [r for r in res[kind] if r["backend"] == backend]
            assert rows, f"no {kind} row"
            for r in rows:
                for k in ("median_s", "images_per_s", "images_per_s_p20", "images_per_s_p80"):
                    _finite_positive(r[k], f"{kind} {k}")
                for p, v in r["peers"].items():
                    _finite_positive(v["images_per_s"], f"{kind} {p}")
                    _finite_positive(v["ratio"]["median"], f"{kind} ratio vs {p}")
    if "counters" in sections:
        c = res["counters"]["backends"][backend]
        for what in ("train_step", "forward"):
            _finite_positive(c[what]["launches"], f"counters {what} launches")
    if "epoch" in sections:
        run = res["epoch"]["runs"][backend]
        assert run["epochs"], "no epoch ran"
        for e in run["epochs"]:
            _finite_positive(e["seconds"], "epoch seconds")
            assert 0.0 <= e["test_acc"] <= 1.0
    if "kernels" in sections:
        assert "available" in res["kernels"] and res["kernels"]["note"]

    md = (out / "report.md").read_text()
    assert md.startswith("# lenet_gpu benchmark report") and backend in md
    assert (out / "throughput.png").read_bytes()[:8] == PNG_MAGIC
    if "ops" in sections:
        assert (out / f"ops_{backend}.png").read_bytes()[:8] == PNG_MAGIC
    return res


def test_cost_formulas_match_lenet_counts() -> None:
    """The per-op formulas, hand-checked against LeNet's counts (lenet_gpu/perf/ops.py's docstring table)."""
    from lenet_gpu.perf import ops
    from lenet_gpu.spec import NetConfig, forward_flops

    cfg, b = NetConfig(), 7
    c1 = ops.op_cost("conv2d_fwd", "C1", b, cfg)
    assert c1.flops == 2 * b * 6 * 28 * 28 * 25 + 2 * b * 6 * 28 * 28 == 244_608 * b
    assert c1.bytes == 4 * (1024 * b + 156 + 4704 * b)
    assert ops.op_cost("conv2d_fwd", "C3", b, cfg).flops == 483_200 * b
    assert ops.op_cost("dense_fwd", "C5", b, cfg).flops == 96_240 * b
    # the multiply-adds of the forward ops add up to spec.forward_flops
    macs = sum(ops.op_cost(op, s, b, cfg).flops for op, s in
               (("conv2d_fwd", "C1"), ("conv2d_fwd", "C3"), ("dense_fwd", "C5"), ("dense_fwd", "F6"),
                ("dense_fwd", "OUT")))
    bias_act = b * (2 * 4704 + 2 * 1600 + 2 * 120 + 2 * 84 + 10)
    assert macs - bias_act == forward_flops(cfg) * b
    # backward weight gradient of C1 = forward multiply-adds + db
    assert ops.op_cost("conv2d_bwd_weight", "C1", b, cfg).flops == 235_200 * b + 4704 * b
    assert ops.floor_seconds(ops.Cost(67_000_000, 0)) == pytest.approx(1e-6)
    assert ops.floor_seconds(ops.Cost(0, 3_350_000)) == pytest.approx(1e-6)


def test_bench_smoke_numpy(tmp_path: Path) -> None:
    from bench.run import main

    out = tmp_path / "bench"
    # not "kernels": it compiles every kernel with NVRTC and ptxas (minutes on two cores), which
    # tests/test_kernels_compile.py does already; test_kernel_table_reads_a_report covers its reading
    sections = ("ops", "forward", "train", "counters", "epoch")
    rc = main(["--quick", "--backends", "numpy", "--batches", "1,3", "--train-batches", "2", "--rounds", "2",
               "--min-samples", "2", "--epochs", "1", "--epoch-samples", "128", "--max-case-s", "30",
               "--sections", ",".join(sections), "--out", str(out)])
    assert rc == 0
    res = check_report(out, "numpy", sections)
    if res["torch"] is not None:  # the peer ran in the same run
        assert "torch-cpu" in res["train"][0]["peers"]
        assert res["forward"][0]["peers"]["torch-cpu"]["validation_rel_err"] < 1e-4
        assert "torch-cpu" in res["epoch"]["runs"]


def test_kernel_table_reads_a_report(tmp_path: Path) -> None:
    from bench.kernels import load_kernel_table

    missing = load_kernel_table(tmp_path / "none.json", allow_build=False)
    assert missing["available"] is False and "does not exist" in missing["note"]
    rec = {"backend": "cupy", "op": "dense_fwd", "kernel": "k", "variant": "v1", "arch": "sm_90", "registers": 32}
    (tmp_path / "k.json").write_text(json.dumps([rec, {**rec, "arch": "sm_80"}]))
    table = load_kernel_table(tmp_path / "k.json")
    assert table["available"] and [r["arch"] for r in table["records"]] == ["sm_90"]


def test_bench_quick_numpy_runs_every_case(tmp_path: Path) -> None:
    """`--quick` over the op and end-to-end sections: no case crashes, no validation fails, exit status 0."""
    from bench.run import main

    out = tmp_path / "bench"
    rc = main(["--quick", "--backends", "numpy", "--batches", "1,2", "--train-batches", "2,3", "--rounds", "2",
               "--min-samples", "2", "--sections", "ops,forward,infer-host,infer-device,train,counters,profile",
               "--no-plots", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert rc == 0, res["errors"]
    assert res["errors"] == []
    ops_run = {r["op"] for r in res["ops"]}
    from lenet_gpu.backends.base import OPS

    assert set(OPS) <= ops_run, set(OPS) - ops_run  # every op of the protocol ran (none skipped, none crashed)
    assert {r["batch"] for r in res["train"]} == {2, 3}
    assert {r["batch"] for r in res["infer-host"]} == {1, 2}
    # a host backend has no device arrays: the device-API rows are skips with that reason, not errors
    assert not res.get("infer-device") and any("no device arrays" in s.get("reason", "") for s in res["skipped"])
    assert all(r["validation_rel_err"] < 1e-4 and r["images_per_s"] > 0 for r in res["infer-host"])
    assert "## Inference through the API from host arrays" in (out / "report.md").read_text()
    # where a step's time goes: numpy's four-kernel step, each recorded op call replayed and timed
    assert [(r["backend"], r["batch"]) for r in res["profile"]] == [("numpy", 2), ("numpy", 3)]
    for r in res["profile"]:
        assert {k["kernel"] for k in r["kernels"]} == {"step_fwd_v1", "head_train_v1", "step_bwd_v1", "step_adam_v1"}
        assert r["wall_us"] > 0 and r["device_us_sum"] > 0 and "replayed" in r["source"]
    assert "## Where a training step's time goes" in (out / "report.md").read_text()


def test_bench_fails_loudly_on_a_crashed_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that raises is a failure: listed in results.json's errors, named at the top of the report, exit 1."""
    from bench.run import main
    from lenet_gpu.perf import ops as opsmod

    real = opsmod.make_spec

    def broken(op: str, *a: Any, **k: Any) -> Any:
        if op == "sgd_step":
            raise TypeError("sgd_step() takes a signature from another age")
        return real(op, *a, **k)

    monkeypatch.setattr(opsmod, "make_spec", broken)
    out = tmp_path / "bench"
    rc = main(["--backends", "numpy", "--batches", "1", "--min-samples", "1", "--sections", "ops",
               "--ops", "sgd_step,dense_fwd", "--no-plots", "--out", str(out)])
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    assert [(e["op"], e["error"].split(":")[0]) for e in res["errors"]] == [("sgd_step", "crashed")]
    assert "TypeError" in res["errors"][0]["traceback"]
    assert not any(s.get("op") == "sgd_step" for s in res["skipped"])
    assert {r["op"] for r in res["ops"]} == {"dense_fwd"}
    md = (out / "report.md").read_text()
    assert md.split("\n")[2].startswith("**FAILED: 1 failure**")
    assert "sgd_step" in md.split("- date")[0]


def test_bench_smoke_single_thread_clock(tmp_path: Path) -> None:
    """--single-thread measures CPU time (in-process it cannot re-size BLAS pools, but the clock switches)."""
    from bench.run import main

    out = tmp_path / "bench"
    rc = main(["--single-thread", "--backends", "numpy", "--batches", "2", "--train-batches", "2", "--rounds", "2",
               "--sections", "forward,train", "--no-plots", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["clock"] == "cpu" and res["settings"]["single_thread"] is True
    for kind in ("forward", "train"):
        _finite_positive(res[kind][0]["images_per_s"], kind)
    assert "CPU time of this process" in (out / "report.md").read_text()


def _subprocess_run(tmp_path: Path, backend: str, extra_env: dict[str, str], args: list[str], timeout: float) -> Path:
    out = tmp_path / "bench"
    env = {**os.environ, **extra_env, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "bench.run", "--backends", backend, "--no-peer", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if not (out / "results.json").exists():
        pytest.fail(f"{' '.join(cmd)} wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


# The simulated backends run a handful of cheap ops at batch 1: enough to prove the harness drives them.
SIM_ARGS = ["--batches", "1", "--min-samples", "1", "--max-case-s", "60", "--sections", "ops",
            "--ops", "pool2x2_fwd,softmax_xent"]


@pytest.mark.sim
def test_bench_smoke_numba_simulator(tmp_path: Path) -> None:
    out = _subprocess_run(tmp_path, "numba", {"NUMBA_ENABLE_CUDASIM": "1"}, SIM_ARGS, timeout=120)
    check_report(out, "numba", ("ops",))


def test_bench_smoke_cupy_host(tmp_path: Path) -> None:
    out = _subprocess_run(tmp_path, "cupy-host", {}, SIM_ARGS, timeout=120)
    check_report(out, "cupy-host", ("ops",))

