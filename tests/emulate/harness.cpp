// Runs one kernel of kernels/ on the CPU (cuda_shim.h) for tests/kernel_emulation.rs.
//   harness KERNEL GRID_X GRID_Y BLOCK_X IN OUT
// IN: u32 argument count, then per argument u8 kind (0 buffer, 1 scalar, 2 pointer table: i64
// buffer indices, -1 for null), u64 byte length, the bytes. OUT: per argument u64 byte length
// and the bytes after the launch.
#include "cuda_shim.h"

#include "../../kernels/decoder.cu"
#include "../../kernels/sampling.cu"

#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <string>

struct Arg {
    uint8_t kind;
    std::vector<uint64_t> storage;  // 8-byte aligned
    uint64_t len;
    void* data() { return storage.data(); }
};

static std::vector<Arg> args;

template <class T>
static T* P(size_t i) {
    Arg& a = args[i];
    if (a.kind == 1) return (T*)(uintptr_t)a.storage[0];
    return (T*)a.data();
}
static unsigned int U(size_t i) { return *(unsigned int*)args[i].data(); }
static float F(size_t i) { return *(float*)args[i].data(); }

int main(int argc, char** argv) {
    if (argc != 7) return 2;
    const std::string kernel = argv[1];
    const dim3 grid{(unsigned)std::stoul(argv[2]), (unsigned)std::stoul(argv[3]), 1};
    const dim3 block{(unsigned)std::stoul(argv[4]), 1, 1};
    std::ifstream in(argv[5], std::ios::binary);
    uint32_t count = 0;
    in.read((char*)&count, 4);
    args.resize(count);
    for (auto& a : args) {
        in.read((char*)&a.kind, 1);
        in.read((char*)&a.len, 8);
        a.storage.assign((a.len + 7) / 8 + 1, 0);
        in.read((char*)a.data(), (std::streamsize)a.len);
    }
    for (auto& a : args)
        if (a.kind == 2)
            for (uint64_t j = 0; j < a.len / 8; ++j) {
                const int64_t index = (int64_t)a.storage[j];
                a.storage[j] = index < 0 ? 0 : (uint64_t)(uintptr_t)args[(size_t)index].data();
            }
    using half = half_bits;
    const std::map<std::string, std::function<void()>> kernels = {
        {"sample_rows", [] { sample_rows(P<float>(0), U(1), P<unsigned long long>(2), P<float>(3), P<unsigned>(4), P<float>(5), P<unsigned long long>(6), P<unsigned long long>(7), U(8), P<unsigned>(9), P<float>(10), P<unsigned>(11), P<float>(12)); }},
        {"embed", [] { embed(P<half>(0), P<unsigned>(1), U(2), P<float>(3)); }},
        {"rms_norm", [] { rms_norm(P<float>(0), P<float>(1), F(2), U(3), P<float>(4)); }},
        {"linear_f16", [] { linear_f16(P<float>(0), P<half>(1), P<float>(2), U(3), U(4), U(5), P<float>(6)); }},
        {"linear_i8", [] { linear_i8(P<float>(0), P<signed char>(1), P<float>(2), P<float>(3), U(4), U(5), U(6), P<float>(7)); }},
        {"rope", [] { rope(P<float>(0), P<unsigned>(1), P<float>(2), U(3), U(4)); }},
        {"kv_append", [] { kv_append(P<float>(0), P<float>(1), P<unsigned>(2), P<unsigned>(3), U(4), U(5), U(6), P<half>(7), P<half>(8)); }},
        {"attention", [] { attention(P<float>(0), P<half>(1), P<half>(2), P<unsigned>(3), P<unsigned>(4), U(5), U(6), U(7), U(8), F(9), P<float>(10)); }},
        {"silu_mul", [] { silu_mul(P<float>(0), P<float>(1), U(2), P<float>(3)); }},
        {"add_in_place", [] { add_in_place(P<float>(0), P<float>(1), U(2)); }},
        {"gather_rows", [] { gather_rows(P<float>(0), P<unsigned>(1), U(2), P<float>(3)); }},
    };
    const auto found = kernels.find(kernel);
    if (found == kernels.end()) {
        std::fprintf(stderr, "no kernel %s\n", kernel.c_str());
        return 2;
    }
    launch(grid, block, found->second);
    std::ofstream out(argv[6], std::ios::binary);
    for (auto& a : args) {
        out.write((const char*)&a.len, 8);
        out.write((const char*)a.data(), (std::streamsize)a.len);
    }
    return 0;
}
