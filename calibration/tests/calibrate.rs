//! Calibration on synthetic traffic: a layer with outlier key channels next to benign ones.

use jetvlm_calibration::{Calibration, CalibrationError, Recorder, calibrate, replay};
use jetvlm_core::TokenKind;
use jetvlm_decoder::KvStore;
use jetvlm_decoder::kv::CacheShape;
use jetvlm_kvcache::KvPolicy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPE: CacheShape = CacheShape {
    layers: 3,
    q_heads: 4,
    kv_heads: 2,
    head_dim: 64,
};

/// Keys/values `[n][kv_heads][head_dim]`: standard normal-ish, with `outliers` key channels
/// scaled 40x (as real models' keys have).
fn rows(rng: &mut StdRng, n: usize, scale: f32, outliers: bool) -> Vec<f32> {
    let d = SHAPE.head_dim;
    (0..n * SHAPE.kv_heads * d)
        .map(|i| {
            let x: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * scale;
            if outliers && i % d == 7 { x * 40.0 } else { x }
        })
        .collect()
}

/// Records `prompts` prompts: a text prefix, two 32-token frames, a question; layer 1 has
/// outlier key channels, layer 2 small values.
fn trace(prompts: usize) -> jetvlm_calibration::Trace {
    let mut rng = StdRng::seed_from_u64(3);
    let mut rec = Recorder::new(SHAPE, 256);
    for p in 0..prompts {
        rec.next_prompt();
        let mut frame = 0u64;
        for (kind, n) in [
            (TokenKind::Text, 6),
            (TokenKind::Frame, 32),
            (TokenKind::Frame, 32),
            (TokenKind::Text, 9),
        ] {
            let start = rec.next_position();
            let pos: Vec<u32> = (start..start + n as u32).collect();
            let id = (kind == TokenKind::Frame).then(|| {
                frame += 1;
                100 * p as u64 + frame
            });
            let span = rec.append_span(kind, &pos, id).unwrap();
            for layer in 0..SHAPE.layers {
                let (scale, outliers) = [(1.0, false), (1.0, true), (0.2, false)][layer];
                let k = rows(&mut rng, n, scale, outliers);
                let v = rows(&mut rng, n, scale, false);
                rec.write(layer, &span, &k, &v).unwrap();
                let q: Vec<f32> = (0..n * SHAPE.q_heads * SHAPE.head_dim)
                    .map(|_| rng.random::<f32>() - 0.5)
                    .collect();
                let mut out = vec![0f32; q.len()];
                rec.attend(layer, &span, &q, &mut out).unwrap();
            }
        }
    }
    rec.finish()
}

#[test]
fn each_layer_gets_the_cheapest_format_within_the_target() {
    let t = trace(3);
    assert_eq!(t.prompts.len(), 3);
    // Only the question's attention (text after frames) is recorded: one per layer.
    let attends = |p: &jetvlm_calibration::record::Prompt| {
        p.events
            .iter()
            .filter(|e| matches!(e, jetvlm_calibration::record::Event::Attend { .. }))
            .count()
    };
    assert!(t.prompts.iter().all(|p| attends(p) == SHAPE.layers));
    // INT4 g64 gives 7-8% error on the benign layers and 10% on the outlier layer (25%
    // with per-token keys); INT8 gives 0.5%.
    let c = calibrate(
        &t,
        &KvPolicy::mixed(),
        Some(0.09),
        "synthetic",
        "test traffic",
    )
    .unwrap();
    assert_eq!(c.samples.prompts, 3);
    assert_eq!(c.samples.text_queries, 3 * 9);
    assert_eq!(c.samples.frame_tokens, 3 * 64);
    for choice in &c.layers {
        let l = choice.layer;
        let mine = c
            .candidates
            .iter()
            .find(|k| k.format == choice.format)
            .unwrap();
        assert!(choice.meets_target, "layer {l}: {choice:?}");
        assert!(mine.errors[l] <= c.target_error);
        // The calibrated policy's own replay gives exactly the chosen candidate's error.
        assert_eq!(choice.error, mine.errors[l], "layer {l}");
        // Nothing cheaper meets the target.
        for k in &c.candidates {
            if k.bytes_per_frame_token < mine.bytes_per_frame_token {
                assert!(
                    k.errors[l] > c.target_error,
                    "layer {l}: {} beats {}",
                    k.format,
                    mine.format
                );
            }
        }
    }
    // The outlier layer needs more bits (or per-channel keys) than the small-valued one.
    let cost = |l: usize| {
        let f = &c.layers[l].format;
        c.candidates
            .iter()
            .find(|k| &k.format == f)
            .unwrap()
            .bytes_per_frame_token
    };
    assert!(cost(1) > cost(2) && cost(1) > cost(0), "{:?}", c.layers);
    let bits: Vec<u32> = (0..SHAPE.layers)
        .map(|l| c.kv_policy().unwrap().layer_format(l).bits)
        .collect();
    assert_eq!(bits, [4, 8, 4], "{}", c.policy);
    // Per-layer formats cost no more than the cheapest single format meeting the target.
    let policy = c.kv_policy().unwrap();
    assert!(policy.is_per_layer(), "{}", c.policy);
    assert_eq!(c.uniform_policy.as_deref(), Some("int8-frames"));
    assert!(c.kv_bytes.calibrated < c.kv_bytes.uniform.unwrap());
    assert!(c.kv_bytes.calibrated < c.kv_bytes.fp16);
    // Replaying the written policy reproduces the recorded errors.
    let again = replay(&t, &policy).unwrap();
    let errs: Vec<f64> = c.layers.iter().map(|l| l.error).collect();
    assert_eq!(again.layer_errors, errs);
    assert_eq!(again.kv_bytes(), c.kv_bytes.calibrated);
}

#[test]
fn a_loose_target_gives_the_cheapest_bits_everywhere() {
    let t = trace(1);
    let c = calibrate(
        &t,
        &KvPolicy::mixed(),
        Some(10.0),
        "synthetic",
        "test traffic",
    )
    .unwrap();
    let p = c.kv_policy().unwrap();
    assert!(
        (0..SHAPE.layers).all(|l| p.layer_format(l).bits == 2),
        "{}",
        c.policy
    );
    // Per-channel and per-token keys cost the same at group 64 with 64-token blocks: each
    // layer takes the more accurate; bytes equal the cheapest single format's.
    assert_eq!(Some(c.kv_bytes.calibrated), c.kv_bytes.uniform);
}

#[test]
fn the_default_target_is_the_base_policys_worst_layer() {
    let t = trace(2);
    let base = KvPolicy::mixed();
    let c = calibrate(&t, &base, None, "synthetic", "test traffic").unwrap();
    let base_errors = replay(&t, &base).unwrap().layer_errors;
    let worst = base_errors.iter().copied().fold(0.0, f64::max);
    assert_eq!(c.target_error, worst);
    assert!(c.layers.iter().all(|l| l.meets_target && l.error <= worst));
    // Each layer records the base policy's own error.
    let recorded: Vec<f64> = c.layers.iter().map(|l| l.base_error).collect();
    assert_eq!(recorded, base_errors);
    // Never more bytes than the base policy.
    assert!(c.kv_bytes.calibrated <= c.kv_bytes.base, "{:?}", c.kv_bytes);
}

#[test]
fn an_fp16_base_starts_from_mixed_and_odd_head_dims_are_an_error() {
    let c = calibrate(&trace(1), &KvPolicy::fp16(), None, "m", "s").unwrap();
    assert_eq!(c.base_policy, "mixed");
    let odd = CacheShape {
        head_dim: 40,
        ..SHAPE
    };
    let e = jetvlm_calibration::Calibrator::new(odd, &KvPolicy::mixed()).unwrap_err();
    assert!(e.to_string().contains("head_dim 40"), "{e}");
}

#[test]
fn prompts_without_frames_before_text_are_an_error() {
    let mut rec = Recorder::new(SHAPE, 64);
    let span = rec.append_span(TokenKind::Text, &[0, 1], None).unwrap();
    let k = vec![0.5f32; 2 * 2 * 64];
    rec.write(0, &span, &k, &k).unwrap();
    let q = vec![0.1f32; 2 * 4 * 64];
    let mut out = vec![0f32; q.len()];
    rec.attend(0, &span, &q, &mut out).unwrap();
    let e = calibrate(&rec.finish(), &KvPolicy::mixed(), Some(0.05), "m", "s").unwrap_err();
    assert!(e.to_string().contains("no text query saw a frame"), "{e}");
    let e = calibrate(&trace(1), &KvPolicy::mixed(), Some(-1.0), "m", "s").unwrap_err();
    assert!(matches!(e, CalibrationError::Target { .. }), "{e}");
}

#[test]
fn files_round_trip_and_bad_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let c = calibrate(
        &trace(1),
        &KvPolicy::mixed(),
        Some(0.03),
        "synthetic",
        "test",
    )
    .unwrap();
    let path = dir.path().join("calib.yaml");
    c.save(&path).unwrap();
    let back = Calibration::load(&path).unwrap();
    assert_eq!(back.policy, c.policy);
    assert_eq!(back.layers, c.layers);
    assert_eq!(
        back.policy_for(&path, SHAPE).unwrap(),
        c.kv_policy().unwrap()
    );
    // Another model's shape.
    let other = CacheShape { layers: 4, ..SHAPE };
    let e = back.policy_for(&path, other).unwrap_err();
    assert!(
        e.to_string().contains("calib.yaml") && e.to_string().contains("layers=4"),
        "{e}"
    );
    // A policy with the wrong number of layers, a future version, an unknown key.
    let text = std::fs::read_to_string(&path).unwrap();
    for (what, bad, expect) in [
        (
            "layers",
            text.replace(&c.policy, "mixed:layers=4c64/4c64"),
            "formats for 2 layers",
        ),
        (
            "version",
            text.replace("format_version: 1", "format_version: 9"),
            "format_version 9",
        ),
        ("unknown", format!("{text}colour: blue\n"), "colour"),
    ] {
        let p = dir.path().join(format!("{what}.yaml"));
        std::fs::write(&p, bad).unwrap();
        let e = Calibration::load(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{what}.yaml")) && e.contains(expect),
            "{what}: {e}"
        );
    }
    // A write that cannot happen leaves nothing behind.
    let missing = dir.path().join("no/such/dir/c.yaml");
    assert!(matches!(
        c.save(&missing),
        Err(CalibrationError::Write { .. })
    ));
    assert!(!missing.exists());
}
