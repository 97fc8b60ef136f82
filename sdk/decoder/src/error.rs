//! The decoder's error type: every variant names the operation and the file, tensor or shape
//! at fault.

use std::path::PathBuf;

/// Errors of `jetvlm-decoder`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecoderError {
    /// `config.json` is missing, does not parse, or describes something unsupported.
    #[error("model config: {0}")]
    Config(#[from] jetvlm_core::ConfigError),

    /// The config parses but the decoder cannot run it (activation, MLP bias, ...).
    #[error("{path}: field `{field}`: {msg}")]
    Unsupported {
        path: PathBuf,
        field: String,
        msg: String,
    },

    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// No weights in the model directory.
    #[error(
        "no weights in {dir}: expected model.safetensors, model.safetensors.index.json or *.safetensors"
    )]
    NoWeights { dir: PathBuf },

    /// `model.safetensors.index.json` does not parse or names a missing shard.
    #[error("weight index {path}: {msg}")]
    Index { path: PathBuf, msg: String },

    /// A safetensors file is truncated or its header is malformed.
    #[error("safetensors file {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    /// A tensor the architecture needs is absent from every weight file.
    #[error("tensor `{name}` missing from the weights in {dir}")]
    MissingTensor { name: String, dir: PathBuf },

    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {path}: shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// `config.json` declares a dtype the weights are not stored in.
    #[error(
        "{config}: field `{field}` declares {declared}, but the weights store tensor `{tensor}` as {actual}; fix the config's dtype or convert the weights"
    )]
    DTypeMismatch {
        config: PathBuf,
        field: String,
        declared: jetvlm_core::DType,
        tensor: String,
        actual: jetvlm_core::DType,
    },

    /// A tensor has a dtype the decoder does not read.
    #[error("tensor `{name}` in {path}: dtype {dtype} not supported (F32, F16, BF16)")]
    DType {
        name: String,
        path: PathBuf,
        dtype: String,
    },

    /// A quantized matrix's codes, scales or zeros are inconsistent (dtype, shape, group).
    #[error("quantized tensor `{name}` in {path}: {msg}")]
    Quantized {
        name: String,
        path: PathBuf,
        msg: String,
    },

    /// `tokenizer.json` (or another tokenizer file) does not parse.
    #[error("tokenizer {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Encoding or decoding text failed.
    #[error("tokenizer {op}: {source}")]
    Tokenize {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The chat template does not compile or fails to render.
    #[error("chat template from {path}: {msg}")]
    ChatTemplate { path: PathBuf, msg: String },

    /// A sampling parameter outside its domain (NaN, infinite, negative temperature or
    /// penalty, `top_p` outside (0, 1]); names the field and the accepted range.
    #[error("sampling parameter `{field}` = {value}: {expected}")]
    Sampling {
        field: &'static str,
        value: f32,
        expected: &'static str,
    },

    /// A forward input is malformed (token id out of range, embedding length, ...).
    #[error("forward input: {0}")]
    Input(String),

    /// A weight of the checkpoint is NaN or infinite (a damaged or badly converted file).
    #[error(
        "tensor `{name}` in {path}: element {index} is {value}; the checkpoint is damaged or was converted with an overflow (re-download or re-export it)"
    )]
    NonFiniteWeight {
        name: String,
        path: PathBuf,
        index: usize,
        value: f32,
    },

    /// The forward pass produced NaN or infinite values although every weight is finite.
    #[error(
        "{what} are not finite (NaN or infinite) although every weight is: an activation overflowed"
    )]
    NonFiniteOutput { what: &'static str },

    /// The KV cache refused an operation.
    #[error("KV cache: {0}")]
    Kv(#[from] jetvlm_kvcache::KvError),

    /// The reference f32 cache refused an operation.
    #[error("f32 KV cache: {0}")]
    RefCache(String),
}

/// Result alias of the decoder crate.
pub type Result<T, E = DecoderError> = std::result::Result<T, E>;
