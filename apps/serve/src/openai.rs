//! The OpenAI chat-completions request, read field by field so every refusal names its
//! field (`param`), and the response and stream-chunk bodies.

use crate::error::ApiError;
use crate::image::{self, ImageRef};
use jetvlm_runtime::Sampling;
use serde_json::{Map, Value, json};

/// Most `stop` strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// What the server needs from a chat-completions request.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// `max_tokens` (or `max_completion_tokens`), checked against the server's limit.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The question: the text parts of the last user message.
    pub question: String,
    /// Its image parts, in order.
    pub images: Vec<ImageRef>,
    /// The sampling of this answer: the configured one with the request's `temperature`,
    /// `top_p` and `seed` in their place.
    pub sampling: Sampling,
}

/// What a request is checked against.
#[derive(Clone, Debug)]
pub struct Limits<'a> {
    /// The model id requests must name.
    pub model: &'a str,
    /// Most tokens per answer (the runtime config's `max_new_tokens`).
    pub max_tokens: usize,
    /// The configured sampling (the runtime config's); a request's `temperature`, `top_p`
    /// and `seed` replace its fields for that request.
    pub sampling: &'a Sampling,
    /// Most decoded bytes per image.
    pub max_image_bytes: usize,
    /// Most images per request.
    pub max_images: usize,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, "invalid_value", message)
}

/// Reads a request body already parsed as JSON.
pub fn parse(body: &Value, limits: &Limits<'_>) -> Result<ChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("body", "the request body must be a JSON object"))?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("model", "`model` (a string) is required"))?;
    if model != limits.model {
        return Err(ApiError::invalid(
            "model",
            "model_not_found",
            format!(
                "model `{model}` is not served here; this server serves `{}` (GET /v1/models)",
                limits.model
            ),
        ));
    }
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|_| invalid("stream_options.include_usage", "must be a boolean"))?
            .unwrap_or(false),
        Some(_) => return Err(invalid("stream_options", "must be an object")),
    };
    let max_tokens = match (
        opt_u64(obj, "max_completion_tokens")?,
        opt_u64(obj, "max_tokens")?,
    ) {
        (Some(n), _) => check_max_tokens("max_completion_tokens", n, limits.max_tokens)?,
        (None, Some(n)) => check_max_tokens("max_tokens", n, limits.max_tokens)?,
        (None, None) => limits.max_tokens,
    };
    if let Some(n) = opt_u64(obj, "n")?
        && n != 1
    {
        return Err(invalid(
            "n",
            format!("n = {n}: this server gives one choice"),
        ));
    }
    let sampling = read_sampling(obj, limits.sampling)?;
    for (key, what) in [
        ("tools", "tool calls"),
        ("functions", "function calls"),
        ("logprobs", "log probabilities"),
    ] {
        match obj.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(invalid(
                    key,
                    format!("{what} are not supported by this server"),
                ));
            }
        }
    }
    if let Some(rf) = obj.get("response_format")
        && !rf.is_null()
        && rf.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(invalid(
            "response_format",
            "only the `text` response format is supported",
        ));
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(&format!("stop[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("stop", "must be a string or an array of strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(invalid(
            "stop",
            format!("{} stop strings: at most {MAX_STOP}", stop.len()),
        ));
    }
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(invalid(&format!("stop[{i}]"), "an empty stop string"));
    }
    let (question, images) = read_messages(obj.get("messages"), limits)?;
    Ok(ChatRequest {
        stream,
        include_usage,
        max_tokens,
        stop,
        question,
        images,
        sampling,
    })
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(key, "must be a boolean")),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(key, "must be a non-negative integer")),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(key, "must be a number")),
    }
}

fn check_max_tokens(param: &str, n: u64, max: usize) -> Result<usize, ApiError> {
    if n == 0 || n > max as u64 {
        return Err(invalid(
            param,
            format!(
                "{param} = {n}: must lie in 1..={max} (max_new_tokens of the server's runtime config)"
            ),
        ));
    }
    Ok(n as usize)
}

/// OpenAI's largest `temperature`.
pub const MAX_TEMPERATURE: f64 = 2.0;

/// The configured sampling with the request's `temperature` (0..=2, OpenAI's range; 0 is
/// greedy), `top_p` and `seed` (an integer; a negative one is taken as its two's complement)
/// in their place, checked by the runtime's own sampling checks (`top_p` in (0, 1]).
fn read_sampling(obj: &Map<String, Value>, configured: &Sampling) -> Result<Sampling, ApiError> {
    let mut s = configured.clone();
    if let Some(t) = opt_f64(obj, "temperature")? {
        if !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(invalid(
                "temperature",
                format!("temperature = {t}: must lie in 0..={MAX_TEMPERATURE} (0 is greedy)"),
            ));
        }
        s.temperature = t as f32;
    }
    if let Some(p) = opt_f64(obj, "top_p")? {
        s.top_p = p as f32;
    }
    match obj.get("seed") {
        None | Some(Value::Null) => {}
        Some(v) => {
            s.seed = v
                .as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| invalid("seed", "must be an integer"))?;
        }
    }
    match s.to_sampler().validate() {
        Ok(()) => Ok(s),
        Err(e @ jetvlm_decoder::DecoderError::Sampling { field, .. }) => {
            Err(invalid(field, e.to_string()))
        }
        Err(e) => Err(invalid("body", e.to_string())),
    }
}

/// The question (the last user message's text parts, joined by newlines) and its images.
/// System messages are accepted and not used (the package's prompt template is the system
/// prompt); earlier turns are refused: the model answers one question.
fn read_messages(
    messages: Option<&Value>,
    limits: &Limits<'_>,
) -> Result<(String, Vec<ImageRef>), ApiError> {
    let messages = messages
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages", "`messages` (an array) is required"))?;
    let mut user = None;
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&format!("messages[{i}].role"), "a role string is required"))?;
        match role {
            "system" | "developer" => {}
            "user" if user.is_none() => user = Some(i),
            "user" | "assistant" | "tool" | "function" => {
                return Err(invalid(
                    &format!("messages[{i}]"),
                    "this model answers one question: send system messages and one user \
                     message, no earlier turns",
                ));
            }
            other => {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{other}`"),
                ));
            }
        }
    }
    let i = user.ok_or_else(|| invalid("messages", "no user message"))?;
    let content = messages[i].get("content");
    let mut texts = Vec::new();
    let mut images = Vec::new();
    match content {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let at = format!("messages[{i}].content[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(
                        part.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| invalid(&format!("{at}.text"), "must be a string"))?
                            .to_string(),
                    ),
                    Some("image_url") => {
                        let param = format!("{at}.image_url.url");
                        // `image_url` is an object with `url` (or, in older clients, the URL).
                        let url = match part.get("image_url") {
                            Some(Value::String(s)) => s.as_str(),
                            Some(Value::Object(o)) => o
                                .get("url")
                                .and_then(Value::as_str)
                                .ok_or_else(|| invalid(&param, "must be a string"))?,
                            _ => return Err(invalid(&format!("{at}.image_url"), "is required")),
                        };
                        images.push(image::parse_url(url, &param, limits.max_image_bytes)?);
                    }
                    Some(other) => {
                        return Err(invalid(
                            &format!("{at}.type"),
                            format!(
                                "content part type `{other}`: text and image_url are supported"
                            ),
                        ));
                    }
                    None => return Err(invalid(&format!("{at}.type"), "is required")),
                }
            }
        }
        _ => {
            return Err(invalid(
                &format!("messages[{i}].content"),
                "must be a string or an array of content parts",
            ));
        }
    }
    let question = texts.join("\n").trim().to_string();
    if question.is_empty() {
        return Err(invalid(
            &format!("messages[{i}].content"),
            "the user message has no text: ask a question",
        ));
    }
    let camera = images
        .iter()
        .filter(|r| !matches!(r, ImageRef::Data { .. }))
        .count();
    if camera > 0 && images.len() > 1 {
        return Err(invalid(
            &format!("messages[{i}].content"),
            "a camera reference (camera://latest, camera://window) must be the request's only image",
        ));
    }
    if images.len() > limits.max_images {
        return Err(invalid(
            &format!("messages[{i}].content"),
            format!(
                "{} images: at most {} per request",
                images.len(),
                limits.max_images
            ),
        ));
    }
    Ok((question, images))
}

/// Why an answer ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Token counts of an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Prompt tokens, frames included.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens that were already in the KV cache (the window's frames and the prefix
    /// for `camera://window`).
    pub cached_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
        })
    }
}

/// A non-streamed answer.
pub fn completion(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: Finish,
    usage: Usage,
    extra: Value,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": finish.as_str(),
        }],
        "usage": usage.to_json(),
        "jetvlm": extra,
    })
}

/// One stream chunk with a delta (`{"role": ...}`, `{"content": ...}` or `{}`).
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<Finish>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish.map(Finish::as_str),
        }],
    })
}

/// The last chunk of a stream with `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: Usage, extra: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.to_json(),
        "jetvlm": extra,
    })
}

/// `GET /v1/models`.
pub fn models(model: &str, created: u64) -> Value {
    json!({
        "object": "list",
        "data": [{ "id": model, "object": "model", "created": created, "owned_by": "jetvlm" }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(s: &Sampling) -> Limits<'_> {
        Limits {
            model: "demo",
            max_tokens: 16,
            sampling: s,
            max_image_bytes: 1 << 20,
            max_images: 4,
        }
    }

    fn req(extra: Value) -> Value {
        let mut v =
            json!({"model": "demo", "messages": [{"role": "user", "content": "how many?"}]});
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }

    #[test]
    fn a_plain_request_reads_with_the_server_defaults() {
        let s = Sampling::default();
        let r = parse(&req(json!({})), &limits(&s)).unwrap();
        assert_eq!(r.question, "how many?");
        assert_eq!((r.max_tokens, r.stream, r.images.len()), (16, false, 0));
        let r = parse(
            &req(
                json!({"max_tokens": 3, "stop": "x", "stream": true, "temperature": 0, "seed": 9}),
            ),
            &limits(&s),
        )
        .unwrap();
        assert_eq!(
            (r.max_tokens, r.stop, r.stream),
            (3, vec!["x".into()], true)
        );
    }

    #[test]
    fn refusals_name_their_field() {
        let s = Sampling::default();
        let cases = [
            (json!({"model": "other"}), "model"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 17}), "max_tokens"),
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"n": 2}), "n"),
            (json!({"stop": ["a", 3]}), "stop[1]"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                "messages[1]",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "q"}]}]}),
                "messages[0].content[0].image_url.url",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "  "}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "camera://latest"}},
                {"type": "image_url", "image_url": {"url": "camera://window"}},
                {"type": "text", "text": "q"}]}]}),
                "messages[0].content",
            ),
        ];
        for (extra, param) in cases {
            let e = parse(&req(extra.clone()), &limits(&s)).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{extra}");
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
            let body = e.body();
            assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
        }
    }

    #[test]
    fn request_sampling_replaces_the_configured_one_within_openais_ranges() {
        let configured = Sampling {
            temperature: 0.7,
            top_k: 40,
            seed: 3,
            ..Sampling::default()
        };
        // Nothing asked: the configured sampling.
        let r = parse(&req(json!({})), &limits(&configured)).unwrap();
        assert_eq!(r.sampling, configured);
        // Asked fields replace the configured ones; the others stay.
        let r = parse(
            &req(json!({"temperature": 1.5, "top_p": 0.5, "seed": 9})),
            &limits(&configured),
        )
        .unwrap();
        assert_eq!(
            r.sampling,
            Sampling {
                temperature: 1.5,
                top_p: 0.5,
                seed: 9,
                ..configured.clone()
            }
        );
        let r = parse(&req(json!({"temperature": 0})), &limits(&configured)).unwrap();
        assert_eq!(r.sampling.temperature, 0.0);
        let r = parse(
            &req(json!({"temperature": 2, "seed": -1})),
            &limits(&configured),
        )
        .unwrap();
        assert_eq!((r.sampling.temperature, r.sampling.seed), (2.0, u64::MAX));
        for (extra, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"temperature": -1}), "temperature"),
            (json!({"temperature": 2.0001}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_p": -0.5}), "top_p"),
            (json!({"seed": 1.5}), "seed"),
            (json!({"seed": "7"}), "seed"),
        ] {
            let e = parse(&req(extra.clone()), &limits(&configured)).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{extra}");
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn camera_parts_and_text_parts_combine() {
        let s = Sampling::default();
        let r = parse(
            &req(json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "how many"},
                    {"type": "image_url", "image_url": {"url": "camera://window"}},
                    {"type": "text", "text": "objects?"}]}]})),
            &limits(&s),
        )
        .unwrap();
        assert_eq!(r.question, "how many\nobjects?");
        assert_eq!(r.images, vec![ImageRef::CameraWindow]);
    }
}
