//! The one error type of the runtime.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime. Errors of the crates it drives (vision,
/// decoder, CUDA, KV cache, calibration, configuration, camera) are kept whole, as the
/// variant's value or its [`source`](std::error::Error::source).
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
    Prompt {
        /// The package manifest (`jetvlm.yaml`) whose prompt section is at fault.
        manifest: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A frame that cannot be used (size, format).
    #[error("frame {index}: {source}")]
    Frame {
        /// The frame's index in its stream.
        index: u64,
        /// Why the frame cannot be used.
        #[source]
        source: Box<jetvlm_vision::VisionError>,
    },

    /// A camera source failed.
    #[error("camera {source_name}: {source}")]
    Camera {
        /// The source as it describes itself (its URI).
        source_name: String,
        /// The camera's error.
        #[source]
        source: Box<jetvlm_camera::CameraError>,
    },

    /// An operation the chosen KV cache cannot do.
    #[error("{op}: {message}")]
    Unsupported {
        /// The operation asked for (`evicting a frame`, `streaming session`, ...).
        op: &'static str,
        /// Why the cache cannot do it.
        message: String,
    },

    /// The context does not fit in the cache or the model's positions.
    #[error("context of {needed} tokens exceeds {limit} ({what})")]
    ContextTooLong {
        /// Tokens (or positions) the context needs.
        needed: usize,
        /// What is available.
        limit: usize,
        /// Which limit (e.g. `capacity_tokens of the runtime config`).
        what: &'static str,
    },
}
