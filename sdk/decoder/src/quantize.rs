//! Writes a decoder's weights quantized (what `jetvlm quantize` runs): every layer matrix
//! round-to-nearest in a [`WeightFormat`], the LM head optionally INT8, everything else
//! (embeddings, norms, biases, tensors the decoder does not read) copied as stored.
//!
//! Output layout (read back by [`crate::Weights::get`]): one `model.safetensors` where each
//! quantized `<stem>.weight` `[rows, cols]` becomes
//!
//! | tensor            | dtype | shape                  | meaning                          |
//! |-------------------|-------|------------------------|----------------------------------|
//! | `<stem>.qweight`  | I8    | `[rows, cols]`         | INT8 codes, `w = scale * code`   |
//! | `<stem>.qweight`  | U8    | `[rows, cols / 2]`     | INT4 codes, two per byte         |
//! | `<stem>.scales`   | F16   | `[rows, cols / group]` | one scale per group              |
//! | `<stem>.zeros`    | F16   | `[rows, cols / group]` | INT4 only, `w = zero + scale * code` |
//!
//! INT4 bytes hold codes in chunks of 32 (byte `i` of a chunk: code `i` in the low nibble,
//! code `i + 16` in the high one). `config.json` gains
//! `"quantization_config": {"quant_method": "jetvlm", "bits": B, "group_size": G,
//! "lm_head_bits": 8 | null}` plus the `overrides` of matrices kept in their own format
//! ([`quantize_dir_mixed`]; the entry is [`jetvlm_quant::QuantizationConfig`]); a tied LM head quantized to INT8 is written as its own
//! `lm_head` tensors and `tie_word_embeddings` becomes `false` (the embedding table stays as
//! stored). The other files of the directory (tokenizer, chat template, generation config)
//! are copied. Everything is written into a temporary directory beside the output and
//! renamed into place at the end, so the output is never half written.

use crate::arch::{self, PREFIXES, WeightSink};
use crate::config::Config;
use crate::error::{DecoderError, Result};
use crate::weights::{Tensor, Weights};
/// The format of quantized layer matrices ([`QuantizeOptions::format`]).
pub use jetvlm_quant::WeightFormat;
use jetvlm_quant::{MatrixOverride, MatrixRole, QuantRow, QuantizationConfig};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// What to quantize.
#[derive(Clone, Copy, Debug)]
pub struct QuantizeOptions {
    /// Format of the layer matrices.
    pub format: WeightFormat,
    /// Quantize the LM head to INT8 (same group size); `false` keeps it as stored.
    pub head_int8: bool,
}

/// What [`quantize_dir`] wrote.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    /// Matrices quantized (the LM head included when it was).
    pub matrices: usize,
    /// Tensors copied as stored.
    pub copied: usize,
    /// Bytes of the source and output weight files.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Other files copied (tokenizer, ...).
    pub files: Vec<String>,
}

/// Records the name of every matrix the architecture reads.
struct Names;

impl WeightSink for Names {
    type W = String;
    type V = ();
    type Error = DecoderError;
    const RUNS_GEMMA3: bool = true;
    fn matrix(&mut self, t: &Tensor) -> Result<String> {
        if t.quant_format().is_some() {
            return Err(DecoderError::Quantized {
                name: t.name().to_string(),
                path: t.path().to_path_buf(),
                msg: "already quantized; quantize the unquantized model".into(),
            });
        }
        Ok(t.name().to_string())
    }
    fn vector(&mut self, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Which part of a quantized matrix a view holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Codes,
    Scales,
    Zeros,
}

/// One part of a matrix quantized on demand, when the safetensors writer asks for its
/// bytes (each part quantizes the matrix again: round-to-nearest is deterministic).
struct QuantPart<'a> {
    ws: &'a Weights,
    /// The source tensor's name.
    name: String,
    rows: usize,
    cols: usize,
    format: WeightFormat,
    part: Part,
    shape: Vec<usize>,
    /// The first error met while quantizing (the writer's `View::data` cannot fail).
    failure: &'a std::cell::RefCell<Option<DecoderError>>,
}

impl QuantPart<'_> {
    fn quantize(&self) -> Result<Vec<u8>> {
        let t = self.ws.get(&self.name, &[self.rows, self.cols])?;
        let (codes, scales, zeros) = quantize_matrix(&t, self.rows, self.cols, self.format)?;
        Ok(match self.part {
            Part::Codes => codes,
            Part::Scales => bytemuck::cast_slice(&scales).to_vec(),
            Part::Zeros => bytemuck::cast_slice(&zeros).to_vec(),
        })
    }
}

/// A tensor of the output: copied as stored, or a part of a quantized matrix.
enum OutView<'a> {
    Stored(safetensors::tensor::TensorView<'a>),
    Quant(QuantPart<'a>),
}

impl safetensors::View for OutView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            OutView::Stored(v) => v.dtype(),
            OutView::Quant(q) => match q.part {
                Part::Codes if q.format.bits() == 8 => safetensors::Dtype::I8,
                Part::Codes => safetensors::Dtype::U8,
                Part::Scales | Part::Zeros => safetensors::Dtype::F16,
            },
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutView::Stored(v) => v.shape(),
            OutView::Quant(q) => &q.shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            OutView::Stored(v) => v.data().into(),
            OutView::Quant(q) => match q.quantize() {
                Ok(bytes) if bytes.len() == self.data_len() => bytes.into(),
                result => {
                    let mut failure = q.failure.borrow_mut();
                    if failure.is_none() {
                        *failure = Some(result.err().unwrap_or_else(|| {
                            DecoderError::Quantized {
                                name: q.name.clone(),
                                path: q
                                    .ws
                                    .files()
                                    .first()
                                    .map(|p| p.to_path_buf())
                                    .unwrap_or_default(),
                                msg: "quantized to an unexpected size".into(),
                            }
                        }));
                    }
                    vec![0u8; self.data_len()].into()
                }
            },
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutView::Stored(v) => v.data_len(),
            OutView::Quant(q) => {
                let elems: usize = q.shape.iter().product();
                match q.part {
                    Part::Codes => elems,
                    Part::Scales | Part::Zeros => elems * 2,
                }
            }
        }
    }
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> DecoderError + '_ {
    move |source| DecoderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Quantizes the decoder in `src` into the new directory `dst` (which must not exist).
pub fn quantize_dir(src: &Path, dst: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    quantize_dir_mixed(src, dst, opts, &[])
}

/// [`quantize_dir`] with some layer matrices in their own format (`overrides`, e.g. every
/// `mlp.down_proj` INT8 in an INT4 model), declared in `quantization_config.overrides`.
pub fn quantize_dir_mixed(
    src: &Path,
    dst: &Path,
    opts: &QuantizeOptions,
    overrides: &[MatrixOverride],
) -> Result<QuantizeReport> {
    if dst.exists() {
        return Err(DecoderError::Input(format!(
            "output {} already exists; remove it or choose another --out",
            dst.display()
        )));
    }
    let config_path = src.join("config.json");
    let config = Config::from_dir(src)?;
    let mut raw: serde_json::Value = jetvlm_core::config::load_json(&config_path)?;
    if raw.get("quantization_config").is_some() {
        return Err(DecoderError::Unsupported {
            path: config_path,
            field: "quantization_config".into(),
            msg: "the model is already quantized; quantize the unquantized model".into(),
        });
    }
    let mut qc = QuantizationConfig::new(opts.format);
    qc.lm_head_bits = opts.head_int8.then_some(8);
    for o in overrides {
        qc.set_override(o.layers, o.role, o.format);
    }
    qc.check_layers(config.model.num_hidden_layers)
        .map_err(|e| DecoderError::Input(e.to_string()))?;
    let ws = Weights::open(src)?;
    let names = arch::load(&config.model, &ws, None, &mut Names)?;
    let c = &config.model;

    // (tensor name, rows, cols, format) of every matrix to quantize.
    let mut jobs: Vec<(String, usize, usize, WeightFormat)> = Vec::new();
    for (i, l) in names.layers.iter().enumerate() {
        let lins = [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down];
        for (role, lin) in MatrixRole::ALL.into_iter().zip(lins) {
            jobs.push((lin.w.clone(), lin.rows, lin.cols, qc.matrix_format(i, role)));
        }
    }
    let prefix = names
        .embed
        .strip_suffix("embed_tokens.weight")
        .unwrap_or_default()
        .to_string();
    let head_name = PREFIXES
        .iter()
        .find(|(p, _)| *p == prefix)
        .map_or(PREFIXES[0].1, |(_, h)| *h)
        .to_string();
    let int8 = WeightFormat::new(8, opts.format.group()).map_err(quant_err(&head_name, src))?;
    // Quantizing a tied head reads the embedding table under the head's name.
    let mut head_source: Option<String> = None;
    if opts.head_int8 {
        let from = names.lm_head.clone().unwrap_or_else(|| names.embed.clone());
        if names.lm_head.is_none() {
            head_source = Some(from.clone());
        }
        jobs.push((from, c.vocab_size, c.hidden_size, int8));
    }
    for (name, _, cols, fmt) in &jobs {
        if !cols.is_multiple_of(fmt.group()) {
            return Err(DecoderError::Quantized {
                name: name.clone(),
                path: src.to_path_buf(),
                msg: format!(
                    "--group {} does not divide its {cols} columns (use a group size that divides {cols})",
                    fmt.group()
                ),
            });
        }
    }

    let quantized: HashMap<&str, ()> = jobs
        .iter()
        .filter(|(n, ..)| Some(n) != head_source.as_ref())
        .map(|(n, ..)| (n.as_str(), ()))
        .collect();
    // Each quantized matrix becomes lazy views of its parts, quantized when the writer
    // reaches them: the output is streamed, at most one matrix's parts are held at a time.
    let failure = std::cell::RefCell::new(None);
    let mut views: Vec<(String, OutView<'_>)> = Vec::new();
    for (name, rows, cols, fmt) in &jobs {
        let stem_name = if Some(name) == head_source.as_ref() {
            head_name.clone()
        } else {
            name.clone()
        };
        let stem = stem_name.strip_suffix(".weight").unwrap_or(&stem_name);
        let groups = fmt.groups_per_row(*cols);
        let code_shape = if fmt.bits() == 8 {
            vec![*rows, *cols]
        } else {
            vec![*rows, cols / 2]
        };
        let mut parts = vec![
            (Part::Codes, "qweight", code_shape),
            (Part::Scales, "scales", vec![*rows, groups]),
        ];
        if fmt.has_zeros() {
            parts.push((Part::Zeros, "zeros", vec![*rows, groups]));
        }
        for (part, suffix, shape) in parts {
            views.push((
                format!("{stem}.{suffix}"),
                OutView::Quant(QuantPart {
                    ws: &ws,
                    name: name.clone(),
                    rows: *rows,
                    cols: *cols,
                    format: *fmt,
                    part,
                    shape,
                    failure: &failure,
                }),
            ));
        }
    }
    let matrices = jobs.len();

    // Everything else, as stored.
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
    let mut copied = 0;
    for (path, map) in &maps {
        let st =
            safetensors::SafeTensors::deserialize(map).map_err(|e| DecoderError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        for (name, view) in st.tensors() {
            if quantized.contains_key(name.as_str()) {
                continue;
            }
            views.push((name, OutView::Stored(view)));
            copied += 1;
        }
    }

    // Config: the format, and an untied head when a tied one was quantized.
    let obj = insert_quantization_config(&mut raw, &config_path, &qc)?;
    if head_source.is_some() {
        obj.insert("tie_word_embeddings".into(), false.into());
        if let Some(t) = obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            t.insert("tie_word_embeddings".into(), false.into());
        }
    }

    let meta: HashMap<String, String> = [(
        "jetvlm_quantization".to_string(),
        format!("int{} g{}", opts.format.bits(), opts.format.group()),
    )]
    .into();
    let written = write_dir(src, dst, views, &raw, meta);
    // A matrix that failed to quantize was written as zeros: its error wins, and the
    // output goes.
    if let Some(e) = failure.into_inner() {
        if written.is_ok() {
            let _ = std::fs::remove_dir_all(dst);
        }
        return Err(e);
    }
    let (files, bytes_out) = written?;
    Ok(QuantizeReport {
        matrices,
        copied,
        bytes_in: ws.file_bytes(),
        bytes_out,
        files,
    })
}

/// Writes `views` as `dst/model.safetensors` (with `meta` and `format: pt`), `raw` as its
/// `config.json`, and copies the other files of `src` (tokenizer, generation config; not its
/// weights or config). Everything goes into a temporary directory beside `dst`, renamed into
/// place at the end, so `dst` is never half written. Returns the files copied and the bytes
/// of the weight file.
pub(crate) fn write_dir<V: safetensors::View>(
    src: &Path,
    dst: &Path,
    views: Vec<(String, V)>,
    raw: &serde_json::Value,
    mut meta: HashMap<String, String>,
) -> Result<(Vec<String>, u64)> {
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let leaf = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "quantized".into());
    let tmp = parent.join(format!(".{leaf}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    meta.insert("format".into(), "pt".into());
    let result = (|| -> Result<Vec<String>> {
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let st_path = tmp.join("model.safetensors");
        safetensors::serialize_to_file(views, Some(meta), &st_path).map_err(|e| {
            DecoderError::Safetensors {
                path: st_path.clone(),
                msg: e.to_string(),
            }
        })?;
        let cfg_out = tmp.join("config.json");
        let text =
            serde_json::to_string_pretty(raw).map_err(|e| DecoderError::Input(e.to_string()))?;
        std::fs::write(&cfg_out, text + "\n").map_err(io(&cfg_out))?;
        let mut files = Vec::new();
        for e in std::fs::read_dir(src).map_err(io(src))?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let skip = name == "config.json"
                || name == "model.safetensors.index.json"
                || p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "gguf")
                || !p.is_file();
            if !skip {
                std::fs::copy(&p, tmp.join(&name)).map_err(io(&p))?;
                files.push(name);
            }
        }
        files.sort();
        Ok(files)
    })();
    let files = match result.and_then(|f| std::fs::rename(&tmp, dst).map_err(io(dst)).map(|()| f)) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let bytes_out = std::fs::metadata(dst.join("model.safetensors"))
        .map_err(io(dst))?
        .len();
    Ok((files, bytes_out))
}

fn quant_err(name: &str, path: &Path) -> impl Fn(jetvlm_quant::QuantError) -> DecoderError {
    let (name, path) = (name.to_string(), path.to_path_buf());
    move |e| DecoderError::Quantized {
        name: name.clone(),
        path: path.clone(),
        msg: e.to_string(),
    }
}

/// Round-to-nearest quantization of every row of `t` (rows in parallel): codes, scales,
/// zeros, row after row.
pub fn quantize_matrix(
    t: &Tensor,
    rows: usize,
    cols: usize,
    fmt: WeightFormat,
) -> Result<(Vec<u8>, Vec<half::f16>, Vec<half::f16>)> {
    let data = t.data();
    let qrows: Vec<QuantRow> = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0f32; cols],
            |buf, r| {
                data.to_f32_into(r * cols, buf);
                jetvlm_quant::weight::quantize_row(buf, fmt).map_err(|e| DecoderError::Quantized {
                    name: t.name().to_string(),
                    path: t.path().to_path_buf(),
                    msg: format!("row {r}: {e}"),
                })
            },
        )
        .collect::<Result<_>>()?;
    let mut codes = Vec::with_capacity(rows * fmt.code_bytes_per_row(cols));
    let (mut scales, mut zeros) = (Vec::new(), Vec::new());
    for q in qrows {
        codes.extend(q.codes);
        scales.extend(q.scales);
        zeros.extend(q.zeros);
    }
    Ok((codes, scales, zeros))
}

/// Writes the `quantization_config` entry (`quant_method: jetvlm`) a quantized decoder's
/// config.json declares its format with ([`QuantizationConfig::to_json`]), for `jetvlm
/// quantize` and for converted AWQ, GPTQ and GGUF checkpoints; returns the config object.
pub(crate) fn insert_quantization_config<'a>(
    raw: &'a mut serde_json::Value,
    path: &Path,
    q: &QuantizationConfig,
) -> Result<&'a mut serde_json::Map<String, serde_json::Value>> {
    let obj = raw
        .as_object_mut()
        .ok_or_else(|| DecoderError::Unsupported {
            path: path.to_path_buf(),
            field: "(top level)".into(),
            msg: "not a JSON object".into(),
        })?;
    obj.insert("quantization_config".into(), q.to_json());
    Ok(obj)
}

/// Replaces the decoder directory `dir` (a model package's `decoder.dir`, as `jetvlm export
/// --weight-bits` leaves it) by its quantized form: [`quantize_dir`] writes beside it, then
/// the two are swapped by renames and the dense directory is removed. On any failure `dir`
/// is left as it was.
pub fn quantize_in_place(dir: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let leaf = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            DecoderError::Input(format!("{} names no directory to quantize", dir.display()))
        })?;
    let pid = std::process::id();
    let quantized = parent.join(format!(".{leaf}.quantized-{pid}"));
    let dense = parent.join(format!(".{leaf}.dense-{pid}"));
    for stale in [&quantized, &dense] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(io(stale))?;
        }
    }
    let report = quantize_dir(dir, &quantized, opts)?;
    if let Err(e) = std::fs::rename(dir, &dense) {
        let _ = std::fs::remove_dir_all(&quantized);
        return Err(io(dir)(e));
    }
    if let Err(e) = std::fs::rename(&quantized, dir) {
        // Put the dense decoder back.
        let _ = std::fs::rename(&dense, dir);
        let _ = std::fs::remove_dir_all(&quantized);
        return Err(io(dir)(e));
    }
    std::fs::remove_dir_all(&dense).map_err(io(&dense))?;
    Ok(report)
}

/// Records the format of every matrix the architecture reads (`None`: stored dense).
struct Formats;

impl WeightSink for Formats {
    type W = (String, Option<WeightFormat>);
    type V = ();
    type Error = DecoderError;
    const RUNS_GEMMA3: bool = true;
    fn matrix(&mut self, t: &Tensor) -> Result<Self::W> {
        Ok((t.name().to_string(), t.quant_format()))
    }
    fn vector(&mut self, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// When the decoder's `config.json` declares a `quantization_config`, it must describe the
/// tensors the decoder will read: `quant_method` `jetvlm` (AWQ and GPTQ checkpoints are
/// converted by `jetvlm quantize` first), every layer matrix quantized in its own format
/// ([`QuantizationConfig::matrix_format`]: `bits` / `group_size`, or the override naming
/// it), and the LM head INT8 exactly when `lm_head_bits` is 8. The memory planner charges
/// the declared formats, so a contradiction is refused, naming the field and the first
/// tensor that disagrees.
pub fn check_declared_quantization(config: &Config, ws: &Weights) -> Result<()> {
    let path = ws.dir().join("config.json");
    let raw: serde_json::Value = jetvlm_core::config::load_json(&path)?;
    let Some(q) = raw.get("quantization_config") else {
        return Ok(());
    };
    let bad = |field: &str, msg: String| DecoderError::Unsupported {
        path: path.clone(),
        field: format!("quantization_config.{field}"),
        msg,
    };
    match q.get("quant_method").and_then(|m| m.as_str()) {
        Some("jetvlm") => {}
        Some(m @ ("awq" | "gptq")) => {
            return Err(bad(
                "quant_method",
                format!(
                    "`{m}` checkpoints are converted first: jetvlm quantize --model {} --out DIR",
                    ws.dir().display()
                ),
            ));
        }
        other => {
            return Err(bad(
                "quant_method",
                format!(
                    "unknown format {}; the decoder loads `jetvlm` (written by jetvlm quantize)",
                    other.map_or_else(|| "(missing)".into(), |m| format!("`{m}`"))
                ),
            ));
        }
    }
    let qc = QuantizationConfig::from_json(q)
        .and_then(|qc| qc.check_layers(config.model.num_hidden_layers).map(|()| qc))
        .map_err(|e| match e {
            jetvlm_quant::QuantError::Config { field, msg } => bad(&field, msg),
            e => bad("(entry)", e.to_string()),
        })?;
    let w = arch::load(&config.model, ws, None, &mut Formats)?;
    for (i, l) in w.layers.iter().enumerate() {
        let lins = [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down];
        for (role, lin) in MatrixRole::ALL.into_iter().zip(lins) {
            let (name, fmt) = &lin.w;
            let want = qc.matrix_format(i, role);
            // The field that declares this matrix's format.
            let (bits_field, group_field) =
                match jetvlm_quant::qconfig::matrix_override(&qc.overrides, i, role) {
                    Some(o) => (
                        format!("overrides.{}.bits", o.key()),
                        format!("overrides.{}.group_size", o.key()),
                    ),
                    None => ("bits".to_string(), "group_size".to_string()),
                };
            let Some(fmt) = fmt else {
                return Err(bad(
                    &bits_field,
                    format!(
                        "declares {} bits but `{name}` is stored unquantized",
                        want.bits()
                    ),
                ));
            };
            if fmt.bits() != want.bits() {
                return Err(bad(
                    &bits_field,
                    format!(
                        "declares {} but `{name}` is stored with {} bits",
                        want.bits(),
                        fmt.bits()
                    ),
                ));
            }
            if fmt.group() != want.group() {
                return Err(bad(
                    &group_field,
                    format!(
                        "declares {} but `{name}` is stored in groups of {}",
                        want.group(),
                        fmt.group()
                    ),
                ));
            }
        }
    }
    let (embed_name, embed_fmt) = &w.embed;
    let embed_stored = embed_fmt.map(|f| f.bits());
    if embed_stored != qc.embed_bits {
        let says =
            |b: Option<u32>| b.map_or_else(|| "unquantized".to_string(), |b| format!("{b} bits"));
        return Err(bad(
            "embed_bits",
            format!(
                "declares the embedding table {} but `{embed_name}` is stored {}",
                says(qc.embed_bits),
                says(embed_stored)
            ),
        ));
    }
    let head_bits = qc.lm_head_bits.map(u64::from);
    let (head_name, head_fmt) = w.lm_head.as_ref().unwrap_or(&w.embed);
    let head_stored = head_fmt.map(|f| u64::from(f.bits()));
    if head_stored != head_bits {
        let says =
            |b: Option<u64>| b.map_or_else(|| "unquantized".to_string(), |b| format!("{b} bits"));
        return Err(bad(
            "lm_head_bits",
            format!(
                "declares the LM head {} but `{head_name}` is stored {}",
                says(head_bits),
                says(head_stored)
            ),
        ));
    }
    Ok(())
}
