use std::path::PathBuf;

/// Errors of the CUDA backend; each names the operation and the shape, kernel or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    #[error("this jetvlm was built without CUDA support (rebuild with `--features cuda`)")]
    NotCompiledWithCuda,
    #[error("CUDA driver library (libcuda.so) not found: this machine has no usable NVIDIA driver")]
    DriverNotFound,
    #[error(
        "NVRTC library (libnvrtc.so) not found: install the CUDA toolkit, or run .ci/setup (the \
         `nvidia-cuda-nvrtc-cu12` wheel in .venv), or set JETVLM_NVRTC_LIB to a libnvrtc.so.12 \
         (tried when none is on the loader path, after /usr/local/cuda/lib64)"
    )]
    NvrtcNotFound,
    #[error(
        "NVRTC {nvrtc} is newer than the driver's CUDA {driver}: the kernels it compiles would not \
         load; use the NVRTC of the installed CUDA (on the loader path, or JETVLM_NVRTC_LIB)"
    )]
    NvrtcNewerThanDriver { nvrtc: String, driver: String },
    #[error("no CUDA device {ordinal}: {message}")]
    NoDevice {
        ordinal: usize,
        message: String,
        /// The driver's error, when a driver call failed.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("CUDA driver call `{op}` failed: {message}")]
    Driver {
        op: &'static str,
        message: String,
        /// The driver's error (`None` for a failure found on the host side).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("NVRTC call `{op}` failed: {message}")]
    Nvrtc {
        op: &'static str,
        message: String,
        /// NVRTC's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("NVRTC could not compile kernels/{file} for {arch}:\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        log: String,
    },
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no kernel source named `{0}`")]
    UnknownKernel(String),
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
    #[error("decoder {path}: {message}")]
    Model { path: PathBuf, message: String },
    /// The decoder crate failed on the model in `path`: its config or weights, or the CPU
    /// reference a device check runs beside the device.
    #[error("decoder {path}: {source}")]
    DecoderModel {
        path: PathBuf,
        #[source]
        source: Box<jetvlm_decoder::DecoderError>,
    },
    #[error("KV policy {policy} on the device: {message}")]
    Policy { policy: String, message: String },
    #[error("device KV cache full: {message}")]
    KvFull { message: String },
    /// The host side of a generation on the device (tokenizer, stop strings).
    #[error("decoder: {0}")]
    Decoder(#[from] jetvlm_decoder::DecoderError),
}

impl CudaError {
    /// True for the errors that mean "no usable CUDA here" (missing build feature, driver,
    /// NVRTC or device), as opposed to a failure on a working GPU.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CudaError::NotCompiledWithCuda
                | CudaError::DriverNotFound
                | CudaError::NvrtcNotFound
                | CudaError::NvrtcNewerThanDriver { .. }
                | CudaError::NoDevice { .. }
        )
    }
}
