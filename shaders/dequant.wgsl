// dequant.wgsl — decoders for the GGUF block formats, shared by every kernel that reads weights.
//
// Computes: `load8_<fmt>(row_byte, k)` returns the 8 consecutive values k..k+7 (k a multiple of 8)
// of the row that starts at byte `row_byte` of the bound weight buffer `w`, as two vec4<f32>.
// The including kernel declares `w: array<u32>` (raw GGUF bytes, little-endian, padded to 4 bytes)
// and the launcher emits `fn load8(...)` forwarding to the format in use.
//
// Layout: exactly GGUF's (ggml-common.h) block structs, unrepacked:
//   f32 4 B/value · f16, bf16 2 B/value
//   q4_0  32 values / 18 B: d:f16, qs[16] (value j: low nibble of qs[j], j+16: high nibble) → (q-8)·d
//   q4_1  32 / 20 B: d:f16, m:f16, qs[16] → q·d + m
//   q5_0  32 / 22 B: d:f16, qh:u32 (bit j = 5th bit of value j), qs[16] → (q-16)·d
//   q8_0  32 / 34 B: d:f16, qs:i8[32] → q·d
//   q4_K 256 / 144 B: d, dmin:f16, scales[12] (8 × 6-bit scale+min), qs[128] → d·sc·q − dmin·m
//   q5_K 256 / 176 B: d, dmin, scales[12], qh[32], qs[128]
//   q6_K 256 / 210 B: ql[128], qh[64], scales:i8[16], d:f16 → d·sc·(q−32)
// Limits: blocks need not be 4-byte aligned (q4_0, q5_0, q8_0, q6_K are not): `rd_u32` reads any
// byte offset. Values k..k+7 never straddle a block or a sub-block scale, since every block length
// and scale group is a multiple of 8.

fn rd_u32(off: u32) -> u32 {
    let i = off >> 2u;
    let s = (off & 3u) * 8u;
    if (s == 0u) {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

fn rd_u8(off: u32) -> u32 {
    return (w[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

fn rd_f16(off: u32) -> f32 {
    return unpack2x16float(rd_u32(off) & 0xffffu).x;
}

// Nibbles (shift 0 = low, 4 = high) of the 4 bytes of `v`, as floats.
fn nib4(v: u32, shift: u32) -> vec4<f32> {
    let x = v >> shift;
    return vec4<f32>(f32(x & 0xfu), f32((x >> 8u) & 0xfu), f32((x >> 16u) & 0xfu), f32((x >> 24u) & 0xfu));
}

// The 4 bytes of `v` as signed values.
fn i8x4(v: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xI8(v));
}

// Bit `b`, `b+1`, `b+2`, `b+3` of `v`, as floats.
fn bits4(v: u32, b: u32) -> vec4<f32> {
    let x = v >> b;
    return vec4<f32>(f32(x & 1u), f32((x >> 1u) & 1u), f32((x >> 2u) & 1u), f32((x >> 3u) & 1u));
}

fn load8_f32(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let i = (row_byte >> 2u) + k;
    return array<vec4<f32>, 2>(
        vec4<f32>(bitcast<f32>(w[i]), bitcast<f32>(w[i + 1u]), bitcast<f32>(w[i + 2u]), bitcast<f32>(w[i + 3u])),
        vec4<f32>(bitcast<f32>(w[i + 4u]), bitcast<f32>(w[i + 5u]), bitcast<f32>(w[i + 6u]), bitcast<f32>(w[i + 7u])));
}

fn load8_f16(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let o = row_byte + k * 2u;
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack2x16float(rd_u32(o)), unpack2x16float(rd_u32(o + 4u))),
        vec4<f32>(unpack2x16float(rd_u32(o + 8u)), unpack2x16float(rd_u32(o + 12u))));
}

fn bf16x2(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
}

fn load8_bf16(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let o = row_byte + k * 2u;
    return array<vec4<f32>, 2>(
        vec4<f32>(bf16x2(rd_u32(o)), bf16x2(rd_u32(o + 4u))),
        vec4<f32>(bf16x2(rd_u32(o + 8u)), bf16x2(rd_u32(o + 12u))));
}

fn load8_q4_0(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let b = row_byte + (k >> 5u) * 18u;
    let j = k & 31u;
    let d = rd_f16(b);
    let q = b + 2u + (j & 15u);
    let sh = (j >> 4u) * 4u;
    return array<vec4<f32>, 2>((nib4(rd_u32(q), sh) - 8.0) * d, (nib4(rd_u32(q + 4u), sh) - 8.0) * d);
}

fn load8_q4_1(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let b = row_byte + (k >> 5u) * 20u;
    let j = k & 31u;
    let dm = unpack2x16float(rd_u32(b));
    let q = b + 4u + (j & 15u);
    let sh = (j >> 4u) * 4u;
    return array<vec4<f32>, 2>(nib4(rd_u32(q), sh) * dm.x + dm.y, nib4(rd_u32(q + 4u), sh) * dm.x + dm.y);
}

fn load8_q5_0(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let b = row_byte + (k >> 5u) * 22u;
    let j = k & 31u;
    let d = rd_f16(b);
    let qh = rd_u32(b + 2u);
    let q = b + 6u + (j & 15u);
    let sh = (j >> 4u) * 4u;
    let lo = nib4(rd_u32(q), sh) + bits4(qh, j) * 16.0 - 16.0;
    let hi = nib4(rd_u32(q + 4u), sh) + bits4(qh, j + 4u) * 16.0 - 16.0;
    return array<vec4<f32>, 2>(lo * d, hi * d);
}

fn load8_q8_0(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let b = row_byte + (k >> 5u) * 34u;
    let d = rd_f16(b);
    let q = b + 2u + (k & 31u);
    return array<vec4<f32>, 2>(i8x4(rd_u32(q)) * d, i8x4(rd_u32(q + 4u)) * d);
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

// Shared by q4_K and q5_K: `qh_off` = 0 for q4_K (no high bits), else the qh array's offset.
fn load8_k4(b: u32, k: u32, qs_off: u32, qh_off: u32) -> array<vec4<f32>, 2> {
    let j = k & 255u;
    let s = j >> 5u;
    let l = j & 31u;
    let dm = unpack2x16float(rd_u32(b));
    let scm = scale_min_k4(b + 4u, s);
    let d = dm.x * scm.x;
    let m = dm.y * scm.y;
    let q = b + qs_off + (s >> 1u) * 32u + l;
    let sh = (s & 1u) * 4u;
    var lo = nib4(rd_u32(q), sh);
    var hi = nib4(rd_u32(q + 4u), sh);
    if (qh_off != 0u) {
        let h0 = rd_u32(b + qh_off + l) >> s;
        let h1 = rd_u32(b + qh_off + l + 4u) >> s;
        lo += vec4<f32>(f32(h0 & 1u), f32((h0 >> 8u) & 1u), f32((h0 >> 16u) & 1u), f32((h0 >> 24u) & 1u)) * 16.0;
        hi += vec4<f32>(f32(h1 & 1u), f32((h1 >> 8u) & 1u), f32((h1 >> 16u) & 1u), f32((h1 >> 24u) & 1u)) * 16.0;
    }
    return array<vec4<f32>, 2>(lo * d - m, hi * d - m);
}

fn load8_q4_k(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    return load8_k4(row_byte + (k >> 8u) * 144u, k, 16u, 0u);
}

fn load8_q5_k(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    return load8_k4(row_byte + (k >> 8u) * 176u, k, 48u, 16u);
}

fn load8_q6_k(row_byte: u32, k: u32) -> array<vec4<f32>, 2> {
    let b = row_byte + (k >> 8u) * 210u;
    let j = k & 255u;
    let n = j >> 7u;
    let quarter = (j & 127u) >> 5u;
    let l = j & 31u;
    let d = rd_f16(b + 208u);
    let sc = f32(bitcast<i32>(rd_u8(b + 192u + n * 8u + (l >> 4u) + 2u * quarter) << 24u) >> 24u);
    let ql = b + n * 64u + (quarter & 1u) * 32u + l;
    let sh = (quarter >> 1u) * 4u;
    let qh = b + 128u + n * 32u + l;
    let hs = 2u * quarter;
    let h0 = rd_u32(qh) >> hs;
    let h1 = rd_u32(qh + 4u) >> hs;
    let hi0 = vec4<f32>(f32(h0 & 3u), f32((h0 >> 8u) & 3u), f32((h0 >> 16u) & 3u), f32((h0 >> 24u) & 3u));
    let hi1 = vec4<f32>(f32(h1 & 3u), f32((h1 >> 8u) & 3u), f32((h1 >> 16u) & 3u), f32((h1 >> 24u) & 3u));
    let f = d * sc;
    return array<vec4<f32>, 2>(
        (nib4(rd_u32(ql), sh) + hi0 * 16.0 - 32.0) * f,
        (nib4(rd_u32(ql + 4u), sh) + hi1 * 16.0 - 32.0) * f);
}
