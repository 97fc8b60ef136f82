//! Every `--device cuda` command through the built binary: on a machine without CUDA (or a
//! build without the feature) one clear error line, a non-zero exit and no panic; on a GPU
//! the command runs.

mod common;
use common::jetvlm;

fn fixture() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/decoder/llama"
    )
    .to_string()
}

/// Runs `args`; returns stdout when the command ran on a GPU.
fn check(args: &[&str]) -> Option<String> {
    let (ok, stdout, stderr) = jetvlm(args);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    if !jetvlm_cuda::compiled_with_cuda() {
        assert!(!ok, "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: --device cuda: ") && stderr.contains("without CUDA support"),
            "{stderr}"
        );
    } else if !jetvlm_cuda::driver_available() {
        assert!(!ok, "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: --device cuda: ") && stderr.contains("libcuda"),
            "{stderr}"
        );
    } else if lines.iter().any(|l| l.contains("--device cuda: ")) {
        // A driver without a usable device: still one line.
        assert!(!ok);
        assert_eq!(lines.len(), 1, "{stderr}");
        eprintln!("skipped: {stderr}");
    } else {
        assert!(ok, "{args:?}: {stderr}\n{stdout}");
        return Some(stdout);
    }
    None
}

#[test]
fn generate_on_cuda_runs_or_fails_with_one_line() {
    let model = fixture();
    check(&[
        "generate",
        "--model",
        &model,
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "3",
        "--greedy",
        "--json",
        "--device",
        "cuda",
    ]);
}

/// `ask --device cuda` on the LLaVA fixture package: on a GPU the greedy tokens equal
/// transformers' (FP16 KV), as the CPU path's do (`ask_fixture.rs`).
#[test]
fn ask_on_cuda_runs_or_fails_with_one_line() {
    let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/vlm");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{fx}/expected.json")).unwrap())
            .unwrap();
    let image = format!("{fx}/image.png");
    let max = exp["max_new_tokens"].as_u64().unwrap().to_string();
    let ran = check(&[
        "ask",
        "--model",
        fx,
        "--image",
        &image,
        exp["question"].as_str().unwrap(),
        "--max-tokens",
        &max,
        "--kv",
        "fp16",
        "--json",
        "--device",
        "cuda",
    ]);
    if let Some(stdout) = ran {
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["token_ids"], exp["greedy_tokens"], "{stdout}");
        assert!(
            v["decoder_device"].as_str().unwrap().starts_with("cuda"),
            "{stdout}"
        );
    }
}

/// `watch --device cuda` with the demo package: on a GPU every frame gets an answer and at
/// least 5 of 6 match the renderer's ground truth, as on the CPU (`watch_eval.rs`).
#[test]
fn watch_on_cuda_runs_or_fails_with_one_line() {
    let ran = check(&[
        "watch",
        "synthetic://scene?seed=3&pace=0",
        "--frames",
        "6",
        "--window",
        "2",
        "--json",
        "--device",
        "cuda",
    ]);
    if let Some(stdout) = ran {
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        assert_eq!(lines.len(), 6, "{stdout}");
        let right = lines
            .iter()
            .filter(|l| l["truth"].is_string() && l["truth"] == l["answer"])
            .count();
        assert!(right >= 5, "{right} of 6: {stdout}");
        assert!(lines.iter().all(|l| {
            l["decoder_device"]
                .as_str()
                .is_some_and(|d| d.starts_with("cuda"))
        }));
    }
}

#[test]
fn bench_kv_on_cuda_runs_or_fails_with_one_line() {
    check(&[
        "bench",
        "kv",
        "--device",
        "cuda",
        "--context",
        "300",
        "--layers",
        "2",
        "--sweeps",
        "1",
        "--min-working-set-mib",
        "1",
    ]);
}

#[test]
fn bench_decode_on_cuda_runs_or_fails_with_one_line() {
    let model = fixture();
    for offload in ["none", "host"] {
        check(&[
            "bench",
            "decode",
            "--model",
            &model,
            "--context",
            "100",
            "--steps",
            "2",
            "--kv",
            "fp16",
            "--device",
            "cuda",
            "--kv-offload",
            offload,
        ]);
    }
}

#[test]
fn kv_offload_without_cuda_is_refused() {
    let model = fixture();
    let (ok, _, stderr) = jetvlm(&["bench", "decode", "--model", &model, "--kv-offload", "host"]);
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--kv-offload host needs --device cuda"),
        "{stderr}"
    );
}
