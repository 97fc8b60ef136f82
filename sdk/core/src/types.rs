use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a cached token came from. The KV cache chooses its precision from this tag:
/// text (system prompt, question, generated answer) stays FP16, frame tokens are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Text,
    Frame,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::Text => "text",
            TokenKind::Frame => "frame",
        })
    }
}

/// Identifies one camera frame's tokens inside a cache (monotonic per session).
pub type FrameId = u64;

/// Element types of stored weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    /// Parses the names Hugging Face uses in `torch_dtype` / `dtype` (`float16`, `bfloat16`,
    /// `float32`) and the short names (`f16`, `bf16`, `f32`).
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" | "float" => Some(DType::F32),
            "float16" | "f16" | "fp16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "int8" | "i8" => Some(DType::I8),
            "uint8" | "u8" => Some(DType::U8),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
        })
    }
}

/// Where computation runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
    /// The CUDA backend on a simulated device: its host logic with each kernel's CPU twin
    /// (for testing the GPU path without a GPU; slow).
    Sim,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Sim => "sim",
        })
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "sim" => Ok(Device::Sim),
            other => Err(format!(
                "unknown device `{other}` (expected cpu, cuda or sim)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names() {
        assert_eq!(DType::from_hf_name("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::from_hf_name("float16"), Some(DType::F16));
        assert_eq!(DType::from_hf_name("float32"), Some(DType::F32));
        assert_eq!(DType::from_hf_name("complex64"), None);
        assert_eq!(DType::BF16.size_bytes(), 2);
    }

    #[test]
    fn device_parse() {
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda));
        assert!("tpu".parse::<Device>().is_err());
    }
}
