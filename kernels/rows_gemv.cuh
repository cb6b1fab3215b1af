// rows_gemv.cuh -- a dense layer over the few rows a block holds in shared memory, one warp per group of outputs
// (used by the fused kernels: head.cu, lenet_fwd.cu).
//
//   out[r][o] = act(bias[o] + sum_k in[r][k] * W[o][k])     r < R (the block's rows), o < O, k < K;  W (O,K) global
//
// A warp takes F consecutive outputs at a time; its lanes stride k, so each load of W is one coalesced row segment
// (read through the read-only cache) and feeds R FMAs (one per row). Each lane ends with R*F partial sums; a
// butterfly transpose-reduction gives every lane the warp-wide total of one of them in R*F - 1 + log2(32/(R*F))
// shuffles (a plain per-value shuffle reduction would take 5*R*F). The tree is fixed: bit-for-bit repeatable.
#pragma once
#include "common.cuh"

// One level of the transpose-reduction: keep half of the values (the upper half on lanes with bit OFF set), send the
// other half to the partner lane (lane ^ OFF), which keeps that half, and add what it sends.
template <int N, int OFF>
__device__ __forceinline__ void transpose_level(float (&v)[N], int lane) {
    constexpr int KEEP = OFF * N / 32;
    const bool up = (lane & OFF) != 0;
#pragma unroll
    for (int k = 0; k < KEEP; ++k) {
        const float send = up ? v[k] : v[k + KEEP];
        const float keep = up ? v[k + KEEP] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
}

// Warp-wide sums of the N (a power of two <= 32) partial sums of every lane: returns, on lane l, the sum over all
// lanes of value l*N/32. log2(N) transpose levels leave lane l with a partial of value l*N/32 only; a plain
// butterfly over the 32/N lanes sharing a value finishes (both partners add the same two numbers: equal results).
template <int N>
__device__ __forceinline__ float warp_transpose_sum(float (&v)[N], int lane) {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N: a power of two <= 32");
    if constexpr (N >= 2) transpose_level<N, 16>(v, lane);
    if constexpr (N >= 4) transpose_level<N, 8>(v, lane);
    if constexpr (N >= 8) transpose_level<N, 4>(v, lane);
    if constexpr (N >= 16) transpose_level<N, 2>(v, lane);
    if constexpr (N >= 32) transpose_level<N, 1>(v, lane);
    float s = v[0];
#pragma unroll
    for (int off = 16 / N; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}

// The layer for R rows held in shared memory: s_in[r * in_stride + k] (rows the caller does not need may hold
// anything finite). Writes s_out[r * out_stride + o] for every r < R (when s_out is not null) and
// g_out[r * O + o] for r < nr (when g_out is not null). Call with the whole block (warp-uniform loops: every lane
// reaches every shuffle); the caller puts a barrier between layers.
// U: the k loop's unroll (default: 4 where registers allow, else 1; lenet_fwd_v3 passes its own).
template <int R, int F, int U = (R * F * F <= 32 ? 4 : 1)>
__device__ __forceinline__ void rows_gemv(const float* __restrict__ Wt, const float* __restrict__ bias, int O, int K,
                                          const float* s_in, int in_stride, float* s_out, int out_stride,
                                          float* __restrict__ g_out, int nr, int act) {
    constexpr int N = R * F, LANES = 32 / N;  // LANES: lanes that end up holding the same value
    static_assert(N <= 32, "R * F <= 32");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o0 = warp * F; o0 < O; o0 += nwarps * F) {
        float v[N];
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = 0.0f;
        const float* wb = Wt + (size_t)o0 * K;
        const int last = O - 1 - o0;  // outputs past O re-read the last row (their sums are not written)
#pragma unroll(U)  // more loads in flight where registers allow (more unrolled, they spill)
        for (int k = lane; k < K; k += 32) {
            float xin[R];
#pragma unroll
            for (int r = 0; r < R; ++r) xin[r] = s_in[r * in_stride + k];
#pragma unroll
            for (int f = 0; f < F; ++f) {
                const float w = __ldg(wb + (size_t)min(f, last) * K + k);
#pragma unroll
                for (int r = 0; r < R; ++r) v[r * F + f] = fmaf(xin[r], w, v[r * F + f]);
            }
        }
        const float sum = warp_transpose_sum<N>(v, lane);
        const int val = lane / LANES, r = val / F, o = o0 + val % F;
        if (lane % LANES == 0 && o < O) {
            const float y = act_fwd(sum + bias[o], act);
            if (s_out != nullptr) s_out[r * out_stride + o] = y;
            if (g_out != nullptr && r < nr) g_out[(size_t)r * O + o] = y;
        }
    }
}
