// cudacpu_runtime.h -- the runtime behind cudacpu.h: thread pool, barriers, warp exchange, watchdog.
//
// Compiled once per set of compiler flags into a shared library (cudacpu_rt_<hash>.so) that every
// kernel module of the process links against, so one runtime serves all modules. Launches are
// serialised; the blocks of a grid run one after another. The threads of a block run in one of two ways:
//  * fibers (the default on x86-64 outside ASan/TSan builds): every CUDA thread of the block is a
//    fiber with its own stack on one runner thread. A thread runs until it waits at a barrier (or
//    returns), then the runner switches to the next one that can go on, in an order fixed by the
//    block and the sweep (a permutation that changes from sweep to sweep), so a read of another
//    thread's write that lacks its barrier sees the old value whichever thread is the reader. No
//    system call per barrier: 256 threads meeting at __syncthreads cost 512 user-space switches,
//    where OS threads cost as many futex waits and wakes.
//  * OS threads (`CUDACPU_THREADS=os`, and always under AddressSanitizer/ThreadSanitizer, which
//    need real threads to tell CUDA threads apart): pool workers, one per CUDA thread, up to 1024.
//
// Semantics worth knowing:
//  * A thread that returns leaves the block barrier and its warp (like an exited warp on the GPU),
//    so an early return before __syncthreads does not hang; strict mode reports it afterwards
//    (threads of a block executed different numbers of barriers: undefined behaviour in CUDA).
//  * Warp intrinsics need every live lane of the warp (full-mask participation only).
//  * A deadlock (lanes waiting in a shuffle while others wait at __syncthreads) is aborted and
//    reported as a launch error: at once with fibers (no thread can go on), after the per-block
//    timeout with OS threads. A block that does not finish within the timeout (a spin loop) is
//    reported the same way; if threads are stuck outside any barrier, the pool is marked broken and
//    later launches fail.
//  * Outside sanitizer builds a SIGSEGV/SIGBUS in a kernel thread prints the thread and block
//    coordinates to stderr before the process dies.
#pragma once

#include "cudacpu.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define CUDACPU_HAVE_FIBERS 1
#include <sys/mman.h>
#else
#define CUDACPU_HAVE_FIBERS 0
#endif

namespace cudacpu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;

struct KernelAbort {};  // unwinds a thread of an aborted block
struct DeviceError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::atomic<bool> g_abort{false};
std::atomic<int> g_strict{1};

// Fibers unless CUDACPU_THREADS=os or the build cannot have them (read once, at the first launch).
bool fibers_chosen() {
    const char* v = std::getenv("CUDACPU_THREADS");
    return CUDACPU_HAVE_FIBERS && !(v && std::string(v) == "os");
}
const bool g_use_fibers = fibers_chosen();

void fiber_wait(const std::atomic<std::uint32_t>& gen, std::uint32_t seen);  // below: back to the runner

// Barrier with drop (exited threads stop counting) and abort. Lock-free: the arrival counter and
// the expected count share one 64-bit atomic; waiters sleep on a generation counter (C++20 wait).
class Barrier {
  public:
    void reset(int n) {
        state_.store(static_cast<std::uint64_t>(n) << 32);
        gen_.fetch_add(1);
    }
    void arrive_and_wait() {
        if (g_abort.load(std::memory_order_relaxed)) {
            throw KernelAbort{};
        }
        const std::uint32_t g = gen_.load(std::memory_order_acquire);
        const std::uint64_t s = state_.fetch_add(1, std::memory_order_acq_rel) + 1;
        if ((s & 0xffffffffu) == (s >> 32)) {
            release(s >> 32);
            return;
        }
        if (g_use_fibers) {
            fiber_wait(gen_, g);  // resumed once the generation moved on (a release or an abort)
            if (g_abort.load(std::memory_order_relaxed)) {
                throw KernelAbort{};
            }
            return;
        }
        for (int spin = 0; spin < 64 && gen_.load(std::memory_order_acquire) == g; ++spin) {
            std::this_thread::yield();
        }
        while (gen_.load(std::memory_order_acquire) == g) {
            gen_.wait(g, std::memory_order_acquire);
        }
        if (g_abort.load()) {
            throw KernelAbort{};
        }
    }
    void drop() {
        std::uint64_t s = state_.load();
        std::uint64_t n;
        do {
            n = s - (static_cast<std::uint64_t>(1) << 32);
        } while (!state_.compare_exchange_weak(s, n, std::memory_order_acq_rel));
        if ((n & 0xffffffffu) > 0 && (n & 0xffffffffu) >= (n >> 32)) {
            release(n >> 32);
        }
    }
    void wake() {
        gen_.fetch_add(1, std::memory_order_release);
        if (!g_use_fibers) {
            gen_.notify_all();
        }
    }

  private:
    void release(std::uint64_t expected) {
        state_.store(expected << 32, std::memory_order_relaxed);
        gen_.fetch_add(1, std::memory_order_release);
        if (!g_use_fibers) {  // a fiber's runner looks at the generation itself: no system call
            gen_.notify_all();
        }
    }
    std::atomic<std::uint64_t> state_{0};  // high 32 bits: expected, low 32 bits: arrived
    std::atomic<std::uint32_t> gen_{0};
};

enum ThreadState : int { kRunning = 0, kAtSync = 1, kAtWarp = 2, kExited = 3, kNotStarted = 4 };

// What a stuck block's threads are doing, for the error: "16 threads waiting in __syncthreads, ...".
std::string census(const int* count) {
    std::string m = std::to_string(count[kAtSync]) + " threads waiting in __syncthreads, " +
                    std::to_string(count[kAtWarp]) + " in warp intrinsics, " + std::to_string(count[kRunning]) +
                    " running, " + std::to_string(count[kExited]) + " exited";
    if (count[kNotStarted]) {  // fibers start in turn: a spinning one keeps those after it from starting
        m += ", " + std::to_string(count[kNotStarted]) + " not started";
    }
    return m;
}

struct Warp {
    Barrier bar;
    std::uint64_t buf[32];
    int nlanes = 32;
    std::atomic<std::uint32_t> exited{0};
    unsigned live_mask() const {
        const unsigned all = nlanes == 32 ? 0xffffffffu : ((1u << nlanes) - 1u);
        return all & ~exited.load();
    }
};

struct Block {
    Barrier bar;
    Warp warps[kMaxWarps];
    int sync_count[kMaxThreads];
    std::atomic<int> state[kMaxThreads];
    std::atomic<int> red[3];
};

Block g_block;

// What the workers need to know about the block being run (written before they are woken).
struct Current {
    const LaunchConfig* cfg = nullptr;
    uint3 block{0, 0, 0};
    unsigned char* dyn_smem = nullptr;
};
Current g_cur;

thread_local int t_tid = 0;
thread_local int t_lane = 0;
thread_local int t_redphase = 0;
thread_local Warp* t_warp = nullptr;
thread_local std::string t_last_error;

[[noreturn]] void device_error(const std::string& m) { throw DeviceError(m); }

uint3 thread_coords(int id) {
    const unsigned* b = g_cur.cfg->block;
    const unsigned u = static_cast<unsigned>(id);
    return {u % b[0], (u / b[0]) % b[1], u / (b[0] * b[1])};
}

std::string coords(uint3 t, uint3 b) {
    return "thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) +
           ") of block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")";
}

// ---------------------------------------------------------------------------- warp exchange
void check_mask(unsigned mask) {
    const unsigned live = t_warp->live_mask();
    if ((mask & live) != live) {
        char m[128];
        std::snprintf(m, sizeof m, "warp intrinsic with partial mask 0x%08x while lanes 0x%08x are live "
                      "(only full-warp participation is emulated)", mask, live);
        device_error(m);
    }
}

void check_exited(unsigned mask) {  // after the exchange barrier: did a named lane exit instead?
    if (g_strict.load(std::memory_order_relaxed) && (mask & t_warp->exited.load())) {
        device_error("warp intrinsic mask names lanes that already exited (undefined behaviour)");
    }
}

// ---------------------------------------------------------------------------- thread pool
void run_fiber_block(int n);  // below: the runner's scheduler
void fiber_runner_init();

struct alignas(64) WakeWord {
    // (generation << 6) | number of lanes of this warp group that run the current block
    std::atomic<std::uint32_t> v{0};
};

class Pool {
  public:
    void ensure(int n) {
        if (g_use_fibers) {  // one runner thread runs every block's fibers
            if (started_ == 0) {
                const std::uint32_t seen = groups_[0].v.load(std::memory_order_acquire);
                std::thread([this, seen] { fiber_runner(seen); }).detach();
                started_ = 1;
            }
            return;
        }
        for (; started_ < n; ++started_) {
            const int id = started_;
            const std::uint32_t seen = groups_[id >> 5].v.load(std::memory_order_acquire);
            std::thread([this, id, seen] { worker(id, seen); }).detach();
        }
    }

    // Runs the current block (g_cur) on n threads; false on timeout.
    bool run_block(int n, double timeout_s) {
        remaining_.store(n, std::memory_order_relaxed);
        for (int g = 0; g * 32 < n; ++g) {
            if (g_use_fibers && g > 0) {
                break;  // the runner (word 0) reads the block's size from remaining_
            }
            const std::uint32_t lanes = static_cast<std::uint32_t>(std::min(32, n - 32 * g));
            const std::uint32_t old = groups_[g].v.load(std::memory_order_relaxed);
            groups_[g].v.store((((old >> 6) + 1) << 6) | lanes, std::memory_order_release);
            groups_[g].v.notify_all();
        }
        return done_.try_acquire_for(std::chrono::duration<double>(timeout_s));
    }
    bool wait_done(double seconds) { return done_.try_acquire_for(std::chrono::duration<double>(seconds)); }

    void fail(const std::string& m) {
        std::lock_guard<std::mutex> lock(err_m_);
        if (err_.empty()) {
            err_ = m;
        }
    }
    std::string take_error() {
        std::lock_guard<std::mutex> lock(err_m_);
        std::string e;
        e.swap(err_);
        return e;
    }
    void abort_block() {
        g_abort = true;
        g_block.bar.wake();
        for (auto& w : g_block.warps) {
            w.bar.wake();
        }
    }
    // Only read by the fault handler: a plain scan, entries of threads not yet started are 0.
    bool is_worker(pthread_t self, int* id) const {
        if (g_use_fibers) {
            *id = fiber_now.load(std::memory_order_relaxed);
            return started_ && pthread_equal(tids_[0], self) && *id >= 0;
        }
        for (int i = 0; i < kMaxThreads; ++i) {
            if (pthread_equal(tids_[i], self)) {
                *id = i;
                return true;
            }
        }
        return false;
    }

    bool broken = false;
    //: the fiber running now on the runner thread (-1: the scheduler), for the fault handler
    std::atomic<int> fiber_now{-1};

  private:
    void fiber_runner(std::uint32_t seen) {
        tids_[0] = pthread_self();
        fiber_runner_init();
        for (;;) {
            groups_[0].v.wait(seen, std::memory_order_acquire);
            seen = groups_[0].v.load(std::memory_order_acquire);
            try {
                run_fiber_block(remaining_.load(std::memory_order_acquire));
            } catch (std::exception& e) {  // no stack for a fiber: the launch fails, the process goes on
                fail(e.what());
            }
            done_.release();
        }
    }

    void worker(int id, std::uint32_t seen) {
        tids_[id] = pthread_self();
        WakeWord& w = groups_[id >> 5];
        const std::uint32_t lane = static_cast<std::uint32_t>(id & 31);
        for (;;) {
            w.v.wait(seen, std::memory_order_acquire);
            seen = w.v.load(std::memory_order_acquire);
            if (lane < (seen & 63u)) {
                run_thread(id);
                if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                    done_.release();
                }
            }
        }
    }

  public:
    void run_thread(int id) {
        const uint3 t = thread_coords(id);
        t_tid = id;
        t_lane = id & 31;
        t_redphase = 0;
        t_warp = &g_block.warps[id >> 5];
        g_block.state[id] = kRunning;
        try {
            g_cur.cfg->thread_fn(g_cur.cfg->ctx, t, g_cur.block);
        } catch (KernelAbort&) {
        } catch (std::exception& e) {
            fail(coords(t, g_cur.block) + ": " + e.what());
            abort_block();
        } catch (...) {
            fail(coords(t, g_cur.block) + ": unknown C++ exception");
            abort_block();
        }
        g_block.state[id] = kExited;
        t_warp->exited.fetch_or(1u << t_lane);
        t_warp->bar.drop();
        g_block.bar.drop();
    }

  private:

    WakeWord groups_[kMaxWarps];
    std::atomic<int> remaining_{0};
    std::binary_semaphore done_{0};
    std::mutex err_m_;
    std::string err_;
    int started_ = 0;
    pthread_t tids_[kMaxThreads] = {};
};

Pool* g_pool = new Pool;  // leaked on purpose: detached workers live until the process exits

// ---------------------------------------------------------------------------- fibers
#if CUDACPU_HAVE_FIBERS
// cudacpu_fiber_switch(&save, to): saves the callee-saved registers, MXCSR and the x87 control word
// on the current stack, stores the stack pointer in *save, and resumes the context saved at `to`.
// A new fiber's stack is laid out as if it had switched away just before cudacpu_fiber_start,
// which calls r13(r12) (the entry function, the fiber) and never returns.
extern "C" void cudacpu_fiber_switch(void** save, void* to);
extern "C" void cudacpu_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl cudacpu_fiber_switch
    .hidden cudacpu_fiber_switch
    .type cudacpu_fiber_switch, @function
cudacpu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cudacpu_fiber_switch, .-cudacpu_fiber_switch
    .p2align 4
    .globl cudacpu_fiber_start
    .hidden cudacpu_fiber_start
    .type cudacpu_fiber_start, @function
cudacpu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cudacpu_fiber_start, .-cudacpu_fiber_start
)");

// 1 MiB of stack per CUDA thread (an OS thread has 8; a GPU allows 512 KiB of local memory per
// thread), reserved once per thread index and kept;
// only the pages a kernel touches are ever backed. A guard page below each turns an overflow
// into a SIGSEGV reported with the thread's coordinates (the runner handles signals on an
// alternate stack).
constexpr std::size_t kFiberStack = std::size_t{1} << 20;
constexpr std::size_t kGuard = 4096;

struct Fiber {
    void* sp = nullptr;
    unsigned char* stack = nullptr;  // lowest address of the mapping (the guard page)
    const std::atomic<std::uint32_t>* waits_on = nullptr;  // a barrier's generation, or null
    std::uint32_t seen = 0;  // the generation it arrived in
    bool done = false;
};
Fiber g_fibers[kMaxThreads];
void* g_runner_sp = nullptr;

void fiber_main(Fiber* f) {
    g_pool->run_thread(static_cast<int>(f - g_fibers));
    f->done = true;
    cudacpu_fiber_switch(&f->sp, g_runner_sp);
    __builtin_trap();  // a finished fiber is never resumed
}

void fiber_reset(Fiber& f) {
    if (!f.stack) {
        void* m = mmap(nullptr, kFiberStack + kGuard, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (m == MAP_FAILED) {
            throw std::runtime_error("cudacpu: cannot map a fiber stack");
        }
        f.stack = static_cast<unsigned char*>(m);
        mprotect(f.stack, kGuard, PROT_NONE);
    }
    auto top = reinterpret_cast<std::uintptr_t>(f.stack + kGuard + kFiberStack) & ~std::uintptr_t{15};
    auto* sp = reinterpret_cast<std::uint64_t*>(top - 80);  // 16-aligned: cudacpu_fiber_start calls aligned
    std::uint32_t mxcsr;
    std::uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    sp[0] = mxcsr | (static_cast<std::uint64_t>(fpcw) << 32);
    sp[1] = sp[2] = 0;                                          // r15, r14
    sp[3] = reinterpret_cast<std::uint64_t>(&fiber_main);      // r13: the entry
    sp[4] = reinterpret_cast<std::uint64_t>(&f);               // r12: its argument
    sp[5] = sp[6] = 0;                                          // rbx, rbp
    sp[7] = reinterpret_cast<std::uint64_t>(&cudacpu_fiber_start);
    f.sp = sp;
    f.waits_on = nullptr;
    f.done = false;
}

void fiber_runner_init() {  // on the one runner thread of the process
    static unsigned char altstack[64 * 1024];
    stack_t ss{};
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    sigaltstack(&ss, nullptr);
}

// The order of one sweep over the block's n threads: a permutation drawn from the block's
// coordinates and the sweep's number (the same run after run, different from sweep to sweep).
void sweep_order(int* order, int n, uint3 b, unsigned sweep) {
    std::uint64_t h = (static_cast<std::uint64_t>(b.x) << 40) ^ (static_cast<std::uint64_t>(b.y) << 20) ^ b.z ^
                      (static_cast<std::uint64_t>(sweep) * 0x9E3779B97F4A7C15ull);
    for (int i = 0; i < n; ++i) {
        order[i] = i;
    }
    for (int i = n - 1; i > 0; --i) {  // Fisher-Yates with splitmix64
        h += 0x9E3779B97F4A7C15ull;
        std::uint64_t z = h;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        std::swap(order[i], order[static_cast<int>(z % static_cast<std::uint64_t>(i + 1))]);
    }
}

//: set when no thread of the block could go on (what each one waited in is in g_block.state)
int g_deadlock_counts[5];
bool g_deadlocked = false;

void run_fiber_block(int n) {
    for (int i = 0; i < n; ++i) {
        fiber_reset(g_fibers[i]);
    }
    g_deadlocked = false;
    int live = n;
    for (unsigned sweep = 0; live > 0; ++sweep) {
        static int order[kMaxThreads];
        sweep_order(order, n, g_cur.block, sweep);
        bool moved = false;
        for (int k = 0; k < n; ++k) {
            Fiber& f = g_fibers[order[k]];
            if (f.done || (f.waits_on && f.waits_on->load(std::memory_order_relaxed) == f.seen)) {
                continue;
            }
            f.waits_on = nullptr;
            g_pool->fiber_now.store(static_cast<int>(&f - g_fibers), std::memory_order_relaxed);
            cudacpu_fiber_switch(&g_runner_sp, f.sp);
            g_pool->fiber_now.store(-1, std::memory_order_relaxed);
            moved = true;
            live -= f.done;
        }
        if (!moved) {  // every live thread waits for one that never comes: abort them all
            for (int& c : g_deadlock_counts) {
                c = 0;
            }
            for (int i = 0; i < n; ++i) {
                g_deadlock_counts[g_block.state[i].load()]++;
            }
            g_deadlocked = true;
            g_pool->abort_block();  // every barrier's generation moves on: each waiter resumes and unwinds
        }
    }
}

void fiber_wait(const std::atomic<std::uint32_t>& gen, std::uint32_t seen) {
    const int me = t_tid;
    const int phase = t_redphase;
    Fiber& f = g_fibers[me];
    f.waits_on = &gen;
    f.seen = seen;
    cudacpu_fiber_switch(&f.sp, g_runner_sp);
    // back on this fiber: the runner's thread-locals and the module's threadIdx are ours again
    t_tid = me;
    t_lane = me & 31;
    t_warp = &g_block.warps[me >> 5];
    t_redphase = phase;
    g_cur.cfg->enter(thread_coords(me), g_cur.block);
}
#else
bool g_deadlocked = false;
int g_deadlock_counts[5];
void run_fiber_block(int) { __builtin_trap(); }
void fiber_runner_init() {}
void fiber_wait(const std::atomic<std::uint32_t>&, std::uint32_t) { __builtin_trap(); }
#endif

// ---------------------------------------------------------------------------- fault reporting
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
struct sigaction g_old_segv;
struct sigaction g_old_bus;

void put(char*& p, char* end, const char* s) {
    while (*s && p < end) {
        *p++ = *s++;
    }
}
void put_num(char*& p, char* end, unsigned long long v, int base) {
    char tmp[32];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v && n < 32);
    while (n && p < end) {
        *p++ = tmp[--n];
    }
}

// Async-signal-safe: identifies the worker by pthread_self() and prints coordinates with write(2).
void fault_handler(int sig, siginfo_t* info, void* uctx) {
    int id = -1;
    if (g_cur.cfg && g_pool->is_worker(pthread_self(), &id)) {
        char buf[512];
        char* p = buf;
        char* end = buf + sizeof buf - 1;
        const unsigned* b = g_cur.cfg->block;
        const unsigned u = static_cast<unsigned>(id);
        put(p, end, "\ncudacpu: illegal memory access (");
        put(p, end, sig == SIGSEGV ? "SIGSEGV" : "SIGBUS");
        put(p, end, " at 0x");
        put_num(p, end, reinterpret_cast<unsigned long long>(info->si_addr), 16);
        put(p, end, ") in kernel '");
        put(p, end, g_cur.cfg->kernel ? g_cur.cfg->kernel : "?");
        put(p, end, "', thread (");
        put_num(p, end, u % b[0], 10);
        put(p, end, ",");
        put_num(p, end, (u / b[0]) % b[1], 10);
        put(p, end, ",");
        put_num(p, end, u / (b[0] * b[1]), 10);
        put(p, end, ") of block (");
        put_num(p, end, g_cur.block.x, 10);
        put(p, end, ",");
        put_num(p, end, g_cur.block.y, 10);
        put(p, end, ",");
        put_num(p, end, g_cur.block.z, 10);
        put(p, end, ")\n");
        const ssize_t ignored = write(2, buf, static_cast<size_t>(p - buf));
        (void)ignored;
    }
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction) {
        old->sa_sigaction(sig, info, uctx);
    } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
        old->sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // returning re-executes the faulting access, which is now fatal
    }
}

void install_fault_handler() {
    static bool installed = false;
    if (installed) {
        return;
    }
    installed = true;
    struct sigaction sa {};
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;  // a fiber's overflow: the runner's alternate stack
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}
#else
void install_fault_handler() {}
#endif

int fail_launch(const std::string& m) {
    t_last_error = m;
    return 1;
}

}  // namespace

// ---------------------------------------------------------------------------- exported entry points
CUDACPU_API const char* last_error() { return t_last_error.c_str(); }
extern "C" CUDACPU_API const char* cudacpu_block_threads() { return g_use_fibers ? "fibers" : "os"; }

CUDACPU_API void syncthreads() {
    ++g_block.sync_count[t_tid];
    g_block.state[t_tid] = kAtSync;
    g_block.bar.arrive_and_wait();
    g_block.state[t_tid] = kRunning;
}

CUDACPU_API int syncthreads_count(int pred) {  // three rotating counters: one barrier per call
    const int p = t_redphase;
    t_redphase = (p + 1) % 3;
    g_block.red[p].fetch_add(pred != 0);
    syncthreads();
    const int r = g_block.red[p].load();
    g_block.red[(p + 2) % 3].store(0);
    return r;
}

CUDACPU_API void syncwarp(unsigned mask) {
    check_mask(mask);
    g_block.state[t_tid] = kAtWarp;
    t_warp->bar.arrive_and_wait();
    g_block.state[t_tid] = kRunning;
    check_exited(mask);
}

// PTX shfl.sync semantics: mode up/down/bfly/idx, c operand derived from width.
CUDACPU_API std::uint64_t shfl(unsigned mask, std::uint64_t bits, int mode, int b, int width) {
    if (width < 1 || width > 32 || (width & (width - 1))) {
        device_error("shuffle width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
    }
    check_mask(mask);
    Warp& w = *t_warp;
    const int lane = t_lane;
    w.buf[lane] = bits;
    g_block.state[t_tid] = kAtWarp;
    w.bar.arrive_and_wait();
    check_exited(mask);
    const int segmask = (32 - width) & 31;
    const int cval = mode == kShflUp ? 0 : 31;
    const int max_lane = (lane & segmask) | (cval & ~segmask);
    const int min_lane = lane & segmask;
    int j;
    bool ok;
    switch (mode) {
        case kShflUp:
            j = lane - b;
            ok = j >= max_lane;
            break;
        case kShflDown:
            j = lane + b;
            ok = j <= max_lane;
            break;
        case kShflXor:
            j = lane ^ b;
            ok = j <= max_lane;
            break;
        default:
            j = min_lane | (b & ~segmask & 31);
            ok = j <= max_lane;
            break;
    }
    if (!ok) {
        j = lane;
    }
    if (j >= w.nlanes || ((w.exited.load() >> j) & 1u)) {
        if (g_strict.load(std::memory_order_relaxed)) {
            device_error("shuffle reads from an exited or non-existent lane " + std::to_string(j));
        }
        j = lane;
    }
    const std::uint64_t r = w.buf[j];
    w.bar.arrive_and_wait();
    g_block.state[t_tid] = kRunning;
    return r;
}

CUDACPU_API unsigned ballot(unsigned mask, int pred) {
    check_mask(mask);
    Warp& w = *t_warp;
    w.buf[t_lane] = pred != 0;
    g_block.state[t_tid] = kAtWarp;
    w.bar.arrive_and_wait();
    check_exited(mask);
    unsigned bal = 0;
    const unsigned gone = w.exited.load();
    for (int i = 0; i < w.nlanes; ++i) {
        if (!((gone >> i) & 1u) && w.buf[i]) {
            bal |= 1u << i;
        }
    }
    w.bar.arrive_and_wait();
    g_block.state[t_tid] = kRunning;
    return bal & mask;
}

CUDACPU_API unsigned activemask() { return t_warp->live_mask(); }
CUDACPU_API unsigned lane_id() { return static_cast<unsigned>(t_lane); }
CUDACPU_API void* dynamic_smem() { return g_cur.dyn_smem; }
CUDACPU_API void trap() { device_error("__trap() called"); }
CUDACPU_API void assert_fail(const char* expr, const char* file, int line, const char* func) {
    device_error(std::string("assertion `") + expr + "` failed in " + func + " at " + file + ":" +
                 std::to_string(line));
}

CUDACPU_API int run_grid(const LaunchConfig& cfg) {
    static std::mutex launch_m;  // one launch at a time in the process (ctypes releases the GIL)
    std::lock_guard<std::mutex> launch_lock(launch_m);
    Pool& pool = *g_pool;
    const long n = static_cast<long>(cfg.block[0]) * cfg.block[1] * cfg.block[2];
    if (pool.broken) {
        return fail_launch("the thread pool is broken by an earlier hang (threads stuck outside any barrier); "
                           "restart the process");
    }
    if (n < 1 || n > kMaxThreads || cfg.block[0] > 1024 || cfg.block[1] > 1024 || cfg.block[2] > 64) {
        return fail_launch("invalid block dimensions (at most 1024 threads, x,y <= 1024, z <= 64)");
    }
    if (cfg.grid[0] < 1 || cfg.grid[1] < 1 || cfg.grid[2] < 1 || cfg.grid[0] > 2147483647u ||
        cfg.grid[1] > 65535 || cfg.grid[2] > 65535) {
        return fail_launch("invalid grid dimensions");
    }
    if (cfg.dynamic_smem > 227 * 1024) {
        return fail_launch("dynamic shared memory above the 227 KiB hardware maximum");
    }
    install_fault_handler();
    g_strict.store(cfg.strict ? 1 : 0);
    g_abort = false;
    pool.take_error();
    pool.ensure(static_cast<int>(n));

#if defined(__SANITIZE_ADDRESS__)
    // exact size (even 0): AddressSanitizer reports any access past the launch's dynamic smem
    unsigned char* dyn = static_cast<unsigned char*>(std::malloc(cfg.dynamic_smem));
#else
    unsigned char* dyn = cfg.dynamic_smem ? static_cast<unsigned char*>(std::malloc(cfg.dynamic_smem)) : nullptr;
#endif
    struct FreeOnExit {
        unsigned char* p;
        ~FreeOnExit() {
            g_cur.dyn_smem = nullptr;
            g_cur.cfg = nullptr;
            std::free(p);
        }
    } free_on_exit{dyn};
    g_cur.cfg = &cfg;
    g_cur.dyn_smem = dyn;
    const int nwarps = static_cast<int>((n + 31) / 32);

    for (unsigned bz = 0; bz < cfg.grid[2]; ++bz) {
        for (unsigned by = 0; by < cfg.grid[1]; ++by) {
            for (unsigned bx = 0; bx < cfg.grid[0]; ++bx) {
                g_cur.block = {bx, by, bz};
                g_block.bar.reset(static_cast<int>(n));
                for (int w = 0; w < nwarps; ++w) {
                    Warp& warp = g_block.warps[w];
                    warp.nlanes = static_cast<int>(std::min<long>(32, n - 32L * w));
                    warp.exited = 0;
                    warp.bar.reset(warp.nlanes);
                }
                for (long i = 0; i < n; ++i) {
                    g_block.sync_count[i] = 0;
                    g_block.state[i] = kNotStarted;
                }
                for (auto& r : g_block.red) {
                    r = 0;
                }
                if (dyn && cfg.dynamic_smem) {
                    std::memset(dyn, 0xff, cfg.dynamic_smem);  // poison: NaN floats, -1 ints
                }
                if (cfg.static_smem_begin && cfg.static_smem_end > cfg.static_smem_begin) {
                    std::memset(cfg.static_smem_begin, 0xff,
                                static_cast<std::size_t>(cfg.static_smem_end - cfg.static_smem_begin));
                }
                if (!pool.run_block(static_cast<int>(n), cfg.timeout_s)) {
                    int count[5] = {0, 0, 0, 0, 0};
                    for (long i = 0; i < n; ++i) {
                        count[g_block.state[i].load()]++;
                    }
                    pool.abort_block();
                    char secs[32];
                    std::snprintf(secs, sizeof secs, "%g", cfg.timeout_s);
                    std::string m = "deadlock or timeout (no progress in " + std::string(secs) + " s) in block (" +
                                    std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                                    "): " + census(count);
                    if (!pool.wait_done(2.0)) {
                        pool.broken = true;
                        return fail_launch(m + " (threads are stuck outside any barrier: the pool is broken, "
                                               "restart the process)");
                    }
                    return fail_launch(m);
                }
                std::string err = pool.take_error();
                if (!err.empty()) {
                    return fail_launch(err);
                }
                if (g_use_fibers && g_deadlocked) {
                    return fail_launch("deadlock (no thread can go on) in block (" + std::to_string(bx) + "," +
                                       std::to_string(by) + "," + std::to_string(bz) + "): " +
                                       census(g_deadlock_counts));
                }
                if (cfg.strict) {
                    int lo = g_block.sync_count[0];
                    int hi = lo;
                    for (long i = 1; i < n; ++i) {
                        lo = std::min(lo, g_block.sync_count[i]);
                        hi = std::max(hi, g_block.sync_count[i]);
                    }
                    if (lo != hi) {
                        return fail_launch("divergent __syncthreads in block (" + std::to_string(bx) + "," +
                                           std::to_string(by) + "," + std::to_string(bz) +
                                           "): its threads executed between " + std::to_string(lo) + " and " +
                                           std::to_string(hi) +
                                           " barriers (undefined behaviour on the GPU; an early return "
                                           "before __syncthreads?)");
                    }
                }
            }
        }
    }
    return 0;
}

}  // namespace cudacpu
