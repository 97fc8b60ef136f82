//! Flags of the weight-format commands outside their domain are one line naming the flag,
//! exit 2 (usage), before any file is read: `plan --weight-bits` (3, 0, 255, a number past
//! 8 bits), `plan --weight-group`, `quantize --bits` and `quantize --group`.

mod common;
use common::jetvlm;

const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/configs/smolvlm-256m"
);
const DECODER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/decoder/llama"
);

fn plan(extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["plan", "--board", "orin-nano-8gb", "--model", CONFIG];
    args.extend_from_slice(extra);
    jetvlm(&args)
}

#[test]
fn plan_weight_bits_outside_the_charged_widths_name_the_flag() {
    for bits in ["3", "0", "255", "99999", "4.5"] {
        let (ok, stdout, stderr) = plan(&["--weight-bits", bits]);
        assert!(!ok, "--weight-bits {bits} planned: {stdout}");
        assert!(
            stderr.contains("--weight-bits") && stderr.contains(bits),
            "--weight-bits {bits}: {stderr}"
        );
        assert!(stdout.is_empty(), "--weight-bits {bits}: {stdout}");
    }
    for bits in ["32", "16", "8", "4"] {
        let (_, stdout, stderr) = plan(&["--weight-bits", bits, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("--weight-bits {bits}: {e}: {stdout} {stderr}"));
        assert!(v["total_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    }
    let (ok, _, stderr) = plan(&["--weight-bits", "4", "--weight-group", "0"]);
    assert!(!ok && stderr.contains("--weight-group"), "{stderr}");
}

#[test]
fn quantize_bits_and_group_outside_their_domain_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let out = out.to_str().unwrap();
    for (flags, named) in [
        (&["--bits", "3"][..], "--bits"),
        (&["--bits", "4", "--group", "0"][..], "--group"),
        (&["--bits", "4", "--group", "48"][..], "--group"),
    ] {
        let mut args = vec!["quantize", "--model", DECODER, "--out", out];
        args.extend_from_slice(flags);
        let (ok, _, stderr) = jetvlm(&args);
        assert!(!ok && stderr.contains(named), "{flags:?}: {stderr}");
        assert!(
            !std::path::Path::new(out).exists(),
            "{flags:?}: output left behind"
        );
    }
}
