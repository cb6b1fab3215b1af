// head.cu -- LeNet-5's dense head trained as one op: C5 -> F6 -> output -> softmax cross-entropy -> back to C3.
//
//   h1  = act(x w1^T + b1)   (B,H1)         x = the pooled map S4 (B,C,Hp,Wp) read as (B,I), I = C*Hp*Wp
//   h2  = act(h1 w2^T + b2)  (B,H2)
//   z   = h2 w3^T + b3       (B,NC)         logits
//   dz3 = (softmax(z) - onehot(label)) / B;  loss_b = logsumexp(z_b) - z_b[label_b];  hit_b = [first argmax == label]
//   dz2 = (dz3 w3) * act'(h2);   dz1 = (dz2 w2) * act'(h1);   dx = dz1 w1  (B,I), the gradient at S4
//   dw3 = dz3^T h2, db3 = sum_b dz3;  dw2 = dz2^T h1, db2;  dw1 = dz1^T x, db1          (overwritten)
//   dz_conv (B,C,H,W) = route(dx) * act'(yconv): max -> the argmax tap of each 2x2 window, avg -> dx/4 to each
//                       tap; taps outside every window (an odd trailing row/column) 0. C3's pre-activation grad.
//   yconv == NULL (max only; the routed step, docs/routed_backward.md): dz_conv (B,C,Hp,Wp) has x's shape and
//                       gets the routed gradient gz = dx * act'(x) (the pooled value is yconv at the routed tap),
//                       for conv2d_bwd_weight_routed / conv2d_bwd_data_routed; argmax is not read.
//   stats[STEP_IN_EPOCH mod S] = [sum_b loss_b, sum_b hit_b]                              (overwritten)
//
// Shapes: w1 (H1,I), w2 (H2,H1), w3 (NC,H2); labels (B,) int32; argmax (B,C,Hp,Wp) uint8 (max only); yconv and
// dz_conv (B,C,H,W) with Hp = H/2, Wp = W/2; state (8,) int32 (lenet_gpu.stepstate); stats (S,2). Any sizes.
//
// Two launches, no atomics, no tickets (nothing a failed launch could leave half-done for the next one):
//   head_train_v<N>        "rows": a block owns `rows` rows of the batch and runs the whole chain for them:
//                          h1, h2, logits, the loss row, dz3, dz2, dz1 (to scratch) and the rows of dz_conv.
//   head_train_wgrad_v<N>  the weight gradients: every element a sum over all B rows in row order; the last
//                          block sums the per-row loss/hit in row order into the stats row.
// Scratch (the launcher allocates it at the first call at a shape): dz1 (B,H1), dz2 (B,H2), dz3 (B,NC), rowstat (B,2).
//
// Versions:
//   head_train_v1 / head_train_wgrad_v1  one thread per output of each phase, operands from global memory
//                          (intermediates in the outputs and the scratch; barriers between phases); wgrad: one
//                          thread per weight-gradient element looping over the batch. The readable baseline.
//   head_train_v2 / head_train_wgrad_v2  rows: the block's rows and every intermediate in shared memory; the
//                          three forward products warp-cooperative (rows_gemv.cuh: a warp per HEAD_F outputs, lanes
//                          stride the reduction axis: coalesced weight rows, each weight feeding `rows` FMAs; a
//                          butterfly transpose-reduction of the partial sums, fixed order); the backward products
//                          one thread per column with `rows` register accumulators (coalesced weight reads).
//                          wgrad: 16x32 output tiles (bias = a column of ones) over 32-row chunks staged in shared
//                          memory, 2x2 outputs per thread, 4 groups of threads splitting the batch (partials added
//                          in group order); one more block sums the stats with a fixed-order tree.
//   head_train_v3 / head_train_wgrad_v3  rows: one row of the batch a block of 512 threads, the geometry compiled in
//                          (HEAD_C, HEAD_HP, HEAD_WP, HEAD_H, HEAD_W, HEAD_H1, HEAD_H2, HEAD_NC: every loop a constant
//                          trip count, unrolled; no run-time integer division). x, w2 and w3 staged in shared memory
//                          in one round trip (w2 read once, not twice); C5's forward split across 15 warps of 8
//                          outputs, lanes along the row (104 independent coalesced loads per lane); F6 and the output
//                          layer from shared memory the same way; the loss row; the two small backward products split
//                          in parts of >= 8 terms per thread (partials added in part order); C5's data gradient with
//                          the forward's warp/lane footprint of w1 (104 loads per lane), per-warp partials (over w2's
//                          copy) added in warp order, routed into dz_conv. wgrad: v2's tiles, geometry compiled in.
//                          The launcher uses v3's rows kernel while v2 would take one row a block (batch <= 264, one
//                          wave at 2 blocks an SM) and its 49,040 B of shared memory fit; beyond, v4's rows kernel
//                          where its 8-row blocks fill the SMs (batch >= 1,049), else v2's.
//   head_train_v4          rows, large batch: 8, 16 or 32 rows a block (HEAD4_ROWS), a warp per 4 rows; every product
//                          a register-tiled GEMM (4 rows x 4 or 7 columns of 32 a thread) instead of v2's warp per
//                          output / thread per column; the geometry compiled in as v3's. Below.
//   head_train_wgrad_v4    the weight gradients of v3's and v4's plans (since 2026-12-07): v3's tiles and sums (the
//                          same bits) with the chunk staging pipelined: the next chunk's loads are in flight during
//                          this chunk's unrolled k steps. Below.
//
// v3's cost at LeNet-5 (ESTIMATED, NOT MEASURED; H200: 132 SMs, ~1.98 GHz; assumed L2 -> SM ~64 B/clk an SM and
// ~5.5-7 TB/s in all):
//   FLOPs a row: forward 58,920 MACs + backward data 58,920 = 235,680 FLOP (15.1 MFLOP at batch 64); wgrad 58,920 MACs.
//   L2 bytes a row (= a block): w1 twice (384,000: forward and data gradient), w2 once (40,320), w3 (3,360), x and
//   biases (2,456), writes ~3.3 KB (routed dz_conv 1,600 B): ~433 KB (v2: ~471 KB, w2 and w3 read twice).
//   Batch 64 (64 blocks, one an SM): L2 bytes 27.7 MB / 5.5-7 TB/s = 4.0-5.0 us (per SM: 433 KB / 64 B/clk = 3.4 us);
//   chain: 9 barriers, the staging round trip, the loss row (one thread, 10 expf) and the short shared-memory phases
//   ~1-1.5 us; issue slots ~1.1 K instructions a thread (PTX: 2,747 static, mostly straight-line) x 16 warps / 4
//   schedulers = ~2.2 us (overlapped with the loads). Rows kernel ~5-7 us
//   (v2: 21.7 measured); wgrad v3 = v2's sums (3.4 us measured): head_train ~8-10 us at batch 64 (v2: 25.1).
//   Batch 4096: v2's rows kernel at 8 rows a block (149 us measured) + wgrad v3 (v2's sums: 92 us measured): ~0.24 ms,
//   the same as v2 (waves: 4096 rows at one a block would be 15.5 waves of 2 x 132 blocks streaming 1.77 GB from L2,
//   ~0.3 ms: worse than v2's 8-row blocks, so not taken).
//
// Launch shapes (lenet_gpu/backends/cupy_backend/fused.py): rows kernels grid ceil(B/rows), block HEAD_THREADS;
// v1 takes `rows` as an argument, v2 as the compile-time HEAD_ROWS (1, 2, 4 or 8: fewer rows per block at small
// batches so the batch spreads over the GPU), dynamic smem HEAD_ROWS*(I + 2*H1 + 2*H2 + 2*NC) floats; wgrad v1 a
// 1-D grid over H1*(I+1) + H2*(H1+1) + NC*(H2+1) + 1 threads, v2 one block per 16x32 tile of [dw|db] of each layer
// + 1, block WG_THREADS (v1) / WG2_THREADS (v2). v3: rows grid B, block HEAD3_THREADS, dynamic smem
// head3::SMEM_FLOATS floats (fused.head_v3_smem); wgrad as v2.
#include "common.cuh"
#include "rows_gemv.cuh"

#ifndef HEAD_THREADS
#define HEAD_THREADS 256  // block size of the rows kernels (whole warps)
#endif
#define WG_THREADS 128  // wgrad v1 block size; v2: threads of one batch group (8 x 16 of 2x2 outputs: the tile)
#define WG_TO 16        // wgrad v2 tile: outputs (rows of dw) per block
#define WG_TI 32        // wgrad v2 tile: columns of [dw | db] per block
#define WG_KC 32        // wgrad v2: batch rows staged per chunk
#ifndef HEAD_ROWS
#define HEAD_ROWS 8  // head_train_v2: rows of the batch a block owns (1, 2, 4 or 8; the launcher picks per batch)
#endif
static_assert(HEAD_ROWS == 1 || HEAD_ROWS == 2 || HEAD_ROWS == 4 || HEAD_ROWS == 8, "HEAD_ROWS: 1, 2, 4 or 8");
// v2's register budget: >= 768 threads an SM (<= 85 registers) where the batch is big enough to fill the GPU with
// blocks (4, 8 rows); 512 (<= 128 registers: room for more loads in flight) at 1 or 2 rows, where <= 2 blocks an SM
// are launched anyway
#define HEAD_SM_THREADS (HEAD_ROWS <= 2 ? 512 : 768)
#define HEAD_MIN_BLOCKS (HEAD_SM_THREADS / HEAD_THREADS > 0 ? HEAD_SM_THREADS / HEAD_THREADS : 1)
static_assert(HEAD_THREADS % 32 == 0 && HEAD_THREADS <= 1024, "HEAD_THREADS: whole warps, at most 1024");

// dz_conv of the 2x2 window of pooled element i (c, hp, wp) of one row: route g = dL/dS4[i], times act'(yconv).
__device__ __forceinline__ void head_route(float g, int i, const unsigned char* __restrict__ am_row,
                                           const float* __restrict__ yc_row, float* __restrict__ dz_row, int Hp,
                                           int Wp, int H, int W, int act, int mode) {
    const int c = i / (Hp * Wp), rem = i - c * Hp * Wp, hp = rem / Wp, wp = rem - hp * Wp;
    const int tap_max = mode == POOL_MAX ? (int)am_row[i] : -1;
    const float avg = 0.25f * g;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const int idx = (c * H + 2 * hp + (t >> 1)) * W + 2 * wp + (t & 1);
        const float v = mode == POOL_MAX ? (t == tap_max ? g : 0.0f) : avg;
        dz_row[idx] = v * act_grad(yc_row[idx], act);
    }
}

// Zero the taps of rows [r0, r0+nr) of dz_conv that no 2x2 window covers (odd H or W only).
__device__ __forceinline__ void head_zero_trailing(float* __restrict__ dz_conv, int r0, int nr, int C, int H, int W) {
    const int Hp = H / 2, Wp = W / 2;
    if (2 * Hp == H && 2 * Wp == W) return;
    const int per = C * H * W;
    for (int t = threadIdx.x; t < nr * per; t += blockDim.x) {
        const int rem = t % per, h = (rem / W) % H, w = rem % W;
        if (h >= 2 * Hp || w >= 2 * Wp) dz_conv[(size_t)r0 * per + t] = 0.0f;
    }
}

// The loss rows of a block of R rows (s_z [R][NC]): thread t < nr takes row r0 + t: its loss and hit into rowstat, dz3
// = (softmax - onehot) / B into s_d3 [NC][R] and dz3; threads nr <= t < R zero their column of s_d3 (rows past the
// batch get no gradient)
__device__ __forceinline__ void head_loss_rows(const float* s_z, const int* __restrict__ labels, float* s_d3,
                                              float* __restrict__ rowstat, float* __restrict__ dz3, int r0, int nr,
                                              int R, int NC, int B, int t) {
    if (t >= R) return;
    if (t < nr) {
        float hit;
        const float loss = xent_row(s_z + t * NC, labels[r0 + t], s_d3 + t, R, NC, 1.0f / (float)B, &hit);
        rowstat[2 * (r0 + t)] = loss;
        rowstat[2 * (r0 + t) + 1] = hit;
        for (int c = 0; c < NC; ++c) dz3[(size_t)(r0 + t) * NC + c] = s_d3[c * R + t];
    } else {
        for (int c = 0; c < NC; ++c) s_d3[c * R + t] = 0.0f;
    }
}

// ------------------------------------------------------------------------------------------ v1: rows
extern "C" __global__ void __launch_bounds__(HEAD_THREADS)
head_train_v1(const float* __restrict__ x, const int* __restrict__ labels, const float* __restrict__ w1,
              const float* __restrict__ b1, const float* __restrict__ w2, const float* __restrict__ b2,
              const float* __restrict__ w3, const float* __restrict__ b3, float* __restrict__ h1,
              float* __restrict__ h2, float* __restrict__ logits, const unsigned char* __restrict__ argmax,
              const float* __restrict__ yconv, float* __restrict__ dz_conv, float* __restrict__ dz1,
              float* __restrict__ dz2, float* __restrict__ dz3, float* __restrict__ rowstat, int B, int I, int H1,
              int H2, int NC, int C, int H, int W, int act, int mode, int rows) {
    const int r0 = blockIdx.x * rows, nr = min(rows, B - r0), tid = threadIdx.x, nt = blockDim.x;
    const int Hp = H / 2, Wp = W / 2;
    for (int t = tid; t < nr * H1; t += nt) {  // h1 = act(x w1^T + b1)
        const int r = r0 + t / H1, o = t % H1;
        float acc = b1[o];
        for (int i = 0; i < I; ++i) acc += x[(size_t)r * I + i] * w1[(size_t)o * I + i];
        h1[(size_t)r * H1 + o] = act_fwd(acc, act);
    }
    __syncthreads();
    for (int t = tid; t < nr * H2; t += nt) {  // h2 = act(h1 w2^T + b2)
        const int r = r0 + t / H2, j = t % H2;
        float acc = b2[j];
        for (int o = 0; o < H1; ++o) acc += h1[(size_t)r * H1 + o] * w2[(size_t)j * H1 + o];
        h2[(size_t)r * H2 + j] = act_fwd(acc, act);
    }
    __syncthreads();
    for (int t = tid; t < nr * NC; t += nt) {  // logits = h2 w3^T + b3
        const int r = r0 + t / NC, c = t % NC;
        float acc = b3[c];
        for (int j = 0; j < H2; ++j) acc += h2[(size_t)r * H2 + j] * w3[(size_t)c * H2 + j];
        logits[(size_t)r * NC + c] = acc;
    }
    __syncthreads();
    for (int r = r0 + tid; r < r0 + nr; r += nt) {  // the loss row and dz3 = dlogits
        float hit;
        rowstat[2 * r] = xent_row(logits + (size_t)r * NC, labels[r], dz3 + (size_t)r * NC, 1, NC, 1.0f / (float)B,
                                  &hit);
        rowstat[2 * r + 1] = hit;
    }
    __syncthreads();
    for (int t = tid; t < nr * H2; t += nt) {  // dz2 = (dz3 w3) * act'(h2)
        const int r = r0 + t / H2, j = t % H2;
        float acc = 0.0f;
        for (int c = 0; c < NC; ++c) acc += dz3[(size_t)r * NC + c] * w3[(size_t)c * H2 + j];
        dz2[(size_t)r * H2 + j] = acc * act_grad(h2[(size_t)r * H2 + j], act);
    }
    __syncthreads();
    for (int t = tid; t < nr * H1; t += nt) {  // dz1 = (dz2 w2) * act'(h1)
        const int r = r0 + t / H1, o = t % H1;
        float acc = 0.0f;
        for (int j = 0; j < H2; ++j) acc += dz2[(size_t)r * H2 + j] * w2[(size_t)j * H1 + o];
        dz1[(size_t)r * H1 + o] = acc * act_grad(h1[(size_t)r * H1 + o], act);
    }
    __syncthreads();
    const int per = C * H * W;
    for (int t = tid; t < nr * I; t += nt) {  // dx = dz1 w1, routed through S4's pooling into dz_conv
        const int r = r0 + t / I, i = t % I;
        float acc = 0.0f;
        for (int o = 0; o < H1; ++o) acc += dz1[(size_t)r * H1 + o] * w1[(size_t)o * I + i];
        if (yconv == nullptr)  // the routed gradient at S4's shape (block-uniform branch)
            dz_conv[(size_t)r * I + i] = acc * act_grad(x[(size_t)r * I + i], act);
        else
            head_route(acc, i, argmax == nullptr ? nullptr : argmax + (size_t)r * I, yconv + (size_t)r * per,
                       dz_conv + (size_t)r * per, Hp, Wp, H, W, act, mode);
    }
    if (yconv != nullptr) head_zero_trailing(dz_conv, r0, nr, C, H, W);
}

// ------------------------------------------------------------------------------------------ v1: wgrad
// One thread per element of [dw1|db1] (H1 x (I+1)), then [dw2|db2] (H2 x (H1+1)), [dw3|db3] (NC x (H2+1)),
// then one thread for the stats row. Column A of a layer's [dw|db] is the bias: the input read as a column of ones.
__device__ __forceinline__ void head_wgrad_elem(const float* __restrict__ dz, const float* __restrict__ a, int B, int O,
                                                int A, int e, float* __restrict__ dw, float* __restrict__ db) {
    const int o = e / (A + 1), i = e - o * (A + 1);
    float acc = 0.0f;
    if (i < A) {
        for (int b = 0; b < B; ++b) acc += dz[(size_t)b * O + o] * a[(size_t)b * A + i];
        dw[(size_t)o * A + i] = acc;
    } else {
        for (int b = 0; b < B; ++b) acc += dz[(size_t)b * O + o];
        db[o] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(WG_THREADS)
head_train_wgrad_v1(const float* __restrict__ x, const float* __restrict__ h1, const float* __restrict__ h2,
                    const float* __restrict__ dz1, const float* __restrict__ dz2, const float* __restrict__ dz3,
                    const float* __restrict__ rowstat, float* __restrict__ dw1, float* __restrict__ db1,
                    float* __restrict__ dw2, float* __restrict__ db2, float* __restrict__ dw3,
                    float* __restrict__ db3, float* __restrict__ stats, const int* __restrict__ state, int B, int I,
                    int H1, int H2, int NC, int S) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    const int n1 = H1 * (I + 1), n2 = H2 * (H1 + 1), n3 = NC * (H2 + 1);
    if (e < n1) { head_wgrad_elem(dz1, x, B, H1, I, e, dw1, db1); return; }
    e -= n1;
    if (e < n2) { head_wgrad_elem(dz2, h1, B, H2, H1, e, dw2, db2); return; }
    e -= n2;
    if (e < n3) { head_wgrad_elem(dz3, h2, B, NC, H2, e, dw3, db3); return; }
    if (e == n3) {  // the stats row: row order
        float l = 0.0f, h = 0.0f;
        for (int b = 0; b < B; ++b) { l += rowstat[2 * b]; h += rowstat[2 * b + 1]; }
        float* row = stats_row(stats, S, state);
        row[0] = l;
        row[1] = h;
    }
}

// ------------------------------------------------------------------------------------------ v2: rows
#define HEAD_F 4  // v2: outputs a warp computes at once in the forward products (x R rows = the values per lane)

// One dense layer's backward for a block's R rows: d_in[j] = (Σ_o d_out[o] · w[o, j]) · act'(h[j]) for each input
// column j of the layer (a column per thread, the R rows in registers); d_out and d_in are [column][row] in shared
// memory, h is [row][column]; the block's nr real rows also go to dz (rows r0.., row stride NIN) for the wgrad kernel.
template <int R>
__device__ __forceinline__ void head_back_layer(const float* s_dout, const float* __restrict__ w, int NOUT, int NIN,
                                                const float* s_h, float* s_din, float* __restrict__ dz, int r0, int nr,
                                                int act, int tid, int nt) {
    for (int j = tid; j < NIN; j += nt) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.0f;
        for (int o = 0; o < NOUT; ++o) {
            const float wv = __ldg(w + (size_t)o * NIN + j);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = fmaf(s_dout[o * R + r], wv, acc[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float d = acc[r] * act_grad(s_h[r * NIN + j], act);
            s_din[j * R + r] = d;
            if (r < nr) dz[(size_t)(r0 + r) * NIN + j] = d;
        }
    }
}

template <int R>
__device__ __forceinline__ void head_rows_v2(const float* __restrict__ x, const int* __restrict__ labels,
                                             const float* __restrict__ w1, const float* __restrict__ b1,
                                             const float* __restrict__ w2, const float* __restrict__ b2,
                                             const float* __restrict__ w3, const float* __restrict__ b3,
                                             float* __restrict__ h1, float* __restrict__ h2,
                                             float* __restrict__ logits, const unsigned char* __restrict__ argmax,
                                             const float* __restrict__ yconv, float* __restrict__ dz_conv,
                                             float* __restrict__ dz1, float* __restrict__ dz2,
                                             float* __restrict__ dz3, float* __restrict__ rowstat, int B, int I,
                                             int H1, int H2, int NC, int C, int H, int W, int act, int mode) {
    extern __shared__ float smem[];
    float* s_x = smem;               // [R][I]
    float* s_h1 = s_x + R * I;       // [R][H1]
    float* s_h2 = s_h1 + R * H1;     // [R][H2]
    float* s_z = s_h2 + R * H2;      // [R][NC]
    float* s_d3 = s_z + R * NC;      // [NC][R]  (backward operands: the R rows of a column side by side)
    float* s_d2 = s_d3 + NC * R;     // [H2][R]
    float* s_d1 = s_d2 + H2 * R;     // [H1][R]
    const int r0 = blockIdx.x * R, nr = min(R, B - r0), tid = threadIdx.x, nt = blockDim.x;
    for (int t = tid; t < R * I; t += nt)  // rows past the batch are zeros: every phase may run all R rows
        s_x[t] = t < nr * I ? x[(size_t)r0 * I + t] : 0.0f;
    __syncthreads();
    rows_gemv<R, HEAD_F>(w1, b1, H1, I, s_x, I, s_h1, H1, h1 + (size_t)r0 * H1, nr, act);
    __syncthreads();
    rows_gemv<R, HEAD_F>(w2, b2, H2, H1, s_h1, H1, s_h2, H2, h2 + (size_t)r0 * H2, nr, act);
    __syncthreads();
    rows_gemv<R, HEAD_F>(w3, b3, NC, H2, s_h2, H2, s_z, NC, logits + (size_t)r0 * NC, nr, ACT_IDENTITY);
    __syncthreads();
    head_loss_rows(s_z, labels, s_d3, rowstat, dz3, r0, nr, R, NC, B, tid);  // one thread per row: loss and dz3
    __syncthreads();
    head_back_layer<R>(s_d3, w3, NC, H2, s_h2, s_d2, dz2, r0, nr, act, tid, nt);  // dz2 = (dz3 w3) * act'(h2)
    __syncthreads();
    head_back_layer<R>(s_d2, w2, H2, H1, s_h1, s_d1, dz1, r0, nr, act, tid, nt);  // dz1 = (dz2 w2) * act'(h1)
    __syncthreads();
    const int Hp = H / 2, Wp = W / 2, per = C * H * W;
    for (int i = tid; i < I; i += nt) {  // dx = dz1 w1, routed through S4's pooling into dz_conv
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.0f;
        for (int o = 0; o < H1; ++o) {
            const float w = __ldg(w1 + (size_t)o * I + i);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = fmaf(s_d1[o * R + r], w, acc[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (r < nr) {
                if (yconv == nullptr)  // the routed gradient at S4's shape (block-uniform branch)
                    dz_conv[(size_t)(r0 + r) * I + i] = acc[r] * act_grad(s_x[r * I + i], act);
                else
                    head_route(acc[r], i, argmax == nullptr ? nullptr : argmax + (size_t)(r0 + r) * I,
                               yconv + (size_t)(r0 + r) * per, dz_conv + (size_t)(r0 + r) * per, Hp, Wp, H, W, act,
                               mode);
            }
    }
    if (yconv != nullptr) head_zero_trailing(dz_conv, r0, nr, C, H, W);
}

// One kernel per HEAD_ROWS (a compile-time parameter: each gets its own register allocation and launch bounds).
extern "C" __global__ void __launch_bounds__(HEAD_THREADS, HEAD_MIN_BLOCKS)
head_train_v2(const float* __restrict__ x, const int* __restrict__ labels, const float* __restrict__ w1,
              const float* __restrict__ b1, const float* __restrict__ w2, const float* __restrict__ b2,
              const float* __restrict__ w3, const float* __restrict__ b3, float* __restrict__ h1,
              float* __restrict__ h2, float* __restrict__ logits, const unsigned char* __restrict__ argmax,
              const float* __restrict__ yconv, float* __restrict__ dz_conv, float* __restrict__ dz1,
              float* __restrict__ dz2, float* __restrict__ dz3, float* __restrict__ rowstat, int B, int I, int H1,
              int H2, int NC, int C, int H, int W, int act, int mode) {
    head_rows_v2<HEAD_ROWS>(x, labels, w1, b1, w2, b2, w3, b3, h1, h2, logits, argmax, yconv, dz_conv, dz1, dz2, dz3,
                            rowstat, B, I, H1, H2, NC, C, H, W, act, mode);
}

// ------------------------------------------------------------------------------------------ v2: wgrad
// Block b < tiles: one WG_TO x WG_TI tile of [dw|db] of one layer (layers in order 1, 2, 3, tiles row-major);
// the block after them: the stats row. WG2_GROUPS groups of 8 x 16 threads split the batch: group g takes chunks
// g, g + WG2_GROUPS, ... of WG_KC rows (dz and the input, plus the column of ones, staged in shared memory) and
// keeps 2x2 partial sums per thread (each in row order); group 0 then adds the groups' partials in group order.
// A fixed order: bit-for-bit repeatable. (More warps per tile than v1's one output per thread, so the latency of
// the staging loads is hidden with one block per SM.)
#define WG2_GROUPS 4
#define WG2_THREADS (WG_THREADS * WG2_GROUPS)
// One k step of a wgrad thread's 2x2 outputs: rows 2ty, 2ty + 1 of the chunk's dz row times columns 2tx, 2tx + 1 of
// its input row (one float2 each).
__device__ __forceinline__ void head_wgrad_kstep(float (&acc)[4], const float* dzk, const float* ak, int ty, int tx) {
    const float2 d = *reinterpret_cast<const float2*>(dzk + 2 * ty);
    const float2 v = *reinterpret_cast<const float2*>(ak + 2 * tx);
    acc[0] = fmaf(d.x, v.x, acc[0]);
    acc[1] = fmaf(d.x, v.y, acc[1]);
    acc[2] = fmaf(d.y, v.x, acc[2]);
    acc[3] = fmaf(d.y, v.y, acc[3]);
}
// A wgrad tile's end: groups 1..3 leave their 2x2 partials in shared memory, group 0 adds them to its own in group
// order and writes the thread's outputs (o, i) .. (o + 1, i + 1) of [dw | db] (column A: the bias).
__device__ __forceinline__ void head_wgrad_finish(const float (&acc)[4], int g, int lt, int o, int i, int O, int A,
                                                  float* __restrict__ dw, float* __restrict__ db, float* s_part) {
    if (g > 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) s_part[((g - 1) * WG_THREADS + lt) * 4 + q] = acc[q];
    }
    __syncthreads();
    if (g == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float sum = acc[q];
            for (int gg = 1; gg < WG2_GROUPS; ++gg) sum += s_part[((gg - 1) * WG_THREADS + lt) * 4 + q];
            const int oq = o + (q >> 1), iq = i + (q & 1);
            if (oq < O && iq < A) dw[(size_t)oq * A + iq] = sum;
            else if (oq < O && iq == A) db[oq] = sum;
        }
    }
}
__device__ __forceinline__ void head_wgrad_tile(const float* __restrict__ dz, const float* __restrict__ a, int B, int O,
                                                int A, int tile, float* __restrict__ dw, float* __restrict__ db,
                                                float (*s_dz)[WG_KC][WG_TO], float (*s_a)[WG_KC][WG_TI],
                                                float* s_part) {
    const int tiles_i = ceil_div(A + 1, WG_TI);
    const int o0 = (tile / tiles_i) * WG_TO, i0 = (tile % tiles_i) * WG_TI;
    const int g = threadIdx.x / WG_THREADS, lt = threadIdx.x % WG_THREADS;
    const int ty = lt / (WG_TI / 2), tx = lt % (WG_TI / 2);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int rounds = ceil_div(ceil_div(B, WG_KC), WG2_GROUPS);
    for (int rd = 0; rd < rounds; ++rd) {  // every thread runs every round: the barriers are block-wide
        const int b0 = (rd * WG2_GROUPS + g) * WG_KC;  // this group's chunk (past the batch: nothing to add)
        for (int t = lt; t < WG_KC * WG_TO; t += WG_THREADS) {
            const int k = t / WG_TO, o = o0 + t % WG_TO, b = b0 + k;
            s_dz[g][k][t % WG_TO] = (b < B && o < O) ? dz[(size_t)b * O + o] : 0.0f;
        }
        for (int t = lt; t < WG_KC * WG_TI; t += WG_THREADS) {
            const int k = t / WG_TI, i = i0 + t % WG_TI, b = b0 + k;
            s_a[g][k][t % WG_TI] = b < B ? (i < A ? a[(size_t)b * A + i] : (i == A ? 1.0f : 0.0f)) : 0.0f;
        }
        __syncthreads();
        const int kn = max(0, min(WG_KC, B - b0));
        for (int k = 0; k < kn; ++k) {
            head_wgrad_kstep(acc, s_dz[g][k], s_a[g][k], ty, tx);
        }
        __syncthreads();
    }
    head_wgrad_finish(acc, g, lt, o0 + 2 * ty, i0 + 2 * tx, O, A, dw, db, s_part);
}

// The wgrad kernels' last block: this step's stats row (loss sum, correct count) from the rows' (loss, hit) pairs.
// Thread t sums a contiguous run of rows in order, then a fixed tree over the WG2_THREADS threads (s_part holds
// 2 * WG2_THREADS floats); thread 0 writes the row.
static_assert((WG2_GROUPS - 1) * WG_THREADS * 4 >= 2 * WG2_THREADS, "head_wgrad_stats: s_part holds both columns");
__device__ __forceinline__ void head_wgrad_stats(const float* __restrict__ rowstat, float* __restrict__ stats,
                                                 const int* __restrict__ state, int B, int S, float* s_part) {
    float* s_l = s_part;
    float* s_h = s_part + WG2_THREADS;
    const int tid = threadIdx.x, per = ceil_div(B, WG2_THREADS);
    float l = 0.0f, h = 0.0f;
    for (int b = tid * per; b < min(B, (tid + 1) * per); ++b) { l += rowstat[2 * b]; h += rowstat[2 * b + 1]; }
    s_l[tid] = l;
    s_h[tid] = h;
    __syncthreads();
    for (int half = WG2_THREADS / 2; half > 0; half >>= 1) {
        if (tid < half) { s_l[tid] += s_l[tid + half]; s_h[tid] += s_h[tid + half]; }
        __syncthreads();
    }
    if (tid == 0) {
        float* row = stats_row(stats, S, state);
        row[0] = s_l[0];
        row[1] = s_h[0];
    }
}

extern "C" __global__ void __launch_bounds__(WG2_THREADS)
head_train_wgrad_v2(const float* __restrict__ x, const float* __restrict__ h1, const float* __restrict__ h2,
                    const float* __restrict__ dz1, const float* __restrict__ dz2, const float* __restrict__ dz3,
                    const float* __restrict__ rowstat, float* __restrict__ dw1, float* __restrict__ db1,
                    float* __restrict__ dw2, float* __restrict__ db2, float* __restrict__ dw3,
                    float* __restrict__ db3, float* __restrict__ stats, const int* __restrict__ state, int B, int I,
                    int H1, int H2, int NC, int S) {
    const int t1 = ceil_div(H1, WG_TO) * ceil_div(I + 1, WG_TI), t2 = ceil_div(H2, WG_TO) * ceil_div(H1 + 1, WG_TI);
    const int t3 = ceil_div(NC, WG_TO) * ceil_div(H2 + 1, WG_TI);
    __shared__ __align__(16) float s_dz[WG2_GROUPS][WG_KC][WG_TO];
    __shared__ __align__(16) float s_a[WG2_GROUPS][WG_KC][WG_TI];
    __shared__ float s_part[(WG2_GROUPS - 1) * WG_THREADS * 4];
    int tile = blockIdx.x;  // block-uniform branches: the barriers inside are reached by the whole block
    if (tile < t1) { head_wgrad_tile(dz1, x, B, H1, I, tile, dw1, db1, s_dz, s_a, s_part); return; }
    tile -= t1;
    if (tile < t2) { head_wgrad_tile(dz2, h1, B, H2, H1, tile, dw2, db2, s_dz, s_a, s_part); return; }
    tile -= t2;
    if (tile < t3) { head_wgrad_tile(dz3, h2, B, NC, H2, tile, dw3, db3, s_dz, s_a, s_part); return; }
    head_wgrad_stats(rowstat, stats, state, B, S, s_part);
}

// ------------------------------------------------------------------------------------------ v3: rows
// The geometry is compiled in (the launcher sets it from the call's shapes; defaults: LeNet-5's), so every loop
// has a constant trip count (unrolled: many loads in flight per thread) and nothing divides at run time.
#ifndef HEAD_C
#define HEAD_C 16  // channels of S4 (x is (B, HEAD_C, HEAD_HP, HEAD_WP))
#endif
#ifndef HEAD_HP
#define HEAD_HP 5
#endif
#ifndef HEAD_WP
#define HEAD_WP 5
#endif
#ifndef HEAD_H
#define HEAD_H 10  // yconv's height: 2*HEAD_HP or 2*HEAD_HP + 1 (the routed form, yconv NULL: 2*HEAD_HP)
#endif
#ifndef HEAD_W
#define HEAD_W 10
#endif
#ifndef HEAD_H1
#define HEAD_H1 120  // C5's width
#endif
#ifndef HEAD_H2
#define HEAD_H2 84  // F6's width
#endif
#ifndef HEAD_NC
#define HEAD_NC 10  // classes
#endif
#define HEAD3_THREADS 512  // v3 rows: one row of the batch a block, 16 warps

namespace head3 {
constexpr int C = HEAD_C, HP = HEAD_HP, WP = HEAD_WP, H = HEAD_H, W = HEAD_W;
constexpr int I = C * HP * WP, H1 = HEAD_H1, H2 = HEAD_H2, NC = HEAD_NC;
constexpr int T = HEAD3_THREADS, NW = T / 32;
static_assert(C >= 1 && HP >= 1 && WP >= 1 && H1 >= 1 && H2 >= 1 && NC >= 1, "head v3: a positive geometry");
static_assert((H == 2 * HP || H == 2 * HP + 1) && (W == 2 * WP || W == 2 * WP + 1), "head v3: yconv pools to x");

// Outputs a warp takes at once in a forward product of O outputs: the power of two (<= 32) that spreads O over the
// block's warps in one round where it can.
__host__ __device__ constexpr int group(int O) {
    int f = 1;
    while (f * NW < O && f < 32) f *= 2;
    return f;
}
// Parts a column product of O outputs and a K-long reduction splits into (threads per output): as many as the
// block holds, each at least 8 terms long.
__host__ __device__ constexpr int parts(int O, int K) {
    const int p = T / O < K / 8 ? T / O : K / 8;
    return p < 1 ? 1 : p;
}
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int FW1 = group(H1), GW1 = (H1 + FW1 - 1) / FW1, PW1 = GW1 < NW ? GW1 : NW;  // C5: warps with outputs
// shared memory (floats): x, w2 (later C5's backward partials: PW1 rows of I), w3, h1, h2, z, d3, d2, d1, col partials
constexpr int OFF_W2 = I, OFF_W3 = OFF_W2 + cmax(H2 * H1, PW1 * I), OFF_H1 = OFF_W3 + NC * H2;
constexpr int OFF_H2 = OFF_H1 + H1, OFF_Z = OFF_H2 + H2, OFF_D3 = OFF_Z + NC, OFF_D2 = OFF_D3 + NC;
constexpr int OFF_D1 = OFF_D2 + H2, OFF_CP = OFF_D1 + H1, SMEM_FLOATS = OFF_CP + T;
}  // namespace head3

// dz_conv of S4 element i of row r, from g = dL/dS4[r][i] (head3's compile-time geometry): yconv null (the routed
// form), g * act'(*xv) at S4's shape (*xv = x[r][i]: read only there); else through the 2x2 window of C3's output,
// max -> the argmax tap, avg -> g/4 to each, times act'(yconv) at the tap
__device__ __forceinline__ void head3_route(float g, const float* xv, int r, int i,
                                            const unsigned char* __restrict__ argmax, const float* __restrict__ yconv,
                                            float* __restrict__ dz_conv, int act, int mode) {
    using namespace head3;
    constexpr int PER = C * H * W;
    if (yconv == nullptr) {  // block-uniform
        dz_conv[(size_t)r * I + i] = g * act_grad(*xv, act);
        return;
    }
    const int c = i / (HP * WP), rem = i - c * (HP * WP), hp = rem / WP, wp = rem - hp * WP;  // constant divisors
    const int tap_max = mode == POOL_MAX ? (int)argmax[(size_t)r * I + i] : -1;
    const float* yc = yconv + (size_t)r * PER;
    float* dz = dz_conv + (size_t)r * PER;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int idx = (c * H + 2 * hp + (q >> 1)) * W + 2 * wp + (q & 1);
        const float v = mode == POOL_MAX ? (q == tap_max ? g : 0.0f) : 0.25f * g;
        dz[idx] = v * act_grad(yc[idx], act);
    }
}

// The taps of rows [r0, r0 + nr) of dz_conv that no 2x2 window covers (odd H or W, with yconv): 0; threads t, t + nt
__device__ __forceinline__ void head3_zero_trailing(float* __restrict__ dz_conv, const float* yconv, int r0, int nr,
                                                    int t, int nt) {
    using namespace head3;
    constexpr int PER = C * H * W;
    if ((H != 2 * HP || W != 2 * WP) && yconv != nullptr)
        for (int e = t; e < nr * PER; e += nt) {
            const int h = (e / W) % H, w = e % W;  // constant divisors
            if (h >= 2 * HP || w >= 2 * WP) dz_conv[(size_t)r0 * PER + e] = 0.0f;
        }
}

// out[o] = act(bias[o] + sum_k in[k] * Wt[o][k]) for o < O: warp w takes groups w, w + NW, ... of F = group(O)
// consecutive outputs; lane l the terms k = l + 32j (every j unrolled: F * ceil(K/32) independent loads per lane, each
// warp load one coalesced row segment), in j order; then rows_gemv.cuh's fixed transpose-reduction tree. Wt global
// (GLOBAL: through the read-only cache) or in shared memory. Writes s_out and g_out (the row's global output).
template <int O, int K, bool GLOBAL>
__device__ __forceinline__ void head3_fwd(const float* Wt, const float* __restrict__ bias, const float* s_in,
                                          float* s_out, float* __restrict__ g_out, int act) {
    constexpr int F = head3::group(O), KJ = (K + 31) / 32, G = (O + F - 1) / F, LANES = 32 / F;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp >= G) return;
    float xin[KJ];
#pragma unroll
    for (int j = 0; j < KJ; ++j) {
        const int k = lane + 32 * j;
        xin[j] = (K % 32 == 0 || k < K) ? s_in[k] : 0.0f;
    }
    for (int g = warp; g < G; g += head3::NW) {
        const int o0 = g * F, o = o0 + lane / LANES;
        const bool writer = lane % LANES == 0 && o < O;
        const float bo = writer ? __ldg(bias + o) : 0.0f;  // issued before the loads of the sums
        float v[F];
#pragma unroll
        for (int f = 0; f < F; ++f) v[f] = 0.0f;
#pragma unroll
        for (int j = 0; j < KJ; ++j) {
            const int k = lane + 32 * j;
            if (K % 32 == 0 || j < KJ - 1 || k < K) {
#pragma unroll
                for (int f = 0; f < F; ++f) {
                    const float* p = Wt + (O % F == 0 ? o0 + f : min(o0 + f, O - 1)) * K + k;  // past O: re-read
                    v[f] = fmaf(xin[j], GLOBAL ? __ldg(p) : *p, v[f]);
                }
            }
        }
        const float sum = warp_transpose_sum<F>(v, lane);
        if (writer) {
            const float y = act_fwd(sum + bo, act);
            s_out[o] = y;
            g_out[o] = y;
        }
    }
}

// One dense layer's backward from shared memory: s_din[o] = g_d[o] = (sum_k s_dout[k] * s_w[k][o]) * act'(s_h[o])
// for o < O, the layer's weights s_w (K, O) row-major (column o of it: lanes read consecutive o, conflict-free).
// P = parts(O, K) threads per output each sum a run of KC terms in k order; their partials (s_part, P*O <= T floats)
// are added in part order.
template <int O, int K>
__device__ __forceinline__ void head3_col(const float* s_w, const float* s_dout, const float* s_h, float* s_din,
                                          float* __restrict__ g_d, float* s_part, int act) {
    constexpr int P = head3::parts(O, K), KC = (K + P - 1) / P;
    const int t = threadIdx.x;
    if (P == 1) {
        for (int o = t; o < O; o += head3::T) {
            float acc = 0.0f;
#pragma unroll 12
            for (int k = 0; k < K; ++k) acc = fmaf(s_dout[k], s_w[k * O + o], acc);
            const float d = acc * act_grad(s_h[o], act);
            s_din[o] = d;
            g_d[o] = d;
        }
        return;
    }
    if (t < P * O) {
        const int p = t / O, o = t - p * O;  // constant divisor
        float acc = 0.0f;
#pragma unroll(KC <= 32 ? KC : 8)  // LeNet-5's parts (21 terms) whole; bounded code for wide layers
        for (int kk = 0; kk < KC; ++kk) {
            const int k = p * KC + kk;
            if (K % P == 0 || k < K) acc = fmaf(s_dout[k], s_w[k * O + o], acc);
        }
        s_part[p * O + o] = acc;
    }
    __syncthreads();
    for (int o = t; o < O; o += head3::T) {
        float acc = s_part[o];
#pragma unroll
        for (int p = 1; p < P; ++p) acc += s_part[p * O + o];
        const float d = acc * act_grad(s_h[o], act);
        s_din[o] = d;
        g_d[o] = d;
    }
}

// v3's and v4's rows kernels take the same parameters (v2's, the geometry compiled in: I_ .. W_ unused but kept,
// so every rows kernel launches with the same argument list)
#define HEAD3_ROWS_PARAMS                                                                                            \
    const float *__restrict__ x, const int *__restrict__ labels, const float *__restrict__ w1,                       \
        const float *__restrict__ b1, const float *__restrict__ w2, const float *__restrict__ b2,                    \
        const float *__restrict__ w3, const float *__restrict__ b3, float *__restrict__ h1, float *__restrict__ h2,  \
        float *__restrict__ logits, const unsigned char *__restrict__ argmax, const float *__restrict__ yconv,       \
        float *__restrict__ dz_conv, float *__restrict__ dz1, float *__restrict__ dz2, float *__restrict__ dz3,      \
        float *__restrict__ rowstat, int B, int I_, int H1_, int H2_, int NC_, int C_, int H_, int W_, int act,     \
        int mode

// The block's row r of the batch: forward, loss, backward; a row a block (B blocks). Phases, a barrier after each:
// stage x, w2, w3 in shared memory | C5 (w1 from L2) | F6 | output | the loss row (one thread) | dz2 | dz1 |
// C5's data gradient: warp w sums its C5 outputs' rows of w1 (the same elements it read in the forward) into
// partials dx_w[i] (shared memory, over w2's no longer needed copy), added in warp order | routed into dz_conv.
extern "C" __global__ void __launch_bounds__(HEAD3_THREADS, 2)
head_train_v3(HEAD3_ROWS_PARAMS) {
    using namespace head3;
    extern __shared__ float smem3[];
    float* s_x = smem3;
    float* s_w2 = smem3 + OFF_W2;
    float* s_w3 = smem3 + OFF_W3;
    float* s_h1 = smem3 + OFF_H1;
    float* s_h2 = smem3 + OFF_H2;
    float* s_z = smem3 + OFF_Z;
    float* s_d3 = smem3 + OFF_D3;
    float* s_d2 = smem3 + OFF_D2;
    float* s_d1 = smem3 + OFF_D1;
    float* s_cp = smem3 + OFF_CP;
    const int r = blockIdx.x, t = threadIdx.x;
    const int label = t == 0 ? labels[r] : 0;
    // stage: every load of the three copies issued before the barrier (one round trip)
#pragma unroll
    for (int e = t; e < I; e += T) s_x[e] = x[(size_t)r * I + e];
#pragma unroll 8
    for (int e = t; e < H2 * H1; e += T) s_w2[e] = __ldg(w2 + e);
#pragma unroll
    for (int e = t; e < NC * H2; e += T) s_w3[e] = __ldg(w3 + e);
    __syncthreads();
    head3_fwd<H1, I, true>(w1, b1, s_x, s_h1, h1 + (size_t)r * H1, act);  // h1 = act(x w1^T + b1)
    __syncthreads();
    head3_fwd<H2, H1, false>(s_w2, b2, s_h1, s_h2, h2 + (size_t)r * H2, act);  // h2 = act(h1 w2^T + b2)
    __syncthreads();
    head3_fwd<NC, H2, false>(s_w3, b3, s_h2, s_z, logits + (size_t)r * NC, ACT_IDENTITY);  // z = h2 w3^T + b3
    __syncthreads();
    if (t == 0) {  // the loss row and dz3
        float hit;
        rowstat[2 * r] = xent_row(s_z, label, s_d3, 1, NC, 1.0f / (float)B, &hit);
        rowstat[2 * r + 1] = hit;
    }
    __syncthreads();
    for (int c = t; c < NC; c += T) dz3[(size_t)r * NC + c] = s_d3[c];
    head3_col<H2, NC>(s_w3, s_d3, s_h2, s_d2, dz2 + (size_t)r * H2, s_cp, act);  // dz2 = (dz3 w3) * act'(h2)
    __syncthreads();
    head3_col<H1, H2>(s_w2, s_d2, s_h1, s_d1, dz1 + (size_t)r * H1, s_cp, act);  // dz1 = (dz2 w2) * act'(h1)
    __syncthreads();
    // dx = dz1 w1: warp w (< PW1) takes C5 outputs o = g*FW1 + f of its groups g = w, w + NW, ..., o in order; lane l
    // the columns i = l + 32j
    constexpr int KJ = (I + 31) / 32;
    float* s_part = s_w2;  // [PW1][I]
    const int lane = t & 31, warp = t >> 5;
    if (warp < PW1) {
        float acc[KJ];
#pragma unroll
        for (int j = 0; j < KJ; ++j) acc[j] = 0.0f;
        for (int g = warp; g < GW1; g += NW) {
#pragma unroll
            for (int f = 0; f < FW1; ++f) {
                const int o = g * FW1 + f;
                if (H1 % FW1 == 0 || o < H1) {
                    const float d = s_d1[o];
#pragma unroll
                    for (int j = 0; j < KJ; ++j) {
                        const int i = lane + 32 * j;
                        if (I % 32 == 0 || j < KJ - 1 || i < I) acc[j] = fmaf(d, __ldg(w1 + (size_t)o * I + i), acc[j]);
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < KJ; ++j) {
            const int i = lane + 32 * j;
            if (I % 32 == 0 || i < I) s_part[warp * I + i] = acc[j];
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = t; i < I; i += T) {  // the sum in warp order, routed through S4's pooling into dz_conv
        float g = s_part[i];
#pragma unroll
        for (int w = 1; w < PW1; ++w) g += s_part[w * I + i];
        head3_route(g, s_x + i, r, i, argmax, yconv, dz_conv, act, mode);
    }
    head3_zero_trailing(dz_conv, yconv, r, 1, t, T);
}

// ------------------------------------------------------------------------------------------ v3: wgrad
// v2's tiles and stats block with the geometry compiled in (tile counts constant, the tile index split by constant
// divisors); the same sums in the same order as v2. v4 (below) is the same body with its tiles pipelined.
#define HEAD_WGRAD_PARAMS                                                                                             \
    const float* __restrict__ x, const float* __restrict__ h1, const float* __restrict__ h2,                         \
        const float* __restrict__ dz1, const float* __restrict__ dz2, const float* __restrict__ dz3,                 \
        const float* __restrict__ rowstat, float* __restrict__ dw1, float* __restrict__ db1, float* __restrict__ dw2, \
        float* __restrict__ db2, float* __restrict__ dw3, float* __restrict__ db3, float* __restrict__ stats,         \
        const int* __restrict__ state, int B, int I_, int H1_, int H2_, int NC_, int S
#define HEAD_WGRAD_ARGS \
    x, h1, h2, dz1, dz2, dz3, rowstat, dw1, db1, dw2, db2, dw3, db3, stats, state, B, I_, H1_, H2_, NC_, S

template <int O, int A>
__device__ __forceinline__ void head_wgrad_tile_v4(const float* __restrict__ dz, const float* __restrict__ a, int B,
                                                   int tile, float* __restrict__ dw, float* __restrict__ db,
                                                   float (*s_dz)[WG_KC][WG_TO], float (*s_a)[WG_KC][WG_TI],
                                                   float* s_part);

// The wgrad launch at head3's geometry: block b < tiles a tile of [dw1|db1], then [dw2|db2], [dw3|db3] (row-major
// tiles), the block after them the stats row. V4: the tiles pipelined (head_wgrad_tile_v4), else v3's.
template <bool V4>
__device__ __forceinline__ void head_wgrad3_body(HEAD_WGRAD_PARAMS) {
    using namespace head3;
    constexpr int t1 = (H1 + WG_TO - 1) / WG_TO * ((I + WG_TI) / WG_TI);
    constexpr int t2 = (H2 + WG_TO - 1) / WG_TO * ((H1 + WG_TI) / WG_TI);
    constexpr int t3 = (NC + WG_TO - 1) / WG_TO * ((H2 + WG_TI) / WG_TI);
    __shared__ __align__(16) float s_dz[WG2_GROUPS][WG_KC][WG_TO];
    __shared__ __align__(16) float s_a[WG2_GROUPS][WG_KC][WG_TI];
    __shared__ float s_part[(WG2_GROUPS - 1) * WG_THREADS * 4];
    int tile = blockIdx.x;  // block-uniform branches: the barriers inside are reached by the whole block
    if (tile < t1) {
        if constexpr (V4) head_wgrad_tile_v4<H1, I>(dz1, x, B, tile, dw1, db1, s_dz, s_a, s_part);
        else head_wgrad_tile(dz1, x, B, H1, I, tile, dw1, db1, s_dz, s_a, s_part);
        return;
    }
    tile -= t1;
    if (tile < t2) {
        if constexpr (V4) head_wgrad_tile_v4<H2, H1>(dz2, h1, B, tile, dw2, db2, s_dz, s_a, s_part);
        else head_wgrad_tile(dz2, h1, B, H2, H1, tile, dw2, db2, s_dz, s_a, s_part);
        return;
    }
    tile -= t2;
    if (tile < t3) {
        if constexpr (V4) head_wgrad_tile_v4<NC, H2>(dz3, h2, B, tile, dw3, db3, s_dz, s_a, s_part);
        else head_wgrad_tile(dz3, h2, B, NC, H2, tile, dw3, db3, s_dz, s_a, s_part);
        return;
    }
    head_wgrad_stats(rowstat, stats, state, B, S, s_part);  // the stats row, as v2
}

extern "C" __global__ void __launch_bounds__(WG2_THREADS) head_train_wgrad_v3(HEAD_WGRAD_PARAMS) {
    head_wgrad3_body<false>(HEAD_WGRAD_ARGS);
}

// ------------------------------------------------------------------------------------------ v4: wgrad
// v3's tiles, batch groups, chunk order and sums, with the chunk staging pipelined. v3 (as v2) runs a round as: load
// the chunk from global memory, store it to shared memory, barrier, its k steps, barrier; the whole block waits for
// the loads every round (16 warps, one block an SM: its grid is 132 blocks at LeNet-5's sizes), and its k loop runs
// to a run-time bound. v4 keeps the next round's chunk in registers (4 dz and 8 input values a thread, __ldg) and
// issues those loads right after the barrier that publishes this round's chunk, before this round's k steps, so
// their latency overlaps the FMAs; the k loop runs all WG_KC steps, unrolled (rows past the batch are zeros in both
// operands: each adds exactly +0 to a sum that starts at +0 and so is never -0, which leaves every bit as v3's).
// Sizes are template constants (head3's geometry). The same bits as v3 (the harness test compares them).
//
// Cost at LeNet-5, batch 4096 (ESTIMATED, NOT MEASURED; H200, 132 SMs, 1.98 GHz): 132 blocks, 32 rounds each. A
// round issues ~270 instructions a thread (12 stores, 12 loads and their indices, 32 x (2 LDS.64 + 4 FMA)): 4 warps
// a scheduler, ~1.1 K clocks (0.55 us), against an L2 round trip of ~0.5-0.8 us that v4 overlaps and v3 adds. So
// ~0.6-0.9 us a round, ~20-30 us in all, where v3 by the same count takes ~1.2-1.5 us a round (~40-48 us) but
// was measured at 92 us (2026-12-04, as v2's sums): what else bounds v3 is not known without a profile, so v4's
// gain is taken as that latency only: ~25-45 us at 4096. At batch 64 one round a group: no overlap to win (v3
// measured 3.4 us).
template <int O, int A>
__device__ __forceinline__ void head_wgrad_fetch(const float* __restrict__ dz, const float* __restrict__ a, int B,
                                                 int b0, int o0, int i0, int lt, float (&pd)[WG_KC * WG_TO / WG_THREADS],
                                                 float (&pa)[WG_KC * WG_TI / WG_THREADS]) {
#pragma unroll
    for (int j = 0; j < WG_KC * WG_TO / WG_THREADS; ++j) {
        const int t = lt + j * WG_THREADS, b = b0 + t / WG_TO, o = o0 + t % WG_TO;
        pd[j] = (b < B && o < O) ? __ldg(dz + (size_t)b * O + o) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < WG_KC * WG_TI / WG_THREADS; ++j) {
        const int t = lt + j * WG_THREADS, b = b0 + t / WG_TI, i = i0 + t % WG_TI;
        pa[j] = b < B ? (i < A ? __ldg(a + (size_t)b * A + i) : (i == A ? 1.0f : 0.0f)) : 0.0f;
    }
}

template <int O, int A>
__device__ __forceinline__ void head_wgrad_tile_v4(const float* __restrict__ dz, const float* __restrict__ a, int B,
                                                   int tile, float* __restrict__ dw, float* __restrict__ db,
                                                   float (*s_dz)[WG_KC][WG_TO], float (*s_a)[WG_KC][WG_TI],
                                                   float* s_part) {
    constexpr int TILES_I = (A + WG_TI) / WG_TI;  // ceil((A + 1) / WG_TI): the bias column included
    constexpr int ND = WG_KC * WG_TO / WG_THREADS, NA = WG_KC * WG_TI / WG_THREADS;
    static_assert(ND * WG_THREADS == WG_KC * WG_TO && NA * WG_THREADS == WG_KC * WG_TI, "wgrad v4: whole chunks");
    const int o0 = (tile / TILES_I) * WG_TO, i0 = (tile % TILES_I) * WG_TI;
    const int g = threadIdx.x / WG_THREADS, lt = threadIdx.x % WG_THREADS;
    const int ty = lt / (WG_TI / 2), tx = lt % (WG_TI / 2);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float pd[ND], pa[NA];
    const int rounds = ceil_div(ceil_div(B, WG_KC), WG2_GROUPS);
    head_wgrad_fetch<O, A>(dz, a, B, g * WG_KC, o0, i0, lt, pd, pa);
    for (int rd = 0; rd < rounds; ++rd) {  // every thread runs every round: the barriers are block-wide
#pragma unroll
        for (int j = 0; j < ND; ++j) {
            const int t = lt + j * WG_THREADS;
            s_dz[g][t / WG_TO][t % WG_TO] = pd[j];
        }
#pragma unroll
        for (int j = 0; j < NA; ++j) {
            const int t = lt + j * WG_THREADS;
            s_a[g][t / WG_TI][t % WG_TI] = pa[j];
        }
        __syncthreads();
        if (rd + 1 < rounds)  // the next round's chunk, in flight during this round's k steps
            head_wgrad_fetch<O, A>(dz, a, B, ((rd + 1) * WG2_GROUPS + g) * WG_KC, o0, i0, lt, pd, pa);
#pragma unroll
        for (int k = 0; k < WG_KC; ++k) {
            head_wgrad_kstep(acc, s_dz[g][k], s_a[g][k], ty, tx);
        }
        __syncthreads();
    }
    head_wgrad_finish(acc, g, lt, o0 + 2 * ty, i0 + 2 * tx, O, A, dw, db, s_part);
}

extern "C" __global__ void __launch_bounds__(WG2_THREADS) head_train_wgrad_v4(HEAD_WGRAD_PARAMS) {
    head_wgrad3_body<true>(HEAD_WGRAD_ARGS);
}

// ------------------------------------------------------------------------------------------ v4: rows, large batch
// HEAD4_ROWS rows of the batch a block (8, 16 or 32), a warp per 4 of them (HEAD4_THREADS = 8 * HEAD4_ROWS), the
// geometry compiled in as v3's (head3's constants). Every product is a register-tiled GEMM over the block's rows:
// thread (warp w, lane l) owns rows 4w..4w+3 x columns l + 32j, so each operand it loads feeds 4 or JP FMAs:
//   C5, F6 forward  K in chunks of HEAD4_KC: the rows' chunk staged as [k][row] (a float4 of 4 rows a load), the
//                   weights' chunk transposed to [k][column] (lanes read consecutive columns, conflict-free); the
//                   epilogue act(acc + bias) into shared memory and h1 / h2;
//   output, loss    a thread per (row, class), then a thread per row (xent_row);
//   dz2             a thread per (row, column), NC terms, in place over h2 (act'(h2) read by the same thread);
//   dz1, dx         W read from L2 along its rows (w2 (H2,H1), w1 (H1,I): lanes consecutive columns, coalesced), the
//                   rows' gradient broadcast from shared memory; dz1 in place over h1; dx routed into dz_conv as v3.
// Each output's sum runs over k in order from 0 (bias added last, as v3's forward): deterministic, no atomics.
//
// Registers: __launch_bounds__(HEAD4_THREADS, 512 / HEAD4_THREADS), <= 128 a thread: a warp per 4 rows gives only
// B / 4 warps (batch 4096: 1,024, ~7.8 an SM whatever the rows a block), so latency is hidden by each thread's
// loads in flight (the backward tiles' k loop unrolled by 4: 44 loads issued before their 112 FMAs), not by warps.
// NVRTC 12 (sm_80, sm_90): no spills at 8, 16 and 32 rows (the test_head_v4 NVRTC test).
//
// Cost at LeNet-5, batch 4096, HEAD4_ROWS 16 (ESTIMATED, NOT MEASURED; H200 132 SMs, ~1.98 GHz, 4 schedulers an SM):
// a thread issues ~24.5 K instructions (C5 400 x (5 shared loads + 16 FMA) + 20 chunk stagings ~9.8 K, F6 ~2.2 K,
// output + loss + dz2 ~0.9 K, dz1 84 x 24 ~2 K, dx 2 passes x 120 x (4 + 7 loads + 28 FMA) ~9.4 K); 1,024 warps =
// ~2 a scheduler = ~49 K instructions a scheduler, at an issue rate of 0.5-0.8 a clock (2 warps with independent
// loads and FMAs) 61-98 K clocks: ~31-50 us (v2's rows kernel: 149 us measured at 8 rows a block). L2 bytes: a
// block reads w1 twice and w2 twice (~0.46 MB): 256 blocks ~120 MB, ~17-22 us at 5.5-7 TB/s (overlapped).
#ifndef HEAD4_ROWS
#define HEAD4_ROWS 16
#endif
static_assert(HEAD4_ROWS == 8 || HEAD4_ROWS == 16 || HEAD4_ROWS == 32, "HEAD4_ROWS: 8, 16 or 32");
#define HEAD4_THREADS (8 * HEAD4_ROWS)  // a warp per 4 rows
#define HEAD4_KC 20                      // forward products: K staged in chunks of this many terms
#define HEAD4_JMAX 7                     // backward products: columns a lane per pass, in units of 32 (registers)

namespace head4 {
constexpr int C = head3::C, HP = head3::HP, WP = head3::WP, H = head3::H, W = head3::W;
constexpr int I = head3::I, H1 = head3::H1, H2 = head3::H2, NC = head3::NC;
constexpr int R = HEAD4_ROWS, T = HEAD4_THREADS, KC = HEAD4_KC, RA = R + 4;  // RA: s_a's row (16-byte aligned)
// forward products: columns a lane per pass (in 32s), at most 4
__host__ __device__ constexpr int jp(int O) { return (O + 31) / 32 < 4 ? (O + 31) / 32 : 4; }
constexpr int BW = 32 * (jp(H1) > jp(H2) ? jp(H1) : jp(H2)) + 1;  // s_b's row: odd, so the staging stores spread
// shared memory (floats): h1 (then dz1) [R][H1], h2 (then dz2) [R][H2], z [R][NC], d3 [NC][R], a chunk [KC][RA],
// a weight chunk [KC][BW]; the launcher checks the sum against its limit (fused.head_v4_smem)
constexpr int OFF_H2 = R * H1, OFF_Z = OFF_H2 + R * H2, OFF_D3 = OFF_Z + R * NC, OFF_A = (OFF_D3 + NC * R + 3) / 4 * 4;
constexpr int OFF_B = OFF_A + KC * RA, SMEM_FLOATS = OFF_B + KC * BW;
}  // namespace head4

// s_out[r][o] = act(bias[o] + sum_k a[r][k] * Wt[o][k]) for the block's R rows and o < O; a: rows of K floats, lda
// apart (global or shared), rows >= nr read as 0; Wt (O, K) row-major. The nr real rows also go to g_out (row O).
template <int O, int K>
__device__ __forceinline__ void head4_fwd(const float* a, int lda, int nr, const float* __restrict__ Wt,
                                          const float* __restrict__ bias, float* s_a, float* s_b, float* s_out,
                                          float* __restrict__ g_out, int act) {
    using namespace head4;
    constexpr int JP = jp(O), OP = 32 * JP;
    const int t = threadIdx.x, lane = t & 31, rb = (t >> 5) * 4;
#pragma unroll 1
    for (int o0 = 0; o0 < O; o0 += OP) {
        float acc[4][JP];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int j = 0; j < JP; ++j) acc[u][j] = 0.0f;
#pragma unroll 1
        for (int k0 = 0; k0 < K; k0 += KC) {
            for (int e = t; e < R * KC; e += T) {
                const int r = e / KC, kk = e - r * KC, k = k0 + kk;  // constant divisor
                s_a[kk * RA + r] = (r < nr && k < K) ? a[r * lda + k] : 0.0f;
            }
            for (int e = t; e < OP * KC; e += T) {
                const int oc = e / KC, kk = e - oc * KC, o = o0 + oc, k = k0 + kk;
                s_b[kk * BW + oc] = (o < O && k < K) ? __ldg(Wt + (size_t)o * K + k) : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < KC; ++kk) {
                const float4 av = *reinterpret_cast<const float4*>(s_a + kk * RA + rb);
                const float ar[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
                for (int j = 0; j < JP; ++j) {
                    const float wv = s_b[kk * BW + lane + 32 * j];
#pragma unroll
                    for (int u = 0; u < 4; ++u) acc[u][j] = fmaf(ar[u], wv, acc[u][j]);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int j = 0; j < JP; ++j) {
            const int o = o0 + lane + 32 * j;
            if (o < O) {
                const float bo = __ldg(bias + o);
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const float y = act_fwd(acc[u][j] + bo, act);
                    s_out[(rb + u) * O + o] = y;
                    if (rb + u < nr) g_out[(size_t)(rb + u) * O + o] = y;
                }
            }
        }
    }
}

// acc[u][j] = sum_k s_d[(rb + u) * K + k] * W[k][n0 + lane + 32 j] for k in order from 0 (W (K, N) row-major, from
// L2 along its rows; columns >= N read as 0): one pass of a backward product's register tile.
template <int K, int N, int JN>
__device__ __forceinline__ void head4_bwd_tile(const float* s_d, const float* __restrict__ Wm, int n0, int rb,
                                               int lane, float (&acc)[4][JN]) {
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int j = 0; j < JN; ++j) acc[u][j] = 0.0f;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
        float d[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) d[u] = s_d[(rb + u) * K + k];
#pragma unroll
        for (int j = 0; j < JN; ++j) {
            const int n = n0 + lane + 32 * j;
            const float wv = n < N ? __ldg(Wm + (size_t)k * N + n) : 0.0f;
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[u][j] = fmaf(d[u], wv, acc[u][j]);
        }
    }
}

// The block's HEAD4_ROWS rows: forward, loss, backward. Phases, a barrier after each: C5 | F6 | output | the loss
// rows | dz2 | dz1 | dx routed into dz_conv (then the taps no window covers, odd yconv only).
extern "C" __global__ void __launch_bounds__(HEAD4_THREADS, 512 / HEAD4_THREADS)
head_train_v4(HEAD3_ROWS_PARAMS) {
    using namespace head4;
    __shared__ __align__(16) float smem4[SMEM_FLOATS];
    float* s_h1 = smem4;
    float* s_h2 = smem4 + OFF_H2;
    float* s_z = smem4 + OFF_Z;
    float* s_d3 = smem4 + OFF_D3;
    float* s_a = smem4 + OFF_A;
    float* s_b = smem4 + OFF_B;
    const int r0 = blockIdx.x * R, nr = min(R, B - r0), t = threadIdx.x, lane = t & 31, rb = (t >> 5) * 4;
    head4_fwd<H1, I>(x + (size_t)r0 * I, I, nr, w1, b1, s_a, s_b, s_h1, h1 + (size_t)r0 * H1, act);
    __syncthreads();
    head4_fwd<H2, H1>(s_h1, H1, nr, w2, b2, s_a, s_b, s_h2, h2 + (size_t)r0 * H2, act);
    __syncthreads();
    for (int e = t; e < R * NC; e += T) {  // z = h2 w3^T + b3
        const int r = e / NC, c = e - r * NC;
        float acc = 0.0f;
#pragma unroll 4
        for (int k = 0; k < H2; ++k) acc = fmaf(s_h2[r * H2 + k], __ldg(w3 + (size_t)c * H2 + k), acc);
        const float z = act_fwd(acc + __ldg(b3 + c), ACT_IDENTITY);
        s_z[r * NC + c] = z;
        if (r < nr) logits[(size_t)(r0 + r) * NC + c] = z;
    }
    __syncthreads();
    head_loss_rows(s_z, labels, s_d3, rowstat, dz3, r0, nr, R, NC, B, t);  // one thread per row: loss and dz3
    __syncthreads();
    for (int e = t; e < R * H2; e += T) {  // dz2 = (dz3 w3) * act'(h2), in place over h2
        const int r = e / H2, j = e - r * H2;
        float acc = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc = fmaf(s_d3[c * R + r], __ldg(w3 + (size_t)c * H2 + j), acc);
        const float d = acc * act_grad(s_h2[e], act);
        s_h2[e] = d;
        if (r < nr) dz2[(size_t)r0 * H2 + e] = d;
    }
    __syncthreads();
    {  // dz1 = (dz2 w2) * act'(h1), in place over h1 (each element read and written by its own thread)
        constexpr int J = (H1 + 31) / 32 < HEAD4_JMAX ? (H1 + 31) / 32 : HEAD4_JMAX;
#pragma unroll 1
        for (int n0 = 0; n0 < H1; n0 += 32 * J) {
            float acc[4][J];
            head4_bwd_tile<H2, H1, J>(s_h2, w2, n0, rb, lane, acc);
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const int n = n0 + lane + 32 * j;
                if (n < H1) {
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const int r = rb + u;
                        const float d = acc[u][j] * act_grad(s_h1[r * H1 + n], act);
                        s_h1[r * H1 + n] = d;
                        if (r < nr) dz1[(size_t)(r0 + r) * H1 + n] = d;
                    }
                }
            }
        }
    }
    __syncthreads();
    {  // dx = dz1 w1, routed through S4's pooling into dz_conv
        constexpr int J = (I + 31) / 32 < HEAD4_JMAX ? (I + 31) / 32 : HEAD4_JMAX;
#pragma unroll 1
        for (int n0 = 0; n0 < I; n0 += 32 * J) {
            float acc[4][J];
            head4_bwd_tile<H1, I, J>(s_h1, w1, n0, rb, lane, acc);
#pragma unroll
            for (int j = 0; j < J; ++j) {
                const int i = n0 + lane + 32 * j;
                if (i >= I) continue;
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int r = r0 + rb + u;
                    if (rb + u < nr)
                        head3_route(acc[u][j], x + (size_t)r * I + i, r, i, argmax, yconv, dz_conv, act, mode);
                }
            }
        }
    }
    head3_zero_trailing(dz_conv, yconv, r0, nr, t, T);
}
