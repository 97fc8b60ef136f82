//! jetvlm-runtime: the API apps are built on. Camera frames and text become one decoder
//! context on the mixed-precision KV cache.
//!
//! - [`Pipeline`]: `Pipeline::load(dir, RuntimeConfig)` validates and loads a model package;
//!   `pipeline.ask(&frames, question)` streams an answer ([`TokenStream`] of [`Token`]s)
//!   ending in an [`Answer`] with its [`Stats`] (encoder ms, prefill ms, TTFT, TPOT, KV
//!   bytes by precision ([`KvStats`]), execution provider).
//! - [`StreamSession`]: `pipeline.session()`: the system prompt and a rolling window of the
//!   last N frames kept in the cache, oldest frame evicted as new ones arrive
//!   ([`StreamSession::push_frame`], [`StreamSession::capture_from`]); many questions per
//!   window ([`StreamSession::ask`]). [`StreamSession::park`] sets a session aside with its
//!   own cache ([`ParkedSession`]) and [`Pipeline::resume`] takes it up again, so one loaded
//!   model serves several cameras.
//! - [`RuntimeConfig`]: KV policy, generation ([`Sampling`]), window, device, ONNX Runtime
//!   (YAML-loadable).
//! - [`RuntimeError`]: the one error type; the crate it came from is kept as its source.
//!
//! Inside: `prompt` lays the manifest's template out as ordered text and frame parts;
//! `tiles` cuts a frame into the tiles of a package that splits frames (`vision.tiles`);
//! `cache` puts the mixed KV cache and the exact f32 reference behind one interface;
//! `device` runs the decoder on a GPU (`device: cuda`, feature `cuda`) or on the simulated
//! device (`device: sim`).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use jetvlm_runtime::{Pipeline, RuntimeConfig};
//!
//! let mut pipeline = Pipeline::load("models/demo".as_ref(), RuntimeConfig::default())?;
//! let mut camera = jetvlm_camera::open("synthetic://scene?seed=3&pace=0")?;
//! let timeout = std::time::Duration::from_secs(1);
//! if let jetvlm_camera::Capture::Frame(frame) = camera.capture(timeout)? {
//!     let answer = pipeline.ask(&[frame], "how many objects are there?")?.finish()?;
//!     let (ttft, kv) = (answer.stats.ttft_ms, answer.stats.kv.total_bytes);
//!     println!("{} (TTFT {ttft:.1} ms, KV {kv} B)", answer.text);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! A complete walk-through (memory plan, streamed answer, camera session):
//! `sdk/runtime/examples/ask.rs`.

mod cache;
mod config;
mod device;
mod error;
mod pipeline;
mod prompt;
mod session;
mod tiles;

pub use cache::KvStats;
pub use config::{RuntimeConfig, Sampling};
pub use error::RuntimeError;
pub use pipeline::{Answer, Pipeline, Stats, Token, TokenStream};
pub use session::{CachedFrame, ParkedSession, SessionCapture, StreamSession};
