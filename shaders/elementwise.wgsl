// elementwise.wgsl — small element-wise ops between the matrix kernels.
//
// Entry points:
//   `glu`       a[i] = act(a[i]) · b[i]          (act 0: SiLU for SwiGLU, 1: tanh-GELU for GeGLU)
//   `add_rows`  a[offset + r·stride + i] += b[i] (bias broadcast over rows, i < n)
//   `glu_backward`  given the gate g (in a), up u and dy: a[i] = dy·u·act'(g), up[i] = dy·act(g)
//               (the gradients with respect to gate and up, written over them)
// Layout: f32 arrays; `total` elements for glu, `rows` × `n` for add_rows.
// Work split: one invocation per element; 2-D grid (x + y·65535·64) so large tensors fit.
// Limits: none. The activations come from activation.wgsl.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/elementwise.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn flat(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * 65535u * 64u;
}

@compute @workgroup_size(64)
fn glu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    if (i >= p.total) {
        return;
    }
    a[i] = gate_act(a[i], p.act).x * b[i];
}

@group(0) @binding(2) var<storage, read_write> up: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;

@compute @workgroup_size(64)
fn glu_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    if (i >= p.total) {
        return;
    }
    let act = gate_act(a[i], p.act);
    let d = dy[i];
    a[i] = d * up[i] * act.y;
    up[i] = d * act.x;
}

@compute @workgroup_size(64)
fn add_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    if (i >= p.total) {
        return;
    }
    let r = i / p.n;
    let c = i % p.n;
    a[p.offset + r * p.stride + c] += b[c];
}
