//! `jetvlm-analytics RULES.yaml`: video analytics on one or several cameras with the jetvlm
//! runtime.
//!
//! One model ([`jetvlm_runtime::Pipeline`]) serves every source of the rules file; each
//! source keeps its own rolling window of frames in a KV cache of its own (a
//! [`jetvlm_runtime::StreamSession`], parked while the model serves the others). Frames come
//! from each source's capture thread and are served by the file's `schedule` ([`sources`]).
//! After every `every`-th frame of a source each rule's standing question is asked about
//! that source's cached frames and the rule's [`rules::Monitor`] (one per source and rule)
//! turns the answer into an event: `initial` / `change` for `when: changes`, `alert` /
//! `clear` for predicates. A source's own events are `source_lost` / `source_restored` (a
//! live source reconnecting), `source_ended` and `source_failed` (the others go on).
//!
//! Every event names its source and goes to stdout as a JSON line (with `--all`, every
//! answer too) and to the configured sinks ([`sinks`]: MQTT, webhook). The KV memory of all
//! windows is charged at start with the planner's arithmetic and checked against
//! `kv_budget` ([`budget`]). A summary goes to stderr at the end; `--bench` prints frames
//! analysed per second and capture-to-event latency per source as one JSON object instead
//! of the events. Errors are one line and a non-zero exit.

mod budget;
mod rules;
mod sinks;
mod sources;

use anyhow::{Context, Result};
use clap::Parser;
use jetvlm_runtime::{ParkedSession, Pipeline, StreamSession};
use rules::{EventKind, Monitor, Rule, RulesFile};
use serde::Serialize;
use sinks::{Outgoing, Sinks};
use sources::{Captured, Next, Notice, Sources};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

#[derive(Parser, Debug)]
#[command(
    name = "jetvlm-analytics",
    version,
    about,
    after_help = "Examples:\n  jetvlm-analytics apps/analytics/examples/scene-rules.yaml\n  jetvlm-analytics apps/analytics/examples/multi-source.yaml --frames 40 --bench\n\nThe rules file (sources, schedule, kv_budget, sinks, rules) is described in docs/apps.md."
)]
struct Cli {
    /// The rules file (YAML): sources, model, window, sinks and the rules; see docs/apps.md.
    rules: PathBuf,
    /// Model package directory (overrides the rules file's `model`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// One frame source URI (replaces the rules file's sources; named `camera`).
    #[arg(long)]
    source: Option<String>,
    /// Frames to process per source (overrides the rules file's `frames`; 0: until the
    /// sources end).
    #[arg(long)]
    frames: Option<u64>,
    /// Print every answer, not only those that make an event.
    #[arg(long)]
    all: bool,
    /// Print no events; at the end, one JSON object with frames analysed per second and
    /// capture-to-event latency (p50/p95) per source. Sinks still get the events.
    #[arg(long, conflicts_with = "all")]
    bench: bool,
    /// Capture timeout per frame, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    #[command(flatten)]
    log: jetvlm_app::LogArgs,
}

/// One line of output: an answer and the event it made.
#[derive(Serialize)]
struct Record<'a> {
    source: &'a str,
    frame: u64,
    timestamp_ms: f64,
    rule: &'a str,
    question: &'a str,
    answer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<EventKind>,
    /// The event's number in this run (every source's events counted together).
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// The rule's previous answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<&'a str>,
    /// The renderer's answer (synthetic sources, questions its dataset asks).
    #[serde(skip_serializing_if = "Option::is_none")]
    truth: Option<&'a str>,
    /// When the frame was taken, in ms since the Unix epoch (the source's capture time:
    /// `FrameSource::capture_time`, else when the capture returned it).
    captured_unix_ms: f64,
    ttft_ms: f64,
    /// From the frame's capture (`captured_unix_ms`) to this answer.
    latency_ms: f64,
    kv_bytes: u64,
}

/// A source's own event (`source_lost`, `source_restored`, `source_ended`,
/// `source_failed`).
#[derive(Serialize)]
struct SourceRecord<'a> {
    source: &'a str,
    event: &'static str,
    seq: u64,
    /// When the scheduler took the event, in ms since the Unix epoch.
    unix_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outage_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// Frames taken from the source so far.
    frames: u64,
}

/// A rule's question that could not be answered on one frame: one JSON line on stdout (so
/// a consumer of the event stream sees it), the reason on stderr the first time.
#[derive(Serialize)]
struct ErrorRecord<'a> {
    source: &'a str,
    frame: u64,
    timestamp_ms: f64,
    rule: &'a str,
    error: &'a str,
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

/// A source's state in the run.
struct SourceRun {
    name: String,
    monitors: Vec<Monitor>,
    tallies: Vec<Tally>,
    /// Frames taken from the source.
    seen: u64,
    /// Frames the rules were asked about.
    analysed: u64,
    /// Capture-to-last-answer of each analysed frame, in ms.
    latencies: Vec<f64>,
    /// The largest KV cache of this source's answers.
    kv_max: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    /// How it stopped: `None` while it runs.
    end: Option<String>,
    parked: Option<ParkedSession>,
}

/// Writes events to stdout and the sinks, numbering them.
struct Emitter<'a> {
    out: std::io::StdoutLock<'a>,
    sinks: Sinks,
    seq: u64,
    quiet: bool,
}

impl Emitter<'_> {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// A line for stdout only (`--all` answers, question errors).
    fn line(&mut self, json: &str) -> Result<()> {
        if !self.quiet {
            writeln!(self.out, "{json}")?;
            self.out.flush()?;
        }
        Ok(())
    }

    /// An event: stdout and every sink.
    fn event(&mut self, source: &str, key: &str, json: String) -> Result<()> {
        self.line(&json)?;
        self.sinks.send(&Outgoing {
            source: source.into(),
            key: key.into(),
            json,
        });
        Ok(())
    }
}

/// Text tokens the template adds around a question (its role markers), charged in the KV
/// plan beside the question's own tokens.
const TEMPLATE_TOKENS: u64 = 32;

fn main() {
    jetvlm_app::pipe::init();
    let cli = Cli::parse();
    cli.log.init();
    jetvlm_app::exit_on_error(run(&cli));
}

fn run(cli: &Cli) -> Result<()> {
    let file = RulesFile::load(&cli.rules)?;
    let specs = file.source_specs(cli.source.as_deref());
    let frames = cli.frames.unwrap_or(file.frames);
    let model = file.model_dir(cli.model.as_deref())?;
    let mut pipeline = Pipeline::load(&model, file.runtime_config()?)
        .with_context(|| format!("loading model package {}", model.display()))?;

    // The first session tells the prompt's size; the plan is checked before the others.
    let first = pipeline.session()?;
    let prefix = first.prefix_tokens() as u64;
    let mut parked = vec![first.park()?];
    let question_tokens = file
        .rules
        .iter()
        .map(|r| {
            pipeline
                .tokenizer()
                .encode(&r.question, false)
                .map(|t| t.len())
        })
        .try_fold(0usize, |m, n| n.map(|n| m.max(n)))
        .context("tokenizing the rules' questions")?;
    let plan = budget::KvPlan::new(
        &pipeline.package().decoder_config,
        &pipeline.kv_policy(),
        pipeline.package().tokens_per_frame() as u64,
        file.window as u64,
        prefix + question_tokens as u64 + TEMPLATE_TOKENS,
        file.max_tokens as u64,
        specs.len() as u64,
    )?;
    if let Some(b) = &file.kv_budget {
        plan.check(b)
            .with_context(|| format!("{}", cli.rules.display()))?;
    }
    for _ in 1..specs.len() {
        parked.push(pipeline.session()?.park()?);
    }
    let mut runs: Vec<SourceRun> = specs
        .iter()
        .zip(parked)
        .map(|(s, p)| SourceRun {
            name: s.name.clone(),
            monitors: file
                .rules
                .iter()
                .map(|r| Monitor::new(r.when.clone()))
                .collect(),
            tallies: file.rules.iter().map(|_| Tally::default()).collect(),
            seen: 0,
            analysed: 0,
            latencies: Vec::new(),
            kv_max: 0,
            first: None,
            last: None,
            end: None,
            parked: Some(p),
        })
        .collect();
    let stdout = std::io::stdout();
    let mut emit = Emitter {
        out: stdout.lock(),
        sinks: Sinks::start(&file.sinks)?,
        seq: 0,
        quiet: cli.bench,
    };
    let questions = file.rules.iter().map(|r| r.question.clone()).collect();
    let timeout = Duration::from_millis(cli.timeout_ms);
    let mut sources = Sources::start(&specs, file.schedule, questions, timeout)?;
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    eprintln!(
        "jetvlm-analytics: {} rules on {} source(s) ({}) with {} (KV {}, decoder on {}), window {} frames, every {} frame(s), schedule {}; {}",
        file.rules.len(),
        specs.len(),
        names.join(", "),
        model.display(),
        pipeline.kv_policy(),
        pipeline.decoder_device(),
        file.window,
        file.every,
        serde_json::to_value(file.schedule)?
            .as_str()
            .unwrap_or("round_robin"),
        plan.describe()
    );

    let started = Instant::now();
    loop {
        match sources.next() {
            Next::Done => break,
            Next::Notice(i, notice) => source_event(&mut runs[i], &notice, &mut emit)?,
            Next::Frame(i, captured) => {
                let run = &mut runs[i];
                if run.end.is_some() {
                    continue;
                }
                let Some(p) = run.parked.take() else {
                    continue;
                };
                let mut session = pipeline.resume(p);
                let outcome = analyse(&mut session, run, &file, captured, cli.all, &mut emit);
                run.parked = Some(session.park()?);
                if let Err(e) = outcome {
                    // The frame could not go into this source's window: the source stops,
                    // the others go on.
                    let error = jetvlm_core::error_line(e.as_ref());
                    source_event(run, &Notice::Failed { error }, &mut emit)?;
                    sources.stop(i);
                } else if frames > 0 && run.seen >= frames {
                    run.end = Some(format!("{frames} frames"));
                    sources.stop(i);
                }
            }
        }
    }
    let wall = started.elapsed();
    drop(sources);
    let sink_lines = emit.sinks.finish();
    summarize(
        &runs,
        &file.rules,
        &plan,
        &sink_lines,
        wall,
        cli.bench,
        file.schedule,
    )
}

/// Pushes a frame into the source's window and, every `every` frames, asks each rule.
fn analyse(
    session: &mut StreamSession<'_>,
    run: &mut SourceRun,
    file: &RulesFile,
    captured: Captured,
    all: bool,
    emit: &mut Emitter<'_>,
) -> Result<()> {
    let Captured {
        frame,
        captured,
        truths,
    } = captured;
    let age = || {
        SystemTime::now()
            .duration_since(captured)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1e3
    };
    let captured_unix_ms = unix_ms(captured);
    session.push_frame(&frame)?;
    run.seen += 1;
    run.first.get_or_insert_with(Instant::now);
    if !(run.seen - 1).is_multiple_of(file.every) {
        return Ok(());
    }
    let (index, timestamp_ms) = (frame.index, frame.timestamp.as_secs_f64() * 1e3);
    for (k, rule) in file.rules.iter().enumerate() {
        let (monitor, tally) = (&mut run.monitors[k], &mut run.tallies[k]);
        let answer = match session.ask(&rule.question).and_then(|s| s.finish()) {
            Ok(a) => a,
            Err(e) => {
                let error = jetvlm_core::error_line(&e);
                if tally.errors == 0 {
                    eprintln!(
                        "jetvlm-analytics: source {}: rule {}: cannot ask its question: {error} (the other rules go on)",
                        run.name, rule.name
                    );
                }
                tally.errors += 1;
                let record = ErrorRecord {
                    source: &run.name,
                    frame: index,
                    timestamp_ms,
                    rule: &rule.name,
                    error: &error,
                };
                emit.line(&serde_json::to_string(&record)?)?;
                continue;
            }
        };
        let text = answer.text.trim().to_string();
        let previous = monitor.last().map(str::to_string);
        let event = monitor.observe(&text);
        let truth = truths.get(k).cloned().flatten();
        tally.answers += 1;
        tally.events += u64::from(event.is_some());
        if let Some(t) = &truth {
            tally.judged += 1;
            tally.right += u64::from(*t == text);
        }
        run.kv_max = run.kv_max.max(answer.stats.kv.total_bytes);
        if event.is_some() || all {
            let seq = event.map(|_| emit.next_seq());
            let record = Record {
                source: &run.name,
                frame: index,
                timestamp_ms,
                rule: &rule.name,
                question: &rule.question,
                answer: &text,
                event,
                seq,
                previous: previous.as_deref(),
                truth: truth.as_deref(),
                captured_unix_ms,
                ttft_ms: answer.stats.ttft_ms,
                latency_ms: age(),
                kv_bytes: answer.stats.kv.total_bytes,
            };
            let json = serde_json::to_string(&record)?;
            if event.is_some() {
                emit.event(&run.name, &rule.name, json)?;
            } else {
                emit.line(&json)?;
            }
        }
    }
    run.analysed += 1;
    run.latencies.push(age());
    run.last = Some(Instant::now());
    Ok(())
}

/// Emits a source's own event and records how it ended.
fn source_event(run: &mut SourceRun, notice: &Notice, emit: &mut Emitter<'_>) -> Result<()> {
    let seq = emit.next_seq();
    let mut rec = SourceRecord {
        source: &run.name,
        event: "",
        seq,
        unix_ms: unix_ms(SystemTime::now()),
        reason: None,
        attempts: None,
        outage_ms: None,
        error: None,
        frames: run.seen,
    };
    match notice {
        Notice::Lost { reason } => {
            rec.event = "source_lost";
            rec.reason = Some(reason);
            eprintln!("jetvlm-analytics: source {}: lost: {reason}", run.name);
        }
        Notice::Restored { attempts, outage } => {
            rec.event = "source_restored";
            rec.attempts = Some(*attempts);
            rec.outage_ms = Some(outage.as_secs_f64() * 1e3);
        }
        Notice::Ended => rec.event = "source_ended",
        Notice::Failed { error } => {
            rec.event = "source_failed";
            rec.error = Some(error);
            eprintln!(
                "jetvlm-analytics: source {}: failed: {error} (the other sources go on)",
                run.name
            );
        }
    }
    let event = rec.event;
    let json = serde_json::to_string(&rec)?;
    match notice {
        Notice::Ended if run.end.is_none() => run.end = Some("ended".into()),
        Notice::Failed { error } if run.end.is_none() => run.end = Some(format!("failed: {error}")),
        _ => {}
    }
    let name = run.name.clone();
    emit.event(&name, event, json)
}

/// Milliseconds since the Unix epoch (0 for a time before it).
fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The `p`-th percentile (0-100) of `values`, nearest rank.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

#[derive(Serialize)]
struct BenchSource<'a> {
    source: &'a str,
    frames: u64,
    frames_analysed: u64,
    analysed_per_s: f64,
    latency_ms_p50: Option<f64>,
    latency_ms_p95: Option<f64>,
    kv_bytes_max: u64,
    end: Option<&'a str>,
}

/// The summary on stderr (and with `--bench` the figures on stdout); an error when no
/// source gave a frame or every question failed.
fn summarize(
    runs: &[SourceRun],
    rules: &[Rule],
    plan: &budget::KvPlan,
    sink_lines: &[String],
    wall: Duration,
    bench: bool,
    schedule: rules::Schedule,
) -> Result<()> {
    let seen: u64 = runs.iter().map(|r| r.seen).sum();
    if seen == 0 {
        let why: Vec<String> = runs
            .iter()
            .map(|r| format!("{}: {}", r.name, r.end.as_deref().unwrap_or("no frame")))
            .collect();
        anyhow::bail!("the sources gave no frames ({})", why.join("; "));
    }
    let asked: u64 = runs
        .iter()
        .flat_map(|r| &r.tallies)
        .map(|t| t.answers + t.errors)
        .sum();
    let failed: u64 = runs.iter().flat_map(|r| &r.tallies).map(|t| t.errors).sum();
    for r in runs {
        let end = r.end.as_deref().unwrap_or("stopped");
        eprintln!(
            "jetvlm-analytics: source {}: {} frames, {} analysed ({end}); KV at most {} B (planned {} B)",
            r.name, r.seen, r.analysed, r.kv_max, plan.per_source.total_bytes
        );
        for (rule, t) in rules.iter().zip(&r.tallies) {
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
    }
    for l in sink_lines {
        eprintln!("jetvlm-analytics: {l}");
    }
    if bench {
        let per: Vec<BenchSource> = runs
            .iter()
            .map(|r| {
                let span = match (r.first, r.last) {
                    (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
                    _ => wall.as_secs_f64(),
                };
                // Frames analysed after the first, over the time from the first to the last.
                let rate = if r.analysed > 1 && span > 0.0 {
                    (r.analysed - 1) as f64 / span
                } else {
                    0.0
                };
                BenchSource {
                    source: &r.name,
                    frames: r.seen,
                    frames_analysed: r.analysed,
                    analysed_per_s: rate,
                    latency_ms_p50: percentile(&r.latencies, 50.0),
                    latency_ms_p95: percentile(&r.latencies, 95.0),
                    kv_bytes_max: r.kv_max,
                    end: r.end.as_deref(),
                }
            })
            .collect();
        let total: f64 = per.iter().map(|p| p.analysed_per_s).sum();
        let doc = serde_json::json!({
            "bench": true,
            "sources": runs.len(),
            "schedule": schedule,
            "rules": rules.len(),
            "wall_s": wall.as_secs_f64(),
            "analysed_per_s_total": total,
            "per_source": per,
        });
        println!("{doc}");
    }
    anyhow::ensure!(
        asked == 0 || failed < asked,
        "every question failed on every frame ({failed} errors; each rule's first is above)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&[3.0], 95.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
