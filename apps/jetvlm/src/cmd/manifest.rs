//! The bundle manifest (`manifest.json`) and what `bundle`, `bundle verify` and `install`
//! share: SHA-256 of files, the ELF header check of binaries against a target, walking a
//! tree, and checking a tree (or an archive) against a manifest.
//!
//! One definition: the bundle layout, the manifest's fields and the file checks live here;
//! `bundle.rs` writes bundles, `install.rs` installs them.

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The manifest's file name, at the top of a bundle (and of an installed version).
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// `kind` of a bundle manifest.
pub const KIND: &str = "jetvlm-bundle";
/// The binaries every bundle carries, under `bin/`.
pub const BINARIES: [&str; 3] = ["jetvlm", "jetvlm-analytics", "jetvlm-assistant"];
/// The bundle's directories: binaries, the model package, configs (installed under
/// `/etc/jetvlm`), the systemd unit (installed under `/etc/systemd/system`).
pub const BIN_DIR: &str = "bin";
pub const MODEL_DIR: &str = "model";
pub const CONFIG_DIR: &str = "config";
pub const SYSTEMD_DIR: &str = "systemd";
/// The runtime config, the env file and the unit inside a bundle.
pub const RUNTIME_CONFIG: &str = "runtime.yaml";
pub const ENV_FILE: &str = "jetvlm.env";
pub const UNIT: &str = "jetvlm.service";

/// `manifest.json`: what a bundle holds and for which machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    /// [`FORMAT`].
    pub format: u32,
    /// [`KIND`].
    pub kind: String,
    /// The install directory's name (`/opt/jetvlm/<version>`): the jetvlm version and the
    /// first 8 hex digits of [`BundleManifest::digest`].
    pub version: String,
    /// The version of the `jetvlm` that wrote the bundle (and of its binaries).
    pub jetvlm_version: String,
    /// The Rust target triple the binaries are built for.
    pub target: String,
    /// The board the service's memory limit was planned for.
    pub board: String,
    /// What the unit runs and its limits.
    pub service: ServiceInfo,
    /// Every file of the bundle except the manifest, sorted by path.
    pub files: Vec<FileEntry>,
}

/// The service the bundle's unit runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInfo {
    /// `serve` (`jetvlm serve`) or `analytics` (`jetvlm-analytics`).
    pub command: String,
    /// The plan's total for the runtime config's workload on `board`, in bytes.
    pub plan_total_bytes: u64,
    /// The unit's `MemoryMax=`, in bytes.
    pub memory_max_bytes: u64,
}

/// One file: path relative to the bundle (`/`-separated), SHA-256, size, permission bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// Permission bits in octal, e.g. `0755`.
    pub mode: String,
}

impl FileEntry {
    /// The entry of the file at `path` (named `rel` in the bundle).
    pub fn of(path: &Path, rel: &str) -> Result<Self> {
        let (sha256, size) = sha256_file(path)?;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .permissions()
            .mode()
            & 0o7777;
        Ok(FileEntry {
            path: rel.to_string(),
            sha256,
            size,
            mode: format_mode(mode),
        })
    }

    /// The permission bits (checked by [`BundleManifest::check`]).
    pub fn mode_bits(&self) -> u32 {
        parse_mode(&self.mode).unwrap_or(0)
    }
}

pub fn format_mode(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

fn parse_mode(s: &str) -> Option<u32> {
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o7777)
}

impl BundleManifest {
    /// Reads and checks `manifest.json` (errors name the file and the field).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses and checks a manifest's bytes; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let m: BundleManifest = serde_json::from_slice(bytes)
            .with_context(|| format!("{}: not a jetvlm bundle manifest", path.display()))?;
        m.check()
            .with_context(|| format!("{}: not a valid bundle manifest", path.display()))?;
        Ok(m)
    }

    /// Every field within its domain: the format and kind this build reads, a version that
    /// is one plain path component, hex digests, modes, and relative, normalised, unique file
    /// paths (an install writes them under a root, so none may climb out of it).
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.format == FORMAT,
            "field `format`: {} (this jetvlm reads format {FORMAT})",
            self.format
        );
        ensure!(
            self.kind == KIND,
            "field `kind`: `{}`, expected `{KIND}`",
            self.kind
        );
        ensure!(
            is_plain_name(&self.version),
            "field `version`: `{}` is not a plain directory name",
            self.version
        );
        target_machine(&self.target).context("field `target`")?;
        ensure!(
            ["serve", "analytics"].contains(&self.service.command.as_str()),
            "field `service.command`: `{}`, expected `serve` or `analytics`",
            self.service.command
        );
        let mut previous: Option<&str> = None;
        for (i, f) in self.files.iter().enumerate() {
            check_rel_path(&f.path).with_context(|| format!("field `files[{i}].path`"))?;
            ensure!(
                f.path != MANIFEST,
                "field `files[{i}].path`: the manifest does not list itself"
            );
            ensure!(
                f.sha256.len() == 64
                    && f.sha256
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "field `files[{i}].sha256`: `{}` is not 64 lowercase hex digits",
                f.sha256
            );
            ensure!(
                parse_mode(&f.mode).is_some(),
                "field `files[{i}].mode`: `{}` is not octal permission bits",
                f.mode
            );
            if let Some(p) = previous {
                ensure!(
                    p < f.path.as_str(),
                    "field `files[{i}].path`: `{}` is out of order or listed twice",
                    f.path
                );
            }
            previous = Some(&f.path);
        }
        for bin in BINARIES {
            let rel = format!("{BIN_DIR}/{bin}");
            ensure!(
                self.file(&rel).is_some(),
                "field `files`: no {rel} (a bundle carries {})",
                BINARIES.join(", ")
            );
        }
        for rel in [
            format!("{CONFIG_DIR}/{RUNTIME_CONFIG}"),
            format!("{CONFIG_DIR}/{ENV_FILE}"),
            format!("{SYSTEMD_DIR}/{UNIT}"),
            format!("{MODEL_DIR}/jetvlm.yaml"),
        ] {
            ensure!(self.file(&rel).is_some(), "field `files`: no {rel}");
        }
        Ok(())
    }

    pub fn file(&self, rel: &str) -> Option<&FileEntry> {
        self.files
            .binary_search_by(|f| f.path.as_str().cmp(rel))
            .ok()
            .map(|i| &self.files[i])
    }

    /// SHA-256 over the file list (`sha256 size mode path` lines): the bundle's identity,
    /// whose first 8 hex digits name its install directory.
    pub fn digest(files: &[FileEntry]) -> String {
        let mut h = Sha256::new();
        for f in files {
            h.update(format!("{} {} {} {}\n", f.sha256, f.size, f.mode, f.path).as_bytes());
        }
        hex(&h.finalize())
    }

    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }
}

/// A single path component without separators, `.` or `..`.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// A relative, normalised, `/`-separated path: no leading `/`, no `.`/`..`/empty parts.
pub fn check_rel_path(p: &str) -> Result<()> {
    ensure!(
        !p.is_empty() && !p.starts_with('/') && p.split('/').all(is_plain_name),
        "`{p}` is not a relative path inside the bundle"
    );
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) and size of everything `r` yields.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    sha256_reader(f).with_context(|| format!("reading {}", path.display()))
}

/// ELF `e_machine` values of the targets a bundle can be built for.
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// The ELF machine (and its name) a Linux target triple's executables carry.
pub fn target_machine(target: &str) -> Result<(u16, &'static str)> {
    let (arch, rest) = target.split_once('-').unwrap_or((target, ""));
    ensure!(
        rest.ends_with("linux-gnu") || rest.ends_with("linux-musl"),
        "target `{target}` is not a Linux target (expected e.g. aarch64-unknown-linux-gnu)"
    );
    match arch {
        "aarch64" => Ok((EM_AARCH64, "AArch64")),
        "x86_64" => Ok((EM_X86_64, "x86-64")),
        _ => bail!(
            "target `{target}`: jetvlm bundles are built for aarch64 (Jetson) or x86_64 Linux targets"
        ),
    }
}

/// The target this executable was built for (the default of `bundle --target`).
pub fn host_target() -> String {
    let env = if cfg!(target_env = "musl") {
        "musl"
    } else {
        "gnu"
    };
    format!("{}-unknown-linux-{env}", std::env::consts::ARCH)
}

/// The machine an ELF file is for: 64-bit little-endian ELF headers only (both targets are).
pub fn elf_machine(path: &Path) -> Result<u16> {
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut got = 0;
    while got < head.len() {
        let n = f
            .read(&mut head[got..])
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    ensure!(
        got == head.len() && head[..4] == *b"\x7fELF",
        "{} is not an ELF executable",
        path.display()
    );
    ensure!(
        head[4] == 2 && head[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    Ok(u16::from_le_bytes([head[18], head[19]]))
}

/// Checks that `path` is an ELF executable for `target`; the error is one line naming both.
pub fn check_elf(path: &Path, target: &str) -> Result<()> {
    let (want, want_name) = target_machine(target)?;
    let got = elf_machine(path)?;
    if got != want {
        let got_name = match got {
            EM_AARCH64 => "AArch64".to_string(),
            EM_X86_64 => "x86-64".to_string(),
            m => format!("ELF machine {m}"),
        };
        bail!(
            "{} is built for {got_name}, not for {target} ({want_name})",
            path.display()
        );
    }
    Ok(())
}

/// What a tree holds at one relative path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File { mode: u32 },
    Symlink { target: PathBuf },
    Other,
}

/// Every entry under `dir` (not `dir` itself; directories are walked, not listed), keyed by
/// `/`-separated relative path. Symlinks are listed, not followed.
pub fn walk(dir: &Path) -> Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    walk_into(dir, "", &mut out)?;
    Ok(out)
}

fn walk_into(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Node>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            bail!(
                "{}: a file name that is not UTF-8 ({:?})",
                dir.display(),
                name
            );
        };
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            walk_into(&path, &rel, out)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("reading link {}", path.display()))?;
            out.insert(rel, Node::Symlink { target });
        } else if ft.is_file() {
            out.insert(
                rel,
                Node::File {
                    mode: meta.permissions().mode() & 0o7777,
                },
            );
        } else {
            out.insert(rel, Node::Other);
        }
    }
    Ok(())
}

/// One difference between a tree and its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The path as the user sees it (inside the bundle, or absolute in an installed root).
    pub path: String,
    /// `missing`, `changed`, `mode`, `extra`, `not a file`, `wrong machine`.
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.path)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Compares the file at `path` (shown as `shown`) with `entry`: content and mode.
pub fn check_file(path: &Path, entry: &FileEntry, shown: &str, problems: &mut Vec<Problem>) {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problems.push(Problem {
                path: shown.into(),
                kind: "missing",
                detail: String::new(),
            });
            return;
        }
        Err(e) => {
            problems.push(Problem {
                path: shown.into(),
                kind: "unreadable",
                detail: e.to_string(),
            });
            return;
        }
    };
    if !meta.file_type().is_file() {
        problems.push(Problem {
            path: shown.into(),
            kind: "not a file",
            detail: "a symlink, directory or device where the manifest lists a file".into(),
        });
        return;
    }
    match sha256_file(path) {
        Ok((sha, size)) if sha != entry.sha256 || size != entry.size => {
            problems.push(Problem {
                path: shown.into(),
                kind: "changed",
                detail: format!(
                    "sha256 {sha}, {size} bytes; the manifest says {}, {} bytes",
                    entry.sha256, entry.size
                ),
            });
        }
        Ok(_) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode != entry.mode_bits() {
                problems.push(Problem {
                    path: shown.into(),
                    kind: "mode",
                    detail: format!("{}; the manifest says {}", format_mode(mode), entry.mode),
                });
            }
        }
        Err(e) => problems.push(Problem {
            path: shown.into(),
            kind: "unreadable",
            detail: jetvlm_core::error_line(e.as_ref()),
        }),
    }
}

/// Checks a bundle directory (or an installed version directory, which is a copy of one)
/// against the manifest inside it: every listed file present with its content and mode, the
/// binaries ELF for the manifest's target, nothing else but the manifest.
pub fn check_tree(dir: &Path, m: &BundleManifest, shown_prefix: &str) -> Result<Vec<Problem>> {
    let mut problems = Vec::new();
    let shown = |rel: &str| format!("{shown_prefix}{rel}");
    for f in &m.files {
        check_file(&dir.join(&f.path), f, &shown(&f.path), &mut problems);
    }
    for bin in BINARIES {
        let rel = format!("{BIN_DIR}/{bin}");
        let path = dir.join(&rel);
        if path.is_file()
            && let Err(e) = check_elf(&path, &m.target)
        {
            problems.push(Problem {
                path: shown(&rel),
                kind: "wrong machine",
                detail: jetvlm_core::error_line(e.as_ref()),
            });
        }
    }
    for (rel, node) in walk(dir)? {
        if rel == MANIFEST {
            continue;
        }
        if m.file(&rel).is_none() {
            problems.push(Problem {
                path: shown(&rel),
                kind: "extra",
                detail: match node {
                    Node::Symlink { target } => format!("a symlink to {}", target.display()),
                    Node::Other => "not a regular file".into(),
                    Node::File { .. } => "not in the manifest".into(),
                },
            });
        }
    }
    Ok(problems)
}

/// Checks a `.tar.zst` bundle against the manifest inside it, reading the archive once.
pub fn check_archive(path: &Path) -> Result<(BundleManifest, Vec<Problem>)> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .with_context(|| format!("{}: not a zstd stream", path.display()))?;
    let mut archive = tar::Archive::new(decoder);
    let mut seen: BTreeMap<String, (String, u64, u32)> = BTreeMap::new();
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut elf_heads: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut problems = Vec::new();
    let entries = archive
        .entries()
        .with_context(|| format!("reading {}", path.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("reading {}", path.display()))?;
        let rel = archive_path(&entry, path)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            problems.push(Problem {
                path: rel,
                kind: "extra",
                detail: "not a regular file".into(),
            });
            continue;
        }
        let mode = entry
            .header()
            .mode()
            .with_context(|| format!("{}: entry {rel}: bad mode", path.display()))?
            & 0o7777;
        if rel == MANIFEST {
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {rel} in {}", path.display()))?;
            manifest_bytes = Some(bytes);
            continue;
        }
        // The first bytes (for the ELF check of the binaries), then the rest, all hashed.
        let mut head = Vec::new();
        (&mut entry)
            .take(20)
            .read_to_end(&mut head)
            .with_context(|| format!("reading {rel} in {}", path.display()))?;
        let (sha, size) = sha256_reader(std::io::Cursor::new(&head).chain(&mut entry))
            .with_context(|| format!("reading {rel} in {}", path.display()))?;
        if rel.starts_with(&format!("{BIN_DIR}/")) {
            elf_heads.insert(rel.clone(), head);
        }
        seen.insert(rel, (sha, size, mode));
    }
    let Some(bytes) = manifest_bytes else {
        bail!("{}: no {MANIFEST} in the archive", path.display());
    };
    let m = BundleManifest::parse(&bytes, &path.join(MANIFEST))?;
    let (want_machine, _) = target_machine(&m.target)?;
    for f in &m.files {
        match seen.remove(&f.path) {
            None => problems.push(Problem {
                path: f.path.clone(),
                kind: "missing",
                detail: String::new(),
            }),
            Some((sha, size, _)) if sha != f.sha256 || size != f.size => problems.push(Problem {
                path: f.path.clone(),
                kind: "changed",
                detail: format!(
                    "sha256 {sha}, {size} bytes; the manifest says {}, {} bytes",
                    f.sha256, f.size
                ),
            }),
            Some((_, _, mode)) if mode != f.mode_bits() => problems.push(Problem {
                path: f.path.clone(),
                kind: "mode",
                detail: format!("{}; the manifest says {}", format_mode(mode), f.mode),
            }),
            Some(_) => {}
        }
    }
    for rel in seen.keys() {
        problems.push(Problem {
            path: rel.clone(),
            kind: "extra",
            detail: "not in the manifest".into(),
        });
    }
    for bin in BINARIES {
        let rel = format!("{BIN_DIR}/{bin}");
        if let Some(head) = elf_heads.get(&rel) {
            let machine = (head.len() == 20 && head[..4] == *b"\x7fELF")
                .then(|| u16::from_le_bytes([head[18], head[19]]));
            if machine != Some(want_machine) {
                problems.push(Problem {
                    path: rel,
                    kind: "wrong machine",
                    detail: format!("not an ELF executable for {}", m.target),
                });
            }
        }
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((m, problems))
}

/// The checked relative path of an archive entry.
pub fn archive_path<R: Read>(entry: &tar::Entry<'_, R>, archive: &Path) -> Result<String> {
    let raw = entry
        .path()
        .with_context(|| format!("{}: an entry's path is not readable", archive.display()))?;
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(s) => match s.to_str() {
                Some(s) => parts.push(s.to_string()),
                None => bail!(
                    "{}: entry {} is not UTF-8",
                    archive.display(),
                    raw.display()
                ),
            },
            Component::CurDir => {}
            _ => bail!(
                "{}: entry {} climbs out of the bundle",
                archive.display(),
                raw.display()
            ),
        }
    }
    ensure!(
        !parts.is_empty(),
        "{}: an entry with an empty path",
        archive.display()
    );
    Ok(parts.join("/"))
}

/// Whether `path` names a `.tar.zst` archive (by its name).
pub fn is_archive_name(path: &Path) -> bool {
    path.to_str()
        .is_some_and(|s| s.ends_with(".tar.zst") || s.ends_with(".tzst"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            sha256: "0".repeat(64),
            size: 0,
            mode: "0644".into(),
        }
    }

    fn manifest(files: Vec<FileEntry>) -> BundleManifest {
        BundleManifest {
            format: FORMAT,
            kind: KIND.into(),
            version: "0.1.0-00000000".into(),
            jetvlm_version: "0.1.0".into(),
            target: "aarch64-unknown-linux-gnu".into(),
            board: "orin-nano-8gb".into(),
            service: ServiceInfo {
                command: "serve".into(),
                plan_total_bytes: 1,
                memory_max_bytes: 2,
            },
            files,
        }
    }

    fn complete() -> Vec<FileEntry> {
        let mut files: Vec<FileEntry> = BINARIES
            .iter()
            .map(|b| entry(&format!("bin/{b}")))
            .chain(
                [
                    "config/jetvlm.env",
                    "config/runtime.yaml",
                    "model/jetvlm.yaml",
                    "systemd/jetvlm.service",
                ]
                .map(entry),
            )
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files
    }

    #[test]
    fn a_complete_manifest_checks_and_paths_that_climb_out_do_not() {
        manifest(complete()).check().unwrap();
        for bad in ["../etc/passwd", "/etc/passwd", "model//x", "model/./x", ""] {
            let mut files = complete();
            files.push(entry(bad));
            files.sort_by(|a, b| a.path.cmp(&b.path));
            let err = format!("{:#}", manifest(files).check().unwrap_err());
            assert!(err.contains("files["), "{bad}: {err}");
        }
        let mut m = manifest(complete());
        m.version = "../x".into();
        assert!(format!("{:#}", m.check().unwrap_err()).contains("`version`"));
        let mut m = manifest(complete());
        m.files.retain(|f| f.path != "bin/jetvlm-analytics");
        assert!(format!("{:#}", m.check().unwrap_err()).contains("bin/jetvlm-analytics"));
        let mut m = manifest(complete());
        m.files.swap(0, 1);
        assert!(format!("{:#}", m.check().unwrap_err()).contains("out of order"));
    }

    #[test]
    fn targets_map_to_elf_machines() {
        assert_eq!(
            target_machine("aarch64-unknown-linux-gnu").unwrap().0,
            EM_AARCH64
        );
        assert_eq!(
            target_machine("x86_64-unknown-linux-gnu").unwrap().0,
            EM_X86_64
        );
        assert!(target_machine("armv7-unknown-linux-gnueabihf").is_err());
        assert!(target_machine("aarch64-apple-darwin").is_err());
        // This test binary is an ELF for the host target.
        let exe = std::env::current_exe().unwrap();
        check_elf(&exe, &host_target()).unwrap();
        let other = if host_target().starts_with("x86_64") {
            "aarch64-unknown-linux-gnu"
        } else {
            "x86_64-unknown-linux-gnu"
        };
        let err = check_elf(&exe, other).unwrap_err().to_string();
        assert!(err.contains(other) && err.contains("built for"), "{err}");
    }

    #[test]
    fn sha256_of_a_known_string() {
        assert_eq!(
            sha256_reader(&b"abc"[..]).unwrap().0,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
