//! Results of the kernel selftest and of the NVRTC compile check.

/// One kernel compared with its CPU twin on one input case.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCheck {
    pub kernel: &'static str,
    /// Input description, e.g. `outliers 4-bit per-channel keys`.
    pub case: String,
    /// Normalised error (max |gpu - cpu| / max |cpu|), or the mismatch fraction for codes.
    pub error: f64,
    pub tolerance: f64,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }

    /// `PASS kernel (case) error 1.2e-7 <= 1e-5`.
    pub fn line(&self) -> String {
        format!(
            "{} {:<26} {:<40} error {:.3e} {} {:.0e}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.kernel,
            self.case,
            self.error,
            if self.passed() { "<=" } else { ">" },
            self.tolerance
        )
    }
}

/// One kernel source compiled by NVRTC for one SM.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledKernel {
    pub file: &'static str,
    pub sm: u32,
    pub cubin_bytes: usize,
    pub millis: f64,
}
