// quant_matmul.wgsl — y = W·x for a quantized weight matrix and a batch of f32 activations.
//
// Computes: for m < M, n < N:  y[y_offset + m·y_stride + n_offset + n] (+)= Σ_k W[n, k] · x[m, k]
//   (+ scale_s · Σ_j B_s[n_offset + n, j] · u[m, j] when `lora` is 1 and row m has adapter slot
//   s = row_slot[m] ≥ 0: the multi-LoRA "expand", u from lora_shrink.wgsl),
//   with `+=` when `accumulate` is 1 (fuses the residual add into the projection).
// Layout: W is N rows of K values in a GGUF block format (decoded by dequant.wgsl's `load32`);
//   x is M rows of K f32 at x_offset + m·x_stride (both in vec4 units); y is f32.
// Work split (CPU-friendly family): prefill (`main`): one invocation owns 8 output rows × 8 batch
//   rows, so each 32-value weight group is decoded once per 8 tokens and each x load serves 8
//   rows; decode (`main_m1`): 4 output rows of one token, each x load serving the 4. f32
//   accumulation, no barriers. On CPU-backed drivers every storage load whose address differs
//   per invocation is a loop over the SIMD lanes, which is what these tiles amortise.
//   A matrix split across bindings runs once per part.
// Limits: K a multiple of 32 and of the format's block; N ≤ 4·65535·WG per part; M ≤ 8·65535.

struct Params {
    n: u32,
    k: u32,
    m: u32,
    row_bytes: u32,
    x_offset: u32,
    x_stride: u32,
    y_offset: u32,
    y_stride: u32,
    n_offset: u32,
    accumulate: u32,
    lora: u32,
    max_rank: u32,
    n_slots: u32,
    // Per adapter slot: (A offset, B offset in floats, rank, bitcast scale).
    slots: array<vec4<u32>, 8>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> row_slot: array<i32>;
@group(0) @binding(5) var<storage, read> u: array<f32>;
@group(0) @binding(6) var<storage, read> b_pack: array<f32>;

// The LoRA delta of output row `n` for batch row `m` (0 without an adapter).
fn lora_delta(n: u32, m: u32) -> f32 {
    if (p.lora == 0u) {
        return 0.0;
    }
    let s = row_slot[m];
    if (s < 0 || u32(s) >= p.n_slots) {
        return 0.0;
    }
    let slot = p.slots[s];
    let b = slot.y + (p.n_offset + n) * slot.z;
    var d = 0.0;
    for (var j = 0u; j < slot.z; j++) {
        d += b_pack[b + j] * u[m * p.max_rank + j];
    }
    return d * bitcast<f32>(slot.w);
}

// Σ over one 32-value group of the four rows' weights times x[xi..xi+8] (vec4 units): one x
// load serves four rows, which matters on CPU-backed drivers where every storage load whose
// address differs per invocation is a per-lane loop.
fn dot4(w0: V32, w1: V32, w2: V32, w3: V32, xi: u32) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        let xv = x[xi + j];
        s += vec4<f32>(dot(w0[j], xv), dot(w1[j], xv), dot(w2[j], xv), dot(w3[j], xv));
    }
    return s;
}

// Writes the four rows n0.. (those below N) of batch row m.
fn store4(n0: u32, m: u32, v: vec4<f32>) {
    for (var t = 0u; t < 4u; t++) {
        let n = n0 + t;
        if (n < p.n) {
            let yi = p.y_offset + m * p.y_stride + p.n_offset + n;
            let r = v[t] + lora_delta(n, m);
            if (p.accumulate != 0u) {
                y[yi] += r;
            } else {
                y[yi] = r;
            }
        }
    }
}

// Four rows n0.. (clamped to N) times the eight batch rows whose x rows start at `xo` (vec4
// units), over the 32-value group at k: columns 0..3 of the first matrix are batch rows 0..3.
fn rows4(n0: u32, k: u32, xo: array<u32, 8>) -> array<mat4x4<f32>, 2> {
    let last = p.n - 1u;
    let w0 = load32(min(n0, last) * p.row_bytes, k);
    let w1 = load32(min(n0 + 1u, last) * p.row_bytes, k);
    let w2 = load32(min(n0 + 2u, last) * p.row_bytes, k);
    let w3 = load32(min(n0 + 3u, last) * p.row_bytes, k);
    let kv = k >> 2u;
    return array<mat4x4<f32>, 2>(
        mat4x4<f32>(dot4(w0, w1, w2, w3, xo[0] + kv), dot4(w0, w1, w2, w3, xo[1] + kv),
                    dot4(w0, w1, w2, w3, xo[2] + kv), dot4(w0, w1, w2, w3, xo[3] + kv)),
        mat4x4<f32>(dot4(w0, w1, w2, w3, xo[4] + kv), dot4(w0, w1, w2, w3, xo[5] + kv),
                    dot4(w0, w1, w2, w3, xo[6] + kv), dot4(w0, w1, w2, w3, xo[7] + kv)));
}

// Prefill: eight output rows × eight batch rows per invocation, so each weight group is decoded
// once per eight tokens and each x load serves eight rows.
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = gid.x * 8u;
    if (n0 >= p.n) {
        return;
    }
    let m0 = wid.y * 8u;
    var xo: array<u32, 8>;
    for (var t = 0u; t < 8u; t++) {
        xo[t] = p.x_offset + min(m0 + t, p.m - 1u) * p.x_stride;
    }
    var lo = array<mat4x4<f32>, 2>(mat4x4<f32>(), mat4x4<f32>());
    var hi = lo;
    for (var k = 0u; k < p.k; k += 32u) {
        let a = rows4(n0, k, xo);
        let b = rows4(n0 + 4u, k, xo);
        lo[0] += a[0];
        lo[1] += a[1];
        hi[0] += b[0];
        hi[1] += b[1];
    }
    for (var t = 0u; t < 8u; t++) {
        if (m0 + t < p.m) {
            store4(n0, m0 + t, lo[t >> 2u][t & 3u]);
            store4(n0 + 4u, m0 + t, hi[t >> 2u][t & 3u]);
        }
    }
}

// Decode (M = 1): four output rows per invocation.
@compute @workgroup_size(WG)
fn main_m1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * 4u;
    if (n0 >= p.n) {
        return;
    }
    let last = p.n - 1u;
    let r0 = n0 * p.row_bytes;
    let r1 = min(n0 + 1u, last) * p.row_bytes;
    let r2 = min(n0 + 2u, last) * p.row_bytes;
    let r3 = min(n0 + 3u, last) * p.row_bytes;
    var a = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k += 32u) {
        a += dot4(load32(r0, k), load32(r1, k), load32(r2, k), load32(r3, k), p.x_offset + (k >> 2u));
    }
    store4(n0, 0u, a);
}
