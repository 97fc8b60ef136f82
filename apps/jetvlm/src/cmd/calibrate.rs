//! `jetvlm calibrate`: picks a KV frame format per decoder layer for a model package.
//!
//! Frames from a source go through the package's vision encoder; each prompt (a window of
//! frames and a question, then a few greedy answer tokens) runs through the CPU decoder on
//! the exact f32 cache while every layer's keys, values and queries are recorded. The
//! recorded traffic is replayed through the mixed cache under every frame format, and each
//! layer takes the cheapest one whose attention-output error stays under the target
//! (`jetvlm_calibration`). The result is a calibration file for `--kv-calibration` or the
//! runtime config's `kv_calibration`. Then, unless `--no-check`, the same prompts are
//! answered with the base policy and the calibrated one and compared with the f32 answers.

use anyhow::{Context, Result};
use clap::Args;
use jetvlm_calibration::{Calibration, Calibrator, Recorder};
use jetvlm_camera::{Capture, Frame};
use jetvlm_decoder::Input;
use jetvlm_decoder::sampler::argmax;
use jetvlm_kvcache::{CacheShape, KvPolicy};
use jetvlm_runtime::{Pipeline, RuntimeConfig};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm calibrate --out kv-calibration.yaml\n  \
    jetvlm calibrate --model my-package --source dir://sample-frames/ --out kv-calibration.yaml")]
pub struct CalibrateArgs {
    /// Where to write the calibration file (YAML).
    #[arg(long)]
    pub out: PathBuf,
    /// Model package directory (default: the bundled demo model, models/demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Frame source URI: synthetic://scene?seed=11, dir://frames/, file://img.png,
    /// v4l2:///dev/video0 (feature `v4l`). Use frames like the ones the model will see.
    #[arg(long, default_value = "synthetic://scene?seed=11")]
    pub source: String,
    /// Frames to take from the source; each prompt holds `--window` of them.
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Frames per prompt.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Questions asked of every window (repeat the flag; default: the package's
    /// default_question).
    #[arg(long, short)]
    pub question: Vec<String>,
    /// Greedy answer tokens recorded after each prompt (decode-time queries).
    #[arg(long, default_value_t = 4)]
    pub answer_tokens: usize,
    /// Largest relative RMS attention-output error a layer may have (per layer, against
    /// the exact f32 cache). Default: the base policy's worst layer error, so that no layer
    /// does worse than the base policy's worst layer.
    #[arg(long, allow_negative_numbers = true)]
    pub target: Option<f64>,
    /// Base policy: text precision, FP16 budget and block sizes (default: the package's
    /// kv.policy).
    #[arg(long)]
    pub kv: Option<String>,
    /// Skip answering the prompts again with the base and calibrated policies.
    #[arg(long)]
    pub no_check: bool,
    /// Print the calibration (and the check) as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Answers under one policy compared with the exact f32 cache's.
#[derive(Debug, Serialize)]
struct Check {
    policy: String,
    answers: usize,
    same_as_f32: usize,
    kv_bytes_mean: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    calibration: &'a Calibration,
    file: String,
    check: Vec<Check>,
}

fn capture(uri: &str, count: usize) -> Result<Vec<Frame>> {
    let mut source =
        jetvlm_camera::open(uri).with_context(|| format!("opening frame source {uri}"))?;
    let mut frames = Vec::with_capacity(count);
    let mut timeouts = 0;
    while frames.len() < count {
        match source.capture(Duration::from_secs(5))? {
            Capture::Frame(f) => frames.push(f),
            Capture::EndOfStream => break,
            Capture::Timeout => {
                timeouts += 1;
                anyhow::ensure!(timeouts < 3, "{uri}: no frame in 3 timeouts");
            }
        }
    }
    anyhow::ensure!(!frames.is_empty(), "{uri}: the source gave no frame");
    Ok(frames)
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    anyhow::ensure!(args.frames > 0, "--frames must be at least 1");
    let exact_cfg = RuntimeConfig {
        kv_policy: Some("f32".into()),
        max_new_tokens: args.answer_tokens.max(1),
        ..RuntimeConfig::default()
    };
    let (model_dir, mut pipeline) = super::load_pipeline(args.model.as_deref(), exact_cfg)?;
    let questions = if args.question.is_empty() {
        vec![super::question_or_default(&pipeline, None)?]
    } else {
        args.question.clone()
    };
    let package_policy: KvPolicy = pipeline
        .package()
        .manifest
        .kv
        .policy
        .parse()
        .context("the package's kv.policy")?;
    let base = match &args.kv {
        // As at run time, so the calibration measures the blocks the runtime will use.
        Some(p) => p
            .parse::<KvPolicy>()
            .with_context(|| format!("--kv {p}"))?
            .keeping_blocks_of(p, &package_policy),
        None => package_policy,
    };
    let config = &pipeline.package().decoder_config;
    let shape = CacheShape::of(config);
    let frames = capture(&args.source, args.frames)?;
    let windows: Vec<&[Frame]> = frames.chunks(args.window).collect();
    let capacity = config.max_position_embeddings.max(1);

    // 1. Record the exact run, prompt by prompt; 2. replay each prompt under every frame
    // format as it ends (only one prompt's traffic is held at a time).
    let mut recorder = Recorder::new(shape, capacity);
    let mut calibrator = Calibrator::new(shape, &base)?;
    for window in &windows {
        for q in &questions {
            let mut logits = pipeline.forward_prompt(window, q, &mut recorder)?;
            let model = pipeline.model().context("the CPU decoder")?;
            for _ in 0..args.answer_tokens {
                let id = [argmax(&logits)];
                logits = model
                    .forward(&[Input::text(&id)], &mut recorder)?
                    .last()
                    .to_vec();
            }
            if let Some(prompt) = recorder.take_prompt() {
                calibrator.add(&prompt)?;
            }
        }
    }

    // 3. Choose per layer, write the file.
    let source = format!(
        "{} ({} frames, {} per prompt; questions: {})",
        args.source,
        frames.len(),
        args.window,
        questions.join(" | ")
    );
    let cal = calibrator.finish(args.target, &model_dir.display().to_string(), &source)?;
    cal.save(&args.out)?;

    // 4. Answer again under the base and the calibrated policy.
    let mut check = Vec::new();
    if !args.no_check {
        let mut exact_answers = Vec::new();
        for window in &windows {
            for q in &questions {
                exact_answers.push(pipeline.ask(window, q)?.finish()?.text);
            }
        }
        drop(pipeline);
        let runs = [
            (cal.base_policy.clone(), None),
            (cal.policy.clone(), Some(args.out.clone())),
        ];
        for (name, file) in runs {
            let cfg = RuntimeConfig {
                kv_policy: file.is_none().then(|| name.clone()),
                kv_calibration: file,
                max_new_tokens: args.answer_tokens.max(1),
                ..RuntimeConfig::default()
            };
            let mut p = Pipeline::load(&model_dir, cfg)
                .with_context(|| format!("loading {} with {name}", model_dir.display()))?;
            let (mut same, mut bytes, mut n) = (0, 0u64, 0);
            for window in &windows {
                for q in &questions {
                    let a = p.ask(window, q)?.finish()?;
                    same += usize::from(a.text == exact_answers[n]);
                    bytes += a.stats.kv.total_bytes;
                    n += 1;
                }
            }
            check.push(Check {
                policy: name,
                answers: n,
                same_as_f32: same,
                kv_bytes_mean: bytes as f64 / n.max(1) as f64,
            });
        }
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let report = Report {
            calibration: &cal,
            file: args.out.display().to_string(),
            check,
        };
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "calibrated {} on {}: {} prompts, {} text queries, target error {:.4}",
        model_dir.display(),
        cal.samples.source,
        cal.samples.prompts,
        cal.samples.text_queries,
        cal.target_error
    )?;
    writeln!(
        out,
        "{:>5}  {:<7} {:>10} {:>10}",
        "layer", "format", "error", "base error"
    )?;
    for l in &cal.layers {
        let mark = if l.meets_target {
            ""
        } else {
            "  (no format meets the target)"
        };
        writeln!(
            out,
            "{:>5}  {:<7} {:>10.4} {:>10.4}{mark}",
            l.layer, l.format, l.error, l.base_error
        )?;
    }
    let b = &cal.kv_bytes;
    let kib = |x: u64| x as f64 / 1024.0;
    writeln!(out, "policy: {}", cal.policy)?;
    writeln!(
        out,
        "KV bytes of the prompts: calibrated {:.1} KiB, {} {:.1} KiB, base {} {:.1} KiB, FP16 {:.1} KiB",
        kib(b.calibrated),
        cal.uniform_policy
            .as_deref()
            .unwrap_or("(no single format meets the target)"),
        kib(b.uniform.unwrap_or(0)),
        cal.base_policy,
        kib(b.base),
        kib(b.fp16)
    )?;
    for c in &check {
        writeln!(
            out,
            "answers with {}: {} of {} as with the exact f32 cache (KV {:.1} KiB per answer)",
            c.policy,
            c.same_as_f32,
            c.answers,
            c.kv_bytes_mean / 1024.0
        )?;
    }
    writeln!(out, "wrote {}", args.out.display())?;
    Ok(())
}
