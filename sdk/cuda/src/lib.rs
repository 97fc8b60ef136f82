//! jetvlm-cuda: the CUDA backend of jetvlm.
//!
//! - [`sources`]: the `.cu` kernel sources (embedded), compiled at run time with NVRTC for the
//!   device's exact SM; [`cache`]: the on-disk cache of compiled kernels.
//! - [`layout`]: the device KV pool layout (FP16 text blocks, INT2/4/8 frame blocks) shared by
//!   the kernels and their CPU twins in [`reference`](mod@reference).
//! - [`CudaDevice`]: context, stream, kernel registry and the kernels' launchers. Built with the
//!   `cuda` feature it drives the GPU through cudarc (dynamic loading: no CUDA library is needed
//!   to build); without it, [`CudaDevice::open`] returns [`CudaError::NotCompiledWithCuda`], so
//!   callers need no `cfg`.
//! - [`kvtable`]: block bookkeeping of the device KV cache (which pool block and slot each
//!   token goes to; the attention context list), host code tested against the CPU twins.
//! - [`gpu`]: [`Gpu`], the operations the device decoder launches, as one trait.
//!   [`CudaDevice`] runs them as CUDA kernels; [`SimDevice`] (the simulated device) runs each
//!   kernel's CPU twin on host buffers, so the device path runs and is tested without a GPU.
//! - [`decoder`]: written once over [`Gpu`]: [`DeviceDecoder`] (every family of
//!   `jetvlm_decoder::arch`: Llama, Qwen2, Qwen3 with M-RoPE or Qwen3-VL's interleaved M-RoPE
//!   and DeepStack, Gemma 3; weights from the Hugging Face files, uploaded chunk by chunk in
//!   their stored precision),
//!   [`DeviceKvCache`] (per-layer mixed pools in device memory, or offloaded to pinned host
//!   memory and streamed per layer over PCIe on a copy stream), [`DeviceSession::forward`]
//!   (prefill and decode).
//! - [`decoder_check`](mod@decoder_check): the device decoder's greedy tokens and logits
//!   against the CPU path on the decoder fixtures (on the GPU, or on [`SimDevice`] in tests).
//! - With the `cuda` feature, [`CudaDevice`] also has the benchmark helpers (`time_ms`,
//!   `measure_bandwidth`, `measure_pcie`).
//! - [`selftest`]: every kernel against its CPU twin on random and outlier-heavy inputs
//!   ([`inputs`]).
//! - [`meminfo`]: MemAvailable (what unified-memory planning uses) and [`DeviceInfo`].

pub mod cache;
mod checks;
pub mod decoder;
pub mod decoder_check;
mod error;
pub mod gpu;
pub mod inputs;
pub mod kvtable;
pub mod layout;
pub mod meminfo;
pub mod reference;
pub mod selftest;
mod sim;
pub mod sources;

#[cfg(feature = "cuda")]
mod backend;
#[cfg(not(feature = "cuda"))]
mod dummy;

#[cfg(feature = "cuda")]
pub use backend::*;
#[cfg(not(feature = "cuda"))]
pub use dummy::*;

pub use decoder::{
    DeviceDecoder, DeviceInput, DeviceKvCache, DeviceScratch, DeviceSession, PREFILL_CHUNK,
    SessionParts,
};
pub use decoder_check::{DECODER_FIXTURES, DecoderCheck, decoder_check};
pub use error::CudaError;
pub use gpu::{Gpu, PlanInfo, PoolMemory, PoolsInfo, Splits};
pub use kvtable::{DevicePolicy, KvBlockTable, Placement, TableMark};
pub use layout::{BlockEntry, BlockKind, KvLayout};
pub use meminfo::DeviceInfo;
pub use selftest::{
    CompiledKernel, KernelCheck, MIXED_AGREEMENT, agreement_frames, per_layer_check_policy,
};
pub use sim::{SimDevice, SimPools, SimWeights};

/// True when this build contains the CUDA backend.
pub const fn compiled_with_cuda() -> bool {
    cfg!(feature = "cuda")
}
