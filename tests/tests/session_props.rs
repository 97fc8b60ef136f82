//! Property: any sequence of frames, questions, evictions and position re-bases on a
//! [`StreamSession`] answers exactly as a fresh prefill of what the session keeps.
//!
//! "What the session keeps" is the system prefix and the frames of its window, each cached
//! at the position and in the context it had when it was appended since the cache was last
//! cleared (a re-base clears it and prefills the prefix and the kept frames again). The
//! reference here rebuilds exactly that on a fresh cache of the same policy straight from the
//! decoder (`Model::forward` over the prefix and the frames' embeddings, `evict_frame` where
//! the window dropped a frame), then prefills the question and decodes greedily. It never
//! rolls anything back, so a question or answer left behind by the session, a wrong frame
//! evicted, a re-base at the wrong time or at the wrong positions all change the answer.
//!
//! Checked on every question of every sequence:
//! - the answer's token ids equal the reference's greedy tokens;
//! - the first answer token's logits ([`StreamSession::next_token_logits`]) equal the
//!   reference's within [`LOGIT_BOUND`] (the same kernels on the same cached values; only
//!   the order of blocks in the cache, and so of the attention sums, may differ);
//! - where no frame was evicted since the last clear (the session started or re-based), the
//!   reference equals `Pipeline::first_token_logits` on just the kept frames: the same
//!   prompt as a one-shot `ask`, laid out by the pipeline, not by this test.
//!
//! The sessions run the tiny random LLaVA fixture (tests/fixtures/vlm) under `fp16`,
//! `mixed:group=32` and `int8-frames`, with windows of 1 to 3 frames and position limits
//! from "re-base at every new frame" to "never re-base". Questions come in runs, several
//! between two frames, as the assistant asks them.
//!
//! The same property holds with the session's decoder on the simulated GPU (`device: sim`:
//! the CUDA backend's host logic, its device KV pools, block tables and re-prefills, with
//! each kernel's CPU twin), against the same CPU reference: the answer tokens are equal
//! (the first-token logits are read from the CPU decoder only, so that check is CPU-only).
//! The simulated device is slow, so it runs fewer cases.

use jetvlm_camera::Frame;
use jetvlm_core::Device;
use jetvlm_decoder::{Input, Model};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};
use jetvlm_runtime::{Pipeline, RuntimeConfig, StreamSession};
use jetvlm_vision::RgbImage;
use proptest::prelude::*;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

/// Largest difference allowed between the session's and the reference's first-token logits.
const LOGIT_BOUND: f32 = 1e-4;

/// Positions a session keeps free after a frame for its question (`QUESTION_RESERVE` in
/// the runtime's session module).
const QUESTION_RESERVE: usize = 64;

const MAX_NEW: usize = 4;

const QUESTIONS: [&str; 3] = [
    "what is in the picture?",
    "how many objects are there?",
    "is the red square left of the blue circle, and what colour is the background?",
];

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vlm")
}

/// Four different frames: the fixture image, inverted, channels rotated, and darkened.
fn frame(variant: usize, index: u64) -> Frame {
    let img = RgbImage::open(&fixture().join("image.png")).unwrap();
    let mut rgb = img.data;
    match variant % 4 {
        0 => {}
        1 => rgb.iter_mut().for_each(|v| *v = 255 - *v),
        2 => rgb.chunks_exact_mut(3).for_each(|p| p.rotate_left(1)),
        _ => rgb.iter_mut().for_each(|v| *v /= 3),
    }
    Frame {
        index,
        timestamp: Duration::from_millis(100 * index),
        width: img.width,
        height: img.height,
        rgb,
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Frame(usize),
    Ask(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (0..4usize).prop_map(Op::Frame),
        2 => (0..QUESTIONS.len()).prop_map(Op::Ask),
    ];
    prop::collection::vec(op, 1..10)
}

/// One step of the cache's history since it was last cleared.
#[derive(Clone, Copy, Debug)]
enum Step {
    Frame { id: u64, variant: usize },
    Evict { id: u64 },
}

/// The session's rules, on plain data: the window, the positions, when to re-base.
struct Reference {
    window: usize,
    max_position: usize,
    prefix: Vec<u32>,
    tpf: usize,
    /// Kept frames (cache id, variant), oldest first.
    kept: VecDeque<(u64, usize)>,
    /// What happened to the cache since it was last cleared, after the prefix.
    history: Vec<Step>,
    next_position: usize,
    next_id: u64,
    rebases: u64,
}

impl Reference {
    fn new(window: usize, max_position: usize, prefix: Vec<u32>, tpf: usize) -> Self {
        let next_position = prefix.len();
        Reference {
            window,
            max_position,
            prefix,
            tpf,
            kept: VecDeque::new(),
            history: Vec::new(),
            next_position,
            next_id: 0,
            rebases: 0,
        }
    }

    fn rebase_if_needed(&mut self, upcoming: usize) {
        if self.next_position + upcoming <= self.max_position {
            return;
        }
        let fresh = self.prefix.len() + self.kept.len() * self.tpf;
        if fresh >= self.next_position {
            return;
        }
        self.history = self
            .kept
            .iter()
            .map(|&(id, variant)| Step::Frame { id, variant })
            .collect();
        self.next_position = fresh;
        self.rebases += 1;
    }

    fn push(&mut self, variant: usize) {
        while self.kept.len() >= self.window {
            if let Some((id, _)) = self.kept.pop_front() {
                self.history.push(Step::Evict { id });
            }
        }
        self.rebase_if_needed(self.tpf + QUESTION_RESERVE + MAX_NEW);
        let id = self.next_id;
        self.next_id += 1;
        self.kept.push_back((id, variant));
        self.history.push(Step::Frame { id, variant });
        self.next_position += self.tpf;
    }

    /// Whether the cache holds a plain prefill of the prefix and the kept frames.
    fn is_fresh(&self) -> bool {
        self.history.iter().all(|s| matches!(s, Step::Frame { .. }))
    }
}

/// The reference's answer: a fresh cache rebuilt from `r.history`, then the question and
/// greedy decoding. Returns the first token's logits and `max` greedy tokens.
fn reference_answer(
    model: &Model,
    policy: &KvPolicy,
    embeddings: &[Vec<f32>],
    r: &Reference,
    question: &[u32],
    max: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut cache = MixedKvCache::new(model.cache_shape(), policy.clone(), 1024).unwrap();
    model
        .forward(&[Input::text(&r.prefix)], &mut cache)
        .unwrap();
    for step in &r.history {
        match *step {
            Step::Frame { id, variant } => {
                let e = &embeddings[variant];
                model
                    .forward(&[Input::frame(e, r.tpf, id)], &mut cache)
                    .unwrap();
            }
            Step::Evict { id } => cache.evict_frame(id).unwrap(),
        }
    }
    assert_eq!(cache.next_position() as usize, r.next_position);
    let first = model.forward(&[Input::text(question)], &mut cache).unwrap();
    let first = first.last().to_vec();
    let mut logits = first.clone();
    let mut tokens = Vec::new();
    for _ in 0..max {
        let t = argmax(&logits);
        tokens.push(t);
        logits = model
            .forward(&[Input::text(&[t])], &mut cache)
            .unwrap()
            .last()
            .to_vec();
    }
    (first, tokens)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The prompt's text around one frame, as the pipeline lays it out: (prefix, question).
fn split_prompt(p: &Pipeline, question: &str) -> (Vec<u32>, Vec<u32>) {
    const PLACEHOLDER: u32 = u32::MAX;
    let ids = p.prompt_ids(1, question, PLACEHOLDER).unwrap();
    let at = ids.iter().position(|&t| t == PLACEHOLDER).unwrap();
    let tpf = p.package().tokens_per_frame();
    (ids[..at].to_vec(), ids[at + tpf..].to_vec())
}

fn run_case(
    device: Device,
    kv: &str,
    window: usize,
    slack: Option<usize>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let base = RuntimeConfig {
        kv_policy: Some(kv.into()),
        max_new_tokens: MAX_NEW,
        window_frames: window,
        ..RuntimeConfig::default()
    };
    let mut reference = Pipeline::load(&fixture(), base.clone()).unwrap();
    let tpf = reference.package().tokens_per_frame();
    let (prefix, _) = split_prompt(&reference, QUESTIONS[0]);
    // The limit the session's positions may reach: a full window, a question and its
    // answer, plus `slack` frames more before a re-base (None: the model's own range, which
    // these short runs never reach).
    let max_position = match slack {
        Some(k) => prefix.len() + (window + k) * tpf + QUESTION_RESERVE + MAX_NEW,
        None => reference.package().decoder_config.max_position_embeddings,
    };
    let mut pipe = Pipeline::load(
        &fixture(),
        RuntimeConfig {
            session_max_position: slack.map(|_| max_position),
            device,
            ..base
        },
    )
    .unwrap();
    let policy: KvPolicy = reference.kv_policy().parse().unwrap();
    let frames: Vec<Frame> = (0..4).map(|v| frame(v, v as u64)).collect();
    let (embeds, _) = reference.encode_frames(&frames).unwrap();
    let embeddings: Vec<Vec<f32>> = embeds.into_iter().map(|e| e.data).collect();
    let questions: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .map(|q| split_prompt(&reference, q).1)
        .collect();
    let stop = reference.tokenizer().stop_token_ids().to_vec();

    // The session's decoder runs where asked (the simulated device names itself so).
    let on = pipe.decoder_device();
    prop_assert_eq!(on.contains("simulated"), device == Device::Sim, "{}", on);
    let mut s: StreamSession<'_> = pipe.session().unwrap();
    prop_assert_eq!(s.prefix_tokens(), prefix.len());
    let mut r = Reference::new(window, max_position, prefix, tpf);
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Frame(v) => {
                s.push_frame(&frame(v, step as u64)).unwrap();
                r.push(v);
                prop_assert_eq!(s.rebases(), r.rebases, "re-bases after step {}", step);
                let cached: Vec<u64> = s.frames().iter().map(|f| f.index).collect();
                prop_assert_eq!(cached.len(), r.kept.len());
            }
            Op::Ask(q) => {
                r.rebase_if_needed(questions[q].len() + MAX_NEW);
                let model = reference.model().unwrap();
                let (want_logits, want) =
                    reference_answer(model, &policy, &embeddings, &r, &questions[q], MAX_NEW);
                if device == Device::Cpu {
                    let logits = s.next_token_logits(QUESTIONS[q]).unwrap();
                    let d = max_abs_diff(&logits, &want_logits);
                    prop_assert!(
                        d <= LOGIT_BOUND,
                        "step {step}: first-token logits differ by {d} from a fresh prefill"
                    );
                }
                let got = s.ask(QUESTIONS[q]).unwrap().finish().unwrap().token_ids;
                // The session stops at a stop token (kept as the answer's last id); the
                // reference decodes on through it.
                prop_assert_eq!(&got[..], &want[..got.len()], "step {}: answer tokens", step);
                if got.len() < MAX_NEW {
                    prop_assert!(
                        got.last().is_some_and(|t| stop.contains(t)),
                        "step {step}: stopped before {MAX_NEW} tokens without a stop token: {got:?} vs {want:?} (stop ids {stop:?})"
                    );
                }
                prop_assert_eq!(
                    s.rebases(),
                    r.rebases,
                    "re-bases after question at step {}",
                    step
                );
                if r.is_fresh() {
                    let kept: Vec<Frame> = r.kept.iter().map(|&(_, v)| frame(v, 0)).collect();
                    let one_shot = reference.first_token_logits(&kept, QUESTIONS[q]).unwrap();
                    let d = max_abs_diff(&one_shot, &want_logits);
                    prop_assert!(
                        d <= LOGIT_BOUND,
                        "step {step}: the pipeline's one-shot prompt differs by {d}"
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_session_answers_as_a_fresh_prefill_of_what_it_keeps(
        kv in prop::sample::select(vec!["fp16", "mixed:group=32", "int8-frames"]),
        window in 1..=3usize,
        slack in prop::option::of(0..3usize),
        ops in ops(),
    ) {
        run_case(Device::Cpu, kv, window, slack, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// The property with the session's decoder on the simulated GPU.
    #[test]
    fn a_session_on_the_simulated_device_answers_as_a_fresh_prefill_of_what_it_keeps(
        kv in prop::sample::select(vec!["fp16", "mixed:group=32", "int8-frames"]),
        window in 1..=3usize,
        slack in prop::option::of(0..3usize),
        ops in ops(),
    ) {
        run_case(Device::Sim, kv, window, slack, &ops)?;
    }
}

/// The cases the random search might miss, every time: a re-base at every new frame, and
/// frames evicted with no re-base at all, each followed by a run of questions.
#[test]
fn rebase_at_every_frame_and_eviction_without_rebase() {
    let ops: Vec<Op> = (0..6)
        .flat_map(|i| [Op::Frame(i % 4), Op::Ask(i % 3), Op::Ask((i + 1) % 3)])
        .collect();
    for device in [Device::Cpu, Device::Sim] {
        for (kv, slack) in [
            ("fp16", Some(0)),
            ("mixed:group=32", None),
            ("int8-frames", Some(1)),
        ] {
            run_case(device, kv, 2, slack, &ops).unwrap();
        }
    }
}
