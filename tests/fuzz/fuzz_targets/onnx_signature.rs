//! The ONNX signature reader (`jetvlm_vision::onnx::parse_model`): the package loader reads
//! the encoder's inputs and outputs straight from the protobuf without ONNX Runtime, so the
//! whole reader is pure Rust and fuzzed here on raw `ModelProto` bytes. A model it accepts
//! has no input that is also an initializer.

#![no_main]

use jetvlm_vision::onnx::parse_model;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_model(data) {
        Ok(sig) => {
            for t in sig.inputs.iter().chain(&sig.outputs) {
                let _ = t.elem.to_string();
                assert!(t.shape.len() <= data.len(), "more dims than input bytes");
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
