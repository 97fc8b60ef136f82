//! The `.cu` kernel sources, embedded in the binary. They are compiled at run time with NVRTC
//! for the device's exact SM; nothing needs nvcc. Each source is `kernels/common.cuh` (the
//! shared FP16/BF16 helpers), a `#line 1` directive naming the file, then the file itself.

/// `common.cuh`, a `#line` directive and the `.cu` file, as one static string.
macro_rules! kernel_file {
    ($file:literal) => {
        concat!(
            include_str!("../kernels/common.cuh"),
            "#line 1 \"",
            $file,
            "\"\n",
            include_str!(concat!("../kernels/", $file))
        )
    };
}

/// One kernel source file and the functions it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `sdk/cuda/kernels/`.
    pub file: &'static str,
    pub source: &'static str,
    /// `extern "C"` entry points.
    pub functions: &'static [&'static str],
}

impl KernelSource {
    /// Name without the `.cu` extension.
    pub fn stem(&self) -> &'static str {
        self.file.strip_suffix(".cu").unwrap_or(self.file)
    }

    /// 64-bit FNV-1a hash of the file name and source, the source part of the cache key.
    pub fn source_hash(&self) -> u64 {
        fnv1a(
            self.file.as_bytes(),
            fnv1a(self.source.as_bytes(), 0xcbf2_9ce4_8422_2325),
        )
    }
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Every kernel source of the backend.
pub const KERNELS: &[KernelSource] = &[
    KernelSource {
        file: "elementwise.cu",
        source: kernel_file!("elementwise.cu"),
        functions: &[
            "residual_add_f32",
            "swiglu_f32",
            "geglu_f32",
            "softcap_f32",
            "scale_round_f32",
            "embedding_gather_f32",
            "embedding_gather_f16",
            "embedding_gather_bf16",
            "bias_add_f32",
            "fill_bell_f32",
            "read_sum_f32",
        ],
    },
    KernelSource {
        file: "rmsnorm.cu",
        source: kernel_file!("rmsnorm.cu"),
        functions: &["rmsnorm_f32", "rmsnorm_f16", "rmsnorm_bf16"],
    },
    KernelSource {
        file: "rope.cu",
        source: kernel_file!("rope.cu"),
        functions: &["rope_f32", "rope_mrope_f32", "rope_mrope_interleaved_f32"],
    },
    KernelSource {
        file: "gemv.cu",
        source: kernel_file!("gemv.cu"),
        functions: &["gemv_f32", "gemv_f16", "gemv_bf16"],
    },
    KernelSource {
        file: "gemv_quant.cu",
        source: kernel_file!("gemv_quant.cu"),
        functions: &[
            "gemv_q8",
            "gemv_q4",
            "gemm_q8",
            "gemm_q4",
            "embedding_gather_q8",
            "embedding_gather_q4",
        ],
    },
    KernelSource {
        file: "kv_quant.cu",
        source: kernel_file!("kv_quant.cu"),
        functions: &[
            "kv_store_f16",
            "kv_quant_params_token",
            "kv_quant_params_channel",
            "kv_quant_codes",
        ],
    },
    KernelSource {
        file: "attention.cu",
        source: kernel_file!("attention.cu"),
        functions: &[
            "mixed_attention_partial_e2_g1",
            "mixed_attention_partial_e2_g4",
            "mixed_attention_partial_e2_g8",
            "mixed_attention_partial_e4_g1",
            "mixed_attention_partial_e4_g4",
            "mixed_attention_partial_e4_g8",
            "mixed_attention_partial_e8_g1",
            "mixed_attention_partial_e8_g4",
            "mixed_attention_partial_e8_g8",
            "mixed_attention_combine",
        ],
    },
];

/// The kernel source named `file` (with or without `.cu`).
pub fn kernel_source(file: &str) -> Option<&'static KernelSource> {
    KERNELS.iter().find(|k| k.file == file || k.stem() == file)
}

/// Architectures the kernels are checked against without a GPU: Xavier, Orin, H100.
pub const CHECKED_ARCHS: &[u32] = &[72, 87, 90];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_function_is_defined_extern_c() {
        for k in KERNELS {
            for f in k.functions {
                let def = k
                    .source
                    .lines()
                    .any(|l| l.contains("extern \"C\"") && l.contains(&format!(" {f}(")))
                    || k.source.contains(&format!(") {f}(")) && k.source.contains("extern \"C\"");
                assert!(def, "{} does not define {f}", k.file);
            }
            // No includes: NVRTC compiles the sources without any include path.
            let include = k
                .source
                .lines()
                .find(|l| l.trim_start().starts_with("#include"));
            assert!(include.is_none(), "{}: {include:?}", k.file);
        }
    }

    #[test]
    fn hashes_differ_per_source_and_are_stable() {
        let hashes: std::collections::HashSet<u64> =
            KERNELS.iter().map(|k| k.source_hash()).collect();
        assert_eq!(hashes.len(), KERNELS.len());
        assert_eq!(KERNELS[0].source_hash(), KERNELS[0].source_hash());
        assert!(
            kernel_source("rope").is_some()
                && kernel_source("rope.cu").is_some()
                && kernel_source("x").is_none()
        );
    }
}
