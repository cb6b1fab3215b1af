"""Classify pictures of hand-written digits with a trained checkpoint.

    python -m lenet_gpu.predict [CHECKPOINT] IMAGE... [--top K] [--json] [--backend NAME]

Without a CHECKPOINT (a first argument that does not end in .npz), the latest run: the most recently written
checkpoint in runs/.

Each image (PNG, JPEG, or anything Pillow reads; any size; dark ink on light paper or light on
dark) is prepared the MNIST way by :func:`lenet_gpu.imageprep.prepare_digit` and classified. One
line per file on stdout; an unreadable or blank file gets one line on stderr and the others still
run. Exit status: 0 if every file was classified, 1 if any failed, 2 for a bad command line, a bad
checkpoint or missing packages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .backends import BACKENDS

VIZ_HINT = "pip install 'lenet_gpu[viz]'"
EXIT_OK, EXIT_FILE_FAILED, EXIT_USAGE = 0, 1, 2


def class_names(extra: dict) -> tuple[str, ...]:
    """Class names for a checkpoint's dataset (digits, or Fashion-MNIST's garment names)."""
    from .data import FASHION_MNIST_CLASSES, MNIST_CLASSES

    return FASHION_MNIST_CLASSES if extra.get("dataset") == "fashion-mnist" else MNIST_CLASSES


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lenet_gpu.predict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Classify pictures of hand-written digits with a trained LeNet-5 checkpoint.\n\n"
            "Each image (PNG, JPEG, ...; any size; dark ink on light paper or light ink on dark)\n"
            "is prepared the MNIST way: grayscale, ink made bright, cropped to the ink, scaled to\n"
            "fit 20x20 with its aspect kept, and centred by centre of mass in 28x28."
        ),
        epilog=(
            "exit status:\n"
            "  0  every image was classified\n"
            "  1  some image could not be read or was blank (one line each on stderr;\n"
            "     the other images are still classified)\n"
            "  2  bad command line, unreadable checkpoint, or missing packages\n\n"
            "examples:\n"
            "  python -m lenet_gpu.predict docs/sample_digit.png   # the latest run; a photo-like 3, shipped\n"
            "  python -m lenet_gpu.predict runs/lenet5.npz docs/sample_digit.png\n"
            "  python -m lenet_gpu.predict runs/lenet5.npz my_digit.png photo.jpg --top 3"
        ),
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", nargs="?", default=None,
        help="checkpoint file (.npz) written by python -m lenet_gpu.train (default: the latest run, the most "
        "recently written runs/*.npz)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) of one digit each")
    p.add_argument(
        "--top", type=int, default=3, metavar="K",
        help="how many of the most probable classes to show per image (1-10, default 3)",
    )
    p.add_argument(
        "--json", action="store_true",
        help="print one JSON object per image (file, prediction, label, top [{class, label, prob}])",
    )
    p.add_argument(
        "--backend", default="numpy", choices=BACKENDS,
        help="backend that runs the network (default numpy: no start-up cost for a few images)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1024, metavar="N",
        help="images prepared and classified per batch (one call of the model's inference path; default 1024)",
    )
    p.add_argument(
        "--save-prepared", metavar="DIR",
        help="also write each prepared 28x28 image as DIR/<name>.28x28.png, to see what the network sees",
    )
    return p


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"lenet_gpu.predict: error: {msg}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The command-line program; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.checkpoint is None and len(args.images) == 1 and args.images[0].lower().endswith(".npz"):
        # one argument, a checkpoint: argparse hands it to IMAGE (CHECKPOINT is optional, IMAGE is not)
        return _fail(f"no image given after the checkpoint {args.images[0]} (usage: CHECKPOINT IMAGE [IMAGE ...])")
    if args.checkpoint is not None and not args.checkpoint.lower().endswith(".npz"):
        args.images.insert(0, args.checkpoint)  # pictures only: the latest run classifies them
        args.checkpoint = None
    if not 1 <= args.top <= 10:
        return _fail(f"--top must be between 1 and 10 (got {args.top})")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1 (got {args.batch_size})")
    try:
        import PIL  # noqa: F401
    except ImportError:
        return _fail(f"reading images needs Pillow: {VIZ_HINT}")

    from .backends import BackendUnavailable
    from .imageprep import ImagePrepError, load_image, prepare_digit
    from .model import CheckpointError, LeNet5
    from .runs import NoRun, latest_checkpoint

    try:
        if args.checkpoint is None:
            args.checkpoint = str(latest_checkpoint())
        model, extra = LeNet5.load_with_extra(args.checkpoint, backend=args.backend)
    except (CheckpointError, BackendUnavailable, NoRun) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{args.checkpoint}: cannot read checkpoint: {e.strerror or e}")
    except (TypeError, ValueError) as e:  # options this version does not understand
        return _fail(f"{args.checkpoint}: checkpoint options are not understood ({e})")
    names = class_names(extra)
    save_dir = Path(args.save_prepared) if args.save_prepared else None
    if save_dir is not None:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return _fail(f"--save-prepared {save_dir}: cannot create folder: {e.strerror or e}")

    # Batches of --batch-size files: prepare each file (errors reported in order), then classify the batch with
    # one call of the model's inference path (LeNet5.logits: on cupy, pinned staging and one launch per chunk).
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        prepared: list[tuple[str, np.ndarray]] = []
        for path in args.images[start : start + args.batch_size]:
            try:
                digit = prepare_digit(load_image(path))
            except ImagePrepError as e:
                print(f"{path}: {e}", file=sys.stderr)
                failed += 1
                continue
            except MemoryError:
                print(f"{path}: image too large to process", file=sys.stderr)
                failed += 1
                continue
            prepared.append((path, digit))
            if save_dir is not None:
                _save_prepared(save_dir, path, digit)
        if prepared:
            _report(prepared, softmax(model.logits(np.stack([d for _, d in prepared]))), names, args)
    sys.stdout.flush()
    return EXIT_FILE_FAILED if failed else EXIT_OK


def _report(prepared: list[tuple[str, np.ndarray]], probs: np.ndarray, names: Sequence[str],
            args: argparse.Namespace) -> None:
    """One line (or JSON object) per classified image, in the order given."""
    for (path, _), p in zip(prepared, probs):
        order = np.argsort(-p, kind="stable")[: args.top]
        if args.json:
            record = {
                "file": path,
                "prediction": int(order[0]),
                "label": names[order[0]],
                "top": [{"class": int(k), "label": names[k], "prob": round(float(p[k]), 6)} for k in order],
            }
            print(json.dumps(record))
        else:
            tops = ", ".join(f"{names[k]} {100 * p[k]:.1f}%" for k in order)
            print(f"{path}: {names[order[0]]}  ({tops})")


def _save_prepared(folder: Path, path: str, digit: np.ndarray) -> None:
    from PIL import Image

    out = folder / f"{Path(path).stem}.28x28.png"
    try:
        Image.fromarray(digit).save(out)
    except OSError as e:
        print(f"{path}: could not write {out}: {e.strerror or e}", file=sys.stderr)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
