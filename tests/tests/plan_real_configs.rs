//! The planner on the published sizes of each model family (tests/fixtures/configs: the
//! README's `jetvlm plan` table, `plan_table.py`): the language model's parameter count equals
//! transformers' exactly, the vision encoder estimate is within 0.5% of it, and a frame costs
//! the tokens the family's processor gives it. The counts come from
//! `tests/fixtures/configs/count_params.py` (transformers builds each config on the meta
//! device; every total matches the checkpoint's name).

use jetvlm_board::ModelSpec;
use std::path::PathBuf;

fn config(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/configs")
        .join(dir)
}

/// (config, transformers' text parameters, vision parameters, tokens per frame).
const PUBLISHED: [(&str, u64, u64, u64); 7] = [
    // SmolVLM: one 512 (384) px tile, pixel shuffle 4 (3).
    ("smolvlm-500m", 409_252_800, 98_229_504, 64),
    ("smolvlm-2.2b", 1_812_051_968, 434_220_912, 81),
    // InternVL3: 448 px, patch 14, downsample_ratio 0.5 (sizes written as [n, n]).
    ("internvl3-1b", 629_697_920, 308_421_376, 256),
    ("internvl3-2b", 1_776_283_136, 312_600_576, 256),
    // Qwen2.5-VL: the planner's 448x448 frame, patch 14, 2x2 merge.
    ("qwen2.5-vl-3b", 3_085_938_688, 668_684_288, 256),
    ("qwen2.5-vl-7b", 7_615_616_512, 676_550_144, 256),
    // LLaVA-1.5: CLIP ViT-L/14 at 336 px.
    ("llava-1.5-7b", 6_738_939_904, 324_487_168, 576),
];

fn check(dir: &str, text: u64, vision: u64, tokens: u64) {
    let m = ModelSpec::load(&config(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
    assert_eq!(m.text.num_parameters(), text, "{dir}: language model");
    let est = m.vision.as_ref().and_then(|v| v.params).unwrap();
    let err = (est as f64 - vision as f64).abs() / vision as f64;
    assert!(
        err < 0.005,
        "{dir}: vision estimate {est} vs {vision} ({:.3}%)",
        err * 100.0
    );
    assert_eq!(m.tokens_per_frame, Some(tokens), "{dir}: tokens per frame");
}

#[test]
fn published_sizes_plan_with_transformers_parameter_counts() {
    for (dir, text, vision, tokens) in PUBLISHED {
        check(dir, text, vision, tokens);
    }
}

/// Gemma 3 (SigLIP at 896 px pooled to 256 tokens) and Qwen3-VL (a Qwen3 decoder with q/k
/// norms; a vision tower with a learned position table and three DeepStack mergers, 16 px
/// patches: 196 tokens for 448x448) plan exactly like the others.
#[test]
fn gemma3_and_qwen3_vl_plan_exactly() {
    for (dir, text, vision, tokens) in [
        ("gemma3-4b", 3_880_263_168u64, 419_816_304u64, 256),
        ("qwen3-vl-2b", 1_720_574_976, 406_957_056, 196),
        ("qwen3-vl-4b", 4_022_468_096, 415_347_712, 196),
    ] {
        check(dir, text, vision, tokens);
    }
}

/// InternVL writes sizes as `[height, width]`; a non-square one, or a downsample ratio that is
/// not 1/n, is refused naming the field.
#[test]
fn internvl_sizes_and_ratio_outside_what_is_planned_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(config("internvl3-1b").join("config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (field, pointer, value) in [
        (
            "vision_config.image_size",
            "/vision_config/image_size",
            serde_json::json!([448, 336]),
        ),
        (
            "downsample_ratio",
            "/downsample_ratio",
            serde_json::json!(0.3),
        ),
    ] {
        let mut v = base.clone();
        *v.pointer_mut(pointer).unwrap() = value;
        let path = tmp.path().join("config.json");
        std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        let msg = ModelSpec::load(&path).unwrap_err().to_string();
        assert!(msg.contains(field), "{field}: {msg}");
    }
}
