//! Model package validation: every problem is reported at once, naming jetvlm.yaml.

use jetvlm_vision::{ModelPackage, VisionError};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vlm")
}

/// Copies the fixture package into a temp dir so a test can break it.
fn copy_package() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), dir.path());
    dir
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn issues_of(err: VisionError) -> (PathBuf, Vec<(String, String)>) {
    match err {
        VisionError::Package { manifest, issues } => (
            manifest,
            issues.into_iter().map(|i| (i.field, i.message)).collect(),
        ),
        other => panic!("expected a package error, got {other}"),
    }
}

#[test]
fn fixture_package_loads() {
    let pkg = ModelPackage::load(&fixture()).unwrap();
    assert_eq!(pkg.tokens_per_frame(), 16);
    assert_eq!(pkg.decoder_config.hidden_size, 64);
    assert_eq!(pkg.encoder_signature.inputs[0].name, "pixel_values");
    assert_eq!(
        pkg.encoder_signature.outputs[0].shape,
        vec![None, Some(16), Some(64)]
    );
}

#[test]
fn all_problems_reported_at_once() {
    let dir = copy_package();
    let manifest = dir.path().join("jetvlm.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = text
        .replace("tokens_per_frame: 16", "tokens_per_frame: 20")
        .replace(
            "image_size: {height: 32, width: 32}",
            "image_size: {height: 32, width: 48}",
        )
        .replace("std: [", "std: [0.5, ")
        .replace("\\n{question} ASSISTANT:", "\\n ASSISTANT:")
        .replace("input_dtype: f32", "input_dtype: f16");
    std::fs::write(&manifest, broken).unwrap();
    std::fs::remove_file(dir.path().join("decoder/tokenizer.json")).unwrap();

    let err = ModelPackage::load(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("jetvlm.yaml"), "{text}");
    let (path, issues) = issues_of(err);
    assert_eq!(path, manifest);
    let fields: Vec<&str> = issues.iter().map(|(f, _)| f.as_str()).collect();
    for want in [
        "vision.tokens_per_frame",
        "vision.image_size",
        "vision.std",
        "prompt.template",
        "vision.input_dtype",
        "decoder.dir",
    ] {
        assert!(
            fields.contains(&want),
            "missing issue for {want}: {issues:#?}"
        );
    }
    let tpf = issues
        .iter()
        .find(|(f, _)| f == "vision.tokens_per_frame")
        .unwrap();
    assert!(tpf.1.contains("20") && tpf.1.contains("16"), "{}", tpf.1);
    assert!(issues.iter().any(|(_, m)| m.contains("tokenizer.json")));
}

#[test]
fn missing_files_and_decoder_mismatch() {
    let dir = copy_package();
    std::fs::remove_file(dir.path().join("vision.onnx")).unwrap();
    std::fs::remove_file(dir.path().join("decoder/model.safetensors")).unwrap();
    let (_, issues) = issues_of(ModelPackage::load(dir.path()).unwrap_err());
    assert!(
        issues
            .iter()
            .any(|(f, m)| f == "vision.encoder" && m.contains("vision.onnx"))
    );
    assert!(
        issues
            .iter()
            .any(|(f, m)| f == "decoder.dir" && m.contains("model.safetensors"))
    );

    // Encoder width differs from the decoder's hidden_size.
    let dir = copy_package();
    let cfg_path = dir.path().join("decoder/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"hidden_size\": 64", "\"hidden_size\": 96"),
    )
    .unwrap();
    let (_, issues) = issues_of(ModelPackage::load(dir.path()).unwrap_err());
    assert!(
        issues
            .iter()
            .any(|(_, m)| m.contains("hidden_size 96") && m.contains("64")),
        "{issues:#?}"
    );
}

#[test]
fn unknown_manifest_key_and_missing_manifest() {
    let dir = copy_package();
    let manifest = dir.path().join("jetvlm.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("layout: nchw", "layout: nchw\n  tokens_per_frme: 3"),
    )
    .unwrap();
    let err = ModelPackage::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokens_per_frme"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = ModelPackage::load(empty.path()).unwrap_err();
    assert!(err.to_string().contains("jetvlm.yaml"), "{err}");
}
