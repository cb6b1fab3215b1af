"""numba lenet_fwd_v3 and lenet_eval_v1 (lenet_gpu/backends/numba_backend/lenet_fwd.py), the Numba face of
kernels/lenet_fwd.cu's v3 and lenet_eval_v1: in a NUMBA_ENABLE_CUDASIM=1 child process, the fused argmax (the first
maximal logit, a constructed tie), float32 input against the uint8 path on the same normalised images (bit for
bit), logits=None (a zero-size stand-in: the simulator's bounds checks fail any write to it), lenet_eval against a
float64 NumPy computation, the wrappers' errors, and LeNet5(backend="numba") taking the device path for predict
(classes fused, one block taking two tiles) and evaluation (lenet_eval, one 16-byte copy back). v3's logits equal
v2's bit for bit: test_numba_lenet_fwd_v2.py (its batch-1 case). The PTX checks: lenet_eval's here, lenet_fwd_v3's
in tests/test_numba_ptx.py and test_fused.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests import sim_child
from tests.conftest import numba_compile_report, require

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim = pytest.mark.skipif(not SIM, reason="runs inside test_v3_simulator_suite's NUMBA_ENABLE_CUDASIM=1 subprocess")
MEAN, STD = 0.1307, 0.3081
SUITE = sim_child.Child(__file__, "sim_")


def _lf():
    require("numba")
    from lenet_gpu.backends.numba_backend import lenet_fwd

    return lenet_fwd


@pytest.mark.sim
@sim_child.early(SUITE)
def test_v3_simulator_suite():
    """Run the sim_* tests of this file in a subprocess with the CUDA simulator on."""
    if SIM:
        pytest.skip("this is the simulator run")
    require("numba", "the simulator suite needs it")
    print(sim_child.result(SUITE))


def test_v3_is_the_default_with_v2s_plan():
    """v3 (the default, not the last variant) has v2's plan below v4's threshold; at large batches its plan runs
    lenet_fwd_v4 (tests/test_numba_lenet_fwd_v4.py), as lenet_fwd.cu's v3 plan does."""
    lf = _lf()
    assert lf.VARIANTS["lenet_fwd"] == ("v1", "v2", "v3", "v4") and lf.DEFAULT_VARIANTS["lenet_fwd"] == "v3"
    assert lf.LAUNCH_BOUNDS["lenet_fwd_v3"] == lf.LAUNCH_BOUNDS["lenet_fwd_v2"]
    for n in (1, 64, 300, 3_000):
        assert lf.launch_shape("v3", n, 120, 84, 132) == lf.launch_shape("v2", n, 120, 84, 132)
        assert lf.launch_kernel_name("v3", n, 120, 84, 132) == "lenet_fwd_v3"
    assert lf.launch_kernel_name("v3", 10_000, 120, 84, 132) == "lenet_fwd_v4"
    assert lf.launch_shape("v3", 10_000, 120, 84, 132) == (625, lf.THREADS_V2, lf.v4_smem(16, 120, 84, 10))
    assert lf.lenet_fwd.features == ("float32", "classes")


def test_lenet_eval_compiles_without_spills_or_64bit_division():
    """lenet_eval_v1 for sm_80 and sm_90 (compile_report's compile: compile_ptx + ptxas -v): no spills, no stack,
    no 64-bit or signed division, ≤ 64 registers; float64 it uses by contract (its sums and exp/log). lenet_fwd_v3's
    checks: tests/test_numba_ptx.py (UINT32_KERNELS, SM90_ONLY) and test_fused.py (SIGNATURES)."""
    cr = numba_compile_report()
    for arch in ("sm_80", "sm_90"):
        ptx, log = cr.compile_kernel("lenet_eval_v1", arch)
        res = cr.parse_ptxas(log)
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, (arch, res)
        assert 0 < res["registers"] <= 64, (arch, res)
        stats = cr.int_arith_stats(ptx)
        assert all(stats[k] == 0 for k in ("div.s64", "div.u64", "rem.s64", "rem.u64", "div.s32", "rem.s32")), stats
        assert cr.f64_lines(ptx)  # the double sums are there (the contract)


def _inputs(n: int, seed: int):
    """uint8 images and LeNet-5 parameters whose output rows 3 and 7 are equal and biased high: logits 3 and 7
    are the same bits and the maximum of every image (np.argmax: 3)."""
    from tests import fused_helpers as F

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[:, :4] = 0
    params = F.lenet_params(84, seed + 1)
    params["out.w"][7] = params["out.w"][3]
    params["out.b"][[3, 7]] = 50.0
    return images, params


@sim
def test_sim_v3_argmax_and_float32_input():
    """Batch 2, one block taking both tiles (a block per image: the plan at 1 SM; the grid capped at 1): uint8
    images → logits + classes in one launch (logits against the reference; classes the first maximal logit: 3 in
    the tie, never 7), then the same images normalised in float32 → logits only: the uint8 path's bits."""
    from lenet_gpu import reference as ref
    from tests import fused_helpers as F

    lf = _lf()
    n = 2
    be = F.NumbaShim(max_blocks=1)
    be.sm_count = 1
    be.launch_log = []
    d = F.Dev(be)
    images, params = _inputs(n, 3)
    dpar = {k: d.put(v) for k, v in params.items()}
    want = ref.lenet_fwd(images, params, MEAN, STD, "relu", "max")
    logits, classes = d.put(F.nan_like((n, 10))), d.put(np.full((n,), -1, np.int64))
    before = be.counters.snapshot()
    lf.lenet_fwd(be, d.put(images), dpar, logits, MEAN, STD, "relu", "max", classes=classes)
    assert be.counters.since(before)["launches"] == 1
    got, cls = d.get(logits), d.get(classes)
    F.assert_close(got, want, *F.TOL_LENET_FWD, what="lenet_fwd_v3 logits+classes")
    assert (got[:, 3] == got[:, 7]).all()
    np.testing.assert_array_equal(cls, [3, 3])
    np.testing.assert_array_equal(cls, np.argmax(want, axis=1))
    # float32 already normalised as the kernel normalises uint8 (float32 pixel·scale + shift); the border -mean/std
    scale, shift = np.float32(1.0 / (255.0 * STD)), np.float32(-MEAN / STD)
    x = images.astype(np.float32) * scale + shift
    lf32 = d.put(F.nan_like((n, 10)))
    lf.lenet_fwd(be, d.put(x), dpar, lf32, MEAN, STD, "relu", "max")  # float32 selects v3 by itself
    np.testing.assert_array_equal(d.get(lf32), got)
    # the launches' argument types are the declared signatures (what compile_ptx checks): uint8, then float32
    from numba.core import sigutils

    want = [sigutils.normalize_signature(sig)[0] for sig in (lf.SIGNATURES["lenet_fwd_v3"],
                                                              lf.REPORT_SIGNATURES["lenet_fwd_f32_v3"])]
    assert [name for name, _ in be.launch_log] == ["lenet_fwd_v3", "lenet_fwd_v3"]
    assert [tuple(t) for _, t in be.launch_log] == [tuple(w) for w in want]


def _eval_want(z: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    loss = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0] - z[np.arange(len(y)), y]
    return float(loss.sum()), int((np.argmax(z, axis=1) == y).sum())


@sim
def test_sim_lenet_eval_against_float64():
    """lenet_eval over 300 rows (more than the block's 256 threads: some take two rows), ties (the first maximum
    counts) and a logit scale of 30: loss to 1e-9 relative of NumPy's float64, the count exact; the wrong dtype or
    shape of an operand is refused."""
    from tests import fused_helpers as F

    lf = _lf()
    be = F.NumbaShim()
    d = F.Dev(be)
    rng = np.random.default_rng(7)
    n = 300
    z = (rng.standard_normal((n, 10)) * 30).astype(np.float32)
    z[:40, 5] = z[:40, 2] = z[:40].max(axis=1) + 1  # a tie: np.argmax says 2
    y = rng.integers(0, 10, n).astype(np.uint8)
    y[:30] = 2
    y[30:40] = 5  # the tie's second class: not a hit (30 hits there; the last maximum would give 10)
    out = d.put(np.full((2,), np.nan))
    lf.lenet_eval(be, d.put(z), d.put(y), out)
    loss, hits = d.get(out)
    want_loss, want_hits = _eval_want(z, y)
    assert hits == want_hits and abs(loss - want_loss) <= 1e-9 * abs(want_loss), (loss, hits, want_loss, want_hits)
    with pytest.raises(TypeError, match="uint8"):
        lf.lenet_eval(be, d.put(z), d.put(y.astype(np.int32)), out)
    with pytest.raises(ValueError, match="shape"):
        lf.lenet_eval(be, d.put(z), d.put(y[:5]), out)
    with pytest.raises(TypeError, match="float64"):
        lf.lenet_eval(be, d.put(z), d.put(y), d.put(np.zeros(2, np.float32)))


@sim
def test_sim_v3_wrapper_errors():
    """Clear errors, before any launch: images neither uint8 nor float32, a wrong image shape, v1/v2 asked for
    what only v3 does, no output at all, classes not int64 or of the wrong length, host arrays."""
    from tests import fused_helpers as F

    lf = _lf()
    be = F.NumbaShim()
    d = F.Dev(be)
    images, params = _inputs(2, 1)
    dpar = {k: d.put(v) for k, v in params.items()}
    dimg = d.put(images)
    cls = d.put(np.zeros(2, np.int64))
    before = be.counters.snapshot()
    with pytest.raises(TypeError, match="uint8 pixels or float32"):
        lf.lenet_fwd(be, d.put(images.astype(np.float64)), dpar, None, MEAN, STD, "relu", "max", classes=cls)
    with pytest.raises(ValueError, match="shape"):
        lf.lenet_fwd(be, d.put(images[:, :27]), dpar, None, MEAN, STD, "relu", "max", classes=cls)
    with pytest.raises(ValueError, match="need v3"):
        lf.lenet_fwd(be, dimg, dpar, None, MEAN, STD, "relu", "max", "v2", classes=cls)
    with pytest.raises(ValueError, match="need v3"):
        lf.lenet_fwd(be, d.put(images.astype(np.float32)), dpar, d.put(np.zeros((2, 10), np.float32)), MEAN, STD,
                     "relu", "max", "v1")
    with pytest.raises(ValueError, match="logits, classes or both"):
        lf.lenet_fwd(be, dimg, dpar, None, MEAN, STD, "relu", "max")
    with pytest.raises(TypeError, match="int64"):
        lf.lenet_fwd(be, dimg, dpar, None, MEAN, STD, "relu", "max", classes=d.put(np.zeros(2, np.int32)))
    with pytest.raises(ValueError, match="shape"):
        lf.lenet_fwd(be, dimg, dpar, None, MEAN, STD, "relu", "max", classes=d.put(np.zeros(3, np.int64)))
    with pytest.raises(TypeError, match="host NumPy"):
        lf.lenet_fwd(be, images, dpar, None, MEAN, STD, "relu", "max", classes=cls)
    assert be.counters.since(before)["launches"] == 0


@sim
def test_sim_model_device_predict_float32_and_evaluate():
    """LeNet5(backend="numba") on the device: forward_device (what predict and logits call for a device input)
    of float32 normalised images with classes → the backend's int64 classes from the fused argmax, no logits
    written (logits=None: a zero-size stand-in, which the simulator bounds-checks; one block takes both images'
    tiles); evaluate of a device dataset → one lenet_fwd launch, one lenet_eval launch and one 16-byte copy back,
    the float64 reference's figures. (In the simulator a Numba array is not a CUDA array to arrays.classify, so
    the device input is given as an arrays.Incoming and adopted as it is.)"""
    from numba import cuda

    from lenet_gpu import arrays
    from lenet_gpu import reference as ref
    from lenet_gpu.backends.numba_backend import NumbaBackend
    from lenet_gpu.model import DeviceData, LeNet5
    from lenet_gpu.spec import views

    be = NumbaBackend(max_blocks=1)
    be.sm_count = 1
    model = LeNet5(backend=be, seed=0)
    be.adopt_array = lambda inc: inc.obj  # the simulator has no cuda.as_cuda_array (arrays.adopt's way in)
    be.launch_log = []
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(2, 28, 28)).astype(np.uint8)
    images[:, :4] = 0
    labels = np.array([3, 1], np.uint8)
    host = {k: np.asarray(v) for k, v in views(be.to_host(model.params), model.cfg).items()}
    want = ref.lenet_fwd(images, host, model.mean, model.std, model.cfg.activation, model.cfg.pool)
    scale, shift = np.float32(1.0 / (255.0 * model.std)), np.float32(-model.mean / model.std)
    x32 = cuda.to_device(images.astype(np.float32) * scale + shift)
    inc = arrays.Incoming("device", "numba", "cai", x32, None, 0, "float32", (2, 28, 28), True)
    cls = model.forward_device(inc, classes=True)
    assert not isinstance(cls, np.ndarray) and cls.dtype == np.int64 and cls.shape == (2,)
    np.testing.assert_array_equal(be.to_host(cls), np.argmax(want, axis=1))
    data = DeviceData(cuda.to_device(images), cuda.to_device(labels), cuda.to_device(np.arange(2, dtype=np.int32)), 2)
    before = be.counters.snapshot()
    loss, correct = model.evaluate(data)
    used = be.counters.since(before)
    assert used["launches"] == 2 and used["d2h"] == 1, used
    assert [name for name, _ in be.launch_log] == ["lenet_fwd_v3", "lenet_fwd_v3", "lenet_eval_v1"]
    want_loss, want_hits = _eval_want(want.astype(np.float32), labels)
    assert correct == want_hits
    assert abs(loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), (loss, want_loss)
