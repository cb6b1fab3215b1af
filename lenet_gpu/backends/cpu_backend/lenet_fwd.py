"""lenet_fwd: the whole forward pass, uint8 images → logits, in one op (reference.lenet_fwd).

  lenet_fwd_v1  lanes: per chunk of 16 images (a task of launch.par_tasks), everything in the lane layout of one
                thread's workspace: normalise onto the canvas (the bits of batch_prepare), C1 + act + S2 and C3 + act
                + S4 as register-blocked pooling windows (only the pooled maps are kept), then C5 → F6 → output as
                lane kernels; the logits are the only output written. The chunk runs through the address of its
                compiled code (native.py): it compiles once, not into the task's code
"""

from __future__ import annotations

from typing import Any

from numba import carray, literally, types

from . import launch, native
from .batch import canvas_lane
from .common import IDENTITY, JIT_INLINE, JIT_INNER, MAX, RELU, L, act, njit, stack_tile
from .conv2d import (
    F1,
    F2,
    F4,
    I8,
    KB_MAX,
    P_TILE,
    W_TILE,
    _pad_weights,
    bias_init,
    pool4,
    window_lanes,
    window_relu_max,
)
from .dense import lane_dense

_MADE: dict[tuple[int, int, str], Any] = {}


@njit(**JIT_INNER)
def _pool_relu_max(xt, wp, bp, K, Hp, Wp, out, KB):
    """out[(k·Hp + i)·Wp + j] (a (K·Hp·Wp, L) array) = max(relu(conv)) over each 2×2 window (conv2d.window_relu_max,
    whose routes are not kept here), written by 2-D index: a row view of out costs a reference count taken and
    dropped (two calls of Numba's runtime) a window."""
    literally(KB)
    acc = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    pt = carray(stack_tile(P_TILE), (2 * KB_MAX, L))
    Kp = wp.shape[0]
    for wi in range(Hp):
        for wj in range(Wp):
            for k0 in range(0, Kp, KB):
                window_relu_max(xt, wp, bp, k0, wi, wj, acc, pt, KB)
                for q in range(KB):
                    if k0 + q < K:
                        row = ((k0 + q) * Hp + wi) * Wp + wj
                        for lane in range(L):
                            out[row, lane] = pt[2 * q, lane]


@njit(**JIT_INLINE)
def _pool_any(xt, wp, bp, K, Hp, Wp, out, act_code, mode, acc, KB):
    """out as in _pool_relu_max, = pool(act(conv)) for any activation and pooling mode: act per lane, scalar."""
    Kp = wp.shape[0]
    for wi in range(Hp):
        for wj in range(Wp):
            for k0 in range(0, Kp, KB):
                bias_init(acc, bp, k0, KB)
                window_lanes(xt, wp, k0, 2 * wi, 2 * wj, acc, KB)
                for q in range(KB):
                    if k0 + q < K:
                        row = ((k0 + q) * Hp + wi) * Wp + wj
                        for lane in range(L):
                            m, _ = pool4(act(acc[4 * q, lane], act_code), act(acc[4 * q + 1, lane], act_code),
                                         act(acc[4 * q + 2, lane], act_code), act(acc[4 * q + 3, lane], act_code),
                                         mode)
                            out[row, lane] = m


@njit(**JIT_INLINE)
def _pool_layer(xt, wp, bp, K, Hp, Wp, out, act_code, mode, acc, KB):
    """out = pool(act(conv)). relu-max, the default, in a function of its own: with the general epilogue (calls of
    act) in the same function, LLVM's code for the relu-max loops was slower (loop counters spilled to the stack,
    accumulators stored and reloaded): C1 of 16 images 47 → 80 µs, C3 85 → 112 µs, one thread on a Zen 3
    (2026-12-07, a scratch timer of both forms interleaved in one process); inlined into the chunk as a second loop
    nest beside the general one, no faster. lenet_fwd on 1,000 images, one thread, interleaved processes: 14.6-14.8
    → 10.6 ms."""
    if act_code == RELU and mode == MAX:
        _pool_relu_max(xt, wp, bp, K, Hp, Wp, out, KB)
    else:
        _pool_any(xt, wp, bp, K, Hp, Wp, out, act_code, mode, acc, KB)


@njit(**JIT_INNER)
def _lenet_chunk(images, wp1, bp1, wp3, bp3, w5, b5, w6, b6, w7, b7, logits, scale, shift, act_code, mode,
                 xt, s2, s4, h1t, h2t, zt, b0, K1, K3, KB1, KB3):
    literally(KB1)
    literally(KB3)
    N, IH, IW = images.shape
    R1, S1 = wp1.shape[2], wp1.shape[3]
    R3, S3 = wp3.shape[2], wp3.shape[3]
    XH, XW = xt.shape[1], xt.shape[2]  # the canvas (images padded)
    pad = (XH - IH) // 2
    H2, W2 = (XH - R1 + 1) // 2, (XW - S1 + 1) // 2
    H4, W4 = (H2 - R3 + 1) // 2, (W2 - S3 + 1) // 2
    NC = w7.shape[0]
    acc = carray(stack_tile(W_TILE), (4 * KB_MAX, L))
    nb = min(L, N - b0)
    for lane in range(nb):
        canvas_lane(images[b0 + lane], xt[0], lane, pad, scale, shift)
    s2f = s2.reshape((s2.shape[0] * s2.shape[1] * s2.shape[2], L))
    _pool_layer(xt, wp1, bp1, K1, H2, W2, s2f, act_code, mode, acc, KB1)
    _pool_layer(s2, wp3, bp3, K3, H4, W4, s4, act_code, mode, acc, KB3)
    lane_dense(w5, b5, s4, h1t, act_code)
    lane_dense(w6, b6, h1t, h2t, act_code)
    lane_dense(w7, b7, h2t, zt, IDENTITY)
    for lane in range(nb):
        for o in range(NC):
            logits[b0 + lane, o] = zt[o, lane]


_call_chunk = native.caller(_lenet_chunk)


def parts(KB1: int, KB3: int) -> native.Parts:
    """lenet_fwd_v1's chunk function compiled (or loaded from Numba's cache) with the argument types the kernel passes
    it (native.py): its address is the kernel's argument a_chunk."""
    u3, f = types.Array(types.uint8, 3, "C"), types.float32
    return native.Parts((_lenet_chunk, (u3, F4, F1, F4, F1, F2, F1, F2, F1, F2, F1, F2, f, f, I8, I8, F4, F4, F2, F2,
                                        F2, F2, I8, I8, I8, types.literal(KB1), types.literal(KB3))))


def make_lenet_fwd_v1(KB1: int, KB3: int, ABI: str) -> Any:
    """lenet_fwd_v1 for blocks of KB1 filters in C1 and KB3 in C3; ABI: parts(KB1, KB3).abi. A serial kernel: its
    chunks run as tasks of launch.par_tasks (a_par), each task ``make_lenet_fwd_task``'s function (a_task)."""
    key = (KB1, KB3, ABI)
    if key not in _MADE:

        @njit(**launch.JIT_OP)
        def lenet_fwd_v1(images, w1, b1, w3, b3, w5, b5, w6, b6, w7, b7, logits, scale, shift, act_code, mode,
                         ws_x, ws_s2, ws_s4, ws_h1, ws_h2, ws_z, wp1, bp1, wp3, bp3, a_chunk, a_task, a_par):
            _ = ABI  # in the closure: Numba's cache key (native.Parts)
            _pad_weights(w1, b1, wp1, bp1)
            _pad_weights(w3, b3, wp3, bp3)
            args = (images, w1, b1, w3, b3, w5, b5, w6, b6, w7, b7, logits, scale, shift, act_code, mode,
                    ws_x, ws_s2, ws_s4, ws_h1, ws_h2, ws_z, wp1, bp1, wp3, bp3, a_chunk, a_task, a_par)
            launch.run(a_par, a_task, launch.stash(args), (images.shape[0] + L - 1) // L)

        _MADE[key] = lenet_fwd_v1
    return _MADE[key]


def make_lenet_fwd_task(KB1: int, KB3: int, TT: str) -> Any:
    """lenet_fwd_v1's task: chunk ci of 16 images on thread tid, from the kernel's arguments (their tuple's type named
    TT: launch.task_type)."""
    key = ("task", KB1, KB3, TT)
    if key not in _MADE:

        @njit(**launch.JIT_TASK)
        def lenet_fwd_task(p, ci, tid):
            (images, w1, b1, w3, b3, w5, b5, w6, b6, w7, b7, logits, scale, shift, act_code, mode,
             ws_x, ws_s2, ws_s4, ws_h1, ws_h2, ws_z, wp1, bp1, wp3, bp3, a_chunk, a_task, a_par) = launch.unstash(p, TT)
            _call_chunk(a_chunk, (images, wp1, bp1, wp3, bp3, w5, b5, w6, b6, w7, b7, logits, scale, shift,
                                  act_code, mode, ws_x[tid], ws_s2[tid], ws_s4[tid], ws_h1[tid], ws_h2[tid],
                                  ws_z[tid], ci * L, w1.shape[0], w3.shape[0], KB1, KB3))

        _MADE[key] = lenet_fwd_task
    return _MADE[key]
