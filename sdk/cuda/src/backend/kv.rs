//! Device KV pools of one layer (layout in [`crate::layout`]), the frame-block quantizer and
//! the fused mixed-precision attention (flash-decoding split + combine).

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::f16;

use super::device::{CudaDevice, driver_err};
use super::ops::{check_len, launch, linear, shape, u32_of};
use crate::error::CudaError;
use crate::layout::{BlockEntry, KvLayout, validate_entries};
use crate::reference::HostPools;

/// Query heads one attention thread block serves (kernels/attention.cu `ATTN_MAX_G`).
const MAX_G: usize = 8;

/// One layer's K/V pools on the device.
#[derive(Debug)]
pub struct DeviceKvPools {
    layout: KvLayout,
    text_blocks: usize,
    frame_blocks: usize,
    k_text: CudaSlice<f16>,
    v_text: CudaSlice<f16>,
    k_codes: CudaSlice<u8>,
    v_codes: CudaSlice<u8>,
    k_params: CudaSlice<u32>,
    v_params: CudaSlice<u32>,
}

impl DeviceKvPools {
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// Device bytes of the pools.
    pub fn bytes(&self) -> usize {
        self.text_blocks * self.layout.text_block_bytes()
            + self.frame_blocks * self.layout.frame_block_bytes()
    }
}

/// How the context is split across thread blocks (flash-decoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splits {
    /// Enough splits to give every multiprocessor about two thread blocks.
    Auto,
    Fixed(usize),
}

impl CudaDevice {
    /// Zeroed pools for `text_blocks` FP16 blocks and `frame_blocks` quantized blocks.
    pub fn kv_pools(
        &self,
        layout: KvLayout,
        text_blocks: usize,
        frame_blocks: usize,
    ) -> Result<DeviceKvPools, CudaError> {
        layout.validate()?;
        Ok(DeviceKvPools {
            layout,
            text_blocks,
            frame_blocks,
            k_text: self.zeros(text_blocks * layout.text_block_elems())?,
            v_text: self.zeros(text_blocks * layout.text_block_elems())?,
            k_codes: self.zeros(frame_blocks * layout.frame_block_code_bytes())?,
            v_codes: self.zeros(frame_blocks * layout.frame_block_code_bytes())?,
            k_params: self.zeros(frame_blocks * layout.k_params_per_block())?,
            v_params: self.zeros(frame_blocks * layout.v_params_per_block())?,
        })
    }

    fn check_span(
        op: &'static str,
        p: &DeviceKvPools,
        blocks: usize,
        block: usize,
        tok_offset: usize,
        len: usize,
    ) -> Result<(), CudaError> {
        if block >= blocks || len == 0 || tok_offset + len > p.layout.block_tokens {
            return Err(shape(
                op,
                format!(
                    "block {block} slots {tok_offset}..{} (pool has {blocks} blocks of {} tokens)",
                    tok_offset + len,
                    p.layout.block_tokens
                ),
            ));
        }
        Ok(())
    }

    /// Stores `len` tokens of K and V (`[len][kv_heads][head_dim]` f32) as FP16 into text
    /// block `block` from slot `tok_offset`.
    pub fn kv_store_text(
        &self,
        pools: &mut DeviceKvPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv store text";
        Self::check_span(OP, pools, pools.text_blocks, block, tok_offset, len)?;
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
        launch!(
            self,
            "kv_quant.cu",
            "kv_store_f16",
            cfg,
            &mut pools.k_text,
            k,
            &a[0],
            &a[1],
            &a[2],
            &a[3],
            &a[4],
            &a[5]
        );
        launch!(
            self,
            "kv_quant.cu",
            "kv_store_f16",
            cfg,
            &mut pools.v_text,
            v,
            &a[0],
            &a[1],
            &a[2],
            &a[3],
            &a[4],
            &a[5]
        );
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
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv quantize frame";
        Self::check_span(OP, pools, pools.frame_blocks, block, tok_offset, len)?;
        let l = pools.layout;
        if l.key_per_channel && tok_offset != 0 {
            return Err(shape(
                OP,
                format!("per-channel keys quantize whole blocks; got slot offset {tok_offset}"),
            ));
        }
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
        launch!(
            self,
            "kv_quant.cu",
            "kv_quant_params_token",
            token_groups,
            &mut pools.v_params,
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
            &mut pools.v_codes,
            &pools.v_params,
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
                &mut pools.k_params,
                k,
                &blk,
                &n,
                &h,
                &d,
                &bits
            );
            launch!(
                self,
                "kv_quant.cu",
                "kv_quant_codes",
                codes,
                &mut pools.k_codes,
                &pools.k_params,
                k,
                &blk,
                &off,
                &n,
                &h,
                &d,
                &t,
                &g,
                &bits,
                &one
            );
        } else {
            launch!(
                self,
                "kv_quant.cu",
                "kv_quant_params_token",
                token_groups,
                &mut pools.k_params,
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
            launch!(
                self,
                "kv_quant.cu",
                "kv_quant_codes",
                codes,
                &mut pools.k_codes,
                &pools.k_params,
                k,
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
        }
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
        const OP: &str = "mixed attention";
        let l = pools.layout;
        if q_heads == 0 || !q_heads.is_multiple_of(l.kv_heads) {
            return Err(shape(
                OP,
                format!(
                    "q_heads {q_heads} is not a multiple of kv_heads {}",
                    l.kv_heads
                ),
            ));
        }
        let n_q = q_order.len();
        if n_q == 0 || n_q > 65_535 {
            return Err(shape(OP, format!("{n_q} queries in one call (1 to 65535)")));
        }
        validate_entries(&l, entries, pools.text_blocks, pools.frame_blocks)?;
        check_len(OP, "q", q.len(), n_q * q_heads * l.head_dim)?;
        check_len(OP, "out", out.len(), n_q * q_heads * l.head_dim)?;
        let group = q_heads / l.kv_heads;
        let chunks = group.div_ceil(MAX_G);
        let n_entries = entries.len().max(1);
        let want = match splits {
            Splits::Fixed(s) => s,
            Splits::Auto => {
                (2 * self.info().multiprocessors as usize).div_ceil(n_q * l.kv_heads * chunks)
            }
        };
        let per_split = n_entries.div_ceil(want.clamp(1, n_entries));
        let n_splits = n_entries.div_ceil(per_split);

        let flat: Vec<i32> = if entries.is_empty() {
            vec![0; 4]
        } else {
            entries.iter().flat_map(|e| e.to_int4()).collect()
        };
        let d_entries = self.upload(&flat)?;
        let d_order = self.upload(q_order)?;
        let parts = n_q * q_heads * n_splits;
        let mut part_acc = self.zeros::<f32>(parts * l.head_dim)?;
        let mut part_ml = self.zeros::<f32>(parts * 2)?;
        let ints = [
            entries.len() as i32,
            per_split as i32,
            q_heads as i32,
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
                u32_of(OP, "splits", n_splits)?,
                u32_of(OP, "heads", l.kv_heads * chunks)?,
                n_q as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "attention.cu",
            "mixed_attention_partial",
            cfg,
            q,
            &d_order,
            &d_entries,
            &ints[0],
            &ints[1],
            &pools.k_text,
            &pools.v_text,
            &pools.k_codes,
            &pools.k_params,
            &pools.v_codes,
            &pools.v_params,
            &ints[2],
            &ints[3],
            &ints[4],
            &ints[5],
            &ints[6],
            &ints[7],
            &ints[8],
            &scale,
            &mut part_acc,
            &mut part_ml,
        );
        let combine = LaunchConfig {
            grid_dim: (u32_of(OP, "queries x heads", n_q * q_heads)?, 1, 1),
            block_dim: (l.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ns, d) = (n_splits as i32, l.head_dim as i32);
        launch!(
            self,
            "attention.cu",
            "mixed_attention_combine",
            combine,
            &part_acc,
            &part_ml,
            out,
            &ns,
            &d
        );
        Ok(n_splits)
    }

    /// Copies the pools back into their host image (for comparison with the CPU twins).
    pub fn download_pools(&self, pools: &DeviceKvPools) -> Result<HostPools, CudaError> {
        let l = pools.layout;
        let mut host = HostPools::new(l, pools.text_blocks, pools.frame_blocks);
        let trim = |mut v: Vec<f16>, n: usize| {
            v.truncate(n);
            v
        };
        host.k_text = trim(self.download(&pools.k_text)?, host.k_text.len());
        host.v_text = trim(self.download(&pools.v_text)?, host.v_text.len());
        let mut kc = self.download(&pools.k_codes)?;
        kc.truncate(host.k_codes.len());
        host.k_codes = kc;
        let mut vc = self.download(&pools.v_codes)?;
        vc.truncate(host.v_codes.len());
        host.v_codes = vc;
        let unpack = |v: Vec<u32>, n: usize| -> Vec<f16> {
            v.iter()
                .take(n / 2)
                .flat_map(|&p| {
                    [
                        f16::from_bits((p & 0xffff) as u16),
                        f16::from_bits((p >> 16) as u16),
                    ]
                })
                .collect()
        };
        host.k_params = unpack(self.download(&pools.k_params)?, host.k_params.len());
        host.v_params = unpack(self.download(&pools.v_params)?, host.v_params.len());
        self.stream()
            .synchronize()
            .map_err(driver_err("cuStreamSynchronize"))?;
        Ok(host)
    }
}
