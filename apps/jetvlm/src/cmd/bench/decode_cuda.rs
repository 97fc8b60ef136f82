//! `jetvlm bench decode --device cuda [--kv-offload host]`: time to first token and time per
//! output token of the decoder on the GPU, FP16 KV policy against the mixed policy, with the
//! device memory bandwidth (and, offloaded, the PCIe bandwidth) measured in the same run.
//!
//! `--kv-offload host` keeps every layer's KV pools in page-locked host memory: each decode
//! step streams every layer's used blocks over PCIe into device staging pools on a second
//! stream, the copy of layer `l + 1` overlapping the compute of layer `l`. Only the bytes a
//! policy stores cross the bus — the mixed policy moves about a third of FP16's.
//!
//! The roofline is `(weight bytes / device bandwidth) + (KV bytes / KV bandwidth)`, where the
//! KV bandwidth is the device's, or the measured host-to-device PCIe bandwidth offloaded.

use anyhow::{Context, Result, bail};
use jetvlm_core::TokenKind;
use jetvlm_cuda::{
    CudaDevice, DeviceDecoder, DeviceInput, DeviceKvCache, DevicePolicy, DeviceSession, PoolMemory,
};
use jetvlm_decoder::sampler::argmax;
use jetvlm_kvcache::KvPolicy;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use std::time::Instant;

use super::decode::{DecodeArgs, Row, mb, real_prefill};

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    weight_dtype: String,
    kv_memory: &'static str,
    bandwidth_gbs: f64,
    copy_gbs: f64,
    bandwidth_buffer_bytes: usize,
    pcie_h2d_gbs: Option<f64>,
    pcie_d2h_gbs: Option<f64>,
    rows: Vec<Row>,
}

/// The context layout: frame spans of `frame_tokens` (the leading part), then text.
fn layout(context: usize, text_fraction: f64, frame_tokens: usize) -> (usize, usize) {
    let text = ((context as f64 * text_fraction).round() as usize).clamp(1, context);
    let frames = (context - text) / frame_tokens.max(1);
    let frame_total = frames * frame_tokens.max(1);
    (frame_total, context - frame_total)
}

fn new_session<'a>(
    dev: &'a CudaDevice,
    model: &'a DeviceDecoder<CudaDevice>,
    policy: DevicePolicy,
    frame_total: usize,
    text_total: usize,
    frame_tokens: usize,
    memory: PoolMemory,
) -> Result<DeviceSession<'a, CudaDevice>> {
    let c = &model.config().model;
    let mut spans: Vec<(TokenKind, usize)> = (0..frame_total / frame_tokens.max(1))
        .map(|_| (TokenKind::Frame, frame_tokens))
        .collect();
    spans.push((TokenKind::Text, text_total));
    let cache = DeviceKvCache::for_spans(dev, policy, c.num_hidden_layers, &spans, memory)?;
    Ok(DeviceSession::new(dev, model, cache)?)
}

/// Runs the context through the model (frame spans of random ids tagged Frame, then text);
/// returns the TTFT (prefill + first token) and the first token.
fn prefill(
    session: &mut DeviceSession<'_, CudaDevice>,
    frame_total: usize,
    text_total: usize,
    frame_tokens: usize,
    rng: &mut StdRng,
) -> Result<(f64, u32)> {
    let vocab = session.model().vocab_size() as u32;
    let frames: Vec<Vec<u32>> = (0..frame_total / frame_tokens.max(1))
        .map(|_| {
            (0..frame_tokens)
                .map(|_| rng.random_range(0..vocab))
                .collect()
        })
        .collect();
    let text: Vec<u32> = (0..text_total)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let mut inputs: Vec<DeviceInput> = frames
        .iter()
        .map(|ids| DeviceInput::Ids {
            ids,
            kind: TokenKind::Frame,
        })
        .collect();
    inputs.push(DeviceInput::Ids {
        ids: &text,
        kind: TokenKind::Text,
    });
    let t = Instant::now();
    let logits = session.forward(&inputs)?;
    let tok = argmax(&logits);
    Ok((t.elapsed().as_secs_f64() * 1e3, tok))
}

/// Writes random K/V (bell-shaped, generated on the device) in the same span layout, without
/// running the model.
fn synthetic_fill(
    dev: &CudaDevice,
    session: &mut DeviceSession<'_, CudaDevice>,
    frame_total: usize,
    text_total: usize,
    frame_tokens: usize,
) -> Result<()> {
    let c = &session.model().config().model;
    let row = c.num_key_value_heads * c.head_dim;
    let mut spans: Vec<(TokenKind, usize)> = (0..frame_total / frame_tokens.max(1))
        .map(|_| (TokenKind::Frame, frame_tokens))
        .collect();
    let mut left = text_total;
    while left > 0 {
        let n = left.min(256);
        spans.push((TokenKind::Text, n));
        left -= n;
    }
    let mut seed = 11u64;
    for (kind, n) in spans {
        session.cache_mut().append_with(dev, kind, n, |_, k, v| {
            seed += 2;
            dev.fill_bell(k, n * row, seed, 1.0)?;
            dev.fill_bell(v, n * row, seed + 1, 1.0)
        })?;
    }
    Ok(())
}

/// `package`: the KV policy of the model package `--model` named, if any (its block sizes
/// go to the `--kv` policies that name none).
pub fn run(args: &DecodeArgs, package: Option<&KvPolicy>) -> Result<()> {
    let dev = crate::cmd::gpu::open(0)?;
    let memory = match args.kv_offload.as_str() {
        "none" | "device" => PoolMemory::Device,
        "host" => PoolMemory::MappedHost,
        other => bail!("--kv-offload {other}: expected none or host"),
    };
    if memory == PoolMemory::MappedHost && !dev.info().can_map_host_memory {
        bail!("--kv-offload host: this device cannot map host memory");
    }
    eprintln!("{}", crate::cmd::gpu::describe(&dev));
    let model = DeviceDecoder::load(&dev, &args.model)
        .with_context(|| format!("loading the decoder from {}", args.model.display()))?;
    let c = model.config().model.clone();
    let policies = args.policies_in_effect(package, c.head_dim)?;
    eprintln!("measuring device memory bandwidth...");
    let bw = dev.measure_bandwidth(1 << 30, 5)?;
    let pcie = if memory == PoolMemory::MappedHost {
        Some(dev.measure_pcie(256 << 20, 3)?)
    } else {
        None
    };
    let kv_gbs = pcie.map_or(bw.read_gbs, |p| p.0);
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(7);
    // Kernels are compiled (or read from the disk cache) and loaded on first use: one small
    // untimed prefill and decode step per policy, so that no timed row pays for that.
    for policy in &policies {
        let dp = DevicePolicy::new(policy, c.num_key_value_heads, c.head_dim)
            .with_context(|| format!("--kv {}", policy.name()))?;
        let ft = args.frame_tokens.max(1);
        let mut warm = new_session(&dev, &model, dp, ft, 9, ft, memory)?;
        let (_, tok) = prefill(&mut warm, ft, 8, ft, &mut rng)?;
        warm.forward(&[DeviceInput::Ids {
            ids: &[tok],
            kind: TokenKind::Text,
        }])?;
    }
    for &context in &args.context {
        let (frame_total, text_total) = layout(context, args.text_fraction, args.frame_tokens);
        let real = real_prefill(&args.prefill, context, 4096)?;
        for policy in &policies {
            let name = policy.name();
            let dp = DevicePolicy::new(policy, c.num_key_value_heads, c.head_dim)
                .with_context(|| format!("--kv {name}"))?;
            eprintln!(
                "context {context}, KV {name}: filling ({})...",
                if real { "prefill" } else { "synthetic" }
            );
            let mut session = new_session(
                &dev,
                &model,
                dp.clone(),
                frame_total,
                text_total + args.steps + 8,
                args.frame_tokens,
                memory,
            )?;
            let (ttft_ms, prefill_tokens, mut next) = if real {
                let (ms, tok) = prefill(
                    &mut session,
                    frame_total,
                    text_total,
                    args.frame_tokens,
                    &mut rng,
                )?;
                (ms, context, tok)
            } else {
                synthetic_fill(
                    &dev,
                    &mut session,
                    frame_total,
                    text_total,
                    args.frame_tokens,
                )?;
                let n = args.ttft_tokens.min(context).max(1);
                let (f, t) = layout(n, args.text_fraction, args.frame_tokens);
                let mut s2 = new_session(&dev, &model, dp, f, t + 1, args.frame_tokens, memory)?;
                let (ms, _) = prefill(&mut s2, f, t, args.frame_tokens, &mut rng)?;
                (ms, n, rng.random_range(0..model.vocab_size() as u32))
            };
            let mut times = Vec::with_capacity(args.steps);
            let mut kv_read = 0u64;
            for s in 0..args.steps + 2 {
                if s == args.steps / 2 + 2 {
                    // Offloaded: the bytes the last step streamed over PCIe.
                    kv_read = session
                        .cache()
                        .streamed_bytes_last_step()
                        .unwrap_or_else(|| session.cache().attention_read_bytes());
                }
                let t = Instant::now();
                let logits = session.forward(&[DeviceInput::Ids {
                    ids: &[next],
                    kind: TokenKind::Text,
                }])?;
                next = argmax(&logits);
                if s >= 2 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize] * 1e3;
            let wbytes = model.weight_bytes_read_per_token();
            let bytes = (wbytes + kv_read) as f64;
            let achieved = bytes / mean / 1e9;
            let roofline_s = wbytes as f64 / (bw.read_gbs * 1e9) + kv_read as f64 / (kv_gbs * 1e9);
            let (text_tokens, frame_tokens) = session.cache().table().token_counts();
            rows.push(Row {
                context,
                weights: "stored".into(),
                kv: name,
                prefill: if real { "real" } else { "synthetic" },
                prefill_tokens,
                ttft_ms,
                prefill_tokens_per_s: prefill_tokens as f64 / (ttft_ms / 1e3),
                tpot_ms: mean * 1e3,
                tpot_p10_ms: pct(0.1),
                tpot_p90_ms: pct(0.9),
                weight_bytes_per_token: wbytes,
                kv_bytes_per_token: kv_read,
                kv_bytes_total: session.cache().attention_read_bytes(),
                text_tokens,
                frame_tokens,
                achieved_gbs: achieved,
                bandwidth_during_gbs: None,
                bandwidth_fraction: achieved / bw.read_gbs,
                peak_fraction: achieved / bw.read_gbs,
                phases: None,
                roofline_tpot_ms: roofline_s * 1e3,
            });
        }
    }
    let report = Report {
        model: args.model.display().to_string(),
        device: dev.info().name.clone(),
        weight_dtype: model.weight_dtype().to_string(),
        kv_memory: match memory {
            PoolMemory::Device => "device",
            PoolMemory::MappedHost => "host (streamed per layer over PCIe)",
        },
        bandwidth_gbs: bw.read_gbs,
        copy_gbs: bw.copy_gbs,
        bandwidth_buffer_bytes: bw.buffer_bytes,
        pcie_h2d_gbs: pcie.map(|p| p.0),
        pcie_d2h_gbs: pcie.map(|p| p.1),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "model {} ({} weights) on {}, KV in {} memory",
        r.model, r.weight_dtype, r.device, r.kv_memory
    );
    println!(
        "device bandwidth: read {:.1} GB/s, copy {:.1} GB/s (buffer {:.0} MB){}",
        r.bandwidth_gbs,
        r.copy_gbs,
        mb(r.bandwidth_buffer_bytes as u64),
        match (r.pcie_h2d_gbs, r.pcie_d2h_gbs) {
            (Some(a), Some(b)) =>
                format!("; PCIe pinned host-to-device {a:.1} GB/s, device-to-host {b:.1} GB/s"),
            _ => String::new(),
        }
    );
    super::decode::print_rows(&r.rows, 3, 1);
    for fp in r.rows.iter().filter(|x| x.kv == "fp16") {
        for x in r
            .rows
            .iter()
            .filter(|x| x.context == fp.context && x.kv != "fp16")
        {
            println!(
                "context {}: {} vs fp16: TPOT {:.2}x lower, TTFT {:.2}x lower, KV bytes per token {:.3} of fp16",
                x.context,
                x.kv,
                fp.tpot_ms / x.tpot_ms,
                fp.ttft_ms / x.ttft_ms,
                x.kv_bytes_per_token as f64 / fp.kv_bytes_per_token.max(1) as f64
            );
        }
    }
    println!(
        "TTFT of a synthetic row is a real prefill of the shown token count; its context was written as random K/V."
    );
    if r.pcie_h2d_gbs.is_some() {
        println!(
            "KV in host memory: KV MB/t is what one step streams over PCIe; GB/s and BW % count it against the device read bandwidth, while roof ms charges it at the measured host-to-device rate."
        );
    }
}
