"""The cupy backend: op parity (every op × variant × activation × pool mode, LeNet sizes at batch 1, 3, 8
and odd sizes), whole-step parity against the numpy backend, per-step counters, graph-capture rules,
launch shapes, and the BackendUnavailable messages.

Where the tests run:
- ``cupy-host`` (the CPU harness) tests run in a child pytest process started by
  ``test_host_suite_in_subprocess``: a wild pointer in a kernel kills the process that runs it, and the
  child's crash is then reported as this test's failure with the child's output. The child sees
  ``LENET_CUPY_HOST_CHILD=1`` and parametrizes the same tests over ``cupy-host`` only.
  ``CUDACPU_SANITIZE=address|thread pytest tests/test_cupy_backend.py -k host`` runs them under a sanitizer
  (the child gets the sanitizer runtime preloaded); ``LENET_CUPY_HOST_K=expr`` narrows the child's selection.
  Running the child directly: ``LENET_CUPY_HOST_CHILD=1 pytest tests/test_cupy_backend.py``.
- ``cupy`` (a real GPU) tests are marked ``gpu`` and run in-process; conftest skips them without a device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.backends import BackendUnavailable, get_backend
from lenet_gpu.backends.cupy_backend import DEFAULT_VARIANTS, OP_KERNELS, CupyBackend, launch_plan
from lenet_gpu.reference import ACTIVATIONS
from tests import cupy_helpers as H

CHILD_ENV = "LENET_CUPY_HOST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
ROOT = Path(__file__).resolve().parent.parent

BACKENDS = ["cupy-host"] if IN_CHILD else [pytest.param("cupy", marks=pytest.mark.gpu)]
parent_only = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process")
MODES = ("max", "avg")


def variants(op: str) -> tuple[str, ...]:
    return OP_KERNELS[op][1]


_BACKENDS: dict[str, object] = {}


@pytest.fixture(params=BACKENDS)
def be(request):
    name = request.param
    if name not in _BACKENDS:  # one backend per process: modules compile once
        _BACKENDS[name] = get_backend(name)
    return _BACKENDS[name]


# ------------------------------------------------------------------------------------ the child process
@parent_only
def test_host_suite_in_subprocess():
    """Run every cupy-host test in a child process, so a crash in a kernel is a reported failure."""
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    kind = os.environ.get("CUDACPU_SANITIZE", "")
    if kind in ("address", "thread"):
        from lenet_gpu.harness.cudacpu import sanitizer_env

        env = sanitizer_env(kind, env)
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    if os.environ.get("LENET_CUPY_HOST_K"):
        cmd += ["-k", os.environ["LENET_CUPY_HOST_K"]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    print(out[-4000:])
    assert r.returncode == 0, f"cupy-host child pytest exited with {r.returncode}:\n{out[-12000:]}"


# ------------------------------------------------------------------------------------------ op parity
LENET_CONV = [((1, 1, 32, 32), (6, 1, 5, 5)), ((3, 6, 14, 14), (16, 6, 5, 5)), ((8, 1, 32, 32), (6, 1, 5, 5))]
ODD_CONV = [
    ((2, 3, 13, 11), (5, 3, 3, 4)),  # K not a multiple of K_BLOCK, R != S
    ((1, 2, 7, 40), (9, 2, 2, 3)),  # a row longer than a warp, more filters than K_BLOCK
    ((3, 10, 6, 5), (2, 10, 1, 1)),  # 1x1 filter, many channels
]


@pytest.mark.parametrize("variant", variants("conv2d_fwd"))
@pytest.mark.parametrize("xs,ws", LENET_CONV + ODD_CONV)
def test_conv2d_fwd_shapes(be, variant, xs, ws):
    H.check_conv2d_fwd(be, variant, xs, ws, "tanh")


@pytest.mark.parametrize("variant", variants("conv2d_fwd"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_conv2d_fwd_acts(be, variant, act):
    H.check_conv2d_fwd(be, variant, (2, 6, 14, 14), (16, 6, 5, 5), act, seed=3)


POOL_CONV = [
    ((1, 1, 32, 32), (6, 1, 5, 5)),  # C1+S2
    ((3, 6, 14, 14), (16, 6, 5, 5)),  # C3+S4
    ((2, 3, 12, 11), (5, 3, 3, 3)),  # conv output 10x9: odd width
    ((1, 2, 10, 9), (9, 2, 2, 2)),  # conv output 9x8: odd height, K > K_BLOCK
]


@pytest.mark.parametrize("variant", variants("conv2d_pool_fwd"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("xs,ws", POOL_CONV)
def test_conv2d_pool_fwd_shapes(be, variant, mode, xs, ws):
    H.check_conv2d_pool_fwd(be, variant, xs, ws, "relu", mode)


@pytest.mark.parametrize("variant", variants("conv2d_pool_fwd"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_conv2d_pool_fwd_acts(be, variant, act):
    H.check_conv2d_pool_fwd(be, variant, (2, 3, 11, 12), (7, 3, 3, 3), act, "max", seed=5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("xs", [(1, 6, 28, 28), (3, 16, 10, 10), (8, 6, 28, 28), (2, 3, 7, 9)])
def test_pool2x2_fwd(be, mode, xs):
    for v in variants("pool2x2_fwd"):
        H.check_pool2x2_fwd(be, v, xs, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_pool2x2_bwd_acts(be, mode, act):
    for v in variants("pool2x2_bwd"):
        H.check_pool2x2_bwd(be, v, (2, 3, 10, 10), mode, act)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zs", [(1, 6, 28, 28), (3, 16, 10, 10), (8, 16, 10, 10), (2, 3, 7, 9)])
def test_pool2x2_bwd_shapes(be, mode, zs):
    for v in variants("pool2x2_bwd"):
        H.check_pool2x2_bwd(be, v, zs, mode, "relu")


DENSE = [(1, 400, 120), (3, 120, 84), (8, 84, 10), (8, 400, 120), (37, 29, 45), (70, 3, 130), (5, 33, 1)]


@pytest.mark.parametrize("variant", variants("dense_fwd"))
@pytest.mark.parametrize("n,i,o", DENSE)
def test_dense_fwd_shapes(be, variant, n, i, o):
    if variant == "v3" and n * o > 1000 and not be.is_gpu:
        pytest.skip("v3 (a warp per output, for small batches) at this size is slow on the CPU harness")
    H.check_dense_fwd(be, variant, n, i, o, "relu")


@pytest.mark.parametrize("variant", variants("dense_fwd"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_fwd_acts(be, variant, act):
    H.check_dense_fwd(be, variant, 3, 120, 84, act, seed=2)


@pytest.mark.parametrize("variant", variants("dense_bwd"))
@pytest.mark.parametrize("n,i,o", DENSE)
@pytest.mark.parametrize("with_dx", [True, False])
def test_dense_bwd_shapes(be, variant, n, i, o, with_dx):
    H.check_dense_bwd(be, variant, n, i, o, "tanh", with_dx)


@pytest.mark.parametrize("variant", variants("dense_bwd"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_bwd_acts(be, variant, act):
    H.check_dense_bwd(be, variant, 3, 84, 10, act, True, seed=4)


@pytest.mark.parametrize("variant", variants("conv2d_bwd_data"))
@pytest.mark.parametrize("xs,ws", LENET_CONV + ODD_CONV)
def test_conv2d_bwd_data(be, variant, xs, ws):
    H.check_conv2d_bwd_data(be, variant, xs, ws)


@pytest.mark.parametrize("variant", variants("conv2d_bwd_weight"))
@pytest.mark.parametrize("xs,ws", LENET_CONV + ODD_CONV)
def test_conv2d_bwd_weight(be, variant, xs, ws):
    H.check_conv2d_bwd_weight(be, variant, xs, ws)


@pytest.mark.parametrize("variant", variants("conv2d_bwd_weight"))
def test_conv2d_bwd_weight_is_deterministic(be, variant):
    a = H.check_conv2d_bwd_weight(be, variant, (3, 3, 12, 9), (5, 3, 3, 3), seed=7)
    b = H.check_conv2d_bwd_weight(be, variant, (3, 3, 12, 9), (5, 3, 3, 3), seed=7)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


@pytest.mark.parametrize("n,nc", [(1, 10), (3, 10), (8, 10), (300, 10), (5, 7)])
def test_softmax_xent(be, n, nc):
    for v in variants("softmax_xent"):
        H.check_softmax_xent(be, v, n, nc)


@pytest.mark.parametrize("size", [1, 3, 1000, 61888])
def test_optimizers(be, size):
    for v in variants("adam_step"):
        H.check_adam(be, v, size)
    for v in variants("sgd_step"):
        H.check_sgd(be, v, size)


@pytest.mark.parametrize("n,b,offset", [(10, 1, 0), (10, 3, 7), (20, 8, 5)])
def test_batch_prepare(be, n, b, offset):
    for v in variants("batch_prepare"):
        H.check_batch_prepare(be, v, n, b, offset)


def test_batch_prepare_rejects_short_perm(be):
    x, y = be.empty((4, 1, 32, 32)), be.empty((4,), np.int32)
    imgs, labs = be.zeros((5, 28, 28), np.uint8), be.zeros((5,), np.uint8)
    perm = be.to_device(np.arange(5, dtype=np.int32))
    with pytest.raises(IndexError):
        be.batch_prepare(imgs, labs, perm, 2, x, y, 0.0, 1.0)


def test_wide_and_deep_shapes(be):
    """Rows longer than a block (the tile loops), many channels (several staged chunks), long reductions."""
    for v in variants("conv2d_fwd"):
        H.check_conv2d_fwd(be, v, (1, 2, 3, 1100), (3, 2, 2, 2), "relu")
        H.check_conv2d_fwd(be, v, (2, 300, 9, 9), (3, 300, 5, 5), "identity")
    for v in variants("conv2d_pool_fwd"):
        H.check_conv2d_pool_fwd(be, v, (1, 2, 3, 1100), (3, 2, 2, 2), "relu", "max")
        H.check_conv2d_pool_fwd(be, v, (1, 300, 9, 9), (3, 300, 4, 4), "relu", "avg")
    for v in variants("conv2d_bwd_data"):
        H.check_conv2d_bwd_data(be, v, (1, 7, 3, 300), (5, 7, 2, 3))
        H.check_conv2d_bwd_data(be, v, (1, 3, 9, 9), (300, 3, 5, 5))
    for v in variants("conv2d_bwd_weight"):
        H.check_conv2d_bwd_weight(be, v, (2, 300, 9, 9), (3, 300, 5, 5))
        H.check_conv2d_bwd_weight(be, v, (33, 1, 12, 12), (2, 1, 3, 3))
    for v in variants("dense_fwd"):
        H.check_dense_fwd(be, v, 1, 2000, 7, "tanh")
    for v in variants("dense_bwd"):
        H.check_dense_bwd(be, v, 9, 1001, 3, "sigmoid", True)
    for v in variants("softmax_xent"):
        H.check_softmax_xent(be, v, 1000, 3)


# ------------------------------------------------------------------- other compile-time parameters
ALT_DEFINES = {
    "conv2d": {"K_BLOCK": 4, "C_BLOCK": 4, "J_BLOCK": 3, "BWD_THREADS": 64},
    "dense": {"TILE_O": 8, "TILE_N": 4, "RN": 3, "TILE_I": 5, "VEC": 3},
    "loss": {"LOSS_THREADS": 32},
}


def test_other_compile_time_parameters(be):
    """The kernels are general in their UPPER_CASE parameters too, not only at the defaults."""
    alt = CupyBackend(host=not be.is_gpu, defines=ALT_DEFINES)
    be_packed = CupyBackend(host=not be.is_gpu, min_blocks=1)  # conv v2 packs small maps: imgs > 1
    for v in variants("conv2d_fwd"):
        H.check_conv2d_fwd(alt, v, (2, 6, 14, 14), (16, 6, 5, 5), "relu")
        H.check_conv2d_fwd(alt, v, (1, 2, 7, 40), (9, 2, 2, 3), "sigmoid")
    for v in variants("conv2d_fwd"):
        H.check_conv2d_fwd(be_packed, v, (3, 6, 14, 14), (16, 6, 5, 5), "relu")  # 2 maps per block, 1 left
    for v in variants("conv2d_pool_fwd"):
        H.check_conv2d_pool_fwd(alt, v, (1, 2, 10, 9), (9, 2, 2, 2), "tanh", "max")
        H.check_conv2d_pool_fwd(be_packed, v, (11, 6, 14, 14), (16, 6, 5, 5), "relu", "max")  # 10 + 1 maps
    for v in variants("conv2d_bwd_data"):
        H.check_conv2d_bwd_data(alt, v, (3, 6, 14, 14), (16, 6, 5, 5))  # C_BLOCK 4: a partial channel block
    for v in variants("conv2d_bwd_weight"):
        H.check_conv2d_bwd_weight(alt, v, (2, 6, 14, 14), (16, 6, 5, 5))
        H.check_conv2d_bwd_weight(alt, v, (8, 1, 32, 32), (6, 1, 5, 5))  # v3: 8 batch splits
    for v in variants("dense_fwd"):
        H.check_dense_fwd(alt, v, 37, 29, 45, "relu")
    for v in variants("dense_bwd"):
        H.check_dense_bwd(alt, v, 5, 29, 7, "tanh", True)
    for v in variants("softmax_xent"):
        H.check_softmax_xent(alt, v, 70, 10)  # LOSS_THREADS 32: 3 blocks for v2


# ------------------------------------------------------------------------------ whole training steps
def _models(be, optimizer: str, fused: bool, act: str, pool: str):
    from lenet_gpu.model import LeNet5

    kw = dict(activation=act, pool=pool, seed=1, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    if not fused:
        be = CupyBackend(host=not be.is_gpu, fused=False)
    return LeNet5(backend=be, **kw), LeNet5(backend="numpy", **kw)


@pytest.mark.parametrize(
    "optimizer,fused,act,pool",
    [("sgd", True, "relu", "max"), ("adam", False, "tanh", "avg"), ("sgd", False, "sigmoid", "max"),
     ("adam", True, "lecun_tanh", "avg")],
)
def test_training_steps_match_numpy(be, optimizer, fused, act, pool):
    """3 device-resident steps (batch 2) on the cupy backend and on the numpy backend: the parameters
    agree after every step."""
    from lenet_gpu.data import load_dataset

    batch = 2
    ds = load_dataset("mnist-sample")
    images, labels = ds.train_images[:12], ds.train_labels[:12]
    cu, ref = _models(be, optimizer, fused, act, pool)
    perm = np.random.default_rng(0).permutation(12).astype(np.int32)
    datas = [m.upload_dataset(images, labels) for m in (cu, ref)]
    for m, dd in zip((cu, ref), datas):
        m.begin_epoch(dd, perm)
    for step in range(3):
        for m, dd in zip((cu, ref), datas):
            m.step(dd, step * batch, batch)
        H.assert_close(cu.parameters(), ref.parameters(), 2e-5, 2e-4, what=f"parameters after step {step + 1}")
    (l1, c1), (l2, c2) = cu.read_stats(), ref.read_stats()
    assert c1 == c2
    assert abs(l1 - l2) <= 1e-4 * max(1.0, abs(l2))


@pytest.mark.parametrize("fused,expected,optimizer", [(True, 16, "adam"), (False, 18, "sgd")])
def test_step_counters(be, fused, expected, optimizer):
    """After warm-up a step is launches only: 1 gather + 7 (5 fused) forward + 1 loss + 8 backward +
    1 optimizer, and no allocation, copy or sync."""
    from lenet_gpu.model import LeNet5

    b = be if fused else CupyBackend(host=not be.is_gpu, fused=False)
    assert ("conv2d_pool_fwd" in b.variants) == fused
    model = LeNet5(backend=b, optimizer=optimizer)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=8).astype(np.uint8)
    data = model.upload_dataset(images, labels)
    model.begin_epoch(data, np.arange(8, dtype=np.int32))
    model.step(data, 0, 2)  # warm-up: workspace, compile, graph capture on a GPU
    model.step(data, 2, 2)
    before = b.counters.snapshot()
    model.step(data, 4, 2)
    delta = b.counters.since(before)
    assert delta == {"launches": expected, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}


def test_graph_forbids_copies_allocations_syncs(be):
    """What ``graph`` captures may only launch: the host runtime raises where CUDA capture would fail."""
    if be.is_gpu:
        pytest.skip("the host runtime's capture check")
    buf = be.empty((4,))
    for bad in (lambda: be.empty((4,)), lambda: be.to_host(buf), be.synchronize,
                lambda: be.upload(buf, np.zeros(4, np.float32))):
        fn = be.graph(bad)
        fn()  # warm-up call runs eagerly
        with pytest.raises(RuntimeError, match="captured graph"):
            fn()
    ok = be.graph(lambda: be.sgd_step(buf, buf, buf, 0.0, 0.0, 0.0))
    ok()
    ok()


def test_python_scalars_are_rejected(be):
    k = be.runtime.get_kernel("optim", "sgd_step_v1")
    p = be.zeros((4,))
    with pytest.raises(TypeError, match="np.int32"):
        be.runtime.launch(k, (1, 1, 1), (32, 1, 1), (p, p, p, 4, np.float32(0), np.float32(0), np.float32(0)))


# --------------------------------------------------------------------------------- no device needed
@parent_only
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 64, 255, 256, 1000, 4096])
def test_launch_shapes_at_lenet_sizes(batch):
    """Every launch at LeNet sizes is legal (block ≤ 1024, grid within limits, smem ≤ 48 KiB) and at
    batch ≥ 256 the big ops launch enough blocks to fill a GPU (≥ 132 SMs)."""
    layers = [dict(N=batch, C=1, H=32, W=32, K=6, R=5, S=5), dict(N=batch, C=6, H=14, W=14, K=16, R=5, S=5)]
    plans = []
    for op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"):
        for v in variants(op):
            plans += [(op, v, launch_plan(op, v, s)) for s in layers]
    for op, v in (("dense_fwd", v) for v in variants("dense_fwd")):
        plans += [(op, v, launch_plan(op, v, dict(N=batch, I=i, O=o))) for i, o in ((400, 120), (120, 84), (84, 10))]
    plans.append(("dense_bwd", "v1", launch_plan("dense_bwd", "v1", dict(N=batch, I=400, O=120))))
    plans.append(("pool2x2_fwd", "v1", launch_plan("pool2x2_fwd", "v1", dict(NC=batch * 6, H=28, W=28))))
    plans.append(("pool2x2_bwd", "v1", launch_plan("pool2x2_bwd", "v1", dict(NC=batch * 6, H=28, W=28))))
    plans.append(("batch_prepare", "v1", launch_plan("batch_prepare", "v1", dict(B=batch, XH=32, XW=32))))
    plans.append(("softmax_xent", "v1", launch_plan("softmax_xent", "v1", dict(N=batch))))
    plans.append(("adam_step", "v1", launch_plan("adam_step", "v1", dict(n=61888))))
    for op, v, p in plans:
        threads = p.block[0] * p.block[1] * p.block[2]
        assert 1 <= threads <= 1024 and threads % 32 == 0, (op, v, p)
        assert p.grid[0] < 2**31 and p.grid[1] <= 65535 and p.grid[2] <= 65535, (op, v, p)
        assert p.shared_mem <= 48 * 1024, (op, v, p)
        if batch >= 256 and op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "pool2x2_fwd"):
            assert p.grid[0] * p.grid[1] >= 132, (op, v, p)


@parent_only
def test_defaults_are_listed_variants():
    for op, v in DEFAULT_VARIANTS.items():
        assert v in OP_KERNELS[op][1]


@parent_only
def test_cupy_without_gpu_is_one_clear_line():
    from tests.conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable) as e:
        get_backend("cupy")
    msg = str(e.value)
    assert "\n" not in msg and "--backend numpy" in msg and "--backend cupy-host" in msg


@parent_only
def test_cupy_not_installed(monkeypatch):
    import lenet_gpu.backends.cupy_backend.runtime as rt

    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(BackendUnavailable) as e:
        rt.CupyRuntime()
    assert "\n" not in str(e.value) and "cuda12" in str(e.value)


@parent_only
@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_bit_for_bit():
    """On a GPU: training with the forward+backward captured as a CUDA graph gives exactly the parameters
    of eager launches (same kernels, same order, fixed-order reductions), and repeats bit for bit."""
    from lenet_gpu.model import LeNet5

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(256, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=256).astype(np.uint8)
    results = []
    for graphs in (True, False, True):
        model = LeNet5(backend=CupyBackend(graphs=graphs), seed=3)
        data = model.upload_dataset(images, labels)
        model.begin_epoch(data, np.arange(256, dtype=np.int32))
        for step in range(4):
            model.step(data, step * 64, 64)
        results.append((model.parameters(), model.read_stats()))
    for params, stats in results[1:]:
        assert np.array_equal(params, results[0][0])
        assert stats == results[0][1]
