//! GGUF blocks as the kernels read them: in whole 4-byte words.
//!
//! q4_0, q5_0, q8_0 and iq4_nl blocks open with a 2-byte f16 scale and q3_K and q6_K end with
//! one, so in GGUF's layout every other block's words straddle a word boundary, and a kernel
//! reading one pays two loads and a shift for it (on CPU-backed drivers each load is a loop over
//! the SIMD lanes). Uploads give each such block 2 bytes of padding after its scale — right after
//! the leading one, or at the end — so each of its words is one aligned load
//! (`shaders/dequant.wgsl` reads this layout). Every other format is uploaded as it is stored.

use crate::gguf::BlockFormat;
use std::borrow::Cow;

/// Padding each block gets.
const PAD: usize = 2;

/// Where a block of `format` takes its padding, in bytes from its start (`None`: its blocks are
/// whole words already, or its values are, for the float formats).
fn padding_at(format: BlockFormat) -> Option<usize> {
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::Q8_0 | BlockFormat::IQ4_NL => Some(2),
        BlockFormat::Q3_K | BlockFormat::Q6_K => Some(format.block_bytes()),
        _ => None,
    }
}

/// Padding bytes a block of `format` gets on upload.
fn pad_bytes(format: BlockFormat) -> usize {
    padding_at(format).map_or(0, |_| PAD)
}

/// Bytes of one row of `cols` values as uploaded (`cols` a multiple of the block length).
pub fn row_bytes(format: BlockFormat, cols: usize) -> usize {
    cols / format.block_len() * (format.block_bytes() + pad_bytes(format))
}

/// Bytes a tensor of `gguf_bytes` bytes in `format` takes as uploaded.
pub fn uploaded_bytes(format: BlockFormat, gguf_bytes: u64) -> u64 {
    gguf_bytes + gguf_bytes / format.block_bytes() as u64 * pad_bytes(format) as u64
}

/// Whole GGUF blocks of `format` in the uploaded layout: borrowed where it is GGUF's own.
pub fn padded(format: BlockFormat, bytes: &[u8]) -> Cow<'_, [u8]> {
    let Some(at) = padding_at(format) else { return Cow::Borrowed(bytes) };
    let block = format.block_bytes();
    let mut out = Vec::with_capacity(bytes.len() / block * (block + PAD));
    for b in bytes.chunks_exact(block) {
        out.extend_from_slice(&b[..at]);
        out.extend_from_slice(&[0; PAD]);
        out.extend_from_slice(&b[at..]);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_blocks_are_whole_words_with_their_bytes_in_order() {
        for format in BlockFormat::ALL {
            let cols = 256;
            let gguf = format.row_bytes(cols);
            let bytes: Vec<u8> = (0..2 * gguf).map(|i| (i % 251) as u8 + 1).collect();
            let out = padded(format, &bytes);
            assert_eq!(out.len(), 2 * row_bytes(format, cols), "{format:?}");
            assert_eq!(out.len() as u64, uploaded_bytes(format, bytes.len() as u64), "{format:?}");
            if format.block_len() > 1 {
                let block = out.len() / (2 * cols / format.block_len());
                assert_eq!(block % 4, 0, "{format:?}: {block}-byte blocks");
            }
            // The padding is zeros; without it the bytes are GGUF's, in order.
            let kept: Vec<u8> = out.iter().copied().filter(|&b| b != 0).collect();
            assert_eq!(kept, bytes, "{format:?}");
            assert_eq!(out.len() - kept.len(), pad_bytes(format) * 2 * cols / format.block_len(), "{format:?}");
        }
    }

    #[test]
    fn leading_scales_are_followed_by_the_padding_and_trailing_ones_end_the_block() {
        let q8: Vec<u8> = (1..=34).collect();
        let out = padded(BlockFormat::Q8_0, &q8);
        assert_eq!(&out[..6], &[1, 2, 0, 0, 3, 4]);
        let q6: Vec<u8> = (0..210).map(|i| (i % 200) as u8 + 1).collect();
        let out = padded(BlockFormat::Q6_K, &q6);
        assert_eq!(&out[..210], &q6[..]);
        assert_eq!(&out[210..], &[0, 0]);
    }
}
