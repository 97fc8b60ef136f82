// Element-wise decoder kernels: residual add, SwiGLU, GeGLU, softcapping, scaling, embedding
// gather.
// Activations are f32; embedding tables are f32, f16 or bf16 (bf16 passed as raw u16 bits).
// Helpers (h2f, f2h, bf2f, f16_t, bf16_t, NEG_INF, load_elem): common.cuh, prepended by
// sources.rs.

// x[i] += y[i]
extern "C" __global__ void residual_add_f32(float* __restrict__ x, const float* __restrict__ y,
                                            unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g))
extern "C" __global__ void swiglu_f32(float* __restrict__ out, const float* __restrict__ gate,
                                      const float* __restrict__ up, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// out[i] = gelu_tanh(gate[i]) * up[i]: Gemma's GeGLU with GELU's tanh approximation
// (gelu_pytorch_tanh), gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
extern "C" __global__ void geglu_f32(float* __restrict__ out, const float* __restrict__ gate,
                                     const float* __restrict__ up, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = gate[i];
        float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
        out[i] = 0.5f * g * (1.0f + tanhf(inner)) * up[i];
    }
}

// x[i] = cap * tanh(x[i] / cap): Gemma's final logit softcapping.
extern "C" __global__ void softcap_f32(float* __restrict__ x, unsigned int n, float cap) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] = cap * tanhf(x[i] / cap);
    }
}

// f rounded to the nearest bfloat16 (ties to even), as f32; NaN unchanged.
__device__ __forceinline__ float round_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
}

// x[i] = round(x[i] * scale), the product in f32 rounded to nearest even in `mode`'s precision
// (0: f32, 1: f16, 2: bf16): Gemma's token embeddings scaled by sqrt(hidden) in the embedding
// table's type (transformers' Gemma3TextScaledWordEmbedding).
extern "C" __global__ void scale_round_f32(float* __restrict__ x, unsigned int n, float scale,
                                           unsigned int mode) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float p = x[i] * scale;
        x[i] = mode == 1 ? h2f(f2h(p)) : (mode == 2 ? round_bf16(p) : p);
    }
}

// out[t][c] = table[ids[t]][c]; ids outside the vocabulary give a zero row (the host validates
// ids before launching, so this only guards memory).
template <typename T>
__device__ void embedding_gather(float* __restrict__ out, const T* __restrict__ table,
                                 const unsigned int* __restrict__ ids, unsigned int n_ids,
                                 unsigned int hidden, unsigned int vocab) {
    size_t total = (size_t)n_ids * hidden;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / hidden;
        size_t c = i - t * hidden;
        unsigned int id = ids[t];
        out[i] = id < vocab ? load_elem(table, (size_t)id * hidden + c) : 0.0f;
    }
}

extern "C" __global__ void embedding_gather_f32(float* out, const float* table, const unsigned int* ids,
                                                unsigned int n_ids, unsigned int hidden, unsigned int vocab) {
    embedding_gather(out, table, ids, n_ids, hidden, vocab);
}
extern "C" __global__ void embedding_gather_f16(float* out, const f16_t* table, const unsigned int* ids,
                                                unsigned int n_ids, unsigned int hidden, unsigned int vocab) {
    embedding_gather(out, table, ids, n_ids, hidden, vocab);
}
extern "C" __global__ void embedding_gather_bf16(float* out, const bf16_t* table,
                                                 const unsigned int* ids, unsigned int n_ids,
                                                 unsigned int hidden, unsigned int vocab) {
    embedding_gather(out, table, ids, n_ids, hidden, vocab);
}

// y[t][r] += b[r] for n_tok rows of `rows` (the q/k/v biases of Qwen2).
extern "C" __global__ void bias_add_f32(float* __restrict__ y, const float* __restrict__ b, unsigned int rows,
                                        unsigned int n_tok) {
    size_t total = (size_t)rows * n_tok;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        y[i] += b[i % rows];
    }
}

// Counter-based generator (splitmix64 of seed + index): the same value for (seed, i) on the
// host twin, whatever the launch shape.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// out[i] = sum of three uniforms in [-0.5, 0.5) (a bell-shaped value in [-1.5, 1.5)), times
// `scale`. Synthetic K/V for benchmarks, written on the device.
extern "C" __global__ void fill_bell_f32(float* __restrict__ out, unsigned long long n, unsigned long long seed,
                                         float scale) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long z = mix64(seed * 0x9e3779b97f4a7c15ull + i);
        float a = (float)(unsigned int)(z & 0x1fffffu) * (1.0f / 2097152.0f);
        float b = (float)(unsigned int)((z >> 21) & 0x1fffffu) * (1.0f / 2097152.0f);
        float c = (float)(unsigned int)((z >> 42) & 0x1fffffu) * (1.0f / 2097152.0f);
        out[i] = (a + b + c - 1.5f) * scale;
    }
}

// Streaming read: partial[block] = sum of the block's float4 elements (grid-stride). Measures
// device memory read bandwidth; the sum keeps the loads from being optimised away.
extern "C" __global__ void __launch_bounds__(256) read_sum_f32(const float4* __restrict__ x, unsigned long long n4,
                                                               float* __restrict__ partial) {
    __shared__ float s[8];
    float acc = 0.0f;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    // Four independent loads in flight per thread: enough bytes in flight to reach the
    // memory's peak rate (the probe is the denominator of the benchmarks' bandwidth shares).
    for (; i + 3 * stride < n4; i += 4 * stride) {
        const float4 a = x[i], b = x[i + stride], c = x[i + 2 * stride], d = x[i + 3 * stride];
        acc += ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w)) + ((c.x + c.y) + (c.z + c.w)) +
               ((d.x + d.y) + (d.z + d.w));
    }
    for (; i < n4; i += stride) {
        const float4 v = x[i];
        acc += (v.x + v.y) + (v.z + v.w);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int w = 0; w < 8; ++w) t += s[w];
        partial[blockIdx.x] = t;
    }
}
