//! Salience of a frame's tokens: how much attention each receives from the frame's own
//! queries during prefill, normalized by how many queries could see it (ZipCache's
//! normalized attention, which removes the causal bias towards early tokens). The mixed KV
//! cache keeps the most salient frame tokens FP16 within its budget
//! (`MixedKvCache::settle_frame`).
//!
//! Cost: at most [`PROBES`] queries per span (evenly spaced, the last token included) over
//! the span's keys, per layer and query head: for a 729-token frame, 64 x 729 dot products
//! per head and layer, well under 1% of the frame's prefill. The forward pass also keeps the
//! frame's f32 keys and values of every layer until the cache re-stores it (for a 729-token
//! frame of a 24-layer model with 2048-wide K/V rows, 286 MB for that moment).

use rayon::prelude::*;

/// Queries per span whose attention is measured.
pub const PROBES: usize = 64;

/// Attention received by a span's tokens, summed over layers, then normalized.
#[derive(Clone, Debug)]
pub struct Salience {
    received: Vec<f64>,
    observers: Vec<u64>,
}

impl Salience {
    /// An empty tally for a span of `n` tokens.
    pub fn new(n: usize) -> Self {
        Salience {
            received: vec![0.0; n],
            observers: vec![0; n],
        }
    }

    /// Query indices measured in a span of `n` tokens: all of them up to [`PROBES`], else
    /// [`PROBES`] evenly spaced ones ending with the last token.
    pub fn probes(n: usize) -> Vec<usize> {
        if n <= PROBES {
            return (0..n).collect();
        }
        (1..=PROBES).map(|p| p * n / PROBES - 1).collect()
    }

    /// Adds one layer: `q: [n, q_heads, d]` and `k: [n, kv_heads, d]` after RoPE. Each probe
    /// query attends causally over the span's keys (softmax over the span, scale
    /// 1/sqrt(d), grouped-query heads); every key gets the weight it receives.
    pub fn add_layer(&mut self, q: &[f32], k: &[f32], q_heads: usize, kv_heads: usize, d: usize) {
        let n = self.received.len();
        debug_assert_eq!(q.len(), n * q_heads * d);
        debug_assert_eq!(k.len(), n * kv_heads * d);
        let group = q_heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let probes = Self::probes(n);
        let weights: Vec<Vec<f64>> = probes
            .par_iter()
            .flat_map_iter(|&i| (0..q_heads).map(move |h| (i, h)))
            .map(|(i, h)| {
                let qv = &q[(i * q_heads + h) * d..][..d];
                let kvh = h / group;
                let scores: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kr = &k[(j * kv_heads + kvh) * d..][..d];
                        kr.iter().zip(qv).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let w: Vec<f64> = scores.iter().map(|&s| ((s - m) as f64).exp()).collect();
                let z: f64 = w.iter().sum();
                w.into_iter().map(|x| x / z).collect()
            })
            .collect();
        for w in weights {
            for (j, x) in w.into_iter().enumerate() {
                self.received[j] += x;
                self.observers[j] += 1;
            }
        }
    }

    /// Attention received per observing query head, per token (0 for a token no probe saw).
    pub fn scores(&self) -> Vec<f32> {
        self.received
            .iter()
            .zip(&self.observers)
            .map(|(&r, &o)| if o == 0 { 0.0 } else { (r / o as f64) as f32 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_cover_short_spans_and_end_with_the_last_token() {
        assert_eq!(Salience::probes(3), vec![0, 1, 2]);
        let p = Salience::probes(729);
        assert_eq!(p.len(), PROBES);
        assert_eq!(*p.last().unwrap(), 728);
        assert!(p.windows(2).all(|w| w[0] < w[1]));
    }

    /// Brute force for one head: every probe's softmax written out.
    #[test]
    fn matches_a_written_out_softmax_and_ranks_the_attended_token_first() {
        let (n, d) = (6usize, 4usize);
        // Keys: token 2 aligned with every query, the rest orthogonal-ish.
        let mut k = vec![0f32; n * d];
        for j in 0..n {
            k[j * d + (j % 3) + 1] = 0.5;
        }
        k[2 * d] = 3.0;
        let q: Vec<f32> = (0..n)
            .flat_map(|i| [2.0, 0.1 * i as f32, 0.0, -0.2])
            .collect();
        let mut s = Salience::new(n);
        s.add_layer(&q, &k, 1, 1, d);
        let got = s.scores();
        let mut want = vec![0f64; n];
        for i in 0..n {
            let sc: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..d)
                        .map(|c| (q[i * d + c] * k[j * d + c]) as f64)
                        .sum::<f64>()
                        / 2.0
                })
                .collect();
            let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            for j in 0..=i {
                want[j] += (sc[j] - m).exp() / z / (n - j) as f64;
            }
        }
        for j in 0..n {
            assert!(
                (got[j] as f64 - want[j]).abs() < 1e-6,
                "{j}: {got:?} vs {want:?}"
            );
        }
        let best = (0..n).max_by(|&a, &b| got[a].total_cmp(&got[b])).unwrap();
        assert_eq!(best, 2);
    }

    #[test]
    fn grouped_heads_read_their_kv_head() {
        // Two query heads on one KV head and two on the other; KV head 1 marks token 0.
        let (n, d) = (3usize, 2usize);
        let mut k = vec![0f32; n * 2 * d];
        k[d] = 5.0; // token 0, kv head 1
        let q = vec![1f32; n * 4 * d];
        let mut s = Salience::new(n);
        s.add_layer(&q, &k, 4, 2, d);
        let sc = s.scores();
        assert!(sc[0] > sc[1] && sc[0] > sc[2], "{sc:?}");
        // Each probe's weights sum to 1 per head: sum of received = probes * heads.
        let total: f64 = s.received.iter().sum();
        assert!((total - (n * 4) as f64).abs() < 1e-9);
    }
}
