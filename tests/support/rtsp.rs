//! What the RTSP tests share (`apps/jetvlm/tests/gstreamer_sources.rs`,
//! `apps/analytics/tests/rtsp_sources.rs` include this file by `#[path]`): a clip of the
//! synthetic scene with its per-frame ground truth, encoded to H.264 by
//! tests/fixtures/make_clip.py, served by tests/fixtures/rtsp_server.py (GStreamer's RTSP
//! server library) on 127.0.0.1; children waited for with a deadline.
//!
//! Needs Debian's python3-gi, gir1.2-gst-rtsp-server-1.0 and the GStreamer plugin packages
//! (.ci/setup installs them).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use jetvlm_camera::qa::single_frame_answer;
use jetvlm_camera::scene::{Scene, SceneConfig};

/// Debian's Python (python3-gi lives there, not in the project's venv).
pub const PYTHON: &str = "/usr/bin/python3";

/// A script or file under tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Waits for `child` up to `limit` (killed and the test failed past it): (success, stdout,
/// stderr).
pub fn wait_output(mut child: Child, limit: Duration, what: &str) -> (bool, String, String) {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    (status.success(), stdout, stderr)
}

/// A loopback port nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A clip of the synthetic scene: numbered PNGs, the H.264 MP4 made from them, and each
/// frame's ground-truth answer to the clip's question and its pixels.
pub struct Clip {
    _dir: tempfile::TempDir,
    pub frames: PathBuf,
    pub mp4: PathBuf,
    pub truth: Vec<String>,
    pub rgb: Vec<Vec<u8>>,
}

/// `frames` frames of the scene with `seed`, encoded at `fps`; `truth` answers `question`.
pub fn make_clip(seed: u64, frames: usize, fps: u64, question: &str) -> Clip {
    let dir = tempfile::tempdir().expect("tempdir");
    let frames_dir = dir.path().join("frames");
    std::fs::create_dir(&frames_dir).expect("frames dir");
    let cfg = SceneConfig::default();
    let (w, h) = (cfg.width, cfg.height);
    let mut scene = Scene::new(cfg, seed).expect("scene");
    let (mut truth, mut rgb) = (Vec::new(), Vec::new());
    let mut truth_lines = String::new();
    for i in 0..frames {
        if i > 0 {
            scene.step();
        }
        let pixels = scene.render();
        let answer =
            single_frame_answer(question, &scene.truth()).expect("the scene answers the question");
        truth_lines.push_str(&format!(
            "{{\"frame\":{i},\"question\":\"{question}\",\"answer\":\"{answer}\"}}\n"
        ));
        image::save_buffer(
            frames_dir.join(format!("frame_{i:05}.png")),
            &pixels,
            w,
            h,
            image::ExtendedColorType::Rgb8,
        )
        .expect("write PNG");
        truth.push(answer);
        rgb.push(pixels);
    }
    // The ground truth beside the frames, for a person reading a failure.
    std::fs::write(dir.path().join("truth.jsonl"), truth_lines).expect("truth");
    let mp4 = dir.path().join("clip.mp4");
    let child = Command::new(PYTHON)
        .arg(fixture("make_clip.py"))
        .arg(&frames_dir)
        .arg(&mp4)
        .args(["--fps", &fps.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run make_clip.py (Debian's python3-gi; .ci/setup installs it)");
    let (ok, _, err) = wait_output(child, Duration::from_secs(120), "make_clip.py");
    assert!(ok, "make_clip.py: {err}");
    Clip {
        _dir: dir,
        frames: frames_dir,
        mp4,
        truth,
        rgb,
    }
}

/// The test RTSP server (`rtsp://127.0.0.1:PORT/clip`); killed when dropped.
pub struct Server {
    child: Child,
}

impl Server {
    /// Starts it on `port` serving `clip` (with Basic authentication when `auth` is given)
    /// and waits (at most 20 s) until it listens.
    pub fn start(port: u16, clip: &Path, auth: Option<(&str, &str)>) -> Self {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(fixture("rtsp_server.py"))
            .args(["--port", &port.to_string()])
            .arg("--clip")
            .arg(clip)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((user, password)) = auth {
            cmd.args(["--user", user, "--password", password]);
        }
        let mut child = cmd.spawn().expect("start rtsp_server.py");
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("ready ") => Server { child },
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the RTSP server did not start: {other:?}");
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
