//! Kernel microbenchmarks: the matrix-vector product (decode) of every block format, reported as
//! GB/s of weight bytes read, on whatever GPU wgpu finds.
//!
//! `cargo bench --bench kernels`; `AGENTFLUX_ADAPTER` picks the device.

use agentflux::decode::SplitMix64;
use agentflux::gguf::BlockFormat;
use agentflux::gpu::{read_f32, storage_buffer, storage_buffer_zeroed, GpuContext, GpuOptions, Recorder, WeightMatrix};
use agentflux::kernels::matmul::{matmul, MatmulIo};
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

criterion_group!(benches, bench_matvec);
criterion_main!(benches);
