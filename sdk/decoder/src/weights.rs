//! Memory-mapped safetensors weights: a single `model.safetensors`, a sharded set named by
//! `model.safetensors.index.json`, or every `*.safetensors` in the directory.
//!
//! Tensors stay in their stored type (F32, F16, BF16) inside the mapping; nothing is copied
//! unless a tensor's data is misaligned for its type or a conversion is requested.
//!
//! A weight matrix `<stem>.weight` may instead be stored quantized by `jetvlm quantize`
//! (formats of [`jetvlm_quant::weight`]): `<stem>.qweight` (INT8: I8 `[rows, cols]`; INT4:
//! U8 `[rows, cols / 2]`, two codes per byte), `<stem>.scales` (F16 `[rows, cols / group]`)
//! and, for INT4, `<stem>.zeros` (F16, same shape). [`Weights::get`] of `<stem>.weight`
//! then returns the quantized matrix (its [`TensorData::Quant`] view), still memory-mapped.

use crate::error::{DecoderError, Result};
use half::{bf16, f16};
use jetvlm_core::DType;
use jetvlm_quant::WeightFormat;
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of one tensor: a range of a mapped file, or an owned, 4-byte aligned copy.
#[derive(Clone)]
enum Bytes {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned {
        words: Arc<Vec<u32>>,
        len: usize,
    },
    /// A range of a page-backed buffer shared by several tensors ([`hold_in_huge_pages`]).
    Paged {
        buf: Arc<jetvlm_core::mem::PageBuffer>,
        start: usize,
        len: usize,
    },
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned { words, len } => &bytemuck::cast_slice::<u32, u8>(words)[..*len],
            Bytes::Paged { buf, start, len } => &buf.bytes()[*start..*start + *len],
        }
    }

    fn owned(bytes: &[u8]) -> Self {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Bytes::Owned {
            words: Arc::new(words),
            len: bytes.len(),
        }
    }
}

/// Moves the matrices among `tensors` into one page-backed buffer advised as 2 MiB
/// transparent huge pages (each part 64-byte aligned): with `band` (where the AVX-512 VNNI
/// kernel runs) every quantized matrix that the banded layout covers in that layout
/// ([`QuantData::banded`], [`Tensor::banded`]), every other matrix (float, or quantized
/// without `band`) as it is stored; tensors of other ranks, and matrices already in such a
/// buffer, stay as they are. A decode step streams every matrix once: on 4 KiB pages it
/// takes a TLB miss, and the hardware prefetcher starts over, every 4 KiB. Each matrix is
/// copied (banded) straight from the file's mapping (or its owned copy) into the buffer,
/// whose pages are committed as they are written, and its old storage is then released
/// (mapped pages: [`Tensor::release_mapping`]; an owned copy is freed), so moving holds one
/// copy plus the matrix being copied.
pub fn hold_in_huge_pages<'t>(tensors: impl Iterator<Item = &'t mut Tensor>, band: bool) {
    let mut tensors: Vec<&mut Tensor> = tensors
        .filter(|t| {
            (band && t.bandable())
                || (t.shape.len() == 2 && !matches!(t.bytes, Bytes::Paged { .. }))
        })
        .collect();
    let banded: Vec<bool> = tensors.iter().map(|t| band && t.bandable()).collect();
    // Where each one's bytes (codes), scales and zeros (none for INT8 and floats) lie in
    // the buffer: (start, len), every part 64-byte aligned.
    let mut total = 0;
    let spans: Vec<[(usize, usize); 3]> = tensors
        .iter()
        .map(|t| {
            let lens = match t.data() {
                TensorData::Quant(q) => [q.codes.len(), 2 * q.scales.len(), 2 * q.zeros.len()],
                _ => [t.bytes.as_slice().len(), 0, 0],
            };
            lens.map(|n| {
                let start = total;
                total += n.next_multiple_of(64);
                (start, n)
            })
        })
        .collect();
    if total == 0 {
        return;
    }
    let mut buf = jetvlm_core::mem::PageBuffer::zeroed(total);
    let bytes = buf.bytes_mut();
    for ((t, [c, sc, z]), &to_band) in tensors.iter_mut().zip(&spans).zip(&banded) {
        // The three parts in order, disjoint: split at the scales' and the zeros' starts.
        let (head, tail) = bytes.split_at_mut(sc.0);
        let (scales, zeros) = tail.split_at_mut(z.0 - sc.0);
        if to_band {
            t.band_into(
                &mut head[c.0..c.0 + c.1],
                bytemuck::cast_slice_mut(&mut scales[..sc.1]),
                bytemuck::cast_slice_mut(&mut zeros[..z.1]),
            );
        } else {
            head[c.0..c.0 + c.1].copy_from_slice(t.bytes.as_slice());
            if let Some(q) = t.quant.as_ref() {
                scales[..sc.1].copy_from_slice(q.scales.as_slice());
                if let Some(zs) = &q.zeros {
                    zeros[..z.1].copy_from_slice(zs.as_slice());
                }
            }
        }
        t.release_mapping();
        // An owned copy is freed now (the buffer takes its place below), not at the end.
        let empty = || Bytes::owned(&[]);
        t.bytes = empty();
        if let Some(q) = t.quant.as_mut() {
            q.scales = empty();
            q.zeros = q.zeros.as_ref().map(|_| empty());
        }
    }
    let buf = Arc::new(buf);
    let paged = |(start, len): (usize, usize)| Bytes::Paged {
        buf: buf.clone(),
        start,
        len,
    };
    for ((t, [c, sc, z]), &to_band) in tensors.iter_mut().zip(&spans).zip(&banded) {
        t.bytes = paged(*c);
        if let Some(q) = t.quant.as_mut() {
            q.scales = paged(*sc);
            if q.zeros.is_some() {
                q.zeros = Some(paged(*z));
            }
            q.banded = to_band;
        }
    }
}

/// One tensor in its stored element type, row-major.
#[derive(Clone)]
pub struct Tensor {
    name: String,
    path: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Bytes,
    /// Scales and zeros of a quantized matrix (`bytes` then holds its codes).
    quant: Option<QuantParts>,
}

/// The group parameters of a quantized matrix.
#[derive(Clone)]
struct QuantParts {
    format: WeightFormat,
    scales: Bytes,
    zeros: Option<Bytes>,
    /// The banded layout ([`QuantData::banded`]).
    banded: bool,
}

/// A typed view of a tensor's elements.
#[derive(Clone, Copy, Debug)]
pub enum TensorData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// A weight-only quantized matrix (INT8 or INT4 groups along each row).
    Quant(QuantData<'a>),
}

/// Rows per band of the banded layout ([`QuantData::banded`]).
pub const BAND: usize = 16;

/// A quantized `[rows, cols]` matrix, `groups = cols / group` parameters per row.
///
/// Row-major (`banded == false`, the file layout): row `r`'s codes are
/// `codes[r * code_bytes_per_row(cols)..]`, its group parameters `scales[r * groups..]` and
/// (INT4) `zeros[r * groups..]`.
///
/// Banded (`banded == true`, the CPU decoder's layout where the AVX-512 VNNI kernel runs,
/// made by [`Tensor::banded`]): the same bytes, rows interleaved in bands of [`BAND`] so
/// that one 64-byte vector holds 4 code bytes of each of 16 rows: code bytes `4 c..4 c + 4`
/// of row `r` at `(r / 16) * 16 * row_bytes + c * 64 + (r % 16) * 4`, INT8 codes stored
/// offset to unsigned (`code ^ 0x80`); parameter `g` of row `r` at
/// `(r / 16) * 16 * groups + g * 16 + r % 16`. The kernel then multiplies 4 codes of 16
/// rows by 4 values of `x` per instruction and scales 16 rows' sums per vector.
#[derive(Clone, Copy, Debug)]
pub struct QuantData<'a> {
    pub format: WeightFormat,
    pub cols: usize,
    pub codes: &'a [u8],
    pub scales: &'a [f16],
    /// Empty for INT8 (symmetric).
    pub zeros: &'a [f16],
    /// The banded layout (see above) instead of row-major.
    pub banded: bool,
}

/// Scratch for [`QuantData::row_into`]: one row of a banded matrix in row-major form.
#[derive(Clone, Debug, Default)]
pub struct RowBuf {
    codes: Vec<u8>,
    scales: Vec<f16>,
    zeros: Vec<f16>,
}

/// Offset of code bytes `4 c..4 c + 4` of row `r` in the banded layout (`row_bytes` a
/// multiple of 4).
#[inline(always)]
pub(crate) fn band_code_offset(row_bytes: usize, r: usize, c: usize) -> usize {
    (r / BAND) * BAND * row_bytes + c * 4 * BAND + (r % BAND) * 4
}

/// Index of group parameter `g` of row `r` in the banded layout.
#[inline(always)]
pub(crate) fn band_param_index(groups: usize, r: usize, g: usize) -> usize {
    (r / BAND) * BAND * groups + g * BAND + r % BAND
}

impl QuantData<'_> {
    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.scales.len() / self.format.groups_per_row(self.cols)
    }

    /// Codes, scales and zeros of row `r` in the row-major form (of a banded matrix:
    /// gathered into `buf`).
    pub fn row_into<'s>(
        &'s self,
        r: usize,
        buf: &'s mut RowBuf,
    ) -> (&'s [u8], &'s [f16], &'s [f16]) {
        if !self.banded {
            return self.row(r);
        }
        let rb = self.format.code_bytes_per_row(self.cols);
        let g = self.format.groups_per_row(self.cols);
        let flip = if self.format.bits() == 8 { 0x80 } else { 0 };
        buf.codes.clear();
        for c in 0..rb / 4 {
            let o = band_code_offset(rb, r, c);
            buf.codes
                .extend(self.codes[o..o + 4].iter().map(|&b| b ^ flip));
        }
        buf.scales.clear();
        buf.scales
            .extend((0..g).map(|k| self.scales[band_param_index(g, r, k)]));
        buf.zeros.clear();
        if !self.zeros.is_empty() {
            buf.zeros
                .extend((0..g).map(|k| self.zeros[band_param_index(g, r, k)]));
        }
        (&buf.codes, &buf.scales, &buf.zeros)
    }

    /// Codes, scales and zeros of row `r` of a row-major matrix ([`Self::row_into`] reads
    /// either layout).
    #[inline]
    pub fn row(&self, r: usize) -> (&[u8], &[f16], &[f16]) {
        assert!(!self.banded, "row() of a banded matrix (row_into reads it)");
        let cb = self.format.code_bytes_per_row(self.cols);
        let g = self.format.groups_per_row(self.cols);
        let zeros = if self.zeros.is_empty() {
            &[][..]
        } else {
            &self.zeros[r * g..(r + 1) * g]
        };
        (
            &self.codes[r * cb..(r + 1) * cb],
            &self.scales[r * g..(r + 1) * g],
            zeros,
        )
    }

    /// Element `i` (row-major) dequantized. A banded matrix gathers only the 32-code block
    /// holding it (4 or 8 code bytes of its row at a time), not the row.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        let (r, c) = (i / self.cols, i % self.cols);
        let g = c / self.format.group();
        let groups = self.format.groups_per_row(self.cols);
        let rb = self.format.code_bytes_per_row(self.cols);
        let (p, code) = if self.banded {
            // Bytes of one 32-code block; the block's bytes are whole 4-byte chunks.
            let bb = self.format.code_bytes_per_row(32);
            let flip = if self.format.bits() == 8 { 0x80 } else { 0 };
            let mut block = [0u8; 32];
            for (j, four) in block[..bb].chunks_exact_mut(4).enumerate() {
                let o = band_code_offset(rb, r, (c / 32) * bb / 4 + j);
                for (d, &b) in four.iter_mut().zip(&self.codes[o..o + 4]) {
                    *d = b ^ flip;
                }
            }
            (
                band_param_index(groups, r, g),
                jetvlm_quant::unpack_code(&block[..bb], self.format.bits(), c % 32),
            )
        } else {
            (
                r * groups + g,
                jetvlm_quant::unpack_code(&self.codes[r * rb..(r + 1) * rb], self.format.bits(), c),
            )
        };
        let s = self.scales[p].to_f32();
        if self.format.bits() == 8 {
            s * code as i8 as f32
        } else {
            self.zeros[p].to_f32() + s * code as f32
        }
    }
}

impl TensorData<'_> {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(s) => s.len(),
            TensorData::F16(s) => s.len(),
            TensorData::BF16(s) => s.len(),
            TensorData::Quant(q) => q.rows() * q.cols,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            TensorData::F32(s) => s[i],
            TensorData::F16(s) => s[i].to_f32(),
            TensorData::BF16(s) => s[i].to_f32(),
            TensorData::Quant(q) => q.get(i),
        }
    }

    /// Elements `range` converted to f32 into `out`.
    pub fn to_f32_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            TensorData::F32(s) => out.copy_from_slice(&s[start..start + n]),
            TensorData::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
            TensorData::BF16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
            TensorData::Quant(q) => {
                let cols = q.cols;
                if start.is_multiple_of(cols) && n.is_multiple_of(cols) {
                    for (j, o) in out.chunks_exact_mut(cols).enumerate() {
                        crate::qkernels::dequantize_row(q, start / cols + j, o);
                    }
                } else {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = q.get(start + j);
                    }
                }
            }
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::Quant(q) if q.format.bits() == 8 => DType::I8,
            TensorData::Quant(_) => DType::U8,
        }
    }
}

impl Tensor {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the tensor was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the stored elements (a quantized matrix: codes, scales and zeros).
    pub fn size_bytes(&self) -> usize {
        match &self.quant {
            Some(q) => q.format.matrix_bytes(self.shape[0], self.shape[1]),
            None => self.numel() * self.dtype.size_bytes(),
        }
    }

    /// Bytes of the buffers holding the tensor, measured on them (the mapped ranges or owned
    /// copies of its elements, or of a quantized matrix's codes, scales and zeros).
    pub fn held_bytes(&self) -> usize {
        self.bytes.as_slice().len()
            + self.quant.as_ref().map_or(0, |q| {
                q.scales.as_slice().len() + q.zeros.as_ref().map_or(0, |z| z.as_slice().len())
            })
    }

    /// The weight format of a quantized matrix; `None` for a float tensor.
    pub fn quant_format(&self) -> Option<WeightFormat> {
        self.quant.as_ref().map(|q| q.format)
    }

    /// The elements in their stored type. Alignment was checked (or fixed by a copy) when
    /// the tensor was opened.
    pub fn data(&self) -> TensorData<'_> {
        let b = self.bytes.as_slice();
        if let Some(q) = &self.quant {
            return TensorData::Quant(QuantData {
                format: q.format,
                cols: self.shape[1],
                codes: b,
                scales: bytemuck::cast_slice(q.scales.as_slice()),
                zeros: q
                    .zeros
                    .as_ref()
                    .map_or(&[][..], |z| bytemuck::cast_slice(z.as_slice())),
                banded: q.banded,
            });
        }
        match self.dtype {
            DType::F16 => TensorData::F16(bytemuck::cast_slice(b)),
            DType::BF16 => TensorData::BF16(bytemuck::cast_slice(b)),
            _ => TensorData::F32(bytemuck::cast_slice(b)),
        }
    }

    /// The first element that is NaN or infinite, with its index; `None` when every element
    /// is finite. A quantized matrix is checked on its dequantized values (a bad scale shows).
    /// Reads the tensor a row at a time.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        let n = self.numel();
        let row = self.shape.last().copied().unwrap_or(n).clamp(1, n.max(1));
        let data = self.data();
        let mut buf = vec![0f32; row];
        let mut start = 0;
        while start < n {
            let len = row.min(n - start);
            data.to_f32_into(start, &mut buf[..len]);
            if let Some(i) = buf[..len].iter().position(|v| !v.is_finite()) {
                return Some((start + i, buf[i]));
            }
            start += len;
        }
        None
    }

    /// An error naming this tensor when one of its elements is NaN or infinite.
    pub fn check_finite(&self) -> Result<()> {
        match self.first_non_finite() {
            None => Ok(()),
            Some((index, value)) => Err(DecoderError::NonFiniteWeight {
                name: self.name.clone(),
                path: self.path.clone(),
                index,
                value,
            }),
        }
    }

    /// All elements as f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.data().to_f32_into(0, &mut out);
        out
    }

    /// The same tensor converted to `dtype` (an owned copy; no-op when already `dtype`). A
    /// quantized matrix is dequantized.
    pub fn converted(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype && self.quant.is_none() {
            return Ok(self.clone());
        }
        let vals = self.to_f32_vec();
        let bytes = match dtype {
            DType::F32 => Bytes::owned(bytemuck::cast_slice(&vals)),
            DType::F16 => {
                let v: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
                Bytes::owned(bytemuck::cast_slice(&v))
            }
            DType::BF16 => {
                let v: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
                Bytes::owned(bytemuck::cast_slice(&v))
            }
            other => {
                return Err(DecoderError::DType {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    dtype: format!("conversion to {other}"),
                });
            }
        };
        Ok(Tensor {
            dtype,
            bytes,
            quant: None,
            ..self.clone()
        })
    }

    /// `f` applied to every value, as an owned f32 tensor of the same name, file and shape
    /// (a weight stored as `w` and applied as `1 + w`, as Gemma's RMSNorm does).
    pub fn map_f32(&self, f: impl Fn(f32) -> f32) -> Tensor {
        let values: Vec<f32> = self.to_f32_vec().into_iter().map(f).collect();
        Tensor {
            path: self.path.clone(),
            ..Tensor::from_f32(&self.name, self.shape.clone(), &values)
        }
    }

    /// Builds an owned f32 tensor (tests, synthetic weights).
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            name: name.to_string(),
            path: PathBuf::from("<memory>"),
            dtype: DType::F32,
            shape,
            bytes: Bytes::owned(bytemuck::cast_slice(values)),
            quant: None,
        }
    }

    /// Builds an owned quantized matrix `[rows, cols]` from its codes and group parameters
    /// (tests, the quantizer). The lengths must match the format (checked).
    pub fn quantized(
        name: &str,
        format: WeightFormat,
        shape: [usize; 2],
        codes: &[u8],
        scales: &[f16],
        zeros: &[f16],
    ) -> Result<Tensor> {
        let [rows, cols] = shape;
        let groups = rows * (cols / format.group());
        let ok = format.check_cols(cols).is_ok()
            && codes.len() == rows * format.code_bytes_per_row(cols)
            && scales.len() == groups
            && zeros.len() == if format.has_zeros() { groups } else { 0 };
        if !ok {
            return Err(DecoderError::Quantized {
                name: name.to_string(),
                path: PathBuf::from("<memory>"),
                msg: format!(
                    "{} code bytes, {} scales, {} zeros do not make a {rows}x{cols} matrix of {format:?}",
                    codes.len(),
                    scales.len(),
                    zeros.len()
                ),
            });
        }
        Ok(Tensor {
            name: name.to_string(),
            path: PathBuf::from("<memory>"),
            dtype: if format.bits() == 8 {
                DType::I8
            } else {
                DType::U8
            },
            shape: shape.to_vec(),
            bytes: Bytes::owned(codes),
            quant: Some(QuantParts {
                format,
                scales: Bytes::owned(bytemuck::cast_slice(scales)),
                zeros: format
                    .has_zeros()
                    .then(|| Bytes::owned(bytemuck::cast_slice(zeros))),
                banded: false,
            }),
        })
    }

    /// Whether this is a row-major quantized matrix the banded layout covers
    /// ([`QuantData::banded`]: rows a multiple of [`BAND`], a row of codes a multiple of 4
    /// bytes).
    fn bandable(&self) -> bool {
        let Some(q) = self.quant.as_ref() else {
            return false;
        };
        let (rows, cols) = (self.shape[0], self.shape[1]);
        !q.banded
            && rows > 0
            && rows.is_multiple_of(BAND)
            && q.format.code_bytes_per_row(cols).is_multiple_of(4)
    }

    /// Writes this (bandable) matrix's codes, scales and zeros in the banded layout into
    /// buffers of the same sizes.
    fn band_into(&self, codes: &mut [u8], scales: &mut [f16], zeros: &mut [f16]) {
        let TensorData::Quant(d) = self.data() else {
            unreachable!("bandable tensors are quantized")
        };
        let (rows, cols) = (d.rows(), d.cols);
        let rb = d.format.code_bytes_per_row(cols);
        let groups = d.format.groups_per_row(cols);
        let flip = if d.format.bits() == 8 { 0x80 } else { 0 };
        for r in 0..rows {
            let (c, s, z) = d.row(r);
            for (k, four) in c.chunks_exact(4).enumerate() {
                let o = band_code_offset(rb, r, k);
                for (dst, &b) in codes[o..o + 4].iter_mut().zip(four) {
                    *dst = b ^ flip;
                }
            }
            for k in 0..groups {
                scales[band_param_index(groups, r, k)] = s[k];
                if !z.is_empty() {
                    zeros[band_param_index(groups, r, k)] = z[k];
                }
            }
        }
    }

    /// This quantized matrix in the banded layout ([`QuantData::banded`]): an owned copy of
    /// the same size. `None` for a float tensor, one already banded, or a shape the layout
    /// does not cover (rows not a multiple of [`BAND`], a row of codes not a multiple of 4
    /// bytes). The CPU decoder bands its matrices with [`hold_in_huge_pages`].
    pub fn banded(&self) -> Option<Tensor> {
        if !self.bandable() {
            return None;
        }
        let q = self.quant.as_ref()?;
        let TensorData::Quant(d) = self.data() else {
            return None;
        };
        let mut codes = vec![0u8; d.codes.len()];
        let mut scales = vec![f16::ZERO; d.scales.len()];
        let mut zeros = vec![f16::ZERO; d.zeros.len()];
        self.band_into(&mut codes, &mut scales, &mut zeros);
        Some(Tensor {
            bytes: Bytes::owned(&codes),
            quant: Some(QuantParts {
                format: q.format,
                scales: Bytes::owned(bytemuck::cast_slice(&scales)),
                zeros: q
                    .zeros
                    .as_ref()
                    .map(|_| Bytes::owned(bytemuck::cast_slice(&zeros))),
                banded: true,
            }),
            ..self.clone()
        })
    }

    /// Lets the kernel drop this tensor's pages of a memory-mapped file from the process
    /// (`MADV_DONTNEED`; they stay in the page cache and fault back in if read again) once
    /// an owned copy replaced it, so that loading does not hold both. Owned buffers are kept.
    pub fn release_mapping(&self) {
        let parts = std::iter::once(&self.bytes).chain(
            self.quant
                .iter()
                .flat_map(|q| std::iter::once(&q.scales).chain(q.zeros.as_ref())),
        );
        for b in parts {
            if let Bytes::Mapped { map, start, len } = b {
                // SAFETY: the mapping is read-only and file-backed: dropped pages are read
                // from the file again on the next access, with the same contents.
                #[cfg(unix)]
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *start, *len)
                };
            }
        }
    }
}

struct Entry {
    file: usize,
    /// `false` for a dtype the decoder never reads (recorded so that reading it is an error
    /// naming the tensor).
    known: bool,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    len: usize,
}

/// The weight files of one model directory, memory-mapped, with a name -> tensor table.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    table: HashMap<String, Entry>,
}

impl Weights {
    /// Opens the weights of a Hugging Face model directory. Headers are validated here (a
    /// truncated file or a shard missing from the index is an error naming the file); the
    /// tensor data is touched only when the model reads it.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shard_names: Vec<PathBuf> = Vec::new();
        let mut expected: HashMap<String, PathBuf> = HashMap::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| DecoderError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| DecoderError::Index {
                    path: index.clone(),
                    msg: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| DecoderError::Index {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| DecoderError::Index {
                    path: index.clone(),
                    msg: format!("weight_map[`{name}`] is not a file name"),
                })?;
                let p = dir.join(file);
                if !shard_names.contains(&p) {
                    shard_names.push(p.clone());
                }
                expected.insert(name.clone(), p);
            }
            for p in &shard_names {
                if !p.is_file() {
                    let tensor = expected
                        .iter()
                        .find(|(_, f)| *f == p)
                        .map(|(n, _)| n.clone())
                        .unwrap_or_default();
                    return Err(DecoderError::Index {
                        path: index.clone(),
                        msg: format!(
                            "shard {} (holding `{tensor}` among others) does not exist",
                            p.display()
                        ),
                    });
                }
            }
        } else if single.is_file() {
            shard_names.push(single);
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| DecoderError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    shard_names.push(p);
                }
            }
            shard_names.sort();
        }
        if shard_names.is_empty() {
            return Err(DecoderError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }

        let mut files = Vec::new();
        let mut table = HashMap::new();
        for (fi, path) in shard_names.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| DecoderError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only; a file modified while mapped is outside the
            // contract of model directories (the same as every mmap-based loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|source| DecoderError::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&map).map_err(|e| DecoderError::Safetensors {
                path: path.clone(),
                msg: diagnose_header(&map).unwrap_or_else(|| describe(&e)),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    // Codes of quantized matrices.
                    safetensors::Dtype::I8 => DType::I8,
                    safetensors::Dtype::U8 => DType::U8,
                    other => {
                        // Recorded as unsupported; an error only if the model reads it.
                        tracing::debug!(
                            tensor = name,
                            ?other,
                            "skipping tensor of unsupported dtype"
                        );
                        table.insert(
                            name,
                            Entry {
                                file: fi,
                                known: false,
                                dtype: DType::U8,
                                shape: view.shape().to_vec(),
                                start: 0,
                                len: 0,
                            },
                        );
                        continue;
                    }
                };
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                table.insert(
                    name,
                    Entry {
                        file: fi,
                        known: true,
                        dtype,
                        shape: view.shape().to_vec(),
                        start,
                        len: data.len(),
                    },
                );
            }
            drop(st);
            files.push((path, Arc::new(map)));
        }
        for (name, p) in &expected {
            if !table.contains_key(name) {
                return Err(DecoderError::Index {
                    path: index.clone(),
                    msg: format!(
                        "tensor `{name}` is listed in shard {} but absent from it",
                        p.display()
                    ),
                });
            }
        }
        let weights = Weights {
            dir: dir.to_path_buf(),
            files,
            table,
        };
        weights.check_declared_dtype(&dir.join("config.json"))?;
        Ok(weights)
    }

    /// When `config` (the directory's `config.json`) declares a dtype (`dtype` or
    /// `torch_dtype`, top level or under `text_config`), the embedding table must be stored
    /// in it: the decoder runs in the embedding's type and the memory planner charges the
    /// declared one, so a contradiction would make every plan wrong. A config without a
    /// dtype, one that does not parse (reported by [`crate::Config`]), or weights without an
    /// embedding table are not checked here.
    pub fn check_declared_dtype(&self, config: &Path) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(config) else {
            return Ok(());
        };
        let Ok(raw) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Ok(());
        };
        let nested = raw.get("text_config").filter(|t| t.is_object());
        let declared = ["dtype", "torch_dtype"].iter().find_map(|key| {
            let (prefix, v) = match nested.and_then(|t| t.get(*key)).filter(|v| v.is_string()) {
                Some(v) => ("text_config.", v),
                None => ("", raw.get(*key).filter(|v| v.is_string())?),
            };
            let name = v.as_str()?;
            Some((format!("{prefix}{key}"), DType::from_hf_name(name)?))
        });
        let Some((field, dtype)) = declared else {
            return Ok(());
        };
        let mut names: Vec<&String> = self
            .table
            .keys()
            .filter(|n| n.ends_with("embed_tokens.weight"))
            .collect();
        names.sort();
        let Some(tensor) = names.first() else {
            return Ok(());
        };
        let e = &self.table[*tensor];
        if !e.known || matches!(e.dtype, DType::U8 | DType::I8) || e.dtype == dtype {
            return Ok(());
        }
        Err(DecoderError::DTypeMismatch {
            config: config.to_path_buf(),
            field,
            declared: dtype,
            tensor: tensor.to_string(),
            actual: e.dtype,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.table.contains_key(name)
    }

    /// Total bytes of the mapped files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }

    /// The weight files, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }

    /// Names of every tensor in the weight files, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.table.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The tensor `name`, checked against `shape`. A matrix `<stem>.weight` stored quantized
    /// (`<stem>.qweight`, `.scales`, `.zeros`; see the module documentation) is returned as
    /// a quantized tensor, each of its parts checked against `shape` and the format.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.table.contains_key(name)
            && let Some(stem) = name.strip_suffix(".weight")
            && self.table.contains_key(&format!("{stem}.qweight"))
            && let [rows, cols] = *shape
        {
            return self.get_quantized(stem, rows, cols);
        }
        let e = self
            .table
            .get(name)
            .ok_or_else(|| DecoderError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let (path, map) = &self.files[e.file];
        if !e.known || matches!(e.dtype, DType::U8 | DType::I8) {
            return Err(DecoderError::DType {
                name: name.to_string(),
                path: path.clone(),
                dtype: "non-float".into(),
            });
        }
        if e.shape != shape {
            return Err(DecoderError::Shape {
                name: name.to_string(),
                path: path.clone(),
                expected: shape.to_vec(),
                actual: e.shape.clone(),
            });
        }
        let align = e.dtype.size_bytes();
        let bytes = if (map.as_ptr() as usize + e.start).is_multiple_of(align) {
            Bytes::Mapped {
                map: map.clone(),
                start: e.start,
                len: e.len,
            }
        } else {
            Bytes::owned(&map[e.start..e.start + e.len])
        };
        Ok(Tensor {
            name: name.to_string(),
            path: path.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            bytes,
            quant: None,
        })
    }

    /// The bytes of tensor `name` if it is stored as `dtype` with `shape`; otherwise an
    /// error naming it (missing, another dtype, another shape).
    fn raw(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<(PathBuf, Bytes)> {
        let e = self
            .table
            .get(name)
            .ok_or_else(|| DecoderError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let (path, map) = &self.files[e.file];
        if !e.known || e.dtype != dtype {
            return Err(DecoderError::Quantized {
                name: name.to_string(),
                path: path.clone(),
                msg: format!(
                    "stored as {}, a quantized matrix needs {dtype}",
                    if e.known {
                        e.dtype.to_string()
                    } else {
                        "an unsupported dtype".into()
                    }
                ),
            });
        }
        if e.shape != shape {
            return Err(DecoderError::Shape {
                name: name.to_string(),
                path: path.clone(),
                expected: shape.to_vec(),
                actual: e.shape.clone(),
            });
        }
        let bytes = if (map.as_ptr() as usize + e.start).is_multiple_of(dtype.size_bytes()) {
            Bytes::Mapped {
                map: map.clone(),
                start: e.start,
                len: e.len,
            }
        } else {
            Bytes::owned(&map[e.start..e.start + e.len])
        };
        Ok((path.clone(), bytes))
    }

    /// The quantized matrix `<stem>.qweight` (+ `.scales`, `.zeros`) of shape `[rows, cols]`:
    /// the bit width from the codes' dtype (I8: 8, U8: 4), the group size from the scales'
    /// width.
    fn get_quantized(&self, stem: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let qname = format!("{stem}.qweight");
        let sname = format!("{stem}.scales");
        let e = &self.table[&qname];
        let (qpath, _) = &self.files[e.file];
        let bad = |name: &str, path: &Path, msg: String| DecoderError::Quantized {
            name: name.to_string(),
            path: path.to_path_buf(),
            msg,
        };
        let bits = match (e.known, e.dtype) {
            (true, DType::I8) => 8,
            (true, DType::U8) => 4,
            _ => {
                return Err(bad(
                    &qname,
                    qpath,
                    "codes must be I8 (8-bit) or U8 (4-bit, two codes per byte)".into(),
                ));
            }
        };
        let se = self
            .table
            .get(&sname)
            .ok_or_else(|| DecoderError::MissingTensor {
                name: sname.clone(),
                dir: self.dir.clone(),
            })?;
        let (spath, _) = &self.files[se.file];
        let groups = match se.shape.as_slice() {
            [r, g] if *r == rows && *g > 0 && cols.is_multiple_of(*g) => *g,
            s => {
                return Err(bad(
                    &sname,
                    spath,
                    format!("shape {s:?} is not [{rows}, groups] with groups dividing {cols}"),
                ));
            }
        };
        let format = WeightFormat::new(bits, cols / groups).map_err(|e| {
            bad(
                &sname,
                spath,
                format!("{e} ({groups} groups of {cols} columns)"),
            )
        })?;
        let (_, codes) = self.raw(&qname, e.dtype, &[rows, format.code_bytes_per_row(cols)])?;
        let (_, scales) = self.raw(&sname, DType::F16, &[rows, groups])?;
        let zeros = if format.has_zeros() {
            Some(
                self.raw(&format!("{stem}.zeros"), DType::F16, &[rows, groups])?
                    .1,
            )
        } else {
            None
        };
        Ok(Tensor {
            name: format!("{stem}.weight"),
            path: qpath.clone(),
            dtype: e.dtype,
            shape: vec![rows, cols],
            bytes: codes,
            quant: Some(QuantParts {
                format,
                scales,
                zeros,
                banded: false,
            }),
        })
    }
}

/// Names the tensor at fault in a safetensors header the library refused: a header that
/// is not UTF-8 or not JSON, a tensor whose offsets do not span its dtype and shape, a gap or
/// overlap between neighbouring tensors (both named), or a tensor past the end of the data.
/// `None` when the header looks consistent (the library's own message is used).
fn diagnose_header(file: &[u8]) -> Option<String> {
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    let header = file.get(8..end)?;
    let text = match std::str::from_utf8(header) {
        Ok(t) => t,
        Err(e) => {
            return Some(format!(
                "the header is not UTF-8 text (invalid byte at header offset {}): not a safetensors file, or a damaged one",
                e.valid_up_to()
            ));
        }
    };
    let map: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return Some(format!("the header is not a JSON object: {e}")),
    };
    let data_len = (file.len() - end) as u64;
    // (name, start, end) of every tensor whose entry is readable.
    let mut spans: Vec<(&str, u64, u64)> = Vec::new();
    for (name, info) in &map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        let (s, e) = match offsets.map(|o| o.as_slice()) {
            Some([s, e]) => match (s.as_u64(), e.as_u64()) {
                (Some(s), Some(e)) => (s, e),
                _ => {
                    return Some(format!(
                        "tensor `{name}`: data_offsets {offsets:?} are not two byte offsets"
                    ));
                }
            },
            _ => return Some(format!("tensor `{name}`: no data_offsets [start, end]")),
        };
        if e < s {
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {e}] end before they start"
            ));
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let bits: Option<u64> = match dtype {
            "F64" | "I64" | "U64" => Some(64),
            "F32" | "I32" | "U32" => Some(32),
            "F16" | "BF16" | "I16" | "U16" => Some(16),
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(8),
            _ => None,
        };
        let shape: Option<Vec<u64>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
        if let (Some(bits), Some(shape)) = (bits, &shape) {
            let need = shape
                .iter()
                .try_fold(bits / 8, |acc, &d| acc.checked_mul(d));
            if need != Some(e - s) {
                let need = need.map_or("more than 2^64".to_string(), |n| n.to_string());
                return Some(format!(
                    "tensor `{name}`: data_offsets [{s}, {e}] span {} bytes, but {dtype} {shape:?} needs {need}",
                    e - s
                ));
            }
        }
        if e > data_len {
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {e}] reach past the {data_len} bytes of data (truncated file?)"
            ));
        }
        spans.push((name, s, e));
    }
    spans.sort_by_key(|t| (t.1, t.2));
    let mut prev: Option<(&str, u64)> = None;
    for &(name, s, e) in &spans {
        let prev_end = prev.map_or(0, |p| p.1);
        if s != prev_end {
            let what = if s > prev_end { "a gap" } else { "an overlap" };
            return Some(match prev {
                Some((p, pe)) => format!(
                    "{what} between tensor `{p}` (ends at byte {pe}) and tensor `{name}` (starts at byte {s}): the data_offsets of one of them are damaged"
                ),
                None => format!(
                    "tensor `{name}`: the first tensor starts at byte {s}, not 0: its data_offsets are damaged"
                ),
            });
        }
        prev = Some((name, e));
    }
    let covered = prev.map_or(0, |p| p.1);
    if covered != data_len {
        return Some(format!(
            "the tensors cover {covered} bytes but the file holds {data_len} bytes of data (truncated or trailing data)"
        ));
    }
    None
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeader(u) => format!("the header is not UTF-8 text: {u}"),
        E::InvalidHeaderDeserialization(j) => format!("the header is not valid JSON: {j}"),
        E::MetadataIncompleteBuffer => {
            "truncated: the header's tensors do not fit the file's data".into()
        }
        E::InvalidOffset(t) => {
            format!("truncated or corrupt: offsets of tensor `{t}` fall outside the file")
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            "truncated or not a safetensors file (bad header length)".into()
        }
        E::InvalidTensorView(d, s, n) => {
            format!("tensor data of {n} bytes does not match {d:?} {s:?}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_bytes_are_aligned_and_round_trip() {
        let t = Tensor::from_f32("w", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(t.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let h = t.converted(DType::BF16).unwrap();
        assert_eq!(h.dtype(), DType::BF16);
        assert_eq!(h.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let f = t.converted(DType::F16).unwrap();
        assert_eq!(f.data().get(5), 6.0);
    }

    /// Matrices move into the huge-page buffer with the same values: floats (mapped or
    /// owned) and, without `band`, quantized ones as stored; with `band` quantized ones
    /// banded. Vectors stay where they are.
    #[test]
    fn held_in_huge_pages_matrices_keep_their_values() {
        use safetensors::{Dtype, tensor::TensorView};
        let (rows, cols) = (32usize, 64usize);
        let w: Vec<u8> = (0..rows * cols)
            .flat_map(|i| bf16::from_f32((i % 13) as f32 * 0.25 - 1.0).to_le_bytes())
            .collect();
        let codes: Vec<u8> = (0..rows * cols / 2).map(|i| (i * 37 % 251) as u8).collect();
        let params = |base: f32| -> Vec<u8> {
            (0..rows)
                .flat_map(|r| f16::from_f32(base + r as f32 * 1e-3).to_le_bytes())
                .collect()
        };
        let (scales, zeros) = (params(0.01), params(-0.3));
        let views = vec![
            (
                "a.weight",
                TensorView::new(Dtype::BF16, vec![rows, cols], &w).unwrap(),
            ),
            (
                "b.qweight",
                TensorView::new(Dtype::U8, vec![rows, cols / 2], &codes).unwrap(),
            ),
            (
                "b.scales",
                TensorView::new(Dtype::F16, vec![rows, 1], &scales).unwrap(),
            ),
            (
                "b.zeros",
                TensorView::new(Dtype::F16, vec![rows, 1], &zeros).unwrap(),
            ),
        ];
        let d = tempfile::tempdir().unwrap();
        safetensors::serialize_to_file(views, None, &d.path().join("model.safetensors")).unwrap();
        let ws = Weights::open(d.path()).unwrap();
        let values = |t: &Tensor| t.to_f32_vec();
        for band in [false, true] {
            let a = ws.get("a.weight", &[rows, cols]).unwrap();
            let b = ws.get("b.weight", &[rows, cols]).unwrap();
            let owned = Tensor::from_f32("c", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
            let vector = Tensor::from_f32("d", vec![3], &[1.0, 2.0, 3.0]);
            let want = [values(&a), values(&b), values(&owned), values(&vector)];
            let mut ts = [a, b, owned, vector];
            assert!(ts.iter().all(|t| !matches!(t.bytes, Bytes::Paged { .. })));
            hold_in_huge_pages(ts.iter_mut(), band);
            for t in &ts[..3] {
                assert!(matches!(t.bytes, Bytes::Paged { .. }), "{}", t.name());
            }
            assert!(matches!(ts[3].bytes, Bytes::Owned { .. }));
            let TensorData::Quant(q) = ts[1].data() else {
                panic!("b is quantized")
            };
            assert_eq!(q.banded, band);
            for (t, v) in ts.iter().zip(&want) {
                assert_eq!(&values(t), v, "{} (band {band})", t.name());
            }
            // The buffer's parts start on cache lines.
            assert_eq!(ts[0].bytes.as_slice().as_ptr() as usize % 64, 0);
            assert_eq!(q.scales.as_ptr() as usize % 64, 0);
        }
    }

    #[test]
    fn empty_dir_has_no_weights() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Weights::open(d.path()),
            Err(DecoderError::NoWeights { .. })
        ));
    }

    /// A model directory with `model.safetensors` made of `header` (JSON text or raw bytes)
    /// and `data_len` zero bytes, and optionally a `config.json`.
    fn dir_with(header: &[u8], data_len: usize, config: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.resize(bytes.len() + data_len, 0);
        std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
        if let Some(c) = config {
            std::fs::write(d.path().join("config.json"), c).unwrap();
        }
        d
    }

    fn safetensors_error(d: &tempfile::TempDir) -> String {
        match Weights::open(d.path()) {
            Err(e @ DecoderError::Safetensors { .. }) => e.to_string(),
            Err(e) => panic!("expected a safetensors error, got {e}"),
            Ok(_) => panic!("a damaged file opened"),
        }
    }

    #[test]
    fn a_damaged_tensor_is_named_not_its_neighbour() {
        // `a` needs 16 bytes but its offsets span 20; `b` is intact.
        let h = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,20]},"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#;
        let msg = safetensors_error(&dir_with(h, 32, None));
        assert!(msg.contains("tensor `a`") && !msg.contains("`b`"), "{msg}");
        assert!(msg.contains("needs 16"), "{msg}");
        // A gap between two self-consistent tensors: both are named.
        let h = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#;
        let msg = safetensors_error(&dir_with(h, 32, None));
        assert!(
            msg.contains("gap") && msg.contains("`a`") && msg.contains("`b`"),
            "{msg}"
        );
        // A tensor past the end of the data.
        let h = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let msg = safetensors_error(&dir_with(h, 8, None));
        assert!(
            msg.contains("tensor `a`") && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn a_non_utf8_header_is_a_plain_sentence() {
        let mut h = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
        h[2] = 0xff;
        let msg = safetensors_error(&dir_with(&h, 4, None));
        assert!(msg.contains("not UTF-8"), "{msg}");
        assert!(!msg.contains('{') && !msg.contains("Utf8Error"), "{msg}");
    }

    #[test]
    fn a_config_dtype_contradicting_the_weights_is_an_error() {
        let h =
            br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        let d = dir_with(h, 16, Some(r#"{"torch_dtype": "bfloat16"}"#));
        match Weights::open(d.path()) {
            Err(e @ DecoderError::DTypeMismatch { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("torch_dtype")
                        && msg.contains("bf16")
                        && msg.contains("model.embed_tokens.weight")
                        && msg.contains("config.json"),
                    "{msg}"
                );
            }
            other => panic!("expected a dtype mismatch, got {:?}", other.err()),
        }
        // Agreeing, nested, or undeclared dtypes open.
        for config in [
            r#"{"torch_dtype": "float32"}"#,
            r#"{"text_config": {"dtype": "float32"}, "torch_dtype": "bfloat16"}"#,
            r#"{}"#,
        ] {
            let d = dir_with(h, 16, Some(config));
            Weights::open(d.path()).unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }
}
