// batch.cu -- gather a training batch on the device from the resident dataset.
//
//   for r < B: j = perm[offset + r];  x[r,0,h,v] = (pad(images[j])[h,v] / 255 - mean) / std,
//   computed as pixel*scale + shift with scale = 1/(255 std), shift = -mean/std (padding pixels are 0);
//   y[r] = labels[j].
//
// Shapes: images (N,IH,IW) uint8, labels (N,) uint8, perm (M,) int32, x (B,1,IH+2*PAD,IW+2*PAD), y (B,)
// int32. The caller checks offset + B <= M.
//
// Versions:
//   batch_prepare_v1  one thread per output pixel (1-D grid of 256): consecutive threads write
//                     consecutive floats; the thread of pixel 0 of each image writes the label.
#include "common.cuh"

extern "C" __global__ void batch_prepare_v1(const unsigned char* __restrict__ images,
                                            const unsigned char* __restrict__ labels, const int* __restrict__ perm,
                                            int offset, float* __restrict__ x, int* __restrict__ y, int B, int IH,
                                            int IW, int pad, float scale, float shift) {
    const int XH = IH + 2 * pad, XW = IW + 2 * pad;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * XH * XW) return;
    const int v = idx % XW, h = (idx / XW) % XH, r = idx / (XH * XW);
    const int j = perm[offset + r];
    const int ih = h - pad, iw = v - pad;
    float pix = 0.0f;
    if (ih >= 0 && ih < IH && iw >= 0 && iw < IW) pix = (float)images[((size_t)j * IH + ih) * IW + iw];
    x[idx] = pix * scale + shift;
    if (h == 0 && v == 0) y[r] = (int)labels[j];
}
