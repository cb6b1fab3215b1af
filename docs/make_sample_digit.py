"""Make docs/sample_digit.png: a real MNIST test digit (mnist-sample test image #92, a 3) drawn the way
a photo of handwriting looks: scaled up 8x, dark ink on slightly uneven light paper, off centre.

    python docs/make_sample_digit.py        # rewrites docs/sample_digit.png (deterministic)

The README's predict example uses it: ``python -m lenet_gpu.predict runs/lenet5.npz docs/sample_digit.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lenet_gpu.data import load_dataset

INDEX, SCALE, SIZE = 92, 8, 288
PAPER, INK = np.array([236.0, 231.0, 219.0]), np.array([34.0, 38.0, 62.0])  # warm paper, blue-black pen


def make() -> Image.Image:
    digit = load_dataset("mnist-sample").test_images[INDEX]
    big = np.asarray(Image.fromarray(digit).resize((28 * SCALE, 28 * SCALE), Image.Resampling.BICUBIC), np.float64)
    ink = np.zeros((SIZE, SIZE))
    top, left = 22, 40  # not centred: the predict program finds the ink
    ink[top : top + big.shape[0], left : left + big.shape[1]] = np.clip(big / 255.0, 0.0, 1.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    light = 1.0 - 0.10 * xx - 0.06 * yy  # light falling off towards one corner, as in a phone photo
    rgb = (PAPER * light[..., None]) * (1 - ink[..., None]) + INK * ink[..., None]
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "sample_digit.png"
    make().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
