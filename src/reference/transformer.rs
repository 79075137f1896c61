//! The reference forward pass: every weight dequantized to f32, every op from `ops`.

use super::ops;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::lora::{LoraAdapter, Proj};
use crate::model::ModelConfig;

/// An adapter as the reference applies it: `y += multiplier · adapter.scale() · B·A·x` on rows
/// `from..` (rows before it are an activated LoRA's un-invoked prefix).
#[derive(Clone, Copy)]
pub struct ReferenceAdapter<'a> {
    pub adapter: &'a LoraAdapter,
    pub multiplier: f32,
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
            layers.push(Layer {
                attn_norm: t(n("attn_norm.weight"))?,
                wq: t(n("attn_q.weight"))?,
                wk: t(n("attn_k.weight"))?,
                wv: t(n("attn_v.weight"))?,
                wo: t(n("attn_output.weight"))?,
                bias,
                qk_norm,
                post_attn_norm: if config.post_norms { opt(n("post_attention_norm.weight"))? } else { None },
                ffn_norm: t(n("ffn_norm.weight"))?,
                gate: t(n("ffn_gate.weight"))?,
                up: t(n("ffn_up.weight"))?,
                down: t(n("ffn_down.weight"))?,
                post_ffn_norm: if config.post_norms { opt(n("post_ffw_norm.weight"))? } else { None },
            });
        }
        let embed = t("token_embd.weight".into())?;
        let output = match opt("output.weight".into())? {
            Some(o) => o,
            None => embed.clone(),
        };
        Ok(Self { out_norm: t("output_norm.weight".into())?, config, embed, layers, output })
    }

    /// Logits of every position of `tokens` (a fresh sequence from position 0).
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        self.forward_adapted(tokens, None)
    }

    /// [`ReferenceModel::forward`] with an adapter on every projection it targets.
    pub fn forward_adapted(&self, tokens: &[u32], lora: Option<ReferenceAdapter>) -> Vec<f32> {
        let c = &self.config;
        let mm = |l: usize, p: Proj, w: &[f32], x: &[f32]| {
            let (n, k) = p.shape(c);
            let mut y = ops::matmul(w, x, n, k);
            if let Some((a, lw)) = lora.and_then(|a| a.adapter.targets.get(&(l, p)).map(|lw| (a, lw))) {
                let scale = a.multiplier * a.adapter.scale();
                for (xr, yr) in x.chunks(k).zip(y.chunks_mut(n)).skip(a.from) {
                    let delta = ops::matmul(&lw.b, &ops::matmul(&lw.a, xr, a.adapter.rank, k), n, a.adapter.rank);
                    yr.iter_mut().zip(delta).for_each(|(y, d)| *y += scale * d);
                }
            }
            y
        };
        let (d, hd, eps) = (c.d_model, c.head_dim, c.norm_eps);
        let mut h: Vec<f32> = tokens.iter().flat_map(|&t| self.embed[t as usize * d..][..d].iter().map(|v| v * c.embed_scale)).collect();
        let add = |h: &mut Vec<f32>, y: &[f32]| h.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        for (l, ly) in self.layers.iter().enumerate() {
            let x = ops::rms_norm(&h, &ly.attn_norm, d, eps);
            let mut q = mm(l, Proj::Q, &ly.wq, &x);
            let mut k = mm(l, Proj::K, &ly.wk, &x);
            let mut v = mm(l, Proj::V, &ly.wv, &x);
            if let Some([bq, bk, bv]) = &ly.bias {
                for (m, b) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    m.chunks_mut(b.len()).for_each(|r| r.iter_mut().zip(b).for_each(|(a, b)| *a += b));
                }
            }
            if let Some([qn, kn]) = &ly.qk_norm {
                q = ops::rms_norm(&q, qn, hd, eps);
                k = ops::rms_norm(&k, kn, hd, eps);
            }
            let rp = c.layer_rope(l);
            ops::rope(&mut q, c.n_heads, hd, &rp, 0);
            ops::rope(&mut k, c.n_kv_heads, hd, &rp, 0);
            let a = ops::attention(&q, &k, &v, c.n_heads, c.n_kv_heads, hd, 0, c.layer_window(l), c.attn_scale);
            let mut o = mm(l, Proj::O, &ly.wo, &a);
            if let Some(pn) = &ly.post_attn_norm {
                o = ops::rms_norm(&o, pn, d, eps);
            }
            add(&mut h, &o);
            let x = ops::rms_norm(&h, &ly.ffn_norm, d, eps);
            let g = ops::glu(&mm(l, Proj::Gate, &ly.gate, &x), &mm(l, Proj::Up, &ly.up, &x), c.act);
            let mut y = mm(l, Proj::Down, &ly.down, &g);
            if let Some(pn) = &ly.post_ffn_norm {
                y = ops::rms_norm(&y, pn, d, eps);
            }
            add(&mut h, &y);
        }
        let x = ops::rms_norm(&h, &self.out_norm, d, eps);
        ops::matmul(&self.output, &x, c.n_vocab, d)
    }
}
