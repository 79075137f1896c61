//! The KV cache: per-layer key and value rows, preallocated for the whole context, alone or as
//! one slot of a [`KvPool`] whose sequences a forward pass serves in one dispatch per kernel.

use crate::error::{Error, Result};
use crate::gpu::{storage_buffer_zeroed, GpuContext, Recorder};
use crate::hparams::ModelConfig;
use crate::kernels::attention::{CachedLayer, KvBuffers};
use std::sync::{Arc, Mutex};

/// Per layer one key and one value buffer holding `slots` caches of `n_ctx` positions each,
/// slot `s` at rows `s · n_ctx ..`.
struct Store {
    layers: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    n_ctx: usize,
    row_bytes: u64,
    /// Slots not held by a cache.
    free: Mutex<Vec<usize>>,
}

impl Store {
    fn new(ctx: &GpuContext, n_layers: usize, row_bytes: u64, n_ctx: usize, slots: usize) -> Result<Self> {
        let bytes = (slots * n_ctx) as u64 * row_bytes;
        if bytes > ctx.max_binding() {
            return Err(Error::InvalidOption(format!(
                "{slots} KV caches of {n_ctx} positions need {bytes} bytes per layer, over this device's binding limit of {} bytes",
                ctx.max_binding()
            )));
        }
        let layers = (0..n_layers)
            .map(|l| {
                (storage_buffer_zeroed(ctx, &format!("k_cache.{l}"), bytes), storage_buffer_zeroed(ctx, &format!("v_cache.{l}"), bytes))
            })
            .collect();
        Ok(Self { layers, n_ctx, row_bytes, free: Mutex::new((0..slots).rev().collect()) })
    }

    /// A new store of one slot, taken.
    fn alone(ctx: &GpuContext, n_layers: usize, row_bytes: u64, n_ctx: usize) -> Result<KvCache> {
        Arc::new(Self::new(ctx, n_layers, row_bytes, n_ctx, 1)?)
            .take()
            .ok_or_else(|| Error::Engine("a new KV store has no free slot".into()))
    }

    fn take(self: &Arc<Self>) -> Option<KvCache> {
        let slot = self.free.lock().ok()?.pop()?;
        Some(KvCache { store: Some(self.clone()), slot, n_ctx: self.n_ctx, len: 0 })
    }
}

/// KV caches of one size sharing per-layer buffers: the caches a server or an evaluation runs
/// side by side, so that a forward pass over several of them stores their keys and computes their
/// attention in one dispatch each (per row: its slot and position) instead of one per sequence.
/// The buffers are allocated at once, like llama.cpp's cache for its parallel slots.
#[derive(Clone)]
pub struct KvPool {
    store: Arc<Store>,
    ctx: Arc<GpuContext>,
}

impl KvPool {
    /// `slots` caches of `n_ctx` positions of a model shaped like `cfg` (at least one; fewer
    /// than asked where one layer's buffer would pass the device's binding limit).
    pub fn new(ctx: &Arc<GpuContext>, cfg: &ModelConfig, n_ctx: usize, slots: usize) -> Result<Self> {
        let per_slot = (n_ctx as u64 * KvCache::row_bytes(cfg)).max(1);
        let fit = (ctx.max_binding() / per_slot).max(1) as usize;
        if slots > fit {
            tracing::info!(slots, fit, "KV pool capped by the binding limit; further caches are allocated apart");
        }
        let store = Arc::new(Store::new(ctx, cfg.n_layers, KvCache::row_bytes(cfg), n_ctx, slots.clamp(1, fit))?);
        Ok(Self { store, ctx: ctx.clone() })
    }

    /// An empty cache in a free slot, or — when every slot is held — a cache of its own (it
    /// works the same; its rows just take dispatches of their own).
    pub fn cache(&self) -> Result<KvCache> {
        match self.store.take() {
            Some(c) => Ok(c),
            None => Store::alone(&self.ctx, self.store.layers.len(), self.store.row_bytes, self.store.n_ctx),
        }
    }

    /// Positions per cache.
    pub fn n_ctx(&self) -> usize {
        self.store.n_ctx
    }

    /// Slots in the shared buffers.
    pub fn slots(&self) -> usize {
        (self.store.layers.first().map_or(0, |(k, _)| k.size()) / (self.store.n_ctx as u64 * self.store.row_bytes).max(1)) as usize
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.store.free.lock().map_or(0, |f| f.len())
    }

    /// GPU bytes the pool holds.
    pub fn bytes(&self) -> u64 {
        self.store.layers.iter().map(|(k, v)| k.size() + v.size()).sum()
    }
}

/// Keys and values of every processed position of one sequence.
///
/// Each layer's rows are `n_kv_heads × head_dim` f16, two per u32 word (half the memory of f32,
/// as llama.cpp keeps its cache; `kernels::kv_store` writes them), position `j` at row
/// `base + j` of the layer's buffers (`base` 0 for a cache of its own, its slot's first row in a
/// [`KvPool`]). The cache is written at `len()` by the forward pass; `truncate` forgets positions
/// (their rows are simply overwritten later). Dropping a pooled cache frees its slot.
pub struct KvCache {
    /// The buffers; `None` while lent out ([`KvCache::lend`]).
    store: Option<Arc<Store>>,
    slot: usize,
    n_ctx: usize,
    len: usize,
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Some(mut free) = self.store.as_ref().and_then(|s| s.free.lock().ok()) {
            free.push(self.slot);
        }
    }
}

impl KvCache {
    /// A cache of its own for `n_ctx` positions of a model shaped like `cfg`.
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, n_ctx: usize) -> Result<Self> {
        Store::alone(ctx, cfg.n_layers, Self::row_bytes(cfg), n_ctx)
    }

    /// Bytes of one position in one layer's key (or value) buffer.
    pub fn row_bytes(cfg: &ModelConfig) -> u64 {
        (cfg.kv_dim() * 2) as u64
    }

    /// Bytes of one position over every layer, keys and values.
    pub fn bytes_per_position(cfg: &ModelConfig) -> u64 {
        2 * cfg.n_layers as u64 * Self::row_bytes(cfg)
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in positions.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// A second cache holding a copy of this one's positions (copied on the GPU, nothing
    /// recomputed): two continuations of one prefix, each with its own cache. A pooled cache's
    /// copy takes a slot of the same pool while one is free.
    pub fn fork(&self, ctx: &GpuContext) -> Result<Self> {
        let store = self.store()?;
        let mut copy = match store.take() {
            Some(c) => c,
            None => Store::alone(ctx, store.layers.len(), store.row_bytes, self.n_ctx)?,
        };
        self.copy_into(ctx, &mut copy, self.len)?;
        Ok(copy)
    }

    /// A cache of its own with room for `n_ctx` positions (at least the ones copied), holding a
    /// copy of this one's first `len` positions: a continuation longer than this cache holds.
    pub fn fork_prefix(&self, ctx: &GpuContext, len: usize, n_ctx: usize) -> Result<Self> {
        let store = self.store()?;
        let len = len.min(self.len);
        let mut copy = Store::alone(ctx, store.layers.len(), store.row_bytes, n_ctx.max(len))?;
        self.copy_into(ctx, &mut copy, len)?;
        Ok(copy)
    }

    /// Copy this cache's first `len` positions (at most its own and `to`'s capacity) to the
    /// start of `to`, which then holds exactly those.
    fn copy_into(&self, ctx: &GpuContext, to: &mut KvCache, len: usize) -> Result<()> {
        let (store, to_store) = (self.store()?, to.store()?);
        let len = len.min(self.len).min(to.n_ctx);
        let used = len as u64 * store.row_bytes;
        if used > 0 {
            let (src, dst) = (self.base() as u64 * store.row_bytes, to.base() as u64 * store.row_bytes);
            let mut rec = Recorder::new(ctx);
            // A buffer cannot be copied onto itself: a pooled copy goes through a staging buffer.
            let staging = Arc::ptr_eq(store, to_store).then(|| storage_buffer_zeroed(ctx, "kv_fork", used));
            for ((k, v), (k2, v2)) in store.layers.iter().zip(&to_store.layers) {
                for (a, b) in [(k, k2), (v, v2)] {
                    match &staging {
                        Some(s) => {
                            rec.copy(a, src, s, 0, used);
                            rec.copy(s, 0, b, dst, used);
                        }
                        None => rec.copy(a, src, b, dst, used),
                    }
                }
            }
            rec.submit();
        }
        to.len = len;
        Ok(())
    }

    /// This cache's contents, leaving in their place a cache of no layers (which every forward
    /// pass refuses) until they are put back: how a session lends its cache to the batching
    /// thread for a pass.
    pub(crate) fn lend(&mut self) -> KvCache {
        let empty = KvCache { store: None, slot: self.slot, n_ctx: self.n_ctx, len: self.len };
        std::mem::replace(self, empty)
    }

    /// Forget every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Check that `n` more positions fit.
    pub(crate) fn reserve(&self, n: usize) -> Result<()> {
        if self.len + n > self.n_ctx {
            return Err(Error::ContextOverflow { needed: self.len + n, n_ctx: self.n_ctx });
        }
        Ok(())
    }

    fn store(&self) -> Result<&Arc<Store>> {
        self.store.as_ref().ok_or_else(|| Error::Engine("a KV cache used while lent to a forward pass".into()))
    }

    /// The row of position 0 in the layer buffers.
    pub(crate) fn base(&self) -> usize {
        self.slot * self.n_ctx
    }

    /// Layer `l`'s buffers, which other caches of the same pool share.
    pub(crate) fn buffers(&self, l: usize) -> Result<KvBuffers<'_>> {
        let (k, v) = self.store()?.layers.get(l).ok_or_else(|| Error::Engine(format!("a KV cache has no layer {l}")))?;
        Ok(KvBuffers { k, v })
    }

    /// Layer `l`'s keys and values as the training kernels read them, with the positions held.
    pub(crate) fn layer(&self, l: usize) -> Result<CachedLayer<'_>> {
        let KvBuffers { k, v } = self.buffers(l)?;
        Ok(CachedLayer { k, v, base: self.base(), len: self.len })
    }

    /// Whether `other` keeps its rows in the same buffers (one dispatch can serve both).
    pub(crate) fn shares_buffers(&self, other: &KvCache) -> bool {
        matches!((&self.store, &other.store), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
    }

    /// The number of layers (0 while lent).
    pub(crate) fn n_layers(&self) -> usize {
        self.store.as_ref().map_or(0, |s| s.layers.len())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
