//! Cache behaviour: memory by precision, eviction, errors, quantization error of keys.

mod common;
use common::*;
use jetvlm_core::TokenKind;
use jetvlm_kvcache::cells::PoolKind;
use jetvlm_kvcache::{Kernel, KvError, KvPolicy, MixedKvCache};

#[test]
fn mixed_cache_holds_at_most_0_37_of_fp16_bytes() {
    // 10% text FP16, 90% frames INT4 g64 (scales and zeros included).
    let s = shape(4, 9, 3, 64);
    let mut cache = MixedKvCache::new(s, KvPolicy::mixed(), 8192).unwrap();
    let mut fp16 = MixedKvCache::new(s, KvPolicy::fp16(), 8192).unwrap();
    let mut rng = rng(1);
    // 640 text tokens and 90 frames of 64 tokens: 5760 frame tokens, 10% text.
    fill(&mut cache, &mut rng, 640, 90, 64, false);
    fill(&mut fp16, &mut rng, 640, 90, 64, false);
    let m = cache.memory();
    let f = fp16.memory();
    assert_eq!(m.text_tokens, 640);
    assert_eq!(m.frame_tokens, 5760);
    assert_eq!(
        f.total_bytes, f.fp16_equivalent_bytes,
        "fp16 cache is exactly FP16-sized"
    );
    assert_eq!(m.fp16_equivalent_bytes, f.total_bytes);
    let ratio = m.total_bytes as f64 / f.total_bytes as f64;
    assert!(ratio <= 0.37, "mixed / fp16 bytes = {ratio}");
    assert!(m.quant_bytes > 0 && m.fp16_bytes > 0);
    assert_eq!(m.total_bytes, m.fp16_bytes + m.quant_bytes);
    // int4-all quantizes text too: smaller still.
    let mut all = MixedKvCache::new(s, KvPolicy::int4_all(), 8192).unwrap();
    fill(&mut all, &mut rng, 640, 90, 64, false);
    assert!(all.memory().total_bytes < m.total_bytes);
    assert_eq!(all.memory().fp16_bytes, 0);
}

#[test]
fn thousand_append_evict_cycles_leave_the_pool_as_it_started() {
    let s = shape(2, 4, 2, 64);
    let mut cache = MixedKvCache::new(s, KvPolicy::mixed(), 1024).unwrap();
    let mut rng = rng(2);
    fill(&mut cache, &mut rng, 10, 0, 64, false);
    let start_mem = cache.memory();
    let start_blocks = cache.allocated_blocks();
    let start_ids = cache.cells().id_space(PoolKind::Quant);
    let start_cells = cache.cells().counts();
    let (k, v) = (
        rand_kv(&mut rng, 64, 2, 64, true),
        rand_kv(&mut rng, 64, 2, 64, false),
    );
    let mut high = [0usize; 2];
    let mut high_ids = 0;
    for cycle in 0..1000u64 {
        let p = cache.next_position();
        let pos: Vec<u32> = (p..p + 64).collect();
        let span = cache
            .append_span(TokenKind::Frame, &pos, Some(cycle))
            .unwrap();
        for layer in 0..2 {
            cache.write(layer, &span, &k, &v).unwrap();
        }
        if cycle % 3 == 0 {
            // Keep up to two frames around sometimes.
            continue;
        }
        for f in cache.frames() {
            cache.evict_frame(f).unwrap();
        }
        let b = cache.allocated_blocks();
        high = [high[0].max(b[0]), high[1].max(b[1])];
        high_ids = high_ids.max(cache.cells().id_space(PoolKind::Quant));
    }
    for f in cache.frames() {
        cache.evict_frame(f).unwrap();
    }
    assert_eq!(cache.memory(), start_mem);
    assert_eq!(cache.cells().counts(), start_cells);
    assert!(cache.frames().is_empty());
    // Block ids never grew beyond what two frames need (freed blocks are reused), and
    // storage (allocated in chunks of ids) stayed within one chunk of them.
    assert!(
        high_ids <= start_ids + 2,
        "quant block ids grew to {high_ids}"
    );
    let per_chunk = cache.pool(0, PoolKind::Quant).unwrap().0.chunk_blocks();
    assert!(
        high[1] <= (start_ids + 2).next_multiple_of(per_chunk),
        "quant blocks grew to {}",
        high[1]
    );
    cache.trim();
    assert_eq!(cache.allocated_blocks(), start_blocks);
    cache.clear();
    cache.trim();
    assert_eq!(cache.allocated_blocks(), [0, 0]);
    assert_eq!(cache.memory(), Default::default());
}

#[test]
fn evicting_frames_returns_memory_and_keeps_positions() {
    let s = shape(1, 4, 2, 64);
    let mut cache = MixedKvCache::new(s, KvPolicy::mixed(), 1024).unwrap();
    let mut rng = rng(3);
    let spans = fill(&mut cache, &mut rng, 20, 3, 64, false);
    let before = cache.memory();
    cache.evict_frame(1).unwrap();
    let after = cache.memory();
    assert_eq!(after.frame_tokens, before.frame_tokens - 64);
    assert!(after.total_bytes < before.total_bytes);
    assert_eq!(cache.frames(), vec![0, 2]);
    // Later tokens keep their positions; the evicted frame's span is stale.
    let last = &spans.last().unwrap().0;
    let positions: Vec<u32> = cache
        .cells()
        .blocks()
        .flat_map(|b| b.positions.clone())
        .collect();
    for p in last.positions() {
        assert!(positions.contains(p));
    }
    assert!(!positions.contains(&spans[2].0.positions()[0]));
    let q = vec![0.1f32; 4 * 64];
    let mut out = vec![0f32; 4 * 64];
    assert_eq!(
        cache.attend(0, &spans[2].0, &q, &mut out),
        Err(KvError::StaleSpan { op: "attend" })
    );
    assert_eq!(
        cache.evict_frame(1),
        Err(KvError::UnknownFrame {
            op: "evict_frame",
            frame: 1
        })
    );
    // Attention over what is left still matches the reference.
    let q = rand_q(&mut rng, last.len(), 4, 64);
    let mut want = vec![0f32; q.len()];
    let mut got = vec![0f32; q.len()];
    cache
        .attend_with(Kernel::Reference, 0, last, &q, &mut want)
        .unwrap();
    cache.attend(0, last, &q, &mut got).unwrap();
    assert!(rel_err(&got, &want) < 1e-3);
}

#[test]
fn full_pool_is_a_typed_error_naming_the_budget() {
    let s = shape(1, 4, 2, 64);
    let mut cache = MixedKvCache::new(s, KvPolicy::mixed(), 100).unwrap();
    let pos: Vec<u32> = (0..64).collect();
    cache.append_span(TokenKind::Frame, &pos, Some(0)).unwrap();
    let pos: Vec<u32> = (64..128).collect();
    let err = cache
        .append_span(TokenKind::Frame, &pos, Some(1))
        .unwrap_err();
    assert_eq!(
        err,
        KvError::CapacityExceeded {
            op: "append_span",
            capacity_tokens: 100,
            cached: 64,
            requested: 64
        }
    );
    assert!(err.to_string().contains("budget of 100 tokens"), "{err}");
    // After evicting, the frame fits.
    cache.evict_frame(0).unwrap();
    cache.append_span(TokenKind::Frame, &pos, Some(1)).unwrap();
}

#[test]
fn mismatched_shapes_are_typed_errors() {
    let bad = |q, kv, d| MixedKvCache::new(shape(1, q, kv, d), KvPolicy::mixed(), 10).err();
    assert!(matches!(bad(9, 2, 64), Some(KvError::InvalidShape { .. })));
    assert!(matches!(bad(4, 0, 64), Some(KvError::InvalidShape { .. })));
    // No supported group divides 80, 48 or 16: the error names the head dim and the policy
    // that runs the model.
    for d in [80, 48, 16] {
        let e = bad(4, 2, d).expect("refused");
        assert!(matches!(e, KvError::InvalidShape { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("head_dim {d} ")) && msg.contains("`fp16`"),
            "{msg}"
        );
        assert!(MixedKvCache::new(shape(1, 4, 2, d), KvPolicy::fp16(), 10).is_ok());
    }
    // Head dim 96 (Phi-3): the default group of 64 is fitted to 32.
    let c96 = MixedKvCache::new(shape(1, 4, 2, 96), KvPolicy::mixed(), 10).unwrap();
    assert_eq!(c96.policy().group, 32);
    assert!(MixedKvCache::new(shape(1, 4, 2, 80), KvPolicy::fp16(), 10).is_ok());
    let mut cache = MixedKvCache::new(shape(2, 4, 2, 64), KvPolicy::mixed(), 100).unwrap();
    let span = cache.append_span(TokenKind::Text, &[0, 1], None).unwrap();
    let ok = vec![0f32; 2 * 2 * 64];
    assert!(matches!(
        cache.write(0, &span, &ok[..100], &ok),
        Err(KvError::ShapeMismatch {
            op: "write",
            expected: 256,
            got: 100,
            ..
        })
    ));
    assert!(matches!(
        cache.write(2, &span, &ok, &ok),
        Err(KvError::LayerOutOfRange {
            layer: 2,
            layers: 2,
            ..
        })
    ));
    let mut nan = ok.clone();
    nan[3] = f32::NAN;
    assert!(matches!(
        cache.write(0, &span, &nan, &ok),
        Err(KvError::NonFinite { index: 3, .. })
    ));
    cache.write(0, &span, &ok, &ok).unwrap();
    let mut out = vec![0f32; 2 * 4 * 64];
    assert!(matches!(
        cache.attend(0, &span, &ok, &mut out),
        Err(KvError::ShapeMismatch {
            op: "attend",
            expected: 512,
            got: 256,
            ..
        })
    ));
    // Frame spans need a frame id; text spans must not have one; frames are unique.
    assert!(matches!(
        cache.append_span(TokenKind::Frame, &[2], None),
        Err(KvError::BadSpan { .. })
    ));
    assert!(matches!(
        cache.append_span(TokenKind::Text, &[2], Some(3)),
        Err(KvError::BadSpan { .. })
    ));
    cache.append_span(TokenKind::Frame, &[2], Some(3)).unwrap();
    assert_eq!(
        cache
            .append_span(TokenKind::Frame, &[3], Some(3))
            .unwrap_err(),
        KvError::DuplicateFrame { frame: 3 }
    );
}

/// Attention output error of a quantized cache against f32 attention on the original data.
fn attention_error_vs_original(policy: &str, outliers: bool) -> f64 {
    let (qh, kvh, d) = (4, 2, 64);
    let mut rng = rng(5);
    let mut cache = MixedKvCache::new(shape(1, qh, kvh, d), policy.parse().unwrap(), 4096).unwrap();
    let mut exact = MixedKvCache::new(shape(1, qh, kvh, d), KvPolicy::fp16(), 4096).unwrap();
    let mut total = 0.0;
    for trial in 0..4u64 {
        cache.clear();
        exact.clear();
        let mut last = None;
        for f in 0..8u64 {
            let pos: Vec<u32> = (f as u32 * 64..f as u32 * 64 + 64).collect();
            let k = rand_kv(&mut rng, 64, kvh, d, outliers);
            let v = rand_kv(&mut rng, 64, kvh, d, false);
            let a = cache
                .append_span(TokenKind::Frame, &pos, Some(f + 100 * trial))
                .unwrap();
            cache.write(0, &a, &k, &v).unwrap();
            let b = exact
                .append_span(TokenKind::Frame, &pos, Some(f + 100 * trial))
                .unwrap();
            exact.write(0, &b, &k, &v).unwrap();
            last = Some((a, b));
        }
        let (a, b) = last.unwrap();
        // Queries aligned with the outlier channels, as real queries are.
        let q: Vec<f32> = rand_q(&mut rng, 64, qh, d)
            .iter()
            .enumerate()
            .map(|(i, x)| if i % 16 == 5 { x * 0.3 } else { *x })
            .collect();
        let mut got = vec![0f32; q.len()];
        let mut want = vec![0f32; q.len()];
        cache
            .attend_with(Kernel::Reference, 0, &a, &q, &mut got)
            .unwrap();
        exact
            .attend_with(Kernel::Reference, 0, &b, &q, &mut want)
            .unwrap();
        total += rel_err(&got, &want);
    }
    total / 4.0
}

#[test]
fn per_channel_keys_beat_per_token_keys_on_outliers() {
    let chan = attention_error_vs_original("mixed:keys=channel,budget=0,sinks=0", true);
    let tok = attention_error_vs_original("mixed:keys=token,budget=0,sinks=0", true);
    assert!(chan < tok, "per-channel {chan} vs per-token {tok}");
    // Both are usable on ordinary data, INT8 is much tighter than INT4.
    let int4 = attention_error_vs_original("mixed:budget=0,sinks=0", false);
    let int8 = attention_error_vs_original("int8-frames:budget=0,sinks=0", false);
    assert!(int8 < int4 / 4.0, "int8 {int8} int4 {int4}");
    assert!(int4 < 0.1, "int4 error {int4}");
}

#[test]
fn quantized_keys_and_values_are_within_half_a_step() {
    for policy in [
        "mixed",
        "mixed:keys=token",
        "int8-frames",
        "int2-frames:group=32",
        "int4-all:group=128",
    ] {
        for outliers in [false, true] {
            let p: KvPolicy = policy.parse().unwrap();
            let (kvh, d) = (2, 128);
            let mut cache = MixedKvCache::new(shape(1, 4, kvh, d), p.clone(), 1024).unwrap();
            let mut rng = rng(9);
            let pos: Vec<u32> = (0..64).collect();
            let span = cache.append_span(TokenKind::Frame, &pos, Some(0)).unwrap();
            let k = rand_kv(&mut rng, 64, kvh, d, outliers);
            let v = rand_kv(&mut rng, 64, kvh, d, outliers);
            cache.write(0, &span, &k, &v).unwrap();
            let levels = ((1u32 << p.frame_bits) - 1) as f32;
            let (mut kb, mut vb) = (vec![0f32; d], vec![0f32; d]);
            for (i, slot) in span.slots().iter().enumerate() {
                for h in 0..kvh {
                    read_token(&cache, 0, slot, h, &mut kb, &mut vb);
                    let row = |x: &[f32]| x[(i * kvh + h) * d..][..d].to_vec();
                    let (kr, vr) = (row(&k), row(&v));
                    // Bound: half a step of the widest group the element can be in, plus FP16 rounding.
                    for (orig, deq, groups) in [(&kr, &kb, true), (&vr, &vb, true)] {
                        let _ = groups;
                        let range = |xs: &[f32]| {
                            xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
                                - xs.iter().cloned().fold(f32::INFINITY, f32::min)
                        };
                        for c in 0..d {
                            let step = if std::ptr::eq(orig, &kr)
                                && p.key_mode == jetvlm_kvcache::KeyMode::PerChannel
                            {
                                let col: Vec<f32> =
                                    (0..64).map(|t| k[(t * kvh + h) * d + c]).collect();
                                range(&col) / levels
                            } else {
                                let g = p.group;
                                range(&orig[c / g * g..(c / g + 1) * g]) / levels
                            };
                            let bound = 0.5 * step * 1.002 + orig[c].abs() * 1e-3 + 1e-6;
                            assert!(
                                (orig[c] - deq[c]).abs() <= bound,
                                "{policy} outliers={outliers}: {} vs {} bound {bound}",
                                orig[c],
                                deq[c]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A calibrated policy (a frame format per layer) stores and attends each layer exactly as
/// a cache with that layer's format for every layer does, with every kernel; its memory is
/// the sum of its layers'.
#[test]
fn per_layer_formats_match_uniform_caches_layer_by_layer() {
    let (qh, kvh, d) = (4, 2, 64);
    let formats = ["8c64", "2t32", "4c64"];
    let calibrated: KvPolicy = format!("mixed:qblock=32,layers={}", formats.join("/"))
        .parse()
        .unwrap();
    let s = shape(formats.len(), qh, kvh, d);
    let mut mixed = MixedKvCache::new(s, calibrated.clone(), 1024).unwrap();
    let mut uniform: Vec<MixedKvCache> = formats
        .iter()
        .map(|f| {
            let (bits, rest) = f.split_at(1);
            let keys = if rest.starts_with('c') {
                "channel"
            } else {
                "token"
            };
            let p = format!(
                "mixed:qblock=32,bits={bits},keys={keys},group={}",
                &rest[1..]
            );
            MixedKvCache::new(s, p.parse().unwrap(), 1024).unwrap()
        })
        .collect();
    let mut rng = rng(21);
    let mut spans = Vec::new();
    for (i, (kind, n)) in [
        (TokenKind::Text, 7),
        (TokenKind::Frame, 32),
        (TokenKind::Frame, 32),
        (TokenKind::Text, 5),
    ]
    .into_iter()
    .enumerate()
    {
        let start = mixed.next_position();
        let pos: Vec<u32> = (start..start + n as u32).collect();
        let frame = (kind == TokenKind::Frame).then_some(i as u64);
        let a = mixed.append_span(kind, &pos, frame).unwrap();
        let bs: Vec<_> = uniform
            .iter_mut()
            .map(|u| u.append_span(kind, &pos, frame).unwrap())
            .collect();
        for layer in 0..formats.len() {
            let k = rand_kv(&mut rng, n, kvh, d, true);
            let v = rand_kv(&mut rng, n, kvh, d, false);
            mixed.write(layer, &a, &k, &v).unwrap();
            for (u, b) in uniform.iter_mut().zip(&bs) {
                u.write(layer, b, &k, &v).unwrap();
            }
        }
        spans.push((a, bs));
    }
    let (a, bs) = spans.last().unwrap();
    let q = rand_q(&mut rng, 5, qh, d);
    for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
        for (layer, (u, b)) in uniform.iter().zip(bs).enumerate() {
            let mut got = vec![0f32; q.len()];
            let mut want = vec![0f32; q.len()];
            mixed.attend_with(kernel, layer, a, &q, &mut got).unwrap();
            u.attend_with(kernel, layer, b, &q, &mut want).unwrap();
            assert_eq!(
                got, want,
                "layer {layer} ({}) with {kernel:?}",
                formats[layer]
            );
        }
    }
    // Memory: each layer's share of its uniform twin.
    let per_layer: u64 = uniform
        .iter()
        .map(|u| u.memory().quant_bytes / formats.len() as u64)
        .sum();
    assert_eq!(mixed.memory().quant_bytes, per_layer);
    assert_eq!(mixed.memory().fp16_bytes, uniform[0].memory().fp16_bytes);
    // The wrong number of layers is a typed error naming the shape.
    let err = MixedKvCache::new(shape(2, qh, kvh, d), calibrated, 1024)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("formats for 3 layers, the model has 2"),
        "{err}"
    );
}

/// A pending frame settled by salience stores exactly what a frame appended with the same
/// scores stores: same blocks, same bytes, bit-identical attention with every kernel. The
/// most salient tokens take the budget's room.
#[test]
fn settled_pending_frame_equals_a_frame_appended_with_its_salience() {
    let (layers, qh, kvh, d, n) = (2, 4, 2, 64, 32);
    let policy: KvPolicy = "mixed:fblock=16,qblock=16,budget=0.6,salient=on"
        .parse()
        .unwrap();
    let s = shape(layers, qh, kvh, d);
    let mut pending = MixedKvCache::new(s, policy.clone(), 256).unwrap();
    let mut direct = MixedKvCache::new(s, policy, 256).unwrap();
    let mut rng = rng(5);
    // Four text tokens (the sinks), then a frame: budget floor(0.6 * 36) = 21, 4 held: room
    // for 17, of which 16 fill a whole FP16 block.
    let text: Vec<u32> = (0..4).collect();
    let (tp, td) = (
        pending.append_span(TokenKind::Text, &text, None).unwrap(),
        direct.append_span(TokenKind::Text, &text, None).unwrap(),
    );
    for layer in 0..layers {
        let (k, v) = (
            rand_kv(&mut rng, 4, kvh, d, false),
            rand_kv(&mut rng, 4, kvh, d, false),
        );
        pending.write(layer, &tp, &k, &v).unwrap();
        direct.write(layer, &td, &k, &v).unwrap();
    }
    assert!(pending.wants_salience(n));
    let pos: Vec<u32> = (4..4 + n as u32).collect();
    let frame = pending.append_pending_frame(&pos, 7).unwrap();
    assert!(frame.is_pending());
    // Until it settles, the frame is stored as without scores: all quantized (the text
    // holds the sinks).
    assert!(frame.slots().iter().all(|s| s.pool == PoolKind::Quant));
    let mut kvs = Vec::new();
    for layer in 0..layers {
        let (k, v) = (
            rand_kv(&mut rng, n, kvh, d, true),
            rand_kv(&mut rng, n, kvh, d, false),
        );
        pending.write(layer, &frame, &k, &v).unwrap();
        // The frame's own prefill attends the pending blocks.
        let q = rand_q(&mut rng, n, qh, d);
        let mut out = vec![0f32; q.len()];
        pending.attend(layer, &frame, &q, &mut out).unwrap();
        kvs.push((k, v));
    }
    let salience: Vec<f32> = (0..n).map(|i| ((i * 13) % n) as f32).collect();
    let settled = pending.settle_frame(&frame, &salience, &kvs).unwrap();
    assert!(!settled.is_pending());
    assert!(matches!(
        pending.settle_frame(&frame, &salience, &kvs),
        Err(KvError::StaleSpan { .. })
    ));
    let fd = direct
        .append_frame_with_salience(&pos, 7, &salience)
        .unwrap();
    for (layer, (k, v)) in kvs.iter().enumerate() {
        direct.write(layer, &fd, k, v).unwrap();
    }
    let kinds = |sp: &jetvlm_kvcache::Span| sp.slots().iter().map(|s| s.pool).collect::<Vec<_>>();
    assert_eq!(kinds(&settled), kinds(&fd));
    let mut top: Vec<usize> = (0..n).collect();
    top.sort_by(|&a, &b| salience[b].total_cmp(&salience[a]));
    let mut want_fp16 = top[..16].to_vec();
    want_fp16.sort_unstable();
    let got_fp16: Vec<usize> = (0..n)
        .filter(|&i| settled.slots()[i].pool == PoolKind::Fp16)
        .collect();
    assert_eq!(got_fp16, want_fp16);
    assert_eq!(pending.memory(), direct.memory());
    assert_eq!(pending.cells().counts(), direct.cells().counts());
    // Each token holds its own row: FP16 tokens their FP16 values, quantized ones values
    // within half a step of INT4 over the frame's range (salient and quantized tokens
    // interleave in the span, so a misplaced row would be off by the data's spread).
    let (mut kb, mut vb) = (vec![0f32; d], vec![0f32; d]);
    for (layer, (k, v)) in kvs.iter().enumerate() {
        for (i, slot) in settled.slots().iter().enumerate() {
            for h in 0..kvh {
                let (pool, l) = pending.pool(layer, slot.pool).unwrap();
                jetvlm_kvcache::attention::reference::dequant_token(
                    pool.layout(),
                    pool.segment(l, slot.id, h),
                    slot.slot as usize,
                    &mut kb,
                    &mut vb,
                );
                for (x, deq) in [(k, &kb), (v, &vb)] {
                    let spread = x.iter().fold(0f32, |m, a| m.max(a.abs())) * 2.0;
                    for c in 0..d {
                        let want = x[(i * kvh + h) * d + c];
                        let bound = match slot.pool {
                            PoolKind::Fp16 => want.abs() * 1e-3,
                            PoolKind::Quant => 0.5 * spread / 15.0,
                        };
                        assert!((deq[c] - want).abs() <= bound, "token {i} layer {layer}");
                    }
                }
            }
        }
    }
    // A question after the frame reads the same cache either way.
    let qpos: Vec<u32> = (4 + n as u32..4 + n as u32 + 5).collect();
    let (ap, ad) = (
        pending.append_span(TokenKind::Text, &qpos, None).unwrap(),
        direct.append_span(TokenKind::Text, &qpos, None).unwrap(),
    );
    let q = rand_q(&mut rng, 5, qh, d);
    for layer in 0..layers {
        let (k, v) = (
            rand_kv(&mut rng, 5, kvh, d, false),
            rand_kv(&mut rng, 5, kvh, d, false),
        );
        pending.write(layer, &ap, &k, &v).unwrap();
        direct.write(layer, &ad, &k, &v).unwrap();
        for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
            let mut got = vec![0f32; q.len()];
            let mut want = vec![0f32; q.len()];
            pending
                .attend_with(kernel, layer, &ap, &q, &mut got)
                .unwrap();
            direct
                .attend_with(kernel, layer, &ad, &q, &mut want)
                .unwrap();
            assert_eq!(got, want, "layer {layer} with {kernel:?}");
        }
    }
    // The settled frame rolls back and evicts like any frame.
    pending.truncate_last(5).unwrap();
    pending.evict_frame(7).unwrap();
    assert_eq!(pending.len(), 4);
    assert_eq!(pending.cells().counts().fp16_tokens, 4);
}

#[test]
fn pending_frames_are_only_made_where_the_budget_has_room_and_settle_in_order() {
    let s = shape(1, 2, 1, 64);
    let salient: KvPolicy = "mixed:salient=on,fblock=16,budget=0.5".parse().unwrap();
    // The presets do not pick salient tokens.
    assert!(
        !MixedKvCache::new(s, KvPolicy::mixed(), 512)
            .unwrap()
            .wants_salience(64)
    );
    // Salient tokens only fill whole FP16 blocks: the 10% budget of a 64-token frame (6
    // tokens, 4 of them sinks) fills no 32-token block.
    let small: KvPolicy = "mixed:salient=on".parse().unwrap();
    assert!(!MixedKvCache::new(s, small, 512).unwrap().wants_salience(64));
    let mut c = MixedKvCache::new(s, salient.clone(), 512).unwrap();
    // Empty cache, 64-token frame: budget 32, the first 4 are sinks: room for 28.
    assert!(c.wants_salience(64));
    // Lots of text first: the budget is spent on text.
    let text: Vec<u32> = (0..100).collect();
    c.append_span(TokenKind::Text, &text, None).unwrap();
    assert!(!c.wants_salience(64));
    let fp16: KvPolicy = "fp16:salient=on".parse().unwrap();
    assert!(!MixedKvCache::new(s, fp16, 512).unwrap().wants_salience(64));

    let mut c = MixedKvCache::new(s, salient, 512).unwrap();
    let pos: Vec<u32> = (0..64).collect();
    let f = c.append_pending_frame(&pos, 1).unwrap();
    let kv = vec![(vec![0.5f32; 64 * 64], vec![0.25f32; 64 * 64])];
    // Tokens appended after a pending frame make it unsettleable (the caller's bug).
    let t = c.append_span(TokenKind::Text, &[64], None).unwrap();
    let e = c.settle_frame(&f, &[1.0; 64], &kv).unwrap_err();
    assert!(e.to_string().contains("appended after"), "{e}");
    c.truncate_last(1).unwrap();
    drop(t);
    let e = c.settle_frame(&f, &[1.0; 3], &kv).unwrap_err();
    assert!(matches!(e, KvError::ShapeMismatch { .. }), "{e}");
    let e = c.settle_frame(&f, &[f32::NAN; 64], &kv).unwrap_err();
    assert!(matches!(e, KvError::NonFinite { .. }), "{e}");
    let e = c.settle_frame(&f, &[1.0; 64], &[]).unwrap_err();
    assert!(matches!(e, KvError::ShapeMismatch { .. }), "{e}");
    // A span that is not pending cannot be settled.
    let mut scores = vec![0f32; 64];
    scores[40] = 5.0;
    scores[50] = 4.0;
    let settled = c.settle_frame(&f, &scores, &kv).unwrap();
    let e = c.settle_frame(&settled, &scores, &kv).unwrap_err();
    assert!(e.to_string().contains("pending"), "{e}");
    // Sinks 0-3, the two high scores, then ties by position: 26 more from token 4 on.
    let fp16: Vec<usize> = (0..64)
        .filter(|&i| settled.slots()[i].pool == PoolKind::Fp16)
        .collect();
    let mut want: Vec<usize> = (0..30).chain([40, 50]).collect();
    want.sort_unstable();
    assert_eq!(fp16, want);
    // The pending blocks went back to the pool: two full FP16 blocks hold the 32 tokens.
    assert_eq!(c.cells().counts().fp16_blocks, 2);
    assert_eq!(c.memory().frame_tokens, 64);
}

/// FP16 rows read back exactly as `f16::from_f32` rounds each value, at every token of a
/// span, up to the largest head size.
#[test]
fn fp16_rows_store_each_value_rounded_to_nearest() {
    for d in [64, 256] {
        let kvh = 2;
        let mut cache =
            MixedKvCache::new(shape(2, 4, kvh, d), "fp16".parse().unwrap(), 256).unwrap();
        let mut rng = rng(3);
        let pos: Vec<u32> = (0..40).collect();
        let span = cache.append_span(TokenKind::Text, &pos, None).unwrap();
        let mut k = rand_kv(&mut rng, 40, kvh, d, true);
        let v = rand_kv(&mut rng, 40, kvh, d, false);
        // Values halfway between two FP16 values round to the even one.
        k[0] = 1.0 + 1.0 / 2048.0;
        k[1] = -(1.0 + 3.0 / 2048.0);
        cache.write(1, &span, &k, &v).unwrap();
        let (mut kb, mut vb) = (vec![0f32; d], vec![0f32; d]);
        for (i, slot) in span.slots().iter().enumerate() {
            for h in 0..kvh {
                read_token(&cache, 1, slot, h, &mut kb, &mut vb);
                for c in 0..d {
                    let at = (i * kvh + h) * d + c;
                    let want = |x: f32| half::f16::from_f32(x).to_f32().to_bits();
                    assert_eq!(kb[c].to_bits(), want(k[at]), "d {d}: key {at}");
                    assert_eq!(vb[c].to_bits(), want(v[at]), "d {d}: value {at}");
                }
            }
        }
    }
}

/// Layer `layer`'s key and value of one cached token (`slot`) for KV head `h`, as f32.
fn read_token(
    cache: &MixedKvCache,
    layer: usize,
    slot: &jetvlm_kvcache::cells::SlotRef,
    h: usize,
    k: &mut [f32],
    v: &mut [f32],
) {
    let (pool, at) = cache.pool(layer, slot.pool).unwrap();
    jetvlm_kvcache::attention::reference::dequant_token(
        pool.layout(),
        pool.segment(at, slot.id, h),
        slot.slot as usize,
        k,
        v,
    );
}
