// argmax.wgsl — index of the largest logit of each row (greedy decoding on the GPU: only the
// token id comes back to the host).
//
// Computes: out[r] = argmax_i x[offset + r·n + i], the lowest index among equal maxima (as
//   llama.cpp's greedy sampler); NaN never wins.
// Layout: x is f32 rows of n; out is u32 per row.
// Work split: one workgroup of 64 per row: strided scan per invocation, then a shared-memory
//   reduction (6 barrier steps, once per row).
// Limits: none.

struct Params {
    n: u32,
    offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let base = p.offset + wid.x * p.n;
    var bv = -3.4e38;
    var bi = 0xffffffffu;
    for (var i = lid.x; i < p.n; i += 64u) {
        let v = x[base + i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid.x] = bv;
    best_i[lid.x] = bi;
    for (var s = 32u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid.x < s) {
            let ov = best_v[lid.x + s];
            let oi = best_i[lid.x + s];
            if (ov > best_v[lid.x] || (ov == best_v[lid.x] && oi < best_i[lid.x])) {
                best_v[lid.x] = ov;
                best_i[lid.x] = oi;
            }
        }
    }
    if (lid.x == 0u) {
        out[wid.x] = best_i[0];
    }
}
