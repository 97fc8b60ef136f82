//! The 4-bit layouts of pre-quantized Hugging Face checkpoints, converted to INT4
//! [`WeightFormat`] rows (`[out, in]`, groups along `in`, `w = zero + scale * code`).
//!
//! - **AWQ, GEMM layout** (AutoAWQ `version: gemm`, as the official Qwen2.5-VL AWQ checkpoints
//!   use): `qweight` I32 `[in, out / 8]`, eight codes per int32 along the output dimension in
//!   AWQ's order (the code of output column `8 c + AWQ_ORDER[k]` in bits `4 k`); `qzeros` I32
//!   `[in / group, out / 8]`, packed the same way; `scales` F16 `[in / group, out]`;
//!   `w[o, i] = (q[i, o] - z[i / group, o]) * s[i / group, o]`.
//! - **GPTQ** (AutoGPTQ / GPTQModel, `checkpoint_format: gptq`, 4 bits): `qweight` I32
//!   `[in / 8, out]`, the code of input row `8 r + k` in bits `4 k`; `qzeros` I32
//!   `[groups, out / 8]`, the code of output column `8 c + k` in bits `4 k`, stored minus one
//!   (read back as `stored + 1`, so 1..=16); `scales` F16 `[groups, out]`; `g_idx` I32
//!   `[in]`, the group of each input row; `w[o, i] = (q[i, o] - z[g, o]) * s[g, o]` with
//!   `g = g_idx[i]`.
//!
//! Both convert exactly but for the zero, which becomes the FP16 value `-z * s` (off by at
//! most half an FP16 ulp of `16 s`, under 1% of one quantization step). A GPTQ checkpoint
//! quantized with act-order (`g_idx` not `i / group`) has groups that are not contiguous
//! along the row; its rows are dequantized and quantized again round-to-nearest in
//! contiguous groups of the same size ([`crate::weight::quantize_row`]).

use crate::QuantError;
use crate::format::pack_codes;
use crate::weight::{WeightFormat, quantize_row};
use half::f16;

/// AWQ's order of the eight codes in an int32: the code in bits `4 k` is that of column
/// `8 c + AWQ_ORDER[k]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// An INT4 matrix `[rows, cols]` in [`WeightFormat`] rows: codes (`cols / 2` bytes a row),
/// scales and zeros (`cols / group` a row).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Int4Matrix {
    pub format: Option<WeightFormat>,
    pub codes: Vec<u8>,
    pub scales: Vec<f16>,
    pub zeros: Vec<f16>,
    /// Whether the rows were quantized again (GPTQ act-order) rather than converted.
    pub requantized: bool,
}

fn size(
    op: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), QuantError> {
    if got == expected {
        Ok(())
    } else {
        Err(QuantError::Packed {
            op,
            msg: format!("{what} holds {got} values, expected {expected}"),
        })
    }
}

fn nibble(word: i32, k: usize) -> u8 {
    ((word as u32 >> (4 * k)) & 0xf) as u8
}

/// Checks the shape arithmetic shared by both layouts; returns the format.
fn check(
    op: &'static str,
    in_f: usize,
    out_f: usize,
    group: usize,
) -> Result<WeightFormat, QuantError> {
    let fmt = WeightFormat::new(4, group)?;
    if in_f == 0 || !in_f.is_multiple_of(group) || !in_f.is_multiple_of(8) {
        return Err(QuantError::Packed {
            op,
            msg: format!("group size {group} does not divide the {in_f} input features"),
        });
    }
    if out_f == 0 || !out_f.is_multiple_of(8) {
        return Err(QuantError::Packed {
            op,
            msg: format!("{out_f} output features are not a multiple of 8 (eight codes per int32)"),
        });
    }
    Ok(fmt)
}

/// Builds the rows from a code/zero/scale lookup (`q(i, o)`, `z(g, o)` as integers,
/// `s(g, o)`), groups contiguous along `in`.
fn rows(
    fmt: WeightFormat,
    in_f: usize,
    out_f: usize,
    q: impl Fn(usize, usize) -> u8,
    z: impl Fn(usize, usize) -> u8,
    s: impl Fn(usize, usize) -> f16,
) -> Int4Matrix {
    let g = fmt.group();
    let groups = in_f / g;
    let mut m = Int4Matrix {
        format: Some(fmt),
        codes: vec![0u8; out_f * in_f / 2],
        scales: Vec::with_capacity(out_f * groups),
        zeros: Vec::with_capacity(out_f * groups),
        requantized: false,
    };
    let mut row = vec![0u8; in_f];
    for o in 0..out_f {
        for (i, c) in row.iter_mut().enumerate() {
            *c = q(i, o);
        }
        pack_codes(&row, 4, &mut m.codes[o * in_f / 2..(o + 1) * in_f / 2]);
        for gi in 0..groups {
            let sc = s(gi, o);
            m.scales.push(sc);
            m.zeros
                .push(f16::from_f32(-(z(gi, o) as f32) * sc.to_f32()));
        }
    }
    m
}

/// AWQ GEMM tensors of a `[out_f, in_f]` matrix as INT4 rows (see the module docs).
pub fn awq_to_int4(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f16],
    in_f: usize,
    out_f: usize,
    group: usize,
) -> Result<Int4Matrix, QuantError> {
    const OP: &str = "AWQ";
    let fmt = check(OP, in_f, out_f, group)?;
    let groups = in_f / group;
    let w8 = out_f / 8;
    size(OP, "qweight", qweight.len(), in_f * w8)?;
    size(OP, "qzeros", qzeros.len(), groups * w8)?;
    size(OP, "scales", scales.len(), groups * out_f)?;
    // Position k of each eight holds column AWQ_ORDER[k]: invert it once.
    let mut slot = [0usize; 8];
    for (k, &c) in AWQ_ORDER.iter().enumerate() {
        slot[c] = k;
    }
    Ok(rows(
        fmt,
        in_f,
        out_f,
        |i, o| nibble(qweight[i * w8 + o / 8], slot[o % 8]),
        |g, o| nibble(qzeros[g * w8 + o / 8], slot[o % 8]),
        |g, o| scales[g * out_f + o],
    ))
}

/// GPTQ tensors of a `[out_f, in_f]` matrix as INT4 rows (see the module docs). `g_idx`
/// absent or equal to `i / group` converts; any other grouping (act-order) is dequantized
/// and quantized again in contiguous groups.
pub fn gptq_to_int4(
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[f16],
    g_idx: Option<&[i32]>,
    in_f: usize,
    out_f: usize,
    group: usize,
) -> Result<Int4Matrix, QuantError> {
    const OP: &str = "GPTQ";
    let fmt = check(OP, in_f, out_f, group)?;
    let groups = in_f / group;
    size(OP, "qweight", qweight.len(), in_f / 8 * out_f)?;
    size(OP, "qzeros", qzeros.len(), groups * out_f / 8)?;
    size(OP, "scales", scales.len(), groups * out_f)?;
    let q = |i: usize, o: usize| nibble(qweight[(i / 8) * out_f + o], i % 8);
    let z = |g: usize, o: usize| nibble(qzeros[g * out_f / 8 + o / 8], o % 8) + 1;
    let s = |g: usize, o: usize| scales[g * out_f + o];
    let Some(g_idx) = g_idx else {
        return Ok(rows(fmt, in_f, out_f, q, z, s));
    };
    size(OP, "g_idx", g_idx.len(), in_f)?;
    if let Some((i, &g)) = g_idx
        .iter()
        .enumerate()
        .find(|(_, g)| usize::try_from(**g).map_or(true, |g| g >= groups))
    {
        return Err(QuantError::Packed {
            op: OP,
            msg: format!("g_idx[{i}] = {g} is not a group (0..{groups})"),
        });
    }
    if g_idx
        .iter()
        .enumerate()
        .all(|(i, &g)| g as usize == i / group)
    {
        return Ok(rows(fmt, in_f, out_f, q, z, s));
    }
    // Act-order: dequantize each row, quantize it again in contiguous groups.
    let mut m = Int4Matrix {
        format: Some(fmt),
        requantized: true,
        ..Default::default()
    };
    let mut w = vec![0f32; in_f];
    for o in 0..out_f {
        for (i, v) in w.iter_mut().enumerate() {
            let g = g_idx[i] as usize;
            *v = (q(i, o) as f32 - z(g, o) as f32) * s(g, o).to_f32();
        }
        let r = quantize_row(&w, fmt)?;
        m.codes.extend(r.codes);
        m.scales.extend(r.scales);
        m.zeros.extend(r.zeros);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::dequantize_row;
    use rand::{Rng, SeedableRng};

    /// Random codes, zeros, scales of a `[out, in]` matrix and its reference values.
    struct Case {
        q: Vec<Vec<u8>>, // [in][out]
        z: Vec<Vec<u8>>, // [groups][out]
        s: Vec<Vec<f16>>,
    }

    fn case(rng: &mut impl Rng, in_f: usize, out_f: usize, group: usize, zmin: u8) -> Case {
        let groups = in_f / group;
        Case {
            q: (0..in_f)
                .map(|_| (0..out_f).map(|_| rng.random_range(0..16)).collect())
                .collect(),
            z: (0..groups)
                .map(|_| (0..out_f).map(|_| rng.random_range(zmin..16)).collect())
                .collect(),
            s: (0..groups)
                .map(|_| {
                    (0..out_f)
                        .map(|_| f16::from_f32(rng.random_range(0.001..0.05)))
                        .collect()
                })
                .collect(),
        }
    }

    fn pack8(vals: &[u8], order: &[usize; 8]) -> i32 {
        let mut w = 0u32;
        for (k, &c) in order.iter().enumerate() {
            w |= (vals[c] as u32 & 0xf) << (4 * k);
        }
        w as i32
    }

    fn check_rows(
        m: &Int4Matrix,
        in_f: usize,
        out_f: usize,
        want: impl Fn(usize, usize) -> f32,
        tol: f32,
    ) {
        let fmt = m.format.unwrap();
        let gpr = in_f / fmt.group();
        let mut row = vec![0f32; in_f];
        for o in 0..out_f {
            dequantize_row(
                fmt,
                &m.codes[o * in_f / 2..(o + 1) * in_f / 2],
                &m.scales[o * gpr..(o + 1) * gpr],
                &m.zeros[o * gpr..(o + 1) * gpr],
                &mut row,
            );
            for (i, v) in row.iter().enumerate() {
                let w = want(o, i);
                assert!((v - w).abs() <= tol, "o{o} i{i}: {v} vs {w}");
            }
        }
    }

    #[test]
    fn awq_converts_within_the_zero_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (in_f, out_f, group) = (128, 24, 64);
        let c = case(&mut rng, in_f, out_f, group, 0);
        let qweight: Vec<i32> = (0..in_f)
            .flat_map(|i| {
                c.q[i]
                    .chunks(8)
                    .map(|e| pack8(e, &AWQ_ORDER))
                    .collect::<Vec<_>>()
            })
            .collect();
        let qzeros: Vec<i32> =
            c.z.iter()
                .flat_map(|r| {
                    r.chunks(8)
                        .map(|e| pack8(e, &AWQ_ORDER))
                        .collect::<Vec<_>>()
                })
                .collect();
        let scales: Vec<f16> = c.s.iter().flatten().copied().collect();
        let m = awq_to_int4(&qweight, &qzeros, &scales, in_f, out_f, group).unwrap();
        assert!(!m.requantized);
        // The zero's FP16 rounding: half an ulp of 16 * 0.05 (2^-11 relative).
        check_rows(
            &m,
            in_f,
            out_f,
            |o, i| {
                let g = i / group;
                (c.q[i][o] as f32 - c.z[g][o] as f32) * c.s[g][o].to_f32()
            },
            16.0 * 0.05 / 2048.0,
        );
        // Inconsistent sizes and groups are errors naming what is wrong.
        let e = awq_to_int4(&qweight[1..], &qzeros, &scales, in_f, out_f, group).unwrap_err();
        assert!(e.to_string().contains("qweight"), "{e}");
        let e = awq_to_int4(&qweight, &qzeros, &scales, in_f, out_f, 48).unwrap_err();
        assert!(e.to_string().contains("48"), "{e}");
        let e = awq_to_int4(&qweight, &qzeros, &scales, 96, out_f, 64).unwrap_err();
        assert!(e.to_string().contains("does not divide"), "{e}");
    }

    #[test]
    fn gptq_converts_and_act_order_requantizes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (in_f, out_f, group) = (128, 16, 32);
        let seq: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
        let c = case(&mut rng, in_f, out_f, group, 1);
        let qweight: Vec<i32> = (0..in_f / 8)
            .flat_map(|r| {
                (0..out_f)
                    .map(|o| pack8(&(0..8).map(|k| c.q[8 * r + k][o]).collect::<Vec<_>>(), &seq))
                    .collect::<Vec<_>>()
            })
            .collect();
        let qzeros: Vec<i32> =
            c.z.iter()
                .flat_map(|r| {
                    r.chunks(8)
                        .map(|e| pack8(&e.iter().map(|z| z - 1).collect::<Vec<_>>(), &seq))
                        .collect::<Vec<_>>()
                })
                .collect();
        let scales: Vec<f16> = c.s.iter().flatten().copied().collect();
        let plain: Vec<i32> = (0..in_f as i32).map(|i| i / group as i32).collect();
        for g_idx in [None, Some(&plain[..])] {
            let m = gptq_to_int4(&qweight, &qzeros, &scales, g_idx, in_f, out_f, group).unwrap();
            assert!(!m.requantized);
            check_rows(
                &m,
                in_f,
                out_f,
                |o, i| {
                    let g = i / group;
                    (c.q[i][o] as f32 - c.z[g][o] as f32) * c.s[g][o].to_f32()
                },
                16.0 * 0.05 / 2048.0,
            );
        }
        // Act-order: a permutation of the rows' groups, requantized within INT4's bound.
        let mut perm: Vec<usize> = (0..in_f).collect();
        for i in (1..in_f).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let mut g_idx = vec![0i32; in_f];
        for (k, &i) in perm.iter().enumerate() {
            g_idx[i] = (k / group) as i32;
        }
        let m = gptq_to_int4(&qweight, &qzeros, &scales, Some(&g_idx), in_f, out_f, group).unwrap();
        assert!(m.requantized);
        let want = |o: usize, i: usize| {
            let g = g_idx[i] as usize;
            (c.q[i][o] as f32 - c.z[g][o] as f32) * c.s[g][o].to_f32()
        };
        // Within half a step of the new groups (range / 15 / 2) plus FP16 rounding.
        check_rows(&m, in_f, out_f, want, 0.05 * 30.0 / 15.0 / 2.0 + 0.01);
        let mut bad = g_idx.clone();
        bad[5] = 99;
        let e =
            gptq_to_int4(&qweight, &qzeros, &scales, Some(&bad), in_f, out_f, group).unwrap_err();
        assert!(e.to_string().contains("g_idx[5] = 99"), "{e}");
    }
}
