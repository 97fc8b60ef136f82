//! `tokenizer.json` through the `tokenizers` crate, the chat template of
//! `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`) rendered with
//! minijinja, special and stop tokens from the config files, and an incremental
//! detokenizer that only ever emits complete UTF-8 text.

use crate::error::{DecoderError, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One chat message for the template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    template: Option<(String, PathBuf)>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    stop_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| DecoderError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DecoderError::Tokenizer {
            path: path.into(),
            source: e.into(),
        })
}

/// A special token written as a string or as `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (required) and, when present, `tokenizer_config.json`,
    /// `chat_template.jinja` / `chat_template.json`, `generation_config.json` and
    /// `config.json` (for stop tokens).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| DecoderError::Io {
            path: path.clone(),
            source,
        })?;
        // The JSON is parsed in full first (syntax, UTF-8, escapes): `tokenizers` panics (an
        // `expect` in its decoder section's deserializer) on some damaged files, e.g. one cut
        // off inside `decoder` or with a byte that is not UTF-8 there.
        serde_json::from_slice::<Value>(&bytes).map_err(|e| DecoderError::Tokenizer {
            path: path.clone(),
            source: Box::new(e),
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|source| {
            DecoderError::Tokenizer {
                path: path.clone(),
                source,
            }
        })?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json(&tc_path)?;
        let mut template = None;
        if let Some(t) = tc.as_ref().and_then(|t| t.get("chat_template")) {
            let src = match t {
                Value::String(s) => Some(s.clone()),
                // A list of named templates: the one named "default", else the first.
                Value::Array(a) => a
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| a.first())
                    .and_then(|e| e.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            template = src.map(|s| (s, tc_path.clone()));
        }
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.is_file() {
            let s = std::fs::read_to_string(&jinja).map_err(|source| DecoderError::Io {
                path: jinja.clone(),
                source,
            })?;
            template = Some((s, jinja));
        }
        let ctj = dir.join("chat_template.json");
        if template.is_none()
            && let Some(v) = read_json(&ctj)?
            && let Some(s) = v.get("chat_template").and_then(Value::as_str)
        {
            template = Some((s.to_string(), ctj));
        }

        let bos_token = token_string(tc.as_ref().and_then(|t| t.get("bos_token")));
        let eos_token = token_string(tc.as_ref().and_then(|t| t.get("eos_token")));
        let mut stop: BTreeSet<u32> = BTreeSet::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            stop.insert(id);
        }
        if let Some(g) = read_json(&dir.join("generation_config.json"))? {
            stop.extend(id_list(g.get("eos_token_id")));
        }
        // config.json may be absent next to a tokenizer; a malformed one is the model
        // loader's error to report, so only its eos ids are read here.
        if let Ok(Some(c)) = read_json(&dir.join("config.json")) {
            stop.extend(id_list(c.get("eos_token_id")));
            stop.extend(id_list(
                c.get("text_config").and_then(|t| t.get("eos_token_id")),
            ));
        }
        Ok(Tokenizer {
            inner,
            path,
            template,
            bos_token,
            eos_token,
            stop_ids: stop.into_iter().collect(),
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special` applies the tokenizer's post-processor (BOS etc.).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner
                .encode(text, add_special)
                .map_err(|source| DecoderError::Tokenize {
                    op: "encode",
                    source,
                })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|source| DecoderError::Tokenize {
                op: "decode",
                source,
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Ids that end generation: the EOS token and every `eos_token_id` of
    /// `generation_config.json` and `config.json`.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders the chat template (Hugging Face semantics: `trim_blocks`, `lstrip_blocks`,
    /// `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some((src, path)) = &self.template else {
            return Err(DecoderError::ChatTemplate {
                path: self.path.with_file_name("tokenizer_config.json"),
                msg: "the model has no chat template".into(),
            });
        };
        let err = |e: minijinja::Error| DecoderError::ChatTemplate {
            path: path.clone(),
            msg: format!("{e:#}"),
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let tmpl = env.template_from_str(src).map_err(err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(err)
    }

    /// Ids of the rendered chat (special tokens in the text are parsed, none are added, as
    /// Hugging Face's `apply_chat_template(tokenize=True)` does).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn incremental(&self, skip_special: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder {
            tok: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special,
        }
    }
}

/// Turns a stream of token ids into text pieces. A piece is emitted only once it decodes to
/// complete characters (no U+FFFD from a half-received multi-byte sequence), and pieces
/// concatenate to the decoding of the whole sequence.
pub struct IncrementalDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special: bool,
}

impl IncrementalDecoder<'_> {
    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self
            .tok
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = self
            .tok
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = match now.get(before.len()..) {
                Some(p) if now.starts_with(&before) => p.to_string(),
                _ => {
                    // The decoder rewrote earlier text (rare space clean-up): emit what
                    // follows the common prefix.
                    let common = now
                        .char_indices()
                        .zip(before.chars())
                        .take_while(|((_, a), b)| a == b)
                        .count();
                    now.chars().skip(common).collect()
                }
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the end of the stream).
    pub fn flush(&mut self) -> Result<String> {
        let before = self
            .tok
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = self
            .tok
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `tokenizer` fuzz target: a file damaged inside its `decoder` section
    /// made `tokenizers` panic instead of returning an error.
    #[test]
    fn damaged_decoder_section_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            &b"{\"decoder\": [1,}"[..],
            b"{\"decoder\": {\"type\": \"a\x01b\"}}",
            b"{\"decoder\": {\"add_p\xfeefix_space\": true}}",
            b"{\"decoder\": {\"type\": \"\\udc00\"}}",
        ] {
            std::fs::write(dir.path().join("tokenizer.json"), text).unwrap();
            let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("tokenizer.json") && err.contains("line 1"),
                "{err}"
            );
        }
    }
}
