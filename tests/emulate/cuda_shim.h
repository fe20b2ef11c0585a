// Just enough of CUDA to run kernels/*.cu on the CPU for tests. A block's threads are fibers
// on one OS thread, switched only where a kernel waits: `__syncthreads` waits for the
// block, a warp shuffle for its warp. `__shared__` is per OS thread, so blocks run on several
// OS threads at once. Slow and exact; for checking the kernels' logic where no GPU is.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define DISTILL_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(x)

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim;

namespace shim {

#if !defined(__x86_64__)
#error "the CUDA emulation switches fibers with x86-64 code"
#endif

// Saves the callee-saved registers on the current stack, stores its pointer in *save, and
// continues on the stack `load` (where the same was saved, or a new fiber's start was laid).
extern "C" void shim_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .type shim_switch, @function
shim_switch:
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
    .size shim_switch, .-shim_switch
)");

/// A fiber's stack; kernels keep small arrays at most.
constexpr size_t STACK_BYTES = 256 * 1024;

struct Barrier {
    unsigned int count = 0, arrived = 0, generation = 0;
};

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    bool done = false;
    // The barrier it waits at and the generation that must pass (None: runnable).
    const Barrier* waiting = nullptr;
    unsigned int generation = 0;
    unsigned int shuffles = 0;  // warp shuffles so far (which exchange half is next)
};

/// One OS thread's running block: its fibers and what they wait on.
struct Block {
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    unsigned int current = 0;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<float> exchange;
    const std::function<void()>* body = nullptr;
};

inline thread_local Block* running = nullptr;

inline void wait(Barrier& barrier) {
    const unsigned int generation = barrier.generation;
    if (++barrier.arrived == barrier.count) {
        barrier.arrived = 0;
        ++barrier.generation;
        return;
    }
    Block& b = *running;
    Fiber& f = b.fibers[b.current];
    f.waiting = &barrier;
    f.generation = generation;
    shim_switch(&f.sp, b.scheduler_sp);
}

[[noreturn]] inline void fiber_main() {
    Block& b = *running;
    (*b.body)();
    b.fibers[b.current].done = true;
    void* finished;
    shim_switch(&finished, b.scheduler_sp);
    __builtin_unreachable();
}

/// Lays a new fiber's start on its stack: six zero registers, then fiber_main as the return
/// address, aligned as if fiber_main had been called.
inline void start(Fiber& f) {
    auto top = (uintptr_t)(f.stack + STACK_BYTES) & ~(uintptr_t)15;
    auto* slots = (uintptr_t*)top - 8;
    std::memset(slots, 0, 8 * sizeof(uintptr_t));
    slots[6] = (uintptr_t)&fiber_main;
    f.sp = slots;
}

/// Runs the block `blockIdx` names on this OS thread: every fiber that can go, in turn, until
/// each is done.
inline void run_block(Block& b) {
    const unsigned int threads = blockDim.x;
    b.block_barrier = Barrier{threads};
    b.warp_barriers.assign((threads + 31) / 32, Barrier{32});
    b.exchange.assign(2 * threads, 0.0f);
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.done = false;
        f.waiting = nullptr;
        f.shuffles = 0;
        start(f);
    }
    // Fibers run in index order and in reverse by turns (per pass, per block), so a read of
    // shared memory that lacks the barrier ordering it after the write shows up in either
    // direction.
    unsigned int pass = blockIdx.x + blockIdx.y;
    for (unsigned int left = threads; left > 0; ++pass) {
        bool ran = false;
        for (unsigned int i = 0; i < threads; ++i) {
            const unsigned int t = pass % 2 ? threads - 1 - i : i;
            Fiber& f = b.fibers[t];
            if (f.done || (f.waiting && f.waiting->generation == f.generation)) continue;
            f.waiting = nullptr;
            b.current = t;
            threadIdx = dim3{t, 0, 0};
            shim_switch(&b.scheduler_sp, f.sp);
            ran = true;
            if (f.done) --left;
        }
        if (!ran) {
            // Threads wait at a barrier others left without: a hang on a GPU too.
            std::fprintf(stderr, "cuda_shim: block (%u, %u) deadlocked at a barrier\n", blockIdx.x, blockIdx.y);
            std::abort();
        }
    }
}

}  // namespace shim

inline void __syncthreads() { shim::wait(shim::running->block_barrier); }

inline float __shfl_xor_sync(unsigned int, float v, int lane_mask) {
    shim::Block& b = *shim::running;
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Two exchange halves used in turn: a lane can write its next value before a slower lane
    // has read this one, and not the one after (that needs the whole warp at the next wait).
    unsigned int& turn = b.fibers[threadIdx.x].shuffles;
    float* exchange = b.exchange.data() + (turn++ % 2) * blockDim.x;
    exchange[threadIdx.x] = v;
    shim::wait(b.warp_barriers[warp]);
    return exchange[warp * 32 + (lane ^ (unsigned int)lane_mask)];
}

inline unsigned int atomicAdd(unsigned int* at, unsigned int v) { return std::atomic_ref<unsigned int>(*at).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* at, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*at).fetch_add(v);
}

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned long long __float2ull_rn(float f) { return (unsigned long long)std::nearbyint(f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }

/// Runs `body` as the threads of each block of `grid`, blocks spread over the CPU's cores. One
/// launch at a time (the emulated driver runs work synchronously).
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    const unsigned int blocks = grid.x * grid.y * grid.z;
    std::atomic<unsigned int> next{0};
    const unsigned int workers = std::max(1u, std::min(blocks, std::thread::hardware_concurrency()));
    // Fiber stacks, kept for the process: allocating them per launch costs more than the work.
    static std::vector<std::vector<std::unique_ptr<char[]>>> stacks;
    while (stacks.size() < workers) stacks.emplace_back();
    for (auto& worker : stacks)
        while (worker.size() < block.x) worker.emplace_back(new char[shim::STACK_BYTES]);
    std::vector<std::thread> pool;
    for (unsigned int w = 0; w < workers; ++w)
        pool.emplace_back([&, w] {
            shim::Block state;
            state.fibers.resize(block.x);
            for (unsigned int t = 0; t < block.x; ++t) state.fibers[t].stack = stacks[w][t].get();
            state.body = &body;
            shim::running = &state;
            blockDim = block;
            for (unsigned int i = next++; i < blocks; i = next++) {
                blockIdx = dim3{i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
                shim::run_block(state);
            }
        });
    for (auto& thread : pool) thread.join();
}
