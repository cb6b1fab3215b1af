// dense.cu -- fully connected layers, float32, row-major.
//
//   forward   y[n,o] = act(b[o] + sum_i x[n,i] * w[o,i])
//   backward  dz = dy * act'(y);  dx[n,i] = sum_o dz[n,o] * w[o,i] (optional);
//             dw[o,i] = sum_n dz[n,o] * x[n,i];  db[o] = sum_n dz[n,o]
//
// Shapes: x (N,I), w (O,I), b (O,), y and dy (N,O), dx (N,I). Any N, I, O (N*I, O*I < 2^31).
//
// Versions:
//   dense_fwd_v1  one thread per output (n,o); threads of a warp share n (x broadcast) but read w rows
//                 I floats apart (baseline).
//   dense_fwd_v2  shared-memory tiled GEMM: a block computes a (TILE_N*RN) x TILE_O tile; x and w tiles of
//                 TILE_I columns are copied with coalesced row reads, w stored transposed with a +1 pad
//                 (conflict-free), and each thread keeps RN accumulators (rows ty + TILE_N*u) so one
//                 shared w load feeds RN FMAs.
//   dense_fwd_v3  one warp per output (n, o) for small batches (GEMV shape): 32 lanes read the x and w rows
//                 with consecutive addresses (coalesced), then a fixed xor-shuffle tree (deterministic);
//                 meant for batches too small to fill a GPU with v2's tiles.
//   dense_bwd_v1  one launch for dx, dw and db over the concatenated index space [dx | dw | db], one thread
//                 per element, act' recomputed from y on the fly; every sum has a fixed order.
//   dense_bwd_v2  the same single launch, each thread computing VEC consecutive i of a dx or dw row: the
//                 dz = dy*act'(y) value (two loads + act') is shared by VEC outputs and a warp still reads
//                 consecutive addresses; VEC times fewer threads and blocks.
//   dense_bwd_v3  shared-memory tiled GEMMs in one launch: blocks of the grid are dx tiles (dz . w), then
//                 dw tiles (dz^T . x), then db blocks. A block stages BT_K-deep slices of dz (computed as
//                 dy*act'(y) once per element while staging) and of w or x, padded (conflict-free reads);
//                 each thread accumulates 4 outputs of a BT_M x BT_N tile (dz from shared is a broadcast).
#include "common.cuh"

#ifndef TILE_O
#define TILE_O 16  // outputs per block in dense_fwd_v2 (threadIdx.x)
#endif
#ifndef TILE_N
#define TILE_N 16  // thread rows per block in dense_fwd_v2 (threadIdx.y)
#endif
#ifndef RN
#define RN 4  // rows of x per thread in dense_fwd_v2: a block covers TILE_N*RN rows
#endif
#ifndef TILE_I
#define TILE_I 32  // reduction slice staged per step in dense_fwd_v2 (fewer barriers per I)
#endif
#ifndef VEC
#define VEC 4  // consecutive outputs per thread in dense_bwd_v2
#endif
static_assert(TILE_O * TILE_N <= 1024, "dense_fwd_v2: TILE_O*TILE_N threads per block");
// dense_bwd_v3 tiles: 256 threads = 32 columns x 8 rows, each thread 4 rows of a 32 x 32 output tile.
#define BT_M 32
#define BT_N 32
#define BT_K 16
#define BT_THREADS 256

extern "C" __global__ void dense_fwd_v1(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ b, float* __restrict__ y, int N, int I, int O,
                                        int act) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * O) return;
    const int o = idx % O, n = idx / O;
    float acc = b[o];
    for (int i = 0; i < I; ++i) acc += x[n * I + i] * w[o * I + i];
    y[idx] = act_fwd(acc, act);
}

// Grid (ceil(O/TILE_O), ceil(N/(TILE_N*RN))), block (TILE_O, TILE_N).
extern "C" __global__ void __launch_bounds__(TILE_O * TILE_N)
dense_fwd_v2(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
             float* __restrict__ y, int N, int I, int O, int act) {
    __shared__ float s_x[TILE_N * RN][TILE_I + 1];
    __shared__ float s_w[TILE_I][TILE_O + 1];  // transposed: s_w[i][o]
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TILE_O + tx;
    const int o0 = blockIdx.x * TILE_O, n0 = blockIdx.y * TILE_N * RN;
    float acc[RN];
#pragma unroll
    for (int u = 0; u < RN; ++u) acc[u] = 0.0f;
    for (int i0 = 0; i0 < I; i0 += TILE_I) {
        // x tile: TILE_N*RN rows x TILE_I columns, a row's TILE_I floats read by consecutive threads
        for (int e = tid; e < TILE_N * RN * TILE_I; e += TILE_O * TILE_N) {
            const int r = e / TILE_I, c = e % TILE_I;
            const int n = n0 + r, i = i0 + c;
            s_x[r][c] = (n < N && i < I) ? x[(size_t)n * I + i] : 0.0f;
        }
        for (int e = tid; e < TILE_O * TILE_I; e += TILE_O * TILE_N) {
            const int r = e / TILE_I, c = e % TILE_I;
            const int o = o0 + r, i = i0 + c;
            s_w[c][r] = (o < O && i < I) ? w[(size_t)o * I + i] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < TILE_I; ++c) {
            const float wv = s_w[c][tx];
#pragma unroll
            for (int u = 0; u < RN; ++u) acc[u] += s_x[ty + TILE_N * u][c] * wv;
        }
        __syncthreads();
    }
    const int o = o0 + tx;
    if (o >= O) return;
    const float bo = b[o];
#pragma unroll
    for (int u = 0; u < RN; ++u) {
        const int n = n0 + ty + TILE_N * u;
        if (n < N) y[(size_t)n * O + o] = act_fwd(acc[u] + bo, act);
    }
}

// Grid ceil(N*O / (blockDim.x/32)), block a multiple of 32: warp g of the grid owns output (n, o) = (g/O, g%O).
extern "C" __global__ void dense_fwd_v3(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ b, float* __restrict__ y, int N, int I, int O,
                                        int act) {
    const int lane = threadIdx.x & 31;
    const int g = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (g >= N * O) return;  // warp-uniform: whole warps leave together
    const int o = g % O, n = g / O;
    const float* xr = x + (size_t)n * I;
    const float* wr = w + (size_t)o * I;
    float acc = 0.0f;
    for (int i = lane; i < I; i += 32) acc += xr[i] * wr[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[g] = act_fwd(acc + b[o], act);
}

// One thread per element of [dx (N*I, only when dx != NULL) | dw (O*I) | db (O)].
extern "C" __global__ void dense_bwd_v1(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ y, const float* __restrict__ dy,
                                        float* __restrict__ dx, float* __restrict__ dw, float* __restrict__ db,
                                        int N, int I, int O, int act) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const int ndx = dx ? N * I : 0;
    if (idx < ndx) {  // dx[n,i]: threads along i read w rows coalesced; dz[n,:] is a broadcast
        const int i = idx % I, n = idx / I;
        float acc = 0.0f;
        for (int o = 0; o < O; ++o) {
            const int e = n * O + o;
            acc += dy[e] * act_grad(y[e], act) * w[o * I + i];
        }
        dx[idx] = acc;
        return;
    }
    idx -= ndx;
    if (idx < O * I) {  // dw[o,i]: threads along i read x rows coalesced
        const int i = idx % I, o = idx / I;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const int e = n * O + o;
            acc += dy[e] * act_grad(y[e], act) * x[n * I + i];
        }
        dw[idx] = acc;
        return;
    }
    idx -= O * I;
    if (idx < O) {
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const int e = n * O + idx;
            acc += dy[e] * act_grad(y[e], act);
        }
        db[idx] = acc;
    }
}

// One thread per VEC consecutive elements of a row of [dx (N rows of I, only when dx != NULL) | dw (O rows
// of I)], then one thread per db element. A row of length I has ceil(I/VEC) groups.
extern "C" __global__ void dense_bwd_v2(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ y, const float* __restrict__ dy,
                                        float* __restrict__ dx, float* __restrict__ dw, float* __restrict__ db,
                                        int N, int I, int O, int act) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const int G = (I + VEC - 1) / VEC;  // groups per row
    const int ndx = dx ? N * G : 0;
    if (idx < ndx + O * G) {
        const bool is_dx = idx < ndx;
        const int e = is_dx ? idx : idx - ndx;
        const int row = e / G, i0 = (e - row * G) * VEC;
        float acc[VEC];
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] = 0.0f;
        if (is_dx) {  // dx[row=n, i] = sum_o dz[n,o] w[o,i]
            for (int o = 0; o < O; ++o) {
                const int ez = row * O + o;
                const float d = dy[ez] * act_grad(y[ez], act);
                const float* wr = w + (size_t)o * I + i0;
#pragma unroll
                for (int u = 0; u < VEC; ++u)
                    if (i0 + u < I) acc[u] += d * wr[u];
            }
        } else {  // dw[row=o, i] = sum_n dz[n,o] x[n,i]
            for (int n = 0; n < N; ++n) {
                const int ez = n * O + row;
                const float d = dy[ez] * act_grad(y[ez], act);
                const float* xr = x + (size_t)n * I + i0;
#pragma unroll
                for (int u = 0; u < VEC; ++u)
                    if (i0 + u < I) acc[u] += d * xr[u];
            }
        }
        float* out = (is_dx ? dx : dw) + (size_t)row * I + i0;
#pragma unroll
        for (int u = 0; u < VEC; ++u)
            if (i0 + u < I) out[u] = acc[u];
        return;
    }
    idx -= ndx + O * G;
    if (idx < O) {
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const int e = n * O + idx;
            acc += dy[e] * act_grad(y[e], act);
        }
        db[idx] = acc;
    }
}

// One BT_M x BT_N tile of C = A^T-or-A . B over k, where B(k, n) = b[k*ldb + n] (row-major, k-major) and
// A(k, m) = dz at element e = a_kmajor ? k*O + m : m*O + k, dz[e] = dy[e]*act'(y[e]).
//   dw: C = dw (O x I), m = o, n = i, k = batch row:  A k-major, B = x.
//   dx: C = dx (N x I), m = batch row, n = i, k = o:   A m-major, B = w.
__device__ __forceinline__ void bwd_gemm_tile(float (*s_a)[BT_M + 1], float (*s_b)[BT_N + 1],
                                              const float* __restrict__ dy, const float* __restrict__ y, int act,
                                              int O, bool a_kmajor, const float* __restrict__ bmat, int ldb,
                                              float* __restrict__ c, int M, int Ncols, int Kdim, int m0, int n0) {
    const int tid = threadIdx.x, tx = tid % BT_N, ty = tid / BT_N;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < Kdim; k0 += BT_K) {
        for (int e = tid; e < BT_K * BT_M; e += BT_THREADS) {
            // k-major A: consecutive threads take consecutive m (contiguous in dz); m-major: consecutive k
            const int kk = a_kmajor ? e / BT_M : e % BT_K, mm = a_kmajor ? e % BT_M : e / BT_K;
            const int k = k0 + kk, m = m0 + mm;
            float v = 0.0f;
            if (k < Kdim && m < M) {
                const int ez = a_kmajor ? k * O + m : m * O + k;
                v = dy[ez] * act_grad(y[ez], act);
            }
            s_a[kk][mm] = v;
        }
        for (int e = tid; e < BT_K * BT_N; e += BT_THREADS) {  // rows of b: coalesced
            const int kk = e / BT_N, nn = e % BT_N;
            const int k = k0 + kk, n = n0 + nn;
            s_b[kk][nn] = (k < Kdim && n < Ncols) ? bmat[(size_t)k * ldb + n] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BT_K; ++kk) {
            const float bv = s_b[kk][tx];
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[u] += s_a[kk][ty + 8 * u] * bv;  // same ty in a warp: broadcast
        }
        __syncthreads();
    }
    const int n = n0 + tx;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int m = m0 + ty + 8 * u;
        if (m < M && n < Ncols) c[(size_t)m * Ncols + n] = acc[u];
    }
}

// 1-D grid of BT_THREADS blocks: [dx tiles (ceil(N/32)*ceil(I/32), when dx != NULL) | dw tiles
// (ceil(O/32)*ceil(I/32)) | db blocks (ceil(O/BT_THREADS))]. The region is block-uniform.
extern "C" __global__ void __launch_bounds__(BT_THREADS)
dense_bwd_v3(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ y,
             const float* __restrict__ dy, float* __restrict__ dx, float* __restrict__ dw, float* __restrict__ db,
             int N, int I, int O, int act) {
    __shared__ float s_a[BT_K][BT_M + 1];  // dz slice, [k][m]
    __shared__ float s_b[BT_K][BT_N + 1];  // w or x slice, [k][n]
    const int tn = (I + BT_N - 1) / BT_N;
    const int ndx = dx ? ((N + BT_M - 1) / BT_M) * tn : 0, ndw = ((O + BT_M - 1) / BT_M) * tn;
    int b = blockIdx.x;
    if (b < ndx) {
        bwd_gemm_tile(s_a, s_b, dy, y, act, O, false, w, I, dx, N, I, O, (b / tn) * BT_M, (b % tn) * BT_N);
        return;
    }
    b -= ndx;
    if (b < ndw) {
        bwd_gemm_tile(s_a, s_b, dy, y, act, O, true, x, I, dw, O, I, N, (b / tn) * BT_M, (b % tn) * BT_N);
        return;
    }
    b -= ndw;
    const int o = b * BT_THREADS + threadIdx.x;
    if (o < O) {
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {
            const int e = n * O + o;
            acc += dy[e] * act_grad(y[e], act);
        }
        db[o] = acc;
    }
}
