//! A checkpoint with a NaN or infinite weight is an error naming the tensor by its checkpoint
//! name and file: at load for norms and biases, at the first forward pass for matrices (the
//! K/V the cache refuses, or the logits), never a bare "KV cache: write" error and never a
//! run of garbage tokens.

use jetvlm_decoder::{DecoderError, F32KvCache, Input, LoadOptions, Model};
use jetvlm_kvcache::MixedKvCache;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/decoder/qwen2")
}

/// A copy of the Qwen2 fixture (F32 weights, tied LM head) with element `index` of tensor
/// `name` set to `value`.
fn poisoned(name: &str, index: usize, value: f32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + header_len + start + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    dir
}

fn load(dir: &Path) -> Result<Model, DecoderError> {
    Model::load(dir, &LoadOptions::default())
}

/// The error of a forward pass over a short prompt, on the mixed cache (FP16 text: the cache
/// refuses a non-finite K/V) and on the exact f32 cache (it stores anything; the logits show it).
fn forward_errors(model: &Model) -> Vec<DecoderError> {
    let ids = [1u32, 5, 9, 42, 7];
    let mut mixed = MixedKvCache::new(model.cache_shape(), "fp16".parse().unwrap(), 64).unwrap();
    let mut exact = F32KvCache::new(model.cache_shape(), 64);
    [
        model.forward(&[Input::text(&ids)], &mut mixed).err(),
        model.forward(&[Input::text(&ids)], &mut exact).err(),
    ]
    .into_iter()
    .map(|e| e.expect("a forward pass over a poisoned weight succeeded"))
    .collect()
}

fn assert_names(e: &DecoderError, tensor: &str, index: usize) {
    match e {
        DecoderError::NonFiniteWeight {
            name,
            path,
            index: i,
            ..
        } => {
            assert_eq!(name, tensor);
            assert_eq!(*i, index);
            assert!(path.ends_with("model.safetensors"), "{}", path.display());
        }
        other => panic!("expected a non-finite weight named {tensor}, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(tensor) && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn a_non_finite_norm_or_bias_is_refused_at_load_naming_it() {
    for (name, index, value) in [
        ("model.layers.0.input_layernorm.weight", 3, f32::NAN),
        ("model.layers.1.self_attn.k_proj.bias", 60, f32::INFINITY),
        ("model.norm.weight", 0, f32::NEG_INFINITY),
    ] {
        let d = poisoned(name, index, value);
        let Err(e) = load(d.path()) else {
            panic!("{name}: loaded with a non-finite element")
        };
        assert_names(&e, name, index);
    }
}

#[test]
fn a_non_finite_matrix_is_named_at_the_first_forward_pass() {
    for (name, index) in [
        // Layer 0's keys: the cache refuses the K it writes.
        ("model.layers.0.self_attn.k_proj.weight", 17),
        // The last layer's MLP: no K/V after it, only the logits show it.
        ("model.layers.1.mlp.down_proj.weight", 100),
        // The tied embedding table / LM head, in a row no prompt token uses.
        ("model.embed_tokens.weight", 400 * 64 + 5),
    ] {
        let d = poisoned(name, index, f32::NAN);
        let model = load(d.path()).unwrap();
        for e in forward_errors(&model) {
            assert_names(&e, name, index);
        }
    }
}

#[test]
fn finite_weights_run_and_an_untouched_copy_is_not_blamed() {
    let d = poisoned("model.layers.0.self_attn.k_proj.weight", 17, 0.25);
    let model = load(d.path()).unwrap();
    let ids = [1u32, 5, 9, 42, 7];
    let mut exact = F32KvCache::new(model.cache_shape(), 64);
    let logits = model.forward(&[Input::text(&ids)], &mut exact).unwrap();
    assert!(logits.last().iter().all(|v| v.is_finite()));
}
