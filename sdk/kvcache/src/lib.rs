//! jetvlm-kvcache: the mixed-precision KV cache.
//!
//! Text tokens (system prompt, question, answer) are cached in FP16, camera-frame tokens in
//! INT4 (INT8 / INT2 optional), and attention reads both without materialising a
//! dequantized copy.
//!
//! - [`policy`]: [`KvPolicy`], which tokens stay FP16 and how the rest are quantized.
//! - [`cells`]: cell bookkeeping (position, kind, frame, block tables), plain CPU code.
//! - [`layout`], [`pool`]: block segment layouts and the two block pools (FP16, quantized).
//! - [`placement`]: the placement rules (precision, position, frame of every token) as a
//!   model both the CPU cache and the device block table are tested against.
//! - [`cache`]: [`MixedKvCache`], composing the two pools behind one interface.
//! - [`attention`]: fused CPU attention kernels and their f32 reference.

pub mod attention;
pub mod cache;
pub mod cells;
mod error;
pub mod layout;
pub mod placement;
pub mod policy;
pub mod pool;

pub use attention::Kernel;
pub use cache::{AttendMask, CacheShape, KvMemory, MixedKvCache};
pub use cells::Span;
pub use error::KvError;
pub use policy::{KeyMode, KvPolicy, LayerFormat, PolicyError};
