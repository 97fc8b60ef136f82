//! Flag values through the built binary: a signed number after a space (`--temperature -1`)
//! is the flag's value, checked against the flag's domain, not "unexpected argument '-1'";
//! and the image limits of `ask` (`--max-image-pixels`, `--max-image-alloc-mib`) refuse an
//! image before decoding it.

mod common;
use common::jetvlm;

const DECODER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/decoder/llama"
);
const PACKAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/vlm");
const IMAGE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/vlm/image.png"
);

fn generate(extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "generate",
        "--model",
        DECODER,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    jetvlm(&args)
}

fn ask(extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "ask",
        "--model",
        PACKAGE,
        "--image",
        IMAGE,
        "what is in the picture?",
        "--max-tokens",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    jetvlm(&args)
}

/// Runs a command with extra arguments: (succeeded, stdout, stderr).
type Run = dyn Fn(&[&str]) -> (bool, String, String);

#[test]
fn a_negative_number_after_a_space_is_the_flags_value() {
    let cases: [(&Run, &str, &str); 4] = [
        (&generate, "--temperature", "-1"),
        (&generate, "--top-p", "-0.5"),
        (&generate, "--repetition-penalty", "-2"),
        (&ask, "--temperature", "-1"),
    ];
    for (run, flag, value) in cases {
        let (ok, stdout, stderr) = run(&[flag, value]);
        assert!(!ok, "{flag} {value}: ran: {stdout}");
        // The domain check names the flag (or the sampling field it sets) and the value;
        // clap did not take the value for a flag of its own.
        assert!(
            !stderr.contains("unexpected argument") && stderr.contains(value),
            "{flag} {value}: {stderr}"
        );
        assert!(
            stderr.contains(flag) || stderr.contains(&flag[2..].replace('-', "_")),
            "{flag} {value}: {stderr}"
        );
    }
    // A negative zero is a valid temperature (greedy): it runs.
    let (ok, stdout, stderr) = generate(&["--temperature", "-0"]);
    assert!(ok, "--temperature -0: {stderr}");
    assert!(stdout.contains("token_ids"), "{stdout}");
}

#[test]
fn ask_image_limits_refuse_an_image_before_decoding() {
    // The fixture image is 32x32 = 1024 pixels.
    let (ok, stdout, stderr) = ask(&["--max-image-pixels", "1024"]);
    assert!(ok, "at the limit: {stderr}");
    assert!(stdout.contains("token_ids"), "{stdout}");

    let (ok, _, stderr) = ask(&["--max-image-pixels", "1023"]);
    assert!(!ok);
    assert!(
        stderr.contains("image.png") && stderr.contains("1023") && stderr.contains("32x32"),
        "{stderr}"
    );

    for (flag, value) in [("--max-image-pixels", "0"), ("--max-image-alloc-mib", "0")] {
        let (ok, _, stderr) = ask(&[flag, value]);
        assert!(!ok && stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}
