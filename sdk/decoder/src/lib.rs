//! jetvlm-decoder: the language half of a VLM, read from the Hugging Face files users have.
//!
//! - [`arch`]: the architecture written once for every backend: tensor names
//!   ([`arch::load`]), the layer recipe ([`arch::run_layers`]) over [`arch::LayerOps`].
//! - [`config`]: `config.json` -> validated [`Config`] (Llama, Mistral, Qwen2; GQA, RoPE
//!   default / linear / llama3, tied embeddings, Qwen2 q/k/v biases).
//! - [`weights`]: memory-mapped safetensors (single file or sharded), F32 / F16 / BF16 kept
//!   in their stored type.
//! - [`kernels`]: matrix-vector (decode) and matrix-matrix (prefill) products that convert
//!   F16/BF16 in the kernel, RMSNorm, SwiGLU, RoPE; each with a reference twin.
//!   Weight-only INT8/INT4 matrices (`jetvlm quantize`) run integer products with the
//!   activations quantized to INT8 per block of 32: decode's matrix-vector rows and
//!   prefill's tiled GEMM (`qgemm`).
//! - [`quantize`]: a decoder's layer matrices written INT8/INT4 (`jetvlm quantize`).
//! - [`import`]: AWQ, GPTQ and GGUF checkpoints converted to that layout.
//! - [`kv`]: the KV cache calls the forward pass makes ([`KvStore`], implemented by
//!   `jetvlm_kvcache::MixedKvCache`) and the exact [`F32KvCache`] reference.
//! - [`model`]: [`Model::load`] and [`Model::forward`] over spans of text ids and injected
//!   embeddings (camera frames), each span tagged Text or Frame for the cache.
//! - [`tokenizer`]: `tokenizer.json`, chat template, stop tokens, incremental detokenizer.
//! - [`salience`]: how much prefill attention each frame token receives, which picks the
//!   frame tokens the mixed cache keeps FP16 within its budget.
//! - [`sampler`]: greedy / temperature / top-k / top-p / repetition penalty, seeded.
//! - [`generate`]: the streaming generation iterator.

pub mod arch;
pub mod config;
pub mod error;
pub mod generate;
pub mod import;
pub mod kernels;
pub mod kv;
pub mod model;
pub mod profile;
mod qgemm;
mod qkernels;
pub mod quantize;
pub mod salience;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use config::Config;
pub use error::{DecoderError, Result};
pub use generate::{Decode, FinishReason, GenerateOptions, Generation, OnCpu, Step};
pub use kv::{F32KvCache, KvStore};
pub use model::{Input, LoadOptions, Logits, LogitsMode, Model};
pub use sampler::{Sampler, SamplerConfig};
pub use tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};
pub use weights::{QuantData, Tensor, TensorData, Weights};
