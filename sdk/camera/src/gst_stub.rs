//! GStreamer sources: this build has no GStreamer support, so opening one is a typed error.

use std::time::Duration;

use crate::error::{CameraError, Result};
use crate::frame::{Capture, FrameSource};
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

impl FrameSource for GstSource {
    fn capture(&mut self, _timeout: Duration) -> Result<Capture> {
        match self._never {}
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        match self._never {}
    }

    fn fps(&self) -> Option<f64> {
        match self._never {}
    }

    fn describe(&self) -> String {
        match self._never {}
    }
}
