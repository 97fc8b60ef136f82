//! CPU kernels of the forward pass: matrix-vector products for decode (memory-bound, read
//! F16/BF16 weights directly and convert in registers), matrix-matrix products for prefill
//! (the `gemm` crate on f32 tiles converted from the stored type), RMSNorm, SwiGLU, RoPE.
//!
//! Weight matrices are Hugging Face `Linear` weights: row-major `[out, in]`, so `y = W x`.
//! Every fast kernel has a plain reference twin (`*_ref`) and a test comparing them.

use crate::qkernels::QuantizedX;
use crate::weights::TensorData;
use half::{bf16, f16};
use rayon::prelude::*;

/// Dot product of one stored-type weight row with an f32 vector.
#[inline]
pub fn dot(w: TensorData<'_>, start: usize, x: &[f32]) -> f32 {
    let n = x.len();
    match w {
        TensorData::F32(s) => dot_f32(&s[start..start + n], x),
        TensorData::F16(s) => dot_f16(&s[start..start + n], x),
        TensorData::BF16(s) => dot_bf16(&s[start..start + n], x),
        TensorData::Quant(q) => {
            let mut y = [0f32];
            let qx = crate::qkernels::QuantizedX::new(&x[..q.cols]);
            crate::qkernels::gemv_rows(&q, start / q.cols, &qx, &mut y);
            y[0]
        }
    }
}

/// Reference dot product (f64 accumulation).
pub fn dot_ref(w: TensorData<'_>, start: usize, x: &[f32]) -> f32 {
    let mut acc = 0f64;
    for (i, &xi) in x.iter().enumerate() {
        acc += w.get(start + i) as f64 * xi as f64;
    }
    acc as f32
}

fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { simd::dot_f32(w, x) };
    }
    dot_portable(w.iter().copied(), x)
}

fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma_f16c() {
        // SAFETY: AVX2, FMA and F16C are present (checked at run time).
        return unsafe { simd::dot_f16(w, x) };
    }
    dot_portable(w.iter().map(|v| v.to_f32()), x)
}

fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { simd::dot_bf16(w, x) };
    }
    dot_portable(w.iter().map(|v| v.to_f32()), x)
}

/// Portable dot product with 8 independent accumulators (vectorises on any target).
#[inline]
fn dot_portable(w: impl Iterator<Item = f32>, x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (wv, &xv)) in w.zip(x).enumerate() {
        acc[i & 7] += wv * xv;
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    pub fn has_avx2_fma() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub fn has_avx2_fma_f16c() -> bool {
        has_avx2_fma() && is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// Requires AVX2 and FMA; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads inside [0, n).
        unsafe {
            while i + 32 <= n {
                for j in 0..4 {
                    let wv = _mm256_loadu_ps(wp.add(i + 8 * j));
                    let xv = _mm256_loadu_ps(xp.add(i + 8 * j));
                    a[j] = _mm256_fmadd_ps(wv, xv, a[j]);
                }
                i += 32;
            }
            while i + 8 <= n {
                a[0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while i < n {
                s += *wp.add(i) * *xp.add(i);
                i += 1;
            }
            s
        }
    }

    /// # Safety
    /// Requires AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads inside [0, n).
        unsafe {
            while i + 32 <= n {
                for j in 0..4 {
                    let h = _mm_loadu_si128(wp.add(i + 8 * j) as *const __m128i);
                    let wv = _mm256_cvtph_ps(h);
                    a[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i + 8 * j)), a[j]);
                }
                i += 32;
            }
            while i + 8 <= n {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i) as *const __m128i));
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i)), a[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while i < n {
                s += f16::from_bits(*wp.add(i)).to_f32() * *xp.add(i);
                i += 1;
            }
            s
        }
    }

    /// # Safety
    /// Requires AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads inside [0, n).
        unsafe {
            while i + 32 <= n {
                for j in 0..4 {
                    let h = _mm_loadu_si128(wp.add(i + 8 * j) as *const __m128i);
                    // bf16 -> f32: widen to 32 bits and shift into the high half.
                    let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                    a[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i + 8 * j)), a[j]);
                }
                i += 32;
            }
            while i + 8 <= n {
                let h = _mm_loadu_si128(wp.add(i) as *const __m128i);
                let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i)), a[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while i < n {
                s += bf16::from_bits(*wp.add(i)).to_f32() * *xp.add(i);
                i += 1;
            }
            s
        }
    }
}

/// Rows per task of the matrix-vector product: large enough that scheduling costs little
/// next to reading the rows, and a multiple of 16 rows.
fn gemv_chunk(rows: usize, cols: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // Through rayon two tasks per thread: each streams a longer run of rows (4 measured
    // slower with the banded quantized kernel, qgemv_probe), and a slow thread still leaves
    // one to take. On a decode step's team four: a thread takes its own tasks in order
    // (one stream) and a claim costs a compare-and-swap, so shorter tasks only shorten the
    // wait for the last one (the leader's wait for its helper, `par::run_region` in a
    // profile of `bench decode`, fell by a third; TPOT unchanged on a busy host).
    let per_thread = if jetvlm_core::par::in_team() { 4 } else { 2 };
    let by_threads = rows.div_ceil(threads * per_thread);
    let min_rows = (16 * 1024 / cols.max(1)).max(1); // at least ~16K elements per task
    // Whole bands of a banded quantized matrix (`QuantData::banded`).
    by_threads
        .max(min_rows)
        .max(1)
        .next_multiple_of(crate::weights::BAND)
}

/// `ys[j] = W[r0 + j, :] . x`: a run of consecutive rows (AVX-512 where the CPU has it). A
/// quantized `W` reads `x` quantized to INT8 (`qx`, made once per product; made here when
/// `None`).
fn gemv_rows(
    w: TensorData<'_>,
    r0: usize,
    cols: usize,
    x: &[f32],
    qx: Option<&QuantizedX>,
    ys: &mut [f32],
) {
    if let TensorData::Quant(q) = w {
        match qx {
            Some(qx) => crate::qkernels::gemv_rows(&q, r0, qx, ys),
            None => crate::qkernels::gemv_rows(&q, r0, &QuantizedX::new(&x[..cols]), ys),
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        let end = (r0 + ys.len()) * cols;
        // SAFETY: AVX-512F is present (checked at run time); rows r0.. r0 + ys.len() lie
        // inside `w` (sliced below, so an out-of-range call panics instead).
        unsafe {
            match w {
                TensorData::F32(s) => avx512::rows_f32(&s[r0 * cols..end], cols, x, ys),
                TensorData::F16(s) => avx512::rows_f16(&s[r0 * cols..end], cols, x, ys),
                TensorData::BF16(s) => avx512::rows_bf16(&s[r0 * cols..end], cols, x, ys),
                TensorData::Quant(_) => unreachable!("quantized rows dispatched above"),
            }
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    {
        let end = (r0 + ys.len()) * cols;
        // SAFETY: NEON is part of every aarch64 CPU; rows r0.. r0 + ys.len() lie inside `w`
        // (sliced here, so an out-of-range call panics instead).
        unsafe {
            match w {
                TensorData::F32(s) => neon::rows_f32(&s[r0 * cols..end], cols, x, ys),
                TensorData::F16(s) => neon::rows_f16(&s[r0 * cols..end], cols, x, ys),
                TensorData::BF16(s) => neon::rows_bf16(&s[r0 * cols..end], cols, x, ys),
                TensorData::Quant(_) => unreachable!("quantized rows dispatched above"),
            }
        }
        #[allow(clippy::needless_return)]
        return;
    }
    #[allow(unreachable_code)]
    for (j, out) in ys.iter_mut().enumerate() {
        *out = dot(w, (r0 + j) * cols, x);
    }
}

/// One weight of a fused matrix-vector product: `y = W x` for `W: [y.len(), cols]`.
pub(crate) struct GemvJob<'w, 'y> {
    pub(crate) w: TensorData<'w>,
    pub(crate) y: &'y mut [f32],
}

/// Several matrix-vector products over the same input `x` (a layer's q/k/v, or gate/up) in
/// one parallel region: the rows of all weights are split into tasks together, so the
/// threads meet once instead of once per weight. When a weight is quantized, `x` is
/// quantized to INT8 once for all of them.
pub(crate) fn gemv_many(jobs: &mut [GemvJob<'_, '_>], cols: usize, x: &[f32]) {
    debug_assert_eq!(x.len(), cols);
    let total_rows: usize = jobs.iter().map(|j| j.y.len()).sum();
    let qx = jobs
        .iter()
        .any(|j| matches!(j.w, TensorData::Quant(_)))
        .then(|| QuantizedX::new(&x[..cols]));
    let qx = qx.as_ref();
    let chunk = gemv_chunk(total_rows, cols);
    if chunk >= total_rows {
        for j in jobs.iter_mut() {
            debug_assert_eq!(j.w.len(), j.y.len() * cols);
            gemv_rows(j.w, 0, cols, x, qx, j.y);
        }
        return;
    }
    let mut tasks: Vec<(TensorData<'_>, usize, &mut [f32])> =
        Vec::with_capacity(total_rows.div_ceil(chunk) + jobs.len());
    for j in jobs.iter_mut() {
        debug_assert_eq!(j.w.len(), j.y.len() * cols);
        let w = j.w;
        for (ci, ys) in j.y.chunks_mut(chunk).enumerate() {
            tasks.push((w, ci * chunk, ys));
        }
    }
    jetvlm_core::par::for_each_mut(&mut tasks, |(w, r0, ys)| {
        gemv_rows(*w, *r0, cols, x, qx, ys)
    });
}

/// `y[r] = W[r, :] . x` for a row-major `[rows, cols]` weight, rows in parallel.
pub fn gemv(w: TensorData<'_>, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(y.len(), rows);
    gemv_many(&mut [GemvJob { w, y }], cols, x);
}

/// Reference twin of [`gemv`] (and of the batched products the decoder runs per layer).
pub fn gemv_ref(w: TensorData<'_>, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    for r in 0..rows {
        y[r] = dot_ref(w, r * cols, x);
    }
}

/// AVX-512 matrix-vector rows: 16 weights per vector, converted from F16 (`vcvtph2ps`) or
/// BF16 (widen and shift into the high half) in registers, f32 accumulation.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// Loads 16 weights at `p` as f32.
    trait Load16: Copy {
        /// # Safety
        /// AVX-512F; 16 elements readable at `p`.
        unsafe fn load16(p: *const Self) -> __m512;
        fn to_f32(self) -> f32;
    }

    impl Load16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: caller guarantees 16 readable f32 and AVX-512F.
            unsafe { _mm512_loadu_ps(p) }
        }
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl Load16 for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            // SAFETY: caller guarantees 16 readable halves and AVX-512F.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    impl Load16 for bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> __m512 {
            // SAFETY: caller guarantees 16 readable bf16 and AVX-512F.
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }

    /// `ys[j] = w[j * cols..(j + 1) * cols] . x`, row after row so the weights are read as
    /// one contiguous stream, the pattern the hardware prefetcher follows best when they
    /// come from DRAM (interleaving rows, or software prefetch, measured slower here).
    #[inline(always)]
    unsafe fn rows<T: Load16>(w: &[T], cols: usize, x: &[f32], ys: &mut [f32]) {
        assert!(w.len() >= ys.len() * cols && x.len() >= cols);
        let full = cols / 16 * 16;
        let xp = x.as_ptr();
        for (r, out) in ys.iter_mut().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            let p = row.as_ptr();
            // SAFETY: vector loads read row[i..i + 16] with i + 16 <= full <= cols, and
            // x[i..i + 16] with x.len() >= cols.
            unsafe {
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let mut i = 0;
                while i + 32 <= full {
                    a0 = _mm512_fmadd_ps(T::load16(p.add(i)), _mm512_loadu_ps(xp.add(i)), a0);
                    a1 = _mm512_fmadd_ps(
                        T::load16(p.add(i + 16)),
                        _mm512_loadu_ps(xp.add(i + 16)),
                        a1,
                    );
                    i += 32;
                }
                if i < full {
                    a0 = _mm512_fmadd_ps(T::load16(p.add(i)), _mm512_loadu_ps(xp.add(i)), a0);
                }
                let tail: f32 = row[full..]
                    .iter()
                    .zip(&x[full..cols])
                    .map(|(a, b)| a.to_f32() * b)
                    .sum();
                *out = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail;
            }
        }
    }

    /// # Safety
    /// Requires AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_f32(w: &[f32], cols: usize, x: &[f32], ys: &mut [f32]) {
        // SAFETY: AVX-512F enabled on this function; bounds asserted inside.
        unsafe { rows(w, cols, x, ys) }
    }

    /// # Safety
    /// Requires AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_f16(w: &[f16], cols: usize, x: &[f32], ys: &mut [f32]) {
        // SAFETY: as above.
        unsafe { rows(w, cols, x, ys) }
    }

    /// # Safety
    /// Requires AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_bf16(w: &[bf16], cols: usize, x: &[f32], ys: &mut [f32]) {
        // SAFETY: as above.
        unsafe { rows(w, cols, x, ys) }
    }
}

/// NEON matrix-vector rows (Jetson CPUs): 8 weights per pair of vectors, converted from F16
/// (`fcvtl`) or BF16 (widen by a 16-bit shift) in registers, f32 accumulation in four
/// independent registers.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use half::{bf16, f16};
    use std::arch::aarch64::*;

    /// Loads 8 weights at `p` as two f32 vectors.
    trait Load8: Copy {
        /// # Safety
        /// 8 elements readable at `p`.
        unsafe fn load8(p: *const Self) -> (float32x4_t, float32x4_t);
        fn to_f32(self) -> f32;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> (float32x4_t, float32x4_t) {
            // SAFETY: caller guarantees 8 readable f32.
            unsafe { (vld1q_f32(p), vld1q_f32(p.add(4))) }
        }
        fn to_f32(self) -> f32 {
            self
        }
    }

    /// Four halves (one per 32-bit lane) to f32 with integer operations (the half-precision
    /// conversion intrinsics need a newer Rust than this crate's minimum): exponent and
    /// mantissa moved into f32 position and scaled by 2^112, which is exact for normal and
    /// subnormal halves; infinities and NaNs get the all-ones exponent; then the sign.
    #[inline(always)]
    pub(crate) unsafe fn f16x4_to_f32(h: uint32x4_t) -> float32x4_t {
        // SAFETY: register-only NEON operations (baseline on aarch64).
        unsafe {
            let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
            let em = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
            let scaled = vmulq_f32(
                vreinterpretq_f32_u32(em),
                vdupq_n_f32(f32::from_bits(0x7780_0000)),
            );
            let special = vcgeq_u32(em, vdupq_n_u32(0x0f80_0000));
            let bits = vbslq_u32(
                special,
                vorrq_u32(em, vdupq_n_u32(0x7f80_0000)),
                vreinterpretq_u32_f32(scaled),
            );
            vreinterpretq_f32_u32(vorrq_u32(bits, sign))
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> (float32x4_t, float32x4_t) {
            // SAFETY: caller guarantees 8 readable halves.
            unsafe {
                let h = vld1q_u16(p as *const u16);
                (
                    f16x4_to_f32(vmovl_u16(vget_low_u16(h))),
                    f16x4_to_f32(vmovl_u16(vget_high_u16(h))),
                )
            }
        }
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    impl Load8 for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const bf16) -> (float32x4_t, float32x4_t) {
            // SAFETY: caller guarantees 8 readable bf16.
            unsafe {
                let h = vld1q_u16(p as *const u16);
                (
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_high_u16(h))),
                )
            }
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
    }

    /// `ys[j] = w[j * cols..(j + 1) * cols] . x`, row after row (one contiguous stream).
    #[inline(always)]
    unsafe fn rows<T: Load8>(w: &[T], cols: usize, x: &[f32], ys: &mut [f32]) {
        assert!(w.len() >= ys.len() * cols && x.len() >= cols);
        let full = cols / 8 * 8;
        let xp = x.as_ptr();
        for (r, out) in ys.iter_mut().enumerate() {
            let row = &w[r * cols..(r + 1) * cols];
            let p = row.as_ptr();
            // SAFETY: vector loads read row[i..i + 8] with i + 8 <= full <= cols, and
            // x[i..i + 8] with x.len() >= cols.
            unsafe {
                let z = vdupq_n_f32(0.0);
                let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
                let mut i = 0;
                while i + 16 <= full {
                    let (w0, w1) = T::load8(p.add(i));
                    let (w2, w3) = T::load8(p.add(i + 8));
                    a0 = vfmaq_f32(a0, w0, vld1q_f32(xp.add(i)));
                    a1 = vfmaq_f32(a1, w1, vld1q_f32(xp.add(i + 4)));
                    a2 = vfmaq_f32(a2, w2, vld1q_f32(xp.add(i + 8)));
                    a3 = vfmaq_f32(a3, w3, vld1q_f32(xp.add(i + 12)));
                    i += 16;
                }
                if i < full {
                    let (w0, w1) = T::load8(p.add(i));
                    a0 = vfmaq_f32(a0, w0, vld1q_f32(xp.add(i)));
                    a1 = vfmaq_f32(a1, w1, vld1q_f32(xp.add(i + 4)));
                }
                let tail: f32 = row[full..]
                    .iter()
                    .zip(&x[full..cols])
                    .map(|(a, b)| a.to_f32() * b)
                    .sum();
                *out = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3))) + tail;
            }
        }
    }

    /// # Safety
    /// `w` holds `ys.len()` rows of `cols`; `x` at least `cols` (asserted).
    pub unsafe fn rows_f32(w: &[f32], cols: usize, x: &[f32], ys: &mut [f32]) {
        // SAFETY: NEON is baseline on aarch64; bounds asserted inside.
        unsafe { rows(w, cols, x, ys) }
    }

    /// # Safety
    /// As [`rows_f32`].
    pub unsafe fn rows_f16(w: &[f16], cols: usize, x: &[f32], ys: &mut [f32]) {
        // SAFETY: as above.
        unsafe { rows(w, cols, x, ys) }
    }

    /// # Safety
    /// As [`rows_f32`].
    pub unsafe fn rows_bf16(w: &[bf16], cols: usize, x: &[f32], ys: &mut [f32]) {
        // SAFETY: as above.
        unsafe { rows(w, cols, x, ys) }
    }
}

/// Output rows of W converted to f32 per prefill tile.
const TILE_ROWS: usize = 64;

struct SendPtr(*mut f32);
// SAFETY: tiles write disjoint column ranges of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `Y[n, rows] = X[n, cols] W^T` (prefill). One token uses [`gemv`]; several tokens with
/// quantized weights run the integer GEMM of `qgemm` (INT8 activations per block of 32, the
/// decode kernels' activations); float weights run [`matmul_tiles`].
pub fn matmul(w: TensorData<'_>, rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * cols, "matmul input length");
    assert_eq!(y.len(), n * rows, "matmul output length");
    if n == 1 {
        gemv(w, rows, cols, x, y);
        return;
    }
    if let TensorData::Quant(q) = w {
        assert!(q.rows() == rows && q.cols == cols, "quantized matmul shape");
        crate::qgemm::matmul(&q, x, n, y);
        return;
    }
    matmul_tiles(w, rows, cols, x, n, y);
}

/// `Y[n, rows] = X[n, cols] W^T` in tiles of output rows, each converted from its stored
/// type to f32 and multiplied with the `gemm` crate, tiles in parallel: [`matmul`]'s path for
/// float weights; for quantized weights it is the f32 path (tiles dequantized) that the
/// integer GEMM replaces, kept for comparison (`examples/prefill_gemm.rs`).
pub fn matmul_tiles(
    w: TensorData<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), n * cols, "matmul input length");
    assert_eq!(y.len(), n * rows, "matmul output length");
    let tiles = rows.div_ceil(TILE_ROWS);
    let dst = SendPtr(y.as_mut_ptr());
    let dst = &dst;
    (0..tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, t| {
            let r0 = t * TILE_ROWS;
            let r1 = (r0 + TILE_ROWS).min(rows);
            let m = r1 - r0;
            let (wp, w_rs): (*const f32, isize) = match w {
                TensorData::F32(s) => (s[r0 * cols..].as_ptr(), cols as isize),
                _ => {
                    scratch.resize(m * cols, 0.0);
                    tile_to_f32(w, r0 * cols, &mut scratch[..m * cols]);
                    (scratch.as_ptr(), cols as isize)
                }
            };
            // dst[i, j] (i over n tokens, j over the tile's m rows) = sum_k X[i, k] W[r0 + j, k].
            // SAFETY: pointers and strides describe in-bounds matrices: X is [n, cols] row-major,
            // the tile of W is [m, cols] row-major (read as a [cols, m] rhs with column stride
            // `cols`), and dst starts at column r0 of the [n, rows] output with row stride
            // `rows`; tiles write disjoint columns.
            unsafe {
                gemm::gemm(
                    n,
                    m,
                    cols,
                    dst.0.add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    wp,
                    w_rs,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

/// Elements `start..start + out.len()` of `w` as f32 (a prefill tile), exactly as
/// [`TensorData::to_f32_into`] gives them (a NaN stays a NaN, its quiet bit aside); F16 and
/// BF16 widened 16 per instruction with AVX-512 (`vcvtph2ps`; BF16 shifted into the high
/// half of each lane).
fn tile_to_f32(w: TensorData<'_>, start: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        let end = start + out.len();
        // SAFETY: AVX-512F is present (checked at run time); the slices have out.len()
        // elements (sliced here, so an out-of-range call panics instead).
        match w {
            TensorData::F16(s) => return unsafe { tile_avx512::widen_f16(&s[start..end], out) },
            TensorData::BF16(s) => {
                return unsafe { tile_avx512::widen_bf16(&s[start..end], out) };
            }
            _ => {}
        }
    }
    w.to_f32_into(start, out);
}

/// AVX-512 widening of prefill tiles.
#[cfg(target_arch = "x86_64")]
mod tile_avx512 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX-512F; `src.len() == out.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_f16(src: &[f16], out: &mut [f32]) {
        assert_eq!(src.len(), out.len());
        let mut i = 0;
        // SAFETY: i + 16 <= len for both slices.
        unsafe {
            while i + 16 <= src.len() {
                let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
                i += 16;
            }
        }
        for (o, v) in out[i..].iter_mut().zip(&src[i..]) {
            *o = v.to_f32();
        }
    }

    /// # Safety
    /// Requires AVX-512F; `src.len() == out.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_bf16(src: &[bf16], out: &mut [f32]) {
        assert_eq!(src.len(), out.len());
        let mut i = 0;
        // SAFETY: i + 16 <= len for both slices.
        unsafe {
            while i + 16 <= src.len() {
                let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_castsi512_ps(w));
                i += 16;
            }
        }
        for (o, v) in out[i..].iter_mut().zip(&src[i..]) {
            *o = v.to_f32();
        }
    }
}

/// Reference twin of [`matmul`].
pub fn matmul_ref(w: TensorData<'_>, rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    for i in 0..n {
        gemv_ref(
            w,
            rows,
            cols,
            &x[i * cols..(i + 1) * cols],
            &mut y[i * rows..(i + 1) * rows],
        );
    }
}

/// RMSNorm of every row of `x` (width `w.len()`) into `out`: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = sum_squares(xr) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * inv);
        }
    }
}

/// The sum of squares in 16 independent lanes (so that it vectorizes instead of running one
/// chain of adds: twice per layer and token), the lanes then summed in order, the tail last.
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>()
}

/// SwiGLU: `out = silu(gate) * up`, with [`exp_poly`] in vector registers (AVX2 on x86_64 when
/// present; NEON is baseline on aarch64). Reference twin: [`swiglu_ref`].
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { swiglu_avx2(gate, up, out) };
        return;
    }
    swiglu_poly(gate, up, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_poly(gate, up, out);
}

#[inline(always)]
fn swiglu_poly(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_poly(-g)) * u;
    }
}

/// Reference twin of [`swiglu`], with the standard library's `exp`.
pub fn swiglu_ref(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `e^x` without branches or calls, so that loops over it vectorize: `x = n ln2 + r` with
/// `|r| <= ln2 / 2` (ln2 split in two parts, Cody-Waite), Cephes' degree-6 polynomial for `e^r`,
/// and `2^n` built in the exponent bits. `x` is clamped to `[-87.33, 88.37]`, where `2^n` stays a
/// normal number (e^-87.33 is about 1.2e-38, e^88.37 about 2.6e38); within about 2 ulp of `exp`
/// there (test `exp_poly_matches_exp`).
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to a whole number (ties to even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.37);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    // Cephes' 5.0000001201e-1 is 0.5 in f32.
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n in [-126, 127]: its bits sit in t's low mantissa bits (t = ROUND + n).
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    er * f32::from_bits(((ni + 127) as u32) << 23)
}

/// `out = gelu_tanh(gate) * up`: Gemma's GeGLU with GELU's tanh approximation
/// (`gelu_pytorch_tanh`: `0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`), in f64.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let g = g as f64;
        *o = (0.5 * g * (1.0 + (k * (g + 0.044715 * g * g * g)).tanh()) * u as f64) as f32;
    }
}

/// `x = cap * tanh(x / cap)` (logit softcapping), in f64.
pub fn softcap(x: &mut [f32], cap: f32) {
    let cap = cap as f64;
    for v in x {
        *v = (cap * (*v as f64 / cap).tanh()) as f32;
    }
}

/// Rotary embedding tables: inverse frequencies for half the head dimension, and M-RoPE's
/// sections when the model has them.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    head_dim: usize,
    mrope_section: Option<[usize; 3]>,
    /// Interleaved M-RoPE sections (Qwen3-VL).
    mrope_interleaved: bool,
}

impl Rope {
    /// Frequencies as Hugging Face computes them for `default`, `linear` and `llama3` RoPE.
    pub fn new(cfg: &jetvlm_core::hf::ModelConfig) -> Self {
        use jetvlm_core::hf::RopeScaling;
        let d = cfg.head_dim;
        let base = cfg.rope_theta;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64))
            .collect();
        match &cfg.rope_scaling {
            // M-RoPE's frequencies are the plain ones; only the positions differ.
            RopeScaling::Default | RopeScaling::MRope { .. } => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f /= factor;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wl = old / low_freq_factor;
                let high_wl = old / high_freq_factor;
                for f in &mut inv_freq {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= factor;
                    } else if wl >= high_wl {
                        let smooth =
                            (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        let (mrope_section, mrope_interleaved) = match &cfg.rope_scaling {
            RopeScaling::MRope {
                section,
                interleaved,
                ..
            } => (Some(*section), *interleaved),
            _ => (None, false),
        };
        Rope {
            inv_freq,
            head_dim: d,
            mrope_section,
            mrope_interleaved,
        }
    }

    /// Inverse frequencies `[head_dim / 2]` (scaling applied), for device RoPE kernels.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Rotates `x: [n, heads, head_dim]` in place, token `i` at `positions[i]` (the
    /// half-split "rotate_half" layout Llama and Qwen2 checkpoints use).
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[u32]) {
        self.rotate(x, heads, positions.len(), |t, _| positions[t]);
    }

    /// M-RoPE in place on `x[positions.len()][heads][head_dim]`: frequency pair `i` of token
    /// `t` turns by `positions[t][s] * inv_freq[i]`, `s` the M-RoPE section holding `i`
    /// (temporal, row, column), as transformers' `apply_multimodal_rotary_pos_emb`. Without
    /// sections (not an M-RoPE model) it is [`Rope::apply`] at the temporal positions.
    /// Interleaved (Qwen3-VL, transformers' `Qwen3VLTextRotaryEmbedding`): pair `i` takes the
    /// row when `i % 3 == 1` and `i < 3 * section[1]`, the column when `i % 3 == 2` and
    /// `i < 3 * section[2]`, the temporal position otherwise.
    pub fn apply_mrope(&self, x: &mut [f32], heads: usize, positions: &[[u32; 3]]) {
        let h = self.head_dim / 2;
        let [s0, s1, s2] = self.mrope_section.unwrap_or([h, 0, 0]);
        if self.mrope_interleaved {
            let section = |i: usize| match i % 3 {
                1 if i < 3 * s1 => 1,
                2 if i < 3 * s2 => 2,
                _ => 0,
            };
            self.rotate(x, heads, positions.len(), |t, i| positions[t][section(i)]);
            return;
        }
        let section = |i: usize| usize::from(i >= s0) + usize::from(i >= s0 + s1);
        self.rotate(x, heads, positions.len(), |t, i| positions[t][section(i)]);
    }

    /// Rotates `n` tokens' heads, frequency pair `i` of token `t` at position `pos(t, i)`.
    fn rotate(&self, x: &mut [f32], heads: usize, n: usize, pos: impl Fn(usize, usize) -> u32) {
        let d = self.head_dim;
        let h = d / 2;
        ROTATION.with_borrow_mut(|last| {
            for t in 0..n {
                last.turn_to(&self.inv_freq[..h], |i| pos(t, i));
                let row = &mut x[t * heads * d..(t + 1) * heads * d];
                rotate_heads(row, d, &last.cos, &last.sin);
            }
        });
    }
}

/// The angles a token's frequency pairs last turned by on this thread, with their cosines and
/// sines: a decode step rotates the queries and keys of every layer at the same position, so
/// the trigonometry runs once a step instead of twice a layer. Keyed by the frequencies and
/// positions themselves (exact: the same inputs give the same values).
#[derive(Default)]
struct Rotation {
    inv_freq: Vec<f64>,
    pos: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotation {
    fn turn_to(&mut self, inv_freq: &[f64], pos: impl Fn(usize) -> u32) {
        let h = inv_freq.len();
        let same = self.inv_freq == inv_freq && (0..h).all(|i| self.pos[i] == pos(i));
        if same {
            return;
        }
        self.inv_freq.clear();
        self.inv_freq.extend_from_slice(inv_freq);
        self.pos.clear();
        self.pos.extend((0..h).map(&pos));
        self.cos.clear();
        self.sin.clear();
        for (&p, &f) in self.pos.iter().zip(inv_freq) {
            let a = p as f64 * f;
            self.cos.push(a.cos() as f32);
            self.sin.push(a.sin() as f32);
        }
    }
}

thread_local! {
    static ROTATION: std::cell::RefCell<Rotation> = std::cell::RefCell::new(Rotation::default());
}

/// Rotates each `d`-wide head of `row`: pair `i` (elements `i` and `i + d/2`) by the angle
/// whose cosine and sine are `cos[i]`, `sin[i]`.
fn rotate_heads(row: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let h = d / 2;
    for head in row.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(h);
        for i in 0..h {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// Whether every value is finite, in chunks without an early exit inside them, so that the
/// check vectorizes (a vocabulary of logits per decoded token).
pub fn all_finite(v: &[f32]) -> bool {
    v.chunks(1024)
        .all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_finds_any_nan_or_infinity() {
        let mut v = vec![1.5f32; 3000];
        assert!(all_finite(&v) && all_finite(&[]));
        for i in [0, 1023, 1024, 2999] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                v[i] = bad;
                assert!(!all_finite(&v), "{bad} at {i}");
                v[i] = f32::MAX;
                assert!(all_finite(&v));
            }
        }
    }

    #[test]
    fn exp_poly_matches_exp() {
        let mut worst = 0f32;
        let mut x = -87.33f32;
        while x <= 88.37 {
            let (got, want) = (exp_poly(x), x.exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        // About 2 ulp (f32's epsilon is 1.19e-7).
        assert!(worst < 3e-7, "exp_poly relative error {worst}");
        assert_eq!(exp_poly(0.0), 1.0);
        // Outside the clamp: normal numbers, never inf or 0 (silu's g / (1 + e^-g) stays finite).
        assert!(exp_poly(1000.0).is_finite() && exp_poly(-1000.0) > 0.0);
    }

    #[test]
    fn swiglu_matches_reference() {
        let n = 1543;
        let gate: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2001) as f32 * 0.03 - 30.0)
            .collect();
        let up: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 997) as f32 * 0.01 - 5.0)
            .collect();
        let (mut fast, mut want) = (vec![0f32; n], vec![0f32; n]);
        swiglu(&gate, &up, &mut fast);
        swiglu_ref(&gate, &up, &mut want);
        for ((f, w), g) in fast.iter().zip(&want).zip(&gate) {
            assert!(
                (f - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "silu({g}): {f} vs {w}"
            );
        }
        // Large negative gates: silu -> 0 without NaN; large positive: silu(g) = g.
        let mut out = [0f32; 4];
        swiglu(&[-200.0, -90.0, 90.0, 200.0], &[1.0; 4], &mut out);
        assert!(out[0].abs() < 1e-30 && out[1].abs() < 1e-30, "{out:?}");
        assert_eq!(&out[2..], &[90.0, 200.0]);
    }

    /// Gemma's GeGLU (`gelu_pytorch_tanh`) and logit softcapping at known points.
    #[test]
    fn geglu_and_softcap_values() {
        let mut out = [0f32; 3];
        geglu(&[1.0, -2.0, 0.0], &[2.0, 0.5, 7.0], &mut out);
        // gelu_tanh(1) = 0.8411920, gelu_tanh(-2) = -0.0454023, gelu_tanh(0) = 0.
        let want = [0.841_192_f32 * 2.0, -0.045_402_3 * 0.5, 0.0];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        let mut x = [30.0f32, -60.0, 0.5];
        softcap(&mut x, 30.0);
        let want = [
            30.0 * 1f32.tanh(),
            -30.0 * 2f32.tanh(),
            30.0 * (0.5f32 / 30.0).tanh(),
        ];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn rand_vec(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The NEON F16 widening (integer operations) equals `half`'s conversion on every one of
    /// the 65536 halves: normals, subnormals, zeros, infinities and NaNs.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_f16_widening_is_exact_for_every_half() {
        use std::arch::aarch64::*;
        for base in (0..=u16::MAX as u32).step_by(4) {
            let lanes = [base, base + 1, base + 2, base + 3];
            let mut got = [0f32; 4];
            // SAFETY: NEON is baseline on aarch64; the arrays hold 4 lanes.
            unsafe {
                let f = super::neon::f16x4_to_f32(vld1q_u32(lanes.as_ptr()));
                vst1q_f32(got.as_mut_ptr(), f);
            }
            for (l, g) in lanes.iter().zip(got) {
                let want = half::f16::from_bits(*l as u16).to_f32();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{l:#06x}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn gemv_matches_reference_all_dtypes() {
        let mut rng = StdRng::seed_from_u64(7);
        // Odd sizes exercise the SIMD tails.
        for &(rows, cols) in &[(1usize, 1usize), (7, 13), (70, 77), (300, 576), (1000, 64)] {
            let w = rand_vec(rows * cols, &mut rng);
            let x = rand_vec(cols, &mut rng);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for data in [
                TensorData::F32(&w),
                TensorData::F16(&wh),
                TensorData::BF16(&wb),
            ] {
                let mut y = vec![0f32; rows];
                let mut r = vec![0f32; rows];
                gemv(data, rows, cols, &x, &mut y);
                gemv_ref(data, rows, cols, &x, &mut r);
                // f32 accumulation over `cols` terms of magnitude <= 1.
                let bound = 1e-6 * cols as f32 + 1e-6;
                assert!(
                    max_err(&y, &r) <= bound,
                    "{:?} {rows}x{cols}: {}",
                    data.dtype(),
                    max_err(&y, &r)
                );
            }
        }
    }

    /// Several weights of different heights (q/k/v-like) in one fused product, each equal to
    /// its reference.
    #[test]
    fn gemv_many_matches_reference_all_dtypes() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(cols, ref heights) in &[(576usize, vec![576usize, 192, 192]), (33, vec![5, 1, 70])] {
            let x = rand_vec(cols, &mut rng);
            let ws: Vec<Vec<f32>> = heights
                .iter()
                .map(|&r| rand_vec(r * cols, &mut rng))
                .collect();
            let wh: Vec<Vec<f16>> = ws
                .iter()
                .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
                .collect();
            let wb: Vec<Vec<bf16>> = ws
                .iter()
                .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
                .collect();
            for dt in 0..3 {
                let data = |i: usize| match dt {
                    0 => TensorData::F32(&ws[i]),
                    1 => TensorData::F16(&wh[i]),
                    _ => TensorData::BF16(&wb[i]),
                };
                let mut ys: Vec<Vec<f32>> = heights.iter().map(|&r| vec![0f32; r]).collect();
                let mut jobs: Vec<GemvJob> = ys
                    .iter_mut()
                    .enumerate()
                    .map(|(i, y)| GemvJob { w: data(i), y })
                    .collect();
                gemv_many(&mut jobs, cols, &x);
                for (i, &r) in heights.iter().enumerate() {
                    let mut want = vec![0f32; r];
                    gemv_ref(data(i), r, cols, &x, &mut want);
                    let bound = 1e-6 * cols as f32 + 1e-6;
                    assert!(max_err(&ys[i], &want) <= bound, "dtype {dt} weight {i}");
                }
            }
        }
    }

    /// The row-by-row AVX2 / portable dot products (the path of CPUs without AVX-512) against
    /// the reference, whatever `gemv` picks on this CPU.
    #[test]
    fn row_dot_matches_reference_all_dtypes() {
        let mut rng = StdRng::seed_from_u64(12);
        for &n in &[1usize, 7, 8, 31, 32, 33, 576, 1000] {
            let w = rand_vec(n + 3, &mut rng);
            let x = rand_vec(n, &mut rng);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for data in [
                TensorData::F32(&w),
                TensorData::F16(&wh),
                TensorData::BF16(&wb),
            ] {
                let (got, want) = (dot(data, 3, &x), dot_ref(data, 3, &x));
                let bound = 1e-6 * n as f32 + 1e-6;
                assert!((got - want).abs() <= bound, "{:?} n={n}", data.dtype());
            }
        }
    }

    /// Prefill tiles widened from F16/BF16 hold exactly the values of `to_f32_into`, every
    /// half bit pattern included (infinities, NaNs, subnormals), a length that is not a
    /// multiple of 16 and an offset start.
    #[test]
    fn tile_widening_is_exact_for_every_half() {
        let f: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let b: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        for data in [TensorData::F16(&f), TensorData::BF16(&b)] {
            let (start, len) = (3, f.len() - 10);
            let mut got = vec![0f32; len];
            let mut want = vec![0f32; len];
            tile_to_f32(data, start, &mut got);
            data.to_f32_into(start, &mut want);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                if w.is_nan() {
                    // half quiets signalling NaNs; the shift keeps them as they are.
                    assert!(g.is_nan(), "{:?} element {}", data.dtype(), start + i);
                } else {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{:?} element {}",
                        data.dtype(),
                        start + i
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_matches_reference_all_dtypes() {
        let mut rng = StdRng::seed_from_u64(8);
        for &(rows, cols, n) in &[
            (65usize, 33usize, 3usize),
            (130, 64, 17),
            (64, 128, 2),
            (5, 7, 1),
        ] {
            let w = rand_vec(rows * cols, &mut rng);
            let x = rand_vec(n * cols, &mut rng);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for data in [
                TensorData::F32(&w),
                TensorData::F16(&wh),
                TensorData::BF16(&wb),
            ] {
                let mut y = vec![0f32; n * rows];
                let mut r = vec![0f32; n * rows];
                matmul(data, rows, cols, &x, n, &mut y);
                matmul_ref(data, rows, cols, &x, n, &mut r);
                let bound = 1e-6 * cols as f32 + 1e-6;
                assert!(
                    max_err(&y, &r) <= bound,
                    "{:?} {rows}x{cols}x{n}: {}",
                    data.dtype(),
                    max_err(&y, &r)
                );
            }
        }
    }

    #[test]
    fn rope_rotation_preserves_norm_and_is_identity_at_zero() {
        let cfg = jetvlm_core::hf::ModelConfig::from_value(
            &serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 10}),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let rope = Rope::new(&cfg);
        let mut rng = StdRng::seed_from_u64(9);
        let x = rand_vec(2 * 4 * 16, &mut rng);
        let mut y = x.clone();
        rope.apply(&mut y, 4, &[0, 1000]);
        assert_eq!(&y[..64], &x[..64]);
        let n0: f32 = x[64..].iter().map(|v| v * v).sum();
        let n1: f32 = y[64..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4 * n0);
        assert!(max_err(&x[64..], &y[64..]) > 1e-3);
    }

    /// The cosines and sines a thread keeps from its last rotation are reused only for the
    /// same frequencies and positions: two RoPE bases and repeated, changed and shared
    /// positions, in turn on one thread, each equal to the rotation computed afresh.
    #[test]
    fn rope_reuses_its_angles_only_for_the_same_frequencies_and_positions() {
        let ropes: Vec<Rope> = [1e4, 1e6]
            .iter()
            .map(|theta| {
                Rope::new(
                    &jetvlm_core::hf::ModelConfig::from_value(
                        &serde_json::json!({"architectures": ["LlamaForCausalLM"],
                            "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 1, "num_attention_heads": 4,
                            "vocab_size": 10, "rope_theta": theta}),
                        std::path::Path::new("config.json"),
                    )
                    .unwrap(),
                )
            })
            .collect();
        let (heads, d) = (4, 16);
        let mut rng = StdRng::seed_from_u64(11);
        let x = rand_vec(heads * d, &mut rng);
        for (r, p) in [(0, 5u32), (0, 5), (1, 5), (1, 6), (0, 6), (0, 5), (1, 5)] {
            let rope = &ropes[r];
            let mut got = x.clone();
            rope.apply(&mut got, heads, &[p]);
            let mut want = x.clone();
            for head in want.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(d / 2);
                for i in 0..d / 2 {
                    let ang = p as f64 * rope.inv_freq()[i];
                    let (c, s) = (ang.cos() as f32, ang.sin() as f32);
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c - x2 * s;
                    b[i] = x2 * c + x1 * s;
                }
            }
            assert_eq!(got, want, "base {r}, position {p}");
        }
    }

    /// M-RoPE against a direct transcription of transformers' recipe (cos/sin per component,
    /// sections picked, then `q * cos + rotate_half(q) * sin`); equal components are plain
    /// RoPE.
    #[test]
    fn mrope_matches_the_sectioned_rotation_and_reduces_to_rope() {
        let cfg = jetvlm_core::hf::ModelConfig::from_value(
            &serde_json::json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 10, "rope_theta": 1e6,
                "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let rope = Rope::new(&cfg);
        let mut rng = StdRng::seed_from_u64(3);
        let (heads, d) = (4, 16);
        let x = rand_vec(3 * heads * d, &mut rng);
        let pos = [[7u32, 7, 7], [7, 9, 12], [40, 41, 50]];
        let mut got = x.clone();
        rope.apply_mrope(&mut got, heads, &pos);
        let sec = [0, 0, 1, 1, 1, 2, 2, 2];
        let mut want = x.clone();
        for (t, p) in pos.iter().enumerate() {
            for head in want[t * heads * d..(t + 1) * heads * d].chunks_exact_mut(d) {
                let orig = head.to_vec();
                for j in 0..d {
                    let i = j % (d / 2);
                    let a = p[sec[i]] as f64 * rope.inv_freq()[i];
                    let rot = if j < d / 2 {
                        -orig[j + d / 2]
                    } else {
                        orig[j - d / 2]
                    };
                    head[j] = (orig[j] as f64 * a.cos() + rot as f64 * a.sin()) as f32;
                }
            }
        }
        assert!(max_err(&got, &want) < 1e-5, "{}", max_err(&got, &want));
        let mut plain = x[..heads * d].to_vec();
        rope.apply(&mut plain, heads, &[7]);
        assert_eq!(&got[..heads * d], &plain[..]);
    }

    /// Interleaved M-RoPE (Qwen3-VL) against transformers' recomposition: start from the
    /// temporal angle of every pair, then overwrite `slice(1, 3 * section[1], 3)` with the row
    /// and `slice(2, 3 * section[2], 3)` with the column.
    #[test]
    fn interleaved_mrope_matches_transformers_recomposition() {
        let cfg = jetvlm_core::hf::ModelConfig::from_value(
            &serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                "vocab_size": 10, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                "mrope_section": [4, 2, 2], "mrope_interleaved": true}}),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let rope = Rope::new(&cfg);
        let (heads, d) = (4, 16);
        let section = [4usize, 2, 2];
        let mut sec = [0usize; 8];
        for (dim, offset) in [(1usize, 1usize), (2, 2)] {
            for i in (offset..3 * section[dim]).step_by(3) {
                sec[i] = dim;
            }
        }
        assert_eq!(sec, [0, 1, 2, 0, 1, 2, 0, 0]);
        let mut rng = StdRng::seed_from_u64(5);
        let x = rand_vec(2 * heads * d, &mut rng);
        let pos = [[3u32, 5, 11], [20, 22, 21]];
        let mut got = x.clone();
        rope.apply_mrope(&mut got, heads, &pos);
        let mut want = x.clone();
        for (t, p) in pos.iter().enumerate() {
            for head in want[t * heads * d..(t + 1) * heads * d].chunks_exact_mut(d) {
                let orig = head.to_vec();
                for j in 0..d {
                    let i = j % (d / 2);
                    let a = p[sec[i]] as f64 * rope.inv_freq()[i];
                    let rot = if j < d / 2 {
                        -orig[j + d / 2]
                    } else {
                        orig[j - d / 2]
                    };
                    head[j] = (orig[j] as f64 * a.cos() + rot as f64 * a.sin()) as f32;
                }
            }
        }
        assert!(max_err(&got, &want) < 1e-5, "{}", max_err(&got, &want));
        // Not the contiguous layout: the same sections read as Qwen2.5-VL's differ.
        let mut contiguous = cfg.clone();
        contiguous.rope_scaling = jetvlm_core::hf::RopeScaling::MRope {
            section: [4, 2, 2],
            frame_grid: None,
            interleaved: false,
        };
        let mut other = x.clone();
        Rope::new(&contiguous).apply_mrope(&mut other, heads, &pos);
        assert!(max_err(&other, &want) > 1e-2);
    }

    #[test]
    fn sum_squares_matches_the_f64_sum() {
        let mut x = 99u32;
        for n in [0, 1, 15, 16, 17, 576, 2049] {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect();
            let want: f64 = v.iter().map(|&a| a as f64 * a as f64).sum();
            let got = sum_squares(&v) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-30),
                "{n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let w = [1.0f32; 4];
        let mut o = [0f32; 4];
        rms_norm(&x, &w, 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
