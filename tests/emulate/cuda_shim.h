// Just enough of CUDA to run kernels/*.cu on the CPU for tests: a block is one std::thread per
// CUDA thread, __syncthreads a barrier, a warp shuffle an exchange between a warp's threads,
// __shared__ a static (blocks run one after another). Slow and exact; for checking the kernels'
// logic where no GPU is.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define DISTILL_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(x)

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<float> warp_exchange;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int, float v, int lane_mask) {
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_exchange[threadIdx.x] = v;
    warp_barriers[warp]->arrive_and_wait();
    const float other = warp_exchange[warp * 32 + (lane ^ (unsigned int)lane_mask)];
    warp_barriers[warp]->arrive_and_wait();
    return other;
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

/// Runs `body` as the threads of each block of `grid` (blocks one after another).
template <class F>
void launch(dim3 grid, dim3 block, F body) {
    blockDim = block;
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                blockIdx = dim3{x, y, z};
                std::barrier<> barrier(block.x);
                block_barrier = &barrier;
                warp_barriers.clear();
                for (unsigned int w = 0; w < block.x / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
                warp_exchange.assign(block.x, 0.0f);
                std::vector<std::thread> threads;
                for (unsigned int t = 0; t < block.x; ++t)
                    threads.emplace_back([t, &body] {
                        threadIdx = dim3{t, 0, 0};
                        body();
                    });
                for (auto& thread : threads) thread.join();
            }
}
