//! Hugging Face `config.json` for the decoder families jetvlm runs (Llama, Mistral, Qwen2,
//! and the language half of VLMs that nest it under `text_config`).
//!
//! Both config generations are accepted: the older top-level `rope_theta`, `rope_scaling`
//! and `torch_dtype`, and the newer `rope_parameters` and `dtype`. Missing
//! `num_key_value_heads` defaults to `num_attention_heads` (as transformers does); missing
//! `hidden_size` and the other shape fields are errors naming the file and field.

use crate::{ConfigError, DType};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Decoder architectures jetvlm implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen3: Qwen2's layer without q/k/v biases, with an RMSNorm over each query and key
    /// head before RoPE (`q_norm`, `k_norm`).
    Qwen3,
    /// Gemma 3's text model: RMSNorm with (1 + w) around attention and MLP (four per layer),
    /// q/k norms, a GeGLU MLP, embeddings scaled by sqrt(hidden), interleaved sliding-window
    /// and global layers ([`Gemma3Options`]).
    Gemma3,
}

impl Architecture {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "LlamaModel" => Some(Architecture::Llama),
            "MistralForCausalLM" | "MistralModel" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" | "Qwen2Model" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "Qwen3Model" => Some(Architecture::Qwen3),
            "Gemma3ForCausalLM" | "Gemma3TextModel" => Some(Architecture::Gemma3),
            _ => None,
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" | "qwen2_vl" | "qwen2_5_vl" => Some(Architecture::Qwen2),
            // A Hugging Face Qwen3-VL config (its language model; the decoder refuses to run
            // it before `jetvlm export` writes its frame grid and DeepStack layers).
            "qwen3" | "qwen3_vl" | "qwen3_vl_text" => Some(Architecture::Qwen3),
            "gemma3_text" => Some(Architecture::Gemma3),
            _ => None,
        }
    }
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Linear position interpolation.
    Linear { factor: f64 },
    /// Qwen2-VL / Qwen2.5-VL multimodal RoPE: plain frequencies, but a frame token's
    /// rotation takes its temporal, row and column position for the frequency pairs of
    /// `section[0]`, `section[1]` and `section[2]` (they sum to `head_dim / 2`). Read from
    /// `mrope_section` (with `rope_type` `mrope` in older configs, `default` in newer ones).
    /// `frame_grid` is `[rows, columns]` of a frame's tokens (`mrope_frame_grid`, which `jetvlm
    /// export` writes for the package's fixed frame size); Hugging Face configs lack it.
    /// `interleaved` (Qwen3-VL, `mrope_interleaved`): the row takes pairs `i % 3 == 1` below
    /// `3 * section[1]`, the column pairs `i % 3 == 2` below `3 * section[2]`, the temporal
    /// position the others, instead of three contiguous runs.
    MRope {
        section: [usize; 3],
        frame_grid: Option<[usize; 2]>,
        interleaved: bool,
    },
}

/// What Gemma 3's text model adds to the shared recipe, read from its `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3Options {
    /// Attention scores scale by `query_pre_attn_scalar^-1/2` (not `head_dim^-1/2`).
    pub query_pre_attn_scalar: f64,
    /// A local layer's query sees the keys fewer than this many tokens back
    /// (`sliding_window`).
    pub sliding_window: usize,
    /// Per layer, whether it is a local (sliding-window) layer (`layer_types`; older configs:
    /// every `sliding_window_pattern`-th layer is global).
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the local layers (`rope_parameters.sliding_attention.rope_theta`, older
    /// `rope_local_base_freq`); the global layers use the model's `rope_theta` and scaling.
    pub local_rope_theta: f64,
    /// Logits become `cap * tanh(logits / cap)` (`final_logit_softcapping`).
    pub final_logit_softcapping: Option<f64>,
}

/// The validated language-model configuration: every shape the decoder, the KV cache and
/// the memory planner need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// The `architectures[0]` string as written (or derived from `model_type`).
    pub architecture_name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2 always; Llama when `attention_bias`).
    pub attention_bias: bool,
    /// An RMSNorm of `head_dim` over every query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// DeepStack (Qwen3-VL, `deepstack_layers`): a frame carries this many extra feature
    /// sets from the vision encoder; set `i` is added to the frame tokens' hidden states after
    /// decoder layer `i`. 0 without DeepStack.
    pub deepstack_layers: usize,
    /// Gemma 3's options (`Some` exactly for [`Architecture::Gemma3`]).
    pub gemma3: Option<Gemma3Options>,
    pub dtype: DType,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// The one position policy of every command and session: a context whose RoPE positions
    /// pass the trained range (`max_position_embeddings`) runs, with this warning naming
    /// `what` needs them and the limit (RoPE past its trained range gives unreliable answers).
    /// `None` when `positions` fit.
    pub fn positions_warning(&self, positions: usize, what: &str) -> Option<String> {
        let max = self.max_position_embeddings;
        (positions > max).then(|| {
            format!(
                "{what} needs {positions} positions, past the model's trained range of {max} \
                 (max_position_embeddings): answers there are unreliable"
            )
        })
    }

    /// Parameters of the language model (embeddings, layers, final norm, LM head unless
    /// tied).
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let i = self.intermediate_size as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * i;
        let qk_norms = if self.qk_norm {
            2 * self.head_dim as u64
        } else {
            0
        };
        // Gemma 3 norms before and after attention and the MLP.
        let norms = if self.gemma3.is_some() { 4 * h } else { 2 * h } + qk_norms;
        let layer = attn + mlp + norms;
        let emb = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_hidden_layers as u64 * layer + h
    }

    /// Bytes of the weights at the stored dtype.
    pub fn weight_bytes(&self) -> u64 {
        self.num_parameters() * self.dtype.size_bytes() as u64
    }

    /// Bytes of weights a decode step reads: everything except the embedding table (one row
    /// is gathered), but including the LM head (the tied embedding when tied).
    pub fn weight_bytes_read_per_token(&self) -> u64 {
        let emb = self.vocab_size as u64 * self.hidden_size as u64;
        let params = self.num_parameters() - emb + if self.tie_word_embeddings { emb } else { 0 };
        params * self.dtype.size_bytes() as u64
    }

    /// K and V elements stored per token across all layers.
    pub fn kv_elements_per_token(&self) -> u64 {
        2 * (self.num_hidden_layers * self.num_key_value_heads * self.head_dim) as u64
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let raw: Value = crate::config::load_json(path)?;
        Self::from_value(&raw, path)
    }

    /// Validates an already-parsed `config.json`; `path` names it in errors.
    pub fn from_value(raw: &Value, path: &Path) -> Result<Self, ConfigError> {
        // VLM configs (Idefics3/SmolVLM, LLaVA) nest the language model under `text_config`;
        // Qwen2-VL keeps it at the top level. Fields missing from `text_config` fall back to
        // the top level.
        let text = raw.get("text_config").filter(|v| v.is_object());
        let get = |key: &str| -> Option<&Value> {
            text.and_then(|t| t.get(key))
                .filter(|v| !v.is_null())
                .or_else(|| raw.get(key).filter(|v| !v.is_null()))
        };
        let prefix = if text.is_some() { "text_config." } else { "" };
        let field = |key: &str| format!("{prefix}{key}");

        let usize_field = |key: &str| -> Result<Option<usize>, ConfigError> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                    ConfigError::invalid(
                        path,
                        field(key),
                        format!("expected a non-negative integer, got {v}"),
                    )
                }),
            }
        };
        let required = |key: &str| -> Result<usize, ConfigError> {
            match usize_field(key)? {
                Some(0) => Err(ConfigError::invalid(
                    path,
                    field(key),
                    "must be greater than zero",
                )),
                Some(x) => Ok(x),
                None => Err(ConfigError::invalid(path, field(key), "missing (required)")),
            }
        };
        let f64_field = |key: &str| -> Result<Option<f64>, ConfigError> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    ConfigError::invalid(path, field(key), format!("expected a number, got {v}"))
                }),
            }
        };

        // Architecture.
        let arch_name = get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .map(str::to_string);
        let model_type = get("model_type")
            .and_then(|m| m.as_str())
            .map(str::to_string);
        let (architecture, architecture_name) = match (&arch_name, &model_type) {
            (Some(name), _) if Architecture::from_hf(name).is_some() => (
                Architecture::from_hf(name).unwrap_or(Architecture::Llama),
                name.clone(),
            ),
            (_, Some(mt)) if Architecture::from_model_type(mt).is_some() => (
                Architecture::from_model_type(mt).unwrap_or(Architecture::Llama),
                arch_name.clone().unwrap_or_else(|| mt.clone()),
            ),
            _ => {
                let shown = arch_name.or(model_type).unwrap_or_else(|| "<none>".into());
                return Err(ConfigError::invalid(
                    path,
                    field("architectures"),
                    format!(
                        "unsupported architecture `{shown}` (supported: LlamaForCausalLM, \
                         MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, \
                         Gemma3ForCausalLM)"
                    ),
                ));
            }
        };

        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_hidden_layers = required("num_hidden_layers")?;
        let intermediate_size = required("intermediate_size")?;
        let vocab_size = required("vocab_size")?;
        let num_key_value_heads = match usize_field("num_key_value_heads")? {
            Some(0) => {
                return Err(ConfigError::invalid(
                    path,
                    field("num_key_value_heads"),
                    "must be greater than zero",
                ));
            }
            Some(x) => x,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ConfigError::invalid(
                path,
                field("num_key_value_heads"),
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match usize_field("head_dim")? {
            Some(0) => {
                return Err(ConfigError::invalid(
                    path,
                    field("head_dim"),
                    "must be greater than zero (leave it out to derive it from hidden_size / num_attention_heads)",
                ));
            }
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ConfigError::invalid(
                        path,
                        field("hidden_size"),
                        format!(
                            "{hidden_size} is not a multiple of num_attention_heads \
                             {num_attention_heads} and no head_dim is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(d) => d,
        };
        if head_dim % 2 != 0 {
            return Err(ConfigError::invalid(
                path,
                field("head_dim"),
                format!("{head_dim} must be even for RoPE"),
            ));
        }

        // RoPE: newer `rope_parameters`, older `rope_theta` + `rope_scaling`.
        // Gemma 3 keeps one RoPE per layer type: the global layers' is the model's RoPE (the
        // local layers' base is read into `Gemma3Options`).
        let rope_root = get("rope_parameters").filter(|v| v.is_object());
        let rope_global = rope_root
            .and_then(|p| p.get("full_attention"))
            .filter(|v| v.is_object());
        let rope_params = rope_global.or(rope_root);
        let rope_scaling_obj =
            rope_params.or_else(|| get("rope_scaling").filter(|v| v.is_object()));
        let rope_field = match (rope_global, rope_params) {
            (Some(_), _) => field("rope_parameters.full_attention"),
            (None, Some(_)) => field("rope_parameters"),
            _ => field("rope_scaling"),
        };
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                ConfigError::invalid(
                    path,
                    format!("{rope_field}.rope_theta"),
                    format!("expected a number, got {v}"),
                )
            })?,
            None => f64_field("rope_theta")?.unwrap_or(10_000.0),
        };
        let max_position_embeddings = usize_field("max_position_embeddings")?.unwrap_or(4096);
        let mut rope_scaling =
            parse_rope_scaling(rope_scaling_obj, path, &rope_field, max_position_embeddings)?;
        if let RopeScaling::MRope { interleaved, .. } = &mut rope_scaling
            && let Some(v) = rope_scaling_obj.and_then(|o| o.get("mrope_interleaved"))
            && !v.is_null()
        {
            *interleaved = v.as_bool().ok_or_else(|| {
                ConfigError::invalid(
                    path,
                    format!("{rope_field}.mrope_interleaved"),
                    format!("expected true or false, got {v}"),
                )
            })?;
        }
        if let RopeScaling::MRope { frame_grid, .. } = &mut rope_scaling
            && let Some(v) = get("mrope_frame_grid")
        {
            let grid: Option<Vec<usize>> = v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
            match grid.as_deref() {
                Some(&[r, c]) if r > 0 && c > 0 && r.checked_mul(c).is_some() => {
                    *frame_grid = Some([r, c])
                }
                _ => {
                    return Err(ConfigError::invalid(
                        path,
                        field("mrope_frame_grid"),
                        format!("expected [rows, columns] of positive integers, got {v}"),
                    ));
                }
            }
        }

        let rms_norm_eps = f64_field("rms_norm_eps")?.unwrap_or(1e-6);
        let tie_word_embeddings = get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let qk_norm = matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3);
        let gemma3 = match architecture {
            Architecture::Gemma3 => Some(gemma3_options(
                &get,
                &field,
                path,
                rope_root,
                num_hidden_layers,
                head_dim,
            )?),
            _ => None,
        };
        let deepstack_layers = usize_field("deepstack_layers")?.unwrap_or(0);
        if deepstack_layers > num_hidden_layers {
            return Err(ConfigError::invalid(
                path,
                field("deepstack_layers"),
                format!(
                    "{deepstack_layers} DeepStack layers, more than num_hidden_layers \
                     {num_hidden_layers}"
                ),
            ));
        }
        let dtype = match get("dtype").or_else(|| get("torch_dtype")) {
            None => DType::F32,
            Some(v) => {
                let s = v.as_str().unwrap_or("");
                DType::from_hf_name(s).ok_or_else(|| {
                    ConfigError::invalid(path, field("dtype"), format!("unsupported dtype {v}"))
                })?
            }
        };
        let token_id = |key: &str, v: &Value| -> Result<u32, ConfigError> {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        path,
                        field(key),
                        format!("expected a token id (a non-negative integer), got {v}"),
                    )
                })
        };
        let bos_token_id = get("bos_token_id")
            .map(|v| token_id("bos_token_id", v))
            .transpose()?;
        let eos_token_ids = match get("eos_token_id") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| token_id("eos_token_id", v))
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => vec![token_id("eos_token_id", v)?],
            None => Vec::new(),
        };

        let config = ModelConfig {
            architecture,
            architecture_name,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings,
            attention_bias,
            qk_norm,
            deepstack_layers,
            gemma3,
            dtype,
            bos_token_id,
            eos_token_ids,
        };
        config.check(path, prefix, &rope_field)?;
        Ok(config)
    }

    /// Checks every numeric field against its domain: positive finite `rms_norm_eps`,
    /// `rope_theta` and RoPE scaling factors, non-zero shapes, special token ids inside the
    /// vocabulary, and sizes whose parameter and KV arithmetic fits 64 bits.
    /// [`ModelConfig::from_value`] runs it on every config it returns; call it on a config
    /// built by hand. `path` names the file in the error.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.check(path, "", "rope_scaling")
    }

    fn check(&self, path: &Path, prefix: &str, rope_field: &str) -> Result<(), ConfigError> {
        let bad =
            |key: &str, msg: String| ConfigError::invalid(path, format!("{prefix}{key}"), msg);
        let positive = |key: &str, x: f64| -> Result<(), ConfigError> {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(bad(
                    key,
                    format!("must be a positive finite number, got {x}"),
                ))
            }
        };
        for (key, x) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if x == 0 {
                return Err(bad(key, "must be greater than zero".into()));
            }
        }
        positive("rms_norm_eps", self.rms_norm_eps)?;
        let rope = rope_field.strip_prefix(prefix).unwrap_or(rope_field);
        if rope.starts_with("rope_parameters") {
            positive(&format!("{rope}.rope_theta"), self.rope_theta)?;
        } else {
            positive("rope_theta", self.rope_theta)?;
        }
        match &self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::MRope { section, .. } => {
                let sum = section.iter().try_fold(0usize, |a, &x| a.checked_add(x));
                if sum != Some(self.head_dim / 2) {
                    return Err(bad(
                        &format!("{rope}.mrope_section"),
                        format!(
                            "{section:?} must sum to head_dim / 2 = {}",
                            self.head_dim / 2
                        ),
                    ));
                }
            }
            RopeScaling::Linear { factor } => positive(&format!("{rope}.factor"), *factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive(&format!("{rope}.factor"), *factor)?;
                positive(&format!("{rope}.low_freq_factor"), *low_freq_factor)?;
                positive(&format!("{rope}.high_freq_factor"), *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(bad(
                        &format!("{rope}.high_freq_factor"),
                        format!(
                            "{high_freq_factor} must be greater than low_freq_factor {low_freq_factor}"
                        ),
                    ));
                }
                if *original_max_position_embeddings == 0 {
                    return Err(bad(
                        &format!("{rope}.original_max_position_embeddings"),
                        "must be greater than zero".into(),
                    ));
                }
            }
        }
        let vocab = self.vocab_size;
        let outside = |id: u32| id as usize >= vocab;
        if let Some(id) = self.bos_token_id.filter(|id| outside(*id)) {
            return Err(bad(
                "bos_token_id",
                format!("{id} is outside the vocabulary (vocab_size {vocab})"),
            ));
        }
        if let Some(id) = self.eos_token_ids.iter().copied().find(|id| outside(*id)) {
            return Err(bad(
                "eos_token_id",
                format!("{id} is outside the vocabulary (vocab_size {vocab})"),
            ));
        }
        // Every size derived from the shapes (parameters, weight bytes at 4 bytes, KV bytes
        // per token at 4 bytes per element) must fit 64 bits.
        if self.checked_sizes().is_none() {
            let (key, x) = [
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("head_dim", self.head_dim),
                ("vocab_size", self.vocab_size),
            ]
            .into_iter()
            .max_by_key(|t| t.1)
            .unwrap_or(("hidden_size", self.hidden_size));
            return Err(bad(
                key,
                format!(
                    "{x} is too large: the model's parameter or KV byte count overflows 64 bits"
                ),
            ));
        }
        Ok(())
    }

    /// Parameters and KV elements per token, both times 4 bytes, when none of the
    /// arithmetic overflows 64 bits.
    fn checked_sizes(&self) -> Option<(u64, u64)> {
        let n = |x: usize| x as u64;
        let h = n(self.hidden_size);
        let q = n(self.num_attention_heads).checked_mul(n(self.head_dim))?;
        let kv = n(self.num_key_value_heads).checked_mul(n(self.head_dim))?;
        let i = n(self.intermediate_size);
        let bias = q.checked_add(kv.checked_mul(2)?)?;
        let attn = h
            .checked_mul(q)?
            .checked_add(h.checked_mul(kv)?.checked_mul(2)?)?
            .checked_add(q.checked_mul(h)?)?
            .checked_add(bias)?;
        let layer = attn
            .checked_add(h.checked_mul(i)?.checked_mul(3)?)?
            .checked_add(h.checked_mul(2)?)?;
        let emb = n(self.vocab_size).checked_mul(h)?;
        let params = emb
            .checked_mul(2)?
            .checked_add(n(self.num_hidden_layers).checked_mul(layer)?)?
            .checked_add(h)?;
        let kv_elements = n(self.num_hidden_layers).checked_mul(kv)?.checked_mul(2)?;
        // Every per-token and per-chunk size the planner derives stays far below this.
        Some((params.checked_mul(16)?, kv_elements.checked_mul(16)?))
    }
}

/// Gemma 3's options from its config (`get` reads the text config, then the top level;
/// `field` prefixes a key for errors). Fields transformers' Gemma 3 has but jetvlm does not
/// run (score softcapping, bidirectional text attention, a non-default local RoPE, biases)
/// are refused naming the field.
fn gemma3_options<'a>(
    get: &impl Fn(&str) -> Option<&'a Value>,
    field: &impl Fn(&str) -> String,
    path: &Path,
    rope_root: Option<&'a Value>,
    layers: usize,
    head_dim: usize,
) -> Result<Gemma3Options, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, field(key), msg);
    let number = |key: &str| -> Result<Option<f64>, ConfigError> {
        match get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(bad(key, format!("expected a positive number, got {v}"))),
            },
        }
    };
    if let Some(v) = get("attn_logit_softcapping") {
        return Err(bad(
            "attn_logit_softcapping",
            format!(
                "{v} is not supported: jetvlm's attention kernels have no score softcapping \
                 (transformers' Gemma 3 attention does not apply it either)"
            ),
        ));
    }
    if get("use_bidirectional_attention").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "use_bidirectional_attention",
            "true (an embedding model's bidirectional text attention) is not supported".into(),
        ));
    }
    if get("attention_bias").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "attention_bias",
            "true is not supported for Gemma 3 (no q/k/v/o biases)".into(),
        ));
    }
    let query_pre_attn_scalar = number("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
    let sliding_window = match get("sliding_window") {
        None => 4096,
        Some(v) => match v.as_u64() {
            Some(w) if w > 0 => w as usize,
            _ => {
                return Err(bad(
                    "sliding_window",
                    format!("expected a positive integer, got {v}"),
                ));
            }
        },
    };
    let sliding_layers = match get("layer_types") {
        Some(v) => {
            let types = v.as_array().ok_or_else(|| {
                bad(
                    "layer_types",
                    format!("expected a list of layer types, got {v}"),
                )
            })?;
            if types.len() != layers {
                return Err(bad(
                    "layer_types",
                    format!("{} entries for num_hidden_layers {layers}", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(bad(
                        "layer_types",
                        format!("`{t}` is not sliding_attention or full_attention"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        None => {
            let pattern = match get("sliding_window_pattern") {
                None => 6,
                Some(v) => match v.as_u64() {
                    Some(p) if p > 0 => p as usize,
                    _ => {
                        return Err(bad(
                            "sliding_window_pattern",
                            format!("expected a positive integer, got {v}"),
                        ));
                    }
                },
            };
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let local = rope_root
        .and_then(|p| p.get("sliding_attention"))
        .filter(|v| v.is_object());
    let local_rope_theta = match local {
        Some(l) => {
            let kind = l
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(bad(
                    "rope_parameters.sliding_attention.rope_type",
                    format!("`{kind}` is not supported for the local layers (default)"),
                ));
            }
            match l.get("rope_theta") {
                None => 10_000.0,
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => x,
                    _ => {
                        return Err(bad(
                            "rope_parameters.sliding_attention.rope_theta",
                            format!("expected a positive number, got {v}"),
                        ));
                    }
                },
            }
        }
        None => number("rope_local_base_freq")?.unwrap_or(10_000.0),
    };
    Ok(Gemma3Options {
        query_pre_attn_scalar,
        sliding_window,
        sliding_layers,
        local_rope_theta,
        final_logit_softcapping: number("final_logit_softcapping")?,
    })
}

#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

fn parse_rope_scaling(
    obj: Option<&Value>,
    path: &Path,
    field: &str,
    max_pos: usize,
) -> Result<RopeScaling, ConfigError> {
    let Some(obj) = obj else {
        return Ok(RopeScaling::Default);
    };
    let raw: RawRopeScaling = serde_json::from_value(obj.clone())
        .map_err(|e| ConfigError::invalid(path, field, e.to_string()))?;
    let kind = raw
        .rope_type
        .or_else(|| obj.get("type").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "default".into());
    // M-RoPE is named by its sections: newer configs keep `rope_type: default` beside them.
    if let Some(sec) = obj.get("mrope_section").filter(|v| !v.is_null()) {
        if kind != "default" && kind != "mrope" {
            return Err(ConfigError::invalid(
                path,
                format!("{field}.rope_type"),
                format!("`{kind}` with mrope_section is not supported (default or mrope)"),
            ));
        }
        let parts: Option<Vec<usize>> = sec
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .unwrap_or(None);
        return match parts.as_deref() {
            Some(&[t, h, w]) => Ok(RopeScaling::MRope {
                section: [t, h, w],
                frame_grid: None,
                interleaved: false,
            }),
            _ => Err(ConfigError::invalid(
                path,
                format!("{field}.mrope_section"),
                format!("expected three non-negative integers, got {sec}"),
            )),
        };
    }
    match kind.as_str() {
        "default" => Ok(RopeScaling::Default),
        "mrope" => Err(ConfigError::invalid(
            path,
            format!("{field}.mrope_section"),
            "missing (rope_type mrope needs the three section sizes)",
        )),
        "linear" => Ok(RopeScaling::Linear {
            factor: raw.factor.unwrap_or(1.0),
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: raw.factor.unwrap_or(8.0),
            low_freq_factor: raw.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: raw.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: raw
                .original_max_position_embeddings
                .unwrap_or(max_pos),
        }),
        other => Err(ConfigError::invalid(
            path,
            format!("{field}.rope_type"),
            format!("unsupported RoPE scaling `{other}` (supported: default, linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p() -> &'static Path {
        Path::new("config.json")
    }

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "torch_dtype": "bfloat16",
            "tie_word_embeddings": true, "max_position_embeddings": 8192
        })
    }

    #[test]
    fn smollm2_135m_shape() {
        let c = ModelConfig::from_value(&base(), p()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.dtype, DType::BF16);
        assert_eq!(c.rope_theta, 100000.0);
        // SmolLM2-135M has 134.5M parameters.
        let n = c.num_parameters();
        assert!((134_000_000..135_000_000).contains(&n), "{n}");
    }

    #[test]
    fn newer_rope_parameters_and_dtype() {
        let mut v = base();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("torch_dtype");
        o.insert("dtype".into(), json!("float16"));
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}),
        );
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.dtype, DType::F16);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn missing_kv_heads_defaults_to_heads() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert_eq!(c.num_key_value_heads, 9);
    }

    #[test]
    fn missing_hidden_size_names_field() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_value(&v, p()).unwrap_err();
        assert_eq!(e.field(), Some("hidden_size"));
        assert!(e.to_string().contains("config.json"));
    }

    #[test]
    fn unsupported_arch() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        v.as_object_mut()
            .unwrap()
            .insert("model_type".into(), json!("gpt2"));
        let e = ModelConfig::from_value(&v, p()).unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
    }

    #[test]
    fn nested_text_config() {
        let v = json!({
            "architectures": ["Idefics3ForConditionalGeneration"],
            "text_config": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49280},
            "torch_dtype": "bfloat16"
        });
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.dtype, DType::BF16);
        assert_eq!(c.vocab_size, 49280);
    }

    /// Applies `edit` to the base config and returns the error's field and message.
    fn rejected(edit: impl FnOnce(&mut Value)) -> (String, String) {
        let mut v = base();
        edit(&mut v);
        let e = ModelConfig::from_value(&v, p()).expect_err("the config must be refused");
        (e.field().unwrap_or("").to_string(), e.to_string())
    }

    #[test]
    fn numeric_fields_outside_their_domain_name_the_field() {
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "rms_norm_eps",
                Box::new(|v| v["rms_norm_eps"] = json!(-1e-5)),
            ),
            ("rms_norm_eps", Box::new(|v| v["rms_norm_eps"] = json!(0.0))),
            ("rope_theta", Box::new(|v| v["rope_theta"] = json!(0.0))),
            (
                "rope_theta",
                Box::new(|v| v["rope_theta"] = json!(-10000.0)),
            ),
            ("head_dim", Box::new(|v| v["head_dim"] = json!(0))),
            (
                "max_position_embeddings",
                Box::new(|v| v["max_position_embeddings"] = json!(0)),
            ),
            (
                "eos_token_id",
                Box::new(|v| v["eos_token_id"] = json!(49152)),
            ),
            (
                "eos_token_id",
                Box::new(|v| v["eos_token_id"] = json!([2, 4_000_000])),
            ),
            (
                "eos_token_id",
                Box::new(|v| v["eos_token_id"] = json!("</s>")),
            ),
            (
                "bos_token_id",
                Box::new(|v| v["bos_token_id"] = json!(1_000_000)),
            ),
            (
                "rope_scaling.factor",
                Box::new(|v| v["rope_scaling"] = json!({"rope_type": "linear", "factor": 0.0})),
            ),
            (
                "rope_scaling.factor",
                Box::new(|v| v["rope_scaling"] = json!({"rope_type": "llama3", "factor": -8.0})),
            ),
            (
                "rope_parameters.high_freq_factor",
                Box::new(|v| {
                    v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0,
                        "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0})
                }),
            ),
            (
                "rope_parameters.rope_theta",
                Box::new(|v| {
                    v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 0.0})
                }),
            ),
            (
                "vocab_size",
                Box::new(|v| v["vocab_size"] = json!(u64::MAX)),
            ),
        ];
        for (field, edit) in cases {
            let (got, msg) = rejected(edit);
            assert_eq!(got, field, "{msg}");
            assert!(msg.contains("config.json"), "{msg}");
        }
    }

    #[test]
    fn special_token_ids_inside_the_vocabulary_are_kept() {
        let mut v = base();
        v["eos_token_id"] = json!([0, 49151]);
        v["bos_token_id"] = json!(1);
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert_eq!(c.eos_token_ids, vec![0, 49151]);
        assert_eq!(c.bos_token_id, Some(1));
        c.validate(p()).unwrap();
        let nan = ModelConfig {
            rms_norm_eps: f64::NAN,
            ..c
        };
        assert!(
            nan.validate(p())
                .unwrap_err()
                .to_string()
                .contains("rms_norm_eps")
        );
    }

    #[test]
    fn mrope_sections_are_read_from_both_config_generations() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2VLForConditionalGeneration"]);
        v["model_type"] = json!("qwen2_vl");
        v["rope_scaling"] = json!({"type": "mrope", "mrope_section": [8, 12, 12]});
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::MRope {
                section: [8, 12, 12],
                frame_grid: None,
                interleaved: false,
            }
        );
        v["mrope_frame_grid"] = json!([3, 5]);
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::MRope {
                frame_grid: Some([3, 5]),
                ..
            }
        ));
        v["mrope_frame_grid"] = json!([3, 0]);
        let e = ModelConfig::from_value(&v, p()).unwrap_err();
        assert_eq!(e.field(), Some("mrope_frame_grid"), "{e}");
        let mut v = base();
        v["rope_parameters"] =
            json!({"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]});
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::MRope { .. }));
        // Sections that do not cover head_dim / 2 (32), or a bare `mrope`, name the field.
        let (field, msg) = rejected(|v| {
            v["rope_scaling"] = json!({"type": "mrope", "mrope_section": [16, 24, 24]})
        });
        assert_eq!(field, "rope_scaling.mrope_section", "{msg}");
        let (field, msg) = rejected(|v| v["rope_scaling"] = json!({"type": "mrope"}));
        assert_eq!(field, "rope_scaling.mrope_section", "{msg}");
    }

    /// Qwen3 (the language model of an exported Qwen3-VL): q/k norms, interleaved M-RoPE and
    /// DeepStack layers are read; a bad `mrope_interleaved` or too many DeepStack layers name
    /// their field.
    #[test]
    fn qwen3_vl_decoder_fields_are_read() {
        let mut v = base();
        v["architectures"] = json!(["Qwen3ForCausalLM"]);
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6,
            "mrope_section": [12, 10, 10], "mrope_interleaved": true});
        v["deepstack_layers"] = json!(2);
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert!(c.qk_norm && !c.attention_bias);
        assert_eq!(c.deepstack_layers, 2);
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::MRope {
                section: [12, 10, 10],
                interleaved: true,
                ..
            }
        ));
        let per_layer = |c: &ModelConfig| c.num_parameters();
        let mut plain = c.clone();
        plain.qk_norm = false;
        assert_eq!(
            per_layer(&c) - per_layer(&plain),
            2 * (c.head_dim * c.num_hidden_layers) as u64
        );
        // A Hugging Face Qwen3-VL config reads as its Qwen3 language model.
        let mut hf = v.clone();
        hf["architectures"] = json!(["Qwen3VLForConditionalGeneration"]);
        hf["model_type"] = json!("qwen3_vl");
        assert_eq!(
            ModelConfig::from_value(&hf, p()).unwrap().architecture,
            Architecture::Qwen3
        );
        v["rope_parameters"]["mrope_interleaved"] = json!("yes");
        let e = ModelConfig::from_value(&v, p()).unwrap_err();
        assert_eq!(e.field(), Some("rope_parameters.mrope_interleaved"), "{e}");
        v["rope_parameters"]["mrope_interleaved"] = json!(true);
        v["deepstack_layers"] = json!(c.num_hidden_layers + 1);
        let e = ModelConfig::from_value(&v, p()).unwrap_err();
        assert_eq!(e.field(), Some("deepstack_layers"), "{e}");
    }

    /// Gemma 3's text config as transformers 5 writes it (one RoPE per layer type, layer
    /// types listed) and the older form (top-level rope_theta/rope_scaling,
    /// rope_local_base_freq, sliding_window_pattern) give the same options; what jetvlm does
    /// not run is refused naming the field.
    #[test]
    fn gemma3_options_are_read_and_refusals_name_the_field() {
        let newer = json!({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "vocab_size": 100, "query_pre_attn_scalar": 24, "sliding_window": 512,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            "final_logit_softcapping": null, "attn_logit_softcapping": null,
            "hidden_activation": "gelu_pytorch_tanh"});
        let c = ModelConfig::from_value(&newer, p()).unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert!(c.qk_norm);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        let g = c.gemma3.clone().unwrap();
        assert_eq!(
            g,
            Gemma3Options {
                query_pre_attn_scalar: 24.0,
                sliding_window: 512,
                sliding_layers: vec![true, true, true, true, true, false],
                local_rope_theta: 1e4,
                final_logit_softcapping: None,
            }
        );
        let mut older = newer.clone();
        let o = older.as_object_mut().unwrap();
        o.remove("layer_types");
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), json!(1e6));
        o.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": 8.0}),
        );
        o.insert("rope_local_base_freq".into(), json!(1e4));
        assert_eq!(ModelConfig::from_value(&older, p()).unwrap(), c);
        // Four norms per layer (and the q/k norms) in the parameter count.
        let plain = ModelConfig {
            gemma3: None,
            ..c.clone()
        };
        assert_eq!(
            c.num_parameters() - plain.num_parameters(),
            2 * (c.hidden_size * c.num_hidden_layers) as u64
        );
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "attn_logit_softcapping",
                Box::new(|v| v["attn_logit_softcapping"] = json!(50.0)),
            ),
            (
                "use_bidirectional_attention",
                Box::new(|v| v["use_bidirectional_attention"] = json!(true)),
            ),
            (
                "layer_types",
                Box::new(|v| v["layer_types"] = json!(["full_attention"])),
            ),
            (
                "rope_parameters.sliding_attention.rope_type",
                Box::new(|v| {
                    v["rope_parameters"]["sliding_attention"]["rope_type"] = json!("linear")
                }),
            ),
            (
                "sliding_window",
                Box::new(|v| v["sliding_window"] = json!(0)),
            ),
            (
                "rope_parameters.full_attention.rope_theta",
                Box::new(|v| v["rope_parameters"]["full_attention"]["rope_theta"] = json!(-1.0)),
            ),
        ];
        for (field, edit) in cases {
            let mut v = newer.clone();
            edit(&mut v);
            let e = ModelConfig::from_value(&v, p()).unwrap_err();
            assert_eq!(e.field(), Some(field), "{e}");
        }
    }

    #[test]
    fn qwen2_has_bias() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        let c = ModelConfig::from_value(&v, p()).unwrap();
        assert!(c.attention_bias);
    }
}
