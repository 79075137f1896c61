// quant_matmul_f32.wgsl — the entry points of quant_matmul.wgsl for f32 activations: each
// weight group decoded to f32 (`load32`) and dotted with x as it is read.
//
// Layout: x is M rows of K f32 at x_offset + m·x_stride (both in vec4 units); nw: K f32, the
//   norm's weights. See quant_matmul.wgsl for what is computed, the work splits and the limits.

@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> nw: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = gid.x * ROWS;
    if (n0 >= p.n) {
        return;
    }
    let m0 = wid.y * COLS;
    // Rows and batch rows past the end repeat the last one; their results are not stored.
    var rb: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        rb[r] = min(n0 + r, p.n - 1u) * p.row_bytes;
    }
    var xo: array<u32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        xo[t] = p.x_offset + min(m0 + t, p.m - 1u) * p.x_stride;
    }
    var acc: array<f32, ROWS * COLS>;
    var acc_up: array<f32, ROWS * COLS>;
    var ss: array<f32, COLS>;
    for (var k = 0u; k < p.k; k += 32u) {
        var xv: array<V32, COLS>;
        for (var t = 0u; t < COLS; t++) {
            for (var j = 0u; j < 8u; j++) {
                xv[t][j] = x[xo[t] + (k >> 2u) + j];
            }
        }
        if (p.norm != 0u) {
            for (var j = 0u; j < 8u; j++) {
                let g = nw[(k >> 2u) + j];
                for (var t = 0u; t < COLS; t++) {
                    ss[t] += dot(xv[t][j], xv[t][j]);
                    xv[t][j] *= g;
                }
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            let wr = load32(rb[r], k);
            for (var t = 0u; t < COLS; t++) {
                var s = 0.0;
                for (var j = 0u; j < 8u; j++) {
                    s += dot(wr[j], xv[t][j]);
                }
                acc[r * COLS + t] += s;
            }
            if (GLU == 1u) {
                let wu = load32(rb[r] + p.pair_offset, k);
                for (var t = 0u; t < COLS; t++) {
                    var s = 0.0;
                    for (var j = 0u; j < 8u; j++) {
                        s += dot(wu[j], xv[t][j]);
                    }
                    acc_up[r * COLS + t] += s;
                }
            }
        }
    }
    store_tile(n0, m0, acc, acc_up, ss);
}

@compute @workgroup_size(WG)
fn cooperative(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = li % LANES;
    let n = wid.x * (WG / LANES) + li / LANES;
    let m0 = wid.y * COLS;
    // No early return: every lane must reach the reduction. Rows and batch rows past the end
    // repeat the last one; their results are not stored.
    let rb = min(n, p.n - 1u) * p.row_bytes;
    var xo: array<u32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        xo[t] = p.x_offset + min(m0 + t, p.m - 1u) * p.x_stride;
    }
    var acc: array<f32, COLS>;
    var acc_up: array<f32, COLS>;
    var ss: array<f32, COLS>;
    for (var k = lane * 32u; k < p.k; k += LANES * 32u) {
        let wr = load32(rb, k);
        var wu: V32;
        if (GLU == 1u) {
            wu = load32(rb + p.pair_offset, k);
        }
        for (var t = 0u; t < COLS; t++) {
            var s = 0.0;
            var s_up = 0.0;
            for (var j = 0u; j < 8u; j++) {
                var xj = x[xo[t] + (k >> 2u) + j];
                if (p.norm != 0u) {
                    ss[t] += dot(xj, xj);
                    xj *= nw[(k >> 2u) + j];
                }
                s += dot(wr[j], xj);
                if (GLU == 1u) {
                    s_up += dot(wu[j], xj);
                }
            }
            acc[t] += s;
            acc_up[t] += s_up;
        }
    }
    store_lanes(n, m0, li, acc, acc_up, ss);
}
