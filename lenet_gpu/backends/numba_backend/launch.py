"""Recorded launches and CUDA graphs for the numba backend (``NumbaBackend.record`` and ``.graph``).

A Numba launch ``kernel[grid, block, stream, shmem](*args)`` types every argument, looks up the compiled
overload, converts every argument into its kernel parameters (an array becomes meminfo, parent, size,
itemsize, data pointer, shape and strides) and hands them to cuda.core's ``launch``, which converts
them once more. All of that depends only on the arguments, and a training step's launches have the
same arguments at every step (what changes lives in the step state on the device). So a launch is
*prepared* once, at the step's first call:

- the compiled ``_Kernel`` of the exact argument types (``dispatcher.overloads``; the first eager
  launch compiled it);
- its parameters, converted by Numba's own ``_Kernel._prepare_args`` (so the kernel ABI is Numba's,
  not a copy of it), packed into ctypes values and one ``void*[]`` array of their addresses;
- the kernel's driver handle (``get_cufunc().handle``) as a ``CUfunction``.

A replay is then one ``cuda.bindings.driver.cuLaunchKernel`` call per launch with those prepared
values: no typing, no lookups, no conversions.

Graphs: the recorded launches of ``steps`` calls of a step are issued onto a private stream in capture
mode (``cuStreamBeginCapture`` … ``cuStreamEndCapture``), instantiated once, and each later call is one
``cuGraphLaunch`` on the default stream. numba-cuda 0.30.4 can also launch into a cuda.core
``GraphBuilder`` (``kernel[grid, block, graph_builder]`` captures on the builder's stream); the backend
does not need it, since its prepared launches go to any stream, and needs no CuPy.

Under the CUDA simulator a prepared launch is the simulator launch with the recorded arguments (record
still replays), and graphs are not available.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # the driver bindings numba-cuda itself uses (absent only in odd installs: record then falls back)
    from cuda.bindings import driver as _drv
except ImportError:  # pragma: no cover - numba-cuda depends on cuda-bindings
    _drv = None


class LaunchError(RuntimeError):
    """A recorded launch or a graph operation returned a CUDA error."""


def _check(result: Any, what: str) -> Any:
    """(err, *values) of a cuda.bindings call → the values; raise on an error."""
    err = result[0]
    if err:
        raise LaunchError(f"{what} failed: {err!r}")
    return result[1] if len(result) == 2 else result[1:]


def _dim3(d: Any) -> tuple[int, int, int]:
    d = tuple(int(v) for v in d) if isinstance(d, (tuple, list)) else (int(d),)
    return (d + (1, 1, 1))[:3]  # type: ignore[return-value]


def _pack(values: Sequence[Any]) -> tuple[list[Any], Any]:
    """Numba's kernel arguments (Python ints, which cuda.core passes as intptr_t, and ctypes scalars) as
    ctypes values and the ``void*[]`` of their addresses that cuLaunchKernel takes."""
    cvals: list[Any] = []
    for v in values:
        if isinstance(v, ctypes._SimpleCData):
            cvals.append(v)
        elif isinstance(v, (int, np.integer)):  # pointers, sizes, shapes, strides: intptr_t
            cvals.append(ctypes.c_ssize_t(int(v)))
        else:
            raise TypeError(f"cannot pack a kernel argument of type {type(v).__name__}")
    params = (ctypes.c_void_p * max(1, len(cvals)))(*[ctypes.addressof(c) for c in cvals])
    return cvals, params


class PreparedLaunch:
    """One launch, ready to be issued again with no per-call work: ``issue(stream)``."""

    __slots__ = ("name", "grid", "block", "shmem", "args", "call", "params_ptr", "_keep")

    def __init__(self, name: str, grid: Any, block: Any, shmem: int, args: tuple) -> None:
        self.name = name
        self.grid = _dim3(grid)
        self.block = _dim3(block)
        self.shmem = int(shmem)
        self.args = args  # keeps the device arrays alive while the launch exists
        self.call: tuple = ()  # cuLaunchKernel's arguments before the stream
        self.params_ptr = 0  # the address of the void*[] of parameters
        self._keep: Any = None

    @classmethod
    def for_gpu(cls, name: str, dispatcher: Any, grid: Any, block: Any, shmem: int, args: tuple) -> PreparedLaunch:
        """Prepare a launch of a compiled Numba kernel (its overload for these argument types must exist:
        an eager launch with the same types compiles it)."""
        if _drv is None:  # pragma: no cover
            raise RuntimeError("cuda.bindings is not importable")
        self = cls(name, grid, block, shmem, args)
        argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
        kernel = dispatcher.overloads.get(argtypes)
        if kernel is None:
            raise RuntimeError(f"{name}: no compiled overload for {argtypes} (launch it eagerly first)")
        if getattr(kernel, "debug", False) or getattr(kernel, "cooperative", False):
            raise RuntimeError(f"{name}: debug and cooperative kernels are launched through Numba")
        kernelargs: list[Any] = []
        retr: list[Any] = []
        for t, v in zip(kernel.argument_types, args):
            kernel._prepare_args(t, v, 0, retr, kernelargs)
        if retr:  # a host array was copied for this launch: its copy would not outlive the call
            raise TypeError(f"{name}: a recorded launch takes device arrays only")
        cvals, params = _pack(kernelargs)
        func = _drv.CUfunction(int(kernel._codelibrary.get_cufunc().handle))
        self._keep = (cvals, params, kernel)
        self.call = (func, *self.grid, *self.block, self.shmem)
        self.params_ptr = ctypes.addressof(params)
        return self

    def issue(self, stream: Any) -> None:
        """Launch on ``stream`` (a CUstream)."""
        _check(_drv.cuLaunchKernel(*self.call, stream, self.params_ptr, 0), f"cuLaunchKernel({self.name})")


def replay_fn(launches: list[PreparedLaunch], get_stream: Any) -> Any:
    """A closure that issues every prepared launch in order on ``get_stream()`` (read once per call, so a
    replay inside a graph capture goes to the capturing stream)."""
    calls = [(p.call, p.params_ptr, p.name) for p in launches]
    launch_kernel = _drv.cuLaunchKernel

    def replay() -> None:
        stream = get_stream()
        for call, ptr, name in calls:
            err = launch_kernel(*call, stream, ptr, 0)[0]
            if err:
                raise LaunchError(f"cuLaunchKernel({name}) failed: {err!r}")

    return replay


class CapturedGraph:
    """``steps`` calls of a step, captured once on a private stream, replayed with one cuGraphLaunch."""

    def __init__(self, graph: Any, exec_: Any, launches: int) -> None:
        self.graph = graph
        self.exec = exec_
        self.launches = launches

    def launch(self, stream: Any) -> None:
        _check(_drv.cuGraphLaunch(self.exec, stream), "cuGraphLaunch")

    def __del__(self) -> None:  # pragma: no cover - at interpreter exit the driver may be gone
        try:
            _drv.cuGraphExecDestroy(self.exec)
            _drv.cuGraphDestroy(self.graph)
        except Exception:  # noqa: BLE001
            pass


def begin_capture(stream: Any) -> None:
    mode = _drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    _check(_drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")


def end_capture(stream: Any, launches: int, ok: bool) -> CapturedGraph | None:
    """End the capture on ``stream``; instantiate the graph when the captured code ran through."""
    graph = _check(_drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
    if not ok:
        _drv.cuGraphDestroy(graph)
        return None
    exec_ = _check(_drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
    return CapturedGraph(graph, exec_, launches)


def cu_stream(handle: int) -> Any:
    return _drv.CUstream(int(handle))


def bindings_available() -> bool:
    return _drv is not None
