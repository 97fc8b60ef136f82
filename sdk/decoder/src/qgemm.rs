//! Prefill products of weight-only quantized matrices ([`QuantData`]) without dequantizing
//! to f32: `Y[n, rows] = X[n, cols] W^T`, every token's row of `X` quantized to INT8 in
//! blocks of 32 ([`QuantizedX`], the decode kernels' activations), then integer dot products
//! of those blocks with the INT4/INT8 code blocks of `W`. A row of a token is the decode
//! kernels' sum, `sum_g s_g * sum_(b in g) d_b * (codes_b . xq_b) + z_g * sum_g(x)`: exact
//! integer block dot products, f32 scaling, so the error bound is the decode kernels' one.
//!
//! The rows of `W` are split into tiles of `L * R` rows, one rayon task each (`L` 32-bit
//! lanes per vector: 16 for AVX-512, 8 for AVX2, 4 for NEON; `R = 2` vectors). A task
//! repacks its tile once ([`Tile`]): 4 consecutive code bytes of the `L` rows side by side in
//! one vector, so that one instruction multiplies 4 codes of `L` rows with the same 4 bytes
//! of `x` broadcast, and every lane ends a block holding its row's whole block dot product
//! (no horizontal sums). The task then runs all tokens through the tile 2 at a time: each
//! vector of codes loaded serves 2 tokens and each broadcast of `x` serves `L * R` rows
//! (4 tokens at a time measured slower with AVX-512, its accumulators spilled; AVX2 has
//! half the registers).
//!
//! Per ISA (picked at run time with the decode kernels' [`Kernel`]):
//! - AVX-512 VNNI: `vpdpbusd` (unsigned codes times signed `x`); INT8 codes are biased by
//!   128 when repacked (`w + 128`, unsigned) and `128 * sum(xq_b)` taken off each block;
//! - AVX2: `vpmaddubsw` pairs; INT4's 8 products per lane of a block summed in i16 (at most
//!   `8 * 2 * 15 * 127 < 2^15`), INT8 codes as magnitudes with their signs moved onto `x`;
//! - NEON with the dot-product extension: `sdot` by element, 4 bytes of `x` picked from a
//!   register per instruction (Cortex-A78AE and later);
//! - portable: the decode kernels' portable rows, token by token (the twin of the others).
//!
//! The SIMD kernels differ from the twin in f32 summation order only (each block's integer
//! dot product is exact in all of them).

use crate::qkernels::{Kernel, QBLOCK, QuantizedX};
use crate::weights::{BAND, QuantData, RowBuf};
use rayon::prelude::*;

/// Vectors of rows per tile.
const R: usize = 2;

/// Tokens per register tile.
const T: usize = 2;

/// The activations of `n` tokens quantized for the integer products: each token's row
/// exactly as [`QuantizedX::new`] quantizes it (INT8 values, block scales `d`, f32 group
/// sums in its summation order; tested equal), stored contiguously for all tokens and
/// computed without its per-token buffers (prefill quantizes every token of every product).
struct Acts {
    cols: usize,
    blocks: usize,
    groups: usize,
    /// `[n, cols]`.
    q: Vec<i8>,
    /// `[n, blocks]`.
    d: Vec<f32>,
    /// Sums of `x` per group of the weight, `[n, groups]`.
    sums: Vec<f32>,
    /// INT8 weights on VNNI only: each block's sum of INT8 values, `[n, blocks]` (the bias
    /// of the kernel's unsigned codes is taken off with it).
    qsum: Vec<i32>,
}

impl Acts {
    /// `x` (`[n, cols]`, `cols` a multiple of `group`, a multiple of 32) quantized, tokens in
    /// parallel.
    fn new(x: &[f32], cols: usize, group: usize, qsum: bool) -> Self {
        let n = x.len() / cols;
        let (blocks, groups) = (cols / QBLOCK, cols / group);
        let mut a = Acts {
            cols,
            blocks,
            groups,
            q: vec![0; n * cols],
            d: vec![0.0; n * blocks],
            sums: vec![0.0; n * groups],
            qsum: Vec::new(),
        };
        x.par_chunks_exact(cols)
            .zip(a.q.par_chunks_exact_mut(cols))
            .zip(a.d.par_chunks_exact_mut(blocks))
            .zip(a.sums.par_chunks_exact_mut(groups))
            .for_each(|(((x, q), d), s)| quantize_token(x, q, d, s, group));
        if qsum {
            a.qsum =
                a.q.chunks_exact(QBLOCK)
                    .map(|b| b.iter().map(|&v| v as i32).sum())
                    .collect();
        }
        a
    }

    /// Pointers to token `t`'s INT8 values, block scales, group sums and block sums.
    fn token(&self, t: usize) -> Token {
        Token {
            xq: self.q[t * self.cols..].as_ptr(),
            d: self.d[t * self.blocks..].as_ptr(),
            sums: self.sums[t * self.groups..].as_ptr(),
            qsum: if self.qsum.is_empty() {
                std::ptr::null()
            } else {
                self.qsum[t * self.blocks..].as_ptr()
            },
        }
    }
}

/// One token quantized as [`QuantizedX::new`] does it (for finite `x`): per block of 32,
/// `d = max |x| / 127` and `q = round_even(x * 127 / max |x|)`; the f32 sum of each block
/// taken value by value in order (8 blocks side by side, so the additions do not wait on
/// each other), groups of 64 and 128 as sums of pairs of those. Written so that it
/// vectorizes: `max |x|` as the largest of the magnitudes' bit patterns (the same order for
/// finite values), the rounding read from the bits of `v + 1.5 * 2^23` (its low mantissa
/// bits hold `round_even(v) + 2^22`) instead of a saturating cast.
pub(crate) fn quantize_token(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    sums: &mut [f32],
    group: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if quantize_avx512::available() {
        // SAFETY: the CPU has AVX-512 F/BW (checked).
        unsafe { quantize_avx512::blocks(x, q, d) };
    } else {
        quantize_blocks(x, q, d);
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_blocks(x, q, d);
    block_sums(x, sums, group);
}

/// The rounding constant of [`quantize_blocks`]: `v + 1.5 * 2^23` holds `round_even(v)`
/// in its low mantissa bits (for `|v| <= 2^22`).
const MAGIC: f32 = 12_582_912.0;
/// The bits of [`MAGIC`].
const MAGIC_BITS: i32 = 0x4b40_0000;

/// The INT8 values and scales of [`quantize_token`] (whole blocks of `x`), the portable
/// definition.
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((xs, qs), db) in x
        .chunks_exact(QBLOCK)
        .zip(q.chunks_exact_mut(QBLOCK))
        .zip(d.iter_mut())
    {
        let amax = f32::from_bits(
            xs.iter()
                .map(|v| v.to_bits() & 0x7fff_ffff)
                .fold(0u32, u32::max),
        );
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 127.0 / amax } else { 0.0 };
        for (o, &v) in qs.iter_mut().zip(xs) {
            *o = ((v * inv + MAGIC).to_bits() as i32 - MAGIC_BITS) as i8;
        }
        *db = scale;
    }
}

/// The f32 group sums of [`quantize_token`].
fn block_sums(x: &[f32], sums: &mut [f32], group: usize) {
    let bpg = group / QBLOCK;
    let mut gs = sums.iter_mut();
    for xc in x.chunks(8 * QBLOCK) {
        let nb = xc.len() / QBLOCK;
        let mut s = [-0f32; 8];
        if nb == 8 {
            for i in 0..QBLOCK {
                for (k, sk) in s.iter_mut().enumerate() {
                    *sk += xc[k * QBLOCK + i];
                }
            }
        } else {
            for (sk, b) in s.iter_mut().zip(xc.chunks_exact(QBLOCK)) {
                *sk = b.iter().sum();
            }
        }
        for k in (0..nb).step_by(bpg) {
            let v = match bpg {
                1 => s[k],
                2 => s[k] + s[k + 1],
                _ => (s[k] + s[k + 1]) + (s[k + 2] + s[k + 3]),
            };
            if let Some(g) = gs.next() {
                *g = v;
            }
        }
    }
}

/// [`quantize_blocks`] with AVX-512: the same operations lane by lane (the magnitudes'
/// largest bit pattern, `v * inv + MAGIC` as a product then a sum, the low byte of its bits
/// less [`MAGIC_BITS`]), so the values and scales are bit for bit the portable ones
/// (tested).
#[cfg(target_arch = "x86_64")]
mod quantize_avx512 {
    use super::{MAGIC, MAGIC_BITS, QBLOCK};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// # Safety
    /// Requires AVX-512 F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let (magic, bits) = (_mm512_set1_ps(MAGIC), _mm512_set1_epi32(MAGIC_BITS));
        for ((xs, qs), db) in x
            .chunks_exact(QBLOCK)
            .zip(q.chunks_exact_mut(QBLOCK))
            .zip(d.iter_mut())
        {
            // SAFETY: each chunk holds QBLOCK = 32 values (two vectors) and 32 bytes.
            unsafe {
                let v0 = _mm512_loadu_ps(xs.as_ptr());
                let v1 = _mm512_loadu_ps(xs.as_ptr().add(16));
                let m = _mm512_max_epu32(
                    _mm512_and_si512(_mm512_castps_si512(v0), abs),
                    _mm512_and_si512(_mm512_castps_si512(v1), abs),
                );
                let amax = f32::from_bits(_mm512_reduce_max_epu32(m));
                let scale = amax / 127.0;
                let inv = _mm512_set1_ps(if scale > 0.0 { 127.0 / amax } else { 0.0 });
                let r0 = _mm512_sub_epi32(
                    _mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(v0, inv), magic)),
                    bits,
                );
                let r1 = _mm512_sub_epi32(
                    _mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(v1, inv), magic)),
                    bits,
                );
                let qp = qs.as_mut_ptr() as *mut __m128i;
                _mm_storeu_si128(qp, _mm512_cvtepi32_epi8(r0));
                _mm_storeu_si128(qp.add(1), _mm512_cvtepi32_epi8(r1));
                *db = scale;
            }
        }
    }
}

/// One token's activations as the kernels read them (`cols` values, `cols / 32` blocks,
/// `cols / group` groups; `qsum` null unless the weight is INT8 on VNNI).
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct Token {
    xq: *const i8,
    d: *const f32,
    sums: *const f32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qsum: *const i32,
}

/// Code bytes per 4-byte step of a block; steps per block.
const STEPS: usize = QBLOCK / 4;

// SAFETY: a Token only reads the `Acts` it was made from, which outlives the parallel
// region that shares it.
unsafe impl Send for Token {}
unsafe impl Sync for Token {}

/// A tile of `L * R` rows repacked for the SIMD kernels.
#[derive(Default)]
struct Tile {
    /// Codes one byte each (INT4 unpacked from its nibbles, 0..=15; INT8 XORed with the
    /// kernel's `flip`): for each block, each vector of rows and each 4-byte step of the
    /// block, codes `4 step..4 step + 4` of each of the vector's `L` rows, at
    /// `((block * R + vector) * STEPS + step) * L + lane`.
    codes: Vec<u32>,
    /// Scales `[groups, L * R]`.
    scales: Vec<f32>,
    /// Zeros (INT4) `[groups, L * R]`.
    zeros: Vec<f32>,
    /// One row's codes unpacked (scratch).
    row: Vec<u8>,
    /// One row of a banded matrix gathered (scratch).
    buf: RowBuf,
}

impl Tile {
    /// Sizes the tile for `q` (`L` lanes) and fills its scales and zeros from rows
    /// `r0..r0 + m` (`m <= L * R`; the rest zero).
    fn params<const L: usize>(&mut self, q: &QuantData<'_>, r0: usize, m: usize) {
        let rt = L * R;
        let groups = q.format.groups_per_row(q.cols);
        self.codes.clear();
        self.codes.resize(q.cols / QBLOCK * R * STEPS * L, 0);
        self.scales.clear();
        self.scales.resize(groups * rt, 0.0);
        self.zeros.clear();
        self.zeros.resize(groups * rt, 0.0);
        if q.banded && r0.is_multiple_of(BAND) && m.is_multiple_of(BAND) {
            // A band's parameters are already 16 rows side by side per group.
            let widen = |dst: &mut [f32], src: &[half::f16]| {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
            };
            for (v, band) in (r0 / BAND..(r0 + m) / BAND).enumerate() {
                let base = band * BAND * groups;
                for gi in 0..groups {
                    let src = base + gi * BAND..base + (gi + 1) * BAND;
                    let dst = gi * rt + v * BAND..gi * rt + (v + 1) * BAND;
                    widen(&mut self.scales[dst.clone()], &q.scales[src.clone()]);
                    if !q.zeros.is_empty() {
                        widen(&mut self.zeros[dst], &q.zeros[src]);
                    }
                }
            }
            return;
        }
        for i in 0..m {
            let (_, scales, zeros) = q.row_into(r0 + i, &mut self.buf);
            for (gi, s) in scales.iter().enumerate() {
                self.scales[gi * rt + i] = s.to_f32();
            }
            for (gi, z) in zeros.iter().enumerate() {
                self.zeros[gi * rt + i] = z.to_f32();
            }
        }
    }

    /// Rows `r0..r0 + m` of `q` (`m <= L * R`; the rest of the tile zero), INT8 codes
    /// XORed with `flip` (each byte).
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    fn repack<const L: usize>(&mut self, q: &QuantData<'_>, r0: usize, m: usize, flip: u8) {
        self.params::<L>(q, r0, m);
        self.row.resize(q.cols, 0);
        for i in 0..m {
            let codes = q.row_into(r0 + i, &mut self.buf).0;
            if q.format.bits() == 8 {
                for (o, &c) in self.row.iter_mut().zip(codes) {
                    *o = c ^ flip;
                }
            } else {
                // A 32-code chunk is 16 bytes: byte k holds code k (low nibble) and code
                // k + 16 (high).
                for (o, c) in self
                    .row
                    .chunks_exact_mut(QBLOCK)
                    .zip(codes.chunks_exact(16))
                {
                    let (lo, hi) = o.split_at_mut(16);
                    for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(c) {
                        *l = b & 0x0f;
                        *h = b >> 4;
                    }
                }
            }
            let (v, l) = (i / L, i % L);
            for (blk, dst) in self
                .row
                .chunks_exact(QBLOCK)
                .zip(self.codes.chunks_exact_mut(R * STEPS * L))
            {
                let dst = &mut dst[v * STEPS * L..(v + 1) * STEPS * L];
                for (j, c) in blk.chunks_exact(4).enumerate() {
                    dst[j * L + l] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }
}

/// Output pointer shared by the tasks.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y[n, rows] = x[n, cols] W^T` for a quantized `W` (`rows = q.rows()`, `cols = q.cols`),
/// with the fastest kernel this CPU runs.
pub(crate) fn matmul(q: &QuantData<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_with(Kernel::picked(), q, x, n, y);
}

/// [`matmul`] with a given kernel (the portable one when this CPU lacks it).
pub(crate) fn matmul_with(kernel: Kernel, q: &QuantData<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols, g) = (q.rows(), q.cols, q.format.group());
    assert!(
        cols.is_multiple_of(g)
            && g.is_multiple_of(QBLOCK)
            && x.len() == n * cols
            && y.len() == n * rows,
        "quantized matmul bounds"
    );
    if n == 0 || rows == 0 {
        return;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Vnni if kernel.available() => {
            let acts = Acts::new(x, cols, g, q.format.bits() == 8);
            tiles::<32>(
                q,
                &acts,
                n,
                y,
                // SAFETY: the CPU has the instructions (checked); r0 + m <= rows (r0 a
                // multiple of 32, m of 16 when banded: whole bands).
                |tile, r0, m| unsafe {
                    if q.banded {
                        vnni::repack_banded(tile, q, r0, m)
                    } else {
                        vnni::repack(tile, q, r0, m)
                    }
                },
                // SAFETY: the tile was repacked from `q` for 16 lanes and the tokens'
                // activations from `cols` values.
                |tile, toks, out| unsafe { vnni::tile(tile, q, toks, out) },
            );
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if kernel.available() => {
            let acts = Acts::new(x, cols, g, false);
            tiles::<16>(
                q,
                &acts,
                n,
                y,
                |tile, r0, m| tile.repack::<8>(q, r0, m, 0),
                // SAFETY: as above, 8 lanes.
                |tile, toks, out| unsafe { avx2::tile(tile, q, toks, out) },
            );
        }
        #[cfg(target_arch = "aarch64")]
        Kernel::NeonDot if kernel.available() => {
            let acts = Acts::new(x, cols, g, false);
            tiles::<8>(
                q,
                &acts,
                n,
                y,
                |tile, r0, m| tile.repack::<4>(q, r0, m, 0),
                // SAFETY: as above, 4 lanes.
                |tile, toks, out| unsafe { neon::tile(tile, q, toks, out) },
            );
        }
        _ => portable(q, x, y),
    }
}

/// The twin: each token through the decode kernels' portable rows, row chunks in parallel.
fn portable(q: &QuantData<'_>, x: &[f32], y: &mut [f32]) {
    let (rows, cols) = (q.rows(), q.cols);
    let qx: Vec<QuantizedX> = x.par_chunks_exact(cols).map(QuantizedX::new).collect();
    y.par_chunks_exact_mut(rows)
        .zip(qx.par_iter())
        .for_each(|(yt, qt)| {
            crate::qkernels::gemv_rows_with(Kernel::Portable, q, 0, qt, yt);
        });
}

/// Runs every tile of `L * R = RT` rows as a task: `repack(tile, r0, m)`, then the tokens
/// [`T`] at a time through `kernel(tile, tokens, out)`, which writes `out[t][..RT]` for each
/// of its `tokens.len()` (1..=T) tokens.
fn tiles<const RT: usize>(
    q: &QuantData<'_>,
    acts: &Acts,
    n: usize,
    y: &mut [f32],
    repack: impl Fn(&mut Tile, usize, usize) + Sync,
    kernel: impl Fn(&Tile, &[Token], &mut [[f32; RT]; T]) + Sync,
) {
    let rows = q.rows();
    let toks: Vec<Token> = (0..n).map(|t| acts.token(t)).collect();
    let dst = SendPtr(y.as_mut_ptr());
    let dst = &dst;
    (0..rows.div_ceil(RT))
        .into_par_iter()
        .for_each_init(Tile::default, |tile, ti| {
            let r0 = ti * RT;
            let m = (rows - r0).min(RT);
            repack(tile, r0, m);
            prefetch_rows(q, r0 + RT, RT);
            let mut out = [[0f32; RT]; T];
            for (c, tk) in toks.chunks(T).enumerate() {
                let t0 = c * T;
                kernel(tile, tk, &mut out);
                for (k, o) in out[..tk.len()].iter().enumerate() {
                    // SAFETY: row t0 + k < n of the [n, rows] output, columns r0..r0 + m
                    // < rows; this task alone writes columns r0..r0 + m.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            o.as_ptr(),
                            dst.0.add((t0 + k) * rows + r0),
                            m,
                        );
                    }
                }
            }
        });
}

/// Asks for the codes of rows `r0..r0 + m` (the next tile; clipped to the matrix) to be
/// brought into L2 while this tile's tokens run: repacking reads the weights once per
/// product, from DRAM when the model is larger than the last-level cache.
#[inline]
fn prefetch_rows(q: &QuantData<'_>, r0: usize, m: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let rb = q.format.code_bytes_per_row(q.cols);
        let len = q.codes.len();
        let (a, b) = ((r0 * rb).min(len), ((r0 + m) * rb).min(len));
        for line in q.codes[a..b].chunks(64) {
            // SAFETY: a prefetch of an address inside `q.codes`; it reads nothing.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    line.as_ptr() as *const i8
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, r0, m);
}

/// AVX-512 VNNI tiles: 16 rows per vector, two vectors.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{QBLOCK, R, STEPS, T, Tile, Token};
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX-512F/BW/VL and VNNI; `tile` repacked from `q` for 16 lanes (INT8 codes
    /// biased by 128), each token's activations quantized from `q.cols` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn tile(tile: &Tile, q: &QuantData<'_>, toks: &[Token], out: &mut [[f32; 32]; T]) {
        // SAFETY: the caller's contract.
        unsafe {
            match (toks.len(), q.format.bits() == 8) {
                (2, false) => run::<2, false>(tile, q, toks, out),
                (_, false) => run::<1, false>(tile, q, toks, out),
                (2, true) => run::<2, true>(tile, q, toks, out),
                (_, true) => run::<1, true>(tile, q, toks, out),
            }
        }
    }

    /// `out[c]` = dword `c` of each of the 16 vectors `r` (a 16 x 16 transpose of 32-bit
    /// elements: 32 in-lane unpacks, 32 lane shuffles).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &[__m512i; 16]) -> [__m512i; 16] {
        // t: pairs of rows interleaved; u[4 k + i]: in each 128-bit lane j, dword 4 j + i of
        // rows 4 k..4 k + 4.
        let t: [__m512i; 16] = std::array::from_fn(|k| {
            let (a, b) = (r[2 * (k / 2)], r[2 * (k / 2) + 1]);
            if k % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        let u: [__m512i; 16] = std::array::from_fn(|k| {
            let (q, i) = (k / 4, k % 4);
            let (a, b) = (t[4 * q + i / 2], t[4 * q + i / 2 + 2]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        let mut out = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x88>(u[i], u[4 + i]);
            let v1 = _mm512_shuffle_i32x4::<0xdd>(u[i], u[4 + i]);
            let v2 = _mm512_shuffle_i32x4::<0x88>(u[8 + i], u[12 + i]);
            let v3 = _mm512_shuffle_i32x4::<0xdd>(u[8 + i], u[12 + i]);
            out[i] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
            out[8 + i] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
            out[4 + i] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
            out[12 + i] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
        }
        out
    }

    /// [`Tile::repack`] for 16 lanes with INT8 codes XORed with 0x80, by transposes in
    /// registers: 64 bytes of each of 16 rows (2 INT8 blocks, 4 INT4 blocks) in, 16 vectors
    /// of 4 bytes per row out (INT4: each split into its low and high nibbles).
    ///
    /// # Safety
    /// Requires AVX-512F/BW; `r0 + m <= q.rows()`, `0 < m <= 32`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn repack(tile: &mut Tile, q: &QuantData<'_>, r0: usize, m: usize) {
        tile.params::<16>(q, r0, m);
        let rb = q.format.code_bytes_per_row(q.cols);
        let blocks = q.cols / QBLOCK;
        let int8 = q.format.bits() == 8;
        // Blocks per 64 bytes of a row.
        let per = if int8 { 2 } else { 4 };
        let dst = tile.codes.as_mut_ptr() as *mut __m512i;
        let flip = _mm512_set1_epi8(0x80u8 as i8);
        let m4 = _mm512_set1_epi8(0x0f);
        for v in 0..R {
            // Rows past m read row m - 1 again (their outputs are not written).
            let rows: [*const u8; 16] =
                std::array::from_fn(|l| q.codes[(r0 + (v * 16 + l).min(m - 1)) * rb..].as_ptr());
            let mut b0 = 0;
            while b0 < blocks {
                let nb = (blocks - b0).min(per);
                let bytes = nb * rb / blocks;
                let mask = if bytes == 64 {
                    !0
                } else {
                    (1u16 << (bytes / 4)) - 1
                };
                // SAFETY: each row has rb bytes from its pointer; bytes b0 * rb / blocks +
                // `bytes` <= rb (masked lanes are not read); dst holds blocks * R * STEPS
                // vectors and block b0 + nb - 1 < blocks.
                unsafe {
                    let off = b0 * rb / blocks;
                    let r: [__m512i; 16] = std::array::from_fn(|l| {
                        _mm512_maskz_loadu_epi32(mask, rows[l].add(off) as *const i32)
                    });
                    let c = transpose16(&r);
                    if int8 {
                        for (k, &cv) in c[..nb * STEPS].iter().enumerate() {
                            let (b, j) = (b0 + k / STEPS, k % STEPS);
                            _mm512_storeu_si512(
                                dst.add((b * R + v) * STEPS + j),
                                _mm512_xor_si512(cv, flip),
                            );
                        }
                    } else {
                        for (k, &cv) in c[..nb * STEPS / 2].iter().enumerate() {
                            let (b, j) = (b0 + k / (STEPS / 2), k % (STEPS / 2));
                            let d = dst.add((b * R + v) * STEPS);
                            _mm512_storeu_si512(d.add(j), _mm512_and_si512(cv, m4));
                            _mm512_storeu_si512(
                                d.add(j + STEPS / 2),
                                _mm512_and_si512(_mm512_srli_epi16::<4>(cv), m4),
                            );
                        }
                    }
                }
                b0 += nb;
            }
        }
    }

    /// [`repack`] of a banded matrix ([`QuantData::banded`]): a band's vectors are already
    /// 4 bytes of each of its 16 rows, and its INT8 codes already offset to unsigned, so
    /// the tile's vectors are copied (INT4: split into low and high nibbles).
    ///
    /// # Safety
    /// Requires AVX-512F/BW; `q.banded`, `r0` a multiple of 16, `r0 + m <= q.rows()`,
    /// `0 < m <= 32`, `m` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn repack_banded(tile: &mut Tile, q: &QuantData<'_>, r0: usize, m: usize) {
        tile.params::<16>(q, r0, m);
        let rb = q.format.code_bytes_per_row(q.cols);
        let blocks = q.cols / QBLOCK;
        let int8 = q.format.bits() == 8;
        let dst = tile.codes.as_mut_ptr() as *mut __m512i;
        let m4 = _mm512_set1_epi8(0x0f);
        // Vectors of the tile past m stay zero (params); their outputs are not written.
        for v in 0..m.div_ceil(16).min(R) {
            // SAFETY: band (r0 + 16 v) / 16 lies inside `q.codes` (r0 + 16 v < r0 + m <=
            // rows), `blocks * rb / blocks * 16` bytes; dst holds blocks * R * STEPS vectors.
            unsafe {
                let src = q.codes.as_ptr().add((r0 + 16 * v) * rb) as *const __m512i;
                for b in 0..blocks {
                    let d = dst.add((b * R + v) * STEPS);
                    if int8 {
                        for j in 0..STEPS {
                            _mm512_storeu_si512(
                                d.add(j),
                                _mm512_loadu_si512(src.add(b * STEPS + j)),
                            );
                        }
                    } else {
                        for j in 0..STEPS / 2 {
                            let cv = _mm512_loadu_si512(src.add(b * STEPS / 2 + j));
                            _mm512_storeu_si512(d.add(j), _mm512_and_si512(cv, m4));
                            _mm512_storeu_si512(
                                d.add(j + STEPS / 2),
                                _mm512_and_si512(_mm512_srli_epi16::<4>(cv), m4),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Broadcast of the 4 bytes at `p`.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        // SAFETY: the caller's pointer has 4 readable bytes.
        unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
    }

    /// # Safety
    /// As [`tile`], `toks.len() >= N`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn run<const N: usize, const INT8: bool>(
        tile: &Tile,
        q: &QuantData<'_>,
        toks: &[Token],
        out: &mut [[f32; 32]; T],
    ) {
        let blocks = q.cols / QBLOCK;
        let bpg = q.format.group() / QBLOCK;
        let tk: [Token; N] = std::array::from_fn(|k| toks[k]);
        let cp = tile.codes.as_ptr() as *const __m512i;
        let (sp, zp) = (tile.scales.as_ptr(), tile.zeros.as_ptr());
        let mut total = [[_mm512_setzero_ps(); R]; N];
        // SAFETY: block b's vectors lie at cp[(b * R + v) * STEPS + j] (codes hold blocks *
        // R * STEPS vectors of 16 u32), scales and zeros at [g * 32 + 16 v] (groups * 32),
        // tokens' x at [b * 32 + 4 j .. + 4] < cols, d and qsum at [b], sums at [g].
        unsafe {
            for b in 0..blocks {
                let gi = b / bpg;
                let mut acc = [[_mm512_setzero_si512(); R]; N];
                if INT8 {
                    for (a, t) in acc.iter_mut().zip(&tk) {
                        let c = _mm512_set1_epi32(-128 * *t.qsum.add(b));
                        *a = [c; R];
                    }
                }
                let base = cp.add(b * R * STEPS);
                for j in 0..STEPS {
                    let w: [__m512i; R] =
                        std::array::from_fn(|v| _mm512_loadu_si512(base.add(v * STEPS + j)));
                    for (a, t) in acc.iter_mut().zip(&tk) {
                        let xb = bcast4(t.xq.add(b * QBLOCK + 4 * j));
                        for v in 0..R {
                            a[v] = _mm512_dpbusd_epi32(a[v], w[v], xb);
                        }
                    }
                }
                let s: [__m512; R] =
                    std::array::from_fn(|v| _mm512_loadu_ps(sp.add(gi * 32 + v * 16)));
                for ((tot, a), t) in total.iter_mut().zip(&acc).zip(&tk) {
                    let d = _mm512_set1_ps(*t.d.add(b));
                    for v in 0..R {
                        tot[v] = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(a[v]),
                            _mm512_mul_ps(s[v], d),
                            tot[v],
                        );
                    }
                }
            }
            if !INT8 {
                for gi in 0..blocks / bpg {
                    let z: [__m512; R] =
                        std::array::from_fn(|v| _mm512_loadu_ps(zp.add(gi * 32 + v * 16)));
                    for (tot, t) in total.iter_mut().zip(&tk) {
                        let sm = _mm512_set1_ps(*t.sums.add(gi));
                        for v in 0..R {
                            tot[v] = _mm512_fmadd_ps(z[v], sm, tot[v]);
                        }
                    }
                }
            }
            for (o, tot) in out.iter_mut().zip(&total) {
                for v in 0..R {
                    _mm512_storeu_ps(o.as_mut_ptr().add(v * 16), tot[v]);
                }
            }
        }
    }
}

/// AVX2 tiles: 8 rows per vector, two vectors.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QBLOCK, R, STEPS, T, Tile, Token};
    use crate::weights::QuantData;
    use std::arch::x86_64::*;

    /// # Safety
    /// Requires AVX2 and FMA; `tile` repacked from `q` for 8 lanes (codes as stored), each
    /// token's activations quantized from `q.cols` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(tile: &Tile, q: &QuantData<'_>, toks: &[Token], out: &mut [[f32; 16]; T]) {
        // SAFETY: the caller's contract.
        unsafe {
            match (toks.len(), q.format.bits() == 8) {
                (2, false) => run::<2, false>(tile, q, toks, out),
                (_, false) => run::<1, false>(tile, q, toks, out),
                (2, true) => run::<2, true>(tile, q, toks, out),
                (_, true) => run::<1, true>(tile, q, toks, out),
            }
        }
    }

    /// Broadcast of the 4 bytes at `p`.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        // SAFETY: the caller's pointer has 4 readable bytes.
        unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
    }

    /// # Safety
    /// As [`tile`], `toks.len() >= N`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const N: usize, const INT8: bool>(
        tile: &Tile,
        q: &QuantData<'_>,
        toks: &[Token],
        out: &mut [[f32; 16]; T],
    ) {
        let blocks = q.cols / QBLOCK;
        let bpg = q.format.group() / QBLOCK;
        let tk: [Token; N] = std::array::from_fn(|k| toks[k]);
        let cp = tile.codes.as_ptr() as *const __m256i;
        let (sp, zp) = (tile.scales.as_ptr(), tile.zeros.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let mut total = [[_mm256_setzero_ps(); R]; N];
        // SAFETY: as the VNNI kernel's, with 8 lanes (16 rows per tile).
        unsafe {
            for b in 0..blocks {
                let gi = b / bpg;
                let base = cp.add(b * R * STEPS);
                let mut acc = [[_mm256_setzero_si256(); R]; N];
                if INT8 {
                    // |w| <= 128 and |x| <= 127: a pair is at most 32512, no saturation;
                    // each pair widened to i32 at once.
                    for j in 0..STEPS {
                        let w: [__m256i; R] =
                            std::array::from_fn(|v| _mm256_loadu_si256(base.add(v * STEPS + j)));
                        let aw: [__m256i; R] = std::array::from_fn(|v| _mm256_abs_epi8(w[v]));
                        for (a, t) in acc.iter_mut().zip(&tk) {
                            let xb = bcast4(t.xq.add(b * QBLOCK + 4 * j));
                            for v in 0..R {
                                let p = _mm256_maddubs_epi16(aw[v], _mm256_sign_epi8(xb, w[v]));
                                a[v] = _mm256_add_epi32(a[v], _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                } else {
                    // Codes 0..=15: each i16 lane sums 8 pairs of a block, at most
                    // 8 * 2 * 15 * 127 = 30480 < 2^15.
                    let mut a16 = [[_mm256_setzero_si256(); R]; N];
                    for j in 0..STEPS {
                        let w: [__m256i; R] =
                            std::array::from_fn(|v| _mm256_loadu_si256(base.add(v * STEPS + j)));
                        for (a, t) in a16.iter_mut().zip(&tk) {
                            let xb = bcast4(t.xq.add(b * QBLOCK + 4 * j));
                            for v in 0..R {
                                a[v] = _mm256_add_epi16(a[v], _mm256_maddubs_epi16(w[v], xb));
                            }
                        }
                    }
                    for (a, a16) in acc.iter_mut().zip(&a16) {
                        for v in 0..R {
                            a[v] = _mm256_madd_epi16(a16[v], ones);
                        }
                    }
                }
                let s: [__m256; R] =
                    std::array::from_fn(|v| _mm256_loadu_ps(sp.add(gi * 16 + v * 8)));
                for ((tot, a), t) in total.iter_mut().zip(&acc).zip(&tk) {
                    let d = _mm256_set1_ps(*t.d.add(b));
                    for v in 0..R {
                        tot[v] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(a[v]),
                            _mm256_mul_ps(s[v], d),
                            tot[v],
                        );
                    }
                }
            }
            if !INT8 {
                for gi in 0..blocks / bpg {
                    let z: [__m256; R] =
                        std::array::from_fn(|v| _mm256_loadu_ps(zp.add(gi * 16 + v * 8)));
                    for (tot, t) in total.iter_mut().zip(&tk) {
                        let sm = _mm256_set1_ps(*t.sums.add(gi));
                        for v in 0..R {
                            tot[v] = _mm256_fmadd_ps(z[v], sm, tot[v]);
                        }
                    }
                }
            }
            for (o, tot) in out.iter_mut().zip(&total) {
                for v in 0..R {
                    _mm256_storeu_ps(o.as_mut_ptr().add(v * 8), tot[v]);
                }
            }
        }
    }
}

/// NEON tiles with the dot-product extension: 4 rows per vector, two vectors; `sdot` by
/// element picks each token's 4 bytes of `x` from the 32-byte block held in two registers.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{QBLOCK, R, STEPS, T, Tile, Token};
    use crate::weights::QuantData;
    use std::arch::aarch64::*;

    /// # Safety
    /// Requires the dotprod extension; `tile` repacked from `q` for 4 lanes (codes as
    /// stored), each token's activations quantized from `q.cols` values.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn tile(tile: &Tile, q: &QuantData<'_>, toks: &[Token], out: &mut [[f32; 8]; T]) {
        // SAFETY: the caller's contract.
        unsafe {
            match (toks.len(), q.format.bits() == 8) {
                (2, false) => run::<2, false>(tile, q, toks, out),
                (_, false) => run::<1, false>(tile, q, toks, out),
                (2, true) => run::<2, true>(tile, q, toks, out),
                (_, true) => run::<1, true>(tile, q, toks, out),
            }
        }
    }

    /// `acc + w . x.4b[I]`: each 4-byte group of `w` times the 4 bytes of lane `I` of `x`
    /// (`sdot` by element; the intrinsic is not stable Rust yet).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn sdot_lane<const I: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only instruction of the dotprod extension, enabled here.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{i}]",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                i = const I,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    /// [`sdot_lane`] with the lane a (constant-folded) argument.
    #[inline(always)]
    fn sdot_at(acc: int32x4_t, w: int8x16_t, x: int8x16_t, lane: usize) -> int32x4_t {
        // SAFETY: the callers run with the dotprod extension (their target features).
        unsafe {
            match lane {
                0 => sdot_lane::<0>(acc, w, x),
                1 => sdot_lane::<1>(acc, w, x),
                2 => sdot_lane::<2>(acc, w, x),
                _ => sdot_lane::<3>(acc, w, x),
            }
        }
    }

    /// # Safety
    /// As [`tile`], `toks.len() >= N`.
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn run<const N: usize, const INT8: bool>(
        tile: &Tile,
        q: &QuantData<'_>,
        toks: &[Token],
        out: &mut [[f32; 8]; T],
    ) {
        let blocks = q.cols / QBLOCK;
        let bpg = q.format.group() / QBLOCK;
        let tk: [Token; N] = std::array::from_fn(|k| toks[k]);
        let cp = tile.codes.as_ptr() as *const i8;
        let (sp, zp) = (tile.scales.as_ptr(), tile.zeros.as_ptr());
        let mut total = [[vdupq_n_f32(0.0); R]; N];
        // SAFETY: as the VNNI kernel's, with 4 lanes (8 rows per tile, 16 bytes per vector).
        unsafe {
            for b in 0..blocks {
                let gi = b / bpg;
                let base = cp.add(b * R * STEPS * 16);
                let x: [[int8x16_t; 2]; N] = std::array::from_fn(|k| {
                    let p = tk[k].xq.add(b * QBLOCK);
                    [vld1q_s8(p), vld1q_s8(p.add(16))]
                });
                let mut acc = [[vdupq_n_s32(0); R]; N];
                for j in 0..STEPS {
                    let w: [int8x16_t; R] =
                        std::array::from_fn(|v| vld1q_s8(base.add((v * STEPS + j) * 16)));
                    for (a, xt) in acc.iter_mut().zip(&x) {
                        for v in 0..R {
                            a[v] = sdot_at(a[v], w[v], xt[j / 4], j % 4);
                        }
                    }
                }
                let s: [float32x4_t; R] =
                    std::array::from_fn(|v| vld1q_f32(sp.add(gi * 8 + v * 4)));
                for ((tot, a), t) in total.iter_mut().zip(&acc).zip(&tk) {
                    let d = *t.d.add(b);
                    for v in 0..R {
                        tot[v] = vfmaq_f32(tot[v], vcvtq_f32_s32(a[v]), vmulq_n_f32(s[v], d));
                    }
                }
            }
            if !INT8 {
                for gi in 0..blocks / bpg {
                    let z: [float32x4_t; R] =
                        std::array::from_fn(|v| vld1q_f32(zp.add(gi * 8 + v * 4)));
                    for (tot, t) in total.iter_mut().zip(&tk) {
                        let sm = *t.sums.add(gi);
                        for v in 0..R {
                            tot[v] = vfmaq_n_f32(tot[v], z[v], sm);
                        }
                    }
                }
            }
            for (o, tot) in out.iter_mut().zip(&total) {
                for v in 0..R {
                    vst1q_f32(o.as_mut_ptr().add(v * 4), tot[v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Tensor, TensorData};
    use jetvlm_quant::WeightFormat;
    use rand::{Rng, SeedableRng};

    /// A random `[rows, cols]` matrix quantized by the reference; INT8 with every 7th code
    /// -128 (a GGUF Q8_0 file may hold it; the quantizer never writes it).
    fn random_matrix(rng: &mut impl Rng, fmt: WeightFormat, rows: usize, cols: usize) -> Tensor {
        crate::qkernels::tests::random_matrix_with(rng, fmt, rows, cols, true)
    }

    /// The AVX-512 quantizer writes the portable one's values and scales bit for bit,
    /// including zero, signed-zero, subnormal, huge, infinite and NaN blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_quantizer_matches_the_portable_bits() {
        if !quantize_avx512::available() {
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for blocks in [1usize, 2, 7, 18, 48] {
            let mut x: Vec<f32> = (0..blocks * QBLOCK)
                .map(|_| (rnd() % 20001) as f32 / 1000.0 - 10.0)
                .collect();
            let specials = [0.0, -0.0, 1e-40, -3e38, f32::INFINITY, f32::NAN];
            for (b, v) in specials.iter().enumerate().take(blocks) {
                let i = b * QBLOCK + (rnd() as usize % QBLOCK);
                x[i] = *v;
                if *v == 0.0 {
                    x[b * QBLOCK..(b + 1) * QBLOCK].fill(*v);
                }
            }
            let (mut q1, mut d1) = (vec![0i8; x.len()], vec![0f32; blocks]);
            let (mut q2, mut d2) = (vec![0i8; x.len()], vec![0f32; blocks]);
            quantize_blocks(&x, &mut q1, &mut d1);
            // SAFETY: the CPU has AVX-512 F/BW (checked above).
            unsafe { quantize_avx512::blocks(&x, &mut q2, &mut d2) };
            assert_eq!(q1, q2, "{blocks} blocks: values");
            let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&d1), bits(&d2), "{blocks} blocks: scales");
        }
    }

    fn quant(t: &Tensor) -> QuantData<'_> {
        match t.data() {
            TensorData::Quant(q) => q,
            _ => unreachable!(),
        }
    }

    /// Code `i` of row `r` as the integer the kernels multiply.
    fn code(q: &QuantData<'_>, r: usize, i: usize) -> f32 {
        let c = jetvlm_quant::unpack_code(q.row(r).0, q.format.bits(), i);
        if q.format.bits() == 8 {
            c as u8 as i8 as f32
        } else {
            c as f32
        }
    }

    /// For row `r` and one token: the activation bound (each code meets an `x` off by at
    /// most `d_b / 2`: `sum_i |s| d_b / 2 |code_i|`) and the magnitude of the twin's terms
    /// (`sum_b |s| d_b sum_i |code_i xq_i| + sum_g |z_g sum_g|`), which bounds the f32
    /// summation-order differences between kernels.
    fn bounds(q: &QuantData<'_>, r: usize, qx: &QuantizedX) -> (f32, f32) {
        let g = q.format.group();
        let (_, s, z) = q.row(r);
        let (xq, d) = (qx.codes(), qx.block_scales());
        let (mut act, mut terms) = (0f32, 0f32);
        for i in 0..q.cols {
            let c = code(q, r, i).abs() * s[i / g].to_f32().abs() * d[i / QBLOCK];
            act += 0.5 * (1.0 + 1e-5) * c;
            terms += c * (xq[i] as f32).abs();
        }
        for (zv, sm) in z.iter().zip(qx.group_sums(g)) {
            terms += (zv.to_f32() * sm).abs();
        }
        (act, terms)
    }

    /// The prefill activations are [`QuantizedX::new`]'s, value for value: INT8 values,
    /// block scales and group sums (a zero block, an outlier, a row of 7 blocks so the
    /// sums' 8-block batches end partly filled, a negative zero).
    #[test]
    fn kernels_qgemm_activations_equal_the_decode_activations() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for cols in [32usize * 7, 32 * 20, 128] {
            let n = 3;
            let mut x: Vec<f32> = (0..n * cols)
                .map(|_| rng.random_range(-3.0f32..2.0))
                .collect();
            x[32..64].fill(0.0);
            x[33] = -0.0;
            x[70] = 55.0;
            for group in [32usize, 64, 128] {
                if !cols.is_multiple_of(group) {
                    continue;
                }
                let a = Acts::new(&x, cols, group, true);
                for (t, xt) in x.chunks(cols).enumerate() {
                    let qx = QuantizedX::new(xt);
                    let tk = a.token(t);
                    let nb = cols / QBLOCK;
                    // SAFETY: token t's rows hold cols values, nb blocks, cols / group groups.
                    let (q, d, s, qs) = unsafe {
                        (
                            std::slice::from_raw_parts(tk.xq, cols),
                            std::slice::from_raw_parts(tk.d, nb),
                            std::slice::from_raw_parts(tk.sums, cols / group),
                            std::slice::from_raw_parts(tk.qsum, nb),
                        )
                    };
                    assert_eq!(q, qx.codes(), "c{cols} g{group} token {t}");
                    assert_eq!(d, qx.block_scales(), "c{cols} g{group} token {t}");
                    let want = qx.group_sums(group);
                    assert_eq!(s, want, "c{cols} g{group} token {t}");
                    for (b, &v) in qs.iter().enumerate() {
                        let sum: i32 = q[b * 32..b * 32 + 32].iter().map(|&c| c as i32).sum();
                        assert_eq!(v, sum);
                    }
                }
            }
        }
    }

    /// The AVX-512 repack (transposes in registers) gives the portable repack's tile, for
    /// INT4 and INT8, whole and partial tiles, block counts that leave a partial 64 bytes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_qgemm_vnni_repack_equals_the_portable_repack() {
        if !Kernel::Vnni.available() {
            eprintln!("skipped: no AVX-512 VNNI");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for bits in [4u32, 8] {
            for cols in [32usize * 7, 32 * 8, 32 * 5, 32] {
                let fmt = WeightFormat::new(bits, 32).unwrap();
                let t = random_matrix(&mut rng, fmt, 45, cols);
                let q = quant(&t);
                for (r0, m) in [(0usize, 32usize), (32, 13)] {
                    let (mut a, mut b) = (Tile::default(), Tile::default());
                    a.repack::<16>(&q, r0, m, 0x80);
                    // SAFETY: Vnni::available() checked above; r0 + m <= 45.
                    unsafe { vnni::repack(&mut b, &q, r0, m) };
                    assert_eq!(a.scales, b.scales);
                    assert_eq!(a.zeros, b.zeros);
                    // Lanes past m hold row m - 1 in the AVX-512 tile, zeros in the other.
                    for (k, (x, y)) in a.codes.iter().zip(&b.codes).enumerate() {
                        let lane = (k % 16) + 16 * ((k / (16 * STEPS)) % R);
                        if lane < m {
                            assert_eq!(x, y, "{bits}b c{cols} r0 {r0} word {k}");
                        }
                    }
                }
            }
        }
    }

    /// A banded matrix (the CPU decoder's layout under VNNI) repacks into the row-major
    /// matrix's tile exactly (whole and half tiles), and its product is the row-major
    /// matrix's, bit for bit (same tiles, same kernel), on every kernel this CPU runs.
    #[test]
    fn kernels_qgemm_banded_matrices_equal_the_row_major_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for bits in [4u32, 8] {
            for (group, cols) in [(32usize, 32usize * 7), (64, 576), (128, 128 * 3)] {
                let fmt = WeightFormat::new(bits, group).unwrap();
                let t = random_matrix(&mut rng, fmt, 48, cols);
                let b = t.banded().expect("whole bands");
                let (q, qb) = (quant(&t), quant(&b));
                #[cfg(target_arch = "x86_64")]
                if Kernel::Vnni.available() {
                    for (r0, m) in [(0usize, 32usize), (32, 16)] {
                        let (mut a, mut c) = (Tile::default(), Tile::default());
                        // SAFETY: VNNI checked; r0 + m <= 48, whole bands.
                        unsafe {
                            vnni::repack(&mut a, &q, r0, m);
                            vnni::repack_banded(&mut c, &qb, r0, m);
                        }
                        assert_eq!(a.scales, c.scales);
                        assert_eq!(a.zeros, c.zeros);
                        for (k, (x, y)) in a.codes.iter().zip(&c.codes).enumerate() {
                            let lane = (k % 16) + 16 * ((k / (16 * STEPS)) % R);
                            if lane < m {
                                assert_eq!(x, y, "{bits}b g{group} r0 {r0} word {k}");
                            }
                        }
                    }
                }
                let n = 5;
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect();
                for k in Kernel::ALL.into_iter().filter(|k| k.available()) {
                    let (mut y0, mut y1) = (vec![0f32; n * 48], vec![0f32; n * 48]);
                    matmul_with(k, &q, &x, n, &mut y0);
                    matmul_with(k, &qb, &x, n, &mut y1);
                    assert_eq!(y0, y1, "{k:?} {bits}b g{group}");
                }
            }
        }
    }

    /// Every kernel this CPU runs against the portable twin (the same exact integer block
    /// dot products, f32 summation order aside: within `2 cols eps` of the terms'
    /// magnitude), and the twin against `matmul_ref` (f64 products of the reference's
    /// dequantized rows) within the activation bound, which is checked to be a small part
    /// of each product's magnitude; INT4 and INT8 at every group size, row counts that
    /// leave partial tiles for every vector width, token counts that leave partial groups
    /// of 4, and `kernels::matmul` running the picked kernel.
    #[test]
    fn kernels_qgemm_match_the_twin_and_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let picked = Kernel::picked();
        eprintln!("picked kernel: {picked:?}");
        let kernels: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.available()).collect();
        #[cfg(target_arch = "x86_64")]
        assert!(kernels.contains(&Kernel::Avx2) || !is_x86_feature_detected!("avx2"));
        for bits in [4u32, 8] {
            for group in [32usize, 64, 128] {
                for (rows, cols, n) in [(37usize, 384usize, 9usize), (64, 32 * 35, 6), (5, 128, 2)]
                {
                    if !cols.is_multiple_of(group) {
                        continue;
                    }
                    let fmt = WeightFormat::new(bits, group).unwrap();
                    let t = random_matrix(&mut rng, fmt, rows, cols);
                    let q = quant(&t);
                    let mut x: Vec<f32> = (0..n * cols)
                        .map(|_| rng.random_range(-2.0f32..2.0))
                        .collect();
                    x[5] = 9.0; // an outlier: its block's steps are larger
                    let mut want = vec![0f32; n * rows];
                    crate::kernels::matmul_ref(t.data(), rows, cols, &x, n, &mut want);
                    let mut port = vec![0f32; n * rows];
                    matmul_with(Kernel::Portable, &q, &x, n, &mut port);
                    let qx: Vec<QuantizedX> = x.chunks(cols).map(QuantizedX::new).collect();
                    let mut deq = vec![0f32; cols];
                    let mut terms = vec![0f32; n * rows];
                    for r in 0..rows {
                        TensorData::Quant(q).to_f32_into(r * cols, &mut deq);
                        for (tk, qt) in qx.iter().enumerate() {
                            let xt = &x[tk * cols..(tk + 1) * cols];
                            let mag: f32 = deq.iter().zip(xt).map(|(w, v)| (w * v).abs()).sum();
                            let (act, tm) = bounds(&q, r, qt);
                            terms[tk * rows + r] = tm;
                            let bound = act + cols as f32 * f32::EPSILON * mag;
                            let (p, w) = (port[tk * rows + r], want[tk * rows + r]);
                            assert!(
                                (p - w).abs() <= bound,
                                "portable {bits}b g{group} {rows}x{cols} token {tk} row {r}: \
                                 {p} vs {w} (> {bound})"
                            );
                            assert!(bound < 0.03 * mag, "{bits}b g{group}: {bound} vs {mag}");
                        }
                    }
                    for &k in &kernels {
                        let mut got = vec![f32::NAN; n * rows];
                        matmul_with(k, &q, &x, n, &mut got);
                        for (i, ((&g, &p), &tm)) in got.iter().zip(&port).zip(&terms).enumerate() {
                            let bound = 2.0 * cols as f32 * f32::EPSILON * tm + 1e-6;
                            assert!(
                                (g - p).abs() <= bound,
                                "{k:?} {bits}b g{group} {rows}x{cols} token {} row {}: {g} vs \
                                 {p} (> {bound})",
                                i / rows,
                                i % rows
                            );
                        }
                        if k == picked {
                            let mut p = vec![0f32; n * rows];
                            crate::kernels::matmul(t.data(), rows, cols, &x, n, &mut p);
                            assert_eq!(p, got, "kernels::matmul runs the picked kernel");
                        }
                    }
                }
            }
        }
    }

    /// The largest integer sums: INT4 codes all 15 and INT8 codes all -128 or 127 against
    /// `x` at +-127 in every position (AVX2 sums INT4's products of a block in i16, VNNI
    /// biases INT8 codes by 128): every kernel gives the twin's values.
    #[test]
    fn kernels_qgemm_hold_the_largest_sums() {
        let kernels: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.available()).collect();
        let (rows, cols, n) = (40usize, 256usize, 5usize);
        for (bits, byte) in [(4u32, 0xffu8), (8, 0x80), (8, 0x7f)] {
            let fmt = WeightFormat::new(bits, 64).unwrap();
            let codes = vec![byte; rows * fmt.code_bytes_per_row(cols)];
            let groups = rows * fmt.groups_per_row(cols);
            let scales = vec![half::f16::from_f32(0.01); groups];
            let zeros = if bits == 4 {
                vec![half::f16::from_f32(-0.07); groups]
            } else {
                Vec::new()
            };
            let t = Tensor::quantized("w", fmt, [rows, cols], &codes, &scales, &zeros).unwrap();
            let q = quant(&t);
            // Tokens of all +1, all -1, and alternating blocks of each.
            let x: Vec<f32> = (0..n * cols)
                .map(|i| match (i / cols) % 3 {
                    0 => 1.0,
                    1 => -1.0,
                    _ => (((i / 32) % 2) as f32) * 2.0 - 1.0,
                })
                .collect();
            let mut want = vec![0f32; n * rows];
            crate::kernels::matmul_ref(t.data(), rows, cols, &x, n, &mut want);
            for k in [Kernel::Portable]
                .into_iter()
                .chain(kernels.iter().copied())
            {
                let mut got = vec![f32::NAN; n * rows];
                matmul_with(k, &q, &x, n, &mut got);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    // x is exact in INT8 here: only f32 rounding remains.
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{k:?} {bits}b code byte {byte:#x} token {} row {}: {g} vs {w}",
                        i / rows,
                        i % rows
                    );
                }
            }
        }
    }
}
