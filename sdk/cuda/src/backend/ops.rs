//! Launchers of the decoder kernels. Shapes are checked on the host before any launch; a
//! mismatch is a [`CudaError::Shape`] naming the operation.

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::{bf16, f16};

use super::device::CudaDevice;
use crate::error::CudaError;

/// Weights on the device in their stored precision.
#[derive(Debug)]
pub enum DeviceWeights {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
    /// A weight-only INT8/INT4 matrix (kernels/gemv_quant.cu).
    Quant(QuantWeights),
}

/// A weight-only quantized `[rows, cols]` matrix on the device, in the layout of
/// [`crate::reference::QuantMatrix`]: codes, FP16 scales and (INT4) FP16 zeros per group.
#[derive(Debug)]
pub struct QuantWeights {
    pub format: jetvlm_quant::WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub codes: CudaSlice<u8>,
    pub scales: CudaSlice<f16>,
    /// INT4 only.
    pub zeros: Option<CudaSlice<f16>>,
}

impl DeviceWeights {
    pub fn len(&self) -> usize {
        match self {
            DeviceWeights::F32(s) => s.len(),
            DeviceWeights::F16(s) => s.len(),
            DeviceWeights::BF16(s) => s.len(),
            DeviceWeights::Quant(q) => q.rows * q.cols,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The kernel suffix of a float tensor; an error naming `op` for a quantized matrix
    /// (only the matrix product reads those).
    fn suffix(&self, op: &'static str) -> Result<&'static str, CudaError> {
        match self {
            DeviceWeights::F32(_) => Ok("f32"),
            DeviceWeights::F16(_) => Ok("f16"),
            DeviceWeights::BF16(_) => Ok("bf16"),
            DeviceWeights::Quant(_) => Err(shape(
                op,
                "a weight-only quantized matrix is read by the matrix product and the \
                 embedding lookup only"
                    .into(),
            )),
        }
    }
}

impl jetvlm_decoder::model::MatrixFormat for DeviceWeights {
    fn quant_format(&self) -> Option<jetvlm_quant::WeightFormat> {
        match self {
            DeviceWeights::Quant(q) => Some(q.format),
            _ => None,
        }
    }
    fn dtype(&self) -> jetvlm_core::DType {
        match self {
            DeviceWeights::F32(_) => jetvlm_core::DType::F32,
            DeviceWeights::F16(_) => jetvlm_core::DType::F16,
            DeviceWeights::BF16(_) => jetvlm_core::DType::BF16,
            // The codes' type, as the CPU decoder's tensors name it.
            DeviceWeights::Quant(q) if q.format.bits() == 8 => jetvlm_core::DType::I8,
            DeviceWeights::Quant(_) => jetvlm_core::DType::U8,
        }
    }
}

pub(crate) use crate::checks::{check_len, shape};

/// Tokens up to which a quantized matrix product runs the decode kernels (`gemv_q*`, 8 tokens
/// per weight read); more run the tiled prefill kernels (`gemm_q*`).
pub const QUANT_GEMV_MAX_TOKENS: usize = 8;

/// Grid-stride launch over `n` items, 256 threads a block.
pub(crate) fn linear(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| shape(op, format!("{what} = {v} exceeds u32")))
}

macro_rules! launch {
    ($dev:expr, $file:expr, $func:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let f = $dev.function($file, $func)?;
        let mut b = $dev.stream().launch_builder(&f);
        $( b.arg($arg); )+
        // SAFETY: argument types and counts follow the kernel's signature in kernels/$file,
        // and every buffer was checked against the sizes the kernel indexes.
        unsafe { b.launch($cfg) }.map_err($crate::backend::device::driver_err("cuLaunchKernel"))?;
    }};
}
pub(crate) use launch;

impl CudaDevice {
    /// `x += y` (element-wise).
    pub fn residual_add(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "residual add";
        crate::checks::check_residual_add([x.len(), y.len()], n)?;
        let n32 = u32_of(OP, "n", n)?;
        launch!(
            self,
            "elementwise.cu",
            "residual_add_f32",
            linear(n),
            x,
            y,
            &n32
        );
        Ok(())
    }

    /// `y[t][r] += b[r]` for `n_tok` rows of `rows`.
    pub fn bias_add(
        &self,
        y: &mut CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rows: usize,
        n_tok: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "bias add";
        crate::checks::check_bias_add([y.len(), b.len()], rows, n_tok)?;
        if rows == 0 || n_tok == 0 {
            return Ok(());
        }
        let (r, n) = (u32_of(OP, "rows", rows)?, u32_of(OP, "tokens", n_tok)?);
        launch!(
            self,
            "elementwise.cu",
            "bias_add_f32",
            linear(rows * n_tok),
            y,
            b,
            &r,
            &n
        );
        Ok(())
    }

    /// Fills the first `n` elements of `out` with the synthetic bell-shaped values of `seed`
    /// ([`crate::reference::bell_value`]).
    pub fn fill_bell(
        &self,
        out: &mut CudaSlice<f32>,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<(), CudaError> {
        check_len("fill bell", "out", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            "elementwise.cu",
            "fill_bell_f32",
            linear(n),
            out,
            &n64,
            &seed,
            &scale
        );
        Ok(())
    }

    /// Reads `x` once with `blocks` thread blocks (`partial[b]` = block sums; `x.len()` must be
    /// a multiple of 4). The timed half of the device read-bandwidth measurement.
    pub fn read_sum(
        &self,
        x: &CudaSlice<f32>,
        partial: &mut CudaSlice<f32>,
        blocks: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "read sum";
        if !x.len().is_multiple_of(4) || blocks == 0 {
            return Err(shape(
                OP,
                format!(
                    "{} elements in {blocks} blocks (need a multiple of 4, blocks > 0)",
                    x.len()
                ),
            ));
        }
        check_len(OP, "partial", partial.len(), blocks)?;
        let n4 = (x.len() / 4) as u64;
        let cfg = LaunchConfig {
            grid_dim: (u32_of(OP, "blocks", blocks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "elementwise.cu", "read_sum_f32", cfg, x, &n4, partial);
        Ok(())
    }

    /// `out = silu(gate) * up`.
    pub fn swiglu(
        &self,
        out: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "swiglu";
        crate::checks::check_swiglu([out.len(), gate.len(), up.len()], n)?;
        let n32 = u32_of(OP, "n", n)?;
        launch!(
            self,
            "elementwise.cu",
            "swiglu_f32",
            linear(n),
            out,
            gate,
            up,
            &n32
        );
        Ok(())
    }

    /// `out = gelu_tanh(gate) * up` (Gemma's GeGLU).
    pub fn geglu(
        &self,
        out: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "geglu";
        crate::checks::check_gated(OP, [out.len(), gate.len(), up.len()], n)?;
        let n32 = u32_of(OP, "n", n)?;
        launch!(
            self,
            "elementwise.cu",
            "geglu_f32",
            linear(n),
            out,
            gate,
            up,
            &n32
        );
        Ok(())
    }

    /// `x[..n] = cap * tanh(x / cap)` (Gemma's final logit softcapping).
    pub fn softcap(&self, x: &mut CudaSlice<f32>, n: usize, cap: f32) -> Result<(), CudaError> {
        const OP: &str = "softcap";
        check_len(OP, "x", x.len(), n)?;
        let n32 = u32_of(OP, "n", n)?;
        launch!(
            self,
            "elementwise.cu",
            "softcap_f32",
            linear(n),
            x,
            &n32,
            &cap
        );
        Ok(())
    }

    /// `x[..n] = round(x * scale)`, the f32 product rounded to `round` (f16, bf16; other
    /// types keep it): Gemma's embedding scaling in the table's type.
    pub fn scale_round(
        &self,
        x: &mut CudaSlice<f32>,
        n: usize,
        scale: f32,
        round: jetvlm_core::DType,
    ) -> Result<(), CudaError> {
        const OP: &str = "scale round";
        check_len(OP, "x", x.len(), n)?;
        let n32 = u32_of(OP, "n", n)?;
        let mode: u32 = match round {
            jetvlm_core::DType::F16 => 1,
            jetvlm_core::DType::BF16 => 2,
            _ => 0,
        };
        launch!(
            self,
            "elementwise.cu",
            "scale_round_f32",
            linear(n),
            x,
            &n32,
            &scale,
            &mode
        );
        Ok(())
    }

    /// `out[t] = table[ids[t]]` for a `[vocab][hidden]` table; ids outside the vocabulary are
    /// an error naming the id. A quantized table's rows are dequantized as they are read
    /// (`embedding_gather_q8` / `embedding_gather_q4`).
    pub fn embedding(
        &self,
        out: &mut CudaSlice<f32>,
        table: &DeviceWeights,
        ids: &[u32],
        hidden: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "embedding gather";
        let vocab = crate::checks::check_embedding(table.len(), hidden, ids, out.len())?;
        if ids.is_empty() {
            return Ok(());
        }
        let d_ids = self.upload(ids)?;
        let (n, h, v) = (
            u32_of(OP, "ids", ids.len())?,
            u32_of(OP, "hidden", hidden)?,
            u32_of(OP, "vocab", vocab)?,
        );
        let cfg = linear(ids.len() * hidden);
        if let DeviceWeights::Quant(q) = table {
            crate::checks::check_quant_table(q.cols, hidden)?;
            let g = u32_of(OP, "group", q.format.group())?;
            let file = "gemv_quant.cu";
            match (&q.zeros, q.format.bits()) {
                (None, 8) => launch!(
                    self,
                    file,
                    "embedding_gather_q8",
                    cfg,
                    out,
                    &q.codes,
                    &q.scales,
                    &d_ids,
                    &n,
                    &h,
                    &v,
                    &g
                ),
                (Some(z), 4) => launch!(
                    self,
                    file,
                    "embedding_gather_q4",
                    cfg,
                    out,
                    &q.codes,
                    &q.scales,
                    z,
                    &d_ids,
                    &n,
                    &h,
                    &v,
                    &g
                ),
                (z, bits) => {
                    return Err(shape(
                        OP,
                        format!(
                            "INT{bits} table {} zeros: the kernels take INT8 without, INT4 with",
                            if z.is_some() { "with" } else { "without" }
                        ),
                    ));
                }
            }
            return Ok(());
        }
        let name = format!("embedding_gather_{}", table.suffix(OP)?);
        match table {
            DeviceWeights::F32(t) => launch!(
                self,
                "elementwise.cu",
                &name,
                cfg,
                out,
                t,
                &d_ids,
                &n,
                &h,
                &v
            ),
            DeviceWeights::F16(t) => launch!(
                self,
                "elementwise.cu",
                &name,
                cfg,
                out,
                t,
                &d_ids,
                &n,
                &h,
                &v
            ),
            DeviceWeights::BF16(t) => launch!(
                self,
                "elementwise.cu",
                &name,
                cfg,
                out,
                t,
                &d_ids,
                &n,
                &h,
                &v
            ),
            DeviceWeights::Quant(_) => unreachable!("suffix() refused a quantized table"),
        }
        Ok(())
    }

    /// RMSNorm of `rows` rows of `dim`: `out = x / sqrt(mean(x^2) + eps) * weight`.
    pub fn rmsnorm(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &DeviceWeights,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm";
        crate::checks::check_rmsnorm([x.len(), out.len(), weight.len()], rows, dim)?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (u32_of(OP, "rows", rows)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d = u32_of(OP, "dim", dim)?;
        let name = format!("rmsnorm_{}", weight.suffix(OP)?);
        match weight {
            DeviceWeights::F32(w) => launch!(self, "rmsnorm.cu", &name, cfg, out, x, w, &d, &eps),
            DeviceWeights::F16(w) => launch!(self, "rmsnorm.cu", &name, cfg, out, x, w, &d, &eps),
            DeviceWeights::BF16(w) => launch!(self, "rmsnorm.cu", &name, cfg, out, x, w, &d, &eps),
            DeviceWeights::Quant(_) => unreachable!("suffix() refused a quantized weight"),
        }
        Ok(())
    }

    /// Rotary embedding in place on `x[n_tokens][n_heads][head_dim]` (rotate-half layout),
    /// `positions[n_tokens]`, `inv_freq[rotary_dim / 2]`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "rope";
        crate::checks::check_rope(
            [x.len(), positions.len(), inv_freq.len()],
            n_tokens,
            n_heads,
            head_dim,
            rotary_dim,
        )?;
        let (t, h, d, r) = (
            u32_of(OP, "tokens", n_tokens)?,
            u32_of(OP, "heads", n_heads)?,
            u32_of(OP, "head_dim", head_dim)?,
            u32_of(OP, "rotary_dim", rotary_dim)?,
        );
        launch!(
            self,
            "rope.cu",
            "rope_f32",
            linear(n_tokens * n_heads * rotary_dim / 2),
            x,
            positions,
            inv_freq,
            &t,
            &h,
            &d,
            &r
        );
        Ok(())
    }

    /// `y[t][r] = sum_c w[r][c] * x[t][c]` for `n_tok` tokens, `w` row-major `[rows][cols]`.
    pub fn gemv(
        &self,
        y: &mut CudaSlice<f32>,
        w: &DeviceWeights,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        n_tok: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "gemv";
        crate::checks::check_gemv([w.len(), x.len(), y.len()], rows, cols, n_tok)?;
        if rows == 0 || n_tok == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(OP, "rows", rows.div_ceil(8))?,
                u32_of(OP, "tokens", n_tok.div_ceil(8))?.min(65_535),
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        if n_tok.div_ceil(8) > 65_535 {
            return Err(shape(
                OP,
                format!("{n_tok} tokens in one call (at most {})", 65_535 * 8),
            ));
        }
        let (r, c, n) = (
            u32_of(OP, "rows", rows)?,
            u32_of(OP, "cols", cols)?,
            u32_of(OP, "tokens", n_tok)?,
        );
        match w {
            DeviceWeights::F32(ws) => {
                launch!(self, "gemv.cu", "gemv_f32", cfg, y, ws, x, &r, &c, &n)
            }
            DeviceWeights::F16(ws) => {
                launch!(self, "gemv.cu", "gemv_f16", cfg, y, ws, x, &r, &c, &n)
            }
            DeviceWeights::BF16(ws) => {
                launch!(self, "gemv.cu", "gemv_bf16", cfg, y, ws, x, &r, &c, &n)
            }
            DeviceWeights::Quant(q) => self.gemv_quant(y, q, x, rows, cols, n_tok, None)?,
        }
        Ok(())
    }

    /// [`Self::gemv`] of a quantized matrix: the warp-per-row `gemv_q*` kernels for up to
    /// [`QUANT_GEMV_MAX_TOKENS`] tokens (decode), the tiled `gemm_q*` kernels above (prefill);
    /// `force_gemm` picks one (the selftest runs both on the same shapes).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_quant(
        &self,
        y: &mut CudaSlice<f32>,
        q: &QuantWeights,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        n_tok: usize,
        force_gemm: Option<bool>,
    ) -> Result<(), CudaError> {
        const OP: &str = "quantized gemv";
        crate::checks::check_quant_shape((q.rows, q.cols), (rows, cols))?;
        crate::checks::check_gemv([q.rows * q.cols, x.len(), y.len()], rows, cols, n_tok)?;
        if rows == 0 || n_tok == 0 {
            return Ok(());
        }
        let (r, c, n) = (
            u32_of(OP, "rows", rows)?,
            u32_of(OP, "cols", cols)?,
            u32_of(OP, "tokens", n_tok)?,
        );
        let g = u32_of(OP, "group", q.format.group())?;
        let gemm = force_gemm.unwrap_or(n_tok > QUANT_GEMV_MAX_TOKENS);
        let (rows_per, toks_per) = if gemm { (64, 32) } else { (8, 8) };
        let grid_y = n_tok.div_ceil(toks_per);
        if grid_y > 65_535 {
            return Err(shape(
                OP,
                format!("{n_tok} tokens in one call (at most {})", 65_535 * toks_per),
            ));
        }
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(OP, "rows", rows.div_ceil(rows_per))?,
                grid_y as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let file = "gemv_quant.cu";
        match (&q.zeros, q.format.bits(), gemm) {
            (None, 8, false) => launch!(
                self, file, "gemv_q8", cfg, y, &q.codes, &q.scales, x, &r, &c, &g, &n
            ),
            (None, 8, true) => launch!(
                self, file, "gemm_q8", cfg, y, &q.codes, &q.scales, x, &r, &c, &g, &n
            ),
            (Some(z), 4, false) => {
                launch!(
                    self, file, "gemv_q4", cfg, y, &q.codes, &q.scales, z, x, &r, &c, &g, &n
                )
            }
            (Some(z), 4, true) => {
                launch!(
                    self, file, "gemm_q4", cfg, y, &q.codes, &q.scales, z, x, &r, &c, &g, &n
                )
            }
            (z, bits, _) => {
                return Err(shape(
                    OP,
                    format!(
                        "INT{bits} weights {} zeros: the kernels take INT8 without, INT4 with",
                        if z.is_some() { "with" } else { "without" }
                    ),
                ));
            }
        }
        Ok(())
    }

    /// M-RoPE in place on `x[n_tokens][n_heads][head_dim]`, `positions3[n_tokens][3]`
    /// (temporal, row, column), `inv_freq[head_dim / 2]`, frequency pairs split by `section`
    /// in contiguous sections (`rope_mrope_f32`) or, `interleaved`, as Qwen3-VL interleaves
    /// them (`rope_mrope_interleaved_f32`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_mrope(
        &self,
        x: &mut CudaSlice<f32>,
        positions3: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        section: [usize; 3],
        interleaved: bool,
    ) -> Result<(), CudaError> {
        const OP: &str = "rope mrope";
        crate::checks::check_rope_mrope(
            [x.len(), positions3.len(), inv_freq.len()],
            n_tokens,
            n_heads,
            head_dim,
            section,
        )?;
        // The kernels' two section arguments: (temporal, row) pairs of the contiguous
        // layout, (row, column) of the interleaved one.
        let (first, kernel) = if interleaved {
            (1, "rope_mrope_interleaved_f32")
        } else {
            (0, "rope_mrope_f32")
        };
        let (t, h, d, s0, s1) = (
            u32_of(OP, "tokens", n_tokens)?,
            u32_of(OP, "heads", n_heads)?,
            u32_of(OP, "head_dim", head_dim)?,
            u32_of(OP, "section", section[first])?,
            u32_of(OP, "section", section[first + 1])?,
        );
        launch!(
            self,
            "rope.cu",
            kernel,
            linear(n_tokens * n_heads * head_dim / 2),
            x,
            positions3,
            inv_freq,
            &t,
            &h,
            &d,
            &s0,
            &s1
        );
        Ok(())
    }
}
