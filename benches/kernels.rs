//! Kernel microbenchmarks, on whatever GPU wgpu finds: the matrix-vector product (decode) of every
//! block format, reported as GB/s of weight bytes read; a prompt piece through SmolLM2's
//! projection shapes; multi-LoRA on one projection (fused and separate expand, one adapter and a
//! 4-row batch on 4 adapters) against the base product; a feed-forward block's gate and up
//! projections with the GLU, as three dispatches and as the one gated product; the products over
//! f32 and over 8-bit activations (quantized once per product, as the forward pass does) for 1, 4
//! and 64 rows; the cost of a dispatch itself, with its bind group reused from the last
//! submission and built anew; attention over a cached prefix in the shapes of prefill, decode and
//! a training step; and a buffer copy, the device's memory bandwidth that the products' GB/s are
//! read against.
//!
//! `cargo bench --bench kernels [-- matvec|prompt|lora|ffn|activations|attention|dispatch|copy]`;
//! `AGENTFLUX_GPU` picks the device, `AGENTFLUX_KERNELS=gpu|cpu` the kernel family.

use agentflux::decode::SplitMix64;
use agentflux::gguf::BlockFormat;
use agentflux::gpu::{read_f32, storage_buffer, storage_buffer_zeroed, GpuContext, GpuOptions, Recorder, View, WeightMatrix};
use agentflux::hparams::Activation;
use agentflux::kernels::attention::{attention, AttentionShape, KvBuffers};
use agentflux::kernels::elementwise::glu;
use agentflux::kernels::lora::{lora_expand, lora_shrink};
use agentflux::kernels::matmul::{matmul, matmul_gated, GatedUp, LoraIo, LoraSlot, MatmulIo};
use agentflux::kernels::places::{place_sequence, Places};
use agentflux::kernels::quantize::{quantize_q8, Q8Rows};
use agentflux::reference::{random_matrix_bytes, random_vec};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// SmolLM2's FFN shape (1536 × 576) and a square 2048 one.
const SHAPES: [(usize, usize); 2] = [(1536, 576), (2048, 2048)];
/// Products per submission, so per-submit overhead does not dominate.
const REPEAT: usize = 16;

fn bench_matvec(c: &mut Criterion) {
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(1);
    let mut group = c.benchmark_group(format!("matvec/{}", ctx.info.name));
    group.sample_size(10);
    for (rows, cols) in SHAPES {
        for format in BlockFormat::ALL {
            if cols % format.block_len() != 0 {
                continue;
            }
            let bytes = random_matrix_bytes(&mut rng, format, rows, cols, 1.0);
            let w = WeightMatrix::upload(&ctx, "w", format, rows, cols, &bytes).unwrap();
            let x = storage_buffer(&ctx, "x", bytemuck::cast_slice(&random_vec(&mut rng, cols, 1.0)));
            let y = storage_buffer_zeroed(&ctx, "y", (rows * 4) as u64);
            group.throughput(Throughput::Bytes((w.n_bytes() * REPEAT) as u64));
            group.bench_function(format!("{}/{rows}x{cols}", format.name()), |b| {
                b.iter(|| {
                    let mut rec = Recorder::new(&ctx);
                    for _ in 0..REPEAT {
                        matmul(&mut rec, &ctx, &w, MatmulIo::dense(&x, &y, &w, 1)).unwrap();
                    }
                    rec.submit();
                    // Reading one value back waits for the work to finish.
                    read_f32(&ctx, &y, 0, 1).unwrap()
                })
            });
        }
    }
    group.finish();
}

/// f32 against 8-bit activations on SmolLM2's FFN shape (1536 × 576) in the formats of its files
/// (Q4_1 projections, Q8_0 LM head) and Q4_0, for a decode row, a jump-forward chunk and a
/// prefill piece: what `Products::Auto` chooses by (docs/performance.md).
fn bench_activations(c: &mut Criterion) {
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(3);
    let mut group = c.benchmark_group(format!("activations/{}", ctx.info.name));
    group.sample_size(10);
    let (rows, cols) = SHAPES[0];
    for format in [BlockFormat::Q4_1, BlockFormat::Q8_0, BlockFormat::Q4_0] {
        let bytes = random_matrix_bytes(&mut rng, format, rows, cols, 1.0);
        let w = WeightMatrix::upload(&ctx, "w", format, rows, cols, &bytes).unwrap();
        for m in [1, 4, 64] {
            let x = storage_buffer(&ctx, "x", bytemuck::cast_slice(&random_vec(&mut rng, m * cols, 1.0)));
            let y = storage_buffer_zeroed(&ctx, "y", (m * rows * 4) as u64);
            let (qs_bytes, meta_bytes) = Q8Rows::bytes(m, cols);
            let (qs, meta) = (storage_buffer_zeroed(&ctx, "qs", qs_bytes), storage_buffer_zeroed(&ctx, "meta", meta_bytes));
            let q8 = Q8Rows { qs: &qs, meta: &meta };
            group.throughput(Throughput::Bytes((w.n_bytes() * REPEAT) as u64));
            for int8 in [false, true] {
                let kind = if int8 { "int8" } else { "f32" };
                group.bench_function(format!("{}/{rows}x{cols}/m{m}/{kind}", format.name()), |b| {
                    b.iter(|| {
                        let mut rec = Recorder::new(&ctx);
                        let io = MatmulIo::dense(&x, &y, &w, m);
                        for _ in 0..REPEAT {
                            if int8 {
                                quantize_q8(&mut rec, &ctx, io.x, None, q8).unwrap();
                                matmul(&mut rec, &ctx, &w, MatmulIo { q8: Some(q8), ..io }).unwrap();
                            } else {
                                matmul(&mut rec, &ctx, &w, io).unwrap();
                            }
                        }
                        rec.submit();
                        read_f32(&ctx, &y, 0, 1).unwrap()
                    })
                });
            }
        }
    }
    group.finish();
}

/// A prompt piece of 128 rows through SmolLM2's projections in Q4_1 (the key/value, the
/// query/output and the down shapes; rows × columns), reported as weight bytes per second: the
/// prompt tile's height follows the rows (`kernels::matmul`), so these cover each choice.
fn bench_prompt(c: &mut Criterion) {
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(4);
    let mut group = c.benchmark_group(format!("prompt/{}", ctx.info.name));
    group.sample_size(10);
    let m = 128;
    for (rows, cols) in [(192, 576), (576, 576), (576, 1536), (1536, 576)] {
        let format = BlockFormat::Q4_1;
        let bytes = random_matrix_bytes(&mut rng, format, rows, cols, 1.0);
        let w = WeightMatrix::upload(&ctx, "w", format, rows, cols, &bytes).unwrap();
        let x = storage_buffer(&ctx, "x", bytemuck::cast_slice(&random_vec(&mut rng, m * cols, 1.0)));
        let y = storage_buffer_zeroed(&ctx, "y", (m * rows * 4) as u64);
        group.throughput(Throughput::Bytes((w.n_bytes() * REPEAT) as u64));
        group.bench_function(format!("{}/{rows}x{cols}/m{m}", format.name()), |b| {
            b.iter(|| {
                let mut rec = Recorder::new(&ctx);
                for _ in 0..REPEAT {
                    matmul(&mut rec, &ctx, &w, MatmulIo::dense(&x, &y, &w, m)).unwrap();
                }
                rec.submit();
                read_f32(&ctx, &y, 0, 1).unwrap()
            })
        });
    }
    group.finish();
}

/// Multi-LoRA on SmolLM2's FFN up projection (Q4_1, 1536 × 576), rank 8: base only, one adapter
/// fused into the product, the same with the expand as its own dispatch, and 4 rows on 4 adapters.
fn bench_lora(c: &mut Criterion) {
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(2);
    let (rows, cols, rank) = (1536, 576, 8);
    let bytes = random_matrix_bytes(&mut rng, BlockFormat::Q4_1, rows, cols, 1.0);
    let w = WeightMatrix::upload(&ctx, "w", BlockFormat::Q4_1, rows, cols, &bytes).unwrap();
    let slots: Vec<LoraSlot> =
        (0..4).map(|i| LoraSlot { a_offset: i * rank * cols, b_offset: i * rows * rank, rank, scale: 2.0 }).collect();
    let f32s = |v: Vec<f32>| storage_buffer(&ctx, "f32", bytemuck::cast_slice(&v));
    let a_pack = f32s(random_vec(&mut rng, 4 * rank * cols, 0.1));
    let b_pack = f32s(random_vec(&mut rng, 4 * rows * rank, 0.1));
    let mut group = c.benchmark_group(format!("lora/{}/q4_1/{rows}x{cols}/rank{rank}", ctx.info.name));
    group.sample_size(10);
    for (name, row_slot, fused) in [
        ("base", vec![-1], true),
        ("1 adapter fused", vec![0], true),
        ("1 adapter separate", vec![0], false),
        ("4 rows 4 adapters fused", vec![0, 1, 2, 3], true),
        ("4 rows base", vec![-1; 4], true),
    ] {
        let m = row_slot.len();
        let x = f32s(random_vec(&mut rng, m * cols, 1.0));
        let y = storage_buffer_zeroed(&ctx, "y", (m * rows * 4) as u64);
        let u = storage_buffer_zeroed(&ctx, "u", (m * rank * 4) as u64);
        let sb = storage_buffer(&ctx, "row_slot", bytemuck::cast_slice(&row_slot));
        let lora = row_slot.iter().any(|&s| s >= 0).then_some(LoraIo {
            a_pack: &a_pack,
            b_pack: &b_pack,
            row_slot: &sb,
            u: &u,
            max_rank: rank,
            slots: &slots,
            u_splits: None,
        });
        let io = MatmulIo { lora, ..MatmulIo::dense(&x, &y, &w, m) };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut rec = Recorder::new(&ctx);
                for _ in 0..REPEAT {
                    lora_shrink(&mut rec, &ctx, &io).unwrap();
                    if fused {
                        matmul(&mut rec, &ctx, &w, io).unwrap();
                    } else {
                        matmul(&mut rec, &ctx, &w, MatmulIo { lora: None, ..io }).unwrap();
                        lora_expand(&mut rec, &ctx, &io).unwrap();
                    }
                }
                rec.submit();
                read_f32(&ctx, &y, 0, 1).unwrap()
            })
        });
    }
    group.finish();
}

/// SmolLM2's gate and up projections (Q4_1, 1536 × 576 each, one buffer) and the SwiGLU for one
/// token: two products and a GLU dispatch against the gated product.
fn bench_ffn(c: &mut Criterion) {
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(3);
    let (rows, cols) = (1536, 576);
    let (gb, ub) = (
        random_matrix_bytes(&mut rng, BlockFormat::Q4_1, rows, cols, 1.0),
        random_matrix_bytes(&mut rng, BlockFormat::Q4_1, rows, cols, 1.0),
    );
    let [gate, up] = WeightMatrix::upload_group(&ctx, ["gate", "up"], [BlockFormat::Q4_1; 2], [rows; 2], cols, [&gb, &ub]).unwrap();
    let x = storage_buffer(&ctx, "x", bytemuck::cast_slice(&random_vec(&mut rng, cols, 1.0)));
    let (g, u) = (storage_buffer_zeroed(&ctx, "g", (rows * 4) as u64), storage_buffer_zeroed(&ctx, "u", (rows * 4) as u64));
    let mut group = c.benchmark_group(format!("ffn/{}/q4_1/{rows}x{cols}", ctx.info.name));
    group.sample_size(10);
    group.throughput(Throughput::Bytes((2 * gate.n_bytes() * REPEAT) as u64));
    for fused in [false, true] {
        group.bench_function(if fused { "gated product" } else { "gate, up, glu" }, |b| {
            b.iter(|| {
                let mut rec = Recorder::new(&ctx);
                for _ in 0..REPEAT {
                    if fused {
                        matmul_gated(
                            &mut rec,
                            &ctx,
                            &gate,
                            GatedUp { up: &up, act: Activation::Silu, lora: None },
                            MatmulIo::dense(&x, &g, &gate, 1),
                        )
                        .unwrap();
                    } else {
                        matmul(&mut rec, &ctx, &gate, MatmulIo::dense(&x, &g, &gate, 1)).unwrap();
                        matmul(&mut rec, &ctx, &up, MatmulIo::dense(&x, &u, &up, 1)).unwrap();
                        glu(&mut rec, &ctx, Activation::Silu, &g, &u, rows).unwrap();
                    }
                }
                rec.submit();
                read_f32(&ctx, &g, 0, 1).unwrap()
            })
        });
    }
    group.finish();
}

/// Attention in SmolLM2's geometry (9 query heads over 3 KV heads of 64) against an f16 cache:
/// a 256-row prompt piece from position 0 (the row-per-invocation entry), one decode row and a
/// training step's 16 rows after a 1024-position prefix (the split-key entry); throughput in
/// (query row, key) pairs.
fn bench_attention(c: &mut Criterion) {
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(5);
    let shape = AttentionShape { n_heads: 9, n_kv_heads: 3, head_dim: 64, window: 0, scale: 0.125 };
    let (row, kv_row) = (shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim);
    let mut group = c.benchmark_group(format!("attention/{}/9x64 over 3 kv heads", ctx.info.name));
    group.sample_size(10);
    for (name, pos0, rows) in [("prefill", 0, 256), ("decode", 1024, 1), ("train_step", 1024, 16)] {
        let positions = pos0 + rows;
        let words: Vec<u32> = random_vec(&mut rng, positions * kv_row, 1.0)
            .chunks(2)
            .map(|p| half::f16::from_f32(p[0]).to_bits() as u32 | (half::f16::from_f32(p[1]).to_bits() as u32) << 16)
            .collect();
        let (k, v) = (storage_buffer(&ctx, "k", bytemuck::cast_slice(&words)), storage_buffer(&ctx, "v", bytemuck::cast_slice(&words)));
        let q = storage_buffer(&ctx, "q", bytemuck::cast_slice(&random_vec(&mut rng, rows * row, 1.0)));
        let o = storage_buffer_zeroed(&ctx, "o", (rows * row * 4) as u64);
        let places = place_sequence(0, pos0, rows, None).unwrap();
        let table = storage_buffer(&ctx, "places", bytemuck::cast_slice(&places));
        let pairs: usize = places.iter().map(|p| p.pos as usize + 1).sum();
        group.throughput(Throughput::Elements((pairs * REPEAT) as u64));
        group.bench_function(format!("{name}/{rows} rows after {pos0}"), |b| {
            b.iter(|| {
                let mut rec = Recorder::new(&ctx);
                for _ in 0..REPEAT {
                    let at = Places { buf: &table, at: 0, rows: &places };
                    attention(
                        &mut rec,
                        &ctx,
                        &shape,
                        View::new(&q, rows, row),
                        KvBuffers { k: &k, v: &v },
                        at,
                        View::new(&o, rows, row),
                        None,
                    )
                    .unwrap();
                }
                rec.submit();
                read_f32(&ctx, &o, 0, 1).unwrap()
            })
        });
    }
    group.finish();
}

/// A decode step's worth of dispatches of a kernel with almost no work (a GLU over 64 values),
/// so what is timed is the dispatch: with the bind groups the last submission built, and with
/// the cache emptied before each submission (every group built again, as before the cache).
fn bench_dispatch(c: &mut Criterion) {
    const DISPATCHES: usize = 364;
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let mut rng = SplitMix64(4);
    let n = 64;
    let (g, u) = (
        storage_buffer(&ctx, "g", bytemuck::cast_slice(&random_vec(&mut rng, n, 1.0))),
        storage_buffer(&ctx, "u", bytemuck::cast_slice(&random_vec(&mut rng, n, 1.0))),
    );
    let mut group = c.benchmark_group(format!("dispatch/{}/{DISPATCHES} per submission", ctx.info.name));
    group.sample_size(10);
    for reuse in [true, false] {
        group.bench_function(if reuse { "bind groups reused" } else { "bind groups built" }, |b| {
            b.iter(|| {
                if !reuse {
                    ctx.release_bind_groups();
                }
                let mut rec = Recorder::new(&ctx);
                for _ in 0..DISPATCHES {
                    glu(&mut rec, &ctx, Activation::Silu, &g, &u, n).unwrap();
                }
                rec.submit();
                read_f32(&ctx, &g, 0, 1).unwrap()
            })
        });
    }
    group.finish();
}

/// A 64 MiB buffer copied into another, as GB/s of bytes copied: what reading weights at memory
/// speed would give, for the matrix-vector products' GB/s to be read against.
fn bench_copy(c: &mut Criterion) {
    const BYTES: u64 = 64 << 20;
    let ctx = GpuContext::new(&GpuOptions::default()).expect("a GPU adapter");
    let (src, dst) = (storage_buffer_zeroed(&ctx, "src", BYTES), storage_buffer_zeroed(&ctx, "dst", BYTES));
    let mut group = c.benchmark_group(format!("copy/{}", ctx.info.name));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(BYTES * REPEAT as u64));
    group.bench_function("64MiB", |b| {
        b.iter(|| {
            let mut rec = Recorder::new(&ctx);
            for _ in 0..REPEAT {
                rec.copy(&src, 0, &dst, 0, BYTES);
            }
            rec.submit();
            read_f32(&ctx, &dst, 0, 1).unwrap()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_matvec,
    bench_prompt,
    bench_lora,
    bench_ffn,
    bench_activations,
    bench_attention,
    bench_dispatch,
    bench_copy
);
criterion_main!(benches);
