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

/// The device decoder loads Qwen2.5-VL's M-RoPE decoder, and refuses Qwen3-VL's (interleaved
/// M-RoPE, DeepStack: no device kernels) with one line naming the config field, before any
/// weight is uploaded.
#[test]
fn the_device_decoder_loads_mrope_and_refuses_what_it_cannot_run() {
    let vlms =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_vlms");
    let dev = SimDevice::new();
    let qwen25 = vlms.join("qwen2_5_vl/pkg/decoder");
    assert!(jetvlm_cuda::DeviceDecoder::load(&dev, &qwen25).is_ok());
    let qwen3 = vlms.join("qwen3_vl/pkg/decoder");
    let msg = jetvlm_cuda::DeviceDecoder::load(&dev, &qwen3)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("mrope_interleaved") && msg.contains("--device cpu") && !msg.contains('\n'),
        "{msg}"
    );
    // Without interleaving, DeepStack alone is still refused, naming its field.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("decoder");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(&qwen3).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_parameters"]["mrope_interleaved"] = serde_json::json!(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = jetvlm_cuda::DeviceDecoder::load(&dev, &dir)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("deepstack_layers") && !msg.contains('\n'),
        "{msg}"
    );
}
