//! V4L2 cameras: this build has no V4L2 support, so opening one is a typed error.

use crate::error::{CameraError, Result};

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

uninhabited_source!(V4l2Source);
