//! Continuous batching: sessions on several threads whose passes one batcher shares compute what
//! each computes alone — prompts longer than a pass's budget cut into pieces, adapters mixed in
//! one pass, token trees, text generation — and a session whose cache is full fails alone.

mod common;

use agentflux::batch;
use agentflux::decode::{GenerateOptions, SamplerConfig, SplitMix64};
use agentflux::gguf::BlockFormat;
use agentflux::lora::{ActiveAdapter, Proj};
use agentflux::model::{Logits, Model};
use agentflux::reference::{random_adapter, TinyModelSpec};
use agentflux::session::{Activation, Session};
use common::{assert_close, ctx, rng};

/// What one conversation computes: logits after its prompt, after three more tokens fed at once,
/// of a small token tree, and the tokens it then generates.
#[derive(Debug)]
struct Trace {
    prompt: Vec<f32>,
    extended: Vec<f32>,
    tree: Vec<f32>,
    generated: Vec<u32>,
}

struct Script {
    prompt: Vec<u32>,
    more: Vec<u32>,
    tree: Vec<u32>,
    plan: Option<Activation>,
}

impl Script {
    /// The conversation the text is generated after.
    fn whole(&self) -> Vec<u32> {
        self.prompt.iter().chain(&self.more).chain(&self.tree[..1]).copied().collect()
    }
}

fn run(session: &mut Session, s: &Script) -> Trace {
    let prompt = session.prefill(&s.prompt, s.plan).unwrap();
    let extended = session.extend(&s.more, s.plan).unwrap();
    let tree = session.tree_logits(&s.tree, &[-1, 0, 0, -1], s.plan).unwrap();
    let opts = GenerateOptions { max_tokens: 6, sampler: SamplerConfig::default(), stop: Vec::new(), stop_on_repeat: false };
    let generated = session.generate(&s.whole(), s.plan, &opts, |_| {}).unwrap().tokens;
    Trace { prompt, extended, tree, generated }
}

fn tokens(r: &mut SplitMix64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (r.next_u64() % vocab as u64) as u32).collect()
}

/// A tiny random model; `tag` keeps the file of each test apart (they run at once).
fn tiny(seed: u64, tag: &str) -> Model {
    Model::load(ctx(), &common::tiny_gguf(&TinyModelSpec::new("llama", BlockFormat::Q4_0), seed, &format!("batch-{tag}"))).unwrap()
}

#[test]
fn batched_sessions_compute_what_each_computes_alone() {
    let mut r = rng("batch");
    let model = tiny(r.next_u64(), "alone");
    let c = model.config.clone();
    let a = ActiveAdapter::new(model.add_adapter("a", &random_adapter(&mut r, &c, 4, &Proj::ALL, 0.3)).unwrap());
    let b = ActiveAdapter::new(model.add_adapter("b", &random_adapter(&mut r, &c, 8, &[Proj::Q, Proj::V, Proj::Down], 0.3)).unwrap());
    let step = model.step_tokens();
    // Six conversations: the base weights, an activated adapter from inside the prompt, a standard
    // one from 0; one prompt longer than a pass holds, so it is computed a piece per pass.
    let plans = [None, Some(Activation { adapter: a, from: 5 }), Some(Activation { adapter: b, from: 0 })];
    let scripts: Vec<Script> = (0..6)
        .map(|i| Script {
            prompt: tokens(&mut r, if i == 1 { step + 37 } else { 9 + 3 * i }, c.n_vocab),
            more: tokens(&mut r, 3, c.n_vocab),
            tree: tokens(&mut r, 4, c.n_vocab),
            plan: plans[i % 3],
        })
        .collect();
    let n_ctx = step + 64;
    let alone: Vec<Trace> = scripts.iter().map(|s| run(&mut Session::new(&model, n_ctx).unwrap(), s)).collect();

    // Four sessions in the slots of one pool (their rows share each dispatch of RoPE, the KV
    // store and attention), two beyond its slots with caches of their own.
    let pool = model.new_pool(n_ctx, 4).unwrap();
    assert_eq!(pool.slots(), 4);
    let (together, stats) = batch::scope(&model, |batcher| {
        let traces = std::thread::scope(|t| {
            let threads: Vec<_> = scripts
                .iter()
                .map(|s| {
                    let pool = &pool;
                    t.spawn(move || {
                        let _turn = batcher.join();
                        run(&mut Session::pooled(batcher, pool).unwrap(), s)
                    })
                })
                .collect();
            threads.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        (traces, batcher.stats())
    });
    for (i, (x, y)) in together.iter().zip(&alone).enumerate() {
        assert_close(&format!("conversation {i}: prompt"), &x.prompt, &y.prompt, 1e-4);
        assert_close(&format!("conversation {i}: three tokens at once"), &x.extended, &y.extended, 1e-4);
        assert_close(&format!("conversation {i}: token tree"), &x.tree, &y.tree, 1e-4);
        // Greedy text: the same tokens, unless two candidates tie within rounding (the logits of a
        // shared pass agree with a lone one's within 1e-4, not bit for bit).
        if let Some(j) = x.generated.iter().zip(&y.generated).position(|(p, q)| p != q) {
            let context: Vec<u32> = scripts[i].whole().into_iter().chain(y.generated[..j].iter().copied()).collect();
            let logits = Session::new(&model, n_ctx).unwrap().prefill(&context, scripts[i].plan).unwrap();
            let (p, q) = (x.generated[j] as usize, y.generated[j] as usize);
            assert!((logits[p] - logits[q]).abs() < 1e-4, "conversation {i}: generated {:?} batched, {:?} alone", x.generated, y.generated);
        }
    }
    eprintln!("{stats:?}");
    assert!(stats.shared_passes > 0 && stats.widest > 1, "the conversations shared passes: {stats:?}");
    assert!(stats.mixed_adapter_passes > 0, "rows of different adapters went through one pass: {stats:?}");
    assert!(stats.tokens <= stats.passes * step, "no pass held more than the budget: {stats:?}");
}

/// Caches of one pool: a copy of a pooled cache (made within the shared buffers) continues as
/// the original does, a pool whose slots are all held hands out caches of their own, and a
/// dropped cache's slot is taken again.
#[test]
fn pooled_caches_fork_and_free_their_slots() {
    let mut r = rng("batch-pool");
    let model = tiny(r.next_u64(), "pool");
    let vocab = model.config.n_vocab;
    let (prompt, more) = (tokens(&mut r, 20, vocab), tokens(&mut r, 5, vocab));
    let mut lone = model.new_cache(64).unwrap();
    let want = model.forward(&[prompt.clone(), more.clone()].concat(), &mut lone, Logits::Last).unwrap();
    let pool = model.new_pool(64, 2).unwrap();
    let mut first = pool.cache().unwrap();
    model.forward(&prompt, &mut first, Logits::None).unwrap();
    let mut copy = first.fork(model.ctx()).unwrap();
    assert_eq!((copy.len(), pool.available()), (20, 0));
    let mut beyond = pool.cache().unwrap();
    model.forward(&prompt, &mut beyond, Logits::None).unwrap();
    for (what, kv) in [("the original", &mut first), ("its copy", &mut copy), ("a cache beyond the pool", &mut beyond)] {
        let got = model.forward(&more, kv, Logits::Last).unwrap();
        assert_close(what, &got, &want, 1e-4);
    }
    drop(copy);
    assert_eq!(pool.available(), 1);
    drop(pool.cache().unwrap());
    drop(first);
    assert_eq!(pool.available(), 2);
}

/// A session whose cache is full gets its error; the others in the same passes do not notice.
#[test]
fn a_full_cache_fails_only_its_own_session() {
    let mut r = rng("batch-full");
    let model = tiny(r.next_u64(), "full");
    let vocab = model.config.n_vocab;
    let (short, long) = (tokens(&mut r, 8, vocab), tokens(&mut r, 40, vocab));
    let want = Session::new(&model, 64).unwrap().prefill(&short, None).unwrap();
    batch::scope(&model, |batcher| {
        std::thread::scope(|t| {
            let full = t.spawn(|| {
                let _turn = batcher.join();
                Session::batched(batcher, 32).unwrap().prefill(&long, None).unwrap_err().to_string()
            });
            let fine = t.spawn(|| {
                let _turn = batcher.join();
                Session::batched(batcher, 64).unwrap().prefill(&short, None).unwrap()
            });
            let err = full.join().unwrap();
            assert!(err.contains("40") && err.contains("32"), "{err}");
            assert_close("the other session", &fine.join().unwrap(), &want, 1e-4);
        })
    });
}
