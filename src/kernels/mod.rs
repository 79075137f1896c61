//! Launchers for the WGSL kernels in `shaders/`: one module per shader file, each with the
//! uniform block the shader declares and a function that records a dispatch.

pub mod attention;
pub mod attention_backward;
pub mod elementwise;
pub mod embed;
pub mod kv_store;
pub mod lora_backward;
pub mod loss;
pub mod matmul;
pub mod matmul_t;
pub mod norm;
pub mod optim;
pub mod rope;
pub mod sample;

use crate::gguf::BlockFormat;
use crate::gpu::ShaderSource;

const DEQUANT_WGSL: &str = include_str!("../../shaders/dequant.wgsl");
const ACTIVATION_WGSL: &str = include_str!("../../shaders/activation.wgsl");
const REDUCE_SUBGROUP_WGSL: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
const REDUCE_WORKGROUP_WGSL: &str = include_str!("../../shaders/reduce_workgroup.wgsl");

/// A kernel that reads weights in `format`: dequant.wgsl plus `file`, with `load32` bound to the
/// format's decoder and `consts` emitted as WGSL `const` lines.
fn weight_reader(name: &str, file: &'static str, entry: &'static str, format: BlockFormat, consts: &[(&str, u32)]) -> ShaderSource {
    let mut prelude = const_lines(consts);
    prelude.push_str(&format!("fn load32(row_byte: u32, k: u32) -> V32 {{ return load32_{}(row_byte, k); }}\n", format.name()));
    ShaderSource { name: format!("{name}_{}", format.name()), prelude, files: vec![DEQUANT_WGSL, file], entry }
}

/// `src` with `reduce_lanes` for a cooperative entry point: subgroup shuffles where `subgroups`
/// (see [`crate::gpu::GpuContext::subgroups_hold`]), else workgroup memory. Kernels of the
/// CPU-backed family take the latter: their entry point never calls it, but the module must
/// define it.
fn with_lane_reduce(mut src: ShaderSource, subgroups: bool) -> ShaderSource {
    if subgroups {
        src.files.insert(0, REDUCE_SUBGROUP_WGSL);
        src.name.push_str("_sg");
    } else {
        src.files.insert(0, REDUCE_WORKGROUP_WGSL);
    }
    src
}

/// A kernel with no weight decoding: `file` alone, entry point `entry`.
fn plain(name: &str, file: &'static str, entry: &'static str) -> ShaderSource {
    specialized(name, file, entry, &[])
}

/// `file` alone with `consts` emitted as WGSL `const` lines (sizes the shader's loops are
/// unrolled over, so CPU-backed drivers keep its arrays in registers).
fn specialized(name: &str, file: &'static str, entry: &'static str, consts: &[(&str, u32)]) -> ShaderSource {
    ShaderSource { name: name.to_string(), prelude: const_lines(consts), files: vec![file], entry }
}

fn const_lines(consts: &[(&str, u32)]) -> String {
    consts.iter().map(|(k, v)| format!("const {k}: u32 = {v}u;\n")).collect()
}

/// Workgroups to cover `n` invocations with groups of `wg`.
fn groups(n: usize, wg: usize) -> u32 {
    n.div_ceil(wg) as u32
}

/// A flat 1-D grid of `total` invocations (64 per group) folded into x·y to respect the
/// 65535-groups-per-dimension limit; shaders recover the index as x + y·65535·64.
fn flat_grid(total: usize) -> [u32; 3] {
    let g = total.div_ceil(64);
    if g <= 65535 {
        [g as u32, 1, 1]
    } else {
        [65535, g.div_ceil(65535) as u32, 1]
    }
}
