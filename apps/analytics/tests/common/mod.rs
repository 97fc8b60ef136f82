//! What the analytics tests share: running the binary with a deadline, free loopback ports,
//! a mosquitto broker of the test's own.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn demo_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_jetvlm-analytics")
}

/// A finished run.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout's JSON lines.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }
}

/// Starts `jetvlm-analytics` with `args` (stdout and stderr piped).
pub fn spawn(args: &[&str]) -> Child {
    Command::new(bin())
        .args(args)
        .env_remove("JETVLM_MODEL")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start jetvlm-analytics")
}

/// Waits for `child` at most `limit`; a run past it is killed and fails the test.
pub fn wait(mut child: Child, limit: Duration) -> Output {
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "jetvlm-analytics did not finish in {limit:?}; stderr: {}",
                t_err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        ok: status.success(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs `jetvlm-analytics` with a deadline.
pub fn run(args: &[&str], limit: Duration) -> Output {
    wait(spawn(args), limit)
}

/// A loopback port nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `cond` every 20 ms for at most `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A mosquitto broker of the test's own (its own config file, port and persistence
/// directory; not the system service). Killed on drop.
pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// The mosquitto binary (Debian's package; `.ci/setup` installs it).
pub fn mosquitto() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run .ci/setup (Debian package `mosquitto`)");
}

impl Broker {
    /// An anonymous broker on a plain TCP listener.
    pub fn start(dir: &Path) -> Broker {
        Self::start_with(dir, "allow_anonymous true\n", "")
    }

    /// A broker with `general` configuration lines (authentication) and `listener` lines for
    /// its one listener (TLS files).
    pub fn start_with(dir: &Path, general: &str, listener: &str) -> Broker {
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
            starts: 0,
        };
        // `user root`: started as root (CI, containers), mosquitto would otherwise switch to
        // the `mosquitto` user, which cannot write the persistence file in this test's
        // directory (mode 0700): sessions and queued QoS 1 messages would not survive a
        // restart. Started as any other user, mosquitto ignores `user`.
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "user root\n{general}listener {} 127.0.0.1\n{listener}persistence true\npersistence_location {}/\nlog_dest stderr\n",
                b.port,
                dir.display()
            ),
        )
        .expect("write mosquitto.conf");
        b.up();
        b
    }

    /// Starts the broker process and waits until it accepts connections.
    pub fn up(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("broker-{}.log", self.starts)))
            .expect("broker log");
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "mosquitto did not listen on {port}"
        );
    }

    /// Stops the broker (SIGTERM: it saves its sessions, checked in its log) and waits for it
    /// to exit.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The pid of a child this test started and has not reaped yet.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
            let log = self.dir.join(format!("broker-{}.log", self.starts));
            let log = std::fs::read_to_string(log).unwrap_or_default();
            assert!(
                log.contains("Saving in-memory database") && !log.contains("Error saving"),
                "mosquitto did not save its sessions on stop: {log}"
            );
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
