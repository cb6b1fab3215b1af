"""lenet_fwd v3 (kernels/lenet_fwd.cu through cupy_backend/fused.py) on the CPU harness: parity with the float64
reference on every activation and pool mode at batch 1, 7 and odd sizes, each tile width (1, 2, 4 images a block)
with partial tiles, float32 (already normalised) input, and the fused argmax (classes, with and without logits).
The planner by batch size is checked without running anything. NVRTC's sm_80/sm_90 compile (no spills) of v3 is in
tests/test_fused.py (it compiles every variant of the module).
"""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.backends.cupy_backend import fused
from lenet_gpu.reference import ACTIVATIONS
from tests import fused_helpers as F
from tests.parity import assert_close

ACTS = tuple(a for a in ACTIVATIONS if a != "identity")
MEAN, STD = 0.1307, 0.3081


def test_plan_by_batch_size():
    for n, imgs in ((1, 1), (64, 1), (264, 1), (265, 2), (528, 2), (529, 4), (3_160, 4)):
        p = fused.lenet_fwd_plan("v3", n, 120, 84)
        assert p.kernel == "lenet_fwd_v3", (n, p)
        assert p.extra == (imgs,) and p.grid[0] == -(-n // imgs) and p.shared_mem <= fused.SMEM_LIMIT, (n, p)
    assert fused.lenet_fwd_plan("v3", 10_000, 120, 84).kernel == "lenet_fwd_v4"  # tests/test_lenet_fwd_v4.py
    assert fused.lenet_fwd_tile_plan("v3", 10_000, 120, 84).extra == (4,)
    assert fused.lenet_fwd_plan("v3", 64, 120, 84, sm_count=16).extra == (2,)
    assert fused.lenet_fwd_plan("v3", 10_000, 120, 4096).extra == (1,)  # a wide F6: what fits 48 KiB
    assert fused.lenet_fwd_plan("v2", 64, 120, 84).extra == (4,)  # v2 keeps its fixed tile


_BE: dict = {}


@pytest.fixture
def hbe():
    return F.harness_backend(_BE)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", ("max", "avg"))
def test_parity_every_activation_and_pool(hbe, act, mode):
    for n in (1, 7):
        F.check_lenet_fwd(hbe, fused.lenet_fwd, "v3", n, act, mode, seed=n + len(act))


@pytest.mark.parametrize("n, sms, imgs", [(3, 1, 2), (5, 1, 4), (9, 2, 4), (11, 3, 2)])
def test_parity_wider_tiles_with_partial_last_tile(hbe, n, sms, imgs):
    hbe.sm_count = sms  # plan as on a GPU of `sms` SMs: tiny batches take the 2- and 4-image tiles
    assert fused.lenet_fwd_plan("v3", n, 120, 84, sms).extra == (imgs,)
    F.check_lenet_fwd(hbe, fused.lenet_fwd, "v3", n, "relu", "max", seed=n)
    F.check_lenet_fwd(hbe, fused.lenet_fwd, "v3", n, "tanh", "avg", h2=37, seed=n + 1)


def _inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[:, :4] = 0
    return images, F.lenet_params(84, seed + 1)


def test_float32_input_and_fused_argmax(hbe):
    d = F.Dev(hbe)
    n = 7
    images, params = _inputs(n, 3)
    dpar = {k: d.put(v) for k, v in params.items()}
    want = ref.lenet_fwd(images, params, MEAN, STD, "relu", "max")
    # logits and classes from one launch; classes alone (no logits written) give the same classes
    logits, classes = d.put(F.nan_like((n, 10))), d.put(np.full((n,), -1, np.int64))
    before = hbe.counters.snapshot()
    fused.lenet_fwd(hbe, d.put(images), dpar, logits, MEAN, STD, "relu", "max", classes=classes)
    assert hbe.counters.since(before)["launches"] == 1
    got, cls = d.get(logits), d.get(classes)
    assert_close(got, want, *F.TOL_LENET_FWD, what="lenet_fwd_v3 logits+classes")
    np.testing.assert_array_equal(cls, np.argmax(got, axis=1))
    only = d.put(np.full((n,), -1, np.int64))
    fused.lenet_fwd(hbe, d.put(images), dpar, None, MEAN, STD, "relu", "max", classes=only)
    np.testing.assert_array_equal(d.get(only), cls)
    # float32 already normalised: (p/255 - mean)/std, the border padded by the kernel with -mean/std
    x = ((images.astype(np.float64) / 255.0 - MEAN) / STD).astype(np.float32)
    lf = d.put(F.nan_like((n, 10)))
    fused.lenet_fwd(hbe, d.put(x), dpar, lf, MEAN, STD, "relu", "max")  # float32 selects v3 by itself
    assert_close(d.get(lf), want, *F.TOL_LENET_FWD, what="lenet_fwd_v3 float32 input")


def test_argmax_ties_and_nan_follow_numpy(hbe):
    """All-zero output weights and biases: every logit equal (a tie on every image): class 0, as np.argmax; a NaN
    bias on class 6: class 6 wins (np.argmax returns the first NaN)."""
    d = F.Dev(hbe)
    images, params = _inputs(3, 5)
    params["out.w"][:] = 0.0
    params["out.b"][:] = 0.0
    cls = d.put(np.full((3,), -1, np.int64))
    fused.lenet_fwd(hbe, d.put(images), {k: d.put(v) for k, v in params.items()}, None, MEAN, STD, "relu", "max",
                    classes=cls)
    np.testing.assert_array_equal(d.get(cls), [0, 0, 0])
    params["out.b"][6] = np.nan
    fused.lenet_fwd(hbe, d.put(images), {k: d.put(v) for k, v in params.items()}, None, MEAN, STD, "relu", "max",
                    classes=cls)
    np.testing.assert_array_equal(d.get(cls), [6, 6, 6])


def test_v1_v2_refuse_what_only_v3_does(hbe):
    d = F.Dev(hbe)
    images, params = _inputs(2, 1)
    dpar = {k: d.put(v) for k, v in params.items()}
    with pytest.raises(ValueError, match="need v3"):
        fused.lenet_fwd(hbe, d.put(images), dpar, None, MEAN, STD, "relu", "max", "v2",
                        classes=d.put(np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="logits, classes or both"):
        fused.lenet_fwd(hbe, d.put(images), dpar, None, MEAN, STD, "relu", "max")
    with pytest.raises(TypeError, match="int64"):
        fused.lenet_fwd(hbe, d.put(images), dpar, None, MEAN, STD, "relu", "max", classes=d.put(np.zeros(2, np.int32)))
