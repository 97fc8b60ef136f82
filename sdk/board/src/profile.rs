//! The board profile schema (`boards/*.yaml`) and its validation.

use crate::BoardError;
use jetvlm_core::ConfigError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// A Jetson board (module + the JetPack it ships) as the planner sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    /// The name users type (`orin-nano-8gb`); equals the bundled file's stem.
    pub name: String,
    pub display_name: String,
    pub family: Family,
    pub memory: Memory,
    pub gpu: Gpu,
    pub cpu: Cpu,
    pub software: Software,
}

/// SoC generation. Decides the CUDA runtime overhead the planner charges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Xavier,
    Orin,
    Thor,
}

impl Family {
    /// Memory the CUDA context, the CUDA/cuBLAS/TensorRT libraries and ONNX Runtime take
    /// before any model buffer is allocated. A documented estimate per family:
    ///
    /// - Orin (JetPack 6, CUDA 12 with lazy module loading): 400 MiB.
    /// - Xavier (JetPack 5, CUDA 11.4: no lazy loading, every kernel image is loaded at
    ///   context creation): 600 MiB.
    /// - Thor (JetPack 7, CUDA 13, larger Blackwell kernel images): 500 MiB.
    pub const fn runtime_overhead_bytes(self) -> u64 {
        match self {
            Family::Orin => 400 * MIB,
            Family::Xavier => 600 * MIB,
            Family::Thor => 500 * MIB,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Xavier => "xavier",
            Family::Orin => "orin",
            Family::Thor => "thor",
        })
    }
}

/// Shared CPU/GPU DRAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Physical DRAM on the module, MiB.
    pub dram_mib: u64,
    /// DRAM technology (`LPDDR5`), for display.
    #[serde(rename = "type")]
    pub kind: String,
    /// Firmware carveouts + OS + desktop + margin, MiB. `dram_mib - os_reserved_mib` is the
    /// budget a plan must fit in.
    pub os_reserved_mib: u64,
    /// Peak DRAM bandwidth, GB/s (10^9 bytes per second) as the data sheet prints it.
    pub bandwidth_gb_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Architecture name (`ampere`, `volta`, `blackwell`).
    pub arch: String,
    /// Compute capability as the `sm_XX` number (87 for Orin).
    pub sm: u32,
    pub cuda_cores: u32,
    pub tensor_cores: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpu {
    pub model: String,
    pub cores: u32,
}

/// The JetPack release the board ships with (the newest that supports it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Software {
    pub jetpack: String,
    pub l4t: String,
    pub cuda: String,
    pub tensorrt: String,
}

impl BoardProfile {
    /// Reads and validates a board YAML file.
    pub fn from_file(path: &Path) -> Result<Self, BoardError> {
        let profile: BoardProfile = jetvlm_core::config::load_yaml(path)?;
        profile.validate(path)?;
        Ok(profile)
    }

    /// Parses and validates board YAML text; `origin` names it in errors.
    pub fn from_yaml_str(text: &str, origin: &Path) -> Result<Self, BoardError> {
        let profile: BoardProfile = jetvlm_core::config::yaml_from_str(text, origin)?;
        profile.validate(origin)?;
        Ok(profile)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::invalid(path, "name", "must not be empty"));
        }
        if self.memory.dram_mib == 0 {
            return Err(ConfigError::invalid(
                path,
                "memory.dram_mib",
                "must be greater than zero",
            ));
        }
        if self.memory.dram_mib.checked_mul(MIB).is_none() {
            return Err(ConfigError::invalid(
                path,
                "memory.dram_mib",
                format!(
                    "{} MiB is more bytes than 64 bits can count",
                    self.memory.dram_mib
                ),
            ));
        }
        if self.memory.os_reserved_mib >= self.memory.dram_mib {
            return Err(ConfigError::invalid(
                path,
                "memory.os_reserved_mib",
                format!(
                    "{} MiB reserved leaves nothing of {} MiB DRAM",
                    self.memory.os_reserved_mib, self.memory.dram_mib
                ),
            ));
        }
        let bw = self.memory.bandwidth_gb_s;
        if !(bw.is_finite() && bw > 0.0) {
            return Err(ConfigError::invalid(
                path,
                "memory.bandwidth_gb_s",
                format!("must be a positive number of GB/s, got {bw}"),
            ));
        }
        if self.gpu.sm == 0 {
            return Err(ConfigError::invalid(
                path,
                "gpu.sm",
                "must be greater than zero",
            ));
        }
        if self.cpu.cores == 0 {
            return Err(ConfigError::invalid(
                path,
                "cpu.cores",
                "must be greater than zero",
            ));
        }
        Ok(())
    }

    /// Physical DRAM in bytes (a validated profile's always fits; an unvalidated one
    /// saturates rather than wraps).
    pub fn dram_bytes(&self) -> u64 {
        self.memory.dram_mib.saturating_mul(MIB)
    }

    /// Memory an application may plan to use: DRAM minus the OS/desktop reservation.
    pub fn usable_bytes(&self) -> u64 {
        self.memory
            .dram_mib
            .saturating_sub(self.memory.os_reserved_mib)
            .saturating_mul(MIB)
    }

    /// Peak DRAM bandwidth in bytes per second.
    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.memory.bandwidth_gb_s * 1e9
    }

    /// CUDA context and runtime libraries (see [`Family::runtime_overhead_bytes`]).
    pub fn runtime_overhead_bytes(&self) -> u64 {
        self.family.runtime_overhead_bytes()
    }
}
