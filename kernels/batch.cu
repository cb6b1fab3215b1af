// batch.cu -- gather a training batch on the device from the resident dataset, with its augmentation.
//
//   for r < B: j = perm[(OFFSET + r) mod M];  (dy, dx) = the shift of sample j in epoch EPOCH (below);
//   x[r,0,h,v] = p*scale + shift with p = images[j, h-pad-dy, v-pad-dx] (0 outside the image),
//   scale = 1/(255 std), shift = -mean/std;  y[r] = labels[j].
//
// OFFSET, EPOCH, SEED and SHIFT are words of the int32 step state (common.cuh ST_*), so the launch is the
// same at every step. The shift is reference.augment_shift, in uint32 arithmetic (modulo 2^32):
//   h = mix32(mix32(mix32(SEED) + EPOCH) + j);  span = 2 SHIFT + 1;
//   dy = (h & 0xFFFF) % span - SHIFT;  dx = (h >> 16) % span - SHIFT;  (0, 0) when SHIFT <= 0.
//
// Shapes: images (N,IH,IW) uint8, labels (N,) uint8, perm (M,) int32, state (8,) int32,
// x (B,1,IH+2*pad,IW+2*pad) float32, y (B,) int32.
//
// Versions:
//   batch_prepare_v1  one thread per output pixel (1-D grid of 256): consecutive threads write
//                     consecutive floats; each thread hashes its sample's shift (three mix32, cheaper than
//                     a second launch); the thread of pixel 0 of each image writes the label.
#include "common.cuh"

extern "C" __global__ void batch_prepare_v1(const unsigned char* __restrict__ images,
                                            const unsigned char* __restrict__ labels, const int* __restrict__ perm,
                                            const int* __restrict__ state, float* __restrict__ x,
                                            int* __restrict__ y, int M, int B, int IH, int IW, int pad,
                                            float scale, float shift) {
    const int XH = IH + 2 * pad, XW = IW + 2 * pad;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * XH * XW) return;
    const int v = idx % XW, h = (idx / XW) % XH, r = idx / (XH * XW);
    const int j = perm[pos_mod((long long)state[ST_OFFSET] + r, M)];
    const int max_shift = state[ST_SHIFT];
    int dy = 0, dx = 0;
    if (max_shift > 0) {
        const unsigned int span = 2u * (unsigned int)max_shift + 1u;
        const unsigned int h1 = mix32(mix32((unsigned int)state[ST_SEED]) + (unsigned int)state[ST_EPOCH]);
        const unsigned int hh = mix32(h1 + (unsigned int)j);
        dy = (int)((hh & 0xFFFFu) % span) - max_shift;
        dx = (int)((hh >> 16) % span) - max_shift;
    }
    const int ih = h - pad - dy, iw = v - pad - dx;
    float pix = 0.0f;
    if (ih >= 0 && ih < IH && iw >= 0 && iw < IW) pix = (float)images[((size_t)j * IH + ih) * IW + iw];
    x[idx] = pix * scale + shift;
    if (h == 0 && v == 0) y[r] = (int)labels[j];
}
