//! `jetvlm watch SOURCE`: the camera loop. Frames stream from a source URI into a
//! [`StreamSession`](jetvlm_runtime::StreamSession) that keeps the last frames in the KV
//! cache (oldest evicted), and a standing question is answered after every frame, with
//! per-frame TTFT, TPOT and KV memory (actual vs the same tokens all-FP16).

use anyhow::{Context, Result};
use clap::Args;
use jetvlm_camera::{EventTap, FrameSource, SourceEvent};
use jetvlm_runtime::RuntimeConfig;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm watch \"synthetic://scene?seed=7\" --window 4 --question \"how many objects are there?\"\n  \
    jetvlm watch dir://frames/ --json\n  \
    jetvlm watch v4l2:///dev/video0 --model my-package --kv mixed        # --features v4l\n  \
    jetvlm watch v4l2:///dev/video0 --model my-package --kv-calibration kv-calibration.yaml")]
pub struct WatchArgs {
    /// Frame source URI: synthetic://scene?fps=10&seed=7, dir://frames/, file://img.png,
    /// v4l2:///dev/video0 (feature `v4l`); `rtsp://[user:pass@]host/path`, file://clip.mp4,
    /// csi://0, gst://...!appsink (feature `gstreamer`). See docs/cameras.md.
    #[arg(default_value = "synthetic://scene")]
    pub source: String,
    /// Model package directory (default: the bundled demo model, models/demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The standing question asked after each frame (default: the package's
    /// default_question).
    #[arg(long, short)]
    pub question: Option<String>,
    /// Frames kept in the cache; older ones are evicted.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Stop after this many frames (0 = until the source ends).
    #[arg(long, default_value_t = 12)]
    pub frames: u64,
    /// KV cache policy (fp16, mixed, int4-all, int8-frames, int2-frames, mixed:..., f32);
    /// default: the package's kv.policy.
    #[arg(long)]
    pub kv: Option<String>,
    /// A KV calibration file from `jetvlm calibrate` (a frame format per layer) instead of
    /// --kv.
    #[arg(long, conflicts_with = "kv")]
    pub kv_calibration: Option<PathBuf>,
    #[command(flatten)]
    pub encoder: super::EncoderArgs,
    // Limits on the image files a file:// or dir:// source decodes (the flags of `ask`); a
    // dir:// image over them is reported and skipped.
    #[command(flatten)]
    pub image_limits: super::ImageLimitArgs,
    /// Runtime config YAML; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Maximum tokens per answer (at least 1).
    #[arg(long, default_value_t = 16, value_parser = super::at_least_one)]
    pub max_tokens: usize,
    /// Capture timeout per frame, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// One JSON object per frame (JSON lines) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Where the decoder runs: cpu, or cuda (each question prefills the window's frames into
    /// fresh GPU KV pools; a build with the `cuda` feature). Default: the config's `device`.
    #[arg(long)]
    pub device: Option<jetvlm_core::Device>,
}

#[derive(Serialize)]
struct FrameReport<'a> {
    frame: u64,
    timestamp_ms: f64,
    frames_cached: usize,
    question: &'a str,
    answer: String,
    /// The renderer's answer for the latest frame (synthetic sources, questions the scene
    /// dataset asks); absent for cameras.
    #[serde(skip_serializing_if = "Option::is_none")]
    truth: Option<String>,
    /// Preprocessing + vision encoder time of this frame.
    encoder_ms: f64,
    /// The same for every frame of the window (what the question's context cost to encode).
    window_encoder_ms: f64,
    ttft_ms: f64,
    tpot_ms: f64,
    tokens: usize,
    kv_bytes: u64,
    kv_fp16_equivalent_bytes: u64,
    kv_policy: String,
    /// Where the decoder ran: `cpu`, or `cuda (<GPU name>)`.
    decoder_device: String,
    /// The vision encoder's ONNX Runtime execution provider: `tensorrt`, `cuda` or `cpu`.
    execution_provider: String,
}

/// The last JSON line of `watch --json`: the run's totals.
#[derive(Serialize)]
struct Summary {
    /// Always true: tells this line from the frame lines.
    summary: bool,
    frames: u64,
    /// Answers with a ground truth to compare with (synthetic sources).
    answers_judged: u64,
    answers_right: u64,
    position_rebases: u64,
    /// KV bytes cached at the end.
    kv_bytes: u64,
    /// Times a live source lost its stream, and times it came back.
    source_lost: u64,
    source_restored: u64,
}

pub fn run(args: WatchArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(p) => RuntimeConfig::from_yaml(p)?,
        None => RuntimeConfig::default(),
    };
    super::apply_kv(&mut cfg, args.kv.clone(), args.kv_calibration.clone());
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    cfg.window_frames = args.window;
    cfg.max_new_tokens = args.max_tokens;
    args.encoder.apply(&mut cfg);
    super::apply_device(&mut cfg, args.device)?;
    let (model, mut pipeline) = super::load_pipeline(args.model.as_deref(), cfg)?;
    let question = super::question_or_default(&pipeline, args.question.as_deref())?;
    // The URI as shown: credentials (rtsp://user:pass@...) never reach the output.
    let shown = jetvlm_camera::uri::redact(&args.source);
    let mut source = jetvlm_camera::open_with_limits(&args.source, &args.image_limits.limits())
        .with_context(|| format!("opening frame source {shown}"))?;
    let timeout = Duration::from_millis(args.timeout_ms);

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.json {
        writeln!(
            out,
            "watching {} with {} (encoder on {}, KV {}, decoder on {}), window {} frames; question: {question}",
            source.describe(),
            model.display(),
            pipeline.execution_provider(),
            pipeline.kv_policy(),
            pipeline.decoder_device(),
            args.window
        )?;
        writeln!(
            out,
            "{:>5} {:>9} {:>6}  {:<24} {:<8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>7}",
            "frame",
            "t ms",
            "cached",
            "answer",
            "truth",
            "enc ms",
            "TTFT ms",
            "TPOT ms",
            "KV KiB",
            "FP16 KiB",
            "FP16/KV"
        )?;
    }

    let mut session = pipeline.session()?;
    let mut seen = 0u64;
    let (mut judged, mut right) = (0u64, 0u64);
    // Connection events of a live source are printed as they happen (also mid-outage), and
    // a reconnecting source's timeouts are waited out: it bounds its own retries.
    let (lost, restored) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut event_error = None;
    let mut tap = EventTap::new(source.as_mut(), |e| {
        let n = match e {
            SourceEvent::Lost { .. } => &lost,
            SourceEvent::Restored { .. } => &restored,
        };
        n.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = jetvlm_app::print_source_event(e, &shown, args.json) {
            event_error.get_or_insert(err);
        }
    });
    while args.frames == 0 || seen < args.frames {
        let Some(id) = jetvlm_app::next_frame(&mut session, &mut tap, timeout, &shown)? else {
            break;
        };
        seen += 1;
        let cached = session.frames();
        let latest = cached.iter().find(|f| f.id == id).copied();
        let truth = tap
            .ground_truth()
            .and_then(|t| jetvlm_camera::qa::single_frame_answer(&question, t));
        let answer = session.ask(&question)?.finish()?;
        let s = &answer.stats;
        if let Some(t) = &truth {
            judged += 1;
            right += u64::from(answer.text.trim() == t);
        }
        let report = FrameReport {
            frame: latest.map(|f| f.index).unwrap_or(seen - 1),
            timestamp_ms: latest
                .map(|f| f.timestamp.as_secs_f64() * 1e3)
                .unwrap_or(0.0),
            frames_cached: cached.len(),
            question: &question,
            answer: answer.text.trim().to_string(),
            truth,
            encoder_ms: latest.map_or(0.0, |f| f.encoder_ms),
            window_encoder_ms: s.encoder_ms,
            ttft_ms: s.ttft_ms,
            tpot_ms: s.tpot_ms,
            tokens: s.tokens,
            kv_bytes: s.kv.total_bytes,
            kv_fp16_equivalent_bytes: s.kv.fp16_equivalent_bytes,
            kv_policy: s.kv_policy.clone(),
            decoder_device: s.decoder_device.clone(),
            execution_provider: s.execution_provider.clone(),
        };
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
        } else {
            let ratio = if report.kv_bytes > 0 {
                report.kv_fp16_equivalent_bytes as f64 / report.kv_bytes as f64
            } else {
                0.0
            };
            writeln!(
                out,
                "{:>5} {:>9.0} {:>6}  {:<24} {:<8} {:>8.1} {:>8.1} {:>8.2} {:>10.1} {:>10.1} {:>6.2}x",
                report.frame,
                report.timestamp_ms,
                report.frames_cached,
                truncate(&report.answer, 24),
                truncate(report.truth.as_deref().unwrap_or("-"), 8),
                report.encoder_ms,
                report.ttft_ms,
                report.tpot_ms,
                report.kv_bytes as f64 / 1024.0,
                report.kv_fp16_equivalent_bytes as f64 / 1024.0,
                ratio
            )?;
        }
        out.flush()?;
    }
    if let Some(e) = event_error {
        return Err(e).context("writing a source event");
    }
    anyhow::ensure!(seen > 0, "{shown}: the source gave no frames");
    if args.json {
        let summary = Summary {
            summary: true,
            frames: seen,
            answers_judged: judged,
            answers_right: right,
            position_rebases: session.rebases(),
            kv_bytes: session.kv_memory().total_bytes,
            source_lost: lost.load(Ordering::Relaxed),
            source_restored: restored.load(Ordering::Relaxed),
        };
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    }
    if !args.json && judged > 0 {
        writeln!(
            out,
            "{right} of {judged} answers match the scene's ground truth ({:.0}%); {} position re-bases",
            100.0 * right as f64 / judged as f64,
            session.rebases()
        )?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
