//! The live web view in headless Chromium: `jetvlm serve` with a synthetic camera and an
//! analytics rules file; the page (loaded with `?ask=...`) must show the live frame, the
//! standing question's answer, its own question's answer and the charts, checked in the DOM
//! after the page's script ran; a screenshot is saved under the test's output directory
//! (its path is printed).
//!
//! Skips with the reason only when no Chromium is installed (.ci/setup installs the Debian
//! package `chromium`).

mod common;

use common::{Server, run_with_timeout};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Headless Chromium with what it needs to run as root in a container and to stay off the
/// network (a fresh profile per run).
fn chrome(bin: &PathBuf, profile: &std::path::Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1000",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The opening tag of the element with `id` in `dom`.
fn tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

#[test]
fn live_view_in_headless_chromium() {
    let Some(bin) = chromium() else {
        eprintln!(
            "skipped: no chromium, chromium-browser or google-chrome on PATH (.ci/setup installs \
             the Debian package chromium)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "source: synthetic://scene?seed=3\nevery: 1\nrules:\n  - name: crowd\n    question: how many objects are there?\n    when: { at_least: 3 }\n",
    )
    .unwrap();
    let server = Server::start(&[
        "--source",
        "synthetic://scene?seed=3",
        "--rules",
        rules.to_str().unwrap(),
    ]);
    // Wait (30 s at most) for the standing question's first answer.
    let t0 = Instant::now();
    loop {
        let (s, _, body) = server.request("GET", "/api/status", &[], b"");
        assert_eq!(s, 200);
        let v: Value = serde_json::from_slice(&body).unwrap();
        if v["standing"][0]["answer"].is_string() && !v["history"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no standing answer: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = format!(
        "{}/?ask=how%20many%20objects%20are%20there%3F",
        server.base_url()
    );

    let profile = tempfile::tempdir().unwrap();
    let (st, dom, err) = run_with_timeout(
        chrome(&bin, profile.path()).arg("--dump-dom").arg(&url),
        Duration::from_secs(120),
    );
    assert!(st.success(), "chromium --dump-dom failed: {err}");
    // The live frame: a JPEG from /frame.jpg shown through a blob URL, with its index.
    let frame = tag(&dom, "frame");
    assert!(
        attr(frame, "src").is_some_and(|s| s.starts_with("blob:")),
        "{frame}"
    );
    assert!(
        attr(frame, "data-frame-index").is_some_and(|i| i.parse::<u64>().is_ok()),
        "{frame}"
    );
    // The page's own question was answered about the latest frame.
    let answer = tag(&dom, "answer");
    let text = attr(answer, "data-answer").unwrap_or_else(|| panic!("no answer: {answer}"));
    assert!(text.parse::<u32>().is_ok(), "a count: {answer}");
    assert!(attr(answer, "data-frames").is_some_and(|f| !f.is_empty()));
    // The standing question's latest answer.
    assert!(dom.contains("class=\"standing-answer\""), "{dom}");
    assert!(dom.contains("<td>crowd</td>"), "{dom}");
    // Both charts have points.
    for id in ["latency", "kv"] {
        let c = tag(&dom, id);
        let points: usize = attr(c, "data-points").unwrap_or("0").parse().unwrap();
        assert!(points >= 1, "chart #{id} has no points: {c}");
    }

    // The screenshot, kept as the test's output.
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-live-view");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("live-view.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let (st, _, err) = run_with_timeout(
        chrome(&bin, profile.path())
            .arg(format!("--screenshot={}", shot.display()))
            .arg(&url),
        Duration::from_secs(120),
    );
    assert!(st.success(), "chromium --screenshot failed: {err}");
    let img = image::open(&shot)
        .expect("the screenshot is an image")
        .to_rgb8();
    assert_eq!((img.width(), img.height()), (1280, 1000));
    // Not a blank page: many distinct colours (the frame, the charts, text).
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 50, "{} colours", colours.len());
    eprintln!("live view screenshot: {}", shot.display());
    assert_eq!(server.stop().code(), Some(0));
}
