//! TensorRT execution provider stand-in when the `tensorrt` feature is off.

use super::TensorRtSettings;
use ort::session::builder::SessionBuilder;

pub const COMPILED: bool = false;

pub fn register(_: &mut SessionBuilder, _: &TensorRtSettings) -> Result<(), String> {
    Err("not compiled in (build with `--features tensorrt`)".into())
}
