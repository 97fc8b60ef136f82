//! Pre-quantized checkpoints converted into the layout [`crate::quantize`] writes (and
//! [`crate::Weights::get`] reads), so that one loader and one set of kernels serve them all:
//!
//! - a Hugging Face directory whose `config.json` has `quantization_config.quant_method`
//!   `awq` (GEMM layout) or `gptq` (4 bits; with or without act-order):
//!   [`import_checkpoint`]; the layouts are documented in [`jetvlm_quant::packed`];
//! - a GGUF file (llama.cpp; Q4_0, Q8_0, F32, F16, BF16 tensors) with the Hugging Face
//!   directory it was converted from (its `config.json` and tokenizer): [`import_gguf`].
//!   Llama's q/k rows, which llama.cpp's converter permutes, are put back in Hugging Face
//!   order; a quantized embedding table is stored F32 (exactly its values); the output head
//!   keeps its format.
//!
//! The output's `config.json` records `quantization_config` `{"quant_method": "jetvlm",
//! "bits", "group_size", "lm_head_bits", "converted_from"}`.

use crate::config::Config;
use crate::error::{DecoderError, Result};
use crate::quantize::{insert_quantization_config, io, write_dir};
use crate::weights::Weights;
use half::f16;
use jetvlm_quant::WeightFormat;
use jetvlm_quant::gguf::{GgmlType, Gguf};
use jetvlm_quant::packed::{Int4Matrix, awq_to_int4, gptq_to_int4};
use jetvlm_quant::weight::dequantize_row;
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
    /// Format of the layer matrices.
    pub format: WeightFormat,
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

/// An output tensor.
struct Out {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn push_int4(
    out: &mut Vec<(String, Out)>,
    stem: &str,
    rows: usize,
    cols: usize,
    m: &Int4Matrix,
    group: usize,
) {
    out.push((
        format!("{stem}.qweight"),
        Out {
            dtype: Dtype::U8,
            shape: vec![rows, cols / 2],
            data: m.codes.clone(),
        },
    ));
    for (suffix, v) in [("scales", &m.scales), ("zeros", &m.zeros)] {
        out.push((
            format!("{stem}.{suffix}"),
            Out {
                dtype: Dtype::F16,
                shape: vec![rows, cols / group],
                data: bytemuck::cast_slice(v).to_vec(),
            },
        ));
    }
}

fn serialize<'a>(
    out: &'a [(String, Out)],
    dst: &Path,
) -> Result<Vec<(String, safetensors::tensor::TensorView<'a>)>> {
    out.iter()
        .map(|(name, o)| {
            safetensors::tensor::TensorView::new(o.dtype, o.shape.clone(), &o.data)
                .map(|v| (name.clone(), v))
                .map_err(|e| DecoderError::Quantized {
                    name: name.clone(),
                    path: dst.to_path_buf(),
                    msg: e.to_string(),
                })
        })
        .collect()
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
    let mut out: Vec<(String, Out)> = Vec::new();
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
        let (qshape, qw) = part("qweight", Dtype::I32)?;
        let (_, qz) = part("qzeros", Dtype::I32)?;
        let (sshape, sc) = part("scales", Dtype::F16)?;
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
        let m = if awq {
            awq_to_int4(&le_i32(qw), &le_i32(qz), &le_f16(sc), in_f, out_f, group)
        } else {
            let g_idx = match table.contains_key(&format!("{stem}.g_idx")) {
                true => Some(le_i32(part("g_idx", Dtype::I32)?.1)),
                false => None,
            };
            gptq_to_int4(
                &le_i32(qw),
                &le_i32(qz),
                &le_f16(sc),
                g_idx.as_deref(),
                in_f,
                out_f,
                group,
            )
        }
        .map_err(|e| DecoderError::Quantized {
            name: format!("{stem}.qweight"),
            path: path.clone(),
            msg: e.to_string(),
        })?;
        requantized += m.requantized as usize;
        push_int4(&mut out, stem, out_f, in_f, &m, group);
        for s in ["qweight", "qzeros", "scales", "g_idx"] {
            skip.push(format!("{stem}.{s}"));
        }
    }
    let matrices = stems.len();
    let mut names: Vec<&String> = table.keys().filter(|n| !skip.contains(n)).collect();
    names.sort();
    let mut views = serialize(&out, dst)?;
    for n in &names {
        views.push(((*n).clone(), table[*n].1.clone()));
    }
    let copied = names.len();
    insert_quantization_config(&mut raw, &config_path, 4, group, None, Some(&method))?;
    let meta = [(
        "jetvlm_quantization".to_string(),
        format!("int4 g{group} from {method}"),
    )]
    .into();
    let (files, bytes_out) = write_dir(src, dst, views, &raw, meta)?;
    Ok(ImportReport {
        source: method,
        matrices,
        requantized,
        copied,
        format: WeightFormat::new(4, group).map_err(|e| DecoderError::Input(e.to_string()))?,
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
    let mut out: Vec<(String, Out)> = Vec::new();
    let (mut matrices, mut copied) = (0, 0);
    let (mut layer_bits, mut head_bits, mut embed_dtype) = (None::<u32>, None::<u32>, None::<&str>);
    let has_head = g.tensor("output.weight").is_some();
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
        match t.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let (dtype, size) = match t.ty {
                    GgmlType::F32 => (Dtype::F32, 4),
                    GgmlType::F16 => (Dtype::F16, 2),
                    _ => (Dtype::BF16, 2),
                };
                let mut data = bytes.to_vec();
                if let (Some(n), [rows, cols]) = (heads, shape.as_slice()) {
                    let row = cols * size;
                    for (r, from) in unpermute_rows(*rows, n).into_iter().enumerate() {
                        data[r * row..(r + 1) * row]
                            .copy_from_slice(&bytes[from * row..(from + 1) * row]);
                    }
                }
                if is_embed {
                    embed_dtype = Some(match t.ty {
                        GgmlType::F32 => "float32",
                        GgmlType::F16 => "float16",
                        _ => "bfloat16",
                    });
                }
                out.push((name, Out { dtype, shape, data }));
                copied += 1;
            }
            GgmlType::Q4_0 | GgmlType::Q8_0 => {
                let [rows, cols] = shape[..] else {
                    return Err(err(format!(
                        "{} tensor of {} dimensions (a matrix expected)",
                        t.ty,
                        t.dims.len()
                    )));
                };
                let bits = if t.ty == GgmlType::Q4_0 { 4 } else { 8 };
                let fmt = WeightFormat::new(bits, 32).map_err(|e| err(e.to_string()))?;
                let jetvlm_quant::QuantRow {
                    codes,
                    scales,
                    zeros,
                } = if bits == 4 {
                    jetvlm_quant::gguf::q4_0_to_int4(bytes)
                } else {
                    jetvlm_quant::gguf::q8_0_to_int8(bytes)
                }
                .map_err(|e| err(e.to_string()))?;
                let cb = fmt.code_bytes_per_row(cols);
                let gpr = fmt.groups_per_row(cols);
                let order: Vec<usize> = match heads {
                    Some(n) => unpermute_rows(rows, n),
                    None => (0..rows).collect(),
                };
                let span = |r: usize| order[r] * gpr..(order[r] + 1) * gpr;
                if is_embed {
                    // Dequantized to F32: exactly the GGUF's values.
                    let mut vals = vec![0f32; rows * cols];
                    for (r, o) in vals.chunks_exact_mut(cols).enumerate() {
                        let z = if bits == 4 { &zeros[span(r)] } else { &[] };
                        dequantize_row(
                            fmt,
                            &codes[order[r] * cb..(order[r] + 1) * cb],
                            &scales[span(r)],
                            z,
                            o,
                        );
                    }
                    embed_dtype = Some("float32");
                    out.push((
                        name,
                        Out {
                            dtype: Dtype::F32,
                            shape,
                            data: bytemuck::cast_slice(&vals).to_vec(),
                        },
                    ));
                    copied += 1;
                    continue;
                }
                let stem = name.strip_suffix(".weight").unwrap_or(&name).to_string();
                let mut m = Int4Matrix {
                    format: Some(fmt),
                    ..Default::default()
                };
                for r in 0..rows {
                    m.codes
                        .extend_from_slice(&codes[order[r] * cb..(order[r] + 1) * cb]);
                    m.scales.extend_from_slice(&scales[span(r)]);
                    if bits == 4 {
                        m.zeros.extend_from_slice(&zeros[span(r)]);
                    }
                }
                if bits == 4 {
                    push_int4(&mut out, &stem, rows, cols, &m, 32);
                } else {
                    out.push((
                        format!("{stem}.qweight"),
                        Out {
                            dtype: Dtype::I8,
                            shape: vec![rows, cols],
                            data: m.codes,
                        },
                    ));
                    out.push((
                        format!("{stem}.scales"),
                        Out {
                            dtype: Dtype::F16,
                            shape: vec![rows, gpr],
                            data: bytemuck::cast_slice(&m.scales).to_vec(),
                        },
                    ));
                }
                if name.starts_with("lm_head") {
                    head_bits = Some(bits);
                } else if layer_bits.is_some_and(|b| b != bits) {
                    return Err(err(format!(
                        "{} after {}-bit layer matrices: mixed layer formats are not converted",
                        t.ty,
                        layer_bits.unwrap_or(0)
                    )));
                } else {
                    layer_bits = Some(bits);
                }
                matrices += 1;
            }
            GgmlType::Other(_) => {
                return Err(err(format!(
                    "{}: only Q4_0, Q8_0, F32, F16 and BF16 tensors are converted",
                    t.ty
                )));
            }
        }
    }
    let bits =
        layer_bits.ok_or_else(|| bad("no Q4_0 or Q8_0 layer matrices in the file".into()))?;
    let obj = raw
        .as_object_mut()
        .ok_or_else(|| bad("config.json is not a JSON object".into()))?;
    obj.insert("tie_word_embeddings".into(), (!has_head).into());
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
    insert_quantization_config(&mut raw, &config_path, bits, 32, head_bits, Some("gguf"))?;
    let views = serialize(&out, dst)?;
    let meta = [(
        "jetvlm_quantization".to_string(),
        format!("int{bits} g32 from gguf"),
    )]
    .into();
    let (files, bytes_out) = write_dir(src, dst, views, &raw, meta)?;
    Ok(ImportReport {
        source: "gguf".into(),
        matrices,
        requantized: 0,
        copied,
        format: WeightFormat::new(bits, 32).map_err(|e| DecoderError::Input(e.to_string()))?,
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
