// attention_backward.wgsl — gradients of causal attention for the rows a training step computes,
// over the cached keys of the frozen prefix and the step's own keys.
//
// The forward (attention.wgsl): for query row t at position pos0 + t and head h (key head
// kh = h / (n_heads / n_kv_heads)), p_j = softmax_j(scale · q·k_j) over key positions
// j ∈ [start, pos0 + t] (start = pos + 1 − window with a sliding window, else 0), o = Σ_j p_j v_j.
// Given dO:
//   `grad_q`   dq = scale · Σ_j p_j (dO·v_j − D) k_j, with D = Σ_j p_j dO·v_j; also stores
//              (max, sum, D) of the row's softmax for `grad_kv`.   one invocation per (t, h),
//              one pass over the keys: with e_j = exp(s_j − max), dq = scale/l · (Σ e_j dO·v_j k_j
//              − D · Σ e_j k_j), both sums and l = Σ e_j rescaled as the running max grows (as
//              the forward's online softmax), q, dO and the sums held in registers (D4 vec4).
//   `grad_kv`  for key rows i of the step (position pos0 + i) and key head kh, over the queries
//              that see them and the heads sharing kh: dv_i = Σ p dO, dk_i = scale · Σ p (dO·v_i − D) q.
//              one invocation per (i, kh), one pass over the queries with k_i, v_i and both sums
//              held in registers (D4 vec4); run after `grad_q`.
// Keys of the prefix (positions < pos0) get no gradient: nothing before the step depends on the
// adapter being trained.
// Layout: q, dO, dq: rows of n_heads·head_dim f32, this sequence's T rows from row row0 on;
//   k, v: rows of n_kv_heads·head_dim f16 for positions 0 .. pos0 + T (the layer's KV cache from
//   word base_words on: its slot, two values per u32 word, as kv_store.wgsl writes them); dk, dv:
//   rows of n_kv_heads·head_dim (the step's own keys), T from row0; stats: 3 f32 per (row, h).
//   A pass holding several training examples dispatches once per example, each at its row0.
// Work split: one invocation per output row and head, loops over keys (or queries) and the head
//   dimension; rows are written by their owner only, so no atomics or barriers. Both run
//   workgroups of 8 rows of one head (`grad_q` query rows walking the keys, `grad_kv` key rows
//   walking the queries), whose lanes walk together and share their loads where the device has
//   subgroups (lanes_subgroup.wgsl, placed before this file; else lanes_own.wgsl).
// Limits: n_heads a multiple of n_kv_heads; head_dim = 4·D4, at most 256.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/attention_backward.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> dq: array<f32>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;
@group(0) @binding(6) var<storage, read> stats_in: array<f32>;

fn first_key(pos: u32) -> u32 {
    if (p.window > 0u && pos + 1u > p.window) {
        return pos + 1u - p.window;
    }
    return 0u;
}

// Cached values d..d+3 of the row at `o` (o and d multiples of 4).
fn key4(o: u32, d: u32) -> vec4<f32> {
    let i = p.base_words + (o + d) / 2u;
    return vec4<f32>(unpack2x16float(k[i]), unpack2x16float(k[i + 1u]));
}

fn value4(o: u32, d: u32) -> vec4<f32> {
    let i = p.base_words + (o + d) / 2u;
    return vec4<f32>(unpack2x16float(v[i]), unpack2x16float(v[i + 1u]));
}

// vec4 d of the query row at `qo`: read from the lane that loaded it (`part`, when the lanes
// walk together), else loaded.
fn query4(together: bool, part: vec4<f32>, qo: u32, d: u32) -> vec4<f32> {
    if (together) {
        return lanes_read(part, d % 8u);
    }
    let o = qo + 4u * d;
    return vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
}

// vec4 d of the output-gradient row at `qo`, as `query4`.
fn dout4(together: bool, part: vec4<f32>, qo: u32, d: u32) -> vec4<f32> {
    if (together) {
        return lanes_read(part, d % 8u);
    }
    let o = qo + 4u * d;
    return vec4<f32>(dout[o], dout[o + 1u], dout[o + 2u], dout[o + 3u]);
}

// The rows [x, y) a lane walks: its own [first, end), or where the lanes walk together every
// valid lane's (each counts only its own). Called by every lane (lanes_min/lanes_max).
fn walked(first: u32, end: u32, valid: bool, together: bool) -> vec2<u32> {
    let all = vec2<u32>(lanes_min(select(0xffffffffu, first, valid)), lanes_max(end));
    return select(vec2<u32>(first, end), all, together);
}

// Invocation t serves row t of head wid.y: the lanes of a subgroup hold neighbouring rows of one
// head, which walk the same cache rows (one sequence); with subgroups they load each key and
// value row once between them and read it from each other (lanes_*.wgsl), else each loads its
// own. Each counts the keys its own row sees.
@compute @workgroup_size(8)
fn grad_q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    // No early return: every lane takes part in lanes_*. Rows past the end repeat the last
    // one, count no keys and are not stored.
    let valid = gid.x < p.n_tokens;
    let t = min(gid.x, p.n_tokens - 1u);
    let kv_row = p.n_kv_heads * p.head_dim;
    let kh = h / (p.n_heads / p.n_kv_heads);
    let qo = ((p.row0 + t) * p.n_heads + h) * p.head_dim;
    let pos = p.pos0 + t;
    var qv: array<vec4<f32>, D4>;
    var gv: array<vec4<f32>, D4>;
    for (var d = 0u; d < D4; d++) {
        let o = qo + 4u * d;
        qv[d] = vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
        gv[d] = vec4<f32>(dout[o], dout[o + 1u], dout[o + 2u], dout[o + 3u]);
    }
    let first = first_key(pos);
    let end = select(0u, pos + 1u, valid);
    let together = lanes_together(0u);
    let lane = lane_index();
    let span = walked(first, end, valid, together);
    // a = Σ e·(dO·v)·k, b = Σ e·k, l = Σ e, sov = Σ e·(dO·v), all relative to the running max m.
    var a: array<vec4<f32>, D4>;
    var b: array<vec4<f32>, D4>;
    var m = -3.4e38;
    var l = 0.0;
    var sov = 0.0;
    for (var j = span.x; j < span.y; j++) {
        let live = j >= first && j < end;
        let o = j * kv_row + kh * p.head_dim;
        var kp: array<vec4<f32>, PARTS>;
        var vp: array<vec4<f32>, PARTS>;
        if (together) {
            for (var i = 0u; i < PARTS; i++) {
                let d = 4u * min((lane & 7u) + 8u * i, D4 - 1u);
                kp[i] = key4(o, d);
                vp[i] = value4(o, d);
            }
        }
        var kr: array<vec4<f32>, D4>;
        var s = 0.0;
        var ov = 0.0;
        for (var d = 0u; d < D4; d++) {
            var vr: vec4<f32>;
            if (together) {
                kr[d] = lanes_read(kp[d / 8u], d % 8u);
                vr = lanes_read(vp[d / 8u], d % 8u);
            } else {
                kr[d] = key4(o, 4u * d);
                vr = value4(o, 4u * d);
            }
            s += dot(qv[d], kr[d]);
            ov += dot(gv[d], vr);
        }
        s *= p.scale;
        let m_new = select(m, max(m, s), live);
        let c = exp(m - m_new);
        let e = select(0.0, exp(s - m_new), live);
        m = m_new;
        l = l * c + e;
        sov = sov * c + e * ov;
        for (var d = 0u; d < D4; d++) {
            a[d] = a[d] * c + (e * ov) * kr[d];
            b[d] = b[d] * c + e * kr[d];
        }
    }
    if (valid) {
        let dd = sov / l;
        let f = p.scale / l;
        for (var d = 0u; d < D4; d++) {
            let g = f * (a[d] - dd * b[d]);
            let o = qo + 4u * d;
            dq[o] = g.x;
            dq[o + 1u] = g.y;
            dq[o + 2u] = g.z;
            dq[o + 3u] = g.w;
        }
        let so = ((p.row0 + t) * p.n_heads + h) * 3u;
        stats[so] = m;
        stats[so + 1u] = l;
        stats[so + 2u] = dd;
    }
}

// vec4 of a cached row each lane loads in `grad_q` when the lanes walk together (lane % 8, + 8, …).
const PARTS = (D4 + 7u) / 8u;

// Invocation i serves key row i of KV head wid.y: the lanes of a subgroup hold neighbouring key
// rows of one head, which walk the same query rows (from the first lane's own on); with subgroups
// they load each query and output-gradient row once between them and read it from each other
// (lanes_*.wgsl), else each loads its own. The key and value rows and both sums stay in
// registers; each lane counts the queries that see its key.
@compute @workgroup_size(8)
fn grad_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let kh = wid.y;
    // No early return: every lane takes part in lanes_*. Rows past the end repeat the last
    // one, count no queries and are not stored.
    let valid = gid.x < p.n_tokens;
    let i = min(gid.x, p.n_tokens - 1u);
    let kv_row = p.n_kv_heads * p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let ko = (p.pos0 + i) * kv_row + kh * p.head_dim;
    var kr: array<vec4<f32>, D4>;
    var vr: array<vec4<f32>, D4>;
    for (var d = 0u; d < D4; d++) {
        kr[d] = key4(ko, 4u * d);
        vr[d] = value4(ko, 4u * d);
    }
    // The queries that see key i: from its own row to the last whose window still holds it.
    var end = p.n_tokens;
    if (p.window > 0u) {
        end = min(end, i + p.window);
    }
    end = select(i, end, valid);
    let together = lanes_together(0u);
    let lane = lane_index();
    let span = walked(i, end, valid, together);
    // gk = Σ ds·q, gv = Σ p·dO over the (query row, head) pairs that see key i.
    var gk: array<vec4<f32>, D4>;
    var gv: array<vec4<f32>, D4>;
    for (var t = span.x; t < span.y; t++) {
        let live = t >= i && t < end;
        for (var h = kh * group; h < (kh + 1u) * group; h++) {
            let qo = ((p.row0 + t) * p.n_heads + h) * p.head_dim;
            var qp: array<vec4<f32>, PARTS>;
            var gp: array<vec4<f32>, PARTS>;
            if (together) {
                for (var j = 0u; j < PARTS; j++) {
                    let o = qo + 4u * min((lane & 7u) + 8u * j, D4 - 1u);
                    qp[j] = vec4<f32>(q[o], q[o + 1u], q[o + 2u], q[o + 3u]);
                    gp[j] = vec4<f32>(dout[o], dout[o + 1u], dout[o + 2u], dout[o + 3u]);
                }
            }
            var s = 0.0;
            var ov = 0.0;
            for (var d = 0u; d < D4; d++) {
                s += dot(query4(together, qp[d / 8u], qo, d), kr[d]);
                ov += dot(dout4(together, gp[d / 8u], qo, d), vr[d]);
            }
            let so = ((p.row0 + t) * p.n_heads + h) * 3u;
            let pr = select(0.0, exp(s * p.scale - stats_in[so]) / stats_in[so + 1u], live);
            let ds = pr * (ov - stats_in[so + 2u]) * p.scale;
            for (var d = 0u; d < D4; d++) {
                gv[d] += pr * dout4(together, gp[d / 8u], qo, d);
                gk[d] += ds * query4(together, qp[d / 8u], qo, d);
            }
        }
    }
    if (valid) {
        let go = ((p.row0 + i) * p.n_kv_heads + kh) * p.head_dim;
        for (var d = 0u; d < D4; d++) {
            let o = go + 4u * d;
            dk[o] = gk[d].x;
            dk[o + 1u] = gk[d].y;
            dk[o + 2u] = gk[d].z;
            dk[o + 3u] = gk[d].w;
            dv[o] = gv[d].x;
            dv[o + 1u] = gv[d].y;
            dv[o + 2u] = gv[d].z;
            dv[o + 3u] = gv[d].w;
        }
    }
}
