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
//   src/kernels/places.rs); tree: per row (parent index or −1, depth).
// Work split: an invocation serves G consecutive query heads (a head group) that share one KV
//   head (G divides n_heads / n_kv_heads), so each key and value row is loaded once for all of
//   them, with an online softmax per head (one pass over the keys, running max and sum, f32
//   accumulators in registers).
//   `main` (prefill chunks, token trees): one invocation per (head group, token), 64 per workgroup.
//   `decode` (few rows, no tree: decode steps, a training step's rows, short chunks; the launcher
//   chooses): one workgroup of SPLIT invocations per (head group, row); invocation i
//   folds keys i, i + SPLIT, … into its own running softmaxes, then the SPLIT partial softmaxes
//   are merged through workgroup memory — every SIMD lane and every workgroup thread has keys
//   to read even with few heads.
// Specialised on D4 = head_dim / 4, G and SPLIT (launcher constants), so the loops over them
//   unroll and the per-head arrays stay in registers.
// Limits: head_dim % 4 == 0, head_dim ≤ 256; n_tokens · n_heads / G ≤ 65535 · 64 (decode:
//   n_tokens ≤ 65535); SPLIT · G · (head_dim + 2) · 4 bytes of workgroup memory.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/attention.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> kc: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> vc: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> places: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> tree: array<vec2<i32>>;

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

// Fold key/value row j (at ko) into the G running softmaxes.
fn attend(ko: u32) {
    var sc: array<f32, G>;
    for (var d = 0u; d < D4; d++) {
        let k = half4(kc[ko + d]);
        for (var g = 0u; g < G; g++) {
            sc[g] += dot(qv[g][d], k);
        }
    }
    var c: array<f32, G>;
    var e: array<f32, G>;
    for (var g = 0u; g < G; g++) {
        let s = sc[g] * p.scale;
        let m_new = max(mx[g], s);
        c[g] = exp(mx[g] - m_new);
        e[g] = exp(s - m_new);
        l[g] = l[g] * c[g] + e[g];
        mx[g] = m_new;
    }
    for (var d = 0u; d < D4; d++) {
        let v = half4(vc[ko + d]);
        for (var g = 0u; g < G; g++) {
            acc[g][d] = acc[g][d] * c[g] + e[g] * v;
        }
    }
}

// Invocation i serves head group i % groups of token i / groups: all SIMD lanes are busy even
// with few head groups.
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let groups = p.n_heads / G;
    let hg = gid.x % groups;
    let t = gid.x / groups;
    if (t >= p.n_tokens) {
        return;
    }
    let kvh = kv_head(hg);
    let row4 = p.n_kv_heads * D4;
    let place = places[p.at + t];
    let base = place.x;
    let pos = place.y;
    let pos0 = place.z;
    var start = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        start = pos + 1u - p.window;
    }
    begin((p.q_offset + t * p.q_stride) / 4u, hg);
    if (p.tree == 0u) {
        for (var j = start; j <= pos; j++) {
            attend((base + j) * row4 + kvh * D4);
        }
    } else {
        for (var j = start; j < pos0; j++) {
            attend((base + j) * row4 + kvh * D4);
        }
        // The row itself and its ancestors, nearest first (the sum does not depend on order).
        let first = t - place.w;
        var s = i32(place.w);
        while (s >= 0) {
            if (pos0 + u32(tree[first + u32(s)].y) >= start) {
                attend((base + pos0 + u32(s)) * row4 + kvh * D4);
            }
            s = tree[first + u32(s)].x;
        }
    }
    let oo = (p.o_offset + t * p.o_stride) / 4u + hg * G * D4;
    for (var g = 0u; g < G; g++) {
        for (var d = 0u; d < D4; d++) {
            o[oo + g * D4 + d] = acc[g][d] / l[g];
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
    let row4 = p.n_kv_heads * D4;
    let place = places[p.at + t];
    let base = place.x;
    let pos = place.y;
    var start = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        start = pos + 1u - p.window;
    }
    begin((p.q_offset + t * p.q_stride) / 4u, hg);
    for (var j = start + i; j <= pos; j += SPLIT) {
        attend((base + j) * row4 + kvh * D4);
    }
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
