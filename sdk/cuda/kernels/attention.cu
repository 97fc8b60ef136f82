// Fused mixed-precision attention over the KV pools (layouts in kv_quant.cu), split over the
// context as flash-decoding does, then a combine kernel.
//
// The context is a list of entries, one per cached block, each int4 {kind, block, len, order}:
// kind 0 = FP16 text block, 1 = quantized frame block; `len` valid tokens starting at the
// block's first slot; `order` is the append-order index of the block's first token. A query with
// order index qo attends to every key with order <= qo (decode passes INT_MAX: everything) and
// order >= its q_first (a sliding window's first key; 0 without one). Blocks wholly before the
// window are skipped; in a block that straddles its start the earlier tokens are not read.
//
// Grid: x = split, y = kv_head * head_chunks + chunk, z = query token. 128 threads = 4 warps.
// Each warp takes tokens of the split's entries in turn and keeps an online softmax for up to
// G_T query heads sharing the kv head (grouped-query attention); each lane holds
// E = D/32 <= E_T consecutive elements (D % 32 == 0, D <= 256). One kernel per (E_T, G_T) in
// {2, 4, 8} x {1, 4, 8}, named mixed_attention_partial_e<E_T>_g<G_T>: registers and shared
// memory sized to the shape keep occupancy high (the kernel is bound by memory parallelism). Quantized keys and values are dequantized
// in registers (x = zero + scale * code); nothing is written back in FP16.
// Partial results: part_acc[q][hq][split][D] (unnormalised), part_ml[q][hq][split] = {max, sum}.
// Helpers (h2f, f2h, bf2f, f16_t, bf16_t, NEG_INF, load_elem): common.cuh, prepended by
// sources.rs.

#define ATTN_WARPS 4

// (scale, zero) of a parameter pair.
__device__ __forceinline__ float2 unpack_params(unsigned int p) {
    return make_float2(h2f((unsigned short)(p & 0xffffu)), h2f((unsigned short)(p >> 16)));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Code d of a row packed in chunks of 32 (layout in kv_quant.cu).
__device__ __forceinline__ unsigned int code_at(const unsigned char* row, unsigned int d, unsigned int bits) {
    unsigned int chunk_bytes = 4u * bits, j = d & 31u;
    unsigned int byte = row[(d >> 5) * chunk_bytes + j % chunk_bytes];
    return (byte >> ((j / chunk_bytes) * bits)) & ((1u << bits) - 1u);
}

// Tokens warp, warp + ATTN_WARPS, ... of a block (those with qf <= order <= qo), U at a time: the
// loads of all U tokens are issued before the first update.
template <int U, int E_T, typename Load, typename Update>
__device__ __forceinline__ void attend_tokens(int warp, int len, int order0, int qf, int qo, Load& load,
                                              Update& update) {
    for (int t = warp; t < len; t += U * ATTN_WARPS) {
        if (order0 + t > qo) break;  // orders grow along the block
        float kf[U][E_T], vf[U][E_T];
        bool has[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int tu = t + u * ATTN_WARPS;
            has[u] = tu < len && order0 + tu <= qo && order0 + tu >= qf;
            if (has[u]) load(tu, kf[u], vf[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (has[u]) update(kf[u], vf[u]);
    }
}

#define ATTN_PARAMS                                                                                        \
    const float *__restrict__ q, const int *__restrict__ q_order, const int *__restrict__ q_first,          \
        const int4 *__restrict__ entries,                                                                    \
        int n_entries, int entries_per_split, const unsigned short *__restrict__ k_text,                     \
        const unsigned short *__restrict__ v_text, const unsigned char *__restrict__ k_codes,                \
        const unsigned int *__restrict__ k_params, const unsigned char *__restrict__ v_codes,                \
        const unsigned int *__restrict__ v_params, int Hq, int Hkv, int D, int T, int group, int bits,      \
        int key_per_channel, float softmax_scale, float *__restrict__ part_acc, float *__restrict__ part_ml
#define ATTN_ARGS                                                                                          \
    q, q_order, q_first, entries, n_entries, entries_per_split, k_text, v_text, k_codes, k_params, v_codes, v_params, \
        Hq, Hkv, D, T, group, bits, key_per_channel, softmax_scale, part_acc, part_ml

template <int ATTN_MAX_E, int ATTN_MAX_G>
__device__ __forceinline__ void mixed_attention_partial_t(ATTN_PARAMS) {
    __shared__ float s_m[ATTN_WARPS][ATTN_MAX_G];
    __shared__ float s_l[ATTN_WARPS][ATTN_MAX_G];
    __shared__ float s_acc[ATTN_WARPS][ATTN_MAX_G][32 * ATTN_MAX_E];

    const int split = blockIdx.x;
    const int n_splits = gridDim.x;
    const int G = Hq / Hkv;
    const int head_chunks = (G + ATTN_MAX_G - 1) / ATTN_MAX_G;
    const int kvh = blockIdx.y / head_chunks;
    const int chunk = blockIdx.y - kvh * head_chunks;
    const int h0 = kvh * G + chunk * ATTN_MAX_G;  // first query head of this block
    const int gc = min(ATTN_MAX_G, G - chunk * ATTN_MAX_G);
    const int qi = blockIdx.z;
    const int qo = q_order[qi];
    const int qf = q_first[qi];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int E = D / 32;
    const int d0 = lane * E;
    const int row_bytes = D * bits / 8;
    const int groups = D / group;

    float qv[ATTN_MAX_G][ATTN_MAX_E];
    float acc[ATTN_MAX_G][ATTN_MAX_E];
    float m[ATTN_MAX_G], l[ATTN_MAX_G];
#pragma unroll
    for (int g = 0; g < ATTN_MAX_G; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < ATTN_MAX_E; ++e) {
            acc[g][e] = 0.0f;
            qv[g][e] = (g < gc && e < E) ? q[((size_t)qi * Hq + h0 + g) * D + d0 + e] * softmax_scale : 0.0f;
        }
    }

    const int e_begin = split * entries_per_split;
    const int e_end = min(n_entries, e_begin + entries_per_split);
    for (int ei = e_begin; ei < e_end; ++ei) {
        const int4 ent = entries[ei];
        const bool frame = ent.x != 0;
        const int blk = ent.y, len = ent.z, order0 = ent.w;
        if (order0 + len <= qf) continue;  // the whole block before the window
        // Per-channel key parameters of this block for this lane's elements.
        float kc_s[ATTN_MAX_E], kc_z[ATTN_MAX_E];
        if (frame && key_per_channel) {
#pragma unroll
            for (int e = 0; e < ATTN_MAX_E; ++e) {
                if (e < E) {
                    float2 p = unpack_params(k_params[((size_t)blk * Hkv + kvh) * D + d0 + e]);
                    kc_s[e] = p.x;
                    kc_z[e] = p.y;
                }
            }
        }
        // K and V of token t of this block, dequantized (or widened) into registers.
        auto load = [&](int t, float* kf, float* vf) {
            const size_t slot = ((size_t)blk * T + t) * Hkv + kvh;
            if (!frame) {
                const unsigned short* kr = k_text + slot * D + d0;
                const unsigned short* vr = v_text + slot * D + d0;
#pragma unroll
                for (int e = 0; e < ATTN_MAX_E; ++e) {
                    if (e < E) {
                        kf[e] = h2f(kr[e]);
                        vf[e] = h2f(vr[e]);
                    }
                }
            } else {
                const unsigned char* kr = k_codes + slot * row_bytes;
                const unsigned char* vr = v_codes + slot * row_bytes;
                // A lane's E elements lie in one group, or (E = 3, 5, 6 or 7: head dims 96, 160,
                // 192, 224) in two: elements from `e_next` on take the next group's parameters.
                const int g0 = d0 / group;
                const int g1 = (d0 + E - 1) / group;
                const int e_next = (g0 + 1) * group - d0;
                const float2 vp0 = unpack_params(v_params[slot * groups + g0]);
                const float2 vp1 = g1 != g0 ? unpack_params(v_params[slot * groups + g1]) : vp0;
                float2 kp0 = make_float2(0.0f, 0.0f), kp1 = kp0;
                if (!key_per_channel) {
                    kp0 = unpack_params(k_params[slot * groups + g0]);
                    kp1 = g1 != g0 ? unpack_params(k_params[slot * groups + g1]) : kp0;
                }
#pragma unroll
                for (int e = 0; e < ATTN_MAX_E; ++e) {
                    if (e < E) {
                        const bool next = e >= e_next;
                        const float2 kp = next ? kp1 : kp0;
                        const float2 vp = next ? vp1 : vp0;
                        float kcode = (float)code_at(kr, d0 + e, bits);
                        kf[e] = key_per_channel ? kc_z[e] + kc_s[e] * kcode : kp.y + kp.x * kcode;
                        vf[e] = vp.y + vp.x * (float)code_at(vr, d0 + e, bits);
                    }
                }
            }
        };
        // Online-softmax update of every query head with one token's K and V.
        auto update = [&](const float* kf, const float* vf) {
#pragma unroll
            for (int g = 0; g < ATTN_MAX_G; ++g) {
                if (g < gc) {
                    float s = 0.0f;
#pragma unroll
                    for (int e = 0; e < ATTN_MAX_E; ++e)
                        if (e < E) s += qv[g][e] * kf[e];
                    s = warp_sum(s);
                    float m_new = fmaxf(m[g], s);
                    float corr = expf(m[g] - m_new);  // exp(-inf) = 0 on the first key
                    float p = expf(s - m_new);
                    l[g] = l[g] * corr + p;
#pragma unroll
                    for (int e = 0; e < ATTN_MAX_E; ++e)
                        if (e < E) acc[g][e] = acc[g][e] * corr + p * vf[e];
                    m[g] = m_new;
                }
            }
        };
        // A warp takes tokens warp, warp + 4, warp + 8, ... in that order, U per iteration
        // with all U tokens' loads issued before any is used (U times the loads in flight),
        // as many as the registers allow: U * E_T = 8 values of K and of V per lane with one
        // query head per block, half that with more. Quantized rows are a quarter of the
        // bytes or less, so with one query head per block and E_T = 2 frame blocks take twice
        // as many tokens per iteration (the loads in flight bound this kernel).
        constexpr int U = ATTN_MAX_G == 1 ? 8 / ATTN_MAX_E : (ATTN_MAX_E >= 4 ? 1 : 4 / ATTN_MAX_E);
        constexpr int UF = (ATTN_MAX_G == 1 && ATTN_MAX_E == 2) ? 2 * U : U;
        if (frame) {
            attend_tokens<UF, ATTN_MAX_E>(warp, len, order0, qf, qo, load, update);
        } else {
            attend_tokens<U, ATTN_MAX_E>(warp, len, order0, qf, qo, load, update);
        }
    }

    // Merge the warps' states.
#pragma unroll
    for (int g = 0; g < ATTN_MAX_G; ++g) {
        if (g < gc) {
            if (lane == 0) {
                s_m[warp][g] = m[g];
                s_l[warp][g] = l[g];
            }
#pragma unroll
            for (int e = 0; e < ATTN_MAX_E; ++e)
                if (e < E) s_acc[warp][g][d0 + e] = acc[g][e];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < gc * D; idx += blockDim.x) {
        const int g = idx / D, d = idx - g * D;
        float mm = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, s_m[w][g]);
        float ll = 0.0f, a = 0.0f;
        if (mm != NEG_INF) {
            for (int w = 0; w < ATTN_WARPS; ++w) {
                if (s_m[w][g] != NEG_INF) {
                    float f = expf(s_m[w][g] - mm);
                    ll += s_l[w][g] * f;
                    a += s_acc[w][g][d] * f;
                }
            }
        }
        const size_t part = ((size_t)qi * Hq + h0 + g) * n_splits + split;
        part_acc[part * D + d] = a;
        if (d == 0) {
            part_ml[part * 2] = mm;
            part_ml[part * 2 + 1] = ll;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e2_g1(ATTN_PARAMS) {
    mixed_attention_partial_t<2, 1>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e2_g4(ATTN_PARAMS) {
    mixed_attention_partial_t<2, 4>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e2_g8(ATTN_PARAMS) {
    mixed_attention_partial_t<2, 8>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e4_g1(ATTN_PARAMS) {
    mixed_attention_partial_t<4, 1>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e4_g4(ATTN_PARAMS) {
    mixed_attention_partial_t<4, 4>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e4_g8(ATTN_PARAMS) {
    mixed_attention_partial_t<4, 8>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e8_g1(ATTN_PARAMS) {
    mixed_attention_partial_t<8, 1>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e8_g4(ATTN_PARAMS) {
    mixed_attention_partial_t<8, 4>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) mixed_attention_partial_e8_g8(ATTN_PARAMS) {
    mixed_attention_partial_t<8, 8>(ATTN_ARGS);
}

// out[q][hq][d] = sum_s acc_s[d] * exp(m_s - M) / sum_s l_s * exp(m_s - M). One block per (q, hq),
// one thread per element. A query that saw no key gets zeros.
extern "C" __global__ void mixed_attention_combine(const float* __restrict__ part_acc,
                                                   const float* __restrict__ part_ml, float* __restrict__ out,
                                                   int n_splits, int D) {
    const size_t qh = blockIdx.x;
    const float* ml = part_ml + qh * n_splits * 2;
    float mm = NEG_INF;
    for (int s = 0; s < n_splits; ++s) mm = fmaxf(mm, ml[2 * s]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float ll = 0.0f, a = 0.0f;
        if (mm != NEG_INF) {
            for (int s = 0; s < n_splits; ++s) {
                float ms = ml[2 * s];
                if (ms != NEG_INF) {
                    float f = expf(ms - mm);
                    ll += ml[2 * s + 1] * f;
                    a += part_acc[(qh * n_splits + s) * D + d] * f;
                }
            }
        }
        out[qh * D + d] = ll > 0.0f ? a / ll : 0.0f;
    }
}
