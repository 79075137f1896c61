// rope.wgsl — the gradient through rotary position embedding, in place, for both pair layouts
// (the forward rotation is applied as q and k are stored: kv_store.wgsl).
//
// Computes: for each token t at position pos0 + t, head h and pair i < rot_dim/2, rotates the
//   pair (a, b) of the gradient by −θ and multiplies it by `scale` (rotary.wgsl: the transpose of
//   the forward's scaled rotation, whose transpose is its inverse):
//   a' = scale·(a·cos θ + b·sin θ),  b' = scale·(−a·sin θ + b·cos θ).
//   Dimensions from rot_dim to head_dim are left as they are.
// Layout: row t of n_heads·head_dim f32 at offset + t·stride (floats); factors: rot_dim/2 f32.
// Work split: one invocation per (pair, head) × token.
// Limits: rot_dim even, above 0 and ≤ head_dim.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/rope.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> v: array<f32>;
@group(0) @binding(2) var<storage, read> factors: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half_rot = p.rot_dim / 2u;
    let i = gid.x % half_rot;
    let h = gid.x / half_rot;
    let t = gid.y;
    if (h >= p.n_heads || t >= p.n_tokens) {
        return;
    }
    let ab = p.offset + t * p.stride + h * p.head_dim + rotary_pair(i, p.rot_dim, p.mode);
    var factor = 1.0;
    if (p.factors == 1u) {
        factor = factors[i];
    }
    let cs = rotary_cos_sin(p.pos0 + t, i, p.rot_dim, p.log2_base, factor, p.scale);
    let a = v[ab.x];
    let b = v[ab.y];
    v[ab.x] = a * cs.x + b * cs.y;
    v[ab.y] = b * cs.x - a * cs.y;
}
