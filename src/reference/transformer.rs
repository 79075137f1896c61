//! The reference forward pass: every weight dequantized to f32, every op from `ops`.

use super::backward::{self, cross_entropy};
use super::ops;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hparams::ModelConfig;
use crate::lora::{LoraAdapter, LoraWeights, Proj};
use std::collections::BTreeMap;
use std::ops::Range;

/// An adapter as the reference applies it: `y += multiplier · adapter.scale() · B·A·x` on rows
/// `from..` (rows before it are an activated LoRA's un-invoked prefix).
#[derive(Clone, Copy)]
pub struct ReferenceAdapter<'a> {
    /// The adapter.
    pub adapter: &'a LoraAdapter,
    /// Multiplier of its trained scale.
    pub multiplier: f32,
    /// First row it applies to.
    pub from: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    bias: Option<[Vec<f32>; 3]>,
    qk_norm: Option<[Vec<f32>; 2]>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    post_ffn_norm: Option<Vec<f32>>,
}

/// A whole model in f32 on the host (tiny models only: it holds every weight as f32).
pub struct ReferenceModel {
    /// Hyperparameters (from the same GGUF reader as the engine).
    pub config: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: Vec<f32>,
    /// Keys and values rounded to f16 after RoPE, as the engine's KV cache stores them (the
    /// default); the backward pass takes the rounding as the identity, as the engine's does.
    /// `false` gives the exact f32 function, which finite differences need.
    pub kv_f16: bool,
}

impl ReferenceModel {
    /// Dequantize every tensor of `f`.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let config = ModelConfig::from_gguf(f)?;
        let t = |n: String| f.tensor_f32(&n);
        let opt = |n: String| -> Result<Option<Vec<f32>>> { Ok(if f.find_tensor(&n).is_some() { Some(f.tensor_f32(&n)?) } else { None }) };
        let mut layers = Vec::new();
        for l in 0..config.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = match (opt(n("attn_q.bias"))?, opt(n("attn_k.bias"))?, opt(n("attn_v.bias"))?) {
                (Some(a), Some(b), Some(c)) if config.qkv_bias => Some([a, b, c]),
                _ => None,
            };
            let qk_norm = match (opt(n("attn_q_norm.weight"))?, opt(n("attn_k_norm.weight"))?) {
                (Some(a), Some(b)) if config.qk_norm => Some([a, b]),
                _ => None,
            };
            // phi3: q, k, v as consecutive rows of one tensor, gate and up likewise.
            let (q, kv, d) = (config.q_dim(), config.kv_dim(), config.d_model);
            let [wq, wk, wv] = match opt(n("attn_qkv.weight"))? {
                Some(w) => split_rows(w, [q, kv, kv], d),
                None => [t(n("attn_q.weight"))?, t(n("attn_k.weight"))?, t(n("attn_v.weight"))?],
            };
            let [gate, up] = match opt(n("ffn_gate.weight"))? {
                Some(g) => [g, t(n("ffn_up.weight"))?],
                None => split_rows(t(n("ffn_up.weight"))?, [config.ffn_dim; 2], d),
            };
            layers.push(Layer {
                attn_norm: t(n("attn_norm.weight"))?,
                wq,
                wk,
                wv,
                wo: t(n("attn_output.weight"))?,
                bias,
                qk_norm,
                post_attn_norm: if config.post_norms { opt(n("post_attention_norm.weight"))? } else { None },
                ffn_norm: t(n("ffn_norm.weight"))?,
                gate,
                up,
                down: t(n("ffn_down.weight"))?,
                post_ffn_norm: if config.post_norms { opt(n("post_ffw_norm.weight"))? } else { None },
            });
        }
        let embed = t("token_embd.weight".into())?;
        let output = match opt("output.weight".into())? {
            Some(o) => o,
            None => embed.clone(),
        };
        Ok(Self { out_norm: t("output_norm.weight".into())?, config, embed, layers, output, kv_f16: true })
    }

    /// Logits of every position of `tokens` (a fresh sequence from position 0).
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        self.forward_adapted(tokens, None)
    }

    /// [`ReferenceModel::forward`] with an adapter on every projection it targets.
    pub fn forward_adapted(&self, tokens: &[u32], lora: Option<ReferenceAdapter>) -> Vec<f32> {
        self.run(tokens, lora).0
    }

    /// `y = W·x`, plus the adapter's `s·B·A·x` on rows `from..` when it targets `(l, p)`.
    fn project(&self, l: usize, p: Proj, w: &[f32], x: &[f32], lora: Option<ReferenceAdapter>) -> Vec<f32> {
        let (n, k) = p.shape(&self.config);
        let mut y = ops::matmul(w, x, n, k);
        if let Some((a, lw)) = lora.and_then(|a| a.adapter.targets.get(&(l, p)).map(|lw| (a, lw))) {
            let scale = a.multiplier * a.adapter.scale();
            for (xr, yr) in x.chunks(k).zip(y.chunks_mut(n)).skip(a.from) {
                let delta = ops::matmul(&lw.b, &ops::matmul(&lw.a, xr, a.adapter.rank, k), n, a.adapter.rank);
                yr.iter_mut().zip(delta).for_each(|(y, d)| *y += scale * d);
            }
        }
        y
    }

    /// The forward pass, keeping every activation the backward pass needs.
    fn run(&self, tokens: &[u32], lora: Option<ReferenceAdapter>) -> (Vec<f32>, Trace) {
        let c = &self.config;
        let mm = |l: usize, p: Proj, w: &[f32], x: &[f32]| self.project(l, p, w, x, lora);
        let (d, hd, eps) = (c.d_model, c.head_dim, c.norm_eps);
        let mut h: Vec<f32> = tokens.iter().flat_map(|&t| self.embed[t as usize * d..][..d].iter().map(|v| v * c.embed_scale)).collect();
        let add = |h: &[f32], y: &[f32]| h.iter().zip(y).map(|(a, b)| a + b).collect::<Vec<f32>>();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, ly) in self.layers.iter().enumerate() {
            let x1 = ops::rms_norm(&h, &ly.attn_norm, d, eps);
            let mut q_pre = mm(l, Proj::Q, &ly.wq, &x1);
            let mut k_pre = mm(l, Proj::K, &ly.wk, &x1);
            let mut v = mm(l, Proj::V, &ly.wv, &x1);
            if let Some([bq, bk, bv]) = &ly.bias {
                for (m, b) in [(&mut q_pre, bq), (&mut k_pre, bk), (&mut v, bv)] {
                    m.chunks_mut(b.len()).for_each(|r| r.iter_mut().zip(b).for_each(|(a, b)| *a += b));
                }
            }
            let (mut q, mut k) = match &ly.qk_norm {
                Some([qn, kn]) => (ops::rms_norm(&q_pre, qn, hd, eps), ops::rms_norm(&k_pre, kn, hd, eps)),
                None => (q_pre.clone(), k_pre.clone()),
            };
            let rp = c.layer_rope(l, tokens.len());
            ops::rope(&mut q, c.n_heads, hd, &rp, 0);
            ops::rope(&mut k, c.n_kv_heads, hd, &rp, 0);
            if self.kv_f16 {
                k.iter_mut().chain(v.iter_mut()).for_each(|x| *x = half::f16::from_f32(*x).to_f32());
            }
            let att = ops::attention(&q, &k, &v, c.n_heads, c.n_kv_heads, hd, 0, c.layer_window(l), c.attn_scale);
            let o_pre = mm(l, Proj::O, &ly.wo, &att);
            let o = match &ly.post_attn_norm {
                Some(pn) => ops::rms_norm(&o_pre, pn, d, eps),
                None => o_pre.clone(),
            };
            let h_mid = add(&h, &o);
            let x2 = ops::rms_norm(&h_mid, &ly.ffn_norm, d, eps);
            let (gate, up) = (mm(l, Proj::Gate, &ly.gate, &x2), mm(l, Proj::Up, &ly.up, &x2));
            let g = ops::glu(&gate, &up, c.act);
            let y_pre = mm(l, Proj::Down, &ly.down, &g);
            let y = match &ly.post_ffn_norm {
                Some(pn) => ops::rms_norm(&y_pre, pn, d, eps),
                None => y_pre.clone(),
            };
            let h_out = add(&h_mid, &y);
            layers.push(LayerTrace {
                h_in: std::mem::replace(&mut h, h_out),
                x1,
                q_pre,
                k_pre,
                q,
                k,
                v,
                att,
                o_pre,
                h_mid,
                x2,
                gate,
                up,
                g,
                y_pre,
            });
        }
        let x = ops::rms_norm(&h, &self.out_norm, d, eps);
        (ops::matmul(&self.output, &x, c.n_vocab, d), Trace { layers, h_final: h })
    }

    /// The training loss: mean cross-entropy of every target position `p` (in `targets`)
    /// predicting `tokens[p]` from logits row `p − 1`.
    pub fn masked_loss(&self, tokens: &[u32], lora: Option<ReferenceAdapter>, targets: &[Range<usize>]) -> f32 {
        cross_entropy(&self.forward_adapted(tokens, lora), self.config.n_vocab, &target_rows(tokens, targets)).0
    }

    /// [`masked_loss`](Self::masked_loss) with `lora` and its gradient with respect to every A and
    /// B matrix of the adapter (same layout as the adapter's), by backpropagation through the
    /// whole model. The base weights are frozen.
    pub fn lora_loss_and_grads(
        &self,
        tokens: &[u32],
        lora: ReferenceAdapter,
        targets: &[Range<usize>],
    ) -> (f32, BTreeMap<(usize, Proj), LoraWeights>) {
        let c = &self.config;
        let (d, hd, eps) = (c.d_model, c.head_dim, c.norm_eps);
        let (logits, trace) = self.run(tokens, Some(lora));
        let (loss, dlogits) = cross_entropy(&logits, c.n_vocab, &target_rows(tokens, targets));
        let mut grads: BTreeMap<(usize, Proj), LoraWeights> =
            lora.adapter.targets.iter().map(|(&key, w)| (key, LoraWeights { a: vec![0.0; w.a.len()], b: vec![0.0; w.b.len()] })).collect();
        let dx = backward::matmul_backward_x(&self.output, &dlogits, c.n_vocab, d);
        let mut dh = backward::rms_norm_backward(&trace.h_final, &self.out_norm, &dx, d, eps);
        let add = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        for (l, (ly, t)) in self.layers.iter().zip(&trace.layers).enumerate().rev() {
            let mut back = |p: Proj, w: &[f32], x: &[f32], dy: &[f32]| self.project_backward(l, p, w, x, dy, lora, grads.get_mut(&(l, p)));
            // Feed-forward block: h_out = h_mid + norm?(down(glu(gate(x2), up(x2)))).
            let dy_pre = match &ly.post_ffn_norm {
                Some(pn) => backward::rms_norm_backward(&t.y_pre, pn, &dh, d, eps),
                None => dh.clone(),
            };
            let dg = back(Proj::Down, &ly.down, &t.g, &dy_pre);
            let (dgate, dup) = backward::glu_backward(&t.gate, &t.up, &dg, c.act);
            let mut dx2 = back(Proj::Gate, &ly.gate, &t.x2, &dgate);
            add(&mut dx2, &back(Proj::Up, &ly.up, &t.x2, &dup));
            add(&mut dh, &backward::rms_norm_backward(&t.h_mid, &ly.ffn_norm, &dx2, d, eps));
            // Attention block: h_mid = h_in + norm?(o(attention(rope(norm?(q)), rope(norm?(k)), v))).
            let do_pre = match &ly.post_attn_norm {
                Some(pn) => backward::rms_norm_backward(&t.o_pre, pn, &dh, d, eps),
                None => dh.clone(),
            };
            let datt = back(Proj::O, &ly.wo, &t.att, &do_pre);
            let (mut dq, mut dk, dv) =
                backward::attention_backward(&t.q, &t.k, &t.v, &datt, c.n_heads, c.n_kv_heads, hd, c.layer_window(l), c.attn_scale);
            let rp = c.layer_rope(l, tokens.len());
            ops::rope_backward(&mut dq, c.n_heads, hd, &rp, 0);
            ops::rope_backward(&mut dk, c.n_kv_heads, hd, &rp, 0);
            if let Some([qn, kn]) = &ly.qk_norm {
                dq = backward::rms_norm_backward(&t.q_pre, qn, &dq, hd, eps);
                dk = backward::rms_norm_backward(&t.k_pre, kn, &dk, hd, eps);
            }
            let mut dx1 = back(Proj::Q, &ly.wq, &t.x1, &dq);
            add(&mut dx1, &back(Proj::K, &ly.wk, &t.x1, &dk));
            add(&mut dx1, &back(Proj::V, &ly.wv, &t.x1, &dv));
            add(&mut dh, &backward::rms_norm_backward(&t.h_in, &ly.attn_norm, &dx1, d, eps));
        }
        (loss, grads)
    }

    /// `dx` of [`project`](Self::project), accumulating the adapter's `dA` and `dB` into `grad`.
    #[allow(clippy::too_many_arguments)] // plain slices and scalars: the reference stays free of the engine's types
    fn project_backward(
        &self,
        l: usize,
        p: Proj,
        w: &[f32],
        x: &[f32],
        dy: &[f32],
        lora: ReferenceAdapter,
        grad: Option<&mut LoraWeights>,
    ) -> Vec<f32> {
        let (n, k) = p.shape(&self.config);
        let mut dx = backward::matmul_backward_x(w, dy, n, k);
        let (Some(lw), Some(grad)) = (lora.adapter.targets.get(&(l, p)), grad) else { return dx };
        let (r, s) = (lora.adapter.rank, lora.multiplier * lora.adapter.scale());
        for ((xr, dyr), dxr) in x.chunks(k).zip(dy.chunks(n)).zip(dx.chunks_mut(k)).skip(lora.from) {
            // y += s·B·u with u = A·x: dB += s·dy⊗u, du = s·Bᵀdy, dA += du⊗x, dx += Aᵀdu.
            let u = ops::matmul(&lw.a, xr, r, k);
            let sdy: Vec<f32> = dyr.iter().map(|v| v * s).collect();
            backward::matmul_backward_w(&sdy, &u, n, r, &mut grad.b);
            let du = backward::matmul_backward_x(&lw.b, &sdy, n, r);
            backward::matmul_backward_w(&du, xr, r, k, &mut grad.a);
            add_into(dxr, &backward::matmul_backward_x(&lw.a, &du, r, k));
        }
        dx
    }
}

fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// `(logits row, token)` for every target position.
fn target_rows(tokens: &[u32], targets: &[Range<usize>]) -> Vec<(usize, u32)> {
    targets.iter().flat_map(|r| r.clone()).filter(|&p| p > 0 && p < tokens.len()).map(|p| (p - 1, tokens[p])).collect()
}

/// What the forward pass kept for the backward pass.
struct Trace {
    layers: Vec<LayerTrace>,
    h_final: Vec<f32>,
}

/// One layer's activations (rows of every position).
struct LayerTrace {
    h_in: Vec<f32>,
    x1: Vec<f32>,
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o_pre: Vec<f32>,
    h_mid: Vec<f32>,
    x2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    g: Vec<f32>,
    y_pre: Vec<f32>,
}

/// `w` (rows of `cols` values) cut into consecutive runs of `rows[i]` rows.
fn split_rows<const N: usize>(w: Vec<f32>, rows: [usize; N], cols: usize) -> [Vec<f32>; N] {
    let mut at = 0;
    std::array::from_fn(|i| {
        let end = ((at + rows[i]) * cols).min(w.len());
        let part = w[(at * cols).min(end)..end].to_vec();
        at += rows[i];
        part
    })
}
