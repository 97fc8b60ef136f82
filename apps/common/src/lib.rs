//! What the jetvlm binaries (`jetvlm`, `jetvlm-analytics`, `jetvlm-assistant`) share: the
//! exit statuses ([`exit`]), a quiet end on a closed stdout ([`pipe`]), logging on stderr,
//! one-line error exits, frame capture with retries, the KV flags.

pub mod exit;
pub mod notify;
pub mod pipe;

pub use exit::{Exit, ExitCode, bad_input, check_failed, classify, does_not_fit};

use jetvlm_camera::{FrameSource, SourceEvent};
use jetvlm_core::FrameId;
use jetvlm_runtime::{RuntimeConfig, RuntimeError, SessionCapture, StreamSession};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Failed captures (timeouts or camera errors) in a row after which a source counts as dead.
pub const MAX_TIMEOUTS: u32 = 3;

/// Takes the next frame from `source` into `session`: `Some(id)`, or `None` at the end of
/// the stream. A capture timeout or a camera error (the source failed to deliver this
/// frame) is logged and the capture retried; [`MAX_TIMEOUTS`] failures in a row are an
/// error naming `uri` (and the last camera error). An error past the capture (the frame
/// cannot be encoded or cached) ends the run at once.
pub fn next_frame(
    session: &mut StreamSession<'_>,
    source: &mut dyn FrameSource,
    timeout: Duration,
    uri: &str,
) -> anyhow::Result<Option<FrameId>> {
    let mut last_error = None;
    for _ in 0..MAX_TIMEOUTS {
        match session.capture_from(source, timeout) {
            Ok(SessionCapture::Frame(id)) => return Ok(Some(id)),
            Ok(SessionCapture::EndOfStream) => return Ok(None),
            Ok(SessionCapture::Timeout) => tracing::warn!(source = %uri, "capture timed out"),
            Err(e @ RuntimeError::Camera { .. }) => {
                tracing::warn!(source = %uri, error = %jetvlm_core::error_line(&e), "capture failed; retrying");
                last_error = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    match last_error {
        Some(e) => Err(anyhow::Error::new(e).context(format!(
            "{uri}: no frame in {MAX_TIMEOUTS} captures in a row"
        ))),
        None => anyhow::bail!("{uri}: no frame in {MAX_TIMEOUTS} timeouts"),
    }
}

/// Applies `--kv` or `--kv-calibration` to a runtime config: either replaces both of the
/// config's keys.
pub fn apply_kv(cfg: &mut RuntimeConfig, kv: Option<String>, calibration: Option<PathBuf>) {
    if kv.is_some() || calibration.is_some() {
        cfg.kv_policy = kv;
        cfg.kv_calibration = calibration;
    }
}

/// The logging flags of every jetvlm binary, defined once: `--log FILTER` and
/// `--log-format text|json` (global: before or after a subcommand).
#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    /// Log filter in RUST_LOG syntax (e.g. `info`, `jetvlm_kvcache=debug`); RUST_LOG wins
    /// when set.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`: text lines, or one JSON object per line (for journald and collectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogArgs {
    /// Sets up logging as the flags say ([`init_logging`]).
    pub fn init(&self) {
        init_logging(&self.log, self.log_format == LogFormat::Json);
    }
}

/// tracing on stderr: `RUST_LOG` if set, else `filter` (RUST_LOG syntax), else `warn`; text,
/// or JSON lines with `json`. A second call is a no-op.
pub fn init_logging(filter: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Ends the process on an error: `error: ` and the error's causes on one line
/// ([`jetvlm_core::error_line`]) on stderr, and the exit status [`classify`] gives the error
/// (`warning: ` and status 6 for doctor's "ready with warnings").
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        // `jetvlm plan | head -1`: the reader has gone; end as a Unix tool ends.
        if pipe::is_broken_pipe(e.as_ref()) && pipe::stdout_closed() {
            pipe::die_of_sigpipe();
        }
        let code = classify(&e);
        let prefix = if code.is_error() { "error" } else { "warning" };
        eprintln!("{prefix}: {}", jetvlm_core::error_line(e.as_ref()));
        std::process::exit(code.code());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn log_flags_default_to_warn_text_and_take_json() {
        let d = Cli::try_parse_from(["x"]).unwrap().log;
        assert_eq!((d.log.as_str(), d.log_format), ("warn", LogFormat::Text));
        let j = Cli::try_parse_from(["x", "--log", "info", "--log-format", "json"])
            .unwrap()
            .log;
        assert_eq!((j.log.as_str(), j.log_format), ("info", LogFormat::Json));
        assert!(Cli::try_parse_from(["x", "--log-format", "xml"]).is_err());
    }
}

/// A connection event of a live source, as a JSON line (`--json` of `watch` and the assistant).
#[derive(Serialize)]
struct EventReport<'a> {
    /// `source_lost` or `source_restored`.
    event: &'static str,
    /// The source URI, credentials redacted.
    source: &'a str,
    /// Wall-clock time of the report, milliseconds since the Unix epoch.
    unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outage_ms: Option<f64>,
}

/// Prints a live source's connection event as it happens: one JSON line with `json`, else
/// one text line. `source` is the URI as it may be shown (credentials redacted).
pub fn print_source_event(event: &SourceEvent, source: &str, json: bool) -> std::io::Result<()> {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (line, report) = match event {
        SourceEvent::Lost { reason } => (
            format!("-- {source}: source lost ({reason}); reconnecting"),
            EventReport {
                event: "source_lost",
                source,
                unix_ms,
                reason: Some(reason),
                attempts: None,
                outage_ms: None,
            },
        ),
        SourceEvent::Restored { attempts, outage } => (
            format!(
                "-- {source}: source restored after {attempts} attempt(s), {:.1} s without frames",
                outage.as_secs_f64()
            ),
            EventReport {
                event: "source_restored",
                source,
                unix_ms,
                reason: None,
                attempts: Some(*attempts),
                outage_ms: Some(outage.as_secs_f64() * 1e3),
            },
        ),
    };
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string(&report).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else {
        writeln!(out, "{line}")?;
    }
    out.flush()
}
