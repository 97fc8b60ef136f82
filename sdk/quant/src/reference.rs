//! Reference quantization: plain scalar code, the twin every fast kernel is tested against.

use crate::QuantError;
use crate::format::{GroupFormat, ScaleZero, max_code, pack_codes, packed_len, unpack_code};
use half::f16;

/// Scale and zero for `x` at `bits` bits, rounded to FP16 so that every value of `x` is
/// representable within half a step: `zero <= min(x)` and `zero + scale * max_code >= max(x)`.
pub fn row_params(x: &[f32], bits: u32) -> ScaleZero {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if x.is_empty() {
        return ScaleZero::default();
    }
    let zero = f16_round_down(lo);
    let z = zero.to_f32();
    let range = hi - z;
    let mut scale = f16::from_f32(range / max_code(bits) as f32);
    // Round the scale up until the top of the range is reachable within half a step.
    while z + scale.to_f32() * max_code(bits) as f32 + 0.5 * scale.to_f32() < hi {
        scale = next_up(scale);
    }
    ScaleZero { scale, zero }
}

fn f16_round_down(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() > v { next_down(h) } else { h }
}

fn next_up(h: f16) -> f16 {
    let b = h.to_bits();
    if h.to_f32() == 0.0 {
        return f16::from_bits(1);
    }
    if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

fn next_down(h: f16) -> f16 {
    let b = h.to_bits();
    if h.to_f32() == 0.0 {
        return f16::from_bits(0x8001);
    }
    if b & 0x8000 == 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

/// Code of `v` under `p` at `bits` bits: `round((v - zero) / scale)` clamped to the range.
#[inline]
pub fn code_of(v: f32, p: ScaleZero, bits: u32) -> u8 {
    let s = p.scale.to_f32();
    if s == 0.0 {
        return 0;
    }
    ((v - p.zero.to_f32()) / s)
        .round()
        .clamp(0.0, max_code(bits) as f32) as u8
}

/// Quantizes one row (one group, a multiple of 32 values) with a single scale and zero:
/// returns its parameters and writes the packed codes into `packed`
/// (`packed_len(x.len(), bits)` bytes).
pub fn quantize_row(x: &[f32], bits: u32, packed: &mut [u8]) -> ScaleZero {
    let p = row_params(x, bits);
    let mut codes = [0u8; 512];
    let n = x.len();
    debug_assert!(n <= codes.len());
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = code_of(v, p, bits);
    }
    pack_codes(&codes[..n], bits, &mut packed[..packed_len(n, bits)]);
    p
}

/// Dequantizes one row written by [`quantize_row`].
pub fn dequantize_row(p: ScaleZero, packed: &[u8], bits: u32, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = p.dequant(unpack_code(packed, bits, i));
    }
}

fn check_finite(op: &'static str, x: &[f32]) -> Result<(), QuantError> {
    match x.iter().position(|v| !v.is_finite() || v.abs() > 65504.0) {
        Some(index) => Err(QuantError::NonFinite {
            op,
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}

/// Quantizes `x` group by group into consecutive group blocks (`scale, zero, codes`) in
/// `out`, which must hold exactly `x.len() / group * group_bytes` bytes.
pub fn quantize_groups(x: &[f32], fmt: GroupFormat, out: &mut [u8]) -> Result<(), QuantError> {
    let g = fmt.group();
    if !x.len().is_multiple_of(g) {
        return Err(QuantError::NotMultiple {
            op: "quantize_groups",
            len: x.len(),
            what: "group size",
            multiple: g,
        });
    }
    let expected = x.len() / g * fmt.group_bytes();
    if out.len() != expected {
        return Err(QuantError::BufferSize {
            op: "quantize_groups",
            got: out.len(),
            expected,
        });
    }
    check_finite("quantize_groups", x)?;
    for (xs, block) in x
        .chunks_exact(g)
        .zip(out.chunks_exact_mut(fmt.group_bytes()))
    {
        let (head, codes) = block.split_at_mut(4);
        let p = quantize_row(xs, fmt.bits(), codes);
        head.copy_from_slice(bytemuck::bytes_of(&p));
    }
    Ok(())
}

/// Dequantizes consecutive group blocks written by [`quantize_groups`] into `out`.
pub fn dequantize_groups(
    bytes: &[u8],
    fmt: GroupFormat,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let g = fmt.group();
    if !out.len().is_multiple_of(g) {
        return Err(QuantError::NotMultiple {
            op: "dequantize_groups",
            len: out.len(),
            what: "group size",
            multiple: g,
        });
    }
    let expected = out.len() / g * fmt.group_bytes();
    if bytes.len() != expected {
        return Err(QuantError::BufferSize {
            op: "dequantize_groups",
            got: bytes.len(),
            expected,
        });
    }
    for (o, block) in out
        .chunks_exact_mut(g)
        .zip(bytes.chunks_exact(fmt.group_bytes()))
    {
        let p: ScaleZero = bytemuck::pod_read_unaligned(&block[..4]);
        dequantize_row(p, &block[4..], fmt.bits(), o);
    }
    Ok(())
}

/// The bound every element of a group quantized with parameters `p` meets: half a
/// quantization step plus the FP16 rounding of one dequantized value.
pub fn element_error_bound(p: ScaleZero, x: f32) -> f32 {
    0.5 * p.scale.to_f32() + (x.abs() + p.zero.to_f32().abs()) * 2f32.powi(-20) + 1e-7
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn check_bound(x: &[f32], fmt: GroupFormat) {
        let mut bytes = vec![0u8; x.len() / fmt.group() * fmt.group_bytes()];
        quantize_groups(x, fmt, &mut bytes).unwrap();
        let mut back = vec![0f32; x.len()];
        dequantize_groups(&bytes, fmt, &mut back).unwrap();
        for (gi, (xs, bs)) in x
            .chunks(fmt.group())
            .zip(back.chunks(fmt.group()))
            .enumerate()
        {
            let p: ScaleZero = bytemuck::pod_read_unaligned(&bytes[gi * fmt.group_bytes()..][..4]);
            // The step is no bigger than the range needs (plus FP16 rounding of the scale).
            let lo = xs.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let ideal = (hi - lo) / fmt.max_code() as f32;
            assert!(
                p.scale.to_f32() <= ideal * 1.002 + 1e-6,
                "scale {} ideal {ideal}",
                p.scale
            );
            for (&a, &b) in xs.iter().zip(bs) {
                let bound = element_error_bound(p, a);
                assert!((a - b).abs() <= bound, "{fmt:?}: {a} -> {b}, bound {bound}");
            }
        }
    }

    #[test]
    fn random_inputs_within_half_a_step() {
        let mut rng = StdRng::seed_from_u64(7);
        for bits in [2, 4, 8] {
            for g in [32, 64, 128] {
                let fmt = GroupFormat::new(bits, g).unwrap();
                let x: Vec<f32> = (0..g * 40)
                    .map(|_| rng.random_range(-3.0f32..3.0))
                    .collect();
                check_bound(&x, fmt);
                let x: Vec<f32> = (0..g * 10)
                    .map(|_| rng.random_range(0.001f32..0.002))
                    .collect();
                check_bound(&x, fmt);
            }
        }
    }

    #[test]
    fn outlier_inputs_within_half_a_step() {
        let mut rng = StdRng::seed_from_u64(8);
        for bits in [2, 4, 8] {
            for g in [32, 64, 128] {
                let fmt = GroupFormat::new(bits, g).unwrap();
                let x: Vec<f32> = (0..g * 20)
                    .map(|i| {
                        let v = rng.random_range(-1.0f32..1.0);
                        if i % 29 == 3 {
                            v * rng.random_range(20.0f32..50.0)
                        } else {
                            v
                        }
                    })
                    .collect();
                check_bound(&x, fmt);
            }
        }
    }

    #[test]
    fn constant_group_is_exact_up_to_fp16() {
        let fmt = GroupFormat::new(4, 32).unwrap();
        let x = vec![0.3f32; 32];
        let mut bytes = vec![0u8; fmt.group_bytes()];
        quantize_groups(&x, fmt, &mut bytes).unwrap();
        let mut back = vec![0f32; 32];
        dequantize_groups(&bytes, fmt, &mut back).unwrap();
        for b in back {
            assert!((b - 0.3).abs() <= 0.3 * 2f32.powi(-10));
        }
    }

    #[test]
    fn typed_blocks_match_byte_layout() {
        use crate::format::{BlockQ4G64, GroupBlock};
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let b = BlockQ4G64::quantize(&x).unwrap();
        let mut bytes = vec![0u8; 36];
        quantize_groups(&x, BlockQ4G64::format(), &mut bytes).unwrap();
        assert_eq!(bytemuck::bytes_of(&b), &bytes[..]);
        let mut out = [0f32; 64];
        b.dequantize(&mut out);
        for (a, o) in x.iter().zip(out) {
            assert!((a - o).abs() <= element_error_bound(b.params, *a));
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let fmt = GroupFormat::new(4, 64).unwrap();
        let mut out = vec![0u8; 36];
        assert!(matches!(
            quantize_groups(&[0.0; 63], fmt, &mut out),
            Err(QuantError::NotMultiple { len: 63, .. })
        ));
        assert!(matches!(
            quantize_groups(&[0.0; 64], fmt, &mut out[..30]),
            Err(QuantError::BufferSize { expected: 36, .. })
        ));
        let mut x = vec![0.0f32; 64];
        x[5] = f32::NAN;
        assert!(matches!(
            quantize_groups(&x, fmt, &mut out),
            Err(QuantError::NonFinite { index: 5, .. })
        ));
    }
}
