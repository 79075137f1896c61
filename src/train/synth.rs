//! Training data made offline: conversations for a tool set, built from a small seed file
//! (a sandbox workspace, value lists, and per tool its argument templates and phrasings) and
//! the tool results of the real MCP server running in that workspace.
//!
//! Every conversation starts from a freshly written workspace and has one to `max_steps` user
//! requests; each is a single tool call or a chain of calls the request asks for in order (now and
//! then after a call the server refuses, shown with weight 0), or a request that needs no
//! tool. After each call the real result is fed back and, once the request
//! is served, the assistant answers in text — the `finish` turns the selector learns. The output
//! is OpenAI chat JSONL that [`super::read_trajectories`] reads.

use crate::decode::SplitMix64;
use crate::error::{Error, Result};
use crate::mcp::{McpClient, Tool};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tool set's seed file (`adapters/<set>/data/seed.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// What the file is (free text).
    #[serde(default)]
    pub about: String,
    /// The MCP server command; `{ws}` stands for the workspace path.
    pub server: String,
    /// The sandbox the server works in, rewritten before every conversation.
    pub workspace: WorkspaceSeed,
    /// Value lists the `{slot}` placeholders draw from.
    pub values: BTreeMap<String, Vec<Value>>,
    /// Per tool: argument templates with their phrasings, and the answer after its result.
    pub tools: BTreeMap<String, ToolSeed>,
    /// Requests served by several calls in order.
    #[serde(default)]
    pub chains: Vec<ChainSeed>,
    /// Requests that need no tool, with their answers.
    pub finish: FinishSeed,
}

/// The workspace's contents, paths relative to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSeed {
    /// Text files.
    pub files: BTreeMap<String, String>,
    /// Binary files, hex-encoded.
    #[serde(default)]
    pub binary_files_hex: BTreeMap<String, String>,
    /// Empty directories.
    #[serde(default)]
    pub dirs: Vec<String>,
}

/// How one tool is asked for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSeed {
    /// Argument shapes (for example with and without an optional key), each with its phrasings.
    pub forms: Vec<FormSeed>,
    /// The assistant's text after the result: `{result}` and the arguments' top-level keys.
    pub answer: String,
    /// The text instead of `answer` where the result is blank (an empty folder), which `answer`
    /// would show as nothing.
    #[serde(default)]
    pub empty_answer: Option<String>,
    /// Calls a model plausibly makes first for this tool's requests and the server refuses
    /// (listing a file, reading a folder), with the request's `{slot}`s. They must change
    /// nothing in the workspace. Shown before the right call with weight 0, so the selector
    /// learns the recovery, not the mistake.
    #[serde(default)]
    pub mistakes: Vec<ChainCall>,
    /// Share of this tool's requests that make one of `mistakes` first, instead of
    /// `--mistake-rate`.
    #[serde(default)]
    pub mistake_rate: Option<f64>,
}

impl ToolSeed {
    /// The answer template for a call that returned `result`.
    fn answer_to(&self, result: &str) -> &str {
        match &self.empty_answer {
            Some(empty) if result.trim().is_empty() => empty,
            _ => &self.answer,
        }
    }
}

/// One argument template and the requests that ask for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormSeed {
    /// The arguments, with `{slot}` placeholders.
    pub arguments: Value,
    /// Phrasings by style (imperative, question, vague, …).
    pub phrasings: BTreeMap<String, Vec<String>>,
    /// Slot values that must go together (a file and text it really contains).
    #[serde(default)]
    pub cases: Vec<BTreeMap<String, Value>>,
    /// How often this form is drawn against the tool's other forms (default 1): an optional key
    /// asked for in a third of the requests teaches the adapter to add it unasked.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// A request served by several calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSeed {
    /// The calls, in order.
    pub calls: Vec<ChainCall>,
    /// The requests.
    pub phrasings: Vec<String>,
    /// Slot values that must go together (a folder, a file it holds, and what that file is
    /// about), so that a request can describe a file that only the first call's result names.
    #[serde(default)]
    pub cases: Vec<BTreeMap<String, Value>>,
    /// Calls a model plausibly makes first for these requests and the server refuses (reading a
    /// guessed name in the folder the request describes), as for a tool's `mistakes`.
    #[serde(default)]
    pub mistakes: Vec<ChainCall>,
    /// Share of this chain's requests that make one of `mistakes` first, instead of
    /// `--mistake-rate`: 1 where the chain's first call is only right after the mistake (a
    /// folder made because a write into it was refused), so that no request teaches it alone.
    #[serde(default)]
    pub mistake_rate: Option<f64>,
}

/// One call of a chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainCall {
    /// Tool name.
    pub name: String,
    /// Arguments, with `{slot}` placeholders shared with the chain's phrasing.
    pub arguments: Value,
}

/// Requests without a tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishSeed {
    /// The requests.
    pub requests: Vec<String>,
    /// The answer to each request (same length).
    pub answers: Vec<String>,
}

impl Seed {
    /// Read and check a seed file: every tool must exist on the server (checked later against
    /// its list), every form needs phrasings, answers pair with requests.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let seed: Seed = serde_json::from_str(&text).map_err(|e| Error::bad_file(path, e))?;
        let bad = |what: String| Err(Error::bad_file(path, what));
        if seed.finish.requests.len() != seed.finish.answers.len() || seed.finish.requests.is_empty() {
            return bad("finish.requests and finish.answers must be non-empty and of the same length".into());
        }
        for (name, t) in &seed.tools {
            if t.forms.is_empty() {
                return bad(format!("tools.{name}: no forms"));
            }
            for (i, f) in t.forms.iter().enumerate() {
                if f.phrasings.values().all(Vec::is_empty) {
                    return bad(format!("tools.{name}.forms[{i}]: no phrasings"));
                }
                if !(f.weight.is_finite() && f.weight > 0.0) {
                    return bad(format!("tools.{name}.forms[{i}].weight: {} is not a positive number", f.weight));
                }
            }
        }
        let not_a_share = |r: Option<f64>| r.filter(|r| !(0.0..=1.0).contains(r));
        for (name, t) in &seed.tools {
            if let Some(r) = not_a_share(t.mistake_rate) {
                return bad(format!("tools.{name}.mistake_rate: {r} is not a share from 0 to 1"));
            }
        }
        for (i, c) in seed.chains.iter().enumerate() {
            if c.calls.len() < 2 || c.phrasings.is_empty() {
                return bad(format!("chains[{i}]: a chain needs two calls or more and a phrasing"));
            }
            if let Some(r) = not_a_share(c.mistake_rate) {
                return bad(format!("chains[{i}].mistake_rate: {r} is not a share from 0 to 1"));
            }
        }
        for (name, v) in &seed.values {
            if v.is_empty() {
                return bad(format!("values.{name}: empty list"));
            }
        }
        Ok(seed)
    }

    /// The server command for `workspace`.
    pub fn server_command(&self, workspace: &Path) -> String {
        self.server.replace("{ws}", &workspace.to_string_lossy())
    }

    /// Write the workspace afresh at `dir` (its old contents are removed).
    pub fn reset_workspace(&self, dir: &Path) -> Result<()> {
        empty_dir(dir)?;
        let write = |rel: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
        };
        for (rel, text) in &self.workspace.files {
            write(rel, text.as_bytes())?;
        }
        for (rel, hex) in &self.workspace.binary_files_hex {
            let bytes = decode_hex(hex).ok_or_else(|| Error::InvalidOption(format!("workspace.binary_files_hex.{rel}: not hex")))?;
            write(rel, &bytes)?;
        }
        for rel in &self.workspace.dirs {
            let p = dir.join(rel);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }

    /// Every phrasing this seed can produce a request from (for the dev set's disjointness check).
    pub fn phrasings(&self) -> Vec<&str> {
        let tools = self.tools.values().flat_map(|t| t.forms.iter().flat_map(|f| f.phrasings.values().flatten()));
        let chains = self.chains.iter().flat_map(|c| c.phrasings.iter());
        tools.chain(chains).chain(self.finish.requests.iter()).map(String::as_str).collect()
    }
}

/// Uniform in 0..n (n > 0).
fn below(rng: &mut SplitMix64, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// An index drawn with probability proportional to its weight (weights positive, at least one).
fn weighted(rng: &mut SplitMix64, weights: impl Iterator<Item = f64> + Clone) -> usize {
    let total: f64 = weights.clone().sum();
    let mut r = unit(rng) * total;
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        if r < w {
            return i;
        }
        r -= w;
        last = i;
    }
    last
}

/// Remove everything inside `dir`, creating it if missing.
fn empty_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = entry.map_err(|e| Error::io(dir, e))?.path();
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            r.map_err(|e| Error::io(&p, e))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// A folder name of one of the shapes users' paths take: `mktemp`'s `tmp.` and ten random
/// characters, words with dashes, underscores, digits, dots or spaces, version numbers, a word
/// and a number after a dot.
fn shaped_name(rng: &mut SplitMix64) -> String {
    const WORDS: [&str; 12] =
        ["project", "work", "client", "agent", "home", "files", "data", "Reports", "sandbox", "Team", "backup", "notes"];
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut word = || WORDS[below(rng, WORDS.len())];
    let (a, b) = (word(), word());
    match below(rng, 8) {
        0 => format!("tmp.{}", (0..10).map(|_| CHARS[below(rng, CHARS.len())] as char).collect::<String>()),
        1 => format!("{a}-{}", 1 + below(rng, 2099)),
        2 => format!("{a}_{b}"),
        3 => format!("{a} {b}"),
        4 => format!("v{}.{}.{}", below(rng, 4), below(rng, 20), below(rng, 10)),
        5 => format!("{a}.{b}"),
        6 => format!("{a}.{}", below(rng, 2100)),
        _ => format!("{a}{}-{b}", below(rng, 100)),
    }
}

/// Where a conversation's files live: with probability `rate` one to three shaped folders below
/// `base` (the server's root), else `base` itself.
fn conversation_root(base: &Path, rate: f64, rng: &mut SplitMix64) -> PathBuf {
    if unit(rng) >= rate {
        return base.to_path_buf();
    }
    (0..1 + below(rng, 3)).fold(base.to_path_buf(), |p, _| p.join(shaped_name(rng)))
}

/// Uniform in [0, 1).
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()).collect()
}

/// How many conversations, how long, and where.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Conversations to write.
    pub conversations: usize,
    /// Most user requests per conversation.
    pub max_steps: usize,
    /// Random seed: the same seed, seed file and server give the same data.
    pub seed: u64,
    /// The sandbox workspace (rewritten before every conversation).
    pub workspace: PathBuf,
    /// Share of requests that need no tool.
    pub finish_rate: f64,
    /// Share of requests served by a chain of calls.
    pub chain_rate: f64,
    /// Share of requests with a distractor sentence (from `values.distractor`) before or after them.
    pub distractor_rate: f64,
    /// Tool results longer than this many characters are cut in answers.
    pub max_answer_chars: usize,
    /// Share of requests, of a tool or chain with `mistakes` and no `mistake_rate` of its own,
    /// that first make one of them: the server's error comes back, then the right calls follow.
    pub mistake_rate: f64,
    /// Share of conversations whose files sit in shaped folders below the workspace
    /// (`tmp.x7Qz…`, dashes, dots, digits, spaces, nesting), so that the argument adapters learn
    /// to copy paths rather than recall one workspace.
    pub shaped_roots: f64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            conversations: 100,
            max_steps: 3,
            seed: 1,
            workspace: PathBuf::from("/tmp/agentflux-ws"),
            finish_rate: 0.12,
            chain_rate: 0.15,
            distractor_rate: 0.25,
            max_answer_chars: 400,
            mistake_rate: 0.1,
            shaped_roots: 0.5,
        }
    }
}

/// What was made.
#[derive(Debug, Clone, Default)]
pub struct SynthReport {
    /// Conversations written.
    pub conversations: usize,
    /// Tool calls per tool.
    pub calls: BTreeMap<String, usize>,
    /// Single-call requests per phrasing style.
    pub styles: BTreeMap<String, usize>,
    /// Requests served by a chain.
    pub chains: usize,
    /// Requests that needed no tool.
    pub finish_requests: usize,
    /// Requests with a distractor sentence.
    pub distractors: usize,
    /// Calls whose real result was an error (kept: the call was still the right one).
    pub tool_errors: usize,
    /// Conversations per number of requests.
    pub lengths: BTreeMap<usize, usize>,
    /// Conversations in a shaped folder below the workspace.
    pub shaped_roots: usize,
    /// Requests whose right call follows a refused one (`mistakes`).
    pub recoveries: usize,
}

impl SynthReport {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let calls: usize = self.calls.values().sum();
        let mut s = format!(
            "{} conversations ({} in shaped folders), {calls} tool calls ({} tool errors), {} chained requests, {} requests without a tool, {} with a distractor, {} recovering from a refused call\n",
            self.conversations, self.shaped_roots, self.tool_errors, self.chains, self.finish_requests, self.distractors, self.recoveries
        );
        s.push_str(&format!("  requests per conversation: {}\n", join(&self.lengths)));
        s.push_str(&format!("  styles: {}\n", join(&self.styles)));
        s.push_str(&format!("  calls: {}\n", join(&self.calls)));
        s
    }
}

fn join<K: std::fmt::Display>(m: &BTreeMap<K, usize>) -> String {
    m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// The tools in OpenAI's `tools` shape.
pub fn openai_tools(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
            .collect(),
    )
}

/// Build `opts.conversations` conversations with `server` (running in `opts.workspace`), one
/// JSONL line each; `on_line` sees each line as it is made (progress, writing).
pub fn synthesize(
    seed: &Seed,
    server: &mut McpClient,
    opts: &SynthOptions,
    mut on_line: impl FnMut(usize, &str) -> Result<()>,
) -> Result<SynthReport> {
    let tools = server.list_tools()?;
    let mistakes = seed.tools.values().flat_map(|t| &t.mistakes).chain(seed.chains.iter().flat_map(|c| &c.mistakes)).map(|k| &k.name);
    for name in seed.tools.keys().chain(seed.chains.iter().flat_map(|c| c.calls.iter().map(|k| &k.name))).chain(mistakes) {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(Error::InvalidOption(format!(
                "the seed names tool '{name}', which the server '{}' does not have",
                server.command()
            )));
        }
    }
    let tools_json = openai_tools(&tools);
    let mut rng = SplitMix64(opts.seed);
    let mut report = SynthReport::default();
    let tool_names: Vec<&String> = seed.tools.keys().collect();
    if tool_names.is_empty() {
        return Err(Error::InvalidOption("the seed has no tools".into()));
    }
    for c in 0..opts.conversations {
        let root = conversation_root(&opts.workspace, opts.shaped_roots, &mut rng);
        if root != opts.workspace {
            empty_dir(&opts.workspace)?;
            report.shaped_roots += 1;
        }
        seed.reset_workspace(&root)?;
        let mut conv = Conversation { ws: root.to_string_lossy().into_owned(), messages: Vec::new(), calls: 0 };
        let steps = 1 + below(&mut rng, opts.max_steps.max(1));
        for _ in 0..steps {
            let r = unit(&mut rng);
            if r < opts.finish_rate {
                let i = below(&mut rng, seed.finish.requests.len());
                conv.user(seed.finish.requests[i].clone());
                conv.assistant_text(seed.finish.answers[i].clone());
                report.finish_requests += 1;
                continue;
            }
            let mut b = Bindings::default();
            let (request, calls, mistake): (String, Vec<(String, Value)>, _) =
                if r < opts.finish_rate + opts.chain_rate && !seed.chains.is_empty() {
                    let chain = &seed.chains[below(&mut rng, seed.chains.len())];
                    b.take_one_case(&chain.cases, &conv.ws, &mut rng);
                    let phrasing = &chain.phrasings[below(&mut rng, chain.phrasings.len())];
                    let request = b.render_text(phrasing, seed, &conv.ws, &mut rng)?;
                    let calls = chain
                        .calls
                        .iter()
                        .map(|k| Ok((k.name.clone(), b.render(&k.arguments, seed, &conv.ws, &mut rng)?)))
                        .collect::<Result<_>>()?;
                    let rate = chain.mistake_rate.unwrap_or(opts.mistake_rate);
                    let mistake = b.draw_mistake(&chain.mistakes, rate, seed, &conv.ws, &mut rng)?;
                    report.chains += 1;
                    (request, calls, mistake)
                } else {
                    let name = tool_names[below(&mut rng, tool_names.len())];
                    let tool = &seed.tools[name];
                    let form = &tool.forms[weighted(&mut rng, tool.forms.iter().map(|f| f.weight))];
                    b.take_one_case(&form.cases, &conv.ws, &mut rng);
                    let styles: Vec<(&String, &Vec<String>)> = form.phrasings.iter().filter(|(_, v)| !v.is_empty()).collect();
                    let (style, list) = styles[below(&mut rng, styles.len())];
                    let request = b.render_text(&list[below(&mut rng, list.len())], seed, &conv.ws, &mut rng)?;
                    *report.styles.entry(style.clone()).or_default() += 1;
                    let arguments = b.render(&form.arguments, seed, &conv.ws, &mut rng)?;
                    let rate = tool.mistake_rate.unwrap_or(opts.mistake_rate);
                    let mistake = b.draw_mistake(&tool.mistakes, rate, seed, &conv.ws, &mut rng)?;
                    (request, vec![(name.clone(), arguments)], mistake)
                };
            let request = if seed.values.contains_key("distractor") && unit(&mut rng) < opts.distractor_rate {
                report.distractors += 1;
                let d = b.render_text("{distractor}", seed, &conv.ws, &mut rng)?;
                if below(&mut rng, 2) == 0 {
                    format!("{d} {request}")
                } else {
                    format!("{request} {d}")
                }
            } else {
                request
            };
            conv.user(request);
            if let Some((name, args)) = mistake {
                // Kept only when the server refuses it: a call that worked would be no mistake.
                let result = server.call_tool(&name, &args)?;
                if result.is_error {
                    conv.call(&name, &args, &result.text(), false);
                    report.recoveries += 1;
                }
            }
            let mut answers = Vec::new();
            for (name, args) in calls {
                let result = server.call_tool(&name, &args)?;
                let text = result.text();
                if result.is_error {
                    report.tool_errors += 1;
                }
                *report.calls.entry(name.clone()).or_default() += 1;
                conv.call(&name, &args, &text, true);
                let shown = cut(&text, opts.max_answer_chars);
                answers.push(if result.is_error {
                    format!("The tool reported an error: {shown}")
                } else {
                    fill_answer(seed.tools.get(&name).map_or("Done.", |t| t.answer_to(&text)), &args, &shown)
                });
            }
            conv.assistant_text(answers.join("\n\n"));
        }
        *report.lengths.entry(steps).or_default() += 1;
        report.conversations += 1;
        let line = json!({"messages": conv.messages, "tools": tools_json}).to_string();
        on_line(c, &line)?;
    }
    Ok(report)
}

/// The answer template with `{result}` and the arguments' top-level string or number values.
fn fill_answer(template: &str, args: &Value, result: &str) -> String {
    let mut s = template.to_string();
    if let Some(obj) = args.as_object() {
        for (k, v) in obj {
            let text = match v {
                Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            s = s.replace(&format!("{{{k}}}"), &text);
        }
    }
    s.replace("{result}", result)
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// The messages of one conversation in OpenAI's shape.
struct Conversation {
    ws: String,
    messages: Vec<Value>,
    calls: usize,
}

impl Conversation {
    fn user(&mut self, content: String) {
        self.messages.push(json!({"role": "user", "content": content}));
    }

    fn assistant_text(&mut self, content: String) {
        self.messages.push(json!({"role": "assistant", "content": content}));
    }

    /// A call and its result; `learn` false marks the call weight 0 (shown, not imitated).
    fn call(&mut self, name: &str, args: &Value, result: &str, learn: bool) {
        self.calls += 1;
        let id = format!("call_{}", self.calls);
        let mut message = json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}]});
        if !learn {
            message["weight"] = json!(0);
        }
        self.messages.push(message);
        self.messages.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
    }
}

/// Slot values drawn for one request: the phrasing and the arguments share them.
#[derive(Default)]
struct Bindings(HashMap<String, Value>);

impl Bindings {
    /// Bind one of `cases`, drawn uniformly; none when there are none.
    fn take_one_case(&mut self, cases: &[BTreeMap<String, Value>], ws: &str, rng: &mut SplitMix64) {
        if !cases.is_empty() {
            self.take_case(&cases[below(rng, cases.len())], ws, rng);
        }
    }

    fn take_case(&mut self, case: &BTreeMap<String, Value>, ws: &str, rng: &mut SplitMix64) {
        for (k, v) in case {
            self.0.insert(k.clone(), with_drawn(&with_ws(v, ws), rng));
        }
    }

    /// With probability `rate`, one of `mistakes` with these bindings; nothing is drawn from
    /// `rng` when there are none, so seeds without mistakes give the same data as before.
    fn draw_mistake(
        &mut self,
        mistakes: &[ChainCall],
        rate: f64,
        seed: &Seed,
        ws: &str,
        rng: &mut SplitMix64,
    ) -> Result<Option<(String, Value)>> {
        if mistakes.is_empty() || unit(rng) >= rate {
            return Ok(None);
        }
        let k = &mistakes[below(rng, mistakes.len())];
        Ok(Some((k.name.clone(), self.render(&k.arguments, seed, ws, rng)?)))
    }

    /// The value of `slot` (`name` or `name#n`), drawn on first use; `name#n` differs from the
    /// other draws of `name` when the list allows.
    fn value(&mut self, slot: &str, seed: &Seed, ws: &str, rng: &mut SplitMix64) -> Result<Value> {
        if let Some(v) = self.0.get(slot) {
            return Ok(v.clone());
        }
        let list_name = slot.split('#').next().unwrap_or(slot);
        let list = seed
            .values
            .get(list_name)
            .ok_or_else(|| Error::InvalidOption(format!("the seed uses {{{slot}}} but has no values.{list_name}")))?;
        let taken: Vec<Value> = self.0.iter().filter(|(k, _)| k.split('#').next() == Some(list_name)).map(|(_, v)| v.clone()).collect();
        let fresh: Vec<Value> = list.iter().map(|v| with_ws(v, ws)).filter(|v| !taken.contains(v)).collect();
        let pool = if fresh.is_empty() { list.iter().map(|v| with_ws(v, ws)).collect() } else { fresh };
        let v = with_drawn(&pool[below(rng, pool.len())], rng);
        self.0.insert(slot.to_string(), v.clone());
        Ok(v)
    }

    /// `template` with every `{slot}` replaced by its value's text.
    fn render_text(&mut self, template: &str, seed: &Seed, ws: &str, rng: &mut SplitMix64) -> Result<String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else { break };
            let slot = &rest[start + 1..start + len];
            out.push_str(&rest[..start]);
            if slot == "ws" {
                out.push_str(ws);
            } else if is_slot(slot) {
                match self.value(slot, seed, ws, rng)? {
                    Value::String(s) => out.push_str(&s),
                    v => out.push_str(&v.to_string()),
                }
            } else {
                out.push_str(&rest[start..start + len + 1]);
            }
            rest = &rest[start + len + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The arguments template with its slots filled: a string that is exactly `{slot}` becomes
    /// the slot's JSON value, other strings are filled as text.
    fn render(&mut self, template: &Value, seed: &Seed, ws: &str, rng: &mut SplitMix64) -> Result<Value> {
        Ok(match template {
            Value::String(s) => match s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                Some(slot) if is_slot(slot) && slot != "ws" => self.value(slot, seed, ws, rng)?,
                _ => Value::String(self.render_text(s, seed, ws, rng)?),
            },
            Value::Array(items) => Value::Array(items.iter().map(|v| self.render(v, seed, ws, rng)).collect::<Result<_>>()?),
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, v) in m {
                    out.insert(k.clone(), self.render(v, seed, ws, rng)?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }
}

fn is_slot(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '#')
}

/// `v` with each `{name}` replaced by a fresh [`shaped_name`] and each `{words}` by fresh
/// [`drawn_words`], so that the last part of a path varies as the folders above it do, and a
/// text to be written is one the adapter has to copy rather than one it has seen.
fn with_drawn(v: &Value, rng: &mut SplitMix64) -> Value {
    match v {
        Value::String(s) if s.contains(NAME) || s.contains(WORDS) => {
            let named = fill_each(s, NAME, rng, shaped_name);
            Value::String(fill_each(&named, WORDS, rng, drawn_words))
        }
        other => other.clone(),
    }
}

/// `s` with each `placeholder` replaced by its own `draw`.
fn fill_each(s: &str, placeholder: &str, rng: &mut SplitMix64, draw: fn(&mut SplitMix64) -> String) -> String {
    s.split(placeholder).enumerate().fold(String::new(), |mut out, (i, part)| {
        if i > 0 {
            out.push_str(&draw(rng));
        }
        out.push_str(part);
        out
    })
}

/// Two to six plain words, the kind of short text a user asks to have written down.
fn drawn_words(rng: &mut SplitMix64) -> String {
    const WORDS: [&str; 48] = [
        "call", "the", "garden", "invoice", "tomorrow", "plan", "order", "paper", "blue", "train", "ticket", "lunch", "with", "Maria",
        "budget", "draft", "review", "before", "Monday", "send", "photos", "to", "Li", "fix", "printer", "water", "plants", "book",
        "flight", "new", "password", "meeting", "at", "noon", "pay", "rent", "and", "clean", "kitchen", "ideas", "for", "trip", "ready",
        "version", "2", "Oslo", "boxes", "soon",
    ];
    (0..2 + below(rng, 5)).map(|_| WORDS[below(rng, WORDS.len())]).collect::<Vec<_>>().join(" ")
}

/// The placeholders in a seed value for a freshly drawn folder or file name, and for fresh words.
const NAME: &str = "{name}";
const WORDS: &str = "{words}";

fn with_ws(v: &Value, ws: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace("{ws}", ws)),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        serde_json::from_value(json!({
            "server": "srv {ws}",
            "workspace": {"files": {"a.txt": "x"}},
            "values": {"file": ["{ws}/a.txt", "{ws}/b.txt"], "n": [3]},
            "tools": {"read": {"forms": [{"arguments": {"path": "{file}", "head": "{n}", "both": ["{file}", "{file#2}"]}, "phrasings": {"q": ["{file} and {file#2}, {n} lines, {unknown text}"]}}], "answer": "{path}: {result}"}},
            "finish": {"requests": ["hi"], "answers": ["hello"]}
        }))
        .unwrap()
    }

    #[test]
    fn slots_are_shared_between_phrasing_and_arguments() {
        let s = seed();
        let mut rng = SplitMix64(3);
        let mut b = Bindings::default();
        let form = &s.tools["read"].forms[0];
        let text = b.render_text(&form.phrasings["q"][0], &s, "/w", &mut rng).unwrap();
        let args = b.render(&form.arguments, &s, "/w", &mut rng).unwrap();
        let (f1, f2) = (args["both"][0].as_str().unwrap(), args["both"][1].as_str().unwrap());
        assert_eq!(args["path"], f1);
        assert_ne!(f1, f2, "a second draw differs from the first");
        assert_eq!(args["head"], json!(3), "a whole-string slot keeps its JSON type");
        assert_eq!(text, format!("{f1} and {f2}, 3 lines, {{unknown text}}"));
        assert!(f1.starts_with("/w/"));
        assert_eq!(fill_answer(&s.tools["read"].answer, &args, "R"), format!("{f1}: R"));
        let err = Bindings::default().render_text("{nope}", &s, "/w", &mut rng).unwrap_err().to_string();
        assert!(err.contains("values.nope"), "{err}");
    }

    #[test]
    fn forms_are_drawn_by_weight_and_a_bad_weight_is_refused() {
        let mut rng = SplitMix64(7);
        let mut counts = [0usize; 3];
        for _ in 0..12_000 {
            counts[weighted(&mut rng, [4.0, 1.0, 1.0].into_iter())] += 1;
        }
        for (count, share) in counts.iter().zip([4.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0]) {
            let seen = *count as f64 / 12_000.0;
            assert!((seen - share).abs() < 0.02, "{counts:?}");
        }
        let v = json!({"server": "srv {ws}", "workspace": {"files": {}}, "values": {}, "finish": {"requests": ["hi"], "answers": ["hello"]},
            "tools": {"read": {"forms": [{"arguments": {}, "phrasings": {"q": ["x"]}, "weight": 0.0}], "answer": "a"}}});
        let p = std::env::temp_dir().join(format!("agentflux-seed-weight-{}.json", std::process::id()));
        std::fs::write(&p, v.to_string()).unwrap();
        let err = Seed::load(&p).unwrap_err().to_string();
        std::fs::remove_file(&p).unwrap();
        assert!(err.contains("tools.read.forms[0].weight"), "{err}");
        assert_eq!(seed().tools["read"].forms[0].weight, 1.0, "the default weight");
    }

    #[test]
    fn a_blank_result_gets_the_empty_answer_where_the_tool_has_one() {
        let mut tool = seed().tools["read"].clone();
        assert_eq!(tool.answer_to(" \n"), "{path}: {result}", "no empty_answer: the answer as always");
        tool.empty_answer = Some("{path} is empty.".into());
        assert_eq!(tool.answer_to(""), "{path} is empty.");
        assert_eq!(tool.answer_to(" \n"), "{path} is empty.");
        assert_eq!(tool.answer_to("[FILE] a"), "{path}: {result}");
    }

    /// `{slot}` filled in a request and in arguments by one set of bindings: the same text in both.
    fn drawn_for_request_and_arguments(s: &Seed, slot: &str, rng: &mut SplitMix64) -> String {
        let mut b = Bindings::default();
        let text = b.render_text(&format!("Use {{{slot}}} now"), s, "/w", rng).unwrap();
        let args = b.render(&json!({ "v": format!("{{{slot}}}") }), s, "/w", rng).unwrap();
        let v = args["v"].as_str().unwrap().to_string();
        assert_eq!(text, format!("Use {v} now"), "one draw for the request and the arguments");
        v
    }

    #[test]
    fn a_name_placeholder_draws_a_fresh_shaped_name_shared_by_request_and_arguments() {
        let mut s = seed();
        s.values.insert("new_dir".into(), vec![json!("{ws}/{name}"), json!("{ws}/x/{name}.d")]);
        let mut rng = SplitMix64(11);
        let mut leaves = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let path = &drawn_for_request_and_arguments(&s, "new_dir", &mut rng);
            assert!(path.starts_with("/w/") && !path.contains('{') && !path.ends_with('/'), "{path}");
            leaves.insert(path.rsplit('/').next().unwrap().to_string());
        }
        assert!(leaves.len() > 20, "names are drawn afresh: {leaves:?}");
        assert!(leaves.iter().any(|l| l.contains('.') && !l.ends_with(".d")), "shapes with dots: {leaves:?}");
    }

    #[test]
    fn a_words_placeholder_draws_fresh_text_each_time_it_appears() {
        let mut s = seed();
        s.values.insert("content".into(), vec![json!("Note: {words}\n{words}")]);
        let mut rng = SplitMix64(5);
        let mut texts = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let content = &drawn_for_request_and_arguments(&s, "content", &mut rng);
            let (first, second) = content.strip_prefix("Note: ").and_then(|c| c.split_once('\n')).unwrap();
            for words in [first, second] {
                let n = words.split(' ').count();
                assert!((2..=6).contains(&n) && !words.contains('{'), "{words:?}");
            }
            texts.insert(content.to_string());
        }
        assert_eq!(texts.len(), 20, "texts are drawn afresh: {texts:?}");
    }

    #[test]
    fn a_case_draws_its_placeholders_once_for_request_and_arguments() {
        let s = seed();
        let case: BTreeMap<String, Value> = [("old".to_string(), json!("buy milk")), ("new".to_string(), json!("{words}"))].into();
        let mut rng = SplitMix64(7);
        let mut texts = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut b = Bindings::default();
            b.take_case(&case, "/w", &mut rng);
            let text = b.render_text("Replace {old} with {new}", &s, "/w", &mut rng).unwrap();
            let args = b.render(&json!({"oldText": "{old}", "newText": "{new}"}), &s, "/w", &mut rng).unwrap();
            let new = args["newText"].as_str().unwrap();
            assert_eq!(args["oldText"], "buy milk", "a plain case value is kept");
            assert_eq!(text, format!("Replace buy milk with {new}"), "one draw for the request and the arguments");
            assert!((2..=6).contains(&new.split(' ').count()) && !new.contains('{'), "{new:?}");
            texts.insert(new.to_string());
        }
        assert!(texts.len() > 15, "a case's words are drawn afresh: {texts:?}");
    }

    #[test]
    fn hex_and_cuts() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(cut("abcdef", 3), "abc…");
        assert_eq!(seed().phrasings(), ["{file} and {file#2}, {n} lines, {unknown text}", "hi"]);
    }
}
