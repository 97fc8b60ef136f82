//! The decoder on a device (`device: cuda`, or `device: sim` for the simulated device that
//! runs the CUDA kernels' CPU twins), with the weights uploaded once at load (straight into
//! their device buffers; no CPU copy of the decoder is kept). `Pipeline::ask` prefills each
//! prompt into device KV pools sized for it; a streaming session keeps device pools of its
//! own for its window. The vision encoder, tokenizer and sampler stay on the host.
//!
//! The pipeline holds the device decoder as a [`DeviceDecoding`] and a session's pools as a
//! [`DeviceCache`], whatever the device, so neither names CUDA.

use crate::RuntimeError;
use crate::cache::{KvChoice, KvStats};
use jetvlm_core::{FrameId, TokenKind};
use jetvlm_cuda::{
    DeviceDecoder, DeviceInput, DeviceKvCache, DevicePolicy, DeviceScratch, DeviceSession, Gpu,
    PoolMemory,
};
use jetvlm_decoder::{Decode, Input, Logits};
use std::any::Any;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A generation backend on a device.
pub(crate) type DeviceBackend<'a> = Box<dyn Decode<Error = RuntimeError> + 'a>;

/// A camera session's device KV pools.
pub(crate) trait DeviceCache: Send {
    fn len(&self) -> usize;
    fn next_position(&self) -> usize;
    fn clear(&mut self);
    fn evict_frame(&mut self, frame: FrameId) -> Result<usize, RuntimeError>;
    fn truncate_last(&mut self, n: usize) -> Result<(), RuntimeError>;
    /// Bytes in use by precision; `frame_tokens` of the tokens are frame tokens.
    fn kv_stats(&self, frame_tokens: usize) -> KvStats;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<G: Gpu + 'static> DeviceCache for DeviceKvCache<G> {
    fn len(&self) -> usize {
        DeviceKvCache::len(self)
    }
    fn next_position(&self) -> usize {
        DeviceKvCache::next_position(self)
    }
    fn clear(&mut self) {
        DeviceKvCache::clear(self)
    }
    fn evict_frame(&mut self, frame: FrameId) -> Result<usize, RuntimeError> {
        Ok(DeviceKvCache::evict_frame(self, frame)?)
    }
    fn truncate_last(&mut self, n: usize) -> Result<(), RuntimeError> {
        Ok(DeviceKvCache::truncate_last(self, n)?)
    }
    fn kv_stats(&self, frame_tokens: usize) -> KvStats {
        kv_stats(self, frame_tokens)
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// A slot holding a session's device cache (`None` only after an error took it down).
pub(crate) type CacheSlot = Option<Box<dyn DeviceCache>>;

/// The decoder loaded on a device, whatever the device.
pub(crate) trait DeviceDecoding: Send + Sync {
    /// The device's name, for reports.
    fn name(&self) -> String;
    /// Prefills `prompt` (text ids and frame embeddings, in order) on a fresh device cache
    /// sized for it plus `answer_tokens`, and returns the backend positioned after it with
    /// the prompt's last logits.
    fn prefill<'a>(
        &'a self,
        prompt: &[Input<'_>],
        answer_tokens: usize,
        tap: Arc<Mutex<KvStats>>,
    ) -> Result<(DeviceBackend<'a>, Logits), RuntimeError>;
    /// The cache of a camera session: `prefix` text tokens, `frames` frames of
    /// `frame_tokens`, and `question` tokens for a question and its answer.
    fn session_cache(
        &self,
        prefix: usize,
        frames: usize,
        frame_tokens: usize,
        question: usize,
    ) -> Result<Box<dyn DeviceCache>, RuntimeError>;
    /// Appends `inputs` (a session's prefix or a frame) to the cache in `slot`.
    fn append(&self, slot: &mut CacheSlot, inputs: &[Input<'_>]) -> Result<(), RuntimeError>;
    /// Runs `prompt` after what the cache in `slot` holds and returns the backend positioned
    /// after it (it puts the cache back into `slot` when dropped) with the last logits.
    /// `frame_tokens`: frame tokens the cache holds, for the reports.
    fn continue_on<'a>(
        &'a self,
        slot: &'a mut CacheSlot,
        prompt: &[Input<'_>],
        frame_tokens: usize,
        tap: Arc<Mutex<KvStats>>,
    ) -> Result<(DeviceBackend<'a>, Logits), RuntimeError>;
}

/// A device with the package's decoder loaded on it.
pub(crate) struct GpuDecoder<G: Gpu> {
    dev: G,
    model: DeviceDecoder<G>,
    policy: DevicePolicy,
    /// The forward pass's activation buffers, made once and lent to each session in turn.
    scratch: Mutex<Option<DeviceScratch<G>>>,
}

impl<G: Gpu> GpuDecoder<G> {
    /// Uploads the decoder in `dir` to `dev`; `kv` is the pipeline's KV choice.
    pub(crate) fn load(dev: G, dir: &Path, kv: &KvChoice) -> Result<Self, RuntimeError> {
        let KvChoice::Policy(policy) = kv else {
            return Err(RuntimeError::Unsupported {
                op: "a device decoder",
                message:
                    "the f32 reference cache runs on the CPU only; choose a KV policy (fp16, mixed, ...)"
                        .into(),
            });
        };
        let model = DeviceDecoder::load(&dev, dir)?;
        let c = &model.config().model;
        let policy = DevicePolicy::new(policy, c.num_key_value_heads, c.head_dim)?;
        Ok(Self {
            dev,
            model,
            policy,
            scratch: Mutex::new(None),
        })
    }

    /// An empty device cache of `blocks` (text, frame) pool blocks per layer.
    fn cache(&self, blocks: (usize, usize)) -> Result<DeviceKvCache<G>, RuntimeError> {
        let c = &self.model.config().model;
        Ok(DeviceKvCache::with_blocks(
            &self.dev,
            self.policy.clone(),
            c.num_hidden_layers,
            blocks,
            PoolMemory::Device,
        )?)
    }

    /// A session over `cache` with the decoder's activation buffers. If it cannot be made,
    /// the cache goes back into `slot` (when given) before the error returns.
    fn open_session(
        &self,
        cache: DeviceKvCache<G>,
        slot: Option<&mut CacheSlot>,
    ) -> Result<DeviceSession<'_, G>, RuntimeError>
    where
        G: 'static,
    {
        let lent = self.scratch.lock().ok().and_then(|mut s| s.take());
        let scratch = match lent.map_or_else(|| DeviceScratch::new(&self.dev, &self.model), Ok) {
            Ok(s) => s,
            Err(e) => {
                if let Some(slot) = slot {
                    *slot = Some(Box::new(cache));
                }
                return Err(e.into());
            }
        };
        DeviceSession::with_scratch(&self.dev, &self.model, cache, scratch).map_err(|parts| {
            let parts = *parts;
            self.return_scratch(parts.scratch);
            if let Some(slot) = slot {
                *slot = Some(Box::new(parts.cache));
            }
            parts.error.into()
        })
    }

    /// Ends a session: its buffers go back for the next one; returns its cache.
    fn close_session(&self, session: DeviceSession<'_, G>) -> DeviceKvCache<G> {
        let (cache, scratch) = session.into_parts();
        self.return_scratch(scratch);
        cache
    }

    fn return_scratch(&self, scratch: DeviceScratch<G>) {
        if let Ok(mut s) = self.scratch.lock() {
            *s = Some(scratch);
        }
    }
}

/// The session cache in `slot`, taken out (it is this device's: the slot was filled by it).
fn take_cache<G: Gpu + 'static>(slot: &mut CacheSlot) -> Result<DeviceKvCache<G>, RuntimeError> {
    let cache = slot.take().ok_or_else(lost)?;
    cache
        .into_any()
        .downcast::<DeviceKvCache<G>>()
        .map(|c| *c)
        .map_err(|_| RuntimeError::Unsupported {
            op: "streaming session",
            message: "the session's KV cache belongs to another device".into(),
        })
}

impl<G: Gpu + Send + Sync + 'static> DeviceDecoding for GpuDecoder<G>
where
    G::Weights: Send + Sync,
    G::Buf: Send + Sync,
    DeviceKvCache<G>: Send,
{
    fn name(&self) -> String {
        self.dev.name()
    }

    fn prefill<'a>(
        &'a self,
        prompt: &[Input<'_>],
        answer_tokens: usize,
        tap: Arc<Mutex<KvStats>>,
    ) -> Result<(DeviceBackend<'a>, Logits), RuntimeError> {
        let mut spans: Vec<(TokenKind, usize, Option<FrameId>)> = prompt
            .iter()
            .map(|i| match *i {
                Input::Text { ids } => (TokenKind::Text, ids.len(), None),
                Input::Embeddings { n, kind, frame, .. } => (kind, n, frame),
            })
            .collect();
        // Answer tokens are appended one at a time after the prompt (plus the last one fed).
        spans.push((TokenKind::Text, answer_tokens + 1, None));
        let cache = self.cache(self.policy.blocks_for_inputs(&spans))?;
        // The cache starts empty: `run` counts the prompt's frame tokens.
        let session = self.open_session(cache, None)?;
        let mut backend = OnDevice {
            gpu: self,
            session: Some(session),
            slot: None,
            tap,
            frame_tokens: 0,
        };
        let logits = backend.run(prompt)?;
        Ok((Box::new(backend), logits))
    }

    fn session_cache(
        &self,
        prefix: usize,
        frames: usize,
        frame_tokens: usize,
        question: usize,
    ) -> Result<Box<dyn DeviceCache>, RuntimeError> {
        Ok(Box::new(self.cache(self.policy.blocks_for_session(
            prefix,
            frames,
            frame_tokens,
            question,
        ))?))
    }

    fn append(&self, slot: &mut CacheSlot, inputs: &[Input<'_>]) -> Result<(), RuntimeError> {
        let cache = take_cache::<G>(slot)?;
        let mut session = self.open_session(cache, Some(slot))?;
        let done = session.forward(&device_inputs(inputs));
        *slot = Some(Box::new(self.close_session(session)));
        done?;
        Ok(())
    }

    fn continue_on<'a>(
        &'a self,
        slot: &'a mut CacheSlot,
        prompt: &[Input<'_>],
        frame_tokens: usize,
        tap: Arc<Mutex<KvStats>>,
    ) -> Result<(DeviceBackend<'a>, Logits), RuntimeError> {
        let cache = take_cache::<G>(slot)?;
        let session = self.open_session(cache, Some(&mut *slot))?;
        let mut backend = OnDevice {
            gpu: self,
            session: Some(session),
            slot: Some(slot),
            tap,
            frame_tokens,
        };
        let logits = backend.run(prompt)?;
        Ok((Box::new(backend), logits))
    }
}

/// A device cache's bytes in use (blocks holding tokens, all layers) by precision;
/// `frame_tokens` of its tokens are frame tokens.
pub(crate) fn kv_stats<G: Gpu>(cache: &DeviceKvCache<G>, frame_tokens: usize) -> KvStats {
    let table = cache.table();
    let policy = table.policy();
    let l = &policy.layout;
    let layers = cache.layers() as u64;
    let (text_blocks, frame_blocks) = table.blocks_in_use();
    let fp16_bytes = text_blocks as u64 * l.text_block_bytes() as u64 * layers;
    // Each layer's frame blocks in its own format (a calibrated policy's differ).
    let frame_block_bytes: u64 = (0..cache.layers())
        .map(|li| policy.layout_of(li).frame_block_bytes() as u64)
        .sum();
    let quant_bytes = frame_blocks as u64 * frame_block_bytes;
    let tokens = table.len();
    // K and V in FP16 for every layer and KV head.
    let fp16_per_token = (2 * 2 * l.row_elems()) as u64 * layers;
    KvStats {
        text_tokens: tokens.saturating_sub(frame_tokens),
        frame_tokens,
        fp16_bytes,
        quant_bytes,
        f32_bytes: 0,
        total_bytes: fp16_bytes + quant_bytes,
        fp16_equivalent_bytes: tokens as u64 * fp16_per_token,
    }
}

/// The error of a session whose device cache an earlier failure took down with it.
pub(crate) fn lost() -> RuntimeError {
    RuntimeError::Unsupported {
        op: "streaming session",
        message: "the device KV cache was lost by an earlier error; start a new session".into(),
    }
}

fn frame_tokens(inputs: &[Input<'_>]) -> usize {
    inputs
        .iter()
        .map(|i| match *i {
            Input::Embeddings {
                n,
                kind: TokenKind::Frame,
                ..
            } => n,
            _ => 0,
        })
        .sum()
}

fn device_inputs<'i>(inputs: &[Input<'i>]) -> Vec<DeviceInput<'i>> {
    inputs
        .iter()
        .map(|i| match *i {
            Input::Text { ids } => DeviceInput::Ids {
                ids,
                kind: TokenKind::Text,
            },
            Input::Embeddings {
                data,
                n,
                kind,
                frame,
                deepstack,
            } => DeviceInput::Embeddings {
                data,
                n,
                kind,
                frame,
                deepstack,
            },
        })
        .collect()
}

/// A device session a [`Generation`](jetvlm_decoder::Generation) decodes on; reports the
/// device cache's memory to the pipeline's KV tap after every step. A session's cache goes
/// back to its slot when the backend is dropped.
struct OnDevice<'a, G: Gpu + 'static> {
    gpu: &'a GpuDecoder<G>,
    session: Option<DeviceSession<'a, G>>,
    slot: Option<&'a mut CacheSlot>,
    tap: Arc<Mutex<KvStats>>,
    /// Frame tokens the cache holds (the rest is text).
    frame_tokens: usize,
}

impl<G: Gpu + 'static> Drop for OnDevice<'_, G>
where
    DeviceKvCache<G>: DeviceCache,
{
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let cache = self.gpu.close_session(session);
            if let Some(slot) = self.slot.as_mut() {
                **slot = Some(Box::new(cache));
            }
        }
    }
}

impl<'a, G: Gpu + 'static> OnDevice<'a, G>
where
    DeviceKvCache<G>: DeviceCache,
{
    /// The session (present from construction until drop).
    fn session(&mut self) -> Result<&mut DeviceSession<'a, G>, RuntimeError> {
        self.session.as_mut().ok_or_else(lost)
    }

    fn run(&mut self, prompt: &[Input<'_>]) -> Result<Logits, RuntimeError> {
        let data = self.session()?.forward(&device_inputs(prompt))?;
        self.frame_tokens += frame_tokens(prompt);
        self.report();
        let vocab = data.len();
        Ok(Logits {
            data,
            rows: 1,
            vocab,
        })
    }

    /// Reports the device cache's memory to the tap.
    fn report(&self) {
        let Some(session) = &self.session else {
            return;
        };
        if let Ok(mut t) = self.tap.lock() {
            *t = kv_stats(session.cache(), self.frame_tokens);
        }
    }
}

impl<G: Gpu + 'static> Decode for OnDevice<'_, G>
where
    DeviceKvCache<G>: DeviceCache,
{
    type Error = RuntimeError;
    fn decode(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        let logits = self.session()?.decode(ids)?;
        self.report();
        Ok(logits)
    }
}
