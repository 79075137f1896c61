// embed.wgsl — token embedding gather from a quantized table.
//
// Computes: out[t, c] = scale · E[ids[t], c] for t < n_tokens, c < cols.
// Layout: E is rows of `cols` values in a GGUF block format (dequant.wgsl's `load32`), this binding
//   holding rows row_start..row_end of the table; out is f32 [n_tokens, cols] (vec4 units).
// Work split: one invocation per (32 columns, token). A table split across bindings runs once per
//   part; invocations whose token lies in another part do nothing.
// Limits: cols % 32 == 0; token ids were range-checked by the launcher.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/embed.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c32 = gid.x;
    let t = gid.y;
    if (c32 * 32u >= p.cols || t >= p.n_tokens) {
        return;
    }
    let id = ids[t];
    if (id < p.row_start || id >= p.row_end) {
        return;
    }
    let v = load32((id - p.row_start) * p.row_bytes, c32 * 32u);
    let o = (t * p.cols + c32 * 32u) >> 2u;
    for (var j = 0u; j < 8u; j++) {
        out[o + j] = v[j] * p.scale;
    }
}
