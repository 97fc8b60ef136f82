//! The crate's error type.

use std::path::PathBuf;

/// Errors of camera sources and the synthetic dataset generator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CameraError {
    #[error("invalid source URI `{uri}`: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error(
        "unsupported source scheme `{scheme}` in `{uri}` (expected synthetic://, file://, dir://, v4l2://, rtsp://, csi:// or gst://)"
    )]
    UnsupportedScheme { uri: String, scheme: String },
    #[error(
        "`{uri}` needs V4L2 support, but jetvlm was not compiled with it (rebuild with `--features v4l`)"
    )]
    NotCompiledWithV4l { uri: String },
    #[error(
        "`{uri}` needs GStreamer, but jetvlm was not compiled with it (rebuild with `--features gstreamer`)"
    )]
    NotCompiledWithGstreamer { uri: String },
    /// A GStreamer element the source needs is not installed.
    #[error("`{uri}` needs the GStreamer element `{element}`, which is not installed ({hint})")]
    GstElementMissing {
        uri: String,
        element: String,
        hint: String,
    },
    /// The stream's codec has no decoder among the installed GStreamer plugins.
    #[error(
        "`{uri}`: no GStreamer decoder for {codec} is installed (gstreamer1.0-libav and gstreamer1.0-plugins-good/bad/ugly cover the common codecs)"
    )]
    NoDecoder { uri: String, codec: String },
    /// A GStreamer pipeline failed (build, start, or a stream error of a file source).
    #[error("`{uri}`: {op}: {reason}")]
    Gst {
        uri: String,
        op: &'static str,
        reason: String,
    },
    /// A live source lost its stream and every reconnection attempt failed.
    #[error("`{uri}`: stream lost and not restored after {attempts} attempts: {reason}")]
    SourceLost {
        uri: String,
        attempts: u32,
        reason: String,
    },
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
