//! Instruction throughput of the operations the AVX-512 attention kernels are built from, to
//! compare a kernel's cost per (token, KV head) with its floor: twelve independent
//! accumulators per loop, timed with the wall clock and converted to cycles at a clock the
//! program measures itself (a chain of dependent scalar adds, one per cycle).
//!
//! `cargo run --release -p jetvlm-kvcache --example simd_floor` (x86_64 with AVX-512 VNNI)
//!
//! The INT4 decode kernels need 2 `vpdpbusd` per (token, query head) for keys (15-bit
//! queries as two signed bytes) and 2 `vpdpwssd` per (token, query head) for values (int16
//! weights, two tokens per instruction): 12 per (token, KV head) with 3 query heads per KV
//! head. FP16 blocks need 24 `vfmadd231ps` per (token, KV head) for the same shape.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::time::Instant;

    /// Cycles per iteration of `f`, best of five runs of `iters` iterations.
    fn best_ns(iters: u64, f: impl Fn(u64)) -> f64 {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f(iters);
                t.elapsed().as_secs_f64() * 1e9 / iters as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    fn clock_ghz() -> f64 {
        // 8 dependent adds per iteration: 8 cycles.
        let ns = best_ns(50_000_000, |n| {
            let mut x = 0u64;
            for _ in 0..n {
                // SAFETY: register-only arithmetic.
                unsafe {
                    asm!(
                        "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                        "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                        x = inout(reg) x,
                        options(nomem, nostack)
                    );
                }
            }
            std::hint::black_box(x);
        });
        8.0 / ns
    }

    /// Twelve independent `op dst, a, b` on zmm registers per iteration, plus `extra`.
    macro_rules! twelve {
        ($op:literal, $extra:literal) => {
            |n: u64| {
                for _ in 0..n {
                    // SAFETY: register-only AVX-512 instructions on registers declared
                    // clobbered; the caller checked the CPU features.
                    unsafe {
                        asm!(
                            concat!($op, " zmm0, zmm12, zmm13"),
                            concat!($op, " zmm1, zmm12, zmm13"),
                            concat!($op, " zmm2, zmm12, zmm13"),
                            concat!($op, " zmm3, zmm12, zmm13"),
                            concat!($op, " zmm4, zmm12, zmm13"),
                            concat!($op, " zmm5, zmm12, zmm13"),
                            concat!($op, " zmm6, zmm12, zmm13"),
                            concat!($op, " zmm7, zmm12, zmm13"),
                            concat!($op, " zmm8, zmm12, zmm13"),
                            concat!($op, " zmm9, zmm12, zmm13"),
                            concat!($op, " zmm10, zmm12, zmm13"),
                            concat!($op, " zmm11, zmm12, zmm13"),
                            $extra,
                            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                            out("zmm16") _, out("zmm17") _,
                            options(nomem, nostack)
                        );
                    }
                }
            }
        };
    }

    pub fn run() {
        let ok = ["avx512f", "avx512bw", "avx512vnni"]
            .iter()
            .all(|f| match *f {
                "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
                _ => std::arch::is_x86_feature_detected!("avx512vnni"),
            });
        if !ok {
            println!("this CPU lacks AVX-512 F/BW/VNNI; nothing to measure");
            return;
        }
        let ghz = clock_ghz();
        println!("clock: {ghz:.2} GHz (dependent scalar adds)");
        let n = 20_000_000;
        let rows: [(&str, f64); 7] = [
            ("12 vpdpbusd zmm", best_ns(n, twelve!("vpdpbusd", ""))),
            ("12 vpdpwssd zmm", best_ns(n, twelve!("vpdpwssd", ""))),
            ("12 vfmadd231ps zmm", best_ns(n, twelve!("vfmadd231ps", ""))),
            (
                "12 vpdpbusd + 4 vpermt2d",
                best_ns(
                    n,
                    twelve!(
                        "vpdpbusd",
                        "vpermt2d zmm14, zmm12, zmm13\nvpermt2d zmm15, zmm12, zmm13\nvpermt2d zmm16, zmm12, zmm13\nvpermt2d zmm17, zmm12, zmm13"
                    ),
                ),
            ),
            (
                "12 vpdpbusd + 4 vpunpckldq",
                best_ns(
                    n,
                    twelve!(
                        "vpdpbusd",
                        "vpunpckldq zmm14, zmm12, zmm13\nvpunpckldq zmm15, zmm12, zmm13\nvpunpckldq zmm16, zmm12, zmm13\nvpunpckldq zmm17, zmm12, zmm13"
                    ),
                ),
            ),
            (
                "12 vpdpbusd + 4 vpandd",
                best_ns(
                    n,
                    twelve!(
                        "vpdpbusd",
                        "vpandd zmm14, zmm12, zmm13\nvpandd zmm15, zmm12, zmm13\nvpandd zmm16, zmm12, zmm13\nvpandd zmm17, zmm12, zmm13"
                    ),
                ),
            ),
            (
                "12 vpdpbusd + 4 vshufi32x4",
                best_ns(
                    n,
                    twelve!(
                        "vpdpbusd",
                        "vshufi32x4 zmm14, zmm12, zmm13, 0x44\nvshufi32x4 zmm15, zmm12, zmm13, 0x44\nvshufi32x4 zmm16, zmm12, zmm13, 0x44\nvshufi32x4 zmm17, zmm12, zmm13, 0x44"
                    ),
                ),
            ),
        ];
        println!("{:<30} {:>10} {:>12}", "per loop iteration", "ns", "cycles");
        for (name, ns) in rows {
            println!("{name:<30} {ns:>10.2} {:>12.2}", ns * ghz);
        }
        let vnni = rows[0].1 / 12.0;
        let fma = rows[2].1 / 12.0;
        println!(
            "floor per (token, KV head) with 3 query heads: INT4 12 VNNI = {:.2} ns, FP16 24 FMA = {:.2} ns",
            12.0 * vnni,
            24.0 * fma
        );
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("simd_floor measures x86_64 AVX-512 instructions; nothing to do here");
}
