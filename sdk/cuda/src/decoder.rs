//! The decoder on a device: the architecture of [`jetvlm_decoder::arch`] (tensor names,
//! layer recipe) over a [`Gpu`]'s operations. Weights are read from the Hugging Face files and
//! uploaded in their stored precision (f32, f16 or bf16, or the weight-only INT8/INT4 layout of
//! `jetvlm quantize`); the forward pass runs spans of token ids or embeddings at the positions
//! of [`arch::span_positions`] (M-RoPE frames at their temporal, row and column positions), writes K/V into the device mixed KV pools (FP16 text blocks, quantized
//! frame blocks, placed by [`KvBlockTable`]) and attends over them with the fused attention
//! kernel. Every family of the architecture runs here: Qwen3-VL frames carry their DeepStack
//! features ([`DeviceInput::Embeddings`]), Gemma 3's local layers attend within their window
//! and a frame's tokens see each other both ways (one attention plan per layout and mask).
//!
//! Written once for every [`Gpu`]: on [`crate::CudaDevice`] the operations are CUDA kernels,
//! on [`crate::SimDevice`] their CPU twins, so everything here runs in the tests of a machine
//! without a GPU.
//!
//! Matrix products are the `gemv` kernels (up to 8 tokens share each weight read), so decode
//! and prefill run the same code, except quantized matrices, which prefill with a tiled GEMM;
//! prefill runs in chunks of [`PREFILL_CHUNK`] tokens.

use std::path::Path;

use jetvlm_core::{DType, FrameId, TokenKind};
use jetvlm_decoder::arch::{
    self, Activations, AttendMask, DecoderWeights, LayerOps, TensorOps, WeightSink,
};
use jetvlm_decoder::kernels::Rope;
use jetvlm_decoder::{Config, Tensor, Weights};
use jetvlm_quant::WeightFormat;

use crate::error::CudaError;
use crate::gpu::{Gpu, PoolMemory, PoolsInfo, Splits};
use crate::kvtable::{DevicePolicy, KvBlockTable, Placement};
use crate::layout::{BlockKind, KvLayout};

pub use crate::kvtable::PREFILL_CHUNK;

/// Wraps an error of the decoder crate (or one it converts from) on the model in `dir`,
/// keeping it as the source.
pub(crate) fn model_err<E: Into<jetvlm_decoder::DecoderError>>(
    dir: &Path,
) -> impl Fn(E) -> CudaError + '_ {
    move |e| CudaError::DecoderModel {
        path: dir.to_path_buf(),
        source: Box::new(e.into()),
    }
}

/// M-RoPE's frequency sections (temporal, row, column) and whether they interleave
/// (Qwen3-VL) or are contiguous (Qwen2-VL / Qwen2.5-VL).
#[derive(Clone, Copy, Debug)]
struct MRope {
    section: [usize; 3],
    interleaved: bool,
}

/// A decoder loaded onto a device.
pub struct DeviceDecoder<G: Gpu> {
    config: Config,
    weights: DecoderWeights<G::Weights, G::Weights>,
    inv_freq: G::Buf,
    /// Gemma 3: the local (sliding-window) layers' inverse frequencies (their own base).
    inv_freq_local: Option<G::Buf>,
    /// M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL): frame tokens rotate with `rope_mrope`.
    mrope_section: Option<MRope>,
    /// Gemma 3: token embeddings are scaled by `sqrt(hidden)`, rounded to the table's type.
    embed_scale: Option<(f32, DType)>,
    /// The weight-only format of the quantized matrices, if any.
    quant_format: Option<WeightFormat>,
    /// Device bytes of every uploaded weight.
    weight_bytes_held: u64,
}

impl<G: Gpu> std::fmt::Debug for DeviceDecoder<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceDecoder")
            .field("config", &self.config.path)
            .field("dtype", &self.weights.dtype)
            .finish()
    }
}

/// Uploads a checkpoint's tensors: matrices in their stored precision, vectors as f32; notes
/// the weight format of the first quantized matrix and counts the device bytes.
struct Upload<'d, G: Gpu>(&'d G, Option<WeightFormat>, u64);

impl<G: Gpu> WeightSink for Upload<'_, G> {
    type W = G::Weights;
    type V = G::Weights;
    type Error = CudaError;
    const RUNS_GEMMA3: bool = true;
    fn matrix(&mut self, t: &Tensor) -> Result<G::Weights, CudaError> {
        if self.1.is_none() {
            self.1 = t.quant_format();
        }
        let w = self.0.upload_tensor(t)?;
        self.2 += G::weights_bytes(&w) as u64;
        Ok(w)
    }
    fn vector(&mut self, t: &Tensor) -> Result<G::Weights, CudaError> {
        let w = self.0.upload_vector(&t.to_f32_vec())?;
        self.2 += G::weights_bytes(&w) as u64;
        Ok(w)
    }
}

impl<G: Gpu> DeviceDecoder<G> {
    /// Loads the decoder in `dir` (config.json + safetensors) onto `dev`.
    pub fn load(dev: &G, dir: &Path) -> Result<Self, CudaError> {
        let config = Config::from_dir(dir).map_err(model_err(dir))?;
        let ws = Weights::open(dir).map_err(model_err(dir))?;
        let mut sink = Upload(dev, None, 0);
        let weights = arch::load(&config.model, &ws, None, &mut sink).map_err(|e| match e {
            CudaError::Decoder(d) => model_err(dir)(d),
            e => e,
        })?;
        let (quant_format, weight_bytes_held) = (sink.1, sink.2);
        let inv_freq_of = |c: &jetvlm_core::hf::ModelConfig| {
            let inv: Vec<f32> = Rope::new(c).inv_freq().iter().map(|&f| f as f32).collect();
            dev.upload(&inv)
        };
        let inv_freq = inv_freq_of(&config.model)?;
        let inv_freq_local = match arch::local_rope_config(&config.model) {
            Some(local) => Some(inv_freq_of(&local)?),
            None => None,
        };
        dev.synchronize()?;
        let mrope_section = match config.model.rope_scaling {
            jetvlm_core::hf::RopeScaling::MRope {
                section,
                interleaved,
                ..
            } => Some(MRope {
                section,
                interleaved,
            }),
            _ => None,
        };
        let embed_scale = arch::embedding_scale(&config.model, weights.dtype);
        Ok(Self {
            config,
            weights,
            inv_freq,
            inv_freq_local,
            mrope_section,
            embed_scale,
            quant_format,
            weight_bytes_held,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn vocab_size(&self) -> usize {
        self.config.model.vocab_size
    }
    pub fn hidden_size(&self) -> usize {
        self.config.model.hidden_size
    }
    /// Stored type of the weight matrices (of the embedding table when the layers are
    /// quantized: see [`Self::quant_format`]).
    pub fn weight_dtype(&self) -> jetvlm_core::DType {
        self.weights.dtype
    }
    /// Bytes the uploaded weights occupy in device memory (what `jetvlm plan` charges for
    /// them).
    pub fn weight_bytes_held(&self) -> u64 {
        self.weight_bytes_held
    }
    /// The weight-only format (INT8 / INT4, group) of a quantized decoder's matrices.
    pub fn quant_format(&self) -> Option<WeightFormat> {
        self.quant_format
    }
    /// The weights in words, as the CPU decoder's `Model::weight_description` gives them
    /// ([`jetvlm_decoder::model::describe_weights`]): `f32`, or for a quantized decoder
    /// every matrix format (`int4 g32 + v_proj int8 g32 in 30 layers, LM head tied,
    /// embeddings int8 g32`).
    pub fn weights_name(&self) -> String {
        jetvlm_decoder::model::describe_weights(&self.weights)
    }
    /// Weight bytes one decode step reads (every matrix, norms, LM head).
    pub fn weight_bytes_read_per_token(&self) -> u64 {
        self.weights.bytes_per_token
    }
}

/// The device KV cache of one sequence: one pool set per layer and the shared block table.
///
/// With [`PoolMemory::MappedHost`] the layers' pools live in pinned host memory (the KV cache
/// offloaded): each forward step streams every layer's used blocks over PCIe into one of two
/// device staging pools on a copy queue, the copy of layer `l + 1` overlapping the compute
/// of layer `l`; new K/V are written both to the host pools and to the staging copy.
pub struct DeviceKvCache<G: Gpu> {
    table: KvBlockTable,
    // Before `layers`: fields drop in order, and the offload's queue waits, when dropped, for
    // the work that reads or writes the host pools in `layers`.
    offload: Option<Offload<G>>,
    layers: Vec<G::Pools>,
}

impl<G: Gpu> std::fmt::Debug for DeviceKvCache<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKvCache")
            .field("table", &self.table)
            .field("layers", &self.layers.len())
            .field("offload", &self.offload.is_some())
            .finish()
    }
}

struct Offload<G: Gpu> {
    staging: Vec<G::Pools>,
    queue: G::Queue,
    /// Bytes streamed host-to-device by the last forward step (all layers).
    step_bytes: u64,
}

impl<G: Gpu> DeviceKvCache<G> {
    /// Pools for `layers` layers holding up to `text_tokens` text and `frame_tokens` frame
    /// tokens appended in at most `spans` spans, in device or mapped host memory.
    pub fn new(
        dev: &G,
        policy: DevicePolicy,
        layers: usize,
        text_tokens: usize,
        frame_tokens: usize,
        spans: usize,
        memory: PoolMemory,
    ) -> Result<Self, CudaError> {
        let blocks = policy.blocks_for(text_tokens, frame_tokens, spans.max(1));
        Self::with_blocks(dev, policy, layers, blocks, memory)
    }

    /// Pools sized exactly for `spans` appended in order (see
    /// [`DevicePolicy::blocks_for_spans`]).
    pub fn for_spans(
        dev: &G,
        policy: DevicePolicy,
        layers: usize,
        spans: &[(TokenKind, usize)],
        memory: PoolMemory,
    ) -> Result<Self, CudaError> {
        let blocks = policy.blocks_for_spans(spans);
        Self::with_blocks(dev, policy, layers, blocks, memory)
    }

    /// Pools of exactly `(text blocks, frame blocks)` per layer (see
    /// [`DevicePolicy::blocks_for_session`]).
    pub fn with_blocks(
        dev: &G,
        policy: DevicePolicy,
        layers: usize,
        (tb, fb): (usize, usize),
        memory: PoolMemory,
    ) -> Result<Self, CudaError> {
        if !policy.layers.is_empty() && policy.layers.len() != layers {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: format!(
                    "the KV policy has formats for {} layers, the model has {layers}",
                    policy.layers.len()
                ),
            });
        }
        if memory == PoolMemory::MappedHost && policy.is_per_layer() {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: "offloading to host memory (--kv-offload host) streams every layer \
                          through staging pools of one format: use a policy with one frame \
                          format for every layer, not a calibration with several"
                    .into(),
            });
        }
        let pools = (0..layers)
            .map(|li| dev.kv_pools(policy.layout_of(li), tb, fb, memory))
            .collect::<Result<Vec<_>, _>>()?;
        let offload = match memory {
            PoolMemory::Device => None,
            PoolMemory::MappedHost => Some(Offload {
                staging: (0..2)
                    .map(|_| dev.kv_pools(policy.layout, tb, fb, PoolMemory::Device))
                    .collect::<Result<_, _>>()?,
                queue: dev.copy_queue()?,
                step_bytes: 0,
            }),
        };
        Ok(Self {
            table: KvBlockTable::new(policy, tb, fb),
            layers: pools,
            offload,
        })
    }

    /// Offloaded: bytes the last forward step streamed from host to device (all layers).
    pub fn streamed_bytes_last_step(&self) -> Option<u64> {
        self.offload.as_ref().map(|o| o.step_bytes)
    }

    pub fn table(&self) -> &KvBlockTable {
        &self.table
    }
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.table.len()
    }
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
    /// Layers the cache holds pools for.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }
    /// Bytes of all layers' pools.
    pub fn pool_bytes(&self) -> u64 {
        self.layers.iter().map(|p| p.bytes() as u64).sum()
    }
    /// Bytes one decode step's attention reads over all layers.
    pub fn attention_read_bytes(&self) -> u64 {
        self.table.attention_bytes(self.layers.len())
    }
    pub fn layer_pools(&self, layer: usize) -> Option<&G::Pools> {
        self.layers.get(layer)
    }
    /// Forgets every token.
    pub fn clear(&mut self) {
        self.table.clear();
    }
    /// Gives back the blocks of camera frame `frame` (appended with its id); later tokens
    /// keep their positions. Returns the tokens removed.
    pub fn evict_frame(&mut self, frame: FrameId) -> Result<usize, CudaError> {
        self.table.evict_frame(frame)
    }
    /// Drops the newest `n` text tokens (a question and its answer) and rewinds the
    /// positions to reuse theirs.
    pub fn truncate_last(&mut self, n: usize) -> Result<(), CudaError> {
        self.table.truncate_last(n)
    }
    /// RoPE position of the next token.
    pub fn next_position(&self) -> usize {
        self.table.next_position()
    }

    /// Appends `n` tokens of `kind` and writes their K/V (`[n][kv_heads][head_dim]` f32 per
    /// layer, produced by `kv(layer, k, v)`) into every layer.
    pub fn append_with<F>(
        &mut self,
        dev: &G,
        kind: TokenKind,
        n: usize,
        mut kv: F,
    ) -> Result<(), CudaError>
    where
        F: FnMut(usize, &mut G::Buf, &mut G::Buf) -> Result<(), CudaError>,
    {
        let row = self.table.policy().layout.row_elems();
        let mut k = dev.zeros(n * row)?;
        let mut v = dev.zeros(n * row)?;
        let placements = self.table.append(kind, n)?;
        for (li, pools) in self.layers.iter_mut().enumerate() {
            kv(li, &mut k, &mut v)?;
            write_placements(dev, pools, &placements, &k, &v)?;
        }
        Ok(())
    }
}

/// Writes the K/V rows of each placement into its block and slots.
fn write_placements<G: Gpu>(
    dev: &G,
    pools: &mut G::Pools,
    placements: &[Placement],
    k: &G::Buf,
    v: &G::Buf,
) -> Result<(), CudaError> {
    for p in placements {
        match p.kind {
            BlockKind::Text => {
                dev.kv_store_text(pools, p.block, p.tok_offset, p.len, k, v, p.src_token)?
            }
            BlockKind::Frame => {
                dev.kv_quantize_frame(pools, p.block, p.tok_offset, p.len, k, v, p.src_token)?
            }
        }
    }
    Ok(())
}

/// One span of forward input.
#[derive(Clone, Copy, Debug)]
pub enum DeviceInput<'a> {
    /// Token ids embedded by the model's table, cached as `kind`.
    Ids { ids: &'a [u32], kind: TokenKind },
    /// Embeddings `[n][hidden]` (e.g. a camera frame's projected vision features). With a
    /// `frame` id (frame tokens only) the tokens get blocks of their own, which
    /// [`DeviceKvCache::evict_frame`] gives back. `deepstack`: a DeepStack model's frame
    /// carries its extra visual features `[deepstack_layers][n][hidden]`, added to the
    /// hidden states after the first layers ([`arch::run_layers_with_deepstack`]); empty
    /// otherwise.
    Embeddings {
        data: &'a [f32],
        n: usize,
        kind: TokenKind,
        frame: Option<FrameId>,
        deepstack: &'a [f32],
    },
}

impl DeviceInput<'_> {
    pub fn len(&self) -> usize {
        match self {
            DeviceInput::Ids { ids, .. } => ids.len(),
            DeviceInput::Embeddings { n, .. } => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn kind(&self) -> TokenKind {
        match self {
            DeviceInput::Ids { kind, .. } | DeviceInput::Embeddings { kind, .. } => *kind,
        }
    }
    /// The camera frame these tokens belong to, if any.
    pub fn frame(&self) -> Option<FrameId> {
        match self {
            DeviceInput::Ids { .. } => None,
            DeviceInput::Embeddings { frame, .. } => *frame,
        }
    }
}

/// Activation buffers of a model's forward pass, for chunks of up to [`PREFILL_CHUNK`]
/// tokens. One set serves every session of that model in turn
/// ([`DeviceSession::with_scratch`], [`DeviceSession::into_parts`]), so a camera app does not
/// allocate them again for every frame and question.
pub struct DeviceScratch<G: Gpu> {
    /// The model dimensions the buffers are sized for: hidden, q heads x head dim, kv heads x
    /// head dim, intermediate, vocab.
    dims: [usize; 5],
    acts: Activations<G::Buf>,
    last: G::Buf,
    last_n: G::Buf,
    logits: G::Buf,
}

impl<G: Gpu> std::fmt::Debug for DeviceScratch<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceScratch")
            .field("dims", &self.dims)
            .finish()
    }
}

impl<G: Gpu> DeviceScratch<G> {
    /// Buffers for `model`'s forward pass.
    pub fn new(dev: &G, model: &DeviceDecoder<G>) -> Result<Self, CudaError> {
        let dims = scratch_dims(model);
        let [h, _, _, _, vocab] = dims;
        Ok(Self {
            dims,
            acts: Activations::new(
                &model.config.model,
                PREFILL_CHUNK,
                dev.zeros(PREFILL_CHUNK * h)?,
                |len| dev.zeros(len),
            )?,
            last: dev.zeros(h)?,
            last_n: dev.zeros(h)?,
            logits: dev.zeros(vocab)?,
        })
    }
}

fn scratch_dims<G: Gpu>(model: &DeviceDecoder<G>) -> [usize; 5] {
    let c = &model.config.model;
    [
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    ]
}

/// What [`DeviceSession::with_scratch`] gives back when the parts do not fit the model.
pub struct SessionParts<G: Gpu> {
    pub error: CudaError,
    pub cache: DeviceKvCache<G>,
    pub scratch: DeviceScratch<G>,
}

impl<G: Gpu> std::fmt::Debug for SessionParts<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionParts")
            .field("error", &self.error)
            .finish()
    }
}

/// A decoder and its KV cache on one device: the forward pass.
pub struct DeviceSession<'a, G: Gpu> {
    dev: &'a G,
    model: &'a DeviceDecoder<G>,
    cache: DeviceKvCache<G>,
    s: DeviceScratch<G>,
}

impl<G: Gpu> std::fmt::Debug for DeviceSession<'_, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSession")
            .field("cache", &self.cache)
            .finish()
    }
}

impl<'a, G: Gpu> DeviceSession<'a, G> {
    /// A session over `cache` (its shape must match the model), with buffers of its own.
    pub fn new(
        dev: &'a G,
        model: &'a DeviceDecoder<G>,
        cache: DeviceKvCache<G>,
    ) -> Result<Self, CudaError> {
        let scratch = DeviceScratch::new(dev, model)?;
        Self::with_scratch(dev, model, cache, scratch).map_err(|p| p.error)
    }

    /// A session over `cache` with `scratch` (made for this model, e.g. by an earlier
    /// session: [`Self::into_parts`]). Parts that do not fit the model come back with the
    /// error.
    pub fn with_scratch(
        dev: &'a G,
        model: &'a DeviceDecoder<G>,
        cache: DeviceKvCache<G>,
        scratch: DeviceScratch<G>,
    ) -> Result<Self, Box<SessionParts<G>>> {
        let c = &model.config.model;
        let l = cache.table.policy().layout;
        let error = if l.kv_heads != c.num_key_value_heads
            || l.head_dim != c.head_dim
            || cache.layers.len() != c.num_hidden_layers
        {
            Some(format!(
                "KV cache of {} layers x {} kv heads x {} does not match the model's {} x {} x {}",
                cache.layers.len(),
                l.kv_heads,
                l.head_dim,
                c.num_hidden_layers,
                c.num_key_value_heads,
                c.head_dim
            ))
        } else if scratch.dims != scratch_dims(model) {
            Some(format!(
                "activation buffers for dimensions {:?} do not match the model's {:?}",
                scratch.dims,
                scratch_dims(model)
            ))
        } else {
            None
        };
        if let Some(message) = error {
            return Err(Box::new(SessionParts {
                error: CudaError::Shape {
                    op: "device session",
                    message,
                },
                cache,
                scratch,
            }));
        }
        Ok(Self {
            dev,
            model,
            cache,
            s: scratch,
        })
    }

    /// Ends the session and hands its cache and buffers back (for the next session).
    pub fn into_parts(self) -> (DeviceKvCache<G>, DeviceScratch<G>) {
        (self.cache, self.s)
    }

    pub fn cache(&self) -> &DeviceKvCache<G> {
        &self.cache
    }
    pub fn cache_mut(&mut self) -> &mut DeviceKvCache<G> {
        &mut self.cache
    }
    pub fn model(&self) -> &DeviceDecoder<G> {
        self.model
    }

    /// Runs the inputs in order after what the cache holds and returns the last token's
    /// logits. Every span is validated before anything is written.
    pub fn forward(&mut self, inputs: &[DeviceInput<'_>]) -> Result<Vec<f32>, CudaError> {
        let c = &self.model.config.model;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let bad = |message: String| CudaError::Shape {
            op: "device forward",
            message,
        };
        let total: usize = inputs.iter().map(DeviceInput::len).sum();
        if total == 0 {
            return Err(bad("no tokens to run".into()));
        }
        for (i, inp) in inputs.iter().enumerate() {
            match inp {
                DeviceInput::Ids { ids, .. } => {
                    if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
                        return Err(bad(format!(
                            "span {i}: token id {id} out of range (vocab {vocab})"
                        )));
                    }
                }
                DeviceInput::Embeddings {
                    data,
                    n,
                    kind,
                    frame,
                    deepstack,
                } => {
                    if data.len() != n * h {
                        return Err(bad(format!(
                            "span {i}: {} embedding values for {n} tokens of hidden size {h}",
                            data.len()
                        )));
                    }
                    if frame.is_some() && *kind != TokenKind::Frame {
                        return Err(bad(format!("span {i}: a frame id on {kind:?} tokens")));
                    }
                    // A DeepStack model's frame needs its features (without them its answer
                    // would silently differ); anything else must not carry any.
                    let layers = c.deepstack_layers;
                    let want = if *kind == TokenKind::Frame { layers } else { 0 };
                    if Some(deepstack.len()) != want.checked_mul(n * h) {
                        return Err(bad(format!(
                            "span {i}: {} DeepStack values for a {kind:?} span of {n} tokens; \
                             the model takes {want} x {n} x {h} (deepstack_layers {layers} of \
                             the decoder's config.json, for frames)",
                            deepstack.len()
                        )));
                    }
                    // Gemma 3's frame tokens see each other both ways: the whole frame runs
                    // in one chunk.
                    if c.gemma3.is_some() && *kind == TokenKind::Frame && *n > PREFILL_CHUNK {
                        return Err(bad(format!(
                            "span {i}: a Gemma 3 frame of {n} tokens; the device decoder runs \
                             a frame's bidirectional attention in one chunk of at most \
                             {PREFILL_CHUNK} tokens (--device cpu runs it)"
                        )));
                    }
                }
            }
        }
        // On any failure below the table goes back to what it was, so the cache lists no
        // token whose K/V were written in only some layers (the pools' stale contents are
        // unused once no entry lists them).
        let mark = self.cache.table.mark();
        if let Some(off) = self.cache.offload.as_mut() {
            off.step_bytes = 0;
        }
        let result = self.run_inputs(inputs);
        if result.is_err() {
            self.cache.table.rollback(mark);
        }
        result
    }

    /// [`Self::forward`] after validation: every chunk through the layers, then the last
    /// token's logits.
    fn run_inputs(&mut self, inputs: &[DeviceInput<'_>]) -> Result<Vec<f32>, CudaError> {
        let c = &self.model.config.model;
        let h = c.hidden_size;
        let mut last_n = 0;
        for inp in inputs.iter().filter(|i| !i.is_empty()) {
            // Positions of the whole span (an M-RoPE frame's follow its grid), then the span
            // in chunks.
            let first =
                u32::try_from(self.cache.table.next_position()).map_err(|_| CudaError::Shape {
                    op: "device forward",
                    message: format!(
                        "position {} passes the largest position {}",
                        self.cache.table.next_position(),
                        u32::MAX
                    ),
                })?;
            let pos = arch::span_positions(c, inp.kind(), first, inp.len())
                .map_err(model_err(&self.model.config.path))?;
            let mut start = 0;
            while start < inp.len() {
                let n = (inp.len() - start).min(PREFILL_CHUNK);
                let mut deepstack = Vec::new();
                match inp {
                    DeviceInput::Ids { ids, .. } => {
                        self.dev.embedding(
                            &mut self.s.acts.x,
                            &self.model.weights.embed,
                            &ids[start..start + n],
                            h,
                        )?;
                        if let Some((scale, dtype)) = self.model.embed_scale {
                            self.dev
                                .scale_round(&mut self.s.acts.x, n * h, scale, dtype)?;
                        }
                    }
                    DeviceInput::Embeddings {
                        data,
                        deepstack: features,
                        n: total,
                        ..
                    } => {
                        self.dev
                            .write(&mut self.s.acts.x, &data[start * h..(start + n) * h])?;
                        // This chunk's rows of each DeepStack layer's features.
                        for layer in features.chunks_exact(total * h) {
                            deepstack.push(self.dev.upload(&layer[start * h..(start + n) * h])?);
                        }
                    }
                }
                let chunk = ChunkPositions {
                    rope: &pos.cache[start..start + n],
                    mrope: pos.mrope.as_ref().map(|m| &m[start..start + n]),
                };
                self.run_chunk(n, inp.kind(), inp.frame(), chunk, &deepstack)?;
                start += n;
                last_n = n;
            }
            // The next token follows the span's largest position (fewer positions than tokens
            // after an M-RoPE frame).
            let next = pos.cache.iter().max().map_or(first, |&p| p + 1);
            self.cache.table.set_next_position(next as usize)?;
        }
        // Logits of the last token of the last chunk (its row is still in `x`).
        let s = &mut self.s;
        self.dev.copy(&s.acts.x, (last_n - 1) * h, h, &mut s.last)?;
        arch::final_logits(
            &mut Kernels(self.dev),
            c,
            &self.model.weights,
            &s.last,
            1,
            &mut s.last_n,
            &mut s.logits,
        )?;
        self.dev.download(&s.logits)
    }

    /// Runs the `n` tokens in `s.acts.x` through every layer, caching them as `kind` (as part
    /// of camera frame `frame`, if given); `deepstack`: the chunk's DeepStack features, one
    /// `[n][hidden]` buffer per layer they are added after.
    fn run_chunk(
        &mut self,
        n: usize,
        kind: TokenKind,
        frame: Option<FrameId>,
        pos: ChunkPositions<'_>,
        deepstack: &[G::Buf],
    ) -> Result<(), CudaError> {
        let dev = self.dev;
        let c = &self.model.config.model;
        // Causal order: the tokens' append order (under M-RoPE a frame's rotation positions
        // repeat and the order runs ahead of them).
        let first = self.cache.table.next_order();
        // Blocks holding earlier tokens: what an offloaded step streams to the device.
        let before = self.cache.table.used_blocks();
        let placements = match frame {
            Some(f) => self.cache.table.append_frame(f, n)?,
            None => self.cache.table.append(kind, n)?,
        };
        // Every order of the chunk fits the kernels' i32 (checked on the last).
        i32::try_from(first + n - 1).map_err(|_| CudaError::Shape {
            op: "device forward",
            message: format!("token order {} passes {}", first + n - 1, i32::MAX),
        })?;
        let mrope = match (pos.mrope, self.model.mrope_section) {
            (Some(m), Some(section)) => {
                let flat: Vec<u32> = m.iter().flatten().copied().collect();
                Some((dev.upload_ids(&flat)?, section))
            }
            _ => None,
        };
        let mut ops = StepOps {
            dev,
            positions: dev.upload_ids(pos.rope)?,
            mrope,
            inv_freq: &self.model.inv_freq,
            inv_freq_local: self.model.inv_freq_local.as_ref(),
            head_dim: c.head_dim,
            q_heads: c.num_attention_heads,
            first,
            n,
            frame_span: kind == TokenKind::Frame,
            cache: &mut self.cache,
            placements: &placements,
            plans: Vec::new(),
            before,
            next_copied: None,
            this_copied: None,
            attn_done: None,
        };
        ops.start()?;
        arch::run_layers_with_deepstack(
            &mut ops,
            c,
            &self.model.weights.layers,
            &mut self.s.acts,
            n,
            deepstack,
        )
    }
}

/// The positions of one chunk of a span: one rotation position per token, and an M-RoPE
/// frame's three (see [`arch::SpanPositions`]).
#[derive(Clone, Copy)]
struct ChunkPositions<'p> {
    rope: &'p [u32],
    mrope: Option<&'p [[u32; 3]]>,
}

/// The device's [`TensorOps`]: one kernel each.
struct Kernels<'d, G: Gpu>(&'d G);

/// The element-wise and matrix operations of a [`Gpu`] as [`TensorOps`] (one definition for
/// [`Kernels`] and [`StepOps`]).
macro_rules! device_tensor_ops {
    ($dev:ident) => {
        type W = G::Weights;
        type V = G::Weights;
        type Act = G::Buf;
        type Error = CudaError;
        fn rms_norm(
            &mut self,
            out: &mut G::Buf,
            x: &G::Buf,
            w: &G::Weights,
            n: usize,
            eps: f32,
        ) -> Result<(), CudaError> {
            let dim = self.hidden(w);
            self.$dev().rmsnorm(out, x, w, n, dim, eps)
        }
        fn matmul(
            &mut self,
            w: &G::Weights,
            rows: usize,
            cols: usize,
            x: &G::Buf,
            n: usize,
            y: &mut G::Buf,
        ) -> Result<(), CudaError> {
            self.$dev().gemv(y, w, x, rows, cols, n)
        }
        fn bias_add(
            &mut self,
            y: &mut G::Buf,
            b: &G::Weights,
            rows: usize,
            n: usize,
        ) -> Result<(), CudaError> {
            self.$dev().bias_add(y, b, rows, n)
        }
        fn add(&mut self, x: &mut G::Buf, y: &G::Buf, len: usize) -> Result<(), CudaError> {
            self.$dev().residual_add(x, y, len)
        }
        fn swiglu(
            &mut self,
            out: &mut G::Buf,
            gate: &G::Buf,
            up: &G::Buf,
            len: usize,
        ) -> Result<(), CudaError> {
            self.$dev().swiglu(out, gate, up, len)
        }
        fn geglu(
            &mut self,
            out: &mut G::Buf,
            gate: &G::Buf,
            up: &G::Buf,
            len: usize,
        ) -> Result<(), CudaError> {
            self.$dev().geglu(out, gate, up, len)
        }
        fn softcap(&mut self, x: &mut G::Buf, len: usize, cap: f32) -> Result<(), CudaError> {
            self.$dev().softcap(x, len, cap)
        }
    };
}

impl<G: Gpu> Kernels<'_, G> {
    fn dev(&self) -> &G {
        self.0
    }
    /// Width of a norm weight (the recipe's norms are all `hidden` wide).
    fn hidden(&self, w: &G::Weights) -> usize {
        G::weights_len(w)
    }
}

impl<G: Gpu> TensorOps for Kernels<'_, G> {
    device_tensor_ops!(dev);
}

/// The operations of one forward step of `placements`' tokens over the device KV cache.
struct StepOps<'s, G: Gpu> {
    dev: &'s G,
    positions: G::Ids,
    /// An M-RoPE frame chunk: its (temporal, row, column) positions, the sections and
    /// whether they interleave.
    mrope: Option<(G::Ids, MRope)>,
    inv_freq: &'s G::Buf,
    /// Gemma 3's local layers' frequencies.
    inv_freq_local: Option<&'s G::Buf>,
    head_dim: usize,
    q_heads: usize,
    /// The chunk's first token order and its tokens.
    first: usize,
    n: usize,
    /// The chunk is (part of) a frame span: Gemma 3's frame tokens see each other both ways.
    frame_span: bool,
    cache: &'s mut DeviceKvCache<G>,
    placements: &'s [Placement],
    /// One attention plan per (layer layout, mask) the step's layers use: one, unless the
    /// policy is calibrated with a frame format per layer or the model has sliding-window
    /// layers.
    plans: Vec<(KvLayout, AttendMask, G::Plan)>,
    /// Blocks holding the tokens before this step (what an offloaded step streams).
    before: (usize, usize),
    /// Offloaded: the copy of the next layer's K/V into its staging pools.
    next_copied: Option<G::Event>,
    /// Offloaded: the copy of this layer's K/V.
    this_copied: Option<G::Event>,
    /// Offloaded: the previous layer's attention (its staging pools are free after it).
    attn_done: Option<G::Event>,
}

impl<G: Gpu> StepOps<'_, G> {
    fn dev(&self) -> &G {
        self.dev
    }
    fn hidden(&self, w: &G::Weights) -> usize {
        G::weights_len(w)
    }

    /// The plan of layer `layer`'s attention under `mask` (made on first use): query `i`
    /// sees keys up to its own order, or with `mask.whole_span` on a frame span up to the
    /// span's last (the whole span is in this chunk: `forward` checks it), and with
    /// `mask.window` from `window - 1` tokens before its own order (the CPU cache's
    /// `window_start`).
    fn plan_index(&mut self, layer: usize, mask: AttendMask) -> Result<usize, CudaError> {
        let layout = self.cache.table.policy().layout_of(layer);
        let mask = AttendMask {
            whole_span: mask.whole_span && self.frame_span,
            ..mask
        };
        if let Some(i) = self
            .plans
            .iter()
            .position(|(l, m, _)| *l == layout && *m == mask)
        {
            return Ok(i);
        }
        // Orders fit i32 (`run_chunk` checked the chunk's last).
        let (first, last) = (self.first, self.first + self.n - 1);
        let q_order: Vec<i32> = (first..=last)
            .map(|o| if mask.whole_span { last } else { o } as i32)
            .collect();
        let q_from: Vec<i32> = match mask.window {
            Some(w) => (first..=last)
                .map(|o| (o + 1).saturating_sub(w) as i32)
                .collect(),
            None => Vec::new(),
        };
        let plan = self.dev.attention_plan(
            &layout,
            self.cache.table.pool_blocks(),
            self.q_heads,
            self.cache.table.entries(),
            &q_order,
            &q_from,
            Splits::Auto,
        )?;
        self.plans.push((layout, mask, plan));
        Ok(self.plans.len() - 1)
    }

    /// Offloaded: queues the copy of layer 0's K/V once the host pools hold every earlier
    /// write.
    fn start(&mut self) -> Result<(), CudaError> {
        let dev = self.dev;
        if let Some(off) = self.cache.offload.as_mut() {
            dev.wait(Some(&off.queue), &dev.record(None)?)?;
            off.step_bytes += dev.copy_pool_prefix(
                &self.cache.layers[0],
                &mut off.staging[0],
                self.before,
                &off.queue,
            )?;
            self.next_copied = Some(dev.record(Some(&off.queue))?);
        }
        Ok(())
    }
}

impl<G: Gpu> TensorOps for StepOps<'_, G> {
    device_tensor_ops!(dev);
}

impl<G: Gpu> LayerOps for StepOps<'_, G> {
    /// Offloaded: queues the copy of layer `layer + 1`'s K/V into the other staging pools,
    /// once layer `layer - 1`'s attention is done with them.
    fn begin_layer(&mut self, layer: usize) -> Result<(), CudaError> {
        let dev = self.dev;
        let n_layers = self.cache.layers.len();
        self.this_copied = self.next_copied.take();
        if let Some(off) = self.cache.offload.as_mut()
            && layer + 1 < n_layers
        {
            if let Some(e) = &self.attn_done {
                dev.wait(Some(&off.queue), e)?;
            }
            off.step_bytes += dev.copy_pool_prefix(
                &self.cache.layers[layer + 1],
                &mut off.staging[(layer + 1) % 2],
                self.before,
                &off.queue,
            )?;
            self.next_copied = Some(dev.record(Some(&off.queue))?);
        }
        Ok(())
    }

    fn rope(&mut self, x: &mut G::Buf, heads: usize, n: usize) -> Result<(), CudaError> {
        let d = self.head_dim;
        match &self.mrope {
            Some((p3, m)) => {
                self.dev
                    .rope_mrope(x, p3, self.inv_freq, n, heads, d, m.section, m.interleaved)
            }
            None => self
                .dev
                .rope(x, &self.positions, self.inv_freq, n, heads, d, d),
        }
    }

    /// Gemma 3's local layers: RoPE at the chunk's positions with the local base.
    fn rope_local(&mut self, x: &mut G::Buf, heads: usize, n: usize) -> Result<(), CudaError> {
        let d = self.head_dim;
        let inv = self.inv_freq_local.ok_or_else(|| CudaError::Shape {
            op: "rope",
            message: "a local-layer RoPE without Gemma 3's local base".into(),
        })?;
        self.dev.rope(x, &self.positions, inv, n, heads, d, d)
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &G::Buf,
        k: &G::Buf,
        v: &G::Buf,
        out: &mut G::Buf,
        n: usize,
    ) -> Result<(), CudaError> {
        self.attention_masked(layer, q, k, v, out, n, AttendMask::default())
    }

    /// Writes the step's K/V into the layer's pools and attends under `mask`; offloaded,
    /// also into the staging copy (once its copy is done), and attends there.
    fn attention_masked(
        &mut self,
        layer: usize,
        q: &G::Buf,
        k: &G::Buf,
        v: &G::Buf,
        out: &mut G::Buf,
        _n: usize,
        mask: AttendMask,
    ) -> Result<(), CudaError> {
        let dev = self.dev;
        let i = self.plan_index(layer, mask)?;
        let plan = &mut self.plans[i].2;
        write_placements(dev, &mut self.cache.layers[layer], self.placements, k, v)?;
        match self.cache.offload.as_mut() {
            Some(off) => {
                if let Some(e) = &self.this_copied {
                    dev.wait(None, e)?;
                }
                let staging = &mut off.staging[layer % 2];
                write_placements(dev, staging, self.placements, k, v)?;
                dev.attend(staging, plan, q, out)?;
                self.attn_done = Some(dev.record(None)?);
                Ok(())
            }
            None => dev.attend(&self.cache.layers[layer], plan, q, out),
        }
    }
}

impl<G: Gpu> DeviceSession<'_, G> {
    /// Greedy generation of `n` tokens after `prompt` (no stop tokens).
    pub fn greedy(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>, CudaError> {
        let mut out = Vec::with_capacity(n);
        let mut logits = self.forward(&[DeviceInput::Ids {
            ids: prompt,
            kind: TokenKind::Text,
        }])?;
        while out.len() < n {
            let t = jetvlm_decoder::sampler::argmax(&logits);
            out.push(t);
            if out.len() < n {
                logits = self.forward(&[DeviceInput::Ids {
                    ids: &[t],
                    kind: TokenKind::Text,
                }])?;
            }
        }
        Ok(out)
    }
}

/// A session is a generation backend: `Generation::resume(session, prompt_logits, ...)`
/// samples on the host and decodes each token on the device.
impl<G: Gpu> jetvlm_decoder::Decode for DeviceSession<'_, G> {
    type Error = CudaError;
    fn decode(&mut self, ids: &[u32]) -> Result<jetvlm_decoder::Logits, CudaError> {
        let data = self.forward(&[DeviceInput::Ids {
            ids,
            kind: TokenKind::Text,
        }])?;
        let vocab = data.len();
        Ok(jetvlm_decoder::Logits {
            data,
            rows: 1,
            vocab,
        })
    }
}
