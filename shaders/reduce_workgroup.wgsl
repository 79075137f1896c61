// reduce_workgroup.wgsl — `reduce_lanes` through workgroup memory, for the cooperative kernels on
// devices without subgroup operations (or with subgroups smaller than LANES).
//
// Computes: for each of COLS values, the sum over the LANES invocations that share a row (local
//   invocation indices r·LANES .. r·LANES + LANES − 1); the row's first lane gets the total.
// Layout: WG × COLS f32 of workgroup memory, two barriers per call.
// Limits: called in uniform control flow.

var<workgroup> partials: array<f32, WG * COLS>;

fn reduce_lanes(v: array<f32, COLS>, li: u32) -> array<f32, COLS> {
    // A kernel may reduce twice: the first call's readers must be done with `partials`.
    workgroupBarrier();
    for (var t = 0u; t < COLS; t++) {
        partials[li * COLS + t] = v[t];
    }
    workgroupBarrier();
    var s: array<f32, COLS>;
    if (li % LANES == 0u) {
        for (var l = 0u; l < LANES; l++) {
            for (var t = 0u; t < COLS; t++) {
                s[t] += partials[(li + l) * COLS + t];
            }
        }
    }
    return s;
}
