//! Decoupled training examples with their loss masks, as in the paper: the selector learns only
//! the names it writes (every assistant action, `finish` included), each tool's argument adapter
//! only the arguments of the calls of its tool, and the answer adapter only the text of each final
//! answer (after `finish`, given the conversation with the tools' results). The token sequences
//! are the ones inference builds ([`ToolCaller::call_layout`], [`ToolCaller::answer_layout`]), so
//! what is trained is exactly what is run.

use super::data::{split, DataReport, DropKind, Trajectory};
use crate::error::Result;
use crate::model::ExampleRows;
use crate::text::ChatMessage;
use crate::toolcall::{ArgumentCue, AssistantTurn, ToolCaller, FINISH};
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
    /// The answer adapter: the text after `finish`.
    Answer,
}

impl AdapterRole {
    /// Its name on the command line and in progress lines: `selector`, the tool's, `answer`.
    pub fn name(&self) -> &str {
        match self {
            AdapterRole::Selector => "selector",
            AdapterRole::Arguments(tool) => tool,
            AdapterRole::Answer => "answer",
        }
    }

    /// Its directory in an adapter set.
    pub fn dir(&self) -> String {
        match self {
            AdapterRole::Arguments(tool) => format!("args/{tool}"),
            _ => self.name().to_string(),
        }
    }
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
    /// The name the turn calls ([`FINISH`] for a final answer): what the selector writes, or the
    /// tool whose arguments follow.
    pub name: String,
}

impl Example {
    /// Its rows as a training pass takes them.
    pub fn rows(&self) -> ExampleRows<'_> {
        ExampleRows { tokens: &self.tokens, from: self.active_from, targets: &self.targets }
    }

    /// Number of target tokens.
    pub fn n_targets(&self) -> usize {
        self.targets.iter().map(|r| r.len()).sum()
    }
}

/// Every example of `trajectories`, each argument example active from `cue`. A trajectory with
/// any sequence over `max_tokens` is dropped whole (recorded in `report`), so no conversation is
/// learned in part.
pub fn decoupled_examples(
    caller: &ToolCaller,
    trajectories: &[Trajectory],
    max_tokens: usize,
    cue: ArgumentCue,
    report: &mut DataReport,
) -> Result<Vec<Example>> {
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
            mine.push(Example {
                role: AdapterRole::Selector,
                tokens: layout.tokens[..choice_end].to_vec(),
                active_from: layout.prefix_len,
                targets: layout.choice_spans.clone(),
                line: t.line,
                name: name.to_string(),
            });
            if let (Some(from), Some(span)) = (layout.argument_activation(cue), layout.args_span) {
                mine.push(Example {
                    role: AdapterRole::Arguments(name.to_string()),
                    tokens: layout.tokens,
                    active_from: from,
                    targets: vec![span],
                    line: t.line,
                    name: name.to_string(),
                });
            }
            // The answer after `finish`: the selector's example is its beginning.
            if let (AssistantTurn::Text, Some(answer)) = (turn, answer_text(t, before.len())) {
                let layout = caller.answer_layout(&t.catalog, &context, answer)?;
                mine.push(Example {
                    role: AdapterRole::Answer,
                    tokens: layout.tokens,
                    active_from: layout.from,
                    targets: vec![layout.answer_span],
                    line: t.line,
                    name: FINISH.to_string(),
                });
            }
        }
        match mine.iter().map(|e| e.tokens.len()).max() {
            Some(n) if n > max_tokens => {
                report.drop_line(t.line, DropKind::TooLong, format!("a sequence of {n} tokens is over the limit of {max_tokens}"))
            }
            _ => out.extend(mine),
        }
    }
    Ok(out)
}

/// The text of the assistant message at `i` of `t`, where it has any.
fn answer_text(t: &Trajectory, i: usize) -> Option<&str> {
    Some(t.messages.get(i)?.chat.content.trim()).filter(|s| !s.is_empty())
}

/// One part of a split: its data lines (over-length conversations left out) and their examples.
#[derive(Debug, Clone, Default)]
pub struct SplitPart {
    /// Dataset lines (1-based) of its conversations.
    pub lines: Vec<usize>,
    /// Their examples.
    pub examples: Vec<Example>,
}

/// The three parts of [`split_examples`]: about 80%, 10%, 10% of the valid lines.
#[derive(Debug, Clone, Default)]
pub struct SplitExamples {
    /// Training part.
    pub train: SplitPart,
    /// Validation part.
    pub val: SplitPart,
    /// Test part.
    pub test: SplitPart,
}

/// The seeded split of `trajectories` (about 80/10/10, each line placed by its text), each part
/// laid out as decoupled examples. The valid lines are split before over-length ones are
/// dropped, so `max_tokens` never moves a line into another part; `agentflux train` and
/// `agentflux data check` both split here.
pub fn split_examples(
    caller: &ToolCaller,
    trajectories: Vec<Trajectory>,
    seed: u64,
    max_tokens: usize,
    cue: ArgumentCue,
    report: &mut DataReport,
) -> Result<SplitExamples> {
    let parts = split(trajectories, seed, |t| t.key);
    let mut lay_out = |part: Vec<Trajectory>| -> Result<SplitPart> {
        let examples = decoupled_examples(caller, &part, max_tokens, cue, report)?;
        let dropped: BTreeSet<usize> = report.dropped.iter().map(|d| d.line).collect();
        Ok(SplitPart { lines: part.iter().map(|t| t.line).filter(|l| !dropped.contains(l)).collect(), examples })
    };
    Ok(SplitExamples { train: lay_out(parts.train)?, val: lay_out(parts.val)?, test: lay_out(parts.test)? })
}

/// `examples` with a seeded subset of the [`FINISH`] ones left out so that they make at most
/// `share` of the result (0 ≤ share < 1); the others are all kept, in their order. Synthesized
/// conversations end in a final answer after one to three calls, so about half of the selector's
/// examples are `finish`, far more than in requests people write; this brings the selector's
/// prior back towards the tools.
pub fn cap_finish_share(examples: Vec<Example>, share: f32, seed: u64) -> Vec<Example> {
    let finishes: Vec<usize> = examples.iter().enumerate().filter(|(_, e)| e.name == FINISH).map(|(i, _)| i).collect();
    let others = examples.len() - finishes.len();
    let keep = if share <= 0.0 { 0 } else { ((share as f64 * others as f64) / (1.0 - share as f64)).floor() as usize };
    if keep >= finishes.len() {
        return examples;
    }
    let mut order = finishes;
    let mut rng = crate::decode::SplitMix64(seed ^ 0xf1a1);
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let dropped: BTreeSet<usize> = order[keep..].iter().copied().collect();
    examples.into_iter().enumerate().filter(|(i, _)| !dropped.contains(i)).map(|(_, e)| e).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(line: usize, name: &str) -> Example {
        let target = 1..2;
        Example { role: AdapterRole::Selector, tokens: vec![1, 2], active_from: 1, targets: vec![target], line, name: name.into() }
    }

    #[test]
    fn finish_share_is_capped_and_tools_kept_in_order() {
        let all: Vec<Example> = (0..40).map(|i| ex(i / 2, if i % 2 == 1 { FINISH } else { "read" })).collect();
        for share in [0.0, 0.2, 0.5] {
            let kept = cap_finish_share(all.clone(), share, 3);
            let finishes = kept.iter().filter(|e| e.name == FINISH).count();
            assert!(finishes as f32 <= share * kept.len() as f32 + 1e-6, "share {share}: {finishes} of {}", kept.len());
            assert_eq!(kept.iter().filter(|e| e.name != FINISH).count(), 20, "every tool example kept");
            assert!(kept.windows(2).all(|w| w[0].line <= w[1].line), "order kept");
            assert_eq!(kept, cap_finish_share(all.clone(), share, 3), "seeded");
        }
        assert_eq!(cap_finish_share(all.clone(), 0.2, 3).len(), 25, "20 tools and 5 finishes: 20%");
        assert_eq!(cap_finish_share(all.clone(), 0.9, 3), all, "a share above the data's keeps everything");
    }
}
