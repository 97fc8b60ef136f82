//! `jetvlm bench decode`: time to first token and time per output token of a decoder at a
//! given context length, with the FP16 KV policy and with the mixed policy (all but the last
//! 10% of the context cached as camera-frame tokens), held against the roofline
//! `TPOT >= (weight bytes + KV bytes read per token) / measured DRAM bandwidth`.
//!
//! Before every timed decode step the bandwidth probe's buffer (at least four times the
//! last-level cache) is read on every core, outside the timed region, so weights and KV come
//! from DRAM as they must on a Jetson, whose CPU has a few MB of cache, not from a large
//! server L3; `--no-flush` turns this off. The policies' decode steps are timed in turn (one
//! step of each per round), so that other processes sharing the cores slow all of them alike;
//! the load average is reported with the figures.
//!
//! Each of those reads is timed too: a row's `BW %` holds its mean step against the probe
//! reads just before its steps (the bandwidth of the same moments, where a shared machine's
//! bandwidth moves during a run). `peak %` holds it against the peak: the fastest of the
//! probe passes before and after all the decode steps and of the reads between them.
//! Without the flush both columns use the peak.
//!
//! `--weights bf16,q8,q4` compares weight formats in the same run: each is loaded (converted
//! at load, or quantized by `jetvlm quantize`'s code into a temporary directory that is
//! removed once mapped, or read from a prequantized directory) and its decode steps join the
//! same interleaved rounds.

use anyhow::{Context, Result, bail};
use clap::Args;
use jetvlm_core::DType;
use jetvlm_core::{TokenKind, sysinfo};
use jetvlm_decoder::profile::{self, Phase, PhaseTimes};
use jetvlm_decoder::quantize::{QuantizeOptions, quantize_dir};
use jetvlm_decoder::{Input, LoadOptions, Model, sampler::argmax};
use jetvlm_kvcache::policy::split_policies;
use jetvlm_kvcache::{KvPolicy, MixedKvCache};
use jetvlm_quant::WeightFormat;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Decoder directory in Hugging Face layout (e.g. the one
    /// `models/scripts/make_random_smollm2.py` writes).
    #[arg(long)]
    pub model: PathBuf,
    /// Context lengths (tokens already cached when decoding starts), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    pub context: Vec<usize>,
    /// Timed decode steps per measurement (after 2 warm-up steps).
    #[arg(long, default_value_t = 48)]
    pub steps: usize,
    /// Tokens per camera frame in the frame part of the context.
    #[arg(long, default_value_t = 64)]
    pub frame_tokens: usize,
    /// Fraction of the context that is text (the rest are frame tokens).
    #[arg(long, default_value_t = 0.10, allow_negative_numbers = true)]
    pub text_fraction: f64,
    /// How the context is filled: `real` runs the prefill through the model (and times it
    /// as TTFT), `synthetic` writes random K/V straight into the cache and times TTFT on a
    /// real prefill of `--ttft-tokens`, `auto` is real up to 2048 tokens.
    #[arg(long, default_value = "auto")]
    pub prefill: String,
    /// Prompt length of the TTFT measurement when the context is filled synthetically.
    #[arg(long, default_value_t = 1024)]
    pub ttft_tokens: usize,
    /// KV policies to compare, comma-separated (`fp16,mixed:bits=2,group=32`: a policy's
    /// own `key=value` pieces stay with it); repeatable.
    #[arg(long, default_value = "fp16,mixed")]
    pub kv: Vec<String>,
    /// Weight formats to compare, comma-separated: `stored` (as the model holds them),
    /// `bf16`, `f16`, `f32` (converted at load), `q8`, `q4` (quantized as `jetvlm quantize
    /// --bits 8|4 --head-bits 8` does, groups of 64; `q4g32`, `q8g128` name the group), or
    /// a directory holding the same decoder already quantized. CPU only.
    #[arg(long, value_delimiter = ',', default_value = "stored")]
    pub weights: Vec<String>,
    /// Do not read the bandwidth probe's buffer before each decode step (which evicts the
    /// last-level cache and gives BW % the bandwidth of the same moments; without it BW %
    /// uses the peak).
    #[arg(long)]
    pub no_flush: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also time each phase of the decode steps (norms, products, RoPE, attention, head:
    /// `jetvlm_decoder::profile`), per row in ms per step; costs a clock read per phase (CPU
    /// only).
    #[arg(long)]
    pub phases: bool,
    /// cpu, or cuda: the decoder and its KV pools on the GPU, against the device bandwidth.
    #[arg(long, default_value = "cpu")]
    pub device: jetvlm_core::Device,
    /// With --device cuda: `host` keeps the KV pools in pinned host memory that the attention
    /// kernel reads over PCIe (the offloaded setting); `none` keeps them in device memory.
    #[arg(long, default_value = "none")]
    pub kv_offload: String,
}

impl DecodeArgs {
    /// The policies of every `--kv`, in order, each with its spelling.
    fn spelled_policies(&self) -> Result<Vec<(String, KvPolicy)>> {
        self.kv
            .iter()
            .flat_map(|list| split_policies(list))
            .map(|s| {
                let p = s.parse::<KvPolicy>().with_context(|| format!("--kv {s}"))?;
                Ok((s, p))
            })
            .collect()
    }

    /// The policies of every `--kv` as they run on a model of head dim `head_dim` whose
    /// package policy is `package` ([`KvPolicy::in_effect`]: the package's block sizes where
    /// the spelling names none, the group fitted to the head dim).
    pub(super) fn policies_in_effect(
        &self,
        package: Option<&KvPolicy>,
        head_dim: usize,
    ) -> Result<Vec<KvPolicy>> {
        Ok(self
            .spelled_policies()?
            .into_iter()
            .map(|(s, p)| p.in_effect(&s, package, head_dim))
            .collect())
    }
}

/// A `--weights` entry (`bench decode`, `eval`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum WeightChoice {
    Stored,
    Convert(DType),
    Quantize(WeightFormat),
    Dir(PathBuf),
}

/// Parses one `--weights` entry (`stored`, `bf16`, `q4`, `q8g128`, a directory).
pub(crate) fn parse_weights(s: &str) -> Result<WeightChoice> {
    let bad = || {
        anyhow::anyhow!(
            "--weights {s}: expected stored, bf16, f16, f32, q8 or q4 (optionally with a group: q4g32, q4g64, q4g128), or a decoder directory"
        )
    };
    Ok(match s {
        "stored" => WeightChoice::Stored,
        "bf16" => WeightChoice::Convert(DType::BF16),
        "f16" => WeightChoice::Convert(DType::F16),
        "f32" => WeightChoice::Convert(DType::F32),
        _ if s.starts_with('q') && !Path::new(s).exists() => {
            let (bits, group) = s[1..].split_once('g').unwrap_or((&s[1..], "64"));
            let bits: u32 = bits.parse().map_err(|_| bad())?;
            let group: usize = group.parse().map_err(|_| bad())?;
            WeightChoice::Quantize(
                WeightFormat::new(bits, group)
                    .map_err(|e| anyhow::anyhow!("--weights {s}: {e}"))?,
            )
        }
        _ if Path::new(s).join("config.json").is_file() => WeightChoice::Dir(PathBuf::from(s)),
        _ => return Err(bad()),
    })
}

/// Loads `--model` in the format `choice` names.
fn load_weights(model: &Path, name: &str, choice: &WeightChoice) -> Result<Model> {
    let ctx = || {
        format!(
            "--weights {name}: loading the decoder from {}",
            model.display()
        )
    };
    Ok(match choice {
        WeightChoice::Stored => Model::load(model, &LoadOptions::default()).with_context(ctx)?,
        WeightChoice::Convert(dt) => {
            Model::load(model, &LoadOptions { dtype: Some(*dt) }).with_context(ctx)?
        }
        WeightChoice::Dir(dir) => Model::load(dir, &LoadOptions::default())
            .with_context(|| format!("--weights {name}: loading {}", dir.display()))?,
        WeightChoice::Quantize(format) => {
            let tmp =
                std::env::temp_dir().join(format!("jetvlm-bench-{}-{name}", std::process::id()));
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)
                    .with_context(|| format!("removing {}", tmp.display()))?;
            }
            eprintln!("--weights {name}: quantizing {}...", model.display());
            let opts = QuantizeOptions {
                format: *format,
                head_int8: true,
            };
            let loaded = quantize_dir(model, &tmp, &opts)
                .with_context(|| format!("--weights {name}: quantizing {}", model.display()))
                .and_then(|_| Model::load(&tmp, &LoadOptions::default()).with_context(ctx));
            // The model maps its file: the directory can go now.
            let _ = std::fs::remove_dir_all(&tmp);
            loaded?
        }
    })
}

/// One context x weights x policy row (shared with the CUDA bench).
#[derive(Serialize)]
pub(super) struct Row {
    pub(super) context: usize,
    /// The `--weights` entry (`stored` when not given).
    pub(super) weights: String,
    pub(super) kv: String,
    pub(super) prefill: &'static str,
    pub(super) prefill_tokens: usize,
    pub(super) ttft_ms: f64,
    /// `prefill_tokens / TTFT`.
    pub(super) prefill_tokens_per_s: f64,
    pub(super) tpot_ms: f64,
    pub(super) tpot_p10_ms: f64,
    pub(super) tpot_p90_ms: f64,
    pub(super) weight_bytes_per_token: u64,
    pub(super) kv_bytes_per_token: u64,
    pub(super) kv_bytes_total: u64,
    pub(super) text_tokens: usize,
    pub(super) frame_tokens: usize,
    pub(super) achieved_gbs: f64,
    /// The read bandwidth of the probe passes timed just before this row's steps (their
    /// bytes over their mean time); `None` where none were timed (`--no-flush`, CUDA).
    pub(super) bandwidth_during_gbs: Option<f64>,
    /// `achieved_gbs` over `bandwidth_during_gbs`, or over the peak where that is `None`.
    pub(super) bandwidth_fraction: f64,
    /// `achieved_gbs` over the peak bandwidth.
    pub(super) peak_fraction: f64,
    /// Bytes per token at the bandwidth of `bandwidth_fraction`.
    pub(super) roofline_tpot_ms: f64,
    /// With `--phases`: ms per step of each phase of the decode steps, in step order.
    pub(super) phases: Option<Vec<PhaseMs>>,
}

/// One phase's time per decode step (`--phases`).
#[derive(Serialize)]
pub(super) struct PhaseMs {
    phase: &'static str,
    ms: f64,
}

/// One `--weights` entry as loaded.
#[derive(Serialize)]
struct WeightsInfo {
    name: String,
    /// `Model::weight_description` (`int4 g64, LM head int8 g64, embeddings bf16`).
    description: String,
    /// Bytes of the weight buffers the loaded model holds.
    bytes_held: u64,
    bytes_read_per_token: u64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    weight_dtype: String,
    weights: Vec<WeightsInfo>,
    threads: usize,
    llc_bytes: Option<u64>,
    /// The peak: the highest of the two bandwidth measurements and every probe read between
    /// the decode steps (`peak %` uses it).
    bandwidth_gbs: f64,
    /// Measured before the first and after the last decode step: a measurement slowed by
    /// other processes would flatter BW %, so the higher one is used.
    bandwidth_start_gbs: f64,
    bandwidth_end_gbs: f64,
    /// The fastest single probe read between the decode steps (none with `--no-flush`).
    bandwidth_between_steps_max_gbs: Option<f64>,
    bandwidth_buffer_bytes: usize,
    llc_flushed_between_steps: bool,
    /// 1/5/15-minute load averages at the start and at the end of the run (Linux), to judge
    /// whether other processes shared the cores.
    load_average_start: Option<String>,
    load_average_end: Option<String>,
    rows: Vec<Row>,
}

/// The 1/5/15-minute load averages (`/proc/loadavg`; `None` elsewhere).
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// One weights x policy's filled cache and its decode timings.
struct PolicyRun {
    /// Index into the loaded models.
    model: usize,
    name: String,
    cache: MixedKvCache,
    ttft_ms: f64,
    prefill_tokens: usize,
    next: u32,
    times: Vec<f64>,
    /// Seconds of the probe pass before each timed step.
    probe_times: Vec<f64>,
    /// The timed steps' phases (`--phases`).
    phases: PhaseTimes,
    kv_read: u64,
}

/// The context layout: frame spans of `frame_tokens` (the leading part), then text.
fn layout(context: usize, text_fraction: f64, frame_tokens: usize) -> (usize, usize) {
    let text = ((context as f64 * text_fraction).round() as usize).clamp(1, context);
    let frames = (context - text) / frame_tokens.max(1);
    let frame_total = frames * frame_tokens.max(1);
    (frame_total, context - frame_total)
}

pub fn run(mut args: DecodeArgs) -> Result<()> {
    let package_policy = crate::cmd::package_kv_policy(&args.model)?;
    args.model = crate::cmd::decoder_dir(&args.model)?;
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
    } else if args.kv_offload != "none" {
        bail!("--kv-offload {} needs --device cuda", args.kv_offload);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.device != jetvlm_core::Device::Cpu && args.weights.iter().any(|w| w != "stored") {
        bail!("--weights compares weight formats on the CPU decoder (--device cpu)");
    }
    if args.device != jetvlm_core::Device::Cpu && args.phases {
        bail!("--phases times the CPU decoder's steps (--device cpu)");
    }
    #[cfg(feature = "cuda")]
    if args.device == jetvlm_core::Device::Cuda {
        return super::decode_cuda::run(&args, package_policy.as_ref());
    }
    let choices = args
        .weights
        .iter()
        .map(|w| Ok((w.clone(), parse_weights(w)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut models = Vec::with_capacity(choices.len());
    for (name, choice) in &choices {
        models.push(load_weights(&args.model, name, choice)?);
    }
    let weights_info: Vec<WeightsInfo> = models
        .iter()
        .zip(&choices)
        .map(|(m, (name, _))| WeightsInfo {
            name: name.clone(),
            description: m.weight_description(),
            bytes_held: m.weight_bytes_held(),
            bytes_read_per_token: m.weight_bytes_read_per_token(),
        })
        .collect();
    let model = &models[0];
    let shape = |m: &Model| {
        let c = &m.config().model;
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.intermediate_size,
            c.vocab_size,
            c.head_dim,
        )
    };
    if let Some(m) = models.iter().find(|m| shape(m) != shape(model)) {
        bail!(
            "--weights: the formats are not the same decoder ({} and {} differ in shape)",
            model.weight_description(),
            m.weight_description()
        );
    }
    // As `ask` and `watch` run them on the same --model (a package's block sizes, the group
    // fitted to the head dim), and so named.
    let policies =
        args.policies_in_effect(package_policy.as_ref(), model.cache_shape().head_dim)?;
    let threads = rayon::current_num_threads();
    let load_average_start = load_average();
    eprintln!("measuring memory bandwidth...");
    let bw = sysinfo::measure_read_bandwidth(0);
    let llc = sysinfo::last_level_cache_bytes();
    // The probe's buffer: evicts the last-level cache and times a bandwidth sample.
    let probe = (!args.no_flush).then(|| sysinfo::ReadProbe::new(bw.buffer_bytes, bw.threads));
    let mut fastest_read: Option<f64> = None;
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(7);
    for &context in &args.context {
        let (frame_total, text_total) = layout(context, args.text_fraction, args.frame_tokens);
        let real = real_prefill(&args.prefill, context, 2048)?;
        // Every policy's cache is filled first; their decode steps are then timed in turn
        // (one step of each policy per round), so load from other processes during the
        // run falls on all policies alike.
        let mut runs = Vec::with_capacity(policies.len() * models.len());
        for (mi, (model, (wname, _))) in models.iter().zip(&choices).enumerate() {
            for policy in &policies {
                let name = policy.name();
                eprintln!(
                    "context {context}, weights {wname}, KV {name}: filling ({})...",
                    if real { "prefill" } else { "synthetic" }
                );
                let mut cache = MixedKvCache::new(
                    model.cache_shape(),
                    policy.clone(),
                    context + args.steps + 8,
                )?;
                let (ttft_ms, prefill_tokens, next) = if real {
                    let (ms, tok) = prefill(
                        model,
                        &mut cache,
                        frame_total,
                        text_total,
                        args.frame_tokens,
                        &mut rng,
                    )?;
                    (ms, context, tok)
                } else {
                    synthetic_fill(
                        model,
                        &mut cache,
                        frame_total,
                        text_total,
                        args.frame_tokens,
                        &mut rng,
                    )?;
                    // TTFT on a separate real prefill of the same layout, shorter.
                    let n = args.ttft_tokens.min(context).max(1);
                    let (f, t) = layout(n, args.text_fraction, args.frame_tokens);
                    let mut c2 = MixedKvCache::new(model.cache_shape(), policy.clone(), n + 1)?;
                    let (ms, _) = prefill(model, &mut c2, f, t, args.frame_tokens, &mut rng)?;
                    (ms, n, rng.random_range(0..model.vocab_size() as u32))
                };
                runs.push(PolicyRun {
                    model: mi,
                    name,
                    cache,
                    ttft_ms,
                    prefill_tokens,
                    next,
                    times: Vec::with_capacity(args.steps),
                    probe_times: Vec::with_capacity(args.steps),
                    phases: PhaseTimes::default(),
                    kv_read: 0,
                });
            }
        }
        // Two warm-up rounds, then timed rounds (LLC evicted before each step).
        eprintln!(
            "context {context}: {} decode steps per policy...",
            args.steps
        );
        for s in 0..args.steps + 2 {
            for r in runs.iter_mut() {
                if s == args.steps / 2 + 2 {
                    r.kv_read = r.cache.memory().attention_read_bytes;
                }
                let probe_secs = probe.as_ref().map(sysinfo::ReadProbe::read);
                profile::set_recording(args.phases && s >= 2);
                let t = Instant::now();
                let logits = models[r.model].forward(&[Input::text(&[r.next])], &mut r.cache)?;
                r.next = argmax(logits.last());
                let step = profile::take();
                if s >= 2 {
                    r.phases.add(&step);
                    r.times.push(t.elapsed().as_secs_f64());
                    r.probe_times.extend(probe_secs);
                }
            }
        }
        for mut r in runs {
            let mem = r.cache.memory();
            let times = &mut r.times;
            times.sort_by(f64::total_cmp);
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize] * 1e3;
            let wbytes = models[r.model].weight_bytes_read_per_token();
            let bytes = (wbytes + r.kv_read) as f64;
            let achieved = bytes / mean / 1e9;
            let (during, fastest) = match &probe {
                Some(p) if !r.probe_times.is_empty() => {
                    let gbs = |secs: f64| p.bytes() as f64 / secs / 1e9;
                    let n = r.probe_times.len() as f64;
                    let shortest = r.probe_times.iter().copied().fold(f64::INFINITY, f64::min);
                    (
                        Some(gbs(r.probe_times.iter().sum::<f64>() / n)),
                        Some(gbs(shortest)),
                    )
                }
                _ => (None, None),
            };
            fastest_read = match (fastest_read, fastest) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            rows.push(Row {
                context,
                weights: choices[r.model].0.clone(),
                kv: r.name,
                prefill: if real { "real" } else { "synthetic" },
                prefill_tokens: r.prefill_tokens,
                ttft_ms: r.ttft_ms,
                prefill_tokens_per_s: r.prefill_tokens as f64 / (r.ttft_ms / 1e3),
                tpot_ms: mean * 1e3,
                tpot_p10_ms: pct(0.1),
                tpot_p90_ms: pct(0.9),
                weight_bytes_per_token: wbytes,
                kv_bytes_per_token: r.kv_read,
                kv_bytes_total: mem.total_bytes,
                text_tokens: mem.text_tokens,
                frame_tokens: mem.frame_tokens,
                achieved_gbs: achieved,
                bandwidth_during_gbs: during,
                phases: args.phases.then(|| {
                    Phase::ALL
                        .iter()
                        .map(|&p| PhaseMs {
                            phase: p.name(),
                            ms: r.phases.ms_per_step(p),
                        })
                        .collect()
                }),
                // Set against the peak bandwidth below.
                bandwidth_fraction: 0.0,
                peak_fraction: 0.0,
                roofline_tpot_ms: 0.0,
            });
        }
    }
    drop(probe);
    eprintln!("measuring memory bandwidth again...");
    let bw_end = sysinfo::measure_read_bandwidth(0);
    let best_gbs = bw.gbs.max(bw_end.gbs).max(fastest_read.unwrap_or(0.0));
    for row in &mut rows {
        let bytes = (row.weight_bytes_per_token + row.kv_bytes_per_token) as f64;
        let held = row.bandwidth_during_gbs.unwrap_or(best_gbs);
        row.bandwidth_fraction = row.achieved_gbs / held;
        row.peak_fraction = row.achieved_gbs / best_gbs;
        row.roofline_tpot_ms = bytes / (held * 1e9) * 1e3;
    }
    let report = Report {
        model: args.model.display().to_string(),
        weight_dtype: model.weight_description(),
        weights: weights_info,
        threads,
        llc_bytes: llc,
        bandwidth_gbs: best_gbs,
        bandwidth_start_gbs: bw.gbs,
        bandwidth_end_gbs: bw_end.gbs,
        bandwidth_between_steps_max_gbs: fastest_read,
        bandwidth_buffer_bytes: bw.buffer_bytes,
        llc_flushed_between_steps: !args.no_flush,
        load_average_start,
        load_average_end: load_average(),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs the context through the model: frame spans (random embedding rows, tagged Frame),
/// then text; returns the TTFT (prefill + first token) and the first token.
fn prefill(
    model: &Model,
    cache: &mut MixedKvCache,
    frame_total: usize,
    text_total: usize,
    frame_tokens: usize,
    rng: &mut StdRng,
) -> Result<(f64, u32)> {
    let vocab = model.vocab_size() as u32;
    let frames: Vec<Vec<f32>> = (0..frame_total / frame_tokens.max(1))
        .map(|_| {
            let ids: Vec<u32> = (0..frame_tokens)
                .map(|_| rng.random_range(0..vocab))
                .collect();
            model.embed(&ids)
        })
        .collect::<Result<_, _>>()?;
    let text: Vec<u32> = (0..text_total)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let mut inputs: Vec<Input> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| Input::frame(f, frame_tokens, i as u64))
        .collect();
    inputs.push(Input::text(&text));
    let t = Instant::now();
    let logits = model.forward(&inputs, cache)?;
    let tok = argmax(logits.last());
    Ok((t.elapsed().as_secs_f64() * 1e3, tok))
}

/// Fills the cache with random K/V (unit-scale normal-like values) in the same span layout,
/// without running the model.
fn synthetic_fill(
    model: &Model,
    cache: &mut MixedKvCache,
    frame_total: usize,
    text_total: usize,
    frame_tokens: usize,
    rng: &mut StdRng,
) -> Result<()> {
    let shape = model.cache_shape();
    let row = shape.kv_heads * shape.head_dim;
    let mut spans: Vec<(TokenKind, usize, Option<u64>)> = (0..frame_total / frame_tokens.max(1))
        .map(|i| (TokenKind::Frame, frame_tokens, Some(i as u64)))
        .collect();
    // Text in spans of at most 256 tokens.
    let mut left = text_total;
    while left > 0 {
        let n = left.min(256);
        spans.push((TokenKind::Text, n, None));
        left -= n;
    }
    let mut k = Vec::new();
    let mut v = Vec::new();
    for (kind, n, frame) in spans {
        let start = cache.next_position();
        let positions: Vec<u32> = (start..start + n as u32).collect();
        let span = cache.append_span(kind, &positions, frame)?;
        for layer in 0..shape.layers {
            k.clear();
            v.clear();
            // Sum of three uniforms: a cheap bell-shaped distribution.
            k.extend(
                (0..n * row)
                    .map(|_| rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5),
            );
            v.extend(
                (0..n * row)
                    .map(|_| rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5),
            );
            cache.write(layer, &span, &k, &v)?;
        }
    }
    Ok(())
}

/// Whether `--prefill` runs the real prefill at `context` (`auto`: up to `auto_limit`).
pub(super) fn real_prefill(prefill: &str, context: usize, auto_limit: usize) -> Result<bool> {
    Ok(match prefill {
        "real" => true,
        "synthetic" => false,
        "auto" => context <= auto_limit,
        other => bail!("--prefill {other}: expected real, synthetic or auto"),
    })
}

pub(super) fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn print_table(r: &Report) {
    println!("model {}, {} threads", r.model, r.threads);
    for w in &r.weights {
        println!(
            "weights {:<10} {} ({:.1} MB held, {:.1} MB read per token)",
            w.name,
            w.description,
            mb(w.bytes_held),
            mb(w.bytes_read_per_token)
        );
    }
    println!(
        "last-level cache {}, peak read bandwidth {:.2} GB/s (highest of {:.2} before, {:.2} after the decode steps{}; buffer {:.0} MB){}",
        r.llc_bytes
            .map_or("unknown".into(), |b| format!("{:.0} MB", mb(b))),
        r.bandwidth_gbs,
        r.bandwidth_start_gbs,
        r.bandwidth_end_gbs,
        r.bandwidth_between_steps_max_gbs
            .map_or(String::new(), |g| format!(
                " and {g:.2} in one read between them"
            )),
        mb(r.bandwidth_buffer_bytes as u64),
        if r.llc_flushed_between_steps {
            ", read before every decode step (evicting the LLC; BW % against those reads)"
        } else {
            ""
        }
    );
    if let (Some(a), Some(b)) = (&r.load_average_start, &r.load_average_end) {
        println!("load average {a} at the start, {b} at the end");
    }
    print_rows(&r.rows, 2, 2);
    print_phases(&r.rows);
    println!(
        "TTFT of a synthetic row is a real prefill of the shown token count; its context was written as random K/V."
    );
}

/// With `--phases`: each row's ms per decode step by phase, their sum and the rest of TPOT
/// (embedding, cache bookkeeping, hand-off to the thread pool, argmax).
fn print_phases(rows: &[Row]) {
    let Some(first) = rows.iter().find_map(|r| r.phases.as_ref()) else {
        return;
    };
    println!("ms per decode step by phase:");
    print!("{:>7} {:<10} {:<28}", "context", "weights", "kv");
    for p in first {
        print!(" {:>9}", p.phase);
    }
    println!(" {:>9} {:>9}", "sum", "rest");
    for r in rows {
        let Some(ph) = &r.phases else { continue };
        print!("{:>7} {:<10} {:<28}", r.context, r.weights, r.kv);
        for p in ph {
            print!(" {:>9.3}", p.ms);
        }
        let sum: f64 = ph.iter().map(|p| p.ms).sum();
        println!(" {:>9.3} {:>9.3}", sum, r.tpot_ms - sum);
    }
}

/// The per-row table of both decode benches (`tpot_decimals` for TPOT and the roofline,
/// `gbs_decimals` for GB/s: a GPU's TPOT needs more digits than a CPU's).
pub(super) fn print_rows(rows: &[Row], tpot_decimals: usize, gbs_decimals: usize) {
    println!(
        "{:>7} {:<10} {:<28} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7} {:>7} {:>9}",
        "context",
        "weights",
        "kv",
        "prefill",
        "TTFT ms",
        "pf tok/s",
        "TPOT ms",
        "W MB/t",
        "KV MB/t",
        "KV MB",
        "GB/s",
        "BW GB/s",
        "BW %",
        "peak %",
        "roof ms"
    );
    for x in rows {
        println!(
            "{:>7} {:<10} {:<28} {:>9} {:>10.1} {:>9.0} {:>9.t$} {:>8.1} {:>8.2} {:>9.2} {:>8.g$} {:>8} {:>6.1}% {:>6.1}% {:>9.t$}",
            x.context,
            x.weights,
            x.kv,
            format!(
                "{}{}",
                x.prefill,
                if x.prefill == "real" {
                    String::new()
                } else {
                    format!("/{}", x.prefill_tokens)
                }
            ),
            x.ttft_ms,
            x.prefill_tokens_per_s,
            x.tpot_ms,
            mb(x.weight_bytes_per_token),
            mb(x.kv_bytes_per_token),
            mb(x.kv_bytes_total),
            x.achieved_gbs,
            x.bandwidth_during_gbs
                .map_or("peak".into(), |b| format!("{b:.gbs_decimals$}")),
            100.0 * x.bandwidth_fraction,
            100.0 * x.peak_fraction,
            x.roofline_tpot_ms,
            t = tpot_decimals,
            g = gbs_decimals
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_text_fraction_and_whole_frames() {
        assert_eq!(layout(1024, 0.1, 64), (896, 128));
        assert_eq!(layout(8192, 0.1, 64), (7360, 832));
        let (f, t) = layout(100, 0.1, 64);
        assert_eq!(f + t, 100);
        assert_eq!(f % 64, 0);
    }
}
