//! Criterion benchmark of one decode step's attention in one layer (9 query heads, 3 KV
//! heads, head dim 64), FP16 vs mixed policy, for each available kernel.
//!
//! The cache here (4096 tokens, about 3 MiB FP16) fits in the last-level cache, so this
//! measures the kernels' compute; `jetvlm bench kv` measures from DRAM against bandwidth.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jetvlm_core::TokenKind;
use jetvlm_kvcache::{CacheShape, Kernel, KvPolicy, MixedKvCache, Span};
use std::hint::black_box;

fn build(policy: &str, tokens: usize) -> (MixedKvCache, Span) {
    let shape = CacheShape {
        layers: 1,
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
    cache
        .write(0, &s, &rnd(text * 192), &rnd(text * 192))
        .expect("write");
    for f in 0..(tokens - text) / 64 {
        let p0 = cache.next_position();
        let pos: Vec<u32> = (p0..p0 + 64).collect();
        let s = cache
            .append_span(TokenKind::Frame, &pos, Some(f as u64))
            .expect("append");
        cache
            .write(0, &s, &rnd(64 * 192), &rnd(64 * 192))
            .expect("write");
    }
    let p0 = cache.next_position();
    let s = cache
        .append_span(TokenKind::Text, &[p0], None)
        .expect("append");
    cache.write(0, &s, &rnd(192), &rnd(192)).expect("write");
    (cache, s)
}

fn bench(c: &mut Criterion) {
    let tokens = 4096;
    let mut g = c.benchmark_group("decode_attention_4096");
    for policy in ["fp16", "mixed"] {
        let (cache, span) = build(policy, tokens);
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
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
