//! Adapters resident on the GPU: every A and every B matrix of every loaded adapter packed into
//! one A buffer and one B buffer, so one fused dispatch can mix any adapters of a batch.
//!
//! Each adapter owns one contiguous range of each pack (its (layer, projection) matrices one after
//! another). Adding appends, growing a pack by a GPU copy when full; removing compacts the packs
//! on the GPU. Nothing is kept on the host once uploaded.

use super::{ActiveAdapter, AdapterId, LoraAdapter, LoraError, LoraLimits, Proj};
use crate::gpu::{storage_buffer_zeroed, upload, GpuContext, Recorder};
use crate::hparams::ModelConfig;
use crate::kernels::matmul::LoraSlot;
use std::collections::BTreeMap;

/// What the registry knows about a resident adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    /// The name it was added under (its directory for PEFT adapters).
    pub name: String,
    /// Rank.
    pub rank: usize,
    /// Trained scale (alpha/r or alpha/√r).
    pub scale: f32,
    /// Activated LoRA invocation sequence (`None`: applies to every token).
    pub invocation_tokens: Option<Vec<u32>>,
    /// GPU bytes of its A and B matrices.
    pub bytes: u64,
}

struct Resident {
    info: AdapterInfo,
    /// Start of its ranges in the packs (floats).
    a_base: usize,
    b_base: usize,
    a_len: usize,
    b_len: usize,
    /// Per `layer · 7 + proj`: offsets of A and B relative to the bases.
    offsets: Vec<Option<(usize, usize)>>,
}

/// One growable f32 buffer that adapters take ranges of.
struct Pack {
    name: &'static str,
    buf: wgpu::Buffer,
    used: usize,
}

impl Pack {
    fn new(ctx: &GpuContext, name: &'static str) -> Self {
        Self { name, buf: storage_buffer_zeroed(ctx, name, 16), used: 0 }
    }

    fn capacity(&self) -> usize {
        self.buf.size() as usize / 4
    }

    /// Append `data` (whose length is a multiple of 4), growing to at most `max_floats`.
    fn push(&mut self, ctx: &GpuContext, data: &[f32], max_floats: usize) -> Option<usize> {
        let need = self.used + data.len();
        if need > max_floats {
            return None;
        }
        if need > self.capacity() {
            let cap = need.max(self.capacity() * 2).min(max_floats);
            let bigger = storage_buffer_zeroed(ctx, self.name, (cap * 4) as u64);
            let mut rec = Recorder::new(ctx);
            rec.copy(&self.buf, 0, &bigger, 0, (self.used * 4) as u64);
            rec.submit();
            self.buf = bigger;
        }
        upload(ctx, &self.buf, (self.used * 4) as u64, data);
        let at = self.used;
        self.used = need;
        Some(at)
    }
}

/// Every adapter loaded for one base model, on the GPU.
pub struct AdapterRegistry {
    limits: LoraLimits,
    n_layers: usize,
    a: Pack,
    b: Pack,
    adapters: BTreeMap<AdapterId, Resident>,
    next_id: u32,
}

const N_PROJ: usize = Proj::ALL.len();

impl AdapterRegistry {
    /// An empty registry for a model of `n_layers` layers.
    pub fn new(ctx: &GpuContext, n_layers: usize, limits: LoraLimits) -> Self {
        Self { limits, n_layers, a: Pack::new(ctx, "lora_a_pack"), b: Pack::new(ctx, "lora_b_pack"), adapters: BTreeMap::new(), next_id: 0 }
    }

    /// The limits adapters are checked against.
    pub fn limits(&self) -> &LoraLimits {
        &self.limits
    }

    /// Check `adapter` against the base model `c` and the limits, then upload it. On error the
    /// registry is unchanged, so the adapters already resident keep serving.
    pub fn add(&mut self, ctx: &GpuContext, name: &str, adapter: &LoraAdapter, c: &ModelConfig) -> Result<AdapterId, LoraError> {
        let err = |msg: String| LoraError { adapter: name.to_string(), msg };
        adapter.check(c, &self.limits).map_err(err)?;
        if self.adapters.len() >= self.limits.max_adapters {
            return Err(err(format!(
                "{} adapters are already resident, the limit (max_adapters) is {}",
                self.adapters.len(),
                self.limits.max_adapters
            )));
        }
        let mut a_data = Vec::new();
        let mut b_data = Vec::new();
        let mut offsets = vec![None; self.n_layers * N_PROJ];
        for (&(layer, proj), w) in &adapter.targets {
            offsets[layer * N_PROJ + proj.index()] = Some((a_data.len(), b_data.len()));
            // Every A matrix starts on a vec4 boundary: its rows are `in` floats, a multiple of 4.
            a_data.extend_from_slice(&w.a);
            b_data.extend_from_slice(&w.b);
        }
        b_data.resize(b_data.len().div_ceil(4) * 4, 0.0);
        let max_floats = (self.limits.max_bytes.min(ctx.max_binding()) / 4) as usize;
        let bytes = ((a_data.len() + b_data.len()) * 4) as u64;
        let over = |pack: &Pack, more: usize| pack.used + more > max_floats;
        if over(&self.a, a_data.len()) || over(&self.b, b_data.len()) {
            return Err(err(format!(
                "needs {bytes} more GPU bytes; the packs hold {} of at most {} bytes each (max_bytes, capped by the device's binding limit)",
                (self.a.used + self.b.used) * 4,
                max_floats * 4
            )));
        }
        let a_base = self.a.push(ctx, &a_data, max_floats).ok_or_else(|| err("A pack full".into()))?;
        let b_base = self.b.push(ctx, &b_data, max_floats).ok_or_else(|| err("B pack full".into()))?;
        let id = AdapterId(self.next_id);
        self.next_id += 1;
        let info = AdapterInfo {
            name: name.to_string(),
            rank: adapter.rank,
            scale: adapter.scale(),
            invocation_tokens: adapter.invocation_tokens.clone(),
            bytes,
        };
        self.adapters.insert(id, Resident { info, a_base, b_base, a_len: a_data.len(), b_len: b_data.len(), offsets });
        tracing::info!(%id, name, rank = adapter.rank, bytes, "adapter resident");
        Ok(id)
    }

    /// Drop an adapter and compact the packs on the GPU.
    pub fn remove(&mut self, ctx: &GpuContext, id: AdapterId) -> crate::Result<()> {
        self.adapters.remove(&id).ok_or(crate::Error::UnknownAdapter(id))?;
        let mut rec = Recorder::new(ctx);
        let mut compact = |pack: &mut Pack, ranges: Vec<(&mut usize, usize)>| {
            let fresh = storage_buffer_zeroed(ctx, pack.name, pack.buf.size());
            let mut at = 0;
            for (base, len) in ranges {
                rec.copy(&pack.buf, (*base * 4) as u64, &fresh, (at * 4) as u64, (len * 4) as u64);
                *base = at;
                at += len;
            }
            pack.buf = fresh;
            pack.used = at;
        };
        let (a, b) = (&mut self.a, &mut self.b);
        compact(a, self.adapters.values_mut().map(|r| (&mut r.a_base, r.a_len)).collect());
        compact(b, self.adapters.values_mut().map(|r| (&mut r.b_base, r.b_len)).collect());
        rec.submit();
        Ok(())
    }

    /// What is known about `id`.
    pub fn info(&self, id: AdapterId) -> Option<&AdapterInfo> {
        self.adapters.get(&id).map(|r| &r.info)
    }

    /// Every resident adapter.
    pub fn ids(&self) -> impl Iterator<Item = AdapterId> + '_ {
        self.adapters.keys().copied()
    }

    /// GPU bytes held by the packs.
    pub fn n_bytes(&self) -> u64 {
        self.a.buf.size() + self.b.buf.size()
    }

    /// Check that every adapter of `active` is resident.
    pub fn check_resident(&self, active: &[ActiveAdapter]) -> crate::Result<()> {
        match active.iter().find(|a| !self.adapters.contains_key(&a.id)) {
            Some(a) => Err(crate::Error::UnknownAdapter(a.id)),
            None => Ok(()),
        }
    }

    /// Where an adapter's floats lie in the A and B packs: (start, length) of each.
    pub(crate) fn ranges(&self, id: AdapterId) -> Option<[(usize, usize); 2]> {
        self.adapters.get(&id).map(|r| [(r.a_base, r.a_len), (r.b_base, r.b_len)])
    }

    /// The packed A and B buffers.
    pub(crate) fn packs(&self) -> (&wgpu::Buffer, &wgpu::Buffer) {
        (&self.a.buf, &self.b.buf)
    }

    /// Dispatch slots for projection `proj` of `layer`, one per adapter of `active` (rank 0 where
    /// an adapter does not target it), and the largest rank; `None` when none of them targets it.
    pub(crate) fn slots(&self, layer: usize, proj: Proj, active: &[ActiveAdapter]) -> Option<(Vec<LoraSlot>, usize)> {
        let mut max_rank = 0;
        let slots = active
            .iter()
            .map(|a| {
                let r = self.adapters.get(&a.id)?;
                let (ao, bo) = r.offsets.get(layer * N_PROJ + proj.index()).copied().flatten()?;
                max_rank = max_rank.max(r.info.rank);
                Some(LoraSlot { a_offset: r.a_base + ao, b_offset: r.b_base + bo, rank: r.info.rank, scale: r.info.scale * a.scale })
            })
            .map(|s| s.unwrap_or(LoraSlot { a_offset: 0, b_offset: 0, rank: 0, scale: 0.0 }))
            .collect();
        (max_rank > 0).then_some((slots, max_rank))
    }

    /// Slots for projections `projs` of `layer` (`rows[i]` outputs each, `cols` inputs) run as one
    /// stacked product: for the shrink over their A matrices, which each adapter holds back to
    /// back (`rank × projs.len()` rows), and for the expand (each projection's own rank, reading
    /// its part of `u`); with the shrink's largest rank. `None` where an active adapter targets
    /// some of the projections but not all, or none targets any.
    pub(crate) fn stacked_slots(
        &self,
        layer: usize,
        projs: &[Proj],
        rows: &[usize],
        cols: usize,
        active: &[ActiveAdapter],
    ) -> Option<StackedSlots> {
        let (mut shrink, mut expand, mut max_rank) = (Vec::new(), Vec::new(), 0);
        for a in active {
            let r = self.adapters.get(&a.id)?;
            let offsets: Vec<_> = projs.iter().map(|p| r.offsets.get(layer * N_PROJ + p.index()).copied().flatten()).collect();
            let rank = r.info.rank;
            let slot = match offsets[..] {
                [Some((a0, b0)), ..] if offsets.iter().all(Option::is_some) => {
                    let (mut a_at, mut b_at) = (a0, b0);
                    for (o, n) in offsets.iter().flatten().zip(rows) {
                        if *o != (a_at, b_at) {
                            return None;
                        }
                        (a_at, b_at) = (a_at + rank * cols, b_at + n * rank);
                    }
                    max_rank = max_rank.max(rank * projs.len());
                    LoraSlot { a_offset: r.a_base + a0, b_offset: r.b_base + b0, rank, scale: r.info.scale * a.scale }
                }
                _ if offsets.iter().any(Option::is_some) => return None,
                _ => LoraSlot { a_offset: 0, b_offset: 0, rank: 0, scale: 0.0 },
            };
            shrink.push(LoraSlot { rank: slot.rank * projs.len(), ..slot });
            expand.push(slot);
        }
        (max_rank > 0).then_some(StackedSlots { shrink, expand, max_rank })
    }
}

/// Adapter slots of stacked projections ([`AdapterRegistry::stacked_slots`]).
pub(crate) struct StackedSlots {
    /// Over the stacked A matrices.
    pub shrink: Vec<LoraSlot>,
    /// Each projection's rank.
    pub expand: Vec<LoraSlot>,
    /// The shrink's largest rank: floats of `u` per batch row.
    pub max_rank: usize,
}
