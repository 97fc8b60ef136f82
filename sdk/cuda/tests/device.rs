//! GPU test: every kernel against its CPU twin. Without a driver or a device it prints why it
//! skips, and checks that opening the device is the matching typed error (never a panic).
#![cfg(feature = "cuda")]

use jetvlm_cuda::{CudaDevice, CudaError};

#[test]
fn selftest_passes_on_a_gpu_or_skips_with_a_typed_error() {
    match CudaDevice::open(0) {
        Ok(dev) => {
            let dir = tempfile::tempdir().unwrap();
            let dev = dev.with_kernel_cache(dir.path());
            let checks = dev.selftest(1).unwrap();
            for c in &checks {
                eprintln!("{}", c.line());
            }
            let failed: Vec<_> = checks
                .iter()
                .filter(|c| !c.passed())
                .map(|c| c.line())
                .collect();
            assert!(failed.is_empty(), "{failed:#?}");
            // The compiled kernels went into the cache.
            assert!(std::fs::read_dir(dir.path()).unwrap().count() >= 6);
        }
        Err(e) => {
            assert!(e.is_unavailable(), "unexpected error: {e}");
            if !jetvlm_cuda::driver_available() {
                assert!(matches!(e, CudaError::DriverNotFound), "{e}");
            }
            eprintln!("skipped: {e}");
        }
    }
}

#[test]
fn invalid_ordinal_is_a_typed_error() {
    let err = CudaDevice::open(10_000).unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

/// The decoder fixtures: next to this crate in the source tree, else under the working
/// directory (a test executable carried to another machine runs from the repository root).
fn decoder_fixtures() -> Option<std::path::PathBuf> {
    [
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoder"),
        std::path::PathBuf::from("tests/fixtures/decoder"),
    ]
    .into_iter()
    .find(|p| p.join("llama/config.json").is_file())
}

#[test]
fn gpu_greedy_generation_equals_the_cpu_path_on_the_decoder_fixtures() {
    let dev = match CudaDevice::open(0) {
        Ok(dev) => dev,
        Err(e) => {
            assert!(e.is_unavailable(), "unexpected error: {e}");
            eprintln!("skipped: {e}");
            return;
        }
    };
    let Some(dir) = decoder_fixtures() else {
        eprintln!("skipped: tests/fixtures/decoder not found from here");
        return;
    };
    let checks = jetvlm_cuda::decoder_check(&dev, &dir, 32).unwrap();
    for c in &checks {
        eprintln!("{}", c.line());
    }
    assert!(checks.len() >= 2, "{checks:?}");
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.line())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
