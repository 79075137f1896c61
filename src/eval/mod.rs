//! Deterministic evaluation of tool calls: a dataset of conversations with the expected next
//! call (or `finish`), scored without a judge — the tool's name exactly, the arguments after
//! normalisation (paths resolved, numbers by value, optional keys at their default may be
//! omitted), schema validity — with confidence, latency per stage and recomputed prefill.
//!
//! Dataset lines: `{"messages":[..], "tools":[OpenAI tools] | "mcp":["CMD ARGS" | "URL",..],
//! "expected":{"name":"..","arguments":{..}}}` (neither `tools` nor `mcp`: the servers the command
//! line gives, `eval --mcp-config`); `{ws}` anywhere in a line stands for the evaluation workspace.

mod score;
mod tasks;

pub use score::{arguments_match, normalize_path};
pub use tasks::{judge, read_tasks, task_row, Checks, Task, TaskOutcome, TASK_HEADER};

use crate::text::ChatMessage;
use crate::toolcall::{read_messages, Catalog, ToolCall, FINISH};
use serde_json::Value;
use std::collections::BTreeMap;

/// Where an example's tools come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolSource {
    /// Listed in the line (OpenAI `tools`).
    Inline(Catalog),
    /// The tools of these MCP servers (commands, or URLs of Streamable HTTP endpoints).
    Mcp(Vec<String>),
    /// The servers the command line gives (`eval --mcp-config`).
    Configured,
}

/// One evaluation example.
#[derive(Debug, Clone)]
pub struct EvalExample {
    /// Line in the dataset (1-based).
    pub line: usize,
    /// The conversation so far, in the caller's layout.
    pub messages: Vec<ChatMessage>,
    /// Its tools.
    pub tools: ToolSource,
    /// The expected tool (or `finish`).
    pub expected_name: String,
    /// The expected arguments (none for `finish`).
    pub expected_arguments: Option<Value>,
}

/// Read a dataset, `{ws}` replaced by `workspace`. A malformed line is an error naming it.
/// A line without `expected` is a whole trajectory (as `agentflux data check` splits them): each
/// of its assistant turns (but those of weight 0) becomes an example, the conversation before it
/// with that turn's call (or `finish` for a text answer) expected.
pub fn read_dataset(text: &str, workspace: &str, max_result_chars: usize) -> Result<Vec<EvalExample>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let err = |what: String| format!("line {line}: {what}");
        let v: Value = serde_json::from_str(&raw.replace("{ws}", workspace)).map_err(|e| err(e.to_string()))?;
        if v.get("expected").is_some() {
            out.push(parse_example(&v, line, max_result_chars).map_err(err)?);
            continue;
        }
        let messages =
            v.get("messages").and_then(Value::as_array).ok_or_else(|| err("no \"expected\" and no trajectory \"messages\"".into()))?;
        let mut turns = 0;
        // A turn of weight 0 (shown, not learned: a failed call) is not expected either.
        for (j, m) in messages.iter().enumerate().filter(|(_, m)| m["role"] == "assistant" && m["weight"] != 0) {
            let expected = match m["tool_calls"].as_array().and_then(|c| c.first()) {
                Some(c) => {
                    let args = c.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
                    let args: Value = serde_json::from_str(args).map_err(|e| err(format!("messages[{j}]: arguments: {e}")))?;
                    serde_json::json!({"name": c.pointer("/function/name"), "arguments": args})
                }
                None => serde_json::json!({"name": FINISH}),
            };
            let mut ex = v.clone();
            ex["messages"] = Value::Array(messages[..j].to_vec());
            ex["expected"] = expected;
            out.push(parse_example(&ex, line, max_result_chars).map_err(|e| err(format!("assistant turn messages[{j}]: {e}")))?);
            turns += 1;
        }
        if turns == 0 {
            return Err(err("no \"expected\" and no assistant turn to expect".into()));
        }
    }
    Ok(out)
}

fn parse_example(v: &Value, line: usize, max_result_chars: usize) -> Result<EvalExample, String> {
    let messages = read_messages(v.get("messages"), max_result_chars).map_err(|e| e.to_string())?;
    let tools = match (v.get("tools"), v.get("mcp")) {
        (Some(t), None) => ToolSource::Inline(Catalog::from_openai_tools("tools", t).map_err(|e| e.to_string())?),
        (None, Some(Value::Array(cmds))) if !cmds.is_empty() => ToolSource::Mcp(
            cmds.iter()
                .map(|c| c.as_str().map(str::to_string).ok_or_else(|| "mcp: expected strings".to_string()))
                .collect::<Result<_, _>>()?,
        ),
        (None, None) => ToolSource::Configured,
        _ => return Err("give at most one of \"tools\" (OpenAI tools) or \"mcp\" (servers)".into()),
    };
    let expected = &v["expected"];
    let expected_name = expected.get("name").and_then(Value::as_str).ok_or("expected.name: a string is required")?.to_string();
    let expected_arguments = match expected.get("arguments") {
        Some(a) if a.is_object() => Some(a.clone()),
        None if expected_name == FINISH => None,
        _ => return Err("expected.arguments: an object is required for a tool".into()),
    };
    Ok(EvalExample { line, messages: messages.into_iter().map(|m| m.chat).collect(), tools, expected_name, expected_arguments })
}

/// How one example went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    /// Dataset line.
    pub line: usize,
    /// Expected name and arguments.
    pub expected_name: String,
    /// The arguments the dev set expects (None: the expected tool takes none, or `finish`).
    pub expected_arguments: Option<Value>,
    /// What the model called (`None` when the call failed).
    pub name: Option<String>,
    /// The arguments written (None: no call, or `finish`).
    pub arguments: Option<Value>,
    /// The right tool (or `finish`).
    pub name_ok: bool,
    /// Given the right tool: the arguments match (`None` when the tool was wrong or `finish`).
    pub arguments_ok: Option<bool>,
    /// Name and arguments both right.
    pub full_ok: bool,
    /// The call names a real tool (or `finish`) with arguments valid for its schema.
    pub schema_valid: bool,
    /// The chosen name's probability, where the mode scores names.
    pub confidence: Option<f64>,
    /// Milliseconds: the whole call and its stages.
    pub ms: f64,
    /// Milliseconds prefilling the conversation.
    pub prefix_ms: f64,
    /// Milliseconds selecting the tool.
    pub select_ms: f64,
    /// Milliseconds writing the arguments.
    pub args_ms: f64,
    /// Argument tokens written, of them forced tokens appended in chunks (jump-forward), and the
    /// forward passes the argument stage took.
    pub arg_tokens: usize,
    /// See `arg_tokens`.
    pub arg_forced: usize,
    /// See `arg_tokens`.
    pub arg_passes: usize,
    /// Prompt positions computed, reused from the cache, and computed again (cached under
    /// another adapter).
    pub prefilled: usize,
    /// Prompt tokens taken from the cache instead of computed.
    pub reused: usize,
    /// Tokens computed again (standard LoRA adapters re-prefill).
    pub recomputed: usize,
    /// Why the call failed, if it did.
    pub error: Option<String>,
}

impl Outcome {
    /// Score `call` (or the error that replaced it) against `ex`, with the tools of `catalog`.
    pub fn score(ex: &EvalExample, catalog: &Catalog, call: Result<&ToolCall, String>) -> Self {
        let mut o = Outcome {
            line: ex.line,
            expected_name: ex.expected_name.clone(),
            expected_arguments: ex.expected_arguments.clone(),
            ..Default::default()
        };
        let call = match call {
            Ok(c) => c,
            Err(e) => {
                o.error = Some(e);
                return o;
            }
        };
        let s = &call.stats;
        (o.prefix_ms, o.select_ms, o.args_ms) = (s.prefix_ms, s.select_ms, s.args_ms);
        (o.arg_tokens, o.arg_forced, o.arg_passes) = (s.arg_tokens, s.arg_forced, s.arg_passes);
        o.ms = s.prefix_ms + s.select_ms + s.args_ms;
        (o.prefilled, o.reused, o.recomputed) = (s.session.prefilled, s.session.reused, s.session.recomputed);
        o.confidence = call.confidence;
        o.name = Some(call.name.clone());
        o.arguments = Some(call.arguments.clone());
        o.name_ok = call.name == ex.expected_name;
        let tool = catalog.find(&call.name).map(|(_, t)| t);
        o.schema_valid = match tool {
            Some(t) => crate::toolcall::schema::validate(&call.arguments, &t.input_schema).is_ok(),
            None => call.name == FINISH,
        };
        if o.name_ok {
            o.arguments_ok = match (tool, &ex.expected_arguments) {
                (Some(t), Some(want)) => Some(arguments_match(want, &call.arguments, &t.input_schema)),
                _ => None,
            };
            o.full_ok = o.arguments_ok.unwrap_or(true);
        }
        o
    }
}

/// The metrics over a set of outcomes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Examples.
    pub n: usize,
    /// Right tool (or `finish`).
    pub selection: f64,
    /// Right arguments among the examples with the right tool that take arguments.
    pub arguments_given_tool: Option<f64>,
    /// Right tool and arguments.
    pub full: f64,
    /// Calls that name a real tool (or finish) with schema-valid arguments.
    pub schema_valid: f64,
    /// Mean confidence when the tool was right, and when it was wrong.
    pub confidence_right: Option<f64>,
    /// Mean probability of the chosen tool where the choice was wrong.
    pub confidence_wrong: Option<f64>,
    /// Mean milliseconds per call and per stage.
    pub ms: f64,
    /// Mean milliseconds prefilling per call.
    pub prefix_ms: f64,
    /// Mean milliseconds selecting per call.
    pub select_ms: f64,
    /// Mean milliseconds writing arguments per call.
    pub args_ms: f64,
    /// Mean prompt positions computed and reused per call; total recomputed.
    pub prefilled: f64,
    /// Mean prompt tokens reused per call.
    pub reused: f64,
    /// Tokens computed again over the whole set.
    pub recomputed: usize,
    /// Calls that failed with an error.
    pub errors: usize,
    /// Selection accuracy per expected tool: (right, total).
    pub per_tool: BTreeMap<String, (usize, usize)>,
    /// Per tool whose arguments were written: what jump-forward saved.
    pub jump_forward: BTreeMap<String, JumpForward>,
}

/// The argument stage of one tool's calls: tokens written, forced tokens appended in chunks, and
/// forward passes taken (`tokens − passes` decode steps saved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct JumpForward {
    /// Calls whose arguments were written.
    pub calls: usize,
    /// Argument tokens written.
    pub tokens: usize,
    /// Of them, forced tokens appended in chunks.
    pub forced: usize,
    /// Forward passes of the argument stage.
    pub passes: usize,
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl Summary {
    /// Aggregate `outcomes`.
    pub fn of(outcomes: &[Outcome]) -> Self {
        let n = outcomes.len();
        let frac = |f: &dyn Fn(&Outcome) -> bool| if n == 0 { 0.0 } else { outcomes.iter().filter(|o| f(o)).count() as f64 / n as f64 };
        let mut per_tool: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for o in outcomes {
            let e = per_tool.entry(o.expected_name.clone()).or_default();
            e.0 += o.name_ok as usize;
            e.1 += 1;
        }
        let mut jump_forward: BTreeMap<String, JumpForward> = BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.arg_tokens > 0) {
            let e = jump_forward.entry(o.name.clone().unwrap_or_default()).or_default();
            e.calls += 1;
            e.tokens += o.arg_tokens;
            e.forced += o.arg_forced;
            e.passes += o.arg_passes;
        }
        Summary {
            n,
            selection: frac(&|o| o.name_ok),
            arguments_given_tool: mean(outcomes.iter().filter_map(|o| o.arguments_ok).map(|ok| ok as u8 as f64)),
            full: frac(&|o| o.full_ok),
            schema_valid: frac(&|o| o.schema_valid),
            confidence_right: mean(outcomes.iter().filter(|o| o.name_ok).filter_map(|o| o.confidence)),
            confidence_wrong: mean(outcomes.iter().filter(|o| !o.name_ok).filter_map(|o| o.confidence)),
            ms: mean(outcomes.iter().map(|o| o.ms)).unwrap_or(0.0),
            prefix_ms: mean(outcomes.iter().map(|o| o.prefix_ms)).unwrap_or(0.0),
            select_ms: mean(outcomes.iter().map(|o| o.select_ms)).unwrap_or(0.0),
            args_ms: mean(outcomes.iter().map(|o| o.args_ms)).unwrap_or(0.0),
            prefilled: mean(outcomes.iter().map(|o| o.prefilled as f64)).unwrap_or(0.0),
            reused: mean(outcomes.iter().map(|o| o.reused as f64)).unwrap_or(0.0),
            recomputed: outcomes.iter().map(|o| o.recomputed).sum(),
            errors: outcomes.iter().filter(|o| o.error.is_some()).count(),
            per_tool,
            jump_forward,
        }
    }

    /// The header of [`Summary::row`]'s table.
    pub const HEADER: &'static str = "| mode | examples | tool selection | arguments (right tool) | full call | schema-valid | confidence right / wrong | ms per call (prefix / select / args) | positions computed / reused per call | recomputed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

    /// One markdown row for `mode`.
    pub fn row(&self, mode: &str) -> String {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("–".to_string(), f);
        let conf =
            format!("{} / {}", opt(self.confidence_right, &|c| format!("{c:.2}")), opt(self.confidence_wrong, &|c| format!("{c:.2}")));
        format!(
            "| {mode} | {} | {} | {} | {} | {} | {conf} | {:.0} ({:.0} / {:.0} / {:.0}) | {:.0} / {:.0} | {} |",
            self.n,
            pct(self.selection),
            opt(self.arguments_given_tool, &pct),
            pct(self.full),
            pct(self.schema_valid),
            self.ms,
            self.prefix_ms,
            self.select_ms,
            self.args_ms,
            self.prefilled,
            self.reused,
            self.recomputed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "head": {"type": "integer", "default": 0}}, "required": ["path"]}}}])
    }

    #[test]
    fn dataset_lines_are_read_or_refused_by_line() {
        let ok = json!({"messages": [{"role": "user", "content": "read {ws}/a"}], "tools": tools(), "expected": {"name": "read", "arguments": {"path": "{ws}/a"}}}).to_string();
        let fin = json!({"messages": [{"role": "user", "content": "hi"}], "mcp": ["srv {ws}"], "expected": {"name": "finish"}}).to_string();
        let ex = read_dataset(&format!("{ok}\n\n{fin}\n"), "/w", 100).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].expected_arguments, Some(json!({"path": "/w/a"})));
        assert_eq!(ex[1].tools, ToolSource::Mcp(vec!["srv /w".into()]));
        assert_eq!((ex[1].line, ex[1].expected_arguments.clone()), (3, None));
        let bad = json!({"messages": [{"role": "user", "content": "x"}], "tools": tools(), "expected": {"name": "read"}}).to_string();
        assert!(read_dataset(&bad, "/w", 100).unwrap_err().contains("line 1: expected.arguments"));
        let both = json!({"messages": [{"role": "user", "content": "x"}], "tools": tools(), "mcp": ["s"], "expected": {"name": "finish"}})
            .to_string();
        assert!(read_dataset(&format!("\n{both}"), "/w", 100).unwrap_err().starts_with("line 2: give at most one"));
        let neither = json!({"messages": [{"role": "user", "content": "x"}], "expected": {"name": "finish"}}).to_string();
        assert_eq!(read_dataset(&neither, "/w", 100).unwrap()[0].tools, ToolSource::Configured);
    }

    #[test]
    fn a_trajectory_line_is_one_example_per_assistant_turn() {
        // The first call has weight 0 (a refused call, shown but not to imitate): no example.
        let messages = json!([
            {"role": "user", "content": "read {ws}/a"},
            {"role": "assistant", "weight": 0, "content": null, "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"{ws}\"}"}}]},
            {"role": "tool", "tool_call_id": "c0", "content": "EISDIR"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"{ws}/a\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "A"},
            {"role": "assistant", "content": "It says A."},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "You're welcome."}
        ]);
        let line = json!({"messages": messages, "tools": tools()}).to_string();
        let ex = read_dataset(&line, "/w", 100).unwrap();
        let got: Vec<(&str, usize, Option<Value>)> =
            ex.iter().map(|e| (e.expected_name.as_str(), e.messages.len(), e.expected_arguments.clone())).collect();
        assert_eq!(got, [("read", 3, Some(json!({"path": "/w/a"}))), ("finish", 5, None), ("finish", 7, None)]);
        assert!(ex.iter().all(|e| e.line == 1));
        let none = json!({"messages": [{"role": "user", "content": "x"}], "tools": tools()}).to_string();
        assert!(read_dataset(&none, "/w", 100).unwrap_err().contains("no assistant turn"));
    }

    fn call(name: &str, args: Value, confidence: f64) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args,
            confidence: Some(confidence),
            candidates: Default::default(),
            stats: Default::default(),
            output: None,
        }
    }

    #[test]
    fn outcomes_and_summary() {
        let line = json!({"messages": [{"role": "user", "content": "read a"}], "tools": tools(), "expected": {"name": "read", "arguments": {"path": "/w/a"}}}).to_string();
        let ex = &read_dataset(&line, "/w", 100).unwrap()[0];
        let ToolSource::Inline(cat) = &ex.tools else { unreachable!() };
        let mut right = Outcome::score(ex, cat, Ok(&call("read", json!({"path": "/w/./a", "head": 0}), 0.9)));
        assert!(right.name_ok && right.arguments_ok == Some(true) && right.full_ok && right.schema_valid);
        let wrong_args = Outcome::score(ex, cat, Ok(&call("read", json!({"path": "/w/b"}), 0.7)));
        assert!(wrong_args.name_ok && wrong_args.arguments_ok == Some(false) && !wrong_args.full_ok && wrong_args.schema_valid);
        let wrong_tool = Outcome::score(ex, cat, Ok(&call("finish", json!({}), 0.4)));
        assert!(!wrong_tool.name_ok && wrong_tool.arguments_ok.is_none() && wrong_tool.schema_valid);
        let invented = Outcome::score(ex, cat, Ok(&call("delete", json!({}), 0.1)));
        assert!(!invented.schema_valid);
        let failed = Outcome::score(ex, cat, Err("boom".into()));
        assert_eq!(failed.error.as_deref(), Some("boom"));
        (right.arg_tokens, right.arg_forced, right.arg_passes) = (10, 4, 7);
        let s = Summary::of(&[right, wrong_args, wrong_tool, invented, failed]);
        assert_eq!(s.jump_forward.len(), 1);
        assert_eq!(s.jump_forward["read"], JumpForward { calls: 1, tokens: 10, forced: 4, passes: 7 });
        assert_eq!((s.n, s.selection, s.full, s.schema_valid, s.errors), (5, 0.4, 0.2, 0.6, 1));
        assert_eq!(s.arguments_given_tool, Some(0.5));
        assert!((s.confidence_right.unwrap() - 0.8).abs() < 1e-9 && (s.confidence_wrong.unwrap() - 0.25).abs() < 1e-9);
        assert_eq!(s.per_tool["read"], (2, 5));
        assert!(
            s.row("decoupled").starts_with("| decoupled | 5 | 40.0% | 50.0% | 20.0% | 60.0% | 0.80 / 0.25 |"),
            "{}",
            s.row("decoupled")
        );
    }
}
