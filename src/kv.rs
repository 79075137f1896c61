//! The KV cache: per-layer key and value rows, preallocated for the whole context.

use crate::error::{Error, Result};
use crate::gpu::{storage_buffer_zeroed, GpuContext};
use crate::hparams::ModelConfig;
use crate::kernels::attention::CachedLayer;

/// Keys and values of every processed position, one buffer pair per layer.
///
/// Row `j` of a layer's buffer holds position `j`: `n_kv_heads × head_dim` f16, two per u32 word
/// (half the memory of f32, as llama.cpp keeps its cache; `kernels::kv_store` writes them). The
/// cache is written at `len()` by the forward pass; `truncate` forgets positions (their rows are
/// simply overwritten later).
pub struct KvCache {
    /// Per layer: (keys, values).
    layers: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    n_ctx: usize,
    len: usize,
}

impl KvCache {
    /// A cache for `n_ctx` positions of a model shaped like `cfg`.
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, n_ctx: usize) -> Result<Self> {
        let bytes = n_ctx as u64 * Self::row_bytes(cfg);
        if bytes > ctx.max_binding() {
            return Err(Error::InvalidOption(format!(
                "a context of {n_ctx} positions needs {bytes} bytes per layer cache, over this device's binding limit of {} bytes",
                ctx.max_binding()
            )));
        }
        let layers = (0..cfg.n_layers)
            .map(|l| {
                (storage_buffer_zeroed(ctx, &format!("k_cache.{l}"), bytes), storage_buffer_zeroed(ctx, &format!("v_cache.{l}"), bytes))
            })
            .collect();
        Ok(Self { layers, n_ctx, len: 0 })
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
    /// recomputed): two continuations of one prefix, each with its own cache.
    pub fn fork(&self, ctx: &GpuContext) -> Result<Self> {
        let layers: Vec<(wgpu::Buffer, wgpu::Buffer)> = self
            .layers
            .iter()
            .enumerate()
            .map(|(l, (k, _))| {
                let size = k.size();
                (storage_buffer_zeroed(ctx, &format!("k_cache.{l}"), size), storage_buffer_zeroed(ctx, &format!("v_cache.{l}"), size))
            })
            .collect();
        let used = self.len as u64 * self.layers.first().map_or(0, |(k, _)| k.size() / self.n_ctx as u64);
        if used > 0 {
            let mut rec = crate::gpu::Recorder::new(ctx);
            for ((k, v), (k2, v2)) in self.layers.iter().zip(&layers) {
                rec.copy(k, 0, k2, 0, used);
                rec.copy(v, 0, v2, 0, used);
            }
            rec.submit();
        }
        Ok(Self { layers, n_ctx: self.n_ctx, len: self.len })
    }

    /// This cache's contents, leaving in their place a cache of no layers (which every forward
    /// pass refuses) until they are put back: how a session lends its cache to the batching
    /// thread for a pass.
    pub(crate) fn lend(&mut self) -> KvCache {
        let empty = KvCache { layers: Vec::new(), n_ctx: self.n_ctx, len: self.len };
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

    /// Layer `l`'s keys and values as the attention kernels read them, with the positions held.
    pub(crate) fn layer(&self, l: usize) -> CachedLayer<'_> {
        let (k, v) = &self.layers[l];
        CachedLayer { k, v, len: self.len }
    }

    /// The number of layers.
    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
