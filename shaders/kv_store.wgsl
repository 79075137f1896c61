// kv_store.wgsl — append a step's keys and values to a layer's KV cache as f16.
//
// Computes: for each new row t < n_tokens, at cache row c = base + pos0 + index of its place
//   places[at + t] (its sequence's cache slot, the positions held before, its index among the
//   sequence's new rows: rows of several sequences in one dispatch), and each pair i < row_len / 2:
//   k_cache[c · row_len / 2 + i] = pack2x16float(k[k_offset + t · k_stride + 2i .. +2]),
//   the same for v.
// Layout: k, v: rows of row_len f32 (the step's rows after bias, norm and RoPE), row t at float
//   offset + t · stride of each (the same buffer may hold both, and the queries between);
//   k_cache, v_cache: rows of row_len f16, two per u32 word (the lower half first), row j holding
//   position j of the slot at row base — what attention.wgsl and attention_backward.wgsl read;
//   places: vec4<u32> (base, pos, pos0, index) per row, see src/kernels/places.rs.
// Work split: one invocation per (pair, row), both caches written by it.
// Limits: row_len, offsets and strides even; values beyond f16's range (±65504) are not representable.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/kv_store.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> places: array<vec4<u32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = gid.x + gid.y * 65535u * 64u;
    if (w >= p.n_words) {
        return;
    }
    let t = w / p.row_words;
    let i = 2u * (w % p.row_words);
    let place = places[p.at + t];
    let dst = (place.x + place.z + place.w) * p.row_words + w % p.row_words;
    let ks = p.k_offset + t * p.k_stride + i;
    let vs = p.v_offset + t * p.v_stride + i;
    k_cache[dst] = pack2x16float(vec2<f32>(k[ks], k[ks + 1u]));
    v_cache[dst] = pack2x16float(vec2<f32>(v[vs], v[vs + 1u]));
}
