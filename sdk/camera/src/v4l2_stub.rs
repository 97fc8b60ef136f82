//! V4L2 cameras: this build has no V4L2 support, so opening one is a typed error.

use std::time::Duration;

use crate::error::{CameraError, Result};
use crate::frame::{Capture, FrameSource};

/// Stand-in for the V4L2 source when the `v4l` feature is off; it cannot be constructed.
#[derive(Debug)]
pub struct V4l2Source {
    _never: std::convert::Infallible,
}

impl V4l2Source {
    /// Always fails with [`CameraError::NotCompiledWithV4l`].
    pub fn open(
        device: &str,
        _width: Option<u32>,
        _height: Option<u32>,
        _fps: Option<f64>,
    ) -> Result<Self> {
        Err(CameraError::NotCompiledWithV4l {
            uri: format!("v4l2://{device}"),
        })
    }
}

impl FrameSource for V4l2Source {
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
