// lanes_subgroup.wgsl — lanes of a subgroup that walk the same rows of a buffer together and
// share what they load (attention.wgsl): on CPU-backed drivers a storage load costs per lane
// whatever its address, while reading another lane's register is a permute.
//
// Computes: `lanes_together(x)`: whether x is the same on every lane of the subgroup;
//   `lanes_min(x)`, `lanes_max(x)`: over the subgroup's lanes; `lane_index()`: this lane's index
//   in its subgroup; `lanes_read(v, lane)`: v of lane `lane` of the subgroup.
// Layout: registers only. Needs the device's subgroup feature (naga takes the builtins without
//   an `enable subgroups;` directive).
// Limits: called in uniform control flow with every lane of the subgroup active (lane_index
//   counts the active lanes before this one); the callers read what lanes 0..7 loaded, so the
//   launcher takes this file only where subgroups hold at least 8 (`subgroups_hold(8)`).

fn lanes_together(x: u32) -> bool {
    return subgroupAll(x == subgroupBroadcastFirst(x));
}

fn lanes_min(x: u32) -> u32 {
    return subgroupMin(x);
}

fn lanes_max(x: u32) -> u32 {
    return subgroupMax(x);
}

fn lane_index() -> u32 {
    return subgroupExclusiveAdd(1u);
}

fn lanes_read(v: vec4<f32>, lane: u32) -> vec4<f32> {
    return subgroupShuffle(v, lane);
}
