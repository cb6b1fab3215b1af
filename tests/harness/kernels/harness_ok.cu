// harness_ok.cu -- correct kernels that exercise the CPU harness (tests/harness/test_cudacpu.py).
// They must also compile warning-free with NVRTC (tests/harness/test_nvrtc.py).
#include "harness_common.cuh"

#define TILE 16

// out[b] = sum of x over block b's slice: shared-memory tree with a barrier per level.
// blockDim.x must be a power of two; dynamic smem = blockDim.x floats.
extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
    extern __shared__ float tile[];
    const int tid = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + tid;
    tile[tid] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) tile[tid] += tile[tid + s];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = tile[0];
}

// C[M,N] = A[M,K] @ B[K,N] with 16x16 static shared tiles; grid (ceil(N/16), ceil(M/16)), block (16,16).
extern "C" __global__ void tiled_matmul(const float* __restrict__ A, const float* __restrict__ B,
                                        float* __restrict__ C, int M, int N, int K) {
    __shared__ float sA[TILE][TILE];
    __shared__ float sB[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < (K + TILE - 1) / TILE; ++t) {
        sA[ty][tx] = (row < M && t * TILE + tx < K) ? A[row * K + t * TILE + tx] : 0.0f;
        sB[ty][tx] = (t * TILE + ty < K && col < N) ? B[(t * TILE + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += sA[ty][k] * sB[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

// Per-warp sums of x: with __shfl_down_sync (lane 0 holds it: down[warp]) and with __shfl_xor_sync
// (every lane holds it: xor_all[i]). Every lane stays to the end, as full-mask shuffles require.
extern "C" __global__ void warp_sums(const float* __restrict__ x, float* __restrict__ down,
                                     float* __restrict__ xor_all, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = i < n ? x[i] : 0.0f;
    float d = v, b = v;
    for (int offset = 16; offset > 0; offset >>= 1) {
        d += __shfl_down_sync(0xffffffffu, d, offset);
        b += __shfl_xor_sync(0xffffffffu, b, offset);
    }
    if ((threadIdx.x & 31) == 0) down[i / 32] = d;
    if (i < n) xor_all[i] = b;
}

// Inclusive prefix sums within segments of `width` lanes (__shfl_up_sync), and each segment's first
// value broadcast to its lanes (__shfl_sync with width).
template <int WIDTH>
__device__ void segment_ops(float v, float* scan, float* first, int i) {
    float s = v;
    for (int offset = 1; offset < WIDTH; offset <<= 1) {
        const float up = __shfl_up_sync(0xffffffffu, s, offset, WIDTH);
        if ((threadIdx.x & (WIDTH - 1)) >= offset) s += up;
    }
    scan[i] = s;
    first[i] = __shfl_sync(0xffffffffu, v, 0, WIDTH);
}
extern "C" __global__ void warp_scan8(const float* __restrict__ x, float* scan, float* first) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    segment_ops<8>(x[i], scan, first, i);
}

// votes: out[0] = ballot(t % 3 == 0), out[1] = count(t < 10), out[2] = all(1), out[3] = any(t == 5)
extern "C" __global__ void votes(unsigned* out) {
    const unsigned b = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
    const int c = __syncthreads_count(threadIdx.x < 10);
    const int a = __all_sync(0xffffffffu, 1);
    const int y = __any_sync(0xffffffffu, threadIdx.x == 5);
    if (threadIdx.x == 0) {
        out[0] = b;
        out[1] = c;
        out[2] = a;
        out[3] = y;
    }
}

// *out += sum(x) with float atomics.
extern "C" __global__ void atomic_sum(const float* __restrict__ x, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(out, x[i]);
}

// Block b writes the shared slots whose parity is b % 2 and reads all slots: the other half was
// never written by this block, so it must read the poison (NaN), not the previous block's values.
extern "C" __global__ void read_dynamic_smem(float* out) {
    extern __shared__ float dyn[];
    const int t = threadIdx.x;
    if (t % 2 == (int)(blockIdx.x % 2)) dyn[t] = 1.0f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = dyn[t];
}
extern "C" __global__ void read_static_smem(float* out) {
    __shared__ float buf[64];
    const int t = threadIdx.x;
    if (t % 2 == (int)(blockIdx.x % 2)) buf[t] = 1.0f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = buf[t];
}

// y = c_coeffs[0] * SCALE * x (SCALE from -D; c_coeffs set through get_global).
extern "C" __global__ void scaled_copy(const float* __restrict__ x, float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = c_coeffs[0] * scaled(x[i]);
}

// Writes out[i] = 1 after a device-side assert on the index table.
extern "C" __global__ void checked_store(const int* __restrict__ idx, float* __restrict__ out, int n) {
    const int j = idx[threadIdx.x];
    assert(j >= 0 && j < n);
    out[j] = 1.0f;
}

// Traps in one thread: thread (3,1,0) of block (1,0,0).
extern "C" __global__ void trap_at(float* out) {
    if (threadIdx.x == 3 && threadIdx.y == 1 && blockIdx.x == 1) __trap();
    out[0] = 0.0f;
}

// A templated kernel (needs name_expressions) and a 3-D coordinate check.
template <typename T>
__global__ void fill(T* y, T value, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = value;
}
extern "C" __global__ void coords(int* out) {
    const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const int bid = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    int* o = out + 6 * (bid * blockDim.x * blockDim.y * blockDim.z + tid);
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
}
