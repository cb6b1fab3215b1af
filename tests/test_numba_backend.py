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
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ROOT = Path(__file__).resolve().parent.parent

sim = pytest.mark.skipif(not SIM, reason="runs inside test_simulator_suite's NUMBA_ENABLE_CUDASIM=1 subprocess")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

if SIM:
    # the simulator's block manager busy-polls its threads at every syncthreads; a short switch
    # interval hands the GIL over sooner (about 2x faster kernels with barriers)
    sys.setswitchinterval(1e-4)


# ------------------------------------------------------------------------------------- main process


@pytest.mark.sim
def test_simulator_suite():
    """Run the sim_* tests of this file in a subprocess with the CUDA simulator on."""
    if SIM:
        pytest.skip("this is the simulator run")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
           "-k", "sim_", "--durations=8", "-o", "addopts=", "-W", "ignore::DeprecationWarning"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800, check=False)
    out = res.stdout[-30000:] + ("\n--- stderr ---\n" + res.stderr[-5000:] if res.stderr.strip() else "")
    assert res.returncode == 0, f"simulator suite failed (exit {res.returncode}):\n{out}"
    assert " passed" in res.stdout and " failed" not in res.stdout, out
    print(out)


@pytest.mark.skipif(SIM, reason="needs the real CUDA driver check")
def test_unavailable_without_gpu_is_one_clear_line():
    from lenet_gpu.backends import BackendUnavailable, get_backend

    try:
        from numba import cuda
    except ImportError:
        pytest.skip("numba is not installed")
    if cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable) as e:
        get_backend("numba")
    msg = str(e.value)
    assert "\n" not in msg and "--backend numpy" in msg and "NUMBA_ENABLE_CUDASIM=1" in msg
    assert get_backend("auto").name != "numba"


# -------------------------------------------------------------------------------- simulator: setup

try:
    from lenet_gpu.backends.numba_backend import NumbaBackend
    from tests import numba_helpers as H
except ImportError:  # numba not installed: test_unavailable... and the skips still run
    NumbaBackend = H = None

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


@sim
def test_sim_backend_facts(be):
    from lenet_gpu.backends import get_backend
    from lenet_gpu.backends.base import OPS, OPTIONAL_OPS, Backend

    assert isinstance(be, Backend)
    assert be.name == "numba" and be.is_gpu is False
    assert set(be.variants) == set(OPS) | set(OPTIONAL_OPS)  # conv2d_pool_fwd: the model fuses
    for op in OPS:
        assert be.default_variants[op] in be.variants[op]
    for op in ("conv2d_fwd", "conv2d_bwd_weight", "dense_fwd"):
        assert len(be.variants[op]) >= 2 and be.default_variants[op] != "v1"
    assert get_backend("numba").name == "numba"
    assert get_backend("auto").name != "numba"  # the simulator is not a GPU
    assert be.graph(print) is print


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
    with pytest.raises(IndexError):
        be.batch_prepare(be.zeros((3, 28, 28), np.uint8), be.zeros((3,), np.uint8), be.zeros((3,), np.int32), 2,
                         be.empty((2, 1, 32, 32)), be.empty((2,), np.int32), 0.0, 1.0)


@sim
@pytest.mark.parametrize("n,b,offset", [(7, 3, 2), (4, 1, 3)])
def test_sim_batch_prepare(be, n, b, offset):
    H.check_batch_prepare(be, n, b, offset)


# conv shapes: (x shape, w shape), odd sizes, a non-square filter, batch 1
CONV_SHAPES = [((2, 3, 7, 9), (5, 3, 3, 2)), ((1, 2, 6, 5), (9, 2, 2, 3))]


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
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
@pytest.mark.parametrize("variant", ["v1", "v2"])
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
@pytest.mark.parametrize("shapes", [((2, 2, 5, 6), (3, 2, 2, 3)), ((1, 1, 6, 7), (2, 1, 3, 3))])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sim_conv2d_bwd_weight(be, variant, shapes):
    H.check_conv2d_bwd_weight(be, *shapes, variant)


@sim
def test_sim_conv2d_bwd_weight_one_block_many_items(be1):
    # K=2 × ceil((1·3·3 + 1)/BW_COLS=8) = 2 column chunks: one block reduces all 4 items in turn
    H.check_conv2d_bwd_weight(be1, (1, 1, 4, 5), (2, 1, 3, 3), "v2")


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
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sim_dense_fwd(be, variant, act):
    H.check_dense_fwd(be, *DENSE_SHAPES[ACTS.index(act) % 2], act, variant)


@sim
def test_sim_dense_fwd_one_block_many_tiles(be1):
    H.check_dense_fwd(be1, 17, 5, 18, "sigmoid", "v2")  # 2 × 2 tiles of 16, one block


@sim
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_dx", [True, False])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sim_dense_bwd(be, variant, act, with_dx):
    if variant != "v1" and not with_dx and act != "sigmoid":
        pytest.skip("tiled variants: every activation with dx, one without (barriers are slow here)")
    H.check_dense_bwd(be, *DENSE_SHAPES[ACTS.index(act) % 2], act, with_dx, variant)


@sim
def test_sim_dense_bwd_one_block_many_tiles(be1):
    # 17 rows, 16 inputs (+ the bias column: 2 column tiles), 18 outputs: 2·1 dx + 2·2 dw tiles
    H.check_dense_bwd(be1, 17, 16, 18, "relu", True, "v2")


@sim
@pytest.mark.parametrize("n,ncls", [(5, 10), (1, 3), (131, 4)])
def test_sim_softmax_xent(be, n, ncls):
    H.check_softmax_xent(be, n, ncls, "v1")  # 131 rows > 128 threads: a thread owns two rows


@sim
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sim_optimizers(be, wd):
    H.check_adam_step(be, 37, wd, "v1")
    H.check_sgd_step(be, 37, wd, "v1")


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


@sim
def test_sim_three_training_steps_match_numpy():
    from lenet_gpu.data import load_dataset
    from lenet_gpu.model import LeNet5
    from tests.parity import assert_close

    ds = load_dataset("mnist-sample")
    models = [LeNet5(backend=b, seed=3) for b in (_sim_backend(), "numpy")]
    for step in range(3):
        im, lab = ds.train_images[2 * step : 2 * step + 2], ds.train_labels[2 * step : 2 * step + 2]
        losses = [m.train_step(im, lab) for m in models]
        assert_close(losses[0], losses[1], 1e-6, 1e-5, f"loss at step {step}")
        # Adam moves every weight by about lr·sign(m): 1e-5 is 1% of one step
        assert_close(models[0].parameters(), models[1].parameters(), 1e-5, 1e-4, f"parameters after step {step}")


@sim
@pytest.mark.parametrize("fused", [True, False])
def test_sim_step_counters(fused):
    """After one warm-up step, a device-resident step is 16 launches (18 without the fused
    conv2d_pool_fwd) and nothing else; the device-resident path (tanh, avg pooling, SGD with weight
    decay) matches the numpy backend."""
    from lenet_gpu.data import load_dataset
    from lenet_gpu.model import LeNet5
    from tests.parity import assert_close

    ds = load_dataset("mnist-sample")
    be = _sim_backend(fused)
    opts = dict(seed=5, activation="tanh", pool="avg", optimizer="sgd", lr=0.05, weight_decay=1e-3)
    models = [LeNet5(backend=be, **opts), LeNet5(backend="numpy", **opts)]
    datas = [m.upload_dataset(ds.train_images[:6], ds.train_labels[:6]) for m in models]
    for m, d in zip(models, datas):
        m.begin_epoch(d, np.array([4, 1, 5, 0, 2, 3], np.int32))
        m.step(d, 0, 1)  # warm-up: allocates the workspace of batch 1
    before = be.counters.snapshot()
    models[0].step(datas[0], 1, 1)
    # batch 1 + forward 5 (2 fused conv+pool, 3 dense; 7 unfused: conv, pool, conv, pool, 3 dense) +
    # softmax 1 + backward 8 (3 dense, 2 pool, 2 conv weight, 1 conv data) + optimizer 1
    launches = 16 if fused else 18
    assert be.counters.since(before) == {"launches": launches, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
    models[1].step(datas[1], 1, 1)
    stats = [m.read_stats() for m in models]
    assert_close(stats[0][0], stats[1][0], 1e-6, 1e-5, "loss sum of two steps")
    assert stats[0][1] == stats[1][1]
    assert_close(models[0].parameters(), models[1].parameters(), 1e-6, 1e-4, "parameters after two SGD steps")


# ------------------------------------------------------------------------------- GPU: same checks

gpu = pytest.mark.gpu
GPU_BATCHES = (1, 3, 64)


@pytest.fixture(scope="module")
def gbe():
    return NumbaBackend()


@gpu
@pytest.mark.parametrize("n", GPU_BATCHES)
def test_gpu_batch_prepare(gbe, n):
    H.check_batch_prepare(gbe, n + 5, n, 5)


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
            H.check_conv2d_bwd_weight(gbe, xs, ws, "v1" if variant == "v1" else "v2", dz_scale=1.0 / n)


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
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_gpu_optimizers(gbe, wd):
    H.check_adam_step(gbe, 62080, wd, "v1")
    H.check_sgd_step(gbe, 62080, wd, "v1")


@gpu
@pytest.mark.parametrize("n", (3, 64))
def test_gpu_training_steps_match_numpy_and_repeat(n):
    from lenet_gpu.data import load_dataset
    from lenet_gpu.model import LeNet5
    from tests.parity import assert_close

    ds = load_dataset("mnist-sample")
    backends = (NumbaBackend(), "numpy", NumbaBackend(), NumbaBackend(fuse_conv_pool=False))
    models = [LeNet5(backend=b, seed=3) for b in backends]
    for step in range(3):
        im, lab = ds.train_images[n * step : n * (step + 1)], ds.train_labels[n * step : n * (step + 1)]
        losses = [m.train_step(im, lab) for m in models]
        assert_close(losses[0], losses[1], 1e-6, 1e-5, f"loss at step {step}")
        p = [m.parameters() for m in models]
        assert_close(p[0], p[1], 1e-5, 1e-4, f"parameters after step {step}")
        np.testing.assert_array_equal(p[0], p[2])  # bit-for-bit repeatable
        assert_close(p[3], p[1], 1e-5, 1e-4, f"unfused path: parameters after step {step}")


@gpu
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_step_counters(fused):
    from lenet_gpu.data import load_dataset
    from lenet_gpu.model import LeNet5

    ds = load_dataset("mnist-sample")
    be = NumbaBackend(fuse_conv_pool=fused)
    model = LeNet5(backend=be, seed=0)
    data = model.upload_dataset(ds.train_images[:256], ds.train_labels[:256])
    model.begin_epoch(data, np.arange(256, dtype=np.int32))
    model.step(data, 0, 64)
    before = be.counters.snapshot()
    model.step(data, 64, 64)
    launches = 16 if fused else 18
    assert be.counters.since(before) == {"launches": launches, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
