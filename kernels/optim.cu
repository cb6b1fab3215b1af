// optim.cu -- optimizer steps over the flat parameter buffer, float32, one launch each; and the step
// counter's advance.
//
//   adam  g' = g + wd*p; m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2; p -= lr*(m/bc1)/(sqrt(v/bc2) + eps)
//   sgd   m = momentum*m + g + wd*p; p -= lr*m
//   with [lr, bc1, bc2] = sched[clamp(STEP - SCHED_BASE, 0, T-1), 0..2] read from the device (the schedule
//   table of lenet_gpu.stepstate, bc = 1 - beta^t rounded once on the host), so the launch is the same
//   at every step.
//   step_advance  STEP += 1; STEP_IN_EPOCH += 1; OFFSET += batch; when STEP_IN_EPOCH reaches
//                 STEPS_PER_EPOCH: STEP_IN_EPOCH = 0, OFFSET = 0, EPOCH += 1 (stepstate.advance).
//
// Shapes: p, g, m, v (n,); sched (T,4) float32; state (8,) int32. Any n.
//
// Versions:
//   adam_step_v1, sgd_step_v1  one thread per element, grid-stride loop (elementwise, memory bound:
//                              consecutive threads touch consecutive floats).
//   adam_step_v2, sgd_step_v2  float4 loads and stores (16-byte transactions, a quarter of the
//                              instructions and threads); the buffers must be 16-byte aligned (the flat
//                              parameter buffer is); a scalar loop does the n % 4 tail.
//   step_advance_v1            one thread.
#include "common.cuh"
#include "optim_update.cuh"

// The schedule row of this step: [lr, bc1, bc2, 0].
__device__ __forceinline__ const float* sched_row(const float* sched, int T, const int* state) {
    long long i = (long long)state[ST_STEP] - (long long)state[ST_SCHED_BASE];
    i = i < 0 ? 0 : (i > T - 1 ? T - 1 : i);
    return sched + 4 * i;
}

extern "C" __global__ void adam_step_v1(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                        float* __restrict__ v, const float* __restrict__ sched,
                                        const int* __restrict__ state, int n, int T, float beta1, float beta2,
                                        float eps, float wd) {
    const float* row = sched_row(sched, T, state);
    const float lr = row[0], bc1 = row[1], bc2 = row[2];
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
                                       const float* __restrict__ sched,
                                       const int* __restrict__ state, int n, int T, float momentum, float wd) {
    const float lr = sched_row(sched, T, state)[0];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float mi = momentum * m[i] + g[i] + wd * p[i];
        m[i] = mi;
        p[i] -= lr * mi;
    }
}


extern "C" __global__ void adam_step_v2(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                        float* __restrict__ v, const float* __restrict__ sched,
                                        const int* __restrict__ state, int n, int T, float beta1, float beta2,
                                        float eps, float wd) {
    const float* row = sched_row(sched, T, state);
    const float lr = row[0], bc1 = row[1], bc2 = row[2];
    const int n4 = n / 4, stride = gridDim.x * blockDim.x;
    float4* p4 = reinterpret_cast<float4*>(p);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* m4 = reinterpret_cast<float4*>(m);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 pp = p4[i], mm = m4[i], vv = v4[i];
        const float4 gg = g4[i];
        adam1(pp.x, gg.x, mm.x, vv.x, lr, beta1, beta2, eps, wd, bc1, bc2);
        adam1(pp.y, gg.y, mm.y, vv.y, lr, beta1, beta2, eps, wd, bc1, bc2);
        adam1(pp.z, gg.z, mm.z, vv.z, lr, beta1, beta2, eps, wd, bc1, bc2);
        adam1(pp.w, gg.w, mm.w, vv.w, lr, beta1, beta2, eps, wd, bc1, bc2);
        p4[i] = pp;
        m4[i] = mm;
        v4[i] = vv;
    }
    for (int i = 4 * n4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)  // tail
        adam1(p[i], g[i], m[i], v[i], lr, beta1, beta2, eps, wd, bc1, bc2);
}


extern "C" __global__ void sgd_step_v2(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                       const float* __restrict__ sched,
                                       const int* __restrict__ state, int n, int T, float momentum, float wd) {
    const float lr = sched_row(sched, T, state)[0];
    const int n4 = n / 4, stride = gridDim.x * blockDim.x;
    float4* p4 = reinterpret_cast<float4*>(p);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* m4 = reinterpret_cast<float4*>(m);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 pp = p4[i], mm = m4[i];
        const float4 gg = g4[i];
        sgd1(pp.x, gg.x, mm.x, lr, momentum, wd);
        sgd1(pp.y, gg.y, mm.y, lr, momentum, wd);
        sgd1(pp.z, gg.z, mm.z, lr, momentum, wd);
        sgd1(pp.w, gg.w, mm.w, lr, momentum, wd);
        p4[i] = pp;
        m4[i] = mm;
    }
    for (int i = 4 * n4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        sgd1(p[i], g[i], m[i], lr, momentum, wd);
}

// One thread: the counters move on at the end of a step (the last launch of a training step).
extern "C" __global__ void step_advance_v1(int* __restrict__ state, int batch) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    state[ST_STEP] += 1;
    state[ST_OFFSET] += batch;
    if (++state[ST_STEP_IN_EPOCH] == state[ST_STEPS_PER_EPOCH]) {
        state[ST_STEP_IN_EPOCH] = 0;
        state[ST_OFFSET] = 0;
        state[ST_EPOCH] += 1;
    }
}
