//! The learning-rate schedule: linear warmup and cosine decay. The optimizer itself (AdamW, its
//! host rule and its GPU kernel) is [`crate::kernels::optim`].

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
}
