"""What the Numba kernels' index arithmetic compiles to (numba.cuda.compile_ptx, sm_80/sm_90, no GPU): the hot
kernels divide no 64-bit integers (``div``/``rem`` ``.s64``/``.u64``: what Numba makes of ``//`` and ``%`` on its
int64-widened integers, and of a ``range`` with a run-time step), fit 64 registers on sm_90 (half of an SM's
threads with 128-thread blocks; lenet_fwd_v1 and _v2: 72, MAX_REGISTERS) without spills, and use no float64.
compile_report.int_arith_stats counts the instructions; test_int_arith_stats_sees_signed_int64_division shows the
proxy catches the int64 style."""

from __future__ import annotations

import os

import pytest

from tests.conftest import require

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX checks need the real compiler (NUMBA_ENABLE_CUDASIM is set)", allow_module_level=True)
require("numba.cuda")  # skips only when numba-cuda is not installed; an import error fails

from lenet_gpu.backends.numba_backend import compile_report as cr  # noqa: E402

#: kernels whose index arithmetic is uint32 (routed.py, head.py's head_train_v1, lenet_fwd.py, conv2d.py's hot
#: variants: every index and size; common.U, common.fast_div)
UINT32_KERNELS = ("conv2d_bwd_weight_routed_v2", "conv2d_bwd_data_routed_v1", "head_train_v1", "lenet_fwd_v1",
                  "conv2d_pool_fwd_v2", "conv2d_bwd_data_pool_v2", "conv2d_bwd_weight_v3", "lenet_fwd_v2",
                  "lenet_fwd_v3")
#: sm_90 register bounds other than 64 (compiled without launch bounds, as compile_report does): lenet_fwd_v1's
#: unrolled C3 loop takes 71 (156 with int64 indices; its launch bounds allow 128, and ptxas fits it in 64
#: without spills when capped)
#: lenet_fwd_v2 takes 72 (its launch bounds, 224 threads × 4 blocks, allow 73; at 224 threads 64 and 72 registers
#: both give 4 blocks an SM, what a 4-image tile's shared memory allows anyway)
#: lenet_fwd_v3 (v2 + its output switches and the argmax): v2's 72 (sm_80 under the launch bounds: 72, v2 70), its
#: float32-image specialisation too
MAX_REGISTERS = {"lenet_fwd_v1": 72, "lenet_fwd_v2": 72, "lenet_fwd_v3": 72, "lenet_fwd_f32_v3": 72}
#: head.py's default head_train rows kernel (v3, LeNet-5's geometry: 64 registers, as head.cu's v3 manages under
#: its launch bounds): sm_90 only (~6 s of compile_ptx); its wgrad's and v2's spills, stack and float64 on both
#: archs: tests/test_numba_compile.py (the report covers every head_train kernel)
#: lenet_fwd_f32_v3 (lenet_fwd_v3's float32-image specialisation: v3's body but the input staging) likewise
SM90_ONLY = ("head_train_v3", "lenet_fwd_f32_v3")
CASES = [(k, a) for k in UINT32_KERNELS for a in ("sm_80", "sm_90")] + [(k, "sm_90") for k in SM90_ONLY]
DIV64 = ("div.s64", "div.u64", "rem.s64", "rem.u64")


@pytest.fixture(scope="module")
def ptxas():
    try:
        return cr.ptxas_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("kernel,arch", CASES)
def test_no_int64_division_in_uint32_kernels(ptxas, kernel, arch):
    ptx, log = cr.compile_kernel(kernel, arch)
    stats = cr.int_arith_stats(ptx)
    assert all(stats[k] == 0 for k in DIV64), f"{kernel} ({arch}): {stats}"
    assert stats["div.s32"] == 0 and stats["rem.s32"] == 0, f"{kernel} ({arch}) divides signed: {stats}"
    res = cr.parse_ptxas(log)
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack_bytes"] == 0, res
    assert not cr.f64_lines(ptx)
    if arch == "sm_90":
        assert res["registers"] <= MAX_REGISTERS.get(kernel, 64), f"{kernel}: {res['registers']} registers on sm_90"


@pytest.mark.parametrize("kernel", ["lenet_fwd_v2", "lenet_fwd_v3", "lenet_fwd_v4"])
def test_lenet_fwd_convolutions_read_shared_memory_64_bits_at_a_time(ptxas, kernel):
    """lenet_fwd.py's _convs reads each window row (6 floats) and each tap's weights (C1: 6, C3: KB3 = 4) as 64-bit
    shared loads (ld_pair: ld.shared.u64 of the dynamic shared memory viewed as int64, the halves reinterpreted), as
    lenet_fwd.cu reads them with float2/float4 loads. 37 such loads in the PTX: C1's first row 3 + its tap-row loop
    (3 + 5 taps × 3) and C3's first row 3 + its tap-row loop (3 + 5 × 2); NVVM keeps the 5-row loops rolled. A
    return to one scalar load a float, or to a float64 reassembly, fails here."""
    ptx, _ = cr.compile_kernel(kernel, "sm_90")
    assert ptx.count("ld.shared.u64") >= 37, ptx.count("ld.shared.u64")
    assert not cr.f64_lines(ptx)


def test_int_arith_stats_sees_signed_int64_division(ptxas):
    """The proxy has teeth: the plain Numba style (int32 arguments, ``//`` and ``%``, a grid-stride range)
    compiles to 64-bit signed division and wraparound selects; the uint32 style with common.fast_div to none."""
    from numba import cuda, uint32

    from lenet_gpu.backends.numba_backend.common import fast_div

    def plain(a, n, w):
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            a[i] = a[i // w] + a[i % w]

    def unsigned(a, n, w, m, sh):
        i = uint32(cuda.grid(1))
        if i < uint32(n):
            q = fast_div(i, m, sh)
            a[i] = a[q] + a[uint32(i - q * uint32(w))]

    p1, _ = cuda.compile_ptx(plain, "void(float32[::1], int32, int32)", cc=(9, 0))
    p2, _ = cuda.compile_ptx(unsigned, "void(float32[::1], int32, int32, uint32, uint32)", cc=(9, 0))
    s1, s2 = cr.int_arith_stats(p1), cr.int_arith_stats(p2)
    assert s1["div.s64"] + s1["rem.s64"] >= 2 and s1["selp"] > 0, s1
    assert sum(s2[k] for k in DIV64) == 0 and s2["div.u32"] == 0 and s2["rem.u32"] == 0, s2
    assert s2["int64_ops"] < s1["int64_ops"], (s1, s2)


def test_div_magic_divides_exactly():
    """x // d == (x · M) >> shift for x < 2³¹: small divisors densely, powers of two and their neighbours,
    random divisors; the dividends around every multiple boundary."""
    import numpy as np

    from lenet_gpu.backends.numba_backend.common import div_magic

    rng = np.random.default_rng(0)
    ds = [*range(1, 600), *(2**k for k in range(31)), *(2**k - 1 for k in range(2, 32)),
          *(2**k + 1 for k in range(2, 31)), *rng.integers(1, 2**31 - 1, 300).tolist()]
    for d in ds:
        m, sh = div_magic(d)
        q = np.arange(0, (2**31 - 1) // d + 1, max(1, (2**31 // d) // 500), dtype=np.uint64)
        xs = np.concatenate([q * d, q * d + d - 1, rng.integers(0, 2**31, 200).astype(np.uint64),
                             np.array([2**31 - 1], np.uint64)])
        xs = xs[xs < 2**31]
        got = (xs * np.uint64(m)) >> np.uint64(sh)
        assert np.array_equal(got, xs // np.uint64(d)), d
    with pytest.raises(ValueError):
        div_magic(0)


# ------------------------------------------------------------------------------------------ the kernel cache
#
# kernel_cache.py turns on numba-cuda's on-disk kernel cache with a locator that keys the directory on every
# source a kernel depends on. Without a GPU nothing compiles for a device, so these tests check the wiring
# (every dispatcher cached, where, with which stamp, the directory's key) in fresh processes; that a second
# process *loads* the kernels is test_gpu_second_process_loads_kernels_from_the_cache (GPU only).

_CACHE_PROBE = """
import json, sys
from numba.cuda.dispatcher import CUDACache
from lenet_gpu.backends.numba_backend import backend as B, kernel_cache as kc
ds = B.all_dispatchers()
n = kc.enable(ds)
root = str(kc.cache_dir())
on = [d for d in ds if isinstance(d._cache, CUDACache)]
print(json.dumps({
    "n": n, "dispatchers": len(ds), "dir": root, "cached": len(on),
    "under_dir": all(d._cache.cache_path.startswith(root) for d in on),
    "locators": sorted({type(d._cache._impl.locator).__name__ for d in on}),
    "stamps": sorted({str(d._cache._impl.locator.get_source_stamp()) for d in on}),
    "bases": len({(d._cache.cache_path, d._cache._impl.filename_base) for d in on}),
}))
"""


def _probe(env_extra, tmp_path):
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "LENET_GPU_NUMBA_CACHE")}
    env.update({"LENET_GPU_NUMBA_CACHE_DIR": str(tmp_path), **env_extra})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", _CACHE_PROBE], capture_output=True, text=True, env=env,
                       cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_kernel_cache_covers_every_kernel_with_the_dependency_stamp(tmp_path):
    """In two fresh processes: every kernel dispatcher gets numba-cuda's CUDACache, located by the package
    locator under one directory named by the dependency hash (the same in both processes), each kernel with
    its own index, the hash as its source stamp."""
    a = _probe({}, tmp_path)
    b = _probe({}, tmp_path)
    assert a["n"] == a["dispatchers"] >= 28, a
    assert a["cached"] == a["dispatchers"] and a["under_dir"], a
    assert a["locators"] == ["PackageCacheLocator"], a
    assert a["stamps"] == [os.path.basename(a["dir"])], a
    assert a["bases"] == a["dispatchers"], a
    assert a["dir"] == b["dir"] and os.path.isdir(a["dir"]), (a, b)


def test_kernel_cache_switch_off(tmp_path):
    out = _probe({"LENET_GPU_NUMBA_CACHE": "0"}, tmp_path)
    assert out["n"] == 0 and out["cached"] == 0, out


def test_kernel_cache_dir_follows_every_dependency(tmp_path):
    """The directory key changes with any dependency's bytes (a device function in common.py: the case
    numba-cuda's own stamp, the kernel's file only, misses) and with the compiler settings; not otherwise."""
    import shutil

    from lenet_gpu.backends.numba_backend import kernel_cache as kc

    files = []
    for p in kc.dependency_files():
        q = tmp_path / p.name
        shutil.copy(p, q)
        files.append(q)
    h0 = kc.sources_hash(files, "s")
    assert kc.sources_hash(files, "s") == h0
    assert kc.sources_hash(files, "s2") != h0
    common = tmp_path / "common.py"
    common.write_text(common.read_text() + "\n# changed\n")
    assert kc.sources_hash(files, "s") != h0
    assert any(p.name == "stepstate.py" for p in files) and any(p.name == "routed.py" for p in files)


_STEP_PROBE = """
import json, time
t0 = time.perf_counter()
from lenet_gpu.backends.numba_backend import NumbaBackend, backend as B, kernel_cache as kc
from tests.numba_helpers import StepRig
be = NumbaBackend()
rig = StepRig(be, net="lenet", n=16, batch=8)
rig.step()
be.synchronize()
print(json.dumps({"first_step_s": time.perf_counter() - t0, "cached": be.cached_kernels,
                  **kc.cache_stats(B.all_dispatchers())}))
"""


@pytest.mark.gpu
def test_gpu_second_process_loads_kernels_from_the_cache(tmp_path):
    """Two processes, one cache directory: the first compiles (misses, no hits), the second loads every
    kernel it launches (hits, no misses) and reaches the end of its first step sooner."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["LENET_GPU_NUMBA_CACHE_DIR"] = str(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-W", "ignore", "-c", _STEP_PROBE], capture_output=True, text=True,
                           env=env, cwd=root, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    print(f"cold {cold}\nwarm {warm}")
    assert cold["misses"] > 0 and cold["hits"] == 0, cold
    assert warm["hits"] >= cold["misses"] and warm["misses"] == 0, warm
    assert warm["first_step_s"] < cold["first_step_s"], runs
