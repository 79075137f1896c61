//! ggml tensor types and their block layouts, with a plain-Rust dequantizer.
//!
//! The dequantizer is the CPU definition of each format: the WGSL decoders in
//! `shaders/dequant.wgsl` are tested against it, and the f32 reference model uses it.

use half::{bf16, f16};

/// ggml tensor type ids as stored in GGUF.
#[allow(non_camel_case_types, missing_docs)] // ggml's own type names, documented by ggml
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ4_NL,
    IQ4_XS,
    BF16,
    /// A known id of another family (IQ*, integer tensors, ...).
    Other(u32),
}

impl GgmlType {
    /// The type for a GGUF type id, or `None` for an id ggml never assigned.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            20 => Self::IQ4_NL,
            23 => Self::IQ4_XS,
            30 => Self::BF16,
            16..=19 | 21 | 22 | 24..=29 | 31..=41 => Self::Other(id),
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::IQ4_NL => 20,
            Self::IQ4_XS => 23,
            Self::BF16 => 30,
            Self::Other(id) => id,
        }
    }

    /// ggml's name of the type (`IQ2_XXS`, `Q4_K`, ...), or `type N` for an id it never named.
    pub fn name(self) -> String {
        let named = match self {
            Self::Other(16) => "IQ2_XXS",
            Self::Other(17) => "IQ2_XS",
            Self::Other(18) => "IQ3_XXS",
            Self::Other(19) => "IQ1_S",
            Self::Other(21) => "IQ3_S",
            Self::Other(22) => "IQ2_S",
            Self::Other(24) => "I8",
            Self::Other(25) => "I16",
            Self::Other(26) => "I32",
            Self::Other(27) => "I64",
            Self::Other(28) => "F64",
            Self::Other(29) => "IQ1_M",
            Self::Other(34) => "TQ1_0",
            Self::Other(35) => "TQ2_0",
            Self::Other(39) => "MXFP4",
            Self::Other(id) => return format!("type {id}"),
            known => return format!("{known:?}"),
        };
        named.to_string()
    }

    /// The block format, for the types this engine computes with.
    pub fn format(self) -> Option<BlockFormat> {
        Some(match self {
            Self::F32 => BlockFormat::F32,
            Self::F16 => BlockFormat::F16,
            Self::BF16 => BlockFormat::BF16,
            Self::Q4_0 => BlockFormat::Q4_0,
            Self::Q4_1 => BlockFormat::Q4_1,
            Self::Q5_0 => BlockFormat::Q5_0,
            Self::Q5_1 => BlockFormat::Q5_1,
            Self::Q8_0 => BlockFormat::Q8_0,
            Self::IQ4_NL => BlockFormat::IQ4_NL,
            Self::IQ4_XS => BlockFormat::IQ4_XS,
            Self::Q2_K => BlockFormat::Q2_K,
            Self::Q3_K => BlockFormat::Q3_K,
            Self::Q4_K => BlockFormat::Q4_K,
            Self::Q5_K => BlockFormat::Q5_K,
            Self::Q6_K => BlockFormat::Q6_K,
            _ => return None,
        })
    }
}

/// A block format the engine's kernels decode.
#[allow(non_camel_case_types, missing_docs)] // ggml's own type names, documented by ggml
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum BlockFormat {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    IQ4_NL,
    IQ4_XS,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// IQ4_NL's 16 levels (ggml's `kvalues_iq4nl`): a 4-bit code picks one, times the block's scale.
pub const IQ4_NL_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

impl BlockFormat {
    /// Whether the format stores integer codes with a scale (and offset) per 16 or 32 values:
    /// what the integer-dot products read (`load32q_*` in dequant.wgsl); the float formats do not.
    pub fn has_integer_form(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Every supported format, for tests and benchmarks.
    pub const ALL: [BlockFormat; 15] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::IQ4_NL,
        Self::IQ4_XS,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
    ];

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::IQ4_NL => 32,
            Self::IQ4_XS | Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::IQ4_NL => 18,
            Self::IQ4_XS => 136,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// The ggml type of this format.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::BF16 => GgmlType::BF16,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::IQ4_NL => GgmlType::IQ4_NL,
            Self::IQ4_XS => GgmlType::IQ4_XS,
            Self::Q2_K => GgmlType::Q2_K,
            Self::Q3_K => GgmlType::Q3_K,
            Self::Q4_K => GgmlType::Q4_K,
            Self::Q5_K => GgmlType::Q5_K,
            Self::Q6_K => GgmlType::Q6_K,
        }
    }

    /// Bytes of one row of `cols` values (`cols` must be a multiple of the block length).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }

    /// Lower-case name used in shader entry points and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::IQ4_NL => "iq4_nl",
            Self::IQ4_XS => "iq4_xs",
            Self::Q2_K => "q2_k",
            Self::Q3_K => "q3_k",
            Self::Q4_K => "q4_k",
            Self::Q5_K => "q5_k",
            Self::Q6_K => "q6_k",
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
fn scale_min_k4(scales: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
    } else {
        let sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Dequantize `out.len()` values (a whole number of blocks) from `bytes` in `format`.
///
/// Panics if `bytes` is shorter than the blocks `out` asks for: callers size both from the
/// tensor index, which the reader has already checked against the file.
pub fn dequantize(format: BlockFormat, bytes: &[u8], out: &mut [f32]) {
    let bl = format.block_len();
    let bb = format.block_bytes();
    assert!(out.len() % bl == 0 && bytes.len() >= out.len() / bl * bb);
    for (blk, y) in out.chunks_exact_mut(bl).enumerate() {
        let b = &bytes[blk * bb..(blk + 1) * bb];
        match format {
            BlockFormat::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            BlockFormat::F16 => y[0] = f16_at(b, 0),
            BlockFormat::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            BlockFormat::Q4_0 => {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0x0f) as f32 - 8.0) * d;
                    y[j + 16] = ((b[2 + j] >> 4) as f32 - 8.0) * d;
                }
            }
            BlockFormat::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
            BlockFormat::Q5_0 => {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    let lo = (b[6 + j] & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (b[6 + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    y[j] = (lo as f32 - 16.0) * d;
                    y[j + 16] = (hi as f32 - 16.0) * d;
                }
            }
            BlockFormat::Q5_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for j in 0..16 {
                    let lo = (b[8 + j] & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (b[8 + j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    y[j] = lo as f32 * d + m;
                    y[j + 16] = hi as f32 * d + m;
                }
            }
            BlockFormat::Q8_0 => {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * d;
                }
            }
            BlockFormat::IQ4_NL => {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    y[j] = d * IQ4_NL_LEVELS[(b[2 + j] & 0x0f) as usize] as f32;
                    y[j + 16] = d * IQ4_NL_LEVELS[(b[2 + j] >> 4) as usize] as f32;
                }
            }
            BlockFormat::IQ4_XS => {
                let (d, scales_h) = (f16_at(b, 0), u16::from_le_bytes([b[2], b[3]]) as u32);
                for g in 0..8 {
                    let low = (b[4 + g / 2] >> (4 * (g % 2))) & 0x0f;
                    let scale = (low as u32 | ((scales_h >> (2 * g)) & 3) << 4) as f32 - 32.0;
                    let qs = &b[8 + 16 * g..8 + 16 * g + 16];
                    for j in 0..16 {
                        y[32 * g + j] = d * scale * IQ4_NL_LEVELS[(qs[j] & 0x0f) as usize] as f32;
                        y[32 * g + j + 16] = d * scale * IQ4_NL_LEVELS[(qs[j] >> 4) as usize] as f32;
                    }
                }
            }
            BlockFormat::Q2_K => {
                // Scales: 16 bytes (a 4-bit scale and a 4-bit min per 16 values); 2-bit quants in
                // 64 bytes, four 32-value groups per 32 bytes at shifts 0, 2, 4, 6.
                let (scales, qs, d, dmin) = (&b[0..16], &b[16..80], f16_at(b, 80), f16_at(b, 82));
                for (v, yv) in y.iter_mut().enumerate() {
                    let (g, half, l) = (v / 32, v % 32 / 16, v % 16);
                    let sc = scales[2 * g + half];
                    let q = (qs[(g / 4) * 32 + half * 16 + l] >> (2 * (g % 4))) & 3;
                    *yv = d * (sc & 0x0f) as f32 * q as f32 - dmin * (sc >> 4) as f32;
                }
            }
            BlockFormat::Q3_K => {
                // hmask: 32 bytes, bit g of byte l is the third bit of value l of group g; 2-bit
                // quants as Q2_K's; 16 6-bit scales packed in 12 bytes; d at the end.
                let (hmask, qs, scales, d) = (&b[0..32], &b[32..96], &b[96..108], f16_at(b, 108));
                let scale = |s: usize| {
                    let low = if s < 8 { scales[s] & 0x0f } else { scales[s - 8] >> 4 };
                    let high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
                    (low | high << 4) as f32 - 32.0
                };
                for (v, yv) in y.iter_mut().enumerate() {
                    let (g, half, l) = (v / 32, v % 32 / 16, v % 16);
                    let q = ((qs[(g / 4) * 32 + half * 16 + l] >> (2 * (g % 4))) & 3) as f32;
                    let high = (hmask[half * 16 + l] >> g) & 1;
                    *yv = d * scale(2 * g + half) * (q - if high == 1 { 0.0 } else { 4.0 });
                }
            }
            BlockFormat::Q4_K | BlockFormat::Q5_K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if format == BlockFormat::Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                for s in 0..8 {
                    let (sc, m) = scale_min_k4(scales, s);
                    let q = &qs[(s / 2) * 32..(s / 2) * 32 + 32];
                    for l in 0..32 {
                        let mut v = ((q[l] >> (4 * (s % 2))) & 0x0f) as f32;
                        if let Some(qh) = qh {
                            v += (((qh[l] >> s) & 1) as f32) * 16.0;
                        }
                        y[s * 32 + l] = d * sc * v - dmin * m;
                    }
                }
            }
            BlockFormat::Q6_K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for (j, yj) in y.iter_mut().enumerate() {
                    let (n, r) = (j / 128, j % 128);
                    let (quarter, l) = (r / 32, r % 32);
                    let lo = (ql[n * 64 + (quarter % 2) * 32 + l] >> (4 * (quarter / 2))) & 0x0f;
                    let hi = (qh[n * 32 + l] >> (2 * quarter)) & 3;
                    let q = (lo | (hi << 4)) as i32 - 32;
                    *yj = d * (sc[n * 8 + l / 16 + 2 * quarter] as i8) as f32 * q as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for id in [0u32, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30] {
            assert_eq!(GgmlType::from_id(id).unwrap().id(), id);
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(1000), None);
        for f in BlockFormat::ALL {
            assert_eq!(f.ggml_type().format(), Some(f));
        }
    }

    // Values worked by hand from the block layouts in ggml's `ggml-common.h`.
    #[test]
    fn q4_0_block_by_hand() {
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 0x3a; // low nibble 10 -> value 0, high nibble 3 -> value 16
        let mut y = [0f32; 32];
        dequantize(BlockFormat::Q4_0, &b, &mut y);
        assert_eq!(y[0], (10.0 - 8.0) * 0.5);
        assert_eq!(y[16], (3.0 - 8.0) * 0.5);
        assert_eq!(y[1], -4.0);
    }

    #[test]
    fn q6_k_block_by_hand() {
        let mut b = vec![0u8; 210];
        b[208..210].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        for s in 0..16 {
            b[192 + s] = (s as i8 - 8) as u8;
        }
        b[0] = 0x21; // ql[0]: low 1 (elem 0), high 2 (elem 64)
        b[128] = 0b11_10_01_00; // qh[0]: elem 0 -> 0, elem 32 -> 1, elem 64 -> 2, elem 96 -> 3
        let mut y = [0f32; 256];
        dequantize(BlockFormat::Q6_K, &b, &mut y);
        assert_eq!(y[0], 2.0 * -8.0 * (1.0 - 32.0));
        assert_eq!(y[32], 2.0 * -6.0 * ((1 << 4) as f32 - 32.0));
        assert_eq!(y[64], 2.0 * -4.0 * ((2 | 2 << 4) as f32 - 32.0));
        assert_eq!(y[96], 2.0 * -2.0 * ((3 << 4) as f32 - 32.0));
    }
}
