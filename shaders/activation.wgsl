// activation.wgsl — the gate activations of gated feed-forward blocks (SwiGLU, GeGLU), shared by
// elementwise.wgsl (glu and its backward) and quant_matmul.wgsl (the product fused with the GLU).
//
// Computes: gate_act(g, act) = (act(g), act'(g)); act 0: SiLU, 1: tanh-approximated GELU.
// Limits: none; tanh goes through exp of a clamped argument (it saturates long before the clamp).

fn gate_act(g: f32, act: u32) -> vec2<f32> {
    if (act == 0u) {
        let s = 1.0 / (1.0 + exp(-g));
        return vec2<f32>(g * s, s * (1.0 + g * (1.0 - s)));
    }
    let c = 0.7978845608;
    let u = clamp(c * (g + 0.044715 * g * g * g), -15.0, 15.0);
    let e = exp(2.0 * u);
    let t = (e - 1.0) / (e + 1.0);
    return vec2<f32>(0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g));
}
