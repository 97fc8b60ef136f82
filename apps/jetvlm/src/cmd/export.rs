//! `jetvlm export`: a Hugging Face vision-language checkpoint to a jetvlm model package.
//!
//! The work is done by the Python exporter `models/jetvlm_export` (PyTorch traces the vision
//! tower to ONNX and checks it against ONNX Runtime), run with the project venv, found the way
//! the ONNX Runtime library is: `.venv` in an ancestor of the executable, of the working
//! directory, or of the workspace this was built in. The exporter prints what it does and,
//! on failure, one line; its exit status is passed on (2: the checkpoint or an option is
//! refused, 1: a check failed).

use super::quantize::{Bits, Group, HeadBits};
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm export ~/hf/llava-1.5-7b-hf --out models/llava-1.5-7b\n  \
    jetvlm export ~/hf/SmolVLM-256M-Instruct --out models/smolvlm-256m --dtype fp16\n  \
    jetvlm export ~/hf/SmolVLM-256M-Instruct --out models/smolvlm-256m-q4 --weight-bits 4\n  \
    jetvlm export ~/hf/SmolVLM-256M-Instruct --out models/smolvlm-720p --frame-size 1280x720\n\n\
    Families: LLaVA-1.5 (model_type llava), Idefics3 / SmolVLM (idefics3, smolvlm; one frame\n\
    at the vision tower's size, or with --frame-size WxH the processor's tiles of WxH frames).\n\
    Needs torch and transformers in .venv (.ci/setup --dev).")]
pub struct ExportArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer, processor config).
    pub hf_dir: PathBuf,
    /// Package directory to write (written beside it, renamed into place when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Encoder input size in pixels: N (N x N) or WIDTHxHEIGHT (Qwen2.5-VL); default: the
    /// vision tower's native size (Qwen2.5-VL: 448x448). Idefics3/SmolVLM whose processor
    /// splits images: the camera's frame size, cut into the processor's tiles.
    #[arg(long, value_name = "N|WxH", value_parser = parse_frame_size)]
    pub frame_size: Option<String>,
    /// Precision inside the ONNX encoder (its input and output stay f32).
    #[arg(long, value_enum, default_value_t = ExportDType::Fp32)]
    pub dtype: ExportDType,
    /// Package name (default: the checkpoint directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// kv.policy written to the manifest.
    #[arg(long, default_value = "mixed")]
    pub kv_policy: String,
    /// Prompt template with {frames} and {question} (default: from the chat template).
    #[arg(long)]
    pub template: Option<String>,
    /// prompt.default_question written to the manifest.
    #[arg(long)]
    pub question: Option<String>,
    /// Replace an existing non-empty --out.
    #[arg(long)]
    pub force: bool,
    /// Python interpreter with torch and transformers (default: the project's .venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Write the package's decoder quantized (weight-only, as `jetvlm quantize --bits` does)
    /// instead of in the checkpoint's precision.
    #[arg(long, value_enum)]
    pub weight_bits: Option<Bits>,
    /// Weights per group of the quantized decoder (default 64).
    #[arg(long, value_enum, requires = "weight_bits")]
    pub weight_group: Option<Group>,
    /// Quantize the decoder's LM head to INT8 too.
    #[arg(long, value_enum, requires = "weight_bits")]
    pub head_bits: Option<HeadBits>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportDType {
    Fp32,
    Fp16,
}

/// The directory holding `models/jetvlm_export` and, when `need_venv`, `.venv/bin/python`:
/// ancestors of the executable, the working directory, then this source tree.
fn project_root(need_venv: bool) -> Option<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    starts.iter().find_map(|s| {
        s.ancestors()
            .find(|a| {
                a.join("models/jetvlm_export/__main__.py").is_file()
                    && (!need_venv || a.join(".venv/bin/python").is_file())
            })
            .map(Path::to_path_buf)
    })
}

pub fn run(args: ExportArgs) -> Result<()> {
    let root = project_root(args.python.is_none()).context(
        "the exporter (models/jetvlm_export) and the project venv (.venv) were not found above \
         the executable or the working directory; run from the jetvlm checkout after \
         .ci/setup --dev, or pass --python",
    )?;
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let probe = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !probe.status.success() {
        bail!(
            "{} lacks torch/transformers, which the exporter needs: run .ci/setup --dev",
            python.display()
        );
    }
    let mut cmd = Command::new(&python);
    cmd.arg("-m")
        .arg("jetvlm_export")
        .arg(&args.hf_dir)
        .arg("--out")
        .arg(&args.out)
        .arg("--dtype")
        .arg(match args.dtype {
            ExportDType::Fp32 => "fp32",
            ExportDType::Fp16 => "fp16",
        })
        .arg("--kv-policy")
        .arg(&args.kv_policy)
        .env("PYTHONPATH", prepend_path(&root.join("models")));
    if let Some(size) = &args.frame_size {
        cmd.arg("--frame-size").arg(size);
    }
    for (flag, value) in [
        ("--name", &args.name),
        ("--template", &args.template),
        ("--question", &args.question),
    ] {
        if let Some(v) = value {
            cmd.arg(flag).arg(v);
        }
    }
    if args.force {
        cmd.arg("--force");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {} -m jetvlm_export", python.display()))?;
    match status.code() {
        Some(0) => match args.weight_bits {
            None => Ok(()),
            Some(bits) => quantize_decoder(&args, bits),
        },
        // The exporter has printed its one-line reason.
        Some(code) => std::process::exit(code),
        None => bail!("the exporter was killed by a signal ({status})"),
    }
}

/// `--weight-bits`: the exported package's decoder replaced by its quantized form (by
/// `jetvlm quantize`'s code, the one writer of the format). On failure the package is
/// removed: it was written by this command, and a package with a dense decoder is not what
/// was asked for.
fn quantize_decoder(args: &ExportArgs, bits: Bits) -> Result<()> {
    let opts = super::quantize::options(bits, args.weight_group, args.head_bits)?;
    let result = super::decoder_dir(&args.out).and_then(|dir| {
        jetvlm_decoder::quantize::quantize_in_place(&dir, &opts)
            .map(|r| (dir, r))
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok((dir, r)) => {
            println!(
                "quantized the decoder {}: {} matrices INT{} g{}{}, weights {:.1} MB -> {:.1} MB",
                dir.display(),
                r.matrices,
                opts.format.bits(),
                opts.format.group(),
                if opts.head_int8 {
                    " (LM head INT8)"
                } else {
                    ""
                },
                r.bytes_in as f64 / 1e6,
                r.bytes_out as f64 / 1e6
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&args.out);
            Err(e.context(format!(
                "--weight-bits: quantizing the decoder of {} (the package was removed)",
                args.out.display()
            )))
        }
    }
}

/// `dir` in front of an existing PYTHONPATH.
fn prepend_path(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned())
}

/// `--frame-size`: `N` or `WIDTHxHEIGHT`, positive integers (the exporter checks them against
/// the family's patch grid).
fn parse_frame_size(s: &str) -> Result<String, String> {
    let ok = |p: &str| p.parse::<u32>().is_ok_and(|n| n > 0);
    match s.split_once('x') {
        None if ok(s) => Ok(s.to_string()),
        Some((w, h)) if ok(w) && ok(h) => Ok(s.to_string()),
        _ => Err(format!(
            "`{s}` is not N or WIDTHxHEIGHT (positive integers)"
        )),
    }
}
