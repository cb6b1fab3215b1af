"""What the cpu backend's kernels share: the lane layout, a stack tile for accumulators, activations.

The lane layout. The fast kernels work on chunks of ``L`` = 16 images, and inside a chunk they keep the
images innermost: a (C, H, W) map of 16 images is a (C, H, W, L) array, so one pixel of the chunk is one
16-float vector (one AVX-512 register, two AVX2 registers). A convolution then is, for every output
pixel, a sum of weight × input-vector products: the loop over the 16 lanes is the one LLVM vectorises,
every weight is a broadcast, and no lane ever waits for another. The last chunk of a batch may hold fewer
than 16 images; its spare lanes compute garbage that is never written out (and are zero where a
reduction would see them).

Register blocking. A kernel's accumulators (a few output pixels × a few filters, 16 lanes each) live in
a ``stack_tile``: a float32 array on the stack of the kernel, not the heap. LLVM knows such a tile
aliases nothing else, so it vectorises the lane loop without run-time checks, and once the lane loop is
one vector wide it promotes the tile to registers for the whole reduction (``np.empty`` inside @njit is
a heap array, which LLVM must keep in memory). ``inspect_fma`` checks the machine code for it.

Determinism. Work is split into fixed chunks of images (``prange`` over chunks, never a prange
reduction); a reduction over the batch is summed per chunk, then over the chunks in chunk order. So a
result does not depend on the number of threads. ``FASTMATH`` allows only FMA contraction, which is
fixed at compile time: a build repeats bit for bit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic

#: lanes: images per chunk, the vector width of the fast kernels
L = 16
#: FMA contraction only (no reassociation, no approximations): deterministic for a given build
FASTMATH = {"contract"}
#: options of every kernel: cached on disk (a second run starts fast), no bounds checks, the NumPy
#: error model (a float division never raises, so it never blocks vectorisation)
JIT: dict[str, Any] = {"cache": True, "boundscheck": False, "fastmath": FASTMATH, "error_model": "numpy",
                       "forceinline": False}
#: functions called only from other kernels: no Python or C entry points to generate
JIT_INNER: dict[str, Any] = {**JIT, "no_cpython_wrapper": True, "no_cfunc_wrapper": True}
#: helpers that touch a caller's accumulator tile: inlined into the caller's Numba IR, so the tile is the
#: caller's and becomes registers there (measured faster than LLVM's alwaysinline of a compiled helper)
JIT_INLINE: dict[str, Any] = {"inline": "always"}
#: the same, exact IEEE arithmetic (no contraction): ops that mirror the numpy backend bit for bit. fastmath
#: is given explicitly (False): a function that does not set it inherits its caller's
JIT_EXACT: dict[str, Any] = {"cache": True, "boundscheck": False, "fastmath": False, "error_model": "numpy",
                             "forceinline": False}

#: LLVM's optimisation level for these kernels' compiles (Numba's default is 3). A trade, measured on this
#: project's 2-core machine: -O2 compiles a training step in two thirds of the time (first run, one core:
#: 36.7 s → 23.8 s; on two cores with warm.py 21.3 s → 15.4 s) and trains about 14% slower on one thread
#: (interleaved runs of the same step: 19.3k against 22.5k img/s at batch 128; still 1.8× PyTorch), with
#: inference within noise. -O1 halves the speed. For long runs, NUMBA_OPT=3 in the environment wins over
#: it (everything at -O3, the target machine included); the cache does not tell the levels apart, so clear
#: Numba's cache (the __pycache__ folders of lenet_gpu/backends/cpu_backend) when switching.
OPT_LEVEL: int | None = None if "NUMBA_OPT" in os.environ else 2


@contextmanager
def opt_level(level: int | None) -> Iterator[None]:
    """Numba's optimisation level set to ``level`` for what compiles inside (under Numba's compiler
    lock, so no other thread's compile sees it); None leaves it alone."""
    if level is None:
        yield
        return
    with global_compiler_lock:
        saved = config.OPT
        config.OPT = config._OptLevel(level)
        try:
            yield
        finally:
            config.OPT = saved


#: LLVM's level for a parallel kernel's own compile: its prange loops' bodies (Numba's gufuncs), their two wrappers
#: and the kernel, each a module into which Numba links (and optimises and generates machine code again for) every
#: function the loop body calls. The functions it calls compile in their own scope, at OPT_LEVEL (vectorised,
#: register-blocked); what the parallel kernel adds is loop control around those calls, so -O1 there costs no
#: speed. Measured on the 2-core machine (bench/compile_times.py, interleaved runs): the default training step's
#: first compile 22.2-23.4 → 20.5 s CPU, the step 4.85-4.90 against 4.85-4.88 ms on one thread.
PARALLEL_OPT_LEVEL: int | None = None if "NUMBA_OPT" in os.environ else 1
#: the parallel passes the kernels use: explicit prange loops only (no implicit parallelisation of array
#: expressions, reductions or fusion to analyse; the kernels have none by design: module docstring)
PARALLEL: dict[str, bool] = {"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
                             "setitem": False, "numpy": False, "stencil": False, "fusion": False}


def njit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(**options)`` whose compiles run at OPT_LEVEL, or with ``parallel=True`` at PARALLEL_OPT_LEVEL
    and with the PARALLEL passes only. A kernel's compile also compiles its parallel loops' bodies in the same scope;
    the functions it calls compile in their own (their dispatchers are made here too). ``loop_control=True`` (not a
    Numba option): a serial function that is only control around calls through addresses (launch.py's op kernels
    and tasks), at PARALLEL_OPT_LEVEL too."""

    level = OPT_LEVEL
    if options.pop("loop_control", False):
        level = PARALLEL_OPT_LEVEL
    if options.get("parallel") is True:
        level = PARALLEL_OPT_LEVEL
        options = {**options, "parallel": dict(PARALLEL)}  # Numba empties the dict it is given

    def wrap(fn: Callable[..., Any]) -> Any:
        dispatcher = numba.njit(**options)(fn)
        compile_ = dispatcher.compile

        def compile(sig: Any) -> Any:
            with opt_level(level):
                return compile_(sig)

        dispatcher.compile = compile
        return dispatcher

    return wrap


def zmm_probe() -> bool:
    """Whether Numba's target machine generates zmm code for a loop of FP32 FMAs (a probe compiled now, not cached;
    only where AVX-512 is present and target.py did not set Numba's features)."""

    @numba.njit(fastmath=FASTMATH, boundscheck=False, error_model="numpy")
    def probe(a, b, c):  # pragma: no cover (compiled, never run)
        for i in range(a.shape[0]):
            a[i] += b[i] * c[i]

    f1 = types.Array(types.float32, 1, "C")
    probe.compile((f1, f1, f1))
    return "%zmm" in "\n".join(probe.inspect_asm().values())  # a register, not a name


def wide_vectors() -> bool:
    """Whether Numba compiles these kernels to 512-bit code: 32 vector registers of 16 floats, so a chunk's 16 lanes
    are one register. Without it (AVX2, or AVX-512 compiled to 256-bit vectors: 16 registers of 8 floats) the lanes
    take two registers and the register blocks must be smaller (conv2d.block_size). Where target.py gave Numba its
    features (an AVX-512 CPU), yes. Else, without AVX-512 in what Numba compiles for (NUMBA_CPU_FEATURES where set,
    else the host's features; Numba takes the host's features also when only NUMBA_CPU_NAME is set), no. Else the
    CPU's tuning decides (LLVM prefers 256-bit vectors on Intel's AVX-512 cores), so a probe is compiled and its
    machine code read."""
    from . import target

    if target.WIDE_CODE == "set":
        return True
    if config.CPU_FEATURES:
        if "+avx512f" not in config.CPU_FEATURES.replace(" ", "").split(","):
            return False
    else:
        try:
            import llvmlite.binding as ll

            if not ll.get_host_cpu_features().get("avx512f"):
                return False
        except Exception:  # noqa: BLE001 - features unreadable: the narrower blocks are safe everywhere
            return False
    return zmm_probe()


#: AVX-512 code (see wide_vectors), fixed for the process (the kernels' register blocks follow it)
WIDE_VECTORS = wide_vectors()

F32 = np.float32
ZERO = F32(0.0)
ONE = F32(1.0)
QUARTER = F32(0.25)
LECUN_A = F32(1.7159)
LECUN_S = F32(2.0 / 3.0)
CLIP = F32(88.0)

# activation codes (lenet_gpu.backends.base.ACT_CODES) and pool codes (POOL_CODES)
IDENTITY, RELU, TANH, LECUN_TANH, SIGMOID = 0, 1, 2, 3, 4
MAX, AVG = 0, 1


@intrinsic(prefer_literal=True)
def stack_tile(typingctx: Any, n: Any) -> Any:
    """A pointer to ``n`` float32 on the stack of the calling kernel (n a compile-time constant);
    wrap it with ``numba.carray(ptr, shape)``. Uninitialised."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    count = n.literal_value

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = cgutils.alloca_once(builder, ir.FloatType(), size=count)
        ptr.align = 64
        return ptr

    return types.CPointer(types.float32)(n), codegen


@njit(**JIT_INNER)
def act(z: float, code: int) -> float:
    """The activation (float32 in, float32 out), as the numpy backend computes it."""
    if code == RELU:
        return z if z > ZERO else ZERO
    if code == TANH:
        return np.tanh(z)
    if code == LECUN_TANH:
        return LECUN_A * np.tanh(z * LECUN_S)
    if code == SIGMOID:
        c = min(max(z, -CLIP), CLIP)
        return ONE / (np.exp(-c) + ONE)
    return z


@njit(**JIT_INNER)
def act_tile_calls(t, n, code):
    """t[r, l] = act(t[r, l], code) in place for the first n rows of a (rows, L) tile: act_tile's path for the
    activations that are calls (tanh, exp), one call for the tile, outside its caller's code."""
    for r in range(n):
        for lane in range(L):
            t[r, lane] = act(t[r, lane], code)


@njit(**JIT_INLINE)
def act_tile(src, dst, n, code):
    """dst[r, l] = act(src[r, l], code) for the first n rows of (rows, L) tiles, n a constant of the caller (the
    caller's register block). Relu is vector code here (one vmaxps a vector); the other activations are a copy, then
    one call of act_tile_calls on dst.

    Written for a caller whose accumulator tile (src) must stay in registers: LLVM promotes a stack tile to
    registers only when every access is at a constant row and lane once the loops over the block are unrolled, and
    nothing takes its address. So src is read here at constant indices only, with the rows innermost (fully
    unrolled before the lane loop is vectorised), and a call of act, which keeps its switch and may call tanh or
    exp, never sees src. Measured on the AVX2 machine (one thread, batch 128, relu and max pooling): with four
    calls a filter of the former per-row helper, whose else-branch was a loop of inlined act calls on a row of
    the tile, the tile lived on the stack and was stored after every filter row of the window; this way C1's
    forward (conv2d_pool_fwd_v2's chunk) takes 1.8 ms instead of 2.8 ms and C3's (v1's) 2.5 ms instead of 2.9."""
    if code == RELU:
        for lane in range(L):
            for r in range(n):
                z = src[r, lane]
                dst[r, lane] = z if z > ZERO else ZERO
    else:
        for lane in range(L):
            for r in range(n):
                dst[r, lane] = src[r, lane]
        if code != IDENTITY:
            act_tile_calls(dst, n, code)


@njit(**JIT_INNER)
def act_grad(d: float, y: float, code: int) -> float:
    """d · act'(z) with the derivative written through the activated output y."""
    if code == RELU:
        return d if y > ZERO else ZERO
    if code == TANH:
        return d * (ONE - y * y)
    if code == LECUN_TANH:
        return d * (LECUN_S * (LECUN_A - y * y / LECUN_A))
    if code == SIGMOID:
        return d * (y * (ONE - y))
    return d


def nchunks(n: int) -> int:
    return (n + L - 1) // L


def inspect_fma(fn: Any) -> dict[str, int]:
    """Count packed FMAs (zmm, ymm), scalar FMAs, and packed maxima (vmaxps: a relu or a max pool in vector code)
    in the machine code of every compiled signature of ``fn``: the register-blocked kernels must show packed FMAs."""
    asm = "\n".join(fn.inspect_asm().values())
    return {
        "fma_zmm": len(re.findall(r"vfmadd\w*ps\s[^\n]*zmm", asm)),
        "fma_ymm": len(re.findall(r"vfmadd\w*ps\s[^\n]*ymm", asm)),
        "fma_scalar": len(re.findall(r"vfmadd\w*ss\s", asm)),
        "max_packed": len(re.findall(r"vmaxps\s[^\n]*[yz]mm", asm)),
    }
