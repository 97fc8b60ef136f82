// RMSNorm over the last dimension: out = x / sqrt(mean(x^2) + eps) * weight.
// One thread block per row; weight is f32, f16 or bf16 (raw u16 bits).
// Helpers (h2f, f2h, bf2f, f16_t, bf16_t, NEG_INF, load_elem): common.cuh, prepended by
// sources.rs.

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename W>
__device__ void rmsnorm(float* __restrict__ out, const float* __restrict__ x, const W* __restrict__ w,
                        unsigned int dim, float eps) {
    __shared__ float partial[32];
    const float* row = x + (size_t)blockIdx.x * dim;
    float* orow = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) ss += row[i] * row[i];
    ss = warp_sum(ss);
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        unsigned int nw = (blockDim.x + 31) >> 5;
        float v = lane < nw ? partial[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    float inv = 1.0f / sqrtf(partial[0] / (float)dim + eps);
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = row[i] * inv * load_elem(w, i);
}

extern "C" __global__ void rmsnorm_f32(float* out, const float* x, const float* w, unsigned int dim, float eps) {
    rmsnorm(out, x, w, dim, eps);
}
extern "C" __global__ void rmsnorm_f16(float* out, const float* x, const f16_t* w, unsigned int dim, float eps) {
    rmsnorm(out, x, w, dim, eps);
}
extern "C" __global__ void rmsnorm_bf16(float* out, const float* x, const bf16_t* w, unsigned int dim,
                                        float eps) {
    rmsnorm(out, x, w, dim, eps);
}
