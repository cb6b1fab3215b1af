// common.cuh -- helpers shared by every kernel file of lenet_gpu (CUDA C, NVRTC and the CPU harness).
//
// Activation codes match lenet_gpu.backends.base.ACT_CODES, pool codes POOL_CODES. Every activation
// derivative is written through the activated output y (DESIGN.md §3), so no backward kernel needs
// the pre-activation.
#pragma once

#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_TANH 2
#define ACT_LECUN_TANH 3
#define ACT_SIGMOID 4

#define POOL_MAX 0
#define POOL_AVG 1

#define LECUN_A 1.7159f
#define LECUN_S 0.666666667f

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// act(z) for an activation code (block-uniform, so the switch does not diverge).
__device__ __forceinline__ float act_fwd(float z, int act) {
    switch (act) {
        case ACT_RELU: return fmaxf(z, 0.0f);
        case ACT_TANH: return tanhf(z);
        case ACT_LECUN_TANH: return LECUN_A * tanhf(LECUN_S * z);
        case ACT_SIGMOID: return 1.0f / (1.0f + expf(-z));  // expf(+inf) -> 1/inf = 0: no NaN
        default: return z;
    }
}

// d act / d z written through the activated output y = act(z).
__device__ __forceinline__ float act_grad(float y, int act) {
    switch (act) {
        case ACT_RELU: return y > 0.0f ? 1.0f : 0.0f;
        case ACT_TANH: return 1.0f - y * y;
        case ACT_LECUN_TANH: return LECUN_S * (LECUN_A - y * y / LECUN_A);
        case ACT_SIGMOID: return y * (1.0f - y);
        default: return 1.0f;
    }
}
