// optim.cu -- optimizer steps over the flat parameter buffer, float32, one launch each.
//
//   adam  g' = g + wd*p; m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2; p -= lr*(m/bc1)/(sqrt(v/bc2) + eps)
//         (bc1 = 1-b1^t, bc2 = 1-b2^t computed by the caller: per-step scalars are kernel arguments)
//   sgd   m = momentum*m + g + wd*p; p -= lr*m
//
// Shapes: p, g, m, v (n,). Any n.
//
// Versions:
//   adam_step_v1, sgd_step_v1  one thread per element, grid-stride loop (elementwise, memory bound:
//                              consecutive threads touch consecutive floats).
#include "common.cuh"

extern "C" __global__ void adam_step_v1(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                        float* __restrict__ v, int n, float lr, float beta1, float beta2,
                                        float eps, float wd, float bc1, float bc2) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float gi = g[i] + wd * p[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

extern "C" __global__ void sgd_step_v1(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                       int n, float lr, float momentum, float wd) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float mi = momentum * m[i] + g[i] + wd * p[i];
        m[i] = mi;
        p[i] -= lr * mi;
    }
}
