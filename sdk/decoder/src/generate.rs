//! The generation loop as an iterator: prefill the prompt, then sample a token, stream its
//! text, feed it back; stop on a stop token, a stop string or the token limit.

use crate::error::{DecoderError, Result};
use crate::kv::KvStore;
use crate::model::{Input, Logits, Model};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use serde::Serialize;

/// What ends a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Ids that end generation (usually the tokenizer's [`Tokenizer::stop_token_ids`]).
    pub stop_tokens: Vec<u32>,
    /// Texts that end generation; the text is cut before the stop string.
    pub stop_strings: Vec<String>,
    /// Leave special tokens out of the streamed text.
    pub skip_special: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampler: SamplerConfig::greedy(),
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            skip_special: true,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    StopToken,
    StopString,
    MaxTokens,
}

/// One generated token and the text it completes (possibly empty: a partial character, a
/// special token, or text held back while it could still begin a stop string).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub token: u32,
    pub text: String,
}

/// What a generation runs on: a decoder with its KV cache, on the CPU ([`OnCpu`]) or on a
/// device (the CUDA backend's session implements it).
pub trait Decode {
    type Error: From<DecoderError>;
    /// Feeds text tokens after what the backend holds and returns the logits of the last one.
    fn decode(&mut self, ids: &[u32]) -> std::result::Result<Logits, Self::Error>;
}

impl<D: Decode + ?Sized> Decode for Box<D> {
    type Error = D::Error;
    fn decode(&mut self, ids: &[u32]) -> std::result::Result<Logits, Self::Error> {
        (**self).decode(ids)
    }
}

/// The CPU decoder over a KV store.
pub struct OnCpu<'a, C: KvStore> {
    pub model: &'a Model,
    pub cache: &'a mut C,
}

impl<C: KvStore> Decode for OnCpu<'_, C> {
    type Error = DecoderError;
    fn decode(&mut self, ids: &[u32]) -> Result<Logits> {
        self.model.forward(&[Input::text(ids)], self.cache)
    }
}

/// A running generation over a decoder backend; iterate it for [`Step`]s.
pub struct Generation<'a, D: Decode> {
    backend: D,
    detok: Option<IncrementalDecoder<'a>>,
    sampler: Sampler,
    opts: GenerateOptions,
    history: Vec<u32>,
    generated: Vec<u32>,
    logits: Option<Logits>,
    /// The last sampled token, fed to the model on the next step.
    pending: Option<u32>,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
}

impl<'a, C: KvStore> Generation<'a, OnCpu<'a, C>> {
    /// Runs the prompt (prefill) on the CPU decoder and returns the generation, ready to
    /// sample its first token. `prompt_ids` feeds the repetition penalty (the prompt's text
    /// tokens).
    pub fn start(
        model: &'a Model,
        cache: &'a mut C,
        prompt: &[Input<'_>],
        prompt_ids: &[u32],
        tokenizer: Option<&'a Tokenizer>,
        opts: GenerateOptions,
    ) -> Result<Self> {
        let logits = model.forward(prompt, cache)?;
        Ok(Generation::resume(
            OnCpu { model, cache },
            logits,
            prompt_ids,
            tokenizer,
            opts,
        ))
    }
}

impl<'a, D: Decode> Generation<'a, D> {
    /// A generation on `backend` whose prompt has run already: `logits` are the prompt's
    /// last logits, `prompt_ids` feed the repetition penalty.
    pub fn resume(
        backend: D,
        logits: Logits,
        prompt_ids: &[u32],
        tokenizer: Option<&'a Tokenizer>,
        opts: GenerateOptions,
    ) -> Self {
        let detok = tokenizer.map(|t| t.incremental(opts.skip_special));
        Generation {
            backend,
            detok,
            sampler: Sampler::new(opts.sampler.clone()),
            opts,
            history: prompt_ids.to_vec(),
            generated: Vec::new(),
            logits: Some(logits),
            pending: None,
            text: String::new(),
            emitted: 0,
            finish: None,
        }
    }

    /// The backend (e.g. to read its cache once the generation is done).
    pub fn backend(&self) -> &D {
        &self.backend
    }

    /// Ids generated so far (a final stop token included).
    pub fn tokens(&self) -> &[u32] {
        &self.generated
    }

    /// Text generated so far, cut before a stop string.
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Feeds the last sampled token to the model, so the cache holds the whole answer
    /// (useful before asking a follow-up question on the same cache).
    pub fn feed_last(&mut self) -> std::result::Result<(), D::Error> {
        if let Some(t) = self.pending.take() {
            self.logits = Some(self.backend.decode(&[t])?);
        }
        Ok(())
    }

    fn step(&mut self) -> std::result::Result<Option<Step>, D::Error> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.generated.len() >= self.opts.max_tokens {
            self.finish = Some(FinishReason::MaxTokens);
            return Ok(None);
        }
        if let Some(t) = self.pending.take() {
            self.logits = Some(self.backend.decode(&[t])?);
        }
        let Some(logits) = self.logits.take() else {
            return Ok(None);
        };
        let token = self.sampler.sample(logits.last(), &self.history);
        self.history.push(token);
        self.generated.push(token);
        self.pending = Some(token);

        if self.opts.stop_tokens.contains(&token) {
            self.finish = Some(FinishReason::StopToken);
            let rest = self.flush_text()?;
            return Ok(Some(Step { token, text: rest }));
        }
        let mut piece = String::new();
        if let Some(d) = self.detok.as_mut() {
            let delta = d.push(token)?;
            self.text.push_str(&delta);
            piece = self.release_text();
        }
        if self.finish.is_none() && self.generated.len() >= self.opts.max_tokens {
            self.finish = Some(FinishReason::MaxTokens);
            piece.push_str(&self.flush_text()?);
        }
        Ok(Some(Step { token, text: piece }))
    }

    /// Emits text up to a stop string (finishing) or up to the longest tail that could
    /// still start one.
    fn release_text(&mut self) -> String {
        let search_from = self.emitted;
        for s in &self.opts.stop_strings {
            if s.is_empty() {
                continue;
            }
            if let Some(i) = self.text[search_from..].find(s.as_str()) {
                let cut = search_from + i;
                self.text.truncate(cut);
                self.finish = Some(FinishReason::StopString);
                let piece = self.text[self.emitted..cut].to_string();
                self.emitted = cut;
                return piece;
            }
        }
        let mut safe = self.text.len();
        for s in &self.opts.stop_strings {
            for p in (search_from..self.text.len()).rev() {
                if self.text.is_char_boundary(p) && s.starts_with(&self.text[p..]) {
                    safe = safe.min(p);
                }
            }
        }
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        piece
    }

    /// At the end: any held-back text (incomplete characters, stop-string prefixes).
    fn flush_text(&mut self) -> Result<String> {
        if let Some(d) = self.detok.as_mut() {
            let rest = d.flush()?;
            self.text.push_str(&rest);
        }
        let piece = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        Ok(piece)
    }
}

impl<D: Decode> Iterator for Generation<'_, D> {
    type Item = std::result::Result<Step, D::Error>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) => None,
            Err(e) => {
                self.finish = Some(FinishReason::MaxTokens);
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose next token is always the last fed token plus one; records what it
    /// was fed.
    struct Counting {
        fed: Vec<u32>,
        vocab: usize,
    }

    impl Counting {
        fn logits(&self, next: u32) -> Logits {
            let mut data = vec![0.0; self.vocab];
            data[next as usize % self.vocab] = 1.0;
            Logits {
                data,
                rows: 1,
                vocab: self.vocab,
            }
        }
    }

    impl Decode for Counting {
        type Error = DecoderError;
        fn decode(&mut self, ids: &[u32]) -> Result<Logits> {
            self.fed.extend_from_slice(ids);
            Ok(self.logits(ids[ids.len() - 1] + 1))
        }
    }

    #[test]
    fn resume_decodes_on_any_backend_until_a_stop_token() {
        let backend = Counting {
            fed: Vec::new(),
            vocab: 16,
        };
        let first = backend.logits(3);
        let opts = GenerateOptions {
            max_tokens: 10,
            stop_tokens: vec![6],
            ..GenerateOptions::default()
        };
        let mut g = Generation::resume(backend, first, &[1, 2], None, opts);
        let tokens: Vec<u32> = g.by_ref().map(|s| s.unwrap().token).collect();
        assert_eq!(tokens, [3, 4, 5, 6]);
        assert_eq!(g.finish_reason(), Some(FinishReason::StopToken));
        // The stop token is sampled but not fed until asked.
        assert_eq!(g.backend().fed, [3, 4, 5]);
        g.feed_last().unwrap();
        assert_eq!(g.backend().fed, [3, 4, 5, 6]);
    }

    #[test]
    fn boxed_backends_decode_too() {
        let backend: Box<dyn Decode<Error = DecoderError>> = Box::new(Counting {
            fed: Vec::new(),
            vocab: 8,
        });
        let first = Logits {
            data: vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            rows: 1,
            vocab: 8,
        };
        let opts = GenerateOptions {
            max_tokens: 3,
            ..GenerateOptions::default()
        };
        let tokens: Vec<u32> = Generation::resume(backend, first, &[], None, opts)
            .map(|s| s.unwrap().token)
            .collect();
        assert_eq!(tokens, [2, 3, 4]);
    }
}
