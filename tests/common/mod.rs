//! Shared test support: one GPU context per test binary, seeds, tolerances.
#![allow(dead_code)]

use agentflux::decode::SplitMix64;
use agentflux::gguf::{dequantize, BlockFormat, GgufFile};
use agentflux::gpu::{storage_buffer, DeviceClass, GpuContext, GpuOptions};
use agentflux::model::Model;
use agentflux::reference::{tiny_model, TinyModelSpec};
use agentflux::text::{ChatTemplate, Tokenizer};
use std::sync::{Arc, OnceLock};

pub mod serve;

/// The GPU every test in this binary uses (lavapipe on CI).
pub fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| Arc::new(GpuContext::new(&GpuOptions::default()).expect("a GPU adapter (install mesa-vulkan-drivers)"))).clone()
}

/// A context on the default device for each kernel family (see `DeviceClass`), with and without
/// subgroups: the CPU-backed family sharing its activations by subgroup shuffles where the device
/// has them and loading them per invocation, the GPU family with subgroup shuffles where the
/// device has them and with its workgroup-memory reduction. Each names itself for assertion
/// messages.
pub fn kernel_families() -> Vec<(String, Arc<GpuContext>)> {
    let make = |kernels, no_subgroups| {
        Arc::new(GpuContext::new(&GpuOptions { kernels: Some(kernels), no_subgroups, ..Default::default() }).expect("a GPU adapter"))
    };
    let (cpu, gpu) = (make(DeviceClass::Cpu, false), make(DeviceClass::Gpu, false));
    let shared =
        if cpu.subgroups_hold(8) { "activations shared by subgroup shuffles" } else { "activations per invocation (no subgroups of 8)" };
    let reduce = if gpu.subgroups_hold(8) { "subgroup shuffles" } else { "workgroup memory (no subgroups of 8)" };
    vec![
        (format!("CPU-backed family, {shared}"), cpu),
        ("CPU-backed family, activations per invocation".to_string(), make(DeviceClass::Cpu, true)),
        (format!("GPU family, {reduce}"), gpu),
        ("GPU family, workgroup memory".to_string(), make(DeviceClass::Gpu, true)),
    ]
}

/// The default device with subgroups (where it has them) and without: kernels whose lanes share
/// loads through subgroups, and the same kernels loading per lane.
pub fn with_and_without_subgroups() -> Vec<(String, Arc<GpuContext>)> {
    let plain = Arc::new(GpuContext::new(&GpuOptions { no_subgroups: true, ..Default::default() }).expect("a GPU adapter"));
    let sg = if ctx().subgroups_hold(8) { "subgroups" } else { "no subgroups of 8 on this device" };
    vec![(sg.to_string(), ctx()), ("no subgroups".to_string(), plain)]
}

/// A fresh seed each run (AGENTFLUX_SEED reproduces one), printed so a failure can be replayed.
pub fn rng(test: &str) -> SplitMix64 {
    let seed = std::env::var("AGENTFLUX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("{test}: seed {seed} (rerun with AGENTFLUX_SEED={seed})");
    SplitMix64(seed)
}

/// Largest |a - b| relative to the largest |b| (and 1), with the index where it happens.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let e = if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() / scale };
        if e > worst.0 {
            worst = (e, i);
        }
    }
    worst
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let (e, i) = max_rel_err(got, want);
    assert!(e <= tol, "{what}: error {e:.3e} > {tol:.1e} at {i} (got {}, want {})", got[i], want[i]);
    assert!(want.iter().any(|v| *v != 0.0), "{what}: reference is all zeros");
}

/// The default model's file, or `None` (skipped) outside CI when it is not cached.
pub fn default_model() -> Option<GgufFile> {
    match agentflux::resolve_model("default") {
        Ok(p) => Some(GgufFile::open(p).unwrap()),
        Err(_) => {
            assert!(std::env::var("CI").is_err(), "the default model is missing under CI: tools/test fetches it");
            eprintln!("SKIPPED: default model not cached (run tools/fetch-model)");
            None
        }
    }
}

/// The real filesystem server's binary, or `None` (skipped) outside CI when not installed.
pub fn filesystem_server() -> Option<std::path::PathBuf> {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/mcp/node_modules/.bin/mcp-server-filesystem");
    if bin.exists() {
        return Some(bin);
    }
    assert!(std::env::var("CI").is_err(), "{} is missing under CI: tools/setup installs it", bin.display());
    eprintln!("SKIPPED: {} not installed (run tools/setup)", bin.display());
    None
}

/// The catalog of two real servers: the filesystem server (`fs`, serving `root`, made here) and
/// the memory server beside it (its file in `root`).
pub fn filesystem_and_memory(fs: &std::path::Path, root: &std::path::Path) -> agentflux::toolcall::Catalog {
    use agentflux::mcp::{McpClient, ServerOptions};
    std::fs::create_dir_all(root).unwrap();
    let memory = fs.with_file_name("mcp-server-memory");
    let mut catalog = agentflux::toolcall::Catalog::default();
    let mem_file = root.join("memory.jsonl");
    for cmd in [format!("{} {}", fs.display(), root.display()), format!("env MEMORY_FILE_PATH={} {}", mem_file.display(), memory.display())]
    {
        let mut c = McpClient::spawn(&cmd, ServerOptions::default()).unwrap();
        catalog.add(&c.name(), c.list_tools().unwrap()).unwrap();
    }
    catalog
}

/// The tiny random model of `spec` and `seed` (`reference::tiny_model`), opened from a temporary
/// file that is removed once mapped; `tag` and a count name the file, so tests running at once in
/// one process keep apart.
pub fn tiny_gguf(spec: &TinyModelSpec, seed: u64, tag: &str) -> GgufFile {
    static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("agentflux-{tag}-{}-{n}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(spec, seed)).unwrap();
    let file = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    file
}

/// A tiny random transformer carrying the real tokenizer and chat template of `f`, written to a
/// temporary GGUF file: the whole pipeline runs in seconds on a CPU-backed device.
pub fn tiny_with_tokenizer(f: &GgufFile, seed: u64, tag: &str) -> std::path::PathBuf {
    let mut spec = TinyModelSpec::new("llama", BlockFormat::Q8_0);
    spec.n_vocab = f.str_array("tokenizer.ggml.tokens").unwrap().len();
    spec.n_ctx = 8192;
    spec.extra_meta = f.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let path = std::env::temp_dir().join(format!("agentflux-tiny-tok-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(&spec, seed)).unwrap();
    path
}

/// A tiny random model with `f`'s tokenizer loaded on the GPU: the model, its tokenizer and chat
/// template, and the file name it was loaded from (what adapter manifests name).
pub fn tiny_pipeline(f: &GgufFile, seed: u64, tag: &str) -> (Model, Arc<Tokenizer>, Option<ChatTemplate>, String) {
    let path = tiny_with_tokenizer(f, seed, tag);
    let file = GgufFile::open(&path).unwrap();
    let model = Model::load(ctx(), &file).unwrap();
    let tok = Arc::new(Tokenizer::from_gguf(&file).unwrap());
    let template = ChatTemplate::from_gguf(&file, &tok).unwrap();
    std::fs::remove_file(&path).ok();
    (model, tok, template, path.file_name().unwrap().to_string_lossy().into_owned())
}

/// Run the `agentflux` binary: whether it succeeded, its stdout and its stderr.
pub fn agentflux(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentflux"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()))
        .output()
        .expect("run agentflux");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `v` in a storage buffer.
pub fn f32_buf(ctx: &GpuContext, v: &[f32]) -> wgpu::Buffer {
    storage_buffer(ctx, "test", bytemuck::cast_slice(v))
}

/// `v` rounded to f16 and packed two per u32 word, lower half first (the KV cache's layout), with
/// the rounded values the reference is given.
pub fn f16_cache(ctx: &GpuContext, v: &[f32]) -> (wgpu::Buffer, Vec<f32>) {
    let halves: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    let words: Vec<u32> = halves.chunks(2).map(|p| p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16).collect();
    (storage_buffer(ctx, "kv", bytemuck::cast_slice(&words)), halves.iter().map(|h| h.to_f32()).collect())
}

/// A weight matrix's values, decoded on the host.
pub fn dequant(format: BlockFormat, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    dequantize(format, bytes, &mut w);
    w
}
