//! CUDA execution provider stand-in when the `cuda` feature is off.

use ort::session::builder::SessionBuilder;

pub const COMPILED: bool = false;

pub fn register(_: &mut SessionBuilder) -> Result<(), String> {
    Err("not compiled in (build with `--features cuda`)".into())
}
