// A CUDA driver (libcuda.so) for tests where no GPU is: one emulated device whose memory is the
// host's and whose kernels are kernels/*.cu compiled for the CPU against cuda_shim.h. The code
// under test (cudarc, our host code: buffers, argument order, grids) runs unchanged and NVRTC
// compiles the PTX it loads; a module only offers the entry points its PTX declares. Work runs
// synchronously, so streams and events have nothing to order. A launch whose pointer argument
// is neither null nor inside a live allocation fails with CUDA_ERROR_INVALID_VALUE. A stream
// captures kernel launches into a graph (each launch's arguments copied, as the driver does)
// that a graph launch runs again, checking its pointers anew; while this thread captures, a
// memory call or a synchronisation fails and spoils the capture, as CUDA's thread-local mode
// has it (a real capture would record async copies and sets; our code records kernels only).
// It defines the entry points cudarc calls for our host code; cudarc names any other it looks up.
#include "cuda_shim.h"

#include "../../kernels/decoder.cu"
#include "../../kernels/sampling.cu"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

enum Result : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    ILLEGAL_STATE = 401,
    NOT_FOUND = 500,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
};

std::mutex lock;
std::map<uintptr_t, size_t> allocations;
size_t allocated = 0;
/// Device allocations this thread has made (tests check that steady steps make none; per
/// thread, so tests running side by side in one process do not count each other's).
thread_local unsigned long long allocations_made = 0;

/// The device's memory: 8 GiB.
constexpr size_t TOTAL_MEMORY = 8ull << 30;

bool is_device_pointer(const void* p) {
    if (p == nullptr) return true;
    const uintptr_t at = (uintptr_t)p;
    std::lock_guard<std::mutex> guard(lock);
    auto it = allocations.upper_bound(at);
    if (it == allocations.begin()) return false;
    --it;
    return at < it->first + it->second;
}

/// A kernel with its arguments copied: whether its pointers are valid now, and the call.
struct BoundKernel {
    std::function<bool()> valid;
    std::function<void()> run;
};

/// A kernel callable with the driver's parameter array: parameter i is read as the kernel's
/// i-th parameter type from `params[i]` and copied, as the driver copies it.
struct Kernel {
    std::function<BoundKernel(void**)> bind;
};

/// A pointer argument must be null or inside a live allocation.
template <class T>
bool valid_argument(T value) {
    if constexpr (std::is_pointer_v<T>)
        return is_device_pointer((const void*)value);
    else
        return true;
}

template <class... A, size_t... I>
Kernel driver_entry(void (*kernel)(A...), std::index_sequence<I...>) {
    return Kernel{[kernel](void** params) {
        auto args = std::make_shared<std::tuple<A...>>(*static_cast<A*>(params[I])...);
        return BoundKernel{
            [args] { return (true && ... && valid_argument<A>(std::get<I>(*args))); },
            [kernel, args] { std::apply(kernel, *args); },
        };
    }};
}

template <class... A>
Kernel driver_entry(void (*kernel)(A...)) {
    return driver_entry(kernel, std::index_sequence_for<A...>{});
}

const std::map<std::string, Kernel>& kernels() {
    static const std::map<std::string, Kernel> table = {
        {"sample_rows", driver_entry(sample_rows)},
        {"embed", driver_entry(embed)},
        {"rms_norm", driver_entry(rms_norm)},
        {"linear_f16", driver_entry(linear_f16)},
        {"linear_bf16", driver_entry(linear_bf16)},
        {"linear_i8", driver_entry(linear_i8)},
        {"rope", driver_entry(rope)},
        {"kv_append", driver_entry(kv_append)},
        {"attention", driver_entry(attention)},
        {"silu_mul", driver_entry(silu_mul)},
        {"add_in_place", driver_entry(add_in_place)},
        {"gather_rows", driver_entry(gather_rows)},
    };
    return table;
}

struct Module {
    std::string ptx;
};

struct Function {
    const Kernel* kernel;
};

/// A launch as a graph holds it.
struct Node {
    BoundKernel kernel;
    dim3 grid, block;
};

struct Graph {
    std::vector<Node> nodes;
};

struct Stream {
    std::unique_ptr<Graph> capture;  // while capturing
    bool spoiled = false;            // a call the capture forbids was made
};

/// The stream this thread is capturing on, if any.
thread_local Stream* capturing = nullptr;

/// Whether this thread is capturing: then the call it guards is refused and spoils the capture.
bool refused_in_capture() {
    if (capturing == nullptr) return false;
    capturing->spoiled = true;
    return true;
}

int run_node(const Node& node) {
    if (!node.kernel.valid()) return INVALID_VALUE;
    static std::mutex launching;
    std::lock_guard<std::mutex> one_at_a_time(launching);
    launch(node.grid, node.block, node.kernel.run);
    return SUCCESS;
}

int context_marker, event_marker;

}  // namespace

#pragma GCC visibility push(default)
extern "C" {

// Not a CUDA entry point: how many device allocations the calling thread has made.
unsigned long long fake_cuda_allocations_made() { return allocations_made; }

int cuInit(unsigned int) { return SUCCESS; }
int cuDeviceGetCount(int* count) {
    *count = 1;
    return SUCCESS;
}
int cuDeviceGet(int* device, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *device = 0;
    return SUCCESS;
}
int cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, (size_t)len, "distill-serve emulated GPU");
    return SUCCESS;
}
int cuDeviceGetAttribute(int* value, int attribute, int) {
    switch (attribute) {
        case 75: *value = 9; break;  // compute capability 9.0
        case 76: *value = 0; break;
        default: *value = 0;         // no memory pools: cudarc allocates synchronously
    }
    return SUCCESS;
}
int cuDevicePrimaryCtxRetain(void** context, int) {
    *context = &context_marker;
    return SUCCESS;
}
int cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
int cuCtxGetCurrent(void** context) {
    *context = &context_marker;
    return SUCCESS;
}

int cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::mutex> guard(lock);
    *total = TOTAL_MEMORY;
    *free = *total - std::min(*total, allocated);
    return SUCCESS;
}
int cuMemAlloc_v2(unsigned long long* pointer, size_t bytes) {
    if (refused_in_capture()) return CAPTURE_UNSUPPORTED;
    std::lock_guard<std::mutex> guard(lock);  // one section: two threads cannot both pass the budget
    if (allocated + bytes > TOTAL_MEMORY) return OUT_OF_MEMORY;
    void* p = std::malloc(bytes ? bytes : 1);
    if (!p) return OUT_OF_MEMORY;
    allocations[(uintptr_t)p] = bytes;
    allocated += bytes;
    ++allocations_made;
    *pointer = (uintptr_t)p;
    return SUCCESS;
}
int cuMemFree_v2(unsigned long long pointer) {
    if (refused_in_capture()) return CAPTURE_UNSUPPORTED;
    std::lock_guard<std::mutex> guard(lock);
    auto it = allocations.find((uintptr_t)pointer);
    if (it == allocations.end()) return INVALID_VALUE;
    allocated -= it->second;
    allocations.erase(it);
    std::free((void*)pointer);
    return SUCCESS;
}
int cuMemsetD8_v2(unsigned long long at, unsigned char value, size_t bytes) {
    if (refused_in_capture()) return CAPTURE_UNSUPPORTED;
    if (!is_device_pointer((void*)at)) return INVALID_VALUE;
    std::memset((void*)at, value, bytes);
    return SUCCESS;
}
int cuMemsetD8Async(unsigned long long at, unsigned char value, size_t bytes, void*) { return cuMemsetD8_v2(at, value, bytes); }
int cuMemcpyHtoD_v2(unsigned long long to, const void* from, size_t bytes) {
    if (refused_in_capture()) return CAPTURE_UNSUPPORTED;
    if (!is_device_pointer((void*)to)) return INVALID_VALUE;
    std::memcpy((void*)to, from, bytes);
    return SUCCESS;
}
int cuMemcpyHtoDAsync_v2(unsigned long long to, const void* from, size_t bytes, void*) { return cuMemcpyHtoD_v2(to, from, bytes); }
int cuMemcpyDtoH_v2(void* to, unsigned long long from, size_t bytes) {
    if (refused_in_capture()) return CAPTURE_UNSUPPORTED;
    if (!is_device_pointer((void*)from)) return INVALID_VALUE;
    std::memcpy(to, (const void*)from, bytes);
    return SUCCESS;
}
int cuMemcpyDtoHAsync_v2(void* to, unsigned long long from, size_t bytes, void*) { return cuMemcpyDtoH_v2(to, from, bytes); }

int cuStreamSynchronize(void*) { return refused_in_capture() ? CAPTURE_UNSUPPORTED : SUCCESS; }
int cuStreamCreate(void** stream, unsigned int) {
    *stream = new Stream;
    return SUCCESS;
}
int cuStreamDestroy_v2(void* stream) {
    if (stream == nullptr) return INVALID_VALUE;
    delete (Stream*)stream;
    return SUCCESS;
}
int cuStreamBeginCapture_v2(void* stream, int) {
    if (stream == nullptr) return CAPTURE_UNSUPPORTED;  // the legacy default stream
    Stream& s = *(Stream*)stream;
    if (s.capture || capturing != nullptr) return ILLEGAL_STATE;
    s.capture = std::make_unique<Graph>();
    s.spoiled = false;
    capturing = &s;
    return SUCCESS;
}
int cuStreamEndCapture(void* stream, void** graph) {
    if (stream == nullptr || !((Stream*)stream)->capture) return ILLEGAL_STATE;
    Stream& s = *(Stream*)stream;
    capturing = nullptr;
    std::unique_ptr<Graph> captured = std::move(s.capture);
    *graph = s.spoiled ? nullptr : captured.release();
    return s.spoiled ? CAPTURE_INVALIDATED : SUCCESS;
}
int cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (graph == nullptr) return INVALID_VALUE;
    *exec = new Graph(*(Graph*)graph);
    return SUCCESS;
}
int cuGraphLaunch(void* exec, void* stream) {
    if (exec == nullptr) return INVALID_VALUE;
    if (stream != nullptr && ((Stream*)stream)->capture) return CAPTURE_UNSUPPORTED;
    for (const Node& node : ((Graph*)exec)->nodes)
        if (const int failed = run_node(node)) return failed;
    return SUCCESS;
}
int cuGraphExecDestroy(void* exec) {
    delete (Graph*)exec;
    return SUCCESS;
}
int cuGraphDestroy(void* graph) {
    delete (Graph*)graph;
    return SUCCESS;
}
int cuEventCreate(void** event, unsigned int) {
    *event = &event_marker;
    return SUCCESS;
}
int cuEventDestroy_v2(void*) { return SUCCESS; }

int cuModuleLoadData(void** module, const void* image) {
    const std::string ptx = (const char*)image;
    if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) return INVALID_IMAGE;
    *module = new Module{ptx};
    return SUCCESS;
}
int cuModuleUnload(void* module) {
    delete (Module*)module;
    return SUCCESS;
}
int cuModuleGetFunction(void** function, void* module, const char* name) {
    const auto found = kernels().find(name);
    const std::string entry = std::string(".entry ") + name + "(";
    if (found == kernels().end() || ((Module*)module)->ptx.find(entry) == std::string::npos) return NOT_FOUND;
    static std::map<std::string, Function> functions;
    std::lock_guard<std::mutex> guard(lock);
    *function = &functions.try_emplace(name, Function{&found->second}).first->second;
    return SUCCESS;
}
int cuLaunchKernel(void* function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by,
                   unsigned int bz, unsigned int, void* stream, void** params, void** extra) {
    const Kernel& kernel = *((Function*)function)->kernel;
    if (extra != nullptr || by != 1 || bz != 1 || bx == 0 || bx > 1024 || gx == 0 || gy == 0 || gz == 0) return INVALID_VALUE;
    Node node{kernel.bind(params), dim3{gx, gy, gz}, dim3{bx, 1, 1}};
    if (stream != nullptr && ((Stream*)stream)->capture) {
        if (!node.kernel.valid()) return INVALID_VALUE;
        ((Stream*)stream)->capture->nodes.push_back(std::move(node));
        return SUCCESS;
    }
    return run_node(node);
}

int cuGetErrorName(int error, const char** name) {
    switch (error) {
        case SUCCESS: *name = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_IMAGE: *name = "CUDA_ERROR_INVALID_IMAGE"; break;
        case NOT_FOUND: *name = "CUDA_ERROR_NOT_FOUND"; break;
        case ILLEGAL_STATE: *name = "CUDA_ERROR_ILLEGAL_STATE"; break;
        case CAPTURE_UNSUPPORTED: *name = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *name = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: *name = "CUDA_ERROR_UNKNOWN";
    }
    return SUCCESS;
}
int cuGetErrorString(int error, const char** text) { return cuGetErrorName(error, text); }

}  // extern "C"
#pragma GCC visibility pop
