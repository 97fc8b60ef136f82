//! jetvlm-quant: the block formats of the quantized KV cache.
//!
//! Asymmetric integer quantization with an FP16 scale and zero per group:
//! `x ~= zero + scale * code`, `code` in `0..2^bits`, for 8, 4 and 2 bits.
//!
//! - [`format`](mod@format): [`GroupFormat`] (bits x group size), the packing of codes into
//!   bytes, and the `#[repr(C)]` group blocks ([`BlockQ4G64`] and friends) with compile-time
//!   size assertions.
//! - [`layer`]: one layer's frame format as users spell it (`4c64`).
//! - [`policy`]: [`KvPolicy`], the KV precision policy, and its one grammar (`fp16`,
//!   `mixed`, `mixed:bits=4,group=32,...`), shared by the KV cache, the planner and the CLI.
//! - [`weight`]: weight-only INT8 (symmetric) and INT4 (asymmetric) formats of linear layers,
//!   with their reference quantize / dequantize ([`WeightFormat`]).
//! - [`gguf`]: a GGUF reader with bounds checks, and Q8_0 / Q4_0 blocks converted to the
//!   weight formats (losslessly).
//! - [`qconfig`]: [`QuantizationConfig`], a quantized decoder's format description (the
//!   `quantization_config` of its config.json: one layer format and per-matrix overrides).
//! - [`packed`]: the AWQ (GEMM) and GPTQ 4-bit layouts converted to INT4 weight rows.
//! - [`reference`](mod@reference): the plain, obviously-correct quantize / dequantize every
//!   fast kernel is compared with, and the error bound each element must meet.
//!
//! Packing (SIMD friendly): codes are packed in chunks of 32. For 4 bits, byte `i` (0..16)
//! of a chunk holds code `i` in its low nibble and code `i + 16` in its high nibble; for 2
//! bits, byte `i` (0..8) holds codes `i`, `i + 8`, `i + 16`, `i + 24` in bits 0-1, 2-3, 4-5,
//! 6-7; 8-bit codes are one per byte. A 16-byte load of 4-bit codes therefore widens to 32
//! codes in order with one mask and one shift.

pub mod format;
pub mod gguf;
pub mod layer;
pub mod packed;
pub mod policy;
pub mod qconfig;
pub mod reference;
pub mod weight;

pub use format::{
    BlockQ2G32, BlockQ2G64, BlockQ2G128, BlockQ4G32, BlockQ4G64, BlockQ4G128, BlockQ8G32,
    BlockQ8G64, BlockQ8G128, GROUPS, GroupBlock, GroupFormat, PACK_CHUNK, ScaleZero, check_bits,
    fit_group, max_code, pack_codes, packed_len, unpack_code, unpack_codes,
};
pub use layer::{KeyMode, LayerFormat};
pub use policy::{KvPolicy, PolicyError, split_policies};
pub use qconfig::{Layers, MatrixOverride, MatrixRole, QuantizationConfig};
pub use reference::{
    code_of, dequantize_groups, dequantize_row, element_error_bound, quantize_groups, quantize_row,
    row_params,
};
pub use weight::{Q4Params, QuantRow, WeightCodes, WeightFormat};

/// Errors of the quantization formats.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum QuantError {
    #[error("unsupported bit width {bits} (expected 2, 4 or 8)")]
    UnsupportedBits { bits: u32 },
    #[error("unsupported weight bit width {bits} (expected 4 or 8)")]
    UnsupportedWeightBits { bits: u32 },
    #[error("unsupported group size {group} (expected 32, 64 or 128)")]
    UnsupportedGroup { group: usize },
    #[error("{op}: length {len} is not a multiple of the {what} {multiple}")]
    NotMultiple {
        op: &'static str,
        len: usize,
        what: &'static str,
        multiple: usize,
    },
    #[error("{op}: buffer of {got} bytes, expected {expected}")]
    BufferSize {
        op: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{op}: {msg}")]
    Packed { op: &'static str, msg: String },
    #[error("quantization_config.{field}: {msg}")]
    Config { field: String, msg: String },
    #[error("{op}: non-finite input value {value} at index {index}")]
    NonFinite {
        op: &'static str,
        index: usize,
        value: f32,
    },
}
