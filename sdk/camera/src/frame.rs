//! Frames and the capture interface every source implements.

use std::time::Duration;

use crate::error::Result;

/// One camera frame: packed RGB8, row-major, `width * height * 3` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// 0-based index of the frame in its stream.
    pub index: u64,
    /// Capture time relative to the start of the stream.
    pub timestamp: Duration,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Frame {
    /// The RGB triple at pixel (x, y); `None` outside the frame.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]])
    }
}

/// The outcome of one capture. End of stream and timeout are statuses, not errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    Frame(Frame),
    /// The source has no more frames (a file, a finished directory or a bounded stream).
    EndOfStream,
    /// No frame arrived within the timeout; the caller may try again.
    Timeout,
}

/// A source of frames (camera, file, directory, synthetic scene).
pub trait FrameSource: Send {
    /// Waits up to `timeout` for the next frame.
    fn capture(&mut self, timeout: Duration) -> Result<Capture>;
    /// Nominal frame size `(width, height)` when known before the first capture.
    fn frame_size(&self) -> Option<(u32, u32)>;
    /// Nominal frame rate, when the source has one.
    fn fps(&self) -> Option<f64>;
    /// A short human-readable description (the URI it was opened from).
    fn describe(&self) -> String;
    /// Ground truth of the most recently captured frame, for sources that know it (the
    /// synthetic scene); cameras return `None`.
    fn ground_truth(&self) -> Option<&crate::scene::FrameTruth> {
        None
    }
    /// Connection events since the last call (a live source that lost its stream and
    /// reconnects, with backoff, inside [`FrameSource::capture`]). Sources that cannot lose
    /// their stream return none.
    fn take_events(&mut self) -> Vec<SourceEvent> {
        Vec::new()
    }
    /// `true` while a live source has lost its stream and is reconnecting (its captures time
    /// out until then; it bounds its own attempts and fails when they are used up).
    fn reconnecting(&self) -> bool {
        false
    }
    /// Wall-clock time at which the most recently captured frame was taken, for sources
    /// that know it better than the moment [`FrameSource::capture`] returned it (a live
    /// GStreamer source: its pipeline clock at the frame's timestamp, see docs/cameras.md).
    /// `None`: the frame is as old as the capture that returned it.
    fn capture_time(&self) -> Option<std::time::SystemTime> {
        None
    }
}

/// A change in a live source's connection, reported by [`FrameSource::take_events`].
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// The stream stopped (stall, disconnect, server gone); the source retries with backoff.
    Lost {
        /// Why, in one line (credentials never included).
        reason: String,
    },
    /// The stream is back after `attempts` reconnection attempts.
    Restored { attempts: u32, outage: Duration },
}
