"""The numpy backend: every op of the protocol in vectorised float32 NumPy on the CPU.

It is the CPU product (train and evaluate anywhere) and the second oracle for whole-step parity of
the GPU backends. Convolutions are im2col + one BLAS matrix product; the col matrix a forward pass
builds for its input is kept and reused by the weight gradient of the same input. NumPy temporaries
inside an op are not counted as allocations (there is no device memory here); ``empty``/``zeros``/
``to_device`` are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import OPS, Counters, check_act, check_mode

F32 = np.float32
LECUN_A = F32(1.7159)
LECUN_S = F32(2.0 / 3.0)


def _activate_(z: np.ndarray, act: str) -> None:
    """Apply the activation in place."""
    if act == "relu":
        np.maximum(z, F32(0), out=z)
    elif act == "tanh":
        np.tanh(z, out=z)
    elif act == "lecun_tanh":
        z *= LECUN_S
        np.tanh(z, out=z)
        z *= LECUN_A
    elif act == "sigmoid":
        # 1/(1+e^-z), clipped so exp cannot overflow (float32 sigmoid saturates long before ±88)
        np.clip(z, F32(-88), F32(88), out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        z += F32(1)
        np.reciprocal(z, out=z)
    elif act != "identity":
        check_act(act)


def _mul_act_grad_(dz: np.ndarray, y: np.ndarray, act: str) -> None:
    """dz *= act'(y) in place, with the derivative written through the activated output y."""
    if act == "identity":
        return
    if act == "relu":
        dz *= y > 0
    elif act == "tanh":
        dz *= F32(1) - y * y
    elif act == "lecun_tanh":
        dz *= LECUN_S * (LECUN_A - y * y / LECUN_A)
    elif act == "sigmoid":
        dz *= y * (F32(1) - y)
    else:
        check_act(act)


def _im2col(x: np.ndarray, r: int, s: int) -> np.ndarray:
    """(B,C,H,W) → (B·Ho·Wo, C·R·S): each row one receptive field, in (c, r, s) order."""
    b, c, h, w = x.shape
    ho, wo = h - r + 1, w - s + 1
    win = sliding_window_view(x, (r, s), axis=(2, 3))  # (B,C,Ho,Wo,R,S) view
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(b * ho * wo, c * r * s)


class NumpyBackend:
    """CPU backend in NumPy. All arrays are NumPy arrays; ``to_device`` is a copy."""

    name = "numpy"
    is_gpu = False

    def __init__(self) -> None:
        self.counters = Counters()
        self.variants: dict[str, tuple[str, ...]] = {op: ("v1",) for op in OPS}
        self.default_variants: dict[str, str] = {op: "v1" for op in OPS}
        self._cols_cache: tuple[Any, ...] | None = None  # (x, version, cols) of the last forward

    # ------------------------------------------------------------------ memory
    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        self.counters.allocs += 1
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        self.counters.allocs += 1
        return np.zeros(shape, dtype=dtype)

    def to_device(self, host: np.ndarray) -> np.ndarray:
        self.counters.allocs += 1
        self.counters.h2d += 1
        return np.array(host, copy=True, order="C")

    def upload(self, dst: np.ndarray, host: np.ndarray) -> None:
        if dst.shape != np.shape(host):
            raise ValueError(f"upload: shape {np.shape(host)} does not match {dst.shape}")
        self.counters.h2d += 1
        dst[...] = host

    def to_host(self, arr: np.ndarray) -> np.ndarray:
        self.counters.d2h += 1
        return np.array(arr, copy=True)

    def synchronize(self) -> None:
        self.counters.syncs += 1

    def graph(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn

    # ------------------------------------------------------------------ ops
    def batch_prepare(self, images, labels, perm, offset, x, y, mean, std, variant=None) -> None:
        self.counters.launches += 1
        b = x.shape[0]
        idx = perm[int(offset) : int(offset) + b]
        if idx.shape[0] != b:
            raise IndexError(f"batch_prepare: perm has {perm.shape[0]} entries, need {int(offset) + b}")
        scale, shift = F32(1.0 / (255.0 * std)), F32(-mean / std)
        x[:, 0, :2, :] = shift
        x[:, 0, 30:, :] = shift
        x[:, 0, 2:30, :2] = shift
        x[:, 0, 2:30, 30:] = shift
        inner = x[:, 0, 2:30, 2:30]
        np.multiply(images[idx], scale, out=inner, casting="unsafe")
        inner += shift
        y[...] = labels[idx]

    def conv2d_fwd(self, x, w, b, y, act, variant=None) -> None:
        self.counters.launches += 1
        k, c, r, s = w.shape
        bsz, _, ho, wo = y.shape
        cols = _im2col(x, r, s)
        self._cols_cache = (x, r, s, cols)
        z = cols @ w.reshape(k, c * r * s).T  # (B·Ho·Wo, K)
        np.add(z.reshape(bsz, ho, wo, k).transpose(0, 3, 1, 2), b.reshape(1, k, 1, 1), out=y)
        _activate_(y, act)

    def _cols_for(self, x: np.ndarray, r: int, s: int) -> np.ndarray:
        cached = self._cols_cache
        if cached is not None and cached[0] is x and cached[1:3] == (r, s):
            return cached[3]
        return _im2col(x, r, s)

    def conv2d_bwd_weight(self, x, dz, dw, db, variant=None) -> None:
        self.counters.launches += 1
        k, c, r, s = dw.shape
        bsz, _, ho, wo = dz.shape
        cols = self._cols_for(x, r, s)
        dzm = np.ascontiguousarray(dz.transpose(1, 0, 2, 3)).reshape(k, bsz * ho * wo)
        np.matmul(dzm, cols, out=dw.reshape(k, c * r * s))
        np.sum(dzm, axis=1, out=db)

    def conv2d_bwd_data(self, dz, w, dx, variant=None) -> None:
        self.counters.launches += 1
        k, c, r, s = w.shape
        bsz, _, ho, wo = dz.shape
        # col2im: every output gradient times its filter, scattered back over its receptive field
        dzm = np.ascontiguousarray(dz.transpose(0, 2, 3, 1)).reshape(bsz * ho * wo, k)
        dcols = (dzm @ w.reshape(k, c * r * s)).reshape(bsz, ho, wo, c, r, s).transpose(0, 3, 4, 5, 1, 2)
        dx[...] = 0
        for i in range(r):
            for j in range(s):
                dx[:, :, i : i + ho, j : j + wo] += dcols[:, :, i, j]

    def pool2x2_fwd(self, x, y, argmax, mode, variant=None) -> None:
        self.counters.launches += 1
        check_mode(mode)
        ho, wo = y.shape[2], y.shape[3]
        t0 = x[:, :, 0 : 2 * ho : 2, 0 : 2 * wo : 2]
        t1 = x[:, :, 0 : 2 * ho : 2, 1 : 2 * wo : 2]
        t2 = x[:, :, 1 : 2 * ho : 2, 0 : 2 * wo : 2]
        t3 = x[:, :, 1 : 2 * ho : 2, 1 : 2 * wo : 2]
        if mode == "avg":
            np.add(t0, t1, out=y)
            y += t2
            y += t3
            y *= F32(0.25)
            return
        np.maximum(t0, t1, out=y)
        np.maximum(y, t2, out=y)
        np.maximum(y, t3, out=y)
        # first maximum wins: test the taps from last to first so the earliest match overwrites
        argmax[...] = 3
        argmax[t2 == y] = 2
        argmax[t1 == y] = 1
        argmax[t0 == y] = 0

    def pool2x2_bwd(self, dy, argmax, yconv, dz, mode, act, variant=None) -> None:
        self.counters.launches += 1
        check_mode(mode)
        ho, wo = dy.shape[2], dy.shape[3]
        dz[...] = 0
        for t, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            tap = dz[:, :, i : 2 * ho : 2, j : 2 * wo : 2]
            if mode == "max":
                np.multiply(dy, argmax == t, out=tap)
            else:
                np.multiply(dy, F32(0.25), out=tap)
        _mul_act_grad_(dz, yconv, act)

    def dense_fwd(self, x, w, b, y, act, variant=None) -> None:
        self.counters.launches += 1
        np.matmul(x, w.T, out=y)
        y += b
        _activate_(y, act)

    def dense_bwd(self, x, w, y, dy, dx, dw, db, act, variant=None) -> None:
        self.counters.launches += 1
        dz = dy.copy()
        _mul_act_grad_(dz, y, act)
        np.matmul(dz.T, x, out=dw)
        np.sum(dz, axis=0, out=db)
        if dx is not None:
            np.matmul(dz, w, out=dx)

    def softmax_xent(self, logits, labels, dlogits, stats, variant=None) -> None:
        self.counters.launches += 1
        n = logits.shape[0]
        rows = np.arange(n)
        lab = labels.astype(np.intp)
        mx = logits.max(axis=1, keepdims=True)
        np.subtract(logits, mx, out=dlogits)
        lse = np.log(np.exp(dlogits).sum(axis=1))  # log Σ e^(z − max)
        loss_sum = float((lse - dlogits[rows, lab]).sum(dtype=np.float64))
        correct = int((np.argmax(logits, axis=1) == lab).sum())
        np.exp(dlogits, out=dlogits)
        dlogits /= dlogits.sum(axis=1, keepdims=True)
        dlogits[rows, lab] -= F32(1)
        dlogits *= F32(1.0 / n)
        stats[0] += F32(loss_sum)
        stats[1] += F32(correct)

    def adam_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, bc1, bc2, variant=None) -> None:
        self.counters.launches += 1
        gg = g + F32(weight_decay) * p if weight_decay else g
        m *= F32(beta1)
        m += F32(1 - beta1) * gg
        v *= F32(beta2)
        v += F32(1 - beta2) * gg * gg
        denom = np.sqrt(v / F32(bc2))
        denom += F32(eps)
        p -= F32(lr) * (m / F32(bc1)) / denom

    def sgd_step(self, p, g, m, lr, momentum, weight_decay, variant=None) -> None:
        self.counters.launches += 1
        m *= F32(momentum)
        m += g
        if weight_decay:
            m += F32(weight_decay) * p
        p -= F32(lr) * m
