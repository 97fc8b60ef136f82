//! The device decoder against the CPU path on the committed decoder fixtures
//! (`tests/fixtures/decoder/<name>`): greedy tokens and prompt logits, offloaded KV, mixed and
//! per-layer frame formats, a camera session with eviction and roll-back. Written for any
//! [`Gpu`]: `jetvlm selftest --device cuda` runs it on the GPU's kernels, the test suite on
//! [`crate::SimDevice`] (the kernels' CPU twins).

use std::path::Path;

use jetvlm_decoder::{GenerateOptions, Generation, Input, LoadOptions, Model};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};

use crate::decoder::{DeviceDecoder, DeviceInput, DeviceKvCache, DeviceSession, model_err};
use crate::error::CudaError;
use crate::gpu::{Gpu, PoolMemory};
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
    /// The bound `logits_error` is held to: FP16-K/V rounding (1e-3), and for quantized
    /// weights also the CPU kernels' INT8 activations (decode and prefill; 1e-2; the
    /// device's quantized products take f32 activations, `gemv_rows_ref`'s arithmetic).
    pub logits_tolerance: f64,
    /// Greedy tokens recorded from transformers, when the fixture has them.
    pub transformers: Option<Vec<u32>>,
    /// A frame-heavy prompt (text, two 64-token frames, text): of the CPU FP16-KV greedy
    /// answer's tokens, how many the GPU with the mixed policy (frames INT4) predicts when fed
    /// the same history (teacher-forced), and the answer length.
    pub mixed_agreement: (usize, usize),
    pub mixed_policy: String,
    /// The same with a calibrated-style policy (a frame format per layer, cycling INT4
    /// per-channel, INT8 and INT4 per-token g32), the GPU pools of each layer in its own
    /// layout.
    pub per_layer_agreement: (usize, usize),
    pub per_layer_policy: String,
    /// A camera session (FP16 KV): prefix, frames A and B, a question and 3 answer tokens
    /// dropped again, A evicted, frame C, then the prompt's question: the GPU's greedy tokens
    /// (device pools evicting and truncating) and the CPU's (the same session without the
    /// dropped question, which must leave nothing behind).
    pub rolling: (Vec<u32>, Vec<u32>),
}

pub use crate::selftest::MIXED_AGREEMENT;
use crate::selftest::{agreement_frames, per_layer_check_policy};

impl DecoderCheck {
    pub fn first_mismatch(&self) -> Option<usize> {
        (0..self.gpu.len().max(self.cpu.len())).find(|&i| self.gpu.get(i) != self.cpu.get(i))
    }
    /// First token where the offloaded run differs from the CPU's.
    pub fn offload_mismatch(&self) -> Option<usize> {
        (0..self.offload.len().max(self.cpu.len()))
            .find(|&i| self.offload.get(i) != self.cpu.get(i))
    }
    /// Tokens (device and offloaded KV, and the camera session) and logits agree (logit
    /// error within FP16-K/V rounding, 1e-3).
    pub fn passed(&self) -> bool {
        self.first_mismatch().is_none()
            && self.offload_mismatch().is_none()
            && self.logits_error <= self.logits_tolerance
            && self.mixed_ok()
            && self.rolling_ok()
    }
    pub fn rolling_ok(&self) -> bool {
        !self.rolling.1.is_empty() && self.rolling.0 == self.rolling.1
    }
    pub fn mixed_ok(&self) -> bool {
        agrees(self.mixed_agreement) && agrees(self.per_layer_agreement)
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
        let mixed: String = [
            (&self.mixed_policy, self.mixed_agreement),
            (&self.per_layer_policy, self.per_layer_agreement),
        ]
        .iter()
        .map(|(policy, (same, n))| {
            format!(
                ", {policy} frames {same}/{n} teacher-forced{}",
                if agrees((*same, *n)) {
                    String::new()
                } else {
                    format!(" BELOW {:.0}%", 100.0 * MIXED_AGREEMENT)
                }
            )
        })
        .collect();
        let rolling = if self.rolling_ok() {
            format!(
                ", camera session (evict, roll back) {} tokens equal",
                self.rolling.1.len()
            )
        } else {
            format!(
                ", camera session (evict, roll back) DIFFERS: GPU {:?}, CPU {:?}",
                self.rolling.0, self.rolling.1
            )
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
                "{} decoder {:<10} ({} weights, fp16 KV): {} greedy tokens equal the CPU path; prompt logits error {:.3e} (bound {:.0e}){off}{mixed}{rolling}{tf}",
                if self.passed() { "PASS" } else { "FAIL" },
                self.name,
                self.weights,
                self.gpu.len(),
                self.logits_error,
                self.logits_tolerance
            ),
            Some(i) => format!(
                "FAIL decoder {:<10} ({} weights, fp16 KV): first mismatch at token {i} (GPU {:?}, CPU {:?}); prompt logits error {:.3e}{off}{mixed}{rolling}{tf}",
                self.name,
                self.weights,
                self.gpu.get(i),
                self.cpu.get(i),
                self.logits_error
            ),
        }
    }
}

/// `same` of `n` teacher-forced tokens reach [`MIXED_AGREEMENT`].
fn agrees((same, n): (usize, usize)) -> bool {
    n > 0 && same as f64 >= MIXED_AGREEMENT * n as f64
}

fn ids(v: &serde_json::Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32))
        .collect()
}

/// CPU FP16-KV greedy answer after a frame-heavy prompt, then the device with `policy`
/// teacher-forced along it: (tokens it predicts the same, answer length).
fn teacher_forced_agreement<G: Gpu>(
    dev: &G,
    cpu_model: &Model,
    model: &DeviceDecoder<G>,
    prompt: &[u32],
    tokens: usize,
    policy: &KvPolicy,
) -> Result<(usize, usize), CudaError> {
    let path = model.config().path.clone();
    let (split, frame_ids) = agreement_frames(prompt.len(), cpu_model.vocab_size() as u32);
    let frames: Vec<Vec<f32>> = frame_ids
        .iter()
        .map(|f| cpu_model.embed(f))
        .collect::<Result<_, _>>()
        .map_err(model_err(&path))?;
    let mut inputs = vec![Input::text(&prompt[..split])];
    for (i, f) in frames.iter().enumerate() {
        inputs.push(Input::frame(f, 64, i as u64));
    }
    inputs.push(Input::text(&prompt[split..]));
    let cap = prompt.len() + 128 + tokens + 1;
    let mut cache = MixedKvCache::new(cpu_model.cache_shape(), KvPolicy::fp16(), cap)
        .map_err(model_err(&path))?;
    let opts = GenerateOptions {
        max_tokens: tokens,
        ..Default::default()
    };
    let answer: Vec<u32> = Generation::start(cpu_model, &mut cache, &inputs, &[], None, opts)
        .map_err(model_err(&path))?
        .map(|s| s.map(|s| s.token))
        .collect::<Result<_, _>>()
        .map_err(model_err(&path))?;

    let c = &model.config().model;
    // `MixedKvCache` and `DevicePolicy` fit the group to the head dim.
    let dp = DevicePolicy::new(policy, c.num_key_value_heads, c.head_dim)?;
    let cache = DeviceKvCache::new(
        dev,
        dp,
        c.num_hidden_layers,
        prompt.len() + tokens + 1,
        128,
        4,
        PoolMemory::Device,
    )?;
    let mut session = DeviceSession::new(dev, model, cache)?;
    let text = jetvlm_core::TokenKind::Text;
    let frame = jetvlm_core::TokenKind::Frame;
    let mut logits = session.forward(&[
        DeviceInput::Ids {
            ids: &prompt[..split],
            kind: text,
        },
        DeviceInput::Ids {
            ids: &frame_ids[0],
            kind: frame,
        },
        DeviceInput::Ids {
            ids: &frame_ids[1],
            kind: frame,
        },
        DeviceInput::Ids {
            ids: &prompt[split..],
            kind: text,
        },
    ])?;
    let mut same = 0;
    for (i, &t) in answer.iter().enumerate() {
        same += (jetvlm_decoder::sampler::argmax(&logits) == t) as usize;
        if i + 1 < answer.len() {
            logits = session.forward(&[DeviceInput::Ids {
                ids: &[t],
                kind: text,
            }])?;
        }
    }
    Ok((same, answer.len()))
}

/// The camera session of [`DecoderCheck::rolling`]: (device tokens, CPU tokens).
fn rolling_session<G: Gpu>(
    dev: &G,
    cpu_model: &Model,
    model: &DeviceDecoder<G>,
    prompt: &[u32],
    tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>), CudaError> {
    let path = model.config().path.clone();
    let vocab = cpu_model.vocab_size() as u32;
    let frames: Vec<Vec<f32>> = (0..3u32)
        .map(|f| {
            let ids: Vec<u32> = (0..64u32).map(|i| (f * 131 + i * 17 + 3) % vocab).collect();
            cpu_model.embed(&ids)
        })
        .collect::<Result<_, _>>()
        .map_err(model_err(&path))?;
    let split = prompt.len().min(4);
    let (prefix, question) = (&prompt[..split], &prompt[split..]);
    let dropped: Vec<u32> = prompt.iter().rev().take(5).copied().collect();

    // CPU: prefix, A, B, evict A, C, question (the dropped question never happens).
    let shape = cpu_model.cache_shape();
    let cap = prompt.len() + 3 * 64 + tokens + 8;
    let mut cache = MixedKvCache::new(shape, KvPolicy::fp16(), cap).map_err(model_err(&path))?;
    let cpu_err = model_err(&path);
    cpu_model
        .forward(&[Input::text(prefix)], &mut cache)
        .map_err(&cpu_err)?;
    for (i, f) in frames[..2].iter().enumerate() {
        cpu_model
            .forward(&[Input::frame(f, 64, i as u64)], &mut cache)
            .map_err(&cpu_err)?;
    }
    cache.evict_frame(0).map_err(model_err(&path))?;
    cpu_model
        .forward(&[Input::frame(&frames[2], 64, 2)], &mut cache)
        .map_err(&cpu_err)?;
    let opts = GenerateOptions {
        max_tokens: tokens,
        ..Default::default()
    };
    let cpu: Vec<u32> = Generation::start(
        cpu_model,
        &mut cache,
        &[Input::text(question)],
        &[],
        None,
        opts,
    )
    .map_err(&cpu_err)?
    .map(|s| s.map(|s| s.token))
    .collect::<Result<_, _>>()
    .map_err(&cpu_err)?;

    // GPU: the same with a question and 3 answer tokens dropped after B.
    let c = &model.config().model;
    let policy = DevicePolicy::new(&KvPolicy::fp16(), c.num_key_value_heads, c.head_dim)?;
    let blocks = policy.blocks_for_session(
        prefix.len(),
        2,
        64,
        question.len().max(dropped.len() + 3) + tokens + 1,
    );
    let cache =
        DeviceKvCache::with_blocks(dev, policy, c.num_hidden_layers, blocks, PoolMemory::Device)?;
    let mut session = DeviceSession::new(dev, model, cache)?;
    let text = jetvlm_core::TokenKind::Text;
    let frame = |i: usize| DeviceInput::Embeddings {
        data: &frames[i],
        n: 64,
        kind: jetvlm_core::TokenKind::Frame,
        frame: Some(i as u64),
        deepstack: &[],
    };
    session.forward(&[DeviceInput::Ids {
        ids: prefix,
        kind: text,
    }])?;
    session.forward(&[frame(0)])?;
    session.forward(&[frame(1)])?;
    let answer = session.greedy(&dropped, 3)?;
    // The dropped question, its 3 answer tokens less the last (never fed).
    session
        .cache_mut()
        .truncate_last(dropped.len() + answer.len() - 1)?;
    session.cache_mut().evict_frame(0)?;
    session.forward(&[frame(2)])?;
    let gpu = session.greedy(question, tokens)?;
    Ok((gpu, cpu))
}

/// Greedy generation of `tokens` tokens on every fixture under `dir` present, the device
/// against the CPU. A fixture that cannot be read is an error naming it.
pub fn decoder_check<G: Gpu>(
    dev: &G,
    dir: &Path,
    tokens: usize,
) -> Result<Vec<DecoderCheck>, CudaError> {
    let mut out = Vec::new();
    for name in DECODER_FIXTURES {
        let fdir = dir.join(name);
        if !fdir.join("config.json").is_file() {
            continue;
        }
        let exp: serde_json::Value = jetvlm_core::config::load_json(&fdir.join("expected.json"))
            .map_err(model_err(&fdir))?;
        let prompt = ids(&exp["prompt_ids"]).ok_or_else(|| CudaError::Model {
            path: fdir.clone(),
            message: "expected.json has no prompt_ids".into(),
        })?;
        let transformers = ids(&exp["greedy_ids"]).map(|mut v| {
            v.truncate(tokens);
            v
        });

        let cpu_model = Model::load(&fdir, &LoadOptions::default()).map_err(model_err(&fdir))?;
        let cap = prompt.len() + tokens + 1;
        let mut cache = MixedKvCache::new(cpu_model.cache_shape(), KvPolicy::fp16(), cap)
            .map_err(model_err(&fdir))?;
        let cpu_logits = cpu_model
            .forward(&[Input::text(&prompt)], &mut cache)
            .map_err(model_err(&fdir))?;
        let mut cache = MixedKvCache::new(cpu_model.cache_shape(), KvPolicy::fp16(), cap)
            .map_err(model_err(&fdir))?;
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
        .map_err(model_err(&fdir))?
        .map(|s| s.map(|s| s.token))
        .collect::<Result<_, _>>()
        .map_err(model_err(&fdir))?;

        let model = DeviceDecoder::load(dev, &fdir)?;
        let c = &model.config().model;
        let policy = DevicePolicy::new(&KvPolicy::fp16(), c.num_key_value_heads, c.head_dim)?;
        let new_session = |memory| -> Result<DeviceSession<'_, G>, CudaError> {
            let cache =
                DeviceKvCache::new(dev, policy.clone(), c.num_hidden_layers, cap, 0, 2, memory)?;
            DeviceSession::new(dev, &model, cache)
        };
        let gpu_logits = new_session(PoolMemory::Device)?.forward(&[DeviceInput::Ids {
            ids: &prompt,
            kind: jetvlm_core::TokenKind::Text,
        }])?;
        let gpu = new_session(PoolMemory::Device)?.greedy(&prompt, tokens)?;
        let offload = if dev.can_map_host_memory() {
            new_session(PoolMemory::MappedHost)?.greedy(&prompt, tokens)?
        } else {
            gpu.clone()
        };
        let mixed = KvPolicy::mixed();
        let mixed_agreement =
            teacher_forced_agreement(dev, &cpu_model, &model, &prompt, tokens, &mixed)?;
        let per_layer = per_layer_check_policy(model.config().model.num_hidden_layers);
        let per_layer_agreement =
            teacher_forced_agreement(dev, &cpu_model, &model, &prompt, tokens, &per_layer)?;
        let rolling = rolling_session(dev, &cpu_model, &model, &prompt, tokens)?;
        out.push(DecoderCheck {
            name: name.to_string(),
            weights: model.weights_name(),
            gpu,
            cpu,
            offload,
            logits_error: normalized_error(&gpu_logits, cpu_logits.last()),
            logits_tolerance: if model.quant_format().is_some() {
                1e-2
            } else {
                1e-3
            },
            transformers,
            mixed_agreement,
            mixed_policy: mixed.name(),
            per_layer_agreement,
            per_layer_policy: per_layer.name(),
            rolling,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(gpu: Vec<u32>, offload: Vec<u32>, err: f64, mixed: (usize, usize)) -> DecoderCheck {
        DecoderCheck {
            name: "llama".into(),
            weights: "F32".into(),
            gpu,
            cpu: vec![1, 2, 3, 4],
            offload,
            logits_error: err,
            logits_tolerance: 1e-3,
            transformers: Some(vec![1, 2, 3, 5]),
            mixed_agreement: mixed,
            mixed_policy: "mixed".into(),
            per_layer_agreement: (31, 32),
            per_layer_policy: "mixed:layers=4c64/8t64".into(),
            rolling: (vec![5, 6], vec![5, 6]),
        }
    }

    #[test]
    fn passes_only_when_every_part_agrees() {
        let ok = check(vec![1, 2, 3, 4], vec![1, 2, 3, 4], 1e-6, (30, 32));
        assert!(ok.passed(), "{}", ok.line());
        assert!(ok.line().starts_with("PASS") && ok.line().contains("transformers 3/4"));
        let tokens = check(vec![1, 2, 9, 4], vec![1, 2, 3, 4], 1e-6, (30, 32));
        assert!(!tokens.passed());
        assert_eq!(tokens.first_mismatch(), Some(2));
        assert!(tokens.line().starts_with("FAIL") && tokens.line().contains("token 2"));
        let short = check(vec![1, 2, 3], vec![1, 2, 3, 4], 1e-6, (30, 32));
        assert_eq!(short.first_mismatch(), Some(3));
        let off = check(vec![1, 2, 3, 4], vec![1, 7, 3, 4], 1e-6, (30, 32));
        assert!(
            !off.passed()
                && off
                    .line()
                    .contains("offloaded KV FIRST MISMATCH at token 1")
        );
        assert!(!check(vec![1, 2, 3, 4], vec![1, 2, 3, 4], 2e-3, (30, 32)).passed());
        let mixed = check(vec![1, 2, 3, 4], vec![1, 2, 3, 4], 1e-6, (28, 32));
        assert!(!mixed.passed() && mixed.line().contains("BELOW 90%"));
        assert!(!check(vec![1, 2, 3, 4], vec![1, 2, 3, 4], 1e-6, (0, 0)).passed());
        let mut per_layer = check(vec![1, 2, 3, 4], vec![1, 2, 3, 4], 1e-6, (30, 32));
        assert!(
            per_layer
                .line()
                .contains("mixed:layers=4c64/8t64 frames 31/32")
        );
        per_layer.per_layer_agreement = (20, 32);
        assert!(!per_layer.passed() && per_layer.line().contains("BELOW 90%"));
        assert_eq!(
            per_layer_check_policy(4).name(),
            "mixed:layers=4c64/8t64/4t32/4c64"
        );
        let mut rolling = check(vec![1, 2, 3, 4], vec![1, 2, 3, 4], 1e-6, (30, 32));
        assert!(
            rolling
                .line()
                .contains("camera session (evict, roll back) 2 tokens equal")
        );
        rolling.rolling.0[1] = 7;
        assert!(!rolling.passed() && rolling.line().contains("DIFFERS"));
    }
}
