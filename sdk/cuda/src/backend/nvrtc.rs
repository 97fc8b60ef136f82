//! NVRTC through cudarc's dynamic loading: compiles the `.cu` sources to CUBIN for an exact SM.
//! Needs only libnvrtc (no driver, no GPU).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use crate::error::CudaError;
use crate::sources::KernelSource;

/// Where an NVRTC off the loader path may be: `$JETVLM_NVRTC_LIB`, the CUDA toolkit's own
/// directories (`$CUDA_HOME`, `/usr/local/cuda`: a JetPack or toolkit install whose library
/// directory is not in the loader's configuration), else the `nvidia-cuda-nvrtc-cu12` wheel
/// in a `.venv` of the working directory or of a directory above the executable.
fn bundled_nvrtc_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("JETVLM_NVRTC_LIB").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    let homes = std::env::var_os("CUDA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/local/cuda")]);
    for home in homes {
        let mut dirs = vec![home.join("lib64")];
        if let Ok(targets) = std::fs::read_dir(home.join("targets")) {
            dirs.extend(targets.flatten().map(|t| t.path().join("lib")));
        }
        for dir in dirs {
            // The newest versioned library first (e.g. libnvrtc.so.12 before .so.11.2).
            let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc.so."))
                })
                .collect();
            // Numerically by the version after `.so.` (`.so.12` after `.so.9`).
            libs.sort_by_key(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("libnvrtc.so."))
                    .map(|v| {
                        v.split('.')
                            .map(|x| x.parse::<u32>().unwrap_or(0))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            });
            out.extend(libs.into_iter().rev());
        }
    }
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let Ok(libs) = std::fs::read_dir(root.join(".venv").join("lib")) else {
            continue;
        };
        for py in libs.flatten() {
            let lib = py
                .path()
                .join("site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
            if lib.is_file() {
                out.push(lib);
            }
        }
    }
    out
}

/// Loads a project-local NVRTC by path once, when the loader finds none by name. The loaded
/// library answers later look-ups of its soname (`libnvrtc.so.12`), which is how cudarc asks
/// for it; its builtins library sits beside it (RUNPATH `$ORIGIN`).
fn preload_bundled_nvrtc() {
    static PRELOADED: OnceLock<Option<libloading::Library>> = OnceLock::new();
    PRELOADED.get_or_init(|| {
        // SAFETY: only tries to dlopen candidate library names.
        if unsafe { sys::is_culib_present() } {
            return None;
        }
        bundled_nvrtc_candidates().into_iter().find_map(|path| {
            // SAFETY: NVRTC's initialisers have no preconditions.
            let lib = unsafe { libloading::Library::new(&path) }.ok()?;
            tracing::debug!(path = %path.display(), "loaded NVRTC");
            Some(lib)
        })
    });
}

/// True when a libnvrtc can be loaded (checked before any NVRTC call: cudarc panics otherwise).
pub fn nvrtc_available() -> bool {
    preload_bundled_nvrtc();
    // SAFETY: only tries to dlopen candidate library names.
    unsafe { sys::is_culib_present() }
}

/// (major, minor) of the loaded NVRTC.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcNotFound);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Nvrtc {
            op: "nvrtcVersion",
            message: format!("{e:?}"),
            source: Some(Box::new(e)),
        })?;
    Ok((major, minor))
}

/// Compiler options: exact SM, C++17, no fast math (the CPU twins assume IEEE division/sqrt).
fn options(sm: u32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{sm}"),
        "--std=c++17".into(),
        "-default-device".into(),
    ]
}

struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn log_of(prog: &Program) -> String {
    // SAFETY: valid program handle; the log is NUL-terminated.
    match unsafe { result::get_program_log(prog.0) } {
        Ok(raw) if !raw.is_empty() => unsafe { CStr::from_ptr(raw.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
        _ => String::new(),
    }
}

/// Compiles `source` to a CUBIN for `sm_<sm>`. A compile error carries the NVRTC log.
pub fn compile_cubin(source: &KernelSource, sm: u32) -> Result<Vec<u8>, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcNotFound);
    }
    let nv = |op: &'static str| {
        move |e: result::NvrtcError| CudaError::Nvrtc {
            op,
            message: format!("{e:?}"),
            source: Some(Box::new(e)),
        }
    };
    let src = CString::new(source.source).map_err(|_| CudaError::Compile {
        file: source.file,
        arch: format!("sm_{sm}"),
        log: "source contains a NUL byte".into(),
    })?;
    let name =
        CString::new(source.file).map_err(|_| CudaError::UnknownKernel(source.file.into()))?;
    let prog =
        Program(result::create_program(&src, Some(&name)).map_err(nv("nvrtcCreateProgram"))?);
    // SAFETY: valid program; options are plain strings.
    if let Err(e) = unsafe { result::compile_program(prog.0, &options(sm)) } {
        let log = log_of(&prog);
        return Err(CudaError::Compile {
            file: source.file,
            arch: format!("sm_{sm} ({e:?})"),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: valid compiled program; `size` is valid for writes.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(nv("nvrtcGetCUBINSize"))?;
    let mut image = vec![0u8; size];
    // SAFETY: `image` has the size NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, image.as_mut_ptr().cast()) }
        .result()
        .map_err(nv("nvrtcGetCUBIN"))?;
    if image.is_empty() {
        return Err(CudaError::Compile {
            file: source.file,
            arch: format!("sm_{sm}"),
            log: "empty CUBIN".into(),
        });
    }
    Ok(image)
}
