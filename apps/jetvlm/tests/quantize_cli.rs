//! `jetvlm quantize` through the built binary: INT8 and INT4 decoders that `generate` runs
//! (INT8 with the f32 fixture's greedy tokens), and refusals naming the flag or tensor at fault
//! with nothing written.

mod common;
use common::jetvlm;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/decoder/llama"
);

fn greedy_ids(model: &str) -> serde_json::Value {
    let (ok, stdout, stderr) = jetvlm(&[
        "generate",
        "--model",
        model,
        "--prompt-ids",
        "1,85,69,342,71,28",
        "--max-tokens",
        "12",
        "--greedy",
        "--ignore-eos",
        "--kv",
        "fp16",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    v["token_ids"].clone()
}

/// INT8 gives f32's greedy tokens; INT4 (g32, INT8 head) runs and, on this prompt, agrees
/// for the first 4 of 12 tokens (measured; then it picks another of the fixture's phrases).
#[test]
fn quantize_writes_decoders_generate_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let want = greedy_ids(MODEL);
    let want = want.as_array().unwrap();
    assert_eq!(want.len(), 12);
    for (bits, agree) in [("8", 12), ("4", 4)] {
        let out = tmp.path().join(format!("q{bits}"));
        let out_s = out.to_str().unwrap();
        let (ok, stdout, stderr) = jetvlm(&[
            "quantize",
            "--model",
            MODEL,
            "--bits",
            bits,
            "--group",
            "32",
            "--head-bits",
            "8",
            "--out",
            out_s,
        ]);
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains(&format!("INT{bits} g32")) && stdout.contains("LM head INT8"),
            "{stdout}"
        );
        let got = greedy_ids(out_s);
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 12);
        assert_eq!(got[..agree], want[..agree], "INT{bits}");
    }
}

#[test]
fn quantize_refusals_name_the_flag_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let out_s = out.to_str().unwrap();
    let (ok, _, stderr) = jetvlm(&[
        "quantize", "--model", MODEL, "--bits", "4", "--group", "128", "--out", out_s,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--group 128") && stderr.contains("model.layers.0.self_attn.q_proj.weight"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (ok, _, stderr) = jetvlm(&["quantize", "--model", MODEL, "--bits", "3", "--out", out_s]);
    assert!(!ok && stderr.contains("--bits"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );
}
