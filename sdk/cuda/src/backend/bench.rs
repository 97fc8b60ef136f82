//! Timing helpers for the device benchmarks: CUDA-event timing and the device memory
//! bandwidth measured in the same run (a streaming read kernel and a device-to-device copy).

use cudarc::driver::sys;

use super::device::{CudaDevice, driver_err};
use crate::error::CudaError;

/// Device memory bandwidth measured on one buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceBandwidth {
    /// Streaming read (the access pattern of attention), GB/s, best of the repetitions.
    pub read_gbs: f64,
    /// Device-to-device copy, bytes read plus bytes written per second, GB/s.
    pub copy_gbs: f64,
    pub buffer_bytes: usize,
}

impl CudaDevice {
    /// L2 cache size in bytes.
    pub fn l2_bytes(&self) -> Result<u64, CudaError> {
        self.context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map(|v| v as u64)
            .map_err(driver_err("cuDeviceGetAttribute"))
    }

    /// Milliseconds the work queued by `f` takes on the stream (CUDA events around it).
    pub fn time_ms<F>(&self, f: F) -> Result<f64, CudaError>
    where
        F: FnOnce() -> Result<(), CudaError>,
    {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream()
            .record_event(flags)
            .map_err(driver_err("cuEventRecord"))?;
        f()?;
        let end = self
            .stream()
            .record_event(flags)
            .map_err(driver_err("cuEventRecord"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver_err("cuEventElapsedTime"))?;
        Ok(ms as f64)
    }

    /// Read and copy bandwidth on a buffer of `bytes` (rounded down to whole float4s), best
    /// of `reps` timed repetitions after one warm-up.
    pub fn measure_bandwidth(
        &self,
        bytes: usize,
        reps: usize,
    ) -> Result<DeviceBandwidth, CudaError> {
        let n = (bytes / 16).max(1) * 4;
        let mut a = self.zeros::<f32>(n)?;
        self.fill_bell(&mut a, n, 7, 1.0)?;
        let mut b = self.zeros::<f32>(n)?;
        let blocks = self.info().multiprocessors as usize * 8;
        let mut partial = self.zeros::<f32>(blocks)?;
        let (mut read_best, mut copy_best) = (f64::INFINITY, f64::INFINITY);
        for rep in 0..=reps.max(1) {
            let r = self.time_ms(|| self.read_sum(&a, &mut partial, blocks))?;
            let c = self.time_ms(|| {
                self.stream()
                    .memcpy_dtod(&a, &mut b)
                    .map_err(driver_err("cuMemcpyDtoD"))
            })?;
            if rep > 0 {
                read_best = read_best.min(r);
                copy_best = copy_best.min(c);
            }
        }
        let buf = n * 4;
        Ok(DeviceBandwidth {
            read_gbs: buf as f64 / (read_best * 1e-3) / 1e9,
            copy_gbs: 2.0 * buf as f64 / (copy_best * 1e-3) / 1e9,
            buffer_bytes: buf,
        })
    }

    /// Host-to-device and device-to-host copy bandwidth from pinned memory, GB/s (best of
    /// `reps`), on `bytes`.
    pub fn measure_pcie(&self, bytes: usize, reps: usize) -> Result<(f64, f64), CudaError> {
        let n = bytes.max(1);
        // SAFETY: filled before use.
        let mut host = unsafe { self.context().alloc_pinned::<u8>(n) }
            .map_err(driver_err("cuMemHostAlloc"))?;
        host.as_mut_slice()
            .map_err(driver_err("cuEventSynchronize"))?
            .fill(1);
        let mut dev = self.zeros::<u8>(n)?;
        let (mut h2d, mut d2h) = (f64::INFINITY, f64::INFINITY);
        for rep in 0..=reps.max(1) {
            let a = self.time_ms(|| {
                self.stream()
                    .memcpy_htod(&host, &mut dev)
                    .map_err(driver_err("cuMemcpyHtoD"))
            })?;
            let b = self.time_ms(|| {
                self.stream()
                    .memcpy_dtoh(&dev, &mut host)
                    .map_err(driver_err("cuMemcpyDtoH"))
            })?;
            if rep > 0 {
                h2d = h2d.min(a);
                d2h = d2h.min(b);
            }
        }
        let gbs = |ms: f64| n as f64 / (ms * 1e-3) / 1e9;
        Ok((gbs(h2d), gbs(d2h)))
    }
}
