//! Device KV pool layout, shared by the CUDA kernels (`kernels/kv_quant.cu`,
//! `kernels/attention.cu`) and their CPU reference twins.
//!
//! Per layer, with `D` = head_dim, `H` = kv heads, `T` = tokens per block, `b` = bits, `g` = group:
//!
//! | pool | element | shape |
//! |---|---|---|
//! | text K, V | f16 | `[block][T][H][D]` |
//! | frame K, V codes | u8 | `[block][T][H][D*b/8]`, each head row packed as `jetvlm_quant::format::pack_codes` packs it (chunks of 32 codes) |
//! | frame V params, K params (per-token keys) | (scale, zero) f16 pairs | `[block][T][H][D/g]` |
//! | frame K params (per-channel keys) | (scale, zero) f16 pairs | `[block][H][D]` over the block's tokens |
//!
//! Parameters and codes are `jetvlm_quant`'s (`row_params`, `code_of`): zero = min rounded
//! down to FP16, scale raised until max is within half a step, `x ~= zero + scale * code`.
//! The device pools keep parameters and codes in separate arrays (coalesced loads); the CPU
//! pools of `jetvlm_kvcache` interleave them as `#[repr(C)]` group blocks, so moving a block
//! between the two is a re-arrangement, not a re-quantization.

use crate::error::CudaError;

/// Precision of the frame pool and the key quantization mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block (text and frame blocks alike).
    pub block_tokens: usize,
    /// Frame code width: 2, 4 or 8.
    pub bits: u32,
    /// Group size along head_dim for per-token parameters: 32, 64 or 128 (divides head_dim).
    pub group: usize,
    /// Keys of frame blocks quantized per channel over the block (KIVI) instead of per token.
    pub key_per_channel: bool,
}

/// Largest head_dim the attention kernel handles (32 lanes x 8 elements).
pub const MAX_HEAD_DIM: usize = 256;

impl KvLayout {
    /// Checks the combination the kernels support; the error names the offending field.
    pub fn validate(&self) -> Result<(), CudaError> {
        let bad = |message: String| {
            Err(CudaError::Shape {
                op: "kv layout",
                message,
            })
        };
        if self.kv_heads == 0 || self.block_tokens == 0 {
            return bad(format!(
                "kv_heads {} and block_tokens {} must be positive",
                self.kv_heads, self.block_tokens
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(32) || self.head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {} must be a multiple of 32 and at most {MAX_HEAD_DIM}",
                self.head_dim
            ));
        }
        if !matches!(self.bits, 2 | 4 | 8) {
            return bad(format!("bits {} must be 2, 4 or 8", self.bits));
        }
        if !matches!(self.group, 32 | 64 | 128) || !self.head_dim.is_multiple_of(self.group) {
            return bad(format!(
                "group {} must be 32, 64 or 128 and divide head_dim {}",
                self.group, self.head_dim
            ));
        }
        Ok(())
    }

    /// Elements of one token row of one layer (all kv heads).
    pub fn row_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Code bytes of one head of one token.
    pub fn code_row_bytes(&self) -> usize {
        self.head_dim * self.bits as usize / 8
    }
    /// f16 elements of one text block (K or V).
    pub fn text_block_elems(&self) -> usize {
        self.block_tokens * self.row_elems()
    }
    /// Code bytes of one frame block (K or V).
    pub fn frame_block_code_bytes(&self) -> usize {
        self.block_tokens * self.kv_heads * self.code_row_bytes()
    }
    /// Per-token groups of one head.
    pub fn groups(&self) -> usize {
        self.head_dim / self.group
    }
    /// (scale, zero) pairs of V parameters of one frame block.
    pub fn v_params_per_block(&self) -> usize {
        self.block_tokens * self.kv_heads * self.groups()
    }
    /// (scale, zero) pairs of K parameters of one frame block.
    pub fn k_params_per_block(&self) -> usize {
        if self.key_per_channel {
            self.kv_heads * self.head_dim
        } else {
            self.v_params_per_block()
        }
    }
    /// Bytes one frame block occupies (codes and parameters of K and V).
    pub fn frame_block_bytes(&self) -> usize {
        2 * self.frame_block_code_bytes()
            + 4 * (self.k_params_per_block() + self.v_params_per_block())
    }
    /// Bytes one text block occupies (K and V).
    pub fn text_block_bytes(&self) -> usize {
        2 * 2 * self.text_block_elems()
    }
}

/// Kind of a cached block in an attention context list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Text,
    Frame,
}

/// One cached block of a sequence: `len` valid tokens from the block's first slot; `order` is
/// the append-order index of its first token (a query with order `qo` sees keys with order <= qo).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    pub kind: BlockKind,
    pub block: u32,
    pub len: u32,
    pub order: i32,
}

impl BlockEntry {
    /// The `int4 {kind, block, len, order}` the attention kernel reads.
    pub fn to_int4(&self) -> [i32; 4] {
        [
            matches!(self.kind, BlockKind::Frame) as i32,
            self.block as i32,
            self.len as i32,
            self.order,
        ]
    }
}

/// Query order for decode: the query sees every cached key.
pub const SEES_ALL: i32 = i32::MAX;

/// Checks an attention context against the pools' block counts.
pub fn validate_entries(
    layout: &KvLayout,
    entries: &[BlockEntry],
    text_blocks: usize,
    frame_blocks: usize,
) -> Result<(), CudaError> {
    for (i, e) in entries.iter().enumerate() {
        let pool = match e.kind {
            BlockKind::Text => text_blocks,
            BlockKind::Frame => frame_blocks,
        };
        if e.block as usize >= pool || e.len as usize > layout.block_tokens || e.len == 0 {
            return Err(CudaError::Shape {
                op: "attention context",
                message: format!(
                    "entry {i}: {:?} block {} with {} tokens (pool has {pool} blocks of {} tokens)",
                    e.kind, e.block, e.len, layout.block_tokens
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bits: u32, group: usize, per_channel: bool) -> KvLayout {
        KvLayout {
            kv_heads: 2,
            head_dim: 64,
            block_tokens: 16,
            bits,
            group,
            key_per_channel: per_channel,
        }
    }

    #[test]
    fn sizes_follow_the_format() {
        let l = layout(4, 64, false);
        l.validate().unwrap();
        // INT4 g64: 4 bits per element + one (f16, f16) pair per 64 elements = 4.5 bits.
        let bits_per_elem = (l.frame_block_bytes() * 8) as f64 / (2 * l.text_block_elems()) as f64;
        assert!((bits_per_elem - 4.5).abs() < 1e-9, "{bits_per_elem}");
        assert_eq!(l.text_block_bytes(), 2 * 2 * 16 * 2 * 64);
        let c = layout(4, 64, true);
        assert_eq!(c.k_params_per_block(), 2 * 64);
        assert_eq!(layout(2, 32, false).code_row_bytes(), 16);
    }

    #[test]
    fn rejects_unsupported_layouts() {
        assert!(layout(3, 64, false).validate().is_err());
        assert!(layout(4, 48, false).validate().is_err());
        let mut l = layout(4, 64, false);
        l.head_dim = 320;
        assert!(l.validate().is_err());
        l.head_dim = 96;
        l.group = 64;
        assert!(l.validate().is_err());
    }

    #[test]
    fn entries_are_checked_against_pools() {
        let l = layout(4, 64, false);
        let e = BlockEntry {
            kind: BlockKind::Frame,
            block: 3,
            len: 16,
            order: 0,
        };
        assert!(validate_entries(&l, &[e], 10, 4).is_ok());
        assert!(validate_entries(&l, &[e], 10, 3).is_err());
        let long = BlockEntry { len: 17, ..e };
        assert!(validate_entries(&l, &[long], 10, 4).is_err());
        assert_eq!(e.to_int4(), [1, 3, 16, 0]);
    }
}
