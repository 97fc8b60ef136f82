//! The decoder's view of a KV cache: the `append_span -> write (per layer) -> attend` calls
//! of `jetvlm_kvcache::MixedKvCache`, as a trait so the same forward pass also runs on
//! [`F32KvCache`], an exact f32 reference cache used to check the model against Hugging
//! Face outputs without the cache's FP16/INT4 rounding.

use crate::error::{DecoderError, Result};
use jetvlm_core::{FrameId, TokenKind};
pub use jetvlm_kvcache::CacheShape;
use jetvlm_kvcache::{AttendMask, MixedKvCache, Span};
use rayon::prelude::*;

/// What the forward pass needs from a KV cache. `Send` so that a forward pass can run on
/// a thread of the rayon pool (see [`crate::Model::forward`]).
pub trait KvStore: Send {
    /// Handle of an appended span.
    type Span: Send + Sync;
    fn shape(&self) -> CacheShape;
    /// RoPE position of the next appended token.
    fn next_position(&self) -> u32;
    /// Tokens cached.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reserves cells for `positions.len()` tokens of one kind.
    fn append_span(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
    ) -> Result<Self::Span>;
    /// Stores one layer's post-RoPE keys and values, `[span.len(), kv_heads, head_dim]`.
    fn write(&mut self, layer: usize, span: &Self::Span, k: &[f32], v: &[f32]) -> Result<()>;
    /// Causal grouped-query attention of the span's queries over the cache.
    fn attend(&self, layer: usize, span: &Self::Span, q: &[f32], out: &mut [f32]) -> Result<()>;
    /// [`KvStore::attend`] under `mask` (Gemma 3): with `whole_span` each query also sees the
    /// span's later tokens; with `window` only keys fewer than that many tokens back. A cache
    /// without masks refuses anything but the causal default.
    fn attend_masked(
        &self,
        layer: usize,
        span: &Self::Span,
        q: &[f32],
        out: &mut [f32],
        mask: AttendMask,
    ) -> Result<()> {
        if mask == AttendMask::default() {
            return self.attend(layer, span, q, out);
        }
        Err(DecoderError::Input(format!(
            "this KV cache has no attention mask ({mask:?})"
        )))
    }
    /// Drops the most recent `n` tokens.
    fn truncate_last(&mut self, n: usize) -> Result<()>;
    /// Whether the span's precision waits for its tokens' salience: the forward pass then
    /// measures the attention each token receives ([`crate::salience`]) in every layer and
    /// calls [`KvStore::settle`] after the last one.
    fn wants_salience(&self, _span: &Self::Span) -> bool {
        false
    }
    /// Places a span that [`KvStore::wants_salience`] by one score per token, after every
    /// layer has been written; `kv` holds each layer's keys and values as written. The span
    /// handle is not used again.
    fn settle(
        &mut self,
        _span: &Self::Span,
        _salience: &[f32],
        _kv: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<()> {
        Ok(())
    }
}

impl KvStore for MixedKvCache {
    type Span = Span;
    fn shape(&self) -> CacheShape {
        MixedKvCache::shape(self)
    }
    fn next_position(&self) -> u32 {
        MixedKvCache::next_position(self)
    }
    fn len(&self) -> usize {
        MixedKvCache::len(self)
    }
    fn append_span(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
    ) -> Result<Span> {
        // A frame whose most salient tokens may stay FP16 waits for the forward pass to
        // measure salience; everything else gets its final precision now.
        if let (TokenKind::Frame, Some(f)) = (kind, frame)
            && self.wants_salience(positions.len())
        {
            return Ok(self.append_pending_frame(positions, f)?);
        }
        Ok(MixedKvCache::append_span(self, kind, positions, frame)?)
    }
    fn write(&mut self, layer: usize, span: &Span, k: &[f32], v: &[f32]) -> Result<()> {
        Ok(MixedKvCache::write(self, layer, span, k, v)?)
    }
    fn attend(&self, layer: usize, span: &Span, q: &[f32], out: &mut [f32]) -> Result<()> {
        Ok(MixedKvCache::attend(self, layer, span, q, out)?)
    }
    fn attend_masked(
        &self,
        layer: usize,
        span: &Span,
        q: &[f32],
        out: &mut [f32],
        mask: AttendMask,
    ) -> Result<()> {
        Ok(MixedKvCache::attend_masked(
            self, layer, span, q, out, mask,
        )?)
    }
    fn truncate_last(&mut self, n: usize) -> Result<()> {
        Ok(MixedKvCache::truncate_last(self, n)?)
    }
    fn wants_salience(&self, span: &Span) -> bool {
        span.is_pending()
    }
    fn settle(&mut self, span: &Span, salience: &[f32], kv: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        self.settle_frame(span, salience, kv)?;
        Ok(())
    }
}

/// An exact f32 KV cache: every token's K and V kept as f32, attention computed in f64
/// accumulation. The reference the decoder is checked against; also selectable as the
/// `f32` KV policy of the CLI for comparisons.
#[derive(Clone, Debug)]
pub struct F32KvCache {
    shape: CacheShape,
    capacity: usize,
    tokens: usize,
    next_pos: u32,
    kinds: Vec<TokenKind>,
    /// Per layer `[tokens, kv_heads, head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Tokens written per layer (a layer is attended only after its write).
    written: Vec<usize>,
}

/// A span of the reference cache: the index of its first token and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct F32Span {
    pub start: usize,
    pub len: usize,
    pub kind: TokenKind,
}

impl F32KvCache {
    pub fn new(shape: CacheShape, capacity_tokens: usize) -> Self {
        F32KvCache {
            shape,
            capacity: capacity_tokens,
            tokens: 0,
            next_pos: 0,
            kinds: Vec::new(),
            k: vec![Vec::new(); shape.layers],
            v: vec![Vec::new(); shape.layers],
            written: vec![0; shape.layers],
        }
    }

    /// Kinds of the cached tokens, oldest first.
    pub fn kinds(&self) -> &[TokenKind] {
        &self.kinds
    }

    pub fn clear(&mut self) {
        *self = F32KvCache::new(self.shape, self.capacity);
    }

    fn row(&self) -> usize {
        self.shape.kv_heads * self.shape.head_dim
    }
}

impl KvStore for F32KvCache {
    type Span = F32Span;
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn next_position(&self) -> u32 {
        self.next_pos
    }
    fn len(&self) -> usize {
        self.tokens
    }
    fn append_span(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
    ) -> Result<F32Span> {
        if kind == TokenKind::Frame && frame.is_none() {
            return Err(DecoderError::RefCache(
                "frame span without a frame id".into(),
            ));
        }
        if self.tokens + positions.len() > self.capacity {
            return Err(DecoderError::RefCache(format!(
                "capacity of {} tokens exceeded ({} cached + {} new)",
                self.capacity,
                self.tokens,
                positions.len()
            )));
        }
        let span = F32Span {
            start: self.tokens,
            len: positions.len(),
            kind,
        };
        self.tokens += positions.len();
        self.kinds
            .extend(std::iter::repeat_n(kind, positions.len()));
        if let Some(&m) = positions.iter().max() {
            self.next_pos = self.next_pos.max(m + 1);
        }
        let row = self.row();
        for l in 0..self.shape.layers {
            self.k[l].resize(self.tokens * row, 0.0);
            self.v[l].resize(self.tokens * row, 0.0);
        }
        Ok(span)
    }
    fn write(&mut self, layer: usize, span: &F32Span, k: &[f32], v: &[f32]) -> Result<()> {
        let row = self.row();
        if layer >= self.shape.layers || k.len() != span.len * row || v.len() != span.len * row {
            return Err(DecoderError::RefCache(format!(
                "write layer {layer}: k/v lengths {}/{} for a span of {} tokens x {row}",
                k.len(),
                v.len(),
                span.len
            )));
        }
        if span.start + span.len > self.tokens {
            return Err(DecoderError::RefCache(
                "write to a span no longer cached".into(),
            ));
        }
        self.k[layer][span.start * row..(span.start + span.len) * row].copy_from_slice(k);
        self.v[layer][span.start * row..(span.start + span.len) * row].copy_from_slice(v);
        self.written[layer] = self.written[layer].max(span.start + span.len);
        Ok(())
    }
    fn attend(&self, layer: usize, span: &F32Span, q: &[f32], out: &mut [f32]) -> Result<()> {
        self.attend_masked(layer, span, q, out, AttendMask::default())
    }
    /// Exact: query `t` of the span sees keys `j` with `t_seq - window < j` and `j <= t_seq`
    /// (every key of its span with `whole_span`), as transformers' Gemma 3 masks compose the
    /// sliding window with the image block mask.
    fn attend_masked(
        &self,
        layer: usize,
        span: &F32Span,
        q: &[f32],
        out: &mut [f32],
        mask: AttendMask,
    ) -> Result<()> {
        let CacheShape {
            q_heads,
            kv_heads,
            head_dim: d,
            ..
        } = self.shape;
        if layer >= self.shape.layers || q.len() != span.len * q_heads * d || out.len() != q.len() {
            return Err(DecoderError::RefCache(format!(
                "attend layer {layer}: q/out lengths {}/{}",
                q.len(),
                out.len()
            )));
        }
        if self.written[layer] < span.start + span.len {
            return Err(DecoderError::RefCache(format!(
                "attend layer {layer} before its write"
            )));
        }
        let group = q_heads / kv_heads;
        let scale = 1.0 / (d as f64).sqrt();
        let (kc, vc) = (&self.k[layer], &self.v[layer]);
        out.par_chunks_mut(d).enumerate().for_each(|(qi, o)| {
            let t = qi / q_heads;
            let h = qi % q_heads;
            let kvh = h / group;
            let qv = &q[qi * d..(qi + 1) * d];
            let upto = if mask.whole_span {
                span.start + span.len
            } else {
                span.start + t + 1
            };
            let from = mask
                .window
                .map_or(0, |w| (span.start + t + 1).saturating_sub(w));
            let scores: Vec<f64> = (from..upto)
                .map(|j| {
                    let kr = &kc[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
                    kr.iter()
                        .zip(qv)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for (e, ov) in o.iter_mut().enumerate() {
                let mut acc = 0f64;
                for (j, wj) in (from..).zip(&w) {
                    acc += wj * vc[(j * kv_heads + kvh) * d + e] as f64;
                }
                *ov = (acc / z) as f32;
            }
        });
        Ok(())
    }
    fn truncate_last(&mut self, n: usize) -> Result<()> {
        if n > self.tokens {
            return Err(DecoderError::RefCache(format!(
                "truncate {n} of {} tokens",
                self.tokens
            )));
        }
        self.tokens -= n;
        self.kinds.truncate(self.tokens);
        let row = self.row();
        for l in 0..self.shape.layers {
            self.k[l].truncate(self.tokens * row);
            self.v[l].truncate(self.tokens * row);
            self.written[l] = self.written[l].min(self.tokens);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention of one query over `keys` (f64), for the mask tests.
    fn softmax_attend(q: &[f32], keys: &[&[f32]], vals: &[&[f32]]) -> Vec<f32> {
        let d = q.len();
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                k.iter()
                    .zip(q)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            })
            .map(|x| x / (d as f64).sqrt())
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..d)
            .map(|e| {
                (w.iter()
                    .zip(vals)
                    .map(|(p, v)| p * v[e] as f64)
                    .sum::<f64>()
                    / z) as f32
            })
            .collect()
    }

    /// Gemma 3's masks on both caches: a frame span after 5 text tokens whose queries see
    /// the whole frame (`whole_span`), and a window of 4 (query t sees keys t-3..=t, and
    /// with `whole_span` the frame's later tokens too; the window starts inside a cache
    /// block); the exact cache against plain softmax attention, the mixed cache (FP16 keys)
    /// with every kernel this CPU runs against the exact one.
    #[test]
    fn gemma_masks_whole_frame_and_window() {
        let shape = CacheShape {
            layers: 1,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 32,
        };
        let d = 32;
        let val = |i: usize, c: usize| ((i * 7 + c * 3) % 11) as f32 / 5.0 - 1.0;
        let rows = |from: usize, n: usize| -> Vec<f32> {
            (from..from + n)
                .flat_map(|i| (0..d).map(move |c| val(i, c)))
                .collect()
        };
        let mut exact = F32KvCache::new(shape, 64);
        let mut mixed = MixedKvCache::new(shape, jetvlm_kvcache::KvPolicy::fp16(), 64).unwrap();
        let text: Vec<u32> = (0..5).collect();
        let frame: Vec<u32> = (5..9).collect();
        let (te, tm) = (
            exact.append_span(TokenKind::Text, &text, None).unwrap(),
            KvStore::append_span(&mut mixed, TokenKind::Text, &text, None).unwrap(),
        );
        let (k, v) = (rows(0, 5), rows(50, 5));
        exact.write(0, &te, &k, &v).unwrap();
        KvStore::write(&mut mixed, 0, &tm, &k, &v).unwrap();
        let f: FrameId = 1;
        let (fe, fm) = (
            exact
                .append_span(TokenKind::Frame, &frame, Some(f))
                .unwrap(),
            KvStore::append_span(&mut mixed, TokenKind::Frame, &frame, Some(f)).unwrap(),
        );
        let (k2, v2) = (rows(5, 4), rows(55, 4));
        exact.write(0, &fe, &k2, &v2).unwrap();
        KvStore::write(&mut mixed, 0, &fm, &k2, &v2).unwrap();
        let keys: Vec<f32> = [k, k2].concat();
        let vals: Vec<f32> = [v, v2].concat();
        let key = |j: usize| &keys[j * d..(j + 1) * d];
        let value = |j: usize| &vals[j * d..(j + 1) * d];
        let q: Vec<f32> = rows(20, 8);
        let mask = |whole_span, window| AttendMask { whole_span, window };
        for (whole, window) in [
            (false, None),
            (true, None),
            (false, Some(4)),
            (true, Some(4)),
        ] {
            let mut got = vec![0f32; 8 * d];
            exact
                .attend_masked(0, &fe, &q, &mut got, mask(whole, window))
                .unwrap();
            for t in 0..4 {
                let at: usize = 5 + t;
                let upto = if whole { 9 } else { at + 1 };
                let from = window.map_or(0, |w: usize| (at + 1).saturating_sub(w));
                let ks: Vec<&[f32]> = (from..upto).map(key).collect();
                let vs: Vec<&[f32]> = (from..upto).map(value).collect();
                for h in 0..2 {
                    let qh = &q[(t * 2 + h) * d..][..d];
                    let want = softmax_attend(qh, &ks, &vs);
                    let g = &got[(t * 2 + h) * d..][..d];
                    let err = g
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(err < 1e-6, "whole {whole} window {window:?} t {t}: {err}");
                }
            }
            // Every kernel this CPU runs (reference, portable, AVX2, AVX-512 / NEON).
            for kernel in jetvlm_kvcache::Kernel::ALL
                .into_iter()
                .filter(|k| k.available())
            {
                let mut m = vec![0f32; 8 * d];
                mixed
                    .attend_masked_with(kernel, 0, &fm, &q, &mut m, mask(whole, window))
                    .unwrap();
                let err = m
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 2e-2,
                    "mixed ({kernel:?}) vs exact, whole {whole} window {window:?}: {err}"
                );
            }
        }
        // The bidirectional frame differs from the causal one (the mask matters).
        let (mut causal, mut both) = (vec![0f32; 8 * d], vec![0f32; 8 * d]);
        exact
            .attend_masked(0, &fe, &q, &mut causal, mask(false, None))
            .unwrap();
        exact
            .attend_masked(0, &fe, &q, &mut both, mask(true, None))
            .unwrap();
        assert_ne!(causal, both);
    }

    #[test]
    fn single_token_attends_to_itself() {
        let shape = CacheShape {
            layers: 1,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let mut c = F32KvCache::new(shape, 8);
        let s = c.append_span(TokenKind::Text, &[0], None).unwrap();
        let v = [1.0, 2.0, 3.0, 4.0];
        c.write(0, &s, &[0.5; 4], &v).unwrap();
        let mut out = [0f32; 8];
        c.attend(0, &s, &[1.0; 8], &mut out).unwrap();
        assert_eq!(&out[..4], &v);
        assert_eq!(&out[4..], &v);
        assert!(c.append_span(TokenKind::Frame, &[1], None).is_err());
        assert!(
            c.append_span(TokenKind::Text, &(1..9).collect::<Vec<_>>(), None)
                .is_err()
        );
    }
}
