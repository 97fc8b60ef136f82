//! The Llama / Mistral / Qwen2 decoder: weights loaded layer by layer, and a forward pass
//! over spans of text tokens and injected embeddings that writes and attends through a
//! [`KvStore`] (the mixed KV cache in production).

use crate::config::Config;
use crate::error::{DecoderError, Result};
use crate::kernels::{self, Rope};
use crate::kv::CacheShape;
use crate::kv::KvStore;
use crate::salience::Salience;
use crate::weights::{Tensor, Weights};
use jetvlm_core::{DType, FrameId, TokenKind};
use std::path::Path;

/// How a model is loaded.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Convert the weight matrices to this type at load (an owned copy: memory grows by the
    /// converted size). `None` keeps the stored type, memory-mapped.
    pub dtype: Option<DType>,
}

/// One span of forward input. Each span becomes one `append_span` in the cache, tagged with
/// its kind (text tokens FP16, frame tokens quantized under the mixed policy).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Token ids, embedded by the model's embedding table.
    Text { ids: &'a [u32] },
    /// Precomputed embeddings `[n, hidden]` row-major (vision-encoder output projected to
    /// the decoder's hidden size). `frame` is required for `TokenKind::Frame`.
    Embeddings {
        data: &'a [f32],
        n: usize,
        kind: TokenKind,
        frame: Option<FrameId>,
    },
}

impl<'a> Input<'a> {
    pub fn text(ids: &'a [u32]) -> Self {
        Input::Text { ids }
    }

    /// A camera frame's embeddings, cached as frame tokens.
    pub fn frame(data: &'a [f32], n: usize, frame: FrameId) -> Self {
        Input::Embeddings {
            data,
            n,
            kind: TokenKind::Frame,
            frame: Some(frame),
        }
    }

    /// Embeddings cached as text tokens.
    pub fn embeddings(data: &'a [f32], n: usize) -> Self {
        Input::Embeddings {
            data,
            n,
            kind: TokenKind::Text,
            frame: None,
        }
    }

    /// Tokens in this span.
    pub fn len(&self) -> usize {
        match self {
            Input::Text { ids } => ids.len(),
            Input::Embeddings { n, .. } => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kind(&self) -> TokenKind {
        match self {
            Input::Text { .. } => TokenKind::Text,
            Input::Embeddings { kind, .. } => *kind,
        }
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// The last input token only (generation).
    Last,
    /// Every input token (tests, scoring).
    All,
}

/// Logits `[rows, vocab]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    /// Logits of the last returned position.
    pub fn last(&self) -> &[f32] {
        &self.data[(self.rows - 1) * self.vocab..]
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// A weight matrix `[rows, cols]` in its stored type.
struct Linear {
    w: Tensor,
    rows: usize,
    cols: usize,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn load(
        ws: &Weights,
        name: &str,
        rows: usize,
        cols: usize,
        bias: bool,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let mut w = ws.get(&format!("{name}.weight"), &[rows, cols])?;
        if let Some(dt) = opts.dtype {
            w = w.converted(dt)?;
        }
        let bias = if bias {
            Some(ws.get(&format!("{name}.bias"), &[rows])?.to_f32_vec())
        } else {
            None
        };
        Ok(Linear {
            w,
            rows,
            cols,
            bias,
        })
    }

    /// `y[n, rows] = x[n, cols] W^T + b`.
    fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        kernels::matmul(self.w.data(), self.rows, self.cols, x, n, y);
        self.add_bias(y);
    }

    /// [`Linear::forward`] of several linears over the same input (q/k/v, gate/up): for one
    /// token, one fused matrix-vector product so the threads meet once for all of them.
    fn forward_fused<const N: usize>(ls: [&Linear; N], x: &[f32], n: usize, ys: [&mut [f32]; N]) {
        if n != 1 {
            for (l, y) in ls.iter().zip(ys) {
                l.forward(x, n, y);
            }
            return;
        }
        let cols = ls[0].cols;
        debug_assert!(ls.iter().all(|l| l.cols == cols));
        let mut i = 0;
        let mut jobs = ys.map(|y| {
            i += 1;
            kernels::GemvJob {
                w: ls[i - 1].w.data(),
                y,
            }
        });
        kernels::gemv_many(&mut jobs, cols, x);
        for (j, l) in jobs.into_iter().zip(ls) {
            l.add_bias(j.y);
        }
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.rows) {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }

    fn bytes(&self) -> u64 {
        (self.w.size_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)) as u64
    }
}

struct Layer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// A loaded decoder.
pub struct Model {
    config: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when the LM head is tied to the embedding table.
    lm_head: Option<Tensor>,
    rope: Rope,
}

/// Prefixes under which checkpoints keep the language model's tensors: plain Llama/Qwen2,
/// SmolVLM (Idefics3), Qwen2-VL (newer layout), LLaVA; each with its LM head's name.
pub const PREFIXES: &[(&str, &str)] = &[
    ("model.", "lm_head.weight"),
    ("model.text_model.", "lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
];

impl Model {
    /// Loads `dir/config.json` and the safetensors weights in `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = Config::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        Self::from_weights(config, &weights, opts)
    }

    /// Builds the model from opened weights, layer by layer; every missing or misshapen
    /// tensor is an error naming it and its file.
    pub fn from_weights(config: Config, ws: &Weights, opts: &LoadOptions) -> Result<Self> {
        let c = &config.model;
        let (prefix, head_name) = PREFIXES
            .iter()
            .find(|(p, _)| ws.contains(&format!("{p}embed_tokens.weight")))
            .copied()
            .unwrap_or(PREFIXES[0]);
        let h = c.hidden_size;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let mut embed = ws.get(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
        if let Some(dt) = opts.dtype {
            embed = embed.converted(dt)?;
        }
        let norm_vec = |name: String| -> Result<Vec<f32>> { Ok(ws.get(&name, &[h])?.to_f32_vec()) };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("{prefix}layers.{i}");
            let b = c.attention_bias;
            layers.push(Layer {
                input_norm: norm_vec(format!("{p}.input_layernorm.weight"))?,
                q: Linear::load(ws, &format!("{p}.self_attn.q_proj"), qd, h, b, opts)?,
                k: Linear::load(ws, &format!("{p}.self_attn.k_proj"), kvd, h, b, opts)?,
                v: Linear::load(ws, &format!("{p}.self_attn.v_proj"), kvd, h, b, opts)?,
                o: Linear::load(ws, &format!("{p}.self_attn.o_proj"), h, qd, false, opts)?,
                post_norm: norm_vec(format!("{p}.post_attention_layernorm.weight"))?,
                gate: Linear::load(
                    ws,
                    &format!("{p}.mlp.gate_proj"),
                    c.intermediate_size,
                    h,
                    false,
                    opts,
                )?,
                up: Linear::load(
                    ws,
                    &format!("{p}.mlp.up_proj"),
                    c.intermediate_size,
                    h,
                    false,
                    opts,
                )?,
                down: Linear::load(
                    ws,
                    &format!("{p}.mlp.down_proj"),
                    h,
                    c.intermediate_size,
                    false,
                    opts,
                )?,
            });
        }
        let norm = norm_vec(format!("{prefix}norm.weight"))?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let mut t = ws.get(head_name, &[c.vocab_size, h])?;
            if let Some(dt) = opts.dtype {
                t = t.converted(dt)?;
            }
            Some(t)
        };
        let rope = Rope::new(c);
        tracing::debug!(layers = layers.len(), prefix, dtype = %embed.dtype(), "decoder loaded");
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The KV cache shape this model needs.
    pub fn cache_shape(&self) -> CacheShape {
        CacheShape::of(&self.config.model)
    }

    pub fn vocab_size(&self) -> usize {
        self.config.model.vocab_size
    }

    pub fn hidden_size(&self) -> usize {
        self.config.model.hidden_size
    }

    /// Type the weight matrices are held in.
    pub fn weight_dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Weight bytes one decode step reads: every layer matrix, norms, and the LM head (the
    /// embedding table when tied); one embedding row is negligible and not counted.
    pub fn weight_bytes_read_per_token(&self) -> u64 {
        let h = self.config.model.hidden_size as u64;
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| l.linears().iter().map(|x| x.bytes()).sum::<u64>() + 2 * h * 4)
            .sum();
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).size_bytes() as u64;
        layers + head + h * 4
    }

    /// Embeddings of `ids` as f32 `[ids.len(), hidden]` (what the vision path splices text
    /// around).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden_size();
        let v = self.vocab_size();
        let mut out = vec![0f32; ids.len() * h];
        let data = self.embed.data();
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= v {
                return Err(DecoderError::Input(format!(
                    "token id {id} out of range (vocab {v})"
                )));
            }
            data.to_f32_into(id as usize * h, &mut out[i * h..(i + 1) * h]);
        }
        Ok(out)
    }

    /// Runs the inputs, in order, after what the cache holds; positions continue from
    /// `cache.next_position()`. Returns the last token's logits.
    pub fn forward<C: KvStore>(&self, inputs: &[Input<'_>], cache: &mut C) -> Result<Logits> {
        self.forward_with(inputs, cache, LogitsMode::Last)
    }

    /// [`Model::forward`] returning the logits of every input token or only the last.
    ///
    /// The pass runs on a thread of the rayon pool (the calling thread waits once), so the
    /// parallel kernels inside it, a few hundred per decoded token, share their work with
    /// the pool's other threads directly instead of each waking the calling thread.
    pub fn forward_with<C: KvStore>(
        &self,
        inputs: &[Input<'_>],
        cache: &mut C,
        mode: LogitsMode,
    ) -> Result<Logits> {
        if rayon::current_thread_index().is_some() {
            self.forward_on_pool(inputs, cache, mode)
        } else {
            rayon::scope(|_| self.forward_on_pool(inputs, cache, mode))
        }
    }

    fn forward_on_pool<C: KvStore>(
        &self,
        inputs: &[Input<'_>],
        cache: &mut C,
        mode: LogitsMode,
    ) -> Result<Logits> {
        let h = self.hidden_size();
        if cache.shape() != self.cache_shape() {
            return Err(DecoderError::Input(format!(
                "KV cache shape {:?} does not match the model's {:?}",
                cache.shape(),
                self.cache_shape()
            )));
        }
        // Validate every span before touching the cache.
        let total: usize = inputs.iter().map(Input::len).sum();
        if total == 0 {
            return Err(DecoderError::Input("no tokens to run".into()));
        }
        for (i, inp) in inputs.iter().enumerate() {
            match inp {
                Input::Text { ids } => {
                    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size()) {
                        return Err(DecoderError::Input(format!(
                            "span {i}: token id {bad} out of range (vocab {})",
                            self.vocab_size()
                        )));
                    }
                }
                Input::Embeddings {
                    data,
                    n,
                    kind,
                    frame,
                } => {
                    if data.len() != n * h {
                        return Err(DecoderError::Input(format!(
                            "span {i}: {} embedding values for {n} tokens of hidden size {h}",
                            data.len()
                        )));
                    }
                    if *kind == TokenKind::Frame && frame.is_none() {
                        return Err(DecoderError::Input(format!(
                            "span {i}: frame embeddings need a frame id"
                        )));
                    }
                }
            }
        }

        let mut hidden_rows: Vec<f32> = Vec::new();
        let mut last_hidden = vec![0f32; h];
        for inp in inputs.iter().filter(|i| !i.is_empty()) {
            let n = inp.len();
            let (mut x, kind, frame) = match inp {
                Input::Text { ids } => (self.embed(ids)?, TokenKind::Text, None),
                Input::Embeddings {
                    data, kind, frame, ..
                } => (data.to_vec(), *kind, *frame),
            };
            let start = cache.next_position();
            let positions: Vec<u32> = (0..n as u32).map(|i| start + i).collect();
            let span = cache.append_span(kind, &positions, frame)?;
            if let Err(e) = self.run_layers(&mut x, n, &positions, &span, cache) {
                // Leave the cache as it was before this span.
                let _ = cache.truncate_last(n);
                return Err(e);
            }
            if mode == LogitsMode::All {
                hidden_rows.extend_from_slice(&x);
            }
            last_hidden.copy_from_slice(&x[(n - 1) * h..]);
        }
        let (rows, hidden) = match mode {
            LogitsMode::All => (total, hidden_rows),
            LogitsMode::Last => (1, last_hidden),
        };
        let mut normed = vec![0f32; hidden.len()];
        kernels::rms_norm(
            &hidden,
            &self.norm,
            self.config.model.rms_norm_eps as f32,
            &mut normed,
        );
        let vocab = self.vocab_size();
        let mut data = vec![0f32; rows * vocab];
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        kernels::matmul(head.data(), vocab, h, &normed, rows, &mut data);
        Ok(Logits { data, rows, vocab })
    }

    fn run_layers<C: KvStore>(
        &self,
        x: &mut [f32],
        n: usize,
        positions: &[u32],
        span: &C::Span,
        cache: &mut C,
    ) -> Result<()> {
        let c = &self.config.model;
        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let inter = c.intermediate_size;
        let mut xn = vec![0f32; n * h];
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut tmp = vec![0f32; n * h];
        let mut gate = vec![0f32; n * inter];
        let mut up = vec![0f32; n * inter];
        let mut salience = cache
            .wants_salience(span)
            .then(|| (Salience::new(n), Vec::with_capacity(self.layers.len())));
        for (li, l) in self.layers.iter().enumerate() {
            kernels::rms_norm(x, &l.input_norm, eps, &mut xn);
            Linear::forward_fused([&l.q, &l.k, &l.v], &xn, n, [&mut q, &mut k, &mut v]);
            self.rope.apply(&mut q, c.num_attention_heads, positions);
            self.rope.apply(&mut k, c.num_key_value_heads, positions);
            if let Some((s, kv)) = salience.as_mut() {
                s.add_layer(
                    &q,
                    &k,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                );
                kv.push((k.clone(), v.clone()));
            }
            cache.write(li, span, &k, &v)?;
            cache.attend(li, span, &q, &mut att)?;
            l.o.forward(&att, n, &mut tmp);
            add_in_place(x, &tmp);
            kernels::rms_norm(x, &l.post_norm, eps, &mut xn);
            Linear::forward_fused([&l.gate, &l.up], &xn, n, [&mut gate, &mut up]);
            kernels::swiglu(&mut gate, &up);
            l.down.forward(&gate, n, &mut tmp);
            add_in_place(x, &tmp);
        }
        if let Some((s, kv)) = salience {
            cache.settle(span, &s.scores(), &kv)?;
        }
        Ok(())
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
