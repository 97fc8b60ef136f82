//! The slow, obviously-correct reference: dequantize every visible token to f32 and run
//! plain softmax attention in f64.

use crate::cells::{Cells, Span};
use crate::layout::{Fp16Layout, QuantLayout};
use crate::policy::KeyMode;
use crate::pool::{Pool, PoolLayout};
use half::f16;
use jetvlm_quant::{ScaleZero, unpack_code};

/// Dequantizes token `slot` of a segment into `k` and `v` (`head_dim` each).
pub fn dequant_token(layout: &PoolLayout, seg: &[u8], slot: usize, k: &mut [f32], v: &mut [f32]) {
    match layout {
        PoolLayout::Fp16(l) => dequant_fp16(l, seg, slot, k, v),
        PoolLayout::Quant(l) => dequant_quant(l, seg, slot, k, v),
    }
}

fn dequant_fp16(l: &Fp16Layout, seg: &[u8], t: usize, k: &mut [f32], v: &mut [f32]) {
    let h: &[f16] = bytemuck::cast_slice(seg);
    for c in 0..l.head_dim {
        k[c] = h[l.k_index(t, c)].to_f32();
        v[c] = h[l.v_index(t, c)].to_f32();
    }
}

/// Parameters of group `g` in a row of group blocks.
pub(crate) fn group_params(row: &[u8], group_bytes: usize, g: usize) -> ScaleZero {
    bytemuck::pod_read_unaligned(&row[g * group_bytes..g * group_bytes + 4])
}

fn dequant_rows(l: &QuantLayout, row: &[u8], out: &mut [f32]) {
    let gb = l.format.group_bytes();
    let g = l.group();
    for gi in 0..l.groups() {
        let p = group_params(row, gb, gi);
        let codes = &row[gi * gb + 4..(gi + 1) * gb];
        for j in 0..g {
            out[gi * g + j] = p.dequant(unpack_code(codes, l.bits(), j));
        }
    }
}

fn dequant_quant(l: &QuantLayout, seg: &[u8], t: usize, k: &mut [f32], v: &mut [f32]) {
    let krow = &seg[l.k_row_offset(t)..l.k_row_offset(t) + l.k_row_bytes()];
    match l.key_mode {
        KeyMode::PerToken => dequant_rows(l, krow, k),
        KeyMode::PerChannel => {
            for c in 0..l.head_dim {
                let p: ScaleZero = bytemuck::pod_read_unaligned(&seg[c * 4..c * 4 + 4]);
                k[c] = p.dequant(unpack_code(krow, l.bits(), c));
            }
        }
    }
    let vrow = &seg[l.v_row_offset(t)..l.v_row_offset(t) + l.v_row_bytes()];
    dequant_rows(l, vrow, v);
}

/// Reference attention of `span`'s queries over the cache (see `MixedKvCache::attend_masked`).
pub fn attend(
    cells: &Cells,
    pools: &[Option<Pool>; 2],
    layer: usize,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    span: &Span,
    whole_span: bool,
    window: Option<usize>,
    q: &[f32],
    out: &mut [f32],
) {
    let group = q_heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut kbuf, mut vbuf) = (vec![0f32; d], vec![0f32; d]);
    for i in 0..span.len() {
        // The last key a query sees: its own token, or the span's last with `whole_span`.
        let qseq = span.seq(if whole_span { span.len() - 1 } else { i });
        // The first key a query sees under a sliding window.
        let from = super::window_start(span.seq(i), window);
        for kh in 0..kv_heads {
            let mut keys: Vec<Vec<f32>> = Vec::new();
            let mut vals: Vec<Vec<f32>> = Vec::new();
            for b in cells.blocks() {
                let Some(pool) = &pools[b.pool as usize] else {
                    continue;
                };
                let seg = pool.segment(layer, b.id, kh);
                for (slot, &s) in b.seqs.iter().enumerate() {
                    if (from..=qseq).contains(&s) {
                        dequant_token(pool.layout(), seg, slot, &mut kbuf, &mut vbuf);
                        keys.push(kbuf.clone());
                        vals.push(vbuf.clone());
                    }
                }
            }
            for qh in kh * group..(kh + 1) * group {
                let qv = &q[(i * q_heads + qh) * d..][..d];
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        k.iter()
                            .zip(qv)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let l: f64 = w.iter().sum();
                let o = &mut out[(i * q_heads + qh) * d..][..d];
                for c in 0..d {
                    let acc: f64 = w.iter().zip(&vals).map(|(p, v)| p * v[c] as f64).sum();
                    o[c] = if l > 0.0 { (acc / l) as f32 } else { 0.0 };
                }
            }
        }
    }
}
