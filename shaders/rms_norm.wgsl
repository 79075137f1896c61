// rms_norm.wgsl — RMSNorm over rows: y = x / sqrt(mean(x²) + eps) · w.
//
// Entry points:
//   `norm`          y[r] (+)= rmsnorm(x[r]) · w   (`accumulate` = 1 adds into y: fuses Gemma's
//                   post-norm residual add)
//   `norm_inplace`  y[r] = rmsnorm(y[r]) · w      (per-head q/k norms, written in place)
//   `norm_backward` dx[r] (+)= ∂/∂x of Σ dy[r]·(rmsnorm(x[r])·w)
//                   = inv·w⊙dy − inv³·x·(Σ w⊙dy⊙x)/n, inv = 1/sqrt(mean(x²) + eps)
//                   (x and dy share the x offset/stride; dx uses y's; w is frozen)
// Layout: rows of `n` f32, row r at offset + r·stride (floats); w is `n` f32.
// Work split: one invocation per row, two passes over the row in registers/cache: rows are short
//   (hidden size or head size) and a per-row loop beats a shared-memory tree on CPU-backed devices.
// Limits: none beyond buffer sizes.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/norm.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> nw: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn norm(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) {
        return;
    }
    let xo = p.x_offset + r * p.x_stride;
    let yo = p.y_offset + r * p.y_stride;
    var ss = 0.0;
    for (var i = 0u; i < p.n; i++) {
        ss += x[xo + i] * x[xo + i];
    }
    let inv = inverseSqrt(ss / f32(p.n) + p.eps);
    for (var i = 0u; i < p.n; i++) {
        let v = x[xo + i] * inv * nw[i];
        if (p.accumulate != 0u) {
            y[yo + i] += v;
        } else {
            y[yo + i] = v;
        }
    }
}

@group(0) @binding(2) var<storage, read_write> z: array<f32>;

@compute @workgroup_size(64)
fn norm_inplace(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) {
        return;
    }
    let o = p.y_offset + r * p.y_stride;
    var ss = 0.0;
    for (var i = 0u; i < p.n; i++) {
        ss += z[o + i] * z[o + i];
    }
    let inv = inverseSqrt(ss / f32(p.n) + p.eps);
    for (var i = 0u; i < p.n; i++) {
        z[o + i] = z[o + i] * inv * nw[i];
    }
}

@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(64)
fn norm_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) {
        return;
    }
    let xo = p.x_offset + r * p.x_stride;
    let yo = p.y_offset + r * p.y_stride;
    var ss = 0.0;
    var gx = 0.0;
    for (var i = 0u; i < p.n; i++) {
        ss += x[xo + i] * x[xo + i];
        gx += nw[i] * dy[xo + i] * x[xo + i];
    }
    let inv = inverseSqrt(ss / f32(p.n) + p.eps);
    let k = inv * inv * inv * gx / f32(p.n);
    for (var i = 0u; i < p.n; i++) {
        let v = inv * nw[i] * dy[xo + i] - k * x[xo + i];
        if (p.accumulate != 0u) {
            dx[yo + i] += v;
        } else {
            dx[yo + i] = v;
        }
    }
}
