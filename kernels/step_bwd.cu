// step_bwd.cu -- the conv backward of the four-kernel training step (docs/step4.md), ONE launch.
//
// What it computes (reference.step_bwd). From the head's routed gradient gz3 (B,16,5,5) and the forward's routes
// m3 (B,16,5,5) / m1 (B,6,14,14) (uint8, 0..3 row-major in the 2x2 window), for each image group
// s = images [s*chunk, min(B, (s+1)*chunk)):
//   dw3[k,c,r,s] = sum gz3[n,k,i,j] * p1[n,c,2i+a/2+r,2j+a%2+s]  (a = m3[n,k,i,j]);  db3[k] = sum gz3[n,k,:,:]
//   gz1[n,c,h,v] = (sum over the routed C3 outputs (p,q) within the filter's reach of gz3 * w3[k,c,h-p,v-q])
//                  * act'(p1[n,c,h,v])          -- kept in shared memory only, never written to global memory
//   dw1[k,0,r,s] = sum gz1[n,k,i,j] * x[n,0,2i+a/2+r,2j+a%2+s]    (a = m1[n,k,i,j]);  db1[k] = sum gz1[n,k,:,:]
// and writes row s of gpart (S, 2624): dw1 at [0,150), db1 at [160,166), dw3 at [192,2592), db3 at [2592,2608),
// 0 in the padding columns [150,160), [166,192), [2608,2624) (spec.param_layout; spec.conv_prefix() = 2624).
// An empty group (s*chunk >= B) writes a row of zeros.
//
// Launch: grid (S, 1, 1), block (SB_THREADS = 256, 1, 1), no dynamic shared memory; scalars B, chunk =
// ceil(B / S) (computed on the host: no index divides by a run-time value; all LeNet geometry is compile-time,
// every tap loop unrolls, divisions by 14, 25, 150 ... are by constants).
//
// Accumulators and determinism. Every output has exactly one owner thread that keeps it in a register: per image it
// sums the image's windows in a fixed order from 0, then adds that to the group's total, images in order n0, n0+1,
// ... (two short rounding chains instead of one of images x windows: at batch 64 in one group C1's weight gradient
// is ~10x closer to the float64 reference than with a single chain). There is no cross-thread reduction, no float
// atomic and no ticket, so two runs agree bit for bit whatever the schedule.
//   dw3: thread t owns o = t + 256u (u = 0..9, o < 2400): 10 registers (the last only for t < 96);
//   db3: thread t < 16 owns db3[t] (one more register);
//   dw1 / db1: thread t < 150 owns dw1[t], 150 <= t < 156 owns db1[t-150] (one more register).
// 2,572 outputs on 256 threads: C3's weights spread evenly; C1's 156 outputs leave 100 threads idle in that phase
// (a v2 could split C1's 196 windows over two threads and add the halves in order).
//
// Per image (shared memory staged once per image, after a barrier that protects the previous image's data):
//   stage: x (1x32x32, rows padded to XS = 37 floats so that the 25 taps (r,s) of C1's weight gradient fall in
//          25 different banks: 37r + s mod 32 = 5r + s), p1 (6x14x14), gz3 and m3 (16x5x5), m3's routed offsets
//          into a p1 plane (off3), and m1's routed offsets into x (off1). w3 (16x6x5x5) is staged once per block.
//   phase A (one barrier): every thread adds its dw3 registers (25 windows x <= 10 weights: 3 shared loads + 1 FMA
//          a MAC); threads t < 16 add db3; threads t < 196 = (h, v) of S2 compute gz1[:, h, v] (6 channel
//          accumulators, the <= 3x3 pooled C3 windows within the filter's reach, for k = 0..15 in order; the same
//          gather order as conv2d_bwd_data_routed_v2) and store gz1 into shared memory.
//   phase B (one barrier): threads t < 156 add dw1 / db1 over the 196 windows of their filter (k-major order
//          (i, j)).
// Shared memory (static): w3 9,600 B + x 4,736 + p1 4,704 + gz3 1,600 + off3 1,600 + m3 400 + gz1 4,704
// + off1 4,704 = 32,048 B per block (under 48 KB: no opt-in; 7 blocks fit an H200 SM's 228 KB).
//
// Work per image (MACs, counted from the loops; the routed ops' counts, docs/routed_backward.md):
//   C3 wgrad 16*6*25 weights x 25 windows = 60,000. C3 dgrad: each of the 400 routed C3 outputs (16 filters x 25
//   windows) feeds its 25 taps x 6 channels, all inside S2 (a valid conv): 60,000 (verified by counting the
//   gather's hits for random routes: always 60,000; conv2d.cu's "30,000" for conv2d_bwd_data_routed undercounts:
//   the dense data gradient is 100 x 2,400 = 240,000 MACs and routing keeps a quarter). C1 wgrad 6*25 weights x
//   196 windows = 29,400. Total 149,400 MACs an image (as docs/routed_backward.md says); plus 1,176 act'.
//   Bytes from global memory per image: x 4,096 + p1 4,704 + gz3 1,600 + m3 400 + m1 1,176 = 11,976 B
//   (+ w3 9,600 B once per block); per block out: 2,624 x 4 = 10,496 B.
//
// Estimated time on an H200 (132 SMs, ~1.98 GHz): ESTIMATED, NOT MEASURED. Method: shared-memory slots per SM
// (one warp-wide 32-bit LDS/STS a clock; bank conflicts ignored) and issue slots (4 warp-instructions a clock),
// counted per image from the loops above:
//   C3 wgrad: 2,400 weights x 25 windows x 3 LDS (gz3, off3, p1) / 32 = 5.6 K warp-LDS;
//   C3 dgrad: 10,000 (position, filter) hits an image (400 routed outputs x 25 taps) x 7 LDS (gz3 + 6 weights)
//     + 196 x 16 x ~7.4 route loads = ~3.0 K warp-LDS (7 warps: 196 threads);
//   C1 wgrad: 150 weights x 196 windows x 3 LDS / 32 = 2.8 K (5 warps: 156 threads);  staging: ~0.3 K.
//   -> ~11.7 K shared-memory clocks an image; issue ~27 K warp-instructions / 4 = ~7 K clocks: shared-memory
//   bound, ~6 us an image per SM when two blocks (16 warps, the registers' limit: 128 x 256 on sm_90) overlap.
//   batch 4096: step_groups -> 256 groups of 16 images, one wave at 2 blocks an SM: ~31 images an SM -> ~0.19 ms.
//   batch 64: 64 blocks of one image on 64 SMs, latency-bound (one block an SM, 8 warps = 2 a scheduler):
//     staging ~1-2 us (two dependent global round trips: w3 and the image), phase A ~1.2 K + 2.5 K instructions a
//     dgrad thread at 2 warps a scheduler ~7 K clocks, phase B ~1 K instructions (5 warps) ~2 K clocks:
//     ~10 K clocks = ~5 us + staging + launch ~ 8-10 us.
//   For comparison, docs/routed_backward.md's routed v2 launches (estimates) take 5 launches at batch 64 and
//   ~0.2 ms at 4096, plus gz1's round trip through global memory (4.7 KB an image written and read).
#include "common.cuh"

#define SB_THREADS 256
// LeNet-5 geometry (compile time)
#define SB_K3 16    // C3 filters
#define SB_C3 6     // C3 input channels = C1 filters
#define SB_R 5      // filter rows = columns (both layers)
#define SB_XH 32    // x rows = columns
#define SB_XS 37    // x row stride in shared memory (bank-conflict-free C1 taps)
#define SB_P1 14    // p1 rows = columns (S2)
#define SB_P3 5     // p3 / gz3 rows = columns (S4)
// flat parameter layout offsets (spec.param_layout)
#define SB_OFF_W1 0
#define SB_OFF_B1 160
#define SB_OFF_W3 192
#define SB_OFF_B3 2592
#define SB_PREFIX 2624

constexpr int SB_RS = SB_R * SB_R;                    // 25 taps
constexpr int SB_P1HW = SB_P1 * SB_P1;                // 196 windows of C1 / positions of S2
constexpr int SB_P3HW = SB_P3 * SB_P3;                // 25 windows of C3
constexpr int SB_W3 = SB_K3 * SB_C3 * SB_RS;          // 2400
constexpr int SB_W1 = SB_C3 * SB_RS;                  // 150
constexpr int SB_G3 = SB_K3 * SB_P3HW;                // 400
constexpr int SB_G1 = SB_C3 * SB_P1HW;                // 1176
constexpr int SB_U3 = (SB_W3 + SB_THREADS - 1) / SB_THREADS;  // 10 dw3 registers per thread
static_assert(SB_THREADS >= SB_P1HW && SB_THREADS >= SB_W1 + SB_C3, "step_bwd: one thread per S2 position / C1 output");
static_assert(SB_THREADS >= (SB_OFF_B1 - SB_W1) + (SB_OFF_W3 - SB_OFF_B1 - SB_C3) + (SB_PREFIX - SB_OFF_B3 - SB_K3),
              "step_bwd: one thread per padding column");
constexpr int SB_V2_PER_K = SB_W1 / SB_U3;             // v2: 15 threads a filter, 10 weights each
constexpr int SB_V2_THREADS = SB_K3 * SB_V2_PER_K;     // 240
static_assert(SB_V2_PER_K * SB_U3 == SB_W1 && SB_V2_THREADS <= SB_THREADS, "step_bwd v2: 15 x 10 weights a filter");

// thread t's u-th dw3 weight (flat (k, c, r, s) index): v1 t + 256u; v2 k*150 + l + 15u for t = 15k + l (t < 240)
template <bool V2>
__device__ __forceinline__ unsigned int sb_w3_index(unsigned int t, int u) {
    if constexpr (V2) return (t / SB_V2_PER_K) * SB_W1 + t % SB_V2_PER_K + SB_V2_PER_K * u;
    return t + SB_THREADS * u;
}

// v2 (V2 = true): thread t < 240 owns the 10 weights o = k*150 + l + 15u (k = t / 15, l = t % 15, u = 0..9) of ONE
// filter k, so a window's gz3 and route (2 shared loads) serve its 10 FMAs: C3's weight gradient takes 1.2 shared
// loads a MAC instead of v1's 3 (v1: o = t + 256u, 10 weights of up to 10 filters, each window's gz3 and route loaded
// per weight). Each weight's sum is v1's (windows in order from 0 for the image, then added to the group's total):
// the same bits as v1 (tests/test_step_bwd.py). Estimate (ESTIMATED, NOT MEASURED; the method above): C3 wgrad
// 2,400 x 25 x 1.2 / 32 = 2.25 K warp-LDS an image (v1 5.6 K): ~8.4 K shared-memory clocks an image (v1 ~11.7 K),
// batch 4096 ~0.13-0.15 ms (v1 ~0.18-0.20); batch 64 ~6-8 us (phase A.1's chain is 25 windows x (2 + 10) loads, not
// 10 x 25 x 3). Threads 240..255 idle in that phase, as v1's last 160 slots of 2,560.
template <bool V2>
__device__ __forceinline__ void step_bwd_body(const float* __restrict__ x, const float* __restrict__ p1,
                                              const float* __restrict__ gz3, const unsigned char* __restrict__ m3,
                                              const unsigned char* __restrict__ m1, const float* __restrict__ w3,
                                              float* __restrict__ gpart, int B, int chunk, int act) {
    __shared__ float s_w3[SB_W3];
    __shared__ float s_x[SB_XH * SB_XS];
    __shared__ float s_p1[SB_G1];
    __shared__ float s_gz3[SB_G3];
    __shared__ int s_off3[SB_G3];  // routed C3 output's offset inside a p1 plane: (2i + a/2) * 14 + 2j + a%2
    __shared__ unsigned char s_m3[SB_G3];
    __shared__ float s_gz1[SB_G1];
    __shared__ int s_off1[SB_G1];  // routed C1 output's offset inside s_x: (2i + a/2) * XS + 2j + a%2

    const unsigned int tid = threadIdx.x;
    const int n0 = min(B, (int)blockIdx.x * chunk), n1 = min(B, n0 + chunk);

    for (unsigned int e = tid; e < SB_W3; e += SB_THREADS) s_w3[e] = w3[e];

    // this thread's dw3 weights: o = tid + 256 u (v2: k*150 + l + 15 u) -> (k, c, r, s); gz3 row k*25, p1 tap
    // c*196 + r*14 + s
    int g3row[SB_U3], p1tap[SB_U3];
    float acc3[SB_U3];
#pragma unroll
    for (int u = 0; u < SB_U3; ++u) {
        const unsigned int o = min(sb_w3_index<V2>(tid, u), (unsigned int)SB_W3 - 1);
        const unsigned int k = o / (SB_C3 * SB_RS), t = o % (SB_C3 * SB_RS);
        const unsigned int c = t / SB_RS, rs = t % SB_RS;
        g3row[u] = k * SB_P3HW;
        p1tap[u] = c * SB_P1HW + (rs / SB_R) * SB_P1 + rs % SB_R;
        acc3[u] = 0.0f;
    }
    float accb3 = 0.0f;  // db3[tid] (tid < 16)
    // C1: tid < 150 owns dw1[tid] = (k, r, s); 150 <= tid < 156 owns db1[tid - 150]
    const unsigned int k1 = tid < SB_W1 ? tid / SB_RS : min(tid - SB_W1, (unsigned int)SB_C3 - 1);
    const unsigned int rs1 = tid % SB_RS;
    const int x1tap = (rs1 / SB_R) * SB_XS + rs1 % SB_R;
    float acc1 = 0.0f;
    // dgrad: tid < 196 is S2 position (h, v); the pooled C3 windows whose 2x2 taps its filters can reach
    const int h = (int)(tid / SB_P1), v = (int)(tid % SB_P1);
    const int i0 = max(0, (h - SB_R + 1) >> 1), i1 = min(SB_P3 - 1, h >> 1);
    const int j0 = max(0, (v - SB_R + 1) >> 1), j1 = min(SB_P3 - 1, v >> 1);

    for (int n = n0; n < n1; ++n) {
        __syncthreads();  // the previous image's shared data is consumed (and s_w3 is staged)
        const float* xn = x + (size_t)n * (SB_XH * SB_XH);
        for (unsigned int e = tid; e < SB_XH * SB_XH; e += SB_THREADS)
            s_x[(e / SB_XH) * SB_XS + e % SB_XH] = xn[e];
        const float* pn = p1 + (size_t)n * SB_G1;
        const unsigned char* m1n = m1 + (size_t)n * SB_G1;
        for (unsigned int e = tid; e < SB_G1; e += SB_THREADS) {
            s_p1[e] = pn[e];
            const unsigned int a = m1n[e], ij = e % SB_P1HW, i = ij / SB_P1, j = ij % SB_P1;
            s_off1[e] = (int)((2 * i + (a >> 1)) * SB_XS + 2 * j + (a & 1));
        }
        const float* gn = gz3 + (size_t)n * SB_G3;
        const unsigned char* m3n = m3 + (size_t)n * SB_G3;
        for (unsigned int e = tid; e < SB_G3; e += SB_THREADS) {
            const unsigned int a = m3n[e], ij = e % SB_P3HW, i = ij / SB_P3, j = ij % SB_P3;
            s_gz3[e] = gn[e];
            s_m3[e] = (unsigned char)a;
            s_off3[e] = (int)((2 * i + (a >> 1)) * SB_P1 + 2 * j + (a & 1));
        }
        __syncthreads();

        // phase A.1: C3's weight gradient, windows (i, j) in order
        if constexpr (V2) {  // one filter's 10 weights: a window's gz3 and route loaded once for them
            if (tid < SB_V2_THREADS) {
                float a[SB_U3];  // this image's sums, then added to the group's (shorter rounding chains)
#pragma unroll
                for (int u = 0; u < SB_U3; ++u) a[u] = 0.0f;
#pragma unroll 5
                for (int e = 0; e < SB_P3HW; ++e) {
                    const int g = g3row[0] + e;
                    const float gz = s_gz3[g];
                    const int off = s_off3[g];
#pragma unroll
                    for (int u = 0; u < SB_U3; ++u) a[u] = fmaf(gz, s_p1[p1tap[u] + off], a[u]);
                }
#pragma unroll
                for (int u = 0; u < SB_U3; ++u) acc3[u] += a[u];
            }
        } else {
#pragma unroll
            for (int u = 0; u < SB_U3; ++u) {
                if (u < SB_U3 - 1 || tid + SB_THREADS * u < SB_W3) {
                    float a = 0.0f;  // this image's sum, then added to the group's (shorter rounding chains)
#pragma unroll
                    for (int e = 0; e < SB_P3HW; ++e) {
                        const int g = g3row[u] + e;
                        a = fmaf(s_gz3[g], s_p1[p1tap[u] + s_off3[g]], a);
                    }
                    acc3[u] += a;
                }
            }
        }
        if (tid < SB_K3) {
            float a = 0.0f;
#pragma unroll
            for (int e = 0; e < SB_P3HW; ++e) a += s_gz3[tid * SB_P3HW + e];
            accb3 += a;
        }
        // phase A.2: gz1 = C3's routed data gradient * act'(p1), at S2 position (h, v), all 6 channels
        if (tid < SB_P1HW) {
            float g1[SB_C3];
#pragma unroll
            for (int c = 0; c < SB_C3; ++c) g1[c] = 0.0f;
            for (int k = 0; k < SB_K3; ++k) {
#pragma unroll
                for (int di = 0; di < 3; ++di) {
                    const int i = i0 + di;
#pragma unroll
                    for (int dj = 0; dj < 3; ++dj) {
                        const int j = j0 + dj;
                        if (i <= i1 && j <= j1) {
                            const int e = k * SB_P3HW + i * SB_P3 + j;
                            const int a = s_m3[e];
                            const int r = h - 2 * i - (a >> 1), s = v - 2 * j - (a & 1);
                            if (r >= 0 && r < SB_R && s >= 0 && s < SB_R) {  // the route lies under the filter
                                const float g = s_gz3[e];
                                const float* wk = s_w3 + k * (SB_C3 * SB_RS) + r * SB_R + s;
#pragma unroll
                                for (int c = 0; c < SB_C3; ++c) g1[c] = fmaf(g, wk[c * SB_RS], g1[c]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < SB_C3; ++c)
                s_gz1[c * SB_P1HW + tid] = g1[c] * act_grad(s_p1[c * SB_P1HW + tid], act);
        }
        __syncthreads();

        // phase B: C1's weight / bias gradient from gz1, windows (i, j) of filter k1 in order
        if (tid < SB_W1) {
            const float* g = s_gz1 + k1 * SB_P1HW;
            const int* off = s_off1 + k1 * SB_P1HW;
            float a = 0.0f;
#pragma unroll 4
            for (int e = 0; e < SB_P1HW; ++e) a = fmaf(g[e], s_x[off[e] + x1tap], a);
            acc1 += a;
        } else if (tid < SB_W1 + SB_C3) {
            const float* g = s_gz1 + k1 * SB_P1HW;
            float a = 0.0f;
#pragma unroll 4
            for (int e = 0; e < SB_P1HW; ++e) a += g[e];
            acc1 += a;
        }
    }

    // the group's row: every column written once (padding 0)
    float* row = gpart + (size_t)blockIdx.x * SB_PREFIX;
#pragma unroll
    for (int u = 0; u < SB_U3; ++u) {
        const unsigned int o = sb_w3_index<V2>(tid, u);
        if (o < SB_W3 && (!V2 || tid < SB_V2_THREADS)) row[SB_OFF_W3 + o] = acc3[u];
    }
    if (tid < SB_K3) row[SB_OFF_B3 + tid] = accb3;
    if (tid < SB_W1) row[SB_OFF_W1 + tid] = acc1;
    else if (tid < SB_W1 + SB_C3) row[SB_OFF_B1 + tid - SB_W1] = acc1;
    // padding: [150,160) 10, [166,192) 26, [2608,2624) 16 columns
    constexpr unsigned int PA = SB_OFF_B1 - SB_W1, PB = SB_OFF_W3 - SB_OFF_B1 - SB_C3, PC = SB_PREFIX - SB_OFF_B3 - SB_K3;
    if (tid < PA) row[SB_W1 + tid] = 0.0f;
    else if (tid < PA + PB) row[SB_OFF_B1 + SB_C3 + tid - PA] = 0.0f;
    else if (tid < PA + PB + PC) row[SB_OFF_B3 + SB_K3 + tid - PA - PB] = 0.0f;
}

extern "C" __global__ void __launch_bounds__(SB_THREADS)
step_bwd_v1(const float* __restrict__ x, const float* __restrict__ p1, const float* __restrict__ gz3,
            const unsigned char* __restrict__ m3, const unsigned char* __restrict__ m1, const float* __restrict__ w3,
            float* __restrict__ gpart, int B, int chunk, int act) {
    step_bwd_body<false>(x, p1, gz3, m3, m1, w3, gpart, B, chunk, act);
}

// 3 blocks an SM (80 registers on sm_80 / sm_90, no spills; at 4, 64 registers, ptxas spills 36-44 bytes). Tried
// 2026-12-08 (NVRTC 12, ptxas): a shared table of the 150 taps, loaded into registers at the start of phase A.1 of each
// image (so they are not live across A.2 and B), takes sm_90 to 64 registers with no spill at an A.1 unroll of 1 or 2
// (8 B spilled at 5); sm_80 still spills 28-32 B. Not adopted: the plan (step_groups) launches at most ~2 blocks an SM
// (reports/fill.md: <= 0.65 waves at every batch), so a 4th resident block would have nothing to run.
extern "C" __global__ void __launch_bounds__(SB_THREADS, 3)
step_bwd_v2(const float* __restrict__ x, const float* __restrict__ p1, const float* __restrict__ gz3,
            const unsigned char* __restrict__ m3, const unsigned char* __restrict__ m1, const float* __restrict__ w3,
            float* __restrict__ gpart, int B, int chunk, int act) {
    step_bwd_body<true>(x, p1, gz3, m3, m1, w3, gpart, B, chunk, act);
}
