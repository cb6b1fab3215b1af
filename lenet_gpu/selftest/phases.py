"""The phases of the self-test. Each runs in a child process of its own (lenet_gpu.selftest.child) with a
time budget, and records its cases in a PhaseRecorder that writes them to disk as they finish.

``ctx`` (from the runner) holds: mode ("gpu" or "emulate"), backends (labels), profile ("full", "tiny"),
quick, out (the report folder), data_dir, and the results of earlier phases (``previous``).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import FAIL, PASS, SKIP, PhaseRecorder, backend_name, first_lines, kill_group, make_backend

# ------------------------------------------------------------------------------------ shared helpers
_BACKENDS: dict[str, Any] = {}


class Costs:
    """How long cases of a kind took so far (the largest, to be safe): a case starts only if the time left
    covers what the slowest of its kind took, or a prior before there is one."""

    def __init__(self) -> None:
        self.seen: dict[Any, float] = {}

    def expect(self, key: Any, prior: float) -> float:
        return self.seen.get(key, prior)

    def observe(self, key: Any, case: dict[str, Any]) -> None:
        if "seconds" in case:
            self.seen[key] = max(self.seen.get(key, 0.0), float(case["seconds"]))


def _prior(label: str, gpu_s: float, emulated_s: float) -> float:
    return emulated_s if label in ("cupy-host", "numba-sim") else gpu_s


def module_allowance(ctx: dict, label: str) -> float:
    """Seconds to allow for building the kernel modules the compile phase did not get to (a module is built
    once: g++ on the harness, NVRTC on a GPU, then cached on disk), until a phase has run a step."""
    prev = ctx.get("previous") or {}
    if label in ((prev.get("whole_step") or {}).get("data", {}).get("step_seconds") or {}):
        return 0.0
    d = (prev.get("compile") or {}).get("data", {})
    return float((d.get("unbuilt_modules") or {}).get(label, 0)) * float((d.get("module_build_s") or {}).get(label, 0))


def backend(label: str, **kwargs: Any) -> Any:
    """One backend per label and process (modules compile once)."""
    if kwargs:
        return make_backend(label, **kwargs)
    if label not in _BACKENDS:
        _BACKENDS[label] = make_backend(label)
    return _BACKENDS[label]


def available_backends(ctx: dict, rec: PhaseRecorder) -> dict[str, Any]:
    """label → backend for each requested backend that can run here; the others are skipped with why."""
    out = {}
    for label in ctx["backends"]:
        try:
            out[label] = backend(label)
        except Exception as e:  # noqa: BLE001 - BackendUnavailable, ImportError, driver errors
            rec.skip(f"{label}", f"backend unavailable: {first_lines(str(e), 2)}", backend=label)
    return out


def mnist_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from ..data import load_dataset

    ds = load_dataset("mnist-sample", download=False, progress=False)
    return ds.train_images, ds.train_labels, ds.test_images, ds.test_labels


def tiled(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    reps = -(-n // images.shape[0])
    return (np.ascontiguousarray(np.tile(images, (reps, 1, 1))[:n]), np.ascontiguousarray(np.tile(labels, reps)[:n]))




# ------------------------------------------------------------------------------------ 1. environment
DISTRIBUTIONS = ("numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy", "numba", "numba-cuda", "torch", "cuda-bindings",
                 "cuda-core", "cuda-pathfinder", "cuda-toolkit", "nvidia-nvvm", "nvidia-cuda-nvcc",
                 "nvidia-cuda-nvcc-cu12", "nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime",
                 "nvidia-cuda-runtime-cu12", "nvidia-nvjitlink", "nvidia-nvjitlink-cu12", "pytest", "tqdm",
                 "threadpoolctl", "matplotlib", "pillow")


def package_versions() -> dict[str, str]:
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def gpu_facts_cupy() -> dict[str, Any]:
    import cupy as cp

    rt = cp.cuda.runtime
    n = rt.getDeviceCount()
    p = rt.getDeviceProperties(0)
    name = p.get("name", b"")
    return {
        "via": "cupy", "devices": n, "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{p['major']}.{p['minor']}", "sm_count": p.get("multiProcessorCount"),
        "memory_gib": round(p.get("totalGlobalMem", 0) / 2**30, 1), "l2_mib": round(p.get("l2CacheSize", 0) / 2**20, 1),
        "driver": _cuda_version(rt.driverGetVersion()), "runtime": _cuda_version(rt.runtimeGetVersion()),
        "nvrtc": ".".join(map(str, cp.cuda.nvrtc.getVersion())),
    }


def gpu_facts_numba() -> dict[str, Any]:
    from numba import cuda

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    facts: dict[str, Any] = {"via": "numba", "name": name,
                             "compute_capability": ".".join(map(str, dev.compute_capability)),
                             "sm_count": dev.MULTIPROCESSOR_COUNT}
    try:
        facts["driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
    except Exception:  # noqa: BLE001
        pass
    try:
        facts["runtime"] = ".".join(map(str, cuda.runtime.get_version()))
    except Exception:  # noqa: BLE001
        pass
    return facts


def nvvm_facts() -> dict[str, Any]:
    """Where numba-cuda's NVVM is, and the ptxas the compile checks would pair with it."""
    out: dict[str, Any] = {}
    try:
        from numba.cuda.cuda_paths import get_cuda_paths

        out["nvvm"] = str(get_cuda_paths()["nvvm"].info)
    except Exception as e:  # noqa: BLE001
        out["nvvm"] = f"not found ({first_lines(str(e), 1)})"
    try:
        from ..backends.numba_backend.compile_report import find_ptxas

        found = find_ptxas()
        out["ptxas"] = found.path
        out["ptxas_cuda"] = found.version_str
    except Exception as e:  # noqa: BLE001
        out["ptxas"] = f"not usable: {first_lines(str(e), 1)}"
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None


def phase_environment(ctx: dict, rec: PhaseRecorder) -> None:
    import lenet_gpu

    rec.data.update({
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "packages": package_versions(),
        "lenet_gpu": {"version": getattr(lenet_gpu, "__version__", None), "path": str(Path(lenet_gpu.__file__).parent),
                      "commit": git_commit()},
        "matplotlib": "installed" if importlib.util.find_spec("matplotlib") else "not installed (optional)",
        "NUMBA_ENABLE_CUDASIM": os.environ.get("NUMBA_ENABLE_CUDASIM", ""),
    })
    if ctx["mode"] == "gpu":
        gpus: dict[str, Any] = {}
        for via, fn in (("cupy", gpu_facts_cupy), ("numba", gpu_facts_numba)):
            if via in ctx["backends"]:
                r = rec.run(f"GPU seen by {via}", lambda fn=fn: {"facts": fn()})
                if r["status"] == PASS:
                    gpus[via] = r["facts"]
        rec.data["gpu"] = gpus.get("cupy") or gpus.get("numba")
        if "numba" in ctx["backends"]:
            rec.data["numba_toolchain"] = nvvm_facts()
    else:
        rec.data["gpu"] = None
        rec.note("emulated run: no GPU used; cupy-host runs the CUDA C kernels on CPU threads, numba-sim runs the "
                 "Numba kernels in Numba's CUDA simulator, both at tiny sizes")
    for label in ctx["backends"]:
        def facts(label: str = label) -> dict[str, Any]:
            be = backend(label)
            if ctx["mode"] == "gpu" and label in ("cupy", "numba") and not be.is_gpu:
                raise AssertionError(f"backend {label} is not on a GPU (is_gpu is False)")
            return {"is_gpu": bool(be.is_gpu), "backend_class": type(be).__name__,
                    "variants": {op: list(v) for op, v in be.variants.items()},
                    "defaults": dict(getattr(be, "default_variants", {}))}
        rec.run(f"backend {label}", facts, backend=label)


# ------------------------------------------------------------------------------------ 2. compile
_KERNEL_NAME = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(')


def kernel_names(source: str) -> list[str]:
    """The ``extern "C" __global__`` kernels of a CUDA C source, in order."""
    return _KERNEL_NAME.findall(source)


def _nvrtc_or_none() -> Any:
    """lenet_gpu.harness.nvrtc when NVRTC can be loaded here (no GPU needed), else None."""
    try:
        from ..harness import nvrtc
    except ImportError:
        return None
    return nvrtc if nvrtc.nvrtc_available() else None


def _compile_cupy(label: str, rec: PhaseRecorder, deadline: float) -> None:
    """Every kernel module built with each define set the launch planner gives LeNet-5's launches at the
    self-test's batch sizes (compiling.planned_option_sets), loaded through the backend's runtime (CuPy on a
    GPU; the g++ harness, ISO C++ only, emulated), and compiled by NVRTC with the ptxas report (registers,
    shared and local memory, spills) for the device's architecture (emulated: sm_80 and sm_90). Then each
    module compiled with MODULE_DEFINES as written (0 = chosen per launch): it compiles, or stops at an #error
    that names the define to set."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    from ..backends.cupy_backend.runtime import define_options, kernel_source, kernels_dir
    from .compiling import defaults_outcome, planned_option_sets, ptxas_facts, short_defines

    be = backend(label)
    rt = be.runtime
    if be.is_gpu:
        import cupy as cp

        archs = [f"sm_{cp.cuda.Device().compute_capability}"]
    else:
        archs = ["sm_90", "sm_80"]
    rec.data.setdefault("arch", {})[label] = ", ".join(archs)
    sets = planned_option_sets(be.sm_count)
    rec.data.setdefault("define_sets", {})[label] = len(sets)
    # a kernel no LeNet launch at these sizes uses is still built once, with the module's own options
    for path in sorted(kernels_dir().glob("*.cu")):
        stem = path.stem
        names = kernel_names(kernel_source(stem))
        if not names:
            rec.add(f"{label} {stem}.cu", FAIL, error="no extern \"C\" __global__ kernel found in the file",
                    backend=label, module=stem)
            continue
        covered = {n for (s, _), ns in sets.items() if s == stem for n in ns}
        rest = [n for n in names if n not in covered]
        if rest:
            key = (stem, be.options(stem))
            sets[key] = sorted({*sets.get(key, []), *rest})
    nv = _nvrtc_or_none()
    if nv is None:
        rec.note(f"{label}: NVRTC (cuda-bindings) is not installed here: no ptxas report (spills), and the "
                 "module defaults are checked with the runtime's own compiler")
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)))
    futures: dict[tuple, Any] = {}

    def nvrtc_compile(stem: str, opts: tuple, arch: str) -> Any:
        return nv.compile_cuda(kernel_source(stem), arch=arch, options=opts, warnings_as_errors=False)

    # MODULE_DEFINES as written; the modules with a define chosen per launch (0) first
    defaults = {stem: define_options(d) for stem, d in sorted(be.defines.items(), key=lambda kv: all(kv[1].values()))}
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    # the NVRTC compiles in order: the defaults first (an #error stops at once), then the sets
    order = [(stem, opts, archs[0]) for stem, opts in defaults.items()]
    order += [(stem, opts, arch) for stem, opts in sets for arch in archs if (stem, opts, arch) not in order]
    queued = [0]

    def feed() -> None:
        """Queue the next compiles: on a GPU all at once (beside CuPy's own, on many cores); emulated, a few
        at a time and only while a compile can still finish (one running at the end holds the exit up)."""
        while nv is not None and queued[0] < len(order):
            if not be.is_gpu and (left() < 3.0 or sum(not f.done() for f in futures.values()) >= workers):
                return
            key = order[queued[0]]
            queued[0] += 1
            if key not in futures:
                futures[key] = pool.submit(nvrtc_compile, *key)

    def left() -> float:
        return min(rec.time_left(), deadline - time.monotonic())

    if be.is_gpu:
        feed()

    def result(stem: str, opts: tuple, arch: str) -> Any:
        """The NVRTC result (raises NvrtcError with the log; FutureTimeout when out of time)."""
        key = (stem, opts, arch)
        if key not in futures:
            if not be.is_gpu and left() < 3.0:
                raise FutureTimeout
            futures[key] = pool.submit(nvrtc_compile, *key)
        feed()
        return futures[key].result(timeout=max(0.1, left()))

    costs = Costs()
    built: set[tuple] = set()
    wait = be.is_gpu  # on a GPU each kernel's row waits for its ptxas report; emulated, it takes it if ready
    try:
        # 1. every kernel of every planned set, loaded through the runtime
        for (stem, opts), names in sets.items():
            for i, name in enumerate(names):
                case = f"{label} {stem}.cu {name}" + (f" [{short_defines(opts)}]" if opts else "")
                need = costs.expect("module", _prior(label, 3.0, 0.5)) if i == 0 else 0.0
                if left() <= need:
                    rec.skip(case, "out of time", backend=label, module=stem, kernel=name,
                             defines=short_defines(opts))
                    continue

                def load(stem: str = stem, name: str = name, opts: tuple = opts) -> dict[str, Any]:
                    k = rt.get_kernel(stem, name, opts)
                    facts: dict[str, Any] = {"options": list(opts)}
                    for attr, key in (("num_regs", "registers"), ("shared_size_bytes", "static_shared_bytes"),
                                      ("local_size_bytes", "local_bytes"), ("max_threads_per_block", "max_threads")):
                        v = getattr(k, attr, None)
                        if isinstance(v, (int, np.integer)):
                            facts[key] = int(v)
                    keys = [(stem, opts, a) for a in archs]
                    if nv is None or not (wait or all(key in futures and futures[key].done() for key in keys)):
                        return facts
                    try:
                        per_arch = ptxas_facts({a: result(stem, opts, a) for a in archs}, name)
                    except FutureTimeout:
                        return facts  # its set's NVRTC case below says so
                    except nv.NvrtcError:
                        return facts  # its set's NVRTC case below fails with the log
                    facts["ptxas"] = per_arch
                    first = per_arch[archs[0]]
                    facts.setdefault("registers", first["registers"])
                    facts.setdefault("static_shared_bytes", first["static_shared_bytes"])
                    facts.setdefault("local_bytes", first["stack_bytes"])
                    facts["spill_stores"] = max(f["spill_stores"] for f in per_arch.values())
                    facts["spill_loads"] = max(f["spill_loads"] for f in per_arch.values())
                    return facts
                r = rec.run(case, load, backend=label, module=stem, kernel=name, defines=short_defines(opts))
                if i == 0:
                    costs.observe("module", r)
                    if r["status"] != SKIP:
                        built.add((stem, opts))
        feed()
        # 2. MODULE_DEFINES as written: compiles, or one #error per define set to 0
        for stem, opts in defaults.items():
            zero = [k for k, v in be.defines[stem].items() if not v]
            case = f"{label} {stem}.cu with MODULE_DEFINES as written" + (f" ({', '.join(zero)} = 0)" if zero else "")
            if left() <= 0.2:
                rec.skip(case, "out of time", backend=label, module=stem, check="defaults", defines=short_defines(opts))
                continue

            def check(stem: str = stem, opts: tuple = opts) -> dict[str, Any]:
                err: str | None = None
                try:
                    if nv is not None:
                        result(stem, opts, archs[0])
                    else:
                        rt.load_module(stem, opts)
                except FutureTimeout:
                    return {"status": SKIP, "reason": "out of time (NVRTC did not finish)"}
                except Exception as e:  # noqa: BLE001 - the compiler's log is what is judged
                    err = str(getattr(e, "log", "") or e)
                ok, how = defaults_outcome(err, be.defines[stem])
                if not ok:
                    raise AssertionError(f"{stem}.cu with {' '.join(opts) or 'no options'}: {how}")
                return {"outcome": how, "options": list(opts)}
            rec.run(case, check, backend=label, module=stem, check="defaults", defines=short_defines(opts))
        # 3. NVRTC (the compiler CuPy uses) of every planned set, for each architecture
        for stem, opts in (sets if nv is not None else {}):
            for arch in archs:
                case = f"{label} {stem}.cu NVRTC {arch}" + (f" [{short_defines(opts)}]" if opts else "")
                if left() <= 0.2:
                    rec.skip(case, "out of time", backend=label, module=stem, check="nvrtc", arch=arch,
                             defines=short_defines(opts))
                    continue

                def nvrtc_case(stem: str = stem, opts: tuple = opts, arch: str = arch) -> dict[str, Any]:
                    try:
                        res = result(stem, opts, arch)
                    except FutureTimeout:
                        return {"status": SKIP, "reason": "out of time (NVRTC did not finish)"}
                    return {"kernels": len(res.kernels), "max_registers": max(k.registers for k in res.kernels),
                            "spills": sum(k.spill_stores + k.spill_loads for k in res.kernels)}
                rec.run(case, nvrtc_case, backend=label, module=stem, check="nvrtc", arch=arch,
                        defines=short_defines(opts))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        # what later phases allow for the modules not built here (module_allowance)
        rec.data.setdefault("unbuilt_modules", {})[label] = len(set(sets) - built)
        rec.data.setdefault("module_build_s", {})[label] = costs.expect("module", _prior(label, 5.0, 4.0))


def _compile_numba(label: str, rec: PhaseRecorder, deadline: float | None = None) -> None:
    """On a GPU: every kernel compiled at its launch signature for the device and loaded (Dispatcher.compile
    binds it to the context). Emulated: compile_ptx for sm_90 (no device needed; the simulator cannot
    compile), in a child where NUMBA_ENABLE_CUDASIM is unset."""
    from ..backends.numba_backend.compile_report import all_kernels, f64_lines

    table = all_kernels()  # the backend's, the fused ops' (head, lenet_fwd), the routed and the step kernels

    on_gpu = label == "numba"
    if on_gpu:
        from numba import cuda

        cc = cuda.get_current_device().compute_capability
        backend(label)  # the backend's own checks (a GPU present; compatibility imports)
    else:
        from numba import cuda

        cc = (9, 0)
        rec.note("numba-sim: kernels compiled with numba.cuda.compile_ptx for sm_90 (no device needed); the "
                 "simulator itself compiles nothing")
    rec.data.setdefault("arch", {})[label] = f"sm_{cc[0]}{cc[1]}"
    costs = Costs()
    for i, name in enumerate(sorted(table)):
        case = f"{label} {name}"
        need = costs.expect("kernel", 2.0)
        # the first kernel runs whenever the phase has time (the imports above may have used this share)
        if rec.out_of_time(need) or (i and deadline is not None and time.monotonic() + need > deadline):
            rec.skip(case, "out of time", backend=label, kernel=name)
            continue

        def comp(name: str = name) -> dict[str, Any]:
            kernel, sig = table[name]
            if on_gpu:
                k = kernel.compile(sig)
                ptx = k.inspect_asm(cc)
                facts = {"registers": k.regs_per_thread, "static_shared_bytes": k.shared_mem_per_block,
                         "local_bytes": k.local_mem_per_thread, "max_threads": k.max_threads_per_block}
            else:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
                facts = {}
            f64 = f64_lines(ptx)
            facts["f64_instructions"] = len(f64)
            if f64:
                raise AssertionError(f"{name}: {len(f64)} PTX lines use float64 in a float32 kernel, e.g. {f64[0]}")
            return facts
        costs.observe("kernel", rec.run(case, comp, backend=label, kernel=name, signature=table[name][1]))


#: the compile phase's time per backend, relative
COMPILE_WEIGHT = {"cupy": 1.5, "numba": 1.0, "cupy-host": 1.0, "numba-sim": 1.0}
#: seconds the compile phase keeps for each backend still to come (its first kernel)
COMPILE_MIN_S = 5.0


def phase_compile(ctx: dict, rec: PhaseRecorder) -> None:
    # Numba first: its imports cost seconds before its first kernel, cupy's first loads are cheap
    labels = sorted(ctx["backends"], key=lambda b: b not in ("numba", "numba-sim"))
    for i, label in enumerate(labels):
        # each backend keeps a share of the time (the first does not starve the second): cupy builds more (a
        # module per define set) than Numba compiles
        weights = [COMPILE_WEIGHT.get(b, 1.0) for b in labels[i:]]
        keep = COMPILE_MIN_S * (len(labels) - i - 1)  # the backends after this one: enough for a first case each
        deadline = time.monotonic() + min(rec.time_left() * weights[0] / sum(weights), rec.time_left() - keep)
        try:
            if label in ("cupy", "cupy-host"):
                _compile_cupy(label, rec, deadline)
            elif label in ("numba", "numba-sim"):
                _compile_numba(label, rec, deadline)
            else:
                rec.skip(label, "no kernels to compile (NumPy ops)", backend=label)
        except Exception as e:  # noqa: BLE001 - one backend failing to start is its failure, not the phase's end
            from .common import describe_exception

            rec.add(f"{label} (compile setup)", FAIL, error=describe_exception(e), backend=label)


# ------------------------------------------------------------------------------------ 3. op parity
def ordered_ops(backends: dict[str, Any]) -> list[str]:
    from ..backends.base import OPS, OPTIONAL_OPS

    seen: list[str] = []
    for op in (*OPS, *OPTIONAL_OPS, *(op for be in backends.values() for op in be.variants)):
        if op not in seen and any(op in be.variants for be in backends.values()):
            seen.append(op)
    return seen


def phase_op_parity(ctx: dict, rec: PhaseRecorder) -> None:
    from .checks import KNOWN_OPS, input_sets, run_case

    bes = available_backends(ctx, rec)
    ops = ordered_ops(bes)
    for op in ops:
        if op not in KNOWN_OPS:
            for label, be in bes.items():
                if op in be.variants:
                    rec.skip(f"{label} {op}", "no parity builder for this op (add one to lenet_gpu/selftest/checks.py)",
                             backend=label, op=op)
    sets = input_sets([op for op in ops if op in KNOWN_OPS], ctx["profile"], ctx.get("max_tier", 3))
    rec.data["input_sets"] = len(sets)
    complete = bool(ctx.get("complete"))  # every case runs, whatever the clock says (the tests' coverage)
    skipped: dict[tuple[str, str, str], int] = {}
    costs = Costs()
    build_s = ((ctx.get("previous") or {}).get("compile") or {}).get("data", {}).get("module_build_s") or {}
    for iset in sets:
        for label, be in bes.items():
            for v in be.variants.get(iset.op, ()):
                first = max(_prior(label, 0.5, 2.0), module_allowance(ctx, label) and build_s.get(label, 0.0))
                if not complete and rec.out_of_time(costs.expect((label, iset.op), first)):
                    key = (label, iset.op, v)
                    skipped[key] = skipped.get(key, 0) + 1
                    continue
                name = f"{label} {iset.op}_{v} {iset.desc}" + "".join(f" {x}" for x in (iset.act, iset.pool) if x)
                r = rec.run(name, lambda be=be, v=v, iset=iset: run_case(be, iset.op, v, iset), backend=label,
                            op=iset.op, variant=v, act=iset.act, pool=iset.pool, shape=iset.desc, tier=iset.tier)
                costs.observe((label, iset.op), r)
        iset.release()
    for (label, op, v), n in skipped.items():
        rec.skip(f"{label} {op}_{v}: {n} input sets", "out of time", backend=label, op=op, variant=v, count=n)


# ------------------------------------------------------------------------------------ 4. whole steps
def _require_model_api() -> Any:
    from ..model import LeNet5

    missing = [m for m in ("begin_run", "begin_epoch", "run_steps", "step_stats", "graph_check", "upload_dataset")
               if not hasattr(LeNet5, m)]
    if missing:
        raise RuntimeError(f"lenet_gpu.model.LeNet5 lacks {', '.join(missing)} (the step-state model API)")
    return LeNet5


def new_model(be: Any, **kw: Any) -> Any:
    LeNet5 = _require_model_api()  # noqa: N806
    return LeNet5(backend=be, **kw)


def begin(model: Any, images: np.ndarray, labels: np.ndarray, batch: int, steps: int, lr: float,
          perm: np.ndarray | None = None, seed: int = 3, shift: int = 2) -> Any:
    data = model.upload_dataset(images, labels)
    model.begin_run(data, batch, np.full(max(1, steps), lr, np.float32), seed=seed, shift=shift)
    model.begin_epoch(data, np.arange(images.shape[0], dtype=np.int32) if perm is None else perm)
    return data


def steps_vs_numpy(be: Any, optimizer: str, act: str, pool: str, fused: bool, batch: int, steps: int,
                   images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``steps`` steps on ``be`` (with its fused ops, or the unfused baseline) and on the numpy backend from
    the same initial parameters and data, augmentation on: the parameters agree after every step
    (tolerances of tests/test_cupy_backend.py's whole-step test) and the per-step statistics at the end."""
    from ..parity import error_stats

    lr = 0.01 if optimizer == "sgd" else 1e-3
    kw = dict(activation=act, pool=pool, seed=1, optimizer=optimizer, lr=lr)
    dev, cpu = new_model(be, fused=fused, **kw), new_model("numpy", **kw)
    perm = np.random.default_rng(0).permutation(images.shape[0]).astype(np.int32)
    datas = [begin(m, images, labels, batch, steps, lr, perm) for m in (dev, cpu)]
    worst = 0.0
    for s in range(steps):
        for m, d in zip((dev, cpu), datas):
            m.run_steps(d, 1)
        st = error_stats(dev.parameters(), cpu.parameters(), 2e-5, 2e-4)
        worst = max(worst, st["ratio"])
        if st["bad"]:
            raise AssertionError(f"parameters after step {s + 1}: {st['bad']} of {st['size']} out of tolerance "
                                 f"(atol 2e-5, rtol 2e-4), largest |diff| {st['max_abs']:.3g} at flat index "
                                 f"{st['worst']}")
    a, b = np.asarray(dev.step_stats(0, steps)), np.asarray(cpu.step_stats(0, steps))
    if not np.array_equal(a[:, 1], b[:, 1]):
        raise AssertionError(f"correct counts per step differ: {a[:, 1].tolist()} vs numpy {b[:, 1].tolist()}")
    if not np.allclose(a[:, 0], b[:, 0], rtol=1e-4, atol=1e-4):
        raise AssertionError(f"loss sums per step differ: {a[:, 0].tolist()} vs numpy {b[:, 0].tolist()}")
    return {"worst_ratio": worst, "loss_sums": a[:, 0].tolist()}


def _graph_backends(label: str) -> tuple[Any, bool]:
    """A backend of ``label`` with CUDA graphs on where the backend has the switch; and whether it can graph."""
    try:
        be = make_backend(label, graphs=True)
    except TypeError:
        be = backend(label)
    try:
        can = be.graph(lambda: None, 1) is not None
    except TypeError:  # the older graph(fn) signature
        can = bool(getattr(be, "graphs", False)) and bool(be.is_gpu)
    return be, can


def graph_check(label: str, images: np.ndarray, labels: np.ndarray, batch: int, k: int) -> dict[str, Any]:
    """The model's graph self-check (run when it first captures K steps: K replayed steps against K eager
    ones, bit for bit); skipped where the backend has no graphs."""
    be, _ = _graph_backends(label)
    m = new_model(be, seed=6, graph_steps=k)
    d = begin(m, images, labels, batch, 2 * k + 1, 1e-3)
    m.run_steps(d, k + 1)
    ok, msg = m.graph_check()
    if ok:
        return {"message": msg}
    if msg.startswith("CUDA graphs off"):
        raise AssertionError(f"graph_check: {msg}")
    return {"status": SKIP, "reason": f"no graphs on this backend ({msg})"}


def graph_vs_eager(label: str, images: np.ndarray, labels: np.ndarray, batch: int, k: int, steps: int
                   ) -> dict[str, Any]:
    """``steps`` steps through graphs of K steps (and the tail's graph) against the same steps launched
    eagerly on a second model from the same start: parameters and statistics bit for bit."""
    be, can = _graph_backends(label)
    if not can:
        return {"status": SKIP, "reason": "no graphs on this backend (both runs would be eager)"}
    kw = dict(seed=2, optimizer="adam", lr=1e-3, graph_steps=k)
    g, e = new_model(be, use_graphs=True, **kw), new_model(be, use_graphs=False, **kw)
    dg = begin(g, images, labels, batch, steps, 1e-3)
    de = begin(e, images, labels, batch, steps, 1e-3)
    g.run_steps(dg, steps)
    e.run_steps(de, steps)
    pg, pe = g.parameters(), e.parameters()
    if not np.array_equal(pg, pe):
        bad = int(np.sum(pg != pe))
        raise AssertionError(f"after {steps} steps, graph-replayed and eager parameters differ in {bad} of {pg.size}")
    sg, se = np.asarray(g.step_stats(0, steps)), np.asarray(e.step_stats(0, steps))
    if not np.array_equal(sg, se):
        raise AssertionError(f"per-step statistics differ: graph {sg.tolist()} vs eager {se.tolist()}")
    if not g.use_graphs:
        raise AssertionError(f"the graph model fell back to eager launches: {g.graph_note}")
    return {"steps": steps, "graph_steps": k}


def determinism(label: str, images: np.ndarray, labels: np.ndarray, batch: int, steps: int) -> dict[str, Any]:
    """Two runs from the same start on two backend instances: parameters and statistics bit for bit."""
    params, stats = [], []
    for _ in range(2):
        be = make_backend(label)
        m = new_model(be, seed=4, optimizer="adam", lr=2e-3)
        d = begin(m, images, labels, batch, steps, 2e-3)
        m.run_steps(d, steps)
        params.append(m.parameters())
        stats.append(np.asarray(m.step_stats(0, steps)))
    if not np.array_equal(params[0], params[1]):
        raise AssertionError(f"two runs of {steps} steps at batch {batch} differ in "
                             f"{int(np.sum(params[0] != params[1]))} of {params[0].size} parameters")
    if not np.array_equal(stats[0], stats[1]):
        raise AssertionError("two runs give different per-step statistics")
    return {"batch": batch, "steps": steps}


def counters_per_step(be: Any, images: np.ndarray, labels: np.ndarray, batch: int, steps: int, k: int
                      ) -> dict[str, Any]:
    """After warm-up, ``steps`` steps (in graphs of ``k`` where the backend has graphs) make launches only: no
    allocation, copy or synchronisation. Also the time per step (wall clock around run_steps + a sync)."""
    m = new_model(be, seed=5, optimizer="adam", lr=1e-3, graph_steps=k)
    d = begin(m, images, labels, batch, 3 * steps, 1e-3)
    m.run_steps(d, steps)  # warm-up: workspaces, compiles, graph capture
    be.synchronize()
    before = be.counters.snapshot()
    t0 = time.perf_counter()
    m.run_steps(d, steps)
    delta = be.counters.since(before)
    be.synchronize()
    dt = time.perf_counter() - t0
    per = {k: v / steps for k, v in delta.items()}
    figures = {"batch": batch, "steps": steps, "per_step": per, "step_seconds": dt / steps,
               "images_per_s": batch * steps / dt}
    extra = {k: v for k, v in delta.items() if k != "launches" and v}
    if extra:
        raise AssertionError(f"{steps} steps after warm-up made {extra} (must be launches only); "
                             f"launches per step {per['launches']:.1f}")
    return figures


#: (batch, seconds) of a training step assumed before one was measured: the emulators on a small busy CPU,
#: numpy, and a GPU (an H200 took 0.2 ms (cupy) to 0.5 ms (numba) at batch 64, flat up to a few hundred)
PRIOR_STEP = {"cupy-host": (2, 3.0), "numba-sim": (2, 12.0), "numpy": (64, 0.03)}
GPU_PRIOR_STEP = (256, 0.003)
EMULATORS = ("cupy-host", "numba-sim")
#: the first steps on a GPU compile (Numba JIT, NVRTC from cache): seconds allowed for it in estimates
GPU_FIRST_STEPS_S = 10.0


def expected_step_s(measured: dict[str, dict], label: str, batch: int) -> float:
    """Expected seconds of one training step of ``label`` at ``batch``: from the step time measured in the
    whole-step phase when there is one, else a prior; linear in the batch above the measured (or, on a GPU,
    above 256) batch."""
    m = measured.get(label)
    ref_batch, seconds = (m["batch"], m["seconds"]) if m else PRIOR_STEP.get(label, GPU_PRIOR_STEP)
    if label not in EMULATORS and label != "numpy":
        ref_batch = max(ref_batch, 256)
    return seconds * max(1.0, batch / ref_batch)


def case_cost(rec: PhaseRecorder, label: str, batch: int, steps: int) -> float:
    """Expected seconds of a case of ``steps`` training steps (from this phase's own measurements), plus
    the first compile on a GPU until a step was measured, plus a second for the set-up."""
    measured = rec.data.get("step_seconds", {})
    first = GPU_FIRST_STEPS_S if label not in EMULATORS and label != "numpy" and label not in measured else 0.0
    return steps * expected_step_s(measured, label, batch) + first + 1.0


def run_if_time(rec: PhaseRecorder, name: str, est_s: float, fn: Any, complete: bool = False,
                **fields: Any) -> dict[str, Any]:
    """Run a case only if its expected cost fits the time left (else record it as skipped); ``complete``: always
    run it (a run whose coverage must not depend on the machine's speed)."""
    left = rec.time_left()
    if not complete and (left < est_s or left <= 0):
        return rec.skip(name, f"out of time (needs about {est_s:.0f} s, {max(left, 0):.0f} s left)", **fields)
    return rec.run(name, fn, **fields)


def phase_whole_step(ctx: dict, rec: PhaseRecorder) -> None:
    emulate = ctx["mode"] == "emulate"
    complete = bool(ctx.get("complete"))  # every case runs, whatever the clock says
    bes = available_backends(ctx, rec)
    train_x, train_y, _, _ = mnist_sample()
    rec.data["step_seconds"] = {}
    for label, be in bes.items():
        tiny = label in EMULATORS
        ran: list[dict] = []  # the cases that ran steps: until one has, modules may still need building

        def cost(batch: int, steps: int, label: str = label, ran: list = ran) -> float:
            built = any(c["status"] != SKIP for c in ran)
            return case_cost(rec, label, batch, steps) + (0.0 if built else module_allowance(ctx, label))

        def go(name: str, est_s: float, fn: Any, ran: list = ran, **fields: Any) -> dict[str, Any]:
            r = run_if_time(rec, name, est_s, fn, complete, **fields)
            ran.append(r)
            return r

        # counters and the step time first: later cases (and the training phase) size themselves from it
        b, n, k = (2, 1, 10) if tiny else (64, 40, 10)
        x, y = tiled(train_x, train_y, b * (4 * n + 2))
        r = go(f"{label} counters per step (batch {b}, {n} steps after warm-up)", cost(b, 2 * n + 1),
               lambda be=be, x=x, y=y, b=b, n=n, k=k: counters_per_step(be, x, y, b, n, k),
               backend=label, check="counters")
        if "step_seconds" in r:
            rec.data["step_seconds"][label] = {"batch": b, "seconds": r["step_seconds"]}
        configs = [("sgd", "relu", "max", True), ("adam", "tanh", "avg", False), ("sgd", "sigmoid", "max", False),
                   ("adam", "lecun_tanh", "avg", True)]
        vs = 2 if tiny else 3  # steps compared with numpy
        if emulate and not complete:
            configs = configs[:2]
        for opt, act, pool, fused in configs:
            go(f"{label} steps vs numpy: {opt} {act} {pool} {'fused' if fused else 'unfused'}, batch 2, {vs} steps",
               cost(2, vs), lambda be=be, opt=opt, act=act, pool=pool, fused=fused, vs=vs:
               steps_vs_numpy(be, opt, act, pool, fused, 2, vs, train_x[:12], train_y[:12]),
               backend=label, check="vs_numpy", fused=fused)
        if not tiny:
            go(f"{label} steps vs numpy: sgd relu max fused, batch 33, 4 steps", cost(33, 4),
               lambda be=be: steps_vs_numpy(be, "sgd", "relu", "max", True, 33, 4, train_x[:200], train_y[:200]),
               backend=label, check="vs_numpy")
        # graphs: the model's own self-check, then graph-replayed steps against eager steps on two models
        k, gb = (1, 2) if tiny else (10, 64)
        gx, gy = tiled(train_x, train_y, gb * (2 * k + 2))
        go(f"{label} model.graph_check ({k} graph-replayed steps == {k} eager steps)", cost(gb, 3 * k + 1),
           lambda label=label, gx=gx, gy=gy, gb=gb, k=k: graph_check(label, gx, gy, gb, k),
           backend=label, check="graph")
        steps = 2 * k + (1 if tiny else 9)  # two K-step graphs, then a tail (its own graph when ≥ 8 steps)
        gx, gy = tiled(train_x, train_y, gb * (steps + 1))
        go(f"{label} {steps} steps in {k}-step graphs == {steps} eager steps", cost(gb, 2 * steps),
           lambda label=label, gx=gx, gy=gy, gb=gb, k=k, steps=steps: graph_vs_eager(label, gx, gy, gb, k, steps),
           backend=label, check="graph")
        # determinism: batch ≥ 64 so that the split reductions are used (the emulators: tiny)
        db, dn = (2, 1) if tiny else (128, 20)
        dx, dy = tiled(train_x, train_y, db * (dn + 1))
        go(f"{label} two runs bit for bit (batch {db}, {dn} steps)", cost(db, 2 * dn),
           lambda label=label, dx=dx, dy=dy, db=db, dn=dn: determinism(label, dx, dy, db, dn),
           backend=label, check="determinism")


# ------------------------------------------------------------------------------------ 5. training
def time_to(epochs: list[dict], threshold: float) -> float | None:
    """Training seconds (the metrics' per-epoch ``seconds``, summed) until test accuracy first reaches it."""
    total = 0.0
    for r in epochs:
        total += float(r.get("seconds", 0.0))
        if float(r.get("test_acc", 0.0)) >= threshold:
            return round(total, 3)
    return None


#: the test accuracy the default recipe must reach on mnist-sample (the CI gate of tests/test_cli.py)
SAMPLE_GATE = 0.97
#: the test accuracies a run is timed to, per dataset (the seconds of training until each is first reached)
TIME_TO_ACC: dict[str, tuple[float, ...]] = {"mnist-sample": (0.97, 0.98), "mnist": (0.98, 0.99),
                                            "fashion-mnist": (0.88, 0.90, 0.91)}
#: a --data-dir folder that is neither (its own IDX files)
DIR_TIME_TO_ACC = (0.97, 0.98)
#: the epoch whose test accuracy is reported beside the final one
ACC_AT_EPOCH = 10


def dataset_of_dir(data_dir: str) -> str:
    """The name lenet_gpu.data gives the dataset in ``data_dir``: "mnist" or "fashion-mnist" when its files'
    checksums are those, else "dir" (any IDX files)."""
    from ..data import load_dataset

    name = load_dataset(data_dir=data_dir, download=False, progress=False).name
    return name if name in TIME_TO_ACC else "dir"


def training_runs(ctx: dict) -> list[dict[str, Any]]:
    runs = []
    for label in ctx["backends"]:
        waived = None
        if label in EMULATORS:  # one step and a forward pass of 2 images: seconds on an emulator
            extra = ["--limit", "2", "--epochs", "1", "--batch-size", "2"]
        elif ctx["mode"] == "emulate":
            extra = ["--limit", "256", "--epochs", "1"]
        else:
            extra = []  # the default recipe
        if extra:
            n = extra[1]
            waived = (f"the {SAMPLE_GATE:.0%} test-accuracy gate of the default recipe on mnist-sample does not apply: "
                      f"this run trains {n} images for 1 epoch (it shows training runs end to end, not that it "
                      "learns)")
        runs.append({"backend": label, "dataset": "mnist-sample", "args": ["--dataset", "mnist-sample", *extra],
                     "gate": SAMPLE_GATE if not extra else None, "waived": waived,
                     "thresholds": TIME_TO_ACC["mnist-sample"]})
    if ctx.get("data_dir") and ctx["mode"] == "gpu":
        known = ctx.get("data_dir_dataset") or "dir"
        name = known if known != "dir" else Path(ctx["data_dir"]).name
        for label in ctx["backends"]:
            runs.append({"backend": label, "dataset": f"data-dir {name}", "args": ["--data-dir", str(ctx["data_dir"])],
                         "gate": None, "waived": None, "thresholds": TIME_TO_ACC.get(known, DIR_TIME_TO_ACC)})
    return runs


def prev_step_cost(ctx: dict, label: str, batch: int) -> float:
    """Expected seconds of a training step, from the step time the whole-step phase measured (else a prior)."""
    prev = ((ctx.get("previous") or {}).get("whole_step") or {}).get("data", {}).get("step_seconds", {})
    return expected_step_s(prev, label, batch)


def _estimate_s(run: dict, ctx: dict) -> float | None:
    """A short (--limit) run's expected seconds: start-up, its steps, and a forward pass over the test images
    (about half a step at that batch); None for the full recipe (on a GPU: tens of seconds)."""
    a = run["args"]
    if "--limit" not in a:
        return None
    limit = int(a[a.index("--limit") + 1])
    batch = int(a[a.index("--batch-size") + 1]) if "--batch-size" in a else 64
    steps = limit // min(batch, limit)
    label = run["backend"]
    return (5.0 + 1.2 * steps * prev_step_cost(ctx, label, batch) + 0.5 * prev_step_cost(ctx, label, limit)
            + module_allowance(ctx, label))


def train_once(run: dict, ctx: dict, timeout_s: float) -> dict[str, Any]:
    label = run["backend"]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{label}-{run['dataset']}")
    folder = Path(ctx["out"]) / "train" / slug
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cmd = [sys.executable, "-m", "lenet_gpu.train", "--backend", backend_name(label), *run["args"], "--no-progress",
           "--no-download", "--checkpoint", str(folder / "lenet5.npz"), "--metrics", str(metrics), "--overwrite"]
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(p)
            rc = None
    wall = time.perf_counter() - t0
    text = (folder / "log.txt").read_text(errors="replace")
    epochs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.exists() else []
    figures: dict[str, Any] = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2), "folder": str(folder),
                               "epochs": len(epochs), "returncode": rc}
    if epochs:
        last = epochs[-1]
        # an epoch whose only step was the run's first (compiling) step has no rate (None)
        rates = [float(r["images_per_s"]) for r in epochs if r.get("images_per_s") is not None]
        figures.update({
            "final_test_acc": last.get("test_acc"), "final_loss": last.get("loss"),
            "train_seconds": round(sum(float(r.get("seconds", 0)) for r in epochs), 3),
            "first_epoch_s": round(float(epochs[0].get("seconds", 0)), 3),
            "images_per_s": round(float(np.median(rates)), 1) if rates else None,
            "time_to_90": time_to(epochs, 0.90), "time_to_97": time_to(epochs, 0.97),
            "time_to_98": time_to(epochs, 0.98),
            "time_to_acc": {f"{t:.2f}": time_to(epochs, t) for t in run.get("thresholds", ())},
            "acc_at_epoch": {str(ACC_AT_EPOCH): epochs[ACC_AT_EPOCH - 1].get("test_acc")
                             if len(epochs) >= ACC_AT_EPOCH else None},
            "test_acc_per_epoch": [r.get("test_acc") for r in epochs],
        })
    if rc is None:
        if epochs:  # slow, not hung: out of time, with the figures of the epochs that finished
            return {**figures, "status": SKIP, "reason": f"out of time: stopped after {timeout_s:.0f} s, at epoch "
                    f"{len(epochs)} (the figures are of the epochs that finished)"}
        raise AssertionError(f"training did not finish an epoch within {timeout_s:.0f} s (killed); last output:\n"
                             + first_lines("\n".join(text.splitlines()[-6:]), 6))
    if rc != 0:
        raise AssertionError(f"training exited with status {rc}:\n" + first_lines("\n".join(text.splitlines()[-8:]), 8))
    if not epochs:
        raise AssertionError("training wrote no metrics")
    if not all(np.isfinite(float(r.get("loss", np.nan))) for r in epochs):
        raise AssertionError("a non-finite loss in the metrics")
    if run["gate"] is not None and float(epochs[-1]["test_acc"]) < run["gate"]:
        raise AssertionError(f"final test accuracy {epochs[-1]['test_acc']:.4f} < {run['gate']} (the default recipe's "
                             "gate on mnist-sample)")
    return figures


def phase_training(ctx: dict, rec: PhaseRecorder) -> None:
    if ctx.get("data_dir") and ctx["mode"] == "gpu":
        try:
            ctx = {**ctx, "data_dir_dataset": dataset_of_dir(ctx["data_dir"])}
            rec.data["data_dir_dataset"] = ctx["data_dir_dataset"]
        except Exception as e:  # noqa: BLE001 - the training runs report a bad folder themselves
            rec.note(f"--data-dir: could not read the dataset ({first_lines(str(e), 1)})")
    runs = training_runs(ctx)
    rec.data["thresholds"] = {r["dataset"]: list(r["thresholds"]) for r in runs}
    waived = [f"{r['backend']} {r['dataset']}: {r['waived']}" for r in runs if r.get("waived")]
    if waived:
        rec.data["waived_gates"] = waived
        rec.note(f"{len(waived)} gate{'s' if len(waived) > 1 else ''} waived (listed under Waived gates): the "
                 f"{SAMPLE_GATE:.0%} accuracy gate does not apply to a short emulated run")
    first_step_labels = [b for b in ctx["backends"] if b in ("cupy", "numba")]  # on a GPU only
    reserve = sum(FIRST_STEP_PRIOR_S.get(b, 30.0) for b in first_step_labels)
    for i, run in enumerate(runs):
        how = " (default recipe)" if run["gate"] else (f" ({' '.join(run['args'][2:])})" if run["args"][2:] else "")
        name = f"{run['backend']} {run['dataset']}{how}"
        # the first-step measurements that follow keep their estimated time unless the runs need it all
        left = rec.time_left() - (reserve if rec.time_left() > 3 * reserve else 0.0)
        est = _estimate_s(run, ctx)
        if left < 5 or (est is not None and est > left):
            why = "out of time" + (f" (estimated {est:.0f} s from the measured step time, {left:.0f} s left)"
                                   if est is not None else "")
            rec.skip(name, why, backend=run["backend"], dataset=run["dataset"],
                     **({"waived": run["waived"]} if run.get("waived") else {}))
            continue
        # the runs still to come each keep a share of what is left
        timeout = max(5.0, left if i == len(runs) - 1 else left - 0.5 * left * (len(runs) - i - 1) / (len(runs) - i))
        rec.run(name, lambda run=run, timeout=timeout: train_once(run, ctx, timeout), backend=run["backend"],
                dataset=run["dataset"], gate=run["gate"], **({"waived": run["waived"]} if run.get("waived") else {}))
    for label in first_step_labels:
        first_step_cases(ctx, rec, label)
    if ctx.get("data_dir") and ctx["mode"] == "gpu":
        trainer = peer_trainer()
        if trainer is None:
            rec.note("time to accuracy of the PyTorch peer: no peer trainer in this version (the hook "
                     "phases.peer_time_to_accuracy takes one)")
        elif importlib.util.find_spec("torch") is None:
            rec.skip(f"torch peer data-dir {Path(ctx['data_dir']).name}", "PyTorch is not installed", kind="peer",
                     backend="torch")
        else:
            known = ctx.get("data_dir_dataset") or "dir"
            peer_time_to_accuracy(rec, ctx, trainer, TIME_TO_ACC.get(known, DIR_TIME_TO_ACC))


#: seconds a first-step measurement (two child processes: an empty cache, then the warm one) is expected to take
FIRST_STEP_PRIOR_S = {"cupy": 30.0, "numba": 30.0, "cupy-host": 60.0, "numba-sim": 30.0, "numpy": 10.0}
#: the child that times a backend's first training step (run with the caches pointed at a folder of its own)
FIRST_STEP_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
label, batch = sys.argv[1], int(sys.argv[2])
from lenet_gpu.selftest.common import make_backend
from lenet_gpu.selftest.phases import begin, mnist_sample, new_model, tiled
be = make_backend(label)
x, y, _, _ = mnist_sample()
x, y = tiled(x, y, 4 * batch)
t1 = time.perf_counter()
m = new_model(be, seed=0)
d = begin(m, x, y, batch, 3, 1e-3)
m.run_steps(d, 1)
be.synchronize()
t2 = time.perf_counter()
m.run_steps(d, 1)
be.synchronize()
t3 = time.perf_counter()
print("FIRST_STEP " + json.dumps({"start_s": t1 - t0, "first_step_s": t2 - t1, "next_step_s": t3 - t2}))
"""
#: the environment variables that point each backend's compile cache somewhere
CACHE_VARS = {"numba": ("NUMBA_CACHE_DIR",), "cupy": ("CUPY_CACHE_DIR",), "cupy-host": ("CUDACPU_CACHE",),
              "numba-sim": ("NUMBA_CACHE_DIR",), "numpy": ()}


def first_step(label: str, cache: Path, batch: int, timeout_s: float) -> dict[str, Any]:
    """A child process that builds backend ``label``, uploads a small dataset and times its first training
    step (model set-up, begin_run and begin_epoch included: whatever compiles on first use) and the next one,
    with the backend's compile cache in ``cache``."""
    env = dict(os.environ)
    for var in CACHE_VARS.get(label, ()):
        env[var] = str(cache / var.lower())
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", FIRST_STEP_CHILD, label, str(batch)], capture_output=True,
                           text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the first step did not finish within {timeout_s:.0f} s") from None
    wall = time.perf_counter() - t0
    for line in r.stdout.splitlines():
        if line.startswith("FIRST_STEP "):
            return {**{k: round(v, 3) for k, v in json.loads(line[11:]).items()}, "process_s": round(wall, 2)}
    raise AssertionError(f"the child exited with status {r.returncode}:\n" + first_lines(r.stderr[-2000:], 8))


def first_step_cases(ctx: dict, rec: PhaseRecorder, label: str, batch: int = 64) -> None:
    """The first training step of ``label`` in a fresh process with an empty compile cache, then again with
    the cache the first left (warm): what a user waits for before training starts (Numba's JIT, NVRTC)."""
    import shutil

    cache = Path(ctx["out"]) / ".work" / f"first-step-cache-{label}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    vars_ = ", ".join(CACHE_VARS.get(label, ())) or "no compile cache"
    try:
        for state in ("empty", "warm"):
            name = f"{label} first training step, {state} cache ({vars_}), batch {batch}"
            need = FIRST_STEP_PRIOR_S.get(label, 30.0) / 2
            if rec.time_left() < need:
                rec.skip(name, f"out of time (needs about {need:.0f} s)", backend=label, kind="first_step",
                         cache=state)
                continue
            rec.run(name, lambda: first_step(label, cache, batch, max(10.0, rec.time_left())), backend=label,
                    kind="first_step", cache=state, batch=batch)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def peer_trainer() -> Any:
    """The PyTorch peer's trainer for time to accuracy, when this version has one: a callable
    ``trainer(data_dir, epochs) -> iterable of {"epoch", "seconds", "test_acc"}`` (one per epoch, seconds of
    training alone), looked up as ``lenet_gpu.perf.peer_epochs``; else None."""
    try:
        from .. import perf  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(perf, "peer_epochs", None)


def peer_time_to_accuracy(rec: PhaseRecorder, ctx: dict, trainer: Any, thresholds: tuple[float, ...],
                          epochs: int = 15) -> dict[str, Any]:
    """The hook for the PyTorch peer's time to accuracy on ``--data-dir``: runs ``trainer(data_dir, epochs)``
    (see peer_trainer) and records the same figures as a backend's run: seconds to each threshold, the
    accuracy at ACC_AT_EPOCH epochs and at the end."""
    def run() -> dict[str, Any]:
        rows = [dict(r) for r in trainer(ctx["data_dir"], epochs)]
        if not rows:
            raise AssertionError("the peer trainer returned no epochs")
        return {"epochs": len(rows), "final_test_acc": rows[-1].get("test_acc"),
                "train_seconds": round(sum(float(r.get("seconds", 0)) for r in rows), 3),
                "time_to_acc": {f"{t:.2f}": time_to(rows, t) for t in thresholds},
                "acc_at_epoch": {str(ACC_AT_EPOCH): rows[ACC_AT_EPOCH - 1].get("test_acc")
                                 if len(rows) >= ACC_AT_EPOCH else None},
                "test_acc_per_epoch": [r.get("test_acc") for r in rows]}
    name = f"torch peer data-dir {Path(ctx['data_dir']).name}"
    if rec.time_left() < 10:
        return rec.skip(name, "out of time", kind="peer", backend="torch")
    return rec.run(name, run, kind="peer", backend="torch", dataset=f"data-dir {Path(ctx['data_dir']).name}")


# ------------------------------------------------------------------------------------ 6. benchmark
#: the PyTorch peer's inference through its API from device tensors is what "kernel only" times for it
PEER_DEVICE_API = "as kernel only: PyTorch's API takes the device tensors the kernel-only figure times"
#: a host backend has no device arrays to hand the model
HOST_DEVICE_API = "no device arrays on a host backend"


def _bench_ops(label: str, be: Any, batch: int, rec: PhaseRecorder, default_only: bool) -> None:
    from ..backends.base import step_groups_of
    from ..perf.timing import TimingConfig, make_timer, measure_us
    from .checks import lenet_sets, timing_call

    timer = make_timer(be)
    rec.data.setdefault("timers", {})[label] = timer.kind
    # an emulator: one warm-up call and one timed (its op timings only show the phase runs)
    tcfg = TimingConfig(target_s=0.1) if be.is_gpu else TimingConfig(
        warmup_s=0.0, min_warmup=1, min_samples=1, max_samples=1, target_s=0.0, min_sample_s=0.0)
    ops = ordered_ops({label: be})
    groups = step_groups_of(be, batch)  # step_bwd's rows, as the model's workspace holds them
    for op in ops:
        variants = be.variants[op]
        if default_only:
            variants = (getattr(be, "default_variants", {}).get(op, variants[-1]),)
        for v in variants:
            for layer, iset in lenet_sets(op, batch, groups):
                name = f"{label} {op}_{v} {layer} batch {batch}"
                if rec.out_of_time(5 if be.is_gpu else max(5.0, 0.15 * rec.budget_s)):
                    rec.skip(name, "out of time", backend=label, kind="op", op=op, variant=v, layer=layer)
                    continue
                rec.run(name, lambda v=v, iset=iset, op=op: measure_us(timer, timing_call(be, op, v, iset), tcfg),
                        backend=label, kind="op", op=op, variant=v, layer=layer, batch=batch)
                iset.release()


def _throughputs(prefix: str, res: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}images_per_s": res["images_per_s"], f"{prefix}spread": res["spread"],
            f"{prefix}first_call_s": res["first_call_s"]}


def _bench_model(label: str, be: Any, batch: int, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Ours at one batch size (lenet_gpu.perf, the benchmark's core), after checking the logits (and on a GPU
    one step's gradients) against a float64 reference of this model's own parameters:

    - training: images/s of run_steps over the resident dataset (graphs of K steps where the backend has them);
    - inference, kernel only: device-resident uint8 images in, logits left on the device, one sync per timed
      block (lenet_fwd, or batch_prepare + the forward ops);
    - inference through the API from host arrays: ``model.logits(host uint8 images)``, copies both ways included;
    - inference through the API from device arrays: ``model.logits(device uint8 images)`` (a CuPy array for
      cupy, a Numba device array for numba), the logits left on the device as an array of the input's kind,
      one sync per timed block.
    No figure includes a loss computed on the host."""
    from ..perf.model import BenchData, OurNet, rounds_throughput
    from ..spec import NetConfig

    gpu = bool(be.is_gpu)
    net = OurNet(be, NetConfig(), BenchData.from_dataset(images, labels, images.shape[0]))
    err_fwd, _ = net.check_forward(batch)
    err_grad = net.check_grads(batch) if gpu else None
    # an emulator: one timed round (its figures only show the phase runs, no spread to tell)
    rounds, min_s, warm = (5, 0.05, 2) if gpu else ((1, 0.0, 1) if label in EMULATORS else (3, 0.0, 1))
    spc = net.steps_per_call
    host_x = np.ascontiguousarray(images[:batch])
    tr = rounds_throughput(lambda: net.train_step(batch), net.synchronize, batch * spc, rounds, min_s, warm)
    kern = rounds_throughput(lambda: net.forward(batch), net.synchronize, batch, rounds, min_s, warm)
    host = rounds_throughput(lambda: net.model.logits(host_x, batch_size=batch), lambda: None, batch, rounds, min_s,
                             warm)
    if gpu:
        dev_x = be.to_device(host_x)
        dev = _throughputs("infer_device_api_", rounds_throughput(lambda: net.model.logits(dev_x), net.synchronize,
                                                                  batch, rounds, min_s, warm))
    else:
        dev = {"infer_device_api": HOST_DEVICE_API}
    return {**_throughputs("train_", tr), "train_steps_per_call": spc, **_throughputs("infer_kernel_", kern),
            **_throughputs("infer_host_api_", host), **dev,
            "check_forward_rel_err": err_fwd, "check_grads_rel_err": err_grad}


def _bench_peer(batches: list[int], images: np.ndarray, labels: np.ndarray, rec: PhaseRecorder, on_gpu: bool,
                quick: bool) -> None:
    """The same LeNet-5 in PyTorch (lenet_gpu.perf.peer), timed as ours: eager, the whole training step as one
    CUDA graph, and torch.compile (not in a quick run) at every batch size. A mode that cannot run, or fails,
    is a skip with its reason: it is PyTorch's, not ours."""
    from ..perf.model import rounds_throughput
    from ..perf.peer import TorchLeNet, mode_unavailable, torch_or_none
    from ..spec import NetConfig, init_params, views

    if rec.out_of_time(10):
        rec.skip("torch peer", "out of time", kind="peer")
        return
    torch = torch_or_none()
    if torch is None:
        rec.skip("torch peer", "PyTorch is not installed", kind="peer")
        return
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    rec.data["torch"] = {"version": torch.__version__, "device": device,
                         "cudnn": torch.backends.cudnn.version() if device == "cuda" else None}
    cfg = NetConfig()
    params = views(init_params(cfg, 0), cfg)
    pix = images.astype(np.float32) / 255.0
    mean, std = float(pix.mean()), float(pix.std())
    gpu = device == "cuda"
    rounds, min_s, warm = (5, 0.05, 2) if gpu else (2, 0.0, 1)
    # the modes that exist here: graphs need CUDA; a quick run leaves torch.compile out (it compiles for minutes)
    modes = [m for m in ("eager", "graph", "compile") if not mode_unavailable(torch, m, device)
             and not (m == "compile" and quick)]
    rec.data["torch"]["modes"] = modes
    for mode in modes:
        peers: dict[str, Any] = {}  # one model per mode over all batch sizes (torch.compile: few recompiles)
        for b in batches:
            name = f"torch {mode} ({device}) batch {b}"
            if rec.out_of_time(45 if mode == "compile" and not peers else 5):
                rec.skip(name, "out of time", kind="peer", mode=mode, device=device, batch=b)
                continue

            def one(b: int = b, mode: str = mode, peers: dict = peers) -> dict[str, Any]:
                try:
                    if "peer" not in peers:
                        peers["peer"] = TorchLeNet(cfg, params, images, labels, mean, std, device, mode=mode)
                    peer = peers["peer"]
                    pos = {"k": 0}
                    nb = max(1, images.shape[0] // b)

                    def nxt() -> int:
                        pos["k"] = (pos["k"] + 1) % nb
                        return pos["k"] * b

                    host_x = np.ascontiguousarray(images[:b])
                    tr = rounds_throughput(lambda: peer.train_step(nxt(), b), peer.synchronize, b, rounds, min_s, warm)
                    kern = rounds_throughput(lambda: peer.forward(nxt(), b), peer.synchronize, b, rounds, min_s, warm)
                    host = rounds_throughput(lambda: peer.logits_from_host(host_x), lambda: None, b, rounds, min_s,
                                             warm)
                except Exception as e:  # noqa: BLE001 - a PyTorch mode that fails here is skipped, with its reason
                    why = first_lines(f"{type(e).__name__}: {e}", 3)
                    return {"status": SKIP, "reason": f"PyTorch {mode} failed: {why}"}
                return {**_throughputs("train_", tr), **_throughputs("infer_kernel_", kern),
                        **_throughputs("infer_host_api_", host), "infer_device_api": PEER_DEVICE_API}
            rec.run(name, one, kind="peer", mode=mode, device=device, batch=b)


def phase_benchmark(ctx: dict, rec: PhaseRecorder) -> None:
    emulate, quick = ctx["mode"] == "emulate", ctx.get("quick", False)
    bes = available_backends(ctx, rec)
    op_batch = 2 if emulate else 64
    batches = [2] if emulate else ([256] if quick else [64, 256, 1024, 4096])
    rec.data.update({"op_batch": op_batch, "batches": batches})
    if emulate:
        rec.note("emulated backends: timings are of CPU emulation, not of a GPU; they only show the phase runs")
    train_x, train_y, _, _ = mnist_sample()
    # per-op timings at the training batch (defaults first, so a short budget still times every op); the
    # emulators: the model first (the op timings of an emulator mean little)
    if emulate:
        _bench_e2e(ctx, rec, bes, batches, train_x, train_y)
    for label, be in bes.items():
        _bench_ops(label, be, op_batch, rec, default_only=True)
    if not emulate and not quick:
        for label, be in bes.items():
            _bench_ops(label, be, op_batch, rec, default_only=False)
    if not emulate:
        _bench_e2e(ctx, rec, bes, batches, train_x, train_y)
    n = max(train_x.shape[0], 8 * max(batches)) if not emulate else 64
    px, py = tiled(train_x, train_y, n)
    _bench_peer(batches, px, py, rec, on_gpu=not emulate, quick=quick or emulate)
    if not emulate:
        _bench_profile(rec, bes, train_x, train_y, [b for b in PROFILE_BATCHES if b in batches] or [max(batches)])
    note_plan_fallbacks(rec)


def note_plan_fallbacks(rec: PhaseRecorder) -> None:
    """Say in the phase's notes where a backend left its plan during the run, so no figure is read as the planned
    kernel's: numba's lenet_fwd_v4 runs 8 images a block instead of 16 where its opt-in past 48 KiB of shared memory
    failed (numba_backend/lenet_fwd.py OPT_IN_FAILURE)."""
    lf = sys.modules.get("lenet_gpu.backends.numba_backend.lenet_fwd")
    failed = getattr(lf, "OPT_IN_FAILURE", None)
    if failed:
        cause = failed[0].strip().splitlines()[0]
        rec.note(f"numba lenet_fwd_v4: the opt-in past 48 KiB of shared memory failed ({cause}); "
                 "its large-batch inference ran 8 images a block instead of 16 (the same results, not the planned "
                 "kernel's speed)")


#: batch sizes of the per-kernel profile
PROFILE_BATCHES = (64, 4096)


def _bench_profile(rec: PhaseRecorder, bes: dict[str, Any], images: np.ndarray, labels: np.ndarray,
                   batches: list[int]) -> None:
    """Device µs per kernel inside the graphed training step and the inference pass of each GPU backend (CUPTI
    through torch.profiler, lenet_gpu.perf.profile; without PyTorch, each recorded kernel launch of the step
    replayed and timed with CUDA events), their sum against the wall time per step; the top 3 of each go into the
    phase's notes. Where CUPTI is there, the step's replayed launches are profiled too, beside it: the fallback
    checked against CUPTI on the same device."""
    from ..perf.model import BenchData, OurNet
    from ..perf.peer import torch_or_none
    from ..perf.profile import profile_net, unavailable
    from ..perf.timing import TimingConfig
    from ..spec import NetConfig

    torch = torch_or_none()
    cupti = unavailable(torch) is None
    # (what, the torch module profile_net gets: None replays the recorded launches)
    runs: list[tuple[str, Any]] = [("train", torch), ("infer", torch)] + ([("train", None)] if cupti else [])
    for label, be in bes.items():
        if not be.is_gpu:
            continue
        for b in batches:
            nets: dict[str, Any] = {}
            for what, tch in runs:
                beside = cupti and tch is None
                name = f"profile {label} {what} batch {b}" + (" (replayed launches, beside CUPTI)" if beside else "")
                if rec.out_of_time(20):
                    rec.skip(name, "out of time", kind="profile", backend=label, what=what, batch=b)
                    continue

                def one(be: Any = be, b: int = b, what: str = what, nets: dict = nets,
                        tch: Any = tch) -> dict[str, Any]:
                    if "net" not in nets:
                        x, y = tiled(images, labels, max(images.shape[0], 8 * b))
                        nets["net"] = OurNet(be, NetConfig(), BenchData.from_dataset(x, y, x.shape[0]))
                    return profile_net(nets["net"], what, b, tch, TimingConfig(target_s=0.1))
                case = rec.run(name, one, kind="profile", backend=label, what=what, batch=b, replay_beside_cupti=beside)
                if case.get("top3"):
                    rec.note(f"{name}: top kernels {case['top3']}")


def _bench_e2e(ctx: dict, rec: PhaseRecorder, bes: dict[str, Any], batches: list[int], train_x: np.ndarray,
               train_y: np.ndarray) -> None:
    """End to end: training steps and inference (kernel only; API from host arrays), images/s over batch sizes."""
    emulate = ctx["mode"] == "emulate"
    for b in batches:
        x, y = tiled(train_x, train_y, max(train_x.shape[0], 8 * b) if not emulate else 2 * b)
        for label, be in bes.items():
            # an emulator: 3 training steps and 6 forward passes (≈ 2 steps) after the check
            est = (6 if label in EMULATORS else 60) * prev_step_cost(ctx, label, b) + 3 + module_allowance(ctx, label)
            run_if_time(rec, f"{label} model batch {b}", est,
                        lambda label=label, be=be, b=b, x=x, y=y: _bench_model(label, be, b, x, y), backend=label,
                        kind="model", batch=b)


PHASE_FUNCS = {"environment": phase_environment, "compile": phase_compile, "op_parity": phase_op_parity,
               "whole_step": phase_whole_step, "training": phase_training, "benchmark": phase_benchmark}
