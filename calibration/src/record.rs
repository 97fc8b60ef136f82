//! Recording a model's KV traffic: [`Recorder`] is a [`KvStore`] over the exact f32 cache
//! that keeps every span appended, every layer's keys and values written and every
//! attention's queries with the exact output, so that the same traffic can be replayed
//! through the mixed cache under any frame format ([`crate::replay()`]).

use jetvlm_core::{FrameId, TokenKind};
use jetvlm_decoder::kv::CacheShape;
use jetvlm_decoder::kv::F32Span;
use jetvlm_decoder::{F32KvCache, KvStore, Result};
use std::sync::Mutex;

/// One call the forward pass made on the cache.
#[derive(Clone, Debug)]
pub enum Event {
    Append {
        kind: TokenKind,
        positions: Vec<u32>,
        frame: Option<FrameId>,
    },
    /// Post-RoPE keys and values of span `span` (index into the prompt's appends) in `layer`.
    Write {
        layer: usize,
        span: usize,
        k: Vec<f32>,
        v: Vec<f32>,
    },
    /// Queries of text span `span` in `layer` (recorded only for text that comes after a
    /// frame: the queries the calibration error is measured on), and the exact output.
    Attend {
        layer: usize,
        span: usize,
        q: Vec<f32>,
        exact: Vec<f32>,
    },
    Truncate {
        n: usize,
    },
}

/// The recorded traffic of one prompt (and any answer tokens decoded after it), on a cache
/// that started empty.
#[derive(Clone, Debug, Default)]
pub struct Prompt {
    pub events: Vec<Event>,
}

impl Prompt {
    /// Tokens appended (an upper bound on the tokens cached at once).
    pub fn tokens(&self) -> usize {
        self.events
            .iter()
            .map(|e| match e {
                Event::Append { positions, .. } => positions.len(),
                _ => 0,
            })
            .sum()
    }
}

/// The recorded traffic of a calibration run: the model's cache shape and its prompts.
#[derive(Clone, Debug)]
pub struct Trace {
    pub shape: CacheShape,
    pub prompts: Vec<Prompt>,
}

/// Handle of a span appended to a [`Recorder`].
#[derive(Clone, Copy, Debug)]
pub struct RecordedSpan {
    inner: F32Span,
    index: usize,
    /// A text span appended after a frame: its attention is recorded.
    measured: bool,
}

/// A [`KvStore`] that answers with the exact f32 cache and records the traffic.
#[derive(Debug)]
pub struct Recorder {
    cache: F32KvCache,
    /// The current prompt's events (attention records through `&self`).
    current: Mutex<Vec<Event>>,
    spans: usize,
    frame_seen: bool,
    done: Vec<Prompt>,
}

impl Recorder {
    /// A recorder for a model with cache shape `shape`, holding up to `capacity_tokens`
    /// tokens per prompt.
    pub fn new(shape: CacheShape, capacity_tokens: usize) -> Self {
        Recorder {
            cache: F32KvCache::new(shape, capacity_tokens),
            current: Mutex::new(Vec::new()),
            spans: 0,
            frame_seen: false,
            done: Vec::new(),
        }
    }

    /// Ends the current prompt and returns it (`None` when nothing was recorded); the next
    /// appends start a new prompt on an empty cache. Taking each prompt as it ends keeps the
    /// recorder's memory to one prompt's traffic (see [`crate::Calibrator`]).
    pub fn take_prompt(&mut self) -> Option<Prompt> {
        let events = std::mem::take(self.events());
        self.spans = 0;
        self.frame_seen = false;
        self.cache.clear();
        (!events.is_empty()).then_some(Prompt { events })
    }

    /// Ends the current prompt and keeps it for [`Self::finish`].
    pub fn next_prompt(&mut self) {
        if let Some(p) = self.take_prompt() {
            self.done.push(p);
        }
    }

    fn events(&mut self) -> &mut Vec<Event> {
        self.current.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// The traffic recorded so far.
    pub fn finish(mut self) -> Trace {
        self.next_prompt();
        Trace {
            shape: self.cache.shape(),
            prompts: self.done,
        }
    }
}

impl KvStore for Recorder {
    type Span = RecordedSpan;
    fn shape(&self) -> CacheShape {
        self.cache.shape()
    }
    fn next_position(&self) -> u32 {
        self.cache.next_position()
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn append_span(
        &mut self,
        kind: TokenKind,
        positions: &[u32],
        frame: Option<FrameId>,
    ) -> Result<RecordedSpan> {
        let inner = self.cache.append_span(kind, positions, frame)?;
        self.events().push(Event::Append {
            kind,
            positions: positions.to_vec(),
            frame,
        });
        self.spans += 1;
        let measured = kind == TokenKind::Text && self.frame_seen;
        self.frame_seen |= kind == TokenKind::Frame;
        Ok(RecordedSpan {
            inner,
            index: self.spans - 1,
            measured,
        })
    }
    fn write(&mut self, layer: usize, span: &RecordedSpan, k: &[f32], v: &[f32]) -> Result<()> {
        self.cache.write(layer, &span.inner, k, v)?;
        self.events().push(Event::Write {
            layer,
            span: span.index,
            k: k.to_vec(),
            v: v.to_vec(),
        });
        Ok(())
    }
    fn attend(&self, layer: usize, span: &RecordedSpan, q: &[f32], out: &mut [f32]) -> Result<()> {
        self.cache.attend(layer, &span.inner, q, out)?;
        if !span.measured {
            return Ok(());
        }
        let event = Event::Attend {
            layer,
            span: span.index,
            q: q.to_vec(),
            exact: out.to_vec(),
        };
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        Ok(())
    }
    fn truncate_last(&mut self, n: usize) -> Result<()> {
        self.cache.truncate_last(n)?;
        self.events().push(Event::Truncate { n });
        Ok(())
    }
}
