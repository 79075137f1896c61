//! Fresh random test inputs: vectors, quantized matrices with valid blocks, and tiny GGUF models.

use crate::decode::SplitMix64;
use crate::gguf::{BlockFormat, GgufWriter, MetaValue};
use half::{bf16, f16};

/// `n` values uniform in [-scale, scale).
pub fn random_vec(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * scale).collect()
}

/// A random adapter of `rank` on `projs` of every layer of a model shaped like `c` (values in
/// ±`scale`; alpha = 2·rank so the trained multiplier is 2).
pub fn random_adapter(
    rng: &mut SplitMix64,
    c: &crate::hparams::ModelConfig,
    rank: usize,
    projs: &[crate::lora::Proj],
    scale: f32,
) -> crate::lora::LoraAdapter {
    crate::lora::LoraAdapter::filled(c, rank, projs, |n| random_vec(rng, n, scale))
}

/// `rows × cols` random values stored in `format`: random quants, with every block's scales set to
/// finite values of a size that keeps the dequantized weights around ±`scale`.
pub fn random_matrix_bytes(rng: &mut SplitMix64, format: BlockFormat, rows: usize, cols: usize, scale: f32) -> Vec<u8> {
    let n = rows * cols;
    match format {
        BlockFormat::F32 => return bytemuck::cast_slice(&random_vec(rng, n, scale)).to_vec(),
        BlockFormat::F16 => return random_vec(rng, n, scale).iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        BlockFormat::BF16 => return random_vec(rng, n, scale).iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => {}
    }
    let (bl, bb) = (format.block_len(), format.block_bytes());
    let mut out = vec![0u8; n / bl * bb];
    for b in out.chunks_mut(bb) {
        b.iter_mut().for_each(|x| *x = rng.next_u64() as u8);
        let mut put = |at: usize, v: f32| b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        let r = rng.next_f32() * 0.5 + 0.5;
        match format {
            BlockFormat::Q4_0 => put(0, scale * r / 8.0),
            BlockFormat::Q4_1 => {
                put(0, scale * r / 8.0);
                put(2, -scale * r);
            }
            BlockFormat::Q5_0 => put(0, scale * r / 16.0),
            BlockFormat::Q5_1 => {
                put(0, scale * r / 16.0);
                put(2, -scale * r);
            }
            BlockFormat::IQ4_NL => put(0, scale * r / 127.0),
            // Scales up to ±32 times levels up to 127 (IQ4_XS), 15 × 3 (Q2_K), 32 × 4 (Q3_K).
            BlockFormat::IQ4_XS => put(0, scale * r / (32.0 * 127.0)),
            BlockFormat::Q2_K => {
                put(80, scale * r / (15.0 * 3.0) * 2.0);
                put(82, scale * r / 15.0);
            }
            BlockFormat::Q3_K => put(108, scale * r / (32.0 * 4.0)),
            BlockFormat::Q8_0 => put(0, scale * r / 128.0),
            // 6-bit sub-block scales up to 63, quants up to 15 (31 for Q5_K).
            BlockFormat::Q4_K => {
                put(0, scale * r / (63.0 * 15.0) * 2.0);
                put(2, scale * r / 63.0);
            }
            BlockFormat::Q5_K => {
                put(0, scale * r / (63.0 * 31.0) * 2.0);
                put(2, scale * r / 63.0);
            }
            BlockFormat::Q6_K => put(208, scale * r / (128.0 * 32.0)),
            BlockFormat::F32 | BlockFormat::F16 | BlockFormat::BF16 => unreachable!("handled above"),
        }
    }
    out
}

/// Shape and formats of a tiny random model.
#[derive(Debug, Clone)]
pub struct TinyModelSpec {
    /// `llama`, `qwen2`, `qwen3`, `gemma3` or `phi3`.
    pub arch: &'static str,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Feed-forward hidden size.
    pub ffn_dim: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Format of the projection matrices.
    pub format: BlockFormat,
    /// Format of the embedding table.
    pub embed_format: BlockFormat,
    /// Give the model its own output matrix instead of tying it to the embeddings.
    pub untied_output: bool,
    /// Sliding window (gemma3).
    pub sliding_window: usize,
    /// Trained context length.
    pub n_ctx: usize,
    /// More metadata (a real tokenizer's `tokenizer.*` keys, say).
    pub extra_meta: Vec<(String, MetaValue)>,
    /// Give the rotation per-pair frequency factors (`rope_freqs.weight`, as Llama 3.1 files
    /// have), drawn after every other tensor: the same seed gives the same weights either way.
    pub rope_factors: bool,
    /// LongRoPE as Phi-3 128k files have it, for contexts beyond this original one: short and
    /// long per-pair factors (drawn last) and the attention factor √(1 + ln(n_ctx/orig) / ln orig).
    pub long_rope: Option<usize>,
}

impl TinyModelSpec {
    /// A small model of `arch` whose matrices are in `format`.
    pub fn new(arch: &'static str, format: BlockFormat) -> Self {
        let k = format.block_len().max(32);
        Self {
            arch,
            n_layers: 2,
            d_model: k.max(64),
            n_heads: 4,
            n_kv_heads: 2,
            // Projections take q_dim = 4·head_dim columns: a whole number of blocks.
            head_dim: (k / 4).max(16),
            ffn_dim: k.max(96),
            n_vocab: 61,
            format,
            embed_format: format,
            untied_output: false,
            sliding_window: 3,
            n_ctx: 512,
            extra_meta: Vec::new(),
            rope_factors: false,
            long_rope: None,
        }
    }
}

/// A GGUF file (bytes) holding a random model of `spec`: weights scaled so activations stay O(1).
pub fn tiny_model(spec: &TinyModelSpec, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64(seed);
    let s = spec;
    let (d, q, kv, ff) = (s.d_model, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.ffn_dim);
    let mut w = GgufWriter::new();
    let a = s.arch;
    let key = |k: &str| format!("{a}.{k}");
    w.meta("general.architecture", MetaValue::String(a.into()))
        .meta(&key("block_count"), MetaValue::U32(s.n_layers as u32))
        .meta(&key("embedding_length"), MetaValue::U32(d as u32))
        .meta(&key("feed_forward_length"), MetaValue::U32(ff as u32))
        .meta(&key("attention.head_count"), MetaValue::U32(s.n_heads as u32))
        .meta(&key("attention.head_count_kv"), MetaValue::U32(s.n_kv_heads as u32))
        .meta(&key("attention.key_length"), MetaValue::U32(s.head_dim as u32))
        .meta(&key("context_length"), MetaValue::U32(s.n_ctx as u32))
        .meta(&key("vocab_size"), MetaValue::U32(s.n_vocab as u32))
        .meta(&key("rope.freq_base"), MetaValue::F32(10000.0))
        .meta(&key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5));
    if a == "gemma3" {
        w.meta(&key("attention.sliding_window"), MetaValue::U32(s.sliding_window as u32));
    }
    if let Some(orig) = s.long_rope {
        let scale = (1.0 + (s.n_ctx as f64 / orig as f64).ln() / (orig as f64).ln()).sqrt();
        w.meta(&key("rope.scaling.original_context_length"), MetaValue::U32(orig as u32))
            .meta(&key("rope.scaling.attn_factor"), MetaValue::F32(scale as f32));
    }
    for (k, v) in &s.extra_meta {
        w.meta(k, v.clone());
    }
    let mut mat = |w: &mut GgufWriter, name: &str, fmt: BlockFormat, rows: usize, cols: usize| {
        let bytes = random_matrix_bytes(&mut rng, fmt, rows, cols, 1.0 / (cols as f32).sqrt() * 1.7);
        w.tensor(name, &[cols as u64, rows as u64], fmt.ggml_type(), bytes);
    };
    mat(&mut w, "token_embd.weight", s.embed_format, s.n_vocab, d);
    if s.untied_output {
        mat(&mut w, "output.weight", s.format, s.n_vocab, d);
    }
    for l in 0..s.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        if a == "phi3" {
            // Fused as phi3 files store them: q, k, v rows in one tensor, gate then up in one.
            mat(&mut w, &n("attn_qkv.weight"), s.format, q + 2 * kv, d);
            mat(&mut w, &n("attn_output.weight"), s.format, d, q);
            mat(&mut w, &n("ffn_up.weight"), s.format, 2 * ff, d);
        } else {
            mat(&mut w, &n("attn_q.weight"), s.format, q, d);
            mat(&mut w, &n("attn_k.weight"), s.format, kv, d);
            mat(&mut w, &n("attn_v.weight"), s.format, kv, d);
            mat(&mut w, &n("attn_output.weight"), s.format, d, q);
            mat(&mut w, &n("ffn_gate.weight"), s.format, ff, d);
            mat(&mut w, &n("ffn_up.weight"), s.format, ff, d);
        }
        mat(&mut w, &n("ffn_down.weight"), s.format, d, ff);
    }
    let mut vecs: Vec<(String, usize, f32)> = vec![("output_norm.weight".into(), d, 1.0)];
    for l in 0..s.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        vecs.push((n("attn_norm.weight"), d, 1.0));
        vecs.push((n("ffn_norm.weight"), d, 1.0));
        if a == "qwen2" {
            vecs.push((n("attn_q.bias"), q, 0.0));
            vecs.push((n("attn_k.bias"), kv, 0.0));
            vecs.push((n("attn_v.bias"), kv, 0.0));
        }
        if a == "qwen3" || a == "gemma3" {
            vecs.push((n("attn_q_norm.weight"), s.head_dim, 1.0));
            vecs.push((n("attn_k_norm.weight"), s.head_dim, 1.0));
        }
        if a == "gemma3" {
            vecs.push((n("post_attention_norm.weight"), d, 1.0));
            vecs.push((n("post_ffw_norm.weight"), d, 1.0));
        }
    }
    for (name, len, center) in vecs {
        // Norm weights near 1, biases near 0: random but in the range real models use.
        let v: Vec<f32> = random_vec(&mut rng, len, 0.3).into_iter().map(|x| x + center).collect();
        w.tensor_f32(&name, &[len as u64], &v);
    }
    if s.rope_factors {
        // Llama 3.1's shape: high frequencies kept (1), low ones divided by up to 8.
        let pairs = s.head_dim / 2;
        let v: Vec<f32> = (0..pairs).map(|i| if i < pairs / 4 { 1.0 } else { 1.0 + 7.0 * rng.next_f32() }).collect();
        w.tensor_f32("rope_freqs.weight", &[pairs as u64], &v);
    }
    if s.long_rope.is_some() {
        // Phi-3's shapes: short factors near 1, long ones growing from 1 to tens.
        let pairs = s.head_dim / 2;
        let short: Vec<f32> = (0..pairs).map(|_| 1.0 + 0.2 * rng.next_f32()).collect();
        let long: Vec<f32> = (0..pairs).map(|i| 1.0 + 40.0 * (i as f32 / pairs as f32).powi(2) * (0.5 + rng.next_f32())).collect();
        w.tensor_f32("rope_factors_short.weight", &[pairs as u64], &short);
        w.tensor_f32("rope_factors_long.weight", &[pairs as u64], &long);
    }
    w.to_bytes()
}
