// common.cuh -- helpers shared by every kernel file of lenet_gpu (CUDA C, NVRTC and the CPU harness).
//
// Activation codes match lenet_gpu.backends.base.ACT_CODES, pool codes POOL_CODES. Every activation
// derivative is written through the activated output y (docs/DESIGN.md §3), so no backward kernel needs
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

// N (even) consecutive floats of shared memory at p, 8-byte aligned, into v as N/2 64-bit loads (LDS.64). The
// 2x2-pooled convolutions read a row of their window this way (6 floats from an even column of an even-pitched
// plane): half the load instructions of N 32-bit loads, and fewer shared-memory wavefronts. A warp's stride-2
// windows start on only 16 of the 32 banks, so the 32-bit loads replay 2-3 ways each; the 64-bit loads cover
// both banks of each pair, and cost at most as many wavefronts as one 32-bit load of the row.
template <int N>
__device__ __forceinline__ void load_row2(const float* p, float (&v)[N]) {
    static_assert(N % 2 == 0, "load_row2: an even number of floats");
#pragma unroll
    for (int j = 0; j < N; j += 2) {
        const float2 t = *reinterpret_cast<const float2*>(p + j);
        v[j] = t.x;
        v[j + 1] = t.y;
    }
}

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

// ------------------------------------------------------------------------------------- step state
// Words of the int32 step state (lenet_gpu.stepstate: STEP, SCHED_BASE, ...). Kernels read what changes
// from step to step from it, so no kernel argument changes from step to step.
#define ST_STEP 0
#define ST_SCHED_BASE 1
#define ST_STEP_IN_EPOCH 2
#define ST_OFFSET 3
#define ST_EPOCH 4
#define ST_STEPS_PER_EPOCH 5
#define ST_SEED 6
#define ST_SHIFT 7

// a mod m in [0, m) for any int a (m > 0).
__device__ __forceinline__ int pos_mod(long long a, int m) {
    const long long r = a % m;
    return (int)(r < 0 ? r + m : r);
}

// The row of ``stats`` (S rows of [loss sum, hit count]) a step writes: STEP_IN_EPOCH mod S (in bounds even
// for a stale state). The loss kernels and the fused head write it.
__device__ __forceinline__ float* stats_row(float* stats, int S, const int* state) {
    return stats + 2 * pos_mod(state[ST_STEP_IN_EPOCH], S);
}

// One row of the softmax cross-entropy: d[c * dstride] = (p_c - [c == lab]) * inv_n; returns the row's loss
// logsumexp(z) - z[lab]; *hit = 1 when the first maximal logit is the label, else 0.
__device__ __forceinline__ float xent_row(const float* __restrict__ z, int lab, float* __restrict__ d, int dstride,
                                          int NC, float inv_n, float* hit) {
    float m = z[0];
    int am = 0;
    for (int c = 1; c < NC; ++c)
        if (z[c] > m) { m = z[c]; am = c; }
    float se = 0.0f;
    for (int c = 0; c < NC; ++c) se += expf(z[c] - m);
    *hit = am == lab ? 1.0f : 0.0f;
    const float inv_se = 1.0f / se;
    for (int c = 0; c < NC; ++c) d[c * dstride] = (expf(z[c] - m) * inv_se - (c == lab ? 1.0f : 0.0f)) * inv_n;
    return logf(se) - (z[lab] - m);
}

// The 32-bit mixer "lowbias32" (reference.mix32): unsigned arithmetic is modulo 2^32 in C.
__device__ __forceinline__ unsigned int mix32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// ------------------------------------------------------------------------- last-block tickets
// A one-launch fixed-order reduction: every block writes its partial sums, then takes a ticket; the block
// that takes the last ticket adds the partials in block order. The ticket word is 64-bit: the generation
// (high 32 bits: the step state's STEP) and the count of blocks arrived (low 32 bits). The first block of
// a new generation replaces whatever count it finds (a stale count left by an aborted launch, or garbage)
// with 1 in one compare-and-swap, so a launch never relies on the previous one having reset the ticket;
// the last block still resets it (count 0), so repeated launches at the same STEP work too. Only a stale
// count of the very same generation (an aborted launch at this STEP) could mislead it.
// Call from one thread per block; returns true to the thread of the last block to arrive.
__device__ __forceinline__ bool ticket_take(unsigned long long* ticket, unsigned int gen, unsigned int blocks) {
    unsigned long long seen = atomicCAS(ticket, 0ull, 0ull);  // an atomic read (changes nothing)
    unsigned long long assumed, next;
    do {
        assumed = seen;
        next = (unsigned int)(assumed >> 32) == gen ? assumed + 1ull : (((unsigned long long)gen << 32) | 1ull);
        seen = atomicCAS(ticket, assumed, next);
    } while (seen != assumed);
    return (unsigned int)(next & 0xFFFFFFFFull) == blocks;
}

// The last block's reset: count 0 of this generation.
__device__ __forceinline__ void ticket_reset(unsigned long long* ticket, unsigned int gen) {
    atomicExch(ticket, (unsigned long long)gen << 32);
}

// The generation of a reduction: the state's STEP, or 0 without a state.
__device__ __forceinline__ unsigned int ticket_generation(const int* state) {
    return state ? (unsigned int)state[ST_STEP] : 0u;
}
