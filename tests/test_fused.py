"""The fused ops head_train and lenet_fwd: CUDA C (kernels/head.cu, kernels/lenet_fwd.cu through
cupy_backend/fused.py) and Numba (numba_backend/head.py, lenet_fwd.py), against the float64 reference.

Where each part runs:
- NVRTC (sm_80, sm_90; warnings are errors; no spills; static + dynamic shared memory ≤ 48 KiB at the launch
  shapes) and Numba's compile_ptx (no float64, no spills, no stack): in this process.
- ``host_*``: the CUDA C kernels on the CPU harness (``cupy-host``), in a child pytest process started by
  ``test_host_suite_in_subprocess`` (a wild pointer kills the process that runs it). ``LENET_FUSED_HOST_CHILD=1``
  runs them directly.
- ``sim_*``: the Numba kernels in the CUDA simulator, in a child process with ``NUMBA_ENABLE_CUDASIM=1``
  started by ``test_simulator_suite``.
- ``gpu_*`` (marked ``gpu``): the same checks at LeNet-5 sizes (batch 64, 256, 1000) on a real device.

The wrappers take the backend as their first parameter; these tests call them with small shims over a bare
runtime (tests/fused_helpers.py), so they do not depend on the rest of either backend; ``*_binding`` tests check
the two-line binding into the real backend classes where those construct.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu.backends.cupy_backend import fused
from lenet_gpu.backends.cupy_backend.runtime import kernel_source
from lenet_gpu.reference import ACTIVATIONS
from tests import fused_helpers as F
from tests import sim_child
from tests.conftest import require
from tests.host_child import host_suite

ROOT = Path(__file__).resolve().parent.parent
HOST_ENV = "LENET_FUSED_HOST_CHILD"
IN_HOST = os.environ.get(HOST_ENV) == "1"
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
IN_CHILD = IN_HOST or SIM
host = pytest.mark.skipif(not IN_HOST, reason="runs in test_host_suite_in_subprocess's child process")
sim = pytest.mark.skipif(not SIM, reason="runs in test_simulator_suite's NUMBA_ENABLE_CUDASIM=1 child process")
parent = pytest.mark.skipif(IN_CHILD, reason="runs in the parent pytest process")
ARCHS = ("sm_80", "sm_90")
MODES = ("max", "avg")
ACTS = tuple(a for a in ACTIVATIONS if a != "identity")  # the network's activations (identity: the output layer)
LENET = (16, 10, 10, 120, 84, 10)  # C, H, W of C3's output; H1, H2, NC


def _run_child(env_extra: dict[str, str], select: str, timeout: int) -> str:
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-k", select, "--durations=5", "-rs", "-W", "ignore::DeprecationWarning"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = r.stdout[-20000:] + ("\n--- stderr ---\n" + r.stderr[-4000:] if r.stderr.strip() else "")
    assert r.returncode == 0, f"child pytest ({select}) exited with {r.returncode}:\n{out}"
    assert " failed" not in r.stdout, out
    # a child in which every test skipped checked nothing: that is a failure, not a skip
    assert " passed" in r.stdout, f"no {select}* test passed in the child:\n{out[-3000:]}"
    return out


HOST_SUITE = host_suite(__file__, HOST_ENV, os.environ.get("LENET_FUSED_HOST_K", "host_"))


@parent
@sim_child.early(*filter(None, [HOST_SUITE]))
def test_host_suite_in_subprocess():
    """Every host_* test (the CUDA C kernels on the CPU harness), in a child process."""
    if HOST_SUITE is None:  # under a sanitizer
        print(_run_child({HOST_ENV: "1"}, os.environ.get("LENET_FUSED_HOST_K", "host_"), 1200)[-3000:])
    else:
        print(sim_child.result(HOST_SUITE)[-3000:])


SIM_SUITE = sim_child.Child(__file__, "sim_", args=("-rs",))


@parent
@pytest.mark.sim
@sim_child.early(SIM_SUITE)
def test_simulator_suite():
    """Every sim_* test (the Numba kernels in the CUDA simulator), in a child process."""
    require("numba", "the simulator suite needs it")
    print(sim_child.result(SIM_SUITE)[-3000:])


# ------------------------------------------------------------------------------------------- launch plans
def test_head_plan_rows_spread_the_batch():
    """Small batches get one row per block (the batch spreads over the GPU), large ones up to 8; v2's shared
    memory fits 48 KiB, also at F6 = 4096 (one row a block)."""
    for b, rows in ((1, 1), (64, 1), (264, 1), (265, 2), (1000, 4), (1056, 4), (1057, 8), (4096, 8)):
        a, w = fused.head_plan("v2", b, 400, 120, 84, 10)
        assert a.defines == (("HEAD_ROWS", rows),) and a.grid[0] == -(-b // rows), (b, a)
        assert a.shared_mem <= fused.SMEM_LIMIT
        assert w.grid[0] == 8 * 13 + 6 * 4 + 1 * 3 + 1  # 16x32 tiles of [dw|db] of each layer, + the stats block
    a, _ = fused.head_plan("v2", 4096, 400, 120, 4096, 10)
    assert a.defines == (("HEAD_ROWS", 1),) and a.shared_mem <= fused.SMEM_LIMIT
    with pytest.raises(ValueError, match="use v1"):
        fused.head_plan("v2", 8, 400, 120, 6000, 10)
    a, w = fused.head_plan("v1", 8, 400, 120, 6000, 10)
    assert a.shared_mem == 0


def test_lenet_fwd_plan_fits_shared_memory():
    """v1-v3's tiles fit 48 KiB at any F6 (v3's plan at 3,000 images, below v4's threshold); v4 (the large-batch
    kernel) opts in to more, within LF4_SMEM_MAX, else v3's tiles run (tests/test_lenet_fwd_v4.py)."""
    for v in fused.VARIANTS["lenet_fwd"]:
        for h2, imgs in ((84, 4), (1, 4), (1300, 4), (2500, 2), (4096, 1)):
            p = fused.lenet_fwd_plan(v, 3_000, 120, h2)
            if p.kernel == "lenet_fwd_v4":
                assert v == "v4" and p.extra == (8,) and p.shared_mem <= fused.LF4_SMEM_MAX, (v, h2, p)
                continue
            assert p.extra == (imgs,) and p.grid[0] == -(-3_000 // imgs), (v, h2, p)
            assert p.shared_mem <= fused.SMEM_LIMIT
            assert p.block[0] == fused.LF_THREADS[v]


# ------------------------------------------------------------------------------------------- NVRTC
nvrtc = None
if not IN_CHILD:
    from lenet_gpu.harness import nvrtc  # part of the package: an error here is a failure

#: option sets compiled: those the wrappers use (head_train_v2 once per rows-per-block), and the other tuning
OPTION_SETS = [
    *(("head", {**fused.DEFINES["head"], "HEAD_ROWS": r}) for r in (1, 2, 4, 8)),
    ("lenet_fwd", fused.DEFINES["lenet_fwd"]),
    ("lenet_fwd", {"LF_KB3": 8, "LF_F": 8, "LF_MIN_BLOCKS": 3}),
]
#: the builds compiled: every option set on both archs but the alternative tuning (sm_90 only: lenet_fwd.cu takes
#: ~24 s a build since v4, 2026-12-07, and the wrappers never launch that tuning)
BUILDS = [(st, d, a) for st, d in OPTION_SETS for a in ARCHS if not (d is OPTION_SETS[-1][1] and a == "sm_80")]


def _nvrtc_or_skip():
    if nvrtc is None or not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings with nvidia-cuda-nvrtc) is not installed")
    return nvrtc


def _options(defines: dict[str, int]) -> tuple[str, ...]:
    return tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))


_COMPILED: dict[tuple, object] = {}


def _compile(stem: str, defines: dict[str, int] | tuple[str, ...], arch: str):
    """NVRTC's result for kernels/<stem>.cu (cached per process: a compile takes seconds). The first call compiles
    every BUILDS build on two threads (NVRTC releases the GIL: lenet_fwd's two 15 s builds took 17 s
    together on the 2-core machine)."""
    key = (stem, defines if isinstance(defines, tuple) else _options(defines), arch)
    if not _COMPILED:
        from concurrent.futures import ThreadPoolExecutor

        nv = _nvrtc_or_skip()
        keys = [(st, _options(d), a) for st, d, a in BUILDS]
        with ThreadPoolExecutor(2) as ex:
            done = ex.map(lambda k: nv.compile_cuda(kernel_source(k[0]), arch=k[2], options=k[1],
                                                    warnings_as_errors=True), keys)
            _COMPILED.update(zip(keys, done, strict=True))
    if key not in _COMPILED:
        _COMPILED[key] = _nvrtc_or_skip().compile_cuda(kernel_source(stem), arch=arch, options=key[1],
                                                       warnings_as_errors=True)
    return _COMPILED[key]


@parent
@pytest.mark.parametrize("stem,defines,arch", BUILDS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_nvrtc_compiles_without_spills(stem, defines, arch):
    res = _compile(stem, defines, arch)
    names = {k.kernel for k in res.kernels}
    op = {"head": "head_train", "lenet_fwd": "lenet_fwd"}[stem]
    want = {f"{op}_{v}" for v in fused.VARIANTS[op]}
    if stem == "head":
        want |= {fused.head_plan(v, 64, 400, 120, 84, 10)[1].kernel for v in fused.VARIANTS[op]}  # v3, v4: wgrad v4
        want.add("head_train_wgrad_v3")  # in no plan since 2026-12-07 (wgrad v4 has its bits): compiled, checked here
    else:
        want |= {"lenet_eval_v1"}  # evaluation's reduction lives in lenet_fwd.cu
    assert want == names, names
    for k in res.kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, f"{k.kernel} on {arch}: {k}"


def fused_resource_report(archs=ARCHS) -> list[dict]:
    """Registers, static + dynamic shared memory, block size and occupancy of every fused kernel at its LeNet-5
    launch shapes (head_train at batch 64 and 4096, lenet_fwd at 10,000 images), from NVRTC's ptxas report."""
    nv = _nvrtc_or_skip()
    launches = []
    for b in (64, 4096):
        for v in fused.VARIANTS["head_train"]:
            launches += list(fused.head_plan(v, b, 400, 120, 84, 10))
    launches += [fused.lenet_fwd_plan(v, 10_000, 120, 84) for v in ("v1", "v2", "v4")]
    launches.append(fused.lenet_fwd_plan("v3", 2_048, 120, 84))  # v3's own tiles (at 10,000 its plan runs v4)
    rows = []
    for arch in archs:
        for la in launches:
            stem = "lenet_fwd" if la.kernel.startswith("lenet_fwd") else "head"
            k = next(k for k in _compile(stem, la.options(stem), arch).kernels if k.kernel == la.kernel)
            threads = la.block[0] * la.block[1] * la.block[2]
            smem = k.shared_bytes + la.shared_mem
            rows.append({"kernel": la.kernel, "defines": dict(la.defines), "arch": arch, "grid": la.grid[0],
                         "block": threads,
                         "registers": k.registers, "shared_bytes": smem,
                         "blocks_per_sm": nv.max_active_blocks(k.registers, smem, threads, arch)[0],
                         "occupancy": round(nv.theoretical_occupancy(k.registers, smem, threads, arch), 3)})
    return rows


@parent
def test_resources_at_lenet_shapes():
    for r in fused_resource_report():
        # no launch opts in to more than 48 KiB but v4's (the runtime's allow_shared), which stays within 99 KiB
        assert r["shared_bytes"] <= (fused.LF4_SMEM_MAX if r["kernel"] == "lenet_fwd_v4" else 48 * 1024), r
        assert r["registers"] * r["block"] <= 65536, r
        assert r["occupancy"] > 0, r
    by = {(r["kernel"], r["arch"]): r for r in fused_resource_report()}
    assert by[("lenet_fwd_v2", "sm_90")]["blocks_per_sm"] >= 4, by[("lenet_fwd_v2", "sm_90")]
    assert by[("lenet_fwd_v4", "sm_90")]["blocks_per_sm"] >= 4, by[("lenet_fwd_v4", "sm_90")]
    assert by[("head_train_v2", "sm_90")]["blocks_per_sm"] >= 3, by[("head_train_v2", "sm_90")]


# ------------------------------------------------------------------------------------------- CPU harness
_HOST_BE: dict[str, F.RuntimeShim] = {}


@pytest.fixture
def hbe():
    if "be" not in _HOST_BE:  # one runtime per process: modules compile once
        from lenet_gpu.backends.cupy_backend.runtime import HostRuntime

        _HOST_BE["be"] = F.RuntimeShim(HostRuntime())
    return _HOST_BE["be"]


HEAD_ODD = [  # (B, C, H, W, H1, H2, NC): odd sizes, odd trailing rows/columns of yconv, tiny widths
    (1, 3, 5, 7, 9, 5, 4),
    (3, 2, 6, 4, 7, 33, 3),
    (5, 1, 3, 3, 1, 1, 2),
    (2, 4, 9, 8, 13, 40, 11),
]


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
@pytest.mark.parametrize("shape", HEAD_ODD, ids=str)
def test_host_head_train_odd_shapes(hbe, variant, shape):
    F.check_head_train(hbe, fused.head_train, variant, *shape, "tanh", "max", seed=sum(shape))
    F.check_head_train(hbe, fused.head_train, variant, *shape, "relu", "avg", seed=sum(shape) + 1)


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
def test_host_head_train_acts_lenet(hbe, variant, act, mode):
    F.check_head_train(hbe, fused.head_train, variant, 3, *LENET, act, mode, seed=7)


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
@pytest.mark.parametrize("b,c,h1,h2", [(1, 16, 120, 84), (2, 16, 120, 60), (1, 2, 7, 4096)])
def test_host_head_train_f6_and_batch_1(hbe, variant, b, c, h1, h2):
    """Batch 1, and F6 of any width (4,096: v2's shared memory then holds one row a block; narrow elsewhere, so the
    harness runs it quickly)."""
    F.check_head_train(hbe, fused.head_train, variant, b, c, 10, 10, h1, h2, 10, "relu", "max", seed=h2)


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
@pytest.mark.parametrize("b", [97, 161])
def test_host_head_train_batch_over_many_chunks(hbe, variant, b):
    """Batches that fill every batch group of wgrad v2 (4 groups x 32-row chunks) and go round twice (161)."""
    F.check_head_train(hbe, fused.head_train, variant, b, 2, 10, 10, 7, 5, 3, "tanh", "max", seed=b)


@host
@pytest.mark.parametrize("fill,rows", [(5, 2), (3, 4), (1, 8)])
def test_host_head_train_v2_rows_per_block(hbe, monkeypatch, fill, rows):
    """v2's 2-, 4- and 8-row bodies (normally chosen at batches > 264), forced by a smaller fill target; 9 rows
    leave a partial last block."""
    monkeypatch.setattr(fused, "HEAD_FILL_BLOCKS", fill)
    assert fused.head_plan("v2", 9, 50, 7, 5, 3)[0].defines == (("HEAD_ROWS", rows),)
    F.check_head_train(hbe, fused.head_train, "v2", 9, 2, 10, 10, 7, 5, 3, "sigmoid", "max", seed=rows)
    F.check_head_train(hbe, fused.head_train, "v2", 9, 2, 10, 10, 7, 5, 3, "lecun_tanh", "avg", seed=rows + 1)


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
def test_host_head_train_repeats_bit_for_bit_and_counts(variant):
    """Two launches a call; the scratch is allocated at the first call at a shape only; a second call gives the
    same bits (fixed-order sums, no atomics). A runtime of its own: the counts do not depend on other tests."""
    from lenet_gpu.backends.cupy_backend.runtime import HostRuntime

    hbe = F.RuntimeShim(HostRuntime())
    shape = (6, 3, 6, 6, 11, 9 + fused.VARIANTS["head_train"].index(variant), 5)  # a shape of its own
    first: dict = {}
    F.check_head_train(hbe, fused.head_train, variant, *shape, "tanh", "max", seed=3, used=first)
    assert first["launches"] == 2 and first["allocs"] == 4, first  # dz1, dz2, dz3, the per-row loss: scratch
    used: dict = {}
    a = F.check_head_train(hbe, fused.head_train, variant, *shape, "tanh", "max", seed=3, used=used)
    assert used["launches"] == 2 and used["allocs"] == 0 and used["h2d"] == used["d2h"] == 0, used
    b = F.check_head_train(hbe, fused.head_train, variant, *shape, "tanh", "max", seed=3)
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=False), k


@host
def test_host_head_train_variants_agree(hbe):
    """v1 and v2 sum in different orders: equal within the tolerance, and each against the reference."""
    a = F.check_head_train(hbe, fused.head_train, "v1", 4, *LENET, "relu", "max", seed=11)
    b = F.check_head_train(hbe, fused.head_train, "v2", 4, *LENET, "relu", "max", seed=11)
    for k in ("h1", "h2", "logits", "dw1", "dw2", "dw3", "dz_conv"):
        F.assert_close(b[k], a[k].astype(np.float64), 1e-5, 1e-5, what=f"v2 vs v1 {k}")


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["lenet_fwd"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", MODES)
def test_host_lenet_fwd_acts(hbe, variant, act, mode):
    F.check_lenet_fwd(hbe, fused.lenet_fwd, variant, 5, act, mode, seed=3)  # 5 = a tile of 4 and a partial one


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["lenet_fwd"])
@pytest.mark.parametrize("n,h2", [(1, 84), (3, 7), (3, 2500), (1, 4096)])
def test_host_lenet_fwd_f6_and_batch_1(hbe, variant, n, h2):
    """F6 of any width: 2,500 halves the tile (2 images), 4,096 takes one image a block."""
    F.check_lenet_fwd(hbe, fused.lenet_fwd, variant, n, "relu", "max", h2=h2, seed=n + h2)


@host
@pytest.mark.parametrize("variant", fused.VARIANTS["lenet_fwd"])
def test_host_lenet_fwd_one_launch_no_allocation(hbe, variant):
    used: dict = {}
    a = F.check_lenet_fwd(hbe, fused.lenet_fwd, variant, 6, "tanh", "avg", seed=1, used=used)
    assert used["launches"] == 1 and used["allocs"] == used["h2d"] == used["d2h"] == 0, used
    b = F.check_lenet_fwd(hbe, fused.lenet_fwd, variant, 6, "tanh", "avg", seed=1)
    assert np.array_equal(a, b)


@host
def test_host_lenet_fwd_alternative_tuning(hbe, monkeypatch):
    """lenet_fwd_v2 with 8 C3 filters a thread and 8 dense outputs a warp (the other tuning compiled above)."""
    monkeypatch.setitem(fused.DEFINES, "lenet_fwd", {"LF_KB3": 8, "LF_F": 8, "LF_MIN_BLOCKS": 3})
    F.check_lenet_fwd(hbe, fused.lenet_fwd, "v2", 5, "lecun_tanh", "max", seed=4)
    F.check_lenet_fwd(hbe, fused.lenet_fwd, "v2", 3, "sigmoid", "avg", h2=2500, seed=5)


@host
def test_host_wrappers_reject_bad_arguments(hbe):
    d = F.Dev(hbe)
    params = {k: d.put(v) for k, v in F.lenet_params(84).items()}
    images = d.put(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="logits"):
        fused.lenet_fwd(hbe, images, params, d.put(np.zeros((3, 10), np.float32)), 0.1, 0.3, "relu", "max")
    with pytest.raises(TypeError, match="images"):  # uint8 pixels or float32 normalised ones, nothing else
        fused.lenet_fwd(hbe, d.put(np.zeros((2, 28, 28), np.int32)), params, d.put(np.zeros((2, 10), np.float32)),
                        0.1, 0.3, "relu", "max")
    with pytest.raises(ValueError, match="v3"):  # float32 images need v3
        fused.lenet_fwd(hbe, d.put(np.zeros((2, 28, 28), np.float32)), params, d.put(np.zeros((2, 10), np.float32)),
                        0.1, 0.3, "relu", "max", "v2")
    with pytest.raises(ValueError, match="variant"):
        fused.lenet_fwd(hbe, images, params, d.put(np.zeros((2, 10), np.float32)), 0.1, 0.3, "relu", "max", "v9")
    with pytest.raises(ValueError, match="activation"):
        fused.lenet_fwd(hbe, images, params, d.put(np.zeros((2, 10), np.float32)), 0.1, 0.3, "gelu", "max")


@host
def test_host_cupy_backend_binding(hbe):
    """The two-line binding: CupyBackend's class gets the wrappers as methods, its variant tables the entries."""
    from lenet_gpu.backends.cupy_backend.backend import CupyBackend

    class Bound(CupyBackend):
        head_train = fused.head_train
        lenet_fwd = fused.lenet_fwd

    be = Bound(host=True)  # a constructor that raises fails this test
    be.variants.update(fused.VARIANTS)
    be.default_variants.update(fused.DEFAULT_VARIANTS)
    F.check_head_train(be, lambda b, *a, **k: b.head_train(*a, **k), None, 2, *LENET, "relu", "max")
    F.check_lenet_fwd(be, lambda b, *a, **k: b.lenet_fwd(*a, **k), None, 3, "relu", "max")


# ------------------------------------------------------------------------------------------- Numba
def _numba_fused():
    """The Numba fused modules (head, lenet_fwd); a skip only where numba is not installed (an error importing
    the project's modules, e.g. the package's op-table assertion, fails)."""
    require("numba")
    from lenet_gpu.backends.numba_backend import head, lenet_fwd

    return head, lenet_fwd


def _launch_types_match(be, modules) -> None:
    """Every logged launch passed exactly the types of the kernel's declared signature (the compiled ones)."""
    from numba.core import sigutils

    sigs = {name: sig for m in modules for name, sig in m.SIGNATURES.items()}
    assert be.launch_log, "no launch was logged"
    for name, types in be.launch_log:
        want, _ = sigutils.normalize_signature(sigs[name])
        assert tuple(types) == tuple(want), f"{name}: launched with {types}, declared {want}"


@sim
@pytest.mark.parametrize("max_blocks", [None, 1])
@pytest.mark.parametrize("act,mode", [("relu", "max"), ("sigmoid", "avg")])
def test_sim_head_train(act, mode, max_blocks):
    """max_blocks=1: one block takes every tile of rows (the block-stride loop). Every activation × pool mode:
    tests/test_numba_backend.py's test_sim_act_pool_matrix."""
    head, _ = _numba_fused()
    be = F.NumbaShim(max_blocks=max_blocks)
    be.launch_log = []
    F.check_head_train(be, head.head_train, None, 3, 2, 5, 4, 5, 3, 4, act, mode, seed=2)
    F.check_head_train(be, head.head_train, "v1", 1, 3, 4, 6, 4, 6, 3, act, mode, seed=3)
    _launch_types_match(be, [head])


@sim
def test_sim_head_train_repeats_and_counts():
    head, _ = _numba_fused()
    be = F.NumbaShim(max_blocks=2)
    shape = (4, 2, 4, 4, 3, 5, 3)
    first: dict = {}
    F.check_head_train(be, head.head_train, None, *shape, "tanh", "max", used=first)
    assert first["launches"] == 2 and first["allocs"] == 4, first
    used: dict = {}
    a = F.check_head_train(be, head.head_train, None, *shape, "tanh", "max", used=used)
    assert used["launches"] == 2 and used["allocs"] == 0, used
    b = F.check_head_train(be, head.head_train, None, *shape, "tanh", "max")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@sim
@pytest.mark.parametrize("n,act,mode,h2,max_blocks,variant", [
    (3, "tanh", "avg", 3, 1, None), (3, "sigmoid", "max", 2500, 2, "v1"), (3, "sigmoid", "max", 130, 2, "v2")])
def test_sim_lenet_fwd(n, act, mode, h2, max_blocks, variant):
    """Three images on one block (the default variant, v3 since 2026-12-05, with v2's plan: a block-stride loop over
    one-image tiles), F6 narrow and wide, one and two blocks (v2 at F6 130, three rounds of its reductions:
    simulated, a round takes ~20 barriers, and 2500 would take two minutes; v1 at 2500). Every activation × pool
    mode (one image): tests/test_numba_backend.py's test_sim_act_pool_matrix."""
    _, lf = _numba_fused()
    be = F.NumbaShim(max_blocks=max_blocks)
    be.launch_log = []
    used: dict = {}
    F.check_lenet_fwd(be, lf.lenet_fwd, variant, n, act, mode, h2=h2, seed=n, used=used)
    assert used["launches"] == 1 and used["allocs"] == 0, used
    _launch_types_match(be, [lf])


@parent
@pytest.mark.parametrize("arch", ARCHS)
def test_numba_compile_ptx_no_f64_no_spills(arch):
    """compile_ptx with each kernel's declared signature (and launch bounds), then ptxas -v."""
    if SIM:
        pytest.skip("compile checks need the real compiler")
    head, lf = _numba_fused()
    from lenet_gpu.backends.numba_backend import compile_report as cr

    try:
        cr.ptxas_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    # both archs' builds at once, on this machine's cores (compile_report.prefetch), and the float32 lenet_fwd_v3 that
    # test_numba_ptx checks on sm_90 (in the same pool, rather than 14 s alone there)
    cr.prefetch([(name, a) for mod in (head, lf) for name in mod.SIGNATURES for a in ARCHS]
                + [("lenet_fwd_f32_v3", "sm_90")])
    for mod in (head, lf):
        for name in mod.SIGNATURES:
            # compile_report's compile (each kernel's signature and launch bounds, ptxas -v): cached per process,
            # so test_numba_ptx's checks of the same kernels reuse these builds
            ptx, log = cr.compile_kernel(name, arch)
            assert f".target {arch}" in ptx
            bad = cr.f64_lines(ptx)
            assert not bad, f"{name} ({arch}) has float64 in its PTX:\n" + "\n".join(bad[:10])
            res = cr.parse_ptxas(log)
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, (name, arch, res)
            assert 0 < res["registers"] <= 128, (name, arch, res)


@sim
def test_sim_numba_backend_binding():
    """The two-line binding into NumbaBackend (a class that does not import or construct fails)."""
    head, lf = _numba_fused()
    from lenet_gpu.backends.numba_backend import NumbaBackend

    class Bound(NumbaBackend):
        head_train = head.head_train
        lenet_fwd = lf.lenet_fwd

    be = Bound(max_blocks=2)
    be.variants.update({**head.VARIANTS, **lf.VARIANTS})
    be.default_variants.update({**head.DEFAULT_VARIANTS, **lf.DEFAULT_VARIANTS})
    F.check_head_train(be, lambda b, *a, **k: b.head_train(*a, **k), None, 2, 2, 4, 4, 3, 3, 3, "relu", "max")
    F.check_lenet_fwd(be, lambda b, *a, **k: b.lenet_fwd(*a, **k), None, 1, "relu", "max", h2=3)


# ------------------------------------------------------------------------------------------- GPU twins
GPU_BATCHES = (64, 256, 1000)


@pytest.fixture(scope="module")
def gpu_cupy():
    from lenet_gpu.backends.cupy_backend.runtime import CupyRuntime

    return F.RuntimeShim(CupyRuntime(graphs=False))


@pytest.mark.gpu
@pytest.mark.parametrize("b", GPU_BATCHES)
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
def test_gpu_cupy_head_train(gpu_cupy, variant, b):
    F.check_head_train(gpu_cupy, fused.head_train, variant, b, *LENET, "relu", "max", seed=b)
    F.check_head_train(gpu_cupy, fused.head_train, variant, b, *LENET, "tanh", "avg", seed=b + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", fused.VARIANTS["head_train"])
def test_gpu_cupy_head_train_repeats_f6_4096(gpu_cupy, variant):
    a = F.check_head_train(gpu_cupy, fused.head_train, variant, 1000, 16, 10, 10, 120, 4096, 10, "sigmoid", "max")
    b = F.check_head_train(gpu_cupy, fused.head_train, variant, 1000, 16, 10, 10, 120, 4096, 10, "sigmoid", "max")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_BATCHES)
@pytest.mark.parametrize("variant", fused.VARIANTS["lenet_fwd"])
def test_gpu_cupy_lenet_fwd(gpu_cupy, variant, n):
    F.check_lenet_fwd(gpu_cupy, fused.lenet_fwd, variant, n, "relu", "max", seed=n)
    F.check_lenet_fwd(gpu_cupy, fused.lenet_fwd, variant, n, "lecun_tanh", "avg", h2=2500, seed=n + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("b", GPU_BATCHES)
def test_gpu_numba_head_train(b):
    head, _ = _numba_fused()
    be = F.NumbaShim()
    F.check_head_train(be, head.head_train, None, b, *LENET, "relu", "max", seed=b)
    F.check_head_train(be, head.head_train, None, b, *LENET, "tanh", "avg", seed=b + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_BATCHES)
def test_gpu_numba_lenet_fwd(n):
    _, lf = _numba_fused()
    be = F.NumbaShim()
    F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "relu", "max", seed=n)
    F.check_lenet_fwd(be, lf.lenet_fwd, None, n, "sigmoid", "avg", h2=60, seed=n + 1)
