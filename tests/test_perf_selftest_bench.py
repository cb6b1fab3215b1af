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


def _net(be: object, pool: str = "max") -> object:
    from lenet_gpu.perf.model import BenchData, OurNet
    from lenet_gpu.spec import NetConfig

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (32, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 32, dtype=np.uint8)
    return OurNet(be, NetConfig(pool=pool), BenchData.from_dataset(images, labels, 32))


def test_record_calls_sees_a_steps_ops_once_each_and_unwraps() -> None:
    """The recorded op calls of a step are the model's path, in order, with the variant that ran and the launches
    it made; an op a host backend composes of other ops is recorded once; the backend is left unwrapped."""
    from lenet_gpu.perf.profile import record_calls

    be = NumpyBackend()
    net = _net(be)
    # numpy's step_fwd, step_bwd and step_adam call its batch_prepare, conv and optimizer ops inside themselves:
    # those inner calls are not recorded
    calls = net.record_step(4)
    assert [c.op for c in calls] == ["step_fwd", "head_train", "step_bwd", "step_adam"]
    assert all(c.variant == be.default_variants[c.op] and c.launches == 1 for c in calls)
    assert [c.label for c in calls][0] == "step_fwd_v1"
    assert not any(op in vars(be) for op in be.variants)  # unwrapped
    dense = _net(NumpyBackend(), pool="avg")
    ops = [c.op for c in dense.record_step(4)]
    assert ops[0] == "batch_prepare" and ops[-2:] == ["adam_step", "step_advance"] and "head_train" in ops
    infer = [c.op for c in record_calls(net.backend, lambda: net.forward(4))]
    want = ["lenet_fwd"] if net.model.fused["lenet_fwd"] else \
        ["batch_prepare", "conv2d_pool_fwd", "conv2d_pool_fwd", "dense_fwd", "dense_fwd", "dense_fwd", "step_advance"]
    assert infer == want


def test_replay_profile_without_torch_times_every_recorded_call() -> None:
    """Without PyTorch the profile replays each recorded op call of the step and times it (the CPU clock on a host
    backend, CUDA events on a GPU): a row per op, each > 0, their sum beside the step's wall time, in the rows the
    report renders."""
    from lenet_gpu.perf.profile import profile_net
    from lenet_gpu.perf.timing import TimingConfig

    tcfg = TimingConfig(warmup_s=0.0, min_samples=2, max_samples=3, target_s=0.0, min_sample_s=0.0)
    prof = profile_net(_net(NumpyBackend()), "train", 4, None, tcfg)
    assert [k["kernel"] for k in sorted(prof["kernels"], key=lambda k: k["kernel"])] == \
        ["head_train_v1", "step_adam_v1", "step_bwd_v1", "step_fwd_v1"]
    assert all(k["device_us"] > 0 and k["calls"] == 1 and k["launches"] == 1 for k in prof["kernels"])
    assert prof["device_us_sum"] == round(sum(k["device_us"] for k in prof["kernels"]), 3)
    assert prof["wall_us"] > 0 and prof["launches"] == 4 and "replayed" in prof["source"]
    assert prof["top3"].startswith(prof["kernels"][0]["kernel"])
    infer = profile_net(_net(NumpyBackend(), pool="avg"), "infer", 4, None, tcfg)
    assert infer["kernels"] and infer["wall_us"] > 0
    cases = [{"name": "profile numpy train batch 4", "status": PASS, "kind": "profile", "what": "train", **prof}]
    md = "\n".join(report._bench_section({"cases": cases, "data": {}}))
    assert "per step against" in md and "| step_bwd_v1 | 1 |" in md


def test_the_benchmark_phase_profiles_without_torch_by_replay(monkeypatch) -> None:
    """Without PyTorch the phase's per-kernel profile is no longer a skip: each GPU backend's step and inference
    pass are profiled by replaying their recorded op calls (a numpy backend posing as a GPU one here: its timer
    falls back to the CPU clock, as gpu_library finds no CUDA arrays)."""
    from lenet_gpu.perf import peer

    class Posing(NumpyBackend):
        is_gpu = True

    monkeypatch.setattr(peer, "torch_or_none", lambda: None)
    rec = PhaseRecorder("benchmark", None, 120)
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), rng.integers(0, 10, 16, dtype=np.uint8)
    P._bench_profile(rec, {"numpy": Posing(), "host": NumpyBackend()}, images, labels, [4])
    assert [(c["status"], c["what"]) for c in rec.cases] == [(PASS, "train"), (PASS, "infer")], rec.cases
    assert all("replayed" in c["source"] and c["kernels"] and c["top3"] for c in rec.cases)
    assert {k["kernel"] for k in rec.cases[0]["kernels"]} == {"step_fwd_v1", "head_train_v1", "step_bwd_v1",
                                                              "step_adam_v1"}


def test_profile_net_replays_launch_by_launch_where_the_backend_lists_them() -> None:
    """A backend with ``launch_list`` (the GPU backends, cupy-host) is profiled launch by launch, rows named by
    kernel: here a numpy backend whose 'launches' are its op calls, each named as a kernel would be."""
    from lenet_gpu.perf.profile import profile_net, record_calls
    from lenet_gpu.perf.timing import TimingConfig

    class Listing(NumpyBackend):
        def launch_list(self, fn):  # noqa: ANN001, ANN201
            out = []
            for c in record_calls(self, fn):
                out.append((f"{c.op}_kernel", lambda c=c: getattr(self, c.op)(*c.args, **c.kwargs)))
            return out

    tcfg = TimingConfig(warmup_s=0.0, min_samples=2, max_samples=3, target_s=0.0, min_sample_s=0.0)
    prof = profile_net(_net(Listing()), "train", 4, None, tcfg)
    assert {k["kernel"] for k in prof["kernels"]} == {"step_fwd_kernel", "head_train_kernel", "step_bwd_kernel",
                                                      "step_adam_kernel"}
    assert "kernel launch" in prof["source"] and prof["launches"] == 4


def test_with_cupti_the_phase_also_profiles_the_replay_beside_it(monkeypatch) -> None:
    """Where CUPTI is there, the phase profiles the step with it and, beside it, by replaying the recorded launches
    (the fallback checked against CUPTI on the same device). CUPTI is faked here: a profile with one kernel."""
    from lenet_gpu.perf import peer, profile

    class Posing(NumpyBackend):
        is_gpu = True

    fake = {"kernels": [{"kernel": "k", "calls": 1.0, "device_us": 5.0}], "device_us_sum": 5.0, "wall_us": 6.0,
            "device_fraction": 0.83, "units": 1, "source": "CUPTI via torch.profiler"}
    monkeypatch.setattr(peer, "torch_or_none", lambda: object())
    monkeypatch.setattr(profile, "unavailable", lambda torch: None if torch is not None else "no torch")
    monkeypatch.setattr(profile, "kernel_profile", lambda *a, **k: dict(fake))
    rec = PhaseRecorder("benchmark", None, 120)
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), rng.integers(0, 10, 16, dtype=np.uint8)
    P._bench_profile(rec, {"numpy": Posing()}, images, labels, [4])
    got = [(c["status"], c["what"], c["replay_beside_cupti"], c["source"].split(" ")[0]) for c in rec.cases]
    assert got == [(PASS, "train", False, "CUPTI"), (PASS, "infer", False, "CUPTI"), (PASS, "train", True, "the")], got
    assert "replayed" in rec.cases[2]["source"] and "beside CUPTI" in rec.cases[2]["name"]
