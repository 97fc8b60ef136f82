//! `jetvlm-assistant` end to end on the bundled demo model and a synthetic scene: one fresh
//! frame per question, answers about the window (matching the scene's ground truth), the
//! window's eviction, `:frames` and `:quit`, a failing question reported without ending the
//! session, and one-line errors for a missing model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// Runs the assistant with `stdin` piped in; (success, stdout, stderr).
fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jetvlm-assistant"))
        .args(args)
        .env_remove("JETVLM_MODEL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The assistant may stop reading (`:quit`, an error) before all of stdin is written.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn answers_each_question_about_fresh_frames_in_a_rolling_window() {
    let model = demo_model();
    let questions = [
        "how many objects are there?",
        "is there a red square?",
        ":frames",
        "how many objects are in the left zone?",
        "",
        "is there a blue circle?",
        &format!("{}?", "what ".repeat(3000)),
        "how many objects are there?",
        ":frames",
        ":quit",
        "is this ignored?",
    ]
    .join("\n");
    let (ok, out, err) = run(
        &[
            "synthetic://scene?seed=5&pace=0",
            "--model",
            model.to_str().unwrap(),
            "--window",
            "2",
            "--json",
        ],
        &questions,
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8, "{out}");
    let replies: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("question").is_some())
        .collect();
    assert_eq!(replies.len(), 6);
    // One fresh frame per question; the window holds the last two.
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r["frame"], i as u64, "{r}");
        assert_eq!(r["frames_cached"], (i + 1).min(2) as u64, "{r}");
    }
    assert_eq!(lines[2]["frames"], serde_json::json!([0, 1]));
    assert_eq!(lines[7]["frames"], serde_json::json!([4, 5]));
    // The over-long question is an error in its reply; the next one is answered.
    let failed = replies[4];
    assert!(failed.get("answer").is_none());
    assert!(
        failed["error"].as_str().unwrap().contains("cache full"),
        "{failed}"
    );
    let answered: Vec<&&serde_json::Value> = replies
        .iter()
        .filter(|r| r.get("answer").is_some())
        .collect();
    assert_eq!(answered.len(), 5);
    assert!(!out.contains("is this ignored"));
    // Every answered question here is one the scene's renderer answers for the newest frame.
    for r in &answered {
        assert_eq!(r["answer"], r["truth"], "{r}");
        assert!(r["kv_bytes"].as_u64().unwrap() < r["kv_fp16_equivalent_bytes"].as_u64().unwrap());
    }
}

#[test]
fn text_output_and_one_line_errors() {
    let model = demo_model();
    let (ok, out, _) = run(
        &[
            "synthetic://scene?seed=5&pace=0",
            "--model",
            model.to_str().unwrap(),
        ],
        "is there a red square?\n",
    );
    assert!(ok);
    assert!(out.starts_with("no    [frame 0, 1 cached, TTFT"), "{out}");

    let (ok, out, err) = run(&["synthetic://scene"], "hello?\n");
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("no model") && err.lines().count() == 1,
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(
        &["synthetic://scene", "--model", dir.path().to_str().unwrap()],
        "hello?\n",
    );
    assert!(!ok && err.contains(dir.path().to_str().unwrap()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (ok, _, err) = run(
        &["nosuch://x", "--model", model.to_str().unwrap()],
        "hello?\n",
    );
    assert!(
        !ok && err.contains("nosuch://x") && err.lines().count() == 1,
        "{err}"
    );
}

/// Runs the assistant with raw bytes on stdin; (success, stdout, stderr).
fn run_bytes(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jetvlm-assistant"))
        .args(args)
        .env_remove("JETVLM_MODEL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_lines_and_unknown_commands_are_reported_and_the_session_goes_on() {
    let model = demo_model();
    let mut stdin = b"\xff\xfe\x00binary\x80\n:frmaes\n".to_vec();
    stdin.extend_from_slice(b"is there a red square?\n:frames\n");
    let (ok, out, err) = run_bytes(
        &[
            "synthetic://scene?seed=5&pace=0",
            "--model",
            model.to_str().unwrap(),
            "--json",
        ],
        &stdin,
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    let e0 = lines[0]["error"].as_str().unwrap();
    assert!(e0.contains("not UTF-8"), "{e0}");
    let e1 = lines[1]["error"].as_str().unwrap();
    assert!(
        e1.contains("unknown command `:frmaes`") && e1.contains(":frames") && e1.contains(":quit"),
        "{e1}"
    );
    // Neither went to the model: the question after them is the first to take a frame.
    assert_eq!(lines[2]["question"], "is there a red square?");
    assert_eq!(lines[2]["frame"], 0, "{}", lines[2]);
    assert!(lines[2]["answer"].is_string(), "{}", lines[2]);
    assert_eq!(lines[3]["frames"], serde_json::json!([0]));
}

#[test]
fn sizes_that_would_overflow_the_cache_are_one_line_errors_naming_the_flag() {
    let model = demo_model();
    let max = u64::MAX.to_string();
    for flag in ["--max-tokens", "--window"] {
        let (ok, out, err) = run(
            &[
                "synthetic://scene",
                "--model",
                model.to_str().unwrap(),
                flag,
                &max,
            ],
            "hello?\n",
        );
        assert!(!ok && out.is_empty(), "{flag}: {out}");
        assert!(
            err.contains(flag) && err.lines().count() == 1 && !err.contains("panicked"),
            "{flag}: {err}"
        );
    }
}
