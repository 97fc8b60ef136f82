//! Slow, obviously-correct CPU twins of every CUDA kernel. The selftest runs each kernel and
//! its twin on the same inputs and compares them; the twins accumulate in f64.

use half::f16;
use jetvlm_quant::{ScaleZero, WeightFormat};

use crate::layout::{BlockEntry, BlockKind, KvLayout};

/// `x[i] += y[i]` (kernel `residual_add_f32`).
pub fn residual_add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

/// `y[t][r] += b[r]` over rows of `b.len()` (kernel `bias_add_f32`).
pub fn bias_add(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_mut(b.len()) {
        for (o, v) in row.iter_mut().zip(b) {
            *o += *v;
        }
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Element `i` of the synthetic bell-shaped values of `seed` (kernel `fill_bell_f32`): the sum
/// of three 21-bit uniforms in [0, 1) minus 1.5, times `scale`.
pub fn bell_value(seed: u64, i: u64, scale: f32) -> f32 {
    let z = mix64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i));
    let u = |shift: u32| ((z >> shift) & 0x1f_ffff) as f32 * (1.0 / 2_097_152.0);
    (u(0) + u(21) + u(42) - 1.5) * scale
}

/// `silu(gate) * up` (kernel `swiglu_f32`).
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

/// `gelu_tanh(gate) * up` (kernel `geglu_f32`): Gemma's GeGLU with GELU's tanh
/// approximation (`gelu_pytorch_tanh`: `0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`),
/// in f64.
pub fn geglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (0.5 * g * (1.0 + (k * (g + 0.044_715 * g * g * g)).tanh()) * u as f64) as f32
        })
        .collect()
}

/// `x = cap * tanh(x / cap)` in place (kernel `softcap_f32`: Gemma's final logit
/// softcapping), in f64.
pub fn softcap(x: &mut [f32], cap: f32) {
    let cap = cap as f64;
    for v in x {
        *v = (cap * (*v as f64 / cap).tanh()) as f32;
    }
}

/// `x = round(x * scale)` in place, the product in f32 and rounded (to nearest even) to
/// `round`'s precision (kernel `scale_round_f32`): Gemma's token embeddings scaled by
/// `sqrt(hidden)` in the embedding table's type, as transformers'
/// `Gemma3TextScaledWordEmbedding` computes them. `DType::F32` (or any other) keeps the f32
/// product.
pub fn scale_round(x: &mut [f32], scale: f32, round: jetvlm_core::DType) {
    for v in x {
        let p = *v * scale;
        *v = match round {
            jetvlm_core::DType::F16 => f16::from_f32(p).to_f32(),
            jetvlm_core::DType::BF16 => half::bf16::from_f32(p).to_f32(),
            _ => p,
        };
    }
}

/// Rows of `table` (`[vocab][hidden]`, already widened to f32) for `ids`
/// (kernels `embedding_gather_*`). Ids must be inside the vocabulary.
pub fn embedding_gather(table: &[f32], hidden: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * hidden..(id as usize + 1) * hidden]
                .iter()
                .copied()
        })
        .collect()
}

/// RMSNorm of each `dim`-row of `x` (kernels `rmsnorm_*`).
pub fn rmsnorm(x: &[f32], weight: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(dim) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(&v, &w)| (v as f64 * inv * w as f64) as f32),
        );
    }
    out
}

/// Inverse frequencies `theta^(-2i/rotary_dim)` of plain RoPE.
pub fn rope_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / rotary_dim as f64) as f32)
        .collect()
}

/// Rotary embedding in place on `x[n_tokens][n_heads][head_dim]`, rotate-half layout
/// (kernel `rope_f32`). The angle is `pos * inv_freq` in f32, as the kernel computes it.
pub fn rope(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
) {
    let half = rotary_dim / 2;
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let head = &mut x[(t * n_heads + h) * head_dim..(t * n_heads + h + 1) * head_dim];
            for i in 0..half {
                let angle = (pos as f32 * inv_freq[i]) as f64;
                let (s, c) = angle.sin_cos();
                let (a, b) = (head[i] as f64, head[i + half] as f64);
                head[i] = (a * c - b * s) as f32;
                head[i + half] = (b * c + a * s) as f32;
            }
        }
    }
}

/// `y[t][r] = sum_c w[r][c] * x[t][c]` with `w` widened to f32 (kernels `gemv_*`).
pub fn gemv(w: &[f32], x: &[f32], rows: usize, cols: usize, n_tok: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n_tok * rows];
    for t in 0..n_tok {
        let xr = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            y[t * rows + r] = wr
                .iter()
                .zip(xr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

/// M-RoPE in place on `x[n_tokens][n_heads][head_dim]` (kernel `rope_mrope_f32`): token `t`
/// has three positions `positions3[3 t..3 t + 3]` (temporal, row, column); frequency pair `i`
/// turns by the position of the section holding it (`i < s0`: temporal, `i < s0 + s1`: row,
/// else column), over the whole head. The angle is `pos * inv_freq` in f32, as the kernel
/// computes it.
pub fn rope_mrope(
    x: &mut [f32],
    positions3: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
    [s0, s1]: [usize; 2],
) {
    rope_sections(x, positions3, inv_freq, n_heads, head_dim, |i| {
        usize::from(i >= s0) + usize::from(i >= s0 + s1)
    });
}

/// Interleaved M-RoPE in place on `x[n_tokens][n_heads][head_dim]` (kernel
/// `rope_mrope_interleaved_f32`; Qwen3-VL, transformers' `Qwen3VLTextRotaryEmbedding`):
/// frequency pair `i` turns by the row position when `i % 3 == 1` and `i < 3 * s1`, the
/// column position when `i % 3 == 2` and `i < 3 * s2`, the temporal position otherwise. The
/// angle is `pos * inv_freq` in f32, as the kernel computes it.
pub fn rope_mrope_interleaved(
    x: &mut [f32],
    positions3: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
    [s1, s2]: [usize; 2],
) {
    rope_sections(x, positions3, inv_freq, n_heads, head_dim, |i| {
        match i % 3 {
            1 if i < 3 * s1 => 1,
            2 if i < 3 * s2 => 2,
            _ => 0,
        }
    });
}

/// Rotate-half RoPE over whole heads, frequency pair `i` of token `t` at
/// `positions3[3 t + section(i)]`.
fn rope_sections(
    x: &mut [f32],
    positions3: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
    section: impl Fn(usize) -> usize,
) {
    let half = head_dim / 2;
    for (t, pos) in positions3.chunks_exact(3).enumerate() {
        for h in 0..n_heads {
            let head = &mut x[(t * n_heads + h) * head_dim..(t * n_heads + h + 1) * head_dim];
            for i in 0..half {
                let section = section(i);
                let angle = (pos[section] as f32 * inv_freq[i]) as f64;
                let (s, c) = angle.sin_cos();
                let (a, b) = (head[i] as f64, head[i + half] as f64);
                head[i] = (a * c - b * s) as f32;
                head[i + half] = (b * c + a * s) as f32;
            }
        }
    }
}

/// A weight-only quantized `[rows][cols]` matrix as the `gemv_q*` / `gemm_q*` kernels read it
/// (the layout of `jetvlm quantize`, `jetvlm_quant::weight`): codes row by row (INT8: one
/// `i8` per weight; INT4: `cols / 2` bytes in chunks of 32 codes, byte `i` holding code `i` in
/// its low nibble and code `i + 16` in its high one), one FP16 scale per group and, for INT4,
/// one FP16 zero per group (`w = zero + scale * code`; INT8: `w = scale * code`).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f16>,
    /// Empty for INT8.
    pub zeros: Vec<f16>,
}

impl QuantMatrix {
    /// Quantizes `w` (`[rows][cols]`) row by row with `jetvlm_quant`'s reference
    /// round-to-nearest ([`jetvlm_quant::weight::quantize_row`]).
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Self, jetvlm_quant::QuantError> {
        let mut m = QuantMatrix {
            format,
            rows,
            cols,
            codes: Vec::with_capacity(rows * format.code_bytes_per_row(cols)),
            scales: Vec::with_capacity(rows * format.groups_per_row(cols)),
            zeros: Vec::new(),
        };
        for row in w.chunks_exact(cols.max(1)).take(rows) {
            let q = jetvlm_quant::weight::quantize_row(row, format)?;
            m.codes.extend_from_slice(&q.codes);
            m.scales.extend_from_slice(&q.scales);
            m.zeros.extend_from_slice(&q.zeros);
        }
        Ok(m)
    }

    /// Row `r` dequantized by `jetvlm_quant`'s reference into `out` (`cols` values).
    #[cfg(test)]
    fn dequantize_row_ref(&self, r: usize, out: &mut [f32]) {
        let gpr = self.format.groups_per_row(self.cols);
        let cb = self.format.code_bytes_per_row(self.cols);
        let zeros = if self.zeros.is_empty() {
            &[][..]
        } else {
            &self.zeros[r * gpr..(r + 1) * gpr]
        };
        jetvlm_quant::weight::dequantize_row(
            self.format,
            &self.codes[r * cb..(r + 1) * cb],
            &self.scales[r * gpr..(r + 1) * gpr],
            zeros,
            out,
        );
    }

    /// Code of weight `(r, c)` as the kernels unpack it (INT8 sign-extended).
    pub fn code(&self, r: usize, c: usize) -> i32 {
        if self.format.bits() == 8 {
            self.codes[r * self.cols + c] as i8 as i32
        } else {
            let byte = self.codes[r * self.cols / 2 + (c / 32) * 16 + (c % 32) % 16];
            ((byte >> (4 * ((c % 32) / 16))) & 0xf) as i32
        }
    }
}

/// Twin of `gemv_q8`/`gemv_q4` (decode) and `gemm_q8`/`gemm_q4` (prefill):
/// `y[t][r] = sum_c w[r][c] x[t][c]`, each group summed as the kernels do,
/// `scale * sum(code * x) + zero * sum(x)`, in f64.
pub fn gemv_quant(m: &QuantMatrix, x: &[f32], n_tok: usize) -> Vec<f32> {
    let (rows, cols, g) = (m.rows, m.cols, m.format.group());
    let groups = cols / g;
    let mut y = vec![0.0f32; n_tok * rows];
    for t in 0..n_tok {
        let xr = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let mut acc = 0.0f64;
            for gi in 0..groups {
                let (mut dot, mut sum) = (0.0f64, 0.0f64);
                for c in gi * g..(gi + 1) * g {
                    dot += m.code(r, c) as f64 * xr[c] as f64;
                    sum += xr[c] as f64;
                }
                let s = m.scales[r * groups + gi].to_f64();
                let z = m.zeros.get(r * groups + gi).map_or(0.0, |z| z.to_f64());
                acc += s * dot + z * sum;
            }
            y[t * rows + r] = acc as f32;
        }
    }
    y
}

/// Twin of `embedding_gather_q8` / `embedding_gather_q4`: rows `ids` of a quantized table
/// `m` (`[vocab][hidden]`) dequantized, `scale * code` (INT8) or `zero + scale * code`
/// (INT4), the product and the sum each rounded to f32 (no fused multiply-add), as
/// `jetvlm_quant`'s `dequantize_row` and the CPU decoder's lookup compute them. Ids must be
/// inside the vocabulary.
pub fn embedding_gather_quant(m: &QuantMatrix, ids: &[u32]) -> Vec<f32> {
    let (cols, g) = (m.cols, m.format.group());
    let groups = cols / g;
    let mut out = Vec::with_capacity(ids.len() * cols);
    for &id in ids {
        let r = id as usize;
        for c in 0..cols {
            let s = m.scales[r * groups + c / g].to_f32();
            let w = s * m.code(r, c) as f32;
            out.push(match m.zeros.get(r * groups + c / g) {
                Some(z) => z.to_f32() + w,
                None => w,
            });
        }
    }
    out
}

/// FP16 (scale, zero) of `values`: `jetvlm_quant`'s `row_params`, which the kernels mirror.
pub fn range_params(values: &[f32], bits: u32) -> [f16; 2] {
    let p = jetvlm_quant::reference::row_params(values, bits);
    [p.scale, p.zero]
}

/// Code of `x` under FP16 parameters `p` (`jetvlm_quant`'s `code_of`).
pub fn quantize_value(x: f32, p: [f16; 2], bits: u32) -> u8 {
    jetvlm_quant::reference::code_of(
        x,
        ScaleZero {
            scale: p[0],
            zero: p[1],
        },
        bits,
    )
}

/// Value of `code` under FP16 parameters `p`.
pub fn dequantize_value(code: u8, p: [f16; 2]) -> f32 {
    ScaleZero {
        scale: p[0],
        zero: p[1],
    }
    .dequant(code)
}

fn code_at(row: &[u8], d: usize, bits: u32) -> u8 {
    jetvlm_quant::format::unpack_code(row, bits, d)
}

/// Host image of one layer's device KV pools; its writers are the reference twins of
/// `kv_store_f16` and the `kv_quant_*` kernels, and [`attention`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostPools {
    pub layout: KvLayout,
    pub text_blocks: usize,
    pub frame_blocks: usize,
    pub k_text: Vec<f16>,
    pub v_text: Vec<f16>,
    pub k_codes: Vec<u8>,
    pub v_codes: Vec<u8>,
    /// (scale, zero) pairs flattened: `[2 * pair]` = scale, `[2 * pair + 1]` = zero.
    pub k_params: Vec<f16>,
    pub v_params: Vec<f16>,
}

impl HostPools {
    pub fn new(layout: KvLayout, text_blocks: usize, frame_blocks: usize) -> Self {
        Self {
            layout,
            text_blocks,
            frame_blocks,
            k_text: vec![f16::ZERO; text_blocks * layout.text_block_elems()],
            v_text: vec![f16::ZERO; text_blocks * layout.text_block_elems()],
            k_codes: vec![0; frame_blocks * layout.frame_block_code_bytes()],
            v_codes: vec![0; frame_blocks * layout.frame_block_code_bytes()],
            k_params: vec![f16::ZERO; 2 * frame_blocks * layout.k_params_per_block()],
            v_params: vec![f16::ZERO; 2 * frame_blocks * layout.v_params_per_block()],
        }
    }

    /// Twin of `kv_store_f16` for K and V: `k`, `v` are `[len][H][D]`.
    pub fn store_text(&mut self, block: usize, tok_offset: usize, k: &[f32], v: &[f32]) {
        let base = (block * self.layout.block_tokens + tok_offset) * self.layout.row_elems();
        for (i, (&a, &b)) in k.iter().zip(v).enumerate() {
            self.k_text[base + i] = f16::from_f32(a);
            self.v_text[base + i] = f16::from_f32(b);
        }
    }

    /// Twin of the `kv_quant_*` kernels: quantizes `len` tokens (`k`, `v`: `[len][H][D]`) into
    /// frame block `block` from slot `tok_offset` (0 for per-channel keys).
    pub fn quantize_frame(
        &mut self,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let l = self.layout;
        let (h_n, d_n, g) = (l.kv_heads, l.head_dim, l.group);
        let groups = l.groups();
        let rb = l.code_row_bytes();
        let token_params = |x: &[f32], params: &mut [f16], base_pair: usize| {
            for th in 0..len * h_n {
                for gi in 0..groups {
                    let p = range_params(&x[th * d_n + gi * g..th * d_n + (gi + 1) * g], l.bits);
                    let pair = base_pair + th * groups + gi;
                    params[2 * pair] = p[0];
                    params[2 * pair + 1] = p[1];
                }
            }
        };
        let codes_of = |x: &[f32], params: &[f16], codes: &mut [u8], per_channel: bool| {
            let mut row = vec![0u8; d_n];
            for th in 0..len * h_n {
                let h = th % h_n;
                for (d, code) in row.iter_mut().enumerate() {
                    let pair = if per_channel {
                        (block * h_n + h) * d_n + d
                    } else {
                        (block * l.block_tokens + tok_offset) * h_n * groups + th * groups + d / g
                    };
                    *code = quantize_value(
                        x[th * d_n + d],
                        [params[2 * pair], params[2 * pair + 1]],
                        l.bits,
                    );
                }
                let start = (block * l.block_tokens + tok_offset) * h_n * rb + th * rb;
                jetvlm_quant::format::pack_codes(&row, l.bits, &mut codes[start..start + rb]);
            }
        };
        let token_base = (block * l.block_tokens + tok_offset) * h_n * groups;
        token_params(v, &mut self.v_params, token_base);
        codes_of(v, &self.v_params, &mut self.v_codes, false);
        if l.key_per_channel {
            for i in 0..h_n * d_n {
                let channel: Vec<f32> = (0..len).map(|t| k[t * h_n * d_n + i]).collect();
                let p = range_params(&channel, l.bits);
                let pair = block * h_n * d_n + i;
                self.k_params[2 * pair] = p[0];
                self.k_params[2 * pair + 1] = p[1];
            }
            codes_of(k, &self.k_params, &mut self.k_codes, true);
        } else {
            token_params(k, &mut self.k_params, token_base);
            codes_of(k, &self.k_params, &mut self.k_codes, false);
        }
    }

    /// Dequantized (or widened) K and V of one token of one kv head.
    pub fn token(
        &self,
        kind: BlockKind,
        block: usize,
        t: usize,
        kvh: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let l = self.layout;
        let slot = (block * l.block_tokens + t) * l.kv_heads + kvh;
        let d_n = l.head_dim;
        match kind {
            BlockKind::Text => (
                self.k_text[slot * d_n..(slot + 1) * d_n]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                self.v_text[slot * d_n..(slot + 1) * d_n]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
            ),
            BlockKind::Frame => {
                let rb = l.code_row_bytes();
                let krow = &self.k_codes[slot * rb..(slot + 1) * rb];
                let vrow = &self.v_codes[slot * rb..(slot + 1) * rb];
                let pair = |params: &[f16], i: usize| [params[2 * i], params[2 * i + 1]];
                let groups = l.groups();
                let k = (0..d_n)
                    .map(|d| {
                        let p = if l.key_per_channel {
                            pair(&self.k_params, (block * l.kv_heads + kvh) * d_n + d)
                        } else {
                            pair(&self.k_params, slot * groups + d / l.group)
                        };
                        dequantize_value(code_at(krow, d, l.bits), p)
                    })
                    .collect();
                let v = (0..d_n)
                    .map(|d| {
                        dequantize_value(
                            code_at(vrow, d, l.bits),
                            pair(&self.v_params, slot * groups + d / l.group),
                        )
                    })
                    .collect();
                (k, v)
            }
        }
    }
}

/// Twin of `mixed_attention_partial` + `mixed_attention_combine`: `q[n_q][q_heads][D]`, query
/// `i` sees keys whose order is <= `q_order[i]`; softmax scale `1/sqrt(D)`; grouped-query
/// (query head `h` reads kv head `h / (q_heads / kv_heads)`). Returns `[n_q][q_heads][D]`.
pub fn attention(
    pools: &HostPools,
    q: &[f32],
    q_order: &[i32],
    q_heads: usize,
    entries: &[BlockEntry],
) -> Vec<f32> {
    attention_from(pools, q, q_order, &[], q_heads, entries)
}

/// [`attention`] where query `i` sees only keys whose order is in `q_from[i]..=q_order[i]`
/// (a sliding window's first key; an empty `q_from` starts every query at 0).
pub fn attention_from(
    pools: &HostPools,
    q: &[f32],
    q_order: &[i32],
    q_from: &[i32],
    q_heads: usize,
    entries: &[BlockEntry],
) -> Vec<f32> {
    let l = pools.layout;
    let d_n = l.head_dim;
    let group = q_heads / l.kv_heads;
    let scale = 1.0 / (d_n as f64).sqrt();
    let mut out = vec![0.0f32; q.len()];
    for (qi, &qo) in q_order.iter().enumerate() {
        let from = q_from.get(qi).copied().unwrap_or(0) as i64;
        for kvh in 0..l.kv_heads {
            let mut keys = Vec::new();
            for e in entries {
                for t in 0..e.len as usize {
                    let order = e.order as i64 + t as i64;
                    if order <= qo as i64 && order >= from {
                        keys.push(pools.token(e.kind, e.block as usize, t, kvh));
                    }
                }
            }
            for hq in kvh * group..(kvh + 1) * group {
                let qv = &q[(qi * q_heads + hq) * d_n..(qi * q_heads + hq + 1) * d_n];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|(k, _)| {
                        qv.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let total: f64 = w.iter().sum();
                let o = &mut out[(qi * q_heads + hq) * d_n..(qi * q_heads + hq + 1) * d_n];
                if total > 0.0 {
                    for d in 0..d_n {
                        o[d] = (keys
                            .iter()
                            .zip(&w)
                            .map(|((_, v), &p)| p * v[d] as f64)
                            .sum::<f64>()
                            / total) as f32;
                    }
                }
            }
        }
    }
    out
}

/// Largest absolute difference divided by the largest absolute reference value (the
/// normalised error of `test-backend-ops`); 0 when both are empty.
pub fn normalized_error(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()))
        .max(f64::MIN_POSITIVE);
    let err = got.iter().zip(want).fold(0.0f64, |m, (&a, &b)| {
        let d = (a as f64 - b as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    if got.len() != want.len() {
        f64::INFINITY
    } else {
        err / scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::Rng;

    fn layout(bits: u32, per_channel: bool) -> KvLayout {
        KvLayout {
            kv_heads: 2,
            head_dim: 64,
            block_tokens: 8,
            bits,
            group: 32,
            key_per_channel: per_channel,
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step() {
        for bits in [2, 4, 8] {
            for per_channel in [false, true] {
                let l = layout(bits, per_channel);
                let mut pools = HostPools::new(l, 1, 2);
                let mut rng = Rng::new(bits as u64 + per_channel as u64 * 10);
                let k = rng.outlier_normals(8 * l.row_elems(), l.head_dim);
                let v = rng.normals(8 * l.row_elems());
                pools.quantize_frame(1, 0, 8, &k, &v);
                let levels = ((1u32 << bits) - 1) as f32;
                for t in 0..8 {
                    for h in 0..2 {
                        let (kd, vd) = pools.token(BlockKind::Frame, 1, t, h);
                        for d in 0..64 {
                            let i = (t * 2 + h) * 64 + d;
                            // Range of the group (per-token) or channel (per-channel) the element belongs to.
                            // Half a quantization step, plus the FP16 rounding of scale and zero.
                            let bound = |x: &[f32], per_channel: bool| -> f32 {
                                let vals: Vec<f32> = if per_channel {
                                    (0..8).map(|tt| x[(tt * 2 + h) * 64 + d]).collect()
                                } else {
                                    let g0 = (t * 2 + h) * 64 + d / 32 * 32;
                                    x[g0..g0 + 32].to_vec()
                                };
                                let hi = vals.iter().copied().fold(f32::MIN, f32::max);
                                let lo = vals.iter().copied().fold(f32::MAX, f32::min);
                                (hi - lo) / levels * 0.5 * 1.01
                                    + 1e-3 * (hi - lo + hi.abs().max(lo.abs()))
                            };
                            let kb = bound(&k, per_channel);
                            let vb = bound(&v, false);
                            assert!(
                                (kd[d] - k[i]).abs() <= kb,
                                "bits {bits} pc {per_channel} k {} vs {} bound {kb}",
                                kd[d],
                                k[i]
                            );
                            assert!(
                                (vd[d] - v[i]).abs() <= vb,
                                "bits {bits} v {} vs {} bound {vb}",
                                vd[d],
                                v[i]
                            );
                        }
                    }
                }
                // Block 0 was not written.
                assert!(
                    pools
                        .token(BlockKind::Frame, 0, 0, 0)
                        .0
                        .iter()
                        .all(|&x| x == 0.0)
                );
            }
        }
    }

    /// The byte formulas of kernels/kv_quant.cu (`kv_quant_codes`) and kernels/attention.cu
    /// (`code_at`), written out in Rust, against jetvlm_quant's packing.
    #[test]
    fn kernel_packing_formulas_match_jetvlm_quant() {
        let mut rng = Rng::new(5);
        for bits in [2u32, 4, 8] {
            let d_n = 128;
            let codes: Vec<u8> = (0..d_n).map(|_| rng.below(1 << bits) as u8).collect();
            let mut want = vec![0u8; d_n * bits as usize / 8];
            jetvlm_quant::format::pack_codes(&codes, bits, &mut want);
            let (per_byte, cb) = (8 / bits as usize, 4 * bits as usize);
            let got: Vec<u8> = (0..want.len())
                .map(|j| {
                    let (chunk, jj) = (j / cb, j % cb);
                    (0..per_byte).fold(0u8, |b, s| {
                        b | codes[chunk * 32 + jj + s * cb] << (s * bits as usize)
                    })
                })
                .collect();
            assert_eq!(got, want, "bits {bits}");
            for (d, &c) in codes.iter().enumerate() {
                let j = d & 31;
                let byte = want[(d >> 5) * cb + j % cb];
                assert_eq!(
                    (byte >> ((j / cb) * bits as usize)) & ((1u16 << bits) - 1) as u8,
                    c
                );
            }
        }
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let l = layout(4, false);
        let mut pools = HostPools::new(l, 1, 0);
        let k: Vec<f32> = (0..l.row_elems()).map(|i| (i % 7) as f32 * 0.25).collect();
        let v: Vec<f32> = (0..l.row_elems()).map(|i| (i % 5) as f32 - 2.0).collect();
        pools.store_text(0, 0, &k, &v);
        let entries = [BlockEntry {
            kind: BlockKind::Text,
            block: 0,
            len: 1,
            order: 0,
        }];
        let q = vec![0.5f32; 4 * 64];
        let out = attention(&pools, &q, &[0], 4, &entries);
        for hq in 0..4 {
            let kvh = hq / 2;
            assert_eq!(&out[hq * 64..(hq + 1) * 64], &v[kvh * 64..(kvh + 1) * 64]);
        }
    }

    #[test]
    fn attention_respects_query_order() {
        let l = layout(8, false);
        let mut pools = HostPools::new(l, 1, 0);
        let mut rng = Rng::new(3);
        let k = rng.normals(2 * l.row_elems());
        let v = rng.normals(2 * l.row_elems());
        pools.store_text(0, 0, &k, &v);
        let entries = [BlockEntry {
            kind: BlockKind::Text,
            block: 0,
            len: 2,
            order: 10,
        }];
        let q = rng.normals(2 * 2 * 64);
        let out = attention(&pools, &q, &[10, 11], 2, &entries);
        // The first query sees only the first token, so it returns that token's value exactly.
        let v0: Vec<f32> = v[..64].iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(&out[..64], &v0[..]);
        assert_ne!(&out[2 * 64..3 * 64], &v0[..]);
    }

    /// The quantized product's twin (the kernels' nibble and group formulas) against
    /// `jetvlm_quant`'s reference dequantization and a plain product, within the f64
    /// summation's rounding, for INT8 and INT4 with every group size.
    #[test]
    fn quantized_gemv_twin_matches_the_reference_dequantization() {
        let mut rng = Rng::new(16);
        for bits in [8u32, 4] {
            for group in [32usize, 64, 128] {
                let format = WeightFormat::new(bits, group).unwrap();
                let (rows, cols, n_tok) = (37, 256, 3);
                let w = rng.outlier_normals(rows * cols, cols);
                let x = rng.normals(n_tok * cols);
                let m = QuantMatrix::quantize(&w, rows, cols, format).unwrap();
                let mut deq = vec![0f32; rows * cols];
                for (r, out) in deq.chunks_exact_mut(cols).enumerate() {
                    m.dequantize_row_ref(r, out);
                }
                let want = gemv(&deq, &x, rows, cols, n_tok);
                let got = gemv_quant(&m, &x, n_tok);
                let err = normalized_error(&got, &want);
                assert!(err < 1e-6, "INT{bits} g{group}: error {err:e}");
                // The product is of the quantized weights, not the originals: the error
                // against those is the format's, far above the summation's.
                let exact = gemv(&w, &x, rows, cols, n_tok);
                let fmt_err = normalized_error(&got, &exact);
                assert!(
                    fmt_err > 1e-5 && fmt_err < 0.2,
                    "INT{bits} g{group}: {fmt_err:e}"
                );
            }
        }
    }

    /// The quantized lookup's twin (the kernels' nibble and group formulas) gives
    /// `jetvlm_quant`'s reference dequantization of each looked-up row exactly, for INT8 and
    /// INT4 with every group size, repeated and last ids included; and the rows are the
    /// quantized table's, within the format's error of the float one.
    #[test]
    fn quantized_embedding_twin_matches_the_reference_dequantization() {
        let mut rng = Rng::new(17);
        for bits in [8u32, 4] {
            for group in [32usize, 64, 128] {
                let format = WeightFormat::new(bits, group).unwrap();
                let (vocab, hidden) = (53, 256);
                let w = rng.outlier_normals(vocab * hidden, hidden);
                let m = QuantMatrix::quantize(&w, vocab, hidden, format).unwrap();
                let ids = [0u32, 52, 7, 7, 31];
                let mut want = vec![0f32; ids.len() * hidden];
                for (&id, out) in ids.iter().zip(want.chunks_exact_mut(hidden)) {
                    m.dequantize_row_ref(id as usize, out);
                }
                let got = embedding_gather_quant(&m, &ids);
                assert_eq!(got, want, "INT{bits} g{group}");
                let exact = embedding_gather(&w, hidden, &ids);
                let fmt_err = normalized_error(&got, &exact);
                assert!(
                    fmt_err > 1e-5 && fmt_err < 0.2,
                    "INT{bits} g{group}: {fmt_err:e}"
                );
            }
        }
    }

    /// M-RoPE's twin against the CPU decoder's `Rope::apply_mrope` (sections [2, 3, 3] of a
    /// 16-wide head), and with three equal positions it is plain RoPE.
    #[test]
    fn mrope_twin_matches_the_cpu_decoder_and_reduces_to_rope() {
        let v = serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 10, "rope_theta": 1e4,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "mrope_frame_grid": [2, 3]});
        let c = jetvlm_core::hf::ModelConfig::from_value(&v, std::path::Path::new("config.json"))
            .unwrap();
        let cpu = jetvlm_decoder::kernels::Rope::new(&c);
        let inv: Vec<f32> = cpu.inv_freq().iter().map(|&f| f as f32).collect();
        let (heads, d) = (4, c.head_dim);
        assert_eq!(d, 16);
        let mut rng = Rng::new(17);
        let pos: Vec<[u32; 3]> = (0..6)
            .map(|_| [rng.below(50), rng.below(50), rng.below(50)])
            .collect();
        let x = rng.normals(pos.len() * heads * d);
        let mut want = x.clone();
        cpu.apply_mrope(&mut want, heads, &pos);
        let mut got = x.clone();
        let flat: Vec<u32> = pos.iter().flatten().copied().collect();
        rope_mrope(&mut got, &flat, &inv, heads, d, [2, 3]);
        let err = normalized_error(&got, &want);
        assert!(err < 1e-5, "{err:e}");
        // The sections matter: rotating every pair at the temporal position differs.
        let mut temporal = x.clone();
        let t: Vec<u32> = pos.iter().map(|p| p[0]).collect();
        rope(&mut temporal, &t, &inv, heads, d, d);
        assert!(normalized_error(&temporal, &want) > 1e-2);
        let same: Vec<u32> = t.iter().flat_map(|&p| [p, p, p]).collect();
        let mut m = x.clone();
        rope_mrope(&mut m, &same, &inv, heads, d, [2, 3]);
        assert_eq!(m, temporal);
    }

    /// GeGLU, softcapping and the embedding scaling against the formulas at known points and
    /// against the CPU decoder's kernels on random inputs (what the arch says, both backends
    /// do).
    #[test]
    fn gemma_twins_match_the_math_and_the_cpu_decoder() {
        // gelu_tanh(1) = 0.8411920, gelu_tanh(-2) = -0.0454023, gelu_tanh(0) = 0.
        let g = geglu(&[1.0, -2.0, 0.0], &[1.0, 2.0, 5.0]);
        assert!((g[0] - 0.841_192).abs() < 1e-6, "{g:?}");
        assert!((g[1] + 2.0 * 0.045_402_3).abs() < 1e-6, "{g:?}");
        assert_eq!(g[2], 0.0);
        let mut rng = Rng::new(21);
        let (gate, up) = (rng.outlier_normals(1024, 64), rng.normals(1024));
        let mut cpu = vec![0f32; gate.len()];
        jetvlm_decoder::kernels::geglu(&gate, &up, &mut cpu);
        assert!(normalized_error(&geglu(&gate, &up), &cpu) < 1e-6);
        // GeGLU is not SwiGLU: mixing them up is far outside the bound (on unit normals,
        // where the two activations differ most).
        let (g, u) = (rng.normals(256), rng.normals(256));
        assert!(normalized_error(&swiglu(&g, &u), &geglu(&g, &u)) > 1e-2);

        // cap * tanh(x / cap): tanh(1) * cap at cap, near x for small x, inside (-cap, cap).
        let mut x = vec![30.0f32, -30.0, 1e-3, 1e6];
        softcap(&mut x, 30.0);
        assert!((x[0] - 30.0 * 1f32.tanh()).abs() < 1e-5 && (x[1] + x[0]).abs() < 1e-6);
        assert!(
            (x[2] - 1e-3).abs() < 1e-9 && x[3] <= 30.0 && x[3] > 29.99,
            "{x:?}"
        );
        let logits = rng.outlier_normals(1024, 64);
        let (mut a, mut b) = (logits.clone(), logits.clone());
        softcap(&mut a, 5.0);
        jetvlm_decoder::kernels::softcap(&mut b, 5.0);
        assert!(normalized_error(&a, &b) < 1e-6);

        // The product in f32, rounded to nearest even in the table's type: 1 + 2^-8 is half a
        // bf16 step above 1 (ties to 1), 1 + 3 * 2^-8 rounds up to 1 + 2^-6; f16 keeps
        // 1 + 2^-10 and rounds 1 + 2^-12 to 1; f32 keeps the product.
        use jetvlm_core::DType;
        let v = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            1.0 + 2f32.powi(-10),
        ];
        let mut bf = v;
        scale_round(&mut bf, 1.0, DType::BF16);
        assert_eq!(bf, [1.0, 1.0 + 2f32.powi(-6), 1.0]);
        let mut h = [1.0 + 2f32.powi(-10), 1.0 + 2f32.powi(-12)];
        scale_round(&mut h, 1.0, DType::F16);
        assert_eq!(h, [1.0 + 2f32.powi(-10), 1.0]);
        let mut f = [0.1f32, -3.3];
        scale_round(&mut f, 8.0, DType::F32);
        assert_eq!(f, [0.1f32 * 8.0, -3.3f32 * 8.0]);
    }

    /// Interleaved M-RoPE's twin against the CPU decoder's `Rope::apply_mrope` for Qwen3-VL's
    /// interleaved sections ([4, 2, 2] of a 16-wide head); the contiguous twin on the same
    /// sections differs.
    #[test]
    fn interleaved_mrope_twin_matches_the_cpu_decoder() {
        let v = serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 10, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                "mrope_section": [4, 2, 2], "mrope_interleaved": true},
            "mrope_frame_grid": [2, 3]});
        let c = jetvlm_core::hf::ModelConfig::from_value(&v, std::path::Path::new("config.json"))
            .unwrap();
        assert!(matches!(
            c.rope_scaling,
            jetvlm_core::hf::RopeScaling::MRope {
                interleaved: true,
                ..
            }
        ));
        let cpu = jetvlm_decoder::kernels::Rope::new(&c);
        let inv: Vec<f32> = cpu.inv_freq().iter().map(|&f| f as f32).collect();
        let (heads, d) = (4, 16);
        let mut rng = Rng::new(23);
        let pos: Vec<[u32; 3]> = (0..6)
            .map(|_| [rng.below(50), rng.below(50), rng.below(50)])
            .collect();
        let flat: Vec<u32> = pos.iter().flatten().copied().collect();
        let x = rng.normals(pos.len() * heads * d);
        let mut want = x.clone();
        cpu.apply_mrope(&mut want, heads, &pos);
        let mut got = x.clone();
        rope_mrope_interleaved(&mut got, &flat, &inv, heads, d, [2, 2]);
        let err = normalized_error(&got, &want);
        assert!(err < 1e-5, "{err:e}");
        let mut contiguous = x.clone();
        rope_mrope(&mut contiguous, &flat, &inv, heads, d, [4, 2]);
        assert!(normalized_error(&contiguous, &want) > 1e-2);
    }

    /// A window's first key: a query starting at its own order returns its own value; one
    /// starting at order 2 equals plain attention over tokens 2..=5 stored alone.
    #[test]
    fn attention_from_sees_only_the_window() {
        let l = layout(8, false);
        let mut rng = Rng::new(29);
        let (k, v) = (
            rng.normals(6 * l.row_elems()),
            rng.normals(6 * l.row_elems()),
        );
        let mut all = HostPools::new(l, 1, 0);
        all.store_text(0, 0, &k, &v);
        let entry = |order, len| BlockEntry {
            kind: BlockKind::Text,
            block: 0,
            len,
            order,
        };
        let q = rng.normals(4 * 64);
        let own = attention_from(&all, &q, &[5], &[5], 4, &[entry(0, 6)]);
        for hq in 0..4 {
            let kvh = hq / 2;
            let v5: Vec<f32> = v[(5 * 2 + kvh) * 64..(5 * 2 + kvh + 1) * 64]
                .iter()
                .map(|&x| f16::from_f32(x).to_f32())
                .collect();
            assert_eq!(&own[hq * 64..(hq + 1) * 64], &v5[..]);
        }
        let mut tail = HostPools::new(l, 1, 0);
        let r = 2 * l.row_elems();
        tail.store_text(0, 0, &k[r..], &v[r..]);
        let want = attention(&tail, &q, &[5], 4, &[entry(2, 4)]);
        assert_eq!(
            attention_from(&all, &q, &[5], &[2], 4, &[entry(0, 6)]),
            want
        );
        assert_ne!(attention(&all, &q, &[5], 4, &[entry(0, 6)]), want);
    }

    #[test]
    fn small_kernels_match_closed_forms() {
        let mut x = vec![1.0, 2.0];
        residual_add(&mut x, &[0.5, -2.0]);
        assert_eq!(x, vec![1.5, 0.0]);
        let s = swiglu(&[0.0, 10.0], &[3.0, 2.0]);
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 2.0 * 10.0 / (1.0 + (-10.0f32).exp())).abs() < 1e-5);
        let n = rmsnorm(&[3.0, 4.0], &[1.0, 2.0], 2, 0.0);
        let r = (12.5f32).sqrt();
        assert!((n[0] - 3.0 / r).abs() < 1e-6 && (n[1] - 8.0 / r).abs() < 1e-6);
        // RoPE at position 0 is the identity; at any position it preserves each pair's norm.
        let inv = rope_inv_freq(10000.0, 4);
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        rope(&mut y, &[0], &inv, 1, 4, 4);
        assert_eq!(y, vec![1.0, 2.0, 3.0, 4.0]);
        rope(&mut y, &[7], &inv, 1, 4, 4);
        assert!(((y[0] * y[0] + y[2] * y[2]) - 10.0).abs() < 1e-4);
        assert_eq!(
            gemv(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0], 2, 2, 1),
            vec![3.0, 7.0]
        );
        assert_eq!(
            embedding_gather(&[0.0, 1.0, 2.0, 3.0], 2, &[1, 0]),
            vec![2.0, 3.0, 0.0, 1.0]
        );
        assert!(normalized_error(&[1.0, f32::NAN], &[1.0, 1.0]).is_infinite());
    }
}
