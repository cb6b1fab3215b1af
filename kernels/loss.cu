// loss.cu -- softmax cross-entropy over a batch of logits, float32.
//
//   dlogits[n,c] = (softmax(logits[n])[c] - [c == label[n]]) / N
//   stats[0] += sum_n (logsumexp(logits[n]) - logits[n,label[n]]);  stats[1] += #rows whose first maximal
//   logit is the label. The host divides by N when it logs (one read per logging interval).
//
// Shapes: logits, dlogits (N,NC); labels (N,) int32; stats (2,). Any N, NC.
//
// Versions:
//   softmax_xent_v1  one block of LOSS_THREADS threads: threads stride over rows (a row's max, sum and
//                    gradient are computed by one thread), then a fixed shared-memory tree adds the
//                    per-thread loss and correct counts: deterministic, no atomics, one launch.
#include "common.cuh"

#ifndef LOSS_THREADS
#define LOSS_THREADS 256  // a power of two (tree reduction)
#endif
static_assert((LOSS_THREADS & (LOSS_THREADS - 1)) == 0 && LOSS_THREADS <= 1024, "LOSS_THREADS: a power of two <= 1024");

extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
softmax_xent_v1(const float* __restrict__ logits, const int* __restrict__ labels, float* __restrict__ dlogits,
                float* __restrict__ stats, int N, int NC) {
    __shared__ float s_loss[LOSS_THREADS];
    __shared__ float s_hit[LOSS_THREADS];
    const int tid = threadIdx.x;
    const float inv_n = 1.0f / (float)N;
    float loss = 0.0f, hit = 0.0f;
    for (int n = tid; n < N; n += LOSS_THREADS) {
        const float* z = logits + (size_t)n * NC;
        float* d = dlogits + (size_t)n * NC;
        const int lab = labels[n];
        float m = z[0];
        int am = 0;
        for (int c = 1; c < NC; ++c)
            if (z[c] > m) { m = z[c]; am = c; }
        float se = 0.0f;
        for (int c = 0; c < NC; ++c) se += expf(z[c] - m);
        loss += logf(se) - (z[lab] - m);
        hit += am == lab ? 1.0f : 0.0f;
        const float inv_se = 1.0f / se;
        for (int c = 0; c < NC; ++c) d[c] = (expf(z[c] - m) * inv_se - (c == lab ? 1.0f : 0.0f)) * inv_n;
    }
    s_loss[tid] = loss;
    s_hit[tid] = hit;
    __syncthreads();
    for (int half = LOSS_THREADS / 2; half > 0; half >>= 1) {
        if (tid < half) {
            s_loss[tid] += s_loss[tid + half];
            s_hit[tid] += s_hit[tid + half];
        }
        __syncthreads();
    }
    if (tid == 0) {
        stats[0] += s_loss[0];
        stats[1] += s_hit[0];
    }
}
