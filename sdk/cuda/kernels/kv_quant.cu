// Writing K/V into the device KV pools.
//
// Pool layouts (per layer; D = head_dim, H = kv heads, T = tokens per block, b = bits, g = group):
//   text (FP16):   half   [block][T][H][D]
//   frame codes:   u8     [block][T][H][D*b/8], packed as jetvlm_quant packs a row: in chunks of
//                  32 codes; with cb = 4*b bytes per chunk, code j of a chunk sits in byte j % cb
//                  at bit (j / cb) * b (4-bit: codes j and j+16 share byte j)
//   frame params:  u32 = FP16 pair, scale in the low half, zero in the high half; x ~= zero + scale * code
//     per token (V always, K in per-token mode): [block][T][H][D/g]
//     per channel (K in per-channel mode):       [block][H][D], over the block's tokens
// Parameters are jetvlm_quant's `row_params`: zero = min rounded down to FP16, scale =
// (max - zero) / (2^b - 1) rounded to FP16 and raised until max is within half a step;
// code = clamp(round_half_away((x - zero) / scale), 0, 2^b - 1), 0 where the scale is zero.
// Helpers (h2f, f2h, bf2f, f16_t, bf16_t, NEG_INF, load_elem): common.cuh, prepended by
// sources.rs.

// src[len][H][D] (f32) -> pool[block][tok_offset + t][H][D] (f16)
extern "C" __global__ void kv_store_f16(unsigned short* __restrict__ pool, const float* __restrict__ src,
                                        unsigned int block, unsigned int tok_offset, unsigned int len,
                                        unsigned int H, unsigned int D, unsigned int T) {
    size_t row = (size_t)H * D;
    size_t total = (size_t)len * row;
    unsigned short* dst = pool + ((size_t)block * T + tok_offset) * row;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        dst[i] = f2h(src[i]);
    }
}

__device__ __forceinline__ unsigned short f2h_down(float f) {
    unsigned short h;
    asm("cvt.rm.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ unsigned short f16_next_up(unsigned short h) {
    if (h2f(h) == 0.0f) return 1;
    return (h & 0x8000u) == 0 ? (unsigned short)(h + 1) : (unsigned short)(h - 1);
}

// Explicitly rounded adds/multiplies: the loop condition must not be fused into an FMA, so it
// decides exactly as the CPU reference does.
__device__ __forceinline__ unsigned int make_params(float lo, float hi, float levels) {
    unsigned short zero = f2h_down(lo);
    float z = h2f(zero);
    unsigned short scale = f2h(__fsub_rn(hi, z) / levels);
    while (__fadd_rn(__fadd_rn(z, __fmul_rn(h2f(scale), levels)), __fmul_rn(0.5f, h2f(scale))) < hi) {
        scale = f16_next_up(scale);
    }
    return (unsigned int)scale | ((unsigned int)zero << 16);
}

// One thread per (token, head, group): per-token group parameters.
extern "C" __global__ void kv_quant_params_token(unsigned int* __restrict__ params, const float* __restrict__ src,
                                                 unsigned int block, unsigned int tok_offset, unsigned int len,
                                                 unsigned int H, unsigned int D, unsigned int T,
                                                 unsigned int group, unsigned int bits) {
    unsigned int groups = D / group;
    size_t total = (size_t)len * H * groups;
    float levels = (float)((1u << bits) - 1u);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t th = i / groups;  // t * H + h
        unsigned int gi = (unsigned int)(i - th * groups);
        const float* x = src + th * D + (size_t)gi * group;
        float lo = x[0], hi = x[0];
        for (unsigned int e = 1; e < group; ++e) {
            lo = fminf(lo, x[e]);
            hi = fmaxf(hi, x[e]);
        }
        params[((size_t)block * T + tok_offset) * H * groups + i] = make_params(lo, hi, levels);
    }
}

// One thread per (head, channel): per-channel parameters over the block's `len` tokens
// (the whole block is quantized at once, so tok_offset is 0 in this mode).
extern "C" __global__ void kv_quant_params_channel(unsigned int* __restrict__ params, const float* __restrict__ src,
                                                   unsigned int block, unsigned int len, unsigned int H,
                                                   unsigned int D, unsigned int bits) {
    size_t total = (size_t)H * D;
    float levels = (float)((1u << bits) - 1u);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        float lo = src[i], hi = src[i];
        for (unsigned int t = 1; t < len; ++t) {
            float v = src[(size_t)t * total + i];
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        params[(size_t)block * total + i] = make_params(lo, hi, levels);
    }
}

// One thread per (token, head, code byte): packs the 8/bits codes of one byte using the
// parameters written by one of the two kernels above.
extern "C" __global__ void kv_quant_codes(unsigned char* __restrict__ codes, const unsigned int* __restrict__ params,
                                          const float* __restrict__ src, unsigned int block,
                                          unsigned int tok_offset, unsigned int len, unsigned int H,
                                          unsigned int D, unsigned int T, unsigned int group, unsigned int bits,
                                          unsigned int per_channel) {
    unsigned int per_byte = 8u / bits;
    unsigned int row_bytes = D / per_byte;
    unsigned int chunk_bytes = 4u * bits;  // bytes of 32 codes
    unsigned int groups = D / group;
    float qmax = (float)((1u << bits) - 1u);
    size_t total = (size_t)len * H * row_bytes;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t th = i / row_bytes;  // t * H + h
        unsigned int j = (unsigned int)(i - th * row_bytes);
        unsigned int h = (unsigned int)(th % H);
        unsigned int chunk = j / chunk_bytes, jj = j % chunk_bytes;
        unsigned int byte = 0;
        for (unsigned int s = 0; s < per_byte; ++s) {
            unsigned int d = chunk * 32u + jj + s * chunk_bytes;
            unsigned int p = per_channel ? params[((size_t)block * H + h) * D + d]
                                         : params[(((size_t)block * T + tok_offset) * H) * groups + th * groups + d / group];
            float scale = h2f((unsigned short)(p & 0xffffu));
            float zero = h2f((unsigned short)(p >> 16));
            unsigned int q = 0;
            if (scale != 0.0f) {
                float c = roundf((src[th * D + d] - zero) / scale);
                c = fminf(fmaxf(c, 0.0f), qmax);
                q = (unsigned int)c;
            }
            byte |= q << (s * bits);
        }
        codes[((size_t)block * T + tok_offset) * H * row_bytes + i] = (unsigned char)byte;
    }
}
