//! `jetvlm bundle`: a self-contained deployable for one target (binaries, model package,
//! runtime config, systemd unit, env file, `manifest.json` with SHA-256 of every file), as a
//! directory or a `.tar.zst`; `jetvlm bundle verify` checks a bundle, an archive or an
//! installed root against its manifest. Layout and manifest: [`super::manifest`];
//! docs/deploy.md.

use super::manifest::{
    self, BIN_DIR, BINARIES, BundleManifest, CONFIG_DIR, ENV_FILE, FORMAT, FileEntry, KIND,
    MANIFEST, MODEL_DIR, Problem, RUNTIME_CONFIG, SYSTEMD_DIR, ServiceInfo, UNIT,
};
use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand, ValueEnum};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where the bundle's files go in an installed root (used by `install` and `verify`).
pub const OPT_DIR: &str = "opt/jetvlm";
pub const CURRENT: &str = "current";
pub const ETC_DIR: &str = "etc/jetvlm";
pub const UNIT_DIR: &str = "etc/systemd/system";
pub const WANTS_DIR: &str = "etc/systemd/system/multi-user.target.wants";

/// The unit and env templates (`@NAME@` placeholders filled by [`render`]).
const UNIT_TEMPLATE: &str = include_str!("../../systemd/jetvlm.service.in");
const ENV_TEMPLATE: &str = include_str!("../../systemd/jetvlm.env.in");

/// Headroom above the plan's total in `MemoryMax=`: a quarter of the plan, at least this
/// much (the runtime's own code, the ONNX Runtime library, allocator slack).
const MIN_HEADROOM_BYTES: u64 = 256 << 20;

#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  \
    jetvlm bundle --model models/demo --board orin-nano-8gb --out demo-bundle\n  \
    jetvlm bundle --model models/demo --board orin-nano-8gb --target aarch64-unknown-linux-gnu --out demo.tar.zst\n  \
    jetvlm bundle verify demo.tar.zst --target aarch64-unknown-linux-gnu\n  \
    jetvlm bundle verify /path/to/rootfs"
)]
pub struct BundleArgs {
    #[command(subcommand)]
    pub command: Option<BundleCommand>,
    #[command(flatten)]
    pub make: MakeArgs,
}

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Check a bundle directory, a .tar.zst bundle, an installed version directory or an
    /// installed root (with opt/jetvlm/current) against its manifest.json: names every
    /// missing, changed or extra file; exit status 5 when any.
    Verify(VerifyArgs),
}

/// What the installed unit runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServiceCommand {
    /// `jetvlm serve`: questions over HTTP.
    Serve,
    /// `jetvlm-analytics` on the rules file given with --rules.
    Analytics,
}

impl ServiceCommand {
    fn name(self) -> &'static str {
        match self {
            ServiceCommand::Serve => "serve",
            ServiceCommand::Analytics => "analytics",
        }
    }
}

#[derive(Args, Debug)]
pub struct MakeArgs {
    /// The model package directory (jetvlm.yaml) to ship.
    #[arg(long, required = true)]
    pub model: Option<PathBuf>,
    /// The runtime config the service runs with (installed as /etc/jetvlm/runtime.yaml);
    /// default: every field at its default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Target triple of the binaries (aarch64-unknown-linux-gnu for Jetson); default: this
    /// machine's.
    #[arg(long, value_name = "TRIPLE")]
    pub target: Option<String>,
    /// Directory holding jetvlm, jetvlm-analytics and jetvlm-assistant for the target;
    /// default: this executable's directory for the host target, `target/<TRIPLE>/release`
    /// for another.
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// The board the service's memory limit (MemoryMax=) is planned for (`jetvlm board
    /// list`); default: the board this runs on.
    #[arg(long)]
    pub board: Option<String>,
    /// What the service runs.
    #[arg(long, value_enum, default_value_t = ServiceCommand::Serve)]
    pub service: ServiceCommand,
    /// The analytics rules file (with --service analytics; installed as
    /// /etc/jetvlm/analytics.yaml).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Address `jetvlm serve` listens on (the env file's JETVLM_HOST).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port `jetvlm serve` listens on (the env file's JETVLM_PORT).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// MemoryMax= in MiB instead of the plan's total plus headroom.
    #[arg(long, value_name = "MIB")]
    pub memory_max_mib: Option<u64>,
    /// Output: a directory, or a file ending in .tar.zst.
    #[arg(long, required = true, value_name = "DIR|FILE.tar.zst")]
    pub out: Option<PathBuf>,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A bundle directory, a .tar.zst bundle, `/opt/jetvlm/<version>`, or a root filesystem
    /// with jetvlm installed.
    pub path: PathBuf,
    /// Also require the bundle to be for this target triple.
    #[arg(long, value_name = "TRIPLE")]
    pub target: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BundleArgs) -> Result<()> {
    match args.command {
        Some(BundleCommand::Verify(v)) => verify(&v),
        None => make(&args.make),
    }
}

/// Fills `@NAME@` placeholders; every placeholder must be given and used.
fn render(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_string();
    for (name, value) in values {
        let key = format!("@{name}@");
        ensure!(out.contains(&key), "template has no {key}");
        out = out.replace(&key, value);
    }
    let parts: Vec<&str> = out.split('@').collect();
    ensure!(
        parts.len() < 3 || !parts[1..parts.len() - 1].iter().any(|p| is_placeholder(p)),
        "template placeholder left unfilled"
    );
    Ok(out)
}

fn is_placeholder(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
}

/// The directory holding the target's binaries.
fn bin_dir(args: &MakeArgs, target: &str) -> Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    if target == manifest::host_target() {
        let exe = std::env::current_exe().context("finding this executable")?;
        return exe
            .parent()
            .map(Path::to_path_buf)
            .context("this executable has no directory");
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join(target)
        .join("release");
    ensure!(
        dir.is_dir(),
        "no --bin-dir given and {} does not exist: build the binaries with `cargo build \
         --release --target {target} -p jetvlm -p jetvlm-analytics -p jetvlm-assistant` or \
         pass --bin-dir",
        dir.display()
    );
    Ok(dir)
}

/// The runtime config: its text and the calibration file it names (a bare file name beside
/// it, so it still resolves from /etc/jetvlm).
fn runtime_config(
    args: &MakeArgs,
) -> Result<(String, jetvlm_runtime::RuntimeConfig, Option<PathBuf>)> {
    let Some(path) = &args.config else {
        let text =
            "# Runtime config of the jetvlm service (docs/configuration.md#runtime-config).\n\
                    # Made without `jetvlm bundle --config`: every field at its default.\n\
                    device: cpu\n"
                .to_string();
        return Ok((text, jetvlm_runtime::RuntimeConfig::default(), None));
    };
    let cfg = jetvlm_runtime::RuntimeConfig::from_yaml(path)
        .with_context(|| format!("--config {}", path.display()))?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config {}: reading it", path.display()))?;
    let calibration = match &cfg.kv_calibration {
        None => None,
        Some(c) => {
            let beside = path
                .parent()
                .map(|d| d.join(c.file_name().unwrap_or_default()));
            ensure!(
                beside.as_deref() == Some(c.as_path()) && c.is_file(),
                "--config {}: field `kv_calibration` ({}): a bundled config's calibration file \
                 must be a file beside it, named by its bare file name",
                path.display(),
                c.display()
            );
            Some(c.clone())
        }
    };
    Ok((text, cfg, calibration))
}

/// `MemoryMax=` from the plan of the config's workload on the board.
fn memory_limit(
    args: &MakeArgs,
    model: &Path,
    cfg: &jetvlm_runtime::RuntimeConfig,
) -> Result<(String, u64, u64)> {
    // `jetvlm plan`'s own arguments, parsed as its command line would be: every option not
    // named here keeps the default `jetvlm plan` gives it.
    #[derive(clap::Parser)]
    struct PlanCli {
        #[command(flatten)]
        args: super::plan::PlanArgs,
    }
    let mut argv: Vec<std::ffi::OsString> = vec!["plan".into(), "--model".into(), model.into()];
    argv.extend(["--frames".into(), cfg.window_frames.to_string().into()]);
    argv.extend([
        "--answer-tokens".into(),
        cfg.max_new_tokens.to_string().into(),
    ]);
    if let Some(b) = &args.board {
        argv.extend(["--board".into(), b.into()]);
    }
    if let Some(kv) = &cfg.kv_policy {
        argv.extend(["--kv".into(), kv.into()]);
    }
    if let Some(c) = &cfg.kv_calibration {
        argv.extend(["--kv-calibration".into(), c.into()]);
    }
    let plan_args = <PlanCli as clap::Parser>::try_parse_from(argv)
        .context("planning the service's memory")?
        .args;
    let plan = super::plan::build(&plan_args).with_context(|| match &args.board {
        Some(b) => format!("planning memory on --board {b}"),
        None => "no --board given and this machine's board could not be detected; name the \
                 board the bundle is for (`jetvlm board list`)"
            .to_string(),
    })?;
    ensure!(
        plan.fits,
        "the model and config do not fit on {}: {}",
        plan.board,
        plan.advice
            .as_deref()
            .unwrap_or("the plan exceeds the board's memory")
    );
    let limit = match args.memory_max_mib {
        Some(mib) => {
            ensure!(mib > 0, "--memory-max-mib must be at least 1");
            mib.checked_mul(1 << 20)
                .with_context(|| format!("--memory-max-mib {mib}: too many bytes for 64 bits"))?
        }
        None => {
            let headroom = (plan.total_bytes / 4).max(MIN_HEADROOM_BYTES);
            let bytes = plan
                .total_bytes
                .checked_add(headroom)
                .context("the plan's total plus headroom overflows 64 bits")?;
            bytes.div_ceil(1 << 20) * (1 << 20)
        }
    };
    Ok((plan.board, plan.total_bytes, limit))
}

/// The analytics rules file's `config:` key (the only one a bundle looks at: it must name
/// the runtime config installed beside it).
#[derive(serde::Deserialize)]
struct RulesConfigKey {
    config: Option<PathBuf>,
}

/// Removes a partly written output when dropped before [`Staging::keep`].
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Staging {
    fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = if self.path.is_dir() {
                std::fs::remove_dir_all(&self.path)
            } else {
                std::fs::remove_file(&self.path)
            };
        }
    }
}

/// A sibling path of `out` for work in progress (same file system, so a rename commits it).
fn partial_path(out: &Path, what: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("--out {}: needs a UTF-8 file name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure!(
        parent.is_dir(),
        "--out {}: directory {} does not exist",
        out.display(),
        parent.display()
    );
    Ok(parent.join(format!(".{name}.{what}-{}", std::process::id())))
}

/// Copies `src` to `dst` with permission bits `mode`.
fn copy_file(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dst.display()))
}

fn write_file(dst: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(dst, text).with_context(|| format!("writing {}", dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dst.display()))
}

/// Copies the model package's files (following symlinks; regular files only), executable
/// bits kept, the rest 0644.
fn copy_tree(src: &Path, dst: &Path) -> Result<usize> {
    let mut n = 0;
    let entries =
        std::fs::read_dir(src).with_context(|| format!("reading directory {}", src.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading directory {}", src.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        ensure!(
            name.to_str().is_some(),
            "{}: a file name that is not UTF-8",
            path.display()
        );
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            n += copy_tree(&path, &dst.join(&name))?;
        } else if meta.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            copy_file(&path, &dst.join(&name), mode)?;
            n += 1;
        } else {
            bail!(
                "--model: {} is neither a file nor a directory",
                path.display()
            );
        }
    }
    Ok(n)
}

/// The systemd unit for this bundle.
fn unit_text(service: ServiceCommand, memory_max: u64) -> Result<String> {
    let exec = match service {
        ServiceCommand::Serve => format!(
            "/{OPT_DIR}/{CURRENT}/{BIN_DIR}/jetvlm --log-format json serve \
             --model /{OPT_DIR}/{CURRENT}/{MODEL_DIR} --config /{ETC_DIR}/{RUNTIME_CONFIG} \
             --host ${{JETVLM_HOST}} --port ${{JETVLM_PORT}}"
        ),
        ServiceCommand::Analytics => format!(
            "/{OPT_DIR}/{CURRENT}/{BIN_DIR}/jetvlm-analytics /{ETC_DIR}/analytics.yaml \
             --model /{OPT_DIR}/{CURRENT}/{MODEL_DIR}"
        ),
    };
    render(
        UNIT_TEMPLATE,
        &[
            ("EXEC_START", exec),
            ("MEMORY_MAX", memory_max.to_string()),
            ("ENV_FILE", format!("/{ETC_DIR}/{ENV_FILE}")),
        ],
    )
}

fn make(args: &MakeArgs) -> Result<()> {
    let (Some(model), Some(out)) = (&args.model, &args.out) else {
        bail!("--model and --out are required");
    };
    let target = args.target.clone().unwrap_or_else(manifest::host_target);
    manifest::target_machine(&target).with_context(|| format!("--target {target}"))?;
    ensure!(
        !args.host.is_empty() && !args.host.contains(char::is_whitespace),
        "--host `{}`: expected an address such as 127.0.0.1",
        args.host
    );
    ensure!(args.port != 0, "--port must be 1 to 65535");
    // Every input is checked before anything is written.
    let bins = bin_dir(args, &target)?;
    for bin in BINARIES {
        let path = bins.join(bin);
        ensure!(
            path.is_file(),
            "{} does not exist: the bundle needs {} built for {target} (--bin-dir)",
            path.display(),
            BINARIES.join(", ")
        );
        manifest::check_elf(&path, &target)
            .map_err(|e| jetvlm_app::bad_input(format!("--bin-dir: {e}")))?;
    }
    jetvlm_vision::package::ModelPackage::load(model)
        .with_context(|| format!("--model {}", model.display()))?;
    let (config_text, cfg, calibration) = runtime_config(args)?;
    let rules = match (args.service, &args.rules) {
        (ServiceCommand::Analytics, None) => {
            bail!("--service analytics needs --rules FILE (the analytics rules)")
        }
        (ServiceCommand::Serve, Some(_)) => bail!("--rules is for --service analytics"),
        (ServiceCommand::Analytics, Some(r)) => {
            let key: RulesConfigKey = jetvlm_core::config::load_yaml(r)
                .with_context(|| format!("--rules {}", r.display()))?;
            if let Some(c) = key.config {
                ensure!(
                    c == Path::new(RUNTIME_CONFIG),
                    "--rules {}: field `config`: {} would not be found from /{ETC_DIR}; name \
                     `{RUNTIME_CONFIG}` (the bundle's runtime config, installed beside it)",
                    r.display(),
                    c.display()
                );
            }
            Some(r.clone())
        }
        (ServiceCommand::Serve, None) => None,
    };
    let (board, plan_total, memory_max) = memory_limit(args, model, &cfg)?;
    let archive = manifest::is_archive_name(out);
    if out.exists() || out.symlink_metadata().is_ok() {
        ensure!(
            args.force,
            "--out {} exists (--force replaces it)",
            out.display()
        );
        ensure!(
            archive || out.is_dir(),
            "--out {} exists and is not a directory",
            out.display()
        );
    }

    let stage = Staging {
        path: partial_path(out, "partial")?,
        keep: false,
    };
    let dir = stage.path.clone();
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for bin in BINARIES {
        copy_file(&bins.join(bin), &dir.join(BIN_DIR).join(bin), 0o755)?;
    }
    copy_tree(model, &dir.join(MODEL_DIR))?;
    let config_dir = dir.join(CONFIG_DIR);
    write_file(&config_dir.join(RUNTIME_CONFIG), &config_text, 0o644)?;
    if let Some(c) = &calibration {
        let name = c.file_name().context("the calibration file has no name")?;
        ensure!(
            name != RUNTIME_CONFIG && name != ENV_FILE && name != "analytics.yaml",
            "--config: the calibration file's name {} is one of the bundle's own config files",
            c.display()
        );
        copy_file(c, &config_dir.join(name), 0o644)?;
    }
    if let Some(r) = &rules {
        copy_file(r, &config_dir.join("analytics.yaml"), 0o644)?;
    }
    let env = render(
        ENV_TEMPLATE,
        &[("HOST", args.host.clone()), ("PORT", args.port.to_string())],
    )?;
    write_file(&config_dir.join(ENV_FILE), &env, 0o644)?;
    write_file(
        &dir.join(SYSTEMD_DIR).join(UNIT),
        &unit_text(args.service, memory_max)?,
        0o644,
    )?;

    let mut files = Vec::new();
    for (rel, node) in manifest::walk(&dir)? {
        ensure!(
            matches!(node, manifest::Node::File { .. }),
            "staged bundle: {rel} is not a regular file"
        );
        files.push(FileEntry::of(&dir.join(&rel), &rel)?);
    }
    let digest = BundleManifest::digest(&files);
    let jetvlm_version = env!("CARGO_PKG_VERSION").to_string();
    let m = BundleManifest {
        format: FORMAT,
        kind: KIND.into(),
        version: format!("{jetvlm_version}-{}", &digest[..8]),
        jetvlm_version,
        target: target.clone(),
        board,
        service: ServiceInfo {
            command: args.service.name().into(),
            plan_total_bytes: plan_total,
            memory_max_bytes: memory_max,
        },
        files,
    };
    m.check().context("the manifest this bundle would carry")?;
    write_file(&dir.join(MANIFEST), &m.to_json()?, 0o644)?;

    if archive {
        let tmp = Staging {
            path: partial_path(out, "partial-archive")?,
            keep: false,
        };
        write_archive(&dir, &m, &tmp.path)?;
        std::fs::rename(&tmp.path, out)
            .with_context(|| format!("renaming {} to {}", tmp.path.display(), out.display()))?;
        tmp.keep();
    } else {
        // An existing --out (with --force) moves aside first and goes once the new one is in.
        let old = out.is_dir().then(|| Staging {
            path: partial_path(out, "replaced").unwrap_or_default(),
            keep: false,
        });
        if let Some(old) = &old {
            std::fs::rename(out, &old.path)
                .with_context(|| format!("moving the old {} aside", out.display()))?;
        }
        if let Err(e) = std::fs::rename(&dir, out) {
            if let Some(old) = old {
                let _ = std::fs::rename(&old.path, out);
                old.keep();
            }
            return Err(e)
                .with_context(|| format!("renaming {} to {}", dir.display(), out.display()));
        }
        stage.keep();
    }
    let bytes: u64 = m.files.iter().map(|f| f.size).sum();
    println!(
        "bundle {} for {} ({} files, {:.1} MiB, MemoryMax={} MiB planned for {}) -> {}",
        m.version,
        m.target,
        m.files.len() + 1,
        bytes as f64 / (1 << 20) as f64,
        m.service.memory_max_bytes >> 20,
        m.board,
        out.display()
    );
    Ok(())
}

/// The staged bundle as a `.tar.zst`: the manifest first, then the files in manifest order,
/// with fixed owners and times (the same inputs give the same bytes).
fn write_archive(dir: &Path, m: &BundleManifest, dst: &Path) -> Result<()> {
    let file = std::fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut enc = zstd::stream::write::Encoder::new(file, 10)
        .with_context(|| format!("starting zstd for {}", dst.display()))?;
    {
        let mut tar = tar::Builder::new(&mut enc);
        let manifest_entry = FileEntry::of(&dir.join(MANIFEST), MANIFEST)?;
        for f in std::iter::once(&manifest_entry).chain(&m.files) {
            let path = dir.join(&f.path);
            let mut header = tar::Header::new_gnu();
            header.set_size(f.size);
            header.set_mode(f.mode_bits());
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_entry_type(tar::EntryType::Regular);
            let src = std::fs::File::open(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            tar.append_data(&mut header, &f.path, src)
                .with_context(|| format!("adding {} to {}", f.path, dst.display()))?;
        }
        tar.finish()
            .with_context(|| format!("writing {}", dst.display()))?;
    }
    let file = enc
        .finish()
        .with_context(|| format!("writing {}", dst.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", dst.display()))?;
    Ok(())
}

/// What `verify` found.
#[derive(serde::Serialize)]
struct VerifyReport<'a> {
    ok: bool,
    path: String,
    what: &'a str,
    version: String,
    target: String,
    files: usize,
    problems: Vec<Problem>,
}

/// Checks an installed root: the current version directory against its manifest, and the
/// configs and unit installed from it against their entries.
pub fn check_installed_root(root: &Path) -> Result<(BundleManifest, Vec<Problem>)> {
    let current = root.join(OPT_DIR).join(CURRENT);
    let m = BundleManifest::load(&current.join(MANIFEST))?;
    let mut problems = manifest::check_tree(&current, &m, &format!("/{OPT_DIR}/{CURRENT}/"))?;
    for (rel, dest) in installed_copies(&m) {
        let entry = m
            .file(&rel)
            .with_context(|| format!("the manifest has no {rel}"))?;
        manifest::check_file(&root.join(&dest), entry, &format!("/{dest}"), &mut problems);
    }
    Ok((m, problems))
}

/// The files an install copies out of the version directory: (path in the bundle, path in
/// the root without the leading `/`). Every file of `config/` goes to /etc/jetvlm, the unit
/// to /etc/systemd/system.
pub fn installed_copies(m: &BundleManifest) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in &m.files {
        if let Some(name) = f.path.strip_prefix(&format!("{CONFIG_DIR}/")) {
            out.push((f.path.clone(), format!("{ETC_DIR}/{name}")));
        } else if let Some(name) = f.path.strip_prefix(&format!("{SYSTEMD_DIR}/")) {
            out.push((f.path.clone(), format!("{UNIT_DIR}/{name}")));
        }
    }
    out
}

fn verify(args: &VerifyArgs) -> Result<()> {
    let path = &args.path;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let (what, m, problems) = if meta.is_file() {
        let (m, p) = manifest::check_archive(path)?;
        ("archive", m, p)
    } else if path.join(MANIFEST).is_file() {
        let m = BundleManifest::load(&path.join(MANIFEST))?;
        let p = manifest::check_tree(path, &m, "")?;
        ("bundle directory", m, p)
    } else if path.join(OPT_DIR).join(CURRENT).join(MANIFEST).is_file() {
        let (m, p) = check_installed_root(path)?;
        ("installed root", m, p)
    } else {
        bail!(
            "{}: neither a bundle (no {MANIFEST}) nor a root with jetvlm installed (no {OPT_DIR}/{CURRENT}/{MANIFEST})",
            path.display()
        );
    };
    let mut problems = problems;
    if let Some(t) = &args.target
        && *t != m.target
    {
        problems.push(Problem {
            path: MANIFEST.into(),
            kind: "wrong target",
            detail: format!("the bundle is for {}, --target {t}", m.target),
        });
    }
    let ok = problems.is_empty();
    let problem_count = problems.len();
    if args.json {
        let report = VerifyReport {
            ok,
            path: path.display().to_string(),
            what,
            version: m.version.clone(),
            target: m.target.clone(),
            files: m.files.len(),
            problems,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut stdout = std::io::stdout().lock();
        for p in &problems {
            writeln!(stdout, "{p}")?;
        }
        if ok {
            writeln!(
                stdout,
                "OK: {} {} ({}, version {}): {} files match its manifest",
                what,
                path.display(),
                m.target,
                m.version,
                m.files.len()
            )?;
        }
    }
    if !ok {
        return Err(jetvlm_app::check_failed(format!(
            "{what} {}: {} problem(s) against its manifest (listed on stdout)",
            path.display(),
            problem_count
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_names_its_command_limits_and_hardening() {
        let unit = unit_text(ServiceCommand::Serve, 512 << 20).unwrap();
        for line in [
            "Type=notify",
            "MemoryMax=536870912",
            "ProtectSystem=strict",
            "DynamicUser=yes",
            "StateDirectory=jetvlm",
            "CacheDirectory=jetvlm",
            "Restart=on-failure",
            "EnvironmentFile=/etc/jetvlm/jetvlm.env",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "no `{line}` in:\n{unit}");
        }
        assert!(unit.contains("ExecStart=/opt/jetvlm/current/bin/jetvlm --log-format json serve"));
        assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
        assert!(!unit.contains('@'), "{unit}");
        let unit = unit_text(ServiceCommand::Analytics, 1 << 30).unwrap();
        assert!(unit.contains(
            "ExecStart=/opt/jetvlm/current/bin/jetvlm-analytics /etc/jetvlm/analytics.yaml"
        ));
    }

    #[test]
    fn render_refuses_a_missing_or_unfilled_placeholder() {
        assert!(render("a @X@ b", &[("Y", "1".into())]).is_err());
        assert!(render("a @X@ @Y@", &[("X", "1".into())]).is_err());
        assert_eq!(render("a @X@", &[("X", "1".into())]).unwrap(), "a 1");
    }
}
