"""NumPy reference ops: the living definition of every op in LeNet-5.

Pure functions on NumPy arrays in NCHW layout, for any float dtype (float32 or float64); each returns
new arrays and computes in the dtype of its inputs. Every kernel of every backend is tested against
these, in float64. Nothing here loops over pixels or images in Python.

Conventions (docs/DESIGN.md §3):
- convolution is "valid" cross-correlation with stride 1: y[n,k,i,j] = b[k] + Σ_{c,r,s} w[k,c,r,s]·x[n,c,i+r,j+s]
- 2×2 subsampling has stride 2; an odd trailing row/column is dropped (as in PyTorch)
- activation derivatives are written in terms of the activated output y, so a backward pass never
  needs the pre-activation
- ``softmax_xent`` returns the mean loss over the batch and the gradient of that mean
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ACTIVATIONS = ("identity", "relu", "tanh", "lecun_tanh", "sigmoid")
POOL_MODES = ("max", "avg")

#: LeCun's scaled tanh, f(x) = A·tanh(S·x) (LeCun et al. 1998, appendix A)
LECUN_A = 1.7159
LECUN_S = 2.0 / 3.0


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def activate(z: np.ndarray, act: str) -> np.ndarray:
    """Apply activation ``act`` elementwise (returns a new array of z's dtype)."""
    _check_act(act)
    if act == "identity":
        return z.copy()
    if act == "relu":
        return np.maximum(z, z.dtype.type(0))
    if act == "tanh":
        return np.tanh(z)
    if act == "lecun_tanh":
        return z.dtype.type(LECUN_A) * np.tanh(z.dtype.type(LECUN_S) * z)
    # sigmoid, written so that large |z| neither overflows nor loses the tiny side
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def activation_grad(y: np.ndarray, act: str) -> np.ndarray:
    """d act / d z expressed through the activated output y = act(z)."""
    _check_act(act)
    t = y.dtype.type
    if act == "identity":
        return np.ones_like(y)
    if act == "relu":
        return (y > 0).astype(y.dtype)
    if act == "tanh":
        return 1 - y * y
    if act == "lecun_tanh":
        # f = A tanh(Sz) → f' = A S (1 - tanh²) = S (A - f²/A)
        return t(LECUN_S) * (t(LECUN_A) - y * y / t(LECUN_A))
    return y * (1 - y)  # sigmoid


# ---------------------------------------------------------------------------------------------- conv2d


def conv2d_fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray, act: str = "identity") -> np.ndarray:
    """Valid 2-D convolution, stride 1, plus bias, then activation.

    x (N,C,H,W), w (K,C,R,S), b (K,) → y (N,K,H-R+1,W-S+1)
    """
    n, c, h, wd = x.shape
    k, c2, r, s = w.shape
    if c != c2 or b.shape != (k,):
        raise ValueError(f"conv2d_fwd: shapes do not agree: x {x.shape}, w {w.shape}, b {b.shape}")
    if h < r or wd < s:
        raise ValueError(f"conv2d_fwd: input {h}x{wd} smaller than filter {r}x{s}")
    win = sliding_window_view(x, (r, s), axis=(2, 3))  # (N,C,Ho,Wo,R,S), a view
    z = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # (N,Ho,Wo,K)
    z = z.transpose(0, 3, 1, 2) + b.reshape(1, k, 1, 1)
    return activate(np.ascontiguousarray(z, dtype=x.dtype), act)


def conv2d_bwd(
    x: np.ndarray, w: np.ndarray, y: np.ndarray, dy: np.ndarray, act: str = "identity"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of conv2d_fwd. y is the activated output, dy = dL/dy. Returns (dx, dw, db)."""
    k, c, r, s = w.shape
    dz = dy * activation_grad(y, act)  # dL/d(pre-activation)
    db = dz.sum(axis=(0, 2, 3))
    win = sliding_window_view(x, (r, s), axis=(2, 3))  # (N,C,Ho,Wo,R,S)
    dw = np.tensordot(dz, win, axes=([0, 2, 3], [0, 2, 3]))  # (K,C,R,S)
    # dx is the "full" correlation of dz with the flipped filters
    dzp = np.pad(dz, ((0, 0), (0, 0), (r - 1, r - 1), (s - 1, s - 1)))
    dwin = sliding_window_view(dzp, (r, s), axis=(2, 3))  # (N,K,H,W,R,S)
    dx = np.tensordot(dwin, w[:, :, ::-1, ::-1], axes=([1, 4, 5], [0, 2, 3]))  # (N,H,W,C)
    dx = np.ascontiguousarray(dx.transpose(0, 3, 1, 2))
    return dx.astype(x.dtype, copy=False), dw.astype(w.dtype, copy=False), db.astype(w.dtype, copy=False)


# --------------------------------------------------------------------------------------------- pool2x2


def _windows2x2(x: np.ndarray) -> np.ndarray:
    """(N,C,H,W) → (N,C,H//2,W//2,4), the 4 taps of each window in row-major order."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    if ho == 0 or wo == 0:
        raise ValueError(f"pool2x2: input {h}x{w} is smaller than the 2x2 window")
    v = x[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).transpose(0, 1, 2, 4, 3, 5)
    return v.reshape(n, c, ho, wo, 4)


def pool2x2_fwd(x: np.ndarray, mode: str = "max") -> tuple[np.ndarray, np.ndarray | None]:
    """2×2 subsampling with stride 2. Returns (y, argmax).

    argmax is uint8 in 0..3, the row-major position inside the window of the first maximum
    (flat backgrounds make ties common, so the rule matters); None for mode "avg".
    """
    win = _windows2x2(x)
    if mode == "max":
        am = np.argmax(win, axis=-1)  # first occurrence wins
        y = np.take_along_axis(win, am[..., None], axis=-1)[..., 0]
        return np.ascontiguousarray(y), am.astype(np.uint8)
    if mode == "avg":
        return (win.sum(axis=-1) * x.dtype.type(0.25)).astype(x.dtype), None
    raise ValueError(f"unknown pool mode {mode!r}; expected one of {', '.join(POOL_MODES)}")


def pool2x2_bwd(
    dy: np.ndarray,
    argmax: np.ndarray | None,
    mode: str = "max",
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Gradient of pool2x2_fwd: route dy to the argmax tap (max) or spread it as dy/4 (avg).

    out_shape (H, W) of the pooled input defaults to twice dy's; an odd input size needs it.
    """
    n, c, ho, wo = dy.shape
    h, w = out_shape if out_shape is not None else (2 * ho, 2 * wo)
    if mode == "max":
        if argmax is None or argmax.shape != dy.shape:
            raise ValueError("pool2x2_bwd: max mode needs argmax with the shape of dy")
        taps = (np.arange(4, dtype=np.uint8) == argmax[..., None]) * dy[..., None]
    elif mode == "avg":
        taps = np.broadcast_to((dy * dy.dtype.type(0.25))[..., None], dy.shape + (4,))
    else:
        raise ValueError(f"unknown pool mode {mode!r}; expected one of {', '.join(POOL_MODES)}")
    dx = np.zeros((n, c, h, w), dtype=dy.dtype)
    dx[:, :, : 2 * ho, : 2 * wo] = (
        taps.reshape(n, c, ho, wo, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)
    )
    return dx


# ----------------------------------------------------------------------------------------------- dense


def dense_fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray, act: str = "identity") -> np.ndarray:
    """y = act(x·wᵀ + b); x (N,I), w (O,I), b (O,) → (N,O)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or b.shape != (w.shape[0],):
        raise ValueError(f"dense_fwd: shapes do not agree: x {x.shape}, w {w.shape}, b {b.shape}")
    return activate((x @ w.T + b).astype(x.dtype, copy=False), act)


def dense_bwd(
    x: np.ndarray, w: np.ndarray, y: np.ndarray, dy: np.ndarray, act: str = "identity"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of dense_fwd. y is the activated output, dy = dL/dy. Returns (dx, dw, db)."""
    dz = dy * activation_grad(y, act)
    return dz @ w, dz.T @ x, dz.sum(axis=0)


# ---------------------------------------------------------------------------------------------- loss


def softmax_xent(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the batch and its gradient w.r.t. the logits.

    Stable for any finite logits (the row maximum is subtracted first).
    """
    n = logits.shape[0]
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (n,) or labels.min(initial=0) < 0 or labels.max(initial=0) >= logits.shape[1]:
        raise ValueError("softmax_xent: labels must be (N,) class ids in range")
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    se = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(se[:, 0]) - z[rows, labels]))
    d = e / se
    d[rows, labels] -= 1
    return loss, (d / n).astype(logits.dtype, copy=False)


# ------------------------------------------------------------------------------------------ optimizers


def adam_update(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Adam step (t counts from 1), L2 weight decay added to the gradient as torch.optim.Adam does.

    Returns new (p, m, v).
    """
    g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


def sgd_update(
    p: np.ndarray, g: np.ndarray, buf: np.ndarray, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One SGD step with (heavy-ball) momentum, as torch.optim.SGD: buf = μ·buf + g; p -= lr·buf.

    Returns new (p, buf). buf starts at zero, which equals torch's first-step buf = g.
    """
    g = g + weight_decay * p
    buf = momentum * buf + g
    return p - lr * buf, buf


# ------------------------------------------------------------------------------- batch (augmentation)
#
# Augmentation is a pure function of (seed, epoch, sample index): a counter-based hash, in 32-bit
# unsigned integer arithmetic only, so every backend (NumPy, Numba, CUDA C, the CPU kernels) draws
# exactly the same shifts with no random-number state and no host work per epoch.

MASK32 = 0xFFFFFFFF


def mix32(x):
    """The 32-bit integer mixer "lowbias32" (C. Wellons): x ^= x>>16; x *= 0x7feb352d; x ^= x>>15;
    x *= 0x846ca68b; x ^= x>>16, all modulo 2³². Works on Python ints and on NumPy uint64 arrays."""
    x = x & MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def augment_shift(seed: int, epoch: int, index, max_shift: int):
    """The random shift (dy, dx) of sample ``index`` (the sample's index in the dataset, an int or an
    integer array) in epoch ``epoch`` of a run seeded with ``seed``; each uniform in [−max_shift, max_shift].

        h0 = mix32(seed);  h1 = mix32(h0 + epoch);  h = mix32(h1 + index)        (all mod 2³²)
        dy = (h & 0xFFFF) % (2·max_shift + 1) − max_shift;  dx = (h >> 16) % (2·max_shift + 1) − max_shift

    seed and epoch enter as their low 32 bits (two's complement for negative values), as an int32
    state word would carry them."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0 (got {max_shift})")
    span = 2 * int(max_shift) + 1
    h1 = mix32(mix32(int(seed) & MASK32) + (int(epoch) & MASK32))
    idx = np.asarray(index).astype(np.uint64) & np.uint64(MASK32)
    h = mix32((np.uint64(h1) + idx) & np.uint64(MASK32))
    dy = (h & np.uint64(0xFFFF)) % np.uint64(span)
    dx = (h >> np.uint64(16)) % np.uint64(span)
    return dy.astype(np.int64) - max_shift, dx.astype(np.int64) - max_shift


def batch_prepare(
    images: np.ndarray, labels: np.ndarray, perm: np.ndarray, offset: int, batch: int, mean: float, std: float,
    seed: int = 0, epoch: int = 0, max_shift: int = 0, pad: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Gather, shift, pad and normalise one batch (float64): for r < batch, j = perm[offset + r]:

        x[r, 0, h, v] = (p / 255 − mean) / std,  p = images[j, h − pad − dy_j, v − pad − dx_j]
                        (0 where that pixel lies outside the image)
        y[r] = labels[j]

    with (dy_j, dx_j) = augment_shift(seed, epoch, j, max_shift), (0, 0) when max_shift is 0. So a digit
    moves on the padded canvas by up to max_shift pixels each way; pixels moved in from outside are
    0 (the background). Returns x (batch,1,H+2pad,W+2pad) and y (batch,) int32."""
    n, ih, iw = images.shape
    if offset < 0 or offset + batch > perm.shape[0]:
        raise IndexError(f"batch_prepare: perm has {perm.shape[0]} entries, need {offset + batch}")
    j = perm[offset : offset + batch].astype(np.int64)
    if max_shift > 0:
        dy, dx = augment_shift(seed, epoch, j, max_shift)
    else:
        dy = dx = np.zeros(batch, np.int64)
    xh, xw = ih + 2 * pad, iw + 2 * pad
    src_h = np.arange(xh)[None, :] - pad - dy[:, None]  # (B, XH)
    src_w = np.arange(xw)[None, :] - pad - dx[:, None]  # (B, XW)
    ok = ((src_h >= 0) & (src_h < ih))[:, :, None] & ((src_w >= 0) & (src_w < iw))[:, None, :]
    pix = images[j[:, None, None], np.clip(src_h, 0, ih - 1)[:, :, None], np.clip(src_w, 0, iw - 1)[:, None, :]]
    p = np.where(ok, pix.astype(np.float64), 0.0)
    x = ((p / 255.0 - mean) / std)[:, None]
    return x, labels[j].astype(np.int32)


# ----------------------------------------------------------------------------- fused ops (compositions)
#
# The fused ops of the GPU issue are defined here as compositions of the ops above, so each fused
# kernel is checked against exactly the unfused computation it replaces.


def conv2d_bwd_data_pool(
    dz: np.ndarray, w: np.ndarray, argmax: np.ndarray | None, yconv: np.ndarray, mode: str = "max",
    act: str = "identity",
) -> np.ndarray:
    """The data gradient of a convolution routed back through the pooling below it:
    pool2x2_bwd(conv2d_bwd data-gradient(dz, w), argmax, mode) · act'(yconv).

    dz (N,K,Ho,Wo) is the gradient at the convolution's pre-activation; w (K,C,R,S); the convolution's
    input is the pooled map (N,C,Ho+R−1,Wo+S−1) of yconv (N,C,H,W) (the activated output of the layer
    below, whose act' this applies). Returns dz_below (N,C,H,W)."""
    k, c, r, s = w.shape
    n, _, ho, wo = dz.shape
    x_shape = (n, c, ho + r - 1, wo + s - 1)
    zeros = np.zeros(x_shape, dtype=dz.dtype)
    dx, _, _ = conv2d_bwd(zeros, w, np.zeros_like(dz), dz, "identity")
    return pool2x2_bwd(dx, argmax, mode, out_shape=yconv.shape[2:]) * activation_grad(yconv, act)


# ------------------------------------------------------------------------- routed ops (max pooling only)
#
# After a 2×2 max pool the gradient into the convolution's output is nonzero only at each window's argmax
# tap. The routed ops take that gradient at the pooled size (``gz``, already multiplied by act') with the
# routes and touch only routed positions (docs/routed_backward.md). Written here per (tap, r, s), not
# through the dense ops, so the tests that compare the two check one against the other.


def _routed_shape(gz: np.ndarray, argmax: np.ndarray, h: int, w: int, r: int, s: int, op: str) -> None:
    if argmax is None or argmax.shape != gz.shape:
        raise ValueError(f"{op}: argmax must have gz's shape {gz.shape}")
    if gz.shape[2] != (h - r + 1) // 2 or gz.shape[3] != (w - s + 1) // 2:
        raise ValueError(f"{op}: gz {gz.shape} is not the pooled size of a {r}x{s} convolution of {h}x{w}")


def conv2d_bwd_weight_routed(
    x: np.ndarray, gz: np.ndarray, argmax: np.ndarray, r: int, s: int
) -> tuple[np.ndarray, np.ndarray]:
    """The weight gradient of a conv + 2×2 max pool from the routed gradient gz (N,K,Hp,Wp):
    dw[k,c,r,s] = Σ_{n,i,j} gz[n,k,i,j]·x[n, c, 2i + a//2 + r, 2j + a%2 + s] with a = argmax[n,k,i,j];
    db[k] = Σ gz. x (N,C,H,W) is the convolution's input. Returns (dw (K,C,R,S), db (K,))."""
    n, c, h, w = x.shape
    _routed_shape(gz, argmax, h, w, r, s, "conv2d_bwd_weight_routed")
    k, hp, wp = gz.shape[1], gz.shape[2], gz.shape[3]
    dw = np.zeros((k, c, r, s), dtype=np.result_type(x, gz))
    for a in range(4):
        ga = np.where(argmax == a, gz, 0)
        for u in range(r):
            for v in range(s):
                i0, j0 = a // 2 + u, a % 2 + v
                xs = x[:, :, i0 : i0 + 2 * hp : 2, j0 : j0 + 2 * wp : 2]  # (N,C,Hp,Wp)
                dw[:, :, u, v] += np.einsum("nkij,ncij->kc", ga, xs)
    return dw, gz.sum(axis=(0, 2, 3))


def conv2d_bwd_data_routed(
    gz: np.ndarray, w: np.ndarray, argmax: np.ndarray, y_below: np.ndarray, act: str
) -> np.ndarray:
    """The routed gradient of the layer below: y_below (N,C,H,W) is the convolution's input (the pooled,
    activated map of the layer below); gz (N,K,Hp,Wp) the routed gradient of this layer, argmax its routes.
    Returns gz_below (N,C,H,W) = [Σ_{k,i,j} gz[n,k,i,j]·w[k,c,r,s] at (2i + a//2 + r, 2j + a%2 + s)]·act'(y_below):
    the data gradient of the scattered gradient times the activation derivative below."""
    k, c, r, s = w.shape
    n, _, h, wd = y_below.shape
    _routed_shape(gz, argmax, h, wd, r, s, "conv2d_bwd_data_routed")
    hp, wp = gz.shape[2], gz.shape[3]
    dx = np.zeros(y_below.shape, dtype=np.result_type(gz, w))
    for a in range(4):
        ga = np.where(argmax == a, gz, 0)
        for u in range(r):
            for v in range(s):
                i0, j0 = a // 2 + u, a % 2 + v
                dx[:, :, i0 : i0 + 2 * hp : 2, j0 : j0 + 2 * wp : 2] += np.einsum("nkij,kc->ncij", ga, w[:, :, u, v])
    return dx * activation_grad(y_below, act)


def head_fwd(
    x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, w3: np.ndarray,
    b3: np.ndarray, act: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dense head C5 → F6 → output: x (N,I) (S4 flattened) → (h1 (N,H1), h2 (N,H2), logits (N,NC))."""
    h1 = dense_fwd(x, w1, b1, act)
    h2 = dense_fwd(h1, w2, b2, act)
    return h1, h2, dense_fwd(h2, w3, b3, "identity")


def head_train(
    x: np.ndarray, labels: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
    w3: np.ndarray, b3: np.ndarray, argmax: np.ndarray | None, yconv: np.ndarray | None, act: str,
    mode: str = "max",
) -> dict:
    """Forward, loss and backward of the dense head in one: x (N,C,Hp,Wp) is the pooled map S4 (read as
    (N, C·Hp·Wp)); yconv (N,C,H,W) and argmax (N,C,Hp,Wp) are the conv output C3 it pools and its argmax.

    Returns a dict: h1, h2, logits (the forward); loss_sum (Σ over rows of the per-row loss) and correct
    (rows whose first maximal logit is the label); dlogits; dw1, db1, dw2, db2, dw3, db3; dx (N,C,Hp,Wp),
    the gradient at S4; dz_conv (N,C,H,W) = pool2x2_bwd(dx) · act'(yconv), the gradient at C3's
    pre-activation. With ``yconv=None`` (max mode only: the routed step, docs/routed_backward.md) dz_conv
    instead has x's shape and holds the routed gradient gz = dx·act'(x): in max mode the pooled value is the
    activated output at the routed tap."""
    if yconv is None and mode != "max":
        raise ValueError("head_train: yconv=None (the routed gradient) needs max pooling")
    n = x.shape[0]
    xf = x.reshape(n, -1)
    h1, h2, logits = head_fwd(xf, w1, b1, w2, b2, w3, b3, act)
    loss, dlogits = softmax_xent(logits, labels)
    lab = np.asarray(labels).astype(np.int64)
    correct = int((np.argmax(logits, axis=1) == lab).sum())
    d2, dw3, db3 = dense_bwd(h2, w3, logits, dlogits, "identity")
    d1, dw2, db2 = dense_bwd(h1, w2, h2, d2, act)
    dxf, dw1, db1 = dense_bwd(xf, w1, h1, d1, act)
    dx = dxf.reshape(x.shape)
    if yconv is None:
        dz_conv = dx * activation_grad(x, act)
    else:
        dz_conv = pool2x2_bwd(dx, argmax, mode, out_shape=yconv.shape[2:]) * activation_grad(yconv, act)
    return {"h1": h1, "h2": h2, "logits": logits, "loss_sum": loss * n, "correct": correct, "dlogits": dlogits,
            "dw1": dw1, "db1": db1, "dw2": dw2, "db2": db2, "dw3": dw3, "db3": db3, "dx": dx, "dz_conv": dz_conv}


def lenet_fwd(
    images: np.ndarray, params: dict[str, np.ndarray], mean: float, std: float, act: str = "relu",
    mode: str = "max", pad: int = 2,
) -> np.ndarray:
    """The whole network's forward pass, uint8 images (N,28,28) → logits (N,10): normalisation, C1, S2,
    C3, S4, C5, F6, output. ``params`` maps c1.w, c1.b, ..., out.b to arrays (spec.views)."""
    n = images.shape[0]
    x, _ = batch_prepare(images, np.zeros(n, np.uint8), np.arange(n), 0, n, mean, std, pad=pad)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    a1 = conv2d_fwd(x, p["c1.w"], p["c1.b"], act)
    s2, _ = pool2x2_fwd(a1, mode)
    a3 = conv2d_fwd(s2, p["c3.w"], p["c3.b"], act)
    s4, _ = pool2x2_fwd(a3, mode)
    return head_fwd(s4.reshape(n, -1), p["c5.w"], p["c5.b"], p["f6.w"], p["f6.b"], p["out.w"], p["out.b"], act)[2]


# --------------------------------------------------------------- the four-kernel step (max pooling only)
#
# The ops of the four-kernel training step (docs/step4.md) as compositions of the ops above. Its conv weight
# gradients travel as per-group partial sums ``gpart`` (S, conv_prefix) laid out as the first conv_prefix floats
# of the flat parameter buffer (c1.w, c1.b, c3.w, c3.b and their alignment padding, which stays 0).


#: where step_bwd writes each conv gradient in a row of gpart, and the row's length: the flat parameter layout's
#: offsets of c1.w, c1.b, c3.w, c3.b (spec.param_layout, 128-byte aligned) and of c5.w (spec.conv_prefix). Written out
#: here because spec imports this module; tests/test_step4.py checks they equal the layout's.
STEP_BWD_OFFSETS = {"c1.w": 0, "c1.b": 160, "c3.w": 192, "c3.b": 2592}
STEP_BWD_WIDTH = 2624


def step_groups(batch: int, groups: int) -> list[slice]:
    """The image groups of ``step_bwd``: chunk = ceil(batch / groups); group s = images [s·chunk, min(batch,
    (s+1)·chunk)) (empty groups at the end when groups does not divide evenly give zero rows)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1 (got {groups})")
    chunk = -(-batch // groups)
    return [slice(min(batch, s * chunk), min(batch, (s + 1) * chunk)) for s in range(groups)]


def step_fwd(
    images: np.ndarray, labels: np.ndarray, perm: np.ndarray, state: np.ndarray, sched: np.ndarray, batch: int,
    params: dict[str, np.ndarray], mean: float, std: float, act: str, pad: int = 2,
) -> dict:
    """The forward half of the four-kernel step: batch_prepare (from the int32 step state's OFFSET, EPOCH, SEED,
    SHIFT), C1 + act + 2×2 max pool, C3 + act + 2×2 max pool, and this step's schedule row.

    Returns x (B,1,32,32), y (B,) int32, p1 (B,6,14,14), m1 (uint8 routes), p3 (B,16,5,5), m3 and srow (4,) =
    sched[clamp(STEP − SCHED_BASE, 0, T − 1)] (float64 except y, the routes and srow)."""
    from .stepstate import EPOCH, OFFSET, SCHED_BASE, SEED, SHIFT, STEP

    m = perm.shape[0]
    j = perm[(int(state[OFFSET]) + np.arange(batch)) % m]
    x, y = batch_prepare(images, labels, j, 0, batch, mean, std, seed=int(state[SEED]), epoch=int(state[EPOCH]),
                         max_shift=int(state[SHIFT]), pad=pad)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    a1 = conv2d_fwd(x, p["c1.w"], p["c1.b"], act)
    p1, m1 = pool2x2_fwd(a1, "max")
    a3 = conv2d_fwd(p1, p["c3.w"], p["c3.b"], act)
    p3, m3 = pool2x2_fwd(a3, "max")
    row = min(max(int(state[STEP]) - int(state[SCHED_BASE]), 0), sched.shape[0] - 1)
    return {"x": x, "y": y, "p1": p1, "m1": m1, "p3": p3, "m3": m3, "srow": np.array(sched[row], np.float32)}


def step_bwd(
    x: np.ndarray, p1: np.ndarray, gz3: np.ndarray, m3: np.ndarray, m1: np.ndarray, w3: np.ndarray, act: str,
    groups: int,
) -> np.ndarray:
    """The conv backward of the four-kernel step, from the head's routed gradient gz3 (B,16,5,5): per image group
    (``step_groups``) C3's weight and bias gradient (routed through m3), C3's routed data gradient gz1 =
    conv2d_bwd_data_routed(gz3, w3, m3, p1, act), and C1's weight and bias gradient from gz1 (routed through m1).
    Returns gpart (groups, conv_prefix) float64: row s holds group s's dw1, db1, dw3, db3 at their flat-layout
    offsets (spec.param_layout), zero elsewhere."""
    out = np.zeros((groups, STEP_BWD_WIDTH), np.float64)
    for s, g in enumerate(step_groups(x.shape[0], groups)):
        if g.start == g.stop:
            continue
        dw3, db3 = conv2d_bwd_weight_routed(p1[g], gz3[g], m3[g], w3.shape[2], w3.shape[3])
        gz1 = conv2d_bwd_data_routed(gz3[g], w3, m3[g], p1[g], act)
        dw1, db1 = conv2d_bwd_weight_routed(x[g], gz1, m1[g], 5, 5)
        for name, v in (("c1.w", dw1), ("c1.b", db1), ("c3.w", dw3), ("c3.b", db3)):
            off = STEP_BWD_OFFSETS[name]
            out[s, off : off + v.size] = np.ravel(v)
    return out


def step_reduce(gpart: np.ndarray) -> np.ndarray:
    """The conv gradients of the step from its partials: Σ_s gpart[s], in float32 and in group order (acc = 0;
    acc += gpart[0]; acc += gpart[1]; ...), as every backend's update adds them."""
    acc = np.zeros(gpart.shape[1], np.float32)
    for row in np.asarray(gpart, np.float32):
        acc += row
    return acc
