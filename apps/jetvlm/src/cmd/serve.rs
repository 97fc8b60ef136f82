//! `jetvlm serve`: an OpenAI-compatible local API (chat completions with `data:` images and
//! the live camera), `/metrics`, `/health` and a live web view, from the `jetvlm-serve`
//! library (the same server `jetvlm-assistant --serve` runs).

use anyhow::Result;
use clap::Args;
use jetvlm_runtime::RuntimeConfig;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `--rules` reads of an analytics rules file (the format is `jetvlm-analytics`'s,
/// defined in `apps/analytics/src/rules.rs`): each rule's name and question, and `every`.
/// The other keys (source, conditions, sinks, ...) are the analytics app's and are not read
/// here.
#[derive(serde::Deserialize)]
struct RulesView {
    #[serde(default = "one")]
    every: u64,
    rules: Vec<RuleView>,
}

#[derive(serde::Deserialize)]
struct RuleView {
    name: String,
    question: String,
}

fn one() -> u64 {
    1
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  jetvlm serve --source synthetic://scene?seed=3
  jetvlm serve --model models/demo --host 0.0.0.0 --port 8080 --api-key \"$(cat key.txt)\"
  curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"model\":\"jetvlm-demo-scenes\",\"messages\":[{\"role\":\"user\",\"content\":[
         {\"type\":\"image_url\",\"image_url\":{\"url\":\"camera://latest\"}},
         {\"type\":\"text\",\"text\":\"how many objects are there?\"}]}]}'
See docs/serve.md for the endpoints, camera references, metrics and limits.")]
pub struct ServeArgs {
    /// Model package directory (holding jetvlm.yaml); default: the bundled demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Runtime config YAML (KV policy, sampling, max_new_tokens, window_frames, ...); flags
    /// override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Frame source URI for camera://latest, camera://window and the web view:
    /// synthetic://scene?seed=3, v4l2:///dev/video0 (feature `v4l`), dir://frames/, ...
    #[arg(long)]
    pub source: Option<String>,
    /// Address to listen on. Anything but a loopback address without --api-key prints a
    /// warning.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the API, /metrics and the web view's data
    /// (default: $JETVLM_API_KEY when set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait for the model; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 8, value_parser = super::at_least_one)]
    pub queue: usize,
    /// Most bytes of one image in a request (decoded); more is answered 413. Images are
    /// also held to the pixel limit every image decoder uses.
    #[arg(long, default_value_t = jetvlm_serve::DEFAULT_MAX_IMAGE_BYTES, value_parser = super::at_least_one)]
    pub max_image_bytes: usize,
    /// Per-request time limit in seconds, queue wait included (504 past it).
    #[arg(long, default_value_t = 60.0)]
    pub request_timeout: f64,
    /// Frames kept in the rolling window (camera://window); default: the runtime config's
    /// window_frames.
    #[arg(long)]
    pub window: Option<usize>,
    /// Most tokens per answer (requests may ask for fewer); default: the runtime config's
    /// max_new_tokens.
    #[arg(long, value_parser = super::at_least_one)]
    pub max_tokens: Option<usize>,
    /// KV cache policy (fp16, mixed, ...); default: the package's.
    #[arg(long)]
    pub kv: Option<String>,
    /// An analytics rules file (see jetvlm-analytics): its questions are asked over the
    /// window and shown with their latest answers on the web view.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    #[command(flatten)]
    pub encoder: super::EncoderArgs,
    /// Where the decoder runs: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long)]
    pub device: Option<jetvlm_core::Device>,
}

/// The flags every server shares, in the form [`jetvlm_serve::serve`] takes (also used by
/// `jetvlm-assistant --serve` through the same library, with its own flags).
pub fn options(args: &ServeArgs) -> Result<jetvlm_serve::ServeOptions> {
    let mut cfg = match &args.config {
        Some(p) => RuntimeConfig::from_yaml(p)?,
        None => RuntimeConfig::default(),
    };
    super::apply_kv(&mut cfg, args.kv.clone(), None);
    if let Some(n) = args.max_tokens {
        anyhow::ensure!(
            n <= RuntimeConfig::MAX_NEW_TOKENS,
            "--max-tokens {n}: must lie in 1..={}",
            RuntimeConfig::MAX_NEW_TOKENS
        );
        cfg.max_new_tokens = n;
    }
    if let Some(w) = args.window {
        anyhow::ensure!(
            (1..=RuntimeConfig::MAX_WINDOW_FRAMES).contains(&w),
            "--window {w}: must lie in 1..={}",
            RuntimeConfig::MAX_WINDOW_FRAMES
        );
        cfg.window_frames = w;
    }
    args.encoder.apply(&mut cfg);
    super::apply_device(&mut cfg, args.device)?;
    anyhow::ensure!(
        args.request_timeout.is_finite()
            && args.request_timeout > 0.0
            && args.request_timeout <= 86_400.0,
        "--request-timeout {}: must lie in (0, 86400] seconds",
        args.request_timeout
    );
    let model = super::model_or_default(args.model.as_deref())?;
    let mut opts = jetvlm_serve::ServeOptions::new(model, cfg);
    opts.source = args.source.clone();
    opts.host = args.host;
    opts.port = args.port;
    opts.api_key = match &args.api_key {
        Some(k) => Some(k.clone()),
        None => std::env::var("JETVLM_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
    };
    opts.queue = args.queue;
    opts.max_image_bytes = args.max_image_bytes;
    opts.request_timeout = Duration::from_secs_f64(args.request_timeout);
    if let Some(path) = &args.rules {
        let (standing, every) = standing_questions(path)?;
        opts.standing = standing;
        opts.standing_every = every;
    }
    Ok(opts)
}

/// The standing questions of an analytics rules file and how often they are asked (its
/// `every`, in window frames).
pub fn standing_questions(path: &Path) -> Result<(Vec<jetvlm_serve::StandingQuestion>, u64)> {
    let file: RulesView = jetvlm_core::config::load_yaml(path)
        .map_err(|e| anyhow::anyhow!("--rules {}: {e}", path.display()))?;
    anyhow::ensure!(
        file.every >= 1,
        "--rules {}: every: must be at least 1",
        path.display()
    );
    anyhow::ensure!(
        !file.rules.is_empty(),
        "--rules {}: rules: no rules",
        path.display()
    );
    let questions = file
        .rules
        .iter()
        .map(|r| jetvlm_serve::StandingQuestion {
            name: r.name.clone(),
            question: r.question.clone(),
        })
        .collect();
    Ok((questions, file.every))
}

pub fn run(args: ServeArgs) -> Result<()> {
    let opts = options(&args)?;
    let model = opts.model.clone();
    jetvlm_serve::serve(opts, |addr| {
        eprintln!(
            "jetvlm serve: listening on http://{addr} (model {} loading; GET /health is 200 once it is ready)",
            model.display()
        );
        // Under systemd (Type=notify): READY=1 once /health is 200, watchdog pings while it
        // answers.
        jetvlm_app::notify::serve_notifications(addr);
    })?;
    Ok(())
}
