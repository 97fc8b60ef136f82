//! Bad model directories give typed errors that name the file and tensor, never a panic.

use jetvlm_decoder::{DecoderError, LoadOptions, Model, Tokenizer};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/decoder")
        .join(name)
}

/// A writable copy of a fixture model directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> DecoderError {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} succeeded", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_shard_names_the_shard() {
    let d = copy_fixture("llama");
    // The second of the fixture's shards (`model-00002-of-0000N.safetensors`).
    let shard = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("model-00002-of-") && n.ends_with(".safetensors"))
        .unwrap();
    std::fs::remove_file(d.path().join(&shard)).unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, DecoderError::Index { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&shard) && msg.contains("model.safetensors.index.json"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let d = copy_fixture("qwen2");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, DecoderError::Safetensors { .. }), "{e:?}");
    assert!(
        e.to_string().contains("model.safetensors") && e.to_string().contains("truncated"),
        "{e}"
    );
    // Cut inside the header too.
    std::fs::write(&p, &bytes[..5]).unwrap();
    assert!(matches!(
        load_err(d.path()),
        DecoderError::Safetensors { .. }
    ));
}

#[test]
fn wrong_shape_names_tensor_file_and_shapes() {
    let d = copy_fixture("qwen2");
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    match &e {
        DecoderError::Shape {
            name,
            path,
            expected,
            actual,
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert!(path.ends_with("model.safetensors"));
            assert_eq!(expected, &vec![96, 64]);
            assert_eq!(actual, &vec![160, 64]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(
        e.to_string()
            .contains("model.layers.0.mlp.gate_proj.weight"),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_it() {
    let d = copy_fixture("qwen2");
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        matches!(e, DecoderError::MissingTensor { ref name, .. } if name == "model.layers.2.input_layernorm.weight"),
        "{e:?}"
    );
}

#[test]
fn unsupported_architecture_names_it_and_the_file() {
    let d = copy_fixture("qwen2");
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    cfg["model_type"] = serde_json::json!("mamba");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, DecoderError::Config(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("MambaForCausalLM") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn unparsable_tokenizer_names_the_file() {
    let d = copy_fixture("qwen2");
    std::fs::write(
        d.path().join("tokenizer.json"),
        "{\"model\": {\"type\": \"BPE\", \"vocab\": 3",
    )
    .unwrap();
    let e = Tokenizer::from_dir(d.path()).unwrap_err();
    assert!(matches!(e, DecoderError::Tokenizer { .. }), "{e:?}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    assert!(matches!(
        Tokenizer::from_dir(d.path()).unwrap_err(),
        DecoderError::Io { .. }
    ));
}

#[test]
fn broken_chat_template_names_the_file() {
    let d = copy_fixture("qwen2");
    let p = d.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["chat_template"] = serde_json::json!("{% for m in messages %}{{ m.content ");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let tok = Tokenizer::from_dir(d.path()).unwrap();
    let e = tok
        .apply_chat_template(&[jetvlm_decoder::ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(
        matches!(e, DecoderError::ChatTemplate { .. })
            && e.to_string().contains("tokenizer_config.json"),
        "{e}"
    );
}
