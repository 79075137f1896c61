//! `agentflux bench`: prefill and decode throughput, measured the way llama-bench does
//! (pp: one batch of N prompt tokens into an empty cache; tg: N tokens decoded one at a time),
//! and with `--lora` the cost of adapters and the tokens the shared-KV handoff saves.

use agentflux::decode::GenerateOptions;
use agentflux::gpu::{profile_table, GpuOptions, KernelTime, MemoryUse};
use agentflux::kv::KvCache;
use agentflux::lora::{ActiveAdapter, AdapterId, LoraAdapter, Proj};
use agentflux::model::{Logits, LoraMode, Model, Sequence};
use agentflux::session::{Activation, Session};
use agentflux::{resolve_model, Engine};
use anyhow::Result;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// Prompt tokens for the prefill test.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// Tokens for the decode test.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also measure adapters: decode with one random adapter and with a batch of 4 sequences on
    /// 4 adapters (fused and separate expand), and the activated-LoRA handoff against re-prefill.
    #[arg(long)]
    lora: bool,
    /// Rank of the random adapters (every projection of every layer).
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Also time every kernel (GPU timestamp queries): a table per kernel for one decode step
    /// (averaged over the decode test's tokens) and for the prefill, with GB/s where known.
    #[arg(long)]
    profile: bool,
}

/// Random adapters `--lora` loads (a mixed batch runs one sequence on each).
const LORA_ADAPTERS: usize = 4;

/// One measured row: what, tokens per second, and its ratio to a baseline row.
struct Row {
    test: String,
    tok_s: f64,
    vs: Option<(String, f64)>,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let path = resolve_model(&a.model)?;
    let mut eng = Engine::load(&path, gpu)?;
    let n_vocab = eng.model.config.n_vocab as u64;
    // Deterministic, varied token ids (as llama-bench, the content does not change the cost).
    let tokens: Vec<u32> = (0..a.prefill.max(1) as u64).map(|i| ((i * 7919 + 13) % n_vocab) as u32).collect();
    let reps = a.reps.max(1);
    let mut rows = Vec::new();
    let mut memory = vec![("the model".to_string(), eng.ctx.memory_use())];
    {
        let m = &eng.model;
        let mut kv = m.new_cache((a.prefill + a.decode + 1).max(16))?;
        memory.push((format!("+ a KV cache of {} positions", kv.n_ctx()), eng.ctx.memory_use()));
        // Warm-up: pipelines compile on first use.
        m.forward_greedy(&tokens[..tokens.len().min(8)], &mut kv)?;
        let pp = best_of(reps, || {
            kv.truncate(0);
            let t = Instant::now();
            // Reading the last logits back waits for the GPU to finish.
            m.forward(&tokens, &mut kv, Logits::Last)?;
            Ok(a.prefill as f64 / t.elapsed().as_secs_f64())
        })?;
        rows.push(Row { test: format!("pp{}", a.prefill), tok_s: pp, vs: None });
    }
    let tg = decode_rate(&eng.model, &[None], a.decode, reps)?;
    rows.push(Row { test: format!("tg{}", a.decode), tok_s: tg, vs: None });
    memory.push(("+ the forward pass's scratch, after pp and tg".to_string(), eng.ctx.memory_use()));
    if a.lora {
        lora_rows(&mut eng.model, &a, &tokens, reps, &mut rows)?;
        memory.push((format!("+ {LORA_ADAPTERS} adapters of rank {} and their runs", a.lora_rank), eng.ctx.memory_use()));
    }
    let profiles = if a.profile { profile(&eng, &tokens, a.decode)? } else { Vec::new() };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if a.json {
        let rows: Vec<_> = rows.iter().map(|r| serde_json::json!({"test": r.test, "tok_s": r.tok_s, "vs": r.vs.as_ref().map(|v| &v.0), "ratio": r.vs.as_ref().map(|v| v.1)})).collect();
        let profiles: Vec<_> =
            profiles.iter().map(|(what, per, k)| serde_json::json!({"test": what, "per_token": per, "kernels": k})).collect();
        let memory: Vec<_> = memory
            .iter()
            .map(|(after, m)| serde_json::json!({"after": after, "gpu_buffers": m.gpu_buffers, "host_peak": m.host_peak}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"model": path, "device": eng.ctx.describe(), "rows": rows, "memory": memory, "profiles": profiles})
        );
    } else {
        println!("| engine | model | device | test | tok/s | vs |");
        println!("|---|---|---|---|---:|---|");
        for r in &rows {
            let vs = r.vs.as_ref().map(|(what, x)| format!("{x:.2}× {what}")).unwrap_or_default();
            println!("| agentflux | {name} | {} | {} | {:.1} | {vs} |", eng.ctx.describe(), r.test, r.tok_s);
        }
        print_memory(&memory);
        for (what, per, kernels) in &profiles {
            print_profile(what, *per, kernels);
        }
    }
    Ok(())
}

/// Per-kernel GPU time of a prefill of `tokens` and of `n` decode steps after it.
fn profile(eng: &Engine, tokens: &[u32], n: usize) -> Result<Vec<(String, usize, Vec<KernelTime>)>> {
    let m = &eng.model;
    let mut kv = m.new_cache(tokens.len() + n + 1)?;
    eng.ctx.start_profiling()?;
    m.forward(tokens, &mut kv, Logits::Last)?;
    let prefill = eng.ctx.stop_profiling();
    let mut next = 13;
    eng.ctx.start_profiling()?;
    for _ in 0..n {
        next = m.forward_greedy(&[next], &mut kv)?;
    }
    let decode = eng.ctx.stop_profiling();
    Ok(vec![(format!("pp{}", tokens.len()), tokens.len(), prefill), (format!("tg{n}"), n, decode)])
}

/// Memory in use after each stage of the run.
fn print_memory(memory: &[(String, MemoryUse)]) {
    let mib = |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64));
    println!("\n| memory after | GPU buffers MiB | host peak MiB |\n|---|---:|---:|");
    for (after, m) in memory {
        println!("| {after} | {} | {} |", mib(m.gpu_buffers), mib(m.host_peak));
    }
}

/// The profile of `what`, per token.
fn print_profile(what: &str, per: usize, kernels: &[KernelTime]) {
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    println!(
        "\n{what}: GPU time per token by kernel ({:.2} ms per token in all; each dispatch timed alone)\n",
        total * 1e3 / per.max(1) as f64
    );
    print!("{}", profile_table(kernels, per, "token"));
}

fn best_of(reps: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best = 0f64;
    for _ in 0..reps {
        best = best.max(f()?);
    }
    Ok(best)
}

/// Greedy decoding of one sequence per entry of `plans`, one batch per step, each on its own
/// cache: apart, or in the slots of one pool (one dispatch of attention for all).
struct DecodeBatch {
    plans: Vec<Option<ActiveAdapter>>,
    caches: Vec<KvCache>,
}

impl DecodeBatch {
    fn new(m: &Model, plans: Vec<Option<ActiveAdapter>>, n: usize, pooled: bool) -> Result<Self> {
        let pool = if pooled { Some(m.new_pool(n + 8, plans.len())?) } else { None };
        let cache = || pool.as_ref().map_or_else(|| m.new_cache(n + 8), |p| p.cache());
        let caches = plans.iter().map(|_| cache()).collect::<agentflux::Result<Vec<_>>>()?;
        Ok(Self { plans, caches })
    }

    fn step(&mut self, m: &Model, next: &[u32]) -> Result<Vec<u32>> {
        let mut seqs: Vec<Sequence> = self
            .caches
            .iter_mut()
            .zip(next)
            .zip(&self.plans)
            .map(|((kv, t), p)| Sequence::adapted(kv, std::slice::from_ref(t), *p, 0))
            .collect();
        Ok(m.next_tokens_greedy(&mut seqs)?)
    }

    /// Tokens per second, all sequences together, over `n` steps from empty caches.
    fn rate(&mut self, m: &Model, n: usize) -> Result<f64> {
        self.caches.iter_mut().for_each(|kv| kv.truncate(0));
        let mut next: Vec<u32> = (0..self.plans.len() as u32).map(|i| 13 + i).collect();
        let t = Instant::now();
        for _ in 0..n {
            next = self.step(m, &next)?;
        }
        Ok((n * self.plans.len()) as f64 / t.elapsed().as_secs_f64())
    }
}

fn decode_rate(m: &Model, plans: &[Option<ActiveAdapter>], n: usize, reps: usize) -> Result<f64> {
    let mut batch = DecodeBatch::new(m, plans.to_vec(), n, true)?;
    // Warm-up: pipelines compile on first use.
    batch.step(m, &vec![1; plans.len()])?;
    best_of(reps, || batch.rate(m, n))
}

/// Decode with adapters against base-only decode. The configurations take turns within each
/// repetition, so a slow moment of the machine hits all of them alike; the best of each is kept.
fn lora_rows(m: &mut Model, a: &Args, tokens: &[u32], reps: usize, rows: &mut Vec<Row>) -> Result<()> {
    let mut rng = agentflux::decode::SplitMix64(7);
    let c = m.config.clone();
    let ids = (0..LORA_ADAPTERS)
        .map(|i| {
            m.add_adapter(
                &format!("random-{i}"),
                &LoraAdapter::filled(&c, a.lora_rank, &Proj::ALL, |n| (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * 0.02).collect()),
            )
        })
        .collect::<agentflux::Result<Vec<_>>>()?;
    let one = vec![Some(ActiveAdapter::new(ids[0]))];
    let mixed: Vec<_> = ids.iter().map(|&id| Some(ActiveAdapter::new(id))).collect();
    let (r, n) = (a.lora_rank, LORA_ADAPTERS);
    // (test, plans, mode, caches in one pool, index of the row it is compared with)
    let configs = [
        ("base".to_string(), vec![None], LoraMode::Fused, true, None),
        (format!("rank-{r} adapter, fused"), one.clone(), LoraMode::Fused, true, Some(0)),
        (format!("rank-{r} adapter, separate expand"), one, LoraMode::Separate, true, Some(0)),
        (format!("×{n} sequences, base, caches apart"), vec![None; n], LoraMode::Fused, false, None),
        (format!("×{n} sequences, base, caches in one pool"), vec![None; n], LoraMode::Fused, true, Some(3)),
        (format!("×{n} sequences, {n} rank-{r} adapters, fused"), mixed.clone(), LoraMode::Fused, true, Some(4)),
        (format!("×{n} sequences, {n} rank-{r} adapters, separate expand"), mixed, LoraMode::Separate, true, Some(4)),
    ];
    let mut batches =
        configs.iter().map(|(_, plans, _, pooled, _)| DecodeBatch::new(m, plans.clone(), a.decode, *pooled)).collect::<Result<Vec<_>>>()?;
    let mut best = vec![0f64; configs.len()];
    for rep in 0..reps + 1 {
        for (i, (_, _, mode, _, _)) in configs.iter().enumerate() {
            m.set_lora_mode(*mode);
            // The first round warms up (pipelines compile on first use) and is not counted.
            let rate = batches[i].rate(m, if rep == 0 { 1 } else { a.decode })?;
            if rep > 0 {
                best[i] = best[i].max(rate);
            }
        }
    }
    m.set_lora_mode(LoraMode::Fused);
    for (i, (test, _, _, _, vs)) in configs.iter().enumerate() {
        let vs = vs.map(|j| (configs[j].0.clone(), best[i] / best[j]));
        rows.push(Row { test: format!("tg{}, {test}", a.decode), tok_s: best[i], vs });
    }
    handoff_rows(m, &ids, tokens, reps, rows)
}

/// The decoupled handoff on a prompt of `tokens`: selector (8 tokens) then argument adapter
/// (32 tokens) continuing from one cached prefix, against a fresh prefill for the second stage.
fn handoff_rows(m: &Model, ids: &[AdapterId], prefix: &[u32], reps: usize, rows: &mut Vec<Row>) -> Result<()> {
    // Warm-up of the adapters' prefill pipelines.
    Session::new(m, prefix.len() + 8)?
        .prefill(&prefix[..prefix.len().min(4)], Some(Activation { adapter: ActiveAdapter::new(ids[0]), from: 1 }))?;
    let (sel, arg) = (ActiveAdapter::new(ids[0]), ActiveAdapter::new(ids[1]));
    let with = |tail: &[u32]| prefix.iter().chain(tail).copied().collect::<Vec<u32>>();
    let (prompt_a, prompt_b) = (with(&[1, 2]), with(&[3, 4, 5]));
    let opts = |n| GenerateOptions { max_tokens: n, sampler: Default::default(), stop: vec![], stop_on_repeat: false };
    let mut computed = [0usize; 2];
    let mut rates = [0f64; 2];
    // Taking turns, as in `lora_rows`.
    for (_, (i, reuse)) in (0..reps).flat_map(|r| [(r, (0, true)), (r, (1, false))]) {
        rates[i] = rates[i].max({
            let t = Instant::now();
            let mut s = Session::new(m, prompt_b.len() + 64)?;
            s.prefill(prefix, None)?;
            s.generate(&prompt_a, Some(Activation { adapter: sel, from: prefix.len() }), &opts(8), |_| {})?;
            let first = s.stats();
            let mut second = if reuse {
                s.truncate(prefix.len());
                s
            } else {
                Session::new(m, prompt_b.len() + 64)?
            };
            second.generate(&prompt_b, Some(Activation { adapter: arg, from: prefix.len() }), &opts(32), |_| {})?;
            // A continued session's counters include the first stage.
            let stats = if reuse { second.stats() } else { first + second.stats() };
            computed[i] = stats.prefilled + stats.decoded;
            1.0 / t.elapsed().as_secs_f64()
        });
    }
    // Reported as generated tokens per second over the whole two-stage call.
    let what = format!("handoff: {}-token prefix, then selector 8 + arguments 32 tokens", prefix.len());
    rows.push(Row { test: format!("{what}, re-prefill ({} positions computed)", computed[1]), tok_s: rates[1] * 40.0, vs: None });
    rows.push(Row {
        test: format!("{what}, shared KV ({} positions computed)", computed[0]),
        tok_s: rates[0] * 40.0,
        vs: Some(("re-prefill".into(), rates[0] / rates[1])),
    });
    Ok(())
}
