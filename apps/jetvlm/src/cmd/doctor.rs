//! `jetvlm doctor`: can this board (or this root file system) run the model package with the
//! runtime config? One check per fact a deployment needs, each PASS, WARN, FAIL, SKIP or
//! ERROR with the reason and the fix, and a verdict as the exit status: 0 ready, 6 ready
//! with warnings, 7 not ready, 8 could not check ([`jetvlm_app::ExitCode`]).
//!
//! Everything is read under `--root` (default `/`): `/proc/device-tree/model`,
//! `/etc/nv_tegra_release`, `/proc/meminfo`, the CUDA, NVRTC and ONNX Runtime libraries in the
//! standard library directories, `/dev/video*`. Nothing under the root is loaded or run, so a
//! Jetson root file system on a flashing host (or a fixture tree) is checked as it is. Only on
//! the live system (`--root /`) does doctor also open the GPU and run the kernel selftest
//! (a build with `cuda`), and follow the library search the runtime itself uses (the
//! project venv, `ORT_DYLIB_PATH`). `--model` and `--config` are paths on this machine.

use anyhow::Result;
use clap::{Args, Parser};
use jetvlm_app::ExitCode;
use jetvlm_board::BoardProfile;
use jetvlm_board::detect::SystemInfo;
use jetvlm_core::Device;
use jetvlm_runtime::RuntimeConfig;
use jetvlm_vision::{ExecutionProvider, ModelPackage};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    jetvlm doctor                                   # this board, the bundled demo model\n  \
    jetvlm doctor --model /opt/jetvlm/current/model --config /etc/jetvlm/runtime.yaml\n  \
    jetvlm doctor --root Linux_for_Tegra/rootfs --board orin-nano-8gb --json\n\n\
    Exit status: 0 ready, 6 ready with warnings, 7 not ready (a check failed),\n\
    8 could not check (a file it needs is unreadable); 2 and 3 as for every command.")]
pub struct DoctorArgs {
    /// Model package directory (holding jetvlm.yaml); default: the bundled demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Runtime config YAML (KV policy, device, execution providers, ...) the service runs
    /// with; default: the built-in defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Frame source URI the service reads: v4l2:///dev/video0 (feature `v4l`),
    /// synthetic://scene, dir://frames/, file://img.png. A v4l2:// source must exist under
    /// the root and this build must open it; without --source the cameras found are listed.
    #[arg(long)]
    pub source: Option<String>,
    /// Root of the file system to check (/proc, /etc, /dev, the library directories): a
    /// Jetson root file system on a flashing host, or / for the running system.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Board name (e.g. orin-nano-8gb; `jetvlm board list` shows all) or a path to a board
    /// YAML, when detection cannot tell (a root without /proc, a custom carrier).
    #[arg(long)]
    pub board: Option<String>,
    /// Directory of extra board YAML files (board name = file stem).
    #[arg(long, value_name = "DIR")]
    pub boards_dir: Option<PathBuf>,
    /// Print the report as one JSON object (checks[], verdict, exit_code).
    #[arg(long)]
    pub json: bool,
}

/// A check's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// As a deployment needs it.
    Pass,
    /// Works, but not as well as it could (a fallback, little headroom, no camera).
    Warn,
    /// The deployment cannot run as configured.
    Fail,
    /// Not relevant here (TensorRT not used, no GPU check off the live system).
    Skip,
    /// A file the check needs exists but cannot be read or understood.
    Error,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
            Status::Error => "ERROR",
        }
    }
}

/// One check: `name` is stable (see docs/cli.md), `fix` is empty when there is nothing to do.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: String,
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: String::new(),
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = fix.into();
        self
    }
}

/// The whole report, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub root: PathBuf,
    pub model: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub checks: Vec<Check>,
    /// `ready`, `ready-with-warnings`, `not-ready` or `could-not-check`.
    pub verdict: &'static str,
    pub exit_code: i32,
}

/// The verdict of a set of checks: any FAIL is "not ready" (whatever else could not be
/// checked, the board cannot run it), else any ERROR "could not check", else any WARN
/// "ready with warnings", else ready.
pub fn verdict(checks: &[Check]) -> ExitCode {
    let any = |s: Status| checks.iter().any(|c| c.status == s);
    if any(Status::Fail) {
        ExitCode::NotReady
    } else if any(Status::Error) {
        ExitCode::CouldNotCheck
    } else if any(Status::Warn) {
        ExitCode::ReadyWithWarnings
    } else {
        ExitCode::Success
    }
}

fn verdict_name(code: ExitCode) -> &'static str {
    match code {
        ExitCode::Success => "ready",
        other => other.name(),
    }
}

pub fn run(args: DoctorArgs) -> Result<()> {
    let report = diagnose(&args);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    let code = ExitCode::from_code(report.exit_code).unwrap_or(ExitCode::Failure);
    if code == ExitCode::Success {
        return Ok(());
    }
    let names = |s: Status| {
        report
            .checks
            .iter()
            .filter(|c| c.status == s)
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let message = match code {
        ExitCode::NotReady => format!("not ready: {} failed", names(Status::Fail)),
        ExitCode::CouldNotCheck => format!("could not check: {}", names(Status::Error)),
        _ => format!("ready with warnings: {}", names(Status::Warn)),
    };
    Err(jetvlm_app::Exit::error(code, message))
}

/// Runs every check.
pub fn diagnose(args: &DoctorArgs) -> Report {
    let checks = checks(args);
    let code = verdict(&checks);
    let model = args
        .model
        .clone()
        .or_else(|| super::model_or_default(None).ok());
    Report {
        root: args.root.clone(),
        model,
        config: args.config.clone(),
        checks,
        verdict: verdict_name(code),
        exit_code: code.code(),
    }
}

/// What the checks share: the root, the config, the package, the board.
struct Context<'a> {
    root: &'a Path,
    live: bool,
    cfg: RuntimeConfig,
    package: Option<ModelPackage>,
    model: Option<PathBuf>,
    board: Option<BoardProfile>,
    info: Option<SystemInfo>,
}

impl Context<'_> {
    /// Whether the runtime config needs the CUDA driver and NVRTC: the decoder on the GPU,
    /// or a GPU execution provider that must not fall back.
    fn needs_gpu(&self) -> bool {
        self.cfg.device == Device::Cuda
            || (self.cfg.vision.require
                && self
                    .requested_eps()
                    .first()
                    .is_some_and(|ep| *ep != ExecutionProvider::Cpu))
    }

    /// The execution providers the encoder asks for, best first.
    fn requested_eps(&self) -> Vec<ExecutionProvider> {
        if self.cfg.vision.execution_providers.is_empty() {
            ExecutionProvider::default_order()
        } else {
            self.cfg.vision.execution_providers.clone()
        }
    }

    /// `path` as seen under the root: an absolute path is re-rooted, a relative one kept.
    fn under_root(&self, path: &Path) -> PathBuf {
        match path.strip_prefix("/") {
            Ok(rel) => self.root.join(rel),
            Err(_) => path.to_path_buf(),
        }
    }

    /// `path` under the root as the board will see it (`/usr/lib/...`).
    fn shown(&self, path: &Path) -> String {
        match path.strip_prefix(self.root) {
            Ok(rel) if !self.live => format!("/{}", rel.display()),
            _ => path.display().to_string(),
        }
    }
}

fn checks(args: &DoctorArgs) -> Vec<Check> {
    let root = args.root.as_path();
    if !root.is_dir() {
        return vec![
            check(
                "root",
                Status::Error,
                format!("--root {}: not a directory", root.display()),
            )
            .fix("pass the root of a Jetson file system, or / for this machine"),
        ];
    }
    let mut out = Vec::new();
    let (cfg, config_check) = config_check(args.config.as_deref());
    out.push(config_check);
    let mut cx = Context {
        root,
        live: root == Path::new("/"),
        cfg,
        package: None,
        model: None,
        board: None,
        info: None,
    };
    out.push(board_check(args, &mut cx));
    out.push(package_check(args, &mut cx));
    out.push(memory_check(args, &cx));
    out.push(cuda_driver_check(&cx));
    out.push(nvrtc_check(&cx));
    out.push(gpu_check(&cx));
    out.push(onnxruntime_check(&cx));
    out.push(tensorrt_cache_check(&cx));
    out.push(camera_check(&cx, args.source.as_deref()));
    out.push(disk_check(&cx));
    out
}

fn config_check(path: Option<&Path>) -> (RuntimeConfig, Check) {
    match path {
        None => (
            RuntimeConfig::default(),
            check("config", Status::Pass, "no --config: the built-in defaults"),
        ),
        Some(p) => match RuntimeConfig::from_yaml(p) {
            Ok(cfg) => (
                cfg,
                check("config", Status::Pass, format!("{} is valid", p.display())),
            ),
            Err(e) => (
                RuntimeConfig::default(),
                check("config", Status::Fail, e.to_string())
                    .fix("correct the field named (docs/configuration.md#runtime-config)"),
            ),
        },
    }
}

fn board_check(args: &DoctorArgs, cx: &mut Context<'_>) -> Check {
    const NAME: &str = "board";
    let reg = match super::plan::registry(args.boards_dir.as_deref()) {
        Ok(r) => r,
        Err(e) => return check(NAME, Status::Error, format!("--boards-dir: {e:#}")),
    };
    let given = match args.board.as_deref().map(|b| reg.resolve(b)) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            return check(NAME, Status::Fail, format!("--board: {e}"))
                .fix("pass a name from `jetvlm board list` or a board YAML");
        }
    };
    let info = match SystemInfo::read(cx.root) {
        Ok(i) => i,
        Err(e) => {
            cx.board = given;
            return check(NAME, Status::Error, e.to_string())
                .fix("the file is not what the kernel or L4T writes; check the root");
        }
    };
    let all = match reg.all() {
        Ok(a) => a,
        Err(e) => return check(NAME, Status::Error, format!("board profiles: {e}")),
    };
    let detected = info.board(&all).cloned();
    cx.info = Some(info.clone());
    let l4t = match (info.l4t, &info.jetpack) {
        (Some(l), Some(jp)) => format!("L4T {l} (JetPack {jp})"),
        (Some(l), None) => format!("L4T {l} (JetPack unknown)"),
        (None, _) => "no /etc/nv_tegra_release".to_string(),
    };
    let c = match (detected, given) {
        (Ok(d), None) => {
            let c = check(
                NAME,
                Status::Pass,
                format!("{} ({}), {l4t}", d.name, d.display_name),
            );
            cx.board = Some(d);
            c
        }
        (Ok(d), Some(g)) if d.name == g.name => {
            cx.board = Some(g);
            check(
                NAME,
                Status::Pass,
                format!("{} (--board, detected too), {l4t}", d.name),
            )
        }
        (Ok(d), Some(g)) => {
            let c = check(
                NAME,
                Status::Warn,
                format!("--board {} but the root is a {} ({l4t})", g.name, d.name),
            )
            .fix(format!("plan for the board it is: --board {}", d.name));
            cx.board = Some(g);
            c
        }
        (Err(e), Some(g)) => {
            let c = check(
                NAME,
                Status::Warn,
                format!("{} (--board; detection: {e})", g.name),
            )
            .fix("check that --root is the board's root file system");
            cx.board = Some(g);
            c
        }
        (Err(e), None) => {
            return check(NAME, Status::Fail, e.to_string()).fix(
                "run on a Jetson, or pass --board NAME (and --boards-dir for a custom carrier)",
            );
        }
    };
    if c.status != Status::Pass || cx.board.is_none() {
        return c;
    }
    match info.l4t {
        None => check(
            NAME,
            Status::Warn,
            format!("{}; L4T version unknown", c.detail),
        )
        .fix("install the L4T core package (nvidia-l4t-core), which writes /etc/nv_tegra_release"),
        Some(l) if l.major < 35 => check(
            NAME,
            Status::Fail,
            format!("{}; L4T {} is JetPack 4 or older", c.detail, l),
        )
        .fix("flash JetPack 6 (L4T 36): jetvlm needs CUDA 11.4 or later (docs/jetson.md)"),
        Some(l) if l.major < 36 => check(
            NAME,
            Status::Warn,
            format!("{}; JetPack 5: the CUDA path is untested there", c.detail),
        )
        .fix(format!(
            "JetPack 6 (L4T 36) is the supported release; this root has L4T {l}"
        )),
        Some(_) => c,
    }
}

fn package_check(args: &DoctorArgs, cx: &mut Context<'_>) -> Check {
    const NAME: &str = "package";
    let model = match &args.model {
        Some(m) => m.clone(),
        None => match super::model_or_default(None) {
            Ok(m) => m,
            Err(e) => {
                return check(NAME, Status::Skip, format!("{e:#}"))
                    .fix("pass --model with the package the service runs");
            }
        },
    };
    cx.model = Some(model.clone());
    let pkg = match ModelPackage::load(&model) {
        Ok(p) => p,
        Err(e) => {
            return check(NAME, Status::Fail, e.to_string())
                .fix("re-export the package (`jetvlm export`) or copy it again");
        }
    };
    let mut missing = Vec::new();
    let index = pkg.decoder_dir.join("model.safetensors.index.json");
    let mut files = 2usize + usize::from(index.is_file());
    if index.is_file() {
        match jetvlm_core::config::load_json::<serde_json::Value>(&index) {
            Ok(v) => {
                let mut shards: Vec<&str> = v["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|s| s.as_str()).collect())
                    .unwrap_or_default();
                shards.sort_unstable();
                shards.dedup();
                files += shards.len();
                for s in shards {
                    if !pkg.decoder_dir.join(s).is_file() {
                        missing.push(pkg.decoder_dir.join(s).display().to_string());
                    }
                }
            }
            Err(e) => return check(NAME, Status::Fail, e.to_string()),
        }
    }
    if !missing.is_empty() {
        return check(
            NAME,
            Status::Fail,
            format!("missing weight shards: {}", missing.join(", ")),
        )
        .fix("copy the package again: the index names shards that are not there");
    }
    let c = check(
        NAME,
        Status::Pass,
        format!(
            "{} ({}): manifest, encoder {}, decoder config, tokenizer and {} weight file(s) \
             present and consistent; the package format has no checksums (a bundle's \
             manifest.json has them: `jetvlm bundle verify`)",
            pkg.manifest.name,
            model.display(),
            pkg.encoder_path.display(),
            files.saturating_sub(2).max(1)
        ),
    );
    cx.package = Some(pkg);
    c
}

/// The plan for the package and config on the board, against MemAvailable when the root
/// has `/proc/meminfo` (a running system), else the board profile's usable memory.
fn memory_check(args: &DoctorArgs, cx: &Context<'_>) -> Check {
    const NAME: &str = "memory";
    let (Some(board), Some(model)) = (&cx.board, &cx.model) else {
        return check(
            NAME,
            Status::Skip,
            "needs a board and a model package (see above)",
        );
    };
    if cx.package.is_none() {
        return check(
            NAME,
            Status::Skip,
            "needs a valid model package (see package)",
        );
    }
    let mut argv: Vec<String> = vec![
        "plan".into(),
        "--model".into(),
        model.display().to_string(),
        "--board".into(),
        board.name.clone(),
        "--frames".into(),
        cx.cfg.window_frames.to_string(),
        "--answer-tokens".into(),
        cx.cfg.max_new_tokens.to_string(),
    ];
    if let Some(dir) = &args.boards_dir {
        argv.extend(["--boards-dir".into(), dir.display().to_string()]);
    }
    if let Some(b) = args.board.as_deref() {
        // A board given as a YAML path resolves the same way in the planner.
        argv[4] = b.to_string();
    }
    if let Some(kv) = &cx.cfg.kv_policy {
        argv.extend(["--kv".into(), kv.clone()]);
    }
    if let Some(c) = &cx.cfg.kv_calibration {
        argv.extend(["--kv-calibration".into(), c.display().to_string()]);
    }
    let meminfo = cx.info.as_ref().and_then(|i| i.meminfo);
    let budget = match meminfo {
        Some(m) => {
            argv.extend(["--budget-mib".into(), (m.available_bytes >> 20).to_string()]);
            format!("MemAvailable {} MiB", m.available_bytes >> 20)
        }
        None => format!(
            "the usable memory of {} (no /proc/meminfo under the root: not a running system)",
            board.name
        ),
    };
    #[derive(Parser)]
    struct Plan {
        #[command(flatten)]
        plan: super::plan::PlanArgs,
    }
    let plan_args = match Plan::try_parse_from(&argv) {
        Ok(p) => p.plan,
        Err(e) => return check(NAME, Status::Error, e.to_string()),
    };
    let plan = match super::plan::build(&plan_args) {
        Ok(p) => p,
        Err(e) => {
            let status = if jetvlm_app::classify(&e) == ExitCode::BadInput {
                Status::Fail
            } else {
                Status::Error
            };
            return check(NAME, status, format!("{e:#}"));
        }
    };
    let mib = |b: u64| b >> 20;
    let detail = format!(
        "plan {} MiB for {} frames, {} answer tokens, KV {} on {}: {} {budget}",
        mib(plan.total_bytes),
        cx.cfg.window_frames,
        cx.cfg.max_new_tokens,
        plan.kv_policy,
        board.name,
        if plan.fits {
            "fits in"
        } else {
            "does not fit in"
        },
    );
    if let Some(advice) = &plan.advice {
        return check(NAME, Status::Fail, detail).fix(advice.clone());
    }
    let headroom = plan.headroom_bytes.max(0) as u64;
    if headroom < plan.budget_bytes / 10 {
        return check(
            NAME,
            Status::Warn,
            format!("{detail}, {} MiB headroom (under 10%)", mib(headroom)),
        )
        .fix("free memory on the board, or lower window_frames / max_new_tokens in the config");
    }
    check(
        NAME,
        Status::Pass,
        format!("{detail}, {} MiB headroom", mib(headroom)),
    )
}

/// Library directories searched under the root, as a Jetson (L4T) and a desktop Linux lay
/// them out.
const LIB_DIRS: &[&str] = &[
    "usr/lib/aarch64-linux-gnu/nvidia",
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "usr/local/cuda/lib64",
    "usr/local/cuda/targets/aarch64-linux/lib",
    "usr/local/cuda/targets/x86_64-linux/lib",
    "usr/lib64",
    "usr/local/lib",
    "usr/lib",
    "opt/jetvlm/lib",
];

/// A shared library found under the root: its path and the version its file name carries
/// (`libnvrtc.so.12.6.77` -> `12.6.77`; `None` for `libcuda.so.1` style sonames).
#[derive(Debug)]
struct FoundLib {
    path: PathBuf,
    version: Option<String>,
}

/// The first of `dirs` holding `stem` (`libcuda.so`) or `stem.N...`, with the highest
/// version a file name in that directory carries.
fn find_lib(dirs: &[PathBuf], stem: &str) -> Option<FoundLib> {
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n == stem || n.starts_with(&format!("{stem}.")))
            .collect();
        if names.is_empty() {
            continue;
        }
        let version = |n: &str| -> Vec<u64> {
            n.strip_prefix(stem)
                .unwrap_or("")
                .split('.')
                .filter_map(|p| p.parse().ok())
                .collect()
        };
        names.sort_by_key(|n| version(n));
        let best = names.last()?.clone();
        let v = version(&best);
        // A soname like libcuda.so.1 or libcuda.so.1.1 names the ABI, not the release.
        let version = (v.len() >= 2 && v != [1, 1])
            .then(|| v.iter().map(u64::to_string).collect::<Vec<_>>().join("."));
        return Some(FoundLib {
            path: dir.join(best),
            version,
        });
    }
    None
}

fn lib_dirs(cx: &Context<'_>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = LIB_DIRS.iter().map(|d| cx.root.join(d)).collect();
    // Versioned CUDA installs (/usr/local/cuda-12.6) when the /usr/local/cuda link is absent.
    for c in jetvlm_core::entries_starting_with(&cx.root.join("usr/local"), "cuda-")
        .iter()
        .rev()
    {
        dirs.push(c.join("lib64"));
        dirs.push(c.join("targets/aarch64-linux/lib"));
        dirs.push(c.join("targets/x86_64-linux/lib"));
    }
    dirs
}

/// The CUDA toolkit version `/usr/local/cuda/version.json` names (`12.6.68`).
fn cuda_toolkit_version(cx: &Context<'_>) -> Option<String> {
    let path = cx.root.join("usr/local/cuda/version.json");
    let v: serde_json::Value = jetvlm_core::config::load_json(&path).ok()?;
    v["cuda"]["version"].as_str().map(str::to_string)
}

/// Missing CUDA pieces fail when the config needs the GPU, else warn.
fn gpu_lib_missing(cx: &Context<'_>) -> Status {
    if cx.needs_gpu() {
        Status::Fail
    } else {
        Status::Warn
    }
}

fn cuda_driver_check(cx: &Context<'_>) -> Check {
    const NAME: &str = "cuda-driver";
    match find_lib(&lib_dirs(cx), "libcuda.so") {
        Some(lib) => {
            let version = match (&lib.version, cx.info.as_ref().and_then(|i| i.l4t)) {
                (Some(v), _) => format!("driver {v}"),
                (None, Some(l4t)) => format!("the driver of L4T {l4t}"),
                (None, None) => "driver version not in the file name".into(),
            };
            let toolkit = cuda_toolkit_version(cx)
                .map(|v| format!("; CUDA {v} (/usr/local/cuda/version.json)"))
                .unwrap_or_default();
            check(
                NAME,
                Status::Pass,
                format!("{} ({version}){toolkit}", cx.shown(&lib.path)),
            )
        }
        None => check(
            NAME,
            gpu_lib_missing(cx),
            format!(
                "no libcuda.so* in the library directories{}",
                if cx.needs_gpu() {
                    ": the config runs on the GPU"
                } else {
                    ": the decoder can only run on the CPU"
                }
            ),
        )
        .fix("install the NVIDIA driver (on a Jetson: L4T's nvidia-l4t-cuda), or set device: cpu"),
    }
}

fn nvrtc_check(cx: &Context<'_>) -> Check {
    const NAME: &str = "nvrtc";
    let found = find_lib(&lib_dirs(cx), "libnvrtc.so");
    // On the running system, the NVRTC the kernels would really be compiled with (which also
    // finds the venv's wheel and JETVLM_NVRTC_LIB).
    if cx.live
        && jetvlm_cuda::compiled_with_cuda()
        && let Ok((major, minor)) = jetvlm_cuda::nvrtc_version()
    {
        return check(NAME, Status::Pass, format!("NVRTC {major}.{minor} loads"));
    }
    let Some(lib) = found else {
        return check(
            NAME,
            gpu_lib_missing(cx),
            "no libnvrtc.so* in the library directories: the CUDA kernels cannot be compiled",
        )
        .fix("install the CUDA toolkit's NVRTC (cuda-nvrtc-12-6 on JetPack 6)");
    };
    let version = lib.version.clone().unwrap_or_else(|| "unknown".into());
    let short = |v: &str| -> Vec<u64> {
        v.split('.')
            .take(2)
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    if let Some(toolkit) = cuda_toolkit_version(cx)
        && lib.version.is_some()
        && short(&version) > short(&toolkit)
    {
        return check(
            NAME,
            Status::Fail,
            format!(
                "{} is NVRTC {version}, newer than the CUDA {toolkit} of the driver: the kernels \
                 it compiles would not load",
                cx.shown(&lib.path)
            ),
        )
        .fix("use the NVRTC of the installed CUDA");
    }
    check(
        NAME,
        Status::Pass,
        format!("{} (NVRTC {version})", cx.shown(&lib.path)),
    )
}

/// On the running system with a CUDA build: open the GPU and run the kernel selftest.
fn gpu_check(cx: &Context<'_>) -> Check {
    const NAME: &str = "gpu";
    if !cx.live {
        return check(
            NAME,
            Status::Skip,
            "not the running system (--root): the GPU is checked on the board itself",
        );
    }
    if !jetvlm_cuda::compiled_with_cuda() {
        let status = if cx.cfg.device == Device::Cuda {
            Status::Fail
        } else {
            Status::Skip
        };
        return check(
            NAME,
            status,
            "this jetvlm was built without the `cuda` feature",
        )
        .fix("build with --features cuda (or jetson) to decode on the GPU");
    }
    let dev = match jetvlm_cuda::CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            return check(NAME, gpu_lib_missing(cx), format!("CUDA device 0: {e}"))
                .fix("check the driver (`jetvlm selftest --device cuda` says more)");
        }
    };
    let i = dev.info();
    let name = format!("{} sm_{}, driver {}", i.name, i.sm(), i.driver_version);
    match dev.selftest(1) {
        Ok(checks) => {
            let failed: Vec<String> = checks
                .iter()
                .filter(|c| !c.passed())
                .map(|c| c.line())
                .collect();
            if failed.is_empty() {
                check(
                    NAME,
                    Status::Pass,
                    format!("{name}: {} kernel checks passed", checks.len()),
                )
            } else {
                check(
                    NAME,
                    Status::Fail,
                    format!(
                        "{name}: {} of {} kernel checks failed: {}",
                        failed.len(),
                        checks.len(),
                        failed.join("; ")
                    ),
                )
                .fix("run `jetvlm selftest --device cuda` and report the failing kernels")
            }
        }
        Err(e) => check(NAME, Status::Fail, format!("{name}: selftest: {e}"))
            .fix("run `jetvlm selftest --device cuda` for details"),
    }
}

/// `usr/lib/python3*/dist-packages/onnxruntime/capi` style directories under the root.
fn python_ort_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for lib in ["usr/local/lib", "usr/lib"] {
        let Ok(entries) = std::fs::read_dir(root.join(lib)) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pys.sort();
        for py in pys.iter().rev() {
            for pkgs in ["dist-packages", "site-packages"] {
                dirs.push(py.join(pkgs).join("onnxruntime/capi"));
            }
        }
    }
    dirs
}

fn onnxruntime_check(cx: &Context<'_>) -> Check {
    const NAME: &str = "onnxruntime";
    let requested = cx.requested_eps();
    let gpu: Vec<ExecutionProvider> = requested
        .iter()
        .copied()
        .filter(|ep| *ep != ExecutionProvider::Cpu && ep.compiled())
        .collect();
    let lib = if let Some(p) = &cx.cfg.vision.ort_library {
        let p = cx.under_root(p);
        if !p.is_file() {
            return check(
                NAME,
                Status::Fail,
                format!("vision.ort_library {} does not exist", cx.shown(&p)),
            )
            .fix("point vision.ort_library at the board's libonnxruntime.so");
        }
        let version = find_lib(
            &[p.parent().unwrap_or(cx.root).to_path_buf()],
            "libonnxruntime.so",
        )
        .and_then(|l| l.version);
        FoundLib { path: p, version }
    } else if cx.live {
        match jetvlm_vision::library::resolve_ort_library_for(None, &gpu) {
            Ok(p) => {
                let version = p
                    .parent()
                    .and_then(|d| find_lib(&[d.to_path_buf()], "libonnxruntime.so"))
                    .and_then(|l| l.version);
                FoundLib { path: p, version }
            }
            Err(e) => {
                return check(NAME, Status::Fail, e.to_string())
                    .fix("install ONNX Runtime (on a Jetson: the JetPack build with TensorRT)");
            }
        }
    } else {
        let mut dirs = lib_dirs(cx);
        dirs.extend(python_ort_dirs(cx.root));
        let found: Vec<FoundLib> = dirs
            .iter()
            .filter_map(|d| find_lib(std::slice::from_ref(d), "libonnxruntime.so"))
            .collect();
        // As the runtime picks: one that ships a requested GPU provider, else the first.
        let pick = found
            .iter()
            .position(|l| {
                gpu.iter()
                    .any(|&ep| jetvlm_vision::library::ships_provider(&l.path, ep))
            })
            .unwrap_or(0);
        match found.into_iter().nth(pick) {
            Some(l) => l,
            None => {
                return check(
                    NAME,
                    Status::Fail,
                    "no libonnxruntime.so* in the library or Python package directories: the \
                     vision encoder cannot run",
                )
                .fix(
                    "install ONNX Runtime into the root (on a Jetson: the JetPack build with \
                     TensorRT), or set vision.ort_library",
                );
            }
        }
    };
    let offered: Vec<ExecutionProvider> = [ExecutionProvider::TensorRt, ExecutionProvider::Cuda]
        .into_iter()
        .filter(|&ep| jetvlm_vision::library::ships_provider(&lib.path, ep))
        .chain([ExecutionProvider::Cpu])
        .collect();
    let list = |eps: &[ExecutionProvider]| {
        eps.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let runs = requested
        .iter()
        .copied()
        .find(|ep| offered.contains(ep) && ep.compiled());
    let detail = format!(
        "{} (ONNX Runtime {}): offers {}; the config asks for {}",
        cx.shown(&lib.path),
        lib.version.as_deref().unwrap_or("version unknown"),
        list(&offered),
        list(&requested),
    );
    let first = requested.first().copied();
    let why_not = |ep: ExecutionProvider| {
        if !ep.compiled() {
            format!("this jetvlm was built without the `{ep}` provider")
        } else {
            format!("this ONNX Runtime has no libonnxruntime_providers_{ep}.so")
        }
    };
    match (runs, first) {
        (Some(r), Some(f)) if r == f => check(
            NAME,
            Status::Pass,
            format!("{detail}; the encoder runs on {r}"),
        ),
        (runs, Some(f)) => {
            let status = if cx.cfg.vision.require || runs.is_none() {
                Status::Fail
            } else {
                Status::Warn
            };
            let falls = match runs {
                Some(r) if !cx.cfg.vision.require => format!("; it falls back to {r}"),
                _ => "; nothing it asks for is available".into(),
            };
            check(NAME, status, format!("{detail}; {}{falls}", why_not(f))).fix(if f.compiled() {
                "install an ONNX Runtime built with that provider (docs/jetson.md), or list \
                 fewer providers in vision.execution_providers"
            } else {
                "build jetvlm with --features jetson, or list fewer providers in \
                 vision.execution_providers"
            })
        }
        (_, None) => check(
            NAME,
            Status::Fail,
            format!("{detail}; no provider requested"),
        )
        .fix("list providers in vision.execution_providers"),
    }
}

/// The TensorRT engine cache directory the encoder would use: the config's
/// `vision.tensorrt.engine_cache` (relative to the encoder), else the package's.
fn engine_cache_dir(cx: &Context<'_>) -> Option<PathBuf> {
    let pkg = cx.package.as_ref()?;
    let spec = jetvlm_vision::EncoderSpec::from_package(pkg);
    if let Some(t) = &cx.cfg.vision.tensorrt {
        let base = pkg.encoder_path.parent().unwrap_or(&pkg.dir);
        return Some(base.join(t.engine_cache.clone().unwrap_or_else(|| "trt-cache".into())));
    }
    spec.tensorrt.engine_cache
}

/// Whether a file can be created in `dir` (created and removed again), or, when `dir` does
/// not exist yet, in the nearest ancestor that does (where it would be created).
fn writable(dir: &Path) -> Result<&'static str, String> {
    let (at, note) = match dir.ancestors().find(|a| a.is_dir()) {
        Some(a) if a == dir => (a, "writable"),
        Some(a) => (a, "does not exist yet; its parent is writable"),
        None => return Err(format!("no existing ancestor of {}", dir.display())),
    };
    let probe = at.join(format!(".jetvlm-doctor-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(note)
        }
        Err(e) => Err(format!("{}: {e}", at.display())),
    }
}

fn tensorrt_cache_check(cx: &Context<'_>) -> Check {
    const NAME: &str = "tensorrt-cache";
    let requested = cx.requested_eps();
    if !requested.contains(&ExecutionProvider::TensorRt) {
        return check(NAME, Status::Skip, "the config does not ask for TensorRT");
    }
    if !ExecutionProvider::TensorRt.compiled() {
        return check(
            NAME,
            Status::Skip,
            "this jetvlm was built without the `tensorrt` provider",
        );
    }
    let Some(dir) = engine_cache_dir(cx) else {
        return check(
            NAME,
            Status::Skip,
            "needs a valid model package (see package)",
        );
    };
    match writable(&dir) {
        Ok(note) => check(NAME, Status::Pass, format!("{}: {note}", dir.display())),
        Err(e) => check(
            NAME,
            Status::Fail,
            format!(
                "{} is not writable ({e}): every start would rebuild the engine",
                dir.display()
            ),
        )
        .fix("make it writable by the service user, or set vision.tensorrt.engine_cache"),
    }
}

fn camera_check(cx: &Context<'_>, source: Option<&str>) -> Check {
    const NAME: &str = "cameras";
    let v4l = cfg!(feature = "v4l");
    if let Some(uri) = source {
        let parsed = match jetvlm_camera::SourceUri::parse(uri) {
            Ok(u) => u,
            Err(e) => {
                return check(NAME, Status::Fail, format!("--source: {e}"))
                    .fix("give the source as a URI (docs/cli.md#frame-sources)");
            }
        };
        if !matches!(parsed.scheme, jetvlm_camera::uri::Scheme::V4l2) {
            return check(
                NAME,
                Status::Skip,
                format!("--source {uri} is not a V4L2 camera"),
            );
        }
        let device = cx.under_root(Path::new(&parsed.path));
        return if !device.exists() {
            check(
                NAME,
                Status::Fail,
                format!("--source {uri}: {} does not exist", cx.shown(&device)),
            )
            .fix("connect the camera, or name the /dev/video* device it appears as")
        } else if !v4l {
            check(
                NAME,
                Status::Fail,
                format!(
                    "--source {uri}: {} exists, but this build has no V4L2",
                    cx.shown(&device)
                ),
            )
            .fix("build jetvlm with --features v4l (or jetson)")
        } else {
            check(
                NAME,
                Status::Pass,
                format!(
                    "--source {uri}: {} present (YUYV, MJPG or RGB3 is negotiated on open)",
                    cx.shown(&device)
                ),
            )
        };
    }
    let dev = cx.root.join("dev");
    let mut cams: Vec<String> = std::fs::read_dir(&dev)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    n.strip_prefix("video")
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
                .collect()
        })
        .unwrap_or_default();
    cams.sort_by_key(|n| n[5..].parse::<u32>().unwrap_or(u32::MAX));
    if cams.is_empty() {
        return check(
            NAME,
            Status::Warn,
            format!(
                "no video devices in {}: a v4l2:// source cannot open (file://, dir:// and \
                 synthetic:// sources still work)",
                cx.shown(&dev)
            ),
        )
        .fix("connect a USB (UVC) camera, or bridge a CSI sensor through v4l2loopback (docs/jetson.md#cameras)");
    }
    let list = cams
        .iter()
        .map(|c| format!("/dev/{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let formats = if v4l {
        "formats are negotiated on open (YUYV, MJPG or RGB3)"
    } else {
        "this build has no V4L2 (build with --features v4l to open them)"
    };
    let status = if v4l { Status::Pass } else { Status::Warn };
    let c = check(NAME, status, format!("{list}; {formats}"));
    if status == Status::Warn {
        c.fix("build jetvlm with --features v4l (or jetson)")
    } else {
        c
    }
}

/// Free bytes on the file system holding `path` (statvfs).
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer the size statvfs fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field types are the C library's (u64 on the 64-bit targets, narrower elsewhere).
    #[allow(clippy::unnecessary_cast)]
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    Ok(free)
}

fn disk_check(cx: &Context<'_>) -> Check {
    const NAME: &str = "disk";
    // The caches: the TensorRT engines (about the encoder's size) and the compiled kernels.
    let dir = engine_cache_dir(cx)
        .filter(|_| cx.requested_eps().contains(&ExecutionProvider::TensorRt))
        .or_else(|| {
            if cx.live {
                jetvlm_cuda::cache::default_cache_dir()
            } else {
                Some(cx.root.join("var/cache"))
            }
        })
        .unwrap_or_else(|| cx.root.to_path_buf());
    let Some(at) = dir.ancestors().find(|a| a.is_dir()) else {
        return check(
            NAME,
            Status::Error,
            format!("no existing ancestor of {}", dir.display()),
        );
    };
    let encoder = cx
        .package
        .as_ref()
        .and_then(|p| std::fs::metadata(&p.encoder_path).ok())
        .map_or(0, |m| m.len());
    const KERNELS: u64 = 64 << 20;
    let need = encoder.saturating_add(KERNELS);
    let free = match free_bytes(at) {
        Ok(f) => f,
        Err(e) => {
            return check(
                NAME,
                Status::Error,
                format!("statvfs {}: {e}", at.display()),
            );
        }
    };
    let mib = |b: u64| b >> 20;
    let detail = format!(
        "{} MiB free at {} for the caches (about {} MiB: TensorRT engines ~ the encoder, 64 MiB \
         of compiled kernels)",
        mib(free),
        cx.shown(at),
        mib(need)
    );
    if free < need {
        check(NAME, Status::Fail, detail).fix("free disk space on that file system")
    } else if free < need.saturating_mul(4) {
        check(NAME, Status::Warn, detail).fix("free disk space: less than 4x what the caches need")
    } else {
        check(NAME, Status::Pass, detail)
    }
}

/// The text report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "jetvlm doctor: root {}, model {}, config {}",
        r.root.display(),
        r.model
            .as_deref()
            .map_or("(none)".into(), |m| m.display().to_string()),
        r.config
            .as_deref()
            .map_or("(defaults)".into(), |c| c.display().to_string()),
    );
    for c in &r.checks {
        let _ = writeln!(s, "  {:<5} {:<15} {}", c.status.label(), c.name, c.detail);
        if !c.fix.is_empty() {
            let _ = writeln!(s, "  {:<5} {:<15} fix: {}", "", "", c.fix);
        }
    }
    let _ = writeln!(s, "verdict: {} (exit {})", r.verdict, r.exit_code);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: Status) -> Check {
        check("x", status, "")
    }

    #[test]
    fn a_failure_outranks_an_error_which_outranks_a_warning() {
        use Status::*;
        assert_eq!(verdict(&[c(Pass), c(Skip)]), ExitCode::Success);
        assert_eq!(verdict(&[c(Pass), c(Warn)]), ExitCode::ReadyWithWarnings);
        assert_eq!(verdict(&[c(Warn), c(Error)]), ExitCode::CouldNotCheck);
        assert_eq!(verdict(&[c(Error), c(Fail), c(Warn)]), ExitCode::NotReady);
    }

    #[test]
    fn library_versions_come_from_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "libnvrtc.so",
            "libnvrtc.so.12",
            "libnvrtc.so.12.6.77",
            "libnvrtc.so.12.2.1",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        std::fs::write(dir.path().join("libcuda.so.1.1"), b"").unwrap();
        let dirs = [dir.path().join("missing"), dir.path().to_path_buf()];
        let nvrtc = find_lib(&dirs, "libnvrtc.so").unwrap();
        assert_eq!(nvrtc.version.as_deref(), Some("12.6.77"));
        assert_eq!(nvrtc.path, dir.path().join("libnvrtc.so.12.6.77"));
        let cuda = find_lib(&dirs, "libcuda.so").unwrap();
        assert_eq!(
            cuda.version, None,
            "libcuda.so.1.1 is a soname, not a release"
        );
        assert!(find_lib(&dirs, "libonnxruntime.so").is_none());
    }
}
