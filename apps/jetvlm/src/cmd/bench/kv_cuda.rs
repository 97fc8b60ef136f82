//! `jetvlm bench kv --device cuda`: the same measurement as the CPU version on the GPU's
//! device KV pools — one decode step's attention over N cached tokens in every layer of a
//! model-shaped cache, FP16 policy against the mixed policy — held against the device memory
//! bandwidth measured in the same run (streaming read kernel and device-to-device copy).
//!
//! Each policy gets enough cache replicas that its working set is at least four times the L2
//! cache (and 1 GiB); a timed sweep attends every layer of every replica, so K/V come from
//! device memory. Times are CUDA-event times of whole sweeps divided by the calls in them
//! (two kernel launches per call: split attention + combine).

use anyhow::{Context, Result, bail};
use jetvlm_cuda::layout::SEES_ALL;
use jetvlm_cuda::{CudaDevice, DeviceKvCache, DevicePolicy, PoolMemory, Splits};
use jetvlm_kvcache::KvPolicy;
use serde::Serialize;

use super::kv::{Comparison, KvArgs, context_spans, median};

#[derive(Serialize, Debug)]
struct PolicyResult {
    policy: String,
    replicas: usize,
    working_set_bytes: u64,
    /// Bytes one layer call reads.
    bytes_per_call: u64,
    us_per_call: f64,
    us_per_call_min: f64,
    attn_gbs: f64,
    text_tokens: usize,
    frame_tokens: usize,
    splits: usize,
}

#[derive(Serialize, Debug)]
struct Report {
    device: String,
    context: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kernel: &'static str,
    multiprocessors: u32,
    llc_bytes: Option<u64>,
    mem_read_gbs: f64,
    mem_copy_gbs: f64,
    mem_read_buffer_bytes: usize,
    #[serde(flatten)]
    cmp: Comparison,
    fp16: PolicyResult,
    mixed: PolicyResult,
}

/// A filled device cache: random bell-shaped K/V written through the store and quantize
/// kernels, span by span.
fn build_cache(
    dev: &CudaDevice,
    args: &KvArgs,
    policy: DevicePolicy,
    seed: u64,
    memory: PoolMemory,
) -> Result<DeviceKvCache<CudaDevice>> {
    let spans = context_spans(args);
    let mut cache = DeviceKvCache::for_spans(dev, policy, args.layers, &spans, memory)?;
    let row = args.kv_heads * args.head_dim;
    let mut counter = seed.wrapping_mul(1_000_003);
    for (kind, n) in spans {
        cache.append_with(dev, kind, n, |_, k, v| {
            counter += 2;
            dev.fill_bell(k, n * row, counter, 1.0)?;
            dev.fill_bell(v, n * row, counter + 1, 1.0)
        })?;
    }
    Ok(cache)
}

fn run_policy(
    dev: &CudaDevice,
    args: &KvArgs,
    policy: &KvPolicy,
    min_ws: u64,
) -> Result<PolicyResult> {
    let name = policy.name();
    let dp = DevicePolicy::new(policy, args.kv_heads, args.head_dim)
        .with_context(|| format!("policy {name}"))?;
    let first = build_cache(dev, args, dp.clone(), 1, PoolMemory::Device)?;
    let per_cache = first.attention_read_bytes();
    let replicas = min_ws.div_ceil(per_cache.max(1)).max(1) as usize;
    let mut caches = vec![first];
    for r in 1..replicas {
        caches.push(build_cache(
            dev,
            args,
            dp.clone(),
            1 + r as u64,
            PoolMemory::Device,
        )?);
    }
    let q_len = args.heads * args.head_dim;
    let mut q = dev.zeros::<f32>(q_len)?;
    dev.fill_bell(&mut q, q_len, 42, 1.0)?;
    let mut out = dev.zeros::<f32>(q_len)?;
    let mut plans = caches
        .iter()
        .map(|c| {
            dev.attention_plan(
                &dp.layout,
                c.table().pool_blocks(),
                args.heads,
                c.table().entries(),
                &[SEES_ALL],
                Splits::Auto,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let splits = plans[0].splits();
    let calls = replicas * args.layers;
    let mut sweep_us = Vec::new();
    for sweep in 0..=args.sweeps {
        let ms = dev.time_ms(|| {
            for (c, plan) in caches.iter().zip(plans.iter_mut()) {
                for layer in 0..args.layers {
                    let pools =
                        c.layer_pools(layer)
                            .ok_or_else(|| jetvlm_cuda::CudaError::Shape {
                                op: "bench kv",
                                message: format!("no layer {layer}"),
                            })?;
                    dev.attend(pools, plan, &q, &mut out)?;
                }
            }
            Ok(())
        })?;
        if sweep > 0 {
            sweep_us.push(ms * 1e3 / calls as f64);
        }
    }
    if dev.download(&out)?.iter().any(|x| !x.is_finite()) {
        bail!("attention produced a non-finite output with policy {name}");
    }
    let median = median(&sweep_us);
    let bytes_per_call = per_cache / args.layers as u64;
    let (text_tokens, frame_tokens) = caches[0].table().token_counts();
    Ok(PolicyResult {
        policy: name,
        replicas,
        working_set_bytes: per_cache * replicas as u64,
        bytes_per_call,
        us_per_call: median,
        us_per_call_min: sweep_us.iter().copied().fold(f64::INFINITY, f64::min),
        attn_gbs: bytes_per_call as f64 / (median * 1e-6) / 1e9,
        text_tokens,
        frame_tokens,
        splits,
    })
}

pub fn run(args: &KvArgs) -> Result<()> {
    let dev = crate::cmd::gpu::open(0)?;
    let mixed: KvPolicy = args.mixed.parse().context("--mixed")?;
    let l2 = dev.l2_bytes()?;
    let min_ws = match args.min_working_set_mib {
        Some(m) => m << 20,
        None => (4 * l2).max(1 << 30),
    };
    eprintln!("{}", crate::cmd::gpu::describe(&dev));
    let bw = dev.measure_bandwidth(1 << 30, 5)?;
    let fp16 = run_policy(&dev, args, &KvPolicy::fp16(), min_ws)?;
    let mixed = run_policy(&dev, args, &mixed, min_ws)?;
    let report = Report {
        device: dev.info().name.clone(),
        context: args.context,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
        kernel: "cuda mixed_attention (split + combine)",
        multiprocessors: dev.info().multiprocessors,
        llc_bytes: Some(l2),
        mem_read_gbs: bw.read_gbs,
        mem_copy_gbs: bw.copy_gbs,
        mem_read_buffer_bytes: bw.buffer_bytes,
        cmp: Comparison::new(
            (fp16.us_per_call, fp16.bytes_per_call),
            (mixed.us_per_call, mixed.bytes_per_call),
            mixed.policy.clone(),
            bw.read_gbs,
        ),
        fp16,
        mixed,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "decode attention on {}, context {} tokens, {} layers x {} q heads / {} kv heads x head_dim {}, {} SMs",
        report.device,
        report.context,
        report.layers,
        report.heads,
        report.kv_heads,
        report.head_dim,
        report.multiprocessors
    );
    println!("L2 cache: {:.1} MiB", mib(l2));
    println!(
        "device memory bandwidth: read {:.1} GB/s, copy {:.1} GB/s (read + write), buffer {:.0} MiB",
        report.mem_read_gbs,
        report.mem_copy_gbs,
        mib(report.mem_read_buffer_bytes as u64)
    );
    println!(
        "{:<10} {:>10} {:>12} {:>10} {:>9} {:>7} {:>10} {:>16}",
        "policy",
        "us/layer",
        "bytes/layer",
        "GB/s",
        "% of BW",
        "splits",
        "replicas",
        "working set MiB"
    );
    for r in [&report.fp16, &report.mixed] {
        println!(
            "{:<10} {:>10.2} {:>12} {:>10.1} {:>8.0}% {:>7} {:>10} {:>16.0}",
            r.policy,
            r.us_per_call,
            r.bytes_per_call,
            r.attn_gbs,
            100.0 * r.attn_gbs / report.mem_read_gbs,
            r.splits,
            r.replicas,
            mib(r.working_set_bytes)
        );
    }
    println!(
        "speedup (fp16 / mixed time): {:.2}x   bytes ratio (mixed / fp16): {:.3}",
        report.cmp.speedup, report.cmp.bytes_ratio
    );
    Ok(())
}
