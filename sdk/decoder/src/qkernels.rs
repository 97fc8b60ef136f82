//! CPU kernels of weight-only quantized matrices ([`QuantData`]): the matrix-vector rows of
//! decode, dequantizing in registers, and the row dequantization prefill tiles and
//! embedding lookups use (prefill then runs the f32 `gemm` path of [`crate::kernels`]).
//!
//! Per row, each group contributes `scale * sum(code * x)` (+ `zero * sum(x)` for INT4,
//! with the group sums of `x` computed once per call). Picked at run time: INT4 with groups
//! of 64 or 128 on a CPU with AVX-512 VNNI takes integer dot products with `x` quantized
//! to INT8 per group (as llama.cpp's Q8 activations); otherwise the AVX-512 path, else the
//! AVX2 path, dequantizes in f32 registers; the portable path runs everywhere else.
//! [`gemv_rows_ref`] is the reference twin (the format crate's reference dequantization and
//! an f64 dot product). Row dequantization (prefill tiles) has an AVX-512 path giving the
//! reference's values exactly.

use crate::weights::QuantData;

/// `ys[j] = W[r0 + j, :] . x` for a quantized `W`.
pub(crate) fn gemv_rows(q: &QuantData<'_>, r0: usize, x: &[f32], ys: &mut [f32]) {
    assert!(
        x.len() >= q.cols && r0 + ys.len() <= q.rows(),
        "quantized gemv bounds"
    );
    let xsum = group_sums(q, x);
    #[cfg(target_arch = "x86_64")]
    if vnni::applies(q) {
        let qx = vnni::quantize_x(&x[..q.cols], q.format.group());
        // SAFETY: AVX-512F/BW and VNNI are present (checked by `applies`); bounds asserted
        // above; `qx` was prepared for this row width and group.
        unsafe { vnni::rows_q4(q, r0, &qx, &xsum, ys) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: AVX-512F is present (checked at run time); bounds asserted above.
        unsafe { avx512::rows(q, r0, x, &xsum, ys) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA are present (checked at run time); bounds asserted above.
        unsafe { avx2::rows(q, r0, x, &xsum, ys) };
        return;
    }
    gemv_rows_portable(q, r0, x, &xsum, ys);
}

/// Sums of `x` over each group of a row (INT4's zeros multiply them); empty for INT8.
fn group_sums(q: &QuantData<'_>, x: &[f32]) -> Vec<f32> {
    if !q.format.has_zeros() {
        return Vec::new();
    }
    x[..q.cols]
        .chunks_exact(q.format.group())
        .map(|g| g.iter().sum())
        .collect()
}

/// Portable rows: group by group, 32 codes at a time, 8 independent accumulators.
fn gemv_rows_portable(q: &QuantData<'_>, r0: usize, x: &[f32], xsum: &[f32], ys: &mut [f32]) {
    let g = q.format.group();
    for (j, y) in ys.iter_mut().enumerate() {
        let (codes, scales, zeros) = q.row(r0 + j);
        let mut total = 0f32;
        for (gi, &s) in scales.iter().enumerate() {
            let xs = &x[gi * g..(gi + 1) * g];
            let mut acc = [0f32; 8];
            if q.format.bits() == 8 {
                let cs = &codes[gi * g..(gi + 1) * g];
                for (i, (&c, &xv)) in cs.iter().zip(xs).enumerate() {
                    acc[i & 7] += (c as i8) as f32 * xv;
                }
            } else {
                let cs = &codes[gi * g / 2..(gi + 1) * g / 2];
                for (chunk, xc) in cs.chunks_exact(16).zip(xs.chunks_exact(32)) {
                    for i in 0..16 {
                        acc[i & 7] +=
                            (chunk[i] & 0x0f) as f32 * xc[i] + (chunk[i] >> 4) as f32 * xc[i + 16];
                    }
                }
            }
            total += s.to_f32() * acc.iter().sum::<f32>();
            if let Some(z) = zeros.get(gi) {
                total += z.to_f32() * xsum[gi];
            }
        }
        *y = total;
    }
}

/// Reference twin of [`gemv_rows`]: each row dequantized by the format crate's reference,
/// then an f64 dot product.
#[cfg(test)]
pub(crate) fn gemv_rows_ref(q: &QuantData<'_>, r0: usize, x: &[f32], ys: &mut [f32]) {
    let mut row = vec![0f32; q.cols];
    for (j, y) in ys.iter_mut().enumerate() {
        let (codes, scales, zeros) = q.row(r0 + j);
        jetvlm_quant::weight::dequantize_row(q.format, codes, scales, zeros, &mut row);
        *y = row
            .iter()
            .zip(x)
            .map(|(&w, &xv)| w as f64 * xv as f64)
            .sum::<f64>() as f32;
    }
}

/// Row `r` of `q` dequantized into `out` (`q.cols` values): prefill tiles and embedding
/// rows. Exactly the values of the format's reference dequantization.
pub(crate) fn dequantize_row(q: &QuantData<'_>, r: usize, out: &mut [f32]) {
    assert!(out.len() >= q.cols && r < q.rows(), "quantized row bounds");
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: AVX-512F is present (checked at run time); bounds asserted above.
        unsafe { avx512::dequantize_row(q, r, out) };
        return;
    }
    dequantize_row_portable(q, r, out);
}

/// Portable [`dequantize_row`].
fn dequantize_row_portable(q: &QuantData<'_>, r: usize, out: &mut [f32]) {
    let g = q.format.group();
    let (codes, scales, zeros) = q.row(r);
    for (gi, (o, &s)) in out.chunks_exact_mut(g).zip(scales).enumerate() {
        let s = s.to_f32();
        if q.format.bits() == 8 {
            for (v, &c) in o.iter_mut().zip(&codes[gi * g..(gi + 1) * g]) {
                *v = s * (c as i8) as f32;
            }
        } else {
            let z = zeros[gi].to_f32();
            let cs = &codes[gi * g / 2..(gi + 1) * g / 2];
            for (oc, chunk) in o.chunks_exact_mut(32).zip(cs.chunks_exact(16)) {
                for i in 0..16 {
                    oc[i] = z + s * (chunk[i] & 0x0f) as f32;
                    oc[i + 16] = z + s * (chunk[i] >> 4) as f32;
                }
            }
        }
    }
}

/// AVX2 rows: 8 codes widened to i32 and converted to f32 per vector, FMA with `x`, one
/// group accumulator scaled by the group's scale.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// Requires AVX2 and FMA; `x.len() >= q.cols`, rows `r0..r0 + ys.len()` inside `q`,
    /// `xsum` the group sums of `x` for INT4.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows(q: &QuantData<'_>, r0: usize, x: &[f32], xsum: &[f32], ys: &mut [f32]) {
        let g = q.format.group();
        let xp = x.as_ptr();
        let int8 = q.format.bits() == 8;
        for (j, y) in ys.iter_mut().enumerate() {
            let (codes, scales, zeros) = q.row(r0 + j);
            let cp = codes.as_ptr();
            let mut total = _mm256_setzero_ps();
            let mut zterm = 0f32;
            for (gi, s) in scales.iter().enumerate() {
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let x0 = gi * g;
                // SAFETY: the group's codes (g bytes for INT8, g / 2 for INT4) lie inside
                // `codes` (one row), and x[x0..x0 + g] inside `x` (x.len() >= cols).
                unsafe {
                    if int8 {
                        let mut i = 0;
                        while i < g {
                            let v = _mm_loadu_si128(cp.add(x0 + i) as *const __m128i);
                            let c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                            let c1 =
                                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
                            a0 = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xp.add(x0 + i)), a0);
                            a1 = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xp.add(x0 + i + 8)), a1);
                            i += 16;
                        }
                    } else {
                        let mask = _mm_set1_epi8(0x0f);
                        let mut i = 0;
                        while i < g {
                            let v = _mm_loadu_si128(cp.add((x0 + i) / 2) as *const __m128i);
                            let lo = _mm_and_si128(v, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
                            let c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                            let c1 =
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)));
                            let c2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                            let c3 =
                                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)));
                            let xb = xp.add(x0 + i);
                            a0 = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xb), a0);
                            a1 = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xb.add(8)), a1);
                            a0 = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xb.add(16)), a0);
                            a1 = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xb.add(24)), a1);
                            i += 32;
                        }
                    }
                }
                total = _mm256_fmadd_ps(_mm256_set1_ps(s.to_f32()), _mm256_add_ps(a0, a1), total);
                if let Some(z) = zeros.get(gi) {
                    zterm += z.to_f32() * xsum[gi];
                }
            }
            *y = hsum(total) + zterm;
        }
    }
}

/// AVX-512 rows: 16 codes widened to i32 and converted to f32 per vector (one 16-byte load
/// for INT8, one nibble half of a 32-code chunk for INT4), FMA with `x`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// # Safety
    /// Requires AVX-512F; as [`super::avx2::rows`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows(q: &QuantData<'_>, r0: usize, x: &[f32], xsum: &[f32], ys: &mut [f32]) {
        let g = q.format.group();
        let xp = x.as_ptr();
        let int8 = q.format.bits() == 8;
        for (j, y) in ys.iter_mut().enumerate() {
            let (codes, scales, zeros) = q.row(r0 + j);
            let cp = codes.as_ptr();
            let mut total = _mm512_setzero_ps();
            let mut zterm = 0f32;
            for (gi, s) in scales.iter().enumerate() {
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let x0 = gi * g;
                // SAFETY: the group's codes lie inside `codes` (one row), and
                // x[x0..x0 + g] inside `x` (x.len() >= cols); g is a multiple of 32.
                unsafe {
                    if int8 {
                        let mut i = 0;
                        while i < g {
                            let v0 = _mm_loadu_si128(cp.add(x0 + i) as *const __m128i);
                            let v1 = _mm_loadu_si128(cp.add(x0 + i + 16) as *const __m128i);
                            let c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0));
                            let c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1));
                            a0 = _mm512_fmadd_ps(c0, _mm512_loadu_ps(xp.add(x0 + i)), a0);
                            a1 = _mm512_fmadd_ps(c1, _mm512_loadu_ps(xp.add(x0 + i + 16)), a1);
                            i += 32;
                        }
                    } else {
                        let mask = _mm_set1_epi8(0x0f);
                        let mut i = 0;
                        while i < g {
                            let v = _mm_loadu_si128(cp.add((x0 + i) / 2) as *const __m128i);
                            let lo = _mm_and_si128(v, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
                            let c0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                            let c1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                            let xb = xp.add(x0 + i);
                            a0 = _mm512_fmadd_ps(c0, _mm512_loadu_ps(xb), a0);
                            a1 = _mm512_fmadd_ps(c1, _mm512_loadu_ps(xb.add(16)), a1);
                            i += 32;
                        }
                    }
                }
                total = _mm512_fmadd_ps(_mm512_set1_ps(s.to_f32()), _mm512_add_ps(a0, a1), total);
                if let Some(z) = zeros.get(gi) {
                    zterm += z.to_f32() * xsum[gi];
                }
            }
            *y = _mm512_reduce_add_ps(total) + zterm;
        }
    }

    /// Row `r` dequantized, 16 values per vector; `zero + scale * code` rounded as the
    /// scalar reference rounds it (a product, then a sum: no fused multiply-add), so the
    /// values are the reference's exactly.
    ///
    /// # Safety
    /// Requires AVX-512F; `r < q.rows()`, `out.len() >= q.cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dequantize_row(q: &QuantData<'_>, r: usize, out: &mut [f32]) {
        let g = q.format.group();
        let (codes, scales, zeros) = q.row(r);
        let (cp, op) = (codes.as_ptr(), out.as_mut_ptr());
        let mask = _mm_set1_epi8(0x0f);
        for (gi, s) in scales.iter().enumerate() {
            let sv = _mm512_set1_ps(s.to_f32());
            let x0 = gi * g;
            let mut i = 0;
            // SAFETY: codes of the group lie inside the row's codes, out[x0..x0 + g] inside
            // `out` (len >= cols); g is a multiple of 32.
            unsafe {
                if q.format.bits() == 8 {
                    while i < g {
                        let c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            cp.add(x0 + i) as *const __m128i,
                        )));
                        _mm512_storeu_ps(op.add(x0 + i), _mm512_mul_ps(sv, c));
                        i += 16;
                    }
                } else {
                    let zv = _mm512_set1_ps(zeros[gi].to_f32());
                    while i < g {
                        let v = _mm_loadu_si128(cp.add((x0 + i) / 2) as *const __m128i);
                        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, mask)));
                        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                            _mm_srli_epi16::<4>(v),
                            mask,
                        )));
                        _mm512_storeu_ps(op.add(x0 + i), _mm512_add_ps(zv, _mm512_mul_ps(sv, lo)));
                        _mm512_storeu_ps(
                            op.add(x0 + i + 16),
                            _mm512_add_ps(zv, _mm512_mul_ps(sv, hi)),
                        );
                        i += 32;
                    }
                }
            }
        }
    }
}

/// INT4 rows by integer dot products (AVX-512 VNNI `vpdpbusd`: unsigned 4-bit codes times
/// signed 8-bit activations, 64 per instruction). `x` is quantized per weight group to INT8
/// (`x ~= sx * xq`, `sx = max|x| / 127`) and laid out in the order the codes unpack in: a
/// 64-code block (two 32-code chunks) gives, after masking the low and the high nibbles,
/// codes 0..16, 32..48, 16..32, 48..64. Each element of `x` is off by at most `sx / 2`, so a
/// row is off by at most `sum_g scale_g * sx_g / 2 * sum(codes of g)` from the f32 result
/// (the zeros multiply the exact sums of `x`).
#[cfg(target_arch = "x86_64")]
mod vnni {
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    /// Whether this path runs `q`: INT4, groups of 64 or 128, and the CPU has the
    /// instructions.
    pub fn applies(q: &QuantData<'_>) -> bool {
        q.format.bits() == 4
            && q.format.group() >= 64
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// `x` quantized per group, in code order.
    pub struct QuantX {
        pub xq: Vec<i8>,
        pub sx: Vec<f32>,
    }

    /// Quantizes `x` (a whole row's width, a multiple of 64) per group of `group`.
    pub fn quantize_x(x: &[f32], group: usize) -> QuantX {
        let mut xq = vec![0i8; x.len()];
        let mut sx = Vec::with_capacity(x.len() / group);
        for (gi, xs) in x.chunks_exact(group).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            sx.push(s);
            for (b, xb) in xs.chunks_exact(64).enumerate() {
                let out = &mut xq[gi * group + b * 64..][..64];
                for (k, src) in [0usize, 32, 16, 48].into_iter().enumerate() {
                    for i in 0..16 {
                        out[k * 16 + i] = (xb[src + i] * inv).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            }
        }
        QuantX { xq, sx }
    }

    /// # Safety
    /// Requires AVX-512F, AVX-512BW and AVX-512 VNNI; `q` INT4 with groups of 64 or 128;
    /// rows `r0..r0 + ys.len()` inside `q`; `qx` from [`quantize_x`] of a row of `q.cols`
    /// values; `xsum` the group sums of `x`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows_q4(q: &QuantData<'_>, r0: usize, qx: &QuantX, xsum: &[f32], ys: &mut [f32]) {
        let g = q.format.group();
        let xp = qx.xq.as_ptr();
        let mask = _mm256_set1_epi8(0x0f);
        for (j, y) in ys.iter_mut().enumerate() {
            let (codes, scales, zeros) = q.row(r0 + j);
            let cp = codes.as_ptr();
            let mut total = _mm512_setzero_ps();
            let mut zterm = 0f32;
            for (gi, s) in scales.iter().enumerate() {
                let mut acc = _mm512_setzero_si512();
                let x0 = gi * g;
                let mut i = 0;
                // SAFETY: codes[(x0 + i) / 2..][..32] lie inside the row's codes and
                // xq[x0 + i..][..64] inside `qx.xq` (x0 + i + 64 <= cols).
                unsafe {
                    while i < g {
                        let b = _mm256_loadu_si256(cp.add((x0 + i) / 2) as *const __m256i);
                        let lo = _mm256_and_si256(b, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), mask);
                        let c = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                        let xv = _mm512_loadu_si512(xp.add(x0 + i) as *const _);
                        acc = _mm512_dpbusd_epi32(acc, c, xv);
                        i += 64;
                    }
                }
                let f = s.to_f32() * qx.sx[gi];
                total = _mm512_fmadd_ps(_mm512_set1_ps(f), _mm512_cvtepi32_ps(acc), total);
                zterm += zeros[gi].to_f32() * xsum[gi];
            }
            *y = _mm512_reduce_add_ps(total) + zterm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Tensor, TensorData};
    use jetvlm_quant::WeightFormat;
    use rand::{Rng, SeedableRng};

    /// A random `[rows, cols]` matrix quantized by the reference, and its values.
    fn random_matrix(rng: &mut impl Rng, fmt: WeightFormat, rows: usize, cols: usize) -> Tensor {
        let (mut codes, mut scales, mut zeros) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rows {
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-0.3f32..0.5)).collect();
            let q = jetvlm_quant::weight::quantize_row(&x, fmt).unwrap();
            codes.extend(q.codes);
            scales.extend(q.scales);
            zeros.extend(q.zeros);
        }
        Tensor::quantized("w", fmt, [rows, cols], &codes, &scales, &zeros).unwrap()
    }

    fn quant(t: &Tensor) -> QuantData<'_> {
        match t.data() {
            TensorData::Quant(q) => q,
            _ => unreachable!(),
        }
    }

    /// Fast and portable rows against the reference twin. Both compute the same products
    /// of exactly representable values (`scale * code` is exact in f32), so they differ
    /// only by f32 summation order: within `cols * eps * sum |w x|` of the reference.
    #[test]
    fn quantized_rows_match_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for bits in [4u32, 8] {
            for group in [32usize, 64, 128] {
                let fmt = WeightFormat::new(bits, group).unwrap();
                let (rows, cols) = (13, 384);
                let t = random_matrix(&mut rng, fmt, rows, cols);
                let q = quant(&t);
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut want = vec![0f32; rows];
                gemv_rows_ref(&q, 0, &x, &mut want);
                let mut fast = vec![0f32; rows - 2];
                gemv_rows(&q, 2, &x, &mut fast);
                let mut port = vec![0f32; rows];
                gemv_rows_portable(&q, 0, &x, &group_sums(&q, &x), &mut port);
                // Every SIMD path this CPU has, not only the one picked.
                #[allow(unused_mut)]
                let mut simd: Vec<(&str, Vec<f32>)> = Vec::new();
                #[cfg(target_arch = "x86_64")]
                {
                    let xs = group_sums(&q, &x);
                    if avx2::available() {
                        let mut y = vec![0f32; rows];
                        // SAFETY: AVX2 and FMA present; bounds as in gemv_rows.
                        unsafe { avx2::rows(&q, 0, &x, &xs, &mut y) };
                        simd.push(("avx2", y));
                    }
                    if avx512::available() {
                        let mut y = vec![0f32; rows];
                        // SAFETY: AVX-512F present; bounds as in gemv_rows.
                        unsafe { avx512::rows(&q, 0, &x, &xs, &mut y) };
                        simd.push(("avx512", y));
                    }
                }
                let mut deq = vec![0f32; cols];
                for r in 0..rows {
                    dequantize_row(&q, r, &mut deq);
                    let mag: f32 = deq.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum();
                    let bound = cols as f32 * f32::EPSILON * mag;
                    assert!(
                        (port[r] - want[r]).abs() <= bound,
                        "portable {bits}b g{group} row {r}"
                    );
                    for (name, y) in &simd {
                        let d = (y[r] - want[r]).abs();
                        assert!(d <= bound, "{name} {bits}b g{group} row {r}: {d} > {bound}");
                    }
                    // The picked path, unless it is the VNNI one (its INT8 activations have
                    // their own bound, tested in `vnni_tests`).
                    #[cfg(target_arch = "x86_64")]
                    let picked_is_f32 = !vnni::applies(&q);
                    #[cfg(not(target_arch = "x86_64"))]
                    let picked_is_f32 = true;
                    if r >= 2 && picked_is_f32 {
                        let d = (fast[r - 2] - want[r]).abs();
                        assert!(d <= bound, "fast {bits}b g{group} row {r}: {d} > {bound}");
                    }
                    // The row dequantization (picked path and portable) is the reference's,
                    // value for value.
                    let mut port_row = vec![0f32; cols];
                    dequantize_row_portable(&q, r, &mut port_row);
                    assert_eq!(deq, port_row);
                    let (c, s, z) = q.row(r);
                    let mut refrow = vec![0f32; cols];
                    jetvlm_quant::weight::dequantize_row(fmt, c, s, z, &mut refrow);
                    assert_eq!(deq, refrow);
                    assert_eq!(TensorData::Quant(q).get(r * cols + 37), refrow[37]);
                }
            }
        }
    }

    /// The prefill path (tiles dequantized, then gemm) and the fused decode path agree with
    /// the reference on a whole quantized matrix.
    #[test]
    fn quantized_matmul_matches_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for bits in [4u32, 8] {
            let fmt = WeightFormat::new(bits, 64).unwrap();
            let (rows, cols, n) = (150, 256, 5);
            let t = random_matrix(&mut rng, fmt, rows, cols);
            let x: Vec<f32> = (0..n * cols)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut want = vec![0f32; n * rows];
            crate::kernels::matmul_ref(t.data(), rows, cols, &x, n, &mut want);
            let mut got = vec![0f32; n * rows];
            crate::kernels::matmul(t.data(), rows, cols, &x, n, &mut got);
            let mut one = vec![0f32; rows];
            crate::kernels::matmul(t.data(), rows, cols, &x[..cols], 1, &mut one);
            let scale: f32 = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * scale, "{bits}b prefill: {a} vs {b}");
            }
            // Decode of INT4 may take the VNNI path (INT8 activations: within 1% here).
            let tol = if bits == 4 { 1e-2 } else { 1e-4 };
            for (a, b) in one.iter().zip(&want[..rows]) {
                assert!((a - b).abs() <= tol * scale, "{bits}b decode: {a} vs {b}");
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod vnni_tests {
    use super::*;
    use crate::weights::{Tensor, TensorData};
    use jetvlm_quant::WeightFormat;
    use rand::{Rng, SeedableRng};

    /// The VNNI path against the f32 reference, within the bound its INT8 activations allow
    /// (`sum_g scale_g * sx_g / 2 * sum(codes)`, plus f32 summation).
    #[test]
    fn vnni_rows_match_the_reference_within_the_activation_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for group in [64usize, 128] {
            let fmt = WeightFormat::new(4, group).unwrap();
            let (rows, cols) = (11, 384);
            let (mut codes, mut scales, mut zeros) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rows {
                let w: Vec<f32> = (0..cols).map(|_| rng.random_range(-0.3f32..0.5)).collect();
                let q = jetvlm_quant::weight::quantize_row(&w, fmt).unwrap();
                codes.extend(q.codes);
                scales.extend(q.scales);
                zeros.extend(q.zeros);
            }
            let t = Tensor::quantized("w", fmt, [rows, cols], &codes, &scales, &zeros).unwrap();
            let TensorData::Quant(q) = t.data() else {
                unreachable!()
            };
            if !vnni::applies(&q) {
                eprintln!("skipped: no AVX-512 VNNI on this CPU");
                return;
            }
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let qx = vnni::quantize_x(&x, group);
            let mut want = vec![0f32; rows];
            gemv_rows_ref(&q, 0, &x, &mut want);
            let mut got = vec![0f32; rows];
            // SAFETY: `applies` checked the CPU; rows and widths as prepared.
            unsafe { vnni::rows_q4(&q, 0, &qx, &group_sums(&q, &x), &mut got) };
            let mut picked = vec![0f32; rows];
            gemv_rows(&q, 0, &x, &mut picked);
            assert_eq!(picked, got, "gemv_rows picks the VNNI path");
            let mut deq = vec![0f32; cols];
            for r in 0..rows {
                let (c, s, _) = q.row(r);
                let mut bound = 0f32;
                for (gi, sc) in s.iter().enumerate() {
                    let csum: f32 = (gi * group..(gi + 1) * group)
                        .map(|i| jetvlm_quant::unpack_code(c, 4, i) as f32)
                        .sum();
                    bound += sc.to_f32() * qx.sx[gi] / 2.0 * csum;
                }
                dequantize_row(&q, r, &mut deq);
                let mag: f32 = deq.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum();
                bound += cols as f32 * f32::EPSILON * mag;
                let d = (got[r] - want[r]).abs();
                assert!(d <= bound, "g{group} row {r}: {d} > {bound}");
                // The bound is not vacuous: the error is a small part of the row's scale.
                assert!(
                    bound < 0.05 * mag,
                    "g{group} row {r}: bound {bound} vs {mag}"
                );
            }
        }
    }
}
