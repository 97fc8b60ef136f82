//! The `--device cuda` paths of `generate` (and the helpers the CUDA benchmarks share). A
//! build without the `cuda` feature, or a machine without a driver or GPU, gets one clear
//! error line from [`open`].

use anyhow::{Result, anyhow};
use jetvlm_cuda::CudaDevice;

/// Opens CUDA device `ordinal`; the error names the flag and why no GPU is usable.
pub fn open(ordinal: usize) -> Result<CudaDevice> {
    CudaDevice::open(ordinal).map_err(|e| anyhow!("--device cuda: {e}"))
}

/// One line describing the opened device.
#[cfg(feature = "cuda")]
pub fn describe(dev: &CudaDevice) -> String {
    let i = dev.info();
    format!(
        "device {}: {} sm_{} ({}), {} SMs, {:.1} GiB, driver {}, nvrtc {}.{}",
        i.ordinal,
        i.name,
        i.sm(),
        if i.integrated {
            "integrated, unified memory"
        } else {
            "discrete"
        },
        i.multiprocessors,
        i.total_memory as f64 / (1u64 << 30) as f64,
        i.driver_version,
        i.nvrtc_version.0,
        i.nvrtc_version.1
    )
}

#[cfg(feature = "cuda")]
pub use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use anyhow::{Context, Result};
    use jetvlm_core::TokenKind;
    use jetvlm_cuda::{
        CudaDevice, DeviceInput, DeviceKvCache, DevicePolicy, DeviceSession, PoolMemory,
    };
    use jetvlm_decoder::{FinishReason, GenerateOptions, Sampler, Tokenizer};
    use jetvlm_kvcache::KvPolicy;
    use std::io::Write;
    use std::path::Path;
    use std::time::Instant;

    /// What a device generation produced.
    pub struct DeviceGeneration {
        pub token_ids: Vec<u32>,
        pub text: String,
        pub ttft_ms: f64,
        pub tpot_ms: f64,
        pub finish_reason: Option<FinishReason>,
        pub kv: String,
    }

    /// Generates on the GPU: prompt prefill, then one token per step with the host sampler;
    /// text streamed to stdout unless `quiet`.
    pub fn generate(
        dev: &CudaDevice,
        model_dir: &Path,
        prompt_ids: &[u32],
        tokenizer: Option<&Tokenizer>,
        opts: &GenerateOptions,
        kv: &str,
        quiet: bool,
    ) -> Result<DeviceGeneration> {
        let model = dev
            .load_decoder(model_dir)
            .with_context(|| format!("loading the decoder from {}", model_dir.display()))?;
        let c = &model.config().model;
        let policy: KvPolicy = kv.parse().with_context(|| format!("--kv {kv}"))?;
        let dp = DevicePolicy::new(&policy, c.num_key_value_heads, c.head_dim)?;
        let capacity = prompt_ids.len() + opts.max_tokens + 1;
        let cache = DeviceKvCache::new(
            dev,
            dp,
            c.num_hidden_layers,
            capacity,
            0,
            2,
            PoolMemory::Device,
        )?;
        let mut session = DeviceSession::new(dev, &model, cache)?;
        let mut sampler = Sampler::new(opts.sampler.clone());
        let mut detok = tokenizer.map(|t| t.incremental(opts.skip_special));
        let mut history = prompt_ids.to_vec();
        let mut ids = Vec::new();
        let mut text = String::new();
        let mut out = std::io::stdout().lock();
        let t0 = Instant::now();
        let mut logits = session.forward(&[DeviceInput::Ids {
            ids: prompt_ids,
            kind: TokenKind::Text,
        }])?;
        let mut first: Option<Instant> = None;
        let mut last = t0;
        let mut finish = None;
        while ids.len() < opts.max_tokens {
            let token = sampler.sample(&logits, &history);
            last = Instant::now();
            first.get_or_insert(last);
            history.push(token);
            ids.push(token);
            if opts.stop_tokens.contains(&token) {
                finish = Some(FinishReason::StopToken);
                break;
            }
            if let Some(d) = detok.as_mut() {
                let piece = d.push(token)?;
                let before = text.len();
                text.push_str(&piece);
                if let Some(cut) = opts
                    .stop_strings
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    text.truncate(cut);
                    if !quiet && cut > before {
                        out.write_all(&text.as_bytes()[before..])?;
                    }
                    finish = Some(FinishReason::StopString);
                    break;
                }
                if !quiet {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                }
            }
            if ids.len() < opts.max_tokens {
                logits = session.forward(&[DeviceInput::Ids {
                    ids: &[token],
                    kind: TokenKind::Text,
                }])?;
            }
        }
        if finish.is_none() {
            finish = Some(FinishReason::MaxTokens);
            if let Some(d) = detok.as_mut() {
                let rest = d.flush()?;
                if !quiet {
                    out.write_all(rest.as_bytes())?;
                }
                text.push_str(&rest);
            }
        }
        let ttft_ms = first.map_or(0.0, |f| (f - t0).as_secs_f64() * 1e3);
        let tpot_ms = match first {
            Some(f) if ids.len() > 1 => (last - f).as_secs_f64() * 1e3 / (ids.len() - 1) as f64,
            _ => 0.0,
        };
        Ok(DeviceGeneration {
            token_ids: ids,
            text,
            ttft_ms,
            tpot_ms,
            finish_reason: finish,
            kv: policy.name(),
        })
    }
}
