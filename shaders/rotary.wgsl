// rotary.wgsl — the rotation of rotary position embedding (RoPE), shared by kv_store.wgsl (q and k
// rotated as they are stored) and rope.wgsl (the gradient through it).
//
// Computes: rotary_cos_sin: for pair i < rot_dim/2 at position pos, θ = pos · base^(−2i/rot_dim)
//   divided by `factor` (Llama 3.1's and LongRoPE's per-pair frequency factor; 1 elsewhere), and
//   returns (scale·cos θ, scale·sin θ) (`scale`: LongRoPE's attention factor; 1 elsewhere); the
//   pair (a, b) then becomes (a·c − b·s, a·s + b·c).
//   rotary_pair: the offsets of pair i within a head: mode 0 ("normal", llama) (2i, 2i+1),
//   mode 1 ("neox", qwen2/3, gemma3) (i, i + rot_dim/2).
// Layout: functions only, no bindings.
// Limits: rot_dim even and above 0.

fn rotary_cos_sin(pos: u32, i: u32, rot_dim: u32, log2_base: f32, factor: f32, scale: f32) -> vec2<f32> {
    let freq = exp2(-log2_base * f32(2u * i) / f32(rot_dim)) / factor;
    let theta = f32(pos) * freq;
    return scale * vec2<f32>(cos(theta), sin(theta));
}

fn rotary_pair(i: u32, rot_dim: u32, mode: u32) -> vec2<u32> {
    if (mode == 1u) {
        return vec2<u32>(i, i + rot_dim / 2u);
    }
    return vec2<u32>(2u * i, 2u * i + 1u);
}
