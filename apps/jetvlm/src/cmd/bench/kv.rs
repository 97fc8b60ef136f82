//! `jetvlm bench kv`: one decode step's attention over N cached tokens in every layer of a
//! model-shaped cache, with the FP16 policy and with the mixed policy (10% text FP16, 90%
//! frame tokens INT4 g64), held against the memory read bandwidth measured in the same run.
//!
//! Caches must not flatter either side: each policy gets enough model-shaped cache replicas
//! that its working set is at least four times the last-level cache (and never under
//! 1 GiB, since virtual machines often report only a slice of the host's L3); a timed
//! sweep cycles through every layer of every replica, as a decode step cycles through the
//! layers, so each call reads its KV from DRAM.

use anyhow::{Context, Result, bail};
use clap::Args;
use jetvlm_core::{TokenKind, sysinfo};
use jetvlm_kvcache::{CacheShape, Kernel, KvPolicy, MixedKvCache, Span};
use serde::Serialize;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct KvArgs {
    /// Cached tokens (the decoded token included).
    #[arg(long, default_value_t = 16384)]
    pub context: usize,
    /// Layers of one model-shaped cache.
    #[arg(long, default_value_t = 30)]
    pub layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 9)]
    pub heads: usize,
    /// KV heads (grouped-query attention).
    #[arg(long, default_value_t = 3)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Mixed policy to compare with FP16.
    #[arg(long, default_value = "mixed")]
    pub mixed: String,
    /// Fraction of the context that is text (the rest are frame tokens).
    #[arg(long, default_value_t = 0.10)]
    pub text_fraction: f64,
    /// Tokens per camera frame.
    #[arg(long, default_value_t = 64)]
    pub frame_tokens: usize,
    /// Timed sweeps over all layers of all replicas (after one warm-up sweep).
    #[arg(long, default_value_t = 5)]
    pub sweeps: usize,
    /// Minimum working set per policy in MiB (default: max(4 x LLC, 1024)).
    #[arg(long)]
    pub min_working_set_mib: Option<u64>,
    /// Attention kernel: auto (the fastest this CPU runs, or `JETVLM_KV_KERNEL`), avx512,
    /// avx2, portable.
    #[arg(long, default_value = "auto")]
    pub kernel: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// cpu, or cuda: the same measurement on the GPU's device KV pools, against the device
    /// memory bandwidth.
    #[arg(long, default_value = "cpu")]
    pub device: jetvlm_core::Device,
}

#[derive(Serialize, Debug)]
struct PolicyResult {
    policy: String,
    replicas: usize,
    working_set_bytes: u64,
    /// Bytes one layer call reads.
    bytes_per_call: u64,
    us_per_call: f64,
    us_per_call_min: f64,
    /// Fastest single layer call of the timed sweeps (still read from DRAM): on a machine
    /// shared with other jobs, the time of a call that ran without being preempted.
    us_per_call_best: f64,
    attn_gbs: f64,
    text_tokens: usize,
    frame_tokens: usize,
}

#[derive(Serialize, Debug)]
struct Report {
    context: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kernel: &'static str,
    threads: usize,
    llc_bytes: Option<u64>,
    mem_read_gbs: f64,
    mem_read_buffer_bytes: usize,
    fp16_us: f64,
    mixed_us: f64,
    speedup: f64,
    kv_bytes_fp16: u64,
    kv_bytes_mixed: u64,
    bytes_ratio: f64,
    fp16_attn_gbs: f64,
    mixed_attn_gbs: f64,
    fp16_bandwidth_fraction: f64,
    mixed_policy: String,
    fp16: PolicyResult,
    mixed: PolicyResult,
}

/// Small, fast generator for synthetic K/V (the values only need to be varied).
struct XorShift(u64);
impl XorShift {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn fill(&mut self, buf: &mut [f32]) {
        buf.iter_mut().for_each(|x| *x = self.next_f32());
    }
}

/// Builds one model-shaped cache: text, frames, text, then the decoded token; returns the
/// cache and the decoded token's span.
fn build_cache(args: &KvArgs, shape: CacheShape, policy: KvPolicy) -> Result<(MixedKvCache, Span)> {
    let n = args.context;
    let mut cache = MixedKvCache::new(shape, policy, n).context("creating the KV cache")?;
    let text = ((n as f64 * args.text_fraction).round() as usize).clamp(1, n);
    let frames = (n - text) / args.frame_tokens;
    let text_tail = n - frames * args.frame_tokens - text / 2;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let row = shape.kv_heads * shape.head_dim;
    let mut write_span = |cache: &mut MixedKvCache,
                          kind: TokenKind,
                          len: usize,
                          frame: Option<u64>|
     -> Result<Span> {
        let p0 = cache.next_position();
        let pos: Vec<u32> = (p0..p0 + len as u32).collect();
        let span = cache.append_span(kind, &pos, frame)?;
        let (mut k, mut v) = (vec![0f32; len * row], vec![0f32; len * row]);
        for layer in 0..shape.layers {
            rng.fill(&mut k);
            rng.fill(&mut v);
            cache.write(layer, &span, &k, &v)?;
        }
        Ok(span)
    };
    if text / 2 > 0 {
        write_span(&mut cache, TokenKind::Text, text / 2, None)?;
    }
    for f in 0..frames {
        write_span(
            &mut cache,
            TokenKind::Frame,
            args.frame_tokens,
            Some(f as u64),
        )?;
    }
    if text_tail > 1 {
        write_span(&mut cache, TokenKind::Text, text_tail - 1, None)?;
    }
    let span = write_span(&mut cache, TokenKind::Text, 1, None)?;
    Ok((cache, span))
}

fn run_policy(
    args: &KvArgs,
    shape: CacheShape,
    policy: KvPolicy,
    min_ws: u64,
    kernel: Kernel,
) -> Result<PolicyResult> {
    let name = policy.name();
    let (mut first, span) = build_cache(args, shape, policy)?;
    first.set_kernel(kernel);
    let mem = first.memory();
    let per_cache = mem.attention_read_bytes;
    let replicas = min_ws.div_ceil(per_cache.max(1)).max(1) as usize;
    let mut caches = Vec::with_capacity(replicas);
    for _ in 1..replicas {
        caches.push(first.clone());
    }
    caches.push(first);
    let q_len = shape.q_heads * shape.head_dim;
    let mut rng = XorShift(42);
    let mut q = vec![0f32; q_len];
    rng.fill(&mut q);
    let mut out = vec![0f32; q_len];
    let calls = replicas * shape.layers;
    let mut sweep_us = Vec::new();
    let mut best_us = f64::INFINITY;
    for sweep in 0..=args.sweeps {
        let start = Instant::now();
        for c in &caches {
            for layer in 0..shape.layers {
                let t = Instant::now();
                c.attend(layer, &span, &q, &mut out)?;
                if sweep > 0 {
                    best_us = best_us.min(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / calls as f64;
        if sweep > 0 {
            sweep_us.push(us);
        }
        if out.iter().any(|x| !x.is_finite()) {
            bail!("attention produced a non-finite output with policy {name}");
        }
    }
    sweep_us.sort_by(f64::total_cmp);
    let median = sweep_us[sweep_us.len() / 2];
    let bytes_per_call = per_cache / shape.layers as u64;
    Ok(PolicyResult {
        policy: name,
        replicas,
        working_set_bytes: per_cache * replicas as u64,
        bytes_per_call,
        us_per_call: median,
        us_per_call_min: sweep_us[0],
        us_per_call_best: best_us,
        attn_gbs: bytes_per_call as f64 / (median * 1e-6) / 1e9,
        text_tokens: mem.text_tokens,
        frame_tokens: mem.frame_tokens,
    })
}

pub fn run(args: KvArgs) -> Result<()> {
    if args.device == jetvlm_core::Device::Cuda {
        // Without CUDA this is one clear error line before any work.
        #[cfg(not(feature = "cuda"))]
        crate::cmd::gpu::open(0)?;
    }
    if args.context < 2 || args.frame_tokens == 0 {
        bail!("--context must be at least 2 and --frame-tokens at least 1");
    }
    if !(0.0..=1.0).contains(&args.text_fraction) {
        bail!("--text-fraction must be between 0 and 1");
    }
    #[cfg(feature = "cuda")]
    if args.device == jetvlm_core::Device::Cuda {
        return super::kv_cuda::run(&args);
    }
    let shape = CacheShape {
        layers: args.layers,
        q_heads: args.heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
    };
    let mixed: KvPolicy = args.mixed.parse().context("--mixed")?;
    let kernel = match args.kernel.as_str() {
        "auto" => Kernel::detect(),
        "reference" => bail!(
            "--kernel reference is the slow test twin: expected auto, avx512, avx2 or portable"
        ),
        other => other
            .parse::<Kernel>()
            .map_err(|e| anyhow::anyhow!("--kernel: {e}"))?,
    };
    if !kernel.available() {
        bail!("kernel {} is not available on this CPU", kernel.name());
    }
    let llc = sysinfo::last_level_cache_bytes();
    let min_ws = match args.min_working_set_mib {
        Some(m) => m << 20,
        None => (4 * llc.unwrap_or(0)).max(1 << 30),
    };
    let bw = sysinfo::measure_read_bandwidth(0);
    let fp16 = run_policy(&args, shape, KvPolicy::fp16(), min_ws, kernel)?;
    let mixed = run_policy(&args, shape, mixed, min_ws, kernel)?;
    let report = Report {
        context: args.context,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
        kernel: kernel.name(),
        threads: rayon::current_num_threads(),
        llc_bytes: llc,
        mem_read_gbs: bw.gbs,
        mem_read_buffer_bytes: bw.buffer_bytes,
        fp16_us: fp16.us_per_call,
        mixed_us: mixed.us_per_call,
        speedup: fp16.us_per_call / mixed.us_per_call,
        kv_bytes_fp16: fp16.bytes_per_call,
        kv_bytes_mixed: mixed.bytes_per_call,
        bytes_ratio: mixed.bytes_per_call as f64 / fp16.bytes_per_call as f64,
        fp16_attn_gbs: fp16.attn_gbs,
        mixed_attn_gbs: mixed.attn_gbs,
        fp16_bandwidth_fraction: fp16.attn_gbs / bw.gbs,
        mixed_policy: mixed.policy.clone(),
        fp16,
        mixed,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "decode attention, context {} tokens, {} layers x {} q heads / {} kv heads x head_dim {}, kernel {}, {} threads",
        report.context,
        report.layers,
        report.heads,
        report.kv_heads,
        report.head_dim,
        report.kernel,
        report.threads
    );
    match report.llc_bytes {
        Some(b) => println!("last-level cache: {:.1} MiB", mib(b)),
        None => println!("last-level cache: unknown"),
    }
    println!(
        "memory read bandwidth: {:.1} GB/s (streaming read of {:.0} MiB, {} threads)",
        report.mem_read_gbs,
        mib(report.mem_read_buffer_bytes as u64),
        bw.threads
    );
    println!(
        "{:<10} {:>10} {:>12} {:>10} {:>9} {:>10} {:>16}",
        "policy", "us/layer", "bytes/layer", "GB/s", "% of BW", "replicas", "working set MiB"
    );
    for r in [&report.fp16, &report.mixed] {
        println!(
            "{:<10} {:>10.1} {:>12} {:>10.1} {:>8.0}% {:>10} {:>16.0}",
            r.policy,
            r.us_per_call,
            r.bytes_per_call,
            r.attn_gbs,
            100.0 * r.attn_gbs / report.mem_read_gbs,
            r.replicas,
            mib(r.working_set_bytes)
        );
    }
    println!(
        "speedup (fp16 / mixed time): {:.2}x   bytes ratio (mixed / fp16): {:.3}",
        report.speedup, report.bytes_ratio
    );
    println!(
        "fastest single call: fp16 {:.1} us ({:.0}% of BW), mixed {:.1} us, ratio {:.2}x",
        report.fp16.us_per_call_best,
        100.0 * report.fp16.bytes_per_call as f64
            / (report.fp16.us_per_call_best * 1e3)
            / report.mem_read_gbs,
        report.mixed.us_per_call_best,
        report.fp16.us_per_call_best / report.mixed.us_per_call_best
    );
    Ok(())
}
