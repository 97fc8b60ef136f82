//! Cell bookkeeping: which token sits in which block slot, its position, its kind and its
//! frame. Plain CPU code, independent of the bytes the pools hold.
//!
//! Every token gets a sequence number (`seq`, monotonic since the last clear, never reused)
//! besides its RoPE position. Within a block, slots hold increasing sequence numbers, so
//! causal masking inside a span is "the first `k` slots of the block". Text tokens fill the
//! open text block of their pool; a frame's tokens get blocks of their own, so evicting a
//! frame frees whole blocks. Which tokens are FP16, and their positions and frames, follow
//! the rules in [`crate::placement`].

use crate::KvError;
use crate::policy::KvPolicy;
use jetvlm_core::{FrameId, TokenKind};

/// Which pool a block lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Fp16 = 0,
    Quant = 1,
}

/// Who owns a block: text (shared, filled in order) or one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Text,
    Frame(FrameId),
}

/// One block in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMeta {
    pub pool: PoolKind,
    pub id: u32,
    pub owner: Owner,
    /// Sequence numbers of the filled slots, increasing.
    pub seqs: Vec<u32>,
    /// RoPE positions of the filled slots.
    pub positions: Vec<u32>,
}

/// Where one token of a span is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRef {
    pub pool: PoolKind,
    pub id: u32,
    pub slot: u32,
}

/// A run of tokens appended together; what `write` and `attend` take.
#[derive(Clone, Debug)]
pub struct Span {
    pub(crate) first_seq: u32,
    pub(crate) kind: TokenKind,
    pub(crate) frame: Option<FrameId>,
    pub(crate) slots: Vec<SlotRef>,
    pub(crate) positions: Vec<u32>,
    /// A frame span whose salient tokens are chosen once its salience is known
    /// ([`Cells::settle_frame`]).
    pub(crate) pending: bool,
}

impl Span {
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    pub fn kind(&self) -> TokenKind {
        self.kind
    }
    pub fn frame(&self) -> Option<FrameId> {
        self.frame
    }
    /// RoPE positions of the span's tokens.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }
    /// Where each token went (pool, block id, slot).
    pub fn slots(&self) -> &[SlotRef] {
        &self.slots
    }
    /// Sequence number of token `i` (causal order since the last clear).
    pub fn seq(&self, i: usize) -> u32 {
        self.first_seq + i as u32
    }
    /// A frame span whose salient tokens wait for salience scores
    /// ([`Cells::append_pending_frame`]).
    pub fn is_pending(&self) -> bool {
        self.pending
    }
}

/// Token-to-block bookkeeping for both pools.
#[derive(Clone, Debug)]
pub struct Cells {
    block_tokens: [usize; 2],
    capacity_tokens: usize,
    metas: [Vec<Option<BlockMeta>>; 2],
    free: [Vec<u32>; 2],
    order: Vec<(PoolKind, u32)>,
    open_text: [Option<u32>; 2],
    frames: Vec<FrameId>,
    next_seq: u32,
    next_position: u32,
    len: usize,
    text_tokens: usize,
    frame_tokens: usize,
    fp16_tokens: usize,
}

/// Counters of [`Cells`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CellCounts {
    pub tokens: usize,
    pub text_tokens: usize,
    pub frame_tokens: usize,
    pub fp16_tokens: usize,
    pub fp16_blocks: usize,
    pub quant_blocks: usize,
}

impl Cells {
    pub fn new(
        fp16_block_tokens: usize,
        quant_block_tokens: usize,
        capacity_tokens: usize,
    ) -> Self {
        Self {
            block_tokens: [fp16_block_tokens, quant_block_tokens],
            capacity_tokens,
            metas: [Vec::new(), Vec::new()],
            free: [Vec::new(), Vec::new()],
            order: Vec::new(),
            open_text: [None, None],
            frames: Vec::new(),
            next_seq: 0,
            next_position: 0,
            len: 0,
            text_tokens: 0,
            frame_tokens: 0,
            fp16_tokens: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }
    pub fn next_position(&self) -> u32 {
        self.next_position
    }
    pub fn frames(&self) -> &[FrameId] {
        &self.frames
    }
    pub fn counts(&self) -> CellCounts {
        CellCounts {
            tokens: self.len,
            text_tokens: self.text_tokens,
            frame_tokens: self.frame_tokens,
            fp16_tokens: self.fp16_tokens,
            fp16_blocks: self.metas[0].iter().flatten().count(),
            quant_blocks: self.metas[1].iter().flatten().count(),
        }
    }
    /// Ids ever handed out per pool (in use or free): the storage the pools must hold.
    pub fn id_space(&self, pool: PoolKind) -> usize {
        self.metas[pool as usize].len()
    }
    /// Free ids of a pool, sorted (for tests and diagnostics).
    pub fn free_ids(&self, pool: PoolKind) -> Vec<u32> {
        let mut f = self.free[pool as usize].clone();
        f.sort_unstable();
        f
    }
    /// Forgets free ids at the top of the id space so storage can be released; returns the
    /// new id space of each pool.
    pub fn trim(&mut self) -> [usize; 2] {
        for p in 0..2 {
            while matches!(self.metas[p].last(), Some(None)) {
                self.metas[p].pop();
            }
            let n = self.metas[p].len() as u32;
            self.free[p].retain(|&id| id < n);
        }
        [self.metas[0].len(), self.metas[1].len()]
    }

    /// Blocks in use, in attention order.
    pub fn blocks(&self) -> impl Iterator<Item = &BlockMeta> + '_ {
        self.order
            .iter()
            .filter_map(|&(p, id)| self.metas[p as usize][id as usize].as_ref())
    }
    pub fn block(&self, pool: PoolKind, id: u32) -> Option<&BlockMeta> {
        self.metas[pool as usize]
            .get(id as usize)
            .and_then(Option::as_ref)
    }
    pub fn block_count(&self) -> usize {
        self.order.len()
    }

    /// Appends `positions.len()` tokens. Frame spans must carry `frame`; text spans must not.
    /// `salience` (frame spans only, one score per token) picks which frame tokens stay FP16
    /// inside the policy's budget.
    pub fn append(
        &mut self,
        policy: &KvPolicy,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
        salience: Option<&[f32]>,
    ) -> Result<Span, KvError> {
        self.append_with(policy, kind, positions, frame, salience, false)
    }

    /// FP16 slots a frame span of `n` tokens appended now could give its most salient tokens:
    /// the policy's budget over everything cached plus the span, less the FP16 tokens held
    /// and the span's sink tokens, rounded down so that they fill whole FP16 blocks. Zero
    /// when the policy keeps frames FP16 anyway or does not pick salient tokens.
    pub fn salient_room(&self, policy: &KvPolicy, n: usize) -> usize {
        if !policy.quantizes_frames() || !policy.salient_frame_tokens {
            return 0;
        }
        let extra = self.fp16_room(policy, n);
        let sinks = policy
            .sink_tokens
            .saturating_sub(self.next_seq as usize)
            .min(n)
            .min(extra);
        self.salient_count(sinks, extra - sinks)
    }

    /// Salient tokens a frame with `sinks` FP16 sink tokens keeps FP16 when the budget has
    /// `room` more: as many as fill whole FP16 blocks together with the sinks (a frame's
    /// blocks are its own, so a partly filled FP16 block would hold memory it does not use).
    fn salient_count(&self, sinks: usize, room: usize) -> usize {
        let b = self.block_tokens[PoolKind::Fp16 as usize];
        ((sinks + room) / b * b).saturating_sub(sinks)
    }

    /// FP16 tokens the budget allows beyond those held, for `n` more tokens.
    fn fp16_room(&self, policy: &KvPolicy, n: usize) -> usize {
        let allowed = (policy.fp16_budget as f64 * (self.len + n) as f64).floor() as usize;
        allowed.saturating_sub(self.fp16_tokens)
    }

    /// Appends a whole frame's tokens as [`Cells::append`] does without scores (sinks FP16,
    /// the rest quantized), pending: once the forward pass has measured how much attention
    /// each token receives, [`Cells::settle_frame`] moves the frame to its final blocks (the
    /// most salient tokens FP16 within the budget too). Nothing may be appended between the
    /// two.
    pub fn append_pending_frame(
        &mut self,
        policy: &KvPolicy,
        positions: &[u32],
        frame: FrameId,
    ) -> Result<Span, KvError> {
        self.append_with(policy, TokenKind::Frame, positions, Some(frame), None, true)
    }

    /// Places the pending frame span `span` by its tokens' `salience` (one score per token,
    /// higher = more attended). The tokens keep their sequence numbers and positions; the
    /// returned span holds them in new blocks. The span's old blocks stay allocated, so the
    /// caller can copy their contents to the new slots, until [`Cells::release_blocks`]
    /// frees the returned list.
    pub fn settle_frame(
        &mut self,
        policy: &KvPolicy,
        span: &Span,
        salience: &[f32],
    ) -> Result<(Span, Vec<(PoolKind, u32)>), KvError> {
        let op = "settle_frame";
        self.check_span(op, span)?;
        let n = span.len();
        let frame = match (span.pending, span.frame) {
            (true, Some(f)) => f,
            _ => {
                return Err(KvError::BadSpan {
                    op,
                    reason: "only a pending frame span can be settled".into(),
                });
            }
        };
        let last_seq = span.first_seq + n as u32 - 1;
        if self
            .blocks()
            .any(|m| m.seqs.last().is_some_and(|&q| q > last_seq))
        {
            return Err(KvError::BadSpan {
                op,
                reason: "tokens were appended after the pending frame".into(),
            });
        }
        if salience.len() != n {
            return Err(KvError::ShapeMismatch {
                op,
                what: "salience scores",
                expected: n,
                got: salience.len(),
            });
        }
        let old: Vec<(PoolKind, u32)> = self
            .blocks()
            .filter(|m| m.owner == Owner::Frame(frame))
            .map(|m| (m.pool, m.id))
            .collect();
        // Take the span out of the counters (its blocks stay allocated), then append it again
        // under the same sequence numbers.
        let fp16 = span
            .slots
            .iter()
            .filter(|s| s.pool == PoolKind::Fp16)
            .count();
        self.len -= n;
        self.frame_tokens -= n;
        self.fp16_tokens -= fp16;
        self.frames.retain(|&f| f != frame);
        let next_seq = self.next_seq;
        self.next_seq = span.first_seq;
        let settled = self.append_with(
            policy,
            TokenKind::Frame,
            &span.positions,
            Some(frame),
            Some(salience),
            false,
        );
        self.next_seq = next_seq;
        if settled.is_err() {
            // Nothing was allocated: put the pending span back in the counters.
            self.len += n;
            self.frame_tokens += n;
            self.fp16_tokens += fp16;
            self.frames.push(frame);
        }
        Ok((settled?, old))
    }

    /// Frees blocks [`Cells::settle_frame`] left allocated.
    pub fn release_blocks(&mut self, blocks: &[(PoolKind, u32)]) {
        for &(pool, id) in blocks {
            if self.block(pool, id).is_some() {
                self.release(pool, id);
            }
        }
    }

    /// [`Cells::append`]; `pending` marks a frame span for [`Cells::settle_frame`].
    fn append_with(
        &mut self,
        policy: &KvPolicy,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
        salience: Option<&[f32]>,
        pending: bool,
    ) -> Result<Span, KvError> {
        let n = positions.len();
        let op = "append_span";
        if n == 0 {
            return Err(KvError::BadSpan {
                op,
                reason: "empty span".into(),
            });
        }
        match (kind, frame) {
            (TokenKind::Frame, None) => {
                return Err(KvError::BadSpan {
                    op,
                    reason: "a frame span needs its FrameId".into(),
                });
            }
            (TokenKind::Text, Some(f)) => {
                return Err(KvError::BadSpan {
                    op,
                    reason: format!("a text span cannot carry a frame id (got {f})"),
                });
            }
            (TokenKind::Frame, Some(f)) if self.frames.contains(&f) => {
                return Err(KvError::DuplicateFrame { frame: f });
            }
            _ => {}
        }
        if let Some(s) = salience
            && s.len() != n
        {
            return Err(KvError::ShapeMismatch {
                op,
                what: "salience scores",
                expected: n,
                got: s.len(),
            });
        }
        if self.len + n > self.capacity_tokens {
            return Err(KvError::CapacityExceeded {
                op,
                capacity_tokens: self.capacity_tokens,
                cached: self.len,
                requested: n,
            });
        }
        // Precision of each token.
        let mut pools = vec![PoolKind::Quant; n];
        match kind {
            TokenKind::Text => {
                let p = if policy.quantize_text {
                    PoolKind::Quant
                } else {
                    PoolKind::Fp16
                };
                pools.fill(p);
            }
            TokenKind::Frame if !policy.quantizes_frames() => pools.fill(PoolKind::Fp16),
            TokenKind::Frame => {
                let mut extra = self.fp16_room(policy, n);
                let mut sinks = 0;
                for (i, p) in pools.iter_mut().enumerate() {
                    if extra > 0 && ((self.next_seq as usize + i) < policy.sink_tokens) {
                        *p = PoolKind::Fp16;
                        extra -= 1;
                        sinks += 1;
                    }
                }
                if let (Some(scores), true) = (salience, policy.salient_frame_tokens) {
                    let mut idx: Vec<usize> =
                        (0..n).filter(|&i| pools[i] == PoolKind::Quant).collect();
                    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                    for &i in idx.iter().take(self.salient_count(sinks, extra)) {
                        pools[i] = PoolKind::Fp16;
                    }
                }
            }
        }
        let owner = match frame {
            Some(f) => Owner::Frame(f),
            None => Owner::Text,
        };
        let first_seq = self.next_seq;
        let mut slots = Vec::with_capacity(n);
        // Frame blocks are fresh per frame and pool; text continues its open block.
        let mut current: [Option<u32>; 2] = match owner {
            Owner::Text => self.open_text,
            Owner::Frame(_) => [None, None],
        };
        for (i, (&pool, &pos)) in pools.iter().zip(positions).enumerate() {
            let p = pool as usize;
            let id = match current[p] {
                Some(id) if self.block_has_room(pool, id) => id,
                _ => {
                    let id = self.alloc(pool, owner);
                    current[p] = Some(id);
                    id
                }
            };
            let Some(meta) = self.metas[p][id as usize].as_mut() else {
                unreachable!("block {id} allocated just above");
            };
            let slot = meta.seqs.len() as u32;
            meta.seqs.push(first_seq + i as u32);
            meta.positions.push(pos);
            slots.push(SlotRef { pool, id, slot });
            if pool == PoolKind::Fp16 {
                self.fp16_tokens += 1;
            }
        }
        if owner == Owner::Text {
            self.open_text = current;
        } else if let Some(f) = frame {
            self.frames.push(f);
        }
        self.next_seq += n as u32;
        if let Some(&max) = positions.iter().max() {
            self.next_position = self.next_position.max(max + 1);
        }
        self.len += n;
        match kind {
            TokenKind::Text => self.text_tokens += n,
            TokenKind::Frame => self.frame_tokens += n,
        }
        Ok(Span {
            first_seq,
            kind,
            frame,
            slots,
            positions: positions.to_vec(),
            pending,
        })
    }

    fn block_has_room(&self, pool: PoolKind, id: u32) -> bool {
        self.block(pool, id)
            .is_some_and(|m| m.seqs.len() < self.block_tokens[pool as usize])
    }

    fn alloc(&mut self, pool: PoolKind, owner: Owner) -> u32 {
        let p = pool as usize;
        let t = self.block_tokens[p];
        let meta = |id| BlockMeta {
            pool,
            id,
            owner,
            seqs: Vec::with_capacity(t),
            positions: Vec::with_capacity(t),
        };
        let id = match self.free[p].pop() {
            Some(id) => id,
            None => {
                self.metas[p].push(None);
                (self.metas[p].len() - 1) as u32
            }
        };
        self.metas[p][id as usize] = Some(meta(id));
        self.order.push((pool, id));
        id
    }

    fn release(&mut self, pool: PoolKind, id: u32) {
        let p = pool as usize;
        self.metas[p][id as usize] = None;
        self.free[p].push(id);
        self.order.retain(|&(q, i)| !(q == pool && i == id));
        if self.open_text[p] == Some(id) {
            self.open_text[p] = None;
        }
    }

    /// Checks a span's tokens are still where it says.
    pub fn check_span(&self, op: &'static str, span: &Span) -> Result<(), KvError> {
        for (i, s) in span.slots.iter().enumerate() {
            let ok = self
                .block(s.pool, s.id)
                .and_then(|m| m.seqs.get(s.slot as usize))
                .is_some_and(|&q| q == span.first_seq + i as u32);
            if !ok {
                return Err(KvError::StaleSpan { op });
            }
        }
        Ok(())
    }

    /// Removes every token of `frame`; its blocks go back to the free lists.
    pub fn evict_frame(&mut self, frame: FrameId) -> Result<(), KvError> {
        let Some(fi) = self.frames.iter().position(|&f| f == frame) else {
            return Err(KvError::UnknownFrame {
                op: "evict_frame",
                frame,
            });
        };
        self.frames.remove(fi);
        let owned: Vec<(PoolKind, u32, usize)> = self
            .blocks()
            .filter(|m| m.owner == Owner::Frame(frame))
            .map(|m| (m.pool, m.id, m.seqs.len()))
            .collect();
        for (pool, id, n) in owned {
            self.len -= n;
            self.frame_tokens -= n;
            if pool == PoolKind::Fp16 {
                self.fp16_tokens -= n;
            }
            self.release(pool, id);
        }
        Ok(())
    }

    /// Drops the `n` most recent tokens.
    pub fn truncate_last(&mut self, n: usize) -> Result<(), KvError> {
        if n > self.len {
            return Err(KvError::TruncateTooMany {
                op: "truncate_last",
                requested: n,
                cached: self.len,
            });
        }
        for _ in 0..n {
            let Some((pool, id)) = self
                .order
                .iter()
                .copied()
                .max_by_key(|&(p, id)| self.block(p, id).and_then(|m| m.seqs.last().copied()))
            else {
                break;
            };
            let Some(meta) = self.metas[pool as usize][id as usize].as_mut() else {
                break;
            };
            meta.seqs.pop();
            meta.positions.pop();
            let (owner, empty) = (meta.owner, meta.seqs.is_empty());
            self.len -= 1;
            if pool == PoolKind::Fp16 {
                self.fp16_tokens -= 1;
            }
            match owner {
                Owner::Text => self.text_tokens -= 1,
                Owner::Frame(_) => self.frame_tokens -= 1,
            }
            if empty {
                self.release(pool, id);
                if owner == Owner::Text {
                    // The text block before it (full when this one was opened) is the open
                    // one again, as it was before the dropped tokens came.
                    self.open_text[pool as usize] = self.newest_text_block(pool);
                }
                if let Owner::Frame(f) = owner
                    && !self.blocks().any(|m| m.owner == owner)
                {
                    self.frames.retain(|&x| x != f);
                }
            }
        }
        Ok(())
    }

    /// The text block of `pool` opened last (it holds the pool's newest text tokens).
    fn newest_text_block(&self, pool: PoolKind) -> Option<u32> {
        self.order
            .iter()
            .rev()
            .find(|&&(p, id)| {
                p == pool && self.block(p, id).is_some_and(|m| m.owner == Owner::Text)
            })
            .map(|&(_, id)| id)
    }

    /// Drops everything; every block goes back to its free list.
    pub fn clear(&mut self) {
        let used: Vec<(PoolKind, u32)> = self.order.clone();
        for (p, id) in used {
            self.release(p, id);
        }
        self.frames.clear();
        self.open_text = [None, None];
        self.next_seq = 0;
        self.next_position = 0;
        self.len = 0;
        self.text_tokens = 0;
        self.frame_tokens = 0;
        self.fp16_tokens = 0;
    }
}
