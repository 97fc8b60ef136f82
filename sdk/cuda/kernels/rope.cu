// Rotary position embedding, Hugging Face "rotate_half" layout: within each head the pair is
// (i, i + rotary_dim/2). In place on x[n_tokens][n_heads][head_dim] (f32).
// inv_freq[rotary_dim/2] carries any frequency scaling (e.g. Llama 3), computed on the host.
// The angle is pos * inv_freq in f32 (as Hugging Face computes it), then accurate sin/cos.
extern "C" __global__ void rope_f32(float* __restrict__ x, const unsigned int* __restrict__ positions,
                                    const float* __restrict__ inv_freq, unsigned int n_tokens,
                                    unsigned int n_heads, unsigned int head_dim, unsigned int rotary_dim) {
    unsigned int half_dim = rotary_dim / 2;
    size_t total = (size_t)n_tokens * n_heads * half_dim;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        unsigned int i = (unsigned int)(idx % half_dim);
        size_t th = idx / half_dim;  // token * n_heads + head
        size_t t = th / n_heads;
        float angle = (float)positions[t] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float* head = x + th * head_dim;
        float a = head[i];
        float b = head[i + half_dim];
        head[i] = a * c - b * s;
        head[i + half_dim] = b * c + a * s;
    }
}

// M-RoPE (Qwen2-VL / Qwen2.5-VL, transformers' apply_multimodal_rotary_pos_emb): each token has
// three positions (temporal, row, column), positions3[n_tokens][3]; frequency pair i turns by
// the position of the section holding it: i < s0 temporal, s0 <= i < s0 + s1 row, else column
// (s0 + s1 + s2 = head_dim / 2, checked on the host). Rotates the whole head (rotary_dim =
// head_dim), rotate-half layout, angle pos * inv_freq in f32 as in rope_f32.
extern "C" __global__ void rope_mrope_f32(float* __restrict__ x, const unsigned int* __restrict__ positions3,
                                          const float* __restrict__ inv_freq, unsigned int n_tokens,
                                          unsigned int n_heads, unsigned int head_dim, unsigned int s0,
                                          unsigned int s1) {
    unsigned int half_dim = head_dim / 2;
    size_t total = (size_t)n_tokens * n_heads * half_dim;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        unsigned int i = (unsigned int)(idx % half_dim);
        size_t th = idx / half_dim;  // token * n_heads + head
        size_t t = th / n_heads;
        unsigned int section = (i >= s0) + (i >= s0 + s1);
        float angle = (float)positions3[3 * t + section] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float* head = x + th * head_dim;
        float a = head[i];
        float b = head[i + half_dim];
        head[i] = a * c - b * s;
        head[i + half_dim] = b * c + a * s;
    }
}

// Interleaved M-RoPE (Qwen3-VL, transformers' Qwen3VLTextRotaryEmbedding): frequency pair i
// turns by the row position when i % 3 == 1 and i < 3 * s1, the column position when
// i % 3 == 2 and i < 3 * s2, the temporal position otherwise. Layout and angle as in
// rope_mrope_f32.
extern "C" __global__ void rope_mrope_interleaved_f32(float* __restrict__ x,
                                                      const unsigned int* __restrict__ positions3,
                                                      const float* __restrict__ inv_freq, unsigned int n_tokens,
                                                      unsigned int n_heads, unsigned int head_dim,
                                                      unsigned int s1, unsigned int s2) {
    unsigned int half_dim = head_dim / 2;
    size_t total = (size_t)n_tokens * n_heads * half_dim;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        unsigned int i = (unsigned int)(idx % half_dim);
        size_t th = idx / half_dim;  // token * n_heads + head
        size_t t = th / n_heads;
        unsigned int r = i % 3;
        unsigned int section = (r == 1 && i < 3 * s1) ? 1 : ((r == 2 && i < 3 * s2) ? 2 : 0);
        float angle = (float)positions3[3 * t + section] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float* head = x + th * head_dim;
        float a = head[i];
        float b = head[i + half_dim];
        head[i] = a * c - b * s;
        head[i + half_dim] = b * c + a * s;
    }
}
