"""The cpu backend beside PyTorch on this CPU, measured in one run: training steps, inference, the fraction
of FP32 peak, the first run's compile time and a cached run's start.

    python -m bench.cpu_peak                    # everything: batch 128, 1,000-image inference, 5 rounds
    python -m bench.cpu_peak --no-startup       # skip the child processes (compiles, cached start)
    python -m bench.cpu_peak --startup-runs 5   # the first run's time: the median of 5 (default 3)
    python -m bench.cpu_peak --json out.json
    # AVX2 code on an AVX-512 CPU, both sides (Numba takes the host's features unless NUMBA_CPU_FEATURES is set):
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma NUMBA_CACHE_DIR=/tmp/avx2 \
        ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.cpu_peak --no-startup

Training step (``--step model``, the default): ``LeNet5(backend="cpu").train_step`` on consecutive host batches
of mnist-sample (no augmentation), what a user calls: on cpu the four-kernel step (docs/step4.md); inference:
``LeNet5.logits`` on 1,000 host images. The peer is PyTorch's LeNet-5 with Adam (lenet_gpu/perf/peer.py: same
layers, same initial parameters, same resident uint8 data, gather, pad and normalise included). ``--step routed``
times the nine-op routed step written out op by op (docs/routed_backward.md: batch_prepare → conv2d_pool_fwd C1,
C3 without the un-pooled maps → head_train (yconv=None) → conv2d_bwd_weight_routed C3 → conv2d_bwd_data_routed →
conv2d_bwd_weight_routed C1 → adam_step → step_advance) with augmentation, ``--step dense`` the dense fused step,
and both time the lenet_fwd op for inference. Without PyTorch installed, the peer is our own dense step (and our
own inference, a ratio of about 1). The machine's vector ISA (as LLVM sees it, what Numba compiles for) and the
load average are printed with the figures.

Two clocks, each in alternating rounds (ours, torch, ours, torch, ...) so that both see the same load:
- wall: both on ``--threads`` threads (default 2), images per second of wall-clock time;
- cpu: both on one thread, images per second of this process's CPU time (what the work costs whatever
  else the machine runs).
Ratios are taken per round (ours/torch) and their median reported. OMP_WAIT_POLICY defaults to PASSIVE here
(see below); the peak fractions use the nominal clock, and ``measured_clock_ghz`` says how fast the core
really ran. Both sides' training fractions count the dense step's FLOPs (``train_flops``); the routed step does a
quarter of the backward convolutions' multiply-adds, so ours is an effective rate, above the arithmetic it does.

FP32 peak = cores × FMA units × SIMD lanes × 2 × clock (``fp32_peak``, lenet_gpu.perf.timing.cpu_fp32_peak at the
nominal clock): the flags and clock from /proc/cpuinfo, two FMA units a core (every x86 core with FMA since Haswell and
Zen), 16 lanes with a 512-bit datapath, 8 with AVX2 or with AVX-512 on AMD Zen 4 (512-bit ops run on 256-bit units),
4 with AVX2 on Zen 1 and Zen+ (256-bit ops run on 128-bit units).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lenet_gpu import spec
from lenet_gpu.perf.timing import cpu_fp32_peak, fma_latency_cycles
from lenet_gpu.stepstate import HostState, schedule_table

ROOT = Path(__file__).resolve().parent.parent
#: OpenMP threads that wait for work by spinning steal a shared core from whoever else runs there: on this
#: busy 2-core machine two spinning threads made both Numba and PyTorch 10x slower than one thread. Both
#: libraries read this before their thread pools start (set before either is imported; yours wins if set).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ---------------------------------------------------------------------------------------- the machine


def cpu_info() -> dict[str, Any]:
    """The first CPU of /proc/cpuinfo: its text (what lenet_gpu.perf.timing's estimates read), model name, family and
    model numbers (a VM's name may say only "AMD EPYC": family 23 model 1 is a Zen 1, 25 model 1 a Zen 3), clock
    (MHz), and the usable cores."""
    info: dict[str, Any] = {"model": "unknown", "mhz": 0.0}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    info["text"] = text.split("\n\n")[0]
    for line in info["text"].splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name":
            info["model"] = val
        elif key == "cpu MHz":
            info["mhz"] = float(val)
        elif key in ("cpu family", "model") and val.isdigit():
            info["family" if key == "cpu family" else "model_number"] = int(val)
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return info


def fp32_peak(info: dict[str, Any], cores: int | None = None) -> tuple[float, str]:
    """(FLOP/s, the formula with its numbers): lenet_gpu.perf.timing.cpu_fp32_peak's estimate (cores × FMA units ×
    SIMD lanes × 2 × clock) at the nominal clock of /proc/cpuinfo, on ``cores`` (default: the usable CPUs)."""
    p = cpu_fp32_peak(info["text"], usable_cpus=cores or info["cores"], max_ghz=info["mhz"] / 1000.0)
    if p is None:
        return 0.0, "no estimate (/proc/cpuinfo lacks the flags or the clock)"
    return p["flops"], p["formula"]


def measured_clock_ghz(cpuinfo: str = "", n: int = 20_000_000) -> float:
    """The core clock while busy, from a chain of n dependent FMAs of the latency of the CPU that ``cpuinfo`` (the
    text of cpu_info) describes (lenet_gpu.perf.timing.fma_latency_cycles: 4 on Zen 3 and 4 and on Intel since
    Skylake, 5 on Zen 1 and 2; 4 where it says nothing): /proc/cpuinfo gives the nominal clock, and a boosting core
    runs faster."""
    latency = fma_latency_cycles(cpuinfo)
    from numba import njit

    @njit(fastmath={"contract"}, cache=False)
    def chain(x, a, b, n):
        for _ in range(n):
            x = x * a + b
        return x

    chain(np.float32(1.0), np.float32(0.5), np.float32(0.25), 10)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        chain(np.float32(1.0), np.float32(0.5), np.float32(0.25), n)
        best = min(best, time.perf_counter() - t0)
    return latency * n / best / 1e9


def train_flops(cfg: spec.NetConfig | None = None) -> int:
    """FLOPs of one training step per image: the forward pass, then the weight gradients of every layer and
    the data gradients of all but C1 (which needs none), dense (what PyTorch computes; the routed step skips the
    taps that max pooling zeroes)."""
    f6 = (cfg or spec.NetConfig()).f6
    c1, c3 = 6 * 28 * 28 * 25, 16 * 10 * 10 * 150
    dense = 400 * 120 + 120 * f6 + f6 * spec.NUM_CLASSES
    return spec.forward_flops(cfg) + 2 * (c1 + 2 * c3 + 2 * dense)


# ------------------------------------------------------------------------------------ our training step


class CpuStep:
    """The training step of the fused ops on a backend (the model's step, written out): the dense step, or
    with ``routed`` the routed step of max pooling (docs/routed_backward.md: no C1/C3 maps, gradients at the
    pooled sizes)."""

    def __init__(self, be: Any, images: np.ndarray, labels: np.ndarray, batch: int, seed: int = 0,
                 shift: int = 2, act: str = "relu", mode: str = "max", routed: bool = False) -> None:
        self.be, self.batch, self.act, self.mode, self.routed = be, batch, act, mode, routed
        cfg = spec.NetConfig(activation=act, pool=mode)
        n = images.shape[0]
        self.mean = float(images.mean() / 255.0)
        self.std = float(images.std() / 255.0)
        self.init = spec.init_params(cfg, seed)
        self.images, self.labels = be.to_device(images), be.to_device(labels)
        self.perm = be.to_device(np.random.default_rng(seed).permutation(n).astype(np.int32))
        steps = n // batch
        self.state = be.to_device(HostState(steps_per_epoch=steps, seed=seed, shift=shift).to_array())
        self.sched = be.to_device(schedule_table(np.full(10**5, 1e-3), 0, 0.9, 0.999))
        self.stats = be.zeros((steps, 2))
        total = self.init.size
        self.p = be.to_device(self.init)
        self.g, self.m, self.v = be.zeros((total,)), be.zeros((total,)), be.zeros((total,))
        self.P, self.G = spec.views(self.p, cfg), spec.views(self.g, cfg)
        B, f6 = batch, cfg.f6
        self.x, self.y = be.empty((B, 1, 32, 32)), be.empty((B,), np.int32)
        self.a1, self.s2 = be.empty((B, 6, 28, 28)), be.empty((B, 6, 14, 14))
        self.a3, self.s4 = be.empty((B, 16, 10, 10)), be.empty((B, 16, 5, 5))
        self.am1, self.am3 = be.empty((B, 6, 14, 14), np.uint8), be.empty((B, 16, 5, 5), np.uint8)
        self.h1, self.h2, self.logits = be.empty((B, 120)), be.empty((B, f6)), be.empty((B, 10))
        self.dz3, self.dz1 = be.empty((B, 16, 10, 10)), be.empty((B, 6, 28, 28))
        self.gz3, self.gz1 = be.empty((B, 16, 5, 5)), be.empty((B, 6, 14, 14))

    def step(self) -> None:
        be, P, G, act, mode = self.be, self.P, self.G, self.act, self.mode
        be.batch_prepare(self.images, self.labels, self.perm, self.state, self.x, self.y, self.mean, self.std)
        if self.routed:
            be.conv2d_pool_fwd(self.x, P["c1.w"], P["c1.b"], None, self.s2, self.am1, act, mode)
            be.conv2d_pool_fwd(self.s2, P["c3.w"], P["c3.b"], None, self.s4, self.am3, act, mode)
            be.head_train(self.s4, self.y, P["c5.w"], P["c5.b"], P["f6.w"], P["f6.b"], P["out.w"], P["out.b"],
                          self.h1, self.h2, self.logits, self.am3, None, self.gz3, G["c5.w"], G["c5.b"],
                          G["f6.w"], G["f6.b"], G["out.w"], G["out.b"], self.stats, self.state, act, mode)
            be.conv2d_bwd_weight_routed(self.s2, self.gz3, self.am3, G["c3.w"], G["c3.b"], self.state)
            be.conv2d_bwd_data_routed(self.gz3, P["c3.w"], self.am3, self.s2, self.gz1, act)
            be.conv2d_bwd_weight_routed(self.x, self.gz1, self.am1, G["c1.w"], G["c1.b"], self.state)
            be.adam_step(self.p, self.g, self.m, self.v, self.sched, self.state, 0.9, 0.999, 1e-8, 0.0)
            be.step_advance(self.state, self.batch)
            return
        be.conv2d_pool_fwd(self.x, P["c1.w"], P["c1.b"], self.a1, self.s2, self.am1, act, mode)
        be.conv2d_pool_fwd(self.s2, P["c3.w"], P["c3.b"], self.a3, self.s4, self.am3, act, mode)
        be.head_train(self.s4, self.y, P["c5.w"], P["c5.b"], P["f6.w"], P["f6.b"], P["out.w"], P["out.b"],
                      self.h1, self.h2, self.logits, self.am3, self.a3, self.dz3, G["c5.w"], G["c5.b"], G["f6.w"],
                      G["f6.b"], G["out.w"], G["out.b"], self.stats, self.state, act, mode)
        be.conv2d_bwd_weight(self.s2, self.dz3, G["c3.w"], G["c3.b"], self.state)
        be.conv2d_bwd_data_pool(self.dz3, P["c3.w"], self.am1, self.a1, self.dz1, mode, act)
        be.conv2d_bwd_weight(self.x, self.dz1, G["c1.w"], G["c1.b"], self.state)
        be.adam_step(self.p, self.g, self.m, self.v, self.sched, self.state, 0.9, 0.999, 1e-8, 0.0)
        be.step_advance(self.state, self.batch)


class ModelStep:
    """What a user times: ``LeNet5(backend=...).train_step`` on consecutive host batches of ``batch`` uint8 images
    (the model's default step: on cpu the four-kernel step, docs/step4.md), and ``LeNet5.logits`` for inference.
    The parameters start from the same initial values as the peer's (``init``)."""

    def __init__(self, backend: str, images: np.ndarray, labels: np.ndarray, batch: int, init: np.ndarray) -> None:
        from lenet_gpu.model import LeNet5

        self.model = LeNet5(backend=backend)
        self.model.set_parameters(init)
        self.images, self.labels, self.batch = images, labels, batch
        self.steps = images.shape[0] // batch
        self.i = 0

    def step(self) -> None:
        o = (self.i % self.steps) * self.batch
        self.model.train_step(self.images[o : o + self.batch], self.labels[o : o + self.batch])
        self.i += 1


def load_images(limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from lenet_gpu.data import load_dataset

    ds = load_dataset("mnist-sample")
    return ds.train_images[:limit], ds.train_labels[:limit], ds.test_images, ds.test_labels


# --------------------------------------------------------------------------------------------- timing


def _set_threads(n: int, torch: Any) -> None:
    import numba

    numba.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def vector_isa() -> dict[str, Any]:
    """The vector ISA Numba compiles for here: the host's widest (as LLVM sees it), unless NUMBA_CPU_NAME /
    NUMBA_CPU_FEATURES name another target (``NUMBA_CPU_NAME=haswell`` builds AVX2 code on an AVX-512 machine).
    ``isa`` is read from the machine code of a small FMA loop compiled with the cpu backend's options: zmm
    registers → AVX-512, ymm → AVX2, xmm only → SSE; ``host_isa`` is the CPU's own widest."""
    import llvmlite.binding as ll
    import numba
    from numba.core import config

    # first: the backend gives Numba its features before anything is compiled (cpu_backend/target.py)
    from lenet_gpu.backends.cpu_backend import common, target

    feats = ll.get_host_cpu_features()
    host = "AVX-512" if feats.get("avx512f") else "AVX2" if feats.get("avx2") else "AVX" if feats.get("avx") else "SSE"

    @numba.njit(fastmath={"contract"}, boundscheck=False, error_model="numpy")
    def axpy(a, b, c):  # pragma: no cover (compiled, never run)
        for i in range(a.shape[0]):
            a[i] += b[i] * c[i]

    f1 = numba.types.Array(numba.float32, 1, "C")
    asm = "\n".join(axpy.compile((f1, f1, f1)) and axpy.inspect_asm().values())
    isa = "AVX-512" if "%zmm" in asm else "AVX2" if "%ymm" in asm else "SSE"
    return {"isa": isa, "host_isa": host, "fma": "vfmadd" in asm,
            "llvm_cpu": config.CPU_NAME or ll.get_host_cpu_name(), "numba_cpu_features": config.CPU_FEATURES,
            "wide_code": target.WIDE_CODE, "blocks_for": "AVX-512" if common.WIDE_VECTORS else "AVX2"}


def compare(clock: str, threads: int, rounds: int, ours: Any, theirs: Any, images_per_call: int,
            calls: int, torch: Any) -> dict[str, Any]:
    """Alternating rounds of ``calls`` calls each; images/s per round and the per-round ratios."""
    _set_threads(threads, torch)
    tick = time.perf_counter if clock == "wall" else time.process_time
    ours(), theirs()  # warm
    rows = []
    for _ in range(rounds):
        r = {}
        for name, fn in (("ours", ours), ("torch", theirs)):
            t0 = tick()
            for _ in range(calls):
                fn()
            r[name] = images_per_call * calls / (tick() - t0)
        rows.append(r)
    o = np.array([r["ours"] for r in rows])
    t = np.array([r["torch"] for r in rows])
    return {"clock": clock, "threads": threads, "rounds": rounds, "calls_per_round": calls,
            "ours_img_s": float(np.median(o)), "torch_img_s": float(np.median(t)),
            "ratio": float(np.median(o / t)), "ratio_min": float((o / t).min()), "ratio_max": float((o / t).max())}


def startup(tmp: str, batch: int, runs: int = 3) -> dict[str, Any]:
    """Seconds from interpreter start to the end of the first training step of ``LeNet5(backend="cpu")``
    (``train_step`` on ``batch`` images, what a user's first run does), in child processes: ``runs`` first runs,
    each with an empty Numba cache of its own (compiling, on two cores by default, cpu_backend/warm.py), a cached
    run (with the first run's cache), and one more first run with LENET_GPU_COMPILE_AHEAD=0 (compiling serially,
    for comparison). A first run's time swings by a quarter between runs on a shared 2-vCPU machine (9.5 to 12.8 s
    in five runs on one, 2026-12-07), so ``first_run_to_first_step_s`` is the median of the runs; ``first_runs_s``
    holds them all."""
    code = (
        "import time; t0 = time.perf_counter(); c0 = time.process_time()\n"
        "import json\n"
        "from lenet_gpu.model import LeNet5\n"
        "from lenet_gpu.backends.cpu_backend import warm\n"
        "from bench.cpu_peak import load_images\n"
        "im, lb, _, _ = load_images(1024)\n"
        "m = LeNet5(backend='cpu')\n"
        f"m.train_step(im[:{batch}], lb[:{batch}])\n"
        "print(json.dumps([time.perf_counter() - t0, time.process_time() - c0, warm.last_report]))\n"
    )

    def child(cache: str, ahead: str) -> tuple[float, float, float, Any]:
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, cache), PYTHONPATH=str(ROOT),
                   LENET_GPU_COMPILE_AHEAD=ahead)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        wall, cpu, report = json.loads(res.stdout.strip().splitlines()[-1])
        return wall, cpu, time.perf_counter() - t0, report

    out: dict[str, Any] = {}
    firsts = []
    for i in range(max(1, runs)):
        firsts.append(child(f"first{i}", "1"))
        if i == 0:  # the cached run right after the first, on its cache
            cached = child("first0", "1")
    serial = child("serial", "0")
    walls = [f[0] for f in firsts]
    mid = sorted(range(len(firsts)), key=lambda i: walls[i])[len(firsts) // 2]  # the median run (upper one if even)
    for name, (wall, cpu, process, report) in (("first_run", firsts[mid]), ("cached_run", cached),
                                                ("first_run_serial", serial)):
        out[f"{name}_to_first_step_s"] = wall
        out[f"{name}_cpu_s"] = cpu  # this process's CPU time (the helper's is not in it)
        out[f"{name}_process_s"] = process
        out[f"{name}_compile_ahead"] = report
    out["first_runs_s"] = walls
    return out


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
    ap.add_argument("--infer", type=int, default=1000, help="images per inference call (default 1000)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds, ours and PyTorch alternating in each; figures are the median round (default 5)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per round (default 20)")
    ap.add_argument("--threads", type=int, default=2, help="threads of both for the wall-clock figures")
    ap.add_argument("--no-startup", action="store_true", help="skip the compile and cached-start children")
    ap.add_argument("--startup-runs", type=_positive, default=3, metavar="N",
                    help="first runs from an empty cache, each in a child process of its own; the median is "
                         "reported (default 3)")
    ap.add_argument("--step", choices=("model", "routed", "dense"), default="model",
                    help="ours: model = LeNet5(backend=--backend).train_step and .logits, what a user calls (default); "
                         "routed / dense = the nine-op routed or the dense fused step written out op by op, and the "
                         "lenet_fwd op")
    ap.add_argument("--backend", default="cpu", help="the model's backend with --step model (default cpu)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:  # the peer is then our own dense step (and the dense inference: the same lenet_fwd)
        torch = None

    from lenet_gpu.backends import get_backend

    info = cpu_info()
    peak, formula = fp32_peak(info)
    peak1, formula1 = fp32_peak(info, cores=1)
    isa = vector_isa()
    family = f" (family {info['family']} model {info['model_number']})" if "family" in info else ""
    out: dict[str, Any] = {"cpu": info["model"] + family, "peak_formula": formula, "peak_formula_1core": formula1,
                           "vector_isa": isa, "load_avg_start": os.getloadavg(),
                           "torch": torch.__version__ if torch is not None else None,
                           "peer": "torch" if torch is not None else "ours-dense",
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "step": args.step}
    print(f"vector ISA {isa['isa']} (LLVM CPU {isa['llvm_cpu']}; the CPU's own: {isa['host_isa']}; register blocks "
          f"for {isa['blocks_for']}; 512-bit preference: {isa['wide_code']}); "
          f"peer: {out['peer']}; "
          f"load average {os.getloadavg()[0]:.1f}")
    ghz = measured_clock_ghz(info["text"])
    out["measured_clock_ghz"] = ghz
    print(f"CPU {out['cpu']}; FP32 peak {formula}; measured clock {ghz:.2f} GHz "
          f"(peak at that clock {peak * ghz / (info['mhz'] / 1000) / 1e9 if info['mhz'] else float('nan'):.0f} "
          "GFLOP/s)")

    tr_x, tr_y, te_x, _ = load_images()
    be = get_backend("cpu")
    ours = CpuStep(be, tr_x, tr_y, args.batch, routed=args.step == "routed")
    cfg = spec.NetConfig()
    inf_x = te_x[: args.infer]
    logits = be.empty((inf_x.shape[0], 10))
    params = ours.P
    our_step = ours.step

    def our_infer() -> None:
        be.lenet_fwd(inf_x, params, logits, ours.mean, ours.std, "relu", "max")

    if args.step == "model":
        model = ModelStep(args.backend, tr_x, tr_y, args.batch, ours.init)
        our_step = model.step
        out["model_backend"] = model.model.backend.name

        def our_infer() -> None:  # noqa: F811 (the model's host path: what a user calls)
            model.model.logits(inf_x)

    if torch is not None:
        from bench.peer import TorchLeNet

        peer = TorchLeNet(cfg, spec.views(ours.init, cfg), tr_x, tr_y, ours.mean, ours.std, lr=1e-3)
        nsteps = tr_x.shape[0] // args.batch
        pos = {"i": 0}

        def torch_step() -> None:
            peer.train_step((pos["i"] % nsteps) * args.batch, args.batch)
            pos["i"] += 1

        peer_inf = TorchLeNet(cfg, spec.views(ours.init, cfg), inf_x, np.zeros(inf_x.shape[0], np.uint8),
                              ours.mean, ours.std)

        def torch_infer() -> None:
            peer_inf.forward(0, inf_x.shape[0])
    else:  # no PyTorch here: our dense step as the peer (ratios: routed / dense)
        torch_step = CpuStep(be, tr_x, tr_y, args.batch, routed=False).step
        torch_infer = our_infer

    tf, ff = train_flops(cfg), spec.forward_flops(cfg)
    out["train_flops_per_image"], out["forward_flops_per_image"] = tf, ff
    results = []
    for clock, threads in (("wall", args.threads), ("wall", 1), ("cpu", 1)):
        p = peak if clock == "wall" else peak1
        p = p * min(threads, info["cores"]) / (info["cores"] if clock == "wall" else 1)
        for kind, fo, ft, n_img, calls, flops in (
            ("train", our_step, torch_step, args.batch, args.steps, tf),
            ("infer", our_infer, torch_infer, inf_x.shape[0], max(1, args.steps // 4), ff),
        ):
            r = compare(clock, threads, args.rounds, fo, ft, n_img, calls, torch)
            r["kind"] = kind
            r["batch"] = n_img
            r["ours_peak_fraction"] = r["ours_img_s"] * flops / p if p else float("nan")  # nan: no estimate
            r["torch_peak_fraction"] = r["torch_img_s"] * flops / p if p else float("nan")
            results.append(r)
            print(f"{kind:5s} {clock:4s} {threads} thr: ours {r['ours_img_s']:9.0f} img/s "
                  f"({100 * r['ours_peak_fraction']:4.1f}% of peak)  {out['peer']} {r['torch_img_s']:9.0f} img/s "
                  f"({100 * r['torch_peak_fraction']:4.1f}%)  ratio {r['ratio']:.2f} "
                  f"[{r['ratio_min']:.2f}..{r['ratio_max']:.2f}]")
    out["results"] = results
    out["load_avg_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if not args.no_startup:
        with tempfile.TemporaryDirectory() as tmp:
            out["startup"] = startup(tmp, args.batch, args.startup_runs)
        s = out["startup"]
        runs = s["first_runs_s"]
        spread = f", {min(runs):.1f}-{max(runs):.1f} s in {len(runs)} runs" if len(runs) > 1 else ""
        print(f"first run: first step after {s['first_run_to_first_step_s']:.1f} s (median{spread}; compiling on "
              f"two cores; serially: {s['first_run_serial_to_first_step_s']:.1f} s); cached run: after "
              f"{s['cached_run_to_first_step_s']:.2f} s ({s['cached_run_cpu_s']:.2f} s CPU)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
