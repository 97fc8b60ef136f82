//! Group formats and the `#[repr(C)]` group blocks.

use crate::QuantError;
use bytemuck::{Pod, Zeroable};
use half::f16;
use std::mem::size_of;

/// FP16 scale and zero of one quantization group: `x ~= zero + scale * code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct ScaleZero {
    pub scale: f16,
    pub zero: f16,
}
const _: () = assert!(size_of::<ScaleZero>() == 4);

impl ScaleZero {
    /// Value of `code` under these parameters, computed in f32.
    #[inline]
    pub fn dequant(self, code: u8) -> f32 {
        self.zero.to_f32() + self.scale.to_f32() * code as f32
    }
}

/// Bit width and group size of an integer format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupFormat {
    bits: u32,
    group: usize,
}

/// Supported group sizes, largest first.
pub const GROUPS: [usize; 3] = [128, 64, 32];

/// `group` lowered, where it does not divide `head_dim`, to the largest supported group at
/// most `group` that does (64 -> 32 for head dim 96 or 32); `group` itself when it divides
/// `head_dim` or when no supported group does.
pub fn fit_group(group: usize, head_dim: usize) -> usize {
    if head_dim == 0 || head_dim.is_multiple_of(group) {
        return group;
    }
    GROUPS
        .into_iter()
        .find(|&g| g <= group && head_dim.is_multiple_of(g))
        .unwrap_or(group)
}

impl GroupFormat {
    /// Validates `bits` in {2, 4, 8} and `group` in {32, 64, 128}.
    pub fn new(bits: u32, group: usize) -> Result<Self, QuantError> {
        check_bits(bits)?;
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
    /// Largest code, `2^bits - 1`.
    pub fn max_code(self) -> u32 {
        max_code(self.bits)
    }
    /// Bytes of packed codes in one group.
    pub fn code_bytes(self) -> usize {
        packed_len(self.group, self.bits)
    }
    /// Bytes of one group block: scale, zero and packed codes.
    pub fn group_bytes(self) -> usize {
        size_of::<ScaleZero>() + self.code_bytes()
    }
    /// Storage bits per element, scales and zeros included (e.g. 4.5 for INT4 g64).
    pub fn bits_per_element(self) -> f64 {
        self.group_bytes() as f64 * 8.0 / self.group as f64
    }
}

/// Checks a bit width is one of 2, 4, 8.
pub fn check_bits(bits: u32) -> Result<(), QuantError> {
    if matches!(bits, 2 | 4 | 8) {
        Ok(())
    } else {
        Err(QuantError::UnsupportedBits { bits })
    }
}

/// `2^bits - 1`.
#[inline]
pub fn max_code(bits: u32) -> u32 {
    (1u32 << bits) - 1
}

/// Bytes that `n` codes of `bits` bits pack into.
#[inline]
pub fn packed_len(n: usize, bits: u32) -> usize {
    n * bits as usize / 8
}

/// Codes are packed in chunks of this many codes (see the crate documentation).
pub const PACK_CHUNK: usize = 32;

/// Packs `codes` (each `< 2^bits`) into `out` chunk by chunk (32 codes per chunk, split
/// halves / quarters inside the chunk). `codes.len()` must be a multiple of 32 and
/// `out.len() >= packed_len(codes.len(), bits)`.
pub fn pack_codes(codes: &[u8], bits: u32, out: &mut [u8]) {
    let cb = packed_len(PACK_CHUNK, bits);
    for (c, o) in codes.chunks_exact(PACK_CHUNK).zip(out.chunks_exact_mut(cb)) {
        match bits {
            8 => o.copy_from_slice(c),
            4 => {
                for i in 0..16 {
                    o[i] = (c[i] & 0x0f) | (c[i + 16] << 4);
                }
            }
            2 => {
                for i in 0..8 {
                    o[i] = (c[i] & 3)
                        | (c[i + 8] & 3) << 2
                        | (c[i + 16] & 3) << 4
                        | (c[i + 24] & 3) << 6;
                }
            }
            _ => unreachable!("bit width validated by GroupFormat / check_bits"),
        }
    }
}

/// Code `i` of a row packed by [`pack_codes`].
#[inline]
pub fn unpack_code(packed: &[u8], bits: u32, i: usize) -> u8 {
    let (chunk, j) = (i / PACK_CHUNK, i % PACK_CHUNK);
    match bits {
        8 => packed[i],
        4 => {
            let b = packed[chunk * 16 + j % 16];
            if j < 16 { b & 0x0f } else { b >> 4 }
        }
        _ => (packed[chunk * 8 + j % 8] >> (2 * (j / 8))) & 3,
    }
}

/// Unpacks a whole row of `codes.len()` codes.
pub fn unpack_codes(packed: &[u8], bits: u32, codes: &mut [u8]) {
    for (i, c) in codes.iter_mut().enumerate() {
        *c = unpack_code(packed, bits, i);
    }
}

/// A `#[repr(C)]` group block: scale, zero and the packed codes of one group.
pub trait GroupBlock: Pod {
    const BITS: u32;
    const GROUP: usize;
    fn params(&self) -> ScaleZero;
    fn codes(&self) -> &[u8];
    /// The format this block stores.
    fn format() -> GroupFormat {
        GroupFormat {
            bits: Self::BITS,
            group: Self::GROUP,
        }
    }
    /// Reference quantization of exactly `GROUP` values.
    fn quantize(x: &[f32]) -> Result<Self, QuantError> {
        let mut block = Self::zeroed();
        crate::reference::quantize_groups(x, Self::format(), bytemuck::bytes_of_mut(&mut block))?;
        Ok(block)
    }
    /// Reference dequantization into `out[..GROUP]`.
    fn dequantize(&self, out: &mut [f32]) {
        let p = self.params();
        for (i, o) in out[..Self::GROUP].iter_mut().enumerate() {
            *o = p.dequant(unpack_code(self.codes(), Self::BITS, i));
        }
    }
}

macro_rules! group_block {
    ($(#[$doc:meta])* $name:ident, $bits:expr, $group:expr, $size:expr) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
        pub struct $name {
            pub params: ScaleZero,
            pub qs: [u8; $group * $bits / 8],
        }
        const _: () = assert!(size_of::<$name>() == $size);
        impl GroupBlock for $name {
            const BITS: u32 = $bits;
            const GROUP: usize = $group;
            fn params(&self) -> ScaleZero {
                self.params
            }
            fn codes(&self) -> &[u8] {
                &self.qs
            }
        }
    };
}

group_block!(/// INT8, 32 values: 36 bytes (9 bits per element).
    BlockQ8G32, 8, 32, 36);
group_block!(/// INT8, 64 values: 68 bytes (8.5 bits per element).
    BlockQ8G64, 8, 64, 68);
group_block!(/// INT8, 128 values: 132 bytes (8.25 bits per element).
    BlockQ8G128, 8, 128, 132);
group_block!(/// INT4, 32 values: 20 bytes (5 bits per element).
    BlockQ4G32, 4, 32, 20);
group_block!(/// INT4, 64 values: 36 bytes (4.5 bits per element).
    BlockQ4G64, 4, 64, 36);
group_block!(/// INT4, 128 values: 68 bytes (4.25 bits per element).
    BlockQ4G128, 4, 128, 68);
group_block!(/// INT2, 32 values: 12 bytes (3 bits per element).
    BlockQ2G32, 2, 32, 12);
group_block!(/// INT2, 64 values: 20 bytes (2.5 bits per element).
    BlockQ2G64, 2, 64, 20);
group_block!(/// INT2, 128 values: 36 bytes (2.25 bits per element).
    BlockQ2G128, 2, 128, 36);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_validate() {
        assert_eq!(
            GroupFormat::new(3, 64),
            Err(QuantError::UnsupportedBits { bits: 3 })
        );
        assert_eq!(
            GroupFormat::new(4, 48),
            Err(QuantError::UnsupportedGroup { group: 48 })
        );
        let f = GroupFormat::new(4, 64).unwrap();
        assert_eq!(f.group_bytes(), size_of::<BlockQ4G64>());
        assert_eq!(f.bits_per_element(), 4.5);
        assert_eq!(GroupFormat::new(4, 32).unwrap().bits_per_element(), 5.0);
        assert_eq!(GroupFormat::new(4, 128).unwrap().bits_per_element(), 4.25);
        assert_eq!(
            BlockQ8G128::format().group_bytes(),
            size_of::<BlockQ8G128>()
        );
        assert_eq!(BlockQ2G32::format().group_bytes(), size_of::<BlockQ2G32>());
    }

    #[test]
    fn packing_round_trips() {
        for bits in [2u32, 4, 8] {
            for n in [32usize, 64, 128] {
                let codes: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
                let mut packed = vec![0u8; packed_len(n, bits)];
                pack_codes(&codes, bits, &mut packed);
                let mut back = vec![0u8; n];
                unpack_codes(&packed, bits, &mut back);
                assert_eq!(codes, back, "bits {bits} n {n}");
            }
        }
    }

    #[test]
    fn four_bit_packing_is_split_halves_per_chunk() {
        let codes: Vec<u8> = (0..64).map(|i| (i % 16) as u8).collect();
        let mut packed = [0u8; 32];
        pack_codes(&codes, 4, &mut packed);
        assert_eq!(packed[0], codes[0] | codes[16] << 4);
        assert_eq!(packed[5], codes[5] | codes[21] << 4);
        assert_eq!(packed[16], codes[32] | codes[48] << 4);
    }
}
