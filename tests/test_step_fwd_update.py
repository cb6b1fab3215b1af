"""Two ops of the four-kernel step (docs/step4.md) on the cupy backend: ``step_fwd`` (kernels/step_fwd.cu) and
``step_adam`` / ``step_sgd`` (kernels/step_update.cu).

- step_fwd on the CPU harness (``cupy-host``) against ``reference.step_fwd`` for every activation, batch 1 and odd
  batches, with augmentation (SHIFT > 0), a nonzero OFFSET and a permutation that wraps; outputs start as NaN /
  0xFF so an unwritten element fails; and bit for bit against the composition batch_prepare + 2 x
  conv2d_pool_fwd (v2, yconv=None) on the same backend (the same expressions summed in the same order).
- step_adam / step_sgd against the composition step_reduce + adam_step / sgd_step (a schedule whose row is srow)
  + step_advance on the same backend: p, m, v, g and the state bit for bit; weight decay on and off; S = 1 and 5;
  a state advance that starts a new epoch; a buffer length with a scalar tail.
- NVRTC (sm_80, sm_90): no warnings, no spills, no local memory; step_fwd's PTX has no integer div/rem.
- one launch an op, no allocation on a second call.
``pytest -m gpu tests/test_step_fwd_update.py`` runs the backend tests on a device."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lenet_gpu import reference as ref
from lenet_gpu.backends.cupy_backend import CupyBackend
from lenet_gpu.backends.cupy_backend.runtime import kernel_source
from lenet_gpu.spec import conv_prefix, param_layout
from lenet_gpu.stepstate import HostState, advance
from tests import fused_helpers as F
from tests.conftest import require
from tests.parity import TOL, assert_close, assert_equal, nan_like

ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
BACKENDS = ["cupy-host", pytest.param("cupy", marks=pytest.mark.gpu)]
MEAN, STD = 0.1307, 0.3081
_BACKENDS: dict[str, CupyBackend] = {}


@pytest.fixture(params=BACKENDS)
def be(request):
    if request.param not in _BACKENDS:  # one backend per process: modules compile once
        _BACKENDS[request.param] = CupyBackend(host=request.param == "cupy-host")
    return _BACKENDS[request.param]


# ------------------------------------------------------------------------------------------- step_fwd
def _fwd_inputs(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    n, m = 13, 11
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, :3] = 0  # a blank border, as digits have: shifted-in zeros and real zeros both occur
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    perm = rng.permutation(n)[:m].astype(np.int32)
    # OFFSET near the end of the permutation: the batch wraps around it (batch >= 3)
    state = HostState(step=7, sched_base=3, step_in_epoch=2, offset=m - 2, epoch=5, seed=987654321,
                      shift=2).to_array()
    sched = rng.random((6, 4), dtype=np.float32)
    params = {"c1.w": (rng.standard_normal((6, 1, 5, 5)) * 0.3).astype(np.float32),
              "c1.b": (rng.standard_normal(6) * 0.1).astype(np.float32),
              "c3.w": (rng.standard_normal((16, 6, 5, 5)) * 0.12).astype(np.float32),
              "c3.b": (rng.standard_normal(16) * 0.1).astype(np.float32)}
    return images, labels, perm, state, sched, params


def _fwd_outputs(be, batch: int) -> dict:
    shapes = {"srow": ((4,), np.float32), "x": ((batch, 1, 32, 32), np.float32), "y": ((batch,), np.int32),
              "p1": ((batch, 6, 14, 14), np.float32), "m1": ((batch, 6, 14, 14), np.uint8),
              "p3": ((batch, 16, 5, 5), np.float32), "m3": ((batch, 16, 5, 5), np.uint8)}
    return {k: be.to_device(nan_like(s, dt)) for k, (s, dt) in shapes.items()}


def _run_fwd(be, dev: dict, out: dict, act: str, variant: str | None = None) -> None:
    be.step_fwd(dev["images"], dev["labels"], dev["perm"], dev["state"], dev["sched"], out["srow"], out["x"],
                out["y"], dev["c1.w"], dev["c1.b"], out["p1"], out["m1"], dev["c3.w"], dev["c3.b"], out["p3"],
                out["m3"], MEAN, STD, act, variant=variant)


def _device(be, images, labels, perm, state, sched, params) -> dict:
    host = {"images": images, "labels": labels, "perm": perm, "state": state, "sched": sched, **params}
    return {k: be.to_device(v) for k, v in host.items()}


def _routes_where_clear(route, conv, want, margin: float, what: str) -> None:
    """route == want wherever the reference's winning value leads the runner-up of its 2x2 window by > margin."""
    n, k, h, w = conv.shape
    win = conv[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, k, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = np.sort(win.reshape(n, k, h // 2, w // 2, 4), axis=-1)
    clear = (win[..., 3] - win[..., 2]) > margin
    assert clear.mean() > 0.5, f"{what}: too few clear windows to test"
    assert_equal(np.asarray(route)[clear], np.asarray(want)[clear], what)


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("act", ACTS)
def test_step_fwd_matches_reference(be, act, batch, variant):
    """Odd batches: v2's last block holds one image."""
    images, labels, perm, state, sched, params = _fwd_inputs(batch, seed=batch)
    dev = _device(be, images, labels, perm, state, sched, params)
    out = _fwd_outputs(be, batch)
    _run_fwd(be, dev, out, act, variant)
    got = {k: be.to_host(v) for k, v in out.items()}
    r = ref.step_fwd(images, labels, perm, state, sched, batch, params, MEAN, STD, act)
    assert_close(got["x"], r["x"], *TOL["batch_prepare"], what="x")
    assert_equal(got["y"], r["y"], "y")
    assert_equal(got["srow"], r["srow"], "srow")
    assert_close(got["p1"], r["p1"], *TOL["conv2d_pool_fwd"], what="p1")
    # p3: two convolutions from uint8 pixels (the error of p1 carried through C3)
    assert_close(got["p3"], r["p3"], *TOL["lenet_fwd"], what="p3")
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    a1 = ref.conv2d_fwd(r["x"], p["c1.w"], p["c1.b"], act)
    a3 = ref.conv2d_fwd(r["p1"], p["c3.w"], p["c3.b"], act)
    _routes_where_clear(got["m1"], a1, r["m1"], 1e-4, "m1")
    _routes_where_clear(got["m3"], a3, r["m3"], 1e-4, "m3")
    assert got["m1"].max() <= 3 and got["m3"].max() <= 3
    if batch > 1:  # the batch wrapped around the permutation and the shifts are not all zero
        assert (int(state[3]) + batch) > perm.shape[0]


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("act", ACTS)
def test_step_fwd_equals_composition(be, act, variant):
    """batch_prepare + conv2d_pool_fwd (v2) x 2 on the same backend: the same float32 expressions in the same order
    (acc = 0; acc += x*w over channel, tap row, tap column; act(acc + b); first maximum), so bit for bit; v2's
    register tiles of 4 filters and two images a block keep every output's order, so v2 too."""
    batch = 3
    images, labels, perm, state, sched, params = _fwd_inputs(batch, seed=10 + batch)
    dev = _device(be, images, labels, perm, state, sched, params)
    out = _fwd_outputs(be, batch)
    _run_fwd(be, dev, out, act, variant)
    comp = _fwd_outputs(be, batch)
    be.batch_prepare(dev["images"], dev["labels"], dev["perm"], dev["state"], comp["x"], comp["y"], MEAN, STD)
    be.conv2d_pool_fwd(comp["x"], dev["c1.w"], dev["c1.b"], None, comp["p1"], comp["m1"], act, "max", variant="v2")
    be.conv2d_pool_fwd(comp["p1"], dev["c3.w"], dev["c3.b"], None, comp["p3"], comp["m3"], act, "max", variant="v2")
    for k in ("x", "y", "p1", "m1", "p3", "m3"):
        assert_equal(be.to_host(out[k]), be.to_host(comp[k]), k)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_step_fwd_schedule_row_clamps(be, variant):
    images, labels, perm, _, sched, params = _fwd_inputs(1, seed=3)
    for step, base, row in ((2, 5, 0), (4, 1, 3), (100, 0, 5)):
        state = HostState(step=step, sched_base=base, offset=0, shift=0).to_array()
        dev = _device(be, images, labels, perm, state, sched, params)
        out = _fwd_outputs(be, 1)
        _run_fwd(be, dev, out, "relu", variant)
        assert_equal(be.to_host(out["srow"]), sched[row], f"srow at step {step}, base {base}")


def test_step_fwd_default_takes_v2_once_its_blocks_fill_the_sms():
    """The default runs v2's kernel where ⌈B/2⌉ blocks give every SM its four (batch >= 1,055 on 132 SMs); a
    variant by name runs its own kernel at every batch."""
    be = CupyBackend(host=True)
    assert be.sm_count == 132 and be.default_variants["step_fwd"] == "v1"
    for b, want in ((64, "v1"), (1054, "v1"), (1055, "v2"), (4096, "v2")):
        assert be.step_fwd_kernel(None, b) == want, b
    assert be.step_fwd_kernel("v1", 4096) == "v1" and be.step_fwd_kernel("v2", 1) == "v2"


def test_step_fwd_default_runs_v2_on_a_small_gpu():
    """On a one-SM device the default takes v2 from batch 7 (⌈7/2⌉ = 4 blocks): the launch is v2's (grid 4) and
    gives v1's bits."""
    be = CupyBackend(host=True, sm_count=1)
    batch = 7
    images, labels, perm, state, sched, params = _fwd_inputs(batch, seed=31)
    dev = _device(be, images, labels, perm, state, sched, params)
    got = {}
    for variant in (None, "v1"):
        out = _fwd_outputs(be, batch)
        _run_fwd(be, dev, out, "sigmoid", variant)
        got[variant] = {k: be.to_host(v) for k, v in out.items()}
    (entry,) = [e for k, e in be._plans.items() if k[0] == "step_fwd" and k[1] is None]
    assert entry.launch.grid == (4, 1, 1), entry.launch
    for k in got["v1"]:
        assert_equal(got[None][k], got["v1"][k], f"default (v2) vs v1: {k}")


def test_step_fwd_checks_shapes(be):
    images, labels, perm, state, sched, params = _fwd_inputs(2, seed=4)
    dev = _device(be, images, labels, perm, state, sched, params)
    out = _fwd_outputs(be, 2)
    out["p3"] = be.to_device(nan_like((2, 16, 4, 4)))
    with pytest.raises((ValueError, TypeError)):
        _run_fwd(be, dev, out, "relu")


def test_step_fwd_block_matches_kernel():
    """The backend launches the block size the kernel's one-round stages are compiled for."""
    src = kernel_source("step_fwd")
    threads = int(re.search(r"#define SF_THREADS (\d+)", src).group(1))
    assert CupyBackend.STEP_FWD_THREADS == threads


# ------------------------------------------------------------------------------------------- update
HYPER_ADAM = (0.9, 0.999, 1e-8)


_update_inputs = F.step_update_inputs  # p, g, gpart, m, v, the schedule row, the state (both backends)


SIZES = [(param_layout()[1], conv_prefix()), (conv_prefix() + 130, conv_prefix())]  # LeNet-5; a scalar tail


@pytest.mark.parametrize("wrap", [True, False], ids=["wrap", "nowrap"])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"n{s[0]}")
def test_step_update_equals_composition(be, opt, groups, wd, size, wrap):
    n, nc = size
    batch = 8
    p, g, gpart, m, v, srow, state = _update_inputs(n, nc, groups, seed=groups + int(wd > 0), wrap=wrap)
    d = {k: be.to_device(a) for k, a in dict(p=p, g=g, gpart=gpart, m=m, v=v, srow=srow, state=state).items()}
    if opt == "adam":
        be.step_adam(d["p"], d["g"], d["gpart"], d["m"], d["v"], d["srow"], d["state"], batch, *HYPER_ADAM, wd)
    else:
        be.step_sgd(d["p"], d["g"], d["gpart"], d["m"], d["srow"], d["state"], batch, 0.9, wd)
    # the composition: the reduce on the host (reference.step_reduce), the optimizer and the advance on the backend
    g_red = g.copy()
    g_red[:nc] = ref.step_reduce(gpart)
    c = {k: be.to_device(a) for k, a in dict(p=p, g=g_red, m=m, v=v, sched=srow[None, :], state=state).items()}
    if opt == "adam":
        be.adam_step(c["p"], c["g"], c["m"], c["v"], c["sched"], c["state"], *HYPER_ADAM, wd)
    else:
        be.sgd_step(c["p"], c["g"], c["m"], c["sched"], c["state"], 0.9, wd)
    be.step_advance(c["state"], batch)
    assert_equal(be.to_host(d["g"]), g_red, "g")
    names = ("p", "m", "v", "state") if opt == "adam" else ("p", "m", "state")
    for k in names:
        assert_equal(be.to_host(d[k]), be.to_host(c[k]), k)
    if opt == "sgd":
        assert_equal(be.to_host(d["v"]), v, "v untouched")
    new = HostState.from_array(be.to_host(d["state"]))
    assert new == advance(HostState.from_array(state), batch)
    if wrap:
        assert (new.epoch, new.offset, new.step_in_epoch, new.step) == (3, 0, 0, 12)
    else:
        assert (new.epoch, new.offset, new.step_in_epoch, new.step) == (2, 40 + batch, 5, 12)
    assert not np.array_equal(be.to_host(d["p"]), p)  # the step moved the parameters


def test_step_update_checks(be):
    n, nc = SIZES[1]
    p, g, gpart, m, v, srow, state = _update_inputs(n, nc, 2, seed=9)
    d = {k: be.to_device(a) for k, a in dict(p=p, g=g, m=m, v=v, srow=srow, state=state).items()}
    bad = be.to_device(np.zeros((2, nc - 2), np.float32))  # a row length not a multiple of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        be.step_adam(d["p"], d["g"], bad, d["m"], d["v"], d["srow"], d["state"], 4, *HYPER_ADAM, 0.0)


# ------------------------------------------------------------------------------------------- launches
def test_one_launch_each_and_no_allocation(be):
    batch = 4
    images, labels, perm, state, sched, params = _fwd_inputs(batch, seed=21)
    dev = _device(be, images, labels, perm, state, sched, params)
    out = _fwd_outputs(be, batch)
    n, nc = SIZES[0]
    p, g, gpart, m, v, srow, st = _update_inputs(n, nc, 3, seed=22)
    u = {k: be.to_device(a) for k, a in dict(p=p, g=g, gpart=gpart, m=m, v=v, srow=srow, state=st).items()}

    def ops():
        _run_fwd(be, dev, out, "tanh")
        be.step_adam(u["p"], u["g"], u["gpart"], u["m"], u["v"], u["srow"], u["state"], batch, *HYPER_ADAM, 1e-4)
        be.step_sgd(u["p"], u["g"], u["gpart"], u["m"], u["srow"], u["state"], batch, 0.9, 1e-4)

    for call in range(2):
        before = be.counters.snapshot()
        ops()
        since = be.counters.since(before)
        assert since["launches"] == 3, since
        if call:
            assert since == {"launches": 3, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}


def test_variants_listed():
    be = CupyBackend(host=True)
    assert be.variants["step_fwd"] == ("v1", "v2")
    for op in ("step_adam", "step_sgd"):
        assert be.variants[op] == ("v1",)
    for op in ("step_fwd", "step_adam", "step_sgd"):
        assert be.default_variants[op] == "v1"


# ------------------------------------------------------------------------------------------- NVRTC
ARCHS = ("sm_80", "sm_90")
#: integer division or remainder (32- or 64-bit, signed or unsigned) in PTX
INT_DIV = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)(?:\.[a-z]+)*\.[su](?:32|64)\b", re.M)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem", ["step_fwd", "step_update"])
def test_nvrtc_no_spills(stem, arch):
    require("cuda.bindings.nvrtc", "NVRTC compiles need cuda-bindings")
    from lenet_gpu.harness import nvrtc

    res = nvrtc.compile_cuda(kernel_source(stem), arch=arch, warnings_as_errors=True)
    want = {"step_fwd": {"step_fwd_v1", "step_fwd_v2"}, "step_update": {"step_adam_v1", "step_sgd_v1"}}[stem]
    assert want <= {k.kernel for k in res.kernels}
    for k in res.kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, f"{k.kernel} on {arch}: {k}"
    assert ".local" not in res.ptx and "ld.local" not in res.ptx and "st.local" not in res.ptx
    if stem == "step_fwd":
        for k in res.kernels:
            assert k.registers <= 64, k  # __launch_bounds__(256, 4)
        bad = INT_DIV.findall(res.ptx)
        assert not bad, f"integer div/rem in step_fwd's PTX ({arch}): {bad[:5]}"


def test_int_div_pattern_finds_divisions():
    """The PTX pattern above does find integer divisions (so its silence on step_fwd means something)."""
    require("cuda.bindings.nvrtc", "NVRTC compiles need cuda-bindings")
    from lenet_gpu.harness import nvrtc

    src = 'extern "C" __global__ void k(int* a, long long* b, int m) { a[0] /= m; a[1] %= m; b[0] %= m; }'
    res = nvrtc.compile_cuda(src, arch="sm_90")
    assert len(INT_DIV.findall(res.ptx)) >= 3, res.ptx
