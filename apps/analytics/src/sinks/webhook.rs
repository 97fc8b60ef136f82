//! The webhook sink: each event POSTed as JSON (`Content-Type: application/json`) to a URL,
//! from a thread of its own with a bounded queue; a failed request (no connection, a
//! timeout, a non-2xx answer) is retried `retries` times with doubling backoff, then the
//! event is dropped and counted.

use super::{Counters, Outgoing, backoff, check_queue, join_within};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

/// `sinks.webhook` in the rules file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// Attempts after the first one.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry; doubled after each (at most 30 s).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Per request (connect, send, answer).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// At the end of the run: how long to wait for the queue to be delivered.
    #[serde(default = "default_flush_ms")]
    pub flush_timeout_ms: u64,
}

fn default_retries() -> u32 {
    3
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_queue() -> usize {
    1000
}
fn default_flush_ms() -> u64 {
    5000
}

impl WebhookConfig {
    /// Checks every field; an error names the field and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let field = |f: &str, e: String| (f.to_string(), e);
        let rest = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))
            .ok_or_else(|| {
                field(
                    "url",
                    format!(
                        "`{}`: expected http://host[:port]/path or https://...",
                        self.url
                    ),
                )
            })?;
        let host = rest.split(['/', '?']).next().unwrap_or("");
        if host.is_empty() || host.starts_with(':') {
            return Err(field("url", format!("`{}`: no host", self.url)));
        }
        if self.url.parse::<ureq::http::Uri>().is_err() {
            return Err(field("url", format!("`{}` is not a valid URL", self.url)));
        }
        if self.retries > 100 {
            return Err(field(
                "retries",
                format!("must be at most 100, got {}", self.retries),
            ));
        }
        for (name, v, max) in [
            ("backoff_ms", self.backoff_ms, 60_000),
            ("timeout_ms", self.timeout_ms, 600_000),
            ("flush_timeout_ms", self.flush_timeout_ms, 600_000),
        ] {
            if v > max {
                return Err(field(name, format!("must be at most {max}, got {v}")));
            }
        }
        if self.timeout_ms == 0 {
            return Err(field("timeout_ms", "must be at least 1".into()));
        }
        check_queue(self.queue).map_err(|(f, e)| field(&f, e))
    }
}

/// A running webhook sink.
pub struct WebhookSink {
    cfg: WebhookConfig,
    tx: SyncSender<Outgoing>,
    counters: Arc<Counters>,
    thread: JoinHandle<()>,
}

impl WebhookSink {
    pub fn start(cfg: &WebhookConfig) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue);
        let counters = Arc::new(Counters::default());
        let thread = {
            let (cfg, counters) = (cfg.clone(), counters.clone());
            std::thread::Builder::new()
                .name("webhook-sink".into())
                .spawn(move || deliver(&cfg, &rx, &counters))
                .context("starting the webhook sink thread")?
        };
        Ok(WebhookSink {
            cfg: cfg.clone(),
            tx,
            counters,
            thread,
        })
    }

    /// Queues an event (never blocks).
    pub fn send(&self, event: &Outgoing) {
        Counters::add(&self.counters.offered);
        match self.tx.try_send(event.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if Counters::add(&self.counters.dropped) == 1 {
                    eprintln!(
                        "jetvlm-analytics: webhook {}: queue of {} events full, dropping new events (counted)",
                        self.cfg.url, self.cfg.queue
                    );
                }
            }
        }
    }

    /// Closes the queue, waits up to the flush time for it to be delivered; returns the
    /// summary line.
    pub fn finish(self) -> String {
        let WebhookSink {
            cfg,
            tx,
            counters,
            thread,
        } = self;
        drop(tx);
        let limit = Duration::from_millis(cfg.flush_timeout_ms);
        let finished = join_within(thread, limit);
        let mut line = counters.line("webhook", &cfg.url);
        if !finished {
            // What the thread had not delivered by now is lost with the process.
            let c = &counters;
            let left = Counters::get(&c.offered)
                .saturating_sub(Counters::get(&c.delivered) + Counters::get(&c.dropped));
            line += &format!(" ({left} undelivered at exit)");
        }
        line
    }
}

/// The sink thread: POSTs each event, retrying with backoff.
fn deliver(cfg: &WebhookConfig, rx: &Receiver<Outgoing>, counters: &Counters) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(cfg.timeout_ms)))
        .http_status_as_error(false)
        .build()
        .into();
    let base = Duration::from_millis(cfg.backoff_ms);
    while let Ok(event) = rx.recv() {
        let mut delivered = false;
        for attempt in 0..=cfg.retries {
            if attempt > 0 {
                std::thread::sleep(backoff(base, attempt - 1, Duration::from_secs(30)));
            }
            let why = match agent
                .post(&cfg.url)
                .header("Content-Type", "application/json")
                .send(event.json.as_bytes())
            {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if Counters::add(&counters.errors) == 1 {
                eprintln!(
                    "jetvlm-analytics: webhook {}: {why}; retrying up to {} times with backoff (failures counted)",
                    cfg.url, cfg.retries
                );
            } else {
                tracing::warn!(url = %cfg.url, "webhook: {why}");
            }
        }
        if delivered {
            Counters::add(&counters.delivered);
        } else {
            Counters::add(&counters.dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_name_the_field() {
        let cfg = |y: &str| -> WebhookConfig { serde_saphyr::from_str(y).unwrap() };
        assert!(cfg("url: http://127.0.0.1:9/x\n").validate().is_ok());
        for (yaml, field) in [
            ("url: ftp://h/x\n", "url"),
            ("url: http:///x\n", "url"),
            ("url: http://h/x\nretries: 1000\n", "retries"),
            ("url: http://h/x\ntimeout_ms: 0\n", "timeout_ms"),
            ("url: http://h/x\nqueue: 0\n", "queue"),
        ] {
            assert_eq!(cfg(yaml).validate().unwrap_err().0, field, "{yaml}");
        }
    }
}
