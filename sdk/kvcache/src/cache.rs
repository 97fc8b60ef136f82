//! [`MixedKvCache`]: an FP16 pool for text and a quantized pool for frames behind one
//! interface.

use crate::KvError;
use crate::attention::{self, Ctx, Kernel, MAX_GQA, MAX_HEAD_DIM};
use crate::cells::{Cells, PoolKind, Span};
use crate::layout::{Fp16Layout, QuantLayout};
use crate::policy::{KeyMode, KvPolicy};
use crate::pool::{Pool, PoolLayout};
use half::f16;
use half::slice::HalfFloatSliceExt;
use jetvlm_core::{FrameId, TokenKind};
use jetvlm_quant::{ScaleZero, code_of, pack_codes, packed_len, quantize_row, row_params};

/// Model-side shape of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheShape {
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl std::fmt::Display for CacheShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "layers={} q_heads={} kv_heads={} head_dim={}",
            self.layers, self.q_heads, self.kv_heads, self.head_dim
        )
    }
}

impl CacheShape {
    /// The cache shape of a decoder with this `config.json`.
    pub fn of(c: &jetvlm_core::hf::ModelConfig) -> Self {
        CacheShape {
            layers: c.num_hidden_layers,
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    /// FP16 bytes of one token's K and V in all layers.
    pub fn fp16_bytes_per_token(&self) -> u64 {
        (self.layers * self.kv_heads * self.head_dim * 2 * 2) as u64
    }
}

/// A block of one pool: (pool, block id).
type BlockKey = (PoolKind, u32);

/// Which keys a query sees beyond the causal default ([`MixedKvCache::attend_masked`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttendMask {
    /// Every query of the span also sees the span's later tokens (bidirectional inside the
    /// span: Gemma 3's image tokens of one frame).
    pub whole_span: bool,
    /// Sliding window: a query sees only keys fewer than this many tokens back in cache order
    /// (Gemma 3's local layers).
    pub window: Option<usize>,
}

/// Bytes held by the cache, by precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct KvMemory {
    pub text_tokens: usize,
    pub frame_tokens: usize,
    /// Bytes of FP16 blocks in use (all layers).
    pub fp16_bytes: u64,
    /// Bytes of quantized blocks in use, scales and zeros included (all layers).
    pub quant_bytes: u64,
    pub total_bytes: u64,
    /// Bytes the same tokens would take all-FP16.
    pub fp16_equivalent_bytes: u64,
    /// Bytes one decode step's attention reads (all layers): every block in use.
    pub attention_read_bytes: u64,
}

/// The mixed-precision paged KV cache.
#[derive(Clone)]
pub struct MixedKvCache {
    shape: CacheShape,
    policy: KvPolicy,
    cells: Cells,
    /// `[fp16, quant]` pools: one pair holding every layer, or (a calibrated policy with a
    /// frame format per layer) one pair per layer. Block ids are the same in every layer.
    pools: Vec<[Option<Pool>; 2]>,
    kernel: Kernel,
}

impl MixedKvCache {
    /// `capacity_tokens`: pool budget; appending beyond it without eviction room is a typed
    /// error naming the budget. The policy's group is fitted to the head dim
    /// ([`KvPolicy::fitted_to`]); [`MixedKvCache::policy`] returns the policy in effect.
    pub fn new(
        shape: CacheShape,
        policy: KvPolicy,
        capacity_tokens: usize,
    ) -> Result<Self, KvError> {
        policy.validate()?;
        let policy = policy.fitted_to(shape.head_dim);
        let bad = |reason: String| KvError::InvalidShape {
            shape: shape.to_string(),
            reason,
        };
        if shape.layers == 0 || shape.q_heads == 0 || shape.kv_heads == 0 || shape.head_dim == 0 {
            return Err(bad("every dimension must be at least 1".into()));
        }
        if !shape.q_heads.is_multiple_of(shape.kv_heads) {
            return Err(bad(format!(
                "q_heads {} is not a multiple of kv_heads {}",
                shape.q_heads, shape.kv_heads
            )));
        }
        if shape.q_heads / shape.kv_heads > MAX_GQA {
            return Err(bad(format!("more than {MAX_GQA} query heads per KV head")));
        }
        if shape.head_dim > MAX_HEAD_DIM || !shape.head_dim.is_multiple_of(8) {
            return Err(bad(format!(
                "head_dim must be a multiple of 8 up to {MAX_HEAD_DIM}"
            )));
        }
        if let Some(why) = policy.head_dim_problem(shape.head_dim) {
            return Err(bad(why));
        }
        if policy.is_per_layer() && policy.layers.len() != shape.layers {
            return Err(bad(format!(
                "the policy has formats for {} layers, the model has {}",
                policy.layers.len(),
                shape.layers
            )));
        }
        // One pool pair for all layers, or one per layer when the layers' formats differ.
        let (sets, layers_per_set) = if policy.is_per_layer() {
            (shape.layers, 1)
        } else {
            (1, shape.layers)
        };
        let mut pools = Vec::with_capacity(sets);
        for set in 0..sets {
            let fp16 = Pool::new(
                PoolLayout::Fp16(Fp16Layout {
                    tokens: policy.fp16_block_tokens,
                    head_dim: shape.head_dim,
                }),
                layers_per_set,
                shape.kv_heads,
                capacity_tokens.div_ceil(policy.fp16_block_tokens),
            );
            let quant = if policy.quantizes_frames() {
                let layout = QuantLayout::of_layer(&policy, set, shape.head_dim)
                    .ok_or_else(|| bad(format!("no quantized layout for policy {policy}")))?;
                Some(Pool::new(
                    PoolLayout::Quant(layout),
                    layers_per_set,
                    shape.kv_heads,
                    capacity_tokens.div_ceil(policy.quant_block_tokens),
                ))
            } else {
                None
            };
            pools.push([Some(fp16), quant]);
        }
        Ok(Self {
            shape,
            cells: Cells::new(
                policy.fp16_block_tokens,
                policy.quant_block_tokens,
                capacity_tokens,
            ),
            policy,
            pools,
            kernel: Kernel::detect(),
        })
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }
    pub fn policy(&self) -> &KvPolicy {
        &self.policy
    }
    pub fn capacity_tokens(&self) -> usize {
        self.cells.capacity_tokens()
    }
    /// The cell bookkeeping (read-only).
    pub fn cells(&self) -> &Cells {
        &self.cells
    }
    /// The attention kernel `attend` uses (the fastest this CPU runs unless overridden).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
    /// Overrides the attention kernel (tests, benchmarks). Kernels the CPU lacks fall back
    /// to the portable one.
    pub fn set_kernel(&mut self, kernel: Kernel) {
        self.kernel = if kernel.available() {
            kernel
        } else {
            Kernel::Portable
        };
    }

    /// Bookkeeping for `positions.len()` new tokens appended after everything cached (same
    /// for all layers). `frame` must be Some for frame spans (a whole frame's tokens at
    /// once) and None for text.
    pub fn append_span(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
    ) -> Result<Span, KvError> {
        self.append_inner(kind, positions, frame, None)
    }

    /// Appends a frame's tokens with a salience score per token (e.g. the attention they
    /// received during prefill); within the policy's FP16 budget the most salient stay FP16.
    pub fn append_frame_with_salience(
        &mut self,
        positions: &[u32],
        frame: FrameId,
        salience: &[f32],
    ) -> Result<Span, KvError> {
        self.append_inner(TokenKind::Frame, positions, Some(frame), Some(salience))
    }

    /// Whether a frame of `n` tokens appended now could keep salient tokens FP16: the
    /// policy picks salient frame tokens and its FP16 budget has room beyond the sinks.
    /// A caller that can measure salience then appends with
    /// [`MixedKvCache::append_pending_frame`] and settles with
    /// [`MixedKvCache::settle_frame`].
    pub fn wants_salience(&self, n: usize) -> bool {
        self.cells.salient_room(&self.policy, n) > 0
    }

    /// Appends a frame's tokens as [`MixedKvCache::append_span`] does (sinks FP16, the rest
    /// quantized), pending their salience: the forward pass writes and attends the span as
    /// usual while it measures each token's attention and keeps the exact keys and values,
    /// then [`MixedKvCache::settle_frame`] re-stores the frame with its most salient tokens
    /// FP16 within the budget. Nothing may be appended in between.
    pub fn append_pending_frame(
        &mut self,
        positions: &[u32],
        frame: FrameId,
    ) -> Result<Span, KvError> {
        let span = self
            .cells
            .append_pending_frame(&self.policy, positions, frame)?;
        self.grow_pools();
        Ok(span)
    }

    /// Re-stores the pending frame `span`: its most salient tokens (one score per token,
    /// e.g. the attention they received during prefill) FP16 within the budget, the rest
    /// quantized, from `kv`, each layer's keys and values as [`MixedKvCache::write`] takes
    /// them (the exact values the span was written with). Returns the span at its new place;
    /// the old handle is stale afterwards.
    pub fn settle_frame(
        &mut self,
        span: &Span,
        salience: &[f32],
        kv: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<Span, KvError> {
        let op = "settle_frame";
        if let Some(i) = salience.iter().position(|s| !s.is_finite()) {
            return Err(KvError::NonFinite {
                op,
                index: i,
                value: salience[i],
            });
        }
        if kv.len() != self.shape.layers {
            return Err(KvError::ShapeMismatch {
                op,
                what: "layers of keys and values",
                expected: self.shape.layers,
                got: kv.len(),
            });
        }
        let (settled, old) = self.cells.settle_frame(&self.policy, span, salience)?;
        self.grow_pools();
        let moved = kv
            .iter()
            .enumerate()
            .try_for_each(|(layer, (k, v))| self.write(layer, &settled, k, v));
        self.cells.release_blocks(&old);
        moved.map(|()| settled)
    }

    fn append_inner(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
        salience: Option<&[f32]>,
    ) -> Result<Span, KvError> {
        let span = self
            .cells
            .append(&self.policy, kind, positions, frame, salience)?;
        self.grow_pools();
        Ok(span)
    }

    /// Gives every pool storage for the block ids the cells have handed out.
    fn grow_pools(&mut self) {
        for pool in [PoolKind::Fp16, PoolKind::Quant] {
            let ids = self.cells.id_space(pool);
            for set in &mut self.pools {
                if let (Some(p), true) = (&mut set[pool as usize], ids > 0) {
                    p.ensure(ids as u32 - 1);
                }
            }
        }
    }

    /// Which pool pair holds `layer`, and the layer's index inside it.
    fn set_of(&self, layer: usize) -> (usize, usize) {
        if self.pools.len() == 1 {
            (0, layer)
        } else {
            (layer, 0)
        }
    }

    /// The pool pair holding `layer`, and the layer's index inside it.
    fn pools_of(&self, layer: usize) -> (&[Option<Pool>; 2], usize) {
        let (set, layer) = self.set_of(layer);
        (&self.pools[set], layer)
    }

    fn check_layer(&self, op: &'static str, layer: usize) -> Result<(), KvError> {
        if layer >= self.shape.layers {
            return Err(KvError::LayerOutOfRange {
                op,
                layer,
                layers: self.shape.layers,
            });
        }
        Ok(())
    }

    /// Stores one layer's keys (after RoPE) and values for the span: `k`, `v` are row-major
    /// f32 `[span.len(), kv_heads, head_dim]`.
    pub fn write(
        &mut self,
        layer: usize,
        span: &Span,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let op = "write";
        self.check_layer(op, layer)?;
        self.cells.check_span(op, span)?;
        let (kvh, d) = (self.shape.kv_heads, self.shape.head_dim);
        let expected = span.len() * kvh * d;
        for (what, x) in [
            ("keys length [span, kv_heads, head_dim]", k),
            ("values length [span, kv_heads, head_dim]", v),
        ] {
            if x.len() != expected {
                return Err(KvError::ShapeMismatch {
                    op,
                    what,
                    expected,
                    got: x.len(),
                });
            }
            if let Some(index) = x.iter().position(|v| !v.is_finite() || v.abs() > 65504.0) {
                return Err(KvError::NonFinite {
                    op,
                    index,
                    value: x[index],
                });
            }
        }
        // The span's rows grouped by block, in span order. A frame's FP16 (salient) and
        // quantized tokens interleave, so one block's rows need not be consecutive.
        let mut blocks: Vec<(BlockKey, Vec<(usize, u32)>)> = Vec::new();
        for (r, sl) in span.slots().iter().enumerate() {
            let key = (sl.pool, sl.id);
            match blocks.iter_mut().rev().find(|(b, _)| *b == key) {
                Some((_, rows)) => rows.push((r, sl.slot)),
                None => blocks.push((key, vec![(r, sl.slot)])),
            }
        }
        let (set, layer) = self.set_of(layer);
        let set = &mut self.pools[set];
        for ((kind, id), rows) in &blocks {
            let Some(pool) = set[*kind as usize].as_mut() else {
                return Err(KvError::BadSpan {
                    op,
                    reason: "span refers to a pool this policy lacks".into(),
                });
            };
            let layout = *pool.layout();
            for h in 0..kvh {
                let seg = pool.segment_mut(layer, *id, h);
                match &layout {
                    PoolLayout::Fp16(l) => {
                        let dst: &mut [f16] = bytemuck::cast_slice_mut(seg);
                        // A row converted at once (F16C where the CPU has it, the same
                        // rounding as `f16::from_f32`; `head_dim <= MAX_HEAD_DIM`, checked at
                        // `new`): keys then go to their channel-major places, values are one
                        // token-major run.
                        let mut key = [f16::ZERO; MAX_HEAD_DIM];
                        for &(r, slot) in rows {
                            let t = slot as usize;
                            let (kr, vr) =
                                (&k[(r * kvh + h) * d..][..d], &v[(r * kvh + h) * d..][..d]);
                            key[..d].convert_from_f32_slice(kr);
                            for (c, &x) in key[..d].iter().enumerate() {
                                dst[l.k_index(t, c)] = x;
                            }
                            dst[l.v_index(t, 0)..][..d].convert_from_f32_slice(vr);
                        }
                    }
                    PoolLayout::Quant(l) => {
                        write_quant_rows(l, seg, rows, h, kvh, d, k, v)
                            .map_err(|reason| KvError::BadSpan { op, reason })?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Attention of the span's queries `q: [span.len(), q_heads, head_dim]` (after RoPE)
    /// over every cached token that precedes or is the query's own token (causal inside
    /// the span; grouped-query: q head h uses kv head h / (q_heads / kv_heads)); softmax
    /// scale 1/sqrt(head_dim). Writes `out: [span.len(), q_heads, head_dim]`.
    pub fn attend(
        &self,
        layer: usize,
        span: &Span,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), KvError> {
        self.attend_with(self.kernel, layer, span, q, out)
    }

    /// [`Self::attend`] with an explicit kernel (tests compare every kernel with
    /// [`Kernel::Reference`]).
    pub fn attend_with(
        &self,
        kernel: Kernel,
        layer: usize,
        span: &Span,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), KvError> {
        self.attend_masked_with(kernel, layer, span, q, out, AttendMask::default())
    }

    /// [`Self::attend`] under `mask`: with `whole_span` every query of the span also sees
    /// the span's later tokens (Gemma 3's bidirectional image tokens; with a causal
    /// cache order that is "every key up to the span's last token"); with `window` a query
    /// sees only keys fewer than that many tokens back in cache order (Gemma 3's local
    /// layers: blocks before the window are skipped, a straddling block's earlier tokens
    /// get zero weight).
    pub fn attend_masked(
        &self,
        layer: usize,
        span: &Span,
        q: &[f32],
        out: &mut [f32],
        mask: AttendMask,
    ) -> Result<(), KvError> {
        self.attend_masked_with(self.kernel, layer, span, q, out, mask)
    }

    /// [`Self::attend_masked`] with an explicit kernel.
    pub fn attend_masked_with(
        &self,
        kernel: Kernel,
        layer: usize,
        span: &Span,
        q: &[f32],
        out: &mut [f32],
        mask: AttendMask,
    ) -> Result<(), KvError> {
        let op = "attend";
        self.check_layer(op, layer)?;
        self.cells.check_span(op, span)?;
        let expected = span.len() * self.shape.q_heads * self.shape.head_dim;
        if q.len() != expected {
            return Err(KvError::ShapeMismatch {
                op,
                what: "queries length [span, q_heads, head_dim]",
                expected,
                got: q.len(),
            });
        }
        if out.len() != expected {
            return Err(KvError::ShapeMismatch {
                op,
                what: "output length [span, q_heads, head_dim]",
                expected,
                got: out.len(),
            });
        }
        let s = self.shape;
        let (pools, layer) = self.pools_of(layer);
        if kernel == Kernel::Reference {
            attention::reference::attend(
                &self.cells,
                pools,
                layer,
                s.q_heads,
                s.kv_heads,
                s.head_dim,
                span,
                mask.whole_span,
                mask.window,
                q,
                out,
            );
            return Ok(());
        }
        let vgroup = match pools[1].as_ref().map(|p| *p.layout()) {
            Some(PoolLayout::Quant(l)) => l.group(),
            _ => s.head_dim,
        };
        let ctx = Ctx {
            cells: &self.cells,
            pools,
            layer,
            q_heads: s.q_heads,
            kv_heads: s.kv_heads,
            d: s.head_dim,
            vgroup,
        };
        attention::attend_fast(&ctx, span, mask.whole_span, mask.window, q, out, kernel);
        Ok(())
    }

    pub fn evict_frame(&mut self, frame: FrameId) -> Result<(), KvError> {
        self.cells.evict_frame(frame)
    }
    /// Drops the most recent `n` tokens (rolls back an answer so a new question can reuse
    /// cached frames).
    pub fn truncate_last(&mut self, n: usize) -> Result<(), KvError> {
        self.cells.truncate_last(n)
    }
    pub fn clear(&mut self) {
        self.cells.clear();
    }
    /// Releases the storage of free blocks at the top of each pool back to the allocator.
    pub fn trim(&mut self) {
        let keep = self.cells.trim();
        for set in &mut self.pools {
            for (p, k) in set.iter_mut().zip(keep) {
                if let Some(p) = p {
                    p.truncate_storage(k);
                }
            }
        }
    }
    /// The pool of one precision that holds `layer`, and the layer's index inside it
    /// (`None` for the quantized pool of an all-FP16 policy).
    pub fn pool(&self, layer: usize, kind: PoolKind) -> Option<(&Pool, usize)> {
        let (set, l) = self.pools_of(layer.min(self.shape.layers - 1));
        set[kind as usize].as_ref().map(|p| (p, l))
    }
    /// Block storage held by each pool (in use or free), in block ids: `[fp16, quant]`
    /// (the same in every layer).
    pub fn allocated_blocks(&self) -> [usize; 2] {
        [0, 1].map(|i| self.pools[0][i].as_ref().map_or(0, Pool::allocated_blocks))
    }
    pub fn len(&self) -> usize {
        self.cells.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
    /// 1 + largest position ever appended since clear (0 when empty).
    pub fn next_position(&self) -> u32 {
        self.cells.next_position()
    }
    /// Cached frames, oldest first.
    pub fn frames(&self) -> Vec<FrameId> {
        self.cells.frames().to_vec()
    }
    /// Bytes by precision.
    pub fn memory(&self) -> KvMemory {
        let c = self.cells.counts();
        let bb = |i: usize| -> u64 {
            self.pools
                .iter()
                .map(|set| set[i].as_ref().map_or(0, Pool::block_bytes))
                .sum()
        };
        let fp16_bytes = c.fp16_blocks as u64 * bb(0);
        let quant_bytes = c.quant_blocks as u64 * bb(1);
        KvMemory {
            text_tokens: c.text_tokens,
            frame_tokens: c.frame_tokens,
            fp16_bytes,
            quant_bytes,
            total_bytes: fp16_bytes + quant_bytes,
            fp16_equivalent_bytes: c.tokens as u64 * self.shape.fp16_bytes_per_token(),
            attention_read_bytes: fp16_bytes + quant_bytes,
        }
    }
}

/// Quantizes span rows `(row, slot)` stored in one quantized block segment.
#[allow(clippy::too_many_arguments)]
fn write_quant_rows(
    l: &QuantLayout,
    seg: &mut [u8],
    rows: &[(usize, u32)],
    h: usize,
    kvh: usize,
    d: usize,
    k: &[f32],
    v: &[f32],
) -> Result<(), String> {
    let bits = l.bits();
    let (gs, gb) = (l.group(), l.format.group_bytes());
    let row_of = |r: usize| (r * kvh + h) * d..(r * kvh + h + 1) * d;
    let quant_groups = |x: &[f32], dst: &mut [u8]| {
        for gi in 0..d / gs {
            let (head, codes) = dst[gi * gb..(gi + 1) * gb].split_at_mut(4);
            let p = quantize_row(&x[gi * gs..(gi + 1) * gs], bits, codes);
            head.copy_from_slice(bytemuck::bytes_of(&p));
        }
    };
    for &(r, slot) in rows {
        let t = slot as usize;
        let vr = &v[row_of(r)];
        let off = l.v_row_offset(t);
        quant_groups(vr, &mut seg[off..off + l.v_row_bytes()]);
        if l.key_mode == KeyMode::PerToken {
            let kr = &k[row_of(r)];
            let off = l.k_row_offset(t);
            quant_groups(kr, &mut seg[off..off + l.k_row_bytes()]);
        }
    }
    if l.key_mode == KeyMode::PerChannel {
        if rows
            .iter()
            .enumerate()
            .any(|(n, &(_, slot))| slot as usize != n)
        {
            return Err("per-channel keys need a block's tokens written together".into());
        }
        let m = rows.len();
        let mut col = vec![0f32; m];
        let mut codes = vec![0u8; m * d];
        for c in 0..d {
            for (x, &(r, _)) in col.iter_mut().zip(rows) {
                *x = k[r * kvh * d + h * d + c];
            }
            let p: ScaleZero = row_params(&col, bits);
            seg[c * 4..c * 4 + 4].copy_from_slice(bytemuck::bytes_of(&p));
            for (n, &x) in col.iter().enumerate() {
                codes[n * d + c] = code_of(x, p, bits);
            }
        }
        for n in 0..m {
            let off = l.k_row_offset(n);
            pack_codes(
                &codes[n * d..(n + 1) * d],
                bits,
                &mut seg[off..off + packed_len(d, bits)],
            );
        }
    }
    Ok(())
}
