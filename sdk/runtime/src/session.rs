//! [`StreamSession`]: a camera-driven context. The system prompt (and the template text
//! before `{frames}`) stays cached; frames are appended as they arrive and the oldest frame's
//! blocks are evicted once the window is full, so memory stays bounded however long the
//! camera runs. Questions are asked against the cached frames without re-encoding them; each
//! question and its answer are rolled back before the next frame or question.
//!
//! Frames in a session carry no per-frame prefix text (`frame_prefix`/`frame_suffix`), so an
//! evicted frame leaves nothing behind in the cache.
//!
//! Evicting a frame does not move the RoPE positions of the tokens after it, so positions keep
//! growing while the camera runs. Before they pass the model's trained range
//! (`max_position_embeddings`, or `session_max_position` in the runtime config) the session
//! re-bases: it clears the cache and prefills the prefix and the kept frames again, from
//! their stored embeddings (the vision encoder does not run again), at fresh positions.

use crate::RuntimeError;
use crate::pipeline::{Pipeline, Stats, TokenStream, cpu_decoder};
use jetvlm_camera::{Capture, Frame, FrameSource};
use jetvlm_core::FrameId;
use jetvlm_decoder::{Input, KvStore, LogitsMode};
use jetvlm_vision::ImageView;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Positions kept free after a frame for the question that follows it.
const QUESTION_RESERVE: usize = 64;

/// A frame held in the session's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedFrame {
    pub id: FrameId,
    /// The frame's index in its stream.
    pub index: u64,
    pub timestamp: Duration,
}

/// The outcome of [`StreamSession::capture_from`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionCapture {
    /// A frame was appended under this id.
    Frame(FrameId),
    EndOfStream,
    Timeout,
}

/// A rolling window of frames in the KV cache; see the module docs.
pub struct StreamSession<'p> {
    pipe: &'p mut Pipeline,
    window: VecDeque<CachedFrame>,
    /// Cache length and next position before the last question (rolled back to before the
    /// next step).
    question_mark: Option<(usize, u32)>,
    /// BOS, system prompt and template text before the frames (prefilled again on re-base).
    prefix_ids: Vec<u32>,
    /// Encoder time of the frames currently cached, by id.
    encoder_ms: VecDeque<f64>,
    /// Embeddings of the frames currently cached, for re-basing positions.
    embeddings: VecDeque<Vec<f32>>,
    rebases: u64,
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
    /// With the decoder on a GPU (`device: cuda`) nothing is cached between questions: frames
    /// are encoded as they arrive and kept as embeddings, and each question prefills the
    /// prefix, the window's frames and the question into fresh device KV pools (the same
    /// prompt a CPU session holds right after a re-base).
    pub fn session(&mut self) -> Result<StreamSession<'_>, RuntimeError> {
        let on_gpu = self.model.is_none();
        if !on_gpu && !self.cache.supports_eviction() {
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
        let needed = ids.len() + self.cfg.window_frames * tpf + 256 + self.cfg.max_new_tokens;
        if needed > self.capacity {
            if let Some(limit) = self.cfg.capacity_tokens {
                return Err(RuntimeError::ContextTooLong {
                    needed,
                    limit,
                    what: "capacity_tokens for window_frames frames plus prompt and answer",
                });
            }
            self.capacity = needed.next_multiple_of(256);
            self.cache = crate::cache::KvBackend::new(&self.kv, self.cache_shape(), self.capacity)?;
        }
        self.cache.clear();
        if !on_gpu && !ids.is_empty() {
            cpu_decoder(&self.model, "starting a streaming session")?.forward_with(
                &[Input::text(&ids)],
                &mut self.cache,
                LogitsMode::Last,
            )?;
        }
        Ok(StreamSession {
            pipe: self,
            window: VecDeque::new(),
            question_mark: None,
            prefix_ids: ids,
            encoder_ms: VecDeque::new(),
            embeddings: VecDeque::new(),
            rebases: 0,
        })
    }
}

impl StreamSession<'_> {
    /// Drops the last question and answer from the cache.
    fn roll_back(&mut self) -> Result<(), RuntimeError> {
        if let Some((len, position)) = self.question_mark.take() {
            let extra = self.pipe.cache.len().saturating_sub(len);
            self.pipe.cache.roll_back(extra, position)?;
        }
        Ok(())
    }

    /// Encodes a frame and appends it to the window, evicting the oldest frame when the
    /// window is full. Returns the frame's cache id.
    pub fn push_frame(&mut self, frame: &Frame) -> Result<FrameId, RuntimeError> {
        self.roll_back()?;
        let view = ImageView::new(frame.width, frame.height, &frame.rgb).map_err(|e| {
            RuntimeError::Frame {
                index: frame.index,
                message: e.to_string(),
            }
        })?;
        let t0 = Instant::now();
        let emb = jetvlm_vision::VisionEncoder::encode(&mut self.pipe.encoder, &view)?;
        let enc_ms = t0.elapsed().as_secs_f64() * 1e3;
        let on_gpu = self.pipe.model.is_none();
        while self.window.len() >= self.pipe.cfg.window_frames {
            if let Some(old) = self.window.pop_front() {
                if !on_gpu {
                    self.pipe.cache.evict_frame(old.id)?;
                }
                self.encoder_ms.pop_front();
                self.embeddings.pop_front();
            }
        }
        let id = self.pipe.next_frame;
        self.pipe.next_frame += 1;
        // On a GPU the frame is prefilled with the next question (see `Pipeline::session`).
        if !on_gpu {
            // Room for this frame, a question and its answer.
            self.rebase_if_needed(emb.tokens + QUESTION_RESERVE + self.pipe.cfg.max_new_tokens)?;
            cpu_decoder(&self.pipe.model, "streaming session")?.forward_with(
                &[Input::frame(&emb.data, emb.tokens, id)],
                &mut self.pipe.cache,
                LogitsMode::Last,
            )?;
        }
        self.window.push_back(CachedFrame {
            id,
            index: frame.index,
            timestamp: frame.timestamp,
        });
        self.encoder_ms.push_back(enc_ms);
        self.embeddings.push_back(emb.data);
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
        let next = self.pipe.cache.next_position() as usize;
        if next + upcoming <= self.max_position() {
            return Ok(());
        }
        let fresh =
            self.prefix_ids.len() + self.window.len() * self.pipe.package.tokens_per_frame();
        if fresh >= next {
            // Re-basing would not lower the positions: the window itself is too long.
            return Ok(());
        }
        tracing::debug!(next, fresh, "re-basing stream session positions");
        self.pipe.cache.clear();
        if !self.prefix_ids.is_empty() {
            cpu_decoder(&self.pipe.model, "streaming session")?.forward_with(
                &[Input::text(&self.prefix_ids)],
                &mut self.pipe.cache,
                LogitsMode::Last,
            )?;
        }
        let tpf = self.pipe.package.tokens_per_frame();
        for (frame, emb) in self.window.iter().zip(&self.embeddings) {
            cpu_decoder(&self.pipe.model, "streaming session")?.forward_with(
                &[Input::frame(emb, tpf, frame.id)],
                &mut self.pipe.cache,
                LogitsMode::Last,
            )?;
        }
        self.rebases += 1;
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
            message: e.to_string(),
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

    /// Tokens of the kept prefix (BOS, system prompt, template text before the frames).
    pub fn prefix_tokens(&self) -> usize {
        self.prefix_ids.len()
    }

    /// Tokens cached now (on a GPU session: what the next question prefills before its own
    /// tokens).
    pub fn cached_tokens(&self) -> usize {
        if self.pipe.model.is_none() {
            return self.prefix_ids.len()
                + self.window.len() * self.pipe.package.tokens_per_frame();
        }
        self.pipe.cache.len()
    }

    /// KV bytes by precision (on a GPU session: the device pools of the last question).
    pub fn kv_memory(&self) -> crate::KvStats {
        if self.pipe.model.is_none() {
            return self.pipe.cache.tap().lock().map(|t| *t).unwrap_or_default();
        }
        self.pipe.cache.memory()
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
        if self.pipe.model.is_none() {
            // On a GPU: the whole prompt on fresh device pools (see `Pipeline::session`).
            let stats = stats(self, self.cached_tokens() + ids.len());
            let tpf = self.pipe.package.tokens_per_frame();
            let prompt = fresh_prompt(&self.prefix_ids, &self.window, &self.embeddings, tpf, &ids);
            return self.pipe.answer(&prompt, &ids, started, stats);
        }
        self.rebase_if_needed(ids.len() + self.pipe.cfg.max_new_tokens)?;
        self.question_mark = Some((self.pipe.cache.len(), self.pipe.cache.next_position()));
        let stats = stats(self, self.pipe.cache.len() + ids.len());
        self.pipe.answer(&[Input::text(&ids)], &ids, started, stats)
    }
}

/// A question's whole prompt on a fresh cache: the kept prefix, the window's frames from
/// their stored embeddings, then the question's tokens (what a GPU session prefills).
fn fresh_prompt<'s>(
    prefix_ids: &'s [u32],
    window: &'s VecDeque<CachedFrame>,
    embeddings: &'s VecDeque<Vec<f32>>,
    tokens_per_frame: usize,
    question_ids: &'s [u32],
) -> Vec<Input<'s>> {
    let mut prompt = Vec::with_capacity(window.len() + 2);
    if !prefix_ids.is_empty() {
        prompt.push(Input::text(prefix_ids));
    }
    for (frame, emb) in window.iter().zip(embeddings) {
        prompt.push(Input::frame(emb, tokens_per_frame, frame.id));
    }
    prompt.push(Input::text(question_ids));
    prompt
}

#[cfg(test)]
mod tests {
    use crate::cache::KvBackend;
    use crate::pipeline::start_on_cpu;
    use crate::{Pipeline, RuntimeConfig};
    use jetvlm_camera::Frame;
    use jetvlm_vision::RgbImage;
    use std::path::PathBuf;
    use std::time::Duration;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vlm")
    }

    /// The prompt a GPU session prefills for a question (prefix, the window's frames from
    /// their stored embeddings, the question) answers, on a fresh CPU cache, exactly like the
    /// CPU session that holds those frames (same tokens at the same positions).
    #[test]
    fn fresh_prompt_answers_like_the_cached_session() {
        let cfg = RuntimeConfig {
            kv_policy: Some("fp16".into()),
            max_new_tokens: 8,
            window_frames: 2,
            ..RuntimeConfig::default()
        };
        let mut pipe = Pipeline::load(&fixture(), cfg).unwrap();
        let img = RgbImage::open(&fixture().join("image.png")).unwrap();
        let frames: Vec<Frame> = (0..2u64)
            .map(|i| {
                let mut rgb = img.data.clone();
                if i == 1 {
                    rgb.iter_mut().for_each(|v| *v = 255 - *v);
                }
                Frame {
                    index: i,
                    timestamp: Duration::from_millis(100 * i),
                    width: img.width,
                    height: img.height,
                    rgb,
                }
            })
            .collect();
        let question = "what is in the picture?";
        let mut s = pipe.session().unwrap();
        for f in &frames {
            s.push_frame(f).unwrap();
        }
        let want = s.ask(question).unwrap().finish().unwrap().token_ids;
        assert!(!want.is_empty());

        let ids = s.question_ids(question).unwrap();
        let tpf = s.pipe.package.tokens_per_frame();
        let prompt = super::fresh_prompt(&s.prefix_ids, &s.window, &s.embeddings, tpf, &ids);
        let prompt_tokens: usize = prompt.iter().map(|i| i.len()).sum();
        assert_eq!(prompt_tokens, s.prefix_tokens() + 2 * tpf + ids.len());
        let p = &*s.pipe;
        let mut cache = KvBackend::new(&p.kv, p.cache_shape(), 1024).unwrap();
        let model = p.model.as_ref().unwrap();
        let got: Vec<u32> = start_on_cpu(
            model,
            &mut cache,
            &prompt,
            &ids,
            &p.tokenizer,
            p.generate_options(),
        )
        .unwrap()
        .map(|t| t.unwrap().token)
        .collect();
        assert_eq!(got, want);
    }
}
