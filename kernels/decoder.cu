// The layers of a Qwen2/Llama decoder step. Activations are f32 `[rows, width]`; weights FP16,
// BF16 or INT8 with one scale per output channel; the KV cache FP16, `[slot][kv_head][capacity][dim]`
// per layer, allocated once. A "row" is one token of one sequence: its slot and its position,
// so prompts (many rows of one slot) and decode steps (one row a slot) run through the same
// kernels. The CPU reference is src/engine/cuda/reference.rs.

#define WARP 32
#define LINEAR_WARPS 8   // output channels a block
#define LINEAR_ROWS 8    // rows a warp multiplies each weight it reads with
#define ATTN_WARPS 4
#define MAX_HEAD_DIM 256

typedef unsigned short half_bits;

#ifdef DISTILL_EMULATE
// The CPU emulation of the tests (tests/emulate/): the compiler's IEEE half type.
__device__ __forceinline__ float half_to_float(half_bits h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

__device__ __forceinline__ half_bits float_to_half(float f) {
    _Float16 h = (_Float16)f;
    half_bits bits;
    memcpy(&bits, &h, 2);
    return bits;
}
#else
__device__ __forceinline__ float half_to_float(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_bits float_to_half(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// out[r] = table[tokens[r]] (FP16 table, f32 rows).
extern "C" __global__ void embed(const half_bits* table, const unsigned int* tokens, unsigned int hidden,
                                 float* out) {
    const unsigned int r = blockIdx.x;
    const half_bits* src = table + (size_t)tokens[r] * hidden;
    for (unsigned int i = threadIdx.x; i < hidden; i += blockDim.x) out[(size_t)r * hidden + i] = half_to_float(src[i]);
}

// out[r] = x[r] / rms(x[r]) * weight, one block a row.
extern "C" __global__ void rms_norm(const float* x, const float* weight, float eps, unsigned int hidden,
                                    float* out) {
    __shared__ float partial[32];
    const float* row = x + (size_t)blockIdx.x * hidden;
    float sum = 0.0f;
    for (unsigned int i = threadIdx.x; i < hidden; i += blockDim.x) sum += row[i] * row[i];
    sum = warp_sum(sum);
    if ((threadIdx.x & 31u) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / (float)hidden + eps);
    for (unsigned int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)blockIdx.x * hidden + i] = row[i] * inv * weight[i];
}

// A bfloat16 weight: the high half of an FP32 value.
struct bf16_bits {
    unsigned short bits;
};

__device__ __forceinline__ float weight_value(half_bits w) { return half_to_float(w); }
__device__ __forceinline__ float weight_value(bf16_bits w) { return __int_as_float((int)((unsigned int)w.bits << 16)); }
__device__ __forceinline__ float weight_value(signed char w) { return (float)w; }

// y[r][o] = scale[o] * sum_i x[r][i] * w[o][i] (+ bias[o]; no scale: 1); one warp an output
// channel for up to LINEAR_ROWS rows, so each weight read serves that many rows.
// Grid: (ceil(out / LINEAR_WARPS), ceil(rows / LINEAR_ROWS)); block LINEAR_WARPS * 32.
template <typename W>
__device__ void linear_rows(const float* x, const W* w, const float* scale, const float* bias, unsigned int rows,
                            unsigned int in, unsigned int out, float* y) {
    const unsigned int o = blockIdx.x * LINEAR_WARPS + (threadIdx.x >> 5);
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int r0 = blockIdx.y * LINEAR_ROWS;
    if (o >= out) return;
    const unsigned int nrows = min(LINEAR_ROWS, rows - r0);
    float acc[LINEAR_ROWS];
    for (int k = 0; k < LINEAR_ROWS; ++k) acc[k] = 0.0f;
    const W* wo = w + (size_t)o * in;
    for (unsigned int i = lane; i < in; i += WARP) {
        const float wi = weight_value(wo[i]);
        for (unsigned int k = 0; k < nrows; ++k) acc[k] += x[(size_t)(r0 + k) * in + i] * wi;
    }
    for (unsigned int k = 0; k < nrows; ++k) {
        const float s = warp_sum(acc[k]);
        if (lane == 0) y[(size_t)(r0 + k) * out + o] = (scale ? s * scale[o] : s) + (bias ? bias[o] : 0.0f);
    }
}

// FP16 weights.
extern "C" __global__ void linear_f16(const float* x, const half_bits* w, const float* bias, unsigned int rows,
                                      unsigned int in, unsigned int out, float* y) {
    linear_rows(x, w, nullptr, bias, rows, in, out, y);
}

// BF16 weights.
extern "C" __global__ void linear_bf16(const float* x, const bf16_bits* w, const float* bias, unsigned int rows,
                                       unsigned int in, unsigned int out, float* y) {
    linear_rows(x, w, nullptr, bias, rows, in, out, y);
}

// INT8 weights with one scale per output channel.
extern "C" __global__ void linear_i8(const float* x, const signed char* w, const float* scale, const float* bias,
                                     unsigned int rows, unsigned int in, unsigned int out, float* y) {
    linear_rows(x, w, scale, bias, rows, in, out, y);
}

// Rotary embedding in place, `transformers`' rotate-half form: for i < dim/2,
// (a, b) = (x[i], x[i + dim/2]) -> (a cos - b sin, b cos + a sin), angle = position * inv_freq[i].
// Grid: rows; block: heads * dim/2 threads, strided.
extern "C" __global__ void rope(float* x, const unsigned int* positions, const float* inv_freq,
                                unsigned int heads, unsigned int dim) {
    const unsigned int r = blockIdx.x;
    const unsigned int half_dim = dim / 2;
    const float position = (float)positions[r];
    for (unsigned int j = threadIdx.x; j < heads * half_dim; j += blockDim.x) {
        const unsigned int h = j / half_dim, i = j % half_dim;
        float* v = x + ((size_t)r * heads + h) * dim;
        const float angle = position * inv_freq[i];
        const float c = cosf(angle), s = sinf(angle);
        const float a = v[i], b = v[i + half_dim];
        v[i] = a * c - b * s;
        v[i + half_dim] = b * c + a * s;
    }
}

// Writes each row's K and V (f32 `[rows, kv_heads * dim]`) into its slot at its position.
extern "C" __global__ void kv_append(const float* k, const float* v, const unsigned int* slots,
                                     const unsigned int* positions, unsigned int kv_heads, unsigned int dim,
                                     unsigned int capacity, half_bits* k_cache, half_bits* v_cache) {
    const unsigned int r = blockIdx.x;
    const unsigned int width = kv_heads * dim;
    for (unsigned int j = threadIdx.x; j < width; j += blockDim.x) {
        const unsigned int h = j / dim, d = j % dim;
        const size_t at = (((size_t)slots[r] * kv_heads + h) * capacity + positions[r]) * dim + d;
        k_cache[at] = float_to_half(k[(size_t)r * width + j]);
        v_cache[at] = float_to_half(v[(size_t)r * width + j]);
    }
}

// Causal attention of each row over its slot's positions 0..=position (grouped-query: query head
// h reads kv head h / (heads / kv_heads)). One block a (row, head); each warp keeps an online
// softmax over a strided share of the positions, merged at the end. dim <= MAX_HEAD_DIM.
extern "C" __global__ void attention(const float* q, const half_bits* k_cache, const half_bits* v_cache,
                                     const unsigned int* slots, const unsigned int* positions,
                                     unsigned int heads, unsigned int kv_heads, unsigned int dim,
                                     unsigned int capacity, float scale, float* out) {
    __shared__ float warp_max[ATTN_WARPS];
    __shared__ float warp_sum_exp[ATTN_WARPS];
    __shared__ float warp_acc[ATTN_WARPS][MAX_HEAD_DIM];
    const unsigned int r = blockIdx.x, h = blockIdx.y;
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const unsigned int kv = h / (heads / kv_heads);
    const float* qv = q + ((size_t)r * heads + h) * dim;
    const size_t base = ((size_t)slots[r] * kv_heads + kv) * capacity * dim;
    const unsigned int last = positions[r];
    const unsigned int per_lane = (dim + WARP - 1) / WARP;
    float m = -3.0e38f, l = 0.0f;
    float acc[MAX_HEAD_DIM / WARP];
    for (unsigned int e = 0; e < per_lane; ++e) acc[e] = 0.0f;
    for (unsigned int t = warp; t <= last; t += ATTN_WARPS) {
        const half_bits* kt = k_cache + base + (size_t)t * dim;
        float dot = 0.0f;
        for (unsigned int d = lane; d < dim; d += WARP) dot += qv[d] * half_to_float(kt[d]);
        const float score = warp_sum(dot) * scale;
        const float m_new = fmaxf(m, score);
        const float correction = expf(m - m_new), p = expf(score - m_new);
        l = l * correction + p;
        const half_bits* vt = v_cache + base + (size_t)t * dim;
        for (unsigned int e = 0; e < per_lane; ++e) {
            const unsigned int d = lane + e * WARP;
            acc[e] = acc[e] * correction + (d < dim ? p * half_to_float(vt[d]) : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) { warp_max[warp] = m; warp_sum_exp[warp] = l; }
    for (unsigned int e = 0; e < per_lane; ++e) {
        const unsigned int d = lane + e * WARP;
        if (d < dim) warp_acc[warp][d] = acc[e];
    }
    __syncthreads();
    float m_all = -3.0e38f;
    for (int w = 0; w < ATTN_WARPS; ++w) m_all = fmaxf(m_all, warp_max[w]);
    float l_all = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) l_all += warp_sum_exp[w] * expf(warp_max[w] - m_all);
    for (unsigned int d = threadIdx.x; d < dim; d += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) sum += warp_acc[w][d] * expf(warp_max[w] - m_all);
        out[((size_t)r * heads + h) * dim + d] = sum / l_all;
    }
}

// out = silu(gate) * up, elementwise.
extern "C" __global__ void silu_mul(const float* gate, const float* up, unsigned int count, float* out) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x += y, elementwise.
extern "C" __global__ void add_in_place(float* x, const float* y, unsigned int count) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) x[i] += y[i];
}

// out[j] = x[rows[j]] (whole rows of `width`).
extern "C" __global__ void gather_rows(const float* x, const unsigned int* rows, unsigned int width, float* out) {
    const unsigned int j = blockIdx.x;
    for (unsigned int i = threadIdx.x; i < width; i += blockDim.x) out[(size_t)j * width + i] = x[(size_t)rows[j] * width + i];
}
