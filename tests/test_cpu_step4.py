"""The cpu backend's four-kernel step (docs/step4.md; cpu_backend/step4.py): each op against the float64
references through the self-test's input sets (every activation, batch 1, odd batches, more groups than images),
step_bwd with groups of more than 16 images, the model's four-op step against its nine-op routed step (bit for bit
where every group is a chunk of 16 images, close otherwise), the same bits on 1 and 2 threads with no allocation
a step, and a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lenet_gpu import LeNet5
from lenet_gpu import reference as R
from lenet_gpu.backends.base import STEP_OPS
from lenet_gpu.backends.cpu_backend import CpuBackend
from lenet_gpu.selftest.checks import input_sets, run_case
from lenet_gpu.spec import conv_prefix

from .parity import TOL, assert_close, assert_equal, nan_like, rand

BE = CpuBackend()


def test_the_cpu_backend_lists_the_step_ops():
    assert all(BE.variants[op] == ("v1",) for op in STEP_OPS)
    assert [BE.step_groups(b) for b in (1, 16, 17, 128)] == [1, 1, 2, 8]  # chunks of 16: the batch alone
    assert LeNet5(backend="cpu").step4  # the model's default wherever the routed step runs


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_ops_match_the_reference(op):
    """The self-test's cases of each op (both profiles: batch 1, 3, 7, 67; 1 to 9 groups, empty ones included;
    every activation; step_bwd twice on the same inputs, bit for bit)."""
    n = 0
    for profile in ("tiny", "full"):
        for s in input_sets([op], profile):
            run_case(BE, op, "v1", s)
            n += 1
    assert n >= 4


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_step_bwd_groups_of_more_than_16_images(groups):
    """40 images in 1, 2 or 3 groups (40, 20 + 20, 14 + 14 + 12): groups that run as several chunks of 16."""
    b = 40
    rng = np.random.default_rng(groups)
    x = rand((b, 1, 32, 32), 1)
    p1 = np.abs(rand((b, 6, 14, 14), 2))
    gz3 = rand((b, 16, 5, 5), 3)
    m3 = rng.integers(0, 4, (b, 16, 5, 5)).astype(np.uint8)
    m1 = rng.integers(0, 4, (b, 6, 14, 14)).astype(np.uint8)
    w3 = rand((16, 6, 5, 5), 4, 0.08)
    gpart = nan_like((groups, conv_prefix()))
    BE.step_bwd(x, p1, gz3, m3, m1, w3, gpart, "relu")
    want = R.step_bwd(*(a.astype(np.float64) for a in (x, p1, gz3)), m3, m1, w3.astype(np.float64), "relu", groups)
    assert_close(gpart, want, *TOL["step_bwd"], what=f"step_bwd, 40 images in {groups} groups")
    with pytest.raises(ValueError, match="gpart must be"):
        BE.step_bwd(x, p1, gz3, m3, m1, w3, nan_like((groups, conv_prefix() - 1)), "relu")


# ------------------------------------------------------------------------------------------ the model's step


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _run(step4, batch, act="tanh", opt="adam", steps=3):
    """A device-resident run from step 0: ``steps`` steps of ``batch`` images, lr 1e-3 (a schedule of 6 rows)."""
    images, labels = _batch(100, seed=4)
    m = LeNet5(backend="cpu", activation=act, seed=2, step4=step4, optimizer=opt, weight_decay=1e-4)
    assert m.step4 is step4 and m.routed
    data = m.upload_dataset(images, labels)
    m.begin_run(data, batch, np.full(6, 1e-3), seed=5, shift=2)
    m.begin_epoch(data, np.random.default_rng(1).permutation(100))
    m.run_steps(data, steps)
    return m, data


@pytest.mark.parametrize("act,opt", [("tanh", "adam"), ("relu", "sgd")])
def test_step4_is_the_routed_step_bit_for_bit_at_whole_chunks(act, opt):
    """Batch 32: two groups, each a chunk of 16 images: the routed step's chunk functions, their partials added in
    the same order: the same parameters, optimizer state and statistics (array_equal: −0.0 == +0.0)."""
    a, b = _run(True, 32, act, opt)[0], _run(False, 32, act, opt)[0]
    assert_equal(a.parameters(), b.parameters(), what=f"step4 vs nine-op params {act} {opt}")
    assert_equal(a.backend.to_host(a.m), b.backend.to_host(b.m), what=f"step4 vs nine-op momentum {act} {opt}")
    assert_equal(a.step_stats(0, 3), b.step_stats(0, 3), what=f"step4 vs nine-op stats {act} {opt}")
    assert np.abs(a.parameters() - LeNet5(backend="numpy", activation=act, seed=2).parameters()).max() > 1e-5


def test_step4_is_close_to_the_routed_step_in_other_groups():
    """Batch 37: groups of 13, 13, 11 images (the routed step's chunks: 16, 16, 5), float32 sums in other orders."""
    a, b = _run(True, 37)[0], _run(False, 37)[0]
    assert_close(a.parameters(), b.parameters(), atol=1e-6, rtol=1e-5, what="step4 vs nine-op params, batch 37")
    assert_close(a.step_stats(0, 3), b.step_stats(0, 3), atol=1e-6, rtol=1e-5, what="stats, batch 37")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread here")
def test_step4_same_bits_on_one_and_two_threads_and_allocates_nothing():
    before = numba.get_num_threads()
    params = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            m, data = _run(True, 37, "sigmoid")
            snap = m.backend.counters.snapshot()
            m.run_steps(data, 1)
            d = m.backend.counters.since(snap)
            assert d == {"launches": 4, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}, d
            assert m.ops_per_step() == 4
            params.append(m.parameters())
    finally:
        numba.set_num_threads(before)
    assert_equal(params[0], params[1], what="step4: 1 thread vs 2 threads")


def test_step4_resumed_run_equals_the_uninterrupted_run(tmp_path):
    """3 steps, a checkpoint, a new model from it continuing the run at step 3: the parameters and optimizer state
    of 6 uninterrupted steps, bit for bit."""
    full, data = _run(True, 16, steps=6)
    part, _ = _run(True, 16, steps=3)
    path = part.save(tmp_path / "part.npz")
    resumed = LeNet5.load(path, backend="cpu")
    assert resumed.step4
    images, labels = _batch(100, seed=4)
    d2 = resumed.upload_dataset(images, labels)
    assert resumed.step_count == 3
    resumed.begin_run(d2, 16, np.full(3, 1e-3), seed=5, shift=2, step_in_epoch=3)
    resumed.begin_epoch(d2, np.random.default_rng(1).permutation(100))
    resumed.run_steps(d2, 3)
    assert_equal(resumed.parameters(), full.parameters(), what="resumed vs uninterrupted params")
    for k, v in full.optimizer_state().items():
        assert_equal(np.asarray(resumed.optimizer_state()[k]), np.asarray(v), what=f"resumed vs uninterrupted {k}")
