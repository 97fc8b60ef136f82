//! jetvlm-core: the vocabulary every jetvlm crate shares.
//!
//! - [`TokenKind`]: whether a cached token came from text or from a camera frame; the KV
//!   cache picks its precision from this tag.
//! - [`DType`], [`Device`]: storage types and where computation runs.
//! - [`hf`]: Hugging Face `config.json` schema -> validated [`hf::ModelConfig`].
//! - [`sysinfo`]: last-level cache size and measured memory read bandwidth.
//! - [`config`]: YAML (serde-saphyr) and JSON loading with errors that name the file, the
//!   line and the field.

pub mod config;
pub mod hf;
pub mod mem;
pub mod sysinfo;
mod types;

pub use config::ConfigError;
pub use types::{DType, Device, FrameId, TokenKind};
