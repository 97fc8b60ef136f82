//! Opening the GPU for the `--device cuda` commands. A
//! build without the `cuda` feature, or a machine without a driver or GPU, gets one clear
//! error line from [`open`].

use anyhow::{Result, anyhow};
use jetvlm_cuda::CudaDevice;

/// Opens CUDA device `ordinal`; the error names the flag and why no GPU is usable.
pub fn open(ordinal: usize) -> Result<CudaDevice> {
    CudaDevice::open(ordinal).map_err(|e| anyhow!("--device cuda: {e}"))
}

/// One line describing the opened device.
#[cfg(feature = "cuda")]
pub fn describe(dev: &CudaDevice) -> String {
    let i = dev.info();
    format!(
        "device {}: {} sm_{} ({}), {} SMs, {:.1} GiB, driver {}, nvrtc {}.{}",
        i.ordinal,
        i.name,
        i.sm(),
        if i.integrated {
            "integrated, unified memory"
        } else {
            "discrete"
        },
        i.multiprocessors,
        i.total_memory as f64 / (1u64 << 30) as f64,
        i.driver_version,
        i.nvrtc_version.0,
        i.nvrtc_version.1
    )
}
