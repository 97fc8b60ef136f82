//! CPU kernels of weight-only quantized matrices ([`QuantData`]): the matrix-vector rows of
//! decode, by integer dot products, and the row dequantization embedding lookups use
//! (prefill runs the integer GEMM of [`crate::qgemm`] on the same activations).
//!
//! Decode quantizes its input `x` once per matrix-vector product (shared by every matrix that
//! reads it: a layer's q/k/v, or gate/up) to INT8 in blocks of 32 values with one f32 scale
//! each ([`QuantizedX`], llama.cpp's Q8_0 activations). A row is then
//! `sum_g scale_g * sum_(b in g) d_b * (codes_b . xq_b)` (+ `zero_g * sum_g(x)` for INT4, the
//! sums of `x` taken in f32 before quantization): the dot product of a block is exact in
//! integers, f32 only scales and adds the blocks.
//!
//! Kernels, picked at run time ([`Kernel::picked`]), each for INT4 and INT8 at every group
//! size (32, 64, 128):
//! - AVX-512 VNNI: `vpdpbusd`, 64 codes per instruction. On the banded layout the CPU
//!   decoder holds ([`QuantData::banded`]): 4 codes of 16 rows against 4 values of `x`
//!   broadcast, one lane per row. On a row-major matrix: INT4 code bytes against `x` kept in
//!   their nibble order, INT8 codes offset to unsigned, four rows at a time;
//! - AVX2: `vpmaddubsw` + `vpmaddwd`, 32 codes per block;
//! - NEON with the dot-product extension (`sdot`, Cortex-A78AE and later), 16 codes per
//!   instruction;
//! - portable integer code everywhere else.
//!
//! The portable kernel is the twin of the SIMD ones (the same integer block dot products;
//! only the f32 summation order differs); [`gemv_rows_ref`] is the twin of all of them
//! without activation quantization (the format crate's reference dequantization and an f64
//! dot product). The INT8 activations move each element of `x` by at most `d_b / 2`, so a
//! row is off the reference by at most `sum_b |scale_g| * d_b / 2 * sum_(i in b) |code_i|`
//! (tested). Row dequantization (prefill tiles) has an AVX-512 path giving the reference's
//! values exactly.

use crate::weights::{QuantData, RowBuf};

/// Values per INT8 activation block.
pub(crate) const QBLOCK: usize = 32;

/// `x` quantized to INT8 in blocks of [`QBLOCK`] values (llama.cpp's Q8_0 activations):
/// `x[i] ~= d[i / 32] * q[i]`, `d = max |x| / 127` over the block, round to nearest even.
/// A partial last block is padded with zeros.
pub(crate) struct QuantizedX {
    /// `x.len()` values before padding.
    len: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// The layouts only the row-major AVX-512 kernel reads, made on its first use (the
    /// banded kernel, which the decoder runs where AVX-512 VNNI is, needs none of them).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    row_major: std::sync::OnceLock<RowMajorX>,
    /// f32 sums of `x` over groups of 32, 64 and 128 values (INT4's zeros multiply them).
    sums: [Vec<f32>; 3],
    /// `-128` times the sum of each block's INT8 values: the banded INT8 kernel
    /// ([`crate::weights::QuantData::banded`]) starts each block's lanes from it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bcorr: Vec<i32>,
}

/// `x` laid out for the row-major AVX-512 kernel ([`QuantizedX::row_major`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct RowMajorX {
    /// Each block's `d` 8 times, one per 32-bit lane of the block's dot product (4 bytes per
    /// lane): AVX-512 scales the 16 lanes of a pair of blocks with one load.
    lanes: Vec<f32>,
    /// `q` in the nibble order of INT4 codes ([`nibble_order`]): the AVX-512 INT4 kernel
    /// multiplies the low nibbles of a run of code bytes by one contiguous half and the high
    /// nibbles by the other.
    nib: Vec<i8>,
    /// Each block's `d` 4 times, one per 32-bit lane of its dot product in nibble order
    /// (16 code bytes of a block fill one 128-bit lane).
    lanes4: Vec<f32>,
    /// `-128` times the sum of each 4 values of `q` (one per 32-bit lane): the AVX-512
    /// INT8 kernel multiplies `x` by the codes offset to unsigned (`c + 128`) and starts
    /// each lane's sum from this.
    corr: Vec<i32>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl RowMajorX {
    fn new(q: &[i8], d: &[f32]) -> Self {
        RowMajorX {
            lanes: d.iter().flat_map(|&s| [s; 8]).collect(),
            lanes4: d.iter().flat_map(|&s| [s; 4]).collect(),
            nib: nibble_order(q),
            corr: q
                .chunks_exact(4)
                .map(|c| -128 * c.iter().map(|&v| v as i32).sum::<i32>())
                .collect(),
        }
    }
}

/// Values of the spans of [`nibble_order`] at value `e` of a row of `len` (a multiple of
/// 32): 128 while 128 remain, then 64, then 32.
#[inline(always)]
fn nibble_span(e: usize, len: usize) -> usize {
    let left = len - e;
    if left >= 128 {
        128
    } else if left >= 64 {
        64
    } else {
        32
    }
}

/// `q` (whole blocks of 32) reordered to match INT4 code bytes: a 32-code chunk of a row is
/// 16 bytes, byte `i` holding code `i` (low nibble) and code `i + 16` (high nibble). The row
/// is cut into spans of 128 values (then one of 64 and one of 32 for the rest,
/// [`nibble_span`]); a span of `c` chunks is stored as the first 16 values of each chunk in
/// turn, then the last 16 of each. The low nibbles of the span's `8 c` code bytes then meet
/// its first half, the high nibbles its second half, lane by lane.
fn nibble_order(q: &[i8]) -> Vec<i8> {
    let mut out = vec![0i8; q.len()];
    let mut e = 0;
    while e < q.len() {
        let span = nibble_span(e, q.len());
        let half = span / 2;
        for c in 0..span / QBLOCK {
            let src = &q[e + c * QBLOCK..e + (c + 1) * QBLOCK];
            out[e + c * 16..e + c * 16 + 16].copy_from_slice(&src[..16]);
            out[e + half + c * 16..e + half + c * 16 + 16].copy_from_slice(&src[16..]);
        }
        e += span;
    }
    out
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22`: adding and taking
/// away `1.5 * 2^23` leaves no fraction bits (plain f32 arithmetic, so it vectorizes on any
/// target, where `round` is a library call).
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

impl QuantizedX {
    /// Quantizes `x`.
    pub(crate) fn new(x: &[f32]) -> Self {
        let nb = x.len().div_ceil(QBLOCK);
        let mut q = vec![0i8; nb * QBLOCK];
        let mut d = Vec::with_capacity(nb);
        let mut s32 = Vec::with_capacity(nb);
        if x.len().is_multiple_of(QBLOCK) {
            // Whole blocks: prefill's vectorized quantizer, the same values (tested).
            d.resize(nb, 0.0);
            s32.resize(nb, 0.0);
            crate::qgemm::quantize_token(x, &mut q, &mut d, &mut s32, QBLOCK);
        } else {
            // A partial last block (padded with zeros), block by block.
            Self::quantize_blocks(x, &mut q, &mut d, &mut s32);
        }
        let bcorr = q
            .chunks_exact(QBLOCK)
            .map(|c| -128 * c.iter().map(|&v| v as i32).sum::<i32>())
            .collect();
        let pairs = |s: &[f32]| -> Vec<f32> { s.chunks_exact(2).map(|p| p[0] + p[1]).collect() };
        let s64 = pairs(&s32);
        let s128 = pairs(&s64);
        QuantizedX {
            len: x.len(),
            q,
            d,
            row_major: std::sync::OnceLock::new(),
            sums: [s32, s64, s128],
            bcorr,
        }
    }

    /// `x` quantized block by block into `q` (whole blocks, zero-padded), pushing each
    /// block's scale to `d` and its f32 sum to `s32`: the scalar path, for a partial last
    /// block.
    fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut Vec<f32>, s32: &mut Vec<f32>) {
        for (xs, qs) in x.chunks(QBLOCK).zip(q.chunks_exact_mut(QBLOCK)) {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 127.0 / amax } else { 0.0 };
            for (o, &v) in qs.iter_mut().zip(xs) {
                // |v * inv| <= 127 (up to rounding): the cast does not saturate; a NaN
                // becomes 0 (and the NaN scale makes the logits non-finite, an error).
                *o = round_even(v * inv) as i32 as i8;
            }
            d.push(scale);
            s32.push(xs.iter().sum::<f32>());
        }
    }

    /// The row-major AVX-512 kernel's layouts of `x`, made on first use.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn row_major(&self) -> &RowMajorX {
        self.row_major
            .get_or_init(|| RowMajorX::new(&self.q, &self.d))
    }

    /// The INT8 values, `x.len()` rounded up to whole blocks (prefill's tests).
    #[cfg(test)]
    pub(crate) fn codes(&self) -> &[i8] {
        &self.q
    }

    /// Each block's scale `d` (prefill's tests).
    #[cfg(test)]
    pub(crate) fn block_scales(&self) -> &[f32] {
        &self.d
    }

    /// Sums of `x` per group of `group` (32, 64 or 128) values.
    pub(crate) fn group_sums(&self, group: usize) -> &[f32] {
        match group {
            32 => &self.sums[0],
            64 => &self.sums[1],
            _ => &self.sums[2],
        }
    }

    /// Quantized value `i` dequantized (`d * q`).
    #[cfg(test)]
    fn value(&self, i: usize) -> f32 {
        self.d[i / QBLOCK] * self.q[i] as f32
    }
}

/// The decode kernels: each computes the same integer block dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512F/BW/VL with VNNI.
    Vnni,
    /// AVX2, FMA and F16C.
    Avx2,
    /// NEON with the dot-product extension.
    NeonDot,
    /// Plain Rust.
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub(crate) const ALL: [Kernel; 4] = [
        Kernel::Vnni,
        Kernel::Avx2,
        Kernel::NeonDot,
        Kernel::Portable,
    ];

    /// Whether this CPU runs the kernel.
    pub(crate) fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => vnni::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::available(),
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => neon::available(),
            Kernel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel this CPU runs.
    pub(crate) fn picked() -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(Kernel::Portable)
    }
}

/// `ys[j] = W[r0 + j, :] . x` for a quantized `W` and `x` quantized by [`QuantizedX::new`],
/// with the fastest kernel this CPU runs.
pub(crate) fn gemv_rows(q: &QuantData<'_>, r0: usize, qx: &QuantizedX, ys: &mut [f32]) {
    gemv_rows_with(Kernel::picked(), q, r0, qx, ys);
}

/// [`gemv_rows`] with a given kernel (the portable one when this CPU lacks it).
pub(crate) fn gemv_rows_with(
    kernel: Kernel,
    q: &QuantData<'_>,
    r0: usize,
    qx: &QuantizedX,
    ys: &mut [f32],
) {
    let g = q.format.group();
    assert!(
        qx.len == q.cols
            && q.cols.is_multiple_of(g)
            && g.is_multiple_of(QBLOCK)
            && r0 + ys.len() <= q.rows(),
        "quantized gemv bounds"
    );
    if q.banded {
        // Whole bands on the banded VNNI kernel; anything else (another kernel's test, rows
        // that are not whole bands) reads the rows gathered, on the portable kernel.
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni
            && vnni::available()
            && r0.is_multiple_of(crate::weights::BAND)
            && ys.len().is_multiple_of(crate::weights::BAND)
        {
            // SAFETY: the CPU has the instructions (checked); bounds asserted above, whole
            // bands (checked).
            unsafe { vnni::bands(q, r0, qx, ys) };
            return;
        }
        return rows_portable(q, r0, qx, ys);
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Vnni if vnni::available() => {
            // SAFETY: the CPU has the instructions (checked); bounds asserted above.
            unsafe { vnni::rows(q, r0, qx, ys) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if avx2::available() => {
            // SAFETY: as above.
            unsafe { avx2::rows(q, r0, qx, ys) }
        }
        #[cfg(target_arch = "aarch64")]
        Kernel::NeonDot if neon::available() => {
            // SAFETY: as above.
            unsafe { neon::rows(q, r0, qx, ys) }
        }
        _ => rows_portable(q, r0, qx, ys),
    }
}

/// Exact integer dot product of block `b` (32 codes) of a row with block `b` of `xq`.
#[inline(always)]
fn block_dot(int8: bool, codes: &[u8], xq: &[i8], b: usize) -> i32 {
    let x = &xq[b * QBLOCK..(b + 1) * QBLOCK];
    if int8 {
        let c = &codes[b * QBLOCK..(b + 1) * QBLOCK];
        c.iter()
            .zip(x)
            .map(|(&c, &x)| c as i8 as i32 * x as i32)
            .sum()
    } else {
        // A 32-code chunk: byte i holds code i (low nibble) and code i + 16 (high).
        let c = &codes[b * QBLOCK / 2..(b + 1) * QBLOCK / 2];
        let (x0, x1) = x.split_at(16);
        c.iter()
            .zip(x0.iter().zip(x1))
            .map(|(&c, (&a, &b))| (c & 0x0f) as i32 * a as i32 + (c >> 4) as i32 * b as i32)
            .sum()
    }
}

/// Portable rows: the integer block dot products, scaled and summed in f32.
fn rows_portable(q: &QuantData<'_>, r0: usize, qx: &QuantizedX, ys: &mut [f32]) {
    let g = q.format.group();
    let bpg = g / QBLOCK;
    let int8 = q.format.bits() == 8;
    let sums = qx.group_sums(g);
    let mut buf = RowBuf::default();
    for (j, y) in ys.iter_mut().enumerate() {
        let (codes, scales, zeros) = q.row_into(r0 + j, &mut buf);
        let mut total = 0f32;
        for (gi, s) in scales.iter().enumerate() {
            let acc: f32 = (gi * bpg..(gi + 1) * bpg)
                .map(|b| block_dot(int8, codes, &qx.q, b) as f32 * qx.d[b])
                .sum();
            total += s.to_f32() * acc;
            if let Some(z) = zeros.get(gi) {
                total += z.to_f32() * sums[gi];
            }
        }
        *y = total;
    }
}

/// Reference twin of [`gemv_rows`] without activation quantization: each row dequantized
/// by the format crate's reference, then an f64 dot product with `x`.
#[cfg(test)]
pub(crate) fn gemv_rows_ref(q: &QuantData<'_>, r0: usize, x: &[f32], ys: &mut [f32]) {
    let mut row = vec![0f32; q.cols];
    let mut buf = RowBuf::default();
    for (j, y) in ys.iter_mut().enumerate() {
        let (codes, scales, zeros) = q.row_into(r0 + j, &mut buf);
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
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked at run time); bounds asserted above.
        unsafe { avx512::dequantize_row(q, r, out) };
        return;
    }
    dequantize_row_portable(q, r, out);
}

/// Portable [`dequantize_row`].
fn dequantize_row_portable(q: &QuantData<'_>, r: usize, out: &mut [f32]) {
    let g = q.format.group();
    let mut buf = RowBuf::default();
    let (codes, scales, zeros) = q.row_into(r, &mut buf);
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

/// AVX-512 row dequantization (prefill tiles).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::weights::{QuantData, RowBuf};
    use std::arch::x86_64::*;

    /// Row `r` dequantized, 16 values per vector; `zero + scale * code` rounded as the
    /// scalar reference rounds it (a product, then a sum: no fused multiply-add), so the
    /// values are the reference's exactly.
    ///
    /// # Safety
    /// Requires AVX-512F; `r < q.rows()`, `out.len() >= q.cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dequantize_row(q: &QuantData<'_>, r: usize, out: &mut [f32]) {
        let g = q.format.group();
        let mut buf = RowBuf::default();
        let (codes, scales, zeros) = q.row_into(r, &mut buf);
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

/// AVX-512 VNNI rows. `vpdpbusd` multiplies unsigned bytes by signed bytes.
///
/// INT4 codes (0..=15) go in as they are, 128 per step: a 64-byte load of code bytes, its
/// low nibbles against the first half of the span of `x` in nibble order
/// ([`QuantizedX`]'s `nib`), its high nibbles against the second half, both into the same
/// 16 i32 lanes (4 per block). INT8 codes go in offset to unsigned (`c + 128`), 64 per
/// step, each lane started from `-128` times the sum of its 4 values of `x`. The lanes are
/// then converted to f32 and multiplied by their block's `d` and group's scale (a row's
/// scales converted 16 groups at a time, `vcvtph2ps`, and spread over the lanes by a
/// permutation).
///
/// Four rows go together sharing the loads of `x`, and the code bytes 4 KiB ahead are
/// prefetched: a step is so short that the core alone does not keep enough cache-line reads
/// in flight to stream the weights from DRAM (four interleaved rows without the prefetch
/// measured slower than one row at a time). `examples/qgemv_probe.rs` measures them.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::QuantizedX;
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// How far ahead of the rows being read their code bytes are prefetched.
    const PREFETCH_BYTES: usize = 4096;

    /// How far ahead of a block of a band its code bytes are prefetched, a line per vector
    /// (a prefetch past the matrix is a hint that touches nothing).
    const BAND_PREFETCH: usize = 2048;

    /// # Safety
    /// Requires AVX-512F/BW/VL and VNNI; rows `r0..r0 + ys.len()` inside `q`, `qx` quantized
    /// from `q.cols` values, `q.cols` a multiple of the group (asserted by the caller).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows(q: &QuantData<'_>, r0: usize, qx: &QuantizedX, ys: &mut [f32]) {
        let mut r = r0;
        // SAFETY: as this function's contract, rows r0..r0 + ys.len() in turn.
        unsafe {
            let row_bytes = q.format.code_bytes_per_row(q.cols);
            let mut chunks = ys.chunks_exact_mut(4);
            for y in &mut chunks {
                prefetch(
                    q.codes,
                    (r * row_bytes + PREFETCH_BYTES)..((r + 4) * row_bytes + PREFETCH_BYTES),
                );
                if q.format.bits() == 8 {
                    rows_int8::<4>(q, r, qx, y);
                } else {
                    rows_int4::<4>(q, r, qx, y);
                }
                r += 4;
            }
            for y in chunks.into_remainder().chunks_exact_mut(1) {
                if q.format.bits() == 8 {
                    rows_int8::<1>(q, r, qx, y);
                } else {
                    rows_int4::<1>(q, r, qx, y);
                }
                r += 1;
            }
        }
    }

    /// Banded rows `r0..r0 + ys.len()` (whole bands of 16, [`QuantData::banded`]), one band
    /// at a time: one 64-byte load holds 4 code bytes of each of the band's 16 rows, and
    /// `vpdpbusd` multiplies them by the same 4 values of `x` (broadcast), so each i32 lane
    /// gathers one row's block dot product and no horizontal sums are needed; a block's
    /// lanes are then converted and scaled once for all 16 rows.
    ///
    /// # Safety
    /// As [`rows`]; `q.banded`, `r0` and `ys.len()` multiples of [`crate::weights::BAND`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn bands(q: &QuantData<'_>, r0: usize, qx: &QuantizedX, ys: &mut [f32]) {
        for (i, y) in ys.chunks_exact_mut(crate::weights::BAND).enumerate() {
            let band = r0 / crate::weights::BAND + i;
            // SAFETY: as this function's contract, band `band` lies inside `q`.
            unsafe {
                if q.format.bits() == 8 {
                    band_int8(q, band, qx, y);
                } else {
                    band_int4(q, band, qx, y);
                }
            }
        }
    }

    /// `x[i..i + 4]` (INT8) broadcast to every 32-bit lane.
    ///
    /// # Safety
    /// AVX-512F; `xp + i..xp + i + 4` readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn x4(xp: *const i8, i: usize) -> __m512i {
        // SAFETY: the caller reads inside `x`.
        _mm512_set1_epi32(unsafe { (xp.add(i) as *const i32).read_unaligned() })
    }

    /// INT4 band `band` into `ys` (16 rows). A block of 32 codes is 16 bytes of each row,
    /// 4 vectors of the band: vector `c` holds bytes `4 c..4 c + 4` of each row, codes
    /// `4 c..4 c + 4` in their low nibbles and `16 + 4 c..` in their high ones. The high
    /// nibbles are multiplied in place (`byte & 0xf0`, 16 times the code) into their own
    /// lanes, exactly 16 times their sum, shifted back before the low nibbles' sum is added.
    ///
    /// # Safety
    /// As [`bands`] for one band.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn band_int4(q: &QuantData<'_>, band: usize, qx: &QuantizedX, ys: &mut [f32]) {
        let g = q.format.group();
        let groups = q.format.groups_per_row(q.cols);
        let bpg = g / super::QBLOCK;
        let band_bytes = crate::weights::BAND * q.format.code_bytes_per_row(q.cols);
        let sums = qx.group_sums(g);
        let lo_mask = _mm512_set1_epi8(0x0f);
        let hi_mask = _mm512_set1_epi8(0xf0u8 as i8);
        // SAFETY: the band's codes (band_bytes), parameters (16 per group) and `x` (cols
        // values, a scale per block) are inside their slices.
        unsafe {
            let cp = q.codes.as_ptr().add(band * band_bytes);
            let sp = q.scales.as_ptr().add(band * crate::weights::BAND * groups);
            let zp = q.zeros.as_ptr().add(band * crate::weights::BAND * groups);
            let (xp, dp) = (qx.q.as_ptr(), qx.d.as_ptr());
            let mut total = _mm512_setzero_ps();
            for gi in 0..groups {
                let s = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(gi * 16) as *const __m256i));
                let z = _mm512_cvtph_ps(_mm256_loadu_si256(zp.add(gi * 16) as *const __m256i));
                total = _mm512_fmadd_ps(z, _mm512_set1_ps(sums[gi]), total);
                let mut tg = _mm512_setzero_ps();
                for b in gi * bpg..(gi + 1) * bpg {
                    let (vp, x) = (cp.add(b * 256), xp.add(b * super::QBLOCK));
                    for l in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            vp.wrapping_add(BAND_PREFETCH + l * 64) as *const i8
                        );
                    }
                    let mut lo = _mm512_setzero_si512();
                    let mut hi = _mm512_setzero_si512();
                    for c in 0..4 {
                        let v = _mm512_loadu_si512(vp.add(c * 64) as *const _);
                        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(v, lo_mask), x4(x, 4 * c));
                        hi = _mm512_dpbusd_epi32(
                            hi,
                            _mm512_and_si512(v, hi_mask),
                            x4(x, 16 + 4 * c),
                        );
                    }
                    let acc = _mm512_add_epi32(lo, _mm512_srai_epi32::<4>(hi));
                    tg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(*dp.add(b)), tg);
                }
                total = _mm512_fmadd_ps(tg, s, total);
            }
            _mm512_storeu_ps(ys.as_mut_ptr(), total);
        }
    }

    /// INT8 band `band` into `ys` (16 rows). A block of 32 codes is 32 bytes of each row,
    /// 8 vectors of the band, the codes stored offset to unsigned (`c + 128`); a block's
    /// lanes start from `-128` times the block's sum of `x` (`qx.bcorr`), which leaves
    /// `codes . x` exactly. Two accumulators (even and odd vectors) halve the chain.
    ///
    /// # Safety
    /// As [`bands`] for one band.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn band_int8(q: &QuantData<'_>, band: usize, qx: &QuantizedX, ys: &mut [f32]) {
        let g = q.format.group();
        let groups = q.format.groups_per_row(q.cols);
        let bpg = g / super::QBLOCK;
        let band_bytes = crate::weights::BAND * q.format.code_bytes_per_row(q.cols);
        // SAFETY: as in `band_int4`.
        unsafe {
            let cp = q.codes.as_ptr().add(band * band_bytes);
            let sp = q.scales.as_ptr().add(band * crate::weights::BAND * groups);
            let (xp, dp, kp) = (qx.q.as_ptr(), qx.d.as_ptr(), qx.bcorr.as_ptr());
            let mut total = _mm512_setzero_ps();
            for gi in 0..groups {
                let s = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(gi * 16) as *const __m256i));
                let mut tg = _mm512_setzero_ps();
                for b in gi * bpg..(gi + 1) * bpg {
                    let (vp, x) = (cp.add(b * 512), xp.add(b * super::QBLOCK));
                    for l in 0..8 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            vp.wrapping_add(BAND_PREFETCH + l * 64) as *const i8
                        );
                    }
                    let mut a0 = _mm512_set1_epi32(*kp.add(b));
                    let mut a1 = _mm512_setzero_si512();
                    for c in (0..8).step_by(2) {
                        let v0 = _mm512_loadu_si512(vp.add(c * 64) as *const _);
                        let v1 = _mm512_loadu_si512(vp.add(c * 64 + 64) as *const _);
                        a0 = _mm512_dpbusd_epi32(a0, v0, x4(x, 4 * c));
                        a1 = _mm512_dpbusd_epi32(a1, v1, x4(x, 4 * c + 4));
                    }
                    let acc = _mm512_add_epi32(a0, a1);
                    tg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(*dp.add(b)), tg);
                }
                total = _mm512_fmadd_ps(tg, s, total);
            }
            _mm512_storeu_ps(ys.as_mut_ptr(), total);
        }
    }

    /// `ys[k]` = the sum of the lanes of `t[k]`; four rows reduced together (a transpose
    /// by 128-bit lanes, then sums within them).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce<const R: usize>(t: &[__m512; R], ys: &mut [f32]) {
        if R != 4 {
            for k in 0..R {
                ys[k] = _mm512_reduce_add_ps(t[k]);
            }
            return;
        }
        // 128-bit lanes summed in pairs: [t0 0+1 | t0 2+3 | t1 0+1 | t1 2+3], [t2 | t3].
        let a = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(t[0], t[1]),
            _mm512_shuffle_f32x4::<0xdd>(t[0], t[1]),
        );
        let b = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(t[2], t[3]),
            _mm512_shuffle_f32x4::<0xdd>(t[2], t[3]),
        );
        // One 128-bit lane per row: [t0 | t1 | t2 | t3].
        let c = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xdd>(a, b),
        );
        let c = _mm512_add_ps(c, _mm512_permute_ps::<0x4e>(c));
        let c = _mm512_add_ps(c, _mm512_permute_ps::<0xb1>(c));
        let mut out = [0f32; 16];
        // SAFETY: `out` holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), c) };
        for (k, y) in ys.iter_mut().take(4).enumerate() {
            *y = out[4 * k];
        }
    }

    /// Prefetches the cache lines of `bytes[range]` into L1 (the part inside `bytes`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn prefetch(bytes: &[u8], range: std::ops::Range<usize>) {
        let end = range.end.min(bytes.len());
        let mut i = range.start;
        while i < end {
            // SAFETY: a hint; the address lies inside `bytes`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(i) as *const i8) };
            i += 64;
        }
    }

    /// Lane indices of a 128-value INT4 step into the 16 group scales of its chunk, and
    /// their increment per step: lane `l` holds block `l / 4`, of group `8 l / g` from the
    /// step's first.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scale_lanes(g: usize) -> (__m512i, __m512i) {
        match g {
            32 => (
                _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                _mm512_set1_epi32(4),
            ),
            64 => (
                _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                _mm512_set1_epi32(2),
            ),
            _ => (_mm512_setzero_si512(), _mm512_set1_epi32(1)),
        }
    }

    /// INT4 rows `r0..r0 + R` (`ys.len() == R`), 128 codes of each per step; a row's last
    /// span may be 64 or 32 codes ([`super::nibble_span`], masked loads). The zero terms
    /// (`zero_g * sum_g(x)`) start the accumulators.
    ///
    /// # Safety
    /// As [`rows`] for rows `r0..r0 + R`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows_int4<const R: usize>(
        q: &QuantData<'_>,
        r0: usize,
        qx: &QuantizedX,
        ys: &mut [f32],
    ) {
        let g = q.format.group();
        let cols = q.cols;
        let groups = q.format.groups_per_row(cols);
        let sums = qx.group_sums(g);
        let row: [_; R] = std::array::from_fn(|k| q.row(r0 + k));
        let cp: [*const u8; R] = std::array::from_fn(|k| row[k].0.as_ptr());
        let rm = qx.row_major();
        let (xp, lp) = (rm.nib.as_ptr(), rm.lanes4.as_ptr());
        let m4 = _mm512_set1_epi8(0x0f);
        let (base, step) = scale_lanes(g);
        let mut total = [_mm512_setzero_ps(); R];
        let mut sv = [_mm512_setzero_ps(); R];
        let mut g0 = 0;
        while g0 < groups {
            let n = (groups - g0).min(16);
            let m = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: scales/zeros/sums[g0..g0 + n] are in bounds (masked loads); the spans
            // of values g0 * g..(g0 + n) * g lie inside the rows' codes (half a byte each),
            // `nib` (cols values) and `lanes4` (a lane per 8 values); the loads of a
            // short last span are masked to it.
            unsafe {
                let xs = _mm512_maskz_loadu_ps(m, sums.as_ptr().add(g0));
                for k in 0..R {
                    let (_, scales, zeros) = row[k];
                    sv[k] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        m,
                        scales.as_ptr().add(g0) as *const i16,
                    ));
                    let zv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        m,
                        zeros.as_ptr().add(g0) as *const i16,
                    ));
                    total[k] = _mm512_fmadd_ps(zv, xs, total[k]);
                }
                let end = (g0 + n) * g;
                let mut e = g0 * g;
                let mut idx = base;
                while e + 128 <= end {
                    let xl = _mm512_loadu_si512(xp.add(e) as *const _);
                    let xh = _mm512_loadu_si512(xp.add(e + 64) as *const _);
                    let l = _mm512_loadu_ps(lp.add(e / 8));
                    for k in 0..R {
                        let v = _mm512_loadu_si512(cp[k].add(e / 2) as *const _);
                        let lo = _mm512_and_si512(v, m4);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                        let acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl);
                        let acc = _mm512_dpbusd_epi32(acc, hi, xh);
                        let f = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sv[k]), l);
                        total[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), f, total[k]);
                    }
                    idx = _mm512_add_epi32(idx, step);
                    e += 128;
                }
                while e < end {
                    // A last span of t = 64 or 32 values: t / 2 code bytes, halves of t / 2.
                    let t = super::nibble_span(e, cols);
                    let bm = (1u64 << (t / 2)) - 1;
                    let xl = _mm512_maskz_loadu_epi8(bm, xp.add(e));
                    let xh = _mm512_maskz_loadu_epi8(bm, xp.add(e + t / 2));
                    let lm = ((1u32 << (t / 8)) - 1) as __mmask16;
                    let l = _mm512_maskz_loadu_ps(lm, lp.add(e / 8));
                    for k in 0..R {
                        let v = _mm512_maskz_loadu_epi8(bm, cp[k].add(e / 2) as *const i8);
                        let lo = _mm512_and_si512(v, m4);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                        let acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl);
                        let acc = _mm512_dpbusd_epi32(acc, hi, xh);
                        let f = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sv[k]), l);
                        total[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), f, total[k]);
                    }
                    // The next span starts t / g groups on (g <= t here: g divides cols).
                    idx = _mm512_add_epi32(idx, _mm512_set1_epi32((t / g.min(t)) as i32));
                    e += t;
                }
            }
            g0 += n;
        }
        reduce(&total, ys);
    }

    /// INT8 rows `r0..r0 + R` (`ys.len() == R`), 64 codes of each per step: the codes
    /// offset to unsigned (`c + 128`, an exclusive or of the sign bit) times `x`, each i32
    /// lane started from `-128` times the sum of its 4 values of `x` (`qx.corr`), which
    /// leaves `codes . x` exactly; then f32, times each lane's block `d` (8 lanes per block)
    /// and group scale. A row's last 32 codes (a width that is not a multiple of 64) go
    /// through masked loads.
    ///
    /// # Safety
    /// As [`rows`] for rows `r0..r0 + R`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows_int8<const R: usize>(
        q: &QuantData<'_>,
        r0: usize,
        qx: &QuantizedX,
        ys: &mut [f32],
    ) {
        let g = q.format.group();
        let cols = q.cols;
        let groups = q.format.groups_per_row(cols);
        let row: [_; R] = std::array::from_fn(|k| q.row(r0 + k));
        let cp: [*const u8; R] = std::array::from_fn(|k| row[k].0.as_ptr());
        let rm = qx.row_major();
        let (xp, lp, kp) = (qx.q.as_ptr(), rm.lanes.as_ptr(), rm.corr.as_ptr());
        let flip = _mm512_set1_epi8(-128);
        // Lane l of a 64-value step covers values 4 l..4 l + 4: group (4 l) / g from the step's.
        let base = match g {
            32 => _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
            _ => _mm512_setzero_si512(),
        };
        let mut total = [_mm512_setzero_ps(); R];
        let mut sv = [_mm512_setzero_ps(); R];
        let mut g0 = 0;
        while g0 < groups {
            let n = (groups - g0).min(16);
            let m = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: scales[g0..g0 + n] are in bounds (masked loads); the codes, `qx.q`,
            // `corr` and `lanes` of values g0 * g..(g0 + n) * g lie inside the rows and
            // `qx` (cols values, a lane per 4); a last 32 values are loaded masked.
            unsafe {
                for k in 0..R {
                    sv[k] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        m,
                        row[k].1.as_ptr().add(g0) as *const i16,
                    ));
                }
                let e0 = g0 * g;
                let end = (g0 + n) * g;
                let mut e = e0;
                while e + 64 <= end {
                    let x = _mm512_loadu_si512(xp.add(e) as *const _);
                    let c = _mm512_loadu_si512(kp.add(e / 4) as *const _);
                    let l = _mm512_loadu_ps(lp.add(e / 4));
                    let idx = _mm512_add_epi32(base, _mm512_set1_epi32(((e - e0) / g) as i32));
                    for k in 0..R {
                        let w = _mm512_loadu_si512(cp[k].add(e) as *const _);
                        let acc = _mm512_dpbusd_epi32(c, _mm512_xor_si512(w, flip), x);
                        let f = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sv[k]), l);
                        total[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), f, total[k]);
                    }
                    e += 64;
                }
                while e < end {
                    let bm: u64 = (1u64 << 32) - 1;
                    let lm: __mmask16 = 0x00ff;
                    let x = _mm512_maskz_loadu_epi8(bm, xp.add(e));
                    let c = _mm512_maskz_loadu_epi32(lm, kp.add(e / 4));
                    let l = _mm512_maskz_loadu_ps(lm, lp.add(e / 4));
                    let idx = _mm512_add_epi32(base, _mm512_set1_epi32(((e - e0) / g) as i32));
                    for k in 0..R {
                        let w = _mm512_maskz_loadu_epi8(bm, cp[k].add(e) as *const i8);
                        let acc = _mm512_dpbusd_epi32(c, _mm512_xor_si512(w, flip), x);
                        let f = _mm512_mul_ps(_mm512_permutexvar_ps(idx, sv[k]), l);
                        total[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), f, total[k]);
                    }
                    e += 64;
                }
            }
            g0 += n;
        }
        reduce(&total, ys);
    }
}

/// AVX2 rows, one 32-value block at a time: INT4 nibbles unpacked into 32 bytes in code
/// order, INT8 codes as magnitudes with their signs moved onto `x`; `vpmaddubsw` (pairs of
/// unsigned times signed bytes into i16: at most 2 * 128 * 127, no saturation) and
/// `vpmaddwd` by ones (into i32); then f32, scaled by the block's `d`, and the group's sum by
/// its scale. Scales and zeros converted 8 at a time (`vcvtph2ps`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QBLOCK, QuantizedX};
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Up to 8 halves (`src.len() <= 8`) as f32 in `dst`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn halves(src: &[half::f16], dst: &mut [f32; 8]) {
        let mut h = [0u16; 8];
        for (o, s) in h.iter_mut().zip(src) {
            *o = s.to_bits();
        }
        // SAFETY: `h` and `dst` hold 8 elements each.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i));
            _mm256_storeu_ps(dst.as_mut_ptr(), v);
        }
    }

    /// # Safety
    /// Requires AVX2, FMA and F16C; as [`super::vnni::rows`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows(q: &QuantData<'_>, r0: usize, qx: &QuantizedX, ys: &mut [f32]) {
        let g = q.format.group();
        let int8 = q.format.bits() == 8;
        let groups = q.format.groups_per_row(q.cols);
        let sums = qx.group_sums(g);
        let xp = qx.q.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0f);
        let (mut ws, mut zs) = ([0f32; 8], [0f32; 8]);
        for (j, y) in ys.iter_mut().enumerate() {
            let (codes, scales, zeros) = q.row(r0 + j);
            let cp = codes.as_ptr();
            let mut total = _mm256_setzero_ps();
            let mut zterm = 0f32;
            let mut g0 = 0;
            while g0 < groups {
                let n = (groups - g0).min(8);
                halves(&scales[g0..g0 + n], &mut ws);
                if !int8 {
                    halves(&zeros[g0..g0 + n], &mut zs);
                    for (z, s) in zs[..n].iter().zip(&sums[g0..g0 + n]) {
                        zterm += z * s;
                    }
                }
                for (gi, &s) in ws[..n].iter().enumerate() {
                    let e0 = (g0 + gi) * g;
                    let mut acc = _mm256_setzero_ps();
                    for e in (e0..e0 + g).step_by(QBLOCK) {
                        // SAFETY: the block's codes lie inside the row and x[e..e + 32]
                        // inside `qx` (e + 32 <= cols).
                        let p = unsafe {
                            let x = _mm256_loadu_si256(xp.add(e) as *const __m256i);
                            if int8 {
                                let w = _mm256_loadu_si256(cp.add(e) as *const __m256i);
                                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
                            } else {
                                let v = _mm_loadu_si128(cp.add(e / 2) as *const __m128i);
                                let w = _mm256_and_si256(
                                    _mm256_set_m128i(_mm_srli_epi16::<4>(v), v),
                                    m4,
                                );
                                _mm256_maddubs_epi16(w, x)
                            }
                        };
                        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                        acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(qx.d[e / QBLOCK]), acc);
                    }
                    total = _mm256_fmadd_ps(_mm256_set1_ps(s), acc, total);
                }
                g0 += n;
            }
            *y = hsum(total) + zterm;
        }
    }
}

/// NEON rows with the dot-product extension (`sdot`: 16 signed byte products summed into 4
/// i32 lanes), one 32-value block at a time: INT4 nibbles (0..=15, also valid signed bytes)
/// unpacked in code order, INT8 codes as they are. Scales and zeros converted 4 at a time
/// by the F16 widening of [`crate::kernels`].
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{QBLOCK, QuantizedX};
    use crate::weights::QuantData;
    use std::arch::aarch64::*;

    pub fn available() -> bool {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }

    /// `acc + a . b` by 4-byte groups (`sdot`; the intrinsic is not stable Rust yet).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only instruction of the dotprod extension, enabled here.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    /// Up to 4 halves (`src.len() <= 4`) as f32 in `dst`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn halves(src: &[half::f16], dst: &mut [f32; 4]) {
        let mut h = [0u32; 4];
        for (o, s) in h.iter_mut().zip(src) {
            *o = s.to_bits() as u32;
        }
        // SAFETY: `h` and `dst` hold 4 lanes.
        unsafe {
            let f = crate::kernels::neon::f16x4_to_f32(vld1q_u32(h.as_ptr()));
            vst1q_f32(dst.as_mut_ptr(), f);
        }
    }

    /// # Safety
    /// Requires the dotprod extension; as [`super::rows_portable`]'s bounds (asserted by
    /// the caller).
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn rows(q: &QuantData<'_>, r0: usize, qx: &QuantizedX, ys: &mut [f32]) {
        let g = q.format.group();
        let int8 = q.format.bits() == 8;
        let groups = q.format.groups_per_row(q.cols);
        let sums = qx.group_sums(g);
        let xp = qx.q.as_ptr();
        let (mut ws, mut zs) = ([0f32; 4], [0f32; 4]);
        for (j, y) in ys.iter_mut().enumerate() {
            let (codes, scales, zeros) = q.row(r0 + j);
            let cp = codes.as_ptr();
            let mut total = vdupq_n_f32(0.0);
            let mut zterm = 0f32;
            let mut g0 = 0;
            while g0 < groups {
                let n = (groups - g0).min(4);
                halves(&scales[g0..g0 + n], &mut ws);
                if !int8 {
                    halves(&zeros[g0..g0 + n], &mut zs);
                    for (z, s) in zs[..n].iter().zip(&sums[g0..g0 + n]) {
                        zterm += z * s;
                    }
                }
                for (gi, &s) in ws[..n].iter().enumerate() {
                    let e0 = (g0 + gi) * g;
                    let mut acc = vdupq_n_f32(0.0);
                    for e in (e0..e0 + g).step_by(QBLOCK) {
                        // SAFETY: the block's codes lie inside the row and x[e..e + 32]
                        // inside `qx` (e + 32 <= cols).
                        let dot = unsafe {
                            let x0 = vld1q_s8(xp.add(e));
                            let x1 = vld1q_s8(xp.add(e + 16));
                            let (w0, w1) = if int8 {
                                (
                                    vld1q_s8(cp.add(e) as *const i8),
                                    vld1q_s8(cp.add(e + 16) as *const i8),
                                )
                            } else {
                                let v = vld1q_u8(cp.add(e / 2));
                                (
                                    vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))),
                                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)),
                                )
                            };
                            sdot(sdot(vdupq_n_s32(0), w0, x0), w1, x1)
                        };
                        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot), qx.d[e / QBLOCK]);
                    }
                    total = vfmaq_n_f32(total, acc, s);
                }
                g0 += n;
            }
            *y = vaddvq_f32(total) + zterm;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::weights::{BAND, Tensor, TensorData};
    use jetvlm_quant::WeightFormat;
    use rand::{Rng, SeedableRng};

    /// A random `[rows, cols]` matrix quantized by the reference.
    fn random_matrix(rng: &mut impl Rng, fmt: WeightFormat, rows: usize, cols: usize) -> Tensor {
        random_matrix_with(rng, fmt, rows, cols, false)
    }

    /// [`random_matrix`]; with `int8_min`, every 7th INT8 code is -128 (a GGUF Q8_0 file may
    /// hold it; the quantizer never writes it).
    pub(crate) fn random_matrix_with(
        rng: &mut impl Rng,
        fmt: WeightFormat,
        rows: usize,
        cols: usize,
        int8_min: bool,
    ) -> Tensor {
        let (mut codes, mut scales, mut zeros) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rows {
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-0.3f32..0.5)).collect();
            let q = jetvlm_quant::weight::quantize_row(&x, fmt).unwrap();
            codes.extend(q.codes);
            scales.extend(q.scales);
            zeros.extend(q.zeros);
        }
        if int8_min && fmt.bits() == 8 {
            codes.iter_mut().step_by(7).for_each(|c| *c = 0x80);
        }
        Tensor::quantized("w", fmt, [rows, cols], &codes, &scales, &zeros).unwrap()
    }

    fn quant(t: &Tensor) -> QuantData<'_> {
        match t.data() {
            TensorData::Quant(q) => q,
            _ => unreachable!(),
        }
    }

    /// The activation quantization: each value within `d / 2` of `x` (plus f32 rounding),
    /// codes in -127..=127, the largest magnitude of a block exactly 127, group sums equal
    /// to the sums of `x`, a zero block all zeros, a partial block padded.
    #[test]
    fn activation_blocks_are_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut all: Vec<f32> = (0..416).map(|_| rng.random_range(-3.0f32..2.0)).collect();
        all[64..96].fill(0.0);
        all[100] = 40.0;
        // A partial last block (the scalar path), whole blocks (prefill's quantizer).
        for len in [400usize, 416] {
            let x = &all[..len];
            let qx = QuantizedX::new(x);
            assert_eq!(qx.q.len(), 416);
            assert_eq!(qx.d.len(), 13);
            assert!(qx.q[len..].iter().all(|&v| v == 0));
            for (b, xs) in x.chunks(QBLOCK).enumerate() {
                let d = qx.d[b];
                let top = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(d, top / 127.0, "block {b}");
                if top > 0.0 {
                    assert!(
                        qx.q[b * 32..b * 32 + xs.len()]
                            .iter()
                            .any(|v| v.abs() == 127)
                    );
                }
                for (i, &v) in xs.iter().enumerate() {
                    let k = b * 32 + i;
                    assert!(qx.q[k] != -128);
                    let err = (qx.value(k) - v).abs();
                    assert!(
                        err <= 0.5 * d * (1.0 + 1e-5),
                        "x[{k}] = {v}: {err} > d / 2 = {d}"
                    );
                }
                assert_eq!(qx.row_major().lanes[b * 8..b * 8 + 8], [d; 8]);
                assert_eq!(qx.row_major().lanes4[b * 4..b * 4 + 4], [d; 4]);
                for k in b * 8..b * 8 + 8 {
                    let s: i32 = qx.q[4 * k..4 * k + 4].iter().map(|&v| v as i32).sum();
                    assert_eq!(qx.row_major().corr[k], -128 * s);
                }
            }
            assert!(qx.q[64..96].iter().all(|&v| v == 0) && qx.d[2] == 0.0);
            for (gi, group) in [32usize, 64, 128].into_iter().enumerate() {
                for (k, s) in qx.sums[gi].iter().enumerate() {
                    let want: f64 = x[k * group..((k + 1) * group).min(len)]
                        .iter()
                        .map(|&v| v as f64)
                        .sum();
                    assert!((*s as f64 - want).abs() < 1e-4, "g{group} sum {k}");
                }
            }
        }
        // Ties round to even.
        assert_eq!(round_even(2.5), 2.0);
        assert_eq!(round_even(-3.5), -4.0);
        assert_eq!(round_even(126.6), 127.0);
    }

    /// The nibble order pairs each INT4 code with its own value of `x`: the low nibble of
    /// byte `i` of a span's code bytes meets `nib[e + i]`, the high nibble
    /// `nib[e + span / 2 + i]`, and that sums to `codes . q` for every row length.
    #[test]
    fn nibble_order_pairs_codes_with_their_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for len in [32usize, 64, 96, 128, 160, 224, 576, 1120] {
            let q: Vec<i8> = (0..len).map(|_| rng.random_range(-127i8..=127)).collect();
            let codes: Vec<u8> = (0..len).map(|_| rng.random_range(0u8..16)).collect();
            // The row's code bytes as the formats store them: chunk of 32 codes -> 16 bytes.
            let bytes: Vec<u8> = codes
                .chunks_exact(32)
                .flat_map(|c| (0..16).map(move |i| c[i] | (c[i + 16] << 4)))
                .collect();
            let nib = nibble_order(&q);
            let want: i32 = codes
                .iter()
                .zip(&q)
                .map(|(&c, &x)| c as i32 * x as i32)
                .sum();
            let mut got = 0i32;
            let mut e = 0;
            while e < len {
                let span = nibble_span(e, len);
                for (i, &b) in bytes[e / 2..(e + span) / 2].iter().enumerate() {
                    got += (b & 0x0f) as i32 * nib[e + i] as i32;
                    got += (b >> 4) as i32 * nib[e + span / 2 + i] as i32;
                }
                e += span;
            }
            assert_eq!(got, want, "row of {len}");
            let mut sorted = nib.clone();
            sorted.sort();
            let mut orig = q.clone();
            orig.sort();
            assert_eq!(sorted, orig, "a permutation of q ({len})");
        }
    }

    /// The bound of the activation quantization on row `r`: each code meets an `x` off by
    /// at most `d_b / 2`, so the row is off by `sum_b |scale| * d_b / 2 * sum |code|`.
    fn activation_bound(q: &QuantData<'_>, r: usize, qx: &QuantizedX) -> f32 {
        let (c, s, _) = q.row(r);
        let g = q.format.group();
        (0..q.cols)
            .map(|i| {
                let code = jetvlm_quant::unpack_code(c, q.format.bits(), i) as f32;
                let code = if q.format.bits() == 8 {
                    (code as u8 as i8) as f32
                } else {
                    code
                };
                s[i / g].to_f32().abs() * 0.5 * qx.d[i / QBLOCK] * (1.0 + 1e-5) * code.abs()
            })
            .sum()
    }

    /// Every kernel this CPU runs (SIMD and portable) against the portable twin (the same
    /// integer block dot products: they differ by f32 summation order only, within
    /// `cols * eps * sum |terms|`), and the portable twin against the f32 reference within
    /// the activation bound, for INT4 and INT8 at every group size, a row width that is not
    /// a multiple of 64 included.
    #[test]
    fn kernels_match_the_twins() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let picked = Kernel::picked();
        eprintln!("picked kernel: {picked:?}");
        let kernels: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.available()).collect();
        #[cfg(target_arch = "x86_64")]
        assert!(kernels.contains(&Kernel::Avx2) || !is_x86_feature_detected!("avx2"));
        for bits in [4u32, 8] {
            for group in [32usize, 64, 128] {
                // Rows of whole 128-code steps, with a last span of 64 and/or 32 codes, and
                // more than the 16 groups a scale load covers.
                for cols in [384usize, 32 * 35, 96, 64 * 19, 128 * 17] {
                    if !cols.is_multiple_of(group) {
                        continue;
                    }
                    let fmt = WeightFormat::new(bits, group).unwrap();
                    let rows = 13;
                    let t = random_matrix(&mut rng, fmt, rows, cols);
                    let q = quant(&t);
                    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    let qx = QuantizedX::new(&x);
                    let mut want = vec![0f32; rows];
                    gemv_rows_ref(&q, 0, &x, &mut want);
                    let mut port = vec![0f32; rows];
                    rows_portable(&q, 0, &qx, &mut port);
                    let mut deq = vec![0f32; cols];
                    for (r, (&p, &w)) in port.iter().zip(&want).enumerate() {
                        dequantize_row(&q, r, &mut deq);
                        let mag: f32 = deq.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum();
                        let bound = activation_bound(&q, r, &qx) + cols as f32 * f32::EPSILON * mag;
                        let d = (p - w).abs();
                        assert!(
                            d <= bound,
                            "portable {bits}b g{group} c{cols} row {r}: {d} > {bound}"
                        );
                        // Not vacuous: a small part of the row's magnitude.
                        assert!(
                            bound < 0.03 * mag,
                            "{bits}b g{group} row {r}: {bound} vs {mag}"
                        );
                    }
                    for &k in &kernels {
                        let mut got = vec![0f32; rows - 2];
                        gemv_rows_with(k, &q, 2, &qx, &mut got);
                        for (j, &y) in got.iter().enumerate() {
                            let r = j + 2;
                            let bound = order_bound(&q, r, &qx);
                            let d = (y - port[r]).abs();
                            assert!(
                                d <= bound,
                                "{k:?} {bits}b g{group} c{cols} row {r}: {y} vs {} ({d} > {bound})",
                                port[r]
                            );
                        }
                        if k == picked {
                            let mut p = vec![0f32; rows - 2];
                            gemv_rows(&q, 2, &qx, &mut p);
                            assert_eq!(p, got, "gemv_rows runs the picked kernel");
                        }
                    }
                }
            }
        }
    }

    /// How far a kernel's row may be from the portable twin's (f32 summation order only):
    /// `2 cols eps` times the magnitude of the twin's terms.
    fn order_bound(q: &QuantData<'_>, r: usize, qx: &QuantizedX) -> f32 {
        let (bits, group, cols) = (q.format.bits(), q.format.group(), q.cols);
        let sums = qx.group_sums(group);
        let mut buf = RowBuf::default();
        let (c, s, z) = q.row_into(r, &mut buf);
        let mut terms = 0f32;
        for b in 0..cols / QBLOCK {
            let bd = (b * 32..b * 32 + 32)
                .map(|i| {
                    let code = jetvlm_quant::unpack_code(c, bits, i);
                    let code = if bits == 8 {
                        code as u8 as i8 as f32
                    } else {
                        code as f32
                    };
                    (code * qx.q[i] as f32).abs()
                })
                .sum::<f32>();
            terms += s[b * 32 / group].to_f32().abs() * qx.d[b] * bd;
        }
        for (zi, zv) in z.iter().enumerate() {
            terms += (zv.to_f32() * sums[zi]).abs();
        }
        2.0 * cols as f32 * f32::EPSILON * terms + 1e-6
    }

    /// A banded matrix holds the row-major one's rows exactly (gathered back by `row_into`,
    /// dequantized), and every kernel's product on it is the portable twin's on the
    /// row-major matrix up to f32 summation order (the banded VNNI kernel on whole bands;
    /// rows that are not whole bands, and other kernels, read gathered rows: exactly the
    /// twin). Shapes the layout does not cover are not banded.
    #[test]
    fn banded_matrices_match_the_row_major_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let kernels: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.available()).collect();
        for bits in [4u32, 8] {
            for group in [32usize, 64, 128] {
                for cols in [576usize, 32 * 35, 96, 128 * 17] {
                    if !cols.is_multiple_of(group) {
                        continue;
                    }
                    let fmt = WeightFormat::new(bits, group).unwrap();
                    let rows = 3 * BAND;
                    let t = random_matrix_with(&mut rng, fmt, rows, cols, true);
                    let q = quant(&t);
                    let b = t.banded().expect("whole bands");
                    let qb = quant(&b);
                    assert!(qb.banded && !q.banded);
                    assert_eq!(b.held_bytes(), t.held_bytes());
                    assert!(b.banded().is_none(), "banded twice");
                    let (mut buf, mut d0, mut d1) =
                        (RowBuf::default(), vec![0f32; cols], vec![0f32; cols]);
                    for r in 0..rows {
                        assert_eq!(qb.row_into(r, &mut buf), q.row(r), "row {r}");
                        dequantize_row(&q, r, &mut d0);
                        dequantize_row(&qb, r, &mut d1);
                        assert_eq!(d0, d1, "dequantized row {r}");
                        for c in (0..cols).step_by(7) {
                            assert_eq!(qb.get(r * cols + c), d0[c], "element ({r}, {c})");
                        }
                    }
                    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    let qx = QuantizedX::new(&x);
                    let mut port = vec![0f32; rows];
                    rows_portable(&q, 0, &qx, &mut port);
                    for &k in &kernels {
                        let mut got = vec![0f32; 2 * BAND];
                        gemv_rows_with(k, &qb, BAND, &qx, &mut got);
                        for (j, &y) in got.iter().enumerate() {
                            let r = BAND + j;
                            let (d, bound) = ((y - port[r]).abs(), order_bound(&q, r, &qx));
                            assert!(
                                d <= bound,
                                "{k:?} banded {bits}b g{group} c{cols} row {r}: {y} vs {} ({d} > {bound})",
                                port[r]
                            );
                        }
                        // Not whole bands: the twin on gathered rows, exactly.
                        let mut odd = vec![0f32; 5];
                        gemv_rows_with(k, &qb, 3, &qx, &mut odd);
                        assert_eq!(odd, port[3..8], "{k:?} rows 3..8");
                    }
                }
            }
        }
        let fmt = WeightFormat::new(4, 32).unwrap();
        let t = random_matrix_with(&mut rng, fmt, BAND + 3, 64, false);
        assert!(t.banded().is_none(), "rows not a multiple of 16");
    }

    /// INT8 codes of -128 (possible in a GGUF Q8_0 file, never written by the quantizer)
    /// are read as -128 by every kernel.
    #[test]
    fn int8_code_minus_128_is_read_as_such() {
        let fmt = WeightFormat::new(8, 32).unwrap();
        let cols = 64;
        let codes: Vec<u8> = (0..cols)
            .map(|i| if i % 3 == 0 { 0x80 } else { (i * 7) as u8 })
            .collect();
        let scales = vec![half::f16::from_f32(0.01); 2];
        let t = Tensor::quantized("w", fmt, [1, cols], &codes, &scales, &[]).unwrap();
        let q = quant(&t);
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let qx = QuantizedX::new(&x);
        let mut want = [0f32];
        rows_portable(&q, 0, &qx, &mut want);
        let s = scales[0].to_f32();
        let exact: f32 = (0..cols)
            .map(|i| s * (codes[i] as i8) as f32 * qx.value(i))
            .sum();
        assert!((want[0] - exact).abs() < 1e-4, "{} vs {exact}", want[0]);
        for k in Kernel::ALL.into_iter().filter(|k| k.available()) {
            let mut y = [0f32];
            gemv_rows_with(k, &q, 0, &qx, &mut y);
            assert!(
                (y[0] - want[0]).abs() < 1e-4,
                "{k:?}: {} vs {}",
                y[0],
                want[0]
            );
        }
    }

    /// The row dequantization (picked path and portable) is the reference's, value for
    /// value.
    #[test]
    fn dequantized_rows_equal_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for bits in [4u32, 8] {
            for group in [32usize, 64, 128] {
                let fmt = WeightFormat::new(bits, group).unwrap();
                let (rows, cols) = (5, 384);
                let t = random_matrix(&mut rng, fmt, rows, cols);
                let q = quant(&t);
                for r in 0..rows {
                    let mut deq = vec![0f32; cols];
                    dequantize_row(&q, r, &mut deq);
                    let mut port = vec![0f32; cols];
                    dequantize_row_portable(&q, r, &mut port);
                    assert_eq!(deq, port);
                    let (c, s, z) = q.row(r);
                    let mut refrow = vec![0f32; cols];
                    jetvlm_quant::weight::dequantize_row(fmt, c, s, z, &mut refrow);
                    assert_eq!(deq, refrow);
                    assert_eq!(TensorData::Quant(q).get(r * cols + 37), refrow[37]);
                }
            }
        }
    }

    /// The f32 prefill path (tiles dequantized, then gemm), the integer prefill GEMM and the
    /// fused decode path (both INT8 activations) agree with the reference on a whole
    /// quantized matrix.
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
            crate::kernels::matmul_tiles(t.data(), rows, cols, &x, n, &mut got);
            let mut int = vec![0f32; n * rows];
            crate::kernels::matmul(t.data(), rows, cols, &x, n, &mut int);
            let mut one = vec![0f32; rows];
            crate::kernels::matmul(t.data(), rows, cols, &x[..cols], 1, &mut one);
            let scale: f32 = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * scale, "{bits}b prefill: {a} vs {b}");
            }
            for (a, b) in int.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-2 * scale,
                    "{bits}b integer prefill: {a} vs {b}"
                );
            }
            // Decode quantizes x to INT8 per block of 32: within 1% here.
            let d = crate::kernels::dot(t.data(), 7 * cols, &x[..cols]);
            assert!(
                (d - want[7]).abs() <= 1e-2 * scale,
                "{bits}b dot: {d} vs {}",
                want[7]
            );
            for (a, b) in one.iter().zip(&want[..rows]) {
                assert!((a - b).abs() <= 1e-2 * scale, "{bits}b decode: {a} vs {b}");
            }
        }
    }
}
