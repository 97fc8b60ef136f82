//! `jetvlm ask` end to end on the tiny random LLaVA fixture package
//! (tests/fixtures/vlm, built with transformers by tests/fixtures/make_vlm_fixture.py):
//! the binary's greedy tokens equal transformers' for the same image and question.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vlm")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ask(extra: &[&str]) -> std::process::Output {
    let exp = expected();
    let fx = fixture();
    let image = fx.join("image.png");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetvlm"));
    cmd.arg("ask")
        .arg("--model")
        .arg(&fx)
        .arg("--image")
        .arg(&image)
        .arg(exp["question"].as_str().unwrap())
        .arg("--max-tokens")
        .arg(exp["max_new_tokens"].as_u64().unwrap().to_string())
        .args(extra)
        .env_remove("ORT_DYLIB_PATH");
    cmd.output().unwrap()
}

#[test]
fn ask_json_greedy_tokens_equal_transformers() {
    let exp = expected();
    for kv in ["fp16", "f32"] {
        let out = ask(&["--json", "--kv", kv]);
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["token_ids"], exp["greedy_tokens"], "kv {kv}");
        assert_eq!(
            v["prompt_tokens"].as_u64().unwrap() as usize,
            exp["prompt_ids"].as_array().unwrap().len()
        );
        assert_eq!(v["frames"], 1);
        assert_eq!(v["execution_provider"], "cpu");
        assert_eq!(v["decoder_device"], "cpu");
        for key in ["encoder_ms", "prefill_ms", "ttft_ms", "tpot_ms"] {
            assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {}", v[key]);
        }
        for key in [
            "fp16_bytes",
            "quant_bytes",
            "total_bytes",
            "fp16_equivalent_bytes",
        ] {
            assert!(v["kv"][key].is_u64(), "kv.{key} missing");
        }
        assert!(v["text"].is_string());
    }
}

#[test]
fn ask_streams_text_and_reports_errors() {
    let out = ask(&[]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prompt tokens") && err.contains("TTFT") && err.contains("(cpu)"),
        "{err}"
    );

    // A bad --kv is the runtime config's kv_policy, not a problem of the package's manifest.
    let out = ask(&["--kv", "int5-sometimes"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kv_policy")
            && err.contains("int5-sometimes")
            && !err.contains("jetvlm.yaml:"),
        "{err}"
    );
}

#[test]
fn out_of_domain_flags_are_errors_naming_the_flag() {
    let fx = fixture();
    let max = u64::MAX.to_string();
    for (flag, value) in [
        ("--temperature", "NaN"),
        ("--temperature", "-1"),
        ("--max-tokens", max.as_str()),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_jetvlm"))
            .arg("ask")
            .arg("--model")
            .arg(&fx)
            .arg("--image")
            .arg(fx.join("image.png"))
            .arg("what is this?")
            .arg(format!("{flag}={value}"))
            .env_remove("ORT_DYLIB_PATH")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: answered");
        assert!(
            err.contains(flag) && !err.contains("panicked"),
            "{flag} {value}: {err}"
        );
    }
}
