//! Facts about the machine that benchmarks hold results against: the last-level CPU cache
//! size (so timed working sets can be made larger than it) and the measured streaming memory
//! read bandwidth (the roofline's denominator, measured in the same run as the benchmark).

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

/// One CPU cache as the kernel describes it under `/sys/devices/system/cpu/cpu0/cache/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuCache {
    /// 1, 2, 3, ...
    pub level: u32,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    pub bytes: u64,
}

/// The caches of CPU 0, in the order the kernel lists them. Empty where sysfs does not
/// describe them (some containers and non-Linux systems).
pub fn cpu_caches() -> Vec<CpuCache> {
    cpu_caches_in(Path::new("/sys/devices/system/cpu/cpu0/cache"))
}

/// [`cpu_caches`] reading from another sysfs cache directory (tests, other CPUs).
pub fn cpu_caches_in(dir: &Path) -> Vec<CpuCache> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("index"))
        })
        .collect();
    paths.sort();
    for p in paths {
        let read = |name: &str| std::fs::read_to_string(p.join(name)).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let (Ok(level), Some(bytes)) = (level.trim().parse::<u32>(), parse_size(size.trim()))
        else {
            continue;
        };
        out.push(CpuCache {
            level,
            kind: kind.trim().to_string(),
            bytes,
        });
    }
    out
}

/// Parses sysfs cache sizes such as `32K`, `1024K`, `32768K`, `2M`, `512`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, mult) = match text.chars().last()? {
        'K' | 'k' => (&text[..text.len() - 1], 1024),
        'M' | 'm' => (&text[..text.len() - 1], 1024 * 1024),
        'G' | 'g' => (&text[..text.len() - 1], 1024 * 1024 * 1024),
        _ => (text, 1),
    };
    digits.trim().parse::<u64>().ok().map(|n| n * mult)
}

/// Size in bytes of the largest-level data or unified cache of CPU 0, `None` when the system
/// does not say.
pub fn last_level_cache_bytes() -> Option<u64> {
    last_level_of(&cpu_caches())
}

fn last_level_of(caches: &[CpuCache]) -> Option<u64> {
    caches
        .iter()
        .filter(|c| c.kind != "Instruction")
        .max_by_key(|c| (c.level, c.bytes))
        .map(|c| c.bytes)
}

/// Result of [`measure_read_bandwidth`].
#[derive(Clone, Debug, PartialEq)]
pub struct BandwidthReport {
    /// Best streaming read bandwidth over the runs, in GB/s (10^9 bytes per second).
    pub gbs: f64,
    /// Bytes read per run (the whole buffer).
    pub buffer_bytes: usize,
    /// Threads reading in parallel.
    pub threads: usize,
    /// Timed runs (after one untimed warm-up run).
    pub runs: usize,
    /// Seconds of the best run.
    pub best_seconds: f64,
    /// The last-level cache size the buffer was sized against, when known.
    pub llc_bytes: Option<u64>,
}

/// Smallest buffer a bandwidth measurement uses: four times the last-level cache, and never
/// under 256 MiB (virtual machines often report only a slice of the host's cache).
pub fn bandwidth_buffer_bytes(min_bytes: usize) -> usize {
    let llc = last_level_cache_bytes().unwrap_or(0) as usize;
    min_bytes.max(4 * llc).max(256 << 20)
}

/// Measures streaming memory read bandwidth: every available core sums its own contiguous
/// slice of a buffer of at least `max(min_bytes, 4 x LLC, 256 MiB)` bytes; the best of five
/// timed runs (after a warm-up run) is reported.
pub fn measure_read_bandwidth(min_bytes: usize) -> BandwidthReport {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    measure_read_bandwidth_with(bandwidth_buffer_bytes(min_bytes), threads, 5)
}

/// [`measure_read_bandwidth`] with an exact buffer size, thread count and number of runs.
pub fn measure_read_bandwidth_with(bytes: usize, threads: usize, runs: usize) -> BandwidthReport {
    let runs = runs.max(1);
    let probe = ReadProbe::new(bytes, threads);
    let mut best = f64::INFINITY;
    for run in 0..=runs {
        let secs = probe.read();
        if run > 0 {
            best = best.min(secs);
        }
    }
    BandwidthReport {
        gbs: probe.bytes() as f64 / best / 1e9,
        buffer_bytes: probe.bytes(),
        threads: probe.threads,
        runs,
        best_seconds: best,
        llc_bytes: last_level_cache_bytes(),
    }
}

/// A buffer that `threads` cores read in one timed pass, each its own contiguous slice: one
/// sample of the streaming read bandwidth per [`ReadProbe::read`], and, when the buffer
/// exceeds the last-level cache, an eviction of that cache (reads only: no dirty lines are
/// left to write back). [`measure_read_bandwidth`] takes the best of several passes; `jetvlm
/// bench decode` reads one between decode steps, so the bandwidth it holds a step against
/// is measured at the same moment as the step.
pub struct ReadProbe {
    pages: crate::mem::PageBuffer,
    threads: usize,
    chunk: usize,
}

impl ReadProbe {
    /// A probe of at least `bytes` (whole 64-bit words, at least 64 per thread) read by
    /// `threads` threads (at least one). Each thread touches (and so places) its own slice
    /// first. The buffer is backed like the KV cache pools (huge pages where the kernel gives
    /// them), so attention and the probe pay the same address translation.
    pub fn new(bytes: usize, threads: usize) -> Self {
        let threads = threads.max(1);
        let words = (bytes / 8).max(threads * 64);
        let mut pages = crate::mem::PageBuffer::zeroed(words * 8);
        let chunk = words.div_ceil(threads);
        std::thread::scope(|s| {
            for (i, part) in pages.words_mut().chunks_mut(chunk).enumerate() {
                s.spawn(move || {
                    for (j, w) in part.iter_mut().enumerate() {
                        *w = (i as u64) << 32 | j as u64;
                    }
                });
            }
        });
        Self {
            pages,
            threads,
            chunk,
        }
    }

    /// Bytes one pass reads.
    pub fn bytes(&self) -> usize {
        self.pages.words().len() * 8
    }

    /// Threads one pass uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Reads the whole buffer once; the seconds it took.
    pub fn read(&self) -> f64 {
        let words = self.pages.words();
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(self.chunk)
                .map(|part| s.spawn(move || sum_words(black_box(part))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        let secs = start.elapsed().as_secs_f64();
        black_box(total);
        secs
    }
}

/// Sums a slice with eight independent accumulators so that the loop is load-bound.
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    let mut total = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    for a in acc {
        total = total.wrapping_add(a);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_sizes() {
        assert_eq!(parse_size("32K"), Some(32 * 1024));
        assert_eq!(parse_size("32768K"), Some(32 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("abc"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn reads_a_sysfs_cache_tree() {
        let dir = std::env::temp_dir().join(format!("jetvlm-sysinfo-{}", std::process::id()));
        let entries = [
            ("index0", "1", "Data", "32K"),
            ("index1", "1", "Instruction", "32K"),
            ("index2", "2", "Unified", "1024K"),
            ("index3", "3", "Unified", "32768K"),
        ];
        for (name, level, kind, size) in entries {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("level"), format!("{level}\n")).unwrap();
            std::fs::write(d.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        }
        let caches = cpu_caches_in(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(caches.len(), 4);
        assert_eq!(last_level_of(&caches), Some(32 << 20));
        assert_eq!(last_level_of(&caches[..2]), Some(32 * 1024));
        assert_eq!(last_level_of(&[]), None);
    }

    #[test]
    fn missing_sysfs_gives_no_caches() {
        assert!(cpu_caches_in(Path::new("/nonexistent/jetvlm/cache")).is_empty());
    }

    #[test]
    fn sums_every_word() {
        let words: Vec<u64> = (1..=1001).collect();
        assert_eq!(sum_words(&words), 1001 * 1002 / 2);
    }

    #[test]
    fn small_bandwidth_run_reports_consistent_numbers() {
        let r = measure_read_bandwidth_with(1 << 20, 2, 2);
        assert_eq!(r.buffer_bytes, 1 << 20);
        assert!(r.gbs > 0.0 && r.gbs.is_finite());
        assert!((r.gbs - r.buffer_bytes as f64 / r.best_seconds / 1e9).abs() < 1e-6 * r.gbs);
    }

    #[test]
    fn a_probe_reads_its_whole_buffer_on_every_thread() {
        // Fewer bytes than 64 words per thread round up; a pass takes measurable time.
        let p = ReadProbe::new(100, 3);
        assert_eq!((p.bytes(), p.threads()), (3 * 64 * 8, 3));
        let words = p.pages.words();
        // Every thread placed its slice (slice index in the high half of each word).
        for (i, part) in words.chunks(p.chunk).enumerate() {
            assert!(
                part.iter()
                    .enumerate()
                    .all(|(j, &w)| w == (i as u64) << 32 | j as u64)
            );
        }
        assert!(p.read() > 0.0);
    }
}
