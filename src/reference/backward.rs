//! Reference gradients of the operators in `ops`, straight from their definitions (f64
//! accumulation). The trainer's GPU kernels are checked against these, and these against finite
//! differences.

use super::ops::activation;
use crate::hparams::Activation;

/// `dx` of `y = W·x` (`W` row-major `rows × cols`) given `dy` (`m × rows`): `dx = dy·W`.
pub fn matmul_backward_x(w: &[f32], dy: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let m = dy.len() / rows;
    let mut dx = vec![0f32; m * cols];
    for t in 0..m {
        for k in 0..cols {
            let mut acc = 0f64;
            for n in 0..rows {
                acc += dy[t * rows + n] as f64 * w[n * cols + k] as f64;
            }
            dx[t * cols + k] = acc as f32;
        }
    }
    dx
}

/// `dW += Σ_t dy_t ⊗ x_t` for `y = W·x` (`dW` row-major `rows × cols`).
pub fn matmul_backward_w(dy: &[f32], x: &[f32], rows: usize, cols: usize, dw: &mut [f32]) {
    for (dyr, xr) in dy.chunks(rows).zip(x.chunks(cols)) {
        for n in 0..rows {
            for k in 0..cols {
                dw[n * cols + k] += dyr[n] * xr[k];
            }
        }
    }
}

/// `dx` of RMSNorm (`y = w ⊙ x / rms(x)`, rows of `n`; the weight is frozen).
pub fn rms_norm_backward(x: &[f32], w: &[f32], dy: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    for ((xr, dyr), dxr) in x.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
        let ms = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        // g = w ⊙ dy; dx = inv·g − inv³·x·(g·x)/n.
        let gx: f64 = (0..n).map(|i| w[i] as f64 * dyr[i] as f64 * xr[i] as f64).sum();
        for i in 0..n {
            dxr[i] = (inv * w[i] as f64 * dyr[i] as f64 - inv.powi(3) * xr[i] as f64 * gx / n as f64) as f32;
        }
    }
    dx
}

/// Gradients of causal attention from position 0 ([`super::attention`] with `pos0 = 0`) with
/// respect to `q`, `k` and `v`, given the output's gradient `dout`.
#[allow(clippy::too_many_arguments)] // plain slices and scalars: the reference stays free of the engine's types
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n_tokens = q.len() / (n_heads * head_dim);
    let kv_row = n_kv_heads * head_dim;
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
    for t in 0..n_tokens {
        let start = if window > 0 { (t + 1).saturating_sub(window) } else { 0 };
        for h in 0..n_heads {
            let kh = h / (n_heads / n_kv_heads);
            let qo = (t * n_heads + h) * head_dim;
            let key = |j: usize| j * kv_row + kh * head_dim;
            let scores: Vec<f64> = (start..=t).map(|j| dot(&q[qo..][..head_dim], &k[key(j)..][..head_dim]) * scale as f64).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
            let d_o = &dout[qo..][..head_dim];
            // dp_j = do·v_j; ds_j = p_j (dp_j − Σ p·dp).
            let dp: Vec<f64> = (start..=t).map(|j| dot(d_o, &v[key(j)..][..head_dim])).collect();
            let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for (i, j) in (start..=t).enumerate() {
                let ds = p[i] * (dp[i] - pdp) * scale as f64;
                for d in 0..head_dim {
                    dv[key(j) + d] += (p[i] * d_o[d] as f64) as f32;
                    dq[qo + d] += (ds * k[key(j) + d] as f64) as f32;
                    dk[key(j) + d] += (ds * q[qo + d] as f64) as f32;
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Gradients of [`super::glu`] (`act(gate) · up`) with respect to `gate` and `up`.
pub fn glu_backward(gate: &[f32], up: &[f32], dy: &[f32], act: Activation) -> (Vec<f32>, Vec<f32>) {
    gate.iter()
        .zip(up)
        .zip(dy)
        .map(|((&g, &u), &d)| {
            let (a, da) = activation(g as f64, act);
            ((d as f64 * u as f64 * da) as f32, (d as f64 * a) as f32)
        })
        .unzip()
}

/// Mean cross-entropy of `targets` (`(row, token)`: the token each logits row should predict)
/// and its gradient with respect to every logit (zero on rows that are no target).
pub fn cross_entropy(logits: &[f32], n_vocab: usize, targets: &[(usize, u32)]) -> (f32, Vec<f32>) {
    let mut grad = vec![0f32; logits.len()];
    let mut loss = 0f64;
    let n = targets.len().max(1) as f64;
    for &(row, token) in targets {
        let l = &logits[row * n_vocab..][..n_vocab];
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum();
        loss += sum.ln() + max - l[token as usize] as f64;
        let g = &mut grad[row * n_vocab..][..n_vocab];
        for (i, gi) in g.iter_mut().enumerate() {
            let p = (l[i] as f64 - max).exp() / sum;
            *gi += ((p - if i == token as usize { 1.0 } else { 0.0 }) / n) as f32;
        }
    }
    ((loss / n) as f32, grad)
}
