//! One module per subcommand.

pub mod ask;
pub mod bench;
pub mod board;
pub mod bundle;
pub mod calibrate;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod generate;
pub mod gpu;
pub mod install;
pub mod manifest;
pub mod plan;
pub mod quantize;
pub mod selftest;
pub mod serve;
pub mod synth;
pub mod watch;

use std::path::{Path, PathBuf};

use jetvlm_vision::ExecutionProvider;

/// The vision encoder's ONNX Runtime options shared by `ask` and `watch`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EncoderArgs {
    /// Execution providers for the vision encoder in priority order (tensorrt,cuda,cpu).
    #[arg(long = "ep", value_delimiter = ',')]
    pub execution_providers: Option<Vec<ExecutionProvider>>,
    /// Fail instead of falling back when the first execution provider is unavailable.
    #[arg(long)]
    pub require_ep: bool,
    /// Path of libonnxruntime.so (overrides ORT_DYLIB_PATH and the search), e.g. an ONNX
    /// Runtime built with the TensorRT provider on a Jetson.
    #[arg(long)]
    pub ort_library: Option<PathBuf>,
}

impl EncoderArgs {
    /// Applies the flags given over the runtime config.
    pub fn apply(&self, cfg: &mut jetvlm_runtime::RuntimeConfig) {
        if let Some(eps) = &self.execution_providers {
            cfg.vision.execution_providers = eps.clone();
        }
        if self.require_ep {
            cfg.vision.require = true;
        }
        if self.ort_library.is_some() {
            cfg.vision.ort_library = self.ort_library.clone();
        }
    }
}

/// Limits on the image files a command decodes ([`jetvlm_core::ImageLimits`]): a file whose
/// header declares more pixels is refused before any pixel is decoded.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ImageLimitArgs {
    /// Largest image accepted, in pixels (width x height, from the file's header; default
    /// 40000000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_pixels: Option<u64>,
    /// Largest single allocation an image decoder may make, in MiB (default 512).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_image_alloc_mib: Option<u64>,
}

impl ImageLimitArgs {
    /// The limits: the defaults with the flags given over them.
    pub fn limits(&self) -> jetvlm_core::ImageLimits {
        let mut l = jetvlm_core::ImageLimits::default();
        if let Some(p) = self.max_image_pixels {
            l.max_pixels = p;
        }
        if let Some(m) = self.max_image_alloc_mib {
            l.max_alloc_bytes = m << 20;
        }
        l
    }
}

/// The model package a command uses: the one given, else the bundled demo model
/// (`models/demo`), looked up from the working directory and from the executable's location
/// upwards (so `cargo run` and an installed tree both find it), or `$JETVLM_MODEL`.
/// The KV policy of `--model` when it is a model package (its manifest's `kv.policy`), whose
/// block sizes a `--kv` policy that names none runs with, as `ask` and `watch` run it
/// ([`jetvlm_kvcache::KvPolicy::in_effect`]); `None` for a bare decoder directory, or when
/// the package's own policy does not parse (the runtime then ignores it too).
pub fn package_kv_policy(model: &Path) -> anyhow::Result<Option<jetvlm_kvcache::KvPolicy>> {
    Ok(package_manifest(model)?.and_then(|m| m.kv.policy.parse().ok()))
}

/// The decoder directory of `--model`: a Hugging Face model directory as given, or a jetvlm
/// model package (a directory with `jetvlm.yaml`), whose manifest names its decoder.
pub fn decoder_dir(model: &Path) -> anyhow::Result<PathBuf> {
    Ok(match package_manifest(model)? {
        Some(m) => model.join(m.decoder.dir),
        None => model.to_path_buf(),
    })
}

/// The manifest of `--model` when it is a model package (a directory with `jetvlm.yaml`).
fn package_manifest(model: &Path) -> anyhow::Result<Option<jetvlm_vision::package::Manifest>> {
    let manifest = model.join("jetvlm.yaml");
    if !manifest.is_file() {
        return Ok(None);
    }
    let m = jetvlm_core::config::load_yaml(&manifest)
        .map_err(|e| anyhow::anyhow!("--model {}: {e}", model.display()))?;
    Ok(Some(m))
}

/// A count flag that must be at least 1 (`--max-tokens`): 0 would give empty answers.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

pub fn model_or_default(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("JETVLM_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        starts.push(dir.to_path_buf());
    }
    for start in &starts {
        for dir in start.ancestors() {
            let candidate = dir.join("models").join("demo");
            if candidate.join("jetvlm.yaml").is_file() {
                return Ok(candidate);
            }
        }
    }
    anyhow::bail!(
        "no --model given and the bundled demo model (models/demo/jetvlm.yaml) was not found \
         above the working directory or the executable; pass --model DIR or set JETVLM_MODEL"
    )
}

/// Loads the given model package, or the bundled demo model, with a runtime config.
/// Applies `--device` to the runtime config; a GPU run opens the device first, so without
/// one it fails with one clear line before the package loads.
pub fn apply_device(
    cfg: &mut jetvlm_runtime::RuntimeConfig,
    flag: Option<jetvlm_core::Device>,
) -> anyhow::Result<()> {
    if let Some(d) = flag {
        cfg.device = d;
    }
    if cfg.device == jetvlm_core::Device::Cuda {
        gpu::open(0)?;
    }
    Ok(())
}

pub use jetvlm_app::apply_kv;

pub fn load_pipeline(
    given: Option<&Path>,
    cfg: jetvlm_runtime::RuntimeConfig,
) -> anyhow::Result<(PathBuf, jetvlm_runtime::Pipeline)> {
    use anyhow::Context;
    let model = model_or_default(given)?;
    let pipeline = jetvlm_runtime::Pipeline::load(&model, cfg)
        .with_context(|| format!("loading model package {}", model.display()))?;
    Ok((model, pipeline))
}

/// The question given, else the package's `prompt.default_question`.
pub fn question_or_default(
    pipeline: &jetvlm_runtime::Pipeline,
    given: Option<&str>,
) -> anyhow::Result<String> {
    match given {
        Some(q) => Ok(q.to_string()),
        None => pipeline
            .package()
            .manifest
            .prompt
            .default_question
            .clone()
            .ok_or_else(|| {
                anyhow::anyhow!("no question given and the package has no prompt.default_question")
            }),
    }
}
