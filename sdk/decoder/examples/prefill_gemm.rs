//! Prefill matrix products side by side: `kernels::matmul` (the integer GEMM for quantized
//! weights, the f32 tiles for float ones) against `kernels::matmul_tiles` (every format
//! converted to f32 tiles and multiplied with the `gemm` crate) on one decoder layer's seven
//! matrices, shaped from a model's `config.json` (random values), in interleaved rounds.
//!
//!   cargo run --release -p jetvlm-decoder --example prefill_gemm -- \
//!       [--model DIR] [--tokens 64,512] [--rounds 7] [--formats bf16,q8,q4]
//!
//! Prints, per format and token count, the median time of the layer's products on each
//! path, the prefill tokens/s those products alone allow over every layer, and the ratio.
//! Threads: rayon's default (`RAYON_NUM_THREADS`).

use jetvlm_core::DType;
use jetvlm_decoder::Config;
use jetvlm_decoder::kernels::{matmul, matmul_tiles};
use jetvlm_decoder::weights::{Tensor, TensorData};
use jetvlm_quant::WeightFormat;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = PathBuf::from("models/gen/smollm2-135m-random");
    let mut tokens = vec![64usize, 512];
    let mut rounds = 7usize;
    let mut formats = vec!["bf16".to_string(), "q8".into(), "q4".into()];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = value()?.into(),
            "--tokens" => {
                tokens = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--tokens {s}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--rounds" => rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--formats" => formats = value()?.split(',').map(str::to_string).collect(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let cfg = Config::from_dir(&model)?;
    let c = &cfg.model;
    let (h, d) = (c.hidden_size, c.head_dim);
    let shapes = [
        ("q", c.num_attention_heads * d, h),
        ("k", c.num_key_value_heads * d, h),
        ("v", c.num_key_value_heads * d, h),
        ("o", h, c.num_attention_heads * d),
        ("gate", c.intermediate_size, h),
        ("up", c.intermediate_size, h),
        ("down", h, c.intermediate_size),
    ];
    let mut rng = StdRng::seed_from_u64(1);
    let mut layers = Vec::new();
    for f in &formats {
        let mats: Vec<Tensor> = shapes
            .iter()
            .map(
                |&(name, rows, cols)| -> Result<Tensor, Box<dyn std::error::Error>> {
                    let v: Vec<f32> = (0..rows * cols)
                        .map(|_| rng.random_range(-0.05f32..0.05))
                        .collect();
                    let t = Tensor::from_f32(name, vec![rows, cols], &v);
                    Ok(match f.as_str() {
                        "f32" => t,
                        "bf16" => t.converted(DType::BF16)?,
                        "f16" => t.converted(DType::F16)?,
                        q => {
                            let bits = match q {
                                "q8" => 8,
                                "q4" => 4,
                                _ => {
                                    return Err(format!(
                                        "--formats {q}: expected f32, f16, bf16, q8 or q4"
                                    )
                                    .into());
                                }
                            };
                            let fmt = WeightFormat::new(bits, 64)?;
                            let (mut codes, mut scales, mut zeros) =
                                (Vec::new(), Vec::new(), Vec::new());
                            for row in v.chunks(cols) {
                                let r = jetvlm_quant::weight::quantize_row(row, fmt)?;
                                codes.extend(r.codes);
                                scales.extend(r.scales);
                                zeros.extend(r.zeros);
                            }
                            Tensor::quantized(name, fmt, [rows, cols], &codes, &scales, &zeros)?
                        }
                    })
                },
            )
            .collect::<Result<_, _>>()?;
        layers.push((f.clone(), mats));
    }
    println!(
        "model {} (layer shapes, random values), {} threads, {} layers, median of {rounds} rounds",
        model.display(),
        rayon::current_num_threads(),
        c.num_hidden_layers
    );
    println!(
        "{:>6} {:>6} {:>14} {:>14} {:>12} {:>12} {:>7}",
        "format", "tokens", "matmul ms", "tiles ms", "matmul t/s", "tiles t/s", "ratio"
    );
    for &n in &tokens {
        let max_cols = shapes.iter().map(|s| s.2).max().unwrap_or(0);
        let max_rows = shapes.iter().map(|s| s.1).max().unwrap_or(0);
        let x: Vec<f32> = (0..n * max_cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut y = vec![0f32; n * max_rows];
        let run = |mats: &[Tensor], tiles: bool, y: &mut [f32]| -> f64 {
            let t = Instant::now();
            for (m, &(_, rows, cols)) in mats.iter().zip(&shapes) {
                let (x, y) = (&x[..n * cols], &mut y[..n * rows]);
                let w: TensorData<'_> = m.data();
                if tiles {
                    matmul_tiles(w, rows, cols, x, n, y);
                } else {
                    matmul(w, rows, cols, x, n, y);
                }
            }
            t.elapsed().as_secs_f64() * 1e3
        };
        let mut times = vec![(Vec::new(), Vec::new()); layers.len()];
        for r in 0..=rounds {
            for ((_, mats), (tm, tt)) in layers.iter().zip(&mut times) {
                // Alternate the order; round 0 warms up.
                let (a, b) = if r % 2 == 0 {
                    (run(mats, false, &mut y), run(mats, true, &mut y))
                } else {
                    let b = run(mats, true, &mut y);
                    (run(mats, false, &mut y), b)
                };
                if r > 0 {
                    tm.push(a);
                    tt.push(b);
                }
            }
        }
        for ((f, _), (tm, tt)) in layers.iter().zip(&mut times) {
            let (a, b) = (median(tm), median(tt));
            let per_s = |ms: f64| n as f64 / (ms * c.num_hidden_layers as f64 / 1e3);
            println!(
                "{f:>6} {n:>6} {a:>14.3} {b:>14.3} {:>12.0} {:>12.0} {:>6.2}x",
                per_s(a),
                per_s(b),
                b / a
            );
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
