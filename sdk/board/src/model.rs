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
//!   Gemma 3 (`mm_tokens_per_image`): `Linear(h -> text_hidden)` after the pooling.
//!   InternVL (`downsample_ratio` r, sizes as `[n, n]`): `LN + Linear(h / r^2 -> text_hidden)
//!   + Linear(text_hidden -> text_hidden)`, one token per `1 / r^2` patches.
//! - Qwen2-VL (`depth`, `embed_dim`): `depth * (4 e^2 + 2 e m)` with `m = e * mlp_ratio` +
//!   patch embedding `channels * temporal_patch * patch^2 * e` + merger
//!   `(e s^2)^2 + e s^2 * out_hidden` with `s = spatial_merge_size` (no position table: RoPE).
//!   Qwen2.5-VL and Qwen3-VL (`depth`, `hidden_size` e, `intermediate_size` m,
//!   `out_hidden_size`): the same with a gated MLP (`3 e m`) for Qwen2.5-VL, and for Qwen3-VL a
//!   learned position table (`num_position_embeddings * e`) and one more merger per DeepStack
//!   layer (`deepstack_visual_indexes`; their count is the decoder's `deepstack_layers`, the
//!   feature sets a frame carries, which the planner charges per frame token).
//!
//! Tokens per frame (one camera frame = one image):
//! - Idefics3/SmolVLM: `(image_size / patch_size)^2 / scale_factor^2` (one 512 px tile of
//!   SmolVLM-256M = 64 tokens; frames are resized to one tile, not split).
//! - Qwen2-VL, Qwen2.5-VL, Qwen3-VL: `(448 / (patch * merge))^2` for a 448x448 frame (256
//!   tokens; 196 for Qwen3-VL's 16-pixel patches).
//! - InternVL: `(image_size / patch_size)^2 * downsample_ratio^2` (256 for InternVL3).
//! - Gemma 3: `mm_tokens_per_image` (256; the 64x64 patches are pooled 4x4).
//! - LLaVA: `(image_size / patch_size)^2`.

use crate::BoardError;
use crate::plan::{product, sum};
use jetvlm_core::ConfigError;
use jetvlm_core::hf::ModelConfig;
use jetvlm_core::manifest::{MANIFEST, Manifest};
use serde::Serialize;
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

impl ModelSpec {
    /// Loads a model from a directory (`config.json` or a jetvlm package with `jetvlm.yaml`)
    /// or a path to `config.json` / `jetvlm.yaml`.
    pub fn load(path: &Path) -> Result<Self, BoardError> {
        if path.is_dir() {
            let manifest = path.join(MANIFEST);
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
            let is_manifest = path.file_name().and_then(|n| n.to_str()) == Some(MANIFEST);
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
        let mut text = ModelConfig::from_value(&raw, path)?;
        // Qwen3-VL: a frame carries one DeepStack feature set per vision layer listed here
        // (a jetvlm package's decoder config says `deepstack_layers` itself).
        if text.deepstack_layers == 0
            && let Some(indexes) = raw
                .get("vision_config")
                .and_then(|v| v.get("deepstack_visual_indexes"))
                .and_then(Value::as_array)
        {
            if indexes.len() > text.num_hidden_layers {
                return Err(ConfigError::invalid(
                    path,
                    "vision_config.deepstack_visual_indexes",
                    format!(
                        "{} DeepStack feature sets, more than the decoder's {} layers",
                        indexes.len(),
                        text.num_hidden_layers
                    ),
                )
                .into());
            }
            text.deepstack_layers = indexes.len();
        }
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

    /// Reads a jetvlm package manifest through the package schema
    /// ([`jetvlm_core::manifest::Manifest::load`], whose errors name the file and every field
    /// at fault, as `ModelPackage::load` does) and the decoder config it names.
    pub fn from_package(manifest_path: &Path) -> Result<Self, BoardError> {
        let manifest = Manifest::load(manifest_path)?;
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
        // The manifest's checks found the encoder a regular file.
        let encoder = root.join(&manifest.vision.encoder);
        let meta = std::fs::metadata(&encoder).map_err(|e| {
            ConfigError::invalid(
                manifest_path,
                "vision.encoder",
                format!("cannot read {}: {e}", encoder.display()),
            )
        })?;
        // ONNX files over 2 GB keep their tensors in an external data file beside them.
        let mut bytes = meta.len();
        for suffix in [".data", "_data"] {
            let mut external = encoder.clone().into_os_string();
            external.push(suffix);
            if let Ok(m) = std::fs::metadata(PathBuf::from(external)) {
                bytes += m.len();
            }
        }
        spec.vision = Some(VisionEncoder {
            params: None,
            bytes,
            source: VisionSource::OnnxFile { path: encoder },
            shape: None,
        });
        // All tiles and the global image of a tiled frame; the manifest's checks keep it
        // within usize.
        spec.tokens_per_frame = Some(manifest.vision.frame_tokens() as u64);
        spec.default_kv = Some(manifest.kv.policy);
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

/// A size that is one integer, or a square `[n, n]` (InternVL's `image_size` and
/// `patch_size`); `None` for anything else.
fn square_side(v: &Value) -> Option<u64> {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => a.as_u64().filter(|&a| Some(a) == b.as_u64()),
        Some(_) => None,
        None => v.as_u64(),
    }
}

/// InternVL's pixel-shuffle factor: `1 / downsample_ratio` (default 0.5, so 2), which must be
/// a whole number.
fn internvl_shuffle(raw: &Value, path: &Path) -> Result<u64, ConfigError> {
    let ratio = match raw.get("downsample_ratio").filter(|v| !v.is_null()) {
        None => 0.5,
        Some(v) => v.as_f64().unwrap_or(f64::NAN),
    };
    let factor = 1.0 / ratio;
    if ratio > 0.0 && ratio <= 1.0 && (factor - factor.round()).abs() < 1e-6 {
        Ok(factor.round() as u64)
    } else {
        Err(ConfigError::invalid(
            path,
            "downsample_ratio",
            format!(
                "must be 1/n for a whole n (0.5 shuffles 2x2 patches into one token), got {ratio}"
            ),
        ))
    }
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
            Some(v) => square_side(v).map(Some).ok_or_else(|| {
                ConfigError::invalid(
                    path,
                    format!("vision_config.{key}"),
                    format!("expected a non-negative integer (or [n, n]), got {v}"),
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

    // Qwen2.5-VL and Qwen3-VL name the tower's width `hidden_size` and the merger's output
    // `out_hidden_size` (Qwen2-VL: `embed_dim` and `hidden_size`).
    let newer_qwen = vc.get("embed_dim").is_none() && vc.get("out_hidden_size").is_some();
    if (vc.get("embed_dim").is_some() || newer_qwen) && vc.get("depth").is_some() {
        // Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision transformer + patch merger.
        let depth = need("depth")?;
        let (e, m) = if newer_qwen {
            (need("hidden_size")?, need("intermediate_size")?)
        } else {
            let e = need("embed_dim")?;
            let mlp_ratio = vc.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
            if !(mlp_ratio.is_finite() && mlp_ratio > 0.0 && e as f64 * mlp_ratio < u64::MAX as f64)
            {
                return Err(ConfigError::invalid(
                    path,
                    "vision_config.mlp_ratio",
                    format!(
                        "must be a positive number with embed_dim x mlp_ratio below 2^64, got {mlp_ratio}"
                    ),
                )
                .into());
            }
            (e, (e as f64 * mlp_ratio).round() as u64)
        };
        // Qwen2.5-VL's MLP is gated (three matrices); Qwen2-VL's and Qwen3-VL's have two.
        let mlp_matrices = if model_type == "qwen2_5_vl" { 3 } else { 2 };
        // Qwen3-VL: a learned position table, and a merger per DeepStack feature set.
        let positions = num("num_position_embeddings")?.unwrap_or(0);
        let deepstack = vc
            .get("deepstack_visual_indexes")
            .and_then(Value::as_array)
            .map_or(0, |a| a.len() as u64);
        let heads = num("num_heads")?.unwrap_or((e / 64).max(1));
        let patch = num("patch_size")?.unwrap_or(14);
        let channels = num("in_chans")?.or(num("in_channels")?).unwrap_or(3);
        let temporal = num("temporal_patch_size")?.unwrap_or(2);
        let merge = num("spatial_merge_size")?.unwrap_or(2);
        let out = if newer_qwen {
            num("out_hidden_size")?
        } else {
            num("hidden_size")?
        }
        .unwrap_or(text_hidden);
        let q = "the vision encoder estimate (vision_config)";
        let merged = product(
            q,
            &[
                ("vision_config.embed_dim", e),
                ("vision_config.spatial_merge_size", merge),
                ("vision_config.spatial_merge_size", merge),
            ],
        )?;
        // The patch merger: Linear(e s^2 -> e s^2) and Linear(e s^2 -> out).
        let merger = sum(
            q,
            &[
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
                            ("", mlp_matrices),
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
                            ("vision_config.deepstack_visual_indexes", 1 + deepstack),
                            ("vision_config.spatial_merge_size", merger),
                        ],
                    )?,
                ),
                (
                    "vision_config.num_position_embeddings",
                    product(
                        q,
                        &[
                            ("vision_config.num_position_embeddings", positions),
                            ("vision_config.embed_dim", e),
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
        // InternVL: pixel shuffle by 1 / downsample_ratio, then LayerNorm + Linear(h r^-2 ->
        // text_hidden) + Linear(text_hidden -> text_hidden).
        _ if model_type == "internvl" => {
            let r = internvl_shuffle(raw, path)?;
            (
                "internvl",
                sum(
                    q,
                    &[
                        (
                            hh,
                            product(
                                q,
                                &[
                                    (hh, h),
                                    ("downsample_ratio", r),
                                    ("downsample_ratio", r),
                                    ("hidden_size", text_hidden),
                                ],
                            )?,
                        ),
                        (
                            "hidden_size",
                            product(
                                q,
                                &[("hidden_size", text_hidden), ("hidden_size", text_hidden)],
                            )?,
                        ),
                    ],
                )?,
                product(q, &[("downsample_ratio", r), ("downsample_ratio", r)])?,
            )
        }
        // Gemma 3: the patches average-pooled to `mm_tokens_per_image` tokens, then
        // Linear(h -> text_hidden).
        _ if raw.get("mm_tokens_per_image").is_some() => {
            let tokens = raw
                .get("mm_tokens_per_image")
                .and_then(Value::as_u64)
                .filter(|&t| t > 0 && patches % t == 0)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        path,
                        "mm_tokens_per_image",
                        format!(
                            "must be a positive integer that divides the {patches} patches of a frame"
                        ),
                    )
                })?;
            (
                "gemma3",
                product(q, &[(hh, h), ("hidden_size", text_hidden)])?,
                patches / tokens,
            )
        }
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
