"""Evaluate a checkpoint: ``python -m lenet_gpu.evaluate [CHECKPOINT]`` (default: the latest run in runs/).

Prints the test accuracy, the mean loss, per-class accuracy and the confusion matrix (rows: true
class, columns: predicted class). The test set is the checkpoint's own dataset unless
``--dataset``/``--data-dir`` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .backends import BACKENDS, BackendUnavailable
from .model import CheckpointError, LeNet5


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"lenet_gpu.evaluate: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lenet_gpu.evaluate",
                description="Report test accuracy and the confusion matrix of a trained LeNet-5 checkpoint.")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a checkpoint written by python -m lenet_gpu.train (default: the latest run, the most "
                   "recently written runs/*.npz)")
    p.add_argument("--dataset", default=None, help="mnist, mnist-sample, fashion-mnist (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="a folder holding the four IDX files")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="where to run (default auto)")
    p.add_argument("--batch-size", type=int, default=1000, help="evaluation batch size (default 1000)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="a fixed sample of N test images, the classes in their proportions (the sample that the "
                   "training program's --limit N evaluates)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """counts[t, p] = number of images of true class t predicted as p."""
    cm = np.zeros((classes, classes), np.int64)
    np.add.at(cm, (labels.astype(np.intp), pred.astype(np.intp)), 1)
    return cm


def format_confusion(cm: np.ndarray, names: tuple[str, ...]) -> str:
    short = [n[:6] for n in names]
    w = max(6, max(len(str(cm.max())), max(len(s) for s in short)) + 1)
    lines = ["true \\ pred".ljust(12) + "".join(s.rjust(w) for s in short) + "   acc".rjust(w + 2)]
    for i, row in enumerate(cm):
        acc = row[i] / row.sum() if row.sum() else float("nan")
        lines.append(short[i].ljust(12) + "".join(str(v).rjust(w) for v in row) + f"  {acc:{w}.3f}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0):
        raise ValueError("--batch-size and --limit must be > 0")
    from .data import load_dataset
    from .runs import latest_checkpoint

    if args.checkpoint is None:
        args.checkpoint = str(latest_checkpoint())
    model, extra = LeNet5.load_with_extra(args.checkpoint, backend=args.backend)
    name = args.dataset or (None if args.data_dir else extra.get("dataset"))
    data_dir = args.data_dir or (None if args.dataset else extra.get("data_dir"))
    ds = load_dataset(name, data_dir=data_dir, download=not args.no_download, progress=not args.json)
    images, labels = ds.test_images, ds.test_labels
    if args.limit:
        from .data import stratified_indices

        keep = stratified_indices(labels, args.limit)
        images, labels = images[keep], labels[keep]
    logits = model.logits(images, batch_size=args.batch_size)
    pred = np.argmax(logits, axis=1)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))
    cm = confusion_matrix(labels, pred)
    acc = float(np.trace(cm) / cm.sum())
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "dataset": ds.name, "backend": model.backend.name,
                          "images": int(len(labels)), "accuracy": acc, "loss": loss,
                          "confusion": cm.tolist()}))
        return 0
    print(f"checkpoint: {args.checkpoint}  ({model.activation}/{model.pool}/F6={model.cfg.f6}, "
          f"{model.step_count} steps)")
    print(f"dataset: {ds.name}, {len(labels)} test images   backend: {model.backend.name}")
    print(f"test accuracy: {acc:.4f}  ({int(np.trace(cm))}/{len(labels)})   mean loss: {loss:.4f}")
    print()
    print(format_confusion(cm, tuple(ds.classes)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .runs import NoRun

    try:
        return run(argv)
    except (CheckpointError, DataError, BackendUnavailable, NoRun, ValueError, OSError) as e:
        print(f"lenet_gpu.evaluate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
