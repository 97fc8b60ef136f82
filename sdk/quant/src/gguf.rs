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

/// Tensor element types this reader knows (ggml type ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
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
            _ => None,
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
                    if !dims[0].is_multiple_of(32) && matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0)
                    {
                        return Err(bad(format!(
                            "{ty} rows of {} values are not whole blocks of 32",
                            dims[0]
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
        assert!(
            Gguf::parse(b"GGML\x03\0\0\0")
                .unwrap_err()
                .msg
                .contains("not a GGUF")
        );
    }
}
