//! Where events go: stdout JSON lines (always), an MQTT broker ([`mqtt`]) and an HTTP
//! webhook ([`webhook`]), configured under `sinks:` in the rules file.
//!
//! A network sink never stops or slows the analysis: events are handed to it without
//! blocking (each sink has a bounded queue of its own, the oldest kept, a new event dropped
//! and counted when it is full), delivery runs on the sink's thread, and every failure is
//! counted, logged (the first of each kind on stderr) and shown in the run's summary.
//!
//! ```yaml
//! sinks:
//!   mqtt:
//!     url: mqtt://127.0.0.1:1883          # mqtts://host:8883 for TLS (then `tls.ca`)
//!     topic: "jetvlm/{source}/{rule}"     # {rule}: the rule, or source_lost, ...
//!     qos: 1                              # 0: at most once, 1: at least once
//!     client_id: jetvlm-analytics
//!     username: cam                       # optional, with password
//!     password: secret
//!     tls: { ca: ca.pem, client_cert: client.pem, client_key: client.key }
//!     status_topic: "jetvlm/{client_id}/status"   # retained online/offline
//!     queue: 1000                         # events held while the broker is away
//!     flush_timeout_ms: 5000              # at the end: time to deliver what is queued
//!   webhook:
//!     url: http://127.0.0.1:8080/events   # each event POSTed as JSON
//!     retries: 3                          # after the first attempt
//!     backoff_ms: 200                     # doubled after each failed attempt
//!     timeout_ms: 2000                    # per request
//!     queue: 1000
//! ```

pub mod mqtt;
pub mod webhook;

use serde::Deserialize;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `sinks:` section of a rules file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    pub mqtt: Option<mqtt::MqttConfig>,
    pub webhook: Option<webhook::WebhookConfig>,
}

impl SinksConfig {
    /// Checks every field; an error names the field (below `sinks.`) and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(m) = &self.mqtt {
            m.validate().map_err(|(f, e)| (format!("mqtt.{f}"), e))?;
        }
        if let Some(w) = &self.webhook {
            w.validate().map_err(|(f, e)| (format!("webhook.{f}"), e))?;
        }
        Ok(())
    }

    /// Makes the file paths in the section relative to the rules file's directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        if let Some(m) = &mut self.mqtt {
            m.resolve_paths(dir);
        }
    }
}

/// Checks a bounded queue length.
pub(crate) fn check_queue(queue: usize) -> Result<(), (String, String)> {
    if queue == 0 || queue > MAX_QUEUE {
        return Err((
            "queue".into(),
            format!("must be 1 to {MAX_QUEUE} events, got {queue}"),
        ));
    }
    Ok(())
}

/// The longest queue a sink may hold.
pub const MAX_QUEUE: usize = 1_000_000;

/// An event as the sinks see it: its source, its topic key (the rule, or the source event's
/// kind) and its JSON text (the same line stdout gets).
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub source: String,
    pub key: String,
    pub json: String,
}

/// A sink's counters, shared between the analysis and the sink's thread.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events handed to the sink.
    pub offered: AtomicU64,
    /// Events the far end acknowledged (MQTT QoS 1: PUBACK; QoS 0: written to the socket;
    /// webhook: a 2xx answer).
    pub delivered: AtomicU64,
    /// Events given up: queue full, or (webhook) every attempt failed.
    pub dropped: AtomicU64,
    /// Failed connections or requests (each retry counts).
    pub errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// One summary line.
    pub fn line(&self, name: &str, detail: &str) -> String {
        format!(
            "{name} ({detail}): {} events, {} delivered, {} dropped, {} errors",
            Self::get(&self.offered),
            Self::get(&self.delivered),
            Self::get(&self.dropped),
            Self::get(&self.errors)
        )
    }
}

/// The configured network sinks.
pub struct Sinks {
    mqtt: Option<mqtt::MqttSink>,
    webhook: Option<webhook::WebhookSink>,
}

impl Sinks {
    /// Starts each configured sink's thread (nothing waits for a connection).
    pub fn start(cfg: &SinksConfig) -> anyhow::Result<Self> {
        Ok(Sinks {
            mqtt: cfg.mqtt.as_ref().map(mqtt::MqttSink::start).transpose()?,
            webhook: cfg
                .webhook
                .as_ref()
                .map(webhook::WebhookSink::start)
                .transpose()?,
        })
    }

    /// Hands an event to every sink; never blocks on the network.
    pub fn send(&self, event: &Outgoing) {
        if let Some(m) = &self.mqtt {
            m.send(event);
        }
        if let Some(w) = &self.webhook {
            w.send(event);
        }
    }

    /// Gives each sink up to its flush time to deliver what it holds, stops it, and
    /// returns one summary line per sink.
    pub fn finish(self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(m) = self.mqtt {
            lines.push(m.finish());
        }
        if let Some(w) = self.webhook {
            lines.push(w.finish());
        }
        lines
    }
}

/// Exponential backoff: `base`, doubled per attempt, at most `cap`.
pub fn backoff(base: Duration, attempt: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(cap)
}

/// Joins a sink thread, waiting at most `limit` (a thread stuck in the network is left
/// behind: the process ends anyway). Says whether it finished.
pub fn join_within(handle: std::thread::JoinHandle<()>, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !handle.is_finished() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    handle.join().is_ok()
}
