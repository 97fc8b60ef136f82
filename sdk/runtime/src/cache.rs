//! The KV cache the runtime runs on: the mixed-precision cache under a [`KvPolicy`], or the
//! decoder's exact f32 reference cache (policy name `f32`) for comparisons against
//! reference implementations. Both sit behind the decoder's [`KvStore`] interface.
//!
//! The cache reports its memory to a shared tap after every change, so a running
//! generation (which holds the cache) can still be asked for the bytes in use.

use crate::RuntimeError;
use jetvlm_core::{FrameId, TokenKind};
use jetvlm_decoder::{F32KvCache, KvStore};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// Which cache to build.
#[derive(Clone, Debug, PartialEq)]
pub enum KvChoice {
    /// Every K/V kept in f32 (the reference; no eviction).
    Exact,
    Policy(KvPolicy),
}

impl KvChoice {
    /// Parses a policy name; `f32` selects the exact reference cache.
    pub fn parse(s: &str) -> Result<Self, jetvlm_kvcache::KvError> {
        if s.trim().eq_ignore_ascii_case("f32") {
            return Ok(KvChoice::Exact);
        }
        Ok(KvChoice::Policy(s.trim().parse()?))
    }

    pub fn name(&self) -> String {
        match self {
            KvChoice::Exact => "f32".into(),
            KvChoice::Policy(p) => p.name(),
        }
    }
}

/// KV cache bytes by precision (all layers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct KvStats {
    /// Cached text tokens (system prompt, question, answer).
    pub text_tokens: usize,
    /// Cached frame tokens.
    pub frame_tokens: usize,
    /// Bytes of FP16 blocks (text, and frame tokens the policy keeps FP16).
    pub fp16_bytes: u64,
    /// Bytes of quantized frame blocks, scales and zeros included.
    pub quant_bytes: u64,
    /// Bytes of the exact f32 reference cache (0 under a KV policy).
    pub f32_bytes: u64,
    /// All KV bytes: FP16 + quantized + f32.
    pub total_bytes: u64,
    /// Bytes the same tokens would take all-FP16.
    pub fp16_equivalent_bytes: u64,
}

/// The runtime's KV cache.
pub struct KvBackend {
    inner: Inner,
    tap: Arc<Mutex<KvStats>>,
    /// Per-token FP16 bytes over all layers (K and V).
    fp16_bytes_per_token: u64,
    /// RoPE position of the next token. Follows the appended spans, and is rewound with
    /// [`KvBackend::rewind`] when a question and its answer are rolled back, so the next
    /// question sits at the same positions (and sees the same context) as the last one.
    next_pos: u32,
}

enum Inner {
    Mixed(Box<MixedKvCache>),
    Exact(F32KvCache),
}

/// A span of either cache.
#[derive(Clone, Debug)]
pub enum BackendSpan {
    Mixed(jetvlm_kvcache::Span),
    Exact(jetvlm_decoder::kv::F32Span),
}

impl KvBackend {
    pub fn new(
        choice: &KvChoice,
        shape: jetvlm_kvcache::CacheShape,
        capacity_tokens: usize,
    ) -> Result<Self, RuntimeError> {
        let inner = match choice {
            KvChoice::Exact => Inner::Exact(F32KvCache::new(shape, capacity_tokens)),
            KvChoice::Policy(p) => Inner::Mixed(Box::new(MixedKvCache::new(
                shape,
                p.clone(),
                capacity_tokens,
            )?)),
        };
        let fp16_bytes_per_token = (shape.layers * shape.kv_heads * shape.head_dim * 2 * 2) as u64;
        let mut b = KvBackend {
            inner,
            tap: Arc::new(Mutex::new(KvStats::default())),
            fp16_bytes_per_token,
            next_pos: 0,
        };
        b.refresh();
        Ok(b)
    }

    /// Memory now.
    pub fn memory(&self) -> KvStats {
        match &self.inner {
            Inner::Mixed(c) => {
                let m = c.memory();
                KvStats {
                    text_tokens: m.text_tokens,
                    frame_tokens: m.frame_tokens,
                    fp16_bytes: m.fp16_bytes,
                    quant_bytes: m.quant_bytes,
                    f32_bytes: 0,
                    total_bytes: m.total_bytes,
                    fp16_equivalent_bytes: m.fp16_equivalent_bytes,
                }
            }
            Inner::Exact(c) => {
                let kinds = c.kinds();
                let frame_tokens = kinds.iter().filter(|k| **k == TokenKind::Frame).count();
                let tokens = kinds.len() as u64;
                let f32_bytes = tokens * self.fp16_bytes_per_token * 2;
                KvStats {
                    text_tokens: kinds.len() - frame_tokens,
                    frame_tokens,
                    fp16_bytes: 0,
                    quant_bytes: 0,
                    f32_bytes,
                    total_bytes: f32_bytes,
                    fp16_equivalent_bytes: tokens * self.fp16_bytes_per_token,
                }
            }
        }
    }

    /// A handle that always holds the latest [`memory`](Self::memory).
    pub fn tap(&self) -> Arc<Mutex<KvStats>> {
        self.tap.clone()
    }

    fn refresh(&mut self) {
        let m = self.memory();
        if let Ok(mut t) = self.tap.lock() {
            *t = m;
        }
    }

    pub fn clear(&mut self) {
        match &mut self.inner {
            Inner::Mixed(c) => c.clear(),
            Inner::Exact(c) => c.clear(),
        }
        self.next_pos = 0;
        self.refresh();
    }

    /// Drops the most recent `n` tokens and makes `position` the next RoPE position (the
    /// first position of the dropped tokens), so rolled-back positions are reused.
    pub fn roll_back(&mut self, n: usize, position: u32) -> Result<(), RuntimeError> {
        if n > 0 {
            KvStore::truncate_last(self, n)?;
        }
        self.next_pos = position;
        Ok(())
    }

    /// Drops a frame's tokens (mixed cache only; the reference cache keeps everything).
    pub fn evict_frame(&mut self, frame: FrameId) -> Result<(), RuntimeError> {
        match &mut self.inner {
            Inner::Mixed(c) => c.evict_frame(frame)?,
            Inner::Exact(_) => {
                return Err(RuntimeError::Unsupported {
                    op: "evicting a frame",
                    message: "the f32 reference cache cannot evict; choose a KV policy (fp16, mixed, ...)"
                        .into(),
                });
            }
        }
        self.refresh();
        Ok(())
    }

    pub fn supports_eviction(&self) -> bool {
        matches!(self.inner, Inner::Mixed(_))
    }
}

impl KvStore for KvBackend {
    type Span = BackendSpan;

    fn shape(&self) -> jetvlm_kvcache::CacheShape {
        match &self.inner {
            Inner::Mixed(c) => KvStore::shape(c.as_ref()),
            Inner::Exact(c) => KvStore::shape(c),
        }
    }

    fn next_position(&self) -> u32 {
        self.next_pos
    }

    fn len(&self) -> usize {
        match &self.inner {
            Inner::Mixed(c) => KvStore::len(c.as_ref()),
            Inner::Exact(c) => KvStore::len(c),
        }
    }

    fn append_span(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
    ) -> jetvlm_decoder::Result<BackendSpan> {
        let span = match &mut self.inner {
            Inner::Mixed(c) => {
                BackendSpan::Mixed(KvStore::append_span(c.as_mut(), kind, positions, frame)?)
            }
            Inner::Exact(c) => BackendSpan::Exact(KvStore::append_span(c, kind, positions, frame)?),
        };
        if let Some(&last) = positions.iter().max() {
            self.next_pos = self.next_pos.max(last + 1);
        }
        self.refresh();
        Ok(span)
    }

    fn write(
        &mut self,
        layer: usize,
        span: &BackendSpan,
        k: &[f32],
        v: &[f32],
    ) -> jetvlm_decoder::Result<()> {
        match (&mut self.inner, span) {
            (Inner::Mixed(c), BackendSpan::Mixed(s)) => KvStore::write(c.as_mut(), layer, s, k, v),
            (Inner::Exact(c), BackendSpan::Exact(s)) => KvStore::write(c, layer, s, k, v),
            _ => Err(span_mismatch()),
        }
    }

    fn attend(
        &self,
        layer: usize,
        span: &BackendSpan,
        q: &[f32],
        out: &mut [f32],
    ) -> jetvlm_decoder::Result<()> {
        match (&self.inner, span) {
            (Inner::Mixed(c), BackendSpan::Mixed(s)) => {
                KvStore::attend(c.as_ref(), layer, s, q, out)
            }
            (Inner::Exact(c), BackendSpan::Exact(s)) => KvStore::attend(c, layer, s, q, out),
            _ => Err(span_mismatch()),
        }
    }

    fn attend_masked(
        &self,
        layer: usize,
        span: &BackendSpan,
        q: &[f32],
        out: &mut [f32],
        mask: jetvlm_kvcache::AttendMask,
    ) -> jetvlm_decoder::Result<()> {
        match (&self.inner, span) {
            (Inner::Mixed(c), BackendSpan::Mixed(s)) => {
                KvStore::attend_masked(c.as_ref(), layer, s, q, out, mask)
            }
            (Inner::Exact(c), BackendSpan::Exact(s)) => {
                KvStore::attend_masked(c, layer, s, q, out, mask)
            }
            _ => Err(span_mismatch()),
        }
    }

    fn truncate_last(&mut self, n: usize) -> jetvlm_decoder::Result<()> {
        match &mut self.inner {
            Inner::Mixed(c) => KvStore::truncate_last(c.as_mut(), n)?,
            Inner::Exact(c) => KvStore::truncate_last(c, n)?,
        }
        self.refresh();
        Ok(())
    }

    fn wants_salience(&self, span: &BackendSpan) -> bool {
        match (&self.inner, span) {
            (Inner::Mixed(c), BackendSpan::Mixed(s)) => KvStore::wants_salience(c.as_ref(), s),
            _ => false,
        }
    }

    fn settle(
        &mut self,
        span: &BackendSpan,
        salience: &[f32],
        kv: &[(Vec<f32>, Vec<f32>)],
    ) -> jetvlm_decoder::Result<()> {
        match (&mut self.inner, span) {
            (Inner::Mixed(c), BackendSpan::Mixed(s)) => {
                KvStore::settle(c.as_mut(), s, salience, kv)?;
            }
            (Inner::Exact(_), BackendSpan::Exact(_)) => {}
            _ => return Err(span_mismatch()),
        }
        self.refresh();
        Ok(())
    }
}

fn span_mismatch() -> jetvlm_decoder::DecoderError {
    jetvlm_decoder::DecoderError::Input("span from another cache".into())
}
