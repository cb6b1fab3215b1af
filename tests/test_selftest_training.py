"""The self-test's training phase (issue 16 items 5 and 6, issue 21): time to fixed accuracies per dataset, a
--data-dir folder recognised by its checksums, the first training step with an empty and a warm compile cache,
and the gates an emulated run waives named in the report. Cheap: no training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lenet_gpu import data
from lenet_gpu.selftest import phases as P
from lenet_gpu.selftest import report
from lenet_gpu.selftest.common import PhaseRecorder

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_recognize_by_checksum():
    fashion = {b: ("0" * 64, data.FASHION_MNIST_IDX_SHA256[b][1]) for b in data.IDX_FILES}
    assert data.recognize(fashion) == "fashion-mnist"
    mnist = {b: (data.MNIST_GZ_SHA256[b + ".gz"][1], "1" * 64) for b in data.IDX_FILES}
    assert data.recognize(mnist) == "mnist"
    other = dict(fashion)
    other["t10k-labels-idx1-ubyte"] = ("0" * 64, "2" * 64)  # one file that is not Fashion-MNIST's
    assert data.recognize(other) is None
    assert data.recognize({b: fashion[b] for b in data.IDX_FILES[:3]}) is None


def test_a_folder_of_other_idx_files_keeps_its_dir_name(tmp_path):
    import struct

    import numpy as np

    for base, n, shape in (("train-images-idx3-ubyte", 20, (28, 28)), ("train-labels-idx1-ubyte", 20, ()),
                           ("t10k-images-idx3-ubyte", 10, (28, 28)), ("t10k-labels-idx1-ubyte", 10, ())):
        dims = (n, *shape)
        arr = np.arange(int(np.prod(dims)), dtype=np.uint8) % (10 if not shape else 255)
        (tmp_path / base).write_bytes(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
                                      + arr.tobytes())
    ds = data.load_dataset(data_dir=tmp_path, download=False, progress=False)
    assert ds.name == f"dir:{tmp_path}"
    assert P.dataset_of_dir(str(tmp_path)) == "dir"


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debians_fashion_mnist_is_recognised():
    ds = data.load_dataset(data_dir=FASHION_DIR, download=False, progress=False)
    assert ds.name == "fashion-mnist" and ds.classes == data.FASHION_MNIST_CLASSES
    assert P.dataset_of_dir(str(FASHION_DIR)) == "fashion-mnist"


def test_training_runs_thresholds_and_waived_gates(tmp_path):
    emulated = P.training_runs({"mode": "emulate", "backends": ["cupy-host", "numba-sim"]})
    assert all(r["gate"] is None and "does not apply" in r["waived"] and "97%" in r["waived"] for r in emulated)
    gpu = P.training_runs({"mode": "gpu", "backends": ["cupy", "numba"], "data_dir": str(tmp_path),
                           "data_dir_dataset": "fashion-mnist"})
    sample = [r for r in gpu if r["dataset"] == "mnist-sample"]
    assert all(r["gate"] == P.SAMPLE_GATE and not r["waived"] for r in sample) and len(sample) == 2
    fashion = [r for r in gpu if r["dataset"] == "data-dir fashion-mnist"]
    assert len(fashion) == 2 and all(r["thresholds"] == (0.88, 0.90, 0.91) for r in fashion)
    mnist = P.training_runs({"mode": "gpu", "backends": ["cupy"], "data_dir": str(tmp_path),
                             "data_dir_dataset": "mnist"})
    assert mnist[-1]["thresholds"] == (0.98, 0.99)


def test_peer_time_to_accuracy_hook(tmp_path):
    rec = PhaseRecorder("training", None, 60)
    accs = [0.80, 0.87, 0.885, 0.89, 0.90, 0.905, 0.905, 0.906, 0.907, 0.908, 0.909, 0.9]

    def trainer(data_dir, epochs):
        assert data_dir == str(tmp_path)
        return [{"epoch": i + 1, "seconds": 2.0, "test_acc": a} for i, a in enumerate(accs[:epochs])]

    c = P.peer_time_to_accuracy(rec, {"data_dir": str(tmp_path)}, trainer, (0.88, 0.90, 0.91), epochs=12)
    assert c["status"] == "pass", c
    assert c["time_to_acc"] == {"0.88": 6.0, "0.90": 10.0, "0.91": None}
    assert c["acc_at_epoch"] == {"10": 0.908} and c["epochs"] == 12 and c["final_test_acc"] == 0.9


def test_first_step_empty_and_warm_cache(tmp_path):
    """The child that times a first training step (here on the numpy backend: no compile cache)."""
    rec = PhaseRecorder("training", None, 120)
    P.first_step_cases({"out": str(tmp_path)}, rec, "numpy", batch=4)
    assert [c["cache"] for c in rec.cases] == ["empty", "warm"]
    for c in rec.cases:
        assert c["status"] == "pass", c
        assert c["first_step_s"] > 0 and c["next_step_s"] > 0 and c["process_s"] >= c["first_step_s"]
    assert not (tmp_path / ".work" / "first-step-cache-numpy").exists()


def test_report_names_waived_gates_and_times_to_accuracy():
    training = {"counts": {"pass": 2}, "notes": [], "cases": [
        {"name": "cupy-host mnist-sample", "status": "pass", "backend": "cupy-host", "dataset": "mnist-sample",
         "gate": None, "waived": "the 97% gate does not apply", "epochs": 1, "final_test_acc": 0.5,
         "time_to_acc": {"0.97": None, "0.98": None}},
        {"name": "cupy fashion", "status": "pass", "backend": "cupy", "dataset": "data-dir fashion-mnist",
         "gate": None, "epochs": 15, "final_test_acc": 0.916, "time_to_acc": {"0.88": 0.61, "0.90": 1.2, "0.91": None},
         "acc_at_epoch": {"10": 0.912}},
        {"name": "numba first", "status": "pass", "backend": "numba", "kind": "first_step", "cache": "empty",
         "start_s": 2.0, "first_step_s": 7.1, "next_step_s": 0.001, "process_s": 9.5}],
        "data": {"waived_gates": ["cupy-host mnist-sample: the 97% gate does not apply"]}}
    results = {"phases": {p: None for p in report.PHASES}, "backends": ["cupy-host"], "mode": "emulate"}
    results["phases"]["training"] = training
    md = report.render(results)
    assert "## Waived gates" in md and "the 97% gate does not apply" in md
    assert report.summarize(results)["waived_gates"][0]["phase"] == "training"
    assert "waived (see below)" in md and "88%: 0.61; 90%: 1.2; 91%: –" in md and "| 0.912 |" in md
    assert "| numba | empty | PASS | 2 | 7.1 |" in md
