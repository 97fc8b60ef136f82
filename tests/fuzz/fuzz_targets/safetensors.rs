//! `Weights::open` on a model directory whose `model.safetensors` is the fuzzed bytes, next
//! to a fixed `config.json` that declares a dtype (so the embedding dtype check runs too).
//! Every tensor the header declares is then fetched with its own shape and read: a header
//! that `open` accepts must describe data that lies inside the file.

#![no_main]

use jetvlm_decoder::Weights;
use jetvlm_fuzz::write;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"}"#;

fuzz_target!(|data: &[u8]| {
    write("model/config.json", CONFIG.as_bytes());
    let file = write("model/model.safetensors", data);
    let dir = file.parent().expect("scratch file has a parent");
    let Ok(weights) = Weights::open(dir) else {
        return;
    };
    assert_eq!(weights.file_bytes(), data.len() as u64);
    // The library's view of the same header names every tensor and its shape.
    let st = safetensors::SafeTensors::deserialize(data)
        .expect("Weights::open accepted a header safetensors refuses");
    for (name, view) in st.tensors() {
        assert!(
            weights.contains(&name),
            "tensor `{name}` missing from the table"
        );
        let Ok(t) = weights.get(&name, view.shape()) else {
            continue; // a dtype the decoder does not read
        };
        assert_eq!(t.shape(), view.shape());
        assert_eq!(t.size_bytes(), view.data().len());
        let values = t.data();
        assert_eq!(values.len(), t.numel());
        if let Some(i) = values.len().checked_sub(1) {
            let _ = values.get(i);
        }
        if t.numel() <= 1 << 16 {
            assert_eq!(t.to_f32_vec().len(), t.numel());
        }
    }
});
