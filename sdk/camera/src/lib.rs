//! jetvlm-camera: where frames come from.
//!
//! - [`FrameSource`]: the capture interface; end of stream and timeout are [`Capture`]
//!   statuses, errors are real failures only.
//! - [`open`]: a source from a URI (`synthetic://scene?fps=10&seed=7`, `file://img.png`,
//!   `dir://frames/`, `v4l2:///dev/video0`, `rtsp://cam/stream`, `file://clip.mp4`, `csi://0`,
//!   `gst://... ! appsink`), parsed by [`SourceUri`]; [`open_with_limits`] decodes image
//!   files under given [`jetvlm_core::ImageLimits`].
//! - [`scene`]: the deterministic synthetic camera scene (objects that move, enter and leave)
//!   with its per-frame ground truth; [`synthetic::SyntheticSource`] streams it.
//! - [`qa`]: video-analytics questions and answers generated from scene ground truth (the
//!   dataset the bundled demo model is trained and evaluated on).
//! - [`still`]: image files and directories of images; [`v4l2`]: V4L2 cameras (feature `v4l`);
//!   [`gst`]: RTSP, video files, CSI sensors and pipelines through GStreamer (feature
//!   `gstreamer`).

/// The [`FrameSource`] impl of a source type this build leaves out (its feature is off): the
/// type holds an `Infallible`, so no value exists and every method is unreachable. (A build
/// with both features has no stub to use it.)
#[cfg(not(all(feature = "gstreamer", feature = "v4l")))]
macro_rules! uninhabited_source {
    ($source:ty) => {
        impl $crate::frame::FrameSource for $source {
            fn capture(
                &mut self,
                _timeout: std::time::Duration,
            ) -> $crate::error::Result<$crate::frame::Capture> {
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
    };
}

pub mod error;
pub mod frame;
#[cfg(feature = "gstreamer")]
#[path = "gst.rs"]
pub mod gst;
#[cfg(not(feature = "gstreamer"))]
#[path = "gst_stub.rs"]
pub mod gst;
pub mod pixel;
pub mod qa;
pub mod rng;
pub mod scene;
pub mod still;
pub mod synthetic;
pub mod tap;
pub mod uri;
#[cfg(feature = "v4l")]
#[path = "v4l2.rs"]
pub mod v4l2;
#[cfg(not(feature = "v4l"))]
#[path = "v4l2_stub.rs"]
pub mod v4l2;

pub use error::CameraError;
pub use frame::{Capture, Frame, FrameSource, SourceEvent};
pub use tap::EventTap;
pub use uri::{SourceUri, open, open_with_limits};
