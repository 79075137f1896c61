//! Training data in: trajectories in OpenAI chat JSONL (one conversation per line, `messages`
//! with assistant `tool_calls` and `tool` results, plus `tools`), validated call by call against
//! the tools' schemas, with a report of every line dropped and why, and a seeded split.

use crate::decode::SplitMix64;
use crate::toolcall::{read_messages, schema, AssistantTurn, Catalog, Message};
use serde_json::Value;
use std::collections::BTreeMap;

/// One conversation that passed validation.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// Its line in the file (1-based), for reports.
    pub line: usize,
    /// The tools it could call.
    pub catalog: Catalog,
    /// Its messages in the tool caller's layout, assistant actions marked.
    pub messages: Vec<Message>,
}

impl Trajectory {
    /// Every assistant action to learn (not those of weight 0) with the messages before it.
    pub fn turns(&self) -> impl Iterator<Item = (&[Message], &AssistantTurn)> {
        self.messages.iter().enumerate().filter(|(_, m)| m.learn).filter_map(|(i, m)| m.turn.as_ref().map(|t| (&self.messages[..i], t)))
    }
}

/// Why a line was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropKind {
    /// Not a JSON object.
    NotJson,
    /// `tools` missing or malformed.
    BadTools,
    /// `messages` malformed.
    BadMessages,
    /// A call of a tool that is not in `tools`.
    UnknownTool,
    /// Arguments that do not satisfy the tool's schema.
    InvalidArguments,
    /// No assistant action to learn from.
    NothingToLearn,
    /// Longer than the token limit.
    TooLong,
}

/// A dropped line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Line number (1-based).
    pub line: usize,
    /// The category.
    pub kind: DropKind,
    /// The details.
    pub reason: String,
}

/// What reading a data file kept and dropped.
#[derive(Debug, Clone, Default)]
pub struct DataReport {
    /// Non-empty lines read.
    pub read: usize,
    /// Every dropped line, in file order.
    pub dropped: Vec<Dropped>,
}

impl DataReport {
    /// Lines kept.
    pub fn kept(&self) -> usize {
        self.read - self.dropped.len()
    }

    /// Record a dropped line.
    pub fn drop_line(&mut self, line: usize, kind: DropKind, reason: String) {
        self.dropped.push(Dropped { line, kind, reason });
        self.dropped.sort_by_key(|d| d.line);
    }

    /// Counts per reason, then up to `examples` lines of each.
    pub fn summary(&self, examples: usize) -> String {
        let mut by: BTreeMap<DropKind, Vec<&Dropped>> = BTreeMap::new();
        for d in &self.dropped {
            by.entry(d.kind).or_default().push(d);
        }
        let mut s = format!("{} lines read, {} kept, {} dropped\n", self.read, self.kept(), self.dropped.len());
        for (kind, ds) in by {
            s.push_str(&format!("  {kind:?}: {}\n", ds.len()));
            for d in ds.iter().take(examples) {
                s.push_str(&format!("    line {}: {}\n", d.line, d.reason));
            }
        }
        s
    }
}

/// Read JSONL trajectories, keeping the lines whose every call names a listed tool with
/// arguments valid for its schema. Tool results are cut to `max_result_chars`, as at inference.
pub fn read_trajectories(text: &str, max_result_chars: usize) -> (Vec<Trajectory>, DataReport) {
    let mut report = DataReport::default();
    let mut kept = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        report.read += 1;
        match read_line(line, max_result_chars) {
            Ok((catalog, messages)) => kept.push(Trajectory { line: i + 1, catalog, messages }),
            Err((kind, reason)) => report.drop_line(i + 1, kind, reason),
        }
    }
    (kept, report)
}

fn read_line(line: &str, max_result_chars: usize) -> Result<(Catalog, Vec<Message>), (DropKind, String)> {
    let v: Value = serde_json::from_str(line).map_err(|e| (DropKind::NotJson, e.to_string()))?;
    if !v.is_object() {
        return Err((DropKind::NotJson, "a line must be a JSON object".into()));
    }
    let tools = v.get("tools").ok_or((DropKind::BadTools, "no \"tools\"".to_string()))?;
    let catalog = Catalog::from_openai_tools("tools", tools).map_err(|e| (DropKind::BadTools, e.to_string()))?;
    let messages = read_messages(v.get("messages"), max_result_chars).map_err(|e| (DropKind::BadMessages, e.to_string()))?;
    let mut actions = 0;
    for m in &messages {
        match &m.turn {
            Some(AssistantTurn::Call { name, arguments }) => {
                let (_, tool) =
                    catalog.find(name).ok_or_else(|| (DropKind::UnknownTool, format!("calls '{name}', which is not in tools")))?;
                schema::validate(arguments, &tool.input_schema).map_err(|e| (DropKind::InvalidArguments, format!("{name}: {e}")))?;
                actions += usize::from(m.learn);
            }
            Some(AssistantTurn::Text) => actions += usize::from(m.learn),
            None => {}
        }
    }
    if actions == 0 {
        return Err((DropKind::NothingToLearn, "no assistant message".into()));
    }
    Ok((catalog, messages))
}

/// Train, validation and test parts of a data set.
#[derive(Debug, Clone)]
pub struct Split<T> {
    /// 80%.
    pub train: Vec<T>,
    /// 10%.
    pub val: Vec<T>,
    /// 10%.
    pub test: Vec<T>,
}

/// Shuffle with `seed` and cut 80/10/10 (validation and test get a tenth each, rounded down,
/// but at least one item each when there are ten or more).
pub fn split<T>(mut items: Vec<T>, seed: u64) -> Split<T> {
    let mut rng = SplitMix64(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
    let tenth = items.len() / 10;
    let test = items.split_off(items.len() - tenth);
    let val = items.split_off(items.len() - tenth);
    Split { train: items, val, test }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(messages: Value) -> String {
        let tools = json!([{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object",
            "properties": {"path": {"type": "string"}, "head": {"type": "integer"}, "mode": {"enum": ["text", "bytes"]}}, "required": ["path"]}}}]);
        json!({"messages": messages, "tools": tools}).to_string()
    }

    fn call(args: &str) -> Value {
        json!([{"role": "user", "content": "read a"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "read_file", "arguments": args}}]}])
    }

    #[test]
    fn invalid_lines_are_dropped_with_their_reason() {
        let lines = [
            line(
                json!([{"role": "user", "content": "read a"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}}]}, {"role": "tool", "tool_call_id": "c", "content": "text"}, {"role": "assistant", "content": "It says text."}]),
            ),
            "not json".to_string(),
            line(call("{\"path\": 3}")),
            line(call("{}")),
            line(call("{\"path\": \"a\", \"extra\": 1}")),
            line(call("{\"path\": \"a\", \"mode\": \"hex\"}")),
            line(call("{\"path\": \"a\", \"head\": 1.5}")),
            line(
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "delete_all", "arguments": "{}"}}]}]),
            ),
            line(json!([{"role": "user", "content": "only a question"}])),
            json!({"messages": [{"role": "user", "content": "x"}]}).to_string(),
            line(json!([{"role": "tool", "tool_call_id": "nope", "content": "x"}])),
        ];
        let (kept, report) = read_trajectories(&lines.join("\n"), 100);
        assert_eq!((report.read, kept.len()), (11, 1));
        assert_eq!(kept[0].turns().count(), 2, "a call and the final text answer");
        let kinds: Vec<(usize, DropKind)> = report.dropped.iter().map(|d| (d.line, d.kind)).collect();
        use DropKind::*;
        assert_eq!(
            kinds,
            [
                (2, NotJson),
                (3, InvalidArguments),
                (4, InvalidArguments),
                (5, InvalidArguments),
                (6, InvalidArguments),
                (7, InvalidArguments),
                (8, UnknownTool),
                (9, NothingToLearn),
                (10, BadTools),
                (11, BadMessages)
            ]
        );
        assert!(report.dropped[1].reason.contains("$.path: expected string"), "{:?}", report.dropped[1]);
        assert!(report.dropped[2].reason.contains("\"path\" is missing"));
        assert!(report.dropped[3].reason.contains("undeclared"));
        assert!(report.summary(1).contains("InvalidArguments: 5"), "{}", report.summary(1));
    }

    #[test]
    fn a_call_of_weight_0_is_shown_not_learned() {
        let refused = |weight: Value| {
            line(json!([{"role": "user", "content": "read a"},
                {"role": "assistant", "weight": weight, "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"/\"}"}}]},
                {"role": "tool", "tool_call_id": "c0", "content": "EISDIR"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}}]}]))
        };
        let (kept, _) = read_trajectories(&refused(json!(0)), 100);
        let turns: Vec<(usize, &AssistantTurn)> = kept[0].turns().map(|(before, t)| (before.len(), t)).collect();
        // Only the second call, with the refused one and its error in its context.
        assert_eq!(turns, [(3, &AssistantTurn::Call { name: "read_file".into(), arguments: json!({"path": "a"}) })]);
        assert_eq!(read_trajectories(&refused(json!(1)), 100).0[0].turns().count(), 2);
        let (kept, report) = read_trajectories(&refused(json!(0.5)), 100);
        assert!(kept.is_empty() && report.dropped[0].reason.contains("messages[1].weight"), "{:?}", report.dropped);
        // A line whose only action has weight 0 teaches nothing.
        let only = line(json!([{"role": "user", "content": "x"}, {"role": "assistant", "weight": 0, "content": "no"}]));
        assert_eq!(read_trajectories(&only, 100).1.dropped[0].kind, DropKind::NothingToLearn);
    }

    #[test]
    fn split_is_seeded_disjoint_and_80_10_10() {
        let s = split((0..100).collect::<Vec<_>>(), 7);
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (80, 10, 10));
        let mut all: Vec<i32> = s.train.iter().chain(&s.val).chain(&s.test).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split((0..100).collect::<Vec<_>>(), 7).test, s.test, "same seed, same split");
        assert_ne!(split((0..100).collect::<Vec<_>>(), 8).test, s.test, "another seed, another split");
        assert_eq!(split(vec![1, 2, 3], 1).train.len(), 3);
    }
}
