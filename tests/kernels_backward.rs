//! The training kernels against the plain-Rust f32 reference on fresh random inputs: the
//! transposed product through a frozen matrix, RMSNorm's, GLU's and RoPE's backward, masked
//! cross-entropy, AdamW, an adapter's backward and attention's. Tolerances as in `kernels.rs`.

mod common;

use agentflux::gguf::BlockFormat;
use agentflux::gpu::{read_f32, storage_buffer, storage_buffer_zeroed, GpuContext, GpuOptions, Recorder, View, WeightMatrix};
use agentflux::hparams::{Activation, Rope, RopeLayout};
use agentflux::kernels::attention::{AttentionShape, CachedLayer};
use agentflux::kernels::norm::RmsNorm;
use agentflux::reference::{self, random_matrix_bytes, random_vec};
use common::{assert_close, ctx, dequant, f16_cache, f32_buf, rng, with_and_without_subgroups};

/// dx = dy·W on the GPU (the gradient through a frozen projection), plain and accumulated,
/// against the reference backward.
fn check_matmul_t(ctx: &GpuContext, format: BlockFormat, rows: usize, cols: usize, m: usize, r: &mut agentflux::decode::SplitMix64) {
    use agentflux::kernels::matmul_t::matmul_t;
    let bytes = random_matrix_bytes(r, format, rows, cols, 1.0);
    let w = WeightMatrix::upload(ctx, "w", format, rows, cols, &bytes).unwrap();
    let (dy, dx0) = (random_vec(r, m * rows, 1.0), random_vec(r, m * cols, 1.0));
    let (dyb, dxb, accb) = (f32_buf(ctx, &dy), storage_buffer_zeroed(ctx, "dx", (m * cols * 4) as u64), f32_buf(ctx, &dx0));
    let mut rec = Recorder::new(ctx);
    matmul_t(&mut rec, ctx, &w, View::new(&dyb, m, rows), View::new(&dxb, m, cols), false).unwrap();
    matmul_t(&mut rec, ctx, &w, View::new(&dyb, m, rows), View::new(&accb, m, cols), true).unwrap();
    rec.submit();
    let want = reference::matmul_backward_x(&dequant(format, &bytes, rows, cols), &dy, rows, cols);
    let what = format!("matmul_t {format:?} {rows}x{cols} m={m} parts={}", w.parts.len());
    assert_close(&what, &read_f32(ctx, &dxb, 0, m * cols).unwrap(), &want, 2e-4);
    let acc: Vec<f32> = want.iter().zip(&dx0).map(|(a, b)| a + b).collect();
    assert_close(&format!("{what} accumulate"), &read_f32(ctx, &accb, 0, m * cols).unwrap(), &acc, 2e-4);
}

/// A matrix split across a small binding limit: every part adds its rows' share.
#[test]
fn transposed_matmul_across_a_small_binding_limit() {
    let small = GpuContext::new(&GpuOptions { max_binding_bytes: Some(4096), ..Default::default() }).unwrap();
    let mut r = rng("matmul_t_split");
    for format in [BlockFormat::Q4_1, BlockFormat::Q6_K] {
        let cols = format.block_len().max(64);
        check_matmul_t(&small, format, 4096 / format.row_bytes(cols) * 3 + 5, cols, 3, &mut r);
    }
}

#[test]
fn transposed_matmul_every_format() {
    let ctx = ctx();
    let mut r = rng("matmul_t");
    for format in BlockFormat::ALL {
        let cols = format.block_len().max(32) * 2;
        // Fewer batch rows than one invocation's tile, and several tiles with a partial last one.
        check_matmul_t(&ctx, format, 37, cols, 3, &mut r);
        check_matmul_t(&ctx, format, 37, cols, 10, &mut r);
    }
    // SmolLM2's 576 columns: 18 column groups, the last workgroup partly past them.
    for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
        check_matmul_t(&ctx, format, 45, 576, 6, &mut r);
    }
}

/// The training kernels against the reference backward operators and optimizer: RMSNorm's
/// gradient (plain and accumulated, offset rows), GLU's for both activations, RoPE's inverse
/// rotation for both layouts, masked cross-entropy with its gradient, and one AdamW step.
#[test]
fn backward_kernels_match_the_reference() {
    use agentflux::kernels::elementwise::glu_backward;
    use agentflux::kernels::loss::cross_entropy;
    use agentflux::kernels::norm::rms_norm_backward;
    use agentflux::kernels::optim::{adamw, AdamTensors};
    use agentflux::kernels::rope::{rope_backward, RopeOp};
    use agentflux::train::{AdamW, Moments};
    let ctx = ctx();
    let mut r = rng("backward-kernels");

    for (rows, n) in [(1, 576), (7, 100), (5, 16)] {
        let (x, w, dy, d0) = (
            random_vec(&mut r, rows * n, 2.0),
            random_vec(&mut r, n, 1.0),
            random_vec(&mut r, rows * n, 1.0),
            random_vec(&mut r, rows * n, 1.0),
        );
        let (xb, wb, dyb, db, eb) = (f32_buf(&ctx, &x), f32_buf(&ctx, &w), f32_buf(&ctx, &dy), f32_buf(&ctx, &d0), f32_buf(&ctx, &d0));
        let (dense, norm) = (|buf| View::new(buf, rows, n), RmsNorm { w: &wb, eps: 1e-5 });
        let mut rec = Recorder::new(&ctx);
        rms_norm_backward(&mut rec, &ctx, norm, dense(&xb), dense(&dyb), dense(&db), false).unwrap();
        rms_norm_backward(&mut rec, &ctx, norm, dense(&xb), dense(&dyb), dense(&eb), true).unwrap();
        rec.submit();
        let want = reference::rms_norm_backward(&x, &w, &dy, n, 1e-5);
        assert_close(&format!("rms_norm_backward {rows}x{n}"), &read_f32(&ctx, &db, 0, rows * n).unwrap(), &want, 1e-5);
        let acc: Vec<f32> = want.iter().zip(&d0).map(|(a, b)| a + b).collect();
        assert_close("rms_norm_backward accumulate", &read_f32(&ctx, &eb, 0, rows * n).unwrap(), &acc, 1e-5);
    }

    for act in [Activation::Silu, Activation::GeluTanh] {
        let n = 1000;
        let (g, u, dy) = (random_vec(&mut r, n, 4.0), random_vec(&mut r, n, 2.0), random_vec(&mut r, n, 1.0));
        let (gb, ub, dyb) = (f32_buf(&ctx, &g), f32_buf(&ctx, &u), f32_buf(&ctx, &dy));
        let mut rec = Recorder::new(&ctx);
        glu_backward(&mut rec, &ctx, act, &gb, &ub, &dyb, n).unwrap();
        rec.submit();
        let (dg, du) = reference::glu_backward(&g, &u, &dy, act);
        assert_close(&format!("glu_backward {act:?} dgate"), &read_f32(&ctx, &gb, 0, n).unwrap(), &dg, 1e-4);
        assert_close(&format!("glu_backward {act:?} dup"), &read_f32(&ctx, &ub, 0, n).unwrap(), &du, 1e-4);
    }

    for layout in [RopeLayout::Normal, RopeLayout::Neox] {
        for (factors, scale) in [(None, 1.0), (Some(vec![1.0, 2.5, 4.0, 8.0]), 1.0), (Some(vec![1.0, 1.7, 3.2, 6.5]), 1.19)] {
            let (t, heads, hd, pos0) = (3, 2, 16, 7);
            let rp = Rope { factors, scale, ..Rope::new(layout, 8, 10000.0) };
            let factors_b = rp.factors.as_ref().map(|v| f32_buf(&ctx, v));
            let dy = random_vec(&mut r, t * heads * hd, 1.0);
            let b = f32_buf(&ctx, &dy);
            let mut rec = Recorder::new(&ctx);
            let op = RopeOp { rope: &rp, factors: factors_b.as_ref() };
            rope_backward(&mut rec, &ctx, op, View::new(&b, t, heads * hd), hd, pos0).unwrap();
            rec.submit();
            let mut want = dy.clone();
            reference::rope_backward(&mut want, heads, hd, &rp, pos0);
            let what = format!("rope_backward {layout:?} factors={} scale {scale}", rp.factors.is_some());
            assert_close(&what, &read_f32(&ctx, &b, 0, dy.len()).unwrap(), &want, 1e-4);
        }
    }

    // The real vocabulary's length, so the strided reduction covers a ragged tail.
    let (rows, n_vocab) = (3, 49152 + 17);
    let logits = random_vec(&mut r, rows * n_vocab, 8.0);
    let tokens: Vec<u32> = (0..rows).map(|_| (r.next_u64() % n_vocab as u64) as u32).collect();
    let (lb, tb) = (f32_buf(&ctx, &logits), storage_buffer(&ctx, "tokens", bytemuck::cast_slice(&tokens)));
    let loss_b = storage_buffer_zeroed(&ctx, "loss", (rows * 4) as u64);
    // Two examples in one buffer, each the mean of its own rows: row 0, then rows 1..3.
    let mut rec = Recorder::new(&ctx);
    let all = View::new(&lb, rows, n_vocab);
    cross_entropy(&mut rec, &ctx, all.rows(0, 1), &tb, &loss_b, 1.0).unwrap();
    cross_entropy(&mut rec, &ctx, all.rows(1, rows - 1), &tb, &loss_b, 1.0 / (rows - 1) as f32).unwrap();
    rec.submit();
    let losses = read_f32(&ctx, &loss_b, 0, rows).unwrap();
    let got = read_f32(&ctx, &lb, 0, rows * n_vocab).unwrap();
    for (first, n) in [(0, 1), (1, rows - 1)] {
        let targets: Vec<(usize, u32)> = (0..n).map(|i| (i, tokens[first + i])).collect();
        let (mean, grad) = reference::cross_entropy(&logits[first * n_vocab..(first + n) * n_vocab], n_vocab, &targets);
        let loss = losses[first..first + n].iter().sum::<f32>() / n as f32;
        assert!((loss - mean).abs() < 1e-4 * mean.abs().max(1.0), "rows {first}..: {losses:?} vs mean {mean}");
        assert_close(&format!("cross_entropy gradient, rows {first}.."), &got[first * n_vocab..(first + n) * n_vocab], &grad, 1e-5);
    }

    let n = 777;
    let opt = AdamW { weight_decay: 0.05, ..Default::default() };
    let (w, g1, g2) = (random_vec(&mut r, n, 1.0), random_vec(&mut r, n, 1.0), random_vec(&mut r, n, 1.0));
    let (wb, gb1, gb2) = (f32_buf(&ctx, &w), f32_buf(&ctx, &g1), f32_buf(&ctx, &g2));
    let (mb, vb) = (storage_buffer_zeroed(&ctx, "m", (n * 4) as u64), storage_buffer_zeroed(&ctx, "v", (n * 4) as u64));
    let mut rec = Recorder::new(&ctx);
    adamw(&mut rec, &ctx, &opt, AdamTensors { w: &wb, g: &gb1, m: &mb, v: &vb }, (0, n), 1, 1e-2).unwrap();
    adamw(&mut rec, &ctx, &opt, AdamTensors { w: &wb, g: &gb2, m: &mb, v: &vb }, (0, n), 2, 5e-3).unwrap();
    rec.submit();
    let (mut want, mut st) = (w.clone(), Moments::default());
    opt.step(&mut want, &g1, &mut st, 1, 1e-2);
    opt.step(&mut want, &g2, &mut st, 2, 5e-3);
    assert_close("adamw two steps", &read_f32(&ctx, &wb, 0, n).unwrap(), &want, 1e-5);
    assert_close("adamw second moment", &read_f32(&ctx, &vb, 0, n).unwrap(), &st.v, 1e-5);
}

/// One projection's adapter backward (dB, s·Bᵀdy, dA, dx += Aᵀdu) against the reference formulas
/// the whole-model gradient is built from, with matrices at offsets inside shared buffers and
/// gradient accumulation.
#[test]
fn lora_backward_matches_the_reference() {
    use agentflux::kernels::lora_backward::{lora_backward, LoraBackward};
    let ctx = ctx();
    let mut r = rng("lora-backward");
    for (m, k, n, rank, accumulate) in [(5, 64, 96, 8, false), (3, 32, 40, 3, true), (1, 128, 64, 1, false), (37, 576, 192, 16, true)] {
        let s = 0.75f32;
        let (x, dy, dx0) = (random_vec(&mut r, m * k, 1.0), random_vec(&mut r, m * n, 1.0), random_vec(&mut r, m * k, 1.0));
        let (a, b) = (random_vec(&mut r, rank * k, 0.5), random_vec(&mut r, n * rank, 0.5));
        let (da0, db0) = (random_vec(&mut r, rank * k, 1.0), random_vec(&mut r, n * rank, 1.0));
        // A and B packed one after the other, after 4 unrelated floats; the gradients likewise.
        let pack = |first: &[f32], second: &[f32]| [&[9.0f32; 4][..], first, second].concat();
        let (wb, gb) = (f32_buf(&ctx, &pack(&a, &b)), f32_buf(&ctx, &pack(&da0, &db0)));
        let u = reference::matmul(&a, &x, rank, k);
        let (xb, dyb, dxb, ub) = (f32_buf(&ctx, &x), f32_buf(&ctx, &dy), f32_buf(&ctx, &dx0), f32_buf(&ctx, &u));
        let dub = storage_buffer_zeroed(&ctx, "du", (m * rank * 4) as u64);
        let matrix = |buf, offset, rows, cols| View { offset, ..View::new(buf, rows, cols) };
        let io = LoraBackward {
            x: View::new(&xb, m, k),
            dy: View::new(&dyb, m, n),
            dx: View::new(&dxb, m, k),
            a: matrix(&wb, 4, rank, k),
            b: matrix(&wb, 4 + rank * k, n, rank),
            u: &ub,
            du: &dub,
            da: matrix(&gb, 4, rank, k),
            db: matrix(&gb, 4 + rank * k, n, rank),
            scale: s,
            accumulate,
        };
        let mut rec = Recorder::new(&ctx);
        lora_backward(&mut rec, &ctx, &io).unwrap();
        rec.submit();
        let sdy: Vec<f32> = dy.iter().map(|v| v * s).collect();
        let (mut want_da, mut want_db) = if accumulate { (da0.clone(), db0.clone()) } else { (vec![0.0; rank * k], vec![0.0; n * rank]) };
        reference::matmul_backward_w(&sdy, &u, n, rank, &mut want_db);
        let du = reference::matmul_backward_x(&b, &sdy, n, rank);
        reference::matmul_backward_w(&du, &x, rank, k, &mut want_da);
        let want_dx: Vec<f32> = reference::matmul_backward_x(&a, &du, rank, k).iter().zip(&dx0).map(|(g, d)| g + d).collect();
        let what = format!("lora_backward m={m} k={k} n={n} r={rank} accumulate={accumulate}");
        let g = read_f32(&ctx, &gb, 0, 4 + rank * k + n * rank).unwrap();
        assert_eq!(g[..4], [9.0; 4], "{what}: the floats before the gradients are untouched");
        assert_close(&format!("{what} dA"), &g[4..4 + rank * k], &want_da, 2e-4);
        assert_close(&format!("{what} dB"), &g[4 + rank * k..], &want_db, 2e-4);
        assert_close(&format!("{what} du"), &read_f32(&ctx, &dub, 0, m * rank).unwrap(), &du, 2e-4);
        assert_close(&format!("{what} dx"), &read_f32(&ctx, &dxb, 0, m * k).unwrap(), &want_dx, 2e-4);
        // Rows that the kernels cannot read four floats at a time are refused, not misread.
        let shifted = LoraBackward { x: View { offset: 2, ..io.x }, dx: View { offset: 2, ..io.dx }, ..io };
        let err = lora_backward(&mut Recorder::new(&ctx), &ctx, &shifted).unwrap_err().to_string();
        assert!(err.contains("multiples of 4"), "{what}: {err}");
    }
}

/// Attention gradients for a step's rows over a cache holding a prefix (in a cache slot after
/// another's rows): against the reference backward of the whole sequence with no gradient
/// arriving at the prefix's rows. The rows may start later in their buffers (`at`: one example of
/// a pass holding several); the rows before them are left as they were. With and without
/// subgroups (query rows of a head share their key loads through them, key rows their query
/// loads), rows of one run of lanes and of several.
#[test]
fn attention_backward_over_a_cached_prefix() {
    for (lanes, ctx) in with_and_without_subgroups() {
        attention_backward_against_the_reference(&ctx, &lanes);
    }
}

fn attention_backward_against_the_reference(ctx: &GpuContext, lanes: &str) {
    use agentflux::kernels::attention_backward::{attention_backward, AttentionGrads};
    let mut r = rng("attention-backward");
    let cases = [
        (4, 2, 16, 5, 4, 0, 0),
        (2, 2, 32, 0, 6, 0, 3),
        (6, 3, 8, 7, 5, 4, 0),
        (4, 1, 64, 3, 1, 0, 2),
        (6, 3, 8, 7, 5, 4, 1),
        (9, 3, 64, 30, 19, 0, 2),
        (4, 2, 16, 11, 13, 7, 0),
        (9, 3, 64, 20, 37, 0, 1),
        (6, 2, 16, 9, 40, 13, 3),
    ];
    for (heads, kvh, hd, pos0, t, window, at) in cases {
        let (row, kv_row, n, base) = (heads * hd, kvh * hd, pos0 + t, 2 * pos0 + 1);
        let q_full = random_vec(&mut r, n * row, 1.0);
        let rows = (base + n) * kv_row;
        let ((kb, k), (vb, v)) = (f16_cache(ctx, &random_vec(&mut r, rows, 1.0)), f16_cache(ctx, &random_vec(&mut r, rows, 1.0)));
        let (k, v) = (&k[base * kv_row..], &v[base * kv_row..]);
        let mut dout_full = vec![0f32; pos0 * row];
        dout_full.extend(random_vec(&mut r, t * row, 1.0));
        let scale = 1.0 / (hd as f32).sqrt();
        // `at` rows of another example before this one's, in every buffer.
        let after = |before: f32, width: usize, rows: &[f32]| [vec![before; at * width], rows.to_vec()].concat();
        let (qb, db) = (f32_buf(ctx, &after(0.5, row, &q_full[pos0 * row..])), f32_buf(ctx, &after(0.5, row, &dout_full[pos0 * row..])));
        let filled = |width: usize| f32_buf(ctx, &vec![9.0; (at + t) * width]);
        let (dqb, dkb, dvb, sb) = (filled(row), filled(kv_row), filled(kv_row), filled(heads * 3));
        let shape = AttentionShape { n_heads: heads, n_kv_heads: kvh, head_dim: hd, window, scale };
        let mut rec = Recorder::new(ctx);
        let grads = AttentionGrads { dq: &dqb, dk: &dkb, dv: &dvb, stats: &sb };
        let cache = CachedLayer { k: &kb, v: &vb, base, len: pos0 };
        let (q, dout) = (View::new(&qb, at + t, row).rows(at, t), View::new(&db, at + t, row).rows(at, t));
        attention_backward(&mut rec, ctx, &shape, q, cache, dout, grads).unwrap();
        rec.submit();
        let (dq, dk, dv) = reference::attention_backward(&q_full, k, v, &dout_full, heads, kvh, hd, window, scale);
        let what = format!("attention_backward h={heads}/{kvh} hd={hd} pos0={pos0} t={t} w={window} at row {at}, {lanes}");
        assert_close(&format!("{what} dq"), &read_f32(ctx, &dqb, at * row, t * row).unwrap(), &dq[pos0 * row..], 1e-4);
        assert_close(&format!("{what} dk"), &read_f32(ctx, &dkb, at * kv_row, t * kv_row).unwrap(), &dk[pos0 * kv_row..], 1e-4);
        assert_close(&format!("{what} dv"), &read_f32(ctx, &dvb, at * kv_row, t * kv_row).unwrap(), &dv[pos0 * kv_row..], 1e-4);
        for (b, width) in [(&dqb, row), (&dkb, kv_row), (&dvb, kv_row), (&sb, heads * 3)] {
            assert!(read_f32(ctx, b, 0, at * width).unwrap().iter().all(|&x| x == 9.0), "{what}: rows before the example written");
        }
    }
}
