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
