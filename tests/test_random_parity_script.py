"""scripts/random_parity.py (the random-shape sweep of every op × variant against float64) still runs, draws the same
cases from the same seed, and fails, with the case named, on a wrong op."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.backends.numpy_backend import NumpyBackend
from lenet_gpu.selftest.checks import KNOWN_OPS

ROOT = Path(__file__).resolve().parents[1]


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("lenet_gpu_random_parity", ROOT / "scripts" / "random_parity.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lenet_gpu_random_parity"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_known_op_has_a_random_draw() -> None:
    draw = _script().Draw(0, small=True)
    assert [op for op in KNOWN_OPS if draw.spec(op) is None] == []


def test_a_round_on_numpy_passes_and_repeats_from_its_seed() -> None:
    mod = _script()
    lines: list[str] = []
    be = NumpyBackend()
    cases, failures = mod.run(be, 3, 1, None, True, lines.append)
    assert failures == 0 and cases == sum(len(v) for v in be.variants.values()), lines  # every op, every variant
    a, b = mod.Draw(5, small=False), mod.Draw(5, small=False)
    assert [a.spec(op)[1] for op in KNOWN_OPS] == [b.spec(op)[1] for op in KNOWN_OPS]


def test_a_wrong_op_fails_with_its_case_named(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _script()
    be = NumpyBackend()
    real = be.dense_fwd

    def wrong(x, w, b, y, act, variant=None):  # noqa: ANN001, ANN202
        real(x, w, b, y, act, variant=variant)
        y[...] = np.asarray(y) + 1e-2

    monkeypatch.setattr(be, "dense_fwd", wrong)
    lines: list[str] = []
    cases, failures = mod.run(be, 1, 2, ["dense_fwd", "softmax_xent"], True, lines.append)
    assert cases == 4 and failures == 2
    assert sum(line.startswith("FAIL dense_fwd_v1 (") for line in lines) == 2


def test_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _script()
    assert mod.main(["--backend", "numpy", "--rounds", "1", "--ops", "pool2x2_fwd,dense_bwd", "--small"]) == 0
    assert "cases on numpy (seed 0): 0 failed" in capsys.readouterr().out
    assert mod.main(["--backend", "numpy", "--ops", "no_such_op"]) == 2
    assert mod.main(["--backend", "no-such-backend"]) == 2
    with pytest.raises(SystemExit):
        mod.main(["--help"])
