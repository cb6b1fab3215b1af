// harness_bad.cu -- deliberately broken kernels: each one is a bug the harness must report.
// (tests/harness/test_cudacpu_errors.py, test_cudacpu_sanitizers.py, scripts/sanitize_kernels.py)
#define TILE 16

// Early return of some threads before a barrier the others execute (undefined behaviour in CUDA):
// reported in strict mode as divergent __syncthreads.
extern "C" __global__ void early_return(float* out, int n) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    if (t >= n) return;
    s[t] = t;
    __syncthreads();
    out[t] = s[(t + 1) % n];
}

// Tiled matmul with the second __syncthreads missing: a write-after-read race on sA/sB that
// ThreadSanitizer reports (the results are often still right on the CPU).
extern "C" __global__ void matmul_missing_sync(const float* A, const float* B, float* C, int M, int N, int K) {
    __shared__ float sA[TILE][TILE];
    __shared__ float sB[TILE][TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int t = 0; t < (K + TILE - 1) / TILE; ++t) {
        sA[ty][tx] = (row < M && t * TILE + tx < K) ? A[row * K + t * TILE + tx] : 0.0f;
        sB[ty][tx] = (t * TILE + ty < K && col < N) ? B[(t * TILE + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += sA[ty][k] * sB[k][tx];
        // __syncthreads();   <- missing
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

// Every thread reads its right neighbour's shared value with no barrier between the write and the
// read: the neighbour may not have written yet (the poison then shows as NaN).
extern "C" __global__ void neighbour_without_barrier(const float* in, float* out) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    s[t] = in[i];
    // __syncthreads();   <- missing
    out[i] = s[(t + 1) % blockDim.x];
}

// Full-mask shuffle in a branch that half the warp takes, then a block barrier: the two halves wait
// for each other forever (a hang on the GPU); the watchdog turns it into a launch error.
extern "C" __global__ void divergent_shuffle(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// Thread 0 spins on a flag nobody sets: stuck outside any barrier (breaks the thread pool).
extern "C" __global__ void spin_forever(volatile int* flag) {
    if (threadIdx.x == 0) {
        while (flag[0] == 0) {
        }
    }
}

// Global out-of-bounds write: every thread of the grid writes, n is the array length.
extern "C" __global__ void global_oob(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;  // off by one: i == n is out of bounds
}

// Dynamic shared memory smaller than what the kernel touches (launched with 64 bytes for 64 threads).
extern "C" __global__ void smem_overrun(float* out, int n) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = buf[(threadIdx.x + 1) % n];
}

// A wild pointer: thread 7 of block 2 writes through a null pointer plus an offset.
extern "C" __global__ void wild_write(float* out) {
    float* p = blockIdx.x == 2 && threadIdx.x == 7 ? (float*)0 + 4096 : out;
    p[threadIdx.x] = 1.0f;
}

// Signed overflow (UndefinedBehaviorSanitizer).
extern "C" __global__ void int_overflow(int* out, int big) {
    out[threadIdx.x] = big + (int)threadIdx.x;
}
