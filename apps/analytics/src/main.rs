//! `jetvlm-analytics RULES.yaml`: video analytics on a camera with the jetvlm runtime.
//!
//! Frames stream from the rules file's source into a [`jetvlm_runtime::StreamSession`]
//! (the last `window` frames kept in the mixed-precision KV cache, older ones evicted). After
//! every `every`-th frame each rule's standing question is asked about the cached frames (the
//! frames are encoded once, not once per question) and the rule's [`rules::Monitor`] turns
//! the answer into an event: `initial` / `change` for `when: changes`, `alert` / `clear` for
//! predicates. Events go to stdout as JSON lines (with `--all`, every answer); a summary goes
//! to stderr at the end. Errors are one line and a non-zero exit.

mod rules;

use anyhow::{Context, Result};
use clap::Parser;
use jetvlm_runtime::Pipeline;
use rules::{EventKind, Monitor, RulesFile};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "jetvlm-analytics", version, about)]
struct Cli {
    /// The rules file (YAML): source, model, window and the rules; see docs/apps.md.
    rules: PathBuf,
    /// Model package directory (overrides the rules file's `model`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Frame source URI (overrides the rules file's `source`).
    #[arg(long)]
    source: Option<String>,
    /// Frames to process (overrides the rules file's `frames`; 0: until the source ends).
    #[arg(long)]
    frames: Option<u64>,
    /// Print every answer, not only those that make an event.
    #[arg(long)]
    all: bool,
    /// Capture timeout per frame, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Log filter in RUST_LOG syntax; RUST_LOG wins when set.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// One line of output: an answer and the event it made.
#[derive(Serialize)]
struct Record<'a> {
    frame: u64,
    timestamp_ms: f64,
    rule: &'a str,
    question: &'a str,
    answer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<EventKind>,
    /// The rule's previous answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<&'a str>,
    /// The renderer's answer (synthetic sources, questions its dataset asks).
    #[serde(skip_serializing_if = "Option::is_none")]
    truth: Option<&'a str>,
    ttft_ms: f64,
    kv_bytes: u64,
}

/// Per-rule counts for the summary.
#[derive(Default)]
struct Tally {
    answers: u64,
    events: u64,
    judged: u64,
    right: u64,
    /// Questions that failed (a question too long for the context, ...): reported on
    /// stderr the first time, counted, and the run goes on with the other rules.
    errors: u64,
}

/// A rule's question that could not be answered on one frame: one JSON line on stdout (so
/// a consumer of the event stream sees it), the reason on stderr the first time.
#[derive(Serialize)]
struct ErrorRecord<'a> {
    frame: u64,
    timestamp_ms: f64,
    rule: &'a str,
    error: &'a str,
}

fn main() {
    let cli = Cli::parse();
    jetvlm_app::init_logging(&cli.log, false);
    jetvlm_app::exit_on_error(run(&cli));
}

fn run(cli: &Cli) -> Result<()> {
    let file = RulesFile::load(&cli.rules)?;
    let source_uri = cli.source.clone().unwrap_or_else(|| file.source.clone());
    let frames = cli.frames.unwrap_or(file.frames);
    let model = file.model_dir(cli.model.as_deref())?;
    let mut pipeline = Pipeline::load(&model, file.runtime_config()?)
        .with_context(|| format!("loading model package {}", model.display()))?;
    let mut source = jetvlm_camera::open(&source_uri)
        .with_context(|| format!("opening frame source {source_uri}"))?;
    eprintln!(
        "jetvlm-analytics: {} rules on {source_uri} with {} (KV {}, decoder on {}), window {} frames, every {} frame(s)",
        file.rules.len(),
        model.display(),
        pipeline.kv_policy(),
        pipeline.decoder_device(),
        file.window,
        file.every
    );
    let mut monitors: Vec<Monitor> = file
        .rules
        .iter()
        .map(|r| Monitor::new(r.when.clone()))
        .collect();
    let mut tallies: Vec<Tally> = file.rules.iter().map(|_| Tally::default()).collect();
    let timeout = Duration::from_millis(cli.timeout_ms);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut session = pipeline.session()?;
    let mut seen = 0u64;
    while frames == 0 || seen < frames {
        let Some(id) = jetvlm_app::next_frame(&mut session, source.as_mut(), timeout, &source_uri)?
        else {
            break;
        };
        seen += 1;
        if !(seen - 1).is_multiple_of(file.every) {
            continue;
        }
        let latest = session.frames().into_iter().find(|f| f.id == id);
        let (frame, timestamp_ms) = latest.map_or((seen - 1, 0.0), |f| {
            (f.index, f.timestamp.as_secs_f64() * 1e3)
        });
        let truth_of = |q: &str| {
            source
                .ground_truth()
                .and_then(|t| jetvlm_camera::qa::single_frame_answer(q, t))
        };
        for ((rule, monitor), tally) in file.rules.iter().zip(&mut monitors).zip(&mut tallies) {
            let answer = match session.ask(&rule.question).and_then(|s| s.finish()) {
                Ok(a) => a,
                Err(e) => {
                    let error = jetvlm_core::error_line(&e);
                    if tally.errors == 0 {
                        eprintln!(
                            "jetvlm-analytics: rule {}: cannot ask its question: {error} (the other rules go on)",
                            rule.name
                        );
                    }
                    tally.errors += 1;
                    let record = ErrorRecord {
                        frame,
                        timestamp_ms,
                        rule: &rule.name,
                        error: &error,
                    };
                    writeln!(out, "{}", serde_json::to_string(&record)?)?;
                    out.flush()?;
                    continue;
                }
            };
            let text = answer.text.trim().to_string();
            let previous = monitor.last().map(str::to_string);
            let event = monitor.observe(&text);
            let truth = truth_of(&rule.question);
            tally.answers += 1;
            tally.events += u64::from(event.is_some());
            if let Some(t) = &truth {
                tally.judged += 1;
                tally.right += u64::from(*t == text);
            }
            if event.is_some() || cli.all {
                let record = Record {
                    frame,
                    timestamp_ms,
                    rule: &rule.name,
                    question: &rule.question,
                    answer: &text,
                    event,
                    previous: previous.as_deref(),
                    truth: truth.as_deref(),
                    ttft_ms: answer.stats.ttft_ms,
                    kv_bytes: answer.stats.kv.total_bytes,
                };
                writeln!(out, "{}", serde_json::to_string(&record)?)?;
                out.flush()?;
            }
        }
    }
    anyhow::ensure!(seen > 0, "{source_uri}: the source gave no frames");
    let asked: u64 = tallies.iter().map(|t| t.answers + t.errors).sum();
    let failed: u64 = tallies.iter().map(|t| t.errors).sum();
    anyhow::ensure!(
        asked == 0 || failed < asked,
        "every question failed on every frame ({failed} errors; each rule's first is above)"
    );
    eprintln!("jetvlm-analytics: {seen} frames");
    for (rule, t) in file.rules.iter().zip(&tallies) {
        let truth = if t.judged > 0 {
            format!(", {}/{} match the scene's ground truth", t.right, t.judged)
        } else {
            String::new()
        };
        let errors = if t.errors > 0 {
            format!(", {} errors", t.errors)
        } else {
            String::new()
        };
        eprintln!(
            "  {:<20} {} answers, {} events{truth}{errors}",
            rule.name, t.answers, t.events
        );
    }
    Ok(())
}
