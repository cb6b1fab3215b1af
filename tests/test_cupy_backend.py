"""The cupy backend: op parity (every op × variant × activation × pool mode, LeNet sizes at batch 1, 3, 8
and odd sizes), the step-state protocol (augmentation shifts bit for bit, stats rows, schedule rows,
step_advance), last-block tickets that survive poisoning, whole-step parity against the numpy backend,
per-step counters, record/replay, graph-capture rules, launch shapes, and the BackendUnavailable
messages.

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
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.backends import BackendUnavailable, get_backend
from lenet_gpu.backends.cupy_backend import DEFAULT_VARIANTS, OP_KERNELS, CupyBackend, launch_plan
from lenet_gpu.backends.cupy_backend.fused import VARIANTS as FUSED_VARIANTS
from lenet_gpu.reference import ACTIVATIONS
from tests import cupy_helpers as H
from tests import sim_child
from tests.host_child import check_host_suite, host_suite
from tests.matrix import check_matrix, matrix_ops

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
HOST_K = os.environ.get("LENET_CUPY_HOST_K", "")
HOST_SUITE = host_suite(__file__, CHILD_ENV, HOST_K)


@parent_only
@sim_child.early(*filter(None, [HOST_SUITE]))
def test_host_suite_in_subprocess():
    """Run every cupy-host test in a child process, so a crash in a kernel is a reported failure (started early, in
    the background; under a sanitizer, now)."""
    check_host_suite(HOST_SUITE, __file__, CHILD_ENV, "cupy backend", HOST_K, timeout=1200)


# ------------------------------------------------------------------ the activation × pool-mode matrix
#: every op of the kernel table that takes an activation or a pool mode, except the fused ops of fused.py, whose
#: matrix (every variant × activation × pool mode) tests/test_fused.py runs on the harness at LeNet sizes
MATRIX_OPS = [op for op in matrix_ops({op: vs for op, (_, vs) in OP_KERNELS.items()}) if op not in FUSED_VARIANTS]


@pytest.mark.parametrize("op", MATRIX_OPS)
def test_act_pool_matrix(be, op):
    """Every variant × activation × pool mode of ``op`` at the parity helper's cheapest shapes (tests/matrix.py)."""
    assert check_matrix(be, op) > 0


@pytest.mark.parametrize("variant", variants("dense_bwd"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_bwd_without_dx_acts(be, variant, act):
    H.check_dense_bwd(be, variant, 3, 84, 10, act, False, seed=8)


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


#: v3 (a warp per output, for small batches) on the harness (the child): every shape but the 9,100-warp one
#: (minutes there); (37, 29, 45) keeps it above n·o = 1000. On a GPU: every shape.
DENSE_FWD = [(v, *shape) for v in variants("dense_fwd") for shape in DENSE
             if not (IN_CHILD and v == "v3" and shape == (70, 3, 130))]


@pytest.mark.parametrize("variant,n,i,o", DENSE_FWD)
def test_dense_fwd_shapes(be, variant, n, i, o):
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


BWD_POOL = [
    ((1, 6, 28, 28), (16, 6, 5, 5)),  # LeNet C3 -> S2 -> C1, batch 1
    ((3, 6, 28, 28), (16, 6, 5, 5)),
    ((2, 3, 13, 11), (5, 3, 3, 2)),  # odd yconv: a trailing row and column in no window
    ((1, 7, 9, 12), (9, 7, 2, 3)),  # C not a multiple of any C_BLOCK, odd height
]


@pytest.mark.parametrize("variant", variants("conv2d_bwd_data_pool"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ys,ws", BWD_POOL)
def test_conv2d_bwd_data_pool(be, variant, mode, ys, ws):
    H.check_conv2d_bwd_data_pool(be, variant, ys, ws, mode, "relu")


@pytest.mark.parametrize("variant", variants("conv2d_bwd_data_pool"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_conv2d_bwd_data_pool_acts(be, variant, act):
    H.check_conv2d_bwd_data_pool(be, variant, (2, 3, 11, 10), (4, 3, 3, 3), "max", act, seed=6)


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


@pytest.mark.parametrize("rows,step_in_epoch", [(1, 0), (5, 4), (3, 7), (4, -1)])
def test_softmax_xent_stats_row(be, rows, step_in_epoch):
    """The row STEP_IN_EPOCH mod S is overwritten (a stale or negative word stays in bounds), others kept."""
    for v in variants("softmax_xent"):
        H.check_softmax_xent(be, v, 37, 10, rows=rows, step_in_epoch=step_in_epoch)


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


@pytest.mark.parametrize(
    "aug_seed,epoch,shift,offset,m",
    [
        (0, 0, 2, 0, None),
        (7, 3, 2, 5, None),
        (2**31 + 12345, 1, 2, 2, None),  # a seed word that is negative as int32
        (2**32 + 99, 70_000, 3, 11, 13),  # only the seed's low 32 bits count; offset wraps modulo M
        (2**64 - 1, 2**31 - 1, 1, 0, None),
        (5, 2, 13, 1, None),  # shifts larger than the padding: pixels leave the canvas
        (5, 2, 0, 9, 4),  # no augmentation; a stale offset past M stays in bounds
    ],
)
def test_batch_prepare_augmentation(be, aug_seed, epoch, shift, offset, m):
    """The shifts are reference.augment_shift's, bit for bit (random pixels: one pixel off fails)."""
    for v in variants("batch_prepare"):
        H.check_batch_prepare(be, v, 20, 5, offset, seed=1, aug_seed=aug_seed, epoch=epoch, shift=shift, m=m)


@pytest.mark.parametrize(
    "words,batch,steps",
    [
        (dict(), 64, 1),
        (dict(step=5, step_in_epoch=1, offset=64, steps_per_epoch=3, epoch=2), 64, 4),  # wraps into epoch 3, 4
        (dict(step=2**31 - 2, steps_per_epoch=2**31 - 1, seed=2**31 + 1, shift=2), 1, 1),
    ],
)
def test_step_advance(be, words, batch, steps):
    for v in variants("step_advance"):
        H.check_step_advance(be, v, words, batch, steps)


# ------------------------------------------------------------------- last-block tickets under poison
GARBAGE = 0xDEADBEEF_00000005  # another generation, a count of 5
STEP = 11


def _poison_and_rerun(be, op: str, run, fresh) -> None:
    """``run()`` once (allocates the tickets), then with the tickets poisoned: still exact (== ``fresh()``,
    a launch on clean tickets), whatever the garbage, and twice in a row at the same STEP."""
    run()
    want = fresh()
    for value in (GARBAGE, (STEP - 1) << 32 | 1, 2**64 - 1, (STEP + 1) << 32 | 3):
        assert H.poison_tickets(be, op, value) >= 1
        got = run()
        for g, w in zip(got, want):
            H.assert_equal(g, w, f"{op} after its tickets were poisoned with {value:#x}")
    again = run()  # the last block reset the ticket: a repeat at the same STEP works
    for g, w in zip(again, want):
        H.assert_equal(g, w, f"{op} repeated at the same STEP")


def _softmax_runner(be, n: int, seed: int):
    d = H.Dev(be)
    logits, labels = H.rand((n, 10), seed, 3.0), np.random.default_rng(seed).integers(0, 10, n).astype(np.int32)
    dlog, dlab = d.put(logits), d.put(labels)
    state = d.put(H.state_array(step=STEP, step_in_epoch=1))

    def run():
        dl, stats = d.put(H.nan_like((n, 10))), d.put(H.nan_like((2, 2)))
        be.softmax_xent(dlog, dlab, dl, stats, state, variant="v2")
        return d.get(dl), d.get(stats)[1]

    return run


def _bwd_weight_runner(be, xs, ws, seed: int):
    d = H.Dev(be)
    n, c, h, wd = xs
    k, _, r, s = ws
    x, dz = d.put(H.rand(xs, seed)), d.put(H.rand((n, k, h - r + 1, wd - s + 1), seed + 1, 0.1))
    state = d.put(H.state_array(step=STEP))

    def run():
        dw, db = d.put(H.nan_like(ws)), d.put(H.nan_like((k,)))
        be.conv2d_bwd_weight(x, dz, dw, db, state, variant="v3")
        return d.get(dw), d.get(db)

    return run


def test_ticket_reductions_survive_poisoned_tickets(be):
    """softmax_xent_v2 and conv2d_bwd_weight_v3 take a ticket tagged with the state's STEP: garbage left in
    it (an aborted launch, a stale count of an earlier step) cannot mislead the next launch. Different
    inputs than the first launch, so a premature last block would read stale partials and fail."""
    alt = CupyBackend(host=not be.is_gpu, defines=ALT_DEFINES)  # LOSS_THREADS 32, BWD_THREADS 64: more blocks
    first = _softmax_runner(alt, 70, 0)
    first()
    run = _softmax_runner(alt, 70, 1)
    _poison_and_rerun(alt, "softmax_xent", run, _softmax_runner(CupyBackend(host=not be.is_gpu,
                                                                             defines=ALT_DEFINES), 70, 1))
    xs, ws = (8, 1, 32, 32), (6, 1, 5, 5)
    plan = alt.plan("conv2d_bwd_weight", "v3", N=8, C=1, H=32, W=32, K=6, R=5, S=5)
    assert plan.grid[2] > 1, plan  # the batch is split: the ticket path runs
    _bwd_weight_runner(alt, xs, ws, 0)()
    _poison_and_rerun(alt, "conv2d_bwd_weight", _bwd_weight_runner(alt, xs, ws, 5),
                      _bwd_weight_runner(CupyBackend(host=not be.is_gpu, defines=ALT_DEFINES), xs, ws, 5))
    H.check_conv2d_bwd_weight(alt, "v3", xs, ws, seed=5)  # and the clean result is right


def test_ticket_of_the_same_generation_is_the_known_limit(be):
    """The negative control: a stale count of the *same* STEP (only an aborted launch at this very step
    could leave one) does mislead the reduction: the test above can fail."""
    run = _bwd_weight_runner(be, (8, 1, 32, 32), (6, 1, 5, 5), 2)
    clean, _ = run()
    assert np.isfinite(clean).all()  # on clean tickets the kernel writes every element (so NaN below is the ticket)
    H.poison_tickets(be, "conv2d_bwd_weight", STEP << 32 | 1_000_000)  # no block is ever the last
    dw, _ = run()
    assert np.isnan(dw).any()


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
    be_packed = CupyBackend(host=not be.is_gpu, sm_count=1)  # filling 1 SM: conv v2 packs small maps (imgs > 1)
    for n in (7, 11):
        plan = be_packed.plan("conv2d_pool_fwd", "v2", N=n, C=6, H=14, W=14, K=16, R=5, S=5)
        assert 1 < plan.extra[2] < n and n % plan.extra[2], plan  # several maps a block, a partial last block
    for v in variants("conv2d_fwd"):
        H.check_conv2d_fwd(alt, v, (2, 6, 14, 14), (16, 6, 5, 5), "relu")
        H.check_conv2d_fwd(alt, v, (1, 2, 7, 40), (9, 2, 2, 3), "sigmoid")
    for v in variants("conv2d_fwd"):
        H.check_conv2d_fwd(be_packed, v, (7, 6, 14, 14), (16, 6, 5, 5), "relu")
    for v in variants("conv2d_pool_fwd"):
        H.check_conv2d_pool_fwd(alt, v, (1, 2, 10, 9), (9, 2, 2, 2), "tanh", "max")
        H.check_conv2d_pool_fwd(be_packed, v, (11, 6, 14, 14), (16, 6, 5, 5), "relu", "max")  # 5 + 5 + 1 maps
    for v in variants("conv2d_bwd_data"):
        H.check_conv2d_bwd_data(alt, v, (3, 6, 14, 14), (16, 6, 5, 5))  # C_BLOCK 4: a partial channel block
    for v in variants("conv2d_bwd_data_pool"):
        H.check_conv2d_bwd_data_pool(alt, v, (3, 6, 29, 28), (16, 6, 5, 5), "max", "tanh")
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
def _models(be, optimizer: str, fused: bool, act: str, pool: str, **kw):
    from lenet_gpu.model import LeNet5

    opts = dict(activation=act, pool=pool, seed=1, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    cu = be if fused else CupyBackend(host=not be.is_gpu, fused=False)
    return LeNet5(backend=cu, fused=fused, **opts, **kw), LeNet5(backend="numpy", **opts)


def _start(models, n: int = 7, batch: int = 2):
    """Both models on the same 7 images, batch 2 (3 steps an epoch), augmentation on."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), rng.integers(0, 10, n).astype(np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    datas = []
    for m in models:
        d = m.upload_dataset(images, labels)
        m.begin_run(d, batch, seed=5, shift=2)
        m.begin_epoch(d, perm)
        datas.append(d)
    return datas


@pytest.mark.parametrize(
    "optimizer,fused,act,pool",
    [("sgd", True, "relu", "max"), ("adam", False, "tanh", "avg"), ("sgd", False, "sigmoid", "max"),
     ("adam", True, "lecun_tanh", "avg")],
)
def test_training_steps_match_numpy(be, optimizer, fused, act, pool):
    """4 state-driven steps of the model (batch 2 of 7 images: the epoch wraps after 3 steps, augmentation
    on) on the cupy backend and on the numpy backend: parameters, device state and per-step stats agree."""
    cu, ref = _models(be, optimizer, fused, act, pool)
    datas = _start((cu, ref))
    for step in range(4):
        for m, d in zip((cu, ref), datas):
            m.run_steps(d, 1)
        H.assert_close(cu.parameters(), ref.parameters(), 2e-5, 2e-4, what=f"parameters after step {step + 1}")
        H.assert_equal(cu.backend.to_host(cu._run.state), ref.backend.to_host(ref._run.state),
                       f"state after step {step + 1}")
    got, want = cu.step_stats(0, 3), ref.step_stats(0, 3)
    H.assert_equal(got[:, 1], want[:, 1], "correct counts per step")
    H.assert_close(got[:, 0], want[:, 0], 1e-4, 1e-4, what="loss sums per step")


@pytest.mark.parametrize("fused,expected,optimizer", [(True, 10, "adam"), (False, 19, "sgd")])
def test_step_counters(be, fused, expected, optimizer):
    """After warm-up a step is launches only — unfused: 1 gather + 4 conv/pool + 3 dense + 1 loss + 3 dense
    backward + 1 pool backward + 2 bwd_weight + bwd_data + pool backward + 1 optimizer + 1 step_advance (19);
    fused: gather, 2 conv_pool, head_train (2 kernels), 2 bwd_weight, bwd_data_pool, optimizer, step_advance
    (10) — and no allocation, copy or sync: as a recorded replay, and as a graph of 3 steps (after the
    model's self-check)."""
    from lenet_gpu.model import LeNet5

    b = be if fused else CupyBackend(host=not be.is_gpu, fused=False)
    assert ("conv2d_pool_fwd" in b.variants) == fused
    model = LeNet5(backend=b, optimizer=optimizer, fused=fused, graph_steps=3, routed=False)  # routed: test_routed_cupy
    assert model.ops_per_step() == (9 if fused else 19)  # head_train is one op of two kernels
    rng = np.random.default_rng(0)
    data = model.upload_dataset(rng.integers(0, 256, (16, 28, 28)).astype(np.uint8), np.zeros(16, np.uint8))
    model.begin_run(data, 2)
    model.run_steps(data, 1)  # warm-up: compile, first-call scratch, the recording
    model.run_steps(data, 3)  # the graph's self-check and capture
    assert model.graph_check()[0], model.graph_check()
    for count in (1, 3):
        before = b.counters.snapshot()
        model.run_steps(data, count)
        delta = b.counters.since(before)
        assert delta == {"launches": expected * count, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}


def test_launch_list_issues_each_recorded_launch_on_its_own(be):
    """launch_list(fn): fn runs once, and each of its launches comes back with its kernel's name as a callable that
    issues that one launch again (the self-test's per-kernel profile without CUPTI times them so)."""
    state = be.to_device(H.state_array(steps_per_epoch=100))
    before = be.counters.launches
    listed = be.launch_list(lambda: (be.step_advance(state, 2), be.step_advance(state, 3)))
    assert [name for name, _ in listed] == ["step_advance_v1", "step_advance_v1"]
    assert be.counters.launches - before == 2
    listed[1][1]()  # the second launch alone, again: one more step of 3
    got = be.to_host(state)
    assert got[0] == 3 and got[3] == 2 + 3 + 3


class _Unrecorded(CupyBackend):
    def record(self, fn):
        return fn


def test_record_replays_launches_without_checks(be, monkeypatch):
    """record(fn): the first call runs fn and keeps its launches; later calls replay them (no op code runs)
    and compute what direct op calls compute, bit for bit."""
    from lenet_gpu.model import LeNet5

    rec = LeNet5(backend=be, seed=2, use_graphs=False)
    eager = LeNet5(backend=_Unrecorded(host=not be.is_gpu), seed=2, use_graphs=False)
    datas = _start((rec, eager))
    for m, d in zip((rec, eager), datas):
        m.run_steps(d, 1)  # rec: records

    def no_op_code(*a, **k):
        raise AssertionError("a replay must not run op code")

    monkeypatch.setattr(be, "_run", no_op_code)
    rec.run_steps(datas[0], 4)
    monkeypatch.undo()
    eager.run_steps(datas[1], 4)
    H.assert_equal(rec.parameters(), eager.parameters(), "recorded parameters")
    for name in ("state", "stats"):
        H.assert_equal(be.to_host(getattr(rec._run, name)), eager.backend.to_host(getattr(eager._run, name)),
                       f"recorded {name}")


def test_record_refuses_copies_and_syncs(be):
    buf = be.zeros((4,))
    for bad in (lambda: be.to_host(buf), be.synchronize, lambda: be.upload(buf, np.zeros(4, np.float32))):
        with pytest.raises(RuntimeError, match="record"):
            be.record(bad)()


def test_graph_forbids_copies_allocations_syncs(be):
    """What ``graph`` captures may only launch: the host runtime raises where CUDA capture would fail, on
    every call (the first one included: fn was warmed up before)."""
    if be.is_gpu:
        pytest.skip("the host runtime's capture check")
    buf = be.empty((4,))
    for bad in (lambda: be.empty((4,)), lambda: be.to_host(buf), be.synchronize,
                lambda: be.upload(buf, np.zeros(4, np.float32))):
        fn = be.graph(bad, 2)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="captured graph"):
                fn()
    state = be.to_device(H.state_array())
    step = be.graph(lambda: be.step_advance(state, 3), 4)
    step()
    step()
    assert be.to_host(state)[0] == 8  # 2 calls x 4 steps
    assert CupyBackend(host=not be.is_gpu, graphs=False).graph(lambda: None) is None
    with pytest.raises(ValueError, match="steps"):
        be.graph(lambda: None, 0)


def test_python_scalars_are_rejected(be):
    k = be.runtime.get_kernel("optim", "step_advance_v1")
    state = be.zeros((8,), np.int32)
    with pytest.raises(TypeError, match="np.int32"):
        be.runtime.launch(k, (1, 1, 1), (1, 1, 1), (state, 4))


# --------------------------------------------------------------------------------- no device needed
@parent_only
@pytest.mark.parametrize("sm_count", [132, 78, 16])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 64, 128, 255, 256, 1000, 4096])
def test_launch_shapes_at_lenet_sizes(batch, sm_count):
    """Every launch at LeNet sizes is legal (block ≤ 1024, grid within limits, smem ≤ 48 KiB); the conv tile
    kernels (v2) run blocks of ≥ 4 warps and, at batch ≥ 128, at least one block per SM; C1's tiles waste no
    register-blocking lane (K_BLOCK divides 6); the optimizer's grid covers the SMs."""
    layers = [dict(N=batch, C=1, H=32, W=32, K=6, R=5, S=5), dict(N=batch, C=6, H=14, W=14, K=16, R=5, S=5)]
    plans = []
    for op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"):
        for v in variants(op):
            for s in layers:
                p = launch_plan(op, v, s, sm_count=sm_count)
                plans.append((op, v, p))
                if "K_BLOCK" in dict(p.defines):  # C1 (K = 6) and C3 (K = 16): no wasted accumulator
                    assert s["K"] % dict(p.defines)["K_BLOCK"] == 0, (op, v, s, p)
    for v in variants("conv2d_bwd_data_pool"):  # C3's data gradient through S2 into C1
        plans.append(("conv2d_bwd_data_pool", v, launch_plan("conv2d_bwd_data_pool", v,
                                                             dict(N=batch, C=6, H=28, W=28, K=16, R=5, S=5),
                                                             sm_count=sm_count)))
    for op, v in (("dense_fwd", v) for v in variants("dense_fwd")):
        plans += [(op, v, launch_plan(op, v, dict(N=batch, I=i, O=o))) for i, o in ((400, 120), (120, 84), (84, 10))]
    plans.append(("dense_bwd", "v1", launch_plan("dense_bwd", "v1", dict(N=batch, I=400, O=120))))
    plans.append(("pool2x2_fwd", "v1", launch_plan("pool2x2_fwd", "v1", dict(NC=batch * 6, H=28, W=28))))
    plans.append(("pool2x2_bwd", "v1", launch_plan("pool2x2_bwd", "v1", dict(NC=batch * 6, H=28, W=28))))
    plans.append(("batch_prepare", "v1", launch_plan("batch_prepare", "v1", dict(B=batch, XH=32, XW=32))))
    plans.append(("softmax_xent", "v1", launch_plan("softmax_xent", "v1", dict(N=batch))))
    for v in variants("adam_step"):
        plans.append(("adam_step", v, launch_plan("adam_step", v, dict(n=61888), sm_count=sm_count)))
    for op, v, p in plans:
        assert 1 <= p.threads <= 1024 and p.threads % 32 == 0, (op, v, p)
        assert p.grid[0] < 2**31 and p.grid[1] <= 65535 and p.grid[2] <= 65535, (op, v, p)
        assert p.shared_mem <= 48 * 1024, (op, v, p)
        tiled = v == "v2" and op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "conv2d_bwd_data_pool")
        if tiled and batch >= 8:
            assert p.threads >= 128, (op, v, p)
        if tiled and batch >= 128:
            assert p.blocks >= sm_count, (op, v, p)
        if batch >= 256 and op in ("conv2d_fwd", "conv2d_pool_fwd", "conv2d_bwd_data", "pool2x2_fwd", "adam_step"):
            assert p.blocks >= sm_count, (op, v, p)


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
    """On a GPU: 7 training steps of the model as a recorded step + two CUDA graphs of 3 steps, as
    recorded replays, and as direct op calls give exactly the same parameters, state and per-step stats
    (same kernels, same order, fixed-order reductions, the state on the device), the epoch wrapping
    inside a graph; the model's own self-check passes."""
    from lenet_gpu.model import LeNet5

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (256, 28, 28)).astype(np.uint8), rng.integers(0, 10, 256).astype(np.uint8)
    results = []
    for mode in ("direct", "graph", "record", "graph"):
        be = _Unrecorded() if mode == "direct" else CupyBackend()
        model = LeNet5(backend=be, seed=3, use_graphs=mode == "graph", graph_steps=3)
        data = model.upload_dataset(images, labels)
        model.begin_run(data, 64, seed=1, shift=2)  # 4 steps an epoch
        model.begin_epoch(data, np.arange(256, dtype=np.int32))
        for count in (1, 3, 3):
            model.run_steps(data, count)
        if mode == "graph":
            assert model.graph_check()[0], model.graph_check()
        results.append([be.to_host(a) for a in (model.params, model._run.state, model._run.stats)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@parent_only
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [64, 256])
def test_gpu_bwd_weight_v3_split_path_is_deterministic(batch):
    """On a GPU, at batch >= 64 conv2d_bwd_weight_v3 splits the batch over blocks (grid.z > 1) and reduces
    the splits with the last-block ticket: bit for bit the same on every launch, after poisoning too."""
    be = CupyBackend()
    xs, ws = (batch, 1, 32, 32), (6, 1, 5, 5)
    plan = be.plan("conv2d_bwd_weight", "v3", N=batch, C=1, H=32, W=32, K=6, R=5, S=5)
    assert plan.grid[2] > 1, plan
    first = H.check_conv2d_bwd_weight(be, "v3", xs, ws, seed=9)
    run = _bwd_weight_runner(be, xs, ws, 9)
    want = run()
    for g, w in zip(want, first):
        H.assert_equal(g, w, "v3 with and without a state")
    for _ in range(5):
        for g, w in zip(run(), want):
            H.assert_equal(g, w, "v3 repeated")
    H.poison_tickets(be, "conv2d_bwd_weight", GARBAGE)
    for g, w in zip(run(), want):
        H.assert_equal(g, w, "v3 after poisoning")


@parent_only
def test_host_overhead_bench():
    """bench/host.py: every mode times; a replayed launch costs the host well under 5 µs (no-op runtime,
    targets: ≤ 5 µs per replayed launch, ≤ 10 µs per step for graphs amortised)."""
    from bench.host import bench_host, markdown

    rows = bench_host(quick=True, repeats=3)
    modes = {r["mode"]: r for r in rows}
    assert any("eager" in m for m in modes) and any("graph" in m for m in modes)
    for r in rows:
        assert r["us_per_step"] > 0
    replay = modes["cupy eager (recorded replay)"]
    assert replay["kernels_per_step"] == replay["launches_per_step"] == 5  # the four-kernel step (head_train: 2)
    assert replay["us_per_launch"] <= 5.0, replay
    graph = next(r for m, r in modes.items() if "graph" in m)
    assert graph["launches_per_step"] == 0.01 and graph["us_per_step"] <= 10.0, graph
    assert "| cupy eager (recorded replay) |" in markdown(rows)
