//! [`SimDevice`]: a simulated GPU. Buffers live in host memory and every operation runs the
//! CPU twin of its CUDA kernel ([`crate::reference`]) with the same shape checks, so the
//! device decoder's host logic (block tables, pool layouts, placements, attention plans,
//! offload streaming) runs end to end on a machine without a GPU and gives the tokens the
//! kernels would give (up to their rounding).
//!
//! The copy queue is checked as the GPU would need it to be ordered: a copy from or into
//! pools that compute work touched before the queue waited for it, and compute work on pools
//! whose copy it has not waited for, are errors ([`CudaError::Shape`] naming the hazard),
//! although the simulation itself runs everything in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jetvlm_core::DType;
use jetvlm_decoder::{Tensor, TensorData};

use crate::error::CudaError;
use crate::gpu::{Gpu, PlanInfo, PoolMemory, PoolsInfo, Splits};
use crate::layout::{BlockEntry, KvLayout};
use crate::reference::{self, HostPools, QuantMatrix};

/// A simulated GPU: host buffers and the kernels' CPU twins.
#[derive(Debug, Default)]
pub struct SimDevice {
    /// Compute operations on pools so far (the compute queue's clock).
    compute: AtomicU64,
}

impl SimDevice {
    pub fn new() -> Self {
        Self::default()
    }
    fn tick(&self) -> u64 {
        self.compute.fetch_add(1, Ordering::SeqCst) + 1
    }
}

use crate::checks::{check_len, shape};

/// A weight tensor: its values widened to f32 (the float kernels widen as they read) and the
/// type it is stored in, or a weight-only quantized matrix as the `gemv_q*` kernels read it.
#[derive(Debug)]
pub struct SimWeights {
    data: Vec<f32>,
    dtype: DType,
    quant: Option<QuantMatrix>,
}

impl SimWeights {
    /// Type the tensor is stored in on a GPU (I8 / U8 codes for a quantized matrix).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Elements (a quantized matrix: rows x cols).
    fn len(&self) -> usize {
        match &self.quant {
            Some(q) => q.rows * q.cols,
            None => self.data.len(),
        }
    }
    /// The f32 values of a float tensor; an error naming `op` for a quantized one (only
    /// matrix products read those).
    fn floats(&self, op: &'static str) -> Result<&[f32], CudaError> {
        match self.quant {
            None => Ok(&self.data),
            Some(_) => Err(shape(
                op,
                "a weight-only quantized matrix is read by the matrix product and the embedding lookup only"
                    .into(),
            )),
        }
    }
}

impl jetvlm_decoder::model::MatrixFormat for SimWeights {
    fn quant_format(&self) -> Option<jetvlm_quant::WeightFormat> {
        self.quant.as_ref().map(|q| q.format)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A copy queue's state, shared with the events recorded on it.
#[derive(Debug, Default)]
struct QueueState {
    /// Copies queued so far.
    issued: AtomicU64,
    /// The compute clock this queue has waited for.
    seen_compute: AtomicU64,
    /// The copies the compute queue has waited for.
    seen_by_compute: AtomicU64,
}

/// A copy queue of the simulated device.
#[derive(Debug, Default)]
pub struct SimQueue(Arc<QueueState>);

/// An event: a point on the compute queue or a copy queue.
#[derive(Debug)]
pub struct SimEvent(EventAt);

#[derive(Debug)]
enum EventAt {
    Compute(u64),
    Copy(Arc<QueueState>, u64),
}

/// One layer's pools in host memory, and the copy-ordering state of the simulation.
#[derive(Debug)]
pub struct SimPools {
    host: HostPools,
    memory: PoolMemory,
    /// The compute clock of the last compute operation on these pools.
    touched: AtomicU64,
    /// The copy that last wrote these pools, until compute waits for it.
    copied_by: Option<(Arc<QueueState>, u64)>,
}

impl SimPools {
    /// The pools' contents (what `download_pools` returns on a GPU).
    pub fn host(&self) -> &HostPools {
        &self.host
    }

    /// Compute work on the pools: refused while a copy into them has not been waited for.
    fn compute(&self, dev: &SimDevice, op: &'static str) -> Result<(), CudaError> {
        if let Some((q, seq)) = &self.copied_by
            && q.seen_by_compute.load(Ordering::SeqCst) < *seq
        {
            return Err(shape(
                op,
                format!(
                    "simulated device: compute used pools before waiting for copy {seq} into \
                     them (a missing wait on the copy queue's event)"
                ),
            ));
        }
        self.touched.store(dev.tick(), Ordering::SeqCst);
        Ok(())
    }
}

impl PoolsInfo for SimPools {
    fn layout(&self) -> &KvLayout {
        &self.host.layout
    }
    fn memory(&self) -> PoolMemory {
        self.memory
    }
    fn blocks(&self) -> (usize, usize) {
        (self.host.text_blocks, self.host.frame_blocks)
    }
}

/// A prepared attention: the block list and query orders it was made for.
#[derive(Debug)]
pub struct SimPlan {
    layout: KvLayout,
    blocks: (usize, usize),
    q_heads: usize,
    entries: Vec<BlockEntry>,
    q_order: Vec<i32>,
    /// Each query's first key (empty: 0).
    q_from: Vec<i32>,
}

impl PlanInfo for SimPlan {
    fn layout(&self) -> &KvLayout {
        &self.layout
    }
    fn splits(&self) -> usize {
        1
    }
}

impl Gpu for SimDevice {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Weights = SimWeights;
    type Pools = SimPools;
    type Plan = SimPlan;
    type Queue = SimQueue;
    type Event = SimEvent;

    fn name(&self) -> String {
        "simulated (CPU twins of the CUDA kernels)".into()
    }
    fn can_map_host_memory(&self) -> bool {
        true
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>, CudaError> {
        Ok(vec![0.0; len.max(1)])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>, CudaError> {
        Ok(data.to_vec())
    }
    fn upload_ids(&self, data: &[u32]) -> Result<Vec<u32>, CudaError> {
        Ok(data.to_vec())
    }
    fn upload_tensor(&self, t: &Tensor) -> Result<SimWeights, CudaError> {
        let dtype = match t.data() {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::Quant(q) => {
                let m = crate::checks::quant_matrix(t, &q)?;
                return Ok(SimWeights {
                    data: Vec::new(),
                    dtype: t.data().dtype(),
                    quant: Some(m),
                });
            }
        };
        Ok(SimWeights {
            data: t.to_f32_vec(),
            dtype,
            quant: None,
        })
    }
    fn weights_len(w: &SimWeights) -> usize {
        w.len()
    }
    fn weights_bytes(w: &SimWeights) -> usize {
        match &w.quant {
            Some(q) => q.codes.len() + 2 * (q.scales.len() + q.zeros.len()),
            None => w.data.len() * w.dtype.size_bytes(),
        }
    }
    fn upload_vector(&self, v: &[f32]) -> Result<SimWeights, CudaError> {
        Ok(SimWeights {
            data: v.to_vec(),
            dtype: DType::F32,
            quant: None,
        })
    }
    fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>, CudaError> {
        Ok(b.clone())
    }
    fn write(&self, dst: &mut Vec<f32>, data: &[f32]) -> Result<(), CudaError> {
        check_len("host-to-device copy", "destination", dst.len(), data.len())?;
        dst[..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn copy(
        &self,
        src: &Vec<f32>,
        offset: usize,
        len: usize,
        dst: &mut Vec<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "device-to-device copy";
        check_len(OP, "source", src.len(), offset + len)?;
        check_len(OP, "destination", dst.len(), len)?;
        dst[..len].copy_from_slice(&src[offset..offset + len]);
        Ok(())
    }
    fn synchronize(&self) -> Result<(), CudaError> {
        Ok(())
    }

    fn embedding(
        &self,
        out: &mut Vec<f32>,
        table: &SimWeights,
        ids: &[u32],
        hidden: usize,
    ) -> Result<(), CudaError> {
        crate::checks::check_embedding(table.len(), hidden, ids, out.len())?;
        let rows = match &table.quant {
            Some(q) => {
                crate::checks::check_quant_table(q.cols, hidden)?;
                reference::embedding_gather_quant(q, ids)
            }
            None => reference::embedding_gather(&table.data, hidden, ids),
        };
        out[..rows.len()].copy_from_slice(&rows);
        Ok(())
    }
    fn rmsnorm(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        weight: &SimWeights,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let weight = weight.floats("rmsnorm")?;
        crate::checks::check_rmsnorm([x.len(), out.len(), weight.len()], rows, dim)?;
        let y = reference::rmsnorm(&x[..rows * dim], &weight[..dim], dim, eps);
        out[..y.len()].copy_from_slice(&y);
        Ok(())
    }
    fn gemv(
        &self,
        y: &mut Vec<f32>,
        w: &SimWeights,
        x: &Vec<f32>,
        rows: usize,
        cols: usize,
        n_tok: usize,
    ) -> Result<(), CudaError> {
        crate::checks::check_gemv([w.len(), x.len(), y.len()], rows, cols, n_tok)?;
        let out = match &w.quant {
            Some(q) => {
                crate::checks::check_quant_shape((q.rows, q.cols), (rows, cols))?;
                reference::gemv_quant(q, &x[..n_tok * cols], n_tok)
            }
            None => reference::gemv(&w.data, &x[..n_tok * cols], rows, cols, n_tok),
        };
        y[..out.len()].copy_from_slice(&out);
        Ok(())
    }
    fn bias_add(
        &self,
        y: &mut Vec<f32>,
        b: &SimWeights,
        rows: usize,
        n_tok: usize,
    ) -> Result<(), CudaError> {
        let b = b.floats("bias add")?;
        crate::checks::check_bias_add([y.len(), b.len()], rows, n_tok)?;
        if rows > 0 {
            reference::bias_add(&mut y[..rows * n_tok], &b[..rows]);
        }
        Ok(())
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &Vec<u32>,
        inv_freq: &Vec<f32>,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
    ) -> Result<(), CudaError> {
        crate::checks::check_rope(
            [x.len(), positions.len(), inv_freq.len()],
            n_tokens,
            n_heads,
            head_dim,
            rotary_dim,
        )?;
        reference::rope(
            &mut x[..n_tokens * n_heads * head_dim],
            &positions[..n_tokens],
            inv_freq,
            n_heads,
            head_dim,
            rotary_dim,
        );
        Ok(())
    }
    fn rope_mrope(
        &self,
        x: &mut Vec<f32>,
        positions3: &Vec<u32>,
        inv_freq: &Vec<f32>,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        section: [usize; 3],
        interleaved: bool,
    ) -> Result<(), CudaError> {
        crate::checks::check_rope_mrope(
            [x.len(), positions3.len(), inv_freq.len()],
            n_tokens,
            n_heads,
            head_dim,
            section,
        )?;
        let (x, p) = (
            &mut x[..n_tokens * n_heads * head_dim],
            &positions3[..3 * n_tokens],
        );
        if interleaved {
            let s = [section[1], section[2]];
            reference::rope_mrope_interleaved(x, p, inv_freq, n_heads, head_dim, s);
        } else {
            let s = [section[0], section[1]];
            reference::rope_mrope(x, p, inv_freq, n_heads, head_dim, s);
        }
        Ok(())
    }
    fn residual_add(&self, x: &mut Vec<f32>, y: &Vec<f32>, n: usize) -> Result<(), CudaError> {
        crate::checks::check_residual_add([x.len(), y.len()], n)?;
        reference::residual_add(&mut x[..n], &y[..n]);
        Ok(())
    }
    fn swiglu(
        &self,
        out: &mut Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        crate::checks::check_swiglu([out.len(), gate.len(), up.len()], n)?;
        let y = reference::swiglu(&gate[..n], &up[..n]);
        out[..n].copy_from_slice(&y);
        Ok(())
    }
    fn geglu(
        &self,
        out: &mut Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        crate::checks::check_gated("geglu", [out.len(), gate.len(), up.len()], n)?;
        let y = reference::geglu(&gate[..n], &up[..n]);
        out[..n].copy_from_slice(&y);
        Ok(())
    }
    fn softcap(&self, x: &mut Vec<f32>, n: usize, cap: f32) -> Result<(), CudaError> {
        check_len("softcap", "x", x.len(), n)?;
        reference::softcap(&mut x[..n], cap);
        Ok(())
    }
    fn scale_round(
        &self,
        x: &mut Vec<f32>,
        n: usize,
        scale: f32,
        round: DType,
    ) -> Result<(), CudaError> {
        check_len("scale round", "x", x.len(), n)?;
        reference::scale_round(&mut x[..n], scale, round);
        Ok(())
    }

    fn kv_pools(
        &self,
        layout: KvLayout,
        text_blocks: usize,
        frame_blocks: usize,
        memory: PoolMemory,
    ) -> Result<SimPools, CudaError> {
        layout.validate()?;
        Ok(SimPools {
            host: HostPools::new(layout, text_blocks, frame_blocks),
            memory,
            touched: AtomicU64::new(0),
            copied_by: None,
        })
    }
    fn kv_store_text(
        &self,
        pools: &mut SimPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        src_token: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv store text";
        let l = pools.host.layout;
        crate::checks::check_span(OP, &l, pools.host.text_blocks, block, tok_offset, len)?;
        let r = crate::checks::token_rows(OP, [k.len(), v.len()], src_token, len, l.row_elems())?;
        pools.compute(self, OP)?;
        pools
            .host
            .store_text(block, tok_offset, &k[r.clone()], &v[r]);
        Ok(())
    }
    fn kv_quantize_frame(
        &self,
        pools: &mut SimPools,
        block: usize,
        tok_offset: usize,
        len: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        src_token: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv quantize frame";
        let l = pools.host.layout;
        crate::checks::check_span(OP, &l, pools.host.frame_blocks, block, tok_offset, len)?;
        crate::checks::check_frame_offset(OP, &l, tok_offset)?;
        let r = crate::checks::token_rows(OP, [k.len(), v.len()], src_token, len, l.row_elems())?;
        pools.compute(self, OP)?;
        pools
            .host
            .quantize_frame(block, tok_offset, len, &k[r.clone()], &v[r]);
        Ok(())
    }
    fn attention_plan(
        &self,
        layout: &KvLayout,
        blocks: (usize, usize),
        q_heads: usize,
        entries: &[BlockEntry],
        q_order: &[i32],
        q_from: &[i32],
        _splits: Splits,
    ) -> Result<SimPlan, CudaError> {
        crate::checks::check_attention(layout, blocks, q_heads, entries, q_order.len())?;
        crate::checks::check_q_from(q_from, q_order.len())?;
        Ok(SimPlan {
            layout: *layout,
            blocks,
            q_heads,
            entries: entries.to_vec(),
            q_order: q_order.to_vec(),
            q_from: q_from.to_vec(),
        })
    }
    fn attend(
        &self,
        pools: &SimPools,
        plan: &mut SimPlan,
        q: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "mixed attention";
        let l = pools.host.layout;
        crate::checks::check_plan_on_pools(
            (&plan.layout, plan.blocks),
            (&l, (pools.host.text_blocks, pools.host.frame_blocks)),
        )?;
        let n = plan.q_order.len() * plan.q_heads * l.head_dim;
        check_len(OP, "q", q.len(), n)?;
        check_len(OP, "out", out.len(), n)?;
        pools.compute(self, OP)?;
        let y = reference::attention_from(
            &pools.host,
            &q[..n],
            &plan.q_order,
            &plan.q_from,
            plan.q_heads,
            &plan.entries,
        );
        out[..n].copy_from_slice(&y);
        Ok(())
    }

    fn copy_queue(&self) -> Result<SimQueue, CudaError> {
        Ok(SimQueue::default())
    }
    fn record(&self, on: Option<&SimQueue>) -> Result<SimEvent, CudaError> {
        Ok(match on {
            None => SimEvent(EventAt::Compute(self.compute.load(Ordering::SeqCst))),
            Some(q) => SimEvent(EventAt::Copy(
                q.0.clone(),
                q.0.issued.load(Ordering::SeqCst),
            )),
        })
    }
    fn wait(&self, on: Option<&SimQueue>, event: &SimEvent) -> Result<(), CudaError> {
        match (on, &event.0) {
            (Some(q), EventAt::Compute(t)) => {
                q.0.seen_compute.fetch_max(*t, Ordering::SeqCst);
            }
            (None, EventAt::Copy(q, seq)) => {
                q.seen_by_compute.fetch_max(*seq, Ordering::SeqCst);
            }
            // A queue waiting on itself or on another copy queue: in order already.
            _ => {}
        }
        Ok(())
    }
    fn copy_pool_prefix(
        &self,
        src: &SimPools,
        dst: &mut SimPools,
        blocks: (usize, usize),
        queue: &SimQueue,
    ) -> Result<u64, CudaError> {
        const OP: &str = "kv offload copy";
        let l = src.host.layout;
        crate::checks::check_pool_copy(
            (&l, (src.host.text_blocks, src.host.frame_blocks)),
            (
                &dst.host.layout,
                (dst.host.text_blocks, dst.host.frame_blocks),
            ),
            blocks,
        )?;
        if src.memory != PoolMemory::MappedHost {
            return Err(shape(
                OP,
                "source pools are not in mapped host memory".into(),
            ));
        }
        let seen = queue.0.seen_compute.load(Ordering::SeqCst);
        for (what, p) in [("source", src), ("destination", &*dst)] {
            let t = p.touched.load(Ordering::SeqCst);
            if t > seen {
                return Err(shape(
                    OP,
                    format!(
                        "simulated device: copy queued before the copy queue waited for compute \
                         operation {t} on the {what} pools (it has waited for {seen})"
                    ),
                ));
            }
        }
        let (s, d) = (&src.host, &mut dst.host);
        let text = blocks.0 * l.text_block_elems();
        let codes = blocks.1 * l.frame_block_code_bytes();
        let kp = blocks.1 * 2 * l.k_params_per_block();
        let vp = blocks.1 * 2 * l.v_params_per_block();
        d.k_text[..text].copy_from_slice(&s.k_text[..text]);
        d.v_text[..text].copy_from_slice(&s.v_text[..text]);
        d.k_codes[..codes].copy_from_slice(&s.k_codes[..codes]);
        d.v_codes[..codes].copy_from_slice(&s.v_codes[..codes]);
        d.k_params[..kp].copy_from_slice(&s.k_params[..kp]);
        d.v_params[..vp].copy_from_slice(&s.v_params[..vp]);
        let seq = queue.0.issued.fetch_add(1, Ordering::SeqCst) + 1;
        dst.copied_by = Some((queue.0.clone(), seq));
        // FP16 text and parameter halves: 2 bytes each.
        Ok((2 * 2 * text + 2 * codes + 2 * (kp + vp)) as u64)
    }
}
