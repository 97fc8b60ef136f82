// Matrix-vector products for decode (and small token batches): y[t][r] = sum_c W[r][c] * x[t][c].
// W is row-major [rows][cols] in f32, f16 or bf16 (raw u16 bits), x and y are f32.
// One warp per output row, 8 rows per 256-thread block, up to 8 tokens per block (blockIdx.y
// selects the token tile) so a weight row read from memory serves every token of the tile.
// Rows with cols % 8 == 0 (16-bit weights) or cols % 4 == 0 (f32) use 16-byte loads.
// Helpers (h2f, f2h, bf2f, f16_t, bf16_t, NEG_INF, load_elem): common.cuh, prepended by
// sources.rs.

#define GEMV_ROWS_PER_BLOCK 8
#define GEMV_TOKENS 8

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Eight consecutive weights starting at p (16-byte aligned) as floats.
__device__ __forceinline__ void load8(const f16_t* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = h2f((unsigned short)(w[i] & 0xffffu));
        out[2 * i + 1] = h2f((unsigned short)(w[i] >> 16));
    }
}
__device__ __forceinline__ void load8(const bf16_t* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <typename W>
__device__ void gemv_vec8(float* __restrict__ y, const W* __restrict__ w, const float* __restrict__ x,
                          unsigned int rows, unsigned int cols, unsigned int n_tok) {
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned int r = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp;
    if (r >= rows) return;
    unsigned int t0 = blockIdx.y * GEMV_TOKENS;
    unsigned int nt = min((unsigned int)GEMV_TOKENS, n_tok - t0);
    const W* wr = w + (size_t)r * cols;
    float acc[GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; ++t) acc[t] = 0.0f;
    for (unsigned int c = lane * 8; c < cols; c += 32 * 8) {
        float wv[8];
        load8(wr + c, wv);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; ++t) {
            if (t < nt) {
                const float* xr = x + (size_t)(t0 + t) * cols + c;
                float4 a = *reinterpret_cast<const float4*>(xr);
                float4 b = *reinterpret_cast<const float4*>(xr + 4);
                acc[t] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * b.x + wv[5] * b.y +
                          wv[6] * b.z + wv[7] * b.w;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; ++t) {
        float v = warp_sum(acc[t]);
        if (lane == 0 && t < nt) y[(size_t)(t0 + t) * rows + r] = v;
    }
}

__device__ void gemv_vec4_f32(float* __restrict__ y, const float* __restrict__ w, const float* __restrict__ x,
                              unsigned int rows, unsigned int cols, unsigned int n_tok) {
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned int r = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp;
    if (r >= rows) return;
    unsigned int t0 = blockIdx.y * GEMV_TOKENS;
    unsigned int nt = min((unsigned int)GEMV_TOKENS, n_tok - t0);
    const float* wr = w + (size_t)r * cols;
    float acc[GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; ++t) acc[t] = 0.0f;
    for (unsigned int c = lane * 4; c < cols; c += 32 * 4) {
        float4 wv = *reinterpret_cast<const float4*>(wr + c);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; ++t) {
            if (t < nt) {
                float4 a = *reinterpret_cast<const float4*>(x + (size_t)(t0 + t) * cols + c);
                acc[t] += wv.x * a.x + wv.y * a.y + wv.z * a.z + wv.w * a.w;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; ++t) {
        float v = warp_sum(acc[t]);
        if (lane == 0 && t < nt) y[(size_t)(t0 + t) * rows + r] = v;
    }
}

template <typename W>
__device__ void gemv_scalar(float* __restrict__ y, const W* __restrict__ w, const float* __restrict__ x,
                            unsigned int rows, unsigned int cols, unsigned int n_tok) {
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned int r = blockIdx.x * GEMV_ROWS_PER_BLOCK + warp;
    if (r >= rows) return;
    unsigned int t0 = blockIdx.y * GEMV_TOKENS;
    unsigned int nt = min((unsigned int)GEMV_TOKENS, n_tok - t0);
    const W* wr = w + (size_t)r * cols;
    float acc[GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; ++t) acc[t] = 0.0f;
    for (unsigned int c = lane; c < cols; c += 32) {
        float wv = load_elem(wr, c);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; ++t) {
            if (t < nt) acc[t] += wv * x[(size_t)(t0 + t) * cols + c];
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; ++t) {
        float v = warp_sum(acc[t]);
        if (lane == 0 && t < nt) y[(size_t)(t0 + t) * rows + r] = v;
    }
}

extern "C" __global__ void __launch_bounds__(256) gemv_f16(float* y, const f16_t* w, const float* x,
                                                           unsigned int rows, unsigned int cols,
                                                           unsigned int n_tok) {
    if ((cols & 7u) == 0) gemv_vec8(y, w, x, rows, cols, n_tok);
    else gemv_scalar(y, w, x, rows, cols, n_tok);
}
extern "C" __global__ void __launch_bounds__(256) gemv_bf16(float* y, const bf16_t* w, const float* x,
                                                            unsigned int rows, unsigned int cols,
                                                            unsigned int n_tok) {
    if ((cols & 7u) == 0) gemv_vec8(y, w, x, rows, cols, n_tok);
    else gemv_scalar(y, w, x, rows, cols, n_tok);
}
extern "C" __global__ void __launch_bounds__(256) gemv_f32(float* y, const float* w, const float* x,
                                                           unsigned int rows, unsigned int cols,
                                                           unsigned int n_tok) {
    if ((cols & 3u) == 0) gemv_vec4_f32(y, w, x, rows, cols, n_tok);
    else gemv_scalar(y, w, x, rows, cols, n_tok);
}
