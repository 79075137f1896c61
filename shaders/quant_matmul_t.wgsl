// quant_matmul_t.wgsl — dx = dy·W: the gradient through y = W·x for a frozen quantized W.
//
// Computes: for m < M, k < K:  dx[dx_offset + m·dx_stride + k] (+)= Σ_n dy[dy_offset + m·dy_stride
//   + n_offset + n] · W[n, k], over the N rows of this part of W (`accumulate` = 1 adds, so the
//   parts of a matrix split across bindings, and several projections of one input, sum up).
// Layout: W is N rows of K values in a GGUF block format (decoded by dequant.wgsl's `load32`);
//   dy and dx are f32 rows.
// Work split: one invocation per (32-column group, COLS batch rows): it walks down the 32-column
//   strip of W, decoding each block once for all COLS rows — the transposed walk keeps the
//   decoders' row-major access; the pairs numbered in one dimension, so a CPU-backed device's
//   vectors are full whatever K; small workgroups (WG) so a 576-column strip set still spreads
//   over its threads; f32 accumulation, no barriers.
// Limits: K a multiple of 32 and of the format's block; (K/32)·⌈M/COLS⌉ ≤ 65535·WG.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/matmul_t.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    // One run of (column group, batch-row group) pairs, column groups first: a 576-column
    // matrix has 18 groups, which alone would leave 6 of every 24 lanes without work.
    let strips = p.k / 32u;
    if (gid.x >= strips * ((p.m + COLS - 1u) / COLS)) {
        return;
    }
    let k = (gid.x % strips) * 32u;
    let m0 = (gid.x / strips) * COLS;
    // Batch rows past the end repeat the last one; their results are not stored.
    var dyo: array<u32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        dyo[t] = p.dy_offset + min(m0 + t, p.m - 1u) * p.dy_stride + p.n_offset;
    }
    var acc: array<V32, COLS>;
    for (var n = 0u; n < p.n; n++) {
        let wv = load32(n * p.row_bytes, k);
        for (var t = 0u; t < COLS; t++) {
            let g = dy[dyo[t] + n];
            for (var j = 0u; j < 8u; j++) {
                acc[t][j] += g * wv[j];
            }
        }
    }
    for (var t = 0u; t < COLS; t++) {
        if (m0 + t >= p.m) {
            break;
        }
        let o = p.dx_offset + (m0 + t) * p.dx_stride + k;
        for (var j = 0u; j < 8u; j++) {
            for (var c = 0u; c < 4u; c++) {
                if (p.accumulate != 0u) {
                    dx[o + 4u * j + c] += acc[t][j][c];
                } else {
                    dx[o + 4u * j + c] = acc[t][j][c];
                }
            }
        }
    }
}
