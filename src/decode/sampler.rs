//! Temperature, top-k and top-p sampling on the host, from one row of logits.
//!
//! Greedy decoding (temperature 0) never comes here: the argmax runs on the GPU.

pub use crate::kernels::sample::SamplerConfig;

/// A small, seedable, reproducible random generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A seeded sampler.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler with `cfg`.
    pub fn new(cfg: SamplerConfig) -> Self {
        Self { cfg, rng: SplitMix64(cfg.seed) }
    }

    /// Whether this sampler is greedy.
    pub fn is_greedy(&self) -> bool {
        self.cfg.temperature <= 0.0
    }

    /// The settings.
    pub fn config(&self) -> SamplerConfig {
        self.cfg
    }

    /// The next uniform number in [0, 1) of this sampler's seeded stream.
    pub fn next_uniform(&mut self) -> f32 {
        self.rng.next_f32()
    }

    /// Draw a token from `logits` on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let u = self.rng.next_f32();
        draw(logits, &self.cfg, u)
    }
}

/// The sampling rule, given the uniform number `u`: sort by logit (ties: lower id first), keep
/// top-k, softmax at the temperature, keep the shortest prefix reaching top-p, and return the
/// token where the renormalised running sum reaches `u`. Temperature 0 is the argmax.
/// `shaders/sample.wgsl` implements the same rule on the GPU.
pub fn draw(logits: &[f32], cfg: &SamplerConfig, u: f32) -> u32 {
    let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if cfg.temperature <= 0.0 || idx.len() <= 1 {
        return idx.first().copied().unwrap_or(0);
    }
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - max) / cfg.temperature).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    let mut keep = probs.len();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= cfg.top_p {
            keep = i + 1;
            break;
        }
    }
    let total: f32 = probs[..keep].iter().sum();
    let mut left = u * total;
    for i in 0..keep {
        left -= probs[i];
        if left <= 0.0 {
            return idx[i];
        }
    }
    idx[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.0, 3.0, f32::NAN, 3.0, 1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32).collect();
        let cfg = SamplerConfig { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 7 };
        assert_eq!(Sampler::new(cfg).sample(&logits) as usize, crate::reference::argmax(&logits));
        let cfg = SamplerConfig { temperature: 0.8, top_k: 0, top_p: 0.9, seed: 42 };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| logits[t as usize] >= 9.0), "top-p 0.9 kept an unlikely token: {a:?}");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.75 / 0.25 at temperature 1.
        let logits = [3f32.ln(), 0.0];
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1 });
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&logits) == 0).count() as f32 / n as f32;
        assert!((zeros - 0.75).abs() < 0.02, "{zeros}");
    }
}
