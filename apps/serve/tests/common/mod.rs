//! Starting `jetvlm serve` for the end-to-end tests: the binary (built by cargo, fresh), a
//! server on a free loopback port with a timeout on every wait, raw HTTP for probes, and a
//! SIGTERM stop that must exit 0.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn demo_model() -> PathBuf {
    root().join("models/demo")
}

/// The project's Python (.venv, made by .ci/setup).
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run .ci/setup (it installs the openai client the tests use)",
        p.display()
    );
    p
}

/// The `jetvlm` binary, built (or found up to date) by cargo with the test profile, the
/// profile `cargo test` builds the workspace's binaries with.
pub fn jetvlm() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(root())
            .args([
                "build",
                "--profile",
                "test",
                "-p",
                "jetvlm",
                "--bin",
                "jetvlm",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build for the jetvlm binary");
        assert!(out.status.success(), "cargo build -p jetvlm failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"]["name"] == "jetvlm")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo build did not report the jetvlm executable")
    })
    .clone()
}

/// Runs a command with a time limit; returns its status, stdout and stderr.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
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
    let status = wait_for(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {limit:?}")
    });
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A running `jetvlm serve`; killed when dropped (a test that failed), stopped with SIGTERM
/// by [`Server::stop`].
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    stderr: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    /// Starts `jetvlm serve --port 0 ARGS...` and waits (60 s at most) until it listens and
    /// `/health` is 200.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(jetvlm())
            .current_dir(root())
            .args(["serve", "--port", "0", "--model"])
            .arg(demo_model())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting jetvlm serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        let addr = loop {
            let left = Duration::from_secs(60).saturating_sub(t0.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        break rest.split_whitespace().next().unwrap().to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("jetvlm serve did not print its address within 60 s");
                }
            }
        };
        let mut server = Server {
            child: Some(child),
            addr,
            stderr: std::sync::Mutex::new(rx),
        };
        let t0 = Instant::now();
        loop {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "jetvlm serve exited ({status}) before its model loaded:\n{}",
                    server.stderr_lines().join("\n")
                );
            }
            let (status, _, _) = server.request("GET", "/health", &[], b"");
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "GET /health while loading");
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the model did not load within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One HTTP/1.1 request (connection closed after it); status, headers (lowercase names)
    /// and body. 10 s timeouts.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = TcpStream::connect(&self.addr).expect("connecting to the server");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        // A Content-Length given by the caller (one that promises more than is sent) wins.
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("reading the response");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        (status, headers, body)
    }

    /// Sends SIGTERM and waits (30 s at most) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child process by its id.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        wait_for(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("jetvlm serve did not exit within 30 s of SIGTERM")
        })
    }

    /// Lines the server printed on stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        match self.stderr.lock() {
            Ok(rx) => rx.try_iter().collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
}
