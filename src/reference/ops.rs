//! Reference operators on plain f32 slices.

use crate::hparams::{Activation, Rope, RopeLayout};

/// `y[m, n] = Σ_k w[n, k] · x[m, k]` with `w` row-major `rows × cols` and `x` `m × cols`.
pub fn matmul(w: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let m = x.len() / cols;
    let mut y = vec![0f32; m * rows];
    for t in 0..m {
        for n in 0..rows {
            let mut acc = 0f64;
            for k in 0..cols {
                acc += w[n * cols + k] as f64 * x[t * cols + k] as f64;
            }
            y[t * rows + n] = acc as f32;
        }
    }
    y
}

/// Activations as the integer-dot products take them (`shaders/quantize_q8.wgsl`): each group of
/// 32 values rounded to a multiple of its scale `d = max|v| / 127` (half to even, in f32 as the
/// kernel computes it), returned as f32 `d·q`.
pub fn quantize_q8(x: &[f32]) -> Vec<f32> {
    x.chunks(32)
        .flat_map(|g| {
            let d = g.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            g.iter().map(move |v| d * (v * id).round_ties_even())
        })
        .collect()
}

/// RMSNorm of each row of `n`.
pub fn rms_norm(x: &[f32], w: &[f32], n: usize, eps: f32) -> Vec<f32> {
    x.chunks(n)
        .flat_map(|row| {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(w).map(move |(v, g)| (*v as f64 * inv) as f32 * g)
        })
        .collect()
}

/// Rotary embedding of `x` (rows of `n_heads × head_dim`) at positions `pos0..`.
pub fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, rope: &Rope, pos0: usize) {
    rotate(x, n_heads, head_dim, rope, pos0, 1.0);
}

/// The gradient through [`rope`]: each pair rotated back (the transpose of a rotation is its
/// inverse) and scaled as the forward pass scales it, in place.
pub fn rope_backward(dy: &mut [f32], n_heads: usize, head_dim: usize, rope: &Rope, pos0: usize) {
    rotate(dy, n_heads, head_dim, rope, pos0, -1.0);
}

fn rotate(x: &mut [f32], n_heads: usize, head_dim: usize, rope: &Rope, pos0: usize, sign: f64) {
    let row = n_heads * head_dim;
    let half = rope.rot_dim / 2;
    for (t, r) in x.chunks_mut(row).enumerate() {
        for h in 0..n_heads {
            for i in 0..half {
                let theta = sign * (pos0 + t) as f64 * rope.frequency(i);
                let (a, b) = match rope.layout {
                    RopeLayout::Normal => (h * head_dim + 2 * i, h * head_dim + 2 * i + 1),
                    RopeLayout::Neox => (h * head_dim + i, h * head_dim + i + half),
                };
                let (xa, xb) = (r[a] as f64, r[b] as f64);
                let (c, s) = (rope.scale as f64 * theta.cos(), rope.scale as f64 * theta.sin());
                r[a] = (xa * c - xb * s) as f32;
                r[b] = (xa * s + xb * c) as f32;
            }
        }
    }
}

/// Causal attention of `n_tokens` queries at positions `pos0..` over keys/values `0..pos0+n_tokens`
/// (rows of `n_kv_heads × head_dim`), optionally within a sliding window.
#[allow(clippy::too_many_arguments)] // plain slices and scalars: the reference stays free of the engine's types
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    pos0: usize,
    window: usize,
    scale: f32,
) -> Vec<f32> {
    let n_tokens = q.len() / (n_heads * head_dim);
    let kv_row = n_kv_heads * head_dim;
    let mut out = vec![0f32; q.len()];
    for t in 0..n_tokens {
        let pos = pos0 + t;
        let start = if window > 0 { (pos + 1).saturating_sub(window) } else { 0 };
        for h in 0..n_heads {
            let kh = h / (n_heads / n_kv_heads);
            let qv = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let scores: Vec<f64> = (start..=pos)
                .map(|j| {
                    let kv = &k[j * kv_row + kh * head_dim..][..head_dim];
                    qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let o = &mut out[(t * n_heads + h) * head_dim..][..head_dim];
            for (i, j) in (start..=pos).enumerate() {
                let vv = &v[j * kv_row + kh * head_dim..][..head_dim];
                for d in 0..head_dim {
                    o[d] += (e[i] / sum * vv[d] as f64) as f32;
                }
            }
        }
    }
    out
}

/// Gated activation: `act(gate) · up`.
pub fn glu(gate: &[f32], up: &[f32], act: Activation) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| (activation(g as f64, act).0 * u as f64) as f32).collect()
}

/// `act(g)` and its derivative.
pub(super) fn activation(g: f64, act: Activation) -> (f64, f64) {
    match act {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-g).exp());
            (g * s, s * (1.0 + g * (1.0 - s)))
        }
        Activation::GeluTanh => {
            const C: f64 = 0.797_884_560_802_865_4;
            let t = (C * (g + 0.044715 * g * g * g)).tanh();
            (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * g * g))
        }
    }
}

/// Index of the largest value (the first among equals); NaN never wins.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}
