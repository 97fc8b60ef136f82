//! The MQTT sink (`rumqttc`): each event published on a topic made from a template
//! (`{source}`, `{rule}`), QoS 0 or 1, a retained status topic (`online` on every connect,
//! `offline` at the end and as the last will), TLS and username/password from the config.
//!
//! Delivery does not rest on the broker keeping a session: the sink keeps every event it
//! has not seen acknowledged (QoS 1: PUBACK) in a bounded queue of its own, and after a
//! reconnect publishes again what was in flight, oldest first. A broker restart therefore
//! loses no QoS 1 event (some may arrive twice: QoS 1 is at least once; each event's `seq`
//! tells copies apart). A full queue drops the new event and counts it.

use super::{Counters, Outgoing, backoff, check_queue, join_within};
use anyhow::{Context, Result};
use rumqttc::{
    Client, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS, RecvTimeoutError,
    TlsConfiguration, Transport,
};
use serde::Deserialize;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `sinks.mqtt` in the rules file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883, TLS: needs `tls.ca`).
    pub url: String,
    /// Topic of each event; `{source}` and `{rule}` (the rule's name, or the source event:
    /// `source_lost`, `source_restored`, `source_ended`, `source_failed`) are replaced.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// 0 (at most once) or 1 (at least once, kept until acknowledged).
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsFiles>,
    /// Retained `{"status":"online"|"offline",...}`; `{client_id}` is replaced; `null`: none.
    #[serde(default = "default_status_topic")]
    pub status_topic: Option<String>,
    /// Events held while the broker is away or has not acknowledged them.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// At the end of the run: how long to wait for the queue to be delivered.
    #[serde(default = "default_flush_ms")]
    pub flush_timeout_ms: u64,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

/// PEM files for `mqtts://`, relative to the rules file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate(s) the broker's certificate must chain to (for a public broker,
    /// the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt).
    pub ca: PathBuf,
    /// Client certificate and key, for brokers that ask for one (both or neither).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

fn default_topic() -> String {
    "jetvlm/{source}/{rule}".into()
}
fn default_qos() -> u8 {
    1
}
fn default_client_id() -> String {
    "jetvlm-analytics".into()
}
fn default_status_topic() -> Option<String> {
    Some("jetvlm/{client_id}/status".into())
}
fn default_queue() -> usize {
    1000
}
fn default_flush_ms() -> u64 {
    5000
}
fn default_keep_alive() -> u64 {
    30
}

/// A broker address from `url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` / `mqtts://host[:port]` (IPv6 in brackets).
pub fn parse_url(url: &str) -> Result<Broker, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!(
            "`{url}`: expected mqtt://host[:port] or mqtts://host[:port]"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err("credentials go in `username` and `password`, not in the URL".into());
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!("`{url}`: a broker URL has no path or query"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("`{url}`: expected `:port` after `]`"))?,
                ),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}`: no host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{url}`: port `{p}` is not 1-65535"))?,
    };
    Ok(Broker {
        host: host.into(),
        port,
        tls,
    })
}

/// Checks a topic template: not empty, no wildcards, only known `{placeholders}`.
fn check_template(template: &str, known: &[&str]) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty".into());
    }
    if template.contains(['+', '#']) {
        return Err(format!(
            "`{template}`: `+` and `#` are subscription wildcards"
        ));
    }
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{template}`: unclosed `{{`"))?;
        let name = &after[..end];
        if !known.contains(&name) {
            return Err(format!(
                "`{template}`: unknown placeholder `{{{name}}}` (known: {})",
                known
                    .iter()
                    .map(|k| format!("{{{k}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// A topic level from free text: MQTT's special characters become `_`.
fn topic_level(text: &str) -> String {
    text.chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl MqttConfig {
    /// Checks every field; an error names the field and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let field = |f: &str, e: String| (f.to_string(), e);
        let broker = parse_url(&self.url).map_err(|e| field("url", e))?;
        check_template(&self.topic, &["source", "rule"]).map_err(|e| field("topic", e))?;
        if let Some(t) = &self.status_topic {
            check_template(t, &["client_id"]).map_err(|e| field("status_topic", e))?;
        }
        if self.qos > 1 {
            return Err(field("qos", format!("must be 0 or 1, got {}", self.qos)));
        }
        if self.client_id.is_empty() || self.client_id.len() > 128 {
            return Err(field("client_id", "must be 1-128 characters".into()));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(field("password", "is set without `username`".into()));
        }
        match (&self.tls, broker.tls) {
            (None, true) => {
                return Err(field(
                    "tls",
                    "an mqtts:// broker needs `tls: { ca: FILE }`".into(),
                ));
            }
            (Some(_), false) => {
                return Err(field(
                    "tls",
                    "is set but `url` is mqtt:// (use mqtts://)".into(),
                ));
            }
            (Some(t), true) if t.client_cert.is_some() != t.client_key.is_some() => {
                return Err(field(
                    "tls",
                    "give both `client_cert` and `client_key`, or neither".into(),
                ));
            }
            _ => {}
        }
        check_queue(self.queue).map_err(|(f, e)| field(&f, e))?;
        if self.flush_timeout_ms > 600_000 {
            return Err(field(
                "flush_timeout_ms",
                format!("must be at most 600000, got {}", self.flush_timeout_ms),
            ));
        }
        if !(1..=65_535).contains(&self.keep_alive_s) {
            return Err(field(
                "keep_alive_s",
                format!("must be 1 to 65535 seconds, got {}", self.keep_alive_s),
            ));
        }
        Ok(())
    }

    pub(crate) fn resolve_paths(&mut self, dir: &Path) {
        if let Some(t) = &mut self.tls {
            for p in [
                Some(&mut t.ca),
                t.client_cert.as_mut(),
                t.client_key.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
    }

    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    fn status_topic(&self) -> Option<String> {
        self.status_topic
            .as_ref()
            .map(|t| t.replace("{client_id}", &topic_level(&self.client_id)))
    }

    /// The topic of an event.
    pub fn topic_of(&self, source: &str, key: &str) -> String {
        self.topic
            .replace("{source}", &topic_level(source))
            .replace("{rule}", &topic_level(key))
    }

    fn options(&self) -> Result<MqttOptions> {
        let broker = parse_url(&self.url).map_err(|e| anyhow::anyhow!("sinks.mqtt.url: {e}"))?;
        let mut o = MqttOptions::new(&self.client_id, &broker.host, broker.port);
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s));
        o.set_clean_session(true);
        if let Some(u) = &self.username {
            o.set_credentials(u, self.password.clone().unwrap_or_default());
        }
        if let Some(t) = self.status_topic() {
            o.set_last_will(LastWill::new(
                t,
                status_payload("offline", &self.client_id),
                QoS::AtLeastOnce,
                true,
            ));
        }
        if let Some(tls) = &self.tls {
            let read = |field: &str, p: &Path| {
                std::fs::read(p)
                    .with_context(|| format!("sinks.mqtt.tls.{field}: reading {}", p.display()))
            };
            let ca = read("ca", &tls.ca)?;
            let client_auth = match (&tls.client_cert, &tls.client_key) {
                (Some(c), Some(k)) => Some((read("client_cert", c)?, read("client_key", k)?)),
                _ => None,
            };
            // rustls is built without a default provider here: use ring (a second call
            // finds it installed). Deprecated only for lacking post-quantum key exchange,
            // which brokers do not require.
            #[allow(deprecated)]
            let _ = rustls::crypto::ring::default_provider().install_default();
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            }));
        }
        Ok(o)
    }
}

fn status_payload(status: &str, client_id: &str) -> Vec<u8> {
    serde_json::json!({"status": status, "client_id": client_id})
        .to_string()
        .into_bytes()
}

/// A message waiting or in flight.
struct Msg {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
    /// An event (counted), not a status message.
    event: bool,
}

struct InFlight {
    /// The packet id rumqttc gave it (known once written).
    pkid: Option<u16>,
    msg: Msg,
}

#[derive(Default)]
struct State {
    /// Not yet handed to the connection (the broker is away), oldest first.
    pending: VecDeque<Msg>,
    /// Handed to the connection, not yet acknowledged, oldest first.
    inflight: VecDeque<InFlight>,
    connected: bool,
}

impl State {
    fn events_held(&self) -> usize {
        self.pending.iter().filter(|m| m.event).count()
            + self.inflight.iter().filter(|m| m.msg.event).count()
    }

    /// Hands the pending messages to the connection, oldest first.
    fn submit(&mut self, client: &Client) {
        while let Some(m) = self.pending.pop_front() {
            match client.try_publish(m.topic.clone(), m.qos, m.retain, m.payload.clone()) {
                Ok(()) => self.inflight.push_back(InFlight { pkid: None, msg: m }),
                Err(e) => {
                    tracing::debug!("mqtt: request queue refused a publish: {e}");
                    self.pending.push_front(m);
                    break;
                }
            }
        }
    }

    /// The connection dropped: what was in flight goes back in front of the pending
    /// messages, in order.
    fn requeue(&mut self) {
        self.connected = false;
        while let Some(f) = self.inflight.pop_back() {
            self.pending.push_front(f.msg);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    counters: Counters,
    stop: AtomicBool,
    /// Set with `stop`: when the flush gives up.
    flush_until: Mutex<Option<Instant>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data (plain queues).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the end-of-run flush gives up (`None` while the run goes on).
    fn flush_deadline(&self) -> Option<Instant> {
        if !self.stop.load(Ordering::SeqCst) {
            return None;
        }
        *self.flush_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running MQTT sink.
pub struct MqttSink {
    cfg: MqttConfig,
    client: Client,
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

impl MqttSink {
    /// Starts the connection thread (it connects, and reconnects with backoff).
    pub fn start(cfg: &MqttConfig) -> Result<Self> {
        let opts = cfg.options()?;
        let (client, connection) = Client::new(opts, cfg.queue + 16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            flush_until: Mutex::new(None),
        });
        let thread = {
            let (cfg, client, shared) = (cfg.clone(), client.clone(), shared.clone());
            std::thread::Builder::new()
                .name("mqtt-sink".into())
                .spawn(move || drive(cfg, client, connection, &shared))
                .context("starting the MQTT sink thread")?
        };
        Ok(MqttSink {
            cfg: cfg.clone(),
            client,
            shared,
            thread,
        })
    }

    /// Queues an event (never blocks on the network).
    pub fn send(&self, event: &Outgoing) {
        let c = &self.shared.counters;
        Counters::add(&c.offered);
        let mut st = self.shared.state();
        if st.events_held() >= self.cfg.queue {
            drop(st);
            if Counters::add(&c.dropped) == 1 {
                eprintln!(
                    "jetvlm-analytics: mqtt {}: queue of {} events full, dropping new events (counted)",
                    self.cfg.url, self.cfg.queue
                );
            }
            return;
        }
        st.pending.push_back(Msg {
            topic: self.cfg.topic_of(&event.source, &event.key),
            payload: event.json.clone().into_bytes(),
            qos: self.cfg.qos(),
            retain: false,
            event: true,
        });
        if st.connected {
            st.submit(&self.client);
        }
    }

    /// Waits up to `flush_timeout_ms` for the queue to be delivered, publishes the
    /// `offline` status, disconnects; returns the summary line.
    pub fn finish(self) -> String {
        *self
            .shared
            .flush_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + Duration::from_millis(self.cfg.flush_timeout_ms));
        self.shared.stop.store(true, Ordering::SeqCst);
        let limit = Duration::from_millis(self.cfg.flush_timeout_ms) + Duration::from_secs(2);
        if !join_within(self.thread, limit) {
            tracing::warn!("mqtt: the sink thread did not stop in time");
        }
        let left = self.shared.state().events_held() as u64;
        let c = &self.shared.counters;
        if left > 0 {
            c.dropped
                .fetch_add(left, std::sync::atomic::Ordering::Relaxed);
        }
        c.line("mqtt", &format!("{}, qos {}", self.cfg.url, self.cfg.qos))
            + &if left > 0 {
                format!(" ({left} undelivered at exit)")
            } else {
                String::new()
            }
    }
}

/// The connection thread: polls the event loop, tracks acknowledgements, reconnects with
/// backoff, and at `stop` flushes (within the flush time) and says goodbye.
fn drive(cfg: MqttConfig, client: Client, mut connection: rumqttc::Connection, shared: &Shared) {
    let counters = &shared.counters;
    let status = cfg.status_topic();
    let mut attempt = 0u32;
    let mut goodbye_sent = false;
    loop {
        if let Some(deadline) = shared.flush_deadline() {
            let mut st = shared.state();
            let idle = st.events_held() == 0;
            if !st.connected && (idle || Instant::now() >= deadline) {
                return;
            }
            if st.connected && (idle || Instant::now() >= deadline) && !goodbye_sent {
                goodbye_sent = true;
                if let Some(t) = &status {
                    st.pending.push_back(Msg {
                        topic: t.clone(),
                        payload: status_payload("offline", &cfg.client_id),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        event: false,
                    });
                    st.submit(&client);
                }
                let _ = client.try_disconnect();
            }
            if goodbye_sent && Instant::now() >= deadline + Duration::from_secs(1) {
                return;
            }
        }
        match connection.recv_timeout(Duration::from_millis(100)) {
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                attempt = 0;
                tracing::info!(url = %cfg.url, "mqtt: connected");
                let mut st = shared.state();
                st.connected = true;
                if let Some(t) = &status {
                    st.pending.push_front(Msg {
                        topic: t.clone(),
                        payload: status_payload("online", &cfg.client_id),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        event: false,
                    });
                }
                st.submit(&client);
            }
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                let mut st = shared.state();
                if let Some(i) = st.inflight.iter().position(|f| f.pkid.is_none()) {
                    if st.inflight[i].msg.qos == QoS::AtMostOnce {
                        // QoS 0: written is all it gets.
                        if let Some(f) = st.inflight.remove(i)
                            && f.msg.event
                        {
                            Counters::add(&counters.delivered);
                        }
                    } else {
                        st.inflight[i].pkid = Some(pkid);
                    }
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                let mut st = shared.state();
                if let Some(i) = st.inflight.iter().position(|f| f.pkid == Some(ack.pkid))
                    && let Some(f) = st.inflight.remove(i)
                    && f.msg.event
                {
                    Counters::add(&counters.delivered);
                }
            }
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) if goodbye_sent => {
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                shared.state().requeue();
                if goodbye_sent {
                    return;
                }
                let n = Counters::add(&counters.errors);
                let line = connection_error(&cfg.url, &e);
                if n == 1 {
                    eprintln!(
                        "jetvlm-analytics: mqtt {line}; retrying with backoff, events queued (up to {})",
                        cfg.queue
                    );
                } else {
                    tracing::info!("mqtt {line}");
                }
                // Back off; the end of the run cuts the wait short once its flush time is
                // over.
                let wait = backoff(Duration::from_millis(100), attempt, Duration::from_secs(5));
                attempt = attempt.saturating_add(1);
                let until = Instant::now() + wait;
                while Instant::now() < until
                    && shared.flush_deadline().is_none_or(|d| Instant::now() < d)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn connection_error(url: &str, e: &ConnectionError) -> String {
    format!("{url}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> MqttConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            Broker {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(parse_url("mqtts://broker.lan").unwrap().port, 8883);
        assert_eq!(parse_url("mqtt://[::1]:1999").unwrap().host, "::1");
        for (url, want) in [
            ("http://x", "expected mqtt://"),
            ("mqtt://", "no host"),
            ("mqtt://h:0", "port"),
            ("mqtt://h:99999", "port"),
            ("mqtt://u:p@h", "credentials"),
            ("mqtt://h/topic", "no path"),
        ] {
            let e = parse_url(url).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn config_checks_name_the_field() {
        assert!(cfg("url: mqtt://h\n").validate().is_ok());
        for (yaml, field, want) in [
            ("url: mqtt://h\nqos: 2\n", "qos", "0 or 1"),
            ("url: mqtt://h\ntopic: a/+/b\n", "topic", "wildcards"),
            (
                "url: mqtt://h\ntopic: a/{camera}\n",
                "topic",
                "unknown placeholder",
            ),
            ("url: mqtts://h\n", "tls", "needs"),
            ("url: mqtt://h\ntls: {ca: x}\n", "tls", "mqtts://"),
            ("url: mqtt://h\npassword: x\n", "password", "username"),
            ("url: mqtt://h\nqueue: 0\n", "queue", "1 to"),
            ("url: mqtt://h\nkeep_alive_s: 0\n", "keep_alive_s", "1 to"),
        ] {
            let (f, e) = cfg(yaml).validate().unwrap_err();
            assert_eq!(f, field, "{yaml}");
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn topics_come_from_the_template() {
        let c = cfg("url: mqtt://h\nclient_id: cam/1\n");
        assert_eq!(c.topic_of("gate", "red-square"), "jetvlm/gate/red-square");
        assert_eq!(c.topic_of("gate", "a/b+#"), "jetvlm/gate/a_b__");
        assert_eq!(c.status_topic().as_deref(), Some("jetvlm/cam_1/status"));
    }
}
