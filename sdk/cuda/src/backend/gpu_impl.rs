//! [`Gpu`] on a CUDA device: each operation is the kernel launcher of the same name
//! ([`super::ops`], [`super::kv`]); the copy queue is a second CUDA stream.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use jetvlm_decoder::{Tensor, TensorData};

use super::device::{CudaDevice, driver_err};
use super::kv::{AttentionPlan, DeviceKvPools};
use super::ops::{DeviceWeights, QuantWeights, check_len, shape};
use crate::error::CudaError;
use crate::gpu::{Gpu, PlanInfo, PoolMemory, PoolsInfo, Splits};
use crate::layout::{BlockEntry, KvLayout};

/// Elements per host staging chunk when uploading weights.
const UPLOAD_CHUNK: usize = 1 << 22;

/// A copy stream beside the device's compute stream; dropping it waits for both (copies out
/// of and kernels writing pools must finish before the pools are freed).
#[derive(Debug)]
pub struct CudaQueue {
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
        let _ = self.compute.synchronize();
    }
}

fn upload_slice<T: DeviceRepr + ValidAsZeroBits + Copy>(
    dev: &CudaDevice,
    s: &[T],
) -> Result<CudaSlice<T>, CudaError> {
    dev.upload_chunked::<T, _>(s.len(), UPLOAD_CHUNK, |off, chunk| {
        chunk.copy_from_slice(&s[off..off + chunk.len()]);
        Ok(())
    })
}

/// Tokens `src_token..src_token + len` of K and V (rows of `row` values).
fn token_rows<'a>(
    op: &'static str,
    k: &'a CudaSlice<f32>,
    v: &'a CudaSlice<f32>,
    src_token: usize,
    len: usize,
    row: usize,
) -> Result<(CudaView<'a, f32>, CudaView<'a, f32>), CudaError> {
    let r = crate::checks::token_rows(op, [k.len(), v.len()], src_token, len, row)?;
    Ok((k.slice(r.clone()), v.slice(r)))
}

impl PoolsInfo for DeviceKvPools {
    fn layout(&self) -> &KvLayout {
        DeviceKvPools::layout(self)
    }
    fn memory(&self) -> PoolMemory {
        DeviceKvPools::memory(self)
    }
    fn blocks(&self) -> (usize, usize) {
        DeviceKvPools::blocks(self)
    }
}

impl PlanInfo for AttentionPlan {
    fn layout(&self) -> &KvLayout {
        AttentionPlan::layout(self)
    }
    fn splits(&self) -> usize {
        AttentionPlan::splits(self)
    }
}

impl Gpu for CudaDevice {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<u32>;
    type Weights = DeviceWeights;
    type Pools = DeviceKvPools;
    type Plan = AttentionPlan;
    type Queue = CudaQueue;
    type Event = CudaEvent;

    fn name(&self) -> String {
        self.info().name.clone()
    }
    fn can_map_host_memory(&self) -> bool {
        self.info().can_map_host_memory
    }
    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, CudaError> {
        CudaDevice::zeros::<f32>(self, len)
    }
    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
        CudaDevice::upload(self, data)
    }
    fn upload_ids(&self, data: &[u32]) -> Result<CudaSlice<u32>, CudaError> {
        CudaDevice::upload(self, data)
    }
    /// Uploaded chunk by chunk from the memory-mapped file, in its stored precision.
    fn upload_tensor(&self, t: &Tensor) -> Result<DeviceWeights, CudaError> {
        Ok(match t.data() {
            TensorData::F32(s) => DeviceWeights::F32(upload_slice::<f32>(self, s)?),
            TensorData::F16(s) => DeviceWeights::F16(upload_slice::<f16>(self, s)?),
            TensorData::BF16(s) => DeviceWeights::BF16(upload_slice::<bf16>(self, s)?),
            TensorData::Quant(q) => {
                crate::checks::check_quant_tensor(t, &q)?;
                DeviceWeights::Quant(QuantWeights {
                    format: q.format,
                    rows: q.rows(),
                    cols: q.cols,
                    codes: upload_slice::<u8>(self, q.codes)?,
                    scales: upload_slice::<f16>(self, q.scales)?,
                    zeros: if q.format.has_zeros() {
                        Some(upload_slice::<f16>(self, q.zeros)?)
                    } else {
                        None
                    },
                })
            }
        })
    }
    fn weights_len(w: &DeviceWeights) -> usize {
        w.len()
    }
    fn weights_bytes(w: &DeviceWeights) -> usize {
        match w {
            DeviceWeights::F32(s) => 4 * s.len(),
            DeviceWeights::F16(s) => 2 * s.len(),
            DeviceWeights::BF16(s) => 2 * s.len(),
            DeviceWeights::Quant(q) => {
                q.codes.len() + 2 * (q.scales.len() + q.zeros.as_ref().map_or(0, |z| z.len()))
            }
        }
    }
    fn upload_vector(&self, v: &[f32]) -> Result<DeviceWeights, CudaError> {
        Ok(DeviceWeights::F32(CudaDevice::upload(self, v)?))
    }
    fn download(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>, CudaError> {
        CudaDevice::download(self, b)
    }
    fn write(&self, dst: &mut CudaSlice<f32>, data: &[f32]) -> Result<(), CudaError> {
        check_len("host-to-device copy", "destination", dst.len(), data.len())?;
        let mut view = dst.slice_mut(0..data.len());
        self.stream()
            .memcpy_htod(data, &mut view)
            .map_err(driver_err("cuMemcpyHtoD"))
    }
    fn copy(
        &self,
        src: &CudaSlice<f32>,
        offset: usize,
        len: usize,
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "device-to-device copy";
        check_len(OP, "source", src.len(), offset + len)?;
        check_len(OP, "destination", dst.len(), len)?;
        let mut view = dst.slice_mut(0..len);
        self.stream()
            .memcpy_dtod(&src.slice(offset..offset + len), &mut view)
            .map_err(driver_err("cuMemcpyDtoD"))
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        CudaDevice::synchronize(self)
    }

    fn embedding(
        &self,
        out: &mut CudaSlice<f32>,
        table: &DeviceWeights,
        ids: &[u32],
        hidden: usize,
    ) -> Result<(), CudaError> {
        CudaDevice::embedding(self, out, table, ids, hidden)
    }
    fn rmsnorm(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &DeviceWeights,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        CudaDevice::rmsnorm(self, out, x, weight, rows, dim, eps)
    }
    fn gemv(
        &self,
        y: &mut CudaSlice<f32>,
        w: &DeviceWeights,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        n_tok: usize,
    ) -> Result<(), CudaError> {
        CudaDevice::gemv(self, y, w, x, rows, cols, n_tok)
    }
    fn bias_add(
        &self,
        y: &mut CudaSlice<f32>,
        b: &DeviceWeights,
        rows: usize,
        n_tok: usize,
    ) -> Result<(), CudaError> {
        match b {
            DeviceWeights::F32(b) => CudaDevice::bias_add(self, y, b, rows, n_tok),
            _ => Err(shape("bias add", "biases are f32 on the device".into())),
        }
    }
    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<(), CudaError> {
        CudaDevice::rope(
            self, x, positions, inv_freq, n_tokens, n_heads, head_dim, rotary_dim,
        )
    }
    fn rope_mrope(
        &self,
        x: &mut CudaSlice<f32>,
        positions3: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        section: [usize; 3],
        interleaved: bool,
    ) -> Result<(), CudaError> {
        CudaDevice::rope_mrope(
            self,
            x,
            positions3,
            inv_freq,
            n_tokens,
            n_heads,
            head_dim,
            section,
            interleaved,
        )
    }
    fn residual_add(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        CudaDevice::residual_add(self, x, y, n)
    }
    fn swiglu(
        &self,
        out: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        CudaDevice::swiglu(self, out, gate, up, n)
    }
    fn geglu(
        &self,
        out: &mut CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        CudaDevice::geglu(self, out, gate, up, n)
    }
    fn softcap(&self, x: &mut CudaSlice<f32>, n: usize, cap: f32) -> Result<(), CudaError> {
        CudaDevice::softcap(self, x, n, cap)
    }
    fn scale_round(
        &self,
        x: &mut CudaSlice<f32>,
        n: usize,
        scale: f32,
        round: jetvlm_core::DType,
    ) -> Result<(), CudaError> {
        CudaDevice::scale_round(self, x, n, scale, round)
    }

    fn kv_pools(
        &self,
        layout: KvLayout,
        text_blocks: usize,
        frame_blocks: usize,
        memory: PoolMemory,
    ) -> Result<DeviceKvPools, CudaError> {
        self.kv_pools_in(layout, text_blocks, frame_blocks, memory)
    }
    fn kv_store_text(
        &self,
        pools: &mut DeviceKvPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        src_token: usize,
    ) -> Result<(), CudaError> {
        let row = PoolsInfo::layout(pools).row_elems();
        let (k, v) = token_rows("kv store text", k, v, src_token, len, row)?;
        CudaDevice::kv_store_text(self, pools, block, tok_offset, len, &k, &v)
    }
    fn kv_quantize_frame(
        &self,
        pools: &mut DeviceKvPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        src_token: usize,
    ) -> Result<(), CudaError> {
        let row = PoolsInfo::layout(pools).row_elems();
        let (k, v) = token_rows("kv quantize frame", k, v, src_token, len, row)?;
        CudaDevice::kv_quantize_frame(self, pools, block, tok_offset, len, &k, &v)
    }
    fn attention_plan(
        &self,
        layout: &KvLayout,
        blocks: (usize, usize),
        q_heads: usize,
        entries: &[BlockEntry],
        q_order: &[i32],
        q_from: &[i32],
        splits: Splits,
    ) -> Result<AttentionPlan, CudaError> {
        CudaDevice::attention_plan_from(
            self, layout, blocks, q_heads, entries, q_order, q_from, splits,
        )
    }
    fn attend(
        &self,
        pools: &DeviceKvPools,
        plan: &mut AttentionPlan,
        q: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        CudaDevice::attend(self, pools, plan, q, out)
    }

    fn copy_queue(&self) -> Result<CudaQueue, CudaError> {
        Ok(CudaQueue {
            copy: self
                .context()
                .new_stream()
                .map_err(driver_err("cuStreamCreate"))?,
            compute: self.stream().clone(),
        })
    }
    fn record(&self, on: Option<&CudaQueue>) -> Result<CudaEvent, CudaError> {
        let stream = on.map_or(self.stream(), |q| &q.copy);
        stream
            .record_event(None)
            .map_err(driver_err("cuEventRecord"))
    }
    fn wait(&self, on: Option<&CudaQueue>, event: &CudaEvent) -> Result<(), CudaError> {
        let stream = on.map_or(self.stream(), |q| &q.copy);
        stream.wait(event).map_err(driver_err("cuStreamWaitEvent"))
    }
    fn copy_pool_prefix(
        &self,
        src: &DeviceKvPools,
        dst: &mut DeviceKvPools,
        blocks: (usize, usize),
        queue: &CudaQueue,
    ) -> Result<u64, CudaError> {
        CudaDevice::copy_pool_prefix(self, src, dst, blocks, &queue.copy)
    }
}
