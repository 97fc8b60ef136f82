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
