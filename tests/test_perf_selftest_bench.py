"""The self-test's benchmark phase over the shared perf core: ours timed three ways after a fresh check, the
headline against the fastest PyTorch mode, unreliable ratios marked (numpy and fake cases: no GPU, no torch)."""

from __future__ import annotations

import numpy as np

from lenet_gpu.backends.numpy_backend import NumpyBackend
from lenet_gpu.selftest import phases as P
from lenet_gpu.selftest import report
from lenet_gpu.selftest.common import PASS, SKIP, PhaseRecorder


def test_bench_model_times_training_and_inference_three_ways() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 8, dtype=np.uint8)
    r = P._bench_model("numpy", NumpyBackend(), 2, images, labels)
    for prefix in ("train_", "infer_kernel_", "infer_host_api_"):
        assert r[f"{prefix}images_per_s"] > 0 and r[f"{prefix}spread"] >= 0
    assert r["infer_device_api"] == P.HOST_DEVICE_API
    assert r["check_forward_rel_err"] < 1e-4


def test_bench_peer_without_torch_is_a_skip() -> None:
    rec = PhaseRecorder("benchmark", None, 60)
    P._bench_peer([2], np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8), rec, on_gpu=False, quick=True)
    try:
        import torch  # noqa: F401
    except ImportError:
        assert [c["status"] for c in rec.cases] == [SKIP] and "not installed" in rec.cases[0]["reason"]
    else:
        assert all(c["status"] in (PASS, SKIP) for c in rec.cases)


def _case(kind: str, batch: int, ips: float, spread: float, **kw: object) -> dict:
    c = {"name": f"{kind} {batch}", "status": PASS, "kind": kind, "batch": batch, **kw}
    for p in ("train_", "infer_kernel_", "infer_host_api_"):
        c[f"{p}images_per_s"], c[f"{p}spread"] = ips, spread
    return c


def test_headline_against_the_fastest_mode() -> None:
    cases = [_case("model", 64, 9000.0, 0.05, backend="cupy"),
             _case("peer", 64, 1000.0, 0.05, mode="eager", device="cuda"),
             _case("peer", 64, 3000.0, 0.05, mode="graph", device="cuda"),
             _case("model", 256, 9000.0, 0.05, backend="cupy"),
             _case("peer", 256, 4500.0, 0.6, mode="graph", device="cuda"),
             {"name": "torch compile", "status": SKIP, "kind": "peer", "mode": "compile", "batch": 64,
              "reason": "a quick run leaves torch.compile out"}]
    md = "\n".join(report._bench_section({"cases": cases, "data": {}}))
    head = md.split("### Headline")[1]
    assert "| 64 | cupy | 9,000 ±2% | torch graph | 3,000 ±2% | **3.00** |" in head
    assert "| 256 | cupy | 9,000 ±2% | torch graph | 4,500 ±30% | unreliable: 2.00" in head
    assert "**2.00**" not in md
    assert head.count("ours against the fastest PyTorch mode") == 3  # training and both inference figures


def test_kernel_profile_rendering_and_reasons() -> None:
    from lenet_gpu.perf import profile

    assert "PyTorch is not installed" in profile.unavailable(None)
    prof = {"kernels": [{"kernel": "conv_fwd", "calls": 1.0, "device_us": 30.0},
                        {"kernel": "adam", "calls": 1.0, "device_us": 10.0}],
            "device_us_sum": 40.0, "wall_us": 50.0, "device_fraction": 0.8, "source": "CUPTI via torch.profiler"}
    assert profile.top(prof) == "conv_fwd 30.0 µs (75%); adam 10.0 µs (25%)"
    cases = [{"name": "profile cupy train batch 64", "status": PASS, "kind": "profile", "what": "train", **prof},
             {"name": "profile numba train batch 64", "status": SKIP, "kind": "profile", "reason": "no torch"}]
    md = "\n".join(report._bench_section({"cases": cases, "data": {}}))
    assert "kernels 40 µs of device time per step against 50 µs of wall time (0.8 of it)" in md
    assert "| conv_fwd | 1 | 30 |" in md and "profile numba train batch 64: SKIP (no torch)" in md
