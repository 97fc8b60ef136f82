//! The position policy and answer limits every command follows: a context past the model's
//! trained positions runs with a warning naming the limit (generate, ask, watch sessions), a
//! window past the frames a package was trained with is warned about, and `--max-tokens 0` is
//! refused (it would give empty answers).

mod common;
use common::jetvlm;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    root()
        .join("tests/fixtures/decoder")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn generate_warns_past_the_trained_positions() {
    let llama = fixture("llama");
    // The fixture is trained to 256 positions: 200 prompt tokens and 80 answer tokens pass it.
    let ids: Vec<String> = (0..200).map(|i| (3 + i % 200).to_string()).collect();
    let ids = ids.join(",");
    for device in ["cpu", "sim"] {
        let (ok, _, err) = jetvlm(&[
            "generate",
            "--model",
            &llama,
            "--prompt-ids",
            &ids,
            "--max-tokens",
            "80",
            "--greedy",
            "--ignore-eos",
            "--device",
            device,
        ]);
        assert!(ok, "{device}: {err}");
        assert!(
            err.contains("needs 280 positions")
                && err.contains("trained range of 256")
                && err.contains("--max-tokens 80"),
            "{device}: {err}"
        );
    }
    // Inside the range: no warning.
    let (ok, _, err) = jetvlm(&[
        "generate",
        "--model",
        &llama,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "4",
        "--greedy",
    ]);
    assert!(ok, "{err}");
    assert!(!err.contains("trained range"), "{err}");
}

#[test]
fn max_tokens_zero_is_refused_naming_the_flag() {
    let llama = fixture("llama");
    for args in [
        vec![
            "generate",
            "--model",
            &llama,
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "0",
        ],
        vec![
            "watch",
            "synthetic://scene?pace=0",
            "--frames",
            "1",
            "--max-tokens",
            "0",
        ],
        vec!["ask", "--max-tokens", "0", "what is there?"],
    ] {
        let (ok, _, err) = jetvlm(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains("--max-tokens") && err.contains("at least 1"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn watch_warns_past_the_frames_the_package_was_trained_with() {
    let (ok, _, err) = jetvlm(&[
        "watch",
        "synthetic://scene?seed=7&pace=0",
        "--window",
        "6",
        "--frames",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("a session window with 6 frames")
            && err.contains("at most 4 per prompt")
            && err.contains("prompt.max_frames"),
        "{err}"
    );
    let (ok, _, err) = jetvlm(&[
        "watch",
        "synthetic://scene?seed=7&pace=0",
        "--window",
        "4",
        "--frames",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(!err.contains("prompt.max_frames"), "{err}");
}

#[test]
fn a_session_window_past_the_allowed_positions_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("runtime.yaml");
    // Four 16-token frames, the prefix and a question with its answer need more than 60.
    std::fs::write(&cfg, "session_max_position: 60\n").unwrap();
    let (ok, _, err) = jetvlm(&[
        "watch",
        "synthetic://scene?seed=7&pace=0",
        "--window",
        "4",
        "--frames",
        "2",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("past the 60 the session allows") && err.contains("smaller window"),
        "{err}"
    );
}

#[test]
fn generate_takes_a_model_package_for_its_decoder() {
    let demo = root().join("models/demo");
    let package = demo.display().to_string();
    let decoder = demo.join("decoder").display().to_string();
    let run = |model: &str| {
        let (ok, out, err) = jetvlm(&[
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "3,4,5",
            "--max-tokens",
            "3",
            "--greedy",
            "--json",
        ]);
        assert!(ok, "{model}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["token_ids"].clone()
    };
    assert_eq!(run(&package), run(&decoder));
}
