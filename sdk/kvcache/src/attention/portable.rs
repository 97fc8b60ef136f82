//! Fused kernels in plain Rust (any CPU). Same arithmetic as the SIMD kernels, scalar loops.

use super::{Fns, MAX_HEAD_DIM, Prep, State, gidx, sidx};
use crate::layout::{Fp16Layout, QuantLayout};
use crate::policy::KeyMode;
use half::f16;
use half::slice::HalfFloatSliceExt;
use jetvlm_quant::ScaleZero;

pub(crate) fn fns() -> Fns {
    Fns {
        fp16_scores,
        fp16_accum,
        quant_scores,
        quant_accum,
        softmax,
        prefetch: |_| {},
        finish: |_| {},
    }
}

fn fp16_scores(p: &Prep, seg: &[u8], l: &Fp16Layout, n: usize, s: &mut [f32]) {
    let h16: &[f16] = bytemuck::cast_slice(seg);
    let (d, t_len) = (p.d, l.tokens);
    let mut kcol = [0f32; super::MAX_BLOCK_TOKENS];
    for h in 0..p.g {
        s[sidx(h, 0)..sidx(h, n)].fill(0.0);
    }
    for c in 0..d {
        h16[c * t_len..c * t_len + n].convert_to_f32_slice(&mut kcol[..n]);
        for h in 0..p.g {
            let qc = p.q[h * d + c];
            for (sv, &k) in s[sidx(h, 0)..sidx(h, n)].iter_mut().zip(&kcol[..n]) {
                *sv += qc * k;
            }
        }
    }
}

/// Online-softmax step shared by every kernel family: scores -> probabilities in place,
/// running max / sum and accumulators rescaled.
pub(crate) fn softmax(st: &mut State, n: usize) {
    let d = st.d;
    for h in 0..st.g {
        let s = &mut st.s[sidx(h, 0)..sidx(h, n)];
        let bm = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let m_new = st.m[h].max(bm);
        if m_new > st.m[h] {
            let alpha = (st.m[h] - m_new).exp();
            st.l[h] *= alpha;
            st.acc[h * d..(h + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= alpha);
            st.qacc[h * d..(h + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= alpha);
            st.zacc[gidx(h, 0)..gidx(h, super::MAX_GROUPS)]
                .iter_mut()
                .for_each(|a| *a *= alpha);
            st.m[h] = m_new;
        }
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - m_new).exp();
            sum += *v;
        }
        st.l[h] += sum;
    }
}

fn fp16_accum(st: &mut State, seg: &[u8], l: &Fp16Layout, n: usize) {
    let h16: &[f16] = bytemuck::cast_slice(seg);
    let d = st.d;
    let mut row = [0f32; MAX_HEAD_DIM];
    for t in 0..n {
        h16[l.v_index(t, 0)..l.v_index(t, 0) + d].convert_to_f32_slice(&mut row[..d]);
        for h in 0..st.g {
            let p = st.s[sidx(h, t)];
            for (a, &v) in st.acc[h * d..(h + 1) * d].iter_mut().zip(&row[..d]) {
                *a += p * v;
            }
        }
    }
}

/// Unpacks a row of codes (32-code chunks, see `jetvlm_quant`) without per-code branches.
fn unpack_codes(packed: &[u8], bits: u32, codes: &mut [u8]) {
    match bits {
        4 => {
            for (c, o) in packed.chunks_exact(16).zip(codes.chunks_exact_mut(32)) {
                for i in 0..16 {
                    o[i] = c[i] & 0x0f;
                    o[i + 16] = c[i] >> 4;
                }
            }
        }
        2 => {
            for (c, o) in packed.chunks_exact(8).zip(codes.chunks_exact_mut(32)) {
                for i in 0..8 {
                    o[i] = c[i] & 3;
                    o[i + 8] = (c[i] >> 2) & 3;
                    o[i + 16] = (c[i] >> 4) & 3;
                    o[i + 24] = c[i] >> 6;
                }
            }
        }
        _ => codes.copy_from_slice(&packed[..codes.len()]),
    }
}

pub(super) fn params_at(bytes: &[u8], off: usize) -> ScaleZero {
    bytemuck::pod_read_unaligned(&bytes[off..off + 4])
}

fn quant_scores(p: &mut Prep, seg: &[u8], l: &QuantLayout, n: usize, s: &mut [f32]) {
    let (d, g) = (p.d, p.g);
    let bits = l.bits();
    let mut codes = [0u8; MAX_HEAD_DIM];
    match l.key_mode {
        KeyMode::PerToken => {
            let (gs, gb) = (l.group(), l.format.group_bytes());
            for t in 0..n {
                let row = &seg[l.k_row_offset(t)..][..l.k_row_bytes()];
                for h in 0..g {
                    s[sidx(h, t)] = 0.0;
                }
                for gi in 0..l.groups() {
                    let pz = params_at(row, gi * gb);
                    unpack_codes(&row[gi * gb + 4..(gi + 1) * gb], bits, &mut codes[..gs]);
                    let (sc, z) = (pz.scale.to_f32(), pz.zero.to_f32());
                    for h in 0..g {
                        let q = &p.q[h * d + gi * gs..][..gs];
                        let dot: f32 = q
                            .iter()
                            .zip(&codes[..gs])
                            .map(|(&a, &c)| a * c as f32)
                            .sum();
                        s[sidx(h, t)] += sc * dot + z * p.qsum[gidx(h, gi)];
                    }
                }
            }
        }
        KeyMode::PerChannel => {
            let mut konst = [0f32; super::MAX_GQA];
            for c in 0..d {
                let pz = params_at(seg, c * 4);
                let (sc, z) = (pz.scale.to_f32(), pz.zero.to_f32());
                for h in 0..g {
                    p.scratch[h * d + c] = p.q[h * d + c] * sc;
                    konst[h] += p.q[h * d + c] * z;
                }
            }
            for t in 0..n {
                let row = &seg[l.k_row_offset(t)..][..l.k_row_bytes()];
                unpack_codes(row, bits, &mut codes[..d]);
                for h in 0..g {
                    let q = &p.scratch[h * d..(h + 1) * d];
                    let dot: f32 = q.iter().zip(&codes[..d]).map(|(&a, &c)| a * c as f32).sum();
                    s[sidx(h, t)] = dot + konst[h];
                }
            }
        }
    }
}

fn quant_accum(st: &mut State, seg: &[u8], l: &QuantLayout, n: usize) {
    let (d, g) = (st.d, st.g);
    let (gs, gb, bits) = (l.group(), l.format.group_bytes(), l.bits());
    let mut codes = [0u8; MAX_HEAD_DIM];
    for t in 0..n {
        let row = &seg[l.v_row_offset(t)..][..l.v_row_bytes()];
        for gi in 0..l.groups() {
            let pz = params_at(row, gi * gb);
            unpack_codes(&row[gi * gb + 4..(gi + 1) * gb], bits, &mut codes[..gs]);
            let (sc, z) = (pz.scale.to_f32(), pz.zero.to_f32());
            for h in 0..g {
                let p = st.s[sidx(h, t)];
                st.zacc[gidx(h, gi)] += p * z;
                let w = p * sc;
                for (a, &c) in st.acc[h * d + gi * gs..][..gs].iter_mut().zip(&codes[..gs]) {
                    *a += w * c as f32;
                }
            }
        }
    }
}
