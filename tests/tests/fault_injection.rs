//! Fault injection: frame sources that fail, stall, come back and end early, driven through
//! the capture loop every camera app uses (`jetvlm_app::next_frame`: `jetvlm watch`,
//! `jetvlm-analytics`, `jetvlm-assistant`) into a real `StreamSession`; and an ONNX Runtime
//! library that is missing or is not ONNX Runtime.
//!
//! [`Faulty`] wraps a real source (the synthetic scene) and replaces chosen captures with a
//! fault. Each case says what must happen: a clear error naming the source, or the run going
//! on with every real frame in order; never a panic, never a hang (every case has a wall-clock
//! bound far above its timeouts).

use jetvlm_camera::{CameraError, Capture, FrameSource};
use jetvlm_runtime::{Pipeline, RuntimeConfig, RuntimeError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What a wrapped capture does instead of (or before) passing through.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The wrapped source's next capture.
    Pass,
    /// A camera error (the device failed this capture).
    Error,
    /// Nothing within the timeout: waits it out, returns `Timeout`.
    Stall,
    /// The stream ends here (and stays ended).
    End,
}

/// A real source with scripted faults: capture `i` follows `script[i]`; past the script
/// every capture passes through.
struct Faulty {
    inner: Box<dyn FrameSource>,
    script: VecDeque<Fault>,
    ended: bool,
    captures: usize,
}

impl Faulty {
    fn new(script: &[Fault]) -> Self {
        let inner = jetvlm_camera::open("synthetic://scene?seed=5&width=64&height=48&pace=0")
            .expect("the synthetic scene opens");
        Faulty {
            inner,
            script: script.iter().copied().collect(),
            ended: false,
            captures: 0,
        }
    }
}

impl FrameSource for Faulty {
    fn capture(&mut self, timeout: Duration) -> Result<Capture, CameraError> {
        self.captures += 1;
        if self.ended {
            return Ok(Capture::EndOfStream);
        }
        match self.script.pop_front().unwrap_or(Fault::Pass) {
            Fault::Pass => self.inner.capture(timeout),
            Fault::Error => Err(CameraError::Device {
                device: "faulty://test".into(),
                op: "dequeue buffer",
                source: std::io::Error::other("injected I/O error"),
            }),
            Fault::Stall => {
                std::thread::sleep(timeout);
                Ok(Capture::Timeout)
            }
            Fault::End => {
                self.ended = true;
                Ok(Capture::EndOfStream)
            }
        }
    }
    fn frame_size(&self) -> Option<(u32, u32)> {
        self.inner.frame_size()
    }
    fn fps(&self) -> Option<f64> {
        self.inner.fps()
    }
    fn describe(&self) -> String {
        "faulty://test".into()
    }
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vlm")
}

fn pipeline() -> Pipeline {
    let cfg = RuntimeConfig {
        kv_policy: Some("mixed:group=32".into()),
        max_new_tokens: 3,
        window_frames: 2,
        ..RuntimeConfig::default()
    };
    Pipeline::load(&fixture(), cfg).unwrap()
}

const TIMEOUT: Duration = Duration::from_millis(20);
const URI: &str = "faulty://test";

/// Where a run of `next_frame` calls stopped.
#[derive(Debug)]
enum Outcome {
    /// The stream ended after this many frames.
    Ended(usize),
    /// An error after this many frames.
    Failed(usize, String),
}

/// Drives `next_frame` until the stream ends or fails (asking a question after every frame,
/// as a watch run does), at most `limit` frames; returns the outcome and the stream indices
/// of the frames the session took, and checks the whole run took less than `bound`.
fn drive(script: &[Fault], limit: usize, bound: Duration) -> (Outcome, Vec<u64>) {
    let mut p = pipeline();
    let mut s = p.session().unwrap();
    let mut src = Faulty::new(script);
    let started = Instant::now();
    let mut indices = Vec::new();
    let outcome = loop {
        if indices.len() == limit {
            break Outcome::Ended(indices.len());
        }
        match jetvlm_app::next_frame(&mut s, &mut src, TIMEOUT, URI) {
            Ok(Some(_)) => {
                indices.push(s.frames().last().unwrap().index);
                let a = s
                    .ask("how many objects are there?")
                    .unwrap()
                    .finish()
                    .unwrap();
                assert!(!a.token_ids.is_empty() && a.stats.frames == s.frames().len());
            }
            Ok(None) => break Outcome::Ended(indices.len()),
            Err(e) => break Outcome::Failed(indices.len(), jetvlm_core::error_line(e.as_ref())),
        }
    };
    let took = started.elapsed();
    assert!(took < bound, "{script:?}: the run took {took:?}");
    (outcome, indices)
}

/// A capture error or a stall between good frames: reported (a warning) and retried; the run
/// goes on with the source's frames in order, none lost or repeated.
#[test]
fn a_source_that_errors_or_stalls_mid_run_goes_on() {
    use Fault::*;
    for script in [
        vec![Pass, Error, Pass, Pass],
        vec![Pass, Stall, Stall, Pass, Pass],
        vec![Pass, Error, Stall, Pass, Error, Pass],
    ] {
        let (outcome, indices) = drive(&script, 4, Duration::from_secs(30));
        assert!(
            matches!(outcome, Outcome::Ended(4)),
            "{script:?}: {outcome:?}"
        );
        assert_eq!(indices, vec![0, 1, 2, 3], "{script:?}");
    }
}

/// A source that stops delivering (stalls or fails every capture) is an error naming it
/// after `MAX_TIMEOUTS` failed captures in a row, not a hang; a camera error's own message is
/// kept.
#[test]
fn a_dead_source_is_an_error_naming_it() {
    use Fault::*;
    let n = jetvlm_app::MAX_TIMEOUTS as usize;
    let (outcome, indices) = drive(
        &[vec![Pass; 2], vec![Stall; n]].concat(),
        10,
        Duration::from_secs(30),
    );
    match outcome {
        Outcome::Failed(2, msg) => {
            assert!(msg.contains(URI) && msg.contains("timeouts"), "{msg}")
        }
        other => panic!("stalled source: {other:?}"),
    }
    assert_eq!(indices, vec![0, 1]);

    let (outcome, _) = drive(
        &[vec![Pass], vec![Error; n]].concat(),
        10,
        Duration::from_secs(30),
    );
    match outcome {
        Outcome::Failed(1, msg) => assert!(
            msg.contains(URI)
                && msg.contains("injected I/O error")
                && msg.contains("dequeue buffer"),
            "{msg}"
        ),
        other => panic!("failing source: {other:?}"),
    }

    // One failure short of the limit, then frames: still alive.
    let script = [vec![Pass], vec![Stall; n - 1], vec![Pass]].concat();
    let (outcome, indices) = drive(&script, 2, Duration::from_secs(30));
    assert!(matches!(outcome, Outcome::Ended(2)), "{outcome:?}");
    assert_eq!(indices, vec![0, 1]);
}

/// A source that ends early ends the run cleanly: the session keeps its window and still
/// answers about it, and capturing again keeps saying "ended".
#[test]
fn a_source_that_ends_early_ends_the_run_and_the_window_stays() {
    use Fault::*;
    let mut p = pipeline();
    let mut s = p.session().unwrap();
    let mut src = Faulty::new(&[Pass, Stall, Pass, Pass, End]);
    let mut got = 0;
    while jetvlm_app::next_frame(&mut s, &mut src, TIMEOUT, URI)
        .unwrap()
        .is_some()
    {
        got += 1;
    }
    assert_eq!(got, 3);
    assert_eq!(
        s.frames().iter().map(|f| f.index).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let a = s.ask("what is in the picture?").unwrap().finish().unwrap();
    assert_eq!(a.stats.frames, 2);
    assert!(
        jetvlm_app::next_frame(&mut s, &mut src, TIMEOUT, URI)
            .unwrap()
            .is_none()
    );
    assert_eq!(src.captures, 6);
}

/// A camera error reaches a session as `RuntimeError::Camera` naming the source, with the
/// camera's error kept as the source (what the loop above reports).
#[test]
fn a_capture_error_names_the_source() {
    let mut p = pipeline();
    let mut s = p.session().unwrap();
    let mut src = Faulty::new(&[Fault::Error]);
    match s.capture_from(&mut src, TIMEOUT) {
        Err(RuntimeError::Camera {
            source_name,
            source,
        }) => {
            assert_eq!(source_name, URI);
            assert!(
                source.to_string().contains("injected I/O error"),
                "{source}"
            );
        }
        other => panic!("expected a camera error, got {other:?}"),
    }
    // The session is intact: the next frame goes in.
    assert!(matches!(
        s.capture_from(&mut src, TIMEOUT).unwrap(),
        jetvlm_runtime::SessionCapture::Frame(_)
    ));
    assert_eq!(s.frames().len(), 1);
}

/// ONNX Runtime is loaded once per process, so each library case runs in a child process:
/// this test binary again, running only [`load_pipeline_in_child`] with `ORT_DYLIB_PATH` set.
fn load_with_library(lib: &Path) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "load_pipeline_in_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ORT_DYLIB_PATH", lib)
        .env("JETVLM_FAULT_CHILD", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Loads the fixture pipeline and prints `LOAD ERROR: <error line>` (only as a child of
/// [`a_missing_or_broken_onnx_runtime_is_one_error_naming_the_library_and_the_fix`]).
#[test]
fn load_pipeline_in_child() {
    if std::env::var_os("JETVLM_FAULT_CHILD").is_none() {
        return;
    }
    match Pipeline::load(&fixture(), RuntimeConfig::default()) {
        Ok(_) => println!("LOADED"),
        Err(e) => println!("LOAD ERROR: {}", jetvlm_core::error_line(&e)),
    }
}

#[test]
fn a_missing_or_broken_onnx_runtime_is_one_error_naming_the_library_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing/libonnxruntime.so");
    let corrupt = dir.path().join("libonnxruntime.so");
    std::fs::write(&corrupt, b"\x7fELF this is not a shared library").unwrap();
    // A real shared library that is not ONNX Runtime (no OrtGetApiBase).
    let not_ort = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/aarch64-linux-gnu/libz.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    let mut cases = vec![missing, corrupt];
    cases.extend(not_ort);
    for lib in cases {
        let started = Instant::now();
        let (ok, text) = load_with_library(&lib);
        assert!(started.elapsed() < Duration::from_secs(60));
        assert!(
            ok,
            "{}: the child failed (a panic?):\n{text}",
            lib.display()
        );
        let line = text
            .lines()
            .find_map(|l| l.split_once("LOAD ERROR: ").map(|(_, e)| e))
            .unwrap_or_else(|| panic!("{}: no load error:\n{text}", lib.display()));
        assert!(
            line.contains(&lib.display().to_string())
                && line.contains("ORT_DYLIB_PATH")
                && line.contains(".ci/setup"),
            "{}: {line}",
            lib.display()
        );
        assert!(!text.contains("panicked"), "{text}");
    }
}
