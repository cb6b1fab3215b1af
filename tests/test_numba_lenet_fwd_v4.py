"""numba lenet_fwd_v4 (lenet_gpu/backends/numba_backend/lenet_fwd.py), the Numba face of kernels/lenet_fwd.cu's v4
(large batches: 8 or 16 images a block, the convolutions LF4_G = 2 images at a time through v3's code, the dense
stages once over all the rows): its plan against cupy's fused.lenet_fwd_plan (v3's plan, the default, runs v4 at
large batches; "v4" by name at every batch), the opt-in past 48 KiB of dynamic shared memory (``allow_shared``, the
driver call monkeypatched: no GPU here), compile_ptx for sm_80 / sm_90 (registers ≤ 72 under the launch bounds, no
spills, no local memory, no float64, no 64-bit or signed division), and, in a NUMBA_ENABLE_CUDASIM=1 child process:
logits against reference.lenet_fwd at 8 images a block (a partial last tile, one block taking both tiles) and 16
(the default plan at 1 SM), v3's bits exactly (uint8 and float32 images), the fused argmax with logits=None.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from tests import sim_child
from tests.conftest import numba_compile_report, require

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim = pytest.mark.skipif(not SIM, reason="runs inside test_v4_simulator_suite's NUMBA_ENABLE_CUDASIM=1 subprocess")
MEAN, STD = 0.1307, 0.3081
SUITE = sim_child.Child(__file__, "sim_")


def _lf():
    require("numba")
    from lenet_gpu.backends.numba_backend import lenet_fwd

    return lenet_fwd


@pytest.mark.sim
@sim_child.early(SUITE)
def test_v4_simulator_suite():
    """Run the sim_* tests of this file in a subprocess with the CUDA simulator on."""
    if SIM:
        pytest.skip("this is the simulator run")
    require("numba", "the simulator suite needs it")
    print(sim_child.result(SUITE))


# ------------------------------------------------------------------------------------------- plan and tables
def test_plan_v4_follows_cupy_lenet_fwd_plan():
    """plan_v4 ("v3" and "v4") is cupy's fused.lenet_fwd_plan: the kernel, the grid, the images a block and the
    shared memory, over batch sizes around both of v4's thresholds, narrow and wide F6 (v4's rows no longer fit
    LF4_SMEM_MAX from F6 ~2,400: v3's tiles), a wide output layer, and 1, 2 and 132 SMs; launch_shape and
    launch_kernel_name say the same."""
    lf = _lf()
    from lenet_gpu.backends.cupy_backend import fused

    assert (lf.LF4_IMGS_CHOICES, lf.LF4_BLOCKS_PER_SM, lf.LF4_G, lf.LF4_SMEM_MAX) == (
        fused.LF4_IMGS_CHOICES, fused.LF4_BLOCKS_PER_SM, fused.LF4_G, fused.LF4_SMEM_MAX)
    assert lf.v4_smem(16, 120, 84, 10) == fused.lenet_fwd_v4_smem(16, 120, 84, 10) == 53_696
    seen = set()
    for sms in (1, 2, 132):
        for n in (1, 17, 24, 25, 48, 49, 64, 3 * 8 * sms - 1, 3 * 8 * sms, 3 * 16 * sms, 3 * 16 * sms + 1, 3_161,
                  6_321, 10_000):
            for h2 in (84, 1000, 2400, 2500, 4096):
                for nc in (10, 1000):
                    for v in ("v3", "v4"):
                        want = fused.lenet_fwd_plan(v, n, 120, h2, sms, nc)
                        kname, blocks, imgs, smem = lf.plan_v4(v, n, 120, h2, sms, nc)
                        assert (kname, (blocks, 1, 1), (lf.THREADS_V2, 1, 1), smem, (imgs,)) == (
                            want.kernel, want.grid, want.block, want.shared_mem, want.extra), (v, n, h2, nc, sms)
                        assert lf.launch_shape(v, n, 120, h2, sms, nc) == (blocks, lf.THREADS_V2, smem)
                        assert lf.launch_kernel_name(v, n, 120, h2, sms, nc) == kname
                        seen.add((kname, imgs))
    assert seen >= {("lenet_fwd_v4", 8), ("lenet_fwd_v4", 16), ("lenet_fwd_v3", 1), ("lenet_fwd_v3", 4)}, seen
    assert lf.plan_v4("v3", 10_000, 120, 84, 132)[:3] == ("lenet_fwd_v4", 625, 16)
    assert lf.plan_v4("v3", 3_000, 120, 84, 132)[0] == "lenet_fwd_v3"
    assert lf.plan_v4("v4", 3, 120, 84, 132)[:3] == ("lenet_fwd_v4", 1, 8)
    with pytest.raises(ValueError, match="v3 or v4"):
        lf.plan_v4("v2", 3, 120, 84, 132)


def test_plan_within_default_shared_is_v4_at_8_images_else_v3_tiles():
    """The plan where the opt-in failed: lenet_fwd_v4 at 8 images a block while that fits 48 KiB (LeNet-5: 40,896 B),
    else v3's tiles (a wide F6), whatever the batch; never past 48 KiB."""
    lf = _lf()
    for n in (1, 100, 3_161, 10_000):
        assert lf.plan_within_default_shared(n, 120, 84, 132) == ("lenet_fwd_v4", -(-n // 8), 8, 40_896)
        kname, blocks, imgs, smem = lf.plan_within_default_shared(n, 120, 1000, 132)
        assert kname == "lenet_fwd_v3" and (blocks, imgs, smem) == lf.plan_v2(n, 120, 1000, 132)
        assert smem <= 48 * 1024


def test_v4_tables_and_backend_defaults():
    """v4 is a variant, v3 stays the default (its plan dispatches to v4, as on the CUDA C side); both v4
    specialisations (uint8, float32 images) are in the compile tables with v3's launch bounds; the backend's
    inference plan (lenet_launches) names the kernel that runs."""
    lf = _lf()
    assert lf.VARIANTS["lenet_fwd"] == ("v1", "v2", "v3", "v4") and lf.DEFAULT_VARIANTS["lenet_fwd"] == "v3"
    assert lf.KERNELS["lenet_fwd_v4"] is lf.lenet_fwd_v4 is lf.REPORT_KERNELS["lenet_fwd_f32_v4"]
    assert "lenet_fwd_v4" in lf.SIGNATURES and "lenet_fwd_f32_v4" in lf.REPORT_SIGNATURES
    assert lf.LAUNCH_BOUNDS["lenet_fwd_v4"] == lf.LAUNCH_BOUNDS["lenet_fwd_f32_v4"] == (224, 4)
    from lenet_gpu.backends.numba_backend import backend, compile_report

    assert backend.FUSED_DEFAULTS["lenet_fwd"] == "v3" and backend.FUSED_VARIANTS["lenet_fwd"][-1] == "v4"
    assert {"lenet_fwd_v4", "lenet_fwd_f32_v4"} <= set(compile_report.all_kernels())
    sms = backend.sm_count()
    big, small = 3 * 16 * sms, 2 * sms
    assert backend.lenet_launches(big, training=False)[0][:3] == ("lenet_fwd", "v4", -(-big // 16))
    assert backend.lenet_launches(small, training=False)[0][:3] == ("lenet_fwd", "v3", small)


# ------------------------------------------------------------------------------------------- the opt-in
def _fake_dispatcher(overloads: dict):
    cufunc = SimpleNamespace(handle=0xBEEF, device=SimpleNamespace(id=3))
    kernel = SimpleNamespace(_codelibrary=SimpleNamespace(get_cufunc=lambda: cufunc))
    compiled = []

    def compile_(argtypes):
        compiled.append(argtypes)
        overloads[argtypes] = kernel
        return kernel

    return SimpleNamespace(typeof_pyval=lambda a: type(a).__name__, overloads=overloads, compile=compile_), compiled


def test_allow_shared_sets_the_attribute_once_above_48k(monkeypatch):
    """allow_shared: nothing at 48 KiB or less, nothing under the simulator; above, the overload's cufunc gets
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (numba's driver.cuKernelSetAttribute, monkeypatched: no GPU
    here), compiled first where the launch has not yet; once per cufunc, again only for more bytes."""
    if SIM:
        pytest.skip("the opt-in's driver path (the simulator run checks the no-op)")
    _lf()
    import numba
    from cuda.bindings import driver as binding
    from numba.cuda.cudadrv import driver as drv

    calls = []
    # numba's Driver resolves its functions in __getattr__ (which needs a GPU): an instance attribute shadows it
    monkeypatch.setitem(drv.driver.__dict__, "cuKernelSetAttribute", lambda *a: calls.append(a))
    from lenet_gpu.backends.numba_backend import common

    monkeypatch.setattr(common, "_SHARED_OPT_INS", {})
    disp, compiled = _fake_dispatcher({})
    args = (np.zeros(1), 3)
    assert not common.allow_shared(disp, args, 48 * 1024) and not calls and not compiled
    with monkeypatch.context() as m:
        m.setattr(numba.config, "ENABLE_CUDASIM", True)
        assert not common.allow_shared(disp, args, 53_696) and not calls
    assert common.allow_shared(disp, args, 53_696)
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert calls == [(attr, 53_696, 0xBEEF, 3)] and compiled == [("ndarray", "int")]
    assert not common.allow_shared(disp, args, 53_696) and not common.allow_shared(disp, args, 50_000)
    assert len(calls) == 1
    assert common.allow_shared(disp, args, 60_000) and calls[-1] == (attr, 60_000, 0xBEEF, 3) and len(compiled) == 1


# ------------------------------------------------------------------------------------------- compile_ptx
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_v4_compiles_within_72_registers_without_spills(arch):
    """lenet_fwd_v4 (uint8 and float32 images) under its launch bounds (224 × 4): ≤ 72 registers, no spills, no
    stack (local memory), no float64, no 64-bit or signed division (compile_report's compile: compile_ptx +
    ptxas -v). Measured 2026-12-07: 72 registers on sm_80 and sm_90, both specialisations."""
    cr = numba_compile_report()
    names = ("lenet_fwd_v4", "lenet_fwd_f32_v4")
    cr.prefetch([(name, arch) for name in names])
    for name in names:
        ptx, log = cr.compile_kernel(name, arch)
        res = cr.parse_ptxas(log)
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, (name, arch, res)
        assert 0 < res["registers"] <= 72, (name, arch, res)
        stats = cr.int_arith_stats(ptx)
        assert all(stats[k] == 0 for k in ("div.s64", "div.u64", "rem.s64", "rem.u64", "div.s32", "rem.s32")), (
            name, arch, stats)
        assert not cr.f64_lines(ptx), (name, arch)


# ------------------------------------------------------------------------------------------- simulator
def _inputs(n: int, seed: int, h2: int = 37):
    """uint8 images and LeNet-5 parameters whose output rows 3 and 7 are equal and biased high: logits 3 and 7
    are the same bits and the maximum of every image (np.argmax: 3)."""
    from tests import fused_helpers as F

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[:, :4] = 0
    params = F.lenet_params(h2, seed + 1)
    params["out.w"][7] = params["out.w"][3]
    params["out.b"][[3, 7]] = 50.0
    return images, params


@sim
@pytest.mark.parametrize("act,mode", [("tanh", "avg")])  # relu + max: the argmax test; lecun_tanh + max: 16 images
def test_sim_v4_8_images_partial_tile_reference_and_v3_bits(act, mode):
    """"v4" by name at batch 11: 8 images a block, two tiles (the second of 3 images: groups past the batch compute
    on the border value, never written), one block taking both (max_blocks=1); logits against the reference
    (NaN-poisoned outputs), and v3's logits (its own tiles: v3's plan below v4's threshold) bit for bit."""
    from tests import fused_helpers as F

    lf = _lf()
    n = 11
    assert lf.plan_v4("v4", n, 120, 37, 132)[:3] == ("lenet_fwd_v4", 2, 8)
    be = F.NumbaShim(max_blocks=1)
    be.launch_log = []
    used: dict = {}
    got = F.check_lenet_fwd(be, lf.lenet_fwd, "v4", n, act, mode, h2=37, seed=5, used=used)
    assert used["launches"] == 1 and used["allocs"] == 0, used
    v3 = F.check_lenet_fwd(be, lf.lenet_fwd, "v3", n, act, mode, h2=37, seed=5)
    assert [name for name, _ in be.launch_log] == ["lenet_fwd_v4", "lenet_fwd_v3"]
    assert np.array_equal(got, v3), (act, mode, np.abs(got - v3).max())


@sim
def test_sim_v4_16_images_default_plan_and_v3_bits(monkeypatch):
    """The default (v3's plan) at 1 SM and batch 16 with the threshold lowered to one block an SM (the simulator
    is slow: a real threshold needs 48 images): lenet_fwd_v4 with 16 images a block, one tile; logits against the
    reference and v3's own tiles' (at 132 SMs) bit for bit; F6 84 (C5 and F6 over 16 rows: two groups of 8 a lane).
    The opt-in is a no-op here. (The plan at the real threshold: test_plan_v4_follows_cupy_lenet_fwd_plan.)"""
    from lenet_gpu.backends.numba_backend import common
    from tests import fused_helpers as F

    lf = _lf()
    n = 16
    assert lf.plan_v4("v3", n, 120, 84, 1)[0] == "lenet_fwd_v3"
    monkeypatch.setattr(lf, "LF4_BLOCKS_PER_SM", 1)
    assert lf.plan_v4("v3", n, 120, 84, 1)[:3] == ("lenet_fwd_v4", 1, 16)
    assert lf.v4_smem(16, 120, 84, 10) > 48 * 1024
    assert not common.allow_shared(lf.lenet_fwd_v4, (), lf.v4_smem(16, 120, 84, 10))  # the simulator: no-op
    be = F.NumbaShim(max_blocks=2)
    be.sm_count = 1
    be.launch_log = []
    got = F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "lecun_tanh", "max", h2=84, seed=9)
    be.sm_count = 132
    v3 = F.check_lenet_fwd(be, lf.lenet_fwd, "v3", n, "lecun_tanh", "max", h2=84, seed=9)
    assert [name for name, _ in be.launch_log] == ["lenet_fwd_v4", "lenet_fwd_v3"]
    assert np.array_equal(got, v3), np.abs(got - v3).max()


@sim
def test_sim_v4_falls_back_within_48k_when_the_opt_in_fails(monkeypatch):
    """Where the opt-in past 48 KiB fails (numba-cuda internals moved; here allow_shared raises), the default plan's
    16-image launch becomes lenet_fwd_v4 at 8 images a block (40,896 B: no opt-in needed), with one RuntimeWarning
    that names the cause; later calls plan so without trying again. The logits are the 16-image plan's bits."""
    from lenet_gpu.backends.numba_backend import common
    from tests import fused_helpers as F

    lf = _lf()
    n = 16
    monkeypatch.setattr(lf, "LF4_BLOCKS_PER_SM", 1)
    monkeypatch.setattr(lf, "OPT_IN_FAILURE", [])
    monkeypatch.setattr(lf, "_OPTED_IN", set())
    be = F.NumbaShim(max_blocks=2)
    be.sm_count = 1
    want = F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "relu", "avg", h2=84, seed=4)  # 16 images, opted in (no-op)
    calls, launches = [], []

    def broken(*a):
        calls.append(a)
        raise AttributeError("'CUDACodeLibrary' object has no attribute 'get_cufunc'")

    def spy(be_, name, kernel, grid, block, smem, *args):
        launches.append((name, grid, smem, int(args[-4])))  # args[-4]: imgs
        return launch(be_, name, kernel, grid, block, smem, *args)

    launch = lf.launch_kernel
    assert lf._OPTED_IN == {("|u1", 53_696)}  # the first call's opt-in (a no-op here) is not repeated ...
    lf._OPTED_IN.clear()  # ... so forget it: the next call tries again, and fails
    monkeypatch.setattr(common, "allow_shared", broken)
    monkeypatch.setattr(lf, "launch_kernel", spy)
    with pytest.warns(RuntimeWarning, match="opt-in to 53696 bytes .* failed .*get_cufunc.*8 images a block"):
        got = F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "relu", "avg", h2=84, seed=4)
    assert launches == [("lenet_fwd_v4", 2, lf.v4_smem(8, 120, 84, 10), 8)] and len(calls) == 1
    assert lf.v4_smem(8, 120, 84, 10) <= 48 * 1024 and lf.OPT_IN_FAILURE
    assert np.array_equal(got, want), np.abs(got - want).max()
    again = F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "relu", "avg", h2=84, seed=4)  # no second try
    assert len(calls) == 1 and launches[-1] == launches[0] and np.array_equal(again, want)


@sim
def test_sim_v4_argmax_logits_none_and_float32_bits():
    """v4 at 8 images, batch 8 (one tile): uint8 images → logits + classes; → classes only (logits=None: a
    zero-size stand-in the simulator bounds-checks); float32 images normalised as the kernel normalises uint8 →
    logits + classes. Classes the first maximal logit (3 in the tie, never 7), v3's classes; the logits v3's bits,
    float32's the uint8 path's bits."""
    from lenet_gpu import reference as ref
    from tests import fused_helpers as F

    lf = _lf()
    n = 8
    be = F.NumbaShim()
    be.launch_log = []
    d = F.Dev(be)
    images, params = _inputs(n, 3)
    dpar = {k: d.put(v) for k, v in params.items()}
    want = ref.lenet_fwd(images, params, MEAN, STD, "relu", "max")

    def run(variant, x, with_logits=True):
        logits = d.put(F.nan_like((n, 10))) if with_logits else None
        classes = d.put(np.full((n,), -1, np.int64))
        lf.lenet_fwd(be, d.put(x), dpar, logits, MEAN, STD, "relu", "max", variant, classes=classes)
        return (d.get(logits) if with_logits else None), d.get(classes)

    got, cls = run("v4", images)
    F.assert_close(got, want, *F.TOL_LENET_FWD, what="lenet_fwd_v4 logits+classes")
    assert (got[:, 3] == got[:, 7]).all()
    np.testing.assert_array_equal(cls, np.full(n, 3))
    np.testing.assert_array_equal(cls, np.argmax(want, axis=1))
    _, cls_only = run("v4", images, with_logits=False)
    np.testing.assert_array_equal(cls_only, cls)
    v3, cls3 = run("v3", images)
    assert np.array_equal(got, v3) and np.array_equal(cls, cls3)
    scale, shift = np.float32(1.0 / (255.0 * STD)), np.float32(-MEAN / STD)
    got32, cls32 = run("v4", images.astype(np.float32) * scale + shift)
    assert np.array_equal(got32, got) and np.array_equal(cls32, cls)
    from numba.core import sigutils

    sigs = {"u8": lf.SIGNATURES["lenet_fwd_v4"], "f32": lf.REPORT_SIGNATURES["lenet_fwd_f32_v4"]}
    want_types = [tuple(sigutils.normalize_signature(sigs[k])[0]) for k in ("u8", "u8", "f32")]
    log = [(name, tuple(t)) for name, t in be.launch_log if name == "lenet_fwd_v4"]
    assert [name for name, _ in be.launch_log] == ["lenet_fwd_v4", "lenet_fwd_v4", "lenet_fwd_v3", "lenet_fwd_v4"]
    assert [t for _, t in log] == want_types


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n, imgs", [(4_000, 8), (10_000, 16)])
def test_gpu_default_plan_at_large_batches(n, imgs):
    """On a device, through NumbaBackend's launch path: v3's plan runs lenet_fwd_v4 (at 16 images the launch
    needs the > 48 KiB opt-in, allow_shared through Numba's driver) against the reference, and gives v3's own
    tiles' bits (those run when the backend plans for more SMs than the batch fills)."""
    from lenet_gpu.backends.numba_backend import NumbaBackend
    from tests import fused_helpers as F

    lf = _lf()
    be = NumbaBackend()
    be.sm_count = 132
    be.launch_log = []
    assert lf.plan_v4("v3", n, 120, 84, 132)[:3] == ("lenet_fwd_v4", -(-n // imgs), imgs)
    got = F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "relu", "max", seed=n)
    assert not lf.OPT_IN_FAILURE, f"the opt-in past 48 KiB failed (8 images a block instead): {lf.OPT_IN_FAILURE}"
    be.sm_count = 100_000
    want = F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "relu", "max", seed=n)
    assert [name for name, _ in be.launch_log][-2:] == ["lenet_fwd_v4", "lenet_fwd_v3"]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
