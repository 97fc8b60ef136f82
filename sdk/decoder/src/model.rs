//! The Llama / Mistral / Qwen2 decoder: weights loaded layer by layer, and a forward pass
//! over spans of text tokens and injected embeddings that writes and attends through a
//! [`KvStore`] (the mixed KV cache in production).

use crate::arch::{self, Activations, DecoderWeights, LayerOps, Linear, TensorOps, WeightSink};
use crate::config::Config;
use crate::error::{DecoderError, Result};
use crate::kernels::{self, Rope};
use crate::kv::CacheShape;
use crate::kv::KvStore;
use crate::profile::{self, Phase};
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

/// What [`describe_weights`] reads of a backend's weight matrix: its weight-only format
/// (INT8 / INT4 and group) when quantized, and the type it is stored in.
pub trait MatrixFormat {
    fn quant_format(&self) -> Option<jetvlm_quant::WeightFormat>;
    fn dtype(&self) -> DType;
}

impl MatrixFormat for Tensor {
    fn quant_format(&self) -> Option<jetvlm_quant::WeightFormat> {
        Tensor::quant_format(self)
    }
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }
}

/// A decoder's weights in a few words, for any backend's matrices (one definition: the CPU
/// [`Model`] and the device decoder print this): the stored type (`bf16`), or for a quantized
/// decoder (`jetvlm quantize`, converted GGUF/AWQ/GPTQ) the layers' format, each matrix held
/// in another format with the number of layers holding it so, the LM head's format and the
/// embedding table's (`int4 g32 + v_proj int8 g32 in 30 layers, LM head tied, embeddings
/// int8 g32`).
pub fn describe_weights<W: MatrixFormat, V>(w: &DecoderWeights<W, V>) -> String {
    let Some(f) = w.layers.first().and_then(|l| l.q.w.quant_format()) else {
        return w.dtype.to_string();
    };
    let format_of = |m: &W| match m.quant_format() {
        Some(g) => format!("int{} g{}", g.bits(), g.group()),
        None => m.dtype().to_string(),
    };
    let head = w.lm_head.as_ref().map_or_else(|| "tied".into(), format_of);
    // Per-matrix formats (quantization_config.overrides): matrices held in another format
    // than the first layer's query are listed with how many layers hold them so.
    let mut other: Vec<(String, &str, usize)> = Vec::new();
    for l in &w.layers {
        for (name, m) in [
            ("q_proj", &l.q),
            ("k_proj", &l.k),
            ("v_proj", &l.v),
            ("o_proj", &l.o),
            ("gate_proj", &l.gate),
            ("up_proj", &l.up),
            ("down_proj", &l.down),
        ] {
            let Some(g) = m.w.quant_format() else {
                continue;
            };
            if (g.bits(), g.group()) == (f.bits(), f.group()) {
                continue;
            }
            let label = format!("int{} g{}", g.bits(), g.group());
            match other.iter_mut().find(|(l, n, _)| *l == label && *n == name) {
                Some(entry) => entry.2 += 1,
                None => other.push((label, name, 1)),
            }
        }
    }
    let others: String = other
        .iter()
        .map(|(label, name, count)| format!(" + {name} {label} in {count} layers"))
        .collect();
    format!(
        "int{} g{}{others}, LM head {head}, embeddings {}",
        f.bits(),
        f.group(),
        format_of(&w.embed)
    )
}

/// One span of forward input. Each span becomes one `append_span` in the cache, tagged with
/// its kind (text tokens FP16, frame tokens quantized under the mixed policy).
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Token ids, embedded by the model's embedding table.
    Text { ids: &'a [u32] },
    /// Precomputed embeddings `[n, hidden]` row-major (vision-encoder output projected to
    /// the decoder's hidden size). `frame` is required for `TokenKind::Frame`. `deepstack`:
    /// a DeepStack frame's extra features `[deepstack_layers, n, hidden]` (empty otherwise).
    Embeddings {
        data: &'a [f32],
        n: usize,
        kind: TokenKind,
        frame: Option<FrameId>,
        deepstack: &'a [f32],
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
            deepstack: &[],
        }
    }

    /// This frame with its DeepStack features `[deepstack_layers, n, hidden]` (what the
    /// vision encoder's `deepstack_embeds` output gave for it); an empty slice leaves it
    /// without. Other inputs are returned unchanged.
    pub fn with_deepstack(self, features: &'a [f32]) -> Self {
        match self {
            Input::Embeddings {
                data,
                n,
                kind,
                frame,
                ..
            } => Input::Embeddings {
                data,
                n,
                kind,
                frame,
                deepstack: features,
            },
            other => other,
        }
    }

    /// Embeddings cached as text tokens.
    pub fn embeddings(data: &'a [f32], n: usize) -> Self {
        Input::Embeddings {
            data,
            n,
            kind: TokenKind::Text,
            frame: None,
            deepstack: &[],
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

/// A loaded decoder: the architecture's weights ([`crate::arch`]) as CPU tensors.
pub struct Model {
    config: Config,
    weights: DecoderWeights<Tensor, Vec<f32>>,
    rope: Rope,
    /// Gemma 3's local layers' RoPE (their own base, no scaling).
    rope_local: Option<Rope>,
}

pub use crate::arch::PREFIXES;

/// The CPU's weights: matrices stay in their stored type (memory-mapped unless converted),
/// vectors become f32.
struct CpuSink;

impl WeightSink for CpuSink {
    type W = Tensor;
    type V = Vec<f32>;
    type Error = DecoderError;
    const RUNS_GEMMA3: bool = true;
    fn matrix(&mut self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    /// Norms and biases are small: a NaN or infinity in one is an error naming it at load.
    fn vector(&mut self, t: &Tensor) -> Result<Vec<f32>> {
        let v = t.to_f32_vec();
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            return Err(DecoderError::NonFiniteWeight {
                name: t.name().to_string(),
                path: t.path().to_path_buf(),
                index,
                value: v[index],
            });
        }
        Ok(v)
    }
}

impl Model {
    /// Loads `dir/config.json` and the safetensors weights in `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = Config::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        crate::quantize::check_declared_quantization(&config, &weights)?;
        Self::from_weights(config, &weights, opts)
    }

    /// Builds the model from opened weights, layer by layer ([`crate::arch::load`]); every
    /// missing or misshapen tensor is an error naming it and its file.
    pub fn from_weights(config: Config, ws: &Weights, opts: &LoadOptions) -> Result<Self> {
        let mut weights = arch::load(&config.model, ws, opts.dtype, &mut CpuSink)?;
        // The matrices a decode step streams move into huge pages (one copy); where the
        // AVX-512 VNNI decode kernel runs, quantized ones in the layout it reads
        // (`QuantData::banded`).
        crate::weights::hold_in_huge_pages(
            weights.streamed_mut(),
            crate::qkernels::Kernel::picked() == crate::qkernels::Kernel::Vnni,
        );
        let rope = Rope::new(&config.model);
        let rope_local = arch::local_rope_config(&config.model).map(|c| Rope::new(&c));
        Ok(Model {
            config,
            weights,
            rope,
            rope_local,
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
        self.weights.dtype
    }

    /// The weights in a few words ([`describe_weights`]: `bf16`, or
    /// `int4 g64 + v_proj int8 g64 in 30 layers, LM head int8 g64, embeddings bf16`).
    pub fn weight_description(&self) -> String {
        describe_weights(&self.weights)
    }

    /// Weight bytes one decode step reads: every layer matrix, norms, and the LM head (the
    /// embedding table when tied); one embedding row is negligible and not counted.
    pub fn weight_bytes_read_per_token(&self) -> u64 {
        self.weights.bytes_per_token
    }

    /// Bytes of every weight buffer the model holds, measured on the buffers: matrices as
    /// stored (quantized: codes, scales, zeros), the embedding table, the LM head, and the
    /// f32 norms and biases. What `jetvlm plan` charges for the weights.
    pub fn weight_bytes_held(&self) -> u64 {
        let w = &self.weights;
        let vec = |v: &Vec<f32>| 4 * v.len();
        let mut n = w.embed.held_bytes() + w.lm_head.as_ref().map_or(0, Tensor::held_bytes);
        n += vec(&w.norm);
        for l in &w.layers {
            n += vec(&l.input_norm) + vec(&l.post_norm);
            n += l.out_norms.as_ref().map_or(0, |[a, m]| vec(a) + vec(m));
            n += l.q_norm.as_ref().map_or(0, vec) + l.k_norm.as_ref().map_or(0, vec);
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                n += lin.w.held_bytes() + lin.bias.as_ref().map_or(0, vec);
            }
        }
        n as u64
    }

    /// Embeddings of `ids` as f32 `[ids.len(), hidden]` (what the vision path splices text
    /// around).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden_size();
        let v = self.vocab_size();
        let mut out = vec![0f32; ids.len() * h];
        let data = self.weights.embed.data();
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= v {
                return Err(DecoderError::Input(format!(
                    "token id {id} out of range (vocab {v})"
                )));
            }
            data.to_f32_into(id as usize * h, &mut out[i * h..(i + 1) * h]);
        }
        // Gemma scales its token embeddings by sqrt(hidden), the factor and the product in
        // the table's type; frame embeddings are not scaled.
        if let Some((scale, dt)) = arch::embedding_scale(&self.config.model, self.weights.dtype) {
            out.iter_mut().for_each(|x| *x = round_to(dt, *x * scale));
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
    /// the pool's other threads directly instead of each waking the calling thread. A
    /// single-token pass (a decode step) holds the pool's other threads as a team for its
    /// length (`jetvlm_core::par::with_team`): they wait for each product and attention by
    /// spinning instead of returning to the pool between them.
    pub fn forward_with<C: KvStore>(
        &self,
        inputs: &[Input<'_>],
        cache: &mut C,
        mode: LogitsMode,
    ) -> Result<Logits> {
        let one = inputs.iter().map(Input::len).sum::<usize>() == 1;
        let mut run = || {
            if one {
                jetvlm_core::par::with_team(|| self.forward_on_pool(inputs, cache, mode))
            } else {
                self.forward_on_pool(inputs, cache, mode)
            }
        };
        if rayon::current_thread_index().is_some() {
            run()
        } else {
            rayon::scope(|_| run())
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
                    deepstack,
                } => {
                    if data.len() != n * h {
                        return Err(DecoderError::Input(format!(
                            "span {i}: {} embedding values for {n} tokens of hidden size {h}",
                            data.len()
                        )));
                    }
                    // A DeepStack model's frame needs its features (without them its
                    // answer would silently differ); anything else must not carry any.
                    let layers = self.config.model.deepstack_layers;
                    let want = if *kind == TokenKind::Frame { layers } else { 0 };
                    let per_layer = n * h;
                    if deepstack.len() != want * per_layer {
                        return Err(DecoderError::Input(format!(
                            "span {i}: {} DeepStack values for a {kind:?} span of {n} tokens; \
                             the model takes {want} x {n} x {h} (deepstack_layers {layers} of \
                             the decoder's config.json, for frames)",
                            deepstack.len()
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

        let c = &self.config.model;
        let mut hidden_rows: Vec<f32> = Vec::new();
        let mut last_hidden = vec![0f32; h];
        for inp in inputs.iter().filter(|i| !i.is_empty()) {
            let n = inp.len();
            let (x, kind, frame, deepstack) = match inp {
                Input::Text { ids } => (self.embed(ids)?, TokenKind::Text, None, &[][..]),
                Input::Embeddings {
                    data,
                    kind,
                    frame,
                    deepstack,
                    ..
                } => (data.to_vec(), *kind, *frame, *deepstack),
            };
            // Checked above: `deepstack_layers` sets of `n * h` values, or none.
            let deepstack: Vec<Vec<f32>> =
                deepstack.chunks_exact(n * h).map(<[f32]>::to_vec).collect();
            let pos = arch::span_positions(c, kind, cache.next_position(), n)?;
            let span = cache.append_span(kind, &pos.cache, frame)?;
            let mut acts = Activations::new(c, n, x, |len| Ok::<_, DecoderError>(vec![0f32; len]))?;
            let salience = cache
                .wants_salience(&span)
                .then(|| (Salience::new(n), Vec::with_capacity(c.num_hidden_layers)));
            let mut ops = CpuOps {
                c,
                rope: &self.rope,
                rope_local: self.rope_local.as_ref(),
                kind,
                positions: &pos.cache,
                mrope: pos.mrope.as_deref(),
                span: &span,
                cache,
                salience,
            };
            let run = arch::run_layers_with_deepstack(
                &mut ops,
                c,
                &self.weights.layers,
                &mut acts,
                n,
                &deepstack,
            )
            .and_then(|()| ops.settle());
            if let Err(e) = run {
                // Leave the cache as it was before this span.
                let _ = cache.truncate_last(n);
                return Err(self.blame_non_finite(e));
            }
            if mode == LogitsMode::All {
                hidden_rows.extend_from_slice(&acts.x);
            }
            last_hidden.copy_from_slice(&acts.x[(n - 1) * h..]);
        }
        let (rows, hidden) = match mode {
            LogitsMode::All => (total, hidden_rows),
            LogitsMode::Last => (1, last_hidden),
        };
        let mut clock = profile::Clock::new(total == 1);
        let vocab = self.vocab_size();
        let mut normed = vec![0f32; hidden.len()];
        let mut data = vec![0f32; rows * vocab];
        arch::final_logits(
            &mut HeadOps,
            c,
            &self.weights,
            &hidden,
            rows,
            &mut normed,
            &mut data,
        )?;
        if !kernels::all_finite(&data) {
            return Err(self.blame_non_finite(DecoderError::NonFiniteOutput { what: "logits" }));
        }
        clock.lap(Phase::Head);
        clock.step();
        Ok(Logits { data, rows, vocab })
    }

    /// The matrix whose NaN or infinity made a forward pass fail with `e` (a non-finite K/V
    /// the cache refused, or non-finite logits), named by its checkpoint name; `e` itself
    /// when no weight is at fault or `e` is another error. Norms and biases were checked at
    /// load; the matrices are scanned only here, after a failure, so loading stays as fast
    /// as mapping the file.
    fn blame_non_finite(&self, e: DecoderError) -> DecoderError {
        let non_finite = matches!(
            e,
            DecoderError::NonFiniteOutput { .. }
                | DecoderError::Kv(jetvlm_kvcache::KvError::NonFinite { .. })
        );
        if !non_finite {
            return e;
        }
        let w = &self.weights;
        let layers = w
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].map(|lin| &lin.w));
        std::iter::once(&w.embed)
            .chain(layers)
            .chain(w.lm_head.as_ref())
            .find_map(|t| t.check_finite().err())
            .unwrap_or(e)
    }
}

/// `x` rounded to `dtype` (f16, bf16) and back; f32 unchanged.
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// The CPU operations of a forward step over a [`KvStore`]: the kernels of
/// [`crate::kernels`] on `Vec<f32>` activations.
struct CpuOps<'s, C: KvStore> {
    c: &'s jetvlm_core::hf::ModelConfig,
    rope: &'s Rope,
    rope_local: Option<&'s Rope>,
    /// Kind of the step's span (Gemma 3's frames attend within themselves both ways).
    kind: TokenKind,
    positions: &'s [u32],
    /// M-RoPE positions of a frame span (see [`arch::span_positions`]).
    mrope: Option<&'s [[u32; 3]]>,
    span: &'s C::Span,
    cache: &'s mut C,
    /// Salience of a frame whose precision waits for it, and each layer's K/V as written.
    salience: Option<(Salience, Vec<LayerKv>)>,
}

/// One layer's keys and values of a step, as written.
type LayerKv = (Vec<f32>, Vec<f32>);

impl<C: KvStore> CpuOps<'_, C> {
    /// Places a span that waited for its salience.
    fn settle(&mut self) -> Result<()> {
        if let Some((s, kv)) = self.salience.take() {
            self.cache.settle(self.span, &s.scores(), &kv)?;
        }
        Ok(())
    }
}

/// The CPU's [`TensorOps`]: the kernels of [`crate::kernels`] on `Vec<f32>` activations
/// (one definition for [`CpuOps`] and [`HeadOps`]).
macro_rules! cpu_kernels {
    () => {
        fn rms_norm(
            &mut self,
            out: &mut Vec<f32>,
            x: &Vec<f32>,
            w: &Vec<f32>,
            n: usize,
            eps: f32,
        ) -> Result<()> {
            let d = w.len();
            kernels::rms_norm(&x[..n * d], w, eps, &mut out[..n * d]);
            Ok(())
        }
        fn matmul(
            &mut self,
            w: &Tensor,
            rows: usize,
            cols: usize,
            x: &Vec<f32>,
            n: usize,
            y: &mut Vec<f32>,
        ) -> Result<()> {
            kernels::matmul(w.data(), rows, cols, &x[..n * cols], n, &mut y[..n * rows]);
            Ok(())
        }
        fn bias_add(
            &mut self,
            y: &mut Vec<f32>,
            b: &Vec<f32>,
            rows: usize,
            n: usize,
        ) -> Result<()> {
            for row in y[..n * rows].chunks_exact_mut(rows) {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
            Ok(())
        }
        fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
            for (a, b) in x[..len].iter_mut().zip(&y[..len]) {
                *a += b;
            }
            Ok(())
        }
        fn swiglu(
            &mut self,
            out: &mut Vec<f32>,
            gate: &Vec<f32>,
            up: &Vec<f32>,
            len: usize,
        ) -> Result<()> {
            kernels::swiglu(&gate[..len], &up[..len], &mut out[..len]);
            Ok(())
        }
        fn geglu(
            &mut self,
            out: &mut Vec<f32>,
            gate: &Vec<f32>,
            up: &Vec<f32>,
            len: usize,
        ) -> Result<()> {
            kernels::geglu(&gate[..len], &up[..len], &mut out[..len]);
            Ok(())
        }
        fn softcap(&mut self, x: &mut Vec<f32>, len: usize, cap: f32) -> Result<()> {
            kernels::softcap(&mut x[..len], cap);
            Ok(())
        }
    };
}

impl<C: KvStore> TensorOps for CpuOps<'_, C> {
    type W = Tensor;
    type V = Vec<f32>;
    type Act = Vec<f32>;
    type Error = DecoderError;

    cpu_kernels!();

    /// One token: one fused matrix-vector product over all the linears, so the threads meet
    /// once for all of them.
    fn linears<const N: usize>(
        &mut self,
        ls: [&Linear<Tensor, Vec<f32>>; N],
        x: &Vec<f32>,
        n: usize,
        ys: [&mut Vec<f32>; N],
    ) -> Result<()> {
        if n != 1 {
            for (l, y) in ls.into_iter().zip(ys) {
                self.linear(l, x, n, y)?;
            }
            return Ok(());
        }
        let cols = ls[0].cols;
        let mut i = 0;
        let mut jobs = ys.map(|y| {
            i += 1;
            kernels::GemvJob {
                w: ls[i - 1].w.data(),
                y: &mut y[..ls[i - 1].rows],
            }
        });
        kernels::gemv_many(&mut jobs, cols, &x[..cols]);
        for (j, l) in jobs.into_iter().zip(ls) {
            if let Some(b) = &l.bias {
                for (o, bv) in j.y.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
        Ok(())
    }
}

impl<C: KvStore> LayerOps for CpuOps<'_, C> {
    const TIMED: bool = true;

    fn rope(&mut self, x: &mut Vec<f32>, heads: usize, n: usize) -> Result<()> {
        let d = self.c.head_dim;
        match self.mrope {
            Some(m) => self.rope.apply_mrope(&mut x[..n * heads * d], heads, m),
            None => self
                .rope
                .apply(&mut x[..n * heads * d], heads, self.positions),
        }
        Ok(())
    }

    fn rope_local(&mut self, x: &mut Vec<f32>, heads: usize, n: usize) -> Result<()> {
        let d = self.c.head_dim;
        let rope = self.rope_local.ok_or_else(|| {
            DecoderError::Input("a local-layer RoPE without Gemma 3's local base".into())
        })?;
        rope.apply(&mut x[..n * heads * d], heads, self.positions);
        Ok(())
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        n: usize,
    ) -> Result<()> {
        self.attention_masked(layer, q, k, v, out, n, arch::AttendMask::default())
    }

    /// `whole_span` applies to frame spans only: text stays causal.
    fn attention_masked(
        &mut self,
        layer: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &mut Vec<f32>,
        n: usize,
        mask: arch::AttendMask,
    ) -> Result<()> {
        let mask = arch::AttendMask {
            whole_span: mask.whole_span && self.kind == TokenKind::Frame,
            ..mask
        };
        let c = self.c;
        // The buffers may be longer than the step's rows (q/k norms swap in a wider one).
        let (qd, kvd) = (
            n * c.num_attention_heads * c.head_dim,
            n * c.num_key_value_heads * c.head_dim,
        );
        let (q, k, v) = (&q[..qd], &k[..kvd], &v[..kvd]);
        let out = &mut out[..qd];
        if let Some((s, kv)) = self.salience.as_mut() {
            s.add_layer(
                q,
                k,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            );
            kv.push((k.to_vec(), v.to_vec()));
        }
        self.cache.write(layer, self.span, k, v)?;
        self.cache.attend_masked(layer, self.span, q, out, mask)
    }
}

/// The CPU kernels without a KV cache: the final norm and LM head.
struct HeadOps;

impl TensorOps for HeadOps {
    type W = Tensor;
    type V = Vec<f32>;
    type Act = Vec<f32>;
    type Error = DecoderError;

    cpu_kernels!();
}
