// reduce_subgroup.wgsl — `reduce_lanes` with subgroup shuffles, for the cooperative kernels.
//
// Computes: for each of COLS values, the sum over the LANES invocations that share a row (local
//   invocation indices r·LANES .. r·LANES + LANES − 1); every lane of the row gets the total.
// Layout: registers only. Needs the device's subgroup feature (wgpu's naga takes the builtins
//   without an `enable subgroups;` directive, which it does not parse yet).
// Limits: LANES a power of two no larger than the device's smallest subgroup (the launcher checks
//   `subgroup_min_size`), and subgroups made of consecutive local invocation indices, as
//   Vulkan, Metal and D3D12 drivers lay out compute workgroups. Called in uniform control flow.

fn reduce_lanes(v: array<f32, COLS>, li: u32) -> array<f32, COLS> {
    var s = v;
    for (var o = LANES / 2u; o > 0u; o >>= 1u) {
        for (var t = 0u; t < COLS; t++) {
            s[t] += subgroupShuffleXor(s[t], o);
        }
    }
    return s;
}
