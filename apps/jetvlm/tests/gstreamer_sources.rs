//! GStreamer sources end to end (feature `gstreamer`), against real components the tests
//! start: an H.264 clip of synthetic scenes (rendered here with its per-frame ground truth,
//! encoded by tests/fixtures/make_clip.py) served by an RTSP server on 127.0.0.1
//! (tests/fixtures/rtsp_server.py, GStreamer's RTSP server library), `jetvlm watch` on it with
//! the demo model, the server killed and restarted mid-run, the MP4 file itself, `gst://`
//! pipelines, and bad input. Every process and wait has a timeout.
//!
//! Needs Debian's python3-gi, gir1.2-gst-rtsp-server-1.0 and the GStreamer plugin packages
//! (.ci/setup installs them).

#![cfg(feature = "gstreamer")]

#[path = "../../../tests/support/rtsp.rs"]
mod rtsp_support;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use jetvlm_camera::{CameraError, Capture, FrameSource, SourceEvent};
use rtsp_support::{Clip, Server, free_port, wait_output};
use serde_json::Value;

const FPS: u64 = 10;
const FRAMES: usize = 80;
const QUESTION: &str = "how many objects are there?";
/// The RTSP and MP4 answer rates may fall this far (in percentage points) below the PNG rate.
const MARGIN_PCT: f64 = 5.0;

/// The clip of the scene with `seed`: `FRAMES` frames at `FPS`, truth for `QUESTION`.
fn make_clip(seed: u64) -> Clip {
    rtsp_support::make_clip(seed, FRAMES, FPS, QUESTION)
}

fn jetvlm(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_jetvlm"));
    c.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `watch --json` started in the background; its JSON lines arrive on a channel.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Watch {
    fn start(args: &[&str]) -> Self {
        let mut child = jetvlm(args).spawn().expect("start jetvlm watch");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Watch {
            child,
            lines: rx,
            stderr,
        }
    }

    /// The next line before `deadline`.
    fn next(&self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
    }

    /// Every remaining line, the exit status and stderr; kills the run past `limit`.
    fn finish(mut self, limit: Duration) -> (Vec<Value>, bool, String) {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    lines.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("watch did not finish within {limit:?}; got {lines:?}");
                }
            }
        }
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        let stderr = self.stderr.join().unwrap_or_default();
        (lines, ok, stderr)
    }
}

/// Runs `watch --json` to the end.
fn watch(args: &[&str], limit: Duration) -> (Vec<Value>, String) {
    let (lines, ok, stderr) = Watch::start(args).finish(limit);
    assert!(ok, "watch {args:?} failed: {stderr}");
    (lines, stderr)
}

fn is_frame(l: &Value) -> bool {
    l.get("answer").is_some()
}

/// Answers judged against the clip's truth: (right, judged), with the clip frame of each
/// answer given by `frame_of`.
fn score(lines: &[Value], truth: &[String], frame_of: impl Fn(&Value) -> usize) -> (usize, usize) {
    let (mut right, mut judged) = (0, 0);
    for l in lines.iter().filter(|l| is_frame(l)) {
        let i = frame_of(l);
        assert!(i < truth.len(), "frame {i} is past the clip: {l}");
        judged += 1;
        right += usize::from(l["answer"].as_str() == Some(truth[i].as_str()));
    }
    (right, judged)
}

fn pct(right: usize, judged: usize) -> f64 {
    100.0 * right as f64 / judged.max(1) as f64
}

/// The clip frame an RTSP answer was about, from the stream's own timestamp (the RTP times the
/// server derived from the clip's PTS); the timestamp must sit on the clip's frame grid.
fn frame_from_timestamp(l: &Value) -> usize {
    let ms = l["timestamp_ms"].as_f64().expect("timestamp_ms");
    let exact = ms * FPS as f64 / 1000.0;
    let frame = exact.round();
    assert!(
        (exact - frame).abs() < 0.05,
        "timestamp {ms} ms is not on the {FPS} fps frame grid: {l}"
    );
    frame as usize
}

#[test]
fn rtsp_and_mp4_answers_match_the_clip_truth_at_the_png_rate() {
    let clip = make_clip(11);
    let limit = Duration::from_secs(120);

    // 1. The PNG frames themselves.
    let dir = format!("dir://{}?fps={FPS}", clip.frames.display());
    let n = FRAMES.to_string();
    let (png, _) = watch(&["watch", &dir, "--frames", &n, "--json"], limit);
    let (png_right, png_judged) = score(&png, &clip.truth, |l| {
        l["frame"].as_u64().unwrap_or(u64::MAX) as usize
    });
    assert_eq!(png_judged, FRAMES);

    // 2. The MP4 file: every frame, at its own timestamp.
    let mp4 = format!("file://{}", clip.mp4.display());
    let (mp4_lines, _) = watch(&["watch", &mp4, "--frames", "0", "--json"], limit);
    let (mp4_right, mp4_judged) = score(&mp4_lines, &clip.truth, frame_from_timestamp);
    assert_eq!(mp4_judged, FRAMES, "the file gives every frame");

    // 3. The clip over RTSP (with Basic authentication: the credentials travel in the URI
    //    and never appear in the output). A live source: frames the model is too slow for
    //    are dropped, so each answer is judged on the frame its timestamp names.
    let port = free_port();
    let _server = Server::start(port, &clip.mp4, Some(("viewer", "s3cret-pw")));
    let rtsp = format!("rtsp://viewer:s3cret-pw@127.0.0.1:{port}/clip?transport=tcp");
    let watch_frames = (FRAMES * 3 / 4).to_string();
    let (rtsp_lines, stderr) = watch(
        &["watch", &rtsp, "--frames", &watch_frames, "--json"],
        limit,
    );
    let all = format!("{rtsp_lines:?}{stderr}");
    assert!(!all.contains("s3cret"), "credentials leaked: {all}");
    // Only the first pass over the clip (before any event) maps timestamps to clip frames.
    let first_pass: Vec<Value> = rtsp_lines
        .iter()
        .take_while(|l| l.get("event").is_none())
        .cloned()
        .collect();
    // The source's timestamps count from the first frame the client received: when the
    // server's first frames went out before the client was playing, every timestamp is early
    // by the frames it missed. Each answer is judged at one shift for the whole run (0 to 4
    // missed leading frames), the one that agrees best; a wrong model fails at every shift.
    let (rtsp_right, rtsp_judged, shift) = (0..=4usize)
        .map(|shift| {
            let lines: Vec<Value> = first_pass
                .iter()
                .filter(|l| !is_frame(l) || frame_from_timestamp(l) + shift < clip.truth.len())
                .cloned()
                .collect();
            let (right, judged) = score(&lines, &clip.truth, |l| frame_from_timestamp(l) + shift);
            (right, judged, shift)
        })
        .max_by_key(|&(right, judged, shift)| (right * 1000 / judged.max(1), usize::MAX - shift))
        .unwrap_or((0, 0, 0));
    eprintln!("RTSP timestamps judged with {shift} missed leading frame(s)");
    assert!(
        rtsp_judged >= FRAMES / 2,
        "only {rtsp_judged} RTSP frames judged"
    );

    let (png_pct, mp4_pct, rtsp_pct) = (
        pct(png_right, png_judged),
        pct(mp4_right, mp4_judged),
        pct(rtsp_right, rtsp_judged),
    );
    eprintln!(
        "answers matching the clip's truth: PNG {png_right}/{png_judged} ({png_pct:.1}%), \
         MP4 {mp4_right}/{mp4_judged} ({mp4_pct:.1}%), RTSP {rtsp_right}/{rtsp_judged} ({rtsp_pct:.1}%)"
    );
    assert!(png_pct >= 80.0, "the demo model on PNGs: {png_pct:.1}%");
    assert!(
        mp4_pct >= png_pct - MARGIN_PCT,
        "MP4 {mp4_pct:.1}% vs PNG {png_pct:.1}%"
    );
    assert!(
        rtsp_pct >= png_pct - MARGIN_PCT,
        "RTSP {rtsp_pct:.1}% vs PNG {png_pct:.1}%"
    );
}

#[test]
fn rtsp_server_killed_and_restarted_mid_run_gives_lost_then_restored_and_the_run_goes_on() {
    let clip = make_clip(5);
    let port = free_port();
    let mut server = Server::start(port, &clip.mp4, None);
    let uri = format!(
        "rtsp://127.0.0.1:{port}/clip?transport=tcp&stall_ms=1500&backoff_ms=200&backoff_max_ms=1000&retries=30"
    );
    let run = Watch::start(&[
        "watch",
        &uri,
        "--frames",
        "40",
        "--json",
        "--timeout-ms",
        "1000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = Vec::new();
    while before.len() < 10 {
        let l = run
            .next(deadline)
            .unwrap_or_else(|| panic!("watch gave {} frames before the deadline", before.len()));
        assert!(is_frame(&l), "an event before the server went down: {l}");
        before.push(l);
    }
    server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let _server = Server::start(port, &clip.mp4, None);
    let (after, ok, stderr) = run.finish(Duration::from_secs(60));
    assert!(ok, "watch failed: {stderr}");
    let events: Vec<&Value> = after.iter().filter(|l| l.get("event").is_some()).collect();
    assert!(events.len() >= 2, "events: {events:?}");
    assert_eq!(events[0]["event"], "source_lost", "{events:?}");
    assert_eq!(events[1]["event"], "source_restored", "{events:?}");
    assert!(
        events[1]["attempts"].as_u64().unwrap_or(0) >= 1,
        "{events:?}"
    );
    // The outage lasted at least as long as the server was down.
    assert!(
        events[1]["outage_ms"].as_f64().unwrap_or(0.0) >= 1000.0,
        "{events:?}"
    );
    assert!(
        !events[0]["reason"].as_str().unwrap_or("").is_empty(),
        "{events:?}"
    );
    // The run went on: frames after the restore, up to the asked 40, time still increasing.
    let restored_at = after
        .iter()
        .position(|l| l["event"] == "source_restored")
        .expect("restored");
    let frames_after = after[restored_at..].iter().filter(|l| is_frame(l)).count();
    assert!(
        frames_after >= 10,
        "{frames_after} frames after the restore"
    );
    let summary = after.last().expect("summary");
    assert_eq!(summary["frames"].as_u64(), Some(40), "{summary}");
    assert_eq!(
        summary["source_lost"], summary["source_restored"],
        "{summary}"
    );
    let times: Vec<f64> = before
        .iter()
        .chain(after.iter())
        .filter(|l| is_frame(l))
        .map(|l| l["timestamp_ms"].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(times.windows(2).all(|w| w[1] > w[0]), "{times:?}");
}

#[test]
fn live_rtsp_source_reports_loss_and_fails_when_its_retries_run_out() {
    let clip = make_clip(3);
    let port = free_port();
    let mut server = Server::start(port, &clip.mp4, None);
    let uri = format!(
        "rtsp://127.0.0.1:{port}/clip?transport=tcp&retries=2&backoff_ms=100&stall_ms=1000"
    );
    let mut src = jetvlm_camera::open(&uri).expect("open");
    // Each frame's wall-clock capture time: in the past, and spaced like the stream's
    // timestamps (the sender's RTP times, here the clip's 10 fps).
    let mut times = Vec::new();
    for _ in 0..3 {
        let Capture::Frame(f) = src.capture(Duration::from_secs(5)).expect("capture") else {
            panic!("no frame");
        };
        let at = src.capture_time().expect("a live source's capture time");
        assert!(at <= SystemTime::now(), "a capture time in the future");
        times.push((f.timestamp, at));
    }
    for w in times.windows(2) {
        let (stream, wall) = (
            w[1].0 - w[0].0,
            w[1].1.duration_since(w[0].1).expect("increasing"),
        );
        let apart = stream.as_secs_f64() - wall.as_secs_f64();
        assert!(
            apart.abs() < 0.005,
            "{stream:?} in the stream, {wall:?} by the wall clock"
        );
    }
    server.kill();
    let start = Instant::now();
    let err = loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no error after the server went away"
        );
        match src.capture(Duration::from_millis(200)) {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, CameraError::SourceLost { attempts: 2, .. }),
        "{err}"
    );
    let events = src.take_events();
    assert!(
        matches!(events.as_slice(), [SourceEvent::Lost { .. }]),
        "{events:?}"
    );
}

/// Mean absolute difference of two RGB buffers, in 8-bit levels.
fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    sum as f64 / a.len() as f64
}

fn drain(src: &mut dyn FrameSource, max: usize) -> Vec<jetvlm_camera::Frame> {
    let mut frames = Vec::new();
    let start = Instant::now();
    while frames.len() < max {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "source did not end"
        );
        match src.capture(Duration::from_secs(5)).expect("capture") {
            Capture::Frame(f) => frames.push(f),
            Capture::EndOfStream => break,
            Capture::Timeout => panic!("a file source timed out"),
        }
    }
    frames
}

#[test]
fn mp4_file_gives_every_frame_subsamples_loops_and_scales() {
    let clip = make_clip(7);
    let path = clip.mp4.display().to_string();
    let period = Duration::from_millis(1000 / FPS);

    // Every frame, in order, at its timestamp, close to the PNG it was encoded from.
    let mut src = jetvlm_camera::open(&path).expect("open the MP4");
    assert!(src.describe().contains("decode"), "{}", src.describe());
    let frames = drain(src.as_mut(), usize::MAX);
    assert_eq!(frames.len(), FRAMES);
    assert_eq!(src.frame_size(), Some((128, 128)));
    assert_eq!(src.fps(), Some(FPS as f64));
    let mut worst = 0.0f64;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.index, f.timestamp), (i as u64, period * i as u32));
        worst = worst.max(mean_abs_diff(&f.rgb, &clip.rgb[i]));
    }
    eprintln!("MP4 frames vs their PNGs: worst mean absolute difference {worst:.2} levels");
    // H.264 at quantizer 12 with 4:2:0 chroma: a few levels on average, most at the edges.
    assert!(
        worst < 8.0,
        "decoded frames differ from the PNGs by {worst:.2} levels"
    );
    assert_eq!(
        src.capture(Duration::from_secs(1)).expect("after the end"),
        Capture::EndOfStream
    );

    // fps=5 keeps every other frame.
    let mut half = jetvlm_camera::open(&format!("file://{path}?fps=5")).expect("open fps=5");
    let kept = drain(half.as_mut(), usize::MAX);
    assert_eq!(kept.len(), FRAMES / 2);
    assert!(
        kept.iter()
            .enumerate()
            .all(|(i, f)| f.timestamp == period * 2 * i as u32)
    );

    // loop=1 starts over with time still increasing; the second pass shows the first frame.
    let mut looped = jetvlm_camera::open(&format!("{path}?loop=1")).expect("open loop=1");
    let frames = drain(looped.as_mut(), FRAMES + 3);
    assert_eq!(frames.len(), FRAMES + 3);
    assert!(frames.windows(2).all(|w| w[1].timestamp > w[0].timestamp));
    assert!(mean_abs_diff(&frames[FRAMES].rgb, &clip.rgb[0]) < 8.0);

    // width/height scale.
    let mut small = jetvlm_camera::open(&format!("{path}?width=64&height=48")).expect("scaled");
    match small.capture(Duration::from_secs(5)).expect("capture") {
        Capture::Frame(f) => assert_eq!((f.width, f.height, f.rgb.len()), (64, 48, 64 * 48 * 3)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gst_pipelines_pass_through_and_live_ones_give_the_newest_frame() {
    let red = "gst://videotestsrc num-buffers=6 pattern=red ! \
               video/x-raw,width=64,height=48,framerate=10/1 ! videoconvert ! appsink name=out";
    let mut src = jetvlm_camera::open(red).expect("open the pipeline");
    let frames = drain(src.as_mut(), usize::MAX);
    assert_eq!(frames.len(), 6);
    // A non-live pipeline (like a file) has no capture time of its own.
    assert_eq!(src.capture_time(), None);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.width, f.height), (64, 48));
        assert_eq!(f.timestamp, Duration::from_millis(100 * i as u64));
        let [r, g, b] = f.pixel(10, 10).expect("pixel");
        assert!(r > 240 && g < 16 && b < 16, "frame {i}: {:?}", (r, g, b));
    }

    // A live pipeline keeps only the newest frame: a consumer that comes back after a second
    // gets a frame from about then, not the one that was waiting.
    let live = "gst://videotestsrc is-live=true ! \
                video/x-raw,width=32,height=32,framerate=30/1 ! videoconvert ! appsink name=out";
    let mut src = jetvlm_camera::open(live).expect("open the live pipeline");
    std::thread::sleep(Duration::from_millis(1000));
    let Capture::Frame(f) = src.capture(Duration::from_secs(2)).expect("capture") else {
        panic!("no frame");
    };
    assert!(
        f.timestamp >= Duration::from_millis(800),
        "a stale frame: {:?}",
        f.timestamp
    );
    // Its wall-clock capture time is the live source's clock at the frame: a moment ago, not
    // when the waiting started.
    let age = SystemTime::now()
        .duration_since(src.capture_time().expect("a live source's capture time"))
        .expect("a capture time in the past");
    assert!(age < Duration::from_millis(200), "captured {age:?} ago");
    assert!(src.take_events().is_empty());
}

/// Runs `f` on a thread and fails the test if it has not returned within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

fn open_error(uri: &str) -> CameraError {
    let owned = uri.to_string();
    match within(Duration::from_secs(20), uri, move || {
        jetvlm_camera::open(&owned).map(|s| s.describe())
    }) {
        Ok(d) => panic!("{uri} opened as {d}"),
        Err(e) => e,
    }
}

#[test]
fn bad_input_is_one_clear_error_never_a_hang() {
    // Malformed URIs and unknown schemes.
    for (uri, expect) in [
        ("rtsp://", "empty path"),
        ("rtsp://cam:0/x", "port `0`"),
        ("rtsp://cam/x?transport=sctp", "transport=sctp"),
        ("rtsp://cam/x?stall_ms=5", "stall_ms=5"),
        ("rtmp://cam/x", "unsupported source scheme `rtmp`"),
        ("csi://left", "not a sensor number"),
        ("gst://videotestsrc ! fakesink", "must end in an appsink"),
        ("file://clip.mp4?speed=2", "unknown parameter `speed`"),
    ] {
        let e = open_error(uri).to_string();
        assert!(e.contains(expect), "{uri}: {e}");
    }

    // A missing element, by name.
    let e = open_error("gst://nosuchsrc ! videoconvert ! appsink name=out");
    assert!(
        matches!(&e, CameraError::GstElementMissing { element, .. } if element == "nosuchsrc"),
        "{e}"
    );
    if jetvlm_camera::gst::element_installed("nvarguscamerasrc") {
        eprintln!("nvarguscamerasrc is installed: csi:// is not a missing element here");
    } else {
        let e = open_error("csi://0");
        assert!(e.to_string().contains("nvarguscamerasrc"), "{e}");
    }

    // A codec without a decoder: the clip with its H.264 sample entry renamed.
    let clip = make_clip(2);
    let bytes = std::fs::read(&clip.mp4).expect("read clip");
    let patched: Vec<u8> = {
        let mut b = bytes.clone();
        let mut i = 0;
        while i + 4 <= b.len() {
            if &b[i..i + 4] == b"avc1" {
                b[i..i + 4].copy_from_slice(b"zzzz");
            }
            i += 1;
        }
        b
    };
    assert_ne!(bytes, patched);
    let unknown = clip.mp4.with_file_name("unknown-codec.mp4");
    std::fs::write(&unknown, patched).expect("write");
    let e = open_error(&unknown.display().to_string());
    assert!(
        matches!(&e, CameraError::NoDecoder { codec, .. } if codec.contains("zzzz")),
        "{e}"
    );
    // Through watch: one line on stderr naming the codec, a failure status, no panic.
    let child = jetvlm(&["watch", &unknown.display().to_string(), "--frames", "1"])
        .spawn()
        .expect("watch");
    let (ok, _, err) = wait_output(child, Duration::from_secs(60), "watch on an unknown codec");
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no GStreamer decoder for video/x-gst-fourcc-zzzz"),
        "{err}"
    );

    // Nothing listens on the port: an error naming the URI, quickly.
    let port = free_port();
    let start = Instant::now();
    let e = open_error(&format!(
        "rtsp://user:pw@127.0.0.1:{port}/cam?stall_ms=2000"
    ));
    let line = e.to_string();
    assert!(
        line.contains(&format!("rtsp://***@127.0.0.1:{port}/cam")),
        "{line}"
    );
    assert!(!line.contains(":pw@"), "{line}");
    eprintln!("refused connection: {line} ({:?})", start.elapsed());

    // A server that accepts the connection and never answers: given up after stall_ms.
    let silent = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = silent.local_addr().expect("addr").port();
    let start = Instant::now();
    let e = open_error(&format!("rtsp://127.0.0.1:{port}/cam?stall_ms=1500"));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    eprintln!("silent server: {e} ({:?})", start.elapsed());
    drop(silent);

    // The wrong password: the server's refusal, in one line.
    let port = free_port();
    let _server = Server::start(port, &clip.mp4, Some(("viewer", "right")));
    let e = open_error(&format!(
        "rtsp://viewer:wrong@127.0.0.1:{port}/clip?transport=tcp"
    ));
    let line = e.to_string();
    assert!(
        line.contains("Unauthorized") && !line.contains("wrong"),
        "{line}"
    );
}
