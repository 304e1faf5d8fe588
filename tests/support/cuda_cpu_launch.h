// The launcher tests/support/cuda_cpu.py appends to a kernel's source (after `#define GPUNET_KERNEL
// <name>`): gpunet_cpu_params says the size of each parameter (checked against the bytes the launch
// packs, as CUDA reads sizeof(parameter) bytes from each kernelParams pointer), gpunet_cpu_run runs
// the grid once in the order asked for (0 forward, 1 reversed, 2 shuffled with the seed) and
// returns NULL or the error.
#pragma once

#include <csetjmp>
#include <csignal>
#include <type_traits>

namespace gpunet_cpu {
template <class P> static typename std::remove_cv<P>::type load(void* from) {
    typename std::remove_cv<P>::type value;
    std::memcpy(static_cast<void*>(&value), from, sizeof value);
    return value;
}
template <class F> struct signature;
template <class... P> struct signature<void(P...)> {
    static const int count = sizeof...(P);
    static void sizes(size_t* out) {
        const size_t s[] = {sizeof(P)..., 0};
        for (int k = 0; k < count; ++k) out[k] = s[k];
    }
    template <size_t... I>
    static void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
        kernel(load<P>(args[I])...);
    }
};
typedef signature<decltype(GPUNET_KERNEL)> kernel_signature;
static void** launch_args = nullptr;

static void run_thread() {
    kernel_signature::call(&GPUNET_KERNEL, launch_args,
                           std::make_index_sequence<kernel_signature::count>());
}

// SplitMix64 draws, Fisher-Yates: the same permutation for a seed on every machine
struct Shuffle {
    unsigned long long state;
    unsigned long long next() {
        unsigned long long x = (state += 0x9E3779B97F4A7C15ull);
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
        return x ^ (x >> 31);
    }
    void order(std::vector<unsigned>& ids, int how) {
        const unsigned n = unsigned(ids.size());
        for (unsigned k = 0; k < n; ++k) ids[k] = how == 1 ? n - 1 - k : k;
        if (how == 2)
            for (size_t k = ids.size(); k > 1; --k) std::swap(ids[k - 1], ids[next() % k]);
    }
};

static uint3 unflatten(unsigned id, dim3 d) {
    return uint3{id % d.x, id / d.x % d.y, id / d.x / d.y};
}

// Blocks in the order asked for, and in each block its threads in that order (drawn again per block
// when shuffled): any thread may run before or after any other of its block, as on a GPU, while a
// block's threads stay together in memory (a shuffle of the whole grid costs cache misses, not
// coverage).
static void run_direct(unsigned blocks, unsigned threads, int how, Shuffle& shuffle) {
    std::vector<unsigned> order(blocks), ids(threads);
    shuffle.order(order, how);
    for (unsigned b : order) {
        blockIdx = unflatten(b, gridDim);
        shuffle.order(ids, how);
        for (unsigned t : ids) {
            threadIdx = unflatten(t, blockDim);
            run_thread();
        }
        if (error[0]) return;
    }
}

// One block as fibers: every phase resumes each waiting thread (in the order asked for, drawn again
// each phase when shuffled) until it reaches a barrier or its end; then every thread must be at the
// same barrier (released together) or all must have ended.
static void run_block(unsigned threads, int how, Shuffle& shuffle) {
    std::vector<Fiber> block(threads);
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = block[t];
        f.stack = stack_of(t, threads);
        if (!f.stack) {
            std::snprintf(error, sizeof error, "no memory for %u fiber stacks", threads);
            return;
        }
        f.index = unflatten(t, blockDim);
        start(f);
    }
    std::vector<unsigned> ids(threads);
    for (unsigned long long phase = 1;; ++phase) {
        shuffle.order(ids, how);
        for (unsigned t : ids) {
            current = &block[t];
            threadIdx = current->index;
            resume(current);
        }
        current = nullptr;
        unsigned waiting = 0;
        for (Fiber& f : block) waiting += f.state == AT_BARRIER;
        if (waiting == 0 || error[0]) return;
        if (waiting != threads) {
            std::snprintf(error, sizeof error,
                          "__syncthreads not reached by every thread of block (%u, %u, %u): "
                          "%u threads wait at barrier %llu of the block, %u have returned",
                          blockIdx.x, blockIdx.y,
                          blockIdx.z, waiting, phase, threads - waiting);
            return;
        }
        for (Fiber& f : block) {
            if (f.site != block[0].site) {
                std::snprintf(error, sizeof error,
                              "divergent __syncthreads in block (%u, %u, %u): threads "
                              "(%u, %u, %u) and (%u, %u, %u) wait at different barriers",
                              blockIdx.x, blockIdx.y, blockIdx.z, block[0].index.x,
                              block[0].index.y, block[0].index.z,
                              f.index.x, f.index.y, f.index.z);
                return;
            }
            f.state = RUNNING;
        }
        ++barriers;
    }
}
// A kernel that reads or writes far outside its arrays (say through a label read from a guard)
// would kill the test process with SIGSEGV; here the fault ends the launch with an error instead.
// Under AddressSanitizer its own handler reports it (with the line), so none is installed.
static sigjmp_buf fault_jump;
static volatile void* fault_address = nullptr;
static void on_fault(int, siginfo_t* info, void*) {
    fault_address = info->si_addr;
    siglongjmp(fault_jump, 1);
}
}  // namespace gpunet_cpu

// The fibers' stack pool, for the test that it is mapped once and reused: its address, and how
// many threads' stacks it holds.
extern "C" __attribute__((visibility("default"))) void* gpunet_cpu_stack_pool(size_t* threads) {
    *threads = gpunet_cpu::stack_pool_threads;
    return gpunet_cpu::stack_pool;
}

extern "C" __attribute__((visibility("default"))) int gpunet_cpu_params(size_t* sizes) {
    gpunet_cpu::kernel_signature::sizes(sizes);
    return gpunet_cpu::kernel_signature::count;
}

extern "C" __attribute__((visibility("default"))) const char* gpunet_cpu_run(
        void** args, const unsigned* grid, const unsigned* block, int how, unsigned long long seed,
        int use_fibers, int flush_denormals, unsigned long long* barriers_passed) {
    using namespace gpunet_cpu;
    error[0] = 0;
    barriers = 0;
    launch_args = args;
    body = run_thread;
    fibers = use_fibers != 0;
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    const unsigned blocks = grid[0] * grid[1] * grid[2], threads = block[0] * block[1] * block[2];
#if defined(__x86_64__) || defined(__i386__)
    // CuPy compiles with -ftz=true: float denormals flush to zero
    const unsigned int csr = _mm_getcsr();
    if (flush_denormals) _mm_setcsr(csr | 0x8040u);  // FTZ and DAZ
#else
    if (flush_denormals) return "flush-to-zero is only set up for x86 here";
#endif
    Shuffle shuffle{seed};
#if !defined(__SANITIZE_ADDRESS__)
    struct sigaction handler, old_segv, old_bus;
    std::memset(&handler, 0, sizeof handler);
    handler.sa_sigaction = on_fault;
    handler.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &handler, &old_segv);
    sigaction(SIGBUS, &handler, &old_bus);
    if (sigsetjmp(fault_jump, 1)) {
        std::snprintf(error, sizeof error,
                      "invalid memory access (address %p) in thread (%u, %u, %u) of block "
                      "(%u, %u, %u): an index outside its array", (void*)fault_address, threadIdx.x,
                      threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z);
    } else
#endif
    if (!fibers) {
        run_direct(blocks, threads, how, shuffle);
    } else {
        std::vector<unsigned> order(blocks);
        shuffle.order(order, how);
        for (unsigned b : order) {
            blockIdx = unflatten(b, gridDim);
            run_block(threads, how, shuffle);
            if (error[0]) break;
        }
    }
#if !defined(__SANITIZE_ADDRESS__)
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
#endif
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(csr);
#endif
    *barriers_passed = barriers;
    return error[0] ? error : nullptr;
}
