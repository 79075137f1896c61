// elementwise.wgsl — small element-wise ops between the matrix kernels.
//
// Entry points:
//   `glu`       a[i] = act(a[i]) · b[i]          (act 0: SiLU for SwiGLU, 1: tanh-GELU for GeGLU)
//   `add_rows`  a[offset + r·stride + i] += b[i] (bias broadcast over rows, i < n)
// Layout: f32 arrays; `total` elements for glu, `rows` × `n` for add_rows.
// Work split: one invocation per element; 2-D grid (x + y·65535·64) so large tensors fit.
// Limits: none.

struct Params {
    total: u32,
    n: u32,
    offset: u32,
    stride: u32,
    act: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn flat(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * 65535u * 64u;
}

fn gelu_tanh(x: f32) -> f32 {
    // tanh via exp of a clamped argument: tanh saturates long before the clamp.
    let u = clamp(0.7978845608 * (x + 0.044715 * x * x * x), -15.0, 15.0);
    let e = exp(2.0 * u);
    return 0.5 * x * (1.0 + (e - 1.0) / (e + 1.0));
}

@compute @workgroup_size(64)
fn glu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    if (i >= p.total) {
        return;
    }
    let g = a[i];
    var act: f32;
    if (p.act == 0u) {
        act = g / (1.0 + exp(-g));
    } else {
        act = gelu_tanh(g);
    }
    a[i] = act * b[i];
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
