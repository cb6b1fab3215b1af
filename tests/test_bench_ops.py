"""The benchmark's cases (lenet_gpu.perf): every op case calls the backends' current signatures and passes its
validation; a wrong output fails it; the end-to-end checks compare each backend with its own reference.

These are the checks the old bench/test_*.py made (never collected: testpaths = ["tests"]), at tiny sizes
on the numpy backend.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from lenet_gpu.backends.base import OPS, OPTIONAL_OPS, ROUTED_OPS, STEP_OPS
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


def test_every_op_has_a_case() -> None:
    """Every op of the protocol, the optional fused ops, the routed ops and the four-kernel step's ops has a
    benchmark case at LeNet-5's shapes (the default step's kernels are timed per op too); with average pooling
    the max-only ops have none, and the head keeps its dense form only."""
    every = (*OPS, *OPTIONAL_OPS, *ROUTED_OPS, *STEP_OPS)
    assert [op for op in every if not opsmod.sites(op, CFG)] == []
    avg = NetConfig(pool="avg")
    assert [op for op in every if not opsmod.sites(op, avg)] == list(opsmod.MAX_ONLY_OPS)
    assert set(opsmod.MAX_ONLY_OPS) == {*ROUTED_OPS, *STEP_OPS}
    assert opsmod.sites("head_train", CFG) == ["C5..loss..dS4", "C5..loss..gS4 routed"]
    assert opsmod.sites("head_train", avg) == ["C5..loss..dS4"]


def test_the_fused_costs_count_the_routed_work() -> None:
    """The routed ops and step_bwd count the multiply-adds of the routed windows only (docs/routed_backward.md:
    149,400 an image), and the costs that depend on the partial rows grow with them."""
    assert opsmod.op_cost("conv2d_bwd_weight_routed", "C3", 1, CFG).flops == 2 * 60_000 + 400
    assert opsmod.op_cost("conv2d_bwd_weight_routed", "C1", 1, CFG).flops == 2 * 29_400 + 1176
    assert opsmod.op_cost("conv2d_bwd_data_routed", "C3->S2", 1, CFG).flops == 2 * 60_000 + 1176  # relu' 1 FLOP
    assert opsmod.op_cost("step_bwd", "S4..C3..C1", 2, CFG).flops == 2 * (2 * 149_400 + 1176 + 400 + 1176)
    one, eight = (opsmod.op_cost("step_bwd", "S4..C3..C1", 64, CFG, g) for g in (1, 8))
    assert eight.bytes - one.bytes == 7 * 2624 * 4 and eight.flops == one.flops
    a1, a8 = (opsmod.op_cost("step_adam", "gpart+params", 64, CFG, g) for g in (1, 8))
    assert a8.flops - a1.flops == 7 * 2624 and a8.bytes - a1.bytes == 7 * 2624 * 4
    # the routed head writes S4's gradient (400 a row); the dense one reads C3's output and writes its gradient
    routed = opsmod.op_cost("head_train", "C5..loss..gS4 routed", 10, CFG)
    dense = opsmod.op_cost("head_train", "C5..loss..dS4", 10, CFG)
    assert dense.bytes - routed.bytes == 10 * (4 * 1600 + 400 + 4 * 1600 - 4 * 400)


def test_the_self_tests_lenet_sets_cover_every_op() -> None:
    """The self-test's per-op timings (and the fused benchmark cases) have an input set for every op it knows at
    max pooling, with step_bwd's partial rows as asked; under avg the max-only ops have none."""
    from lenet_gpu.selftest.checks import KNOWN_OPS, lenet_sets

    assert [op for op in KNOWN_OPS if not lenet_sets(op, 3, 2)] == []
    assert [op for op in KNOWN_OPS if not lenet_sets(op, 3, 2, mode="avg")] == list(opsmod.MAX_ONLY_OPS)
    (_, iset), = lenet_sets("step_bwd", 3, 2)
    assert [a.value.shape for a in iset.spec().args if a.name == "gpart"] == [(2, 2624)]
    (_, iset), = lenet_sets("dense_fwd", 3, f6=60)[1:2]
    assert [a.value.shape for a in iset.spec().args if a.name == "w"] == [(60, 120)]


class Grouped(NumpyBackend):
    """The numpy backend with step_bwd's partials in ``groups`` rows (as a GPU backend plans them)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def step_groups(self, batch: int) -> int:
        return self.groups


@pytest.mark.parametrize("op", ["step_bwd", "step_adam", "step_sgd"])
def test_the_step_cases_take_the_backends_partial_rows(op: str) -> None:
    """step_bwd writes, and step_adam / step_sgd add, as many partial rows as the backend's step_groups plans."""
    be = Grouped(5)
    assert opsmod.op_groups(be, op, 7) == 5 and opsmod.op_groups(NumpyBackend(), op, 7) == 1
    assert opsmod.op_groups(be, "head_train", 7) == 1
    case = opsmod.build_case(be, op, "gpart+params" if op != "step_bwd" else "S4..C3..C1", 7, "v1", CFG)
    case.validate()
    assert case.cost == opsmod.op_cost(op, case.site, 7, CFG, 5)
    if op == "step_bwd":
        spec = opsmod.make_spec(op, case.site, 7, CFG, 5)
        assert spec.outputs["gpart"][0] == (5, 2624)


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


@pytest.mark.parametrize(("op", "site", "out"), [("step_bwd", "S4..C3..C1", "gpart"),
                                                 ("head_train", "C5..loss..gS4 routed", "dz_conv"),
                                                 ("step_fwd", "input..S4", "m3"),
                                                 ("step_adam", "gpart+params", "state"),
                                                 ("conv2d_bwd_data_routed", "C3->S2", "gz_below")])
def test_validation_of_the_fused_cases_catches_a_wrong_output(op: str, site: str, out: str) -> None:
    """A fused case validates through the self-test's comparison: one wrong element of one output fails it."""
    be = NumpyBackend()
    spec = opsmod.make_spec(op, site, 3, CFG)
    opsmod.build_case(be, op, site, 3, "v1", CFG, spec).validate()  # the right op passes
    call = spec.call

    def wrong(b, a, v):  # noqa: ANN001, ANN202
        call(b, a, v)
        flat = a[out].reshape(-1)
        flat[-1] = flat[-1] + (1 if flat.dtype.kind in "iu" else 1e-2)

    spec.call = wrong
    with pytest.raises(AssertionError, match=re.escape(f"{op} {site}")):
        opsmod.build_case(be, op, site, 3, "v1", CFG, spec).validate()


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

            def bind(*a, **k):  # noqa: ANN002, ANN003, ANN202
                return sig.bind(None, *a, **k)

            bind.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
            return bind

    checked = []
    for op in (*OPS, *OPTIONAL_OPS, *ROUTED_OPS, *STEP_OPS):
        if not hasattr(klass, op):
            continue
        for site in opsmod.sites(op, CFG):
            spec = opsmod.make_spec(op, site, 2, CFG)
            arrays = {**spec.inputs, **{k: np.empty(s, d) for k, (s, d) in spec.outputs.items()}}
            spec.call(Binder(), arrays, "v1")  # raises TypeError on a stale signature
            checked.append(op)
    assert set(OPS) <= set(checked)
