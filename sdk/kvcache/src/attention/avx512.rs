//! x86_64 kernels with AVX-512 (F, BW, DQ, VL) and VNNI, selected at run time (see
//! `Kernel::detect`). 32 vector registers hold every accumulator of a head group without
//! spills, and the INT4 paths use the fused integer dot products of VNNI:
//!
//! - **FP16 blocks:** 16 tokens (scores) or 16 channels (values) per `vcvtph2ps` and FMA.
//! - **INT4 keys (per-channel):** `q * scale` is quantized once per block and head to
//!   15-bit integers split into a low and a high signed byte (`q = 256 hi + lo`). 16 key rows
//!   are transposed (3 rounds of `vpermt2d`) so a lane holds one token and a 32-bit lane four
//!   codes of four channels; `vpdpbusd` multiplies them with the broadcast query bytes and
//!   adds into per-token sums, so no horizontal reduction is needed.
//! - **INT4 values (per-token groups of 64):** `w = p * scale` is quantized to int16 per
//!   head and group; one `vpermt2w` interleaves the 16-bit lanes of a token pair, a shift
//!   and mask give `(code[t][c], code[t+1][c])` int16 pairs and `vpdpwssd` with the
//!   broadcast pair `(w[t], w[t+1])` adds both tokens for 16 channels. Sums are kept in the
//!   channel order of the AVX2 value kernel, so both share `avx2::finish`.
//!
//! Other shapes and formats (2/8-bit codes, per-token keys, value groups of 32, head dims
//! that are not multiples of 16 or 64) use the AVX2 kernels.

use super::{Fns, MAX_BLOCK_TOKENS, MAX_GQA, Prep, State, avx2, gidx, sidx};
use crate::layout::{Fp16Layout, QuantLayout};
use crate::policy::KeyMode;
use std::arch::x86_64::*;

/// Largest 15-bit query code: `256 * 127 + 127`, so both bytes of the split fit `i8`.
const QMAX: f32 = 32639.0;

/// Runs `$f::<HC>(h0, args)` over the head group in chunks of at most 4 heads.
macro_rules! head_chunks {
    ($g:expr, $f:ident($($a:expr),*)) => {{
        let g = $g;
        let mut h0 = 0;
        while g - h0 >= 4 {
            $f::<4>(h0, $($a),*);
            h0 += 4;
        }
        match g - h0 {
            1 => $f::<1>(h0, $($a),*),
            2 => $f::<2>(h0, $($a),*),
            3 => $f::<3>(h0, $($a),*),
            _ => {}
        }
    }};
}

pub(crate) fn fns() -> Fns {
    Fns {
        fp16_scores: |p, seg, l, n, s| {
            if fp16_ok(seg, l, p.d, n) {
                // SAFETY: these functions are only handed out after runtime detection of
                // AVX-512 F/BW/DQ/VL/VNNI, AVX2, FMA and F16C (`Kernel::available`);
                // `fp16_ok` bounds every read and `s` holds `MAX_BLOCK_TOKENS` per head.
                unsafe { fp16_scores(p, seg, l, n, s) }
            } else {
                (avx2::fns().fp16_scores)(p, seg, l, n, s)
            }
        },
        fp16_accum: |st, seg, l, n| {
            if fp16_ok(seg, l, st.d, n) {
                // SAFETY: as above.
                unsafe { fp16_accum(st, seg, l, n) }
            } else {
                (avx2::fns().fp16_accum)(st, seg, l, n)
            }
        },
        quant_scores: |p, seg, l, n, s| {
            if l.bits() == 4 && l.key_mode == KeyMode::PerChannel && quant_ok(seg, l, p.d, n) {
                // SAFETY: as above; `quant_ok` bounds every read (whole 16-token tiles of
                // rows inside the block).
                unsafe { q4_scores_pc(p, seg, l, n, s) }
            } else {
                (avx2::fns().quant_scores)(p, seg, l, n, s)
            }
        },
        quant_accum: |st, seg, l, n| {
            if l.bits() == 4 && l.group().is_multiple_of(64) && quant_ok(seg, l, st.d, n) {
                // SAFETY: as above.
                unsafe { q4_accum(st, seg, l, n) }
            } else {
                (avx2::fns().quant_accum)(st, seg, l, n)
            }
        },
        softmax: |st, n| {
            // SAFETY: as above.
            unsafe { softmax(st, n) }
        },
        prefetch: avx2::prefetch,
        finish: avx2::finish,
    }
}

fn fp16_ok(seg: &[u8], l: &Fp16Layout, d: usize, n: usize) -> bool {
    l.head_dim == d
        && d.is_multiple_of(16)
        && l.tokens.is_multiple_of(16)
        && n <= l.tokens
        && seg.len() >= 4 * d * l.tokens
}

fn quant_ok(seg: &[u8], l: &QuantLayout, d: usize, n: usize) -> bool {
    l.head_dim == d
        && d.is_multiple_of(64)
        && l.tokens.is_multiple_of(16)
        && l.tokens <= MAX_BLOCK_TOKENS
        && n <= l.tokens
        && seg.len() >= l.v_row_offset(l.tokens)
}

/// Mask of lanes `t0 + i < n`.
#[inline]
fn mask16(t0: usize, n: usize) -> __mmask16 {
    let r = n - t0;
    if r >= 16 { 0xffff } else { (1u16 << r) - 1 }
}

/// Scores of an FP16 block (keys channel-major): each load converts 16 tokens of one
/// channel, shared by the chunk's heads; 32 tokens per pass.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn fp16_scores(p: &Prep, seg: &[u8], l: &Fp16Layout, n: usize, s: &mut [f32]) {
    let (k, sp) = (seg.as_ptr() as *const u16, s.as_mut_ptr());
    unsafe { head_chunks!(p.g, fp16_scores_heads(p, k, l.tokens, n, sp)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn fp16_scores_heads<const HC: usize>(
    h0: usize,
    p: &Prep,
    k: *const u16,
    tt: usize,
    n: usize,
    sp: *mut f32,
) {
    let d = p.d;
    let q = unsafe { p.q.as_ptr().add(h0 * d) };
    let mut t0 = 0;
    while t0 < n {
        if t0 + 32 <= tt {
            let mut acc = [[_mm512_setzero_ps(); 2]; HC];
            for c in 0..d {
                let base = unsafe { k.add(c * tt + t0) };
                let k0 = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(base as *const __m256i)) };
                let k1 =
                    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(base.add(16) as *const __m256i)) };
                for (h, a) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(unsafe { *q.add(h * d + c) });
                    a[0] = _mm512_fmadd_ps(qb, k0, a[0]);
                    a[1] = _mm512_fmadd_ps(qb, k1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                unsafe {
                    _mm512_storeu_ps(sp.add(sidx(h0 + h, t0)), a[0]);
                    _mm512_storeu_ps(sp.add(sidx(h0 + h, t0 + 16)), a[1]);
                }
            }
            t0 += 32;
        } else {
            let mut acc = [_mm512_setzero_ps(); HC];
            for c in 0..d {
                let kv = unsafe {
                    _mm512_cvtph_ps(_mm256_loadu_si256(k.add(c * tt + t0) as *const __m256i))
                };
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *q.add(h * d + c) }), kv, *a);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                unsafe { _mm512_storeu_ps(sp.add(sidx(h0 + h, t0)), *a) };
            }
            t0 += 16;
        }
    }
}

/// `acc[h][c] += sum_t p[h][t] * v[t][c]` (values token-major): 64 channels per pass.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn fp16_accum(st: &mut State, seg: &[u8], l: &Fp16Layout, n: usize) {
    let d = st.d;
    let v = unsafe { (seg.as_ptr() as *const u16).add(l.tokens * d) };
    let (sp, ap) = (st.s.as_ptr(), st.acc.as_mut_ptr());
    let mut c0 = 0;
    while c0 < d {
        // Tile width in 16-channel vectors.
        let c = if c0 + 64 <= d {
            4
        } else if c0 + 32 <= d {
            2
        } else {
            1
        };
        // SAFETY: channels c0..c0 + 16 c lie inside the row, t < n <= tokens.
        unsafe { head_chunks!(st.g, fp16_accum_heads(c, v, d, c0, n, sp, ap)) };
        c0 += 16 * c;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn fp16_accum_heads<const HC: usize>(
    h0: usize,
    c: usize,
    v: *const u16,
    d: usize,
    c0: usize,
    n: usize,
    sp: *const f32,
    ap: *mut f32,
) {
    unsafe {
        match c {
            4 => fp16_accum_hc::<HC, 4>(h0, v, d, c0, n, sp, ap),
            2 => fp16_accum_hc::<HC, 2>(h0, v, d, c0, n, sp, ap),
            _ => fp16_accum_hc::<HC, 1>(h0, v, d, c0, n, sp, ap),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn fp16_accum_hc<const HC: usize, const C: usize>(
    h0: usize,
    v: *const u16,
    d: usize,
    c0: usize,
    n: usize,
    sp: *const f32,
    ap: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); C]; HC];
    for (h, a) in acc.iter_mut().enumerate() {
        for (j, aj) in a.iter_mut().enumerate() {
            *aj = unsafe { _mm512_loadu_ps(ap.add((h0 + h) * d + c0 + 16 * j)) };
        }
    }
    for t in 0..n {
        let row = unsafe { v.add(t * d + c0) };
        let vv: [__m512; C] = std::array::from_fn(|j| unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * j) as *const __m256i))
        });
        for (h, a) in acc.iter_mut().enumerate() {
            let pb = _mm512_set1_ps(unsafe { *sp.add(sidx(h0 + h, t)) });
            for (aj, x) in a.iter_mut().zip(&vv) {
                *aj = _mm512_fmadd_ps(pb, *x, *aj);
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (j, aj) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(ap.add((h0 + h) * d + c0 + 16 * j), *aj) };
        }
    }
}

/// `exp(x)` for 16 lanes (same range reduction and polynomial as the AVX2 kernel).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let fx = _mm512_cvtepi32_ps(n);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.398_199_9e-3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.333_452e-3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.166_579_6e-2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.666_666_5e-1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(0.5));
    y = _mm512_fmadd_ps(
        y,
        _mm512_mul_ps(x, x),
        _mm512_add_ps(x, _mm512_set1_ps(1.0)),
    );
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)));
    _mm512_mul_ps(y, _mm512_castsi512_ps(e))
}

/// Multiplies `len` floats at `p` by `a` (masked tail).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scale_row(p: *mut f32, len: usize, a: __m512) {
    let mut c = 0;
    while c < len {
        let m = mask16(c, len);
        unsafe {
            let x = _mm512_maskz_loadu_ps(m, p.add(c));
            _mm512_mask_storeu_ps(p.add(c), m, _mm512_mul_ps(a, x));
        }
        c += 16;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn softmax(st: &mut State, n: usize) {
    let d = st.d;
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    for h in 0..st.g {
        let s = unsafe { st.s.as_mut_ptr().add(sidx(h, 0)) };
        let mut mx = neg;
        let mut t0 = 0;
        while t0 < n {
            let x = unsafe { _mm512_maskz_loadu_ps(mask16(t0, n), s.add(t0)) };
            mx = _mm512_mask_max_ps(mx, mask16(t0, n), mx, x);
            t0 += 16;
        }
        let bm = _mm512_reduce_max_ps(mx);
        let m_new = st.m[h].max(bm);
        if m_new > st.m[h] {
            let alpha = (st.m[h] - m_new).exp();
            st.l[h] *= alpha;
            let a = _mm512_set1_ps(alpha);
            unsafe {
                scale_row(st.acc.as_mut_ptr().add(h * d), d, a);
                scale_row(st.qacc.as_mut_ptr().add(h * d), d, a);
                scale_row(st.zacc.as_mut_ptr().add(gidx(h, 0)), super::MAX_GROUPS, a);
            }
            st.m[h] = m_new;
        }
        let mb = _mm512_set1_ps(m_new);
        let mut sum = _mm512_setzero_ps();
        let mut t0 = 0;
        while t0 < n {
            let m = mask16(t0, n);
            let x = unsafe { _mm512_maskz_loadu_ps(m, s.add(t0)) };
            let e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(x, mb)));
            unsafe { _mm512_storeu_ps(s.add(t0), e) };
            sum = _mm512_add_ps(sum, e);
            t0 += 16;
        }
        st.l[h] += _mm512_reduce_add_ps(sum);
    }
}

/// Sixteen `u32` lanes `scale | zero << 16` (FP16 bits) to f32 scales and zeros.
#[inline]
#[target_feature(enable = "avx512f")]
fn split_params16(v: __m512i) -> (__m512, __m512) {
    (
        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)),
        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v))),
    )
}

/// `vpermt2d` indices of the 16 x 8 transpose in [`transpose16x8`]; `idx < 16` picks lane
/// `idx` of the first source, `16 + i` lane `i` of the second.
const fn transpose_indices() -> [[[i32; 16]; 2]; 3] {
    let mut t = [[[0i32; 16]; 2]; 3];
    let mut v = 0;
    while v < 2 {
        let mut l = 0;
        while l < 16 {
            // Round 1: rows 4a..4a+3 (two per source), columns 4v..4v+3.
            let (r, c) = (l / 4, 4 * v + l % 4);
            t[0][v][l] = ((r / 2) * 16 + (r % 2) * 8 + c) as i32;
            // Round 2: rows 8b..8b+7 (four per source), columns 2v, 2v+1 of the four.
            let (r, cc) = (l / 2, 2 * v + l % 2);
            t[1][v][l] = ((r / 4) * 16 + (r % 4) * 4 + cc) as i32;
            // Round 3: rows 0..15 (eight per source), column v of the two.
            t[2][v][l] = ((l / 8) * 16 + (l % 8) * 2 + v) as i32;
            l += 1;
        }
        v += 1;
    }
    t
}
const TRANSPOSE: [[[i32; 16]; 2]; 3] = transpose_indices();

#[inline]
#[target_feature(enable = "avx512f")]
fn idx512(a: &[i32; 16]) -> __m512i {
    // SAFETY: 16 `i32` are exactly one vector.
    unsafe { std::mem::transmute::<[i32; 16], __m512i>(*a) }
}

/// `x[i]` holds rows `2i` (lanes 0..8) and `2i + 1` (lanes 8..16) of a 16 x 8 matrix of
/// 32-bit words; returns its columns (`out[j]` lane `t` = row `t`, word `j`).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16x8(x: &[__m512i; 8]) -> [__m512i; 8] {
    let i1 = [idx512(&TRANSPOSE[0][0]), idx512(&TRANSPOSE[0][1])];
    let i2 = [idx512(&TRANSPOSE[1][0]), idx512(&TRANSPOSE[1][1])];
    let i3 = [idx512(&TRANSPOSE[2][0]), idx512(&TRANSPOSE[2][1])];
    // a[r][v]: rows 4r..4r+3, columns 4v..4v+3.
    let a: [[__m512i; 2]; 4] = std::array::from_fn(|r| {
        std::array::from_fn(|v| _mm512_permutex2var_epi32(x[2 * r], i1[v], x[2 * r + 1]))
    });
    // b[r][v][w]: rows 8r..8r+7, columns 4v + 2w, 4v + 2w + 1.
    let b: [[[__m512i; 2]; 2]; 2] = std::array::from_fn(|r| {
        std::array::from_fn(|v| {
            std::array::from_fn(|w| _mm512_permutex2var_epi32(a[2 * r][v], i2[w], a[2 * r + 1][v]))
        })
    });
    std::array::from_fn(|j| {
        let (v, w, m) = (j / 4, (j / 2) % 2, j % 2);
        _mm512_permutex2var_epi32(b[0][v][w], i3[m], b[1][v][w])
    })
}

/// Scores of an INT4 block with per-channel keys (head dim a multiple of 64), in integers.
///
/// Once per block and head, `q * scale` is quantized to 15-bit integers (step
/// `max|q * scale| / 32639`, a relative error below 2e-5 per product) kept as two signed
/// byte arrays in channel order, `q = 256 hi + lo`; `q . zero` is a constant. Then per
/// 16 tokens, the 32-byte code rows are transposed so lane `t` of word `j` holds bytes
/// `4j..4j+4` of token `t`: their low nibbles are channels `32 (j / 4) + 4 (j % 4) + 0..4`,
/// their high nibbles the same plus 16. `vpdpbusd` adds 4 code-times-byte products per
/// lane (codes <= 15, so the sums stay far below 2^31 for head dims up to 256).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_scores_pc(p: &mut Prep, seg: &[u8], l: &QuantLayout, n: usize, s: &mut [f32]) {
    let (g, d) = (p.g, p.d);
    let base = seg.as_ptr();
    // Query bytes in the (f32) scratch: head h low bytes at 2hd, high bytes at (2h+1)d.
    let qb = p.scratch.as_mut_ptr() as *mut i8;
    let mut step = [0f32; MAX_GQA];
    let mut konst = [0f32; MAX_GQA];
    let inf = _mm512_set1_ps(f32::INFINITY);
    for h in 0..g {
        let q = unsafe { p.q.as_ptr().add(h * d) };
        let mut mx = _mm512_setzero_ps();
        let mut kz = _mm512_setzero_ps();
        let mut bad: __mmask16 = 0;
        let mut c = 0;
        while c < d {
            let (sc, z) =
                split_params16(unsafe { _mm512_loadu_si512(base.add(4 * c) as *const _) });
            let qv = unsafe { _mm512_loadu_ps(q.add(c)) };
            let a = _mm512_abs_ps(_mm512_mul_ps(qv, sc));
            bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
            mx = _mm512_max_ps(mx, a);
            kz = _mm512_fmadd_ps(qv, z, kz);
            c += 16;
        }
        let m = _mm512_reduce_max_ps(mx);
        konst[h] = _mm512_reduce_add_ps(kz);
        if bad != 0 || !konst[h].is_finite() {
            // Non-finite queries or parameters: the f32 kernels propagate them like the
            // reference does.
            return (avx2::fns().quant_scores)(p, seg, l, n, s);
        }
        let (lo_p, hi_p) = unsafe { (qb.add(2 * h * d), qb.add((2 * h + 1) * d)) };
        let inv = _mm512_set1_ps(if m > 0.0 { QMAX / m } else { 0.0 });
        step[h] = m / QMAX;
        let mut c = 0;
        while c < d {
            let (sc, _) =
                split_params16(unsafe { _mm512_loadu_si512(base.add(4 * c) as *const _) });
            let qv = unsafe { _mm512_loadu_ps(q.add(c)) };
            let x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(qv, sc), inv));
            let lo = _mm512_sub_epi32(
                _mm512_and_si512(
                    _mm512_add_epi32(x, _mm512_set1_epi32(128)),
                    _mm512_set1_epi32(255),
                ),
                _mm512_set1_epi32(128),
            );
            let hi = _mm512_srai_epi32::<8>(_mm512_sub_epi32(x, lo));
            unsafe {
                _mm_storeu_si128(lo_p.add(c) as *mut __m128i, _mm512_cvtepi32_epi8(lo));
                _mm_storeu_si128(hi_p.add(c) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
            }
            c += 16;
        }
    }
    let qb = qb as *const i8;
    let sp = s.as_mut_ptr();
    // SAFETY: rows of whole 16-token tiles lie inside the block (`quant_ok`).
    unsafe { head_chunks!(g, q4_scores_heads(d, qb, &step, &konst, base, l, n, sp)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_scores_heads<const HC: usize>(
    h0: usize,
    d: usize,
    qb: *const i8,
    step: &[f32; MAX_GQA],
    konst: &[f32; MAX_GQA],
    base: *const u8,
    l: &QuantLayout,
    n: usize,
    sp: *mut f32,
) {
    let (krow0, kstride) = (l.k_row_offset(0), l.k_row_bytes());
    let m4 = _mm512_set1_epi8(0x0f);
    let qw = |h: usize, hi: usize, dw: usize| -> __m512i {
        _mm512_set1_epi32(unsafe {
            (qb.add((2 * h + hi) * d) as *const i32)
                .add(dw)
                .read_unaligned()
        })
    };
    let mut t0 = 0;
    while t0 < n {
        // Per head: (low query bytes, high query bytes) x (low nibbles, high nibbles).
        let mut acc = [[_mm512_setzero_si512(); 4]; HC];
        for pc in 0..d / 64 {
            let x: [__m512i; 8] = std::array::from_fn(|i| unsafe {
                let r = base.add(krow0 + (t0 + 2 * i) * kstride + 32 * pc);
                if kstride == 32 {
                    _mm512_loadu_si512(r as *const _)
                } else {
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(r as *const __m256i)),
                        _mm256_loadu_si256(r.add(kstride) as *const __m256i),
                    )
                }
            });
            let cols = transpose16x8(&x);
            for (j, col) in cols.iter().enumerate() {
                let lo = _mm512_and_si512(*col, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(*col), m4);
                let dlo = 16 * pc + 8 * (j / 4) + j % 4;
                for (hh, a) in acc.iter_mut().enumerate() {
                    let h = h0 + hh;
                    a[0] = _mm512_dpbusd_epi32(a[0], lo, qw(h, 0, dlo));
                    a[1] = _mm512_dpbusd_epi32(a[1], lo, qw(h, 1, dlo));
                    a[2] = _mm512_dpbusd_epi32(a[2], hi, qw(h, 0, dlo + 4));
                    a[3] = _mm512_dpbusd_epi32(a[3], hi, qw(h, 1, dlo + 4));
                }
            }
        }
        for (hh, a) in acc.iter().enumerate() {
            let h = h0 + hh;
            let tot = _mm512_add_epi32(
                _mm512_slli_epi32::<8>(_mm512_add_epi32(a[1], a[3])),
                _mm512_add_epi32(a[0], a[2]),
            );
            let sv = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(tot),
                _mm512_set1_ps(step[h]),
                _mm512_set1_ps(konst[h]),
            );
            unsafe { _mm512_storeu_ps(sp.add(sidx(h, t0)), sv) };
        }
        t0 += 16;
    }
}

/// `vpermt2w` indices interleaving the 16-bit lanes of two 32-byte code rows into the
/// lane order of the AVX2 value kernel: dword `i < 8` = `unpacklo_epi16` dword `i`, dword
/// `8 + i` = `unpackhi_epi16` dword `i` (row word `8 (e / 4) + 4 j + e % 4`).
const fn pair_indices() -> [i16; 32] {
    let mut t = [0i16; 32];
    let mut i = 0;
    while i < 16 {
        let (j, e) = (i / 8, i % 8);
        let w = 8 * (e / 4) + 4 * j + e % 4;
        t[2 * i] = w as i16;
        t[2 * i + 1] = (32 + w) as i16;
        i += 1;
    }
    t
}
const PAIR: [i16; 32] = pair_indices();

/// Values of an INT4 block (head dim and group multiples of 64), two tokens per
/// `vpdpwssd`.
///
/// Per group, `w = p * scale` is quantized to int16 per head (step `max|w| / 32767`) and
/// `sum p * zero` is added to the zero sums; then per token pair one `vpermt2w` gives the
/// `(code[t][c], code[t+1][c])` int16 lanes of all 64 channels' nibble `k` after a shift and
/// mask, and `vpdpwssd` with the broadcast `(w[t], w[t+1])` adds both tokens (sums stay
/// below 2^26 for 128-token blocks). Accumulators are converted and scaled once per block.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_accum(st: &mut State, seg: &[u8], l: &QuantLayout, n: usize) {
    let (g, d) = (st.g, st.d);
    let (gs, gb) = (l.group(), l.format.group_bytes());
    let base = seg.as_ptr();
    let (vrow0, vstride) = (l.v_row_offset(0), l.v_row_bytes());
    let rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(vstride as i32),
    );
    let inf = _mm512_set1_ps(f32::INFINITY);
    // Pairs cover `n` rounded up to even; weights past `n` are zero.
    let pairs = n.div_ceil(2);
    let tiles = n.div_ceil(16);
    let mut scales = [0f32; MAX_BLOCK_TOKENS];
    let mut step = [0f32; MAX_GQA];
    for gi in 0..l.groups() {
        let mut zs = [_mm512_setzero_ps(); MAX_GQA];
        let mut wmax = [_mm512_setzero_ps(); MAX_GQA];
        let mut bad: __mmask16 = 0;
        for ti in 0..tiles {
            let (t0, m) = (16 * ti, mask16(16 * ti, n));
            // SAFETY (block): rows t0..t0 + 16 lie inside the block; masked lanes load nothing.
            let (sc, z) = unsafe {
                split_params16(_mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    m,
                    rows,
                    base.add(vrow0 + t0 * vstride + gi * gb) as *const _,
                ))
            };
            unsafe { _mm512_storeu_ps(scales.as_mut_ptr().add(t0), sc) };
            for h in 0..g {
                let pv = unsafe { _mm512_maskz_loadu_ps(m, st.s.as_ptr().add(sidx(h, t0))) };
                let w = _mm512_abs_ps(_mm512_mul_ps(pv, sc));
                bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(w, inf);
                wmax[h] = _mm512_max_ps(wmax[h], w);
                zs[h] = _mm512_fmadd_ps(pv, z, zs[h]);
            }
        }
        for h in 0..g {
            st.zacc[gidx(h, gi)] += _mm512_reduce_add_ps(zs[h]);
        }
        if bad != 0 {
            // Non-finite weights: f32 products propagate them like the reference does.
            unsafe {
                q4_accum_group_f32(
                    st,
                    base.add(vrow0 + gi * gb + 4),
                    vstride,
                    gi * gs,
                    gs,
                    n,
                    &scales,
                )
            };
            continue;
        }
        // int16 weights in the (f32) scratch `w`: head h at i16 offset 2 * sidx(h, 0).
        let wq = st.w.as_mut_ptr() as *mut i16;
        for h in 0..g {
            let mx = _mm512_reduce_max_ps(wmax[h]);
            step[h] = mx / 32767.0;
            let inv = _mm512_set1_ps(if mx > 0.0 { 32767.0 / mx } else { 0.0 });
            for ti in 0..tiles {
                let t0 = 16 * ti;
                let pv =
                    unsafe { _mm512_maskz_loadu_ps(mask16(t0, n), st.s.as_ptr().add(sidx(h, t0))) };
                let sc = unsafe { _mm512_loadu_ps(scales.as_ptr().add(t0)) };
                let x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(pv, sc), inv));
                unsafe {
                    _mm256_storeu_si256(
                        wq.add(2 * sidx(h, 0) + t0) as *mut __m256i,
                        _mm512_cvtepi32_epi16(x),
                    )
                };
            }
        }
        let wq = wq as *const i16;
        let qacc = st.qacc.as_mut_ptr();
        for pc in 0..gs / 64 {
            let c0 = gi * gs + 64 * pc;
            let codes = unsafe { base.add(vrow0 + gi * gb + 4 + 32 * pc) };
            // SAFETY: rows 0..2 * pairs <= tokens; 32 bytes of codes per row and piece.
            unsafe {
                head_chunks!(
                    g,
                    q4_accum_heads(d, c0, wq, &step, codes, vstride, pairs, qacc)
                )
            };
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_accum_heads<const HC: usize>(
    h0: usize,
    d: usize,
    c0: usize,
    wq: *const i16,
    step: &[f32; MAX_GQA],
    codes: *const u8,
    vstride: usize,
    pairs: usize,
    qacc: *mut f32,
) {
    // SAFETY: 32 i16 are exactly one vector.
    let idx = unsafe { std::mem::transmute::<[i16; 32], __m512i>(PAIR) };
    let m4 = _mm512_set1_epi16(0x0f);
    let mut acc = [[_mm512_setzero_si512(); 4]; HC];
    for tp in 0..pairs {
        let z = unsafe {
            let r0 = _mm256_loadu_si256(codes.add(2 * tp * vstride) as *const __m256i);
            let r1 = _mm256_loadu_si256(codes.add((2 * tp + 1) * vstride) as *const __m256i);
            _mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx, _mm512_castsi256_si512(r1))
        };
        let nib = [
            _mm512_and_si512(z, m4),
            _mm512_and_si512(_mm512_srli_epi16::<4>(z), m4),
            _mm512_and_si512(_mm512_srli_epi16::<8>(z), m4),
            _mm512_srli_epi16::<12>(z),
        ];
        for (hh, a) in acc.iter_mut().enumerate() {
            let wv = _mm512_set1_epi32(unsafe {
                (wq.add(2 * sidx(h0 + hh, 0) + 2 * tp) as *const i32).read_unaligned()
            });
            for (ak, nk) in a.iter_mut().zip(&nib) {
                *ak = _mm512_dpwssd_epi32(*ak, *nk, wv);
            }
        }
    }
    for (hh, a) in acc.iter().enumerate() {
        let h = h0 + hh;
        let sb = _mm512_set1_ps(step[h]);
        for (k, ak) in a.iter().enumerate() {
            unsafe {
                let p = qacc.add(h * d + c0 + 16 * k);
                _mm512_storeu_ps(
                    p,
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(*ak), sb, _mm512_loadu_ps(p)),
                );
            }
        }
    }
}

/// One value group in f32 (natural channel order into `acc`), for non-finite weights.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_accum_group_f32(
    st: &mut State,
    codes: *const u8,
    vstride: usize,
    c0: usize,
    gs: usize,
    n: usize,
    scales: &[f32; MAX_BLOCK_TOKENS],
) {
    let d = st.d;
    for h in 0..st.g {
        for t in 0..n {
            let w = _mm512_set1_ps(st.s[sidx(h, t)] * scales[t]);
            for ch in 0..gs / 32 {
                unsafe {
                    let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        codes.add(t * vstride + 16 * ch) as *const __m128i
                    ));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(0x0f)));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(x));
                    let p = st.acc.as_mut_ptr().add(h * d + c0 + 32 * ch);
                    _mm512_storeu_ps(p, _mm512_fmadd_ps(w, lo, _mm512_loadu_ps(p)));
                    _mm512_storeu_ps(
                        p.add(16),
                        _mm512_fmadd_ps(w, hi, _mm512_loadu_ps(p.add(16))),
                    );
                }
            }
        }
    }
}
