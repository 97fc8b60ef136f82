//! TensorRT execution provider registration (feature `tensorrt`).

use super::TensorRtSettings;
use ort::ep::ExecutionProvider;
use ort::session::builder::SessionBuilder;

pub const COMPILED: bool = true;

pub fn register(builder: &mut SessionBuilder, s: &TensorRtSettings) -> Result<(), String> {
    if !ort::ep::TensorRT::is_available().map_err(|e| e.to_string())? {
        return Err("this ONNX Runtime library was built without TensorRT".into());
    }
    let mut ep = ort::ep::TensorRT::default()
        .with_fp16(s.fp16)
        .with_int8(s.int8)
        .with_max_workspace_size(s.workspace_mb * 1024 * 1024);
    if let Some(dir) = &s.engine_cache {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating engine cache {}: {e}", dir.display()))?;
        ep = ep
            .with_engine_cache(true)
            .with_engine_cache_path(dir.display())
            .with_timing_cache(true)
            .with_timing_cache_path(dir.display());
    }
    ep.build()
        .error_on_failure()
        .register(builder)
        .map_err(|e| e.to_string())
}
