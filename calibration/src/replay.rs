//! Replaying recorded KV traffic through the mixed cache under a policy, and measuring each
//! layer's attention-output error against the exact outputs.
//!
//! The error of a layer is the relative RMS error of the attention outputs of text queries
//! (prompt and answer tokens) that see at least one frame token:
//! `sqrt(sum |o - o_exact|^2 / sum |o_exact|^2)` over those queries and heads. Every layer
//! gets the exact keys, values and queries of the recorded run (teacher forcing), so a
//! layer's error depends on its own format only: that is what lets each layer pick its own.

use crate::CalibrationError;
use crate::record::{Event, Trace};
use jetvlm_core::TokenKind;
use jetvlm_kvcache::{KvPolicy, MixedKvCache, Span};

/// What one policy did to the recorded traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Relative RMS attention-output error per layer (0 when no query saw a frame).
    pub layer_errors: Vec<f64>,
    /// Largest relative error of one query head's output, per layer.
    pub worst_head_errors: Vec<f64>,
    /// Text queries (tokens) that saw frames, summed over prompts (per layer).
    pub text_queries: usize,
    /// KV bytes held at the end of each prompt, summed over prompts.
    pub kv_bytes: u64,
    /// The same tokens all-FP16.
    pub fp16_bytes: u64,
    /// Frame tokens cached at the end of each prompt, summed over prompts.
    pub frame_tokens: usize,
}

impl Measurement {
    pub fn max_error(&self) -> f64 {
        self.layer_errors.iter().copied().fold(0.0, f64::max)
    }
    pub fn mean_error(&self) -> f64 {
        self.layer_errors.iter().sum::<f64>() / self.layer_errors.len().max(1) as f64
    }
}

/// Replays `trace` through a [`MixedKvCache`] with `policy` (one cache per prompt).
pub fn replay(trace: &Trace, policy: &KvPolicy) -> Result<Measurement, CalibrationError> {
    let shape = trace.shape;
    let (qh, d) = (shape.q_heads, shape.head_dim);
    let mut err2 = vec![0f64; shape.layers];
    let mut ref2 = vec![0f64; shape.layers];
    let mut worst = vec![0f64; shape.layers];
    let mut m = Measurement {
        layer_errors: Vec::new(),
        worst_head_errors: Vec::new(),
        text_queries: 0,
        kv_bytes: 0,
        fp16_bytes: 0,
        frame_tokens: 0,
    };
    for prompt in &trace.prompts {
        let mut cache = MixedKvCache::new(shape, policy.clone(), prompt.tokens().max(1))?;
        // Per appended span: its handle, kind, and whether a frame was cached when it came.
        let mut spans: Vec<(Span, TokenKind, bool)> = Vec::new();
        let mut out = Vec::new();
        for event in &prompt.events {
            match event {
                Event::Append {
                    kind,
                    positions,
                    frame,
                } => {
                    let saw_frame = cache.memory().frame_tokens > 0 || *kind == TokenKind::Frame;
                    let span = cache.append_span(*kind, positions, *frame)?;
                    spans.push((span, *kind, saw_frame));
                }
                Event::Write { layer, span, k, v } => {
                    let (s, ..) = spans.get(*span).ok_or(CalibrationError::Trace {
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
                    let (s, kind, saw_frame) = spans.get(*span).ok_or(CalibrationError::Trace {
                        message: format!("attention of span {span} before it was appended"),
                    })?;
                    if *kind != TokenKind::Text || !saw_frame {
                        continue;
                    }
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
                        err2[*layer] += e;
                        ref2[*layer] += r;
                        if r > 0.0 {
                            worst[*layer] = worst[*layer].max((e / r).sqrt());
                        }
                    }
                    if *layer == 0 {
                        m.text_queries += q.len() / (qh * d);
                    }
                }
                Event::Truncate { n } => cache.truncate_last(*n)?,
            }
        }
        let mem = cache.memory();
        m.kv_bytes += mem.total_bytes;
        m.fp16_bytes += mem.fp16_equivalent_bytes;
        m.frame_tokens += mem.frame_tokens;
    }
    m.layer_errors = err2
        .iter()
        .zip(&ref2)
        .map(|(&e, &r)| if r > 0.0 { (e / r).sqrt() } else { 0.0 })
        .collect();
    m.worst_head_errors = worst;
    Ok(m)
}
