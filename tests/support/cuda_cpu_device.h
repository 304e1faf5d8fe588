// CUDA's device-side names for g++, so that gpunet's CUDA sources (and the code CuPy generates for
// its ElementwiseKernels, with CuPy's own carray.cuh, complex.cuh and atomics.cuh) compile and run
// on the CPU: tests/support/cuda_cpu.py includes this header before every kernel and launches the kernel
// through gpunet_cpu_run below. One CPU thread runs the whole grid: threads one after another
// (their index in threadIdx/blockIdx, set before each), or, in kernels that call __syncthreads,
// each thread of a block as a fiber (ucontext) resumed barrier by barrier. So atomics are plain
// read-modify-writes, and a race shows as a result that changes with the order the threads run in
// (tests/support/cuda_cpu.py runs three orders). Not provided (a kernel using them fails to compile here,
// which names them): warp shuffles and votes, dynamic (extern) shared memory, textures, cooperative
// groups.
#pragma once

#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
// One block runs at a time, so a function-static array is its shared memory.
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static const int warpSize = 32;

// ------------------------------------------------------- the float overloads of CUDA's math
// functions C's <math.h> declares only the double versions in the global namespace: without these,
// sqrt(float) would compute in double and round once, where CUDA computes in float. (std:: has the
// float overloads; glibc itself declares __expf and __logf.)
#define GPUNET_FLOAT1(f) static inline float f(float x) { return std::f(x); }
#define GPUNET_FLOAT2(f) static inline float f(float x, float y) { return std::f(x, y); }
GPUNET_FLOAT1(sqrt) GPUNET_FLOAT1(cbrt) GPUNET_FLOAT1(exp) GPUNET_FLOAT1(exp2) GPUNET_FLOAT1(expm1)
GPUNET_FLOAT1(log) GPUNET_FLOAT1(log2) GPUNET_FLOAT1(log10) GPUNET_FLOAT1(log1p) GPUNET_FLOAT1(sin)
GPUNET_FLOAT1(cos) GPUNET_FLOAT1(tan) GPUNET_FLOAT1(asin) GPUNET_FLOAT1(acos) GPUNET_FLOAT1(atan)
GPUNET_FLOAT1(sinh) GPUNET_FLOAT1(cosh) GPUNET_FLOAT1(tanh) GPUNET_FLOAT1(fabs) GPUNET_FLOAT1(floor)
GPUNET_FLOAT1(ceil) GPUNET_FLOAT1(round) GPUNET_FLOAT1(trunc) GPUNET_FLOAT1(rint) GPUNET_FLOAT1(erf)
GPUNET_FLOAT1(erfc) GPUNET_FLOAT1(lgamma) GPUNET_FLOAT1(tgamma)
GPUNET_FLOAT2(pow) GPUNET_FLOAT2(fmod) GPUNET_FLOAT2(fmin) GPUNET_FLOAT2(fmax) GPUNET_FLOAT2(atan2)
GPUNET_FLOAT2(hypot) GPUNET_FLOAT2(copysign)
#undef GPUNET_FLOAT1
#undef GPUNET_FLOAT2
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
static inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
#define GPUNET_MINMAX(T) \
    static inline T min(T a, T b) { return b < a ? b : a; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
GPUNET_MINMAX(int) GPUNET_MINMAX(unsigned int)
GPUNET_MINMAX(long long) GPUNET_MINMAX(unsigned long long)
#undef GPUNET_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }

// ------------------------------------------------------------------------- bit casts and bit
// counts
template <class To, class From> static inline To gpunet_bits(From x) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
    To y;
    std::memcpy(&y, &x, sizeof y);
    return y;
}
static inline int __float_as_int(float x) { return gpunet_bits<int>(x); }
static inline unsigned int __float_as_uint(float x) { return gpunet_bits<unsigned int>(x); }
static inline float __int_as_float(int x) { return gpunet_bits<float>(x); }
static inline float __uint_as_float(unsigned int x) { return gpunet_bits<float>(x); }
static inline long long __double_as_longlong(double x) { return gpunet_bits<long long>(x); }
static inline double __longlong_as_double(long long x) { return gpunet_bits<double>(x); }
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }

// --------------------------------------------------------------------------------------- atomics
// One thread runs at a time: each is a plain read-modify-write returning the old value.
#define GPUNET_ATOMIC(name, T, expr) \
    static inline T name(T* a, T v) { T old = *a; *a = (expr); return old; }
#define GPUNET_ATOMICS_INT(T) \
    GPUNET_ATOMIC(atomicAdd, T, old + v) GPUNET_ATOMIC(atomicSub, T, old - v) \
    GPUNET_ATOMIC(atomicExch, T, v) GPUNET_ATOMIC(atomicMax, T, old < v ? v : old) \
    GPUNET_ATOMIC(atomicMin, T, v < old ? v : old) GPUNET_ATOMIC(atomicAnd, T, old & v) \
    GPUNET_ATOMIC(atomicOr, T, old | v) GPUNET_ATOMIC(atomicXor, T, old ^ v) \
    static inline T atomicCAS(T* a, T compare, T v) { \
        T old = *a; \
        if (old == compare) *a = v; \
        return old; \
    }
GPUNET_ATOMICS_INT(int) GPUNET_ATOMICS_INT(unsigned int) GPUNET_ATOMICS_INT(unsigned long long)
#undef GPUNET_ATOMICS_INT
GPUNET_ATOMIC(atomicAdd, float, old + v) GPUNET_ATOMIC(atomicAdd, double, old + v)
GPUNET_ATOMIC(atomicExch, float, v)
GPUNET_ATOMIC(atomicInc, unsigned int, old >= v ? 0u : old + 1u)
GPUNET_ATOMIC(atomicDec, unsigned int, (old == 0u || old > v) ? v : old - 1u)
#undef GPUNET_ATOMIC
static inline unsigned short atomicCAS(unsigned short* a, unsigned short compare,
                                       unsigned short v) {
    unsigned short old = *a;
    if (old == compare) *a = v;
    return old;
}
static inline void __threadfence() {}
static inline void __threadfence_block() {}
static inline void __syncwarp(unsigned int = 0xffffffffu) {}

// ----------------------------------------------------------------------------- the block's fibers
namespace gpunet_cpu {
enum State { RUNNING, AT_BARRIER, DONE };
struct Fiber {
    ucontext_t context;     // where it waits (swapcontext)
    void* sp = nullptr;     // or its saved stack pointer (gpunet_cpu_switch)
    char* stack = nullptr;  // STACK bytes of stack_pool
    State state = RUNNING;
    int site = -1;  // the __syncthreads it waits at (each one in the source has its own number)
    uint3 index{};
};
static ucontext_t scheduler;
static Fiber* current = nullptr;
static bool fibers = false;
static void (*body)() = nullptr;
static char error[1024];
static unsigned long long barriers = 0;  // barrier phases passed, for the caller's report
#if defined(__SANITIZE_ADDRESS__)
static const size_t STACK = 1 << 20;
#else
static const size_t STACK = 1 << 16;
#endif

// The fibers' stacks: one per thread of a block, mapped once per process (per loaded kernel), grown
// only for a block larger than any before, and reused by every block and launch. Mapped, not
// zero-filled: a block touches only the pages its threads use (a std::vector of STACK bytes per
// thread per block zero-filled 16 MiB per 256-thread block, 256 MiB under ASan).
static char* stack_pool = nullptr;
static size_t stack_pool_threads = 0;

static char* stack_of(unsigned thread, unsigned threads) {
    if (threads > stack_pool_threads) {
        if (stack_pool) munmap(stack_pool, stack_pool_threads * STACK);
        void* at = mmap(nullptr, threads * STACK, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        stack_pool = at == MAP_FAILED ? nullptr : static_cast<char*>(at);
        stack_pool_threads = stack_pool ? threads : 0;
    }
    return stack_pool ? stack_pool + size_t(thread) * STACK : nullptr;
}

static void fail(const char* what) {
    if (!error[0]) std::snprintf(error, sizeof error, "%s", what);
}

// Switching between the scheduler and a fiber. swapcontext saves and restores the signal mask, a
// system call each way: a tiled GEMM's 256 threads meeting two barriers per tile made 10^6 of them
// per launch. So on x86-64 a switch is gpunet_cpu_switch below: push the registers the ABI has the
// callee keep (rbx, rbp, r12-r15), store the stack pointer, load the other one, pop its registers,
// return into it (MXCSR, which holds flush-to-zero, is one setting for the whole launch). A fiber
// starts on a stack laid out as if it had switched away just before its first instruction.
// Elsewhere, and under AddressSanitizer (told of every switch), swapcontext.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define GPUNET_CPU_SWITCH 1
extern "C" void gpunet_cpu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .local gpunet_cpu_switch
    .type gpunet_cpu_switch, @function
gpunet_cpu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpunet_cpu_switch, .-gpunet_cpu_switch
)");
static void* scheduler_sp = nullptr;
static void entry();
// The stack a fiber starts on: six zero registers, then entry as the return address, then a zero
// where a caller's return address would be (entry starts with rsp = 8 mod 16, as after a call).
static void start(Fiber& f) {
    auto top = reinterpret_cast<uintptr_t>(f.stack + STACK) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&entry);
    for (int k = 0; k < 6; ++k) *--sp = nullptr;
    f.sp = sp;
}
__attribute__((noinline)) static void resume(Fiber* f) { gpunet_cpu_switch(&scheduler_sp, f->sp); }
__attribute__((noinline)) static void yield() { gpunet_cpu_switch(&current->sp, scheduler_sp); }
#else
static void entry();
static void start(Fiber& f) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = STACK;
    f.context.uc_link = nullptr;
    makecontext(&f.context, entry, 0);
}
static void switch_to(ucontext_t* from, ucontext_t* to, Fiber* target) {
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    if (target) __sanitizer_start_switch_fiber(&fake, target->stack, STACK);
    else __sanitizer_start_switch_fiber(&fake, nullptr, 0);  // the scheduler's stack: ASan knows it
#else
    (void)target;
#endif
    swapcontext(from, to);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}
__attribute__((noinline)) static void resume(Fiber* f) { switch_to(&scheduler, &f->context, f); }
__attribute__((noinline)) static void yield() {
    switch_to(&current->context, &scheduler, nullptr);
}
#endif

static void entry() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    body();
    current->state = DONE;
    yield();  // never resumed: every thread of the block ended (run_block checks)
}

__attribute__((noinline)) static void barrier(int site) {
    if (!fibers) {  // cannot happen: every source naming __syncthreads runs as fibers
        fail("__syncthreads reached in a kernel run without fibers");
        return;
    }
    current->state = AT_BARRIER;
    current->site = site;
    yield();
}
}  // namespace gpunet_cpu

// Each __syncthreads written in the source is its own barrier (__COUNTER__ numbers them), as each
// is its own instruction on a GPU: threads waiting at two different ones are a divergent barrier.
#define __syncthreads() gpunet_cpu::barrier(__COUNTER__)
