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
    let (ok, stdout, stderr) = jetvlm(&args);
    assert!(ok, "plan {dir}: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("plan --json output");
    v["memory"]["weights_bytes"]
        .as_u64()
        .expect("memory.weights_bytes in plan --json")
}
