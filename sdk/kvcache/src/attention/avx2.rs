//! x86_64 kernels: AVX2 + FMA + F16C, selected at run time (see `Kernel::detect`).
//!
//! FP16 keys are channel-major inside a block, so a score pass converts eight tokens of
//! one channel per instruction and never reduces horizontally. 4-bit codes (16 bytes hold
//! 32 codes of a 32-code chunk: low nibbles then high nibbles) widen with one mask and one
//! shift. Other bit widths use the portable kernels.

use super::{Fns, MAX_GROUPS, Prep, State, gidx, portable, sidx};
use crate::layout::{Fp16Layout, QuantLayout};
use crate::policy::KeyMode;
use std::arch::x86_64::*;

/// Runs `$f::<G>(args)` for the head groups with specialised kernels, else `$fallback`.
macro_rules! by_g {
    ($g:expr, $f:ident($($a:expr),*), $fallback:expr) => {
        match $g {
            1 => $f::<1>($($a),*),
            2 => $f::<2>($($a),*),
            3 => $f::<3>($($a),*),
            4 => $f::<4>($($a),*),
            6 => $f::<6>($($a),*),
            8 => $f::<8>($($a),*),
            _ => $fallback,
        }
    };
}

pub(crate) fn fns() -> Fns {
    Fns {
        fp16_scores: |p, seg, l, n, s| {
            check_fp16(seg, l, p.d, n);
            // SAFETY: these functions are only handed out after runtime detection of AVX2,
            // FMA and F16C (`Kernel::available`); `check_fp16` bounds every read.
            unsafe {
                by_g!(
                    p.g,
                    fp16_scores_g(p, seg, l, n, s),
                    (portable::fns().fp16_scores)(p, seg, l, n, s)
                )
            }
        },
        fp16_accum: |st, seg, l, n| {
            check_fp16(seg, l, st.d, n);
            // SAFETY: as above.
            unsafe {
                by_g!(
                    st.g,
                    fp16_accum_g(st, seg, l, n),
                    (portable::fns().fp16_accum)(st, seg, l, n)
                )
            }
        },
        quant_scores: |p, seg, l, n, s| {
            if l.bits() == 4 && check_quant(seg, l, p.d, n) {
                // SAFETY: as above; `check_quant` bounds every read.
                unsafe {
                    if l.key_mode == KeyMode::PerChannel && p.d.is_multiple_of(64) {
                        return by_g!(
                            p.g,
                            q4_scores_pc_g(p, seg, l, n, s),
                            (portable::fns().quant_scores)(p, seg, l, n, s)
                        );
                    }
                    by_g!(
                        p.g,
                        q4_scores_g(p, seg, l, n, s),
                        (portable::fns().quant_scores)(p, seg, l, n, s)
                    )
                }
            } else {
                (portable::fns().quant_scores)(p, seg, l, n, s)
            }
        },
        quant_accum: |st, seg, l, n| {
            if l.bits() == 4 && check_quant(seg, l, st.d, n) {
                // SAFETY: as above.
                unsafe {
                    if st.d.is_multiple_of(64) && l.group().is_multiple_of(64) {
                        return by_g!(
                            st.g,
                            q4_accum_pair_g(st, seg, l, n),
                            (portable::fns().quant_accum)(st, seg, l, n)
                        );
                    }
                    by_g!(
                        st.g,
                        q4_accum_g(st, seg, l, n),
                        (portable::fns().quant_accum)(st, seg, l, n)
                    )
                }
            } else {
                (portable::fns().quant_accum)(st, seg, l, n)
            }
        },
        prefetch,
        finish,
        softmax: |st, n| {
            // SAFETY: as above.
            unsafe { softmax(st, n) }
        },
    }
}

fn check_fp16(seg: &[u8], l: &Fp16Layout, d: usize, n: usize) {
    assert!(
        l.head_dim == d
            && d.is_multiple_of(8)
            && l.tokens.is_multiple_of(16)
            && n <= l.tokens
            && seg.len() >= 4 * d * l.tokens
    );
}

fn check_quant(seg: &[u8], l: &QuantLayout, d: usize, n: usize) -> bool {
    // Kernels read whole 8-token tiles of rows (always inside the block) and 32-code chunks.
    l.head_dim == d
        && d.is_multiple_of(32)
        && l.tokens.is_multiple_of(8)
        && n <= l.tokens
        && seg.len() >= l.v_row_offset(l.tokens)
}

/// Prefetches a segment into L2 (`T1`): a whole segment (4-8 KiB) prefetched into L1
/// runs out of L1 miss buffers, and on this Zen 4 that measured the same as no prefetch at
/// all, while L2 prefetching took FP16 attention from DRAM from ~35% to ~75% of the read
/// bandwidth.
pub(super) fn prefetch(seg: &[u8]) {
    let mut off = 0;
    while off < seg.len() {
        // SAFETY: prefetching is a hint and the address is inside `seg`.
        unsafe { _mm_prefetch(seg.as_ptr().add(off) as *const i8, _MM_HINT_T1) };
        off += 64;
    }
}

/// Scores of an FP16 block: keys are channel-major, so each load converts eight tokens of
/// one channel and the `G` query heads' broadcasts are reused across 32 tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp16_scores_g<const G: usize>(
    p: &Prep,
    seg: &[u8],
    l: &Fp16Layout,
    n: usize,
    s: &mut [f32],
) {
    let (d, tt) = (p.d, l.tokens);
    let k = seg.as_ptr() as *const u16;
    let q = p.q.as_ptr();
    let sp = s.as_mut_ptr();
    let mut t0 = 0;
    while t0 < n {
        if t0 + 32 <= tt && G <= 3 {
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            for c in 0..d {
                let mut qb = [_mm256_setzero_ps(); G];
                for h in 0..G {
                    qb[h] = _mm256_set1_ps(unsafe { *q.add(h * d + c) });
                }
                let base = unsafe { k.add(c * tt + t0) };
                for j in 0..4 {
                    let kv = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(base.add(8 * j) as *const __m128i))
                    };
                    for h in 0..G {
                        acc[h][j] = _mm256_fmadd_ps(qb[h], kv, acc[h][j]);
                    }
                }
            }
            for h in 0..G {
                for j in 0..4 {
                    unsafe { _mm256_storeu_ps(sp.add(sidx(h, t0 + 8 * j)), acc[h][j]) };
                }
            }
            t0 += 32;
        } else if t0 + 16 <= tt {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for c in 0..d {
                let base = unsafe { k.add(c * tt + t0) };
                let k0 = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i)) };
                let k1 = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(base.add(8) as *const __m128i)) };
                for h in 0..G {
                    let qb = _mm256_set1_ps(unsafe { *q.add(h * d + c) });
                    acc[h][0] = _mm256_fmadd_ps(qb, k0, acc[h][0]);
                    acc[h][1] = _mm256_fmadd_ps(qb, k1, acc[h][1]);
                }
            }
            for h in 0..G {
                unsafe {
                    _mm256_storeu_ps(sp.add(sidx(h, t0)), acc[h][0]);
                    _mm256_storeu_ps(sp.add(sidx(h, t0 + 8)), acc[h][1]);
                }
            }
            t0 += 16;
        } else {
            let mut acc = [_mm256_setzero_ps(); G];
            for c in 0..d {
                let kv = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(k.add(c * tt + t0) as *const __m128i))
                };
                for h in 0..G {
                    acc[h] =
                        _mm256_fmadd_ps(_mm256_set1_ps(unsafe { *q.add(h * d + c) }), kv, acc[h]);
                }
            }
            for h in 0..G {
                unsafe { _mm256_storeu_ps(sp.add(sidx(h, t0)), acc[h]) };
            }
            t0 += 8;
        }
    }
}

/// `acc[h][c] += sum_t p[h][t] * v[t][c]`: 32 channels at a time for up to 3 heads (all
/// accumulators in registers), 16 for more.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp16_accum_g<const G: usize>(st: &mut State, seg: &[u8], l: &Fp16Layout, n: usize) {
    let (d, tt) = (st.d, l.tokens);
    let v = unsafe { (seg.as_ptr() as *const u16).add(tt * d) };
    let sp = st.s.as_ptr();
    let ap = st.acc.as_mut_ptr();
    let mut c0 = 0;
    while c0 < d {
        if c0 + 32 <= d && G <= 3 {
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            for h in 0..G {
                for j in 0..4 {
                    acc[h][j] = unsafe { _mm256_loadu_ps(ap.add(h * d + c0 + 8 * j)) };
                }
            }
            for t in 0..n {
                let mut pb = [_mm256_setzero_ps(); G];
                for h in 0..G {
                    pb[h] = _mm256_set1_ps(unsafe { *sp.add(sidx(h, t)) });
                }
                let row = unsafe { v.add(t * d + c0) };
                for j in 0..4 {
                    let vv = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * j) as *const __m128i))
                    };
                    for h in 0..G {
                        acc[h][j] = _mm256_fmadd_ps(pb[h], vv, acc[h][j]);
                    }
                }
            }
            for h in 0..G {
                for j in 0..4 {
                    unsafe { _mm256_storeu_ps(ap.add(h * d + c0 + 8 * j), acc[h][j]) };
                }
            }
            c0 += 32;
        } else if c0 + 16 <= d {
            let mut acc = [[_mm256_setzero_ps(); 2]; G];
            for h in 0..G {
                for j in 0..2 {
                    acc[h][j] = unsafe { _mm256_loadu_ps(ap.add(h * d + c0 + 8 * j)) };
                }
            }
            for t in 0..n {
                let row = unsafe { v.add(t * d + c0) };
                let v0 = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row as *const __m128i)) };
                let v1 = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.add(8) as *const __m128i)) };
                for h in 0..G {
                    let pb = _mm256_set1_ps(unsafe { *sp.add(sidx(h, t)) });
                    acc[h][0] = _mm256_fmadd_ps(pb, v0, acc[h][0]);
                    acc[h][1] = _mm256_fmadd_ps(pb, v1, acc[h][1]);
                }
            }
            for h in 0..G {
                for j in 0..2 {
                    unsafe { _mm256_storeu_ps(ap.add(h * d + c0 + 8 * j), acc[h][j]) };
                }
            }
            c0 += 16;
        } else {
            let mut acc = [_mm256_setzero_ps(); G];
            for h in 0..G {
                acc[h] = unsafe { _mm256_loadu_ps(ap.add(h * d + c0)) };
            }
            for t in 0..n {
                let vv = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(v.add(t * d + c0) as *const __m128i))
                };
                for h in 0..G {
                    acc[h] =
                        _mm256_fmadd_ps(_mm256_set1_ps(unsafe { *sp.add(sidx(h, t)) }), vv, acc[h]);
                }
            }
            for h in 0..G {
                unsafe { _mm256_storeu_ps(ap.add(h * d + c0), acc[h]) };
            }
            c0 += 8;
        }
    }
}

/// `exp(x)` for 8 lanes (Cephes-style range reduction and polynomial, relative error about
/// 1e-7; inputs below -87 give about 1e-38).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp256(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let fx = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.398_199_9e-3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.333_452e-3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.166_579_6e-2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.666_666_5e-1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(0.5));
    y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(x, x),
        _mm256_add_ps(x, _mm256_set1_ps(1.0)),
    );
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

#[inline]
#[target_feature(enable = "avx2")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

/// Mask of lanes `t0 + i < n`.
#[inline]
#[target_feature(enable = "avx2")]
fn tail_mask(t0: usize, n: usize) -> __m256 {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let lim = _mm256_set1_epi32((n - t0) as i32);
    _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, idx))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn softmax(st: &mut State, n: usize) {
    let d = st.d;
    let neg = _mm256_set1_ps(f32::NEG_INFINITY);
    for h in 0..st.g {
        let s = unsafe { st.s.as_mut_ptr().add(sidx(h, 0)) };
        let mut mx = neg;
        let mut t0 = 0;
        while t0 < n {
            let mut x = unsafe { _mm256_loadu_ps(s.add(t0)) };
            if t0 + 8 > n {
                x = _mm256_blendv_ps(neg, x, tail_mask(t0, n));
            }
            mx = _mm256_max_ps(mx, x);
            t0 += 8;
        }
        let bm = hmax(mx);
        let m_new = st.m[h].max(bm);
        if m_new > st.m[h] {
            let alpha = (st.m[h] - m_new).exp();
            st.l[h] *= alpha;
            let a = _mm256_set1_ps(alpha);
            let mut c = 0;
            while c < d {
                unsafe {
                    let p = st.acc.as_mut_ptr().add(h * d + c);
                    _mm256_storeu_ps(p, _mm256_mul_ps(a, _mm256_loadu_ps(p)));
                }
                c += 8;
            }
            let mut c = 0;
            while c < d {
                unsafe {
                    let p = st.qacc.as_mut_ptr().add(h * d + c);
                    _mm256_storeu_ps(p, _mm256_mul_ps(a, _mm256_loadu_ps(p)));
                }
                c += 8;
            }
            for z in &mut st.zacc[gidx(h, 0)..gidx(h, MAX_GROUPS)] {
                *z *= alpha;
            }
            st.m[h] = m_new;
        }
        let mb = _mm256_set1_ps(m_new);
        let mut sum = _mm256_setzero_ps();
        let mut t0 = 0;
        while t0 < n {
            let mut e = exp256(_mm256_sub_ps(unsafe { _mm256_loadu_ps(s.add(t0)) }, mb));
            if t0 + 8 > n {
                e = _mm256_and_ps(e, tail_mask(t0, n));
            }
            unsafe { _mm256_storeu_ps(s.add(t0), e) };
            sum = _mm256_add_ps(sum, e);
            t0 += 8;
        }
        st.l[h] += hsum(sum);
    }
}

/// Widens 16 bytes of one 4-bit chunk (32 codes) to four vectors of 8 f32 codes, in order.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_chunk_f32(p: *const u8) -> [__m256; 4] {
    let x0 = unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) };
    let x1 = unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i)) };
    let m = _mm256_set1_epi32(0x0f);
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(x0, m)),
        _mm256_cvtepi32_ps(_mm256_and_si256(x1, m)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32(x0, 4)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32(x1, 4)),
    ]
}

/// Loads 8 (scale, zero) pairs stored contiguously as two vectors of 8 scales and 8 zeros.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_params8(p: *const u8) -> (__m256, __m256) {
    let v = unsafe { _mm256_loadu_si256(p as *const __m256i) };
    split_params(v)
}

/// Gathers the (scale, zero) pair at `base + i * stride` for 8 rows.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn gather_params8(base: *const u8, stride: usize) -> (__m256, __m256) {
    let s = stride as i32;
    let idx = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
    split_params(unsafe { _mm256_i32gather_epi32::<1>(base as *const i32, idx) })
}

/// Eight `u32` lanes `scale | zero << 16` (FP16 bits) to f32 scales and zeros.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn split_params(v: __m256i) -> (__m256, __m256) {
    let sc = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
    let z = _mm256_srli_epi32(v, 16);
    // [s0..s3 z0..z3 | s4..s7 z4..z7] -> [s0..s7 | z0..z7]
    let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(sc, z), 0b11_01_10_00);
    (
        _mm256_cvtph_ps(_mm256_castsi256_si128(packed)),
        _mm256_cvtph_ps(_mm256_extracti128_si256(packed, 1)),
    )
}

/// Lane `i` of the result is the sum of all lanes of `v[i]`.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8(v: &[__m256; 8]) -> __m256 {
    let a0 = _mm256_hadd_ps(v[0], v[1]);
    let a1 = _mm256_hadd_ps(v[2], v[3]);
    let a2 = _mm256_hadd_ps(v[4], v[5]);
    let a3 = _mm256_hadd_ps(v[6], v[7]);
    let b0 = _mm256_hadd_ps(a0, a1);
    let b1 = _mm256_hadd_ps(a2, a3);
    _mm256_add_ps(
        _mm256_permute2f128_ps(b0, b1, 0x20),
        _mm256_permute2f128_ps(b0, b1, 0x31),
    )
}

/// Scores of an INT4 block, eight tokens at a time. Per-channel keys: `q * scale` is
/// folded once per block, `q . zero` is a constant. Per-token groups:
/// `scale * (q . codes) + zero * sum(q)` per group.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_scores_g<const G: usize>(
    p: &mut Prep,
    seg: &[u8],
    l: &QuantLayout,
    n: usize,
    s: &mut [f32],
) {
    let d = p.d;
    let base = seg.as_ptr();
    let per_channel = l.key_mode == KeyMode::PerChannel;
    let mut konst = [_mm256_setzero_ps(); G];
    if per_channel {
        let mut kz = [_mm256_setzero_ps(); G];
        let mut c = 0;
        while c < d {
            let (sc, z) = unsafe { load_params8(base.add(c * 4)) };
            for h in 0..G {
                let qv = unsafe { _mm256_loadu_ps(p.q.as_ptr().add(h * d + c)) };
                unsafe {
                    _mm256_storeu_ps(p.scratch.as_mut_ptr().add(h * d + c), _mm256_mul_ps(qv, sc))
                };
                kz[h] = _mm256_fmadd_ps(qv, z, kz[h]);
            }
            c += 8;
        }
        for h in 0..G {
            konst[h] = _mm256_set1_ps(hsum(kz[h]));
        }
    }
    let q = if per_channel {
        p.scratch.as_ptr()
    } else {
        p.q.as_ptr()
    };
    let (gsz, groups, gb) = if per_channel {
        (d, 1, 0)
    } else {
        (l.group(), l.groups(), l.format.group_bytes())
    };
    let (krow0, kstride) = (l.k_row_offset(0), l.k_row_bytes());
    let sp = s.as_mut_ptr();
    let mut t8 = 0;
    while t8 < n {
        let mut sv = konst;
        for gi in 0..groups {
            let codes_off = if per_channel { 0 } else { gi * gb + 4 };
            let mut tmp = [[_mm256_setzero_ps(); 8]; G];
            for tt in 0..8 {
                let row = unsafe { base.add(krow0 + (t8 + tt) * kstride + codes_off) };
                let mut acc = [_mm256_setzero_ps(); G];
                for ch in 0..gsz / 32 {
                    let cv = unsafe { q4_chunk_f32(row.add(16 * ch)) };
                    for (j, cj) in cv.iter().enumerate() {
                        for h in 0..G {
                            let qv = unsafe {
                                _mm256_loadu_ps(q.add(h * d + gi * gsz + 32 * ch + 8 * j))
                            };
                            acc[h] = _mm256_fmadd_ps(qv, *cj, acc[h]);
                        }
                    }
                }
                for h in 0..G {
                    tmp[h][tt] = acc[h];
                }
            }
            if per_channel {
                for h in 0..G {
                    sv[h] = _mm256_add_ps(sv[h], reduce8(&tmp[h]));
                }
            } else {
                let (sc, z) =
                    unsafe { gather_params8(base.add(krow0 + t8 * kstride + gi * gb), kstride) };
                for h in 0..G {
                    let zq = _mm256_mul_ps(z, _mm256_set1_ps(p.qsum[gidx(h, gi)]));
                    sv[h] = _mm256_add_ps(sv[h], _mm256_fmadd_ps(reduce8(&tmp[h]), sc, zq));
                }
            }
        }
        for h in 0..G {
            unsafe { _mm256_storeu_ps(sp.add(sidx(h, t8)), sv[h]) };
        }
        t8 += 8;
    }
}

/// Values of an INT4 block: per group, `w = p * scale` and `sum p * zero` are computed eight
/// tokens at a time, then `acc += w * codes` 32 channels at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_accum_g<const G: usize>(st: &mut State, seg: &[u8], l: &QuantLayout, n: usize) {
    let d = st.d;
    let (gs, gb) = (l.group(), l.format.group_bytes());
    let base = seg.as_ptr();
    let (vrow0, vstride) = (l.v_row_offset(0), l.v_row_bytes());
    for gi in 0..l.groups() {
        // Probabilities past `n` are zero (softmax masks the last tile).
        let mut zs = [_mm256_setzero_ps(); G];
        let mut t8 = 0;
        while t8 < n {
            let (sc, z) =
                unsafe { gather_params8(base.add(vrow0 + t8 * vstride + gi * gb), vstride) };
            for h in 0..G {
                let pv = unsafe { _mm256_loadu_ps(st.s.as_ptr().add(sidx(h, t8))) };
                unsafe {
                    _mm256_storeu_ps(st.w.as_mut_ptr().add(sidx(h, t8)), _mm256_mul_ps(pv, sc))
                };
                zs[h] = _mm256_fmadd_ps(pv, z, zs[h]);
            }
            t8 += 8;
        }
        for h in 0..G {
            st.zacc[gidx(h, gi)] += hsum(zs[h]);
        }
        let wp = st.w.as_ptr();
        let ap = st.acc.as_mut_ptr();
        for ch in 0..gs / 32 {
            let c0 = gi * gs + 32 * ch;
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            for h in 0..G {
                for j in 0..4 {
                    acc[h][j] = unsafe { _mm256_loadu_ps(ap.add(h * d + c0 + 8 * j)) };
                }
            }
            for t in 0..n {
                let mut wb = [_mm256_setzero_ps(); G];
                for h in 0..G {
                    wb[h] = _mm256_set1_ps(unsafe { *wp.add(sidx(h, t)) });
                }
                let cv =
                    unsafe { q4_chunk_f32(base.add(vrow0 + t * vstride + gi * gb + 4 + 16 * ch)) };
                for j in 0..4 {
                    for h in 0..G {
                        acc[h][j] = _mm256_fmadd_ps(wb[h], cv[j], acc[h][j]);
                    }
                }
            }
            for h in 0..G {
                for j in 0..4 {
                    unsafe { _mm256_storeu_ps(ap.add(h * d + c0 + 8 * j), acc[h][j]) };
                }
            }
        }
    }
}

/// Lane `i` of the result is the sum of all lanes of `v[i]` (integer twin of [`reduce8`]).
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8_i32(v: &[__m256i; 8]) -> __m256i {
    let a0 = _mm256_hadd_epi32(v[0], v[1]);
    let a1 = _mm256_hadd_epi32(v[2], v[3]);
    let a2 = _mm256_hadd_epi32(v[4], v[5]);
    let a3 = _mm256_hadd_epi32(v[6], v[7]);
    let b0 = _mm256_hadd_epi32(a0, a1);
    let b1 = _mm256_hadd_epi32(a2, a3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256(b0, b1, 0x20),
        _mm256_permute2x128_si256(b0, b1, 0x31),
    )
}

/// Scores of an INT4 block with per-channel keys (head dim a multiple of 64), in integers.
///
/// Once per block, `q * scale` is quantized to int16 per head (step `max|q * scale| / 32767`,
/// so each product carries a relative error below 2e-5) and stored in the order a 16-bit lane
/// of a 32-byte code row exposes its four nibbles (`lane & 15`, `lane >> 4 & 15`,
/// `lane >> 8 & 15`, `lane >> 12`). Per token, one 32-byte load gives 64 codes as four int16
/// vectors with one shift and mask each, and `pmaddwd` does 16 multiply-adds per instruction
/// (codes <= 15, so int32 sums cannot overflow for head dims up to 256). Eight tokens are
/// reduced together and converted to f32 once.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_scores_pc_g<const G: usize>(
    p: &mut Prep,
    seg: &[u8],
    l: &QuantLayout,
    n: usize,
    s: &mut [f32],
) {
    let d = p.d;
    let pieces = d / 64;
    let base = seg.as_ptr();
    // q * scale and the constant q . zero.
    let mut konst = [_mm256_setzero_ps(); G];
    let mut kz = [_mm256_setzero_ps(); G];
    let mut c = 0;
    while c < d {
        let (sc, z) = unsafe { load_params8(base.add(c * 4)) };
        for h in 0..G {
            let qv = unsafe { _mm256_loadu_ps(p.q.as_ptr().add(h * d + c)) };
            unsafe {
                _mm256_storeu_ps(p.scratch.as_mut_ptr().add(h * d + c), _mm256_mul_ps(qv, sc))
            };
            kz[h] = _mm256_fmadd_ps(qv, z, kz[h]);
        }
        c += 8;
    }
    for h in 0..G {
        konst[h] = _mm256_set1_ps(hsum(kz[h]));
    }
    // int16 queries in nibble order: [h][piece][nibble k][lane i].
    let mut qi = [[0i16; super::MAX_HEAD_DIM]; G];
    let mut step = [_mm256_setzero_ps(); G];
    for h in 0..G {
        let qs = &p.scratch[h * d..][..d];
        let mx = qs.iter().fold(0f32, |m, x| m.max(x.abs()));
        if !mx.is_finite() {
            // Non-finite queries: the f32 kernel propagates them like the reference.
            return unsafe { q4_scores_g::<G>(p, seg, l, n, s) };
        }
        if mx > 0.0 {
            let inv = 32767.0 / mx;
            step[h] = _mm256_set1_ps(mx / 32767.0);
            let mut nat = [0i16; super::MAX_HEAD_DIM];
            unsafe { quantize_i16(qs.as_ptr(), inv, nat.as_mut_ptr(), d) };
            for pc in 0..pieces {
                // Natural channels 16j..16j+15 as 8 i32 lanes of (even, odd) pairs; nibble
                // k = 0..3 takes the even (k < 2) or odd channels of pieces (0, 2) or (1, 3).
                let nv: [__m256i; 4] = std::array::from_fn(|j| unsafe {
                    _mm256_loadu_si256(nat.as_ptr().add(pc * 64 + 16 * j) as *const __m256i)
                });
                let even = |v: __m256i| _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16);
                let odd = |v: __m256i| _mm256_srai_epi32(v, 16);
                let pack = |a: __m256i, b: __m256i| {
                    _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0b11_01_10_00)
                };
                let parts = [
                    pack(even(nv[0]), even(nv[2])),
                    pack(even(nv[1]), even(nv[3])),
                    pack(odd(nv[0]), odd(nv[2])),
                    pack(odd(nv[1]), odd(nv[3])),
                ];
                for (k, v) in parts.iter().enumerate() {
                    unsafe {
                        _mm256_storeu_si256(
                            qi[h].as_mut_ptr().add(pc * 64 + 16 * k) as *mut __m256i,
                            *v,
                        )
                    };
                }
            }
        }
    }
    let (krow0, kstride) = (l.k_row_offset(0), l.k_row_bytes());
    let m4 = _mm256_set1_epi16(0x0f);
    let sp = s.as_mut_ptr();
    let mut t8 = 0;
    while t8 < n {
        let mut tmp = [[_mm256_setzero_si256(); 8]; G];
        for tt in 0..8 {
            let row = unsafe { base.add(krow0 + (t8 + tt) * kstride) };
            let mut acc = [_mm256_setzero_si256(); G];
            for pc in 0..pieces {
                let v = unsafe { _mm256_loadu_si256(row.add(32 * pc) as *const __m256i) };
                let nib = [
                    _mm256_and_si256(v, m4),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(v, 8), m4),
                    _mm256_srli_epi16(v, 12),
                ];
                for h in 0..G {
                    let q4 = unsafe { (qi[h].as_ptr() as *const __m256i).add(pc * 4) };
                    let mut a = acc[h];
                    for (k, nk) in nib.iter().enumerate() {
                        let qv = unsafe { _mm256_loadu_si256(q4.add(k)) };
                        a = _mm256_add_epi32(a, _mm256_madd_epi16(*nk, qv));
                    }
                    acc[h] = a;
                }
            }
            for h in 0..G {
                tmp[h][tt] = acc[h];
            }
        }
        for h in 0..G {
            let sv = _mm256_cvtepi32_ps(reduce8_i32(&tmp[h]));
            unsafe {
                _mm256_storeu_ps(sp.add(sidx(h, t8)), _mm256_fmadd_ps(sv, step[h], konst[h]))
            };
        }
        t8 += 8;
    }
}

/// Channel of 16-bit lane `i`, nibble `k` (`lane >> 4k & 15`) of a 32-byte code piece.
const fn nibble_channel(i: usize, k: usize) -> usize {
    let byte = 2 * i + k / 2;
    32 * (byte / 16) + byte % 16 + 16 * (k % 2)
}

/// `PAIR_ORDER[slot]`: channel of accumulator slot `16 * k + 8 * j + e` of the value
/// kernel (nibble `k`; unpack lo, `j = 0`, holds lanes 0..3 and 8..11, hi lanes 4..7 and
/// 12..15).
const PAIR_ORDER: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut s = 0;
    while s < 64 {
        let (k, j, e) = (s / 16, (s / 8) % 2, s % 8);
        let i = (e % 4) + 4 * j + 8 * (e / 4);
        t[s] = nibble_channel(i, k) as u8;
        s += 1;
    }
    t
};

/// `out[i] = round(x[i] * inv)` as int16 for `len` (a multiple of 16) values with
/// `|x * inv| <= 32767`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quantize_i16(x: *const f32, inv: f32, out: *mut i16, len: usize) {
    let iv = _mm256_set1_ps(inv);
    let mut i = 0;
    while i < len {
        unsafe {
            let a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.add(i)), iv));
            let b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.add(i + 8)), iv));
            let p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0b11_01_10_00);
            _mm256_storeu_si256(out.add(i) as *mut __m256i, p);
        }
        i += 16;
    }
}

/// Values of an INT4 block (head dim and group multiples of 64), in integers, two tokens
/// per instruction.
///
/// Per group, `w = p * scale` is quantized to int16 per head (step `max w / 32767`). For a
/// token pair, the nibbles of both 32-byte code pieces are interleaved into int16 lanes
/// `(code[t][c], code[t+1][c])` and `pmaddwd` with the broadcast pair `(w[t], w[t+1])`
/// adds both tokens' products per channel (sums stay below 2^26 for 128-token blocks).
/// Accumulators are converted to f32 and scaled once per block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_accum_pair_g<const G: usize>(st: &mut State, seg: &[u8], l: &QuantLayout, n: usize) {
    let d = st.d;
    let (gs, gb) = (l.group(), l.format.group_bytes());
    let base = seg.as_ptr();
    let (vrow0, vstride) = (l.v_row_offset(0), l.v_row_bytes());
    let m4 = _mm256_set1_epi16(0x0f);
    // Pairs cover `n` rounded up to even; probabilities past `n` inside the last 8-token
    // tile are zero (softmax masks it) and the tile lies inside the block.
    let pairs = n.div_ceil(2);
    for gi in 0..l.groups() {
        let mut zs = [_mm256_setzero_ps(); G];
        let mut wmax = [_mm256_setzero_ps(); G];
        let mut t8 = 0;
        while t8 < n {
            let (sc, z) =
                unsafe { gather_params8(base.add(vrow0 + t8 * vstride + gi * gb), vstride) };
            for h in 0..G {
                let pv = unsafe { _mm256_loadu_ps(st.s.as_ptr().add(sidx(h, t8))) };
                let w = _mm256_mul_ps(pv, sc);
                unsafe { _mm256_storeu_ps(st.w.as_mut_ptr().add(sidx(h, t8)), w) };
                zs[h] = _mm256_fmadd_ps(pv, z, zs[h]);
                wmax[h] = _mm256_max_ps(wmax[h], _mm256_andnot_ps(_mm256_set1_ps(-0.0), w));
            }
            t8 += 8;
        }
        let mut wi = [[0i16; super::MAX_BLOCK_TOKENS]; G];
        let mut step = [0f32; G];
        for h in 0..G {
            st.zacc[gidx(h, gi)] += hsum(zs[h]);
            let mx = hmax(wmax[h]);
            if !mx.is_finite() {
                // Non-finite weights: the f32 kernel propagates them like the reference.
                return unsafe { q4_accum_g::<G>(st, seg, l, n) };
            }
            if mx > 0.0 {
                let inv = 32767.0 / mx;
                step[h] = mx / 32767.0;
                // Whole 16-token tiles; entries past `2 * pairs` are never read.
                let len = (2 * pairs).div_ceil(16) * 16;
                unsafe {
                    quantize_i16(st.w.as_ptr().add(sidx(h, 0)), inv, wi[h].as_mut_ptr(), len)
                };
            }
        }
        for pc in 0..gs / 64 {
            let c0 = gi * gs + 64 * pc;
            let off = vrow0 + gi * gb + 4 + 32 * pc;
            // Interleave the pair's 16-bit lanes once (`(lane[t], lane[t+1])` per 32-bit
            // lane), then nibble `k` of both tokens is one shift and mask: eight int16 pair
            // vectors per token pair, slot `2 * k + j` (`j`: unpack lo / hi).
            let mut nb =
                std::mem::MaybeUninit::<[[__m256i; 8]; super::MAX_BLOCK_TOKENS / 2]>::uninit();
            let nbp = nb.as_mut_ptr() as *mut __m256i;
            for tp in 0..pairs {
                let (r0, r1) = unsafe {
                    (
                        _mm256_loadu_si256(base.add(off + 2 * tp * vstride) as *const __m256i),
                        _mm256_loadu_si256(base.add(off + (2 * tp + 1) * vstride) as *const __m256i),
                    )
                };
                let u = [_mm256_unpacklo_epi16(r0, r1), _mm256_unpackhi_epi16(r0, r1)];
                for (j, &uj) in u.iter().enumerate() {
                    let v = [
                        _mm256_and_si256(uj, m4),
                        _mm256_and_si256(_mm256_srli_epi16(uj, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(uj, 8), m4),
                        _mm256_srli_epi16(uj, 12),
                    ];
                    for (k, &vk) in v.iter().enumerate() {
                        unsafe { nbp.add(8 * tp + 2 * k + j).write(vk) };
                    }
                }
            }
            // One pass per head keeps 8 accumulators in registers; sums stay in
            // `PAIR_ORDER` within each 64-channel piece (`finish` reorders).
            for h in 0..G {
                let mut acc = [_mm256_setzero_si256(); 8];
                for tp in 0..pairs {
                    let wv = _mm256_set1_epi32(unsafe {
                        (wi[h].as_ptr().add(2 * tp) as *const i32).read_unaligned()
                    });
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_epi32(
                            *a,
                            _mm256_madd_epi16(unsafe { nbp.add(8 * tp + j).read() }, wv),
                        );
                    }
                }
                let sb = _mm256_set1_ps(step[h]);
                for (q, a) in acc.iter().enumerate() {
                    unsafe {
                        let p = st.qacc.as_mut_ptr().add(h * d + c0 + 8 * q);
                        _mm256_storeu_ps(
                            p,
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(*a), sb, _mm256_loadu_ps(p)),
                        );
                    }
                }
            }
        }
    }
}

/// Folds `qacc` (value sums of [`q4_accum_pair_g`], `PAIR_ORDER` within each 64-channel
/// piece) into `acc`.
pub(super) fn finish(st: &mut State) {
    let (g, d) = (st.g, st.d);
    if !d.is_multiple_of(64) {
        return;
    }
    for h in 0..g {
        for pc in 0..d / 64 {
            let q = &st.qacc[h * d + 64 * pc..][..64];
            let a = &mut st.acc[h * d + 64 * pc..][..64];
            for (&x, &ch) in q.iter().zip(PAIR_ORDER.iter()) {
                a[ch as usize] += x;
            }
        }
    }
}
