//! [`RuntimeConfig`]: how a package is run (KV policy, generation, streaming window, ONNX
//! Runtime). Loadable from YAML; every field has a default.
//!
//! ```yaml
//! kv_policy: mixed            # overrides the package's kv.policy; `f32` = exact reference cache
//! kv_calibration: calib.yaml  # or: the policy of `jetvlm calibrate` (path relative to this file)
//! max_new_tokens: 128
//! sampling: {temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0}
//! window_frames: 4            # StreamSession: frames kept in the cache
//! capacity_tokens: 4096       # KV cache budget (default: what the context needs)
//! session_max_position: 8192  # StreamSession re-prefills its window past this RoPE position
//! device: cpu                 # or cuda: Pipeline::ask decodes on the GPU (feature `cuda`)
//! vision:
//!   ort_library: /usr/lib/aarch64-linux-gnu/libonnxruntime.so
//!   execution_providers: [tensorrt, cuda, cpu]
//!   require: false
//! ```

use crate::RuntimeError;
use jetvlm_core::Device;
use jetvlm_decoder::SamplerConfig;
use jetvlm_vision::OrtConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Sampling settings; temperature 0 is greedy (the default).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Divides positive and multiplies negative logits of tokens already seen (1: off).
    pub repetition_penalty: f32,
    /// Seed of the sampler's random numbers.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks every field against its domain (the decoder's [`SamplerConfig::validate`]):
    /// `temperature` finite and >= 0, `top_p` in (0, 1], `repetition_penalty` finite and > 0.
    /// Errors name `path` (the YAML file, or what set the sampling) and `sampling.<field>`.
    pub fn validate(&self, path: &Path) -> Result<(), RuntimeError> {
        match self.to_sampler().validate() {
            Ok(()) => Ok(()),
            Err(jetvlm_decoder::DecoderError::Sampling {
                field,
                value,
                expected,
            }) => Err(RuntimeError::Config(jetvlm_core::ConfigError::invalid(
                path,
                format!("sampling.{field}"),
                format!("{value} is out of range: {expected}"),
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The decoder's sampler settings.
    pub fn to_sampler(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// How a [`Pipeline`](crate::Pipeline) runs: KV policy, generation, session window, device,
/// ONNX Runtime. Loadable from YAML ([`RuntimeConfig::from_yaml`]); every field has a default.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// KV policy (`fp16`, `mixed`, `int4-all`, `mixed:bits=4,group=64,...`, or `f32` for the
    /// exact reference cache); `None` uses the package's `kv.policy`.
    pub kv_policy: Option<String>,
    /// A calibration file written by `jetvlm calibrate`: its policy (a frame format per
    /// layer) is used, after checking that it was measured on this model's shape. Relative
    /// paths in a YAML config are relative to the config file. Not together with `kv_policy`.
    pub kv_calibration: Option<PathBuf>,
    /// Most tokens generated per answer.
    pub max_new_tokens: usize,
    /// How the next token is picked.
    pub sampling: Sampling,
    /// Frames a [`StreamSession`](crate::StreamSession) keeps cached (oldest evicted first).
    pub window_frames: usize,
    /// KV cache budget in tokens; `None` sizes it for the context (frames, prompt, answer).
    pub capacity_tokens: Option<usize>,
    /// Highest RoPE position a [`StreamSession`](crate::StreamSession) lets its frames and
    /// questions reach; past it the session re-prefills its prefix and kept frames (from their
    /// stored embeddings) at fresh positions. `None` uses the model's
    /// `max_position_embeddings`.
    pub session_max_position: Option<usize>,
    /// ONNX Runtime library and execution providers for the vision encoder.
    pub vision: OrtConfig,
    /// Where the decoder and its KV cache run: `cpu`, or `cuda` (one-shot questions decode
    /// on the GPU's mixed KV pools; needs a build with the `cuda` feature).
    pub device: Device,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            kv_policy: None,
            kv_calibration: None,
            max_new_tokens: 128,
            sampling: Sampling::default(),
            window_frames: 4,
            capacity_tokens: None,
            session_max_position: None,
            vision: OrtConfig::default(),
            device: Device::Cpu,
        }
    }
}

impl RuntimeConfig {
    /// Largest `max_new_tokens` accepted (16M tokens, past any model's context): the KV
    /// capacity adds it to the prompt and the window's frames, which must not overflow.
    pub const MAX_NEW_TOKENS: usize = 1 << 24;
    /// Largest `window_frames` accepted (it is multiplied by the tokens per frame).
    pub const MAX_WINDOW_FRAMES: usize = 1 << 16;
    /// Largest `capacity_tokens` and `session_max_position` accepted (positions are 32-bit).
    pub const MAX_TOKENS: usize = u32::MAX as usize;

    /// Reads a YAML runtime config (errors name the file, line and field).
    pub fn from_yaml(path: &Path) -> Result<Self, RuntimeError> {
        let mut cfg: RuntimeConfig = jetvlm_core::config::load_yaml(path)?;
        cfg.validate(path)?;
        if let (Some(c), Some(dir)) = (&mut cfg.kv_calibration, path.parent())
            && c.is_relative()
        {
            *c = dir.join(&*c);
        }
        Ok(cfg)
    }

    /// Checks every field against its domain; errors name `path` (the YAML file, or
    /// `<runtime config>` for a config built in code) and the field.
    pub fn validate(&self, path: &Path) -> Result<(), RuntimeError> {
        let bad = |field: &str, msg: &str| {
            Err(RuntimeError::Config(jetvlm_core::ConfigError::invalid(
                path, field, msg,
            )))
        };
        if self.window_frames == 0 {
            return bad("window_frames", "must be at least 1");
        }
        if self.kv_policy.is_some() && self.kv_calibration.is_some() {
            return bad(
                "kv_calibration",
                "set kv_policy or kv_calibration, not both (the calibration file holds a policy)",
            );
        }
        // The flag `--kv` sets this field: its errors name the field, not the package.
        if let Some(p) = &self.kv_policy
            && let Err(e) = crate::cache::KvChoice::parse(p)
        {
            return bad("kv_policy", &e.to_string());
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1");
        }
        if self.max_new_tokens > Self::MAX_NEW_TOKENS {
            return bad(
                "max_new_tokens",
                &format!(
                    "{} is more than the {} this runtime accepts",
                    self.max_new_tokens,
                    Self::MAX_NEW_TOKENS
                ),
            );
        }
        if self.window_frames > Self::MAX_WINDOW_FRAMES {
            return bad(
                "window_frames",
                &format!(
                    "{} is more than the {} this runtime accepts",
                    self.window_frames,
                    Self::MAX_WINDOW_FRAMES
                ),
            );
        }
        for (field, v) in [
            ("capacity_tokens", self.capacity_tokens),
            ("session_max_position", self.session_max_position),
        ] {
            if let Some(v) = v.filter(|v| *v > Self::MAX_TOKENS) {
                return bad(
                    field,
                    &format!(
                        "{v} is more than the {} positions a cache holds",
                        Self::MAX_TOKENS
                    ),
                );
            }
        }
        self.sampling.validate(path)?;
        if self.capacity_tokens == Some(0) {
            return bad("capacity_tokens", "must be positive");
        }
        if self.session_max_position == Some(0) {
            return bad("session_max_position", "must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetvlm_vision::ExecutionProvider;

    #[test]
    fn sizes_whose_capacity_arithmetic_would_overflow_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rt.yaml");
        for (yaml, field) in [
            ("max_new_tokens: 18446744073709551615\n", "max_new_tokens"),
            ("window_frames: 18446744073709551615\n", "window_frames"),
            ("capacity_tokens: 18446744073709551615\n", "capacity_tokens"),
            ("session_max_position: 4294967296\n", "session_max_position"),
        ] {
            std::fs::write(&p, yaml).unwrap();
            let err = RuntimeConfig::from_yaml(&p).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("rt.yaml"),
                "{yaml}: {err}"
            );
        }
        std::fs::write(&p, "max_new_tokens: 16777216\nwindow_frames: 65536\n").unwrap();
        RuntimeConfig::from_yaml(&p).unwrap();
    }

    #[test]
    fn sampling_outside_its_domain_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rt.yaml");
        for (yaml, field) in [
            ("sampling:\n  temperature: .nan\n", "sampling.temperature"),
            ("sampling:\n  temperature: -1.0\n", "sampling.temperature"),
            ("sampling:\n  temperature: .inf\n", "sampling.temperature"),
            ("sampling:\n  top_p: .nan\n", "sampling.top_p"),
            (
                "sampling:\n  repetition_penalty: 0.0\n",
                "sampling.repetition_penalty",
            ),
        ] {
            std::fs::write(&p, yaml).unwrap();
            let err = RuntimeConfig::from_yaml(&p).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("rt.yaml"),
                "{yaml}: {err}"
            );
        }
        std::fs::write(&p, "sampling:\n  temperature: 0.7\n  top_p: 0.9\n").unwrap();
        RuntimeConfig::from_yaml(&p).unwrap();
    }

    #[test]
    fn yaml_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rt.yaml");
        std::fs::write(
            &p,
            "kv_policy: fp16\nmax_new_tokens: 5\nwindow_frames: 2\nvision:\n  execution_providers: [tensorrt, cpu]\n  require: true\n",
        )
        .unwrap();
        let cfg = RuntimeConfig::from_yaml(&p).unwrap();
        assert_eq!(cfg.kv_policy.as_deref(), Some("fp16"));
        assert_eq!(cfg.max_new_tokens, 5);
        assert_eq!(
            cfg.vision.execution_providers,
            vec![ExecutionProvider::TensorRt, ExecutionProvider::Cpu]
        );
        assert!(cfg.vision.require);
        assert_eq!(cfg.sampling, Sampling::default());
        assert_eq!(cfg.device, Device::Cpu);

        std::fs::write(&p, "device: cuda\n").unwrap();
        assert_eq!(RuntimeConfig::from_yaml(&p).unwrap().device, Device::Cuda);
        std::fs::write(&p, "device: tpu\n").unwrap();
        let err = RuntimeConfig::from_yaml(&p).unwrap_err().to_string();
        assert!(err.contains("rt.yaml") && err.contains("device"), "{err}");

        std::fs::write(&p, "window_frames: 0\n").unwrap();
        let err = RuntimeConfig::from_yaml(&p).unwrap_err().to_string();
        assert!(
            err.contains("window_frames") && err.contains("rt.yaml"),
            "{err}"
        );
        std::fs::write(&p, "vision:\n  execution_providers: [tpu]\n").unwrap();
        let err = RuntimeConfig::from_yaml(&p).unwrap_err().to_string();
        assert!(err.contains("rt.yaml"), "{err}");

        // A calibration file is found next to the config; not together with kv_policy.
        std::fs::write(&p, "kv_calibration: calib.yaml\n").unwrap();
        let cfg = RuntimeConfig::from_yaml(&p).unwrap();
        assert_eq!(cfg.kv_calibration, Some(dir.path().join("calib.yaml")));
        std::fs::write(&p, "kv_calibration: /abs/calib.yaml\n").unwrap();
        let cfg = RuntimeConfig::from_yaml(&p).unwrap();
        assert_eq!(cfg.kv_calibration, Some(PathBuf::from("/abs/calib.yaml")));
        std::fs::write(&p, "kv_policy: mixed\nkv_calibration: c.yaml\n").unwrap();
        let err = RuntimeConfig::from_yaml(&p).unwrap_err().to_string();
        assert!(
            err.contains("kv_calibration") && err.contains("not both"),
            "{err}"
        );
    }
}
