//! AdamW (decoupled weight decay): its settings, the rule on the host (the reference the GPU
//! update is checked against) and the launcher of `shaders/adamw.wgsl`.

use crate::error::Result;
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/adamw.wgsl");

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// β₁, the first moment's decay.
    pub beta1: f32,
    /// β₂, the second moment's decay.
    pub beta2: f32,
    /// Added to the second moment's root.
    pub eps: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// One tensor's moments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moments {
    /// First moment (mean of gradients).
    pub m: Vec<f32>,
    /// Second moment (mean of squared gradients).
    pub v: Vec<f32>,
}

impl AdamW {
    /// Update `params` with `grads` at step `t` (1-based) and learning rate `lr`.
    pub fn step(&self, params: &mut [f32], grads: &[f32], state: &mut Moments, t: u64, lr: f32) {
        if state.m.len() != params.len() {
            state.m = vec![0.0; params.len()];
            state.v = vec![0.0; params.len()];
        }
        let c1 = 1.0 - self.beta1.powi(t as i32);
        let c2 = 1.0 - self.beta2.powi(t as i32);
        for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(&mut state.m).zip(&mut state.v) {
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            *p -= lr * (self.weight_decay * *p + (*m / c1) / ((*v / c2).sqrt() + self.eps));
        }
    }
}

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n: u32,
        offset: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        c1: f32,
        c2: f32,
    }
}

/// The tensors one AdamW update reads and writes on the GPU, laid out alike.
pub struct AdamTensors<'a> {
    /// The parameters, updated in place.
    pub w: &'a wgpu::Buffer,
    /// Their gradients.
    pub g: &'a wgpu::Buffer,
    /// First moments.
    pub m: &'a wgpu::Buffer,
    /// Second moments.
    pub v: &'a wgpu::Buffer,
}

/// Record one AdamW step (`opt`'s rule, step `t` ≥ 1, learning rate `lr`) of the floats
/// `range` (start, length) of the tensors.
pub fn adamw(rec: &mut Recorder, ctx: &GpuContext, opt: &AdamW, x: AdamTensors, range: (usize, usize), t: u64, lr: f32) -> Result<()> {
    let (offset, n) = range;
    let kernel = ctx.kernel(&super::plain::<Params>("adamw", WGSL, "main"))?;
    let p = Params {
        n: n as u32,
        offset: offset as u32,
        lr,
        beta1: opt.beta1,
        beta2: opt.beta2,
        eps: opt.eps,
        weight_decay: opt.weight_decay,
        c1: 1.0 - opt.beta1.powi(t as i32),
        c2: 1.0 - opt.beta2.powi(t as i32),
    };
    rec.dispatch(&kernel, &p, vec![Binding::whole(x.w), Binding::whole(x.g), Binding::whole(x.m), Binding::whole(x.v)], super::flat_grid(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_and_decay() {
        // The first bias-corrected step moves each parameter by lr·sign(g) (plus the decay).
        let opt = AdamW { weight_decay: 0.1, ..Default::default() };
        let mut p = vec![1.0f32, -2.0, 0.5];
        let mut st = Moments::default();
        opt.step(&mut p, &[0.3, -4.0, 0.0], &mut st, 1, 0.01);
        let want = [1.0 - 0.01 * (0.1 * 1.0 + 1.0), -2.0 - 0.01 * (0.1 * -2.0 - 1.0), 0.5 - 0.01 * 0.1 * 0.5];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?} vs {want:?}");
        }
        // Minimises a quadratic.
        let mut x = vec![3.0f32];
        let mut st = Moments::default();
        let plain = AdamW { weight_decay: 0.0, ..Default::default() };
        for t in 1..=500 {
            let g = [2.0 * (x[0] - 1.0)];
            plain.step(&mut x, &g, &mut st, t, 0.05);
        }
        assert!((x[0] - 1.0).abs() < 1e-2, "{x:?}");
    }
}
