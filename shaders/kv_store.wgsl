// kv_store.wgsl — a step's queries rotated in place, its keys rotated and its values appended to a
// layer's KV cache as f16: RoPE and the cache store in one dispatch.
//
// Computes: for each new row t < n_tokens at position pos = places[at + t].y, stored at cache row
//   c = base + pos0 + index of that place (its sequence's cache slot, the positions held before,
//   its index among the sequence's new rows: rows of several sequences in one dispatch):
//   q: every head's rot_dim/2 pairs rotated in place (rotary.wgsl; dimensions from rot_dim to
//   head_dim left as they are);
//   k: k_cache[c · kv_words + w] = pack2x16float(rotated k[2w], rotated k[2w + 1]), each value
//   rotated with its pair's partner (read from the unrotated row, which is left as it is);
//   v: v_cache[c · kv_words + w] = pack2x16float(v[2w], v[2w + 1]).
// Layout: x: one buffer holding the rows of q, k and v (the fused product's interleaved rows, or
//   three dense regions), row t of each at float offset + t · stride, heads of head_dim side by
//   side; k_cache, v_cache: rows of kv_words u32 words, two f16 each (the lower half first), row j
//   holding position j of the slot at row base — what attention.wgsl reads; places: vec4<u32>
//   (base, pos, pos0, index) per row, see src/kernels/places.rs; factors: rot_dim/2 f32.
// Work split: one invocation per (q pair | k word | v word) × row: x below q_pairs rotates a pair
//   of q, then kv_words invocations each store a word of k, then kv_words a word of v.
// Limits: head_dim and offsets even; rot_dim even and ≤ head_dim; values beyond f16's range
//   (±65504) are not representable.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/kv_store.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read> places: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> factors: array<f32>;

fn factor(i: u32) -> f32 {
    if (p.factors == 1u) {
        return factors[i];
    }
    return 1.0;
}

// Element d of the head starting at `head` of a row at `pos`, rotated with its pair's partner.
fn rotated_k(head: u32, d: u32, pos: u32) -> f32 {
    if (d >= p.rot_dim) {
        return x[head + d];
    }
    let half_rot = p.rot_dim / 2u;
    var i = d / 2u;
    var second = d % 2u == 1u;
    if (p.mode == 1u) {
        i = d % half_rot;
        second = d >= half_rot;
    }
    let ab = rotary_pair(i, p.rot_dim, p.mode);
    let a = x[head + ab.x];
    let b = x[head + ab.y];
    let cs = rotary_cos_sin(pos, i, p.rot_dim, p.log2_base, factor(i), p.scale);
    if (second) {
        return a * cs.y + b * cs.x;
    }
    return a * cs.x - b * cs.y;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    if (t >= p.n_tokens) {
        return;
    }
    let place = places[p.at + t];
    let pos = place.y;
    if (gid.x < p.q_pairs) {
        let half_rot = p.rot_dim / 2u;
        let head = p.q_offset + t * p.q_stride + (gid.x / half_rot) * p.head_dim;
        let i = gid.x % half_rot;
        let ab = head + rotary_pair(i, p.rot_dim, p.mode);
        let cs = rotary_cos_sin(pos, i, p.rot_dim, p.log2_base, factor(i), p.scale);
        let a = x[ab.x];
        let b = x[ab.y];
        x[ab.x] = a * cs.x - b * cs.y;
        x[ab.y] = a * cs.y + b * cs.x;
        return;
    }
    let w = gid.x - p.q_pairs;
    let dst = (place.x + place.z + place.w) * p.kv_words;
    if (w < p.kv_words) {
        let e = 2u * w;
        let head = p.k_offset + t * p.k_stride + (e / p.head_dim) * p.head_dim;
        let d = e % p.head_dim;
        k_cache[dst + w] = pack2x16float(vec2<f32>(rotated_k(head, d, pos), rotated_k(head, d + 1u, pos)));
    } else if (w < 2u * p.kv_words) {
        let wv = w - p.kv_words;
        let src = p.v_offset + t * p.v_stride + 2u * wv;
        v_cache[dst + wv] = pack2x16float(vec2<f32>(x[src], x[src + 1u]));
    }
}
