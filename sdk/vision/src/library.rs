//! Finding and loading the ONNX Runtime shared library (`ort` with `load-dynamic`).
//!
//! Resolution order: an explicit path (config `vision.ort_library`) > `ORT_DYLIB_PATH` >
//! the project venv next to the executable or the workspace
//! (`<repo>/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`) > the
//! system (an `onnxruntime-gpu` installed for the system Python, `/usr/lib`,
//! `LD_LIBRARY_PATH`). The venv's PyPI wheel has no GPU provider: when the encoder asks for
//! TensorRT or CUDA (and this build has them), a library found later that ships that
//! provider (`libonnxruntime_providers_tensorrt.so` beside it) is taken instead. The library
//! is loaded once per process; one ONNX Runtime environment serves every encoder.

use crate::{ExecutionProvider, VisionError};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Finds the library without loading it (see [`resolve_ort_library_for`]).
pub fn resolve_ort_library(explicit: Option<&Path>) -> Result<PathBuf, VisionError> {
    resolve_ort_library_for(explicit, &[])
}

/// Finds the library without loading it. An explicit path or `ORT_DYLIB_PATH` is taken as
/// given; otherwise the first library found in the search order, except that when `gpu`
/// names providers (e.g. the encoder asks for TensorRT) a library shipping one of them
/// (`libonnxruntime_providers_<name>.so` beside it) is preferred: the project venv's PyPI
/// wheel has none, while an ONNX Runtime built for a Jetson does.
pub fn resolve_ort_library_for(
    explicit: Option<&Path>,
    gpu: &[ExecutionProvider],
) -> Result<PathBuf, VisionError> {
    if let Some(p) = explicit {
        return existing(p, "vision.ort_library");
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        return existing(Path::new(&p), "ORT_DYLIB_PATH");
    }
    let mut looked = Vec::new();
    let mut found = Vec::new();
    for root in venv_roots() {
        let lib = root.join(".venv/lib");
        looked.push(lib.join("python3*/site-packages/onnxruntime/capi/libonnxruntime.so*"));
        found.extend(find_in_python_lib(&lib, "site-packages"));
    }
    for dir in system_dirs() {
        looked.push(dir.join("libonnxruntime.so*"));
        found.extend(find_lib_in(&dir));
    }
    for lib in [Path::new("/usr/local/lib"), Path::new("/usr/lib")] {
        for pkgs in ["dist-packages", "site-packages"] {
            looked.push(lib.join(format!(
                "python3*/{pkgs}/onnxruntime/capi/libonnxruntime.so*"
            )));
            found.extend(find_in_python_lib(lib, pkgs));
        }
    }
    pick(found, gpu).ok_or(VisionError::OrtLibraryNotFound { looked_in: looked })
}

/// The first of `found` that ships one of the `gpu` providers, else the first.
fn pick(found: Vec<PathBuf>, gpu: &[ExecutionProvider]) -> Option<PathBuf> {
    let with_gpu = found
        .iter()
        .find(|lib| gpu.iter().any(|&ep| ships_provider(lib, ep)));
    match with_gpu {
        Some(lib) => {
            if found.first() != Some(lib) {
                tracing::info!(
                    library = %lib.display(),
                    "preferring an ONNX Runtime that ships the requested GPU execution provider"
                );
            }
            Some(lib.clone())
        }
        None => found.into_iter().next(),
    }
}

/// Whether the ONNX Runtime at `lib` ships `ep`'s provider library beside it.
pub fn ships_provider(lib: &Path, ep: ExecutionProvider) -> bool {
    let name = match ep {
        ExecutionProvider::TensorRt => "tensorrt",
        ExecutionProvider::Cuda => "cuda",
        ExecutionProvider::Cpu => return false,
    };
    lib.parent().is_some_and(|d| {
        d.join(format!("libonnxruntime_providers_{name}.so"))
            .is_file()
    })
}

fn existing(p: &Path, origin: &str) -> Result<PathBuf, VisionError> {
    if p.is_file() {
        Ok(p.to_path_buf())
    } else {
        Err(VisionError::OrtLibraryLoad {
            path: p.to_path_buf(),
            source: format!("{origin} names a file that does not exist").into(),
        })
    }
}

/// Directories that may hold the project's `.venv`: ancestors of the executable, of the
/// working directory, and the workspace this crate was built in.
fn venv_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let mut push_ancestors = |start: &Path| {
        for a in start.ancestors() {
            if a.join(".venv").is_dir() && !roots.iter().any(|r| r == a) {
                roots.push(a.to_path_buf());
            }
        }
    };
    if let Ok(exe) = std::env::current_exe() {
        push_ancestors(&exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        push_ancestors(&cwd);
    }
    push_ancestors(Path::new(env!("CARGO_MANIFEST_DIR")));
    roots
}

/// `<lib>/python3*/<pkgs>/onnxruntime/capi/libonnxruntime.so*`
fn find_in_python_lib(lib: &Path, pkgs: &str) -> Option<PathBuf> {
    jetvlm_core::entries_starting_with(lib, "python3")
        .iter()
        .rev()
        .find_map(|py| find_lib_in(&py.join(pkgs).join("onnxruntime/capi")))
}

/// `libonnxruntime.so` or the highest versioned `libonnxruntime.so.X.Y.Z` in `dir`.
fn find_lib_in(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join("libonnxruntime.so");
    if plain.is_file() {
        return Some(plain);
    }
    let mut versioned = jetvlm_core::entries_starting_with(dir, "libonnxruntime.so.");
    versioned.retain(|p| p.is_file());
    versioned.pop()
}

fn system_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/lib",
        "/usr/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

struct Loaded {
    path: PathBuf,
    env: ort::environment::Environment,
}

static ENV: OnceLock<Loaded> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime (once per process) and returns the environment and the library path
/// actually in use. A later call naming another library gets the first one, with a warning.
pub fn environment(
    explicit: Option<&Path>,
    gpu: &[ExecutionProvider],
) -> Result<(ort::environment::Environment, PathBuf), VisionError> {
    if let Some(l) = ENV.get() {
        warn_if_other(explicit, &l.path);
        return Ok((l.env.clone(), l.path.clone()));
    }
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = ENV.get() {
        return Ok((l.env.clone(), l.path.clone()));
    }
    let path = resolve_ort_library_for(explicit, gpu)?;
    let load_err = |source: Box<dyn std::error::Error + Send + Sync>| VisionError::OrtLibraryLoad {
        path: path.clone(),
        source,
    };
    let builder = ort::init_from(&path).map_err(|e| load_err(Box::new(e)))?;
    let env = builder
        .with_name("jetvlm")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(Box::new(e)))?;
    tracing::info!(library = %path.display(), "loaded ONNX Runtime");
    let loaded = ENV.get_or_init(|| Loaded { path, env });
    Ok((loaded.env.clone(), loaded.path.clone()))
}

fn warn_if_other(explicit: Option<&Path>, loaded: &Path) {
    if let Some(p) = explicit
        && p != loaded
    {
        tracing::warn!(
            requested = %p.display(),
            loaded = %loaded.display(),
            "ONNX Runtime is already loaded in this process; keeping the loaded library"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_is_a_clear_error() {
        let err =
            resolve_ort_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn versioned_library_is_found_in_a_venv_layout() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join("python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.24.4"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        let found = find_in_python_lib(dir.path(), "site-packages").unwrap();
        assert_eq!(found, capi.join("libonnxruntime.so.1.24.4"));
        assert!(find_in_python_lib(dir.path(), "dist-packages").is_none());
    }

    /// With a GPU provider asked for, a library shipping it wins over an earlier one without
    /// (the venv's CPU wheel before a Jetson build); without, the search order stands.
    #[test]
    fn a_library_with_the_requested_gpu_provider_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("venv/onnxruntime/capi");
        let gpu = dir.path().join("system/onnxruntime/capi");
        for d in [&cpu, &gpu] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("libonnxruntime.so.1.23.2"), b"").unwrap();
            std::fs::write(d.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        }
        std::fs::write(gpu.join("libonnxruntime_providers_tensorrt.so"), b"").unwrap();
        std::fs::write(gpu.join("libonnxruntime_providers_cuda.so"), b"").unwrap();
        let found = vec![
            cpu.join("libonnxruntime.so.1.23.2"),
            gpu.join("libonnxruntime.so.1.23.2"),
        ];
        let trt = [ExecutionProvider::TensorRt, ExecutionProvider::Cpu];
        assert_eq!(pick(found.clone(), &trt), Some(found[1].clone()));
        assert_eq!(
            pick(found.clone(), &[ExecutionProvider::Cuda]),
            Some(found[1].clone())
        );
        assert_eq!(
            pick(found.clone(), &[ExecutionProvider::Cpu]),
            Some(found[0].clone())
        );
        assert_eq!(pick(found[..1].to_vec(), &trt), Some(found[0].clone()));
        assert_eq!(pick(Vec::new(), &trt), None);
    }

    #[test]
    fn not_found_error_names_places_and_fix() {
        let err = VisionError::OrtLibraryNotFound {
            looked_in: vec![PathBuf::from("/a/.venv/lib")],
        };
        let msg = err.to_string();
        assert!(
            msg.contains("/a/.venv/lib") && msg.contains("setup") && msg.contains("ORT_DYLIB_PATH")
        );
    }
}
