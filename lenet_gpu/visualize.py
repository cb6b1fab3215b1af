"""See inside the network: figures of a trained checkpoint, written as PNG files.

    python -m lenet_gpu.visualize [CHECKPOINT] [COMMAND ...] [options]

Without a CHECKPOINT, the latest run: the most recently written checkpoint in runs/.

Commands (default ``all``):

- ``walkthrough``: one test image (``--index N``, ``--digit D``, or your own ``--image FILE``) through
  every stage, left to right: input 32×32, C1 6@28×28, S2 6@14×14, C3 16@10×10, S4 16@5×5, C5 120
  values, F6 84 values, and the 10 output probabilities with the prediction marked;
- ``filters``: the learned C1 kernels (6 of 5×5) and C3 kernels (16×6 of 5×5);
- ``curves``: loss and accuracy per epoch from the training run's metrics file (JSON lines,
  ``runs/lenet5.npz`` → ``runs/lenet5.metrics.jsonl``), only the lines of the checkpoint's run;
- ``confusion``: the confusion matrix on the test set, and a grid of the most confidently
  misclassified test images;
- ``all``: every one of them (``curves`` is skipped with a note when there are no metrics of this run).

The activations come from ``LeNet5.activations``: the same backend code that trains. Figures are
drawn with Matplotlib's Agg canvas (no display needed). Matplotlib and Pillow are the optional
extra ``viz``: ``pip install 'lenet_gpu[viz]'``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .backends import BACKENDS
from .predict import softmax

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .model import LeNet5

VIZ_HINT = "pip install 'lenet_gpu[viz]'"
COMMANDS = ("walkthrough", "filters", "curves", "confusion", "all")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DPI = 100
MISTAKE_COLS = 8

#: Figure sizes in inches (pixels = inches × dpi). "mistakes" grows with its rows: see figure_size.
FIGSIZES: dict[str, tuple[float, float]] = {
    "walkthrough": (16.0, 4.9),
    "filters": (12.0, 6.8),
    "curves": (11.0, 4.2),
    "confusion": (7.0, 7.2),
}

INK = "#1f2933"
ACCENT = "#d9480f"  # the predicted class
TRUE = "#2b8a3e"  # the true class, when the prediction is wrong
MUTED = "#868e96"
WRONG = "#c92a2a"  # a verdict that is wrong


class VisualizeError(Exception):
    """A problem the command line reports in one line (bad file, bad option value, ...)."""


def figure_size(name: str, n: int = 0, long_names: bool = False) -> tuple[float, float]:
    """The size in inches of figure ``name``; for ``mistakes``, with ``n`` images in the grid (and
    two-line titles when class names are long)."""
    if name == "mistakes":
        rows = max(1, math.ceil(n / MISTAKE_COLS))
        return (11.0, 0.9 + (1.75 if long_names else 1.55) * rows)
    return FIGSIZES[name]


def _new_figure(size: tuple[float, float], dpi: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at its own size and dpi (never cropped, so sizes are predictable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor=fig.get_facecolor(), metadata={"Software": "lenet_gpu"})
    return path


def _plain(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _frame(ax: Any, color: str = "#adb5bd") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color(color)
        s.set_linewidth(0.6)


# --------------------------------------------------------------------------------------------------
# walkthrough
# --------------------------------------------------------------------------------------------------


def _act_style(values: np.ndarray) -> dict[str, Any]:
    """imshow colours for one stage: one scale for all its maps, so weak maps look weak.

    Non-negative activations (relu, sigmoid) use a square-root scale so that moderate responses
    stay visible next to the strongest one; signed ones (tanh family) a diverging map centred on 0.
    """
    from matplotlib.colors import PowerNorm

    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        m = max(abs(lo), abs(hi), 1e-12)
        return {"cmap": "RdBu_r", "vmin": -m, "vmax": m}
    return {"cmap": "magma", "norm": PowerNorm(0.5, vmin=0.0, vmax=max(hi, 1e-12))}


def _axes_in(fig: Figure, x: float, y: float, w: float, h: float) -> Any:
    """An axes placed in inches from the figure's bottom-left corner."""
    fw, fh = fig.get_size_inches()
    return fig.add_axes((x / fw, y / fh, w / fw, h / fh))


def _block_size(rows: int, cols: int, cell: float, gap: float) -> tuple[float, float]:
    return cols * cell + (cols - 1) * gap, rows * cell + (rows - 1) * gap


def render_walkthrough(
    model: LeNet5,
    image: np.ndarray,
    *,
    label: int | None = None,
    classes: Sequence[str] = tuple(str(i) for i in range(10)),
    caption: str = "",
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """One image (28×28 uint8) through every stage of ``model``, left to right.

    Uses ``model.activations`` (the training code's forward pass). ``label``: the true class, if
    known; ``caption``: where the image came from (shown under the title).
    """
    import matplotlib
    from matplotlib.patches import FancyArrowPatch

    image = np.asarray(image, dtype=np.uint8)
    acts = {k: v[0] for k, v in model.activations(image[None]).items()}
    probs = softmax(acts["output"])
    pred = int(np.argmax(probs))
    n_out = len(probs)
    f6 = acts["F6"].shape[0]
    classes = [str(c) for c in classes[:n_out]]
    long_names = max(len(c) for c in classes) > 2

    fig = _new_figure(figure_size("walkthrough"), dpi)
    W, H = fig.get_size_inches()
    mid, span = 1.95, 2.5  # vertical centre and the tallest block, inches
    name_y, info_y = 3.92, 3.82  # header: stage name baseline; two lines of detail hang below it

    # (stage, width) of every block, left to right, to share the free width out as arrow gaps
    c1_cell, c3_cell, gap = 0.66, 0.55, 0.05
    vec_cols = {"C5": 8, "F6": 6 if f6 <= 96 else 10}
    vec_rows = {k: math.ceil(acts[k].size / c) for k, c in vec_cols.items()}
    vec_cell = min(0.165, span / max(vec_rows.values()))
    label_w = 0.95 if long_names else 0.28
    widths = {
        "input": 1.75,
        "C1": _block_size(3, 2, c1_cell, gap)[0],
        "S2": _block_size(3, 2, c1_cell, gap)[0],
        "C3": _block_size(4, 4, c3_cell, gap)[0],
        "S4": _block_size(4, 4, c3_cell, gap)[0],
        "C5": vec_cols["C5"] * vec_cell,
        "F6": vec_cols["F6"] * vec_cell,
        "output": label_w + 1.45,
    }
    left, right = 0.2, 0.3
    arrow_gap = (W - left - right - sum(widths.values())) / (len(widths) - 1)
    xs: dict[str, float] = {}
    x = left
    for k, w in widths.items():
        xs[k] = x
        x += w + arrow_gap

    def header(k: str, name: str, shape: str, what: str) -> None:
        cx = xs[k] + widths[k] / 2 + (label_w / 2 if k == "output" else 0)
        fig.text(cx / W, name_y / H, name, ha="center", va="baseline", fontsize=13, fontweight="bold", color=INK)
        fig.text(cx / W, info_y / H, f"{shape}\n{what}", ha="center", va="top", fontsize=8.5, color=MUTED,
                 linespacing=1.3)

    def maps(k: str, data: np.ndarray, rows: int, cols: int, cell: float, what: str) -> None:
        bw, bh = _block_size(rows, cols, cell, gap)
        y0 = mid - bh / 2
        style = _act_style(data)
        for i in range(data.shape[0]):
            r, c = divmod(i, cols)
            ax = _axes_in(fig, xs[k] + c * (cell + gap), y0 + (rows - 1 - r) * (cell + gap), cell, cell)
            ax.imshow(data[i], interpolation="nearest", **style)
            _frame(ax)
        n, h, w = data.shape
        header(k, k, f"{n} maps @ {h}×{w}", what)

    def vector(k: str, data: np.ndarray, what: str) -> None:
        cols, rows = vec_cols[k], vec_rows[k]
        grid = np.full(rows * cols, np.nan)
        grid[: data.size] = data
        style = _act_style(data)
        cmap = matplotlib.colormaps[style.pop("cmap")].with_extremes(bad="white")
        ax = _axes_in(fig, xs[k], mid - rows * vec_cell / 2, cols * vec_cell, rows * vec_cell)
        ax.imshow(grid.reshape(rows, cols), cmap=cmap, interpolation="nearest", aspect="auto", **style)
        _frame(ax)
        header(k, k, f"{data.size} values", what)

    # input
    side = widths["input"]
    ax = _axes_in(fig, xs["input"], mid - side / 2, side, side)
    ax.imshow(acts["input"][0], cmap="gray", interpolation="nearest")
    _frame(ax)
    header("input", "input", "1 @ 32×32", "28×28, padded, normalised")

    maps("C1", acts["C1"], 3, 2, c1_cell, "5×5 convolution")
    maps("S2", acts["S2"], 3, 2, c1_cell, f"2×2 {model.pool} pooling")
    maps("C3", acts["C3"], 4, 4, c3_cell, "5×5 convolution")
    maps("S4", acts["S4"], 4, 4, c3_cell, f"2×2 {model.pool} pooling")
    vector("C5", acts["C5"], "dense 400→120")
    vector("F6", acts["F6"], f"dense 120→{f6}")

    # output: probabilities as horizontal bars, the prediction (and a wrong prediction's truth) marked
    ax = _axes_in(fig, xs["output"] + label_w, mid - span / 2, widths["output"] - label_w, span)
    colors = [ACCENT if k == pred else (TRUE if k == label else "#ced4da") for k in range(n_out)]
    ax.barh(np.arange(n_out), probs, color=colors, height=0.72)
    ax.set_ylim(n_out - 0.5, -0.5)
    ax.set_xlim(0, 1.0)
    ax.set_yticks(np.arange(n_out))
    ax.set_yticklabels(classes, fontsize=9 if long_names else 10.5)
    for k, t in enumerate(ax.get_yticklabels()):
        if k == pred:
            t.set_color(ACCENT)
            t.set_fontweight("bold")
    ax.set_xticks([0, 0.5, 1])
    ax.set_xticklabels(["0", "0.5", "1"], fontsize=8, color=MUTED)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", alpha=0.3)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    p = probs[pred]
    inside = p > 0.55
    ax.text(p - 0.03 if inside else p + 0.03, pred, f"{100 * p:.1f}%", va="center",
            ha="right" if inside else "left", fontsize=9, fontweight="bold", color="white" if inside else ACCENT)
    if label is not None and label != pred:
        ax.text(probs[label] + 0.03, label, f"true, {100 * probs[label]:.1f}%", va="center", fontsize=8.5,
                color=TRUE)
    header("output", "output", f"{n_out} probabilities", f"softmax of {f6}→{n_out} logits")

    # arrows between the blocks, at mid height
    order = list(widths)
    for a, b in zip(order, order[1:]):
        x0 = xs[a] + widths[a] + 0.06
        x1 = xs[b] - 0.06 + (label_w - 0.3 if b == "output" and long_names else 0)
        fig.add_artist(FancyArrowPatch((x0 / W, mid / H), (x1 / W, mid / H), transform=fig.transFigure,
                                       arrowstyle="-|>", mutation_scale=12, color="#adb5bd", lw=1.3))

    verdict = f"predicted {classes[pred]} ({100 * probs[pred]:.1f}%)"
    if label is not None:
        verdict += ", correct" if label == pred else f", but it is {classes[label]}"
    fig.text(left / W, 1 - 0.22 / H, "LeNet-5: one image through every stage", fontsize=15, fontweight="bold",
             color=INK, va="top")
    fig.text(1 - right / W, 1 - 0.22 / H, verdict, fontsize=13, fontweight="bold", va="top", ha="right",
             color=ACCENT if label is None else (TRUE if label == pred else WRONG))
    if caption:
        fig.text(1 - right / W, 1 - 0.52 / H, caption, fontsize=9, color=MUTED, va="top", ha="right")
    scale = ("square-root scale, dark = 0, bright = strongest" if float(min(v.min() for v in acts.values())) >= 0 or
             model.activation == "relu" else "blue < 0 < red")
    fig.text(left / W, 0.14 / H, f"activation {model.activation}, {model.pool} pooling · colours: one scale "
             f"per stage ({scale}) · drawn from model.activations, the training code's forward pass",
             fontsize=8, color=MUTED, va="bottom")
    return fig


# --------------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------------


def render_filters(model: LeNet5, *, dpi: int = DEFAULT_DPI, caption: str = "") -> Figure:
    """The learned C1 kernels (6 of 5×5) and C3 kernels (16 maps × 6 inputs of 5×5)."""
    p = model.param_dict()
    c1, c3 = p["c1.w"][:, 0], p["c3.w"]  # (6,5,5), (16,6,5,5)
    fig = _new_figure(figure_size("filters"), dpi)
    W, H = fig.get_size_inches()
    x0, cell, gap = 0.95, 0.58, 0.07

    def scale(w: np.ndarray) -> float:
        return float(np.abs(w).max()) or 1.0

    def colorbar(im: Any, x: float, y: float, h: float) -> None:
        cax = _axes_in(fig, x, y, 0.13, h)
        cb = fig.colorbar(im, cax=cax)
        cb.ax.tick_params(labelsize=7.5, colors=MUTED)
        cb.outline.set_visible(False)

    # C3 grid at the bottom: 6 rows (input maps) × 16 columns (output maps)
    y_c3 = 0.25
    grid_w, grid_h = _block_size(6, 16, cell, gap)
    m3 = scale(c3)
    im = None
    for j in range(6):
        for k in range(16):
            ax = _axes_in(fig, x0 + k * (cell + gap), y_c3 + (5 - j) * (cell + gap), cell, cell)
            im = ax.imshow(c3[k, j], cmap="RdBu_r", vmin=-m3, vmax=m3, interpolation="nearest")
            _frame(ax)
            if k == 0:
                ax.set_ylabel(f"S2 map {j}", fontsize=8.5, color=MUTED, rotation=0, ha="right", va="center",
                              labelpad=5)
            if j == 0:
                ax.set_title(f"{k}", fontsize=8.5, color=MUTED, pad=3)
    colorbar(im, x0 + grid_w + 0.15, y_c3, grid_h)
    top_c3 = y_c3 + grid_h + 0.25
    fig.text(x0 / W, (top_c3 + 0.12) / H, "C3: 16 kernels (columns), each 6 × 5×5: one 5×5 slice per S2 input map "
             "(rows)", fontsize=10.5, color=INK, va="bottom")

    # C1 row above it
    c1_cell = 0.8
    y_c1 = top_c3 + 0.75
    m1 = scale(c1)
    for k in range(6):
        ax = _axes_in(fig, x0 + k * (c1_cell + 0.1), y_c1, c1_cell, c1_cell)
        im = ax.imshow(c1[k], cmap="RdBu_r", vmin=-m1, vmax=m1, interpolation="nearest")
        _frame(ax)
        ax.set_title(f"{k}", fontsize=8.5, color=MUTED, pad=3)
    colorbar(im, x0 + 6 * (c1_cell + 0.1) + 0.05, y_c1, c1_cell)
    fig.text(x0 / W, (y_c1 + c1_cell + 0.3) / H, "C1: 6 kernels of 5×5 on the input image", fontsize=10.5,
             color=INK, va="bottom")
    note_x = x0 + 6 * (c1_cell + 0.1) + 0.9
    fig.text(note_x / W, (y_c1 + c1_cell / 2) / H,
             "red: positive weight (responds to ink there)\nblue: negative weight (responds to its absence)\n"
             "one colour scale per layer, centred on 0", fontsize=9, color=MUTED, va="center", linespacing=1.5)

    fig.text(0.2 / W, 1 - 0.22 / H, "LeNet-5: learned convolution kernels", fontsize=15, fontweight="bold",
             color=INK, va="top")
    if caption:
        fig.text(1 - 0.3 / W, 1 - 0.22 / H, caption, fontsize=9, color=MUTED, va="top", ha="right")
    return fig


# --------------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------------


class NoMetrics(VisualizeError):
    """No epochs of this run to draw: the metrics file is missing, or none of its lines is this run's."""


def metrics_path_for(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the training program writes a run's metrics: ``runs/lenet5.npz`` → ``runs/lenet5.metrics.jsonl``
    (the writer's own rule, lenet_gpu.runs.metrics_path_for)."""
    from .runs import metrics_path_for as writer_rule

    return writer_rule(checkpoint)


def read_metrics(path: str | os.PathLike[str], run_id: str | None = None) -> list[dict[str, Any]]:
    """Epoch records from a training run's metrics file (JSON lines, one object per epoch).

    With ``run_id`` (the checkpoint's), a line that carries another ``run_id`` is left out, so the
    curves never mix runs; a line without one is kept (files written before runs had ids). Blank
    lines are skipped; when an epoch appears twice (a resumed run) the later record wins.
    Raises :class:`NoMetrics` when the file is missing or no line is this run's, and
    :class:`VisualizeError` naming the file (and line) for anything unreadable.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NoMetrics(f"{path}: metrics file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VisualizeError(f"{path}: cannot read metrics file: {getattr(e, 'strerror', None) or e}") from None
    by_epoch: dict[int, dict[str, Any]] = {}
    others: dict[str, int] = {}  # run_id -> lines of other runs
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise VisualizeError(f"{path}, line {n}: not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int) or not isinstance(
            rec.get("loss"), (int, float)
        ):
            raise VisualizeError(f"{path}, line {n}: expected an object with an integer 'epoch' and a 'loss'")
        line_run = rec.get("run_id")
        if run_id is not None and line_run is not None and line_run != run_id:
            others[str(line_run)] = others.get(str(line_run), 0) + 1
            continue
        by_epoch[rec["epoch"]] = rec
    if not by_epoch and others:
        ids = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
        raise NoMetrics(f"{path}: no line is from this checkpoint's run {run_id} (its {sum(others.values())} "
                        f"lines are from run {ids}); pass --metrics PATH")
    if not by_epoch:
        raise NoMetrics(f"{path}: metrics file holds no epochs")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _end_label(ax: Any, x: float, y: float, text: str, color: str) -> None:
    """The final value of a curve, written just right of its last point (the curves end there, so
    nothing is drawn over it; render_curves leaves room for it)."""
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(7, 0), ha="left", va="center", fontsize=8.5,
                color=color, fontweight="bold")


def render_curves(records: Sequence[dict[str, Any]], *, dpi: int = DEFAULT_DPI, caption: str = "") -> Figure:
    """Loss and accuracy per epoch from :func:`read_metrics` records."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    epochs = np.array([r["epoch"] for r in records])

    def series(key: str) -> np.ndarray | None:
        vals = [r.get(key) for r in records]
        if all(v is None for v in vals):
            return None
        return np.array([np.nan if v is None else float(v) for v in vals])

    loss, test_loss = series("loss"), series("test_loss")
    train_acc, test_acc = series("train_acc"), series("test_acc")
    fig = _new_figure(figure_size("curves"), dpi)
    gs = fig.add_gridspec(1, 2, left=0.07, right=0.98, top=0.77, bottom=0.13, wspace=0.22)
    marker = "o" if len(epochs) <= 30 else None

    ax = fig.add_subplot(gs[0])
    ax.plot(epochs, loss, marker=marker, ms=4, color="#1c7ed6", lw=2, label="training loss (mean over the epoch)")
    if test_loss is not None:
        ax.plot(epochs, test_loss, marker=marker, ms=4, color=ACCENT, lw=2, ls="--", label="test loss")
        ax.legend(loc="best", fontsize=9, frameon=False)  # "best" avoids the points, so the end label too
    ax.set_title("loss (cross-entropy)", fontsize=10.5, color=INK)
    ax.set_xlabel("epoch")
    both = loss if test_loss is None else np.concatenate([loss, test_loss])
    if np.nanmin(both) > 0 and np.nanmax(both) / np.nanmin(both) > 20:
        ax.set_yscale("log")
    _end_label(ax, epochs[-1], loss[-1], f"{loss[-1]:.4f}", "#1c7ed6")
    ax.margins(y=0.12)

    ax2 = fig.add_subplot(gs[1])
    best = ""
    for vals, name, color in ((train_acc, "train", "#868e96"), (test_acc, "test", ACCENT)):
        if vals is not None:
            ax2.plot(epochs, 100 * vals, marker=marker, ms=4, lw=2, color=color, label=f"{name} accuracy")
    if test_acc is not None and np.isfinite(test_acc).any():
        i = int(np.nanargmax(test_acc))
        best = f"best test accuracy {100 * test_acc[i]:.2f}% (epoch {epochs[i]})"
        if i != len(epochs) - 1:  # a ring on the best epoch; its value is in the header
            ax2.plot(epochs[i], 100 * test_acc[i], "o", ms=10, mfc="none", mec=ACCENT, mew=1.5)
        if np.isfinite(test_acc[-1]):
            _end_label(ax2, epochs[-1], 100 * test_acc[-1], f"{100 * test_acc[-1]:.2f}%", ACCENT)
        ax2.margins(y=0.12)
    ax2.set_title("accuracy", fontsize=10.5, color=INK)
    ax2.set_xlabel("epoch")
    ax2.yaxis.set_major_formatter(PercentFormatter(decimals=0 if len(epochs) < 2 else None))
    if ax2.lines:
        ax2.legend(loc="best", fontsize=9, frameon=False)
    else:
        ax2.text(0.5, 0.5, "no accuracy in the metrics file", ha="center", va="center", color=MUTED,
                 transform=ax2.transAxes)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        for s in ("top", "right"):
            a.spines[s].set_visible(False)
        # room right of the last epoch for the final values, which sit there, clear of every line
        span = max(1, int(epochs[-1] - epochs[0]))
        a.set_xlim(epochs[0] - (1 if len(epochs) == 1 else 0.04 * span), epochs[-1] + max(1.0, 0.16 * span))
        a.set_xticks([t for t in MaxNLocator(integer=True).tick_values(epochs[0], epochs[-1])
                      if epochs[0] <= t <= epochs[-1]])  # no tick for an epoch that did not run

    last = records[-1]
    facts = [f"{len(records)} epoch{'s' if len(records) != 1 else ''}"]
    for key, fmt in (("dataset", "{}"), ("backend", "backend {}")):
        if last.get(key):
            facts.append(fmt.format(last[key]))
    ips = [r.get("images_per_s") for r in records if isinstance(r.get("images_per_s"), (int, float))]
    if ips:
        facts.append(f"{np.median(ips):,.0f} images/s (median)")
    if best:
        facts.append(best)
    fig.text(0.07, 0.965, "Training curves", fontsize=15, fontweight="bold", color=INK, va="top")
    fig.text(0.07, 0.895, " · ".join(facts), fontsize=9.5, color=MUTED, va="top")
    if caption:
        fig.text(0.98, 0.965, caption, fontsize=9, color=MUTED, va="top", ha="right")
    return fig


# --------------------------------------------------------------------------------------------------
# confusion
# --------------------------------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n: int = 10) -> np.ndarray:
    """(n, n) int64 counts: rows the true class, columns the predicted class."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def render_confusion(
    cm: np.ndarray, classes: Sequence[str], *, dpi: int = DEFAULT_DPI, caption: str = ""
) -> Figure:
    """The confusion matrix: counts in each cell, coloured by the fraction of the true class."""
    n = cm.shape[0]
    total = int(cm.sum())
    acc = float(np.trace(cm)) / max(total, 1)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _new_figure(figure_size("confusion"), dpi)
    long_names = max(len(c) for c in classes) > 2
    ax = fig.add_axes((0.17, 0.16, 0.74, 0.68) if long_names else (0.1, 0.07, 0.78, 0.758))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8.5 if total >= 10000 else 9.5,
                        color="white" if frac[i, j] > 0.55 else (INK if i == j else ACCENT))
    ax.set_xticks(np.arange(n))
    ax.set_yticks(np.arange(n))
    ax.set_xticklabels(classes[:n], rotation=40 if long_names else 0, ha="right" if long_names else "center",
                       fontsize=9)
    ax.set_yticklabels(classes[:n], fontsize=9)
    ax.set_xlabel("predicted class", fontsize=10.5)
    ax.set_ylabel("true class", fontsize=10.5)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1)
    ax.tick_params(which="minor", length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.text(0.03, 0.975, "Confusion matrix", fontsize=15, fontweight="bold", color=INK, va="top")
    sub = f"{total:,} test images · accuracy {100 * acc:.2f}% · colour: share of the true class"
    fig.text(0.03, 0.925, sub + (f"\n{caption}" if caption else ""), fontsize=9, color=MUTED, va="top",
             linespacing=1.5)
    return fig


def render_mistakes(
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    count: int = 24,
    dpi: int = DEFAULT_DPI,
    caption: str = "",
) -> tuple[Figure, int]:
    """A grid of the most confidently misclassified images: (figure, how many are shown).

    ``images`` (N,28,28) uint8, ``labels`` (N,), ``probs`` (N,10) softmax outputs.
    """
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != labels)
    conf = probs[wrong, preds[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:count]
    shown = len(order)
    long_names = max(len(str(c)) for c in classes) > 2
    size = figure_size("mistakes", max(shown, 1), long_names)
    fig = _new_figure(size, dpi)
    rows = max(1, math.ceil(shown / MISTAKE_COLS))
    h_in = size[1]
    top = 1 - (1.05 if long_names else 0.9) / h_in
    gs = fig.add_gridspec(rows, MISTAKE_COLS, left=0.02, right=0.98, top=top, bottom=0.02, wspace=0.25,
                          hspace=0.75 if long_names else 0.55)
    for n, i in enumerate(order):
        ax = fig.add_subplot(gs[n // MISTAKE_COLS, n % MISTAKE_COLS])
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        _frame(ax)
        ax.set_box_aspect(1)
        p = preds[i]
        sep = " →\n" if long_names else " → "
        ax.set_title(f"{classes[labels[i]]}{sep}{classes[p]}  {100 * probs[i, p]:.0f}%", fontsize=8.5,
                     color=INK, pad=3, linespacing=1.15)
        ax.set_xlabel(f"test #{i}", fontsize=7, color=MUTED, labelpad=2)
    if shown == 0:
        ax = fig.add_subplot(gs[0, :])
        _plain(ax)
        ax.text(0.5, 0.5, "no misclassified images: every test image was classified correctly", ha="center",
                va="center", fontsize=12, color=MUTED)
    n_wrong = len(wrong)
    fig.text(0.02, 1 - 0.18 / h_in, "Most confident mistakes", fontsize=15, fontweight="bold", color=INK,
             va="top")
    sub = (f"{shown} of {n_wrong} misclassified test images, most confident first · "
           "each titled true → predicted, probability of the prediction")
    if caption:
        sub = f"{caption} · {sub}"
    fig.text(0.02, 1 - 0.55 / h_in, sub, fontsize=9, color=MUTED, va="top")
    return fig, shown


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        # parse_intermixed_args lists the optional COMMAND among the missing when nothing is given
        message = message.replace("CHECKPOINT, COMMAND", "CHECKPOINT")
        _say_error(f"{message} (see --help)")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lenet_gpu.visualize",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "See inside a trained LeNet-5: write figures of a checkpoint as PNG files.\n\n"
            "commands (default: all):\n"
            "  walkthrough  one test image through every stage: input, C1, S2, C3, S4, C5, F6, output\n"
            "               (--index N, --digit D, or --image FILE for your own picture)\n"
            "  filters      the learned C1 kernels (6 of 5x5) and C3 kernels (16x6 of 5x5)\n"
            "  curves       loss and accuracy per epoch from the run's metrics file (--metrics)\n"
            "  confusion    confusion matrix on the test set + the most confident mistakes\n"
            "  all          every figure above (curves skipped with a note if there are no metrics of this run)"
        ),
        epilog=(
            "Files are named <checkpoint stem>-<figure>.png, e.g. lenet5-filters.png.\n\n"
            "exit status:\n"
            "  0  every figure was written\n"
            "  1  a figure could not be made (bad --index, missing metrics file, unreadable data, ...)\n"
            "  2  bad command line, unreadable checkpoint, or missing packages\n\n"
            "examples:\n"
            "  python -m lenet_gpu.visualize                                       # every figure, latest run\n"
            "  python -m lenet_gpu.visualize runs/lenet5.npz                       # every figure of that run\n"
            "  python -m lenet_gpu.visualize runs/lenet5.npz walkthrough --digit 7\n"
            "  python -m lenet_gpu.visualize runs/lenet5.npz walkthrough --image my_digit.png\n"
            "  python -m lenet_gpu.visualize runs/lenet5.npz confusion --out figures/"
        ),
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", nargs="?", default=None,
        help="checkpoint file (.npz) written by python -m lenet_gpu.train (default: the latest run, the most "
        "recently written runs/*.npz)",
    )
    p.add_argument("commands", nargs="*", metavar="COMMAND",
                   help="one or more of: walkthrough, filters, curves, confusion, all (default all)")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the PNG files (default: 'figures' next to the checkpoint, or ./figures "
                        "if that folder cannot be created)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="backend that runs the network (default numpy; 'auto' picks a GPU backend if any)")
    p.add_argument("--dataset", metavar="NAME",
                   help="test set to use: mnist, mnist-sample or fashion-mnist (default: the dataset recorded "
                        "in the checkpoint)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding the four IDX files of the test set (default: from the checkpoint)")
    p.add_argument("--dpi", type=int, default=DEFAULT_DPI,
                   help=f"resolution of the PNGs in pixels per inch (default {DEFAULT_DPI})")
    g = p.add_argument_group("walkthrough")
    pick = g.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, metavar="N", help="the N-th test image (default 0)")
    pick.add_argument("--digit", type=int, metavar="D", help="the first test image of class D (0-9)")
    pick.add_argument("--image", metavar="FILE",
                      help="your own picture of a digit (PNG, JPEG, ...), prepared as lenet_gpu.predict does")
    g = p.add_argument_group("curves")
    g.add_argument("--metrics", metavar="PATH",
                   help="the training run's metrics file (default: the checkpoint's name without .npz plus "
                        ".metrics.jsonl, e.g. runs/lenet5.metrics.jsonl); only lines of the checkpoint's run are "
                        "drawn")
    g = p.add_argument_group("confusion")
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N test images (default: all)")
    g.add_argument("--mistakes", type=int, default=24, metavar="K",
                   help="how many misclassified images to show (default 24, at most 96)")
    return p


def _say_error(msg: str) -> None:
    print(f"lenet_gpu.visualize: error: {msg}", file=sys.stderr)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VisualizeError(f"--out {out}: cannot create folder: {e.strerror or e}") from None
        return out
    for out in (Path(args.checkpoint).resolve().parent / "figures", Path("figures")):
        try:
            out.mkdir(parents=True, exist_ok=True)
            if os.access(out, os.W_OK):
                return out
        except OSError:
            continue
    raise VisualizeError("cannot create a folder for the figures; pass --out DIR")


class _Session:
    """What the commands share: the model, its checkpoint's extra, and the test set (loaded lazily)."""

    def __init__(self, args: argparse.Namespace, model: LeNet5, extra: dict[str, Any]) -> None:
        self.args, self.model, self.extra = args, model, extra
        self._ds: Any = None
        self.stem = Path(args.checkpoint).stem

    @property
    def caption(self) -> str:
        parts = [Path(self.args.checkpoint).name]
        if isinstance(self.extra.get("epoch"), int):
            parts.append(f"epoch {self.extra['epoch']}")
        return ", ".join(parts)

    def classes(self) -> tuple[str, ...]:
        from .predict import class_names

        if self._ds is not None:
            return tuple(self._ds.classes)
        return class_names({"dataset": self.args.dataset or self.extra.get("dataset")})

    def dataset(self) -> Any:
        if self._ds is None:
            from .data import DataError, load_dataset

            name = self.args.dataset or self.extra.get("dataset")
            data_dir = self.args.data_dir
            if data_dir is None and not self.args.dataset:
                data_dir = self.extra.get("data_dir")
            if name is None and data_dir is None:
                raise VisualizeError(
                    "the checkpoint does not record its dataset; pass --dataset NAME or --data-dir DIR"
                )
            try:
                self._ds = load_dataset(name, data_dir=data_dir)
            except DataError as e:
                raise VisualizeError(str(e)) from None
        return self._ds


def _walkthrough(s: _Session, out: Path) -> list[Path]:
    a = s.args
    if a.image:
        from .imageprep import ImagePrepError, load_image, prepare_digit

        try:
            img = prepare_digit(load_image(a.image))
        except ImagePrepError as e:
            raise VisualizeError(f"{a.image}: {e}") from None
        label, caption, tag = None, f"{Path(a.image).name} (prepared to 28×28) · {s.caption}", Path(a.image).stem
    else:
        ds = s.dataset()
        n = len(ds.test_labels)
        if a.digit is not None:
            if not 0 <= a.digit < len(ds.classes):
                raise VisualizeError(f"--digit must be a class id 0..{len(ds.classes) - 1} (got {a.digit})")
            hits = np.flatnonzero(ds.test_labels == a.digit)
            if not hits.size:
                raise VisualizeError(f"the test set of {ds.name} has no image of class {a.digit}")
            index = int(hits[0])
        else:
            index = 0 if a.index is None else a.index
            if not -n <= index < n:
                raise VisualizeError(f"--index must be in 0..{n - 1} for the {n} test images of {ds.name}")
            index %= n
        img, label = ds.test_images[index], int(ds.test_labels[index])
        caption, tag = f"{ds.name} test image #{index} · {s.caption}", f"test{index}"
    fig = render_walkthrough(s.model, img, label=label, classes=s.classes(), caption=caption, dpi=a.dpi)
    return [save_figure(fig, out / f"{s.stem}-walkthrough-{tag}.png")]


def _filters(s: _Session, out: Path) -> list[Path]:
    fig = render_filters(s.model, dpi=s.args.dpi, caption=s.caption)
    return [save_figure(fig, out / f"{s.stem}-filters.png")]


def _metrics_path(s: _Session) -> Path:
    return Path(s.args.metrics) if s.args.metrics else metrics_path_for(s.args.checkpoint)


def _curves(s: _Session, out: Path) -> list[Path]:
    run_id = s.extra.get("run_id")
    records = read_metrics(_metrics_path(s), run_id=run_id if isinstance(run_id, str) else None)
    fig = render_curves(records, dpi=s.args.dpi, caption=s.caption)
    return [save_figure(fig, out / f"{s.stem}-curves.png")]


def _confusion(s: _Session, out: Path) -> list[Path]:
    a = s.args
    ds = s.dataset()
    images, labels = ds.test_images, ds.test_labels.astype(np.int64)
    if a.limit is not None:
        images, labels = images[: a.limit], labels[: a.limit]
    probs = softmax(s.model.logits(images))
    preds = probs.argmax(axis=1)
    classes = tuple(ds.classes)
    caption = f"{ds.name} · {s.caption}"
    cm = confusion_matrix(labels, preds, len(classes))
    paths = [save_figure(render_confusion(cm, classes, dpi=a.dpi, caption=caption),
                         out / f"{s.stem}-confusion.png")]
    fig, _ = render_mistakes(images, labels, probs, classes, count=a.mistakes, dpi=a.dpi, caption=caption)
    paths.append(save_figure(fig, out / f"{s.stem}-mistakes.png"))
    return paths


_RUNNERS = {"walkthrough": _walkthrough, "filters": _filters, "curves": _curves, "confusion": _confusion}


def main(argv: Sequence[str] | None = None) -> int:
    """The command-line program; returns the exit status."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    commands = list(args.commands) or ["all"]
    if args.checkpoint in COMMANDS and commands and commands[0] not in COMMANDS:
        args.checkpoint, commands[0] = commands[0], args.checkpoint  # "visualize walkthrough CKPT" works too
    elif args.checkpoint in COMMANDS:  # figures only: of the latest run
        commands = args.commands = [args.checkpoint] + list(args.commands)
        args.checkpoint = None
    bad = [c for c in commands if c not in COMMANDS]
    if bad:
        parser.error(f"unknown figure {bad[0]!r} (choose from {', '.join(COMMANDS)})")
    if "all" in commands:
        commands = ["walkthrough", "filters", "curves", "confusion"]
    commands = list(dict.fromkeys(commands))
    if not 10 <= args.dpi <= 600:
        parser.error(f"--dpi must be between 10 and 600 (got {args.dpi})")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1 (got {args.limit})")
    if not 0 <= args.mistakes <= 96:
        parser.error(f"--mistakes must be between 0 and 96 (got {args.mistakes})")
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        _say_error(f"figures need matplotlib and Pillow: {VIZ_HINT}")
        return EXIT_USAGE
    import matplotlib

    matplotlib.use("Agg")

    from .backends import BackendUnavailable
    from .model import CheckpointError, LeNet5
    from .runs import NoRun, latest_checkpoint

    try:
        if args.checkpoint is None:
            args.checkpoint = str(latest_checkpoint())
        model, extra = LeNet5.load_with_extra(args.checkpoint, backend=args.backend)
    except (CheckpointError, BackendUnavailable, NoRun) as e:
        _say_error(str(e))
        return EXIT_USAGE
    except OSError as e:
        _say_error(f"{args.checkpoint}: cannot read checkpoint: {e.strerror or e}")
        return EXIT_USAGE
    except (TypeError, ValueError) as e:
        _say_error(f"{args.checkpoint}: checkpoint options are not understood ({e})")
        return EXIT_USAGE
    try:
        out = _out_dir(args)
    except VisualizeError as e:
        _say_error(str(e))
        return EXIT_USAGE

    session = _Session(args, model, extra)
    explicit_all = "curves" not in args.commands and "curves" in commands
    status = EXIT_OK
    for cmd in commands:
        try:
            for path in _RUNNERS[cmd](session, out):
                print(f"wrote {path}")
        except NoMetrics as e:
            if cmd == "curves" and explicit_all and not args.metrics:  # "all" draws what there is
                print(f"skipping curves: {e}", file=sys.stderr)
            else:
                _say_error(f"{cmd}: {e}")
                status = EXIT_FAILED
        except VisualizeError as e:
            _say_error(f"{cmd}: {e}")
            status = EXIT_FAILED
        except OSError as e:  # writing the PNG
            _say_error(f"{cmd}: cannot write the figure: {e.strerror or e}")
            status = EXIT_FAILED
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
