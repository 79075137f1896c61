// lora_backward.wgsl — gradients of one trained LoRA adapter on one projection.
//
// The forward adds y += s·B·u with u = A·x (u kept from the forward's shrink). Given dy:
//   `grad_b`  dB[n, j] (+)= s · Σ_t dy[t, n] · u[t, j]         one invocation per (n, j)
//   `down`    du[t, j]   = s · Σ_n B[n, j] · dy[t, n]           one invocation per (t, j)
//   `grad_a`  dA[j, k] (+)= Σ_t du[t, j] · x[t, k]               one invocation per (j, k)
//   `back_x`  dx[t, k]  += Σ_j A[j, k] · du[t, j]                one invocation per (t, k)
// (`accumulate` = 1 adds into dA/dB: gradient accumulation over examples.) Run in this order;
// `back_x` adds the adapter's share to the dx the frozen weight's transposed product wrote.
// Layout: x: rows of K f32 at x_offset + t·x_stride; dy: rows of N f32 at dy_offset + t·dy_stride;
//   dx laid out like x; A: r×K f32 at a_offset; B: N×r f32 at b_offset; dA, dB likewise at their
//   offsets; u, du: M×r f32.
// Work split: one invocation per output element with a loop over the reduced dimension: the rows
//   of a training step (t) and the rank (j) are small; no barriers.
// Limits: none beyond buffer sizes.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/lora_backward.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
@group(0) @binding(2) var<storage, read> rhs: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn put(i: u32, v: f32, add: bool) {
    if (add) {
        out[i] += v;
    } else {
        out[i] = v;
    }
}

// lhs = dy, rhs = u, out = dB (at g_offset).
@compute @workgroup_size(64)
fn grad_b(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.n * p.r) {
        return;
    }
    let n = i / p.r;
    let j = i % p.r;
    var acc = 0.0;
    for (var t = 0u; t < p.m; t++) {
        acc += lhs[p.dy_offset + t * p.dy_stride + n] * rhs[t * p.r + j];
    }
    put(p.g_offset + i, p.scale * acc, p.accumulate != 0u);
}

// lhs = dy, rhs = B (at w_offset), out = du.
@compute @workgroup_size(64)
fn down(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.m * p.r) {
        return;
    }
    let t = i / p.r;
    let j = i % p.r;
    var acc = 0.0;
    for (var n = 0u; n < p.n; n++) {
        acc += rhs[p.w_offset + n * p.r + j] * lhs[p.dy_offset + t * p.dy_stride + n];
    }
    put(i, p.scale * acc, false);
}

// lhs = du, rhs = x, out = dA (at g_offset).
@compute @workgroup_size(64)
fn grad_a(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.r * p.k) {
        return;
    }
    let j = i / p.k;
    let k = i % p.k;
    var acc = 0.0;
    for (var t = 0u; t < p.m; t++) {
        acc += lhs[t * p.r + j] * rhs[p.x_offset + t * p.x_stride + k];
    }
    put(p.g_offset + i, acc, p.accumulate != 0u);
}

// lhs = du, rhs = A (at w_offset), out = dx (laid out like x).
@compute @workgroup_size(64)
fn back_x(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.m * p.k) {
        return;
    }
    let t = i / p.k;
    let k = i % p.k;
    var acc = 0.0;
    for (var j = 0u; j < p.r; j++) {
        acc += rhs[p.w_offset + j * p.k + k] * lhs[t * p.r + j];
    }
    put(p.x_offset + t * p.x_stride + k, acc, true);
}
