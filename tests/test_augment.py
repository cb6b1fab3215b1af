"""Random-shift augmentation moves ink exactly and loses none of a centred digit."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu.augment import random_shifts


def test_each_image_moves_by_its_own_shift():
    images = np.zeros((50, 28, 28), np.uint8)
    images[:, 13, 14] = 255
    out = random_shifts(images, np.random.default_rng(3), 2)
    d = np.random.default_rng(3).integers(-2, 3, size=(2, 50))  # the same draws
    for i in range(50):
        assert [tuple(p) for p in np.argwhere(out[i])] == [(13 + d[0, i], 14 + d[1, i])]
    assert len({(a, b) for a, b in d.T}) > 10  # many different shifts were drawn


def test_no_ink_is_lost_from_a_centred_digit_and_input_is_untouched():
    rng = np.random.default_rng(0)
    images = np.zeros((200, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = rng.integers(0, 256, (200, 20, 20), dtype=np.uint8)  # MNIST's 20×20 box
    before = images.copy()
    out = random_shifts(images, rng, 2)
    np.testing.assert_array_equal(out.reshape(200, -1).sum(1), images.reshape(200, -1).sum(1))
    np.testing.assert_array_equal(images, before)
    assert out.dtype == np.uint8 and out.flags.c_contiguous


def test_zero_shift_is_a_copy_and_negative_is_refused():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    out = random_shifts(images, np.random.default_rng(0), 0)
    np.testing.assert_array_equal(out, images)
    assert out is not images
    with pytest.raises(ValueError):
        random_shifts(images, np.random.default_rng(0), -1)


def test_same_seed_same_images():
    images = np.random.default_rng(1).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    a = random_shifts(images, np.random.default_rng([0, 5, 1]), 2)
    b = random_shifts(images, np.random.default_rng([0, 5, 1]), 2)
    np.testing.assert_array_equal(a, b)
