//! The KV precision policy: which tokens stay FP16 and how the others are quantized.
//!
//! The type and its grammar live in [`jetvlm_quant::policy`], so that the memory planner
//! (`jetvlm-board`) reads policies with the same parser without depending on the cache.

pub use jetvlm_quant::policy::{ACCEPTED, KvPolicy, PolicyError, split_policies};
pub use jetvlm_quant::{KeyMode, LayerFormat};
