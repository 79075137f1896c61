//! `agentflux info`: what a model is and what the GPU offers.

use agentflux::gguf::GgufFile;
use agentflux::gpu::{describe_adapter, list_adapters, GpuContext, GpuOptions};
use agentflux::hparams::ModelConfig;
use agentflux::resolve_model;
use anyhow::Result;
use std::collections::BTreeMap;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// List every device wgpu finds and exit (`--adapters` is its former name).
    #[arg(long, alias = "adapters")]
    gpus: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    if a.gpus {
        for (i, info) in list_adapters().iter().enumerate() {
            println!("{i}: {}", describe_adapter(info));
        }
        return Ok(());
    }
    let path = resolve_model(&a.model)?;
    let file = GgufFile::open(&path)?;
    // An architecture or feature this engine lacks is refused here, with what is missing.
    let config = ModelConfig::from_gguf(&file)?;
    // Tensors in a block format no kernel decodes (IQ2/IQ3, TQ, ...): what would stop the load.
    let undecodable: Vec<String> = file
        .tensors()
        .iter()
        .filter(|t| t.ty.format().is_none())
        .map(|t| format!("{} is {}", t.name.escape_debug(), t.ty.name()))
        .collect();
    let verdict = match undecodable.first() {
        None => "yes".to_string(),
        Some(first) => format!(
            "no: {} tensors in block formats this engine does not decode (first: {first}); supported: {}",
            undecodable.len(),
            agentflux::gguf::BlockFormat::ALL.map(|f| f.name()).join(", ")
        ),
    };
    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in file.tensors() {
        let e = types.entry(format!("{:?}", t.ty)).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
    }
    let ctx = GpuContext::new(gpu)?;
    let l = &ctx.limits;
    // Blocks that are not whole words are padded on upload (gpu::uploaded_bytes).
    let weight_bytes: u64 =
        file.tensors().iter().map(|t| t.ty.format().map_or(t.n_bytes, |f| agentflux::gpu::uploaded_bytes(f, t.n_bytes))).sum();
    let kv_bytes_per_position = agentflux::kv::KvCache::bytes_per_position(&config);
    if a.json {
        let out = serde_json::json!({
            "model": path,
            "file_bytes": file.file_len(),
            "config": config,
            "tensor_types": types.iter().map(|(k, (n, b))| (k.clone(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<BTreeMap<_, _>>(),
            "device": ctx.describe(),
            "class": ctx.class,
            "features": ctx.features,
            "subgroup_sizes": [ctx.info.subgroup_min_size, ctx.info.subgroup_max_size],
            "max_storage_binding": ctx.max_binding(),
            "max_buffer": l.max_buffer_size,
            "max_workgroup_storage": l.max_compute_workgroup_storage_size,
            "gpu_weight_bytes": weight_bytes,
            "kv_bytes_per_position": kv_bytes_per_position,
            "runs": undecodable.is_empty(),
            "undecodable_tensors": undecodable,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model      {} ({:.1} MiB)", path.display(), file.file_len() as f64 / (1 << 20) as f64);
    println!("runs       {verdict}");
    println!(
        "arch       {:?}: {} layers, d_model {}, {} heads ({} kv) × {}, ffn {}, vocab {}, trained ctx {}",
        config.arch,
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.ffn_dim,
        config.n_vocab,
        config.n_ctx_train
    );
    println!(
        "rope       {:?}, base {}, {} dims{}{}",
        config.rope.layout,
        config.rope.base,
        config.rope.rot_dim,
        if config.rope.factors.is_some() { ", per-pair frequency factors (rope_freqs.weight)" } else { "" },
        if config.sliding_window > 0 {
            format!("; sliding window {} (every {}th layer global)", config.sliding_window, config.sliding_pattern)
        } else {
            String::new()
        }
    );
    for (ty, (n, bytes)) in &types {
        println!("tensors    {ty:>5}: {n:>4} tensors, {:.1} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    println!("memory     weights {:.1} MiB on the GPU (quantized tensors stay quantized), KV cache {:.1} MiB per 1024 positions (f16); `agentflux bench` measures a run",
        weight_bytes as f64 / (1 << 20) as f64, (kv_bytes_per_position * 1024) as f64 / (1 << 20) as f64);
    println!("device     {} [{:?}]", ctx.describe(), ctx.class);
    println!(
        "features   shader-f16 {}, subgroups {} ({}–{} lanes), timestamps {}",
        ctx.features.shader_f16, ctx.features.subgroups, ctx.info.subgroup_min_size, ctx.info.subgroup_max_size, ctx.features.timestamps
    );
    println!(
        "limits     storage binding {} MiB, buffer {} MiB, workgroup storage {} KiB, invocations {}",
        ctx.max_binding() >> 20,
        l.max_buffer_size >> 20,
        l.max_compute_workgroup_storage_size >> 10,
        l.max_compute_invocations_per_workgroup
    );
    Ok(())
}
