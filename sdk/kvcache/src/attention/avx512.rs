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

use super::{
    Fns, MAX_BLOCK_TOKENS, MAX_GQA, MAX_GROUPS, MAX_HEAD_DIM, Prep, State, avx2, gidx, sidx,
};
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

/// `head_chunks!` for the key kernel: `$f::<HC, NV>`, stopping at the first `false`.
macro_rules! key_chunks {
    ($g:expr, $nv:literal, $f:ident($($a:expr),*)) => {{
        let g = $g;
        let mut h0 = 0;
        let mut ok = true;
        while ok && g - h0 >= 4 {
            ok = $f::<4, $nv>(h0, $($a),*);
            h0 += 4;
        }
        if ok {
            ok = match g - h0 {
                1 => $f::<1, $nv>(h0, $($a),*),
                2 => $f::<2, $nv>(h0, $($a),*),
                3 => $f::<3, $nv>(h0, $($a),*),
                _ => true,
            };
        }
        ok
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
        finish,
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
                    // SAFETY: `q` holds `g * d` values, `h0 + h < g`, `c < d`.
                    let qh = unsafe { q.add(h * d + c) };
                    a[0] = unsafe { fma_bcst(a[0], k0, qh) };
                    a[1] = unsafe { fma_bcst(a[1], k1, qh) };
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
            // SAFETY: `sp` holds `MAX_BLOCK_TOKENS` probabilities per head, `t < n`.
            let ph = unsafe { sp.add(sidx(h0 + h, t)) };
            for (aj, x) in a.iter_mut().zip(&vv) {
                *aj = unsafe { fma_bcst(*aj, *x, ph) };
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (j, aj) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(ap.add((h0 + h) * d + c0 + 16 * j), *aj) };
        }
    }
}

/// `exp(x)` for 16 lanes: `2^n * p(f)` with `x log2(e) = n + f`, `|f| <= 1/2`, and a
/// degree-5 polynomial for `2^f` (relative error below 3e-6); `vscalefps` applies `2^n`
/// (underflowing to 0 for very negative `x`). NaN propagates.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp512(x: __m512) -> __m512 {
    let t = _mm512_max_ps(
        _mm512_set1_ps(-150.0),
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut y = _mm512_set1_ps(1.333_355_8e-3);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.618_129e-3));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550_411e-2));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.240_226_5));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(std::f32::consts::LN_2));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, n)
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

/// How far (natural log) a block's maximum score may exceed the running maximum before
/// the running state is rescaled: probabilities stay below `e^8`, far from f32 limits,
/// and the rescale (every accumulator of the head) runs only a few times per pass.
const LAZY_MAX: f32 = 8.0;

/// Online softmax with a lazily updated maximum: `p = exp(s - m)` for the running `m`,
/// which only moves (rescaling the state) when a score exceeds it by more than
/// [`LAZY_MAX`]. One pass per head in the common case; sums stay per lane in `State::lv`
/// (folded by [`finish`]).
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn softmax(st: &mut State, n: usize) {
    let d = st.d;
    for h in 0..st.g {
        let s = unsafe { st.s.as_mut_ptr().add(sidx(h, 0)) };
        let lp = unsafe { st.lv.as_mut_ptr().add(16 * h) };
        let mut sum = unsafe { _mm512_loadu_ps(lp) };
        let mb = _mm512_set1_ps(st.m[h]);
        let lim = _mm512_set1_ps(st.m[h] + LAZY_MAX);
        // Pass 1 (common): exponentials against the running maximum, unless a score
        // exceeds it by more than LAZY_MAX (or it is -inf: the first block).
        let mut over: __mmask16 = 0;
        let mut t0 = 0;
        while t0 < n {
            let m = mask16(t0, n);
            let x = unsafe { _mm512_loadu_ps(s.add(t0)) };
            over |= _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(m, x, lim);
            t0 += 16;
        }
        if over != 0 || st.m[h] == f32::NEG_INFINITY {
            let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut t0 = 0;
            while t0 < n {
                let x = unsafe { _mm512_loadu_ps(s.add(t0)) };
                mx = _mm512_mask_max_ps(mx, mask16(t0, n), mx, x);
                t0 += 16;
            }
            let bm = _mm512_reduce_max_ps(mx);
            if st.m[h] > f32::NEG_INFINITY {
                let alpha = (st.m[h] - bm).exp();
                st.l[h] *= alpha;
                let a = _mm512_set1_ps(alpha);
                sum = _mm512_mul_ps(sum, a);
                unsafe {
                    scale_row(st.acc.as_mut_ptr().add(h * d), d, a);
                    scale_row(st.qacc.as_mut_ptr().add(h * d), d, a);
                    scale_row(st.zacc.as_mut_ptr().add(gidx(h, 0)), MAX_GROUPS, a);
                    scale_row(st.zv.as_mut_ptr().add(16 * gidx(h, 0)), 16 * MAX_GROUPS, a);
                }
            }
            if bm > st.m[h] {
                st.m[h] = bm;
            }
        }
        let mb = if st.m[h] == f32::NEG_INFINITY {
            mb
        } else {
            _mm512_set1_ps(st.m[h])
        };
        let mut t0 = 0;
        while t0 < n {
            let x = unsafe { _mm512_loadu_ps(s.add(t0)) };
            let e = _mm512_maskz_mov_ps(mask16(t0, n), exp512(_mm512_sub_ps(x, mb)));
            unsafe { _mm512_storeu_ps(s.add(t0), e) };
            sum = _mm512_add_ps(sum, e);
            t0 += 16;
        }
        unsafe { _mm512_storeu_ps(lp, sum) };
    }
}

/// Folds the per-lane sums (`lv`, `zv`) into `l` and `zacc`, then the AVX2 value order
/// (`qacc`) into `acc`.
fn finish(st: &mut State) {
    for h in 0..st.g {
        st.l[h] += st.lv[16 * h..][..16].iter().sum::<f32>();
        for gi in 0..MAX_GROUPS {
            st.zacc[gidx(h, gi)] += st.zv[16 * gidx(h, gi)..][..16].iter().sum::<f32>();
        }
    }
    avx2::finish(st);
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
    let (base, sp) = (seg.as_ptr(), s.as_mut_ptr());
    let pr: &Prep = p;
    // SAFETY: rows of whole 16-token tiles lie inside the block (`quant_ok`).
    let ok = unsafe {
        match d {
            64 => key_chunks!(g, 4, q4_scores_heads(pr, base, l, n, sp)),
            128 => key_chunks!(g, 8, q4_scores_heads(pr, base, l, n, sp)),
            _ => key_chunks!(g, 16, q4_scores_heads(pr, base, l, n, sp)),
        }
    };
    if !ok {
        // Non-finite queries or parameters: the f32 kernels propagate them like the
        // reference does.
        (avx2::fns().quant_scores)(p, seg, l, n, s)
    }
}

/// Scores of heads `h0..h0 + HC` (`NV`: 16-channel vectors per head when the head dim is
/// 64 or 128, else 16 and the head dim decides). Returns false, writing nothing useful,
/// when queries or parameters are not finite.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_scores_heads<const HC: usize, const NV: usize>(
    h0: usize,
    p: &Prep,
    base: *const u8,
    l: &QuantLayout,
    n: usize,
    sp: *mut f32,
) -> bool {
    let d = p.d;
    let nv = if NV < 16 { NV } else { d / 16 };
    // The block's channel scales and zeros (`q * scale` is folded, `q . zero` is constant).
    let mut sc = [_mm512_setzero_ps(); NV];
    let mut zc = [_mm512_setzero_ps(); NV];
    for c in 0..nv {
        (sc[c], zc[c]) =
            split_params16(unsafe { _mm512_loadu_si512(base.add(64 * c) as *const _) });
    }
    // Query bytes per head: [low bytes, high bytes] as 32-bit words of 4 channels.
    // Uninitialised (zeroing it costs more than the rest of the setup): words 0..d / 4 of
    // every row are written below before any read; rows are `MAX_HEAD_DIM / 4` words.
    let mut qw_buf = std::mem::MaybeUninit::<[[[i32; MAX_HEAD_DIM / 4]; 2]; HC]>::uninit();
    let qw = qw_buf.as_mut_ptr() as *mut i32;
    let row = |hh: usize, half: usize| unsafe { qw.add((2 * hh + half) * (MAX_HEAD_DIM / 4)) };
    let mut step = [_mm512_setzero_ps(); HC];
    let mut konst = [_mm512_setzero_ps(); HC];
    let inf = _mm512_set1_ps(f32::INFINITY);
    for hh in 0..HC {
        let q = unsafe { p.q.as_ptr().add((h0 + hh) * d) };
        let mut qs = [_mm512_setzero_ps(); NV];
        let mut mx = _mm512_setzero_ps();
        let mut kz = _mm512_setzero_ps();
        let mut bad: __mmask16 = 0;
        for c in 0..nv {
            let qv = unsafe { _mm512_loadu_ps(q.add(16 * c)) };
            qs[c] = _mm512_mul_ps(qv, sc[c]);
            let a = _mm512_abs_ps(qs[c]);
            bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
            mx = _mm512_max_ps(mx, a);
            kz = _mm512_fmadd_ps(qv, zc[c], kz);
        }
        let m = _mm512_reduce_max_ps(mx);
        let k = _mm512_reduce_add_ps(kz);
        if bad != 0 || !k.is_finite() {
            return false;
        }
        konst[hh] = _mm512_set1_ps(k);
        step[hh] = _mm512_set1_ps(m / QMAX);
        let inv = _mm512_set1_ps(if m > 0.0 { QMAX / m } else { 0.0 });
        let (lo_p, hi_p) = (row(hh, 0), row(hh, 1));
        for (c, qc) in qs.iter().enumerate().take(nv) {
            // x = 256 hi + lo with lo the sign-extended low byte (what the truncating
            // `vpmovdb` below keeps) and hi = (x + 128) >> 8.
            let x = _mm512_cvtps_epi32(_mm512_mul_ps(*qc, inv));
            let hi = _mm512_srai_epi32::<8>(_mm512_add_epi32(x, _mm512_set1_epi32(128)));
            unsafe {
                _mm_storeu_si128(lo_p.add(4 * c) as *mut __m128i, _mm512_cvtepi32_epi8(x));
                _mm_storeu_si128(hi_p.add(4 * c) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
            }
        }
    }
    let (krow0, kstride) = (l.k_row_offset(0), l.k_row_bytes());
    let m4 = _mm512_set1_epi8(0x0f);
    let mut t0 = 0;
    while t0 < n {
        // Per head: (low query bytes, high query bytes) x (low nibbles, high nibbles).
        let mut acc = [[_mm512_setzero_si512(); 4]; HC];
        for pc in 0..nv / 4 {
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
                    // SAFETY: dlo + 4 < d / 4 (words written by the setup above).
                    unsafe {
                        let (wl, wh) = (row(hh, 0).add(dlo), row(hh, 1).add(dlo));
                        a[0] = dpbusd_bcst(a[0], lo, wl);
                        a[1] = dpbusd_bcst(a[1], lo, wh);
                        a[2] = dpbusd_bcst(a[2], hi, wl.add(4));
                        a[3] = dpbusd_bcst(a[3], hi, wh.add(4));
                    }
                }
            }
        }
        for (hh, a) in acc.iter().enumerate() {
            let tot = _mm512_add_epi32(
                _mm512_slli_epi32::<8>(_mm512_add_epi32(a[1], a[3])),
                _mm512_add_epi32(a[0], a[2]),
            );
            let sv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot), step[hh], konst[hh]);
            unsafe { _mm512_storeu_ps(sp.add(sidx(h0 + hh, t0)), sv) };
        }
        t0 += 16;
    }
    true
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
    // int16 weights in the (f32) scratch `w`: head h at i16 offset 2 * sidx(h, 0).
    let wq = st.w.as_mut_ptr() as *mut i16;
    for gi in 0..l.groups() {
        // The group's scales and zeros of every row, once for all heads (lanes past `n`
        // are zero).
        let mut sc = [_mm512_setzero_ps(); MAX_BLOCK_TOKENS / 16];
        let mut zc = [_mm512_setzero_ps(); MAX_BLOCK_TOKENS / 16];
        for ti in 0..tiles {
            let t0 = 16 * ti;
            // SAFETY: rows t0..t0 + 16 lie inside the block; masked lanes load nothing.
            (sc[ti], zc[ti]) = unsafe {
                split_params16(_mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    mask16(t0, n),
                    rows,
                    base.add(vrow0 + t0 * vstride + gi * gb) as *const _,
                ))
            };
            unsafe { _mm512_storeu_ps(scales.as_mut_ptr().add(t0), sc[ti]) };
        }
        let mut bad: __mmask16 = 0;
        for h in 0..g {
            let ps = unsafe { st.s.as_ptr().add(sidx(h, 0)) };
            let zp = unsafe { st.zv.as_mut_ptr().add(16 * gidx(h, gi)) };
            let mut zs = unsafe { _mm512_loadu_ps(zp) };
            let mut w = [_mm512_setzero_ps(); MAX_BLOCK_TOKENS / 16];
            let mut wm = _mm512_setzero_ps();
            for ti in 0..tiles {
                // Probabilities past `n` are zero (softmax masks the last tile).
                let pv = unsafe { _mm512_loadu_ps(ps.add(16 * ti)) };
                w[ti] = _mm512_mul_ps(pv, sc[ti]);
                let a = _mm512_abs_ps(w[ti]);
                bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
                wm = _mm512_max_ps(wm, a);
                zs = _mm512_fmadd_ps(pv, zc[ti], zs);
            }
            unsafe { _mm512_storeu_ps(zp, zs) };
            let mx = _mm512_reduce_max_ps(wm);
            step[h] = mx / 32767.0;
            let inv = _mm512_set1_ps(if mx > 0.0 { 32767.0 / mx } else { 0.0 });
            for (ti, wt) in w.iter().enumerate().take(tiles) {
                let x = _mm512_cvtps_epi32(_mm512_mul_ps(*wt, inv));
                unsafe {
                    _mm256_storeu_si256(
                        wq.add(2 * sidx(h, 0) + 16 * ti) as *mut __m256i,
                        _mm512_cvtepi32_epi16(x),
                    )
                };
            }
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
                *ak = dpwssd(*ak, *nk, wv);
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

/// `acc + sum of int16 pair products` per 32-bit lane (`vpdpwssd`). Written as assembly
/// because the compiler otherwise splits some of them into `vpmaddwd` + `vpaddd`, twice
/// the instructions on the hottest loop.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut r = acc;
    // SAFETY: register-only instruction of a feature this function requires.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {r}, {a}, {b}",
            r = inout(zmm_reg) r,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    r
}

/// `acc + x * *p`, `*p` broadcast by the FMA itself (an embedded-broadcast memory
/// operand). LLVM keeps a value that several FMAs multiply in a register, loaded by a
/// separate `vbroadcastss`, and on Zen 4 those broadcasts compete with the FMAs: the
/// FP16 score loop ran at 17 cycles per token and head with them and 12 (its FMA count)
/// with the broadcasts folded.
///
/// # Safety
/// AVX-512F; `p` readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fma_bcst(acc: __m512, x: __m512, p: *const f32) -> __m512 {
    let mut a = acc;
    // SAFETY: reads the one f32 at `p` (the caller's contract); no other effect.
    unsafe {
        std::arch::asm!(
            "vfmadd231ps {a}, {x}, dword ptr [{p}]{{1to16}}",
            a = inout(zmm_reg) a,
            x = in(zmm_reg) x,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    a
}

/// `acc + sum of 4 unsigned-times-signed byte products` per 32-bit lane (`vpdpbusd`) with
/// the 4 signed bytes at `p` broadcast to every lane. Assembly, so the broadcast stays a
/// 4-byte memory operand: the compiler otherwise hoists every broadcast vector of a block
/// out of the token loop and reloads them as full 64-byte vectors, which is slower.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_bcst(acc: __m512i, a: __m512i, p: *const i32) -> __m512i {
    let mut r = acc;
    // SAFETY: the caller guarantees 4 readable bytes at `p`.
    unsafe {
        std::arch::asm!(
            "vpdpbusd {r}, {a}, dword ptr [{p}]{{1to16}}",
            r = inout(zmm_reg) r,
            a = in(zmm_reg) a,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags)
        );
    }
    r
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
