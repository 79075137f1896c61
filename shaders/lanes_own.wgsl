// lanes_own.wgsl — lanes_subgroup.wgsl's functions where the device has no subgroups: lanes
// never walk together, so each loads what it reads itself.
//
// Computes: `lanes_together(x)` = false; `lanes_min(x)` = `lanes_max(x)` = x; `lane_index()` = 0;
//   `lanes_read(v, lane)` = v (never reached: only lanes walking together read each other's).
// Layout: registers only. Limits: none.

fn lanes_together(x: u32) -> bool {
    return false;
}

fn lanes_min(x: u32) -> u32 {
    return x;
}

fn lanes_max(x: u32) -> u32 {
    return x;
}

fn lane_index() -> u32 {
    return 0u;
}

fn lanes_read(v: vec4<f32>, lane: u32) -> vec4<f32> {
    return v;
}
