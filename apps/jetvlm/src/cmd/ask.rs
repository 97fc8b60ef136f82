//! `jetvlm ask`: one question about one or more images with a model package, streamed to
//! stdout (stats on stderr) or reported as one JSON object.

use anyhow::{Context, Result};
use clap::Args;
use jetvlm_camera::Frame;
use jetvlm_runtime::RuntimeConfig;
use jetvlm_vision::RgbImage;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm ask --image frame.png \"what is in the picture?\"\n  \
    jetvlm ask --image a.png --image b.png \"what appeared?\" --json\n  \
    jetvlm ask --image frame.png --device cuda \"what is in the picture?\"   # --features cuda")]
pub struct AskArgs {
    /// Model package directory (holding jetvlm.yaml); default: the bundled demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Image file (PNG or JPEG); repeat for several frames, oldest first.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// The question (default: the package's default_question).
    pub question: Option<String>,
    /// KV cache policy: fp16, mixed, int4-all, int8-frames, mixed:bits=4,group=64,... or f32
    /// (exact reference cache). Default: the package's kv.policy.
    #[arg(long)]
    pub kv: Option<String>,
    /// A KV calibration file from `jetvlm calibrate` (a frame format per layer) instead of
    /// --kv.
    #[arg(long, conflicts_with = "kv")]
    pub kv_calibration: Option<PathBuf>,
    /// Runtime config YAML (KV policy, sampling, execution providers, ...); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Maximum tokens to generate (at least 1).
    #[arg(long, value_parser = super::at_least_one)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy, the default).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Seed of the sampler's random numbers (with a temperature above 0).
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub encoder: super::EncoderArgs,
    #[command(flatten)]
    pub image_limits: super::ImageLimitArgs,
    /// Print one JSON object (text, token ids, timings, KV bytes, execution provider).
    #[arg(long)]
    pub json: bool,
    /// Where the decoder runs: cpu, or cuda (prefill and decode on the GPU's KV pools; a
    /// build with the `cuda` feature). Default: the config's `device`, else cpu.
    #[arg(long)]
    pub device: Option<jetvlm_core::Device>,
}

pub fn run(args: AskArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(p) => RuntimeConfig::from_yaml(p)?,
        None => RuntimeConfig::default(),
    };
    super::apply_kv(&mut cfg, args.kv.clone(), args.kv_calibration.clone());
    if let Some(n) = args.max_tokens {
        anyhow::ensure!(
            (1..=RuntimeConfig::MAX_NEW_TOKENS).contains(&n),
            "--max-tokens {n}: must lie in 1..={}",
            RuntimeConfig::MAX_NEW_TOKENS
        );
        cfg.max_new_tokens = n;
    }
    if let Some(t) = args.temperature {
        cfg.sampling.temperature = t;
    }
    if let Some(s) = args.seed {
        cfg.sampling.seed = s;
    }
    super::generate::check_sampling(&cfg.sampling.to_sampler())?;
    args.encoder.apply(&mut cfg);
    super::apply_device(&mut cfg, args.device)?;

    let limits = args.image_limits.limits();
    let mut frames = Vec::with_capacity(args.images.len());
    for (i, path) in args.images.iter().enumerate() {
        let img = RgbImage::open_with_limits(path, &limits)
            .with_context(|| format!("reading image {}", path.display()))?;
        frames.push(Frame {
            index: i as u64,
            timestamp: Duration::ZERO,
            width: img.width,
            height: img.height,
            rgb: img.data,
        });
    }

    let (_, mut pipeline) = super::load_pipeline(args.model.as_deref(), cfg)?;
    let question = super::question_or_default(&pipeline, args.question.as_deref())?;

    let mut stream = pipeline.ask(&frames, &question)?;
    if args.json {
        let answer = stream.finish()?;
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for token in stream.by_ref() {
        let token = token?;
        out.write_all(token.text.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    let s = stream.stats();
    eprintln!(
        "{} frame(s), {} prompt tokens, {} generated | encoder {:.1} ms ({}) | decoder on {} | prefill {:.1} ms | TTFT {:.1} ms | TPOT {:.2} ms | KV {} ({} B: fp16 {} B, quant {} B; all-FP16 {} B)",
        s.frames,
        s.prompt_tokens,
        s.tokens,
        s.encoder_ms,
        s.execution_provider,
        s.decoder_device,
        s.prefill_ms,
        s.ttft_ms,
        s.tpot_ms,
        s.kv_policy,
        s.kv.total_bytes,
        s.kv.fp16_bytes,
        s.kv.quant_bytes,
        s.kv.fp16_equivalent_bytes
    );
    Ok(())
}
