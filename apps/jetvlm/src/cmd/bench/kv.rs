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
    /// Elements per attention head.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Mixed policy to compare with FP16.
    #[arg(long, default_value = "mixed")]
    pub mixed: String,
    /// Fraction of the context that is text (the rest are frame tokens).
    #[arg(long, default_value_t = 0.10, allow_negative_numbers = true)]
    pub text_fraction: f64,
    /// Tokens per camera frame.
    #[arg(long, default_value_t = 64)]
    pub frame_tokens: usize,
    /// Timed sweeps over all layers of all replicas per policy (after one warm-up sweep);
    /// the two policies' sweeps alternate.
    #[arg(long, default_value_t = 15)]
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

/// The FP16-vs-mixed fields of every `bench kv` report (CPU and CUDA).
#[derive(Serialize, Debug)]
pub(super) struct Comparison {
    pub fp16_us: f64,
    pub mixed_us: f64,
    pub speedup: f64,
    pub kv_bytes_fp16: u64,
    pub kv_bytes_mixed: u64,
    pub bytes_ratio: f64,
    pub fp16_attn_gbs: f64,
    pub mixed_attn_gbs: f64,
    pub fp16_bandwidth_fraction: f64,
    pub mixed_policy: String,
}

impl Comparison {
    /// From each policy's (time per layer call in us, bytes per call) and the measured read
    /// bandwidth.
    pub fn new(fp16: (f64, u64), mixed: (f64, u64), mixed_policy: String, read_gbs: f64) -> Self {
        let gbs = |(us, bytes): (f64, u64)| bytes as f64 / (us * 1e-6) / 1e9;
        Comparison {
            fp16_us: fp16.0,
            mixed_us: mixed.0,
            speedup: fp16.0 / mixed.0,
            kv_bytes_fp16: fp16.1,
            kv_bytes_mixed: mixed.1,
            bytes_ratio: mixed.1 as f64 / fp16.1 as f64,
            fp16_attn_gbs: gbs(fp16),
            mixed_attn_gbs: gbs(mixed),
            fp16_bandwidth_fraction: gbs(fp16) / read_gbs,
            mixed_policy,
        }
    }
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
    #[serde(flatten)]
    cmp: Comparison,
    /// Median over sweeps of (fp16 sweep time / the adjacent mixed sweep's time).
    speedup_paired: f64,
    sweeps: usize,
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

/// Spans of the model-shaped context: half the text, the frames, the rest of the text, then
/// the decoded token (the CPU and the CUDA benchmark fill their caches in this order).
pub(super) fn context_spans(args: &KvArgs) -> Vec<(TokenKind, usize)> {
    let n = args.context;
    let text = ((n as f64 * args.text_fraction).round() as usize).clamp(1, n);
    let frames = (n - text) / args.frame_tokens;
    let text_tail = n - frames * args.frame_tokens - text / 2;
    let mut s = Vec::new();
    if text / 2 > 0 {
        s.push((TokenKind::Text, text / 2));
    }
    s.extend((0..frames).map(|_| (TokenKind::Frame, args.frame_tokens)));
    if text_tail > 1 {
        s.push((TokenKind::Text, text_tail - 1));
    }
    s.push((TokenKind::Text, 1));
    s
}

/// Builds one model-shaped cache ([`context_spans`]) with random K/V; returns the cache and
/// the decoded token's span.
fn build_cache(args: &KvArgs, shape: CacheShape, policy: KvPolicy) -> Result<(MixedKvCache, Span)> {
    let mut cache =
        MixedKvCache::new(shape, policy, args.context).context("creating the KV cache")?;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let row = shape.kv_heads * shape.head_dim;
    let mut frames = 0u64;
    let mut last = None;
    for (kind, len) in context_spans(args) {
        let frame = (kind == TokenKind::Frame).then(|| {
            frames += 1;
            frames - 1
        });
        let p0 = cache.next_position();
        let pos: Vec<u32> = (p0..p0 + len as u32).collect();
        let span = cache.append_span(kind, &pos, frame)?;
        let (mut k, mut v) = (vec![0f32; len * row], vec![0f32; len * row]);
        for layer in 0..shape.layers {
            rng.fill(&mut k);
            rng.fill(&mut v);
            cache.write(layer, &span, &k, &v)?;
        }
        last = Some(span);
    }
    let span = last.context("the context has no spans")?;
    Ok((cache, span))
}

/// One policy's model-shaped cache replicas, built once and then timed in sweeps.
struct Replicas {
    name: String,
    caches: Vec<MixedKvCache>,
    span: Span,
    /// Bytes one decode step's attention reads in one replica (all layers).
    per_cache: u64,
    text_tokens: usize,
    frame_tokens: usize,
}

fn build_replicas(
    args: &KvArgs,
    shape: CacheShape,
    policy: KvPolicy,
    min_ws: u64,
    kernel: Kernel,
) -> Result<Replicas> {
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
    Ok(Replicas {
        name,
        caches,
        span,
        per_cache,
        text_tokens: mem.text_tokens,
        frame_tokens: mem.frame_tokens,
    })
}

/// Timings of one policy over the sweeps.
struct Timings {
    /// Mean time per layer call of each timed sweep.
    sweep_us: Vec<f64>,
    /// Fastest single layer call.
    best_us: f64,
}

/// One sweep: every layer of every replica, in a decode step's order; returns the mean time
/// per layer call and updates the fastest single call.
fn sweep(r: &Replicas, layers: usize, q: &[f32], out: &mut [f32], best: &mut f64) -> Result<f64> {
    let start = Instant::now();
    for c in &r.caches {
        for layer in 0..layers {
            let t = Instant::now();
            c.attend(layer, &r.span, q, out)?;
            *best = best.min(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / (r.caches.len() * layers) as f64;
    if out.iter().any(|x| !x.is_finite()) {
        bail!(
            "attention produced a non-finite output with policy {}",
            r.name
        );
    }
    Ok(us)
}

pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn policy_result(shape: CacheShape, r: &Replicas, t: &Timings) -> PolicyResult {
    let us = median(&t.sweep_us);
    let bytes_per_call = r.per_cache / shape.layers as u64;
    PolicyResult {
        policy: r.name.clone(),
        replicas: r.caches.len(),
        working_set_bytes: r.per_cache * r.caches.len() as u64,
        bytes_per_call,
        us_per_call: us,
        us_per_call_min: t.sweep_us.iter().copied().fold(f64::INFINITY, f64::min),
        us_per_call_best: t.best_us,
        attn_gbs: bytes_per_call as f64 / (us * 1e-6) / 1e9,
        text_tokens: r.text_tokens,
        frame_tokens: r.frame_tokens,
    }
}

pub fn run(args: KvArgs) -> Result<()> {
    if args.device == jetvlm_core::Device::Sim {
        bail!(
            "--device sim runs the CUDA kernels' CPU twins to check the GPU path; it is not a \
             benchmark (use --device cpu or cuda)"
        );
    }
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
    let bw_before = sysinfo::measure_read_bandwidth(0);
    let sets = [
        build_replicas(&args, shape, KvPolicy::fp16(), min_ws, kernel)?,
        build_replicas(&args, shape, mixed, min_ws, kernel)?,
    ];
    // Both policies are timed in alternating sweeps (the order flips every sweep), so a
    // slow moment of this machine falls on both rather than on one.
    let q_len = shape.q_heads * shape.head_dim;
    let mut rng = XorShift(42);
    let mut q = vec![0f32; q_len];
    rng.fill(&mut q);
    let mut out = vec![0f32; q_len];
    let mut timings: [Timings; 2] = std::array::from_fn(|_| Timings {
        sweep_us: Vec::new(),
        best_us: f64::INFINITY,
    });
    let mut ratios = Vec::new();
    for i in 0..=args.sweeps {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut us = [0.0; 2];
        for p in order {
            let mut best = f64::INFINITY;
            us[p] = sweep(&sets[p], shape.layers, &q, &mut out, &mut best)?;
            if i > 0 {
                timings[p].sweep_us.push(us[p]);
                timings[p].best_us = timings[p].best_us.min(best);
            }
        }
        if i > 0 {
            ratios.push(us[0] / us[1]);
        }
    }
    // The probe runs again after the sweeps; the higher reading is the reference, so a
    // slow moment during the first probe cannot flatter the attention kernels.
    let bw_after = sysinfo::measure_read_bandwidth(0);
    let bw = if bw_after.gbs > bw_before.gbs {
        bw_after
    } else {
        bw_before
    };
    let fp16 = policy_result(shape, &sets[0], &timings[0]);
    let mixed = policy_result(shape, &sets[1], &timings[1]);
    drop(sets);
    let paired = median(&ratios);
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
        cmp: Comparison::new(
            (fp16.us_per_call, fp16.bytes_per_call),
            (mixed.us_per_call, mixed.bytes_per_call),
            mixed.policy.clone(),
            bw.gbs,
        ),
        speedup_paired: paired,
        sweeps: args.sweeps,
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
        "memory read bandwidth: {:.1} GB/s (streaming read of {:.0} MiB, {} threads; the higher of a probe before and after the sweeps)",
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
        "speedup (fp16 / mixed time): {:.2}x (median of {} alternating sweeps each; median of the per-sweep ratios {:.2}x)   bytes ratio (mixed / fp16): {:.3}",
        report.cmp.speedup, report.sweeps, report.speedup_paired, report.cmp.bytes_ratio
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
