//! `jetvlm plan` on the exported Gemma 3 and Qwen3-VL packages (tests/fixtures/hf_vlms)
//! charges what the runtime allocates for the same workload, measured on the loaded model:
//!
//! - weights: the decoder's buffers (`Model::weight_bytes_held`), within 2%;
//! - frame features: every frame's encoder output the runtime keeps (f32 embeddings and, for
//!   Qwen3-VL, its DeepStack feature sets), exactly;
//! - KV: a camera session's cache after its frames, a question and the answer, exactly, once
//!   the cache's block granularity (16-token blocks, a frame's tokens in blocks of their own)
//!   is added to the plan's per-token charge. Gemma 3's sliding-window layers keep the whole
//!   context (the window is 8 tokens here, the context about 80): the planner charges every
//!   layer for every token, as the cache holds them;
//! - the total of the three within 2%.
//!
//! And on GGUF files converted by `jetvlm quantize --from` (a tied Q8_0 embedding table, a
//! Q4_K file with a tied Q6_K table, a Q4_0 file with a Q8_0 head): `plan` on the converted
//! directory charges the weights the loaded decoder holds, within 2%.

mod common;
use common::jetvlm;
use std::path::{Path, PathBuf};

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf_vlms")
        .join(family)
}

/// A copy of `family`'s package in `dir` with its decoder config edited.
fn edited_package(dir: &Path, family: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixture(family).join("pkg");
    let dst = dir.join(family);
    std::fs::create_dir_all(dst.join("decoder")).unwrap();
    for sub in ["", "decoder"] {
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), dst.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    let cfg_path = dst.join("decoder/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    dst
}

/// Four frames that differ (the probe image, colours shifted by the index).
fn frames(family: &str) -> Vec<jetvlm_camera::Frame> {
    let img = jetvlm_vision::RgbImage::open(&fixture(family).join("probe.png")).unwrap();
    (0..4u64)
        .map(|i| jetvlm_camera::Frame {
            index: i,
            timestamp: std::time::Duration::ZERO,
            width: img.width,
            height: img.height,
            rgb: img
                .data
                .iter()
                .map(|v| v.wrapping_add(37 * i as u8))
                .collect(),
        })
        .collect()
}

const BLOCK: u64 = 16;

fn check(family: &str, pkg: &Path) {
    let frames = frames(family);
    let n = frames.len() as u64;
    let cfg = jetvlm_runtime::RuntimeConfig {
        kv_policy: Some(format!("fp16:fblock={BLOCK}")),
        max_new_tokens: 8,
        window_frames: frames.len(),
        ..jetvlm_runtime::RuntimeConfig::default()
    };
    let mut pipe = jetvlm_runtime::Pipeline::load(pkg, cfg).unwrap();
    let weights = pipe.model().unwrap().weight_bytes_held();
    let tpf = pipe.package().tokens_per_frame() as u64;
    let (embeddings, _) = pipe.encode_frames(&frames).unwrap();
    let features: u64 = embeddings
        .iter()
        .map(|e| 4 * (e.data.len() + e.deepstack.len()) as u64)
        .sum();
    drop(embeddings);
    let mut s = pipe.session().unwrap();
    for f in &frames {
        s.push_frame(f).unwrap();
    }
    s.ask("what is in the picture?").unwrap().finish().unwrap();
    let cached = s.cached_tokens() as u64;
    let kv = s.kv_memory().total_bytes;
    drop(s);
    let text = cached - n * tpf;

    let (ok, stdout, stderr) = jetvlm(&[
        "plan",
        "--model",
        pkg.to_str().unwrap(),
        "--board",
        "orin-nano-8gb",
        "--frames",
        &n.to_string(),
        "--prompt-tokens",
        &text.to_string(),
        "--answer-tokens",
        "0",
        "--kv",
        "fp16",
        "--json",
    ]);
    assert!(ok, "{family}: {stderr}");
    let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let m = &p["memory"];
    let get = |k: &str| {
        m[k].as_u64()
            .unwrap_or_else(|| panic!("{family}: no {k} in {m}"))
    };
    assert_eq!(p["context_tokens"].as_u64(), Some(cached), "{family}");

    let planned_w = get("weights_bytes");
    let err = (planned_w as f64 - weights as f64).abs() / weights as f64;
    assert!(
        err <= 0.02,
        "{family}: plan {planned_w} B of weights, runtime holds {weights} B"
    );
    assert_eq!(
        get("frame_features_bytes"),
        features,
        "{family}: frame features"
    );

    // The plan's KV per token (all layers, FP16), over the blocks the cache fills.
    let planned_kv = get("kv_text_bytes") + get("kv_frame_bytes");
    assert_eq!(planned_kv % cached, 0, "{family}");
    let per_token = planned_kv / cached;
    let blocks = n * tpf.div_ceil(BLOCK) + text.div_ceil(BLOCK);
    assert_eq!(
        kv,
        per_token * blocks * BLOCK,
        "{family}: the cache holds {kv} B for {cached} tokens; the plan charges {per_token} B a token"
    );
    let planned = planned_w + planned_kv + features;
    let held = weights + kv + features;
    let err = (planned as f64 - held as f64).abs() / held as f64;
    eprintln!(
        "{family}: plan {planned} B (weights {planned_w}, KV {planned_kv}, features {features}) vs runtime {held} B (weights {weights}, KV {kv}): {:.2}%",
        100.0 * err
    );
    assert!(err <= 0.02, "{family}: plan {planned} vs runtime {held}");
}

#[test]
fn gemma3_plan_charges_what_the_runtime_allocates() {
    let tmp = tempfile::tempdir().unwrap();
    // A window far shorter than the context: the local layer's cache still holds it all.
    let pkg = edited_package(tmp.path(), "gemma3", |c| c["sliding_window"] = 8.into());
    // Per token: 2 layers (one local, one global) x 1 KV head x (K + V) x 32 x 2 bytes.
    check("gemma3", &pkg);
}

#[test]
fn qwen3_vl_plan_charges_its_deepstack_features() {
    let pkg = fixture("qwen3_vl").join("pkg");
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pkg.join("decoder/config.json")).unwrap())
            .unwrap();
    assert_eq!(p["deepstack_layers"], 2, "the fixture carries DeepStack");
    check("qwen3_vl", &pkg);
}

#[test]
fn converted_gguf_plans_what_the_decoder_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for (name, src) in [
        ("gguf_q8_0_tied", "decoder/llama"),
        ("gguf_q4_k", "quant/gguf_q4_k/hf"),
        ("gguf_q4_0", "decoder/llama"),
    ] {
        let out = tmp.path().join(name);
        let gguf = fixtures.join("quant").join(name).join("model.gguf");
        let (ok, _, stderr) = jetvlm(&[
            "quantize",
            "--model",
            fixtures.join(src).to_str().unwrap(),
            "--from",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: {stderr}");
        let (ok, stdout, stderr) = jetvlm(&[
            "plan",
            "--model",
            out.to_str().unwrap(),
            "--board",
            "orin-nano-8gb",
            "--tokens-per-frame",
            "1",
            "--json",
        ]);
        assert!(ok, "{name}: {stderr}");
        let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let planned = p["memory"]["weights_bytes"].as_u64().unwrap();
        let held = jetvlm_decoder::Model::load(&out, &jetvlm_decoder::LoadOptions::default())
            .unwrap()
            .weight_bytes_held();
        let err = (planned as f64 - held as f64).abs() / held as f64;
        eprintln!(
            "{name}: plan {planned} B, decoder holds {held} B ({:.2}%)",
            100.0 * err
        );
        assert!(err <= 0.02, "{name}: plan {planned} vs held {held}");
    }
}
