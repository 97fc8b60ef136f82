//! Every attention kernel against the f32 reference on the same cached data, and the
//! FP16 policy against plain f32 attention on the original data.

mod common;
use common::*;
use jetvlm_core::TokenKind;
use jetvlm_kvcache::{AttendMask, Kernel, KvPolicy, MixedKvCache};

/// Every fast kernel this CPU runs (on an AVX-512 machine: portable, AVX2 and AVX-512, so
/// the fallbacks are tested too).
fn kernels() -> Vec<Kernel> {
    Kernel::ALL
        .into_iter()
        .filter(|k| *k != Kernel::Reference && k.available())
        .collect()
}

#[test]
fn decode_kernels_match_reference_for_every_policy() {
    for (pi, policy) in policies().into_iter().enumerate() {
        for &(q, kv, d) in &[
            (9usize, 3usize, 64usize),
            (4, 4, 128),
            (8, 2, 32),
            (12, 2, 64),
            (10, 2, 64),
            (16, 2, 128),
            (6, 2, 96),
        ] {
            if d % policy.fitted_to(d).group != 0 {
                continue;
            }
            let mut rng = rng(100 + pi as u64);
            let mut cache = MixedKvCache::new(shape(2, q, kv, d), policy.clone(), 4096).unwrap();
            fill(&mut cache, &mut rng, 37, 3, 64, false);
            let p = cache.next_position();
            let span = cache.append_span(TokenKind::Text, &[p], None).unwrap();
            for layer in 0..2 {
                let k = rand_kv(&mut rng, 1, kv, d, false);
                let v = rand_kv(&mut rng, 1, kv, d, false);
                cache.write(layer, &span, &k, &v).unwrap();
                let qv = rand_q(&mut rng, 1, q, d);
                let mut want = vec![0f32; q * d];
                cache
                    .attend_with(Kernel::Reference, layer, &span, &qv, &mut want)
                    .unwrap();
                for kern in kernels() {
                    let mut got = vec![0f32; q * d];
                    cache
                        .attend_with(kern, layer, &span, &qv, &mut got)
                        .unwrap();
                    let e = rel_err(&got, &want);
                    assert!(
                        e < 1e-3,
                        "{} {:?} shape ({q},{kv},{d}): rel err {e}",
                        policy,
                        kern
                    );
                }
            }
        }
    }
}

#[test]
fn prefill_kernels_match_reference_causally() {
    for policy in policies() {
        let (q, kv, d) = (6, 2, 64);
        if d % policy.fitted_to(d).group != 0 {
            continue;
        }
        let mut rng = rng(7);
        let mut cache = MixedKvCache::new(shape(1, q, kv, d), policy.clone(), 4096).unwrap();
        let spans = fill(&mut cache, &mut rng, 20, 2, 40, true);
        // Attend with the queries of a frame span (causal inside it) and the last text span.
        for (span, _, _) in [&spans[1], &spans[3]] {
            let qv = rand_q(&mut rng, span.len(), q, d);
            let mut want = vec![0f32; qv.len()];
            cache
                .attend_with(Kernel::Reference, 0, span, &qv, &mut want)
                .unwrap();
            for kern in kernels() {
                let mut got = vec![0f32; qv.len()];
                cache.attend_with(kern, 0, span, &qv, &mut got).unwrap();
                let e = rel_err(&got, &want);
                assert!(e < 1e-3, "{policy} {kern:?}: rel err {e}");
            }
        }
    }
}

/// Plain f32 causal attention of one query over given K/V rows `[n][d]`.
fn plain_attention(q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>]) -> Vec<f32> {
    let d = q.len();
    let s: Vec<f64> = keys
        .iter()
        .map(|k| {
            k.iter()
                .zip(q)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
                / (d as f64).sqrt()
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let l: f64 = w.iter().sum();
    (0..d)
        .map(|c| {
            (w.iter()
                .zip(vals)
                .map(|(p, v)| p * v[c] as f64)
                .sum::<f64>()
                / l) as f32
        })
        .collect()
}

#[test]
fn fp16_policy_matches_f32_attention_on_original_data() {
    let (qh, kvh, d) = (4, 2, 64);
    let mut rng = rng(11);
    let mut cache = MixedKvCache::new(shape(1, qh, kvh, d), KvPolicy::fp16(), 2048).unwrap();
    let spans = fill(&mut cache, &mut rng, 30, 4, 50, false);
    let mut keys = vec![Vec::new(); kvh];
    let mut vals = vec![Vec::new(); kvh];
    for (span, k, v) in &spans {
        for i in 0..span.len() {
            for h in 0..kvh {
                keys[h].push(k[(i * kvh + h) * d..][..d].to_vec());
                vals[h].push(v[(i * kvh + h) * d..][..d].to_vec());
            }
        }
    }
    let last = &spans.last().unwrap().0;
    let n = last.len();
    let qv = rand_q(&mut rng, n, qh, d);
    let total = keys[0].len();
    let mut want = vec![0f32; n * qh * d];
    for i in 0..n {
        let visible = total - n + i + 1;
        for h in 0..qh {
            let kh = h / (qh / kvh);
            let o = plain_attention(
                &qv[(i * qh + h) * d..][..d],
                &keys[kh][..visible],
                &vals[kh][..visible],
            );
            want[(i * qh + h) * d..][..d].copy_from_slice(&o);
        }
    }
    for kern in [Kernel::Reference].into_iter().chain(kernels()) {
        let mut got = vec![0f32; n * qh * d];
        cache.attend_with(kern, 0, last, &qv, &mut got).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < 1e-3, "{kern:?}: rel err {e}");
    }
}

/// Outlier-heavy keys (a few channels 20-50x larger, as real LLM keys have) over every
/// policy and head grouping the SIMD kernels split differently (1 to 8 query heads per KV
/// head, head dims 64 to 256, partial blocks), for every kernel this CPU runs.
#[test]
fn decode_kernels_match_reference_on_outlier_keys() {
    for (pi, policy) in policies().into_iter().enumerate() {
        for &(q, kv, d) in &[
            (9usize, 3usize, 64usize),
            (10, 2, 64),
            (7, 7, 64),
            (16, 2, 128),
            (6, 1, 192),
            (12, 3, 256),
        ] {
            if d % policy.fitted_to(d).group != 0 {
                continue;
            }
            let mut rng = rng(500 + pi as u64);
            let mut cache = MixedKvCache::new(shape(1, q, kv, d), policy.clone(), 4096).unwrap();
            fill(&mut cache, &mut rng, 45, 3, 64, true);
            let span = decode_token(&mut cache, &mut rng, true);
            // Queries partly aligned with the outlier channels, as real queries are.
            let qv: Vec<f32> = rand_q(&mut rng, 1, q, d)
                .into_iter()
                .enumerate()
                .map(|(i, x)| if i % d % 16 == 5 { 0.2 * x } else { x })
                .collect();
            let mut want = vec![0f32; q * d];
            cache
                .attend_with(Kernel::Reference, 0, &span, &qv, &mut want)
                .unwrap();
            for kern in kernels() {
                let mut got = vec![0f32; q * d];
                cache.attend_with(kern, 0, &span, &qv, &mut got).unwrap();
                let e = rel_err(&got, &want);
                assert!(
                    e < 1e-3,
                    "{policy} {kern:?} shape ({q},{kv},{d}): rel err {e}"
                );
            }
        }
    }
}

/// A 1006-token context split into 1 to 4 chunks per KV head (pools of 1, 2, 3 and 8
/// threads), under sliding windows that start inside a block, on a block boundary, or
/// cover everything, for FP16 blocks of 16 and 32 tokens and the mixed policy's frame
/// blocks.
#[test]
fn decode_kernels_match_reference_in_chunks_and_windows() {
    for policy in [
        "fp16",
        "fp16:fblock=16",
        "mixed",
        "mixed:qblock=16,fblock=16",
    ] {
        let policy: KvPolicy = policy.parse().unwrap();
        let (q, kv, d) = (9, 3, 64);
        let mut rng = rng(900);
        let mut cache = MixedKvCache::new(shape(1, q, kv, d), policy.clone(), 4096).unwrap();
        fill(&mut cache, &mut rng, 301, 11, 64, true);
        let span = decode_token(&mut cache, &mut rng, false);
        let qv = rand_q(&mut rng, 1, q, d);
        for window in [None, Some(1), Some(17), Some(64), Some(333), Some(100_000)] {
            let mask = AttendMask {
                whole_span: false,
                window,
            };
            let mut want = vec![0f32; q * d];
            cache
                .attend_masked_with(Kernel::Reference, 0, &span, &qv, &mut want, mask)
                .unwrap();
            for threads in [1, 2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for kern in kernels() {
                    let mut got = vec![0f32; q * d];
                    pool.install(|| {
                        cache
                            .attend_masked_with(kern, 0, &span, &qv, &mut got, mask)
                            .unwrap()
                    });
                    let e = rel_err(&got, &want);
                    assert!(
                        e < 1e-3,
                        "{policy} {kern:?} window {window:?} {threads} threads: rel err {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn kernel_names_parse_and_detection_picks_an_available_kernel() {
    for k in Kernel::ALL {
        assert_eq!(k.name().parse::<Kernel>(), Ok(k));
    }
    assert!("avx3".parse::<Kernel>().is_err());
    assert!(Kernel::detect_cpu().available());
    assert_ne!(Kernel::detect_cpu(), Kernel::Reference);
    assert!(Kernel::Portable.available() && Kernel::Reference.available());
    #[cfg(target_arch = "x86_64")]
    assert!(!Kernel::Neon.available());
    #[cfg(target_arch = "aarch64")]
    assert!(Kernel::Neon.available() && !Kernel::Avx2.available());
}
