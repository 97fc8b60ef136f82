//! The backend of a build without the `cuda` feature: the same names, every entry point
//! returns [`CudaError::NotCompiledWithCuda`].

use crate::error::CudaError;
use crate::meminfo::DeviceInfo;
use crate::selftest::{CompiledKernel, KernelCheck};

enum Never {}

/// A CUDA device; cannot be opened in a build without the `cuda` feature.
pub struct CudaDevice {
    never: Never,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.never {}
    }
}

impl CudaDevice {
    pub fn open(_ordinal: usize) -> Result<Self, CudaError> {
        Err(CudaError::NotCompiledWithCuda)
    }
    pub fn info(&self) -> &DeviceInfo {
        match self.never {}
    }
    pub fn selftest(&self, _seed: u64) -> Result<Vec<KernelCheck>, CudaError> {
        match self.never {}
    }
}

pub fn nvrtc_available() -> bool {
    false
}

pub fn driver_available() -> bool {
    false
}

pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    Err(CudaError::NotCompiledWithCuda)
}

/// Compiles every kernel source for each SM in `sms` with NVRTC (no GPU needed).
pub fn compile_all(_sms: &[u32]) -> Result<Vec<CompiledKernel>, CudaError> {
    Err(CudaError::NotCompiledWithCuda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_says_cuda_is_not_compiled_in() {
        let err = CudaDevice::open(0).unwrap_err();
        assert!(matches!(err, CudaError::NotCompiledWithCuda) && err.is_unavailable());
        assert!(err.to_string().contains("--features cuda"));
        assert!(matches!(
            compile_all(&[87]),
            Err(CudaError::NotCompiledWithCuda)
        ));
        assert!(!nvrtc_available() && !driver_available());
    }
}
