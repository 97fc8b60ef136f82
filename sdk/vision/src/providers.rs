//! Execution providers in priority order (TensorRT > CUDA > CPU), registration with
//! fallback, and the record of which one actually runs.

use crate::VisionError;
use ort::session::builder::SessionBuilder;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

#[cfg(feature = "cuda")]
#[path = "providers/cuda.rs"]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "providers/cuda_missing.rs"]
mod cuda;
#[cfg(feature = "tensorrt")]
#[path = "providers/tensorrt.rs"]
mod tensorrt;
#[cfg(not(feature = "tensorrt"))]
#[path = "providers/tensorrt_missing.rs"]
mod tensorrt;

/// An ONNX Runtime execution provider jetvlm can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[serde(alias = "trt")]
    TensorRt,
    Cuda,
    Cpu,
}

impl ExecutionProvider {
    /// ONNX Runtime's own name for the provider.
    pub fn ort_name(self) -> &'static str {
        match self {
            ExecutionProvider::TensorRt => "TensorrtExecutionProvider",
            ExecutionProvider::Cuda => "CUDAExecutionProvider",
            ExecutionProvider::Cpu => "CPUExecutionProvider",
        }
    }

    /// Whether this build registers the provider at all.
    pub fn compiled(self) -> bool {
        match self {
            ExecutionProvider::TensorRt => tensorrt::COMPILED,
            ExecutionProvider::Cuda => cuda::COMPILED,
            ExecutionProvider::Cpu => true,
        }
    }

    /// The providers this build can use, best first: the default priority list.
    pub fn default_order() -> Vec<ExecutionProvider> {
        [
            ExecutionProvider::TensorRt,
            ExecutionProvider::Cuda,
            ExecutionProvider::Cpu,
        ]
        .into_iter()
        .filter(|p| p.compiled())
        .collect()
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecutionProvider::TensorRt => "tensorrt",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::Cpu => "cpu",
        })
    }
}

impl std::str::FromStr for ExecutionProvider {
    type Err = VisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" => Ok(ExecutionProvider::TensorRt),
            "cuda" => Ok(ExecutionProvider::Cuda),
            "cpu" => Ok(ExecutionProvider::Cpu),
            other => Err(VisionError::UnknownProvider(other.to_string())),
        }
    }
}

/// TensorRT build settings (from the package manifest, overridable by the runtime config).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRtSettings {
    pub fp16: bool,
    pub int8: bool,
    /// Built engines are cached here, so an engine is built once per board.
    pub engine_cache: Option<PathBuf>,
    pub workspace_mb: usize,
}

impl Default for TensorRtSettings {
    fn default() -> Self {
        TensorRtSettings {
            fp16: true,
            int8: false,
            engine_cache: None,
            workspace_mb: 1024,
        }
    }
}

/// Registers the first provider of `order` that works on this machine, and CUDA after it
/// when listed later (for the nodes TensorRT leaves); logs (or, with `require`, returns as an
/// error) every one skipped. Returns the provider that runs the model.
pub(crate) fn register(
    builder: &mut SessionBuilder,
    order: &[ExecutionProvider],
    require: bool,
    trt: &TensorRtSettings,
) -> Result<ExecutionProvider, VisionError> {
    let order: Vec<ExecutionProvider> = if order.is_empty() {
        vec![ExecutionProvider::Cpu]
    } else {
        order.to_vec()
    };
    for (rank, &ep) in order.iter().enumerate() {
        let result = match ep {
            ExecutionProvider::TensorRt => tensorrt::register(builder, trt),
            ExecutionProvider::Cuda => cuda::register(builder),
            ExecutionProvider::Cpu => Ok(()),
        };
        match result {
            Ok(()) => {
                // The GPU providers after it take the nodes it rejects (TensorRT leaves some
                // operators to CUDA), ahead of ONNX Runtime's CPU fallback.
                for &next in &order[rank + 1..] {
                    let extra = match next {
                        ExecutionProvider::Cuda => cuda::register(builder),
                        _ => continue,
                    };
                    if let Err(reason) = extra {
                        tracing::debug!(provider = %next, %reason, "secondary execution provider not registered");
                    }
                }
                return Ok(ep);
            }
            Err(reason) => {
                if require && rank == 0 {
                    return Err(VisionError::ProviderUnavailable {
                        requested: ep.to_string(),
                        reason,
                    });
                }
                tracing::warn!(provider = %ep, %reason, "execution provider unavailable, falling back");
            }
        }
    }
    // The list did not include the CPU provider and nothing else worked.
    Err(VisionError::ProviderUnavailable {
        requested: order
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reason:
            "none of the listed execution providers could be registered (add `cpu` to fall back)"
                .into(),
    })
}
