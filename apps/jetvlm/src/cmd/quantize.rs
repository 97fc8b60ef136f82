//! `jetvlm quantize`: a decoder's layer matrices written weight-only INT8 or INT4
//! (round-to-nearest, groups along each row), loadable by the CPU decoder directly.
//!
//! The layout and config entry are documented in `jetvlm_decoder::quantize`.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use jetvlm_decoder::quantize::{QuantizeOptions, quantize_dir};
use jetvlm_quant::WeightFormat;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm quantize --model models/gen/smollm2-135m-random --bits 4 --out models/gen/smollm2-135m-q4\n  \
    jetvlm quantize --model ~/hf/Qwen2.5-0.5B --bits 8 --group 128 --head-bits 8 --out q8\n\n\
    Writes <name>.qweight (I8 codes, or U8 with two 4-bit codes per byte), <name>.scales (F16)\n\
    and, for 4 bits, <name>.zeros (F16) for every layer matrix; embeddings, norms and biases\n\
    are copied as stored, and config.json gains a quantization_config entry. Quantized\n\
    decoders run on the CPU (--device cpu).")]
pub struct QuantizeArgs {
    /// Decoder directory (config.json + safetensors), or a model package (its decoder).
    #[arg(long)]
    pub model: PathBuf,
    /// Bits per weight of the layer matrices.
    #[arg(long, value_enum)]
    pub bits: Bits,
    /// Weights per group (one FP16 scale, and zero for 4 bits, per group along a row).
    #[arg(long, value_enum, default_value_t = Group::G64)]
    pub group: Group,
    /// Quantize the LM head too (8 bits; a tied head gets its own INT8 copy and the
    /// embedding table stays as stored). Default: the head stays as stored.
    #[arg(long, value_enum)]
    pub head_bits: Option<HeadBits>,
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
    let bits = match args.bits {
        Bits::B4 => 4,
        Bits::B8 => 8,
    };
    let group = match args.group {
        Group::G32 => 32,
        Group::G64 => 64,
        Group::G128 => 128,
    };
    let format = WeightFormat::new(bits, group)?;
    let src = super::decoder_dir(&args.model)?;
    if !src.join("config.json").is_file() {
        bail!(
            "--model {}: no config.json in {} (expected a decoder directory or a model package)",
            args.model.display(),
            src.display()
        );
    }
    let opts = QuantizeOptions {
        format,
        head_int8: args.head_bits.is_some(),
    };
    let t0 = std::time::Instant::now();
    let r = quantize_dir(&src, &args.out, &opts)
        .map_err(|e| anyhow::anyhow!("quantizing {}: {e}", src.display()))?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "wrote {}: {} matrices INT{bits} g{group}{}, {} tensors copied, weights {:.1} MB -> {:.1} MB ({:.2}x), {} other files copied, {:.1} s",
        args.out.display(),
        r.matrices,
        if opts.head_int8 {
            " (LM head INT8)"
        } else {
            ""
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
