"""Data augmentation: random translations of whole digits, a few pixels each way.

MNIST digits sit in a 20×20 box centred in 28×28, so a shift of up to 2 pixels in x and y moves
ink without cutting it off (pixels shifted in from the edge are 0, the background). The training
program draws fresh shifts every epoch from (seed, epoch), so a resumed run sees the same images.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def random_shifts(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """A copy of ``images`` (N,H,W) uint8 with each image moved by (dy, dx), both uniform in
    [-max_shift, max_shift]; vacated pixels are 0."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0 (got {max_shift})")
    if max_shift == 0:
        return images.copy()
    n, h, w = images.shape
    r = max_shift
    d = rng.integers(-r, r + 1, size=(2, n))
    padded = np.pad(images, ((0, 0), (r, r), (r, r)))
    # out[y, x] = image[y − dy, x − dx] = padded[y + r − dy, x + r − dx]: the window at (r − dy, r − dx)
    windows = sliding_window_view(padded, (h, w), axis=(1, 2))  # (N, 2r+1, 2r+1, H, W), a view
    return np.ascontiguousarray(windows[np.arange(n), r - d[0], r - d[1]])
