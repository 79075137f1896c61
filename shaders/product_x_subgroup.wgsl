// product_x_subgroup.wgsl — the CPU family's f32 product entry point (`main`, running
// quant_matmul_f32.wgsl's `tile`) where each run of 8 subgroup lanes loads the x its tiles share
// once and passes it around by shuffles.
//
// Computes: `x_group(xo, k, sid)`: values k .. k + 31 of each of the tile's COLS batch rows (the
//   row at xo[t], vec4 units) as 8 vec4; `nw_group(k, sid)`: the norm's weights k .. k + 31.
//   Lane l of a run of 8 loads vec4 l of each; every lane of the run then reads vec4 j from lane
//   j. The lanes of a workgroup share their batch rows, so this is the same x for all of them.
// Why: on CPU-backed drivers a storage load costs per lane whatever its address, so lanes loading
//   the same x each pay for it; a shuffle is a register permute there. In decode (one batch
//   row, 8 weight rows a tile) x was about a third of the load cost, with the norm's weights
//   about half.
// Layout: x and nw as quant_matmul_f32.wgsl declares them; registers only.
// Limits: the device's smallest subgroup holds 8 lanes (the launcher checks `subgroup_min_size`);
//   subgroups made of consecutive local invocation indices (as reduce_subgroup.wgsl), WG a
//   multiple of 8. A run of 8 lanes ends early only as a whole (when its first lane's rows are
//   past N), so every source lane of a shuffle is active.

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) sid: u32) {
    if ((gid.x - (sid & 7u)) * ROWS >= p.n) {
        return;
    }
    tile(gid.x, wid.y, sid);
}

// The 8 vec4 the lanes of `sid`'s run of 8 hold, lane j's as vec4 j.
fn share(mine: vec4<f32>, sid: u32) -> V32 {
    var v: V32;
    for (var j = 0u; j < 8u; j++) {
        v[j] = subgroupShuffle(mine, (sid & ~7u) + j);
    }
    return v;
}

fn x_group(xo: array<u32, COLS>, k: u32, sid: u32) -> array<V32, COLS> {
    var mine: array<vec4<f32>, COLS>;
    for (var t = 0u; t < COLS; t++) {
        mine[t] = x[xo[t] + (k >> 2u) + (sid & 7u)];
    }
    var xv: array<V32, COLS>;
    for (var t = 0u; t < COLS; t++) {
        xv[t] = share(mine[t], sid);
    }
    return xv;
}

fn nw_group(k: u32, sid: u32) -> V32 {
    return share(nw[(k >> 2u) + (sid & 7u)], sid);
}
