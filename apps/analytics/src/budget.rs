//! The KV memory check at start: each source keeps `window` frames, its prompt and an
//! answer in a KV cache of its own, charged with the planner's arithmetic
//! ([`jetvlm_board::plan::kv_usage`], what `jetvlm plan` charges) under the pipeline's KV
//! policy, and compared with the rules file's `kv_budget` (per source and in total).

use crate::rules::KvBudget;
use anyhow::{Context, Result};
use jetvlm_board::KvPrecision;
use jetvlm_board::plan::{KvUsage, Workload, kv_usage};
use jetvlm_core::hf::ModelConfig;

const MIB: f64 = (1u64 << 20) as f64;

/// What one source's window costs, and all of them together.
#[derive(Clone, Debug)]
pub struct KvPlan {
    pub workload: Workload,
    pub per_source: KvUsage,
    pub sources: u64,
    pub total_bytes: u64,
    pub policy: String,
}

impl KvPlan {
    /// Charges `sources` windows of `window` frames, each with `prompt_tokens` of text
    /// and `answer_tokens`, under `policy` (the pipeline's policy in effect).
    pub fn new(
        text: &ModelConfig,
        policy: &str,
        tokens_per_frame: u64,
        window: u64,
        prompt_tokens: u64,
        answer_tokens: u64,
        sources: u64,
    ) -> Result<Self> {
        let kv_policy: jetvlm_kvcache::KvPolicy = policy
            .parse()
            .with_context(|| format!("the KV policy `{policy}` (kv)"))?;
        let workload = Workload {
            frames: window,
            tokens_per_frame,
            prompt_tokens,
            answer_tokens,
        };
        let per_source = kv_usage(text, &workload, &KvPrecision::from(kv_policy))?;
        let total_bytes = per_source
            .total_bytes
            .checked_mul(sources)
            .context("the KV bytes of all sources overflow 64 bits")?;
        Ok(KvPlan {
            workload,
            per_source,
            sources,
            total_bytes,
            policy: policy.into(),
        })
    }

    /// One line: the charge per source and in total.
    pub fn describe(&self) -> String {
        format!(
            "KV {} B per source ({} frames x {} tokens + {} text tokens, {}) x {} = {:.2} MiB",
            self.per_source.total_bytes,
            self.workload.frames,
            self.workload.tokens_per_frame,
            self.per_source.text_tokens,
            self.policy,
            self.sources,
            self.total_bytes as f64 / MIB
        )
    }

    /// Refuses the run when a bound is exceeded: the error names the field and what to
    /// change.
    pub fn check(&self, budget: &KvBudget) -> Result<()> {
        let per = self.per_source.total_bytes as f64 / MIB;
        let total = self.total_bytes as f64 / MIB;
        if let Some(limit) = budget.per_source_mib
            && per > limit
        {
            anyhow::bail!(
                "kv_budget.per_source_mib: a source's window needs {per:.3} MiB of KV ({} frames x {} tokens + {} text tokens under {}), over the {limit} MiB budget: lower `window`, or choose a KV policy that quantizes frames (`kv`)",
                self.workload.frames,
                self.workload.tokens_per_frame,
                self.per_source.text_tokens,
                self.policy
            );
        }
        if let Some(limit) = budget.total_mib
            && total > limit
        {
            anyhow::bail!(
                "kv_budget.total_mib: {} sources x {per:.3} MiB of KV = {total:.3} MiB, over the {limit} MiB budget: fewer sources, a smaller `window`, or a KV policy that quantizes frames (`kv`)",
                self.sources
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_config() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
        let manifest = jetvlm_vision::package::ModelPackage::load(&dir);
        manifest.map(|p| p.decoder_config).unwrap()
    }

    #[test]
    fn the_charge_grows_with_sources_and_the_budget_refuses_with_the_field() {
        let text = demo_config();
        let one = KvPlan::new(&text, "fp16", 64, 4, 40, 8, 1).unwrap();
        let four = KvPlan::new(&text, "fp16", 64, 4, 40, 8, 4).unwrap();
        assert_eq!(four.total_bytes, 4 * one.per_source.total_bytes);
        // FP16: every token costs the same, so the window is the token count times that.
        let per_token = jetvlm_board::plan::kv_bytes_per_token(&text, jetvlm_board::KvFormat::FP16);
        assert_eq!(one.per_source.total_bytes, (4 * 64 + 48) * per_token);
        let per_mib = one.per_source.total_bytes as f64 / MIB;
        let fits = KvBudget {
            per_source_mib: Some(per_mib * 1.01),
            total_mib: Some(per_mib * 4.04),
        };
        four.check(&fits).unwrap();
        let tight = KvBudget {
            per_source_mib: None,
            total_mib: Some(per_mib * 3.9),
        };
        let e = four.check(&tight).unwrap_err().to_string();
        assert!(e.starts_with("kv_budget.total_mib: 4 sources"), "{e}");
        let small = KvBudget {
            per_source_mib: Some(per_mib * 0.9),
            total_mib: None,
        };
        let e = one.check(&small).unwrap_err().to_string();
        assert!(e.starts_with("kv_budget.per_source_mib"), "{e}");
        // Quantized frames cost less than FP16 ones.
        let mixed = KvPlan::new(&text, "mixed", 64, 4, 40, 8, 1).unwrap();
        assert!(mixed.per_source.total_bytes < one.per_source.total_bytes);
    }
}
