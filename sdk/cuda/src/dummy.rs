//! The backend of a build without the `cuda` feature: the same names, every entry point
//! returns [`CudaError::NotCompiledWithCuda`].

use crate::error::CudaError;
use crate::gpu::{Gpu, PlanInfo, PoolMemory, PoolsInfo, Splits};
use crate::layout::{BlockEntry, KvLayout};
use crate::meminfo::DeviceInfo;
use crate::selftest::{CompiledKernel, KernelCheck};

/// A value that cannot exist: the buffers, pools and queues of a device that cannot be
/// opened.
#[derive(Debug)]
pub enum Never {}

impl PoolsInfo for Never {
    fn layout(&self) -> &KvLayout {
        match *self {}
    }
    fn memory(&self) -> PoolMemory {
        match *self {}
    }
    fn blocks(&self) -> (usize, usize) {
        match *self {}
    }
}

impl PlanInfo for Never {
    fn layout(&self) -> &KvLayout {
        match *self {}
    }
    fn splits(&self) -> usize {
        match *self {}
    }
}

impl jetvlm_decoder::model::MatrixFormat for Never {
    fn quant_format(&self) -> Option<jetvlm_quant::WeightFormat> {
        match *self {}
    }
    fn dtype(&self) -> jetvlm_core::DType {
        match *self {}
    }
}

/// Every operation of a device that cannot exist: callers need no `cfg` to name the CUDA
/// backend in a build without it.
impl Gpu for CudaDevice {
    type Buf = Never;
    type Ids = Never;
    type Weights = Never;
    type Pools = Never;
    type Plan = Never;
    type Queue = Never;
    type Event = Never;

    fn name(&self) -> String {
        match self.never {}
    }
    fn can_map_host_memory(&self) -> bool {
        match self.never {}
    }
    fn zeros(&self, _: usize) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn upload(&self, _: &[f32]) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn upload_ids(&self, _: &[u32]) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn upload_tensor(&self, _: &jetvlm_decoder::Tensor) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn weights_len(w: &Never) -> usize {
        match *w {}
    }
    fn weights_bytes(w: &Never) -> usize {
        match *w {}
    }
    fn upload_vector(&self, _: &[f32]) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn download(&self, _: &Never) -> Result<Vec<f32>, CudaError> {
        match self.never {}
    }
    fn write(&self, _: &mut Never, _: &[f32]) -> Result<(), CudaError> {
        match self.never {}
    }
    fn copy(&self, _: &Never, _: usize, _: usize, _: &mut Never) -> Result<(), CudaError> {
        match self.never {}
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        match self.never {}
    }
    fn embedding(&self, _: &mut Never, _: &Never, _: &[u32], _: usize) -> Result<(), CudaError> {
        match self.never {}
    }
    fn rmsnorm(
        &self,
        _: &mut Never,
        _: &Never,
        _: &Never,
        _: usize,
        _: usize,
        _: f32,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn gemv(
        &self,
        _: &mut Never,
        _: &Never,
        _: &Never,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn bias_add(&self, _: &mut Never, _: &Never, _: usize, _: usize) -> Result<(), CudaError> {
        match self.never {}
    }
    fn rope(
        &self,
        _: &mut Never,
        _: &Never,
        _: &Never,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn rope_mrope(
        &self,
        _: &mut Never,
        _: &Never,
        _: &Never,
        _: usize,
        _: usize,
        _: usize,
        _: [usize; 3],
        _: bool,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn residual_add(&self, _: &mut Never, _: &Never, _: usize) -> Result<(), CudaError> {
        match self.never {}
    }
    fn swiglu(&self, _: &mut Never, _: &Never, _: &Never, _: usize) -> Result<(), CudaError> {
        match self.never {}
    }
    fn geglu(&self, _: &mut Never, _: &Never, _: &Never, _: usize) -> Result<(), CudaError> {
        match self.never {}
    }
    fn softcap(&self, _: &mut Never, _: usize, _: f32) -> Result<(), CudaError> {
        match self.never {}
    }
    fn scale_round(
        &self,
        _: &mut Never,
        _: usize,
        _: f32,
        _: jetvlm_core::DType,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn kv_pools(&self, _: KvLayout, _: usize, _: usize, _: PoolMemory) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn kv_store_text(
        &self,
        _: &mut Never,
        _: usize,
        _: usize,
        _: usize,
        _: &Never,
        _: &Never,
        _: usize,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn kv_quantize_frame(
        &self,
        _: &mut Never,
        _: usize,
        _: usize,
        _: usize,
        _: &Never,
        _: &Never,
        _: usize,
    ) -> Result<(), CudaError> {
        match self.never {}
    }
    fn attention_plan(
        &self,
        _: &KvLayout,
        _: (usize, usize),
        _: usize,
        _: &[BlockEntry],
        _: &[i32],
        _: &[i32],
        _: Splits,
    ) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn attend(&self, _: &Never, _: &mut Never, _: &Never, _: &mut Never) -> Result<(), CudaError> {
        match self.never {}
    }
    fn copy_queue(&self) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn record(&self, _: Option<&Never>) -> Result<Never, CudaError> {
        match self.never {}
    }
    fn wait(&self, _: Option<&Never>, _: &Never) -> Result<(), CudaError> {
        match self.never {}
    }
    fn copy_pool_prefix(
        &self,
        _: &Never,
        _: &mut Never,
        _: (usize, usize),
        _: &Never,
    ) -> Result<u64, CudaError> {
        match self.never {}
    }
}

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
