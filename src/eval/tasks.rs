//! End-to-end tasks: a request run by the agent loop on real tool servers in a freshly built
//! workspace, judged by deterministic checks of what happened — no judge model.
//!
//! Task lines: `{"task": "..", "mcp": ["CMD {ws}", ..], "max_steps": 4, "checks": {"facts":
//! [..], "tools": [..], "files_exist": [..], "file_contains": {PATH: TEXT}}}`; `{ws}` anywhere
//! stands for the workspace.
//! - `facts`: texts (case-insensitive) the final answer or some tool output must contain;
//! - `tools`: tools that must have been called (successfully);
//! - `files_exist`: paths that must exist afterwards;
//! - `file_contains`: files whose text must contain the given text afterwards.

use crate::toolcall::AgentEvent;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// What must be true after a task.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    #[serde(default)]
    /// Strings the final answer must contain.
    pub facts: Vec<String>,
    #[serde(default)]
    /// Tools that must have been called.
    pub tools: Vec<String>,
    #[serde(default)]
    /// Paths (relative to the workspace) that must exist afterwards.
    pub files_exist: Vec<String>,
    #[serde(default)]
    /// Path → text the file must contain afterwards.
    pub file_contains: BTreeMap<String, String>,
}

/// One task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Line in the file (1-based).
    pub line: usize,
    /// The request.
    pub task: String,
    /// The tool servers (commands, or URLs); none: those the command line gives
    /// (`eval --mcp-config`).
    pub mcp: Vec<String>,
    /// Most tool calls (the agent's step limit).
    pub max_steps: usize,
    /// What must hold afterwards.
    pub checks: Checks,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskLine {
    task: String,
    #[serde(default)]
    mcp: Vec<String>,
    #[serde(default = "default_steps")]
    max_steps: usize,
    checks: Checks,
}

fn default_steps() -> usize {
    4
}

/// Read a task file, `{ws}` replaced by `workspace`. A malformed line is an error naming it.
pub fn read_tasks(text: &str, workspace: &str) -> Result<Vec<Task>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        // Replaced inside the parsed strings, so a workspace path needs no JSON escaping.
        let v: Value = serde_json::from_str(raw).map_err(|e| format!("line {line}: {e}"))?;
        let t: TaskLine = serde_json::from_value(replace_ws(v, workspace)).map_err(|e| format!("line {line}: {e}"))?;
        let c = &t.checks;
        if c.facts.is_empty() && c.tools.is_empty() && c.files_exist.is_empty() && c.file_contains.is_empty() {
            return Err(format!("line {line}: checks: at least one check is needed"));
        }
        if t.max_steps == 0 {
            return Err(format!("line {line}: max_steps must be at least 1"));
        }
        out.push(Task { line, task: t.task, mcp: t.mcp, max_steps: t.max_steps, checks: t.checks });
    }
    Ok(out)
}

fn replace_ws(v: Value, ws: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace("{ws}", ws)),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| replace_ws(x, ws)).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, x)| (k.replace("{ws}", ws), replace_ws(x, ws))).collect()),
        other => other,
    }
}

/// How one task went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TaskOutcome {
    /// Line of the task file (1-based).
    pub line: usize,
    /// Every check held.
    pub success: bool,
    /// The checks that failed, each said in words.
    pub failed: Vec<String>,
    /// The calls made, in order (`finish` included).
    pub calls: Vec<String>,
    /// Each call's arguments, in the order of `calls`: what a miss is read from.
    pub arguments: Vec<Value>,
    /// The final answer.
    pub answer: String,
    /// Milliseconds the task took.
    pub ms: f64,
    /// Why the run itself failed, if it did.
    pub error: Option<String>,
}

/// Judge a finished run of `task` from its events and the workspace as it was left.
pub fn judge(task: &Task, events: &[AgentEvent]) -> TaskOutcome {
    let mut calls = Vec::new();
    let mut arguments = Vec::new();
    let mut seen_text = String::new();
    let mut answer = String::new();
    let mut succeeded: Vec<&str> = Vec::new();
    for e in events {
        match e {
            AgentEvent::Call { call, .. } => {
                calls.push(call.name.clone());
                arguments.push(call.arguments.clone());
            }
            AgentEvent::Result { name, text, is_error, .. } => {
                seen_text.push_str(text);
                seen_text.push('\n');
                if !is_error {
                    succeeded.push(name);
                }
            }
            AgentEvent::Answer { text } => answer = text.clone(),
            AgentEvent::Stopped { .. } | AgentEvent::SetAside { .. } => {}
        }
    }
    seen_text.push_str(&answer);
    let seen = seen_text.to_lowercase();
    let c = &task.checks;
    let mut failed = Vec::new();
    failed.extend(
        c.facts
            .iter()
            .filter(|f| !seen.contains(&f.to_lowercase()))
            .map(|f| format!("fact {f:?} is in neither the answer nor a tool output")),
    );
    failed.extend(c.tools.iter().filter(|t| !succeeded.contains(&t.as_str())).map(|t| format!("{t} was not called successfully")));
    failed.extend(c.files_exist.iter().filter(|p| !Path::new(p).exists()).map(|p| format!("{p} does not exist")));
    for (path, text) in &c.file_contains {
        match std::fs::read_to_string(path) {
            Ok(body) if body.contains(text.as_str()) => {}
            Ok(_) => failed.push(format!("{path} does not contain {text:?}")),
            Err(e) => failed.push(format!("{path}: {e}")),
        }
    }
    TaskOutcome { line: task.line, success: failed.is_empty(), failed, calls, arguments, answer, ms: 0.0, error: None }
}

/// The share of tasks that succeeded, with the mean calls and milliseconds per task.
pub fn task_row(label: &str, outcomes: &[TaskOutcome]) -> String {
    let n = outcomes.len().max(1) as f64;
    let ok = outcomes.iter().filter(|o| o.success).count();
    let calls = outcomes.iter().map(|o| o.calls.len()).sum::<usize>() as f64 / n;
    let ms = outcomes.iter().map(|o| o.ms).sum::<f64>() / n;
    format!("| {label} | {} | {ok} ({:.1}%) | {calls:.1} | {ms:.0} |", outcomes.len(), 100.0 * ok as f64 / n)
}

/// The header of [`task_row`]'s table.
pub const TASK_HEADER: &str = "| mode | tasks | succeeded | calls per task | ms per task |\n|---|---:|---:|---:|---:|";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toolcall::{CallStats, ToolCall};

    fn call(step: usize, name: &str) -> AgentEvent {
        AgentEvent::Call {
            step,
            call: Box::new(ToolCall {
                name: name.into(),
                arguments: serde_json::json!({"step": step}),
                confidence: None,
                candidates: Default::default(),
                stats: CallStats::default(),
                output: None,
            }),
        }
    }

    #[test]
    fn tasks_are_read_with_the_workspace_and_bad_lines_named() {
        let text = r#"{"task": "Read {ws}/a.txt", "mcp": ["srv {ws}"], "checks": {"facts": ["x"], "file_contains": {"{ws}/a.txt": "y"}}}"#;
        let t = read_tasks(&format!("\n{text}"), "/w \"q\"").unwrap();
        assert_eq!((t[0].line, t[0].task.as_str(), t[0].mcp[0].as_str(), t[0].max_steps), (2, "Read /w \"q\"/a.txt", "srv /w \"q\"", 4));
        assert_eq!(t[0].checks.file_contains["/w \"q\"/a.txt"], "y");
        let e = read_tasks(&format!("{text}\n{{\"task\": \"t\", \"mcp\": [\"s\"], \"checks\": {{}}}}"), "/w").unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("at least one check"), "{e}");
        let e = read_tasks(r#"{"task": "t", "mcp": ["s"], "checks": {"fact": ["x"]}}"#, "/w").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("fact"), "{e}");
    }

    #[test]
    fn judge_checks_facts_tools_and_files() {
        let dir = std::env::temp_dir().join(format!("agentflux-judge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("out.txt");
        std::fs::write(&file, "hello there").unwrap();
        let f = file.to_string_lossy().into_owned();
        let events = vec![
            call(1, "read_text_file"),
            AgentEvent::Result { step: 1, name: "read_text_file".into(), text: "Call the PLUMBER".into(), is_error: false },
            call(2, "write_file"),
            AgentEvent::Result { step: 2, name: "write_file".into(), text: "Error: denied".into(), is_error: true },
            call(3, "finish"),
            AgentEvent::Answer { text: "Done, Priya owns it.".into() },
        ];
        let task = |checks: Checks| Task { line: 1, task: "t".into(), mcp: vec!["s".into()], max_steps: 4, checks };
        let ok = judge(
            &task(Checks {
                facts: vec!["plumber".into(), "priya".into()],
                tools: vec!["read_text_file".into()],
                files_exist: vec![f.clone()],
                file_contains: [(f.clone(), "there".into())].into(),
            }),
            &events,
        );
        assert!(ok.success, "{:?}", ok.failed);
        assert_eq!(ok.calls, ["read_text_file", "write_file", "finish"]);
        assert_eq!(ok.arguments, [1, 2, 3].map(|step| serde_json::json!({"step": step})));
        let bad = judge(
            &task(Checks {
                facts: vec!["dentist".into()],
                tools: vec!["write_file".into()],
                files_exist: vec![format!("{f}.missing")],
                file_contains: [(f.clone(), "bye".into())].into(),
            }),
            &events,
        );
        assert!(!bad.success);
        assert_eq!(bad.failed.len(), 4, "{:?}", bad.failed);
        std::fs::remove_dir_all(&dir).ok();
    }
}
