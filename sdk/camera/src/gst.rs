//! GStreamer sources: `rtsp://` cameras, video files, Jetson CSI sensors (`csi://N`) and
//! pipelines of your own (`gst://... ! appsink`), decoded to RGB8 through an appsink.
//!
//! - Decoding: `decodebin` picks the decoder. When NVIDIA's `nvv4l2decoder` and `nvvidconv`
//!   are installed (a Jetson) the frames go through `nvvidconv` (hardware decode, NVMM
//!   memory); otherwise through `videoconvert` (software decode, e.g. `avdec_h264`). The
//!   decoder in use is logged and shown by [`FrameSource::describe`].
//! - Live sources (RTSP, CSI, a live `gst://` pipeline) keep only the newest frame (a
//!   one-buffer appsink that drops stale ones), so a slow consumer always gets a fresh frame.
//!   A stall, an error or the end of the stream is a loss: the source reports
//!   [`SourceEvent::Lost`], rebuilds its pipeline with bounded backoff ([`Retry`]) inside
//!   [`FrameSource::capture`], and reports [`SourceEvent::Restored`] with the first new frame.
//! - Files deliver every frame (or at most `fps=` per second), end with
//!   [`Capture::EndOfStream`], or start over with `loop=1`.
//! - [`Frame::timestamp`] is the stream's own time (buffer PTS), relative to its first frame;
//!   it keeps increasing across reconnections and loops.
//! - [`FrameSource::capture_time`] is the wall-clock time a live source's frame was taken:
//!   the pipeline clock at the frame's running time (base time + PTS), read against the
//!   system's real-time clock. For `rtsp://` (`buffer-mode=none`) that is the arrival of the
//!   stream's first packet plus the sender's RTP time since, so it excludes the jitter
//!   buffer's `latency`, the decoder and the wait in the appsink; for `csi://` the sensor's
//!   own capture time. Files and non-live pipelines have none (a frame is as old as the
//!   capture that decoded it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use crate::error::{CameraError, Result};
use crate::frame::{Capture, Frame, FrameSource, SourceEvent};
use crate::uri::{GstOptions, GstTarget, Retry, Transport};

/// How long one wait on the appsink lasts before the bus is checked again.
const POLL: Duration = Duration::from_millis(50);

/// Default CSI capture mode.
const CSI_DEFAULT: (u32, u32, f64) = (1280, 720, 30.0);

/// Hardware or software decoding, chosen at run time from the installed elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decode {
    /// `nvv4l2decoder` + `nvvidconv` (Jetson).
    Hardware,
    /// A software decoder picked by `decodebin` (e.g. `avdec_h264`) + `videoconvert`.
    Software,
}

impl Decode {
    /// Hardware when NVIDIA's decoder and converter elements are installed.
    pub fn detect() -> Self {
        if element_exists("nvv4l2decoder") && element_exists("nvvidconv") {
            Decode::Hardware
        } else {
            Decode::Software
        }
    }

    fn name(self) -> &'static str {
        match self {
            Decode::Hardware => "hardware",
            Decode::Software => "software",
        }
    }
}

fn element_exists(name: &str) -> bool {
    gst::ElementFactory::find(name).is_some()
}

/// Whether the GStreamer element `name` is installed (`false` when GStreamer cannot start).
pub fn element_installed(name: &str) -> bool {
    gst::init().is_ok() && element_exists(name)
}

/// Initializes GStreamer once (later calls are cheap).
fn init(uri: &str) -> Result<()> {
    gst::init().map_err(|e| CameraError::Gst {
        uri: uri.to_string(),
        op: "initializing GStreamer",
        reason: e.to_string(),
    })
}

/// A built pipeline, stopped when dropped.
struct Conn {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    bus: gst::Bus,
    started: Instant,
    /// PTS of this pipeline's first frame (timestamps count from it).
    first_pts: Option<gst::ClockTime>,
}

impl Drop for Conn {
    /// Stops the pipeline on a thread of its own: rtspsrc can deadlock when it is set to NULL
    /// while its own thread is tearing down a failed connection (seen with GStreamer 1.22
    /// after a server died), and a capture must never hang on that. A teardown that never
    /// finishes leaks that thread and pipeline, not the caller.
    fn drop(&mut self) {
        let pipeline = self.pipeline.clone();
        let stop = move || {
            let _ = pipeline.set_state(gst::State::Null);
        };
        let spawned = std::thread::Builder::new()
            .name("jetvlm-gst-stop".into())
            .spawn(stop.clone());
        if spawned.is_err() {
            stop();
        }
    }
}

/// What the bus said.
enum BusNews {
    Eos,
    Error(CameraError),
}

/// An ongoing outage of a live source.
struct Outage {
    since: Instant,
    attempts: u32,
    reason: String,
    next_try: Instant,
}

/// A GStreamer source (see the module docs).
pub struct GstSource {
    /// The URI, credentials redacted.
    uri: String,
    opts: GstOptions,
    decode: Decode,
    live: bool,
    conn: Option<Conn>,
    outage: Option<Outage>,
    events: Vec<SourceEvent>,
    /// The decoder `decodebin` picked (factory name), filled in from its thread.
    decoder: Arc<Mutex<Option<String>>>,
    /// A frame captured while opening (and its capture time), handed out by the first
    /// capture.
    pending: Option<(Frame, Option<SystemTime>)>,
    /// Wall-clock capture time of the frame the last capture returned (live sources).
    captured_at: Option<SystemTime>,
    size: Option<(u32, u32)>,
    stream_fps: Option<f64>,
    /// Added to the current pipeline's PTS (reconnections and loops keep time increasing).
    ts_base: Duration,
    last_ts: Option<Duration>,
    last_frame_at: Option<Instant>,
    /// The next timestamp `fps=` lets through.
    next_due: Option<Duration>,
    next_index: u64,
    /// A file (or non-live pipeline) reached its end; every later capture says so.
    ended: bool,
}

impl std::fmt::Debug for GstSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GstSource")
            .field("uri", &self.uri)
            .field("decode", &self.decode)
            .field("live", &self.live)
            .finish()
    }
}

impl GstSource {
    /// Builds and starts the pipeline `opts` describes and waits (up to the retry options'
    /// `stall`, 5 s by default) for its first frame. `uri` (credentials already redacted)
    /// names the source in errors and [`FrameSource::describe`].
    pub fn open(uri: &str, opts: GstOptions) -> Result<Self> {
        init(uri)?;
        if let GstTarget::File { path, .. } = &opts.target
            && let Err(e) = std::fs::metadata(path)
        {
            return Err(CameraError::Gst {
                uri: uri.to_string(),
                op: "opening the video file",
                reason: e.to_string(),
            });
        }
        let decode = Decode::detect();
        check_elements(uri, &opts.target, decode)?;
        let mut src = Self {
            uri: uri.to_string(),
            live: matches!(opts.target, GstTarget::Rtsp { .. } | GstTarget::Csi { .. }),
            opts,
            decode,
            conn: None,
            outage: None,
            events: Vec::new(),
            decoder: Arc::new(Mutex::new(None)),
            pending: None,
            captured_at: None,
            size: None,
            stream_fps: None,
            ts_base: Duration::ZERO,
            last_ts: None,
            last_frame_at: None,
            next_due: None,
            next_index: 0,
            ended: false,
        };
        src.conn = Some(src.build()?);
        let deadline = Instant::now() + src.opts.retry.stall.max(Duration::from_secs(1));
        while let Some(conn) = src.conn.as_ref() {
            if let Some(news) = poll_bus(conn, &src.uri, "starting") {
                match news {
                    BusNews::Error(e) => return Err(e),
                    BusNews::Eos => {
                        return Err(CameraError::Gst {
                            uri: src.uri.clone(),
                            op: "starting",
                            reason: "the stream ended before its first frame".into(),
                        });
                    }
                }
            }
            if let Some(sample) = conn.sink.try_pull_sample(clock(POLL)) {
                if let Some(taken) = src.take_sample(&sample)? {
                    src.pending = Some(taken);
                    break;
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(CameraError::Gst {
                    uri: src.uri.clone(),
                    op: "starting",
                    reason: format!(
                        "no frame within {} ms (raise stall_ms= for a slow source)",
                        src.opts.retry.stall.as_millis()
                    ),
                });
            }
        }
        tracing::info!(
            source = %src.uri,
            decoder = %src.decoder_name(),
            decode = src.decode.name(),
            live = src.live,
            "GStreamer source started"
        );
        Ok(src)
    }

    /// Hardware or software decoding.
    pub fn decode(&self) -> Decode {
        self.decode
    }

    /// The decoder element `decodebin` picked (e.g. `avdec_h264`, `nvv4l2decoder`), once
    /// known; `None` for sources that decode nothing (CSI, raw pipelines).
    pub fn decoder(&self) -> Option<String> {
        self.decoder.lock().ok().and_then(|d| d.clone())
    }

    fn decoder_name(&self) -> String {
        self.decoder().unwrap_or_else(|| "none".into())
    }

    /// Whether the source is live (latest-frame delivery, reconnection on loss).
    pub fn is_live(&self) -> bool {
        self.live
    }

    fn retry(&self) -> Retry {
        self.opts.retry
    }

    /// The pipeline description and the properties set on it after parsing (credentials go
    /// into properties, never into the description).
    fn description(&self) -> String {
        let convert = convert_chain(self.decode, self.opts.width, self.opts.height);
        match &self.opts.target {
            GstTarget::Rtsp {
                transport,
                latency_ms,
                ..
            } => {
                let protocols = match transport {
                    Transport::Tcp => " protocols=tcp",
                    Transport::Udp => " protocols=udp",
                    Transport::Auto => "",
                };
                // buffer-mode=none: timestamps are the sender's RTP times (not arrival times).
                format!(
                    "rtspsrc name=src latency={latency_ms} buffer-mode=none{protocols} ! \
                     decodebin name=dec caps=\"video/x-raw(ANY)\" expose-all-streams=false ! \
                     {convert} ! appsink name=jetvlm_sink"
                )
            }
            GstTarget::File { .. } => format!(
                "filesrc name=src ! decodebin name=dec caps=\"video/x-raw(ANY)\" \
                 expose-all-streams=false ! {convert} ! appsink name=jetvlm_sink"
            ),
            GstTarget::Csi { sensor } => {
                let (w, h, fps) = CSI_DEFAULT;
                let (w, h) = (self.opts.width.unwrap_or(w), self.opts.height.unwrap_or(h));
                let fps = self.opts.fps.unwrap_or(fps).round().max(1.0) as u32;
                format!(
                    "nvarguscamerasrc sensor-id={sensor} ! \
                     video/x-raw(memory:NVMM),width={w},height={h},framerate={fps}/1 ! \
                     nvvidconv ! video/x-raw,format=RGBA ! videoconvert ! \
                     video/x-raw,format=RGB ! appsink name=jetvlm_sink"
                )
            }
            GstTarget::Pipeline { description } => description.clone(),
        }
    }

    /// Builds the pipeline and sets it playing.
    fn build(&mut self) -> Result<Conn> {
        let uri = self.uri.clone();
        let err = |op: &'static str, reason: String| CameraError::Gst {
            uri: uri.clone(),
            op,
            reason,
        };
        let description = self.description();
        let mut ctx = gst::ParseContext::new();
        let element = match gst::parse::launch_full(
            &description,
            Some(&mut ctx),
            gst::ParseFlags::FATAL_ERRORS,
        ) {
            Ok(e) => e,
            Err(e) => {
                if let Some(element) = ctx.missing_elements().into_iter().next() {
                    return Err(CameraError::GstElementMissing {
                        uri: uri.clone(),
                        hint: package_hint(&element).into(),
                        element,
                    });
                }
                return Err(err("parsing the pipeline", e.to_string()));
            }
        };
        let pipeline = match element.downcast::<gst::Pipeline>() {
            Ok(p) => p,
            Err(e) => {
                // A single element parses to itself: wrap it.
                let p = gst::Pipeline::new();
                p.add(&e)
                    .map_err(|e| err("building the pipeline", e.to_string()))?;
                p
            }
        };
        let sink = find_appsink(&pipeline).map_err(|r| err("building the pipeline", r))?;
        if let Some(src) = pipeline.by_name("src") {
            match &self.opts.target {
                GstTarget::Rtsp {
                    location,
                    credentials,
                    ..
                } => {
                    src.set_property("location", location);
                    if let Some(c) = credentials {
                        src.set_property("user-id", &c.user);
                        src.set_property("user-pw", &c.password);
                    }
                    // Connecting to a host that does not answer gives up with the stall.
                    let micros = self.retry().stall.as_micros().min(u64::MAX as u128) as u64;
                    src.set_property("tcp-timeout", micros);
                }
                GstTarget::File { path, .. } => src.set_property("location", path),
                _ => {}
            }
        }
        if let Some(dec) = pipeline.by_name("dec")
            && let Ok(bin) = dec.downcast::<gst::Bin>()
        {
            let slot = Arc::clone(&self.decoder);
            bin.connect_deep_element_added(move |_, _, element| {
                if let Some(factory) = element.factory()
                    && factory.klass().contains("Decoder")
                    && let Ok(mut d) = slot.lock()
                {
                    *d = Some(factory.name().to_string());
                }
            });
        }
        if sink.caps().is_none() {
            sink.set_caps(Some(
                &gst::Caps::builder("video/x-raw")
                    .field("format", "RGB")
                    .build(),
            ));
        }
        sink.set_sync(false);
        let bus = pipeline
            .bus()
            .ok_or_else(|| err("building the pipeline", "the pipeline has no bus".into()))?;
        // Paused first: a live pipeline says so (no preroll) before it plays.
        let started = pipeline
            .set_state(gst::State::Paused)
            .and_then(|paused| pipeline.set_state(gst::State::Playing).map(|_| paused));
        let conn = Conn {
            pipeline,
            sink,
            bus,
            started: Instant::now(),
            first_pts: None,
        };
        match started {
            Err(_) => {
                // The bus usually says why.
                if let Some(BusNews::Error(e)) = poll_bus(&conn, &uri, "starting") {
                    return Err(e);
                }
                return Err(err("starting", "the pipeline refused to play".into()));
            }
            Ok(gst::StateChangeSuccess::NoPreroll) => self.live = true,
            Ok(_) => {}
        }
        if self.live {
            conn.sink.set_max_buffers(1);
            conn.sink.set_drop(true);
        } else {
            conn.sink.set_max_buffers(4);
            conn.sink.set_drop(false);
        }
        Ok(conn)
    }

    /// Turns a sample into a frame and its wall-clock capture time (live sources); `None`
    /// when `fps=` skips it.
    fn take_sample(&mut self, sample: &gst::Sample) -> Result<Option<(Frame, Option<SystemTime>)>> {
        let bad = |reason: String| CameraError::Gst {
            uri: self.uri.clone(),
            op: "reading a frame",
            reason,
        };
        let caps = sample
            .caps()
            .ok_or_else(|| bad("a sample without caps".into()))?;
        let info =
            gst_video::VideoInfo::from_caps(caps).map_err(|e| bad(format!("caps {caps}: {e}")))?;
        if info.format() != gst_video::VideoFormat::Rgb {
            return Err(bad(format!(
                "the appsink receives {} frames, not RGB (end the pipeline with `videoconvert ! appsink`)",
                info.format().to_str()
            )));
        }
        let (w, h) = (info.width(), info.height());
        if let Some(reason) = jetvlm_core::ImageLimits::default().refusal(w, h) {
            return Err(bad(reason));
        }
        let fps = info.fps();
        if fps.numer() > 0 && fps.denom() > 0 {
            self.stream_fps = Some(fps.numer() as f64 / fps.denom() as f64);
        }
        let buffer = sample
            .buffer()
            .ok_or_else(|| bad("a sample without a buffer".into()))?;
        let pts = buffer.pts();
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| bad("no pipeline".into()))?;
        let first = *conn
            .first_pts
            .get_or_insert(pts.unwrap_or(gst::ClockTime::ZERO));
        let captured_at = if self.live {
            wall_clock_of(&conn.pipeline, sample.segment(), pts)
        } else {
            None
        };
        let since_first = pts
            .map(|p| Duration::from_nanos(p.saturating_sub(first).nseconds()))
            .unwrap_or_else(|| {
                // No PTS: count frames at the nominal rate.
                let n = self.next_index as f64;
                Duration::from_secs_f64(n / self.stream_fps.unwrap_or(30.0))
            });
        let ts = (self.ts_base + since_first).max(self.last_ts.unwrap_or(Duration::ZERO));
        let index = self.next_index;
        self.next_index += 1;
        self.last_ts = Some(ts);
        self.last_frame_at = Some(Instant::now());
        if let Some(max_fps) = self.opts.fps {
            let period = Duration::from_secs_f64(1.0 / max_fps);
            let due = *self.next_due.get_or_insert(ts);
            // A millisecond of slack absorbs rounding of the stream's timestamps.
            if ts + Duration::from_millis(1) < due {
                return Ok(None);
            }
            let next = due + period;
            self.next_due = Some(if next <= ts { ts + period } else { next });
        }
        let row = w as usize * 3;
        let stride = info.stride()[0].max(0) as usize;
        let need = (h as usize)
            .checked_sub(1)
            .and_then(|r| r.checked_mul(stride))
            .and_then(|n| n.checked_add(row))
            .ok_or_else(|| bad(format!("frame size {w}x{h} stride {stride} overflows")))?;
        let map = buffer
            .map_readable()
            .map_err(|_| bad("the buffer cannot be mapped".into()))?;
        let data = map.as_slice();
        if stride < row || data.len() < need {
            return Err(bad(format!(
                "a {w}x{h} RGB buffer of {} bytes (stride {stride}) is too small",
                data.len()
            )));
        }
        let mut rgb = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            rgb.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        self.size = Some((w, h));
        Ok(Some((
            Frame {
                index,
                timestamp: ts,
                width: w,
                height: h,
                rgb,
            },
            captured_at,
        )))
    }

    /// The live source lost its stream (or a reconnection attempt failed): drop the pipeline,
    /// report the loss once per outage, and schedule the next attempt; an error when the
    /// attempts are used up.
    fn lose(&mut self, reason: String) -> Result<()> {
        self.conn = None;
        let now = Instant::now();
        let retry = self.retry();
        if self.outage.is_none() {
            tracing::warn!(source = %self.uri, %reason, "source lost; reconnecting");
            self.events.push(SourceEvent::Lost {
                reason: reason.clone(),
            });
        }
        let outage = self.outage.get_or_insert(Outage {
            since: now,
            attempts: 0,
            reason: String::new(),
            next_try: now,
        });
        outage.reason = reason;
        if outage.attempts >= retry.retries {
            return Err(CameraError::SourceLost {
                uri: self.uri.clone(),
                attempts: outage.attempts,
                reason: outage.reason.clone(),
            });
        }
        outage.next_try = now + retry.delay(outage.attempts + 1);
        Ok(())
    }

    /// End of a file: start over (`loop=1`) or end.
    fn rewind(&mut self) -> Result<bool> {
        let looping = matches!(self.opts.target, GstTarget::File { looping: true, .. });
        if !looping {
            return Ok(false);
        }
        let period = Duration::from_secs_f64(1.0 / self.stream_fps.unwrap_or(30.0));
        self.ts_base = self.last_ts.map_or(Duration::ZERO, |t| t + period);
        let uri = self.uri.clone();
        let conn = self.conn.as_mut().ok_or_else(|| CameraError::Gst {
            uri: uri.clone(),
            op: "looping",
            reason: "no pipeline".into(),
        })?;
        conn.first_pts = None;
        conn.pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                gst::ClockTime::ZERO,
            )
            .map_err(|e| CameraError::Gst {
                uri,
                op: "looping (seeking to the start)",
                reason: e.to_string(),
            })?;
        Ok(true)
    }
}

/// The elements after `decodebin` that turn any decoded video into RGB at the asked size.
fn convert_chain(decode: Decode, width: Option<u32>, height: Option<u32>) -> String {
    let mut size = String::new();
    if let Some(w) = width {
        size.push_str(&format!(",width={w}"));
    }
    if let Some(h) = height {
        size.push_str(&format!(",height={h}"));
    }
    match decode {
        // nvvidconv reads NVMM (hardware decoder) and system memory, scales, and writes RGBA.
        Decode::Hardware => format!(
            "nvvidconv ! video/x-raw,format=RGBA{size} ! videoconvert ! video/x-raw,format=RGB"
        ),
        Decode::Software => {
            format!("videoconvert ! videoscale ! video/x-raw,format=RGB{size}")
        }
    }
}

/// Fails with the first element `target` needs that is not installed.
fn check_elements(uri: &str, target: &GstTarget, decode: Decode) -> Result<()> {
    let mut needed = vec!["appsink", "videoconvert"];
    match target {
        GstTarget::Rtsp { .. } => needed.extend(["rtspsrc", "decodebin"]),
        GstTarget::File { .. } => needed.extend(["filesrc", "decodebin"]),
        GstTarget::Csi { .. } => needed.extend(["nvarguscamerasrc", "nvvidconv"]),
        GstTarget::Pipeline { .. } => {}
    }
    if decode == Decode::Software && !matches!(target, GstTarget::Csi { .. }) {
        needed.push("videoscale");
    }
    match needed.into_iter().find(|e| !element_exists(e)) {
        None => Ok(()),
        Some(element) => Err(CameraError::GstElementMissing {
            uri: uri.to_string(),
            element: element.to_string(),
            hint: package_hint(element).into(),
        }),
    }
}

/// Where an element comes from.
fn package_hint(element: &str) -> &'static str {
    match element {
        "nvarguscamerasrc" | "nvvidconv" | "nvv4l2decoder" => {
            "csi:// and hardware decoding need NVIDIA's GStreamer plugins, part of JetPack on a Jetson"
        }
        "rtspsrc" | "rtph264depay" | "rtph265depay" | "qtdemux" | "matroskademux" => {
            "Debian/Ubuntu package gstreamer1.0-plugins-good"
        }
        "appsink" | "videoconvert" | "videoscale" | "decodebin" | "videotestsrc" => {
            "Debian/Ubuntu package gstreamer1.0-plugins-base"
        }
        "filesrc" | "fakesink" | "queue" => "the GStreamer core library (libgstreamer1.0-0)",
        "x264enc" => "Debian/Ubuntu package gstreamer1.0-plugins-ugly",
        _ => "check the name with gst-inspect-1.0, and install the plugin package that has it",
    }
}

/// The pipeline's one appsink.
fn find_appsink(pipeline: &gst::Pipeline) -> std::result::Result<gst_app::AppSink, String> {
    let mut found = Vec::new();
    for element in pipeline.iterate_recurse().into_iter().flatten() {
        if let Ok(sink) = element.downcast::<gst_app::AppSink>() {
            found.push(sink);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(
            "the pipeline has no appsink (end it with `videoconvert ! appsink name=out`)".into(),
        ),
        n => Err(format!(
            "the pipeline has {n} appsinks; jetvlm reads exactly one"
        )),
    }
}

/// The wall-clock time of a buffer at `pts` in `segment`: its running time against the
/// pipeline's running time now, applied to the system's real-time clock now. `None` when the
/// pipeline has no clock yet or the buffer has no time.
fn wall_clock_of(
    pipeline: &gst::Pipeline,
    segment: Option<&gst::Segment>,
    pts: Option<gst::ClockTime>,
) -> Option<SystemTime> {
    let running = segment?
        .downcast_ref::<gst::ClockTime>()?
        .to_running_time(pts?)?;
    let now_running = pipeline.current_running_time()?;
    let now = SystemTime::now();
    if running <= now_running {
        now.checked_sub(Duration::from_nanos((now_running - running).nseconds()))
    } else {
        now.checked_add(Duration::from_nanos((running - now_running).nseconds()))
    }
}

fn clock(d: Duration) -> gst::ClockTime {
    gst::ClockTime::from_nseconds(d.as_nanos().min(u64::MAX as u128) as u64)
}

/// The first error or end-of-stream waiting on the bus, if any.
fn poll_bus(conn: &Conn, uri: &str, op: &'static str) -> Option<BusNews> {
    while let Some(msg) = conn.bus.pop_filtered(&[
        gst::MessageType::Error,
        gst::MessageType::Eos,
        gst::MessageType::Warning,
    ]) {
        match msg.view() {
            gst::MessageView::Eos(_) => return Some(BusNews::Eos),
            gst::MessageView::Error(e) => return Some(BusNews::Error(bus_error(uri, op, e))),
            gst::MessageView::Warning(w) => {
                tracing::debug!(source = %uri, warning = %w.error(), "GStreamer warning");
            }
            _ => {}
        }
    }
    None
}

/// A bus error as this crate's error: a missing decoder names the codec.
fn bus_error(uri: &str, op: &'static str, e: &gst::message::Error) -> CameraError {
    let err = e.error();
    let debug = e.debug().map(|d| d.to_string()).unwrap_or_default();
    if err.matches(gst::CoreError::MissingPlugin)
        && let Some(rest) = debug.split("Missing decoder: ").nth(1)
    {
        let codec = ["(video/", "(audio/", "(image/", "(application/"]
            .iter()
            .filter_map(|p| rest.find(&format!(" {p}")))
            .min()
            .map_or(rest, |i| &rest[..i]);
        return CameraError::NoDecoder {
            uri: uri.to_string(),
            codec: codec.trim().to_string(),
        };
    }
    let from = e
        .src()
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| "pipeline".into());
    // The debug text's last line is the most specific part; keep the message one line.
    let detail = debug
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(|l| format!(" ({l})"))
        .unwrap_or_default();
    CameraError::Gst {
        uri: uri.to_string(),
        op,
        reason: format!("{from}: {err}{detail}"),
    }
}

impl FrameSource for GstSource {
    fn capture(&mut self, timeout: Duration) -> Result<Capture> {
        if let Some(opened) = self.pending.take() {
            // A live source hands out a newer frame if one came since opening.
            let newer = match (&self.conn, self.live) {
                (Some(conn), true) => conn.sink.try_pull_sample(gst::ClockTime::ZERO),
                _ => None,
            };
            let (frame, at) = match newer {
                Some(sample) => self.take_sample(&sample)?.unwrap_or(opened),
                None => opened,
            };
            self.captured_at = at;
            return Ok(Capture::Frame(frame));
        }
        if self.ended {
            return Ok(Capture::EndOfStream);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if self.conn.is_none() {
                let Some(next_try) = self.outage.as_ref().map(|o| o.next_try) else {
                    return Err(CameraError::Gst {
                        uri: self.uri.clone(),
                        op: "capturing",
                        reason: "the pipeline is gone".into(),
                    });
                };
                if next_try > now {
                    if now >= deadline {
                        return Ok(Capture::Timeout);
                    }
                    std::thread::sleep(next_try.min(deadline) - now);
                    continue;
                }
                if let Some(o) = self.outage.as_mut() {
                    o.attempts += 1;
                }
                match self.build() {
                    Ok(conn) => self.conn = Some(conn),
                    Err(e) => {
                        self.lose(e.to_string())?;
                        continue;
                    }
                }
            }
            let Some(conn) = self.conn.as_ref() else {
                continue;
            };
            match poll_bus(conn, &self.uri, "streaming") {
                None => {}
                Some(BusNews::Eos) if !self.live => {
                    if self.rewind()? {
                        continue;
                    }
                    self.ended = true;
                    return Ok(Capture::EndOfStream);
                }
                Some(BusNews::Eos) => {
                    self.lose("the stream ended".into())?;
                    continue;
                }
                Some(BusNews::Error(e)) if !self.live => return Err(e),
                Some(BusNews::Error(e)) => {
                    self.lose(e.to_string())?;
                    continue;
                }
            }
            let wait = deadline.saturating_duration_since(now).min(POLL);
            if let Some(sample) = conn.sink.try_pull_sample(clock(wait)) {
                if let Some(outage) = self.outage.take() {
                    // The new pipeline's time continues from the last frame plus the outage.
                    let gap = self.last_frame_at.map_or(Duration::ZERO, |t| t.elapsed());
                    self.ts_base = self.last_ts.map_or(Duration::ZERO, |t| t + gap);
                    self.next_due = None;
                    tracing::warn!(
                        source = %self.uri,
                        attempts = outage.attempts,
                        outage_ms = outage.since.elapsed().as_millis() as u64,
                        "source restored"
                    );
                    self.events.push(SourceEvent::Restored {
                        attempts: outage.attempts,
                        outage: outage.since.elapsed(),
                    });
                }
                match self.take_sample(&sample)? {
                    Some((frame, at)) => {
                        self.captured_at = at;
                        return Ok(Capture::Frame(frame));
                    }
                    None => continue,
                }
            }
            if self.live {
                let Some(conn) = self.conn.as_ref() else {
                    continue;
                };
                let quiet_since = match (self.outage.is_some(), self.last_frame_at) {
                    (false, Some(t)) => t.max(conn.started),
                    _ => conn.started,
                };
                let stall = self.retry().stall;
                if quiet_since.elapsed() > stall {
                    self.lose(format!("no frame for {} ms", stall.as_millis()))?;
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return Ok(Capture::Timeout);
            }
        }
    }

    fn frame_size(&self) -> Option<(u32, u32)> {
        self.size
    }

    fn fps(&self) -> Option<f64> {
        match (self.stream_fps, self.opts.fps) {
            (Some(s), Some(max)) => Some(s.min(max)),
            (s, max) => s.or(max),
        }
    }

    fn describe(&self) -> String {
        match self.decoder() {
            Some(d) => format!("{} ({d}, {} decode)", self.uri, self.decode.name()),
            None => self.uri.clone(),
        }
    }

    fn take_events(&mut self) -> Vec<SourceEvent> {
        std::mem::take(&mut self.events)
    }

    fn reconnecting(&self) -> bool {
        self.outage.is_some()
    }

    fn capture_time(&self) -> Option<SystemTime> {
        self.captured_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_chains_scale_and_end_in_rgb() {
        let sw = convert_chain(Decode::Software, Some(64), None);
        assert!(sw.ends_with("video/x-raw,format=RGB,width=64"), "{sw}");
        let hw = convert_chain(Decode::Hardware, Some(64), Some(48));
        assert!(
            hw.starts_with("nvvidconv ! video/x-raw,format=RGBA,width=64,height=48"),
            "{hw}"
        );
        assert!(hw.ends_with("format=RGB"), "{hw}");
    }

    #[test]
    fn missing_elements_name_their_package() {
        assert!(package_hint("nvarguscamerasrc").contains("JetPack"));
        assert!(package_hint("rtspsrc").contains("plugins-good"));
    }
}
