//! Block storage: one pool per precision, blocks allocated on demand and recycled.
//!
//! Storage comes in chunks of consecutive block ids. A chunk is one allocation laid out
//! `[layer][kv head][block][segment]`, so the segments one attention task reads (one layer,
//! one KV head, consecutive blocks) sit next to each other in memory: hardware prefetchers
//! stream through them and a 2 MiB page (on Linux the chunk asks for transparent huge
//! pages) maps many of them with one TLB entry. Which ids are in use is decided by the cell
//! bookkeeping ([`crate::cells`]); the pool only owns the bytes.
//!
//! Memory: pages are committed when first written, so on huge pages a chunk is committed
//! almost whole with its first block (every (layer, KV head) run gets a write). A chunk is
//! at most 128 KiB per run and never holds more blocks than the cache's budget needs,
//! so the most a pool holds beyond its blocks in use is one chunk: about 12 MiB per pool
//! for a 30-layer, 3-KV-head model.

use crate::layout::{Fp16Layout, QuantLayout};
use jetvlm_core::mem::PageBuffer;

/// Target bytes of one (layer, KV head) run of a chunk: long enough to stream, short
/// enough that a partly used last chunk wastes little.
const RUN_BYTES: usize = 128 << 10;

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
    seg: usize,
    /// Blocks per chunk.
    chunk_blocks: usize,
    /// Each holds `chunk_blocks` consecutive block ids for every layer and KV head.
    chunks: Vec<PageBuffer>,
}

impl Pool {
    /// `max_blocks_hint`: about how many block ids the cache's budget needs (chunks are
    /// never larger than that).
    pub fn new(layout: PoolLayout, layers: usize, kv_heads: usize, max_blocks_hint: usize) -> Self {
        let seg = layout.seg_bytes();
        let chunk_blocks = (RUN_BYTES / seg).clamp(1, max_blocks_hint.max(1));
        Self {
            layout,
            layers,
            kv_heads,
            seg,
            chunk_blocks,
            chunks: Vec::new(),
        }
    }
    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }
    /// Bytes of one block in one layer (all KV heads).
    pub fn block_bytes_per_layer(&self) -> usize {
        self.kv_heads * self.seg
    }
    /// Bytes of one block over all layers.
    pub fn block_bytes(&self) -> u64 {
        (self.block_bytes_per_layer() * self.layers) as u64
    }
    fn chunk_bytes(&self) -> usize {
        self.chunk_blocks * self.block_bytes_per_layer() * self.layers
    }
    /// Block ids per storage chunk (storage grows and shrinks by whole chunks).
    pub fn chunk_blocks(&self) -> usize {
        self.chunk_blocks
    }
    /// Block ids with storage behind them (in use or free).
    pub fn allocated_blocks(&self) -> usize {
        self.chunks.len() * self.chunk_blocks
    }
    /// Makes sure storage exists for ids `0..=id`.
    pub fn ensure(&mut self, id: u32) {
        let bytes = self.chunk_bytes();
        while self.allocated_blocks() <= id as usize {
            self.chunks.push(PageBuffer::zeroed(bytes));
        }
    }
    /// Drops the storage of chunks whose ids are all `>= keep`.
    pub fn truncate_storage(&mut self, keep: usize) {
        self.chunks.truncate(keep.div_ceil(self.chunk_blocks));
        self.chunks.shrink_to_fit();
    }
    #[inline]
    fn offset(&self, layer: usize, id: u32, head: usize) -> (usize, usize) {
        let (c, slot) = (
            id as usize / self.chunk_blocks,
            id as usize % self.chunk_blocks,
        );
        let run = (layer * self.kv_heads + head) * self.chunk_blocks;
        (c, (run + slot) * self.seg)
    }
    #[inline]
    pub fn segment(&self, layer: usize, id: u32, head: usize) -> &[u8] {
        let (c, off) = self.offset(layer, id, head);
        &self.chunks[c].bytes()[off..off + self.seg]
    }
    #[inline]
    pub fn segment_mut(&mut self, layer: usize, id: u32, head: usize) -> &mut [u8] {
        let (c, off) = self.offset(layer, id, head);
        let seg = self.seg;
        &mut self.chunks[c].bytes_mut()[off..off + seg]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::KvPolicy;

    fn quant_pool(hint: usize) -> Pool {
        let l = QuantLayout::new(&KvPolicy::mixed(), 64).unwrap();
        Pool::new(PoolLayout::Quant(l), 3, 2, hint)
    }

    #[test]
    fn segments_are_disjoint_and_runs_contiguous() {
        let mut p = quant_pool(1000);
        p.ensure(70);
        let seg = p.layout().seg_bytes();
        let mut seen = std::collections::HashSet::new();
        for layer in 0..3 {
            for head in 0..2 {
                for id in 0..=70u32 {
                    let s = p.segment(layer, id, head);
                    assert_eq!(s.len(), seg);
                    assert!(seen.insert(s.as_ptr() as usize), "segment reused");
                    assert_eq!(s.as_ptr() as usize % 64, 0, "segment not on a cache line");
                    if !(id as usize + 1).is_multiple_of(p.chunk_blocks) {
                        let next = p.segment(layer, id + 1, head);
                        assert_eq!(next.as_ptr() as usize, s.as_ptr() as usize + seg);
                    }
                }
            }
        }
        // Writes land where reads look.
        p.segment_mut(2, 70, 1).fill(7);
        assert!(p.segment(2, 70, 1).iter().all(|&b| b == 7));
        assert!(p.segment(2, 70, 0).iter().all(|&b| b == 0));
        let c = p.clone();
        assert!(c.segment(2, 70, 1).iter().all(|&b| b == 7));
    }

    #[test]
    fn storage_grows_and_shrinks_by_chunks() {
        let mut p = quant_pool(1000);
        let cb = p.chunk_blocks;
        assert!(cb > 1);
        p.ensure(0);
        assert_eq!(p.allocated_blocks(), cb);
        p.ensure(cb as u32);
        assert_eq!(p.allocated_blocks(), 2 * cb);
        p.truncate_storage(cb + 1);
        assert_eq!(p.allocated_blocks(), 2 * cb);
        p.truncate_storage(cb);
        assert_eq!(p.allocated_blocks(), cb);
        p.truncate_storage(0);
        assert_eq!(p.allocated_blocks(), 0);
        // A small budget keeps chunks small.
        assert_eq!(quant_pool(3).chunk_blocks, 3);
    }
}
