//! The Llama / Mistral / Qwen2 decoder on the GPU: weights read from the Hugging Face files by
//! `jetvlm_decoder` and uploaded in chunks straight into their final device buffers (stored
//! precision kept: f32, f16 or bf16), and a forward pass over spans of token ids or
//! embeddings that writes K/V into the device mixed KV pools (FP16 text blocks, quantized
//! frame blocks) and attends over them with the fused attention kernel.
//!
//! Matrix products are the `gemv` kernel (up to 8 tokens share each weight read), so decode
//! and prefill run the same code; prefill runs in chunks of [`PREFILL_CHUNK`] tokens.

use std::path::Path;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use jetvlm_core::{DType, FrameId, TokenKind};
use jetvlm_decoder::kernels::Rope;
use jetvlm_decoder::model::PREFIXES;
use jetvlm_decoder::{Config, Tensor, TensorData, Weights};

use super::device::{CudaDevice, driver_err};
use super::kv::{AttentionPlan, DeviceKvPools, PoolMemory, Splits};
use super::ops::DeviceWeights;
use crate::error::CudaError;
use crate::kvtable::{DevicePolicy, KvBlockTable};
use crate::layout::BlockKind;

pub use crate::kvtable::PREFILL_CHUNK;
/// Elements per host staging chunk when uploading weights.
const UPLOAD_CHUNK: usize = 1 << 22;

fn model_err(dir: &Path) -> impl Fn(jetvlm_decoder::DecoderError) -> CudaError + '_ {
    move |e| CudaError::Model {
        path: dir.to_path_buf(),
        message: e.to_string(),
    }
}

/// A weight matrix `[rows][cols]` and its optional bias on the device.
#[derive(Debug)]
struct DeviceLinear {
    w: DeviceWeights,
    rows: usize,
    cols: usize,
    bias: Option<CudaSlice<f32>>,
}

#[derive(Debug)]
struct DeviceLayer {
    input_norm: DeviceWeights,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    o: DeviceLinear,
    post_norm: DeviceWeights,
    gate: DeviceLinear,
    up: DeviceLinear,
    down: DeviceLinear,
}

/// A decoder loaded onto the GPU.
#[derive(Debug)]
pub struct DeviceDecoder {
    config: Config,
    embed: DeviceWeights,
    layers: Vec<DeviceLayer>,
    norm: DeviceWeights,
    lm_head: Option<DeviceWeights>,
    inv_freq: CudaSlice<f32>,
    dtype: DType,
    weight_bytes_per_token: u64,
}

impl DeviceDecoder {
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn vocab_size(&self) -> usize {
        self.config.model.vocab_size
    }
    pub fn hidden_size(&self) -> usize {
        self.config.model.hidden_size
    }
    /// Stored type of the weight matrices.
    pub fn weight_dtype(&self) -> DType {
        self.dtype
    }
    /// Weight bytes one decode step reads (every matrix, norms, LM head).
    pub fn weight_bytes_read_per_token(&self) -> u64 {
        self.weight_bytes_per_token
    }
}

fn upload_slice<T: DeviceRepr + ValidAsZeroBits + Copy>(
    dev: &CudaDevice,
    s: &[T],
) -> Result<CudaSlice<T>, CudaError> {
    dev.upload_chunked::<T, _>(s.len(), UPLOAD_CHUNK, |off, chunk| {
        chunk.copy_from_slice(&s[off..off + chunk.len()]);
        Ok(())
    })
}

/// A tensor in its stored precision, uploaded chunk by chunk from the memory-mapped file.
fn upload_tensor(dev: &CudaDevice, t: &Tensor) -> Result<DeviceWeights, CudaError> {
    Ok(match t.data() {
        TensorData::F32(s) => DeviceWeights::F32(upload_slice::<f32>(dev, s)?),
        TensorData::F16(s) => DeviceWeights::F16(upload_slice::<f16>(dev, s)?),
        TensorData::BF16(s) => DeviceWeights::BF16(upload_slice::<bf16>(dev, s)?),
    })
}

fn upload_f32(dev: &CudaDevice, t: &Tensor) -> Result<CudaSlice<f32>, CudaError> {
    dev.upload(&t.to_f32_vec())
}

impl CudaDevice {
    /// Loads the decoder in `dir` (config.json + safetensors) onto this device.
    pub fn load_decoder(&self, dir: &Path) -> Result<DeviceDecoder, CudaError> {
        let config = Config::from_dir(dir).map_err(model_err(dir))?;
        let ws = Weights::open(dir).map_err(model_err(dir))?;
        let c = config.model.clone();
        let (prefix, head_name) = PREFIXES
            .iter()
            .find(|(p, _)| ws.contains(&format!("{p}embed_tokens.weight")))
            .copied()
            .unwrap_or(PREFIXES[0]);
        let get = |name: String, shape: &[usize]| ws.get(&name, shape).map_err(model_err(dir));
        let h = c.hidden_size;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let mut bytes = 0u64;
        let mut linear = |name: String, rows: usize, cols: usize, bias: bool| {
            let t = get(format!("{name}.weight"), &[rows, cols])?;
            bytes += t.size_bytes() as u64;
            let bias = if bias {
                bytes += 4 * rows as u64;
                Some(upload_f32(self, &get(format!("{name}.bias"), &[rows])?)?)
            } else {
                None
            };
            Ok::<_, CudaError>(DeviceLinear {
                w: upload_tensor(self, &t)?,
                rows,
                cols,
                bias,
            })
        };
        let norm = |name: String| -> Result<DeviceWeights, CudaError> {
            Ok(DeviceWeights::F32(upload_f32(self, &get(name, &[h])?)?))
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("{prefix}layers.{i}");
            let b = c.attention_bias;
            let inter = c.intermediate_size;
            layers.push(DeviceLayer {
                input_norm: norm(format!("{p}.input_layernorm.weight"))?,
                q: linear(format!("{p}.self_attn.q_proj"), qd, h, b)?,
                k: linear(format!("{p}.self_attn.k_proj"), kvd, h, b)?,
                v: linear(format!("{p}.self_attn.v_proj"), kvd, h, b)?,
                o: linear(format!("{p}.self_attn.o_proj"), h, qd, false)?,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(format!("{p}.mlp.gate_proj"), inter, h, false)?,
                up: linear(format!("{p}.mlp.up_proj"), inter, h, false)?,
                down: linear(format!("{p}.mlp.down_proj"), h, inter, false)?,
            });
        }
        bytes += (c.num_hidden_layers * 2 * 4 * h) as u64;
        let embed_t = get(format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
        let dtype = embed_t.dtype();
        let embed = upload_tensor(self, &embed_t)?;
        let lm_head = if c.tie_word_embeddings {
            bytes += embed_t.size_bytes() as u64;
            None
        } else {
            let t = get(head_name.to_string(), &[c.vocab_size, h])?;
            bytes += t.size_bytes() as u64;
            Some(upload_tensor(self, &t)?)
        };
        let final_norm = norm(format!("{prefix}norm.weight"))?;
        bytes += 4 * h as u64;
        let inv: Vec<f32> = Rope::new(&c).inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = self.upload(&inv)?;
        self.synchronize()?;
        Ok(DeviceDecoder {
            config,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            inv_freq,
            dtype,
            weight_bytes_per_token: bytes,
        })
    }

    fn linear(
        &self,
        l: &DeviceLinear,
        x: &CudaSlice<f32>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.gemv(y, &l.w, x, l.rows, l.cols, n)?;
        if let Some(b) = &l.bias {
            self.bias_add(y, b, l.rows, n)?;
        }
        Ok(())
    }
}

/// The device KV cache of one sequence: one [`DeviceKvPools`] per layer and the shared
/// block table.
///
/// With [`PoolMemory::MappedHost`] the layers' pools live in pinned host memory (the KV cache
/// offloaded): each forward step streams every layer's used blocks over PCIe into one of two
/// device staging pools on a copy stream, the copy of layer `l + 1` overlapping the compute
/// of layer `l`; new K/V are written both to the host pools and to the staging copy.
#[derive(Debug)]
pub struct DeviceKvCache {
    table: KvBlockTable,
    // Before `layers`: fields drop in order, and the offload's drop waits for the work that
    // reads or writes the host pools in `layers`.
    offload: Option<Offload>,
    layers: Vec<DeviceKvPools>,
}

#[derive(Debug)]
struct Offload {
    staging: Vec<DeviceKvPools>,
    copy: std::sync::Arc<cudarc::driver::CudaStream>,
    /// The compute stream, whose kernels write the mapped host pools.
    compute: std::sync::Arc<cudarc::driver::CudaStream>,
    /// Bytes streamed host-to-device by the last forward step (all layers).
    step_bytes: u64,
}

impl Drop for Offload {
    fn drop(&mut self) {
        // Copies out of the host pools and into the staging pools, and kernels writing the
        // host pools (a step that failed midway leaves work queued), must finish before the
        // pools are freed.
        let _ = self.copy.synchronize();
        let _ = self.compute.synchronize();
    }
}

impl Offload {
    fn new(
        dev: &CudaDevice,
        policy: &DevicePolicy,
        blocks: (usize, usize),
    ) -> Result<Self, CudaError> {
        Ok(Self {
            staging: (0..2)
                .map(|_| dev.kv_pools(policy.layout, blocks.0, blocks.1))
                .collect::<Result<_, _>>()?,
            copy: dev
                .context()
                .new_stream()
                .map_err(driver_err("cuStreamCreate"))?,
            compute: dev.stream().clone(),
            step_bytes: 0,
        })
    }
}

impl DeviceKvCache {
    /// Pools for `layers` layers holding up to `text_tokens` text and `frame_tokens` frame
    /// tokens appended in at most `spans` spans, in device or mapped host memory.
    pub fn new(
        dev: &CudaDevice,
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
        dev: &CudaDevice,
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
        dev: &CudaDevice,
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
            .map(|li| dev.kv_pools_in(policy.layout_of(li), tb, fb, memory))
            .collect::<Result<Vec<_>, _>>()?;
        let offload = match memory {
            PoolMemory::Device => None,
            PoolMemory::MappedHost => Some(Offload::new(dev, &policy, (tb, fb))?),
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
    pub fn layer_pools(&self, layer: usize) -> Option<&DeviceKvPools> {
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
        dev: &CudaDevice,
        kind: TokenKind,
        n: usize,
        mut kv: F,
    ) -> Result<(), CudaError>
    where
        F: FnMut(usize, &mut CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<(), CudaError>,
    {
        let row = self.table.policy().layout.row_elems();
        let mut k = dev.zeros::<f32>(n * row)?;
        let mut v = dev.zeros::<f32>(n * row)?;
        let placements = self.table.append(kind, n)?;
        for (li, pools) in self.layers.iter_mut().enumerate() {
            kv(li, &mut k, &mut v)?;
            write_placements(dev, pools, &placements, &k, &v, row)?;
        }
        Ok(())
    }
}

fn write_placements(
    dev: &CudaDevice,
    pools: &mut DeviceKvPools,
    placements: &[crate::kvtable::Placement],
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    row: usize,
) -> Result<(), CudaError> {
    for p in placements {
        let r = p.src_token * row..(p.src_token + p.len) * row;
        let (kv, vv) = (k.slice(r.clone()), v.slice(r));
        match p.kind {
            BlockKind::Text => dev.kv_store_text(pools, p.block, p.tok_offset, p.len, &kv, &vv)?,
            BlockKind::Frame => {
                dev.kv_quantize_frame(pools, p.block, p.tok_offset, p.len, &kv, &vv)?
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
    /// [`DeviceKvCache::evict_frame`] gives back.
    Embeddings {
        data: &'a [f32],
        n: usize,
        kind: TokenKind,
        frame: Option<FrameId>,
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
#[derive(Debug)]
pub struct DeviceScratch {
    /// The model dimensions the buffers are sized for: hidden, q heads x head dim, kv heads x
    /// head dim, intermediate, vocab.
    dims: [usize; 5],
    x: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    last: CudaSlice<f32>,
    last_n: CudaSlice<f32>,
    logits: CudaSlice<f32>,
}

impl DeviceScratch {
    /// Buffers for `model`'s forward pass.
    pub fn new(dev: &CudaDevice, model: &DeviceDecoder) -> Result<Self, CudaError> {
        let dims = scratch_dims(model);
        let [h, qd, kvd, inter, vocab] = dims;
        let n = PREFILL_CHUNK;
        Ok(Self {
            dims,
            x: dev.zeros(n * h)?,
            xn: dev.zeros(n * h)?,
            q: dev.zeros(n * qd)?,
            k: dev.zeros(n * kvd)?,
            v: dev.zeros(n * kvd)?,
            att: dev.zeros(n * qd)?,
            tmp: dev.zeros(n * h)?,
            gate: dev.zeros(n * inter)?,
            up: dev.zeros(n * inter)?,
            act: dev.zeros(n * inter)?,
            last: dev.zeros(h)?,
            last_n: dev.zeros(h)?,
            logits: dev.zeros(vocab)?,
        })
    }
}

fn scratch_dims(model: &DeviceDecoder) -> [usize; 5] {
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
#[derive(Debug)]
pub struct SessionParts {
    pub error: CudaError,
    pub cache: DeviceKvCache,
    pub scratch: DeviceScratch,
}

/// A decoder and its KV cache on one device: the forward pass.
#[derive(Debug)]
pub struct DeviceSession<'a> {
    dev: &'a CudaDevice,
    model: &'a DeviceDecoder,
    cache: DeviceKvCache,
    s: DeviceScratch,
}

impl<'a> DeviceSession<'a> {
    /// A session over `cache` (its shape must match the model), with buffers of its own.
    pub fn new(
        dev: &'a CudaDevice,
        model: &'a DeviceDecoder,
        cache: DeviceKvCache,
    ) -> Result<Self, CudaError> {
        let scratch = DeviceScratch::new(dev, model)?;
        Self::with_scratch(dev, model, cache, scratch).map_err(|p| p.error)
    }

    /// A session over `cache` with `scratch` (made for this model, e.g. by an earlier
    /// session: [`Self::into_parts`]). Parts that do not fit the model come back with the
    /// error.
    pub fn with_scratch(
        dev: &'a CudaDevice,
        model: &'a DeviceDecoder,
        cache: DeviceKvCache,
        scratch: DeviceScratch,
    ) -> Result<Self, Box<SessionParts>> {
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
    pub fn into_parts(self) -> (DeviceKvCache, DeviceScratch) {
        (self.cache, self.s)
    }

    pub fn cache(&self) -> &DeviceKvCache {
        &self.cache
    }
    pub fn cache_mut(&mut self) -> &mut DeviceKvCache {
        &mut self.cache
    }
    pub fn model(&self) -> &DeviceDecoder {
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
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        for inp in inputs.iter().filter(|i| !i.is_empty()) {
            let mut start = 0;
            while start < inp.len() {
                let n = (inp.len() - start).min(PREFILL_CHUNK);
                match inp {
                    DeviceInput::Ids { ids, .. } => self.dev.embedding(
                        &mut self.s.x,
                        &self.model.embed,
                        &ids[start..start + n],
                        h,
                    )?,
                    DeviceInput::Embeddings { data, .. } => {
                        let mut view = self.s.x.slice_mut(0..n * h);
                        self.dev
                            .stream()
                            .memcpy_htod(&data[start * h..(start + n) * h], &mut view)
                            .map_err(driver_err("cuMemcpyHtoD"))?;
                    }
                }
                self.run_chunk(n, inp.kind(), inp.frame())?;
                start += n;
            }
        }
        // Logits of the last token of the last chunk (its row is still in `x`).
        let last_row = {
            let (n_last, _) = last_chunk(inputs);
            (n_last - 1) * h
        };
        self.dev
            .stream()
            .memcpy_dtod(&self.s.x.slice(last_row..last_row + h), &mut self.s.last)
            .map_err(driver_err("cuMemcpyDtoD"))?;
        self.dev.rmsnorm(
            &mut self.s.last_n,
            &self.s.last,
            &self.model.norm,
            1,
            h,
            c.rms_norm_eps as f32,
        )?;
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.embed);
        self.dev
            .gemv(&mut self.s.logits, head, &self.s.last_n, vocab, h, 1)?;
        self.dev.download(&self.s.logits)
    }

    /// Runs the `n` tokens in `s.x` through every layer, caching them as `kind` (as part of
    /// camera frame `frame`, if given).
    fn run_chunk(
        &mut self,
        n: usize,
        kind: TokenKind,
        frame: Option<FrameId>,
    ) -> Result<(), CudaError> {
        let dev = self.dev;
        let c = &self.model.config.model;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps as f32);
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let inter = c.intermediate_size;
        let first = self.cache.table.next_position();
        // Blocks holding earlier tokens: what an offloaded step streams to the device.
        let before = self.cache.table.used_blocks();
        let placements = match frame {
            Some(f) => self.cache.table.append_frame(f, n)?,
            None => self.cache.table.append(kind, n)?,
        };
        let positions: Vec<u32> = (first..first + n).map(|p| p as u32).collect();
        let d_pos = dev.upload(&positions)?;
        let q_order: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        // One attention plan per distinct layer layout (one, unless the policy is calibrated
        // with a frame format per layer); `plan_of[layer]` picks it.
        let mut plans: Vec<AttentionPlan> = Vec::new();
        let mut plan_of = Vec::with_capacity(self.cache.layers.len());
        for li in 0..self.cache.layers.len() {
            let layout = self.cache.table.policy().layout_of(li);
            let i = match plans.iter().position(|p| *p.layout() == layout) {
                Some(i) => i,
                None => {
                    plans.push(dev.attention_plan(
                        &layout,
                        self.cache.table.pool_blocks(),
                        hq,
                        self.cache.table.entries(),
                        &q_order,
                        Splits::Auto,
                    )?);
                    plans.len() - 1
                }
            };
            plan_of.push(i);
        }
        let s = &mut self.s;
        let cache = &mut self.cache;
        let n_layers = cache.layers.len();
        let ev = |r: Result<cudarc::driver::CudaEvent, cudarc::driver::DriverError>| {
            r.map_err(driver_err("cuEventRecord"))
        };
        let wait = |stream: &cudarc::driver::CudaStream, e: &cudarc::driver::CudaEvent| {
            stream.wait(e).map_err(driver_err("cuStreamWaitEvent"))
        };
        let mut next_copied = None;
        if let Some(off) = cache.offload.as_mut() {
            // Host pools hold every earlier write once the compute stream reaches here.
            wait(&off.copy, &ev(dev.stream().record_event(None))?)?;
            off.step_bytes +=
                dev.copy_pool_prefix(&cache.layers[0], &mut off.staging[0], before, &off.copy)?;
            next_copied = Some(ev(off.copy.record_event(None))?);
        }
        let mut attn_done: Option<cudarc::driver::CudaEvent> = None;
        for li in 0..n_layers {
            let layer = &self.model.layers[li];
            let this_copied = next_copied.take();
            if let Some(off) = cache.offload.as_mut()
                && li + 1 < n_layers
            {
                // The other staging pools are free once layer li - 1 has attended.
                if let Some(e) = &attn_done {
                    wait(&off.copy, e)?;
                }
                off.step_bytes += dev.copy_pool_prefix(
                    &cache.layers[li + 1],
                    &mut off.staging[(li + 1) % 2],
                    before,
                    &off.copy,
                )?;
                next_copied = Some(ev(off.copy.record_event(None))?);
            }
            dev.rmsnorm(&mut s.xn, &s.x, &layer.input_norm, n, h, eps)?;
            dev.linear(&layer.q, &s.xn, n, &mut s.q)?;
            dev.linear(&layer.k, &s.xn, n, &mut s.k)?;
            dev.linear(&layer.v, &s.xn, n, &mut s.v)?;
            dev.rope(&mut s.q, &d_pos, &self.model.inv_freq, n, hq, d, d)?;
            dev.rope(&mut s.k, &d_pos, &self.model.inv_freq, n, hkv, d, d)?;
            write_placements(dev, &mut cache.layers[li], &placements, &s.k, &s.v, hkv * d)?;
            match cache.offload.as_mut() {
                Some(off) => {
                    if let Some(e) = &this_copied {
                        wait(dev.stream(), e)?;
                    }
                    let staging = &mut off.staging[li % 2];
                    write_placements(dev, staging, &placements, &s.k, &s.v, hkv * d)?;
                    dev.attend(staging, &mut plans[plan_of[li]], &s.q, &mut s.att)?;
                    attn_done = Some(ev(dev.stream().record_event(None))?);
                }
                None => dev.attend(&cache.layers[li], &mut plans[plan_of[li]], &s.q, &mut s.att)?,
            }
            dev.linear(&layer.o, &s.att, n, &mut s.tmp)?;
            dev.residual_add(&mut s.x, &s.tmp, n * h)?;
            dev.rmsnorm(&mut s.xn, &s.x, &layer.post_norm, n, h, eps)?;
            dev.linear(&layer.gate, &s.xn, n, &mut s.gate)?;
            dev.linear(&layer.up, &s.xn, n, &mut s.up)?;
            dev.swiglu(&mut s.act, &s.gate, &s.up, n * inter)?;
            dev.linear(&layer.down, &s.act, n, &mut s.tmp)?;
            dev.residual_add(&mut s.x, &s.tmp, n * h)?;
        }
        Ok(())
    }
}

/// Tokens in the last chunk of the last non-empty input, and that input's index.
fn last_chunk(inputs: &[DeviceInput<'_>]) -> (usize, usize) {
    let (i, inp) = inputs
        .iter()
        .enumerate()
        .rev()
        .find(|(_, i)| !i.is_empty())
        .map(|(i, x)| (i, *x))
        .unwrap_or((
            0,
            DeviceInput::Ids {
                ids: &[],
                kind: TokenKind::Text,
            },
        ));
    let len = inp.len();
    let rem = len % PREFILL_CHUNK;
    (
        if rem == 0 {
            PREFILL_CHUNK.min(len)
        } else {
            rem
        },
        i,
    )
}

impl DeviceSession<'_> {
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
/// samples on the host and decodes each token on the GPU.
impl jetvlm_decoder::Decode for DeviceSession<'_> {
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
