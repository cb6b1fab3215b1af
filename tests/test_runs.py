"""Runs never overwrite each other: each default run of the training program gets its own checkpoint and
metrics file, a named checkpoint that exists is refused in one line unless --overwrite, and evaluate,
visualize and predict take the latest run when no checkpoint is named (lenet_gpu/runs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.runs import NoRun, latest_checkpoint, new_checkpoint
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "mnist-sample", "--backend", "numpy", "--no-progress", "--limit", "64", "--epochs", "1",
        "--batch-size", "32"]


def run(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LENET_GPU_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def one_line_error(p: subprocess.CompletedProcess, match: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def test_new_checkpoint_takes_the_first_free_name(tmp_path):
    assert new_checkpoint(tmp_path) == tmp_path / "lenet5.npz"
    (tmp_path / "lenet5.metrics.jsonl").write_text("")  # a run that wrote only its metrics still holds the name
    assert new_checkpoint(tmp_path) == tmp_path / "lenet5-2.npz"
    (tmp_path / "lenet5-2.npz").write_bytes(b"")
    assert new_checkpoint(tmp_path) == tmp_path / "lenet5-3.npz"


def test_latest_checkpoint_is_the_last_written(tmp_path):
    with pytest.raises(NoRun, match="no checkpoint in"):
        latest_checkpoint(tmp_path / "none")
    a, b = tmp_path / "lenet5.npz", tmp_path / "other.npz"
    a.write_bytes(b"")
    b.write_bytes(b"")
    os.utime(a, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    os.utime(b, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    (tmp_path / ".lenet5.npz.123.tmp").write_bytes(b"")  # a checkpoint being written is no run
    (tmp_path / "lenet5.metrics.jsonl").write_text("")
    assert latest_checkpoint(tmp_path) == a
    os.utime(b, ns=(3_000_000_000_000_000_000, 3_000_000_000_000_000_000))
    assert latest_checkpoint(tmp_path) == b


def test_a_second_default_run_keeps_the_first_runs_files(tmp_path):
    first = run(tmp_path, "lenet_gpu.train", *TINY)
    assert first.returncode == 0, first.stderr
    ck1, m1 = tmp_path / "runs" / "lenet5.npz", tmp_path / "runs" / "lenet5.metrics.jsonl"
    before = (ck1.read_bytes(), m1.read_text())
    time.sleep(0.05)  # the second run's files are the newer ones on any file system clock
    second = run(tmp_path, "lenet_gpu.train", *TINY, "--seed", "1")
    assert second.returncode == 0, second.stderr
    ck2 = tmp_path / "runs" / "lenet5-2.npz"
    assert "runs/lenet5-2.npz" in second.stdout
    assert ck2.is_file() and (tmp_path / "runs" / "lenet5-2.metrics.jsonl").is_file()
    assert (ck1.read_bytes(), m1.read_text()) == before  # the first run's files, byte for byte
    assert len(m1.read_text().splitlines()) == 1

    # a named checkpoint that exists: one line, nothing touched; --overwrite replaces it
    line = one_line_error(run(tmp_path, "lenet_gpu.train", *TINY, "--checkpoint", "runs/lenet5.npz"),
                          "runs/lenet5.npz exists")
    assert "--overwrite" in line and (ck1.read_bytes(), m1.read_text()) == before
    again = run(tmp_path, "lenet_gpu.train", *TINY, "--seed", "2", "--checkpoint", "runs/lenet5.npz", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert ck1.read_bytes() != before[0] and len(m1.read_text().splitlines()) == 1
    os.utime(ck1, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # lenet5-2 is the latest again

    # the other programs take the latest run
    ev = run(tmp_path, "lenet_gpu.evaluate", "--backend", "numpy", "--limit", "64", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["checkpoint"] == str(Path("runs") / "lenet5-2.npz")
    require("PIL")
    pr = run(tmp_path, "lenet_gpu.predict", str(ROOT / "docs" / "sample_digit.png"), "--json")
    assert pr.returncode == 0, pr.stderr
    assert json.loads(pr.stdout)["file"].endswith("sample_digit.png")
    require("matplotlib")
    vz = run(tmp_path, "lenet_gpu.visualize", "filters", "--out", "fig")
    assert vz.returncode == 0, vz.stderr
    assert (tmp_path / "fig" / "lenet5-2-filters.png").is_file()


def test_no_run_yet_is_one_line(tmp_path):
    one_line_error(run(tmp_path, "lenet_gpu.evaluate"), "no checkpoint in runs/")
    one_line_error(run(tmp_path, "lenet_gpu.train", *TINY, "--resume"), "cannot resume: no checkpoint in runs/")


def test_an_npz_that_is_no_checkpoint_is_one_line(tmp_path):
    """NumPy's own message for a pickled array advises allow_pickle=True; the programs say what the file is."""
    odd = tmp_path / "odd.npz"
    np.savez(odd, a=np.array([{"x": 1}], dtype=object))
    line = one_line_error(run(tmp_path, "lenet_gpu.evaluate", str(odd)), "odd.npz: not a lenet_gpu checkpoint")
    assert "allow_pickle" not in line
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros(3))
    one_line_error(run(tmp_path, "lenet_gpu.evaluate", str(plain)), "plain.npz: not a lenet_gpu checkpoint")


def test_a_file_that_is_no_npz_is_named_so(tmp_path):
    """A text file, an .npy and an empty file are not archives: the line says so (np.load would call them pickles)."""
    from lenet_gpu.model import CheckpointError, read_checkpoint

    text, npy, empty = tmp_path / "notes.npz", tmp_path / "array.npz", tmp_path / "empty.npz"
    text.write_text("garbage\n")
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    empty.write_bytes(b"")
    for path, why in ((text, "it is not an .npz archive"), (npy, "it is not an .npz archive"), (empty, "it is empty")):
        with pytest.raises(CheckpointError, match=f"not a lenet_gpu checkpoint \\({why}\\)"):
            read_checkpoint(path)
