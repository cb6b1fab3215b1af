"""The Runtime interface under the cupy backend, and its two implementations.

A Runtime loads kernel modules, launches kernels with a grid, a block, dynamic shared memory and typed
arguments, allocates, copies and synchronises. It counts every launch, copy, allocation and sync in
``counters`` (lenet_gpu.backends.base.Counters), so the counts the tests assert are taken where the
work is issued.

- ``CupyRuntime``: the GPU, through CuPy (``cupy.RawModule(code=..., options=...)``). Every launch and
  copy goes to one non-default stream, which ``graph`` captures (CUDA Graphs).
- ``HostRuntime``: the CPU harness (lenet_gpu.harness.cudacpu): the unchanged kernels/*.cu compiled
  by g++; arrays are NumPy arrays, "device memory" is host memory.

Cheap repeated launches: ``record(fn)`` runs fn once and keeps each launch it made (kernel handle, grid,
block, shared memory, the final typed argument tuple); later calls replay that list with no checks,
plans or conversions. ``graph(fn, steps)`` captures ``steps`` consecutive calls of fn as one CUDA graph
at its first call and replays the graph after (on the harness: runs fn with the capture rules enforced
on every call: no allocation, copy or sync).

The same backend code drives both, so the CPU tests exercise the real launch code: grid maths,
argument types (every scalar must be an explicit np.int32/np.float32; the harness rejects others)
and shared-memory sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..base import BackendUnavailable, Counters

#: The SM count assumed where there is no device (an H100 SXM / H200 has 132).
DEFAULT_SM_COUNT = 132
DEFAULT_DYNAMIC_SHARED = 48 * 1024  # dynamic shared memory a block gets without an opt-in (allow_shared)
#: The repository's kernels/ dir (the fallback when the package resources are not installed).
_REPO_KERNELS = Path(__file__).resolve().parents[3] / "kernels"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)


def kernels_dir() -> Path:
    """Where the .cu/.cuh sources are: the installed lenet_gpu.kernels package, else the repo's kernels/."""
    try:
        d = Path(str(resources.files("lenet_gpu.kernels")))
        if (d / "common.cuh").is_file():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return _REPO_KERNELS


def kernel_source(stem: str) -> str:
    """The source of kernels/<stem>.cu with its local ``#include "x.cuh"`` lines expanded in place
    (with #line markers), so a module is one self-contained string: CuPy's compile cache and the
    harness's build cache key on the whole text, headers included."""
    d = kernels_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = _PRAGMA_ONCE.sub("", (d / name).read_text())  # inlined once, by the `seen` set

        def sub(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            line = text.count("\n", 0, m.start()) + 2
            return f'#line 1 "{inc}"\n{expand(inc)}\n#line {line} "{name}"'

        return _INCLUDE.sub(sub, text)

    return expand(f"{stem}.cu")


def check_array(arr: Any, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
    """An op wrapper's check of one array: present, of this shape and dtype, C-contiguous (one line if not)."""
    if arr is None:
        raise ValueError(f"{name}: missing array")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: not C-contiguous")


def define_options(defines: dict[str, int]) -> tuple[str, ...]:
    """{"K_BLOCK": 8} → ("-DK_BLOCK=8",) in a stable order."""
    return tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))


class Runtime:
    """What the cupy backend needs from a device. Subclasses: CupyRuntime (GPU), HostRuntime (CPU)."""

    name = "abstract"
    is_gpu = False

    def __init__(self) -> None:
        self.counters = Counters()
        self._modules: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._kernels: dict[tuple[str, tuple[str, ...], str], Any] = {}
        #: id(kernel) -> its name (a CuPy function object does not carry it)
        self._kernel_names: dict[int, str] = {}
        #: set while a graph is being captured: allocations, copies and syncs raise (as under CUDA capture)
        self.capturing = False
        #: the launches of the ``record`` call in progress (None when not recording)
        self._recording: list[tuple] | None = None

    @property
    def sm_count(self) -> int:
        """Streaming multiprocessors of the device (DEFAULT_SM_COUNT where there is none)."""
        return DEFAULT_SM_COUNT

    # ---- modules and kernels
    def _load(self, stem: str, options: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def load_module(self, stem: str, options: Sequence[str] = ()) -> Any:
        """The module of kernels/<stem>.cu compiled with ``options`` (cached)."""
        key = (stem, tuple(options))
        mod = self._modules.get(key)
        if mod is None:
            mod = self._modules[key] = self._load(stem, key[1])
        return mod

    def get_kernel(self, stem: str, name: str, options: Sequence[str] = ()) -> Any:
        key = (stem, tuple(options), name)
        k = self._kernels.get(key)
        if k is None:
            k = self._kernels[key] = self.load_module(stem, options).get_function(name)
            self._kernel_names[id(k)] = name
        return k

    def kernel_name(self, kernel: Any) -> str:
        """The name ``kernel`` was loaded by (``get_kernel``)."""
        return self._kernel_names.get(id(kernel)) or str(getattr(kernel, "name", kernel))

    def launch(
        self, kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0
    ) -> None:
        """Launch ``kernel`` on the runtime's stream. Scalars in ``args`` must be np.int32/np.float32."""
        has_null = False
        for a in args:
            if a is None:
                has_null = True
            elif isinstance(a, (int, float, bool)):
                raise TypeError(f"kernel argument {a!r} is a Python {type(a).__name__}; pass np.int32/np.float32")
        if min(grid) < 1 or min(block) < 1:
            raise ValueError(f"empty launch: grid {grid}, block {block}")
        # an absent optional pointer (None) goes as a null pointer value, as CuPy and the harness take it
        if has_null:
            args = tuple(NULL_POINTER if a is None else a for a in args)
        if shared_mem > DEFAULT_DYNAMIC_SHARED:
            self.allow_shared(kernel, int(shared_mem))
        self.issue(kernel, grid, block, args, int(shared_mem))

    @staticmethod
    def allow_shared(kernel: Any, nbytes: int) -> None:
        """Opt ``kernel`` in to ``nbytes`` of dynamic shared memory (cudaFuncAttributeMaxDynamicSharedMemorySize:
        past 48 KiB a launch fails without it). The attribute stays with the kernel: set once, before the first
        launch that needs it (so before any recording or graph capture of that launch)."""
        if kernel.max_dynamic_shared_size_bytes < nbytes:
            kernel.max_dynamic_shared_size_bytes = nbytes

    def issue(self, kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int) -> None:
        """``launch`` without its checks, for callers whose arguments are already final (typed scalars, no
        None, a legal grid): the backend's cached launch plans."""
        self.counters.launches += 1
        if self._recording is not None:
            self._recording.append((kernel, grid, block, args, shared_mem))
        self._launch(kernel, grid, block, args, shared_mem)

    # ---- recorded launches
    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A callable equivalent to ``fn`` (no arguments, launches only, the same arguments at every call):
        its first call runs fn and records every launch; later calls replay the recorded launches."""
        entries: tuple[tuple, ...] | None = None

        def run() -> None:
            nonlocal entries
            if entries is None:
                entries = self.record_launches(fn)
            else:
                self.replay(entries)

        return run

    def record_launches(self, fn: Callable[[], None]) -> tuple[tuple, ...]:
        """Run fn once and return its launches as (kernel, grid, block, args, shared_mem) tuples. fn may
        allocate (first-call workspaces) but not copy or synchronise: those would not be replayed."""
        outer = self._recording
        self._recording = []
        before = (self.counters.h2d, self.counters.d2h, self.counters.syncs)
        try:
            fn()
            entries = tuple(self._recording)
        finally:
            self._recording = outer
        if (self.counters.h2d, self.counters.d2h, self.counters.syncs) != before:
            raise RuntimeError("record: fn copied or synchronised; only its kernel launches would be replayed")
        if outer is not None:
            outer.extend(entries)
        return entries

    def launch_list(self, fn: Callable[[], None]) -> list[tuple[str, Callable[[], None]]]:
        """fn's kernel launches (``record_launches``), each as (kernel name, a callable that issues that one launch
        again): for timing the launches of a step one at a time."""
        return [(self.kernel_name(e[0]), lambda e=e: self.replay((e,))) for e in self.record_launches(fn)]

    def replay(self, entries: Sequence[tuple]) -> None:
        """Launch recorded (kernel, grid, block, args, shared_mem) tuples as they are: no checks."""
        self.counters.launches += len(entries)
        if self._recording is not None:
            self._recording.extend(entries)
        launch = self._launch
        for kernel, grid, block, args, shared_mem in entries:
            launch(kernel, grid, block, args, shared_mem)

    def _launch(self, kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int) -> None:
        raise NotImplementedError

    # ---- memory
    def _no_capture(self, what: str) -> None:
        if self.capturing:
            raise RuntimeError(f"{what} inside a captured graph: a graph may only launch kernels")

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        self._no_capture("allocation")
        self.counters.allocs += 1
        return self._empty(shape, dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        self._no_capture("allocation")
        self.counters.allocs += 1
        return self._zeros(shape, dtype)

    def to_device(self, host: np.ndarray) -> Any:
        self._no_capture("allocation")
        self.counters.allocs += 1
        self.counters.h2d += 1
        return self._to_device(np.ascontiguousarray(host))

    def upload(self, dst: Any, host: np.ndarray) -> None:
        self._no_capture("host-to-device copy")
        host = np.ascontiguousarray(host, dtype=dst.dtype)
        if tuple(dst.shape) != host.shape:
            raise ValueError(f"upload: shape {host.shape} does not match {tuple(dst.shape)}")
        self.counters.h2d += 1
        self._upload(dst, host)

    def to_host(self, arr: Any) -> np.ndarray:
        self._no_capture("device-to-host copy")
        self.counters.d2h += 1
        return self._to_host(arr)

    def synchronize(self) -> None:
        self._no_capture("synchronisation")
        self.counters.syncs += 1
        self._synchronize()

    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None]:
        """A callable that runs fn ``steps`` times in a row, with the capture rules enforced on every call
        (an allocation, copy or sync inside raises, where CUDA stream capture would fail). Runtimes with
        real graphs (CupyRuntime) capture instead."""
        steps = _check_steps(steps)

        def run() -> None:
            self.capturing = True
            try:
                for _ in range(steps):
                    fn()
            finally:
                self.capturing = False

        return run

    def _empty(self, shape, dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def _zeros(self, shape, dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_device(self, host):  # pragma: no cover - abstract
        raise NotImplementedError

    def _upload(self, dst, host):  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_host(self, arr):  # pragma: no cover - abstract
        raise NotImplementedError

    def _synchronize(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- host
#: the value a null pointer argument (an absent optional array) is passed as
NULL_POINTER = np.uintp(0)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"graph: steps must be a positive int, got {steps!r}")
    return int(steps)


def _cpu_module_class() -> Any:
    try:
        from lenet_gpu.harness.cudacpu import CpuModule, check_compiler
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'cupy-host' needs the CPU harness lenet_gpu.harness.cudacpu ({e}); use --backend numpy"
        ) from e
    check_compiler()  # no C++ compiler: one line now (a BackendUnavailable), not a traceback at the first launch
    return CpuModule


class HostRuntime(Runtime):
    """The CPU harness: kernels compiled by g++ with cudacpu.h, run block by block on host threads."""

    name = "host"
    is_gpu = False

    def __init__(self, sanitize: str | None = None) -> None:
        super().__init__()
        self._cpu_module = _cpu_module_class()
        self.sanitize = sanitize

    def _load(self, stem: str, options: tuple[str, ...]) -> Any:
        return self._cpu_module(code=kernel_source(stem), options=options, sanitize=self.sanitize)

    def _launch(self, kernel, grid, block, args, shared_mem) -> None:
        kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)

    def _empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def _zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def _to_device(self, host):
        return np.array(host, copy=True, order="C")

    def _upload(self, dst, host) -> None:
        dst[...] = host

    def _to_host(self, arr) -> np.ndarray:
        return np.array(arr, copy=True)


# ---------------------------------------------------------------------------------------------- GPU
def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'cupy' needs CuPy ({e.name or e}); install it with: pip install 'lenet_gpu[cuda12]'"
        ) from e
    return cupy


def cuda_device_available() -> tuple[bool, str]:
    """(True, "") when CuPy sees a CUDA device; else (False, why)."""
    try:
        cupy = _import_cupy()
    except BackendUnavailable as e:
        return False, str(e)
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return True, ""
        why = "no CUDA device found"
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError (no driver), ImportError of libs, ...
        why = f"no usable CUDA device ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return False, why


class CupyRuntime(Runtime):
    """The GPU through CuPy. All launches and copies go to ``self.stream`` (non-blocking)."""

    name = "cupy"
    is_gpu = True

    def __init__(self, graphs: bool = True) -> None:  # graphs: kept for callers; the backend decides
        super().__init__()
        _import_cupy()  # not installed: its own one-line message (install the cuda12 extra)
        ok, why = cuda_device_available()
        if not ok:
            raise BackendUnavailable(
                f"backend 'cupy' cannot run here: {why}; use --backend numpy or --backend cupy-host"
            )
        import cupy

        self.cp = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.graphs = graphs
        self._sm_count: int | None = None

    @property
    def sm_count(self) -> int:
        if self._sm_count is None:
            try:
                self._sm_count = int(self.cp.cuda.Device().attributes["MultiProcessorCount"])
            except Exception:  # noqa: BLE001 - an attribute query that fails: plan for the default
                self._sm_count = DEFAULT_SM_COUNT
        return self._sm_count

    def _load(self, stem: str, options: tuple[str, ...]) -> Any:
        return self.cp.RawModule(code=kernel_source(stem), options=("-std=c++17", *options))

    def _launch(self, kernel, grid, block, args, shared_mem) -> None:
        with self.stream:
            kernel(tuple(grid), tuple(block), args, shared_mem=shared_mem)

    def _empty(self, shape, dtype):
        with self.stream:
            return self.cp.empty(shape, dtype=dtype)

    def _zeros(self, shape, dtype):
        with self.stream:
            return self.cp.zeros(shape, dtype=dtype)

    def _to_device(self, host):
        with self.stream:
            arr = self.cp.empty(host.shape, dtype=host.dtype)
            arr.set(host, stream=self.stream)
        return arr

    def _upload(self, dst, host) -> None:
        dst.set(host, stream=self.stream)

    def _to_host(self, arr) -> np.ndarray:
        out = arr.get(stream=self.stream)
        self.stream.synchronize()
        return out

    def _synchronize(self) -> None:
        self.stream.synchronize()

    def replay(self, entries: Sequence[tuple]) -> None:
        self.counters.launches += len(entries)
        if self._recording is not None:
            self._recording.extend(entries)
        with self.stream:  # entered once for the whole list
            for kernel, grid, block, args, shared_mem in entries:
                kernel(grid, block, args, shared_mem=shared_mem)

    def graph(self, fn: Callable[[], None], steps: int = 1) -> Callable[[], None]:
        """Capture ``steps`` consecutive calls of fn as one CUDA graph on the runtime's stream at the first
        call (fn already warmed up: compiled, workspaces allocated), launch it, and replay it on every later
        call. Capture records without executing, so the first call launches the graph too."""
        steps = _check_steps(steps)
        state: dict[str, Any] = {"graph": None, "launches": 0}

        def run() -> None:
            if state["graph"] is None:
                before = self.counters.launches
                self.capturing = True
                try:
                    with self.stream:
                        self.stream.begin_capture()
                        try:
                            for _ in range(steps):
                                fn()
                        finally:
                            g = self.stream.end_capture()
                finally:
                    self.capturing = False
                state["graph"], state["launches"] = g, self.counters.launches - before
            else:
                # a replay runs the captured kernels: count them as the launches they are
                self.counters.launches += state["launches"]
            state["graph"].launch(stream=self.stream)

        return run
