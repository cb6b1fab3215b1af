"""The activation × pool-mode × variant matrix: every op that applies an activation or a pool, every variant a
backend lists, every activation and pool mode, at the op-parity helper's cheapest shapes (lenet_gpu/selftest/
checks.py, profile "tiny", the first shape: tiers 0 and 1), against the float64 reference.

Generated from a backend's own variant table (``be.variants``), so a new kernel version, or a new optional op,
joins without a new test; an op the parity helper has no builder for fails (add one to checks.py)."""

from __future__ import annotations

from typing import Any

from lenet_gpu.reference import ACTIVATIONS, POOL_MODES
from lenet_gpu.selftest.checks import KNOWN_OPS, input_sets, run_case

#: the network's activations (identity is the output layer only: the fused ops do not take it)
MODEL_ACTS = tuple(a for a in ACTIVATIONS if a != "identity")


def matrix_sets(op: str) -> list:
    """The cheapest input sets of ``op`` over every activation and pool mode it takes."""
    assert op in KNOWN_OPS, f"{op}: lenet_gpu/selftest/checks.py has no parity builder for it (add one)"
    return input_sets([op], "tiny", max_tier=1)


def matrix_ops(variants: dict[str, tuple[str, ...]]) -> list[str]:
    """The ops of a variant table that take an activation or a pool mode (ops without a builder included:
    their test then fails, naming what is missing)."""
    return sorted(op for op in variants if op not in KNOWN_OPS
                  or any(s.act is not None or s.pool is not None for s in input_sets([op], "tiny", max_tier=1)))


def check_matrix(be: Any, op: str, skip: tuple[str, ...] = ()) -> int:
    """Run every (variant, act, pool) cell of ``op`` on ``be`` (but the variants in ``skip``, which must then have
    an act × pool test of their own); returns the number of cases run. Fails on the first case out of tolerance
    and if the cells do not cover every activation × pool mode."""
    sets = matrix_sets(op)
    acts = {s.act for s in sets}
    modes = {s.pool for s in sets}
    cells = {(s.act, s.pool) for s in sets}
    if acts != {None}:
        assert acts >= set(MODEL_ACTS), (op, acts)
    if modes != {None}:
        assert modes == set(POOL_MODES), (op, modes)
    assert cells == {(a, m) for a in acts for m in modes}, (op, sorted(cells, key=str))
    n = 0
    for v in be.variants[op]:
        if v in skip:
            continue
        for s in sets:
            run_case(be, op, v, s)
            n += 1
    return n
