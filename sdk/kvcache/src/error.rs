//! The crate's error type.

use jetvlm_core::FrameId;

/// Errors of the KV cache. Each variant names the operation and the shape or budget at
/// fault.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum KvError {
    #[error(
        "{op}: cache full: {cached} tokens cached + {requested} requested exceeds the budget of \
         {capacity_tokens} tokens (evict a frame or raise the capacity)"
    )]
    CapacityExceeded {
        op: &'static str,
        capacity_tokens: usize,
        cached: usize,
        requested: usize,
    },
    #[error("{op}: {what} mismatch: expected {expected}, got {got}")]
    ShapeMismatch {
        op: &'static str,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("invalid cache shape {shape}: {reason}")]
    InvalidShape { shape: String, reason: String },
    /// A policy string that does not parse, or fields that do not go together.
    #[error(transparent)]
    InvalidPolicy(#[from] jetvlm_quant::PolicyError),
    #[error("{op}: layer {layer} out of range (cache has {layers} layers)")]
    LayerOutOfRange {
        op: &'static str,
        layer: usize,
        layers: usize,
    },
    #[error("{op}: {reason}")]
    BadSpan { op: &'static str, reason: String },
    #[error("{op}: the span's tokens are no longer cached (evicted, truncated or cleared)")]
    StaleSpan { op: &'static str },
    #[error("{op}: frame {frame} is not cached")]
    UnknownFrame { op: &'static str, frame: FrameId },
    #[error("append_span: frame {frame} is already cached")]
    DuplicateFrame { frame: FrameId },
    #[error("{op}: cannot drop {requested} tokens, only {cached} cached")]
    TruncateTooMany {
        op: &'static str,
        requested: usize,
        cached: usize,
    },
    #[error("{op}: non-finite value {value} at index {index}")]
    NonFinite {
        op: &'static str,
        index: usize,
        value: f32,
    },
}
