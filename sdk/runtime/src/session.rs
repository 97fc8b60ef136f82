//! [`StreamSession`]: a camera-driven context. The system prompt (and the template text
//! before `{frames}`) stays cached; frames are appended as they arrive and the oldest frame's
//! blocks are evicted once the window is full, so memory stays bounded however long the
//! camera runs. Questions are asked against the cached frames without re-encoding them; each
//! question and its answer are rolled back before the next frame or question.
//!
//! Frames in a session carry no per-frame prefix text (`frame_prefix`/`frame_suffix`), so an
//! evicted frame leaves nothing behind in the cache. A tiled package's frame (`vision.tiles`)
//! is cached as one frame of all its tiles' embeddings (the package's tokens per frame),
//! without the tile text.
//!
//! Evicting a frame does not move the RoPE positions of the tokens after it, so positions keep
//! growing while the camera runs. Before they pass the model's trained range
//! (`max_position_embeddings`, or `session_max_position` in the runtime config) the session
//! re-bases: it clears the cache and prefills the prefix and the kept frames again, from
//! their stored embeddings (the vision encoder does not run again), at fresh positions.

use crate::RuntimeError;
use crate::cache::KvBackend;
use crate::device::{CacheSlot, lost};
use crate::pipeline::{DecoderOn, Pipeline, Stats, TokenStream};
use jetvlm_camera::{Capture, Frame, FrameSource};
use jetvlm_core::FrameId;
use jetvlm_decoder::{Input, KvStore, LogitsMode};
use jetvlm_vision::{Embeddings, ImageView};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Positions kept free after a frame for the question that follows it (its answer is
/// counted apart: `max_new_tokens`).
const QUESTION_RESERVE: usize = 64;

/// Tokens of question text a session's cache has room for beside its prefix, its window and
/// an answer; a longer question is refused with [`RuntimeError::ContextTooLong`] when the
/// runtime config caps the capacity, and grows the cache otherwise.
const SESSION_QUESTION_TOKENS: usize = 256;

/// The cache grows in steps of this many tokens, so a session or a prompt slightly longer
/// than the last does not reallocate every time.
pub(crate) const CAPACITY_STEP: usize = 256;

/// A frame held in the session's window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CachedFrame {
    /// The frame's id in the KV cache.
    pub id: FrameId,
    /// The frame's index in its stream.
    pub index: u64,
    /// The frame's capture time, from the start of its stream.
    pub timestamp: Duration,
    /// Preprocessing + vision encoder time of this frame.
    pub encoder_ms: f64,
}

/// The outcome of [`StreamSession::capture_from`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionCapture {
    /// A frame was appended under this id.
    Frame(FrameId),
    /// The source has no more frames.
    EndOfStream,
    /// No frame arrived within the timeout; capture again.
    Timeout,
}

/// Where a session's tokens are cached: the pipeline's CPU cache, or (decoder on a device) a
/// device cache of the session's own.
enum Store {
    Cpu,
    /// `None` only after an error took the cache down.
    Device(CacheSlot),
}

/// A rolling window of frames in the KV cache; see the module docs.
pub struct StreamSession<'p> {
    pipe: &'p mut Pipeline,
    store: Store,
    window: VecDeque<CachedFrame>,
    /// Cache length and next position before the last question (rolled back to before the
    /// next step).
    question_mark: Option<(usize, u32)>,
    /// BOS, system prompt and template text before the frames (prefilled again on re-base).
    prefix_ids: Vec<u32>,
    /// Encoder time of the frames currently cached, by id.
    encoder_ms: VecDeque<f64>,
    /// Embeddings of the frames currently cached (with their DeepStack features), for
    /// re-basing positions.
    embeddings: VecDeque<Embeddings>,
    rebases: u64,
    /// The pipeline's own CPU cache while a resumed session's cache is in its place
    /// ([`Pipeline::resume`]); put back by [`StreamSession::park`].
    spare: Option<KvBackend>,
}

impl std::fmt::Debug for StreamSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSession")
            .field("window", &self.window)
            .finish()
    }
}

impl Pipeline {
    /// Starts a streaming session on a fresh cache: BOS, the system prompt and the template
    /// text before `{frames}` are prefilled once and kept.
    ///
    /// With the decoder on a GPU (`device: cuda`) the session keeps its tokens in device KV
    /// pools of its own, sized for the window, and evicts and rolls back there.
    pub fn session(&mut self) -> Result<StreamSession<'_>, RuntimeError> {
        if self.model().is_some() && !self.cache.supports_eviction() {
            return Err(RuntimeError::Unsupported {
                op: "starting a streaming session",
                message: "the f32 reference cache cannot evict frames; choose a KV policy (fp16, mixed, ...)"
                    .into(),
            });
        }
        let (before, _) = self
            .template
            .session_split("")
            .ok_or_else(|| RuntimeError::Prompt {
                manifest: self.package.manifest_path.clone(),
                message:
                    "a streaming session needs `{frames}` before `{question}` in prompt.template"
                        .into(),
            })?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.encode_text(&before)?);
        let tpf = self.package.tokens_per_frame();
        let needed = ids.len()
            + self.cfg.window_frames * tpf
            + SESSION_QUESTION_TOKENS
            + self.cfg.max_new_tokens;
        if needed > self.capacity {
            if let Some(limit) = self.cfg.capacity_tokens {
                return Err(RuntimeError::ContextTooLong {
                    needed,
                    limit,
                    what: "capacity_tokens for window_frames frames plus prompt and answer",
                });
            }
            self.capacity = needed.next_multiple_of(CAPACITY_STEP);
            self.cache = crate::cache::KvBackend::new(&self.kv, self.cache_shape(), self.capacity)?;
        }
        self.cache.clear();
        let mut store = match &self.decoder {
            DecoderOn::Cpu(_) => Store::Cpu,
            DecoderOn::Device(gpu) => {
                // A question and its answer get the room the CPU cache leaves them.
                let question = self.capacity - ids.len() - self.cfg.window_frames * tpf;
                Store::Device(Some(gpu.session_cache(
                    ids.len(),
                    self.cfg.window_frames,
                    tpf,
                    question,
                )?))
            }
        };
        crate::pipeline::warn_past_trained_frames(
            &self.package,
            self.cfg.window_frames,
            "a session window",
        );
        // The kept prefix, a full window and a question with its answer must fit the
        // positions the session allows; re-basing cannot lower them below that.
        let steady =
            ids.len() + self.cfg.window_frames * tpf + QUESTION_RESERVE + self.cfg.max_new_tokens;
        let max_position = self
            .cfg
            .session_max_position
            .unwrap_or(self.package.decoder_config.max_position_embeddings);
        if steady > max_position {
            tracing::warn!(
                steady,
                max_position,
                window_frames = self.cfg.window_frames,
                "a window of {} frames ({tpf} tokens each) with the prompt and an answer needs \
                 {steady} positions, past the {max_position} the session allows \
                 (session_max_position, else max_position_embeddings): answers will be unreliable; \
                 use a smaller window",
                self.cfg.window_frames
            );
        }
        if !ids.is_empty() {
            append(self, &mut store, &[Input::text(&ids)])?;
        }
        Ok(StreamSession {
            pipe: self,
            store,
            window: VecDeque::new(),
            question_mark: None,
            prefix_ids: ids,
            encoder_ms: VecDeque::new(),
            embeddings: VecDeque::new(),
            rebases: 0,
            spare: None,
        })
    }

    /// Resumes a parked session: its cache takes the place of the pipeline's (which is kept
    /// aside and put back by [`StreamSession::park`]), its window and positions are as they
    /// were when it was parked.
    pub fn resume(&mut self, parked: ParkedSession) -> StreamSession<'_> {
        let ParkedSession {
            cache,
            store,
            window,
            question_mark,
            prefix_ids,
            encoder_ms,
            embeddings,
            rebases,
        } = parked;
        let spare = cache.map(|c| std::mem::replace(&mut self.cache, c));
        StreamSession {
            pipe: self,
            store,
            window,
            question_mark,
            prefix_ids,
            encoder_ms,
            embeddings,
            rebases,
            spare,
        }
    }
}

/// A [`StreamSession`] set aside while its pipeline serves others: its window, its own KV
/// cache (CPU or device) and its positions. One loaded model serves several cameras by
/// keeping one parked session per camera and resuming each in turn
/// ([`Pipeline::resume`]); nothing is encoded or prefilled again on resume.
pub struct ParkedSession {
    /// The session's CPU cache (`None` when its tokens live in a device cache).
    cache: Option<KvBackend>,
    store: Store,
    window: VecDeque<CachedFrame>,
    question_mark: Option<(usize, u32)>,
    prefix_ids: Vec<u32>,
    encoder_ms: VecDeque<f64>,
    embeddings: VecDeque<Embeddings>,
    rebases: u64,
}

impl std::fmt::Debug for ParkedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedSession")
            .field("window", &self.window)
            .finish()
    }
}

impl ParkedSession {
    /// Frames in the session's window, oldest first.
    pub fn frames(&self) -> Vec<CachedFrame> {
        self.window.iter().copied().collect()
    }
}

impl StreamSession<'_> {
    /// Drops the last question and answer from the cache.
    fn roll_back(&mut self) -> Result<(), RuntimeError> {
        if let Some((len, position)) = self.question_mark.take() {
            let extra = self.cached_tokens().saturating_sub(len);
            match &mut self.store {
                Store::Cpu => self.pipe.cache.roll_back(extra, position)?,
                Store::Device(cache) => {
                    cache.as_mut().ok_or_else(lost)?.truncate_last(extra)?;
                }
            }
        }
        Ok(())
    }

    /// RoPE position of the next token.
    fn next_position(&self) -> usize {
        match &self.store {
            Store::Cpu => self.pipe.cache.next_position() as usize,
            Store::Device(cache) => cache.as_ref().map_or(0, |c| c.next_position()),
        }
    }

    /// Encodes a frame and appends it to the window, evicting the oldest frame when the
    /// window is full. Returns the frame's cache id.
    pub fn push_frame(&mut self, frame: &Frame) -> Result<FrameId, RuntimeError> {
        self.roll_back()?;
        let view = ImageView::new(frame.width, frame.height, &frame.rgb).map_err(|source| {
            RuntimeError::Frame {
                index: frame.index,
                source: Box::new(source),
            }
        })?;
        let t0 = Instant::now();
        let emb = self.pipe.encode_view(&view, frame.index)?;
        let enc_ms = t0.elapsed().as_secs_f64() * 1e3;
        while self.window.len() >= self.pipe.cfg.window_frames {
            if let Some(old) = self.window.pop_front() {
                match &mut self.store {
                    Store::Cpu => self.pipe.cache.evict_frame(old.id)?,
                    Store::Device(cache) => {
                        cache.as_mut().ok_or_else(lost)?.evict_frame(old.id)?;
                    }
                }
                self.encoder_ms.pop_front();
                self.embeddings.pop_front();
            }
        }
        let id = self.pipe.next_frame;
        self.pipe.next_frame += 1;
        // Room for this frame, a question and its answer.
        self.rebase_if_needed(emb.tokens + QUESTION_RESERVE + self.pipe.cfg.max_new_tokens)?;
        append(
            self.pipe,
            &mut self.store,
            &[Input::frame(&emb.data, emb.tokens, id).with_deepstack(&emb.deepstack)],
        )?;
        self.window.push_back(CachedFrame {
            id,
            index: frame.index,
            timestamp: frame.timestamp,
            encoder_ms: enc_ms,
        });
        self.encoder_ms.push_back(enc_ms);
        self.embeddings.push_back(emb);
        Ok(id)
    }

    /// The highest RoPE position this session lets its tokens reach.
    pub fn max_position(&self) -> usize {
        self.pipe
            .cfg
            .session_max_position
            .unwrap_or(self.pipe.package.decoder_config.max_position_embeddings)
    }

    /// How many times the session has re-based its positions (see the module docs).
    pub fn rebases(&self) -> u64 {
        self.rebases
    }

    /// Re-bases positions when `upcoming` more tokens would pass [`Self::max_position`].
    fn rebase_if_needed(&mut self, upcoming: usize) -> Result<(), RuntimeError> {
        let next = self.next_position();
        if next + upcoming <= self.max_position() {
            return Ok(());
        }
        // Positions per frame: its tokens, or under M-RoPE the longer side of its grid.
        let per_frame = jetvlm_decoder::arch::frame_positions(
            &self.pipe.package.decoder_config,
            self.pipe.package.tokens_per_frame(),
        );
        let fresh = self.prefix_ids.len() + self.window.len() * per_frame;
        if fresh >= next {
            // Re-basing would not lower the positions: the window itself is too long (said
            // once, when the session started).
            return Ok(());
        }
        tracing::debug!(next, fresh, "re-basing stream session positions");
        match &mut self.store {
            Store::Cpu => self.pipe.cache.clear(),
            Store::Device(cache) => cache.as_mut().ok_or_else(lost)?.clear(),
        }
        if let Err((kept, e)) = self.reappend() {
            // The cache was cleared and holds only the first `kept` frames again: forget the
            // others, so the window and the cache agree (later frames and questions then work
            // on what is cached).
            self.window.truncate(kept);
            self.embeddings.truncate(kept);
            self.encoder_ms.truncate(kept);
            return Err(e);
        }
        self.rebases += 1;
        Ok(())
    }

    /// Appends the prefix and the window's frames again after the cache was cleared. On
    /// failure, says how many of the window's first frames are cached.
    fn reappend(&mut self) -> Result<(), (usize, RuntimeError)> {
        if !self.prefix_ids.is_empty() {
            append(self.pipe, &mut self.store, &[Input::text(&self.prefix_ids)])
                .map_err(|e| (0, e))?;
        }
        let tpf = self.pipe.package.tokens_per_frame();
        for (i, (frame, emb)) in self.window.iter().zip(&self.embeddings).enumerate() {
            append(
                self.pipe,
                &mut self.store,
                &[Input::frame(&emb.data, tpf, frame.id).with_deepstack(&emb.deepstack)],
            )
            .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Captures the next frame from a camera source and appends it. End of stream and
    /// timeout are statuses (`Ok(None)` with the capture), not errors.
    pub fn capture_from(
        &mut self,
        source: &mut dyn FrameSource,
        timeout: Duration,
    ) -> Result<SessionCapture, RuntimeError> {
        match source.capture(timeout).map_err(|e| RuntimeError::Camera {
            source_name: source.describe(),
            source: Box::new(e),
        })? {
            Capture::Frame(f) => Ok(SessionCapture::Frame(self.push_frame(&f)?)),
            Capture::EndOfStream => Ok(SessionCapture::EndOfStream),
            Capture::Timeout => Ok(SessionCapture::Timeout),
        }
    }

    /// Frames in the cache, oldest first.
    pub fn frames(&self) -> Vec<CachedFrame> {
        self.window.iter().copied().collect()
    }

    /// Sets the session aside with its window and its cache, so the pipeline can serve
    /// another session; [`Pipeline::resume`] takes it up again. The pipeline gets its own
    /// CPU cache back (a fresh one, the first time a session from [`Pipeline::session`] is
    /// parked).
    pub fn park(self) -> Result<ParkedSession, RuntimeError> {
        let StreamSession {
            pipe,
            store,
            window,
            question_mark,
            prefix_ids,
            encoder_ms,
            embeddings,
            rebases,
            spare,
        } = self;
        let cache = match store {
            Store::Cpu => {
                let own = match spare {
                    Some(c) => c,
                    None => KvBackend::new(&pipe.kv, pipe.cache_shape(), pipe.capacity)?,
                };
                Some(std::mem::replace(&mut pipe.cache, own))
            }
            Store::Device(_) => None,
        };
        Ok(ParkedSession {
            cache,
            store,
            window,
            question_mark,
            prefix_ids,
            encoder_ms,
            embeddings,
            rebases,
        })
    }

    /// Tokens of the kept prefix (BOS, system prompt, template text before the frames).
    pub fn prefix_tokens(&self) -> usize {
        self.prefix_ids.len()
    }

    /// Tokens cached now.
    pub fn cached_tokens(&self) -> usize {
        match &self.store {
            Store::Cpu => self.pipe.cache.len(),
            Store::Device(cache) => cache.as_ref().map_or(0, |c| c.len()),
        }
    }

    /// KV bytes by precision.
    pub fn kv_memory(&self) -> crate::KvStats {
        match &self.store {
            Store::Cpu => self.pipe.cache.memory(),
            Store::Device(cache) => cache.as_deref().map_or_else(crate::KvStats::default, |c| {
                c.kv_stats(self.window.len() * self.pipe.package.tokens_per_frame())
            }),
        }
    }

    /// The question's tokens (the template text after `{frames}`).
    fn question_ids(&self, question: &str) -> Result<Vec<u32>, RuntimeError> {
        let (_, after) =
            self.pipe
                .template
                .session_split(question)
                .ok_or_else(|| {
                    RuntimeError::Prompt {
                manifest: self.pipe.package.manifest_path.clone(),
                message:
                    "a streaming session needs `{frames}` before `{question}` in prompt.template"
                        .into(),
            }
                })?;
        let ids = self.pipe.encode_text(&after)?;
        if ids.is_empty() {
            return Err(RuntimeError::Prompt {
                manifest: self.pipe.package.manifest_path.clone(),
                message: "the question tokenizes to nothing".into(),
            });
        }
        Ok(ids)
    }

    /// The decoder's logits for the first answer token of `question` asked about the cached
    /// frames (what [`Self::ask`] samples its first token from). The question is removed from
    /// the cache before the next frame or question. CPU decoder only; for checking a session
    /// against a fresh prefill of what it keeps.
    pub fn next_token_logits(&mut self, question: &str) -> Result<Vec<f32>, RuntimeError> {
        self.pipe.decoder.cpu("next_token_logits")?;
        self.roll_back()?;
        let ids = self.question_ids(question)?;
        self.rebase_if_needed(ids.len() + self.pipe.cfg.max_new_tokens)?;
        self.question_mark = Some((self.cached_tokens(), self.next_position() as u32));
        let model = self.pipe.decoder.cpu("next_token_logits")?;
        let logits = model.forward(&[Input::text(&ids)], &mut self.pipe.cache)?;
        Ok(logits.last().to_vec())
    }

    /// Asks about the cached frames; the frames are not re-encoded. The question and answer
    /// are removed from the cache before the next frame or question.
    pub fn ask(&mut self, question: &str) -> Result<TokenStream<'_>, RuntimeError> {
        self.roll_back()?;
        let started = Instant::now();
        let ids = self.question_ids(question)?;
        let stats = |s: &Self, prompt_tokens: usize| Stats {
            prompt_tokens,
            frames: s.window.len(),
            // Frames were encoded as they arrived; report what the cached ones cost.
            encoder_ms: s.encoder_ms.iter().sum(),
            kv_policy: s.pipe.kv.name(),
            execution_provider: s.pipe.encoder.execution_provider().to_string(),
            decoder_device: s.pipe.decoder_device(),
            ..Stats::default()
        };
        self.rebase_if_needed(ids.len() + self.pipe.cfg.max_new_tokens)?;
        self.question_mark = Some((self.cached_tokens(), self.next_position() as u32));
        let stats = stats(self, self.cached_tokens() + ids.len());
        match &mut self.store {
            Store::Cpu => self.pipe.answer(&[Input::text(&ids)], &ids, started, stats),
            Store::Device(slot) => {
                let DecoderOn::Device(gpu) = &self.pipe.decoder else {
                    return Err(lost());
                };
                let frame_tokens = self.window.len() * self.pipe.package.tokens_per_frame();
                let tap = self.pipe.cache.tap();
                let t_prefill = Instant::now();
                let (backend, logits) =
                    gpu.continue_on(slot, &[Input::text(&ids)], frame_tokens, tap.clone())?;
                Ok(self.pipe.stream_on_device(
                    backend,
                    logits,
                    &ids,
                    (started, t_prefill),
                    tap,
                    stats,
                ))
            }
        }
    }
}

/// Appends `inputs` (a session's prefix or a frame) to the session's cache.
fn append(
    pipe: &mut Pipeline,
    store: &mut Store,
    inputs: &[Input<'_>],
) -> Result<(), RuntimeError> {
    match (store, &pipe.decoder) {
        (Store::Cpu, DecoderOn::Cpu(model)) => {
            model.forward_with(inputs, &mut pipe.cache, LogitsMode::Last)?;
        }
        (Store::Device(slot), DecoderOn::Device(gpu)) => gpu.append(slot, inputs)?,
        _ => return Err(lost()),
    }
    Ok(())
}
