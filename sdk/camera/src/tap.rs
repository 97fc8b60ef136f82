//! [`EventTap`]: a source adapter for capture loops that report connection events as they
//! happen and wait out a reconnecting live source.

use std::time::Duration;

use crate::error::Result;
use crate::frame::{Capture, FrameSource, SourceEvent};
use crate::scene::FrameTruth;

/// Wraps a source for a capture loop: every connection event goes to `on_event` as soon as
/// the source reports it (also in the middle of an outage), and a capture that times out while
/// the source reconnects is tried again instead of returning [`Capture::Timeout`], so a
/// caller that gives up after a few timeouts leaves the retry budget to the source (which
/// bounds its attempts and fails when they are used up).
pub struct EventTap<'a, F: FnMut(&SourceEvent) + Send> {
    inner: &'a mut dyn FrameSource,
    on_event: F,
}

impl<'a, F: FnMut(&SourceEvent) + Send> EventTap<'a, F> {
    pub fn new(inner: &'a mut dyn FrameSource, on_event: F) -> Self {
        Self { inner, on_event }
    }

    fn drain(&mut self) {
        for e in self.inner.take_events() {
            (self.on_event)(&e);
        }
    }
}

impl<F: FnMut(&SourceEvent) + Send> FrameSource for EventTap<'_, F> {
    fn capture(&mut self, timeout: Duration) -> Result<Capture> {
        loop {
            let got = self.inner.capture(timeout);
            self.drain();
            match got? {
                Capture::Timeout if self.inner.reconnecting() => continue,
                other => return Ok(other),
            }
        }
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        self.inner.frame_size()
    }

    fn fps(&self) -> Option<f64> {
        self.inner.fps()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn ground_truth(&self) -> Option<&FrameTruth> {
        self.inner.ground_truth()
    }

    /// Events already went to the callback.
    fn take_events(&mut self) -> Vec<SourceEvent> {
        Vec::new()
    }

    fn reconnecting(&self) -> bool {
        self.inner.reconnecting()
    }

    fn capture_time(&self) -> Option<std::time::SystemTime> {
        self.inner.capture_time()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;

    /// Times out twice while "reconnecting", then restores and gives a frame.
    struct Flaky {
        calls: u32,
        events: Vec<SourceEvent>,
    }

    impl FrameSource for Flaky {
        fn capture(&mut self, _timeout: Duration) -> Result<Capture> {
            self.calls += 1;
            match self.calls {
                1 => {
                    self.events.push(SourceEvent::Lost {
                        reason: "gone".into(),
                    });
                    Ok(Capture::Timeout)
                }
                2 => Ok(Capture::Timeout),
                _ => {
                    self.events.push(SourceEvent::Restored {
                        attempts: 2,
                        outage: Duration::from_millis(5),
                    });
                    Ok(Capture::Frame(Frame {
                        index: 0,
                        timestamp: Duration::ZERO,
                        width: 1,
                        height: 1,
                        rgb: vec![0; 3],
                    }))
                }
            }
        }
        fn frame_size(&self) -> Option<(u32, u32)> {
            None
        }
        fn fps(&self) -> Option<f64> {
            None
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn take_events(&mut self) -> Vec<SourceEvent> {
            std::mem::take(&mut self.events)
        }
        fn reconnecting(&self) -> bool {
            self.calls < 3
        }
    }

    #[test]
    fn events_pass_through_as_they_happen_and_reconnection_timeouts_are_waited_out() {
        let mut src = Flaky {
            calls: 0,
            events: Vec::new(),
        };
        let mut seen = Vec::new();
        let got = EventTap::new(&mut src, |e| seen.push(e.clone()))
            .capture(Duration::from_millis(1))
            .unwrap();
        assert!(matches!(got, Capture::Frame(_)));
        assert!(matches!(
            seen.as_slice(),
            [
                SourceEvent::Lost { .. },
                SourceEvent::Restored { attempts: 2, .. }
            ]
        ));
        assert_eq!(src.calls, 3);
    }
}
