"""``python -m lenet_gpu.selftest``: the op-parity checks catch what they must, the optional fused ops are
called as base.py's protocol says, budgets skip rather than fail, a hung phase is killed with its finished
cases kept, the report names every failure, the ptxas lookup finds the ptxas of the NVVM in use in both
wheel layouts, and the command itself runs end to end on the emulators (``--emulate``, what CI runs) and
refuses, in one line, to run without a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.backends.base import OPTIONAL_OPS
from lenet_gpu.backends.numpy_backend import NumpyBackend
from lenet_gpu.parity import nan_like
from lenet_gpu.selftest import report
from lenet_gpu.selftest.checks import KNOWN_OPS, CheckFailed, input_sets, run_case
from lenet_gpu.selftest.common import PhaseRecorder
from lenet_gpu.stepstate import STATE_WORDS
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
F32 = np.float32


# ------------------------------------------------------------------------------------ a reference backend
class RefFused(NumpyBackend):
    """The numpy backend plus the optional fused ops, each composed from the backend's own unfused ops: what
    a fused kernel must compute, called with the argument order of base.py's protocol."""

    def __init__(self) -> None:
        super().__init__(threads=1)
        for op in OPTIONAL_OPS:
            self.variants[op] = ("v1",)
            self.default_variants[op] = "v1"

    def conv2d_pool_fwd(self, x, w, b, yconv, ypool, argmax, act, mode, variant=None) -> None:
        n, _, h, wd = x.shape
        k, _, r, s = w.shape
        y = yconv if yconv is not None else np.empty((n, k, h - r + 1, wd - s + 1), F32)
        self.conv2d_fwd(x, w, b, y, act)
        self.pool2x2_fwd(y, ypool, argmax if mode == "max" else np.empty(ypool.shape, np.uint8), mode)

    def conv2d_bwd_data_pool(self, dz, w, argmax, yconv, dz_below, mode, act, variant=None) -> None:
        n, _, ho, wo = dz.shape
        _, c, r, s = w.shape
        dx = np.empty((n, c, ho + r - 1, wo + s - 1), F32)
        self.conv2d_bwd_data(dz, w, dx)
        self.pool2x2_bwd(dx, argmax if argmax is not None else np.zeros(dx.shape, np.uint8), yconv, dz_below, mode,
                         act)

    def head_train(self, x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dw1, db1, dw2,
                   db2, dw3, db3, stats, state, act, mode, variant=None) -> None:
        xf = x.reshape(x.shape[0], -1)
        self.dense_fwd(xf, w1, b1, h1, act)
        self.dense_fwd(h1, w2, b2, h2, act)
        self.dense_fwd(h2, w3, b3, logits, "identity")
        dl = np.empty_like(logits)
        self.softmax_xent(logits, labels, dl, stats, state)
        d2, d1, dxf = np.empty_like(h2), np.empty_like(h1), np.empty_like(xf)
        self.dense_bwd(h2, w3, logits, dl, d2, dw3, db3, "identity")
        self.dense_bwd(h1, w2, h2, d2, d1, dw2, db2, act)
        self.dense_bwd(xf, w1, h1, d1, dxf, dw1, db1, act)
        if yconv is None:  # the routed form (max pooling): the gradient at x's shape times act'(x)
            assert mode == "max"
            dz_conv[...] = dxf.reshape(x.shape) * ref.activation_grad(x, act)
            return
        am = argmax if argmax is not None else np.zeros(x.shape, np.uint8)
        self.pool2x2_bwd(dxf.reshape(x.shape), am, yconv, dz_conv, mode, act)

    def lenet_fwd(self, images, params, logits, mean, std, act, mode, variant=None) -> None:
        n = images.shape[0]
        x, y = np.empty((n, 1, 32, 32), F32), np.empty(n, np.int32)
        self.batch_prepare(images, np.zeros(n, np.uint8), np.arange(n, dtype=np.int32), np.zeros(STATE_WORDS, np.int32),
                           x, y, mean, std)
        a1 = np.empty((n, 6, 28, 28), F32)
        p1 = np.empty((n, 6, 14, 14), F32)
        a3 = np.empty((n, 16, 10, 10), F32)
        p3 = np.empty((n, 16, 5, 5), F32)
        self.conv2d_pool_fwd(x, params["c1.w"], params["c1.b"], a1, p1, np.empty(p1.shape, np.uint8), act, mode)
        self.conv2d_pool_fwd(p1, params["c3.w"], params["c3.b"], a3, p3, np.empty(p3.shape, np.uint8), act, mode)
        h1, h2 = np.empty((n, params["c5.w"].shape[0]), F32), np.empty((n, params["f6.w"].shape[0]), F32)
        self.dense_fwd(p3.reshape(n, -1), params["c5.w"], params["c5.b"], h1, act)
        self.dense_fwd(h1, params["f6.w"], params["f6.b"], h2, act)
        self.dense_fwd(h2, params["out.w"], params["out.b"], logits, "identity")


def _all_pass(be, ops, profile="tiny", max_tier=1):
    sets = input_sets(ops, profile, max_tier)
    assert {s.op for s in sets} == set(ops)
    for s in sets:
        for v in be.variants[s.op]:
            r = run_case(be, s.op, v, s)
            assert r["worst_ratio"] <= 1.0


def test_every_protocol_op_has_a_builder():
    from lenet_gpu.backends.base import OPS, ROUTED_OPS

    assert set(OPS) | set(OPTIONAL_OPS) | set(ROUTED_OPS) <= set(KNOWN_OPS)


def test_numpy_backend_passes_op_parity():
    be = NumpyBackend(threads=1)
    _all_pass(be, list(be.variants), profile="full", max_tier=1)


def test_fused_op_builders_follow_the_protocol():
    """The fused ops' input sets, run on compositions of the unfused numpy ops, all pass: the builders call
    each optional op with base.py's argument order and compare the right outputs."""
    _all_pass(RefFused(), list(OPTIONAL_OPS), profile="tiny", max_tier=3)


# ------------------------------------------------------------------------------------ failures are caught
class Buggy(RefFused):
    def __init__(self, bug: str) -> None:
        super().__init__()
        self.bug = bug

    def conv2d_fwd(self, x, w, b, y, act, variant=None) -> None:
        super().conv2d_fwd(x, w, b, y, act)
        if self.bug == "conv_off_by_1e-3":
            y[0, 0, 0, 0] += 1e-3

    def dense_fwd(self, x, w, b, y, act, variant=None) -> None:
        keep = y[-1, -1].copy()
        super().dense_fwd(x, w, b, y, act)
        if self.bug == "dense_unwritten":
            y[-1, -1] = keep  # the NaN poison stays

    def pool2x2_fwd(self, x, y, argmax, mode, variant=None) -> None:
        super().pool2x2_fwd(x, y, argmax, mode)
        if self.bug == "argmax_last_tie" and mode == "max":
            argmax[...] = np.where(argmax == 0, 3, argmax)

    def softmax_xent(self, logits, labels, dlogits, stats, state, variant=None) -> None:
        super().softmax_xent(logits, labels, dlogits, stats, state)
        if self.bug == "stats_row_0":
            stats[0] = stats[int(state[2]) % stats.shape[0]]

    def step_advance(self, state, batch, variant=None) -> None:
        if self.bug == "no_epoch_wrap":
            state[0] += 1
            state[2] += 1
            state[3] += batch
            return
        super().step_advance(state, batch)

    def conv2d_bwd_weight(self, x, dz, dw, db, variant=None) -> None:
        super().conv2d_bwd_weight(x, dz, dw, db)
        if self.bug == "not_repeatable":  # within tolerance, but not the same bits twice
            self.launch = getattr(self, "launch", 0) + 1  # each launch a different float32 factor (1 + k ulp)
            dw *= F32(1) + F32(self.launch) * np.finfo(F32).eps

    def head_train(self, *a, **k) -> None:
        super().head_train(*a, **k)
        if self.bug == "head_no_act_grad":
            a[13][...] *= 1.01  # dz_conv off by 1 %


@pytest.mark.parametrize("bug,op,expect", [
    ("conv_off_by_1e-3", "conv2d_fwd", r"y: 1 of \d+ elements out of tolerance"),
    ("dense_unwritten", "dense_fwd", r"y: 1 of \d+ elements out of tolerance.*got nan"),
    ("argmax_last_tie", "pool2x2_fwd", r"argmax: \d+ of \d+ elements differ"),
    ("stats_row_0", "softmax_xent", r"stats \(row 2 written, others kept\): 2 of 10"),
    ("no_epoch_wrap", "step_advance", r"state: \d+ of 8 elements differ"),
    ("not_repeatable", "conv2d_bwd_weight", r"a second launch on the same inputs gave different bits in dw"),
    ("head_no_act_grad", "head_train", r"dz_conv: \d+ of \d+ elements out of tolerance"),
])
def test_op_parity_catches(bug, op, expect):
    be = Buggy(bug)
    sets = input_sets([op], "tiny", 1 if op != "step_advance" else 0)
    with pytest.raises(CheckFailed, match=expect):
        for s in sets:
            run_case(be, op, "v1", s)


def test_nan_poison_and_error_stats():
    from lenet_gpu.parity import error_stats

    st = error_stats(np.array([1.0, np.nan]), np.array([1.0, 2.0]), 1e-6, 1e-6)
    assert st["bad"] == 1 and st["max_abs"] == float("inf")
    st = error_stats(np.array([1.0, 2.0 + 1e-7]), np.array([1.0, 2.0]), 1e-6, 1e-6)
    assert st["bad"] == 0 and 0 < st["ratio"] < 1
    assert np.isnan(nan_like((2,))).all() and (nan_like((2,), np.uint8) == 255).all()


def test_tests_parity_is_the_package_helper():
    import lenet_gpu.parity as pkg
    from tests import parity

    assert parity.TOL is pkg.TOL and parity.assert_close is pkg.assert_close


# ------------------------------------------------------------------------------------ budgets, kills, report
def test_out_of_budget_cases_are_skipped_not_failed(tmp_path):
    from lenet_gpu.selftest.phases import phase_op_parity

    rec = PhaseRecorder("op_parity", tmp_path / "r.json", budget_s=0.3)
    phase_op_parity({"backends": ["numpy"], "profile": "full", "max_tier": 3}, rec)
    rec.finish()
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["counts"]["fail"] == 0 and res["counts"]["skip"] > 0
    skipped = [c for c in res["cases"] if c["status"] == "skip"]
    assert all(c["reason"] == "out of time" and c["count"] >= 1 for c in skipped)
    assert report.phase_status(res) in ("PASS", "SKIP")


def test_complete_runs_every_case_whatever_the_clock(tmp_path):
    """ctx["complete"]: op parity and whole steps run every case with the budget already spent, so coverage does
    not depend on the machine's speed (the emulators' cases: tests/test_matrix.py and its children)."""
    from lenet_gpu.selftest.phases import phase_op_parity, run_if_time

    rec = PhaseRecorder("op_parity", tmp_path / "r.json", budget_s=0.0)
    phase_op_parity({"backends": ["numpy"], "profile": "tiny", "max_tier": 3, "complete": True}, rec)
    r = rec.result()
    assert r["counts"]["skip"] == 0 and r["counts"]["fail"] == 0 and r["counts"]["pass"] == rec.data["input_sets"]
    rec = PhaseRecorder("whole_step", tmp_path / "w.json", budget_s=0.0)  # the whole-step phase's gate
    assert run_if_time(rec, "late", 1e9, lambda: None)["status"] == "skip"
    assert run_if_time(rec, "late", 1e9, lambda: None, complete=True)["status"] == "pass"


def test_a_phase_past_its_hard_limit_is_killed_and_keeps_its_cases(tmp_path):
    from lenet_gpu.selftest import runner

    ctx = {"mode": "emulate", "backends": ["numpy"], "profile": "full", "max_tier": 3, "quick": False,
           "out": str(tmp_path), "data_dir": None, "previous": {}}
    os.environ["LENET_GPU_SELFTEST_STALL"] = "op_parity"
    try:
        t0 = time.monotonic()
        res = runner.run_phase("op_parity", ctx, soft_s=600, hard_s=4.0, out=tmp_path)
    finally:
        del os.environ["LENET_GPU_SELFTEST_STALL"]
    assert time.monotonic() - t0 < 20
    assert "did not finish within its hard limit of 4 s" in res["killed"] and report.phase_status(res) == "FAIL"
    assert [c["name"] for c in res["cases"]] == ["before the stall"]
    assert (tmp_path / res["log"]).is_file()


def test_report_names_every_failure(tmp_path):
    results = {"command": "python -m lenet_gpu.selftest", "mode": "gpu", "backends": ["cupy"], "budget_s": 420,
               "started": "now", "finished": "later", "elapsed_s": 12.0, "phases": {p: None for p in report.PHASES}}
    results["phases"]["op_parity"] = {
        "counts": {"pass": 1, "fail": 1, "skip": 0}, "data": {}, "notes": [], "seconds": 1.0, "budget_s": 60,
        "cases": [{"name": "cupy conv2d_fwd_v2 x(1, 1, 32, 32)", "status": "pass", "op": "conv2d_fwd", "variant": "v2",
                   "backend": "cupy", "worst_ratio": 0.2, "max_abs": 1e-7},
                  {"name": "cupy dense_fwd_v3 (1,400)->120 relu", "status": "fail", "op": "dense_fwd", "variant": "v3",
                   "backend": "cupy", "error": "y: 3 of 120 elements out of tolerance\n  worst at (0, 5)"}]}
    results["phases"]["compile"] = {"crash": "ImportError: no module named cupy", "counts": {}, "cases": []}
    report.write(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# lenet_gpu self-test\n\n**FAIL**")
    assert "| 3. Op parity against the float64 reference | FAIL |" in md
    assert "cupy dense_fwd_v3 (1,400)->120 relu" in md and "y: 3 of 120 elements out of tolerance" in md
    assert "ImportError: no module named cupy" in md
    assert json.loads((tmp_path / "results.json").read_text())["phases"]["op_parity"]["status"] == "FAIL"


def test_whole_step_checks_on_the_numpy_backend():
    """The whole-step checks drive the model's step-state API: numpy against itself agrees bit for bit, two
    runs repeat, a step after warm-up is launches only, and graphs are skipped where there are none."""
    from lenet_gpu.selftest import phases as P

    x, y, _, _ = P.mnist_sample()
    be = NumpyBackend(threads=1)
    assert P.steps_vs_numpy(be, "adam", "tanh", "avg", False, 2, 2, x[:12], y[:12])["worst_ratio"] == 0.0
    c = P.counters_per_step(be, *P.tiled(x, y, 40), 4, 3, 10)
    assert c["per_step"] == {"launches": 4.0, "h2d": 0.0, "d2h": 0.0, "allocs": 0.0, "syncs": 0.0}  # the 4-op step
    assert P.determinism("numpy", *P.tiled(x, y, 12), 4, 2) == {"batch": 4, "steps": 2}
    assert P.graph_check("numpy", x[:16], y[:16], 4, 1)["status"] == "skip"
    assert P.graph_vs_eager("numpy", x[:16], y[:16], 4, 1, 3)["status"] == "skip"


class _WrongSteps(NumpyBackend):
    """A numpy backend with one deliberate error in a training step (steps_vs_numpy must catch each)."""

    def __init__(self, bug: str) -> None:
        super().__init__(threads=1)
        self.bug = bug

    def adam_step(self, p, g, m, v, *a, **k) -> None:
        super().adam_step(p, g, m, v, *a, **k)
        if self.bug == "param" and p.size > 100:
            p[p.size // 2] += F32(1e-3)  # one parameter off by 1e-3: far outside atol 2e-5 + rtol 2e-4

    def softmax_xent(self, logits, labels, dlogits, stats, state, variant=None) -> None:
        super().softmax_xent(logits, labels, dlogits, stats, state)
        row = int(state[2]) % stats.shape[0]
        if self.bug == "count":
            stats[row, 1] += 1  # one more correct prediction than there were
        elif self.bug == "loss":
            stats[row, 0] *= F32(1.01)


@pytest.mark.parametrize("bug,msg", [("param", "parameters after step 1"), ("count", "correct counts per step"),
                                     ("loss", "loss sums per step")])
def test_steps_vs_numpy_fails_on_a_wrong_backend(bug, msg):
    """The whole-step check compares against a separate numpy model, not against itself: a backend with one
    wrong parameter, one wrong count or a loss 1 % off fails it."""
    from lenet_gpu.selftest import phases as P

    x, y, _, _ = P.mnist_sample()
    with pytest.raises(AssertionError, match=msg):
        P.steps_vs_numpy(_WrongSteps(bug), "adam", "tanh", "avg", False, 2, 2, x[:12], y[:12])


def test_a_training_run_and_its_figures(tmp_path):
    from lenet_gpu.selftest import phases as P

    run = {"backend": "numpy", "dataset": "mnist-sample", "gate": None,
           "args": ["--dataset", "mnist-sample", "--limit", "64", "--epochs", "2", "--batch-size", "16"]}
    fig = P.train_once(run, {"out": str(tmp_path)}, timeout_s=120)
    assert fig["returncode"] == 0 and fig["epochs"] == 2 and 0 <= fig["final_test_acc"] <= 1
    assert len(fig["test_acc_per_epoch"]) == 2 and (tmp_path / "train" / "numpy-mnist-sample" / "log.txt").is_file()
    with pytest.raises(AssertionError, match="final test accuracy .* < 0.99"):
        P.train_once({**run, "gate": 0.99}, {"out": str(tmp_path)}, timeout_s=120)
    epochs = [{"seconds": 1.0, "test_acc": 0.95}, {"seconds": 2.0, "test_acc": 0.975},
              {"seconds": 2.0, "test_acc": 0.98}]
    assert (P.time_to(epochs, 0.97), P.time_to(epochs, 0.98), P.time_to(epochs, 0.99)) == (3.0, 5.0, None)


def test_kernel_names_finds_every_kernel():
    from lenet_gpu.backends.cupy_backend.runtime import kernels_dir
    from lenet_gpu.selftest.phases import kernel_names

    for path in kernels_dir().glob("*.cu"):
        src = path.read_text()
        names = kernel_names(src)
        assert len(names) == src.count('extern "C"'), path.name
        assert all(re.fullmatch(r"[a-z0-9_]+_v\d+", n) for n in names), names


# ------------------------------------------------------------------------------------ ptxas lookup
def _fake_ptxas(path: Path, release: str) -> Path:
    """A ptxas that prints its release and, like the real one, refuses PTX newer than its CUDA."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'ptxas: NVIDIA (R) Ptx optimizing assembler'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.37'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def cr():
    require("numba")
    from lenet_gpu.backends.numba_backend import compile_report

    return compile_report


def test_ptxas_cuda12_wheel_layout(cr, tmp_path):
    nv = tmp_path / "site" / "nvidia"
    exe = _fake_ptxas(nv / "cuda_nvcc" / "bin" / "ptxas", "12.9")
    nvvm = nv / "cuda_nvcc" / "nvvm" / "lib64" / "libnvvm.so"
    found = cr.find_ptxas(".version 8.8\n.target sm_90\n", nvvm=nvvm, roots=[nv], path_env="")
    assert found.path == str(exe) and found.version == (12, 9) and "beside the NVVM" in found.origin
    found = cr.find_ptxas(".version 8.8\n", nvvm=None, roots=[nv], path_env="")
    assert found.origin == "wheel layout nvidia/cuda_nvcc/bin/ptxas"


def test_ptxas_cuda13_wheel_layout(cr, tmp_path):
    nv = tmp_path / "site" / "nvidia"
    exe = _fake_ptxas(nv / "cu13" / "bin" / "ptxas", "13.5")
    nvvm = nv / "cu13" / "lib" / "libnvvm.so.4"
    found = cr.find_ptxas(".version 9.5\n", nvvm=nvvm, roots=[nv], path_env="")
    assert found.path == str(exe) and found.version == (13, 5) and "beside the NVVM" in found.origin


def test_ptxas_of_the_nvvm_in_use_wins_over_an_older_one_on_path(cr, tmp_path):
    nv = tmp_path / "site" / "nvidia"
    old = _fake_ptxas(tmp_path / "usr" / "bin" / "ptxas", "12.4")
    c12 = _fake_ptxas(nv / "cuda_nvcc" / "bin" / "ptxas", "12.9")
    c13 = _fake_ptxas(nv / "cu13" / "bin" / "ptxas", "13.5")
    path_env = str(old.parent)
    assert cr.find_ptxas(".version 9.5\n", nvvm=nv / "cu13" / "lib" / "libnvvm.so.4", roots=[nv],
                         path_env=path_env).path == str(c13)
    assert cr.find_ptxas(".version 8.8\n", nvvm=nv / "cuda_nvcc" / "nvvm" / "lib64" / "libnvvm.so", roots=[nv],
                         path_env=path_env).path == str(c12)
    # NVVM of CUDA 13 but only the CUDA 12 wheel's ptxas beside the old one: the newest that can, else none
    (nv / "cu13" / "bin" / "ptxas").unlink()
    with pytest.raises(cr.PtxasMismatch) as e:
        cr.find_ptxas(".version 9.5\n", nvvm=nv / "cu13" / "lib" / "libnvvm.so.4", roots=[nv], path_env=path_env)
    msg = str(e.value)
    assert "\n" not in msg and "PTX ISA 9.5" in msg and "CUDA >= 13.5" in msg and "cuda-toolkit[nvcc]==13.*" in msg
    assert str(c12) in msg and str(old) in msg


def test_ptxas_toolkit_layout_and_none(cr, tmp_path):
    home = tmp_path / "cuda-13.0"
    exe = _fake_ptxas(home / "bin" / "ptxas", "13.0")
    found = cr.find_ptxas(".version 9.0\n", nvvm=home / "nvvm" / "lib64" / "libnvvm.so", roots=[], path_env="")
    assert found.path == str(exe)
    assert cr.find_ptxas(".version 9.0\n", nvvm=None, roots=[], cuda_home=str(home), path_env="").origin == "$CUDA_HOME"
    with pytest.raises(FileNotFoundError, match="ptxas not found"):
        cr.find_ptxas(".version 9.0\n", nvvm=None, roots=[tmp_path / "empty"], cuda_home="", path_env="")


def test_isa_to_cuda():
    require("numba")
    from lenet_gpu.backends.numba_backend import compile_report as cr
    assert cr.min_cuda_for_isa((9, 5)) == (13, 5) and cr.min_cuda_for_isa((9, 0)) == (13, 0)
    assert cr.min_cuda_for_isa((8, 8)) == (12, 9) and cr.min_cuda_for_isa((8, 5)) == (12, 5)
    assert cr.ptx_isa("//\n// Generated by NVIDIA NVVM Compiler\n.version 9.5\n.target sm_90\n") == (9, 5)


# ------------------------------------------------------------------------------------ the command
def _run(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lenet_gpu.selftest", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, check=False)


def _has_gpu() -> bool:
    from tests.conftest import HAS_GPU

    return HAS_GPU


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    p = _run("--out", str(tmp_path / "r"), env_extra={"NUMBA_ENABLE_CUDASIM": "1"})  # the shell's setting is ignored
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU found" in p.stderr and "--emulate" in p.stderr
    assert not (tmp_path / "r").exists()


def test_bad_arguments_are_one_line(tmp_path):
    for args in (["--budget", "0"], ["--emulate", "--backends", "cupy"], ["--bogus"]):
        p = _run(*args, "--out", str(tmp_path))
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, args


def _warm_harness_cache() -> None:
    """Build every kernel module the cupy backend may load with the harness once (g++, ~4 s a module, cached
    on disk): a cold build cache would otherwise eat the emulated compile phase's small budget."""
    from lenet_gpu.backends.cupy_backend.compile_report import module_option_sets
    from lenet_gpu.backends.cupy_backend.runtime import HostRuntime

    rt = HostRuntime()
    for stem, option_sets in module_option_sets().items():
        for options in option_sets:
            rt.load_module(stem, options)


def test_emulate_end_to_end(tmp_path):
    """What CI runs: every phase on cupy-host and the Numba simulator at tiny sizes, inside its budget.

    A training step takes seconds on the emulators (more on a busy machine), so the phases that run whole
    steps may skip what does not fit the budget: skipped, never failed; the cheap phases must pass. This test is
    not relied on for coverage: every op-parity case runs, with no skip for time, in tests/test_matrix.py and its
    cupy-host / simulator children (and ``complete`` runs the phases' every case: test_complete_runs_every_case...)."""
    _warm_harness_cache()
    out = tmp_path / "selftest"
    t0 = time.monotonic()
    p = _run("--emulate", "--budget", "75", "--out", str(out), timeout=200)
    wall = time.monotonic() - t0
    res = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    assert p.returncode == 0, p.stdout + p.stderr + md[:3000]
    assert wall < 95, f"took {wall:.0f} s"
    assert res["format"] == "lenet_gpu-selftest" and res["mode"] == "emulate" and res["status"] == "PASS"
    assert res["backends"] == ["cupy-host", "numba-sim"] and res["finished"]
    assert list(res["phases"]) == list(report.PHASES)
    for name in report.PHASES[:-1]:
        ph = res["phases"][name]
        assert ph["status"] in (("PASS",) if name in ("environment", "compile", "op_parity") else ("PASS", "SKIP")), \
            (name, ph.get("counts"), ph.get("crash"), ph.get("killed"))
        assert ph["counts"]["fail"] == 0 and ph["done"] and not ph.get("killed")
        # skips for time or graphs only; and the PyTorch peer's, which the test group does not install (reached or not
        # by how much of the benchmark's budget is left: a fast machine reaches it)
        skips = [c["reason"] for c in ph["cases"] if c["status"] == "skip"
                 and not (c.get("kind") == "peer" and c["reason"] == "PyTorch is not installed")]
        assert all(r.startswith(("out of time", "no graphs")) for r in skips), (name, skips)
    assert res["phases"]["summary"]["status"] == "PASS" and not res["phases"]["summary"]["failures"]
    for name, label in (("environment", "cupy-host"), ("environment", "numba-sim"), ("compile", "cupy-host"),
                        ("compile", "numba-sim"), ("op_parity", "cupy-host"), ("op_parity", "numba-sim")):
        assert any(c.get("backend") == label and c["status"] == "pass" for c in res["phases"][name]["cases"]), \
            (name, label)
    for i, title in enumerate(report.TITLES.values(), 1):
        assert re.search(rf"^\| {i}\. {re.escape(title)} \| (PASS|SKIP) \|", md, re.M), title
    assert "## Failures" not in md and "## 3. Op parity against the float64 reference — PASS" in md


def test_benchmark_notes_numba_lenet_fwd_falling_back(tmp_path, monkeypatch):
    """Where numba's lenet_fwd_v4 could not opt in past 48 KiB (and ran 8 images a block), the benchmark phase says
    so in its notes, with the cause; where it could, nothing is said."""
    require("numba")
    from lenet_gpu.backends.numba_backend import lenet_fwd
    from lenet_gpu.selftest.phases import note_plan_fallbacks

    rec = PhaseRecorder("benchmark", tmp_path / "b.json", budget_s=1.0)
    monkeypatch.setattr(lenet_fwd, "OPT_IN_FAILURE", [])
    note_plan_fallbacks(rec)
    assert rec.notes == []
    monkeypatch.setattr(lenet_fwd, "OPT_IN_FAILURE", ["CUDA_ERROR_INVALID_VALUE: no such attribute\nmore"])
    note_plan_fallbacks(rec)
    assert len(rec.notes) == 1 and "CUDA_ERROR_INVALID_VALUE: no such attribute" in rec.notes[0], rec.notes
    assert "8 images a block instead of 16" in rec.notes[0] and "more" not in rec.notes[0]
