"""lenet_gpu.schedule: the learning-rate schedules at the points that define them."""

from __future__ import annotations

import math

import pytest

from lenet_gpu.schedule import SCHEDULES, lr_at


def test_names() -> None:
    assert SCHEDULES == ("onecycle", "cosine", "constant", "hold")


def test_constant_and_single_step() -> None:
    assert [lr_at(s, 100, 0.1, "constant") for s in (0, 50, 99)] == [0.1, 0.1, 0.1]
    for name in SCHEDULES:
        assert lr_at(0, 1, 0.1, name) == 0.1  # one step: the peak, whatever the shape


def test_cosine() -> None:
    assert lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(25, 100, 0.1, "cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(99, 100, 0.1, "cosine") < 1e-4


def test_onecycle_shape() -> None:
    peak, total = 2e-3, 1000
    warm = 300  # 30 % of the steps
    lrs = [lr_at(s, total, peak, "onecycle") for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 25)
    assert lrs[warm // 2] == pytest.approx((peak / 25 + peak) / 2)  # half-way up the cosine
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == warm
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1 : warm + 1]))  # rises to the peak
    assert all(a > b for a, b in zip(lrs[warm:-1], lrs[warm + 1 :]))  # then only falls
    assert peak / 25 / 1e4 < lrs[-1] < 1e-5 * peak  # the last step is just above OneCycleLR's floor
    assert lr_at(total, total, peak, "onecycle") == pytest.approx(peak / 25 / 1e4)


def test_onecycle_short_run() -> None:
    # 2 steps: int(0.6) = 0 warm-up steps is raised to 1
    assert lr_at(0, 2, 1.0, "onecycle") == pytest.approx(1 / 25)
    assert lr_at(1, 2, 1.0, "onecycle") == pytest.approx(1.0)


def test_hold_shape() -> None:
    peak, total = 1e-3, 1000
    lrs = [lr_at(s, total, peak, "hold") for s in range(total)]
    assert lrs[:700] == [peak] * 700  # held at the peak for 70 % of the steps
    assert all(a > b for a, b in zip(lrs[700:-1], lrs[701:]))  # then annealed
    assert lrs[850] == pytest.approx(peak / 100 + (peak - peak / 100) / 2)  # half-way down the cosine
    assert lr_at(total, total, peak, "hold") == pytest.approx(peak / 100)


def test_unknown() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(3, 10, 0.1, "linear")
