//! Helpers shared by the fuzz targets: loaders that take a path get the fuzzed bytes in a
//! scratch directory that lives as long as the fuzzing process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The process's scratch directory (removed when the process exits normally).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("jetvlm-fuzz-")
            .tempdir()
            .expect("create the fuzz scratch directory")
    })
    .path()
}

/// Writes `bytes` to `name` inside [`scratch`] (creating parent directories) and returns
/// its path.
pub fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create a scratch subdirectory");
    }
    std::fs::write(&path, bytes).expect("write a scratch file");
    path
}

/// Splits the input at its first NUL byte: the file (JSON and YAML never hold a raw NUL)
/// and a second, free-form part (text to tokenize, a question to ask).
pub fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
