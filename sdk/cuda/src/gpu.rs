//! The operations the device decoder launches, as one trait. [`crate::CudaDevice`] runs them
//! as CUDA kernels; [`crate::SimDevice`] runs each kernel's CPU twin ([`crate::reference`]) on
//! host buffers. The device decoder ([`crate::decoder`]) is written once over this trait, so
//! its host logic (block tables, pool layouts, placements, attention plans, the order of the
//! offload copies) runs and is tested on machines without a GPU.

use jetvlm_decoder::Tensor;

use crate::error::CudaError;
use crate::layout::{BlockEntry, KvLayout};

/// Where a layer's pools live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMemory {
    /// Device memory.
    Device,
    /// Page-locked host memory mapped into the device: kernels read K/V over PCIe as they
    /// attend (the KV cache offloaded to host memory).
    MappedHost,
}

/// How the context is split across thread blocks (flash-decoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splits {
    /// Enough splits to give every multiprocessor about two thread blocks.
    Auto,
    Fixed(usize),
}

/// What the host logic reads back from one layer's pools.
pub trait PoolsInfo {
    fn layout(&self) -> &KvLayout;
    fn memory(&self) -> PoolMemory;
    /// (text blocks, frame blocks).
    fn blocks(&self) -> (usize, usize);
    /// Bytes of the pools.
    fn bytes(&self) -> usize {
        let (t, f) = self.blocks();
        t * self.layout().text_block_bytes() + f * self.layout().frame_block_bytes()
    }
}

/// What the host logic reads back from a prepared attention.
pub trait PlanInfo {
    /// The pool layout the plan attends.
    fn layout(&self) -> &KvLayout;
    /// Context splits per (query, head).
    fn splits(&self) -> usize;
}

/// A device: buffers, the decoder's kernels and a copy queue. Every operation checks its
/// shapes on the host and returns [`CudaError::Shape`] naming itself on a mismatch. Work is
/// ordered on one compute queue; [`Gpu::Queue`]s run copies beside it, ordered against it only
/// through [`Gpu::record`] and [`Gpu::wait`].
pub trait Gpu: Sized {
    /// f32 values in device memory (activations, RoPE frequencies).
    type Buf: Send;
    /// u32 values in device memory (positions).
    type Ids: Send;
    /// A weight tensor in its stored precision (matrices, weight-only quantized ones
    /// included) or f32 (norms, biases); its format describes the decoder's weights
    /// ([`jetvlm_decoder::model::describe_weights`]).
    type Weights: Send + Sync + jetvlm_decoder::model::MatrixFormat;
    /// One layer's KV pools.
    type Pools: PoolsInfo + Send;
    /// An attention context prepared once per forward step.
    type Plan: PlanInfo;
    /// A queue for copies that overlap the compute queue; dropping it waits for both.
    type Queue: Send;
    /// A point in a queue's work that another queue can wait for.
    type Event;

    /// The device's name, for reports.
    fn name(&self) -> String;
    /// Whether pools can live in mapped host memory ([`PoolMemory::MappedHost`]).
    fn can_map_host_memory(&self) -> bool;
    /// A zero-filled buffer of `len` values.
    fn zeros(&self, len: usize) -> Result<Self::Buf, CudaError>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf, CudaError>;
    fn upload_ids(&self, data: &[u32]) -> Result<Self::Ids, CudaError>;
    /// A tensor in its stored precision: f32, f16, bf16, or a weight-only INT8/INT4 matrix
    /// (codes, scales and zeros as `jetvlm quantize` stores them).
    fn upload_tensor(&self, t: &Tensor) -> Result<Self::Weights, CudaError>;
    /// Elements of a weight tensor.
    fn weights_len(w: &Self::Weights) -> usize;
    /// Bytes a weight tensor occupies in device memory (a quantized matrix: its codes,
    /// scales and zeros).
    fn weights_bytes(w: &Self::Weights) -> usize;
    /// f32 weights (norms, biases).
    fn upload_vector(&self, v: &[f32]) -> Result<Self::Weights, CudaError>;
    /// Copies a buffer back to the host (waits for the compute queue).
    fn download(&self, b: &Self::Buf) -> Result<Vec<f32>, CudaError>;
    /// `dst[..data.len()] = data`.
    fn write(&self, dst: &mut Self::Buf, data: &[f32]) -> Result<(), CudaError>;
    /// `dst[..len] = src[offset..offset + len]`.
    fn copy(
        &self,
        src: &Self::Buf,
        offset: usize,
        len: usize,
        dst: &mut Self::Buf,
    ) -> Result<(), CudaError>;
    /// Waits for the compute queue.
    fn synchronize(&self) -> Result<(), CudaError>;

    /// Rows `ids` of `table` (`[vocab][hidden]`) into `out[ids.len()][hidden]`.
    fn embedding(
        &self,
        out: &mut Self::Buf,
        table: &Self::Weights,
        ids: &[u32],
        hidden: usize,
    ) -> Result<(), CudaError>;
    /// RMSNorm of `rows` rows of `dim`.
    fn rmsnorm(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        weight: &Self::Weights,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError>;
    /// `y[t][r] = sum_c w[r][c] x[t][c]` for `n_tok` tokens (a quantized `w` dequantized as
    /// it is read: a GEMV for decode, a tiled GEMM for prefill).
    fn gemv(
        &self,
        y: &mut Self::Buf,
        w: &Self::Weights,
        x: &Self::Buf,
        rows: usize,
        cols: usize,
        n_tok: usize,
    ) -> Result<(), CudaError>;
    /// `y[t][r] += b[r]`.
    fn bias_add(
        &self,
        y: &mut Self::Buf,
        b: &Self::Weights,
        rows: usize,
        n_tok: usize,
    ) -> Result<(), CudaError>;
    /// Rotary embedding in place on `x[n_tokens][n_heads][head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &Self::Ids,
        inv_freq: &Self::Buf,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<(), CudaError>;
    /// M-RoPE in place on `x[n_tokens][n_heads][head_dim]`: `positions3[n_tokens][3]`
    /// (temporal, row, column); frequency pair `i` turns by the position of the section of
    /// `section` that holds it: contiguous sections (Qwen2-VL / Qwen2.5-VL,
    /// `rope_mrope_f32`), or with `interleaved` Qwen3-VL's interleaving
    /// (`rope_mrope_interleaved_f32`).
    #[allow(clippy::too_many_arguments)]
    fn rope_mrope(
        &self,
        x: &mut Self::Buf,
        positions3: &Self::Ids,
        inv_freq: &Self::Buf,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        section: [usize; 3],
        interleaved: bool,
    ) -> Result<(), CudaError>;
    /// `x[..n] += y[..n]`.
    fn residual_add(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<(), CudaError>;
    /// `out[..n] = silu(gate) * up`.
    fn swiglu(
        &self,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
    ) -> Result<(), CudaError>;
    /// `out[..n] = gelu_tanh(gate) * up` (Gemma's GeGLU).
    fn geglu(
        &self,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        n: usize,
    ) -> Result<(), CudaError>;
    /// `x[..n] = cap * tanh(x / cap)` (Gemma's final logit softcapping).
    fn softcap(&self, x: &mut Self::Buf, n: usize, cap: f32) -> Result<(), CudaError>;
    /// `x[..n] = round(x * scale)`, the product in f32 rounded to `round` (f16, bf16; f32
    /// keeps it): Gemma's embedding scaling in the table's type.
    fn scale_round(
        &self,
        x: &mut Self::Buf,
        n: usize,
        scale: f32,
        round: jetvlm_core::DType,
    ) -> Result<(), CudaError>;

    /// Zeroed pools for `text_blocks` FP16 and `frame_blocks` quantized blocks in `memory`.
    fn kv_pools(
        &self,
        layout: KvLayout,
        text_blocks: usize,
        frame_blocks: usize,
        memory: PoolMemory,
    ) -> Result<Self::Pools, CudaError>;
    /// Stores tokens `src_token..src_token + len` of `k`, `v` (`[token][kv_heads][head_dim]`)
    /// as FP16 into text block `block` from slot `tok_offset`.
    #[allow(clippy::too_many_arguments)]
    fn kv_store_text(
        &self,
        pools: &mut Self::Pools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        src_token: usize,
    ) -> Result<(), CudaError>;
    /// Quantizes tokens `src_token..src_token + len` of `k`, `v` into frame block `block`
    /// from slot `tok_offset` (0 with per-channel keys).
    #[allow(clippy::too_many_arguments)]
    fn kv_quantize_frame(
        &self,
        pools: &mut Self::Pools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        src_token: usize,
    ) -> Result<(), CudaError>;
    /// Prepares attention of `q_order.len()` queries with `q_heads` heads over `entries` of
    /// pools with `layout` and `blocks`; query `i` sees keys with order <= `q_order[i]` and,
    /// when `q_from` is not empty (one per query), >= `q_from[i]` (a sliding window).
    #[allow(clippy::too_many_arguments)]
    fn attention_plan(
        &self,
        layout: &KvLayout,
        blocks: (usize, usize),
        q_heads: usize,
        entries: &[BlockEntry],
        q_order: &[i32],
        q_from: &[i32],
        splits: Splits,
    ) -> Result<Self::Plan, CudaError>;
    /// Runs a prepared attention on one layer's pools: `q` in, `out` written (same shape).
    fn attend(
        &self,
        pools: &Self::Pools,
        plan: &mut Self::Plan,
        q: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<(), CudaError>;

    /// A copy queue beside the compute queue.
    fn copy_queue(&self) -> Result<Self::Queue, CudaError>;
    /// An event after the work queued so far on `on` (`None`: the compute queue).
    fn record(&self, on: Option<&Self::Queue>) -> Result<Self::Event, CudaError>;
    /// Makes later work on `on` (`None`: the compute queue) wait for `event`.
    fn wait(&self, on: Option<&Self::Queue>, event: &Self::Event) -> Result<(), CudaError>;
    /// Queues on `queue` the copy of the first `blocks` = (text, frame) blocks of every pool
    /// array from `src` (mapped host memory) into `dst` (same layout); returns the bytes.
    fn copy_pool_prefix(
        &self,
        src: &Self::Pools,
        dst: &mut Self::Pools,
        blocks: (usize, usize),
        queue: &Self::Queue,
    ) -> Result<u64, CudaError>;
}
