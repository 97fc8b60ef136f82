//! `jetvlm selftest --device cuda`: every CUDA kernel against its CPU reference twin on random
//! and outlier-heavy inputs, one PASS/FAIL line per kernel and case. `--nvrtc-only` compiles
//! every kernel with NVRTC for the given SMs instead (needs libnvrtc, no GPU).

use anyhow::{Result, bail};
use jetvlm_core::Device;
use jetvlm_cuda::{CudaDevice, compile_all, nvrtc_version, sources::CHECKED_ARCHS};

#[derive(clap::Args, Debug)]
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
}

pub fn run(args: SelftestArgs) -> Result<()> {
    if args.device != Device::Cuda {
        bail!(
            "selftest checks the CUDA kernels against their CPU twins; run it with --device cuda"
        );
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
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!(
        "{} of {} checks passed in {:.1} s",
        checks.len() - failed,
        checks.len(),
        t.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} kernel check(s) failed");
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
