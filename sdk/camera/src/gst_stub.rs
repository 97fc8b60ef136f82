//! GStreamer sources: this build has no GStreamer support, so opening one is a typed error.

use crate::error::{CameraError, Result};
use crate::uri::GstOptions;

/// Stand-in for the GStreamer source when the `gstreamer` feature is off; it cannot be
/// constructed.
#[derive(Debug)]
pub struct GstSource {
    _never: std::convert::Infallible,
}

impl GstSource {
    /// Always fails with [`CameraError::NotCompiledWithGstreamer`] naming `uri`.
    pub fn open(uri: &str, _opts: GstOptions) -> Result<Self> {
        Err(CameraError::NotCompiledWithGstreamer {
            uri: uri.to_string(),
        })
    }
}

uninhabited_source!(GstSource);
