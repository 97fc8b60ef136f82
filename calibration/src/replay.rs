//! Replaying recorded KV traffic through the mixed cache under a policy, and measuring each
//! layer's attention-output error against the exact outputs.
//!
//! The error of a layer is the relative RMS error of the attention outputs of the recorded
//! queries (text after a frame: the [`crate::Recorder`] keeps only those):
//! `sqrt(sum |o - o_exact|^2 / sum |o_exact|^2)` over those queries and heads. Every layer
//! gets the exact keys, values and queries of the recorded run (teacher forcing), so a
//! layer's error depends on its own format only: that is what lets each layer pick its own.

use crate::CalibrationError;
use crate::record::{Event, Prompt, Trace};
use jetvlm_kvcache::{CacheShape, KvPolicy, MixedKvCache, Span};

/// What one policy did to the recorded traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Relative RMS attention-output error per layer (0 when no query saw a frame).
    pub layer_errors: Vec<f64>,
    /// Largest relative error of one query head's output, per layer.
    pub worst_head_errors: Vec<f64>,
    /// Text queries (tokens) that saw frames, summed over prompts.
    pub text_queries: usize,
    /// KV bytes held at the end of each prompt, summed over prompts: FP16 blocks and
    /// quantized blocks (all layers).
    pub fp16_block_bytes: u64,
    pub quant_bytes: u64,
    /// The same tokens all-FP16.
    pub fp16_bytes: u64,
    /// Frame tokens cached at the end of each prompt, summed over prompts.
    pub frame_tokens: usize,
}

impl Measurement {
    /// KV bytes held (FP16 and quantized blocks).
    pub fn kv_bytes(&self) -> u64 {
        self.fp16_block_bytes + self.quant_bytes
    }
    pub fn max_error(&self) -> f64 {
        self.layer_errors.iter().copied().fold(0.0, f64::max)
    }
    pub fn mean_error(&self) -> f64 {
        self.layer_errors.iter().sum::<f64>() / self.layer_errors.len().max(1) as f64
    }
}

/// Error sums of one policy over the prompts replayed so far.
#[derive(Clone, Debug)]
pub struct Accumulator {
    policy: KvPolicy,
    err2: Vec<f64>,
    ref2: Vec<f64>,
    worst: Vec<f64>,
    text_queries: usize,
    fp16_block_bytes: u64,
    quant_bytes: u64,
    fp16_bytes: u64,
    frame_tokens: usize,
}

impl Accumulator {
    pub fn new(policy: KvPolicy, shape: CacheShape) -> Self {
        Accumulator {
            policy,
            err2: vec![0.0; shape.layers],
            ref2: vec![0.0; shape.layers],
            worst: vec![0.0; shape.layers],
            text_queries: 0,
            fp16_block_bytes: 0,
            quant_bytes: 0,
            fp16_bytes: 0,
            frame_tokens: 0,
        }
    }

    pub fn policy(&self) -> &KvPolicy {
        &self.policy
    }

    /// Replays one prompt's traffic through a fresh [`MixedKvCache`] with the policy.
    pub fn add(&mut self, shape: CacheShape, prompt: &Prompt) -> Result<(), CalibrationError> {
        let (qh, d) = (shape.q_heads, shape.head_dim);
        if self.err2.len() != shape.layers {
            return Err(CalibrationError::Trace {
                message: format!(
                    "a prompt of a {}-layer model added to a {}-layer calibration",
                    shape.layers,
                    self.err2.len()
                ),
            });
        }
        let mut cache = MixedKvCache::new(shape, self.policy.clone(), prompt.tokens().max(1))?;
        let mut spans: Vec<Span> = Vec::new();
        let mut out = Vec::new();
        for event in &prompt.events {
            match event {
                Event::Append {
                    kind,
                    positions,
                    frame,
                } => {
                    spans.push(cache.append_span(*kind, positions, *frame)?);
                }
                Event::Write { layer, span, k, v } => {
                    let s = spans.get(*span).ok_or(CalibrationError::Trace {
                        message: format!("write to span {span} before it was appended"),
                    })?;
                    cache.write(*layer, s, k, v)?;
                }
                Event::Attend {
                    layer,
                    span,
                    q,
                    exact,
                } => {
                    let s = spans.get(*span).ok_or(CalibrationError::Trace {
                        message: format!("attention of span {span} before it was appended"),
                    })?;
                    out.resize(q.len(), 0.0);
                    cache.attend(*layer, s, q, &mut out)?;
                    for (o, x) in out.chunks_exact(d).zip(exact.chunks_exact(d)) {
                        let e: f64 = o
                            .iter()
                            .zip(x)
                            .map(|(a, b)| (a - b) as f64)
                            .map(|t| t * t)
                            .sum();
                        let r: f64 = x.iter().map(|&b| b as f64 * b as f64).sum();
                        self.err2[*layer] += e;
                        self.ref2[*layer] += r;
                        if r > 0.0 {
                            self.worst[*layer] = self.worst[*layer].max((e / r).sqrt());
                        }
                    }
                    if *layer == 0 {
                        self.text_queries += q.len() / (qh * d);
                    }
                }
                Event::Truncate { n } => cache.truncate_last(*n)?,
            }
        }
        let mem = cache.memory();
        self.fp16_block_bytes += mem.fp16_bytes;
        self.quant_bytes += mem.quant_bytes;
        self.fp16_bytes += mem.fp16_equivalent_bytes;
        self.frame_tokens += mem.frame_tokens;
        Ok(())
    }

    /// The measurement over the prompts added.
    pub fn measurement(&self) -> Measurement {
        Measurement {
            layer_errors: self
                .err2
                .iter()
                .zip(&self.ref2)
                .map(|(&e, &r)| if r > 0.0 { (e / r).sqrt() } else { 0.0 })
                .collect(),
            worst_head_errors: self.worst.clone(),
            text_queries: self.text_queries,
            fp16_block_bytes: self.fp16_block_bytes,
            quant_bytes: self.quant_bytes,
            fp16_bytes: self.fp16_bytes,
            frame_tokens: self.frame_tokens,
        }
    }
}

/// Replays `trace` through a [`MixedKvCache`] with `policy` (one cache per prompt).
pub fn replay(trace: &Trace, policy: &KvPolicy) -> Result<Measurement, CalibrationError> {
    let mut acc = Accumulator::new(policy.clone(), trace.shape);
    for prompt in &trace.prompts {
        acc.add(trace.shape, prompt)?;
    }
    Ok(acc.measurement())
}
