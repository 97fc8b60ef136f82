//! jetvlm-runtime: the API apps are built on. Camera frames and text become one decoder
//! context on the mixed-precision KV cache.
//!
//! - [`Pipeline`]: `Pipeline::load(dir, RuntimeConfig)` validates and loads a model package;
//!   `pipeline.ask(&frames, question)` streams an answer ([`TokenStream`]) ending in
//!   [`Stats`] (encoder ms, prefill ms, TTFT, TPOT, KV bytes by precision, execution
//!   provider).
//! - [`StreamSession`]: the system prompt and a rolling window of the last N frames kept
//!   in the cache, oldest frame evicted as new ones arrive; many questions per window.
//! - [`RuntimeConfig`]: KV policy, generation, window, ONNX Runtime (YAML-loadable).
//! - [`prompt`]: the manifest's template as ordered text and frame parts.
//! - [`cache`]: the mixed KV cache or the exact f32 reference behind one interface.

pub mod cache;
mod config;
mod device;
mod error;
mod pipeline;
pub mod prompt;
mod session;

pub use cache::{KvChoice, KvStats};
pub use config::{RuntimeConfig, Sampling};
pub use error::RuntimeError;
pub use pipeline::{Answer, Pipeline, Stats, Token, TokenStream};
pub use session::{CachedFrame, SessionCapture, StreamSession};
