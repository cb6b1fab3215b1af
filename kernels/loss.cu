// loss.cu -- softmax cross-entropy over a batch of logits, float32.
//
//   dlogits[n,c] = (softmax(logits[n])[c] - [c == label[n]]) / N
//   stats[row] = [sum_n (logsumexp(logits[n]) - logits[n,label[n]]), #rows whose first maximal logit is the
//   label] with row = STEP_IN_EPOCH mod S of the int32 step state (overwritten: one row per step, so the
//   host reads a chunk of steps with one copy, and a NaN names its step).
//
// Shapes: logits, dlogits (N,NC); labels (N,) int32; stats (S,2); state (8,) int32. Any N, NC.
//
// Versions:
//   softmax_xent_v1  one block of LOSS_THREADS threads: threads stride over rows (a row's max, sum and
//                    gradient are computed by one thread), then a fixed shared-memory tree adds the
//                    per-thread loss and correct counts: deterministic, no atomics, one launch.
//   softmax_xent_v2  one row per thread over ceil(N/LOSS_THREADS) blocks (a big batch no longer runs on one
//                    SM), block sums to a partial buffer, and the last block (a generation-tagged integer
//                    ticket, common.cuh: never relies on the previous launch having reset it; no float
//                    atomics) adds them in block order: still deterministic and one launch.
#include "common.cuh"

#ifndef LOSS_THREADS
#define LOSS_THREADS 256  // a power of two (tree reduction)
#endif
static_assert((LOSS_THREADS & (LOSS_THREADS - 1)) == 0 && LOSS_THREADS <= 1024, "LOSS_THREADS: a power of two <= 1024");

// Fixed-order tree over the block's LOSS_THREADS (loss, hit) pairs; thread 0 gets the sums.
__device__ __forceinline__ void xent_block_sum(float* s_loss, float* s_hit, float loss, float hit, int tid) {
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
}

extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
softmax_xent_v1(const float* __restrict__ logits, const int* __restrict__ labels, float* __restrict__ dlogits,
                float* __restrict__ stats, const int* __restrict__ state, int S, int N, int NC) {
    __shared__ float s_loss[LOSS_THREADS];
    __shared__ float s_hit[LOSS_THREADS];
    const int tid = threadIdx.x;
    const float inv_n = 1.0f / (float)N;
    float loss = 0.0f, hit = 0.0f;
    for (int n = tid; n < N; n += LOSS_THREADS) {
        float h;
        loss += xent_row(logits + (size_t)n * NC, labels[n], dlogits + (size_t)n * NC, 1, NC, inv_n, &h);
        hit += h;
    }
    xent_block_sum(s_loss, s_hit, loss, hit, tid);
    if (tid == 0) {
        float* row = stats_row(stats, S, state);
        row[0] = s_loss[0];
        row[1] = s_hit[0];
    }
}

// Grid ceil(N/LOSS_THREADS): one row per thread. Each block stores its (loss, hit) sums in partial[2*b..];
// the last block to arrive (ticket tagged with STEP) adds the partials in block order into the stats row.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS)
softmax_xent_v2(const float* __restrict__ logits, const int* __restrict__ labels, float* __restrict__ dlogits,
                float* __restrict__ stats, const int* __restrict__ state, float* partial,
                unsigned long long* ticket, int S, int N, int NC) {
    __shared__ float s_loss[LOSS_THREADS];
    __shared__ float s_hit[LOSS_THREADS];
    __shared__ bool s_last;
    const int tid = threadIdx.x, n = blockIdx.x * LOSS_THREADS + tid;
    float loss = 0.0f, hit = 0.0f;
    if (n < N)
        loss = xent_row(logits + (size_t)n * NC, labels[n], dlogits + (size_t)n * NC, 1, NC, 1.0f / (float)N, &hit);
    xent_block_sum(s_loss, s_hit, loss, hit, tid);
    const unsigned int gen = ticket_generation(state);
    if (tid == 0) {
        partial[2 * blockIdx.x] = s_loss[0];
        partial[2 * blockIdx.x + 1] = s_hit[0];
        __threadfence();  // the partials are visible device-wide before the ticket is taken
        s_last = ticket_take(ticket, gen, gridDim.x);
    }
    __syncthreads();
    if (s_last && tid == 0) {
        __threadfence();
        const volatile float* vp = partial;
        float l = 0.0f, h = 0.0f;
        for (int b = 0; b < (int)gridDim.x; ++b) {  // block order: deterministic
            l += vp[2 * b];
            h += vp[2 * b + 1];
        }
        float* row = stats_row(stats, S, state);
        row[0] = l;
        row[1] = h;
        ticket_reset(ticket, gen);
    }
}
