//! The one error type of the runtime.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// Package validation, preprocessing or the vision encoder.
    #[error(transparent)]
    Vision(#[from] jetvlm_vision::VisionError),

    /// Loading or running the decoder, or its tokenizer.
    #[error("decoder: {0}")]
    Decoder(#[from] jetvlm_decoder::DecoderError),

    /// The CUDA backend (no GPU or driver, a build without `cuda`, a kernel or a transfer).
    #[error("CUDA: {0}")]
    Cuda(#[from] jetvlm_cuda::CudaError),

    /// A KV calibration file (unreadable, invalid, or measured on another model).
    #[error("KV calibration: {0}")]
    Calibration(#[from] jetvlm_calibration::CalibrationError),

    /// The KV cache (capacity, eviction, policy).
    #[error("KV cache: {0}")]
    Kv(#[from] jetvlm_kvcache::KvError),

    /// The runtime configuration file.
    #[error(transparent)]
    Config(#[from] jetvlm_core::ConfigError),

    /// The prompt could not be built (template, tokenizer, special tokens).
    #[error("prompt ({}): {message}", manifest.display())]
    Prompt { manifest: PathBuf, message: String },

    /// A frame that cannot be used (size, format).
    #[error("frame {index}: {source}")]
    Frame {
        index: u64,
        #[source]
        source: Box<jetvlm_vision::VisionError>,
    },

    /// A camera source failed.
    #[error("camera {source_name}: {source}")]
    Camera {
        source_name: String,
        #[source]
        source: Box<jetvlm_camera::CameraError>,
    },

    /// An operation the chosen KV cache cannot do.
    #[error("{op}: {message}")]
    Unsupported { op: &'static str, message: String },

    /// The context does not fit in the cache or the model's positions.
    #[error("context of {needed} tokens exceeds {limit} ({what})")]
    ContextTooLong {
        needed: usize,
        limit: usize,
        what: &'static str,
    },
}
