"""head: the dense head's forward, loss and backward in one op (reference.head_train).

  head_train_v1  lanes: per chunk of 16 images (a task of launch.par_tasks), C5 → F6 → output as register-blocked lane
                 kernels, the softmax and its statistics per image, the backward pass down to dS4, and the
                 route through S4's pooling into C3's pre-activation gradient (NCHW), or with ``routed``
                 (yconv=None, max pooling: docs/routed_backward.md) gz = dS4 · act'(S4) at S4's shape, no
                 route and no yconv read; then the three
                 weight gradients as row kernels over the whole batch in order (tasks over blocks of dense.OB
                 rows × ≤ 80 columns), so no weight gradient depends on the chunking or the threads.
                 ``make_head_train_v1(routed)``: the routed and the dense step's kernel are two specialisations,
                 each compiling only its own end of a chunk (_head_tail_routed, _head_tail_route). The kernel calls
                 its functions through the addresses of their compiled code (native.py; ``parts``), so each
                 compiles once: the default step's head_train compiled in 3.8 s of CPU instead of 6.3 s
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types

from . import launch, native
from .common import IDENTITY, JIT_INNER, L, act_grad, njit
from .conv2d import F1, F2, F3, F4, I8, U4, _route
from .dense import OB, lane_dense, lane_dense_t, rows_dw
from .loss import softmax_row, write_stats_row

#: columns per weight-gradient task (a multiple of 16): tasks of about equal work for the threads
TASK_COLS = 80

_MADE: dict[tuple, Any] = {}


def dw_tasks(shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The weight-gradient tasks of head_train: rows [matrix, first row, first column, end column] over
    blocks of OB rows × TASK_COLS columns of each (rows, columns) shape in turn."""
    tasks = []
    for m, (rows, cols) in enumerate(shapes):
        for o0 in range(0, rows, OB):
            for i0 in range(0, cols, TASK_COLS):
                tasks.append((m, o0, i0, min(cols, i0 + TASK_COLS)))
    return np.array(tasks, dtype=np.int64)


@njit(**JIT_INNER)
def _head_chunk(xf, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, act_code, xt, h1t, h2t, zt, d1t, d2t, dxt,
                dz3r, b0, inv_n):
    """Forward, loss and backward of images b0 .. b0+15 down to dL/dx (dxt, lanes); returns (Σ loss (float64),
    correct count)."""
    B, I = xf.shape
    H1, H2, NC = w1.shape[0], w2.shape[0], w3.shape[0]
    nb = min(L, B - b0)
    for lane in range(nb):
        xr = xf[b0 + lane]
        for i in range(I):
            xt[i, lane] = xr[i]
    lane_dense(w1, b1, xt, h1t, act_code)
    lane_dense(w2, b2, h1t, h2t, act_code)
    lane_dense(w3, b3, h2t, zt, IDENTITY)
    s = 0.0
    c = 0
    for lane in range(nb):
        bb = b0 + lane
        for o in range(H1):
            h1[bb, o] = h1t[o, lane]
        for o in range(H2):
            h2[bb, o] = h2t[o, lane]
        for o in range(NC):
            logits[bb, o] = zt[o, lane]
        loss, ok = softmax_row(logits[bb], labels[bb], dz3r[bb], inv_n)
        s += np.float64(loss)
        c += ok
        for o in range(NC):
            zt[o, lane] = dz3r[bb, o]
    # backward: d2 = (w3ᵀ d3)·act'(h2), d1 = (w2ᵀ d2)·act'(h1), dx = w1ᵀ d1
    lane_dense_t(w3, zt, d2t)
    for o in range(H2):
        for lane in range(L):
            d2t[o, lane] = act_grad(d2t[o, lane], h2t[o, lane], act_code)
    lane_dense_t(w2, d2t, d1t)
    for o in range(H1):
        for lane in range(L):
            d1t[o, lane] = act_grad(d1t[o, lane], h1t[o, lane], act_code)
    lane_dense_t(w1, d1t, dxt)
    return s, c


@njit(**JIT_INNER)
def _head_tail_routed(xf, dz_conv, act_code, xt, d1t, d2t, dxt, dz1r, dz2r, b0):
    """The routed step's end of a chunk: gz = dL/dx · act'(x) at x's shape (in max mode x is the activated output at
    the routed tap) into dz_conv, and the chunk's rows of dz1r, dz2r."""
    B, I = xf.shape
    H1, H2 = d1t.shape[0], d2t.shape[0]
    nb = min(L, B - b0)
    gzf = dz_conv.reshape((B, I))
    for i in range(I):
        for lane in range(L):
            dxt[i, lane] = act_grad(dxt[i, lane], xt[i, lane], act_code)
    for lane in range(nb):
        gr = gzf[b0 + lane]
        for i in range(I):
            gr[i] = dxt[i, lane]
        bb = b0 + lane
        for o in range(H2):
            dz2r[bb, o] = d2t[o, lane]
        for o in range(H1):
            dz1r[bb, o] = d1t[o, lane]


@njit(**JIT_INNER)
def _head_tail_route(xf, argmax, yconv, dz_conv, act_code, mode, d1t, d2t, dxt, dxw, dz1r, dz2r, b0):
    """The dense step's end of a chunk: dL/dx routed through S4's pooling into C3's pre-activation gradient (NCHW,
    dz_conv), and the chunk's rows of dz1r, dz2r."""
    B, I = xf.shape
    C4, Hp, Wp = dxw.shape
    H1, H2 = d1t.shape[0], d2t.shape[0]
    nb = min(L, B - b0)
    dxf = dxw.reshape((C4 * Hp * Wp,))
    for lane in range(nb):
        bb = b0 + lane
        for o in range(H2):
            dz2r[bb, o] = d2t[o, lane]
        for o in range(H1):
            dz1r[bb, o] = d1t[o, lane]
        for i in range(I):
            dxf[i] = dxt[i, lane]
        _route(dxw, argmax, yconv, dz_conv, bb, C4, Hp, Wp, yconv.shape[2], yconv.shape[3], mode, act_code)


@njit(**JIT_INNER)
def _head_dw_task(task, xf, h1, h2, dz1r, dz2r, dz3r, dw1, db1, dw2, db2, dw3, db3):
    """One weight-gradient task: [matrix, first row, first column, end column] (see dw_tasks)."""
    m = task[0]
    dzr, xr, dw, db = dz1r, xf, dw1, db1
    if m == 1:
        dzr, xr, dw, db = dz2r, h1, dw2, db2
    elif m == 2:
        dzr, xr, dw, db = dz3r, h2, dw3, db3
    rows_dw(dzr, xr, dw, db, task[1], task[2], task[3], xf.shape[0])


_call_chunk = native.caller(_head_chunk)
_call_tail_routed = native.caller(_head_tail_routed)
_call_tail_route = native.caller(_head_tail_route)
_call_dw_task = native.caller(_head_dw_task)


def parts(routed: bool) -> native.Parts:
    """head_train_v1's functions compiled (or loaded from Numba's cache) with the argument types the kernel passes
    them (native.py): the addresses of the chunk, the chunk's end (routed or not) and the weight-gradient task are
    its arguments a_chunk, a_tail, a_dw."""
    i4 = types.Array(types.int32, 1, "C")
    chunk = (_head_chunk, (F2, i4, F2, F1, F2, F1, F2, F1, F2, F2, F2, I8, F2, F2, F2, F2, F2, F2, F2, F2, I8,
                           types.float32))
    if routed:
        tail = (_head_tail_routed, (F2, F4, I8, F2, F2, F2, F2, F2, F2, I8))
    else:
        tail = (_head_tail_route, (F2, U4, F4, F4, I8, I8, F2, F2, F2, F3, F2, F2, I8))
    dw = (_head_dw_task, (types.Array(types.int64, 1, "C"), F2, F2, F2, F2, F2, F2, F2, F1, F2, F1, F2, F1))
    return native.Parts(chunk, tail, dw)


def make_head_train_v1(routed: bool, ABI: str | None = None) -> Any:
    """head_train_v1 for the routed step (``routed``: yconv=None, gz at S4's shape) or the dense one (the route
    through S4's pooling). A constant of the kernel, not an argument: each compiles only its own end of a chunk
    (a first run of the default step does not compile the dense one's route). ABI: parts(routed).abi (None: made
    here, which compiles the parts). A serial kernel with two parallel loops, each run by launch.par_tasks (a_par):
    the chunks (``make_head_tasks``'s first function, a_task1), then the weight gradients' tasks (its second,
    a_task2)."""
    if ABI is None:
        ABI = parts(routed).abi
    key = ("head_train_v1", routed, ABI)
    if key not in _MADE:

        @njit(**launch.JIT_OP)
        def head_train_v1(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
                          dw1, db1, dw2, db2, dw3, db3, stats, state, act_code, mode,
                          ws_x, ws_h1, ws_h2, ws_z, ws_d1, ws_d2, ws_dx, ws_dxw, dz1r, dz2r, dz3r, part, tasks,
                          a_chunk, a_tail, a_dw, a_task1, a_task2, a_par):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            nch = (x.shape[0] + L - 1) // L
            args = (x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
                    dw1, db1, dw2, db2, dw3, db3, stats, state, act_code, mode,
                    ws_x, ws_h1, ws_h2, ws_z, ws_d1, ws_d2, ws_dx, ws_dxw, dz1r, dz2r, dz3r, part, tasks,
                    a_chunk, a_tail, a_dw, a_task1, a_task2, a_par)
            p = launch.stash(args)
            launch.run(a_par, a_task1, p, nch)
            write_stats_row(part, nch, stats, state)
            # weight gradients over the whole batch, b in order
            launch.run(a_par, a_task2, p, tasks.shape[0])

        _MADE[key] = head_train_v1
    return _MADE[key]


def make_head_tasks(routed: bool, TT: str) -> tuple[Any, Any]:
    """head_train_v1's two tasks, from the kernel's arguments (their tuple's type named TT: launch.task_type):
    chunk ci of 16 images on thread tid (forward, loss, the backward to the conv map), and weight-gradient task t."""
    key = ("head_tasks", routed, TT)
    if key not in _MADE:

        @njit(**launch.JIT_TASK)
        def head_chunk_task(p, ci, tid):
            (x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
             dw1, db1, dw2, db2, dw3, db3, stats, state, act_code, mode,
             ws_x, ws_h1, ws_h2, ws_z, ws_d1, ws_d2, ws_dx, ws_dxw, dz1r, dz2r, dz3r, part, tasks,
             a_chunk, a_tail, a_dw, a_task1, a_task2, a_par) = launch.unstash(p, TT)
            B = x.shape[0]
            xf = x.reshape((B, x.shape[1] * x.shape[2] * x.shape[3]))
            inv_n = np.float32(1.0 / B)
            b0 = ci * L
            s, c = _call_chunk(a_chunk, (xf, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, act_code, ws_x[tid],
                                         ws_h1[tid], ws_h2[tid], ws_z[tid], ws_d1[tid], ws_d2[tid], ws_dx[tid],
                                         dz3r, b0, inv_n))
            if routed:
                _call_tail_routed(a_tail, (xf, dz_conv, act_code, ws_x[tid], ws_d1[tid], ws_d2[tid], ws_dx[tid],
                                           dz1r, dz2r, b0))
            else:
                _call_tail_route(a_tail, (xf, argmax, yconv, dz_conv, act_code, mode, ws_d1[tid], ws_d2[tid],
                                          ws_dx[tid], ws_dxw[tid], dz1r, dz2r, b0))
            part[ci, 0] = s
            part[ci, 1] = c

        @njit(**launch.JIT_TASK)
        def head_dw_task(p, t, tid):
            (x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv,
             dw1, db1, dw2, db2, dw3, db3, stats, state, act_code, mode,
             ws_x, ws_h1, ws_h2, ws_z, ws_d1, ws_d2, ws_dx, ws_dxw, dz1r, dz2r, dz3r, part, tasks,
             a_chunk, a_tail, a_dw, a_task1, a_task2, a_par) = launch.unstash(p, TT)
            xf = x.reshape((x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]))
            _call_dw_task(a_dw, (tasks[t], xf, h1, h2, dz1r, dz2r, dz3r, dw1, db1, dw2, db2, dw3, db3))

        _MADE[key] = (head_chunk_task, head_dw_task)
    return _MADE[key]


KERNELS: dict[str, Any] = {}
VARIANTS = {"head_train": ("v1",)}
