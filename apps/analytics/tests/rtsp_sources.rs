//! Several RTSP cameras in one `jetvlm-analytics` process (feature `gstreamer`), against
//! RTSP servers the test starts on 127.0.0.1 (tests/fixtures/rtsp_server.py, GStreamer's RTSP
//! server library) serving H.264 clips of synthetic scenes (rendered here with their ground
//! truth, encoded by tests/fixtures/make_clip.py): two and four simultaneous RTSP sources
//! each answer at the rate (within `MARGIN_PCT`) that the same clip's PNG frames reach in a
//! single-source run (each RTSP answer judged on the clip frame its timestamp names, allowing
//! for clip frames the client missed at its start: `score_rtsp`). Every process and wait has a
//! timeout.

#![cfg(feature = "gstreamer")]

mod common;
#[path = "../../../tests/support/rtsp.rs"]
mod rtsp_support;

use common::{demo_model, free_port, run};
use rtsp_support::{Clip, Server, make_clip};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const FPS: u64 = 10;
/// Clip length: longer than any run below reads, so every judged frame is on the clip.
const FRAMES: usize = 150;
/// Frames each RTSP source answers (3 s of the clip at `FPS`).
const RTSP_FRAMES: usize = 30;
const QUESTION: &str = "how many objects are there?";
/// RTSP answer rates may fall this far (percentage points) below the PNG rate (the
/// stream is H.264, the PNGs are exact).
const MARGIN_PCT: f64 = 5.0;
/// Clip frames an RTSP client may miss at its start (see `score_rtsp`).
const MAX_SKIP: usize = 4;
const LIMIT: Duration = Duration::from_secs(180);

fn write_rules(dir: &Path, name: &str, sources: &[(String, String)]) -> String {
    let mut text = String::from("window: 2\nsources:\n");
    for (n, uri) in sources {
        text += &format!("  - {{name: {n}, uri: \"{uri}\"}}\n");
    }
    text += &format!("rules:\n  - {{name: count, question: \"{QUESTION}\", when: changes}}\n");
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The clip frame of an answer, from the stream's timestamp (on the clip's frame grid).
fn clip_frame(r: &Value) -> usize {
    let exact = r["timestamp_ms"].as_f64().unwrap() * FPS as f64 / 1000.0;
    assert!(
        (exact - exact.round()).abs() < 0.05,
        "off the frame grid: {r}"
    );
    exact.round() as usize
}

fn pct(right: usize, judged: usize) -> f64 {
    100.0 * right as f64 / judged.max(1) as f64
}

/// (right, judged) of one source's answers, each judged on clip frame `frame_of(r) + skip`.
fn score(
    records: &[Value],
    source: &str,
    truth: &[String],
    skip: usize,
    frame_of: impl Fn(&Value) -> usize,
) -> (usize, usize) {
    let mut n = (0, 0);
    for r in records
        .iter()
        .filter(|r| r["source"] == source && r["answer"].is_string())
    {
        let i = frame_of(r) + skip;
        assert!(i < truth.len(), "past the clip: {r}");
        n.1 += 1;
        n.0 += usize::from(r["answer"].as_str() == Some(truth[i].as_str()));
    }
    n
}

/// An RTSP source's timestamps count from the first frame its client received (sdk/camera's
/// gst.rs), and a client can miss the clip's first frame or two while the other sources open:
/// its answers are then about clip frame `timestamp frame + skip`. The skip (at most
/// `MAX_SKIP`, one for the whole run) is the one its answers agree with best; the accuracy at
/// that skip is the one judged. Returns (right, judged, skip).
fn score_rtsp(records: &[Value], source: &str, truth: &[String]) -> (usize, usize, usize) {
    (0..=MAX_SKIP)
        .map(|skip| {
            let (right, judged) = score(records, source, truth, skip, clip_frame);
            (right, judged, skip)
        })
        .max_by_key(|&(right, _, skip)| (right, std::cmp::Reverse(skip)))
        .unwrap_or((0, 0, 0))
}

/// A source's answers carry the wall-clock capture time of their frame: in the past, spaced
/// like the stream's own timestamps (the sender's RTP times); their latency runs from it and
/// includes the answer's own time to first token.
fn check_capture_times(records: &[Value], source: &str) {
    let answers: Vec<&Value> = records
        .iter()
        .filter(|r| r["source"] == source && r["answer"].is_string())
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3;
    for w in answers.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let captured =
            b["captured_unix_ms"].as_f64().unwrap() - a["captured_unix_ms"].as_f64().unwrap();
        let stream = b["timestamp_ms"].as_f64().unwrap() - a["timestamp_ms"].as_f64().unwrap();
        assert!(stream > 0.0, "{a} {b}");
        // Both clocks run at the sender's frame rate; they differ by the network's jitter.
        assert!(
            (captured - stream).abs() < 50.0,
            "capture {captured} ms vs stream {stream} ms apart: {a} {b}"
        );
    }
    for r in &answers {
        let captured = r["captured_unix_ms"].as_f64().unwrap();
        assert!(captured <= now_ms && captured > now_ms - 600_000.0, "{r}");
        let latency = r["latency_ms"].as_f64().unwrap();
        assert!(latency >= r["ttft_ms"].as_f64().unwrap(), "{r}");
    }
    let lat: Vec<f64> = answers
        .iter()
        .map(|r| r["latency_ms"].as_f64().unwrap())
        .collect();
    eprintln!(
        "{source}: capture-to-answer latency {:.0}-{:.0} ms over {} answers",
        lat.iter().copied().fold(f64::INFINITY, f64::min),
        lat.iter().copied().fold(0.0, f64::max),
        lat.len()
    );
}

fn rtsp(port: u16) -> String {
    format!(
        "rtsp://127.0.0.1:{port}/clip?transport=tcp&stall_ms=1500&backoff_ms=200&backoff_max_ms=1000&retries=30"
    )
}

#[test]
fn two_and_four_rtsp_sources_answer_at_their_png_rate() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model();
    let clips: Vec<Clip> = [3u64, 5, 7, 11]
        .iter()
        .map(|&s| make_clip(s, FRAMES, FPS, QUESTION))
        .collect();
    // Each clip's PNG frames alone: the rate to meet.
    let mut png = Vec::new();
    for (k, c) in clips.iter().enumerate() {
        let uri = format!("dir://{}?fps={FPS}", c.frames.display());
        let rules = write_rules(dir.path(), &format!("png{k}.yaml"), &[("cam".into(), uri)]);
        let all = FRAMES.to_string();
        let out = run(
            &[
                &rules,
                "--model",
                model.to_str().unwrap(),
                "--all",
                "--frames",
                &all,
            ],
            LIMIT,
        );
        assert!(out.ok, "{}", out.stderr);
        let (right, judged) = score(&out.records(), "cam", &c.truth, 0, |r| {
            r["frame"].as_u64().unwrap_or(u64::MAX) as usize
        });
        assert_eq!(judged, FRAMES);
        png.push(pct(right, judged));
    }
    for n in [2usize, 4] {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let _servers: Vec<Server> = ports
            .iter()
            .zip(&clips)
            .map(|(&p, c)| Server::start(p, &c.mp4, None))
            .collect();
        let sources: Vec<(String, String)> = ports
            .iter()
            .enumerate()
            .map(|(k, &p)| (format!("cam{k}"), rtsp(p)))
            .collect();
        let rules = write_rules(dir.path(), &format!("rtsp{n}.yaml"), &sources);
        let out = run(
            &[
                &rules,
                "--model",
                model.to_str().unwrap(),
                "--all",
                "--frames",
                &RTSP_FRAMES.to_string(),
                "--timeout-ms",
                "2000",
            ],
            LIMIT,
        );
        assert!(out.ok, "{}", out.stderr);
        let records = out.records();
        for k in 0..n {
            let name = format!("cam{k}");
            assert!(
                !records.iter().any(|r| r["source"] == name.as_str()
                    && r["event"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("source_"))),
                "{name}: {}",
                out.stdout
            );
            check_capture_times(&records, &name);
            let (right, judged, skip) = score_rtsp(&records, &name, &clips[k].truth);
            assert_eq!(judged, RTSP_FRAMES, "{name}");
            let rate = pct(right, judged);
            eprintln!(
                "{n} RTSP sources, {name}: {right}/{judged} ({rate:.1}%, first {skip} clip frames missed) vs PNG {:.1}%",
                png[k]
            );
            assert!(
                rate >= png[k] - MARGIN_PCT,
                "{name}: RTSP {rate:.1}% vs PNG {:.1}%",
                png[k]
            );
        }
    }
}
