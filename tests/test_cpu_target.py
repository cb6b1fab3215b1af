"""The cpu backend's code on an Intel AVX-512 CPU: 512-bit vectors, not the 256-bit ones LLVM prefers there
(cpu_backend/target.py).

No such CPU is needed: each test runs a child process that tells Numba it runs on one (NUMBA_CPU_NAME, and the host's
features with AVX-512 added), compiles a kernel and reads its machine code. Nothing compiled is run (the host may have
no AVX-512).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the AVX-512 code is x86-64's")

CHILD = r"""
import json, os, re, sys
import llvmlite.binding as ll

AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")
host = ll.get_host_cpu_features

def features():  # this host's, with AVX-512 (what a Xeon has)
    f = host()
    for k in AVX512:
        f[k] = True
    return f

ll.get_host_cpu_features = features
if sys.argv[1] == "user":  # the user's own NUMBA_CPU_FEATURES: the same features, the CPU's tuning left on
    os.environ["NUMBA_CPU_FEATURES"] = features().flatten()
from numba.core import config
if sys.argv[1] == "before":  # the user's own @njit function, made before the backend is imported
    import numba
    numba.njit(lambda a: a + 1)

from lenet_gpu.backends.cpu_backend import common, conv2d, target

from lenet_gpu.backends.cpu_backend import lenet_fwd

kb, _ = conv2d.block_size(16)
kb1, _ = conv2d.block_size(6)
conv2d.pool_fwd_parts("v1", kb)  # compiled, never run
lenet_fwd.parts(kb1, kb)
asm = "\n".join(conv2d._pool_fwd_lanes_chunk.inspect_asm().values())
# the default path's functions of their own (relu + max pooling): the training step's C3, inference's C1 and C3
fast = {f.py_func.__name__: "\n".join(f.inspect_asm().values())
        for f in (conv2d._pool_lanes_relu_max, lenet_fwd._pool_relu_max)}
print(json.dumps({"wide_code": target.WIDE_CODE, "features": config.CPU_FEATURES, "wide": common.WIDE_VECTORS,
                  "kb": kb, "kb1": kb1, "zmm": len(re.findall(r"vfmadd\w*ps\s[^\n]*zmm", asm)),
                  "ymm": len(re.findall(r"vfmadd\w*ps\s[^\n]*ymm", asm)),
                  "fast": {k: {"zmm": len(re.findall(r"vfmadd\w*ps\s[^\n]*zmm", a)),
                               "ymm": len(re.findall(r"vfmadd\w*ps\s[^\n]*ymm", a)),
                               "scalar": len(re.findall(r"vfmadd\w*ss\s", a)),
                               "max_zmm": len(re.findall(r"vmaxps\s[^\n]*zmm", a))} for k, a in fast.items()}}))
"""


def _child(mode: str, tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_CPU_NAME="skylake-avx512", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_FEATURES", None)
    res = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_intel_avx512_cpu_gets_zmm_code(tmp_path: Path) -> None:
    """The backend turns LLVM's 256-bit preference off: the lane kernel's register block of 4 pixels × KB filters is
    KB · 4 zmm FMAs a tap, as the blocks for AVX-512 assume."""
    out = _child("ours", tmp_path)
    assert out["wide_code"] == "set", out
    assert out["features"].endswith(",-prefer-256-bit") and "+avx512f" in out["features"], out
    assert out["wide"] is True and out["kb"] > 1, out
    assert out["zmm"] >= 4 * out["kb"], out
    # the relu-max functions (a block of 4 pixels × KB filters; lenet_fwd's compiled for C1's block and C3's): zmm
    # FMAs, no scalar ones, the pooling in zmm maxima
    for name, c in out["fast"].items():
        assert c["zmm"] >= 4 * min(out["kb"], out["kb1"]) and c["ymm"] == 0 and c["scalar"] == 0, (name, c)
        assert c["max_zmm"] >= 1, (name, c)


def test_with_the_cpus_tuning_the_blocks_follow_the_256_bit_code(tmp_path: Path) -> None:
    """The control: with the user's NUMBA_CPU_FEATURES (AVX-512, the tuning left on) LLVM generates ymm code only, and
    the backend, which then leaves the features alone, finds it out (common.zmm_probe) and takes the blocks for 16
    registers of 8 floats (one filter a block), so nothing spills."""
    out = _child("user", tmp_path)
    assert out["wide_code"] == "NUMBA_CPU_FEATURES is set", out
    assert "-prefer-256-bit" not in out["features"], out
    assert out["zmm"] == 0 and out["ymm"] >= 8, out  # the 256-bit code that the first test avoids
    assert out["wide"] is False and out["kb"] == 1, out


def test_a_target_machine_made_before_the_backend_is_found_out(tmp_path: Path) -> None:
    """An @njit function made before the backend is imported fixes Numba's target machine with the CPU's tuning: the
    backend says so, and its blocks follow the 256-bit code (the probe), as in the control above."""
    out = _child("before", tmp_path)
    assert out["wide_code"] == "Numba's target machine was made before the cpu backend was imported", out
    assert out["zmm"] == 0 and out["wide"] is False and out["kb"] == 1, out
