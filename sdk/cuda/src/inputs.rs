//! Deterministic test inputs for the selftest: a small xorshift generator, normal values and
//! outlier-heavy values (a few channels scaled up, as LLM keys have, plus rare spikes).

/// xorshift64* generator; the same seed gives the same inputs on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u32) -> u32 {
        (self.uniform() * n as f64) as u32 % n.max(1)
    }

    /// Standard normal values (Box-Muller).
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = self.uniform().max(1e-12);
                let u2 = self.uniform();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    /// Normal values laid out as rows of `row` elements where a few fixed channels are 20-40x
    /// larger and about one value in 500 is a spike of 60x.
    pub fn outlier_normals(&mut self, n: usize, row: usize) -> Vec<f32> {
        let mut v = self.normals(n);
        let hot = [row / 7, row / 3, (row * 5) / 6];
        for (i, x) in v.iter_mut().enumerate() {
            let c = i % row.max(1);
            if hot.contains(&c) {
                *x *= 20.0 + (c % 3) as f32 * 10.0;
            }
        }
        for _ in 0..n / 500 + 1 {
            let i = self.below(n as u32) as usize;
            if i < n {
                v[i] *= 60.0;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_have_unit_moments_and_outliers_are_large() {
        let mut r = Rng::new(7);
        let v = r.normals(20000);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        let o = r.outlier_normals(64 * 100, 64);
        let max = o.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        assert!(max > 20.0, "{max}");
        assert_eq!(Rng::new(1).next_u64(), Rng::new(1).next_u64());
    }
}
