//! The decoder on the GPU against the CPU path on the committed decoder fixtures
//! (`tests/fixtures/decoder/<name>`): greedy tokens and prompt logits.

use std::path::Path;

use jetvlm_decoder::{GenerateOptions, Generation, Input, LoadOptions, Model};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};

use super::decoder::{DeviceInput, DeviceKvCache, DeviceSession};
use super::device::CudaDevice;
use super::kv::PoolMemory;
use crate::error::CudaError;
use crate::kvtable::DevicePolicy;
use crate::reference::normalized_error;

/// Fixture directories the check runs when present.
pub const DECODER_FIXTURES: &[&str] = &["llama", "qwen2", "llama_f16", "llama_bf16"];

/// Result of one fixture: GPU greedy tokens against the CPU path's (FP16 KV both).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderCheck {
    pub name: String,
    pub weights: String,
    pub gpu: Vec<u32>,
    pub cpu: Vec<u32>,
    /// GPU greedy tokens with the KV pools offloaded to host memory (streamed per layer).
    pub offload: Vec<u32>,
    /// Normalised error of the GPU prompt logits against the CPU's.
    pub logits_error: f64,
    /// Greedy tokens recorded from transformers, when the fixture has them.
    pub transformers: Option<Vec<u32>>,
}

impl DecoderCheck {
    pub fn first_mismatch(&self) -> Option<usize> {
        (0..self.gpu.len().max(self.cpu.len())).find(|&i| self.gpu.get(i) != self.cpu.get(i))
    }
    /// First token where the offloaded run differs from the CPU's.
    pub fn offload_mismatch(&self) -> Option<usize> {
        (0..self.offload.len().max(self.cpu.len()))
            .find(|&i| self.offload.get(i) != self.cpu.get(i))
    }
    /// Tokens (device and offloaded KV) and logits agree (logit error within FP16-K/V
    /// rounding, 1e-3).
    pub fn passed(&self) -> bool {
        self.first_mismatch().is_none()
            && self.offload_mismatch().is_none()
            && self.logits_error <= 1e-3
    }
    pub fn line(&self) -> String {
        let off = match self.offload_mismatch() {
            None => ", offloaded KV equal".to_string(),
            Some(i) => format!(
                ", offloaded KV FIRST MISMATCH at token {i} (GPU {:?}, CPU {:?})",
                self.offload.get(i),
                self.cpu.get(i)
            ),
        };
        let tf = match &self.transformers {
            Some(t) => format!(
                ", transformers {}/{}",
                t.iter().zip(&self.gpu).filter(|(a, b)| a == b).count(),
                t.len()
            ),
            None => String::new(),
        };
        match self.first_mismatch() {
            None => format!(
                "{} decoder {:<10} ({} weights, fp16 KV): {} greedy tokens equal the CPU path; prompt logits error {:.3e}{off}{tf}",
                if self.passed() { "PASS" } else { "FAIL" },
                self.name,
                self.weights,
                self.gpu.len(),
                self.logits_error
            ),
            Some(i) => format!(
                "FAIL decoder {:<10} ({} weights, fp16 KV): first mismatch at token {i} (GPU {:?}, CPU {:?}); prompt logits error {:.3e}{off}{tf}",
                self.name,
                self.weights,
                self.gpu.get(i),
                self.cpu.get(i),
                self.logits_error
            ),
        }
    }
}

fn ids(v: &serde_json::Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32))
        .collect()
}

impl CudaDevice {
    /// Greedy generation of `tokens` tokens on every fixture under `dir` present, GPU against
    /// CPU. A fixture that cannot be read is an error naming it.
    pub fn decoder_check(&self, dir: &Path, tokens: usize) -> Result<Vec<DecoderCheck>, CudaError> {
        let mut out = Vec::new();
        for name in DECODER_FIXTURES {
            let fdir = dir.join(name);
            if !fdir.join("config.json").is_file() {
                continue;
            }
            let model_err = |message: String| CudaError::Model {
                path: fdir.clone(),
                message,
            };
            let exp: serde_json::Value =
                jetvlm_core::config::load_json(&fdir.join("expected.json"))
                    .map_err(|e| model_err(e.to_string()))?;
            let prompt = ids(&exp["prompt_ids"])
                .ok_or_else(|| model_err("expected.json has no prompt_ids".into()))?;
            let transformers = ids(&exp["greedy_ids"]).map(|mut v| {
                v.truncate(tokens);
                v
            });

            let cpu_model = Model::load(&fdir, &LoadOptions::default())
                .map_err(|e| model_err(e.to_string()))?;
            let cap = prompt.len() + tokens + 1;
            let mut cache = MixedKvCache::new(cpu_model.cache_shape(), KvPolicy::fp16(), cap)
                .map_err(|e| model_err(e.to_string()))?;
            let cpu_logits = cpu_model
                .forward(&[Input::text(&prompt)], &mut cache)
                .map_err(|e| model_err(e.to_string()))?;
            let mut cache = MixedKvCache::new(cpu_model.cache_shape(), KvPolicy::fp16(), cap)
                .map_err(|e| model_err(e.to_string()))?;
            let opts = GenerateOptions {
                max_tokens: tokens,
                ..Default::default()
            };
            let cpu: Vec<u32> = Generation::start(
                &cpu_model,
                &mut cache,
                &[Input::text(&prompt)],
                &[],
                None,
                opts,
            )
            .map_err(|e| model_err(e.to_string()))?
            .map(|s| s.map(|s| s.token))
            .collect::<Result<_, _>>()
            .map_err(|e| model_err(e.to_string()))?;

            let model = self.load_decoder(&fdir)?;
            let c = &model.config().model;
            let policy = DevicePolicy::new(&KvPolicy::fp16(), c.num_key_value_heads, c.head_dim)?;
            let new_session = |memory| -> Result<DeviceSession<'_>, CudaError> {
                let cache =
                    DeviceKvCache::new(self, policy, c.num_hidden_layers, cap, 0, 2, memory)?;
                DeviceSession::new(self, &model, cache)
            };
            let gpu_logits = new_session(PoolMemory::Device)?.forward(&[DeviceInput::Ids {
                ids: &prompt,
                kind: jetvlm_core::TokenKind::Text,
            }])?;
            let gpu = new_session(PoolMemory::Device)?.greedy(&prompt, tokens)?;
            let offload = if self.info().can_map_host_memory {
                new_session(PoolMemory::MappedHost)?.greedy(&prompt, tokens)?
            } else {
                gpu.clone()
            };
            out.push(DecoderCheck {
                name: name.to_string(),
                weights: model.weight_dtype().to_string(),
                gpu,
                cpu,
                offload,
                logits_error: normalized_error(&gpu_logits, cpu_logits.last()),
                transformers,
            });
        }
        Ok(out)
    }
}
