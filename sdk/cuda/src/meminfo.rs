//! Host memory as Linux reports it. On Jetson the GPU shares this DRAM, and the driver's
//! free-memory query reports MemFree (page cache counted as used), so plans use MemAvailable.

use std::path::Path;

use crate::error::CudaError;

/// `MemAvailable` and `MemTotal` in bytes from `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    Some((field("MemAvailable")?, field("MemTotal")?))
}

/// (available, total) host memory in bytes.
pub fn host_memory(path: &Path) -> Result<(u64, u64), CudaError> {
    let text = std::fs::read_to_string(path).map_err(|source| CudaError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })?;
    parse_meminfo(&text).ok_or_else(|| CudaError::Shape {
        op: "read host memory",
        message: format!("{} has no MemAvailable/MemTotal lines", path.display()),
    })
}

/// Facts about an opened device that planning and the selftest report.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (8, 7) for Orin.
    pub compute_capability: (u32, u32),
    /// Integrated GPU sharing DRAM with the CPU (Jetson).
    pub integrated: bool,
    /// Page-locked host memory can be mapped into the device address space (zero copy).
    pub can_map_host_memory: bool,
    pub multiprocessors: u32,
    /// Device memory in bytes (on an integrated GPU: the shared DRAM).
    pub total_memory: u64,
    /// Memory available to a new allocation in bytes: MemAvailable on an integrated GPU,
    /// the driver's free memory on a discrete one.
    pub available_memory: u64,
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
}

impl DeviceInfo {
    /// SM number used for NVRTC and the kernel cache, e.g. 87.
    pub fn sm(&self) -> u32 {
        self.compute_capability.0 * 10 + self.compute_capability.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_available_not_free() {
        let text = "MemTotal:        7800000 kB\nMemFree:          100000 kB\nMemAvailable:    5000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((5_000_000 * 1024, 7_800_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn reads_this_machines_meminfo() {
        let p = Path::new("/proc/meminfo");
        if p.exists() {
            let (avail, total) = host_memory(p).unwrap();
            assert!(avail > 0 && avail <= total);
        }
        assert!(host_memory(Path::new("/nonexistent/meminfo")).is_err());
    }
}
