// lora.wgsl — the two rank-r halves of multi-LoRA, for a batch whose rows may use different adapters.
//
// Computes, for row t with adapter slot s = row_slot[t] (−1: none — the base weights alone; an
// activated LoRA marks the rows before its invocation −1):
//   shrink: u[t·max_rank + j] = Σ_k A_s[j, k] · x[t, k]   for j < max_rank (0 for j ≥ rank_s or s = −1),
//     of RMSNorm(x[t]) · nw with `norm` = 1 (the norm before the projections, fused as in
//     quant_matmul.wgsl)
//   expand: y[t, n] += scale_s · Σ_j B_s[n, j] · u[t·max_rank + j]   for n < N
// The engine fuses the expand into quant_matmul.wgsl (`lora_delta`), so the base weights are read
// once per pass whatever the mix of adapters; the separate `expand` entry exists to measure that
// fusion against (`agentflux bench --lora`, AGENTFLUX_LORA=separate).
// Layout: x: rows of K f32 at x_offset + t·x_stride (vec4 units); y: rows of N f32 at
//   y_offset + t·y_stride; A_s: rank_s rows of K f32 at a_pack[slots[s].x] (a multiple of 4);
//   B_s: N rows of rank_s f32 at b_pack[slots[s].y]; u: f32 [M, max_rank].
// Work split: one invocation per (j, t) for the shrink, per (n, t) for the expand.
// Limits: K % 4 == 0; at most 8 slots per dispatch.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/lora.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> a_pack: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> row_slot: array<i32>;
@group(0) @binding(4) var<storage, read_write> u: array<f32>;
@group(0) @binding(5) var<storage, read> b_pack: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> nw: array<vec4<f32>>;

fn slot_of(t: u32) -> i32 {
    let s = row_slot[t];
    if (s < 0 || u32(s) >= p.n_slots) {
        return -1;
    }
    return s;
}

@compute @workgroup_size(8, 8)
fn shrink(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let t = gid.y;
    if (j >= p.max_rank || t >= p.m) {
        return;
    }
    let s = slot_of(t);
    var acc = 0.0;
    if (s >= 0 && j < p.slots[s].z) {
        let a = (p.slots[s].x >> 2u) + j * (p.k >> 2u);
        let xo = p.x_offset + t * p.x_stride;
        var v = vec4<f32>(0.0);
        var ss = 0.0;
        for (var k = 0u; k < (p.k >> 2u); k++) {
            var xk = x[xo + k];
            if (p.norm != 0u) {
                ss += dot(xk, xk);
                xk *= nw[k];
            }
            v += a_pack[a + k] * xk;
        }
        acc = v.x + v.y + v.z + v.w;
        if (p.norm != 0u) {
            acc *= inverseSqrt(ss / f32(p.k) + p.eps);
        }
    }
    u[t * p.max_rank + j] = acc;
}

@compute @workgroup_size(64, 1)
fn expand(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    let t = gid.y;
    if (n >= p.n || t >= p.m) {
        return;
    }
    let s = slot_of(t);
    if (s < 0) {
        return;
    }
    let slot = p.slots[s];
    let b = slot.y + n * slot.z;
    var d = 0.0;
    for (var j = 0u; j < slot.z; j++) {
        d += b_pack[b + j] * u[t * p.max_rank + j];
    }
    let yi = p.y_offset + t * p.y_stride + n;
    y[yi] += d * bitcast<f32>(slot.w);
}
