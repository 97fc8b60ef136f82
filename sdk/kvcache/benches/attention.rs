//! Criterion benchmark of one decode step's attention (9 query heads, 3 KV heads, head dim
//! 64, SmolLM2-135M's shape), FP16 vs mixed policy, for each available kernel.
//!
//! - `decode_attention_4096`: one layer of 4096 tokens (about 3 MiB FP16) that stays in the
//!   last-level cache, so it measures the kernels' compute.
//! - `decode_attention_30x1024_dram`: every layer of a 30-layer, 1024-token cache (23.6 MB
//!   FP16), with a buffer larger than the last-level cache (the bandwidth probe's size) read
//!   by the pool's threads before each step so the blocks come from DRAM, as in a decode
//!   step whose weights evicted them; the layers run on a pool thread as in the decoder.
//!   Throughput is against the bytes read. SIMD kernels only (`cargo bench -p
//!   jetvlm-kvcache --bench attention -- dram/fp16/avx512`).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jetvlm_core::TokenKind;
use jetvlm_kvcache::{CacheShape, Kernel, KvPolicy, MixedKvCache, Span};
use rayon::prelude::*;
use std::hint::black_box;

fn build(policy: &str, layers: usize, tokens: usize) -> (MixedKvCache, Span) {
    let shape = CacheShape {
        layers,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let mut cache = MixedKvCache::new(
        shape,
        policy.parse::<KvPolicy>().expect("policy"),
        tokens + 1,
    )
    .expect("cache");
    let mut x = 7u32;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let text = tokens / 10;
    let pos: Vec<u32> = (0..text as u32).collect();
    let s = cache
        .append_span(TokenKind::Text, &pos, None)
        .expect("append");
    for layer in 0..layers {
        cache
            .write(layer, &s, &rnd(text * 192), &rnd(text * 192))
            .expect("write");
    }
    for f in 0..(tokens - text) / 64 {
        let p0 = cache.next_position();
        let pos: Vec<u32> = (p0..p0 + 64).collect();
        let s = cache
            .append_span(TokenKind::Frame, &pos, Some(f as u64))
            .expect("append");
        for layer in 0..layers {
            cache
                .write(layer, &s, &rnd(64 * 192), &rnd(64 * 192))
                .expect("write");
        }
    }
    let p0 = cache.next_position();
    let s = cache
        .append_span(TokenKind::Text, &[p0], None)
        .expect("append");
    for layer in 0..layers {
        cache.write(layer, &s, &rnd(192), &rnd(192)).expect("write");
    }
    (cache, s)
}

fn bench(c: &mut Criterion) {
    let tokens = 4096;
    let mut g = c.benchmark_group("decode_attention_4096");
    for policy in ["fp16", "mixed"] {
        let (cache, span) = build(policy, 1, tokens);
        g.throughput(Throughput::Bytes(cache.memory().attention_read_bytes));
        let q = vec![0.01f32; 9 * 64];
        let mut out = vec![0f32; 9 * 64];
        for kernel in [Kernel::Avx512, Kernel::Avx2, Kernel::Neon, Kernel::Portable] {
            if !kernel.available() {
                continue;
            }
            g.bench_with_input(BenchmarkId::new(policy, kernel.name()), &kernel, |b, &k| {
                b.iter(|| {
                    cache
                        .attend_with(k, 0, black_box(&span), black_box(&q), &mut out)
                        .expect("attend")
                })
            });
        }
    }
    g.finish();

    let (layers, tokens) = (30, 1024);
    let mut g = c.benchmark_group("decode_attention_30x1024_dram");
    // Larger than the last-level cache (`bandwidth_buffer_bytes`: 4x the LLC, at least
    // 256 MiB), or a host with a large LLC would serve the blocks from it.
    let evict_words = jetvlm_core::sysinfo::bandwidth_buffer_bytes(0) / 8;
    let evict: Vec<u64> = (0..evict_words as u64).collect();
    for policy in ["fp16", "mixed"] {
        let (cache, span) = build(policy, layers, tokens);
        g.throughput(Throughput::Bytes(cache.memory().attention_read_bytes));
        let q = vec![0.01f32; 9 * 64];
        let mut out = vec![0f32; 9 * 64];
        for kernel in [Kernel::Avx512, Kernel::Avx2, Kernel::Neon] {
            if !kernel.available() {
                continue;
            }
            g.bench_with_input(BenchmarkId::new(policy, kernel.name()), &kernel, |b, &k| {
                b.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    for i in 0..iters {
                        // Evict the cache from the last-level cache (reads: no dirty
                        // lines to write back during the step; not timed).
                        black_box(
                            evict
                                .par_chunks(1 << 16)
                                .map(|c| c.iter().step_by(8).fold(i, |a, &x| a ^ x))
                                .reduce(|| 0, |a, b| a ^ b),
                        );
                        // The layers run on a pool thread, as the decoder's forward pass
                        // does, so no call waits for a hand-off from outside the pool.
                        total += rayon::scope(|_| {
                            let t = std::time::Instant::now();
                            for layer in 0..layers {
                                cache
                                    .attend_with(
                                        k,
                                        layer,
                                        black_box(&span),
                                        black_box(&q),
                                        &mut out,
                                    )
                                    .expect("attend");
                            }
                            t.elapsed()
                        });
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
