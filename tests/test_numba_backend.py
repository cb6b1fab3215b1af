"""The numba backend: every op × variant × option against the float64 reference, a whole training step
against the numpy backend, and the per-step counters.

Without a GPU these run in Numba's CUDA simulator, which must be switched on before numba.cuda is
first imported: ``test_simulator_suite`` re-runs this file in a subprocess with NUMBA_ENABLE_CUDASIM=1
(and fails with the subprocess's output when anything there fails); the ``sim_*`` tests skip in the
main process. The ``gpu_*`` tests are the same checks at LeNet-5 sizes on a real device (skipped
here by conftest; ``pytest -m gpu`` on a GPU machine).

The simulator runs one Python thread per CUDA thread, so the shapes are tiny and odd (no multiple of
any tile or block size); every kernel loops over its work with a grid- or block-stride loop, and the
``max_blocks=1`` cases run the same code with one block taking every work item.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as R
from tests import sim_child

F64 = np.float64
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ROOT = Path(__file__).resolve().parent.parent

sim = pytest.mark.skipif(not SIM, reason="runs inside test_simulator_suite's NUMBA_ENABLE_CUDASIM=1 subprocess")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")



# ------------------------------------------------------------------------------------- main process


SUITE = sim_child.Child(__file__, "sim_", timeout=800)


@pytest.mark.sim
@sim_child.early(SUITE)
def test_simulator_suite():
    """Run the sim_* tests of this file in a subprocess with the CUDA simulator on."""
    if SIM:
        pytest.skip("this is the simulator run")
    print(sim_child.result(SUITE))


@pytest.mark.skipif(SIM, reason="needs the real CUDA driver check")
def test_unavailable_without_gpu_is_one_clear_line():
    from lenet_gpu.backends import BackendUnavailable, get_backend
    from tests.conftest import HAS_GPU, require

    require("numba")
    if HAS_GPU:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable) as e:
        get_backend("numba")
    msg = str(e.value)
    assert "\n" not in msg and "--backend numpy" in msg and "NUMBA_ENABLE_CUDASIM=1" in msg
    assert get_backend("auto").name != "numba"


# ------------------------------------------------------------- main process: prepared launches (no GPU)


@pytest.mark.skipif(SIM, reason="the GPU launch path (cuda.bindings), exercised with a fake driver")
def test_prepared_launch_packs_numba_kernel_arguments():
    """Numba's kernel arguments (ints are intptr_t, as cuda.core passes them; ctypes scalars as they are)
    become one void*[] whose entries point at exactly those values."""
    import ctypes

    from lenet_gpu.backends.numba_backend import launch as L

    vals = [0, 0, 12, 4, 0x7F0000001000, 3, 4, 16, 4, ctypes.c_int32(-7), ctypes.c_float(0.25), np.int64(9)]
    cvals, params = L._pack(vals)
    addrs = [params[i] for i in range(len(vals))]
    ints = [ctypes.c_ssize_t.from_address(a).value for a in addrs[:9] + addrs[11:]]
    assert ints == [0, 0, 12, 4, 0x7F0000001000, 3, 4, 16, 4, 9]
    assert ctypes.c_int32.from_address(addrs[9]).value == -7
    assert ctypes.c_float.from_address(addrs[10]).value == 0.25
    with pytest.raises(TypeError, match="float"):
        L._pack([1.5])


@pytest.mark.skipif(SIM, reason="the GPU launch path (cuda.bindings), exercised with a fake driver")
def test_replay_issues_every_prepared_launch_in_order(monkeypatch):
    """A replay is one cuLaunchKernel per prepared launch, in order, on the stream current at the call
    (the capturing stream during a graph capture); a driver error names the kernel."""
    from lenet_gpu.backends.numba_backend import launch as L

    calls, result = [], [0]

    class FakeDriver:
        @staticmethod
        def cuLaunchKernel(*args):  # noqa: N802
            calls.append(args)
            return (result[0],)

    monkeypatch.setattr(L, "_drv", FakeDriver)
    launches = []
    for name, grid, block in (("a_v1", 3, 128), ("b_v2", (2, 5), (16, 16))):
        p = L.PreparedLaunch(name, grid, block, 64, ())
        p.call, p.params_ptr = (f"func_{name}", *p.grid, *p.block, p.shmem), 1000 + len(launches)
        launches.append(p)
    stream = ["default"]
    replay = L.replay_fn(launches, lambda: stream[0])
    replay()
    stream[0] = "capturing"
    replay()
    assert calls == [
        ("func_a_v1", 3, 1, 1, 128, 1, 1, 64, "default", 1000, 0),
        ("func_b_v2", 2, 5, 1, 16, 16, 1, 64, "default", 1001, 0),
        ("func_a_v1", 3, 1, 1, 128, 1, 1, 64, "capturing", 1000, 0),
        ("func_b_v2", 2, 5, 1, 16, 16, 1, 64, "capturing", 1001, 0),
    ]
    result[0] = 700  # CUDA_ERROR_ILLEGAL_ADDRESS
    with pytest.raises(L.LaunchError, match="a_v1"):
        replay()


# -------------------------------------------------------------------------------- simulator: setup

from tests.conftest import _installed  # noqa: E402

if _installed("numba"):  # an import error in the project's code fails collection, it is not a skip
    from lenet_gpu.backends.numba_backend import VARIANTS, NumbaBackend
    from lenet_gpu.backends.numba_backend.backend import FUSED_VARIANTS
    from tests import numba_helpers as H
else:  # numba not installed: test_unavailable... and the skips still run
    NumbaBackend = H = None
    VARIANTS = FUSED_VARIANTS = {}

ACTS = ("identity", "relu", "tanh", "lecun_tanh", "sigmoid")
MODES = ("max", "avg")


@pytest.fixture(scope="module")
def be():
    return NumbaBackend()


@pytest.fixture(scope="module")
def be1():
    """Every launch capped at one block: the stride loops take every work item."""
    return NumbaBackend(max_blocks=1)


# ---------------------------------------------------------------------------- simulator: op parity


#: the ops with act × pool × variant tests of their own below (with more shapes); every other op of the variant
#: tables that takes an activation or a pool mode (the fused head_train and lenet_fwd, and any op added later)
#: runs the whole matrix of tests/matrix.py here
OWN_MATRIX = ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data_pool", "pool2x2_bwd", "dense_fwd", "dense_bwd")


#: variants whose act × pool matrix runs in a test file of their own: lenet_fwd v2 in test_numba_lenet_fwd_v2.py
#: (every activation, both pool modes, every tile size; v3, the default, is v2's code with output switches and runs
#: here)
OWN_VARIANT_MATRIX = {"lenet_fwd": ("v2",)}


def _matrix_ops() -> list[str]:
    from tests.matrix import matrix_ops

    return [op for op in matrix_ops({**VARIANTS, **FUSED_VARIANTS}) if op not in OWN_MATRIX]


@sim
@pytest.mark.parametrize("op", _matrix_ops())
def test_sim_act_pool_matrix(be, op):
    from tests.matrix import check_matrix

    assert check_matrix(be, op, OWN_VARIANT_MATRIX.get(op, ())) > 0


@sim
def test_sim_backend_facts(be):
    from lenet_gpu.backends import get_backend
    from lenet_gpu.backends.base import OPS, OPTIONAL_OPS, ROUTED_OPS, STEP_OPS, Backend

    assert isinstance(be, Backend)
    assert be.name == "numba" and be.is_gpu is False
    assert set(OPS) <= set(be.variants) <= set(OPS) | set(OPTIONAL_OPS) | set(ROUTED_OPS) | set(STEP_OPS)
    assert "conv2d_pool_fwd" in be.variants  # the model fuses
    for op in OPS:
        assert be.default_variants[op] in be.variants[op]
    for op in ("conv2d_fwd", "conv2d_bwd_weight", "dense_fwd"):
        assert len(be.variants[op]) >= 2 and be.default_variants[op] != "v1"
    assert get_backend("numba").name == "numba"
    assert get_backend("auto").name != "numba"  # the simulator is not a GPU
    assert be.graph(print) is None  # no CUDA graphs in the simulator


@sim
def test_sim_wrappers_reject_host_arrays_and_bad_shapes(be):
    x = np.zeros((1, 1, 6, 6), np.float32)
    w, b, y = be.zeros((2, 1, 3, 3)), be.zeros((2,)), be.zeros((1, 2, 4, 4))
    with pytest.raises(TypeError, match="host NumPy array"):
        be.conv2d_fwd(x, w, b, y, "relu")
    with pytest.raises(ValueError, match="shape"):
        be.conv2d_fwd(be.to_device(x), w, b, be.zeros((1, 2, 3, 4)), "relu")
    with pytest.raises(TypeError, match="float32"):
        be.dense_fwd(be.zeros((2, 3), np.int32), be.zeros((4, 3)), be.zeros((4,)), be.zeros((2, 4)), "relu")
    with pytest.raises(ValueError, match="unknown variant"):
        be.conv2d_fwd(be.to_device(x), w, b, y, "relu", variant="v9")
    with pytest.raises(ValueError, match="activation"):
        be.conv2d_fwd(be.to_device(x), w, b, y, "swish")
    images, labels, perm = be.zeros((3, 28, 28), np.uint8), be.zeros((3,), np.uint8), be.zeros((3,), np.int32)
    with pytest.raises(TypeError, match="int32"):  # the state is int32 words
        be.batch_prepare(images, labels, perm, be.zeros((8,), np.int64), be.empty((2, 1, 32, 32)),
                         be.empty((2,), np.int32), 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        be.step_advance(be.zeros((7,), np.int32), 4)
    with pytest.raises(TypeError, match="2-d"):  # stats is (S, 2)
        be.softmax_xent(be.zeros((2, 3)), be.zeros((2,), np.int32), be.empty((2, 3)), be.zeros((4,)),
                        be.zeros((8,), np.int32))
    with pytest.raises(ValueError, match="shape"):
        be.softmax_xent(be.zeros((2, 3)), be.zeros((2,), np.int32), be.empty((2, 3)), be.zeros((4, 3)),
                        be.zeros((8,), np.int32))
    with pytest.raises(ValueError, match="shape"):  # the schedule is (T, 4)
        be.sgd_step(be.zeros((5,)), be.zeros((5,)), be.zeros((5,)), be.zeros((3, 3)), be.zeros((8,), np.int32),
                    0.9, 0.0)


# (n, b, offset, seed, epoch, shift): no augmentation; a seed ≥ 2³¹ (a negative int32 word), epochs > 0,
# the largest shift; an offset whose batch runs past the permutation's end (wraps); batch 1
BATCH_CASES = [
    (7, 3, 2, 0, 0, 0),
    (7, 3, 1, 2**31 + 12345, 3, 2),
    (9, 2, 8, 2**32 - 1, 70001, 3),
    (4, 1, 3, 17, 1, 1),
]


@sim
@pytest.mark.parametrize("n,b,offset,seed,epoch,shift", BATCH_CASES)
def test_sim_batch_prepare(be, n, b, offset, seed, epoch, shift):
    H.check_batch_prepare(be, n, b, offset, seed=seed, epoch=epoch, shift=shift)


#: (seed, epoch, max shift): seeds and epochs at the int32 edges (as the state words carry them)
SHIFT_CASES = [(0, 0, 2), (2**31 + 99, 5, 2), (2**32 - 1, 2**31 - 1, 3), (12345, 1, 1), (7, 3, 0)]


@sim
@pytest.mark.parametrize("seed,epoch,shift", SHIFT_CASES)
def test_sim_augment_shift_is_the_reference_hash(seed, epoch, shift):
    idx = np.r_[0:100, 2**31 - 1, 2**31 - 2, 60000, 65535, 65536]
    H.check_augment_shift(seed, epoch, idx, shift)


@sim
@pytest.mark.parametrize("words", [
    dict(step=0, step_in_epoch=0, offset=0, steps_per_epoch=3),
    dict(step=41, step_in_epoch=2, offset=10, epoch=6, steps_per_epoch=3, sched_base=40),  # wraps
    dict(step=5, step_in_epoch=5, offset=20, steps_per_epoch=2**31 - 1, seed=-3, shift=2),  # never wraps
])
def test_sim_step_advance(be, words):
    H.check_step_advance(be, 5, **words)


# conv shapes: (x shape, w shape), odd sizes, a non-square filter, batch 1
CONV_SHAPES = [((2, 3, 7, 9), (5, 3, 3, 2)), ((1, 2, 6, 5), (9, 2, 2, 3))]


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", VARIANTS.get("conv2d_fwd", ()))
def test_sim_conv2d_fwd(be, variant, act):
    xs, ws = CONV_SHAPES[ACTS.index(act) % 2]
    H.check_conv2d_fwd(be, xs, ws, act, variant)


@sim
@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_sim_conv2d_fwd_one_block_many_items(be1, variant):
    # 2 images × 2 filter groups (K=9 > KB=8) × 1 pixel chunk: the block loops over 4 items
    H.check_conv2d_fwd(be1, (2, 2, 6, 5), (9, 2, 2, 3), "relu", variant)


@sim
@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_sim_conv2d_fwd_two_pixel_chunks(be, variant):
    # an 18×11 output plane is two chunks of 128 pixels: v3's second input band starts mid-plane
    H.check_conv2d_fwd(be, (1, 1, 20, 13), (2, 1, 3, 3), "lecun_tanh", variant)


@sim
def test_sim_conv2d_fwd_channel_chunks(be, monkeypatch):
    """conv2d_fwd_v2/v3 stage channels in chunks when they outgrow their shared-memory budget."""
    from lenet_gpu.backends.numba_backend import conv2d

    monkeypatch.setattr(conv2d, "FWD_SMEM_FLOATS", conv2d.KB * 2 * 2 * 2)  # chunks of 2, 2, 1 channels
    H.check_conv2d_fwd(be, (1, 5, 4, 5), (3, 5, 2, 2), "tanh", "v2")
    monkeypatch.setattr(conv2d, "V3_SMEM_FLOATS", 2 * (conv2d.KB * 2 * 2 + 4 * 5))  # 2 channels a chunk
    H.check_conv2d_fwd(be, (1, 5, 4, 5), (3, 5, 2, 2), "tanh", "v3")


@sim
def test_sim_conv2d_fwd_default_falls_back_when_shared_memory_is_short(be):
    """A filter too large for v3's shared budget: the default (v3) steps down to a variant that fits."""
    from lenet_gpu.backends.numba_backend.backend import MAX_DYNAMIC_SMEM, launch_config

    shapes = {"y": (1, 1, 1, 2), "w": (1, 1, 45, 44)}
    assert launch_config("conv2d_fwd", "v3", shapes)[2] > MAX_DYNAMIC_SMEM
    H.check_conv2d_fwd(be, (1, 1, 45, 45), (1, 1, 45, 44), "identity", None)
    with pytest.raises(ValueError, match="shared memory"):
        H.check_conv2d_fwd(be, (1, 1, 45, 45), (1, 1, 45, 44), "identity", "v3")


# odd conv outputs (a trailing row or column that is written but not pooled), batch 1
POOL_CONV_SHAPES = [((2, 3, 8, 10), (5, 3, 3, 2)), ((1, 2, 8, 6), (9, 2, 2, 3))]


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS.get("conv2d_pool_fwd", ()))
def test_sim_conv2d_pool_fwd(be, variant, mode, act):
    xs, ws = POOL_CONV_SHAPES[ACTS.index(act) % 2]
    H.check_conv2d_pool_fwd(be, xs, ws, act, mode, variant)


@sim
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sim_conv2d_pool_fwd_without_y_and_one_block(be1, variant):
    H.check_conv2d_pool_fwd(be1, (2, 2, 8, 6), (9, 2, 2, 3), "relu", "max", variant, with_y=False)
    # a 19×32 output has 10×16 = 160 windows: two chunks of 128, the second starting mid-row
    H.check_conv2d_pool_fwd(be1, (1, 1, 21, 34), (2, 1, 3, 3), "tanh", "avg", variant)


@sim
@pytest.mark.parametrize("shapes", CONV_SHAPES)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sim_conv2d_bwd_data(be, variant, shapes):
    H.check_conv2d_bwd_data(be, *shapes, variant)


@sim
def test_sim_conv2d_bwd_data_one_block_and_filter_chunks(be1, monkeypatch):
    from lenet_gpu.backends.numba_backend import conv2d

    # 2 images × 2 channel groups (C=9 > CB=8): one block loops over 4 items
    H.check_conv2d_bwd_data(be1, (2, 9, 4, 5), (2, 9, 2, 3), "v2")
    monkeypatch.setattr(conv2d, "BWD_DATA_SMEM_FLOATS", conv2d.CB * 2 * 3 * 2)  # 2 filters a chunk: 2, 2, 1
    H.check_conv2d_bwd_data(be1, (1, 3, 4, 5), (5, 3, 2, 3), "v2")


@sim
@pytest.mark.parametrize("fixed", [True, False])
def test_sim_shared_array_is_one_per_block(fixed):
    """The simulator's cuda.shared.array looked its array up and stored a new one in two steps, so two of
    a block's threads could each keep a private array (CI: garbage in conv2d_bwd_weight_v2's dw once).
    A lookup that waits after every miss makes every thread miss before any stores: the simulator's
    own method then hands out several arrays, the backend's fix (_compat) one."""
    import threading
    import time

    from numba.cuda.simulator import kernelapi

    from lenet_gpu.backends.numba_backend import _compat

    array = kernelapi.FakeCUDAShared.array if fixed else _compat.SIMULATOR_SHARED_ARRAY
    assert array is not None and getattr(kernelapi.FakeCUDAShared.array, "_lenet_gpu_fixed", False)

    class SlowMiss(dict):
        def get(self, key, default=None):
            hit = super().get(key, default)
            time.sleep(0.02)
            return hit

    shared = kernelapi.FakeCUDAShared(0)
    shared._allocations = SlowMiss()
    got = []

    def thread():
        got.append(array(shared, (8, 4), np.float32))  # one source line, as in a kernel

    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    distinct = len({id(a) for a in got})
    assert len(got) == 8
    assert distinct == 1 if fixed else distinct > 1, distinct



@sim
def test_sim_barrier_patch_is_on():
    """The simulator runs a block's threads as greenlets (_compat.fix_simulator_barriers); greenlet is a test
    dependency, so the suite never falls back to the simulator's own OS threads without saying so."""
    from numba.cuda.simulator import kernel

    from lenet_gpu.backends.numba_backend import _compat

    assert getattr(kernel.BlockManager.run, "_lenet_gpu_fixed", False)
    assert _compat.SIMULATOR_BLOCK_RUN is not None and _compat.fix_simulator_barriers() is True


@sim
def test_sim_barrier_orders_writes_before_reads():
    """With the barrier every thread reads its neighbours' indices; without it many readers run before their writer
    on either side (the phase order changes from phase to phase), so the planted bug shows in both directions."""
    blocks, n = 3, 37
    idx = np.arange(n, dtype=np.float32)
    want = np.stack([(idx - 1) % n, (idx + 1) % n], axis=-1)[None] + 100.0 * np.arange(blocks)[:, None, None]
    from tests.sim_barrier_kernels import NEIGHBOURS, NEIGHBOURS_NO_BARRIER

    out = np.zeros((blocks, n, 2), np.float32)
    NEIGHBOURS[blocks, n](out)
    np.testing.assert_array_equal(out, want)
    NEIGHBOURS_NO_BARRIER[blocks, n](out)
    stale = out == -1.0
    # either side: a quarter or more of the threads read the old value of the neighbour on their left, and of the
    # one on their right (in thread order only the right-hand reads, but thread 0's, would be stale)
    assert (stale.mean(axis=(0, 1)) > 0.25).all(), stale.mean(axis=(0, 1))
    assert ((out == want) | stale).all()  # nothing but the old value or the new one


@sim
def test_sim_barrier_counts_threads_still_alive_and_reports_the_failing_thread():
    """Threads that return early do not hold the barrier (the simulator's own rule), syncthreads_count counts the
    block, and an error in one thread names that thread and block."""
    from tests.sim_barrier_kernels import EARLY_RETURN as k

    out = np.zeros((2, 8), np.int32)
    k[2, 8](out, np.array([-1], np.int32))
    np.testing.assert_array_equal(out[:, :5], 3)  # threads 0, 2, 4 of the five alive
    with pytest.raises(IndexError, match=r"tid=\[3, 0, 0\] ctaid=\[1, 0, 0\]"):
        k[2, 8](out, np.array([1], np.int32))

@sim
@pytest.mark.parametrize("shapes", [((2, 2, 5, 6), (3, 2, 2, 3)), ((1, 1, 6, 7), (2, 1, 3, 3))])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sim_conv2d_bwd_weight(be, variant, shapes):
    H.check_conv2d_bwd_weight(be, *shapes, variant)


@sim
def test_sim_conv2d_bwd_weight_state_is_optional(be):
    from tests.parity import TOL, assert_close, nan_like, rand

    hx, hdz = rand((1, 1, 4, 4), 3), rand((1, 2, 2, 2), 4)  # random inputs: an all-zero output proves nothing
    _, rdw, rdb = R.conv2d_bwd(hx.astype(F64), np.zeros((2, 1, 3, 3)), np.zeros(hdz.shape), hdz.astype(F64),
                               "identity")
    for v in VARIANTS["conv2d_bwd_weight"]:  # v3 without a state: a private zero state (its ticket still resets)
        dw, db = be.to_device(nan_like((2, 1, 3, 3))), be.to_device(nan_like((2,)))
        be.conv2d_bwd_weight(be.to_device(hx), be.to_device(hdz), dw, db, variant=v)  # no state: ignored
        assert_close(be.to_host(dw), rdw, *TOL["conv2d_bwd_weight"], f"{v} without a state: dw")
        assert_close(be.to_host(db), rdb, *TOL["conv2d_bwd_weight"], f"{v} without a state: db")


@sim
@pytest.mark.parametrize("shapes", [((2, 2, 5, 6), (3, 2, 2, 3)), ((1, 1, 6, 7), (2, 1, 3, 3))])
def test_sim_conv2d_bwd_weight_v3(be, shapes):
    H.check_conv2d_bwd_weight(be, *shapes, "v3", state=H.state_array(step=12))


@sim
def test_sim_conv2d_bwd_weight_v3_splits_and_tickets(be, monkeypatch):
    """Several splits per item, summed in a fixed order by the item's last block; the same arrays
    launched again at the same STEP and at a new STEP; a ticket word left by another step's unfinished
    launch (or garbage) does not poison a launch."""
    from lenet_gpu import reference as R
    from lenet_gpu.backends.numba_backend import backend as B
    from tests.parity import TOL, assert_close, nan_like, rand

    monkeypatch.setattr(B, "BW_MIN_PER_THREAD", 1)
    xs, ws, dzs = (2, 1, 18, 18), (1, 1, 3, 3), (2, 1, 16, 16)  # 512 positions: 4 splits, 2 column chunks
    assert B.bw_splits(ws, dzs) == 4
    x, dz = rand(xs, 1), rand(dzs, 2)
    _, rdw, rdb = R.conv2d_bwd(x.astype(np.float64), np.zeros(ws), np.zeros(dzs), dz.astype(np.float64), "identity")
    dx, ddz = be.to_device(x), be.to_device(dz)
    dw, db = be.to_device(nan_like(ws)), be.to_device(nan_like((1,)))
    state = be.to_device(H.state_array(step=7))
    results = []
    for step, poison in ((7, None), (7, None), (8, None), (9, [(8 << 32) | 3, -1])):
        state.copy_to_device(H.state_array(step=step))
        if poison is not None:
            _, tickets = be._bw_scratch(dw, 4)
            tickets.copy_to_device(np.array(poison, np.int64))
        dw.copy_to_device(nan_like(ws))
        be.conv2d_bwd_weight(dx, ddz, dw, db, state, variant="v3")
        assert_close(be.to_host(dw), rdw, *TOL["conv2d_bwd_weight"], f"dw at step {step}")
        assert_close(be.to_host(db), rdb, *TOL["conv2d_bwd_weight"], f"db at step {step}")
        results.append(be.to_host(dw))
        _, tickets = be._bw_scratch(dw, 4)
        np.testing.assert_array_equal(be.to_host(tickets), np.full(2, step << 32, np.int64))  # count back to 0
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])  # fixed order: bit for bit, whichever block is last


@sim
def test_sim_conv2d_bwd_weight_one_block_many_items(be1):
    # K=2 × ceil((1·3·3 + 1)/BW_COLS=8) = 2 column chunks: one block reduces all 4 items in turn
    H.check_conv2d_bwd_weight(be1, (1, 1, 4, 5), (2, 1, 3, 3), "v2")


# (yconv shape, w shape): odd H and W (a trailing row and column no window owns), batch 1; C > CB
BWD_POOL_SHAPES = [((2, 3, 9, 11), (2, 3, 2, 3)), ((1, 2, 8, 6), (3, 2, 3, 2))]


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS.get("conv2d_bwd_data_pool", ()))
def test_sim_conv2d_bwd_data_pool(be, variant, mode, act):
    H.check_conv2d_bwd_data_pool(be, *BWD_POOL_SHAPES[ACTS.index(act) % 2], mode, act, variant)


@sim
@pytest.mark.parametrize("mode", MODES)
def test_sim_conv2d_bwd_data_pool_one_block_channel_groups(be1, mode):
    # C=9 > CB=8: two channel groups, one block loops over both
    H.check_conv2d_bwd_data_pool(be1, (1, 9, 7, 6), (2, 9, 2, 2), mode, "tanh", "v2")


@sim
@pytest.mark.parametrize("xshape", [(2, 3, 7, 9), (1, 2, 4, 6)])
@pytest.mark.parametrize("mode", MODES)
def test_sim_pool2x2_fwd(be, mode, xshape):
    H.check_pool2x2_fwd(be, xshape, mode, "v1")


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
def test_sim_pool2x2_bwd(be, mode, act):
    xshape = (2, 3, 5, 7) if act != "relu" else (1, 2, 6, 4)
    H.check_pool2x2_bwd(be, xshape, mode, act, "v1")


DENSE_SHAPES = [(3, 13, 7), (1, 19, 17)]


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", VARIANTS.get("dense_fwd", ()))
def test_sim_dense_fwd(be, variant, act):
    H.check_dense_fwd(be, *DENSE_SHAPES[ACTS.index(act) % 2], act, variant)


@sim
def test_sim_dense_fwd_one_block_many_tiles(be1):
    H.check_dense_fwd(be1, 17, 5, 18, "sigmoid", "v2")  # 2 × 2 tiles of 16, one block


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_dx", [True, False])
@pytest.mark.parametrize("variant", VARIANTS.get("dense_bwd", ()))
def test_sim_dense_bwd(be, variant, act, with_dx):
    if variant != "v1" and not with_dx and act != "sigmoid":
        pytest.skip("tiled variants: every activation with dx, one without (barriers are slow here)")
    H.check_dense_bwd(be, *DENSE_SHAPES[ACTS.index(act) % 2], act, with_dx, variant)


@sim
def test_sim_dense_bwd_one_block_many_tiles(be1):
    # 17 rows, 16 inputs (+ the bias column: 2 column tiles), 18 outputs: 2·1 dx + 2·2 dw tiles
    H.check_dense_bwd(be1, 17, 16, 18, "relu", True, "v2")


@sim
@pytest.mark.parametrize("n,ncls,rows,step_in_epoch", [(5, 10, 3, 4), (1, 3, 1, 0), (131, 4, 5, 2)])
def test_sim_softmax_xent(be, n, ncls, rows, step_in_epoch):
    H.check_softmax_xent(be, n, ncls, "v1", rows=rows, step_in_epoch=step_in_epoch)  # 131 rows > 128 threads


@sim
@pytest.mark.parametrize("step,sched_base", H.SCHED_CASES if H else [])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sim_optimizers(be, wd, step, sched_base):
    H.check_adam_step(be, 37, wd, "v1", step=step, sched_base=sched_base)
    H.check_sgd_step(be, 37, wd, "v1", step=step, sched_base=sched_base)


@sim
def test_sim_grid_stride_with_one_block(be1):
    """The one-thread-per-element kernels with a grid capped at one block of 256 threads."""
    H.check_pool2x2_bwd(be1, (2, 3, 9, 11), "max", "relu", "v1")  # 594 elements
    H.check_dense_bwd(be1, 3, 29, 9, "tanh", True, "v1")  # 87 + 261 + 9 elements
    H.check_adam_step(be1, 300, 0.0, "v1")


# ------------------------------------------------------------------------ simulator: whole training


def _sim_backend(fuse_conv_pool: bool = True):
    be = NumbaBackend(max_blocks=2, fuse_conv_pool=fuse_conv_pool)
    # Kernels with barriers cost ~50 ms per block and barrier in the simulator (conv2d_bwd_weight_v2
    # would take ~40 s of a step, dense_fwd_v2 ~20 s, dense_bwd_v2 more); their v1 is used for the
    # whole-step runs, and the op tests above check every variant against the reference.
    be.default_variants.update(conv2d_bwd_weight="v1", dense_fwd="v1", dense_bwd="v1")
    return be


TINY = dict(net="tiny", n=6, batch=3, shift=2, epoch=1, sched_rows=2)  # an epoch every 2 steps


@sim
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_sim_state_driven_steps_match_numpy(optimizer):
    """Four steps of the state-driven ops (two epochs: the state wraps; augmentation with a seed ≥ 2³¹;
    the schedule's clamp) on numba and on numpy: the same state, stats and parameters."""
    from lenet_gpu.backends.numpy_backend import NumpyBackend
    from tests.parity import assert_close

    rigs = [H.StepRig(b, optimizer=optimizer, **TINY) for b in (_sim_backend(), NumpyBackend(threads=1))]
    for k in range(4):
        for r in rigs:
            r.step()
        a, b = (r.snapshot() for r in rigs)
        np.testing.assert_array_equal(a["state"], b["state"], err_msg=f"state after step {k}")
        np.testing.assert_array_equal(a["y"], b["y"], err_msg=f"labels of step {k}")
        assert_close(a["x"], b["x"], 1e-6, 1e-6, f"batch of step {k}")
        assert_close(a["stats"][: k + 1], b["stats"][: k + 1], 1e-5, 1e-5, f"stats after step {k}")
        assert_close(a["grads"], b["grads"], 1e-6, 1e-4, f"gradients of step {k}")
        assert_close(a["params"], b["params"], 1e-5, 1e-4, f"parameters after step {k}")  # as above


@sim
def test_sim_record_replays_the_eager_steps_bit_for_bit():
    """A recorded step (the first call records, later calls replay the prepared launches) reaches exactly
    what the same number of eager steps reaches; a replay counts its launches and nothing else."""
    eager, rec = H.StepRig(_sim_backend(), **TINY), H.StepRig(_sim_backend(), **TINY)
    replay = rec.be.record(rec.step)
    before = eager.be.counters.snapshot()
    eager.step()
    per_step = eager.be.counters.since(before)
    assert per_step == {"launches": 7, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
    replay()  # records
    assert rec.snapshot()["state"][0] == 1
    for k in range(3):
        before = rec.be.counters.snapshot()
        replay()
        assert rec.be.counters.since(before) == per_step
        eager.step()
        H.assert_snapshots_equal(eager.snapshot(), rec.snapshot(), f"after {k + 2} steps")


@sim
def test_sim_launch_list_issues_each_recorded_launch_on_its_own():
    """launch_list(fn): fn runs once, and each of its launches comes back with its kernel's name as a callable that
    issues that one launch again (the self-test's per-kernel profile without CUPTI times them so)."""
    be = _sim_backend()
    state = be.to_device(H.state_array(steps_per_epoch=100))
    listed = be.launch_list(lambda: (be.step_advance(state, 2), be.step_advance(state, 3)))
    assert len(listed) == 2 and all("step_advance" in name for name, _ in listed), listed
    listed[1][1]()  # the second launch alone, again: one more step of 3
    got = be.to_host(state)
    assert got[0] == 3 and got[3] == 2 + 3 + 3


@sim
def test_sim_record_nested_and_reentrant():
    """A recorded callable replayed inside another recording becomes part of it."""
    be = _sim_backend()
    state = be.to_device(H.state_array(steps_per_epoch=100))
    inner = be.record(lambda: be.step_advance(state, 2))
    inner()  # records: step 1
    outer = be.record(lambda: (inner(), be.step_advance(state, 3)))
    outer()  # records (replays inner): step 3
    outer()
    got = be.to_host(state)
    assert got[0] == 5 and got[3] == 2 + 2 + 3 + 2 + 3


@sim
@pytest.mark.parametrize("batch", [1, 64, 1024])
@pytest.mark.parametrize("fused", [True, False])
def test_sim_lenet_launch_plan_is_what_a_step_launches(monkeypatch, batch, fused):
    """backend.lenet_launches (the fill table's source) lists exactly the launches a LeNet-5 training step
    makes through the wrappers, with their grids, blocks and shared memory (kernels not run: the
    launches are only logged)."""
    from lenet_gpu.backends.numba_backend.backend import lenet_launches

    be = NumbaBackend(fuse_conv_pool=fused, fuse_bwd_data_pool=fused)
    log = []
    monkeypatch.setattr(NumbaBackend, "_launch", lambda self, op, v, grid, block, sh, *a: log.append(
        (op, v, grid, block, sh)))
    rig = H.StepRig(be, net="lenet", n=2 * batch, batch=batch)
    rig.step()  # the rig calls the protocol's ops, not the fused head (the model's step: the next test)
    ops = {k: v for k, v in be.default_variants.items() if k not in ("head_train", "lenet_fwd")}
    assert log == lenet_launches(batch, variants=ops)
    assert len(log) == (16 if fused else 19)


@sim
@pytest.mark.parametrize("batch,step4", [(3, True), (64, True), (3, False), (64, False)])
def test_sim_lenet_launch_plan_is_what_a_model_step_launches(monkeypatch, batch, step4):
    """With every fused op (the fused head too), the plan is what LeNet5's training step and inference pass
    launch: 5 kernels a step (the four-kernel step, head_train being two), 10 for the nine-op routed step
    (step4=False), one for inference."""
    from lenet_gpu.backends.numba_backend.backend import lenet_launches
    from lenet_gpu.model import LeNet5

    be = NumbaBackend()
    model = LeNet5(backend=be, use_graphs=False, step4=step4)
    variants = be.default_variants if step4 else {k: v for k, v in be.default_variants.items()
                                                  if k not in ("step_fwd", "step_bwd", "step_adam", "step_sgd")}
    images = np.zeros((2 * batch, 28, 28), np.uint8)
    data = model.upload_dataset(images, np.zeros(2 * batch, np.uint8))
    model.begin_run(data, batch)
    log = []
    monkeypatch.setattr(NumbaBackend, "_launch", lambda self, op, v, grid, block, sh, *a: log.append(
        (op, v, grid, block, sh)))
    model._train_ops(model.workspace(batch), data, model._run)  # the step's ops, as run_steps records them
    assert log == lenet_launches(batch, variants=variants) and len(log) == (5 if step4 else 10)
    del log[:]
    be.lenet_fwd(data.images[:batch], model._pv, model.workspace(batch).logits, 0.1, 0.3, "relu", "max")
    assert log == lenet_launches(batch, training=False, variants=be.default_variants)


@sim
def test_sim_lenet_step_matches_numpy():
    """One whole LeNet-5 step (batch 2) through the protocol on numba and numpy."""
    from lenet_gpu.backends.numpy_backend import NumpyBackend
    from tests.parity import assert_close

    rigs = [H.StepRig(b, net="lenet", n=4, batch=2, act="tanh", mode="max") for b in
            (_sim_backend(), NumpyBackend(threads=1))]
    for r in rigs:
        r.step()
    a, b = (r.snapshot() for r in rigs)
    np.testing.assert_array_equal(a["state"], b["state"])
    assert_close(a["stats"][0], b["stats"][0], 1e-5, 1e-5, "stats")
    assert_close(a["grads"], b["grads"], 1e-6, 1e-4, "gradients")
    # Adam's first step moves a weight by lr·g/(|g| + eps): where g is within a few eps of 0, float32
    # differences in g move it by up to lr (2e-3); 1e-5 is 0.5% of a step
    assert_close(a["params"], b["params"], 1e-5, 1e-4, "parameters")


# ------------------------------------------------------------------------------- GPU: same checks

gpu = pytest.mark.gpu
GPU_BATCHES = (1, 3, 64)


@pytest.fixture(scope="module")
def gbe():
    return NumbaBackend()


@gpu
@pytest.mark.parametrize("n", GPU_BATCHES)
def test_gpu_batch_prepare(gbe, n):
    for case in BATCH_CASES:
        _, _, offset, seed, epoch, shift = case
        H.check_batch_prepare(gbe, n + 5, n, offset, seed=seed, epoch=epoch, shift=shift)


@gpu
@pytest.mark.parametrize("seed,epoch,shift", SHIFT_CASES)
def test_gpu_augment_shift_is_the_reference_hash(seed, epoch, shift):
    idx = np.r_[0:60000:7, 2**31 - 1, 2**31 - 2, 65535, 65536]
    H.check_augment_shift(seed, epoch, idx, shift)


@gpu
def test_gpu_step_advance(gbe):
    H.check_step_advance(gbe, 64, step=41, step_in_epoch=2, offset=128, epoch=6, steps_per_epoch=3)
    H.check_step_advance(gbe, 64, step=0, steps_per_epoch=5)


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", GPU_BATCHES)
@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_gpu_conv2d(gbe, variant, n, act):
    for xs, ws in (((n, 1, 32, 32), (6, 1, 5, 5)), ((n, 6, 14, 14), (16, 6, 5, 5)), ((n, 3, 7, 9), (5, 3, 3, 2))):
        H.check_conv2d_fwd(gbe, xs, ws, act, variant)
        if act == "identity":
            H.check_conv2d_bwd_data(gbe, xs, ws, "v1" if variant == "v1" else "v2")
            # dz of a mean loss is O(1/B): so scaled, batch 64's 50k-term sums stay within TOL
            for wv in gbe.variants["conv2d_bwd_weight"]:
                H.check_conv2d_bwd_weight(gbe, xs, ws, wv, dz_scale=1.0 / n)


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", GPU_BATCHES)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_gpu_conv2d_pool_fwd(gbe, variant, n, mode, act):
    for xs, ws in (((n, 1, 32, 32), (6, 1, 5, 5)), ((n, 6, 14, 14), (16, 6, 5, 5)), ((n, 3, 8, 10), (5, 3, 3, 2))):
        H.check_conv2d_pool_fwd(gbe, xs, ws, act, mode, variant)
    H.check_conv2d_pool_fwd(gbe, (n, 6, 14, 14), (16, 6, 5, 5), act, mode, variant, with_y=False)


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", GPU_BATCHES)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_gpu_conv2d_bwd_data_pool(gbe, variant, n, mode, act):
    for ys, ws in (((n, 6, 28, 28), (16, 6, 5, 5)), ((n, 3, 9, 11), (2, 3, 2, 3)), ((n, 9, 7, 6), (2, 9, 2, 2))):
        H.check_conv2d_bwd_data_pool(gbe, ys, ws, mode, act, variant)


@gpu
@pytest.mark.parametrize("n", (1, 64, 1024))
def test_gpu_conv2d_bwd_weight_v3_repeats_bit_for_bit(gbe, n):
    """Many splits (C1 at batch 1024: about a wave of blocks), launched repeatedly at new and equal STEPs:
    the same bits every time (fixed-order sum whichever block is last) and within TOL of v1."""
    from tests.parity import TOL, assert_close, nan_like, rand

    hx, hdz = rand((n, 1, 32, 32), 1), rand((n, 6, 28, 28), 2, 1.0 / n)
    _, rdw, rdb = R.conv2d_bwd(hx.astype(F64), np.zeros((6, 1, 5, 5)), np.zeros(hdz.shape), hdz.astype(F64),
                               "identity")
    x, dz = gbe.to_device(hx), gbe.to_device(hdz)
    outs = []
    for variant, step in (("v1", 0), ("v3", 5), ("v3", 5), ("v3", 6)):
        dw, db = gbe.to_device(nan_like((6, 1, 5, 5))), gbe.to_device(nan_like((6,)))  # unwritten elements show
        gbe.conv2d_bwd_weight(x, dz, dw, db, gbe.to_device(H.state_array(step=step)), variant=variant)
        outs.append((gbe.to_host(dw), gbe.to_host(db)))
    for variant, (dw, db) in zip(("v1", "v3"), outs):  # each against the float64 reference, not v3 against v1
        assert_close(dw, rdw, *TOL["conv2d_bwd_weight"], f"{variant} n={n}: dw")
        assert_close(db, rdb, *TOL["conv2d_bwd_weight"], f"{variant} n={n}: db")
    for o in outs[2:]:
        np.testing.assert_array_equal(o[0], outs[1][0])
        np.testing.assert_array_equal(o[1], outs[1][1])


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", GPU_BATCHES)
def test_gpu_pool2x2(gbe, n, mode, act):
    for xs in ((n, 6, 28, 28), (n, 16, 10, 10), (n, 3, 7, 9)):
        if act == "relu":
            H.check_pool2x2_fwd(gbe, xs, mode, "v1")
        H.check_pool2x2_bwd(gbe, xs, mode, act, "v1")


@gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", GPU_BATCHES)
def test_gpu_dense(gbe, n, act):
    for i, o in ((400, 120), (120, 84), (84, 10), (37, 19)):
        for variant in ("v1", "v2"):
            H.check_dense_fwd(gbe, n, i, o, act, variant)
        for variant in ("v1", "v2"):
            H.check_dense_bwd(gbe, n, i, o, act, True, variant)
            H.check_dense_bwd(gbe, n, i, o, act, False, variant)


@gpu
@pytest.mark.parametrize("n", GPU_BATCHES + (300,))
def test_gpu_softmax_xent(gbe, n):
    H.check_softmax_xent(gbe, n, 10, "v1")


@gpu
@pytest.mark.parametrize("step,sched_base", H.SCHED_CASES if H else [])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_gpu_optimizers(gbe, wd, step, sched_base):
    H.check_adam_step(gbe, 62080, wd, "v1", step=step, sched_base=sched_base)
    H.check_sgd_step(gbe, 62080, wd, "v1", step=step, sched_base=sched_base)


GPU_RIG = dict(net="lenet", n=256, batch=64, shift=2, epoch=3)  # an epoch every 4 steps


@gpu
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gpu_lenet_steps_match_numpy_and_repeat(optimizer):
    """Three LeNet-5 steps (batch 64) on numba, fused and unfused, against numpy; two numba runs repeat
    bit for bit."""
    from lenet_gpu.backends.numpy_backend import NumpyBackend
    from tests.parity import assert_close

    backends = (NumbaBackend(), NumpyBackend(), NumbaBackend(), NumbaBackend(fuse_conv_pool=False))
    rigs = [H.StepRig(b, optimizer=optimizer, **GPU_RIG) for b in backends]
    for k in range(3):
        for r in rigs:
            r.step()
        snaps = [r.snapshot() for r in rigs]
        for i in (0, 3):
            np.testing.assert_array_equal(snaps[i]["state"], snaps[1]["state"])
            assert_close(snaps[i]["stats"][: k + 1], snaps[1]["stats"][: k + 1], 1e-4, 1e-5, f"stats, step {k}")
            assert_close(snaps[i]["params"], snaps[1]["params"], 1e-5, 1e-4, f"parameters after step {k}")
        H.assert_snapshots_equal(snaps[0], snaps[2], f"two numba runs, step {k}")


@gpu
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_step_counters_and_record(fused):
    """A step is 16 launches (19 unfused) and nothing else, eager or replayed; a recorded step replays
    bit for bit what eager steps compute."""
    eager, rec = (H.StepRig(NumbaBackend(fuse_conv_pool=fused, fuse_bwd_data_pool=fused), **GPU_RIG) for _ in range(2))
    eager.step()  # warm-up: compiles
    replay = rec.be.record(rec.step)
    replay()  # records
    launches = 16 if fused else 19
    for k in range(5):
        for r, fn in ((eager, eager.step), (rec, replay)):
            before = r.be.counters.snapshot()
            fn()
            assert r.be.counters.since(before) == {"launches": launches, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
        H.assert_snapshots_equal(eager.snapshot(), rec.snapshot(), f"recorded vs eager, step {k + 2}")


@gpu
@pytest.mark.parametrize("k", [1, 3])
def test_gpu_graph_replays_the_eager_steps_bit_for_bit(k):
    """K graph-replayed steps equal K eager steps bit for bit, across an epoch boundary; two graph runs
    repeat bit for bit; the graph's launches count."""
    rigs = [H.StepRig(NumbaBackend(), **GPU_RIG) for _ in range(3)]
    for r in rigs:
        r.step()  # warm-up (compiles), the same first step for all
    eager, graphs = rigs[0], rigs[1:]
    fns = []
    for r in graphs:
        g = r.be.graph(r.be.record(r.step), k)
        assert g is not None, "numba backend: graph capture unavailable on a GPU"
        fns.append(g)
    for rounds in range(3):
        for _ in range(k):
            eager.step()
        for r, g in zip(graphs, fns):
            before = r.be.counters.snapshot()
            g()
            assert r.be.counters.since(before) == {"launches": 16 * k, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
        want = eager.snapshot()
        H.assert_snapshots_equal(want, graphs[0].snapshot(), f"graph of {k} steps, round {rounds}")
        H.assert_snapshots_equal(want, graphs[1].snapshot(), f"second graph run, round {rounds}")


@gpu
def test_gpu_record_and_graph_dispatch_figures(capsys):
    """Host µs per launch: Numba's launch, a recorded replay, a graph (printed for the report; the replay
    must be cheaper than Numba's launch)."""
    figures = H.dispatch_figures(NumbaBackend(), repeats=200)
    with capsys.disabled():
        print("\nnumba dispatch, host µs:", {k: round(v, 2) for k, v in figures.items()})
    assert figures["record_per_launch"] < figures["numba_per_launch"]


@gpu
def test_gpu_kernel_times(capsys):
    """Device µs of every launch of a training step, the defaults against the previous defaults (v2 weight
    gradients, unfused backward through the pooling) at batch 64, 128 and 256 (printed for the report)."""
    for batch in (64, 128, 256):
        for label, be in (("default", NumbaBackend()), ("previous", _previous_defaults())):
            t = H.kernel_times(be, batch)
            with capsys.disabled():
                print(f"\n{label} batch {batch}: step {t['step_us']} us;", t["launches"])
            assert t["step_us"] > 0


def _previous_defaults():
    be = NumbaBackend(fuse_bwd_data_pool=False)
    be.default_variants["conv2d_bwd_weight"] = "v2"
    return be
