//! `jetvlm bench kv --json` on a small cache: the report carries every field the README
//! and the issue name, with values consistent with each other (no timing is asserted).

mod common;
use common::jetvlm;

#[test]
fn bench_kv_json_reports_both_policies_side_by_side() {
    let (ok, stdout, stderr) = jetvlm(&[
        "bench",
        "kv",
        "--context",
        "1024",
        "--layers",
        "2",
        "--min-working-set-mib",
        "4",
        "--sweeps",
        "3",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let num = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("field {k} missing in {r}"))
    };
    for k in [
        "fp16_us",
        "mixed_us",
        "speedup",
        "speedup_paired",
        "mem_read_gbs",
        "fp16_attn_gbs",
        "mixed_attn_gbs",
    ] {
        let v = num(k);
        assert!(v.is_finite() && v > 0.0, "{k} = {v}");
    }
    assert_eq!(num("context"), 1024.0);
    assert_eq!(num("sweeps"), 3.0);
    // Bytes per layer call: FP16 is exactly 2 bytes per element of K and V.
    assert_eq!(num("kv_bytes_fp16"), (1024 * 3 * 64 * 2 * 2) as f64);
    // At 1024 tokens the partly filled text blocks weigh more than at the default 16384
    // (0.354 there); the mixed cache still reads well under half of FP16's bytes.
    let ratio = num("bytes_ratio");
    assert!(ratio > 0.2 && ratio < 0.45, "bytes ratio {ratio}");
    assert!((num("speedup") - num("fp16_us") / num("mixed_us")).abs() < 1e-9);
    assert_eq!(r["fp16"]["frame_tokens"], r["mixed"]["frame_tokens"]);
    for p in ["fp16", "mixed"] {
        let (t, f) = (&r[p]["text_tokens"], &r[p]["frame_tokens"]);
        assert_eq!(
            t.as_u64().unwrap() + f.as_u64().unwrap(),
            1024,
            "{p}: {t} + {f}"
        );
    }
}
