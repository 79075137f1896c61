//! Whole-model tests on tiny random GGUF files written by the tests: the GPU forward pass against
//! the f32 reference forward, for every architecture, and the KV cache's invariants.
//!
//! Tolerance: logits within 2e-3 of the largest reference logit — many f32 sums in a different
//! order than the reference's f64 ones, over two layers.

mod common;

use agentflux::gguf::{BlockFormat, GgufFile, MetaValue};
use agentflux::gpu::{GpuContext, GpuOptions};
use agentflux::model::{Logits, Model, Sequence};
use agentflux::reference::{tiny_model, ReferenceModel, TinyModelSpec};
use agentflux::Error;
use common::{assert_close, ctx, rng};

fn write_model(spec: &TinyModelSpec, seed: u64, tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("agentflux-tiny-{}-{}-{tag}.gguf", spec.arch, std::process::id()));
    std::fs::write(&p, tiny_model(spec, seed)).unwrap();
    p
}

/// A tiny random model of `spec`, opened and loaded; the file is removed at once (the map keeps it).
fn load_tiny(spec: &TinyModelSpec, seed: u64, tag: &str) -> (GgufFile, Model) {
    let path = write_model(spec, seed, tag);
    let file = GgufFile::open(&path).unwrap();
    let model = Model::load(ctx(), &file).unwrap();
    std::fs::remove_file(path).ok();
    (file, model)
}

/// A tiny random model of `spec` on a GPU context of its own, whose counters and memory figure
/// no other test's work moves.
fn load_tiny_alone(spec: &TinyModelSpec, seed: u64, tag: &str) -> (std::sync::Arc<GpuContext>, Model) {
    let ctx = std::sync::Arc::new(GpuContext::new(&GpuOptions::default()).unwrap());
    let path = write_model(spec, seed, tag);
    let model = Model::load(ctx.clone(), &GgufFile::open(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).ok();
    (ctx, model)
}

fn random_tokens(r: &mut agentflux::decode::SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
}

/// Checks `spec`'s model against the reference; returns whether its q, k and v projections run as
/// one stacked product.
fn check_arch(spec: &TinyModelSpec, tag: &str) -> bool {
    let mut r = rng(tag);
    let (file, model) = load_tiny(spec, r.next_u64(), tag);
    let reference = ReferenceModel::from_gguf(&file).unwrap();
    let tokens = random_tokens(&mut r, 9, spec.n_vocab);
    let want = reference.forward(&tokens);

    // All positions in one prefill.
    let mut kv = model.new_cache(64).unwrap();
    let got = model.forward(&tokens, &mut kv, Logits::All).unwrap();
    assert_close(&format!("{tag}: prefill logits"), &got, &want, 2e-3);

    // Prefill of 5 then one token at a time: the cache carries the rest.
    let mut kv = model.new_cache(64).unwrap();
    let mut steps = model.forward(&tokens[..5], &mut kv, Logits::All).unwrap();
    for &t in &tokens[5..] {
        steps.extend(model.forward(&[t], &mut kv, Logits::Last).unwrap());
    }
    assert_eq!(kv.len(), tokens.len());
    assert_close(&format!("{tag}: incremental logits"), &steps, &want, 2e-3);

    // Greedy on the GPU picks the reference's argmax of the last position.
    let mut kv = model.new_cache(64).unwrap();
    let id = model.forward_greedy(&tokens, &mut kv).unwrap();
    let last = &want[(tokens.len() - 1) * spec.n_vocab..];
    let best = agentflux::reference::argmax(last);
    let runner_up = last.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, v)| *v).fold(f32::MIN, f32::max);
    if last[best] - runner_up > 1e-3 {
        assert_eq!(id as usize, best, "{tag}: greedy token");
    }
    model.weights.layers.iter().all(|l| l.wqkv.is_some())
}

#[test]
fn llama_matches_reference_for_every_format() {
    for format in BlockFormat::ALL {
        let mut spec = TinyModelSpec::new("llama", format);
        spec.embed_format = BlockFormat::Q8_0;
        let stacked = check_arch(&spec, &format!("llama-{}", format.name()));
        // Q4_1 rows of these shapes end on every binding alignment, so the stacked QKV product
        // is what was checked for it.
        assert!(stacked || format != BlockFormat::Q4_1, "llama-q4_1: q, k, v not stacked");
    }
}

/// Llama 3.1's per-pair frequency factors (`rope_freqs.weight`): the GPU forward equals the
/// reference's, which the factors change (the same weights without them give other logits).
#[test]
fn llama3_rope_factors_match_reference() {
    let mut spec = TinyModelSpec::new("llama", BlockFormat::Q8_0);
    spec.rope_factors = true;
    check_arch(&spec, "llama3-rope-factors");
    let seed = rng("llama3-rope-factors-seed").next_u64();
    let forward = |factors: bool| {
        let spec = TinyModelSpec { rope_factors: factors, ..spec.clone() };
        let reference = ReferenceModel::from_gguf(&common::tiny_gguf(&spec, seed, "rope-factors")).unwrap();
        assert_eq!(reference.config.rope.factors.is_some(), factors);
        reference.forward(&[3, 17, 5, 40, 22, 9, 31, 2])
    };
    let (with, without) = (forward(true), forward(false));
    let diff = with.iter().zip(&without).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-3, "the factors changed the logits by at most {diff}");
}

#[test]
fn qwen2_matches_reference() {
    let mut spec = TinyModelSpec::new("qwen2", BlockFormat::Q4_0);
    spec.untied_output = true;
    check_arch(&spec, "qwen2");
}

/// phi3: q/k/v and gate/up stored fused, split by the loaders; LongRoPE.
#[test]
fn phi3_matches_reference() {
    let stacked = check_arch(&TinyModelSpec::new("phi3", BlockFormat::Q8_0), "phi3");
    assert!(stacked, "phi3: the split q, k, v rows read as one stacked product");
    // LongRoPE with an original context of 8: the 9 tokens and the caches of 64 take the long
    // factors and the attention factor.
    let mut long = TinyModelSpec::new("phi3", BlockFormat::Q8_0);
    long.long_rope = Some(8);
    check_arch(&long, "phi3-longrope");
}

#[test]
fn qwen3_matches_reference() {
    check_arch(&TinyModelSpec::new("qwen3", BlockFormat::Q8_0), "qwen3");
}

#[test]
fn gemma3_matches_reference_with_sliding_window() {
    // 6 layers: 5 sliding-window layers (window 3 < 9 tokens) and one global layer.
    let mut spec = TinyModelSpec::new("gemma3", BlockFormat::Q5_0);
    spec.n_layers = 6;
    spec.n_kv_heads = 1;
    spec.embed_format = BlockFormat::Q8_0;
    check_arch(&spec, "gemma3");
}

#[test]
fn truncate_and_recompute_gives_the_same_logits() {
    let mut r = rng("truncate");
    let spec = TinyModelSpec::new("llama", BlockFormat::Q4_1);
    let (_file, model) = load_tiny(&spec, r.next_u64(), "truncate");
    let a = random_tokens(&mut r, 6, spec.n_vocab);
    let b = random_tokens(&mut r, 3, spec.n_vocab);
    let mut kv = model.new_cache(32).unwrap();
    model.forward(&a, &mut kv, Logits::None).unwrap();
    let first = model.forward(&b, &mut kv, Logits::All).unwrap();
    kv.truncate(a.len());
    let again = model.forward(&b, &mut kv, Logits::All).unwrap();
    assert_eq!(first, again, "recomputing after truncate must be bit-identical");
}

#[test]
fn a_pass_that_only_fills_the_cache_leaves_out_the_last_layers_outputs() {
    let mut r = rng("fill only");
    let spec = TinyModelSpec::new("llama", BlockFormat::Q4_1);
    let (ctx, model) = load_tiny_alone(&spec, r.next_u64(), "fill-only");
    let tokens = random_tokens(&mut r, 6, spec.n_vocab);
    let dispatches = || {
        let (built, reused) = ctx.bind_group_counts();
        built + reused
    };
    let pass = |want| {
        let before = dispatches();
        model.forward(&tokens, &mut model.new_cache(32).unwrap(), want).unwrap();
        dispatches() - before
    };
    let (fill, last) = (pass(Logits::None), pass(Logits::Last));
    // The last token's logits take the LM head; the cache alone leaves out the last layer's
    // attention, output projection and feed-forward block too (the cache it leaves is checked
    // by forked_cache_continues_like_a_fresh_run).
    assert!(last >= fill + 4, "{fill} dispatches to fill the cache, {last} for the last token's logits");
}

#[test]
fn forked_cache_continues_like_a_fresh_run() {
    let mut r = rng("fork");
    let spec = TinyModelSpec::new("qwen3", BlockFormat::Q4_K);
    let (_file, model) = load_tiny(&spec, r.next_u64(), "fork");
    let prefix = random_tokens(&mut r, 7, spec.n_vocab);
    let (a, b) = (random_tokens(&mut r, 3, spec.n_vocab), random_tokens(&mut r, 4, spec.n_vocab));
    let mut kv = model.new_cache(32).unwrap();
    model.forward(&prefix, &mut kv, Logits::None).unwrap();
    let mut fork = kv.fork(model.ctx()).unwrap();
    assert_eq!(fork.len(), prefix.len());
    let got_a = model.forward(&a, &mut kv, Logits::All).unwrap();
    let got_b = model.forward(&b, &mut fork, Logits::All).unwrap();
    for (cont, got) in [(&a, got_a), (&b, got_b)] {
        let full: Vec<u32> = prefix.iter().chain(cont.iter()).copied().collect();
        let mut fresh = model.new_cache(32).unwrap();
        let want = model.forward(&full, &mut fresh, Logits::All).unwrap();
        assert_eq!(got, want[prefix.len() * spec.n_vocab..], "a fork continues bit-identically to a fresh run");
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut r = rng("bad_inputs");
    let spec = TinyModelSpec::new("llama", BlockFormat::Q8_0);
    let (_file, model) = load_tiny(&spec, r.next_u64(), "bad");
    let mut kv = model.new_cache(8).unwrap();
    assert!(matches!(model.forward(&[1000], &mut kv, Logits::Last), Err(Error::BadToken { id: 1000, .. })));
    assert!(matches!(model.forward(&[1; 9], &mut kv, Logits::Last), Err(Error::ContextOverflow { needed: 9, n_ctx: 8 })));
    assert_eq!(kv.len(), 0, "a refused call leaves the cache as it was");

    // A model file whose tensor has the wrong shape names the tensor.
    let mut bytes = tiny_model(&spec, 3);
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4;
    bytes[at..at + 8].copy_from_slice(&32u64.to_le_bytes());
    let p2 = std::env::temp_dir().join(format!("agentflux-badshape-{}.gguf", std::process::id()));
    std::fs::write(&p2, &bytes).unwrap();
    let e = GgufFile::open(&p2).map_err(Error::from).and_then(|f| Model::load(ctx(), &f).map(|_| ())).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight"), "{e}");
    std::fs::remove_file(p2).ok();

    // Position scaling not implemented, and an attention factor that is not a positive number,
    // are refused naming the key.
    for (key, value, says) in [
        ("llama.rope.scaling.type", MetaValue::String("yarn".into()), "'yarn' position scaling is not supported"),
        ("llama.rope.scaling.attn_factor", MetaValue::F32(f32::NAN), "a finite positive number is needed"),
    ] {
        let mut spec = spec.clone();
        spec.extra_meta = vec![(key.to_string(), value)];
        let p3 = std::env::temp_dir().join(format!("agentflux-badrope-{}.gguf", std::process::id()));
        std::fs::write(&p3, tiny_model(&spec, 3)).unwrap();
        let e = GgufFile::open(&p3).map_err(Error::from).and_then(|f| Model::load(ctx(), &f).map(|_| ())).unwrap_err().to_string();
        let named = key.strip_prefix("llama.").unwrap();
        assert!(e.contains(named) && e.contains(says), "{e}");
        std::fs::remove_file(p3).ok();
    }

    // A phi3 file with half of LongRoPE (a tensor or the original context renamed away, same
    // length) is refused naming what is missing.
    let mut phi3 = TinyModelSpec::new("phi3", BlockFormat::Q8_0);
    phi3.long_rope = Some(8);
    for (from, to, says) in [
        ("rope_factors_long.weight", "rope_factors_lonX.weight", "rope_factors_short.weight without rope_factors_long.weight"),
        ("rope_factors_short.weight", "rope_factors_shorX.weight", "rope_factors_long.weight without rope_factors_short.weight"),
        ("scaling.original_context_length", "scaling.original_context_lengtX", "without phi3.rope.scaling.original_context_length"),
    ] {
        let mut bytes = tiny_model(&phi3, 5);
        let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        let p4 = std::env::temp_dir().join(format!("agentflux-halfrope-{}.gguf", std::process::id()));
        std::fs::write(&p4, &bytes).unwrap();
        let e = GgufFile::open(&p4).map_err(Error::from).and_then(|f| Model::load(ctx(), &f).map(|_| ())).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        std::fs::remove_file(p4).ok();
    }
}

/// A token tree scored in one pass gives, at every node, the logits of a plain causal run of the
/// prefix plus the path to that node — for each rope layout and with a sliding window.
#[test]
fn token_tree_equals_each_path_run_alone() {
    for (arch, format) in [("llama", BlockFormat::Q4_0), ("qwen3", BlockFormat::Q8_0), ("gemma3", BlockFormat::Q4_K)] {
        let tag = format!("tree-{arch}");
        let mut r = rng(&tag);
        let mut spec = TinyModelSpec::new(arch, format);
        spec.sliding_window = 6;
        let (_file, model) = load_tiny(&spec, r.next_u64(), &tag);
        let v = spec.n_vocab;
        let prefix = random_tokens(&mut r, 7, v);
        let tok = random_tokens(&mut r, 7, v);
        // Paths: [0 1 2], [0 1 3], [0 4], [5 6]  →  nodes 0..7 with these parents.
        let parents = [-1, 0, 1, 1, 0, -1, 5];
        let paths: [&[usize]; 4] = [&[0, 1, 2], &[0, 1, 3], &[0, 4], &[5, 6]];

        let mut kv = model.new_cache(32).unwrap();
        model.forward(&prefix, &mut kv, Logits::None).unwrap();
        let tree = model.forward_seqs(&mut [Sequence::base(&mut kv, &tok).with_tree(&parents)], Logits::All).unwrap();
        assert_eq!(kv.len(), prefix.len() + tok.len());
        kv.truncate(prefix.len());

        for path in paths {
            let mut kv = model.new_cache(32).unwrap();
            let seq: Vec<u32> = prefix.iter().copied().chain(path.iter().map(|&n| tok[n])).collect();
            let alone = model.forward(&seq, &mut kv, Logits::All).unwrap();
            for (i, &node) in path.iter().enumerate() {
                let row = |all: &[f32], r: usize| all[r * v..(r + 1) * v].to_vec();
                assert_close(&format!("{tag}: node {node} of path {path:?}"), &row(&tree, node), &row(&alone, prefix.len() + i), 1e-4);
            }
        }
        // Malformed trees are refused.
        let mut kv = model.new_cache(32).unwrap();
        let err = model.forward_seqs(&mut [Sequence::base(&mut kv, &tok[..2]).with_tree(&[-1, 1])], Logits::All).unwrap_err();
        assert!(err.to_string().contains("parents must be"), "{err}");
        assert_eq!(kv.len(), 0, "a refused call leaves the cache as it was");
    }
}

/// Bind groups are kept between submissions: once a decode step has run, the next one (new
/// position, new token, the same buffers) builds none, and its logits still match a fresh run
/// (a context of the test's own, so other tests' dispatches do not count).
#[test]
fn decode_steps_reuse_their_bind_groups() {
    let mut r = rng("bind groups");
    let spec = TinyModelSpec::new("llama", BlockFormat::Q4_1);
    let (ctx, model) = load_tiny_alone(&spec, r.next_u64(), "bind-groups");
    let tokens = random_tokens(&mut r, 9, spec.n_vocab);
    let mut kv = model.new_cache(32).unwrap();
    model.forward(&tokens[..6], &mut kv, Logits::None).unwrap();
    model.forward(&tokens[6..7], &mut kv, Logits::Last).unwrap();
    let (built, reused) = ctx.bind_group_counts();
    let mut last = Vec::new();
    for &t in &tokens[7..] {
        last = model.forward(&[t], &mut kv, Logits::Last).unwrap();
    }
    let (built_after, reused_after) = ctx.bind_group_counts();
    assert_eq!(built_after, built, "decode steps after the first built bind groups");
    assert!(reused_after > reused + 20, "{reused} -> {reused_after} reused");
    let mut fresh = model.new_cache(32).unwrap();
    let want = model.forward(&tokens, &mut fresh, Logits::Last).unwrap();
    assert_close("decoded step by step vs one pass", &last, &want, 2e-3);
}

/// Memory reporting: a KV cache's buffers show in the context's GPU figure when allocated and
/// leave it when dropped (a context of the test's own, so other tests' buffers do not count).
#[test]
fn memory_use_counts_a_kv_cache() {
    let mut r = rng("memory");
    let (ctx, model) = load_tiny_alone(&TinyModelSpec::new("llama", BlockFormat::Q8_0), r.next_u64(), "memory");
    let before = ctx.memory_use();
    let gpu = |m: agentflux::gpu::MemoryUse| m.gpu_buffers.expect("wgpu's Vulkan backend counts buffer memory") as f64;
    let n_ctx = 4096;
    let kv = model.new_cache(n_ctx).unwrap();
    let with_kv = ctx.memory_use();
    // Keys and values, f16: 2 bytes per value.
    let expected = (2 * model.config.n_layers * model.config.kv_dim() * 2 * n_ctx) as f64;
    let grown = gpu(with_kv) - gpu(before);
    assert!(grown >= expected && grown < expected * 1.1 + 65536.0, "a cache of {expected} bytes grew the figure by {grown}");
    drop(kv);
    let after = ctx.memory_use();
    assert!(gpu(after) < gpu(before) + expected * 0.1, "dropped: {} bytes, before {}", gpu(after), gpu(before));
    if cfg!(target_os = "linux") {
        assert!(after.host_peak.is_some_and(|b| b > 0), "{after:?}");
    }
}
