//! Counters, gauges and histograms, written as Prometheus text (`GET /metrics`).
//!
//! | name | kind | what |
//! |---|---|---|
//! | `jetvlm_requests_total{status}` | counter | chat-completion requests by HTTP status |
//! | `jetvlm_generations_total{outcome}` | counter | answers by how they ended: `stop`, `length`, `cancelled` (client gone), `timeout`, `error` |
//! | `jetvlm_ttft_seconds` | histogram | time to first token, from the model taking the request |
//! | `jetvlm_tpot_seconds` | histogram | mean time per output token after the first, per answer |
//! | `jetvlm_queue_wait_seconds` | histogram | time a request waited in the queue |
//! | `jetvlm_prompt_tokens_total`, `jetvlm_completion_tokens_total`, `jetvlm_cached_prompt_tokens_total` | counter | tokens |
//! | `jetvlm_queue_depth`, `jetvlm_queue_capacity` | gauge | requests waiting for the model, and the most that may |
//! | `jetvlm_kv_bytes{precision}` | gauge | KV cache bytes by precision (`fp16`, `quant`, `f32`) after the last answer or frame |
//! | `jetvlm_kv_fp16_equivalent_bytes` | gauge | what the same tokens would take all-FP16 |
//! | `jetvlm_frames_captured_total` | counter | frames taken from `--source` |
//! | `jetvlm_frames_windowed_total` | counter | frames encoded into the rolling window |
//! | `jetvlm_frames_dropped_total` | counter | captured frames that never entered the window (the model was busy) |
//! | `jetvlm_window_frames` | gauge | frames in the window now |
//! | `jetvlm_model_info{model,kv_policy,encoder_provider,decoder}` | gauge | 1, labels describe the loaded model |
//! | `jetvlm_ready` | gauge | 1 once the model is loaded |

use jetvlm_runtime::KvStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds (seconds) of the time-to-first-token and queue-wait histograms.
pub const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket bounds (seconds) of the time-per-output-token histogram.
pub const TPOT_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A cumulative histogram.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last counts values past every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything `/metrics` reports that is not read from elsewhere at render time.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    ttft: Mutex<Histogram>,
    tpot: Mutex<Histogram>,
    queue_wait: Mutex<Histogram>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub frames_windowed: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub window_frames: AtomicU64,
    kv: Mutex<KvStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            outcomes: Mutex::default(),
            ttft: Mutex::new(Histogram::new(&TTFT_BUCKETS)),
            tpot: Mutex::new(Histogram::new(&TPOT_BUCKETS)),
            queue_wait: Mutex::new(Histogram::new(&TTFT_BUCKETS)),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            frames_windowed: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            window_frames: AtomicU64::new(0),
            kv: Mutex::default(),
        }
    }
}

/// What the render reads from outside the metrics (the camera, the queue, the model).
#[derive(Debug, Default)]
pub struct Gauges<'a> {
    pub ready: bool,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub frames_captured: Option<u64>,
    /// model, kv_policy, encoder provider, decoder device.
    pub model: Option<[&'a str; 4]>,
}

impl Metrics {
    pub fn request(&self, status: u16) {
        *lock(&self.requests).entry(status).or_default() += 1;
    }

    pub fn outcome(&self, outcome: &'static str) {
        *lock(&self.outcomes).entry(outcome).or_default() += 1;
    }

    pub fn outcomes(&self, outcome: &str) -> u64 {
        lock(&self.outcomes).get(outcome).copied().unwrap_or(0)
    }

    pub fn answer(&self, ttft_ms: f64, tpot_ms: Option<f64>) {
        lock(&self.ttft).observe(ttft_ms / 1e3);
        if let Some(t) = tpot_ms {
            lock(&self.tpot).observe(t / 1e3);
        }
    }

    pub fn queue_wait(&self, seconds: f64) {
        lock(&self.queue_wait).observe(seconds);
    }

    pub fn set_kv(&self, kv: KvStats) {
        *lock(&self.kv) = kv;
    }

    pub fn kv(&self) -> KvStats {
        *lock(&self.kv)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: &Gauges<'_>) -> String {
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        line(
            "jetvlm_ready",
            "gauge",
            "1 once the model is loaded and requests are answered.",
            &[(String::new(), (g.ready as u8).to_string())],
        );
        if let Some([model, kv, provider, decoder]) = g.model {
            line(
                "jetvlm_model_info",
                "gauge",
                "The loaded model: package name, KV policy, vision encoder execution provider, decoder device.",
                &[(
                    format!(
                        "{{model=\"{}\",kv_policy=\"{}\",encoder_provider=\"{}\",decoder=\"{}\"}}",
                        escape(model),
                        escape(kv),
                        escape(provider),
                        escape(decoder)
                    ),
                    "1".into(),
                )],
            );
        }
        let requests: Vec<_> = lock(&self.requests)
            .iter()
            .map(|(s, n)| (format!("{{status=\"{s}\"}}"), n.to_string()))
            .collect();
        line(
            "jetvlm_requests_total",
            "counter",
            "Chat-completion requests by HTTP status.",
            &requests,
        );
        let outcomes: Vec<_> = lock(&self.outcomes)
            .iter()
            .map(|(s, n)| (format!("{{outcome=\"{s}\"}}"), n.to_string()))
            .collect();
        line(
            "jetvlm_generations_total",
            "counter",
            "Answers by how they ended (stop, length, cancelled, timeout, error).",
            &outcomes,
        );
        let counter = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        for (name, help, v) in [
            (
                "jetvlm_prompt_tokens_total",
                "Prompt tokens (frames included).",
                &self.prompt_tokens,
            ),
            (
                "jetvlm_completion_tokens_total",
                "Generated tokens.",
                &self.completion_tokens,
            ),
            (
                "jetvlm_cached_prompt_tokens_total",
                "Prompt tokens already in the KV cache (camera://window).",
                &self.cached_tokens,
            ),
            (
                "jetvlm_frames_windowed_total",
                "Frames encoded into the rolling window.",
                &self.frames_windowed,
            ),
            (
                "jetvlm_frames_dropped_total",
                "Captured frames that never entered the window (the model was busy).",
                &self.frames_dropped,
            ),
        ] {
            line(name, "counter", help, &[(String::new(), counter(v))]);
        }
        if let Some(n) = g.frames_captured {
            line(
                "jetvlm_frames_captured_total",
                "counter",
                "Frames taken from the frame source.",
                &[(String::new(), n.to_string())],
            );
        }
        line(
            "jetvlm_window_frames",
            "gauge",
            "Frames in the rolling window now.",
            &[(String::new(), counter(&self.window_frames))],
        );
        line(
            "jetvlm_queue_depth",
            "gauge",
            "Requests waiting for the model.",
            &[(String::new(), g.queue_depth.to_string())],
        );
        line(
            "jetvlm_queue_capacity",
            "gauge",
            "Most requests that may wait (--queue); more are answered 429.",
            &[(String::new(), g.queue_capacity.to_string())],
        );
        let kv = self.kv();
        line(
            "jetvlm_kv_bytes",
            "gauge",
            "KV cache bytes by precision after the last answer or window frame.",
            &[
                ("{precision=\"fp16\"}".into(), kv.fp16_bytes.to_string()),
                ("{precision=\"quant\"}".into(), kv.quant_bytes.to_string()),
                ("{precision=\"f32\"}".into(), kv.f32_bytes.to_string()),
            ],
        );
        line(
            "jetvlm_kv_fp16_equivalent_bytes",
            "gauge",
            "Bytes the same cached tokens would take all-FP16.",
            &[(String::new(), kv.fp16_equivalent_bytes.to_string())],
        );
        lock(&self.ttft).render(
            &mut out,
            "jetvlm_ttft_seconds",
            "Time to first token, from the model taking the request.",
        );
        lock(&self.tpot).render(
            &mut out,
            "jetvlm_tpot_seconds",
            "Mean time per output token after the first, per answer.",
        );
        lock(&self.queue_wait).render(
            &mut out,
            "jetvlm_queue_wait_seconds",
            "Time a request waited in the queue before the model took it.",
        );
        out
    }
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        static B: [f64; 2] = [1.0, 2.0];
        let mut h = Histogram::new(&B);
        for v in [0.5, 1.0, 1.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(
            out.contains("x_sum 6\n") && out.contains("x_count 4\n"),
            "{out}"
        );
    }

    #[test]
    fn render_names_every_metric_and_escapes_labels() {
        let m = Metrics::default();
        m.request(200);
        m.request(429);
        m.request(200);
        m.outcome("stop");
        m.answer(12.0, Some(3.0));
        let text = m.render(&Gauges {
            ready: true,
            queue_depth: 2,
            queue_capacity: 8,
            frames_captured: Some(5),
            model: Some(["a\"b", "mixed", "cpu", "cpu"]),
        });
        for needle in [
            "jetvlm_requests_total{status=\"200\"} 2",
            "jetvlm_requests_total{status=\"429\"} 1",
            "jetvlm_generations_total{outcome=\"stop\"} 1",
            "jetvlm_queue_depth 2",
            "jetvlm_frames_captured_total 5",
            "jetvlm_ttft_seconds_count 1",
            "jetvlm_tpot_seconds_bucket{le=\"0.005\"} 1",
            "model=\"a\\\"b\"",
            "jetvlm_kv_bytes{precision=\"quant\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
