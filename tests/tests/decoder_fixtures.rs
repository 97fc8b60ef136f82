//! The decoder against Hugging Face transformers: tiny random Llama (sharded, llama3 RoPE,
//! GQA, untied head; also stored as BF16 and F16) and Qwen2 (q/k/v biases, tied embeddings)
//! models built by `tests/fixtures/make_decoder_fixtures.py`, with the logits and greedy
//! ids transformers computed (float32, eager attention). Run on the exact f32 reference
//! cache, so any difference is the decoder's.

use jetvlm_decoder::{
    ChatMessage, F32KvCache, GenerateOptions, Generation, Input, LogitsMode, Model, SamplerConfig,
    Tokenizer,
};

mod common;
use common::decoder::{expected, fixture, ids, load, matrix, max_abs_diff};

fn cache(model: &Model) -> F32KvCache {
    F32KvCache::new(model.cache_shape(), 256)
}

/// Logits at every prompt position within 1e-4 of transformers.
fn check_prompt_logits(name: &str) {
    let exp = expected(name);
    let model = load(name);
    let prompt = ids(&exp["prompt_ids"]);
    let want = matrix(&exp["logits"]);
    let mut c = cache(&model);
    let got = model
        .forward_with(&[Input::text(&prompt)], &mut c, LogitsMode::All)
        .unwrap();
    assert_eq!(got.rows, prompt.len());
    let mut worst = 0f32;
    for (i, w) in want.iter().enumerate() {
        worst = worst.max(max_abs_diff(got.row(i), w));
    }
    println!(
        "{name}: max |logit error| over {} positions = {worst:.3e}",
        prompt.len()
    );
    assert!(worst < 1e-4, "{name}: max logit error {worst}");
}

#[test]
fn llama_sharded_logits_match_transformers() {
    check_prompt_logits("llama");
}

#[test]
fn qwen2_logits_match_transformers() {
    check_prompt_logits("qwen2");
}

#[test]
fn llama_bf16_weights_logits_match_transformers() {
    let m = load("llama_bf16");
    assert_eq!(m.weight_dtype(), jetvlm_core::DType::BF16);
    check_prompt_logits("llama_bf16");
}

#[test]
fn llama_f16_weights_logits_match_transformers() {
    let m = load("llama_f16");
    assert_eq!(m.weight_dtype(), jetvlm_core::DType::F16);
    check_prompt_logits("llama_f16");
}

/// Prefill one token at a time (the decode path: matrix-vector products) gives the same
/// logits as transformers too.
#[test]
fn token_by_token_decode_matches_transformers() {
    for name in ["llama", "qwen2", "llama_bf16"] {
        let exp = expected(name);
        let model = load(name);
        let prompt = ids(&exp["prompt_ids"]);
        let want = matrix(&exp["logits"]);
        let mut c = cache(&model);
        for (i, &t) in prompt.iter().enumerate() {
            let got = model.forward(&[Input::text(&[t])], &mut c).unwrap();
            let err = max_abs_diff(got.last(), &want[i]);
            assert!(err < 1e-4, "{name} position {i}: {err}");
        }
    }
}

fn greedy_ids(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut c = cache(model);
    let opts = GenerateOptions {
        max_tokens: n,
        sampler: SamplerConfig::greedy(),
        ..Default::default()
    };
    let g = Generation::start(model, &mut c, &[Input::text(prompt)], prompt, None, opts).unwrap();
    g.map(|s| s.unwrap().token).collect()
}

#[test]
fn greedy_32_tokens_match_transformers() {
    for name in ["llama", "qwen2"] {
        let exp = expected(name);
        let model = load(name);
        let got = greedy_ids(&model, &ids(&exp["prompt_ids"]), 32);
        assert_eq!(got, ids(&exp["greedy_ids"]), "{name}");
    }
}

/// `inputs_embeds` with random "frame" embeddings between two text spans, the frame span
/// tagged as a camera frame for the cache.
#[test]
fn injected_embeddings_match_transformers() {
    for name in ["llama", "qwen2"] {
        let exp = &expected(name)["embeds"];
        let model = load(name);
        let prefix = ids(&exp["prefix_ids"]);
        let suffix = ids(&exp["suffix_ids"]);
        let frame: Vec<f32> = matrix(&exp["frame"]).concat();
        let n = frame.len() / model.hidden_size();
        let want = matrix(&exp["logits"]);
        let mut c = cache(&model);
        let inputs = [
            Input::text(&prefix),
            Input::frame(&frame, n, 0),
            Input::text(&suffix),
        ];
        let got = model
            .forward_with(&inputs, &mut c, LogitsMode::All)
            .unwrap();
        assert_eq!(got.rows, prefix.len() + n + suffix.len());
        let mut worst = 0f32;
        for (i, w) in want.iter().enumerate() {
            worst = worst.max(max_abs_diff(got.row(i), w));
        }
        println!("{name} inputs_embeds: max |logit error| = {worst:.3e}");
        assert!(worst < 1e-4, "{name}: {worst}");
        let kinds = c.kinds();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == jetvlm_core::TokenKind::Frame)
                .count(),
            n
        );
    }
}

/// Spans run in separate calls (prompt, then more text) equal one call over the whole.
#[test]
fn split_calls_continue_positions() {
    let exp = expected("qwen2");
    let model = load("qwen2");
    let prompt = ids(&exp["prompt_ids"]);
    let want = matrix(&exp["logits"]);
    let mut c = cache(&model);
    model.forward(&[Input::text(&prompt[..7])], &mut c).unwrap();
    let got = model.forward(&[Input::text(&prompt[7..])], &mut c).unwrap();
    assert!(max_abs_diff(got.last(), want.last().unwrap()) < 1e-4);
}

#[test]
fn bad_forward_input_is_an_error_and_leaves_cache_untouched() {
    let model = load("qwen2");
    let mut c = cache(&model);
    let e = model
        .forward(&[Input::text(&[1, 2, 100_000])], &mut c)
        .unwrap_err();
    assert!(e.to_string().contains("100000"), "{e}");
    let short = vec![0f32; 10];
    let e = model
        .forward(&[Input::frame(&short, 1, 3)], &mut c)
        .unwrap_err();
    assert!(e.to_string().contains("hidden size"), "{e}");
    assert_eq!(jetvlm_decoder::KvStore::len(&c), 0);
}

#[test]
fn tokenizer_matches_transformers() {
    let exp = &expected("llama")["tokenizer"];
    let tok = Tokenizer::from_dir(&fixture("llama")).unwrap();
    let text = exp["text"].as_str().unwrap();
    assert_eq!(tok.encode(text, false).unwrap(), ids(&exp["ids_plain"]));
    assert_eq!(tok.encode(text, true).unwrap(), ids(&exp["ids_special"]));
    assert_eq!(tok.decode(&ids(&exp["ids_plain"]), false).unwrap(), text);
    let messages: Vec<ChatMessage> = exp["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        exp["chat_rendered"].as_str().unwrap()
    );
    assert_eq!(
        tok.encode_chat(&messages, true).unwrap(),
        ids(&exp["chat_ids"])
    );
    let eos = exp["eos_id"].as_u64().unwrap() as u32;
    assert!(tok.stop_token_ids().contains(&eos));
}

/// Streaming text never splits a character and concatenates to the full decoding, even
/// for multi-byte text whose bytes span several tokens.
#[test]
fn incremental_detokenizer_is_utf8_safe() {
    let tok = Tokenizer::from_dir(&fixture("llama")).unwrap();
    let text = "über café 🙂 日本語 text";
    let ids = tok.encode(text, false).unwrap();
    let mut d = tok.incremental(false);
    let mut out = String::new();
    let mut pieces = 0;
    for &id in &ids {
        let piece = d.push(id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "partial character emitted: {piece:?}"
        );
        pieces += !piece.is_empty() as usize;
        out.push_str(&piece);
    }
    out.push_str(&d.flush().unwrap());
    assert_eq!(out, text);
    // Some multi-byte characters span tokens, so fewer pieces than tokens came out.
    assert!(pieces < ids.len(), "{pieces} pieces for {} ids", ids.len());
}

/// Generation stops on a stop token and on a stop string, cutting the text before it.
#[test]
fn generation_stops_on_token_and_string() {
    let exp = expected("llama");
    let model = load("llama");
    let tok = Tokenizer::from_dir(&fixture("llama")).unwrap();
    let prompt = ids(&exp["prompt_ids"]);
    let greedy = ids(&exp["greedy_ids"]);

    // Stop token: the 5th greedy token.
    let mut c = cache(&model);
    let opts = GenerateOptions {
        max_tokens: 32,
        stop_tokens: vec![greedy[4]],
        ..Default::default()
    };
    let mut g = Generation::start(
        &model,
        &mut c,
        &[Input::text(&prompt)],
        &prompt,
        Some(&tok),
        opts,
    )
    .unwrap();
    let got: Vec<u32> = g.by_ref().map(|s| s.unwrap().token).collect();
    let first = greedy.iter().position(|&t| t == greedy[4]).unwrap();
    assert_eq!(got, greedy[..=first].to_vec());
    assert_eq!(
        g.finish_reason(),
        Some(jetvlm_decoder::FinishReason::StopToken)
    );

    // Stop string: a piece of the full greedy text.
    let full = tok.decode(&greedy, true).unwrap();
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut..].chars().take(3).collect();
    let mut c = cache(&model);
    let opts = GenerateOptions {
        max_tokens: 32,
        stop_strings: vec![stop.clone()],
        ..Default::default()
    };
    let mut g = Generation::start(
        &model,
        &mut c,
        &[Input::text(&prompt)],
        &prompt,
        Some(&tok),
        opts,
    )
    .unwrap();
    let streamed: String = g.by_ref().map(|s| s.unwrap().text).collect();
    let want = &full[..full.find(&stop).unwrap()];
    assert_eq!(streamed, want);
    assert_eq!(g.text(), want);
    assert_eq!(
        g.finish_reason(),
        Some(jetvlm_decoder::FinishReason::StopString)
    );
}
