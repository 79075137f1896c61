// quant_matmul.wgsl — y = W·x for a quantized weight matrix and a batch of activations: what both
// activation forms share (bindings, the LoRA delta, the store). The entry points are in
// quant_matmul_f32.wgsl (f32 activations, weights decoded to f32) and quant_matmul_q8.wgsl
// (8-bit activations from quantize_q8.wgsl, weights decoded to integers, packed 4×8-bit dot
// products); the launcher builds a module of dequant.wgsl, this file and one of them.
//
// Computes: for m < M, n < N:  y[y_offset + m·y_stride + n_offset + n] (+)= Σ_k W[n, k] · x[m, k]
//   (+ scale_s · Σ_j B_s[n_offset + n, j] · u[m, j] when `lora` is 1 and row m has adapter slot
//   s = row_slot[m] ≥ 0: the multi-LoRA "expand", u from lora_shrink.wgsl),
//   with `+=` when `accumulate` is 1 (fuses the residual add into the projection). Projections
//   stacked into one W (query, key, value), after one shrink over their stacked A matrices, read
//   u one rank further from row `lora_split1` and two from `lora_split2` (else both are ~0u).
// With GLU = 1 (a launcher constant) the product is gated: W is a feed-forward block's gate and
//   its up projection sits `pair_offset` bytes further in the same buffer; the kernel decodes
//   both rows n and writes y = act(gate + Δgate) · (up + Δup) (activation.wgsl; `act`), each Δ
//   from its own adapter slots (`slots`/`u` for the gate, `up_slots`/`u_up` for up) — the two
//   products and the GLU in one dispatch. `accumulate` must be 0.
// With `norm` = 1 the product is of RMSNorm(x) · nw instead of x (the norm that precedes the
//   projections, fused): the sums are scaled by 1 / sqrt(mean(x²) + eps) at the end, from the
//   squares summed over the row (f32 form: as it is read, times nw on the way in; 8-bit form:
//   the quantizer's per-group sums, nw applied before quantizing).
// Layout: W is N rows of K values in a GGUF block format (decoded by dequant.wgsl); y is f32.
// Two work splits, one entry point each in both forms (the launcher picks by the device's class):
//   `main` (CPU-backed devices): one invocation owns a tile of ROWS output rows × COLS batch
//     rows (launcher constants: decode is COLS = 1). Per 32-value group it loads each batch
//     row's x once, then decodes each weight row once and dots it with all COLS of them. On
//     CPU-backed drivers every storage load whose address differs per invocation is a loop over
//     the SIMD lanes, which these tiles amortise; small workgroups (WG) keep both threads busy
//     on the narrow K/V projections. No barriers. In the f32 form, where subgroups hold 8
//     lanes, each run of 8 lanes loads the x group they all read once and shares it by shuffles
//     (product_x_subgroup.wgsl).
//   `cooperative` (GPUs): LANES neighbouring invocations share one output row and split its
//     32-value groups (lane l takes groups l, l + LANES, …, so a row's blocks are read side by
//     side), each for COLS batch rows; a workgroup holds WG / LANES rows. The lanes' partial sums
//     meet in `reduce_lanes` (reduce_subgroup.wgsl: subgroup shuffles; reduce_workgroup.wgsl:
//     workgroup memory and one barrier).
//   f32 accumulation in both (8-bit form: i32 within a half group, then f32). A matrix split
//   across bindings runs once per part.
// Limits: K a multiple of 32 and of the format's block; N ≤ ROWS·65535·WG (`main`) or
//   65535·WG/LANES (`cooperative`) per part; M ≤ COLS·65535.

// `Params`, the uniform block, is generated from its Rust declaration (`uniform_block!` in
// src/kernels/matmul.rs) and placed before this file.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> row_slot: array<i32>;
@group(0) @binding(5) var<storage, read> u: array<f32>;
@group(0) @binding(6) var<storage, read> b_pack: array<f32>;
@group(0) @binding(7) var<storage, read> u_up: array<f32>;

// 1 / RMS of a row whose squares sum to `ss` (1 without `norm`).
fn norm_scale(ss: f32) -> f32 {
    if (p.norm == 0u) {
        return 1.0;
    }
    return inverseSqrt(ss / f32(p.k) + p.eps);
}

// The LoRA delta of output row `n` for batch row `m` (0 without an adapter): the gate's (or the
// only projection's) with `up` false, the up projection's with `up` true.
fn lora_delta(n: u32, m: u32, up: bool) -> f32 {
    if (select(p.lora, p.up_lora, up) == 0u) {
        return 0.0;
    }
    let s = row_slot[m];
    if (s < 0 || u32(s) >= select(p.n_slots, p.up_n_slots, up)) {
        return 0.0;
    }
    let row = p.n_offset + n;
    var slot: vec4<u32>;
    var u0: u32;
    if (up) {
        slot = p.up_slots[s];
        u0 = m * p.up_max_rank;
    } else {
        slot = p.slots[s];
        u0 = m * p.max_rank + select(0u, slot.z, row >= p.lora_split1) + select(0u, slot.z, row >= p.lora_split2);
    }
    let b = slot.y + row * slot.z;
    var d = 0.0;
    for (var j = 0u; j < slot.z; j++) {
        var uj: f32;
        if (up) {
            uj = u_up[u0 + j];
        } else {
            uj = u[u0 + j];
        }
        d += b_pack[b + j] * uj;
    }
    return d * bitcast<f32>(slot.w);
}

// Writes output row n (if below N) of batch row m: `v` (and, gated, `v_up`) are its sums.
fn store(n: u32, m: u32, v: f32, v_up: f32) {
    if (n < p.n) {
        let yi = p.y_offset + m * p.y_stride + p.n_offset + n;
        var r = v + lora_delta(n, m, false);
        if (GLU == 1u) {
            r = gate_act(r, p.act).x * (v_up + lora_delta(n, m, true));
        }
        if (p.accumulate != 0u) {
            y[yi] += r;
        } else {
            y[yi] = r;
        }
    }
}

// The end of a `main` tile: output rows n0.. of batch rows m0.. from their sums (`acc`, and gated
// `acc_up`: ROWS × COLS, row-major), each batch row scaled by its norm (`ss`: its squares).
fn store_tile(n0: u32, m0: u32, acc: array<f32, ROWS * COLS>, acc_up: array<f32, ROWS * COLS>, ss: array<f32, COLS>) {
    for (var t = 0u; t < COLS; t++) {
        if (m0 + t < p.m) {
            let f = norm_scale(ss[t]);
            for (var r = 0u; r < ROWS; r++) {
                store(n0 + r, m0 + t, acc[r * COLS + t] * f, acc_up[r * COLS + t] * f);
            }
        }
    }
}

// The end of a `cooperative` row: every lane's sums (and squares) met, lane 0 writes output row
// n of batch rows m0... Every lane of the workgroup must call it (the reduction may hold a barrier).
fn store_lanes(n: u32, m0: u32, li: u32, acc: array<f32, COLS>, acc_up: array<f32, COLS>, ss: array<f32, COLS>) {
    let total = reduce_lanes(acc, li);
    var total_up: array<f32, COLS>;
    if (GLU == 1u) {
        total_up = reduce_lanes(acc_up, li);
    }
    var total_ss: array<f32, COLS>;
    if (p.norm != 0u) {
        total_ss = reduce_lanes(ss, li);
    }
    if (li % LANES == 0u) {
        for (var t = 0u; t < COLS; t++) {
            if (m0 + t < p.m) {
                let f = norm_scale(total_ss[t]);
                store(n, m0 + t, total[t] * f, total_up[t] * f);
            }
        }
    }
}
