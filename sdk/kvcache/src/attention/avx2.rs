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

pub(crate) fn fns() -> Fns {
    Fns {
        fp16_scores,
        fp16_accum,
        quant_scores: |pr, seg, l, n, s| {
            if l.bits() == 4 {
                // SAFETY: these functions are only handed out after runtime detection of
                // AVX2, FMA and F16C (`Kernel::available`).
                unsafe { q4_scores(pr, seg, l, n, s) }
            } else {
                (portable::fns().quant_scores)(pr, seg, l, n, s)
            }
        },
        quant_accum: |st, seg, l, n| {
            if l.bits() == 4 {
                // SAFETY: see above.
                unsafe { q4_accum(st, seg, l, n) }
            } else {
                (portable::fns().quant_accum)(st, seg, l, n)
            }
        },
        prefetch,
        softmax: |st, n| {
            // SAFETY: see above.
            unsafe { softmax(st, n) }
        },
    }
}

fn prefetch(seg: &[u8]) {
    let mut off = 0;
    while off < seg.len() {
        // SAFETY: prefetching is a hint and the address is inside `seg`.
        unsafe { _mm_prefetch(seg.as_ptr().add(off) as *const i8, _MM_HINT_T0) };
        off += 64;
    }
}

fn fp16_scores(p: &Prep, seg: &[u8], l: &Fp16Layout, n: usize, s: &mut [f32]) {
    // SAFETY: only reachable after runtime detection (see `fns`); all reads stay inside
    // `seg` (tiles never pass the block's `tokens`, a multiple of 16).
    unsafe {
        match p.g {
            1 => fp16_scores_g::<1>(p, seg, l, n, s),
            2 => fp16_scores_g::<2>(p, seg, l, n, s),
            3 => fp16_scores_g::<3>(p, seg, l, n, s),
            4 => fp16_scores_g::<4>(p, seg, l, n, s),
            _ => fp16_scores_dyn(p, seg, l, n, s),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp16_scores_g<const G: usize>(
    p: &Prep,
    seg: &[u8],
    l: &Fp16Layout,
    n: usize,
    s: &mut [f32],
) {
    let (d, tt) = (p.d, l.tokens);
    assert!(seg.len() >= 2 * d * tt && n <= tt);
    let k = seg.as_ptr() as *const u16;
    let q = p.q.as_ptr();
    let mut t0 = 0;
    while t0 < n {
        if t0 + 32 <= tt {
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            for c in 0..d {
                // SAFETY: c < d, t0 + 32 <= tokens: inside the key region.
                let base = unsafe { k.add(c * tt + t0) };
                let mut kv = [_mm256_setzero_ps(); 4];
                for (j, kj) in kv.iter_mut().enumerate() {
                    *kj = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(base.add(8 * j) as *const __m128i))
                    };
                }
                for h in 0..G {
                    let qb = unsafe { _mm256_broadcast_ss(&*q.add(h * d + c)) };
                    for j in 0..4 {
                        acc[h][j] = _mm256_fmadd_ps(qb, kv[j], acc[h][j]);
                    }
                }
            }
            for h in 0..G {
                for j in 0..4 {
                    unsafe { _mm256_storeu_ps(s.as_mut_ptr().add(sidx(h, t0 + 8 * j)), acc[h][j]) };
                }
            }
            t0 += 32;
        } else {
            let mut acc = [_mm256_setzero_ps(); G];
            for c in 0..d {
                let kv = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(k.add(c * tt + t0) as *const __m128i))
                };
                for h in 0..G {
                    let qb = unsafe { _mm256_broadcast_ss(&*q.add(h * d + c)) };
                    acc[h] = _mm256_fmadd_ps(qb, kv, acc[h]);
                }
            }
            for h in 0..G {
                unsafe { _mm256_storeu_ps(s.as_mut_ptr().add(sidx(h, t0)), acc[h]) };
            }
            t0 += 8;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp16_scores_dyn(p: &Prep, seg: &[u8], l: &Fp16Layout, n: usize, s: &mut [f32]) {
    let (d, tt) = (p.d, l.tokens);
    assert!(seg.len() >= 2 * d * tt && n <= tt);
    let k = seg.as_ptr() as *const u16;
    for h in 0..p.g {
        let mut t0 = 0;
        while t0 < n {
            let mut acc = _mm256_setzero_ps();
            for c in 0..d {
                let kv = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(k.add(c * tt + t0) as *const __m128i))
                };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p.q[h * d + c]), kv, acc);
            }
            unsafe { _mm256_storeu_ps(s.as_mut_ptr().add(sidx(h, t0)), acc) };
            t0 += 8;
        }
    }
}

fn fp16_accum(st: &mut State, seg: &[u8], l: &Fp16Layout, n: usize) {
    // SAFETY: runtime-detected (see `fns`); reads stay inside the value region.
    unsafe {
        match st.g {
            1 => fp16_accum_g::<1>(st, seg, l, n),
            2 => fp16_accum_g::<2>(st, seg, l, n),
            3 => fp16_accum_g::<3>(st, seg, l, n),
            4 => fp16_accum_g::<4>(st, seg, l, n),
            _ => fp16_accum_g::<1>(st, seg, l, n),
        }
    }
}

/// `acc[h][c] += sum_t p[h][t] * v[t][c]`, 32 channels at a time. `G == 1` with more heads
/// loops over heads one by one.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp16_accum_g<const G: usize>(st: &mut State, seg: &[u8], l: &Fp16Layout, n: usize) {
    let (d, tt) = (st.d, l.tokens);
    assert!(seg.len() >= 2 * d * tt && n <= tt);
    let v = unsafe { (seg.as_ptr() as *const u16).add(tt * d) };
    let mut h0 = 0;
    while h0 < st.g {
        let mut c0 = 0;
        while c0 < d {
            let nj = ((d - c0) / 8).min(4);
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            for h in 0..G {
                for j in 0..nj {
                    acc[h][j] =
                        unsafe { _mm256_loadu_ps(st.acc.as_ptr().add((h0 + h) * d + c0 + 8 * j)) };
                }
            }
            for t in 0..n {
                let row = unsafe { v.add(t * d + c0) };
                let mut vv = [_mm256_setzero_ps(); 4];
                for j in 0..nj {
                    vv[j] = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * j) as *const __m128i))
                    };
                }
                for h in 0..G {
                    let pb = _mm256_set1_ps(st.s[sidx(h0 + h, t)]);
                    for j in 0..nj {
                        acc[h][j] = _mm256_fmadd_ps(pb, vv[j], acc[h][j]);
                    }
                }
            }
            for h in 0..G {
                for j in 0..nj {
                    unsafe {
                        _mm256_storeu_ps(
                            st.acc.as_mut_ptr().add((h0 + h) * d + c0 + 8 * j),
                            acc[h][j],
                        )
                    };
                }
            }
            c0 += 8 * nj;
        }
        h0 += G;
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

/// Loads 8 (scale, zero) pairs as two vectors of 8 scales and 8 zeros.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_params8(p: *const u8) -> (__m256, __m256) {
    let a = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }; // s0 z0 .. s3 z3
    let b = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)) }; // s4 z4 .. s7 z7
    let s = _mm256_shuffle_ps(a, b, 0b10_00_10_00); // s0 s1 s4 s5 | s2 s3 s6 s7
    let z = _mm256_shuffle_ps(a, b, 0b11_01_11_01);
    let s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0b11_01_10_00));
    let z = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(z), 0b11_01_10_00));
    (s, z)
}

#[inline]
#[target_feature(enable = "f16c")]
unsafe fn params1(p: *const u8) -> (f32, f32) {
    let v = unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned())) };
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_scores(p: &mut Prep, seg: &[u8], l: &QuantLayout, n: usize, s: &mut [f32]) {
    let (d, g) = (p.d, p.g);
    assert!(seg.len() >= l.v_row_offset(0) && n <= l.tokens && d % 32 == 0);
    let base = seg.as_ptr();
    let chunks = d / 32;
    match l.key_mode {
        KeyMode::PerChannel => {
            // Fold the per-channel scales into q once per block.
            let mut konst = [0f32; super::MAX_GQA];
            let mut c = 0;
            while c < d {
                let (sc, z) = unsafe { load_params8(base.add(c * 4)) };
                for h in 0..g {
                    let qv = unsafe { _mm256_loadu_ps(p.q.as_ptr().add(h * d + c)) };
                    unsafe {
                        _mm256_storeu_ps(
                            p.scratch.as_mut_ptr().add(h * d + c),
                            _mm256_mul_ps(qv, sc),
                        )
                    };
                    konst[h] += hsum(_mm256_mul_ps(qv, z));
                }
                c += 8;
            }
            for t in 0..n {
                let row = unsafe { base.add(l.k_row_offset(t)) };
                let mut acc = [_mm256_setzero_ps(); super::MAX_GQA];
                for ch in 0..chunks {
                    let cv = unsafe { q4_chunk_f32(row.add(16 * ch)) };
                    for h in 0..g {
                        let q = unsafe { p.scratch.as_ptr().add(h * d + 32 * ch) };
                        for j in 0..4 {
                            acc[h] = _mm256_fmadd_ps(
                                unsafe { _mm256_loadu_ps(q.add(8 * j)) },
                                cv[j],
                                acc[h],
                            );
                        }
                    }
                }
                for h in 0..g {
                    s[sidx(h, t)] = hsum(acc[h]) + konst[h];
                }
            }
        }
        KeyMode::PerToken => {
            let (gs, gb) = (l.group(), l.format.group_bytes());
            for t in 0..n {
                let row = unsafe { base.add(l.k_row_offset(t)) };
                let mut sc_acc = [0f32; super::MAX_GQA];
                for gi in 0..l.groups() {
                    let grp = unsafe { row.add(gi * gb) };
                    let (sc, z) = unsafe { params1(grp) };
                    let mut acc = [_mm256_setzero_ps(); super::MAX_GQA];
                    for ch in 0..gs / 32 {
                        let cv = unsafe { q4_chunk_f32(grp.add(4 + 16 * ch)) };
                        for h in 0..g {
                            let q = unsafe { p.q.as_ptr().add(h * d + gi * gs + 32 * ch) };
                            for j in 0..4 {
                                acc[h] = _mm256_fmadd_ps(
                                    unsafe { _mm256_loadu_ps(q.add(8 * j)) },
                                    cv[j],
                                    acc[h],
                                );
                            }
                        }
                    }
                    for h in 0..g {
                        sc_acc[h] += sc * hsum(acc[h]) + z * p.qsum[gidx(h, gi)];
                    }
                }
                for h in 0..g {
                    s[sidx(h, t)] = sc_acc[h];
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_accum(st: &mut State, seg: &[u8], l: &QuantLayout, n: usize) {
    let (d, g) = (st.d, st.g);
    assert!(seg.len() >= l.v_row_offset(n) && d % 32 == 0);
    let (gs, gb) = (l.group(), l.format.group_bytes());
    let base = seg.as_ptr();
    // 32 channels (one chunk) at a time, all heads' accumulators in registers.
    for gi in 0..l.groups() {
        for ch in 0..gs / 32 {
            let c0 = gi * gs + 32 * ch;
            let mut acc = [[_mm256_setzero_ps(); 4]; super::MAX_GQA];
            for h in 0..g {
                for j in 0..4 {
                    acc[h][j] = unsafe { _mm256_loadu_ps(st.acc.as_ptr().add(h * d + c0 + 8 * j)) };
                }
            }
            for t in 0..n {
                let grp = unsafe { base.add(l.v_row_offset(t) + gi * gb) };
                let (sc, z) = unsafe { params1(grp) };
                let cv = unsafe { q4_chunk_f32(grp.add(4 + 16 * ch)) };
                for h in 0..g {
                    let p = st.s[sidx(h, t)];
                    if ch == 0 {
                        st.zacc[gidx(h, gi)] += p * z;
                    }
                    let w = _mm256_set1_ps(p * sc);
                    for j in 0..4 {
                        acc[h][j] = _mm256_fmadd_ps(w, cv[j], acc[h][j]);
                    }
                }
            }
            for h in 0..g {
                for j in 0..4 {
                    unsafe {
                        _mm256_storeu_ps(st.acc.as_mut_ptr().add(h * d + c0 + 8 * j), acc[h][j])
                    };
                }
            }
        }
    }
}
