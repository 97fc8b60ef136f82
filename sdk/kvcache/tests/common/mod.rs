#![allow(dead_code)]
//! Helpers shared by the integration tests: model-shaped random K/V/Q and error norms.

use jetvlm_core::TokenKind;
use jetvlm_kvcache::{CacheShape, KvPolicy, MixedKvCache, Span};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Random values in [-1, 1); with `outliers`, a few key channels are 20-50x larger.
pub fn rand_kv(rng: &mut StdRng, n: usize, kvh: usize, d: usize, outliers: bool) -> Vec<f32> {
    let big: Vec<f32> = (0..d)
        .map(|c| {
            if c % 16 == 5 {
                20.0 + 30.0 * ((c * 7 % 11) as f32 / 10.0)
            } else {
                1.0
            }
        })
        .collect();
    (0..n * kvh * d)
        .map(|i| {
            let v = rng.random_range(-1.0f32..1.0);
            if outliers {
                v * big[i % d] + 0.3 * big[i % d]
            } else {
                v
            }
        })
        .collect()
}

pub fn rand_q(rng: &mut StdRng, n: usize, qh: usize, d: usize) -> Vec<f32> {
    (0..n * qh * d)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect()
}

/// ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Appends text, then `frames` frames of `frame_tokens`, then text; writes random K/V in
/// every layer. Returns the spans with the K/V written.
pub fn fill(
    cache: &mut MixedKvCache,
    rng: &mut StdRng,
    text: usize,
    frames: usize,
    frame_tokens: usize,
    outliers: bool,
) -> Vec<(Span, Vec<f32>, Vec<f32>)> {
    let s = cache.shape();
    let mut spans = Vec::new();
    let mut push = |cache: &mut MixedKvCache, kind: TokenKind, n: usize, frame: Option<u64>| {
        let p0 = cache.next_position();
        let pos: Vec<u32> = (p0..p0 + n as u32).collect();
        let span = cache.append_span(kind, &pos, frame).unwrap();
        let mut kk = Vec::new();
        let mut vv = Vec::new();
        for layer in 0..s.layers {
            let k = rand_kv(
                rng,
                n,
                s.kv_heads,
                s.head_dim,
                outliers && kind == TokenKind::Frame,
            );
            let v = rand_kv(rng, n, s.kv_heads, s.head_dim, false);
            cache.write(layer, &span, &k, &v).unwrap();
            if layer == 0 {
                kk = k;
                vv = v;
            }
        }
        spans.push((span, kk, vv));
    };
    push(cache, TokenKind::Text, text / 2, None);
    for f in 0..frames {
        push(cache, TokenKind::Frame, frame_tokens, Some(f as u64));
    }
    push(cache, TokenKind::Text, text - text / 2, None);
    spans
}

/// Appends one decoded text token after what `cache` holds and writes random K/V for it in
/// every layer (its keys with outlier channels when `k_outliers`): the span a decode step
/// attends with.
pub fn decode_token(cache: &mut MixedKvCache, rng: &mut StdRng, k_outliers: bool) -> Span {
    let s = cache.shape();
    let p = cache.next_position();
    let span = cache.append_span(TokenKind::Text, &[p], None).unwrap();
    for layer in 0..s.layers {
        let k = rand_kv(rng, 1, s.kv_heads, s.head_dim, k_outliers);
        let v = rand_kv(rng, 1, s.kv_heads, s.head_dim, false);
        cache.write(layer, &span, &k, &v).unwrap();
    }
    span
}

pub fn shape(layers: usize, q: usize, kv: usize, d: usize) -> CacheShape {
    CacheShape {
        layers,
        q_heads: q,
        kv_heads: kv,
        head_dim: d,
    }
}

pub fn policies() -> Vec<KvPolicy> {
    [
        "fp16",
        "mixed",
        "int4-all",
        "int8-frames",
        "int2-frames",
        "mixed:keys=token",
        "mixed:group=32",
        "mixed:group=128",
        "mixed:qblock=32,fblock=16",
        "mixed:qblock=16,fblock=16",
        "mixed:bits=2,qblock=16",
        "int4-all:group=32,qblock=128",
        "mixed:bits=8,keys=token,group=32",
        "mixed:bits=2,keys=channel,qblock=128",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}
