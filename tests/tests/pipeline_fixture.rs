//! The multimodal pipeline on the tiny random LLaVA fixture (tests/fixtures/vlm, generated
//! with transformers by tests/fixtures/make_vlm_fixture.py): prompt assembly, first-token
//! logits and greedy tokens against transformers' LlavaForConditionalGeneration, and the
//! streaming session's bounded window.

use jetvlm_camera::Frame;
use jetvlm_runtime::{Pipeline, RuntimeConfig, RuntimeError};
use jetvlm_vision::RgbImage;
use std::path::PathBuf;
use std::time::Duration;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vlm")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn frame(index: u64) -> Frame {
    let img = RgbImage::open(&fixture().join("image.png")).unwrap();
    Frame {
        index,
        timestamp: Duration::from_millis(100 * index),
        width: img.width,
        height: img.height,
        rgb: img.data,
    }
}

/// A second, different frame (colours inverted).
fn other_frame(index: u64) -> Frame {
    let mut f = frame(index);
    f.rgb.iter_mut().for_each(|v| *v = 255 - *v);
    f
}

fn pipeline(kv: &str) -> Pipeline {
    let cfg = RuntimeConfig {
        kv_policy: Some(kv.to_string()),
        max_new_tokens: 8,
        ..RuntimeConfig::default()
    };
    Pipeline::load(&fixture(), cfg).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn prompt_ids_match_the_reference_layout() {
    let exp = expected();
    let p = pipeline("fp16");
    let ids = p
        .prompt_ids(
            1,
            exp["question"].as_str().unwrap(),
            exp["image_token_id"].as_u64().unwrap() as u32,
        )
        .unwrap();
    assert_eq!(ids, u32s(&exp["prompt_ids"]));
}

/// Bounds (logits are of magnitude ~1-10): with the exact f32 cache only float summation
/// order differs from PyTorch, max |diff| < 1e-4 (measured 5.8e-6); the FP16 cache adds K/V
/// rounding (relative 2^-11 per element), max |diff| < 2e-2 (measured 3.2e-3).
#[test]
fn first_token_logits_match_transformers() {
    let exp = expected();
    let want: Vec<f32> = exp["first_token_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let q = exp["question"].as_str().unwrap();
    for (kv, bound) in [("f32", 1e-4f32), ("fp16", 2e-2)] {
        let mut p = pipeline(kv);
        let got = p.first_token_logits(&[frame(0)], q).unwrap();
        let d = max_abs_diff(&got, &want);
        eprintln!("kv {kv}: first-token logits max |diff| = {d:e}");
        assert!(d < bound, "kv {kv}: max |diff| {d} >= {bound}");
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    let exp = expected();
    let want = u32s(&exp["greedy_tokens"]);
    let q = exp["question"].as_str().unwrap();
    for kv in ["f32", "fp16"] {
        let mut p = pipeline(kv);
        let answer = p.ask(&[frame(0)], q).unwrap().finish().unwrap();
        assert_eq!(answer.token_ids, want, "kv {kv}");
        let s = &answer.stats;
        assert_eq!(s.tokens, want.len());
        assert_eq!(s.frames, 1);
        assert_eq!(s.prompt_tokens, u32s(&exp["prompt_ids"]).len());
        assert_eq!(s.execution_provider, "cpu");
        assert_eq!(s.kv_policy, kv);
        assert!(s.ttft_ms >= s.prefill_ms && s.prefill_ms > 0.0 && s.encoder_ms > 0.0);
        assert_eq!(s.kv.frame_tokens, 16);
        // Everything cached: the prompt and all generated tokens but the last.
        assert_eq!(
            s.kv.text_tokens + s.kv.frame_tokens,
            s.prompt_tokens + want.len() - 1
        );
        if kv == "fp16" {
            assert_eq!(s.kv.total_bytes, s.kv.fp16_bytes);
        }
    }
}

#[test]
fn streaming_answer_equals_collected_answer() {
    let exp = expected();
    let q = exp["question"].as_str().unwrap();
    let mut p = pipeline("fp16");
    let mut stream = p.ask(&[frame(0)], q).unwrap();
    let mut ids = Vec::new();
    for t in stream.by_ref() {
        ids.push(t.unwrap().id);
    }
    let stats = stream.stats();
    assert_eq!(ids, u32s(&exp["greedy_tokens"]));
    assert_eq!(stats.tokens, ids.len());
}

#[test]
fn mixed_policy_quantizes_frame_tokens() {
    let exp = expected();
    let q = exp["question"].as_str().unwrap();
    let mut p = pipeline("mixed:group=32");
    let a = p
        .ask(&[frame(0), other_frame(1)], q)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(a.stats.frames, 2);
    assert_eq!(a.stats.kv.frame_tokens, 32);
    assert!(a.stats.kv.quant_bytes > 0);
    // The frame tokens left the FP16 pool: only text remains there.
    let mut f = pipeline("fp16");
    let b = f
        .ask(&[frame(0), other_frame(1)], q)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(b.stats.kv.quant_bytes, 0);
    assert!(a.stats.kv.fp16_bytes < b.stats.kv.fp16_bytes);
    assert_eq!(
        a.stats.kv.fp16_equivalent_bytes,
        b.stats.kv.fp16_equivalent_bytes
    );
}

#[test]
fn session_window_is_bounded_and_questions_reuse_frames() {
    let exp = expected();
    let q = exp["question"].as_str().unwrap();
    let want = u32s(&exp["greedy_tokens"]);
    let cfg = RuntimeConfig {
        kv_policy: Some("fp16".into()),
        max_new_tokens: 8,
        window_frames: 2,
        ..RuntimeConfig::default()
    };
    let mut p = Pipeline::load(&fixture(), cfg).unwrap();

    // One frame then the question: the same context as `ask`, so the same greedy answer.
    let mut s = p.session().unwrap();
    s.push_frame(&frame(0)).unwrap();
    let first = s.ask(q).unwrap().finish().unwrap();
    assert_eq!(first.token_ids, want);
    // Asking again reuses the cached frame (rolled back answer, same context, same tokens).
    let again = s.ask(q).unwrap().finish().unwrap();
    assert_eq!(again.token_ids, want);

    // Many frames: the window holds the last two; tokens and bytes stop growing.
    let mut sizes = Vec::new();
    for i in 1..8 {
        let f = if i % 2 == 0 { frame(i) } else { other_frame(i) };
        s.push_frame(&f).unwrap();
        let frames = s.frames();
        assert!(frames.len() <= 2);
        assert_eq!(frames.last().unwrap().index, i);
        sizes.push((
            s.cached_tokens(),
            s.kv_memory().frame_tokens,
            s.kv_memory().total_bytes,
        ));
        let a = s.ask(q).unwrap().finish().unwrap();
        assert_eq!(a.stats.frames, frames.len());
    }
    let prefix = s.prefix_tokens();
    for &(tokens, frame_tokens, bytes) in &sizes[1..] {
        assert_eq!(frame_tokens, 32);
        assert_eq!(tokens, prefix + 32);
        assert_eq!(
            bytes, sizes[1].2,
            "KV bytes grow with a full window: {sizes:?}"
        );
    }
}

/// A bad policy in the runtime config (what `--kv` sets) is the config's error, naming its
/// field, not a problem of the package's jetvlm.yaml.
#[test]
fn a_bad_config_kv_policy_names_the_config_field_not_the_package() {
    let cfg = RuntimeConfig {
        kv_policy: Some("int5-sometimes".into()),
        ..RuntimeConfig::default()
    };
    match Pipeline::load(&fixture(), cfg) {
        Err(RuntimeError::Config(e)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("kv_policy")
                    && msg.contains("int5-sometimes")
                    && !msg.contains("jetvlm.yaml"),
                "{msg}"
            );
        }
        other => panic!("expected a runtime config error, got {other:?}"),
    }
}

#[test]
fn session_runs_from_a_camera_source_with_bounded_memory() {
    let cfg = RuntimeConfig {
        kv_policy: Some("mixed:group=32".into()),
        max_new_tokens: 4,
        window_frames: 3,
        ..RuntimeConfig::default()
    };
    let mut p = Pipeline::load(&fixture(), cfg).unwrap();
    let mut cam =
        jetvlm_camera::open("synthetic://scene?fps=10&seed=3&width=64&height=48&frames=12&pace=0")
            .unwrap();
    let mut s = p.session().unwrap();
    let mut pushed = 0;
    let mut bytes = Vec::new();
    loop {
        match s
            .capture_from(cam.as_mut(), Duration::from_millis(100))
            .unwrap()
        {
            jetvlm_runtime::SessionCapture::Frame(_) => pushed += 1,
            jetvlm_runtime::SessionCapture::EndOfStream => break,
            jetvlm_runtime::SessionCapture::Timeout => continue,
        }
        assert!(s.frames().len() <= 3);
        bytes.push(s.kv_memory().total_bytes);
        if pushed % 4 == 0 {
            let a = s
                .ask("how many objects are there?")
                .unwrap()
                .finish()
                .unwrap();
            assert!(a.stats.tokens >= 1 && a.stats.tokens <= 4);
            assert_eq!(a.stats.frames, 3);
        }
    }
    assert_eq!(pushed, 12);
    assert!(bytes[3..].iter().all(|&b| b == bytes[2]), "{bytes:?}");
    assert_eq!(s.frames().last().unwrap().index, 11);
}

#[test]
fn session_rebases_positions_and_then_matches_a_fresh_session() {
    let q = expected()["question"].as_str().unwrap().to_string();
    let window = 2;
    let base = RuntimeConfig {
        kv_policy: Some("fp16".into()),
        max_new_tokens: 8,
        window_frames: window,
        ..RuntimeConfig::default()
    };
    let frames: Vec<Frame> = (0..6)
        .map(|i| if i % 2 == 0 { frame(i) } else { other_frame(i) })
        .collect();

    // A fresh session that only ever saw the last two frames.
    let mut fresh_pipe = Pipeline::load(&fixture(), base.clone()).unwrap();
    let mut fresh = fresh_pipe.session().unwrap();
    for f in &frames[frames.len() - window..] {
        fresh.push_frame(f).unwrap();
    }
    let want = fresh.ask(&q).unwrap().finish().unwrap().token_ids;
    assert_eq!(fresh.rebases(), 0);
    let prefix = fresh.prefix_tokens();
    drop(fresh);

    // A long-running session whose position limit leaves room for one kept frame, the new
    // frame and a question: every push after the second one has to re-base.
    let tpf = 16;
    let limit = prefix + tpf + tpf + 64 + base.max_new_tokens;
    let mut p = Pipeline::load(
        &fixture(),
        RuntimeConfig {
            session_max_position: Some(limit),
            ..base
        },
    )
    .unwrap();
    let mut s = p.session().unwrap();
    assert_eq!(s.max_position(), limit);
    for f in &frames {
        s.push_frame(f).unwrap();
        s.ask(&q).unwrap().finish().unwrap();
    }
    assert_eq!(s.rebases(), frames.len() as u64 - window as u64);
    assert_eq!(s.frames().len(), window);
    // Right after a re-base the cache holds exactly what the fresh session holds, at the
    // same positions, so the answer is the same.
    let got = s.ask(&q).unwrap().finish().unwrap().token_ids;
    assert_eq!(got, want);
}

#[test]
fn a_config_built_in_code_is_validated_like_a_file() {
    for (cfg, field) in [
        (
            RuntimeConfig {
                max_new_tokens: 0,
                ..RuntimeConfig::default()
            },
            "max_new_tokens",
        ),
        (
            RuntimeConfig {
                window_frames: 0,
                ..RuntimeConfig::default()
            },
            "window_frames",
        ),
    ] {
        let err = Pipeline::load(&fixture(), cfg).unwrap_err().to_string();
        assert!(
            err.contains(field) && err.contains("<runtime config>"),
            "{err}"
        );
    }
}
