//! `config.json` through both validators: `jetvlm_core::hf::ModelConfig::from_value` (the
//! schema the planner and the package loader share) and `jetvlm_decoder::Config::from_value`
//! (plus the decoder's own checks). A config either validator accepts must have parameter
//! and KV arithmetic that fits 64 bits (`validate` promises it), and the decoder's config
//! holds the same model config the core validator returns. The planner's reader
//! (`ModelSpec::from_hf_config`, which also estimates a `vision_config` encoder) plans the
//! model on a bundled board: a plan or an error, never an overflow.

#![no_main]

use jetvlm_board::plan::{self, PlanOptions, Workload};
use jetvlm_board::{BoardRegistry, KvPrecision, ModelSpec};
use jetvlm_core::hf::ModelConfig;
use jetvlm_fuzz::write;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let path = Path::new("config.json");
    let core = ModelConfig::from_value(&raw, path);
    if let Ok(c) = &core {
        c.validate(path)
            .expect("from_value returned a config validate refuses");
        let _ = c.num_parameters();
        let _ = c.weight_bytes();
        let _ = c.weight_bytes_read_per_token();
        let _ = c.kv_elements_per_token();
        assert!(c.head_dim > 0 && c.num_key_value_heads > 0);
        assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
    }
    match jetvlm_decoder::Config::from_value(&raw, path) {
        Ok(d) => assert_eq!(Some(&d.model), core.as_ref().ok()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let file = write("hf/config.json", data);
    let Ok(spec) = ModelSpec::from_hf_config(&file) else {
        return;
    };
    let board = BoardRegistry::bundled()
        .get("orin-nano-8gb")
        .expect("a bundled board");
    let w = Workload {
        frames: 4,
        tokens_per_frame: spec.tokens_per_frame.unwrap_or(64),
        prompt_tokens: 64,
        answer_tokens: 128,
    };
    let _ = plan::plan(
        &board,
        &spec,
        &w,
        &KvPrecision::mixed(),
        &PlanOptions::default(),
    )
    .map(|p| p.fits)
    .map_err(|e| e.to_string());
});
