//! Running the built `jetvlm` binary from the CLI tests.

use std::process::Command;

/// Runs `jetvlm args`; returns (success, stdout, stderr).
pub fn jetvlm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_jetvlm"))
        .args(args)
        .output()
        .expect("run the jetvlm binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `jetvlm args` (a command given `--json`) and parses what it prints; a failure
/// panics with its stderr.
#[allow(dead_code)] // not every test binary that includes this module reads JSON
pub fn jetvlm_json(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = jetvlm(args);
    assert!(ok, "jetvlm {}: {stderr}", args.join(" "));
    serde_json::from_str(&stdout).expect("--json output")
}

/// The weight bytes `jetvlm plan --json` charges for the decoder in `dir` on the Orin Nano
/// 8GB (one token per frame; `extra` adds flags such as `--weight-bits 4`).
#[allow(dead_code)] // not every test binary that includes this module plans
pub fn planned_weight_bytes(dir: &str, extra: &[&str]) -> u64 {
    let mut args = vec![
        "plan",
        "--model",
        dir,
        "--board",
        "orin-nano-8gb",
        "--tokens-per-frame",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    jetvlm_json(&args)["memory"]["weights_bytes"]
        .as_u64()
        .expect("memory.weights_bytes in plan --json")
}
