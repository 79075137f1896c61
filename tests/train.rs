//! Training data for the decoupled adapters: the examples' token sequences are the prompts
//! inference builds, their loss masks cover exactly the selector's names and the arguments, and
//! the argument targets are sequences the schema constraint itself would produce. Checked with
//! the real filesystem MCP server's tool schemas and SmolLM2's real tokenizer on a tiny random
//! transformer.

mod common;

use agentflux::mcp::{McpClient, ServerOptions};
use agentflux::session::Session;
use agentflux::text::ChatMessage;
use agentflux::toolcall::{AdapterSet, CallEvent, Catalog, ConstraintFactory, ToolCaller, ToolChoice, FINISH, MAX_RESULT_CHARS};
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
    let mut mem_server = McpClient::spawn(&format!("env MEMORY_FILE_PATH={} {}", root.join("m.jsonl").display(), memory.display()), ServerOptions::default()).unwrap();
    let mem_tools = mem_server.list_tools().unwrap();
    let openai = |tools: &[agentflux::mcp::Tool]| -> Value {
        tools.iter().map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}})).collect()
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
    let examples = decoupled_examples(&caller, &trajectories, 4096, &mut report).unwrap();
    let roles: Vec<&AdapterRole> = examples.iter().map(|e| &e.role).collect();
    let args = |t: &str| AdapterRole::Arguments(t.into());
    assert_eq!(roles, [&AdapterRole::Selector, &args("read_text_file"), &AdapterRole::Selector, &args("edit_file"), &AdapterRole::Selector]);

    // The masks cover the names the selector writes and the arguments' JSON, nothing else.
    let text = |e: &agentflux::train::Example| -> Vec<String> { e.targets.iter().map(|r| tok.decode(&e.tokens[r.clone()], false).unwrap()).collect() };
    assert_eq!(text(&examples[0]), [" read_text_file\n"]);
    assert_eq!(text(&examples[1]), ["{\"path\":\"notes/todo.txt\"}"]);
    assert_eq!(text(&examples[3]), ["{\"path\":\"notes/todo.txt\",\"edits\":[{\"oldText\":\"mlik\",\"newText\":\"milk\"}],\"dryRun\":false}"]);
    assert_eq!(text(&examples[4]), [format!(" {FINISH}\n")]);
    for e in &examples {
        assert!(e.active_from <= e.targets[0].start && e.targets.last().unwrap().end <= e.tokens.len(), "{:?}", e.role);
    }
    // The selector's example is the argument example's beginning: one layout for both.
    assert_eq!(examples[1].tokens[..examples[0].tokens.len()], examples[0].tokens[..]);

    // The argument targets are exactly what the schema constraint lets the decoder write.
    let factory = ConstraintFactory::new(tok.clone()).unwrap();
    for e in examples.iter().filter(|e| e.role != AdapterRole::Selector) {
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
        let examples = decoupled_examples(&caller, &ts, 4096, &mut report).unwrap();
        let turns: Vec<_> = ts[0].turns().collect();
        let arg_examples = examples.iter().filter(|e| e.role != AdapterRole::Selector);
        for (e, (before, _)) in arg_examples.zip(turns.iter().filter(|(_, t)| matches!(t, agentflux::toolcall::AssistantTurn::Call { .. }))) {
            let AdapterRole::Arguments(name) = &e.role else { unreachable!() };
            let context: Vec<ChatMessage> = before.iter().map(|m| m.chat.clone()).collect();
            let mut session = Session::new(&model, 4096).unwrap();
            // Stopped at the first argument token: the prompt is what is compared.
            let stop = |e: CallEvent| if matches!(e, CallEvent::ArgumentToken(_)) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
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

    // Over-length conversations are dropped whole, with the reason.
    let (ts, mut report) = read_trajectories(&line, MAX_RESULT_CHARS);
    assert!(decoupled_examples(&caller, &ts, 64, &mut report).unwrap().is_empty());
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
            let messages = json!([{"role": "user", "content": format!("Show notes/{i}.txt")}, call("c", "read_text_file", json!({"path": format!("notes/{i}.txt")})), {"role": "tool", "tool_call_id": "c", "content": "hi"}, {"role": "assistant", "content": "It says hi."}]);
            json!({"messages": messages, "tools": tools}).to_string()
        })
        .collect();
    lines.push(json!({"messages": [{"role": "user", "content": "x"}, call("c", "read_text_file", json!({"file": "a"}))], "tools": tools}).to_string());
    lines.push("{broken".into());
    let dir = std::env::temp_dir().join(format!("agentflux-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out_dir = dir.join("split");
    let (ok, out, err) = agentflux(&["data", "check", file.to_str().unwrap(), "--seed", "3", "--out", out_dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("22 lines read, 20 kept, 2 dropped"), "{out}");
    assert!(out.contains("line 21: read_text_file: $: the required key \"path\" is missing") && out.contains("NotJson: 1"), "{out}");
    assert!(out.contains("selector: 40 examples") && out.contains("arguments of read_text_file: 20 examples"), "{out}");
    let count = |p: &str| std::fs::read_to_string(out_dir.join(p)).unwrap().lines().count();
    assert_eq!((count("train.jsonl"), count("val.jsonl"), count("test.jsonl")), (16, 2, 2));
    let (ok, _, err) = agentflux(&["data", "check", "/nonexistent.jsonl"]);
    assert!(!ok && err.contains("/nonexistent.jsonl"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
