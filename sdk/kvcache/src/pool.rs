//! Block storage: one pool per precision, blocks allocated on demand and recycled.
//!
//! A pool stores, for every block id, one buffer per layer holding that block's segments
//! for all KV heads (`[kv_heads][segment]`). Which ids are in use is decided by the cell
//! bookkeeping ([`crate::cells`]); the pool only owns the bytes.

use crate::layout::{Fp16Layout, QuantLayout};

/// The segment layout a pool stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolLayout {
    Fp16(Fp16Layout),
    Quant(QuantLayout),
}

impl PoolLayout {
    pub fn seg_bytes(&self) -> usize {
        match self {
            PoolLayout::Fp16(l) => l.seg_bytes(),
            PoolLayout::Quant(l) => l.seg_bytes(),
        }
    }
    pub fn block_tokens(&self) -> usize {
        match self {
            PoolLayout::Fp16(l) => l.tokens,
            PoolLayout::Quant(l) => l.tokens,
        }
    }
}

/// Storage of one precision.
#[derive(Clone)]
pub struct Pool {
    layout: PoolLayout,
    layers: usize,
    kv_heads: usize,
    /// `[layer][block id]`, each `kv_heads * seg_bytes` bytes (u64-backed for alignment).
    blocks: Vec<Vec<Box<[u64]>>>,
}

impl Pool {
    pub fn new(layout: PoolLayout, layers: usize, kv_heads: usize) -> Self {
        Self {
            layout,
            layers,
            kv_heads,
            blocks: vec![Vec::new(); layers],
        }
    }
    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }
    /// Bytes of one block in one layer (all KV heads).
    pub fn block_bytes_per_layer(&self) -> usize {
        self.kv_heads * self.layout.seg_bytes()
    }
    /// Bytes of one block over all layers.
    pub fn block_bytes(&self) -> u64 {
        (self.block_bytes_per_layer() * self.layers) as u64
    }
    /// Block ids with storage behind them (in use or free).
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.first().map_or(0, Vec::len)
    }
    /// Makes sure storage exists for ids `0..=id`.
    pub fn ensure(&mut self, id: u32) {
        let words = self.block_bytes_per_layer() / 8;
        for layer in &mut self.blocks {
            while layer.len() <= id as usize {
                layer.push(vec![0u64; words].into_boxed_slice());
            }
        }
    }
    /// Drops storage for ids `>= keep`.
    pub fn truncate_storage(&mut self, keep: usize) {
        for layer in &mut self.blocks {
            layer.truncate(keep);
            layer.shrink_to_fit();
        }
    }
    #[inline]
    pub fn segment(&self, layer: usize, id: u32, head: usize) -> &[u8] {
        let seg = self.layout.seg_bytes();
        let bytes: &[u8] = bytemuck::cast_slice(&self.blocks[layer][id as usize]);
        &bytes[head * seg..(head + 1) * seg]
    }
    #[inline]
    pub fn segment_mut(&mut self, layer: usize, id: u32, head: usize) -> &mut [u8] {
        let seg = self.layout.seg_bytes();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.blocks[layer][id as usize]);
        &mut bytes[head * seg..(head + 1) * seg]
    }
}
