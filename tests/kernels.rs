//! Every kernel against the plain-Rust f32 reference on fresh random inputs.
//!
//! Tolerances (max error relative to the largest reference value): the GPU decodes each block
//! format exactly (f16/bf16 scales convert exactly to f32), so every format shares the budget of
//! f32 accumulation against the reference's f64: 2e-4 for products over ≤ 1024 terms; 1e-5 for
//! pointwise ops; transcendental ops (exp, cos/sin, tanh) 1e-4.

mod common;

use agentflux::gguf::BlockFormat;
use agentflux::gpu::{
    read_f32, read_u32, storage_buffer, storage_buffer_zeroed, DeviceClass, GpuContext, GpuOptions, Recorder, View, WeightMatrix,
};
use agentflux::hparams::{Activation, Rope, RopeLayout};
use agentflux::kernels::attention::{attention, AttentionShape, KvBuffers};
use agentflux::kernels::elementwise::{add_rows, glu};
use agentflux::kernels::embed::embed;
use agentflux::kernels::kv_store::{rope_kv_store, Qkv};
use agentflux::kernels::matmul::{matmul, MatmulIo};
use agentflux::kernels::norm::{rms_norm, rms_norm_inplace, RmsNorm};
use agentflux::kernels::places::{place_sequence, Places, RowPlace};
use agentflux::kernels::quantize::{quantize_q8, Q8Rows};
use agentflux::kernels::rope::RopeOp;
use agentflux::kernels::sample::{argmax, OUT_WORDS};
use agentflux::reference::{self, random_matrix_bytes, random_vec};
use common::{assert_close, ctx, dequant, f16_cache, f32_buf, rng, with_and_without_subgroups};

/// y = W·x on the GPU for `m` rows, against the reference.
fn check_matmul(ctx: &GpuContext, format: BlockFormat, rows: usize, cols: usize, m: usize, seed_rng: &mut agentflux::decode::SplitMix64) {
    let bytes = random_matrix_bytes(seed_rng, format, rows, cols, 1.0);
    let w = WeightMatrix::upload(ctx, "w", format, rows, cols, &bytes).unwrap();
    let x = random_vec(seed_rng, m * cols, 1.0);
    let xb = f32_buf(ctx, &x);
    let yb = storage_buffer_zeroed(ctx, "y", (m * rows * 4) as u64);
    let mut rec = Recorder::new(ctx);
    matmul(&mut rec, ctx, &w, MatmulIo::dense(&xb, &yb, &w, m)).unwrap();
    rec.submit();
    let got = read_f32(ctx, &yb, 0, m * rows).unwrap();
    let want = reference::matmul(&dequant(format, &bytes, rows, cols), &x, rows, cols);
    assert_close(&format!("matmul {format:?} {rows}x{cols} m={m} parts={} ({:?} kernels)", w.parts.len(), ctx.class), &got, &want, 2e-4);
}

#[test]
fn matmul_every_format_decode_and_prefill_shapes() {
    let mut r = rng("matmul_every_format");
    for (family, ctx) in common::kernel_families() {
        eprintln!("{family}");
        for format in BlockFormat::ALL {
            let k = format.block_len().max(32);
            // Odd row counts and batch sizes, K of one and several blocks (fewer and more than the
            // GPU family's lanes per row); a matrix as tall as an LM head, which decode gives a
            // taller tile.
            for (rows, cols, m) in [(1, k.max(32), 1), (37, k * 3, 1), (67, k * 2, 5), (128, k * 4, 9), (9, 32 * 19, 2), (16_387, k, 1)] {
                let cols = cols.div_ceil(k) * k;
                check_matmul(&ctx, format, rows, cols, m, &mut r);
            }
        }
    }
}

/// The RMSNorm fused into a product (and into the LoRA shrink before it): `W·(rmsnorm(x)·g)`
/// plus an adapter's `s·B·A·(rmsnorm(x)·g)` on the rows that have one, against the reference
/// norm followed by the reference products, in every kernel variant.
#[test]
fn products_fuse_the_norm_before_them() {
    use agentflux::kernels::lora::lora_shrink;
    use agentflux::kernels::matmul::{LoraIo, LoraSlot};
    let mut r = rng("fused_norm");
    let (rank, eps) = (4, 1e-5);
    for (family, ctx) in common::kernel_families() {
        for format in [BlockFormat::Q4_1, BlockFormat::Q6_K, BlockFormat::Q8_0] {
            let k = format.block_len().max(32);
            for (rows, cols, row_slot) in [(37, k * 3, vec![0i32]), (67, k * 2, vec![-1, 0, 0, -1, 0])] {
                let m = row_slot.len();
                let bytes = random_matrix_bytes(&mut r, format, rows, cols, 1.0);
                let w = WeightMatrix::upload(&ctx, "w", format, rows, cols, &bytes).unwrap();
                let (x, g) = (random_vec(&mut r, m * cols, 3.0), random_vec(&mut r, cols, 1.0));
                let (a, b) = (random_vec(&mut r, rank * cols, 0.5), random_vec(&mut r, rows * rank, 0.5));
                let slots = [LoraSlot { a_offset: 0, b_offset: 0, rank, scale: 0.7 }];
                let (xb, gb, ab, bb) = (f32_buf(&ctx, &x), f32_buf(&ctx, &g), f32_buf(&ctx, &a), f32_buf(&ctx, &b));
                let sb = storage_buffer(&ctx, "row_slot", bytemuck::cast_slice(&row_slot));
                let u = storage_buffer_zeroed(&ctx, "u", (m * rank * 4) as u64);
                let (y, y_lora) =
                    (storage_buffer_zeroed(&ctx, "y", (m * rows * 4) as u64), storage_buffer_zeroed(&ctx, "y_lora", (m * rows * 4) as u64));
                let norm = Some(RmsNorm { w: &gb, eps });
                let io = MatmulIo { norm, ..MatmulIo::dense(&xb, &y, &w, m) };
                let lora = LoraIo { a_pack: &ab, b_pack: &bb, row_slot: &sb, u: &u, max_rank: rank, slots: &slots, u_splits: None };
                let io_lora = MatmulIo { y: View::new(&y_lora, m, rows), lora: Some(lora), ..io };
                let mut rec = Recorder::new(&ctx);
                matmul(&mut rec, &ctx, &w, io).unwrap();
                lora_shrink(&mut rec, &ctx, &io_lora).unwrap();
                matmul(&mut rec, &ctx, &w, io_lora).unwrap();
                rec.submit();
                let xn = reference::rms_norm(&x, &g, cols, eps);
                let want = reference::matmul(&dequant(format, &bytes, rows, cols), &xn, rows, cols);
                let what = format!("{family}: {format:?} {rows}x{cols} m={m}, norm fused");
                assert_close(&what, &read_f32(&ctx, &y, 0, m * rows).unwrap(), &want, 2e-4);
                let mut want_lora = want.clone();
                for (t, &s) in row_slot.iter().enumerate() {
                    if s == 0 {
                        let ua = reference::matmul(&a, &xn[t * cols..][..cols], rank, cols);
                        for (n, d) in reference::matmul(&b, &ua, rows, rank).iter().enumerate() {
                            want_lora[t * rows + n] += 0.7 * d;
                        }
                    }
                }
                assert_close(&format!("{what}, with an adapter"), &read_f32(&ctx, &y_lora, 0, m * rows).unwrap(), &want_lora, 2e-4);
            }
        }
    }
}

/// The products over 8-bit activations (`Products::Int8`): every quantized format in both kernel
/// families, decode and prefill shapes, with the norm fused (its weights applied as x is
/// quantized, its 1/rms at the end); gated with adapters in the gated test. The reference rounds
/// the activations as the quantizer does (`reference::quantize_q8`), so the budget is f32
/// accumulation's, as for the f32 products; against unrounded activations the products differ
/// by the 8-bit rounding (printed; the reason for the model tests' own tolerance).
#[test]
fn int8_products_match_the_reference_on_8bit_activations() {
    let mut r = rng("int8_products");
    let eps = 1e-5;
    let mut rounding = 0f32;
    for (family, ctx) in common::kernel_families() {
        for format in BlockFormat::ALL.into_iter().filter(|f| f.has_integer_form()) {
            let k = format.block_len().max(32);
            let tall = if format == BlockFormat::Q8_0 { 16_387 } else { 129 };
            for (rows, cols, m) in [(37, k * 3, 1), (67, k * 2, 5), (tall, k, 1)] {
                let bytes = random_matrix_bytes(&mut r, format, rows, cols, 1.0);
                let w = WeightMatrix::upload(&ctx, "w", format, rows, cols, &bytes).unwrap();
                let wf = dequant(format, &bytes, rows, cols);
                let (x, g) = (random_vec(&mut r, m * cols, 2.0), random_vec(&mut r, cols, 1.0));
                let (xb, gb) = (f32_buf(&ctx, &x), f32_buf(&ctx, &g));
                let (qs_bytes, meta_bytes) = Q8Rows::bytes(m, cols);
                let (qs, meta) = (storage_buffer_zeroed(&ctx, "qs", qs_bytes), storage_buffer_zeroed(&ctx, "meta", meta_bytes));
                let q8 = Q8Rows { qs: &qs, meta: &meta };
                for normed in [false, true] {
                    let y = storage_buffer_zeroed(&ctx, "y", (m * rows * 4) as u64);
                    let norm = normed.then_some(RmsNorm { w: &gb, eps });
                    let mut rec = Recorder::new(&ctx);
                    quantize_q8(&mut rec, &ctx, View::new(&xb, m, cols), norm.map(|n| n.w), q8).unwrap();
                    matmul(&mut rec, &ctx, &w, MatmulIo { norm, q8: Some(q8), ..MatmulIo::dense(&xb, &y, &w, m) }).unwrap();
                    rec.submit();
                    let (input, scale): (Vec<f32>, Vec<f32>) = if normed {
                        let scaled: Vec<f32> = x.chunks(cols).flat_map(|row| row.iter().zip(&g).map(|(a, b)| a * b)).collect();
                        let inv = x.chunks(cols).map(|row| {
                            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64;
                            (1.0 / (ms + eps as f64).sqrt()) as f32
                        });
                        (scaled, inv.collect())
                    } else {
                        (x.clone(), vec![1.0; m])
                    };
                    let scaled = |mut y: Vec<f32>| {
                        for (row, f) in y.chunks_mut(rows).zip(&scale) {
                            row.iter_mut().for_each(|v| *v *= f);
                        }
                        y
                    };
                    let want = scaled(reference::matmul(&wf, &reference::quantize_q8(&input), rows, cols));
                    let exact = scaled(reference::matmul(&wf, &input, rows, cols));
                    let what = format!("{family}: int8 {format:?} {rows}x{cols} m={m} norm {normed}");
                    let got = read_f32(&ctx, &y, 0, m * rows).unwrap();
                    assert_close(&what, &got, &want, 2e-4);
                    let max = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
                    rounding = rounding.max(got.iter().zip(&exact).fold(0f32, |a, (p, q)| a.max((p - q).abs())) / max);
                }
            }
        }
    }
    // The rounding is what separates the two forms: visible, and as small as 8 bits make it.
    eprintln!("8-bit activations against f32 ones: max error {rounding:.2e} of the largest output");
    assert!(rounding > 1e-3 && rounding < 3e-2, "{rounding}");
}

#[test]
fn matmul_accumulates_and_respects_offsets() {
    let ctx = ctx();
    let mut r = rng("matmul_offsets");
    let (rows, cols, m) = (24, 64, 3);
    let bytes = random_matrix_bytes(&mut r, BlockFormat::Q8_0, rows, cols, 1.0);
    let w = WeightMatrix::upload(&ctx, "w", BlockFormat::Q8_0, rows, cols, &bytes).unwrap();
    // x rows sit at stride 72 from offset 8; y rows at stride 30 from offset 5, accumulated.
    let x = random_vec(&mut r, 8 + m * 72, 1.0);
    let y0 = random_vec(&mut r, 5 + m * 30, 1.0);
    let (xb, yb) = (f32_buf(&ctx, &x), f32_buf(&ctx, &y0));
    let mut rec = Recorder::new(&ctx);
    let x_rows = View { offset: 8, stride: 72, ..View::new(&xb, m, cols) };
    let y_rows = View { offset: 5, stride: 30, ..View::new(&yb, m, rows) };
    let io = MatmulIo { accumulate: true, ..MatmulIo::new(x_rows, y_rows) };
    matmul(&mut rec, &ctx, &w, io).unwrap();
    rec.submit();
    let got = read_f32(&ctx, &yb, 0, y0.len()).unwrap();
    let wf = dequant(BlockFormat::Q8_0, &bytes, rows, cols);
    let mut want = y0.clone();
    for t in 0..m {
        let xr = &x[8 + t * 72..][..cols];
        let yr = reference::matmul(&wf, xr, rows, cols);
        for n in 0..rows {
            want[5 + t * 30 + n] += yr[n];
        }
    }
    assert_close("matmul offsets+accumulate", &got, &want, 2e-4);
}

#[test]
fn tensors_split_across_a_small_binding_limit_stay_correct() {
    // A context that pretends bindings hold at most 4 KiB: every matrix below spans several parts.
    let small = GpuContext::new(&GpuOptions { max_binding_bytes: Some(4096), ..Default::default() }).unwrap();
    let small_gpu =
        GpuContext::new(&GpuOptions { max_binding_bytes: Some(4096), kernels: Some(DeviceClass::Gpu), ..Default::default() }).unwrap();
    let mut r = rng("binding_split");
    for format in [BlockFormat::Q4_1, BlockFormat::Q6_K, BlockFormat::F32] {
        let cols = format.block_len().max(64);
        let rows = 4096 / format.row_bytes(cols) * 3 + 5;
        for ctx in [&small, &small_gpu] {
            check_matmul(ctx, format, rows, cols, 1, &mut r);
            check_matmul(ctx, format, rows, cols, 6, &mut r);
        }
    }
    // The embedding gather too: ids land in different parts.
    let (rows, cols) = (300, 64);
    let bytes = random_matrix_bytes(&mut r, BlockFormat::Q8_0, rows, cols, 1.0);
    let table = WeightMatrix::upload(&small, "emb", BlockFormat::Q8_0, rows, cols, &bytes).unwrap();
    assert!(table.parts.len() > 3);
    check_embed(&small, &table, &bytes, &[0, 299, 150, 7, 64, 65], 1.5);
}

fn check_embed(ctx: &GpuContext, table: &WeightMatrix, bytes: &[u8], ids: &[u32], scale: f32) {
    let cols = table.cols;
    let idb = storage_buffer(ctx, "ids", bytemuck::cast_slice(ids));
    let out = storage_buffer_zeroed(ctx, "out", (ids.len() * cols * 4) as u64);
    let mut rec = Recorder::new(ctx);
    embed(&mut rec, ctx, table, &idb, scale, View::new(&out, ids.len(), cols)).unwrap();
    rec.submit();
    let got = read_f32(ctx, &out, 0, ids.len() * cols).unwrap();
    let full = dequant(table.format, bytes, table.rows, cols);
    let want: Vec<f32> = ids.iter().flat_map(|&i| full[i as usize * cols..][..cols].iter().map(|v| v * scale)).collect();
    assert_close("embed", &got, &want, 1e-6);
}

#[test]
fn embedding_gather_every_format() {
    let ctx = ctx();
    let mut r = rng("embed");
    for format in BlockFormat::ALL {
        let cols = format.block_len().max(32);
        let bytes = random_matrix_bytes(&mut r, format, 50, cols, 1.0);
        let table = WeightMatrix::upload(&ctx, "emb", format, 50, cols, &bytes).unwrap();
        let ids: Vec<u32> = (0..7).map(|_| (r.next_u64() % 50) as u32).collect();
        check_embed(&ctx, &table, &bytes, &ids, 0.75);
    }
}

#[test]
fn rms_norm_plain_accumulate_and_inplace() {
    let ctx = ctx();
    let mut r = rng("rms_norm");
    for (rows, n) in [(1, 576), (7, 100), (13, 16)] {
        let x = random_vec(&mut r, rows * n, 2.0);
        let w = random_vec(&mut r, n, 1.0);
        let y0 = random_vec(&mut r, rows * n, 1.0);
        let (xb, wb, yb) = (f32_buf(&ctx, &x), f32_buf(&ctx, &w), f32_buf(&ctx, &y0));
        let zb = f32_buf(&ctx, &x);
        let mut rec = Recorder::new(&ctx);
        let (dense, norm) = (|buf| View::new(buf, rows, n), RmsNorm { w: &wb, eps: 1e-5 });
        rms_norm(&mut rec, &ctx, norm, dense(&xb), dense(&yb), true).unwrap();
        rms_norm_inplace(&mut rec, &ctx, norm, dense(&zb)).unwrap();
        rec.submit();
        let normed = reference::rms_norm(&x, &w, n, 1e-5);
        let want: Vec<f32> = normed.iter().zip(&y0).map(|(a, b)| a + b).collect();
        assert_close("rms_norm accumulate", &read_f32(&ctx, &yb, 0, rows * n).unwrap(), &want, 1e-5);
        assert_close("rms_norm in place", &read_f32(&ctx, &zb, 0, rows * n).unwrap(), &normed, 1e-5);
    }
}

#[test]
fn attention_prefill_decode_gqa_window_and_row_offset() {
    for (lanes, ctx) in with_and_without_subgroups() {
        attention_against_the_reference(&ctx, &lanes);
    }
}

fn attention_against_the_reference(ctx: &GpuContext, lanes: &str) {
    let mut r = rng("attention");
    // Single rows run the split-key entry (short and long contexts, a window, the widest head),
    // and so do up to 64 rows without subgroups; the rest run the row-per-invocation one, with
    // subgroups its lanes walking the keys together (several runs of lanes at 65 and 70 rows).
    for (heads, kvh, hd, pos0, t, window, row0) in [
        (9, 3, 64, 0, 70, 0, 0),
        (4, 2, 16, 9, 65, 5, 2),
        (9, 3, 64, 0, 7, 0, 0),
        (4, 1, 256, 5, 3, 0, 2),
        (4, 2, 16, 20, 1, 0, 3),
        (2, 2, 32, 10, 6, 4, 1),
        (9, 3, 64, 0, 1, 0, 0),
        (9, 3, 64, 300, 1, 0, 0),
        (4, 2, 16, 40, 1, 7, 1),
        (4, 1, 256, 33, 1, 0, 0),
    ] {
        let n_kv = pos0 + t;
        let row = heads * hd;
        // Rows before `row0` belong to other sequences of a batch: the kernel must not touch them.
        let q = random_vec(&mut r, (row0 + t) * row, 1.0);
        // The sequence's cache slot starts at row `base`: the rows before it (another slot)
        // must not be read.
        let (base, kv_row) = (3 * row0, kvh * hd);
        let (kb, k) = f16_cache(ctx, &random_vec(&mut r, (base + n_kv) * kv_row, 1.0));
        let (vb, v) = f16_cache(ctx, &random_vec(&mut r, (base + n_kv) * kv_row, 1.0));
        let qb = f32_buf(ctx, &q);
        let ob = storage_buffer_zeroed(ctx, "o", (q.len() * 4) as u64);
        let scale = 1.0 / (hd as f32).sqrt();
        let shape = AttentionShape { n_heads: heads, n_kv_heads: kvh, head_dim: hd, window, scale };
        let mut places = vec![RowPlace { base: 0, pos: 0, pos0: 0, index: 0 }; row0];
        places.extend(place_sequence(base, pos0, t, None).unwrap());
        let table = storage_buffer(ctx, "places", bytemuck::cast_slice(&places));
        let mut rec = Recorder::new(ctx);
        let rows = |buf| View::new(buf, row0 + t, row).rows(row0, t);
        let at = Places { buf: &table, at: row0, rows: &places[row0..] };
        attention(&mut rec, ctx, &shape, rows(&qb), KvBuffers { k: &kb, v: &vb }, at, rows(&ob), None).unwrap();
        rec.submit();
        let mut want = vec![0f32; row0 * row];
        let slot = base * kv_row..;
        want.extend(reference::attention(&q[row0 * row..], &k[slot.clone()], &v[slot], heads, kvh, hd, pos0, window, scale));
        let what = format!("attention h={heads}/{kvh} hd={hd} pos0={pos0} t={t} w={window} row0={row0}, {lanes}");
        assert_close(&what, &read_f32(ctx, &ob, 0, q.len()).unwrap(), &want, 1e-4);
    }
}

/// One dispatch over the rows of several sequences, each in its own slot of shared cache
/// buffers at its own position — prompt pieces and decode rows (the prefill entry, whose runs of
/// lanes may hold rows of two sequences), decode rows alone (the split-key entry) — against the
/// reference attention of each sequence alone, with and without subgroups.
#[test]
fn attention_serves_several_sequences_in_one_dispatch() {
    for (lanes, ctx) in with_and_without_subgroups() {
        several_sequences_against_the_reference(&ctx, &lanes);
    }
}

fn several_sequences_against_the_reference(ctx: &GpuContext, lanes: &str) {
    let mut r = rng("attention_sequences");
    let n_ctx = 48;
    // (heads, kv heads, head_dim, window, per sequence (slot, cached positions, new rows))
    type Sequences<'a> = &'a [(usize, usize, usize)];
    let cases: [(usize, usize, usize, usize, Sequences); 6] = [
        (9, 3, 64, 0, &[(2, 5, 3), (0, 17, 1), (3, 0, 6), (1, 40, 2)]),
        (9, 3, 64, 0, &[(2, 5, 37), (0, 17, 1), (3, 0, 30), (1, 40, 2)]),
        (4, 2, 16, 5, &[(1, 10, 30), (0, 0, 1), (2, 3, 40)]),
        (4, 2, 16, 5, &[(1, 10, 1), (0, 0, 1), (2, 33, 1)]),
        (4, 1, 256, 0, &[(0, 2, 3), (1, 0, 1)]),
        (2, 2, 32, 4, &[(3, 20, 2), (0, 1, 1), (2, 9, 1)]),
    ];
    for (heads, kvh, hd, window, seqs) in cases {
        let (row, kv_row, slots) = (heads * hd, kvh * hd, 4);
        let (kb, k) = f16_cache(ctx, &random_vec(&mut r, slots * n_ctx * kv_row, 1.0));
        let (vb, v) = f16_cache(ctx, &random_vec(&mut r, slots * n_ctx * kv_row, 1.0));
        let places: Vec<RowPlace> =
            seqs.iter().flat_map(|&(slot, pos0, len)| place_sequence(slot * n_ctx, pos0, len, None).unwrap()).collect();
        let n = places.len();
        let q = random_vec(&mut r, n * row, 1.0);
        let (qb, ob) = (f32_buf(ctx, &q), storage_buffer_zeroed(ctx, "o", (q.len() * 4) as u64));
        let table = storage_buffer(ctx, "places", bytemuck::cast_slice(&places));
        let scale = 1.0 / (hd as f32).sqrt();
        let shape = AttentionShape { n_heads: heads, n_kv_heads: kvh, head_dim: hd, window, scale };
        let mut rec = Recorder::new(ctx);
        let at = Places { buf: &table, at: 0, rows: &places };
        attention(&mut rec, ctx, &shape, View::new(&qb, n, row), KvBuffers { k: &kb, v: &vb }, at, View::new(&ob, n, row), None).unwrap();
        rec.submit();
        let mut want = Vec::new();
        let mut row0 = 0;
        for &(slot, pos0, len) in seqs {
            let keys = slot * n_ctx * kv_row..(slot * n_ctx + pos0 + len) * kv_row;
            let q = &q[row0 * row..(row0 + len) * row];
            want.extend(reference::attention(q, &k[keys.clone()], &v[keys], heads, kvh, hd, pos0, window, scale));
            row0 += len;
        }
        let what = format!("attention over {seqs:?}, h={heads}/{kvh} hd={hd} w={window}, {lanes}");
        assert_close(&what, &read_f32(ctx, &ob, 0, q.len()).unwrap(), &want, 1e-4);
    }
}

/// The f16 words of a cache buffer as f32 values.
fn f16_values(ctx: &GpuContext, buf: &wgpu::Buffer, values: usize) -> Vec<f32> {
    let words = read_u32(ctx, buf, 0, values / 2).unwrap();
    words.iter().flat_map(|w| [half::f16::from_bits(*w as u16).to_f32(), half::f16::from_bits((*w >> 16) as u16).to_f32()]).collect()
}

/// A pass's queries rotated in place and its keys (rotated) and values stored as f16 at their
/// cache rows, in one dispatch, against the reference's rotation: both pair layouts, partial
/// rotation, frequency factors with an attention factor (Llama 3.1, LongRoPE), grouped heads;
/// the rows of two sequences and a token tree (at their depths) from a table entry other than
/// the first; the fused product's interleaved rows and three dense regions. Rows of the cache
/// outside the places stay untouched, and so do the f32 keys and values.
#[test]
fn rope_kv_store_rotates_and_stores_at_each_place() {
    let ctx = ctx();
    let mut r = rng("rope_kv_store");
    for layout in [RopeLayout::Normal, RopeLayout::Neox] {
        for (n_heads, n_kv, hd, rot, pos0) in [(4, 2, 64, 64, 0), (2, 2, 16, 8, 100), (3, 1, 256, 256, 4000)] {
            for factors in [None, Some((0..rot / 2).map(|_| 1.0 + 7.0 * r.next_f32()).collect::<Vec<f32>>())] {
                let scale = if factors.is_some() { 1.0 + 0.5 * r.next_f32() } else { 1.0 };
                let rp = Rope { factors, scale, ..Rope::new(layout, rot, 10000.0) };
                let factors_b = rp.factors.as_ref().map(|v| f32_buf(&ctx, v));
                let op = RopeOp { rope: &rp, factors: factors_b.as_ref() };
                // Three cache slots of n_ctx rows: a sequence of 3 new rows, one of 1, a tree of 4.
                let n_ctx = pos0 + 40;
                let mut places = vec![RowPlace { base: 0, pos: 0, pos0: 0, index: 0 }; 2];
                places.extend(place_sequence(n_ctx, pos0, 3, None).unwrap());
                places.extend(place_sequence(0, 0, 1, None).unwrap());
                places.extend(place_sequence(2 * n_ctx, 30, 4, Some(&[0, 1, 1, 0])).unwrap());
                let rows = &places[2..];
                let t = rows.len();
                let (qd, kvd) = (n_heads * hd, n_kv * hd);
                let (q, k, v) = (random_vec(&mut r, t * qd, 1.0), random_vec(&mut r, t * kvd, 1.0), random_vec(&mut r, t * kvd, 4.0));
                let table = storage_buffer(&ctx, "places", bytemuck::cast_slice(&places));
                let at = Places { buf: &table, at: 2, rows };
                // q, k, v of each row side by side; or three regions.
                let interleaved: Vec<f32> =
                    (0..t).flat_map(|i| [&q[i * qd..][..qd], &k[i * kvd..][..kvd], &v[i * kvd..][..kvd]].concat()).collect();
                let regions = [q.clone(), k.clone(), v.clone()].concat();
                for (what, x, rows_of) in [("interleaved", interleaved, 0), ("regions", regions, 1)] {
                    let xb = f32_buf(&ctx, &x);
                    let qkv = if rows_of == 0 {
                        let row = View::new(&xb, t, qd + 2 * kvd);
                        Qkv { q: row.cols(0, qd), k: row.cols(qd, kvd), v: row.cols(qd + kvd, kvd), head_dim: hd }
                    } else {
                        let region = |offset, cols| View { offset, ..View::new(&xb, t, cols) };
                        Qkv { q: region(0, qd), k: region(t * qd, kvd), v: region(t * (qd + kvd), kvd), head_dim: hd }
                    };
                    let cache = |name| storage_buffer_zeroed(&ctx, name, (3 * n_ctx * kvd * 2) as u64);
                    let (kc, vc) = (cache("kc"), cache("vc"));
                    let mut rec = Recorder::new(&ctx);
                    rope_kv_store(&mut rec, &ctx, op, qkv, KvBuffers { k: &kc, v: &vc }, at).unwrap();
                    rec.submit();
                    let case = format!("{what} {layout:?} heads {n_heads}/{n_kv}×{hd} rot {rot} pos0 {pos0} scale {scale}");
                    let got = read_f32(&ctx, &xb, 0, x.len()).unwrap();
                    let view = |v: &View, i: usize| v.offset + i * v.stride;
                    let (mut got_q, mut want_q) = (Vec::new(), Vec::new());
                    let (mut want_k, mut want_v) = (vec![0.0f32; 3 * n_ctx * kvd], vec![0.0f32; 3 * n_ctx * kvd]);
                    for (i, p) in rows.iter().enumerate() {
                        got_q.extend_from_slice(&got[view(&qkv.q, i)..][..qd]);
                        let mut row = q[i * qd..][..qd].to_vec();
                        reference::rope(&mut row, n_heads, hd, &rp, p.pos as usize);
                        want_q.extend(row);
                        let mut row = k[i * kvd..][..kvd].to_vec();
                        reference::rope(&mut row, n_kv, hd, &rp, p.pos as usize);
                        let c = (p.base + p.pos0 + p.index) as usize * kvd;
                        want_k[c..][..kvd].copy_from_slice(&row);
                        want_v[c..][..kvd].copy_from_slice(&v[i * kvd..][..kvd]);
                        // The f32 keys and values are left as they were.
                        assert_eq!(&got[view(&qkv.k, i)..][..kvd], &k[i * kvd..][..kvd], "{case}: keys row {i}");
                        assert_eq!(&got[view(&qkv.v, i)..][..kvd], &v[i * kvd..][..kvd], "{case}: values row {i}");
                    }
                    // Angles up to ~4000 rad: f32 argument reduction costs ~1e-4 there.
                    assert_close(&format!("{case}: queries"), &got_q, &want_q, 5e-4);
                    for (name, buf, want) in [("keys", &kc, &want_k), ("values", &vc, &want_v)] {
                        let stored = f16_values(&ctx, buf, want.len());
                        let max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                        for (j, (g, w)) in stored.iter().zip(want.iter()).enumerate() {
                            // One f16 rounding (half an ulp is 2^-11 of the value) after the rotation's error.
                            assert!((g - w).abs() <= w.abs() * 4.9e-4 + 5e-4 * max, "{case}: {name} value {j}: {g} for {w}");
                            assert!(*w != 0.0 || *g == 0.0, "{case}: {name} value {j} written outside the places");
                        }
                    }
                }
            }
        }
    }
    // Refused: factors given without their buffer or the other way round, rows of two buffers,
    // rows past the cache's end (it holds two), a place missing.
    let rp = Rope { factors: Some(vec![2.0; 4]), ..Rope::new(RopeLayout::Neox, 8, 10000.0) };
    let bare = Rope::new(RopeLayout::Neox, 8, 10000.0);
    let (xb, other, kc) = (f32_buf(&ctx, &[0.0; 48]), f32_buf(&ctx, &[0.0; 48]), storage_buffer_zeroed(&ctx, "kc", 32));
    let cache = KvBuffers { k: &kc, v: &kc };
    let store = |op: RopeOp, x: &wgpu::Buffer, hd: usize, base: usize, rows: usize| {
        let places = place_sequence(base, 0, 2, None).unwrap();
        let table = storage_buffer(&ctx, "places", bytemuck::cast_slice(&places));
        let row = View::new(&xb, rows, 24);
        let qkv = Qkv { q: row.cols(0, 8), k: View { buf: x, ..row.cols(8, 8) }, v: row.cols(16, 8), head_dim: hd };
        rope_kv_store(&mut Recorder::new(&ctx), &ctx, op, qkv, cache, Places { buf: &table, at: 0, rows: &places })
    };
    let plain = RopeOp { rope: &bare, factors: None };
    assert!(store(plain, &xb, 8, 0, 2).is_ok(), "two rows of a head of 8 fit");
    assert!(store(RopeOp { rope: &rp, factors: None }, &xb, 8, 0, 2).is_err(), "factors not uploaded");
    assert!(store(RopeOp { rope: &bare, factors: Some(&xb) }, &xb, 8, 0, 2).is_err(), "factors the rotation lacks");
    assert!(store(plain, &other, 8, 0, 2).is_err(), "keys in another buffer");
    assert!(store(plain, &xb, 8, 1, 2).is_err(), "rows past the cache's end");
    assert!(store(plain, &xb, 8, 0, 1).is_err(), "a place per row");
}

#[test]
fn glu_both_activations_and_bias_rows() {
    let ctx = ctx();
    let mut r = rng("glu");
    for act in [Activation::Silu, Activation::GeluTanh] {
        let n = 1000;
        let g = random_vec(&mut r, n, 6.0);
        let u = random_vec(&mut r, n, 2.0);
        let (gb, ub) = (f32_buf(&ctx, &g), f32_buf(&ctx, &u));
        let mut rec = Recorder::new(&ctx);
        glu(&mut rec, &ctx, act, &gb, &ub, n).unwrap();
        rec.submit();
        assert_close(&format!("glu {act:?}"), &read_f32(&ctx, &gb, 0, n).unwrap(), &reference::glu(&g, &u, act), 1e-4);
    }
    let (rows, n, stride, off) = (5, 12, 20, 3);
    let a = random_vec(&mut r, off + rows * stride, 1.0);
    let bias = random_vec(&mut r, n, 1.0);
    let (ab, bb) = (f32_buf(&ctx, &a), f32_buf(&ctx, &bias));
    let mut rec = Recorder::new(&ctx);
    add_rows(&mut rec, &ctx, View { offset: off, stride, ..View::new(&ab, rows, n) }, &bb).unwrap();
    rec.submit();
    let mut want = a.clone();
    for row in 0..rows {
        for i in 0..n {
            want[off + row * stride + i] += bias[i];
        }
    }
    assert_close("add_rows", &read_f32(&ctx, &ab, 0, a.len()).unwrap(), &want, 1e-6);
}

#[test]
fn argmax_rows_with_ties() {
    let ctx = ctx();
    let mut r = rng("argmax");
    let (rows, n) = (4, 49_153);
    let mut x = random_vec(&mut r, rows * n, 10.0);
    // Row 1: two equal maxima, the first must win. Row 2: the maximum at the last index.
    x[n + 17] = 50.0;
    x[n + 40_000] = 50.0;
    x[3 * n - 1] = 60.0;
    let xb = f32_buf(&ctx, &x);
    let out = storage_buffer_zeroed(&ctx, "out", (rows * OUT_WORDS * 4) as u64);
    let mut rec = Recorder::new(&ctx);
    argmax(&mut rec, &ctx, View::new(&xb, rows, n), &out).unwrap();
    rec.submit();
    let all = read_u32(&ctx, &out, 0, rows * OUT_WORDS).unwrap();
    let got: Vec<u32> = (0..rows).map(|r| all[r * OUT_WORDS]).collect();
    let want: Vec<u32> = x.chunks(n).map(|row| reference::argmax(row) as u32).collect();
    assert_eq!(got, want);
    assert_eq!(got[1], 17);
    assert_eq!(got[2], n as u32 - 1);
}

#[test]
fn gpu_sampling_follows_the_host_rule() {
    use agentflux::decode::{draw, SamplerConfig};
    use agentflux::kernels::sample::{sample, K_MAX};
    let ctx = ctx();
    let mut r = rng("sample");
    let n = 5003;
    let x = random_vec(&mut r, n, 4.0);
    let xb = f32_buf(&ctx, &x);
    let out = storage_buffer_zeroed(&ctx, "out", (OUT_WORDS * 4) as u64);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    let mut boundary = 0;
    for (k, temperature, top_p) in [(1, 1.0, 1.0), (40, 0.8, 0.95), (64, 1.5, 0.5), (7, 0.3, 1.0)] {
        for _ in 0..10 {
            let u = r.next_f32();
            let mut rec = Recorder::new(&ctx);
            let cfg = SamplerConfig { temperature, top_k: k, top_p, seed: 0 };
            sample(&mut rec, &ctx, View::new(&xb, 1, n), &cfg, u, &out).unwrap();
            rec.submit();
            let got = read_u32(&ctx, &out, 0, OUT_WORDS).unwrap();
            let ids: Vec<usize> = got[1..1 + k].iter().map(|&i| i as usize).collect();
            assert_eq!(ids, order[..k], "top-{k} candidates");
            let probs: Vec<f32> = got[1 + K_MAX..1 + K_MAX + k].iter().map(|&b| f32::from_bits(b)).collect();
            let e: Vec<f64> = ids.iter().map(|&i| (((x[i] - x[ids[0]]) / temperature) as f64).exp()).collect();
            let want: Vec<f32> = e.iter().map(|v| (v / e.iter().sum::<f64>()) as f32).collect();
            assert_close("candidate probabilities", &probs, &want, 1e-5);
            let host = draw(&x, &cfg, u);
            if got[0] != host {
                // Only a u within rounding of a cumulative-probability boundary may differ.
                boundary += 1;
            }
        }
    }
    assert!(boundary <= 1, "{boundary} of 40 draws differ from the host rule");
}

/// Multi-LoRA, fused and as separate dispatches: rows of two adapters (ranks 3 and 8) and rows
/// with none in one batch, on a matrix split across bindings too; against
/// y = W·x + scale·B·(A·x) per row from the reference.
#[test]
fn multi_lora_matmul_mixes_adapters_per_row() {
    use agentflux::kernels::lora::{lora_expand, lora_shrink};
    use agentflux::kernels::matmul::{LoraIo, LoraSlot};
    let big = ctx();
    let small = GpuContext::new(&GpuOptions { max_binding_bytes: Some(2048), ..Default::default() }).unwrap();
    let mut r = rng("multi_lora");
    let (rows, cols) = (67, 64);
    let ranks = [3usize, 8];
    let scales = [2.0f32, 0.5];
    let mut a_pack = Vec::new();
    let mut b_pack = Vec::new();
    let mut slots = Vec::new();
    for (&rank, &scale) in ranks.iter().zip(&scales) {
        slots.push(LoraSlot { a_offset: a_pack.len(), b_offset: b_pack.len(), rank, scale });
        a_pack.extend(random_vec(&mut r, rank * cols, 0.5));
        b_pack.extend(random_vec(&mut r, rows * rank, 0.5));
    }
    let gpu = common::kernel_families().swap_remove(1).1;
    for (ctx, row_slot) in [
        (&*big, vec![0i32, -1, 1, 0, 1]),
        (&*big, vec![1]),
        (&small, vec![-1, 1, 0]),
        (&small, vec![0]),
        (&*gpu, vec![1, -1, 0, 0, 1, 1]),
        (&*gpu, vec![0]),
    ] {
        let m = row_slot.len();
        let bytes = random_matrix_bytes(&mut r, BlockFormat::Q4_1, rows, cols, 1.0);
        let w = WeightMatrix::upload(ctx, "w", BlockFormat::Q4_1, rows, cols, &bytes).unwrap();
        let x = random_vec(&mut r, m * cols, 1.0);
        let (xb, ab, bb) = (f32_buf(ctx, &x), f32_buf(ctx, &a_pack), f32_buf(ctx, &b_pack));
        let sb = storage_buffer(ctx, "row_slot", bytemuck::cast_slice(&row_slot));
        let u = storage_buffer_zeroed(ctx, "u", (m * 8 * 4) as u64);
        let y = storage_buffer_zeroed(ctx, "y", (m * rows * 4) as u64);
        let lora = LoraIo { a_pack: &ab, b_pack: &bb, row_slot: &sb, u: &u, max_rank: 8, slots: &slots, u_splits: None };
        let io = MatmulIo { lora: Some(lora), ..MatmulIo::dense(&xb, &y, &w, m) };
        let mut rec = Recorder::new(ctx);
        lora_shrink(&mut rec, ctx, &io).unwrap();
        matmul(&mut rec, ctx, &w, io).unwrap();
        rec.submit();
        let got = read_f32(ctx, &y, 0, m * rows).unwrap();
        let y2 = storage_buffer_zeroed(ctx, "y2", (m * rows * 4) as u64);
        let io2 = MatmulIo { y: View::new(&y2, m, rows), ..io };
        let mut rec = Recorder::new(ctx);
        matmul(&mut rec, ctx, &w, MatmulIo { lora: None, ..io2 }).unwrap();
        lora_shrink(&mut rec, ctx, &io2).unwrap();
        lora_expand(&mut rec, ctx, &io2).unwrap();
        rec.submit();
        let separate = read_f32(ctx, &y2, 0, m * rows).unwrap();
        let wf = dequant(BlockFormat::Q4_1, &bytes, rows, cols);
        let mut want = reference::matmul(&wf, &x, rows, cols);
        for (t, &s) in row_slot.iter().enumerate() {
            if s < 0 {
                continue;
            }
            let sl = slots[s as usize];
            let xa = &x[t * cols..][..cols];
            let ua = reference::matmul(&a_pack[sl.a_offset..][..sl.rank * cols], xa, sl.rank, cols);
            let d = reference::matmul(&b_pack[sl.b_offset..][..rows * sl.rank], &ua, rows, sl.rank);
            for n in 0..rows {
                want[t * rows + n] += sl.scale * d[n];
            }
        }
        assert_close(&format!("multi-LoRA rows {row_slot:?}, {} parts, {:?} kernels", w.parts.len(), ctx.class), &got, &want, 2e-4);
        assert_close(&format!("separate multi-LoRA rows {row_slot:?}, {} parts", w.parts.len()), &separate, &want, 2e-4);
    }
}

/// The gated product (gate and up projections and the GLU in one dispatch) against the
/// reference `glu(W_gate·x + Δgate, W_up·x + Δup)`, in every kernel family, decode and prefill
/// shapes, both activations, with adapters on the gate, on up, on both and on neither.
#[test]
fn gated_matmul_matches_glu_of_two_products() {
    use agentflux::kernels::lora::lora_shrink;
    use agentflux::kernels::matmul::{matmul_gated, GatedUp, LoraIo, LoraSlot};
    let mut r = rng("gated_matmul");
    let rank = 4;
    for (family, ctx) in common::kernel_families() {
        for (i, format) in [BlockFormat::Q4_1, BlockFormat::Q6_K, BlockFormat::Q4_0, BlockFormat::F16].into_iter().enumerate() {
            let k = format.block_len().max(32);
            let act = if i % 2 == 0 { Activation::Silu } else { Activation::GeluTanh };
            for (rows, cols, m) in [(37, k * 3, 1), (67, k * 2, 5)] {
                let (gb, ub) = (random_matrix_bytes(&mut r, format, rows, cols, 1.0), random_matrix_bytes(&mut r, format, rows, cols, 1.0));
                let [gate, up] = WeightMatrix::upload_group(&ctx, ["gate", "up"], [format; 2], [rows; 2], cols, [&gb, &ub]).unwrap();
                assert!(gate.pair_offset(&up).is_some(), "{format:?}: gate and up share a buffer");
                let x = random_vec(&mut r, m * cols, 1.0);
                // One adapter per projection; the rows alternate between it and none.
                let (a_pack, b_pack) = (random_vec(&mut r, 2 * rank * cols, 0.5), random_vec(&mut r, 2 * rows * rank, 0.5));
                let slot = |j: usize| [LoraSlot { a_offset: j * rank * cols, b_offset: j * rows * rank, rank, scale: 1.5 }];
                let (gate_slot, up_slot) = (slot(0), slot(1));
                let row_slot: Vec<i32> = (0..m).map(|t| if t % 2 == 0 { 0 } else { -1 }).collect();
                let (xb, ab, bb) = (f32_buf(&ctx, &x), f32_buf(&ctx, &a_pack), f32_buf(&ctx, &b_pack));
                let sb = storage_buffer(&ctx, "row_slot", bytemuck::cast_slice(&row_slot));
                let (ug, uu) =
                    (storage_buffer_zeroed(&ctx, "u", (m * rank * 4) as u64), storage_buffer_zeroed(&ctx, "u_up", (m * rank * 4) as u64));
                let wf = |b: &[u8]| dequant(format, b, rows, cols);
                let (wg, wu) = (wf(&gb), wf(&ub));
                let (qs_bytes, meta_bytes) = Q8Rows::bytes(m, cols);
                let (qs, meta) = (storage_buffer_zeroed(&ctx, "qs", qs_bytes), storage_buffer_zeroed(&ctx, "meta", meta_bytes));
                // The last also over 8-bit activations (the adapters' shrink still reads f32).
                for (on_gate, on_up, int8) in
                    [(false, false, false), (true, false, false), (false, true, false), (true, true, false), (true, true, true)]
                {
                    let lora = |on: bool, slots, u| {
                        on.then_some(LoraIo { a_pack: &ab, b_pack: &bb, row_slot: &sb, u, max_rank: rank, slots, u_splits: None })
                    };
                    let (gl, ul) = (lora(on_gate, &gate_slot[..], &ug), lora(on_up, &up_slot[..], &uu));
                    let y = storage_buffer_zeroed(&ctx, "y", (m * rows * 4) as u64);
                    let q8 = int8.then_some(Q8Rows { qs: &qs, meta: &meta });
                    let io = MatmulIo { lora: gl, q8, ..MatmulIo::dense(&xb, &y, &gate, m) };
                    let mut rec = Recorder::new(&ctx);
                    if let Some(q8) = q8 {
                        quantize_q8(&mut rec, &ctx, io.x, None, q8).unwrap();
                    }
                    lora_shrink(&mut rec, &ctx, &io).unwrap();
                    lora_shrink(&mut rec, &ctx, &MatmulIo { lora: ul, ..io }).unwrap();
                    matmul_gated(&mut rec, &ctx, &gate, GatedUp { up: &up, act, lora: ul }, io).unwrap();
                    rec.submit();
                    let got = read_f32(&ctx, &y, 0, m * rows).unwrap();
                    let xw = if int8 && format.has_integer_form() { reference::quantize_q8(&x) } else { x.clone() };
                    let (mut g, mut u) = (reference::matmul(&wg, &xw, rows, cols), reference::matmul(&wu, &xw, rows, cols));
                    for (t, &sl) in row_slot.iter().enumerate() {
                        for (on, j, out) in [(on_gate, 0, &mut g), (on_up, 1, &mut u)] {
                            if !on || sl < 0 {
                                continue;
                            }
                            let s = slot(j)[0];
                            let ua = reference::matmul(&a_pack[s.a_offset..][..rank * cols], &x[t * cols..][..cols], rank, cols);
                            let d = reference::matmul(&b_pack[s.b_offset..][..rows * rank], &ua, rows, rank);
                            for n in 0..rows {
                                out[t * rows + n] += s.scale * d[n];
                            }
                        }
                    }
                    let want = reference::glu(&g, &u, act);
                    assert_close(
                        &format!("gated {format:?} {act:?} {rows}x{cols} m={m} lora gate {on_gate} up {on_up} int8 {int8}, {family}"),
                        &got,
                        &want,
                        2e-4,
                    );
                }
            }
        }
        // Matrices in separate buffers (different formats) cannot be fused: refused, not wrong.
        let (cols, rows) = (64, 8);
        let gb = random_matrix_bytes(&mut r, BlockFormat::Q8_0, rows, cols, 1.0);
        let ub = random_matrix_bytes(&mut r, BlockFormat::Q4_1, rows, cols, 1.0);
        let [gate, up] =
            WeightMatrix::upload_group(&ctx, ["gate", "up"], [BlockFormat::Q8_0, BlockFormat::Q4_1], [rows; 2], cols, [&gb, &ub]).unwrap();
        assert!(gate.pair_offset(&up).is_none());
        let (xb, y) = (f32_buf(&ctx, &random_vec(&mut r, cols, 1.0)), storage_buffer_zeroed(&ctx, "y", (rows * 4) as u64));
        let err = matmul_gated(
            &mut Recorder::new(&ctx),
            &ctx,
            &gate,
            GatedUp { up: &up, act: Activation::Silu, lora: None },
            MatmulIo::dense(&xb, &y, &gate, 1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("share the gate's buffer"), "{err}");
    }
}

/// Blocks of every quantized format decoded by someone else's code: random blocks with the
/// values gguf-py (llama.cpp's Python package) dequantizes them to (tests/fixtures/quants.json,
/// made by tools/make-quant-fixtures). The host decoder gives those values, and the GPU product
/// over the blocks equals the reference product over them, in both kernel families.
#[test]
fn block_formats_decode_as_gguf_py_does() {
    let fixtures: serde_json::Value = serde_json::from_str(include_str!("fixtures/quants.json")).unwrap();
    let mut r = rng("quant-fixtures");
    let mut seen = Vec::new();
    for f in fixtures["formats"].as_array().unwrap() {
        let name = f["format"].as_str().unwrap();
        let format = BlockFormat::ALL.into_iter().find(|b| b.name() == name).unwrap_or_else(|| panic!("no format {name}"));
        let hex = f["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let want: Vec<f32> = f["values_f32_bits"].as_array().unwrap().iter().map(|v| f32::from_bits(v.as_u64().unwrap() as u32)).collect();
        let host = dequant(format, &bytes, 1, want.len());
        assert_close(&format!("{name}: host decoder against gguf-py"), &host, &want, 1e-6);
        // The blocks as a matrix of 2 rows (or 1 when they hold one row's worth), times random x.
        let rows = if want.len() % (2 * format.block_len()) == 0 { 2 } else { 1 };
        let cols = want.len() / rows;
        for (family, ctx) in common::kernel_families() {
            let w = WeightMatrix::upload(&ctx, name, format, rows, cols, &bytes).unwrap();
            let x = random_vec(&mut r, 3 * cols, 1.0);
            let (xb, yb) = (f32_buf(&ctx, &x), storage_buffer_zeroed(&ctx, "y", (3 * rows * 4) as u64));
            let mut rec = Recorder::new(&ctx);
            matmul(&mut rec, &ctx, &w, MatmulIo::dense(&xb, &yb, &w, 3)).unwrap();
            rec.submit();
            let expect = reference::matmul(&want, &x, rows, cols);
            assert_close(
                &format!("{name}: GPU product ({family}) against gguf-py's values"),
                &read_f32(&ctx, &yb, 0, 3 * rows).unwrap(),
                &expect,
                2e-4,
            );
        }
        seen.push(name.to_string());
    }
    let quantized: Vec<&str> = BlockFormat::ALL.iter().filter(|f| f.block_len() > 1).map(|f| f.name()).collect();
    assert_eq!(seen, quantized, "every quantized format has gguf-py fixtures (tools/make-quant-fixtures)");
}
