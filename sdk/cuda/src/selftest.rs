//! Results of the kernel selftest and of the NVRTC compile check, and the inputs of the
//! decoder check's agreement measure (host code, so the CPU can be held to it too).

use jetvlm_kvcache::{KeyMode, KvPolicy, LayerFormat};

/// Minimum teacher-forced agreement of the GPU with a quantized-frame policy against the CPU
/// FP16 answer on the decoder check's frame-heavy prompt; the CPU with the same policies
/// reaches it on every decoder fixture (`tests/tests/decoder_kv.rs`).
pub const MIXED_AGREEMENT: f64 = 0.90;

/// The frame-heavy prompt of the agreement measure for a fixture prompt of `prompt_len`
/// tokens: the first `split` prompt tokens, two 64-token frames (the model's embeddings of
/// these token ids), then the rest of the prompt. Returns `(split, frame ids)`.
pub fn agreement_frames(prompt_len: usize, vocab: u32) -> (usize, Vec<Vec<u32>>) {
    let frames = (0..2u32)
        .map(|f| (0..64u32).map(|i| (f * 97 + i * 31 + 5) % vocab).collect())
        .collect();
    (prompt_len.min(4), frames)
}

/// A calibrated-style policy for `layers` layers: frame formats cycling INT4 per-channel
/// g64, INT8 per-token g64 and INT4 per-token g32.
pub fn per_layer_check_policy(layers: usize) -> KvPolicy {
    let cycle = [
        (4, KeyMode::PerChannel, 64),
        (8, KeyMode::PerToken, 64),
        (4, KeyMode::PerToken, 32),
    ];
    KvPolicy {
        layers: (0..layers)
            .map(|l| {
                let (bits, key_mode, group) = cycle[l % cycle.len()];
                LayerFormat {
                    bits,
                    key_mode,
                    group,
                }
            })
            .collect(),
        ..KvPolicy::mixed()
    }
}

/// One kernel compared with its CPU twin on one input case.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCheck {
    pub kernel: &'static str,
    /// Input description, e.g. `outliers 4-bit per-channel keys`.
    pub case: String,
    /// Normalised error (max |gpu - cpu| / max |cpu|), or the mismatch fraction for codes.
    pub error: f64,
    pub tolerance: f64,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }

    /// `PASS kernel (case) error 1.2e-7 <= 1e-5`.
    pub fn line(&self) -> String {
        format!(
            "{} {:<26} {:<40} error {:.3e} {} {:.0e}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.kernel,
            self.case,
            self.error,
            if self.passed() { "<=" } else { ">" },
            self.tolerance
        )
    }
}

/// One kernel source compiled by NVRTC for one SM.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledKernel {
    pub file: &'static str,
    pub sm: u32,
    pub cubin_bytes: usize,
    pub millis: f64,
}
