//! CUDA execution provider registration (feature `cuda`).

use ort::ep::ExecutionProvider;
use ort::session::builder::SessionBuilder;

pub const COMPILED: bool = true;

pub fn register(builder: &mut SessionBuilder) -> Result<(), String> {
    if !ort::ep::CUDA::is_available().map_err(|e| e.to_string())? {
        return Err("this ONNX Runtime library was built without CUDA".into());
    }
    ort::ep::CUDA::default()
        .build()
        .error_on_failure()
        .register(builder)
        .map_err(|e| e.to_string())
}
