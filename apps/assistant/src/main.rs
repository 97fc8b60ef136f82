//! `jetvlm-assistant [SOURCE] --model DIR`: an on-device assistant for a robot or an operator.
//!
//! Questions arrive one per line on stdin (from a planner, a speech front end or a person).
//! For each question the assistant first takes `--fresh` new frames from the camera into a
//! [`jetvlm_runtime::StreamSession`] (the last `--window` frames stay in the
//! mixed-precision KV cache, the oldest evicted), then answers about the frames in the window.
//! Questions about motion ("did the red circle move?") see every frame in the window.
//!
//! Lines starting with `:` are commands: `:frames` lists the cached frames, `:quit` stops;
//! any other `:` line is an error listing them (never sent to the model as a question).
//! Answers go to stdout as text or, with `--json`, one JSON object per line. A question that
//! fails (too long for the model, say), an unknown command or a line that is not UTF-8 text
//! is reported and the assistant goes on; a camera that fails ends it with one error line and
//! a non-zero exit. A live camera (`rtsp://`, `csi://`) that loses its stream reconnects with
//! backoff; `source_lost` / `source_restored` are printed as they happen (with `--json`, one
//! object each: `{"event","source","unix_ms","reason"|"attempts","outage_ms"}`).
//!
//! With `--serve` the questions come over HTTP instead of stdin: the same camera, window and
//! model behind `jetvlm serve`'s OpenAI-compatible API (`camera://window` is this window),
//! `/metrics` and the live web view; both run the `jetvlm-serve` library.

use anyhow::{Context, Result};
use clap::Parser;
use jetvlm_camera::EventTap;
use jetvlm_runtime::{Pipeline, RuntimeConfig, StreamSession};
use serde::Serialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "jetvlm-assistant", version, about)]
struct Cli {
    /// Frame source URI: v4l2:///dev/video0 (feature `v4l`), synthetic://scene?seed=7,
    /// dir://frames/, file://img.png; rtsp://, video files, csi://N, gst:// (feature
    /// `gstreamer`; docs/cameras.md).
    #[arg(default_value = "synthetic://scene")]
    source: String,
    /// Model package directory (default: $JETVLM_MODEL).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Frames kept in the KV cache; older ones are evicted.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// New frames taken from the camera before each question.
    #[arg(long, default_value_t = 1)]
    fresh: usize,
    /// KV cache policy (fp16, mixed, ...); default: the package's.
    #[arg(long)]
    kv: Option<String>,
    /// Runtime config YAML (device, KV policy, sampling); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Maximum tokens per answer.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Capture timeout per frame, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// One JSON object per answer instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    log: jetvlm_app::LogArgs,
    /// Answer over HTTP instead of stdin: an OpenAI-compatible API, /metrics and a live web
    /// view (what `jetvlm serve` runs; see docs/serve.md).
    #[arg(long)]
    serve: bool,
    /// With --serve: the address to listen on (a non-loopback one without --api-key warns).
    #[arg(long, default_value = "127.0.0.1", requires = "serve")]
    host: std::net::IpAddr,
    /// With --serve: the port (0: any free port, printed on stderr).
    #[arg(long, default_value_t = 8080, requires = "serve")]
    port: u16,
    /// With --serve: require `Authorization: Bearer KEY` (default: $JETVLM_API_KEY).
    #[arg(long, requires = "serve")]
    api_key: Option<String>,
    /// With --serve: requests that may wait for the model (more get 429).
    #[arg(long, default_value_t = 8, requires = "serve")]
    queue: usize,
}

/// The `:` commands, for the error an unknown one gets.
const COMMANDS: &str = ":frames (list the cached frames), :quit (stop)";

/// A line that is neither a question nor a known command: one JSON object with `--json`,
/// else one text line; the session goes on.
fn reject_line(out: &mut impl Write, json: bool, line: &str, error: &str) -> Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "line": line, "error": error })
        )?;
    } else {
        writeln!(out, "(error: {error})")?;
    }
    out.flush()?;
    Ok(())
}

/// One answer.
#[derive(Serialize)]
struct Reply<'a> {
    question: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Index of the newest frame in the window.
    frame: Option<u64>,
    frames_cached: usize,
    /// The renderer's answer for the newest frame (synthetic sources, questions its
    /// dataset asks).
    #[serde(skip_serializing_if = "Option::is_none")]
    truth: Option<String>,
    ttft_ms: f64,
    tpot_ms: f64,
    tokens: usize,
    kv_bytes: u64,
    kv_fp16_equivalent_bytes: u64,
}

fn main() {
    jetvlm_app::pipe::init();
    let cli = Cli::parse();
    cli.log.init();
    jetvlm_app::exit_on_error(run(&cli));
}

fn run(cli: &Cli) -> Result<()> {
    anyhow::ensure!(
        (1..=RuntimeConfig::MAX_WINDOW_FRAMES).contains(&cli.window),
        "--window {}: must lie in 1..={}",
        cli.window,
        RuntimeConfig::MAX_WINDOW_FRAMES
    );
    anyhow::ensure!(
        (1..=RuntimeConfig::MAX_NEW_TOKENS).contains(&cli.max_tokens),
        "--max-tokens {}: must lie in 1..={}",
        cli.max_tokens,
        RuntimeConfig::MAX_NEW_TOKENS
    );
    let model = match (&cli.model, std::env::var_os("JETVLM_MODEL")) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => PathBuf::from(m),
        (None, None) => anyhow::bail!("no model: pass --model DIR or set JETVLM_MODEL"),
    };
    let mut cfg = match &cli.config {
        Some(p) => RuntimeConfig::from_yaml(p)?,
        None => RuntimeConfig::default(),
    };
    jetvlm_app::apply_kv(&mut cfg, cli.kv.clone(), None);
    cfg.window_frames = cli.window;
    cfg.max_new_tokens = cli.max_tokens;
    if cli.serve {
        return serve(cli, model, cfg);
    }
    let mut pipeline = Pipeline::load(&model, cfg)
        .with_context(|| format!("loading model package {}", model.display()))?;
    // The URI as shown: credentials (rtsp://user:pass@...) never reach the output.
    let shown = jetvlm_camera::uri::redact(&cli.source);
    let mut source = jetvlm_camera::open(&cli.source)
        .with_context(|| format!("opening frame source {shown}"))?;
    eprintln!(
        "jetvlm-assistant: {} on {} (KV {}, decoder on {}), window {} frames; one question per line, :frames, :quit",
        model.display(),
        source.describe(),
        pipeline.kv_policy(),
        pipeline.decoder_device(),
        cli.window
    );
    let timeout = Duration::from_millis(cli.timeout_ms);
    let mut session = pipeline.session()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut ended = false;
    let mut stdin = std::io::stdin().lock();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let n = stdin
            .read_until(b'\n', &mut raw)
            .context("reading questions from stdin")?;
        if n == 0 {
            break;
        }
        // A line that is not UTF-8 (binary input) is reported; the next line is read.
        let line = match std::str::from_utf8(&raw) {
            Ok(l) => l,
            Err(e) => {
                let shown = String::from_utf8_lossy(&raw).trim().to_string();
                reject_line(
                    &mut out,
                    cli.json,
                    &shown,
                    &format!(
                        "the line is not UTF-8 text (invalid byte at offset {}); send questions as UTF-8",
                        e.valid_up_to()
                    ),
                )?;
                continue;
            }
        };
        let question = line.trim();
        match question {
            "" => continue,
            ":quit" => break,
            ":frames" => {
                let frames: Vec<u64> = session.frames().iter().map(|f| f.index).collect();
                if cli.json {
                    writeln!(out, "{}", serde_json::json!({ "frames": frames }))?;
                } else {
                    writeln!(out, "frames in the window: {frames:?}")?;
                }
                out.flush()?;
                continue;
            }
            command if command.starts_with(':') => {
                reject_line(
                    &mut out,
                    cli.json,
                    command,
                    &format!("unknown command `{command}`; the commands are {COMMANDS}"),
                )?;
                continue;
            }
            _ => {}
        }
        if !ended {
            ended = take_frames(
                &mut session,
                source.as_mut(),
                cli.fresh,
                timeout,
                &shown,
                cli.json,
            )?;
        }
        let frames = session.frames();
        anyhow::ensure!(!frames.is_empty(), "{shown}: the source gave no frames");
        let newest = frames.iter().map(|f| f.index).max();
        let truth = source
            .ground_truth()
            .and_then(|t| jetvlm_camera::qa::single_frame_answer(question, t));
        let result = session.ask(question).and_then(|s| s.finish());
        let mut reply = Reply {
            question,
            answer: None,
            error: None,
            frame: newest,
            frames_cached: frames.len(),
            truth,
            ttft_ms: 0.0,
            tpot_ms: 0.0,
            tokens: 0,
            kv_bytes: 0,
            kv_fp16_equivalent_bytes: 0,
        };
        let text;
        match &result {
            Ok(a) => {
                text = a.text.trim().to_string();
                reply.answer = Some(&text);
                reply.ttft_ms = a.stats.ttft_ms;
                reply.tpot_ms = a.stats.tpot_ms;
                reply.tokens = a.stats.tokens;
                reply.kv_bytes = a.stats.kv.total_bytes;
                reply.kv_fp16_equivalent_bytes = a.stats.kv.fp16_equivalent_bytes;
            }
            Err(e) => reply.error = Some(jetvlm_core::error_line(e)),
        }
        if cli.json {
            writeln!(out, "{}", serde_json::to_string(&reply)?)?;
        } else {
            match (&reply.answer, &reply.error) {
                (Some(a), _) => writeln!(
                    out,
                    "{a}    [frame {}, {} cached, TTFT {:.1} ms]",
                    newest.unwrap_or(0),
                    reply.frames_cached,
                    reply.ttft_ms
                )?,
                (None, Some(e)) => writeln!(out, "(no answer: {e})")?,
                (None, None) => {}
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// `--serve`: the same source, window and model behind the `jetvlm-serve` library.
fn serve(cli: &Cli, model: PathBuf, cfg: RuntimeConfig) -> Result<()> {
    let mut opts = jetvlm_serve::ServeOptions::new(model, cfg);
    opts.source = Some(cli.source.clone());
    opts.host = cli.host;
    opts.port = cli.port;
    opts.api_key = match &cli.api_key {
        Some(k) => Some(k.clone()),
        None => std::env::var("JETVLM_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
    };
    opts.queue = cli.queue;
    opts.capture_timeout = Duration::from_millis(cli.timeout_ms);
    jetvlm_serve::serve(opts, |addr| {
        eprintln!(
            "jetvlm-assistant: serving on http://{addr} (camera {}, window {} frames); see docs/serve.md",
            cli.source, cli.window
        );
    })?;
    Ok(())
}

/// Takes `n` new frames into the session; returns true when the source has ended (the
/// window keeps what it has). A live source's connection events are printed as they happen
/// (also in the middle of an outage), and its reconnection timeouts are waited out: the
/// source bounds its own retries.
fn take_frames(
    session: &mut StreamSession<'_>,
    source: &mut dyn jetvlm_camera::FrameSource,
    n: usize,
    timeout: Duration,
    uri: &str,
    json: bool,
) -> Result<bool> {
    let mut failed = None;
    let ended = {
        let mut tap = EventTap::new(source, |e| {
            if let Err(err) = jetvlm_app::print_source_event(e, uri, json) {
                failed.get_or_insert(err);
            }
        });
        let mut ended = false;
        for _ in 0..n {
            if jetvlm_app::next_frame(session, &mut tap, timeout, uri)?.is_none() {
                ended = true;
                break;
            }
        }
        ended
    };
    if let Some(err) = failed {
        return Err(err).context("writing a source event to stdout");
    }
    Ok(ended)
}
