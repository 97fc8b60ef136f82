// Weight-only quantized matrix products: y[t][r] = sum_c W[r][c] * x[t][c], W a [rows][cols]
// matrix quantized along each row in groups of `group` (32, 64 or 128) values, the layout of
// `jetvlm quantize` (sdk/quant/src/weight.rs):
// - INT8 (q8): codes int8 [rows][cols], FP16 scales [rows][cols/group]; w = scale * code.
// - INT4 (q4): codes [rows][cols/2] bytes in chunks of 32 codes (byte i of a chunk holds code i
//   in its low nibble and code i + 16 in its high nibble), FP16 scales and FP16 zeros
//   [rows][cols/group]; w = zero + scale * code.
// cols is a multiple of the group (checked on the host), so every 32-wide chunk of a row lies
// in one group and the code rows are 16-byte (q4) or 32-byte (q8) aligned.
//
// Decode (gemv_q8, gemv_q4): one warp per output row, 8 rows per 256-thread block, up to 8
// tokens per block (blockIdx.y picks the token tile), so a weight row read from memory serves
// every token of the tile; each group's sum is sum(code * x) * scale (+ zero * sum(x)).
// Prefill (gemm_q8, gemm_q4): a 64-row x 32-token output tile per 256-thread block; each
// 32-wide step of the columns dequantizes a 64x32 weight tile and a 32x32 activation tile into
// shared memory, and every thread accumulates 8 rows of one token.
// Embedding lookup of a quantized table (embedding_gather_q8, embedding_gather_q4): the rows of
// the looked-up ids dequantized, one output value per thread (grid-stride); each value rounded
// as the CPU decoder's lookup and jetvlm_quant's dequantize_row round it, the product then the
// sum (__fmul_rn / __fadd_rn: no fused multiply-add), so the rows are the CPU's exactly.
// Helpers (h2f, f16_t): common.cuh, prepended by sources.rs.

#define QGEMV_ROWS_PER_BLOCK 8
#define QGEMV_TOKENS 8
#define QGEMM_ROWS 64
#define QGEMM_TOKENS 32
#define QGEMM_K 32

__device__ __forceinline__ float qwarp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float sext8(unsigned int word, int i) {
    return (float)(signed char)((word >> (8 * i)) & 0xffu);
}

// INT8: lane handles 8 consecutive codes (one 8-byte load) at c = 8 * lane + 256 * step.
extern "C" __global__ void __launch_bounds__(256) gemv_q8(float* __restrict__ y, const unsigned char* __restrict__ codes,
                                                          const f16_t* __restrict__ scales,
                                                          const float* __restrict__ x, unsigned int rows,
                                                          unsigned int cols, unsigned int group,
                                                          unsigned int n_tok) {
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned int r = blockIdx.x * QGEMV_ROWS_PER_BLOCK + warp;
    if (r >= rows) return;
    unsigned int t0 = blockIdx.y * QGEMV_TOKENS;
    unsigned int nt = min((unsigned int)QGEMV_TOKENS, n_tok - t0);
    unsigned int groups = cols / group;
    const unsigned char* cr = codes + (size_t)r * cols;
    const f16_t* sr = scales + (size_t)r * groups;
    float acc[QGEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < QGEMV_TOKENS; ++t) acc[t] = 0.0f;
    for (unsigned int c = lane * 8; c < cols; c += 32 * 8) {
        uint2 raw = *reinterpret_cast<const uint2*>(cr + c);
        float w[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[i] = sext8(raw.x, i);
            w[4 + i] = sext8(raw.y, i);
        }
        float s = h2f(sr[c / group].bits);
#pragma unroll
        for (int t = 0; t < QGEMV_TOKENS; ++t) {
            if (t < nt) {
                const float* xr = x + (size_t)(t0 + t) * cols + c;
                float4 a = *reinterpret_cast<const float4*>(xr);
                float4 b = *reinterpret_cast<const float4*>(xr + 4);
                float d = w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                          w[6] * b.z + w[7] * b.w;
                acc[t] += s * d;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < QGEMV_TOKENS; ++t) {
        float v = qwarp_sum(acc[t]);
        if (lane == 0 && t < nt) y[(size_t)(t0 + t) * rows + r] = v;
    }
}

// INT4: four lanes share a 32-code chunk (16 bytes); lane quarter q reads bytes 4q..4q+3, i.e.
// codes 4q..4q+3 (low nibbles) and 4q+16..4q+19 (high nibbles). A warp covers 8 chunks (256
// codes) per step.
extern "C" __global__ void __launch_bounds__(256) gemv_q4(float* __restrict__ y, const unsigned char* __restrict__ codes,
                                                          const f16_t* __restrict__ scales,
                                                          const f16_t* __restrict__ zeros,
                                                          const float* __restrict__ x, unsigned int rows,
                                                          unsigned int cols, unsigned int group,
                                                          unsigned int n_tok) {
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned int r = blockIdx.x * QGEMV_ROWS_PER_BLOCK + warp;
    if (r >= rows) return;
    unsigned int t0 = blockIdx.y * QGEMV_TOKENS;
    unsigned int nt = min((unsigned int)QGEMV_TOKENS, n_tok - t0);
    unsigned int groups = cols / group;
    const unsigned char* cr = codes + (size_t)r * (cols / 2);
    const f16_t* sr = scales + (size_t)r * groups;
    const f16_t* zr = zeros + (size_t)r * groups;
    unsigned int q = lane & 3;
    float acc[QGEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < QGEMV_TOKENS; ++t) acc[t] = 0.0f;
    for (unsigned int chunk = lane >> 2; chunk * 32 < cols; chunk += 8) {
        unsigned int c0 = chunk * 32;
        unsigned int word = *reinterpret_cast<const unsigned int*>(cr + chunk * 16 + 4 * q);
        float lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = (float)((word >> (8 * i)) & 0xfu);
            hi[i] = (float)((word >> (8 * i + 4)) & 0xfu);
        }
        unsigned int g = c0 / group;
        float s = h2f(sr[g].bits), z = h2f(zr[g].bits);
#pragma unroll
        for (int t = 0; t < QGEMV_TOKENS; ++t) {
            if (t < nt) {
                const float* xr = x + (size_t)(t0 + t) * cols + c0 + 4 * q;
                float4 a = *reinterpret_cast<const float4*>(xr);
                float4 b = *reinterpret_cast<const float4*>(xr + 16);
                float dot = lo[0] * a.x + lo[1] * a.y + lo[2] * a.z + lo[3] * a.w + hi[0] * b.x + hi[1] * b.y +
                            hi[2] * b.z + hi[3] * b.w;
                float sum = a.x + a.y + a.z + a.w + b.x + b.y + b.z + b.w;
                acc[t] += s * dot + z * sum;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < QGEMV_TOKENS; ++t) {
        float v = qwarp_sum(acc[t]);
        if (lane == 0 && t < nt) y[(size_t)(t0 + t) * rows + r] = v;
    }
}

// Tiled prefill product: block (blockIdx.x, blockIdx.y) computes rows r0..r0+63 for tokens
// t0..t0+31. Thread tid: token tid % 32, rows 8 * (tid / 32) .. + 7 of the tile (a warp shares
// its rows, so the weight tile is read as a broadcast and the activation tile, padded to 33,
// without bank conflicts).
template <bool Q4>
__device__ void gemm_quant(float* __restrict__ y, const unsigned char* __restrict__ codes,
                           const f16_t* __restrict__ scales, const f16_t* __restrict__ zeros,
                           const float* __restrict__ x, unsigned int rows, unsigned int cols,
                           unsigned int group, unsigned int n_tok) {
    __shared__ float ws[QGEMM_ROWS][QGEMM_K + 1];
    __shared__ float xs[QGEMM_TOKENS][QGEMM_K + 1];
    unsigned int tid = threadIdx.x;
    unsigned int r0 = blockIdx.x * QGEMM_ROWS, t0 = blockIdx.y * QGEMM_TOKENS;
    unsigned int tok = tid & 31, rb = (tid >> 5) * 8;
    unsigned int groups = cols / group;
    size_t row_bytes = Q4 ? cols / 2 : cols;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (unsigned int k0 = 0; k0 < cols; k0 += QGEMM_K) {
        // Weight tile: thread -> row tid / 4 of the tile, part tid % 4 (8 codes).
        {
            unsigned int lr = tid >> 2, part = tid & 3;
            unsigned int r = r0 + lr;
            float w[8];
            if (r < rows) {
                const unsigned char* cr = codes + (size_t)r * row_bytes;
                unsigned int g = k0 / group;
                float s = h2f(scales[(size_t)r * groups + g].bits);
                if (Q4) {
                    float z = h2f(zeros[(size_t)r * groups + g].bits);
                    unsigned int word = *reinterpret_cast<const unsigned int*>(cr + k0 / 2 + 4 * part);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        w[i] = z + s * (float)((word >> (8 * i)) & 0xfu);
                        w[4 + i] = z + s * (float)((word >> (8 * i + 4)) & 0xfu);
                    }
                } else {
                    uint2 raw = *reinterpret_cast<const uint2*>(cr + k0 + 8 * part);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        w[i] = s * sext8(raw.x, i);
                        w[4 + i] = s * sext8(raw.y, i);
                    }
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) w[i] = 0.0f;
            }
            if (Q4) {
                // Codes 4*part + i (low nibbles) and 4*part + 16 + i (high nibbles).
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    ws[lr][4 * part + i] = w[i];
                    ws[lr][4 * part + 16 + i] = w[4 + i];
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) ws[lr][8 * part + i] = w[i];
            }
        }
        // Activation tile: 32 tokens x 32 columns, 4 values per thread.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned int idx = tid + 256 * j;
            unsigned int lt = idx >> 5, k = idx & 31;
            unsigned int t = t0 + lt;
            xs[lt][k] = t < n_tok ? x[(size_t)t * cols + k0 + k] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < QGEMM_K; ++k) {
            float xv = xs[tok][k];
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += ws[rb + i][k] * xv;
        }
        __syncthreads();
    }
    unsigned int t = t0 + tok;
    if (t < n_tok) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            unsigned int r = r0 + rb + i;
            if (r < rows) y[(size_t)t * rows + r] = acc[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gemm_q8(float* y, const unsigned char* codes, const f16_t* scales,
                                                          const float* x, unsigned int rows, unsigned int cols,
                                                          unsigned int group, unsigned int n_tok) {
    gemm_quant<false>(y, codes, scales, scales, x, rows, cols, group, n_tok);
}
extern "C" __global__ void __launch_bounds__(256) gemm_q4(float* y, const unsigned char* codes, const f16_t* scales,
                                                          const f16_t* zeros, const float* x, unsigned int rows,
                                                          unsigned int cols, unsigned int group,
                                                          unsigned int n_tok) {
    gemm_quant<true>(y, codes, scales, zeros, x, rows, cols, group, n_tok);
}

// out[t][c] = table[ids[t]][c] dequantized, for a [vocab][hidden] table in the layout above;
// ids outside the vocabulary give a zero row (the host validates ids before launching, so
// this only guards memory).
template <bool Q4>
__device__ void embedding_gather_quant(float* __restrict__ out, const unsigned char* __restrict__ codes,
                                       const f16_t* __restrict__ scales, const f16_t* __restrict__ zeros,
                                       const unsigned int* __restrict__ ids, unsigned int n_ids,
                                       unsigned int hidden, unsigned int vocab, unsigned int group) {
    size_t total = (size_t)n_ids * hidden;
    size_t groups = hidden / group;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / hidden;
        size_t c = i - t * hidden;
        unsigned int id = ids[t];
        if (id >= vocab) {
            out[i] = 0.0f;
            continue;
        }
        size_t g = (size_t)id * groups + c / group;
        float s = h2f(scales[g].bits);
        float w;
        if (Q4) {
            unsigned char byte = codes[(size_t)id * (hidden / 2) + (c / 32) * 16 + (c % 32) % 16];
            float code = (float)((byte >> (4 * ((c % 32) / 16))) & 0xfu);
            w = __fadd_rn(h2f(zeros[g].bits), __fmul_rn(s, code));
        } else {
            w = __fmul_rn(s, (float)(signed char)codes[(size_t)id * hidden + c]);
        }
        out[i] = w;
    }
}

extern "C" __global__ void embedding_gather_q8(float* out, const unsigned char* codes, const f16_t* scales,
                                               const unsigned int* ids, unsigned int n_ids,
                                               unsigned int hidden, unsigned int vocab, unsigned int group) {
    embedding_gather_quant<false>(out, codes, scales, nullptr, ids, n_ids, hidden, vocab, group);
}
extern "C" __global__ void embedding_gather_q4(float* out, const unsigned char* codes, const f16_t* scales,
                                               const f16_t* zeros, const unsigned int* ids,
                                               unsigned int n_ids, unsigned int hidden, unsigned int vocab,
                                               unsigned int group) {
    embedding_gather_quant<true>(out, codes, scales, zeros, ids, n_ids, hidden, vocab, group);
}
