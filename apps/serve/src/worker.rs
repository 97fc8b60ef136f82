//! The model worker: one thread owns the [`Pipeline`]; requests reach it through a bounded
//! queue and get their answer back token by token.
//!
//! With a frame source, the worker keeps a [`StreamSession`](jetvlm_runtime::StreamSession)
//! over the newest frames (the rolling window in the mixed KV cache). Between requests it
//! takes each new frame into the window; a `camera://window` question is asked of the cached
//! frames, so it costs only its own tokens, and every window question shares them. A question
//! about a `data:` image, `camera://latest` or text only runs on the pipeline's own cache
//! while the window's session is parked ([`jetvlm_runtime::ParkedSession`]), so the window is
//! neither re-encoded nor prefilled again.

use crate::error::ApiError;
use crate::openai::{Finish, Usage};
use crate::{ModelInfo, Sample, Shared, StandingAnswer, StandingQuestion};
use jetvlm_camera::Frame;
use jetvlm_decoder::FinishReason;
use jetvlm_runtime::{KvStats, ParkedSession, Pipeline, RuntimeConfig, Sampling, TokenStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What a request asks about.
#[derive(Debug)]
pub enum Images {
    /// Decoded images, oldest first (none: a text-only question).
    Frames(Vec<Frame>),
    /// The newest camera frame.
    CameraLatest,
    /// The rolling window's cached frames.
    CameraWindow,
}

impl Images {
    fn kind(&self) -> &'static str {
        match self {
            Images::Frames(f) if f.is_empty() => "text",
            Images::Frames(_) => "data",
            Images::CameraLatest => "latest",
            Images::CameraWindow => "window",
        }
    }
}

/// One request in the queue.
#[derive(Debug)]
pub struct Job {
    pub question: String,
    pub images: Images,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The sampling of this answer (the configured one unless the request asked otherwise).
    pub sampling: Sampling,
    /// Set when the client went away (the handler or its stream was dropped).
    pub cancel: Arc<AtomicBool>,
    /// The per-request time limit.
    pub deadline: Instant,
    pub enqueued: Instant,
    pub events: UnboundedSender<Event>,
}

/// What the worker sends back for a job.
#[derive(Debug)]
pub enum Event {
    /// The prompt ran; tokens follow. `frames`: the stream indices of the frames asked about.
    Started {
        frames: Vec<u64>,
    },
    /// Text (may hold several tokens' text; never text past a stop string).
    Token(String),
    Done(Box<Done>),
    Failed(ApiError),
}

/// A finished answer.
#[derive(Clone, Debug)]
pub struct Done {
    pub finish: Finish,
    pub usage: Usage,
    pub frames: Vec<u64>,
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    pub kv: KvStats,
}

/// How an answer's generation ended.
enum Ended {
    Finished(Finish),
    Cancelled,
    TimedOut,
}

/// Holds back text that may still begin a request's stop string, and cuts at the first one.
#[derive(Debug, Default)]
pub struct StopScan {
    stops: Vec<String>,
    held: String,
}

impl StopScan {
    pub fn new(stops: Vec<String>) -> Self {
        StopScan {
            stops,
            held: String::new(),
        }
    }

    /// Adds text; returns what may be sent now and whether a stop string was reached (the
    /// text before it is returned, the stop string and anything after are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a prefix of a stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, false)
    }

    /// What is held at the end of the answer.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The worker's state beside the pipeline.
struct Worker {
    shared: Arc<Shared>,
    parked: Option<ParkedSession>,
    /// Stream index of the newest frame taken into the window.
    last_windowed: Option<u64>,
    windowed: u64,
    standing: Vec<StandingQuestion>,
    every: u64,
    tokens_per_frame: usize,
    started: Instant,
    /// The runtime config's sampling: the pipeline's between requests (standing questions
    /// use it), restored after every request that asked for another.
    configured: Sampling,
}

/// Loads the model, publishes it as ready, then answers jobs until the server stops.
pub fn run(
    model: PathBuf,
    cfg: RuntimeConfig,
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    standing: Vec<StandingQuestion>,
    every: u64,
) -> Result<(), crate::ServeError> {
    let mut pipeline = Pipeline::load(&model, cfg).map_err(|source| crate::ServeError::Load {
        path: model.clone(),
        source: Box::new(source),
    })?;
    let info = ModelInfo {
        id: pipeline.package().manifest.name.clone(),
        kv_policy: pipeline.kv_policy(),
        provider: pipeline.execution_provider(),
        decoder: pipeline.decoder_device(),
        max_tokens: pipeline.config().max_new_tokens,
        sampling: pipeline.config().sampling.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let tokens_per_frame = pipeline.package().tokens_per_frame();
    let mut w = Worker {
        parked: None,
        last_windowed: None,
        windowed: 0,
        standing,
        every: every.max(1),
        tokens_per_frame,
        started: shared.started,
        shared: shared.clone(),
        configured: pipeline.config().sampling.clone(),
    };
    if shared.camera.is_some() {
        let session = pipeline
            .session()
            .and_then(|s| s.park())
            .map_err(|e| crate::ServeError::Worker(format!("starting the window session: {e}")))?;
        w.parked = Some(session);
    }
    tracing::info!(model = %info.id, kv = %info.kv_policy, provider = %info.provider, "model loaded");
    // Ready: handlers answer from here on.
    let _ = shared.model.set(info);
    let poll = Duration::from_millis(if shared.camera.is_some() { 10 } else { 100 });
    loop {
        match rx.recv_timeout(poll) {
            Ok(job) => {
                shared.queue_depth.fetch_sub(1, Ordering::Relaxed);
                w.handle(&mut pipeline, job);
            }
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopping.load(Ordering::Relaxed) {
                    return Ok(());
                }
                w.idle(&mut pipeline);
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

impl Worker {
    /// Between requests: the newest frame into the window, and the standing questions when
    /// they are due.
    fn idle(&mut self, pipeline: &mut Pipeline) {
        match self.sync_window(pipeline) {
            Ok(true) => {
                if !self.standing.is_empty()
                    && self.windowed.is_multiple_of(self.every)
                    && self.shared.queue_depth.load(Ordering::Relaxed) == 0
                {
                    self.ask_standing(pipeline);
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!("taking a frame into the window: {e}"),
        }
    }

    /// Takes the camera's newest frame into the window when it is newer than the window's;
    /// true when one was taken.
    fn sync_window(
        &mut self,
        pipeline: &mut Pipeline,
    ) -> Result<bool, jetvlm_runtime::RuntimeError> {
        let Some(camera) = &self.shared.camera else {
            return Ok(false);
        };
        let Some(frame) = camera.latest() else {
            return Ok(false);
        };
        if self.last_windowed.is_some_and(|i| i >= frame.index) {
            return Ok(false);
        }
        let Some(parked) = self.parked.take() else {
            return Ok(false);
        };
        let mut session = pipeline.resume(parked);
        let pushed = session.push_frame(&frame);
        let kv = session.kv_memory();
        let n = session.frames().len();
        self.parked = Some(session.park()?);
        pushed?;
        let skipped = match self.last_windowed {
            Some(i) => frame.index - i - 1,
            None => frame.index,
        };
        let m = &self.shared.metrics;
        m.frames_dropped.fetch_add(skipped, Ordering::Relaxed);
        m.frames_windowed.fetch_add(1, Ordering::Relaxed);
        m.window_frames.store(n as u64, Ordering::Relaxed);
        m.set_kv(kv);
        self.last_windowed = Some(frame.index);
        self.windowed += 1;
        Ok(true)
    }

    fn ask_standing(&mut self, pipeline: &mut Pipeline) {
        let Some(parked) = self.parked.take() else {
            return;
        };
        let mut session = pipeline.resume(parked);
        let frames: Vec<u64> = session.frames().iter().map(|f| f.index).collect();
        let mut answers = Vec::new();
        for q in &self.standing {
            let result = session.ask(&q.question).and_then(|s| s.finish());
            let (answer, error) = match result {
                Ok(a) => {
                    let s = &a.stats;
                    self.shared.push_sample(Sample {
                        t_s: self.started.elapsed().as_secs_f64(),
                        kind: "standing",
                        ttft_ms: s.ttft_ms,
                        tpot_ms: s.tpot_ms,
                        kv_bytes: s.kv.total_bytes,
                        kv_fp16_bytes: s.kv.fp16_equivalent_bytes,
                    });
                    (Some(a.text.trim().to_string()), None)
                }
                Err(e) => (None, Some(jetvlm_core::error_line(&e))),
            };
            answers.push(StandingAnswer {
                name: q.name.clone(),
                question: q.question.clone(),
                answer,
                error,
                frame: frames.last().copied(),
            });
        }
        match session.park() {
            Ok(p) => self.parked = Some(p),
            Err(e) => tracing::error!("parking the window session: {e}"),
        }
        *self.shared.standing_lock() = answers;
    }

    fn handle(&mut self, pipeline: &mut Pipeline, job: Job) {
        let shared = self.shared.clone();
        let m = &shared.metrics;
        m.queue_wait(job.enqueued.elapsed().as_secs_f64());
        if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
            m.outcome("cancelled");
            return;
        }
        if self.shared.stopping.load(Ordering::Relaxed) {
            let _ = job.events.send(Event::Failed(ApiError::unavailable(
                "shutting_down",
                "the server is stopping",
            )));
            return;
        }
        if Instant::now() >= job.deadline {
            m.outcome("timeout");
            let _ = job.events.send(Event::Failed(ApiError::timeout(
                self.shared.request_timeout.as_secs_f64(),
            )));
            return;
        }
        let kind = job.images.kind();
        let result = self.with_sampling(pipeline, &job.sampling, |w, pipeline| match &job.images {
            Images::Frames(frames) => w.one_shot(pipeline, &job, frames, &[]),
            Images::CameraLatest => match w.shared.camera.as_ref().and_then(|c| c.latest()) {
                Some(f) => {
                    let frames = [Frame::clone(&f)];
                    w.one_shot(pipeline, &job, &frames, &[f.index])
                }
                None => Err(w.no_frame()),
            },
            Images::CameraWindow => w.window(pipeline, &job),
        });
        match result {
            Ok((Ended::Finished(_), done)) => {
                let done = *done;
                m.outcome(done.finish.as_str());
                m.prompt_tokens
                    .fetch_add(done.usage.prompt_tokens as u64, Ordering::Relaxed);
                m.completion_tokens
                    .fetch_add(done.usage.completion_tokens as u64, Ordering::Relaxed);
                m.cached_tokens
                    .fetch_add(done.usage.cached_tokens as u64, Ordering::Relaxed);
                m.answer(
                    done.ttft_ms,
                    (done.usage.completion_tokens > 1).then_some(done.tpot_ms),
                );
                m.set_kv(done.kv);
                self.shared.push_sample(Sample {
                    t_s: self.started.elapsed().as_secs_f64(),
                    kind,
                    ttft_ms: done.ttft_ms,
                    tpot_ms: done.tpot_ms,
                    kv_bytes: done.kv.total_bytes,
                    kv_fp16_bytes: done.kv.fp16_equivalent_bytes,
                });
                self.shared.note_job_time(job.enqueued.elapsed());
                let _ = job.events.send(Event::Done(Box::new(done)));
            }
            Ok((Ended::Cancelled, _)) => m.outcome("cancelled"),
            Ok((Ended::TimedOut, _)) => {
                m.outcome("timeout");
                let _ = job.events.send(Event::Failed(ApiError::timeout(
                    self.shared.request_timeout.as_secs_f64(),
                )));
            }
            Err(e) => {
                m.outcome("error");
                let _ = job.events.send(Event::Failed(e));
            }
        }
    }

    /// Runs `answer` with the pipeline sampling as `sampling` asks, then restores the
    /// configured sampling, whatever the answer's outcome (finished, failed, cancelled).
    fn with_sampling<T>(
        &mut self,
        pipeline: &mut Pipeline,
        sampling: &Sampling,
        answer: impl FnOnce(&mut Self, &mut Pipeline) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        if *sampling == self.configured {
            return answer(self, pipeline);
        }
        // The request's fields passed the same checks when it was read; a refusal here is a
        // 400 naming the runtime's field all the same.
        if let Err(e) = pipeline.set_sampling(sampling.clone()) {
            return Err(ApiError::invalid(
                "sampling",
                "invalid_value",
                jetvlm_core::error_line(&e),
            ));
        }
        let result = answer(self, pipeline);
        if let Err(e) = pipeline.set_sampling(self.configured.clone()) {
            // The configured sampling was checked when the pipeline loaded.
            tracing::error!("restoring the configured sampling: {e}");
        }
        result
    }

    fn no_frame(&self) -> ApiError {
        let why = self
            .shared
            .camera
            .as_ref()
            .and_then(|c| c.status())
            .unwrap_or_else(|| "no frame has arrived yet".into());
        ApiError::unavailable("no_frame", format!("the camera has no frame: {why}"))
    }

    /// A question on the pipeline's own cache (the window's session stays parked).
    fn one_shot(
        &mut self,
        pipeline: &mut Pipeline,
        job: &Job,
        frames: &[Frame],
        indices: &[u64],
    ) -> Result<(Ended, Box<Done>), ApiError> {
        let indices = if indices.is_empty() {
            frames.iter().map(|f| f.index).collect()
        } else {
            indices.to_vec()
        };
        let stream = pipeline
            .ask(frames, &job.question)
            .map_err(|e| model_error(&e))?;
        drive(stream, job, indices, None)
    }

    /// A question about the window's cached frames.
    fn window(
        &mut self,
        pipeline: &mut Pipeline,
        job: &Job,
    ) -> Result<(Ended, Box<Done>), ApiError> {
        if let Err(e) = self.sync_window(pipeline) {
            tracing::error!("taking a frame into the window: {e}");
        }
        let parked = self.parked.take().ok_or_else(|| {
            ApiError::internal("the window session was lost after an earlier error")
        })?;
        if parked.frames().is_empty() {
            self.parked = Some(parked);
            return Err(self.no_frame());
        }
        let mut session = pipeline.resume(parked);
        let frames: Vec<u64> = session.frames().iter().map(|f| f.index).collect();
        let cached = session.prefix_tokens() + frames.len() * self.tokens_per_frame;
        let result = match session.ask(&job.question) {
            Ok(stream) => drive(stream, job, frames, Some(cached)),
            Err(e) => Err(model_error(&e)),
        };
        match session.park() {
            Ok(p) => self.parked = Some(p),
            Err(e) => tracing::error!("parking the window session: {e}"),
        }
        result
    }
}

fn model_error(e: &jetvlm_runtime::RuntimeError) -> ApiError {
    ApiError::internal(jetvlm_core::error_line(e))
}

/// Runs an answer's stream to its end, a stop string, `max_tokens`, the client leaving or the
/// time limit, sending text as it comes.
fn drive(
    mut stream: TokenStream<'_>,
    job: &Job,
    frames: Vec<u64>,
    cached: Option<usize>,
) -> Result<(Ended, Box<Done>), ApiError> {
    let _ = job.events.send(Event::Started {
        frames: frames.clone(),
    });
    let mut scan = StopScan::new(job.stop.clone());
    let mut n = 0usize;
    let mut ended = None;
    for token in stream.by_ref() {
        let token = token.map_err(|e| model_error(&e))?;
        n += 1;
        let (text, hit) = scan.push(&token.text);
        if !text.is_empty() && job.events.send(Event::Token(text)).is_err() {
            ended = Some(Ended::Cancelled);
            break;
        }
        if hit {
            ended = Some(Ended::Finished(Finish::Stop));
            break;
        }
        if job.cancel.load(Ordering::Relaxed) {
            ended = Some(Ended::Cancelled);
            break;
        }
        if Instant::now() >= job.deadline {
            ended = Some(Ended::TimedOut);
            break;
        }
        if n >= job.max_tokens {
            ended = Some(Ended::Finished(Finish::Length));
            break;
        }
    }
    let stats = stream.stats();
    let ended = match ended {
        Some(e) => e,
        None => {
            let rest = scan.flush();
            if !rest.is_empty() && job.events.send(Event::Token(rest)).is_err() {
                Ended::Cancelled
            } else {
                Ended::Finished(match stats.finish_reason {
                    Some(FinishReason::MaxTokens) => Finish::Length,
                    _ => Finish::Stop,
                })
            }
        }
    };
    let finish = match ended {
        Ended::Finished(f) => f,
        _ => Finish::Stop,
    };
    let prompt_tokens = stats.prompt_tokens;
    Ok((
        ended,
        Box::new(Done {
            finish,
            usage: Usage {
                prompt_tokens,
                completion_tokens: n,
                cached_tokens: cached.unwrap_or(0).min(prompt_tokens),
            },
            frames,
            ttft_ms: stats.ttft_ms,
            tpot_ms: stats.tpot_ms,
            kv: stats.kv,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::StopScan;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopScan::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = s.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&s.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_across_pieces_and_nothing_else_is_held() {
        assert_eq!(run(&[], &["ab", "c"]), ("abc".into(), false));
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dx"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["ab", "EN", "x"]), ("abENx".into(), false));
        assert_eq!(run(&["x", "bc"], &["abcx"]), ("a".into(), true));
        assert_eq!(run(&["é!"], &["café", "é", "!"]), ("café".into(), true));
        // Text that cannot begin a stop string is sent at once.
        let mut s = StopScan::new(vec!["END".into()]);
        assert_eq!(s.push("abc"), ("abc".into(), false));
        assert_eq!(s.push("xE"), ("x".into(), false));
    }
}
