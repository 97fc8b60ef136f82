//! The decode matrix-vector products alone, per weight format, over the layer matrices of
//! the SmolLM2-135M shape (30 layers of q/k/v fused 960x576, o 576x576, gate/up fused
//! 3072x576, down 576x1536; random codes), in interleaved passes so that other processes
//! slow every format alike. Prints each format's bytes, the best and median pass and the GB/s
//! they read. The layer matrices of one format exceed a server's last-level cache, so each
//! pass reads them from DRAM.
//!
//!     cargo run --release -p jetvlm-decoder --example qgemv_probe -- [--passes N] [--layers N] [--banded] [--head] [--evict] [FORMAT...]
//!
//! FORMAT: `bf16`, `q8`, `q4` (groups of 64), `q4g32`, `q4g128`, `q8g32`, `q8g128`; default
//! `q4 q8 bf16`. `--head` adds the 49152x576 LM head (INT8 g64 for the quantized formats).
//! `--banded` holds the matrices as the CPU decoder does where the AVX-512 VNNI kernel runs
//! (`hold_in_huge_pages`): in huge pages, the quantized ones in the banded layout; without it
//! they stay row-major on ordinary pages.
//! `--layers N` (default 30) sets how many layers of matrices a pass reads: a few layers fit
//! the last-level cache and measure the kernels' arithmetic ceiling instead of DRAM's.
//! `--evict` reads the bandwidth probe's buffer (`jetvlm_core::sysinfo::ReadProbe`, 4x the
//! last-level cache and at least 256 MiB) before every pass, as `jetvlm bench decode` does
//! before every step: on a host whose last-level cache holds all the layers (hundreds of MB
//! on some servers) the passes would otherwise read it instead of DRAM. Each format's line
//! then also shows the mean of the probe reads before its passes and the passes' share of
//! it.
//! Threads: rayon's (`RAYON_NUM_THREADS`).

use half::f16;
use jetvlm_decoder::Tensor;
use jetvlm_decoder::kernels::gemv;
use jetvlm_quant::WeightFormat;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut passes = 20usize;
    let mut head = false;
    let mut layers = 30usize;
    let mut banded = false;
    let mut evict = false;
    let mut formats = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--passes" => passes = args.next().ok_or("--passes needs a value")?.parse()?,
            "--head" => head = true,
            "--banded" => banded = true,
            "--evict" => evict = true,
            "--layers" => layers = args.next().ok_or("--layers needs a value")?.parse()?,
            _ => formats.push(a),
        }
    }
    if formats.is_empty() {
        formats = vec!["q4".into(), "q8".into(), "bf16".into()];
    }
    let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut stacks = Vec::new();
    for f in &formats {
        let mut mats = Vec::new();
        for _ in 0..layers {
            for &(r, c) in &shapes {
                mats.push(make(f, r, c, &mut seed)?);
            }
        }
        if head {
            let hf = if f == "bf16" { "bf16" } else { "q8" };
            mats.push(make(hf, 49152, 576, &mut seed)?);
        }
        if banded {
            // As the CPU decoder holds banded matrices.
            jetvlm_decoder::weights::hold_in_huge_pages(mats.iter_mut(), true);
        }
        stacks.push(mats);
    }
    let x: Vec<f32> = (0..1536)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut y = vec![0f32; 49152];
    let mut times = vec![Vec::new(); formats.len()];
    let probe = evict.then(|| {
        jetvlm_core::sysinfo::ReadProbe::new(
            jetvlm_core::sysinfo::bandwidth_buffer_bytes(0),
            rayon::current_num_threads(),
        )
    });
    // Seconds of the probe read before each timed pass, per format.
    let mut probe_times = vec![Vec::new(); formats.len()];
    // Two warm-up rounds, then `passes` rounds of one pass per format. The passes run on
    // the thread pool, as the decoder's forward step does.
    for round in 0..passes + 2 {
        for ((mats, t), pt) in stacks.iter().zip(&mut times).zip(&mut probe_times) {
            let read = probe.as_ref().map(jetvlm_core::sysinfo::ReadProbe::read);
            let s = rayon::scope(|_| {
                let start = Instant::now();
                for m in mats {
                    let (r, c) = (m.shape()[0], m.shape()[1]);
                    gemv(m.data(), r, c, &x[..c], &mut y[..r]);
                }
                start.elapsed().as_secs_f64()
            });
            if round >= 2 {
                t.push(s);
                pt.extend(read);
            }
        }
    }
    println!("{} threads, {passes} passes", rayon::current_num_threads());
    for (((f, mats), t), pt) in formats
        .iter()
        .zip(&stacks)
        .zip(&mut times)
        .zip(&probe_times)
    {
        let bytes: usize = mats.iter().map(|m| m.held_bytes()).sum();
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        t.sort_by(f64::total_cmp);
        let (best, med) = (t[0], t[t.len() / 2]);
        let probe_note = probe.as_ref().map_or(String::new(), |p| {
            let gbs = p.bytes() as f64 * pt.len() as f64 / pt.iter().sum::<f64>() / 1e9;
            let mean_gbs = bytes as f64 / mean / 1e9;
            format!(
                "  probe {gbs:>5.1} GB/s, mean pass {mean_gbs:>5.1} GB/s = {:>3.0}%",
                100.0 * mean_gbs / gbs
            )
        });
        println!(
            "{f:<7} {:>7.1} MB  best {:>6.2} ms {:>5.1} GB/s  median {:>6.2} ms {:>5.1} GB/s{probe_note}",
            bytes as f64 / 1e6,
            best * 1e3,
            bytes as f64 / best / 1e9,
            med * 1e3,
            bytes as f64 / med / 1e9
        );
    }
    Ok(())
}

/// xorshift64.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// A random `[rows, cols]` matrix in `format`.
fn make(
    format: &str,
    rows: usize,
    cols: usize,
    seed: &mut u64,
) -> Result<Tensor, Box<dyn std::error::Error>> {
    if format == "bf16" {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (next(seed) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        return Ok(Tensor::from_f32("w", vec![rows, cols], &v).converted(jetvlm_core::DType::BF16)?);
    }
    let (bits, group) = match format {
        "q8" => (8, 64),
        "q8g32" => (8, 32),
        "q8g128" => (8, 128),
        "q4" => (4, 64),
        "q4g32" => (4, 32),
        "q4g128" => (4, 128),
        other => return Err(format!("unknown format {other}").into()),
    };
    let fmt = WeightFormat::new(bits, group)?;
    let codes: Vec<u8> = (0..rows * fmt.code_bytes_per_row(cols))
        .map(|_| next(seed) as u8)
        .collect();
    let groups = rows * cols / group;
    let scales: Vec<f16> = (0..groups)
        .map(|i| f16::from_f32(0.01 + (i % 7) as f32 * 1e-3))
        .collect();
    let zeros: Vec<f16> = if fmt.has_zeros() {
        (0..groups)
            .map(|i| f16::from_f32(-0.05 + (i % 5) as f32 * 1e-3))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Tensor::quantized(
        "w",
        fmt,
        [rows, cols],
        &codes,
        &scales,
        &zeros,
    )?)
}
