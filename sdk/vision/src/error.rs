//! The one error type of the vision crate.

use std::path::PathBuf;

/// Everything that can go wrong between a frame and its image embeddings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VisionError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error(
        "ONNX Runtime library not found (looked in: {}). Run `.ci/setup` to install the \
         project venv with onnxruntime, set `vision.ort_library` in the runtime config, or set \
         ORT_DYLIB_PATH to libonnxruntime.so",
        looked_in.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    OrtLibraryNotFound { looked_in: Vec<PathBuf> },

    /// The library exists but does not load (or is not there); the source is ONNX Runtime's
    /// error, or what is wrong with the path.
    #[error(
        "loading ONNX Runtime from {}: {source} (point ORT_DYLIB_PATH or the runtime config's vision.ort_library at a working libonnxruntime.so, or run .ci/setup to install the project's)",
        path.display()
    )]
    OrtLibraryLoad {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// An ONNX Runtime call failed; `op` names what was being done.
    #[error("ONNX Runtime: {op} ({}): {source}", model.display())]
    Ort {
        op: &'static str,
        model: PathBuf,
        /// The ONNX Runtime error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The encoder model's inputs/outputs disagree with what the manifest declares.
    #[error("encoder {}: {message}", model.display())]
    ModelMismatch { model: PathBuf, message: String },

    /// A required execution provider could not be used.
    #[error("execution provider `{requested}` required but unavailable: {reason}")]
    ProviderUnavailable { requested: String, reason: String },

    /// An unknown execution provider name in the configuration.
    #[error("unknown execution provider `{0}` (expected tensorrt, cuda or cpu)")]
    UnknownProvider(String),

    /// An input image that cannot be preprocessed.
    #[error("image {width}x{height} with {len} bytes: {message}")]
    BadImage {
        width: u32,
        height: u32,
        len: usize,
        message: String,
    },

    #[error("resizing {src_w}x{src_h} -> {dst_w}x{dst_h}: {message}")]
    Resize {
        src_w: u32,
        src_h: u32,
        dst_w: u32,
        dst_h: u32,
        message: String,
    },

    /// The encoder produced something other than `[batch, tokens, hidden]`.
    #[error("encoder {} output {shape:?}: {message}", model.display())]
    BadOutput {
        model: PathBuf,
        shape: Vec<i64>,
        message: String,
    },

    /// The model package manifest (jetvlm.yaml) is invalid; every problem found is listed.
    #[error("{}", jetvlm_core::manifest::describe(manifest, issues))]
    Package {
        manifest: PathBuf,
        issues: Vec<crate::package::Issue>,
    },

    #[error("decoding image {}: {message}", path.display())]
    Decode { path: PathBuf, message: String },

    /// An image file refused before decoding: its header declares more pixels than the
    /// [`jetvlm_core::ImageLimits`] allow.
    #[error("refusing to decode {}: {reason}", path.display())]
    ImageTooLarge { path: PathBuf, reason: String },

    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The ONNX file could not be parsed far enough to read its input/output signature.
    #[error("{}: not a readable ONNX model: {message}", path.display())]
    OnnxFormat { path: PathBuf, message: String },
}
