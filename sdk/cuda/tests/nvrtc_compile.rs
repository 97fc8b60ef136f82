//! Every `.cu` source compiles with NVRTC for Xavier (sm_72), Orin (sm_87) and H100 (sm_90).
//! Needs libnvrtc only (no GPU, no driver): from the loader path, `$JETVLM_NVRTC_LIB`, or the
//! `nvidia-cuda-nvrtc-cu12` wheel in the project's `.venv`. Without one the test prints why it
//! skips, unless JETVLM_REQUIRE_NVRTC=1 (CI sets it), where a missing library fails the test.
#![cfg(feature = "cuda")]

use jetvlm_cuda::sources::{CHECKED_ARCHS, KERNELS};

#[test]
fn every_kernel_compiles_for_xavier_orin_and_h100() {
    if !jetvlm_cuda::nvrtc_available() {
        let required = std::env::var("JETVLM_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "JETVLM_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded"
        );
        eprintln!("skipped: libnvrtc not found (.venv wheel, JETVLM_NVRTC_LIB or the loader path)");
        return;
    }
    let version = jetvlm_cuda::nvrtc_version().unwrap();
    let compiled = match jetvlm_cuda::compile_all(CHECKED_ARCHS) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(compiled.len(), KERNELS.len() * CHECKED_ARCHS.len());
    for c in &compiled {
        assert!(c.cubin_bytes > 0);
        eprintln!(
            "nvrtc {}.{} sm_{} {:<16} {:>7} bytes {:6.1} ms",
            version.0, version.1, c.sm, c.file, c.cubin_bytes, c.millis
        );
    }
}

#[test]
fn a_broken_kernel_reports_the_compiler_log() {
    if !jetvlm_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let broken = jetvlm_cuda::sources::KernelSource {
        file: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        functions: &["k"],
    };
    let err = jetvlm_cuda::compile_cubin(&broken, 87)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.cu") && err.contains("sm_87") && err.contains("undefined_name"),
        "{err}"
    );
}
