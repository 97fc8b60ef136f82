//! The device decoder on the simulated device (every kernel's CPU twin under the device's host
//! logic): the same checks `jetvlm selftest --device cuda` runs on a GPU, on every machine.

use jetvlm_cuda::{SimDevice, decoder_check};

/// The decoder fixtures next to this crate in the source tree.
fn decoder_fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoder")
}

#[test]
fn simulated_device_gives_the_cpu_tokens_on_the_decoder_fixtures() {
    let checks = decoder_check(&SimDevice::new(), &decoder_fixtures(), 32).unwrap();
    for c in &checks {
        eprintln!("{}", c.line());
    }
    assert_eq!(checks.len(), 4, "{checks:?}");
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.line())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
