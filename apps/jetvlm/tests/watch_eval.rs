//! `jetvlm watch` and `jetvlm eval` on the bundled demo model, through the built binary.

use std::process::Command;

fn jetvlm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_jetvlm"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run jetvlm")
}

#[test]
fn watch_keeps_a_bounded_window_and_reports_every_frame() {
    let out = jetvlm(&[
        "watch",
        "synthetic://scene?seed=3&pace=0",
        "--frames",
        "6",
        "--window",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    // The last line sums the run up.
    let summary = lines.pop().expect("a summary line");
    assert_eq!(summary["summary"], true, "{summary}");
    assert_eq!(summary["frames"].as_u64(), Some(6), "{summary}");
    assert_eq!(summary["answers_judged"].as_u64(), Some(6), "{summary}");
    assert_eq!(summary["position_rebases"].as_u64(), Some(0), "{summary}");
    assert_eq!(lines.len(), 6);
    // `encoder_ms` is this frame's; `window_encoder_ms` adds up the cached frames'.
    for l in &lines[1..] {
        let (frame, window) = (
            l["encoder_ms"].as_f64().unwrap_or(-1.0),
            l["window_encoder_ms"].as_f64().unwrap_or(-1.0),
        );
        assert!(frame > 0.0 && window > frame, "{l}");
    }
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            l["frames_cached"].as_u64(),
            Some((i as u64 + 1).min(2)),
            "{l}"
        );
        assert!(!l["answer"].as_str().unwrap_or("").is_empty(), "{l}");
        assert_eq!(l["decoder_device"], "cpu", "{l}");
        assert_eq!(l["execution_provider"], "cpu", "{l}");
        assert!(l["ttft_ms"].as_f64().unwrap_or(-1.0) >= 0.0);
    }
    // The synthetic camera knows the answer to the default question; the bundled model,
    // with several frames cached, answers about the latest one.
    let right = lines
        .iter()
        .filter(|l| l["truth"].is_string() && l["truth"] == l["answer"])
        .count();
    assert!(
        right >= 5,
        "{right} of 6 answers match the ground truth: {lines:?}"
    );
    assert_eq!(
        summary["answers_right"].as_u64(),
        Some(right as u64),
        "{summary}"
    );
    // Once the window is full the cache stops growing: the oldest frame is evicted.
    let kv: Vec<u64> = lines
        .iter()
        .map(|l| l["kv_bytes"].as_u64().unwrap_or(0))
        .collect();
    assert!(kv[2..].iter().all(|&b| b == kv[1]), "{kv:?}");
    // The package's mixed policy stores these tokens in fewer bytes than exact FP16.
    let last = &lines[5];
    assert!(
        last["kv_bytes"].as_u64() < last["kv_fp16_equivalent_bytes"].as_u64(),
        "{last}"
    );
}

#[test]
fn watch_names_a_bad_source() {
    let out = jetvlm(&["watch", "rtsp://camera/stream", "--frames", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rtsp://camera/stream"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn eval_of_a_policy_against_itself_changes_nothing() {
    let out = jetvlm(&[
        "eval",
        "--count",
        "3",
        "--policies",
        "fp16",
        "fp16",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = doc["policies"].as_array().expect("policies");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["changed_vs_reference"].as_u64(), Some(0));
    assert!(
        rows[1]["mean_kl_vs_reference"]
            .as_f64()
            .unwrap_or(1.0)
            .abs()
            < 1e-9
    );
    assert_eq!(rows[0]["accuracy"], rows[1]["accuracy"]);
    let q = doc["questions"].as_u64().unwrap_or(0);
    assert!(q >= 3, "{doc}");
}

#[test]
fn eval_int2_frames_moves_the_answer_distribution_and_runs_a_calibration() {
    let out = jetvlm(&[
        "eval",
        "--count",
        "3",
        "--policies",
        "fp16",
        "int2-frames",
        "--kv-calibration",
        "../../models/demo/kv-calibration.yaml",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let kl = doc["policies"][1]["mean_kl_vs_reference"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(kl > 0.0, "{doc}");
    // The calibration file's row runs its per-layer policy.
    let cal = &doc["policies"][2];
    assert!(
        cal["policy_resolved"]
            .as_str()
            .unwrap_or("")
            .contains(",layers="),
        "{doc}"
    );
}

#[test]
fn synth_refuses_a_non_empty_directory_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("ds");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::write(out_dir.join("notes.txt"), "mine").unwrap();
    let out_str = out_dir.to_str().unwrap();
    let refused = jetvlm(&["synth", "--out", out_str, "--count", "3", "--seed", "5"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("ds") && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("notes.txt")).unwrap(),
        "mine"
    );

    let forced = jetvlm(&[
        "synth", "--out", out_str, "--count", "3", "--seed", "5", "--force",
    ]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(!out_dir.join("notes.txt").exists());
    let qa = std::fs::read_to_string(out_dir.join("qa.jsonl")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(
        qa.lines().count() as u64,
        meta["questions"].as_u64().unwrap()
    );
}

/// `--ep tensorrt --require-ep`: a build (or an ONNX Runtime) without TensorRT fails with one
/// line naming the provider instead of running the encoder on the CPU.
#[test]
fn watch_refuses_a_required_provider_it_lacks() {
    let out = jetvlm(&[
        "watch",
        "synthetic://scene?pace=0",
        "--frames",
        "1",
        "--ep",
        "tensorrt",
        "--require-ep",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tensorrt"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
