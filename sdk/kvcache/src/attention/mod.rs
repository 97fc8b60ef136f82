//! Attention over mixed blocks on the CPU.
//!
//! One pass per (query, KV head, chunk of blocks) with online softmax across blocks
//! (flash-decoding style); chunks of one query and head are merged at the end. Each block
//! is read once for all the query heads that share its KV head (grouped-query attention),
//! and quantized blocks are never dequantized into a buffer:
//!
//! - per-token key groups: `q . k = sum_g s_g * (q_g . codes_g) + z_g * sum(q_g)`;
//! - per-channel keys: the scales are folded into `q` once per block,
//!   `q . k = (q * s) . codes + q . z`;
//! - values: `sum_t p_t (s_t codes_t + z_t) = sum_t (p_t s_t) codes_t + sum_t p_t z_t`.
//!
//! Kernels: [`Kernel::Portable`] (plain Rust), [`Kernel::Avx2`] (x86_64 AVX2 + FMA + F16C,
//! detected at run time), [`Kernel::Avx512`] (x86_64 AVX-512 with VNNI, detected at run
//! time), [`Kernel::Neon`] (aarch64: integer INT4 kernels). [`Kernel::Reference`] is the
//! slow f32 twin every kernel is tested against. `JETVLM_KV_KERNEL=portable|avx2|avx512|neon`
//! overrides what [`Kernel::detect`] picks (when the CPU runs it).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;
pub mod reference;

use crate::cells::{Cells, PoolKind, Span};
use crate::layout::{Fp16Layout, QuantLayout};
use crate::pool::{Pool, PoolLayout};

/// How many blocks ahead a task prefetches, whichever pool the block is in (the attention
/// bench's `dram` case, 30 layers x 1024 tokens from DRAM):
/// - FP16 blocks: on a 2-core Xeon VM (AVX-512, a core streams about 15 GB/s from DRAM on
///   its own) one block ahead takes the FP16 case from 1.71-1.85 ms (0: a block hints only
///   its own lines) to 1.27 (2 threads; 1.41 at 2 blocks ahead; on a busier host,
///   alternated three times, 2.07-2.22 ms to 1.61-1.69); on a 2-core Zen 4 VM, whose
///   hardware prefetcher follows a run of FP16 blocks well, it measured 1.38-1.40 ms
///   against 1.32-1.36 at 0 (one thread);
/// - quantized blocks, which take longer per byte (mixed policy, Zen 4: 1.05 ms at 1,
///   1.12-1.16 at 0, 1.12 at 2; Xeon: 0.72 ms at 1, 0.77 at 0, 0.75 at 2).
const PREFETCH_AHEAD: usize = 1;

/// Largest query heads per KV head the fast kernels take.
pub const MAX_GQA: usize = 16;
/// Largest head dimension the fast kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest block (tokens) of either pool.
pub const MAX_BLOCK_TOKENS: usize = 128;
pub(crate) const MAX_GROUPS: usize = MAX_HEAD_DIM / 32;

/// Which attention implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Dequantize to f32 and run textbook attention in f64 (slow; for tests).
    Reference,
    /// Fused kernels in plain Rust.
    Portable,
    /// Fused kernels with AVX2, FMA and F16C (x86_64).
    Avx2,
    /// Fused kernels with AVX-512 F/BW/DQ/VL and VNNI integer dot products (x86_64); shapes
    /// and formats they do not cover run the AVX2 kernels.
    Avx512,
    /// NEON integer kernels for INT4 blocks (aarch64, e.g. Jetson); the rest portable.
    Neon,
}

impl Kernel {
    /// Every kernel, slowest first.
    pub const ALL: [Kernel; 5] = [
        Kernel::Reference,
        Kernel::Portable,
        Kernel::Avx2,
        Kernel::Avx512,
        Kernel::Neon,
    ];

    /// The fastest kernel this CPU runs, capped by `JETVLM_KV_KERNEL` when it names a
    /// kernel (e.g. `avx2` on an AVX-512 machine, to compare).
    pub fn detect() -> Kernel {
        let best = Kernel::detect_cpu();
        match std::env::var("JETVLM_KV_KERNEL")
            .ok()
            .and_then(|v| v.parse::<Kernel>().ok())
        {
            Some(k) if k.available() => k,
            _ => best,
        }
    }
    /// The fastest kernel this CPU runs, ignoring the environment.
    pub fn detect_cpu() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(Kernel::Portable)
    }
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Reference | Kernel::Portable => true,
            Kernel::Avx2 => avx2_available(),
            Kernel::Avx512 => avx512_available(),
            Kernel::Neon => cfg!(target_arch = "aarch64"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Reference => "reference",
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Neon => "neon",
        }
    }
}

impl std::str::FromStr for Kernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown kernel `{s}` (expected reference, portable, avx2, avx512 or neon)")
            })
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    avx2_available()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}
#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

/// The scaled queries of one KV head's query heads, and per-group sums of them.
#[derive(Default)]
pub(crate) struct Prep {
    pub g: usize,
    pub d: usize,
    /// `[g][d]`, already multiplied by `1/sqrt(d)`.
    pub q: Vec<f32>,
    /// `[g][groups]`: sum of `q` over each quantization group.
    pub qsum: Vec<f32>,
    /// Scratch for kernels (e.g. `q` with per-channel scales folded in).
    pub scratch: Vec<f32>,
}

/// Running online-softmax state of one task.
#[derive(Default)]
pub(crate) struct State {
    pub g: usize,
    pub d: usize,
    pub m: [f32; MAX_GQA],
    pub l: [f32; MAX_GQA],
    /// `[g][d]` weighted sum of values (codes part for quantized blocks).
    pub acc: Vec<f32>,
    /// `[g][d]` weighted sum of value codes in an order private to the kernel family
    /// (quantized blocks); `Fns::finish` folds it into `acc`.
    pub qacc: Vec<f32>,
    /// `[g][groups]` weighted sum of value zeros (quantized blocks).
    pub zacc: Vec<f32>,
    /// Scores / probabilities of the current block, `[g][MAX_BLOCK_TOKENS]`.
    pub s: Vec<f32>,
    /// Kernel scratch of the same shape (e.g. probabilities times value scales). Used by
    /// the x86 kernels only (as `lv` and `zv`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub w: Vec<f32>,
    /// `[g][16]` per-lane partial sums of `l` (kernels that defer the horizontal sum;
    /// `Fns::finish` folds them into `l`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub lv: Vec<f32>,
    /// `[g][MAX_GROUPS][16]` per-lane partial sums of `zacc` (as `lv`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub zv: Vec<f32>,
}

/// The functions one kernel family provides.
#[derive(Clone, Copy)]
pub(crate) struct Fns {
    pub fp16_scores: fn(&Prep, &[u8], &Fp16Layout, usize, &mut [f32]),
    pub fp16_accum: fn(&mut State, &[u8], &Fp16Layout, usize),
    pub quant_scores: fn(&mut Prep, &[u8], &QuantLayout, usize, &mut [f32]),
    pub quant_accum: fn(&mut State, &[u8], &QuantLayout, usize),
    /// Turns the block's scores into probabilities and rescales the running state.
    pub softmax: fn(&mut State, usize),
    /// Hints that a segment is read next (a task's blocks are contiguous only within a
    /// pool chunk, and a text block sits in the other pool, so hardware prefetchers need
    /// help at those jumps).
    pub prefetch: fn(&[u8]),
    /// Folds kernel-ordered partial sums (`State::qacc`) into `State::acc` once per task.
    pub finish: fn(&mut State),
}

fn fns(kernel: Kernel) -> Fns {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if avx2_available() => avx2::fns(),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if avx512_available() => avx512::fns(),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => neon::fns(),
        _ => portable::fns(),
    }
}

/// What a fast attention pass needs to know about the cache.
pub(crate) struct Ctx<'a> {
    pub cells: &'a Cells,
    pub pools: &'a [Option<Pool>; 2],
    pub layer: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Value quantization group (head_dim when nothing is quantized).
    pub vgroup: usize,
}

struct BlockRef<'a> {
    pool: PoolKind,
    id: u32,
    seqs: &'a [u32],
}

/// Fused attention of `span`'s queries (see `MixedKvCache::attend`).
pub(crate) fn attend_fast(
    ctx: &Ctx<'_>,
    span: &Span,
    whole_span: bool,
    window: Option<usize>,
    q: &[f32],
    out: &mut [f32],
    kernel: Kernel,
) {
    let f = fns(kernel);
    let (d, kvh) = (ctx.d, ctx.kv_heads);
    let g = ctx.q_heads / kvh;
    let blocks: Vec<BlockRef<'_>> = ctx
        .cells
        .blocks()
        .map(|m| BlockRef {
            pool: m.pool,
            id: m.id,
            seqs: &m.seqs,
        })
        .collect();
    let nq = span.len();
    let threads = rayon::current_num_threads().max(1);
    let per_q = nq * kvh;
    // At least 2 tasks per thread and, where the blocks allow, a multiple of the thread
    // count, so both threads get the same share. Fewer, longer tasks stream more of each
    // run of blocks (a task's first block is read cold): decode with 3 KV heads on 2
    // threads takes 6 tasks, not 12 (`cargo bench -p jetvlm-kvcache --bench attention --
    // dram/fp16/avx512`, 30 layers x 1024 tokens from DRAM: 0.80-0.93 ms instead of
    // 0.91-1.29 on a busy machine).
    let chunks = if per_q >= 2 * threads {
        1
    } else {
        let mut c = (2 * threads).div_ceil(per_q);
        while !(per_q * c).is_multiple_of(threads) {
            c += 1;
        }
        c.min(blocks.len().div_ceil(8)).max(1)
    };
    let chunk_len = blocks.len().div_ceil(chunks).max(1);
    let stride = g * (d + 2);
    let mut partial = vec![0f32; per_q * chunks * stride];
    // One task per (query, KV head, chunk), on the decode step's team where there is one
    // (`jetvlm_core::par`).
    let mut tasks: Vec<(usize, &mut [f32])> = partial.chunks_mut(stride).enumerate().collect();
    jetvlm_core::par::for_each_mut(&mut tasks, |(task, buf)| {
        let (qk, c) = (*task / chunks, *task % chunks);
        let (i, kh) = (qk / kvh, qk % kvh);
        let lo = (c * chunk_len).min(blocks.len());
        let hi = ((c + 1) * chunk_len).min(blocks.len());
        run_task(
            ctx,
            &f,
            &blocks[lo..hi],
            span.seq(if whole_span { nq - 1 } else { i }),
            window_start(span.seq(i), window),
            kh,
            &q[(i * ctx.q_heads + kh * g) * d..][..g * d],
            buf,
        );
    });
    // Merge the chunks of each (query, KV head).
    for qk in 0..per_q {
        let (i, kh) = (qk / kvh, qk % kvh);
        for h in 0..g {
            let mut m = f32::NEG_INFINITY;
            for c in 0..chunks {
                m = m.max(partial[(qk * chunks + c) * stride + h * (d + 2)]);
            }
            let o = &mut out[(i * ctx.q_heads + kh * g + h) * d..][..d];
            o.fill(0.0);
            let mut l = 0f32;
            for c in 0..chunks {
                let b = &partial[(qk * chunks + c) * stride + h * (d + 2)..][..d + 2];
                if b[1] == 0.0 {
                    continue;
                }
                let w = (b[0] - m).exp();
                l += b[1] * w;
                for (o, &a) in o.iter_mut().zip(&b[2..]) {
                    *o += a * w;
                }
            }
            if l > 0.0 {
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }
}

/// The first sequence number a query at `qseq` sees under a sliding `window` (keys fewer
/// than `window` tokens back: `qseq - window < seq`); 0 without one.
pub(crate) fn window_start(qseq: u32, window: Option<usize>) -> u32 {
    window.map_or(0, |w| {
        let w = u32::try_from(w).unwrap_or(u32::MAX);
        (qseq + 1).saturating_sub(w)
    })
}

/// One (query, KV head, chunk) pass over the keys with sequence numbers `first_seq..=qseq`;
/// writes `[g][m, l, acc[d]]` into `buf`.
#[allow(clippy::too_many_arguments)]
fn run_task(
    ctx: &Ctx<'_>,
    f: &Fns,
    blocks: &[BlockRef<'_>],
    qseq: u32,
    first_seq: u32,
    kh: usize,
    q: &[f32],
    buf: &mut [f32],
) {
    let (g, d) = (ctx.q_heads / ctx.kv_heads, ctx.d);
    SCRATCH.with_borrow_mut(|(prep, st)| {
        prep.reset(g, d, ctx.vgroup, q);
        st.reset(g, d);
        for (bi, b) in blocks.iter().enumerate() {
            let Some(pool) = &ctx.pools[b.pool as usize] else {
                continue;
            };
            // Prefetch PREFETCH_AHEAD blocks ahead (the first block also fetches the ones
            // before it; at 0, the block's own pieces after its first quarter), the far block
            // in four pieces spread over this block's steps: a
            // burst of a whole segment's lines stalls the kernel's loads behind full miss
            // buffers (one thread from DRAM, FP16: ~1200 us per call with one burst, ~1050
            // with two pieces, ~840 with four).
            let ahead = PREFETCH_AHEAD;
            let from = if bi == 0 { 1 } else { bi + ahead };
            let mut later: [&[u8]; 3] = [&[]; 3];
            for next in blocks.iter().take(bi + ahead + 1).skip(from) {
                if let Some(np) = &ctx.pools[next.pool as usize] {
                    let seg = np.segment(ctx.layer, next.id, kh);
                    let q = (seg.len() / 4).div_ceil(64) * 64;
                    let (a, rest) = seg.split_at(q.min(seg.len()));
                    (f.prefetch)(a);
                    let (b, rest) = rest.split_at(q.min(rest.len()));
                    let (c, e) = rest.split_at(q.min(rest.len()));
                    later = [b, c, e];
                }
            }
            let n = if b.seqs.last().is_some_and(|&s| s <= qseq) {
                b.seqs.len()
            } else {
                b.seqs.partition_point(|&s| s <= qseq)
            };
            // Keys before the window: a block wholly before it is skipped; in a block that
            // straddles it, the kernels score every token from the block's first and the scores
            // before the window are set to -inf before the softmax (weight 0).
            let skip = b.seqs.partition_point(|&s| s < first_seq);
            if n == 0 || skip >= n {
                continue;
            }
            let seg = pool.segment(ctx.layer, b.id, kh);
            match pool.layout() {
                PoolLayout::Fp16(l) => (f.fp16_scores)(prep, seg, l, n, &mut st.s),
                PoolLayout::Quant(l) => (f.quant_scores)(prep, seg, l, n, &mut st.s),
            }
            mask_before(st, skip);
            (f.prefetch)(later[0]);
            (f.softmax)(st, n);
            (f.prefetch)(later[1]);
            match pool.layout() {
                PoolLayout::Fp16(l) => (f.fp16_accum)(st, seg, l, n),
                PoolLayout::Quant(l) => (f.quant_accum)(st, seg, l, n),
            }
            (f.prefetch)(later[2]);
        }
        (f.finish)(st);
        for h in 0..g {
            let b = &mut buf[h * (d + 2)..][..d + 2];
            b[0] = st.m[h];
            b[1] = st.l[h];
            for (gi, (o, a)) in b[2..]
                .chunks_mut(ctx.vgroup)
                .zip(st.acc[h * d..][..d].chunks(ctx.vgroup))
                .enumerate()
            {
                let z = st.zacc[gidx(h, gi)];
                for (o, a) in o.iter_mut().zip(a) {
                    *o = a + z;
                }
            }
        }
    })
}

/// Scores of a block's first `skip` tokens (before a sliding window) to -inf, for every head.
fn mask_before(st: &mut State, skip: usize) {
    for h in 0..st.g {
        st.s[sidx(h, 0)..sidx(h, skip)].fill(f32::NEG_INFINITY);
    }
}

thread_local! {
    /// Each thread's task state, reused by every task it runs (allocating it per task cost
    /// about a tenth of a decode call's time in malloc, free and calloc).
    static SCRATCH: std::cell::RefCell<(Prep, State)> =
        std::cell::RefCell::new((Prep::default(), State::default()));
}

/// Sets `v` to `len` zeros (keeping its allocation).
fn zeroed(v: &mut Vec<f32>, len: usize) {
    v.clear();
    v.resize(len, 0.0);
}

impl Prep {
    /// The state of a task of `g` query heads (queries `q`), as freshly allocated.
    fn reset(&mut self, g: usize, d: usize, group: usize, q: &[f32]) {
        (self.g, self.d) = (g, d);
        zeroed(&mut self.q, g * d);
        zeroed(&mut self.qsum, g * MAX_GROUPS);
        zeroed(&mut self.scratch, g * d);
        let scale = 1.0 / (d as f32).sqrt();
        for h in 0..g {
            for c in 0..d {
                self.q[h * d + c] = q[h * d + c] * scale;
            }
            for gi in 0..d / group {
                self.qsum[h * MAX_GROUPS + gi] = self.q[h * d + gi * group..][..group].iter().sum();
            }
        }
    }
}

impl State {
    /// An empty state of `g` query heads, as freshly allocated.
    fn reset(&mut self, g: usize, d: usize) {
        (self.g, self.d) = (g, d);
        self.m = [f32::NEG_INFINITY; MAX_GQA];
        self.l = [0.0; MAX_GQA];
        zeroed(&mut self.acc, g * d);
        zeroed(&mut self.qacc, g * d);
        zeroed(&mut self.zacc, g * MAX_GROUPS);
        zeroed(&mut self.s, g * MAX_BLOCK_TOKENS);
        zeroed(&mut self.w, g * MAX_BLOCK_TOKENS);
        zeroed(&mut self.lv, g * 16);
        zeroed(&mut self.zv, g * MAX_GROUPS * 16);
    }
}

/// Index of head `h`, group `g` in [`Prep::qsum`] / [`State::zacc`].
#[inline]
pub(crate) fn gidx(h: usize, g: usize) -> usize {
    h * MAX_GROUPS + g
}
/// Index of head `h`, token `t` in [`State::s`].
#[inline]
pub(crate) fn sidx(h: usize, t: usize) -> usize {
    h * MAX_BLOCK_TOKENS + t
}
