// quant_matmul.wgsl — y = W·x for a quantized weight matrix and a batch of f32 activations.
//
// Computes: for m < M, n < N:  y[y_offset + m·y_stride + n_offset + n] (+)= Σ_k W[n, k] · x[m, k]
//   (+ scale_s · Σ_j B_s[n_offset + n, j] · u[m, j] when `lora` is 1 and row m has adapter slot
//   s = row_slot[m] ≥ 0: the multi-LoRA "expand", u from lora_shrink.wgsl),
//   with `+=` when `accumulate` is 1 (fuses the residual add into the projection).
// Layout: W is N rows of K values in a GGUF block format (decoded by dequant.wgsl's `load32`);
//   x is M rows of K f32 at x_offset + m·x_stride (both in vec4 units); y is f32.
// Work split (CPU-friendly family): one invocation owns one output row n and TILE_M batch rows,
//   so each 32-value weight group is decoded once per TILE_M tokens; f32 accumulation, no barriers.
//   Decode uses TILE_M = 1, prefill a larger tile. A matrix split across bindings runs once per part.
// Limits: K a multiple of 32 and of the format's block; N ≤ 65535·WG per part.

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

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.n) {
        return;
    }
    let m0 = gid.y * TILE_M;
    let rows = min(TILE_M, p.m - m0);
    let row_byte = n * p.row_bytes;
    var acc: array<f32, TILE_M>;
    for (var k = 0u; k < p.k; k += 32u) {
        let wv = load32(row_byte, k);
        for (var t = 0u; t < rows; t++) {
            let xi = p.x_offset + (m0 + t) * p.x_stride + (k >> 2u);
            var s = vec4<f32>(0.0);
            for (var j = 0u; j < 8u; j++) {
                s += wv[j] * x[xi + j];
            }
            acc[t] += s.x + s.y + s.z + s.w;
        }
    }
    for (var t = 0u; t < rows; t++) {
        let yi = p.y_offset + (m0 + t) * p.y_stride + p.n_offset + n;
        let v = acc[t] + lora_delta(n, m0 + t);
        if (p.accumulate != 0u) {
            y[yi] += v;
        } else {
            y[yi] = v;
        }
    }
}

// Decode (M = 1): a scalar accumulator and an unrolled group product, which CPU-backed drivers
// keep in registers (an indexed private array becomes per-lane memory traffic there).
@compute @workgroup_size(WG)
fn main_m1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.n) {
        return;
    }
    let row_byte = n * p.row_bytes;
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k += 32u) {
        let wv = load32(row_byte, k);
        let xi = p.x_offset + (k >> 2u);
        acc += wv[0] * x[xi] + wv[1] * x[xi + 1u] + wv[2] * x[xi + 2u] + wv[3] * x[xi + 3u]
             + wv[4] * x[xi + 4u] + wv[5] * x[xi + 5u] + wv[6] * x[xi + 6u] + wv[7] * x[xi + 7u];
    }
    let yi = p.y_offset + p.n_offset + n;
    let r = acc.x + acc.y + acc.z + acc.w + lora_delta(n, 0u);
    if (p.accumulate != 0u) {
        y[yi] += r;
    } else {
        y[yi] = r;
    }
}
