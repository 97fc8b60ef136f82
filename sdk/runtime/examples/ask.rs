//! What an SDK user does with jetvlm: plan memory for a board, load a model package, ask a
//! question about a camera frame with the answer streamed token by token, and keep a rolling
//! window of frames in a streaming session.
//!
//! ```sh
//! cargo run -p jetvlm-runtime --example ask            # the bundled demo model
//! cargo run -p jetvlm-runtime --example ask -- DIR     # another model package
//! ```
//!
//! The frames come from the synthetic camera (`synthetic://scene`), so no camera is needed;
//! any source URI works the same way (`v4l2:///dev/video0`, `dir://frames/`, `file://a.png`).

use jetvlm_board::{BoardRegistry, KvPrecision, ModelSpec, PlanOptions, Workload};
use jetvlm_camera::{Capture, Frame, FrameSource};
use jetvlm_kvcache::KvPolicy;
use jetvlm_runtime::{Pipeline, RuntimeConfig, Stats};
use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const QUESTION: &str = "how many objects are there?";

fn main() -> Result<(), Box<dyn Error>> {
    // The package: the first argument, else the bundled demo model.
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo"),
    };
    let dir = dir.canonicalize().unwrap_or(dir);

    plan(&dir)?;

    // Load and validate the package: vision encoder, decoder, tokenizer, KV cache.
    let mut pipeline = Pipeline::load(&dir, RuntimeConfig::default())?;
    println!(
        "loaded {}: KV {}, encoder on {}, decoder on {}",
        dir.display(),
        pipeline.kv_policy(),
        pipeline.execution_provider(),
        pipeline.decoder_device()
    );

    // Frames from a camera source, addressed by URI (`pace=0`: no waiting between frames).
    let mut camera = jetvlm_camera::open("synthetic://scene?seed=3&pace=0")?;
    let frame = next_frame(camera.as_mut())?;
    let truth = camera
        .ground_truth()
        .and_then(|t| jetvlm_camera::qa::single_frame_answer(QUESTION, t));

    // One question about one frame: the answer streams token by token, then its stats.
    print!("\nQ: {QUESTION}\nA: ");
    let mut stream = pipeline.ask(std::slice::from_ref(&frame), QUESTION)?;
    for token in stream.by_ref() {
        print!("{}", token?.text);
        std::io::stdout().flush()?;
    }
    let stats = stream.stats();
    drop(stream);
    println!("  (the scene's truth: {})", truth.as_deref().unwrap_or("-"));
    print_stats(&stats);

    // A streaming session: the last `window_frames` frames stay in the KV cache (oldest
    // evicted) and each question is asked against them without re-encoding. The synthetic
    // camera knows the true answer for its latest frame.
    let mut session = pipeline.session()?;
    for _ in 0..6 {
        let frame = next_frame(camera.as_mut())?;
        session.push_frame(&frame)?;
        let answer = session.ask(QUESTION)?.finish()?;
        let truth = camera
            .ground_truth()
            .and_then(|t| jetvlm_camera::qa::single_frame_answer(QUESTION, t))
            .unwrap_or_else(|| "-".into());
        println!(
            "frame {:>2}: cached {} frames ({:>2} tokens), answer {} (truth {}), TTFT {:.1} ms, KV {} B",
            frame.index,
            session.frames().len(),
            session.cached_tokens(),
            answer.text.trim(),
            truth,
            answer.stats.ttft_ms,
            answer.stats.kv.total_bytes
        );
    }
    Ok(())
}

/// Will the model and a 16-frame context fit on an Orin Nano 8GB? Planned from the config
/// alone, before any weight is loaded.
fn plan(dir: &Path) -> Result<(), Box<dyn Error>> {
    let board = BoardRegistry::bundled().resolve("orin-nano-8gb")?;
    let model = ModelSpec::load(dir)?;
    let policy: KvPolicy = model.default_kv.as_deref().unwrap_or("mixed").parse()?;
    let workload = Workload {
        frames: 16,
        tokens_per_frame: model
            .tokens_per_frame
            .ok_or("the model reports no frame size")?,
        prompt_tokens: 64,
        answer_tokens: 128,
    };
    let plan = jetvlm_board::plan::plan(
        &board,
        &model,
        &workload,
        &KvPrecision::from(policy),
        &PlanOptions::default(),
    )?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "plan on {}: {} frames, KV {} -> {:.1} MiB of {:.1} MiB ({}); up to {} frames fit, TPOT floor {:.2} ms",
        plan.board_display,
        workload.frames,
        plan.kv_policy,
        mib(plan.total_bytes),
        mib(plan.budget_bytes),
        if plan.fits { "fits" } else { "does not fit" },
        plan.max_frames_mixed,
        plan.tpot_floor_ms
    );
    Ok(())
}

/// The next frame of a source; end of stream is a status of the capture, not an error.
fn next_frame(source: &mut dyn FrameSource) -> Result<Frame, Box<dyn Error>> {
    loop {
        match source.capture(Duration::from_secs(1))? {
            Capture::Frame(frame) => return Ok(frame),
            Capture::Timeout => continue,
            Capture::EndOfStream => return Err(format!("{} ended", source.describe()).into()),
        }
    }
}

fn print_stats(s: &Stats) {
    println!(
        "{} prompt tokens ({} frame), {} generated: encoder {:.1} ms, prefill {:.1} ms, \
         TTFT {:.1} ms, TPOT {:.2} ms",
        s.prompt_tokens, s.frames, s.tokens, s.encoder_ms, s.prefill_ms, s.ttft_ms, s.tpot_ms
    );
    println!(
        "KV {}: {} B for {} text + {} frame tokens ({} B all-FP16); encoder on {}, decoder on {}",
        s.kv_policy,
        s.kv.total_bytes,
        s.kv.text_tokens,
        s.kv.frame_tokens,
        s.kv.fp16_equivalent_bytes,
        s.execution_provider,
        s.decoder_device
    );
}
