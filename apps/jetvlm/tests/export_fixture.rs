//! `jetvlm export` and the packages it writes, on tiny random Hugging Face checkpoints
//! (tests/fixtures/hf_vlms, built with transformers by tests/fixtures/make_hf_vlms.py): LLaVA-1.5,
//! Idefics3/SmolVLM, InternVL3, Qwen2.5-VL (M-RoPE, a 3x5 frame grid) and Gemma 3 (GeGLU,
//! sliding-window and global layers, an image's tokens attended both ways). `jetvlm ask` on the committed exported package gives, token
//! for token, transformers' `generate` on the same image and question (16 greedy tokens), and the
//! decoder's first-token logits are within 1e-4 of transformers' with the exact f32 cache. The
//! tests that export again need torch and transformers in .venv (`.ci/setup --dev`)
//! and skip with a printed reason without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// SmolVLM with image splitting: the tiled package (`tests/fixtures/hf_vlms/smolvlm_tiles`).
mod tiled;

const FAMILIES: [&str; 7] = [
    "llava",
    "idefics3",
    "smolvlm",
    "internvl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(family: &str) -> PathBuf {
    root().join("tests/fixtures/hf_vlms").join(family)
}

fn expected(family: &str) -> serde_json::Value {
    let path = fixture(family).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn jetvlm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetvlm"));
    cmd.env_remove("ORT_DYLIB_PATH");
    cmd
}

fn ask(family: &str, pkg: &Path, image: &str, kv: &str) -> serde_json::Value {
    let exp = expected(family);
    let out = jetvlm()
        .arg("ask")
        .arg("--model")
        .arg(pkg)
        .arg("--image")
        .arg(fixture(family).join(image))
        .arg(exp["question"].as_str().unwrap())
        .args(["--max-tokens", &exp["max_new_tokens"].to_string()])
        .args(["--json", "--kv", kv])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{family}: ask failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The greedy answer of `pkg` equals transformers' for `family`, and the prompt has as many
/// tokens as the processor's input ids (the manifest's template and image token layout
/// reproduce the chat template and the processor's expansion). On the probe at twice the
/// encoder's size the resize runs too: the manifest's resize mode and filter reproduce the
/// processor's.
fn assert_matches_transformers(family: &str, pkg: &Path) {
    let exp = expected(family);
    let large = ask(family, pkg, exp["large_image"].as_str().unwrap(), "fp16");
    assert_eq!(
        large["token_ids"], exp["large_greedy_tokens"],
        "{family}, {}",
        exp["large_image"]
    );
    for kv in ["fp16", "f32"] {
        let v = ask(family, pkg, exp["image"].as_str().unwrap(), kv);
        assert_eq!(v["token_ids"], exp["greedy_tokens"], "{family}, kv {kv}");
        assert_eq!(
            v["prompt_tokens"].as_u64().unwrap() as usize,
            exp["input_ids"].as_array().unwrap().len(),
            "{family}: prompt length vs the processor's input ids"
        );
        assert_eq!(v["frames"], 1);
    }
}

#[test]
fn exported_packages_answer_like_transformers() {
    for family in FAMILIES {
        assert_matches_transformers(family, &fixture(family).join("pkg"));
    }
}

fn probe_frame(family: &str) -> jetvlm_camera::Frame {
    let exp = expected(family);
    let path = fixture(family).join(exp["image"].as_str().unwrap());
    let img = jetvlm_vision::RgbImage::open(&path).unwrap();
    jetvlm_camera::Frame {
        index: 0,
        timestamp: std::time::Duration::ZERO,
        width: img.width,
        height: img.height,
        rgb: img.data,
    }
}

/// The decoder's first-token logits on `pkg` with the KV policy `kv`, and their max abs
/// difference from transformers'.
fn first_token_logits_diff(family: &str, pkg: &Path, kv: &str) -> f32 {
    let exp = expected(family);
    let want: Vec<f32> = exp["first_token_logits"]
        .as_array()
        .unwrap_or_else(|| panic!("{family}: expected.json has no first_token_logits"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let cfg = jetvlm_runtime::RuntimeConfig {
        kv_policy: Some(kv.to_string()),
        max_new_tokens: 1,
        ..jetvlm_runtime::RuntimeConfig::default()
    };
    let mut p = jetvlm_runtime::Pipeline::load(pkg, cfg).unwrap();
    let got = p
        .first_token_logits(&[probe_frame(family)], exp["question"].as_str().unwrap())
        .unwrap();
    assert_eq!(got.len(), want.len(), "{family}: vocabulary");
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// With the exact f32 cache only float summation order differs from PyTorch: max |diff| <
/// 1e-4 on logits of magnitude ~1-10. The mixed cache (INT4 frame K/V) runs and its
/// difference is reported; it stays below 1 (a bound that catches a broken layout, not a
/// fidelity claim for random weights).
#[test]
fn first_token_logits_match_transformers() {
    // Every family's expected.json holds transformers' first-token logits and 16 greedy
    // tokens (first_token_logits_diff panics naming a family without them).
    for family in FAMILIES {
        let pkg = fixture(family).join("pkg");
        let d = first_token_logits_diff(family, &pkg, "f32");
        eprintln!("{family}: kv f32: first-token logits max |diff| vs transformers = {d:e}");
        assert!(d < 1e-4, "{family}: kv f32: max |diff| {d}");
        let m = first_token_logits_diff(family, &pkg, "mixed");
        eprintln!("{family}: kv mixed: first-token logits max |diff| vs transformers = {m:e}");
        assert!(
            m.is_finite() && m < 1.0,
            "{family}: kv mixed: max |diff| {m}"
        );
        let exp = expected(family);
        assert!(exp["max_new_tokens"].as_u64().unwrap() >= 16, "{family}");
        let v = ask(family, &pkg, exp["image"].as_str().unwrap(), "mixed");
        assert_eq!(
            v["token_ids"].as_array().unwrap().len(),
            exp["max_new_tokens"].as_u64().unwrap() as usize,
            "{family}: kv mixed"
        );
    }
}

/// M-RoPE in a camera session: a long-running Qwen2.5-VL session whose position limit makes
/// every push evict the oldest frame and re-base, then answers exactly like a fresh session
/// that only saw the kept frames (their M-RoPE positions, (start, row, column) with the text
/// after each frame at start + 5 for the 3x5 grid, are the same in both).
#[test]
fn mrope_session_with_eviction_matches_a_fresh_prefill_of_the_kept_frames() {
    assert_session_with_eviction_matches_a_fresh_prefill("qwen2_5_vl");
}

/// Qwen3-VL in a camera session (interleaved M-RoPE on the 3x5 grid, DeepStack): every
/// re-base prefills the kept frames again from their stored embeddings *and* DeepStack
/// features, and the session then answers exactly like a fresh one that only saw the kept
/// frames.
#[test]
fn qwen3_vl_session_with_eviction_matches_a_fresh_prefill_of_the_kept_frames() {
    assert_session_with_eviction_matches_a_fresh_prefill("qwen3_vl");
}

/// Gemma 3 in a camera session (plain RoPE; each frame's tokens attend to each other both
/// ways, also when a re-base prefills the kept frames again): with eviction and re-basing it
/// answers like a fresh session of the kept frames.
#[test]
fn gemma3_session_with_eviction_matches_a_fresh_prefill_of_the_kept_frames() {
    assert_session_with_eviction_matches_a_fresh_prefill("gemma3");
}

fn assert_session_with_eviction_matches_a_fresh_prefill(family: &str) {
    let exp = expected(family);
    let q = exp["question"].as_str().unwrap().to_string();
    let pkg = fixture(family).join("pkg");
    let window = 2;
    let base = jetvlm_runtime::RuntimeConfig {
        kv_policy: Some("fp16".into()),
        max_new_tokens: 16,
        window_frames: window,
        ..jetvlm_runtime::RuntimeConfig::default()
    };
    let frames: Vec<jetvlm_camera::Frame> = (0..5u64)
        .map(|i| {
            let mut f = probe_frame(family);
            f.index = i;
            // Every frame differs: colours shifted by the index.
            f.rgb
                .iter_mut()
                .for_each(|v| *v = v.wrapping_add(37 * i as u8));
            f
        })
        .collect();

    let mut fresh_pipe = jetvlm_runtime::Pipeline::load(&pkg, base.clone()).unwrap();
    let mut fresh = fresh_pipe.session().unwrap();
    for f in &frames[frames.len() - window..] {
        fresh.push_frame(f).unwrap();
    }
    let want = fresh.ask(&q).unwrap().finish().unwrap().token_ids;
    assert_eq!(fresh.rebases(), 0);
    let prefix = fresh.prefix_tokens();
    drop(fresh);

    // Room for the prefix, one kept frame (M-RoPE: 5 positions, the longer side of its 3x5
    // grid; Gemma 3: one per token), the new frame's tokens, a question and its answer: every
    // push after the second re-bases.
    let tpf = jetvlm_vision::ModelPackage::load(&pkg)
        .unwrap()
        .manifest
        .vision
        .tokens_per_frame;
    let (want_tpf, ppf) = if family == "gemma3" {
        (16, 16)
    } else {
        (15, 5)
    };
    assert_eq!(tpf, want_tpf, "{family}");
    let decoder = jetvlm_decoder::Config::from_dir(&pkg.join("decoder")).unwrap();
    assert_eq!(
        jetvlm_decoder::arch::frame_positions(&decoder.model, tpf),
        ppf,
        "{family}"
    );
    let limit = prefix + ppf + tpf + 64 + base.max_new_tokens;
    let mut p = jetvlm_runtime::Pipeline::load(
        &pkg,
        jetvlm_runtime::RuntimeConfig {
            session_max_position: Some(limit),
            ..base
        },
    )
    .unwrap();
    let mut s = p.session().unwrap();
    let mut answers = Vec::new();
    for f in &frames {
        s.push_frame(f).unwrap();
        answers.push(s.ask(&q).unwrap().finish().unwrap().token_ids);
    }
    assert_eq!(s.rebases(), frames.len() as u64 - window as u64);
    assert_eq!(s.frames().len(), window);
    assert_eq!(answers.last().unwrap(), &want);
    // The frames matter: the answer about other frames differs.
    assert_ne!(answers[1], want);
    let got = s.ask(&q).unwrap().finish().unwrap().token_ids;
    assert_eq!(got, want);
}

/// M-RoPE on the device path: `--device sim` (the CUDA path's host logic with the kernels'
/// CPU twins; frame tokens rotate with `rope_mrope_f32` at (start, row, column), the text
/// after a frame at start + 5) gives transformers' greedy tokens on the Qwen2.5-VL package,
/// as the CPU does, with the FP16 and the mixed cache. The 3x5 grid is not square, so rows
/// and columns cannot be swapped unnoticed.
#[test]
fn mrope_on_the_device_path_gives_the_cpu_tokens() {
    assert_device_path_gives_transformers_tokens("qwen2_5_vl");
}

/// Qwen3-VL on the device path (`--device sim`): interleaved M-RoPE
/// (`rope_mrope_interleaved_f32`), DeepStack features added after the first decoder layers,
/// q/k norms: transformers' greedy tokens with the FP16 cache, the CPU's with the mixed one.
#[test]
fn qwen3_vl_on_the_device_path_gives_transformers_tokens() {
    assert_device_path_gives_transformers_tokens("qwen3_vl");
}

/// Gemma 3 on the device path (`--device sim`): GeGLU, (1 + w) norms, q/k norms, scaled
/// embeddings, local and global layers, the image's tokens attending both ways:
/// transformers' greedy tokens with the FP16 cache, the CPU's with the mixed one.
#[test]
fn gemma3_on_the_device_path_gives_transformers_tokens() {
    assert_device_path_gives_transformers_tokens("gemma3");
}

/// `ask --device sim` on `family`'s package: transformers' greedy tokens with the FP16 cache,
/// and the CPU decoder's tokens with the mixed cache.
fn assert_device_path_gives_transformers_tokens(family: &str) {
    let exp = expected(family);
    let ask_on = |device: &str, kv: &str| -> serde_json::Value {
        let out = jetvlm()
            .arg("ask")
            .arg("--model")
            .arg(fixture(family).join("pkg"))
            .arg("--image")
            .arg(fixture(family).join(exp["image"].as_str().unwrap()))
            .arg(exp["question"].as_str().unwrap())
            .args(["--max-tokens", &exp["max_new_tokens"].to_string()])
            .args(["--json", "--kv", kv, "--device", device])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{device} {kv}: {err}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let sim = ask_on("sim", "fp16");
    assert!(
        sim["decoder_device"].as_str().unwrap().starts_with("sim"),
        "{sim}"
    );
    assert_eq!(
        sim["token_ids"], exp["greedy_tokens"],
        "{family}: sim, kv fp16"
    );
    let cpu = ask_on("cpu", "mixed");
    assert_eq!(
        ask_on("sim", "mixed")["token_ids"],
        cpu["token_ids"],
        "{family}: kv mixed"
    );
}

/// A device camera session on Qwen2.5-VL (the simulated device): pushing frames past the
/// window evicts the oldest and re-bases the M-RoPE positions, and the answer equals a fresh
/// device session's over the kept frames and the CPU session's.
#[test]
fn mrope_device_session_with_eviction_matches_a_fresh_prefill_and_the_cpu() {
    assert_device_session_with_eviction("qwen2_5_vl");
}

/// The same on Qwen3-VL: interleaved M-RoPE positions re-based, each kept frame's DeepStack
/// features re-run with it.
#[test]
fn qwen3_vl_device_session_with_eviction_matches_a_fresh_prefill_and_the_cpu() {
    assert_device_session_with_eviction("qwen3_vl");
}

/// A device camera session on `family` (a 3x5 M-RoPE frame grid, 15 tokens a frame) with
/// eviction and re-basing against a fresh device session over the kept frames and the CPU's.
fn assert_device_session_with_eviction(family: &str) {
    let exp = expected(family);
    let q = exp["question"].as_str().unwrap().to_string();
    let pkg = fixture(family).join("pkg");
    let window = 2;
    let config = |device| jetvlm_runtime::RuntimeConfig {
        kv_policy: Some("fp16".into()),
        max_new_tokens: 16,
        window_frames: window,
        device,
        ..jetvlm_runtime::RuntimeConfig::default()
    };
    let frames: Vec<jetvlm_camera::Frame> = (0..4u64)
        .map(|i| {
            let mut f = probe_frame(family);
            f.index = i;
            f.rgb
                .iter_mut()
                .for_each(|v| *v = v.wrapping_add(37 * i as u8));
            f
        })
        .collect();
    let fresh = |device| {
        let mut pipe = jetvlm_runtime::Pipeline::load(&pkg, config(device)).unwrap();
        let mut s = pipe.session().unwrap();
        for f in &frames[frames.len() - window..] {
            s.push_frame(f).unwrap();
        }
        (
            s.ask(&q).unwrap().finish().unwrap().token_ids,
            s.prefix_tokens(),
        )
    };
    let (want, prefix) = fresh(jetvlm_core::Device::Cpu);
    assert_eq!(fresh(jetvlm_core::Device::Sim).0, want);
    // Room for one kept frame (5 positions), the new frame and a question: every push after
    // the second re-bases.
    let limit = prefix + 5 + 15 + 64 + 16;
    let mut p = jetvlm_runtime::Pipeline::load(
        &pkg,
        jetvlm_runtime::RuntimeConfig {
            session_max_position: Some(limit),
            ..config(jetvlm_core::Device::Sim)
        },
    )
    .unwrap();
    let mut s = p.session().unwrap();
    for f in &frames {
        s.push_frame(f).unwrap();
        s.ask(&q).unwrap().finish().unwrap();
    }
    assert_eq!(s.rebases(), frames.len() as u64 - window as u64);
    assert_eq!(s.ask(&q).unwrap().finish().unwrap().token_ids, want);
}

/// Gemma 3's package with its decoder's `sliding_window` set to 8 (the prompt is 51
/// tokens): with the exact f32 cache the first-token logits are transformers' for that window
/// (the local layer's window composed with the image's bidirectional block; they differ from
/// the full-context logits by far more than the bound), and the mixed cache runs it too.
#[test]
fn gemma3_sliding_window_matches_transformers() {
    let family = "gemma3";
    let exp = expected(family);
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    let src = fixture(family).join("pkg");
    for sub in ["", "decoder"] {
        std::fs::create_dir_all(pkg.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), pkg.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    let cfg_path = pkg.join("decoder/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(8);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let logits = |key: &str| -> Vec<f32> {
        exp[key]
            .as_array()
            .unwrap_or_else(|| panic!("expected.json has no {key}"))
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (want, full) = (
        logits("sliding_window_8_first_token_logits"),
        logits("first_token_logits"),
    );
    let moved = max_diff(&want, &full);
    eprintln!("gemma3: sliding window 8 moves transformers' first-token logits by {moved:e}");
    assert!(moved > 1.0, "the window changes the logits");
    let run = |kv: &str| {
        let cfg = jetvlm_runtime::RuntimeConfig {
            kv_policy: Some(kv.to_string()),
            max_new_tokens: 1,
            ..jetvlm_runtime::RuntimeConfig::default()
        };
        let mut p = jetvlm_runtime::Pipeline::load(&pkg, cfg).unwrap();
        p.first_token_logits(&[probe_frame(family)], exp["question"].as_str().unwrap())
    };
    let got = run("f32").unwrap();
    let d = max_diff(&got, &want);
    eprintln!(
        "gemma3: sliding window 8, kv f32: first-token logits max |diff| vs transformers = {d:e}"
    );
    assert!(d < 1e-4, "max |diff| {d}");
    // The mixed cache skips the keys before the window too (INT4 frames: a bound that
    // catches a broken mask, not a fidelity claim for random weights).
    let m = max_diff(&run("mixed").unwrap(), &want);
    eprintln!("gemma3: sliding window 8, kv mixed: first-token logits max |diff| = {m:e}");
    assert!(m.is_finite() && m < 1.0, "kv mixed: max |diff| {m}");
}

/// The values of a nested JSON array of numbers, flattened row-major.
fn flat_f32(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat_f32).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

/// The committed encoders, run by jetvlm's ONNX Runtime encoder on the probe with the
/// manifest's preprocessing, give transformers' `get_image_features` on the processor's pixel
/// values (and for Qwen3-VL its DeepStack features) within 1e-4: the exporter's encoder check,
/// without torch (for the families whose expected.json records the features).
#[test]
fn committed_encoders_match_transformers_image_features() {
    let mut checked = Vec::new();
    for family in FAMILIES {
        let exp = expected(family);
        let Some(want) = exp.get("image_features") else {
            continue;
        };
        let pkg = jetvlm_vision::ModelPackage::load(&fixture(family).join("pkg")).unwrap();
        let mut enc = jetvlm_vision::OrtEncoder::from_package(&pkg, &Default::default()).unwrap();
        let frame = probe_frame(family);
        let view = jetvlm_vision::ImageView::new(frame.width, frame.height, &frame.rgb).unwrap();
        let got = jetvlm_vision::VisionEncoder::encode(&mut enc, &view).unwrap();
        let diff = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len(), "{family}");
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let d = diff(&got.data, &flat_f32(want));
        eprintln!("{family}: encoder vs transformers' image features: max |diff| = {d:e}");
        assert!(d < 1e-4, "{family}: {d}");
        match exp.get("deepstack_features") {
            Some(deep) => {
                let d = diff(&got.deepstack, &flat_f32(deep));
                eprintln!("{family}: DeepStack features vs transformers': max |diff| = {d:e}");
                assert!(d < 1e-4, "{family}: {d}");
            }
            None => assert!(got.deepstack.is_empty(), "{family}"),
        }
        checked.push(family);
    }
    assert!(checked.contains(&"qwen3_vl"), "{checked:?}");
}

/// A copy of `family`'s exported package in `dir/pkg`, its decoder config.json and manifest
/// edited.
fn edited_package(
    dir: &Path,
    family: &str,
    config: impl FnOnce(&mut serde_json::Value),
    manifest: impl FnOnce(String) -> String,
) -> PathBuf {
    let src = fixture(family).join("pkg");
    let dst = dir.join("pkg");
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
    config(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let yaml = std::fs::read_to_string(dst.join("jetvlm.yaml")).unwrap();
    std::fs::write(dst.join("jetvlm.yaml"), manifest(yaml)).unwrap();
    dst
}

/// Qwen3-VL's two departures from Qwen2.5-VL both matter on the fixture: the same package
/// without DeepStack (no deepstack_layers, no deepstack_output), or with M-RoPE's contiguous
/// sections instead of interleaved ones, is far from transformers' first-token logits, while
/// the package as exported is within 1e-4 (first_token_logits_match_transformers).
#[test]
fn qwen3_vl_deepstack_and_interleaved_mrope_change_the_logits() {
    let family = "qwen3_vl";
    let tmp = tempfile::tempdir().unwrap();
    let no_deepstack = edited_package(
        &tmp.path().join("a"),
        family,
        |c| c["deepstack_layers"] = 0.into(),
        |m| m.replace("  deepstack_output: deepstack_embeds\n", ""),
    );
    let d = first_token_logits_diff(family, &no_deepstack, "f32");
    eprintln!("{family} without DeepStack: first-token logits max |diff| = {d:e}");
    assert!(d > 1e-2, "{d}");
    let contiguous = edited_package(
        &tmp.path().join("b"),
        family,
        |c| c["rope_parameters"]["mrope_interleaved"] = false.into(),
        |m| m,
    );
    let d = first_token_logits_diff(family, &contiguous, "f32");
    eprintln!("{family} with contiguous M-RoPE sections: first-token logits max |diff| = {d:e}");
    assert!(d > 1e-3, "{d}");
}

/// The q/k head norms are part of the one decoder definition, so the device path runs them:
/// the Qwen3-VL package's Qwen3 language model with plain RoPE and without DeepStack (the q/k
/// norms alone) gives the same greedy tokens on the simulated device (`--device sim`, the
/// CUDA path's host logic over its kernels' CPU twins) as on the CPU decoder.
#[test]
fn qwen3_qk_norms_run_alike_on_the_simulated_device_and_the_cpu() {
    let family = "qwen3_vl";
    let exp = expected(family);
    let tmp = tempfile::tempdir().unwrap();
    let plain = edited_package(
        tmp.path(),
        family,
        |c| {
            let o = c.as_object_mut().unwrap();
            o.remove("mrope_frame_grid");
            o.insert("deepstack_layers".into(), 0.into());
            let rope = o["rope_parameters"].as_object_mut().unwrap();
            rope.remove("mrope_section");
            rope.remove("mrope_interleaved");
        },
        |m| m.replace("  deepstack_output: deepstack_embeds\n", ""),
    );
    let run = |device: &str| {
        let out = jetvlm()
            .arg("ask")
            .arg("--model")
            .arg(&plain)
            .arg("--image")
            .arg(fixture(family).join(exp["image"].as_str().unwrap()))
            .arg(exp["question"].as_str().unwrap())
            .args(["--max-tokens", "16", "--json", "--kv", "fp16"])
            .args(["--device", device])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token_ids"].clone()
    };
    let cpu = run("cpu");
    assert_eq!(cpu.as_array().unwrap().len(), 16);
    assert_eq!(run("sim"), cpu);
}

/// A DeepStack package whose manifest does not name the encoder's DeepStack output, or names
/// one the decoder does not take, is refused at load naming `vision.deepstack_output`; a
/// frame without its DeepStack features is refused by the decoder naming deepstack_layers
/// (never run without them).
#[test]
fn qwen3_vl_deepstack_without_its_features_is_refused() {
    let family = "qwen3_vl";
    let tmp = tempfile::tempdir().unwrap();
    let unnamed = edited_package(
        &tmp.path().join("a"),
        family,
        |_| {},
        |m| m.replace("  deepstack_output: deepstack_embeds\n", ""),
    );
    let e = jetvlm_vision::ModelPackage::load(&unnamed)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vision.deepstack_output") && e.contains("missing"),
        "{e}"
    );
    let unwanted = edited_package(
        &tmp.path().join("b"),
        family,
        |c| c["deepstack_layers"] = 0.into(),
        |m| m,
    );
    let e = jetvlm_vision::ModelPackage::load(&unwanted)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vision.deepstack_output"), "{e}");
    let wrong = edited_package(
        &tmp.path().join("c"),
        family,
        |_| {},
        |m| {
            m.replace(
                "deepstack_output: deepstack_embeds",
                "deepstack_output: image_embeds",
            )
        },
    );
    let e = jetvlm_vision::ModelPackage::load(&wrong)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vision.deepstack_output") && e.contains("[batch, 2, 15, 64]"),
        "{e}"
    );

    let dir = fixture(family).join("pkg/decoder");
    let model = jetvlm_decoder::Model::load(&dir, &Default::default()).unwrap();
    let (n, h) = (15, model.hidden_size());
    let frame = vec![0.1f32; n * h];
    let mut cache = jetvlm_decoder::F32KvCache::new(model.cache_shape(), 64);
    let e = model
        .forward(&[jetvlm_decoder::Input::frame(&frame, n, 0)], &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("deepstack_layers 2"), "{e}");
    let short = vec![0.1f32; n * h];
    let e = model
        .forward(
            &[jetvlm_decoder::Input::frame(&frame, n, 0).with_deepstack(&short)],
            &mut cache,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("DeepStack"), "{e}");
    let full = vec![0.1f32; 2 * n * h];
    model
        .forward(
            &[jetvlm_decoder::Input::frame(&frame, n, 0).with_deepstack(&full)],
            &mut cache,
        )
        .unwrap();
}

/// Whether the project venv can run the exporter; prints why not.
fn exporter_available(test: &str) -> bool {
    let python = root().join(".venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "skipping {test}: {} lacks torch/transformers (.ci/setup --dev installs them)",
            python.display()
        );
    }
    ok
}

fn export(hf: &Path, out: &Path, extra: &[&str]) -> Output {
    jetvlm()
        .arg("export")
        .arg(hf)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Manifest lines without comments (the comment records the measured ONNX difference).
fn manifest_body(pkg: &Path) -> Vec<String> {
    std::fs::read_to_string(pkg.join("jetvlm.yaml"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn export_again_gives_the_committed_package_and_answer() {
    if !exporter_available("export_again_gives_the_committed_package_and_answer") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let out = tmp.path().join(family);
        let exp = expected(family);
        let name = format!("tiny-random-{family}");
        let question = exp["question"].as_str().unwrap();
        let mut args = vec!["--name", &name, "--question", question];
        if let Some(extra) = exp.get("export_args").and_then(|a| a.as_array()) {
            args.extend(extra.iter().map(|a| a.as_str().unwrap()));
        }
        let res = export(&fixture(family).join("hf"), &out, &args);
        let stdout = String::from_utf8_lossy(&res.stdout);
        assert!(
            res.status.success(),
            "{family}: {stdout}\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        // It reports the encoder check with its difference, under the fp32 bound.
        let line = stdout
            .lines()
            .find(|l| l.contains("vision.onnx (ONNX Runtime) vs PyTorch"))
            .unwrap_or_else(|| panic!("{family}: no encoder check in {stdout}"));
        let diff: f64 = line
            .split("max abs diff ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(diff < 1e-4, "{family}: {line}");
        // DeepStack families check their second output too.
        let deep = stdout
            .lines()
            .find(|l| l.contains("deepstack_embeds (ONNX Runtime) vs PyTorch"));
        assert_eq!(deep.is_some(), family == "qwen3_vl", "{family}: {stdout}");
        if let Some(line) = deep {
            let d: f64 = line
                .split("max abs diff ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("{line}"));
            assert!(d < 1e-4, "{family}: {line}");
        }
        assert_eq!(
            manifest_body(&out),
            manifest_body(&fixture(family).join("pkg")),
            "{family}: the manifest differs from the committed one"
        );
        assert_matches_transformers(family, &out);
    }
}

#[test]
fn export_fp16_encoder_stays_close() {
    if !exporter_available("export_fp16_encoder_stays_close") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let res = export(
        &fixture("llava").join("hf"),
        &out,
        &["--dtype", "fp16", "--question", "q"],
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        stdout.contains("exporting the vision encoder (fp16"),
        "{stdout}"
    );
    // The package loads and answers (fp16 rounding may change a token of a random model).
    let v = ask("llava", &out, "probe.png", "fp16");
    assert_eq!(
        v["token_ids"].as_array().unwrap().len(),
        expected("llava")["max_new_tokens"].as_u64().unwrap() as usize
    );
}

/// A copy of the llava checkpoint with config.json edited by `edit`.
fn edited_checkpoint(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixture("llava").join("hf");
    let dst = dir.join("hf");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

#[test]
fn export_reads_a_hub_style_config_with_defaults_left_out() {
    if !exporter_available("export_reads_a_hub_style_config_with_defaults_left_out") {
        return;
    }
    // Hub configs (e.g. llava-1.5-7b-hf) keep only the text config fields that differ from
    // the defaults; the decoder's config.json must still be complete.
    let tmp = tempfile::tempdir().unwrap();
    let hf = edited_checkpoint(tmp.path(), |c| {
        let text = c["text_config"].as_object_mut().unwrap();
        for key in [
            "head_dim",
            "hidden_act",
            "rope_parameters",
            "attention_bias",
            "mlp_bias",
            "tie_word_embeddings",
            "use_cache",
        ] {
            assert!(text.remove(key).is_some(), "{key}");
        }
    });
    let out = tmp.path().join("pkg");
    let question = expected("llava")["question"].as_str().unwrap().to_string();
    let res = export(&hf, &out, &["--question", &question]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("decoder/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["head_dim"], 32);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_matches_transformers("llava", &out);
}

/// The one error line, the exit status 2, and nothing left beside --out.
fn assert_refused(res: &Output, dir: &Path, out: &Path, needle: &str) {
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{err}");
    assert!(!out.exists(), "a refused export left {}", out.display());
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("export"))
        .collect();
    assert!(left.is_empty(), "temporary output left behind: {left:?}");
}

/// Gemma 3's projector pools the patch grid it was trained on: another `--frame-size` is
/// refused with one line, nothing written.
#[test]
fn gemma3_export_refuses_another_frame_size() {
    if !exporter_available("gemma3_export_refuses_another_frame_size") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let res = export(&fixture("gemma3").join("hf"), &out, &["--frame-size", "32"]);
    assert_refused(&res, tmp.path(), &out, "--frame-size 32");
}

#[test]
fn export_refuses_unsupported_families_and_options() {
    if !exporter_available("export_refuses_unsupported_families_and_options") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hf = edited_checkpoint(tmp.path(), |c| c["model_type"] = "qwen2_vl".into());
    let out = tmp.path().join("pkg");
    let res = export(&hf, &out, &[]);
    assert_refused(
        &res,
        tmp.path(),
        &out,
        "model_type `qwen2_vl` is not supported",
    );

    let tmp = tempfile::tempdir().unwrap();
    let hf = edited_checkpoint(tmp.path(), |_| {});
    let out = tmp.path().join("pkg");
    let res = export(&hf, &out, &["--frame-size", "30"]);
    assert_refused(&res, tmp.path(), &out, "not a multiple of the patch size 8");

    // An existing non-empty --out is kept unless --force.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let res = export(&hf, &out, &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(out.join("keep").is_file());
}

/// A copy of `family`'s checkpoint in `dir/hf`.
fn copied_checkpoint(dir: &Path, family: &str) -> PathBuf {
    let src = fixture(family).join("hf");
    let dst = dir.join("hf");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn export_refuses_bad_input_with_one_line() {
    if !exporter_available("export_refuses_bad_input_with_one_line") {
        return;
    }
    // A directory that is not a checkpoint at all.
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = tmp.path().join("pkg");
    let res = export(&empty, &out, &[]);
    assert_refused(&res, tmp.path(), &out, "config.json does not exist");

    // A plain language model, not a VLM.
    let tmp = tempfile::tempdir().unwrap();
    let llm = tmp.path().join("llm");
    std::fs::create_dir(&llm).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("internvl").join("pkg/decoder/config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(llm.join("config.json"), cfg.to_string()).unwrap();
    let out = tmp.path().join("pkg");
    let res = export(&llm, &out, &[]);
    assert_refused(
        &res,
        tmp.path(),
        &out,
        "model_type `qwen2` is not supported",
    );

    // A checkpoint without its processor file.
    let tmp = tempfile::tempdir().unwrap();
    let hf = copied_checkpoint(tmp.path(), "internvl");
    std::fs::remove_file(hf.join("processor_config.json")).unwrap();
    let out = tmp.path().join("pkg");
    let res = export(&hf, &out, &[]);
    assert_refused(&res, tmp.path(), &out, "processor_config.json");

    // A truncated and a garbage safetensors file.
    for (what, cut) in [("truncated", true), ("garbage", false)] {
        let tmp = tempfile::tempdir().unwrap();
        let hf = copied_checkpoint(tmp.path(), "internvl");
        let st = hf.join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        let bad = if cut {
            bytes[..bytes.len() / 2].to_vec()
        } else {
            vec![0xff; 64]
        };
        std::fs::write(&st, bad).unwrap();
        let out = tmp.path().join("pkg");
        let res = export(&hf, &out, &[]);
        assert_refused(&res, tmp.path(), &out, "is not a readable safetensors file");
        eprintln!("{what}: {}", String::from_utf8_lossy(&res.stderr).trim());
    }

    // An option the family cannot take: an InternVL frame that the pixel shuffle cannot split.
    let tmp = tempfile::tempdir().unwrap();
    let hf = copied_checkpoint(tmp.path(), "internvl");
    let out = tmp.path().join("pkg");
    let res = export(&hf, &out, &["--frame-size", "72"]);
    assert_refused(
        &res,
        tmp.path(),
        &out,
        "not a multiple of patch size x pixel shuffle (16)",
    );
}

#[test]
fn export_without_torch_says_how_to_install_it() {
    let tmp = tempfile::tempdir().unwrap();
    // A Python that cannot import torch.
    let python = tmp.path().join("python");
    std::fs::write(&python, "#!/bin/sh\nexit 1\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = tmp.path().join("pkg");
    let res = jetvlm()
        .arg("export")
        .arg(fixture("llava").join("hf"))
        .arg("--out")
        .arg(&out)
        .arg("--python")
        .arg(&python)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("lacks torch/transformers") && err.contains(".ci/setup --dev"),
        "{err}"
    );
    assert!(!out.exists());
}
