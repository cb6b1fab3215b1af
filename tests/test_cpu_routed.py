"""The cpu backend's routed backward of max pooling (docs/routed_backward.md; cpu_backend/routed.py): each
routed op against the float64 routed reference and the dense reference on the scattered gradient (all
activations, LeNet's C1 and C3, batch 1, odd batches with a partial chunk of 16, odd map sizes), head_train
with yconv=None, the model's routed step against its dense step, the same bits on 1 and 2 threads, no
allocation a step, and packed FMAs at the machine's widest vector width.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lenet_gpu import reference as R
from lenet_gpu.backends.cpu_backend import CpuBackend
from lenet_gpu.backends.cpu_backend import routed as RT
from lenet_gpu.stepstate import HostState

from .host_checks import activated
from .parity import TOL, assert_close, assert_equal, nan_like, rand

BE = CpuBackend()
ACTS = R.ACTIVATIONS
NET_ACTS = [a for a in ACTS if a != "identity"]  # the network's options

# (N, C, H, W, K, R, S): the conv's input and filters. LeNet's C1 and C3 at batch 1 and 19 (a partial chunk),
# odd maps (odd conv outputs: the last row/column is never routed), and filters that are not 5×5
ROUTED_SHAPES = [
    (1, 1, 32, 32, 6, 5, 5),
    (19, 1, 32, 32, 6, 5, 5),
    (1, 6, 14, 14, 16, 5, 5),
    (19, 6, 14, 14, 16, 5, 5),
    (3, 3, 12, 11, 5, 3, 4),
    (2, 7, 9, 10, 3, 2, 2),
]


def routed_case(shape, act, seed=11):
    """x, w, gz (pooled size), argmax of the pool over an activated conv output, the scattered dense dz."""
    n, c, h, w, k, r, s = shape
    ho, wo = h - r + 1, w - s + 1
    x = activated((n, c, h, w), act, seed)
    wt = rand((k, c, r, s), seed + 1, 0.3)
    yconv = activated((n, k, ho, wo), act, seed + 2)
    _, am = R.pool2x2_fwd(yconv.astype(np.float64), "max")
    gz = rand((n, k, ho // 2, wo // 2), seed + 3)
    dz = R.pool2x2_bwd(gz.astype(np.float64), am, "max", (ho, wo))
    return x, wt, gz, am, dz


@pytest.mark.parametrize("shape", ROUTED_SHAPES)
@pytest.mark.parametrize("variant", ["v1", "v2", "v3"])
def test_conv2d_bwd_weight_routed(shape, variant):
    x, wt, gz, am, dz = routed_case(shape, "relu")
    dw, db = nan_like(wt.shape), nan_like((wt.shape[0],))
    BE.conv2d_bwd_weight_routed(x, gz, am, dw, db, variant=variant)
    ref_dw, ref_db = R.conv2d_bwd(x.astype(np.float64), wt.astype(np.float64), dz, dz)[1:]
    assert_close(dw, ref_dw, *TOL["conv2d_bwd_weight"], what=f"routed dw {shape} {variant}")
    assert_close(db, ref_db, *TOL["conv2d_bwd_weight"], what=f"routed db {shape} {variant}")
    rdw, rdb = R.conv2d_bwd_weight_routed(x.astype(np.float64), gz.astype(np.float64), am, *wt.shape[2:])
    assert_close(dw, rdw, *TOL["conv2d_bwd_weight"], what=f"routed dw vs the routed reference {shape} {variant}")
    assert_close(db, rdb, *TOL["conv2d_bwd_weight"], what=f"routed db vs the routed reference {shape} {variant}")
    dw2, db2 = nan_like(wt.shape), nan_like((wt.shape[0],))
    BE.conv2d_bwd_weight(x, dz.astype(np.float32), dw2, db2)  # the dense kernel on the scattered gradient
    assert_close(dw, dw2, *TOL["conv2d_bwd_weight"], what=f"routed vs dense dw {shape}")


@pytest.mark.parametrize("shape", ROUTED_SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_conv2d_bwd_data_routed(shape, act):
    x, wt, gz, am, dz = routed_case(shape, act)
    out = nan_like(x.shape)
    BE.conv2d_bwd_data_routed(gz, wt, am, x, out, act)
    dx = R.conv2d_bwd(x.astype(np.float64), wt.astype(np.float64), dz, dz)[0]
    ref = dx * R.activation_grad(x.astype(np.float64), act)
    assert_close(out, ref, *TOL["conv2d_bwd_data"], what=f"routed data {shape} {act}")
    rref = R.conv2d_bwd_data_routed(gz.astype(np.float64), wt.astype(np.float64), am, x.astype(np.float64), act)
    assert_close(out, rref, *TOL["conv2d_bwd_data"], what=f"routed data vs the routed reference {shape} {act}")


@pytest.mark.parametrize("n", [1, 17])
@pytest.mark.parametrize("act", ACTS)
def test_head_train_routed(n, act):
    """yconv=None: dz_conv has S4's shape and holds gz = dS4 · act'(S4); the rest as with yconv."""
    from .test_cpu_backend import FUSED_TOL, head_case

    x, labels, ws, _, _ = head_case(n, 84, act, "max")
    out = {"h1": nan_like((n, 120)), "h2": nan_like((n, 84)), "logits": nan_like((n, 10)), "gz": nan_like(x.shape)}
    grads = [nan_like(w.shape) for w in ws]
    stats = np.full((4, 2), -7.0, np.float32)
    state = HostState(step_in_epoch=1).to_array()
    BE.head_train(x, labels, *ws, out["h1"], out["h2"], out["logits"], None, None, out["gz"], *grads, stats, state,
                  act, "max")
    ref = R.head_train(x.astype(np.float64), labels, *[w.astype(np.float64) for w in ws], None, None, act, "max")
    out.update(zip(("dw1", "db1", "dw2", "db2", "dw3", "db3"), grads))
    assert_close(out["gz"], ref["dz_conv"], *FUSED_TOL["head_train"], what=f"head_train gz n={n} {act}")
    for key in ("h1", "h2", "logits", "dw1", "db1", "dw2", "db2", "dw3", "db3"):
        assert_close(out[key], ref[key], *FUSED_TOL["head_train"], what=f"head_train {key} n={n} {act}")
    assert_close(stats[1, 0], ref["loss_sum"], *TOL["softmax_xent"], what="loss sum")
    with pytest.raises(ValueError, match="max pooling"):
        BE.head_train(x, labels, *ws, out["h1"], out["h2"], out["logits"], None, None, out["gz"], *grads, stats,
                      state, act, "avg")


# ------------------------------------------------------------------------------ the model's routed step


def _batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _run(routed, act="relu", batch=37, steps=2, seed=2):
    from lenet_gpu import LeNet5

    images, labels = _batch(100, seed=4)
    m = LeNet5(backend="cpu", activation=act, pool="max", seed=seed, routed=routed, step4=False)  # the nine ops
    assert m.routed is routed
    data = m.upload_dataset(images, labels)
    m.begin_run(data, batch, 1e-3, seed=5, shift=2)
    m.begin_epoch(data, np.random.default_rng(1).permutation(100))
    m.run_steps(data, steps)
    return m, data


@pytest.mark.parametrize("act", NET_ACTS)
def test_routed_step_matches_dense_step(act):
    """The cpu backend's routed step and its dense step (the same fused forward) reach the same parameters and
    statistics over two steps of 37 images (two chunks of 16 and a partial one), float32 sums in other orders."""
    r, d = _run(True, act)[0], _run(False, act)[0]
    assert_close(r.parameters(), d.parameters(), atol=2e-5, rtol=1e-4, what=f"routed vs dense params {act}")
    assert_close(r.step_stats(0, 2), d.step_stats(0, 2), atol=1e-4, rtol=1e-4, what=f"routed vs dense stats {act}")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread here")
def test_routed_step_same_bits_on_one_and_two_threads_and_allocates_nothing():
    before = numba.get_num_threads()
    params = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            m, data = _run(True, "tanh")
            snap = m.backend.counters.snapshot()
            m.run_steps(data, 1)
            d = m.backend.counters.since(snap)
            assert d == {"launches": 9, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}, d
            params.append(m.parameters())
    finally:
        numba.set_num_threads(before)
    assert_equal(params[0], params[1], what="routed step: 1 thread vs 2 threads")


# --------------------------------------------------------------------------------- the machine code


def _host_features() -> dict:
    try:
        import llvmlite.binding as ll

        return dict(ll.get_host_cpu_features())
    except Exception:  # noqa: BLE001
        return {}


FEATS = _host_features()
HAS_AVX512 = bool(FEATS.get("avx512f"))
HAS_AVX2_ONLY = bool(FEATS.get("avx2") and FEATS.get("fma")) and not HAS_AVX512


def _fresh_fma_counts() -> dict[str, dict[str, int]]:
    """The routed kernels' chunk functions at LeNet's C3, compiled afresh (no cache, at the backend's OPT_LEVEL) with
    the signature the kernels call them with (through the address of their compiled code, the plans' last argument):
    their packed and scalar FMAs."""
    from lenet_gpu.backends.cpu_backend import common

    from .test_cpu_backend import fresh_at

    x, wt, gz, am, _ = routed_case((3, 6, 14, 14, 16, 5, 5), "relu")
    be = CpuBackend()
    be.conv2d_bwd_weight_routed(x, gz, am, nan_like(wt.shape), nan_like((16,)), variant="v1")
    be.conv2d_bwd_data_routed(gz, wt, am, x, nan_like(x.shape), "relu")
    plans = {key[0]: plan for key, plan in be._plans.items() if plan}
    x1, wt1, gz1, am1, _ = routed_case((3, 1, 32, 32, 6, 5, 5), "relu")  # v3 at C1
    be1 = CpuBackend()
    be1.conv2d_bwd_weight_routed(x1, gz1, am1, nan_like(wt1.shape), nan_like((6,)), variant="v3")
    (plan1,) = [plan for plan in be1._plans.values() if plan]
    return {"weight": common.inspect_fma(fresh_at(RT._bwd_weight_routed_chunk, plans["conv2d_bwd_weight_routed"][-1])),
            "data": common.inspect_fma(fresh_at(RT._bwd_data_routed_chunk, plans["conv2d_bwd_data_routed"][-1])),
            "stack": common.inspect_fma(fresh_at(RT._bwd_weight_stack_chunk, plan1[-1]))}


@pytest.mark.skipif(not HAS_AVX512, reason="the host CPU has no AVX-512 (see the AVX2 test)")
def test_routed_kernels_use_zmm_fma_on_avx512():
    """On AVX-512 the routed kernels' patch rows (30 floats at C3) are two zmm vectors: packed zmm FMAs, no
    scalar ones."""
    counts = _fresh_fma_counts()
    assert counts["weight"]["fma_zmm"] >= 10 and counts["weight"]["fma_scalar"] == 0, counts  # 5 rows × 2
    assert counts["data"]["fma_zmm"] >= 10 and counts["data"]["fma_scalar"] == 0, counts
    assert counts["stack"]["fma_zmm"] >= 4 and counts["stack"]["fma_scalar"] == 0, counts  # 32 floats × 2 sets


@pytest.mark.skipif(not HAS_AVX2_ONLY, reason="AVX2 is not the best this CPU has (AVX-512 present, or no AVX2/FMA)")
def test_routed_kernels_use_ymm_fma_on_avx2():
    """Where AVX2 is the widest: ymm FMAs (a patch row of 30 floats is four), none in zmm, no scalar ones."""
    counts = _fresh_fma_counts()
    for name in ("weight", "data"):
        c = counts[name]
        assert c["fma_ymm"] >= 20 and c["fma_zmm"] == 0 and c["fma_scalar"] == 0, (name, counts)
    c = counts["stack"]  # v3 at C1: a patch of 32 floats is four ymm, in two accumulator sets
    assert c["fma_ymm"] >= 8 and c["fma_zmm"] == 0 and c["fma_scalar"] == 0, counts
