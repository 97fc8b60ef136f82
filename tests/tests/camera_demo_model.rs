//! The bundled demo model (models/demo) in the Rust runtime against the PyTorch model that
//! was exported: the held-out clips are re-rendered from their seed by the same scene
//! renderer, and the greedy answers must match the PyTorch answers recorded at export
//! (models/demo/heldout_predictions.jsonl).

use std::path::PathBuf;

use jetvlm_camera::Frame;
use jetvlm_camera::qa::{DatasetConfig, clip};
use jetvlm_runtime::{Pipeline, RuntimeConfig};

fn package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

fn predictions(n: usize) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(package().join("heldout_predictions.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The held-out set the package was scored on: `jetvlm synth --count 1000 --seed 1001`.
fn heldout_frames(index: usize) -> Vec<Frame> {
    let cfg = DatasetConfig {
        count: 1000,
        seed: 1001,
        ..DatasetConfig::default()
    };
    let (c, _) = clip(&cfg, index).unwrap();
    let (w, h) = (cfg.scene.width, cfg.scene.height);
    c.into_frames(w, h)
}

fn agreement(kv: &str, n: usize) -> (usize, usize, usize) {
    let cfg = RuntimeConfig {
        kv_policy: Some(kv.to_string()),
        max_new_tokens: 6,
        ..RuntimeConfig::default()
    };
    let mut p = Pipeline::load(&package(), cfg).unwrap();
    let (mut same, mut correct) = (0, 0);
    let preds = predictions(n);
    for rec in &preds {
        let frames = heldout_frames(rec["clip"].as_u64().unwrap() as usize);
        assert_eq!(
            frames.len() as u64,
            rec["frames"].as_u64().unwrap(),
            "re-rendered clip differs"
        );
        let answer = p
            .ask(&frames, rec["question"].as_str().unwrap())
            .unwrap()
            .finish()
            .unwrap();
        let text = answer.text.trim().to_string();
        same += usize::from(text == rec["prediction"].as_str().unwrap());
        correct += usize::from(text == rec["answer"].as_str().unwrap());
    }
    (same, correct, preds.len())
}

#[test]
fn rust_runtime_answers_like_the_exported_pytorch_model() {
    // Exact-precision cache: only float rounding separates the two implementations.
    let (same, _, n) = agreement("f32", 120);
    assert!(
        same * 100 >= n * 97,
        "f32 cache: {same}/{n} answers match PyTorch"
    );
    // The FP16 policy the accuracy is reported for.
    let (same, _, n) = agreement("fp16", 120);
    assert!(
        same * 100 >= n * 95,
        "fp16 cache: {same}/{n} answers match PyTorch"
    );
}

/// Held-out accuracy of the bundled model in the Rust runtime, against the most-common-answer
/// baseline of the same questions (what a model that ignored the frames could reach).
#[test]
fn demo_model_is_accurate_on_held_out_clips_far_above_the_majority_baseline() {
    let cfg = DatasetConfig {
        count: 1000,
        seed: 1001,
        ..DatasetConfig::default()
    };
    let (w, h) = (cfg.scene.width, cfg.scene.height);
    let mut p = Pipeline::load(
        &package(),
        RuntimeConfig {
            kv_policy: Some("fp16".into()),
            max_new_tokens: 6,
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    let mut mixed = Pipeline::load(&package(), RuntimeConfig::default()).unwrap();
    let (mut n, mut correct, mut changed) = (0usize, 0usize, 0usize);
    let mut answers: std::collections::HashMap<String, usize> = Default::default();
    // Clips spread over the held-out set (every 25th of 1000).
    for index in (0..1000).step_by(25) {
        let (c, questions) = clip(&cfg, index).unwrap();
        let frames = c.into_frames(w, h);
        for q in questions {
            let got = p.ask(&frames, &q.question).unwrap().finish().unwrap();
            let got = got.text.trim().to_string();
            let got_mixed = mixed.ask(&frames, &q.question).unwrap().finish().unwrap();
            changed += usize::from(got_mixed.text.trim() != got);
            correct += usize::from(got == q.answer);
            *answers.entry(q.answer).or_default() += 1;
            n += 1;
        }
    }
    let majority = answers.values().copied().max().unwrap();
    eprintln!(
        "fp16 accuracy {correct}/{n}; majority-answer baseline {majority}/{n}; mixed changed {changed}/{n}"
    );
    assert!(n >= 120, "only {n} questions");
    assert!(
        majority * 100 < n * 30,
        "the baseline itself is high: {majority}/{n}"
    );
    // The committed package scored 98.7% on all 3535 held-out questions in PyTorch.
    assert!(correct * 100 >= n * 93, "fp16 accuracy {correct}/{n}");
    // The mixed policy (frames INT4) changes at most a few answers.
    assert!(
        changed * 100 <= n * 3,
        "mixed changed {changed}/{n} answers"
    );
}

/// A KV policy chosen at run time keeps the package's block sizes (sized to its 16-token
/// frames) unless it names its own.
#[test]
fn run_time_policy_inherits_the_package_block_sizes() {
    let load = |kv: &str| {
        Pipeline::load(
            &package(),
            RuntimeConfig {
                kv_policy: Some(kv.into()),
                ..RuntimeConfig::default()
            },
        )
        .unwrap()
        .kv_policy()
    };
    let int8 = load("int8-frames");
    assert!(
        int8.contains("bits=8") && int8.contains("fblock=16") && int8.contains("qblock=16"),
        "{int8}"
    );
    // qblock=64 is the default block, so the name leaves it out: the package's 16 is gone.
    assert_eq!(load("mixed:qblock=64"), "mixed:fblock=16");
    assert_eq!(load("f32"), "f32");
}
