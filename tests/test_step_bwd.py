"""step_bwd on the cupy backend (kernels/step_bwd.cu, docs/step4.md): the four-kernel step's conv backward in one
launch. NVRTC for sm_80 / sm_90 in this process (no warnings, spills, local memory or integer division); the kernel
on the CPU harness (``cupy-host``) in a child pytest process (``LENET_STEP_BWD_HOST_CHILD=1`` runs them directly):
parity against reference.step_bwd (float64) for every activation at batch 1 and an odd batch with S = 1, 2, B and
S > B (empty groups: zero rows), padding columns exactly 0; the rows summed against the routed ops run on the whole
batch; two runs bit for bit; one launch and no allocation a call; shape errors; step_groups.
``pytest -m gpu tests/test_step_bwd.py`` runs the same on a device."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.backends.cupy_backend import CupyBackend, kernel_source
from lenet_gpu.spec import conv_prefix, param_layout
from tests import fused_helpers as F
from tests import sim_child
from tests.host_child import check_host_suite, host_suite
from tests.parity import TOL, assert_close, assert_equal, nan_like

CHILD_ENV = "LENET_STEP_BWD_HOST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["cupy-host"] if IN_CHILD else [pytest.param("cupy", marks=pytest.mark.gpu)]
parent_only = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process")
ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
F64 = np.float64
ARCHS = ("sm_80", "sm_90")

_BACKENDS: dict[str, CupyBackend] = {}


@pytest.fixture(params=BACKENDS)
def be(request):
    if request.param not in _BACKENDS:  # one backend per process: the module compiles once
        _BACKENDS[request.param] = CupyBackend(host=request.param == "cupy-host")
    return _BACKENDS[request.param]


HOST_SUITE = host_suite(__file__, CHILD_ENV)


@parent_only
@sim_child.early(*filter(None, [HOST_SUITE]))
def test_host_suite_in_subprocess():
    """Every backend test below on the CPU harness, in a child process (a wild pointer kills the process running it)."""
    check_host_suite(HOST_SUITE, __file__, CHILD_ENV, "step_bwd")


# ------------------------------------------------------------------------------------------------ inputs
step_inputs = F.step_bwd_inputs  # x, p1, gz3, routes m3 / m1, w3 (shared with the other backend's tests)


NAMES = ("x", "p1", "gz3", "m3", "m1", "w3")


def run_step_bwd(be, inp: dict, groups: int, act: str, variant: str | None = None) -> np.ndarray:
    dev = [be.to_device(inp[k]) for k in NAMES]
    gpart = be.to_device(nan_like((groups, conv_prefix())))  # unwritten columns stay NaN and fail
    be.step_bwd(*dev, gpart, act, variant)
    return be.to_host(gpart)


def reference(inp: dict, groups: int, act: str) -> np.ndarray:
    return ref.step_bwd(*(inp[k].astype(F64) if inp[k].dtype == np.float32 else inp[k] for k in NAMES), act, groups)


_SPECS = {s.name: s for s in param_layout()[0]}
#: per output the tolerance of the routed op that makes it: C3's weight gradient is one routed weight gradient;
#: C1's chains C3's routed data gradient (TOL conv2d_bwd_data_routed, relative to gz1) into a routed weight gradient
#: over 196 windows an image, so it carries the weight gradient's bound
PARTS = {"c1.w": "conv2d_bwd_weight_routed", "c1.b": "conv2d_bwd_weight_routed",
         "c3.w": "conv2d_bwd_weight_routed", "c3.b": "conv2d_bwd_weight_routed"}


def check_rows(got: np.ndarray, want: np.ndarray, what: str) -> None:
    pad = np.ones(conv_prefix(), bool)
    for name, op in PARTS.items():
        sp = _SPECS[name]
        sl = slice(sp.offset, sp.offset + sp.size)
        pad[sl] = False
        assert_close(got[:, sl], want[:, sl], *TOL[op], what=f"{what} {name}")
    assert pad.sum() == conv_prefix() - (150 + 6 + 2400 + 16)
    assert_equal(got[:, pad], np.zeros_like(got[:, pad]), f"{what} padding columns")


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("act", ACTS)
def test_step_bwd_matches_reference(be, act):
    """Batch 1 (S = 1, 3), batch 5 with S = 1, 2, 5 and 7 (chunk 1: groups 5, 6 empty -> zero rows), and batch 64
    in one group (the longest accumulation chains of the set)."""
    for b, groups in ((1, 1), (1, 3), (5, 1), (5, 2), (5, 5), (5, 7), (64, 1)):
        inp = step_inputs(b, act, seed=b + groups)
        got = run_step_bwd(be, inp, groups, act)
        want = reference(inp, groups, act)
        check_rows(got, want, f"step_bwd {act} B={b} S={groups}")
        for s, g in enumerate(ref.step_groups(b, groups)):
            if g.start == g.stop:
                assert_equal(got[s], np.zeros(conv_prefix(), np.float32), f"empty group {s} row")


def test_v2_is_the_default_and_gives_v1s_bits(be):
    """v2 (a thread owns one filter's 10 weights, a window's gz3 and route loaded once for them) sums every weight
    as v1 does: the same bits, with several images a group, several groups and an empty one, every activation's
    act' in gz1 (relu's zeros included)."""
    assert be.default_variants["step_bwd"] == "v2" and be.variants["step_bwd"] == ("v1", "v2")
    for act, b, groups in (("relu", 9, 4), ("tanh", 5, 7), ("sigmoid", 64, 1)):
        inp = step_inputs(b, act, seed=20 + b)
        v1 = run_step_bwd(be, inp, groups, act, "v1")
        assert_equal(run_step_bwd(be, inp, groups, act, "v2"), v1, f"step_bwd v2 vs v1 {act} B={b} S={groups}")
        check_rows(v1, reference(inp, groups, act), f"step_bwd v1 {act} B={b} S={groups}")


def test_rows_sum_to_the_routed_ops(be):
    """step_reduce(gpart) (4 groups of batch 6: 2, 2, 2, 0 images) against the cupy routed ops on the whole batch:
    conv2d_bwd_weight_routed (C3), conv2d_bwd_data_routed (gz1), conv2d_bwd_weight_routed (C1)."""
    act, b = "lecun_tanh", 6
    inp = step_inputs(b, act, seed=11)
    total = ref.step_reduce(run_step_bwd(be, inp, 4, act))
    d = {k: be.to_device(inp[k]) for k in NAMES}
    dw3, db3 = be.to_device(nan_like((16, 6, 5, 5))), be.to_device(nan_like((16,)))
    be.conv2d_bwd_weight_routed(d["p1"], d["gz3"], d["m3"], dw3, db3)
    gz1 = be.to_device(nan_like((b, 6, 14, 14)))
    be.conv2d_bwd_data_routed(d["gz3"], d["w3"], d["m3"], d["p1"], gz1, act)
    dw1, db1 = be.to_device(nan_like((6, 1, 5, 5))), be.to_device(nan_like((6,)))
    be.conv2d_bwd_weight_routed(d["x"], gz1, d["m1"], dw1, db1)
    for name, arr in (("c1.w", dw1), ("c1.b", db1), ("c3.w", dw3), ("c3.b", db3)):
        sp = _SPECS[name]
        want = be.to_host(arr).ravel()
        assert_close(total[sp.offset : sp.offset + sp.size], want, *TOL["conv2d_bwd_weight_routed"],
                     what=f"step_reduce(step_bwd) vs routed ops {name}")


def test_repeats_bit_for_bit_one_launch_no_allocation(be):
    inp = step_inputs(7, "sigmoid", seed=3)
    dev = [be.to_device(inp[k]) for k in NAMES]
    outs = []
    for i in range(2):
        gpart = be.to_device(nan_like((3, conv_prefix())))
        before = be.counters.snapshot()
        be.step_bwd(*dev, gpart, "sigmoid")
        delta = be.counters.since(before)
        assert delta["launches"] == 1 and delta["h2d"] == 0 and delta["d2h"] == 0 and delta["syncs"] == 0, delta
        if i == 1:  # the plan is cached: no allocation at all
            assert delta["allocs"] == 0, delta
        outs.append(be.to_host(gpart))
    assert_equal(outs[0], outs[1], "step_bwd repeat")


def test_refuses_bad_shapes(be):
    inp = step_inputs(2, "relu", seed=5)
    dev = {k: be.to_device(inp[k]) for k in NAMES}
    args = [dev[k] for k in NAMES]
    with pytest.raises(ValueError, match="gpart"):
        be.step_bwd(*args, be.to_device(nan_like((2, conv_prefix() - 1))), "relu")
    with pytest.raises(ValueError, match="x"):
        be.step_bwd(be.to_device(nan_like((2, 1, 28, 28))), *args[1:], be.to_device(nan_like((2, conv_prefix()))),
                    "relu")
    with pytest.raises(ValueError, match="p1"):
        be.step_bwd(dev["x"], be.to_device(nan_like((2, 6, 14, 13))), *args[2:],
                    be.to_device(nan_like((2, conv_prefix()))), "relu")
    with pytest.raises(TypeError, match="m3"):
        be.step_bwd(*args[:3], be.to_device(inp["m3"].astype(np.float32)), *args[4:],
                    be.to_device(nan_like((2, conv_prefix()))), "relu")
    with pytest.raises(ValueError, match="activation"):
        be.step_bwd(*args, be.to_device(nan_like((2, conv_prefix()))), "softplus")


def test_step_groups(be):
    for batch, want in ((1, 1), (5, 5), (64, 64), (264, 264), (265, 133), (4096, 256), (60000, 264)):
        got = be.step_groups(batch) if be.sm_count == 132 else CupyBackend(host=True, sm_count=132).step_groups(batch)
        assert got == want, (batch, got)
        chunk = -(-batch // got)
        assert 1 <= got <= batch and all(g.stop > g.start for g in ref.step_groups(batch, got)), batch
        assert chunk == -(-batch // (2 * 132))
    with pytest.raises(ValueError):
        be.step_groups(0)


# ------------------------------------------------------------------------------------------------ NVRTC
@parent_only
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_no_spills_no_local_no_integer_division(arch):
    """step_bwd.cu compiles without warnings; step_bwd_v1 and _v2 keep everything in registers and shared memory (no
    spill, no stack, no .local), fit 48 KB of static shared memory and 2 (v1) / 3 (v2) blocks of 256 threads an SM's
    registers, and their PTX has no integer div./rem. (the LeNet geometry is compiled in; chunk comes from the
    host)."""
    from tests.conftest import require

    nvrtc = require("lenet_gpu.harness.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed")
    res = nvrtc.compile_cuda(kernel_source("step_bwd"), arch=arch, warnings_as_errors=True)
    entries = [res.ptx.index(f".entry step_bwd_{v}") for v in ("v1", "v2")]
    for v, blocks in (("v1", 2), ("v2", 3)):
        (k,) = [k for k in res.kernels if k.kernel == f"step_bwd_{v}"]
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, k
        assert k.shared_bytes <= 48 * 1024 and k.registers * 256 * blocks <= 65536, k
        start = res.ptx.index(f".entry step_bwd_{v}")
        body = res.ptx[start : min([e for e in entries if e > start], default=len(res.ptx))]
        assert ".local" not in body
        int_div = [ln for ln in body.splitlines() if re.search(r"\b(div|rem)\.(s|u)(8|16|32|64)\b", ln)]
        assert not int_div, int_div[:5]
        assert re.search(r"\bfma\.rn\.f32\b", body) and "bar.sync" in body  # the PTX is the kernel's
