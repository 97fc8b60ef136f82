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

/// The device decoder loads every family's decoder of the committed packages: Qwen2.5-VL's
/// M-RoPE, Qwen3-VL's interleaved M-RoPE with DeepStack, Gemma 3's recipe (the runs are in
/// `tests/families.rs`).
#[test]
fn the_device_decoder_loads_every_family() {
    let vlms =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_vlms");
    let dev = SimDevice::new();
    let mut loaded = 0;
    for entry in std::fs::read_dir(&vlms).unwrap() {
        let dir = entry.unwrap().path().join("pkg/decoder");
        if dir.join("config.json").is_file() {
            if let Err(e) = jetvlm_cuda::DeviceDecoder::load(&dev, &dir) {
                panic!("{}: {e}", dir.display());
            }
            loaded += 1;
        }
    }
    assert!(loaded >= 7, "{loaded} families under {}", vlms.display());
}
