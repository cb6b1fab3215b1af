"""head_train v4 (kernels/head.cu, launched by cupy_backend/fused.py): the large-batch rows kernel, register-tiled
products over 8, 16 or 32 rows of the batch a block, the geometry compiled in.

- In this process: the plan (v3's default plan takes v4's rows kernel once its blocks fill the SMs, v2's below that
  and without ``tiled``; v4 by name at every batch; rows a block by the batch; v2's rows where v4's shared memory
  does not fit); NVRTC sm_80 / sm_90 at 8, 16 and 32 rows (no warnings, spills, stack or .local, no integer div/rem,
  static shared memory = fused.head_v4_smem, within the launch bounds' 128 registers).
- On the CPU harness (``cupy-host``), in a child pytest process (``LENET_HEAD_V4_HOST_CHILD=1`` runs them directly;
  ``CUDACPU_SANITIZE=address|thread`` runs the child under that sanitizer): the routed form (yconv=None) for every
  activation; the 16- and 32-row bodies with a partial last block (forced by a smaller fill target); the default
  plan running v4's kernel; odd yconv (a trailing row and column); v4 against v3; the same bits twice.
Every activation × pool mode with yconv, odd shapes, F6 4,096 wide (v2's rows: v4's shared memory does not fit) and
batches over many wgrad chunks: tests/test_fused.py (parametrized over fused.VARIANTS, v4 included), and the
act × pool matrix (tests/test_matrix.py) on cupy-host.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from lenet_gpu.backends.cupy_backend import fused
from lenet_gpu.backends.cupy_backend.runtime import kernel_source
from tests import fused_helpers as F
from tests import sim_child
from tests.host_child import check_host_suite, host_suite

CHILD_ENV = "LENET_HEAD_V4_HOST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
host = pytest.mark.skipif(not IN_CHILD, reason="runs in test_host_suite_in_subprocess's child process")
parent = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process")
ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
LENET = (16, 10, 10, 120, 84, 10)  # C, H, W of C3's output; H1, H2, NC
ARCHS = ("sm_80", "sm_90")
INT_DIV = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)(?:\.[a-z]+)*\.[su](?:8|16|32|64)\b", re.M)
KERNELS = ["head_train_v4", "head_train_wgrad_v4"]

HOST_SUITE = host_suite(__file__, CHILD_ENV)


@parent
@sim_child.early(*filter(None, [HOST_SUITE]))
def test_host_suite_in_subprocess():
    check_host_suite(HOST_SUITE, __file__, CHILD_ENV, "head v4")


# ------------------------------------------------------------------------------------------------ plan
def test_plan_default_takes_v4_once_its_blocks_fill_the_sms():
    geom = dict(fused.head_v3_defines(fused.HEAD_LENET_GEOM, 120, 84, 10))
    assert fused.HEAD4_FILL_BLOCKS == 132 and fused.HEAD4_ROWS_CHOICES == (32, 16, 8)
    for b, rows in ((1049, 8), (2096, 8), (2097, 16), (4096, 16), (4192, 16), (4193, 32), (60000, 32)):
        assert fused.head4_rows(b) == rows, b
        a, w = fused.head_plan("v3", b, 400, 120, 84, 10)
        assert a.kernel == "head_train_v4" and a.grid == (-(-b // rows), 1, 1) and a.block == (8 * rows, 1, 1), a
        assert a.shared_mem == 0 and dict(a.defines) == {**geom, "HEAD4_ROWS": rows}, a
        assert w.kernel == "head_train_wgrad_v4" and w.options("head") == a.options("head")  # one module
        a2, _ = fused.head_plan("v3", b, 400, 120, 84, 10, tiled=False)  # a backend without v4: v2's rows
        assert a2.kernel == "head_train_v2", a2
    for b in (265, 1000, 1048):  # below one 8-row block an SM: v2's rows kernel
        assert fused.head_plan("v3", b, 400, 120, 84, 10)[0].kernel == "head_train_v2", b
    for b in (1, 7, 64, 264):  # v3's own batches are unchanged
        assert fused.head_plan("v3", b, 400, 120, 84, 10)[0].kernel == "head_train_v3", b


def test_plan_v4_by_name_at_every_batch():
    for b, rows in ((1, 8), (37, 8), (64, 8), (4096, 16)):
        a, w = fused.head_plan("v4", b, 400, 120, 84, 10)
        assert a.kernel == "head_train_v4" and dict(a.defines)["HEAD4_ROWS"] == rows, a
        assert w.kernel == "head_train_wgrad_v4" and w.block == (fused.HEAD_WG_THREADS["v4"], 1, 1), w
    # F6 4,096 wide: 8 rows of h2 alone are 128 KiB; v2's rows kernel (one row a block) in v4's module
    a, _ = fused.head_plan("v4", 2, 400, 7, 4096, 10)
    assert a.kernel == "head_train_v2" and fused.head_v4_smem(8, 7, 4096, 10) > fused.SMEM_LIMIT
    assert fused.head_v4_smem(32, 120, 84, 10) <= fused.SMEM_LIMIT  # LeNet-5 fits at every rows choice
    with pytest.raises(ValueError, match="geometry"):
        fused.head_plan("v4", 3, 18, 9, 5, 4, (3, 2, 2, 4, 4))


# ------------------------------------------------------------------------------------------------ NVRTC
@parent
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_no_spills_no_local_no_integer_division(arch):
    """head.cu as v4's plans load it at 8, 16 and 32 rows a block: no warnings; head_train_v4 without spills, stack
    or .local, within __launch_bounds__(8 * rows, 512 / (8 * rows))'s 128 registers, no integer div/rem in its PTX,
    and its static shared memory as fused.head_v4_smem (the plan's check against the 48 KiB limit)."""
    from tests.conftest import require

    nvrtc = require("lenet_gpu.harness.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed")
    for b, rows in ((1056, 8), (4096, 16), (60000, 32)):
        a, w = fused.head_plan("v3", b, 400, 120, 84, 10)
        assert dict(a.defines)["HEAD4_ROWS"] == rows
        res = nvrtc.compile_cuda(kernel_source("head"), arch=arch, options=a.options("head"), warnings_as_errors=True)
        k = {k.kernel: k for k in res.kernels}["head_train_v4"]
        print("head_train_v4", rows, arch, k.registers, "registers", k.shared_bytes, "static smem bytes")
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, k
        assert k.registers <= 128 and k.shared_bytes == fused.head_v4_smem(rows, 120, 84, 10), k
        body = res.ptx[res.ptx.index(".entry head_train_v4("):]
        body = body[: body.find(".entry", 10)] if ".entry" in body[10:] else body
        assert ".local" not in body
        assert not INT_DIV.findall(body), INT_DIV.findall(body)[:5]
        assert len(re.findall(r"\bfma\.rn\.f32\b", body)) >= 16 * 20, "the register tiles' FMAs are not unrolled"
        assert "bar.sync" in body and "ld.global.nc.f32" in body


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
    F.check_routed(hbe, "v4", 5, act, seed=20 + ACTS.index(act))


@host
@pytest.mark.parametrize("fill,rows", [(3, 16), (2, 32)])
def test_host_rows_bodies_with_a_partial_block(hbe, monkeypatch, fill, rows):
    """The 16- and 32-row bodies (chosen from batch 2,097 and 4,193), forced by a smaller fill target; 37 rows
    leave a partial last block (its rows past the batch read as zeros and are never written)."""
    monkeypatch.setattr(fused, "HEAD4_FILL_BLOCKS", fill)
    assert dict(fused.head_plan("v4", 37, 400, 120, 84, 10)[0].defines)["HEAD4_ROWS"] == rows
    ran = F.kernels_run(hbe, lambda: F.check_head_train(hbe, fused.head_train, "v4", 37, *LENET, "tanh", "max",
                                                        seed=rows))
    assert ran == KERNELS, ran
    F.check_head_train(hbe, fused.head_train, "v4", 37, *LENET, "sigmoid", "avg", seed=rows + 1)
    F.check_routed(hbe, "v4", 37, "relu", seed=rows + 2)


@host
def test_host_default_plan_runs_v4(hbe, monkeypatch):
    """The default variant (v3's plan) runs v4's rows kernel once the batch is past v3's and fills the SMs with
    8-row blocks: both thresholds lowered so that 21 rows cross them."""
    monkeypatch.setattr(fused, "HEAD_FILL_BLOCKS", 4)
    monkeypatch.setattr(fused, "HEAD4_FILL_BLOCKS", 3)
    ran = F.kernels_run(hbe, lambda: F.check_head_train(hbe, fused.head_train, None, 21, *LENET, "relu", "max",
                                                        seed=5))
    assert ran == KERNELS, ran


@host
def test_host_plan_once_per_shape(hbe, monkeypatch):
    """head_train plans a call shape once (a training step repeats its shapes), and again when a fill target
    changes (it is part of the plan's key)."""
    calls: list[tuple] = []
    real = fused.head_plan

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(fused, "head_plan", counting)
    for _ in range(2):
        F.check_head_train(hbe, fused.head_train, "v4", 13, *LENET, "relu", "max", seed=4)
    assert len(calls) == 1, calls
    monkeypatch.setattr(fused, "HEAD4_FILL_BLOCKS", 1)
    ran = F.kernels_run(hbe, lambda: F.check_head_train(hbe, fused.head_train, "v4", 13, *LENET, "relu", "max",
                                                        seed=4))
    assert len(calls) == 2 and ran == KERNELS, (calls, ran)


@host
def test_host_odd_yconv_trailing_taps(hbe):
    """yconv 11 x 9 over S4 5 x 4: a trailing row and column of taps no window covers (0 in dz_conv)."""
    F.check_head_train(hbe, fused.head_train, "v4", 3, 4, 11, 9, 24, 20, 10, "sigmoid", "max", seed=1)
    F.check_head_train(hbe, fused.head_train, "v4", 9, 4, 11, 9, 24, 20, 10, "relu", "avg", seed=2)


@host
def test_host_v4_agrees_with_v3(hbe):
    a = F.check_head_train(hbe, fused.head_train, "v3", 11, *LENET, "tanh", "max", seed=11)
    b = F.check_head_train(hbe, fused.head_train, "v4", 11, *LENET, "tanh", "max", seed=11)
    for k in ("h1", "h2", "logits", "dw1", "dw2", "dw3", "dz_conv"):
        F.assert_close(b[k], a[k].astype(np.float64), 1e-5, 1e-5, what=f"v4 vs v3 {k}")


@host
def test_host_repeats_bit_for_bit_two_launches():
    """Two launches a call, the scratch allocated once, the same bits every call (fused_helpers.check_head_repeats)."""
    F.check_head_repeats("v4", 10, 9)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def gpu_cupy():
    from lenet_gpu.backends.cupy_backend.runtime import CupyRuntime

    return F.RuntimeShim(CupyRuntime(graphs=False))


@pytest.mark.gpu
@pytest.mark.parametrize("b,rows", [(1049, 8), (4096, 16), (4500, 32)])
def test_gpu_default_plan_at_large_batches(gpu_cupy, b, rows):
    """On a device: the default plan's v4 rows kernel at each rows a block (a partial last block at 1,049 and
    4,500) against the reference, routed and with yconv, and the same bits twice."""
    assert dict(fused.head_plan("v3", b, 400, 120, 84, 10)[0].defines)["HEAD4_ROWS"] == rows
    ran = F.kernels_run(gpu_cupy, lambda: F.check_head_train(gpu_cupy, fused.head_train, None, b, *LENET, "relu",
                                                             "max", seed=b))
    assert ran == KERNELS, ran
    F.check_head_train(gpu_cupy, fused.head_train, None, b, *LENET, "tanh", "avg", seed=b + 1)
    r1 = F.check_routed(gpu_cupy, "v4", b, "relu", seed=b + 2)
    r2 = F.check_routed(gpu_cupy, "v4", b, "relu", seed=b + 2)
    for k in r1:
        assert np.array_equal(r1[k], r2[k]), k
