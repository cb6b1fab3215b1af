"""Augmentation on the device: the shift of each sample is a pure function of (seed, epoch, sample index)
(reference.augment_shift), so every backend draws the same shifts with no host work per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import reference as R


def test_shifts_are_uniform_independent_and_reproducible():
    dy, dx = R.augment_shift(7, 3, np.arange(50_000), 2)
    for d in (dy, dx):
        counts = np.bincount(d + 2, minlength=5)
        assert counts.min() > 9_500 and counts.max() < 10_500  # uniform on −2..2 (expected 10,000 each)
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.02  # the two axes are independent
    a = R.augment_shift(7, 3, np.arange(100), 2)
    np.testing.assert_array_equal(a[0], dy[:100])
    np.testing.assert_array_equal(a[1], dx[:100])


def test_seed_epoch_and_index_each_change_the_draw():
    base = np.stack(R.augment_shift(1, 1, np.arange(1000), 3))
    for seed, epoch in ((2, 1), (1, 2), (1 + 2**32, 1)):
        other = np.stack(R.augment_shift(seed, epoch, np.arange(1000), 3))
        same = (base == other).all(axis=0).mean()
        if seed == 1 + 2**32:  # only the low 32 bits of the seed count, as in an int32 state word
            assert same == 1.0
        else:
            assert same < 0.2  # 1/49 by chance


def test_known_values_pin_the_hash():
    """Values from an independent C implementation of lowbias32 and the shift formula (uint32_t
    arithmetic, compiled with gcc): every backend's kernels must reproduce these."""
    assert (R.mix32(0), R.mix32(1), R.mix32(12345), R.mix32(0xFFFFFFFF)) == (0, 0x688990C0, 0x912EFCF7, 0x6768824A)
    dy, dx = R.augment_shift(0, 0, np.arange(6), 2)
    assert (dy.tolist(), dx.tolist()) == ([-2, -1, 0, 2, 1, -2], [-2, -1, 1, 2, 1, -1])
    dy, dx = R.augment_shift(-7, 9, np.arange(3) * 1000, 4)  # a negative seed: its two's-complement bits
    assert (dy.tolist(), dx.tolist()) == ([-3, -1, 2], [0, -1, -2])


def test_each_image_moves_by_its_own_shift():
    images = np.zeros((50, 28, 28), np.uint8)
    images[:, 13, 14] = 255
    perm = np.arange(50)[::-1].copy()
    x, y = R.batch_prepare(images, np.arange(50, dtype=np.uint8) % 10, perm, 0, 50, 0.0, 1.0, seed=3, epoch=1,
                           max_shift=2)
    dy, dx = R.augment_shift(3, 1, perm, 2)
    for r in range(50):
        assert [tuple(p) for p in np.argwhere(x[r, 0] > 0)] == [(2 + 13 + dy[r], 2 + 14 + dx[r])]
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 10  # many different shifts were drawn


def test_no_ink_is_lost_and_zero_shift_is_plain_padding():
    rng = np.random.default_rng(0)
    images = np.zeros((200, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = rng.integers(0, 256, (200, 20, 20), dtype=np.uint8)  # MNIST's 20×20 box
    labels = rng.integers(0, 10, 200).astype(np.uint8)
    x, y = R.batch_prepare(images, labels, np.arange(200), 0, 200, 0.0, 1.0, seed=5, epoch=0, max_shift=4)
    np.testing.assert_allclose(x.reshape(200, -1).sum(1) * 255, images.reshape(200, -1).sum(1))
    np.testing.assert_array_equal(y, labels)
    x0, _ = R.batch_prepare(images, labels, np.arange(200), 0, 200, 0.0, 1.0, seed=5, epoch=0, max_shift=0)
    np.testing.assert_allclose(x0[:, 0, 2:30, 2:30] * 255, images)
    with pytest.raises(ValueError):
        R.augment_shift(0, 0, 1, -1)
