//! `jetvlm generate`: text generation with a Hugging Face decoder directory on the mixed KV
//! cache, streamed to stdout or reported as one JSON object.

use anyhow::{Context, Result, bail};
use clap::Args;
use jetvlm_core::Device;
use jetvlm_decoder::{
    ChatMessage, Decode, F32KvCache, GenerateOptions, Generation, Input, KvStore, LoadOptions,
    Model, SamplerConfig, Tokenizer,
};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm generate --model path/to/hf-model --prompt \"Hello\" --max-tokens 32 --kv mixed --json\n  \
    jetvlm generate --model models/demo --prompt \"Hello\" --greedy")]
pub struct GenerateArgs {
    /// Decoder directory in Hugging Face layout (config.json, *.safetensors, tokenizer.json),
    /// or a jetvlm model package (its decoder is used).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (rendered through the chat template when the model has one, unless --raw).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Use the prompt text as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum tokens to generate (at least 1).
    #[arg(long, default_value_t = 128, value_parser = super::at_least_one)]
    pub max_tokens: usize,
    /// Greedy decoding (overrides the sampling options).
    #[arg(long)]
    pub greedy: bool,
    /// Softmax temperature; 0 picks the most likely token.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p, in (0, 1].
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Divides positive and multiplies negative logits of tokens already seen (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Seed of the sampler's random numbers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// KV cache policy: fp16, mixed, int4-all, ... (see the kvcache policy forms), or f32
    /// for the exact reference cache.
    #[arg(long, default_value = "mixed")]
    pub kv: String,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Where the decoder runs: cpu, or cuda (weights and the mixed KV pools on the GPU; the
    /// f32 reference cache is CPU only).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

#[derive(Serialize)]
struct Report {
    token_ids: Vec<u32>,
    text: String,
    prompt_tokens: usize,
    ttft_ms: f64,
    tpot_ms: f64,
    finish_reason: Option<jetvlm_decoder::FinishReason>,
    kv: String,
    model: String,
}

pub fn run(mut args: GenerateArgs) -> Result<()> {
    // A package's block sizes hold where --kv names none, as in `ask` and `watch`.
    let package = super::package_kv_policy(&args.model)?;
    args.model = super::decoder_dir(&args.model)?;
    // A GPU run opens the device first: without one it fails before reading anything.
    match args.device {
        Device::Cuda => return run_device(&super::gpu::open(0)?, &args, package.as_ref()),
        Device::Sim => {
            return run_device(&jetvlm_cuda::SimDevice::new(), &args, package.as_ref());
        }
        Device::Cpu => {}
    }
    let model = Model::load(&args.model, &LoadOptions::default())
        .with_context(|| format!("loading the decoder from {}", args.model.display()))?;
    let tokenizer = tokenizer_for(&args)?;
    let prompt_ids = prompt_ids(&args, tokenizer.as_ref())?;
    let opts = options(
        &args,
        tokenizer.as_ref(),
        &model.config().model.eos_token_ids,
    )?;
    let capacity = cache_capacity(prompt_ids.len(), args.max_tokens)?;
    warn_past_positions(&model.config().model, prompt_ids.len(), args.max_tokens);
    if args.kv == "f32" {
        let mut cache = F32KvCache::new(model.cache_shape(), capacity);
        generate(
            &model,
            &mut cache,
            tokenizer.as_ref(),
            &prompt_ids,
            opts,
            &args,
            "f32".into(),
        )
    } else {
        let policy = policy_in_effect(&args.kv, package.as_ref(), model.cache_shape().head_dim)?;
        let name = policy.name();
        let mut cache = MixedKvCache::new(model.cache_shape(), policy, capacity)?;
        generate(
            &model,
            &mut cache,
            tokenizer.as_ref(),
            &prompt_ids,
            opts,
            &args,
            name,
        )
    }
}

/// Tokens the KV cache must hold: the prompt, `--max-tokens` answer tokens and one spare.
/// A `--max-tokens` whose sum overflows is an error naming the flag.
fn cache_capacity(prompt_tokens: usize, max_tokens: usize) -> Result<usize> {
    prompt_tokens
        .checked_add(max_tokens)
        .and_then(|n| n.checked_add(1))
        .with_context(|| {
            format!(
                "--max-tokens {max_tokens}: the prompt's {prompt_tokens} tokens plus this many \
                 overflow the KV cache's token count; use a smaller --max-tokens"
            )
        })
}

/// The `--kv` policy as the cache runs it: a package's block sizes where it names none, the
/// group fitted to the head dim (the name reported is this policy's).
fn policy_in_effect(kv: &str, package: Option<&KvPolicy>, head_dim: usize) -> Result<KvPolicy> {
    let spelled: KvPolicy = kv.parse().with_context(|| format!("--kv {kv}"))?;
    Ok(spelled.in_effect(kv, package, head_dim))
}

/// Warns when the prompt and `--max-tokens` pass the model's trained positions.
fn warn_past_positions(c: &jetvlm_core::hf::ModelConfig, prompt_tokens: usize, max_tokens: usize) {
    if let Some(w) = c.positions_warning(
        prompt_tokens.saturating_add(max_tokens),
        &format!("the prompt ({prompt_tokens} tokens) with --max-tokens {max_tokens}"),
    ) {
        tracing::warn!("{w}");
    }
}

fn tokenizer_for(args: &GenerateArgs) -> Result<Option<Tokenizer>> {
    Ok(
        if args.model.join("tokenizer.json").is_file() || args.prompt.is_some() {
            Some(Tokenizer::from_dir(&args.model)?)
        } else {
            None
        },
    )
}

fn prompt_ids(args: &GenerateArgs, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>> {
    let prompt_ids: Vec<u32> = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tokenizer.context("a text prompt needs tokenizer.json")?;
            if !args.raw && tok.has_chat_template() {
                let mut msgs = Vec::new();
                if let Some(s) = &args.system {
                    msgs.push(ChatMessage::new("system", s));
                }
                msgs.push(ChatMessage::new("user", text));
                tok.encode_chat(&msgs, true)?
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(prompt_ids)
}

/// Checks sampling parameters that came from flags; the error names the flag
/// (`--temperature`, `--top-p`, `--repetition-penalty`).
pub(crate) fn check_sampling(s: &SamplerConfig) -> Result<()> {
    match s.validate() {
        Err(jetvlm_decoder::DecoderError::Sampling {
            field,
            value,
            expected,
        }) => bail!("--{} {value}: {expected}", field.replace('_', "-")),
        other => Ok(other?),
    }
}

fn options(
    args: &GenerateArgs,
    tokenizer: Option<&Tokenizer>,
    eos: &[u32],
) -> Result<GenerateOptions> {
    let sampler = if args.greedy {
        SamplerConfig::greedy()
    } else {
        SamplerConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        }
    };
    let stop_tokens = match (tokenizer, args.ignore_eos) {
        (_, true) => Vec::new(),
        (Some(t), false) => t.stop_token_ids().to_vec(),
        (None, false) => eos.to_vec(),
    };
    check_sampling(&sampler)?;
    Ok(GenerateOptions {
        max_tokens: args.max_tokens,
        sampler,
        stop_tokens,
        stop_strings: args.stop.clone(),
        skip_special: true,
    })
}

/// `--device cuda` (or `sim`): the decoder and its KV cache on the device; the host samples.
fn run_device<G: jetvlm_cuda::Gpu>(
    dev: &G,
    args: &GenerateArgs,
    package: Option<&KvPolicy>,
) -> Result<()> {
    use jetvlm_core::TokenKind;
    use jetvlm_cuda::{DeviceInput, DeviceKvCache, DevicePolicy, DeviceSession, PoolMemory};
    if args.kv == "f32" {
        bail!(
            "--kv f32 is the CPU reference cache; on --device {} use fp16, mixed or another policy",
            args.device
        );
    }
    // Parsed before the model loads: a bad --kv fails first.
    let spelled: KvPolicy = args
        .kv
        .parse()
        .with_context(|| format!("--kv {}", args.kv))?;
    let tokenizer = tokenizer_for(args)?;
    let prompt_ids = prompt_ids(args, tokenizer.as_ref())?;
    let model = jetvlm_cuda::DeviceDecoder::load(dev, &args.model)
        .with_context(|| format!("loading the decoder from {}", args.model.display()))?;
    let c = &model.config().model;
    let policy = spelled.in_effect(&args.kv, package, c.head_dim);
    let opts = options(args, tokenizer.as_ref(), &c.eos_token_ids)?;
    let dp = DevicePolicy::new(&policy, c.num_key_value_heads, c.head_dim)?;
    let capacity = cache_capacity(prompt_ids.len(), args.max_tokens)?;
    warn_past_positions(c, prompt_ids.len(), args.max_tokens);
    let cache = DeviceKvCache::new(
        dev,
        dp,
        c.num_hidden_layers,
        capacity,
        0,
        2,
        PoolMemory::Device,
    )?;
    let mut session = DeviceSession::new(dev, &model, cache)?;
    let t0 = Instant::now();
    let data = session.forward(&[DeviceInput::Ids {
        ids: &prompt_ids,
        kind: TokenKind::Text,
    }])?;
    let vocab = data.len();
    let prompt_logits = jetvlm_decoder::Logits {
        data,
        rows: 1,
        vocab,
    };
    let generation = Generation::resume(
        session,
        prompt_logits,
        &prompt_ids,
        tokenizer.as_ref(),
        opts,
    );
    stream(
        generation,
        t0,
        tokenizer.is_some(),
        prompt_ids.len(),
        args,
        policy.name(),
        &args.device.to_string(),
    )
}

fn print_report(report: &Report, json: bool, device: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, report)?;
        writeln!(out)?;
    } else {
        writeln!(out)?;
        eprintln!(
            "[{} prompt tokens, {} generated, TTFT {:.1} ms, TPOT {:.2} ms, KV {}, device {device}, finish {:?}]",
            report.prompt_tokens,
            report.token_ids.len(),
            report.ttft_ms,
            report.tpot_ms,
            report.kv,
            report.finish_reason
        );
    }
    Ok(())
}

fn generate<C: KvStore>(
    model: &Model,
    cache: &mut C,
    tokenizer: Option<&Tokenizer>,
    prompt_ids: &[u32],
    opts: GenerateOptions,
    args: &GenerateArgs,
    kv: String,
) -> Result<()> {
    let t0 = Instant::now();
    let generation = Generation::start(
        model,
        cache,
        &[Input::text(prompt_ids)],
        prompt_ids,
        tokenizer,
        opts,
    )?;
    stream(
        generation,
        t0,
        tokenizer.is_some(),
        prompt_ids.len(),
        args,
        kv,
        "cpu",
    )
}

/// Runs a started generation to its end (text streamed to stdout unless `--json`) and
/// prints the report; `t0` is when the prompt's prefill began.
fn stream<D: Decode>(
    mut generation: Generation<'_, D>,
    t0: Instant,
    has_tokenizer: bool,
    prompt_tokens: usize,
    args: &GenerateArgs,
    kv: String,
    device: &str,
) -> Result<()>
where
    anyhow::Error: From<D::Error>,
{
    let mut first: Option<Instant> = None;
    let mut last = t0;
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
    for step in generation.by_ref() {
        let step = step?;
        last = Instant::now();
        first.get_or_insert(last);
        ids.push(step.token);
        if !args.json && !step.text.is_empty() {
            out.write_all(step.text.as_bytes())?;
            out.flush()?;
        }
    }
    let ttft_ms = first.map_or(0.0, |f| (f - t0).as_secs_f64() * 1e3);
    let tpot_ms = match first {
        Some(f) if ids.len() > 1 => (last - f).as_secs_f64() * 1e3 / (ids.len() - 1) as f64,
        _ => 0.0,
    };
    let text = if has_tokenizer {
        generation.text().to_string()
    } else {
        String::new()
    };
    let report = Report {
        token_ids: ids,
        text,
        prompt_tokens,
        ttft_ms,
        tpot_ms,
        finish_reason: generation.finish_reason(),
        kv,
        model: args.model.display().to_string(),
    };
    drop(out);
    print_report(&report, args.json, device)
}
