"""The benchmark's cases (lenet_gpu.perf): every op case calls the backends' current signatures and passes its
validation; a wrong output fails it; the end-to-end checks compare each backend with its own reference.

These are the checks the old bench/test_*.py made (never collected: testpaths = ["tests"]), at tiny sizes
on the numpy backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu.backends.base import OPS, OPTIONAL_OPS
from lenet_gpu.backends.numpy_backend import NumpyBackend
from lenet_gpu.perf import model as e2e
from lenet_gpu.perf import ops as opsmod
from lenet_gpu.spec import NetConfig

CFG = NetConfig()


def _cases(be: NumpyBackend, batch: int) -> list[tuple[str, str, str, int | None]]:
    out = []
    for op in opsmod.all_ops(be):
        for site in opsmod.sites(op, CFG):
            for variant in be.variants[op]:
                out.append((op, site, variant, None if op in opsmod.PER_STEP_OPS else batch))
    return out


def test_every_protocol_op_has_a_case() -> None:
    """Every op of the protocol has a benchmark case; optional fused ops without one are listed here."""
    missing = [op for op in OPS if not opsmod.sites(op, CFG)]
    assert missing == []
    without_case = [op for op in OPTIONAL_OPS if not opsmod.sites(op, CFG)]
    assert without_case == ["head_train"]


@pytest.mark.parametrize("batch", [1, 3])
def test_every_numpy_op_case_runs_and_validates(batch: int) -> None:
    be = NumpyBackend()
    cases = _cases(be, batch)
    assert {c[0] for c in cases} >= set(OPS)
    for op, site, variant, b in cases:
        case = opsmod.build_case(be, op, site, b, variant, CFG)
        case.validate()  # raises on a stale signature (TypeError) or a wrong answer (AssertionError)
        case.launch()
        assert case.cost.flops > 0 and case.cost.bytes > 0


def test_validation_catches_a_wrong_output() -> None:
    """A case whose op writes a wrong answer fails its validation (the check can fail)."""
    be = NumpyBackend()
    spec = opsmod.make_spec("dense_fwd", "C5", 2, CFG)
    call = spec.call

    def wrong(b, a, v):  # noqa: ANN001, ANN202
        call(b, a, v)
        a["y"][0, 0] += 1e-2

    spec.call = wrong
    case = opsmod.build_case(be, "dense_fwd", "C5", 2, "v1", CFG, spec)
    with pytest.raises(AssertionError, match="dense_fwd C5"):
        case.validate()


def _data() -> e2e.BenchData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 16, dtype=np.uint8)
    return e2e.BenchData.from_dataset(images, labels, 16)


def test_e2e_checks_use_each_backends_own_reference() -> None:
    """Two nets whose parameters have diverged (one trained more, as timing does) each pass their checks:
    the reference is computed from each one's own parameters, never shared (the old cache mixed them up)."""
    data = _data()
    a, b = e2e.OurNet(NumpyBackend(), CFG, data), e2e.OurNet(NumpyBackend(), CFG, data)
    a.check_grads(4)
    a.train_steps(4, 5)  # a's parameters move on
    b.train_steps(4, 1)
    errs = [a.check_grads(8), b.check_grads(8)]
    assert all(e < e2e.GRAD_TOL for e in errs)
    err, want = a.check_forward(3)
    assert err < e2e.FORWARD_TOL and want.shape == (3, 10)
    # a stale reference (b's parameters) would fail a's check: the check can fail
    got = a.backend.to_host(a.model.workspace(3).logits)
    p = {k: v.astype(np.float64) for k, v in b.model.param_dict().items()}
    other = e2e.reference_forward(p, data.normalized(0, 3), CFG)["logits"]
    assert e2e._rel_err(got, other) > e2e.FORWARD_TOL


def test_ratio_marks_wide_spreads_unreliable() -> None:
    steady = [1.0, 1.01, 0.99, 1.0, 1.0]
    assert e2e.ratio_stats(steady, [2.0, 2.02, 1.98, 2.0, 2.0])["reliable"] is True
    q = e2e.ratio_stats(steady, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert q["reliable"] is False and q["theirs_spread"] > 0.25


def test_the_library_imports_no_script_and_no_test() -> None:
    """lenet_gpu (the perf core included) and bench/ import nothing from scripts/ or tests/."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    bad = []
    for path in [*root.joinpath("lenet_gpu").rglob("*.py"), *root.joinpath("bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            names += [a.value for a in ast.walk(node) if isinstance(node, ast.Call) and isinstance(a, ast.Constant)
                      and isinstance(a.value, str) and a.value.startswith(("scripts.", "tests."))]
            bad += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in ("scripts", "tests")]
    assert bad == []


@pytest.mark.parametrize(("module", "cls"), [("lenet_gpu.backends.numpy_backend", "NumpyBackend"),
                                             ("lenet_gpu.backends.cpu_backend", "CpuBackend"),
                                             ("lenet_gpu.backends.numba_backend", "NumbaBackend"),
                                             ("lenet_gpu.backends.cupy_backend", "CupyBackend")])
def test_every_op_case_binds_to_each_backends_signature(module: str, cls: str) -> None:
    """Each case's call binds to the method of every backend class (no instance, nothing compiled): the
    benchmark cannot drift from the signatures again (it called the optimizers and the loss with the
    arguments of before the device step state)."""
    import importlib
    import inspect

    klass = getattr(importlib.import_module(module), cls)

    class Binder:
        def __getattr__(self, op: str):  # noqa: ANN204
            sig = inspect.signature(getattr(klass, op))
            return lambda *a, **k: sig.bind(None, *a, **k)

    checked = []
    for op in (*OPS, *OPTIONAL_OPS):
        if not hasattr(klass, op):
            continue
        for site in opsmod.sites(op, CFG):
            spec = opsmod.make_spec(op, site, 2, CFG)
            arrays = {**spec.inputs, **{k: np.empty(s, d) for k, (s, d) in spec.outputs.items()}}
            spec.call(Binder(), arrays, "v1")  # raises TypeError on a stale signature
            checked.append(op)
    assert set(OPS) <= set(checked)
