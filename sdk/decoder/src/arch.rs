//! The decoder architecture, written once for every backend: which tensors a checkpoint
//! holds and under which names ([`load`]), and the layer recipe ([`run_layers`],
//! [`final_logits`]) over a small set of operations ([`LayerOps`]). The CPU decoder
//! ([`crate::Model`]) and the device decoder (`jetvlm_cuda::DeviceDecoder`, on a GPU or on the
//! simulated device) implement those operations; they hold no tensor name and no layer order
//! of their own.
//!
//! Llama, Mistral, Qwen2 and Qwen3 share this recipe: pre-norm (RMSNorm) attention with
//! grouped query heads, optional q/k/v biases (Qwen2), an optional RMSNorm over every query
//! and key head (Qwen3), RoPE on q and k, a SwiGLU MLP, a final RMSNorm and an LM head that may
//! be tied to the embedding table. DeepStack (Qwen3-VL) adds a frame's extra visual features
//! to its tokens' hidden states after the first layers ([`run_layers_with_deepstack`]).
//! Gemma 3 (`ModelConfig::gemma3`) varies it: RMSNorm weights applied as `1 + w` (folded at
//! load), norms of the attention and MLP outputs before each residual add, q/k norms carrying
//! the `query_pre_attn_scalar` score scale, a GeGLU MLP ([`TensorOps::geglu`]), local layers
//! with their own RoPE base ([`LayerOps::rope_local`]) and sliding window, a frame's tokens
//! attending to each other both ways ([`LayerOps::attention_masked`]), and optional final
//! logit softcapping; a backend that lacks those operations is refused Gemma 3 at load
//! ([`WeightSink::RUNS_GEMMA3`]). A new family adds its options to `ModelConfig`, its tensor
//! names to [`load`] and its steps to [`run_layers`]; a weight format plugs in at
//! [`TensorOps::matmul`].

use crate::error::{DecoderError, Result};
use crate::profile::{self, Phase};
use crate::weights::{Tensor, Weights};
use jetvlm_core::hf::{ModelConfig, RopeScaling};
use jetvlm_core::{DType, TokenKind};
pub use jetvlm_kvcache::AttendMask;

/// Prefixes under which checkpoints keep the language model's tensors: plain Llama/Qwen2,
/// SmolVLM (Idefics3), Qwen2-VL (newer layout), LLaVA; each with its LM head's name.
pub const PREFIXES: &[(&str, &str)] = &[
    ("model.", "lm_head.weight"),
    ("model.text_model.", "lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
];

/// Where a span's tokens sit. `cache`: one position per token, what the KV cache records and
/// continues from (`next_position` is one past the largest). `mrope`: with M-RoPE, each frame
/// token's (temporal, row, column) rotation positions; `None` when every token rotates at its
/// cache position (text, and all tokens under plain RoPE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanPositions {
    pub cache: Vec<u32>,
    pub mrope: Option<Vec<[u32; 3]>>,
}

/// The positions of `n` tokens of `kind` appended at position `start`, for every backend.
/// Plain RoPE, and text under M-RoPE: `start, start + 1, ...`. An M-RoPE frame of the config's
/// `rows x cols` grid (row-major tokens): token (r, c) rotates at (start, start + r,
/// start + c), and the text after the frame continues at `start + max(rows, cols)`, as
/// transformers' `get_rope_index` places an image; the cache records `start + max(r, c)`, so
/// its next position is exactly that.
pub fn span_positions(
    c: &ModelConfig,
    kind: TokenKind,
    start: u32,
    n: usize,
) -> Result<SpanPositions> {
    let end = u32::try_from(n)
        .ok()
        .and_then(|n| start.checked_add(n))
        .ok_or_else(|| {
            DecoderError::Input(format!(
                "{n} tokens after position {start} pass the largest position {}",
                u32::MAX
            ))
        })?;
    let grid = match (&c.rope_scaling, kind) {
        (RopeScaling::MRope { frame_grid, .. }, TokenKind::Frame) => {
            Some(frame_grid.ok_or_else(|| {
                DecoderError::Input(
                    "an M-RoPE frame needs the frame grid (mrope_frame_grid of the decoder's \
                     config.json)"
                        .into(),
                )
            })?)
        }
        _ => None,
    };
    let Some([rows, cols]) = grid else {
        return Ok(SpanPositions {
            cache: (start..end).collect(),
            mrope: None,
        });
    };
    if rows.checked_mul(cols) != Some(n) || n == 0 {
        return Err(DecoderError::Input(format!(
            "a frame of {n} tokens does not fill the M-RoPE frame grid {rows}x{cols} \
             (mrope_frame_grid of the decoder's config.json)"
        )));
    }
    // rows, cols <= n, so every position below is at most start + n - 1.
    let mut cache = Vec::with_capacity(n);
    let mut mrope = Vec::with_capacity(n);
    for r in 0..rows as u32 {
        for col in 0..cols as u32 {
            cache.push(start + r.max(col));
            mrope.push([start, start + r, start + col]);
        }
    }
    Ok(SpanPositions {
        cache,
        mrope: Some(mrope),
    })
}

/// RoPE positions a frame of `tokens` tokens takes ([`span_positions`]): `max(rows, cols)`
/// of its M-RoPE grid, else one per token.
pub fn frame_positions(c: &ModelConfig, tokens: usize) -> usize {
    match &c.rope_scaling {
        RopeScaling::MRope {
            frame_grid: Some([rows, cols]),
            ..
        } if rows.checked_mul(*cols) == Some(tokens) => (*rows).max(*cols),
        _ => tokens,
    }
}

/// Gemma 3: the configuration its local (sliding-window) layers rotate with: their own RoPE
/// base, no scaling ([`LayerOps::rope_local`]); `None` for other models.
pub fn local_rope_config(c: &ModelConfig) -> Option<ModelConfig> {
    c.gemma3.as_ref().map(|g| ModelConfig {
        rope_theta: g.local_rope_theta,
        rope_scaling: RopeScaling::Default,
        ..c.clone()
    })
}

/// Gemma 3: token embeddings are multiplied by `sqrt(hidden)`, the factor and the product
/// rounded to the embedding table's type `table` (transformers'
/// `Gemma3TextScaledWordEmbedding`); returns the rounded factor and that type. `None` for
/// other models (and frame embeddings are never scaled).
pub fn embedding_scale(c: &ModelConfig, table: DType) -> Option<(f32, DType)> {
    let s = (c.hidden_size as f32).sqrt();
    let s = match table {
        DType::F16 => half::f16::from_f32(s).to_f32(),
        DType::BF16 => half::bf16::from_f32(s).to_f32(),
        _ => s,
    };
    c.gemma3.as_ref().map(|_| (s, table))
}

/// A weight matrix `[rows, cols]` (`y = x W^T + b`) in a backend's types: `W` the matrix,
/// `V` an f32 vector.
#[derive(Debug)]
pub struct Linear<W, V> {
    pub w: W,
    pub rows: usize,
    pub cols: usize,
    pub bias: Option<V>,
}

/// One decoder layer's weights.
#[derive(Debug)]
pub struct Layer<W, V> {
    pub input_norm: V,
    pub q: Linear<W, V>,
    pub k: Linear<W, V>,
    /// RMSNorm weights `[head_dim]` over each query and key head (Qwen3), before RoPE.
    pub q_norm: Option<V>,
    pub k_norm: Option<V>,
    pub v: Linear<W, V>,
    pub o: Linear<W, V>,
    /// The norm before the MLP (`post_attention_layernorm`; Gemma 3's
    /// `pre_feedforward_layernorm`).
    pub post_norm: V,
    /// Gemma 3: the norms of the attention and the MLP outputs before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub out_norms: Option<[V; 2]>,
    pub gate: Linear<W, V>,
    pub up: Linear<W, V>,
    pub down: Linear<W, V>,
}

/// Every weight of a decoder, in a backend's types.
#[derive(Debug)]
pub struct DecoderWeights<W, V> {
    pub embed: W,
    pub layers: Vec<Layer<W, V>>,
    pub norm: V,
    /// `None` when the LM head is tied to the embedding table.
    pub lm_head: Option<W>,
    /// Type the matrices are held in.
    pub dtype: DType,
    /// Weight bytes one decode step reads: every layer matrix and bias, the norms and the LM
    /// head (the embedding table when tied); one embedding row is negligible.
    pub bytes_per_token: u64,
}

impl<W, V> DecoderWeights<W, V> {
    /// The LM head's matrix `[vocab, hidden]`.
    pub fn head(&self) -> &W {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The matrices a single-token step reads whole: each layer's q, k, v, o, gate, up and
    /// down, then the LM head (the embedding table when tied; an untied table is read a row
    /// per token).
    pub fn streamed_mut(&mut self) -> impl Iterator<Item = &mut W> {
        let DecoderWeights {
            embed,
            layers,
            lm_head,
            ..
        } = self;
        let head = match lm_head {
            Some(h) => h,
            None => embed,
        };
        layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q.w,
                    &mut l.k.w,
                    &mut l.v.w,
                    &mut l.o.w,
                    &mut l.gate.w,
                    &mut l.up.w,
                    &mut l.down.w,
                ]
            })
            .chain(std::iter::once(head))
    }
}

/// How a backend takes a checkpoint's tensors: matrices in their stored (or converted)
/// precision, vectors (norms, biases) as f32.
pub trait WeightSink {
    type W;
    type V;
    type Error: From<DecoderError>;
    /// Whether the backend runs Gemma 3's layer recipe ([`TensorOps::geglu`],
    /// [`TensorOps::softcap`], [`LayerOps::rope_local`], [`LayerOps::attention_masked`]);
    /// [`load`] refuses a Gemma 3 config for a backend that does not.
    const RUNS_GEMMA3: bool = false;
    fn matrix(&mut self, t: &Tensor) -> std::result::Result<Self::W, Self::Error>;
    fn vector(&mut self, t: &Tensor) -> std::result::Result<Self::V, Self::Error>;
}

/// Reads a decoder's weights from `ws` into `sink`, layer by layer; every missing or
/// misshapen tensor is an error naming it and its file. `convert` turns the matrices into
/// that type first (an owned copy).
pub fn load<S: WeightSink>(
    c: &ModelConfig,
    ws: &Weights,
    convert: Option<DType>,
    sink: &mut S,
) -> std::result::Result<DecoderWeights<S::W, S::V>, S::Error> {
    if c.gemma3.is_some() && !S::RUNS_GEMMA3 {
        return Err(DecoderError::Unsupported {
            path: ws.dir().join("config.json"),
            field: "architectures".into(),
            msg: "Gemma 3 (Gemma3ForCausalLM) runs on the CPU decoder only (--device cpu); the \
                  device decoder lacks its layer recipe (GeGLU, output norms, sliding-window \
                  layers, bidirectional frame attention)"
                .into(),
        }
        .into());
    }
    let (prefix, head_name) = PREFIXES
        .iter()
        .find(|(p, _)| ws.contains(&format!("{p}embed_tokens.weight")))
        .copied()
        .unwrap_or(PREFIXES[0]);
    let h = c.hidden_size;
    let qd = c.num_attention_heads * c.head_dim;
    let kvd = c.num_key_value_heads * c.head_dim;
    let inter = c.intermediate_size;
    let matrix_tensor = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = ws.get(name, shape)?;
        match convert {
            Some(dt) if dt != t.dtype() => t.converted(dt),
            _ => Ok(t),
        }
    };
    let mut bytes = 0u64;
    let mut linear = |sink: &mut S,
                      name: String,
                      rows: usize,
                      cols: usize,
                      bias: bool|
     -> std::result::Result<Linear<S::W, S::V>, S::Error> {
        let t = matrix_tensor(&format!("{name}.weight"), &[rows, cols])?;
        bytes += t.size_bytes() as u64;
        let bias = if bias {
            bytes += 4 * rows as u64;
            Some(sink.vector(&ws.get(&format!("{name}.bias"), &[rows])?)?)
        } else {
            None
        };
        Ok(Linear {
            w: sink.matrix(&t)?,
            rows,
            cols,
            bias,
        })
    };
    // Gemma's RMSNorm weights are stored as `w` and applied as `1 + w` (in f32, as
    // transformers does); its query norm also carries the attention scale
    // `query_pre_attn_scalar^-1/2` in place of the kernels' `head_dim^-1/2`.
    let gemma = |t: Tensor, scale: f32| match c.gemma3 {
        Some(_) => t.map_f32(|w| (1.0 + w) * scale),
        None => t,
    };
    let q_scale = c.gemma3.as_ref().map_or(1.0, |g| {
        (c.head_dim as f64 / g.query_pre_attn_scalar).sqrt() as f32
    });
    let norm = |sink: &mut S, name: String| -> std::result::Result<S::V, S::Error> {
        sink.vector(&gemma(ws.get(&name, &[h])?, 1.0))
    };
    let head_norm =
        |sink: &mut S, name: String, scale: f32| -> std::result::Result<Option<S::V>, S::Error> {
            if !c.qk_norm {
                return Ok(None);
            }
            Ok(Some(
                sink.vector(&gemma(ws.get(&name, &[c.head_dim])?, scale))?,
            ))
        };
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("{prefix}layers.{i}");
        let b = c.attention_bias;
        layers.push(Layer {
            input_norm: norm(sink, format!("{p}.input_layernorm.weight"))?,
            q: linear(sink, format!("{p}.self_attn.q_proj"), qd, h, b)?,
            k: linear(sink, format!("{p}.self_attn.k_proj"), kvd, h, b)?,
            q_norm: head_norm(sink, format!("{p}.self_attn.q_norm.weight"), q_scale)?,
            k_norm: head_norm(sink, format!("{p}.self_attn.k_norm.weight"), 1.0)?,
            v: linear(sink, format!("{p}.self_attn.v_proj"), kvd, h, b)?,
            o: linear(sink, format!("{p}.self_attn.o_proj"), h, qd, false)?,
            post_norm: match c.gemma3 {
                Some(_) => norm(sink, format!("{p}.pre_feedforward_layernorm.weight"))?,
                None => norm(sink, format!("{p}.post_attention_layernorm.weight"))?,
            },
            out_norms: match c.gemma3 {
                Some(_) => Some([
                    norm(sink, format!("{p}.post_attention_layernorm.weight"))?,
                    norm(sink, format!("{p}.post_feedforward_layernorm.weight"))?,
                ]),
                None => None,
            },
            gate: linear(sink, format!("{p}.mlp.gate_proj"), inter, h, false)?,
            up: linear(sink, format!("{p}.mlp.up_proj"), inter, h, false)?,
            down: linear(sink, format!("{p}.mlp.down_proj"), h, inter, false)?,
        });
    }
    // Two norms per layer and the final one (and the q/k head norms).
    bytes += (2 * c.num_hidden_layers as u64 + 1) * 4 * h as u64;
    if c.qk_norm {
        bytes += c.num_hidden_layers as u64 * 2 * 4 * c.head_dim as u64;
    }
    if c.gemma3.is_some() {
        bytes += c.num_hidden_layers as u64 * 2 * 4 * h as u64;
    }
    let embed_t = matrix_tensor(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
    let dtype = embed_t.dtype();
    let embed = sink.matrix(&embed_t)?;
    let lm_head = if c.tie_word_embeddings {
        bytes += embed_t.size_bytes() as u64;
        None
    } else {
        let t = matrix_tensor(head_name, &[c.vocab_size, h])?;
        bytes += t.size_bytes() as u64;
        Some(sink.matrix(&t)?)
    };
    let norm = norm(sink, format!("{prefix}norm.weight"))?;
    tracing::debug!(layers = layers.len(), prefix, %dtype, "decoder weights read");
    Ok(DecoderWeights {
        embed,
        layers,
        norm,
        lm_head,
        dtype,
        bytes_per_token: bytes,
    })
}

/// The tensor operations of a decoder, on one backend's activations `Act` (row-major
/// `[tokens, width]` buffers at least as long as the widths the recipe passes).
pub trait TensorOps {
    type W;
    type V;
    type Act;
    type Error: From<DecoderError>;
    /// RMSNorm of `n` rows of `w`'s width.
    fn rms_norm(
        &mut self,
        out: &mut Self::Act,
        x: &Self::Act,
        w: &Self::V,
        n: usize,
        eps: f32,
    ) -> std::result::Result<(), Self::Error>;
    /// `y[n, rows] = x[n, cols] W^T` (where weight formats plug in).
    fn matmul(
        &mut self,
        w: &Self::W,
        rows: usize,
        cols: usize,
        x: &Self::Act,
        n: usize,
        y: &mut Self::Act,
    ) -> std::result::Result<(), Self::Error>;
    /// `y[t][r] += b[r]` for `n` rows of `rows`.
    fn bias_add(
        &mut self,
        y: &mut Self::Act,
        b: &Self::V,
        rows: usize,
        n: usize,
    ) -> std::result::Result<(), Self::Error>;
    /// `y = x W^T + b`.
    fn linear(
        &mut self,
        l: &Linear<Self::W, Self::V>,
        x: &Self::Act,
        n: usize,
        y: &mut Self::Act,
    ) -> std::result::Result<(), Self::Error> {
        self.matmul(&l.w, l.rows, l.cols, x, n, y)?;
        if let Some(b) = &l.bias {
            self.bias_add(y, b, l.rows, n)?;
        }
        Ok(())
    }
    /// Several linears over the same input (q/k/v, gate/up); a backend may fuse them.
    fn linears<const N: usize>(
        &mut self,
        ls: [&Linear<Self::W, Self::V>; N],
        x: &Self::Act,
        n: usize,
        ys: [&mut Self::Act; N],
    ) -> std::result::Result<(), Self::Error> {
        for (l, y) in ls.into_iter().zip(ys) {
            self.linear(l, x, n, y)?;
        }
        Ok(())
    }
    /// `x[..len] += y[..len]`.
    fn add(
        &mut self,
        x: &mut Self::Act,
        y: &Self::Act,
        len: usize,
    ) -> std::result::Result<(), Self::Error>;
    /// `out[..len] = silu(gate) * up`.
    fn swiglu(
        &mut self,
        out: &mut Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
        len: usize,
    ) -> std::result::Result<(), Self::Error>;
    /// `out[..len] = gelu_tanh(gate) * up` (Gemma's GeGLU, GELU's tanh approximation). A
    /// backend without it is refused Gemma 3 at load ([`WeightSink::RUNS_GEMMA3`]).
    fn geglu(
        &mut self,
        _out: &mut Self::Act,
        _gate: &Self::Act,
        _up: &Self::Act,
        _len: usize,
    ) -> std::result::Result<(), Self::Error> {
        Err(missing_op("geglu").into())
    }
    /// `x[..len] = cap * tanh(x / cap)` (Gemma's final logit softcapping).
    fn softcap(
        &mut self,
        _x: &mut Self::Act,
        _len: usize,
        _cap: f32,
    ) -> std::result::Result<(), Self::Error> {
        Err(missing_op("softcap").into())
    }
}

/// The error of an operation a backend lacks (it is refused the architecture that needs it at
/// load, so this is never reached through [`load`]).
fn missing_op(op: &str) -> DecoderError {
    DecoderError::Input(format!("this decoder backend has no `{op}` operation"))
}

/// What a decoder layer needs beyond [`TensorOps`]: positions and the KV cache of the step.
pub trait LayerOps: TensorOps {
    /// Whether [`crate::profile`] times this backend's single-token passes (operations that
    /// return when done: the CPU's, not a device's queued launches).
    const TIMED: bool = false;
    /// Called before each layer's first operation (the offloaded device cache starts copying
    /// the next layer's K/V here).
    fn begin_layer(&mut self, _layer: usize) -> std::result::Result<(), Self::Error> {
        Ok(())
    }
    /// RoPE in place on `x[n][heads][head_dim]` at the step's positions.
    fn rope(
        &mut self,
        x: &mut Self::Act,
        heads: usize,
        n: usize,
    ) -> std::result::Result<(), Self::Error>;
    /// Stores layer `layer`'s K/V of the step's tokens in the KV cache and attends their
    /// queries over it (causal, grouped-query) into `out`.
    fn attention(
        &mut self,
        layer: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        out: &mut Self::Act,
        n: usize,
    ) -> std::result::Result<(), Self::Error>;
    /// RoPE with the local layers' base (Gemma 3's sliding-window layers).
    fn rope_local(
        &mut self,
        _x: &mut Self::Act,
        _heads: usize,
        _n: usize,
    ) -> std::result::Result<(), Self::Error> {
        Err(missing_op("rope_local").into())
    }
    /// [`LayerOps::attention`] under Gemma 3's mask: `mask.window` for a local layer, and
    /// with `mask.whole_span` a frame span's tokens see each other both ways (transformers'
    /// `token_type_ids` block mask over an image's tokens); a text span stays causal.
    #[allow(clippy::too_many_arguments)]
    fn attention_masked(
        &mut self,
        layer: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        out: &mut Self::Act,
        n: usize,
        mask: AttendMask,
    ) -> std::result::Result<(), Self::Error> {
        if mask == AttendMask::default() {
            return self.attention(layer, q, k, v, out, n);
        }
        Err(missing_op("attention_masked").into())
    }
}

/// The activations of one forward step (`n` tokens).
#[derive(Debug)]
pub struct Activations<A> {
    /// The residual stream `[n, hidden]`: the step's input embeddings in, hidden states out.
    pub x: A,
    pub xn: A,
    pub q: A,
    pub k: A,
    pub v: A,
    /// The q/k head norms' output (swapped with `q`, then `k`): with q/k norms `q`, `k` and
    /// `qk` are all `[n, heads * head_dim]`, so the swaps keep every buffer large enough.
    pub qk: A,
    pub att: A,
    pub tmp: A,
    pub gate: A,
    pub up: A,
    pub act: A,
}

impl<A> Activations<A> {
    /// Buffers for `n` tokens of a model around the residual stream `x` (`[n, hidden]`), the
    /// others from `alloc(len)`.
    pub fn new<E>(
        c: &ModelConfig,
        n: usize,
        x: A,
        mut alloc: impl FnMut(usize) -> std::result::Result<A, E>,
    ) -> std::result::Result<Self, E> {
        let h = n * c.hidden_size;
        let qd = n * c.num_attention_heads * c.head_dim;
        let kvd = n * c.num_key_value_heads * c.head_dim;
        let inter = n * c.intermediate_size;
        let (kd, qk) = if c.qk_norm { (qd, qd) } else { (kvd, 1) };
        Ok(Self {
            x,
            xn: alloc(h)?,
            q: alloc(qd)?,
            k: alloc(kd)?,
            v: alloc(kvd)?,
            qk: alloc(qk)?,
            att: alloc(qd)?,
            tmp: alloc(h)?,
            gate: alloc(inter)?,
            up: alloc(inter)?,
            act: alloc(inter)?,
        })
    }
}

/// Runs the `n` tokens in `a.x` through every layer.
pub fn run_layers<O: LayerOps>(
    ops: &mut O,
    c: &ModelConfig,
    layers: &[Layer<O::W, O::V>],
    a: &mut Activations<O::Act>,
    n: usize,
) -> std::result::Result<(), O::Error> {
    run_layers_with_deepstack(ops, c, layers, a, n, &[])
}

/// [`run_layers`] for a span whose `n` tokens are one frame of a DeepStack model:
/// `deepstack[i]` (`[n, hidden]`, the frame's `i`-th set of extra visual features) is added to
/// the hidden states after layer `i`, as transformers' `Qwen3VLTextModel` does for the
/// image tokens. Empty for text and for models without DeepStack.
pub fn run_layers_with_deepstack<O: LayerOps>(
    ops: &mut O,
    c: &ModelConfig,
    layers: &[Layer<O::W, O::V>],
    a: &mut Activations<O::Act>,
    n: usize,
    deepstack: &[O::Act],
) -> std::result::Result<(), O::Error> {
    let eps = c.rms_norm_eps as f32;
    let h = c.hidden_size;
    let inter = c.intermediate_size;
    let mut clock = profile::Clock::new(O::TIMED && n == 1);
    for (li, l) in layers.iter().enumerate() {
        ops.begin_layer(li)?;
        ops.rms_norm(&mut a.xn, &a.x, &l.input_norm, n, eps)?;
        clock.lap(Phase::AttentionNorm);
        ops.linears([&l.q, &l.k, &l.v], &a.xn, n, [&mut a.q, &mut a.k, &mut a.v])?;
        clock.lap(Phase::Qkv);
        if let Some(w) = &l.q_norm {
            ops.rms_norm(&mut a.qk, &a.q, w, n * c.num_attention_heads, eps)?;
            std::mem::swap(&mut a.q, &mut a.qk);
        }
        if let Some(w) = &l.k_norm {
            ops.rms_norm(&mut a.qk, &a.k, w, n * c.num_key_value_heads, eps)?;
            std::mem::swap(&mut a.k, &mut a.qk);
        }
        clock.lap(Phase::AttentionNorm);
        match &c.gemma3 {
            // Gemma 3: a local layer rotates with its own base and sees its window; an
            // image's tokens see each other both ways in every layer.
            Some(g) => {
                let local = g.sliding_layers.get(li).copied().unwrap_or(false);
                let mask = AttendMask {
                    whole_span: true,
                    window: local.then_some(g.sliding_window),
                };
                if local {
                    ops.rope_local(&mut a.q, c.num_attention_heads, n)?;
                    ops.rope_local(&mut a.k, c.num_key_value_heads, n)?;
                } else {
                    ops.rope(&mut a.q, c.num_attention_heads, n)?;
                    ops.rope(&mut a.k, c.num_key_value_heads, n)?;
                }
                clock.lap(Phase::Rope);
                ops.attention_masked(li, &a.q, &a.k, &a.v, &mut a.att, n, mask)?;
            }
            None => {
                ops.rope(&mut a.q, c.num_attention_heads, n)?;
                ops.rope(&mut a.k, c.num_key_value_heads, n)?;
                clock.lap(Phase::Rope);
                ops.attention(li, &a.q, &a.k, &a.v, &mut a.att, n)?;
            }
        }
        clock.lap(Phase::Attention);
        ops.linear(&l.o, &a.att, n, &mut a.tmp)?;
        clock.lap(Phase::Output);
        residual_add(ops, a, l.out_norms.as_ref().map(|[att, _]| att), n, h, eps)?;
        ops.rms_norm(&mut a.xn, &a.x, &l.post_norm, n, eps)?;
        clock.lap(Phase::MlpNorm);
        ops.linears([&l.gate, &l.up], &a.xn, n, [&mut a.gate, &mut a.up])?;
        clock.lap(Phase::GateUp);
        match c.gemma3 {
            Some(_) => ops.geglu(&mut a.act, &a.gate, &a.up, n * inter)?,
            None => ops.swiglu(&mut a.act, &a.gate, &a.up, n * inter)?,
        }
        clock.lap(Phase::Activation);
        ops.linear(&l.down, &a.act, n, &mut a.tmp)?;
        clock.lap(Phase::Down);
        residual_add(ops, a, l.out_norms.as_ref().map(|[_, mlp]| mlp), n, h, eps)?;
        if let Some(features) = deepstack.get(li) {
            ops.add(&mut a.x, features, n * h)?;
        }
        clock.lap(Phase::Residual);
    }
    Ok(())
}

/// `x += tmp`, or with Gemma 3's output norm `x += rms_norm(tmp)` (through `xn`).
fn residual_add<O: TensorOps>(
    ops: &mut O,
    a: &mut Activations<O::Act>,
    out_norm: Option<&O::V>,
    n: usize,
    h: usize,
    eps: f32,
) -> std::result::Result<(), O::Error> {
    match out_norm {
        Some(w) => {
            ops.rms_norm(&mut a.xn, &a.tmp, w, n, eps)?;
            ops.add(&mut a.x, &a.xn, n * h)
        }
        None => ops.add(&mut a.x, &a.tmp, n * h),
    }
}

/// Logits `[rows, vocab]` of `rows` hidden states: the final RMSNorm into `normed`, then the
/// LM head into `logits` (Gemma 3: softcapped when its config says so).
pub fn final_logits<O: TensorOps>(
    ops: &mut O,
    c: &ModelConfig,
    w: &DecoderWeights<O::W, O::V>,
    hidden: &O::Act,
    rows: usize,
    normed: &mut O::Act,
    logits: &mut O::Act,
) -> std::result::Result<(), O::Error> {
    ops.rms_norm(normed, hidden, &w.norm, rows, c.rms_norm_eps as f32)?;
    ops.matmul(w.head(), c.vocab_size, c.hidden_size, normed, rows, logits)?;
    if let Some(cap) = c.gemma3.as_ref().and_then(|g| g.final_logit_softcapping) {
        ops.softcap(logits, rows * c.vocab_size, cap as f32)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(rope: serde_json::Value) -> ModelConfig {
        let mut v = json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 10});
        if !rope.is_null() {
            v["rope_scaling"] = json!({"type": "mrope", "mrope_section": [2, 3, 3]});
            v["mrope_frame_grid"] = rope;
        }
        ModelConfig::from_value(&v, std::path::Path::new("config.json")).unwrap()
    }

    /// A 2x3 frame at 5: rotation (5, 5 + row, 5 + column), the text after it at 5 + 3;
    /// text and plain RoPE count one by one.
    #[test]
    fn mrope_frames_take_rows_and_columns_and_text_continues_after_the_longer_side() {
        let c = config(json!([2, 3]));
        let p = span_positions(&c, TokenKind::Frame, 5, 6).unwrap();
        assert_eq!(p.cache, vec![5, 6, 7, 6, 6, 7]);
        assert_eq!(
            p.mrope.unwrap(),
            vec![
                [5, 5, 5],
                [5, 5, 6],
                [5, 5, 7],
                [5, 6, 5],
                [5, 6, 6],
                [5, 6, 7]
            ]
        );
        let t = span_positions(&c, TokenKind::Text, 8, 3).unwrap();
        assert_eq!((t.cache, t.mrope), (vec![8, 9, 10], None));
        let e = span_positions(&c, TokenKind::Frame, 0, 5).unwrap_err();
        assert!(e.to_string().contains("2x3"), "{e}");
        let plain = config(serde_json::Value::Null);
        let f = span_positions(&plain, TokenKind::Frame, 5, 6).unwrap();
        assert_eq!((f.cache, f.mrope), ((5..11).collect(), None));
        assert!(span_positions(&plain, TokenKind::Text, u32::MAX - 1, 2).is_err());
        assert_eq!(frame_positions(&c, 6), 3);
        assert_eq!(frame_positions(&plain, 6), 6);
    }
}
