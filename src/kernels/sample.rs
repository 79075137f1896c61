//! Token choice on the GPU — greedy argmax and temperature/top-k/top-p sampling — launcher of
//! `shaders/sample.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/sample.wgsl");

/// Most candidates the kernel keeps (top-k).
pub const K_MAX: usize = 64;

/// u32 words of output per row: token, K_MAX ids, K_MAX probabilities.
pub const OUT_WORDS: usize = 1 + 2 * K_MAX;

/// Sampling settings.
#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Random seed.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 40, top_p: 0.95, seed: 0 }
    }
}

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n: u32,
        offset: u32,
        k: u32,
        temperature: f32,
        top_p: f32,
        u: f32,
    }
}

/// Record a draw from the one row of `x`: top-`cfg.top_k` (1..=64) at `cfg.temperature`, nucleus
/// `cfg.top_p`, with `u` uniform in [0, 1) from the host's seeded generator. `out` holds
/// [`OUT_WORDS`] u32.
pub fn sample(rec: &mut Recorder, ctx: &GpuContext, x: View, cfg: &SamplerConfig, u: f32, out: &wgpu::Buffer) -> Result<()> {
    let (k, temperature) = (cfg.top_k, cfg.temperature);
    if x.rows != 1 || k == 0 || k > K_MAX || k > x.cols || temperature <= 0.0 {
        return Err(Error::InvalidOption(format!(
            "GPU sampling needs one row, 1 ≤ top-k ≤ {K_MAX} (got {k}) and a positive temperature (got {temperature})"
        )));
    }
    x.check("sample", "x", 1)?;
    let kernel = ctx.kernel(&super::plain::<Params>("sample", WGSL, "main"))?;
    let p = Params { n: x.cols as u32, offset: x.offset as u32, k: k as u32, temperature, top_p: cfg.top_p, u };
    rec.dispatch(&kernel, &p, vec![Binding::whole(x.buf), Binding::whole(out)], [1, 1, 1])
}

/// Record the greedy choice of each row of `x` (dense rows): the token of row r lands at
/// `out[r·OUT_WORDS]` (top-1 of the sampler: no randomness is involved).
pub fn argmax(rec: &mut Recorder, ctx: &GpuContext, x: View, out: &wgpu::Buffer) -> Result<()> {
    if x.stride != x.cols {
        return Err(Error::Shape { op: "argmax", msg: format!("{x}: dense rows needed") });
    }
    x.check("argmax", "x", 1)?;
    let kernel = ctx.kernel(&super::plain::<Params>("sample", WGSL, "main"))?;
    let p = Params { n: x.cols as u32, offset: x.offset as u32, k: 1, temperature: 1.0, top_p: 1.0, u: 0.0 };
    rec.dispatch(&kernel, &p, vec![Binding::whole(x.buf), Binding::whole(out)], [x.rows as u32, 1, 1])
}
