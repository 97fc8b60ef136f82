//! The decoder on a CUDA GPU (`device: cuda`, feature `cuda`): every question (of
//! `Pipeline::ask` or of a streaming session) prefills its prompt into device KV pools sized
//! for it and decodes there, with the weights uploaded once at load (straight into their
//! device buffers; no CPU copy of the decoder is kept). The vision encoder, tokenizer and
//! sampler stay on the host.

use crate::RuntimeError;
use crate::cache::{KvChoice, KvStats};
use jetvlm_core::TokenKind;
use jetvlm_cuda::{
    CudaDevice, DeviceDecoder, DeviceInput, DeviceKvCache, DevicePolicy, DeviceSession, PoolMemory,
};
use jetvlm_decoder::{Decode, Input, Logits};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A CUDA device with the package's decoder loaded on it.
pub(crate) struct GpuDecoder {
    dev: CudaDevice,
    model: DeviceDecoder,
    policy: DevicePolicy,
}

impl GpuDecoder {
    /// Opens GPU 0 and uploads the decoder in `dir`; `kv` is the pipeline's KV choice.
    pub(crate) fn load(dir: &Path, kv: &KvChoice) -> Result<Self, RuntimeError> {
        let KvChoice::Policy(policy) = kv else {
            return Err(RuntimeError::Unsupported {
                op: "device: cuda",
                message:
                    "the f32 reference cache runs on the CPU only; choose a KV policy (fp16, mixed, ...)"
                        .into(),
            });
        };
        let dev = CudaDevice::open(0)?;
        let model = dev.load_decoder(dir)?;
        let c = &model.config().model;
        let policy = DevicePolicy::new(policy, c.num_key_value_heads, c.head_dim)?;
        Ok(Self { dev, model, policy })
    }

    pub(crate) fn name(&self) -> String {
        self.dev.info().name.clone()
    }

    /// Prefills `prompt` (text ids and frame embeddings, in order) on a fresh device cache
    /// sized for it plus `answer_tokens`, and returns the backend positioned after it with
    /// the prompt's last logits.
    pub(crate) fn prefill<'a>(
        &'a self,
        prompt: &[Input<'_>],
        answer_tokens: usize,
        tap: Arc<Mutex<KvStats>>,
    ) -> Result<(OnDevice<'a>, Logits), RuntimeError> {
        let inputs: Vec<DeviceInput<'_>> = prompt
            .iter()
            .map(|i| match *i {
                Input::Text { ids } => DeviceInput::Ids {
                    ids,
                    kind: TokenKind::Text,
                },
                Input::Embeddings { data, n, kind, .. } => {
                    DeviceInput::Embeddings { data, n, kind }
                }
            })
            .collect();
        let mut sizes: Vec<(TokenKind, usize)> =
            inputs.iter().map(|i| (i.kind(), i.len())).collect();
        // Answer tokens are appended one at a time after the prompt (plus the last one fed).
        sizes.push((TokenKind::Text, answer_tokens + 1));
        let c = &self.model.config().model;
        let cache = DeviceKvCache::for_spans(
            &self.dev,
            self.policy,
            c.num_hidden_layers,
            &sizes,
            PoolMemory::Device,
        )?;
        let fp16_bytes_per_token =
            (2 * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim) as u64;
        let mut backend = OnDevice {
            session: DeviceSession::new(&self.dev, &self.model, cache)?,
            tap,
            fp16_bytes_per_token,
            text_tokens: 0,
            frame_tokens: 0,
        };
        let logits = backend.run(&inputs)?;
        Ok((backend, logits))
    }
}

/// A device session a [`Generation`](jetvlm_decoder::Generation) decodes on; reports the
/// device cache's memory to the pipeline's KV tap after every step.
pub(crate) struct OnDevice<'a> {
    session: DeviceSession<'a>,
    tap: Arc<Mutex<KvStats>>,
    fp16_bytes_per_token: u64,
    text_tokens: usize,
    frame_tokens: usize,
}

impl OnDevice<'_> {
    fn run(&mut self, inputs: &[DeviceInput<'_>]) -> Result<Logits, RuntimeError> {
        let data = self.session.forward(inputs)?;
        for i in inputs {
            match i.kind() {
                TokenKind::Text => self.text_tokens += i.len(),
                TokenKind::Frame => self.frame_tokens += i.len(),
            }
        }
        self.report();
        let vocab = data.len();
        Ok(Logits {
            data,
            rows: 1,
            vocab,
        })
    }

    /// The device cache's bytes in use (blocks handed out, all layers) by precision.
    fn report(&self) {
        let cache = self.session.cache();
        let table = cache.table();
        let layout = &table.policy().layout;
        let layers = self.session.model().config().model.num_hidden_layers as u64;
        let (text_blocks, frame_blocks) = table.used_blocks();
        let fp16_bytes = text_blocks as u64 * layout.text_block_bytes() as u64 * layers;
        let quant_bytes = frame_blocks as u64 * layout.frame_block_bytes() as u64 * layers;
        let tokens = (self.text_tokens + self.frame_tokens) as u64;
        if let Ok(mut t) = self.tap.lock() {
            *t = KvStats {
                text_tokens: self.text_tokens,
                frame_tokens: self.frame_tokens,
                fp16_bytes,
                quant_bytes,
                f32_bytes: 0,
                total_bytes: fp16_bytes + quant_bytes,
                fp16_equivalent_bytes: tokens * self.fp16_bytes_per_token,
            };
        }
    }
}

impl Decode for OnDevice<'_> {
    type Error = RuntimeError;
    fn decode(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError> {
        let logits = self.session.decode(ids)?;
        self.text_tokens += ids.len();
        self.report();
        Ok(logits)
    }
}
