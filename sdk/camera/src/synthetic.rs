//! `synthetic://scene?fps=10&seed=7&width=128&height=128&frames=N&pace=1`: the synthetic
//! scene as a camera.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::frame::{Capture, Frame, FrameSource};
use crate::scene::{FrameTruth, Scene, SceneConfig};

/// Options of a synthetic source.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticOptions {
    pub scene: SceneConfig,
    pub seed: u64,
    pub fps: f64,
    /// Stop after this many frames (`None`: endless).
    pub frames: Option<u64>,
    /// Deliver frames at `fps` in real time, like a camera; otherwise as fast as asked.
    pub pace: bool,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        Self {
            scene: SceneConfig::default(),
            seed: 0,
            fps: 10.0,
            frames: None,
            pace: true,
        }
    }
}

/// A camera showing the synthetic scene. Frame `i` carries timestamp `i / fps`.
#[derive(Debug)]
pub struct SyntheticSource {
    opts: SyntheticOptions,
    scene: Scene,
    next: u64,
    started: Option<Instant>,
    last_truth: Option<FrameTruth>,
    uri: String,
}

impl SyntheticSource {
    pub fn new(opts: SyntheticOptions, uri: impl Into<String>) -> Result<Self> {
        let scene = Scene::new(opts.scene.clone(), opts.seed)?;
        Ok(Self {
            opts,
            scene,
            next: 0,
            started: None,
            last_truth: None,
            uri: uri.into(),
        })
    }

    /// Ground truth of the most recently captured frame.
    pub fn last_truth(&self) -> Option<&FrameTruth> {
        self.last_truth.as_ref()
    }

    pub fn options(&self) -> &SyntheticOptions {
        &self.opts
    }
}

impl FrameSource for SyntheticSource {
    fn capture(&mut self, timeout: Duration) -> Result<Capture> {
        if self.opts.frames.is_some_and(|n| self.next >= n) {
            return Ok(Capture::EndOfStream);
        }
        let timestamp = Duration::from_secs_f64(self.next as f64 / self.opts.fps);
        if self.opts.pace {
            let start = *self.started.get_or_insert_with(Instant::now);
            let due = start + timestamp;
            let now = Instant::now();
            if due > now {
                let wait = due - now;
                if wait > timeout {
                    std::thread::sleep(timeout);
                    return Ok(Capture::Timeout);
                }
                std::thread::sleep(wait);
            }
        }
        if self.next > 0 {
            self.scene.step();
        }
        let rgb = self.scene.render();
        self.last_truth = Some(self.scene.truth());
        let frame = Frame {
            index: self.next,
            timestamp,
            width: self.opts.scene.width,
            height: self.opts.scene.height,
            rgb,
        };
        self.next += 1;
        Ok(Capture::Frame(frame))
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        Some((self.opts.scene.width, self.opts.scene.height))
    }

    fn fps(&self) -> Option<f64> {
        Some(self.opts.fps)
    }

    fn ground_truth(&self) -> Option<&FrameTruth> {
        self.last_truth.as_ref()
    }

    fn describe(&self) -> String {
        self.uri.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_stream_ends_and_timestamps_follow_fps() {
        let opts = SyntheticOptions {
            frames: Some(3),
            pace: false,
            fps: 4.0,
            ..Default::default()
        };
        let mut s = SyntheticSource::new(opts, "synthetic://scene").unwrap();
        for i in 0..3u64 {
            match s.capture(Duration::from_secs(1)).unwrap() {
                Capture::Frame(f) => {
                    assert_eq!(f.index, i);
                    assert_eq!(f.timestamp, Duration::from_millis(250 * i));
                    assert_eq!(f.rgb.len(), 128 * 128 * 3);
                    assert_eq!(s.last_truth().map(|t| t.index), Some(i));
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
        assert_eq!(
            s.capture(Duration::from_secs(1)).unwrap(),
            Capture::EndOfStream
        );
    }

    #[test]
    fn paced_source_times_out_before_the_next_frame_is_due() {
        let opts = SyntheticOptions {
            fps: 0.5,
            ..Default::default()
        };
        let mut s = SyntheticSource::new(opts, "synthetic://scene").unwrap();
        assert!(matches!(
            s.capture(Duration::from_millis(10)).unwrap(),
            Capture::Frame(_)
        ));
        // The next frame is due two seconds after the first.
        assert_eq!(
            s.capture(Duration::from_millis(5)).unwrap(),
            Capture::Timeout
        );
    }
}
