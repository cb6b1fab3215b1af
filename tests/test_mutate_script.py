"""scripts/mutate.py stays applicable: every mutation's pattern is still in the file it breaks, exactly once
(a refactor that moves the code must move the mutation with it), and its test selection names files that
exist. Running the mutations themselves is on demand (``python scripts/mutate.py``), not part of the suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutations() -> list:
    spec = importlib.util.spec_from_file_location("lenet_gpu_mutate_script", ROOT / "scripts" / "mutate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lenet_gpu_mutate_script"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return list(mod.MUTATIONS)


def test_every_mutation_applies_to_the_current_source() -> None:
    muts = _mutations()
    assert len(muts) >= 5
    for m in muts:
        src = (ROOT / m.path).read_text()
        assert src.count(m.old) == 1, f"{m.name}: pattern found {src.count(m.old)} times in {m.path}"
        assert m.new != m.old
        for arg in m.pytest_args:
            if arg.startswith("tests/"):
                assert (ROOT / arg.split("::")[0]).exists(), f"{m.name}: {arg} does not exist"
