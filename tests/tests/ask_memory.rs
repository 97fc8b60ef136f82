//! Memory kept by questions over several frames: asking about 16 frames after asking about
//! one must not keep memory per extra frame. (Encoding a question's frames as one batch on
//! the CPU kept about 3 MB per frame of the demo encoder for the life of the process: ONNX
//! Runtime's per-shape memory patterns and arena, and the allocator, held the largest
//! batch's activations.) Measured as this process's resident set (/proc/self/statm).

use jetvlm_camera::{Capture, Frame};
use jetvlm_runtime::{Pipeline, RuntimeConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Resident set size in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

fn frames(n: usize) -> Vec<Frame> {
    let mut src = jetvlm_camera::open("synthetic://scene?seed=3&pace=0").unwrap();
    (0..n)
        .map(|_| match src.capture(Duration::from_secs(5)).unwrap() {
            Capture::Frame(f) => f,
            other => panic!("synthetic source: {other:?}"),
        })
        .collect()
}

/// Growth allowed from a one-frame question to a 16-frame one, in KiB: the 15 extra frames'
/// pixels, embeddings and KV (a few hundred KiB) and allocator noise; the batch encoding
/// kept about 45 MiB here.
const BOUND_KIB: u64 = 6 * 1024;

#[test]
fn more_frames_per_question_keep_no_memory_per_frame() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    let cfg = RuntimeConfig {
        max_new_tokens: 4,
        ..RuntimeConfig::default()
    };
    let mut p = Pipeline::load(&dir, cfg).unwrap();
    let fs = frames(16);
    // Warm up: the first questions size the cache and ONNX Runtime's buffers for one frame.
    for _ in 0..3 {
        p.ask(&fs[..1], "how many objects are there?")
            .unwrap()
            .finish()
            .unwrap();
    }
    let base = rss_kib();
    let mut after = Vec::new();
    for n in [2usize, 4, 8, 16, 16, 16] {
        let a = p
            .ask(&fs[..n], "how many objects are there?")
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(a.stats.frames, n);
        after.push((n, rss_kib()));
    }
    let grown = after.iter().map(|&(_, r)| r).max().unwrap() - base;
    eprintln!(
        "RSS after a 1-frame question {base} KiB; after n frames: {after:?}; grown {grown} KiB"
    );
    assert!(
        grown <= BOUND_KIB,
        "questions over 2-16 frames kept {grown} KiB more than one over 1 frame: {after:?}"
    );
}
