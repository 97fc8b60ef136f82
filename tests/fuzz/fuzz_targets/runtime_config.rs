//! The runtime config YAML (`RuntimeConfig::from_yaml`). A config it accepts has a sampler
//! that validates, a positive window and token limit, and a KV policy that is `f32` or
//! parses (a policy that does not parse is reported when the pipeline loads, so it is only
//! parsed here, not asserted).

#![no_main]

use jetvlm_fuzz::write;
use jetvlm_quant::KvPolicy;
use jetvlm_runtime::RuntimeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = write("runtime/runtime.yaml", data);
    match RuntimeConfig::from_yaml(&path) {
        Ok(cfg) => {
            assert!(cfg.window_frames >= 1 && cfg.max_new_tokens >= 1);
            assert_ne!(cfg.capacity_tokens, Some(0));
            cfg.sampling
                .to_sampler()
                .validate()
                .expect("from_yaml accepted a sampler validate refuses");
            if let Some(p) = &cfg.kv_policy {
                let _ = p.parse::<KvPolicy>().map(|p| p.name());
            }
            assert!(!(cfg.kv_policy.is_some() && cfg.kv_calibration.is_some()));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
