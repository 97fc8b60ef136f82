//! `config.json` -> validated [`Config`]: the shared Hugging Face schema of `jetvlm_core::hf`
//! plus the checks only the decoder makes (activation, MLP bias, sliding window).

use crate::error::{DecoderError, Result};
use jetvlm_core::hf::ModelConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The validated decoder configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Shapes, RoPE, dtype, tie, biases, special ids.
    pub model: ModelConfig,
    /// Where it was read from.
    pub path: PathBuf,
    /// Mistral's sliding attention window, when configured; the decoder attends to the full
    /// cache, which is exact for contexts up to the window.
    pub sliding_window: Option<usize>,
}

impl Config {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: Value = jetvlm_core::config::load_json(path)?;
        Self::from_value(&raw, path)
    }

    pub fn from_value(raw: &Value, path: &Path) -> Result<Self> {
        let model = ModelConfig::from_value(raw, path)?;
        let text = raw
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(raw);
        let get = |k: &str| text.get(k).or_else(|| raw.get(k)).filter(|v| !v.is_null());
        let unsupported = |field: &str, msg: String| DecoderError::Unsupported {
            path: path.to_path_buf(),
            field: field.to_string(),
            msg,
        };
        // Gemma 3's MLP is GeGLU with the tanh approximation of GELU; the others' SwiGLU.
        let act_field = ["hidden_act", "hidden_activation"]
            .into_iter()
            .find_map(|k| get(k).map(|v| (k, v)));
        if let Some((key, act)) = act_field {
            let a = act.as_str().unwrap_or("");
            let (ok, wanted) = match model.gemma3 {
                Some(_) => (a == "gelu_pytorch_tanh", "gelu_pytorch_tanh"),
                None => (a == "silu" || a == "swish", "silu"),
            };
            if !ok {
                return Err(unsupported(
                    key,
                    format!("activation {act} not supported ({wanted})"),
                ));
            }
        }
        if let jetvlm_core::hf::RopeScaling::MRope {
            frame_grid: None, ..
        } = model.rope_scaling
        {
            return Err(unsupported(
                "mrope_frame_grid",
                "missing: M-RoPE (Qwen2-VL / Qwen2.5-VL, `mrope_section`) places a frame's tokens \
                 by row and column, which needs the frame's token grid; `jetvlm export` writes it \
                 for the package's frame size"
                    .into(),
            ));
        }
        if model.architecture == jetvlm_core::hf::Architecture::Qwen3 && model.attention_bias {
            return Err(unsupported(
                "attention_bias",
                "Qwen3 with attention biases (on q/k/v and o_proj) is not supported".into(),
            ));
        }
        if get("mlp_bias").and_then(Value::as_bool).unwrap_or(false) {
            return Err(unsupported(
                "mlp_bias",
                "MLP biases are not supported".into(),
            ));
        }
        if let Some(p) = get("pretraining_tp").and_then(Value::as_u64)
            && p > 1
        {
            tracing::debug!(
                pretraining_tp = p,
                "pretraining_tp only affects training numerics; ignored"
            );
        }
        let sliding_window = match get("use_sliding_window").and_then(Value::as_bool) {
            Some(false) => None,
            _ => get("sliding_window")
                .and_then(Value::as_u64)
                .map(|w| w as usize),
        };
        Ok(Config {
            model,
            path: path.to_path_buf(),
            sliding_window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
               "hidden_act": "silu"})
    }

    #[test]
    fn accepts_silu_rejects_gelu_and_mlp_bias() {
        let p = Path::new("config.json");
        assert!(Config::from_value(&base(), p).is_ok());
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        let e = Config::from_value(&v, p).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("config.json"), "{e}");
        let mut v = base();
        v["mlp_bias"] = json!(true);
        assert!(matches!(
            Config::from_value(&v, p),
            Err(DecoderError::Unsupported { .. })
        ));
    }

    /// Gemma 3's MLP is GeGLU with GELU's tanh approximation: another activation is refused
    /// naming `hidden_activation`; the others' SwiGLU does not take it.
    #[test]
    fn gemma3_takes_gelu_tanh_only() {
        let p = Path::new("config.json");
        let mut v = json!({"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100,
            "hidden_activation": "gelu_pytorch_tanh"});
        assert!(Config::from_value(&v, p).unwrap().model.gemma3.is_some());
        v["hidden_activation"] = json!("gelu");
        let e = Config::from_value(&v, p).unwrap_err().to_string();
        assert!(
            e.contains("hidden_activation") && e.contains("gelu_pytorch_tanh"),
            "{e}"
        );
        let mut llama = base();
        llama["hidden_act"] = json!("gelu_pytorch_tanh");
        assert!(Config::from_value(&llama, p).is_err());
    }

    #[test]
    fn mrope_without_its_frame_grid_is_refused_naming_the_field() {
        let p = Path::new("config.json");
        let mut v = base();
        v["rope_scaling"] = json!({"type": "mrope", "mrope_section": [2, 3, 3]});
        let e = Config::from_value(&v, p).unwrap_err();
        assert!(matches!(e, DecoderError::Unsupported { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("mrope_frame_grid") && msg.contains("M-RoPE"),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1, "{msg}");
        v["mrope_frame_grid"] = json!([2, 3]);
        let c = Config::from_value(&v, p).unwrap();
        assert!(matches!(
            c.model.rope_scaling,
            jetvlm_core::hf::RopeScaling::MRope {
                frame_grid: Some([2, 3]),
                ..
            }
        ));
    }

    #[test]
    fn unsupported_architecture_is_a_config_error() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        v["model_type"] = json!("gpt2");
        let e = Config::from_value(&v, Path::new("x/config.json")).unwrap_err();
        assert!(matches!(e, DecoderError::Config(_)));
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
    }
}
