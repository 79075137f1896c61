// quantize_q8.wgsl — activation rows to 8-bit integers with a scale per 32 values (llama.cpp's
// Q8_1 idea), once per product, for the integer-dot products (quant_matmul_q8.wgsl).
//
// Computes: for row m < M and 32-value group g < K/32 of v = x[m] (· nw with `norm` = 1: the
//   RMSNorm's weights; its 1/rms is applied by the product):
//   d = max|v| / 127, q_j = round(v_j / d) (round half to even; 0 where d = 0),
//   qs[(m·K/32 + g)·8 + i] = q_{4i..4i+3} packed as i8, the first in the lowest byte,
//   groups_out[m·K/32 + g] = (d, d·Σ_{j<16} q_j, d·Σ_{j≥16} q_j, Σ_j x_j²): the scale, the two
//   halves' sums (what a weight format's offsets multiply) and the squares of x before the norm's
//   weights (what the fused norm's 1/rms needs).
// Layout: x: rows of K f32 at x_offset + m·x_stride (vec4 units); nw: K f32; qs, groups_out: dense,
//   row m's groups from m·K/32.
// Work split: one invocation per (group, row).
// Limits: K a multiple of 32; M ≤ 65535.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/quantize.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> nw: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> qs: array<u32>;
@group(0) @binding(4) var<storage, read_write> groups_out: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    let m = gid.y;
    let groups = p.k / 32u;
    if (g >= groups || m >= p.m) {
        return;
    }
    let xo = p.x_offset + m * p.x_stride + g * 8u;
    var v: array<vec4<f32>, 8>;
    var amax = 0.0;
    var ss = 0.0;
    for (var j = 0u; j < 8u; j++) {
        let xj = x[xo + j];
        ss += dot(xj, xj);
        v[j] = xj;
        if (p.norm == 1u) {
            v[j] *= nw[g * 8u + j];
        }
        let a = abs(v[j]);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    let d = amax / 127.0;
    var id = 0.0;
    if (d > 0.0) {
        id = 1.0 / d;
    }
    let out = (m * groups + g) * 8u;
    var sums = vec2<i32>(0, 0);
    for (var j = 0u; j < 8u; j++) {
        let q = vec4<i32>(round(v[j] * id));
        qs[out + j] = pack4xI8(q);
        let s = q.x + q.y + q.z + q.w;
        if (j < 4u) {
            sums.x += s;
        } else {
            sums.y += s;
        }
    }
    groups_out[m * groups + g] = vec4<f32>(d, d * f32(sums.x), d * f32(sums.y), ss);
}
