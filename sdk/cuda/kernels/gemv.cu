// Matrix-vector products for decode (and small token batches): y[t][r] = sum_c W[r][c] * x[t][c].
// W is row-major [rows][cols] in f32, f16 or bf16 (raw u16 bits), x and y are f32.
// One warp per output row, 8 rows per 256-thread block, up to 8 tokens per block (blockIdx.y
// selects the token tile) so a weight row read from memory serves every token of the tile.
// Rows with cols % 8 == 0 (16-bit weights) or cols % 4 == 0 (f32) use 16-byte loads.
// FP16 values are carried as their IEEE bits (unsigned short) and converted with PTX cvt, so
// the kernels need no header: NVRTC compiles them as they are.
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
struct f16_t { unsigned short bits; };   // IEEE FP16
struct bf16_t { unsigned short bits; };  // bfloat16
#define NEG_INF __int_as_float(0xff800000)

#define GEMV_ROWS_PER_BLOCK 8
#define GEMV_TOKENS 8

__device__ __forceinline__ float load_elem(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_elem(const f16_t* p, size_t i) { return h2f(p[i].bits); }
__device__ __forceinline__ float load_elem(const bf16_t* p, size_t i) { return bf2f(p[i].bits); }

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
