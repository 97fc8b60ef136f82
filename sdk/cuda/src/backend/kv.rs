//! Device KV pools of one layer (layout in [`crate::layout`]), the frame-block quantizer and
//! the fused mixed-precision attention (flash-decoding split + combine).

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig};
use half::f16;

use super::device::{CudaDevice, driver_err};
use super::ops::{check_len, launch, linear, shape, u32_of};
use crate::error::CudaError;
use crate::gpu::{PoolMemory, Splits};
use crate::layout::{BlockEntry, KvLayout};
use crate::reference::HostPools;

/// The attention kernel instance for `head_dim` and `group` query heads per kv head:
/// (function name, query heads per thread block). Instances exist for 2, 4 or 8 elements per
/// lane (head_dim up to 64, 128, 256) and 1, 4 or 8 query heads per block.
fn partial_kernel(head_dim: usize, group: usize) -> (String, usize) {
    let e = match head_dim.div_ceil(32) {
        0..=2 => 2,
        3..=4 => 4,
        _ => 8,
    };
    let g = match group {
        1 => 1,
        2..=4 => 4,
        _ => 8,
    };
    (format!("mixed_attention_partial_e{e}_g{g}"), g)
}

/// Backing storage of one pool array.
#[derive(Debug)]
enum Store {
    Device(#[allow(dead_code)] CudaSlice<u8>),
    Host(#[allow(dead_code)] super::memory::MappedHostBuffer<u8>),
}

/// One pool array: its owner and the device address kernels use.
#[derive(Debug)]
struct PoolBuf {
    _store: Store,
    ptr: u64,
    bytes: usize,
    /// Host address, for pools in mapped host memory.
    host: Option<usize>,
}

/// One layer's K/V pools (device memory or mapped host memory).
#[derive(Debug)]
pub struct DeviceKvPools {
    layout: KvLayout,
    text_blocks: usize,
    frame_blocks: usize,
    memory: PoolMemory,
    k_text: PoolBuf,
    v_text: PoolBuf,
    k_codes: PoolBuf,
    v_codes: PoolBuf,
    k_params: PoolBuf,
    v_params: PoolBuf,
}

impl DeviceKvPools {
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    pub fn memory(&self) -> PoolMemory {
        self.memory
    }
    /// (text blocks, frame blocks).
    pub fn blocks(&self) -> (usize, usize) {
        (self.text_blocks, self.frame_blocks)
    }
    /// Bytes of the pools.
    pub fn bytes(&self) -> usize {
        self.text_blocks * self.layout.text_block_bytes()
            + self.frame_blocks * self.layout.frame_block_bytes()
    }
}

/// An attention context on the device (block list, query orders, partial-result scratch),
/// prepared once and used for every layer of a forward step.
#[derive(Debug)]
pub struct AttentionPlan {
    layout: KvLayout,
    text_blocks: usize,
    frame_blocks: usize,
    q_heads: usize,
    n_q: usize,
    n_entries: usize,
    per_split: usize,
    n_splits: usize,
    chunks: usize,
    kernel: String,
    entries: CudaSlice<i32>,
    order: CudaSlice<i32>,
    /// Each query's first key (0 without a window).
    first: CudaSlice<i32>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
}

impl AttentionPlan {
    /// The pool layout the plan attends.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// Context splits per (query, head).
    pub fn splits(&self) -> usize {
        self.n_splits
    }
}

impl CudaDevice {
    fn pool_buf(&self, bytes: usize, memory: PoolMemory) -> Result<PoolBuf, CudaError> {
        match memory {
            PoolMemory::Device => {
                let buf = self.zeros::<u8>(bytes)?;
                let ptr = {
                    let (ptr, _sync) = buf.device_ptr(self.stream());
                    ptr
                };
                Ok(PoolBuf {
                    ptr,
                    _store: Store::Device(buf),
                    bytes,
                    host: None,
                })
            }
            PoolMemory::MappedHost => {
                let buf = self.mapped_host_buffer::<u8>(bytes)?;
                Ok(PoolBuf {
                    ptr: buf.device_ptr(),
                    host: Some(buf.host_addr()),
                    _store: Store::Host(buf),
                    bytes,
                })
            }
        }
    }

    /// Zeroed device pools for `text_blocks` FP16 blocks and `frame_blocks` quantized blocks.
    pub fn kv_pools(
        &self,
        layout: KvLayout,
        text_blocks: usize,
        frame_blocks: usize,
    ) -> Result<DeviceKvPools, CudaError> {
        self.kv_pools_in(layout, text_blocks, frame_blocks, PoolMemory::Device)
    }

    /// Zeroed pools in `memory`.
    pub fn kv_pools_in(
        &self,
        layout: KvLayout,
        text_blocks: usize,
        frame_blocks: usize,
        memory: PoolMemory,
    ) -> Result<DeviceKvPools, CudaError> {
        layout.validate()?;
        let text = 2 * text_blocks * layout.text_block_elems();
        let codes = frame_blocks * layout.frame_block_code_bytes();
        Ok(DeviceKvPools {
            layout,
            text_blocks,
            frame_blocks,
            memory,
            k_text: self.pool_buf(text, memory)?,
            v_text: self.pool_buf(text, memory)?,
            k_codes: self.pool_buf(codes, memory)?,
            v_codes: self.pool_buf(codes, memory)?,
            k_params: self.pool_buf(4 * frame_blocks * layout.k_params_per_block(), memory)?,
            v_params: self.pool_buf(4 * frame_blocks * layout.v_params_per_block(), memory)?,
        })
    }

    /// Stores `len` tokens of K and V (`[len][kv_heads][head_dim]` f32) as FP16 into text
    /// block `block` from slot `tok_offset`.
    pub fn kv_store_text(
        &self,
        pools: &mut DeviceKvPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv store text";
        crate::checks::check_span(OP, &pools.layout, pools.text_blocks, block, tok_offset, len)?;
        let l = pools.layout;
        check_len(OP, "k", k.len(), len * l.row_elems())?;
        check_len(OP, "v", v.len(), len * l.row_elems())?;
        let a = [
            block,
            tok_offset,
            len,
            l.kv_heads,
            l.head_dim,
            l.block_tokens,
        ]
        .map(|x| x as u32);
        let cfg = linear(len * l.row_elems());
        for (pool, src) in [(pools.k_text.ptr, k), (pools.v_text.ptr, v)] {
            launch!(
                self,
                "kv_quant.cu",
                "kv_store_f16",
                cfg,
                &pool,
                src,
                &a[0],
                &a[1],
                &a[2],
                &a[3],
                &a[4],
                &a[5]
            );
        }
        Ok(())
    }

    /// Quantizes `len` tokens of K and V (`[len][kv_heads][head_dim]` f32) into frame block
    /// `block` from slot `tok_offset`. Per-channel keys quantize a whole block at once, so
    /// `tok_offset` must be 0 in that mode.
    pub fn kv_quantize_frame(
        &self,
        pools: &mut DeviceKvPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &CudaView<'_, f32>,
        v: &CudaView<'_, f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv quantize frame";
        crate::checks::check_span(
            OP,
            &pools.layout,
            pools.frame_blocks,
            block,
            tok_offset,
            len,
        )?;
        let l = pools.layout;
        crate::checks::check_frame_offset(OP, &l, tok_offset)?;
        check_len(OP, "k", k.len(), len * l.row_elems())?;
        check_len(OP, "v", v.len(), len * l.row_elems())?;
        let (blk, off, n, h, d, t, g, bits) = (
            block as u32,
            tok_offset as u32,
            len as u32,
            l.kv_heads as u32,
            l.head_dim as u32,
            l.block_tokens as u32,
            l.group as u32,
            l.bits,
        );
        let token_groups = linear(len * l.kv_heads * l.groups());
        let codes = linear(len * l.kv_heads * l.code_row_bytes());
        let (zero, one) = (0u32, 1u32);
        let (vp, vc, kp, kc) = (
            pools.v_params.ptr,
            pools.v_codes.ptr,
            pools.k_params.ptr,
            pools.k_codes.ptr,
        );
        launch!(
            self,
            "kv_quant.cu",
            "kv_quant_params_token",
            token_groups,
            &vp,
            v,
            &blk,
            &off,
            &n,
            &h,
            &d,
            &t,
            &g,
            &bits
        );
        launch!(
            self,
            "kv_quant.cu",
            "kv_quant_codes",
            codes,
            &vc,
            &vp,
            v,
            &blk,
            &off,
            &n,
            &h,
            &d,
            &t,
            &g,
            &bits,
            &zero
        );
        if l.key_per_channel {
            launch!(
                self,
                "kv_quant.cu",
                "kv_quant_params_channel",
                linear(l.row_elems()),
                &kp,
                k,
                &blk,
                &n,
                &h,
                &d,
                &bits
            );
        } else {
            launch!(
                self,
                "kv_quant.cu",
                "kv_quant_params_token",
                token_groups,
                &kp,
                k,
                &blk,
                &off,
                &n,
                &h,
                &d,
                &t,
                &g,
                &bits
            );
        }
        let per_channel = if l.key_per_channel { one } else { zero };
        launch!(
            self,
            "kv_quant.cu",
            "kv_quant_codes",
            codes,
            &kc,
            &kp,
            k,
            &blk,
            &off,
            &n,
            &h,
            &d,
            &t,
            &g,
            &bits,
            &per_channel
        );
        Ok(())
    }

    /// Prepares attention of `q_order.len()` queries with `q_heads` heads over the blocks in
    /// `entries` of pools with `layout` and (`text_blocks`, `frame_blocks`); query `i` sees
    /// keys with order <= `q_order[i]` ([`crate::layout::SEES_ALL`] for decode).
    pub fn attention_plan(
        &self,
        layout: &KvLayout,
        blocks: (usize, usize),
        q_heads: usize,
        entries: &[BlockEntry],
        q_order: &[i32],
        splits: Splits,
    ) -> Result<AttentionPlan, CudaError> {
        self.attention_plan_from(layout, blocks, q_heads, entries, q_order, &[], splits)
    }

    /// [`Self::attention_plan`] where query `i` also sees only keys with order >=
    /// `q_from[i]` (a sliding window's first key), when `q_from` is not empty.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_plan_from(
        &self,
        layout: &KvLayout,
        blocks: (usize, usize),
        q_heads: usize,
        entries: &[BlockEntry],
        q_order: &[i32],
        q_from: &[i32],
        splits: Splits,
    ) -> Result<AttentionPlan, CudaError> {
        let l = *layout;
        let n_q = q_order.len();
        crate::checks::check_attention(&l, blocks, q_heads, entries, n_q)?;
        crate::checks::check_q_from(q_from, n_q)?;
        let first: Vec<i32> = if q_from.is_empty() {
            vec![0; n_q]
        } else {
            q_from.to_vec()
        };
        let group = q_heads / l.kv_heads;
        let (kernel, per_block) = partial_kernel(l.head_dim, group);
        let chunks = group.div_ceil(per_block);
        let n_entries = entries.len().max(1);
        let want = match splits {
            Splits::Fixed(s) => s,
            // As many thread blocks as the multiprocessors hold at once (one wave): decode
            // attention is bound by how many loads are in flight.
            Splits::Auto => {
                let per_sm = self
                    .function("attention.cu", &kernel)?
                    .occupancy_max_active_blocks_per_multiprocessor(128, 0, None)
                    .map_err(driver_err("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?
                    .clamp(1, 16) as usize;
                (per_sm * self.info().multiprocessors as usize) / (n_q * l.kv_heads * chunks)
            }
        };
        let per_split = n_entries.div_ceil(want.clamp(1, n_entries));
        let n_splits = n_entries.div_ceil(per_split);
        let flat: Vec<i32> = if entries.is_empty() {
            vec![0; 4]
        } else {
            entries.iter().flat_map(|e| e.to_int4()).collect()
        };
        let parts = n_q * q_heads * n_splits;
        Ok(AttentionPlan {
            layout: l,
            text_blocks: blocks.0,
            frame_blocks: blocks.1,
            q_heads,
            n_q,
            n_entries: entries.len(),
            per_split,
            n_splits,
            chunks,
            kernel,
            entries: self.upload(&flat)?,
            order: self.upload(q_order)?,
            first: self.upload(&first)?,
            part_acc: self.zeros::<f32>(parts * l.head_dim)?,
            part_ml: self.zeros::<f32>(parts * 2)?,
        })
    }

    /// Runs a prepared attention on one layer's pools: `q[n_q][q_heads][head_dim]` in,
    /// `out[n_q][q_heads][head_dim]` written. Softmax scale 1/sqrt(head_dim).
    pub fn attend(
        &self,
        pools: &DeviceKvPools,
        plan: &mut AttentionPlan,
        q: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "mixed attention";
        let l = pools.layout;
        crate::checks::check_plan_on_pools(
            (&plan.layout, (plan.text_blocks, plan.frame_blocks)),
            (&l, (pools.text_blocks, pools.frame_blocks)),
        )?;
        let n = plan.n_q * plan.q_heads * l.head_dim;
        check_len(OP, "q", q.len(), n)?;
        check_len(OP, "out", out.len(), n)?;
        let ints = [
            plan.n_entries as i32,
            plan.per_split as i32,
            plan.q_heads as i32,
            l.kv_heads as i32,
            l.head_dim as i32,
            l.block_tokens as i32,
            l.group as i32,
            l.bits as i32,
            l.key_per_channel as i32,
        ];
        let scale = 1.0f32 / (l.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(OP, "splits", plan.n_splits)?,
                u32_of(OP, "heads", l.kv_heads * plan.chunks)?,
                plan.n_q as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let p = [
            pools.k_text.ptr,
            pools.v_text.ptr,
            pools.k_codes.ptr,
            pools.k_params.ptr,
            pools.v_codes.ptr,
            pools.v_params.ptr,
        ];
        launch!(
            self,
            "attention.cu",
            &plan.kernel,
            cfg,
            q,
            &plan.order,
            &plan.first,
            &plan.entries,
            &ints[0],
            &ints[1],
            &p[0],
            &p[1],
            &p[2],
            &p[3],
            &p[4],
            &p[5],
            &ints[2],
            &ints[3],
            &ints[4],
            &ints[5],
            &ints[6],
            &ints[7],
            &ints[8],
            &scale,
            &mut plan.part_acc,
            &mut plan.part_ml,
        );
        let combine = LaunchConfig {
            grid_dim: (
                u32_of(OP, "queries x heads", plan.n_q * plan.q_heads)?,
                1,
                1,
            ),
            block_dim: (l.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ns, d) = (plan.n_splits as i32, l.head_dim as i32);
        launch!(
            self,
            "attention.cu",
            "mixed_attention_combine",
            combine,
            &plan.part_acc,
            &plan.part_ml,
            out,
            &ns,
            &d
        );
        Ok(())
    }

    /// Attention of `q[n_q][q_heads][head_dim]` over the blocks listed in `entries`; query
    /// `i` sees keys with order <= `q_order[i]` ([`crate::layout::SEES_ALL`] for decode).
    /// Softmax scale 1/sqrt(head_dim). Writes `out[n_q][q_heads][head_dim]`; returns the
    /// number of context splits used.
    pub fn attention(
        &self,
        pools: &DeviceKvPools,
        q: &CudaSlice<f32>,
        q_order: &[i32],
        q_heads: usize,
        entries: &[BlockEntry],
        out: &mut CudaSlice<f32>,
        splits: Splits,
    ) -> Result<usize, CudaError> {
        let mut plan = self.attention_plan(
            &pools.layout,
            (pools.text_blocks, pools.frame_blocks),
            q_heads,
            entries,
            q_order,
            splits,
        )?;
        self.attend(pools, &mut plan, q, out)?;
        Ok(plan.n_splits)
    }

    /// Queues on `stream` the copy of the first `blocks` = (text, frame) blocks of every pool
    /// array from host pools `src` (mapped host memory) into device pools `dst` of the same
    /// layout; returns the bytes copied.
    pub fn copy_pool_prefix(
        &self,
        src: &DeviceKvPools,
        dst: &mut DeviceKvPools,
        blocks: (usize, usize),
        stream: &cudarc::driver::CudaStream,
    ) -> Result<u64, CudaError> {
        const OP: &str = "kv offload copy";
        let l = src.layout;
        crate::checks::check_pool_copy(
            (&l, (src.text_blocks, src.frame_blocks)),
            (&dst.layout, (dst.text_blocks, dst.frame_blocks)),
            blocks,
        )?;
        let text = blocks.0 * 2 * l.text_block_elems();
        let codes = blocks.1 * l.frame_block_code_bytes();
        let arrays = [
            (&src.k_text, &dst.k_text, text),
            (&src.v_text, &dst.v_text, text),
            (&src.k_codes, &dst.k_codes, codes),
            (&src.v_codes, &dst.v_codes, codes),
            (
                &src.k_params,
                &dst.k_params,
                blocks.1 * 4 * l.k_params_per_block(),
            ),
            (
                &src.v_params,
                &dst.v_params,
                blocks.1 * 4 * l.v_params_per_block(),
            ),
        ];
        let mut total = 0u64;
        for (s, d, bytes) in arrays {
            if bytes == 0 {
                continue;
            }
            let host = s
                .host
                .ok_or_else(|| shape(OP, "source pools are not in mapped host memory".into()))?;
            // SAFETY: `host` addresses at least `bytes` bytes of pinned memory owned by `src`
            // and `d.ptr` at least `bytes` device bytes owned by `dst` (checked above); both
            // outlive the copy because the caller synchronises before dropping the pools.
            unsafe {
                cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                    d.ptr,
                    host as *const std::ffi::c_void,
                    bytes,
                    stream.cu_stream(),
                )
            }
            .result()
            .map_err(driver_err("cuMemcpyHtoDAsync"))?;
            total += bytes as u64;
        }
        Ok(total)
    }

    fn read_pool(&self, buf: &PoolBuf, dst: &mut [u8]) -> Result<(), CudaError> {
        self.synchronize()?;
        let n = dst.len().min(buf.bytes);
        if n == 0 {
            return Ok(());
        }
        // SAFETY: `buf.ptr` addresses `buf.bytes` bytes of device (or mapped host) memory that
        // outlive this call; the stream is idle, so nothing writes them meanwhile.
        unsafe { cudarc::driver::sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), buf.ptr, n) }
            .result()
            .map_err(driver_err("cuMemcpyDtoH"))
    }

    /// Copies the pools back into their host image (for comparison with the CPU twins).
    pub fn download_pools(&self, pools: &DeviceKvPools) -> Result<HostPools, CudaError> {
        let l = pools.layout;
        let mut host = HostPools::new(l, pools.text_blocks, pools.frame_blocks);
        let bytes = |buf: &PoolBuf, n: usize| -> Result<Vec<u8>, CudaError> {
            let mut v = vec![0u8; n];
            self.read_pool(buf, &mut v)?;
            Ok(v)
        };
        let halves = |b: Vec<u8>| -> Vec<f16> {
            b.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect()
        };
        host.k_text = halves(bytes(&pools.k_text, 2 * host.k_text.len())?);
        host.v_text = halves(bytes(&pools.v_text, 2 * host.v_text.len())?);
        host.k_codes = bytes(&pools.k_codes, host.k_codes.len())?;
        host.v_codes = bytes(&pools.v_codes, host.v_codes.len())?;
        // Parameter pairs are u32 (scale low half, zero high half): little-endian halves.
        host.k_params = halves(bytes(&pools.k_params, 2 * host.k_params.len())?);
        host.v_params = halves(bytes(&pools.v_params, 2 * host.v_params.len())?);
        Ok(host)
    }
}
