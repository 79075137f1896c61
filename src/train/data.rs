//! Training data in: trajectories in OpenAI chat JSONL (one conversation per line, `messages`
//! with assistant `tool_calls` and `tool` results, plus `tools`), validated call by call against
//! the tools' schemas, with a report of every line dropped and why, and a seeded split that
//! places each line by its text.

use crate::decode::SplitMix64;
use crate::toolcall::{read_messages, schema, AssistantTurn, Catalog, Message};
use serde_json::Value;
use std::collections::BTreeMap;

/// One conversation that passed validation.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// Its line in the file (1-based), for reports.
    pub line: usize,
    /// A hash of the line's text, which places it in the split ([`split`]).
    pub key: u64,
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
            Ok((catalog, messages)) => kept.push(Trajectory { line: i + 1, key: text_key(line.trim()), catalog, messages }),
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
    /// About 80%.
    pub train: Vec<T>,
    /// About 10%.
    pub val: Vec<T>,
    /// About 10%.
    pub test: Vec<T>,
}

/// FNV-1a over the bytes of `text`: stable across builds and platforms, unlike `std`'s hasher.
pub fn text_key(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Cut `items` about 80/10/10, each placed by its `key` mixed with `seed`: a tenth of the keys
/// go to validation, a tenth to test. An item's part depends on nothing but its key and the
/// seed, so a line validated in one run stays out of training in any later run on a file that
/// holds it too (`--continue` on a larger mix). When ten or more items leave validation or test
/// empty, the training item of lowest mixed key moves there. Each part is in mixed-key order.
pub fn split<T>(items: Vec<T>, seed: u64, key: impl Fn(&T) -> u64) -> Split<T> {
    let mixed = |item: &T| SplitMix64(key(item) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64();
    let n = items.len();
    let mut keyed: Vec<(u64, T)> = items.into_iter().map(|t| (mixed(&t), t)).collect();
    keyed.sort_by_key(|(k, _)| *k);
    let mut parts: [Vec<(u64, T)>; 3] = Default::default();
    for (k, t) in keyed {
        parts[match k % 10 {
            0 => 1,
            1 => 2,
            _ => 0,
        }]
        .push((k, t));
    }
    for p in 1..3 {
        if n >= 10 && parts[p].is_empty() && !parts[0].is_empty() {
            let lowest = parts[0].remove(0);
            parts[p].push(lowest);
        }
    }
    let [train, val, test] = parts.map(|p| p.into_iter().map(|(_, t)| t).collect());
    Split { train, val, test }
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
    fn split_is_seeded_disjoint_and_about_80_10_10() {
        let key = |i: &u64| text_key(&i.to_string());
        let s = split((0..1000).collect::<Vec<u64>>(), 7, key);
        for (part, lo, hi) in [(&s.train, 740, 860), (&s.val, 70, 130), (&s.test, 70, 130)] {
            assert!((lo..=hi).contains(&part.len()), "{} of 1000", part.len());
        }
        let mut all: Vec<u64> = s.train.iter().chain(&s.val).chain(&s.test).copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(split((0..1000).collect::<Vec<u64>>(), 7, key).test, s.test, "same seed, same split");
        assert_ne!(split((0..1000).collect::<Vec<u64>>(), 8, key).test, s.test, "another seed, another split");
        assert_eq!(split(vec![1u64, 2, 3], 1, key).train.len(), 3);
        let small = split((0..10).collect::<Vec<u64>>(), 7, key);
        assert!(!small.val.is_empty() && !small.test.is_empty(), "{small:?}");
    }

    /// A file that holds another file's lines among new ones puts each old line in its old part:
    /// validation stays unseen by a run continued on the larger file.
    #[test]
    fn a_line_keeps_its_part_in_a_larger_file() {
        let key = |i: &u64| text_key(&format!("line {i}"));
        let small = split((0..300).collect::<Vec<u64>>(), 5, key);
        let large = split((0..3000).rev().collect::<Vec<u64>>(), 5, key);
        for (old, new) in [(&small.train, &large.train), (&small.val, &large.val), (&small.test, &large.test)] {
            assert!(old.iter().all(|i| new.contains(i)));
        }
    }

    #[test]
    fn text_keys_are_fnv1a() {
        assert_eq!(text_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(text_key("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
