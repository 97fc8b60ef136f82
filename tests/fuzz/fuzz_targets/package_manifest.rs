//! The model package manifest `jetvlm.yaml`, read by its two readers: the runtime's
//! `ModelPackage::load` (every field checked against a real encoder and decoder) and the
//! planner's `ModelSpec::load`. The package around the fuzzed manifest is the tiny LLaVA
//! fixture (`tests/fixtures/vlm`: its ONNX encoder, decoder config and tokenizer), so a
//! manifest that names `vision.onnx` and `decoder` reaches the signature checks.

#![no_main]

use jetvlm_fuzz::{scratch, write};
use jetvlm_quant::KvPolicy;
use jetvlm_vision::{Issue, ModelPackage};
use libfuzzer_sys::fuzz_target;
use std::sync::Once;

const ENCODER: &[u8] = include_bytes!("../../fixtures/vlm/vision.onnx");
const DECODER_CONFIG: &[u8] = include_bytes!("../../fixtures/vlm/decoder/config.json");
const TOKENIZER: &[u8] = include_bytes!("../../fixtures/vlm/decoder/tokenizer.json");

fuzz_target!(|data: &[u8]| {
    static PACKAGE: Once = Once::new();
    PACKAGE.call_once(|| {
        write("pkg/vision.onnx", ENCODER);
        write("pkg/decoder/config.json", DECODER_CONFIG);
        write("pkg/decoder/tokenizer.json", TOKENIZER);
        write("pkg/decoder/model.safetensors", b"");
    });
    let manifest = write("pkg/jetvlm.yaml", data);
    let dir = scratch().join("pkg");
    // The runtime's extra check: the policy must parse.
    let loaded = ModelPackage::load_with(&dir, |m, issues| {
        if let Err(e) = m.kv.policy.parse::<KvPolicy>() {
            issues.push(Issue::new("kv.policy", e.to_string()));
        }
    });
    match loaded {
        Ok(p) => {
            let cfg = p.preprocess_config();
            assert!((1..=8192).contains(&cfg.width) && (1..=8192).contains(&cfg.height));
            assert!(p.tokens_per_frame() >= 1);
            let _ = cfg.input_shape();
            let _ = cfg.pad_rgb();
            let _ = p.tensorrt_cache_dir();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = jetvlm_board::ModelSpec::load(&manifest).map_err(|e| e.to_string());
});
