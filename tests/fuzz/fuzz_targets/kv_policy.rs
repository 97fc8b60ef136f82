//! The KV policy grammar (`KvPolicy::from_str`, one grammar for the cache, the planner and
//! the CLI). A policy that parses validates, prints (`name`, `Display`) to a spelling that
//! parses back to an equal policy, and survives the derived views: group fitting for any
//! head dim, per-layer formats, the planner's `KvPrecision` and its byte arithmetic. The
//! list splitter and the per-layer format grammar (`4c64`) are fuzzed on the same text.

#![no_main]

use jetvlm_board::KvPrecision;
use jetvlm_quant::{KvPolicy, LayerFormat, split_policies};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text);
    for piece in split_policies(text) {
        check(&piece);
    }
    if let Ok(f) = text.parse::<LayerFormat>() {
        f.check().expect("a parsed layer format checks");
        let printed = f.to_string();
        assert_eq!(printed.parse::<LayerFormat>(), Ok(f), "{printed}");
    }
});

fn check(text: &str) {
    let Ok(p) = text.parse::<KvPolicy>() else {
        return;
    };
    p.validate().expect("a parsed policy validates");
    let name = p.name();
    assert_eq!(p.to_string(), name);
    let again: KvPolicy = name
        .parse()
        .unwrap_or_else(|e| panic!("`{text}` printed as `{name}`, which does not parse: {e}"));
    assert_eq!(again, p, "`{text}` printed as `{name}`");
    for head_dim in [0, 1, 32, 48, 64, 80, 96, 128, 256, usize::MAX] {
        let fitted = p.fitted_to(head_dim);
        let _ = p.head_dim_problem(head_dim);
        let _ = fitted.name();
        let _ = p
            .clone()
            .in_effect(text, Some(&KvPolicy::mixed()), head_dim);
    }
    for layer in [0, 1, 7, 1000] {
        let _ = p.layer_format(layer);
    }
    let planner = KvPrecision::from(p.clone());
    assert_eq!(planner.name(), name);
    for head_dim in [1u64, 64, 96, 128, u32::MAX as u64] {
        let _ = planner.describe(head_dim);
        let _ = planner.frame_bits_per_element(head_dim, 4);
        let _ = planner.frame_format(3).vector_bytes(head_dim);
    }
}
