// attention.wgsl — causal multi-head attention over a preallocated KV cache (prefill and decode).
//
// Computes: for query token t (position pos0 + t) and head h (KV head h / (n_heads / n_kv_heads)):
//   o[t, h] = Σ_j softmax_j(scale · q[t, h] · k[j]) · v[j]   over cached positions j ≤ pos0 + t,
//   and, when window > 0 (sliding-window layers), only j > pos0 + t − window.
//   With `tree` = 1 the new tokens form a token tree (candidate continuations scored in one pass):
//   token t sits at position pos0 + depth[t] and attends to the cached rows j < pos0 and to cache
//   rows pos0 + s for s = t and each ancestor of t (parent[s] ≥ 0), instead of every row before it.
// Layout: q, o: rows of n_heads·head_dim f32 (vec4 units) at q_offset + t·q_stride;
//   k, v: the layer's cache, row j = position j (tree tokens: row pos0 + t), n_kv_heads·head_dim
//   f32 per row; tree: per new token (parent index or −1, depth).
// Work split: one invocation per (head, token) with an online softmax (one pass over the keys,
//   running max and sum, f32 accumulator in registers) — suits CPU-backed devices; a split-KV
//   variant for GPUs is future work (see README, performance).
// Limits: head_dim % 4 == 0, head_dim ≤ 256.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    window: u32,
    q_offset: u32,
    q_stride: u32,
    o_offset: u32,
    o_stride: u32,
    scale: f32,
    tree: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> kc: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> vc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> tree: array<vec2<i32>>;

var<private> acc: array<vec4<f32>, 64>;
var<private> mx: f32;
var<private> l: f32;

// Fold key/value row j into the running softmax of query q[qo..].
fn attend(qo: u32, ko: u32, d4: u32) {
    var s = 0.0;
    for (var d = 0u; d < d4; d++) {
        s += dot(q[qo + d], kc[ko + d]);
    }
    s *= p.scale;
    let m_new = max(mx, s);
    let c = exp(mx - m_new);
    let e = exp(s - m_new);
    l = l * c + e;
    for (var d = 0u; d < d4; d++) {
        acc[d] = acc[d] * c + e * vc[ko + d];
    }
    mx = m_new;
}

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let h = gid.x;
    let t = gid.y;
    if (h >= p.n_heads || t >= p.n_tokens) {
        return;
    }
    let d4 = p.head_dim / 4u;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let row4 = p.n_kv_heads * d4;
    let qo = (p.q_offset + t * p.q_stride) / 4u + h * d4;
    var pos = p.pos0 + t;
    if (p.tree == 1u) {
        pos = p.pos0 + u32(tree[t].y);
    }
    var start = 0u;
    if (p.window > 0u && pos + 1u > p.window) {
        start = pos + 1u - p.window;
    }
    for (var d = 0u; d < d4; d++) {
        acc[d] = vec4<f32>(0.0);
    }
    mx = -3.0e38;
    l = 0.0;
    if (p.tree == 0u) {
        for (var j = start; j <= pos; j++) {
            attend(qo, j * row4 + kvh * d4, d4);
        }
    } else {
        for (var j = start; j < p.pos0; j++) {
            attend(qo, j * row4 + kvh * d4, d4);
        }
        // The token itself and its ancestors, nearest first (the sum does not depend on order).
        var s = i32(t);
        while (s >= 0) {
            if (p.pos0 + u32(tree[s].y) >= start) {
                attend(qo, (p.pos0 + u32(s)) * row4 + kvh * d4, d4);
            }
            s = tree[s].x;
        }
    }
    let oo = (p.o_offset + t * p.o_stride) / 4u + h * d4;
    for (var d = 0u; d < d4; d++) {
        o[oo + d] = acc[d] / l;
    }
}
