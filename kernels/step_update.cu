// step_update.cu -- the last op of the four-kernel training step (docs/step4.md): the conv gradients' partials
// added in a fixed order, the optimizer, and the step counter's advance, in one launch.
//
//   g[i] = sum_s gpart[s, i]  for i < NC (= spec.conv_prefix(), 2624 in LeNet-5), in float32, in group order
//          s = 0 .. S-1 starting from 0.0f (reference.step_reduce), written back into g; g's other entries
//          (head_train's gradients) are read as they are;
//   adam   g' = g + wd*p; m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2; p -= lr*(m/bc1)/(sqrt(v/bc2) + eps)
//   sgd    m = momentum*m + g + wd*p; p -= lr*m
//          with [lr, bc1, bc2] = srow[0..2], the schedule row step_fwd copied for this step: no block reads
//          the step counter, which this launch moves on (a block that advanced it could run before another
//          had read it: there is no grid-wide order inside one launch);
//   step_advance  thread 0 of block 0: STEP += 1; STEP_IN_EPOCH += 1; OFFSET += batch; when STEP_IN_EPOCH
//          reaches STEPS_PER_EPOCH: STEP_IN_EPOCH = 0, OFFSET = 0, EPOCH += 1 (optim.cu step_advance_v1).
//
// The arithmetic is optim.cu's adam_step_v2 / sgd_step_v2 (the same adam1 / sgd1 expressions), so with the
// same g the results equal adam_step's / sgd_step's bit for bit.
//
// Shapes: p, g, m, v (n,) float32, 16-byte aligned (the flat parameter buffers); gpart (S, NC) float32,
// 16-byte aligned, NC % 4 == 0, NC <= n; srow (4,) float32; state (8,) int32.
//
// Launch (CupyBackend.step_adam / step_sgd): adam_step_v2's grid: a thread per float4 of p, blocks of
// max(32, min(256, (ceil(n/4) / SMs) rounded down to warps)) threads, ceil(ceil(n/4) / block) blocks, grid-stride;
// a scalar loop does the n % 4 tail.
//
// Cost per step (estimated, not measured; LeNet-5: n = 61,824, NC = 2,624, S groups of step_bwd):
//   FLOPs  adam ~12 per parameter (+ S adds per conv parameter): 0.74 MFLOP; sgd 4 per parameter.
//   bytes  adam: p, m, v read and written, g read (24 + 4 = 28 B/parameter) + g written and gpart read for the
//          conv prefix (4 + 4 S B): 1.74 MB + 10.5 S KB; sgd: 20 B/parameter: 1.25 MB + 10.5 S KB.
//   H200   1.74 MB / 4.8 TB/s = 0.36 us of DRAM traffic (less: 1.7 MB stays in the 50 MB L2 between steps);
//          15,456 float4 threads = 161 blocks of 96 (one wave) -> the launch is latency-bound (launch overhead
//          + a chain of ~4 global loads, the divides and sqrt of 4 elements): ~3-4 us, plus the partial sums:
//          the 656 conv-prefix threads (7 blocks) each load S float4 rows of gpart in group order, S = 64 at
//          batch 64 and 256 at batch 4096 (step_groups on 132 SMs). Chain length: S / 8 rounds of L2 loads
//          (unrolled by 8) at ~0.15-0.25 us a round -> ~1-2 us more at batch 64, ~5-8 us more at batch 4096
//          (gpart 0.17 / 2.7 MB, from L2 where step_bwd just wrote it). Total ~4-6 us at batch 64, ~8-12 us at
//          batch 4096.
#include "common.cuh"
#include "optim_update.cuh"


// g's float4 item i (elements 4i .. 4i+3): the partials' sum where 4i < NC (NC % 4 == 0: an item is all in the
// prefix or all out of it), written back; else g as it is.
__device__ __forceinline__ float4 su_grad4(float4* __restrict__ g4, const float4* __restrict__ gpart4, int i, int NC4,
                                           int S) {
    if (i >= NC4) return g4[i];
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // S is 64 at batch 64 and 256 at batch 4096 on 132 SMs (step_groups): unrolled so that 8 independent loads
    // are in flight before their adds, which stay in group order (the same bits as the plain loop)
#pragma unroll 8
    for (int s = 0; s < S; ++s) {  // group order, from 0.0f: reference.step_reduce
        const float4 q = gpart4[(size_t)s * NC4 + i];
        acc.x += q.x;
        acc.y += q.y;
        acc.z += q.z;
        acc.w += q.w;
    }
    g4[i] = acc;
    return acc;
}

// The state's advance (optim.cu step_advance_v1), by one thread of the launch.
__device__ __forceinline__ void su_advance(int* __restrict__ state, int batch) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    state[ST_STEP] += 1;
    state[ST_OFFSET] += batch;
    if (++state[ST_STEP_IN_EPOCH] == state[ST_STEPS_PER_EPOCH]) {
        state[ST_STEP_IN_EPOCH] = 0;
        state[ST_OFFSET] = 0;
        state[ST_EPOCH] += 1;
    }
}

extern "C" __global__ void step_adam_v1(float* __restrict__ p, float* __restrict__ g, const float* __restrict__ gpart,
                                        float* __restrict__ m, float* __restrict__ v, const float* __restrict__ srow,
                                        int* __restrict__ state, int n, int NC, int S, float beta1, float beta2,
                                        float eps, float wd, int batch) {
    const float lr = srow[0], bc1 = srow[1], bc2 = srow[2];
    const int n4 = n / 4, NC4 = NC / 4, stride = gridDim.x * blockDim.x;
    float4* p4 = reinterpret_cast<float4*>(p);
    float4* g4 = reinterpret_cast<float4*>(g);
    const float4* gp4 = reinterpret_cast<const float4*>(gpart);
    float4* m4 = reinterpret_cast<float4*>(m);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 pp = p4[i], mm = m4[i], vv = v4[i];
        const float4 gg = su_grad4(g4, gp4, i, NC4, S);
        adam1(pp.x, gg.x, mm.x, vv.x, lr, beta1, beta2, eps, wd, bc1, bc2);
        adam1(pp.y, gg.y, mm.y, vv.y, lr, beta1, beta2, eps, wd, bc1, bc2);
        adam1(pp.z, gg.z, mm.z, vv.z, lr, beta1, beta2, eps, wd, bc1, bc2);
        adam1(pp.w, gg.w, mm.w, vv.w, lr, beta1, beta2, eps, wd, bc1, bc2);
        p4[i] = pp;
        m4[i] = mm;
        v4[i] = vv;
    }
    for (int i = 4 * n4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)  // tail (past NC: NC <= 4 n4)
        adam1(p[i], g[i], m[i], v[i], lr, beta1, beta2, eps, wd, bc1, bc2);
    su_advance(state, batch);
}

extern "C" __global__ void step_sgd_v1(float* __restrict__ p, float* __restrict__ g, const float* __restrict__ gpart,
                                       float* __restrict__ m, const float* __restrict__ srow, int* __restrict__ state,
                                       int n, int NC, int S, float momentum, float wd, int batch) {
    const float lr = srow[0];
    const int n4 = n / 4, NC4 = NC / 4, stride = gridDim.x * blockDim.x;
    float4* p4 = reinterpret_cast<float4*>(p);
    float4* g4 = reinterpret_cast<float4*>(g);
    const float4* gp4 = reinterpret_cast<const float4*>(gpart);
    float4* m4 = reinterpret_cast<float4*>(m);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 pp = p4[i], mm = m4[i];
        const float4 gg = su_grad4(g4, gp4, i, NC4, S);
        sgd1(pp.x, gg.x, mm.x, lr, momentum, wd);
        sgd1(pp.y, gg.y, mm.y, lr, momentum, wd);
        sgd1(pp.z, gg.z, mm.z, lr, momentum, wd);
        sgd1(pp.w, gg.w, mm.w, lr, momentum, wd);
        p4[i] = pp;
        m4[i] = mm;
    }
    for (int i = 4 * n4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        sgd1(p[i], g[i], m[i], lr, momentum, wd);
    su_advance(state, batch);
}
