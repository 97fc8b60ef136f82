//! `jetvlm calibrate` on the bundled demo model, and its file used by `watch`.

mod common;
use common::jetvlm;

#[test]
fn calibrate_writes_a_file_that_watch_runs_with() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calib.yaml");
    let f = file.to_str().unwrap();
    let (ok, out, err) = jetvlm(&[
        "calibrate",
        "--out",
        f,
        "--source",
        "synthetic://scene?seed=5&pace=0",
        "--frames",
        "8",
        "--window",
        "4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let c = &r["calibration"];
    assert_eq!(c["shape"]["layers"], 6);
    assert_eq!(c["samples"]["prompts"], 2);
    // The package's policy, block sizes included, is the base.
    assert_eq!(c["base_policy"], "mixed:fblock=16,qblock=16");
    let target = c["target_error"].as_f64().unwrap();
    // Default target: the base policy's worst layer; every layer stays within it and the
    // calibrated cache is no larger than the base policy's.
    let layers = c["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6);
    for l in layers {
        assert!(l["meets_target"].as_bool().unwrap(), "{l}");
        assert!(l["error"].as_f64().unwrap() <= target, "{l}");
    }
    assert!(c["kv_bytes"]["calibrated"].as_u64() <= c["kv_bytes"]["base"].as_u64());
    // The check answered both prompts under the base and the calibrated policy.
    let check = r["check"].as_array().unwrap();
    assert_eq!(check.len(), 2);
    assert!(check.iter().all(|k| k["answers"] == 2), "{check:?}");
    let policy = c["policy"].as_str().unwrap().to_string();

    // The file drives watch; the report names the calibrated policy.
    let (ok, out, err) = jetvlm(&[
        "watch",
        "synthetic://scene?seed=3&pace=0",
        "--frames",
        "2",
        "--json",
        "--kv-calibration",
        f,
    ]);
    assert!(ok, "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["kv_policy"].as_str(), Some(policy.as_str()));

    // A damaged file: one line naming the file and the field, non-zero exit, no panic.
    let text = std::fs::read_to_string(&file).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, text.replace("policy: mixed", "policy: mixd")).unwrap();
    let (ok, _, err) = jetvlm(&[
        "watch",
        "--frames",
        "1",
        "--kv-calibration",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad.yaml") && err.contains("policy"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The committed calibration of the demo model still fits it (docs/calibration.md uses it).
#[test]
fn the_demo_models_committed_calibration_loads() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/demo/kv-calibration.yaml"
    );
    let (ok, out, err) = jetvlm(&[
        "watch",
        "synthetic://scene?seed=3&pace=0",
        "--frames",
        "1",
        "--json",
        "--kv-calibration",
        file,
    ]);
    assert!(ok, "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(
        first["kv_policy"].as_str().unwrap().contains(",layers="),
        "{first}"
    );
}

/// A second model (the LLaVA-family fixture: head dim 32, an FP16 package policy):
/// candidates are fitted to the head dim and the base starts from `mixed`.
#[test]
fn calibrate_fits_formats_to_another_models_head_dim() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/vlm");
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("vlm.yaml");
    let (ok, out, err) = jetvlm(&[
        "calibrate",
        "--model",
        root,
        "--source",
        &format!("file://{root}/image.png"),
        "--frames",
        "1",
        "--window",
        "1",
        "-q",
        "what is in the picture?",
        "--json",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let c = &r["calibration"];
    assert_eq!(c["shape"]["head_dim"], 32);
    assert_eq!(c["base_policy"], "mixed:group=32");
    for k in c["candidates"].as_array().unwrap() {
        assert!(k["format"].as_str().unwrap().ends_with("32"), "{k}");
    }
}

/// A package that names its calibration (`kv.calibration`) runs with it by default; a
/// flag still overrides it; a missing file is a package error naming the key.
#[test]
fn a_package_can_ship_its_calibration() {
    let demo = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo"));
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    for f in ["vision.onnx", "decoder", "kv-calibration.yaml"] {
        std::os::unix::fs::symlink(demo.join(f).canonicalize().unwrap(), pkg.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(demo.join("jetvlm.yaml")).unwrap();
    let with_cal = manifest.replace("kv:\n", "kv:\n  calibration: kv-calibration.yaml\n");
    assert_ne!(with_cal, manifest);
    std::fs::write(pkg.join("jetvlm.yaml"), &with_cal).unwrap();
    let policy = |extra: &[&str]| -> Result<String, String> {
        let mut args = vec![
            "watch",
            "synthetic://scene?seed=3&pace=0",
            "--frames",
            "1",
            "--json",
            "--model",
            pkg.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = jetvlm(&args);
        if !ok {
            return Err(err);
        }
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        Ok(v["kv_policy"].as_str().unwrap().to_string())
    };
    assert!(policy(&[]).unwrap().contains(",layers="));
    assert_eq!(
        policy(&["--kv", "fp16"]).unwrap(),
        "mixed:bits=16,fblock=16,qblock=16"
    );
    std::fs::write(
        pkg.join("jetvlm.yaml"),
        with_cal.replace("calibration: kv-calibration.yaml", "calibration: nope.yaml"),
    )
    .unwrap();
    let err = policy(&[]).unwrap_err();
    assert!(
        err.contains("kv.calibration") && err.contains("nope.yaml"),
        "{err}"
    );
}
