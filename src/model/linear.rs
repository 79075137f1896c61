//! The one op every projection of the forward pass goes through: `y = W·x` with the quantized
//! base weights, plus each row's adapter delta `s·B·(A·x)` where the chunk's adapters target
//! the projection, plus the fusions a product can take (the RMSNorm before it, the residual add,
//! q/k/v stacked into one product, gate and up with their GLU in one dispatch). Where adapters
//! apply is decided here and nowhere else: [`Model::linear`] chooses between the fused product,
//! the stacked or gated one, and their unfused fallbacks.

use super::{LoraMode, Model};
use crate::error::Result;
use crate::gpu::{Recorder, View, WeightMatrix};
use crate::kernels::elementwise::glu;
use crate::kernels::lora::{lora_expand, lora_shrink};
use crate::kernels::matmul::{matmul, matmul_gated, GatedUp, LoraIo, LoraSlot, MatmulIo};
use crate::kernels::norm::RmsNorm;
use crate::kernels::quantize::{quantize_q8, Q8Rows};
use crate::lora::{ActiveAdapter, AdapterRegistry, Proj};
use crate::model::LayerWeights;

/// The adapters of one chunk: which are active, and the per-row slot buffer.
pub(super) struct ChunkLora<'r> {
    pub registry: &'r AdapterRegistry,
    pub active: &'r [ActiveAdapter],
    pub row_slot: &'r wgpu::Buffer,
    /// Scratch for the shrink (three ranks per row: the stacked q/k/v).
    pub u: &'r wgpu::Buffer,
    /// The up projection's shrink when it runs fused with the gate's.
    pub u_up: &'r wgpu::Buffer,
}

impl<'r> ChunkLora<'r> {
    /// The slots of the chunk's adapters that target `proj` of `layer`, if any.
    fn slots(&self, layer: usize, proj: Proj) -> Option<(Vec<LoraSlot>, usize)> {
        self.registry.slots(layer, proj, self.active)
    }

    /// `slots` (with their largest rank) as a product's LoRA input, shrinking into `u`.
    fn io<'a>(&'a self, (slots, max_rank): &'a (Vec<LoraSlot>, usize), u: &'a wgpu::Buffer) -> LoraIo<'a> {
        let (a_pack, b_pack) = self.registry.packs();
        LoraIo { a_pack, b_pack, row_slot: self.row_slot, u, max_rank: *max_rank, slots, u_splits: None }
    }
}

/// One projection step: its input rows, the norm fused on the way in, and what it writes.
pub(super) struct Linear<'a> {
    /// Input rows.
    pub x: View<'a>,
    /// RMSNorm applied to each row of `x` on the way in.
    pub norm: Option<RmsNorm<'a>>,
    /// Room for `x` quantized to 8 bits, where the products take 8-bit activations
    /// ([`crate::gpu::Products::Int8`]); `None`: f32.
    pub q8: Option<Q8Rows<'a>>,
    /// The projection(s) and their outputs.
    pub out: Out<'a>,
}

/// What a [`Linear`] step computes.
pub(super) enum Out<'a> {
    /// One projection into `y` (`accumulate`: the residual add). `site`: the (layer, projection)
    /// adapters may target; `None` for the LM head.
    One { site: Option<(usize, Proj)>, w: &'a WeightMatrix, y: View<'a>, accumulate: bool },
    /// Query, key and value of `layer` into `q`, `k` and `v`: one stacked product where the
    /// weights are stacked and the rows interleaved as it writes them, else one each.
    Qkv { layer: usize, lw: &'a LayerWeights, q: View<'a>, k: View<'a>, v: View<'a> },
    /// `gate = act(W_gate·x) · (W_up·x)` of `layer`: one dispatch where gate and up share a
    /// buffer, else two products and the GLU (`up` is scratch).
    Gated { layer: usize, lw: &'a LayerWeights, gate: View<'a>, up: View<'a> },
}

impl Out<'_> {
    /// Whether any matrix of the step has an integer form (then its products read x quantized;
    /// the others read x as it is).
    fn integer_form(&self) -> bool {
        let int = |w: &WeightMatrix| w.format.has_integer_form();
        match self {
            Out::One { w, .. } => int(w),
            Out::Qkv { lw, .. } => int(&lw.wq) || int(&lw.wk) || int(&lw.wv),
            Out::Gated { lw, .. } => int(&lw.w_gate) || int(&lw.w_up),
        }
    }
}

impl Model {
    /// Record one projection step with the chunk's adapters (see the module doc).
    pub(super) fn linear(&self, rec: &mut Recorder, lora: Option<&ChunkLora>, op: Linear) -> Result<()> {
        let Linear { x, norm, q8, out } = op;
        // x quantized once for all the step's products that take it so.
        let q8 = match q8 {
            Some(q) if out.integer_form() => {
                quantize_q8(rec, &self.ctx, x, norm.map(|n| n.w), q)?;
                Some(q)
            }
            _ => None,
        };
        let io = |y, accumulate| MatmulIo { x, y, accumulate, lora: None, norm, q8 };
        match out {
            Out::One { site, w, y, accumulate } => self.product(rec, lora, site, w, io(y, accumulate)),
            Out::Qkv { layer, lw, q, k, v } => {
                // Interleaved rows: q, k and v side by side in one buffer, as the stacked product writes them.
                let interleaved = q.buf == k.buf && k.buf == v.buf && (k.offset, v.offset) == (q.offset + q.cols, k.offset + k.cols);
                if let Some(w) = lw.wqkv.as_ref().filter(|w| interleaved && q.stride == w.rows) {
                    if self.stacked_qkv(rec, lora, layer, w, io(View { cols: w.rows, ..q }, false))? {
                        return Ok(());
                    }
                }
                for (proj, w, y) in [(Proj::Q, &lw.wq, q), (Proj::K, &lw.wk, k), (Proj::V, &lw.wv, v)] {
                    self.product(rec, lora, Some((layer, proj)), w, io(y, false))?;
                }
                Ok(())
            }
            Out::Gated { layer, lw, gate, up } => self.gated(rec, lora, layer, lw, io(gate, false), up),
        }
    }

    /// `y (+)= W·x` for one projection: the adapters that target it shrink first, then expand
    /// inside the product (or, with [`LoraMode::Separate`], in a dispatch of their own).
    fn product(
        &self,
        rec: &mut Recorder,
        lora: Option<&ChunkLora>,
        site: Option<(usize, Proj)>,
        w: &WeightMatrix,
        io: MatmulIo,
    ) -> Result<()> {
        let ctx = &*self.ctx;
        let slots = lora.zip(site).and_then(|(l, (layer, proj))| l.slots(layer, proj));
        let (Some(l), Some(slots)) = (lora, &slots) else { return matmul(rec, ctx, w, io) };
        let io = MatmulIo { lora: Some(l.io(slots, l.u)), ..io };
        lora_shrink(rec, ctx, &io)?;
        match self.lora_mode {
            LoraMode::Fused => matmul(rec, ctx, w, io),
            LoraMode::Separate => {
                matmul(rec, ctx, w, MatmulIo { lora: None, ..io })?;
                lora_expand(rec, ctx, &io)
            }
        }
    }

    /// The stacked q/k/v product `io` (its rows: q, k and v side by side). Returns false, having
    /// recorded nothing, where the chunk's adapters need the projections one by one (separate
    /// expands, or adapters on only some of q, k, v).
    fn stacked_qkv(&self, rec: &mut Recorder, lora: Option<&ChunkLora>, layer: usize, w: &WeightMatrix, io: MatmulIo) -> Result<bool> {
        let ctx = &*self.ctx;
        const QKV: [Proj; 3] = [Proj::Q, Proj::K, Proj::V];
        let Some(l) = lora.filter(|l| QKV.into_iter().any(|p| l.slots(layer, p).is_some())) else {
            matmul(rec, ctx, w, io)?;
            return Ok(true);
        };
        if self.lora_mode == LoraMode::Separate {
            return Ok(false);
        }
        let (q_dim, kv_dim) = (self.config.q_dim(), self.config.kv_dim());
        let Some(st) = l.registry.stacked_slots(layer, &QKV, &[q_dim, kv_dim, kv_dim], w.cols, l.active) else { return Ok(false) };
        let (a_pack, b_pack) = l.registry.packs();
        let lora_io = |slots, u_splits| LoraIo { a_pack, b_pack, row_slot: l.row_slot, u: l.u, max_rank: st.max_rank, slots, u_splits };
        lora_shrink(rec, ctx, &MatmulIo { lora: Some(lora_io(&st.shrink, None)), ..io })?;
        matmul(rec, ctx, w, MatmulIo { lora: Some(lora_io(&st.expand, Some([q_dim, q_dim + kv_dim]))), ..io })?;
        Ok(true)
    }

    /// The gated feed-forward product into `io.y` (the gate's rows): one dispatch for gate, up
    /// (each with its adapters, shrunk first) and the GLU where the two matrices share a buffer;
    /// else two products (the up projection's into `up`) and the GLU.
    fn gated(&self, rec: &mut Recorder, lora: Option<&ChunkLora>, layer: usize, lw: &LayerWeights, io: MatmulIo, up: View) -> Result<()> {
        let ctx = &*self.ctx;
        let (wg, wu) = (&lw.w_gate, &lw.w_up);
        if wg.pair_offset(wu).is_none() || (lora.is_some() && self.lora_mode == LoraMode::Separate) {
            self.product(rec, lora, Some((layer, Proj::Gate)), wg, io)?;
            self.product(rec, lora, Some((layer, Proj::Up)), wu, MatmulIo { y: up, ..io })?;
            return glu(rec, ctx, self.config.act, io.y.buf, up.buf, io.y.rows * io.y.cols);
        }
        let slots = |proj| lora.and_then(|l| l.slots(layer, proj));
        let (gate_slots, up_slots) = (slots(Proj::Gate), slots(Proj::Up));
        let gate_lora = lora.zip(gate_slots.as_ref()).map(|(l, s)| l.io(s, l.u));
        let up_lora = lora.zip(up_slots.as_ref()).map(|(l, s)| l.io(s, l.u_up));
        let io = MatmulIo { lora: gate_lora, ..io };
        lora_shrink(rec, ctx, &io)?;
        lora_shrink(rec, ctx, &MatmulIo { lora: up_lora, ..io })?;
        matmul_gated(rec, ctx, wg, GatedUp { up: wu, act: self.config.act, lora: up_lora }, io)
    }
}
