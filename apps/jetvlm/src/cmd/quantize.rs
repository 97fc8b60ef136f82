//! `jetvlm quantize`: a decoder's layer matrices written weight-only INT8 or INT4
//! (round-to-nearest, groups along each row), loadable by the CPU decoder directly.
//!
//! The layout and config entry are documented in `jetvlm_decoder::quantize`. Pre-quantized
//! checkpoints (AWQ, GPTQ, GGUF) are converted into it (`jetvlm_decoder::import`).

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use jetvlm_decoder::import;
use jetvlm_decoder::quantize::{QuantizeOptions, quantize_dir_mixed};
use jetvlm_quant::{Layers, MatrixOverride, MatrixRole, WeightFormat};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm quantize --model models/gen/smollm2-135m-random --bits 4 --out models/gen/smollm2-135m-q4\n  \
    jetvlm quantize --model ~/hf/Qwen2.5-0.5B --bits 8 --group 128 --head-bits 8 --out q8\n  \
    jetvlm quantize --model ~/hf/Qwen2.5-0.5B --bits 4 --group 32 --keep-8bit self_attn.v_proj --keep-8bit mlp.down_proj --out q4m\n  \
    jetvlm quantize --model ~/hf/Qwen2.5-3B-Instruct-AWQ --out qwen-awq\n  \
    jetvlm quantize --model ~/hf/SmolLM2-135M --from smollm2-135m-q4_0.gguf --out smol-q4_0\n\n\
    Writes <name>.qweight (I8 codes, or U8 with two 4-bit codes per byte), <name>.scales (F16)\n\
    and, for 4 bits, <name>.zeros (F16) for every layer matrix; embeddings, norms and biases\n\
    are copied as stored, and config.json gains a quantization_config entry. Quantized\n\
    decoders run on the CPU (--device cpu). An AWQ (GEMM) or GPTQ (4-bit) checkpoint given as\n\
    --model is converted to this layout (no --bits); so is a GGUF file (Q4_0, Q8_0, Q4_K,\n\
    Q6_K) given with --from, --model then naming the Hugging Face directory it came from.\n\
    Conversions stream: one matrix is converted at a time.")]
pub struct QuantizeArgs {
    /// Decoder directory (config.json + safetensors), or a model package (its decoder).
    #[arg(long)]
    pub model: PathBuf,
    /// Bits per weight of the layer matrices (not with a pre-quantized --model or --from).
    #[arg(long, value_enum)]
    pub bits: Option<Bits>,
    /// A GGUF file (Q4_0 / Q8_0 / Q4_K / Q6_K matrices) of the --model decoder, converted instead of
    /// quantizing --model's weights.
    #[arg(long, value_name = "FILE.gguf")]
    pub from: Option<PathBuf>,
    /// Weights per group (one FP16 scale, and zero for 4 bits, per group along a row);
    /// default 64.
    #[arg(long, value_enum)]
    pub group: Option<Group>,
    /// Quantize the LM head too (8 bits; a tied head gets its own INT8 copy and the
    /// embedding table stays as stored). Default: the head stays as stored.
    #[arg(long, value_enum)]
    pub head_bits: Option<HeadBits>,
    /// With --bits 4: keep these layer matrices INT8 (same group), as llama.cpp's Q4_K_M
    /// keeps attn_v and ffn_down at more bits. A matrix of every layer (`mlp.down_proj`,
    /// `self_attn.v_proj`, ...) or of one (`layers.3.mlp.down_proj`); repeatable. Declared in
    /// quantization_config.overrides.
    #[arg(long = "keep-8bit", value_name = "MATRIX")]
    pub keep_8bit: Vec<String>,
    /// Directory to write (must not exist; written beside it and renamed into place).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Bits {
    #[value(name = "4")]
    B4,
    #[value(name = "8")]
    B8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Group {
    #[value(name = "32")]
    G32,
    #[value(name = "64")]
    G64,
    #[value(name = "128")]
    G128,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HeadBits {
    #[value(name = "8")]
    B8,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let src = super::decoder_dir(&args.model)?;
    if !src.join("config.json").is_file() {
        bail!(
            "--model {}: no config.json in {} (expected a decoder directory or a model package)",
            args.model.display(),
            src.display()
        );
    }
    let method = import::quant_method(&src)?;
    if args.from.is_some() || method.is_some() {
        return convert(&args, &src, method);
    }
    let Some(bits) = args.bits else {
        bail!("--bits 4 or --bits 8 is required (or a pre-quantized --model, or --from FILE.gguf)");
    };
    let opts = options(bits, args.group, args.head_bits)?;
    let (bits, group) = (opts.format.bits(), opts.format.group());
    let keep = keep_8bit(&args.keep_8bit, opts.format)?;
    let t0 = std::time::Instant::now();
    let r = quantize_dir_mixed(&src, &args.out, &opts, &keep)
        .map_err(|e| anyhow::anyhow!("quantizing {}: {e}", src.display()))?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "wrote {}: {} matrices INT{bits} g{group}{}{}, {} tensors copied, weights {:.1} MB -> {:.1} MB ({:.2}x), {} other files copied, {:.1} s",
        args.out.display(),
        r.matrices,
        if opts.head_int8 {
            " (LM head INT8)"
        } else {
            ""
        },
        if keep.is_empty() {
            String::new()
        } else {
            let k: Vec<String> = keep.iter().map(|o| o.key()).collect();
            format!(" (INT8 g{group}: {})", k.join(", "))
        },
        r.copied,
        mb(r.bytes_in),
        mb(r.bytes_out),
        r.bytes_in as f64 / r.bytes_out.max(1) as f64,
        r.files.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The quantizer's options from the flags (`jetvlm quantize --bits --group --head-bits`,
/// `jetvlm export --weight-bits --weight-group --head-bits`); the group defaults to 64.
pub fn options(
    bits: Bits,
    group: Option<Group>,
    head_bits: Option<HeadBits>,
) -> Result<QuantizeOptions> {
    let bits = match bits {
        Bits::B4 => 4,
        Bits::B8 => 8,
    };
    let group = match group.unwrap_or(Group::G64) {
        Group::G32 => 32,
        Group::G64 => 64,
        Group::G128 => 128,
    };
    Ok(QuantizeOptions {
        format: WeightFormat::new(bits, group)?,
        head_int8: head_bits.is_some(),
    })
}

/// `--keep-8bit` values as overrides: INT8 in the layer format's group.
fn keep_8bit(values: &[String], format: WeightFormat) -> Result<Vec<MatrixOverride>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    if format.bits() != 4 {
        bail!("--keep-8bit applies to --bits 4 (the layer matrices are already 8-bit)");
    }
    let int8 = WeightFormat::new(8, format.group())?;
    values
        .iter()
        .map(|v| {
            let (layers, role) = match MatrixRole::from_name(v) {
                Some(role) => (Layers::All, role),
                None => MatrixOverride::parse_key(v).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--keep-8bit `{v}`: expected a layer matrix ({}) or layers.<N|*>.<matrix>",
                        MatrixRole::ALL.map(|r| r.name()).join(", ")
                    )
                })?,
            };
            Ok(MatrixOverride {
                layers,
                role,
                format: int8,
            })
        })
        .collect()
}

/// Converts a pre-quantized checkpoint (`--from FILE.gguf`, or an AWQ / GPTQ `--model`).
fn convert(args: &QuantizeArgs, src: &Path, method: Option<String>) -> Result<()> {
    if args.bits.is_some()
        || args.group.is_some()
        || args.head_bits.is_some()
        || !args.keep_8bit.is_empty()
    {
        bail!(
            "--bits, --group, --head-bits and --keep-8bit quantize an unquantized model; {} is converted in its own format (drop them)",
            args.from.as_ref().map_or_else(
                || format!(
                    "--model {} ({})",
                    args.model.display(),
                    method.as_deref().unwrap_or("")
                ),
                |f| format!("--from {}", f.display())
            )
        );
    }
    let t0 = std::time::Instant::now();
    let r = match &args.from {
        Some(gguf) => import::import_gguf(src, gguf, &args.out)
            .map_err(|e| anyhow::anyhow!("converting --from {}: {e}", gguf.display()))?,
        None => import::import_checkpoint(src, &args.out)
            .map_err(|e| anyhow::anyhow!("converting {}: {e}", src.display()))?,
    };
    println!(
        "wrote {}: {} matrices from {} as INT{} g{}{}, {} tensors copied, weights {:.1} MB, {} other files copied, {:.1} s",
        args.out.display(),
        r.matrices,
        r.source,
        r.format.bits(),
        r.format.group(),
        match (r.requantized, r.own_format) {
            (0, 0) => String::new(),
            (0, n) => format!(
                " ({n} 8- or 6-bit layer matrices of a 4-bit file kept as INT8 g32: quantization_config.overrides)"
            ),
            (n, _) => format!(" ({n} matrices quantized again: act-order, in contiguous groups)"),
        },
        r.copied,
        r.bytes_out as f64 / 1e6,
        r.files.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
