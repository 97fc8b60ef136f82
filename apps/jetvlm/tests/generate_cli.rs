//! `jetvlm generate` on the CPU through the built binary: the JSON report, identical greedy
//! tokens with the FP16 and the exact f32 cache on the trained Llama fixture, and a stop
//! string cutting the text.

mod common;
use common::jetvlm;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/decoder/llama"
);

fn generate(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--model",
        MODEL,
        "--prompt",
        "What color is the car?",
        "--max-tokens",
        "12",
        "--greedy",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = jetvlm(&args);
    assert!(ok, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn generate_reports_tokens_and_agrees_across_caches() {
    let fp16 = generate(&["--kv", "fp16"]);
    let exact = generate(&["--kv", "f32"]);
    let ids = fp16["token_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 12, "{fp16}");
    assert_eq!(fp16["token_ids"], exact["token_ids"]);
    assert_eq!(fp16["finish_reason"], "max_tokens");
    assert_eq!(fp16["kv"], "fp16");
    assert!(fp16["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(!fp16["text"].as_str().unwrap().is_empty());
    assert!(fp16["ttft_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_stop_string_cuts_the_text_before_it() {
    let full = generate(&["--kv", "fp16"]);
    let text = full["text"].as_str().unwrap();
    // The second word of the answer as the stop string.
    let word = text.split_whitespace().nth(1).expect("two words");
    let stopped = generate(&["--kv", "fp16", "--stop", word]);
    assert_eq!(stopped["finish_reason"], "stop_string", "{stopped}");
    let cut = stopped["text"].as_str().unwrap();
    assert!(
        !cut.contains(word) && text.starts_with(cut),
        "{cut:?} vs {text:?}"
    );
}

#[test]
fn a_max_tokens_that_overflows_the_cache_is_an_error_naming_the_flag() {
    let max = u64::MAX.to_string();
    let (ok, _, stderr) = jetvlm(&[
        "generate",
        "--model",
        MODEL,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        &max,
        "--greedy",
        "--json",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--max-tokens") && stderr.contains("overflow"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sampling_flags_outside_their_domain_are_errors_naming_the_flag() {
    for (flag, value) in [
        ("--temperature", "NaN"),
        ("--temperature", "inf"),
        ("--temperature", "-1"),
        ("--top-p", "NaN"),
        ("--top-p", "1.5"),
        ("--repetition-penalty", "NaN"),
        ("--repetition-penalty", "0"),
    ] {
        let (ok, stdout, stderr) = jetvlm(&[
            "generate",
            "--model",
            MODEL,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "4",
            "--json",
            &format!("{flag}={value}"),
        ]);
        assert!(!ok, "{flag} {value}: generated {stdout}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}
