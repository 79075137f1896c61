// adamw.wgsl — one AdamW step (decoupled weight decay) over a flat parameter tensor.
//
// Computes, per element: m = β₁m + (1−β₁)g;  v = β₂v + (1−β₂)g²;
//   w −= lr · (wd·w + (m / c1) / (sqrt(v / c2) + eps)),  c1 = 1−β₁ᵗ, c2 = 1−β₂ᵗ (bias corrections,
//   computed on the host for step t). The same rule as `train::optim::AdamW::step`.
// Layout: w, g, m, v: f32 arrays of the same layout; the step covers elements offset..offset+n
//   (one adapter's range inside buffers shaped like the adapter packs).
// Work split: one invocation per element, flat 2-D grid (x + y·65535·64).
// Limits: none.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/optim.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 64u;
    if (e >= p.n) {
        return;
    }
    let i = p.offset + e;
    let gi = g[i];
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * gi;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] -= p.lr * (p.weight_decay * w[i] + (mi / p.c1) / (sqrt(vi / p.c2) + p.eps));
}
