//! A kernel microbenchmark over the public API: the quantized matrix-vector product (a decode
//! step's projection) of each block format on SmolLM2's feed-forward shape, checked against the
//! f32 reference on random inputs, then timed: GB/s of weight bytes read.
//! (`cargo bench --bench kernels` is the full criterion suite.)
//!
//! ```text
//! cargo run --release --features reference --example matmul_bench
//! ```
use agentflux::decode::SplitMix64;
use agentflux::gguf::{dequantize, BlockFormat};
use agentflux::gpu::{read_f32, storage_buffer, storage_buffer_zeroed, GpuContext, GpuOptions, Recorder, WeightMatrix};
use agentflux::kernels::matmul::{matmul, MatmulIo};
use agentflux::reference::{matmul as reference_matmul, random_matrix_bytes, random_vec};
use std::time::Instant;

const ROWS: usize = 1536;
const COLS: usize = 576;
/// Products per submission, so the cost of a submission does not dominate.
const REPEAT: usize = 16;

fn main() -> agentflux::Result<()> {
    let ctx = GpuContext::new(&GpuOptions::default())?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs());
    let mut rng = SplitMix64(seed);
    println!("{} (seed {seed}): {ROWS}×{COLS} matrix-vector, {REPEAT} per submission", ctx.describe());
    for format in BlockFormat::ALL.into_iter().filter(|f| COLS % f.block_len() == 0) {
        let bytes = random_matrix_bytes(&mut rng, format, ROWS, COLS, 1.0);
        let x = random_vec(&mut rng, COLS, 1.0);
        let w = WeightMatrix::upload(&ctx, "w", format, ROWS, COLS, &bytes)?;
        let (xb, yb) = (storage_buffer(&ctx, "x", bytemuck::cast_slice(&x)), storage_buffer_zeroed(&ctx, "y", (ROWS * 4) as u64));
        let run = |n: usize| -> agentflux::Result<Vec<f32>> {
            let mut rec = Recorder::new(&ctx);
            for _ in 0..n {
                matmul(&mut rec, &ctx, &w, MatmulIo::dense(&xb, &yb, &w, 1))?;
            }
            rec.submit();
            read_f32(&ctx, &yb, 0, ROWS)
        };
        let mut dense = vec![0.0; ROWS * COLS];
        dequantize(format, &bytes, &mut dense);
        let want = reference_matmul(&dense, &x, ROWS, COLS);
        let err = run(1)?.iter().zip(&want).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0f32, f32::max);
        let started = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            run(REPEAT)?;
        }
        let secs = started.elapsed().as_secs_f64() / (reps * REPEAT) as f64;
        println!("{:>5}: {:7.1} µs, {:6.2} GB/s, max relative error {err:.1e}", format.name(), secs * 1e6, w.n_bytes() as f64 / secs / 1e9);
    }
    Ok(())
}
