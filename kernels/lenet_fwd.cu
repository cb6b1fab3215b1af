// lenet_fwd.cu -- the whole LeNet-5 forward pass (inference) in one launch: uint8 images -> logits.
//
//   x   = pad2(image) * scale + shift          (1,32,32)   scale = 1/(255 std), shift = -mean/std (as batch_prepare)
//   S2  = pool(act(conv5x5(x; c1.w, c1.b)))    (6,14,14)   C1: 6 filters 1x5x5 -> (6,28,28), then 2x2/2 max or mean
//   S4  = pool(act(conv5x5(S2; c3.w, c3.b)))   (16,5,5)    C3: 16 filters 6x5x5 -> (16,10,10)
//   h1  = act(S4 c5.w^T + c5.b)                (H1)        S4 flattened (400); H1 = 120 in LeNet-5
//   h2  = act(h1 f6.w^T + f6.b)                (H2)        F6, any width
//   out = h2 out.w^T + out.b                   (NC)        logits
//
// The convolutions have LeNet-5's fixed geometry (the LF_* constants); H1, H2 and NC are arguments. images (N,28,28)
// uint8, logits (N,NC) float32; c5.w (H1,400), f6.w (H2,H1), out.w (NC,H2).
//
// One launch: a block owns a tile of `imgs` images and runs every stage for them. Each image has two regions of
// shared memory: X (the padded input; then S4 and h1) and Y (S2; then h2), so every intermediate stays on chip; C1's
// and C3's weights are staged in shared memory once per block; C5's, F6's and the output's weights are read through
// the read-only cache (they are reused by the images of the tile). Barriers separate the stages.
//
// Versions:
//   lenet_fwd_v1  one thread per output of each stage (a pooled output computes its 2x2 conv outputs), operands
//                 from shared memory / the read-only cache in the natural layouts. The readable baseline.
//   lenet_fwd_v2  register blocking: C1 a thread per pooled pixel x all 6 filters (24 accumulators: each input load
//                 feeds 6-12 FMAs, the 6 weights of a tap one float4 + one float2 broadcast), C3 a thread per pooled
//                 pixel x 8 filters (32 accumulators, weights as two float4 broadcasts), both sliding a 2-row window
//                 of the input; C5/F6/output one warp per 8 outputs with the tile's images as the rows
//                 (rows_gemv.cuh: coalesced weight rows, each weight feeding `imgs` FMAs). 224 threads: the 4-image
//                 tile's 784 C1 items take 4 rounds and its 200 C3 items one.
//   lenet_fwd_v3  v2's register blocking, planned by batch size and with more outputs: a block per image while N is
//                 at most 2 x SMs (2 images up to 4 x SMs, else 4), so a small batch fills the SMs; the dense stages
//                 with F = 8/imgs outputs per warp and their k loop unrolled 4 deep (v2 at 4 images: not unrolled);
//                 C3's weights staged with coalesced global reads; the input uint8 pixels or float32 already
//                 normalised (in_f32; the border padded with `pad`); and the argmax fused: with `classes` (N,) int64
//                 the logits go to shared memory and one thread per image writes the first maximal class (as
//                 np.argmax, a NaN wins), and `logits` may be null (no logits written).
//
// Launch (lenet_gpu/backends/cupy_backend/fused.py lenet_fwd_plan): grid ceil(N/imgs), block LF_THREADS_V1/_V2 (v3: _V2),
// dynamic smem (LF_W_V1/_V2 + imgs*(X + Y)) floats, X = round4(max(1024, 400 + H1)), Y = round4(max(1176, H2));
// imgs = 4 (2, 1 when F6 is very wide) keeps it <= 48 KiB.
#include "common.cuh"
#include "rows_gemv.cuh"

#define LF_IH 28                        // input image side
#define LF_X 32                         // padded input side (pad 2)
#define LF_PAD 2
#define LF_K1 6                         // C1 filters
#define LF_R 5                          // filter side (C1 and C3)
#define LF_P2 14                        // S2 side
#define LF_K3 16                        // C3 filters
#define LF_P4 5                         // S4 side
#define LF_I5 (LF_K3 * LF_P4 * LF_P4)   // 400: S4 flattened
#define LF_S2 (LF_K1 * LF_P2 * LF_P2)   // 1176: S2 floats
#define LF_THREADS_V1 256
#define LF_THREADS_V2 224
#define LF_W_V1 2576                    // v1 staged weights: 150 + 6 + 2400 + 16, rounded up to a multiple of 4
#define LF_W_V2 2624                    // v2 and v3: [25][8] + 8 + [6][25][16] + 16

// v2 tuning (compile-time parameters, -DNAME=value):
#ifndef LF_MIN_BLOCKS
#define LF_MIN_BLOCKS 4  // blocks of 224 threads an SM the registers must allow (4: <= 72 registers)
#endif
#ifndef LF_KB3
#define LF_KB3 4  // C3 filters per thread (x a 2x2 window = 4*LF_KB3 accumulators): 4 or 8
#endif
#ifndef LF_F
#define LF_F 4  // dense stages: outputs a warp computes at once (x the tile's images = partial sums per lane)
#endif
static_assert(LF_KB3 == 4 || LF_KB3 == 8, "LF_KB3: 4 or 8");

__device__ __forceinline__ int lf_round4(int n) { return (n + 3) & ~3; }
__device__ __forceinline__ int lf_region_x(int H1) { return lf_round4(max(LF_X * LF_X, LF_I5 + H1)); }
__device__ __forceinline__ int lf_region_y(int H2) { return lf_round4(max(LF_S2, H2)); }

__device__ __forceinline__ float lf_pool(float a, float b, float c, float d, int mode) {
    if (mode == POOL_MAX) return fmaxf(fmaxf(a, b), fmaxf(c, d));
    return (a + b + c + d) * 0.25f;
}

// Stage the tile's images, padded and normalised, into the X region of each image: value * scale + shift inside the
// image, `pad` on the border and past the batch (uint8 pixels: pad = shift, the normalised pixel 0; float32 inputs
// already normalised: scale 1, shift 0, pad -mean/std).
template <typename T>
__device__ __forceinline__ void lf_stage_input(const T* __restrict__ images, float* s_img, int IS, int n0, int ni,
                                               int imgs, float scale, float shift, float pad) {
    for (int t = threadIdx.x; t < imgs * LF_X * LF_X; t += blockDim.x) {
        const int m = t / (LF_X * LF_X), p = t - m * LF_X * LF_X;
        const int ih = p / LF_X - LF_PAD, iw = p % LF_X - LF_PAD;
        float v = pad;
        if (m < ni && ih >= 0 && ih < LF_IH && iw >= 0 && iw < LF_IH)
            v = (float)images[(size_t)(n0 + m) * LF_IH * LF_IH + ih * LF_IH + iw] * scale + shift;
        s_img[m * IS + p] = v;
    }
}

__device__ __forceinline__ void lf_stage_images(const unsigned char* __restrict__ images, float* s_img, int IS, int n0,
                                                int ni, int imgs, float scale, float shift) {
    lf_stage_input<unsigned char>(images, s_img, IS, n0, ni, imgs, scale, shift, shift);
}

// ------------------------------------------------------------------------------------------ v1
extern "C" __global__ void __launch_bounds__(LF_THREADS_V1)
lenet_fwd_v1(const unsigned char* __restrict__ images, const float* __restrict__ c1w, const float* __restrict__ c1b,
             const float* __restrict__ c3w, const float* __restrict__ c3b, const float* __restrict__ c5w,
             const float* __restrict__ c5b, const float* __restrict__ f6w, const float* __restrict__ f6b,
             const float* __restrict__ ow, const float* __restrict__ ob, float* __restrict__ logits, int N, int H1,
             int H2, int NC, int act, int mode, float scale, float shift, int imgs) {
    extern __shared__ float smem[];
    float* s_w1 = smem;                          // [6][25]
    float* s_b1 = s_w1 + LF_K1 * 25;             // [6]
    float* s_w3 = s_b1 + LF_K1;                  // [16][6][25]
    float* s_b3 = s_w3 + LF_K3 * LF_K1 * 25;     // [16]
    float* s_img = smem + LF_W_V1;               // image m: X at s_img + m*IS, Y at s_img + m*IS + XR
    const int XR = lf_region_x(H1), YR = lf_region_y(H2), IS = XR + YR;
    const int n0 = blockIdx.x * imgs, ni = min(imgs, N - n0), tid = threadIdx.x, nt = blockDim.x;
    for (int t = tid; t < LF_K1 * 25; t += nt) s_w1[t] = c1w[t];
    for (int t = tid; t < LF_K1; t += nt) s_b1[t] = c1b[t];
    for (int t = tid; t < LF_K3 * LF_K1 * 25; t += nt) s_w3[t] = c3w[t];
    for (int t = tid; t < LF_K3; t += nt) s_b3[t] = c3b[t];
    lf_stage_images(images, s_img, IS, n0, ni, imgs, scale, shift);
    __syncthreads();
    for (int t = tid; t < imgs * LF_S2; t += nt) {  // C1 + act + pool -> S2 (Y): a thread per pooled output
        const int m = t / LF_S2, e = t - m * LF_S2, k = e / (LF_P2 * LF_P2), pp = e % (LF_P2 * LF_P2);
        const int ph = pp / LF_P2, pw = pp % LF_P2;
        const float* xin = s_img + m * IS;
        float o[4];
        for (int q = 0; q < 4; ++q) {
            const int oh = 2 * ph + (q >> 1), owc = 2 * pw + (q & 1);
            float acc = s_b1[k];
            for (int r = 0; r < LF_R; ++r)
                for (int s = 0; s < LF_R; ++s) acc += xin[(oh + r) * LF_X + owc + s] * s_w1[(k * LF_R + r) * LF_R + s];
            o[q] = act_fwd(acc, act);
        }
        s_img[m * IS + XR + e] = lf_pool(o[0], o[1], o[2], o[3], mode);
    }
    __syncthreads();
    for (int t = tid; t < imgs * LF_I5; t += nt) {  // C3 + act + pool -> S4 (X, [0, 400))
        const int m = t / LF_I5, e = t - m * LF_I5, k = e / (LF_P4 * LF_P4), pp = e % (LF_P4 * LF_P4);
        const int ph = pp / LF_P4, pw = pp % LF_P4;
        const float* s2 = s_img + m * IS + XR;
        float o[4];
        for (int q = 0; q < 4; ++q) {
            const int oh = 2 * ph + (q >> 1), owc = 2 * pw + (q & 1);
            float acc = s_b3[k];
            for (int c = 0; c < LF_K1; ++c)
                for (int r = 0; r < LF_R; ++r)
                    for (int s = 0; s < LF_R; ++s)
                        acc += s2[(c * LF_P2 + oh + r) * LF_P2 + owc + s] * s_w3[((k * LF_K1 + c) * LF_R + r) * LF_R + s];
            o[q] = act_fwd(acc, act);
        }
        s_img[m * IS + e] = lf_pool(o[0], o[1], o[2], o[3], mode);
    }
    __syncthreads();
    for (int t = tid; t < imgs * H1; t += nt) {  // C5 -> h1 (X, [400, 400 + H1))
        const int m = t / H1, o = t - m * H1;
        const float* s4 = s_img + m * IS;
        float acc = c5b[o];
        for (int i = 0; i < LF_I5; ++i) acc += __ldg(c5w + (size_t)o * LF_I5 + i) * s4[i];
        s_img[m * IS + LF_I5 + o] = act_fwd(acc, act);
    }
    __syncthreads();
    for (int t = tid; t < imgs * H2; t += nt) {  // F6 -> h2 (Y, [0, H2))
        const int m = t / H2, j = t - m * H2;
        const float* hh = s_img + m * IS + LF_I5;
        float acc = f6b[j];
        for (int o = 0; o < H1; ++o) acc += __ldg(f6w + (size_t)j * H1 + o) * hh[o];
        s_img[m * IS + XR + j] = act_fwd(acc, act);
    }
    __syncthreads();
    for (int t = tid; t < ni * NC; t += nt) {  // output -> logits
        const int m = t / NC, c = t - m * NC;
        const float* hh = s_img + m * IS + XR;
        float acc = ob[c];
        for (int j = 0; j < H2; ++j) acc += __ldg(ow + (size_t)c * H2 + j) * hh[j];
        logits[(size_t)(n0 + m) * NC + c] = acc;
    }
}

// ------------------------------------------------------------------------------------------ v2
// v2's register block: the 2x2 window's four outputs (rows ra, rb of the input; columns s, s + 1) for K
// filters, acc[output][filter] += input · w[filter]
template <int K>
__device__ __forceinline__ void lf_window_fma(float (&acc)[4][K], const float (&ra)[LF_R + 1],
                                              const float (&rb)[LF_R + 1], int s, const float (&w)[K]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        acc[0][k] = fmaf(ra[s], w[k], acc[0][k]);
        acc[1][k] = fmaf(ra[s + 1], w[k], acc[1][k]);
        acc[2][k] = fmaf(rb[s], w[k], acc[2][k]);
        acc[3][k] = fmaf(rb[s + 1], w[k], acc[3][k]);
    }
}

// the block's K pooled outputs, activated then pooled, filter k's at out[k * plane]
template <int K>
__device__ __forceinline__ void lf_store_pooled(float* out, int plane, const float (&acc)[4][K], int act, int mode) {
#pragma unroll
    for (int k = 0; k < K; ++k)
        out[k * plane] = lf_pool(act_fwd(acc[0][k], act), act_fwd(acc[1][k], act), act_fwd(acc[2][k], act),
                                 act_fwd(acc[3][k], act), mode);
}

// C1's and C3's weights and biases into shared memory (LF_W_V2 floats at smem): C1 as [25 taps][8] (the 6 filters'
// weights of a tap, then 2 zeros) + 8 biases, C3 as [6 channels][25 taps][16 filters] + 16 biases. V3 reads c3.w in
// its own order (coalesced) and scatters; v2 gathers.
template <bool V3>
__device__ __forceinline__ void lf_stage_weights(const float* __restrict__ c1w, const float* __restrict__ c1b,
                                                 const float* __restrict__ c3w, const float* __restrict__ c3b,
                                                 float* smem) {
    float* s_w1 = smem;
    float* s_b1 = s_w1 + 25 * 8;
    float* s_w3 = s_b1 + 8;
    float* s_b3 = s_w3 + LF_K1 * 25 * LF_K3;
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int t = tid; t < 25 * 8; t += nt) {
        const int tap = t / 8, k = t % 8;
        s_w1[t] = k < LF_K1 ? c1w[k * 25 + tap] : 0.0f;
    }
    for (int t = tid; t < 8; t += nt) s_b1[t] = t < LF_K1 ? c1b[t] : 0.0f;
    if constexpr (V3) {
        for (int t = tid; t < LF_K1 * 25 * LF_K3; t += nt) {
            const int k = t / (LF_K1 * 25), ct = t - k * (LF_K1 * 25);
            s_w3[ct * LF_K3 + k] = c3w[t];
        }
    } else {
        for (int t = tid; t < LF_K1 * 25 * LF_K3; t += nt) {
            const int k = t % LF_K3, ct = t / LF_K3;  // ct = c*25 + tap
            s_w3[t] = c3w[(size_t)k * LF_K1 * 25 + ct];
        }
    }
    for (int t = tid; t < LF_K3; t += nt) s_b3[t] = c3b[t];
}

// lf_conv reads window rows with load_row2 (64-bit loads): every pitch and offset into them must be even (the
// run-time ones, IS and XR, are multiples of 4: lf_round4)
static_assert(LF_X % 2 == 0 && LF_P2 % 2 == 0 && (LF_P2 * LF_P2) % 2 == 0 && LF_W_V2 % 4 == 0,
              "load_row2 needs even pitches");

// The convolutions of NI staged images (image m's padded input at s_img + m * IS, its Y region at + XR): C1 + act +
// pool -> S2 (Y), a barrier, C3 + act + pool -> S4, image m's 400 floats at s4 + m * s4s. No barrier after C3 (the
// caller's next barrier orders S4's readers; C3 reads only Y, so the X regions may be restaged before it).
template <int NI>
__device__ __forceinline__ void lf_conv(const float* smem, float* s_img, int IS, int XR, float* s4, int s4s, int act,
                                        int mode) {
    const float* s_w1 = smem;
    const float* s_b1 = s_w1 + 25 * 8;
    const float* s_w3 = s_b1 + 8;
    const float* s_b3 = s_w3 + LF_K1 * 25 * LF_K3;
    const int tid = threadIdx.x, nt = blockDim.x;
    // C1 + act + pool -> S2 (Y): a thread per (image, pooled pixel), all 6 filters, its 2x2 window of conv outputs
    for (int it = tid; it < NI * LF_P2 * LF_P2; it += nt) {
        const int m = it / (LF_P2 * LF_P2), pp = it % (LF_P2 * LF_P2), ph = pp / LF_P2, pw = pp % LF_P2;
        const float* xin = s_img + m * IS + 2 * ph * LF_X + 2 * pw;
        float acc[4][LF_K1];
#pragma unroll
        for (int k = 0; k < LF_K1; ++k) acc[0][k] = acc[1][k] = acc[2][k] = acc[3][k] = s_b1[k];
        float ra[LF_R + 1], rb[LF_R + 1];  // two input rows of the window (6 wide: 2 outputs x 5 taps)
        load_row2(xin, ra);  // 8-byte aligned: even column, even pitch (LF_X, IS) and base
#pragma unroll
        for (int r = 0; r < LF_R; ++r) {
            load_row2(xin + (r + 1) * LF_X, rb);
#pragma unroll
            for (int s = 0; s < LF_R; ++s) {
                const float4 wa = *reinterpret_cast<const float4*>(s_w1 + (r * LF_R + s) * 8);
                const float2 wb = *reinterpret_cast<const float2*>(s_w1 + (r * LF_R + s) * 8 + 4);
                const float w[LF_K1] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y};
                lf_window_fma<LF_K1>(acc, ra, rb, s, w);
            }
#pragma unroll
            for (int j = 0; j <= LF_R; ++j) ra[j] = rb[j];
        }
        float* s2 = s_img + m * IS + XR + pp;
        lf_store_pooled<LF_K1>(s2, LF_P2 * LF_P2, acc, act, mode);
    }
    __syncthreads();

    // C3 + act + pool -> S4 (X, [0, 400)): a thread per (image, LF_KB3 filters, pooled pixel)
    constexpr int KG = LF_K3 / LF_KB3;  // filter groups
    for (int it = tid; it < NI * KG * LF_P4 * LF_P4; it += nt) {
        const int m = it / (KG * LF_P4 * LF_P4), kg = (it / (LF_P4 * LF_P4)) % KG, pp = it % (LF_P4 * LF_P4);
        const int ph = pp / LF_P4, pw = pp % LF_P4;
        float acc[4][LF_KB3];
#pragma unroll
        for (int k = 0; k < LF_KB3; ++k) acc[0][k] = acc[1][k] = acc[2][k] = acc[3][k] = s_b3[LF_KB3 * kg + k];
        const float* s2 = s_img + m * IS + XR + 2 * ph * LF_P2 + 2 * pw;
#pragma unroll 1
        for (int c = 0; c < LF_K1; ++c) {
            const float* xin = s2 + c * LF_P2 * LF_P2;
            const float* wc = s_w3 + c * 25 * LF_K3 + LF_KB3 * kg;
            float ra[LF_R + 1], rb[LF_R + 1];
            load_row2(xin, ra);  // 8-byte aligned: even column, even pitches (LF_P2, the planes, XR, IS)
#pragma unroll
            for (int r = 0; r < LF_R; ++r) {
                load_row2(xin + (r + 1) * LF_P2, rb);
#pragma unroll
                for (int s = 0; s < LF_R; ++s) {
                    float w[LF_KB3];
#pragma unroll
                    for (int q = 0; q < LF_KB3; q += 4) {
                        const float4 w4 = *reinterpret_cast<const float4*>(wc + (r * LF_R + s) * LF_K3 + q);
                        w[q] = w4.x;
                        w[q + 1] = w4.y;
                        w[q + 2] = w4.z;
                        w[q + 3] = w4.w;
                    }
                    lf_window_fma<LF_KB3>(acc, ra, rb, s, w);
                }
#pragma unroll
                for (int j = 0; j <= LF_R; ++j) ra[j] = rb[j];
            }
        }
        float* s4o = s4 + m * s4s + LF_KB3 * kg * LF_P4 * LF_P4 + pp;
        lf_store_pooled<LF_KB3>(s4o, LF_P4 * LF_P4, acc, act, mode);
    }
}

// The output layer over the tile's NI rows of h2 (s_h2, row stride h2s): logits (N,NC) written unless null; with
// V3 and classes not null, the logits also go to shared memory (s_z, row stride zs, free by now) and one thread per
// image writes the first maximal class (as np.argmax: the first maximum, the first NaN wins).
template <int NI, int F, int U, bool V3>
__device__ __forceinline__ void lf_output(const float* __restrict__ ow, const float* __restrict__ ob, int NC, int H2,
                                          const float* s_h2, int h2s, float* s_z, int zs, float* __restrict__ logits,
                                          long long* __restrict__ classes, int n0, int ni) {
    float* g_logits = logits != nullptr ? logits + (size_t)n0 * NC : nullptr;
    if (!V3 || classes == nullptr) {
        rows_gemv<NI, F, U>(ow, ob, NC, H2, s_h2, h2s, nullptr, 0, g_logits, ni, ACT_IDENTITY);
        return;
    }
    rows_gemv<NI, F, U>(ow, ob, NC, H2, s_h2, h2s, s_z, zs, g_logits, ni, ACT_IDENTITY);
    __syncthreads();
    const int tid = threadIdx.x;
    if (tid < ni) {
        const float* z = s_z + tid * zs;
        int best = 0;
        float bv = z[0];
        for (int c = 1; c < NC; ++c) {
            const float v = z[c];
            if (v > bv || (v != v && bv == bv)) {
                bv = v;
                best = c;
            }
        }
        classes[n0 + tid] = best;
    }
}

// the tile functions' parameters (v2's, v3's and v4's): the input images as T, the weights, the outputs (classes
// may be null), the sizes, the activation and pool codes, the normalisation, the block's shared memory
#define LF_TILE_PARAMS                                                                                                \
    const T *__restrict__ images, const float *__restrict__ c1w, const float *__restrict__ c1b,                      \
        const float *__restrict__ c3w, const float *__restrict__ c3b, const float *__restrict__ c5w,                  \
        const float *__restrict__ c5b, const float *__restrict__ f6w, const float *__restrict__ f6b,                  \
        const float *__restrict__ ow, const float *__restrict__ ob, float *__restrict__ logits,                       \
        long long *__restrict__ classes, int N, int H1, int H2, int NC, int act, int mode, float scale, float shift, \
        float pad, float *smem

// v2's and v3's tile: NI images, the dense stages F outputs a warp with their k loop unrolled U deep; T the input
// type (unsigned char pixels, or float already normalised); V3: C3's weights staged with coalesced reads, and the
// fused argmax (classes not null: logits kept in shared memory, classes[n] written; logits written unless null).
template <int NI, int F, int U, typename T, bool V3>
__device__ __forceinline__ void lenet_fwd_tile(LF_TILE_PARAMS) {
    float* s_img = smem + LF_W_V2;
    const int XR = lf_region_x(H1), YR = lf_region_y(H2), IS = XR + YR;
    const int n0 = blockIdx.x * NI, ni = min(NI, N - n0);
    lf_stage_weights<V3>(c1w, c1b, c3w, c3b, smem);
    lf_stage_input<T>(images, s_img, IS, n0, ni, NI, scale, shift, pad);
    __syncthreads();
    lf_conv<NI>(smem, s_img, IS, XR, s_img, IS, act, mode);  // S4 into X[0, 400)
    __syncthreads();

    // the dense stages: the tile's images are the rows (images past the batch compute on zeros, never written)
    rows_gemv<NI, F, U>(c5w, c5b, H1, LF_I5, s_img, IS, s_img + LF_I5, IS, nullptr, ni, act);
    __syncthreads();
    rows_gemv<NI, F, U>(f6w, f6b, H2, H1, s_img + LF_I5, IS, s_img + XR, IS, nullptr, ni, act);
    __syncthreads();
    // the logits (for the argmax) into X[0, NC): S4's place, free after C5
    lf_output<NI, F, U, V3>(ow, ob, NC, H2, s_img + XR, IS, s_img, IS, logits, classes, n0, ni);
}

// `imgs` (1, 2 or 4) is uniform over the launch: one specialised body runs.
extern "C" __global__ void __launch_bounds__(LF_THREADS_V2, LF_MIN_BLOCKS)
lenet_fwd_v2(const unsigned char* __restrict__ images, const float* __restrict__ c1w, const float* __restrict__ c1b,
             const float* __restrict__ c3w, const float* __restrict__ c3b, const float* __restrict__ c5w,
             const float* __restrict__ c5b, const float* __restrict__ f6w, const float* __restrict__ f6b,
             const float* __restrict__ ow, const float* __restrict__ ob, float* __restrict__ logits, int N, int H1,
             int H2, int NC, int act, int mode, float scale, float shift, int imgs) {
    extern __shared__ float smem[];
#define LF_ARGS images, c1w, c1b, c3w, c3b, c5w, c5b, f6w, f6b, ow, ob, logits, nullptr, N, H1, H2, NC, act, mode, \
                scale, shift, shift, smem
#define LF_V2(NI) lenet_fwd_tile<NI, LF_F, (NI * LF_F * LF_F <= 32 ? 4 : 1), unsigned char, false>(LF_ARGS)
    switch (imgs) {
        case 1: LF_V2(1); break;
        case 2: LF_V2(2); break;
        default: LF_V2(4); break;
    }
#undef LF_V2
#undef LF_ARGS
}

// ------------------------------------------------------------------------------------------ v3
#ifndef LF_U3
#define LF_U3 4  // v3: the dense stages' k-loop unroll
#endif

// `imgs` (1, 2 or 4) and `in_f32` are uniform over the launch: one of six specialised bodies runs. images: (N,28,28)
// uint8 (in_f32 = 0) or float32 (in_f32 = 1); logits (N,NC) or null; classes (N,) int64 or null (not both null).
// v3's and v4's parameters, and the arguments their tile functions take (images cast to the input type T)
#define LF_V3_PARAMS                                                                                                  \
    const void* __restrict__ images, int in_f32, const float* __restrict__ c1w, const float* __restrict__ c1b,       \
        const float* __restrict__ c3w, const float* __restrict__ c3b, const float* __restrict__ c5w,                  \
        const float* __restrict__ c5b, const float* __restrict__ f6w, const float* __restrict__ f6b,                  \
        const float* __restrict__ ow, const float* __restrict__ ob, float* __restrict__ logits,                       \
        long long* __restrict__ classes, int N, int H1, int H2, int NC, int act, int mode, float scale, float shift, \
        float pad, int imgs
#define LF_ARGS(T) static_cast<const T*>(images), c1w, c1b, c3w, c3b, c5w, c5b, f6w, f6b, ow, ob, logits, classes, N, \
                   H1, H2, NC, act, mode, scale, shift, pad, smem

extern "C" __global__ void __launch_bounds__(LF_THREADS_V2, LF_MIN_BLOCKS) lenet_fwd_v3(LF_V3_PARAMS) {
    extern __shared__ float smem[];
#define LF_V3(NI, T) lenet_fwd_tile<NI, 8 / NI, LF_U3, T, true>(LF_ARGS(T))
    if (in_f32) {
        switch (imgs) {
            case 1: LF_V3(1, float); break;
            case 2: LF_V3(2, float); break;
            default: LF_V3(4, float); break;
        }
    } else {
        switch (imgs) {
            case 1: LF_V3(1, unsigned char); break;
            case 2: LF_V3(2, unsigned char); break;
            default: LF_V3(4, unsigned char); break;
        }
    }
#undef LF_V3
}

// ------------------------------------------------------------------------------------------ v4: large batches
// A block of NI = 8 or 16 images (`imgs`) runs the convolutions LF4_G images at a time through v3's code (the
// same C1, C3 and sums: S4 identical), keeping every image's S4 in a rows region [NI][SR]; then the dense stages
// once over all NI rows (rows_gemv, F = 32 / NI outputs a warp: a lane holds NI x F = 32 partial sums, each dense
// weight it loads feeds NI FMAs). A dense weight is read once per NI images (v3: per 4), so the 236 KB of C5, F6
// and output weights cost ~15 KB an image of L2 traffic at NI = 16 (v3: ~59 KB).
//
// Same bits as v3: every output of a dense layer is the same sum in the same order whatever the rows and outputs
// a warp holds (a lane's k = lane, lane + 32, ... chain from 0, then the butterfly over lane bits 16, 8, 4, 2, 1 of
// warp_transpose_sum, whose adds are commutative), and the conv stages are v3's. tests/test_lenet_fwd_v4.py checks it.
//
// Shared memory (floats): C1/C3 weights LF_W_V2 | conv scratch: LF4_G images' X (1024) and Y (1176), later h1
// [NI][round4(H1)] and h2 [NI][round4(H2)] (the larger of the two uses) | rows [NI][SR], SR = round4(max(400, NC)):
// S4, later the logits for the argmax. At LeNet-5 sizes, NI = 16, G = 2: 13,424 floats = 53,696 B, more than the
// 48 KiB a block gets without an opt-in: the launcher raises the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize
// (Runtime.launch). 4 blocks of 224 threads an SM (by registers, <= 72; and by shared memory: 4 x 53.7 KB on an
// H100's 228 KB) as v3's 4 blocks of 45.7 KB.
//
// The conv groups: stage the group's images (X) | barrier | C1 (X -> Y) | barrier | C3 (Y -> rows), and the next
// group's staging overlaps C3 (it writes only X, which C3 does not read; the barrier after it orders C1's writes to
// Y after C3's reads). Groups past the batch compute on the border value (finite; never written).
//
// Cost at LeNet-5, batch 10,000 (ESTIMATED, NOT MEASURED; H200 132 SMs at ~1.98 GHz): FMAs 0.41 M an image
// (C1 117.6 K, C3 240 K, dense 59 K MAC) = 12.9 K warp-FMA an image; at 4 a clock an SM, 76 images an SM:
// ~250 K clocks = ~125 us if FMA-bound (80M img/s, the FP32 limit). Shared loads ~2.1 K warp-loads an image (1 a
// clock an SM, overlapped): the convolutions' window rows are 64-bit loads (load_row2, 2026-12-07), 495 loads and
// ~2.1 K wavefronts an image where six 32-bit loads a row took 990 and ~2.9 K (bench/smem_banks.py's bank model:
// the stride-2 windows still replay C3's loads ~4 ways of a 2-way minimum). Dense weights from L2: 625 blocks x 236 KB = 148 MB, ~21-27 us at 5.5-7 TB/s
// (v3 at 4 images: 590 MB, 84-107 us). v2's kernel (v3's at 4 images but for the dense unroll) measured 487.6 us
// at 10,000 (20.5M img/s, CUPTI 2026-12-04), ~1.6 instructions a clock an SM of ~20 K issue slots an image: v4
// keeps the conv stages' instructions (~85 % of them) and removes ~3/4 of the dense L2 traffic (63-80 us of L2
// time) and part of the dense stage's load latency (a weight load feeds 16 FMAs, not 4): estimated 350-425 us
// (23.5-28.5M img/s); the 64-bit window rows take ~2.5 % of the issue slots off (495 of ~20 K): 340-415 us
// (24-29.4M img/s). Not measured; the issue's 30M img/s needs the conv stages faster still.
#ifndef LF4_G
#define LF4_G 2  // images a conv group (the X/Y scratch holds this many)
#endif
#ifndef LF4_U
#define LF4_U 1  // v4: the dense stages' k-loop unroll (NI x F = 32 accumulators and NI loads a step already)
#endif

__device__ __forceinline__ int lf4_rows_stride(int NC) { return lf_round4(max(LF_I5, NC)); }
__device__ __forceinline__ int lf4_scratch(int NI, int H1, int H2) {
    return max(LF4_G * (LF_X * LF_X + LF_S2), NI * (lf_round4(H1) + lf_round4(H2)));
}

template <int NI, typename T>
__device__ __forceinline__ void lenet_fwd_tile4(LF_TILE_PARAMS) {
    constexpr int G = LF4_G, F = 32 / NI, IS = LF_X * LF_X + LF_S2, XR = LF_X * LF_X;
    static_assert(NI % G == 0, "LF4_G must divide the images a block");
    float* s_img = smem + LF_W_V2;                     // G images' X | Y, later h1 and h2
    float* s_rows = s_img + lf4_scratch(NI, H1, H2);   // [NI][SR]: S4, later the logits
    const int SR = lf4_rows_stride(NC), H1S = lf_round4(H1), H2S = lf_round4(H2);
    float* s_h1 = s_img;
    float* s_h2 = s_img + NI * H1S;
    const int n0 = blockIdx.x * NI, ni = min(NI, N - n0);
    lf_stage_weights<true>(c1w, c1b, c3w, c3b, smem);
#pragma unroll 1
    for (int g = 0; g < NI; g += G) {
        lf_stage_input<T>(images, s_img, IS, n0 + g, ni - g, G, scale, shift, pad);
        __syncthreads();
        lf_conv<G>(smem, s_img, IS, XR, s_rows + g * SR, SR, act, mode);
    }
    __syncthreads();
    rows_gemv<NI, F, LF4_U>(c5w, c5b, H1, LF_I5, s_rows, SR, s_h1, H1S, nullptr, ni, act);
    __syncthreads();
    rows_gemv<NI, F, LF4_U>(f6w, f6b, H2, H1, s_h1, H1S, s_h2, H2S, nullptr, ni, act);
    __syncthreads();
    lf_output<NI, F, LF4_U, true>(ow, ob, NC, H2, s_h2, H2S, s_rows, SR, logits, classes, n0, ni);
}

// `imgs` (8 or 16) and `in_f32` are uniform over the launch: one of four specialised bodies runs. The arguments are
// v3's.
extern "C" __global__ void __launch_bounds__(LF_THREADS_V2, LF_MIN_BLOCKS) lenet_fwd_v4(LF_V3_PARAMS) {
    extern __shared__ float smem[];
    if (in_f32) {
        if (imgs == 8) lenet_fwd_tile4<8, float>(LF_ARGS(float));
        else lenet_fwd_tile4<16, float>(LF_ARGS(float));
    } else {
        if (imgs == 8) lenet_fwd_tile4<8, unsigned char>(LF_ARGS(unsigned char));
        else lenet_fwd_tile4<16, unsigned char>(LF_ARGS(unsigned char));
    }
}
#undef LF_ARGS
#undef LF_V3_PARAMS
#undef LF_TILE_PARAMS

// ------------------------------------------------------------------------------------------ evaluation
// lenet_eval_v1: out[0] = sum over n of the softmax cross-entropy of logits[n] (N,NC) against labels[n] (uint8),
// out[1] = the rows whose first maximal logit (as np.argmax) is the label; both in double, in a fixed order: thread
// t takes rows t, t + T, ... in turn, then a fixed tree over the block's threads. One block (LF_EVAL_THREADS): an
// evaluation pass ends with one launch and one 16-byte copy back.
#define LF_EVAL_THREADS 256
// (No __launch_bounds__: with it, ptxas for sm_90 spilled 8 bytes of exp/log's double temporaries; without, 44
// registers and no spill.)
extern "C" __global__ void lenet_eval_v1(const float* __restrict__ logits, const unsigned char* __restrict__ labels, int N, int NC,
              double* __restrict__ out) {
    __shared__ double s_loss[LF_EVAL_THREADS];
    __shared__ double s_hit[LF_EVAL_THREADS];
    double loss = 0.0, hit = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        const float* z = logits + (size_t)n * NC;
        float bv = z[0];
        int best = 0;
        double m = (double)z[0];
        for (int c = 1; c < NC; ++c) {
            const float v = z[c];
            if (v > bv || (v != v && bv == bv)) {
                bv = v;
                best = c;
            }
            m = fmax(m, (double)v);
        }
        double s = 0.0;
        for (int c = 0; c < NC; ++c) s += exp((double)z[c] - m);
        const int y = labels[n];
        loss += log(s) + m - (double)z[y];
        hit += best == y ? 1.0 : 0.0;
    }
    s_loss[threadIdx.x] = loss;
    s_hit[threadIdx.x] = hit;
    __syncthreads();
    for (int h = LF_EVAL_THREADS / 2; h > 0; h >>= 1) {
        if ((int)threadIdx.x < h) {
            s_loss[threadIdx.x] += s_loss[threadIdx.x + h];
            s_hit[threadIdx.x] += s_hit[threadIdx.x + h];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = s_loss[0];
        out[1] = s_hit[0];
    }
}
