"""Make docs/walkthrough.png, the README's picture of one digit going through LeNet-5.

    python scripts/make_walkthrough_figure.py                   # train a quick model, then draw
    python scripts/make_walkthrough_figure.py --checkpoint runs/lenet5.npz --digit 3

Without ``--checkpoint`` it trains LeNet-5 from seed 0 on the bundled mnist-sample (4,000 training
digits; the numpy backend by default, so it runs anywhere in about half a minute) and draws the
first test image of ``--digit`` with :func:`lenet_gpu.visualize.render_walkthrough`, the same code
as ``python -m lenet_gpu.visualize CHECKPOINT walkthrough``. The output is deterministic for a given
backend, seed and step count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_BYTES = 300 * 1024


def train_quick_model(backend: str, epochs: int, batch: int, seed: int):  # -> (LeNet5, Dataset)
    from lenet_gpu import LeNet5, load_dataset

    ds = load_dataset("mnist-sample")
    model = LeNet5(backend=backend, seed=seed, lr=2e-3)
    rng = np.random.default_rng(seed)
    n = len(ds.train_labels)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = rng.permutation(n)
        losses = [
            model.train_step(ds.train_images[perm[s : s + batch]], ds.train_labels[perm[s : s + batch]])
            for s in range(0, n - batch + 1, batch)
        ]
        acc = float((model.predict(ds.test_images) == ds.test_labels).mean())
        print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, test accuracy {100 * acc:.1f}% "
              f"({time.perf_counter() - t0:.0f}s)")
    return model, ds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="draw this checkpoint instead of training a quick model")
    p.add_argument("--out", default=str(ROOT / "docs" / "walkthrough.png"),
                   help="where to write the PNG (default docs/walkthrough.png)")
    p.add_argument("--digit", type=int, default=7, help="draw the first test image of this class (default 7)")
    p.add_argument("--backend", default="numpy", help="backend for training and drawing (default numpy)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the quick model (default 2)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the quick model (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the quick model (default 0)")
    p.add_argument("--dpi", type=int, default=100, help="resolution (default 100: a 1600x490 PNG)")
    p.add_argument("--save-checkpoint", metavar="PATH", help="also save the quick model here")
    args = p.parse_args(argv)

    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("this script needs matplotlib and Pillow: pip install 'lenet_gpu[viz]'", file=sys.stderr)
        return 2
    from lenet_gpu import LeNet5, load_dataset
    from lenet_gpu.model import CheckpointError
    from lenet_gpu.visualize import render_walkthrough, save_figure

    if args.checkpoint:
        try:
            model, extra = LeNet5.load_with_extra(args.checkpoint, backend=args.backend)
        except (CheckpointError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ds = load_dataset(extra.get("dataset") or "mnist-sample", data_dir=extra.get("data_dir"))
        source = f"{Path(args.checkpoint).name}"
    else:
        model, ds = train_quick_model(args.backend, args.epochs, args.batch, args.seed)
        source = f"quick model: {args.epochs} epochs on {ds.name}, {args.backend} backend, seed {args.seed}"
        if args.save_checkpoint:
            model.save(args.save_checkpoint, extra={"dataset": ds.name, "data_dir": None, "epoch": args.epochs})
    hits = np.flatnonzero(ds.test_labels == args.digit)
    if not hits.size:
        print(f"error: no test image of class {args.digit} in {ds.name}", file=sys.stderr)
        return 2
    index = int(hits[0])
    fig = render_walkthrough(model, ds.test_images[index], label=int(ds.test_labels[index]),
                             classes=ds.classes, caption=f"{ds.name} test image #{index} · {source}",
                             dpi=args.dpi)
    out = save_figure(fig, args.out)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1024:.0f} KB)")
    if size > MAX_BYTES:
        print(f"warning: {out} is over {MAX_BYTES // 1024} KB; try a lower --dpi", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
