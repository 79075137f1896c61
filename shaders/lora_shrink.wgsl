// lora_shrink.wgsl — the rank-r "shrink" of multi-LoRA: u[t] = A_{slot(t)} · x[t] for each row t.
//
// Computes: for row t with adapter slot s = row_slot[t] ≥ 0 and j < rank_s:
//   u[t·max_rank + j] = Σ_k A_s[j, k] · x[t, k]; u is 0 for j ≥ rank_s and for rows with s = −1
//   (no adapter: the base weights alone; activated LoRA marks rows before its invocation −1).
// Layout: x: rows of K f32 at x_offset + t·x_stride (vec4 units); A_s: rank_s rows of K f32 at
//   a_pack[slots[s].x] (floats, a multiple of 4); u: f32 [M, max_rank].
// The matching "expand" (y += scale_s · B_s · u[t]) runs inside quant_matmul.wgsl, so the base
//   weights are read once per pass whatever the mix of adapters in the batch.
// Work split: one invocation per (j, t). Limits: K % 4 == 0; at most 8 slots per dispatch.

struct Params {
    m: u32,
    k: u32,
    x_offset: u32,
    x_stride: u32,
    max_rank: u32,
    n_slots: u32,
    slots: array<vec4<u32>, 8>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> a_pack: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> row_slot: array<i32>;
@group(0) @binding(4) var<storage, read_write> u: array<f32>;

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let t = gid.y;
    if (j >= p.max_rank || t >= p.m) {
        return;
    }
    let s = row_slot[t];
    var acc = 0.0;
    if (s >= 0 && u32(s) < p.n_slots && j < p.slots[s].z) {
        let a = (p.slots[s].x >> 2u) + j * (p.k >> 2u);
        let xo = p.x_offset + t * p.x_stride;
        var v = vec4<f32>(0.0);
        for (var k = 0u; k < (p.k >> 2u); k++) {
            v += a_pack[a + k] * x[xo + k];
        }
        acc = v.x + v.y + v.z + v.w;
    }
    u[t * p.max_rank + j] = acc;
}
