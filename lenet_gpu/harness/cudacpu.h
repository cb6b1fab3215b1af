// cudacpu.h -- compile unchanged CUDA C kernels with g++ (C++20) and run them on the CPU.
//
// This header is included (by the Python side, lenet_gpu/harness/cudacpu.py) before the kernel
// source. It maps the CUDA C device dialect onto C++:
//   * qualifiers (__global__, __device__, ...) expand to nothing or to GCC attributes;
//   * blocks run one at a time, the threads of a block are fibers on one runner thread (or OS
//     threads from a persistent pool: cudacpu_runtime.h), so `__shared__` becomes `static`: one
//     copy is "the block's" shared memory;
//   * threadIdx/blockIdx are thread_local (a fiber sets them again when it resumes), blockDim/gridDim
//     are per-launch globals;
//   * __syncthreads is a block barrier, warp intrinsics use a per-warp barrier and an exchange
//     buffer with the PTX shfl.sync lane rules, atomics use std::atomic_ref.
// The one source rewrite (done in Python) turns `extern __shared__ T name[];` into a pointer to the
// launch's dynamic shared memory buffer, which is filled with 0xff bytes (NaN floats, -1 ints) at
// the start of every block. Static __shared__ memory is poisoned the same way (except under
// AddressSanitizer, which then checks its bounds instead).
//
// Everything that holds state lives in a separate runtime library (cudacpu_runtime.h), shared by
// all kernel modules of a process; this header only declares its entry points.
#pragma once

#include <atomic>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

#define CUDACPU_API __attribute__((visibility("default")))
#define __CUDACPU__ 1

// ---------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer does not instrument variables in a named section: keep plain statics so that
// it checks the bounds of static shared arrays (they are then not poisoned).
#define __shared__ static
#else
// All static shared variables go into one section, so that the runtime can poison it per block.
#define __shared__ static __attribute__((section("cudacpu_shared")))
#endif

// ---------------------------------------------------------------------------- vector types
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return {x, y, z}; }
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct int3 { int x, y, z; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(4))) uchar4 { unsigned char x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) {
    return {x, y, z, w};
}

// ---------------------------------------------------------------------------- built-in variables
// Per kernel module (hidden symbols), per thread: the module's launch trampoline sets them.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------- runtime interface
namespace cudacpu {

// One kernel launch as the runtime sees it. thread_fn runs one CUDA thread of one block.
struct LaunchConfig {
    const char* kernel;                 // name, for messages
    unsigned grid[3];
    unsigned block[3];
    std::size_t dynamic_smem;           // bytes of `extern __shared__` memory
    unsigned char* static_smem_begin;   // the module's static shared section (null under ASan)
    unsigned char* static_smem_end;
    int strict;                         // report divergent barriers / exited lanes in warp ops
    double timeout_s;                   // per-block watchdog
    void (*thread_fn)(void* ctx, uint3 thread, uint3 block);
    void* ctx;
    // Sets the module's threadIdx/blockIdx: a fiber that resumes after a barrier calls it, since
    // the fibers of a block share one OS thread and so its thread-locals.
    void (*enter)(uint3 thread, uint3 block);
};

CUDACPU_API int run_grid(const LaunchConfig& cfg);  // 0 on success, else see last_error()
CUDACPU_API const char* last_error();               // message of the calling thread's last failure
CUDACPU_API void syncthreads();
CUDACPU_API int syncthreads_count(int pred);
CUDACPU_API void syncwarp(unsigned mask);
CUDACPU_API std::uint64_t shfl(unsigned mask, std::uint64_t bits, int mode, int lane_arg, int width);
CUDACPU_API unsigned ballot(unsigned mask, int pred);
CUDACPU_API unsigned activemask();
CUDACPU_API unsigned lane_id();
CUDACPU_API void* dynamic_smem();
[[noreturn]] CUDACPU_API void trap();
[[noreturn]] CUDACPU_API void assert_fail(const char* expr, const char* file, int line, const char* func);

enum ShflMode : int { kShflUp = 0, kShflDown = 1, kShflXor = 2, kShflIdx = 3 };

template <class T>
inline T shfl_value(unsigned mask, T v, int mode, int lane_arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = shfl(mask, bits, mode, lane_arg, width);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

}  // namespace cudacpu

// ---------------------------------------------------------------------------- device assert
// CUDA kernels may call assert() without an include; a failure is a launch error naming the thread.
#undef assert
#ifdef NDEBUG
#define assert(e) static_cast<void>(0)
#else
#define assert(e) \
    (static_cast<bool>(e) ? static_cast<void>(0) : ::cudacpu::assert_fail(#e, __FILE__, __LINE__, __func__))
#endif

// ---------------------------------------------------------------------------- synchronisation
inline void __syncthreads() { cudacpu::syncthreads(); }
inline int __syncthreads_count(int pred) { return cudacpu::syncthreads_count(pred); }
inline int __syncthreads_and(int pred) { return cudacpu::syncthreads_count(!pred) == 0; }
inline int __syncthreads_or(int pred) { return cudacpu::syncthreads_count(pred) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cudacpu::syncwarp(mask); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { cudacpu::trap(); }

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return cudacpu::shfl_value(mask, v, cudacpu::kShflUp, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return cudacpu::shfl_value(mask, v, cudacpu::kShflDown, static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    return cudacpu::shfl_value(mask, v, cudacpu::kShflXor, lane_mask, width);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
    return cudacpu::shfl_value(mask, v, cudacpu::kShflIdx, src_lane, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return cudacpu::ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return cudacpu::ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    const unsigned live = cudacpu::activemask();
    return (cudacpu::ballot(mask, pred) & live) == live;
}
inline unsigned __activemask() { return cudacpu::activemask(); }
inline unsigned __lanemask_lt() { return (1u << cudacpu::lane_id()) - 1u; }
inline unsigned __lanemask_le() { return (2u << cudacpu::lane_id()) - 1u; }
inline unsigned __lanemask_gt() { return ~__lanemask_le(); }
inline unsigned __lanemask_ge() { return ~__lanemask_lt(); }

// ---------------------------------------------------------------------------- atomics (relaxed, like CUDA)
#define CUDACPU_ATOMIC_RMW(name, op)                                          \
    template <class T>                                                        \
    inline T name(T* address, T value) {                                      \
        return std::atomic_ref<T>(*address).op(value, std::memory_order_relaxed); \
    }                                                                         \
    template <class T>                                                        \
    inline T name##_block(T* address, T value) {                              \
        return name(address, value);                                          \
    }                                                                         \
    template <class T>                                                        \
    inline T name##_system(T* address, T value) {                             \
        return name(address, value);                                          \
    }
CUDACPU_ATOMIC_RMW(atomicAdd, fetch_add)
CUDACPU_ATOMIC_RMW(atomicSub, fetch_sub)
CUDACPU_ATOMIC_RMW(atomicExch, exchange)
CUDACPU_ATOMIC_RMW(atomicAnd, fetch_and)
CUDACPU_ATOMIC_RMW(atomicOr, fetch_or)
CUDACPU_ATOMIC_RMW(atomicXor, fetch_xor)
#undef CUDACPU_ATOMIC_RMW

template <class T>
inline T atomicCAS(T* address, T compare, T value) {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_relaxed);
    return compare;
}
template <class T>
inline T atomicMax(T* address, T value) {
    std::atomic_ref<T> r(*address);
    T old = r.load(std::memory_order_relaxed);
    while (old < value && !r.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
    }
    return old;
}
template <class T>
inline T atomicMin(T* address, T value) {
    std::atomic_ref<T> r(*address);
    T old = r.load(std::memory_order_relaxed);
    while (value < old && !r.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
    }
    return old;
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {  // ((old >= limit) ? 0 : old + 1)
    std::atomic_ref<unsigned> r(*address);
    unsigned old = r.load(std::memory_order_relaxed);
    while (!r.compare_exchange_weak(old, old >= limit ? 0u : old + 1u, std::memory_order_relaxed)) {
    }
    return old;
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {  // ((old == 0 || old > limit) ? limit : old - 1)
    std::atomic_ref<unsigned> r(*address);
    unsigned old = r.load(std::memory_order_relaxed);
    while (!r.compare_exchange_weak(old, (old == 0u || old > limit) ? limit : old - 1u,
                                    std::memory_order_relaxed)) {
    }
    return old;
}

// ---------------------------------------------------------------------------- math intrinsics
// Fast-math intrinsics are computed exactly here; the GPU's approximations differ in the low bits.
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// ---------------------------------------------------------------------------- integer intrinsics
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline int __mul24(int a, int b) { return (a << 8 >> 8) * (b << 8 >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
template <class T>
inline T __ldcs(const T* p) {
    return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
    *p = v;
}

// CUDA's min/max overloads for mixed arithmetic types (float versions follow fminf/fmaxf).
template <class A, class B>
inline auto max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) {
        return std::fmax(static_cast<C>(a), static_cast<C>(b));
    } else {
        return a < b ? static_cast<C>(b) : static_cast<C>(a);
    }
}
template <class A, class B>
inline auto min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) {
        return std::fmin(static_cast<C>(a), static_cast<C>(b));
    } else {
        return b < a ? static_cast<C>(b) : static_cast<C>(a);
    }
}

// ---------------------------------------------------------------------------- launch glue
// The generated wrappers of a module call launch() and signature() for every kernel.
extern "C" {
// Bounds of this module's static shared section, defined by the linker (null when it is empty).
extern unsigned char __start_cudacpu_shared[] __attribute__((weak, visibility("hidden")));
extern unsigned char __stop_cudacpu_shared[] __attribute__((weak, visibility("hidden")));
}

namespace cudacpu {

template <class... A, std::size_t... I>
inline void invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    // Every thread gets its own copy of the parameters, as on the GPU.
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
int launch(void (*kernel)(A...), const char* name, const unsigned* grid, const unsigned* block,
           std::size_t dynamic_smem, void** args, int strict, double timeout_s) {
    struct Ctx {
        void (*kernel)(A...);
        void** args;
        dim3 grid;
        dim3 block;
    } ctx{kernel, args, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2])};
    LaunchConfig cfg{};
    cfg.kernel = name;
    for (int i = 0; i < 3; ++i) {
        cfg.grid[i] = grid[i];
        cfg.block[i] = block[i];
    }
    cfg.dynamic_smem = dynamic_smem;
    cfg.static_smem_begin = __start_cudacpu_shared;
    cfg.static_smem_end = __stop_cudacpu_shared;
    cfg.strict = strict;
    cfg.timeout_s = timeout_s;
    cfg.ctx = &ctx;
    cfg.thread_fn = [](void* p, uint3 thread, uint3 block_index) {
        auto* c = static_cast<Ctx*>(p);
        threadIdx = thread;
        blockIdx = block_index;
        blockDim = c->block;
        gridDim = c->grid;
        invoke(c->kernel, c->args, std::index_sequence_for<A...>{});
    };
    cfg.enter = [](uint3 thread, uint3 block_index) {
        threadIdx = thread;
        blockIdx = block_index;
    };
    return run_grid(cfg);
}

namespace detail {
inline void append(char* buf, std::size_t cap, const char* s) {
    std::strncat(buf, s, cap - std::strlen(buf) - 1);
}
// Parameter type codes read by cudacpu.py: i4 (int), u8 (unsigned long), f4 (float), b1 (bool),
// s<size>a<align> (struct by value), v (void); pointers append '*' and prefix "const " to the
// pointee when it is const, e.g. "const f4*".
template <class T>
void type_code(char* buf, std::size_t cap) {
    using U = std::remove_cv_t<T>;
    char tmp[48];
    if constexpr (std::is_pointer_v<U>) {
        using P = std::remove_pointer_t<U>;
        if constexpr (std::is_const_v<P>) {
            append(buf, cap, "const ");
        }
        type_code<std::remove_cv_t<P>>(buf, cap);
        append(buf, cap, "*");
        return;
    } else if constexpr (std::is_void_v<U>) {
        std::snprintf(tmp, sizeof tmp, "v");
    } else if constexpr (std::is_same_v<U, bool>) {
        std::snprintf(tmp, sizeof tmp, "b1");
    } else if constexpr (std::is_floating_point_v<U>) {
        std::snprintf(tmp, sizeof tmp, "f%zu", sizeof(U));
    } else if constexpr (std::is_integral_v<U> || std::is_enum_v<U>) {
        std::snprintf(tmp, sizeof tmp, "%c%zu", std::is_signed_v<U> ? 'i' : 'u', sizeof(U));
    } else {
        std::snprintf(tmp, sizeof tmp, "s%zua%zu", sizeof(U), alignof(U));
    }
    append(buf, cap, tmp);
}
}  // namespace detail

template <class... A>
const char* signature(void (*)(A...)) {
    static char buf[2048];
    static const bool done = [] {
        ((detail::type_code<A>(buf, sizeof buf), detail::append(buf, sizeof buf, ",")), ...);
        return true;
    }();
    (void)done;
    return buf;
}

}  // namespace cudacpu
