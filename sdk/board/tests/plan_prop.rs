//! Properties of the memory planner on arbitrary workloads, huge ones included: the total
//! never shrinks as frames, tokens or bits grow, and a workload whose arithmetic overflows
//! 64 bits is an error naming the input, never a plan that "fits".

use jetvlm_board::plan::{self, CameraBuffers, PlanOptions, WeightFormat, Workload};
use jetvlm_board::{BoardError, BoardProfile, BoardRegistry, KvPrecision, ModelSpec};
use proptest::prelude::*;
use std::path::PathBuf;

fn model() -> ModelSpec {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/configs/smolvlm-256m");
    ModelSpec::load(&dir).unwrap()
}

fn board() -> BoardProfile {
    BoardRegistry::bundled().get("agx-orin-64gb").unwrap()
}

/// Small, mid-sized and full-range values: the planner must hold up on all of them.
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..2_000,
        2 => 1u64 << 20..1u64 << 40,
        2 => any::<u64>(),
        1 => Just(u64::MAX),
    ]
}

fn workload() -> impl Strategy<Value = Workload> {
    (count(), 1u64..512, count(), 0u64..4096).prop_map(
        |(frames, tokens_per_frame, prompt_tokens, answer_tokens)| Workload {
            frames,
            tokens_per_frame,
            prompt_tokens,
            answer_tokens,
        },
    )
}

fn total(w: &Workload, kv: &KvPrecision, opts: &PlanOptions) -> Result<u64, BoardError> {
    plan::memory(&board(), &model(), w, kv, opts)?.total()
}

/// `a <= b`, where an overflow counts as more than any number of bytes.
fn no_more(a: &Result<u64, BoardError>, b: &Result<u64, BoardError>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a <= b,
        (Ok(_), Err(BoardError::Overflow { .. })) => true,
        (Err(BoardError::Overflow { .. }), Err(BoardError::Overflow { .. })) => true,
        _ => false,
    }
}

fn policies() -> Vec<KvPrecision> {
    vec![
        KvPrecision::frames_at(2),
        KvPrecision::mixed(),
        KvPrecision::frames_at(8),
        KvPrecision::fp16(),
    ]
}

proptest! {
    #[test]
    fn total_never_shrinks_as_frames_grow(w in workload(), extra in count()) {
        let opts = PlanOptions::default();
        for kv in policies() {
            let more = Workload { frames: w.frames.saturating_add(extra), ..w };
            let (a, b) = (total(&w, &kv, &opts), total(&more, &kv, &opts));
            prop_assert!(no_more(&a, &b), "{} frames: {a:?}; {} frames: {b:?}", w.frames, more.frames);
        }
    }

    #[test]
    fn total_never_shrinks_as_tokens_grow(w in workload(), extra in count(), which in 0..3usize) {
        let opts = PlanOptions::default();
        let mut more = w;
        match which {
            0 => more.tokens_per_frame = w.tokens_per_frame.saturating_add(extra),
            1 => more.prompt_tokens = w.prompt_tokens.saturating_add(extra),
            _ => more.answer_tokens = w.answer_tokens.saturating_add(extra),
        }
        for kv in policies() {
            let (a, b) = (total(&w, &kv, &opts), total(&more, &kv, &opts));
            prop_assert!(no_more(&a, &b), "{w:?}: {a:?}; {more:?}: {b:?}");
        }
    }

    #[test]
    fn total_never_shrinks_as_bits_grow(w in workload()) {
        let opts = PlanOptions::default();
        // KV frame bits 2 < 4 < 8 < 16.
        let totals: Vec<_> = policies().iter().map(|kv| total(&w, kv, &opts)).collect();
        for pair in totals.windows(2) {
            prop_assert!(no_more(&pair[0], &pair[1]), "{w:?}: {pair:?}");
        }
        // Weight bits 4 < 8 < 16 < 32.
        let totals: Vec<_> = [4u8, 8, 16, 32]
            .into_iter()
            .map(|b| {
                let opts = PlanOptions { weights: WeightFormat::Bits(b), ..PlanOptions::default() };
                total(&w, &KvPrecision::mixed(), &opts)
            })
            .collect();
        for pair in totals.windows(2) {
            prop_assert!(no_more(&pair[0], &pair[1]), "{w:?}: {pair:?}");
        }
    }

    #[test]
    fn never_fits_when_a_term_overflows(
        w in workload(),
        vision_bytes in count(),
        camera_buffers in count(),
        kv in prop::sample::select(policies()),
    ) {
        let mut m = model();
        m.set_vision_bytes(vision_bytes);
        let opts = PlanOptions {
            camera: CameraBuffers { count: camera_buffers, ..CameraBuffers::default() },
            ..PlanOptions::default()
        };
        let b = board();
        // The terms, in 128 bits: any of them past 64 bits must be an overflow error.
        let frame_tokens = w.frames as u128 * w.tokens_per_frame as u128;
        let text_tokens = w.prompt_tokens as u128 + w.answer_tokens as u128;
        let camera = if w.frames > 0 { 1280u128 * 720 * 3 * camera_buffers as u128 } else { 0 };
        let overflows = frame_tokens > u64::MAX as u128
            || text_tokens > u64::MAX as u128
            || camera > u64::MAX as u128
            || vision_bytes as u128 + camera + frame_tokens + text_tokens > u64::MAX as u128;
        match plan::plan(&b, &m, &w, &kv, &opts) {
            Ok(p) => {
                prop_assert!(!overflows, "{w:?}, vision {vision_bytes}, camera x{camera_buffers}: planned, fits = {}", p.fits);
                let m = &p.memory;
                let sum = [m.weights_bytes, m.vision_encoder_bytes, m.kv_text_bytes, m.kv_frame_bytes, m.frame_features_bytes, m.activation_bytes, m.camera_bytes, m.runtime_bytes]
                    .iter()
                    .map(|&x| x as u128)
                    .sum::<u128>();
                prop_assert_eq!(sum, p.total_bytes as u128);
                prop_assert_eq!(p.fits, p.total_bytes <= p.budget_bytes);
                prop_assert_eq!(p.kv.frame_tokens as u128, frame_tokens);
                prop_assert_eq!(p.context_tokens as u128, frame_tokens + text_tokens);
                prop_assert_eq!(p.headroom_bytes as i128, (p.budget_bytes as i128 - p.total_bytes as i128).max(i64::MIN as i128));
            }
            Err(BoardError::Overflow { input, .. }) => {
                prop_assert!(
                    ["--frames", "--tokens-per-frame", "--prompt-tokens", "--answer-tokens", "--camera", "--vision-bytes", "--prefill-chunk"]
                        .iter()
                        .any(|f| input.contains(f)),
                    "overflow blames `{input}`"
                );
            }
            Err(e) => prop_assert!(false, "{w:?}: unexpected error {e}"),
        }
    }
}

#[test]
fn a_board_whose_dram_overflows_bytes_is_refused() {
    let yaml = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../boards/orin-nano-8gb.yaml"),
    )
    .unwrap();
    let dram = yaml
        .lines()
        .find(|l| l.trim_start().starts_with("dram_mib:"))
        .unwrap()
        .to_string();
    let huge = yaml.replace(
        &dram,
        &dram.replace(dram.trim_start(), "dram_mib: 18446744073709551615"),
    );
    let err = BoardProfile::from_yaml_str(&huge, std::path::Path::new("huge.yaml")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("memory.dram_mib") && msg.contains("huge.yaml"),
        "{msg}"
    );
}
