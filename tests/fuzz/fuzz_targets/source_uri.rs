//! Frame source URIs (`SourceUri::parse`) and the options read from them. Only sources that
//! open nothing are opened: `synthetic://` (one small frame rendered, never paced) and
//! `v4l2://` and the GStreamer schemes in this build without the `v4l` and `gstreamer`
//! features (a typed error). `file://` and `dir://` would read the fuzzed path, so only their
//! parse is checked.

#![no_main]

use jetvlm_camera::uri::Scheme;
use jetvlm_camera::{Capture, FrameSource, SourceUri};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(uri) = SourceUri::parse(text) else {
        return;
    };
    assert_eq!(uri.raw, text);
    assert!(!uri.path.is_empty());
    if let Some((k, v)) = uri.params.last() {
        assert_eq!(uri.param(k), Some(v.as_str()));
    }
    match uri.scheme {
        Scheme::Synthetic => {
            let Ok(mut opts) = uri.synthetic_options() else {
                return;
            };
            assert!(opts.fps.is_finite() && opts.fps > 0.0);
            if opts.scene.width as u64 * opts.scene.height as u64 > 256 * 256 {
                return;
            }
            opts.pace = false;
            let Ok(mut src) = jetvlm_camera::synthetic::SyntheticSource::new(opts, text) else {
                return;
            };
            if let Ok(Capture::Frame(f)) = src.capture(Duration::from_millis(10)) {
                assert_eq!(f.rgb.len(), f.width as usize * f.height as usize * 3);
            }
        }
        Scheme::V4l2 => {
            let _ = jetvlm_camera::open(text).map(|_| ());
        }
        Scheme::Rtsp | Scheme::Video | Scheme::Csi | Scheme::Gst => {
            // The options parse (bounded values, credentials kept out of the shown URI);
            // this build has no GStreamer, so opening is a typed error and touches nothing.
            if let Ok(opts) = uri.gst_options() {
                assert!(opts.retry.backoff <= opts.retry.backoff_max);
            }
            if uri.credentials.is_some() {
                assert!(uri.redacted().contains("***@"));
                assert!(
                    !uri.path.contains('@')
                        || !uri.path[..uri.path.find('/').unwrap_or(uri.path.len())].contains('@')
                );
            }
            let _ = jetvlm_camera::open(text).map(|_| ());
        }
        Scheme::File | Scheme::Dir => {}
    }
});
