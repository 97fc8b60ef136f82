//! `jetvlm serve` on the demo model and a synthetic camera, driven by the official `openai`
//! Python client (apps/serve/tests/openai_client.py): a `data:` image answer equal to
//! `jetvlm ask` on the same image, a streamed answer whose chunks join to the same text,
//! `camera://latest` answers against the synthetic scene's ground truth, `camera://window`
//! questions that cost only their own tokens, per-request sampling (temperature 0 is greedy,
//! a seed repeats its answer, out-of-range values are 400s), usage counts, 401/413/429/400 with OpenAI error
//! bodies, the metrics that saw all of it, and a SIGTERM that exits 0.

mod common;

use common::{Server, jetvlm, python, root, run_with_timeout};
use jetvlm_camera::Capture;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const KEY: &str = "test-key-7f3a";
const SOURCE: &str = "synthetic://scene?seed=3";
const QUESTION: &str = "how many objects are there?";

/// Single-frame questions in the dataset's wording (apps' ground truth answers them).
const QUESTIONS: [&str; 16] = [
    "how many objects are there?",
    "how many red objects are there?",
    "how many blue objects are there?",
    "how many green objects are there?",
    "how many circles are there?",
    "how many squares are there?",
    "how many triangles are there?",
    "is there a red circle?",
    "is there a blue square?",
    "is there a green triangle?",
    "is there a yellow circle?",
    "what shape is the red object?",
    "what shape is the blue object?",
    "what shape is the green object?",
    "how many objects are there?",
    "how many yellow objects are there?",
];

fn write_png(path: &Path, w: u32, h: u32, rgb: Vec<u8>) {
    image::RgbImage::from_raw(w, h, rgb)
        .unwrap()
        .save(path)
        .unwrap();
}

/// Ground truth of frames `0..=last` of `uri` (unpaced), by index.
fn truths(uri: &str, last: u64) -> Vec<jetvlm_camera::scene::FrameTruth> {
    let mut src = jetvlm_camera::open(uri).unwrap();
    let mut out = Vec::new();
    for _ in 0..=last {
        match src.capture(Duration::from_secs(1)).unwrap() {
            Capture::Frame(_) => out.push(src.ground_truth().unwrap().clone()),
            other => panic!("the synthetic source gave {other:?}"),
        }
    }
    out
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn openai_client_against_jetvlm_serve() {
    let dir = tempfile::tempdir().unwrap();
    // A frame of another synthetic scene as the data: image.
    let mut scene = jetvlm_camera::open("synthetic://scene?seed=11&pace=0").unwrap();
    let mut frame = None;
    for _ in 0..6 {
        if let Capture::Frame(f) = scene.capture(Duration::from_secs(1)).unwrap() {
            frame = Some(f);
        }
    }
    let frame = frame.unwrap();
    let image = dir.path().join("scene.png");
    write_png(&image, frame.width, frame.height, frame.rgb.clone());
    // Noise does not compress: a PNG over the server's --max-image-bytes.
    let big = dir.path().join("big.png");
    let mut x = 12345u32;
    let noise: Vec<u8> = (0..400 * 400 * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    write_png(&big, 400, 400, noise);
    assert!(std::fs::metadata(&big).unwrap().len() > 200_000);
    let questions = dir.path().join("questions.txt");
    std::fs::write(&questions, QUESTIONS.join("\n")).unwrap();

    let server = Server::start(&[
        "--source",
        SOURCE,
        "--api-key",
        KEY,
        "--queue",
        "1",
        "--max-image-bytes",
        "200000",
    ]);
    let out = dir.path().join("client.json");
    let (status, stdout, stderr) = run_with_timeout(
        Command::new(python())
            .arg(root().join("apps/serve/tests/openai_client.py"))
            .args(["--base-url", &server.base_url(), "--api-key", KEY])
            .arg("--image")
            .arg(&image)
            .arg("--big-image")
            .arg(&big)
            .args(["--question", QUESTION])
            .arg("--questions")
            .arg(&questions)
            .arg("--out")
            .arg(&out),
        Duration::from_secs(300),
    );
    assert!(
        status.success(),
        "openai_client.py failed:\n{stdout}\n{stderr}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    // `jetvlm ask` on the same image, greedy, as the server runs.
    let (st, ask_out, ask_err) = run_with_timeout(
        Command::new(jetvlm())
            .current_dir(root())
            .args(["ask", "--json", "--model"])
            .arg(common::demo_model())
            .arg("--image")
            .arg(&image)
            .arg(QUESTION),
        Duration::from_secs(120),
    );
    assert!(st.success(), "jetvlm ask failed: {ask_err}");
    let ask: Value = serde_json::from_str(&ask_out).unwrap();
    let data = &r["data_answer"];
    assert_eq!(data["text"], ask["text"], "data: answer vs jetvlm ask");
    assert!(!ask["text"].as_str().unwrap().trim().is_empty());
    assert_eq!(
        r["stream_answer"]["text"], ask["text"],
        "streamed chunks joined"
    );
    // Usage: the prompt (text and frame tokens) and the generated tokens `ask` counted.
    assert_eq!(data["prompt_tokens"], ask["prompt_tokens"]);
    let generated = ask["token_ids"].as_array().unwrap().len() as u64;
    assert_eq!(data["completion_tokens"].as_u64(), Some(generated));
    assert_eq!(
        data["total_tokens"].as_u64(),
        Some(ask["prompt_tokens"].as_u64().unwrap() + generated)
    );
    assert_eq!(data["cached_tokens"], 0);
    assert_eq!(r["stream_answer"]["prompt_tokens"], ask["prompt_tokens"]);
    assert_eq!(
        r["stream_answer"]["completion_tokens"].as_u64(),
        Some(generated)
    );
    assert!(r["stream_answer"]["chunks"].as_u64().unwrap() >= 3);

    // Per-request sampling: temperature 0 is the greedy answer, a seed at temperature 1
    // repeats its answer, and the configured (greedy) sampling is back for the next request.
    let s = &r["sampling"];
    assert_eq!(s["t0"], ask["text"], "temperature 0 vs greedy");
    assert_eq!(s["seed7"][0], s["seed7"][1], "same seed, same answer");
    assert_eq!(
        s["after"], ask["text"],
        "greedy again after sampled requests"
    );
    // Temperature 2 on a question the model is unsure of: each seed repeats its answer,
    // and the seeds do not all agree (the request's seed and temperature reach the sampler).
    let mut by_seed = std::collections::BTreeSet::new();
    for (seed, pair) in s["by_seed"].as_array().unwrap().iter().enumerate() {
        assert_eq!(pair[0], pair[1], "seed {seed} at temperature 2");
        by_seed.insert(pair[0].as_str().unwrap().to_string());
    }
    assert!(
        by_seed.len() >= 2,
        "temperature 2, seeds 0..8 all gave {by_seed:?}"
    );
    // The request after a sampled answer other than the greedy one is greedy again.
    assert_ne!(s["unsure_other"], s["unsure_greedy"], "{s}");
    assert_eq!(
        s["unsure_after"], s["unsure_greedy"],
        "greedy after a sampled answer"
    );
    for (name, param) in [
        ("temperature_3", "temperature"),
        ("temperature_neg", "temperature"),
        ("top_p_0", "top_p"),
        ("seed_float", "seed"),
    ] {
        assert_eq!(s["400"][name]["param"], param, "{name}");
        assert_eq!(s["400"][name]["code"], "invalid_value", "{name}");
    }

    // camera://latest against the scene's ground truth, frame by frame.
    let latest = r["latest"].as_array().unwrap();
    let last = latest
        .iter()
        .map(|a| a["frame"].as_u64().unwrap())
        .max()
        .unwrap();
    let truth = truths(&format!("{SOURCE}&pace=0"), last);
    let (mut asked, mut right) = (0, 0);
    let mut wrong = Vec::new();
    for a in latest {
        let (q, frame) = (
            a["question"].as_str().unwrap(),
            a["frame"].as_u64().unwrap(),
        );
        assert_eq!(a["cached_tokens"], 0, "{a}");
        let Some(t) = jetvlm_camera::qa::single_frame_answer(q, &truth[frame as usize]) else {
            continue;
        };
        asked += 1;
        if a["answer"].as_str().unwrap().trim() == t {
            right += 1;
        } else {
            wrong.push(format!("{q} (frame {frame}): {} vs truth {t}", a["answer"]));
        }
    }
    let frames: std::collections::BTreeSet<u64> = latest
        .iter()
        .map(|a| a["frame"].as_u64().unwrap())
        .collect();
    assert!(
        frames.len() > 1,
        "every answer was about one frame: {frames:?}"
    );
    // The demo model answers single-frame questions at 98-100% on held-out clips.
    assert!(
        asked >= 8,
        "only {asked} questions had an unambiguous answer"
    );
    assert!(
        right as f64 >= 0.85 * asked as f64,
        "{right}/{asked} camera://latest answers match the ground truth: {wrong:?}"
    );
    eprintln!("camera://latest: {right}/{asked} answers match the scene's ground truth");

    // camera://window: the window's frames (and the prefix) were cached; only the
    // question's own tokens were new.
    for w in r["window"].as_array().unwrap() {
        let frames = w["frames"].as_array().unwrap().len() as u64;
        assert!((1..=4).contains(&frames), "{w}");
        let (prompt, cached) = (
            w["prompt_tokens"].as_u64().unwrap(),
            w["cached_tokens"].as_u64().unwrap(),
        );
        assert!(cached >= frames * 16, "{w}");
        assert!(prompt > cached && prompt - cached < 32, "{w}");
    }

    // Error bodies name their field.
    assert_eq!(r["400"]["bad_json"]["code"], "invalid_json");
    assert_eq!(r["400"]["unknown_model"]["code"], "model_not_found");
    assert_eq!(r["400"]["bad_image_data"]["code"], "invalid_image");
    assert_eq!(r["400"]["file_url"]["code"], "invalid_image_url");
    assert_eq!(r["401"]["type"], "authentication_error");
    assert_eq!(r["413"]["code"], "request_too_large");
    assert!(r["429"]["rejected"].as_u64().unwrap() >= 1);

    // The metrics saw every kind of response.
    let m = r["metrics"].as_str().unwrap();
    let mut by_status = BTreeMap::new();
    for s in [200, 400, 401, 413, 429] {
        let v = metric(m, &format!("jetvlm_requests_total{{status=\"{s}\"}}"));
        by_status.insert(s, v);
        assert!(v.is_some_and(|v| v >= 1.0), "no {s} in the metrics:\n{m}");
    }
    assert_eq!(
        by_status[&429],
        r["429"]["rejected"].as_f64(),
        "429s counted"
    );
    assert!(metric(m, "jetvlm_ttft_seconds_count").unwrap() >= 20.0);
    assert!(metric(m, "jetvlm_frames_captured_total").unwrap() >= 1.0);
    assert!(metric(m, "jetvlm_frames_windowed_total").unwrap() >= 1.0);
    assert!(metric(m, "jetvlm_kv_fp16_equivalent_bytes").unwrap() > 0.0);
    assert!(m.contains("jetvlm_model_info{model=\"jetvlm-demo-scenes\""));
    assert!(m.contains("encoder_provider=\"cpu\""));

    // SIGTERM: a clean stop.
    let status = server.stop();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

#[test]
fn bad_flags_are_one_line_errors_naming_the_flag() {
    for (args, needle) in [
        (&["--queue", "0"][..], "--queue"),
        (&["--request-timeout", "0"][..], "--request-timeout"),
        (&["--window", "0"][..], "--window"),
        (&["--source", "nosuch://x"][..], "nosuch://x"),
        (
            &["--model", "/nonexistent-package"][..],
            "/nonexistent-package",
        ),
    ] {
        let (st, _, err) = run_with_timeout(
            Command::new(jetvlm())
                .current_dir(root())
                .args(["serve", "--port", "0"])
                .args(args),
            Duration::from_secs(60),
        );
        assert!(!st.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn health_models_and_errors_over_raw_http_without_a_camera() {
    let server = Server::start(&["--max-image-bytes", "1000"]);
    let (s, _, body) = server.request("GET", "/health", &[], b"");
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "ok");
    // No --source: camera references are a 400 naming what is missing.
    let req = serde_json::json!({"model": "jetvlm-demo-scenes", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "camera://latest"}},
        {"type": "text", "text": QUESTION}]}]});
    let (s, _, body) = server.request(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        req.to_string().as_bytes(),
    );
    assert_eq!(s, 400);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "no_camera", "{v}");
    // A body over the request limit (4 images of 1000 bytes in base64 and 1 MiB): 413 from
    // its Content-Length, before any of it is read.
    let (s, _, body) = server.request(
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "3000000"),
        ],
        b"",
    );
    assert_eq!(s, 413);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    // Text-only question.
    let req = serde_json::json!({"model": "jetvlm-demo-scenes", "max_tokens": 1,
        "messages": [{"role": "user", "content": QUESTION}]});
    let (s, _, body) = server.request(
        "POST",
        "/v1/chat/completions",
        &[],
        req.to_string().as_bytes(),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    // Unknown paths are OpenAI-style 404s; the web view is served.
    let (s, _, _) = server.request("GET", "/v1/nothing", &[], b"");
    assert_eq!(s, 404);
    let (s, _, body) = server.request("GET", "/", &[], b"");
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("<canvas id=\"latency\""));
    assert_eq!(server.stop().code(), Some(0));
}

#[test]
fn a_client_that_leaves_while_queued_cancels_its_request() {
    use base64::Engine;
    let server = std::sync::Arc::new(Server::start(&["--queue", "16"]));
    // Requests of 4 images each keep the model busy for a while.
    let mut scene = jetvlm_camera::open("synthetic://scene?seed=5&pace=0").unwrap();
    let Capture::Frame(f) = scene.capture(Duration::from_secs(1)).unwrap() else {
        panic!("no frame")
    };
    let mut png = Vec::new();
    image::RgbImage::from_raw(f.width, f.height, f.rgb)
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let part = serde_json::json!({"type": "image_url", "image_url": {"url": uri}});
    let body = serde_json::json!({"model": "jetvlm-demo-scenes", "messages": [{"role": "user",
        "content": [part, part, part, part, {"type": "text", "text": QUESTION}]}]})
    .to_string();
    let busy: Vec<_> = (0..8)
        .map(|_| {
            let (server, body) = (server.clone(), body.clone());
            std::thread::spawn(move || {
                server
                    .request("POST", "/v1/chat/completions", &[], body.as_bytes())
                    .0
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    // A client that sends its request and goes away before the model reaches it.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    for t in busy {
        assert_eq!(t.join().unwrap(), 200);
    }
    // The left request is counted when the worker reaches it, which may be just after the
    // busy ones are answered: poll the metrics for up to 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let (_, _, m) = server.request("GET", "/metrics", &[], b"");
        let m = String::from_utf8(m).unwrap();
        let counted = metric(&m, "jetvlm_generations_total{outcome=\"cancelled\"}").is_some();
        if counted || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let cancelled = metric(&m, "jetvlm_generations_total{outcome=\"cancelled\"}");
    assert_eq!(cancelled, Some(1.0), "{m}");
    assert_eq!(
        metric(&m, "jetvlm_generations_total{outcome=\"stop\"}"),
        Some(8.0)
    );
    let server = std::sync::Arc::try_unwrap(server).ok().unwrap();
    assert_eq!(server.stop().code(), Some(0));
}
