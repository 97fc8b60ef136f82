//! Memory for unified-memory boards and zero-copy inputs.
//!
//! - [`CudaDevice::upload_chunked`]: fills a final device buffer through a small pinned
//!   staging buffer, so loading weights never holds a whole host copy next to the device copy
//!   (on Jetson both live in the same DRAM, so a full host copy would double the peak).
//! - [`MappedHostBuffer`]: page-locked host memory mapped into the device address space;
//!   kernels read it in place. It holds the KV pools of `--kv-offload host` (and the
//!   selftest's zero-copy check); frame embeddings are copied to the device, as they are
//!   small next to the KV cache.

use cudarc::driver::{DeviceRepr, PinnedHostSlice, ValidAsZeroBits, sys};

use super::device::{CudaDevice, driver_err};
use crate::error::CudaError;

/// Page-locked host memory that kernels address directly (`cuMemHostAlloc(DEVICEMAP)`).
#[derive(Debug)]
pub struct MappedHostBuffer<T> {
    host: PinnedHostSlice<T>,
    device_ptr: u64,
    host_addr: usize,
}

impl<T: DeviceRepr + ValidAsZeroBits> MappedHostBuffer<T> {
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// Host view (waits for device work that used the buffer).
    pub fn as_mut_slice(&mut self) -> Result<&mut [T], CudaError> {
        self.host
            .as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))
    }
    pub fn as_slice(&self) -> Result<&[T], CudaError> {
        self.host
            .as_slice()
            .map_err(driver_err("cuEventSynchronize"))
    }
    /// Device address of the same memory, passed to kernels as a pointer argument.
    pub fn device_ptr(&self) -> u64 {
        self.device_ptr
    }
    /// Host address of the memory (a source for asynchronous host-to-device copies).
    pub fn host_addr(&self) -> usize {
        self.host_addr
    }
}

impl CudaDevice {
    /// Zero-filled page-locked host memory of `len` elements, mapped into the device.
    pub fn mapped_host_buffer<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<MappedHostBuffer<T>, CudaError> {
        if !self.info().can_map_host_memory {
            return Err(CudaError::Driver {
                op: "cuMemHostAlloc",
                message: "device cannot map host memory".into(),
                source: None,
            });
        }
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the memory is zero-filled below before any read.
        let mut host = unsafe {
            self.context()
                .alloc_pinned_with_flags::<T>(len.max(1), flags)
        }
        .map_err(driver_err("cuMemHostAlloc"))?;
        let ptr = host
            .as_mut_ptr()
            .map_err(driver_err("cuEventSynchronize"))?;
        // SAFETY: `ptr` points to `len.max(1)` elements of T, for which all-zero bits are valid.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` was allocated with DEVICEMAP in this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr.cast(), 0) }
            .result()
            .map_err(driver_err("cuMemHostGetDevicePointer"))?;
        Ok(MappedHostBuffer {
            host,
            device_ptr,
            host_addr: ptr as usize,
        })
    }

    /// A device buffer of `len` elements filled chunk by chunk: `fill(offset, chunk)` writes
    /// elements `offset..offset + chunk.len()` (e.g. read from a weights file). Host memory in
    /// use is one pinned chunk of `chunk_elems` elements, never the whole tensor.
    pub fn upload_chunked<T, F>(
        &self,
        len: usize,
        chunk_elems: usize,
        mut fill: F,
    ) -> Result<cudarc::driver::CudaSlice<T>, CudaError>
    where
        T: DeviceRepr + ValidAsZeroBits,
        F: FnMut(usize, &mut [T]) -> Result<(), CudaError>,
    {
        let chunk_elems = chunk_elems.clamp(1, len.max(1));
        let mut dst = self.zeros::<T>(len)?;
        // SAFETY: every element of the staging buffer is written by `fill` before it is copied.
        let mut staging = unsafe { self.context().alloc_pinned::<T>(chunk_elems) }
            .map_err(driver_err("cuMemHostAlloc"))?;
        let mut offset = 0;
        while offset < len {
            let n = chunk_elems.min(len - offset);
            let host = staging
                .as_mut_slice()
                .map_err(driver_err("cuEventSynchronize"))?;
            fill(offset, &mut host[..n])?;
            let mut view = dst.slice_mut(offset..offset + n);
            self.stream()
                .memcpy_htod(&host[..n], &mut view)
                .map_err(driver_err("cuMemcpyHtoD"))?;
            // The staging chunk is reused next: wait for this copy.
            self.synchronize()?;
            offset += n;
        }
        Ok(dst)
    }
}
