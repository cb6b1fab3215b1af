// conv2d.cu -- valid 2-D convolution (cross-correlation), stride 1, NCHW, float32.
//
//   forward        y[n,k,p,q]  = act(b[k] + sum_{c,r,s} w[k,c,r,s] * x[n,c,p+r,q+s])
//   fused forward  the same, then 2x2/2 subsampling of y (max with argmax, or mean) in one launch
//   input grad     dx[n,c,h,v] = sum_{k,r,s} dz[n,k,h-r,v-s] * w[k,c,r,s]   (taps inside dz only)
//   fused input grad  dz_below = pool2x2_bwd(dx, argmax) * act'(yconv): through the pooling below (yconv is
//                  the activated output the pooled input came from: (N,C,2H(+1),2W(+1)))
//   weight grad    dw[k,c,r,s] = sum_{n,p,q} dz[n,k,p,q] * x[n,c,p+r,q+s];  db[k] = sum_{n,p,q} dz[n,k,p,q]
//
// Shapes: x (N,C,H,W), w (K,C,R,S), b (K,), y and dz (N,K,P,Q) with P = H-R+1, Q = W-S+1,
// pooled (N,K,P/2,Q/2) (an odd trailing row/column of y is not pooled). dz is the gradient w.r.t.
// the pre-activation. Any N, C, H, W, K, R, S; sizes are int (N*K*P*Q < 2^31).
//
// Versions:
//   conv2d_fwd_v1         one thread per output, operands straight from global memory (baseline).
//   conv2d_fwd_v2         a block owns `rows` full output rows of one image (or whole small maps of `imgs`
//                         images) and K_BLOCK filters: the input rows (+ halo) and the filters are staged
//                         in shared memory (coalesced copies, c_chunk channels at a time); each thread
//                         keeps K_BLOCK accumulators, so one shared load of x feeds K_BLOCK FMAs and the
//                         filter reads are broadcasts. Consecutive threads = consecutive output pixels
//                         (coalesced stores; smem reads conflict-free within a row).
//   conv2d_pool_fwd_v1    fusion: one thread per 2x2 window computes its 4 outputs, writes them
//                         (needed for act'), pools them and writes argmax: no second launch, no re-read.
//   conv2d_pool_fwd_v2    the v2 tiling (shared input rows + filters, K_BLOCK register blocking) with the
//                         pooling fused: a block owns 2*rows2 conv rows (of `imgs` images); one thread per
//                         2x2 window computes its 4 outputs x K_BLOCK filters (each weight load feeds 4 FMAs);
//                         input rows staged de-interleaved (even | odd columns): conflict-free stride-2 taps.
//   conv2d_bwd_data_v1    one thread per input-gradient element, gathering (no atomics).
//   conv2d_bwd_data_v2    the v2 tiling for the full correlation: a block stages zero-padded dz rows and the
//                         filters of C_BLOCK channels in shared memory (k_chunk filters at a time); each
//                         thread keeps C_BLOCK accumulators (one shared dz load feeds C_BLOCK FMAs).
//   conv2d_bwd_data_pool_v1  fusion of conv2d_bwd_data + pool2x2_bwd (+ act' of the layer below): one thread
//                         per pooled pixel gathers its input gradient and routes it into its 2x2 window.
//   conv2d_bwd_data_pool_v2  the bwd_data_v2 tiling over the pooled map, each thread routing its C_BLOCK
//                         gradients: one launch instead of two, and dx never goes to memory.
//   conv2d_bwd_weight_v1  one thread per dw / db element looping over batch x positions (baseline).
//   conv2d_bwd_weight_v2  one block per (k, J_BLOCK taps of c*r*s): threads stride over batch x positions
//                         (coalesced dz and x reads), J_BLOCK (+ db) register accumulators, then a
//                         fixed-order two-stage shared-memory reduction (2 barriers, conflict-free):
//                         deterministic, no float atomics.
//   conv2d_bwd_weight_v3  v2 split over the batch too (grid.z): enough blocks to fill the GPU when
//                         K*C*R*S is small and N*P*Q large (C1 at batch 4096); per-split partial sums,
//                         and the last block per column (an integer ticket tagged with the state's STEP:
//                         never relies on the previous launch having reset it) adds them in a fixed order.
//
// Launch shapes (launch_plan in lenet_gpu/backends/cupy_backend/backend.py, from the device's SM count): v1
// kernels 1-D grids of 256 threads; conv2d_fwd_v2 grid (ceil(N/imgs)*tiles, ceil(K/K_BLOCK)), 1-D block >=
// imgs*rows*Q rounded to a warp, dynamic smem (imgs*c_chunk*(rows+R-1)*W + c_chunk*R*S*K_BLOCK) floats; the
// planner picks K_BLOCK (a divisor of K where it can: C1 6, C3 8/4/2), C_BLOCK, rows and imgs per launch for
// blocks of >= 4 warps that give every SM a block where the batch allows, and compiles the module with them;
// conv2d_bwd_weight_v2/v3 grid (ceil(C*R*S/J_BLOCK), K[, splits]), block BWD_THREADS.
#include "common.cuh"

#ifndef K_BLOCK
#define K_BLOCK 8  // filters per block in conv2d_fwd_v2 / conv2d_pool_fwd_v2 (register accumulators; per launch)
#endif
#ifndef C_BLOCK
#define C_BLOCK 6  // input channels per block in conv2d_bwd_data(_pool)_v2 (register accumulators; per launch)
#endif
#ifndef J_BLOCK
#define J_BLOCK 13  // weight taps per block in conv2d_bwd_weight_v2/v3 (25 = 2x13-1, 150 = 12x13-6)
#endif
#ifndef BWD_THREADS
#define BWD_THREADS 256  // block size of conv2d_bwd_weight_v2 (whole warps)
#endif
// K_BLOCK / C_BLOCK = 0 is the backend's "chosen per launch" (MODULE_DEFINES): the module is then built with the
// launch plan's width (CupyBackend.options(stem, launch.defines)), never with 0. Each guard is the only error
// a 0 gives (the width is reset to 1 after it, so no zero-size array errors follow).
#if K_BLOCK < 1
#error "K_BLOCK must be >= 1: 0 means chosen per launch; compile with the launch plan's -DK_BLOCK (8, 6, 4 or 2), or leave it undefined (8)"
#undef K_BLOCK
#define K_BLOCK 1
#endif
#if C_BLOCK < 1
#error "C_BLOCK must be >= 1: 0 means chosen per launch; compile with the launch plan's -DC_BLOCK (8, 6, 4 or 2), or leave it undefined (6)"
#undef C_BLOCK
#define C_BLOCK 1
#endif
static_assert(BWD_THREADS % 32 == 0 && BWD_THREADS <= 1024, "BWD_THREADS: whole warps, at most 1024");
static_assert(J_BLOCK >= 1 && J_BLOCK < BWD_THREADS, "J_BLOCK: 1 .. BWD_THREADS-1");

// ------------------------------------------------------------------------------------------ v1
extern "C" __global__ void conv2d_fwd_v1(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ b, float* __restrict__ y,
                                         int N, int C, int H, int W, int K, int R, int S, int act) {
    const int P = H - R + 1, Q = W - S + 1;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * K * P * Q) return;
    const int q = idx % Q, p = (idx / Q) % P, k = (idx / (P * Q)) % K, n = idx / (K * P * Q);
    float acc = b[k];
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r)
            for (int s = 0; s < S; ++s)
                acc += x[((n * C + c) * H + p + r) * W + q + s] * w[((k * C + c) * R + r) * S + s];
    y[idx] = act_fwd(acc, act);
}

// ------------------------------------------------------------------------------------------ v2
// Stage C_chunk channels of input rows [p0, p0+in_rows) (full width) of images n0 .. n0+imgs-1 (those < N)
// and the K_BLOCK filters' taps for those channels. s_x is [img][c][row][col]; s_w is [c][r][s][kk], so the
// K_BLOCK weights of one tap are contiguous (one broadcast vector load).
__device__ __forceinline__ void conv_stage(const float* __restrict__ x, const float* __restrict__ w,
                                           float* s_x, float* s_w, int n0, int imgs, int c0, int cn, int p0,
                                           int in_rows, int k0, int N, int C, int H, int W, int K, int R, int S,
                                           bool deinterleave) {
    const int tid = threadIdx.x, nt = blockDim.x;
    const int plane = in_rows * W, half = (W + 1) / 2;
    for (int i = tid; i < imgs * cn * plane; i += nt) {  // contiguous rows of each channel: coalesced
        const int ic = i / plane, rem = i - ic * plane;
        const int img = ic / cn, c = ic - img * cn;
        const int n = n0 + img, row = p0 + rem / W;
        const float v = (n < N && row < H) ? x[((size_t)(n * C + c0 + c) * H + p0) * W + rem] : 0.0f;
        if (deinterleave) {  // a staged row = its even columns, then its odd columns
            const int col = rem % W;
            s_x[i - col + ((col & 1) ? half + (col >> 1) : (col >> 1))] = v;
        } else {
            s_x[i] = v;
        }
    }
    const int taps = cn * R * S;
    for (int i = tid; i < taps * K_BLOCK; i += nt) {  // i = kk*taps + t: reads runs of taps per filter
        const int kk = i / taps, t = i - kk * taps;
        const int k = k0 + kk;
        s_w[t * K_BLOCK + kk] = k < K ? w[(size_t)k * C * R * S + c0 * R * S + t] : 0.0f;
    }
}

// Grid (ceil(N/imgs)*tiles, ceil(K/K_BLOCK)). A block owns `rows` output rows (a tile) of `imgs` images
// (imgs > 1 only when one tile is the whole image: small maps such as C3's 10x10 fill a block with
// several images). blockDim.x threads cover imgs*rows*Q pixels, looping if fewer. Dynamic smem:
// (imgs*c_chunk*(rows+R-1)*W + c_chunk*R*S*K_BLOCK) floats.
extern "C" __global__ void __launch_bounds__(1024)
conv2d_fwd_v2(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
              float* __restrict__ y, int N, int C, int H, int W, int K, int R, int S, int act, int rows,
              int c_chunk, int imgs) {
    extern __shared__ float smem[];
    const int P = H - R + 1, Q = W - S + 1;
    const int tiles = ceil_div(P, rows);
    const int nb = blockIdx.x / tiles, p0 = (blockIdx.x - nb * tiles) * rows, n0 = nb * imgs;
    const int k0 = blockIdx.y * K_BLOCK;
    const int in_rows = rows + R - 1;
    float* s_x = smem;
    float* s_w = smem + imgs * c_chunk * in_rows * W;
    const int tile_pix = rows * Q, valid_rows = min(rows, P - p0);
    for (int t0 = 0; t0 < imgs * tile_pix; t0 += blockDim.x) {  // usually one pass
        const int t = t0 + threadIdx.x;
        const int img = t / tile_pix, rem = t - img * tile_pix;
        const int pr = rem / Q, q = rem - pr * Q;
        const bool live = img < imgs && n0 + img < N && pr < valid_rows;
        float acc[K_BLOCK];
#pragma unroll
        for (int kk = 0; kk < K_BLOCK; ++kk) acc[kk] = 0.0f;
        for (int c0 = 0; c0 < C; c0 += c_chunk) {
            const int cn = min(c_chunk, C - c0);
            __syncthreads();  // the previous chunk's readers are done
            conv_stage(x, w, s_x, s_w, n0, imgs, c0, cn, p0, in_rows, k0, N, C, H, W, K, R, S, false);
            __syncthreads();
            if (live) {
                for (int c = 0; c < cn; ++c)
                    for (int r = 0; r < R; ++r) {
                        const float* xr = s_x + ((img * cn + c) * in_rows + pr + r) * W + q;
                        const float* wr = s_w + (c * R + r) * S * K_BLOCK;
                        for (int s = 0; s < S; ++s) {
                            const float xv = xr[s];
#pragma unroll
                            for (int kk = 0; kk < K_BLOCK; ++kk) acc[kk] += xv * wr[s * K_BLOCK + kk];
                        }
                    }
            }
        }
        if (live) {
            const int n = n0 + img;
#pragma unroll
            for (int kk = 0; kk < K_BLOCK; ++kk) {
                const int k = k0 + kk;
                if (k < K) y[((size_t)(n * K + k) * P + p0 + pr) * Q + q] = act_fwd(acc[kk] + b[k], act);
            }
        }
    }
}

// ------------------------------------------------------------------------------- fused conv+pool
// Pool one 2x2 window of activated outputs v[0..3] (row-major taps); first maximum wins.
__device__ __forceinline__ float pool_window(const float v[4], int mode, unsigned char* am) {
    if (mode == POOL_AVG) return (v[0] + v[1] + v[2] + v[3]) * 0.25f;
    float m = v[0];
    unsigned char a = 0;
    for (int t = 1; t < 4; ++t)
        if (v[t] > m) { m = v[t]; a = (unsigned char)t; }
    *am = a;
    return m;
}

// One thread per 2x2 window (n,k,i,j), i < ceil(P/2), j < ceil(Q/2): windows cut by an odd edge only
// write their conv outputs. yconv may be NULL (inference): then only ypool/argmax are written.
// argmax is written for mode max only.
extern "C" __global__ void conv2d_pool_fwd_v1(const float* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ b, float* __restrict__ yconv,
                                              float* __restrict__ ypool, unsigned char* __restrict__ argmax,
                                              int N, int C, int H, int W, int K, int R, int S, int act, int mode) {
    const int P = H - R + 1, Q = W - S + 1;
    const int PH = P / 2, PW = Q / 2, WH = (P + 1) / 2, WW = (Q + 1) / 2;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * K * WH * WW) return;
    const int j = idx % WW, i = (idx / WW) % WH, k = (idx / (WH * WW)) % K, n = idx / (K * WH * WW);
    float v[4];
    for (int t = 0; t < 4; ++t) {
        const int p = 2 * i + (t >> 1), q = 2 * j + (t & 1);
        v[t] = 0.0f;
        if (p >= P || q >= Q) continue;
        float acc = b[k];
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r)
                for (int s = 0; s < S; ++s)
                    acc += x[((n * C + c) * H + p + r) * W + q + s] * w[((k * C + c) * R + r) * S + s];
        v[t] = act_fwd(acc, act);
        if (yconv) yconv[((n * K + k) * P + p) * Q + q] = v[t];
    }
    if (i < PH && j < PW) {
        const int o = ((n * K + k) * PH + i) * PW + j;
        unsigned char a = 0;
        ypool[o] = pool_window(v, mode, &a);
        if (mode == POOL_MAX) argmax[o] = a;
    }
}

// The v2 tiling with pooling fused. A tile = 2*rows2 conv rows (rows2 pooled rows) of `imgs` images; one
// thread per 2x2 window (WW = ceil(Q/2) windows per row pair). Grid (ceil(N/imgs)*tiles, ceil(K/K_BLOCK)),
// dynamic smem (imgs*c_chunk*(2*rows2+R-1)*W + c_chunk*R*S*K_BLOCK) floats.
extern "C" __global__ void __launch_bounds__(1024)
conv2d_pool_fwd_v2(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                   float* __restrict__ yconv, float* __restrict__ ypool, unsigned char* __restrict__ argmax,
                   int N, int C, int H, int W, int K, int R, int S, int act, int mode, int rows2, int c_chunk,
                   int imgs) {
    extern __shared__ float smem[];
    const int P = H - R + 1, Q = W - S + 1;
    const int PH = P / 2, PW = Q / 2, WH = (P + 1) / 2, WW = (Q + 1) / 2;
    const int tiles = ceil_div(WH, rows2);
    const int nb = blockIdx.x / tiles, i0 = (blockIdx.x - nb * tiles) * rows2, n0 = nb * imgs;
    const int k0 = blockIdx.y * K_BLOCK;
    const int p0 = 2 * i0, in_rows = 2 * rows2 + R - 1, half = (W + 1) / 2;
    float* s_x = smem;
    float* s_w = smem + imgs * c_chunk * in_rows * W;
    const int tile_win = rows2 * WW, valid_rows2 = min(rows2, WH - i0);
    for (int t0 = 0; t0 < imgs * tile_win; t0 += blockDim.x) {
        const int t = t0 + threadIdx.x;
        const int img = t / tile_win, rem = t - img * tile_win;
        const int il = rem / WW, j = rem - il * WW;
        const bool live = img < imgs && n0 + img < N && il < valid_rows2;
        float acc[4][K_BLOCK];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int kk = 0; kk < K_BLOCK; ++kk) acc[u][kk] = 0.0f;
        for (int c0 = 0; c0 < C; c0 += c_chunk) {
            const int cn = min(c_chunk, C - c0);
            __syncthreads();
            conv_stage(x, w, s_x, s_w, n0, imgs, c0, cn, p0, in_rows, k0, N, C, H, W, K, R, S, true);
            __syncthreads();
            if (live) {
                for (int c = 0; c < cn; ++c)
                    for (int r = 0; r < R; ++r) {
                        // rows 2*il+r and 2*il+1+r, columns 2j+s and 2j+1+s. The rows are staged
                        // de-interleaved (even columns, then odd), so column 2j+s of thread j sits at
                        // j + const: consecutive threads read consecutive words (no 2-way bank conflict).
                        const float* x0 = s_x + ((img * cn + c) * in_rows + 2 * il + r) * W;
                        const float* x1 = x0 + W;
                        const float* wr = s_w + (c * R + r) * S * K_BLOCK;
                        for (int s = 0; s < S; ++s) {
                            const bool in1 = 2 * j + 1 + s < W;  // column 2j+1+s exists (else unused)
                            const int ia = (s & 1) ? half + j + (s >> 1) : j + (s >> 1);  // column 2j+s
                            const int ib = (s & 1) ? j + ((s + 1) >> 1) : half + j + (s >> 1);  // 2j+1+s
                            const float a0 = x0[ia], a1 = in1 ? x0[ib] : 0.0f;
                            const float c0v = x1[ia], c1v = in1 ? x1[ib] : 0.0f;
#pragma unroll
                            for (int kk = 0; kk < K_BLOCK; ++kk) {
                                const float wv = wr[s * K_BLOCK + kk];
                                acc[0][kk] += a0 * wv;
                                acc[1][kk] += a1 * wv;
                                acc[2][kk] += c0v * wv;
                                acc[3][kk] += c1v * wv;
                            }
                        }
                    }
            }
        }
        if (live) {
            const int n = n0 + img, i = i0 + il;
#pragma unroll
            for (int kk = 0; kk < K_BLOCK; ++kk) {
                const int k = k0 + kk;
                if (k >= K) continue;
                float v[4];
                for (int u = 0; u < 4; ++u) {
                    const int p = 2 * i + (u >> 1), q = 2 * j + (u & 1);
                    v[u] = act_fwd(acc[u][kk] + b[k], act);
                    if (yconv && p < P && q < Q) yconv[((size_t)(n * K + k) * P + p) * Q + q] = v[u];
                }
                if (i < PH && j < PW) {
                    const size_t o = ((size_t)(n * K + k) * PH + i) * PW + j;
                    unsigned char a = 0;
                    ypool[o] = pool_window(v, mode, &a);
                    if (mode == POOL_MAX) argmax[o] = a;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------- backward, data
extern "C" __global__ void conv2d_bwd_data_v1(const float* __restrict__ dz, const float* __restrict__ w,
                                              float* __restrict__ dx, int N, int C, int H, int W, int K,
                                              int R, int S) {
    const int P = H - R + 1, Q = W - S + 1;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * C * H * W) return;
    const int v = idx % W, h = (idx / W) % H, c = (idx / (H * W)) % C, n = idx / (C * H * W);
    float acc = 0.0f;
    for (int k = 0; k < K; ++k)
        for (int r = max(0, h - P + 1); r <= min(R - 1, h); ++r)
            for (int s = max(0, v - Q + 1); s <= min(S - 1, v); ++s)
                acc += dz[((n * K + k) * P + h - r) * Q + v - s] * w[((k * C + c) * R + r) * S + s];
    dx[idx] = acc;
}

// The v2 tiling of the full correlation, for dx of one image, C_BLOCK channels and `rows` rows of dx (H x W
// is dx's size: the convolution's input). Per chunk of k_chunk filters it stages the dz rows
// [h0-R+1, h0+rows) zero-padded by S-1 columns on each side (so the full correlation needs no bounds tests)
// and w[k][c][r][s] as s_w[k][r][s][cc]; each thread keeps C_BLOCK accumulators for one dx pixel and hands
// them to `store(h, v, acc)` (h, v: the pixel in dx; the store also sees channels c0.. c0+C_BLOCK-1).
// Grid (N*tiles, ceil(C/C_BLOCK)); dynamic smem (k_chunk*(rows+R-1)*(Q+2S-2) + k_chunk*R*S*C_BLOCK) floats.
template <class Store>
__device__ __forceinline__ void bwd_data_tile(const float* __restrict__ dz, const float* __restrict__ w, int N,
                                              int C, int H, int W, int K, int R, int S, int rows, int k_chunk,
                                              float* smem, int n, int h0, int c0, Store store) {
    const int P = H - R + 1, Q = W - S + 1, QS = Q + 2 * (S - 1), in_rows = rows + R - 1;
    float* s_dz = smem;                           // [k][row][QS], row i <-> dz row h0 - R + 1 + i
    float* s_w = smem + k_chunk * in_rows * QS;   // [k][r][s][cc]
    const int valid_rows = min(rows, H - h0);
    for (int t0 = 0; t0 < rows * W; t0 += blockDim.x) {
        const int t = t0 + threadIdx.x;
        const int hr = t / W, v = t - hr * W;
        const bool live = hr < valid_rows;
        float acc[C_BLOCK];
#pragma unroll
        for (int cc = 0; cc < C_BLOCK; ++cc) acc[cc] = 0.0f;
        for (int k0 = 0; k0 < K; k0 += k_chunk) {
            const int kn = min(k_chunk, K - k0);
            __syncthreads();
            for (int i = threadIdx.x; i < kn * in_rows * QS; i += blockDim.x) {  // rows of dz: coalesced
                const int kr = i / QS, col = i - kr * QS;
                const int kk = kr / in_rows, row = h0 - R + 1 + (kr - kk * in_rows), q = col - (S - 1);
                s_dz[i] = (row >= 0 && row < P && q >= 0 && q < Q)
                              ? dz[((size_t)(n * K + k0 + kk) * P + row) * Q + q] : 0.0f;
            }
            for (int i = threadIdx.x; i < kn * C_BLOCK * R * S; i += blockDim.x) {  // runs of R*S taps
                const int kc = i / (R * S), rs = i - kc * (R * S);
                const int kk = kc / C_BLOCK, cc = kc - kk * C_BLOCK, c = c0 + cc;
                s_w[(kk * R * S + rs) * C_BLOCK + cc] =
                    c < C ? w[((size_t)(k0 + kk) * C + c) * R * S + rs] : 0.0f;
            }
            __syncthreads();
            if (live) {
                for (int kk = 0; kk < kn; ++kk)
                    for (int r = 0; r < R; ++r) {
                        // dz row h - r  <->  staged row hr + R - 1 - r; column v - s <-> v + S - 1 - s
                        const float* dr = s_dz + (kk * in_rows + hr + R - 1 - r) * QS + v + S - 1;
                        const float* wr = s_w + (kk * R + r) * S * C_BLOCK;
                        for (int s = 0; s < S; ++s) {
                            const float g = dr[-s];
#pragma unroll
                            for (int cc = 0; cc < C_BLOCK; ++cc) acc[cc] += g * wr[s * C_BLOCK + cc];
                        }
                    }
            }
        }
        if (live) store(h0 + hr, v, acc);  // acc by reference: stays in registers once inlined
    }
}

// Grid (N*tiles, ceil(C/C_BLOCK)), 1-D block >= rows*W (rows of dx of one image, C_BLOCK channels).
extern "C" __global__ void __launch_bounds__(1024)
conv2d_bwd_data_v2(const float* __restrict__ dz, const float* __restrict__ w, float* __restrict__ dx, int N,
                   int C, int H, int W, int K, int R, int S, int rows, int k_chunk) {
    extern __shared__ float smem[];
    const int tiles = ceil_div(H, rows);
    const int n = blockIdx.x / tiles, h0 = (blockIdx.x - n * tiles) * rows;
    const int c0 = blockIdx.y * C_BLOCK;
    bwd_data_tile(dz, w, N, C, H, W, K, R, S, rows, k_chunk, smem, n, h0, c0, [&](int h, int v, const float (&acc)[C_BLOCK]) {
#pragma unroll
        for (int cc = 0; cc < C_BLOCK; ++cc)
            if (c0 + cc < C) dx[((size_t)(n * C + c0 + cc) * H + h) * W + v] = acc[cc];
    });
}

// ------------------------------------------------------------------- backward, data, through the pooling
// dz_below[n,c,h,v] = route(dx)[n,c,h,v] * act'(yconv[n,c,h,v]), dx = the data gradient of the convolution
// (its input is the pooled map, Hp x Wp = H/2 x W/2 of yconv): dx[i,j] goes to the argmax tap of window
// (i,j) (max) or dx/4 to each of its taps (avg); the odd trailing row/column of yconv, in no window, gets 0.
// This is conv2d_bwd_data + pool2x2_bwd in one launch: dx never goes to memory.

// Route one pooled pixel's gradient g into its window (2i..2i+1, 2j..2j+1) of one plane of dz_below, times
// act'(yconv); the last window of a row / column also writes the odd trailing column / row (0: in no window),
// so every element of dz_below is written exactly once. a: the window's argmax tap (max).
__device__ __forceinline__ void route_window(float g, unsigned char a, const float* __restrict__ yc,
                                             float* __restrict__ out, int i, int j, int Hp, int Wp, int H, int W,
                                             int mode, int act) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const int o = (2 * i + (t >> 1)) * W + 2 * j + (t & 1);
        const float gg = mode == POOL_AVG ? g * 0.25f : (a == (unsigned char)t ? g : 0.0f);
        out[o] = gg * act_grad(yc[o], act);
    }
    if (i == Hp - 1 && H > 2 * Hp) {  // the trailing row under this window (and the corner)
        const int v_end = j == Wp - 1 ? W : 2 * j + 2;
        for (int v = 2 * j; v < v_end; ++v) out[(H - 1) * W + v] = 0.0f * act_grad(yc[(H - 1) * W + v], act);
    }
    if (j == Wp - 1 && W > 2 * Wp)  // the trailing column beside it
        for (int h = 2 * i; h < 2 * i + 2; ++h) out[h * W + W - 1] = 0.0f * act_grad(yc[h * W + W - 1], act);
}

// v1: one thread per pooled pixel (n, c, i, j) of the convolution's input (Hp = H/2, Wp = W/2): the full
// correlation gathered from global memory, then routed into its window. argmax may be NULL (avg).
extern "C" __global__ void conv2d_bwd_data_pool_v1(const float* __restrict__ dz, const float* __restrict__ w,
                                                   const unsigned char* __restrict__ argmax,
                                                   const float* __restrict__ yconv, float* __restrict__ dz_below,
                                                   int N, int C, int H, int W, int K, int R, int S, int mode,
                                                   int act) {
    const int Hp = H / 2, Wp = W / 2, P = Hp - R + 1, Q = Wp - S + 1;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * C * Hp * Wp) return;
    const int j = idx % Wp, i = (idx / Wp) % Hp, c = (idx / (Hp * Wp)) % C, n = idx / (C * Hp * Wp);
    float g = 0.0f;
    for (int k = 0; k < K; ++k)
        for (int r = max(0, i - P + 1); r <= min(R - 1, i); ++r)
            for (int s = max(0, j - Q + 1); s <= min(S - 1, j); ++s)
                g += dz[((n * K + k) * P + i - r) * Q + j - s] * w[((k * C + c) * R + r) * S + s];
    const size_t plane = (size_t)(n * C + c) * H * W;
    route_window(g, mode == POOL_MAX ? argmax[idx] : (unsigned char)0, yconv + plane, dz_below + plane, i, j, Hp,
                 Wp, H, W, mode, act);
}

// v2: conv2d_bwd_data_v2's tiling over the pooled map (rows of Hp x Wp of one image, C_BLOCK channels, dz and
// the filters staged in shared memory), each thread routing its C_BLOCK gradients into their windows.
// Grid (N*tiles, ceil(C/C_BLOCK)) with tiles = ceil(Hp/rows); smem as conv2d_bwd_data_v2 at H, W = Hp, Wp.
// At most 512 threads a block, one block per SM at least (the routing epilogue needs up to ~128 registers:
// with a bound of 64 it spills).
extern "C" __global__ void __launch_bounds__(512, 1)
conv2d_bwd_data_pool_v2(const float* __restrict__ dz, const float* __restrict__ w,
                        const unsigned char* __restrict__ argmax, const float* __restrict__ yconv,
                        float* __restrict__ dz_below, int N, int C, int H, int W, int K, int R, int S, int mode,
                        int act, int rows, int k_chunk) {
    extern __shared__ float smem[];
    const int Hp = H / 2, Wp = W / 2;
    const int tiles = ceil_div(Hp, rows);
    const int n = blockIdx.x / tiles, h0 = (blockIdx.x - n * tiles) * rows;
    const int c0 = blockIdx.y * C_BLOCK;
    bwd_data_tile(dz, w, N, C, Hp, Wp, K, R, S, rows, k_chunk, smem, n, h0, c0,
                  [&](int i, int j, const float (&acc)[C_BLOCK]) {
#pragma unroll
                      for (int cc = 0; cc < C_BLOCK; ++cc) {
                          const int c = c0 + cc;
                          if (c < C) {
                              const size_t pooled = (size_t)(n * C + c) * Hp * Wp + (size_t)i * Wp + j;
                              const size_t plane = (size_t)(n * C + c) * H * W;
                              route_window(acc[cc], mode == POOL_MAX ? argmax[pooled] : (unsigned char)0,
                                           yconv + plane, dz_below + plane, i, j, Hp, Wp, H, W, mode, act);
                          }
                      }
                  });
}

// ------------------------------------------------------------------------------- backward, weight
// One thread per element of [dw (K*C*R*S) | db (K)].
extern "C" __global__ void conv2d_bwd_weight_v1(const float* __restrict__ x, const float* __restrict__ dz,
                                                float* __restrict__ dw, float* __restrict__ db, int N, int C,
                                                int H, int W, int K, int R, int S) {
    const int P = H - R + 1, Q = W - S + 1, CRS = C * R * S;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= K * CRS + K) return;
    if (idx >= K * CRS) {
        const int k = idx - K * CRS;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n)
            for (int pq = 0; pq < P * Q; ++pq) acc += dz[(n * K + k) * P * Q + pq];
        db[k] = acc;
        return;
    }
    const int s = idx % S, r = (idx / S) % R, c = (idx / (R * S)) % C, k = idx / CRS;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int p = 0; p < P; ++p)
            for (int q = 0; q < Q; ++q)
                acc += dz[((n * K + k) * P + p) * Q + q] * x[((n * C + c) * H + p + r) * W + q + s];
    dw[idx] = acc;
}

// Rows of per-thread partial sums: BWD_THREADS values + 8 slots for the second stage. The +8 pad makes the
// first stage conflict-free: a warp's 32 threads (4 rows x 8 segments) read 32 distinct banks.
#define RED_STRIDE (BWD_THREADS + 8)

// Block-wide sums of acc[0..J_BLOCK] in a fixed order (deterministic), two barriers and no shuffles:
// every thread stores its J_BLOCK+1 partials; thread (j, seg) adds partials seg, seg+8, ... of row j; thread j
// adds the 8 segment sums. Returns the sum of row j to thread j (j <= J_BLOCK); other threads get 0.
__device__ __forceinline__ float block_sum_rows(float (*s_red)[RED_STRIDE], const float* acc, int tid) {
#pragma unroll
    for (int j = 0; j <= J_BLOCK; ++j) s_red[j][tid] = acc[j];
    __syncthreads();
    for (int e = tid; e < (J_BLOCK + 1) * 8; e += BWD_THREADS) {
        const int j = e >> 3, seg = e & 7;
        float v = 0.0f;
        for (int m = 0; m < BWD_THREADS / 8; ++m) v += s_red[j][m * 8 + seg];
        s_red[j][BWD_THREADS + seg] = v;
    }
    __syncthreads();
    float v = 0.0f;
    if (tid <= J_BLOCK)
        for (int seg = 0; seg < 8; ++seg) v += s_red[tid][BWD_THREADS + seg];
    return v;
}

// Grid (ceil(C*R*S/J_BLOCK), K), block BWD_THREADS. Blocks with blockIdx.x == 0 also reduce db[k].
// The launch bound asks for half an SM of resident threads (<= 64 registers at 256 threads, no spills).
extern "C" __global__ void __launch_bounds__(BWD_THREADS, 2048 / BWD_THREADS / 2)
conv2d_bwd_weight_v2(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw,
                     float* __restrict__ db, int N, int C, int H, int W, int K, int R, int S) {
    __shared__ float s_red[J_BLOCK + 1][RED_STRIDE];
    const int P = H - R + 1, Q = W - S + 1, PQ = P * Q, CRS = C * R * S;
    const int k = blockIdx.y, j0 = blockIdx.x * J_BLOCK, tid = threadIdx.x;
    const bool with_db = blockIdx.x == 0;
    int xoff[J_BLOCK];  // offset of tap j inside one image of x, relative to (p, q)
#pragma unroll
    for (int j = 0; j < J_BLOCK; ++j) {
        const int t = min(j0 + j, CRS - 1);  // clamp: out-of-range taps are computed but never stored
        const int c = t / (R * S), r = (t / S) % R, s = t % S;
        xoff[j] = (c * H + r) * W + s;
    }
    float acc[J_BLOCK + 1];
#pragma unroll
    for (int j = 0; j <= J_BLOCK; ++j) acc[j] = 0.0f;
    // threads stride over the flattened (n, p, q): consecutive threads read consecutive dz and x
    for (int pos = tid; pos < N * PQ; pos += BWD_THREADS) {
        const int n = pos / PQ, pq = pos - n * PQ;
        const int p = pq / Q, q = pq - p * Q;
        const float d = dz[(size_t)(n * K + k) * PQ + pq];
        const float* xp = x + (size_t)n * C * H * W + p * W + q;
#pragma unroll
        for (int j = 0; j < J_BLOCK; ++j) acc[j] += d * xp[xoff[j]];
        acc[J_BLOCK] += d;
    }
    const float v = block_sum_rows(s_red, acc, tid);  // thread j <= J_BLOCK: the sum of row j
    if (tid < J_BLOCK && j0 + tid < CRS) dw[(size_t)k * CRS + j0 + tid] = v;
    if (tid == J_BLOCK && with_db) db[k] = v;
}

// Grid (ceil(C*R*S/J_BLOCK), K, splits), block BWD_THREADS. Split z reduces images [z*chunk, (z+1)*chunk)
// like v2 and stores its J_BLOCK (+ db) sums in partial[z][k][0..CRS] (db at index CRS); the last block of
// each (x, k) column to finish (an integer ticket, not a float atomic: common.cuh ticket_take, tagged with
// the state's STEP, or 0 when state is NULL) adds the `splits` partials in order z = 0, 1, ... and resets
// its ticket. Deterministic whatever the block order. partial: splits*K*(CRS+1) floats; tickets:
// gridDim.x*K 64-bit words holding anything but a stale count of the same STEP (zeros at first).
extern "C" __global__ void __launch_bounds__(BWD_THREADS, 2048 / BWD_THREADS / 2)
conv2d_bwd_weight_v3(const float* __restrict__ x, const float* __restrict__ dz, float* __restrict__ dw,
                     float* __restrict__ db, const int* __restrict__ state, float* partial,
                     unsigned long long* tickets, int N, int C, int H, int W, int K, int R, int S, int chunk) {
    __shared__ float s_red[J_BLOCK + 1][RED_STRIDE];
    __shared__ bool s_last;
    const int P = H - R + 1, Q = W - S + 1, PQ = P * Q, CRS = C * R * S;
    const int k = blockIdx.y, j0 = blockIdx.x * J_BLOCK, tid = threadIdx.x;
    const int splits = gridDim.z, z = blockIdx.z;
    const int n0 = z * chunk, n1 = min(N, n0 + chunk);
    int xoff[J_BLOCK];
#pragma unroll
    for (int j = 0; j < J_BLOCK; ++j) {
        const int t = min(j0 + j, CRS - 1);
        const int c = t / (R * S), r = (t / S) % R, s = t % S;
        xoff[j] = (c * H + r) * W + s;
    }
    float acc[J_BLOCK + 1];
#pragma unroll
    for (int j = 0; j <= J_BLOCK; ++j) acc[j] = 0.0f;
    for (int pos = n0 * PQ + tid; pos < n1 * PQ; pos += BWD_THREADS) {
        const int n = pos / PQ, pq = pos - n * PQ;
        const int p = pq / Q, q = pq - p * Q;
        const float d = dz[(size_t)(n * K + k) * PQ + pq];
        const float* xp = x + (size_t)n * C * H * W + p * W + q;
#pragma unroll
        for (int j = 0; j < J_BLOCK; ++j) acc[j] += d * xp[xoff[j]];
        acc[J_BLOCK] += d;
    }
    const float bsum = block_sum_rows(s_red, acc, tid);
    float* part = partial + ((size_t)z * K + k) * (CRS + 1);
    if (tid < J_BLOCK && j0 + tid < CRS) part[j0 + tid] = bsum;
    if (tid == J_BLOCK && blockIdx.x == 0) part[CRS] = bsum;
    __threadfence();  // this block's partials are visible device-wide before its ticket is taken
    __syncthreads();
    const unsigned int gen = ticket_generation(state);
    unsigned long long* ticket = &tickets[k * gridDim.x + blockIdx.x];
    if (tid == 0) s_last = ticket_take(ticket, gen, (unsigned int)splits);
    __syncthreads();
    if (!s_last) return;  // block-uniform
    __threadfence();
    // The whole block adds the `splits` partials of its J_BLOCK taps (+ db), in a fixed order: thread
    // (seg, j) sums splits seg, seg + SEGS, ... of column j (consecutive threads: consecutive columns, so the
    // reads of one split are coalesced), then thread j adds its SEGS segment sums in order.
    constexpr int COLS = J_BLOCK + 1, SEGS = BWD_THREADS / COLS;
    const int j = tid % COLS, seg = tid / COLS;
    const int t = j < J_BLOCK ? j0 + j : CRS;  // tap, or db
    const bool col_valid = j < J_BLOCK ? t < CRS : blockIdx.x == 0;
    if (seg < SEGS) {
        float v = 0.0f;
        if (col_valid)
            for (int zz = seg; zz < splits; zz += SEGS)
                v += ((volatile const float*)partial)[((size_t)zz * K + k) * (CRS + 1) + t];
        s_red[j][seg] = v;  // s_red is free again: the block's own sums were read before the ticket
    }
    __syncthreads();
    if (tid < COLS && col_valid) {
        float v = 0.0f;
        for (int sg = 0; sg < SEGS; ++sg) v += s_red[tid][sg];  // fixed order: deterministic
        if (tid < J_BLOCK) dw[(size_t)k * CRS + t] = v;
        else db[k] = v;
    }
    if (tid == 0) ticket_reset(ticket, gen);  // count 0: a repeated launch at the same STEP works too
}

// =====================================================================================================
// Routed backward (max pooling's sparsity; the op contract: docs/routed_backward.md).
//
//   gz (N,K,Hp,Wp): the routed gradient at the POOLED size, dL/d(pooled output) * act'(pooled output);
//   argmax (N,K,Hp,Wp) uint8: the tap 0..3 (row-major) of each 2x2 window the forward pass chose, so the conv
//   output it routes to is (p, q) = (2i + a/2, 2j + a%2), Hp = (H-R+1)/2, Wp = (W-S+1)/2.
//   weight grad  dw[k,c,r,s] = sum_{n,i,j} gz[n,k,i,j] * x[n,c,2i+a/2+r,2j+a%2+s];  db[k] = sum gz
//   data grad    gz_below[n,c,h,v] = (sum of gz[n,k,i,j] * w[k,c,h-p,v-q] over the routed (p,q) of every k
//                window within the filter's reach) * act'(y_below[n,c,h,v]); y_below = x, the conv's input
//                (itself the pooled activated map of the layer below), so gz_below is that layer's gz.
// Only routed positions are touched: a quarter of the dense ops' multiply-adds (C3 + C1 of LeNet-5: 598K ->
// 149K MAC per image for the two weight gradients and C3's data gradient), and no un-pooled map is read.
// No float atomics: every sum runs in a fixed order (deterministic).
//
// Versions:
//   conv2d_bwd_weight_routed_v1  one thread per dw element (K*C*R*S) and per db element (K), each looping
//                         over (n, i, j) in order, operands from global memory. The readable baseline:
//                         K*C*R*S threads (C3: 2,400; C1: 150) each a serial chain of N*Hp*Wp FMAs.
//                         Per image: C3 60,000 MAC + C1 29,400 MAC; gz/argmax re-read by every (c,r,s)
//                         thread of a filter (from L1/L2), x gathered.
//                         Estimate (H200, chain length): the C1 chain is N*196 dependent FMAs with a gather
//                         each (~ 30 cycles an iteration from L1): batch 64 ~ 0.2 ms, batch 4096 ~ 13 ms
//                         (C3: N*25 iterations over 2,400 threads: ~ 25 us / ~ 1.6 ms). A baseline only.
//   conv2d_bwd_data_routed_v1    one thread per gz_below element gathering over (k, r, s): the tap's conv
//                         output (h-r, v-s) counts when it lies in a pooled window and is that window's
//                         route. Per image (C3 of LeNet-5): 1,176 threads x 400 tap checks, 60,000 MAC (a
//                         quarter of dense). Estimate (H200, issue slots): ~ 12 instructions a tap check -> 5.6 M thread-
//                         instructions = 176 K warp-instructions an image; at ~ 2 warp-instructions a clock
//                         an SM: batch 64 ~ 45 us (1 wave of 75,264 threads), batch 4096 ~ 1.4 ms.
// =====================================================================================================

extern "C" __global__ void conv2d_bwd_weight_routed_v1(const float* __restrict__ x, const float* __restrict__ gz,
                                                       const unsigned char* __restrict__ argmax,
                                                       float* __restrict__ dw, float* __restrict__ db, int N, int C,
                                                       int H, int W, int K, int R, int S) {
    const int Hp = (H - R + 1) / 2, Wp = (W - S + 1) / 2, CRS = C * R * S;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= K * CRS + K) return;
    if (idx >= K * CRS) {  // db[k]: the plain sum of gz, (n, i, j) in order
        const int k = idx - K * CRS;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n)
            for (int e = 0; e < Hp * Wp; ++e) acc += gz[(size_t)(n * K + k) * Hp * Wp + e];
        db[k] = acc;
        return;
    }
    const int k = idx / CRS, t = idx - k * CRS, c = t / (R * S), r = (t / S) % R, s = t % S;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n) {
        const size_t g0 = (size_t)(n * K + k) * Hp * Wp;
        const float* xp = x + ((size_t)(n * C + c) * H + r) * W + s;
        for (int i = 0; i < Hp; ++i)
            for (int j = 0; j < Wp; ++j) {
                const int a = argmax[g0 + i * Wp + j];
                acc = fmaf(gz[g0 + i * Wp + j], xp[(2 * i + (a >> 1)) * W + 2 * j + (a & 1)], acc);
            }
    }
    dw[idx] = acc;
}

extern "C" __global__ void conv2d_bwd_data_routed_v1(const float* __restrict__ gz, const float* __restrict__ w,
                                                     const unsigned char* __restrict__ argmax,
                                                     const float* __restrict__ y_below, float* __restrict__ gz_below,
                                                     int N, int C, int H, int W, int K, int R, int S, int act) {
    const int Hp = (H - R + 1) / 2, Wp = (W - S + 1) / 2;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * C * H * W) return;
    const int v = idx % W, h = (idx / W) % H, c = (idx / (H * W)) % C, n = idx / (C * H * W);
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
        const size_t g0 = (size_t)(n * K + k) * Hp * Wp;
        for (int r = 0; r < R; ++r) {
            const int p = h - r;  // the conv output row this tap reads x from
            if (p < 0 || p >= 2 * Hp) continue;  // outside the map, or its odd trailing row (in no window)
            for (int s = 0; s < S; ++s) {
                const int q = v - s;
                if (q < 0 || q >= 2 * Wp) continue;
                const size_t e = g0 + (p >> 1) * Wp + (q >> 1);
                if (argmax[e] == (unsigned char)(((p & 1) << 1) | (q & 1)))
                    acc = fmaf(gz[e], w[((k * C + c) * R + r) * S + s], acc);
            }
        }
    }
    gz_below[idx] = acc * act_grad(y_below[idx], act);
}

// ----------------------------------------------------------------------------------- routed, v2
// Compile-time geometry, set per launch by the planner (-D): RT_R x RT_S filters, RT_C input channels (data
// gradient); every tap loop unrolls.
//   conv2d_bwd_weight_routed_v2  two launches of one kernel, no atomics, no tickets.
//                         phase 0, grid (K, C, splits): block (k, c, z) strides over the routed windows (n, i, j)
//                         of images [z*chunk, (z+1)*chunk); a thread keeps RT_R*RT_S (+ db) accumulators, one
//                         gz and one route per window feeding RT_R*RT_S FMAs on the routed patch of x (L1);
//                         a fixed-order two-stage block reduction writes partial[z][k][c*R*S + t] (db: [CRS]).
//                         phase 1, a thread per dw / db element: the `splits` partials added in order z = 0, 1...
//                         Per image: C3 60,000 + C1 29,400 MAC (vs 240,000 + 117,600 dense), gz + routes 1 B +
//                         4 B a window. Estimate (H200, issue slots: ~ 2.2 instructions a MAC, ~ 2 warp-
//                         instructions a clock an SM): batch 4096, C3 576 blocks ~ 35 us + C1 528 blocks ~ 17 us;
//                         batch 64 ~ 4-6 us a layer (one partial wave: latency-bound) + ~ 3 us a reduce launch.
//   conv2d_bwd_data_routed_v2    a thread per (n, h, v) of gz_below with RT_C channel accumulators: for each
//                         filter k it visits only the <= ((RT_R+2)/2) x ((RT_S+2)/2) pooled windows whose 2x2
//                         taps its filter can reach (9 for 5x5, instead of 25 taps) and adds gz * w[k, :, r, s]
//                         where the window's route falls inside the filter; every channel shares the route test.
//                         Per image (C3): 196 threads x 16 x 9 window tests, 60,000 MAC. Estimate (H200, issue
//                         slots: ~ 2.5 K instructions a thread): batch 4096 ~ 0.15 ms, batch 64 ~ 15 us
//                         (latency-bound: 98 blocks of 128 threads).
#ifndef RT_R
#define RT_R 5  // filter rows (routed v2; per launch)
#endif
#ifndef RT_S
#define RT_S 5  // filter columns (routed v2; per launch)
#endif
#ifndef RT_C
#define RT_C 6  // input channels (conv2d_bwd_data_routed_v2; per launch)
#endif
#define RT_THREADS 256      // conv2d_bwd_weight_routed_v2 block size
#define RT_DATA_THREADS 128  // conv2d_bwd_data_routed_v2 block size
#define RT_RS (RT_R * RT_S)
#define RT_STRIDE (RT_THREADS + 8)  // a row of per-thread partials + 8 segment sums (conflict-free stage 1)
static_assert(RT_RS + 1 <= RT_THREADS / 8, "routed v2: (R*S + 1) * 8 reduction segments must fit one pass");

extern "C" __global__ void __launch_bounds__(RT_THREADS)
conv2d_bwd_weight_routed_v2(const float* __restrict__ x, const float* __restrict__ gz,
                            const unsigned char* __restrict__ argmax, float* __restrict__ dw, float* __restrict__ db,
                            float* __restrict__ partial, int N, int C, int H, int W, int K, int chunk, int splits,
                            int phase) {
    const int Hp = (H - RT_R + 1) / 2, Wp = (W - RT_S + 1) / 2, HW = Hp * Wp, CRS = C * RT_RS;
    const int tid = threadIdx.x;
    if (phase == 1) {  // the partials of every split, added in split order
        const int idx = blockIdx.x * RT_THREADS + tid;
        if (idx >= K * CRS + K) return;
        const bool is_db = idx >= K * CRS;
        const int k = is_db ? idx - K * CRS : idx / CRS, t = is_db ? CRS : idx - k * CRS;
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += partial[((size_t)z * K + k) * (CRS + 1) + t];
        if (is_db) db[k] = v;
        else dw[idx] = v;
        return;
    }
    __shared__ float s_red[RT_RS + 1][RT_STRIDE];
    const int k = blockIdx.x, c = blockIdx.y, z = blockIdx.z;
    const int n0 = z * chunk, n1 = min(N, n0 + chunk);
    float acc[RT_RS + 1];
#pragma unroll
    for (int t = 0; t <= RT_RS; ++t) acc[t] = 0.0f;
    for (int pos = n0 * HW + tid; pos < n1 * HW; pos += RT_THREADS) {  // routed windows (n, i, j), in order
        const int n = pos / HW, e = pos - n * HW, i = e / Wp, j = e - i * Wp;
        const size_t gi = (size_t)(n * K + k) * HW + e;
        const float g = gz[gi];
        const int a = argmax[gi];
        const float* xp = x + ((size_t)(n * C + c) * H + 2 * i + (a >> 1)) * W + 2 * j + (a & 1);
#pragma unroll
        for (int r = 0; r < RT_R; ++r)
#pragma unroll
            for (int s = 0; s < RT_S; ++s) acc[r * RT_S + s] = fmaf(g, __ldg(xp + r * W + s), acc[r * RT_S + s]);
        acc[RT_RS] += g;
    }
    // fixed-order block sums: thread (t, seg) adds partials seg, seg + 8, ... of row t; thread t the 8 segments
#pragma unroll
    for (int t = 0; t <= RT_RS; ++t) s_red[t][tid] = acc[t];
    __syncthreads();
    if (tid < (RT_RS + 1) * 8) {
        const int t = tid >> 3, seg = tid & 7;
        float v = 0.0f;
        for (int m = 0; m < RT_THREADS / 8; ++m) v += s_red[t][m * 8 + seg];
        s_red[t][RT_THREADS + seg] = v;
    }
    __syncthreads();
    if (tid <= RT_RS && (tid < RT_RS || c == 0)) {
        float v = 0.0f;
        for (int seg = 0; seg < 8; ++seg) v += s_red[tid][RT_THREADS + seg];
        partial[((size_t)z * K + k) * (CRS + 1) + (tid < RT_RS ? c * RT_RS + tid : CRS)] = v;
    }
}

extern "C" __global__ void __launch_bounds__(RT_DATA_THREADS)
conv2d_bwd_data_routed_v2(const float* __restrict__ gz, const float* __restrict__ w,
                          const unsigned char* __restrict__ argmax, const float* __restrict__ y_below,
                          float* __restrict__ gz_below, int N, int H, int W, int K, int act) {
    constexpr int NI = (RT_R + 2) / 2, NJ = (RT_S + 2) / 2;  // windows a filter row / column can reach
    const int Hp = (H - RT_R + 1) / 2, Wp = (W - RT_S + 1) / 2, HW = Hp * Wp;
    const int idx = blockIdx.x * RT_DATA_THREADS + threadIdx.x;
    if (idx >= N * H * W) return;
    const int v = idx % W, h = (idx / W) % H, n = idx / (H * W);
    // windows i whose rows {2i, 2i+1} meet [h-R+1, h]: floor((h-R+1)/2) <= i <= floor(h/2); j likewise
    const int i0 = max(0, (h - RT_R + 1) / 2), i1 = min(Hp - 1, h / 2);
    const int j0 = max(0, (v - RT_S + 1) / 2), j1 = min(Wp - 1, v / 2);
    float acc[RT_C];
#pragma unroll
    for (int c = 0; c < RT_C; ++c) acc[c] = 0.0f;
    for (int k = 0; k < K; ++k) {
        const size_t g0 = (size_t)(n * K + k) * HW;
#pragma unroll
        for (int di = 0; di < NI; ++di) {
            const int i = i0 + di;
#pragma unroll
            for (int dj = 0; dj < NJ; ++dj) {
                const int j = j0 + dj;
                if (i <= i1 && j <= j1) {
                    const int a = argmax[g0 + i * Wp + j];
                    const int r = h - 2 * i - (a >> 1), s = v - 2 * j - (a & 1);
                    if (r >= 0 && r < RT_R && s >= 0 && s < RT_S) {  // the route lies under the filter
                        const float g = gz[g0 + i * Wp + j];
                        const float* wk = w + ((size_t)k * RT_C * RT_R + r) * RT_S + s;
#pragma unroll
                        for (int c = 0; c < RT_C; ++c) acc[c] = fmaf(g, __ldg(wk + c * RT_RS), acc[c]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < RT_C; ++c) {
        const size_t o = ((size_t)(n * RT_C + c) * H + h) * W + v;
        gz_below[o] = acc[c] * act_grad(y_below[o], act);
    }
}
