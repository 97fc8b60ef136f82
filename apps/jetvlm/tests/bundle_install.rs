//! `jetvlm bundle`, `bundle verify` and `install --root` end to end on the demo model, for
//! the host target: bundle, install into a temporary root (a fake rootfs with the host's
//! systemd units), verify the installed tree (and a changed file failing it), the unit
//! through `systemd-analyze verify`, the unit's ExecStart started from the installed tree
//! answering on loopback and reporting READY/WATCHDOG over a NOTIFY_SOCKET, stopping with
//! exit 0 on SIGTERM, a second install changing nothing, an edited config kept without
//! --force, upgrade and rollback by the `current` symlink, and `--uninstall` leaving the root
//! as it was, file by file.
//!
//! The bundle takes `jetvlm-analytics` and `jetvlm-assistant` from the directory of this
//! crate's `jetvlm` binary: `cargo test --workspace` builds them there (alone: `cargo build
//! -p jetvlm-analytics -p jetvlm-assistant` first).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn jetvlm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_jetvlm"));
    c.env_remove("RUST_LOG");
    c
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("start jetvlm");
    eprintln!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The directory holding the host binaries the bundle takes.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_jetvlm"))
        .parent()
        .unwrap()
        .to_path_buf();
    for b in ["jetvlm-analytics", "jetvlm-assistant"] {
        assert!(
            dir.join(b).is_file(),
            "{} is missing: build it with `cargo build -p jetvlm-analytics -p jetvlm-assistant` \
             (cargo test --workspace does)",
            dir.join(b).display()
        );
    }
    dir
}

fn bundle(out: &Path, config: Option<&Path>) -> Command {
    let mut c = jetvlm();
    c.arg("bundle")
        .arg("--model")
        .arg(repo().join("models/demo"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--board", "orin-nano-8gb", "--out"])
        .arg(out);
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    c
}

fn install(bundle: &Path, root: &Path) -> Command {
    let mut c = jetvlm();
    c.arg("install").arg(bundle).arg("--root").arg(root);
    c
}

fn verify(path: &Path) -> Command {
    let mut c = jetvlm();
    c.args(["bundle", "verify"]).arg(path);
    c
}

/// What a tree holds, path by path: kind, mode, content hash or link target, and (for
/// files) the modification time, so a rewrite with the same bytes shows too.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        bytes: Vec<u8>,
        mtime: (i64, i64),
    },
    Link {
        target: PathBuf,
    },
}

fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Entry>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let rel = format!("{rel}/{name}");
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(e.path()).unwrap();
                out.insert(rel, Entry::Link { target });
            } else if meta.is_dir() {
                out.insert(rel.clone(), Entry::Dir { mode });
                walk(&e.path(), &rel, out);
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                let mtime = (meta.mtime(), meta.mtime_nsec());
                out.insert(rel, Entry::File { mode, bytes, mtime });
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Names the differences of two snapshots (a readable assertion message).
fn diff(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("gone: {k}")),
            Some(w) if w != v => d.push(format!("differs: {k}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            d.push(format!("new: {k}"));
        }
    }
    d
}

/// A root filesystem as a flashing host has it: some /etc, a unit of another service, the
/// host's own `usr/bin/env` (so the install's machine check sees a matching root) and the
/// host's systemd units (for `systemd-analyze verify --root`).
fn fake_rootfs(root: &Path) {
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::write(root.join("etc/hostname"), "jetson\n").unwrap();
    std::fs::write(
        root.join("etc/systemd/system/other.service"),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::copy("/usr/bin/env", root.join("usr/bin/env")).unwrap();
    let units = Path::new("/usr/lib/systemd/system");
    if units.is_dir() {
        std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(units)
            .arg(root.join("usr/lib/systemd/"))
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// `Key=value` of the unit's [Service] section (the last one when repeated).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit:\n{unit}"))
        .to_string()
}

/// The unit's ExecStart as a command run from the installed tree: its environment file
/// applied, `${VAR}` expanded, and absolute paths taken inside the root.
fn exec_start(root: &Path, port: u16) -> Command {
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/jetvlm.service")).unwrap();
    let env_file = unit_value(&unit, "EnvironmentFile");
    let env_text = std::fs::read_to_string(root.join(env_file.trim_start_matches('/'))).unwrap();
    let mut env: BTreeMap<String, String> = env_text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(
        env.get("JETVLM_HOST").map(String::as_str),
        Some("127.0.0.1")
    );
    env.insert("JETVLM_PORT".into(), port.to_string());
    let words: Vec<String> = unit_value(&unit, "ExecStart")
        .split_whitespace()
        .map(|w| {
            let mut w = w.to_string();
            for (k, v) in &env {
                w = w.replace(&format!("${{{k}}}"), v);
            }
            assert!(!w.contains('$'), "unexpanded variable in {w}");
            match w.strip_prefix('/') {
                Some(rel) => root.join(rel).display().to_string(),
                None => w,
            }
        })
        .collect();
    let mut c = Command::new(&words[0]);
    c.args(&words[1..]);
    c.env_clear();
    c.env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in &env {
        c.env(k, v);
    }
    // libonnxruntime.so is found in the project venv above the working directory.
    c.current_dir(repo());
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Kills the child if the test fails before it stops it.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the installed service's command and checks it answers on loopback, tells
/// systemd it is ready and pings the watchdog, and exits 0 on SIGTERM.
fn service_answers_and_stops(root: &Path, tmp: &Path) {
    let port = free_port();
    let sock_path = tmp.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd = exec_start(root, port);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("$ {cmd:?}");
    let mut guard = Guard(Some(cmd.spawn().expect("start the service command")));
    let mut messages = Vec::new();
    let mut health = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if health.is_none()
            && let Some((200, body)) = http_get(port, "/health")
        {
            health = Some(body);
        }
        let ready = messages.iter().any(|m| m.lines().any(|l| l == "READY=1"));
        let pinged = messages.iter().any(|m| m == "WATCHDOG=1");
        if health.is_some() && ready && pinged {
            break;
        }
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("the service command exited early: {status}");
        }
    }
    let health = health.expect("GET /health never answered 200 on loopback");
    let health: serde_json::Value = serde_json::from_str(&health).expect("/health is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["model"], "jetvlm-demo-scenes", "{health}");
    assert!(
        messages.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1 on NOTIFY_SOCKET: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "WATCHDOG=1"),
        "no WATCHDOG=1 on NOTIFY_SOCKET with WATCHDOG_USEC set: {messages:?}"
    );
    let mut child = guard.0.take().unwrap();
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the service did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    eprintln!("service stderr:\n{stderr}");
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
    // Logs are JSON lines (journald keeps stderr): the `model loaded` line is one.
    let json_lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(
        json_lines
            .iter()
            .any(|v| v["fields"]["message"] == "model loaded"),
        "no JSON `model loaded` log line in:\n{stderr}"
    );
}

#[test]
fn bundle_install_verify_serve_upgrade_rollback_uninstall() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let config = tmp.join("runtime.yaml");
    std::fs::write(&config, "max_new_tokens: 16\nwindow_frames: 2\n").unwrap();

    // A bundle for the host target, checked against its own manifest.
    let b1 = tmp.join("b1");
    let out = ok(&mut bundle(&b1, Some(&config)));
    assert!(out.contains("x86_64") || out.contains("aarch64"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b1.join("manifest.json")).unwrap()).unwrap();
    let v1 = manifest["version"].as_str().unwrap().to_string();
    assert_eq!(manifest["format"], 1);
    assert_eq!(manifest["board"], "orin-nano-8gb");
    assert!(manifest["service"]["memory_max_bytes"].as_u64().unwrap() > 0);
    let files = manifest["files"].as_array().unwrap();
    for f in files {
        let path = b1.join(f["path"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(f["size"].as_u64().unwrap(), bytes.len() as u64, "{path:?}");
        assert_eq!(f["sha256"].as_str().unwrap().len(), 64);
    }
    for rel in [
        "bin/jetvlm",
        "bin/jetvlm-analytics",
        "bin/jetvlm-assistant",
        "model/jetvlm.yaml",
        "model/vision.onnx",
        "config/runtime.yaml",
        "config/jetvlm.env",
        "systemd/jetvlm.service",
    ] {
        assert!(
            files.iter().any(|f| f["path"] == rel),
            "no {rel} in the manifest"
        );
    }
    assert_eq!(
        std::fs::read(b1.join("config/runtime.yaml")).unwrap(),
        std::fs::read(&config).unwrap()
    );
    let unit = std::fs::read_to_string(b1.join("systemd/jetvlm.service")).unwrap();
    assert_eq!(
        unit_value(&unit, "MemoryMax"),
        manifest["service"]["memory_max_bytes"].to_string()
    );
    ok(&mut verify(&b1));

    // Install into a fake rootfs.
    let root = tmp.join("rootfs");
    fake_rootfs(&root);
    let before = snapshot(&root);
    ok(&mut install(&b1, &root));
    let current = root.join("opt/jetvlm/current");
    assert_eq!(std::fs::read_link(&current).unwrap(), Path::new(&v1));
    assert_eq!(
        std::fs::read_link(root.join("etc/systemd/system/multi-user.target.wants/jetvlm.service"))
            .unwrap(),
        Path::new("/etc/systemd/system/jetvlm.service")
    );
    assert_eq!(
        std::fs::read(root.join("etc/jetvlm/runtime.yaml")).unwrap(),
        std::fs::read(&config).unwrap()
    );
    let out = ok(&mut verify(&root));
    assert!(out.starts_with("OK: installed root"), "{out}");

    // A second install changes nothing (not even a file's time).
    let installed = snapshot(&root);
    let out = ok(&mut install(&b1, &root));
    assert!(out.contains("nothing changed"), "{out}");
    let again = snapshot(&root);
    assert!(
        diff(&installed, &again).is_empty(),
        "{:?}",
        diff(&installed, &again)
    );

    // The installed unit passes systemd-analyze verify (its ExecStart resolved in the root).
    match Command::new("systemd-analyze").arg("--version").output() {
        Err(_) => eprintln!(
            "SKIPPED systemd-analyze verify: systemd-analyze is not installed (Debian's \
             systemd package; .ci/setup installs it)"
        ),
        Ok(_) => {
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(format!("--root={}", root.display()))
                .arg("jetvlm.service")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "systemd-analyze verify: {:?}\n{stderr}",
                out.status
            );
        }
    }

    // The service's command, from the installed tree.
    service_answers_and_stops(&root, tmp);

    // A changed file fails verify, named; an extra one too. A reinstall repairs the file.
    let scores = current.join("model/scores.json");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&scores)
        .unwrap();
    f.write_all(b" ").unwrap();
    drop(f);
    std::fs::write(current.join("model/extra.txt"), "x").unwrap();
    let out = run(&mut verify(&root));
    assert_eq!(out.status.code(), Some(5), "check failed is exit 5");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("changed: /opt/jetvlm/current/model/scores.json"),
        "{text}"
    );
    assert!(
        text.contains("extra: /opt/jetvlm/current/model/extra.txt"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2, "only the two problems: {text}");
    std::fs::remove_file(current.join("model/extra.txt")).unwrap();
    ok(&mut install(&b1, &root));
    ok(&mut verify(&root));

    // An edited config is kept without --force (the bundle's goes beside it as .new) ...
    let etc_cfg = root.join("etc/jetvlm/runtime.yaml");
    let edited = "max_new_tokens: 8\nwindow_frames: 2\n";
    std::fs::write(&etc_cfg, edited).unwrap();
    let out = ok(&mut install(&b1, &root));
    assert!(out.contains("kept /etc/jetvlm/runtime.yaml"), "{out}");
    assert_eq!(std::fs::read_to_string(&etc_cfg).unwrap(), edited);
    assert_eq!(
        std::fs::read(root.join("etc/jetvlm/runtime.yaml.new")).unwrap(),
        std::fs::read(&config).unwrap()
    );
    let out = run(&mut verify(&root));
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed: /etc/jetvlm/runtime.yaml"));
    // ... and replaced with --force, the edited one kept as .old.
    ok(install(&b1, &root).arg("--force"));
    assert_eq!(
        std::fs::read(&etc_cfg).unwrap(),
        std::fs::read(&config).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/jetvlm/runtime.yaml.old")).unwrap(),
        edited
    );
    assert!(!root.join("etc/jetvlm/runtime.yaml.new").exists());
    ok(&mut verify(&root));

    // Upgrade: a second bundle (another config) installs beside the first and takes
    // `current`; rollback: installing the first version's directory switches back.
    let config2 = tmp.join("runtime2.yaml");
    std::fs::write(&config2, "max_new_tokens: 32\nwindow_frames: 2\n").unwrap();
    let b2 = tmp.join("b2.tar.zst");
    ok(&mut bundle(&b2, Some(&config2)));
    assert!(b2.is_file());
    ok(&mut verify(&b2));
    ok(&mut install(&b2, &root));
    let v2 = std::fs::read_link(&current).unwrap();
    assert_ne!(v2, Path::new(&v1));
    assert!(root.join("opt/jetvlm").join(&v1).is_dir());
    assert_eq!(
        std::fs::read(&etc_cfg).unwrap(),
        std::fs::read(&config2).unwrap()
    );
    ok(&mut verify(&root));
    ok(&mut install(&root.join("opt/jetvlm").join(&v1), &root));
    assert_eq!(std::fs::read_link(&current).unwrap(), Path::new(&v1));
    assert_eq!(
        std::fs::read(&etc_cfg).unwrap(),
        std::fs::read(&config).unwrap()
    );
    ok(&mut verify(&root));

    // Uninstall leaves the root exactly as before, symlinks and directories included.
    let out = ok(jetvlm()
        .args(["install", "--uninstall", "--root"])
        .arg(&root));
    assert!(out.contains("uninstalled"), "{out}");
    let after = snapshot(&root);
    assert!(
        diff(&before, &after).is_empty(),
        "{:?}",
        diff(&before, &after)
    );
}

#[test]
fn a_wrong_machine_or_a_bad_input_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let other = if cfg!(target_arch = "x86_64") {
        "aarch64-unknown-linux-gnu"
    } else {
        "x86_64-unknown-linux-gnu"
    };
    // Host binaries offered as another target's: one line naming the file and both machines.
    let out = run(bundle(&tmp.join("x"), None).args(["--target", other]));
    assert_eq!(out.status.code(), Some(3), "bad input");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bin-dir") && err.contains(other) && err.contains("built for"),
        "{err}"
    );
    // A config with a bad field: refused before anything is written.
    let bad = tmp.join("bad.yaml");
    std::fs::write(&bad, "window_frames: 0\n").unwrap();
    let out = run(&mut bundle(&tmp.join("y.tar.zst"), Some(&bad)));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("window_frames"));
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("bad.yaml")],
        "nothing else written"
    );

    // A root whose programs are for another machine is refused, and left as it was.
    let b = tmp.join("b");
    ok(&mut bundle(&b, None));
    let root = tmp.join("root");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    let machine: u16 = if cfg!(target_arch = "x86_64") {
        183
    } else {
        62
    };
    elf[18..20].copy_from_slice(&machine.to_le_bytes());
    std::fs::write(root.join("usr/bin/env"), &elf).unwrap();
    let before = snapshot(&root);
    let out = run(&mut install(&b, &root));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("usr/bin/env"));
    assert!(diff(&before, &snapshot(&root)).is_empty());

    // A bundle whose file was changed is refused by install, naming it.
    std::fs::write(b.join("model/scores.json"), "{}").unwrap();
    let root2 = tmp.join("root2");
    std::fs::create_dir(&root2).unwrap();
    let out = run(&mut install(&b, &root2));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model/scores.json"));
    assert_eq!(std::fs::read_dir(&root2).unwrap().count(), 0);
}
