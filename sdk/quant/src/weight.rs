//! Weight-only quantization of linear layers: a `[rows, cols]` matrix quantized along each
//! row (the input dimension) in groups of 32, 64 or 128 values.
//!
//! - INT8, symmetric: `w ~= scale * code`, `code` in `-127..=127` (`i8`), one FP16 scale
//!   per group.
//! - INT4, asymmetric: `w ~= zero + scale * code`, `code` in `0..=15`, an FP16 scale and an
//!   FP16 zero (a value, not an integer zero point) per group; two codes per byte, packed in
//!   chunks of 32 codes like the KV formats (byte `i` of a chunk holds code `i` in its low
//!   nibble and code `i + 16` in its high nibble).
//!
//! Codes, scales and zeros are stored as three arrays (the safetensors layout of `jetvlm
//! quantize`: `<name>.qweight`, `<name>.scales`, `<name>.zeros`), so a matrix-vector kernel
//! streams the codes of a row and reads its group parameters beside them. The code blocks of
//! one group are declared below ([`W8G64`] and friends) with their sizes asserted; a row of
//! codes is `cols / group` such blocks back to back.
//!
//! [`quantize_row`] / [`dequantize_row`] are the reference every kernel is compared with,
//! and [`WeightFormat::element_error_bound`] the bound each dequantized element meets.

use crate::QuantError;
use crate::format::{GROUPS, pack_codes, unpack_code};
use bytemuck::{Pod, Zeroable};
use half::f16;
use std::mem::size_of;

/// Bit width and group size of a weight-only format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightFormat {
    bits: u32,
    group: usize,
}

impl WeightFormat {
    /// Validates `bits` in {4, 8} and `group` in {32, 64, 128}.
    pub fn new(bits: u32, group: usize) -> Result<Self, QuantError> {
        if !matches!(bits, 4 | 8) {
            return Err(QuantError::UnsupportedWeightBits { bits });
        }
        if !GROUPS.contains(&group) {
            return Err(QuantError::UnsupportedGroup { group });
        }
        Ok(Self { bits, group })
    }
    pub fn bits(self) -> u32 {
        self.bits
    }
    pub fn group(self) -> usize {
        self.group
    }
    /// Whether groups carry a zero (INT4) or are symmetric (INT8).
    pub fn has_zeros(self) -> bool {
        self.bits == 4
    }
    /// Checks `cols` is a whole number of groups (an error naming `what`, e.g. a tensor).
    pub fn check_cols(self, cols: usize) -> Result<(), QuantError> {
        if cols == 0 || !cols.is_multiple_of(self.group) {
            return Err(QuantError::NotMultiple {
                op: "weight quantization",
                len: cols,
                what: "group size",
                multiple: self.group,
            });
        }
        Ok(())
    }
    /// Bytes of codes in one row of `cols` values.
    pub fn code_bytes_per_row(self, cols: usize) -> usize {
        cols * self.bits as usize / 8
    }
    /// Groups in one row of `cols` values.
    pub fn groups_per_row(self, cols: usize) -> usize {
        cols / self.group
    }
    /// Bytes a `[rows, cols]` matrix takes: codes, FP16 scales and (INT4) FP16 zeros.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> usize {
        let params = if self.has_zeros() { 4 } else { 2 };
        rows * (self.code_bytes_per_row(cols) + self.groups_per_row(cols) * params)
    }
    /// Storage bits per weight, parameters included (8.25 for INT8 g64, 4.5 for INT4 g64).
    pub fn bits_per_weight(self) -> f64 {
        let params = if self.has_zeros() { 32.0 } else { 16.0 };
        self.bits as f64 + params / self.group as f64
    }
    /// Largest error of one dequantized element of a group quantized by [`quantize_row`]:
    /// half a step (`scale / 2`) plus the FP16 rounding of the parameters, bounded by
    /// `2^-10` of the group's largest magnitude `amax`.
    pub fn element_error_bound(self, scale: f32, amax: f32) -> f32 {
        0.5 * scale.abs() + amax * (1.0 / 1024.0) + 1e-7
    }
}

/// Group parameters of one INT4 group as the kernels read them: `w ~= zero + scale * code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct Q4Params {
    pub scale: f16,
    pub zero: f16,
}
const _: () = assert!(size_of::<Q4Params>() == 4);

/// The codes of one weight group: `GROUP` codes of `BITS` bits.
pub trait WeightCodes: Pod {
    const BITS: u32;
    const GROUP: usize;
    fn bytes(&self) -> &[u8];
}

macro_rules! weight_codes {
    ($(#[$doc:meta])* $name:ident, $bits:expr, $group:expr, $size:expr) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
        pub struct $name {
            pub qs: [u8; $group * $bits / 8],
        }
        const _: () = assert!(size_of::<$name>() == $size);
        impl WeightCodes for $name {
            const BITS: u32 = $bits;
            const GROUP: usize = $group;
            fn bytes(&self) -> &[u8] {
                &self.qs
            }
        }
    };
}

weight_codes!(/// INT8 codes (`i8` bytes) of a 32-weight group: 32 bytes.
    W8G32, 8, 32, 32);
weight_codes!(/// INT8 codes of a 64-weight group: 64 bytes.
    W8G64, 8, 64, 64);
weight_codes!(/// INT8 codes of a 128-weight group: 128 bytes.
    W8G128, 8, 128, 128);
weight_codes!(/// INT4 codes of a 32-weight group, one chunk of split nibbles: 16 bytes.
    W4G32, 4, 32, 16);
weight_codes!(/// INT4 codes of a 64-weight group, two chunks: 32 bytes.
    W4G64, 4, 64, 32);
weight_codes!(/// INT4 codes of a 128-weight group, four chunks: 64 bytes.
    W4G128, 4, 128, 64);

/// One row quantized: codes (`code_bytes_per_row` bytes; INT8 codes are `i8` stored as
/// bytes), one scale per group and, for INT4, one zero per group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantRow {
    pub codes: Vec<u8>,
    pub scales: Vec<f16>,
    pub zeros: Vec<f16>,
}

fn check_row(op: &'static str, fmt: WeightFormat, x: &[f32]) -> Result<(), QuantError> {
    fmt.check_cols(x.len())
        .map_err(|_| QuantError::NotMultiple {
            op,
            len: x.len(),
            what: "group size",
            multiple: fmt.group,
        })?;
    match x.iter().position(|v| !v.is_finite() || v.abs() > 65504.0) {
        Some(index) => Err(QuantError::NonFinite {
            op,
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}

/// Reference round-to-nearest quantization of one row (`x.len()` a multiple of the group).
pub fn quantize_row(x: &[f32], fmt: WeightFormat) -> Result<QuantRow, QuantError> {
    check_row("quantize_row", fmt, x)?;
    let g = fmt.group;
    let mut row = QuantRow::default();
    let mut codes = vec![0u8; x.len()];
    for (xs, cs) in x.chunks_exact(g).zip(codes.chunks_exact_mut(g)) {
        if fmt.bits == 8 {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = f16::from_f32(amax / 127.0);
            let s = scale.to_f32();
            for (c, &v) in cs.iter_mut().zip(xs) {
                let q = if s == 0.0 { 0.0 } else { (v / s).round() };
                *c = q.clamp(-127.0, 127.0) as i8 as u8;
            }
            row.scales.push(scale);
        } else {
            let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let zero = f16::from_f32(lo);
            let scale = f16::from_f32((hi - zero.to_f32()) / 15.0);
            let (z, s) = (zero.to_f32(), scale.to_f32());
            for (c, &v) in cs.iter_mut().zip(xs) {
                let q = if s == 0.0 { 0.0 } else { ((v - z) / s).round() };
                *c = q.clamp(0.0, 15.0) as u8;
            }
            row.scales.push(scale);
            row.zeros.push(zero);
        }
    }
    if fmt.bits == 8 {
        row.codes = codes;
    } else {
        row.codes = vec![0u8; fmt.code_bytes_per_row(x.len())];
        pack_codes(&codes, 4, &mut row.codes);
    }
    Ok(row)
}

/// Reference dequantization of one row: `out.len()` values from its codes and parameters.
pub fn dequantize_row(
    fmt: WeightFormat,
    codes: &[u8],
    scales: &[f16],
    zeros: &[f16],
    out: &mut [f32],
) {
    let g = fmt.group;
    for (i, o) in out.iter_mut().enumerate() {
        let s = scales[i / g].to_f32();
        *o = if fmt.bits == 8 {
            s * codes[i] as i8 as f32
        } else {
            zeros[i / g].to_f32() + s * unpack_code(codes, 4, i) as f32
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn formats_validate_and_size() {
        assert_eq!(
            WeightFormat::new(2, 64),
            Err(QuantError::UnsupportedWeightBits { bits: 2 })
        );
        assert_eq!(
            WeightFormat::new(4, 48),
            Err(QuantError::UnsupportedGroup { group: 48 })
        );
        let f4 = WeightFormat::new(4, 64).unwrap();
        assert_eq!(f4.bits_per_weight(), 4.5);
        assert_eq!(f4.code_bytes_per_row(128), 2 * size_of::<W4G64>());
        assert_eq!(f4.matrix_bytes(3, 128), 3 * (64 + 2 * 4));
        let f8 = WeightFormat::new(8, 128).unwrap();
        assert_eq!(f8.bits_per_weight(), 8.125);
        assert_eq!(f8.code_bytes_per_row(256), 2 * size_of::<W8G128>());
        assert_eq!(f8.matrix_bytes(2, 256), 2 * (256 + 2 * 2));
        assert!(f8.check_cols(96).is_err() && f8.check_cols(0).is_err());
        assert_eq!(W4G32::GROUP * W4G32::BITS as usize / 8, size_of::<W4G32>());
        assert_eq!(W8G32::GROUP, size_of::<W8G32>());
    }

    #[test]
    fn round_trip_within_the_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        for bits in [4u32, 8] {
            for group in GROUPS {
                let fmt = WeightFormat::new(bits, group).unwrap();
                for trial in 0..20 {
                    let scale = [1e-3f32, 0.05, 1.0, 300.0][trial % 4];
                    let offset = if trial % 3 == 0 { 0.7 * scale } else { 0.0 };
                    let x: Vec<f32> = (0..2 * group)
                        .map(|_| offset + scale * rng.random_range(-1.0f32..1.0))
                        .collect();
                    let q = quantize_row(&x, fmt).unwrap();
                    assert_eq!(q.codes.len(), fmt.code_bytes_per_row(x.len()));
                    assert_eq!(q.scales.len(), 2);
                    assert_eq!(q.zeros.len(), if bits == 4 { 2 } else { 0 });
                    let mut back = vec![0f32; x.len()];
                    dequantize_row(fmt, &q.codes, &q.scales, &q.zeros, &mut back);
                    for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                        let gs = &x[i / group * group..][..group];
                        let amax = gs.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let bound = fmt.element_error_bound(q.scales[i / group].to_f32(), amax);
                        assert!(
                            (a - b).abs() <= bound,
                            "bits {bits} g{group} i{i}: {a} vs {b} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn constant_and_zero_groups_are_exact_enough() {
        for bits in [4u32, 8] {
            let fmt = WeightFormat::new(bits, 32).unwrap();
            for v in [0.0f32, 0.25, -3.0] {
                let x = vec![v; 32];
                let q = quantize_row(&x, fmt).unwrap();
                let mut back = vec![0f32; 32];
                dequantize_row(fmt, &q.codes, &q.scales, &q.zeros, &mut back);
                assert!(
                    back.iter().all(|b| (b - v).abs() <= v.abs() / 1024.0),
                    "{bits} {v} {back:?}"
                );
            }
        }
    }

    #[test]
    fn bad_rows_are_refused() {
        let fmt = WeightFormat::new(8, 32).unwrap();
        assert!(matches!(
            quantize_row(&[0.0; 48], fmt),
            Err(QuantError::NotMultiple { len: 48, .. })
        ));
        let mut x = vec![0.0f32; 32];
        x[5] = f32::NAN;
        assert!(matches!(
            quantize_row(&x, fmt),
            Err(QuantError::NonFinite { index: 5, .. })
        ));
    }
}
