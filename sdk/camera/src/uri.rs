//! Source URIs and [`open`]: the one grammar of frame sources.
//!
//! - `synthetic://scene?fps=10&seed=7&width=128&height=128&frames=100&pace=1&objects=5`
//! - `file://path/to/image.png` (also `file:///abs/path.jpg`)
//! - `dir://path/to/frames?fps=10&loop=0`
//! - `v4l2:///dev/video0?width=640&height=480&fps=30` (feature `v4l`)
//! - `rtsp://[user:pass@]host[:port]/path?transport=tcp` (feature `gstreamer`)
//! - `file://clip.mp4?loop=1&fps=5` and plain video paths, by extension (feature `gstreamer`)
//! - `csi://0?width=1280&height=720&fps=30` (Jetson CSI sensor through nvarguscamerasrc)
//! - `gst://videotestsrc ! videoconvert ! appsink name=out` (a pipeline of your own)
//!
//! A bare path (no `scheme://`) opens as `dir://` when it is a directory, else `file://`.
//! Credentials in an `rtsp://` URI are never printed: errors and descriptions show
//! [`redact`]ed URIs, and [`SourceUri`]'s `Debug` does too.

use std::path::Path;
use std::time::Duration;

use jetvlm_core::ImageLimits;

use crate::error::{CameraError, Result};
use crate::frame::FrameSource;
use crate::gst::GstSource;
use crate::scene::SceneConfig;
use crate::still::{DirSource, FileSource};
use crate::synthetic::{SyntheticOptions, SyntheticSource};
use crate::v4l2::V4l2Source;

/// Kinds of source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Synthetic,
    /// An image file (`.png`, `.jpg`, `.jpeg`, or any other non-video path).
    File,
    Dir,
    V4l2,
    /// `rtsp://` (GStreamer).
    Rtsp,
    /// A video file: `file://` or a bare path with a [`VIDEO_EXTENSIONS`] extension (GStreamer).
    Video,
    /// `csi://N`: a Jetson CSI sensor through nvarguscamerasrc (GStreamer).
    Csi,
    /// `gst://<pipeline>`: a GStreamer pipeline ending in an appsink; it takes no parameters.
    Gst,
}

/// File extensions (lower case) opened as video files rather than images.
pub const VIDEO_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "mkv", "webm", "avi", "mov", "ts", "mts", "flv",
];

/// `true` when `path` ends in one of the [`VIDEO_EXTENSIONS`].
pub fn is_video_path(path: &str) -> bool {
    Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// User name and password of an `rtsp://user:pass@host/...` URI (percent-decoded). `Debug`
/// never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(***)")
    }
}

/// `uri` with any `user:password@` of its authority replaced by `***@`, for logs and errors.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => uri.to_string(),
    }
}

/// A parsed source URI.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceUri {
    pub scheme: Scheme,
    /// The part after `scheme://` and before `?` (scene name, file, directory or device; for
    /// `rtsp://`, `host[:port]/path` without the credentials; for `gst://`, the pipeline).
    pub path: String,
    pub params: Vec<(String, String)>,
    /// The URI as given (it may hold credentials: print [`SourceUri::redacted`] instead).
    pub raw: String,
    /// `rtsp://` credentials, when the URI has some.
    pub credentials: Option<Credentials>,
}

impl std::fmt::Debug for SourceUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceUri")
            .field("scheme", &self.scheme)
            .field("path", &self.path)
            .field("params", &self.params)
            .field("raw", &self.redacted())
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl SourceUri {
    pub fn parse(uri: &str) -> Result<Self> {
        let shown = redact(uri);
        let invalid = |reason: &str| CameraError::InvalidUri {
            uri: shown.clone(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = match uri.split_once("://") {
            Some((s, rest)) => {
                let scheme = match s {
                    "synthetic" => Scheme::Synthetic,
                    "file" if is_video_path(rest.split('?').next().unwrap_or(rest)) => {
                        Scheme::Video
                    }
                    "file" => Scheme::File,
                    "dir" => Scheme::Dir,
                    "v4l2" => Scheme::V4l2,
                    "rtsp" => Scheme::Rtsp,
                    "csi" => Scheme::Csi,
                    "gst" => Scheme::Gst,
                    other => {
                        return Err(CameraError::UnsupportedScheme {
                            uri: shown.clone(),
                            scheme: other.to_string(),
                        });
                    }
                };
                (scheme, rest)
            }
            None if Path::new(uri).is_dir() => (Scheme::Dir, uri),
            None if is_video_path(uri.split('?').next().unwrap_or(uri)) => (Scheme::Video, uri),
            None => (Scheme::File, uri),
        };
        // A pipeline is passed through whole: `!`, `=`, `,` and `?` are its own syntax.
        let (path, query) = match scheme {
            Scheme::Gst => (rest.trim(), ""),
            _ => rest.split_once('?').unwrap_or((rest, "")),
        };
        if path.is_empty() {
            return Err(invalid("empty path"));
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| invalid(&format!("parameter `{pair}` is not key=value")))?;
            params.push((k.to_string(), v.to_string()));
        }
        let (path, credentials) = match scheme {
            Scheme::Rtsp => split_rtsp_authority(path).map_err(|r| invalid(&r))?,
            Scheme::Csi => {
                if path.parse::<u32>().is_err() {
                    return Err(invalid(&format!(
                        "`{path}` is not a sensor number (csi://0, csi://1, ...)"
                    )));
                }
                (path.to_string(), None)
            }
            _ => (path.to_string(), None),
        };
        Ok(Self {
            scheme,
            path,
            params,
            raw: uri.to_string(),
            credentials,
        })
    }

    /// The URI with its credentials (if any) replaced by `***`: what logs and errors show.
    pub fn redacted(&self) -> String {
        redact(&self.raw)
    }

    /// The last value of parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn parsed<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| CameraError::InvalidUri {
                uri: self.redacted(),
                reason: format!(
                    "parameter `{key}={v}` is not a valid {}",
                    std::any::type_name::<T>()
                ),
            }),
        }
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.param(key) {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(CameraError::InvalidUri {
                uri: self.redacted(),
                reason: format!("parameter `{key}={v}` is not a boolean"),
            }),
        }
    }

    fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self
            .params
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) => Err(CameraError::InvalidUri {
                uri: self.redacted(),
                reason: format!(
                    "unknown parameter `{k}` (expected one of: {})",
                    allowed.join(", ")
                ),
            }),
        }
    }

    fn fps(&self, default: f64) -> Result<f64> {
        let fps = self.parsed::<f64>("fps")?.unwrap_or(default);
        if !(fps.is_finite() && fps > 0.0 && fps <= 1000.0) {
            return Err(CameraError::InvalidUri {
                uri: self.redacted(),
                reason: format!("fps {fps} outside (0, 1000]"),
            });
        }
        Ok(fps)
    }

    /// Options of a `synthetic://` URI.
    pub fn synthetic_options(&self) -> Result<SyntheticOptions> {
        self.check_keys(&[
            "fps", "seed", "width", "height", "frames", "pace", "objects",
        ])?;
        if !matches!(self.path.as_str(), "scene" | "shapes") {
            return Err(CameraError::InvalidUri {
                uri: self.redacted(),
                reason: format!("unknown synthetic scene `{}` (expected `scene`)", self.path),
            });
        }
        let mut scene = SceneConfig::default();
        scene.width = self.parsed("width")?.unwrap_or(scene.width);
        scene.height = self.parsed("height")?.unwrap_or(scene.height);
        scene.max_objects = self.parsed("objects")?.unwrap_or(scene.max_objects);
        scene.validate()?;
        Ok(SyntheticOptions {
            scene,
            seed: self.parsed("seed")?.unwrap_or(0),
            fps: self.fps(10.0)?,
            frames: self.parsed("frames")?,
            pace: self.flag("pace", true)?,
        })
    }
}

/// How an `rtsp://` source asks for its packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// RTP over the RTSP TCP connection (interleaved): survives NAT and lossy links.
    Tcp,
    /// RTP over UDP.
    Udp,
    /// What GStreamer's rtspsrc tries by default: UDP, then TCP.
    Auto,
}

/// What a GStreamer source reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GstTarget {
    Rtsp {
        /// `rtsp://host[:port]/path[?camera params]`, without credentials.
        location: String,
        credentials: Option<Credentials>,
        transport: Transport,
        /// rtspsrc's jitter buffer, in milliseconds.
        latency_ms: u32,
    },
    File {
        path: String,
        looping: bool,
    },
    Csi {
        sensor: u32,
    },
    Pipeline {
        description: String,
    },
}

/// Reconnection of a live source (`rtsp://`, `csi://`, a live `gst://` pipeline): after
/// `stall` without a frame (or an error, or the stream's end) the source is lost; it retries
/// after `backoff`, doubling up to `backoff_max`, at most `retries` times per outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub stall: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            retries: 10,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            stall: Duration::from_secs(5),
        }
    }
}

impl Retry {
    /// The wait before reconnection attempt `attempt` (1-based) of an outage.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// Options of a GStreamer source (`rtsp://`, video files, `csi://`, `gst://`).
#[derive(Clone, Debug, PartialEq)]
pub struct GstOptions {
    pub target: GstTarget,
    /// Deliver at most this many frames per second (frames in between are skipped).
    pub fps: Option<f64>,
    /// Scale frames to this size (one of the two keeps the aspect ratio).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub retry: Retry,
}

/// Parameters every live GStreamer source takes.
const RETRY_KEYS: &[&str] = &["retries", "backoff_ms", "backoff_max_ms", "stall_ms"];
/// Parameters of `rtsp://` that jetvlm reads; any other stays in the camera's URL.
const RTSP_KEYS: &[&str] = &["transport", "latency", "fps", "width", "height"];

impl SourceUri {
    fn bounded<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
        &self,
        key: &str,
        default: T,
        lo: T,
        hi: T,
    ) -> Result<T> {
        let v = self.parsed::<T>(key)?.unwrap_or(default);
        if v < lo || v > hi {
            return Err(CameraError::InvalidUri {
                uri: self.redacted(),
                reason: format!("parameter `{key}={v}` outside [{lo}, {hi}]"),
            });
        }
        Ok(v)
    }

    fn retry(&self) -> Result<Retry> {
        let d = Retry::default();
        let ms = |d: Duration| d.as_millis() as u64;
        let backoff = self.bounded("backoff_ms", ms(d.backoff), 10, 60_000)?;
        let retry = Retry {
            retries: self.bounded("retries", d.retries, 0, 1000)?,
            backoff: Duration::from_millis(backoff),
            backoff_max: Duration::from_millis(self.bounded(
                "backoff_max_ms",
                ms(d.backoff_max).max(backoff),
                backoff,
                600_000,
            )?),
            stall: Duration::from_millis(self.bounded("stall_ms", ms(d.stall), 100, 600_000)?),
        };
        Ok(retry)
    }

    fn size(&self) -> Result<(Option<u32>, Option<u32>)> {
        let mut out = [None, None];
        for (slot, key) in out.iter_mut().zip(["width", "height"]) {
            if self.param(key).is_some() {
                *slot = Some(self.bounded(key, 0u32, 2, 16384)?);
            }
        }
        Ok((out[0], out[1]))
    }

    fn optional_fps(&self) -> Result<Option<f64>> {
        match self.param("fps") {
            Some(_) => Ok(Some(self.fps(1.0)?)),
            None => Ok(None),
        }
    }

    /// Options of a GStreamer URI (`rtsp://`, a video file, `csi://`, `gst://`).
    pub fn gst_options(&self) -> Result<GstOptions> {
        let (target, retry) = match self.scheme {
            Scheme::Rtsp => {
                let transport = match self.param("transport") {
                    None => Transport::Auto,
                    Some("tcp") => Transport::Tcp,
                    Some("udp") => Transport::Udp,
                    Some(v) => {
                        return Err(CameraError::InvalidUri {
                            uri: self.redacted(),
                            reason: format!("parameter `transport={v}` is not tcp or udp"),
                        });
                    }
                };
                // The camera's own query parameters (`?channel=1&subtype=0`) stay in its URL.
                let camera: Vec<String> = self
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        !RTSP_KEYS.contains(&k.as_str()) && !RETRY_KEYS.contains(&k.as_str())
                    })
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let mut location = format!("rtsp://{}", self.path);
                if !camera.is_empty() {
                    location.push('?');
                    location.push_str(&camera.join("&"));
                }
                let target = GstTarget::Rtsp {
                    location,
                    credentials: self.credentials.clone(),
                    transport,
                    latency_ms: self.bounded("latency", 200, 0, 10_000)?,
                };
                (target, self.retry()?)
            }
            Scheme::Video => {
                self.check_keys(&["fps", "loop", "width", "height"])?;
                let target = GstTarget::File {
                    path: self.path.clone(),
                    looping: self.flag("loop", false)?,
                };
                (target, Retry::default())
            }
            Scheme::Csi => {
                let mut keys = vec!["fps", "width", "height"];
                keys.extend_from_slice(RETRY_KEYS);
                self.check_keys(&keys)?;
                let sensor = self.path.parse().map_err(|_| CameraError::InvalidUri {
                    uri: self.redacted(),
                    reason: format!("`{}` is not a sensor number", self.path),
                })?;
                (GstTarget::Csi { sensor }, self.retry()?)
            }
            Scheme::Gst => {
                if !self.path.contains("appsink") {
                    return Err(CameraError::InvalidUri {
                        uri: self.redacted(),
                        reason: "the pipeline must end in an appsink (`... ! videoconvert ! appsink name=out`)".into(),
                    });
                }
                let target = GstTarget::Pipeline {
                    description: self.path.clone(),
                };
                (target, Retry::default())
            }
            other => {
                return Err(CameraError::InvalidUri {
                    uri: self.redacted(),
                    reason: format!("{other:?} is not a GStreamer source"),
                });
            }
        };
        let (width, height) = self.size()?;
        Ok(GstOptions {
            target,
            fps: self.optional_fps()?,
            width,
            height,
            retry,
        })
    }
}

/// `user:pass@host:port/path` -> (`host:port/path`, credentials), checking the host and port.
fn split_rtsp_authority(path: &str) -> std::result::Result<(String, Option<Credentials>), String> {
    let authority_end = path.find('/').unwrap_or(path.len());
    let (authority, tail) = path.split_at(authority_end);
    let (creds, hostport) = match authority.rfind('@') {
        Some(at) => {
            let (user, password) = authority[..at]
                .split_once(':')
                .unwrap_or((&authority[..at], ""));
            let creds = Credentials {
                user: percent_decode(user).ok_or("the user name has a bad %-escape")?,
                password: percent_decode(password).ok_or("the password has a bad %-escape")?,
            };
            (Some(creds), &authority[at + 1..])
        }
        None => (None, authority),
    };
    let (host, port) = match hostport.strip_prefix('[') {
        // [IPv6]:port
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or("unclosed `[` in the host")?;
            (host, after.strip_prefix(':'))
        }
        None => match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    if host.is_empty() {
        return Err("no host (expected rtsp://host[:port]/path)".into());
    }
    if host.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err(format!("bad host `{host}`"));
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err(format!("port `{p}` is not a number in 1..=65535")),
        }
    }
    Ok((format!("{hostport}{tail}"), creds))
}

/// `%XX` escapes decoded; `None` on a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Opens the source a URI names.
pub fn open(uri: &str) -> Result<Box<dyn FrameSource>> {
    open_with_limits(uri, &ImageLimits::default())
}

/// [`open`], with image files (`file://` stills and the images of a `dir://` source)
/// decoded under `limits`: an image whose header declares more pixels is refused before
/// any pixel is decoded (a `file://` source when it opens; a `dir://` source reports and
/// skips that image and goes on).
pub fn open_with_limits(uri: &str, limits: &ImageLimits) -> Result<Box<dyn FrameSource>> {
    let u = SourceUri::parse(uri)?;
    Ok(match u.scheme {
        Scheme::Synthetic => Box::new(SyntheticSource::new(u.synthetic_options()?, uri)?),
        Scheme::File => {
            u.check_keys(&[])?;
            Box::new(FileSource::with_limits(&u.path, *limits)?)
        }
        Scheme::Dir => {
            u.check_keys(&["fps", "loop"])?;
            Box::new(
                DirSource::new(&u.path, u.fps(10.0)?, u.flag("loop", false)?)?.with_limits(*limits),
            )
        }
        Scheme::V4l2 => {
            u.check_keys(&["width", "height", "fps"])?;
            let fps = match u.param("fps") {
                Some(_) => Some(u.fps(30.0)?),
                None => None,
            };
            Box::new(V4l2Source::open(
                &u.path,
                u.parsed("width")?,
                u.parsed("height")?,
                fps,
            )?)
        }
        Scheme::Rtsp | Scheme::Video | Scheme::Csi | Scheme::Gst => {
            Box::new(GstSource::open(&u.redacted(), u.gst_options()?)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `source_uri` fuzz target: a `#` in the password ended the redaction early
    /// while the parser (rightly) read it as part of the password.
    #[test]
    fn redaction_covers_every_credential_the_parser_reads() {
        let u = SourceUri::parse("rtsp://cam:pa#ss@10.0.0.5:8554/live?transport=tcp").unwrap();
        let c = u.credentials.as_ref().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("cam", "pa#ss"));
        let shown = u.redacted();
        assert_eq!(shown, "rtsp://***@10.0.0.5:8554/live?transport=tcp");
        assert!(!shown.contains("pa#"));
    }

    #[test]
    fn parses_synthetic_options() {
        let u =
            SourceUri::parse("synthetic://scene?fps=5&seed=7&width=64&height=48&frames=3&pace=0")
                .unwrap();
        assert_eq!(u.scheme, Scheme::Synthetic);
        let o = u.synthetic_options().unwrap();
        assert_eq!(
            (o.scene.width, o.scene.height, o.seed, o.frames, o.pace),
            (64, 48, 7, Some(3), false)
        );
        assert_eq!(o.fps, 5.0);
        let d = SourceUri::parse("synthetic://scene")
            .unwrap()
            .synthetic_options()
            .unwrap();
        assert_eq!((d.fps, d.seed, d.frames, d.pace), (10.0, 0, None, true));
    }

    #[test]
    fn rejects_bad_uris_with_the_reason() {
        let err = |u: &str| open(u).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("rtmp://cam/1").contains("unsupported source scheme `rtmp`"));
        assert!(err("rtsp://:554/x").contains("no host"));
        assert!(err("rtsp://cam:99999/x").contains("port `99999`"));
        assert!(err("rtsp://cam/x?transport=quic").contains("transport=quic"));
        assert!(err("rtsp://cam/x?retries=5000").contains("retries=5000"));
        assert!(err("rtsp://cam/x?backoff_ms=1").contains("backoff_ms=1"));
        assert!(err("csi://front").contains("not a sensor number"));
        assert!(err("gst://videotestsrc ! fakesink").contains("must end in an appsink"));
        assert!(err("file://clip.mp4?speed=2").contains("unknown parameter `speed`"));
        assert!(err("synthetic://scene?fps=abc").contains("fps=abc"));
        assert!(err("synthetic://scene?fps=0").contains("fps 0"));
        assert!(err("synthetic://scene?colour=red").contains("unknown parameter `colour`"));
        assert!(err("synthetic://movie").contains("unknown synthetic scene"));
        assert!(err("synthetic://scene?seed").contains("not key=value"));
        assert!(err("file://notes.txt").contains("expected .png, .jpg or .jpeg"));
        assert!(err("dir:///nonexistent/frames").contains("listing directory /nonexistent/frames"));
    }

    #[test]
    fn rtsp_credentials_are_parsed_and_never_shown() {
        let raw = "rtsp://admin:s%40cret@10.0.0.7:8554/live?transport=tcp&channel=2&latency=50";
        let u = SourceUri::parse(raw).unwrap();
        assert_eq!(u.scheme, Scheme::Rtsp);
        assert_eq!(u.path, "10.0.0.7:8554/live");
        let c = u.credentials.clone().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("admin", "s@cret"));
        assert_eq!(
            u.redacted(),
            "rtsp://***@10.0.0.7:8554/live?transport=tcp&channel=2&latency=50"
        );
        assert!(!format!("{u:?}").contains("cret"), "{u:?}");
        let o = u.gst_options().unwrap();
        assert_eq!(
            o.target,
            GstTarget::Rtsp {
                // The camera's own parameter stays in its URL; jetvlm's are taken out.
                location: "rtsp://10.0.0.7:8554/live?channel=2".into(),
                credentials: Some(c),
                transport: Transport::Tcp,
                latency_ms: 50,
            }
        );
        assert_eq!(o.retry, Retry::default());
        // Errors about a URI with credentials redact them too.
        let e = open("rtsp://admin:hunter2@cam/x?fps=0")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("***@cam") && !e.contains("hunter2"), "{e}");
        assert_eq!(redact("rtsp://cam/a@b"), "rtsp://cam/a@b");
        assert_eq!(redact("rtsp://u:p@[::1]:80/s"), "rtsp://***@[::1]:80/s");
    }

    #[test]
    fn video_paths_csi_and_pipelines_parse() {
        let u = SourceUri::parse("file:///data/clip.MKV?loop=1&fps=2&width=64").unwrap();
        assert_eq!(u.scheme, Scheme::Video);
        let o = u.gst_options().unwrap();
        assert_eq!(
            o.target,
            GstTarget::File {
                path: "/data/clip.MKV".into(),
                looping: true
            }
        );
        assert_eq!((o.fps, o.width, o.height), (Some(2.0), Some(64), None));
        assert_eq!(SourceUri::parse("clip.webm").unwrap().scheme, Scheme::Video);
        assert_eq!(SourceUri::parse("frame.png").unwrap().scheme, Scheme::File);
        let c =
            SourceUri::parse("csi://1?retries=3&backoff_ms=100&backoff_max_ms=400&stall_ms=2000")
                .unwrap()
                .gst_options()
                .unwrap();
        assert_eq!(c.target, GstTarget::Csi { sensor: 1 });
        assert_eq!(c.retry.retries, 3);
        let delays: Vec<u128> = (1..=4).map(|a| c.retry.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 400]);
        // A pipeline keeps its `=`, `,` and `?` characters: no parameters are read from it.
        let p =
            "videotestsrc num-buffers=3 ! video/x-raw,width=32 ! videoconvert ! appsink name=out";
        let g = SourceUri::parse(&format!("gst://{p}")).unwrap();
        assert_eq!(
            (g.scheme, g.path.as_str(), g.params.len()),
            (Scheme::Gst, p, 0)
        );
    }

    #[cfg(not(feature = "gstreamer"))]
    #[test]
    fn gstreamer_sources_without_the_feature_are_one_typed_error() {
        for uri in [
            "rtsp://u:pw@cam/1",
            "clip.mp4",
            "csi://0",
            "gst://x ! appsink",
        ] {
            let e = open(uri).err().unwrap();
            assert!(
                matches!(e, CameraError::NotCompiledWithGstreamer { .. }),
                "{uri}: {e}"
            );
            let line = e.to_string();
            assert!(
                line.contains("--features gstreamer") && !line.contains("pw@"),
                "{line}"
            );
        }
    }

    #[cfg(not(feature = "v4l"))]
    #[test]
    fn v4l2_without_the_feature_is_a_typed_error() {
        assert!(matches!(
            open("v4l2:///dev/video0"),
            Err(CameraError::NotCompiledWithV4l { .. })
        ));
    }
}
