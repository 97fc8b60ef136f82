//! Device open, facts, and the kernel registry (NVRTC + on-disk cache).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits, sys,
};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{compile_cubin, nvrtc_available, nvrtc_version};
use crate::cache::{KernelCache, default_cache_dir};
use crate::error::CudaError;
use crate::meminfo::{DeviceInfo, host_memory};
use crate::sources::{KernelSource, kernel_source};

pub(crate) fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver {
        op,
        message: format!("{e:?}"),
        source: Some(Box::new(e)),
    }
}

/// True when the CUDA driver library can be loaded (checked before any driver call: cudarc
/// panics when it is missing).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen candidate library names.
    unsafe { sys::is_culib_present() }
}

/// An opened CUDA device: context, one stream, its facts and its compiled kernels.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    cache: Option<KernelCache>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded kernel handles by (file, function): a launch looks its kernel up here instead of
    /// asking the driver each time.
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Without a driver library, NVRTC or device this returns
    /// [`CudaError::DriverNotFound`], [`CudaError::NvrtcNotFound`] or [`CudaError::NoDevice`].
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError::DriverNotFound);
        }
        if !nvrtc_available() {
            return Err(CudaError::NvrtcNotFound);
        }
        let count = CudaContext::device_count().map_err(|e| CudaError::NoDevice {
            ordinal,
            message: format!("driver reports {e:?}"),
            source: Some(Box::new(e)),
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice {
                ordinal,
                message: format!("the driver sees {count} device(s)"),
                source: None,
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: called before any buffer of this context exists. Every buffer is used on the
        // device's one stream; the only other stream (the offloaded KV cache's copy stream)
        // touches its buffers through raw addresses ordered by explicit events, and is
        // synchronised before those buffers are dropped. Without per-buffer event tracking a
        // kernel launch costs one driver call instead of two or three per buffer argument.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;
        let attr = |a: sys::CUdevice_attribute| {
            ctx.attribute(a).map_err(driver_err("cuDeviceGetAttribute"))
        };
        use sys::CUdevice_attribute::*;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        let integrated = attr(CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0;
        let total_memory = ctx.total_mem().map_err(driver_err("cuDeviceTotalMem"))? as u64;
        let available_memory = if integrated {
            // Shared DRAM: the driver's free figure is MemFree; plan against MemAvailable.
            host_memory(Path::new("/proc/meminfo"))?.0
        } else {
            ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))?.0 as u64
        };
        let mut driver_version = 0;
        // SAFETY: the library is loaded; the pointer is valid for writes.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(driver_err("cuDriverGetVersion"))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(driver_err("cuDeviceGetName"))?,
            compute_capability: (major as u32, minor as u32),
            integrated,
            can_map_host_memory: attr(CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? != 0,
            multiprocessors: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            total_memory,
            available_memory,
            driver_version,
            nvrtc_version: nvrtc_version()?,
        };
        check_nvrtc_for_driver(info.nvrtc_version, info.driver_version)?;
        tracing::info!(?info, "opened CUDA device");
        Ok(Self {
            ctx,
            stream,
            info,
            cache: default_cache_dir().map(KernelCache::new),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Uses `dir` for compiled kernels instead of the default cache directory.
    pub fn with_kernel_cache(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cache = Some(KernelCache::new(dir));
        self
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))
    }

    /// Kernel `function` of source `file` (compiled on first use, from the disk cache when
    /// an entry for this source, SM and NVRTC version exists).
    pub fn function(&self, file: &'static str, function: &str) -> Result<CudaFunction, CudaError> {
        let poisoned = |_| CudaError::Driver {
            op: "kernel registry",
            message: "lock poisoned".into(),
            source: None,
        };
        if let Some(f) = self
            .functions
            .lock()
            .map_err(poisoned)?
            .get(&(file, function.to_string()))
        {
            return Ok(f.clone());
        }
        let source = kernel_source(file).ok_or_else(|| CudaError::UnknownKernel(file.into()))?;
        let module = self.module(source)?;
        let f = module
            .load_function(function)
            .map_err(|e| CudaError::Driver {
                op: "cuModuleGetFunction",
                message: format!("{file}::{function}: {e:?}"),
                source: Some(Box::new(e)),
            })?;
        self.functions
            .lock()
            .map_err(poisoned)?
            .insert((file, function.to_string()), f.clone());
        Ok(f)
    }

    fn module(&self, source: &'static KernelSource) -> Result<Arc<CudaModule>, CudaError> {
        let mut modules = self.modules.lock().map_err(|_| CudaError::Driver {
            op: "kernel registry",
            message: "lock poisoned".into(),
            source: None,
        })?;
        if let Some(m) = modules.get(source.file) {
            return Ok(m.clone());
        }
        let sm = self.info.sm();
        let nv = self.info.nvrtc_version;
        let cached = match &self.cache {
            Some(c) => c.load(source, sm, nv).unwrap_or_else(|e| {
                tracing::warn!("kernel cache unreadable, recompiling: {e}");
                None
            }),
            None => None,
        };
        let module =
            match cached.and_then(|image| self.ctx.load_module(Ptx::from_binary(image)).ok()) {
                Some(m) => m,
                None => {
                    let t = std::time::Instant::now();
                    let image = compile_cubin(source, sm)?;
                    tracing::info!(
                        file = source.file,
                        sm,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        "compiled kernel"
                    );
                    if let Some(c) = &self.cache
                        && let Err(e) = c.store(source, sm, nv, &image)
                    {
                        tracing::warn!("kernel cache not written: {e}");
                    }
                    self.ctx.load_module(Ptx::from_binary(image)).map_err(|e| {
                        CudaError::Driver {
                            op: "cuModuleLoadData",
                            message: format!("kernels/{} for sm_{sm}: {e:?}", source.file),
                            source: Some(Box::new(e)),
                        }
                    })?
                }
            };
        modules.insert(source.file, module.clone());
        Ok(module)
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if data.is_empty() {
            return self.zeros_raw::<T>(0);
        }
        self.stream
            .clone_htod(data)
            .map_err(driver_err("cuMemcpyHtoD"))
    }

    /// A zero-filled device buffer.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(driver_err("cuMemAlloc"))
    }

    fn zeros_raw<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: a zero- or one-element allocation that is never read before being written.
        unsafe { self.stream.alloc(len.max(1)) }.map_err(driver_err("cuMemAlloc"))
    }

    /// Copies a device buffer back to the host (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        let v = self
            .stream
            .clone_dtoh(data)
            .map_err(driver_err("cuMemcpyDtoH"))?;
        self.synchronize()?;
        Ok(v)
    }
}

/// An NVRTC of a newer CUDA major version than the driver's compiles kernels the driver
/// cannot load (e.g. the CUDA 12 wheel on a JetPack 5 board, whose driver is CUDA 11.4).
/// Within one major version newer minors are fine (CUDA minor-version compatibility).
fn check_nvrtc_for_driver(nvrtc: (i32, i32), driver_version: i32) -> Result<(), CudaError> {
    let (major, minor) = (driver_version / 1000, driver_version % 1000 / 10);
    if nvrtc.0 > major {
        return Err(CudaError::NvrtcNewerThanDriver {
            nvrtc: format!("{}.{}", nvrtc.0, nvrtc.1),
            driver: format!("{major}.{minor}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn nvrtc_of_a_newer_cuda_major_than_the_driver_is_refused() {
        // CUDA 12.6 NVRTC: fine with a 12.2 (JetPack 6.0) or 13.0 driver, not with 11.4.
        assert!(check_nvrtc_for_driver((12, 6), 12020).is_ok());
        assert!(check_nvrtc_for_driver((12, 6), 13000).is_ok());
        let e = check_nvrtc_for_driver((12, 6), 11040).unwrap_err();
        assert!(e.is_unavailable());
        assert!(
            e.to_string()
                .contains("NVRTC 12.6 is newer than the driver's CUDA 11.4"),
            "{e}"
        );
    }
}
