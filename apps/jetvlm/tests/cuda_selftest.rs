//! `jetvlm selftest --device cuda` through the built binary: all PASS on a GPU, otherwise one
//! clear error line, a non-zero exit and no panic.

mod common;
use common::jetvlm;

fn assert_one_clear_line(stderr: &str, expect: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(expect),
        "{}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn selftest_passes_on_a_gpu_or_fails_with_one_line() {
    let (ok, stdout, stderr) = jetvlm(&["selftest", "--device", "cuda"]);
    if !jetvlm_cuda::compiled_with_cuda() {
        assert!(!ok);
        assert_one_clear_line(&stderr, "without CUDA support");
    } else if !jetvlm_cuda::driver_available() {
        assert!(!ok);
        assert_one_clear_line(&stderr, "libcuda");
    } else if ok {
        let results: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
            .collect();
        assert!(results.len() > 40, "{stdout}");
        assert!(results.iter().all(|l| l.starts_with("PASS")), "{stdout}");
    } else {
        // A driver without a usable device still fails with one line.
        assert_one_clear_line(&stderr, "--device cuda");
        eprintln!("skipped: {stderr}");
    }
}

#[test]
fn nvrtc_only_compiles_every_kernel_or_fails_with_one_line() {
    let (ok, stdout, stderr) = jetvlm(&["selftest", "--device", "cuda", "--nvrtc-only"]);
    if !jetvlm_cuda::compiled_with_cuda() {
        assert!(!ok);
        assert_one_clear_line(&stderr, "without CUDA support");
    } else if !jetvlm_cuda::nvrtc_available() {
        assert!(!ok);
        assert_one_clear_line(&stderr, "libnvrtc");
    } else {
        assert!(ok, "{stderr}");
        let passes = stdout
            .lines()
            .filter(|l| l.starts_with("PASS nvrtc"))
            .count();
        assert_eq!(passes, 3 * jetvlm_cuda::sources::KERNELS.len(), "{stdout}");
    }
}

#[test]
fn selftest_on_cpu_is_refused_with_one_line() {
    let (ok, _, stderr) = jetvlm(&["selftest", "--device", "cpu"]);
    assert!(!ok);
    assert_one_clear_line(&stderr, "--device cuda");
}
