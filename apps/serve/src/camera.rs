//! The frame source on a thread of its own: it captures continuously at the source's pace
//! and keeps the newest frame, which the model worker takes into the rolling window
//! (`camera://window`) or answers about (`camera://latest`), and the web view shows.

use crate::ServeError;
use jetvlm_camera::{Capture, Frame};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A frame's stream index and its JPEG bytes.
pub type Jpeg = (u64, Arc<Vec<u8>>);

/// The newest frame and the source's counters, shared by the capture thread, the model
/// worker and the HTTP handlers.
#[derive(Debug, Default)]
pub struct CameraState {
    pub uri: String,
    latest: Mutex<Option<Arc<Frame>>>,
    /// Frames taken from the source.
    pub captured: AtomicU64,
    /// Captures that timed out.
    pub timeouts: AtomicU64,
    /// The source ended (a bounded stream) or failed; `status` says which.
    pub stopped: AtomicBool,
    status: Mutex<Option<String>>,
    /// Set to stop the capture thread.
    pub stop: AtomicBool,
    /// The JPEG of the newest frame, by frame index (encoded once per frame).
    jpeg: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CameraState {
    /// The newest frame, if one arrived.
    pub fn latest(&self) -> Option<Arc<Frame>> {
        lock(&self.latest).clone()
    }

    /// Why the source stopped (end of stream or an error), if it did.
    pub fn status(&self) -> Option<String> {
        lock(&self.status).clone()
    }

    /// JPEG bytes and index of the newest frame (encoded once per frame).
    pub fn latest_jpeg(&self) -> Option<Result<Jpeg, image::ImageError>> {
        let frame = self.latest()?;
        if let Some((i, bytes)) = lock(&self.jpeg).as_ref()
            && *i == frame.index
        {
            return Some(Ok((*i, bytes.clone())));
        }
        Some(crate::image::jpeg(&frame, 85).map(|b| {
            let b = Arc::new(b);
            *lock(&self.jpeg) = Some((frame.index, b.clone()));
            (frame.index, b)
        }))
    }
}

/// Opens `uri` (an error here stops the server before it listens) and starts capturing.
pub fn start(
    uri: &str,
    timeout: Duration,
) -> Result<(Arc<CameraState>, std::thread::JoinHandle<()>), ServeError> {
    let mut source = jetvlm_camera::open(uri).map_err(|source| ServeError::Source {
        uri: uri.to_string(),
        source,
    })?;
    let state = Arc::new(CameraState {
        uri: uri.to_string(),
        ..CameraState::default()
    });
    let shared = state.clone();
    let handle = std::thread::Builder::new()
        .name("jetvlm-camera".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::Relaxed) {
                match source.capture(timeout) {
                    Ok(Capture::Frame(f)) => {
                        *lock(&shared.latest) = Some(Arc::new(f));
                        shared.captured.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Capture::Timeout) => {
                        shared.timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(source = %shared.uri, "capture timed out");
                    }
                    Ok(Capture::EndOfStream) => {
                        *lock(&shared.status) = Some(format!("{}: end of stream", shared.uri));
                        break;
                    }
                    Err(e) => {
                        tracing::error!(source = %shared.uri, "capture failed: {e}");
                        *lock(&shared.status) =
                            Some(format!("{}: capture failed: {e}", shared.uri));
                        break;
                    }
                }
                for event in source.take_events() {
                    tracing::warn!(source = %shared.uri, ?event, "frame source");
                }
            }
            shared.stopped.store(true, Ordering::Relaxed);
        })
        .map_err(|source| ServeError::Start {
            what: "the camera thread",
            source,
        })?;
    Ok((state, handle))
}
