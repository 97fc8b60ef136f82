//! `jetvlm plan`: will this model and workload fit on this Jetson, how many frames could,
//! and how fast can it decode at best.

use anyhow::{Context, Result};
use clap::Args;
use jetvlm_board::detect::SystemInfo;
use jetvlm_board::plan::{self, CameraBuffers, Plan, PlanOptions, WeightFormat, Workload};
use jetvlm_board::{BoardProfile, BoardRegistry, KvPrecision, ModelSpec, VisionSource};
use jetvlm_kvcache::KvPolicy;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `jetvlm plan`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm plan --board orin-nano-8gb --model tests/fixtures/configs/smolvlm-256m\n  \
    jetvlm plan --model path/to/hf-model --frames 32 --json        # the board this runs on\n  \
    jetvlm plan --board orin-nano-4gb --model my-package --kv-calibration kv-calibration.yaml")]
pub struct PlanArgs {
    /// Board name (e.g. orin-nano-8gb; `jetvlm board list` shows all) or a path to a board
    /// YAML. Detected from /proc/device-tree/model when omitted.
    #[arg(long)]
    pub board: Option<String>,
    /// Directory of extra board YAML files (board name = file stem).
    #[arg(long, value_name = "DIR")]
    pub boards_dir: Option<PathBuf>,
    /// Model: a directory with a Hugging Face config.json, a path to config.json, or a
    /// jetvlm model package directory (jetvlm.yaml).
    #[arg(long)]
    pub model: PathBuf,
    /// Camera frames kept in the context.
    #[arg(long, default_value_t = 16)]
    pub frames: u64,
    /// Tokens each frame adds (default: from the model config or package).
    #[arg(long)]
    pub tokens_per_frame: Option<u64>,
    /// Text tokens of the prompt (system prompt, question, frame markers).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: u64,
    /// Tokens generated for the answer.
    #[arg(long, default_value_t = 128)]
    pub answer_tokens: u64,
    /// KV policy: fp16, mixed, int4-all, int8-frames, int2-frames, or
    /// mixed:bits=4,group=64,budget=0.1 (default: the package's policy, else mixed).
    #[arg(long)]
    pub kv: Option<String>,
    /// A KV calibration file from `jetvlm calibrate` (a frame format per layer) instead of
    /// --kv; it must have been measured on this model's shape.
    #[arg(long, conflicts_with = "kv")]
    pub kv_calibration: Option<PathBuf>,
    /// Bits per language-model weight (32, 16, 8, 4); 8 and 4 are charged as `jetvlm
    /// quantize --bits` writes them (layer matrices quantized, embeddings as stored). Default:
    /// the model's quantization_config if it has one, else the config's dtype.
    #[arg(long, value_parser = weight_bits)]
    pub weight_bits: Option<u8>,
    /// Group size of 8- and 4-bit layer matrices (as `jetvlm quantize --group`).
    #[arg(long, requires = "weight_bits", value_parser = ["32", "64", "128"])]
    pub weight_group: Option<String>,
    /// The LM head at 8 bits (as `jetvlm quantize --head-bits 8`).
    #[arg(long, requires = "weight_bits", value_parser = ["8"])]
    pub head_bits: Option<String>,
    /// Vision encoder parameter count, replacing the estimate from vision_config.
    #[arg(long, conflicts_with = "vision_bytes")]
    pub vision_params: Option<u64>,
    /// Vision encoder size in bytes, replacing the estimate.
    #[arg(long)]
    pub vision_bytes: Option<u64>,
    /// Camera resolution WIDTHxHEIGHT (RGB8 frames in the capture ring).
    #[arg(long, default_value = "1280x720")]
    pub camera: String,
    /// Frames in the camera capture ring.
    #[arg(long, default_value_t = 4)]
    pub camera_buffers: u64,
    /// Tokens the decoder processes at once during prefill.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: u64,
    /// Memory budget in MiB, replacing the board's usable memory.
    #[arg(long)]
    pub budget_mib: Option<u64>,
    /// Root of the file system to read (/proc, /etc) when detecting the board: a copied or
    /// mounted Jetson root file system.
    #[arg(
        long = "root",
        alias = "sys-root",
        value_name = "DIR",
        default_value = "/"
    )]
    pub sys_root: PathBuf,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--weight-bits`: a width the planner charges ([`WeightFormat::from_bits`]), refused by
/// the parser so the error names the flag.
fn weight_bits(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(bits) if WeightFormat::from_bits(bits).is_ok() => Ok(bits),
        _ => Err(format!("must be 32, 16, 8 or 4, got {s}")),
    }
}

/// Loads the registry with `--boards-dir` applied.
pub fn registry(boards_dir: Option<&Path>) -> Result<BoardRegistry> {
    let reg = BoardRegistry::bundled();
    Ok(match boards_dir {
        Some(dir) => reg.with_dir(dir)?,
        None => reg,
    })
}

fn parse_camera(s: &str) -> Result<(u64, u64)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--camera `{s}`: expected WIDTHxHEIGHT, e.g. 1280x720"))?;
    let w: u64 = w
        .trim()
        .parse()
        .with_context(|| format!("--camera `{s}`: width is not a number"))?;
    let h: u64 = h
        .trim()
        .parse()
        .with_context(|| format!("--camera `{s}`: height is not a number"))?;
    anyhow::ensure!(
        w > 0 && h > 0,
        "--camera `{s}`: width and height must be positive"
    );
    Ok((w, h))
}

/// The weight format to charge: `--weight-bits` (with `--weight-group`, `--head-bits`), else
/// the `quantization_config` of a decoder `jetvlm quantize` wrote, else the config's dtype.
fn weight_format(args: &PlanArgs, config_path: &Path) -> Result<WeightFormat> {
    let group = |g: Option<&str>| -> u16 {
        g.and_then(|g| g.parse().ok())
            .unwrap_or(plan::DEFAULT_WEIGHT_GROUP)
    };
    if let Some(bits) = args.weight_bits {
        let f = WeightFormat::from_bits(bits)?;
        return Ok(match (f, bits) {
            (_, 4 | 8) => WeightFormat::Quantized {
                bits,
                group: group(args.weight_group.as_deref()),
                head_int8: args.head_bits.is_some(),
                embed_bits: None,
                overrides: Vec::new(),
            },
            (f, _) => {
                anyhow::ensure!(
                    args.weight_group.is_none() && args.head_bits.is_none(),
                    "--weight-group and --head-bits apply to --weight-bits 8 or 4, not {bits}"
                );
                f
            }
        });
    }
    let raw: serde_json::Value = jetvlm_core::config::load_json(config_path)?;
    let Some(q) = raw.get("quantization_config") else {
        return Ok(WeightFormat::Native);
    };
    let field = |k: &str| q.get(k).and_then(|v| v.as_u64());
    match (
        q.get("quant_method").and_then(|m| m.as_str()),
        field("bits"),
        field("group_size"),
    ) {
        // AWQ / GPTQ are charged as `jetvlm quantize` converts them (INT4, same groups).
        (Some("awq" | "gptq"), Some(4), Some(g @ (32 | 64 | 128))) => Ok(WeightFormat::Quantized {
            bits: 4,
            group: g as u16,
            head_int8: false,
            embed_bits: None,
            overrides: Vec::new(),
        }),
        (Some("jetvlm"), ..) => {
            // The one definition of the format (jetvlm_quant::QuantizationConfig): the base
            // layer format, per-matrix overrides, a converted GGUF's quantized embedding
            // table (`embed_bits`; tied, it is the LM head, `lm_head_bits` says its bits).
            let qc = jetvlm_quant::QuantizationConfig::from_json(q)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
            let tied = jetvlm_core::hf::ModelConfig::from_value(&raw, config_path)
                .map(|c| c.tie_word_embeddings)
                .unwrap_or(false);
            let embed_bits = qc.embed_bits.map(|b| b as u8);
            Ok(WeightFormat::Quantized {
                bits: qc.format.bits() as u8,
                group: qc.format.group() as u16,
                head_int8: qc.lm_head_bits == Some(8) && !(tied && embed_bits.is_some()),
                embed_bits,
                overrides: qc.overrides,
            })
        }
        _ => anyhow::bail!(
            "{}: quantization_config {q} is not a format this planner charges (jetvlm 4 or 8 bits, awq or gptq 4 bits; group 32/64/128); pass --weight-bits",
            config_path.display()
        ),
    }
}

/// Builds the plan the arguments describe.
pub fn build(args: &PlanArgs) -> Result<Plan> {
    let reg = registry(args.boards_dir.as_deref())?;
    let mut opts = PlanOptions::default();
    let board: BoardProfile = match &args.board {
        Some(name) => reg.resolve(name)?,
        None => {
            let info = SystemInfo::read(&args.sys_root)?;
            let all = reg.all()?;
            let board = info.board(&all)?.clone();
            if let Some(m) = info.meminfo {
                opts.budget_bytes = Some(m.available_bytes);
                opts.budget_source = Some(format!(
                    "MemAvailable in {} (detected {})",
                    args.sys_root.join("proc/meminfo").display(),
                    board.name
                ));
            }
            board
        }
    };
    let mut model = ModelSpec::load(&args.model)?;
    let vision_bytes_per_param = model.text.dtype.size_bytes() as u64;
    if let Some(p) = args.vision_params {
        model.set_vision_params(p, vision_bytes_per_param)?;
    }
    if let Some(b) = args.vision_bytes {
        model.set_vision_bytes(b);
    }
    let tokens_per_frame = match args.tokens_per_frame.or(model.tokens_per_frame) {
        Some(t) => t,
        None => anyhow::bail!(
            "cannot tell how many tokens a frame adds for {}: it has no vision_config this planner \
             understands; pass --tokens-per-frame",
            model.config_path.display()
        ),
    };
    let calibrated = match &args.kv_calibration {
        Some(path) => {
            let c = jetvlm_calibration::Calibration::load(path)?;
            c.policy_for(path, jetvlm_kvcache::CacheShape::of(&model.text))?;
            Some(c.policy)
        }
        None => None,
    };
    let kv_name = calibrated
        .or_else(|| args.kv.clone())
        .or_else(|| model.default_kv.clone())
        .unwrap_or_else(|| "mixed".into());
    // The policy in effect, as the runtime resolves it: the package's block sizes where the
    // spelling names none, the group fitted to the head dim.
    let package_policy = model
        .default_kv
        .as_deref()
        .and_then(|p| p.parse::<KvPolicy>().ok());
    let policy = kv_name.parse::<KvPolicy>()?.in_effect(
        &kv_name,
        package_policy.as_ref(),
        model.text.head_dim,
    );
    // Refused as the KV cache refuses it, rather than planned with groups no block has.
    if let Some(why) = policy.head_dim_problem(model.text.head_dim) {
        anyhow::bail!("--kv {kv_name} on {}: {why}", model.config_path.display());
    }
    let kv = KvPrecision::from(policy);
    let layers = model.text.num_hidden_layers;
    anyhow::ensure!(
        kv.frame_layers().is_empty() || kv.frame_layers().len() == layers,
        "--kv {kv_name}: formats for {} layers, the model has {layers}",
        kv.frame_layers().len()
    );
    opts.weights = weight_format(args, &model.config_path)?;
    let (width, height) = parse_camera(&args.camera)?;
    opts.camera = CameraBuffers {
        width,
        height,
        channels: 3,
        count: args.camera_buffers,
    };
    opts.prefill_chunk = args.prefill_chunk;
    if let Some(mib) = args.budget_mib {
        opts.budget_bytes =
            Some(mib.checked_mul(1 << 20).with_context(|| {
                format!("--budget-mib {mib} is more bytes than 64 bits can count")
            })?);
        opts.budget_source = Some(format!("--budget-mib {mib}"));
    }
    let workload = Workload {
        frames: args.frames,
        tokens_per_frame,
        prompt_tokens: args.prompt_tokens,
        answer_tokens: args.answer_tokens,
    };
    Ok(plan::plan(&board, &model, &workload, &kv, &opts)?)
}

pub fn run(args: PlanArgs) -> Result<()> {
    let plan = build(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render(&plan));
    }
    match &plan.advice {
        Some(advice) => Err(jetvlm_app::does_not_fit(format!("does not fit: {advice}"))),
        None => Ok(()),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.0}%", 100.0 * part as f64 / whole as f64)
}

/// The human-readable table.
pub fn render(p: &Plan) -> String {
    let mut s = String::new();
    let w = &p.workload;
    let m = &p.memory;
    let _ = writeln!(
        s,
        "jetvlm plan: {} on {} ({})",
        p.model, p.board_display, p.board
    );
    let _ = writeln!(s, "  model     {}", p.config_path);
    let vision = match (&p.vision_source, p.vision_params) {
        (Some(VisionSource::Estimated { family }), Some(n)) => format!(
            "{:.1}M params (estimated from vision_config, {family})",
            n as f64 / 1e6
        ),
        (Some(VisionSource::OnnxFile { path }), _) => format!(
            "{} MiB (size of {})",
            mib(m.vision_encoder_bytes),
            path.display()
        ),
        (Some(VisionSource::UserParams), Some(n)) => {
            format!("{:.1}M params (--vision-params)", n as f64 / 1e6)
        }
        (Some(_), _) => format!("{} MiB (--vision-bytes)", mib(m.vision_encoder_bytes)),
        (None, _) => "none".into(),
    };
    let _ = writeln!(s, "  vision    {vision}");
    let _ = writeln!(
        s,
        "  workload  {} frames x {} tokens + {} prompt + {} answer = {} tokens ({} frames)",
        w.frames,
        w.tokens_per_frame,
        w.prompt_tokens,
        w.answer_tokens,
        p.context_tokens,
        pct(p.kv.frame_tokens, p.context_tokens)
    );
    let _ = writeln!(
        s,
        "  KV cache  {}: {}",
        p.kv_policy, p.kv_policy_description
    );
    let _ = writeln!(s, "  weights   {}", p.weights_format);
    let _ = writeln!(s);

    let rows: Vec<(String, u64)> = vec![
        ("weights".into(), m.weights_bytes),
        ("vision encoder".into(), m.vision_encoder_bytes),
        (
            format!("KV text   ({} tokens)", p.kv.text_tokens),
            m.kv_text_bytes,
        ),
        (
            format!(
                "KV frames ({} tokens{})",
                p.kv.frame_tokens,
                if p.kv.fp16_frame_tokens > 0 {
                    format!(", {} kept FP16", p.kv.fp16_frame_tokens)
                } else {
                    String::new()
                }
            ),
            m.kv_frame_bytes,
        ),
        (
            if p.deepstack_layers > 0 {
                format!("frame features (+{} DeepStack)", p.deepstack_layers)
            } else {
                "frame features".into()
            },
            m.frame_features_bytes,
        ),
        ("activations / workspace".into(), m.activation_bytes),
        ("camera buffers".into(), m.camera_bytes),
        ("CUDA runtime".into(), m.runtime_bytes),
    ];
    let label_w = rows.iter().map(|r| r.0.len()).max().unwrap_or(10).max(24);
    let _ = writeln!(s, "  {:<label_w$}  {:>9}  {:>6}", "memory", "MiB", "share");
    for (label, bytes) in &rows {
        let _ = writeln!(
            s,
            "  {:<label_w$}  {:>9}  {:>6}",
            label,
            mib(*bytes),
            pct(*bytes, p.total_bytes)
        );
    }
    let _ = writeln!(s, "  {}", "-".repeat(label_w + 19));
    let _ = writeln!(s, "  {:<label_w$}  {:>9}", "total", mib(p.total_bytes));
    let _ = writeln!(
        s,
        "  {:<label_w$}  {:>9}  ({})",
        "budget",
        mib(p.budget_bytes),
        p.budget_source
    );
    let verdict = if p.fits { "fits" } else { "DOES NOT FIT" };
    let _ = writeln!(
        s,
        "  {:<label_w$}  {:>9}  {verdict}",
        if p.fits { "headroom" } else { "over by" },
        mib(p.headroom_bytes.unsigned_abs())
    );
    let _ = writeln!(s);

    // As wide as the longest policy name (a custom policy's can be long).
    let width = p
        .max_frames_by_policy
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(0)
        .max(18);
    let _ = writeln!(
        s,
        "  {:<width$} {:>10} {:>11} {:>13} {:>16}",
        "KV policy", "frame bits", "max frames", "KV MiB now", "TPOT floor ms"
    );
    for r in &p.max_frames_by_policy {
        let mark = if r.policy == p.kv_policy { " <" } else { "" };
        let _ = writeln!(
            s,
            "  {:<width$} {:>10.2} {:>11} {:>13} {:>16.2}{mark}",
            r.policy,
            r.frame_bits_per_element,
            r.max_frames,
            mib(r.kv_bytes),
            r.tpot_floor_ms
        );
    }
    let ratio = if p.max_frames_fp16 > 0 {
        format!(
            "{:.2}x",
            p.max_frames_mixed as f64 / p.max_frames_fp16 as f64
        )
    } else {
        "-".into()
    };
    let _ = writeln!(
        s,
        "  {} fits {} frames vs {} at FP16 ({ratio}); the model's positions hold {} frames",
        p.mixed_policy, p.max_frames_mixed, p.max_frames_fp16, p.max_frames_context
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  TPOT floor {:.2} ms ({:.0} tok/s max) = ({} MiB weights + {} MiB KV read per token) / {} GB/s; FP16 KV: {:.2} ms",
        p.tpot_floor_ms,
        1e3 / p.tpot_floor_ms,
        mib(p.weight_bytes_read_per_token),
        mib(p.kv_bytes_read_per_token),
        p.bandwidth_gb_s,
        p.tpot_floor_fp16_ms
    );
    if !p.notes.is_empty() {
        let _ = writeln!(s);
        for n in &p.notes {
            let _ = writeln!(s, "  note: {n}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: PlanArgs,
    }

    fn fixture(rel: &str) -> String {
        format!("{}/../../tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
    }

    fn args(extra: &[&str]) -> PlanArgs {
        let mut v = vec!["plan".to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(v).unwrap().plan
    }

    #[test]
    fn smolvlm_plan_fits_and_renders() {
        let a = args(&[
            "--board",
            "orin-nano-8gb",
            "--model",
            &fixture("configs/smolvlm-256m"),
        ]);
        let p = build(&a).unwrap();
        assert!(p.fits);
        let table = render(&p);
        for needle in [
            "Jetson Orin Nano 8GB",
            "KV frames (1024 tokens)",
            "budget",
            "fits",
            "TPOT floor",
            "int2-frames",
        ] {
            assert!(table.contains(needle), "missing `{needle}` in\n{table}");
        }
        let json: serde_json::Value = serde_json::to_value(&p).unwrap();
        for key in [
            "fits",
            "total_bytes",
            "budget_bytes",
            "kv_bytes",
            "max_frames_fp16",
            "max_frames_mixed",
            "tpot_floor_ms",
        ] {
            assert!(json.get(key).is_some(), "JSON lacks {key}");
        }
        assert_eq!(json["fits"], serde_json::Value::Bool(true));
    }

    #[test]
    fn too_many_frames_fails_with_advice() {
        let a = args(&[
            "--board",
            "orin-nano-8gb",
            "--model",
            &fixture("configs/qwen2-vl-2b"),
            "--frames",
            "400",
            "--kv",
            "fp16",
        ]);
        let max = build(&a).unwrap().max_frames_fp16;
        let err = run(a).unwrap_err().to_string();
        assert!(err.contains(&format!("--frames {max}")), "{err}");
        assert!(err.contains("--kv int2-frames"), "{err}");
        assert!(err.contains("over budget"), "{err}");
        assert!(err.contains("MiB") && err.contains("MB"), "{err}");
        assert!(err.contains("smaller model"), "{err}");
        assert!(err.contains("--weight-bits 4"), "{err}");
    }

    #[test]
    fn model_too_big_for_the_board_says_so() {
        let a = args(&[
            "--board",
            "orin-nano-4gb",
            "--model",
            &fixture("configs/qwen2-vl-2b"),
        ]);
        let err = run(a).unwrap_err().to_string();
        assert!(err.contains("The model alone"), "{err}");
        assert!(err.contains("smaller model"), "{err}");
    }

    #[test]
    fn unknown_board_lists_known_ones() {
        let a = args(&[
            "--board",
            "orin-pico",
            "--model",
            &fixture("configs/smolvlm-256m"),
        ]);
        let err = build(&a).unwrap_err().to_string();
        assert!(err.contains("unknown board `orin-pico`"), "{err}");
        assert!(
            err.contains("orin-nano-8gb") && err.contains("thor-t5000"),
            "{err}"
        );
    }

    #[test]
    fn no_board_on_a_non_jetson_lists_known_boards() {
        let a = args(&[
            "--model",
            &fixture("configs/smolvlm-256m"),
            "--root",
            &fixture("board/detect/x86-workstation"),
        ]);
        let err = build(&a).unwrap_err().to_string();
        assert!(err.contains("not a Jetson"), "{err}");
        assert!(
            err.contains("--board") && err.contains("agx-orin-64gb"),
            "{err}"
        );
    }

    #[test]
    fn detected_board_plans_against_mem_available() {
        let root = fixture("board/detect/orin-nano-8gb");
        let a = args(&["--model", &fixture("configs/smolvlm-256m"), "--root", &root]);
        let p = build(&a).unwrap();
        assert_eq!(p.board, "orin-nano-8gb");
        assert_eq!(p.budget_bytes, 5_123_456 * 1024);
        assert!(p.budget_source.contains("MemAvailable"));
    }

    #[test]
    fn huge_workloads_are_overflow_errors_naming_the_flag() {
        let model = fixture("configs/smolvlm-256m");
        let max = u64::MAX.to_string();
        for (flag, value) in [
            ("--frames", max.as_str()),
            ("--frames", "1000000000000000000"),
            ("--tokens-per-frame", max.as_str()),
            ("--prompt-tokens", max.as_str()),
            ("--answer-tokens", max.as_str()),
            ("--camera-buffers", max.as_str()),
            ("--vision-bytes", max.as_str()),
            ("--vision-params", max.as_str()),
            ("--budget-mib", max.as_str()),
        ] {
            let a = args(&["--board", "agx-orin-64gb", "--model", &model, flag, value]);
            let err = match build(&a) {
                Ok(p) => panic!("{flag} {value}: planned (fits: {})", p.fits),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(flag), "{flag} {value}: {err}");
            assert!(
                err.contains("overflows 64 bits") || err.contains("more bytes than 64 bits"),
                "{flag} {value}: {err}"
            );
        }
    }

    #[test]
    fn a_head_dim_no_group_divides_names_the_policy_that_runs_it() {
        let dir = tempfile::tempdir().unwrap();
        let src =
            std::fs::read_to_string(format!("{}/config.json", fixture("configs/smolvlm-256m")))
                .unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&src).unwrap();
        // 576 hidden / 12 heads = 48 per head.
        cfg["text_config"]["num_attention_heads"] = 12.into();
        cfg["text_config"]["num_key_value_heads"] = 4.into();
        cfg["text_config"]["head_dim"] = 48.into();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let model = dir.path().to_string_lossy().into_owned();
        let base = ["--board", "orin-nano-8gb", "--model", model.as_str()];
        for kv in ["mixed", "int8-frames", "int4-all"] {
            let err = match build(&args(&[&base[..], &["--kv", kv]].concat())) {
                Ok(p) => panic!("--kv {kv}: planned {}", p.kv_policy),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains("head_dim 48 ") && err.contains("`fp16`"),
                "{kv}: {err}"
            );
        }
        let p = build(&args(&[&base[..], &["--kv", "fp16"]].concat())).unwrap();
        assert_eq!(p.kv_policy, "fp16");
    }

    #[test]
    fn camera_flag_is_validated() {
        assert!(parse_camera("640x480").unwrap() == (640, 480));
        assert!(parse_camera("640").is_err());
        assert!(parse_camera("0x480").is_err());
    }
}
