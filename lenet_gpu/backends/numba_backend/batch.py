"""batch_prepare: gather a training batch on the device, pad it and normalise it.

For r < B: j = perm[offset + r];
  x[r, 0] (B,1,HP,WP) float32 = (pad(images[j]) / 255 − mean) / std, written as p·scale + shift with
  scale = 1/(255·std), shift = −mean/std (the padding is pixel value 0, i.e. ``shift``);
  y[r] (B,) int32 = labels[j].
images (N,H,W) uint8, labels (N,) uint8, perm (M,) int32; the padding is centred ((HP−H)//2 rows
above, (WP−W)//2 columns left): 28×28 → 32×32 for LeNet.

Versions:
- v1: one thread per output pixel (grid-stride), consecutive threads write consecutive x columns;
  the thread of pixel (0, 0) of a row also writes its label.
"""

from __future__ import annotations

from numba import cuda, float32, int32

# ---------------------------------------------------------------------------------------------- v1


@cuda.jit
def batch_prepare_v1(images, labels, perm, offset, x, y, scale, shift):
    nb, hp, wp = x.shape[0], x.shape[2], x.shape[3]
    h, w = images.shape[1], images.shape[2]
    top = (hp - h) // 2
    left = (wp - w) // 2
    total = nb * hp * wp
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        px = idx % wp
        t = idx // wp
        py = t % hp
        r = t // hp
        j = perm[offset + r]
        iy = py - top
        ix = px - left
        v = shift
        if iy >= 0 and iy < h and ix >= 0 and ix < w:
            v = float32(images[j, iy, ix]) * scale + shift
        x[r, 0, py, px] = v
        if py == 0 and px == 0:
            y[r] = int32(labels[j])


# ------------------------------------------------------------------------------------ variant table

#: launch signature of every kernel (what the wrappers pass; compiled as-is by the compile checks)
SIGNATURES = {
    "batch_prepare_v1": "void(uint8[:,:,::1], uint8[::1], int32[::1], int32, float32[:,:,:,::1], int32[::1], "
    "float32, float32)",
}
KERNELS = {"batch_prepare_v1": batch_prepare_v1}
VARIANTS = {"batch_prepare": ("v1",)}
