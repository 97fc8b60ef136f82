//! Model descriptions the planner refuses, with errors that name the right thing.

use jetvlm_board::ModelSpec;
use std::path::{Path, PathBuf};

fn copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_package_encoder_that_is_a_directory_is_said_to_be_one() {
    let src =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/configs/package-demo");
    let dir = tempfile::tempdir().unwrap();
    copy(&src, dir.path());
    ModelSpec::load(dir.path()).unwrap();
    let encoder = dir.path().join("vision.onnx");
    std::fs::remove_file(&encoder).unwrap();
    std::fs::create_dir(&encoder).unwrap();
    let err = ModelSpec::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("vision.encoder") && err.contains("is a directory"),
        "{err}"
    );
}

#[test]
fn a_vision_mlp_ratio_outside_its_domain_names_the_field() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/configs/qwen2-vl-2b/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    for bad in [
        serde_json::json!(-4.0),
        serde_json::json!(0.0),
        serde_json::json!(1e300),
    ] {
        cfg["vision_config"]["mlp_ratio"] = bad.clone();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = ModelSpec::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("vision_config.mlp_ratio") && err.contains("config.json"),
            "{bad}: {err}"
        );
    }
}

/// The planner reads a package through the one manifest schema: a bad value it never uses
/// (`vision.mean`) and a tile grid it does use are refused with the file and every field.
#[test]
fn a_package_manifest_is_checked_by_the_package_schema() {
    let src =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/configs/package-demo");
    let dir = tempfile::tempdir().unwrap();
    copy(&src, dir.path());
    let manifest = dir.path().join("jetvlm.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = text
        .replace(
            "mean: [0.485, 0.456, 0.406]",
            "mean: [0.485, 0.456]",
        )
        .replace(
            "  tokens_per_frame: 16\n",
            "  tokens_per_frame: 16\n  tiles: {frame: {height: 256, width: 256}, rows: 0, cols: 2}\n",
        );
    assert_ne!(broken, text);
    std::fs::write(&manifest, &broken).unwrap();
    let err = match ModelSpec::load(dir.path()).unwrap_err() {
        jetvlm_board::BoardError::Config(e) => e,
        other => panic!("expected a config error, got {other}"),
    };
    let jetvlm_core::ConfigError::Manifest { path, issues } = &err else {
        panic!("expected the manifest's issues, got {err}");
    };
    assert_eq!(path, &manifest);
    let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
    assert_eq!(fields, ["vision.mean", "vision.tiles.rows"], "{err}");
    let line = err.to_string();
    assert!(
        line.contains("jetvlm.yaml: 2 problem(s)")
            && line.contains("`vision.mean`: needs 3 values (R, G, B), got 2"),
        "{line}"
    );
    // An unknown field is named with its path, as the package loader names it.
    std::fs::write(
        &manifest,
        text.replace("tokens_per_frame:", "tokens_per_frme:"),
    )
    .unwrap();
    let err = ModelSpec::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("jetvlm.yaml") && err.contains("tokens_per_frme"),
        "{err}"
    );
}
