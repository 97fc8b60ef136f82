//! `jetvlm install BUNDLE --root DIR`: installs a bundle into a root filesystem without
//! running anything from it (a board's `/`, an L4T `rootfs/` on a flashing host, a chroot):
//! the bundle under `/opt/jetvlm/<version>/` with a `current` symlink, its configs under
//! `/etc/jetvlm/`, the unit under `/etc/systemd/system/`, enabled by the
//! `multi-user.target.wants` symlink. What it writes is recorded in
//! `/opt/jetvlm/install-record.json`, so a second install changes nothing and `--uninstall`
//! leaves the root as it was. docs/deploy.md.

use super::bundle::{CURRENT, OPT_DIR, UNIT_DIR, WANTS_DIR, installed_copies};
use super::manifest::{self, BundleManifest, FileEntry, MANIFEST, UNIT};
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The install record, relative to the root.
pub const RECORD: &str = "opt/jetvlm/install-record.json";
const RECORD_FORMAT: u32 = 1;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    sudo jetvlm install demo.tar.zst --root Linux_for_Tegra/rootfs\n  \
    sudo jetvlm install demo-bundle --root /\n  \
    sudo jetvlm install /opt/jetvlm/0.1.0-1a2b3c4d --root /    (roll back to an installed version)\n  \
    sudo jetvlm install --uninstall --root Linux_for_Tegra/rootfs")]
pub struct InstallArgs {
    /// The bundle: a directory, a .tar.zst, or an installed `/opt/jetvlm/<version>`.
    #[arg(required_unless_present = "uninstall")]
    pub bundle: Option<PathBuf>,
    /// The root filesystem to install into (`/` on the board itself).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Remove everything the installs into --root wrote (from its install record) and the
    /// directories they created, and put back what --force moved aside.
    #[arg(long, conflicts_with = "bundle")]
    pub uninstall: bool,
    /// Replace a config changed since it was installed (or a file not from a jetvlm install)
    /// instead of keeping it; the old one stays beside it as `<name>.old`. With --uninstall:
    /// also remove installed files changed since.
    #[arg(long)]
    pub force: bool,
}

/// `/opt/jetvlm/install-record.json`: what the installs wrote, so uninstall is exact.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub format: u32,
    /// Every path the installs wrote (absolute inside the root) and what they wrote there.
    pub entries: BTreeMap<String, Owned>,
    /// Directories the installs created, in creation order.
    pub created_dirs: Vec<String>,
    /// Files that were in the way and not from an install, moved aside by --force:
    /// path -> where they are now (put back by --uninstall).
    pub backups: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Owned {
    File { sha256: String, mode: String },
    Symlink { target: String },
}

impl Record {
    fn load(root: &Path) -> Result<Option<Record>> {
        let path = root.join(RECORD);
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
            Ok(bytes) => {
                let r: Record = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: not a jetvlm install record", path.display()))?;
                ensure!(
                    r.format == RECORD_FORMAT,
                    "{}: field `format`: {} (this jetvlm reads {RECORD_FORMAT})",
                    path.display(),
                    r.format
                );
                for p in r
                    .entries
                    .keys()
                    .chain(&r.created_dirs)
                    .chain(r.backups.keys())
                    .chain(r.backups.values())
                {
                    rel_of(p).with_context(|| format!("{}", path.display()))?;
                }
                Ok(Some(r))
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.created_dirs.is_empty() && self.backups.is_empty()
    }

    fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }
}

/// `/a/b` -> `a/b`, checked to stay inside the root.
fn rel_of(abs: &str) -> Result<&str> {
    let rel = abs
        .strip_prefix('/')
        .with_context(|| format!("`{abs}` is not an absolute path"))?;
    manifest::check_rel_path(rel)?;
    Ok(rel)
}

pub fn run(args: InstallArgs) -> Result<()> {
    let root = &args.root;
    ensure!(root.is_dir(), "--root {}: not a directory", root.display());
    if args.uninstall {
        return uninstall(root, args.force);
    }
    let Some(bundle) = &args.bundle else {
        bail!("give the BUNDLE to install, or --uninstall");
    };
    let source = Source::open(bundle)?;
    install(root, &source, args.force)
}

/// A directory removed when dropped (an unpacked archive).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bundle ready to install: a directory checked against its manifest (an archive is
/// unpacked to a temporary one first).
struct Source {
    dir: PathBuf,
    manifest: BundleManifest,
    manifest_sha: String,
    _temp: Option<TempDir>,
}

impl Source {
    fn open(bundle: &Path) -> Result<Source> {
        let meta =
            std::fs::metadata(bundle).with_context(|| format!("BUNDLE {}", bundle.display()))?;
        let temp = if meta.is_file() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let t =
                std::env::temp_dir().join(format!("jetvlm-install-{}-{nanos}", std::process::id()));
            std::fs::create_dir(&t).with_context(|| format!("creating {}", t.display()))?;
            let t = TempDir(t);
            unpack(bundle, &t.0)?;
            Some(t)
        } else {
            None
        };
        let dir = temp
            .as_ref()
            .map_or_else(|| bundle.to_path_buf(), |t| t.0.clone());
        let mpath = dir.join(MANIFEST);
        let manifest =
            BundleManifest::load(&mpath).with_context(|| format!("BUNDLE {}", bundle.display()))?;
        let manifest_sha = manifest::sha256_file(&mpath)?.0;
        let problems = manifest::check_tree(&dir, &manifest, "")?;
        if !problems.is_empty() {
            let shown: Vec<String> = problems.iter().take(5).map(|p| p.to_string()).collect();
            bail!(
                "BUNDLE {} does not match its manifest ({} problem(s): {}); nothing installed",
                bundle.display(),
                problems.len(),
                shown.join("; ")
            );
        }
        Ok(Source {
            dir,
            manifest,
            manifest_sha,
            _temp: temp,
        })
    }
}

/// Unpacks the regular files of a `.tar.zst` bundle into `dir` (paths checked; links and
/// devices refused).
fn unpack(archive: &Path, dir: &Path) -> Result<()> {
    let file =
        std::fs::File::open(archive).with_context(|| format!("reading {}", archive.display()))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .with_context(|| format!("{}: not a zstd stream", archive.display()))?;
    let mut tar = tar::Archive::new(decoder);
    let entries = tar
        .entries()
        .with_context(|| format!("reading {}", archive.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("reading {}", archive.display()))?;
        let rel = manifest::archive_path(&entry, archive)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        ensure!(
            kind.is_file(),
            "{}: entry {rel} is not a regular file (a bundle holds only files)",
            archive.display()
        );
        let mode = entry
            .header()
            .mode()
            .with_context(|| format!("{}: entry {rel}: bad mode", archive.display()))?
            & 0o777;
        let dst = dir.join(&rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create(&dst).with_context(|| format!("writing {}", dst.display()))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("unpacking {rel} from {}", archive.display()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", dst.display()))?;
    }
    Ok(())
}

/// A file or link the install wants in the root.
enum Want {
    File {
        dest: String,
        src: PathBuf,
        sha256: String,
        mode: u32,
        /// Under /etc: an edited copy is kept unless --force.
        config: bool,
    },
    Symlink {
        dest: String,
        target: String,
    },
}

/// What to do for one path.
enum Action {
    /// Copy `src` to `dest` (new, an unchanged installed file, or a repair).
    Write {
        dest: String,
        src: PathBuf,
        sha256: String,
        mode: u32,
    },
    /// Move the file in the way to `<dest>.old`, then write (with --force).
    Replace {
        dest: String,
        src: PathBuf,
        sha256: String,
        mode: u32,
        /// The file in the way was not from an install: --uninstall puts it back.
        foreign: bool,
    },
    /// Set the mode of an installed file whose content is right.
    Chmod {
        dest: String,
        mode: u32,
    },
    Link {
        dest: String,
        target: String,
    },
    /// An installed file that matches: recorded, nothing written.
    Keep {
        dest: String,
        sha256: String,
        mode: u32,
    },
    /// A `<config>.new` an earlier install left beside an edited config, no longer needed
    /// now that the config is the bundle's.
    Remove {
        dest: String,
    },
}

/// The checks of a path inside the root: no parent that is a symlink (it could lead out of
/// the root, as an L4T rootfs' absolute links would on the flashing host).
fn check_parents(root: &Path, rel: &str) -> Result<()> {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        p.push(part);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "{} is a symlink: jetvlm install does not follow links inside --root",
                p.display()
            ),
            Ok(m) if !m.is_dir() => bail!("{} is not a directory", p.display()),
            _ => {}
        }
    }
    Ok(())
}

/// Directories missing above `rel`, outermost first.
fn missing_dirs(root: &Path, rel: &str, into: &mut Vec<String>) {
    let parts: Vec<&str> = rel.split('/').collect();
    for i in 1..parts.len() {
        let d = parts[..i].join("/");
        if !root.join(&d).exists() && !into.iter().any(|x| x[1..] == d) {
            into.push(format!("/{d}"));
        }
    }
}

/// Refuses a root whose programs are for another machine than the bundle's (when it has
/// any to tell by: `usr/bin/env`).
fn check_root_machine(root: &Path, target: &str) -> Result<()> {
    let probe = root.join("usr/bin/env");
    let Ok(meta) = std::fs::symlink_metadata(&probe) else {
        return Ok(());
    };
    if !meta.is_file() {
        return Ok(());
    }
    if let Ok(machine) = manifest::elf_machine(&probe) {
        let (want, name) = manifest::target_machine(target)?;
        ensure!(
            machine == want,
            "--root {}: its programs ({}) are not for {name}, and the bundle is for {target} \
             (--force installs anyway)",
            root.display(),
            probe.display()
        );
    }
    Ok(())
}

fn install(root: &Path, src: &Source, force: bool) -> Result<()> {
    let m = &src.manifest;
    if !force {
        check_root_machine(root, &m.target)?;
    }
    let old_record = Record::load(root)?;
    let mut record = old_record.clone().unwrap_or(Record {
        format: RECORD_FORMAT,
        ..Record::default()
    });
    let vdir = format!("/{OPT_DIR}/{}", m.version);
    let mut wants = Vec::new();
    let manifest_entry = FileEntry {
        path: MANIFEST.into(),
        sha256: src.manifest_sha.clone(),
        size: 0,
        mode: "0644".into(),
    };
    for f in m.files.iter().chain(std::iter::once(&manifest_entry)) {
        wants.push(Want::File {
            dest: format!("{vdir}/{}", f.path),
            src: src.dir.join(&f.path),
            sha256: f.sha256.clone(),
            mode: f.mode_bits(),
            config: false,
        });
    }
    for (rel, dest) in installed_copies(m) {
        let f = m.file(&rel).context("manifest entry")?;
        wants.push(Want::File {
            dest: format!("/{dest}"),
            src: src.dir.join(&rel),
            sha256: f.sha256.clone(),
            mode: f.mode_bits(),
            config: true,
        });
    }
    wants.push(Want::Symlink {
        dest: format!("/{OPT_DIR}/{CURRENT}"),
        target: m.version.clone(),
    });
    wants.push(Want::Symlink {
        dest: format!("/{WANTS_DIR}/{UNIT}"),
        target: format!("/{UNIT_DIR}/{UNIT}"),
    });

    // 1. Decide everything before writing anything.
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    let mut new_dirs = Vec::new();
    missing_dirs(root, RECORD, &mut new_dirs);
    check_parents(root, RECORD)?;
    for want in &wants {
        let dest = match want {
            Want::File { dest, .. } | Want::Symlink { dest, .. } => dest,
        };
        let rel = rel_of(dest)?;
        check_parents(root, rel)?;
        let path = root.join(rel);
        let meta = std::fs::symlink_metadata(&path).ok();
        let ours = record.entries.get(dest.as_str());
        match want {
            Want::File {
                dest,
                src,
                sha256,
                mode,
                config,
            } => {
                let write = Action::Write {
                    dest: dest.clone(),
                    src: src.clone(),
                    sha256: sha256.clone(),
                    mode: *mode,
                };
                let Some(meta) = meta else {
                    missing_dirs(root, rel, &mut new_dirs);
                    actions.push(write);
                    continue;
                };
                ensure!(
                    meta.is_file(),
                    "{} is in the way: a directory, link or device where a file goes",
                    path.display()
                );
                let (cur, _) = manifest::sha256_file(&path)?;
                let cur_mode = meta.permissions().mode() & 0o7777;
                let recorded_sha = match ours {
                    Some(Owned::File { sha256, .. }) => Some(sha256.as_str()),
                    _ => None,
                };
                if cur == *sha256 {
                    if ours.is_some() {
                        if cur_mode == *mode {
                            actions.push(Action::Keep {
                                dest: dest.clone(),
                                sha256: sha256.clone(),
                                mode: *mode,
                            });
                        } else {
                            actions.push(Action::Chmod {
                                dest: dest.clone(),
                                mode: *mode,
                            });
                        }
                    } else if cur_mode != *mode && !*config {
                        bail!(
                            "{} is not from a jetvlm install and has mode {:04o}, not {:04o}",
                            path.display(),
                            cur_mode,
                            mode
                        );
                    }
                    // The same file was there before: it stays, not ours to remove.
                    continue;
                }
                if recorded_sha == Some(cur.as_str()) || (ours.is_some() && !*config) {
                    // Installed by us and unchanged since (an upgrade), or an installed
                    // program or model file that was changed (a repair).
                    actions.push(write);
                } else if force {
                    let old = format!("{dest}.old");
                    let old_path = root.join(rel_of(&old)?);
                    ensure!(
                        std::fs::symlink_metadata(&old_path).is_err(),
                        "{} is changed and {} exists: move one of them away first",
                        path.display(),
                        old_path.display()
                    );
                    notes.push(format!(
                        "replaced {dest} (changed since installed, or not from jetvlm); the old one is {old}"
                    ));
                    actions.push(Action::Replace {
                        dest: dest.clone(),
                        src: src.clone(),
                        sha256: sha256.clone(),
                        mode: *mode,
                        foreign: ours.is_none(),
                    });
                } else if *config {
                    let new = format!("{dest}.new");
                    notes.push(format!(
                        "kept {dest}: it was changed since installed (or is not from jetvlm); \
                         the bundle's version is {new} (--force replaces yours, keeping it as {dest}.old)"
                    ));
                    let new_rel = rel_of(&new)?;
                    match std::fs::symlink_metadata(root.join(new_rel)) {
                        Err(_) => actions.push(Action::Write {
                            dest: new.clone(),
                            src: src.clone(),
                            sha256: sha256.clone(),
                            mode: *mode,
                        }),
                        Ok(_) if record.entries.contains_key(&new) => {
                            let (s, _) = manifest::sha256_file(&root.join(new_rel))?;
                            if s == *sha256 {
                                actions.push(Action::Keep {
                                    dest: new.clone(),
                                    sha256: sha256.clone(),
                                    mode: *mode,
                                });
                            } else {
                                actions.push(Action::Write {
                                    dest: new.clone(),
                                    src: src.clone(),
                                    sha256: sha256.clone(),
                                    mode: *mode,
                                });
                            }
                        }
                        Ok(_) => bail!(
                            "{} is changed and {} exists and is not from jetvlm: move one away",
                            path.display(),
                            root.join(new_rel).display()
                        ),
                    }
                } else {
                    bail!(
                        "{} exists and is not from a jetvlm install (--force moves it aside to {}.old)",
                        path.display(),
                        path.display()
                    );
                }
            }
            Want::Symlink { dest, target } => {
                let link = Action::Link {
                    dest: dest.clone(),
                    target: target.clone(),
                };
                match meta {
                    None => {
                        missing_dirs(root, rel, &mut new_dirs);
                        actions.push(link);
                    }
                    Some(meta) if meta.file_type().is_symlink() => {
                        let cur = std::fs::read_link(&path)
                            .with_context(|| format!("reading link {}", path.display()))?;
                        if cur == Path::new(target) {
                            if ours.is_some() {
                                actions.push(link);
                            }
                        } else {
                            ensure!(
                                ours.is_some(),
                                "{} is a link to {} not made by jetvlm install",
                                path.display(),
                                cur.display()
                            );
                            notes.push(format!("{dest}: {} -> {target}", cur.display()));
                            actions.push(link);
                        }
                    }
                    Some(_) => bail!(
                        "{} is in the way: a file or directory where a symlink goes",
                        path.display()
                    ),
                }
            }
        }
    }

    // A config that is now the bundle's needs no `.new` beside it any more.
    let mut stale = Vec::new();
    for a in &actions {
        if let Action::Write { dest, .. } | Action::Replace { dest, .. } | Action::Keep { dest, .. } =
            a
            && !dest.ends_with(".new")
        {
            let new = format!("{dest}.new");
            if let Some(Owned::File { sha256, .. }) = record.entries.get(&new) {
                let path = root.join(rel_of(&new)?);
                match manifest::sha256_file(&path) {
                    Ok((s, _)) if s == *sha256 => stale.push(Action::Remove { dest: new }),
                    _ => {}
                }
            }
        }
    }
    actions.extend(stale);

    // 2. The record first (a crash part-way leaves a record uninstall can still use).
    for d in &new_dirs {
        if !record.created_dirs.contains(d) {
            record.created_dirs.push(d.clone());
        }
    }
    for a in &actions {
        match a {
            Action::Write {
                dest, sha256, mode, ..
            }
            | Action::Keep { dest, sha256, mode } => {
                record.entries.insert(
                    dest.clone(),
                    Owned::File {
                        sha256: sha256.clone(),
                        mode: manifest::format_mode(*mode),
                    },
                );
            }
            Action::Replace {
                dest,
                sha256,
                mode,
                foreign,
                ..
            } => {
                let old = format!("{dest}.old");
                if *foreign {
                    record.backups.insert(dest.clone(), old);
                } else {
                    // An installed file an admin changed: the changed copy is ours to remove
                    // on --uninstall, recorded with its content.
                    let (s, _) = manifest::sha256_file(&root.join(rel_of(dest)?))?;
                    let m = std::fs::metadata(root.join(rel_of(dest)?))?
                        .permissions()
                        .mode();
                    record.entries.insert(
                        old,
                        Owned::File {
                            sha256: s,
                            mode: manifest::format_mode(m),
                        },
                    );
                }
                record.entries.insert(
                    dest.clone(),
                    Owned::File {
                        sha256: sha256.clone(),
                        mode: manifest::format_mode(*mode),
                    },
                );
            }
            Action::Chmod { dest, mode } => {
                if let Some(Owned::File { mode: m, .. }) = record.entries.get_mut(dest) {
                    *m = manifest::format_mode(*mode);
                }
            }
            Action::Remove { dest } => {
                record.entries.remove(dest);
            }
            Action::Link { dest, target } => {
                record.entries.insert(
                    dest.clone(),
                    Owned::Symlink {
                        target: target.clone(),
                    },
                );
            }
        }
    }
    for d in &new_dirs {
        let path = root.join(rel_of(d)?);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    let record_changed = old_record.as_ref() != Some(&record);
    if record_changed {
        write_atomic(&root.join(RECORD), record.to_json()?.as_bytes(), 0o644)?;
    }

    // 3. The writes, each a temporary file renamed into place.
    let mut written = 0usize;
    let mut unchanged = 0usize;
    for a in &actions {
        match a {
            Action::Write {
                dest, src, mode, ..
            } => {
                copy_atomic(src, &root.join(rel_of(dest)?), *mode)?;
                written += 1;
            }
            Action::Replace {
                dest, src, mode, ..
            } => {
                let path = root.join(rel_of(dest)?);
                let old = root.join(rel_of(&format!("{dest}.old"))?);
                std::fs::rename(&path, &old)
                    .with_context(|| format!("moving {} to {}", path.display(), old.display()))?;
                copy_atomic(src, &path, *mode)?;
                written += 1;
            }
            Action::Chmod { dest, mode } => {
                let path = root.join(rel_of(dest)?);
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                    .with_context(|| format!("setting the mode of {}", path.display()))?;
                written += 1;
            }
            Action::Link { dest, target } => {
                let path = root.join(rel_of(dest)?);
                if std::fs::read_link(&path).ok().as_deref() == Some(Path::new(target)) {
                    unchanged += 1;
                } else {
                    link_atomic(target, &path)?;
                    written += 1;
                }
            }
            Action::Keep { .. } => unchanged += 1,
            Action::Remove { dest } => {
                let path = root.join(rel_of(dest)?);
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                written += 1;
            }
        }
    }
    for n in &notes {
        println!("{n}");
    }
    if written == 0 && !record_changed {
        println!(
            "jetvlm {} ({}) is already installed in {}: nothing changed",
            m.version,
            m.target,
            root.display()
        );
    } else {
        println!(
            "installed jetvlm {} ({}) into {}: {written} written, {unchanged} unchanged; \
             /{OPT_DIR}/{CURRENT} -> {}; {UNIT} enabled (multi-user.target)",
            m.version,
            m.target,
            root.display(),
            m.version
        );
    }
    Ok(())
}

fn temp_beside(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: no file name", path.display()))?;
    Ok(path.with_file_name(format!(".{name}.jetvlm-tmp-{}", std::process::id())))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    replace_atomic(path, mode, |tmp| {
        std::fs::write(tmp, bytes).with_context(|| format!("writing {}", tmp.display()))
    })
}

fn copy_atomic(src: &Path, path: &Path, mode: u32) -> Result<()> {
    replace_atomic(path, mode, |tmp| {
        std::fs::copy(src, tmp)
            .map(drop)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))
    })
}

/// Replaces `path` with a file that `fill` writes beside it: the mode is set and the data
/// synced before the rename, and the temporary file is removed on any error, so `path` holds
/// the old file or the whole new one.
fn replace_atomic(path: &Path, mode: u32, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_beside(path)?;
    let result = (|| -> Result<()> {
        fill(&tmp)?;
        let f = std::fs::File::options()
            .write(true)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Points `path` at `target` by renaming a new link over it (a switch of `current` is
/// atomic: the service sees the old version or the new one).
fn link_atomic(target: &str, path: &Path) -> Result<()> {
    let tmp = temp_beside(path)?;
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating link {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })
}

fn uninstall(root: &Path, force: bool) -> Result<()> {
    let Some(record) = Record::load(root)? else {
        bail!(
            "--root {}: no {RECORD}: jetvlm is not installed there (nothing to uninstall)",
            root.display()
        );
    };
    let mut left = Record {
        format: RECORD_FORMAT,
        ..Record::default()
    };
    let mut removed = 0usize;
    let mut kept = Vec::new();
    // Deepest paths first.
    for (dest, owned) in record.entries.iter().rev() {
        let path = root.join(rel_of(dest)?);
        check_parents(root, rel_of(dest)?)?;
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let remove = match owned {
            Owned::Symlink { .. } => meta.file_type().is_symlink(),
            Owned::File { sha256, .. } => {
                meta.is_file() && (force || manifest::sha256_file(&path)?.0 == *sha256)
            }
        };
        if remove {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        } else {
            kept.push(format!(
                "kept {dest}: changed since it was installed (--force removes it)"
            ));
            left.entries.insert(dest.clone(), owned.clone());
        }
    }
    for (dest, saved) in &record.backups {
        let path = root.join(rel_of(dest)?);
        let saved_path = root.join(rel_of(saved)?);
        if std::fs::symlink_metadata(&path).is_err() && saved_path.exists() {
            std::fs::rename(&saved_path, &path).with_context(|| {
                format!(
                    "putting {} back as {}",
                    saved_path.display(),
                    path.display()
                )
            })?;
        } else if saved_path.exists() {
            kept.push(format!("kept {saved}: {dest} is in its way"));
            left.backups.insert(dest.clone(), saved.clone());
        }
    }
    let record_path = root.join(RECORD);
    if left.entries.is_empty() && left.backups.is_empty() {
        std::fs::remove_file(&record_path)
            .with_context(|| format!("removing {}", record_path.display()))?;
    }
    for d in record.created_dirs.iter().rev() {
        let path = root.join(rel_of(d)?);
        match std::fs::remove_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                kept.push(format!("kept {d}: not empty"));
                left.created_dirs.insert(0, d.clone());
            }
        }
    }
    if !left.is_empty() {
        write_atomic(&record_path, left.to_json()?.as_bytes(), 0o644)?;
    }
    for k in &kept {
        println!("{k}");
    }
    println!(
        "uninstalled jetvlm from {}: {removed} files and links removed, {} directories removed{}",
        root.display(),
        record.created_dirs.len() - left.created_dirs.len(),
        if kept.is_empty() {
            String::new()
        } else {
            format!(", {} kept", kept.len())
        }
    );
    ensure!(
        kept.is_empty(),
        "{} path(s) were kept (listed above); the record {} lists them",
        kept.len(),
        RECORD
    );
    Ok(())
}
