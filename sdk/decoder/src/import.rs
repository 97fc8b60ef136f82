//! Pre-quantized checkpoints converted into the layout [`crate::quantize`] writes (and
//! [`crate::Weights::get`] reads), so that one loader and one set of kernels serve them all:
//!
//! - a Hugging Face directory whose `config.json` has `quantization_config.quant_method`
//!   `awq` (GEMM layout) or `gptq` (4 bits; with or without act-order):
//!   [`import_checkpoint`]; the layouts are documented in [`jetvlm_quant::packed`];
//! - a GGUF file (llama.cpp; Q4_0, Q8_0, Q4_K, Q6_K, F32, F16, BF16 tensors) with the
//!   Hugging Face directory it was converted from (its `config.json` and tokenizer):
//!   [`import_gguf`]. Llama's q/k rows, which llama.cpp's converter permutes, are put back in
//!   Hugging Face order. Each quantized tensor becomes the format that holds its blocks
//!   ([`jetvlm_quant::gguf`]: Q8_0 / Q4_0 exactly, Q4_K but for FP16 rounding of its scales,
//!   Q6_K as INT8 g32 by round-to-nearest). The layer matrices' base format is INT4 g32 when
//!   any is 4-bit, else INT8 g32; the 8- and 6-bit layer matrices of a 4-bit file
//!   (llama.cpp's Q4_K_M keeps some `attn_v` / `ffn_down` in Q6_K) stay INT8 g32, each
//!   declared in `quantization_config.overrides` ([`jetvlm_quant::qconfig`]). A
//!   quantized embedding table stays in its blocks (the lookup dequantizes one row at a
//!   time); without `output.weight` it is tied to the LM head, which is then that quantized
//!   table. The output head keeps its format.
//!
//! Conversions stream: the output's tensors are views that convert one matrix when the
//! safetensors writer reaches them (sources memory-mapped), so a conversion holds at most one
//! matrix converted, never the whole model. A matrix that fails to convert fails the whole
//! conversion and nothing is left behind.
//!
//! The output's `config.json` records `quantization_config` `{"quant_method": "jetvlm",
//! "bits", "group_size", "lm_head_bits", "converted_from"}` and, for a GGUF, `"embed_bits"`
//! (the quantized embedding table's bits, or null) and the `"overrides"` of matrices kept in
//! another format than the base one.

use crate::config::Config;
use crate::error::{DecoderError, Result};
use crate::quantize::{insert_quantization_config, io, write_dir};
use crate::weights::Weights;
use half::f16;
use jetvlm_quant::QuantRow;
use jetvlm_quant::gguf::{GgmlType, Gguf, GgufTensor};
use jetvlm_quant::packed::{awq_to_int4, gptq_to_int4};
use jetvlm_quant::{Layers, MatrixRole, QuantizationConfig, WeightFormat};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What an import wrote.
#[derive(Clone, Debug)]
pub struct ImportReport {
    /// `awq`, `gptq`, `gguf`.
    pub source: String,
    /// Matrices converted, and how many of them were quantized again (GPTQ act-order).
    pub matrices: usize,
    pub requantized: usize,
    /// Tensors copied as stored (or dequantized: a GGUF embedding table).
    pub copied: usize,
    /// Base format of the layer matrices.
    pub format: WeightFormat,
    /// Layer matrices held in another format than `format` (a GGUF's 8- or 6-bit matrices
    /// in a 4-bit file, INT8 g32), declared in `quantization_config.overrides`.
    pub own_format: usize,
    pub bytes_out: u64,
    pub files: Vec<String>,
}

/// The `quantization_config.quant_method` of the decoder in `dir`, if it has one.
pub fn quant_method(dir: &Path) -> Result<Option<String>> {
    let raw: serde_json::Value = jetvlm_core::config::load_json(&dir.join("config.json"))?;
    Ok(raw
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .map(str::to_ascii_lowercase))
}

/// Which part of a converted matrix a view holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Codes,
    Scales,
    Zeros,
}

/// How a matrix of the output is made from the source's bytes (mapped, never copied whole).
enum Source<'a> {
    Awq {
        qweight: &'a [u8],
        qzeros: &'a [u8],
        scales: &'a [u8],
        group: usize,
    },
    Gptq {
        qweight: &'a [u8],
        qzeros: &'a [u8],
        scales: &'a [u8],
        g_idx: Option<&'a [u8]>,
        group: usize,
    },
    /// GGUF blocks of `ty` in the format that holds them; output row `r` is the file's row
    /// `order[r]`.
    Gguf {
        ty: GgmlType,
        bytes: &'a [u8],
        order: Vec<usize>,
    },
}

/// A `[rows, cols]` matrix of the output in `format`, converted when the writer asks for it.
struct Matrix<'a> {
    /// The source tensor, for errors.
    name: String,
    path: PathBuf,
    rows: usize,
    cols: usize,
    format: WeightFormat,
    source: Source<'a>,
}

impl Matrix<'_> {
    /// The whole matrix in `format`, rows in Hugging Face order.
    fn convert(&self) -> Result<QuantRow> {
        let err = |msg: String| DecoderError::Quantized {
            name: self.name.clone(),
            path: self.path.clone(),
            msg,
        };
        let (in_f, out_f) = (self.cols, self.rows);
        let row = match &self.source {
            Source::Awq {
                qweight,
                qzeros,
                scales,
                group,
            } => {
                let m = awq_to_int4(
                    &le_i32(qweight),
                    &le_i32(qzeros),
                    &le_f16(scales),
                    in_f,
                    out_f,
                    *group,
                )
                .map_err(|e| err(e.to_string()))?;
                QuantRow {
                    codes: m.codes,
                    scales: m.scales,
                    zeros: m.zeros,
                }
            }
            Source::Gptq {
                qweight,
                qzeros,
                scales,
                g_idx,
                group,
            } => {
                let g_idx = g_idx.map(le_i32);
                let m = gptq_to_int4(
                    &le_i32(qweight),
                    &le_i32(qzeros),
                    &le_f16(scales),
                    g_idx.as_deref(),
                    in_f,
                    out_f,
                    *group,
                )
                .map_err(|e| err(e.to_string()))?;
                QuantRow {
                    codes: m.codes,
                    scales: m.scales,
                    zeros: m.zeros,
                }
            }
            Source::Gguf { ty, bytes, order } => {
                let (fmt, stored) =
                    jetvlm_quant::gguf::to_quant_row(*ty, bytes).map_err(|e| err(e.to_string()))?;
                let (cb, gpr) = (fmt.code_bytes_per_row(in_f), fmt.groups_per_row(in_f));
                let z = |r: usize| {
                    if fmt.has_zeros() {
                        &stored.zeros[r * gpr..(r + 1) * gpr]
                    } else {
                        &[][..]
                    }
                };
                let mut out = QuantRow::default();
                for &r in order {
                    out.codes
                        .extend_from_slice(&stored.codes[r * cb..(r + 1) * cb]);
                    out.scales
                        .extend_from_slice(&stored.scales[r * gpr..(r + 1) * gpr]);
                    out.zeros.extend_from_slice(z(r));
                }
                out
            }
        };
        let want = self.format.matrix_bytes(out_f, in_f);
        let got = row.codes.len() + 2 * (row.scales.len() + row.zeros.len());
        if got != want {
            return Err(err(format!(
                "converted to {got} bytes, a [{out_f}, {in_f}] {} g{} matrix takes {want}",
                if self.format.bits() == 8 {
                    "INT8"
                } else {
                    "INT4"
                },
                self.format.group()
            )));
        }
        Ok(row)
    }
}

/// A tensor of the output: bytes as stored, a float matrix whose rows are put back in
/// Hugging Face order, or a part of a converted matrix. Views are filled when the
/// safetensors writer reaches them, so the output is streamed: at most one matrix is held
/// converted at a time.
enum View<'a> {
    Stored {
        dtype: Dtype,
        shape: Vec<usize>,
        data: &'a [u8],
    },
    Rows {
        dtype: Dtype,
        shape: Vec<usize>,
        data: &'a [u8],
        /// Output row `r` is stored row `order[r]`.
        order: Vec<usize>,
    },
    Part {
        m: &'a Matrix<'a>,
        part: Part,
        shape: Vec<usize>,
        /// The first conversion error (the writer's `View::data` cannot fail).
        failure: &'a std::cell::RefCell<Option<DecoderError>>,
    },
}

impl safetensors::View for View<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            View::Stored { dtype, .. } | View::Rows { dtype, .. } => *dtype,
            View::Part { m, part, .. } => match part {
                Part::Codes if m.format.bits() == 8 => Dtype::I8,
                Part::Codes => Dtype::U8,
                Part::Scales | Part::Zeros => Dtype::F16,
            },
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            View::Stored { shape, .. } | View::Rows { shape, .. } | View::Part { shape, .. } => {
                shape
            }
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            View::Stored { data, .. } => (*data).into(),
            View::Rows { data, order, .. } => {
                let row = data.len() / order.len().max(1);
                let mut out = Vec::with_capacity(data.len());
                for &r in order {
                    out.extend_from_slice(&data[r * row..(r + 1) * row]);
                }
                out.into()
            }
            View::Part {
                m, part, failure, ..
            } => match m.convert() {
                Ok(row) => match part {
                    Part::Codes => row.codes.into(),
                    Part::Scales => bytemuck::cast_slice(&row.scales).to_vec().into(),
                    Part::Zeros => bytemuck::cast_slice(&row.zeros).to_vec().into(),
                },
                Err(e) => {
                    failure.borrow_mut().get_or_insert(e);
                    vec![0u8; self.data_len()].into()
                }
            },
        }
    }
    fn data_len(&self) -> usize {
        match self {
            View::Stored { data, .. } | View::Rows { data, .. } => data.len(),
            View::Part { shape, part, .. } => {
                let elems: usize = shape.iter().product();
                match part {
                    Part::Codes => elems,
                    Part::Scales | Part::Zeros => 2 * elems,
                }
            }
        }
    }
}

/// The views of a converted matrix's parts, named after `stem`.
fn parts<'a>(
    views: &mut Vec<(String, View<'a>)>,
    stem: &str,
    m: &'a Matrix<'a>,
    failure: &'a std::cell::RefCell<Option<DecoderError>>,
) {
    let (rows, cols, f) = (m.rows, m.cols, m.format);
    let groups = f.groups_per_row(cols);
    let codes = if f.bits() == 8 {
        vec![rows, cols]
    } else {
        vec![rows, cols / 2]
    };
    let mut list = vec![
        (Part::Codes, "qweight", codes),
        (Part::Scales, "scales", vec![rows, groups]),
    ];
    if f.has_zeros() {
        list.push((Part::Zeros, "zeros", vec![rows, groups]));
    }
    for (part, suffix, shape) in list {
        views.push((
            format!("{stem}.{suffix}"),
            View::Part {
                m,
                part,
                shape,
                failure,
            },
        ));
    }
}

/// Writes `views` with [`write_dir`]; a matrix that failed to convert was written as zeros,
/// so its error wins and the output goes.
fn write_views(
    src: &Path,
    dst: &Path,
    views: Vec<(String, View<'_>)>,
    raw: &serde_json::Value,
    meta: HashMap<String, String>,
    failure: &std::cell::RefCell<Option<DecoderError>>,
) -> Result<(Vec<String>, u64)> {
    let written = write_dir(src, dst, views, raw, meta);
    let failed = failure.borrow_mut().take();
    if let Some(e) = failed {
        if written.is_ok() {
            let _ = std::fs::remove_dir_all(dst);
        }
        return Err(e);
    }
    written
}

fn le_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn le_f16(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Converts the AWQ or GPTQ checkpoint in `src` into the new directory `dst`.
pub fn import_checkpoint(src: &Path, dst: &Path) -> Result<ImportReport> {
    if dst.exists() {
        return Err(DecoderError::Input(format!(
            "output {} already exists; remove it or choose another --out",
            dst.display()
        )));
    }
    let config_path = src.join("config.json");
    let mut raw: serde_json::Value = jetvlm_core::config::load_json(&config_path)?;
    let unsupported = |field: &str, msg: String| DecoderError::Unsupported {
        path: config_path.clone(),
        field: format!("quantization_config.{field}"),
        msg,
    };
    let qc = raw.get("quantization_config").cloned().ok_or_else(|| {
        unsupported(
            "quant_method",
            "no quantization_config: not a pre-quantized checkpoint".into(),
        )
    })?;
    let method = qc
        .get("quant_method")
        .and_then(|m| m.as_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let awq = match method.as_str() {
        "awq" => true,
        "gptq" => false,
        other => {
            return Err(unsupported(
                "quant_method",
                format!(
                    "`{other}` is not a format jetvlm converts (awq, gptq; a GGUF file with --from)"
                ),
            ));
        }
    };
    let bits = qc.get("bits").and_then(|b| b.as_u64());
    if bits != Some(4) {
        return Err(unsupported(
            "bits",
            format!("{bits:?}: only 4-bit {method} checkpoints are converted"),
        ));
    }
    let group = match qc.get("group_size").and_then(|g| g.as_i64()) {
        Some(g @ (32 | 64 | 128)) => g as usize,
        g => {
            return Err(unsupported(
                "group_size",
                format!("{g:?}: groups of 32, 64 or 128 are supported"),
            ));
        }
    };
    if awq {
        let version = qc.get("version").and_then(|v| v.as_str()).unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(unsupported(
                "version",
                format!("AWQ `{version}` layout: only gemm is converted"),
            ));
        }
        if qc.get("zero_point").and_then(|z| z.as_bool()) == Some(false) {
            return Err(unsupported(
                "zero_point",
                "AWQ without zero points is not converted".into(),
            ));
        }
    } else {
        let fmt = qc
            .get("checkpoint_format")
            .and_then(|v| v.as_str())
            .unwrap_or("gptq");
        if fmt != "gptq" {
            return Err(unsupported(
                "checkpoint_format",
                format!("`{fmt}`: only the gptq (v1) checkpoint format is converted"),
            ));
        }
    }
    let _ = Config::from_dir(src)?;
    let ws = Weights::open(src)?;
    let maps = ws
        .files()
        .iter()
        .map(|p| {
            let f = std::fs::File::open(p).map_err(io(p))?;
            // SAFETY: read-only mapping of a weight file (as Weights::open).
            let m = unsafe { memmap2::Mmap::map(&f) }.map_err(io(p))?;
            Ok((p.to_path_buf(), m))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut table: HashMap<String, (PathBuf, safetensors::tensor::TensorView<'_>)> = HashMap::new();
    for (path, map) in &maps {
        let st =
            safetensors::SafeTensors::deserialize(map).map_err(|e| DecoderError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        for (name, view) in st.tensors() {
            table.insert(name, (path.clone(), view));
        }
    }
    let mut stems: Vec<String> = table
        .keys()
        .filter_map(|n| n.strip_suffix(".qweight").map(str::to_string))
        .collect();
    stems.sort();
    if stems.is_empty() {
        return Err(unsupported(
            "quant_method",
            format!("{method}: no `.qweight` tensors in the weights"),
        ));
    }
    // A group that does not divide a matrix's rows is named before any size mismatch.
    for stem in &stems {
        let name = format!("{stem}.qweight");
        let (path, v) = &table[&name];
        let in_f = match v.shape() {
            [i, _] if awq => *i,
            [i8, _] => i8 * 8,
            s => {
                return Err(DecoderError::Quantized {
                    name,
                    path: path.clone(),
                    msg: format!("shape {s:?} is not 2-D"),
                });
            }
        };
        if !in_f.is_multiple_of(group) {
            return Err(DecoderError::Quantized {
                name,
                path: path.clone(),
                msg: format!(
                    "group size {group} (quantization_config.group_size) does not divide its {in_f} input features"
                ),
            });
        }
    }
    // Each matrix becomes lazy views of its parts, converted when the writer reaches them.
    let mut matrices: Vec<Matrix<'_>> = Vec::new();
    let mut skip: Vec<String> = Vec::new();
    let mut requantized = 0;
    for stem in &stems {
        let part = |suffix: &str, dtype: Dtype| -> Result<(Vec<usize>, &[u8])> {
            let name = format!("{stem}.{suffix}");
            let (path, v) = table
                .get(&name)
                .ok_or_else(|| DecoderError::MissingTensor {
                    name: name.clone(),
                    dir: src.to_path_buf(),
                })?;
            if v.dtype() != dtype {
                return Err(DecoderError::Quantized {
                    name,
                    path: path.clone(),
                    msg: format!("stored as {:?}, {method} stores it as {dtype:?}", v.dtype()),
                });
            }
            Ok((v.shape().to_vec(), v.data()))
        };
        let (qshape, qweight) = part("qweight", Dtype::I32)?;
        let (_, qzeros) = part("qzeros", Dtype::I32)?;
        let (sshape, scales) = part("scales", Dtype::F16)?;
        let path = &table[&format!("{stem}.qweight")].0;
        let (in_f, out_f) = match (awq, qshape.as_slice(), sshape.as_slice()) {
            (true, [i, _], [_, o]) => (*i, *o),
            (false, [i8, _], [_, o]) => (i8 * 8, *o),
            _ => {
                return Err(DecoderError::Quantized {
                    name: format!("{stem}.qweight"),
                    path: path.clone(),
                    msg: format!("shapes {qshape:?} (qweight) and {sshape:?} (scales) are not 2-D"),
                });
            }
        };
        let source = if awq {
            Source::Awq {
                qweight,
                qzeros,
                scales,
                group,
            }
        } else {
            let g_idx = match table.contains_key(&format!("{stem}.g_idx")) {
                true => Some(part("g_idx", Dtype::I32)?.1),
                false => None,
            };
            // Act-order (groups that are not contiguous runs) is quantized again.
            if let Some(g) = g_idx
                && le_i32(g)
                    .iter()
                    .enumerate()
                    .any(|(i, &gi)| gi as i64 != (i / group) as i64)
            {
                requantized += 1;
            }
            Source::Gptq {
                qweight,
                qzeros,
                scales,
                g_idx,
                group,
            }
        };
        matrices.push(Matrix {
            name: format!("{stem}.qweight"),
            path: path.clone(),
            rows: out_f,
            cols: in_f,
            format: WeightFormat::new(4, group).map_err(|e| DecoderError::Input(e.to_string()))?,
            source,
        });
        for s in ["qweight", "qzeros", "scales", "g_idx"] {
            skip.push(format!("{stem}.{s}"));
        }
    }
    let failure = std::cell::RefCell::new(None);
    let mut views: Vec<(String, View<'_>)> = Vec::new();
    for (stem, m) in stems.iter().zip(&matrices) {
        parts(&mut views, stem, m, &failure);
    }
    let mut names: Vec<&String> = table.keys().filter(|n| !skip.contains(n)).collect();
    names.sort();
    for n in &names {
        let v = &table[*n].1;
        views.push((
            (*n).clone(),
            View::Stored {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data(),
            },
        ));
    }
    let copied = names.len();
    let format = WeightFormat::new(4, group).map_err(|e| DecoderError::Input(e.to_string()))?;
    let mut qc = QuantizationConfig::new(format);
    qc.converted_from = Some(method.clone());
    insert_quantization_config(&mut raw, &config_path, &qc)?;
    let meta = [(
        "jetvlm_quantization".to_string(),
        format!("int4 g{group} from {method}"),
    )]
    .into();
    let (files, bytes_out) = write_views(src, dst, views, &raw, meta, &failure)?;
    Ok(ImportReport {
        source: method,
        matrices: matrices.len(),
        requantized,
        copied,
        format,
        own_format: 0,
        bytes_out,
        files,
    })
}

/// The Hugging Face name of a GGUF tensor (`None`: a tensor the decoder does not read).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, h)) = fixed.iter().find(|(g, _)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = part.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The layer and matrix of a Hugging Face layer matrix name
/// (`model.layers.3.mlp.down_proj.weight`).
fn layer_matrix(hf: &str) -> Option<(usize, MatrixRole)> {
    let rest = hf.strip_prefix("model.layers.")?.strip_suffix(".weight")?;
    let (layer, role) = rest.split_once('.')?;
    Some((layer.parse().ok()?, MatrixRole::from_name(role)?))
}

/// HF row of each GGUF row of a q/k projection llama.cpp permuted (`n_head` heads).
fn unpermute_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let mut from = vec![0usize; rows];
    for h in 0..n_head {
        for j in 0..hd / 2 {
            for t in 0..2 {
                // GGUF row h*hd + 2j + t holds HF row h*hd + t*hd/2 + j.
                from[h * hd + t * hd / 2 + j] = h * hd + 2 * j + t;
            }
        }
    }
    from
}

/// Converts the GGUF file `gguf` of the decoder in `src` (its `config.json` and tokenizer)
/// into the new directory `dst`.
pub fn import_gguf(src: &Path, gguf: &Path, dst: &Path) -> Result<ImportReport> {
    if dst.exists() {
        return Err(DecoderError::Input(format!(
            "output {} already exists; remove it or choose another --out",
            dst.display()
        )));
    }
    let config_path = src.join("config.json");
    let config = Config::from_dir(src)?;
    let c = &config.model;
    let mut raw: serde_json::Value = jetvlm_core::config::load_json(&config_path)?;
    let f = std::fs::File::open(gguf).map_err(io(gguf))?;
    // SAFETY: read-only mapping of the GGUF file, read once here.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io(gguf))?;
    let bad = |msg: String| DecoderError::Quantized {
        name: "(file)".into(),
        path: gguf.to_path_buf(),
        msg,
    };
    let g = Gguf::parse(&map).map_err(|e| bad(e.to_string()))?;
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let permute = match arch.as_str() {
        "llama" => true,
        "qwen2" => false,
        other => {
            return Err(bad(format!(
                "general.architecture `{other}`: llama and qwen2 GGUF files are converted"
            )));
        }
    };
    for (key, want) in [
        ("block_count", c.num_hidden_layers),
        ("embedding_length", c.hidden_size),
    ] {
        let got = g.get(&format!("{arch}.{key}")).and_then(|v| v.as_u64());
        if got != Some(want as u64) {
            return Err(bad(format!(
                "{arch}.{key} is {got:?} but {} says {want}: the GGUF file is not this model",
                config_path.display()
            )));
        }
    }
    if raw.get("quantization_config").is_some() {
        return Err(DecoderError::Unsupported {
            path: config_path,
            field: "quantization_config".into(),
            msg: "--model must be the unquantized decoder the GGUF file was converted from".into(),
        });
    }
    // The layer matrices' base format: INT4 g32 when any is 4-bit (Q4_0, Q4_K), else INT8
    // g32. The 8- and 6-bit layer matrices of a 4-bit file (llama.cpp's Q4_K_M keeps some
    // attn_v / ffn_down in Q6_K) stay INT8 g32, declared as overrides.
    let is_layer =
        |t: &GgufTensor| hf_name(&t.name).is_some_and(|n| n.starts_with("model.layers."));
    let quantized = |ty: GgmlType| {
        matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K
        )
    };
    let layer_types: Vec<GgmlType> = g
        .tensors
        .iter()
        .filter(|t| is_layer(t) && quantized(t.ty))
        .map(|t| t.ty)
        .collect();
    let bits = if layer_types
        .iter()
        .any(|t| matches!(t, GgmlType::Q4_0 | GgmlType::Q4_K))
    {
        4
    } else if !layer_types.is_empty() {
        8
    } else {
        return Err(bad(
            "no Q4_0, Q4_K, Q8_0 or Q6_K layer matrices in the file".into(),
        ));
    };
    let layer_fmt = WeightFormat::new(bits, 32).map_err(|e| bad(e.to_string()))?;
    let has_head = g.tensor("output.weight").is_some();
    let mut copied = 0;
    let mut overrides: Vec<(usize, MatrixRole, WeightFormat)> = Vec::new();
    let (mut head_bits, mut embed_bits, mut embed_dtype) = (None::<u32>, None::<u32>, None::<&str>);
    let mut matrices: Vec<(String, Matrix<'_>)> = Vec::new();
    let mut views: Vec<(String, View<'_>)> = Vec::new();
    for t in &g.tensors {
        let Some(name) = hf_name(&t.name) else {
            continue;
        };
        let bytes = &map[t.start..t.start + t.len];
        let err = |msg: String| DecoderError::Quantized {
            name: t.name.clone(),
            path: gguf.to_path_buf(),
            msg,
        };
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let heads = match name.rsplit('.').nth(1) {
            Some("q_proj") if permute => Some(c.num_attention_heads),
            Some("k_proj") if permute => Some(c.num_key_value_heads),
            _ => None,
        };
        let is_embed = name.ends_with("embed_tokens.weight");
        let order = |rows: usize| -> Result<Vec<usize>> {
            match heads {
                Some(n) if n == 0 || !rows.is_multiple_of(2 * n) => Err(err(format!(
                    "{rows} rows do not split into {n} heads of even size"
                ))),
                Some(n) => Ok(unpermute_rows(rows, n)),
                None => Ok((0..rows).collect()),
            }
        };
        match t.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let (dtype, hf) = match t.ty {
                    GgmlType::F32 => (Dtype::F32, "float32"),
                    GgmlType::F16 => (Dtype::F16, "float16"),
                    _ => (Dtype::BF16, "bfloat16"),
                };
                if is_embed {
                    embed_dtype = Some(hf);
                }
                let view = match (heads, shape.as_slice()) {
                    (Some(_), [rows, _]) => View::Rows {
                        dtype,
                        order: order(*rows)?,
                        shape,
                        data: bytes,
                    },
                    _ => View::Stored {
                        dtype,
                        shape,
                        data: bytes,
                    },
                };
                views.push((name, view));
                copied += 1;
            }
            GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K => {
                let [rows, cols] = shape[..] else {
                    return Err(err(format!(
                        "{} tensor of {} dimensions (a matrix expected)",
                        t.ty,
                        t.dims.len()
                    )));
                };
                // Its own format: INT8 g32 for Q8_0 / Q6_K, INT4 g32 for Q4_0 / Q4_K.
                let own = match t.ty {
                    GgmlType::Q4_0 | GgmlType::Q4_K => 4,
                    _ => 8,
                };
                let is_head = name.starts_with("lm_head");
                let format = WeightFormat::new(own, 32).map_err(|e| err(e.to_string()))?;
                if !is_head && !is_embed && own != bits {
                    // A layer matrix in its own format (an override of the base format).
                    let (layer, role) = layer_matrix(&name).ok_or_else(|| {
                        err(format!("{} tensor `{name}` is not a layer matrix", t.ty))
                    })?;
                    overrides.push((layer, role, format));
                }
                if is_head {
                    head_bits = Some(own);
                } else if is_embed {
                    // The embedding table stays in its blocks (the lookup dequantizes one row
                    // at a time); tied, it is the quantized LM head too.
                    embed_bits = Some(own);
                    embed_dtype = Some("float32");
                    if !has_head {
                        head_bits = Some(own);
                    }
                }
                let stem = name.strip_suffix(".weight").unwrap_or(&name).to_string();
                matrices.push((
                    stem,
                    Matrix {
                        name: t.name.clone(),
                        path: gguf.to_path_buf(),
                        rows,
                        cols,
                        format,
                        source: Source::Gguf {
                            ty: t.ty,
                            bytes,
                            order: order(rows)?,
                        },
                    },
                ));
            }
            GgmlType::Other(_) => {
                return Err(err(format!(
                    "{}: only Q4_0, Q4_K, Q8_0, Q6_K, F32, F16 and BF16 tensors are converted",
                    t.ty
                )));
            }
        }
    }
    let failure = std::cell::RefCell::new(None);
    for (stem, m) in &matrices {
        parts(&mut views, stem, m, &failure);
    }
    let obj = raw
        .as_object_mut()
        .ok_or_else(|| bad("config.json is not a JSON object".into()))?;
    obj.insert("tie_word_embeddings".into(), (!has_head).into());
    if let Some(t) = obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
        t.insert("tie_word_embeddings".into(), (!has_head).into());
    }
    if let Some(dt) = embed_dtype {
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), dt.into());
            }
        }
        if let Some(t) = obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            for key in ["torch_dtype", "dtype"] {
                if t.contains_key(key) {
                    t.insert(key.into(), dt.into());
                }
            }
        }
    }
    let mut qc = QuantizationConfig::new(layer_fmt);
    qc.lm_head_bits = head_bits;
    qc.embed_bits = embed_bits;
    qc.converted_from = Some("gguf".into());
    // A matrix kept in its own format in every layer is one `layers.*` entry.
    for role in MatrixRole::ALL {
        let of_role: Vec<_> = overrides.iter().filter(|o| o.1 == role).collect();
        let every_layer = of_role.len() == c.num_hidden_layers
            && (0..c.num_hidden_layers).all(|l| of_role.iter().any(|o| o.0 == l))
            && of_role.iter().all(|o| o.2 == of_role[0].2);
        if every_layer {
            qc.set_override(Layers::All, role, of_role[0].2);
        } else {
            for o in of_role {
                qc.set_override(Layers::One(o.0), role, o.2);
            }
        }
    }
    insert_quantization_config(&mut raw, &config_path, &qc)?;
    let meta = [(
        "jetvlm_quantization".to_string(),
        format!("int{bits} g32 from gguf"),
    )]
    .into();
    let (files, bytes_out) = write_views(src, dst, views, &raw, meta, &failure)?;
    Ok(ImportReport {
        source: "gguf".into(),
        matrices: matrices.len(),
        requantized: 0,
        copied,
        format: layer_fmt,
        own_format: overrides.len(),
        bytes_out,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // permute: reshape(n_head, 2, hd/2).swapaxes(1, 2): GGUF row h*hd + 2j + t is HF row
        // h*hd + t*hd/2 + j.
        let (rows, n) = (16, 2);
        let hf: Vec<usize> = (0..rows).collect();
        let mut gguf = vec![0; rows];
        let hd = rows / n;
        for h in 0..n {
            for t in 0..2 {
                for j in 0..hd / 2 {
                    gguf[h * hd + 2 * j + t] = hf[h * hd + t * hd / 2 + j];
                }
            }
        }
        let back: Vec<usize> = unpermute_rows(rows, n).iter().map(|&g| gguf[g]).collect();
        assert_eq!(back, hf);
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.2.attn_q.weight").as_deref(),
            Some("model.layers.2.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
