//! Adapters in the forward pass: the GPU against the f32 reference with random adapters, scale 0
//! equal to the base model, mixed-adapter batches equal to separate runs, the activated-LoRA
//! handoff on one KV cache, standard LoRA's re-prefill, a prompt and a token tree in one pass, and
//! refused adapters.

mod common;

use agentflux::decode::{GenerateOptions, SamplerConfig, SplitMix64};
use agentflux::gguf::{BlockFormat, GgufFile};
use agentflux::lora::{ActiveAdapter, LoraAdapter, LoraLimits, Proj};
use agentflux::model::{Logits, LoraMode, Model, Sequence};
use agentflux::reference::{random_adapter, tiny_model, ReferenceAdapter, ReferenceModel, TinyModelSpec};
use agentflux::session::{Activation, Session};
use common::{assert_close, ctx, rng};

fn load_tiny(spec: &TinyModelSpec, seed: u64, tag: &str, limits: LoraLimits) -> (GgufFile, Model) {
    let p = std::env::temp_dir().join(format!("agentflux-adapters-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&p, tiny_model(spec, seed)).unwrap();
    let file = GgufFile::open(&p).unwrap();
    let model = Model::load_with_limits(ctx(), &file, limits).unwrap();
    std::fs::remove_file(p).ok();
    (file, model)
}

fn llama(seed: u64, tag: &str) -> (GgufFile, Model) {
    load_tiny(&TinyModelSpec::new("llama", BlockFormat::Q4_0), seed, tag, LoraLimits::default())
}

fn tokens(r: &mut SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
}

fn last_row(all: &[f32], vocab: usize) -> Vec<f32> {
    all[all.len() - vocab..].to_vec()
}

#[test]
fn scale_zero_is_the_base_model_exactly() {
    let mut r = rng("scale-zero");
    let (_f, model) = llama(r.next_u64(), "scale0");
    let c = model.config.clone();
    let id = model.add_adapter("all", &random_adapter(&mut r, &c, 8, &Proj::ALL, 0.3)).unwrap();
    let t = tokens(&mut r, 9, c.n_vocab);
    let zero = Some(ActiveAdapter { id, scale: 0.0 });
    let (mut base_kv, mut zero_kv) = (model.new_cache(32).unwrap(), model.new_cache(32).unwrap());
    // Prefill (tiled kernel) then one decode step (single-row kernel).
    let base = model.forward(&t[..8], &mut base_kv, Logits::All).unwrap();
    let zeroed = model.forward_seqs(&mut [Sequence::adapted(&mut zero_kv, &t[..8], zero, 0)], Logits::All).unwrap();
    assert_eq!(base, zeroed, "prefill with scale 0 differs from the base model");
    let base = model.forward(&t[8..], &mut base_kv, Logits::Last).unwrap();
    let zeroed = model.forward_seqs(&mut [Sequence::adapted(&mut zero_kv, &t[8..], zero, 0)], Logits::Last).unwrap();
    assert_eq!(base, zeroed, "decode with scale 0 differs from the base model");
}

/// GPU vs reference with a random adapter active from row `from`, all in one prefill and then
/// prefill + single-token steps (the adapter row offset moves with the cache).
fn check_adapted(spec: &TinyModelSpec, tag: &str, projs: &[Proj]) {
    let mut r = rng(tag);
    let (file, mut model) = load_tiny(spec, r.next_u64(), tag, LoraLimits::default());
    let reference = ReferenceModel::from_gguf(&file).unwrap();
    let c = model.config.clone();
    let adapter = random_adapter(&mut r, &c, 4, projs, 0.2);
    let id = model.add_adapter(tag, &adapter).unwrap();
    let active = ActiveAdapter { id, scale: 0.7 };
    let t = tokens(&mut r, 9, c.n_vocab);
    let from = 3;
    let want = reference.forward_adapted(&t, Some(ReferenceAdapter { adapter: &adapter, multiplier: 0.7, from }));
    let base = reference.forward(&t);
    assert!(want.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-2), "{tag}: the adapter changes nothing; the test would prove nothing");

    let mut kv = model.new_cache(32).unwrap();
    let got = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, Some(active), from)], Logits::All).unwrap();
    assert_close(&format!("{tag}: adapted prefill"), &got, &want, 2e-3);

    let mut kv = model.new_cache(32).unwrap();
    let mut steps = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t[..5], Some(active), from)], Logits::All).unwrap();
    for (i, tok) in t[5..].iter().enumerate() {
        let at = 5 + i;
        steps.extend(
            model
                .forward_seqs(
                    &mut [Sequence::adapted(&mut kv, std::slice::from_ref(tok), Some(active), from.saturating_sub(at))],
                    Logits::Last,
                )
                .unwrap(),
        );
    }
    assert_close(&format!("{tag}: adapted decode steps"), &steps, &want, 2e-3);

    // The unfused path (expand as its own dispatch) computes the same.
    model.set_lora_mode(LoraMode::Separate);
    let mut kv = model.new_cache(32).unwrap();
    let got = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, Some(active), from)], Logits::All).unwrap();
    assert_close(&format!("{tag}: adapted prefill, separate expand"), &got, &want, 2e-3);
}

#[test]
fn adapted_llama_matches_reference_for_every_format() {
    for format in BlockFormat::ALL {
        let mut spec = TinyModelSpec::new("llama", format);
        spec.embed_format = BlockFormat::Q8_0;
        check_adapted(&spec, &format!("lora-llama-{}", format.name()), &Proj::ALL);
    }
}

#[test]
fn adapted_qwen2_qwen3_gemma3_match_reference() {
    let mut qwen2 = TinyModelSpec::new("qwen2", BlockFormat::Q4_K);
    qwen2.untied_output = true;
    check_adapted(&qwen2, "lora-qwen2", &Proj::ALL);
    check_adapted(&TinyModelSpec::new("qwen3", BlockFormat::Q8_0), "lora-qwen3", &[Proj::Q, Proj::K, Proj::V, Proj::O]);
    check_adapted(&TinyModelSpec::new("gemma3", BlockFormat::Q5_0), "lora-gemma3", &[Proj::Gate, Proj::Up, Proj::Down, Proj::Q]);
}

/// Batches mixing adapters equal each sequence run alone: with one adapter that targets only some
/// of q, k, v (each projection its own product), and with adapters of two ranks that target all
/// of them (one stacked product after one stacked shrink).
#[test]
fn a_batch_mixing_adapters_equals_separate_runs() {
    let mut r = rng("mixed-batch");
    let (_f, model) = llama(r.next_u64(), "mixed");
    let c = model.config.clone();
    let a = model.add_adapter("a", &random_adapter(&mut r, &c, 3, &[Proj::Q, Proj::V, Proj::Down], 0.3)).unwrap();
    let b = model.add_adapter("b", &random_adapter(&mut r, &c, 8, &Proj::ALL, 0.3)).unwrap();
    let d = model.add_adapter("d", &random_adapter(&mut r, &c, 5, &Proj::ALL, 0.3)).unwrap();
    let b_half = Some(ActiveAdapter { id: b, scale: 0.5 });
    check_mixed_batch(&model, &[Some(ActiveAdapter::new(a)), None, b_half, Some(ActiveAdapter::new(a))], &mut r);
    check_mixed_batch(&model, &[Some(ActiveAdapter::new(d)), None, b_half, Some(ActiveAdapter::new(d))], &mut r);
}

fn check_mixed_batch(model: &Model, plans: &[Option<ActiveAdapter>], r: &mut SplitMix64) {
    let c = model.config.clone();
    let prompts: Vec<Vec<u32>> = (0..plans.len()).map(|i| tokens(r, 3 + i, c.n_vocab)).collect();
    let next: Vec<Vec<u32>> = (0..plans.len()).map(|i| tokens(r, 1 + i % 2, c.n_vocab)).collect();

    // Each sequence alone: prompt, then its next tokens.
    let mut alone = Vec::new();
    let mut alone_greedy = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        let mut kv = model.new_cache(32).unwrap();
        model.forward_seqs(&mut [Sequence::adapted(&mut kv, &prompts[i], *plan, 0)], Logits::None).unwrap();
        let mut kv2 = kv.fork(model.ctx()).unwrap();
        alone.extend(model.forward_seqs(&mut [Sequence::adapted(&mut kv, &next[i], *plan, 0)], Logits::All).unwrap());
        alone_greedy.push(model.next_token(&mut Sequence::adapted(&mut kv2, &next[i], *plan, 0), agentflux::model::Pick::Greedy).unwrap());
    }

    // All four in one pass per step: prompts (several rows each) together, then next tokens.
    let mut caches: Vec<_> = (0..plans.len()).map(|_| model.new_cache(32).unwrap()).collect();
    let mut seqs: Vec<Sequence> =
        caches.iter_mut().zip(&prompts).zip(plans).map(|((kv, p), plan)| Sequence::adapted(kv, p, *plan, 0)).collect();
    model.forward_seqs(&mut seqs, Logits::None).unwrap();
    let mut forks: Vec<_> = caches.iter().map(|kv| kv.fork(model.ctx()).unwrap()).collect();
    let mut seqs: Vec<Sequence> =
        caches.iter_mut().zip(&next).zip(plans).map(|((kv, t), plan)| Sequence::adapted(kv, t, *plan, 0)).collect();
    let together = model.forward_seqs(&mut seqs, Logits::All).unwrap();
    assert_close("mixed batch logits vs separate runs", &together, &alone, 1e-5);
    let mut seqs: Vec<Sequence> =
        forks.iter_mut().zip(&next).zip(plans).map(|((kv, t), plan)| Sequence::adapted(kv, t, *plan, 0)).collect();
    let together_greedy = model.next_tokens_greedy(&mut seqs).unwrap();
    // Ties aside (random tiny models), the GPU picks agree.
    for (i, (g, a)) in together_greedy.iter().zip(&alone_greedy).enumerate() {
        let off: usize = next[..=i].iter().map(|n| n.len()).sum::<usize>() * c.n_vocab - c.n_vocab;
        let logits = &alone[off..off + c.n_vocab];
        let best = logits[*a as usize];
        let second = logits.iter().enumerate().filter(|(j, _)| *j != *a as usize).map(|(_, v)| *v).fold(f32::MIN, f32::max);
        if best - second > 1e-4 {
            assert_eq!(g, a, "sequence {i}: batched greedy token");
        }
    }
    for kv in &caches {
        assert!(kv.len() > 3, "every cache advanced");
    }
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, sampler: SamplerConfig::default(), stop: vec![], stop_on_repeat: false }
}

#[test]
fn activated_handoff_computes_the_prefix_once() {
    let mut r = rng("handoff");
    let (_f, model) = llama(r.next_u64(), "handoff");
    let c = model.config.clone();
    let mut selector = random_adapter(&mut r, &c, 8, &Proj::ALL, 0.3);
    selector.invocation_tokens = Some(vec![5, 9]);
    let mut args = random_adapter(&mut r, &c, 4, &[Proj::Q, Proj::K, Proj::V, Proj::O], 0.3);
    args.invocation_tokens = Some(vec![7, 3, 7]);
    let (sel, arg) = (
        ActiveAdapter::new(model.add_adapter("selector", &selector).unwrap()),
        ActiveAdapter::new(model.add_adapter("args", &args).unwrap()),
    );

    let prefix = tokens(&mut r, 12, c.n_vocab);
    let with = |tail: &[u32]| prefix.iter().chain(tail).copied().collect::<Vec<u32>>();
    let prompt_a = with(&[5, 9, 11]);
    let prompt_b = with(&[7, 3, 7, 2, 4]);

    let mut s = Session::new(&model, 64).unwrap();
    s.prefill(&prefix, None).unwrap();
    let act_a = s.activation(sel, &prompt_a).unwrap();
    assert_eq!(act_a.from, prefix.len(), "the selector activates at its invocation");
    let logits_a = s.prefill(&prompt_a, Some(act_a)).unwrap();
    let gen_a = s.generate(&prompt_a, Some(act_a), &greedy(3), |_| {}).unwrap();
    // Back to the prefix (a snapshot is a length), then the argument adapter.
    s.truncate(prefix.len());
    let act_b = s.activation(arg, &prompt_b).unwrap();
    let logits_b = s.prefill(&prompt_b, Some(act_b)).unwrap();

    // Fresh runs of each with the same activation position.
    let fresh = |prompt: &[u32], act: Activation| {
        let mut f = Session::new(&model, 64).unwrap();
        let l = f.prefill(prompt, Some(act)).unwrap();
        (l, f.stats())
    };
    let (want_a, fresh_stats) = fresh(&prompt_a, act_a);
    assert_eq!(fresh_stats.prefilled, prompt_a.len());
    assert_close("selector logits after the shared prefix", &logits_a, &want_a, 1e-5);
    let (want_b, _) = fresh(&prompt_b, act_b);
    assert_close("argument logits after the shared prefix", &logits_b, &want_b, 1e-5);
    let mut f = Session::new(&model, 64).unwrap();
    assert_eq!(f.generate(&prompt_a, Some(act_a), &greedy(3), |_| {}).unwrap().tokens, gen_a.tokens, "selector generation");

    let st = s.stats();
    // The prefix once; the selector's 3 tokens (then one recomputed to give logits for
    // generation); the argument adapter's 5.
    assert_eq!(st.prefilled, prefix.len() + 3 + 1 + 5, "{st:?}");
    assert_eq!(st.reused, prefix.len() + (prompt_a.len() - 1) + prefix.len(), "{st:?}");
    assert_eq!(st.decoded, 3);
    assert_eq!(st.recomputed, 0, "an activated adapter never invalidates the base prefix");
}

#[test]
fn standard_lora_recomputes_what_another_adapter_set_cached() {
    let mut r = rng("standard");
    let (_f, model) = llama(r.next_u64(), "standard");
    let c = model.config.clone();
    let id = model.add_adapter("standard", &random_adapter(&mut r, &c, 8, &Proj::ALL, 0.3)).unwrap();
    let prompt = tokens(&mut r, 10, c.n_vocab);
    let more: Vec<u32> = prompt.iter().copied().chain(tokens(&mut r, 2, c.n_vocab)).collect();
    let plan = Activation { adapter: ActiveAdapter::new(id), from: 0 };

    let mut s = Session::new(&model, 64).unwrap();
    s.prefill(&prompt, None).unwrap();
    let got = s.prefill(&more, Some(plan)).unwrap();
    assert_eq!(s.stats().reused, 0, "base-model KV must not serve a standard adapter");
    assert_eq!(s.stats().recomputed, prompt.len());
    assert_eq!(s.stats().prefilled, prompt.len() + more.len());

    let mut fresh = Session::new(&model, 64).unwrap();
    let want = fresh.prefill(&more, Some(plan)).unwrap();
    assert_close("standard LoRA after re-prefill", &got, &want, 1e-5);

    // What reusing the base KV would have produced (llama.cpp server issue 26207): different.
    let mut kv = model.new_cache(64).unwrap();
    model.forward(&prompt, &mut kv, Logits::None).unwrap();
    let wrong = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &more[prompt.len()..], Some(plan.adapter), 0)], Logits::Last).unwrap();
    assert!(wrong.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3), "reuse would have been harmless here; the test proves nothing");

    // The same adapter set again: everything cached is reused.
    let before = s.stats();
    s.prefill(&more, Some(plan)).unwrap();
    assert_eq!(s.stats().reused - before.reused, more.len() - 1);
    assert_eq!(s.stats().recomputed, before.recomputed);
}

fn expect_err(result: agentflux::Result<impl std::fmt::Debug>, needles: &[&str]) {
    let msg = result.expect_err("expected an error").to_string();
    for n in needles {
        assert!(msg.contains(n), "error '{msg}' should mention '{n}'");
    }
}

#[test]
fn refused_adapters_leave_the_others_serving() {
    let mut r = rng("refused");
    let limits = LoraLimits { max_rank: 8, max_adapters: 3, max_bytes: 40_000 };
    let (_f, model) = load_tiny(&TinyModelSpec::new("llama", BlockFormat::Q8_0), r.next_u64(), "refused", limits);
    let c = model.config.clone();
    let good = model.add_adapter("good", &random_adapter(&mut r, &c, 4, &Proj::ALL, 0.3)).unwrap();
    let t = tokens(&mut r, 6, c.n_vocab);
    let run = |id| {
        let mut kv = model.new_cache(16).unwrap();
        model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, Some(ActiveAdapter::new(id)), 0)], Logits::Last).unwrap()
    };
    let before = run(good);

    expect_err(model.load_adapter("/nonexistent/adapter"), &["/nonexistent/adapter", "adapter_config.json"]);
    expect_err(model.add_adapter("big", &random_adapter(&mut r, &c, 16, &[Proj::Q], 0.1)), &["big", "rank 16", "1..=8"]);
    let mut nan = random_adapter(&mut r, &c, 2, &[Proj::V], 0.1);
    nan.targets.values_mut().next().unwrap().b[3] = f32::NAN;
    expect_err(model.add_adapter("nan", &nan), &["nan", "non-finite", "lora_B"]);
    let mut wrong = random_adapter(&mut r, &c, 2, &[Proj::Up], 0.1);
    wrong.targets.values_mut().next().unwrap().a.pop();
    expect_err(model.add_adapter("wrong", &wrong), &["wrong", "up_proj.lora_A", "another base model"]);
    let mut far = random_adapter(&mut r, &c, 2, &[Proj::O], 0.1);
    let w = far.targets.remove(&(0, Proj::O)).unwrap();
    far.targets.insert((c.n_layers + 3, Proj::O), w);
    expect_err(model.add_adapter("far", &far), &["far", "layer", "another base model"]);
    let mut huge = random_adapter(&mut r, &c, 2, &[Proj::Q], 0.1);
    huge.alpha = f32::INFINITY;
    expect_err(model.add_adapter("huge", &huge), &["huge", "lora_alpha inf", "finite"]);
    let mut silent = random_adapter(&mut r, &c, 2, &[Proj::Q], 0.1);
    silent.invocation_tokens = Some(Vec::new());
    expect_err(model.add_adapter("silent", &silent), &["silent", "alora_invocation_tokens is empty"]);
    let mut outside = random_adapter(&mut r, &c, 2, &[Proj::Q], 0.1);
    outside.invocation_tokens = Some(vec![1, c.n_vocab as u32 + 5]);
    expect_err(model.add_adapter("outside", &outside), &["outside", &format!("{}", c.n_vocab + 5), "vocabulary"]);
    // A resident adapter at a scale that is not a number.
    let mut kv = model.new_cache(16).unwrap();
    let nan_scale = Some(ActiveAdapter { id: good, scale: f32::NAN });
    expect_err(model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, nan_scale, 0)], Logits::Last), &["scale NaN", "finite"]);
    // Over the pack budget: the resident rank-4 adapter holds 15 KB of A, this one would add 30 KB.
    expect_err(model.add_adapter("heavy", &random_adapter(&mut r, &c, 8, &Proj::ALL, 0.1)), &["heavy", "max_bytes"]);
    let second = model.add_adapter("second", &random_adapter(&mut r, &c, 2, &[Proj::K], 0.1)).unwrap();
    let third = model.add_adapter("third", &random_adapter(&mut r, &c, 2, &[Proj::K], 0.1)).unwrap();
    expect_err(model.add_adapter("fourth", &random_adapter(&mut r, &c, 2, &[Proj::K], 0.1)), &["fourth", "max_adapters", "3"]);

    // A file-level refusal: an unknown target module in a PEFT directory.
    let dir = std::env::temp_dir().join(format!("agentflux-refused-{}", std::process::id()));
    random_adapter(&mut r, &c, 2, &[Proj::Q], 0.1).save_peft(&dir, &c).unwrap();
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap().replace("q_proj", "qkv_proj");
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    expect_err(model.load_adapter(&dir), &["unknown target module 'qkv_proj'"]);
    std::fs::remove_dir_all(&dir).ok();

    // The good adapter is untouched, also after another one is removed and the packs compacted.
    assert_eq!(run(good), before);
    model.remove_adapter(second).unwrap();
    expect_err(model.remove_adapter(second), &["is not loaded"]);
    let mut kv = model.new_cache(16).unwrap();
    expect_err(
        model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, Some(ActiveAdapter::new(second)), 0)], Logits::Last),
        &["is not loaded"],
    );
    assert_eq!(run(good), before);
    assert_eq!(model.adapters().unwrap().0, vec![good, third]);
}

#[test]
fn packs_grow_and_compact_without_changing_resident_adapters() {
    let mut r = rng("packs");
    let (file, model) = llama(r.next_u64(), "packs");
    let reference = ReferenceModel::from_gguf(&file).unwrap();
    let c = model.config.clone();
    let adapters: Vec<LoraAdapter> = (0..4).map(|i| random_adapter(&mut r, &c, 2 + 2 * i, &Proj::ALL, 0.2)).collect();
    let ids: Vec<_> = adapters.iter().enumerate().map(|(i, a)| model.add_adapter(&format!("a{i}"), a).unwrap()).collect();
    model.remove_adapter(ids[1]).unwrap();
    model.remove_adapter(ids[0]).unwrap();
    let t = tokens(&mut r, 5, c.n_vocab);
    for i in [2, 3] {
        let mut kv = model.new_cache(16).unwrap();
        let got = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, Some(ActiveAdapter::new(ids[i])), 0)], Logits::Last).unwrap();
        let want = reference.forward_adapted(&t, Some(ReferenceAdapter { adapter: &adapters[i], multiplier: 1.0, from: 0 }));
        assert_close(&format!("adapter {i} after compaction"), &got, &last_row(&want, c.n_vocab), 2e-3);
    }
}

/// An adapter laid out by `tools/make-peft-fixture` exactly as PEFT saves one (every config field
/// PEFT writes, PEFT tensor names, f16 and bf16) loads, decodes to the values Python wrote, and
/// gives the reference's logits.
#[test]
fn a_peft_layout_adapter_written_by_python_loads_and_matches_the_reference() {
    let mut r = rng("peft-fixture");
    let (file, model) = llama(r.next_u64(), "peft");
    let reference = ReferenceModel::from_gguf(&file).unwrap();
    let c = model.config.clone();
    for dtype in ["f16", "bf16"] {
        let dir = std::env::temp_dir().join(format!("agentflux-peft-fixture-{dtype}-{}", std::process::id()));
        let dims =
            [("--layers", c.n_layers), ("--hidden", c.d_model), ("--q-dim", c.q_dim()), ("--kv-dim", c.kv_dim()), ("--ffn", c.ffn_dim)];
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/make-peft-fixture"))
            .arg(&dir)
            .args(["--dtype", dtype, "--invocation", "5,9", "--seed"])
            .arg(r.next_u64().to_string());
        for (flag, v) in dims {
            cmd.arg(flag).arg(v.to_string());
        }
        let out = cmd.output().expect("python3 runs tools/make-peft-fixture");
        assert!(out.status.success(), "make-peft-fixture: {}", String::from_utf8_lossy(&out.stderr));

        let adapter = LoraAdapter::load_peft(&dir, &c, &LoraLimits::default()).unwrap();
        assert_eq!(adapter.invocation_tokens, Some(vec![5, 9]));
        let expected: std::collections::BTreeMap<String, Vec<f32>> =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        let down = &adapter.targets[&(0, Proj::Down)];
        assert_eq!(&down.a[..8], &expected["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][..], "{dtype} lora_A values");
        assert_eq!(&down.b[..8], &expected["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][..], "{dtype} lora_B values");

        let id = model.load_adapter(&dir).unwrap();
        let t = tokens(&mut r, 8, c.n_vocab);
        let mut kv = model.new_cache(16).unwrap();
        let got = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &t, Some(ActiveAdapter::new(id)), 2)], Logits::All).unwrap();
        let want = reference.forward_adapted(&t, Some(ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: 2 }));
        assert_close(&format!("PEFT-layout {dtype} adapter"), &got, &want, 2e-3);
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A prompt's uncached tokens and a token tree after it in one pass (`Session::prefill_tree`,
/// what tool selection runs) against a prefill and then the tree, with an activated adapter
/// whose invocation lies inside the new tokens: the same logits at the prompt's end and at every
/// node, the same tokens cached (the prompt's, not the tree's), positions reusable alike.
#[test]
fn prompt_and_tree_in_one_pass_equal_two_passes() {
    let mut r = rng("prefill-tree");
    let (_f, model) = llama(r.next_u64(), "prefill-tree");
    let c = model.config.clone();
    let id = model.add_adapter("selector", &random_adapter(&mut r, &c, 8, &Proj::ALL, 0.3)).unwrap();
    let (cached, new) = (tokens(&mut r, 9, c.n_vocab), tokens(&mut r, 6, c.n_vocab));
    let prompt: Vec<u32> = cached.iter().chain(&new).copied().collect();
    let plan = Some(Activation { adapter: ActiveAdapter::new(id), from: cached.len() + 2 });
    // Two candidates sharing their first token, and a third.
    let tree = tokens(&mut r, 5, c.n_vocab);
    let parents = [-1, 0, 1, 0, -1];
    let (mut one, mut two) = (Session::new(&model, 64).unwrap(), Session::new(&model, 64).unwrap());
    for s in [&mut one, &mut two] {
        s.prefill(&cached, None).unwrap();
    }
    let (root, nodes) = one.prefill_tree(&prompt, plan, &tree, &parents).unwrap();
    let want_root = two.prefill(&prompt, plan).unwrap();
    let want_nodes = two.tree_logits(&tree, &parents, plan).unwrap();
    // The tree's attention visits the keys in another order than a causal pass (as in
    // models.rs's token-tree test): the same within f32 rounding. This random model with a
    // random adapter on every projection scores keys far above a trained model's, which scales
    // that rounding: over 150 drawings the worst error had median 1e-6, 98th percentile 5e-5 and
    // maximum 3.2e-4 (8-bit activations can round a hair's difference a step apart). A node
    // attending to the wrong keys is off by more than 1e-2.
    assert_close("the prompt's last logits", &root, &want_root, 1e-3);
    assert_close("the nodes' logits", &nodes, &want_nodes, 1e-3);
    assert_eq!(one.tokens(), two.tokens());
    assert_eq!(one.tokens(), &prompt[..]);
    assert_eq!(one.cached_prefix(&prompt, plan), prompt.len());
    assert_eq!(one.cached_prefix(&prompt, None), cached.len() + 2, "positions after the invocation belong to the adapter");
}
