//! The gradient of an adapter on the GPU, for training: the frozen prefix runs forward only (its
//! keys and values cached), the rows where the adapter is active run forward with their
//! activations kept, then backward through every layer to the adapter's A and B matrices.
//!
//! Base weights are frozen, so only activation gradients flow through them (the transposed
//! quantized product); the adapter's own gradients are accumulated into buffers laid out like the
//! registry's packs. The f32 reference (`ReferenceModel::lora_loss_and_grads`) is what it is
//! checked against.

use super::{ChunkLora, Logits, Model, Segment};
use crate::error::{Error, Result};
use crate::gpu::{read_f32, storage_buffer_zeroed, upload, Recorder, WeightMatrix};
use crate::kernels::attention::AttentionShape;
use crate::kernels::attention_backward::{attention_backward, AttentionGrads};
use crate::kernels::elementwise::glu_backward;
use crate::kernels::lora::lora_shrink;
use crate::kernels::lora_backward::{lora_backward, At, LoraBackward};
use crate::kernels::loss::cross_entropy;
use crate::kernels::matmul::{LoraIo, MatmulIo};
use crate::kernels::matmul_t::matmul_t;
use crate::kernels::norm::{rms_norm_backward, Rows};
use crate::kernels::optim::AdamW;
use crate::kernels::optim::{adamw, GpuMoments};
use crate::kernels::rope::rope_backward;
use crate::kv::KvCache;
use crate::lora::{ActiveAdapter, AdapterId, AdapterRegistry, LoraWeights, Proj};
use std::collections::BTreeMap;
use std::ops::Range;

/// One layer's activations over the active rows (see `record_chunk`).
pub(super) struct LayerTrace {
    pub h_in: wgpu::Buffer,
    pub x1: wgpu::Buffer,
    pub q_pre: wgpu::Buffer,
    pub k_pre: wgpu::Buffer,
    pub q: wgpu::Buffer,
    pub att: wgpu::Buffer,
    pub o_pre: wgpu::Buffer,
    pub h_mid: wgpu::Buffer,
    pub x2: wgpu::Buffer,
    pub gate: wgpu::Buffer,
    pub up: wgpu::Buffer,
    pub g: wgpu::Buffer,
    pub y_pre: wgpu::Buffer,
}

/// Every activation a traced forward keeps.
pub(super) struct ForwardTrace {
    pub layers: Vec<LayerTrace>,
    pub h_final: wgpu::Buffer,
}

/// Buffers laid out like the registry's A and B packs (an adapter's matrices sit at the same
/// offsets as its weights): its gradients (accumulated over examples until a step) and its
/// optimizer moments. Make them after the adapters are loaded (a pack that grows moves).
pub struct AdapterBuffers {
    /// Like the A pack.
    pub a: wgpu::Buffer,
    /// Like the B pack.
    pub b: wgpu::Buffer,
}

/// What training an adapter keeps on the GPU besides its weights.
pub struct AdapterTraining {
    /// Accumulated gradients.
    pub grads: AdapterBuffers,
    /// AdamW's first and second moments.
    pub m: AdapterBuffers,
    /// Second moments, laid out like the adapter.
    pub v: AdapterBuffers,
}

/// The frozen prefix's KV cache kept from one training example to the next: examples of a
/// tool set share their prompt's beginning (system prompt, tool list, often the conversation),
/// and only the positions after the longest common prefix are computed again.
#[derive(Default)]
pub struct PrefixCache {
    kv: Option<KvCache>,
    tokens: Vec<u32>,
    reused: usize,
    computed: usize,
}

impl PrefixCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Prefix positions taken from the cache so far.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Prefix positions computed so far.
    pub fn computed(&self) -> usize {
        self.computed
    }

    /// The cache holding exactly `prefix` (base weights, no adapter), with room for `total`
    /// positions: the common beginning with the previous prefix is kept, the rest computed.
    fn prepare(&mut self, model: &Model, prefix: &[u32], total: usize) -> Result<&KvCache> {
        if self.kv.as_ref().is_none_or(|kv| kv.n_ctx() < total) {
            // Room in steps of 512 positions, so a slightly longer example does not reallocate.
            self.kv = Some(model.new_cache(total.div_ceil(512) * 512)?);
            self.tokens.clear();
        }
        let kv = self.kv.as_mut().expect("allocated above");
        let common = self.tokens.iter().zip(prefix).take_while(|(a, b)| a == b).count();
        // Positions past the previous prefix hold the adapter's rows: never reused.
        kv.truncate(common);
        self.tokens.truncate(common);
        if common < prefix.len() {
            model.forward(&prefix[common..], kv, Logits::None)?;
            self.tokens.extend_from_slice(&prefix[common..]);
        }
        self.reused += common;
        self.computed += prefix.len() - common;
        Ok(kv)
    }
}

impl Model {
    /// Zeroed buffers shaped like the adapter packs as they are now.
    pub fn adapter_buffers(&self) -> Result<AdapterBuffers> {
        let reg = self.registry()?;
        let (a, b) = reg.packs();
        Ok(AdapterBuffers {
            a: storage_buffer_zeroed(&self.ctx, "pack_a", a.size()),
            b: storage_buffer_zeroed(&self.ctx, "pack_b", b.size()),
        })
    }

    /// Zeroed gradients and moments for training resident adapters.
    pub fn adapter_training(&self) -> Result<AdapterTraining> {
        Ok(AdapterTraining { grads: self.adapter_buffers()?, m: self.adapter_buffers()?, v: self.adapter_buffers()? })
    }

    /// One AdamW step of adapter `id` (in place in the packs, so the next forward uses it) with
    /// the gradients accumulated in `state`, which are then cleared. `t` counts steps from 1.
    pub fn adapter_step(&self, id: AdapterId, state: &AdapterTraining, opt: &AdamW, t: u64, lr: f32) -> Result<()> {
        let registry = self.registry()?;
        let ranges = registry.ranges(id).ok_or(Error::UnknownAdapter(id))?;
        let (a_pack, b_pack) = registry.packs();
        let mut rec = Recorder::new(&self.ctx);
        for ((w, g, m, v), range) in
            [(a_pack, &state.grads.a, &state.m.a, &state.v.a), (b_pack, &state.grads.b, &state.m.b, &state.v.b)].into_iter().zip(ranges)
        {
            adamw(&mut rec, &self.ctx, opt, w, g, GpuMoments { m, v }, range, t, lr)?;
        }
        rec.submit();
        for (g, (start, len)) in [&state.grads.a, &state.grads.b].into_iter().zip(ranges) {
            upload(&self.ctx, g, (start * 4) as u64, &vec![0f32; len]);
        }
        Ok(())
    }

    /// Adapter `id`'s optimizer moments out of `state`: m and v of its A range, then of its B.
    pub fn read_adapter_moments(&self, id: AdapterId, state: &AdapterTraining) -> Result<[Vec<f32>; 4]> {
        let ranges = self.registry()?.ranges(id).ok_or(Error::UnknownAdapter(id))?;
        let [(a0, an), (b0, bn)] = ranges;
        Ok([
            read_f32(&self.ctx, &state.m.a, a0, an)?,
            read_f32(&self.ctx, &state.v.a, a0, an)?,
            read_f32(&self.ctx, &state.m.b, b0, bn)?,
            read_f32(&self.ctx, &state.v.b, b0, bn)?,
        ])
    }

    /// Put moments read by [`read_adapter_moments`](Self::read_adapter_moments) back (resuming).
    pub fn write_adapter_moments(&self, id: AdapterId, state: &AdapterTraining, moments: &[Vec<f32>; 4]) -> Result<()> {
        let [(a0, an), (b0, bn)] = self.registry()?.ranges(id).ok_or(Error::UnknownAdapter(id))?;
        let targets = [(&state.m.a, a0, an), (&state.v.a, a0, an), (&state.m.b, b0, bn), (&state.v.b, b0, bn)];
        for ((buf, start, len), data) in targets.into_iter().zip(moments) {
            if data.len() != len {
                return Err(Error::InvalidOption(format!("optimizer moments of {} floats for a range of {len}", data.len())));
            }
            upload(&self.ctx, buf, (start * 4) as u64, data);
        }
        Ok(())
    }

    /// The current weights of adapter `id` (engine row order), per targeted (layer, projection).
    pub fn read_adapter_weights(&self, id: AdapterId) -> Result<BTreeMap<(usize, Proj), LoraWeights>> {
        let registry = self.registry()?;
        let (a, b) = registry.packs();
        self.read_packed(&registry, id, a, b)
    }

    /// An adapter's gradients out of `grads`, per targeted (layer, projection), shaped like its
    /// weights (engine row order).
    pub fn read_adapter_grads(&self, id: AdapterId, grads: &AdapterBuffers) -> Result<BTreeMap<(usize, Proj), LoraWeights>> {
        let registry = self.registry()?;
        self.read_packed(&registry, id, &grads.a, &grads.b)
    }

    fn read_packed(
        &self,
        registry: &AdapterRegistry,
        id: AdapterId,
        a_buf: &wgpu::Buffer,
        b_buf: &wgpu::Buffer,
    ) -> Result<BTreeMap<(usize, Proj), LoraWeights>> {
        registry.check_resident(&[ActiveAdapter::new(id)])?;
        let active = [ActiveAdapter::new(id)];
        let mut out = BTreeMap::new();
        for l in 0..self.config.n_layers {
            for p in Proj::ALL {
                let Some((slots, rank)) = registry.slots(l, p, &active) else { continue };
                let (n, k) = p.shape(&self.config);
                let a = read_f32(&self.ctx, a_buf, slots[0].a_offset, rank * k)?;
                let b = read_f32(&self.ctx, b_buf, slots[0].b_offset, n * rank)?;
                out.insert((l, p), LoraWeights { a, b });
            }
        }
        Ok(out)
    }

    /// The training loss of one example — mean cross-entropy of every target position `p`
    /// predicting `tokens[p]` — with `adapter` active from row `from`, and its gradient with
    /// respect to the adapter's A and B added into `grads`. Targets must come after `from` (the
    /// rows before it do not depend on the adapter). At most one pass of rows (256) may be active.
    pub fn adapter_gradient(
        &self,
        prefix: &mut PrefixCache,
        tokens: &[u32],
        from: usize,
        targets: &[Range<usize>],
        adapter: ActiveAdapter,
        grads: &AdapterBuffers,
    ) -> Result<f32> {
        let (c, ctx) = (&self.config, &*self.ctx);
        let t = tokens.len().saturating_sub(from);
        if t == 0 || t > self.max_batch {
            return Err(Error::InvalidOption(format!(
                "{t} rows after the activation point; a training example needs 1 to {}",
                self.max_batch
            )));
        }
        let rows: Vec<usize> = targets.iter().flat_map(|r| r.clone()).collect();
        if rows.is_empty() || rows.iter().any(|&p| p <= from || p >= tokens.len()) {
            return Err(Error::InvalidOption(format!(
                "targets {targets:?} must lie in {}..{}, after the activation point",
                from + 1,
                tokens.len()
            )));
        }
        // Chunk rows whose logits are targets: position p is predicted by row p − 1 − from.
        let logit_rows: Vec<(usize, usize)> = targets.iter().filter(|r| !r.is_empty()).map(|r| (r.start - 1 - from, r.len())).collect();
        let n_t: usize = logit_rows.iter().map(|r| r.1).sum();
        let kv = prefix.prepare(self, &tokens[..from], tokens.len())?;
        let registry = self.registry()?;
        registry.check_resident(&[adapter])?;
        let f = |name: &str, floats: usize| storage_buffer_zeroed(ctx, name, (floats.max(1) * 4) as u64);
        let (d, q_dim, kv_dim, ffn, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn_dim, c.head_dim);
        let trace = ForwardTrace {
            layers: (0..c.n_layers)
                .map(|_| LayerTrace {
                    h_in: f("h_in", t * d),
                    x1: f("x1", t * d),
                    q_pre: f("q_pre", t * q_dim),
                    k_pre: f("k_pre", t * kv_dim),
                    q: f("q", t * q_dim),
                    att: f("att", t * q_dim),
                    o_pre: f("o_pre", t * d),
                    h_mid: f("h_mid", t * d),
                    x2: f("x2", t * d),
                    gate: f("gate", t * ffn),
                    up: f("up", t * ffn),
                    g: f("g", t * ffn),
                    y_pre: f("y_pre", t * d),
                })
                .collect(),
            h_final: f("h_final", t * d),
        };
        let mut guard = self.scratch.lock().map_err(|_| Error::poisoned("scratch"))?;
        let logit_cap = ((ctx.max_binding() as usize / (c.n_vocab * 4)).max(1)).min(self.max_batch);
        if n_t > logit_cap {
            return Err(Error::InvalidOption(format!("{n_t} target tokens in one example; at most {logit_cap} fit one pass")));
        }
        if guard.as_ref().is_none_or(|s| s.tokens < t) {
            *guard = Some(self.alloc_scratch(t.max(self.max_batch), logit_cap, registry.limits().max_rank));
        }
        let s = guard.as_ref().expect("scratch allocated above");
        upload(ctx, &s.ids, 0, &tokens[from..]);
        upload(ctx, &s.row_slot, 0, &vec![0i32; t]);
        let active = [adapter];
        let lora = ChunkLora { registry: &registry, active: &active, row_slot: &s.row_slot, u: &s.lora_u, u_up: &s.lora_u_up };
        let mut rec = Recorder::new(ctx);
        self.record_chunk(&mut rec, s, &[Segment { kv, row0: 0, len: t }], &logit_rows, Some(&lora), None, Some(&trace))?;

        // Loss: the target rows' logits become their gradients (of the mean) in place.
        let target_tokens: Vec<u32> = logit_rows.iter().flat_map(|&(r, n)| (r..r + n).map(|row| tokens[from + row + 1])).collect();
        let (tok_b, loss_b) = (f("targets", n_t), f("loss", n_t));
        upload(ctx, &tok_b, 0, &target_tokens);
        cross_entropy(&mut rec, ctx, &s.logits, &tok_b, &loss_b, n_t, c.n_vocab, 1.0 / n_t as f32)?;

        // Back through the output projection and final norm into dh (zero on non-target rows).
        let (dh, dfin) = (f("dh", t * d), f("dfinal", t * d));
        let mut packed = 0;
        for &(r, n) in &logit_rows {
            matmul_t(
                &mut rec,
                ctx,
                self.weights.output(),
                Rows { buf: &s.logits, offset: packed * c.n_vocab, stride: c.n_vocab },
                Rows { buf: &dfin, offset: r * d, stride: d },
                n,
                false,
            )?;
            rms_norm_backward(
                &mut rec,
                ctx,
                &self.weights.out_norm,
                Rows { buf: &trace.h_final, offset: r * d, stride: d },
                &dfin,
                Rows { buf: &dh, offset: r * d, stride: d },
                n,
                d,
                c.norm_eps,
                false,
            )?;
            packed += n;
        }

        let (a_pack, b_pack) = registry.packs();
        let max_rank = registry.limits().max_rank;
        let (u, du) = (f("u", t * max_rank), f("du", t * max_rank));
        let back = |rec: &mut Recorder,
                    l: usize,
                    p: Proj,
                    w: &WeightMatrix,
                    x: &wgpu::Buffer,
                    dy: &wgpu::Buffer,
                    dx: &wgpu::Buffer,
                    accumulate: bool|
         -> Result<()> {
            let (n, k) = (w.rows, w.cols);
            matmul_t(rec, ctx, w, dense(dy, n), dense(dx, k), t, accumulate)?;
            let Some((slots, rank)) = registry.slots(l, p, &active) else { return Ok(()) };
            let slot = slots[0];
            // u = A·x again (cheaper to recompute at rank r than to keep).
            let io = MatmulIo {
                lora: Some(LoraIo { a_pack, b_pack, row_slot: &s.row_slot, u: &u, max_rank: rank, slots: &slots, u_splits: None }),
                ..MatmulIo::dense(x, dx, w, t)
            };
            lora_shrink(rec, ctx, k, &io)?;
            let io = LoraBackward {
                x: dense(x, k),
                dy: dense(dy, n),
                dx: dense(dx, k),
                a: At { buf: a_pack, offset: slot.a_offset },
                b: At { buf: b_pack, offset: slot.b_offset },
                u: &u,
                du: &du,
                da: At { buf: &grads.a, offset: slot.a_offset },
                db: At { buf: &grads.b, offset: slot.b_offset },
                m: t,
                k,
                n,
                r: rank,
                scale: slot.scale,
                accumulate: true,
            };
            lora_backward(rec, ctx, &io)
        };
        let (dtmp, dg, dx2, datt, dx1) = (f("dtmp", t * d), f("dg", t * ffn), f("dx2", t * d), f("datt", t * q_dim), f("dx1", t * d));
        let (dq, dqn, dk, dkn, dv, stats) = (
            f("dq", t * q_dim),
            f("dqn", t * q_dim),
            f("dk", t * kv_dim),
            f("dkn", t * kv_dim),
            f("dv", t * kv_dim),
            f("stats", t * c.n_heads * 3),
        );
        let norm_back = |rec: &mut Recorder,
                         w: &wgpu::Buffer,
                         x: &wgpu::Buffer,
                         dy: &wgpu::Buffer,
                         dx: &wgpu::Buffer,
                         rows: usize,
                         n: usize,
                         accumulate: bool| {
            rms_norm_backward(rec, ctx, w, dense(x, n), dy, dense(dx, n), rows, n, c.norm_eps, accumulate)
        };
        // A block's output gradient: dh itself, or through the block's post-norm (gemma3) of
        // its pre-norm output `x`.
        let post_norm_back = |rec: &mut Recorder, norm: Option<&wgpu::Buffer>, x: &wgpu::Buffer| -> Result<&wgpu::Buffer> {
            match norm {
                Some(pn) => norm_back(rec, pn, x, &dh, &dtmp, t, d, false).map(|_| &dtmp),
                None => Ok(&dh),
            }
        };
        for (l, (lw, tr)) in self.weights.layers.iter().zip(&trace.layers).enumerate().rev() {
            // Feed-forward block.
            let dy = post_norm_back(&mut rec, lw.post_ffn_norm.as_ref(), &tr.y_pre)?;
            back(&mut rec, l, Proj::Down, &lw.w_down, &tr.g, dy, &dg, false)?;
            glu_backward(&mut rec, ctx, c.act, &tr.gate, &tr.up, &dg, t * ffn)?;
            back(&mut rec, l, Proj::Gate, &lw.w_gate, &tr.x2, &tr.gate, &dx2, false)?;
            back(&mut rec, l, Proj::Up, &lw.w_up, &tr.x2, &tr.up, &dx2, true)?;
            norm_back(&mut rec, &lw.ffn_norm, &tr.h_mid, &dx2, &dh, t, d, true)?;
            // Attention block.
            let dy = post_norm_back(&mut rec, lw.post_attn_norm.as_ref(), &tr.o_pre)?;
            back(&mut rec, l, Proj::O, &lw.wo, &tr.att, dy, &datt, false)?;
            let shape = AttentionShape {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                window: c.layer_window(l),
                scale: c.attn_scale,
            };
            let (kc, vc) = &kv.layers[l];
            attention_backward(
                &mut rec,
                ctx,
                &shape,
                &tr.q,
                kc,
                vc,
                &datt,
                AttentionGrads { dq: &dq, dk: &dk, dv: &dv, stats: &stats },
                t,
                from,
            )?;
            let rp = c.layer_rope(l);
            rope_backward(&mut rec, ctx, &rp, dense(&dq, q_dim), t, c.n_heads, hd, from)?;
            rope_backward(&mut rec, ctx, &rp, dense(&dk, kv_dim), t, c.n_kv_heads, hd, from)?;
            let (dq, dk) = match &lw.qk_norm {
                Some([qn, kn]) => {
                    norm_back(&mut rec, qn, &tr.q_pre, &dq, &dqn, t * c.n_heads, hd, false)?;
                    norm_back(&mut rec, kn, &tr.k_pre, &dk, &dkn, t * c.n_kv_heads, hd, false)?;
                    (&dqn, &dkn)
                }
                None => (&dq, &dk),
            };
            back(&mut rec, l, Proj::Q, &lw.wq, &tr.x1, dq, &dx1, false)?;
            back(&mut rec, l, Proj::K, &lw.wk, &tr.x1, dk, &dx1, true)?;
            back(&mut rec, l, Proj::V, &lw.wv, &tr.x1, &dv, &dx1, true)?;
            norm_back(&mut rec, &lw.attn_norm, &tr.h_in, &dx1, &dh, t, d, true)?;
        }
        rec.submit();
        let losses = read_f32(ctx, &loss_b, 0, n_t)?;
        Ok(losses.iter().sum::<f32>() / n_t as f32)
    }
}

/// Rows from the start of `buf`, `stride` floats apart.
fn dense(buf: &wgpu::Buffer, stride: usize) -> Rows<'_> {
    Rows { buf, offset: 0, stride }
}
