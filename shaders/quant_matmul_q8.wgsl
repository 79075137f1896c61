// quant_matmul_q8.wgsl — the entry points of quant_matmul.wgsl for 8-bit activations: each weight
// group decoded to integers and an affine map per half (`load32q`, dequant.wgsl), dotted with
// the activations' 8-bit group by packed 4×8-bit dot products (`dot4I8Packed`: one instruction
// where the device has integer dot products, a polyfill elsewhere):
//   Σ_j w_j·x_j = d_x·(d_w[0]·Σ_{j<16} q_j·p_j + d_w[1]·Σ_{j≥16} q_j·p_j) + m_w[0]·s_0 + m_w[1]·s_1
//   with x_j = d_x·p_j and s_h = d_x·Σ p_j over half h (quantize_q8.wgsl's meta).
// Layout: xq: M rows of K/4 words of packed i8, xmeta: M rows of K/32 vec4 (d, s_0, s_1, Σx²),
//   both dense from row 0. See quant_matmul.wgsl for what is computed, the work splits and the
//   limits.

@group(0) @binding(2) var<storage, read> xq: array<u32>;
@group(0) @binding(8) var<storage, read> xmeta: array<vec4<f32>>;

alias X8 = array<u32, 8>;

// One group's dot product of weights `wq` with 8-bit activations `a` whose meta is `am`.
fn dot_q8(wq: Q32, a: X8, am: vec4<f32>) -> f32 {
    var lo = 0;
    var hi = 0;
    for (var j = 0u; j < 4u; j++) {
        lo += dot4I8Packed(wq.q[j], a[j]);
        hi += dot4I8Packed(wq.q[j + 4u], a[j + 4u]);
    }
    return am.x * (wq.d.x * f32(lo) + wq.d.y * f32(hi)) + wq.m.x * am.y + wq.m.y * am.z;
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = gid.x * ROWS;
    if (n0 >= p.n) {
        return;
    }
    let m0 = wid.y * COLS;
    let groups = p.k / 32u;
    // Rows and batch rows past the end repeat the last one; their results are not stored.
    var rb: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        rb[r] = min(n0 + r, p.n - 1u) * p.row_bytes;
    }
    var xg: array<u32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        xg[t] = min(m0 + t, p.m - 1u) * groups;
    }
    var acc: array<f32, ROWS * COLS>;
    var acc_up: array<f32, ROWS * COLS>;
    var ss: array<f32, COLS>;
    for (var g = 0u; g < groups; g++) {
        var a: array<X8, COLS>;
        var am: array<vec4<f32>, COLS>;
        for (var t = 0u; t < COLS; t++) {
            for (var j = 0u; j < 8u; j++) {
                a[t][j] = xq[(xg[t] + g) * 8u + j];
            }
            am[t] = xmeta[xg[t] + g];
            ss[t] += am[t].w;
        }
        for (var r = 0u; r < ROWS; r++) {
            let wr = load32q(rb[r], g * 32u);
            for (var t = 0u; t < COLS; t++) {
                acc[r * COLS + t] += dot_q8(wr, a[t], am[t]);
            }
            if (GLU == 1u) {
                let wu = load32q(rb[r] + p.pair_offset, g * 32u);
                for (var t = 0u; t < COLS; t++) {
                    acc_up[r * COLS + t] += dot_q8(wu, a[t], am[t]);
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
    let groups = p.k / 32u;
    // No early return: every lane must reach the reduction. Rows and batch rows past the end
    // repeat the last one; their results are not stored.
    let rb = min(n, p.n - 1u) * p.row_bytes;
    var xg: array<u32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        xg[t] = min(m0 + t, p.m - 1u) * groups;
    }
    var acc: array<f32, COLS>;
    var acc_up: array<f32, COLS>;
    var ss: array<f32, COLS>;
    for (var g = lane; g < groups; g += LANES) {
        let wr = load32q(rb, g * 32u);
        var wu: Q32;
        if (GLU == 1u) {
            wu = load32q(rb + p.pair_offset, g * 32u);
        }
        for (var t = 0u; t < COLS; t++) {
            var a: X8;
            for (var j = 0u; j < 8u; j++) {
                a[j] = xq[(xg[t] + g) * 8u + j];
            }
            let am = xmeta[xg[t] + g];
            ss[t] += am.w;
            acc[t] += dot_q8(wr, a, am);
            if (GLU == 1u) {
                acc_up[t] += dot_q8(wu, a, am);
            }
        }
    }
    store_lanes(n, m0, li, acc, acc_up, ss);
}
