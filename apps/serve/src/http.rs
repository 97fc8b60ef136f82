//! Routes, authentication, request limits and the answer's HTTP shapes (JSON or SSE).

use crate::error::ApiError;
use crate::image::ImageRef;
use crate::openai::{self, ChatRequest};
use crate::worker::{self, Event, Images, Job};
use crate::{ServeError, ServeOptions, Shared, camera};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use jetvlm_core::ImageLimits;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");

/// What every handler sees.
#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    tx: SyncSender<Job>,
    key: Option<Arc<str>>,
    max_request_bytes: usize,
    max_image_bytes: usize,
    image_limits: ImageLimits,
    timeout: Duration,
    ids: Arc<AtomicU64>,
}

/// Binds, starts the camera and the model worker, serves until a signal (or the worker's
/// end), then stops in order.
pub(crate) async fn run(
    opts: ServeOptions,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let max_request_bytes = opts.max_request_bytes()?;
    let camera = match &opts.source {
        Some(uri) => Some(camera::start(uri, opts.capture_timeout)?),
        None => None,
    };
    let addr = SocketAddr::new(opts.host, opts.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    if !opts.host.is_loopback() && opts.api_key.is_none() {
        tracing::warn!(
            "listening on {bound} without an API key: anyone who can reach this address can use \
             the model and see the camera; set --api-key or JETVLM_API_KEY"
        );
        eprintln!(
            "warning: listening on {bound} without an API key: anyone who can reach it can use \
             the model and see the camera (set --api-key or JETVLM_API_KEY)"
        );
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue);
    let shared = Arc::new(Shared {
        model: Default::default(),
        metrics: Default::default(),
        queue_depth: Default::default(),
        queue_capacity: opts.queue,
        camera: camera.as_ref().map(|(state, _)| state.clone()),
        standing_questions: opts.standing.clone(),
        standing: Mutex::default(),
        history: Mutex::default(),
        job_seconds: Mutex::new(0.0),
        stopping: AtomicBool::new(false),
        request_timeout: opts.request_timeout,
        started: Instant::now(),
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker_ended = Arc::new(tokio::sync::Notify::new());
    let worker = {
        let (shared, ended) = (shared.clone(), worker_ended.clone());
        let (model, runtime) = (opts.model.clone(), opts.runtime.clone());
        let (standing, every) = (opts.standing.clone(), opts.standing_every);
        std::thread::Builder::new()
            .name("jetvlm-model".into())
            .spawn(move || {
                let r = worker::run(model, runtime, rx, shared.clone(), standing, every);
                // The server stops when the worker does (a model that failed to load).
                shared.stop();
                let _ = done_tx.send(r);
                ended.notify_one();
            })
            .map_err(|source| ServeError::Start {
                what: "the model worker thread",
                source,
            })?
    };
    let state = AppState {
        shared: shared.clone(),
        tx,
        key: opts.api_key.as_deref().map(Arc::from),
        max_request_bytes,
        max_image_bytes: opts.max_image_bytes,
        image_limits: opts.image_limits,
        timeout: opts.request_timeout,
        ids: Arc::new(AtomicU64::new(0)),
    };
    let app = router(state);
    on_bound(bound);

    let stop = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let (shared, stop) = (shared.clone(), stop.clone());
        async move {
            tokio::select! {
                _ = signal() => tracing::info!("signal: stopping"),
                _ = worker_ended.notified() => {}
            }
            shared.stop();
            stop.notify_one();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let grace = opts.shutdown_grace;
    let served = tokio::select! {
        r = server => r.map_err(|source| ServeError::Http { addr: bound.to_string(), source }),
        _ = async { stop.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("connections still open {grace:?} after the stop signal: closing them");
            Ok(())
        }
    };
    shared.stop();
    // The worker ends once the queue is empty (queued requests get 503).
    let worker_result = tokio::task::spawn_blocking(move || worker.join())
        .await
        .ok()
        .and_then(|j| j.ok());
    let result = match done_rx.try_recv() {
        Ok(r) => r,
        Err(_) if worker_result.is_none() => {
            Err(ServeError::Worker("the model worker panicked".into()))
        }
        Err(_) => Ok(()),
    };
    if let Some((state, handle)) = camera {
        state.stop.store(true, Ordering::Relaxed);
        // The capture thread ends within one capture timeout; not waited for beyond that.
        drop(handle);
    }
    served?;
    result
}

/// SIGTERM or SIGINT.
async fn signal() {
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/frame.jpg", get(frame_jpeg))
        .route("/api/status", get(status))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route(
            "/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
            }),
        )
        .route("/health", get(health))
        .merge(protected)
        .fallback(|req: Request| async move {
            ApiError::not_found(format!(
                "no route for {} {}",
                req.method(),
                req.uri().path()
            ))
        })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts chat-completion responses by status (401s included).
async fn count(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let chat = req.uri().path() == "/v1/chat/completions";
    let resp = next.run(req).await;
    if chat {
        st.shared.metrics.request(resp.status().as_u16());
    }
    resp
}

/// With a key: `Authorization: Bearer <key>` (compared in constant time) or 401.
async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| {
            g.len() == key.len()
                && g.bytes()
                    .zip(key.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(st): State<AppState>) -> Response {
    if st.shared.stopping.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "stopping"})),
        )
            .into_response();
    }
    match st.shared.model.get() {
        Some(m) => axum::Json(json!({"status": "ok", "model": m.id})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

fn loading() -> ApiError {
    ApiError::unavailable(
        "loading",
        "the model is still loading; retry when GET /health is 200",
    )
}

async fn models(State(st): State<AppState>) -> Result<Response, ApiError> {
    let m = st.shared.model.get().ok_or_else(loading)?;
    Ok(axum::Json(openai::models(&m.id, m.created)).into_response())
}

async fn metrics(State(st): State<AppState>) -> Response {
    let s = &st.shared;
    let info = s.model.get();
    let text = s.metrics.render(&crate::metrics::Gauges {
        ready: info.is_some(),
        queue_depth: s.queue_depth.load(Ordering::Relaxed),
        queue_capacity: s.queue_capacity,
        frames_captured: s
            .camera
            .as_ref()
            .map(|c| c.captured.load(Ordering::Relaxed)),
        model: info.map(|m| [m.id.as_str(), &m.kv_policy, &m.provider, &m.decoder]),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn frame_jpeg(State(st): State<AppState>) -> Result<Response, ApiError> {
    let camera = st.shared.camera.clone().ok_or_else(|| {
        ApiError::not_found("no frame source: start the server with --source URI")
    })?;
    let jpeg = tokio::task::spawn_blocking(move || camera.latest_jpeg())
        .await
        .map_err(|e| ApiError::internal(format!("encoding the frame: {e}")))?;
    match jpeg {
        None => Err(ApiError::unavailable(
            "no_frame",
            "the camera has no frame yet",
        )),
        Some(Err(e)) => Err(ApiError::internal(format!(
            "encoding the frame as JPEG: {e}"
        ))),
        Some(Ok((index, bytes))) => {
            let mut resp = Response::new(Body::from(bytes.as_ref().clone()));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Ok(v) = HeaderValue::from_str(&index.to_string()) {
                h.insert("x-frame-index", v);
            }
            Ok(resp)
        }
    }
}

async fn status(State(st): State<AppState>) -> Response {
    let s = &st.shared;
    let m = s.model.get();
    let camera = s.camera.as_ref().map(|c| {
        json!({
            "uri": c.uri,
            "frame": c.latest().map(|f| f.index),
            "captured": c.captured.load(Ordering::Relaxed),
            "windowed": s.metrics.frames_windowed.load(Ordering::Relaxed),
            "dropped": s.metrics.frames_dropped.load(Ordering::Relaxed),
            "window_frames": s.metrics.window_frames.load(Ordering::Relaxed),
            "stopped": c.status(),
        })
    });
    let kv = s.metrics.kv();
    axum::Json(json!({
        "ready": m.is_some(),
        "model": m.map(|m| &m.id),
        "kv_policy": m.map(|m| &m.kv_policy),
        "encoder_provider": m.map(|m| &m.provider),
        "decoder": m.map(|m| &m.decoder),
        "camera": camera,
        "standing": *s.standing_lock(),
        "standing_questions": s.standing_questions,
        "kv": { "bytes": kv.total_bytes, "fp16_equivalent_bytes": kv.fp16_equivalent_bytes },
        "queue": { "depth": s.queue_depth.load(Ordering::Relaxed), "capacity": s.queue_capacity },
        "history": s.history(),
    }))
    .into_response()
}

/// Sets the job's cancel flag when dropped: the handler's future (client gone before the
/// answer) or the SSE stream (client gone mid-stream).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads the body under the size limit: 413 past it.
async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(
            None,
            format!(
                "the request body is over {limit} bytes (4 images of --max-image-bytes in base64, \
                 plus 1 MiB)"
            ),
        )
    };
    if let Some(n) = content_length(req.headers())
        && n > limit as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.to_string().contains("length limit exceeded") {
                    return too_large();
                }
                source = s.source();
            }
            ApiError::invalid(
                "body",
                "unreadable_body",
                format!("reading the request body: {e}"),
            )
        })
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

async fn chat(State(st): State<AppState>, req: Request) -> Response {
    match chat_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(st: AppState, req: Request) -> Result<Response, ApiError> {
    let started = Instant::now();
    let deadline = started + st.timeout;
    let body = read_body(req, st.max_request_bytes).await?;
    let info = st.shared.model.get().ok_or_else(loading)?.clone();
    if st.shared.stopping.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable(
            "shutting_down",
            "the server is stopping",
        ));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "body",
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let request = openai::parse(
        &value,
        &openai::Limits {
            model: &info.id,
            max_tokens: info.max_tokens,
            sampling: &info.sampling,
            max_image_bytes: st.max_image_bytes,
            max_images: crate::MAX_IMAGES,
        },
    )?;
    let images = images(&st, &request).await?;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    let job = Job {
        question: request.question.clone(),
        images,
        max_tokens: request.max_tokens,
        stop: request.stop.clone(),
        sampling: request.sampling.clone(),
        cancel,
        deadline,
        enqueued: Instant::now(),
        events: events_tx,
    };
    st.shared.queue_depth.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = st.tx.try_send(job) {
        st.shared.queue_depth.fetch_sub(1, Ordering::Relaxed);
        return Err(match e {
            TrySendError::Full(_) => {
                ApiError::queue_full(st.shared.queue_capacity, st.shared.retry_after())
            }
            TrySendError::Disconnected(_) => {
                ApiError::unavailable("shutting_down", "the server is stopping")
            }
        });
    }
    let deadline = tokio::time::Instant::from_std(deadline);
    let timeout_s = st.timeout.as_secs_f64();
    // The first event: the prompt ran (or the request failed): the status is known.
    let frames = match tokio::time::timeout_at(deadline, events.recv()).await {
        Err(_) => return Err(ApiError::timeout(timeout_s)),
        Ok(None) => return Err(ApiError::internal("the model worker dropped the request")),
        Ok(Some(Event::Failed(e))) => return Err(e),
        Ok(Some(Event::Started { frames })) => frames,
        Ok(Some(_)) => return Err(ApiError::internal("the model worker answered out of order")),
    };
    let id = format!(
        "chatcmpl-{}-{}",
        info.created,
        st.ids.fetch_add(1, Ordering::Relaxed)
    );
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ctx = Answer {
        id,
        created,
        model: info.id.clone(),
        frames,
        include_usage: request.include_usage,
        timeout_s,
    };
    if request.stream {
        return Ok(stream_response(ctx, events, deadline, guard));
    }
    let mut text = String::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Err(ApiError::timeout(timeout_s)),
            Ok(None) => return Err(ApiError::internal("the model worker dropped the request")),
            Ok(Some(Event::Token(t))) => text.push_str(&t),
            Ok(Some(Event::Failed(e))) => return Err(e),
            Ok(Some(Event::Started { .. })) => {}
            Ok(Some(Event::Done(done))) => {
                drop(guard);
                return Ok(axum::Json(openai::completion(
                    &ctx.id,
                    ctx.created,
                    &ctx.model,
                    &text,
                    done.finish,
                    done.usage,
                    extra(&done),
                ))
                .into_response());
            }
        }
    }
}

/// The response's `jetvlm` object: the frames asked about and the answer's timings.
fn extra(done: &worker::Done) -> Value {
    json!({
        "frames": done.frames,
        "ttft_ms": done.ttft_ms,
        "tpot_ms": done.tpot_ms,
        "kv_bytes": done.kv.total_bytes,
        "kv_fp16_equivalent_bytes": done.kv.fp16_equivalent_bytes,
    })
}

/// Decodes the request's `data:` images (off the async threads); camera references need
/// `--source`.
async fn images(st: &AppState, request: &ChatRequest) -> Result<Images, ApiError> {
    let mut data = Vec::new();
    for r in &request.images {
        match r {
            ImageRef::Data { param, bytes } => data.push((param.clone(), bytes.clone())),
            camera_ref => {
                if st.shared.camera.is_none() {
                    return Err(ApiError::invalid(
                        "messages",
                        "no_camera",
                        "camera://latest and camera://window need a frame source: start the \
                         server with --source URI",
                    ));
                }
                return Ok(match camera_ref {
                    ImageRef::CameraWindow => Images::CameraWindow,
                    _ => Images::CameraLatest,
                });
            }
        }
    }
    let limits = st.image_limits;
    let frames = tokio::task::spawn_blocking(move || {
        data.iter()
            .enumerate()
            .map(|(i, (param, bytes))| crate::image::decode(bytes, param, &limits, i as u64))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("decoding images: {e}")))??;
    Ok(Images::Frames(frames))
}

/// What every chunk of an answer repeats.
struct Answer {
    id: String,
    created: u64,
    model: String,
    frames: Vec<u64>,
    include_usage: bool,
    timeout_s: f64,
}

/// The SSE stream: a role chunk, content chunks, a finish chunk (and a usage chunk when
/// asked), `[DONE]`. An error after the stream began is sent as `data: {"error": ...}`.
fn stream_response(
    ctx: Answer,
    events: UnboundedReceiver<Event>,
    deadline: tokio::time::Instant,
    guard: CancelOnDrop,
) -> Response {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut first = VecDeque::new();
    first.push_back(data(openai::chunk(
        &ctx.id,
        ctx.created,
        &ctx.model,
        json!({"role": "assistant", "content": ""}),
        None,
    )));
    struct S {
        ctx: Answer,
        events: UnboundedReceiver<Event>,
        pending: VecDeque<SseEvent>,
        ended: bool,
        _guard: CancelOnDrop,
    }
    let state = S {
        ctx,
        events,
        pending: first,
        ended: false,
        _guard: guard,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.ended {
                return None;
            }
            let c = &s.ctx;
            let done = |s: &mut S, v: Option<Value>| {
                if let Some(v) = v {
                    s.pending.push_back(data(v));
                }
                s.pending.push_back(SseEvent::default().data("[DONE]"));
                s.ended = true;
            };
            match tokio::time::timeout_at(deadline, s.events.recv()).await {
                Err(_) => {
                    let e = ApiError::timeout(c.timeout_s).body();
                    done(&mut s, Some(e));
                }
                Ok(None) => {
                    let e = ApiError::internal("the model worker dropped the request").body();
                    done(&mut s, Some(e));
                }
                Ok(Some(Event::Started { .. })) => {}
                Ok(Some(Event::Token(t))) => {
                    let v = openai::chunk(&c.id, c.created, &c.model, json!({"content": t}), None);
                    s.pending.push_back(data(v));
                }
                Ok(Some(Event::Failed(e))) => done(&mut s, Some(e.body())),
                Ok(Some(Event::Done(d))) => {
                    let fin = openai::chunk(&c.id, c.created, &c.model, json!({}), Some(d.finish));
                    s.pending.push_back(data(fin));
                    let usage = c.include_usage.then(|| {
                        let mut e = extra(&d);
                        e["frames"] = json!(c.frames);
                        openai::usage_chunk(&c.id, c.created, &c.model, d.usage, e)
                    });
                    done(&mut s, usage);
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
