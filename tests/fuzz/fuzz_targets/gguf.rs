//! `Gguf::parse` (the reader behind `jetvlm quantize --from FILE.gguf`) on the fuzzed bytes.
//! A file it accepts must describe tensors whose bytes lie inside the file, sized for their
//! dimensions and type, and the Q8_0 / Q4_0 conversions of those bytes must give one code per
//! weight (two per byte for Q4_0) and one scale per block of 32; the Q4_K / Q6_K conversions
//! give one INT4 / INT8 code per weight and one scale per 32, or an error.

#![no_main]

use jetvlm_quant::gguf::{GgmlType, Gguf, QK_K, q4_0_to_int4, q8_0_to_int8, to_quant_row};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(gguf) = Gguf::parse(data) else {
        return;
    };
    for (key, _) in &gguf.metadata {
        assert!(gguf.get(key).is_some(), "metadata key `{key}` not found");
    }
    for t in &gguf.tensors {
        let end = t
            .start
            .checked_add(t.len)
            .unwrap_or_else(|| panic!("tensor `{}`: range overflows", t.name));
        assert!(end <= data.len(), "tensor `{}` ends past the file", t.name);
        assert!(gguf.tensor(&t.name).is_some());
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or_else(|| panic!("tensor `{}`: accepted dims overflow", t.name));
        if let Some(len) = t.ty.bytes(n) {
            assert_eq!(t.len as u64, len, "tensor `{}`: size for its dims", t.name);
        }
        let bytes = &data[t.start..end];
        match t.ty {
            GgmlType::Q8_0 => {
                let row = q8_0_to_int8(bytes).expect("an accepted Q8_0 tensor is whole blocks");
                assert_eq!(row.codes.len() as u64, n);
                assert_eq!(row.scales.len() as u64, n / 32);
            }
            GgmlType::Q4_0 => {
                let row = q4_0_to_int4(bytes).expect("an accepted Q4_0 tensor is whole blocks");
                assert_eq!(row.codes.len() as u64, n / 2);
                assert_eq!(row.scales.len() as u64, n / 32);
                assert_eq!(row.zeros.len() as u64, n / 32);
            }
            GgmlType::Q4_K | GgmlType::Q6_K => {
                // Whole super-blocks: converted, or refused with an error (a non-finite
                // scale), never a panic.
                if let Ok((fmt, row)) = to_quant_row(t.ty, bytes) {
                    assert_eq!(row.codes.len() as u64, n * fmt.bits() as u64 / 8);
                    assert_eq!(row.scales.len() as u64, n / 32);
                    assert_eq!(n % QK_K as u64, 0);
                }
            }
            _ => {}
        }
    }
});
