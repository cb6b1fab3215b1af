"""Device functions and conventions shared by every Numba kernel module (the Numba face of the
CUDA C shared header).

- Activations are selected by the integer codes of ``lenet_gpu.backends.base.ACT_CODES``, passed to
  kernels as int32 (uniform across a launch, so the branch never diverges).
- Every derivative is written through the activated output y (docs/DESIGN.md §3).
- float32 only: every constant is a float32 so nothing is promoted to float64 (the compile tests grep
  the PTX for ``.f64``).
- Device functions are ``device_function``s: compiled once each and inlined by NVVM (``forceinline``, LLVM's
  ``alwaysinline``), not by Numba, whose ``inline="always"`` deep-copies the callee's IR into every call site (the
  fused kernels' compile_ptx took 30-36 s for that; 4-7 s so, with the same instructions). numba-cuda compiles such
  a function for the current device's compute capability; where no device answers (compile_ptx on a machine
  without a GPU) ``_compat.compile_device_functions_without_a_device`` gives it a stand-in.
- Kernels walk their work with grid-stride (or block-stride) loops, so any grid size is correct: the
  backend launches enough blocks to cover the work on a GPU and may cap the grid (the simulator).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numba
import numpy as np
from numba import cuda, int32, uint32, uint64
from numba.cuda import libdevice

from ..base import ACT_CODES, POOL_CODES
from ._compat import compile_device_functions_without_a_device, fix_simulator_barriers, fix_simulator_shared_arrays

ACT_IDENTITY = 0
ACT_RELU = 1
ACT_TANH = 2
ACT_LECUN_TANH = 3
ACT_SIGMOID = 4
POOL_MAX = 0
POOL_AVG = 1
assert ACT_CODES == {"identity": 0, "relu": 1, "tanh": 2, "lecun_tanh": 3, "sigmoid": 4}
assert POOL_CODES == {"max": 0, "avg": 1}

LECUN_A = np.float32(1.7159)
LECUN_S = np.float32(2.0 / 3.0)
LECUN_AS = np.float32(1.7159 * 2.0 / 3.0)  # f'(z) = S·(A − y²/A) = A·S − (S/A)·y²
LECUN_S_OVER_A = np.float32((2.0 / 3.0) / 1.7159)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)

#: the decorator of every device function of the backend (see the module's docstring); the simulator's cuda.jit has
#: no ``forceinline`` and runs device functions as Python
device_function = (cuda.jit(device=True) if numba.config.ENABLE_CUDASIM
                   else cuda.jit(device=True, forceinline=True))
if not numba.config.ENABLE_CUDASIM:
    compile_device_functions_without_a_device()

if numba.config.ENABLE_CUDASIM:

    def ld_pair(sm64, i):
        """The simulator's ld_pair: words 2i and 2i + 1 of the block's dynamic shared memory, its bytes viewed as two
        float32 (little-endian, as on a GPU). A plain function: it uses no cuda.* API."""
        v = sm64[i:i + 1].view(np.float32)
        return v[0], v[1]
else:

    @device_function
    def ld_pair(sm64, i):
        """Words 2i and 2i + 1 of the block's dynamic shared memory as two float32, in one 64-bit load (the CUDA C
        kernels' float2 load; Numba has no vector loads): ``sm64`` is the dynamic shared memory as int64 (every
        dynamic shared array of a block aliases the same bytes: ``cuda.shared.array(0, int64)`` beside the float32
        one), the low word the first float. ld.shared.u64, the halves reinterpreted (int_as_float: register
        moves, no arithmetic)."""
        v = sm64[i]
        return libdevice.int_as_float(int32(v & 0xFFFFFFFF)), libdevice.int_as_float(int32(v >> 32))


@device_function
def activate(z, act):
    """act(z) for a float32 z and an activation code."""
    if act == ACT_RELU:
        return z if z > ZERO else ZERO
    if act == ACT_TANH:
        return math.tanh(z)
    if act == ACT_LECUN_TANH:
        return LECUN_A * math.tanh(LECUN_S * z)
    if act == ACT_SIGMOID:
        # stable on both sides: e = exp(−|z|) never overflows
        e = math.exp(-abs(z))
        if z >= ZERO:
            return ONE / (ONE + e)
        return e / (ONE + e)
    return z


@device_function
def act_grad(y, act):
    """d act/dz written through the activated output y."""
    if act == ACT_RELU:
        return ONE if y > ZERO else ZERO
    if act == ACT_TANH:
        return ONE - y * y
    if act == ACT_LECUN_TANH:
        return LECUN_AS - LECUN_S_OVER_A * (y * y)
    if act == ACT_SIGMOID:
        return y * (ONE - y)
    return ONE


#: the index type of the uint32 kernels (routed.py, head_train_v1): unsigned 32-bit, so no wraparound selects,
#: no floor-division fix-ups and no int64 widening (Numba widens int32 arithmetic; U(…) of each intermediate
#: lets LLVM keep it 32-bit)
U = uint32
U0 = uint32(0)
U1 = uint32(1)


def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def div_magic(d: int) -> tuple[np.uint32, np.uint32]:
    """(M, shift) with x // d == (x · M) >> shift for every 0 <= x < 2³¹ (1 <= d < 2³¹): the round-up method
    (Granlund–Montgomery), l = ⌈log₂ d⌉, M = ⌈2^(31+l) / d⌉ < 2³², shift = 31 + l. A kernel divides a run-time
    index by a run-time size with one 32×32→64 multiply and a shift (``fast_div``) instead of a division."""
    d = int(d)
    if not 1 <= d < 2**31:
        raise ValueError(f"div_magic: divisor {d} is outside 1 .. 2^31-1")
    lg = (d - 1).bit_length()
    return np.uint32(-(-(1 << (31 + lg)) // d)), np.uint32(31 + lg)


@device_function
def fast_div(x, m, sh):
    """x // d for a uint32 x < 2³¹ and (m, sh) = div_magic(d) (uint32): mul.wide.u32 and a shift."""
    return uint32((uint64(x) * uint64(m)) >> uint64(sh))


if numba.config.ENABLE_CUDASIM:
    fix_simulator_shared_arrays()  # one shared array per block, whatever the thread interleaving
    fix_simulator_barriers()  # a block's threads as greenlets, syncthreads a switch (see _compat)
    # The simulator calls a device function through a context manager that rescans its module's
    # globals on every call (~150 µs, the main cost of a simulated step). These two use no cuda.*
    # API, so the simulator may run them as the plain Python functions they are; compiled code
    # (GPU, compile_ptx) always inlines the decorated versions above (NVVM).
    activate = activate.py_func  # noqa: F811
    act_grad = act_grad.py_func  # noqa: F811
    fast_div = fast_div.py_func  # noqa: F811
    if os.environ.get("LENET_GPU_SIM_UINT32", "0") != "1":
        # the simulator runs the kernels as Python: NumPy uint32 scalars make every index operation ~10x slower
        # than a Python int (a simulated routed step at batch 3: 36 s → 14 s). No intermediate of the uint32
        # kernels is negative by construction (a difference that could be is compared first), so Python ints
        # give the same indices; LENET_GPU_SIM_UINT32=1 keeps true uint32 scalars (the routed simulator suite
        # runs so, with overflow warnings as errors).
        U = int  # noqa: F811
        U0 = 0
        U1 = 1


#: allow_shared's opt-ins: id(cufunc) -> (the cufunc, the bytes it is opted in to)
_SHARED_OPT_INS: dict[int, tuple[Any, int]] = {}


def allow_shared(dispatcher: Any, args: tuple, nbytes: int) -> bool:
    """Opt the compiled specialisation of ``dispatcher`` for ``args`` in to ``nbytes`` of dynamic shared memory
    (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: past 48 KiB a launch fails without it; the CUDA C side's
    Runtime.allow_shared). numba-cuda 0.30.4 has no public API for it: this is the pattern of its
    CudaPythonFunction.set_shared_memory_carveout (``driver.cuKernelSetAttribute(attr, value, handle, device)``) on
    the overload's cufunc (compiled here if the launch has not yet). The attribute stays with the cufunc, which
    recorded launches and graphs (launch.PreparedLaunch) reuse: set once per specialisation (and device), before
    its first launch past 48 KiB. Returns whether it set the attribute: not at 48 KiB or less, not when already
    done, never under the simulator (it has no such limit: a no-op)."""
    if numba.config.ENABLE_CUDASIM or nbytes <= 48 * 1024:
        return False
    argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
    kernel = dispatcher.overloads.get(argtypes)
    if kernel is None:
        kernel = dispatcher.compile(argtypes)
    cufunc = kernel._codelibrary.get_cufunc()
    done = _SHARED_OPT_INS.get(id(cufunc))
    if done is not None and done[0] is cufunc and done[1] >= nbytes:
        return False
    from cuda.bindings import driver as binding
    from numba.cuda.cudadrv.driver import driver

    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)
    _SHARED_OPT_INS[id(cufunc)] = (cufunc, int(nbytes))
    return True
