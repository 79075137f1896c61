// quant_matmul_f32.wgsl — the work of quant_matmul.wgsl's entry points for f32 activations: each
// weight group decoded to f32 (`load32`) and dotted with x as it is read.
//
// Layout: x is M rows of K f32 at x_offset + m·x_stride (both in vec4 units); nw: K f32, the
//   norm's weights. See quant_matmul.wgsl for what is computed, the work splits and the limits.
// `tile` is the CPU family's tile; its entry point `main`, and `x_group` and `nw_group`, which
//   read a 32-value group of the tile's batch rows and of the norm's weights, come from
//   product_x_subgroup.wgsl (lanes share the loads) or product_x_own.wgsl (each invocation
//   loads its own), as the launcher picks.

@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> nw: array<vec4<f32>>;

// The tile of invocation i (output rows i·ROWS..) for batch rows mg·COLS..; `sid` is the
// invocation's subgroup lane, for `x_group`.
fn tile(i: u32, mg: u32, sid: u32) {
    let n0 = i * ROWS;
    let m0 = mg * COLS;
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
        var xv = x_group(xo, k, sid);
        if (p.norm != 0u) {
            let g = nw_group(k, sid);
            for (var j = 0u; j < 8u; j++) {
                for (var t = 0u; t < COLS; t++) {
                    ss[t] += dot(xv[t][j], xv[t][j]);
                    xv[t][j] *= g[j];
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
