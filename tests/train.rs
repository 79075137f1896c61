//! Training data for the decoupled adapters: the examples' token sequences are the prompts
//! inference builds, their loss masks cover exactly the selector's names and the arguments, and
//! the argument targets are sequences the schema constraint itself would produce. Checked with
//! the real filesystem MCP server's tool schemas and SmolLM2's real tokenizer on a tiny random
//! transformer.

// Examples list their target ranges; here many lists hold one range, which is what they mean.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use agentflux::mcp::{McpClient, ServerOptions};
use agentflux::model::{AdapterBuffers, AdapterTraining, PrefixCache};
use agentflux::session::Session;
use agentflux::text::ChatMessage;
use agentflux::toolcall::{
    AdapterSet, ArgumentCue, CallEvent, Catalog, ConstraintFactory, ToolCaller, ToolChoice, FINISH, MAX_RESULT_CHARS,
};
use agentflux::train::{decoupled_examples, read_trajectories, AdapterRole, DropKind};
use common::{agentflux, default_model, filesystem_server, rng, tiny_pipeline};
use serde_json::{json, Value};
use std::ops::ControlFlow;

fn call(id: &str, name: &str, args: Value) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}]})
}

#[test]
fn examples_are_the_prompts_inference_builds() {
    let Some(f) = default_model() else { return };
    let Some(fs) = filesystem_server() else { return };
    let (model, tok, template, _) = tiny_pipeline(&f, rng("train-layout").next_u64(), "train-layout");
    let root = std::env::temp_dir().join(format!("agentflux-train-ws-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let mut fs_server = McpClient::spawn(&format!("{} {}", fs.display(), root.display()), ServerOptions::default()).unwrap();
    let fs_tools = fs_server.list_tools().unwrap();
    let memory = fs.with_file_name("mcp-server-memory");
    let mut mem_server = McpClient::spawn(
        &format!("env MEMORY_FILE_PATH={} {}", root.join("m.jsonl").display(), memory.display()),
        ServerOptions::default(),
    )
    .unwrap();
    let mem_tools = mem_server.list_tools().unwrap();
    let openai = |tools: &[agentflux::mcp::Tool]| -> Value {
        tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
            .collect()
    };
    let messages = json!([
        {"role": "user", "content": "Fix the typo 'mlik' in notes/todo.txt."},
        call("c1", "read_text_file", json!({"path": "notes/todo.txt"})),
        {"role": "tool", "tool_call_id": "c1", "content": "buy mlik\n"},
        // Keys in another order than the schema's: the target puts them in the schema's order.
        call("c2", "edit_file", json!({"dryRun": false, "edits": [{"newText": "milk", "oldText": "mlik"}], "path": "notes/todo.txt"})),
        {"role": "tool", "tool_call_id": "c2", "content": "```diff\n-buy mlik\n+buy milk\n```"},
        {"role": "assistant", "content": "Fixed: it now says 'buy milk'."},
    ]);
    let line = json!({"messages": messages, "tools": openai(&fs_tools)}).to_string();
    let (trajectories, mut report) = read_trajectories(&line, MAX_RESULT_CHARS);
    assert_eq!(report.dropped, [], "{}", report.summary(3));
    let caller = ToolCaller::new(tok.clone(), template.clone()).unwrap();
    let examples = decoupled_examples(&caller, &trajectories, 4096, ArgumentCue::Schema, &mut report).unwrap();
    let roles: Vec<&AdapterRole> = examples.iter().map(|e| &e.role).collect();
    let args = |t: &str| AdapterRole::Arguments(t.into());
    assert_eq!(
        roles,
        [
            &AdapterRole::Selector,
            &args("read_text_file"),
            &AdapterRole::Selector,
            &args("edit_file"),
            &AdapterRole::Selector,
            &AdapterRole::Answer
        ]
    );

    // The masks cover the names the selector writes and the arguments' JSON, nothing else.
    let text = |e: &agentflux::train::Example| -> Vec<String> {
        e.targets.iter().map(|r| tok.decode(&e.tokens[r.clone()], false).unwrap()).collect()
    };
    assert_eq!(text(&examples[0]), [" read_text_file\n"]);
    assert_eq!(text(&examples[1]), ["{\"path\":\"notes/todo.txt\"}"]);
    assert_eq!(
        text(&examples[3]),
        ["{\"path\":\"notes/todo.txt\",\"edits\":[{\"oldText\":\"mlik\",\"newText\":\"milk\"}],\"dryRun\":false}"]
    );
    assert_eq!(text(&examples[4]), [format!(" {FINISH}\n")]);
    for e in &examples {
        assert!(e.active_from <= e.targets[0].start && e.targets.last().unwrap().end <= e.tokens.len(), "{:?}", e.role);
    }
    // The selector's example is the argument example's beginning: one layout for both.
    assert_eq!(examples[1].tokens[..examples[0].tokens.len()], examples[0].tokens[..]);
    // The answer adapter learns the final answer and the end of the turn, nothing else; it is
    // activated where the selector is, and the selector's `finish` example is its beginning.
    let answer = &examples[5];
    let span = answer.targets[0].clone();
    assert_eq!((answer.targets.len(), span.end), (1, answer.tokens.len()));
    assert_eq!(tok.decode(&answer.tokens[span.start..span.end - 1], false).unwrap(), "Fixed: it now says 'buy milk'.");
    assert!(tok.is_stop(answer.tokens[span.end - 1]));
    assert_eq!(answer.active_from, examples[4].active_from);
    assert_eq!(answer.tokens[..examples[4].tokens.len()], examples[4].tokens[..]);
    // What the answer continues is what inference feeds before it writes one.
    let before_answer: Vec<ChatMessage> = trajectories[0].turns().last().unwrap().0.iter().map(|m| m.chat.clone()).collect();
    let mut session = Session::new(&model, 4096).unwrap();
    let one = agentflux::decode::GenerateOptions::greedy(1, &tok);
    caller.answer(&mut session, &trajectories[0].catalog, &before_answer, None, &one, |_| {}).unwrap();
    assert_eq!(session.tokens()[..span.start], answer.tokens[..span.start]);

    // The argument targets are exactly what the schema constraint lets the decoder write.
    let factory = ConstraintFactory::new(tok.clone()).unwrap();
    for e in examples.iter().filter(|e| matches!(e.role, AdapterRole::Arguments(_))) {
        let AdapterRole::Arguments(name) = &e.role else { unreachable!() };
        let schema = &fs_tools.iter().find(|t| &t.name == name).unwrap().input_schema;
        let mut c = factory.json(schema).unwrap();
        for &t in &e.tokens[e.targets[0].clone()] {
            assert!(c.allowed(tok.n_vocab()).unwrap()[t as usize], "{name}: the constraint refuses {:?}", tok.decode(&[t], false));
            c.consume(t).unwrap();
        }
        assert!(c.is_done(), "{name}: the target ends where the constraint ends");
    }

    // Inference builds the same tokens: a forced call of each example's tool leaves the session
    // holding the example's tokens up to its arguments, over one server and over two (hierarchy).
    let mut two = Catalog::default();
    two.add(&fs_server.name(), fs_tools.clone()).unwrap();
    two.add(&mem_server.name(), mem_tools.clone()).unwrap();
    let two_line = json!({"messages": messages, "tools": openai(&[fs_tools.clone(), mem_tools].concat())}).to_string();
    for (catalog, line) in [(trajectories[0].catalog.clone(), line.clone()), (two, two_line)] {
        let (mut ts, mut report) = read_trajectories(&line, MAX_RESULT_CHARS);
        // A file's tools are one group; the layout under test takes its servers from `catalog`.
        ts[0].catalog = catalog.clone();
        let examples = decoupled_examples(&caller, &ts, 4096, ArgumentCue::Schema, &mut report).unwrap();
        let turns: Vec<_> = ts[0].turns().collect();
        let arg_examples = examples.iter().filter(|e| matches!(e.role, AdapterRole::Arguments(_)));
        for (e, (before, _)) in arg_examples.zip(turns.iter().filter(|(_, t)| matches!(t, agentflux::toolcall::AssistantTurn::Call { .. })))
        {
            let AdapterRole::Arguments(name) = &e.role else { unreachable!() };
            let context: Vec<ChatMessage> = before.iter().map(|m| m.chat.clone()).collect();
            let mut session = Session::new(&model, 4096).unwrap();
            // Stopped at the first argument token: the prompt is what is compared.
            let stop =
                |e: CallEvent| if matches!(e, CallEvent::ArgumentToken(_)) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
            let r = caller.call_with(&mut session, &catalog, &context, &AdapterSet::default(), &ToolChoice::Function(name.clone()), stop);
            assert!(matches!(r, Err(agentflux::Error::Cancelled)), "{r:?}");
            let start = e.targets[0].start;
            assert_eq!(session.tokens()[..start], e.tokens[..start], "{name} with {} server(s)", catalog.groups.len());
        }
        // The scored (unforced) choice writes the same tokens as the layout of what it chose.
        let context = [ChatMessage::new("user", "List the notes directory.")];
        let mut session = Session::new(&model, 4096).unwrap();
        let mut chosen = String::new();
        let r = caller.call_with(&mut session, &catalog, &context, &AdapterSet::default(), &ToolChoice::Auto, |e| match e {
            CallEvent::Chosen(n) => {
                chosen = n.to_string();
                ControlFlow::Continue(())
            }
            CallEvent::ArgumentToken(_) => ControlFlow::Break(()),
        });
        assert!(r.is_ok() == (chosen == FINISH), "{r:?}");
        let layout = caller.call_layout(&catalog, &context, &chosen, &json!({})).unwrap();
        // Up to the arguments for a tool; for finish, up to the choice (its name is scored, not kept).
        let end = layout.args_span.map_or(session.tokens().len(), |r| r.start);
        assert_eq!(session.tokens()[..end], layout.tokens[..end], "chose {chosen}");
    }

    // Argument examples active from `args:` hold the same tokens and targets; only their active
    // rows start later, at the cue. Every other example is unchanged.
    let at_args = decoupled_examples(&caller, &trajectories, 4096, ArgumentCue::Args, &mut report).unwrap();
    assert_eq!(at_args.len(), examples.len());
    for (s, a) in examples.iter().zip(&at_args) {
        if !matches!(s.role, AdapterRole::Arguments(_)) {
            assert_eq!(s, a);
            continue;
        }
        assert_eq!((&a.tokens, &a.targets), (&s.tokens, &s.targets));
        for (e, cue) in [(s, ArgumentCue::Schema), (a, ArgumentCue::Args)] {
            assert!(e.tokens[e.active_from..].starts_with(&tok.encode(cue.text(), false).unwrap()), "{:?} at {cue:?}", e.role);
        }
        assert_eq!(a.active_from + tok.encode(ArgumentCue::Args.text(), false).unwrap().len(), a.targets[0].start);
    }

    // Inference switches an argument adapter on at the cue of its invocation tokens, which is
    // where training's example activates it: the call's cache holds every position of the
    // example's prompt as the example's activation computes it, so nothing is computed again.
    use agentflux::lora::{ActiveAdapter, Proj};
    use agentflux::session::Activation;
    let mut r = rng("train-layout-adapters");
    for (cue, e) in [(ArgumentCue::Schema, &examples[3]), (ArgumentCue::Args, &at_args[3])] {
        let mut adapter = agentflux::reference::random_adapter(&mut r, &model.config, 2, &Proj::ALL, 0.2);
        adapter.invocation_tokens = Some(tok.encode(cue.text(), false).unwrap());
        let adapter = ActiveAdapter::new(model.add_adapter(&format!("edit_file at {cue:?}"), &adapter).unwrap());
        let set = AdapterSet { arguments: [("edit_file".to_string(), adapter)].into(), ..Default::default() };
        let mut session = Session::new(&model, 4096).unwrap();
        let stop = |e: CallEvent| if matches!(e, CallEvent::ArgumentToken(_)) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
        let context: Vec<ChatMessage> = trajectories[0].turns().nth(1).unwrap().0.iter().map(|m| m.chat.clone()).collect();
        let r = caller.call_with(&mut session, &trajectories[0].catalog, &context, &set, &ToolChoice::Function("edit_file".into()), stop);
        assert!(matches!(r, Err(agentflux::Error::Cancelled)), "{r:?}");
        let start = e.targets[0].start;
        let before = session.stats();
        session.prefill(&e.tokens[..start + 1], Some(Activation { adapter, from: e.active_from })).unwrap();
        let added = session.stats() - before;
        assert_eq!((added.reused, added.prefilled, added.recomputed), (start, 1, 0), "{cue:?}");
    }
    // An adapter invoked at neither cue is refused with its name, not run from a wrong place.
    let mut stray = agentflux::reference::random_adapter(&mut r, &model.config, 2, &Proj::ALL, 0.2);
    stray.invocation_tokens = Some(tok.encode(agentflux::toolcall::SELECT_CUE, false).unwrap());
    let stray = ActiveAdapter::new(model.add_adapter("stray", &stray).unwrap());
    let set = AdapterSet { arguments: [("read_text_file".to_string(), stray)].into(), ..Default::default() };
    let context = [ChatMessage::new("user", "Show notes/todo.txt")];
    let mut session = Session::new(&model, 4096).unwrap();
    let err = caller
        .call_with(&mut session, &trajectories[0].catalog, &context, &set, &ToolChoice::Function("read_text_file".into()), |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("read_text_file (stray)") && err.contains("neither"), "{err}");

    // Over-length conversations are dropped whole, with the reason.
    let (ts, mut report) = read_trajectories(&line, MAX_RESULT_CHARS);
    assert!(decoupled_examples(&caller, &ts, 64, ArgumentCue::Schema, &mut report).unwrap().is_empty());
    assert_eq!((report.kept(), report.dropped[0].kind), (0, DropKind::TooLong));
    std::fs::remove_dir_all(&root).ok();
}

/// `agentflux data check` as a user runs it: the drop report, the examples per adapter, and a
/// seeded split written out.
#[test]
fn data_check_reports_and_splits() {
    if default_model().is_none() {
        return;
    }
    let tools = json!([{"type": "function", "function": {"name": "read_text_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]);
    let mut lines: Vec<String> = (0..20)
        .map(|i| {
            // Every seventh request is long, for the over-length check below.
            let request = if i % 7 == 3 { format!("Show notes/{i}.txt{}", " please".repeat(300)) } else { format!("Show notes/{i}.txt") };
            let messages = json!([{"role": "user", "content": request}, call("c", "read_text_file", json!({"path": format!("notes/{i}.txt")})), {"role": "tool", "tool_call_id": "c", "content": "hi"}, {"role": "assistant", "content": "It says hi."}]);
            json!({"messages": messages, "tools": tools}).to_string()
        })
        .collect();
    lines.push(
        json!({"messages": [{"role": "user", "content": "x"}, call("c", "read_text_file", json!({"file": "a"}))], "tools": tools})
            .to_string(),
    );
    lines.push("{broken".into());
    let dir = std::env::temp_dir().join(format!("agentflux-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out_dir = dir.join("split");
    let examples = dir.join("examples.jsonl");
    let (ok, out, err) = agentflux(&[
        "data",
        "check",
        file.to_str().unwrap(),
        "--seed",
        "3",
        "--out",
        out_dir.to_str().unwrap(),
        "--examples",
        examples.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("22 lines read, 20 kept, 2 dropped"), "{out}");
    assert!(out.contains("line 21: read_text_file: $: the required key \"path\" is missing") && out.contains("NotJson: 1"), "{out}");
    assert!(out.contains("selector: 40 examples") && out.contains("arguments of read_text_file: 20 examples"), "{out}");
    assert!(out.contains("answer: 20 examples"), "{out}");
    let count = |p: &str| std::fs::read_to_string(out_dir.join(p)).unwrap().lines().count();
    let (train, val, test) = (count("train.jsonl"), count("val.jsonl"), count("test.jsonl"));
    assert!(train + val + test == 20 && val >= 1 && test >= 1, "{train}/{val}/{test}");
    // The exported examples are the training split's: two selector turns, one call and one
    // answer per line, each target after its activation point.
    let exported: Vec<Value> = std::fs::read_to_string(&examples).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train_text: std::collections::HashSet<String> =
        std::fs::read_to_string(out_dir.join("train.jsonl")).unwrap().lines().map(str::to_string).collect();
    assert_eq!(exported.len(), 4 * train);
    assert_eq!(exported.iter().filter(|e| e["adapter"] == "selector").count(), 2 * train);
    assert_eq!(exported.iter().filter(|e| e["adapter"] == "answer").count(), train);
    for e in &exported {
        let line = e["line"].as_u64().unwrap() as usize;
        assert!(train_text.contains(&lines[line - 1]), "line {line} is not in the training split");
        let (n, from) = (e["tokens"].as_array().unwrap().len() as u64, e["active_from"].as_u64().unwrap());
        for r in e["targets"].as_array().unwrap() {
            let (start, end) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
            assert!(from < start && start < end && end <= n, "{e}");
        }
    }
    // A lower --max-tokens drops the long conversations and moves no other line to another part:
    // the valid lines are split first, as `agentflux train` splits them.
    let short = exported
        .iter()
        .filter(|e| !lines[e["line"].as_u64().unwrap() as usize - 1].contains("please"))
        .map(|e| e["tokens"].as_array().unwrap().len())
        .max()
        .unwrap();
    let parts = |dir: &std::path::Path| -> Vec<Vec<String>> {
        ["train", "val", "test"]
            .iter()
            .map(|p| std::fs::read_to_string(dir.join(format!("{p}.jsonl"))).unwrap().lines().map(str::to_string).collect())
            .collect()
    };
    let short_dir = dir.join("split-short");
    let (ok, out, err) = agentflux(&[
        "data",
        "check",
        file.to_str().unwrap(),
        "--seed",
        "3",
        "--max-tokens",
        &(short + 50).to_string(),
        "--out",
        short_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("22 lines read, 17 kept, 5 dropped") && out.contains("TooLong: 3"), "{out}");
    let without_long: Vec<Vec<String>> =
        parts(&out_dir).into_iter().map(|p| p.into_iter().filter(|l| !l.contains("please")).collect()).collect();
    assert_eq!(parts(&short_dir), without_long);
    let (ok, _, err) = agentflux(&["data", "check", "/nonexistent.jsonl"]);
    assert!(!ok && err.contains("/nonexistent.jsonl"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The largest of |numeric − analytic| over `at`, relative to the largest |analytic| there: the
/// numeric derivative of `loss` by central differences with step `eps`.
fn fd_error(x: &[f32], at: &[usize], analytic: &[f32], eps: f32, loss: impl Fn(&[f32]) -> f64) -> f64 {
    let mut x = x.to_vec();
    let (mut worst, mut scale) = (0f64, 1e-6f64);
    for &i in at {
        let keep = x[i];
        x[i] = keep + eps;
        let up = loss(&x);
        x[i] = keep - eps;
        let down = loss(&x);
        x[i] = keep;
        let numeric = (up - down) / (2.0 * eps as f64);
        worst = worst.max((numeric - analytic[i] as f64).abs());
        scale = scale.max(analytic[i].abs() as f64);
    }
    worst / scale
}

/// `Σ r ⊙ y`: a scalar whose gradient with respect to `y` is `r`.
fn weighted(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn operator_gradients_match_finite_differences() {
    use agentflux::hparams::{Activation, Rope, RopeLayout};
    use agentflux::reference::*;
    let mut r = rng("op-grads");
    let v = |r: &mut agentflux::decode::SplitMix64, n: usize| random_vec(r, n, 1.0);
    let all = |n: usize| (0..n).collect::<Vec<_>>();
    let tol = 1e-3;

    let (rows, cols, m) = (5, 7, 3);
    let (w, x, dy) = (v(&mut r, rows * cols), v(&mut r, m * cols), v(&mut r, m * rows));
    let e = fd_error(&x, &all(x.len()), &matmul_backward_x(&w, &dy, rows, cols), 1e-2, |x| weighted(&matmul(&w, x, rows, cols), &dy));
    assert!(e < tol, "matmul dx: {e:.2e}");
    let mut dw = vec![0f32; w.len()];
    matmul_backward_w(&dy, &x, rows, cols, &mut dw);
    let e = fd_error(&w, &all(w.len()), &dw, 1e-2, |w| weighted(&matmul(w, &x, rows, cols), &dy));
    assert!(e < tol, "matmul dW: {e:.2e}");

    let n = 16;
    let (x, g, dy) = (v(&mut r, 3 * n), v(&mut r, n), v(&mut r, 3 * n));
    let e = fd_error(&x, &all(x.len()), &rms_norm_backward(&x, &g, &dy, n, 1e-5), 1e-2, |x| weighted(&rms_norm(x, &g, n, 1e-5), &dy));
    assert!(e < tol, "rms_norm: {e:.2e}");

    // Plain, and with LongRoPE's per-pair factors and attention factor.
    let longrope = |layout| Rope { factors: Some(vec![1.0, 1.7, 3.2, 6.5]), scale: 1.19, ..Rope::new(layout, 8, 10000.0) };
    for rope_cfg in [RopeLayout::Normal, RopeLayout::Neox].into_iter().flat_map(|layout| [Rope::new(layout, 8, 10000.0), longrope(layout)])
    {
        let layout = rope_cfg.layout;
        let (x, dy) = (v(&mut r, 3 * 2 * 8), v(&mut r, 3 * 2 * 8));
        let mut dx = dy.clone();
        rope_backward(&mut dx, 2, 8, &rope_cfg, 5);
        let e = fd_error(&x, &all(x.len()), &dx, 1e-2, |x| {
            let mut y = x.to_vec();
            rope(&mut y, 2, 8, &rope_cfg, 5);
            weighted(&y, &dy)
        });
        assert!(e < tol, "rope {layout:?} scale {}: {e:.2e}", rope_cfg.scale);
    }

    // Grouped-query attention (4 heads over 2 key/value heads), with and without a window.
    let (t, nh, nkv, hd) = (5, 4, 2, 8);
    for window in [0, 3] {
        let (q, k, vv, dout) = (v(&mut r, t * nh * hd), v(&mut r, t * nkv * hd), v(&mut r, t * nkv * hd), v(&mut r, t * nh * hd));
        let scale = 1.0 / (hd as f32).sqrt();
        let (dq, dk, dv) = attention_backward(&q, &k, &vv, &dout, nh, nkv, hd, window, scale);
        let att = |q: &[f32], k: &[f32], vv: &[f32]| weighted(&attention(q, k, vv, nh, nkv, hd, 0, window, scale), &dout);
        for (name, e) in [
            ("dq", fd_error(&q, &all(q.len()), &dq, 1e-2, |q| att(q, &k, &vv))),
            ("dk", fd_error(&k, &all(k.len()), &dk, 1e-2, |k| att(&q, k, &vv))),
            ("dv", fd_error(&vv, &all(vv.len()), &dv, 1e-2, |vv| att(&q, &k, vv))),
        ] {
            assert!(e < tol, "attention (window {window}) {name}: {e:.2e}");
        }
    }

    for act in [Activation::Silu, Activation::GeluTanh] {
        let (gate, up, dy) = (v(&mut r, 24), v(&mut r, 24), v(&mut r, 24));
        let (dg, du) = glu_backward(&gate, &up, &dy, act);
        let e = fd_error(&gate, &all(24), &dg, 1e-2, |g| weighted(&glu(g, &up, act), &dy));
        assert!(e < tol, "glu {act:?} dgate: {e:.2e}");
        let e = fd_error(&up, &all(24), &du, 1e-2, |u| weighted(&glu(&gate, u, act), &dy));
        assert!(e < tol, "glu {act:?} dup: {e:.2e}");
    }

    let logits = v(&mut r, 4 * 11);
    let targets = [(1, 3u32), (2, 10), (3, 0)];
    let (_, dl) = cross_entropy(&logits, 11, &targets);
    let e = fd_error(&logits, &all(logits.len()), &dl, 1e-2, |l| cross_entropy(l, 11, &targets).0 as f64);
    assert!(e < tol, "cross-entropy: {e:.2e}");
    assert!(dl[..11].iter().all(|g| *g == 0.0), "no target on row 0: no gradient");
}

/// The adapter's whole gradient, by backpropagation through the reference model, against finite
/// differences of the masked loss — for every architecture (biases, q/k norms, GeGLU, post norms,
/// sliding windows, fused phi3 tensors with LongRoPE), every projection, activated from a middle
/// position.
#[test]
fn adapter_gradient_matches_finite_differences() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::Proj;
    use agentflux::reference::{random_adapter, ReferenceAdapter, ReferenceModel, TinyModelSpec};
    let mut r = rng("adapter-grads");
    for arch in ["llama", "qwen2", "qwen3", "gemma3", "phi3"] {
        let mut spec = TinyModelSpec::new(arch, BlockFormat::F32);
        spec.untied_output = arch == "qwen2";
        // Llama 3.1's frequency factors in the rotation the gradient goes back through, and
        // phi3's LongRoPE (its long factors and attention factor: an original context of 8).
        spec.rope_factors = arch == "llama";
        spec.long_rope = (arch == "phi3").then_some(8);
        // The exact f32 function: rounding the cache to f16 would make the loss a step function.
        let mut model = ReferenceModel::from_gguf(&common::tiny_gguf(&spec, r.next_u64(), "grad")).unwrap();
        model.kv_f16 = false;
        let c = model.config.clone();
        let adapter = random_adapter(&mut r, &c, 3, &Proj::ALL, 0.2);
        let tokens: Vec<u32> = (0..9).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect();
        let targets = [4..6, 7..9];
        let lora = ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: 3 };
        let (loss, grads) = model.lora_loss_and_grads(&tokens, lora, &targets);
        assert!((loss - model.masked_loss(&tokens, Some(lora), &targets)).abs() < 1e-5);
        let mut worst = 0f64;
        for (&(layer, proj), g) in &grads {
            for (which, analytic) in [("A", &g.a), ("B", &g.b)] {
                // A few entries of each matrix, the largest-gradient one among them.
                let mut at: Vec<usize> = (0..3).map(|_| (r.next_u64() % analytic.len() as u64) as usize).collect();
                at.push((0..analytic.len()).max_by(|&i, &j| analytic[i].abs().total_cmp(&analytic[j].abs())).unwrap());
                let base = &adapter.targets[&(layer, proj)];
                let values = if which == "A" { &base.a } else { &base.b };
                // A step of 3e-3: at 1e-2 a drawing's curvature (phi3 layer 0, 6.9e-2) outweighed
                // the gradient's error, while below 1e-3 the f32 loss's rounding does.
                let e = fd_error(values, &at, analytic, 3e-3, |x| {
                    let mut changed = adapter.clone();
                    let w = changed.targets.get_mut(&(layer, proj)).unwrap();
                    *(if which == "A" { &mut w.a } else { &mut w.b }) = x.to_vec();
                    model.masked_loss(&tokens, Some(ReferenceAdapter { adapter: &changed, ..lora }), &targets) as f64
                });
                assert!(e < 2e-2, "{arch} layer {layer} {proj:?} {which}: finite differences differ by {e:.2e} of the largest gradient");
                worst = worst.max(e);
            }
        }
        eprintln!("{arch}: loss {loss:.4}, worst relative error {worst:.2e} over {} matrices", 2 * grads.len());
        // Rows before the activation point see no adapter, so a target there has no gradient.
        let (_, before) = model.lora_loss_and_grads(&tokens, lora, &[1..3]);
        assert!(before.values().all(|g| g.a.iter().chain(&g.b).all(|v| *v == 0.0)), "{arch}: gradient before the activation point");
    }
}

/// A toy task learned to near-zero loss with the reference gradient and AdamW: an adapter
/// activated after a 4-token prefix (initialised as PEFT does: B = 0) learns to continue it with
/// a fixed random sequence the base model does not predict.
#[test]
fn toy_task_is_learned_to_near_zero_loss() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::Proj;
    use agentflux::reference::{random_adapter, ReferenceAdapter, ReferenceModel, TinyModelSpec};
    use agentflux::train::{AdamW, Moments, Schedule};
    let mut r = rng("toy-task");
    let spec = TinyModelSpec::new("llama", BlockFormat::F32);
    let model = ReferenceModel::from_gguf(&common::tiny_gguf(&spec, r.next_u64(), "toy")).unwrap();
    let c = model.config.clone();
    let mut adapter = random_adapter(&mut r, &c, 4, &Proj::ALL, 0.1);
    adapter.targets.values_mut().for_each(|w| w.b.iter_mut().for_each(|b| *b = 0.0));
    let tokens: Vec<u32> = (0..12).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect();
    let targets = [5..12];
    let opt = AdamW::default();
    let schedule = Schedule { peak: 1e-2, min: 1e-3, warmup: 10, total: 400 };
    let mut moments: Vec<(Moments, Moments)> = vec![Default::default(); adapter.targets.len()];
    let first = model.masked_loss(&tokens, Some(ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: 4 }), &targets);
    let mut loss = first;
    for t in 1..=schedule.total {
        let (l, grads) = model.lora_loss_and_grads(&tokens, ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: 4 }, &targets);
        loss = l;
        for ((w, g), (ma, mb)) in adapter.targets.values_mut().zip(grads.values()).zip(&mut moments) {
            opt.step(&mut w.a, &g.a, ma, t, schedule.lr(t));
            opt.step(&mut w.b, &g.b, mb, t, schedule.lr(t));
        }
        if loss < 0.03 {
            break;
        }
    }
    eprintln!("toy task: loss {first:.3} → {loss:.4}");
    assert!(first > 1.0, "the base model does not already know the sequence ({first})");
    assert!(loss < 0.1, "loss {first:.3} → {loss:.4} after {} steps", schedule.total);
    // Learned: greedy decoding after the prefix writes the whole sequence.
    let logits = model.forward_adapted(&tokens, Some(ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: 4 }));
    let greedy: Vec<u32> = (5..12).map(|p| agentflux::reference::argmax(&logits[(p - 1) * c.n_vocab..][..c.n_vocab]) as u32).collect();
    assert_eq!(greedy, tokens[5..]);
    // The prefix, where the adapter is not active, is untouched: same logits as the base model.
    let base = model.forward(&tokens[..4]);
    let adapted = model.forward_adapted(&tokens[..4], Some(ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: 4 }));
    assert_eq!(base, adapted);
}

/// The adapter's gradient computed on the GPU (prefix forward only, the active rows forward with
/// their activations kept, then backward through every layer with the training kernels) equals
/// the reference's backpropagation, on every architecture and a quantized base model, and
/// accumulates over examples.
#[test]
fn gpu_adapter_gradient_matches_the_reference() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::{ActiveAdapter, Proj};
    use agentflux::reference::{random_adapter, ReferenceAdapter, TinyModelSpec};
    let mut r = rng("gpu-grads");
    for (arch, format) in [
        ("llama", BlockFormat::F32),
        ("llama", BlockFormat::Q8_0),
        ("qwen2", BlockFormat::Q4_K),
        ("qwen3", BlockFormat::F16),
        ("gemma3", BlockFormat::Q5_0),
        ("phi3", BlockFormat::Q8_0),
    ] {
        let mut spec = TinyModelSpec::new(arch, format);
        spec.untied_output = arch == "qwen2";
        spec.rope_factors = arch == "llama" && format == BlockFormat::Q8_0;
        // LongRoPE's long factors: the 11 tokens (and the trainer's cache) exceed a context of 8.
        spec.long_rope = (arch == "phi3").then_some(8);
        let (reference, model) = tiny_models(&spec, &mut r, &format!("gpugrad-{arch}-{format:?}"));
        let c = model.config.clone();
        let adapter = random_adapter(&mut r, &c, 4, &Proj::ALL, 0.2);
        let id = model.add_adapter("trained", &adapter).unwrap();
        let tokens: Vec<u32> = (0..11).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect();
        let (from, targets) = (4, [6..8, 9..11]);
        let lora = ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from };
        let (want_loss, want) = reference.lora_loss_and_grads(&tokens, lora, &targets);
        let grads = AdapterBuffers::new(&model).unwrap();
        let mut prefix = PrefixCache::new();
        let loss = grads.add_gradient(&model, &mut prefix, &tokens, from, &targets, ActiveAdapter::new(id)).unwrap();
        let what = format!("{arch} {format:?}");
        assert!((loss - want_loss).abs() < 1e-3 * want_loss.abs().max(1.0), "{what}: loss {loss} vs reference {want_loss}");
        let got = grads.read(&model, id).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        for (key, g) in &got {
            let w = &want[key];
            common::assert_close(&format!("{what} {key:?} dA"), &g.a, &w.a, 2e-3);
            common::assert_close(&format!("{what} {key:?} dB"), &g.b, &w.b, 2e-3);
        }
        // The forward-only loss (validation) is the same, and adds no gradient.
        let forward_only =
            agentflux::model::example_loss(&model, &mut PrefixCache::new(), &tokens, from, &targets, ActiveAdapter::new(id)).unwrap();
        assert!((forward_only - loss).abs() < 1e-4 * loss.abs().max(1.0), "{what}: forward-only loss {forward_only} vs {loss}");
        assert_eq!(grads.read(&model, id).unwrap(), got, "{what}: the forward-only loss changed the gradients");
        // A second example accumulates into the same buffers; its prefix comes from the cache.
        grads.add_gradient(&model, &mut prefix, &tokens, from, &targets, ActiveAdapter::new(id)).unwrap();
        assert_eq!((prefix.reused(), prefix.computed()), (from, from));
        let twice = grads.read(&model, id).unwrap();
        let (key, g) = twice.iter().next().unwrap();
        let doubled: Vec<f32> = want[key].b.iter().map(|v| 2.0 * v).collect();
        common::assert_close(&format!("{what} accumulated dB"), &g.b, &doubled, 2e-3);
        // An example sharing only part of the cached prefix: the same gradient as from scratch.
        let mut other = tokens.clone();
        other[2] = (other[2] + 1) % c.n_vocab as u32;
        let (cached, fresh) = (AdapterBuffers::new(&model).unwrap(), AdapterBuffers::new(&model).unwrap());
        cached.add_gradient(&model, &mut prefix, &other, from, &targets, ActiveAdapter::new(id)).unwrap();
        fresh.add_gradient(&model, &mut PrefixCache::new(), &other, from, &targets, ActiveAdapter::new(id)).unwrap();
        assert_eq!(prefix.reused(), from + 2);
        let (a, b) = (cached.read(&model, id).unwrap(), fresh.read(&model, id).unwrap());
        for (key, g) in &a {
            common::assert_close(&format!("{what} {key:?} dA, partly cached prefix"), &g.a, &b[key].a, 1e-6);
        }
        // The first prefix was copied, not replaced: both stay kept and come back whole, and the
        // gradient from the kept one is the first one's.
        let (reused, computed) = (prefix.reused(), prefix.computed());
        let again = AdapterBuffers::new(&model).unwrap();
        again.add_gradient(&model, &mut prefix, &tokens, from, &targets, ActiveAdapter::new(id)).unwrap();
        assert_eq!((prefix.kept(), prefix.reused() - reused, prefix.computed() - computed), (2, from, 0), "{what}");
        let (key, g) = again.read(&model, id).unwrap().into_iter().next().unwrap();
        common::assert_close(&format!("{what} {key:?} dB, kept prefix"), &g.b, &want[&key].b, 2e-3);
        // With no room for a second, the one kept gives way: the old prefix is computed again
        // after the part they share.
        let mut one = PrefixCache::with_budget(0);
        for t in [&tokens, &other, &tokens] {
            AdapterBuffers::new(&model).unwrap().add_gradient(&model, &mut one, t, from, &targets, ActiveAdapter::new(id)).unwrap();
        }
        assert_eq!((one.kept(), one.reused(), one.computed()), (1, 2 + 2, from + (from - 2) + (from - 2)), "{what}");
    }
}

/// Several examples in one call — side by side in one pass, and over two passes where their rows
/// pass a chunk's 256 — give each example's reference loss and the sum of the reference
/// gradients: one continues another's conversation (its prefix holds the other's) and goes on
/// past its last target (rows a pass leaves out), one has a long active part of its own.
#[test]
fn examples_side_by_side_add_the_references_gradients() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::{ActiveAdapter, Proj};
    use agentflux::model::ExampleRows;
    use agentflux::reference::{random_adapter, ReferenceAdapter, TinyModelSpec};
    let mut r = rng("gpu-grads-batched");
    for (arch, format) in [("llama", BlockFormat::Q8_0), ("gemma3", BlockFormat::F16)] {
        let spec = TinyModelSpec::new(arch, format);
        let (reference, model) = tiny_models(&spec, &mut r, &format!("batchgrad-{arch}"));
        let c = model.config.clone();
        let adapter = random_adapter(&mut r, &c, 4, &Proj::ALL, 0.2);
        let id = model.add_adapter("trained", &adapter).unwrap();
        let mut random = |n: usize| -> Vec<u32> { (0..n).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect() };
        let a = random(11);
        let b = [&a[..8], &random(6)].concat();
        let (mut long, mut longer) = (random(130), random(140));
        // Beginnings of their own: they share no prefix position with the first two.
        long[0] = (a[0] + 1) % c.n_vocab as u32;
        longer[0] = (a[0] + 2) % c.n_vocab as u32;
        let examples: Vec<(Vec<u32>, usize, Vec<std::ops::Range<usize>>)> =
            vec![(a, 4, vec![6..8, 9..11]), (b, 8, vec![9..12]), (long, 2, vec![3..10, 100..130]), (longer, 5, vec![6..140])];
        let rows: Vec<ExampleRows> = examples.iter().map(|(t, from, targets)| ExampleRows { tokens: t, from: *from, targets }).collect();
        let what = format!("{arch} {format:?}");
        for (name, batch) in [("one pass", &rows[..3]), ("two passes", &rows[..])] {
            let (grads, mut prefix) = (AdapterBuffers::new(&model).unwrap(), PrefixCache::new());
            let losses = grads.add_gradients(&model, &mut prefix, batch, ActiveAdapter::new(id)).unwrap();
            let mut want = std::collections::BTreeMap::new();
            for (e, loss) in batch.iter().zip(&losses) {
                let lora = ReferenceAdapter { adapter: &adapter, multiplier: 1.0, from: e.from };
                let (want_loss, g) = reference.lora_loss_and_grads(e.tokens, lora, e.targets);
                assert!((loss - want_loss).abs() < 1e-3 * want_loss.abs().max(1.0), "{what} {name}: loss {loss} vs reference {want_loss}");
                for (key, w) in g {
                    let sum = want
                        .entry(key)
                        .or_insert_with(|| agentflux::lora::LoraWeights { a: vec![0.0; w.a.len()], b: vec![0.0; w.b.len()] });
                    sum.a.iter_mut().zip(&w.a).for_each(|(s, x)| *s += x);
                    sum.b.iter_mut().zip(&w.b).for_each(|(s, x)| *s += x);
                }
            }
            for (key, g) in &grads.read(&model, id).unwrap() {
                common::assert_close(&format!("{what} {name} {key:?} dA"), &g.a, &want[key].a, 2e-3);
                common::assert_close(&format!("{what} {name} {key:?} dB"), &g.b, &want[key].b, 2e-3);
            }
            // The second example copied the first one's 4 positions; the first's prefix, which the
            // second's continues, is then given back by a copy of it: the next epoch computes
            // nothing and gives the same gradients.
            let computed = [4, 4, 2, 5][..batch.len()].iter().sum::<usize>();
            assert_eq!((prefix.reused(), prefix.computed()), (4, computed), "{what} {name}");
            let again = AdapterBuffers::new(&model).unwrap();
            again.add_gradients(&model, &mut prefix, batch, ActiveAdapter::new(id)).unwrap();
            assert_eq!(prefix.computed(), computed, "{what} {name}: a prefix computed twice");
            for ((key, g), (_, first)) in again.read(&model, id).unwrap().iter().zip(&grads.read(&model, id).unwrap()) {
                common::assert_close(&format!("{what} {name} {key:?} dB, next epoch"), &g.b, &first.b, 1e-6);
            }
            // Forward only, the same losses.
            let forward_only = agentflux::model::example_losses(&model, &mut PrefixCache::new(), batch, ActiveAdapter::new(id)).unwrap();
            for (f, l) in forward_only.iter().zip(&losses) {
                assert!((f - l).abs() < 1e-4 * l.abs().max(1.0), "{what} {name}: forward-only loss {f} vs {l}");
            }
        }
    }
}

/// Examples of different adapters in the same passes — each row under its own adapter's slot,
/// as a set trains together — give each example its reference loss under its adapter, and each
/// adapter the sum of its own examples' reference gradients: adapters of different ranks and
/// targets, interleaved in the call, two of them on one conversation; and nine adapters, one
/// more than a pass takes, over two passes.
#[test]
fn adapters_side_by_side_each_get_their_references_gradients() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::{ActiveAdapter, LoraAdapter, LoraWeights, Proj};
    use agentflux::model::ExampleRows;
    use agentflux::reference::{random_adapter, ReferenceAdapter, TinyModelSpec};
    use std::collections::BTreeMap;
    let mut r = rng("gpu-grads-adapters");
    for (arch, format) in [("llama", BlockFormat::Q8_0), ("qwen3", BlockFormat::F16)] {
        let (reference, model) = tiny_models(&TinyModelSpec::new(arch, format), &mut r, &format!("adaptersgrad-{arch}"));
        let c = model.config.clone();
        let mut adapters: Vec<LoraAdapter> = vec![
            random_adapter(&mut r, &c, 4, &Proj::ALL, 0.2),
            random_adapter(&mut r, &c, 2, &[Proj::Q, Proj::V, Proj::Down], 0.2),
            random_adapter(&mut r, &c, 4, &[Proj::Gate, Proj::Up, Proj::O], 0.2),
        ];
        adapters.extend((0..6).map(|_| random_adapter(&mut r, &c, 2, &Proj::ALL, 0.2)));
        let ids: Vec<ActiveAdapter> =
            adapters.iter().enumerate().map(|(i, a)| ActiveAdapter::new(model.add_adapter(&format!("a{i}"), a).unwrap())).collect();
        let mut random = |n: usize| -> Vec<u32> { (0..n).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect() };
        let conversation = random(14);
        let mut tokens: Vec<Vec<u32>> = vec![conversation[..11].to_vec(), conversation.clone()];
        tokens.extend((0..7).map(|_| random(14)));
        let targets = [vec![6..8, 9..11], vec![12..14]];
        let froms = [4, 10];
        let example = |i: usize| ExampleRows { tokens: &tokens[i], from: froms[i.min(1)], targets: &targets[i.min(1)] };
        // (example, adapter) pairs: adapters 0-2 interleaved, the conversation under 0 and 1.
        let mixed = [(0, 0), (1, 1), (2, 0), (3, 2), (4, 1)];
        let nine: Vec<(usize, usize)> = (0..9).map(|i| (i, i)).collect();
        let what = format!("{arch} {format:?}");
        for (name, pairs) in [("three adapters interleaved", &mixed[..]), ("nine adapters", &nine[..])] {
            let rows: Vec<ExampleRows> = pairs.iter().map(|&(e, _)| example(e)).collect();
            let active: Vec<ActiveAdapter> = pairs.iter().map(|&(_, a)| ids[a]).collect();
            let (grads, mut prefix) = (AdapterBuffers::new(&model).unwrap(), PrefixCache::new());
            let losses = grads.add_gradients_each(&model, &mut prefix, &rows, &active).unwrap();
            let mut want: BTreeMap<usize, BTreeMap<_, LoraWeights>> = BTreeMap::new();
            for ((e, &(_, a)), loss) in rows.iter().zip(pairs).zip(&losses) {
                let lora = ReferenceAdapter { adapter: &adapters[a], multiplier: 1.0, from: e.from };
                let (want_loss, g) = reference.lora_loss_and_grads(e.tokens, lora, e.targets);
                assert!((loss - want_loss).abs() < 1e-3 * want_loss.abs().max(1.0), "{what} {name}: loss {loss} vs reference {want_loss}");
                for (key, w) in g {
                    let sum = want
                        .entry(a)
                        .or_default()
                        .entry(key)
                        .or_insert_with(|| LoraWeights { a: vec![0.0; w.a.len()], b: vec![0.0; w.b.len()] });
                    sum.a.iter_mut().zip(&w.a).for_each(|(s, x)| *s += x);
                    sum.b.iter_mut().zip(&w.b).for_each(|(s, x)| *s += x);
                }
            }
            for (&a, want) in &want {
                let got = grads.read(&model, ids[a].id).unwrap();
                assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what} {name}: adapter {a}'s targets");
                for (key, g) in &got {
                    common::assert_close(&format!("{what} {name} adapter {a} {key:?} dA"), &g.a, &want[key].a, 2e-3);
                    common::assert_close(&format!("{what} {name} adapter {a} {key:?} dB"), &g.b, &want[key].b, 2e-3);
                }
            }
            // An adapter with no example in the call gains no gradient.
            for (a, id) in ids.iter().enumerate().filter(|(a, _)| !want.contains_key(a)) {
                assert!(
                    grads.read(&model, id.id).unwrap().values().all(|g| g.a.iter().chain(&g.b).all(|v| *v == 0.0)),
                    "{what} {name}: adapter {a}"
                );
            }
        }
        // One adapter per example, or the call is refused.
        let err =
            AdapterBuffers::new(&model).unwrap().add_gradients_each(&model, &mut PrefixCache::new(), &[example(0)], &ids[..2]).unwrap_err();
        assert!(err.to_string().contains("1 examples with 2 adapters"), "{err}");
    }
}

/// A conversation's next example longer than the cache its prefix is kept in (caches grow in
/// steps of 512 positions): the kept positions are copied into a cache with room instead of
/// computed again — continued in a later pass, and beside it in one pass — and the gradients are
/// those of examples computed from empty caches.
#[test]
fn a_prefix_outgrowing_its_kept_cache_is_copied_not_computed_again() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::{ActiveAdapter, Proj};
    use agentflux::model::ExampleRows;
    use agentflux::reference::{random_adapter, TinyModelSpec};
    let mut r = rng("prefix-outgrows");
    let mut spec = TinyModelSpec::new("llama", BlockFormat::Q8_0);
    spec.n_ctx = 1024;
    let (_, model) = tiny_models(&spec, &mut r, "prefix-outgrows");
    let c = model.config.clone();
    let adapter = random_adapter(&mut r, &c, 4, &Proj::ALL, 0.2);
    let id = ActiveAdapter::new(model.add_adapter("trained", &adapter).unwrap());
    let conversation: Vec<u32> = (0..600).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect();
    let (early, late) = ([302..306], [592..597]);
    let first = ExampleRows { tokens: &conversation[..310], from: 300, targets: &early };
    let second = ExampleRows { tokens: &conversation, from: 590, targets: &late };
    let fresh = AdapterBuffers::new(&model).unwrap();
    for e in [first, second] {
        fresh.add_gradients(&model, &mut PrefixCache::new(), &[e], id).unwrap();
    }
    let want = fresh.read(&model, id.id).unwrap();
    for (name, passes) in [("a later pass", vec![vec![first], vec![second]]), ("one pass", vec![vec![first, second]])] {
        let (grads, mut prefix) = (AdapterBuffers::new(&model).unwrap(), PrefixCache::new());
        for pass in &passes {
            grads.add_gradients(&model, &mut prefix, pass, id).unwrap();
        }
        assert_eq!((prefix.computed(), prefix.reused()), (590, 300), "{name}: positions computed, reused");
        for (key, g) in &grads.read(&model, id.id).unwrap() {
            common::assert_close(&format!("{name} {key:?} dA"), &g.a, &want[key].a, 1e-5);
            common::assert_close(&format!("{name} {key:?} dB"), &g.b, &want[key].b, 1e-5);
        }
    }
}

/// The same toy task learned on the GPU: gradients from the training kernels, AdamW applied in
/// place in the adapter packs; the engine's own forward then writes the sequence greedily.
/// (Quantized bases are covered by the gradient test above; this tiny random Q8_0 model only
/// learns more slowly.)
#[test]
fn toy_task_is_learned_on_the_gpu() {
    use agentflux::gguf::BlockFormat;
    use agentflux::lora::{ActiveAdapter, Proj};
    use agentflux::model::{Logits, Model, Sequence};
    use agentflux::reference::{random_adapter, TinyModelSpec};
    use agentflux::train::{AdamW, Schedule};
    let mut r = rng("gpu-toy");
    let spec = TinyModelSpec::new("llama", BlockFormat::F32);
    let model = Model::load(common::ctx(), &common::tiny_gguf(&spec, r.next_u64(), "gpu-toy")).unwrap();
    let c = model.config.clone();
    let mut init = random_adapter(&mut r, &c, 4, &Proj::ALL, 0.1);
    init.targets.values_mut().for_each(|w| w.b.iter_mut().for_each(|b| *b = 0.0));
    let id = model.add_adapter("toy", &init).unwrap();
    let adapter = ActiveAdapter::new(id);
    let state = AdapterTraining::new(&model).unwrap();
    let tokens: Vec<u32> = (0..12).map(|_| (r.next_u64() % c.n_vocab as u64) as u32).collect();
    let (from, targets) = (4, [5..12]);
    let (opt, schedule) = (AdamW::default(), Schedule { peak: 1e-2, min: 1e-3, warmup: 10, total: 400 });
    let mut losses = Vec::new();
    let mut prefix = PrefixCache::new();
    for t in 1..=schedule.total {
        losses.push(state.grads.add_gradient(&model, &mut prefix, &tokens, from, &targets, adapter).unwrap());
        state.step(&model, id, &opt, t, schedule.lr(t)).unwrap();
        if *losses.last().unwrap() < 0.03 {
            break;
        }
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    eprintln!("GPU toy task: loss {first:.3} → {last:.4} in {} steps", losses.len());
    assert!(first > 1.0 && last < 0.1, "loss {first:.3} → {last:.4}");
    // The trained weights moved, B away from its zero start.
    assert!(model.read_adapter_weights(id).unwrap().values().any(|w| w.b.iter().any(|v| *v != 0.0)));
    // Greedy decoding with the adapter (engine forward) reproduces the sequence.
    let mut kv = model.new_cache(tokens.len()).unwrap();
    let logits = model.forward_seqs(&mut [Sequence::adapted(&mut kv, &tokens, Some(adapter), from)], Logits::All).unwrap();
    let greedy: Vec<u32> = (5..12).map(|p| agentflux::reference::argmax(&logits[(p - 1) * c.n_vocab..][..c.n_vocab]) as u32).collect();
    assert_eq!(greedy, tokens[5..]);
}

/// `agentflux train` end to end on a tiny model carrying the real tokenizer: a few steps for the
/// selector and the tool's argument adapter, saved as PEFT directories with the manifest, which
/// `agentflux call --adapters` then loads and uses.
#[test]
fn train_command_writes_an_adapter_set_that_call_uses() {
    let Some(f) = default_model() else { return };
    let model = common::tiny_with_tokenizer(&f, rng("train-cli").next_u64(), "train-cli");
    let dir = std::env::temp_dir().join(format!("agentflux-train-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A tool without arguments too: its adapter learns the bare `{}`.
    let tools = json!([
        {"type": "function", "function": {"name": "read_text_file", "description": "Read a file.", "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 24}}, "required": ["path"]}}},
        {"type": "function", "function": {"name": "list_allowed_directories", "description": "The folders it may use.", "parameters": {"type": "object", "properties": {}, "required": []}}}
    ]);
    // Thirty lines of each tool, all different: the split places a line by its text, and each
    // tool's adapter needs some in the validation part.
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let messages = if i % 2 == 0 {
                json!([{"role": "user", "content": format!("Show notes/{i}.txt")}, call("c", "read_text_file", json!({"path": format!("notes/{i}.txt")})), {"role": "tool", "tool_call_id": "c", "content": "hi"}, {"role": "assistant", "content": "It says hi."}])
            } else {
                json!([{"role": "user", "content": "Which folders can you use?"}, call("c", "list_allowed_directories", json!({})), {"role": "tool", "tool_call_id": "c", "content": format!("/ws{i}")}, {"role": "assistant", "content": format!("Only /ws{i}.")}])
            };
            json!({"messages": messages, "tools": tools}).to_string()
        })
        .collect();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.join("set");
    let m = model.to_str().unwrap();
    // Without --data the tool set's seed file makes the data: none here, so a clear refusal.
    let (ok, _, err) = agentflux(&["train", "--model", m, "--toolset", out.to_str().unwrap()]);
    assert!(!ok && err.contains("no --data given") && err.contains("data/seed.json"), "{err}");
    let losses = dir.join("losses.jsonl");
    // The set trained into `set`: 2 steps of 2 examples at rank 2, validating at each.
    let train_set = |set: &std::path::Path, extra: &[&str]| {
        let data = data.to_str().unwrap();
        let mut args = vec!["train", "--model", m, "--data", data, "--toolset", set.to_str().unwrap()];
        args.extend(["--steps", "2", "--batch", "2", "--rank", "2", "--eval-every", "1"]);
        args.extend(extra);
        agentflux(&args)
    };
    let (ok, stdout, err) = train_set(&out, &["--loss-log", losses.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("wrote the adapter set"), "{stdout}");
    assert!(
        err.contains("[selector] step 2/2")
            && err.contains("[read_text_file] step 2/2")
            && err.contains("[list_allowed_directories] step 2/2")
            && err.contains("val ")
            && err.contains("the set: 4 adapters, 16 examples in "),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("nan"), "every loss is finite: {err}");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["selector"], "selector");
    assert_eq!(manifest["arguments"]["read_text_file"], "args/read_text_file");
    assert_eq!(manifest["tools"], json!(["list_allowed_directories", "read_text_file"]));
    assert_eq!(manifest["answer"], "answer");
    for sub in ["selector", "args/read_text_file", "args/list_allowed_directories", "answer"] {
        let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join(sub).join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!((config["r"].as_u64(), config["peft_type"].as_str()), (Some(2), Some("LORA")), "{config}");
        // Activated LoRA, invoked at the cue where inference activates it.
        let cue = if sub.starts_with("args/") { agentflux::toolcall::SCHEMA_CUE } else { agentflux::toolcall::SELECT_CUE };
        let tok = agentflux::text::Tokenizer::from_gguf(&f).unwrap();
        assert_eq!(config["alora_invocation_tokens"], json!(tok.encode(cue, false).unwrap()), "{config}");
        assert!(out.join(sub).join("adapter_model.safetensors").exists());
    }
    // --together: the same set, its adapters trained in rounds side by side in the same passes.
    let together = dir.join("together");
    let (ok, _, err) = train_set(&together, &["--together"]);
    assert!(ok, "{err}");
    assert!(err.contains("4 adapters together, 2 rounds") && err.contains("the set: 4 adapters, 16 examples in "), "{err}");
    let config = agentflux::hparams::ModelConfig::from_gguf(&agentflux::gguf::GgufFile::open(&model).unwrap()).unwrap();
    for sub in ["selector", "args/read_text_file", "args/list_allowed_directories", "answer"] {
        let load = |set: &std::path::Path| agentflux::lora::LoraAdapter::load_peft(set.join(sub), &config, &Default::default()).unwrap();
        let (alone, with_others) = (load(&out), load(&together));
        assert_eq!(alone.invocation_tokens, with_others.invocation_tokens, "{sub}");
        // Two warmup steps move B by a few 1e-4: saved as f16 (a rounding of about 1e-7 there),
        // the two agree within a hundredth of what the steps moved.
        let moved = alone.targets.values().flat_map(|w| &w.b).fold(0f32, |m, v| m.max(v.abs()));
        assert!(moved > 1e-4, "{sub}: B moved {moved}");
        for (key, w) in &alone.targets {
            common::assert_close(&format!("{sub} {key:?} B together"), &with_others.targets[key].b, &w.b, moved / 100.0);
        }
    }
    let tools_file = dir.join("tools.json");
    std::fs::write(&tools_file, tools.to_string()).unwrap();
    let (ok, stdout, err) = agentflux(&[
        "call",
        "--model",
        m,
        "--tools",
        tools_file.to_str().unwrap(),
        "--adapters",
        out.to_str().unwrap(),
        "Show notes/3.txt",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["candidates"].as_object().unwrap().contains_key("read_text_file"), "{v}");
    // Retraining one adapter of the set keeps the others in its manifest; --profile prints its
    // last step by phase and by kernel (the AdamW update among them).
    let (ok, stdout, err) = agentflux(&[
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--only",
        "read_text_file",
        "--steps",
        "2",
        "--batch",
        "2",
        "--rank",
        "2",
        "--profile",
        "--loss-log",
        losses.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // --loss-log: both runs' steps appended, the validation loss where one was measured (every
    // step of the first run, the last of the second).
    let logged: Vec<(String, u64, bool)> = std::fs::read_to_string(&losses)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert!(v["loss"].as_f64().unwrap().is_finite(), "{l}");
            (v["adapter"].as_str().unwrap().to_string(), v["step"].as_u64().unwrap(), v["val_loss"].is_f64())
        })
        .collect();
    let mut expected: Vec<(String, u64, bool)> = ["answer", "list_allowed_directories", "read_text_file", "selector"]
        .iter()
        .flat_map(|a| [(a.to_string(), 1, true), (a.to_string(), 2, true)])
        .collect();
    expected.extend([("read_text_file".to_string(), 1, false), ("read_text_file".to_string(), 2, true)]);
    let mut first_run = logged[..8].to_vec();
    first_run.sort();
    assert_eq!((first_run, &logged[8..]), (expected[..8].to_vec(), &expected[8..]), "{logged:?}");
    // tools/loss-chart draws a panel per adapter from it.
    let svg = dir.join("losses.svg");
    let drawn = std::process::Command::new("python3")
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/tools/loss-chart"), losses.to_str().unwrap(), svg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(drawn.status.success(), "{}", String::from_utf8_lossy(&drawn.stderr));
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(
        ["selector", "read_text_file", "answer", "list_allowed_directories"].iter().all(|a| svg.contains(a)) && svg.contains("<polyline"),
        "{svg}"
    );
    assert!(err.contains("[read_text_file] step 2/2") && err.contains(", training ") && !err.contains("[selector]"), "{err}");
    // The prefix positions its examples and validations needed: computed or taken from those kept.
    let positions: Vec<u64> = err
        .split("prefix positions ")
        .nth(1)
        .and_then(|s| s.split(" reused").next())
        .map(|s| s.split(" computed and ").map(|n| n.parse().unwrap()).collect())
        .unwrap_or_default();
    assert!(positions.len() == 2 && positions.iter().sum::<u64>() > 0, "{err}");
    assert!(stdout.contains("[read_text_file] step 2: 2 examples"), "{stdout}");
    for row in ["| forward |", "| backward |", "| optimizer |", "| host |", "| adamw | 2.0 |"] {
        assert!(stdout.contains(row), "--profile prints {row}: {stdout}");
    }
    // The phases account for every kernel, the transposed products and attention gradients
    // among the backward's.
    let cells = |row: &str| row.split('|').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect::<Vec<_>>();
    let phase =
        |p: &str| -> f64 { stdout.lines().map(cells).find(|c| c.first().is_some_and(|n| n == p)).map(|c| c[1].parse().unwrap()).unwrap() };
    let kernels: Vec<(String, f64)> = stdout
        .lines()
        .map(cells)
        .filter(|c| c.len() >= 4 && c[2].parse::<f64>().is_ok() && c[1].parse::<f64>().is_ok())
        .map(|c| (c[0].clone(), c[2].parse::<f64>().unwrap() / 1000.0))
        .collect();
    let sum = |keep: &dyn Fn(&str) -> bool| kernels.iter().filter(|(n, _)| keep(n)).map(|(_, s)| s).sum::<f64>();
    let all = sum(&|_| true);
    let gradients = sum(&|n| n.starts_with("quant_matmul_t_") || n.starts_with("attention_grad_"));
    assert!(gradients > 0.0 && phase("backward") >= gradients - 0.002, "{stdout}");
    assert!((phase("forward") + phase("backward") + phase("optimizer") - all).abs() < 0.005 + 1e-3 * kernels.len() as f64, "{stdout}");
    let after: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(after, manifest);
    // Runs that would train nothing are refused before anything is written: data without a usable
    // line, an --only naming no adapter of the data, zero steps, epochs or batch, or steps and
    // epochs both.
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "not a trajectory\n").unwrap();
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    for (args, says) in [
        (vec!["--data", empty.to_str().unwrap()], vec!["empty.jsonl: no training examples", "is left as it is"]),
        (vec!["--data", d, "--only", "read_txt_file"], vec!["--only read_txt_file: no training examples", "selector", "read_text_file"]),
        (vec!["--data", d, "--steps", "0"], vec!["--steps"]),
        (vec!["--data", d, "--batch", "0"], vec!["--batch"]),
        (vec!["--data", d, "--epochs", "0"], vec!["--epochs"]),
        (vec!["--data", d, "--epochs", "1", "--steps", "3"], vec!["--epochs", "cannot be used with", "--steps"]),
        // Checked before the adapter is allocated: a rank past the limit would exhaust memory.
        (vec!["--data", d, "--rank", "100000"], vec!["rank 100000: outside 1..=64"]),
        (vec!["--data", d, "--lr", "nan"], vec!["learning rate NaN"]),
    ] {
        let (ok, _, err) = agentflux(&[&["train", "--model", m, "--toolset", o][..], &args].concat());
        assert!(!ok && says.iter().all(|s| err.contains(s)), "{args:?}: {err}");
        let kept: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(kept, manifest, "{args:?} changed the set");
    }
    // --epochs: an adapter takes the steps that pass over its examples that many times.
    // --args-activation args: the argument adapter is saved as invoked at `args:`.
    let (ok, _, err) = agentflux(&[
        "train",
        "--model",
        m,
        "--toolset",
        o,
        "--data",
        d,
        "--only",
        "list_allowed_directories",
        "--epochs",
        "2",
        "--batch",
        "4",
        "--rank",
        "2",
        "--eval-every",
        "0",
        "--args-activation",
        "args",
    ]);
    assert!(ok, "{err}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args/list_allowed_directories/adapter_config.json")).unwrap()).unwrap();
    let tok = agentflux::text::Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(config["alora_invocation_tokens"], json!(tok.encode(agentflux::toolcall::ARGS_CUE, false).unwrap()), "{config}");
    let n: u64 = err.split("[list_allowed_directories] ").find_map(|s| s.split(" examples, ").next()?.parse().ok()).unwrap();
    let steps = (2 * n).div_ceil(4);
    assert!(err.contains(&format!("[list_allowed_directories] step {steps}/{steps} ")), "{n} examples: {err}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&model).ok();
}

/// A tiny random llama model with Q8_0 weights, loaded on the test device.
fn tiny_q8_model(r: &mut agentflux::decode::SplitMix64, tag: &str) -> agentflux::model::Model {
    tiny_models(&agentflux::reference::TinyModelSpec::new("llama", agentflux::gguf::BlockFormat::Q8_0), r, tag).1
}

/// A tiny random model of `spec`, as the f32 reference and as the engine loads it.
fn tiny_models(
    spec: &agentflux::reference::TinyModelSpec,
    r: &mut agentflux::decode::SplitMix64,
    tag: &str,
) -> (agentflux::reference::ReferenceModel, agentflux::model::Model) {
    use agentflux::gguf::GgufFile;
    let path = std::env::temp_dir().join(format!("agentflux-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, agentflux::reference::tiny_model(spec, r.next_u64())).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let models =
        (agentflux::reference::ReferenceModel::from_gguf(&file).unwrap(), agentflux::model::Model::load(common::ctx(), &file).unwrap());
    std::fs::remove_file(&path).ok();
    models
}

/// A run interrupted after step 2 and resumed from its checkpoint ends with exactly the weights
/// of the same run done in one go (weights, AdamW moments, step and example order restored).
#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    use agentflux::train::{train_adapter, AdapterRole, Example, TrainOptions};
    let mut r = rng("resume");
    let model = tiny_q8_model(&mut r, "resume");
    let n_vocab = model.config.n_vocab as u64;
    let examples: Vec<Example> = (0..5)
        .map(|i| Example {
            role: AdapterRole::Selector,
            tokens: (0..10).map(|_| (r.next_u64() % n_vocab) as u32).collect(),
            active_from: 3,
            targets: vec![5..10],
            line: i,
            name: "t".into(),
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("agentflux-ckpt-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let opts = TrainOptions { rank: 2, steps: 4, batch: 2, lr: 1e-2, eval_every: 0, seed: 7, ..Default::default() };
    let (straight, _) = train_adapter(&model, "straight", &examples, &examples[..1], &opts, |_| {}).unwrap();
    let ckpt = TrainOptions { checkpoint: Some(dir.clone()), ..opts.clone() };
    let mut steps = Vec::new();
    train_adapter(&model, "part1", &examples, &examples[..1], &TrainOptions { stop_after: Some(2), ..ckpt.clone() }, |p| {
        steps.push(p.step)
    })
    .unwrap();
    let (resumed, _) = train_adapter(&model, "part2", &examples, &examples[..1], &ckpt, |p| steps.push(p.step)).unwrap();
    assert_eq!(steps, [1, 2, 3, 4], "two steps, then the last two after resuming");
    assert!(dir.join("state.json").exists() && dir.join("adapter/adapter_model.safetensors").exists());
    for (key, w) in &straight.targets {
        assert_eq!(w, &resumed.targets[key], "{key:?}: the resumed run differs");
    }
    assert!(straight.targets.values().any(|w| w.b.iter().any(|v| *v != 0.0)), "training moved B");
    std::fs::remove_dir_all(&dir).ok();
    // Continued training starts from the given adapter (its rank, not the options'): with a zero
    // learning rate it comes back unchanged, with the run's rate it moves on from there.
    let from = |lr: f32| TrainOptions { init: Some(straight.clone()), rank: 4, lr, min_lr: lr / 10.0, ..opts.clone() };
    let (still, _) = train_adapter(&model, "still", &examples, &examples[..1], &from(0.0), |_| {}).unwrap();
    assert_eq!(still.rank, straight.rank);
    assert_eq!(still.targets, straight.targets, "a zero learning rate keeps the initial adapter");
    let (moved, _) = train_adapter(&model, "moved", &examples, &examples[..1], &from(1e-2), |_| {}).unwrap();
    assert!(moved.targets.iter().any(|(key, w)| w != &straight.targets[key]), "continued training moved the weights");
}

/// Adapters trained together — in rounds, each round's steps of every adapter in the same passes —
/// come out as each one trained alone with the same options: the same examples in the same
/// order, each row under its own adapter. Three adapters of different ranks, step counts and
/// validation schedules, two of them on the same conversations (the prefixes they share computed
/// once); each one's progress is reported step by step.
#[test]
fn adapters_trained_together_end_as_trained_alone() {
    use agentflux::train::{train_adapter, train_together, AdapterRole, AdapterRun, Example, TrainOptions};
    let mut r = rng("together");
    let model = tiny_q8_model(&mut r, "together");
    let n_vocab = model.config.n_vocab as u64;
    let conversations: Vec<Vec<u32>> = (0..6).map(|_| (0..12).map(|_| (r.next_u64() % n_vocab) as u32).collect()).collect();
    let examples = |from: usize, targets: std::ops::Range<usize>| -> Vec<Example> {
        conversations
            .iter()
            .enumerate()
            .map(|(line, tokens)| Example {
                role: AdapterRole::Selector,
                tokens: tokens.clone(),
                active_from: from,
                targets: vec![targets.clone()],
                line,
                name: "t".into(),
            })
            .collect()
    };
    let (first, second, third) = (examples(3, 5..8), examples(7, 9..12), examples(2, 4..12));
    let opts = TrainOptions { rank: 2, steps: 5, batch: 2, lr: 1e-2, eval_every: 2, seed: 3, ..Default::default() };
    let runs = [
        AdapterRun { name: "first".into(), train: &first, val: &first[..2], opts: opts.clone() },
        AdapterRun { name: "second".into(), train: &second, val: &second[..1], opts: TrainOptions { rank: 4, steps: 3, ..opts.clone() } },
        AdapterRun { name: "third".into(), train: &third, val: &[], opts: TrainOptions { steps: 4, batch: 3, seed: 9, ..opts.clone() } },
    ];
    let mut reported: Vec<(usize, u64)> = Vec::new();
    let together = train_together(&model, &runs, &mut PrefixCache::new(), |i, p| reported.push((i, p.step))).unwrap();
    let want: Vec<(usize, u64)> =
        (1..=5).flat_map(|s| [(0, s), (1, s), (2, s)].into_iter().filter(move |&(i, s)| s <= [5, 3, 4][i])).collect();
    assert_eq!(reported, want, "each adapter's steps, round by round");
    for (run, (adapter, eval)) in runs.iter().zip(&together) {
        let (alone, alone_eval) = train_adapter(&model, &run.name, run.train, run.val, &run.opts, |_| {}).unwrap();
        assert_eq!((adapter.rank, adapter.alpha), (alone.rank, alone.alpha), "{}", run.name);
        assert_eq!(eval.is_some(), alone_eval.is_some(), "{}", run.name);
        if let (Some(e), Some(w)) = (eval, alone_eval) {
            assert!((e - w).abs() < 1e-4 * w.abs().max(1.0), "{}: best validation loss {e} together, {w} alone", run.name);
        }
        assert_eq!(adapter.targets.keys().collect::<Vec<_>>(), alone.targets.keys().collect::<Vec<_>>());
        for (key, w) in &alone.targets {
            common::assert_close(&format!("{} {key:?} A", run.name), &adapter.targets[key].a, &w.a, 1e-4);
            common::assert_close(&format!("{} {key:?} B", run.name), &adapter.targets[key].b, &w.b, 1e-4);
        }
        assert!(alone.targets.values().any(|w| w.b.iter().any(|v| *v != 0.0)), "{}: training moved B", run.name);
    }
    // A run that cannot train is refused by name before any adapter is made resident.
    let bad = [runs[0].clone(), AdapterRun { name: "empty".into(), train: &[], val: &[], opts: opts.clone() }];
    let err = train_together(&model, &bad, &mut PrefixCache::new(), |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("empty: no training examples"), "{err}");
    assert!(model.adapters().unwrap().0.is_empty(), "no adapter left resident");
    // More adapters than may be resident at once: refused with what to do, and the ones made
    // resident before are removed.
    let limit = model.lora_limits().unwrap().max_adapters;
    let many: Vec<AdapterRun> = (0..=limit).map(|i| AdapterRun { name: format!("a{i}"), ..runs[0].clone() }).collect();
    let err = train_together(&model, &many, &mut PrefixCache::new(), |_, _| {}).unwrap_err().to_string();
    assert!(err.contains(&format!("{} adapters trained together are all resident at once", limit + 1)), "{err}");
    assert!(model.adapters().unwrap().0.is_empty(), "no adapter left resident");
}

/// The adapter a run returns is the one of its lowest validation loss, not its last: trained to
/// continue a sequence one way and validated on the same start continued another way, the
/// validation loss ends higher than its lowest, and the returned weights give that lowest loss
/// when scored afresh. A few drawings in a hundred train the validation loss down to its last
/// step, which leaves nothing to choose; such a drawing is replaced by the next.
#[test]
fn the_weights_of_the_best_validation_are_kept() {
    use agentflux::lora::ActiveAdapter;
    use agentflux::train::{train_adapter, AdapterRole, Example, TrainOptions};
    let mut r = rng("keep-best");
    let model = tiny_q8_model(&mut r, "best");
    let n_vocab = model.config.n_vocab as u64;
    let example = |line: usize, tokens: Vec<u32>| Example {
        role: AdapterRole::Selector,
        tokens,
        active_from: 3,
        targets: vec![5..10],
        line,
        name: "t".into(),
    };
    let opts = TrainOptions { rank: 4, steps: 12, batch: 2, lr: 1e-2, eval_every: 1, seed: 3, ..Default::default() };
    let mut drawings = Vec::new();
    let (adapter, loss, seen, val) = loop {
        assert!(drawings.len() < 8, "no drawing left a validation loss lower than its last: {drawings:?}");
        let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| (r.next_u64() % n_vocab) as u32).collect() };
        let start = draw(5);
        let trained = [start.clone(), draw(5)].concat();
        let train: Vec<Example> = (0..2).map(|i| example(i, trained.clone())).collect();
        let val = [example(2, [start, draw(5)].concat())];
        let mut seen = Vec::new();
        let (adapter, loss) = train_adapter(&model, "best", &train, &val, &opts, |p| seen.push(p.eval_loss.unwrap())).unwrap();
        eprintln!("validation losses {seen:?}");
        let lowest = seen.iter().copied().fold(f32::INFINITY, f32::min);
        if *seen.last().unwrap() > lowest + 1e-3 {
            break (adapter, loss, seen, val);
        }
        drawings.push(seen);
    };
    let lowest = seen.iter().copied().fold(f32::INFINITY, f32::min);
    assert_eq!(loss, Some(lowest));
    let id = model.add_adapter("check", &adapter).unwrap();
    let mut prefix = PrefixCache::new();
    let again: f32 = val
        .iter()
        .map(|e| agentflux::model::example_loss(&model, &mut prefix, &e.tokens, e.active_from, &e.targets, ActiveAdapter::new(id)).unwrap())
        .sum::<f32>()
        / val.len() as f32;
    assert!((again - lowest).abs() < 1e-4, "the returned weights score {again}, the best validation {lowest}");
}

/// An example no pass can take — more active rows than a pass holds, among good ones in either
/// split — stops training before the first step, naming its data line; nothing is left loaded.
#[test]
fn an_example_too_long_for_a_pass_is_refused_before_training() {
    use agentflux::train::{train_adapter, AdapterRole, Example, TrainOptions};
    let mut r = rng("too-long");
    let model = tiny_q8_model(&mut r, "too-long");
    let example = |line: usize, n: usize| Example {
        role: AdapterRole::Answer,
        tokens: (0..n as u32).map(|t| t % model.config.n_vocab as u32).collect(),
        active_from: 2,
        targets: vec![3..n],
        line,
        name: "finish".into(),
    };
    let opts = TrainOptions { rank: 4, steps: 2, batch: 2, ..Default::default() };
    for (train, val) in [(vec![example(1, 20), example(7, 300)], vec![example(9, 20)]), (vec![example(1, 20)], vec![example(7, 300)])] {
        let mut steps = 0;
        let err = train_adapter(&model, "answer", &train, &val, &opts, |_| steps += 1).unwrap_err().to_string();
        assert!(err.contains("data line 7") && err.contains("297 rows from the activation point to the last target"), "{err}");
        assert_eq!(steps, 0, "a step was taken before the refusal");
        assert_eq!(model.adapters().unwrap().0.len(), 0, "the adapter stayed loaded");
    }
}
