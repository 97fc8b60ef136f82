//! On-disk cache of compiled kernels, keyed by source hash, SM and NVRTC version.
//! Location: `$JETVLM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/jetvlm/kernels`, else
//! `$HOME/.cache/jetvlm/kernels`. Entries are written to a temporary file and renamed, so a
//! reader never sees half an entry.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::CudaError;
use crate::sources::KernelSource;

/// Default cache directory from the environment (None when no home directory is known).
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("JETVLM_KERNEL_CACHE") {
        return Some(dir);
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|c| c.join("jetvlm").join("kernels"))
}

/// A directory of compiled kernel images.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// File of `source` compiled for `sm` by NVRTC `nvrtc` (major, minor).
    pub fn entry_path(&self, source: &KernelSource, sm: u32, nvrtc: (i32, i32)) -> PathBuf {
        self.dir.join(format!(
            "{}-{:016x}-sm{sm}-nvrtc{}.{}.cubin",
            source.stem(),
            source.source_hash(),
            nvrtc.0,
            nvrtc.1
        ))
    }

    /// The cached image, if present (a missing entry is `Ok(None)`).
    pub fn load(
        &self,
        source: &KernelSource,
        sm: u32,
        nvrtc: (i32, i32),
    ) -> Result<Option<Vec<u8>>, CudaError> {
        let path = self.entry_path(source, sm, nvrtc);
        match std::fs::read(&path) {
            Ok(bytes) if !bytes.is_empty() => Ok(Some(bytes)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CudaError::Cache { path, source }),
        }
    }

    /// Stores an image atomically (temporary file in the same directory, then rename).
    pub fn store(
        &self,
        source: &KernelSource,
        sm: u32,
        nvrtc: (i32, i32),
        image: &[u8],
    ) -> Result<PathBuf, CudaError> {
        let path = self.entry_path(source, sm, nvrtc);
        let err = |p: &Path, source: std::io::Error| CudaError::Cache {
            path: p.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| err(&self.dir, e))?;
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("kernel"),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(image)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(&path, e));
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::KERNELS;

    #[test]
    fn key_separates_source_sm_and_nvrtc_version() {
        let c = KernelCache::new("/x");
        let a = c.entry_path(&KERNELS[0], 87, (12, 6));
        assert_ne!(a, c.entry_path(&KERNELS[0], 72, (12, 6)));
        assert_ne!(a, c.entry_path(&KERNELS[0], 87, (13, 0)));
        assert_ne!(a, c.entry_path(&KERNELS[1], 87, (12, 6)));
        assert!(a.to_string_lossy().contains("sm87"));
    }

    #[test]
    fn store_then_load_round_trips_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let c = KernelCache::new(dir.path().join("nested"));
        assert!(c.load(&KERNELS[2], 90, (12, 6)).unwrap().is_none());
        let p = c.store(&KERNELS[2], 90, (12, 6), b"image").unwrap();
        assert_eq!(
            c.load(&KERNELS[2], 90, (12, 6)).unwrap().as_deref(),
            Some(&b"image"[..])
        );
        let names: Vec<_> = std::fs::read_dir(c.dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(names, vec![p]);
    }

    #[test]
    fn unwritable_directory_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let c = KernelCache::new(file.join("sub"));
        assert!(matches!(
            c.store(&KERNELS[0], 87, (12, 6), b"i"),
            Err(CudaError::Cache { .. })
        ));
    }
}
