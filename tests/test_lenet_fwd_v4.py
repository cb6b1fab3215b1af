"""lenet_fwd v4 (kernels/lenet_fwd.cu through cupy_backend/fused.py), the large-batch kernel: 8 or 16 images a
block, the convolutions 2 images at a time, the dense stages once over all rows, > 48 KiB of dynamic shared memory.

On the CPU harness: parity with the float64 reference on every activation and pool mode, both tile widths with
partial last tiles, a narrow F6 (37: rows not a multiple of 4), float32 input and the fused argmax; **the same bits
as v3** (the property that lets v3's plan switch to v4 by batch size without changing a result); and the opt-in:
the harness refuses a launch past 48 KiB unless the kernel was opted in, as a GPU does, and the runtime opts in.
NVRTC: registers, no spills, and 4 blocks an SM at the plan's shared memory on sm_90. The planner without running
anything.
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


# ------------------------------------------------------------------------------------------- the plan
def test_v3_plan_takes_v4_at_large_batches():
    # 132 SMs: 8 images a block from ceil(N/8) >= 396, 16 from ceil(N/16) >= 396; v3's tiles below
    for n, kernel, imgs in ((3_160, "lenet_fwd_v3", 4), (3_161, "lenet_fwd_v4", 8), (6_320, "lenet_fwd_v4", 8),
                            (6_321, "lenet_fwd_v4", 16), (10_000, "lenet_fwd_v4", 16), (60_000, "lenet_fwd_v4", 16)):
        p = fused.lenet_fwd_plan("v3", n, 120, 84)
        assert (p.kernel, p.extra, p.grid[0]) == (kernel, (imgs,), -(-n // imgs)), (n, p)
        assert p.block[0] == fused.LF_THREADS["v4"]
    p = fused.lenet_fwd_plan("v3", 10_000, 120, 84)
    assert p.shared_mem == fused.lenet_fwd_v4_smem(16, 120, 84, 10) == 4 * (2624 + 2 * 2200 + 16 * 400) == 53_696
    assert fused.SMEM_LIMIT < p.shared_mem <= fused.LF4_SMEM_MAX  # past 48 KiB: the opt-in is needed
    assert fused.lenet_fwd_plan("v3", 10_000, 120, 84, sm_count=16).extra == (16,)  # the SMs scale the threshold
    assert fused.lenet_fwd_plan("v3", 300, 120, 84, sm_count=16).kernel == "lenet_fwd_v3"
    # a wide F6 that v4 cannot hold within LF4_SMEM_MAX: v3's tiles (what fits 48 KiB), by name too
    for v in ("v3", "v4"):
        p = fused.lenet_fwd_plan(v, 10_000, 120, 2500)
        assert (p.kernel, p.extra) == ("lenet_fwd_v3", (2,)) and p.shared_mem <= fused.SMEM_LIMIT, p
    # v4 by name runs at every batch: 8 images a block below the threshold
    assert fused.lenet_fwd_plan("v4", 7, 120, 84).extra == (8,)
    # the logits' row takes max(400, NC) floats
    assert fused.lenet_fwd_v4_smem(16, 120, 84, 500) == 4 * (2624 + 4400 + 16 * 500)
    assert fused.lenet_fwd_v4_smem(16, 120, 300, 10) == 4 * (2624 + 16 * (120 + 300) + 16 * 400)


# ------------------------------------------------------------------------------------------- CPU harness
_BE: dict = {}


@pytest.fixture
def hbe():
    return F.harness_backend(_BE)


def _inputs(n: int, seed: int, h2: int = 84):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[:, :4] = 0
    return images, F.lenet_params(h2, seed + 1)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", ("max", "avg"))
def test_parity_every_activation_and_pool(hbe, act, mode):
    for n in (1, 11):  # 11: a full tile of 8 and a partial one of 3
        F.check_lenet_fwd(hbe, fused.lenet_fwd, "v4", n, act, mode, seed=n + len(act))


def test_sixteen_images_a_block_partial_tile_narrow_f6(hbe):
    hbe.sm_count = 1  # plan as on a 1-SM GPU: 37 images give ceil(37/16) = 3 blocks, 16 images each (5 in the last)
    assert fused.lenet_fwd_plan("v3", 37, 120, 37, 1).extra == (16,)
    F.check_lenet_fwd(hbe, fused.lenet_fwd, "v3", 37, "relu", "max", h2=37, seed=4)
    F.check_lenet_fwd(hbe, fused.lenet_fwd, "v4", 37, "tanh", "avg", seed=5)


def _run(hbe, variant, images, params, classes=False, logits=True):
    d = F.Dev(hbe)
    n, nc = images.shape[0], params["out.w"].shape[0]
    lg = d.put(F.nan_like((n, nc))) if logits else None
    cl = d.put(np.full((n,), -1, np.int64)) if classes else None
    before = hbe.counters.snapshot()
    fused.lenet_fwd(hbe, d.put(images), {k: d.put(v) for k, v in params.items()}, lg, MEAN, STD, "relu", "max",
                    variant, classes=cl)
    assert hbe.counters.since(before)["launches"] == 1
    return (d.get(lg) if logits else None), (d.get(cl) if classes else None)


@pytest.mark.parametrize("n, h2", [(13, 84), (19, 37)])
def test_same_bits_as_v3(hbe, n, h2):
    """v4 (8 and 16 images a block) gives v3's logits bit for bit, uint8 and float32 inputs: the plan may switch
    between them by batch size without changing a result."""
    images, params = _inputs(n, 7 + n, h2)
    x = ((images.astype(np.float64) / 255.0 - MEAN) / STD).astype(np.float32)
    for inp in (images, x):
        want, _ = _run(hbe, "v3", inp, params)  # v3's 1-image tiles (132 SMs)
        got, _ = _run(hbe, "v4", inp, params)  # v4 by name: 8 images a block
        np.testing.assert_array_equal(got, want, err_msg=f"v4 vs v3, n={n}, h2={h2}, {inp.dtype}")
    hbe.sm_count = 1
    big = np.concatenate([images] * 3)  # 3n images planned for 1 SM: v3's plan runs v4, 16 a block
    assert fused.lenet_fwd_plan("v3", big.shape[0], 120, h2, 1).extra == (16,)
    got, _ = _run(hbe, "v3", big, params)
    hbe.sm_count = None
    want, _ = _run(hbe, "v3", big, params)  # 132 SMs: v3's own 1-image tiles
    np.testing.assert_array_equal(got, want)


def test_float32_input_and_fused_argmax(hbe):
    n = 11
    images, params = _inputs(n, 3)
    want = ref.lenet_fwd(images, params, MEAN, STD, "relu", "max")
    got, cls = _run(hbe, "v4", images, params, classes=True)
    assert_close(got, want, *F.TOL_LENET_FWD, what="lenet_fwd_v4 logits+classes")
    np.testing.assert_array_equal(cls, np.argmax(got, axis=1))
    _, only = _run(hbe, "v4", images, params, classes=True, logits=False)
    np.testing.assert_array_equal(only, cls)
    x = ((images.astype(np.float64) / 255.0 - MEAN) / STD).astype(np.float32)
    lf, _ = _run(hbe, "v4", x, params)
    assert_close(lf, want, *F.TOL_LENET_FWD, what="lenet_fwd_v4 float32 input")
    # a NaN bias on class 6 wins the argmax, as np.argmax's first NaN
    params["out.b"][6] = np.nan
    _, nan_cls = _run(hbe, "v4", images, params, classes=True, logits=False)
    np.testing.assert_array_equal(nan_cls, np.full(n, 6))


def test_shared_memory_past_48k_needs_the_opt_in(hbe):
    """The harness refuses a launch past 48 KiB of dynamic shared memory unless the kernel was opted in (as the
    driver does); Runtime.launch opts the kernel in, so the 16-image launch runs."""
    from lenet_gpu.backends.cupy_backend.runtime import HostRuntime
    from lenet_gpu.harness.cudacpu import CudaCpuError

    rt = HostRuntime()
    plan = fused.lenet_fwd_plan("v3", 48, 120, 84, 1)
    assert plan.extra == (16,) and plan.shared_mem > 48 * 1024
    kernel = rt.get_kernel("lenet_fwd", plan.kernel, plan.options("lenet_fwd"))
    assert kernel.max_dynamic_shared_size_bytes == 48 * 1024
    with pytest.raises(CudaCpuError, match="max_dynamic_shared_size_bytes"):
        kernel(plan.grid, plan.block, (), shared_mem=plan.shared_mem)
    rt.allow_shared(kernel, plan.shared_mem)
    assert kernel.max_dynamic_shared_size_bytes == plan.shared_mem
    rt.allow_shared(kernel, 1024)  # never lowered
    assert kernel.max_dynamic_shared_size_bytes == plan.shared_mem


# ------------------------------------------------------------------------------------------- NVRTC
def test_nvrtc_registers_spills_and_occupancy():
    from lenet_gpu.backends.cupy_backend.runtime import kernel_source
    from lenet_gpu.harness import nvrtc

    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (the test group's nvidia-cuda-nvrtc wheel)")
    plan = fused.lenet_fwd_plan("v3", 10_000, 120, 84)
    for arch in ("sm_80", "sm_90"):
        res = nvrtc.compile_cuda(kernel_source("lenet_fwd"), arch=arch, options=plan.options("lenet_fwd"))
        k = next(k for k in res.kernels if k.kernel == "lenet_fwd_v4")
        assert k.spill_stores == k.spill_loads == k.stack_bytes == 0, k
        assert k.registers <= 72, k  # __launch_bounds__(224, 4)
        blocks = nvrtc.max_active_blocks(k.registers, k.shared_bytes + plan.shared_mem, plan.block[0], arch)[0]
        assert blocks >= (4 if arch == "sm_90" else 3), (arch, k, blocks)


# ------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu_cupy():
    from lenet_gpu.backends.cupy_backend.runtime import CupyRuntime

    return F.RuntimeShim(CupyRuntime(graphs=False))


@pytest.mark.gpu
@pytest.mark.parametrize("n, imgs", [(4_000, 8), (10_000, 16)])
def test_gpu_default_plan_at_large_batches(gpu_cupy, n, imgs):
    """On a device: v3's plan runs v4 (the > 48 KiB opt-in on a real driver) against the reference, and gives v3's
    own tiles' bits (those run when the plan assumes more SMs than the batch can fill)."""
    be = gpu_cupy
    be.sm_count = None
    assert fused.lenet_fwd_plan("v3", n, 120, 84).extra == (imgs,)
    images, params = _inputs(n, n)
    got, cls = _run(be, None, images, params, classes=True)
    assert_close(got, ref.lenet_fwd(images, params, MEAN, STD, "relu", "max"), *F.TOL_LENET_FWD,
                 what=f"lenet_fwd_v4 on a GPU, N={n}")
    np.testing.assert_array_equal(cls, np.argmax(got, axis=1))
    be.sm_count = 100_000  # v3's own tiles
    assert fused.lenet_fwd_plan("v3", n, 120, 84, be.sm_count).kernel == "lenet_fwd_v3"
    want, _ = _run(be, None, images, params)
    be.sm_count = None
    np.testing.assert_array_equal(got, want)


def test_the_default_is_v3s_plan():
    """The backend's default lenet_fwd is v3's plan (v3's tiles at small batches, v4 from its threshold), not v4 by
    name (8-image blocks at every batch: a batch of 64 would take 8 blocks of 132 SMs)."""
    from lenet_gpu.backends.cupy_backend import DEFAULT_VARIANTS

    assert fused.DEFAULT_VARIANTS["lenet_fwd"] == DEFAULT_VARIANTS["lenet_fwd"] == "v3"
    assert fused.lenet_fwd_plan(DEFAULT_VARIANTS["lenet_fwd"], 64, 120, 84).kernel == "lenet_fwd_v3"
