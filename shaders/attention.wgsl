// attention.wgsl — causal multi-head attention over preallocated KV caches (prefill and decode),
// the rows of several sequences in one dispatch.
//
// Computes: for query row t, at its place (base, pos, pos0, index) = places[at + t] (its
//   sequence's cache slot starts at row base, the row sits at position pos, its sequence held
//   pos0 positions before the pass and the row is its index-th new row), and head h (KV head
//   h / (n_heads / n_kv_heads)):
//   o[t, h] = Σ_j softmax_j(scale · q[t, h] · k[base + j]) · v[base + j]   over positions j ≤ pos,
//   and, when window > 0 (sliding-window layers), only j > pos − window.
//   With `tree` = 1 the rows form a token tree (candidate continuations scored in one pass; one
//   sequence, its rows the dispatch's): row t (pos = pos0 + its depth) attends to the cached
//   positions j < pos0 and to the cache rows base + pos0 + s for s = index and each ancestor of it
//   (parent[s] ≥ 0), instead of every row before it.
// Layout: q, o: rows of n_heads·head_dim f32 (vec4 units) at q_offset + t·q_stride;
//   k, v: the layer's caches, row base + j = position j of a slot, n_kv_heads·head_dim f16 per
//   row, two per u32 word (kv_store.wgsl writes them; a vec2<u32> holds 4 values, so cache
//   indices count in the same vec4 units as q and o); places: vec4<u32> per row (see
//   src/kernels/places.rs); tree: per row (parent index or −1, depth), a parent before its child.
// Work split: an invocation serves G consecutive query heads (a head group) that share one KV
//   head (G divides n_heads / n_kv_heads; the launcher takes 1 where `main` serves one sequence
//   whose lanes share their loads already, as more heads only spill), so each key and value row
//   is loaded once for all of them, with an online softmax per head (one pass over the keys, running max and sum, f32
//   accumulators in registers) that takes the keys B at a time: one rescale of the sums, and one
//   exp for it, per block of keys rather than per key.
//   `main` (prefill chunks, token trees): one invocation per (token, head group), a workgroup
//     holding 64 neighbouring tokens of one head group. Where the lanes of a subgroup hold rows
//     of one sequence they walk its keys together, from the first any of them sees to the last,
//     each counting only its own; each lane loads an eighth of every key and value row (vec4
//     lane % 8, + 8, …) and reads the rest from lanes 0..7 (lanes_subgroup.wgsl, placed before
//     this file; without subgroups lanes_own.wgsl, and each lane loads its own rows).
//   `decode` (no tree; decode steps, and where lanes cannot walk together a training step's
//   rows and short chunks too; the launcher chooses): one workgroup of SPLIT invocations per
//   (head group, row); invocation i folds keys i, i + SPLIT, … into its own running softmaxes,
//   then the SPLIT partial softmaxes are merged through workgroup memory — every SIMD lane and
//   every workgroup thread has keys to read even with few heads.
// Specialised on D4 = head_dim / 4, G, B and SPLIT (launcher constants), so the loops over them
//   unroll and the per-head arrays stay in registers.
// Limits: head_dim % 4 == 0, head_dim ≤ 256; n_tokens ≤ 65535 · 64 (decode: n_tokens ≤ 65535);
//   SPLIT · G · (head_dim + 2) · 4 bytes of workgroup memory; subgroups (where used) made of
//   consecutive local invocation indices, at least 8 lanes, as reduce_subgroup.wgsl.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/attention.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> kc: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> vc: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> places: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> tree: array<vec2<i32>>;

// vec4 of a cached row each lane loads when the lanes fold rows together (lane % 8, + 8, …).
const PARTS = (D4 + 7u) / 8u;

var<private> qv: array<array<vec4<f32>, D4>, G>;
var<private> acc: array<array<vec4<f32>, D4>, G>;
var<private> mx: array<f32, G>;
var<private> l: array<f32, G>;

// Four cached f16 values as f32.
fn half4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

// The KV head of head group `hg`.
fn kv_head(hg: u32) -> u32 {
    return hg * G / (p.n_heads / p.n_kv_heads);
}

// Load the G queries of head group `hg` from row offset `qo` (vec4 units); reset the softmaxes.
fn begin(qo: u32, hg: u32) {
    for (var g = 0u; g < G; g++) {
        for (var d = 0u; d < D4; d++) {
            qv[g][d] = q[qo + (hg * G + g) * D4 + d];
            acc[g][d] = vec4<f32>(0.0);
        }
        mx[g] = -3.0e38;
        l[g] = 0.0;
    }
}

// Fold the B key/value rows at ko into the G running softmaxes: one rescale of the sums per
// block of keys rather than per key. Rows with live[b] false count for nothing (ko[b] must still
// be a row of the cache: it is read). With `together` (the same on every lane: its subgroup's
// lanes fold the same rows) lane `lane` loads vec4 lane % 8, + 8, … of each row, and vec4 d of
// a row is read from lane d % 8 of the subgroup (lanes_*.wgsl): on CPU-backed drivers a load
// costs per lane, a read from another lane is a register permute.
fn attend(ko: array<u32, B>, live: array<bool, B>, together: bool, lane: u32) {
    var kp: array<array<vec4<f32>, PARTS>, B>;
    var vp: array<array<vec4<f32>, PARTS>, B>;
    if (together) {
        for (var b = 0u; b < B; b++) {
            for (var i = 0u; i < PARTS; i++) {
                let d = min((lane & 7u) + 8u * i, D4 - 1u);
                kp[b][i] = half4(kc[ko[b] + d]);
                vp[b][i] = half4(vc[ko[b] + d]);
            }
        }
    }
    var sc: array<array<f32, G>, B>;
    for (var b = 0u; b < B; b++) {
        for (var d = 0u; d < D4; d++) {
            var k: vec4<f32>;
            if (together) {
                k = lanes_read(kp[b][d / 8u], d % 8u);
            } else {
                k = half4(kc[ko[b] + d]);
            }
            for (var g = 0u; g < G; g++) {
                sc[b][g] += dot(qv[g][d], k);
            }
        }
    }
    var c: array<f32, G>;
    var e: array<array<f32, G>, B>;
    for (var g = 0u; g < G; g++) {
        var m_new = mx[g];
        for (var b = 0u; b < B; b++) {
            sc[b][g] *= p.scale;
            m_new = select(m_new, max(m_new, sc[b][g]), live[b]);
        }
        c[g] = exp(mx[g] - m_new);
        var sum = l[g] * c[g];
        for (var b = 0u; b < B; b++) {
            e[b][g] = select(0.0, exp(sc[b][g] - m_new), live[b]);
            sum += e[b][g];
        }
        l[g] = sum;
        mx[g] = m_new;
    }
    for (var d = 0u; d < D4; d++) {
        var v: array<vec4<f32>, B>;
        for (var b = 0u; b < B; b++) {
            if (together) {
                v[b] = lanes_read(vp[b][d / 8u], d % 8u);
            } else {
                v[b] = half4(vc[ko[b] + d]);
            }
        }
        for (var g = 0u; g < G; g++) {
            var a = acc[g][d] * c[g];
            for (var b = 0u; b < B; b++) {
                a += e[b][g] * v[b];
            }
            acc[g][d] = a;
        }
    }
}

// Fold positions lo, lo + step, … below hi of the sequence whose position 0 is cache row base
// (KV head kvh), B at a time; each lane counts only those in first .. end − 1 (its own rows'
// bounds, within lo .. hi). With base, lo and hi the same on every lane, every lane reads the
// same cache rows at the same time.
fn attend_keys(base: u32, kvh: u32, lo: u32, hi: u32, step: u32, first: u32, end: u32, together: bool, lane: u32) {
    let row4 = p.n_kv_heads * D4;
    for (var j = lo; j < hi; j += B * step) {
        var ko: array<u32, B>;
        var live: array<bool, B>;
        for (var b = 0u; b < B; b++) {
            let jb = j + b * step;
            let inside = jb < hi;
            ko[b] = (base + select(j, jb, inside)) * row4 + kvh * D4;
            live[b] = inside && jb >= first && jb < end;
        }
        attend(ko, live, together, lane);
    }
}

// Invocation t serves query row t of head group wid.y: the lanes of a subgroup hold neighbouring
// rows of one head group, so where they belong to one sequence they walk its cache rows
// together (lanes_*.wgsl), each counting the keys its own row sees.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let hg = wid.y;
    let t = gid.x;
    // No early return: every lane takes part in lanes_*. Rows past the end repeat the last
    // one, count no keys and are not stored.
    let valid = t < p.n_tokens;
    let row = min(t, p.n_tokens - 1u);
    let kvh = kv_head(hg);
    let row4 = p.n_kv_heads * D4;
    let place = places[p.at + row];
    let base = place.x;
    let pos = place.y;
    let pos0 = place.z;
    var start = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        start = pos + 1u - p.window;
    }
    begin((p.q_offset + row * p.q_stride) / 4u, hg);
    // The keys every row walks: its whole causal range, or with a tree the cache before it.
    let end = select(0u, select(pos + 1u, pos0, p.tree != 0u), valid);
    let lane = lane_index();
    if (lanes_together(base)) {
        attend_keys(base, kvh, lanes_min(select(0xffffffffu, start, valid)), lanes_max(end), 1u, start, end, true, lane);
    } else {
        attend_keys(base, kvh, start, end, 1u, start, end, false, lane);
    }
    if (p.tree != 0u && valid) {
        // The row itself and its ancestors, nearest first (the sum does not depend on order).
        let first = t - place.w;
        var s = i32(place.w);
        while (s >= 0) {
            if (pos0 + u32(tree[first + u32(s)].y) >= start) {
                var ko: array<u32, B>;
                var live: array<bool, B>;
                ko[0] = (base + pos0 + u32(s)) * row4 + kvh * D4;
                live[0] = true;
                attend(ko, live, false, lane);
            }
            // A parent comes before its child; a link that does not ends the walk, so it ends
            // whatever the buffer holds.
            s = min(tree[first + u32(s)].x, s - 1);
        }
    }
    if (valid) {
        let oo = (p.o_offset + t * p.o_stride) / 4u + hg * G * D4;
        for (var g = 0u; g < G; g++) {
            for (var d = 0u; d < D4; d++) {
                o[oo + g * D4 + d] = acc[g][d] / l[g];
            }
        }
    }
}

var<workgroup> part_ml: array<array<vec2<f32>, G>, SPLIT>;
var<workgroup> part_acc: array<array<array<vec4<f32>, D4>, G>, SPLIT>;

@compute @workgroup_size(SPLIT)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    let hg = wid.x;
    let t = wid.y;
    let kvh = kv_head(hg);
    let place = places[p.at + t];
    let base = place.x;
    let pos = place.y;
    var start = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        start = pos + 1u - p.window;
    }
    begin((p.q_offset + t * p.q_stride) / 4u, hg);
    attend_keys(base, kvh, start + i, pos + 1u, SPLIT, start, pos + 1u, false, 0u);
    for (var g = 0u; g < G; g++) {
        part_ml[i][g] = vec2<f32>(mx[g], l[g]);
        for (var d = 0u; d < D4; d++) {
            part_acc[i][g][d] = acc[g][d];
        }
    }
    workgroupBarrier();
    // A part without keys has l = 0 and a max of −3e38: its weight below is 0.
    let oo = (p.o_offset + t * p.o_stride) / 4u + hg * G * D4;
    for (var g = 0u; g < G; g++) {
        var m = -3.0e38;
        for (var s = 0u; s < SPLIT; s++) {
            m = max(m, part_ml[s][g].x);
        }
        var total = 0.0;
        for (var s = 0u; s < SPLIT; s++) {
            total += part_ml[s][g].y * exp(part_ml[s][g].x - m);
        }
        for (var d = i; d < D4; d += SPLIT) {
            var a = vec4<f32>(0.0);
            for (var s = 0u; s < SPLIT; s++) {
                a += part_acc[s][g][d] * exp(part_ml[s][g].x - m);
            }
            o[oo + g * D4 + d] = a / total;
        }
    }
}
