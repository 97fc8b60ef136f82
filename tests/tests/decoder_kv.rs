//! The decoder on the real KV cache (`jetvlm_kvcache::MixedKvCache`): with the FP16 policy
//! the fixtures still follow transformers (FP16 rounding of K/V bounds the logit error),
//! and with the mixed policy (frame tokens INT4) greedy generation after a frame-heavy
//! prompt agrees with the FP16 policy on at least 95% of the tokens (teacher-forced). Logit errors are
//! printed (`cargo test -- --nocapture`).

use jetvlm_decoder::sampler::argmax;
use jetvlm_decoder::{F32KvCache, GenerateOptions, Generation, Input, KvStore, LogitsMode, Model};
use jetvlm_kvcache::{KvPolicy, MixedKvCache};

mod common;
use common::decoder::{expected, ids, load, matrix, max_abs_diff};

fn greedy<C: KvStore>(model: &Model, cache: &mut C, prompt: &[Input<'_>], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_tokens: n,
        ..Default::default()
    };
    Generation::start(model, cache, prompt, &[], None, opts)
        .unwrap()
        .map(|s| s.unwrap().token)
        .collect()
}

/// FP16 K/V: logits within a bound set by half-precision rounding of K and V (relative
/// 2^-11), and the same 32 greedy tokens as transformers.
#[test]
fn fp16_policy_follows_transformers() {
    for name in ["llama", "qwen2"] {
        let exp = expected(name);
        let model = load(name);
        let prompt = ids(&exp["prompt_ids"]);
        let want = matrix(&exp["logits"]);
        let mut cache = MixedKvCache::new(model.cache_shape(), KvPolicy::fp16(), 128).unwrap();
        let got = model
            .forward_with(&[Input::text(&prompt)], &mut cache, LogitsMode::All)
            .unwrap();
        let mut worst = 0f32;
        let mut scale = 0f32;
        for (i, w) in want.iter().enumerate() {
            worst = worst.max(max_abs_diff(got.row(i), w));
            scale = scale.max(w.iter().fold(0.0, |m, x| m.max(x.abs())));
        }
        println!("{name}: FP16 KV max |logit error| {worst:.3e} (max |logit| {scale:.2})");
        assert!(worst < 2e-3 * scale.max(1.0), "{name}: {worst}");

        let mut cache = MixedKvCache::new(model.cache_shape(), KvPolicy::fp16(), 128).unwrap();
        let got = greedy(&model, &mut cache, &[Input::text(&prompt)], 32);
        let want_ids = ids(&exp["greedy_ids"]);
        let same = got.iter().zip(&want_ids).filter(|(a, b)| a == b).count();
        println!("{name}: FP16 KV greedy agrees with transformers on {same}/32");
        assert_eq!(got, want_ids, "{name}");
    }
}

/// A frame-heavy prompt: text, two 64-token frames (embedding rows of random ids: real
/// embedding statistics), text. Greedy 32 tokens with the mixed policy vs the FP16 policy.
#[test]
fn mixed_policy_matches_fp16_on_95_percent_of_greedy_tokens() {
    for name in ["llama", "qwen2"] {
        let exp = expected(name);
        let model = load(name);
        let prompt = ids(&exp["prompt_ids"]);
        let frame_ids: Vec<Vec<u32>> = (0..2u32)
            .map(|f| {
                (0..64u32)
                    .map(|i| (f * 97 + i * 31 + 5) % model.vocab_size() as u32)
                    .collect()
            })
            .collect();
        let frames: Vec<Vec<f32>> = frame_ids.iter().map(|f| model.embed(f).unwrap()).collect();
        let mut inputs = vec![Input::text(&prompt[..4])];
        for (i, f) in frames.iter().enumerate() {
            inputs.push(Input::frame(f, 64, i as u64));
        }
        inputs.push(Input::text(&prompt[4..]));

        // INT4 groups along head_dim: 64 for llama (head_dim 64), 32 for qwen2 (head_dim 32).
        let policy: KvPolicy = if model.cache_shape().head_dim.is_multiple_of(64) {
            KvPolicy::mixed()
        } else {
            "mixed:group=32".parse().unwrap()
        };
        let cap = 256;
        let policy_name = policy.name();
        let mut exact = F32KvCache::new(model.cache_shape(), cap);
        let mut fp16 = MixedKvCache::new(model.cache_shape(), KvPolicy::fp16(), cap).unwrap();
        let mut mixed = MixedKvCache::new(model.cache_shape(), policy.clone(), cap).unwrap();
        let l_exact = model.forward(&inputs, &mut exact).unwrap();
        let l_fp16 = model.forward(&inputs, &mut fp16).unwrap();
        let l_mixed = model.forward(&inputs, &mut mixed).unwrap();
        let mem = mixed.memory();
        assert_eq!(mem.frame_tokens, 128, "{mem:?}");
        println!("{name}: policy {}", policy_name);
        assert!(
            mem.quant_bytes > 0 && mem.total_bytes < mem.fp16_equivalent_bytes,
            "{mem:?}"
        );
        let e_fp16 = max_abs_diff(l_fp16.last(), l_exact.last());
        let e_mixed = max_abs_diff(l_mixed.last(), l_exact.last());
        println!(
            "{name}: last-token logit error vs exact f32 KV: fp16 {e_fp16:.3e}, mixed {e_mixed:.3e}; \
             KV {} B vs {} B all-FP16",
            mem.total_bytes, mem.fp16_equivalent_bytes
        );

        // FP16-policy greedy answer, then the mixed policy teacher-forced along it: at each
        // step, does the mixed cache pick the same next token given the same history? (In
        // free-running generation one flipped token changes everything after it, so that
        // comparison measures the first divergence, which is printed too.)
        let mut fp16 = MixedKvCache::new(model.cache_shape(), KvPolicy::fp16(), cap).unwrap();
        let answer = greedy(&model, &mut fp16, &inputs, 32);
        let mut mixed = MixedKvCache::new(model.cache_shape(), policy.clone(), cap).unwrap();
        let mut logits = model.forward(&inputs, &mut mixed).unwrap();
        let mut same = 0;
        for (i, &t) in answer.iter().enumerate() {
            same += (argmax(logits.last()) == t) as usize;
            if i + 1 < answer.len() {
                logits = model.forward(&[Input::text(&[t])], &mut mixed).unwrap();
            }
        }
        let mut mixed = MixedKvCache::new(model.cache_shape(), policy, cap).unwrap();
        let free = greedy(&model, &mut mixed, &inputs, 32);
        let prefix = answer.iter().zip(&free).take_while(|(a, b)| a == b).count();
        println!(
            "{name}: mixed vs FP16 greedy: {same}/32 tokens agree (teacher-forced); free-running \
             generation identical for the first {prefix}/32 tokens"
        );
        assert!(same * 100 >= 95 * 32, "{name}: {same}/32\n{answer:?}");
    }
}

/// A failed forward (a span beyond the cache's capacity) is an error and leaves the cache
/// as it was.
#[test]
fn capacity_overflow_is_an_error_not_a_panic() {
    let model = load("qwen2");
    let mut cache =
        MixedKvCache::new(model.cache_shape(), "mixed:group=32".parse().unwrap(), 16).unwrap();
    model
        .forward(&[Input::text(&[1, 2, 3])], &mut cache)
        .unwrap();
    let long: Vec<u32> = (0..40).collect();
    let e = model
        .forward(&[Input::text(&long)], &mut cache)
        .unwrap_err();
    assert!(matches!(e, jetvlm_decoder::DecoderError::Kv(_)), "{e:?}");
    assert_eq!(cache.len(), 3);
    // Still usable.
    model.forward(&[Input::text(&[4])], &mut cache).unwrap();
    assert_eq!(cache.next_position(), 4);
}
