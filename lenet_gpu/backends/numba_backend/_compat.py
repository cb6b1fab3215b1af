"""Work-arounds for the numba-cuda versions this backend meets in the wild.

numba-cuda ≤ 0.30.x registers an overload for ``np.row_stack`` when its array module is imported,
and NumPy 2.5 removed that alias. The import happens lazily, at the first kernel compile (the typing
context loads the CUDA lowering registry), so every launch then fails with
``AttributeError: module 'numpy' has no attribute 'row_stack'`` — seen on the first real-GPU run of
this project (NumPy 2.5.2, numba-cuda 0.30.4). We give NumPy the alias back for the duration of
that one import, then take it away again, so nothing else sees a changed NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def import_cuda_array_module() -> None:
    """Import numba-cuda's array lowering with ``np.row_stack`` present (a no-op where NumPy has it,
    under the simulator, or where numba-cuda's layout differs)."""
    if hasattr(np, "row_stack"):  # noqa: NPY201 - the alias is what numba-cuda needs
        return
    np.row_stack = np.vstack  # noqa: NPY201
    try:
        import numba.cuda.np.arrayobj  # noqa: F401
    except ImportError:  # the simulator, or another numba-cuda layout: nothing to patch
        pass
    finally:
        delattr(np, "row_stack")


def _fixed(fn: Any) -> bool:
    """Whether ``fn`` is one of this module's replacements (``_install`` marks them), so a fix is applied once."""
    return getattr(fn, "_lenet_gpu_fixed", False)


def _install(owner: Any, attr: str, new: Any) -> Any:
    """Replace ``owner.attr`` by ``new``, marked as this module's; returns what it replaced."""
    old = getattr(owner, attr)
    new._lenet_gpu_fixed = True
    setattr(owner, attr, new)
    return old


#: the simulator's own FakeCUDAShared.array, kept when fix_simulator_shared_arrays replaces it (its test
#: shows the race on it)
SIMULATOR_SHARED_ARRAY: Any = None


def fix_simulator_shared_arrays() -> bool:
    """Make the CUDA simulator's ``cuda.shared.array`` give every thread of a block the same array.

    numba-cuda's simulator (0.30.x) looks a shared array up by its source line and creates it on a
    miss with ``get``, then ``np.empty``, then a store. Its threads are Python threads, so two of
    them can both miss and each keep its own private ``np.empty`` array: the block then reduces
    through memory its other threads never wrote, and returns garbage (seen in CI: 8 of 36 weights of
    ``conv2d_bwd_weight_v2`` near 1e32 in one run out of many). On a GPU there is one array per block
    and the kernel is right. Here the lookup keeps the simulator's key (file, line) and its
    limitations, and stores with ``dict.setdefault``, which is atomic in CPython, so every thread
    gets the array that won. It also reads the caller's frame directly instead of formatting the
    whole stack, which makes a simulated kernel with shared memory a little faster.

    Returns True when the patch was applied (under the simulator), False otherwise.
    """
    import sys

    import numba

    if not numba.config.ENABLE_CUDASIM:
        return False
    from numba.cuda.simulator import kernelapi

    global SIMULATOR_SHARED_ARRAY
    shared = kernelapi.FakeCUDAShared
    if _fixed(shared.array):
        return True

    def array(self, shape, dtype, alignment=None):  # type: ignore[no-untyped-def]
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if isinstance(dtype, kernelapi.types.Type):  # the simulator's own types and numpy_support
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        if shape == 0:  # dynamic shared memory: one buffer for all, as the simulator does
            count = self._dynshared_size // dtype.itemsize
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
        frame = sys._getframe(1)
        key = (frame.f_code.co_filename, frame.f_lineno)
        hit = self._allocations.get(key)
        if hit is None:
            hit = self._allocations.setdefault(key, np.empty(shape, dtype))
        return hit

    SIMULATOR_SHARED_ARRAY = _install(shared, "array", array)
    return True


#: the simulator's own BlockManager.run, kept when fix_simulator_barriers replaces it
SIMULATOR_BLOCK_RUN: Any = None


def _phase_order(n: int, block: tuple[int, ...], phase: int) -> list[int]:
    """The order a block's threads run in during one barrier phase: a permutation fixed by the block and the phase
    (the same run after run), different from phase to phase, so that a read of another thread's write that lacks
    its ``syncthreads`` sees the old value whichever thread is the reader."""
    import random

    order = list(range(n))
    random.Random(hash((block, phase))).shuffle(order)
    return order


class _SimThread:
    """One CUDA thread of a simulated block, run as a greenlet: what the simulator's API reads from
    ``threading.current_thread()`` (indices, ``syncthreads*``)."""

    def __init__(self, manager: Any, block: Any, thread: Any, hub: Any, dim3: Any) -> None:
        self._manager = manager
        self.blockIdx = dim3(*block)
        self.threadIdx = dim3(*thread)
        bx, by, _ = manager._block_dim
        self.thread_id = self.threadIdx.x + bx * (self.threadIdx.y + by * self.threadIdx.z)
        self.hub = hub

    def syncthreads(self) -> None:
        self.hub.switch()  # back to the block's scheduler, which resumes us when every live thread is here


def fix_simulator_barriers() -> bool:
    """Run a simulated block's threads as greenlets, with ``syncthreads`` a switch back to the block's scheduler.

    numba-cuda's simulator (0.30.x) starts one OS thread per CUDA thread and busy-polls their "blocked" flags until
    all wait at the barrier, then wakes each. Every barrier thus costs a round of GIL hand-offs and futex wake-ups
    per thread: an empty 512-thread kernel with 25 barriers took 6.2 s for 8 blocks here, and the numba backend's
    simulator suite spent 330 s wall (417 s CPU, 158 s of it in the kernel) mostly on them. Here a block's threads are
    greenlets on the launching thread: each runs until its next ``syncthreads`` (or its end), and when every thread
    still alive waits at the barrier the next phase starts. The simulator's rules are kept: a barrier counts the
    threads still alive, blocks run one at a time, a thread's exception is raised with its thread and block
    indices and its traceback. In each phase the threads run in a fixed pseudo-random order that changes from phase
    to phase, so a missing barrier shows whichever side of it reads (its test plants one). Threads do not run at the
    same time, so the simulator's one-array-per-block fix for shared memory is kept only for its own callers.

    Returns True when the patch was applied (under the simulator, with greenlet installed), False otherwise.
    """
    import threading

    import numba

    if not numba.config.ENABLE_CUDASIM:
        return False
    try:
        import greenlet
    except ImportError:  # the simulator's own OS threads: slower, same results
        return False
    from numba.cuda.simulator import kernel, kernelapi

    global SIMULATOR_BLOCK_RUN
    manager = kernel.BlockManager
    if _fixed(manager.run):
        return True

    for name in ("syncthreads_count", "syncthreads_and", "syncthreads_or"):  # they call self.syncthreads()
        setattr(_SimThread, name, getattr(kernel.BlockThread, name))

    class _Threading:
        """kernelapi's ``threading``, whose current thread is the running greenlet's simulated thread."""

        def __getattr__(self, name: str) -> Any:
            return getattr(threading, name)

        @staticmethod
        def current_thread() -> Any:
            sim = getattr(greenlet.getcurrent(), "sim_thread", None)
            return sim if sim is not None else threading.current_thread()

    kernelapi.threading = _Threading()

    def run(self: Any, grid_point: Any, *args: Any) -> None:
        hub = greenlet.getcurrent()
        debug = self._debug

        def target() -> None:
            if debug:
                with np.errstate(divide="raise"):
                    self._f(*args)
            else:
                self._f(*args)

        live = []
        for point in np.ndindex(*self._block_dim):
            g = greenlet.greenlet(target, parent=hub)
            g.sim_thread = _SimThread(self, grid_point, point, hub, kernel.Dim3)
            live.append(g)
        phase = 0
        while live:
            for i in _phase_order(len(live), tuple(grid_point), phase):
                g = live[i]
                try:
                    g.switch()
                except Exception as e:  # the simulator's message: the thread and block, then the error
                    t = g.sim_thread
                    where = f"tid={list(t.threadIdx)} ctaid={list(t.blockIdx)}"
                    raise type(e)(f"{where}: {e}" if str(e) else where).with_traceback(e.__traceback__) from None
            live = [g for g in live if not g.dead]
            phase += 1

    SIMULATOR_BLOCK_RUN = _install(manager, "run", run)
    return True


#: the compute capability a device function is compiled for where no device answers. numba-cuda's lowering reads
#: it only at 6.0 (float64 atomics) and 7.5 (fast tanh), and every arch the project builds (sm_80, sm_90) is past
#: both, so the code is the same for each; the kernel's own compile_ptx cc picks the arch NVVM builds for.
NO_DEVICE_CC = (8, 0)


class _NoDevice:
    """The stand-in device: all numba-cuda's device-function compile asks of it is its compute capability."""

    compute_capability = NO_DEVICE_CC


def compile_device_functions_without_a_device() -> bool:
    """Let ``compile_ptx`` compile kernels whose device functions are ``forceinline`` on a machine with no GPU.

    numba-cuda (0.30.x) compiles a non-inlined device function for ``get_current_device().compute_capability``,
    which initialises the driver: without one, ``compile_ptx`` of a kernel that calls such a function raises
    ``CudaSupportError`` ("CUDA driver library cannot be found"), although it needs no device otherwise. Where the
    driver raises that, the dispatcher's device query returns ``_NoDevice`` (``NO_DEVICE_CC``); with a device it
    answers as before. Launching still needs a device: this changes nothing there.

    Returns True when the dispatcher's device query is the patched one.
    """
    try:
        from numba.cuda import dispatcher
        from numba.cuda.cudadrv.error import CudaSupportError
    except ImportError:  # another numba-cuda layout: compile_ptx then needs a device for such kernels
        return False
    real = dispatcher.get_current_device
    if _fixed(real):
        return True

    def get_current_device() -> Any:
        try:
            return real()
        except CudaSupportError:
            return _NoDevice()

    _install(dispatcher, "get_current_device", get_current_device)
    return True
