// rope.wgsl — rotary position embedding, in place, for both pair layouts.
//
// Computes: for each token t at position pos (pos0 + t, or with `table` = 1 the row's own entry
//   places[at + t].y: rows of several sequences, a token tree's rows at their depths), head h and
//   pair i < rot_dim/2, rotates the pair (a, b) by θ = pos · base^(−2i/rot_dim) (divided by
//   factors[i] when `factors` = 1: Llama 3.1's and LongRoPE's per-pair frequency factors) and
//   multiplies it by `scale` (LongRoPE's attention factor; 1 elsewhere):
//   a' = scale·(a·cos θ − b·sin θ),  b' = scale·(a·sin θ + b·cos θ).
//   mode 0 ("normal", llama): the pair is (2i, 2i+1);  mode 1 ("neox", qwen2/3, gemma3): (i, i + rot_dim/2).
//   Dimensions from rot_dim to head_dim are left as they are. With `inverse` = 1 the
//   pairs are rotated by −θ (and scaled): the gradient through the rotation, whose transpose is
//   its inverse.
// Layout: row t of n_heads·head_dim f32 at offset + t·stride (floats); places: per row of the
//   pass (base, pos, pos0, index), see src/kernels/places.rs; factors: rot_dim/2 f32.
// Work split: one invocation per (pair, head) × token.
// Limits: rot_dim even and ≤ head_dim.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/rope.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> v: array<f32>;
@group(0) @binding(2) var<storage, read> places: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> factors: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half_rot = p.rot_dim / 2u;
    let i = gid.x % half_rot;
    let h = gid.x / half_rot;
    let t = gid.y;
    if (h >= p.n_heads || t >= p.n_tokens) {
        return;
    }
    let base = p.offset + t * p.stride + h * p.head_dim;
    var ia = base + 2u * i;
    var ib = ia + 1u;
    if (p.mode == 1u) {
        ia = base + i;
        ib = ia + half_rot;
    }
    var pos = p.pos0 + t;
    if (p.table == 1u) {
        pos = places[p.at + t].y;
    }
    var freq = exp2(-p.log2_base * f32(2u * i) / f32(p.rot_dim));
    if (p.factors == 1u) {
        freq = freq / factors[i];
    }
    let theta = f32(pos) * freq;
    let c = p.scale * cos(theta);
    var s = p.scale * sin(theta);
    if (p.inverse == 1u) {
        s = -s;
    }
    let a = v[ia];
    let b = v[ib];
    v[ia] = a * c - b * s;
    v[ib] = a * s + b * c;
}
