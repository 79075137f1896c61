//! Training data made offline (`agentflux data synth`) against the real filesystem MCP server,
//! and the hand-written dev set kept apart from the synthesizer's seed.

mod common;

use agentflux::mcp::{McpClient, ServerOptions};
use agentflux::text::{ChatTemplate, Tokenizer};
use agentflux::toolcall::{read_messages, schema, ArgumentCue, AssistantTurn, ToolCaller, FINISH, MAX_RESULT_CHARS};
use agentflux::train::{decoupled_examples, read_trajectories, synthesize, AdapterRole, Seed, SynthOptions};
use common::{agentflux, default_model, filesystem_server};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SEED: &str = "adapters/filesystem/data/seed.json";
/// The two hand-written dev sets: the first, and the second written before the set was trained
/// on widened data (neither tuned against).
const DEVS: [&str; 2] = ["adapters/filesystem/data/dev.jsonl", "adapters/filesystem/data/dev2.jsonl"];
/// Requests over tools nobody trained adapters for.
const UNFAMILIAR: &str = "adapters/unfamiliar/data/dev.jsonl";

fn workspace(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentflux-synth-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

fn start(seed: &Seed, ws: &Path) -> McpClient {
    seed.reset_workspace(ws).unwrap();
    McpClient::spawn(&seed.server_command(ws), ServerOptions::default()).unwrap()
}

fn synth(seed: &Seed, ws: &Path, opts: &SynthOptions) -> (Vec<String>, agentflux::train::SynthReport) {
    let mut server = start(seed, ws);
    let mut lines = Vec::new();
    let report = synthesize(seed, &mut server, opts, |_, l| {
        lines.push(l.to_string());
        Ok(())
    })
    .unwrap();
    (lines, report)
}

/// Tool calls of a line: (name, arguments, the real result).
fn calls(line: &str) -> Vec<(String, Value, String)> {
    let v: Value = serde_json::from_str(line).unwrap();
    let msgs = v["messages"].as_array().unwrap();
    let mut out = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        for c in m["tool_calls"].as_array().into_iter().flatten() {
            let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            let result = msgs[i + 1]["content"].as_str().unwrap().to_string();
            out.push((c["function"]["name"].as_str().unwrap().to_string(), args, result));
        }
    }
    out
}

#[test]
fn synthesized_conversations_are_valid_varied_and_carry_real_results() {
    if filesystem_server().is_none() {
        return;
    }
    let seed = Seed::load(Path::new(SEED)).unwrap();
    let ws = workspace("lib");
    let opts = SynthOptions { conversations: 60, seed: 5, workspace: ws.clone(), ..Default::default() };
    let (lines, report) = synth(&seed, &ws, &opts);
    assert_eq!(lines.len(), 60);
    eprintln!("{}", report.summary());

    // Every line is a valid trajectory: calls of listed tools with schema-valid arguments.
    let (trajectories, dropped) = read_trajectories(&lines.join("\n"), MAX_RESULT_CHARS);
    assert_eq!((trajectories.len(), dropped.dropped.len()), (60, 0), "{}", dropped.summary(3));

    // Varied: every tool of the seed, every style, chains, requests without a tool, distractors,
    // conversations of one to three requests.
    let called: BTreeSet<&str> = report.calls.keys().map(String::as_str).collect();
    let seeded: BTreeSet<&str> = seed.tools.keys().map(String::as_str).collect();
    assert!(called.is_superset(&seeded), "tools never called: {:?}", seeded.difference(&called).collect::<Vec<_>>());
    let styles: BTreeSet<&str> = seed
        .tools
        .values()
        .flat_map(|t| &t.forms)
        .flat_map(|f| f.phrasings.iter().filter(|(_, v)| !v.is_empty()).map(|(k, _)| k.as_str()))
        .collect();
    assert_eq!(report.styles.keys().map(String::as_str).collect::<BTreeSet<_>>(), styles);
    assert!(styles.len() >= 4, "the filesystem seed phrases requests in four styles: {styles:?}");
    assert!(report.chains > 0 && report.finish_requests > 0 && report.distractors > 0, "{report:?}");
    assert_eq!(report.lengths.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    let multi = lines.iter().filter(|l| calls(l).len() >= 2).count();
    assert!(multi > 0, "no conversation with two calls or more");

    // Real results: a whole-file read returns the seeded text, a listing names seeded entries,
    // an edit of a seeded case really applies (the server answers with a diff).
    // Conversations in shaped folders read the same seeded files there.
    let mut checked = BTreeMap::new();
    for line in &lines {
        let mut changed = BTreeSet::new();
        for (name, args, result) in calls(line) {
            let path = args.get("path").and_then(Value::as_str).unwrap_or("");
            let seeded = seed.workspace.files.iter().find(|(rel, _)| path.ends_with(&format!("/{rel}")));
            match name.as_str() {
                "read_text_file" if args.get("head").is_none() && args.get("tail").is_none() && !changed.contains(path) => {
                    if let Some((_, text)) = seeded {
                        assert_eq!(result.trim_end(), text.trim_end(), "{path}");
                        *checked.entry("read").or_insert(0) += 1;
                    }
                }
                "list_directory" if path == ws.to_string_lossy() => {
                    assert!(result.contains("[DIR] notes") && result.contains("[FILE] budget.txt"), "{result}");
                    *checked.entry("list").or_insert(0) += 1;
                }
                "edit_file" => {
                    assert!(result.contains("diff") || result.contains("@@"), "{result}");
                    *checked.entry("edit").or_insert(0) += 1;
                }
                _ => {}
            }
            for key in ["path", "destination"] {
                changed.extend(args.get(key).and_then(Value::as_str).filter(|_| name != "read_text_file").map(str::to_string));
            }
        }
    }
    assert!(checked.contains_key("read") && checked.contains_key("edit"), "{checked:?}");

    // Refused calls: shown with weight 0, answered by the server's error, then the right call on
    // the same path (a tool's mistake) or on the folder of the guessed name (a chain's); one per
    // recovery the report counts.
    let mut refused = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        for (i, m) in msgs.iter().enumerate().filter(|(_, m)| m["weight"] == 0) {
            let path = |m: &Value| -> Value {
                let args = m["tool_calls"][0]["function"]["arguments"].as_str().unwrap();
                serde_json::from_str::<Value>(args).unwrap()["path"].clone()
            };
            let error = msgs[i + 1]["content"].as_str().unwrap();
            assert!(["ENOTDIR", "EISDIR", "ENOENT", "rror"].iter().any(|e| error.contains(e)), "{error}");
            let next = &msgs[i + 2];
            assert!(next["tool_calls"].is_array() && next.get("weight").is_none(), "{next}");
            assert_ne!(next["tool_calls"][0]["function"]["name"], m["tool_calls"][0]["function"]["name"]);
            let (guess, right) = (path(m), path(next));
            let folder = guess.as_str().and_then(|g| g.rsplit_once('/')).map(|(dir, _)| dir);
            assert!(right == guess || right.as_str() == folder, "the right call is on the same path or its folder: {guess} then {right}");
            refused += 1;
        }
    }
    assert!(refused > 0 && refused == report.recoveries, "{refused} refused calls, {} recoveries", report.recoveries);

    // Paths of many shapes, all inside the server's root: about half the conversations live in
    // folders like `tmp.x7QzR2bK9a`, `Team notes`, `v1.2.3`, `work-1997`, nested.
    assert!((15..=45).contains(&report.shaped_roots), "{} of 60 in shaped folders", report.shaped_roots);
    let ws_prefix = format!("{}/", ws.display());
    let paths: Vec<String> = lines
        .iter()
        .flat_map(|l| calls(l))
        .flat_map(|(_, a, _)| ["path", "source", "destination"].map(|k| a.get(k).and_then(Value::as_str).map(str::to_string)))
        .flatten()
        .collect();
    assert!(paths.iter().all(|p| p.starts_with(&ws_prefix) || *p == ws.to_string_lossy()), "{paths:?}");
    let inner: Vec<&str> = paths.iter().filter_map(|p| p.strip_prefix(&ws_prefix)).collect();
    for shape in ["tmp.", " ", "v", "-", "_"] {
        assert!(
            inner.iter().any(|p| p.split('/').next().is_some_and(|first| first.contains(shape) && !seed_top(&seed, first))),
            "no folder with {shape:?}"
        );
    }

    // The same seed makes the same requests and calls (results may carry timestamps).
    let (again, _) = synth(&seed, &ws, &opts);
    let requests = |ls: &[String]| ls.iter().map(|l| calls(l).into_iter().map(|(n, a, _)| (n, a)).collect::<Vec<_>>()).collect::<Vec<_>>();
    assert_eq!(requests(&again), requests(&lines));
    let other = synth(&seed, &ws, &SynthOptions { seed: 6, ..opts.clone() }).0;
    assert_ne!(requests(&other), requests(&lines));

    // They become decoupled examples: a selector example per assistant action, an argument
    // example per call, an answer example per final answer, laid out by the real tokenizer and
    // template.
    if let Some(f) = default_model() {
        let tok = Arc::new(Tokenizer::from_gguf(&f).unwrap());
        let caller = ToolCaller::new(tok.clone(), ChatTemplate::from_gguf(&f, &tok).unwrap()).unwrap();
        let mut rep = dropped;
        let examples = decoupled_examples(&caller, &trajectories, 4096, ArgumentCue::Schema, &mut rep).unwrap();
        let n_calls: usize = report.calls.values().sum();
        let actions: usize = trajectories.iter().map(|t| t.turns().count()).sum();
        let count = |f: fn(&AdapterRole) -> bool| examples.iter().filter(|e| f(&e.role)).count();
        let texts = trajectories.iter().flat_map(|t| t.turns()).filter(|(_, turn)| matches!(turn, AssistantTurn::Text)).count();
        assert_eq!(
            (
                count(|r| *r == AdapterRole::Selector),
                count(|r| matches!(r, AdapterRole::Arguments(_))),
                count(|r| *r == AdapterRole::Answer)
            ),
            (actions, n_calls, texts)
        );
        assert!(texts > 0);
    }
    std::fs::remove_dir_all(&ws).ok();
}

/// A seed whose one chain lists a folder and reads a file its request only describes (two cases:
/// the sales figures in `data`, the to-do list in `notes`), with `mistakes` made first.
fn described_chain_seed(mistakes: Value) -> Seed {
    serde_json::from_value(serde_json::json!({
        "server": Seed::load(Path::new(SEED)).unwrap().server,
        "workspace": {"files": {"data/sales.csv": "month,amount\n2026-10,1430\n", "data/users.json": "[]\n", "notes/todo.txt": "buy milk\n"}},
        "values": {"dir": ["{ws}/data"], "file": ["{ws}/data/users.json"], "guess": ["sales.txt", "todo.txt"]},
        "tools": {"read_text_file": {"forms": [{"arguments": {"path": "{file}"}, "phrasings": {"q": ["Read {file}."]}}], "answer": "{result}"}},
        "chains": [{
            "calls": [{"name": "list_directory", "arguments": {"path": "{dir}"}}, {"name": "read_text_file", "arguments": {"path": "{file}"}}],
            "phrasings": ["Look through {dir} and open the {about}."],
            "cases": [{"dir": "{ws}/data", "file": "{ws}/data/sales.csv", "about": "sales figures"}, {"dir": "{ws}/notes", "file": "{ws}/notes/todo.txt", "about": "to-do list"}],
            "mistakes": mistakes
        }],
        "finish": {"requests": ["hi"], "answers": ["hello"]}
    }))
    .unwrap()
}

/// A chain whose request describes a file (a case binds the folder, the file and the words for
/// it): the request never names the file, the listing that comes first does, and the read is
/// of that listed file.
#[test]
fn a_chain_case_describes_a_file_that_only_the_listing_names() {
    if filesystem_server().is_none() {
        return;
    }
    let seed = described_chain_seed(serde_json::json!([]));
    let ws = workspace("chain-case");
    let opts = SynthOptions { conversations: 12, seed: 3, workspace: ws.clone(), chain_rate: 1.0, finish_rate: 0.0, ..Default::default() };
    let (lines, report) = synth(&seed, &ws, &opts);
    assert_eq!(report.chains, report.lengths.iter().map(|(n, c)| n * c).sum::<usize>(), "every request is the chain");
    let mut abouts = BTreeSet::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let requests: Vec<&str> =
            v["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user").filter_map(|m| m["content"].as_str()).collect();
        let calls = calls(line);
        assert_eq!(calls.len(), 2 * requests.len());
        for (request, pair) in requests.iter().zip(calls.chunks(2)) {
            let ((list, dir, listing), (read, file, text)) = (&pair[0], &pair[1]);
            assert_eq!((list.as_str(), read.as_str()), ("list_directory", "read_text_file"));
            let (dir, file) = (dir["path"].as_str().unwrap(), file["path"].as_str().unwrap());
            let (parent, leaf) = file.rsplit_once('/').unwrap();
            assert_eq!(parent, dir, "the file the case binds lies in the folder it binds");
            assert!(listing.contains(&format!("[FILE] {leaf}")), "the listing names the file: {listing}");
            assert!(!request.contains(leaf) && request.contains(dir), "{request}");
            assert!(!text.is_empty() && !text.contains("rror"), "the read works: {text}");
            let about = if leaf == "sales.csv" { "sales figures" } else { "to-do list" };
            assert!(request.contains(about), "the request describes the file by its own case: {request}");
            abouts.insert(about);
        }
    }
    assert_eq!(abouts.len(), 2, "both cases drawn");
    std::fs::remove_dir_all(&ws).ok();
}

/// A chain's mistake (reading a guessed name in the described folder) comes first, shown with
/// weight 0, only where the server refuses it; the listing and the read follow as before.
#[test]
fn a_chain_mistake_is_a_refused_guess_before_the_listing() {
    if filesystem_server().is_none() {
        return;
    }
    let seed = described_chain_seed(serde_json::json!([{"name": "read_text_file", "arguments": {"path": "{dir}/{guess}"}}]));
    let ws = workspace("chain-mistake");
    let opts = SynthOptions {
        conversations: 12,
        seed: 5,
        workspace: ws.clone(),
        chain_rate: 1.0,
        finish_rate: 0.0,
        mistake_rate: 1.0,
        ..Default::default()
    };
    let (lines, report) = synth(&seed, &ws, &opts);
    let mut refused = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        for turn in msgs.split(|m| m["role"] == "user").skip(1) {
            let called: Vec<(&Value, &Value)> =
                turn.iter().enumerate().filter(|(_, m)| m["tool_calls"].is_array()).map(|(i, m)| (m, &turn[i + 1])).collect();
            let names: Vec<&str> = called.iter().map(|(m, _)| m["tool_calls"][0]["function"]["name"].as_str().unwrap()).collect();
            let (shown, learned) = called.split_at(called.len() - 2);
            assert_eq!(names[names.len() - 2..], ["list_directory", "read_text_file"], "{names:?}");
            assert!(learned.iter().all(|(m, _)| m.get("weight").is_none()), "the listing and the read are learned");
            if let [(mistake, result)] = shown {
                let args: Value = serde_json::from_str(mistake["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
                let dir: Value = serde_json::from_str(learned[0].0["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
                assert_eq!(mistake["weight"], 0, "the guess is shown, not learned");
                assert_eq!(names[0], "read_text_file");
                let guess = args["path"].as_str().unwrap();
                assert_eq!(guess.rsplit_once('/').unwrap().0, dir["path"].as_str().unwrap(), "the guess is in the described folder");
                assert!(result["content"].as_str().unwrap().contains("ENOENT"), "kept only when refused: {result}");
                refused += 1;
            } else {
                assert!(shown.is_empty(), "{names:?}");
            }
        }
    }
    assert_eq!(refused, report.recoveries);
    assert!(refused > 0 && refused < report.chains, "{refused} of {} chained requests: a guess that exists is dropped", report.chains);
    std::fs::remove_dir_all(&ws).ok();
}

/// A chain's own `mistake_rate` overrides `--mistake-rate` both ways: at 1 its guess is made
/// before every request (and kept wherever refused) though the option says 0, at 0 never though
/// the option says 1; a share outside 0..=1 is refused when the seed is read.
#[test]
fn a_chain_mistake_rate_overrides_the_option() {
    if filesystem_server().is_none() {
        return;
    }
    let guess = serde_json::json!([{"name": "read_text_file", "arguments": {"path": "{dir}/{guess}"}}]);
    let ws = workspace("chain-rate");
    let opts = |rate| SynthOptions {
        conversations: 12,
        seed: 5,
        workspace: ws.clone(),
        chain_rate: 1.0,
        finish_rate: 0.0,
        mistake_rate: rate,
        ..Default::default()
    };
    let mut seed = described_chain_seed(guess);
    let (_, by_option) = synth(&seed, &ws, &opts(1.0));
    seed.chains[0].mistake_rate = Some(1.0);
    let (_, always) = synth(&seed, &ws, &opts(0.0));
    assert_eq!(always.recoveries, by_option.recoveries, "a rate of 1 in the seed draws as --mistake-rate 1 does");
    assert!(always.recoveries > 0);
    seed.chains[0].mistake_rate = Some(0.0);
    let (_, never) = synth(&seed, &ws, &opts(1.0));
    assert_eq!(never.recoveries, 0);
    let file = ws.with_extension("seed.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(SEED).unwrap()).unwrap();
    v["chains"][0]["mistake_rate"] = serde_json::json!(1.5);
    std::fs::write(&file, v.to_string()).unwrap();
    let err = Seed::load(&file).unwrap_err().to_string();
    assert!(err.contains("chains[0].mistake_rate: 1.5") && err.contains(&file.display().to_string()), "{err}");
    std::fs::remove_file(&file).ok();
    std::fs::remove_dir_all(&ws).ok();
}

/// Whether `name` is a top-level entry of the seeded workspace or one the seed's values create.
fn seed_top(seed: &Seed, name: &str) -> bool {
    let top = |p: &str| p.trim_start_matches("{ws}/").split('/').next() == Some(name);
    seed.workspace.files.keys().chain(&seed.workspace.dirs).any(|p| top(p))
        || seed.values.values().flatten().filter_map(Value::as_str).any(top)
}

/// Every text a slot can take: its value list and the values the seed's cases give it.
fn slot_values(seed: &Seed, slot: &str, ws: &str) -> Vec<String> {
    let list = slot.split('#').next().unwrap_or(slot);
    let text = |v: &Value| match v {
        Value::String(s) => s.replace("{ws}", ws),
        other => other.to_string(),
    };
    let listed = seed.values.get(list).into_iter().flatten().map(text);
    let cases = seed.tools.values().flat_map(|t| &t.forms).flat_map(|f| &f.cases).filter_map(|c| c.get(list)).map(text);
    listed.chain(cases).collect()
}

/// Whether the synthesizer could write `text` from `template`: each `{slot}` filled with one of
/// its values (`{ws}` with the workspace).
fn producible(text: &str, template: &str, seed: &Seed, ws: &str) -> bool {
    let Some(open) = template.find('{') else { return text == template };
    let Some(len) = template[open..].find('}') else { return text == template };
    let Some(rest) = text.strip_prefix(&template[..open]) else { return false };
    let (slot, after) = (&template[open + 1..open + len], &template[open + len + 1..]);
    let values = if slot == "ws" { vec![ws.to_string()] } else { slot_values(seed, slot, ws) };
    values.iter().any(|v| after_value(rest, v).into_iter().any(|r| producible(r, after, seed, ws)))
}

/// What may follow `value` at the start of `text`: a `{name}` in the value stands for any
/// folder name the synthesizer draws (one or more characters other than `/`), a `{words}` for
/// any run of words (letters, digits and spaces).
fn after_value<'a>(text: &'a str, value: &str) -> Vec<&'a str> {
    let drawn = [("{name}", (|c| c != '/') as fn(char) -> bool), ("{words}", |c: char| c.is_ascii_alphanumeric() || c == ' ')];
    let Some((at, placeholder, allowed)) = drawn.iter().filter_map(|&(p, ok)| value.find(p).map(|at| (at, p, ok))).min_by_key(|d| d.0)
    else {
        return text.strip_prefix(value).into_iter().collect();
    };
    let (head, tail) = (&value[..at], &value[at + placeholder.len()..]);
    let Some(rest) = text.strip_prefix(head) else { return Vec::new() };
    let end = rest.find(|c| !allowed(c)).unwrap_or(rest.len());
    rest.char_indices().map(|(i, c)| i + c.len_utf8()).take_while(|&i| i <= end).flat_map(|i| after_value(&rest[i..], tail)).collect()
}

#[test]
fn dev_sets_are_valid_and_share_no_phrasing_with_the_seed() {
    let Some(_) = filesystem_server() else { return };
    for dev in DEVS {
        check_dev_set(dev);
    }
}

fn check_dev_set(dev: &str) {
    let seed = Seed::load(Path::new(SEED)).unwrap();
    let ws = workspace("dev");
    eprintln!("{dev}");
    // The check itself: a seed phrasing filled with seed values is caught, other text is not.
    let w = ws.to_string_lossy();
    assert!(producible(&format!("What's inside {w}/budget.txt?"), "What's inside {file}?", &seed, &w));
    assert!(!producible(&format!("What's inside {w}/other.txt?"), "What's inside {file}?", &seed, &w));
    assert!(producible(&format!("mkdir {w}/v1.2.3 now"), "mkdir {new_dir} now", &seed, &w), "a drawn {{name}} is caught");
    assert!(!producible(&format!("mkdir {w}/notes/a/b now"), "mkdir {new_dir} now", &seed, &w), "a name holds no slash");
    assert!(producible("Write \"pay the rent\" to x.", "Write \"{content}\" to x.", &seed, &w), "drawn {{words}} are caught");
    assert!(!producible("Write \"pay, the rent\" to x.", "Write \"{content}\" to x.", &seed, &w), "words hold no comma");
    let mut server = start(&seed, &ws);
    let tools = server.list_tools().unwrap();
    let text = std::fs::read_to_string(dev).unwrap();
    let ws_s = ws.to_string_lossy().into_owned();
    let mut expected_names = BTreeSet::new();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 40, "{} dev lines", lines.len());
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(&line.replace("{ws}", &ws_s)).unwrap_or_else(|e| panic!("dev line {}: {e}", i + 1));
        read_messages(v.get("messages"), MAX_RESULT_CHARS).unwrap_or_else(|e| panic!("dev line {}: {e}", i + 1));
        let name = v["expected"]["name"].as_str().unwrap();
        expected_names.insert(name.to_string());
        if name != FINISH {
            let tool = tools.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("dev line {}: no tool {name}", i + 1));
            schema::validate(&v["expected"]["arguments"], &tool.input_schema).unwrap_or_else(|e| panic!("dev line {}: {name}: {e}", i + 1));
        }
        // No request could have come from the synthesizer, with or without a distractor.
        let distractors = slot_values(&seed, "distractor", &ws_s);
        for m in v["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user") {
            let msg = m["content"].as_str().unwrap();
            let cores = std::iter::once(msg)
                .chain(distractors.iter().flat_map(|d| [msg.strip_prefix(&format!("{d} ")), msg.strip_suffix(&format!(" {d}"))]).flatten());
            for core in cores {
                for p in seed.phrasings() {
                    assert!(!producible(core, p, &seed, &ws_s), "dev line {}: {msg:?} is the seed's phrasing {p:?}", i + 1);
                }
            }
        }
    }
    let seeded: BTreeSet<String> = seed.tools.keys().cloned().chain([FINISH.to_string()]).collect();
    assert!(expected_names.is_superset(&seeded), "the dev set misses {:?}", seeded.difference(&expected_names).collect::<Vec<_>>());
    std::fs::remove_dir_all(&ws).ok();
}

/// The unfamiliar set: every line brings two to four tools of its own (none of them in the seed
/// or any committed manifest), and expects one of them with valid arguments, or `finish`.
#[test]
fn unfamiliar_tool_set_is_valid_and_untrained() {
    let seed = Seed::load(Path::new(SEED)).unwrap();
    let mut trained: BTreeSet<String> = seed.tools.keys().cloned().collect();
    for entry in std::fs::read_dir("adapters").unwrap() {
        if let Ok(m) = agentflux::toolcall::Manifest::read(&entry.unwrap().path()) {
            trained.extend(m.arguments.into_keys());
        }
    }
    let text = std::fs::read_to_string(UNFAMILIAR).unwrap();
    let mut calls = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        read_messages(v.get("messages"), MAX_RESULT_CHARS).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        let catalog = agentflux::toolcall::Catalog::from_openai_tools("tools", &v["tools"]).unwrap();
        let names = catalog.names();
        assert!((2..=4).contains(&names.len()), "line {}: {names:?}", i + 1);
        assert!(names.iter().all(|n| !trained.contains(*n)), "line {}: {names:?} has a trained tool", i + 1);
        let name = v["expected"]["name"].as_str().unwrap();
        if name != FINISH {
            let (_, tool) = catalog.find(name).unwrap_or_else(|| panic!("line {}: no tool {name}", i + 1));
            schema::validate(&v["expected"]["arguments"], &tool.input_schema).unwrap_or_else(|e| panic!("line {}: {name}: {e}", i + 1));
            calls += 1;
        }
    }
    assert!(calls >= 40, "{calls} requests need a tool");
}

#[test]
fn synth_cli_writes_data_that_check_accepts_and_keeps_user_files() {
    if filesystem_server().is_none() {
        return;
    }
    let ws = workspace("cli");
    let out = std::env::temp_dir().join(format!("agentflux-synth-cli-{}.jsonl", std::process::id()));
    // A directory with someone's file in it is not wiped without --replace-workspace.
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("mine.txt"), "keep me").unwrap();
    let (ws_s, out_s) = (ws.to_string_lossy().into_owned(), out.to_string_lossy().into_owned());
    let (ok, _, err) = agentflux(&["data", "synth", "--conversations", "4", "--seed", "3", "--workspace", &ws_s, "--out", &out_s]);
    assert!(!ok && err.contains("--replace-workspace"), "{err}");
    assert_eq!(std::fs::read_to_string(ws.join("mine.txt")).unwrap(), "keep me");
    let (ok, stdout, err) =
        agentflux(&["data", "synth", "--conversations", "4", "--seed", "3", "--workspace", &ws_s, "--replace-workspace", "--out", &out_s]);
    assert!(ok, "{err}");
    assert!(stdout.contains("4 conversations"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 4);
    // --mistake-rate sets the share of recoveries: none at 0, some at 1; a share above 1 is refused.
    let recoveries = |rate: &str| {
        let (ok, stdout, err) = agentflux(&[
            "data",
            "synth",
            "--conversations",
            "4",
            "--seed",
            "3",
            "--mistake-rate",
            rate,
            "--workspace",
            &ws_s,
            "--replace-workspace",
            "--out",
            &out_s,
        ]);
        assert!(ok, "{err}");
        let (count, _) = stdout.split_once(" recovering").unwrap_or_else(|| panic!("{stdout}"));
        count.rsplit(' ').next().unwrap().parse::<usize>().unwrap()
    };
    assert_eq!(recoveries("0"), 0);
    assert!(recoveries("1") > 0);
    let (ok, _, err) = agentflux(&["data", "synth", "--mistake-rate", "1.5", "--workspace", &ws_s, "--replace-workspace", "--out", &out_s]);
    assert!(!ok && err.contains("--mistake-rate 1.5"), "{err}");
    if default_model().is_some() {
        let (ok, report, err) = agentflux(&["data", "check", &out_s]);
        assert!(ok, "{err}");
        assert!(report.contains("4 lines read, 4 kept, 0 dropped"), "{report}");
    }
    // A run stopped part way (as by Ctrl-C) leaves OUT as it was: the new data goes to OUT.part
    // until it is complete.
    let before = std::fs::read_to_string(&out).unwrap();
    let part = PathBuf::from(format!("{out_s}.part"));
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_agentflux"))
        .args(["data", "synth", "--conversations", "100000", "--workspace", &ws_s, "--replace-workspace", "--out", &out_s])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::metadata(&part).map_or(true, |m| m.len() == 0) {
        assert!(started.elapsed().as_secs() < 120, "no conversation written to {} in 120 s", part.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    run.kill().unwrap();
    run.wait().unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before, "the interrupted run changed {out_s}");
    std::fs::remove_dir_all(&ws).ok();
    std::fs::remove_file(&out).ok();
    std::fs::remove_file(&part).ok();
}
