//! `agentflux eval` on a tiny dataset: inline tools and the real filesystem server, every mode;
//! the summary is checked against the per-example results it is made of.

mod common;

use common::{agentflux, default_model, filesystem_server, tiny_with_tokenizer};
use serde_json::{json, Value};

fn run_eval(model: &str, dataset: &str, mode: &str, tag: &str, extra: &[&str]) -> (String, Value) {
    let out = std::env::temp_dir().join(format!("agentflux-eval-{tag}-{}.json", std::process::id()));
    let ws = std::env::temp_dir().join(format!("agentflux-eval-ws-{}", std::process::id()));
    let (ok, stdout, err) = agentflux(
        &[
            "eval",
            "--model",
            model,
            "--dataset",
            dataset,
            "--mode",
            mode,
            "--workspace",
            &ws.to_string_lossy(),
            "--json",
            &out.to_string_lossy(),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    assert!(ok, "{err}");
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    std::fs::remove_file(&out).ok();
    (stdout, v)
}

#[test]
fn eval_scores_every_mode_and_its_summary_adds_up() {
    let (Some(f), Some(_)) = (default_model(), filesystem_server()) else { return };
    let model = tiny_with_tokenizer(&f, 11, "eval");
    let weather = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}}, "required": ["city"]}}},
                        {"type": "function", "function": {"name": "get_time", "description": "Time in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let mut lines = vec![
        json!({"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": weather, "expected": {"name": "get_weather", "arguments": {"city": "Oslo"}}}).to_string(),
        json!({"messages": [{"role": "user", "content": "What time is it in Lima?"}], "tools": weather, "expected": {"name": "get_time", "arguments": {"city": "Lima"}}}).to_string(),
        json!({"messages": [{"role": "user", "content": "Hello!"}], "tools": weather, "expected": {"name": "finish"}}).to_string(),
    ];
    // Three lines of the hand-written dev set, on the real filesystem server.
    let dev = std::fs::read_to_string("adapters/filesystem/data/dev.jsonl").unwrap();
    lines.extend(dev.lines().take(3).map(str::to_string));
    let dataset = std::env::temp_dir().join(format!("agentflux-eval-{}.jsonl", std::process::id()));
    std::fs::write(&dataset, lines.join("\n")).unwrap();
    let (m, d) = (model.to_string_lossy().into_owned(), dataset.to_string_lossy().into_owned());
    let mut decoupled_prefilled = Vec::new();
    for mode in ["decoupled", "monolithic", "monolithic-constrained", "reference"] {
        let (stdout, v) = run_eval(&m, &d, mode, mode, &[]);
        assert!(stdout.contains("| mode | examples | tool selection |") && stdout.contains(&format!("| {mode} | 6 |")), "{stdout}");
        let ex = v["examples"].as_array().unwrap();
        assert_eq!(ex.len(), 6);
        let s = &v["summary"];
        let frac = |key: &str| ex.iter().filter(|e| e[key] == true).count() as f64 / 6.0;
        for key in ["selection", "full", "schema_valid"] {
            let field = if key == "selection" {
                "name_ok"
            } else if key == "full" {
                "full_ok"
            } else {
                "schema_valid"
            };
            assert!((s[key].as_f64().unwrap() - frac(field)).abs() < 1e-9, "{mode} {key}: {s}");
        }
        for e in ex {
            assert!(e["error"].is_null(), "{mode}: {e}");
            assert!(e["full_ok"] == false || e["name_ok"] == true);
            assert!(e["ms"].as_f64().unwrap() > 0.0);
        }
        if mode != "monolithic" {
            // Scored names are real; constrained arguments always fit their schema.
            assert_eq!(s["schema_valid"], 1.0, "{mode}: {s}");
        }
        if mode == "decoupled" || mode == "reference" {
            assert!(ex.iter().all(|e| e["confidence"].as_f64().is_some_and(|c| c > 0.0 && c <= 1.0)));
        }
        if mode == "reference" {
            // Every stage re-sends the conversation: nothing is reused, and a tool call computes
            // its prefix twice (selection, then arguments), so more than the shared-cache run.
            // (The shared-cache run computed everything for its first example too.)
            for (i, (e, shared)) in ex.iter().zip(&decoupled_prefilled).enumerate() {
                assert_eq!(e["reused"], 0, "{e}");
                let computed = e["prefilled"].as_u64().unwrap();
                assert!(computed > *shared || (i == 0 && computed >= *shared), "{e} vs {shared} positions computed with the shared cache");
            }
        }
        if mode == "decoupled" {
            // Three examples at a time, their passes shared: the same calls.
            let (_, side_by_side) = run_eval(&m, &d, mode, "concurrent", &["--concurrency", "3"]);
            for (e, c) in ex.iter().zip(side_by_side["examples"].as_array().unwrap()) {
                for key in ["name", "arguments", "name_ok", "full_ok", "error"] {
                    assert_eq!(e[key], c[key], "{key}: {e} alone, {c} side by side");
                }
                let (p, q) = (e["confidence"].as_f64().unwrap(), c["confidence"].as_f64().unwrap());
                assert!((p - q).abs() < 1e-5, "confidence {p} alone, {q} side by side");
            }
            // The reference strategy is not calibrated, so its positions are compared with the
            // shared-cache run's without calibration (whose content-free passes it would lack).
            let (_, plain) = run_eval(&m, &d, mode, "plain", &["--no-calibration"]);
            decoupled_prefilled = plain["examples"].as_array().unwrap().iter().map(|e| e["prefilled"].as_u64().unwrap()).collect();
            // The second example shares the first one's system text and tool list.
            assert!(ex[1]["reused"].as_u64().unwrap() > 0, "{}", ex[1]);
            assert_eq!(s["recomputed"], 0);
        }
    }
    // The tool given: lines expecting finish are left out, every name is the expected one, and
    // only the arguments decide a full call.
    let out = std::env::temp_dir().join(format!("agentflux-eval-given-{}.json", std::process::id()));
    let ws = std::env::temp_dir().join(format!("agentflux-eval-ws-{}", std::process::id()));
    let (ok, stdout, err) = agentflux(&[
        "eval",
        "--model",
        &m,
        "--dataset",
        &d,
        "--given-tool",
        "--workspace",
        &ws.to_string_lossy(),
        "--json",
        &out.to_string_lossy(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("| decoupled (tool given) | 5 |") && err.contains("1 lines expecting finish left out"), "{stdout}\n{err}");
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    std::fs::remove_file(&out).ok();
    let ex = v["examples"].as_array().unwrap();
    // (A random tiny model may not close a string within the token or context limit: an error,
    // not a call.)
    assert!(
        ex.iter().filter(|e| e["error"].is_null()).all(|e| e["name"] == e["expected_name"] && e["full_ok"] == e["arguments_ok"]),
        "{v}"
    );
    assert!(ex.iter().any(|e| e["error"].is_null()), "{v}");
    let (ok, _, err) = agentflux(&["eval", "--model", &m, "--dataset", &d, "--given-tool", "--mode", "monolithic"]);
    assert!(!ok && err.contains("--given-tool"), "{err}");
    // A malformed line is refused with its number.
    std::fs::write(&dataset, format!("{}\n{{\"messages\": []}}", lines[0])).unwrap();
    let (ok, _, err) = agentflux(&["eval", "--model", &m, "--dataset", &d]);
    assert!(!ok && err.contains("line 2"), "{err}");
    // A call that fails is counted, and the first failure's reason printed.
    std::fs::write(&dataset, &lines[0]).unwrap();
    let (ok, stdout, err) = agentflux(&["eval", "--model", &m, "--dataset", &d, "--ctx", "8"]);
    assert!(ok && stdout.contains("1 call failed, the first (line 1): context overflow"), "{stdout}\n{err}");
    // A dataset with nothing to score is refused, not reported as 0%.
    std::fs::write(&dataset, "\n").unwrap();
    let (ok, stdout, err) = agentflux(&["eval", "--model", &m, "--dataset", &d]);
    assert!(!ok && err.contains("no examples to score") && !stdout.contains("0.0%"), "{stdout}\n{err}");
    std::fs::remove_file(&dataset).ok();
    std::fs::remove_file(&model).ok();
}

/// `agentflux eval --tasks`: the agent loop on the real filesystem server in a workspace rebuilt
/// from the seed before every task, each task judged by its checks. The checks here do not depend
/// on what the (tiny, random) model does — a file the seed writes, a file nobody writes, a fact
/// from that file — so the expected success of each is known independently of the model.
#[test]
fn tasks_run_on_the_real_server_and_are_judged_by_their_checks() {
    let (Some(f), Some(_)) = (default_model(), filesystem_server()) else { return };
    let model = tiny_with_tokenizer(&f, 12, "eval-tasks");
    let dir = std::env::temp_dir().join(format!("agentflux-eval-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ws = dir.join("ws");
    let server = r#""mcp": ["tools/mcp/node_modules/.bin/mcp-server-filesystem {ws}"]"#;
    let tasks = [
        format!(
            r#"{{"task": "Is my to-do list in {{ws}}/notes?", {server}, "max_steps": 1, "checks": {{"files_exist": ["{{ws}}/notes/todo.txt"], "file_contains": {{"{{ws}}/notes/todo.txt": "plumber"}}}}}}"#
        ),
        format!(
            r#"{{"task": "Make {{ws}}/never/made.txt", {server}, "max_steps": 1, "checks": {{"files_exist": ["{{ws}}/never/made.txt"]}}}}"#
        ),
    ];
    let file = dir.join("tasks.jsonl");
    std::fs::write(&file, tasks.join("\n")).unwrap();
    // A leftover from an earlier run is removed by the rebuild.
    std::fs::create_dir_all(ws.join("never")).unwrap();
    std::fs::write(ws.join("never/made.txt"), "stale").unwrap();
    let out = dir.join("out.json");
    let (m, t, w, o) = (model.to_str().unwrap(), file.to_str().unwrap(), ws.to_str().unwrap(), out.to_str().unwrap());
    let (ok, stdout, err) = agentflux(&["eval", "--model", m, "--tasks", t, "--workspace", w, "--json", o]);
    assert!(ok, "{err}");
    assert!(stdout.contains("| mode | tasks | succeeded |") && stdout.contains("| decoupled | 2 | 1 (50.0%) |"), "{stdout}");
    assert!(stdout.contains("line 2:") && stdout.contains("made.txt does not exist"), "{stdout}");
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let outcomes = v["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.iter().map(|o| o["success"].as_bool().unwrap()).collect::<Vec<_>>(), [true, false]);
    for o in outcomes {
        assert!(o["error"].is_null() && !o["calls"].as_array().unwrap().is_empty(), "{o}");
    }
    // The same tasks naming no server take those of an `mcpServers` file, with the same outcomes;
    // without the file they are refused with their line.
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/mcp/node_modules/.bin/mcp-server-filesystem");
    let config = dir.join("claude_desktop_config.json");
    std::fs::write(&config, json!({"mcpServers": {"files": {"command": bin, "args": [w]}}}).to_string()).unwrap();
    std::fs::write(&file, tasks.iter().map(|t| t.replace(&format!("{server}, "), "")).collect::<Vec<_>>().join("\n")).unwrap();
    let c = config.to_str().unwrap();
    let (ok, stdout, err) = agentflux(&["eval", "--model", m, "--tasks", t, "--workspace", w, "--mcp-config", c]);
    assert!(ok && stdout.contains("| decoupled | 2 | 1 (50.0%) |"), "{stdout}\n{err}");
    let (ok, _, err) = agentflux(&["eval", "--model", m, "--tasks", t, "--workspace", w]);
    assert!(!ok && err.contains("line 1: no \"mcp\", and no --mcp-config"), "{err}");
    // Only the agent modes run tasks, and a malformed line is refused with its number.
    let (ok, _, err) = agentflux(&["eval", "--model", m, "--tasks", t, "--mode", "monolithic", "--workspace", w]);
    assert!(!ok && err.contains("--mode decoupled or reference"), "{err}");
    std::fs::write(&file, format!("{}\n{{\"task\": \"x\"}}", tasks[0])).unwrap();
    let (ok, _, err) = agentflux(&["eval", "--model", m, "--tasks", t, "--workspace", w]);
    assert!(!ok && err.contains("line 2"), "{err}");
    std::fs::write(&file, "").unwrap();
    let (ok, _, err) = agentflux(&["eval", "--model", m, "--tasks", t, "--workspace", w]);
    assert!(!ok && err.contains("no tasks"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&model).ok();
}
