//! Block bookkeeping of the device KV cache: which pool block and slot each appended token
//! goes to, and the attention context list ([`BlockEntry`]) the kernels read. Pure host code,
//! shared by every layer (all layers place a token in the same block and slot).
//!
//! Rules (they keep the attention kernel's assumption that the tokens of one block have
//! consecutive order indexes):
//! - FP16 tokens (text, and frames when the policy keeps them FP16) go to text blocks. A span
//!   continues the last block when that block is the newest entry and not full; otherwise it
//!   starts a new block.
//! - Quantized tokens go to frame blocks. With per-channel keys every span starts a new block
//!   and each block is quantized whole (its key parameters span the block's tokens); with
//!   per-token keys a span may continue the newest block.
//! - A frame appended with its id ([`KvBlockTable::append_frame`]) gets blocks of its own in
//!   either pool, and no later span continues them, so [`KvBlockTable::evict_frame`] frees
//!   whole blocks. Freed blocks are reused before new ones; the positions (order indexes) of
//!   later tokens do not move. [`KvBlockTable::truncate_last`] drops the newest tokens (a
//!   question and its answer) and rewinds the positions to reuse them.
//!
//! Which tokens are FP16, their positions and frames follow the placement rules written once
//! in [`jetvlm_kvcache::placement`] (with the device's differences from the CPU cache:
//! prefill chunks, no salient tokens, frames in pieces or without id, stricter truncation);
//! `tests/placement.rs` checks this table and the CPU cache against them.

use jetvlm_core::{FrameId, TokenKind};
use jetvlm_kvcache::{KeyMode, KvPolicy};

use crate::error::CudaError;
use crate::layout::{BlockEntry, BlockKind, KvLayout};

/// Tokens per forward chunk on the device (bounds the activation scratch). A span is
/// appended to the cache in pieces of this many tokens, which the pool sizing follows.
pub const PREFILL_CHUNK: usize = 512;

/// The device form of a KV policy: the pool layout, which token kinds are quantized and how
/// many attention-sink tokens stay FP16.
///
/// Attention sinks follow the CPU cache's rule: when a quantized frame starts the sequence,
/// its tokens among the first `sinks` stay FP16 as far as the FP16 budget allows. The CPU
/// cache's salient-token option is not applied on the device: every other token of a
/// quantized kind is quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePolicy {
    /// The layout of every layer, or (a calibrated policy) of layer 0.
    pub layout: KvLayout,
    /// A calibrated policy: each layer's layout (frame bits, group and key mode differ;
    /// heads, head dim and block size are `layout`'s). Empty: `layout` in every layer.
    pub layers: Vec<KvLayout>,
    pub quantize_frames: bool,
    pub quantize_text: bool,
    /// The sequence's first `sinks` tokens stay FP16 when they are frame tokens (0 when
    /// frames are not quantized).
    pub sinks: usize,
    /// The FP16 share of all tokens that sink tokens may fill up to (text counts first).
    pub fp16_budget: f32,
}

impl DevicePolicy {
    /// Maps `policy` onto the device pools for `kv_heads` x `head_dim`.
    /// The group is fitted to `head_dim` as the CPU cache fits it ([`KvPolicy::fitted_to`]).
    pub fn new(policy: &KvPolicy, kv_heads: usize, head_dim: usize) -> Result<Self, CudaError> {
        // The device attention kernel gives each of a warp's 32 lanes head_dim / 32 elements:
        // other head dims (16, 24, 48, 80, ...) run on the CPU decoder, whatever the policy.
        if head_dim == 0 || !head_dim.is_multiple_of(32) || head_dim > crate::layout::MAX_HEAD_DIM {
            return Err(CudaError::Policy {
                policy: policy.name(),
                message: format!(
                    "the device decoder needs a head_dim that is a multiple of 32 (at most {}); \
                     this model's {head_dim} runs on the CPU decoder (device: cpu){}",
                    crate::layout::MAX_HEAD_DIM,
                    if policy.head_dim_problem(head_dim).is_some() {
                        " with the policy fp16"
                    } else {
                        ""
                    }
                ),
            });
        }
        let policy = &policy.fitted_to(head_dim);
        let quantize_frames = policy.quantizes_frames();
        if quantize_frames && policy.salient_frame_tokens {
            tracing::warn!(
                policy = %policy.name(),
                "salient=on is not applied on the GPU: frame tokens other than the attention sinks are quantized"
            );
        }
        let quantize_text = policy.quantize_text && quantize_frames;
        let key_per_channel = policy.key_mode == KeyMode::PerChannel;
        let err = |message: String| CudaError::Policy {
            policy: policy.name(),
            message,
        };
        if quantize_text && key_per_channel {
            return Err(err(
                "quantized text needs per-token keys (keys=token): text is appended one token at a time".into(),
            ));
        }
        let any_quant = quantize_frames || quantize_text;
        let mut layout = KvLayout {
            kv_heads,
            head_dim,
            block_tokens: policy.quant_block_tokens,
            bits: if any_quant { policy.frame_bits } else { 4 },
            group: policy.group,
            key_per_channel,
        };
        if !any_quant && !head_dim.is_multiple_of(layout.group) {
            // Nothing is quantized: the group is unused, pick one the layout accepts.
            layout.group = 32;
        }
        layout.validate().map_err(|e| err(e.to_string()))?;
        let layers = if policy.is_per_layer() && quantize_frames {
            policy
                .layers
                .iter()
                .map(|f| {
                    let l = KvLayout {
                        bits: f.bits,
                        group: f.group,
                        key_per_channel: f.key_mode == KeyMode::PerChannel,
                        ..layout
                    };
                    l.validate().map(|()| l)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(e.to_string()))?
        } else {
            Vec::new()
        };
        if quantize_text && layers.iter().any(|l| l.key_per_channel) {
            return Err(err(
                "quantized text needs per-token keys in every layer (keys=token)".into(),
            ));
        }
        Ok(Self {
            layout: layers.first().copied().unwrap_or(layout),
            layers,
            quantize_frames,
            quantize_text,
            sinks: if quantize_frames {
                policy.sink_tokens
            } else {
                0
            },
            fp16_budget: policy.fp16_budget,
        })
    }

    /// The pool layout of `layer`.
    pub fn layout_of(&self, layer: usize) -> KvLayout {
        self.layers.get(layer).copied().unwrap_or(self.layout)
    }

    /// Whether the layers' layouts differ (a calibrated policy).
    pub fn is_per_layer(&self) -> bool {
        self.layers.iter().any(|l| *l != self.layout)
    }

    /// Whether some layer quantizes frame keys per channel over a block: such blocks are
    /// written whole, so no span continues one.
    fn any_key_per_channel(&self) -> bool {
        self.layout.key_per_channel || self.layers.iter().any(|l| l.key_per_channel)
    }

    /// Whether tokens of `kind` are stored quantized.
    pub fn quantizes(&self, kind: TokenKind) -> bool {
        match kind {
            TokenKind::Text => self.quantize_text,
            TokenKind::Frame => self.quantize_frames,
        }
    }

    /// Pool blocks (text, frame) that hold `text_tokens` and `frame_tokens` in spans of at
    /// least `min_span` tokens each (every new span may open a partial block).
    pub fn blocks_for(
        &self,
        text_tokens: usize,
        frame_tokens: usize,
        spans: usize,
    ) -> (usize, usize) {
        let t = self.layout.block_tokens;
        let (mut fp16, mut quant) = (0, 0);
        if frame_tokens > 0 && self.sinks > 0 {
            // Sink tokens of a frame that starts the sequence, in an FP16 block of its own.
            fp16 += self.sinks.min(frame_tokens).div_ceil(t) + 1;
        }
        for (kind, n) in [
            (TokenKind::Text, text_tokens),
            (TokenKind::Frame, frame_tokens),
        ] {
            if n == 0 {
                continue;
            }
            let blocks = n.div_ceil(t) + spans;
            if self.quantizes(kind) {
                quant += blocks;
            } else {
                fp16 += blocks;
            }
        }
        (fp16, quant)
    }
}

impl DevicePolicy {
    /// Exact pool blocks (text, frame) the spans `(kind, tokens)` occupy when appended in
    /// order, each in pieces of [`PREFILL_CHUNK`] tokens.
    pub fn blocks_for_spans(&self, spans: &[(TokenKind, usize)]) -> (usize, usize) {
        let spans: Vec<_> = spans.iter().map(|&(kind, n)| (kind, n, None)).collect();
        self.blocks_for_inputs(&spans)
    }
}

impl DevicePolicy {
    /// Exact pool blocks (text, frame) of spans `(kind, tokens, frame id)` appended in order,
    /// frames with an id in blocks of their own ([`KvBlockTable::append_frame`]), each span
    /// in pieces of [`PREFILL_CHUNK`] tokens as the device forward pass appends it.
    pub fn blocks_for_inputs(
        &self,
        spans: &[(TokenKind, usize, Option<FrameId>)],
    ) -> (usize, usize) {
        let mut t = KvBlockTable::new(self.clone(), usize::MAX / 2, usize::MAX / 2);
        for &(kind, n, frame) in spans {
            t.append_in_chunks(kind, n, frame);
        }
        t.used_blocks()
    }

    /// Pool blocks (text, frame) a camera session holds at most: `prefix` text tokens,
    /// `frames` frames of `frame_tokens` each (in blocks of their own, as
    /// [`KvBlockTable::append_frame`] places them), then `question` text tokens (a question
    /// and its answer). Evicted frames and dropped questions give their blocks back for the
    /// next ones. One turn of the window is counted too: a first frame that holds sink
    /// tokens FP16 frees fewer quantized blocks than the frame after it takes.
    pub fn blocks_for_session(
        &self,
        prefix: usize,
        frames: usize,
        frame_tokens: usize,
        question: usize,
    ) -> (usize, usize) {
        let mut t = KvBlockTable::new(self.clone(), usize::MAX / 2, usize::MAX / 2);
        t.append_in_chunks(TokenKind::Text, prefix, None);
        for f in 0..frames {
            t.append_in_chunks(TokenKind::Frame, frame_tokens, Some(f as FrameId));
        }
        t.append_in_chunks(TokenKind::Text, question, None);
        if frames > 0 && frame_tokens > 0 {
            // Cannot fail: the question is the newest text, frame 0 is cached.
            let _ = t.truncate_last(question);
            let _ = t.evict_frame(0);
            t.append_in_chunks(TokenKind::Frame, frame_tokens, Some(frames as FrameId));
            t.append_in_chunks(TokenKind::Text, question, None);
        }
        t.used_blocks()
    }
}

impl KvBlockTable {
    /// Appends a span in pieces of [`PREFILL_CHUNK`] tokens, as the device forward pass
    /// does (sizing only: the table's capacities must be unbounded).
    fn append_in_chunks(&mut self, kind: TokenKind, n: usize, frame: Option<FrameId>) {
        let mut start = 0;
        while start < n {
            let piece = (n - start).min(PREFILL_CHUNK);
            // Cannot fail with unbounded capacities and distinct frame ids.
            let _ = match frame {
                Some(f) => self.append_frame(f, piece),
                None => self.append(kind, piece),
            };
            start += piece;
        }
    }
}

/// Where `len` consecutive tokens of a span (starting at token `src_token` of the span) are
/// written: block `block` of the text or frame pool, slots `tok_offset..tok_offset + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub kind: BlockKind,
    pub block: usize,
    pub tok_offset: usize,
    pub len: usize,
    pub src_token: usize,
}

/// A [`KvBlockTable`]'s state before appends ([`KvBlockTable::mark`]).
#[derive(Clone, Copy, Debug)]
pub struct TableMark {
    entries: usize,
    last_len: u32,
    next_text: usize,
    next_frame: usize,
    next_pos: usize,
    position_lag: usize,
    lag_order: usize,
    next_seq: usize,
    tokens: (usize, usize),
}

/// Block assignment of one sequence over pools of `text_blocks` + `frame_blocks`.
#[derive(Clone, Debug)]
pub struct KvBlockTable {
    policy: DevicePolicy,
    text_blocks: usize,
    frame_blocks: usize,
    /// High-water marks: blocks `0..next_*` of each pool have been handed out.
    next_text: usize,
    next_frame: usize,
    /// Blocks below the high-water marks given back by evictions and truncations.
    free_text: Vec<u32>,
    free_frame: Vec<u32>,
    entries: Vec<BlockEntry>,
    /// The frame each entry belongs to (`None`: text, or frames appended without an id).
    owners: Vec<Option<FrameId>>,
    /// Order index of the next token (tokens appended so far, less those truncated).
    next_pos: usize,
    /// How far the next token's RoPE position trails its order index: an M-RoPE frame takes
    /// fewer positions than tokens ([`Self::set_next_position`]); 0 under plain RoPE.
    position_lag: usize,
    /// The order index where the lag was last set: tokens before it stay.
    lag_order: usize,
    /// Tokens appended since the last clear (truncation does not rewind it): sink tokens
    /// are the first `policy.sinks` of them, as in the CPU cache.
    next_seq: usize,
    /// Tokens held in FP16 blocks and in quantized blocks.
    text_tokens: usize,
    frame_tokens: usize,
}

impl KvBlockTable {
    pub fn new(policy: DevicePolicy, text_blocks: usize, frame_blocks: usize) -> Self {
        Self {
            policy,
            text_blocks,
            frame_blocks,
            next_text: 0,
            next_frame: 0,
            free_text: Vec::new(),
            free_frame: Vec::new(),
            entries: Vec::new(),
            owners: Vec::new(),
            next_pos: 0,
            position_lag: 0,
            lag_order: 0,
            next_seq: 0,
            text_tokens: 0,
            frame_tokens: 0,
        }
    }

    pub fn policy(&self) -> &DevicePolicy {
        &self.policy
    }
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.text_tokens + self.frame_tokens
    }
    /// RoPE position of the next token: its order index ([`Self::next_order`]) less the
    /// positions M-RoPE frames did not take (evicted frames keep their positions taken).
    pub fn next_position(&self) -> usize {
        self.next_pos - self.position_lag
    }
    /// Order index of the next token (the causal order the attention context lists): tokens
    /// appended so far, less those truncated.
    pub fn next_order(&self) -> usize {
        self.next_pos
    }
    /// Sets the RoPE position of the next token to `position` after a span whose positions
    /// did not advance one per token (an M-RoPE frame: `max(rows, cols)` positions for
    /// `rows x cols` tokens). Positions never run ahead of the order index; tokens before
    /// this point can no longer be truncated ([`Self::truncate_last`] drops text only).
    pub fn set_next_position(&mut self, position: usize) -> Result<(), CudaError> {
        if position > self.next_pos {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: format!(
                    "next position {position} is past the next token's order {}",
                    self.next_pos
                ),
            });
        }
        if position != self.next_position() {
            self.position_lag = self.next_pos - position;
            self.lag_order = self.next_pos;
        }
        Ok(())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The attention context: every block in append order.
    pub fn entries(&self) -> &[BlockEntry] {
        &self.entries
    }
    /// The frame each entry of [`Self::entries`] belongs to (`None`: text, or a frame
    /// appended without id).
    pub fn owners(&self) -> &[Option<FrameId>] {
        &self.owners
    }
    /// (text pool blocks, frame pool blocks) the table was sized for.
    pub fn pool_blocks(&self) -> (usize, usize) {
        (self.text_blocks, self.frame_blocks)
    }
    /// Blocks handed out so far (text, frame): the prefix of each pool that holds every
    /// block in use (freed blocks below it are reused first).
    pub fn used_blocks(&self) -> (usize, usize) {
        (self.next_text, self.next_frame)
    }
    /// Blocks holding tokens now (text, frame).
    pub fn blocks_in_use(&self) -> (usize, usize) {
        (
            self.next_text - self.free_text.len(),
            self.next_frame - self.free_frame.len(),
        )
    }
    /// Tokens held FP16 and quantized.
    pub fn token_counts(&self) -> (usize, usize) {
        (self.text_tokens, self.frame_tokens)
    }
    /// Bytes attention reads in `layers` layers: the used slots of every block listed, in
    /// each layer's layout.
    pub fn attention_bytes(&self, layers: usize) -> u64 {
        if !self.policy.is_per_layer() {
            return self.attention_bytes_in(&self.policy.layout) * layers as u64;
        }
        (0..layers)
            .map(|layer| self.attention_bytes_in(&self.policy.layout_of(layer)))
            .sum()
    }

    /// Bytes attention reads in one layer of layout `l`.
    fn attention_bytes_in(&self, l: &KvLayout) -> u64 {
        let fp16_tok = (2 * 2 * l.row_elems()) as u64;
        let code_tok = (2 * l.kv_heads * l.code_row_bytes()) as u64;
        let v_params_tok = (4 * l.kv_heads * l.groups()) as u64;
        self.entries
            .iter()
            .map(|e| {
                let n = e.len as u64;
                match e.kind {
                    BlockKind::Text => n * fp16_tok,
                    BlockKind::Frame => {
                        let k_params = if l.key_per_channel {
                            (4 * l.row_elems()) as u64
                        } else {
                            n * v_params_tok
                        };
                        n * (code_tok + v_params_tok) + k_params
                    }
                }
            })
            .sum()
    }

    /// Appends `n` tokens of `kind`; returns where each run of them goes. Nothing changes when
    /// the pools are too small (the error says which pool).
    pub fn append(&mut self, kind: TokenKind, n: usize) -> Result<Vec<Placement>, CudaError> {
        self.append_owned(kind, n, None)
    }

    /// Appends `n` tokens of frame `frame` in blocks of their own, so that
    /// [`Self::evict_frame`] can give them back. A frame may come in several pieces as long
    /// as nothing is appended between them (nor evicted: the next piece follows the newest
    /// token, which is the frame's).
    pub fn append_frame(&mut self, frame: FrameId, n: usize) -> Result<Vec<Placement>, CudaError> {
        let next_piece = self.owners.last() == Some(&Some(frame))
            && self
                .entries
                .last()
                .is_some_and(|e| e.order as usize + e.len as usize == self.next_pos);
        if !next_piece && self.owners.contains(&Some(frame)) {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: format!("frame {frame} is cached already"),
            });
        }
        self.append_owned(TokenKind::Frame, n, Some(frame))
    }

    fn append_owned(
        &mut self,
        kind: TokenKind,
        n: usize,
        owner: Option<FrameId>,
    ) -> Result<Vec<Placement>, CudaError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let quant = self.policy.quantizes(kind);
        let sinks = if quant && kind == TokenKind::Frame {
            self.sink_count(n)
        } else {
            0
        };
        let bkind = if quant {
            BlockKind::Frame
        } else {
            BlockKind::Text
        };
        // New blocks each pool needs, checked before anything changes. Sink tokens come
        // first, in FP16 blocks; the rest of the span cannot continue a sink block.
        let t = self.policy.layout.block_tokens;
        let mut need = [0usize; 2];
        if sinks > 0 {
            need[0] = (sinks - self.open_room(BlockKind::Text, owner).min(sinks)).div_ceil(t);
            need[1] = (n - sinks).div_ceil(t);
        } else {
            need[quant as usize] = (n - self.open_room(bkind, owner).min(n)).div_ceil(t);
        }
        for (pool, &blocks) in need.iter().enumerate() {
            let (next, cap, free) = if pool == 1 {
                (self.next_frame, self.frame_blocks, self.free_frame.len())
            } else {
                (self.next_text, self.text_blocks, self.free_text.len())
            };
            if blocks > cap - next + free {
                return Err(CudaError::KvFull {
                    message: format!(
                        "{n} {} tokens need {blocks} more {} blocks; {} of {cap} are in use",
                        match kind {
                            TokenKind::Text => "text",
                            TokenKind::Frame => "frame",
                        },
                        if pool == 1 { "quantized" } else { "FP16" },
                        next - free
                    ),
                });
            }
        }
        let mut out = Vec::with_capacity(need[0] + need[1] + 1);
        if sinks > 0 {
            self.place(BlockKind::Text, owner, 0, sinks, &mut out);
        }
        self.place(bkind, owner, sinks, n - sinks, &mut out);
        self.next_seq += n;
        Ok(out)
    }

    /// FP16 sink tokens among the first of `n` frame tokens appended now: those among the
    /// sequence's first `policy.sinks`, as many as the FP16 budget over everything cached
    /// plus the span has room for beyond the FP16 tokens held (the CPU cache's rule).
    fn sink_count(&self, n: usize) -> usize {
        let allowed = (self.policy.fp16_budget as f64 * (self.len() + n) as f64).floor() as usize;
        self.policy
            .sinks
            .saturating_sub(self.next_seq)
            .min(n)
            .min(allowed.saturating_sub(self.text_tokens))
    }

    /// Free slots in the newest block when a span of `bkind` tokens owned by `owner` may
    /// continue it: only a block of the same owner (text after text, or the next piece of
    /// the same frame) whose tokens end at the next position (not when an evicted frame
    /// came after it: a block's tokens have consecutive orders), and never a block whose
    /// keys are quantized per channel.
    fn open_room(&self, bkind: BlockKind, owner: Option<FrameId>) -> usize {
        let t = self.policy.layout.block_tokens;
        let may_continue = !(bkind == BlockKind::Frame && self.policy.any_key_per_channel());
        match (self.entries.last(), self.owners.last()) {
            (Some(e), Some(o))
                if may_continue
                    && *o == owner
                    && e.kind == bkind
                    && (e.len as usize) < t
                    && e.order as usize + e.len as usize == self.next_pos =>
            {
                t - e.len as usize
            }
            _ => 0,
        }
    }

    /// Places `n` tokens (from token `src` of the span) in blocks of `bkind`: the rest of the
    /// newest block when it may be continued, then new blocks (freed ones first). The pools
    /// must have room (checked by the caller).
    fn place(
        &mut self,
        bkind: BlockKind,
        owner: Option<FrameId>,
        src: usize,
        n: usize,
        out: &mut Vec<Placement>,
    ) {
        let t = self.policy.layout.block_tokens;
        let first = self.open_room(bkind, owner).min(n);
        let mut done = 0;
        if first > 0
            && let Some(e) = self.entries.last_mut()
        {
            out.push(Placement {
                kind: bkind,
                block: e.block as usize,
                tok_offset: e.len as usize,
                len: first,
                src_token: src,
            });
            e.len += first as u32;
            done = first;
        }
        while done < n {
            let len = (n - done).min(t);
            let (free, next) = match bkind {
                BlockKind::Frame => (&mut self.free_frame, &mut self.next_frame),
                BlockKind::Text => (&mut self.free_text, &mut self.next_text),
            };
            // Freed blocks first, lowest first (they sit below the high-water mark).
            let block = match free.pop() {
                Some(b) => b as usize,
                None => {
                    *next += 1;
                    *next - 1
                }
            };
            out.push(Placement {
                kind: bkind,
                block,
                tok_offset: 0,
                len,
                src_token: src + done,
            });
            self.entries.push(BlockEntry {
                kind: bkind,
                block: block as u32,
                len: len as u32,
                order: (self.next_pos + done) as i32,
            });
            self.owners.push(owner);
            done += len;
        }
        self.next_pos += n;
        match bkind {
            BlockKind::Frame => self.frame_tokens += n,
            BlockKind::Text => self.text_tokens += n,
        }
    }

    /// The table's state now, for [`Self::rollback`].
    pub fn mark(&self) -> TableMark {
        TableMark {
            entries: self.entries.len(),
            last_len: self.entries.last().map_or(0, |e| e.len),
            next_text: self.next_text,
            next_frame: self.next_frame,
            next_pos: self.next_pos,
            position_lag: self.position_lag,
            lag_order: self.lag_order,
            next_seq: self.next_seq,
            tokens: (self.text_tokens, self.frame_tokens),
        }
    }

    /// Undoes every append since `mark` (only appends may come between the two): blocks
    /// opened since go back to their free lists, the block that was newest gets its old
    /// length back, and positions and counts return to what they were.
    pub fn rollback(&mut self, mark: TableMark) {
        for e in self.entries.drain(mark.entries.min(self.entries.len())..) {
            let (free, next) = match e.kind {
                BlockKind::Text => (&mut self.free_text, mark.next_text),
                BlockKind::Frame => (&mut self.free_frame, mark.next_frame),
            };
            // Blocks below the old high-water mark came from the free list.
            if (e.block as usize) < next {
                free.push(e.block);
            }
        }
        self.owners.truncate(self.entries.len());
        if let Some(e) = self.entries.last_mut() {
            e.len = mark.last_len;
        }
        self.free_text.sort_unstable_by(|a, b| b.cmp(a));
        self.free_frame.sort_unstable_by(|a, b| b.cmp(a));
        self.next_text = mark.next_text;
        self.next_frame = mark.next_frame;
        self.next_pos = mark.next_pos;
        self.position_lag = mark.position_lag;
        self.lag_order = mark.lag_order;
        self.next_seq = mark.next_seq;
        (self.text_tokens, self.frame_tokens) = mark.tokens;
    }

    /// Forgets every token (the pools' contents become unused).
    pub fn clear(&mut self) {
        self.next_text = 0;
        self.next_frame = 0;
        self.free_text.clear();
        self.free_frame.clear();
        self.entries.clear();
        self.owners.clear();
        self.next_pos = 0;
        self.position_lag = 0;
        self.lag_order = 0;
        self.next_seq = 0;
        self.text_tokens = 0;
        self.frame_tokens = 0;
    }

    /// Gives back frame `frame`'s blocks; later tokens keep their positions. Returns the
    /// tokens removed.
    pub fn evict_frame(&mut self, frame: FrameId) -> Result<usize, CudaError> {
        if !self.owners.contains(&Some(frame)) {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: format!("frame {frame} is not cached"),
            });
        }
        let mut removed = 0;
        let mut i = 0;
        while i < self.entries.len() {
            if self.owners[i] == Some(frame) {
                self.owners.remove(i);
                let e = self.entries.remove(i);
                removed += e.len as usize;
                self.release(e);
            } else {
                i += 1;
            }
        }
        Ok(removed)
    }

    /// Drops the newest `n` tokens (none of them a frame's own) and rewinds the positions, so
    /// the next tokens take the dropped ones' positions. Nothing changes on error.
    pub fn truncate_last(&mut self, n: usize) -> Result<(), CudaError> {
        let mut left = n;
        for (e, o) in self.entries.iter().zip(&self.owners).rev() {
            if left == 0 {
                break;
            }
            let order_end = e.order as usize + e.len as usize;
            if o.is_some() || order_end != self.next_pos - (n - left) {
                return Err(CudaError::Shape {
                    op: "device KV cache",
                    message: format!(
                        "cannot drop the newest {n} tokens: they are not the last ones appended as text"
                    ),
                });
            }
            left -= left.min(e.len as usize);
        }
        if left > 0 {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: format!("cannot drop {n} tokens: {} are cached", self.len()),
            });
        }
        if self.position_lag > 0 && self.next_pos - n < self.lag_order {
            return Err(CudaError::Shape {
                op: "device KV cache",
                message: format!(
                    "cannot drop the newest {n} tokens: they reach into an M-RoPE frame"
                ),
            });
        }
        let mut left = n;
        while left > 0 {
            let Some(e) = self.entries.last_mut() else {
                break;
            };
            if e.len as usize > left {
                // Part of the newest block: it stays, shorter.
                e.len -= left as u32;
                let kind = e.kind;
                self.uncount(kind, left);
                break;
            }
            left -= e.len as usize;
            self.owners.pop();
            if let Some(e) = self.entries.pop() {
                self.release(e);
            }
        }
        self.next_pos -= n;
        Ok(())
    }

    /// Puts an entry's block on its pool's free list and drops its tokens from the counts.
    fn release(&mut self, e: BlockEntry) {
        self.uncount(e.kind, e.len as usize);
        let free = match e.kind {
            BlockKind::Text => &mut self.free_text,
            BlockKind::Frame => &mut self.free_frame,
        };
        free.push(e.block);
        // Lowest last: `pop` hands out the lowest freed block first.
        free.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Drops `n` tokens held in blocks of `kind` from the counts.
    fn uncount(&mut self, kind: BlockKind, n: usize) {
        match kind {
            BlockKind::Text => self.text_tokens -= n,
            BlockKind::Frame => self.frame_tokens -= n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::Rng;
    use crate::reference::{self, HostPools};

    fn policy(s: &str, kv_heads: usize, head_dim: usize) -> DevicePolicy {
        DevicePolicy::new(&s.parse::<KvPolicy>().unwrap(), kv_heads, head_dim).unwrap()
    }

    /// Writes spans through the table into host pools (the kernels' twins), then checks the
    /// reference attention over the table's entries against a direct causal attention over
    /// the stored (dequantized) tokens in append order.
    fn roundtrip(p: DevicePolicy, spans: &[(TokenKind, usize)]) {
        for layer in 0..p.layers.len().max(1) {
            roundtrip_layer(&p, layer, spans);
        }
    }

    /// [`roundtrip`] of one layer: the table's placements (shared by every layer) written in
    /// that layer's layout.
    fn roundtrip_layer(p: &DevicePolicy, layer: usize, spans: &[(TokenKind, usize)]) {
        let l = p.layout_of(layer);
        let total_text: usize = spans
            .iter()
            .filter(|s| s.0 == TokenKind::Text)
            .map(|s| s.1)
            .sum();
        let total_frame: usize = spans.iter().map(|s| s.1).sum::<usize>() - total_text;
        let (tb, fb) = p.blocks_for(total_text, total_frame, spans.len());
        let mut table = KvBlockTable::new(p.clone(), tb, fb);
        let mut host = HostPools::new(l, tb, fb);
        let mut rng = Rng::new(3);
        let row = l.row_elems();
        // Where each token landed, in append order.
        let mut slots: Vec<(BlockKind, usize, usize)> = Vec::new();
        for &(kind, n) in spans {
            let k = rng.normals(n * row);
            let v = rng.normals(n * row);
            for pl in table.append(kind, n).unwrap() {
                store(&mut host, &pl, &k, &v, row);
                for t in 0..pl.len {
                    slots.push((pl.kind, pl.block, pl.tok_offset + t));
                }
            }
        }
        assert_eq!(slots.len(), table.len());
        // Orders of consecutive tokens inside every entry.
        for e in table.entries() {
            for t in 0..e.len as usize {
                let s = slots[e.order as usize + t];
                assert_eq!((s.0, s.1, s.2), (e.kind, e.block as usize, t), "{e:?}");
            }
        }
        let q_heads = 2 * l.kv_heads;
        let n_q = 3;
        let q = rng.normals(n_q * q_heads * l.head_dim);
        let q_order: Vec<i32> = (0..n_q)
            .map(|i| (table.len() - n_q + i) as i32 - 2)
            .collect();
        let tokens: Vec<(usize, (BlockKind, usize, usize))> =
            slots.iter().copied().enumerate().collect();
        check_attention(&host, &table, &tokens, &q, &q_order, q_heads);
    }

    /// Writes a placement's tokens (rows of `k`, `v`) into the host pools.
    fn store(host: &mut HostPools, pl: &Placement, k: &[f32], v: &[f32], row: usize) {
        let r = pl.src_token * row..(pl.src_token + pl.len) * row;
        match pl.kind {
            BlockKind::Text => host.store_text(pl.block, pl.tok_offset, &k[r.clone()], &v[r]),
            BlockKind::Frame => {
                host.quantize_frame(pl.block, pl.tok_offset, pl.len, &k[r.clone()], &v[r])
            }
        }
    }

    /// The reference attention over the table's entries against a direct causal attention
    /// over `tokens` (order, where the token is stored), in order.
    fn check_attention(
        host: &HostPools,
        table: &KvBlockTable,
        tokens: &[(usize, (BlockKind, usize, usize))],
        q: &[f32],
        q_order: &[i32],
        q_heads: usize,
    ) {
        let l = table.policy().layout;
        let got = reference::attention(host, q, q_order, q_heads, table.entries());
        let d = l.head_dim;
        let g = q_heads / l.kv_heads;
        let mut want = vec![0f32; got.len()];
        for (qi, &qo) in q_order.iter().enumerate() {
            for hq in 0..q_heads {
                let qv = &q[(qi * q_heads + hq) * d..(qi * q_heads + hq + 1) * d];
                let kv: Vec<_> = tokens
                    .iter()
                    .filter(|(o, _)| *o as i64 <= qo as i64)
                    .map(|&(_, (k, b, t))| host.token(k, b, t, hq / g))
                    .collect();
                let scores: Vec<f64> = kv
                    .iter()
                    .map(|(k, _)| {
                        k.iter()
                            .zip(qv)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                for e in 0..d {
                    let a: f64 = w.iter().zip(&kv).map(|(w, (_, v))| w * v[e] as f64).sum();
                    want[(qi * q_heads + hq) * d + e] = (a / sum) as f32;
                }
            }
        }
        let err = reference::normalized_error(&got, &want);
        assert!(err < 1e-5, "{err}");
    }

    enum Op {
        Text(usize),
        Frame(FrameId, usize),
        Evict(FrameId),
        Truncate(usize),
    }

    /// Runs `ops` through the table into host pools, tracking every live token by order,
    /// then checks the reference attention over the table's entries against a direct
    /// attention over the live tokens (queries that see everything and one causal query).
    fn live_roundtrip(p: DevicePolicy, pools: (usize, usize), ops: &[Op]) -> KvBlockTable {
        let l = p.layout;
        let mut table = KvBlockTable::new(p, pools.0, pools.1);
        let mut host = HostPools::new(l, pools.0, pools.1);
        let mut rng = Rng::new(5);
        let row = l.row_elems();
        let mut live: std::collections::BTreeMap<usize, (BlockKind, usize, usize)> =
            Default::default();
        let mut owner_of: Vec<(usize, FrameId)> = Vec::new();
        for op in ops {
            let (n, placements) = match *op {
                Op::Text(n) => (n, table.append(TokenKind::Text, n).unwrap()),
                Op::Frame(id, n) => (n, table.append_frame(id, n).unwrap()),
                Op::Evict(id) => {
                    let gone = table.evict_frame(id).unwrap();
                    let orders: Vec<usize> = owner_of
                        .iter()
                        .filter(|(_, f)| *f == id)
                        .map(|(o, _)| *o)
                        .collect();
                    assert_eq!(gone, orders.len());
                    for o in orders {
                        live.remove(&o);
                    }
                    continue;
                }
                Op::Truncate(n) => {
                    table.truncate_last(n).unwrap();
                    for _ in 0..n {
                        let last = *live.keys().next_back().unwrap();
                        live.remove(&last);
                    }
                    continue;
                }
            };
            let first = table.next_position() - n;
            let k = rng.normals(n * row);
            let v = rng.normals(n * row);
            for pl in placements {
                store(&mut host, &pl, &k, &v, row);
                for t in 0..pl.len {
                    let order = first + pl.src_token + t;
                    live.insert(order, (pl.kind, pl.block, pl.tok_offset + t));
                    if let Op::Frame(id, _) = *op {
                        owner_of.push((order, id));
                    }
                }
            }
        }
        assert_eq!(live.len(), table.len());
        for e in table.entries() {
            for t in 0..e.len as usize {
                let s = live[&(e.order as usize + t)];
                assert_eq!((s.0, s.1, s.2), (e.kind, e.block as usize, t), "{e:?}");
            }
        }
        let q_heads = 2 * l.kv_heads;
        let mid = *live.keys().nth(live.len() / 2).unwrap() as i32;
        let q_order = [crate::layout::SEES_ALL, mid];
        let q = rng.normals(q_order.len() * q_heads * l.head_dim);
        let tokens: Vec<(usize, (BlockKind, usize, usize))> =
            live.iter().map(|(&o, &t)| (o, t)).collect();
        check_attention(&host, &table, &tokens, &q, &q_order, q_heads);
        table
    }

    /// A camera session: prefix, frames appended and evicted in a rolling window, questions
    /// and answers dropped again; freed blocks are reused and positions never move back past
    /// a kept token.
    #[test]
    fn a_head_dim_the_device_cannot_run_names_the_cpu_decoder() {
        for head_dim in [16, 24, 48, 80] {
            for (p, fp16_hint) in [(KvPolicy::mixed(), true), (KvPolicy::fp16(), false)] {
                match DevicePolicy::new(&p, 2, head_dim) {
                    Err(CudaError::Policy { message, .. }) => {
                        assert!(
                            message.contains("multiple of 32")
                                && message.contains(&format!("this model's {head_dim}"))
                                && message.contains("device: cpu")
                                && message.contains("policy fp16") == fp16_hint,
                            "{message}"
                        );
                    }
                    other => panic!("head_dim {head_dim}: {other:?}"),
                }
            }
        }
        assert!(DevicePolicy::new(&KvPolicy::mixed(), 2, 96).is_ok());
    }

    #[test]
    fn rolling_frames_and_rolled_back_questions_reuse_blocks() {
        use Op::*;
        let ops = [
            Text(10),
            Frame(1, 64),
            Frame(2, 64),
            Text(7),
            Text(1),
            Text(1),
            Truncate(9),
            Evict(1),
            Frame(3, 64),
            Text(5),
            Truncate(5),
            Evict(2),
            Frame(4, 64),
            Text(6),
        ];
        for p in ["mixed", "fp16", "mixed:keys=token", "int4-all"] {
            let p = policy(p, 2, 64);
            // Pools for the prefix, two frames and one question at a time.
            let (tb, fb) = p.blocks_for_session(10, 2, 64, 9);
            let t = live_roundtrip(p.clone(), (tb, fb), &ops);
            assert_eq!(t.len(), 10 + 64 + 64 + 6, "{p:?}");
            assert_eq!(t.next_position(), 10 + 4 * 64 + 6, "{p:?}");
            let (ut, uf) = t.used_blocks();
            assert!(ut <= tb && uf <= fb, "{p:?}");
        }
    }

    /// Attention sinks: a frame that starts the sequence keeps its first tokens FP16 within
    /// the FP16 budget, token for token as the CPU cache's bookkeeping does, through
    /// evictions, dropped questions and clears; attention over the split spans is exact.
    #[test]
    fn sinks_follow_the_cpu_cache() {
        use Op::*;
        use jetvlm_kvcache::cells::Cells;
        let sessions: [&[Op]; 4] = [
            &[Frame(1, 64), Text(5), Frame(2, 64), Text(3)],
            &[Text(2), Frame(1, 64), Text(4), Truncate(4), Frame(2, 40)],
            &[
                Frame(1, 3),
                Frame(2, 64),
                Text(10),
                Truncate(10),
                Evict(1),
                Frame(3, 64),
            ],
            &[
                Text(1),
                Truncate(1),
                Frame(1, 64),
                Evict(1),
                Frame(2, 64),
                Text(2),
            ],
        ];
        let policies = [
            "mixed",
            "mixed:sinks=8",
            "mixed:sinks=40,budget=0.5",
            "mixed:budget=0.01",
            "mixed:keys=token,sinks=20",
            "mixed:sinks=0",
            "int4-all",
            "fp16",
        ];
        for name in policies {
            let cpu_policy: KvPolicy = name.parse().unwrap();
            let p = DevicePolicy::new(&cpu_policy, 1, 64).unwrap();
            for ops in sessions {
                let mut t = KvBlockTable::new(p.clone(), 64, 64);
                let mut cells = Cells::new(
                    cpu_policy.fp16_block_tokens,
                    cpu_policy.quant_block_tokens,
                    1 << 20,
                );
                let mut pos = 0u32;
                for (i, op) in ops.iter().enumerate() {
                    let mut cpu_append = |kind, n: usize, frame| {
                        let positions: Vec<u32> = (pos..pos + n as u32).collect();
                        pos += n as u32;
                        cells
                            .append(&cpu_policy, kind, &positions, frame, None)
                            .unwrap();
                    };
                    match *op {
                        Text(n) => {
                            t.append(TokenKind::Text, n).unwrap();
                            cpu_append(TokenKind::Text, n, None);
                        }
                        Frame(id, n) => {
                            let placed = t.append_frame(id, n).unwrap();
                            assert_eq!(placed.iter().map(|p| p.len).sum::<usize>(), n);
                            cpu_append(TokenKind::Frame, n, Some(id));
                        }
                        Evict(id) => {
                            t.evict_frame(id).unwrap();
                            cells.evict_frame(id).unwrap();
                        }
                        Truncate(n) => {
                            t.truncate_last(n).unwrap();
                            cells.truncate_last(n).unwrap();
                            pos -= n as u32;
                        }
                    }
                    let c = cells.counts();
                    assert_eq!(
                        t.token_counts(),
                        (c.fp16_tokens, c.tokens - c.fp16_tokens),
                        "{name}, step {i} of {}",
                        ops.len()
                    );
                }
                // The upper-bound sizing holds the session's spans.
                let frames: usize = ops
                    .iter()
                    .map(|o| if let Frame(_, n) = o { *n } else { 0 })
                    .sum();
                let text: usize = ops
                    .iter()
                    .map(|o| if let Text(n) = o { *n } else { 0 })
                    .sum();
                let (tb, fb) = p.blocks_for(text, frames, ops.len());
                let (ut, uf) = t.used_blocks();
                assert!(
                    ut <= tb && uf <= fb,
                    "{name}: used {ut}/{uf}, sized {tb}/{fb}"
                );
                live_roundtrip(p.clone(), (tb, fb), ops);
            }
        }
        // The default policy: a frame-first span puts its 4 sinks in an FP16 block of the
        // frame's own, the rest in a quantized block; a clear starts the sinks again.
        let mut t = KvBlockTable::new(policy("mixed", 1, 64), 4, 4);
        let placed = t.append_frame(1, 64).unwrap();
        let runs: Vec<_> = placed
            .iter()
            .map(|p| (p.kind, p.len, p.src_token))
            .collect();
        assert_eq!(
            runs,
            vec![(BlockKind::Text, 4, 0), (BlockKind::Frame, 60, 4)]
        );
        t.append(TokenKind::Text, 3).unwrap();
        assert_eq!(t.blocks_in_use(), (2, 1));
        assert_eq!(t.evict_frame(1).unwrap(), 64);
        assert_eq!(t.token_counts(), (3, 0));
        t.clear();
        t.append_frame(2, 64).unwrap();
        assert_eq!(t.token_counts(), (4, 60));
        // A frame longer than a forward chunk arrives in pieces; with sinks in the first
        // piece and per-channel keys the pieces leave one more partial block than the whole
        // span would, and the sizing counts the pieces.
        let p = policy("mixed", 1, 64);
        let n = PREFILL_CHUNK + 2;
        let sized = p.blocks_for_inputs(&[(TokenKind::Frame, n, Some(1))]);
        let mut t = KvBlockTable::new(p.clone(), sized.0, sized.1);
        t.append_frame(1, PREFILL_CHUNK).unwrap();
        t.append_frame(1, 2).unwrap();
        assert_eq!(t.used_blocks(), sized);
        let mut whole = KvBlockTable::new(p, usize::MAX / 2, usize::MAX / 2);
        whole.append_frame(1, n).unwrap();
        assert_eq!(whole.used_blocks().1 + 1, sized.1);
    }

    /// A camera session whose prefix is shorter than the sinks: the first frame holds sink
    /// tokens FP16 and fewer quantized blocks than the frames after it; the session sizing
    /// holds the window turning over for good.
    #[test]
    fn session_sizing_holds_a_window_after_a_sink_frame() {
        for (name, prefix, frame_tokens) in [
            ("mixed", 2, 65),
            ("mixed", 0, 64 + 3),
            ("mixed:keys=token", 1, 130),
            ("mixed", 10, 600),
            ("fp16", 2, 65),
        ] {
            let p = policy(name, 1, 64);
            let (window, question) = (2, 9);
            let sized = p.blocks_for_session(prefix, window, frame_tokens, question);
            let mut t = KvBlockTable::new(p.clone(), sized.0, sized.1);
            let put = |t: &mut KvBlockTable, kind, n: usize, frame: Option<FrameId>| {
                let mut start = 0;
                while start < n {
                    let piece = (n - start).min(PREFILL_CHUNK);
                    match frame {
                        Some(f) => t.append_frame(f, piece),
                        None => t.append(kind, piece),
                    }
                    .unwrap_or_else(|e| panic!("{name} prefix {prefix} frame {frame_tokens}: {e}"));
                    start += piece;
                }
            };
            put(&mut t, TokenKind::Text, prefix, None);
            for f in 0..8u64 {
                if f >= window as u64 {
                    t.evict_frame(f - window as u64).unwrap();
                }
                put(&mut t, TokenKind::Frame, frame_tokens, Some(f));
                put(&mut t, TokenKind::Text, question, None);
                t.truncate_last(question).unwrap();
            }
        }
    }

    /// Text appended right after the newest frame was evicted opens a block of its own: the
    /// open text block before the frame ends at an earlier position, and a block's tokens
    /// must have consecutive orders. The question can then still be dropped.
    #[test]
    fn text_after_evicting_the_newest_frame_starts_a_block() {
        use Op::*;
        for name in ["mixed", "fp16", "mixed:keys=token"] {
            let p = policy(name, 2, 64);
            let t = live_roundtrip(
                p.clone(),
                (8, 8),
                &[
                    Text(10),
                    Frame(1, 64),
                    Evict(1),
                    Text(5),
                    Truncate(5),
                    Text(3),
                ],
            );
            assert_eq!((t.len(), t.next_position()), (13, 77), "{name}");
        }
    }

    /// Appends rolled back to a mark leave the table as it was at the mark: entries,
    /// positions, counts, and the free blocks (reused ones given back), so the same appends
    /// made again land in the same places.
    /// An M-RoPE frame takes fewer positions than tokens: the next RoPE position trails the
    /// order index, text after it continues from there, a rollback or clear restores it, and
    /// a truncation reaching into the frame is refused (the question after it can be dropped).
    #[test]
    fn mrope_positions_trail_the_order_and_roll_back() {
        let mut t = KvBlockTable::new(policy("fp16", 2, 64), 16, 0);
        t.append(TokenKind::Text, 4).unwrap();
        let mark = t.mark();
        t.append_frame(7, 15).unwrap();
        // A 3x5 grid at 4: positions 4..=8, the next text at 9.
        t.set_next_position(9).unwrap();
        assert_eq!((t.next_order(), t.next_position()), (19, 9));
        t.append(TokenKind::Text, 3).unwrap();
        assert_eq!((t.next_order(), t.next_position()), (22, 12));
        // A text span's own positions leave the lag alone.
        t.set_next_position(12).unwrap();
        t.truncate_last(3).unwrap();
        assert_eq!((t.next_order(), t.next_position()), (19, 9));
        let before = (t.entries().to_vec(), t.len(), t.next_position());
        assert!(t.truncate_last(4).is_err());
        assert_eq!((t.entries().to_vec(), t.len(), t.next_position()), before);
        assert!(t.set_next_position(20).is_err());
        // Evicting the frame keeps later positions.
        t.evict_frame(7).unwrap();
        assert_eq!(t.next_position(), 9);
        t.rollback(mark);
        assert_eq!((t.next_order(), t.next_position(), t.len()), (4, 4, 4));
        t.append_frame(8, 15).unwrap();
        t.set_next_position(9).unwrap();
        t.clear();
        assert_eq!((t.next_order(), t.next_position()), (0, 0));
    }

    #[test]
    fn rollback_undoes_appends_since_the_mark() {
        for name in ["mixed", "mixed:keys=token", "fp16"] {
            let mut t = KvBlockTable::new(policy(name, 1, 64), 8, 8);
            t.append(TokenKind::Text, 10).unwrap();
            t.append_frame(1, 64).unwrap();
            t.append_frame(2, 64).unwrap();
            t.append(TokenKind::Text, 5).unwrap();
            t.evict_frame(1).unwrap();
            let state = |t: &KvBlockTable| {
                (
                    t.entries().to_vec(),
                    t.len(),
                    t.next_position(),
                    t.used_blocks(),
                    t.blocks_in_use(),
                    t.token_counts(),
                )
            };
            let before = state(&t);
            let mark = t.mark();
            let first: Vec<_> = [
                t.append(TokenKind::Text, 3).unwrap(),
                t.append_frame(3, 100).unwrap(),
                t.append(TokenKind::Text, 70).unwrap(),
            ]
            .concat();
            t.rollback(mark);
            assert_eq!(state(&t), before, "{name}");
            let again: Vec<_> = [
                t.append(TokenKind::Text, 3).unwrap(),
                t.append_frame(3, 100).unwrap(),
                t.append(TokenKind::Text, 70).unwrap(),
            ]
            .concat();
            assert_eq!(again, first, "{name}");
        }
    }

    #[test]
    fn eviction_and_truncation_errors_change_nothing() {
        let p = policy("mixed", 1, 64);
        let mut t = KvBlockTable::new(p, 4, 4);
        t.append(TokenKind::Text, 10).unwrap();
        t.append_frame(7, 40).unwrap();
        // The next piece of the newest frame is welcome; the same id after other tokens is not.
        t.append_frame(7, 24).unwrap();
        t.append(TokenKind::Text, 1).unwrap();
        assert!(t.append_frame(7, 64).is_err());
        t.truncate_last(1).unwrap();
        assert!(t.evict_frame(8).is_err());
        let before = (t.entries().to_vec(), t.len(), t.next_position());
        // The newest tokens are a frame's own: not droppable as a question.
        assert!(t.truncate_last(3).is_err());
        t.append(TokenKind::Text, 4).unwrap();
        assert!(t.truncate_last(5).is_err());
        t.truncate_last(4).unwrap();
        assert_eq!((t.entries().to_vec(), t.len(), t.next_position()), before);
        assert_eq!(t.evict_frame(7).unwrap(), 64);
        assert_eq!(t.blocks_in_use(), (1, 0));
        assert_eq!(t.token_counts(), (10, 0));
        // Positions stay past the evicted frame.
        assert_eq!(t.next_position(), 74);
    }

    #[test]
    fn mixed_spans_keep_orders_consecutive_within_blocks() {
        use TokenKind::{Frame, Text};
        let spans = [
            (Text, 5),
            (Frame, 64),
            (Frame, 70),
            (Text, 3),
            (Text, 1),
            (Text, 1),
            (Frame, 10),
            (Text, 40),
        ];
        roundtrip(policy("mixed", 2, 64), &spans);
        roundtrip(policy("fp16", 2, 64), &spans);
        roundtrip(policy("mixed:keys=token,bits=2", 2, 64), &spans);
        roundtrip(policy("int4-all", 1, 64), &spans);
    }

    #[test]
    fn decode_tokens_fill_the_open_block() {
        let p = policy("mixed", 1, 64);
        let mut t = KvBlockTable::new(p, 4, 4);
        t.append(TokenKind::Text, 10).unwrap();
        t.append(TokenKind::Frame, 64).unwrap();
        // Text after a frame opens a new FP16 block.
        let a = t.append(TokenKind::Text, 1).unwrap();
        assert_eq!((a[0].block, a[0].tok_offset), (1, 0));
        for i in 1..70 {
            let pl = t.append(TokenKind::Text, 1).unwrap();
            assert_eq!(pl.len(), 1);
            assert_eq!((pl[0].block, pl[0].tok_offset), (1 + i / 64, i % 64));
        }
        assert_eq!(t.entries().len(), 4);
        assert_eq!(t.token_counts(), (80, 64));
    }

    #[test]
    fn span_sizing_is_exact() {
        use TokenKind::{Frame, Text};
        let p = policy("mixed", 1, 64);
        let spans = [
            (Text, 10),
            (Frame, 64),
            (Frame, 64),
            (Text, 100),
            (Text, 1),
            (Frame, 30),
        ];
        let (tb, fb) = p.blocks_for_spans(&spans);
        assert_eq!((tb, fb), (3, 3));
        let mut t = KvBlockTable::new(p, tb, fb);
        for (k, n) in spans {
            t.append(k, n).unwrap();
        }
        assert!(t.append(Text, 64).is_err());
        let (tb, fb) = policy("fp16", 1, 64).blocks_for_spans(&spans);
        assert_eq!((tb, fb), (5, 0));
    }

    #[test]
    fn full_pools_are_an_error_and_change_nothing() {
        let p = policy("mixed", 1, 64);
        let mut t = KvBlockTable::new(p, 1, 1);
        t.append(TokenKind::Text, 60).unwrap();
        let before = t.entries().to_vec();
        let e = t.append(TokenKind::Text, 10).unwrap_err();
        assert!(matches!(e, CudaError::KvFull { .. }), "{e}");
        assert_eq!(t.entries(), &before[..]);
        assert_eq!(t.len(), 60);
        t.append(TokenKind::Frame, 64).unwrap();
        assert!(t.append(TokenKind::Frame, 1).is_err());
    }

    #[test]
    fn policies_map_or_fail_clearly() {
        let p = policy("fp16", 2, 32);
        assert!(!p.quantize_frames && !p.quantize_text);
        // The default group of 64 is fitted to head dim 32 (and 96); 40 fits no group.
        assert_eq!(policy("mixed", 2, 32).layout.group, 32);
        assert_eq!(policy("mixed", 2, 96).layout.group, 32);
        let e = DevicePolicy::new(&"mixed".parse().unwrap(), 2, 40).unwrap_err();
        assert!(e.to_string().contains("this model's 40"), "{e}");
        let per_channel_text = KvPolicy {
            key_mode: KeyMode::PerChannel,
            ..KvPolicy::int4_all()
        };
        let e = DevicePolicy::new(&per_channel_text, 2, 64).unwrap_err();
        assert!(e.to_string().contains("keys=token"), "{e}");
        let p = policy("int4-all", 2, 64);
        assert!(p.quantize_text && p.quantizes(TokenKind::Text));
    }

    /// A calibrated policy (a frame format per layer): each layer gets its own pool layout
    /// (groups fitted to the head dim), blocks are shared, and every layer's pools hold the
    /// table's placements correctly (the CPU twins' attention over the shared entries).
    #[test]
    fn per_layer_policies_give_each_layer_its_layout() {
        let calibrated: KvPolicy = "mixed:qblock=32,layers=2t32/4c64/8t128".parse().unwrap();
        let p = DevicePolicy::new(&calibrated, 2, 64).unwrap();
        assert!(p.is_per_layer());
        let formats: Vec<_> = (0..3)
            .map(|l| {
                let x = p.layout_of(l);
                (x.bits, x.group, x.key_per_channel, x.block_tokens)
            })
            .collect();
        assert_eq!(
            formats,
            vec![(2, 32, false, 32), (4, 64, true, 32), (8, 64, false, 32)]
        );
        // A per-channel layer anywhere: no span continues a frame block.
        let mut t = KvBlockTable::new(p.clone(), 4, 8);
        t.append(TokenKind::Frame, 5).unwrap();
        t.append(TokenKind::Frame, 5).unwrap();
        assert_eq!(t.blocks_in_use(), (0, 2));
        // Attention reads each layer's bytes: between all-INT2 and all-INT8 layers.
        let bytes = |policy: &str| {
            let q = DevicePolicy::new(&policy.parse().unwrap(), 2, 64).unwrap();
            let mut t = KvBlockTable::new(q, 4, 8);
            t.append(TokenKind::Text, 7).unwrap();
            t.append_frame(1, 32).unwrap();
            t.attention_bytes(3)
        };
        let mixed = bytes("mixed:qblock=32,layers=2t32/4c64/8t128");
        assert!(bytes("mixed:qblock=32,bits=2") < mixed && mixed < bytes("mixed:qblock=32,bits=8"));
        for spans in [
            &[
                (TokenKind::Text, 7),
                (TokenKind::Frame, 32),
                (TokenKind::Text, 40),
            ][..],
            &[
                (TokenKind::Frame, 5),
                (TokenKind::Frame, 64),
                (TokenKind::Text, 3),
            ][..],
        ] {
            roundtrip(p.clone(), spans);
        }
        // Head dim 32: every group is fitted to 32. A layer count the model lacks is the
        // device cache's error (checked where the pools are made).
        let narrow = DevicePolicy::new(&calibrated, 2, 32).unwrap();
        assert!((0..3).all(|l| narrow.layout_of(l).group == 32));
        // Quantized text needs per-token keys in every layer (the parser refuses the
        // spelling; a policy built in code is refused here).
        let layer = |key_mode| jetvlm_kvcache::LayerFormat {
            bits: 4,
            key_mode,
            group: 64,
        };
        let text_channel = KvPolicy {
            layers: vec![layer(KeyMode::PerToken), layer(KeyMode::PerChannel)],
            ..KvPolicy::int4_all()
        };
        let e = DevicePolicy::new(&text_channel, 2, 64).unwrap_err();
        assert!(e.to_string().contains("keys=token"), "{e}");
    }
}
