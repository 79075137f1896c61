//! The optimizer: AdamW (decoupled weight decay) with linear warmup and cosine decay of the
//! learning rate. Written once on the host; it is also the reference the GPU update is checked
//! against.

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

/// Learning rate: linear warmup to `peak` over `warmup` steps, then cosine decay to `min` at
/// `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Highest learning rate.
    pub peak: f32,
    /// Final learning rate.
    pub min: f32,
    /// Warmup steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
}

impl Schedule {
    /// The learning rate of step `t` (1-based).
    pub fn lr(&self, t: u64) -> f32 {
        if t <= self.warmup {
            return self.peak * t as f32 / self.warmup.max(1) as f32;
        }
        let done = (t - self.warmup) as f32 / (self.total.saturating_sub(self.warmup)).max(1) as f32;
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f32::consts::PI * done.min(1.0)).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule { peak: 1e-3, min: 1e-5, warmup: 10, total: 110 };
        assert!((s.lr(5) - 5e-4).abs() < 1e-9);
        assert!((s.lr(10) - 1e-3).abs() < 1e-9);
        assert!((s.lr(60) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-7);
        assert!((s.lr(110) - 1e-5).abs() < 1e-9 && (s.lr(500) - 1e-5).abs() < 1e-9);
    }

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
