// product_x_own.wgsl — the CPU family's f32 product entry point (`main`, running
// quant_matmul_f32.wgsl's `tile`) where each invocation loads the x it reads itself: for devices
// without subgroups of 8 lanes.
//
// Computes: `x_group(xo, k, _)`: values k .. k + 31 of each of the tile's COLS batch rows (the
//   row at xo[t], vec4 units) as 8 vec4; `nw_group(k, _)`: the norm's weights k .. k + 31.
// Layout: x and nw as quant_matmul_f32.wgsl declares them. Limits: none beyond the tile's.

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    if (gid.x * ROWS >= p.n) {
        return;
    }
    tile(gid.x, wid.y, 0u);
}

fn x_group(xo: array<u32, COLS>, k: u32, sid: u32) -> array<V32, COLS> {
    var xv: array<V32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        for (var j = 0u; j < 8u; j++) {
            xv[t][j] = x[xo[t] + (k >> 2u) + j];
        }
    }
    return xv;
}

fn nw_group(k: u32, sid: u32) -> V32 {
    var g: V32;
    for (var j = 0u; j < 8u; j++) {
        g[j] = nw[(k >> 2u) + j];
    }
    return g;
}
