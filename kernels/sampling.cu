// Masked sampling of the next token, one thread block per row of logits.
//
// Only token ids and log-probabilities leave the device. Every step is deterministic: each
// thread owns one contiguous chunk of the vocabulary and floating-point sums run chunk by chunk
// in index order (no float atomics), so a seed gives the same token on every run. The CPU
// reference (src/kernels/reference.rs) runs the same algorithm in the same order.
//
// Per row: tokens are allowed where the row's bitset (if any) has their bit set and the logit
// is finite. Log-probabilities are those of the masked distribution before temperature, top-k
// and top-p (as OpenAI reports them). Greedy rows take the first largest logit. Sampled rows
// scale by 1/temperature, keep the top-k (all ties at the k-th value), then the nucleus
// (the largest value v whose tokens >= v carry at least top_p of the mass, found by a radix
// select over fixed-point masses: no sort), and draw with Philox4x32-10 keyed by the row's
// seed at counter (step, 0, 0, 0).

#define THREADS 256
#define RADIX_BINS 256
#define TOP_N_MAX 20
#define NO_TOKEN 0xffffffffu
// NVRTC has no <math.h> macros.
#define NEG_INF __int_as_float(0xff800000)

// Order-preserving unsigned key of a float: larger floats give larger keys.
__device__ __forceinline__ unsigned int float_key(float x) {
    unsigned int bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ bool is_allowed(const unsigned int* mask, unsigned int i, float logit) {
    if (!isfinite(logit)) return false;
    return mask == nullptr || ((mask[i >> 5] >> (i & 31u)) & 1u);
}

__device__ __forceinline__ void mul_hi_lo(unsigned int a, unsigned int b, unsigned int* hi, unsigned int* lo) {
    unsigned long long product = (unsigned long long)a * (unsigned long long)b;
    *hi = (unsigned int)(product >> 32);
    *lo = (unsigned int)product;
}

// Philox4x32-10 (Salmon et al., SC'11): the first of the four output words.
__device__ unsigned int philox_first(unsigned long long seed, unsigned long long counter) {
    unsigned int c0 = (unsigned int)counter, c1 = (unsigned int)(counter >> 32), c2 = 0u, c3 = 0u;
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        unsigned int hi0, lo0, hi1, lo1;
        mul_hi_lo(0xD2511F53u, c0, &hi0, &lo0);
        mul_hi_lo(0xCD9E8D57u, c2, &hi1, &lo1);
        unsigned int n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c0;
}

struct RowView {
    const float* logits;
    const unsigned int* mask;
    unsigned int begin, end;  // this thread's chunk
    float inv_temperature;    // 1 for log-probabilities and greedy rows
};

__device__ __forceinline__ unsigned int key_at(const RowView& row, unsigned int i) {
    return float_key(row.logits[i] * row.inv_temperature);
}

// Weight of a token in a count select: one.
struct CountOne {
    __device__ unsigned int operator()(float, float) const { return 1u; }
};

// Weight of a token in a mass select: exp(x - max) in units of 2^-32 (fixed point, so sums are
// exact and deterministic).
struct FixedMass {
    __device__ unsigned long long operator()(float x, float max_x) const {
        return __float2ull_rn(expf(x - max_x) * 4294967296.0f);
    }
};

// Radix select over the allowed keys >= `floor`, 8 bits a pass from the top: the largest key v
// whose tokens with key >= v weigh at least `target` (weights from `weigh`: counts or masses).
// Writes what the tokens with larger keys weigh to `*above`. Integer atomics only.
template <typename Weight, typename Weigh>
__device__ unsigned int radix_select(const RowView& row, unsigned int floor, float max_x, Weight target,
                                     Weigh weigh, Weight* above, Weight* hist, Weight* shared_remaining,
                                     unsigned int* shared_digit) {
    unsigned int prefix = 0u, prefix_mask = 0u;
    Weight remaining = target;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (unsigned int i = row.begin; i < row.end; ++i) {
            float logit = row.logits[i];
            if (!is_allowed(row.mask, i, logit)) continue;
            unsigned int key = key_at(row, i);
            if (key < floor || (key & prefix_mask) != prefix) continue;
            atomicAdd(&hist[(key >> shift) & 0xffu], weigh(logit * row.inv_temperature, max_x));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned int digit = 0u;
            for (int b = RADIX_BINS - 1; b >= 0; --b) {
                if (hist[b] >= remaining) { digit = (unsigned int)b; break; }
                remaining -= hist[b];
            }
            *shared_digit = digit;
            *shared_remaining = remaining;
        }
        __syncthreads();
        prefix |= *shared_digit << shift;
        prefix_mask |= 0xffu << shift;
        remaining = *shared_remaining;
        __syncthreads();
    }
    *above = target - remaining;
    return prefix;
}

// The key of the `rank`-th largest (1-based) allowed key; `*above` allowed keys are larger.
__device__ unsigned int select_by_count(const RowView& row, unsigned int rank, unsigned int* above,
                                        unsigned int* hist, unsigned int* shared_word) {
    return radix_select<unsigned int>(row, 0u, 0.0f, rank, CountOne(), above, hist, &shared_word[1],
                                      &shared_word[0]);
}

// Masked sampling of `rows` rows of `vocab` logits.
//   masks[row]: device address of the row's bitset (vocab bits, 32 a word), 0 = no mask.
//   temperature < 1e-5 is greedy; top_k 0 keeps all; top_p >= 1 keeps all.
//   Outputs per row: the token (NO_TOKEN when nothing is allowed), its log-probability, and the
//   `top_n` (<= TOP_N_MAX) most likely allowed tokens, most likely first (ties: lower id).
extern "C" __global__ void __launch_bounds__(THREADS) sample_rows(
    const float* logits, unsigned int vocab, const unsigned long long* masks,
    const float* temperature, const unsigned int* top_k, const float* top_p,
    const unsigned long long* seed, const unsigned long long* step, unsigned int top_n,
    unsigned int* out_token, float* out_logprob, unsigned int* out_top_ids,
    float* out_top_logprobs) {
    __shared__ unsigned int hist32[RADIX_BINS];
    __shared__ unsigned long long hist64[RADIX_BINS];
    __shared__ float chunk_sum[THREADS];
    __shared__ float chunk_max[THREADS];
    __shared__ unsigned int chunk_arg[THREADS];
    __shared__ unsigned int chunk_count[THREADS];
    __shared__ unsigned int shared_word[4];
    __shared__ unsigned long long shared_long[1];
    __shared__ float shared_float[2];
    __shared__ unsigned int top_ids[TOP_N_MAX];
    __shared__ float top_values[TOP_N_MAX];

    const unsigned int r = blockIdx.x;
    const unsigned int t = threadIdx.x;
    const unsigned int chunk = (vocab + THREADS - 1) / THREADS;
    RowView row;
    row.logits = logits + (size_t)r * vocab;
    row.mask = (const unsigned int*)masks[r];
    row.begin = min(t * chunk, vocab);
    row.end = min(row.begin + chunk, vocab);
    row.inv_temperature = 1.0f;

    // 1. Largest allowed logit (first on ties) and how many are allowed.
    float best = NEG_INF;
    unsigned int best_id = NO_TOKEN, allowed = 0u;
    for (unsigned int i = row.begin; i < row.end; ++i) {
        float logit = row.logits[i];
        if (!is_allowed(row.mask, i, logit)) continue;
        ++allowed;
        if (best_id == NO_TOKEN || logit > best) { best = logit; best_id = i; }
    }
    chunk_max[t] = best;
    chunk_arg[t] = best_id;
    chunk_count[t] = allowed;
    __syncthreads();
    if (t == 0) {
        float row_best = NEG_INF;
        unsigned int row_arg = NO_TOKEN, row_allowed = 0u;
        for (int c = 0; c < THREADS; ++c) {
            row_allowed += chunk_count[c];
            if (chunk_arg[c] != NO_TOKEN && (row_arg == NO_TOKEN || chunk_max[c] > row_best)) {
                row_best = chunk_max[c];
                row_arg = chunk_arg[c];
            }
        }
        shared_word[0] = row_arg;
        shared_word[1] = row_allowed;
        shared_float[0] = row_best;
    }
    __syncthreads();
    const unsigned int argmax = shared_word[0];
    const unsigned int allowed_total = shared_word[1];
    const float max_logit = shared_float[0];
    __syncthreads();
    if (allowed_total == 0u) {
        if (t == 0) {
            out_token[r] = NO_TOKEN;
            out_logprob[r] = NEG_INF;
            for (unsigned int n = 0; n < top_n; ++n) {
                out_top_ids[r * TOP_N_MAX + n] = NO_TOKEN;
                out_top_logprobs[r * TOP_N_MAX + n] = NEG_INF;
            }
        }
        return;
    }

    // 2. log-sum-exp of the masked distribution, chunk sums in index order.
    float sum = 0.0f;
    for (unsigned int i = row.begin; i < row.end; ++i) {
        float logit = row.logits[i];
        if (is_allowed(row.mask, i, logit)) sum += expf(logit - max_logit);
    }
    chunk_sum[t] = sum;
    __syncthreads();
    if (t == 0) {
        float total = 0.0f;
        for (int c = 0; c < THREADS; ++c) total += chunk_sum[c];
        shared_float[1] = max_logit + logf(total);
    }
    __syncthreads();
    const float log_total = shared_float[1];
    __syncthreads();

    // 3. The token.
    unsigned int token = argmax;
    const float temp = temperature[r];
    if (temp >= 1e-5f) {
        row.inv_temperature = 1.0f / temp;
        const float max_x = max_logit * row.inv_temperature;
        unsigned int floor = 0u, above = 0u;
        const unsigned int k = top_k[r];
        if (k > 0u && k < allowed_total) floor = select_by_count(row, k, &above, hist32, shared_word);
        if (top_p[r] < 1.0f) {
            unsigned long long mass = 0ull;
            for (unsigned int i = row.begin; i < row.end; ++i) {
                float logit = row.logits[i];
                if (!is_allowed(row.mask, i, logit) || key_at(row, i) < floor) continue;
                mass += FixedMass()(logit * row.inv_temperature, max_x);
            }
            if (t == 0) shared_long[0] = 0ull;
            __syncthreads();
            atomicAdd(&shared_long[0], mass);
            __syncthreads();
            unsigned long long target = (unsigned long long)((double)top_p[r] * (double)shared_long[0]);
            if (target == 0ull) target = 1ull;
            __syncthreads();
            unsigned long long heavier = 0ull;
            floor = radix_select<unsigned long long>(row, floor, max_x, target, FixedMass(), &heavier, hist64,
                                                     &shared_long[0], &shared_word[0]);
        }
        // Draw: chunk masses in index order, then the owning thread walks its chunk.
        float part = 0.0f;
        for (unsigned int i = row.begin; i < row.end; ++i) {
            float logit = row.logits[i];
            if (!is_allowed(row.mask, i, logit) || key_at(row, i) < floor) continue;
            part += expf(logit * row.inv_temperature - max_x);
        }
        chunk_sum[t] = part;
        __syncthreads();
        if (t == 0) {
            float total = 0.0f;
            for (int c = 0; c < THREADS; ++c) total += chunk_sum[c];
            float u = (float)(philox_first(seed[r], step[r]) >> 8) * (1.0f / 16777216.0f);
            float draw = u * total;
            int owner = -1, last = -1;
            for (int c = 0; c < THREADS; ++c) {
                if (chunk_sum[c] <= 0.0f) continue;
                last = c;
                if (draw <= chunk_sum[c]) { owner = c; break; }
                draw -= chunk_sum[c];
            }
            if (owner < 0) { owner = last; draw = chunk_sum[last]; }
            shared_word[2] = (unsigned int)owner;
            shared_float[0] = draw;
        }
        __syncthreads();
        if (t == shared_word[2]) {
            float draw = shared_float[0];
            unsigned int chosen = NO_TOKEN;
            for (unsigned int i = row.begin; i < row.end; ++i) {
                float logit = row.logits[i];
                if (!is_allowed(row.mask, i, logit) || key_at(row, i) < floor) continue;
                chosen = i;
                draw -= expf(logit * row.inv_temperature - max_x);
                if (draw <= 0.0f) break;
            }
            shared_word[3] = chosen;
        }
        __syncthreads();
        token = shared_word[3];
        row.inv_temperature = 1.0f;
    }
    if (t == 0) {
        out_token[r] = token;
        out_logprob[r] = row.logits[token] - log_total;
    }

    // 4. The top_n most likely: keys above the n-th largest, then ties in id order.
    const unsigned int n = min(min(top_n, (unsigned int)TOP_N_MAX), allowed_total);
    if (n == 0u) return;
    unsigned int above = 0u;
    const unsigned int cut = select_by_count(row, n, &above, hist32, shared_word);
    for (int pass = 0; pass < 2; ++pass) {
        unsigned int mine = 0u;
        for (unsigned int i = row.begin; i < row.end; ++i) {
            float logit = row.logits[i];
            if (!is_allowed(row.mask, i, logit)) continue;
            unsigned int key = key_at(row, i);
            if (pass == 0 ? key > cut : key == cut) ++mine;
        }
        chunk_count[t] = mine;
        __syncthreads();
        if (t == 0) {
            unsigned int offset = pass == 0 ? 0u : above;
            for (int c = 0; c < THREADS; ++c) {
                unsigned int count = chunk_count[c];
                chunk_count[c] = offset;
                offset += count;
            }
        }
        __syncthreads();
        unsigned int at = chunk_count[t];
        for (unsigned int i = row.begin; i < row.end && at < n; ++i) {
            float logit = row.logits[i];
            if (!is_allowed(row.mask, i, logit)) continue;
            unsigned int key = key_at(row, i);
            if (pass == 0 ? key > cut : key == cut) {
                top_ids[at] = i;
                top_values[at] = logit;
                ++at;
            }
        }
        __syncthreads();
    }
    if (t == 0) {
        // Stable insertion sort, largest first: equal values keep id order.
        for (unsigned int a = 1; a < n; ++a) {
            unsigned int id = top_ids[a];
            float value = top_values[a];
            unsigned int b = a;
            while (b > 0 && top_values[b - 1] < value) {
                top_ids[b] = top_ids[b - 1];
                top_values[b] = top_values[b - 1];
                --b;
            }
            top_ids[b] = id;
            top_values[b] = value;
        }
        for (unsigned int m = 0; m < n; ++m) {
            out_top_ids[r * TOP_N_MAX + m] = top_ids[m];
            out_top_logprobs[r * TOP_N_MAX + m] = top_values[m] - log_total;
        }
        for (unsigned int m = n; m < top_n && m < TOP_N_MAX; ++m) {
            out_top_ids[r * TOP_N_MAX + m] = NO_TOKEN;
            out_top_logprobs[r * TOP_N_MAX + m] = NEG_INF;
        }
    }
}
