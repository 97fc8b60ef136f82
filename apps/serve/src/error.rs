//! The crate's error type ([`ServeError`], what stops the server) and the error a request
//! gets ([`ApiError`], an HTTP status with an OpenAI-style body).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::path::PathBuf;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A server option is out of range (names the flag).
    #[error("{flag}: {message}")]
    Option { flag: &'static str, message: String },
    /// Binding the listening socket failed.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// The HTTP server failed while running.
    #[error("serving HTTP on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    /// The model package did not load.
    #[error("loading model package {}: {source}", path.display())]
    Load {
        path: PathBuf,
        source: Box<jetvlm_runtime::RuntimeError>,
    },
    /// The frame source did not open.
    #[error("opening frame source {uri}: {source}")]
    Source {
        uri: String,
        source: jetvlm_camera::CameraError,
    },
    /// A thread or the async runtime could not start.
    #[error("starting {what}: {source}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
    /// The model worker stopped with an error.
    #[error("model worker: {0}")]
    Worker(String),
}

/// An error answered to a request: status, and the OpenAI body
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault (`messages[0].content[1].image_url.url`), when one is.
    pub param: Option<String>,
    /// A short machine-readable code (`invalid_json`, `model_not_found`, ...).
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 `invalid_request_error` naming the field at fault.
    pub fn invalid(
        param: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            param: Some(param.into()),
            code: Some(code),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 413: the request or one of its images is over a limit.
    pub fn too_large(param: Option<String>, message: impl Into<String>) -> Self {
        ApiError {
            param,
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
        }
    }

    /// 401 without (or with a wrong) bearer key.
    pub fn unauthorized() -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this server needs an API key: send `Authorization: Bearer <key>` (the key given \
                 with --api-key or JETVLM_API_KEY)",
            )
        }
    }

    /// 429: the queue is full.
    pub fn queue_full(capacity: usize, retry_after: u64) -> Self {
        ApiError {
            code: Some("queue_full"),
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the model's queue is full ({capacity} requests waiting); retry after {retry_after} s"
                ),
            )
        }
    }

    /// 503: the model is not loaded yet, the camera has no frame, or the server is stopping.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some(code),
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 504: the answer was not done within the per-request time limit.
    pub fn timeout(limit_s: f64) -> Self {
        ApiError {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                format!(
                    "the answer took longer than the request time limit of {limit_s} s (--request-timeout)"
                ),
            )
        }
    }

    /// 500: the model failed on this request.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("model_error"),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
        }
    }

    /// 404 for a path the server does not have.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", what)
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
