// quant_matmul_t.wgsl — dx = dy·W: the gradient through y = W·x for a frozen quantized W.
//
// Computes: for m < M, k < K:  dx[dx_offset + m·dx_stride + k] (+)= Σ_n dy[dy_offset + m·dy_stride
//   + n_offset + n] · W[n, k], over the N rows of this part of W (`accumulate` = 1 adds, so the
//   parts of a matrix split across bindings, and several projections of one input, sum up).
// Layout: W is N rows of K values in a GGUF block format (decoded by dequant.wgsl's `load32`);
//   dy and dx are f32 rows.
// Work split: one invocation per (32-column group, batch row): it walks down the 32-column strip
//   of W, decoding each block once for its row — the transposed walk keeps the decoders'
//   row-major access; f32 accumulation, no barriers.
// Limits: K a multiple of 32 and of the format's block; K/32 ≤ 65535·64.

struct Params {
    n: u32,
    k: u32,
    m: u32,
    row_bytes: u32,
    dy_offset: u32,
    dy_stride: u32,
    dx_offset: u32,
    dx_stride: u32,
    n_offset: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x * 32u;
    let m = gid.y;
    if (k >= p.k || m >= p.m) {
        return;
    }
    var acc: V32;
    let dyo = p.dy_offset + m * p.dy_stride + p.n_offset;
    for (var n = 0u; n < p.n; n++) {
        let g = dy[dyo + n];
        let wv = load32(n * p.row_bytes, k);
        for (var j = 0u; j < 8u; j++) {
            acc[j] += g * wv[j];
        }
    }
    let o = p.dx_offset + m * p.dx_stride + k;
    for (var j = 0u; j < 8u; j++) {
        for (var c = 0u; c < 4u; c++) {
            if (p.accumulate != 0u) {
                dx[o + 4u * j + c] += acc[j][c];
            } else {
                dx[o + 4u * j + c] = acc[j][c];
            }
        }
    }
}
