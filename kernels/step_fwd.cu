// step_fwd.cu -- the forward half of the four-kernel training step (docs/step4.md) in one launch:
//
//   batch_prepare  j = perm[(OFFSET + n) mod M]; (dy, dx) = the shift of sample j in epoch EPOCH (batch.cu);
//                  x[n,0,h,v] = pix * scale + shift, pix = images[j, h-2-dy, v-2-dx] (0 outside); y[n] = labels[j]
//   C1             a1 = act(conv5x5(x; c1.w) + c1.b)        (6,28,28), never stored
//   S2             p1, m1 = 2x2/2 max pool of a1             (6,14,14), m1 = row-major tap of the first maximum
//   C3             a3 = act(conv5x5(p1; c3.w) + c3.b)       (16,10,10), never stored
//   S4             p3, m3 = 2x2/2 max pool of a3             (16,5,5)
//   srow           block 0, thread 0: srow[0..3] = sched[clamp(STEP - SCHED_BASE, 0, T-1)]
//
// The arithmetic is that of batch.cu (x) and of conv2d.cu's conv2d_pool_fwd (each conv output: acc = 0; acc +=
// x * w over (channel, tap row, tap column) in that order; act(acc + bias); pool over the activated outputs, the
// first maximum in row-major tap order wins), so on the same compiler the outputs equal batch_prepare + 2x
// conv2d_pool_fwd(yconv=None) bit for bit.
//
// Shapes: images (N,28,28) uint8, labels (N,) uint8, perm (M,) int32, state (8,) int32, sched (T,4) float32,
// srow (4,), x (B,1,32,32), y (B,) int32, w1 (6,1,5,5), b1 (6,), p1 (B,6,14,14), m1 uint8, w3 (16,6,5,5), b3 (16,),
// p3 (B,16,5,5), m3 uint8. LeNet-5's geometry is compile-time (the SF_* constants): every tap loop unrolls and
// no index divides by a run-time value; the two run-time moduli of the gather (mod M, mod 2 SHIFT + 1; once per
// block) are computed without integer division (sf_mod: a double quotient, then corrected to exact).
//
// step_fwd_v1  one block per image, SF_THREADS = 256 threads. Shared memory (static, 19,288 B): C1's weights as
//              [25 taps][8] (6 filters + 2 zeros: one float4 + one float2 broadcast a tap), C3's as
//              [6 channels][25 taps][16 filters] (coalesced global reads, scattered), the biases, the image x
//              (32x32) and p1 (6x14x14), which C3 reads from shared memory. Register blocking as
//              lenet_fwd_v2: C1 a thread per pooled pixel x all 6 filters (its 2x2 window: 24 accumulators; 196
//              items), C3 a thread per pooled pixel x 2 filters (8 accumulators, a float2 of weights a tap; 200
//              items), each sliding a 2-row window of its input. Each stage is one round of the block (no loop:
//              with 128 threads and two C1 rounds NVVM hoisted C1's 150 loop-invariant weights into registers,
//              204 registers, and spilled under a 64-register bound). Barriers: 2. NVRTC 12 (sm_80, sm_90):
//              56 registers, no spills, no local memory, no integer div/rem.
//
// step_fwd_v2  large batch: two images a block, C3 with 4 x 4 register tiles (a float4 of weights feeding 16 FMAs);
//              the same bits as v1. The default runs it where ceil(B/2) blocks fill every SM's four slots (batch >=
//              1,055 on 132 SMs; CupyBackend.step_fwd_kernel). Its section below.
//
// v1's cost per image (estimated, not measured):
//   FLOPs  C1 6*28*28*25 = 117,600 FMA, C3 16*10*10*150 = 240,000 FMA: 357,600 FMA = 0.72 MFLOP (+ 1,576 act).
//   bytes  DRAM: image 784 + x 4,096 + y 4 + p1 4,704 + m1 1,176 + p3 1,600 + m3 400 = 12.8 KB; the weights
//          (10.3 KB a block) come from L2 (resident after the first blocks).
//   H200   (132 SMs, 4 warp-instructions/clock/SM, ~1.98 GHz; 4.8 TB/s) by issue slots: per thread C1 600 FMA +
//          ~86 shared loads, C3 1,200 FMA + ~370 shared loads; 7 warps busy in each stage -> ~17K
//          warp-instructions an image (C1 ~4.9K, C3 ~11K, staging ~1.2K). Since 2026-12-07 a window row is three
//          64-bit loads (load_row2): ~68 and ~260 shared loads, ~0.9K fewer warp-instructions an image (~16.2K),
//          and the window reads' wavefronts 5.0K -> 3.6K an image (bench/smem_banks.py).
//          batch 4096: 4096 x 17K = 70M warp-instructions / (132 x 4 x 1.98e9 /s) = ~67 us at full issue (4
//            blocks an SM by registers: 32 warps, 7.8 waves); DRAM 52 MB / 4.8 TB/s = 11 us: issue-bound,
//            ~70-90 us.
//          batch 64: 64 blocks on 64 of the 132 SMs, one 8-warp block an SM: latency-bound, the longest warp's
//            ~2.3K instructions at ~1.5-2 clocks each (8 warps hide little of the shared-load latency) = ~2 us
//            + the staging's global loads (~1-2 us) + launch: ~5-6 us.
#include "common.cuh"

#define SF_IH 28                      // image side
#define SF_X 32                       // padded side (pad 2)
#define SF_PAD 2
#define SF_K1 6                       // C1 filters
#define SF_R 5                        // filter side
#define SF_TAPS (SF_R * SF_R)         // 25
#define SF_C1 28                      // C1 output side
#define SF_P2 14                      // S2 side
#define SF_K3 16                      // C3 filters
#define SF_C3 10                      // C3 output side
#define SF_P4 5                       // S4 side
#define SF_KB3 2                      // C3 filters a thread
#define SF_THREADS 256                // >= each conv stage's items: one round each, no loop
#ifndef SF_MIN_BLOCKS
#define SF_MIN_BLOCKS 4               // blocks an SM the registers must allow (4 x 256 threads: <= 64 registers)
#endif

static_assert(SF_C1 == SF_X - SF_R + 1 && SF_P2 * 2 == SF_C1, "C1 geometry");
static_assert(SF_C3 == SF_P2 - SF_R + 1 && SF_P4 * 2 == SF_C3, "C3 geometry");
static_assert(SF_K3 % SF_KB3 == 0 && SF_KB3 == 2, "C3 filters a thread: one float2 of weights a tap");
static_assert(SF_P2 * SF_P2 <= SF_THREADS && (SF_K3 / SF_KB3) * SF_P4 * SF_P4 <= SF_THREADS, "one round a stage");

// a mod m in [0, m) for |a| < 2^52, m >= 1, without integer division: q = floor(a / m) in double (off by at most
// one), then corrected. Once per block.
__device__ __forceinline__ long long sf_mod(long long a, long long m) {
    long long r = a - (long long)floor((double)a / (double)m) * m;
    if (r < 0) r += m;
    if (r >= m) r -= m;
    return r;
}

// The first maximum of a 2x2 window of activated outputs v[0..3] (row-major taps), as conv2d.cu's pool_window.
__device__ __forceinline__ float sf_pool_max(const float (&v)[4], unsigned char* am) {
    float m = v[0];
    unsigned char a = 0;
#pragma unroll
    for (int t = 1; t < 4; ++t)
        if (v[t] > m) {
            m = v[t];
            a = (unsigned char)t;
        }
    *am = a;
    return m;
}

// acc[window output][filter] += input * w[filter] for the 2x2 window's four outputs (rows ra, rb; columns s, s+1)
template <int K>
__device__ __forceinline__ void sf_window(float (&acc)[4][K], const float (&ra)[SF_R + 1], const float (&rb)[SF_R + 1],
                                          int s, const float (&w)[K]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        acc[0][k] += ra[s] * w[k];
        acc[1][k] += ra[s + 1] * w[k];
        acc[2][k] += rb[s] * w[k];
        acc[3][k] += rb[s + 1] * w[k];
    }
}

// act(acc + b), pooled: the value and route of filter k's window go to pool[k * plane], route[k * plane]
template <int K>
__device__ __forceinline__ void sf_store(const float (&acc)[4][K], const float* bias, int act, float* s_out,
                                         float* __restrict__ pool, unsigned char* __restrict__ route, int plane) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = act_fwd(acc[u][k] + bias[k], act);
        unsigned char a = 0;
        const float pv = sf_pool_max(v, &a);
        if (s_out) s_out[k * plane] = pv;
        pool[k * plane] = pv;
        route[k * plane] = a;
    }
}

// The gather of batch row n (batch.cu's arithmetic) into s_x (32x32) and x[n], y[n]: threads tid, tid + nt, ...
__device__ __forceinline__ void sf_gather(const unsigned char* __restrict__ images,
                                          const unsigned char* __restrict__ labels, const int* __restrict__ perm,
                                          const int* __restrict__ state, int n, int M, float scale, float shift,
                                          float* s_x, float* __restrict__ x, int* __restrict__ y, int tid, int nt) {
    const int j = perm[sf_mod((long long)state[ST_OFFSET] + n, M)];
    const int max_shift = state[ST_SHIFT];
    int dy = 0, dx = 0;
    if (max_shift > 0) {
        const unsigned int span = 2u * (unsigned int)max_shift + 1u;
        const unsigned int h1 = mix32(mix32((unsigned int)state[ST_SEED]) + (unsigned int)state[ST_EPOCH]);
        const unsigned int hh = mix32(h1 + (unsigned int)j);
        dy = (int)sf_mod(hh & 0xFFFFu, span) - max_shift;
        dx = (int)sf_mod(hh >> 16, span) - max_shift;
    }
    const unsigned char* img = images + (size_t)j * (SF_IH * SF_IH);
    float* xo = x + (size_t)n * (SF_X * SF_X);
    for (int t = tid; t < SF_X * SF_X; t += nt) {
        const int ih = t / SF_X - SF_PAD - dy, iw = t % SF_X - SF_PAD - dx;
        float pix = 0.0f;
        if (ih >= 0 && ih < SF_IH && iw >= 0 && iw < SF_IH) pix = (float)img[ih * SF_IH + iw];
        const float val = pix * scale + shift;
        s_x[t] = val;
        xo[t] = val;
    }
    if (tid == 0) y[n] = (int)labels[j];
}

// The weights into shared memory: C1's as [tap][8], C3's read in their own order (coalesced) and scattered to
// [channel*tap][filter]; the biases
__device__ __forceinline__ void sf_stage_weights(const float* __restrict__ w1, const float* __restrict__ b1,
                                                 const float* __restrict__ w3, const float* __restrict__ b3,
                                                 float* s_w1, float* s_b1, float* s_w3, float* s_b3, int tid, int nt) {
    for (int t = tid; t < SF_TAPS * 8; t += nt) {
        const int tap = t / 8, k = t % 8;
        s_w1[t] = k < SF_K1 ? w1[k * SF_TAPS + tap] : 0.0f;
    }
    for (int t = tid; t < SF_K3 * SF_K1 * SF_TAPS; t += nt) {
        const int k = t / (SF_K1 * SF_TAPS), ct = t - k * (SF_K1 * SF_TAPS);
        s_w3[ct * SF_K3 + k] = w3[t];
    }
    if (tid < SF_K1) s_b1[tid] = b1[tid];
    if (tid < SF_K3) s_b3[tid] = b3[tid];
}

static_assert(SF_X % 2 == 0 && SF_P2 % 2 == 0 && (SF_P2 * SF_P2) % 2 == 0, "load_row2 needs even pitches");

// C1 + act + pool of pooled pixel `it` (< 14*14) of one image, all 6 filters: s_x the image (32x32), s_p1 and p1o /
// m1o its S2 planes (shared and global), a 2-row window of the input slid down the 5 tap rows
__device__ __forceinline__ void sf_c1(const float* s_x, int it, const float* s_w1, const float* s_b1, int act,
                                      float* s_p1, float* __restrict__ p1o, unsigned char* __restrict__ m1o) {
    constexpr int PL2 = SF_P2 * SF_P2;
    const int ph = it / SF_P2, pw = it - ph * SF_P2;
    const float* xin = s_x + 2 * ph * SF_X + 2 * pw;
    float acc[4][SF_K1];
#pragma unroll
    for (int k = 0; k < SF_K1; ++k) acc[0][k] = acc[1][k] = acc[2][k] = acc[3][k] = 0.0f;
    float ra[SF_R + 1], rb[SF_R + 1];
    load_row2(xin, ra);  // 8-byte aligned: even column and pitch, s_x 16-byte aligned
#pragma unroll
    for (int r = 0; r < SF_R; ++r) {
        load_row2(xin + (r + 1) * SF_X, rb);
#pragma unroll
        for (int s = 0; s < SF_R; ++s) {
            const float4 wa = *reinterpret_cast<const float4*>(s_w1 + (r * SF_R + s) * 8);
            const float2 wb = *reinterpret_cast<const float2*>(s_w1 + (r * SF_R + s) * 8 + 4);
            const float w[SF_K1] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y};
            sf_window<SF_K1>(acc, ra, rb, s, w);
        }
#pragma unroll
        for (int c = 0; c <= SF_R; ++c) ra[c] = rb[c];
    }
    sf_store<SF_K1>(acc, s_b1, act, s_p1 + it, p1o + it, m1o + it, PL2);
}

// KB of C3's filters a tap as one vector load from s_w3's [channel*tap][filter] row
template <int KB>
__device__ __forceinline__ void sf_weights(const float* p, float (&w)[KB]);
template <>
__device__ __forceinline__ void sf_weights<2>(const float* p, float (&w)[2]) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    w[0] = v.x;
    w[1] = v.y;
}
template <>
__device__ __forceinline__ void sf_weights<4>(const float* p, float (&w)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
}

// C3 + act + pool of pooled pixel pp (< 5*5) and filters KB*kg .. KB*kg + KB-1 of one image: s_p1 its S2 (6x14x14),
// p3o / m3o its S4 planes
template <int KB>
__device__ __forceinline__ void sf_c3(const float* s_p1, int kg, int pp, const float* s_w3, const float* s_b3,
                                      int act, float* __restrict__ p3o, unsigned char* __restrict__ m3o) {
    constexpr int PL2 = SF_P2 * SF_P2, PL4 = SF_P4 * SF_P4;
    const int ph = pp / SF_P4, pw = pp - ph * SF_P4;
    float acc[4][KB];
#pragma unroll
    for (int k = 0; k < KB; ++k) acc[0][k] = acc[1][k] = acc[2][k] = acc[3][k] = 0.0f;
    const float* s2 = s_p1 + 2 * ph * SF_P2 + 2 * pw;
#pragma unroll 1
    for (int c = 0; c < SF_K1; ++c) {
        const float* xin = s2 + c * PL2;
        const float* wc = s_w3 + c * SF_TAPS * SF_K3 + KB * kg;
        float ra[SF_R + 1], rb[SF_R + 1];
        load_row2(xin, ra);  // 8-byte aligned: even column, even pitch and planes, s_p1 16-byte aligned
#pragma unroll
        for (int r = 0; r < SF_R; ++r) {
            load_row2(xin + (r + 1) * SF_P2, rb);
#pragma unroll
            for (int s = 0; s < SF_R; ++s) {
                float w[KB];
                sf_weights<KB>(wc + (r * SF_R + s) * SF_K3, w);
                sf_window<KB>(acc, ra, rb, s, w);
            }
#pragma unroll
            for (int q = 0; q <= SF_R; ++q) ra[q] = rb[q];
        }
    }
    const int o = KB * kg * PL4 + pp;
    sf_store<KB>(acc, s_b3 + KB * kg, act, nullptr, p3o + o, m3o + o, PL4);
}

// this step's schedule row (the update reads it: it never reads the counter); block 0, thread 0
__device__ __forceinline__ void sf_sched_row(const int* __restrict__ state, const float* __restrict__ sched,
                                             float* __restrict__ srow, int T) {
    long long i = (long long)state[ST_STEP] - (long long)state[ST_SCHED_BASE];
    i = i < 0 ? 0 : (i > T - 1 ? T - 1 : i);
#pragma unroll
    for (int c = 0; c < 4; ++c) srow[c] = sched[4 * i + c];
}

extern "C" __global__ void __launch_bounds__(SF_THREADS, SF_MIN_BLOCKS)
step_fwd_v1(const unsigned char* __restrict__ images, const unsigned char* __restrict__ labels,
            const int* __restrict__ perm, const int* __restrict__ state, const float* __restrict__ sched,
            float* __restrict__ srow, float* __restrict__ x, int* __restrict__ y, const float* __restrict__ w1,
            const float* __restrict__ b1, float* __restrict__ p1, unsigned char* __restrict__ m1,
            const float* __restrict__ w3, const float* __restrict__ b3, float* __restrict__ p3,
            unsigned char* __restrict__ m3, int M, int T, int act, float scale, float shift) {
    __shared__ __align__(16) float s_w1[SF_TAPS * 8];             // [tap][8]: 6 filters, 2 zeros
    __shared__ __align__(16) float s_w3[SF_K1 * SF_TAPS * SF_K3];  // [channel][tap][filter]
    __shared__ float s_b1[SF_K1];
    __shared__ float s_b3[SF_K3];
    __shared__ __align__(16) float s_x[SF_X * SF_X];
    __shared__ __align__(16) float s_p1[SF_K1 * SF_P2 * SF_P2];
    const int n = blockIdx.x, tid = threadIdx.x;
    if (n == 0 && tid == 0) sf_sched_row(state, sched, srow, T);
    sf_stage_weights(w1, b1, w3, b3, s_w1, s_b1, s_w3, s_b3, tid, SF_THREADS);
    // the gather: every thread computes the image's sample and shift (no barrier needed)
    sf_gather(images, labels, perm, state, n, M, scale, shift, s_x, x, y, tid, SF_THREADS);
    __syncthreads();

    // C1 + act + pool -> p1 (shared and global), m1: a thread per pooled pixel, all 6 filters
    constexpr int PL2 = SF_P2 * SF_P2;
    if (tid < PL2) sf_c1(s_x, tid, s_w1, s_b1, act, s_p1, p1 + (size_t)n * SF_K1 * PL2, m1 + (size_t)n * SF_K1 * PL2);
    __syncthreads();

    // C3 + act + pool -> p3, m3: a thread per (2 filters, pooled pixel)
    constexpr int PL4 = SF_P4 * SF_P4, KG = SF_K3 / SF_KB3;
    if (tid < KG * PL4) {
        const int kg = tid / PL4, pp = tid - kg * PL4;
        sf_c3<SF_KB3>(s_p1, kg, pp, s_w3, s_b3, act, p3 + (size_t)n * SF_K3 * PL4, m3 + (size_t)n * SF_K3 * PL4);
    }
}

// ------------------------------------------------------------------------------------------ v2: large batch
// SF2_IMGS (2) images a block: the weights staged once for both (half v1's staging and L2 reads an image); C1 over
// both images' 392 pooled pixels in two rounds of the block (a barrier between: it keeps NVVM from hoisting C1's 150
// shared weights into registers across the rounds); C3 a thread per (image, pooled pixel, 4 filters): a 4 x 4
// register tile, a float4 of weights a tap feeding 16 FMAs (v1: a float2 feeding 8), 200 items in one round. The
// same sums in the same order as v1 (each output: channel, tap row, tap column from 0; bias and act last; the
// first maximum), so the same bits. Grid ceil(B / SF2_IMGS); a last block of one image leaves its second idle.
// Cost per image (estimated, not measured; H200 as v1): ~15.8 K warp-instructions (v1 ~17.5 K): C3 7 warps x ~2.9 K
// for two images (~10.1 K an image, v1 ~11.2 K), C1 13 warp-rounds x ~790 for two (~5.1 K, v1 ~5.5 K), staging
// ~0.6 K (v1 ~0.8 K); the 64-bit window rows take ~0.5 K off (~15.3 K). Batch 4096: 2,048 blocks, 4 an SM by
// registers: ~60-80 us (v1 ~70-90 us) by issue slots.
// Shared memory (static): v1's weights + 2 images' x and p1: 28,088 B. NVRTC 12 (sm_80, sm_90): 64 registers,
// no spills.
#define SF2_IMGS 2
static_assert(SF2_IMGS * SF_P2 * SF_P2 <= 2 * SF_THREADS, "C1: two rounds of the block");
static_assert(SF2_IMGS * (SF_K3 / 4) * SF_P4 * SF_P4 <= SF_THREADS, "C3: one round of the block");

extern "C" __global__ void __launch_bounds__(SF_THREADS, SF_MIN_BLOCKS)
step_fwd_v2(const unsigned char* __restrict__ images, const unsigned char* __restrict__ labels,
            const int* __restrict__ perm, const int* __restrict__ state, const float* __restrict__ sched,
            float* __restrict__ srow, float* __restrict__ x, int* __restrict__ y, const float* __restrict__ w1,
            const float* __restrict__ b1, float* __restrict__ p1, unsigned char* __restrict__ m1,
            const float* __restrict__ w3, const float* __restrict__ b3, float* __restrict__ p3,
            unsigned char* __restrict__ m3, int M, int T, int act, float scale, float shift, int B) {
    __shared__ __align__(16) float s_w1[SF_TAPS * 8];
    __shared__ __align__(16) float s_w3[SF_K1 * SF_TAPS * SF_K3];
    __shared__ float s_b1[SF_K1];
    __shared__ float s_b3[SF_K3];
    __shared__ __align__(16) float s_x[SF2_IMGS][SF_X * SF_X];
    __shared__ __align__(16) float s_p1[SF2_IMGS][SF_K1 * SF_P2 * SF_P2];
    constexpr int PL2 = SF_P2 * SF_P2, PL4 = SF_P4 * SF_P4;
    const int n0 = blockIdx.x * SF2_IMGS, tid = threadIdx.x;
    const int ni = B - n0 < SF2_IMGS ? B - n0 : SF2_IMGS;  // images in this block (block-uniform)
    if (n0 == 0 && tid == 0) sf_sched_row(state, sched, srow, T);
    sf_stage_weights(w1, b1, w3, b3, s_w1, s_b1, s_w3, s_b3, tid, SF_THREADS);
#pragma unroll 1
    for (int im = 0; im < ni; ++im)
        sf_gather(images, labels, perm, state, n0 + im, M, scale, shift, s_x[im], x, y, tid, SF_THREADS);

    // C1: items it = image * 196 + pooled pixel, in rounds of the block (every thread runs every round: barriers)
    constexpr int ROUNDS = (SF2_IMGS * PL2 + SF_THREADS - 1) / SF_THREADS;
#pragma unroll 1
    for (int round = 0; round < ROUNDS; ++round) {
        __syncthreads();  // round 0: the gather's; then: keeps the weights' loads inside the round
        const int it = round * SF_THREADS + tid, im = it / PL2, px = it - im * PL2;
        if (it < SF2_IMGS * PL2 && im < ni) {
            const size_t o = (size_t)(n0 + im) * SF_K1 * PL2;
            sf_c1(s_x[im], px, s_w1, s_b1, act, s_p1[im], p1 + o, m1 + o);
        }
    }
    __syncthreads();

    // C3: items it = (image, filter group of 4, pooled pixel)
    constexpr int KG = SF_K3 / 4;
    if (tid < SF2_IMGS * KG * PL4) {
        const int im = tid / (KG * PL4), r = tid - im * (KG * PL4), kg = r / PL4, pp = r - kg * PL4;
        if (im < ni) {
            const size_t o = (size_t)(n0 + im) * SF_K3 * PL4;
            sf_c3<4>(s_p1[im], kg, pp, s_w3, s_b3, act, p3 + o, m3 + o);
        }
    }
}
