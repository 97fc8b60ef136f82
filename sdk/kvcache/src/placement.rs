//! The KV placement rules, written once: for a sequence of cache operations, each cached
//! token's precision (FP16 or quantized), RoPE position and owning frame, and the order
//! attention reads the tokens in. Plain data, no blocks: [`Rules`] is the model that both
//! the CPU cache ([`crate::cells::Cells`]) and the device block table
//! (`jetvlm_cuda::KvBlockTable`) are tested against, operation by operation.
//!
//! Rules both engines follow:
//! - Tokens get sequence numbers in append order (from 0 after a clear, never reused by a
//!   truncation) and RoPE positions from the next position on; attention reads the cached
//!   tokens in sequence order, which is also position order.
//! - Text tokens are FP16, or quantized when the policy quantizes text (which needs
//!   quantized frames).
//! - Frame tokens are FP16 when the policy keeps frames FP16. Otherwise the first tokens of a
//!   span whose sequence numbers are below the policy's sink count stay FP16 (attention
//!   sinks), as many as the FP16 budget allows: `floor(budget * (cached + span))` less the
//!   FP16 tokens held. The rest are quantized.
//! - Evicting a frame removes exactly its tokens; the others keep their positions and the
//!   next position does not move.
//! - Truncating `n` tokens removes the `n` newest; the next token takes the position of the
//!   oldest one removed. Sequence numbers are not rewound, so sink tokens are not handed out
//!   again.
//! - A clear forgets everything: sequence numbers and positions start at 0 again.
//!
//! Where the engines differ ([`Engine`]):
//! - Salient frame tokens (CPU only): with `salient=on` and salience scores, the most
//!   salient non-sink tokens of a frame also stay FP16, as many as fill whole FP16 blocks
//!   together with the sinks within the budget (ties: the earlier token). The device
//!   quantizes them.
//! - Prefill chunks (device only): the device forward pass appends a span in pieces of
//!   `chunk` tokens, and the budget is taken per piece, so a frame longer than a chunk that
//!   starts the sequence may keep fewer sink tokens FP16 than on the CPU.
//! - Frames without an id are device only (the CPU needs every frame's id); they belong to
//!   no frame and cannot be evicted.
//! - A frame id already cached is refused by the CPU. The device accepts it when the newest
//!   cached token is that frame's and right before the next position (nothing appended or
//!   evicted since): the next piece of a frame arriving in chunks.
//! - Truncation: the CPU drops any `n` newest tokens. The device drops only tokens that no
//!   frame id owns, at the `n` positions right before the next one (not across an evicted
//!   frame).
//! - Roll back to a mark (only appends in between): the device restores its state at the
//!   mark, sequence numbers included (sink tokens are handed out again); the CPU truncates
//!   the tokens appended since and keeps counting sequence numbers.
//! - Empty spans: the CPU refuses them, the device appends nothing.
//!
//! `Cells::next_position` is the largest position appended plus one; the caller (the
//! runtime's cache) supplies positions and rewinds them after a truncation, which is the
//! next position of these rules.

use crate::KvPolicy;
use jetvlm_core::{FrameId, TokenKind};

/// Which engine's rules apply where they differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The CPU cache ([`crate::cells::Cells`]).
    Cpu,
    /// The device block table, whose forward pass appends spans in pieces of `chunk` tokens.
    Device { chunk: usize },
}

/// How a token is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp16,
    Quant,
}

/// One cached token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// Append order since the last clear.
    pub seq: u32,
    /// RoPE position (the device's order index).
    pub position: u32,
    pub kind: TokenKind,
    /// The frame id it was appended with (`None`: text, or a frame appended without id).
    pub frame: Option<FrameId>,
    pub precision: Precision,
}

/// Why an operation is refused (the engine must refuse it and change nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    EmptySpan,
    FrameWithoutId,
    DuplicateFrame(FrameId),
    UnknownFrame(FrameId),
    TruncateTooMany,
    /// Device: the newest tokens include a frame's own.
    TruncateFrameTokens,
    /// Device: the newest tokens do not end right before the next position.
    TruncateGap,
    /// No mark, or something other than appends came after it.
    NoMark,
}

#[derive(Clone, Debug)]
struct State {
    tokens: Vec<Token>,
    next_seq: u32,
    next_position: u32,
}

/// The placement rules of one engine over one sequence.
#[derive(Clone, Debug)]
pub struct Rules {
    policy: KvPolicy,
    engine: Engine,
    state: State,
    mark: Option<State>,
}

impl Rules {
    pub fn new(policy: &KvPolicy, engine: Engine) -> Self {
        Self {
            policy: policy.clone(),
            engine,
            state: State {
                tokens: Vec::new(),
                next_seq: 0,
                next_position: 0,
            },
            mark: None,
        }
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }
    /// Cached tokens in attention order (sequence order).
    pub fn tokens(&self) -> &[Token] {
        &self.state.tokens
    }
    pub fn len(&self) -> usize {
        self.state.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.state.tokens.is_empty()
    }
    /// Position of the next token appended.
    pub fn next_position(&self) -> u32 {
        self.state.next_position
    }
    /// Tokens held FP16.
    pub fn fp16_tokens(&self) -> usize {
        self.state
            .tokens
            .iter()
            .filter(|t| t.precision == Precision::Fp16)
            .count()
    }
    /// Frame ids with cached tokens, oldest first.
    pub fn frames(&self) -> Vec<FrameId> {
        let mut out: Vec<FrameId> = Vec::new();
        for f in self.state.tokens.iter().filter_map(|t| t.frame) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// Appends `n` tokens of `kind`, of frame `frame` when given, with one salience score
    /// per token when given (frames on the CPU).
    pub fn append(
        &mut self,
        kind: TokenKind,
        n: usize,
        frame: Option<FrameId>,
        salience: Option<&[f32]>,
    ) -> Result<(), Refused> {
        let cpu = self.engine == Engine::Cpu;
        if let Some(f) = frame
            && self.state.tokens.iter().any(|t| t.frame == Some(f))
        {
            let next_piece =
                self.state.tokens.last().is_some_and(|t| {
                    t.frame == Some(f) && t.position + 1 == self.state.next_position
                });
            if cpu || !next_piece {
                return Err(Refused::DuplicateFrame(f));
            }
        }
        if n == 0 {
            return if cpu { Err(Refused::EmptySpan) } else { Ok(()) };
        }
        if cpu && kind == TokenKind::Frame && frame.is_none() {
            return Err(Refused::FrameWithoutId);
        }
        let kind = if frame.is_some() {
            TokenKind::Frame
        } else {
            kind
        };
        let piece = match self.engine {
            Engine::Cpu => n,
            Engine::Device { chunk } => chunk.max(1),
        };
        let mut start = 0;
        while start < n {
            let len = (n - start).min(piece);
            let scores = salience.filter(|_| cpu).map(|s| &s[start..start + len]);
            let precisions = self.precisions(kind, len, scores);
            for (i, precision) in precisions.into_iter().enumerate() {
                self.state.tokens.push(Token {
                    seq: self.state.next_seq + i as u32,
                    position: self.state.next_position + i as u32,
                    kind,
                    frame,
                    precision,
                });
            }
            self.state.next_seq += len as u32;
            self.state.next_position += len as u32;
            start += len;
        }
        Ok(())
    }

    /// Precision of each of `n` tokens of `kind` appended now in one piece.
    fn precisions(&self, kind: TokenKind, n: usize, salience: Option<&[f32]>) -> Vec<Precision> {
        let p = &self.policy;
        let quant_frames = p.quantizes_frames();
        match kind {
            TokenKind::Text if p.quantize_text && quant_frames => vec![Precision::Quant; n],
            TokenKind::Text => vec![Precision::Fp16; n],
            TokenKind::Frame if !quant_frames => vec![Precision::Fp16; n],
            TokenKind::Frame => {
                let allowed = (p.fp16_budget as f64 * (self.len() + n) as f64).floor() as usize;
                let room = allowed.saturating_sub(self.fp16_tokens());
                let sinks = p
                    .sink_tokens
                    .saturating_sub(self.state.next_seq as usize)
                    .min(n)
                    .min(room);
                let mut out = vec![Precision::Quant; n];
                out[..sinks].fill(Precision::Fp16);
                if let (Some(scores), true) = (salience, p.salient_frame_tokens) {
                    let b = p.fp16_block_tokens;
                    let salient = (room / b * b).saturating_sub(sinks);
                    let mut idx: Vec<usize> = (sinks..n).collect();
                    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                    for &i in idx.iter().take(salient) {
                        out[i] = Precision::Fp16;
                    }
                }
                out
            }
        }
    }

    /// Removes frame `frame`'s tokens; returns how many.
    pub fn evict_frame(&mut self, frame: FrameId) -> Result<usize, Refused> {
        let before = self.len();
        self.state.tokens.retain(|t| t.frame != Some(frame));
        match before - self.len() {
            0 => Err(Refused::UnknownFrame(frame)),
            n => {
                self.mark = None;
                Ok(n)
            }
        }
    }

    /// Removes the `n` newest tokens.
    pub fn truncate_last(&mut self, n: usize) -> Result<(), Refused> {
        let len = self.len();
        if n > len {
            return Err(Refused::TruncateTooMany);
        }
        let dropped = &self.state.tokens[len - n..];
        if self.engine != Engine::Cpu {
            if dropped.iter().any(|t| t.frame.is_some()) {
                return Err(Refused::TruncateFrameTokens);
            }
            let end = self.state.next_position;
            let consecutive = dropped
                .iter()
                .enumerate()
                .all(|(i, t)| t.position as usize + n == end as usize + i);
            if !consecutive {
                return Err(Refused::TruncateGap);
            }
        }
        if let Some(first) = dropped.first() {
            self.state.next_position = first.position;
        }
        self.state.tokens.truncate(len - n);
        self.mark = None;
        Ok(())
    }

    pub fn clear(&mut self) {
        self.state = State {
            tokens: Vec::new(),
            next_seq: 0,
            next_position: 0,
        };
        self.mark = None;
    }

    /// Marks the state for [`Rules::roll_back`]; only appends may follow.
    pub fn mark(&mut self) {
        self.mark = Some(self.state.clone());
    }

    /// Undoes the appends since the mark; returns the tokens removed.
    pub fn roll_back(&mut self) -> Result<usize, Refused> {
        let mark = self.mark.take().ok_or(Refused::NoMark)?;
        let removed = self.len() - mark.tokens.len();
        match self.engine {
            Engine::Device { .. } => self.state = mark,
            Engine::Cpu => {
                self.state.tokens.truncate(mark.tokens.len());
                self.state.next_position = mark.next_position;
            }
        }
        Ok(removed)
    }
}
