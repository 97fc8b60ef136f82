//! jetvlm-serve: an OpenAI-compatible local API for a jetvlm model package, Prometheus
//! metrics and a live web view; what `jetvlm serve` and `jetvlm-assistant --serve` run.
//!
//! - [`serve`] with [`ServeOptions`]: binds, answers `GET /health` with 503 while the model
//!   loads (200 after), then serves until SIGTERM/SIGINT.
//! - `openai`: the chat-completions request (read field by field, every refusal names its
//!   field) and the response and stream-chunk bodies.
//! - `image`: what an `image_url` may name (`data:` PNG/JPEG, `camera://latest`,
//!   `camera://window`; never a file or a URL to fetch) and decoding under the image limits.
//! - `worker`: the thread that owns the [`jetvlm_runtime::Pipeline`]; requests reach it
//!   through a bounded queue (429 when full).
//! - `camera`: the frame source on its own thread (newest frame, counters).
//! - `metrics`: the Prometheus text; `http`: routes, authentication, limits; the web view
//!   (`web/index.html`, `web/app.js`) is compiled into the binary.

mod camera;
mod error;
mod http;
pub mod image;
pub mod metrics;
pub mod openai;
mod worker;

pub use error::{ApiError, ServeError};

use jetvlm_core::ImageLimits;
use jetvlm_runtime::{RuntimeConfig, Sampling};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Default most decoded bytes of one image in a request.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 8 << 20;
/// Most images in one request.
pub const MAX_IMAGES: usize = 4;
/// Bytes of a request beside its images (messages, fields).
pub const REQUEST_TEXT_BYTES: usize = 1 << 20;
/// Samples kept for the web view's chart.
pub const HISTORY: usize = 300;

/// A standing question shown on the web view with its latest answer over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StandingQuestion {
    pub name: String,
    pub question: String,
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Model package directory.
    pub model: PathBuf,
    /// Runtime config (KV policy, sampling, max_new_tokens, window_frames, ...).
    pub runtime: RuntimeConfig,
    /// Frame source URI for `camera://latest` / `camera://window` and the web view.
    pub source: Option<String>,
    pub host: IpAddr,
    /// 0: any free port (the bound address is printed).
    pub port: u16,
    /// Requests must send `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most requests waiting for the model; more get 429.
    pub queue: usize,
    /// Most decoded bytes of one image (413 past it).
    pub max_image_bytes: usize,
    /// Pixel and allocation limits of decoded images.
    pub image_limits: ImageLimits,
    /// Per-request time limit (queue wait included).
    pub request_timeout: Duration,
    /// Capture timeout of the frame source.
    pub capture_timeout: Duration,
    /// Standing questions asked over the window (the web view shows their answers).
    pub standing: Vec<StandingQuestion>,
    /// Ask the standing questions after every Nth window frame.
    pub standing_every: u64,
    /// After SIGTERM/SIGINT: how long open connections may take to finish.
    pub shutdown_grace: Duration,
}

impl ServeOptions {
    /// Options with the defaults for everything but the model.
    pub fn new(model: PathBuf, runtime: RuntimeConfig) -> Self {
        ServeOptions {
            model,
            runtime,
            source: None,
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            api_key: None,
            queue: 8,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            image_limits: ImageLimits::default(),
            request_timeout: Duration::from_secs(60),
            capture_timeout: Duration::from_secs(5),
            standing: Vec::new(),
            standing_every: 10,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// Largest request body: [`MAX_IMAGES`] images of `max_image_bytes` in base64 plus
    /// [`REQUEST_TEXT_BYTES`].
    pub fn max_request_bytes(&self) -> Result<usize, ServeError> {
        image::base64_len(self.max_image_bytes)
            .and_then(|b| b.checked_mul(MAX_IMAGES))
            .and_then(|b| b.checked_add(REQUEST_TEXT_BYTES))
            .ok_or_else(|| ServeError::Option {
                flag: "--max-image-bytes",
                message: format!("{} is too large", self.max_image_bytes),
            })
    }

    fn validate(&self) -> Result<(), ServeError> {
        let bad = |flag, message: String| Err(ServeError::Option { flag, message });
        if self.queue == 0 {
            return bad("--queue", "must be at least 1".into());
        }
        if self.max_image_bytes == 0 {
            return bad("--max-image-bytes", "must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            return bad("--request-timeout", "must be more than 0 s".into());
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return bad("--api-key", "an empty key".into());
        }
        self.max_request_bytes()?;
        Ok(())
    }
}

/// The loaded model, as requests see it.
#[derive(Clone, Debug)]
pub(crate) struct ModelInfo {
    pub id: String,
    pub kv_policy: String,
    pub provider: String,
    pub decoder: String,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub created: u64,
}

/// One point of the web view's chart.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Sample {
    pub t_s: f64,
    pub kind: &'static str,
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    pub kv_bytes: u64,
    pub kv_fp16_bytes: u64,
}

/// A standing question's latest answer.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct StandingAnswer {
    pub name: String,
    pub question: String,
    pub answer: Option<String>,
    pub error: Option<String>,
    pub frame: Option<u64>,
}

/// What the handlers, the worker and the camera share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub model: OnceLock<ModelInfo>,
    pub metrics: metrics::Metrics,
    pub queue_depth: AtomicUsize,
    pub queue_capacity: usize,
    pub camera: Option<Arc<camera::CameraState>>,
    pub standing_questions: Vec<StandingQuestion>,
    standing: Mutex<Vec<StandingAnswer>>,
    history: Mutex<VecDeque<Sample>>,
    /// Mean seconds a request spends from enqueue to done (for Retry-After).
    job_seconds: Mutex<f64>,
    pub stopping: AtomicBool,
    pub request_timeout: Duration,
    pub started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn push_sample(&self, s: Sample) {
        let mut h = lock(&self.history);
        if h.len() >= HISTORY {
            h.pop_front();
        }
        h.push_back(s);
    }

    pub fn history(&self) -> Vec<Sample> {
        lock(&self.history).iter().cloned().collect()
    }

    pub fn standing_lock(&self) -> std::sync::MutexGuard<'_, Vec<StandingAnswer>> {
        lock(&self.standing)
    }

    pub fn note_job_time(&self, d: Duration) {
        let mut m = lock(&self.job_seconds);
        *m = if *m == 0.0 {
            d.as_secs_f64()
        } else {
            0.8 * *m + 0.2 * d.as_secs_f64()
        };
    }

    /// Seconds a client turned away with 429 should wait: about the time the full queue
    /// takes, at least 1.
    pub fn retry_after(&self) -> u64 {
        let per_job = *lock(&self.job_seconds);
        ((per_job * self.queue_capacity as f64).ceil() as u64).max(1)
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(c) = &self.camera {
            c.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs the server until SIGTERM or SIGINT (then: no new connections, queued requests get
/// 503, the answer in progress finishes, open connections get `shutdown_grace` to end) and
/// returns `Ok` after a clean stop. `on_bound` is called with the bound address.
pub fn serve(opts: ServeOptions, on_bound: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    opts.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("jetvlm-http")
        .build()
        .map_err(|source| ServeError::Start {
            what: "the async runtime",
            source,
        })?;
    rt.block_on(http::run(opts, on_bound))
}
