// dequant.wgsl — decoders for the GGUF block formats, shared by every kernel that reads weights.
//
// Computes: `load32_<fmt>(row_byte, k)` returns the 32 consecutive values k..k+31 (k a multiple of
// 32) of the row that starts at byte `row_byte` of the bound weight buffer `w`, as eight vec4<f32>.
// Every quantized format is decoded once, to its integer form (`load32q_<fmt>`, below: codes and
// an affine map per 16 values, what the integer-dot products read); its f32 values are that form
// mapped (`v32_of`). A 32-value group shares its scales in every format, so scales are read once
// per group. The including kernel declares `w: array<u32>` (the blocks as uploaded, below,
// little-endian) and the launcher emits `fn load32(...)` (and `fn load32q(...)`) forwarding to the
// format in use.
//
// Layout: GGUF's (ggml-common.h) block structs, except that the blocks GGUF leaves 2-byte aligned
// get 2 bytes of padding on upload (src/gpu/blocks.rs), after the leading f16 scale or at the end
// (marked `pad`), so every block is whole 4-byte words and every word is one load:
//   f32 4 B/value · f16, bf16 2 B/value
//   q4_0  32 values / 20 B: d:f16, pad, qs[16] (value j: low nibble of qs[j], j+16: high nibble) → (q-8)·d
//   q4_1  32 / 20 B: d:f16, m:f16, qs[16] → q·d + m
//   q5_0  32 / 24 B: d:f16, pad, qh:u32 (bit j = 5th bit of value j), qs[16] → (q-16)·d
//   q5_1  32 / 24 B: d:f16, m:f16, qh:u32, qs[16] → q·d + m
//   q8_0  32 / 36 B: d:f16, pad, qs:i8[32] → q·d
//   iq4_nl 32 / 20 B: d:f16, pad, qs[16] (nibbles as q4_0) → d·levels[q], ggml's 16 non-linear levels
//   iq4_xs 256 / 136 B: d:f16, scales_h:u16, scales_l[4] (8 × 6-bit scale), qs[128] → d·(sc−32)·levels[q]
//   q2_K 256 / 84 B: scales[16] (4-bit scale | 4-bit min << 4 per 16 values), qs[64] (2 bits: group g
//        of 32 values in bytes 32·(g/4).. at shift 2·(g%4)), d, dmin:f16 → d·sc·q − dmin·m
//   q3_K 256 / 112 B: hmask[32] (bit g of byte l: third bit of value l of group g), qs[64] (as q2_K),
//        scales[12] (16 × 6-bit), d:f16, pad → d·(sc−32)·(q − 4·(1 − hbit))
//   q4_K 256 / 144 B: d, dmin:f16, scales[12] (8 × 6-bit scale+min), qs[128] → d·sc·q − dmin·m
//   q5_K 256 / 176 B: d, dmin, scales[12], qh[32], qs[128]
//   q6_K 256 / 212 B: ql[128], qh[64], scales:i8[16], d:f16, pad → d·sc·(q−32)
// Limits: rows hold a multiple of 32 values. On CPU-backed drivers each storage load whose
// address differs per invocation is a loop over the SIMD lanes, so the decoders load every word
// once and avoid branches on per-invocation values.

// Four consecutive words from word `i`.
fn words4(i: u32) -> vec4<u32> {
    return vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]);
}

fn rd_u8(off: u32) -> u32 {
    return (w[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

// The f16 in the low half of word `i`: every format's leading scale, and q3_K's and q6_K's
// trailing one (the padding after it).
fn lo_f16(i: u32) -> f32 {
    return unpack2x16float(w[i]).x;
}

alias V32 = array<vec4<f32>, 8>;

fn load32_f32(row_byte: u32, k: u32) -> V32 {
    let i = (row_byte >> 2u) + k;
    var r: V32;
    for (var j = 0u; j < 8u; j++) {
        let o = i + 4u * j;
        r[j] = vec4<f32>(bitcast<f32>(w[o]), bitcast<f32>(w[o + 1u]), bitcast<f32>(w[o + 2u]), bitcast<f32>(w[o + 3u]));
    }
    return r;
}

fn load32_f16(row_byte: u32, k: u32) -> V32 {
    let i = (row_byte >> 2u) + (k >> 1u);
    var r: V32;
    for (var j = 0u; j < 8u; j++) {
        r[j] = vec4<f32>(unpack2x16float(w[i + 2u * j]), unpack2x16float(w[i + 2u * j + 1u]));
    }
    return r;
}

fn bf16x2(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
}

fn load32_bf16(row_byte: u32, k: u32) -> V32 {
    let i = (row_byte >> 2u) + (k >> 1u);
    var r: V32;
    for (var j = 0u; j < 8u; j++) {
        r[j] = vec4<f32>(bf16x2(w[i + 2u * j]), bf16x2(w[i + 2u * j + 1u]));
    }
    return r;
}

// Scale s (0..15) of a q3_K block whose 12 scale bytes start at `sc`.
fn scale_k3(sc: u32, s: u32) -> f32 {
    let low = select(rd_u8(sc + s - 8u) >> 4u, rd_u8(sc + s) & 0xfu, s < 8u);
    let high = (rd_u8(sc + 8u + (s & 3u)) >> (2u * (s >> 2u))) & 3u;
    return f32(low | (high << 4u)) - 32.0;
}

// 6-bit scale and min of sub-block `s` (0..7) from the 12 scale bytes at `sc`.
fn scale_min_k4(sc: u32, s: u32) -> vec2<f32> {
    if (s < 4u) {
        return vec2<f32>(f32(rd_u8(sc + s) & 63u), f32(rd_u8(sc + s + 4u) & 63u));
    }
    let hi = rd_u8(sc + s + 4u);
    let a = rd_u8(sc + s - 4u);
    let m = rd_u8(sc + s);
    return vec2<f32>(f32((hi & 0xfu) | ((a >> 6u) << 4u)), f32((hi >> 4u) | ((m >> 6u) << 4u)));
}

// The f32 values of a group in integer form: every quantized format's `load32_*`.
fn v32_of(g: Q32) -> V32 {
    var r: V32;
    for (var half = 0u; half < 2u; half++) {
        for (var i = 0u; i < 4u; i++) {
            r[4u * half + i] = vec4<f32>(unpack4xI8(g.q[4u * half + i])) * g.d[half] + g.m[half];
        }
    }
    return r;
}

fn load32_q4_0(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q4_0(row_byte, k));
}

fn load32_q4_1(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q4_1(row_byte, k));
}

fn load32_q5_0(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q5_0(row_byte, k));
}

fn load32_q5_1(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q5_1(row_byte, k));
}

fn load32_q8_0(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q8_0(row_byte, k));
}

fn load32_iq4_nl(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_iq4_nl(row_byte, k));
}

fn load32_iq4_xs(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_iq4_xs(row_byte, k));
}

fn load32_q2_k(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q2_k(row_byte, k));
}

fn load32_q3_k(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q3_k(row_byte, k));
}

fn load32_q4_k(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q4_k(row_byte, k));
}

fn load32_q5_k(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q5_k(row_byte, k));
}

fn load32_q6_k(row_byte: u32, k: u32) -> V32 {
    return v32_of(load32q_q6_k(row_byte, k));
}

// ---- Integer form, for the integer-dot products (quant_matmul_q8.wgsl) ----
//
// `load32q_<fmt>(row_byte, k)` returns a group's 32 values as integers and an
// affine map per half: value j = d[h]·q_j + m[h], h = j / 16, q_j the j-th byte of `q` (word j/4,
// lowest byte first) read as i8. Every quantized format has one (the float formats have not):
// codes that are unsigned in the file stay unsigned (below 128) and their offset goes to `m`.

struct Q32 {
    q: array<u32, 8>,
    d: vec2<f32>,
    m: vec2<f32>,
}

const LOW_NIBBLES: u32 = 0x0f0f0f0fu;

// Bits 0..3 of `v` to bit 0 of bytes 0..3.
fn bits_to_bytes(v: u32) -> u32 {
    return (v & 1u) | ((v & 2u) << 7u) | ((v & 4u) << 14u) | ((v & 8u) << 21u);
}

// 16 bytes of packed nibbles (low nibbles: values 0..15, high: 16..31), one map for both halves.
fn q32_nibbles(qs: vec4<u32>, d: f32, m: f32) -> Q32 {
    var r: Q32;
    for (var i = 0u; i < 4u; i++) {
        r.q[i] = qs[i] & LOW_NIBBLES;
        r.q[i + 4u] = (qs[i] >> 4u) & LOW_NIBBLES;
    }
    r.d = vec2<f32>(d, d);
    r.m = vec2<f32>(m, m);
    return r;
}

fn load32q_q4_0(row_byte: u32, k: u32) -> Q32 {
    let i = (row_byte + (k >> 5u) * 20u) >> 2u;
    let d = lo_f16(i);
    return q32_nibbles(words4(i + 1u), d, -8.0 * d);
}

fn load32q_q4_1(row_byte: u32, k: u32) -> Q32 {
    let i = (row_byte + (k >> 5u) * 20u) >> 2u;
    let dm = unpack2x16float(w[i]);
    return q32_nibbles(words4(i + 1u), dm.x, dm.y);
}

// The fifth bits `qh` (bit j: value j) added to nibbles as bit 4 of each byte.
fn q32_fifth_bits(r: Q32, qh: u32) -> Q32 {
    var o = r;
    for (var i = 0u; i < 8u; i++) {
        o.q[i] |= bits_to_bytes(qh >> (4u * i)) << 4u;
    }
    return o;
}

fn load32q_q5_0(row_byte: u32, k: u32) -> Q32 {
    let i = (row_byte + (k >> 5u) * 24u) >> 2u;
    let d = lo_f16(i);
    return q32_fifth_bits(q32_nibbles(words4(i + 2u), d, -16.0 * d), w[i + 1u]);
}

fn load32q_q5_1(row_byte: u32, k: u32) -> Q32 {
    let i = (row_byte + (k >> 5u) * 24u) >> 2u;
    let dm = unpack2x16float(w[i]);
    return q32_fifth_bits(q32_nibbles(words4(i + 2u), dm.x, dm.y), w[i + 1u]);
}

fn load32q_q8_0(row_byte: u32, k: u32) -> Q32 {
    let i = (row_byte + (k >> 5u) * 36u) >> 2u;
    let d = lo_f16(i);
    let lo = words4(i + 1u);
    let hi = words4(i + 5u);
    var r: Q32;
    for (var i = 0u; i < 4u; i++) {
        r.q[i] = lo[i];
        r.q[i + 4u] = hi[i];
    }
    r.d = vec2<f32>(d, d);
    return r;
}

// ggml's kvalues_iq4nl as integers.
var<private> iq4_nl_ints: array<i32, 16> = array<i32, 16>(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);

// Four nibbles (one per byte of `n`) to their levels, packed as i8.
fn iq4_levels(n: u32) -> u32 {
    return pack4xI8(vec4<i32>(iq4_nl_ints[n & 15u], iq4_nl_ints[(n >> 8u) & 15u], iq4_nl_ints[(n >> 16u) & 15u], iq4_nl_ints[n >> 24u]));
}

fn q32_iq4(qs: vec4<u32>, d: f32) -> Q32 {
    var r: Q32;
    for (var i = 0u; i < 4u; i++) {
        r.q[i] = iq4_levels(qs[i] & LOW_NIBBLES);
        r.q[i + 4u] = iq4_levels((qs[i] >> 4u) & LOW_NIBBLES);
    }
    r.d = vec2<f32>(d, d);
    return r;
}

fn load32q_iq4_nl(row_byte: u32, k: u32) -> Q32 {
    let i = (row_byte + (k >> 5u) * 20u) >> 2u;
    return q32_iq4(words4(i + 1u), lo_f16(i));
}

fn load32q_iq4_xs(row_byte: u32, k: u32) -> Q32 {
    let b = row_byte + (k >> 8u) * 136u;
    let g = (k & 255u) >> 5u;
    let head = w[b >> 2u];
    let low = (rd_u8(b + 4u + (g >> 1u)) >> (4u * (g & 1u))) & 0xfu;
    let scale = f32(low | (((head >> (16u + 2u * g)) & 3u) << 4u)) - 32.0;
    return q32_iq4(words4((b + 8u + 16u * g) >> 2u), unpack2x16float(head).x * scale);
}

fn load32q_q2_k(row_byte: u32, k: u32) -> Q32 {
    let b = row_byte + (k >> 8u) * 84u;
    let g = (k & 255u) >> 5u;
    let dm = unpack2x16float(w[(b + 80u) >> 2u]);
    let q = (b + 16u + 32u * (g >> 2u)) >> 2u;
    let shift = 2u * (g & 3u);
    var r: Q32;
    for (var half = 0u; half < 2u; half++) {
        let sc = rd_u8(b + 2u * g + half);
        r.d[half] = dm.x * f32(sc & 0xfu);
        r.m[half] = -dm.y * f32(sc >> 4u);
        for (var i = 0u; i < 4u; i++) {
            r.q[4u * half + i] = (w[q + 4u * half + i] >> shift) & 0x03030303u;
        }
    }
    return r;
}

fn load32q_q3_k(row_byte: u32, k: u32) -> Q32 {
    let b = row_byte + (k >> 8u) * 112u;
    let g = (k & 255u) >> 5u;
    let d = lo_f16((b + 108u) >> 2u);
    let shift = 2u * (g & 3u);
    var r: Q32;
    for (var half = 0u; half < 2u; half++) {
        // q − 4·(1 − hbit) = (q | hbit << 2) − 4: codes 0..7, the 4 in the offset.
        let dl = d * scale_k3(b + 96u, 2u * g + half);
        r.d[half] = dl;
        r.m[half] = -4.0 * dl;
        let hm = words4((b + 16u * half) >> 2u);
        let qs = words4((b + 32u + 32u * (g >> 2u) + 16u * half) >> 2u);
        for (var i = 0u; i < 4u; i++) {
            r.q[4u * half + i] = ((qs[i] >> shift) & 0x03030303u) | (((hm[i] >> g) & 0x01010101u) << 2u);
        }
    }
    return r;
}

// q4_K and q5_K: sub-block s of the super-block at b; `qh_off` = 0 for q4_K (no fifth bit).
fn load32q_k4(b: u32, k: u32, qs_off: u32, qh_off: u32) -> Q32 {
    let s = (k & 255u) >> 5u;
    let dm = unpack2x16float(w[b >> 2u]);
    let scm = scale_min_k4(b + 4u, s);
    let q = (b + qs_off + (s >> 1u) * 32u) >> 2u;
    let sh = (s & 1u) * 4u;
    var r: Q32;
    for (var i = 0u; i < 8u; i++) {
        r.q[i] = (w[q + i] >> sh) & LOW_NIBBLES;
        if (qh_off != 0u) {
            r.q[i] |= ((w[((b + qh_off) >> 2u) + i] >> s) & 0x01010101u) << 4u;
        }
    }
    r.d = vec2<f32>(dm.x * scm.x);
    r.m = vec2<f32>(-dm.y * scm.y);
    return r;
}

fn load32q_q4_k(row_byte: u32, k: u32) -> Q32 {
    return load32q_k4(row_byte + (k >> 8u) * 144u, k, 16u, 0u);
}

fn load32q_q5_k(row_byte: u32, k: u32) -> Q32 {
    return load32q_k4(row_byte + (k >> 8u) * 176u, k, 48u, 16u);
}

fn load32q_q6_k(row_byte: u32, k: u32) -> Q32 {
    let b = row_byte + (k >> 8u) * 212u;
    let j = k & 255u;
    let n = j >> 7u;
    let quarter = (j & 127u) >> 5u;
    let d = lo_f16((b + 208u) >> 2u);
    let sc = b + 192u + n * 8u + 2u * quarter;
    let ql = b + n * 64u + (quarter & 1u) * 32u;
    let sh = (quarter >> 1u) * 4u;
    let qh = b + 128u + n * 32u;
    let ql4 = array<vec4<u32>, 2>(words4(ql >> 2u), words4((ql >> 2u) + 4u));
    let qh4 = array<vec4<u32>, 2>(words4(qh >> 2u), words4((qh >> 2u) + 4u));
    var r: Q32;
    // Codes 0..63; the −32 goes to the offset. Values 0..15 use one scale, 16..31 the next.
    for (var half = 0u; half < 2u; half++) {
        let f = d * f32(bitcast<i32>(rd_u8(sc + half) << 24u) >> 24u);
        r.d[half] = f;
        r.m[half] = -32.0 * f;
    }
    for (var i = 0u; i < 8u; i++) {
        let lo = (ql4[i >> 2u][i & 3u] >> sh) & LOW_NIBBLES;
        let hi = (qh4[i >> 2u][i & 3u] >> (2u * quarter)) & 0x03030303u;
        r.q[i] = lo | (hi << 4u);
    }
    return r;
}
