//! KV calibration: which frame format each decoder layer can take.
//!
//! 1. [`Recorder`] runs as the model's KV store on sample prompts (frames and questions): it
//!    answers with the exact f32 cache and records every layer's keys, values and queries.
//! 2. [`replay()`] feeds that traffic through the mixed cache under a candidate frame format
//!    and measures each layer's attention-output error against the exact outputs.
//! 3. [`Calibrator`] (or [`calibrate`] over a whole trace) tries every format (INT8/INT4/INT2, per-channel or per-token keys, group
//!    128/64/32 where the head dim allows), picks per layer the cheapest one whose error stays
//!    under the target, and returns a [`Calibration`]: the calibrated policy
//!    (`mixed:...,layers=4c64/8t64/...`), the cheapest single format that meets the target
//!    in every layer, and every measurement. [`Calibration::save`] writes it as YAML; the
//!    runtime's `kv_calibration` key and the CLI's `--kv-calibration` read it back.
//!
//! Text tokens keep the base policy's precision (FP16 for `mixed`); the FP16 budget and
//! sinks are the base policy's too.

pub mod record;
pub mod replay;

pub use record::{Recorder, Trace};
pub use replay::{Measurement, replay};

use jetvlm_core::ConfigError;
use jetvlm_kvcache::{CacheShape, KeyMode, KvError, KvPolicy, LayerFormat};
use jetvlm_quant::fit_group;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors of calibration and of calibration files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalibrationError {
    #[error("KV cache: {0}")]
    Kv(#[from] KvError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("calibration trace: {message}")]
    Trace { message: String },
    #[error("target error {target}: must be a positive number")]
    Target { target: f64 },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The version of the calibration file format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// One candidate frame format, measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// `<bits><c|t><group>`, e.g. `4c64`.
    pub format: String,
    /// Bytes per frame token per layer (K and V of every KV head, scales and zeros
    /// included, full blocks).
    pub bytes_per_frame_token: f64,
    pub max_error: f64,
    pub mean_error: f64,
    /// Relative RMS attention-output error per layer.
    pub errors: Vec<f64>,
}

/// The format a layer got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerChoice {
    pub layer: usize,
    pub format: String,
    pub error: f64,
    /// The base policy's error in this layer.
    pub base_error: f64,
    /// False when no format met the target (the layer gets the most accurate one).
    pub meets_target: bool,
}

/// KV bytes of the calibration prompts (summed over prompts, at each prompt's end).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bytes {
    pub calibrated: u64,
    /// The cheapest single format meeting the target (absent when none does).
    pub uniform: Option<u64>,
    pub base: u64,
    pub fp16: u64,
}

/// What the calibration ran on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Samples {
    pub prompts: usize,
    /// Text tokens whose attention saw frames (the queries the error is measured on).
    pub text_queries: usize,
    pub frame_tokens: usize,
    /// Free-form description of the source (frames URI, questions).
    pub source: String,
}

/// A calibration: the policy to run with, and the measurements behind it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub format_version: u32,
    /// The model package or decoder it was measured on.
    pub model: String,
    pub shape: CacheShape,
    pub target_error: f64,
    /// The calibrated policy: the base policy with a frame format per layer (or one format
    /// for all when every layer chose the same).
    pub policy: String,
    /// The cheapest single format meeting the target in every layer, as a policy.
    pub uniform_policy: Option<String>,
    /// The policy the calibration started from (text precision, budget, block sizes).
    pub base_policy: String,
    pub samples: Samples,
    pub kv_bytes: Bytes,
    /// Errors of the calibrated policy per layer, measured by replaying it.
    pub layers: Vec<LayerChoice>,
    pub candidates: Vec<Candidate>,
}

/// Every frame format a layer may take with head dim `head_dim`, given the base policy
/// (per-token keys only when the base quantizes text). Groups are fitted to the head dim;
/// duplicates are dropped.
pub fn candidate_formats(base: &KvPolicy, head_dim: usize) -> Vec<LayerFormat> {
    let keys: &[KeyMode] = if base.quantize_text {
        &[KeyMode::PerToken]
    } else {
        &[KeyMode::PerChannel, KeyMode::PerToken]
    };
    let mut out: Vec<LayerFormat> = Vec::new();
    for bits in [8, 4, 2] {
        for &key_mode in keys {
            for group in [128, 64, 32] {
                let group = fit_group(group, head_dim);
                let f = LayerFormat {
                    bits,
                    key_mode,
                    group,
                };
                if head_dim.is_multiple_of(group) && !out.contains(&f) {
                    out.push(f);
                }
            }
        }
    }
    out
}

/// `base` with every layer in format `f` (a uniform policy).
pub fn with_format(base: &KvPolicy, f: LayerFormat) -> KvPolicy {
    KvPolicy {
        frame_bits: f.bits,
        key_mode: f.key_mode,
        group: f.group,
        layers: Vec::new(),
        ..base.clone()
    }
}

/// Bytes per frame token per layer of format `f` (full blocks of `base`'s size).
pub fn bytes_per_frame_token(
    base: &KvPolicy,
    f: LayerFormat,
    shape: CacheShape,
) -> Result<f64, CalibrationError> {
    let p = with_format(base, f);
    let layout = jetvlm_kvcache::layout::QuantLayout::new(&p, shape.head_dim).ok_or_else(|| {
        CalibrationError::Kv(KvError::InvalidShape {
            shape: shape.to_string(),
            reason: format!("no quantized layout for format {f}"),
        })
    })?;
    Ok((layout.seg_bytes() * shape.kv_heads) as f64 / p.quant_block_tokens as f64)
}

/// Streams prompts through every candidate format and the base policy, then chooses.
/// Memory: the error sums only; each prompt's traffic can be dropped once added, so a
/// calibration over many prompts needs one prompt's recording at a time.
#[derive(Clone, Debug)]
pub struct Calibrator {
    shape: CacheShape,
    base: KvPolicy,
    formats: Vec<LayerFormat>,
    /// One per format, then the base policy.
    accs: Vec<replay::Accumulator>,
    prompts: usize,
}

impl Calibrator {
    /// `base` gives the text precision, FP16 budget and block sizes (a base that keeps
    /// frames FP16 starts from `mixed` with its block sizes).
    pub fn new(shape: CacheShape, base: &KvPolicy) -> Result<Self, CalibrationError> {
        let mut base = base.clone();
        base.layers.clear();
        if !base.quantizes_frames() {
            base = KvPolicy {
                fp16_block_tokens: base.fp16_block_tokens,
                quant_block_tokens: base.quant_block_tokens,
                ..KvPolicy::mixed()
            };
        }
        let base = base.fitted_to(shape.head_dim);
        let formats = candidate_formats(&base, shape.head_dim);
        if formats.is_empty() {
            return Err(CalibrationError::Kv(KvError::InvalidShape {
                shape: shape.to_string(),
                reason: format!(
                    "no quantized frame format fits head_dim {} (a group of 32, 64 or 128 must \
                     divide it)",
                    shape.head_dim
                ),
            }));
        }
        let mut accs: Vec<replay::Accumulator> = formats
            .iter()
            .map(|&f| replay::Accumulator::new(with_format(&base, f), shape))
            .collect();
        accs.push(replay::Accumulator::new(base.clone(), shape));
        Ok(Calibrator {
            shape,
            base,
            formats,
            accs,
            prompts: 0,
        })
    }

    /// Replays one recorded prompt under every candidate and the base policy.
    pub fn add(&mut self, prompt: &record::Prompt) -> Result<(), CalibrationError> {
        for acc in &mut self.accs {
            acc.add(self.shape, prompt)?;
        }
        self.prompts += 1;
        Ok(())
    }

    /// Picks each layer's cheapest format with an error at most `target` (`None`: the base
    /// policy's worst layer error, so no layer ends up worse than the base policy's worst
    /// one).
    pub fn finish(
        &self,
        target: Option<f64>,
        model: &str,
        source: &str,
    ) -> Result<Calibration, CalibrationError> {
        let (shape, base) = (self.shape, &self.base);
        let base_m = self.accs[self.formats.len()].measurement();
        let target = target.unwrap_or_else(|| base_m.max_error());
        if !(target > 0.0 && target.is_finite()) {
            return Err(CalibrationError::Target { target });
        }
        if base_m.text_queries == 0 {
            return Err(CalibrationError::Trace {
                message: "no text query saw a frame token: the prompts need frames before text"
                    .into(),
            });
        }
        let mut measured = Vec::with_capacity(self.formats.len());
        for (&f, acc) in self.formats.iter().zip(&self.accs) {
            measured.push((f, bytes_per_frame_token(base, f, shape)?, acc.measurement()));
        }
        // Per layer: the cheapest format within the target (ties: the smaller error); else
        // the most accurate one.
        let err = |i: usize, layer: usize| measured[i].2.layer_errors[layer];
        let pick = |layer: usize| -> (usize, bool) {
            let by_error = |a: &usize, b: &usize| err(*a, layer).total_cmp(&err(*b, layer));
            let within = (0..measured.len())
                .filter(|&i| err(i, layer) <= target)
                .min_by(|a, b| {
                    measured[*a]
                        .1
                        .total_cmp(&measured[*b].1)
                        .then(by_error(a, b))
                });
            match within {
                Some(i) => (i, true),
                None => ((0..measured.len()).min_by(by_error).unwrap_or(0), false),
            }
        };
        let choices: Vec<(usize, bool)> = (0..shape.layers).map(pick).collect();
        let chosen: Vec<LayerFormat> = choices.iter().map(|c| measured[c.0].0).collect();
        let policy = if chosen.iter().all(|f| *f == chosen[0]) {
            with_format(base, chosen[0])
        } else {
            KvPolicy {
                layers: chosen.clone(),
                ..base.clone()
            }
        };
        // A layer's traffic in a per-layer cache is exactly its format's in a uniform one:
        // errors are the chosen candidates', quantized bytes their per-layer shares.
        let quant: u64 = choices
            .iter()
            .map(|c| measured[c.0].2.quant_bytes / shape.layers as u64)
            .sum();
        let calibrated_bytes = base_m.fp16_block_bytes + quant;
        let uniform = measured
            .iter()
            .filter(|(_, _, m)| m.max_error() <= target)
            .min_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then(a.2.max_error().total_cmp(&b.2.max_error()))
            });
        let layers = choices
            .iter()
            .enumerate()
            .map(|(layer, &(i, ok))| LayerChoice {
                layer,
                format: measured[i].0.to_string(),
                error: err(i, layer),
                base_error: base_m.layer_errors[layer],
                meets_target: ok,
            })
            .collect();
        Ok(Calibration {
            format_version: FORMAT_VERSION,
            model: model.to_string(),
            shape,
            target_error: target,
            policy: policy.name(),
            uniform_policy: uniform.map(|(f, ..)| with_format(base, *f).name()),
            base_policy: base.name(),
            samples: Samples {
                prompts: self.prompts,
                text_queries: base_m.text_queries,
                frame_tokens: base_m.frame_tokens,
                source: source.to_string(),
            },
            kv_bytes: Bytes {
                calibrated: calibrated_bytes,
                uniform: uniform.map(|(_, _, m)| m.kv_bytes()),
                base: base_m.kv_bytes(),
                fp16: base_m.fp16_bytes,
            },
            layers,
            candidates: measured
                .iter()
                .map(|(f, cost, m)| Candidate {
                    format: f.to_string(),
                    bytes_per_frame_token: *cost,
                    max_error: m.max_error(),
                    mean_error: m.mean_error(),
                    errors: m.layer_errors.clone(),
                })
                .collect(),
        })
    }
}

/// [`Calibrator`] over a whole recorded trace.
pub fn calibrate(
    trace: &Trace,
    base: &KvPolicy,
    target: Option<f64>,
    model: &str,
    source: &str,
) -> Result<Calibration, CalibrationError> {
    let mut c = Calibrator::new(trace.shape, base)?;
    for prompt in &trace.prompts {
        c.add(prompt)?;
    }
    c.finish(target, model, source)
}

impl Calibration {
    /// The calibrated policy, parsed.
    pub fn kv_policy(&self) -> Result<KvPolicy, KvError> {
        Ok(self.policy.parse()?)
    }

    /// Reads a calibration file; errors name the file (and the line and field for YAML
    /// errors).
    pub fn load(path: &Path) -> Result<Self, CalibrationError> {
        let c: Calibration = jetvlm_core::config::load_yaml(path)?;
        let bad = |message: String| CalibrationError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if c.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                c.format_version
            )));
        }
        let p = c
            .kv_policy()
            .map_err(|e| bad(format!("field `policy`: {e}")))?;
        if p.is_per_layer() && p.layers.len() != c.shape.layers {
            return Err(bad(format!(
                "field `policy` has formats for {} layers, `shape.layers` is {}",
                p.layers.len(),
                c.shape.layers
            )));
        }
        Ok(c)
    }

    /// The policy for a model with cache shape `shape`: an error naming the file when the
    /// calibration was measured on another shape.
    pub fn policy_for(&self, path: &Path, shape: CacheShape) -> Result<KvPolicy, CalibrationError> {
        if shape != self.shape {
            return Err(CalibrationError::Invalid {
                path: path.to_path_buf(),
                message: format!(
                    "calibrated for a model with {}, this model has {shape}",
                    self.shape
                ),
            });
        }
        self.kv_policy().map_err(|e| CalibrationError::Invalid {
            path: path.to_path_buf(),
            message: format!("field `policy`: {e}"),
        })
    }

    /// Writes the calibration as YAML: to a temporary file next to `path`, then renamed, so
    /// a failed write never leaves a half-written file.
    pub fn save(&self, path: &Path) -> Result<(), CalibrationError> {
        let werr = |source: std::io::Error| CalibrationError::Write {
            path: path.to_path_buf(),
            source,
        };
        let text = serde_saphyr::to_string(self).map_err(|e| werr(std::io::Error::other(e)))?;
        let header = "# jetvlm KV calibration (written by `jetvlm calibrate`). Use it with \
                      `--kv-calibration FILE` or `kv_calibration: FILE` in a runtime config.\n";
        let tmp = path.with_extension("yaml.partial");
        std::fs::write(&tmp, format!("{header}{text}")).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            werr(e)
        })
    }
}
