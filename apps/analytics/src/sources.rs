//! Frame sources and the scheduler: each source captures on a thread of its own into a
//! one-frame slot (the next capture waits until the scheduler has taken the frame, so a
//! file or an unpaced synthetic scene loses no frame; a live source keeps its own newest
//! frame meanwhile), and the scheduler hands the one model the next frame by the rules
//! file's `schedule`: `round_robin` (the next source after the last served that has a
//! frame) or `oldest_first` (the waiting frame captured first).
//!
//! What a source reports besides frames ([`Notice`]: lost / restored connection, end of
//! stream, failure) reaches the scheduler in order with its frames.

use crate::rules::{Schedule, SourceSpec};
use jetvlm_camera::{Capture, Frame, FrameSource, SourceEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// A captured frame waiting for the model.
pub struct Captured {
    pub frame: Frame,
    /// When the frame was taken, by the wall clock: the source's own capture time where it
    /// knows one ([`FrameSource::capture_time`]: live GStreamer sources), else the moment
    /// `capture` returned it. Latency is measured from here; `oldest_first` orders by it.
    pub captured: SystemTime,
    /// The scene's answer to each rule's question, where the source knows it.
    pub truths: Vec<Option<String>>,
}

/// What a source reports besides frames.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Lost {
        reason: String,
    },
    Restored {
        attempts: u32,
        outage: Duration,
    },
    /// The stream ended.
    Ended,
    /// The source failed for good (the others go on).
    Failed {
        error: String,
    },
}

/// What the scheduler takes next.
pub enum Next {
    /// A frame of source `index`.
    Frame(usize, Captured),
    /// A notice of source `index`.
    Notice(usize, Notice),
    /// Every source has ended or failed, or was stopped.
    Done,
}

#[derive(Default)]
struct Slot {
    frame: Option<Captured>,
    notices: VecDeque<Notice>,
    /// The capture thread has exited (its last notice says why).
    finished: bool,
    /// The scheduler wants no more frames from it.
    stopped: bool,
}

struct Inbox {
    slots: Mutex<Vec<Slot>>,
    changed: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running sources.
pub struct Sources {
    inbox: Arc<Inbox>,
    schedule: Schedule,
    /// Round robin: the source served last.
    last: usize,
    shutdown: Arc<AtomicBool>,
}

impl Sources {
    /// Opens every source and starts its capture thread. A source that does not open gets
    /// a `Failed` notice (the others go on); when none opens, the error names each.
    /// `questions` are the rules' questions (for ground truth); `timeout` is the capture
    /// timeout, [`jetvlm_app::MAX_TIMEOUTS`] in a row fail a source.
    pub fn start(
        specs: &[SourceSpec],
        schedule: Schedule,
        questions: Vec<String>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut slots: Vec<Slot> = specs.iter().map(|_| Slot::default()).collect();
        let mut opened = Vec::with_capacity(specs.len());
        let mut failures = Vec::new();
        for (s, slot) in specs.iter().zip(&mut slots) {
            match jetvlm_camera::open(&s.uri) {
                Ok(src) => opened.push(Some(src)),
                Err(e) => {
                    let error = format!("opening {}: {}", s.uri, jetvlm_core::error_line(&e));
                    failures.push(format!("source {}: {error}", s.name));
                    slot.notices.push_back(Notice::Failed { error });
                    slot.finished = true;
                    opened.push(None);
                }
            }
        }
        if failures.len() == specs.len() {
            anyhow::bail!("{}", failures.join("; "));
        }
        let inbox = Arc::new(Inbox {
            slots: Mutex::new(slots),
            changed: Condvar::new(),
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let questions = Arc::new(questions);
        for (i, (src, spec)) in opened.into_iter().zip(specs).enumerate() {
            let Some(src) = src else { continue };
            let (inbox, questions, shutdown) = (inbox.clone(), questions.clone(), shutdown.clone());
            let uri = spec.uri.clone();
            std::thread::Builder::new()
                .name(format!("source-{}", spec.name))
                .spawn(move || capture_loop(i, src, &uri, &inbox, &questions, timeout, &shutdown))
                .map_err(|e| anyhow::anyhow!("source {}: starting its thread: {e}", spec.name))?;
        }
        Ok(Sources {
            inbox,
            schedule,
            last: specs.len().saturating_sub(1),
            shutdown,
        })
    }

    /// Asks source `i` for no more frames (its thread stops after the capture under way).
    pub fn stop(&self, i: usize) {
        let mut slots = self.inbox.lock();
        if let Some(s) = slots.get_mut(i) {
            s.stopped = true;
            s.frame = None;
        }
        self.inbox.changed.notify_all();
    }

    /// Blocks until there is something to do: a notice (first), else a frame by the
    /// schedule, else [`Next::Done`] once every source is finished or stopped.
    pub fn next(&mut self) -> Next {
        let mut slots = self.inbox.lock();
        loop {
            for (i, s) in slots.iter_mut().enumerate() {
                if let Some(n) = s.notices.pop_front() {
                    return Next::Notice(i, n);
                }
            }
            let n = slots.len();
            let ready = |i: usize| slots[i].frame.is_some() && !slots[i].stopped;
            let pick = match self.schedule {
                Schedule::RoundRobin => (1..=n).map(|k| (self.last + k) % n).find(|&i| ready(i)),
                Schedule::OldestFirst => (0..n)
                    .filter(|&i| ready(i))
                    .min_by_key(|&i| slots[i].frame.as_ref().map(|f| f.captured)),
            };
            if let Some(i) = pick {
                self.last = i;
                let frame = slots[i].frame.take();
                self.inbox.changed.notify_all();
                if let Some(f) = frame {
                    return Next::Frame(i, f);
                }
            }
            if slots.iter().all(|s| s.finished || s.stopped) {
                return Next::Done;
            }
            slots = self
                .inbox
                .changed
                .wait_timeout(slots, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.inbox.changed.notify_all();
    }
}

/// A source's thread: capture, wait for the slot to be free, put the frame (and the
/// source's events) in the inbox; end with `Ended` or `Failed`.
fn capture_loop(
    i: usize,
    mut src: Box<dyn FrameSource>,
    uri: &str,
    inbox: &Inbox,
    questions: &[String],
    timeout: Duration,
    shutdown: &AtomicBool,
) {
    let post = |notices: Vec<Notice>, frame: Option<Captured>, finished: bool| -> bool {
        let mut slots = inbox.lock();
        // Wait for the scheduler to take the previous frame: what this capture reports
        // (and its frame) comes after it, in order.
        while slots[i].frame.is_some() && !slots[i].stopped && !shutdown.load(Ordering::SeqCst) {
            slots = inbox
                .changed
                .wait_timeout(slots, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        slots[i].notices.extend(notices);
        if let Some(f) = frame
            && !slots[i].stopped
        {
            slots[i].frame = Some(f);
        }
        slots[i].finished |= finished;
        let go_on = !slots[i].stopped && !shutdown.load(Ordering::SeqCst);
        inbox.changed.notify_all();
        go_on
    };
    let events = |src: &mut dyn FrameSource| -> Vec<Notice> {
        src.take_events()
            .into_iter()
            .map(|e| match e {
                SourceEvent::Lost { reason } => Notice::Lost { reason },
                SourceEvent::Restored { attempts, outage } => Notice::Restored { attempts, outage },
            })
            .collect()
    };
    let mut timeouts = 0u32;
    loop {
        let outcome = src.capture(timeout);
        let mut notices = events(src.as_mut());
        let (frame, finished) = match outcome {
            Ok(Capture::Frame(frame)) => {
                timeouts = 0;
                let captured = src.capture_time().unwrap_or_else(SystemTime::now);
                let truths = questions
                    .iter()
                    .map(|q| {
                        src.ground_truth()
                            .and_then(|t| jetvlm_camera::qa::single_frame_answer(q, t))
                    })
                    .collect();
                (
                    Some(Captured {
                        frame,
                        captured,
                        truths,
                    }),
                    false,
                )
            }
            Ok(Capture::EndOfStream) => {
                notices.push(Notice::Ended);
                (None, true)
            }
            Ok(Capture::Timeout) => {
                timeouts += 1;
                tracing::warn!(source = %uri, "capture timed out");
                if timeouts >= jetvlm_app::MAX_TIMEOUTS {
                    notices.push(Notice::Failed {
                        error: format!(
                            "{}: no frame in {} timeouts of {} ms",
                            src.describe(),
                            jetvlm_app::MAX_TIMEOUTS,
                            timeout.as_millis()
                        ),
                    });
                    (None, true)
                } else {
                    (None, false)
                }
            }
            Err(e) => {
                notices.push(Notice::Failed {
                    error: format!("{}: {}", src.describe(), jetvlm_core::error_line(&e)),
                });
                (None, true)
            }
        };
        if !post(notices, frame, finished) || finished {
            if !finished {
                // Stopped by the scheduler.
                inbox.lock()[i].finished = true;
                inbox.changed.notify_all();
            }
            return;
        }
    }
}
