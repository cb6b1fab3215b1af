"""Mutation check of the test suite: each mutation breaks the code on a temporary copy of the repository, runs the
narrow pytest selection that should catch it, and reports caught (the selection failed) or missed (it passed).

    python scripts/mutate.py            # every mutation
    python scripts/mutate.py -k sigmoid # those whose name contains "sigmoid"
    python scripts/mutate.py --list

Exit status 0 when every mutation applied was caught, 1 when one was missed, 2 when a mutation no longer applies
(its pattern is gone from the source: update the table). Not part of the default test suite (minutes per
mutation on a small machine); CI runs it on demand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "*.egg-info",
                                "selftest-out*", "data")


@dataclass
class Mutation:
    name: str
    path: str  # file in the repository
    old: str  # exact text replaced (must occur)
    new: str
    pytest_args: list[str]  # the narrow selection that must fail
    env: dict[str, str] = field(default_factory=dict)
    why: str = ""


MUTATIONS = [
    Mutation(
        "sigmoid-avg act' dropped in route_window",
        "kernels/conv2d.cu",
        "out[o] = gg * act_grad(yc[o], act);",
        "out[o] = gg * ((mode == POOL_AVG && act == ACT_SIGMOID) ? 1.0f : act_grad(yc[o], act));",
        ["tests/test_cupy_backend.py", "-k", "host_suite"],
        {"LENET_CUPY_HOST_K": "act_pool_matrix and conv2d_bwd_data_pool"},
        "conv2d_bwd_data_pool (CUDA C, both variants) forgets act' for sigmoid under average pooling",
    ),
    Mutation(
        "assert False in a kernel module",
        "lenet_gpu/backends/numba_backend/head.py",
        "import math\n",
        "import math\n\nassert False, 'mutation'\n",
        ["tests/test_fused.py", "-k", "numba_compile_ptx"],
        why="the Numba fused module raises AssertionError at import (was: every Numba fused test skipped)",
    ),
    Mutation(
        "a constructor that raises",
        "lenet_gpu/backends/cupy_backend/backend.py",
        "        if graphs is None:\n            graphs = os.environ.get(\"LENET_GPU_CUDA_GRAPHS\", \"1\") != \"0\"\n",
        "        raise RuntimeError('mutation: the constructor raises')\n",
        ["tests/test_fused.py", "-k", "host_suite"],
        {"LENET_FUSED_HOST_K": "binding"},
        "CupyBackend(...) raises (was: the binding test skipped)",
    ),
    Mutation(
        "self-compare in the step checker",
        "lenet_gpu/selftest/phases.py",
        "st = error_stats(dev.parameters(), cpu.parameters(), 2e-5, 2e-4)",
        "st = error_stats(cpu.parameters(), cpu.parameters(), 2e-5, 2e-4)",
        ["tests/test_selftest.py", "-k", "wrong_backend"],
        why="steps_vs_numpy compares numpy with itself",
    ),
    Mutation(
        "stale op signature in the benchmark",
        "lenet_gpu/perf/ops.py",
        'be.conv2d_bwd_weight(a["x"], a["dz"], a["dw"], a["db"], variant=v)',
        'be.conv2d_bwd_weight(a["x"], a["dz"], a["dw"], variant=v)',
        ["tests/test_bench_ops.py"],
        why="the benchmark's op case calls an op with an argument list it no longer takes",
    ),
    Mutation(
        "a block's biases rotated (AVX-512 blocks only)",
        "lenet_gpu/backends/cpu_backend/conv2d.py",
        "        bq = bp[k0 + q]\n",
        "        bq = bp[k0 + (q + 1) % KB]\n",
        ["tests/test_cpu_random_shapes.py", "-k", "avx512-blocks and pool_fwd"],
        why="the cpu conv+pool kernels give each filter of a register block its neighbour's bias: a no-op with AVX2 "
            "code's blocks of one filter, so only the AVX-512 blocks, forced on any CPU, can catch it",
    ),
    Mutation(
        "routed v3's db drops the odd columns",
        "lenet_gpu/backends/cpu_backend/routed.py",
        "                    bs += g2\n",
        "",
        ["tests/test_cpu_random_shapes.py", "-k", "routed_backward"],
        why="conv2d_bwd_weight_routed_v3 (C1's weight gradient) sums db over the even pooled columns only",
    ),
]


def run_one(m: Mutation, timeout: float) -> tuple[str, str, float]:
    """('caught' | 'missed' | 'not applicable' | 'error', detail, seconds)."""
    t0 = time.monotonic()
    src = (ROOT / m.path).read_text() if (ROOT / m.path).exists() else ""
    if m.old not in src:
        return "not applicable", f"pattern not found in {m.path}", 0.0
    with tempfile.TemporaryDirectory(prefix="lenet-mutate-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        # an editable install maps lenet_gpu.kernels to the original kernels/ (a meta-path finder after sys.path):
        # in the copy the package is found first, as the copy's own kernels/
        (copy / "kernels" / "__init__.py").touch()
        if not (copy / "lenet_gpu" / "kernels").exists():
            (copy / "lenet_gpu" / "kernels").symlink_to(copy / "kernels", target_is_directory=True)
        target = copy / m.path
        target.write_text(src.replace(m.old, m.new, 1))
        env = {**os.environ, **m.env, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        probe = ("import lenet_gpu; from lenet_gpu.backends.cupy_backend.runtime import kernels_dir; "
                 "print(lenet_gpu.__file__); print(kernels_dir())")
        where = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True,
                               check=False).stdout.split()
        if len(where) != 2 or not all(w.startswith(str(copy)) for w in where):
            return "error", f"the copy's lenet_gpu / kernels are not the ones used ({where})", time.monotonic() - t0
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *m.pytest_args]
        try:
            r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return "error", f"timed out after {timeout:.0f} s", time.monotonic() - t0
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
        if r.returncode == 0:
            return "missed", tail[0], time.monotonic() - t0
        if r.returncode == 5:
            return "error", "no test collected: " + tail[0], time.monotonic() - t0
        return "caught", tail[0], time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only the mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and their selections")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per mutation")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if a.k.lower() in m.name.lower()]
    if a.list:
        for m in chosen:
            env = " ".join(f"{k}={v}" for k, v in m.env.items())
            print(f"{m.name}: {m.path}; {env + ' ' if env else ''}pytest {' '.join(m.pytest_args)}")
        return 0
    results = []
    for m in chosen:
        status, detail, secs = run_one(m, a.timeout)
        results.append(status)
        print(f"{status:>14}  {m.name} ({secs:.0f} s): {detail}", flush=True)
    if "missed" in results or "error" in results:
        return 1
    return 2 if "not applicable" in results else 0


if __name__ == "__main__":
    sys.exit(main())
