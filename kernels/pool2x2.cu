// pool2x2.cu -- 2x2 subsampling with stride 2 (max with argmax, or mean), NCHW, float32.
//
//   forward   y[n,c,i,j] = max or mean of x[n,c,2i..2i+1,2j..2j+1]; for max, argmax[n,c,i,j] (uint8) =
//             the row-major tap 0..3 of the first maximum. avg leaves argmax untouched.
//   backward  dz[n,c,h,v] = route(dy)[n,c,h,v] * act'(yconv[n,c,h,v]): dy goes to the argmax tap (max)
//             or dy/4 to every tap (avg); taps outside every window (odd trailing row/column) get 0.
//             The derivative of the activation of the convolution that produced yconv is fused here.
//
// Shapes: x, yconv, dz (N,C,H,W); y, argmax, dy (N,C,H/2,W/2). Any sizes (N*C*H*W < 2^31).
//
// Versions:
//   pool2x2_fwd_v1  one thread per output window (1-D grid of 256).
//   pool2x2_bwd_v1  one thread per input-gradient element: a gather, so no atomics and no zero-fill
//                   launch; consecutive threads read and write consecutive elements.
#include "common.cuh"

extern "C" __global__ void pool2x2_fwd_v1(const float* __restrict__ x, float* __restrict__ y,
                                          unsigned char* __restrict__ argmax, int NC, int H, int W, int mode) {
    const int Ho = H / 2, Wo = W / 2;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= NC * Ho * Wo) return;
    const int j = idx % Wo, i = (idx / Wo) % Ho, nc = idx / (Ho * Wo);
    const float* p = x + ((size_t)nc * H + 2 * i) * W + 2 * j;
    const float v0 = p[0], v1 = p[1], v2 = p[W], v3 = p[W + 1];
    if (mode == POOL_AVG) {
        y[idx] = (v0 + v1 + v2 + v3) * 0.25f;
        return;
    }
    float m = v0;
    unsigned char a = 0;
    if (v1 > m) { m = v1; a = 1; }
    if (v2 > m) { m = v2; a = 2; }
    if (v3 > m) { m = v3; a = 3; }
    y[idx] = m;
    argmax[idx] = a;
}

extern "C" __global__ void pool2x2_bwd_v1(const float* __restrict__ dy, const unsigned char* __restrict__ argmax,
                                          const float* __restrict__ yconv, float* __restrict__ dz, int NC, int H,
                                          int W, int mode, int act) {
    const int Ho = H / 2, Wo = W / 2;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= NC * H * W) return;
    const int v = idx % W, h = (idx / W) % H, nc = idx / (H * W);
    const int i = h >> 1, j = v >> 1;
    float g = 0.0f;
    if (i < Ho && j < Wo) {
        const int o = (nc * Ho + i) * Wo + j;
        if (mode == POOL_AVG) g = dy[o] * 0.25f;
        else if (argmax[o] == (unsigned char)(((h & 1) << 1) | (v & 1))) g = dy[o];
    }
    dz[idx] = g * act_grad(yconv[idx], act);
}
