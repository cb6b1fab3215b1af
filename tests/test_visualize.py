"""lenet_gpu.visualize: every figure rendered with Agg from a small trained checkpoint, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require

require("matplotlib")
require("PIL")

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
    model.save(folder / "model.npz", extra={"dataset": "mnist-sample", "data_dir": None, "epoch": 3,
                                            "run_id": "run-b"})
    (folder / "model.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metric_lines("run-b")))
    return folder


def metric_lines(run_id: str | None, acc0: float = 0.55) -> list[dict]:
    return [
        {"epoch": e, "loss": loss, "train_acc": acc - 0.02, "test_loss": loss * 0.8, "test_acc": acc,
         "images_per_s": 400.0 + e, "seconds": 10.0, "lr": 1e-3, "dataset": "mnist-sample", "backend": "numpy",
         **({"run_id": run_id} if run_id else {})}
        for e, loss, acc in ((1, 1.9, acc0), (2, 0.9, acc0 + 0.16), (3, 0.6, acc0 + 0.23))
    ]


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
    stubs = {k: (lambda s, out, k=k: ran.append(k) or [out / k]) for k in ("walkthrough", "filters", "confusion")}
    monkeypatch.setattr(visualize, "_RUNNERS", {**visualize._RUNNERS, **stubs})  # figures are tested above
    assert visualize.main([str(lonely / "m.npz"), "all"]) == 0
    captured = capsys.readouterr()
    assert "skipping curves" in captured.err and ran == ["walkthrough", "filters", "confusion"]
    # unknown figure and bad option values are usage errors: one line (no usage block), exit 2
    for argv, words in (([ck, "histogram"], "unknown figure 'histogram' (choose from walkthrough, filters,"),
                        ([ck, "filters", "--dpi", "0"], "--dpi must be between"),
                        ([ck, "confusion", "--limit", "0"], "--limit must be at least 1"),
                        ([ck, "walkthrough", "--index", "1", "--digit", "2"], "not allowed with argument"),
                        ([ck, "--dpi", "many"], "invalid int value")):
        with pytest.raises(SystemExit) as e:
            visualize.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and err[0].startswith("lenet_gpu.visualize: error: "), err
    # no checkpoint named and no run yet: one line, exit 2
    monkeypatch.chdir(tmp_path)
    assert visualize.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint in runs/" in err[0], err


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


def test_metrics_path_for() -> None:
    assert visualize.metrics_path_for("runs/lenet5.npz") == Path("runs/lenet5.metrics.jsonl")
    assert visualize.metrics_path_for("a/b.v2.npz") == Path("a/b.v2.metrics.jsonl")
    assert visualize.metrics_path_for("model") == Path("model.metrics.jsonl")


def test_read_metrics_keeps_only_this_run(tmp_path: Path) -> None:
    p = tmp_path / "m.metrics.jsonl"
    lines = metric_lines("old", acc0=0.1) + metric_lines("new")[:2] + metric_lines(None)[2:]
    p.write_text("".join(json.dumps(r) + "\n" for r in lines))
    recs = visualize.read_metrics(p, run_id="new")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert [r.get("run_id") for r in recs] == ["new", "new", None]  # a line without an id is kept
    assert recs[0]["test_acc"] == 0.55
    # without a run id (an older checkpoint), every line; later epochs win
    assert [r["test_acc"] for r in visualize.read_metrics(p)] == pytest.approx([0.55, 0.71, 0.78])
    with pytest.raises(visualize.NoMetrics, match=r"no line is from this checkpoint's run zzz \(its 6 lines are "
                       r"from run new, old\); pass --metrics"):
        p.write_text("".join(json.dumps(r) + "\n" for r in metric_lines("old") + metric_lines("new")))
        visualize.read_metrics(p, run_id="zzz")


def test_curves_never_show_another_run(run_dir: Path, tmp_path: Path, model: LeNet5, capsys, monkeypatch) -> None:
    ck = tmp_path / "other.npz"
    model.save(ck, extra={"dataset": "mnist-sample", "epoch": 3, "run_id": "run-c"})
    # the file beside it holds another run only: one line of error, exit 1; "all" skips curves with a note
    (tmp_path / "other.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metric_lines("run-b")))
    assert visualize.main([str(ck), "curves", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no line is from this checkpoint's run run-c" in err[0], err
    assert not (tmp_path / "other-curves.png").exists()
    seen = []
    monkeypatch.setattr(visualize, "render_curves", lambda recs, **kw: seen.append(recs) or visualize._new_figure(
        (2, 2), 20))
    stubs = {k: (lambda s, out, k=k: [out / k]) for k in ("walkthrough", "filters", "confusion")}
    monkeypatch.setattr(visualize, "_RUNNERS", {**visualize._RUNNERS, **stubs})
    assert visualize.main([str(ck), "all", "--out", str(tmp_path)]) == 0
    assert "skipping curves: " in capsys.readouterr().err and not seen
    # mixed: only run-c's epochs are drawn; --metrics points elsewhere
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in metric_lines("run-b") + metric_lines("run-c", 0.3)[:2]))
    assert visualize.main([str(ck), "curves", "--metrics", str(mixed), "--out", str(tmp_path)]) == 0
    assert [(r["epoch"], r["run_id"]) for r in seen[0]] == [(1, "run-c"), (2, "run-c")]
    assert [r["test_acc"] for r in seen[0]] == pytest.approx([0.3, 0.46])


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
