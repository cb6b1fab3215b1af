"""The Numba backend's fused head v2 and v3 (numba_backend/head.py: head_train_v2/_v3 and their wgrad kernels,
kernels/head.cu's algorithms) against the float64 reference, and their launch plan against cupy's.

- In this process: the launch plan (head.plan / head.launches) is cupy's fused.head_plan at LeNet-5's sizes on
  both sides of the switch (v3's rows kernel up to fused.HEAD_FILL_BLOCKS rows, v2's beyond), and the backend's
  lenet_launches takes it.
- ``sim_*``: the kernels in the CUDA simulator (tiny shapes; v3's block is 512 simulated threads), in a child
  process with NUMBA_ENABLE_CUDASIM=1 started by ``test_simulator_suite``: every network activation, max and avg
  pooling (odd and even conv maps) and the routed form (yconv=None); v2's four row counts; v3 beyond the switch
  (the constant patched down, so a tiny batch crosses it); a capped grid (block-stride loops); bits repeat.
The register / spill / float64 checks of the compiled kernels: tests/test_numba_ptx.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests import fused_helpers as F
from tests import sim_child
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim = pytest.mark.skipif(not SIM, reason="runs in test_simulator_suite's NUMBA_ENABLE_CUDASIM=1 child process")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")


def _head():
    require("numba")
    from lenet_gpu.backends.numba_backend import head

    return head


SUITE = sim_child.Child(__file__, "sim_", timeout=600)


@pytest.mark.sim
@sim_child.early(SUITE)
def test_simulator_suite():
    """Run this file's sim_* tests in a child process with the CUDA simulator on."""
    if SIM:
        pytest.skip("this is the simulator run")
    require("numba")
    print(sim_child.result(SUITE))


# ------------------------------------------------------------------------------------ the plan (this process)


@pytest.mark.skipif(SIM, reason="plain Python: the parent process")
@pytest.mark.parametrize("batch", [1, 64, 264, 265, 4096])
def test_plan_is_cupys(batch):
    """v2 and v3 launch as cupy launches head.cu's (grid, block, dynamic shared memory, rows a block), v3's rows
    kernel up to fused.HEAD_FILL_BLOCKS rows and v2's beyond (cupy's plan without v4's rows kernel, which numba does
    not have: ``tiled=False``); lenet_launches lists the same two launches."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused
    from lenet_gpu.backends.numba_backend.backend import lenet_launches

    for v in ("v2", "v3"):
        a, w = fused.head_plan(v, batch, 400, 120, 84, 10, tiled=False)
        got = head.plan(v, batch, 400, 120, 84, 10)
        assert got[0][:4] == (a.kernel, a.grid[0], a.block[0], a.shared_mem), (v, got)
        assert got[1][:4] == (w.kernel, w.grid[0], w.block[0], w.shared_mem), (v, got)
        assert got[0][4] == dict(a.defines).get("HEAD_ROWS", 1)
    assert 4 * head.v3_layout(head.LENET_GEOM)["SMEM_FLOATS"] == fused.head_v3_smem(400, 120, 84, 10)
    rows = head.plan("v3", batch, 400, 120, 84, 10)[0]
    assert rows[0] == ("head_train_v3" if batch <= fused.HEAD_FILL_BLOCKS else "head_train_v2")
    assert head.DEFAULT_VARIANTS["head_train"] == "v3" == head.VARIANTS["head_train"][-1]
    plan = lenet_launches(batch)
    heads = [p for p in plan if p[0].startswith("head_train")]
    assert heads == head.launches("v3", batch) and len(heads) == 2
    assert [p[0] for p in plan].count("head_train") == 1


# ------------------------------------------------------------------------------------------ the simulator


class _Shim(F.NumbaShim):
    """NumbaShim with the head bound as a method, at one variant (for tests/test_numba_routed's routed check)."""

    def __init__(self, variant: str, max_blocks: int | None = None) -> None:
        super().__init__(max_blocks=max_blocks)
        self.variant = variant

    def head_train(self, *args, **kwargs) -> None:
        _head().head_train(self, *args, variant=self.variant, **kwargs)


def _names(be) -> list[str]:
    return [name for name, _ in be.launch_log]


@sim
@pytest.mark.parametrize("act,mode,shape", [("tanh", "avg", (1, 3, 4, 6, 4, 6, 3))])
def test_sim_head_train_v3(act, mode, shape):
    """head_train_v3 against reference.head_train (every output, the stats row, the state untouched)."""
    head = _head()
    be = F.NumbaShim()
    be.launch_log = []
    F.check_head_train(be, head.head_train, "v3", *shape, act, mode, seed=len(act) + shape[0])
    assert _names(be) == ["head_train_v3", "head_train_wgrad_v3"]


@sim
def test_sim_head_train_v3_routed():
    """yconv=None (the routed step): dz_conv at x's shape = dx·act'(x) (tests/test_numba_routed's check)."""
    from tests.test_numba_routed import check_head_train_routed

    be = _Shim("v3")
    be.launch_log = []
    check_head_train_routed(be, 1, 2, 4, 6, 5, 4, 3, "sigmoid", seed=5)
    assert _names(be) == ["head_train_v3", "head_train_wgrad_v3"]


@sim
def test_sim_head_train_v2_two_rows_routed(monkeypatch):
    """head_train_v2 directly at a tiny batch: fused.HEAD_FILL_BLOCKS patched to 2, so a batch of 3 takes 2 rows
    a block (the last tile partial; v2's 1-row body is v3's beyond-the-switch kernel on a GPU), routed form."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused
    from tests.test_numba_routed import check_head_train_routed

    monkeypatch.setattr(fused, "HEAD_FILL_BLOCKS", 2)
    assert head.plan("v2", 3, 12, 5, 4, 3)[0][4] == 2
    be = _Shim("v2")
    be.launch_log = []
    check_head_train_routed(be, 3, 3, 4, 4, 5, 4, 3, "lecun_tanh", seed=6)
    assert _names(be) == ["head_train_v2", "head_train_wgrad_v2"]


@sim
def test_sim_head_train_v3_capped_grid_and_repeats():
    """relu, max pooling of an odd conv map (a trailing row of zeros): one block takes every row and every wgrad
    tile (max_blocks=1: the block-stride loops); an uncapped launch repeats its outputs bit for bit (the same sums
    in the same order, whatever block runs them)."""
    head = _head()
    shape = (2, 2, 5, 4, 5, 3, 4)
    a = F.check_head_train(F.NumbaShim(max_blocks=1), head.head_train, "v3", *shape, "relu", "max", seed=4)
    b = F.check_head_train(F.NumbaShim(), head.head_train, "v3", *shape, "relu", "max", seed=4)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
