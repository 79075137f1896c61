//! Model weights on the GPU, checked against the configuration's shapes while loading.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::gpu::{storage_buffer, GpuContext, WeightMatrix};
use crate::hparams::ModelConfig;

/// One transformer block's weights.
pub struct LayerWeights {
    /// RMSNorm weights before attention.
    pub attn_norm: wgpu::Buffer,
    /// Query, key and value projections, in one buffer where their formats allow.
    pub wq: WeightMatrix,
    /// Key projection.
    pub wk: WeightMatrix,
    /// Value projection.
    pub wv: WeightMatrix,
    /// The three read as one matrix of `q_dim + 2·kv_dim` rows, where they lie back to back:
    /// one product then writes a token's queries, keys and values side by side.
    pub wqkv: Option<WeightMatrix>,
    /// Attention output projection.
    pub wo: WeightMatrix,
    /// q, k, v biases (qwen2).
    pub qkv_bias: Option<[wgpu::Buffer; 3]>,
    /// Per-head q and k norms (qwen3, gemma3).
    pub qk_norm: Option<[wgpu::Buffer; 2]>,
    /// Norm of the attention output before the residual add (gemma3).
    pub post_attn_norm: Option<wgpu::Buffer>,
    /// RMSNorm weights before the feed-forward block.
    pub ffn_norm: wgpu::Buffer,
    /// Gate and up projections, in one buffer where their formats allow (one kernel then
    /// computes both and the GLU).
    pub w_gate: WeightMatrix,
    /// Feed-forward up projection.
    pub w_up: WeightMatrix,
    /// Feed-forward down projection.
    pub w_down: WeightMatrix,
    /// Norm of the feed-forward output before the residual add (gemma3).
    pub post_ffn_norm: Option<wgpu::Buffer>,
}

/// All weights of a model.
pub struct Weights {
    /// Token embeddings (`n_vocab × d_model`).
    pub embed: WeightMatrix,
    /// The transformer blocks.
    pub layers: Vec<LayerWeights>,
    /// RMSNorm weights before the LM head.
    pub out_norm: wgpu::Buffer,
    /// The output projection; `None` when tied to the embeddings.
    pub lm_head: Option<WeightMatrix>,
    /// The rotation's frequency factors ([`crate::hparams::Rope::factors`]), where it has them.
    pub rope_factors: Option<wgpu::Buffer>,
    /// LongRoPE's long factors ([`crate::hparams::LongRope`]), where the model has them.
    pub rope_factors_long: Option<wgpu::Buffer>,
}

struct Loader<'a> {
    ctx: &'a GpuContext,
    f: &'a GgufFile,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let t = self.f.tensor_with_shape(name, &[cols as u64, rows as u64])?;
        let (format, bytes) = self.f.tensor_data(t)?;
        WeightMatrix::upload(self.ctx, name, format, rows, cols, bytes)
    }

    /// Matrices of `rows[i]` rows each, in one buffer where their formats allow
    /// ([`WeightMatrix::upload_group`]).
    fn matrix_group<const N: usize>(&self, names: [&str; N], rows: [usize; N], cols: usize) -> Result<[WeightMatrix; N]> {
        let mut data = Vec::with_capacity(N);
        for (n, r) in names.iter().zip(rows) {
            data.push(self.f.tensor_data(self.f.tensor_with_shape(n, &[cols as u64, r as u64])?)?);
        }
        WeightMatrix::upload_group(self.ctx, names, std::array::from_fn(|i| data[i].0), rows, cols, std::array::from_fn(|i| data[i].1))
    }

    /// Matrices of `rows[i]` rows each stored as consecutive rows of one tensor (phi3's fused
    /// q/k/v and gate/up), split into one buffer as [`Loader::matrix_group`] uploads them.
    fn matrix_split<const N: usize>(&self, name: &str, parts: [&str; N], rows: [usize; N], cols: usize) -> Result<[WeightMatrix; N]> {
        let total: usize = rows.iter().sum();
        let (format, bytes) = self.f.tensor_data(self.f.tensor_with_shape(name, &[cols as u64, total as u64])?)?;
        let row_bytes = format.row_bytes(cols);
        let mut at = 0;
        let slices: [&[u8]; N] = std::array::from_fn(|i| {
            let s = &bytes[at * row_bytes..(at + rows[i]) * row_bytes];
            at += rows[i];
            s
        });
        WeightMatrix::upload_group(self.ctx, parts, [format; N], rows, cols, slices)
    }

    fn vector(&self, name: &str, n: usize) -> Result<wgpu::Buffer> {
        self.f.tensor_with_shape(name, &[n as u64])?;
        Ok(storage_buffer(self.ctx, name, bytemuck::cast_slice(&self.f.tensor_f32(name)?)))
    }
}

impl Weights {
    /// Upload every tensor the configuration needs, checking each shape.
    pub fn load(ctx: &GpuContext, f: &GgufFile, c: &ModelConfig) -> Result<Self> {
        let ld = Loader { ctx, f };
        let (d, q, kv, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            // phi3 stores gate and up as one tensor (gate's rows first), and q, k, v as one.
            let [w_gate, w_up] = if f.find_tensor(&n("ffn_gate.weight")).is_none() {
                ld.matrix_split(&n("ffn_up.weight"), [&n("ffn_gate"), &n("ffn_up")], [ff, ff], d)?
            } else {
                ld.matrix_group([&n("ffn_gate.weight"), &n("ffn_up.weight")], [ff, ff], d)?
            };
            let [wq, wk, wv] = if f.find_tensor(&n("attn_qkv.weight")).is_some() {
                ld.matrix_split(&n("attn_qkv.weight"), [&n("attn_q"), &n("attn_k"), &n("attn_v")], [q, kv, kv], d)?
            } else {
                ld.matrix_group([&n("attn_q.weight"), &n("attn_k.weight"), &n("attn_v.weight")], [q, kv, kv], d)?
            };
            layers.push(LayerWeights {
                attn_norm: ld.vector(&n("attn_norm.weight"), d)?,
                wqkv: WeightMatrix::stacked(&[&wq, &wk, &wv]),
                wq,
                wk,
                wv,
                wo: ld.matrix(&n("attn_output.weight"), d, q)?,
                qkv_bias: if c.qkv_bias {
                    Some([ld.vector(&n("attn_q.bias"), q)?, ld.vector(&n("attn_k.bias"), kv)?, ld.vector(&n("attn_v.bias"), kv)?])
                } else {
                    None
                },
                qk_norm: if c.qk_norm {
                    Some([ld.vector(&n("attn_q_norm.weight"), c.head_dim)?, ld.vector(&n("attn_k_norm.weight"), c.head_dim)?])
                } else {
                    None
                },
                post_attn_norm: if c.post_norms { Some(ld.vector(&n("post_attention_norm.weight"), d)?) } else { None },
                ffn_norm: ld.vector(&n("ffn_norm.weight"), d)?,
                w_gate,
                w_up,
                w_down: ld.matrix(&n("ffn_down.weight"), d, ff)?,
                post_ffn_norm: if c.post_norms { Some(ld.vector(&n("post_ffw_norm.weight"), d)?) } else { None },
            });
        }
        let lm_head = match f.find_tensor("output.weight") {
            Some(_) => Some(ld.matrix("output.weight", c.n_vocab, d)?),
            None => None,
        };
        let rope_factors = c.rope.factors.as_ref().map(|v| storage_buffer(ctx, "rope_factors", bytemuck::cast_slice(v)));
        let rope_factors_long = c.long_rope.as_ref().map(|lr| storage_buffer(ctx, "rope_factors_long", bytemuck::cast_slice(&lr.factors)));
        Ok(Self {
            embed: ld.matrix("token_embd.weight", c.n_vocab, d)?,
            layers,
            out_norm: ld.vector("output_norm.weight", d)?,
            lm_head,
            rope_factors,
            rope_factors_long,
        })
    }

    /// The frequency factors uploaded for a context of `n_ctx` positions (those of
    /// [`ModelConfig::layer_rope`]).
    pub fn rope_factors_in(&self, c: &ModelConfig, n_ctx: usize) -> Option<&wgpu::Buffer> {
        if c.long_rope_in(n_ctx) {
            self.rope_factors_long.as_ref()
        } else {
            self.rope_factors.as_ref()
        }
    }

    /// The matrix that maps the final hidden state to logits.
    pub fn output(&self) -> &WeightMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights resident on the GPU.
    pub fn n_bytes(&self) -> usize {
        let mats =
            |l: &LayerWeights| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|m| m.n_bytes()).sum::<usize>();
        self.embed.n_bytes() + self.lm_head.as_ref().map_or(0, |m| m.n_bytes()) + self.layers.iter().map(mats).sum::<usize>()
    }
}
