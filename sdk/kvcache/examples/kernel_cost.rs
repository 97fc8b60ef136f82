//! CPU time per decode attention call with a cache small enough to stay in cache: the
//! compute cost of each kernel, independent of memory bandwidth and of other processes
//! (process CPU time from /proc/self/stat). Calls run inside a one-thread pool, so no
//! thread hand-off is counted; "fastest call" is the least wall time of one call.
//!
//! `cargo run --release -p jetvlm-kvcache --example kernel_cost -- [tokens] [policy...]`
//! (`KERNEL=avx512|avx2|portable` runs one kernel only)

use jetvlm_core::TokenKind;
use jetvlm_kvcache::{CacheShape, Kernel, KvPolicy, MixedKvCache};
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    pool.install(run);
}

fn run() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokens: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let policies: Vec<String> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec!["fp16".into(), "mixed:budget=0,sinks=0".into()]
    };
    let shape = CacheShape {
        layers: 1,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    for p in policies {
        let policy: KvPolicy = p.parse().expect("policy");
        let mut cache = MixedKvCache::new(shape, policy, tokens + 1).expect("cache");
        let mut x = 1u32;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                    (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        let frames = tokens / 64;
        for f in 0..frames {
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
        let q = rnd(9 * 64);
        let mut out = vec![0f32; 9 * 64];
        let only: Option<Kernel> = std::env::var("KERNEL").ok().and_then(|k| k.parse().ok());
        for kernel in [Kernel::Avx512, Kernel::Avx2, Kernel::Neon, Kernel::Portable] {
            if !kernel.available() || only.is_some_and(|o| o != kernel) {
                continue;
            }
            let (c0, t0) = (cpu_seconds(), Instant::now());
            let mut calls = 0;
            let mut best = f64::INFINITY;
            while t0.elapsed().as_secs_f64() < 2.0 {
                let t = Instant::now();
                cache
                    .attend_with(kernel, 0, &s, &q, &mut out)
                    .expect("attend");
                best = best.min(t.elapsed().as_secs_f64());
                calls += 1;
            }
            let cpu = cpu_seconds() - c0;
            let th = (cache.len() * 3) as f64;
            println!(
                "{p:<28} {:<9} cpu {:>8.1} us/call  {:>6.2} ns per token-kvhead  (wall {:.1} us/call; fastest call {:.1} us = {:.2} ns per token-kvhead)",
                kernel.name(),
                cpu * 1e6 / calls as f64,
                cpu * 1e9 / calls as f64 / th,
                t0.elapsed().as_secs_f64() * 1e6 / calls as f64,
                best * 1e6,
                best * 1e9 / th
            );
        }
    }
}
