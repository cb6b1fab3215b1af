"""step4: the four-kernel training step of max pooling (docs/step4.md) as Numba @njit kernels, by the names of the
GPU kernels (kernels/step_fwd.cu, step_bwd.cu, step_update.cu), each one parallel region at most:

  step_fwd_v1   one task per chunk of 16 images: batch_prepare of its images (the arithmetic of
                batch_prepare_v1, without contraction: the same bits), C1 + act + 2×2 max pool (the chunk function
                of conv2d_pool_fwd_v1, lanes, as for C3 since 2026-12-07: its relu-max path, a function of its
                own, beat the rows kernel, 0.72 against 0.85 ms at batch 128 on one thread), C3 + act + 2×2 max
                pool (the same lanes chunk), no yconv:
                a chunk's x and S2 are read back while they are in cache; then this step's schedule row srow
  step_bwd_v1   one task per image group (reference.step_groups): C3's routed weight gradient (the chunk
                function of conv2d_bwd_weight_routed_v1), C3's routed data gradient gz1 (conv2d_bwd_data_routed_v1's)
                into the thread's workspace, never into the batch's memory, and C1's routed weight gradient from it
                (conv2d_bwd_weight_routed_v3's: whole patches from a row stack); the group's row of gpart at the
                flat-layout offsets, 0 elsewhere. A group of more than 16 images runs in chunks of 16 whose partials
                are added in order
  step_adam_v1  the partials added in group order from 0.0 (reference.step_reduce), Adam with srow's lr and bias
  step_sgd_v1   corrections (adam_step_v1's / sgd_step_v1's arithmetic, bit for bit), then step_advance

The chunk functions are the routed step's (conv2d.py, routed.py), called with the same argument types, except C1's
forward: the nine-op step's "auto" runs the rows kernel there, this step the lanes kernel, and both add each output's
taps in the same order (bias, then channels, rows, columns), so their values and routes are the same bits. So where a
group is one chunk of 16 images (CpuBackend.step_groups: ceil(B / 16) groups, a batch that is a multiple of 16) the
step's numbers are the nine-op routed step's bit for bit (its chunk partials are added in the same order; 0.0 + a
partial only turns a −0.0 into +0.0; tests/test_cpu_step4.py). The group count depends on the batch alone, and every
sum runs in a fixed order: no result depends on the number of threads.

step_fwd_v1 and step_bwd_v1 call their chunk functions through the addresses of their compiled code, given as
arguments (native.py; fwd_parts, bwd_parts): each chunk function compiles once, not again into each of the four
modules Numba makes of a parallel kernel. The default step's first compile (bench/compile_times.py, one process,
empty cache, 2026-12-06): 19.2 s of CPU with every chunk function linked into its kernels, 12.1 s with step_fwd's,
step_bwd's and head_train's called through addresses (16.8 s with step_bwd's alone). Since 2026-12-07 the kernels
are serial and their loops run as tasks of launch.par_tasks, the one parallel kernel (launch.py: a task per chunk
or group, ``make_step_fwd_task``, ``make_step_bwd_task``), so no op compiles Numba's parfor passes of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...stepstate import EPOCH, OFFSET, SEED, SHIFT
from . import conv2d, launch, native, routed
from .batch import mix32, prepare_image, step_advance_v1, word32
from .common import JIT_EXACT, JIT_INNER, ZERO, L, njit
from .conv2d import _pad_weights, _pool_fwd_lanes_chunk
from .optim import sched_index
from .routed import (
    _bwd_data_routed_chunk,
    _bwd_weight_routed_chunk,
    _bwd_weight_stack_chunk,
    _rows_of_filters,
    patch_width,
    routed_block,
    stack_width,
)

_MADE: dict[tuple, Any] = {}


# ---------------------------------------------------------------------------------------------- step_fwd


_call_fwd = native.caller(_pool_fwd_lanes_chunk)


def fwd_parts(KB1: int, KB3: int) -> native.Parts:
    """step_fwd_v1's chunk functions, conv2d_pool_fwd_v1's (lanes) for C1 and C3, compiled (or loaded from
    Numba's cache) with the argument types both kernels pass them (native.py): their addresses are step_fwd_v1's
    arguments a_c1, a_c3."""
    return conv2d.pool_fwd_parts("v1", KB1) + conv2d.pool_fwd_parts("v1", KB3)


def make_step_fwd_v1(KB1: int, KB3: int, ABI: str) -> Any:
    """step_fwd_v1 for register blocks of KB1 filters (C1) and KB3 (C3); ABI: fwd_parts(...).abi. A
    serial kernel whose chunks run as tasks of launch.par_tasks (a_par), each ``make_step_fwd_task``'s (a_task)."""
    key = ("step_fwd_v1", KB1, KB3, ABI)
    if key not in _MADE:

        @njit(**launch.JIT_OP)
        def step_fwd_v1(images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, scale, shift,
                        act_code, mode, write_conv, ws_x1, wp1, bp1, ws_x3, wp3, bp3, a_c1, a_c3, a_task, a_par):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            t = sched_index(sched, state)
            for e in range(srow.shape[0]):
                srow[e] = sched[t, e]
            _pad_weights(w1, b1, wp1, bp1)
            _pad_weights(w3, b3, wp3, bp3)
            args = (images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, scale, shift,
                    act_code, mode, write_conv, ws_x1, wp1, bp1, ws_x3, wp3, bp3, a_c1, a_c3, a_task, a_par)
            launch.run(a_par, a_task, launch.stash(args), (x.shape[0] + L - 1) // L)

        _MADE[key] = step_fwd_v1
    return _MADE[key]


def make_step_fwd_task(KB1: int, KB3: int, TT: str) -> Any:
    """step_fwd_v1's task: chunk ci of 16 images on thread tid (prepare, C1, C3), from the kernel's arguments (their
    tuple's type named TT: launch.task_type)."""
    key = ("step_fwd_task", KB1, KB3, TT)
    if key not in _MADE:

        @njit(**launch.JIT_TASK)
        def step_fwd_task(p, ci, tid):
            (images, labels, perm, state, sched, srow, x, y, w1, b1, p1, m1, w3, b3, p3, m3, scale, shift,
             act_code, mode, write_conv, ws_x1, wp1, bp1, ws_x3, wp3, bp3, a_c1, a_c3, a_task, a_par) = \
                launch.unstash(p, TT)
            B = x.shape[0]
            offset = np.int64(state[OFFSET])
            max_shift = np.int64(state[SHIFT])
            h1 = mix32(mix32(word32(state[SEED])) + word32(state[EPOCH]))
            b0 = ci * L
            for r in range(b0, min(B, b0 + L)):
                prepare_image(images, labels, perm, x, y, r, offset, max_shift, h1, scale, shift)
            # yconv is never written (write_conv is False): p1 and p3 stand in for it
            _call_fwd(a_c1, (x, wp1, bp1, p1, p1, m1, act_code, mode, write_conv, ws_x1[tid], b0, w1.shape[0],
                             KB1))
            _call_fwd(a_c3, (p1, wp3, bp3, p3, p3, m3, act_code, mode, write_conv, ws_x3[tid], b0, w3.shape[0],
                             KB3))

        _MADE[key] = step_fwd_task
    return _MADE[key]


# ---------------------------------------------------------------------------------------------- step_bwd


@njit(**JIT_INNER)
def _add_at(row, off, src):
    """row[off + e] += src[e] for every e."""
    for e in range(src.shape[0]):
        row[off + e] += src[e]


def bwd_blocks() -> tuple[int, int, int, int]:
    """(PV1, KB3, R3, PW3) of step_bwd_v1 at LeNet's shapes: C1's whole patches of 25 floats padded to PV1 = 32
    (conv2d_bwd_weight_routed_v3's), C3's patch rows (5 rows of 5 taps × 6 channels = 30 floats, padded to PW3 = 32)
    in blocks of KB3 of its 16 filters (conv2d_bwd_weight_routed_v1's)."""
    pw = patch_width(5, 6)
    return stack_width(5, 5, 1), routed_block(16, 5, pw), 5, pw


#: step_bwd_v1's chunk functions, called through their addresses (native.py: each compiles once, not into the
#: task's code)
_call_weight3 = native.caller(_bwd_weight_routed_chunk)
_call_data3 = native.caller(_bwd_data_routed_chunk)
_call_weight1 = native.caller(_bwd_weight_stack_chunk)


def bwd_parts() -> native.Parts:
    """step_bwd_v1's chunk functions, those of conv2d_bwd_weight_routed_v1, conv2d_bwd_data_routed_v1 (C3) and
    conv2d_bwd_weight_routed_v3 (C1), compiled (or loaded from Numba's cache) with the argument types those kernels
    and step_bwd_v1 pass them (native.py): their addresses are step_bwd_v1's arguments a_w3, a_d3, a_w1. A helper
    process calls this to compile them ahead while the first run's own process compiles step_fwd
    (cpu_backend/warm.py)."""
    pv1, kb3, r3, pw3 = bwd_blocks()
    return (routed.bwd_weight_parts(kb3, r3, pw3) + routed.bwd_data_parts(r3, pw3)
            + routed.bwd_weight_stack_parts(pv1))


def compile_bwd_parts() -> None:
    """bwd_parts, for warm.PARTS_FIRST."""
    bwd_parts()


def make_step_bwd_v1(PV1: int, KB3: int, R3: int, PW3: int, ABI: str) -> Any:
    """step_bwd_v1: C1's weight gradient by whole patches of PV1 floats (the row-stack kernel), C3's in blocks of KB3
    filters × R3 patch rows of PW3 floats (the patch-row kernels); ABI: bwd_parts().abi. A serial kernel whose image
    groups run as tasks of launch.par_tasks (a_par), each ``make_step_bwd_task``'s (a_task)."""
    key = ("step_bwd_v1", PV1, KB3, R3, PW3, ABI)
    if key not in _MADE:

        @njit(**launch.JIT_OP)
        def step_bwd_v1(x, p1, gz3, m3, m1, w3, gpart, act_code, chunk, o1w, o1b, o3w, o3b, ws_xs3, ws_dx, ws_gz1,
                        ws_zs1, ws_acc1, ws_part, wt, a_w3, a_d3, a_w1, a_task, a_par):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            _rows_of_filters(w3, wt)
            args = (x, p1, gz3, m3, m1, w3, gpart, act_code, chunk, o1w, o1b, o3w, o3b, ws_xs3, ws_dx, ws_gz1,
                    ws_zs1, ws_acc1, ws_part, wt, a_w3, a_d3, a_w1, a_task, a_par)
            launch.run(a_par, a_task, launch.stash(args), gpart.shape[0])

        _MADE[key] = step_bwd_v1
    return _MADE[key]


def make_step_bwd_task(PV1: int, KB3: int, R3: int, PW3: int, TT: str) -> Any:
    """step_bwd_v1's task: image group s on thread tid, from the kernel's arguments (their tuple's type named TT:
    launch.task_type)."""
    key = ("step_bwd_task", PV1, KB3, R3, PW3, TT)
    if key not in _MADE:

        @njit(**launch.JIT_TASK)
        def step_bwd_task(p, s, tid):
            (x, p1, gz3, m3, m1, w3, gpart, act_code, chunk, o1w, o1b, o3w, o3b, ws_xs3, ws_dx, ws_gz1,
             ws_zs1, ws_acc1, ws_part, wt, a_w3, a_d3, a_w1, a_task, a_par) = launch.unstash(p, TT)
            B = x.shape[0]
            K1, K3 = p1.shape[1], w3.shape[0]
            R1, S1 = x.shape[2] - 2 * p1.shape[2] + 1, x.shape[3] - 2 * p1.shape[3] + 1
            n1 = K1 * x.shape[1] * R1 * S1
            n3 = w3.size
            row = gpart[s]
            for e in range(row.shape[0]):
                row[e] = ZERO
            g0 = min(B, s * chunk)
            g1 = min(B, g0 + chunk)
            part = ws_part[tid]
            for c0 in range(g0, g1, L):
                c1 = min(g1, c0 + L)
                # C3: dw3, db3 from S2 and the routed gz3
                _call_weight3(a_w3, (p1[c0:c1], gz3[c0:c1], m3[c0:c1], ws_xs3[tid], part, np.int64(0), K3,
                                     w3.shape[3], KB3, R3, PW3))
                _add_at(row, o3w, part[:n3])
                _add_at(row, o3b, part[n3 : n3 + K3])
                # gz1 = C3's routed data gradient · act'(S2), in this thread's workspace only
                gz1 = ws_gz1[tid][0 : c1 - c0]
                _call_data3(a_d3, (gz3[c0:c1], wt, m3[c0:c1], p1[c0:c1], gz1, act_code, ws_dx[tid],
                                   np.int64(0), R3, PW3))
                # C1: dw1, db1 from x and gz1 routed through m1
                _call_weight1(a_w1, (x[c0:c1], gz1, m1[c0:c1], ws_zs1[tid], ws_acc1[tid], part, np.int64(0),
                                     R1, S1, PV1))
                _add_at(row, o1w, part[:n1])
                _add_at(row, o1b, part[n1 : n1 + K1])

        _MADE[key] = step_bwd_task
    return _MADE[key]


# ------------------------------------------------------------------------------------- step_adam, step_sgd


@njit(**JIT_EXACT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def step_reduce(gpart, g):
    """g[i] = Σ_s gpart[s, i] for i < gpart.shape[1], in float32 and in group order from 0.0."""
    nc = gpart.shape[1]
    for i in range(nc):
        g[i] = ZERO
    for s in range(gpart.shape[0]):
        r = gpart[s]
        for i in range(nc):
            g[i] += r[i]


@njit(**JIT_EXACT)
def step_adam_v1(p, g, gpart, m, v, srow, state, batch, beta1, beta2, eps, wd, c1, c2):
    """c1 = float32(1 − β1), c2 = float32(1 − β2), as the numpy backend rounds them (adam_step_v1)."""
    step_reduce(gpart, g)
    lr = srow[0]
    bc1 = srow[1]
    bc2 = srow[2]
    use_wd = wd != 0
    for e in range(p.shape[0]):
        gg = g[e] + wd * p[e] if use_wd else g[e]
        me = beta1 * m[e] + c1 * gg
        ve = beta2 * v[e] + c2 * gg * gg
        m[e] = me
        v[e] = ve
        den = np.sqrt(ve / bc2) + eps
        p[e] = p[e] - lr * (me / bc1) / den
    step_advance_v1(state, batch)


@njit(**JIT_EXACT)
def step_sgd_v1(p, g, gpart, m, srow, state, batch, momentum, wd):
    step_reduce(gpart, g)
    lr = srow[0]
    use_wd = wd != 0
    for e in range(p.shape[0]):
        me = momentum * m[e] + g[e]
        if use_wd:
            me = me + wd * p[e]
        m[e] = me
        p[e] = p[e] - lr * me
    step_advance_v1(state, batch)


KERNELS = {"step_adam_v1": step_adam_v1, "step_sgd_v1": step_sgd_v1}
VARIANTS = {"step_fwd": ("v1",), "step_bwd": ("v1",), "step_adam": ("v1",), "step_sgd": ("v1",)}
