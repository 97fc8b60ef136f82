//! Bad input to the planner: broken board files, incomplete model configs, unknown names.
//! Each is a typed error that names the file and the field, never a panic.

use jetvlm_board::plan::{self, PlanOptions, Workload};
use jetvlm_board::{BoardError, BoardProfile, BoardRegistry, KvPrecision, ModelSpec};
use jetvlm_core::ConfigError;
use std::path::PathBuf;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn config_error(e: BoardError) -> ConfigError {
    match e {
        BoardError::Config(c) => c,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn every_bundled_board_parses_and_is_consistent() {
    let reg = BoardRegistry::bundled();
    let names = reg.names();
    for expected in [
        "orin-nano-4gb",
        "orin-nano-4gb-super",
        "orin-nano-8gb",
        "orin-nano-8gb-super",
        "orin-nx-8gb",
        "orin-nx-16gb",
        "agx-orin-32gb",
        "agx-orin-64gb",
        "xavier-nx-8gb",
        "xavier-nx-16gb",
        "agx-xavier-32gb",
        "agx-xavier-64gb",
        "thor-t5000",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not bundled: {names:?}"
        );
    }
    let boards = reg.all().unwrap();
    assert_eq!(boards.len(), names.len());
    for b in &boards {
        assert!(
            b.usable_bytes() > 0 && b.usable_bytes() < b.dram_bytes(),
            "{}",
            b.name
        );
        // The bundled YAML on disk is the one embedded in the binary.
        let on_disk = BoardProfile::from_file(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../boards")
                .join(format!("{}.yaml", b.name)),
        )
        .unwrap();
        assert_eq!(&on_disk, b);
    }
    // The design table's bandwidths and usable budgets.
    let get = |n: &str| boards.iter().find(|b| b.name == n).unwrap().clone();
    for (name, gb_s, sm) in [
        ("orin-nano-4gb", 34.0, 87),
        ("orin-nano-4gb-super", 51.0, 87),
        ("orin-nano-8gb", 68.0, 87),
        ("orin-nano-8gb-super", 102.0, 87),
        ("orin-nx-16gb", 102.4, 87),
        ("agx-orin-64gb", 204.8, 87),
        ("xavier-nx-8gb", 59.7, 72),
        ("agx-xavier-32gb", 136.5, 72),
        ("thor-t5000", 273.0, 110),
    ] {
        assert_eq!(get(name).memory.bandwidth_gb_s, gb_s, "{name}");
        assert_eq!(get(name).gpu.sm, sm, "{name}");
    }
    let usable_gb = |n: &str| get(n).usable_bytes() as f64 / 1e9;
    assert!((usable_gb("orin-nano-8gb") - 5.2).abs() < 0.05);
    assert!((usable_gb("orin-nano-4gb") - 2.5).abs() < 0.05);
}

#[test]
fn malformed_board_yaml_names_file_and_line() {
    let path = fixture("board/malformed.yaml");
    let err = config_error(BoardProfile::from_file(&path).unwrap_err());
    assert_eq!(err.path(), path);
    let msg = err.to_string();
    assert!(msg.contains("malformed.yaml"), "{msg}");
    assert!(
        matches!(err, ConfigError::Parse { line: Some(_), .. }),
        "{msg}"
    );
}

#[test]
fn board_missing_a_field_names_it() {
    let path = fixture("board/missing-field.yaml");
    let msg = BoardProfile::from_file(&path).unwrap_err().to_string();
    assert!(msg.contains("missing-field.yaml"), "{msg}");
    assert!(msg.contains("bandwidth_gb_s"), "{msg}");
}

#[test]
fn board_field_typo_is_caught() {
    let msg = BoardProfile::from_file(&fixture("board/typo-field.yaml"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("typo-field.yaml"), "{msg}");
    assert!(msg.contains("bandwith_gb_s"), "{msg}");
}

#[test]
fn board_reserving_all_memory_is_rejected() {
    let err = config_error(
        BoardProfile::from_file(&fixture("board/reserved-too-large.yaml")).unwrap_err(),
    );
    assert_eq!(err.field(), Some("memory.os_reserved_mib"));
    assert!(err.to_string().contains("reserved-too-large.yaml"));
}

#[test]
fn config_missing_kv_heads_defaults_like_transformers() {
    let m = ModelSpec::load(&fixture("configs/missing-kv-heads")).unwrap();
    assert_eq!(m.text.num_key_value_heads, m.text.num_attention_heads);
    assert_eq!(m.text.num_key_value_heads, 9);
    // Plain multi-head attention: three times SmolVLM's KV per token.
    let w = Workload {
        frames: 4,
        tokens_per_frame: 64,
        prompt_tokens: 64,
        answer_tokens: 128,
    };
    let kv = plan::kv_usage(&m.text, &w, &KvPrecision::fp16()).unwrap();
    assert_eq!(kv.total_bytes, (4 * 64 + 192) * 2 * 30 * 9 * 64 * 2);
}

#[test]
fn config_missing_hidden_size_names_file_and_field() {
    let path = fixture("configs/missing-hidden-size/config.json");
    let err = config_error(ModelSpec::load(&path).unwrap_err());
    assert_eq!(err.field(), Some("text_config.hidden_size"));
    assert_eq!(err.path(), path);
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("hidden_size"),
        "{msg}"
    );
}

#[test]
fn model_path_without_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let msg = ModelSpec::load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains(&dir.path().display().to_string()),
        "{msg}"
    );
    let msg = ModelSpec::load(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope"), "{msg}");
}

#[test]
fn vision_config_missing_a_shape_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("configs/smolvlm-256m/config.json")).unwrap(),
    )
    .unwrap();
    v["vision_config"]
        .as_object_mut()
        .unwrap()
        .remove("patch_size");
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let err = config_error(ModelSpec::load(&path).unwrap_err());
    assert_eq!(err.field(), Some("vision_config.patch_size"));
}

#[test]
fn unknown_board_lists_the_known_ones() {
    let reg = BoardRegistry::bundled();
    let msg = reg.resolve("orin-nano-16gb").unwrap_err().to_string();
    assert!(msg.contains("unknown board `orin-nano-16gb`"), "{msg}");
    for name in reg.names() {
        assert!(msg.contains(&name), "{msg} lacks {name}");
    }
}

#[test]
fn custom_board_by_path_and_by_directory() {
    let path = fixture("board/my-carrier.yaml");
    let reg = BoardRegistry::bundled();
    let b = reg.resolve(path.to_str().unwrap()).unwrap();
    assert_eq!(b.name, "my-carrier");
    assert_eq!(b.usable_bytes(), (8192 - 1500) << 20);

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&path, dir.path().join("my-carrier.yaml")).unwrap();
    let reg = BoardRegistry::bundled().with_dir(dir.path()).unwrap();
    assert!(reg.names().contains(&"my-carrier".to_string()));
    assert_eq!(reg.resolve("my-carrier").unwrap(), b);

    // A file whose name field disagrees with its file name is refused.
    std::fs::copy(&path, dir.path().join("other.yaml")).unwrap();
    let reg = BoardRegistry::bundled().with_dir(dir.path()).unwrap();
    let err = config_error(reg.get("other").unwrap_err());
    assert_eq!(err.field(), Some("name"));
}

#[test]
fn bad_kv_policy_lists_accepted_forms() {
    let msg = "int3-frames"
        .parse::<KvPrecision>()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("int3-frames") && msg.contains("mixed:bits="),
        "{msg}"
    );
}

#[test]
fn zero_tokens_per_frame_is_an_error() {
    let board = BoardRegistry::bundled().get("orin-nano-8gb").unwrap();
    let m = ModelSpec::load(&fixture("configs/smolvlm-256m")).unwrap();
    let w = Workload {
        frames: 4,
        tokens_per_frame: 0,
        prompt_tokens: 64,
        answer_tokens: 128,
    };
    let err = plan::plan(
        &board,
        &m,
        &w,
        &KvPrecision::mixed(),
        &PlanOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokens per frame"), "{err}");
}

#[test]
fn jetvlm_package_reads_decoder_and_encoder_file() {
    let m = ModelSpec::load(&fixture("configs/package-demo")).unwrap();
    assert_eq!(m.tokens_per_frame, Some(16));
    assert_eq!(m.default_kv.as_deref(), Some("mixed"));
    assert_eq!(m.text.hidden_size, 576);
    let v = m.vision.unwrap();
    assert_eq!(v.bytes, 4096);
    assert!(matches!(
        v.source,
        jetvlm_board::VisionSource::OnnxFile { .. }
    ));
}

#[test]
fn package_with_missing_encoder_names_the_manifest_field() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("configs/package-demo");
    std::fs::create_dir(dir.path().join("decoder")).unwrap();
    std::fs::copy(
        src.join("decoder/config.json"),
        dir.path().join("decoder/config.json"),
    )
    .unwrap();
    std::fs::copy(src.join("jetvlm.yaml"), dir.path().join("jetvlm.yaml")).unwrap();
    let err = config_error(ModelSpec::load(dir.path()).unwrap_err());
    assert_eq!(err.field(), Some("vision.encoder"));
    assert!(err.to_string().contains("jetvlm.yaml"));
}
