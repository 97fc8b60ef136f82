//! What the planner knows about a model: the language model's validated config, the vision
//! encoder's size (estimated from `vision_config`, or the `.onnx` file of a jetvlm package,
//! or given by the user), and a default tokens-per-frame.
//!
//! Accepted inputs:
//! - a Hugging Face `config.json` (or a directory holding one). VLM configs nest the
//!   language model under `text_config` (Idefics3 / SmolVLM, LLaVA) or keep it at the top
//!   level (Qwen2-VL); the vision tower is `vision_config`.
//! - a jetvlm model package directory (or its `jetvlm.yaml`): the decoder config comes from
//!   `decoder.dir/config.json`, the encoder size from the `.onnx` file(s), tokens per frame
//!   from the manifest.
//!
//! Vision encoder parameters are an **estimate** from `vision_config` (biases and norms are
//! left out, under 0.5% of a ViT):
//!
//! - ViT (SigLIP, CLIP, Idefics3): `layers * (4 h^2 + 2 h i)` + patch embedding
//!   `channels * patch^2 * h` + learned position embedding `(image / patch)^2 * h` +
//!   connector. Idefics3/SmolVLM connector: `Linear(h * scale_factor^2 -> text_hidden)`;
//!   LLaVA: `Linear(h -> text_hidden) + Linear(text_hidden -> text_hidden)`; otherwise
//!   `Linear(h -> text_hidden)`.
//! - Qwen2-VL (`depth`, `embed_dim`): `depth * (4 e^2 + 2 e m)` with `m = e * mlp_ratio` +
//!   patch embedding `channels * temporal_patch * patch^2 * e` + merger
//!   `(e s^2)^2 + e s^2 * out_hidden` with `s = spatial_merge_size` (no position table: RoPE).
//!
//! Tokens per frame (one camera frame = one image):
//! - Idefics3/SmolVLM: `(image_size / patch_size)^2 / scale_factor^2` (one 512 px tile of
//!   SmolVLM-256M = 64 tokens; frames are resized to one tile, not split).
//! - Qwen2-VL: `(448 / (patch * merge))^2` for a 448x448 frame (256 tokens).
//! - LLaVA: `(image_size / patch_size)^2`.

use crate::BoardError;
use crate::plan::{product, sum};
use jetvlm_core::ConfigError;
use jetvlm_core::hf::ModelConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Frame size the planner assumes for Qwen2-VL, whose token count depends on resolution.
pub const QWEN2_VL_FRAME_PIXELS: u64 = 448;

/// Where the vision encoder's size came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VisionSource {
    /// Estimated from `vision_config` (see the module docs).
    Estimated { family: String },
    /// Size of the package's `.onnx` file(s).
    OnnxFile { path: PathBuf },
    /// `--vision-params` given by the user.
    UserParams,
    /// `--vision-bytes` given by the user.
    UserBytes,
}

/// The shapes that size the encoder's activations for one frame.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VisionShape {
    pub hidden: u64,
    pub intermediate: u64,
    pub heads: u64,
    pub patch_size: u64,
    pub channels: u64,
    /// Temporal patch (Qwen2-VL packs 2 frames per patch); 1 for image ViTs.
    pub temporal_patch: u64,
    /// ViT patches per output token (`scale_factor^2` for Idefics3, `merge^2` for Qwen2-VL).
    pub patches_per_token: u64,
}

/// The vision encoder (with its projector/connector) as the planner sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VisionEncoder {
    /// Parameter count, when known.
    pub params: Option<u64>,
    /// Weight bytes at the encoder's dtype.
    pub bytes: u64,
    pub source: VisionSource,
    /// Shapes for the activation estimate, when known.
    pub shape: Option<VisionShape>,
}

/// Everything the planner reads from the model.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// The `config.json` the language model came from.
    pub config_path: PathBuf,
    /// A short name for display (the model directory's name).
    pub name: String,
    pub text: ModelConfig,
    pub vision: Option<VisionEncoder>,
    /// Default tokens per frame (from the config or the package manifest).
    pub tokens_per_frame: Option<u64>,
    /// The package's default KV policy string, when loaded from a package.
    pub default_kv: Option<String>,
}

#[derive(Deserialize)]
struct Manifest {
    vision: ManifestVision,
    decoder: ManifestDecoder,
    #[serde(default)]
    kv: Option<ManifestKv>,
}

#[derive(Deserialize)]
struct ManifestVision {
    encoder: String,
    tokens_per_frame: u64,
}

#[derive(Deserialize)]
struct ManifestDecoder {
    dir: String,
}

#[derive(Deserialize)]
struct ManifestKv {
    policy: Option<String>,
}

impl ModelSpec {
    /// Loads a model from a directory (`config.json` or a jetvlm package with `jetvlm.yaml`)
    /// or a path to `config.json` / `jetvlm.yaml`.
    pub fn load(path: &Path) -> Result<Self, BoardError> {
        if path.is_dir() {
            let manifest = path.join("jetvlm.yaml");
            if manifest.is_file() {
                return Self::from_package(&manifest);
            }
            let config = path.join("config.json");
            if config.is_file() {
                return Self::from_hf_config(&config);
            }
            return Err(BoardError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        if path.is_file() {
            let is_manifest = path.file_name().and_then(|n| n.to_str()) == Some("jetvlm.yaml");
            return if is_manifest {
                Self::from_package(path)
            } else {
                Self::from_hf_config(path)
            };
        }
        Err(BoardError::ModelNotFound {
            path: path.to_path_buf(),
        })
    }

    /// Reads a Hugging Face `config.json` (language model + `vision_config` when present).
    pub fn from_hf_config(path: &Path) -> Result<Self, BoardError> {
        let raw: Value = jetvlm_core::config::load_json(path)?;
        let text = ModelConfig::from_value(&raw, path)?;
        let (vision, tokens_per_frame) = match raw.get("vision_config").filter(|v| v.is_object()) {
            Some(vc) => {
                let (enc, tpf) = estimate_vision(&raw, vc, &text, path)?;
                (Some(enc), tpf)
            }
            None => (None, None),
        };
        Ok(ModelSpec {
            config_path: path.to_path_buf(),
            name: display_name(path),
            text,
            vision,
            tokens_per_frame,
            default_kv: None,
        })
    }

    /// Reads a jetvlm package manifest and the decoder config it names.
    pub fn from_package(manifest_path: &Path) -> Result<Self, BoardError> {
        let manifest: Manifest = jetvlm_core::config::load_yaml(manifest_path)?;
        let root = manifest_path.parent().unwrap_or(Path::new("."));
        let config_path = root.join(&manifest.decoder.dir).join("config.json");
        if !config_path.is_file() {
            return Err(ConfigError::invalid(
                manifest_path,
                "decoder.dir",
                format!("{} does not exist", config_path.display()),
            )
            .into());
        }
        let mut spec = Self::from_hf_config(&config_path)?;
        let encoder = root.join(&manifest.vision.encoder);
        let meta = std::fs::metadata(&encoder).map_err(|e| {
            ConfigError::invalid(
                manifest_path,
                "vision.encoder",
                format!("cannot read {}: {e}", encoder.display()),
            )
        })?;
        if !meta.is_file() {
            return Err(ConfigError::invalid(
                manifest_path,
                "vision.encoder",
                format!(
                    "{} is {}, not an .onnx file",
                    encoder.display(),
                    if meta.is_dir() {
                        "a directory"
                    } else {
                        "not a regular file"
                    }
                ),
            )
            .into());
        }
        // ONNX files over 2 GB keep their tensors in an external data file beside them.
        let mut bytes = meta.len();
        for suffix in [".data", "_data"] {
            let mut external = encoder.clone().into_os_string();
            external.push(suffix);
            if let Ok(m) = std::fs::metadata(PathBuf::from(external)) {
                bytes += m.len();
            }
        }
        if manifest.vision.tokens_per_frame == 0 {
            return Err(ConfigError::invalid(
                manifest_path,
                "vision.tokens_per_frame",
                "must be greater than zero",
            )
            .into());
        }
        spec.vision = Some(VisionEncoder {
            params: None,
            bytes,
            source: VisionSource::OnnxFile { path: encoder },
            shape: None,
        });
        spec.tokens_per_frame = Some(manifest.vision.tokens_per_frame);
        spec.default_kv = manifest.kv.and_then(|k| k.policy);
        spec.name = display_name(manifest_path);
        Ok(spec)
    }

    /// Replaces the vision encoder's size with a user-given parameter count (stored at
    /// `bytes_per_param`); an overflow error names `--vision-params`.
    pub fn set_vision_params(
        &mut self,
        params: u64,
        bytes_per_param: u64,
    ) -> Result<(), BoardError> {
        let bytes = product(
            "the vision encoder bytes",
            &[
                ("--vision-params", params),
                ("bytes per parameter", bytes_per_param),
            ],
        )?;
        let shape = self.vision.as_ref().and_then(|v| v.shape.clone());
        self.vision = Some(VisionEncoder {
            params: Some(params),
            bytes,
            source: VisionSource::UserParams,
            shape,
        });
        Ok(())
    }

    /// Replaces the vision encoder's size with a user-given byte count.
    pub fn set_vision_bytes(&mut self, bytes: u64) {
        let shape = self.vision.as_ref().and_then(|v| v.shape.clone());
        self.vision = Some(VisionEncoder {
            params: None,
            bytes,
            source: VisionSource::UserBytes,
            shape,
        });
    }
}

fn display_name(path: &Path) -> String {
    path.parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .unwrap_or_else(|| path.display().to_string())
}

/// Estimates the encoder from `vision_config`; returns it and the default tokens per frame.
fn estimate_vision(
    raw: &Value,
    vc: &Value,
    text: &ModelConfig,
    path: &Path,
) -> Result<(VisionEncoder, Option<u64>), BoardError> {
    let num = |key: &str| -> Result<Option<u64>, ConfigError> {
        match vc.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ConfigError::invalid(
                    path,
                    format!("vision_config.{key}"),
                    format!("expected a non-negative integer, got {v}"),
                )
            }),
        }
    };
    let need = |key: &str| -> Result<u64, ConfigError> {
        match num(key)? {
            Some(0) => Err(ConfigError::invalid(
                path,
                format!("vision_config.{key}"),
                "must be greater than zero",
            )),
            Some(x) => Ok(x),
            None => Err(ConfigError::invalid(
                path,
                format!("vision_config.{key}"),
                "missing (required to estimate the vision encoder)",
            )),
        }
    };
    let text_hidden = text.hidden_size as u64;
    let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
    let dtype_bytes = vc
        .get("torch_dtype")
        .or_else(|| vc.get("dtype"))
        .and_then(Value::as_str)
        .and_then(jetvlm_core::DType::from_hf_name)
        .unwrap_or(text.dtype)
        .size_bytes() as u64;

    if vc.get("embed_dim").is_some() && vc.get("depth").is_some() {
        // Qwen2-VL vision transformer + patch merger.
        let e = need("embed_dim")?;
        let depth = need("depth")?;
        let mlp_ratio = vc.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
        if !(mlp_ratio.is_finite() && mlp_ratio > 0.0 && e as f64 * mlp_ratio < u64::MAX as f64) {
            return Err(ConfigError::invalid(
                path,
                "vision_config.mlp_ratio",
                format!(
                    "must be a positive number with embed_dim x mlp_ratio below 2^64, got {mlp_ratio}"
                ),
            )
            .into());
        }
        let m = (e as f64 * mlp_ratio).round() as u64;
        let heads = num("num_heads")?.unwrap_or((e / 64).max(1));
        let patch = num("patch_size")?.unwrap_or(14);
        let channels = num("in_chans")?.or(num("in_channels")?).unwrap_or(3);
        let temporal = num("temporal_patch_size")?.unwrap_or(2);
        let merge = num("spatial_merge_size")?.unwrap_or(2);
        let out = num("hidden_size")?.unwrap_or(text_hidden);
        let q = "the vision encoder estimate (vision_config)";
        let merged = product(
            q,
            &[
                ("vision_config.embed_dim", e),
                ("vision_config.spatial_merge_size", merge),
                ("vision_config.spatial_merge_size", merge),
            ],
        )?;
        let layer = sum(
            q,
            &[
                (
                    "vision_config.embed_dim",
                    product(
                        q,
                        &[
                            ("", 4),
                            ("vision_config.embed_dim", e),
                            ("vision_config.embed_dim", e),
                        ],
                    )?,
                ),
                (
                    "vision_config.mlp_ratio",
                    product(
                        q,
                        &[
                            ("", 2),
                            ("vision_config.embed_dim", e),
                            ("vision_config.mlp_ratio", m),
                        ],
                    )?,
                ),
            ],
        )?;
        let params = sum(
            q,
            &[
                (
                    "vision_config.depth",
                    product(
                        q,
                        &[
                            ("vision_config.depth", depth),
                            ("vision_config.embed_dim", layer),
                        ],
                    )?,
                ),
                (
                    "vision_config.patch_size",
                    product(
                        q,
                        &[
                            ("vision_config.in_chans", channels),
                            ("vision_config.temporal_patch_size", temporal),
                            ("vision_config.patch_size", patch),
                            ("vision_config.patch_size", patch),
                            ("vision_config.embed_dim", e),
                        ],
                    )?,
                ),
                (
                    "vision_config.spatial_merge_size",
                    product(
                        q,
                        &[
                            ("vision_config.spatial_merge_size", merged),
                            ("vision_config.spatial_merge_size", merged),
                        ],
                    )?,
                ),
                (
                    "vision_config.hidden_size",
                    product(
                        q,
                        &[
                            ("vision_config.spatial_merge_size", merged),
                            ("vision_config.hidden_size", out),
                        ],
                    )?,
                ),
            ],
        )?;
        let bytes = product(
            q,
            &[
                ("vision_config.embed_dim", params),
                ("dtype bytes", dtype_bytes),
            ],
        )?;
        let side = QWEN2_VL_FRAME_PIXELS
            / product(
                q,
                &[
                    ("vision_config.patch_size", patch),
                    ("vision_config.spatial_merge_size", merge),
                ],
            )?
            .max(1);
        let tokens = side * side;
        let shape = VisionShape {
            hidden: e,
            intermediate: m,
            heads,
            patch_size: patch,
            channels,
            temporal_patch: temporal,
            patches_per_token: product(
                q,
                &[
                    ("vision_config.spatial_merge_size", merge),
                    ("vision_config.spatial_merge_size", merge),
                ],
            )?,
        };
        return Ok((
            VisionEncoder {
                params: Some(params),
                bytes,
                source: VisionSource::Estimated {
                    family: "qwen2-vl".into(),
                },
                shape: Some(shape),
            },
            (tokens > 0).then_some(tokens),
        ));
    }

    // ViT family (SigLIP / CLIP).
    let h = need("hidden_size")?;
    let i = need("intermediate_size")?;
    let layers = match num("num_hidden_layers")? {
        Some(l) => l,
        None => need("depth")?,
    };
    let heads = num("num_attention_heads")?.unwrap_or((h / 64).max(1));
    let patch = need("patch_size")?;
    let image = need("image_size")?;
    let channels = num("num_channels")?.unwrap_or(3);
    let q = "the vision encoder estimate (vision_config)";
    let patches = product(
        q,
        &[
            ("vision_config.image_size", image / patch),
            ("vision_config.image_size", image / patch),
        ],
    )?;
    let scale = raw.get("scale_factor").and_then(Value::as_u64);
    let hh = "vision_config.hidden_size";
    let (family, connector, patches_per_token) = match scale {
        Some(s) if s > 0 => (
            "idefics3",
            product(
                q,
                &[
                    (hh, h),
                    ("scale_factor", s),
                    ("scale_factor", s),
                    ("hidden_size", text_hidden),
                ],
            )?,
            product(q, &[("scale_factor", s), ("scale_factor", s)])?,
        ),
        _ if model_type.starts_with("llava") => (
            "llava",
            sum(
                q,
                &[
                    (hh, product(q, &[(hh, h), ("hidden_size", text_hidden)])?),
                    (
                        "hidden_size",
                        product(
                            q,
                            &[("hidden_size", text_hidden), ("hidden_size", text_hidden)],
                        )?,
                    ),
                ],
            )?,
            1,
        ),
        _ => (
            "vit",
            product(q, &[(hh, h), ("hidden_size", text_hidden)])?,
            1,
        ),
    };
    let layer = sum(
        q,
        &[
            (hh, product(q, &[("", 4), (hh, h), (hh, h)])?),
            (
                "vision_config.intermediate_size",
                product(
                    q,
                    &[("", 2), (hh, h), ("vision_config.intermediate_size", i)],
                )?,
            ),
        ],
    )?;
    let params = sum(
        q,
        &[
            (
                "vision_config.num_hidden_layers",
                product(
                    q,
                    &[("vision_config.num_hidden_layers", layers), (hh, layer)],
                )?,
            ),
            (
                "vision_config.patch_size",
                product(
                    q,
                    &[
                        ("vision_config.num_channels", channels),
                        ("vision_config.patch_size", patch),
                        ("vision_config.patch_size", patch),
                        (hh, h),
                    ],
                )?,
            ),
            (
                "vision_config.image_size",
                product(q, &[("vision_config.image_size", patches), (hh, h)])?,
            ),
            (hh, connector),
        ],
    )?;
    let bytes = product(q, &[(hh, params), ("dtype bytes", dtype_bytes)])?;
    let tokens = patches / patches_per_token;
    let shape = VisionShape {
        hidden: h,
        intermediate: i,
        heads,
        patch_size: patch,
        channels,
        temporal_patch: 1,
        patches_per_token,
    };
    Ok((
        VisionEncoder {
            params: Some(params),
            bytes,
            source: VisionSource::Estimated {
                family: family.into(),
            },
            shape: Some(shape),
        },
        (tokens > 0).then_some(tokens),
    ))
}
