//! `jetvlm selftest --device cuda`: every CUDA kernel against its CPU reference twin on random
//! and outlier-heavy inputs, one PASS/FAIL line per kernel and case. `--nvrtc-only` compiles
//! every kernel with NVRTC for the given SMs instead (needs libnvrtc, no GPU).

use anyhow::{Result, bail};
use jetvlm_core::Device;
use jetvlm_cuda::{CudaDevice, compile_all, nvrtc_version, sources::CHECKED_ARCHS};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm selftest --device cuda                                # --features cuda, on the GPU\n  \
    jetvlm selftest --device cuda --nvrtc-only --sm 87           # compile only, no GPU\n  \
    jetvlm selftest --device sim --decoder-fixtures tests/fixtures/decoder")]
pub struct SelftestArgs {
    /// Device whose kernels are tested (`cuda`; the CPU kernels are tested by `cargo test`).
    #[arg(long, default_value = "cuda")]
    device: Device,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    ordinal: usize,
    /// Only compile every kernel source with NVRTC (no GPU needed).
    #[arg(long)]
    nvrtc_only: bool,
    /// SM numbers for --nvrtc-only, comma separated (default: 72,87,90 = Xavier, Orin, H100).
    #[arg(long, value_delimiter = ',')]
    sm: Vec<u32>,
    /// Seed of the generated inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also run greedy generation on the decoder fixtures under this directory (e.g.
    /// tests/fixtures/decoder) on the GPU and compare the tokens with the CPU path.
    #[arg(long)]
    decoder_fixtures: Option<std::path::PathBuf>,
    /// Greedy tokens per decoder fixture (at least 1).
    #[arg(long, default_value_t = 32, value_parser = super::at_least_one)]
    decoder_tokens: usize,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    match args.device {
        Device::Cuda => {}
        Device::Sim => return simulated(&args),
        Device::Cpu => bail!(
            "selftest checks the CUDA kernels against their CPU twins; run it with --device cuda \
             (or --device sim: the device decoder on the twins, against the CPU decoder)"
        ),
    }
    if args.nvrtc_only {
        return nvrtc_only(&args);
    }
    let dev = CudaDevice::open(args.ordinal).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    let i = dev.info();
    println!(
        "device {}: {} sm_{} ({}), {} SMs, {:.1} GiB, available {:.1} GiB, driver {}, nvrtc {}.{}",
        i.ordinal,
        i.name,
        i.sm(),
        if i.integrated {
            "integrated, unified memory"
        } else {
            "discrete"
        },
        i.multiprocessors,
        i.total_memory as f64 / (1u64 << 30) as f64,
        i.available_memory as f64 / (1u64 << 30) as f64,
        i.driver_version,
        i.nvrtc_version.0,
        i.nvrtc_version.1
    );
    let t = std::time::Instant::now();
    let checks = dev.selftest(args.seed)?;
    for c in &checks {
        println!("{}", c.line());
    }
    let mut failed = checks.iter().filter(|c| !c.passed()).count();
    let mut total = checks.len();
    if let Some(dir) = &args.decoder_fixtures {
        failed += decoder_fixtures(&dev, dir, args.decoder_tokens, &mut total)?;
    }
    println!(
        "{} of {} checks passed in {:.1} s",
        total - failed,
        total,
        t.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(jetvlm_app::check_failed(format!(
            "{failed} kernel check(s) failed"
        )));
    }
    Ok(())
}

/// The device decoder's greedy generation against the CPU path on each fixture; returns the
/// failures.
fn decoder_fixtures<G: jetvlm_cuda::Gpu>(
    dev: &G,
    dir: &std::path::Path,
    tokens: usize,
    total: &mut usize,
) -> Result<usize> {
    let checks = jetvlm_cuda::decoder_check(dev, dir, tokens)?;
    if checks.is_empty() {
        bail!("no decoder fixtures under {}", dir.display());
    }
    for c in &checks {
        println!("{}", c.line());
    }
    *total += checks.len();
    Ok(checks.iter().filter(|c| !c.passed()).count())
}

/// `--device sim`: the decoder fixtures on the simulated device (the device decoder's host
/// logic with each kernel's CPU twin), against the CPU decoder.
fn simulated(args: &SelftestArgs) -> Result<()> {
    let dir = args
        .decoder_fixtures
        .clone()
        .unwrap_or_else(|| "tests/fixtures/decoder".into());
    let t = std::time::Instant::now();
    let mut total = 0;
    let failed = decoder_fixtures(
        &jetvlm_cuda::SimDevice::new(),
        &dir,
        args.decoder_tokens,
        &mut total,
    )?;
    println!(
        "{} of {} checks passed on the simulated device in {:.1} s",
        total - failed,
        total,
        t.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(jetvlm_app::check_failed(format!(
            "{failed} decoder check(s) failed"
        )));
    }
    Ok(())
}

fn nvrtc_only(args: &SelftestArgs) -> Result<()> {
    let sms = if args.sm.is_empty() {
        CHECKED_ARCHS.to_vec()
    } else {
        args.sm.clone()
    };
    let (major, minor) = nvrtc_version().map_err(|e| anyhow::anyhow!("--nvrtc-only: {e}"))?;
    let compiled = compile_all(&sms)?;
    for c in &compiled {
        println!(
            "PASS nvrtc {major}.{minor} sm_{:<4} {:<16} {:>7} bytes {:7.1} ms",
            c.sm, c.file, c.cubin_bytes, c.millis
        );
    }
    println!(
        "{} kernel sources compiled for sm {:?}",
        compiled.len(),
        sms
    );
    Ok(())
}
