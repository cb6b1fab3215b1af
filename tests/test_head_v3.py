"""head_train v3 (kernels/head.cu, launched by cupy_backend/fused.py): a row of the batch a block, the geometry
compiled in, every product split across the warps and unrolled.

- In this process: the launch plan (v3 where v2 would take a row a block and the shared memory fits, v2's rows kernel
  beyond, wgrad v3 always, all in the module of the call's geometry); NVRTC sm_80 / sm_90 at LeNet-5's geometry (no
  warnings, spills, stack or .local; at most 64 registers: two blocks of 512 an SM; no integer div/rem in
  head_train_v3's PTX).
- On the CPU harness (``cupy-host``), in a child pytest process (``LENET_HEAD_V3_HOST_CHILD=1`` runs them directly;
  ``CUDACPU_SANITIZE=address|thread`` runs the child under that sanitizer): the routed form (yconv=None) for every
  activation, odd batches (1, 5, 7) in both pool modes, odd yconv (a trailing row and column), v3 against v2, the
  same bits twice, two launches a call (no allocation after the first), and that head_train_v3 is the kernel run.
Every activation × pool mode with yconv, odd shapes, F6 4,096 wide and batches over many wgrad chunks:
tests/test_fused.py (parametrized over fused.VARIANTS, v3 included).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.backends.cupy_backend import fused
from lenet_gpu.backends.cupy_backend.runtime import kernel_source
from tests import fused_helpers as F
from tests import sim_child
from tests.host_child import check_host_suite, host_suite

CHILD_ENV = "LENET_HEAD_V3_HOST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
ROOT = Path(__file__).resolve().parent.parent
host = pytest.mark.skipif(not IN_CHILD, reason="runs in test_host_suite_in_subprocess's child process")
parent = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process")
ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
LENET = (16, 10, 10, 120, 84, 10)  # C, H, W of C3's output; H1, H2, NC
ARCHS = ("sm_80", "sm_90")
INT_DIV = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)(?:\.[a-z]+)*\.[su](?:8|16|32|64)\b", re.M)


HOST_SUITE = host_suite(__file__, CHILD_ENV)


@parent
@sim_child.early(*filter(None, [HOST_SUITE]))
def test_host_suite_in_subprocess():
    check_host_suite(HOST_SUITE, __file__, CHILD_ENV, "head v3")


# ------------------------------------------------------------------------------------------------ plan
def test_plan_v3_a_row_a_block_then_v2():
    geom = dict(fused.head_v3_defines(fused.HEAD_LENET_GEOM, 120, 84, 10))
    assert geom == {"HEAD_C": 16, "HEAD_HP": 5, "HEAD_WP": 5, "HEAD_H": 10, "HEAD_W": 10, "HEAD_H1": 120,
                    "HEAD_H2": 84, "HEAD_NC": 10}
    for b in (1, 7, 64, 256, 264):
        a, w = fused.head_plan("v3", b, 400, 120, 84, 10)
        assert a.kernel == "head_train_v3" and a.grid == (b, 1, 1) and a.block == (512, 1, 1), a
        assert dict(a.defines) == geom and a.shared_mem == 4 * 12260 <= fused.SMEM_LIMIT, a
        assert w.kernel == "head_train_wgrad_v4" and dict(w.defines) == geom and w.grid[0] == 8 * 13 + 6 * 4 + 3 + 1
    for b, rows, tiled in ((265, 2, True), (1000, 4, True), (4096, 8, False)):  # v2's rows kernel, in v3's module
        a, w = fused.head_plan("v3", b, 400, 120, 84, 10, tiled=tiled)
        a2, _ = fused.head_plan("v2", b, 400, 120, 84, 10)
        assert a.kernel == "head_train_v2" and a.grid == a2.grid and a.shared_mem == a2.shared_mem, a
        assert dict(a.defines) == {**geom, "HEAD_ROWS": rows} and w.kernel == "head_train_wgrad_v4", a
        assert w.options("head") == a.options("head")  # one module
    a, _ = fused.head_plan("v3", 64, 400, 120, 2000, 10)  # w2 does not fit shared memory: v2's rows kernel
    assert a.kernel == "head_train_v2" and fused.head_v3_smem(400, 120, 2000, 10) > fused.SMEM_LIMIT
    a, _ = fused.head_plan("v3", 3, 18, 9, 5, 4, (3, 2, 3, 5, 7))  # any geometry: its own defines
    assert a.kernel == "head_train_v3" and ("HEAD_H", 5) in a.defines and ("HEAD_WP", 3) in a.defines
    with pytest.raises(ValueError, match="geometry"):
        fused.head_plan("v3", 3, 18, 9, 5, 4, (3, 2, 2, 4, 4))
    assert fused.DEFAULT_VARIANTS["head_train"] == "v3"


# ------------------------------------------------------------------------------------------------ NVRTC
@parent
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_no_spills_no_local_no_integer_division(arch):
    """head.cu at LeNet-5's geometry (the options v3's plan loads it with): no warnings; head_train_v3,
    head_train_wgrad_v3 and _v4 (the plan's) without spills, stack or .local; head_train_v3 within
    __launch_bounds__(512, 2)'s 64 registers and without integer div/rem in its PTX (wgrad v3 and v4 keep one: the
    stats row's STEP_IN_EPOCH mod S)."""
    from tests.conftest import require

    nvrtc = require("lenet_gpu.harness.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed")
    a, w = fused.head_plan("v3", 64, 400, 120, 84, 10)
    assert a.options("head") == w.options("head")  # one module for both launches
    res = nvrtc.compile_cuda(kernel_source("head"), arch=arch, options=a.options("head"), warnings_as_errors=True)
    ks = {k.kernel: k for k in res.kernels}
    for name in ("head_train_v3", "head_train_wgrad_v3", "head_train_wgrad_v4"):
        k = ks[name]
        print(name, arch, k.registers, "registers", k.shared_bytes, "static smem bytes")
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, k
        body = res.ptx[res.ptx.index(f".entry {name}("):]
        body = body[: body.find(".entry", 10)] if ".entry" in body[10:] else body
        assert ".local" not in body, name
        assert re.search(r"\bfma\.rn\.f32\b", body) and "bar.sync" in body  # the PTX is the kernel's
        if name == "head_train_v3":
            assert k.registers <= 64 and k.shared_bytes == 0, k
            assert not INT_DIV.findall(body), INT_DIV.findall(body)[:5]
            assert "shfl.sync.bfly" in body and "ld.global.nc.f32" in body
    assert ks["head_train_v3"].shared_bytes + a.shared_mem <= 48 * 1024


@parent
def test_int_div_pattern_finds_divisions():
    """The PTX pattern above finds run-time integer division and remainder (so its silence on v3 means something)."""
    from tests.conftest import require

    nvrtc = require("lenet_gpu.harness.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed")
    res = nvrtc.compile_cuda('extern "C" __global__ void k(int* a, int n) { a[0] = a[1] / n + a[2] % n; }',
                             arch="sm_90")
    assert len(INT_DIV.findall(res.ptx)) >= 2, res.ptx


# ------------------------------------------------------------------------------------------------ harness
_BE: dict = {}


@pytest.fixture
def hbe():
    if "be" not in _BE:
        from lenet_gpu.backends.cupy_backend.runtime import HostRuntime

        _BE["be"] = F.RuntimeShim(HostRuntime())
    return _BE["be"]


@host
@pytest.mark.parametrize("act", ACTS)
def test_host_routed_every_activation(hbe, act):
    F.check_routed(hbe, "v3", 5, act, seed=ACTS.index(act))


@host
@pytest.mark.parametrize("b", [1, 7])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_host_odd_batches_both_modes(hbe, b, mode):
    ran = F.kernels_run(hbe, lambda: F.check_head_train(hbe, fused.head_train, "v3", b, *LENET, "lecun_tanh", mode,
                                                       seed=b))
    assert ran == ["head_train_v3", "head_train_wgrad_v4"], ran


@host
def test_host_odd_yconv_trailing_taps(hbe):
    """yconv 11 x 9 over S4 5 x 4: a trailing row and column of taps no window covers (0 in dz_conv)."""
    F.check_head_train(hbe, fused.head_train, "v3", 3, 4, 11, 9, 24, 20, 10, "sigmoid", "max", seed=1)
    F.check_head_train(hbe, fused.head_train, "v3", 2, 4, 11, 9, 24, 20, 10, "relu", "avg", seed=2)


@host
def test_host_v3_agrees_with_v2(hbe):
    a = F.check_head_train(hbe, fused.head_train, "v2", 4, *LENET, "tanh", "max", seed=11)
    b = F.check_head_train(hbe, fused.head_train, "v3", 4, *LENET, "tanh", "max", seed=11)
    for k in ("h1", "h2", "logits", "dw1", "dw2", "dw3", "dz_conv"):
        F.assert_close(b[k], a[k].astype(np.float64), 1e-5, 1e-5, what=f"v3 vs v2 {k}")


@host
@pytest.mark.parametrize("b", [3, 300])
def test_host_wgrad_v4_gives_wgrad_v3s_bits(hbe, monkeypatch, b):
    """head_train_wgrad_v4 (the plan's: the chunk staging pipelined, every k step run) against head_train_wgrad_v3
    on the same rows: every output and the stats row bit for bit, at one round (batch 3: a partial chunk) and at
    three (batch 300: 10 chunks over 4 groups, the last partial)."""
    import dataclasses

    got: dict = {}
    ran = F.kernels_run(hbe, lambda: got.update(
        v4=F.check_head_train(hbe, fused.head_train, "v3", b, *LENET, "lecun_tanh", "max", seed=b)))
    assert ran[-1] == "head_train_wgrad_v4", ran
    plan = fused.head_plan

    def plan_with_wgrad_v3(*args, **kwargs):
        a, w = plan(*args, **kwargs)
        return a, dataclasses.replace(w, kernel="head_train_wgrad_v3")

    monkeypatch.setattr(fused, "head_plan", plan_with_wgrad_v3)
    monkeypatch.setattr(fused, "_HEAD_PLANS", {})
    ran = F.kernels_run(hbe, lambda: got.update(
        v3=F.check_head_train(hbe, fused.head_train, "v3", b, *LENET, "lecun_tanh", "max", seed=b)))
    assert ran[-1] == "head_train_wgrad_v3", ran
    for k in got["v4"]:
        assert np.array_equal(got["v4"][k].view(np.uint32), got["v3"][k].view(np.uint32)), k


@host
def test_host_repeats_bit_for_bit_two_launches():
    """Two launches a call, the scratch allocated once, the same bits every call (fused_helpers.check_head_repeats)."""
    F.check_head_repeats("v3", 6, 3)
