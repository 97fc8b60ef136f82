//! The cudarc backend (feature `cuda`).

mod bench;
mod device;
mod gpu_impl;
mod kv;
mod memory;
mod nvrtc;
mod ops;
mod selftest;

pub use bench::DeviceBandwidth;
pub use device::{CudaDevice, driver_available};
pub use gpu_impl::CudaQueue;
pub use kv::{AttentionPlan, DeviceKvPools};
pub use memory::MappedHostBuffer;
pub use nvrtc::{compile_cubin, nvrtc_available, nvrtc_version};
pub use ops::{DeviceWeights, QUANT_GEMV_MAX_TOKENS, QuantWeights};

use crate::error::CudaError;
use crate::selftest::CompiledKernel;
use crate::sources::KERNELS;

/// Compiles every kernel source for each SM in `sms` with NVRTC (no GPU needed); the first
/// failure is returned with the compiler log.
pub fn compile_all(sms: &[u32]) -> Result<Vec<CompiledKernel>, CudaError> {
    let mut out = Vec::new();
    for &sm in sms {
        for k in KERNELS {
            let t = std::time::Instant::now();
            let image = compile_cubin(k, sm)?;
            out.push(CompiledKernel {
                file: k.file,
                sm,
                cubin_bytes: image.len(),
                millis: t.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
    Ok(out)
}
