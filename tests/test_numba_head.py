"""The Numba backend's fused head v2, v3 and v4 (numba_backend/head.py: head_train_v2/_v3/_v4 and the wgrad
kernels, kernels/head.cu's algorithms) against the float64 reference, and their launch plan against cupy's.

- In this process: the launch plan (head.plan / head.launches) is cupy's default fused.head_plan (``tiled=True``)
  at LeNet-5's sizes on every side of its switches (v3's rows kernel up to fused.HEAD_FILL_BLOCKS rows, v2's
  beyond, v4's from batch 1,049 at 8, 16 and 32 rows a block; v4 by name at every batch), and the backend's
  lenet_launches takes it; v4's shared-memory layout is fused.head_v4_smem's; head_train_v4 compiled (compile_ptx
  + ptxas, sm_80 and sm_90) at 8, 16 and 32 rows under its launch bounds: no spills, stack or float64, no integer
  division, ≤ 128 registers, its static shared memory as the plan's.
- ``sim_*``: the kernels in the CUDA simulator (tiny shapes; v3's block is 512 simulated threads, v4's 8 a row), in
  a child process with NUMBA_ENABLE_CUDASIM=1 started by ``test_simulator_suite``: every network activation, max
  and avg pooling (odd and even conv maps) and the routed form (yconv=None); v2's four row counts; v3 beyond the
  switch (the constant patched down, so a tiny batch crosses it); a capped grid (block-stride loops); bits repeat.
  v4: the routed form (relu, sigmoid), max and avg with yconv, odd yconv (a trailing row and column), partial last
  blocks, the 16-row body (fused.HEAD4_FILL_BLOCKS patched down), several K chunks and column passes, the default
  plan taking v4 (both switches patched down), a capped grid with the same bits.
The register / spill / float64 checks of the other compiled kernels: tests/test_numba_ptx.py,
tests/test_numba_compile.py (which covers v4's three kernels too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests import fused_helpers as F
from tests import sim_child
from tests.conftest import numba_compile_report, require

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
def test_plan_once_per_shape_and_fill_target(monkeypatch):
    """head.plan asks cupy's head_plan once per call shape, and again when a fill target changes."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused

    calls = []
    real = fused.head_plan

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(fused, "head_plan", counting)
    monkeypatch.setattr(head, "_PLANS", {})
    first = head.plan("v3", 77, 400, 120, 84, 10)
    n = len(calls)
    assert n >= 1 and head.plan("v3", 77, 400, 120, 84, 10) == first and len(calls) == n  # (head_plan may recurse)
    head.plan("v3", 78, 400, 120, 84, 10)
    assert len(calls) > n
    n = len(calls)
    monkeypatch.setattr(fused, "HEAD_FILL_BLOCKS", 8)  # 77 rows now take v2's rows kernel
    assert head.plan("v3", 77, 400, 120, 84, 10)[0][0] == "head_train_v2" != first[0][0] and len(calls) > n


@pytest.mark.skipif(SIM, reason="plain Python: the parent process")
@pytest.mark.parametrize("batch", [1, 64, 264, 265, 1048, 1049, 2097, 4096, 4193])
def test_plan_is_cupys(batch):
    """v2, v3 and v4 launch as cupy launches head.cu's (grid, block, dynamic shared memory, rows a block): cupy's
    default plan (``tiled=True``): v3's rows kernel up to fused.HEAD_FILL_BLOCKS rows, v2's beyond, v4's once its
    8-row blocks fill the SMs (batch ≥ 1,049; 8, 16, 32 rows a block by the batch); v4 by name at every batch;
    lenet_launches lists the same two launches."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused
    from lenet_gpu.backends.numba_backend.backend import lenet_launches

    for v in ("v2", "v3", "v4"):
        a, w = fused.head_plan(v, batch, 400, 120, 84, 10)
        got = head.plan(v, batch, 400, 120, 84, 10)
        assert got[0][:4] == (a.kernel, a.grid[0], a.block[0], a.shared_mem), (v, got)
        assert got[1][:4] == (w.kernel, w.grid[0], w.block[0], w.shared_mem), (v, got)
        d = dict(a.defines)
        assert got[0][4] == (d["HEAD4_ROWS"] if a.kernel == "head_train_v4" else d.get("HEAD_ROWS", 1)), (v, got)
    assert 4 * head.v3_layout(head.LENET_GEOM)["SMEM_FLOATS"] == fused.head_v3_smem(400, 120, 84, 10)
    rows = head.plan("v3", batch, 400, 120, 84, 10)[0]
    want = ("head_train_v3" if batch <= fused.HEAD_FILL_BLOCKS else "head_train_v4" if batch >= 1049
            else "head_train_v2")
    assert rows[0] == want, rows
    if want == "head_train_v4":
        assert rows[2:] == (8 * fused.head4_rows(batch), 0, fused.head4_rows(batch)), rows
    v4 = head.plan("v4", batch, 400, 120, 84, 10)
    assert v4[0][0] == "head_train_v4" and v4[1][0] == "head_train_wgrad_v4", v4
    assert head.DEFAULT_VARIANTS["head_train"] == "v3" and head.VARIANTS["head_train"] == ("v1", "v2", "v3", "v4")
    from lenet_gpu.backends.numba_backend.backend import FUSED_DEFAULTS

    assert FUSED_DEFAULTS["head_train"] == "v3"  # the backend's default is the module's, not its last variant
    assert set(head.VARIANTS["head_train"]) == set(fused.VARIANTS["head_train"])
    plan = lenet_launches(batch)
    heads = [p for p in plan if p[0].startswith("head_train")]
    assert heads == head.launches("v3", batch) and len(heads) == 2
    assert [p[0] for p in plan].count("head_train") == 1


@pytest.mark.skipif(SIM, reason="plain Python: the parent process")
def test_v4_layout_and_constants_are_head_cus():
    """v4's shared-memory layout is head.cu's head4 (fused.head_v4_smem, what the plan checks against 48 KiB) for
    LeNet-5 and odd widths, at every rows choice; the chunk and tile constants and the launch bounds are head.cu's."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused

    assert head.HEAD4_KC == fused.HEAD4_KC and set(head.HEAD4_ROWS_CHOICES) == set(fused.HEAD4_ROWS_CHOICES)
    for geom in (head.LENET_GEOM, (2, 2, 3, 5, 7, 5, 4, 3), (4, 8, 8, 16, 16, 230, 36, 10), (1, 1, 1, 2, 2, 7, 200, 9)):
        for rows in head.HEAD4_ROWS_CHOICES:
            lay = head.v4_layout(geom, rows)
            assert 4 * lay["SMEM_FLOATS"] == fused.head_v4_smem(rows, *geom[5:]), (geom, rows)
            assert lay["A"] % 4 == 0 and lay["BW"] % 2 == 1
    for name, rows in head.V4_REPORT_ROWS.items():
        assert head.LAUNCH_BOUNDS[name] == head.v4_bounds(rows) == (8 * rows, 512 // (8 * rows))
    assert head.KERNELS["head_train_v4"] is head.v4_kernel(head.LENET_GEOM, 8)
    assert head.REPORT_KERNELS["head_train_v4_r32"] is head.v4_kernel(head.LENET_GEOM, 32)
    with pytest.raises(ValueError, match="rows"):
        head.make_v4(head.LENET_GEOM, 4)
    with pytest.raises(ValueError, match="geometry"):
        head.make_v4((2, 2, 3, 6, 8, 5, 4, 3), 8)


V4_ARCHS = ("sm_80", "sm_90")
V4_COMPILED = tuple(f"head_train_v4{'' if r == 8 else f'_r{r}'}" for r in (8, 16, 32))


@pytest.fixture(scope="module")
def v4_compiled():
    """head_train_v4's three LeNet-5 kernels (8, 16, 32 rows), each arch, compiled once (compile_report's cache:
    what tests/test_numba_compile's report built in this process already is not built again)."""
    cr = numba_compile_report()
    cr.prefetch([(n, a) for n in V4_COMPILED for a in V4_ARCHS])
    return cr


@pytest.mark.skipif(SIM, reason="compile checks need the real compiler")
@pytest.mark.parametrize("arch", V4_ARCHS)
@pytest.mark.parametrize("name", V4_COMPILED)
def test_v4_compiles_without_spills_float64_or_integer_division(v4_compiled, name, arch):
    """head_train_v4 as the plan launches it (LeNet-5's geometry, 8, 16 or 32 rows), under head.cu's launch bounds
    (8·rows threads, 512/(8·rows) blocks an SM: ≤ 128 registers): no spills, no stack (the register tiles stay in
    registers), no float64, no integer division or remainder (the geometry's divisors are constants), the static
    shared memory of fused.head_v4_smem, and the tiles' FMAs unrolled (C5 4 steps × 16, F6 4 × 12, dz1 4 × 16,
    dx 4 × 28 in straight-line code at least)."""
    import re

    from lenet_gpu.backends.cupy_backend import fused

    cr = v4_compiled
    head = _head()
    rows = head.V4_REPORT_ROWS[name]
    ptx, log = cr.compile_kernel(name, arch)
    res = cr.parse_ptxas(log)
    print(name, arch, res)
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, (name, arch, res)
    assert 0 < res["registers"] <= 128, (name, arch, res)
    assert res["shared_bytes"] == fused.head_v4_smem(rows, 120, 84, 10), (name, arch, res)
    assert not cr.f64_lines(ptx), cr.f64_lines(ptx)[:5]
    stats = cr.int_arith_stats(ptx)
    assert all(stats[f"{d}.{t}"] == 0 for d in ("div", "rem") for t in ("s64", "u64", "s32", "u32")), stats
    assert f".maxntid {8 * rows}, 1, 1" in ptx and f".minnctapersm {512 // (8 * rows)}" in ptx
    assert ".local" not in ptx
    assert len(re.findall(r"\bfma\.rn\.f32\b", ptx)) >= 4 * (16 + 12 + 16 + 28), "the tiles are not unrolled"


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
    assert _names(be) == ["head_train_v3", "head_train_wgrad_v4"]


@sim
def test_sim_wgrad_v4_gives_wgrad_v3s_bits():
    """head_train_wgrad_v4 (the plan's: the next chunk fetched into registers, every k step run) against
    head_train_wgrad_v3 on the same random operands, at a small geometry (one tile a layer: 4 blocks) and batch 130
    (5 chunks of 32 over 4 groups: group 0 runs two rounds, the last chunk partial): every weight and bias gradient
    and the stats row bit for bit; a negative-zero operand among them (a sum must never turn into -0)."""
    from numba import cuda

    head = _head()
    geom = (1, 2, 2, 4, 4, 5, 4, 3)  # C, Hp, Wp, H, W, H1, H2, NC: I = 4
    _, wg3, wg4 = head.v3_kernels(geom)
    b, i, n1, n2, nc = 130, 4, 5, 4, 3
    rng = np.random.default_rng(130)
    shapes = {"x": (b, i), "h1": (b, n1), "h2": (b, n2), "dz1": (b, n1), "dz2": (b, n2), "dz3": (b, nc),
              "rowstat": (b, 2)}
    inp = {k: rng.standard_normal(sh).astype(np.float32).ravel() for k, sh in shapes.items()}
    inp["dz1"][:n1] = -0.0  # row 0's dz1: negative zeros
    state = np.zeros(8, np.int32)
    state[head.STEP_IN_EPOCH] = 3
    tiles = sum(-(-o // head.WG_TO) * -(-(k + 1) // head.WG_TI) for o, k in ((n1, i), (n2, n1), (nc, n2)))
    out = {}
    for name, kernel in (("head_train_wgrad_v3", wg3), ("head_train_wgrad_v4", wg4)):
        be = F.NumbaShim()
        be.launch_log = []
        res = {k: cuda.to_device(np.full(n, np.nan, np.float32)) for k, n in (
            ("dw1", n1 * i), ("db1", n1), ("dw2", n2 * n1), ("db2", n2), ("dw3", nc * n2), ("db3", nc))}
        stats = cuda.to_device(np.full((2, 2), -7.0, np.float32))
        args = [cuda.to_device(inp[k]) for k in shapes]
        head.launch_kernel(be, name, kernel, tiles + 1, head.WG2_THREADS, 0, *args, res["dw1"], res["db1"],
                           res["dw2"], res["db2"], res["dw3"], res["db3"], stats, cuda.to_device(state),
                           *(np.int32(v) for v in (b, i, n1, n2, nc)))
        assert [n for n, _ in be.launch_log] == [name]
        out[name] = {k: v.copy_to_host() for k, v in res.items()} | {"stats": stats.copy_to_host()}
    want = np.asarray(inp["dz1"], np.float64).reshape(b, n1).T @ np.asarray(inp["x"], np.float64).reshape(b, i)
    np.testing.assert_allclose(out["head_train_wgrad_v4"]["dw1"].reshape(n1, i), want, rtol=1e-4, atol=1e-4)
    for k, v in out["head_train_wgrad_v3"].items():
        assert np.array_equal(out["head_train_wgrad_v4"][k].view(np.uint32), v.view(np.uint32)), k


@sim
def test_sim_head_train_v3_routed():
    """yconv=None (the routed step): dz_conv at x's shape = dx·act'(x) (tests/test_numba_routed's check)."""
    from tests.test_numba_routed import check_head_train_routed

    be = _Shim("v3")
    be.launch_log = []
    check_head_train_routed(be, 1, 2, 4, 6, 5, 4, 3, "sigmoid", seed=5)
    assert _names(be) == ["head_train_v3", "head_train_wgrad_v4"]


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


# ------------------------------------------------------------------------------------------ the simulator: v4
#
# head_train_v4's block is 8 simulated threads a row (64 at 8 rows), so these run at small geometries: x (B,C,Hp,Wp)
# of 12 to 256 features; a few cross HEAD4_KC (the forward products' K chunks) and 32·7 (the data gradient's column
# passes), so that every loop of the kernel runs more than once somewhere.
V4 = ["head_train_v4", "head_train_wgrad_v4"]


@sim
@pytest.mark.parametrize("act,b,shape", [
    ("relu", 9, (2, 4, 6, 5, 4, 3)),  # x (2,2,3): 12 features; 9 rows = a full block of 8 and a partial one
    ("sigmoid", 5, (3, 8, 10, 40, 36, 10)),  # 60 features: 3 K chunks of C5, 2 of F6
])
def test_sim_head_train_v4_routed(act, b, shape):
    """yconv=None (the routed step): dz_conv at x's shape = dx·act'(x), every output against the reference."""
    from tests.test_numba_routed import check_head_train_routed

    be = _Shim("v4")
    be.launch_log = []
    check_head_train_routed(be, b, *shape, act, seed=7 + b)
    assert _names(be) == V4


@sim
@pytest.mark.parametrize("act,mode,shape", [
    ("tanh", "max", (9, 3, 8, 10, 40, 36, 10)),  # a partial last block; 3 K chunks
    ("lecun_tanh", "avg", (3, 2, 5, 7, 7, 5, 4)),  # odd yconv 5 x 7 over S4 2 x 3: a trailing row and column
    ("relu", "max", (2, 2, 7, 5, 6, 5, 3)),  # odd yconv, max: ties (relu zeros), the argmax routes
])
def test_sim_head_train_v4(act, mode, shape):
    """head_train_v4 with yconv (max: the argmax tap; avg: a quarter to each tap; odd maps: the uncovered taps 0)
    against reference.head_train: every output, the stats row, the state untouched."""
    head = _head()
    be = F.NumbaShim()
    be.launch_log = []
    F.check_head_train(be, head.head_train, "v4", *shape, act, mode, seed=len(act) + shape[0])
    assert _names(be) == V4


@sim
def test_sim_head_train_v4_wide_passes():
    """256 features and C5 230 wide: C5's forward in two column passes of 128 over 13 K chunks (the last one partial),
    dz1 and dx in two passes of 224 columns (the second partial)."""
    head = _head()
    be = F.NumbaShim()
    F.check_head_train(be, head.head_train, "v4", 3, 4, 16, 16, 230, 36, 10, "tanh", "avg", seed=12)


@sim
def test_sim_head_train_v4_sixteen_rows_capped_grid_repeats(monkeypatch):
    """The 16-row body (chosen from batch 2,097; forced by fused.HEAD4_FILL_BLOCKS = 2, as tests/test_head_v4.py
    does): 19 rows in two blocks, the second with 3 rows (13 rows past the batch read as zeros, never written);
    then one block taking both tiles (max_blocks=1: the block-stride loop), the same bits."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused

    monkeypatch.setattr(fused, "HEAD4_FILL_BLOCKS", 2)
    assert head.plan("v4", 19, 12, 5, 4, 3)[0] == ("head_train_v4", 2, 128, 0, 16)
    shape = (19, 2, 4, 6, 5, 4, 3)
    be = F.NumbaShim()
    be.launch_log = []
    a = F.check_head_train(be, head.head_train, "v4", *shape, "sigmoid", "max", seed=16)
    assert _names(be) == V4
    b = F.check_head_train(F.NumbaShim(max_blocks=1), head.head_train, "v4", *shape, "sigmoid", "max", seed=16)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@sim
def test_sim_default_plan_runs_v4(monkeypatch):
    """The default variant (v3's plan) runs v4's rows kernel once the batch is past v3's and fills the SMs with 8-row
    blocks: both thresholds lowered (fused.HEAD_FILL_BLOCKS = 2, HEAD4_FILL_BLOCKS = 3) so that 17 rows cross them."""
    head = _head()
    from lenet_gpu.backends.cupy_backend import fused

    monkeypatch.setattr(fused, "HEAD_FILL_BLOCKS", 2)
    monkeypatch.setattr(fused, "HEAD4_FILL_BLOCKS", 3)
    assert head.plan("v3", 17, 12, 5, 4, 3)[0] == ("head_train_v4", 3, 64, 0, 8)
    be = F.NumbaShim()
    be.launch_log = []
    F.check_head_train(be, head.head_train, None, 17, 2, 4, 6, 5, 4, 3, "relu", "avg", seed=17)
    assert _names(be) == V4
