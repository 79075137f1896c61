//! Shared test support: one GPU context per test binary, seeds, tolerances.
#![allow(dead_code)]

use agentflux::decode::SplitMix64;
use agentflux::gpu::{GpuContext, GpuOptions};
use std::sync::{Arc, OnceLock};

/// The GPU every test in this binary uses (lavapipe on CI).
pub fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| Arc::new(GpuContext::new(&GpuOptions::default()).expect("a GPU adapter (install mesa-vulkan-drivers)")))
        .clone()
}

/// A fresh seed each run (AGENTFLUX_SEED reproduces one), printed so a failure can be replayed.
pub fn rng(test: &str) -> SplitMix64 {
    let seed = std::env::var("AGENTFLUX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("{test}: seed {seed} (rerun with AGENTFLUX_SEED={seed})");
    SplitMix64(seed)
}

/// Largest |a - b| relative to the largest |b| (and 1), with the index where it happens.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let e = if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() / scale };
        if e > worst.0 {
            worst = (e, i);
        }
    }
    worst
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let (e, i) = max_rel_err(got, want);
    assert!(e <= tol, "{what}: error {e:.3e} > {tol:.1e} at {i} (got {}, want {})", got[i], want[i]);
    assert!(want.iter().any(|v| *v != 0.0), "{what}: reference is all zeros");
}
