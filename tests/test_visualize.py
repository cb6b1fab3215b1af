"""lenet_gpu.visualize: every figure rendered with Agg from a small trained checkpoint, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from lenet_gpu import visualize  # noqa: E402
from lenet_gpu.model import LeNet5  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _dataset():
    from lenet_gpu.data import load_dataset

    return load_dataset("mnist-sample")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A checkpoint trained for a few dozen steps on mnist-sample, with a 3-epoch metrics file."""
    folder = tmp_path_factory.mktemp("run")
    ds = _dataset()
    model = LeNet5(backend="numpy", seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        idx = rng.choice(len(ds.train_labels), 32, replace=False)
        model.train_step(ds.train_images[idx], ds.train_labels[idx])
    model.save(folder / "model.npz", extra={"dataset": "mnist-sample", "data_dir": None, "epoch": 3})
    lines = [
        {"epoch": e, "loss": loss, "train_acc": acc - 0.02, "test_loss": loss * 0.8, "test_acc": acc,
         "images_per_s": 400.0 + e,
         "seconds": 10.0, "lr": 1e-3, "dataset": "mnist-sample", "backend": "numpy"}
        for e, loss, acc in ((1, 1.9, 0.55), (2, 0.9, 0.71), (3, 0.6, 0.78))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.fixture(scope="module")
def model(run_dir: Path) -> LeNet5:
    return LeNet5.load(run_dir / "model.npz", backend="numpy")


def assert_png(path: Path, size_in: tuple[float, float], dpi: int) -> None:
    """The file is a PNG of the expected pixel size and is not blank."""
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(size_in[0] * dpi), round(size_in[1] * dpi)), (path, im.size)
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.std() > 10, f"{path} looks blank (pixel std {px.std():.1f})"
    # not one colour dominating everything either: some dark text/ink and a white background
    assert (px < 100).mean() > 0.005 and (px > 240).mean() > 0.2


# --------------------------------------------------------------------------------------------------
# the command line, in process (one import of matplotlib)
# --------------------------------------------------------------------------------------------------


def test_all_figures(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "figs"
    rc = visualize.main([str(run_dir / "model.npz"), "all", "--out", str(out), "--limit", "300", "--dpi", "60"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["model-walkthrough-test0.png", "model-filters.png", "model-curves.png", "model-confusion.png",
         "model-mistakes.png"]
    )
    assert captured.out.count("wrote ") == 5
    for name in ("walkthrough", "filters", "curves", "confusion"):
        stem = "walkthrough-test0" if name == "walkthrough" else name
        assert_png(out / f"model-{stem}.png", visualize.figure_size(name), 60)
    with Image.open(out / "model-mistakes.png") as im:
        assert im.size[0] == round(visualize.figure_size("mistakes", 24)[0] * 60)


def test_walkthrough_digit_uses_model_activations(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []
    original = LeNet5.activations

    def spy(self, images):
        calls.append(images.copy())
        return original(self, images)

    monkeypatch.setattr(LeNet5, "activations", spy)
    ds = _dataset()
    first7 = int(np.flatnonzero(ds.test_labels == 7)[0])
    rc = visualize.main([str(run_dir / "model.npz"), "walkthrough", "--digit", "7", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    path = tmp_path / f"model-walkthrough-test{first7}.png"
    assert_png(path, visualize.figure_size("walkthrough"), visualize.DEFAULT_DPI)
    assert len(calls) == 1 and np.array_equal(calls[0][0], ds.test_images[first7])


def test_walkthrough_of_own_image(run_dir: Path, tmp_path: Path, capsys) -> None:
    ds = _dataset()
    Image.fromarray(255 - ds.test_images[3]).resize((90, 90)).save(tmp_path / "mine.png")
    rc = visualize.main([str(run_dir / "model.npz"), "walkthrough", "--image", str(tmp_path / "mine.png"),
                         "--out", str(tmp_path), "--dpi", "50"])
    assert rc == 0, capsys.readouterr().err
    assert_png(tmp_path / "model-walkthrough-mine.png", visualize.figure_size("walkthrough"), 50)


def test_default_out_dir_is_next_to_checkpoint(run_dir: Path, capsys) -> None:
    rc = visualize.main([str(run_dir / "model.npz"), "curves", "--dpi", "40"])
    assert rc == 0, capsys.readouterr().err
    assert_png(run_dir / "figures" / "model-curves.png", visualize.figure_size("curves"), 40)


def test_command_first_order_and_bad_values(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    ck = str(run_dir / "model.npz")
    # "visualize COMMAND CHECKPOINT" is understood too
    assert visualize.main(["curves", ck, "--out", str(tmp_path), "--dpi", "40"]) == 0
    assert (tmp_path / "model-curves.png").is_file()
    capsys.readouterr()
    # a bad index: one line, exit 1
    assert visualize.main([ck, "walkthrough", "--index", "5000", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--index must be in 0..999" in err[0]
    # explicit curves with no metrics file: one line, exit 1; "all" only skips it
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "m.npz").write_bytes((run_dir / "model.npz").read_bytes())
    assert visualize.main([str(lonely / "m.npz"), "curves"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics file not found" in err[0]
    ran = []
    stubs = {k: (lambda s, out, k=k: ran.append(k) or [out / k]) for k in visualize._RUNNERS}
    monkeypatch.setattr(visualize, "_RUNNERS", stubs)  # the dispatcher only; figures are tested above
    assert visualize.main([str(lonely / "m.npz"), "all"]) == 0
    captured = capsys.readouterr()
    assert "skipping curves" in captured.err and ran == ["walkthrough", "filters", "confusion"]
    # unknown command and bad option values are usage errors (argparse: exit 2)
    for argv in ([ck, "histogram"], [ck, "filters", "--dpi", "0"], [ck, "confusion", "--limit", "0"],
                 [ck, "walkthrough", "--index", "1", "--digit", "2"]):
        with pytest.raises(SystemExit) as e:
            visualize.main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_dataset_override_and_missing_dataset(run_dir: Path, tmp_path: Path, model: LeNet5, capsys) -> None:
    ck = tmp_path / "nodata.npz"
    model.save(ck, extra={"epoch": 1})  # no dataset recorded
    assert visualize.main([str(ck), "confusion", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pass --dataset" in err and "Traceback" not in err
    assert visualize.main([str(ck), "confusion", "--dataset", "mnist-sample", "--limit", "64",
                           "--out", str(tmp_path), "--dpi", "40"]) == 0
    assert visualize.main([str(ck), "confusion", "--data-dir", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path)]) == 1
    assert "nowhere" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------------


def test_read_metrics(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 2, "loss": 0.5}\n\n{"epoch": 1, "loss": 0.9}\n{"epoch": 2, "loss": 0.4}\n')
    recs = visualize.read_metrics(p)
    assert [r["epoch"] for r in recs] == [1, 2] and recs[1]["loss"] == 0.4  # sorted; later record wins
    p.write_text('{"epoch": 1, "loss": 0.9}\nnot json\n')
    with pytest.raises(visualize.VisualizeError, match="line 2"):
        visualize.read_metrics(p)
    p.write_text("")
    with pytest.raises(visualize.VisualizeError, match="no epochs"):
        visualize.read_metrics(p)
    with pytest.raises(visualize.VisualizeError, match="not found"):
        visualize.read_metrics(tmp_path / "nope.jsonl")


def test_curves_single_epoch_and_no_accuracy(tmp_path: Path) -> None:
    fig = visualize.render_curves([{"epoch": 1, "loss": 0.7}], dpi=40)
    path = visualize.save_figure(fig, tmp_path / "c.png")
    assert_png(path, visualize.figure_size("curves"), 40)


def test_confusion_matrix_counts() -> None:
    cm = visualize.confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_mistakes_grid_when_nothing_is_wrong(tmp_path: Path) -> None:
    images = np.zeros((5, 28, 28), np.uint8)
    labels = np.arange(5)
    probs = np.eye(10)[labels]
    fig, shown = visualize.render_mistakes(images, labels, probs, [str(i) for i in range(10)], dpi=40)
    assert shown == 0
    path = visualize.save_figure(fig, tmp_path / "m.png")
    with Image.open(path) as im:
        assert im.size == (round(visualize.figure_size("mistakes", 1)[0] * 40),
                           round(visualize.figure_size("mistakes", 1)[1] * 40))


def test_mistakes_most_confident_first(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 3])
    probs = np.full((4, 10), 0.01)
    probs[0, 5], probs[1, 1], probs[2, 7], probs[3, 9] = 0.6, 0.9, 0.95, 0.7  # #1 is right
    images = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    fig, shown = visualize.render_mistakes(images, labels, probs, [str(i) for i in range(10)], dpi=40)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert shown == 3 and titles == ["2 → 7  95%", "3 → 9  70%", "0 → 5  60%"]


def test_walkthrough_other_activation(tmp_path: Path) -> None:
    """tanh gives signed activations (diverging colours); f6 other than 84 lays out too."""
    ds = _dataset()
    m = LeNet5(backend="numpy", activation="tanh", f6=60, seed=1)
    fig = visualize.render_walkthrough(m, ds.test_images[0], label=int(ds.test_labels[0]), dpi=40)
    path = visualize.save_figure(fig, tmp_path / "w.png")
    assert_png(path, visualize.figure_size("walkthrough"), 40)


# --------------------------------------------------------------------------------------------------
# as a program (subprocess): help, bad checkpoints, missing packages
# --------------------------------------------------------------------------------------------------


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "lenet_gpu.visualize", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"})


def test_cli_help() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for word in ("walkthrough", "filters", "curves", "confusion", "--out", "--index", "--digit", "--metrics",
                 "--backend", "--dataset", "--data-dir"):
        assert word in r.stdout


def test_cli_bad_checkpoints(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    for path, words in ((tmp_path / "missing.npz", "no such checkpoint"), (junk, "not a lenet_gpu checkpoint")):
        r = _run(str(path), "filters", "--out", str(tmp_path))
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr


def test_cli_without_matplotlib(run_dir: Path) -> None:
    block = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from lenet_gpu.visualize import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = _run(str(run_dir / "model.npz"), "filters", code=block)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install 'lenet_gpu[viz]'" in r.stderr
