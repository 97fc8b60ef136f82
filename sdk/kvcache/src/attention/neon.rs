//! aarch64 kernels (NEON, part of every aarch64 CPU, e.g. the Jetson Orin's Cortex-A78AE).
//!
//! INT4 blocks use int16 multiply-accumulate (`smlal`), the integer formulation of the x86
//! kernels: per-channel keys fold `q * scale` into int16 queries once per block (step
//! `max|q * scale| / 32767`) and widen 16 codes per load; values quantize `w = p * scale`
//! to int16 per head and group and add `w[t] * code[t][c]` for 8 channels per
//! instruction. FP16 blocks, the softmax and other formats use the portable kernels, which
//! the compiler already vectorizes with NEON.

use super::portable::{self, params_at};
use super::{Fns, MAX_BLOCK_TOKENS, MAX_GQA, MAX_HEAD_DIM, Prep, State, gidx, sidx};
use crate::layout::QuantLayout;
use crate::policy::KeyMode;
use std::arch::aarch64::*;

pub(crate) fn fns() -> Fns {
    let base = portable::fns();
    Fns {
        quant_scores: |p, seg, l, n, s| {
            if l.bits() == 4 && l.key_mode == KeyMode::PerChannel && quant_ok(seg, l, p.d, n) {
                // SAFETY: NEON is part of every aarch64 CPU; `quant_ok` bounds every read.
                unsafe { q4_scores_pc(p, seg, l, n, s) }
            } else {
                (portable::fns().quant_scores)(p, seg, l, n, s)
            }
        },
        quant_accum: |st, seg, l, n| {
            if l.bits() == 4 && quant_ok(seg, l, st.d, n) && st.g <= MAX_GQA {
                // SAFETY: as above.
                unsafe { q4_accum(st, seg, l, n) }
            } else {
                (portable::fns().quant_accum)(st, seg, l, n)
            }
        },
        ..base
    }
}

fn quant_ok(seg: &[u8], l: &QuantLayout, d: usize, n: usize) -> bool {
    l.head_dim == d
        && d.is_multiple_of(32)
        && l.group().is_multiple_of(32)
        && n <= l.tokens
        && l.tokens <= MAX_BLOCK_TOKENS
        && seg.len() >= l.v_row_offset(l.tokens)
}

/// 16 bytes of one 4-bit chunk to its 32 codes as four int16 vectors, in order.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn codes32(p: *const u8) -> [int16x8_t; 4] {
    let v = unsafe { vld1q_u8(p) };
    let lo = vandq_u8(v, vdupq_n_u8(0x0f));
    let hi = vshrq_n_u8::<4>(v);
    [
        vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))),
        vreinterpretq_s16_u16(vmovl_high_u8(lo)),
        vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
        vreinterpretq_s16_u16(vmovl_high_u8(hi)),
    ]
}

/// `round(x * inv)` as int16 for `|x * inv| <= 32767`.
#[inline]
fn q16(x: f32, inv: f32) -> i16 {
    (x * inv).round() as i16
}

/// Scores of an INT4 block with per-channel keys, in integers (see the module docs).
#[target_feature(enable = "neon")]
unsafe fn q4_scores_pc(p: &mut Prep, seg: &[u8], l: &QuantLayout, n: usize, s: &mut [f32]) {
    let (g, d) = (p.g, p.d);
    let mut qi = [[0i16; MAX_HEAD_DIM]; MAX_GQA];
    let mut step = [0f32; MAX_GQA];
    let mut konst = [0f32; MAX_GQA];
    for h in 0..g {
        let mut mx = 0f32;
        for c in 0..d {
            let pz = params_at(seg, 4 * c);
            let q = p.q[h * d + c];
            let qs = q * pz.scale.to_f32();
            p.scratch[h * d + c] = qs;
            konst[h] += q * pz.zero.to_f32();
            mx = mx.max(qs.abs());
        }
        if !mx.is_finite()
            || !konst[h].is_finite()
            || p.scratch[h * d..][..d].iter().any(|x| x.is_nan())
        {
            // Non-finite queries or parameters: the f32 kernel propagates them like the
            // reference does.
            return (portable::fns().quant_scores)(p, seg, l, n, s);
        }
        if mx > 0.0 {
            let inv = 32767.0 / mx;
            step[h] = mx / 32767.0;
            for c in 0..d {
                qi[h][c] = q16(p.scratch[h * d + c], inv);
            }
        }
    }
    let (krow0, kstride) = (l.k_row_offset(0), l.k_row_bytes());
    let base = seg.as_ptr();
    for t in 0..n {
        let row = unsafe { base.add(krow0 + t * kstride) };
        let mut acc = [[vdupq_n_s32(0); 2]; MAX_GQA];
        for ch in 0..d / 32 {
            let cv = unsafe { codes32(row.add(16 * ch)) };
            for h in 0..g {
                let q = unsafe { qi[h].as_ptr().add(32 * ch) };
                for (j, c) in cv.iter().enumerate() {
                    let qv = unsafe { vld1q_s16(q.add(8 * j)) };
                    acc[h][0] = vmlal_s16(acc[h][0], vget_low_s16(*c), vget_low_s16(qv));
                    acc[h][1] = vmlal_high_s16(acc[h][1], *c, qv);
                }
            }
        }
        for h in 0..g {
            let dot = vaddvq_s32(vaddq_s32(acc[h][0], acc[h][1])) as f32;
            s[sidx(h, t)] = dot * step[h] + konst[h];
        }
    }
}

/// Values of an INT4 block (groups of 32 codes or more), in integers: per group, int16
/// weights `w = p * scale` per head, then `acc[c] += w[t] * code[t][c]`, 8 channels per
/// `smlal`.
#[target_feature(enable = "neon")]
unsafe fn q4_accum(st: &mut State, seg: &[u8], l: &QuantLayout, n: usize) {
    let (g, d) = (st.g, st.d);
    let (gs, gb) = (l.group(), l.format.group_bytes());
    let base = seg.as_ptr();
    let (vrow0, vstride) = (l.v_row_offset(0), l.v_row_bytes());
    let mut wi = [[0i16; MAX_BLOCK_TOKENS]; MAX_GQA];
    let mut step = [0f32; MAX_GQA];
    for gi in 0..l.groups() {
        let mut mx = [0f32; MAX_GQA];
        let mut w = [[0f32; MAX_BLOCK_TOKENS]; MAX_GQA];
        for t in 0..n {
            let pz = params_at(seg, vrow0 + t * vstride + gi * gb);
            let (sc, z) = (pz.scale.to_f32(), pz.zero.to_f32());
            for h in 0..g {
                let p = st.s[sidx(h, t)];
                st.zacc[gidx(h, gi)] += p * z;
                w[h][t] = p * sc;
                mx[h] = mx[h].max(w[h][t].abs());
            }
        }
        if (0..g).any(|h| !mx[h].is_finite() || w[h][..n].iter().any(|x| x.is_nan())) {
            // Non-finite weights: f32 products propagate them like the reference does.
            for h in 0..g {
                for t in 0..n {
                    let row = &seg[vrow0 + t * vstride + gi * gb + 4..][..gs / 2];
                    for (ch, c16) in row.chunks_exact(16).enumerate() {
                        let a = &mut st.acc[h * d + gi * gs + 32 * ch..][..32];
                        for i in 0..16 {
                            a[i] += w[h][t] * (c16[i] & 0x0f) as f32;
                            a[i + 16] += w[h][t] * (c16[i] >> 4) as f32;
                        }
                    }
                }
            }
            continue;
        }
        for h in 0..g {
            step[h] = mx[h] / 32767.0;
            let inv = if mx[h] > 0.0 { 32767.0 / mx[h] } else { 0.0 };
            for t in 0..n {
                wi[h][t] = q16(w[h][t], inv);
            }
        }
        for ch in 0..gs / 32 {
            let c0 = gi * gs + 32 * ch;
            for h in 0..g {
                let mut acc = [vdupq_n_s32(0); 8];
                for t in 0..n {
                    let cv =
                        unsafe { codes32(base.add(vrow0 + t * vstride + gi * gb + 4 + 16 * ch)) };
                    let wv = wi[h][t];
                    for (j, c) in cv.iter().enumerate() {
                        acc[2 * j] = vmlal_n_s16(acc[2 * j], vget_low_s16(*c), wv);
                        acc[2 * j + 1] = vmlal_high_n_s16(acc[2 * j + 1], *c, wv);
                    }
                }
                let sb = vdupq_n_f32(step[h]);
                for (k, a) in acc.iter().enumerate() {
                    unsafe {
                        let o = st.acc.as_mut_ptr().add(h * d + c0 + 4 * k);
                        vst1q_f32(o, vfmaq_f32(vld1q_f32(o), vcvtq_f32_s32(*a), sb));
                    }
                }
            }
        }
    }
}
