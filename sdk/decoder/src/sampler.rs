//! Next-token selection: greedy, or temperature sampling restricted by top-k and top-p, after
//! a repetition penalty; seeded for reproducibility. The order of the logit processors is
//! Hugging Face's: repetition penalty, temperature, top-k, top-p.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

/// Sampling settings. [`SamplerConfig::validate`] checks every field's domain; every path
/// that builds one from user input (flags, runtime config) runs it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SamplerConfig {
    /// 0 picks the most likely token (greedy); otherwise a finite positive number.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: no limit).
    pub top_p: f32,
    /// Divides positive and multiplies negative logits of already-seen tokens (1: off); a
    /// finite positive number.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks each parameter against its domain: `temperature` finite and >= 0,
    /// `top_p` in (0, 1], `repetition_penalty` finite and > 0. NaN and infinities are
    /// refused (a NaN temperature turns every probability into NaN and the draw into
    /// garbage). The error names the field.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |field, value, expected| {
            Err(crate::DecoderError::Sampling {
                field,
                value,
                expected,
            })
        };
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return bad(
                "temperature",
                t,
                "must be a finite number >= 0 (0 is greedy)",
            );
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad("top_p", p, "must lie in (0, 1] (1 keeps every token)");
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return bad(
                "repetition_penalty",
                r,
                "must be a finite number > 0 (1 is off)",
            );
        }
        Ok(())
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    scratch: Vec<f32>,
}

/// Index of the largest value (the first one on ties); NaN never wins.
pub fn argmax(v: &[f32]) -> u32 {
    // Two passes that vectorize (a 49k-token vocabulary: a few us instead of ~40 in one
    // chain of compares): the largest value in 16 independent lanes, NaN never taken, then
    // the first chunk and index holding it.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let best = lanes
        .into_iter()
        .chain(chunks.remainder().iter().copied())
        .fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    if best == f32::NEG_INFINITY {
        return 0;
    }
    let chunk = v
        .chunks(256)
        .position(|c| c.iter().fold(false, |hit, &x| hit | (x == best)))
        .unwrap_or(0);
    let within = v[chunk * 256..]
        .iter()
        .position(|&x| x == best)
        .unwrap_or(0);
    (chunk * 256 + within) as u32
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Sampler {
            cfg,
            rng,
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Picks the next token from `logits`; `history` (prompt and generated ids) feeds the
    /// repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = std::mem::take(&mut self.scratch);
        l.clear();
        l.extend_from_slice(logits);
        if self.cfg.repetition_penalty != 1.0 && self.cfg.repetition_penalty > 0.0 {
            apply_repetition_penalty(&mut l, history, self.cfg.repetition_penalty);
        }
        let tok = if self.cfg.is_greedy() {
            argmax(&l)
        } else {
            let u: f32 = self.rng.random();
            sample_filtered(&l, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, u)
        };
        self.scratch = l;
        tok
    }
}

/// Hugging Face's repetition penalty: every distinct token in `history` has its logit
/// divided by `penalty` when positive and multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let x = &mut logits[t];
            *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
        }
    }
}

/// Samples with temperature, top-k and top-p using the uniform draw `u` in [0, 1).
pub fn sample_filtered(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f32) -> u32 {
    let mut idx: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize].is_finite())
        .collect();
    if idx.is_empty() {
        return 0;
    }
    // Descending by logit; ties keep the lower id first.
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if top_k > 0 && top_k < idx.len() {
        idx.truncate(top_k);
    }
    let m = logits[idx[0] as usize];
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - m) / temperature) as f64).exp())
        .collect();
    let z: f64 = p.iter().sum();
    for x in &mut p {
        *x /= z;
    }
    if top_p < 1.0 {
        // Smallest prefix reaching top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = p.len();
        for (j, &x) in p.iter().enumerate() {
            acc += x;
            if acc >= top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
        let z: f64 = p.iter().sum();
        for x in &mut p {
            *x /= z;
        }
    }
    let target = u as f64;
    let mut acc = 0.0;
    for (j, &x) in p.iter().enumerate() {
        acc += x;
        if target < acc {
            return idx[j];
        }
    }
    idx[idx.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_is_the_first_largest_ignoring_nan() {
        // The scalar definition: first index of the strictly largest value; NaN never wins.
        fn reference(v: &[f32]) -> u32 {
            let (mut best, mut bv) = (0, f32::NEG_INFINITY);
            for (i, &x) in v.iter().enumerate() {
                if x > bv {
                    (best, bv) = (i, x);
                }
            }
            best as u32
        }
        let mut x = 12345u32;
        for case in 0..400 {
            let n = 1 + case % 97;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    match x >> 28 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 => f32::INFINITY,
                        3 => -0.0,
                        // Few distinct values: many ties.
                        _ => ((x >> 8) % 7) as f32 - 3.0,
                    }
                })
                .collect();
            assert_eq!(argmax(&v), reference(&v), "{v:?}");
        }
        for v in [
            vec![],
            vec![f32::NAN; 5],
            vec![f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY],
            vec![f32::NAN, f32::NEG_INFINITY, -1.0],
            vec![-0.0, 0.0, 0.0],
        ] {
            assert_eq!(argmax(&v), reference(&v), "{v:?}");
        }
    }

    #[test]
    fn greedy_is_argmax_and_ignores_seed() {
        let l = [0.1, 2.0, -1.0, 1.9];
        let mut a = Sampler::new(SamplerConfig::greedy());
        let mut b = Sampler::new(SamplerConfig {
            seed: 99,
            ..SamplerConfig::greedy()
        });
        assert_eq!(a.sample(&l, &[]), 1);
        assert_eq!(b.sample(&l, &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let l = [0.1, 2.0, -1.0, 1.9];
        let mut s = Sampler::new(SamplerConfig {
            repetition_penalty: 1.2,
            ..SamplerConfig::greedy()
        });
        assert_eq!(s.sample(&l, &[1, 1]), 3);
        let mut v = l.to_vec();
        apply_repetition_penalty(&mut v, &[1, 2, 2], 2.0);
        assert_eq!(v, vec![0.1, 1.0, -2.0, 1.9]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let l = [0.3, 0.2, 0.5, 0.1];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_filtered(&l, 1.0, 1, 1.0, u), 2);
            assert_eq!(sample_filtered(&l, 1.0, 0, 1e-6, u), 2);
        }
    }

    #[test]
    fn top_k_restricts_support() {
        let l = [3.0, 2.0, 1.0, 0.0, -1.0];
        for i in 0..100 {
            let t = sample_filtered(&l, 5.0, 2, 1.0, i as f32 / 100.0);
            assert!(t == 0 || t == 1);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_softmax() {
        let l = [1.0f32, 0.0, -1.0, 0.5];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 42,
        };
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..20000).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        assert_ne!(
            a,
            draw(&SamplerConfig {
                seed: 43,
                ..cfg.clone()
            })
        );
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        for t in 0..4 {
            let freq = a.iter().filter(|&&x| x == t).count() as f32 / a.len() as f32;
            let p = l[t as usize].exp() / z;
            // 20000 draws: standard error < 0.0036; allow 5 sigma.
            assert!((freq - p).abs() < 0.018, "token {t}: {freq} vs {p}");
        }
    }

    #[test]
    fn parameters_outside_their_domain_are_refused_naming_the_field() {
        let base = SamplerConfig::default();
        base.validate().unwrap();
        SamplerConfig::greedy().validate().unwrap();
        for (field, cfg) in [
            (
                "temperature",
                SamplerConfig {
                    temperature: f32::NAN,
                    ..base.clone()
                },
            ),
            (
                "temperature",
                SamplerConfig {
                    temperature: f32::INFINITY,
                    ..base.clone()
                },
            ),
            (
                "temperature",
                SamplerConfig {
                    temperature: -0.5,
                    ..base.clone()
                },
            ),
            (
                "top_p",
                SamplerConfig {
                    top_p: f32::NAN,
                    ..base.clone()
                },
            ),
            (
                "top_p",
                SamplerConfig {
                    top_p: 0.0,
                    ..base.clone()
                },
            ),
            (
                "top_p",
                SamplerConfig {
                    top_p: 1.5,
                    ..base.clone()
                },
            ),
            (
                "repetition_penalty",
                SamplerConfig {
                    repetition_penalty: f32::NAN,
                    ..base.clone()
                },
            ),
            (
                "repetition_penalty",
                SamplerConfig {
                    repetition_penalty: 0.0,
                    ..base.clone()
                },
            ),
            (
                "repetition_penalty",
                SamplerConfig {
                    repetition_penalty: -1.0,
                    ..base.clone()
                },
            ),
        ] {
            match cfg.validate() {
                Err(crate::DecoderError::Sampling { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
    }
}
