//! Byte layout of one block segment (one block, one layer, one KV head) in each pool.
//!
//! FP16 segment (`t` tokens, head dim `d`): keys channel-major `[d][t]` (so a score pass
//! reads eight tokens of one channel per load), then values token-major `[t][d]`.
//!
//! Quantized segment: optional per-channel key parameters `[d]` ([`ScaleZero`]), then `t` key
//! rows, then `t` value rows. A value row is `d / group` group blocks (scale, zero, packed
//! codes: exactly the `#[repr(C)]` blocks of `jetvlm_quant`, e.g. `[BlockQ4G64; d / 64]`);
//! a per-token key row is the same; a per-channel key row is the packed codes alone.
//! Segments are padded to 64 bytes so every segment starts on a cache line.

use crate::policy::{KeyMode, KvPolicy};
use jetvlm_quant::{GroupFormat, ScaleZero, packed_len};

/// Layout of an FP16 segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp16Layout {
    pub tokens: usize,
    pub head_dim: usize,
}

impl Fp16Layout {
    pub fn seg_bytes(&self) -> usize {
        round64(2 * self.tokens * self.head_dim * 2)
    }
    /// Offset (in f16 elements) of key channel `c`, token `t`.
    #[inline]
    pub fn k_index(&self, t: usize, c: usize) -> usize {
        c * self.tokens + t
    }
    /// Offset (in f16 elements) of value token `t`, channel `c`.
    #[inline]
    pub fn v_index(&self, t: usize, c: usize) -> usize {
        self.tokens * self.head_dim + t * self.head_dim + c
    }
}

/// Layout of a quantized segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantLayout {
    pub tokens: usize,
    pub head_dim: usize,
    pub format: GroupFormat,
    pub key_mode: KeyMode,
}

impl QuantLayout {
    pub fn new(policy: &KvPolicy, head_dim: usize) -> Option<Self> {
        Self::of_layer(policy, 0, head_dim)
    }
    /// The layout of `layer`'s frame blocks (a calibrated policy gives each layer its own).
    pub fn of_layer(policy: &KvPolicy, layer: usize, head_dim: usize) -> Option<Self> {
        let f = policy.layer_format(layer);
        let format = GroupFormat::new(f.bits, f.group).ok()?;
        Some(Self {
            tokens: policy.quant_block_tokens,
            head_dim,
            format,
            key_mode: f.key_mode,
        })
    }
    pub fn bits(&self) -> u32 {
        self.format.bits()
    }
    pub fn group(&self) -> usize {
        self.format.group()
    }
    pub fn groups(&self) -> usize {
        self.head_dim / self.format.group()
    }
    /// Bytes of per-channel key parameters (0 in per-token mode).
    pub fn k_params_bytes(&self) -> usize {
        match self.key_mode {
            KeyMode::PerChannel => self.head_dim * size_of::<ScaleZero>(),
            KeyMode::PerToken => 0,
        }
    }
    pub fn k_row_bytes(&self) -> usize {
        match self.key_mode {
            KeyMode::PerChannel => packed_len(self.head_dim, self.bits()),
            KeyMode::PerToken => self.groups() * self.format.group_bytes(),
        }
    }
    pub fn v_row_bytes(&self) -> usize {
        self.groups() * self.format.group_bytes()
    }
    pub fn k_row_offset(&self, t: usize) -> usize {
        self.k_params_bytes() + t * self.k_row_bytes()
    }
    pub fn v_row_offset(&self, t: usize) -> usize {
        self.k_params_bytes() + self.tokens * self.k_row_bytes() + t * self.v_row_bytes()
    }
    pub fn seg_bytes(&self) -> usize {
        round64(self.v_row_offset(self.tokens))
    }
}

fn round64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_g64_sizes() {
        let l = QuantLayout::new(&KvPolicy::mixed(), 64).unwrap();
        // 64 per-channel params, 64 key rows of 32 bytes, 64 value rows of one 36-byte block.
        assert_eq!(l.k_params_bytes(), 256);
        assert_eq!(l.k_row_bytes(), 32);
        assert_eq!(l.v_row_bytes(), 36);
        assert_eq!(l.seg_bytes(), 256 + 64 * 32 + 64 * 36);
        let f = Fp16Layout {
            tokens: 32,
            head_dim: 64,
        };
        assert_eq!(f.seg_bytes(), 32 * 64 * 4);
        // 4.5 bits per element in both keys and values.
        let bits = l.seg_bytes() as f64 * 8.0 / (2.0 * 64.0 * 64.0);
        assert_eq!(bits, 4.5);
    }
}
