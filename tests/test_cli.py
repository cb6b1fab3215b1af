"""The command-line programs end to end: train, evaluate, interrupt and resume, errors, the accuracy gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.model import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--dataset", "mnist-sample", "--backend", "numpy", "--no-progress"]


def run(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "LENET_GPU_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=ROOT)


def assert_one_line_error(p: subprocess.CompletedProcess, code: int = 2, match: str = "") -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("module", ["lenet_gpu.train", "lenet_gpu.evaluate"])
def test_help(module):
    p = run(module, "--help")
    assert p.returncode == 0 and "usage:" in p.stdout and "--backend" in p.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--batch-size", "-3"], "--batch-size must be > 0"),
        (["--lr", "nan"], "--lr"),
        (["--backend", "opencl"], "invalid choice"),
        (["--activation", "gelu"], "invalid choice"),
        (["--epochs", "two"], "invalid int value"),
        (["--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["--dataset", "cifar"], "cifar"),
        (["--resume", "/no/such/ckpt.npz"], "no such checkpoint"),
    ],
)
def test_train_bad_arguments_give_one_line(args, match, tmp_path):
    p = run("lenet_gpu.train", *QUICK, "--checkpoint", str(tmp_path / "c.npz"), *args)
    assert_one_line_error(p, 2, match)
    assert not (tmp_path / "c.npz").exists()


def test_train_bad_data_dir_file_is_one_line(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"\x00\x00\x08\x03garbage")
    p = run("lenet_gpu.train", "--data-dir", str(d), "--backend", "numpy", "--checkpoint", str(tmp_path / "c.npz"))
    assert_one_line_error(p, 2, "train-images-idx3-ubyte")


def test_train_evaluate_end_to_end(tmp_path):
    ck = tmp_path / "run" / "ck.npz"
    p = run("lenet_gpu.train", *QUICK, "--limit", "320", "--epochs", "2", "--batch-size", "32", "--checkpoint",
            str(ck))
    assert p.returncode == 0, p.stderr
    assert "dataset: mnist-sample" in p.stdout and "backend: numpy" in p.stdout
    assert "epoch   2/2" in p.stdout and "done: test accuracy" in p.stdout
    lines = (tmp_path / "run" / "ck.metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert len({r["run_id"] for r in recs}) == 1
    for r in recs:
        assert {"loss", "train_acc", "test_acc", "images_per_s", "seconds"} <= r.keys()
        assert 0 <= r["test_acc"] <= 1 and r["images_per_s"] > 0 and r["dataset"] == "mnist-sample"
    assert recs[1]["loss"] < recs[0]["loss"]
    ckd = read_checkpoint(ck)
    assert ckd["extra"]["dataset"] == "mnist-sample" and ckd["extra"]["epoch"] == 2
    assert ckd["extra"]["run_id"] == recs[0]["run_id"]
    e = run("lenet_gpu.evaluate", str(ck), "--backend", "numpy", "--limit", "320", "--json")
    assert e.returncode == 0, e.stderr
    res = json.loads(e.stdout)
    assert res["accuracy"] == pytest.approx(recs[-1]["test_acc"], abs=1e-9)
    assert np.array(res["confusion"]).sum() == 320
    e2 = run("lenet_gpu.evaluate", str(ck), "--backend", "numpy", "--limit", "320")
    assert e2.returncode == 0 and "test accuracy" in e2.stdout and "true \\ pred" in e2.stdout


def test_two_runs_in_one_folder_keep_their_own_metrics(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for ck, epochs in ((a, "1"), (b, "2")):
        p = run("lenet_gpu.train", *QUICK, "--limit", "64", "--epochs", epochs, "--batch-size", "32", "--checkpoint",
                str(ck))
        assert p.returncode == 0, p.stderr
    ra = [json.loads(x) for x in (tmp_path / "a.metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ra] == [1] and [r["epoch"] for r in rb] == [1, 2]
    assert ra[0]["run_id"] != rb[0]["run_id"]


def test_unwritable_checkpoint_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p = run("lenet_gpu.train", *QUICK, "--limit", "64", "--epochs", "1", "--checkpoint", str(blocker / "ck.npz"))
    assert_one_line_error(p, 2, "cannot write")
    assert "dataset:" not in p.stdout  # nothing was loaded or trained


def test_evaluate_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert_one_line_error(run("lenet_gpu.evaluate", str(bad)), 2, "not a lenet_gpu checkpoint")
    assert_one_line_error(run("lenet_gpu.evaluate", str(tmp_path / "none.npz")), 2, "no such checkpoint")


def _params(path: Path) -> np.ndarray:
    return read_checkpoint(path)["params"]


def test_interrupt_and_resume_reach_the_same_parameters(tmp_path):
    common = [*QUICK, "--limit", "256", "--epochs", "2", "--batch-size", "32", "--log-every", "1"]
    full = tmp_path / "full.npz"
    assert run("lenet_gpu.train", *common, "--checkpoint", str(full)).returncode == 0
    part = tmp_path / "part.npz"
    p = run("lenet_gpu.train", *common, "--checkpoint", str(part), "--stop-after", "11")  # mid epoch 2
    assert p.returncode == 130, p.stderr
    assert "interrupted at epoch 2, step 3/8" in p.stderr and "--resume" in p.stderr
    assert "Traceback" not in p.stderr
    state = read_checkpoint(part)["extra"]["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 3)
    r = run("lenet_gpu.train", "--resume", str(part), "--backend", "numpy", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    np.testing.assert_array_equal(_params(part), _params(full))
    # the resumed run's metrics are the uninterrupted run's
    m_full = [json.loads(x) for x in (tmp_path / "full.metrics.jsonl").read_text().splitlines()]
    assert m_full[-1]["epoch"] == 2
    # a resumed run keeps its options
    bad = run("lenet_gpu.train", "--resume", str(part), "--lr", "0.5", "--backend", "numpy")
    assert_one_line_error(bad, 2, "keeps its options")


def test_real_ctrl_c_saves_and_resume_matches(tmp_path):
    common = [*QUICK, "--limit", "1024", "--epochs", "3", "--batch-size", "16"]
    full = tmp_path / "a" / "full.npz"
    assert run("lenet_gpu.train", *common, "--checkpoint", str(full)).returncode == 0
    part = tmp_path / "b" / "part.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LENET_GPU_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lenet_gpu.train", *common, "--checkpoint", str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = part.parent / "part.metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before its first epoch was logged"
        time.sleep(0.05)
    assert metrics.exists(), "no epoch logged within 300 s"
    # the interrupt is forced: stopped after epoch 1 (of 3), the process gets SIGINT pending and wakes up with it,
    # so it cannot finish the run first however fast the machine is
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "saved" in err
    r = run("lenet_gpu.train", "--resume", str(part), "--backend", "numpy", "--no-progress")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(_params(part), _params(full))


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    ck = tmp_path / "ck.npz"
    p = run("lenet_gpu.train", *QUICK, "--limit", "256", "--epochs", "1", "--batch-size", "16", "--optimizer", "sgd",
            "--lr", "1e9", "--schedule", "constant", "--checkpoint", str(ck))
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert "the loss became" in p.stderr and "at step " in p.stderr
    assert not ck.exists()


@pytest.mark.slow
def test_accuracy_gate_numpy_mnist_sample(tmp_path):
    """The default recipe on the bundled mnist-sample reaches at least 97 % test accuracy.

    (The issue asks CI for 96.5 %; the default recipe reaches 97.9 %, so 97 % still leaves room for the
    last-bit differences between machines and thread counts.)"""
    ck = tmp_path / "ck.npz"
    p = run("lenet_gpu.train", *QUICK, "--checkpoint", str(ck), timeout=900)
    assert p.returncode == 0, p.stderr
    last = json.loads((tmp_path / "ck.metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_acc"] >= 0.97, p.stdout


def test_numba_backend_trains_end_to_end_in_the_simulator(tmp_path):
    """Issue #3: under NUMBA_ENABLE_CUDASIM=1, `--backend numba` runs a tiny training end to end."""
    ck = tmp_path / "ck.npz"
    p = run("lenet_gpu.train", "--dataset", "mnist-sample", "--backend", "numba", "--no-progress", "--limit", "8",
            "--epochs", "1", "--batch-size", "4", "--checkpoint", str(ck), env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert p.returncode == 0, p.stderr
    assert "backend: numba" in p.stdout and "done: test accuracy" in p.stdout
    assert np.all(np.isfinite(read_checkpoint(ck)["params"]))


def test_cupy_host_backend_trains_end_to_end(tmp_path):
    """The CUDA C kernels on the CPU harness run a tiny training through the same CLI."""
    ck = tmp_path / "ck.npz"
    p = run("lenet_gpu.train", "--dataset", "mnist-sample", "--backend", "cupy-host", "--no-progress", "--limit", "16",
            "--epochs", "1", "--batch-size", "8", "--checkpoint", str(ck))
    assert p.returncode == 0, p.stderr
    assert "backend: cupy-host" in p.stdout and "done: test accuracy" in p.stdout


def test_train_help_says_what_it_does():
    p = run("lenet_gpu.train", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "%%" not in text and "98% test accuracy" in text
    assert "cpu otherwise, numpy where Numba is not installed" in text  # get_backend("auto")'s order
    assert "cupy and numba on a GPU" in text  # both GPU backends have graphs


def test_progress_bar_ends_at_100_percent(tmp_path):
    p = run("lenet_gpu.train", "--dataset", "mnist-sample", "--backend", "numpy", "--limit", "640", "--epochs", "2",
            "--batch-size", "32", "--log-every", "1", "--checkpoint", str(tmp_path / "c.npz"))
    assert p.returncode == 0, p.stderr
    for epoch in (1, 2):  # 20 steps an epoch, each faster than tqdm redraws; the last draw of each bar shows them all
        draws = [d for d in p.stderr.replace("\r", "\n").splitlines() if d.startswith(f"epoch {epoch}/2")]
        assert draws and "100%" in draws[-1] and "20/20" in draws[-1], draws


def test_progress_bar_draws_its_last_count():
    import io

    from lenet_gpu.train import _finish, _progress

    out = io.StringIO()
    bar = _progress(20, "epoch 1/1", True, file=out)
    bar.mininterval = 60.0  # steps far faster than redraws
    for _ in range(20):
        bar.update(1)
    _finish(bar)
    assert "20/20" in out.getvalue() and "100%" in out.getvalue()


def test_progress_eta_leaves_out_the_first_step():
    """A slow first step (compiling) does not make the ETA of fast steps read minutes."""
    import io

    from lenet_gpu.train import _progress, _restart_clock

    bar = _progress(1000, "epoch 1/1", True, file=io.StringIO())
    time.sleep(0.5)  # the first step: compiling
    bar.update(1)
    _restart_clock(bar)
    for _ in range(2):  # the ETA as the bar shows it just after the first step
        time.sleep(0.002)
        bar.update(1)
    d = bar.format_dict
    rate = d["rate"] or (d["n"] - d["initial"]) / d["elapsed"]
    assert (1000 - bar.n) / rate < 60, rate  # 997 steps at about 2 ms each, not at a share of the first's 0.5 s
    bar.close()
