//! Decoupled training examples with their loss masks, as in the paper: the selector learns only
//! the names it writes (every assistant action, `finish` included), each tool's argument adapter
//! only the arguments of the calls of its tool. The token sequences are the ones inference
//! builds ([`ToolCaller::call_layout`]), so what is trained is exactly what is run.

use super::data::{split, DataReport, DropKind, Trajectory};
use crate::error::Result;
use crate::text::ChatMessage;
use crate::toolcall::{AssistantTurn, ToolCaller, FINISH};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// Which adapter an example trains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdapterRole {
    /// The tool selector.
    Selector,
    /// The argument adapter of this tool.
    Arguments(String),
}

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The adapter it trains.
    pub role: AdapterRole,
    /// Every token of the sequence.
    pub tokens: Vec<u32>,
    /// First position where the adapter is active (before it: the frozen prefix, forward only).
    pub active_from: usize,
    /// Positions whose token is a target (predicted from the position before): the loss mask.
    pub targets: Vec<Range<usize>>,
    /// The data line it came from.
    pub line: usize,
}

impl Example {
    /// Number of target tokens.
    pub fn n_targets(&self) -> usize {
        self.targets.iter().map(|r| r.len()).sum()
    }
}

/// Every example of `trajectories`. A trajectory with any sequence over `max_tokens` is dropped
/// whole (recorded in `report`), so no conversation is learned in part.
pub fn decoupled_examples(caller: &ToolCaller, trajectories: &[Trajectory], max_tokens: usize, report: &mut DataReport) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for t in trajectories {
        let mut mine = Vec::new();
        for (before, turn) in t.turns() {
            let context: Vec<ChatMessage> = before.iter().map(|m| m.chat.clone()).collect();
            let empty = Value::Object(Default::default());
            let (name, arguments) = match turn {
                AssistantTurn::Call { name, arguments } => (name.as_str(), arguments),
                AssistantTurn::Text => (FINISH, &empty),
            };
            let layout = caller.call_layout(&t.catalog, &context, name, arguments)?;
            let choice_end = layout.choice_spans.last().map_or(layout.prefix_len, |r| r.end);
            mine.push(Example { role: AdapterRole::Selector, tokens: layout.tokens[..choice_end].to_vec(), active_from: layout.prefix_len, targets: layout.choice_spans.clone(), line: t.line });
            if let (Some(from), Some(span)) = (layout.args_from, layout.args_span) {
                mine.push(Example { role: AdapterRole::Arguments(name.to_string()), tokens: layout.tokens, active_from: from, targets: vec![span], line: t.line });
            }
        }
        match mine.iter().map(|e| e.tokens.len()).max() {
            Some(n) if n > max_tokens => report.drop_line(t.line, DropKind::TooLong, format!("a sequence of {n} tokens is over the limit of {max_tokens}")),
            _ => out.extend(mine),
        }
    }
    Ok(out)
}

/// One part of a split: its data lines (over-length conversations left out) and their examples.
#[derive(Debug, Clone, Default)]
pub struct SplitPart {
    pub lines: Vec<usize>,
    pub examples: Vec<Example>,
}

/// The three parts of [`split_examples`]: 80%, 10%, 10% of the valid lines.
#[derive(Debug, Clone, Default)]
pub struct SplitExamples {
    pub train: SplitPart,
    pub val: SplitPart,
    pub test: SplitPart,
}

/// The seeded 80/10/10 split of `trajectories`, each part laid out as decoupled examples. The
/// valid lines are split before over-length ones are dropped, so `max_tokens` never moves a line
/// into another part; `agentflux train` and `agentflux data check` both split here.
pub fn split_examples(caller: &ToolCaller, trajectories: Vec<Trajectory>, seed: u64, max_tokens: usize, report: &mut DataReport) -> Result<SplitExamples> {
    let parts = split(trajectories, seed);
    let mut lay_out = |part: Vec<Trajectory>| -> Result<SplitPart> {
        let examples = decoupled_examples(caller, &part, max_tokens, report)?;
        let dropped: BTreeSet<usize> = report.dropped.iter().map(|d| d.line).collect();
        Ok(SplitPart { lines: part.iter().map(|t| t.line).filter(|l| !dropped.contains(l)).collect(), examples })
    };
    Ok(SplitExamples { train: lay_out(parts.train)?, val: lay_out(parts.val)?, test: lay_out(parts.test)? })
}

/// Examples and target tokens per adapter, for reports.
pub fn counts<'a>(examples: impl IntoIterator<Item = &'a Example>) -> BTreeMap<AdapterRole, (usize, usize)> {
    let mut m: BTreeMap<AdapterRole, (usize, usize)> = BTreeMap::new();
    for e in examples {
        let c = m.entry(e.role.clone()).or_default();
        c.0 += 1;
        c.1 += e.n_targets();
    }
    m
}
