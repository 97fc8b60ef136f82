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
