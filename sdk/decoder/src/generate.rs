//! The generation loop as an iterator: prefill the prompt, then sample a token, stream its
//! text, feed it back; stop on a stop token, a stop string or the token limit.

use crate::error::Result;
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

/// A running generation over a model and a cache; iterate it for [`Step`]s.
pub struct Generation<'a, C: KvStore> {
    model: &'a Model,
    cache: &'a mut C,
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

impl<'a, C: KvStore> Generation<'a, C> {
    /// Runs the prompt (prefill) and returns the generation, ready to sample its first
    /// token. `prompt_ids` feeds the repetition penalty (the prompt's text tokens).
    pub fn start(
        model: &'a Model,
        cache: &'a mut C,
        prompt: &[Input<'_>],
        prompt_ids: &[u32],
        tokenizer: Option<&'a Tokenizer>,
        opts: GenerateOptions,
    ) -> Result<Self> {
        let logits = model.forward(prompt, cache)?;
        let detok = tokenizer.map(|t| t.incremental(opts.skip_special));
        Ok(Generation {
            model,
            cache,
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
        })
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
    pub fn feed_last(&mut self) -> Result<()> {
        if let Some(t) = self.pending.take() {
            self.logits = Some(self.model.forward(&[Input::text(&[t])], self.cache)?);
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Step>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.generated.len() >= self.opts.max_tokens {
            self.finish = Some(FinishReason::MaxTokens);
            return Ok(None);
        }
        if let Some(t) = self.pending.take() {
            self.logits = Some(self.model.forward(&[Input::text(&[t])], self.cache)?);
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

impl<C: KvStore> Iterator for Generation<'_, C> {
    type Item = Result<Step>;
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
