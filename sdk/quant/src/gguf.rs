//! A small GGUF reader (llama.cpp's file format, versions 2 and 3) with every length and
//! offset checked against the file, and the conversion of its Q8_0 / Q4_0 blocks into the
//! weight formats of [`crate::weight`] (both lossless).
//!
//! Layout: `"GGUF"`, version `u32`, tensor count `u64`, metadata count `u64`; the metadata
//! (`key: string`, `type: u32`, value); the tensor infos (`name: string`, `n_dims: u32`,
//! `dims: [u64; n_dims]` fastest first, `type: u32`, `offset: u64` into the data section);
//! the data section, starting at the next multiple of `general.alignment` (default 32).
//! Strings are a `u64` length and UTF-8 bytes; everything is little-endian.
//!
//! Blocks ([`BlockQ8_0`], [`BlockQ4_0`]) hold 32 weights along a row with an FP16 scale `d`:
//! Q8_0 `w = d * q` (`q: i8`) is [`WeightFormat`](crate::weight::WeightFormat) INT8 g32 as it stands; Q4_0
//! `w = d * (q - 8)` (`q` in `0..16`, byte `j` holds `q[j]` in its low nibble and `q[j + 16]`
//! in its high one, the packing of this crate) is INT4 g32 with `scale = d`,
//! `zero = -8 d` (exact in FP16).
//!
//! K-quants come in super-blocks of 256 weights along a row ([`BlockQ4K`], [`BlockQ6K`],
//! llama.cpp's `block_q4_K` / `block_q6_K`; the layouts of its `dequantize_row_q4_K` /
//! `dequantize_row_q6_K`):
//!
//! - Q4_K: FP16 `d` and `dmin`, 12 bytes of 6-bit sub-block scales `sc[j]` and mins `m[j]`
//!   (8 sub-blocks of 32), 128 bytes of 4-bit codes; `w = d sc[j] q - dmin m[j]`. It becomes
//!   INT4 g32 with `scale = fp16(d sc[j])`, `zero = fp16(-dmin m[j])` and the same codes
//!   (re-packed): the only change is rounding the two products to FP16, at most 2^-11 of
//!   each, so a weight moves by at most `2^-11 (15 |d sc[j]| + |dmin m[j]|)`, about 1/2048 of
//!   its group's range.
//! - Q6_K: 128 bytes of low 4 bits and 64 of high 2 bits of 6-bit codes, 16 signed 8-bit
//!   sub-block scales (sub-blocks of 16), FP16 `d`; `w = d scale[j] (q - 32)`. A group of 32
//!   spans two sub-blocks with different scales, so it becomes INT8 g32 by round-to-nearest
//!   from its exact values ([`crate::weight::quantize_row`]): a weight moves by at most half
//!   an INT8 step, 1/254 of its group's largest magnitude.

use crate::QuantError;
use crate::weight::QuantRow;
use half::f16;
use std::mem::size_of;

/// A Q8_0 block: 32 weights `d * qs[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// A Q4_0 block: 32 weights `d * (q - 8)`, two 4-bit codes per byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Weights in one K-quant super-block.
pub const QK_K: usize = 256;

/// A Q4_K super-block: 256 weights in 8 sub-blocks of 32, `w = d sc[j] q - dmin m[j]`
/// (`sc`, `m`: 6 bits each, packed in `scales`; see [`q4_k_scale_min`]); byte `l` of the 32
/// bytes of sub-block pair `p` holds code `l` of sub-block `2p` in its low nibble and code `l`
/// of sub-block `2p + 1` in its high one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// A Q6_K super-block: 256 weights in 16 sub-blocks of 16, `w = d scales[j] (q - 32)` with
/// 6-bit `q` (low 4 bits in `ql`, high 2 in `qh`; see [`q6_k_dequantize`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// Tensor element types this reader knows (ggml type ids), named as ggml names them.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
    Q4_K,
    Q6_K,
    BF16,
    /// Any other ggml type (K-quants, IQ formats, ...): listed, not converted.
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// Bytes of `n` elements (`None`: unknown type, or `n` not whole blocks, or overflow).
    pub fn bytes(self, n: u64) -> Option<u64> {
        match self {
            GgmlType::F32 => n.checked_mul(4),
            GgmlType::F16 | GgmlType::BF16 => n.checked_mul(2),
            GgmlType::Q8_0 if n.is_multiple_of(32) => (n / 32).checked_mul(34),
            GgmlType::Q4_0 if n.is_multiple_of(32) => (n / 32).checked_mul(18),
            GgmlType::Q4_K if n.is_multiple_of(QK_K as u64) => {
                (n / QK_K as u64).checked_mul(size_of::<BlockQ4K>() as u64)
            }
            GgmlType::Q6_K if n.is_multiple_of(QK_K as u64) => {
                (n / QK_K as u64).checked_mul(size_of::<BlockQ6K>() as u64)
            }
            _ => None,
        }
    }

    /// Weights per block of a block-quantized type (a row must be whole blocks); 1 otherwise.
    pub fn block_len(self) -> u64 {
        match self {
            GgmlType::Q4_0 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q6_K => QK_K as u64,
            _ => 1,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "ggml type {id}"),
            t => write!(f, "{t:?}"),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's entry: `dims` fastest first (a `[rows, cols]` matrix is `[cols, rows]`).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte range in the file (checked to lie inside it; empty for an unknown type).
    pub start: usize,
    pub len: usize,
}

/// A parsed GGUF file: metadata and tensor entries; the bytes stay with the caller.
#[derive(Clone, Debug, PartialEq)]
pub struct Gguf {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensor>,
}

/// An error reading a GGUF file: what is wrong and at which byte.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("GGUF: {msg} (at byte {offset})")]
pub struct GgufError {
    pub offset: usize,
    pub msg: String,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, GgufError> {
        Err(GgufError {
            offset: self.pos,
            msg: msg.into(),
        })
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        match self.pos.checked_add(n).filter(|&e| e <= self.b.len()) {
            Some(end) => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.err(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.b.len() - self.pos
            )),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or([0; 8]),
        ))
    }
    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(GgufError {
                offset: at,
                msg: format!(
                    "{what} {n} is more than the {left} bytes left can hold (truncated or corrupt file)"
                ),
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.count(what, 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError {
            offset: at,
            msg: format!("{what} is not UTF-8"),
        })
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        let b = |r: &mut Self, n: usize| -> Result<&'a [u8], GgufError> {
            r.take(n, "a metadata value")
        };
        Ok(match ty {
            0 => GgufValue::Int(b(self, 1)?[0] as i128),
            1 => GgufValue::Int(b(self, 1)?[0] as i8 as i128),
            2 => {
                let x = b(self, 2)?;
                GgufValue::Int(u16::from_le_bytes([x[0], x[1]]) as i128)
            }
            3 => {
                let x = b(self, 2)?;
                GgufValue::Int(i16::from_le_bytes([x[0], x[1]]) as i128)
            }
            4 => GgufValue::Int(self.u32("a metadata value")? as i128),
            5 => GgufValue::Int(self.u32("a metadata value")? as i32 as i128),
            6 => GgufValue::Float(f32::from_bits(self.u32("a metadata value")?) as f64),
            7 => GgufValue::Bool(b(self, 1)?[0] != 0),
            8 => GgufValue::Str(self.string("a metadata string length")?),
            9 => {
                if depth > 2 {
                    return self.err("metadata arrays nested too deeply");
                }
                let item = self.u32("an array's item type")?;
                let n = self.count("an array length", 1)?;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::Int(self.u64("a metadata value")? as i128),
            11 => GgufValue::Int(self.u64("a metadata value")? as i64 as i128),
            12 => GgufValue::Float(f64::from_bits(self.u64("a metadata value")?)),
            other => return self.err(format!("unknown metadata value type {other}")),
        })
    }
}

impl Gguf {
    /// Parses the header of `file` (the whole file's bytes): metadata and tensor entries,
    /// each tensor's byte range checked to lie inside the file.
    pub fn parse(file: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Reader { b: file, pos: 0 };
        if r.take(4, "the magic")? != b"GGUF" {
            return Err(GgufError {
                offset: 0,
                msg: "not a GGUF file (the first 4 bytes are not \"GGUF\")".into(),
            });
        }
        let version = r.u32("the version")?;
        if !matches!(version, 2 | 3) {
            return r.err(format!(
                "GGUF version {version} (this reader reads 2 and 3)"
            ));
        }
        let n_tensors = r.count("the tensor count", 24)?;
        let n_kv = r.count("the metadata count", 12)?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string("a metadata key length")?;
            let ty = r.u32("a metadata type")?;
            let v = r.value(ty, 0)?;
            metadata.push((key, v));
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let at = r.pos;
            let name = r.string("a tensor name length")?;
            let n_dims = r.u32("a tensor's dimension count")?;
            if !(1..=4).contains(&n_dims) {
                return Err(GgufError {
                    offset: at,
                    msg: format!("tensor `{name}`: {n_dims} dimensions (1 to 4 expected)"),
                });
            }
            let dims = (0..n_dims)
                .map(|_| r.u64("a tensor dimension"))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = GgmlType::from_id(r.u32("a tensor type")?);
            let offset = r.u64("a tensor offset")?;
            infos.push((at, name, dims, ty, offset));
        }
        let align = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => return r.err(format!("general.alignment {v:?} is not a power of two")),
            },
            None => 32,
        };
        let data = r.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(infos.len());
        for (at, name, dims, ty, offset) in infos {
            let bad = |msg: String| GgufError {
                offset: at,
                msg: format!("tensor `{name}`: {msg}"),
            };
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let (start, len) = match ty {
                GgmlType::Other(_) => (0, 0),
                _ => {
                    if !dims[0].is_multiple_of(ty.block_len()) {
                        return Err(bad(format!(
                            "{ty} rows of {} values are not whole blocks of {}",
                            dims[0],
                            ty.block_len()
                        )));
                    }
                    let len = ty
                        .bytes(n)
                        .ok_or_else(|| bad(format!("{ty} {dims:?} overflows")))?;
                    let start = (data as u64).checked_add(offset);
                    match start.and_then(|s| s.checked_add(len)) {
                        Some(end) if end <= file.len() as u64 && offset % align as u64 == 0 => {
                            (data + offset as usize, len as usize)
                        }
                        _ => {
                            return Err(bad(format!(
                                "data at offset {offset} ({len} bytes, alignment {align}) lies outside the {} bytes of data (truncated file?)",
                                file.len().saturating_sub(data)
                            )));
                        }
                    }
                }
            };
            tensors.push(GgufTensor {
                name,
                dims,
                ty,
                start,
                len,
            });
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Q8_0 blocks (`bytes`, whole blocks) as INT8 g32 codes and scales (no zeros): lossless.
pub fn q8_0_to_int8(bytes: &[u8]) -> Result<QuantRow, QuantError> {
    check_blocks("Q8_0", bytes, 34)?;
    let n = bytes.len() / 34;
    let (mut codes, mut scales) = (Vec::with_capacity(32 * n), Vec::with_capacity(n));
    for b in bytes.chunks_exact(34) {
        scales.push(f16::from_le_bytes([b[0], b[1]]));
        codes.extend_from_slice(&b[2..]);
    }
    Ok(QuantRow {
        codes,
        scales,
        zeros: Vec::new(),
    })
}

/// Q4_0 blocks as INT4 g32 codes, scales and zeros (`zero = -8 d`): lossless (the nibble
/// order of Q4_0 is this crate's).
pub fn q4_0_to_int4(bytes: &[u8]) -> Result<QuantRow, QuantError> {
    check_blocks("Q4_0", bytes, 18)?;
    let n = bytes.len() / 18;
    let (mut codes, mut scales, mut zeros) = (
        Vec::with_capacity(16 * n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for b in bytes.chunks_exact(18) {
        let d = f16::from_le_bytes([b[0], b[1]]);
        scales.push(d);
        zeros.push(f16::from_f32(-8.0 * d.to_f32()));
        codes.extend_from_slice(&b[2..]);
    }
    Ok(QuantRow {
        codes,
        scales,
        zeros,
    })
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block's 12 `scales`
/// bytes (llama.cpp's `get_scale_min_k4`).
pub fn q4_k_scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

/// A finite FP16 of `x`, or an error naming the super-block and what overflowed.
fn finite_f16(x: f32, op: &'static str, block: usize, what: &str) -> Result<f16, QuantError> {
    let h = f16::from_f32(x);
    if h.is_finite() {
        Ok(h)
    } else {
        Err(QuantError::Packed {
            op,
            msg: format!("super-block {block}: {what} {x} is not a finite FP16"),
        })
    }
}

/// Q4_K super-blocks (`bytes`, whole super-blocks) as INT4 g32 codes, scales and zeros: per
/// sub-block `scale = fp16(d sc)`, `zero = fp16(-dmin m)`, the codes re-packed (see the
/// module docs for the error of the two roundings). A non-finite `d`, `dmin` or product is
/// an error.
pub fn q4_k_to_int4(bytes: &[u8]) -> Result<QuantRow, QuantError> {
    const OP: &str = "Q4_K";
    let bs = size_of::<BlockQ4K>();
    check_blocks(OP, bytes, bs)?;
    let n = bytes.len() / bs;
    let (mut codes, mut scales, mut zeros) = (
        Vec::with_capacity(QK_K / 2 * n),
        Vec::with_capacity(8 * n),
        Vec::with_capacity(8 * n),
    );
    for (bi, b) in bytes.chunks_exact(bs).enumerate() {
        let (d, dmin) = (f16_at(b, 0).to_f32(), f16_at(b, 2).to_f32());
        let mut sm = [0u8; 12];
        sm.copy_from_slice(&b[4..16]);
        let qs = &b[16..bs];
        for j in 0..8 {
            let (sc, m) = q4_k_scale_min(j, &sm);
            scales.push(finite_f16(d * sc as f32, OP, bi, "d x scale")?);
            zeros.push(finite_f16(-dmin * m as f32, OP, bi, "dmin x min")?);
            let pair = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let code = |l: usize| {
                if j % 2 == 0 {
                    pair[l] & 0x0F
                } else {
                    pair[l] >> 4
                }
            };
            codes.extend((0..16).map(|i| code(i) | (code(i + 16) << 4)));
        }
    }
    Ok(QuantRow {
        codes,
        scales,
        zeros,
    })
}

/// Q6_K super-blocks (whole ones) dequantized into `out` (256 values each): llama.cpp's
/// `dequantize_row_q6_K`.
pub fn q6_k_dequantize(bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let bs = size_of::<BlockQ6K>();
    check_blocks("Q6_K", bytes, bs)?;
    let n = bytes.len() / bs;
    if out.len() != n * QK_K {
        return Err(QuantError::BufferSize {
            op: "Q6_K",
            got: out.len(),
            expected: n * QK_K,
        });
    }
    for (b, o) in bytes.chunks_exact(bs).zip(out.chunks_exact_mut(QK_K)) {
        let (ql, qh) = (&b[..128], &b[128..192]);
        let sc = |j: usize| b[192 + j] as i8 as f32;
        let d = f16_at(b, 208).to_f32();
        // Two halves of 128 weights; in each, weight 32 k + c (k < 4) takes its low 4 bits
        // from byte c (k even) or c + 32 (k odd) of the half's 64 `ql` bytes (low nibble for
        // k < 2, high for k >= 2) and its high 2 bits from bits 2k of `qh` byte c.
        for h in 0..2 {
            for k in 0..4 {
                for c in 0..32 {
                    let lo = (ql[64 * h + c + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
                    let hi = (qh[32 * h + c] >> (2 * k)) & 0x03;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    let e = 128 * h + 32 * k + c;
                    o[e] = d * sc(e / 16) * q as f32;
                }
            }
        }
    }
    Ok(())
}

/// Q6_K super-blocks as INT8 g32: dequantized, then quantized round-to-nearest in groups of
/// 32 (see the module docs for the error).
pub fn q6_k_to_int8(bytes: &[u8]) -> Result<QuantRow, QuantError> {
    let n = bytes.len() / size_of::<BlockQ6K>();
    let mut x = vec![0f32; n * QK_K];
    q6_k_dequantize(bytes, &mut x)?;
    crate::weight::quantize_row(&x, crate::weight::WeightFormat::new(8, 32)?)
}

/// The blocks of a quantized GGUF tensor (`ty` Q8_0, Q4_0, Q4_K or Q6_K) in this crate's
/// format that holds them (INT8 g32 for the 8- and 6-bit types, INT4 g32 for the 4-bit ones;
/// see the module docs for which are exact).
pub fn to_quant_row(
    ty: GgmlType,
    bytes: &[u8],
) -> Result<(crate::weight::WeightFormat, QuantRow), QuantError> {
    let (bits, row) = match ty {
        GgmlType::Q8_0 => (8, q8_0_to_int8(bytes)?),
        GgmlType::Q4_0 => (4, q4_0_to_int4(bytes)?),
        GgmlType::Q4_K => (4, q4_k_to_int4(bytes)?),
        GgmlType::Q6_K => (8, q6_k_to_int8(bytes)?),
        other => {
            return Err(QuantError::Packed {
                op: "GGUF conversion",
                msg: format!("{other} is not a block-quantized type"),
            });
        }
    };
    Ok((crate::weight::WeightFormat::new(bits, 32)?, row))
}

fn check_blocks(op: &'static str, bytes: &[u8], block: usize) -> Result<(), QuantError> {
    if bytes.len().is_multiple_of(block) {
        Ok(())
    } else {
        Err(QuantError::NotMultiple {
            op,
            len: bytes.len(),
            what: "block size",
            multiple: block,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::{WeightFormat, dequantize_row};

    /// A GGUF v3 file with one metadata string and the given tensors (name, dims, type id,
    /// data), data aligned to 32.
    pub(crate) fn write_gguf(tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let s = |out: &mut Vec<u8>, x: &str| {
            out.extend((x.len() as u64).to_le_bytes());
            out.extend(x.as_bytes());
        };
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend(1u64.to_le_bytes());
        s(&mut out, "general.architecture");
        out.extend(8u32.to_le_bytes());
        s(&mut out, "llama");
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            s(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }

    #[test]
    fn q4_0_and_q8_0_convert_exactly() {
        // One Q4_0 block: d = 0.5, q[i] = i % 16, packed low/high nibbles.
        let mut b4 = f16::from_f32(0.5).to_le_bytes().to_vec();
        b4.extend((0..16).map(|j| (j % 16) as u8 | ((((j + 16) % 16) as u8) << 4)));
        let QuantRow {
            codes: c,
            scales: s,
            zeros: z,
        } = q4_0_to_int4(&b4).unwrap();
        let mut back = vec![0f32; 32];
        dequantize_row(WeightFormat::new(4, 32).unwrap(), &c, &s, &z, &mut back);
        for (i, v) in back.iter().enumerate() {
            assert_eq!(*v, 0.5 * ((i % 16) as f32 - 8.0), "{i}");
        }
        let mut b8 = f16::from_f32(0.25).to_le_bytes().to_vec();
        b8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let QuantRow {
            codes: c,
            scales: s,
            ..
        } = q8_0_to_int8(&b8).unwrap();
        dequantize_row(WeightFormat::new(8, 32).unwrap(), &c, &s, &[], &mut back);
        for (i, v) in back.iter().enumerate() {
            assert_eq!(*v, 0.25 * (i as f32 - 16.0));
        }
        assert!(q8_0_to_int8(&b8[..33]).is_err());
    }

    /// A small deterministic generator for test blocks.
    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// Packs a Q4_K super-block the way llama.cpp's `quantize_row_q4_K_ref` lays it out.
    fn pack_q4_k(d: f32, dmin: f32, sc: [u8; 8], m: [u8; 8], q: &[u8; 256]) -> Vec<u8> {
        let mut b = f16::from_f32(d).to_le_bytes().to_vec();
        b.extend(f16::from_f32(dmin).to_le_bytes());
        let mut s = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                s[j] = sc[j];
                s[j + 4] = m[j];
            } else {
                s[j + 4] = (sc[j] & 0x0F) | ((m[j] & 0x0F) << 4);
                s[j - 4] |= (sc[j] >> 4) << 6;
                s[j] |= (m[j] >> 4) << 6;
            }
        }
        b.extend(s);
        for p in 0..4 {
            b.extend((0..32).map(|l| q[64 * p + l] | (q[64 * p + 32 + l] << 4)));
        }
        b
    }

    #[test]
    fn q4_k_converts_to_int4_within_the_fp16_rounding_of_its_scales() {
        let mut seed = 7u64;
        let fmt = WeightFormat::new(4, 32).unwrap();
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for blk in 0..3 {
            let (d, dmin) = (0.013 * (blk + 1) as f32, 0.007 * (blk + 1) as f32);
            let sc: [u8; 8] = std::array::from_fn(|_| (lcg(&mut seed) % 64) as u8);
            let m: [u8; 8] = std::array::from_fn(|_| (lcg(&mut seed) % 64) as u8);
            let q: [u8; 256] = std::array::from_fn(|_| (lcg(&mut seed) % 16) as u8);
            let b = pack_q4_k(d, dmin, sc, m, &q);
            assert_eq!(b.len(), size_of::<BlockQ4K>());
            let (d, dmin) = (
                f16::from_f32(d).to_f32() as f64,
                f16::from_f32(dmin).to_f32() as f64,
            );
            for (i, &qi) in q.iter().enumerate() {
                let j = i / 32;
                want.push(d * sc[j] as f64 * qi as f64 - dmin * m[j] as f64);
            }
            bytes.extend(b);
        }
        let row = q4_k_to_int4(&bytes).unwrap();
        assert_eq!(row.scales.len(), 24);
        let mut got = vec![0f32; want.len()];
        dequantize_row(fmt, &row.codes, &row.scales, &row.zeros, &mut got);
        for (g, w) in want.chunks(32).zip(got.chunks(32)) {
            let range = g.iter().fold(0f64, |a, v| a.max(v.abs()));
            for (a, b) in g.iter().zip(w) {
                // 2^-11 of 15 d sc + dmin m, each below the group's magnitude x 2.
                assert!(
                    (a - *b as f64).abs() <= range * 2.0 / 2048.0 + 1e-6,
                    "{a} {b}"
                );
            }
        }
        // A truncated super-block, and an infinite d, are errors.
        assert!(q4_k_to_int4(&bytes[..143]).is_err());
        let mut inf = bytes.clone();
        inf[..2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        let e = q4_k_to_int4(&inf).unwrap_err().to_string();
        assert!(e.contains("super-block 0") && e.contains("finite"), "{e}");
    }

    #[test]
    fn q6_k_dequantizes_exactly_and_converts_to_int8_within_half_a_step() {
        let mut seed = 11u64;
        let q: [u8; 256] = std::array::from_fn(|_| (lcg(&mut seed) % 64) as u8);
        let sc: [i8; 16] = std::array::from_fn(|_| (lcg(&mut seed) % 255) as i32 as i8);
        let d = 0.003f32;
        // llama.cpp's packing: in each half of 128, weight 32k + c's low nibble goes to byte
        // c + 32 (k % 2) of the half's `ql` (high nibble when k >= 2), its top 2 bits to bits
        // 2k of `qh` byte c.
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for h in 0..2 {
            for k in 0..4 {
                for c in 0..32 {
                    let v = q[128 * h + 32 * k + c];
                    ql[64 * h + c + 32 * (k % 2)] |= (v & 0x0F) << (4 * (k / 2));
                    qh[32 * h + c] |= (v >> 4) << (2 * k);
                }
            }
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(sc.iter().map(|&x| x as u8));
        b.extend(f16::from_f32(d).to_le_bytes());
        assert_eq!(b.len(), size_of::<BlockQ6K>());
        let d = f16::from_f32(d).to_f32();
        let want: Vec<f32> = (0..256)
            .map(|e| d * sc[e / 16] as f32 * (q[e] as i32 - 32) as f32)
            .collect();
        let mut got = vec![0f32; 256];
        q6_k_dequantize(&b, &mut got).unwrap();
        assert_eq!(got, want);
        let (fmt, row) = to_quant_row(GgmlType::Q6_K, &b).unwrap();
        assert_eq!((fmt.bits(), fmt.group()), (8, 32));
        dequantize_row(fmt, &row.codes, &row.scales, &[], &mut got);
        for (g, w) in want.chunks(32).zip(got.chunks(32)) {
            let amax = g.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= amax / 254.0 * 1.01 + 1e-7, "{a} {b}");
            }
        }
        assert!(q6_k_dequantize(&b[..209], &mut got).is_err());
    }

    #[test]
    fn parses_and_checks_bounds() {
        let q8 = vec![0u8; 34 * 2];
        let f = write_gguf(&[("w", vec![32, 2], 8, q8), ("n", vec![4], 0, vec![0; 16])]);
        let g = Gguf::parse(&f).unwrap();
        assert_eq!(
            g.get("general.architecture").and_then(|v| v.as_str()),
            Some("llama")
        );
        let w = g.tensor("w").unwrap();
        assert_eq!(
            (w.ty, w.len, w.dims.clone()),
            (GgmlType::Q8_0, 68, vec![32, 2])
        );
        assert_eq!(g.tensor("n").unwrap().len, 16);
        // Every truncation is an error, never a panic.
        for cut in 0..f.len() - 16 {
            assert!(Gguf::parse(&f[..cut]).is_err(), "cut at {cut}");
        }
        // A tensor count no file could hold.
        let mut huge = f.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Gguf::parse(&huge).unwrap_err();
        assert!(e.msg.contains("tensor count"), "{e}");
        // Rows that are not whole blocks.
        let f = write_gguf(&[("w", vec![48, 1], 2, vec![0; 27])]);
        let e = Gguf::parse(&f).unwrap_err();
        assert!(
            e.msg.contains("tensor `w`") && e.msg.contains("blocks of 32"),
            "{e}"
        );
        // K-quant rows must be whole super-blocks of 256; a Q4_K tensor whose data the file
        // does not hold is truncated.
        let f = write_gguf(&[("w", vec![128, 2], 12, vec![0; 144])]);
        let e = Gguf::parse(&f).unwrap_err();
        assert!(
            e.msg.contains("Q4_K") && e.msg.contains("blocks of 256"),
            "{e}"
        );
        let f = write_gguf(&[("w", vec![256, 2], 12, vec![0; 144])]);
        let e = Gguf::parse(&f[..f.len() - 100]).unwrap_err();
        assert!(
            e.msg.contains("tensor `w`") && e.msg.contains("outside"),
            "{e}"
        );
        let f = write_gguf(&[("w", vec![256, 1], 14, vec![0; 210])]);
        assert_eq!(Gguf::parse(&f).unwrap().tensor("w").unwrap().len, 210);
        assert!(
            Gguf::parse(b"GGML\x03\0\0\0")
                .unwrap_err()
                .msg
                .contains("not a GGUF")
        );
    }
}
