//! The crate's error type.

use std::path::PathBuf;

/// Errors of camera sources and the synthetic dataset generator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CameraError {
    #[error("invalid source URI `{uri}`: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error(
        "unsupported source scheme `{scheme}` in `{uri}` (expected synthetic://, file://, dir:// or v4l2://)"
    )]
    UnsupportedScheme { uri: String, scheme: String },
    #[error(
        "`{uri}` needs V4L2 support, but jetvlm was not compiled with it (rebuild with `--features v4l`)"
    )]
    NotCompiledWithV4l { uri: String },
    #[error("reading image {path}: {source}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// An image refused before decoding: its header declares more pixels than the
    /// [`jetvlm_core::ImageLimits`] allow.
    #[error("refusing to decode image {path}: {reason}")]
    ImageTooLarge { path: PathBuf, reason: String },
    /// Every image of a `dir://` source failed to decode (each was reported and skipped).
    #[error("none of the {count} images in {path} could be decoded (first failure: {first})")]
    NoReadableImage {
        path: PathBuf,
        count: usize,
        first: String,
    },
    #[error("unsupported image file {path}: expected .png, .jpg or .jpeg")]
    UnsupportedImage { path: PathBuf },
    #[error("listing directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("directory {path} holds no .png/.jpg/.jpeg images")]
    EmptyDir { path: PathBuf },
    #[error("V4L2 device {device}: {op}: {source}")]
    Device {
        device: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("V4L2 device {device}: {reason}")]
    DeviceFormat { device: String, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing image {path}: {source}")]
    WriteImage {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("invalid scene configuration: {0}")]
    InvalidScene(String),
}

/// Result alias for this crate.
pub type Result<T, E = CameraError> = std::result::Result<T, E>;
