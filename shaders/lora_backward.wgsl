// lora_backward.wgsl — gradients of one trained LoRA adapter on one projection.
//
// The forward adds y += s·B·u with u = A·x (u kept from the forward's shrink). Given dy:
//   `grad_b`  dB[n, j] (+)= s · Σ_t dy[t, n] · u[t, j]         one invocation per (4 n, j)
//   `down`    du[t, j]   = s · Σ_n B[n, j] · dy[t, n]           one invocation per (t, j)
//   `grad_a`  dA[j, k] (+)= Σ_t du[t, j] · x[t, k]               one invocation per (j, 4 k)
//   `back_x`  dx[t, k]  += Σ_j A[j, k] · du[t, j]                one invocation per (t, 4 k)
// (`accumulate` = 1 adds into dA/dB: gradient accumulation over examples.) Run in this order;
// `back_x` adds the adapter's share to the dx the frozen weight's transposed product wrote.
// Layout: x: rows of K f32 at x_offset + t·x_stride; dy: rows of N f32 at dy_offset + t·dy_stride;
//   dx laid out like x; A: r×K f32 at a_offset; B: N×r f32 at b_offset; dA, dB likewise at their
//   offsets; u, du: M×r f32.
// Work split: one invocation per 4 outputs along the model's dimensions (K or N; per output along
//   the rank for `down`), with a loop over the reduced dimension: the rows of a training step
//   (t) and the rank (j) are small. The model's dimensions are read as vec4: on CPU-backed
//   drivers a load whose address differs per lane costs per lane, so four values a load take
//   a fourth of the loads. No barriers.
// Limits: K and N multiples of 4; x, dy, dx and A at float offsets and strides that are
//   multiples of 4 (the launcher checks).

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/lora_backward.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
@group(0) @binding(1) var<storage, read> lhs4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> rhs: array<f32>;
@group(0) @binding(2) var<storage, read> rhs4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn put(i: u32, v: f32, add: bool) {
    if (add) {
        out[i] += v;
    } else {
        out[i] = v;
    }
}

// lhs = dy, rhs = u, out = dB (at g_offset): rows 4·n4 .. 4·n4 + 3 of column j.
@compute @workgroup_size(64)
fn grad_b(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= (p.n / 4u) * p.r) {
        return;
    }
    let n4 = i / p.r;
    let j = i % p.r;
    var acc = vec4<f32>(0.0);
    for (var t = 0u; t < p.m; t++) {
        acc += lhs4[(p.dy_offset + t * p.dy_stride) / 4u + n4] * rhs[t * p.r + j];
    }
    for (var c = 0u; c < 4u; c++) {
        put(p.g_offset + (4u * n4 + c) * p.r + j, p.scale * acc[c], p.accumulate != 0u);
    }
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
    let dyo = (p.dy_offset + t * p.dy_stride) / 4u;
    var acc = vec4<f32>(0.0);
    for (var n4 = 0u; n4 < p.n / 4u; n4++) {
        let b = p.w_offset + 4u * n4 * p.r + j;
        acc += vec4<f32>(rhs[b], rhs[b + p.r], rhs[b + 2u * p.r], rhs[b + 3u * p.r]) * lhs4[dyo + n4];
    }
    put(i, p.scale * (acc.x + acc.y + acc.z + acc.w), false);
}

// lhs = du, rhs = x, out = dA (at g_offset): columns 4·k4 .. 4·k4 + 3 of row j.
@compute @workgroup_size(64)
fn grad_a(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let k4s = p.k / 4u;
    if (i >= p.r * k4s) {
        return;
    }
    let j = i / k4s;
    let k4 = i % k4s;
    var acc = vec4<f32>(0.0);
    for (var t = 0u; t < p.m; t++) {
        acc += lhs[t * p.r + j] * rhs4[(p.x_offset + t * p.x_stride) / 4u + k4];
    }
    for (var c = 0u; c < 4u; c++) {
        put(p.g_offset + j * p.k + 4u * k4 + c, acc[c], p.accumulate != 0u);
    }
}

// lhs = du, rhs = A (at w_offset), out = dx (laid out like x): columns 4·k4 .. 4·k4 + 3 of row t.
@compute @workgroup_size(64)
fn back_x(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let k4s = p.k / 4u;
    if (i >= p.m * k4s) {
        return;
    }
    let t = i / k4s;
    let k4 = i % k4s;
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j < p.r; j++) {
        acc += rhs4[(p.w_offset + j * p.k) / 4u + k4] * lhs[t * p.r + j];
    }
    for (var c = 0u; c < 4u; c++) {
        put(p.x_offset + t * p.x_stride + 4u * k4 + c, acc[c], true);
    }
}
