//! Quantized decoders (`jetvlm quantize`) on the device path: the device decoder refuses
//! them with an error naming the first quantized matrix (quantized weights run on the CPU
//! decoder only for now). Runs on the simulated device, no GPU needed.

use jetvlm_cuda::{CudaError, DeviceDecoder, SimDevice};
use jetvlm_decoder::quantize::{QuantizeOptions, quantize_dir};
use jetvlm_quant::WeightFormat;
use std::path::Path;

#[test]
fn the_device_decoder_refuses_quantized_weights_naming_the_tensor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoder/llama");
    let tmp = tempfile::tempdir().unwrap();
    for bits in [8, 4] {
        let out = tmp.path().join(format!("q{bits}"));
        let opts = QuantizeOptions {
            format: WeightFormat::new(bits, 32).unwrap(),
            head_int8: false,
        };
        quantize_dir(&src, &out, &opts).unwrap();
        let err = DeviceDecoder::load(&SimDevice::new(), &out).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, CudaError::QuantizedWeights { ref name, .. } if name == "model.layers.0.self_attn.q_proj.weight"),
            "{msg}"
        );
        assert!(msg.contains("CPU decoder only"), "{msg}");
    }
}
