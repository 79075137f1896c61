//! Launchers for the WGSL kernels in `shaders/`: one module per shader file, each with the
//! uniform block the shader declares and a function that records a dispatch.

pub mod attention;
pub mod attention_backward;
pub mod elementwise;
pub mod embed;
pub mod kv_store;
pub mod lora;
pub mod lora_backward;
pub mod loss;
pub mod matmul;
pub mod matmul_t;
pub mod norm;
pub mod optim;
pub mod places;
pub mod quantize;
pub mod rope;
pub mod sample;

use crate::gguf::BlockFormat;
use crate::gpu::{GpuContext, ShaderSource, UniformBlock};

const DEQUANT_WGSL: &str = include_str!("../../shaders/dequant.wgsl");
const ACTIVATION_WGSL: &str = include_str!("../../shaders/activation.wgsl");
const REDUCE_SUBGROUP_WGSL: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
const REDUCE_WORKGROUP_WGSL: &str = include_str!("../../shaders/reduce_workgroup.wgsl");
const ROTARY_WGSL: &str = include_str!("../../shaders/rotary.wgsl");
const LANES_SUBGROUP_WGSL: &str = include_str!("../../shaders/lanes_subgroup.wgsl");
const LANES_OWN_WGSL: &str = include_str!("../../shaders/lanes_own.wgsl");

/// A kernel that reads weights in `format`: dequant.wgsl plus `file`, with `load32` bound to the
/// format's decoder and `consts` emitted as WGSL `const` lines.
fn weight_reader<P: UniformBlock>(
    name: &str,
    file: &'static str,
    entry: &'static str,
    format: BlockFormat,
    consts: &[(&str, u32)],
) -> ShaderSource {
    let mut prelude = prelude::<P>(consts);
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

/// `src` with the functions by which lanes walking the same rows share their loads before its own
/// file: `shaders/lanes_subgroup.wgsl` where the device's subgroups hold at least 8 lanes, else
/// `shaders/lanes_own.wgsl` (each lane loads its own).
fn with_lanes(ctx: &GpuContext, mut src: ShaderSource) -> ShaderSource {
    if ctx.subgroups_hold(8) {
        src.files.insert(0, LANES_SUBGROUP_WGSL);
        src.name.push_str("_sg");
    } else {
        src.files.insert(0, LANES_OWN_WGSL);
    }
    src
}

/// A kernel with no weight decoding: `file` alone, entry point `entry`.
fn plain<P: UniformBlock>(name: &str, file: &'static str, entry: &'static str) -> ShaderSource {
    specialized::<P>(name, file, entry, &[])
}

/// A kernel that rotates pairs by RoPE: rotary.wgsl plus `file`, entry point `main`.
fn rotary<P: UniformBlock>(name: &str, file: &'static str) -> ShaderSource {
    ShaderSource { name: name.to_string(), prelude: prelude::<P>(&[]), files: vec![ROTARY_WGSL, file], entry: "main" }
}

/// `file` alone with `consts` emitted as WGSL `const` lines (sizes the shader's loops are
/// unrolled over, so CPU-backed drivers keep its arrays in registers).
fn specialized<P: UniformBlock>(name: &str, file: &'static str, entry: &'static str, consts: &[(&str, u32)]) -> ShaderSource {
    ShaderSource { name: name.to_string(), prelude: prelude::<P>(consts), files: vec![file], entry }
}

/// A kernel's generated lines: its parameter block `P` (declared once, in Rust) and `consts` as
/// WGSL `const` lines.
fn prelude<P: UniformBlock>(consts: &[(&str, u32)]) -> String {
    let mut s = P::wgsl();
    s.extend(consts.iter().map(|(k, v)| format!("const {k}: u32 = {v}u;\n")));
    s
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

#[cfg(test)]
mod tests {
    use crate::gpu::UniformBlock;

    /// Each block's offsets and size as naga (wgpu's shader compiler) lays out the generated
    /// WGSL, against the offsets the recorder writes at: an independent check of the layout.
    fn check<P: UniformBlock>() {
        let src =
            format!("{}@group(0) @binding(0) var<uniform> p: Params;\n@compute @workgroup_size(1) fn main() {{ let q = p; }}\n", P::wgsl());
        let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{}: {e}", P::wgsl()));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {e:?}", P::wgsl()));
        let (_, ty) = module.types.iter().find(|(_, t)| t.name.as_deref() == Some("Params")).expect("a Params type");
        let naga::TypeInner::Struct { members, span } = &ty.inner else { panic!("Params is not a struct") };
        let naga_offsets: Vec<(&str, usize)> = members.iter().map(|m| (m.name.as_deref().unwrap(), m.offset as usize)).collect();
        let (offsets, size) = P::layout();
        assert!(!offsets.is_empty());
        assert_eq!(naga_offsets, offsets, "{}", P::wgsl());
        // Uniform blocks are read in 16-byte units: the recorder writes the span rounded up.
        assert_eq!((*span as usize).div_ceil(16) * 16, size, "{}", P::wgsl());
    }

    #[test]
    fn uniform_blocks_match_naga_layout() {
        check::<super::attention::Params>();
        check::<super::attention_backward::Params>();
        check::<super::elementwise::Params>();
        check::<super::embed::Params>();
        check::<super::kv_store::Params>();
        check::<super::lora::Params>();
        check::<super::lora_backward::Params>();
        check::<super::loss::Params>();
        check::<super::matmul::Params>();
        check::<super::matmul_t::Params>();
        check::<super::norm::Params>();
        check::<super::optim::Params>();
        check::<super::quantize::Params>();
        check::<super::rope::Params>();
        check::<super::sample::Params>();
    }

    /// The parameter blocks exist once, in Rust: no shader declares its own.
    #[test]
    fn no_shader_declares_a_parameter_block() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("struct Params {"), "{} declares its uniform block by hand", path.display());
        }
    }
}
