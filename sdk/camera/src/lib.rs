//! jetvlm-camera: where frames come from.
//!
//! - [`FrameSource`]: the capture interface; end of stream and timeout are [`Capture`]
//!   statuses, errors are real failures only.
//! - [`open`]: a source from a URI (`synthetic://scene?fps=10&seed=7`, `file://img.png`,
//!   `dir://frames/`, `v4l2:///dev/video0`), parsed by [`SourceUri`].
//! - [`scene`]: the deterministic synthetic camera scene (objects that move, enter and leave)
//!   with its per-frame ground truth; [`synthetic::SyntheticSource`] streams it.
//! - [`qa`]: video-analytics questions and answers generated from scene ground truth (the
//!   dataset the bundled demo model is trained and evaluated on).
//! - [`still`]: image files and directories of images; [`v4l2`]: V4L2 cameras (feature `v4l`).

pub mod error;
pub mod frame;
pub mod pixel;
pub mod qa;
pub mod rng;
pub mod scene;
pub mod still;
pub mod synthetic;
pub mod uri;
#[cfg(feature = "v4l")]
#[path = "v4l2.rs"]
pub mod v4l2;
#[cfg(not(feature = "v4l"))]
#[path = "v4l2_stub.rs"]
pub mod v4l2;

pub use error::CameraError;
pub use frame::{Capture, Frame, FrameSource, SourceEvent};
pub use uri::{SourceUri, open};
