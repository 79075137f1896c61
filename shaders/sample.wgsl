// sample.wgsl — temperature + top-k + top-p sampling of rows of logits on the GPU (only the
// chosen id, and the candidates for inspection, come back to the host). With k = 1 it is the
// greedy argmax (lowest index among equal maxima, as llama.cpp; NaN never wins).
//
// Computes: the k largest logits (ties: lower index first), p_i = softmax(logit_i / temperature)
//   over them, the shortest prefix whose probability reaches top_p, and the token at which the
//   running sum of that prefix (renormalised) first reaches `u`, a uniform number in [0, 1) the
//   host draws from its seeded generator — the same rule as the host sampler.
// Layout: row r of x is n f32 logits at offset + r·n; its output is OUT = 1 + 2·K_MAX words at
//   r·OUT: [token, K_MAX candidate ids, K_MAX probabilities (bitcast f32)], best first.
// Work split: one workgroup of 64 per row; k selection rounds, each a strided scan for the best logit
//   below the previous pick plus a shared-memory reduction. k is small (≤ 64), n is the vocabulary.
// Limits: 1 ≤ k ≤ K_MAX = 64.

const K_MAX: u32 = 64u;
const OUT: u32 = 1u + 2u * K_MAX;

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/sample.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;
var<workgroup> cand_v: array<f32, 64>;
var<workgroup> cand_i: array<u32, 64>;

// (v, i) ranks before (w, j): larger value first, then lower index.
fn before(v: f32, i: u32, w: f32, j: u32) -> bool {
    return v > w || (v == w && i < j);
}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let base = p.offset + wid.x * p.n;
    let o = wid.x * OUT;
    var prev_v = 3.4e38;
    var prev_i = 0u;
    for (var r = 0u; r < p.k; r++) {
        var bv = -3.4e38;
        var bi = 0xffffffffu;
        for (var i = lid.x; i < p.n; i += 64u) {
            let v = x[base + i];
            // Only values ranked after the previous pick are still candidates.
            if (before(prev_v, prev_i, v, i) && before(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        best_v[lid.x] = bv;
        best_i[lid.x] = bi;
        for (var s = 32u; s > 0u; s >>= 1u) {
            workgroupBarrier();
            if (lid.x < s && before(best_v[lid.x + s], best_i[lid.x + s], best_v[lid.x], best_i[lid.x])) {
                best_v[lid.x] = best_v[lid.x + s];
                best_i[lid.x] = best_i[lid.x + s];
            }
        }
        workgroupBarrier();
        prev_v = best_v[0];
        prev_i = best_i[0];
        if (lid.x == 0u) {
            cand_v[r] = prev_v;
            cand_i[r] = prev_i;
        }
        workgroupBarrier();
    }
    if (lid.x != 0u) {
        return;
    }
    let top = cand_v[0];
    var sum = 0.0;
    for (var r = 0u; r < p.k; r++) {
        cand_v[r] = exp((cand_v[r] - top) / p.temperature);
        sum += cand_v[r];
    }
    var keep = p.k;
    var acc = 0.0;
    for (var r = 0u; r < p.k; r++) {
        cand_v[r] /= sum;
        acc += cand_v[r];
        if (acc >= p.top_p && keep == p.k) {
            keep = r + 1u;
        }
    }
    var total = 0.0;
    for (var r = 0u; r < keep; r++) {
        total += cand_v[r];
    }
    var left = p.u * total;
    var pick = cand_i[keep - 1u];
    for (var r = 0u; r < keep; r++) {
        left -= cand_v[r];
        if (left <= 0.0) {
            pick = cand_i[r];
            break;
        }
    }
    out[o] = pick;
    for (var r = 0u; r < p.k; r++) {
        out[o + 1u + r] = cand_i[r];
        out[o + 1u + K_MAX + r] = bitcast<u32>(cand_v[r]);
    }
}
