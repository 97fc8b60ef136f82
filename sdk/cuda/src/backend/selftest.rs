//! Every kernel against its CPU twin ([`crate::reference`]) on random and outlier-heavy inputs.

use half::{bf16, f16};

use super::device::CudaDevice;
use super::ops::{DeviceWeights, QuantWeights, launch, linear};
use crate::error::CudaError;
use crate::gpu::Splits;
use crate::inputs::Rng;
use crate::layout::{BlockEntry, BlockKind, KvLayout, SEES_ALL};
use crate::reference::{self as cpu, HostPools, normalized_error};
use crate::selftest::KernelCheck;

fn check(kernel: &'static str, case: impl Into<String>, error: f64, tolerance: f64) -> KernelCheck {
    KernelCheck {
        kernel,
        case: case.into(),
        error,
        tolerance,
    }
}

/// Inputs: plain normals, or outlier-heavy rows of `row` elements.
fn values(rng: &mut Rng, n: usize, row: usize, outliers: bool) -> Vec<f32> {
    if outliers {
        rng.outlier_normals(n, row)
    } else {
        rng.normals(n)
    }
}

fn kind(outliers: bool) -> &'static str {
    if outliers { "outliers" } else { "random" }
}

/// Weights in each stored precision, with their f32 widening for the twin.
fn weights(
    dev: &CudaDevice,
    w: &[f32],
    dtype: &str,
) -> Result<(DeviceWeights, Vec<f32>), CudaError> {
    Ok(match dtype {
        "f16" => {
            let h: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
            let wide = h.iter().map(|x| x.to_f32()).collect();
            (DeviceWeights::F16(dev.upload(&h)?), wide)
        }
        "bf16" => {
            let h: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            let wide = h.iter().map(|x| x.to_f32()).collect();
            (DeviceWeights::BF16(dev.upload(&h)?), wide)
        }
        _ => (DeviceWeights::F32(dev.upload(w)?), w.to_vec()),
    })
}

impl CudaDevice {
    /// Runs every kernel against its CPU twin; one [`KernelCheck`] per kernel and case.
    pub fn selftest(&self, seed: u64) -> Result<Vec<KernelCheck>, CudaError> {
        let mut rng = Rng::new(seed);
        let mut out = Vec::new();
        for outliers in [false, true] {
            self.check_elementwise(&mut rng, outliers, &mut out)?;
            self.check_rmsnorm_rope(&mut rng, outliers, &mut out)?;
            self.check_gemv(&mut rng, outliers, &mut out)?;
            self.check_gemv_quant(&mut rng, outliers, &mut out)?;
        }
        self.check_kv(&mut rng, &mut out)?;
        self.check_memory(&mut rng, &mut out)?;
        Ok(out)
    }

    /// Chunked upload (weights loading) and a kernel reading mapped host memory in place.
    fn check_memory(&self, rng: &mut Rng, out: &mut Vec<KernelCheck>) -> Result<(), CudaError> {
        let data = rng.normals(100_003);
        let d = self.upload_chunked::<f32, _>(data.len(), 4096, |off, chunk| {
            chunk.copy_from_slice(&data[off..off + chunk.len()]);
            Ok(())
        })?;
        out.push(check(
            "upload_chunked",
            "100003 f32 in 4096-element chunks",
            normalized_error(&self.download(&d)?, &data),
            0.0,
        ));
        if self.info().can_map_host_memory {
            let n = 4099;
            let (a, b) = (rng.normals(n), rng.normals(n));
            let mut mapped = self.mapped_host_buffer::<f32>(n)?;
            mapped.as_mut_slice()?.copy_from_slice(&b);
            let mut x = self.upload(&a)?;
            let (ptr, n32) = (mapped.device_ptr(), n as u32);
            launch!(
                self,
                "elementwise.cu",
                "residual_add_f32",
                linear(n),
                &mut x,
                &ptr,
                &n32
            );
            let mut want = a.clone();
            cpu::residual_add(&mut want, &b);
            out.push(check(
                "mapped host memory",
                "kernel reads pinned host buffer in place",
                normalized_error(&self.download(&x)?, &want),
                0.0,
            ));
        }
        Ok(())
    }

    fn check_elementwise(
        &self,
        rng: &mut Rng,
        outliers: bool,
        out: &mut Vec<KernelCheck>,
    ) -> Result<(), CudaError> {
        let n = 4099;
        let a = values(rng, n, 64, outliers);
        let b = values(rng, n, 64, outliers);
        let mut x = self.upload(&a)?;
        self.residual_add(&mut x, &self.upload(&b)?, n)?;
        let mut want = a.clone();
        cpu::residual_add(&mut want, &b);
        out.push(check(
            "residual_add_f32",
            kind(outliers),
            normalized_error(&self.download(&x)?, &want),
            0.0,
        ));

        let rows = 97;
        let bias = values(rng, rows, rows, outliers);
        let ys = values(rng, rows * 5, rows, outliers);
        let mut y = self.upload(&ys)?;
        self.bias_add(&mut y, &self.upload(&bias)?, rows, 5)?;
        let mut want = ys.clone();
        cpu::bias_add(&mut want, &bias);
        out.push(check(
            "bias_add_f32",
            kind(outliers),
            normalized_error(&self.download(&y)?, &want),
            0.0,
        ));

        if !outliers {
            let seed = rng.next_u64();
            let mut f = self.zeros::<f32>(n)?;
            self.fill_bell(&mut f, n, seed, 0.5)?;
            let want: Vec<f32> = (0..n as u64)
                .map(|i| cpu::bell_value(seed, i, 0.5))
                .collect();
            out.push(check(
                "fill_bell_f32",
                format!("seed {seed:#x}"),
                normalized_error(&self.download(&f)?, &want),
                1e-7,
            ));
            // Enough float4s for the kernel's 4-load loop and a remainder.
            let m = (1 << 20) + 52;
            let data = rng.normals(m);
            let blocks = 37;
            let mut partial = self.zeros::<f32>(blocks)?;
            self.read_sum(&self.upload(&data)?, &mut partial, blocks)?;
            let got: f64 = self.download(&partial)?.iter().map(|&v| v as f64).sum();
            let want: f64 = data.iter().map(|&v| v as f64).sum();
            let abs: f64 = data.iter().map(|&v| (v as f64).abs()).sum();
            out.push(check(
                "read_sum_f32",
                format!("{m} f32 in {blocks} blocks"),
                (got - want).abs() / abs,
                1e-5,
            ));
        }

        let mut o = self.zeros::<f32>(n)?;
        self.swiglu(&mut o, &self.upload(&a)?, &self.upload(&b)?, n)?;
        out.push(check(
            "swiglu_f32",
            kind(outliers),
            normalized_error(&self.download(&o)?, &cpu::swiglu(&a, &b)),
            1e-5,
        ));
        let mut o = self.zeros::<f32>(n)?;
        self.geglu(&mut o, &self.upload(&a)?, &self.upload(&b)?, n)?;
        out.push(check(
            "geglu_f32",
            kind(outliers),
            normalized_error(&self.download(&o)?, &cpu::geglu(&a, &b)),
            1e-5,
        ));
        // Logit-sized values around the cap (Gemma 2's 30), and well inside it.
        for cap in [30.0f32, 1.5] {
            let logits: Vec<f32> = a.iter().map(|v| v * 20.0).collect();
            let mut x = self.upload(&logits)?;
            self.softcap(&mut x, n, cap)?;
            let mut want = logits.clone();
            cpu::softcap(&mut want, cap);
            out.push(check(
                "softcap_f32",
                format!("{} cap {cap}", kind(outliers)),
                normalized_error(&self.download(&x)?, &want),
                1e-5,
            ));
        }
        // Gemma's embedding scaling: sqrt(hidden) rounded as the table's type, the product
        // rounded the same way; both sides round an identical f32 product, so exactly equal.
        for dtype in [
            jetvlm_core::DType::F32,
            jetvlm_core::DType::F16,
            jetvlm_core::DType::BF16,
        ] {
            let mut s = [(2304f32).sqrt()];
            cpu::scale_round(&mut s, 1.0, dtype);
            let mut x = self.upload(&a)?;
            self.scale_round(&mut x, n, s[0], dtype)?;
            let mut want = a.clone();
            cpu::scale_round(&mut want, s[0], dtype);
            out.push(check(
                "scale_round_f32",
                format!("{} {dtype}", kind(outliers)),
                normalized_error(&self.download(&x)?, &want),
                0.0,
            ));
        }

        let (vocab, hidden) = (1000, 96);
        let table = values(rng, vocab * hidden, hidden, outliers);
        let ids: Vec<u32> = (0..37).map(|_| rng.below(vocab as u32)).collect();
        for dtype in ["f32", "f16", "bf16"] {
            let (w, wide) = weights(self, &table, dtype)?;
            let mut o = self.zeros::<f32>(ids.len() * hidden)?;
            self.embedding(&mut o, &w, &ids, hidden)?;
            let err = normalized_error(
                &self.download(&o)?,
                &cpu::embedding_gather(&wide, hidden, &ids),
            );
            out.push(check(
                "embedding_gather",
                format!("{} {dtype}", kind(outliers)),
                err,
                0.0,
            ));
        }
        Ok(())
    }

    fn check_rmsnorm_rope(
        &self,
        rng: &mut Rng,
        outliers: bool,
        out: &mut Vec<KernelCheck>,
    ) -> Result<(), CudaError> {
        let (rows, dim) = (7, 896);
        let x = values(rng, rows * dim, dim, outliers);
        let w: Vec<f32> = rng.normals(dim).iter().map(|v| 1.0 + 0.1 * v).collect();
        for dtype in ["f32", "f16", "bf16"] {
            let (dw, wide) = weights(self, &w, dtype)?;
            let mut o = self.zeros::<f32>(rows * dim)?;
            self.rmsnorm(&mut o, &self.upload(&x)?, &dw, rows, dim, 1e-6)?;
            let err = normalized_error(&self.download(&o)?, &cpu::rmsnorm(&x, &wide, dim, 1e-6));
            out.push(check(
                "rmsnorm",
                format!("{} {dtype} weights", kind(outliers)),
                err,
                1e-5,
            ));
        }
        for (heads, head_dim, rotary_dim, theta) in
            [(14usize, 64usize, 64usize, 1e6f64), (4, 128, 64, 1e4)]
        {
            let n_tok = 5;
            let x = values(rng, n_tok * heads * head_dim, head_dim, outliers);
            let positions: Vec<u32> = (0..n_tok).map(|_| rng.below(32_768)).collect();
            let inv = cpu::rope_inv_freq(theta, rotary_dim);
            let mut d = self.upload(&x)?;
            self.rope(
                &mut d,
                &self.upload(&positions)?,
                &self.upload(&inv)?,
                n_tok,
                heads,
                head_dim,
                rotary_dim,
            )?;
            let mut want = x.clone();
            cpu::rope(&mut want, &positions, &inv, heads, head_dim, rotary_dim);
            let case = format!("{} dim {head_dim} rotary {rotary_dim}", kind(outliers));
            out.push(check(
                "rope_f32",
                case,
                normalized_error(&self.download(&d)?, &want),
                1e-5,
            ));
        }
        // M-RoPE: Qwen2.5-VL's sections of a 128-wide head, and a small head; interleaved:
        // Qwen3-VL's sections of a 128-wide head, and the tiny fixture's.
        for (heads, head_dim, section, theta, interleaved) in [
            (4usize, 128usize, [16usize, 24, 24], 1e6f64, false),
            (2, 32, [6, 5, 5], 1e4, false),
            (4, 128, [24, 20, 20], 5e6, true),
            (2, 32, [6, 5, 5], 1e4, true),
        ] {
            let n_tok = 15;
            let x = values(rng, n_tok * heads * head_dim, head_dim, outliers);
            let positions: Vec<u32> = (0..3 * n_tok).map(|_| rng.below(32_768)).collect();
            let inv = cpu::rope_inv_freq(theta, head_dim);
            let mut d = self.upload(&x)?;
            self.rope_mrope(
                &mut d,
                &self.upload(&positions)?,
                &self.upload(&inv)?,
                n_tok,
                heads,
                head_dim,
                section,
                interleaved,
            )?;
            let mut want = x.clone();
            let kernel = if interleaved {
                let s = [section[1], section[2]];
                cpu::rope_mrope_interleaved(&mut want, &positions, &inv, heads, head_dim, s);
                "rope_mrope_interleaved_f32"
            } else {
                let s = [section[0], section[1]];
                cpu::rope_mrope(&mut want, &positions, &inv, heads, head_dim, s);
                "rope_mrope_f32"
            };
            let case = format!("{} dim {head_dim} sections {section:?}", kind(outliers));
            out.push(check(
                kernel,
                case,
                normalized_error(&self.download(&d)?, &want),
                1e-5,
            ));
        }
        Ok(())
    }

    fn check_gemv(
        &self,
        rng: &mut Rng,
        outliers: bool,
        out: &mut Vec<KernelCheck>,
    ) -> Result<(), CudaError> {
        // (rows, cols, tokens): decode shape, a batch over two token tiles, an unaligned width.
        for (rows, cols, n_tok) in [(896usize, 896usize, 1usize), (129, 4864, 11), (33, 77, 3)] {
            let w = values(rng, rows * cols, cols, outliers);
            let x = values(rng, n_tok * cols, cols, outliers);
            for dtype in ["f32", "f16", "bf16"] {
                let (dw, wide) = weights(self, &w, dtype)?;
                let mut y = self.zeros::<f32>(n_tok * rows)?;
                self.gemv(&mut y, &dw, &self.upload(&x)?, rows, cols, n_tok)?;
                let err = normalized_error(
                    &self.download(&y)?,
                    &cpu::gemv(&wide, &x, rows, cols, n_tok),
                );
                let case = format!("{} {dtype} {rows}x{cols} x{n_tok}", kind(outliers));
                out.push(check("gemv", case, err, 2e-5));
            }
        }
        Ok(())
    }

    /// The quantized products (`gemv_q8`/`gemv_q4` for decode, `gemm_q8`/`gemm_q4` for
    /// prefill) against their twin on weights quantized by `jetvlm_quant`'s reference, each
    /// kernel on the same shapes: one token, a tile and a remainder, rows that are not a
    /// multiple of the 64-row tile, every group size; and the quantized table lookup
    /// (`embedding_gather_q8`/`embedding_gather_q4`).
    fn check_gemv_quant(
        &self,
        rng: &mut Rng,
        outliers: bool,
        out: &mut Vec<KernelCheck>,
    ) -> Result<(), CudaError> {
        let cases = [
            (576usize, 576usize, 1usize, 32usize),
            (129, 1536, 11, 64),
            (200, 384, 37, 128),
        ];
        for (rows, cols, n_tok, group) in cases {
            let w = values(rng, rows * cols, cols, outliers);
            let x = values(rng, n_tok * cols, cols, outliers);
            let dx = self.upload(&x)?;
            for bits in [8u32, 4] {
                let format = jetvlm_quant::WeightFormat::new(bits, group)
                    .map_err(|e| crate::checks::shape("selftest", e.to_string()))?;
                let m = cpu::QuantMatrix::quantize(&w, rows, cols, format)
                    .map_err(|e| crate::checks::shape("selftest", e.to_string()))?;
                let q = QuantWeights {
                    format,
                    rows,
                    cols,
                    codes: self.upload(&m.codes)?,
                    scales: self.upload(&m.scales)?,
                    zeros: if bits == 4 {
                        Some(self.upload(&m.zeros)?)
                    } else {
                        None
                    },
                };
                let want = cpu::gemv_quant(&m, &x, n_tok);
                for gemm in [false, true] {
                    let mut y = self.zeros::<f32>(n_tok * rows)?;
                    self.gemv_quant(&mut y, &q, &dx, rows, cols, n_tok, Some(gemm))?;
                    let err = normalized_error(&self.download(&y)?, &want);
                    let case = format!(
                        "{} INT{bits} g{group} {rows}x{cols} x{n_tok}",
                        kind(outliers)
                    );
                    let kernel = match (gemm, bits) {
                        (false, 8) => "gemv_q8",
                        (false, _) => "gemv_q4",
                        (true, 8) => "gemm_q8",
                        (true, _) => "gemm_q4",
                    };
                    out.push(check(kernel, case, err, 5e-5));
                }
            }
        }
        // The lookup of a quantized table (a GGUF's tied Q8_0 / Q6_K table): the rows
        // dequantized as the twin rounds them (product, then sum), so exactly equal.
        let (vocab, hidden) = (300usize, 256usize);
        let table = values(rng, vocab * hidden, hidden, outliers);
        let ids: Vec<u32> = (0..37).map(|_| rng.below(vocab as u32)).collect();
        for (bits, group) in [(8u32, 32usize), (8, 128), (4, 32), (4, 64)] {
            let format = jetvlm_quant::WeightFormat::new(bits, group)
                .map_err(|e| crate::checks::shape("selftest", e.to_string()))?;
            let m = cpu::QuantMatrix::quantize(&table, vocab, hidden, format)
                .map_err(|e| crate::checks::shape("selftest", e.to_string()))?;
            let q = DeviceWeights::Quant(QuantWeights {
                format,
                rows: vocab,
                cols: hidden,
                codes: self.upload(&m.codes)?,
                scales: self.upload(&m.scales)?,
                zeros: if bits == 4 {
                    Some(self.upload(&m.zeros)?)
                } else {
                    None
                },
            });
            let mut o = self.zeros::<f32>(ids.len() * hidden)?;
            self.embedding(&mut o, &q, &ids, hidden)?;
            let err = normalized_error(&self.download(&o)?, &cpu::embedding_gather_quant(&m, &ids));
            let kernel = if bits == 8 {
                "embedding_gather_q8"
            } else {
                "embedding_gather_q4"
            };
            let case = format!("{} INT{bits} g{group} {vocab}x{hidden}", kind(outliers));
            out.push(check(kernel, case, err, 0.0));
        }
        Ok(())
    }

    fn check_kv(&self, rng: &mut Rng, out: &mut Vec<KernelCheck>) -> Result<(), CudaError> {
        // (q_heads, kv_heads, head_dim, bits, group, per-channel keys, outliers)
        let cases = [
            (14usize, 2usize, 64usize, 4u32, 64usize, true, true),
            (14, 2, 64, 4, 32, false, false),
            (12, 2, 128, 2, 64, true, true),
            (32, 2, 128, 8, 128, false, true),
            (9, 3, 64, 2, 32, false, false),
            (16, 16, 256, 4, 128, true, false),
            // Head dims whose lanes hold 3 or 6 elements: a lane's elements span two groups.
            (24, 8, 96, 4, 32, false, true),
            (6, 2, 192, 8, 64, false, false),
            (10, 2, 160, 2, 32, true, true),
        ];
        for (q_heads, kv_heads, head_dim, bits, group, per_channel, outliers) in cases {
            let layout = KvLayout {
                kv_heads,
                head_dim,
                block_tokens: 16,
                bits,
                group,
                key_per_channel: per_channel,
            };
            let case = format!(
                "{} {bits}-bit g{group} {} keys {q_heads}/{kv_heads}x{head_dim}",
                kind(outliers),
                if per_channel { "channel" } else { "token" }
            );
            self.check_kv_case(rng, layout, q_heads, outliers, &case, out)?;
        }
        Ok(())
    }

    fn check_kv_case(
        &self,
        rng: &mut Rng,
        layout: KvLayout,
        q_heads: usize,
        outliers: bool,
        case: &str,
        out: &mut Vec<KernelCheck>,
    ) -> Result<(), CudaError> {
        let (text_blocks, frame_blocks, bt) = (6usize, 24usize, layout.block_tokens);
        let row = layout.row_elems();
        let mut pools = self.kv_pools(layout, text_blocks, frame_blocks)?;
        let mut host = HostPools::new(layout, text_blocks, frame_blocks);
        // Context: a text prompt block, the frames, a partial text block (question) last,
        // plus one frame block holding a partial frame.
        let mut entries = Vec::new();
        let mut order = 0i32;
        let mut push = |kind, block: usize, len: usize, entries: &mut Vec<BlockEntry>| {
            entries.push(BlockEntry {
                kind,
                block: block as u32,
                len: len as u32,
                order,
            });
            order += len as i32;
        };
        for t in 0..2 {
            let len = bt;
            let (k, v) = (
                values(rng, len * row, layout.head_dim, outliers),
                values(rng, len * row, layout.head_dim, false),
            );
            self.kv_store_text(
                &mut pools,
                t,
                0,
                len,
                &self.upload(&k)?.slice(..),
                &self.upload(&v)?.slice(..),
            )?;
            host.store_text(t, 0, &k, &v);
            push(BlockKind::Text, t, len, &mut entries);
        }
        for f in 0..frame_blocks {
            let len = if f == frame_blocks - 1 { bt - 3 } else { bt };
            let (k, v) = (
                values(rng, len * row, layout.head_dim, outliers),
                values(rng, len * row, layout.head_dim, outliers),
            );
            self.kv_quantize_frame(
                &mut pools,
                f,
                0,
                len,
                &self.upload(&k)?.slice(..),
                &self.upload(&v)?.slice(..),
            )?;
            host.quantize_frame(f, 0, len, &k, &v);
            push(BlockKind::Frame, f, len, &mut entries);
        }
        let len = 5;
        let (k, v) = (
            values(rng, len * row, layout.head_dim, outliers),
            values(rng, len * row, layout.head_dim, false),
        );
        self.kv_store_text(
            &mut pools,
            2,
            0,
            len,
            &self.upload(&k)?.slice(..),
            &self.upload(&v)?.slice(..),
        )?;
        host.store_text(2, 0, &k, &v);
        push(BlockKind::Text, 2, len, &mut entries);

        let got = self.download_pools(&pools)?;
        let text_ok = got.k_text == host.k_text && got.v_text == host.v_text;
        out.push(check(
            "kv_store_f16",
            case,
            if text_ok { 0.0 } else { 1.0 },
            0.0,
        ));
        let params_ok = got.k_params == host.k_params && got.v_params == host.v_params;
        out.push(check(
            "kv_quant_params",
            case,
            if params_ok { 0.0 } else { 1.0 },
            0.0,
        ));
        let mismatched = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
        let code_err = (mismatched(&got.k_codes, &host.k_codes)
            + mismatched(&got.v_codes, &host.v_codes)) as f64
            / (2 * host.k_codes.len()).max(1) as f64;
        // Codes are IEEE-exact on both sides; a rare tie may round differently.
        out.push(check(
            "kv_quant_codes (mismatch frac)",
            case,
            code_err,
            1e-4,
        ));

        // Decode: one query sees everything, with automatic, single and many splits.
        let dh = layout.head_dim;
        let q = values(rng, q_heads * dh, dh, false);
        let want = cpu::attention(&got, &q, &[SEES_ALL], q_heads, &entries);
        for splits in [Splits::Auto, Splits::Fixed(1), Splits::Fixed(7)] {
            let mut o = self.zeros::<f32>(q_heads * dh)?;
            let used = self.attention(
                &pools,
                &self.upload(&q)?,
                &[SEES_ALL],
                q_heads,
                &entries,
                &mut o,
                splits,
            )?;
            let err = normalized_error(&self.download(&o)?, &want);
            out.push(check(
                "mixed_attention decode",
                format!("{case} splits {used}"),
                err,
                1e-4,
            ));
        }
        // Prefill: 20 queries over the last text block and the frames, causal by order.
        let n_q = 20;
        let total = order;
        let q_order: Vec<i32> = (0..n_q)
            .map(|i| total - n_q as i32 + i as i32 - 3)
            .collect();
        let q = values(rng, n_q * q_heads * dh, dh, false);
        let want = cpu::attention(&got, &q, &q_order, q_heads, &entries);
        let mut o = self.zeros::<f32>(n_q * q_heads * dh)?;
        self.attention(
            &pools,
            &self.upload(&q)?,
            &q_order,
            q_heads,
            &entries,
            &mut o,
            Splits::Fixed(1),
        )?;
        let err = normalized_error(&self.download(&o)?, &want);
        out.push(check(
            "mixed_attention prefill",
            case.to_string(),
            err,
            1e-4,
        ));
        // Sliding window (Gemma 3's local layers): each query sees the 37 keys up to its own,
        // so whole blocks are skipped and the window starts inside a block; queries seeing
        // the span's last key (Gemma 3's bidirectional frame tokens) with the window of each.
        let window = 37;
        let q_last: Vec<i32> = q_order.iter().map(|_| total - 4).collect();
        let q_from: Vec<i32> = q_order.iter().map(|&o| o + 1 - window).collect();
        for (what, seen) in [("causal", &q_order), ("to the span's end", &q_last)] {
            let want = cpu::attention_from(&got, &q, seen, &q_from, q_heads, &entries);
            let plan_from = |splits| {
                self.attention_plan_from(
                    &layout,
                    (text_blocks, frame_blocks),
                    q_heads,
                    &entries,
                    seen,
                    &q_from,
                    splits,
                )
            };
            for splits in [Splits::Fixed(1), Splits::Fixed(5)] {
                let mut plan = plan_from(splits)?;
                let mut o = self.zeros::<f32>(n_q * q_heads * dh)?;
                self.attend(&pools, &mut plan, &self.upload(&q)?, &mut o)?;
                let err = normalized_error(&self.download(&o)?, &want);
                out.push(check(
                    "mixed_attention window",
                    format!("{case} {window} keys {what} splits {}", plan.splits()),
                    err,
                    1e-4,
                ));
            }
        }
        Ok(())
    }
}
