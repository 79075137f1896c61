//! The two-stage call on one KV cache.
//!
//! Prompt layout (token ids concatenated piece by piece, so training and inference see the same
//! tokens):
//!
//! ```text
//! [chat template: system (instructions + one line per tool) + conversation + assistant start]
//! call:                      ← selector stage: the tool name is scored, never free-generated
//!  NAME\n                    ← the chosen candidate
//! schema: {input schema}\n
//! args:                      ← argument stage: JSON decoded under the schema
//! ```
//!
//! With several servers the choice is hierarchical: the system text lists the servers (with their
//! tool names), `server:` picks one among them and `finish`, then that server's tools alone are
//! listed and `call:` picks among them:
//!
//! ```text
//! [… system lists servers …]server: NAME\ntools:\n- tool: description\n…call: TOOL\n…
//! ```
//!
//! The prefix (everything before the first cue) is computed once with the base weights. The
//! selector adapter is activated at the first cue, an argument adapter at `schema:` or at `args:`
//! ([`ArgumentCue`], read from its invocation tokens); both continue from the cached prefix, so
//! only their own tokens are computed.

use super::catalog::{short_description, Catalog, FINISH};
use super::select::{normalise, TokenTrie};
use super::{ConstraintFactory, JsonConstraint};
use crate::decode::{GenerateOptions, SplitMix64};
use crate::error::{Error, Result};
use crate::lora::ActiveAdapter;
use crate::session::{Activation, Session, SessionStats};
use crate::text::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::ops::{ControlFlow, Range};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The text that opens the selector stage.
pub const SELECT_CUE: &str = "call:";
/// The text that opens the server stage of hierarchical selection.
pub const SERVER_CUE: &str = "server:";
/// The text that opens the argument stage (followed by the tool's schema).
pub const SCHEMA_CUE: &str = "schema:";
/// The text right before the arguments' JSON.
pub const ARGS_CUE: &str = "\nargs:";

/// Where an argument adapter is switched on: the rows from there on run under it (and in
/// training forward and backward), the rows before it are the frozen prefix, computed with the
/// base weights. An adapter records its cue as its invocation tokens, so inference finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgumentCue {
    /// At `schema:`: the tool's schema is read under the adapter.
    Schema,
    /// At `args:`, right before the arguments: the schema is read with the base weights, so an
    /// argument example has about a third of the active rows to train.
    Args,
}

impl ArgumentCue {
    /// Its text in the prompt.
    pub fn text(self) -> &'static str {
        match self {
            ArgumentCue::Schema => SCHEMA_CUE,
            ArgumentCue::Args => ARGS_CUE,
        }
    }
}

/// Most argument tokens a call may write unless told otherwise ([`ToolCaller::set_arg_budget`]):
/// room for the longest value the implicit bounds allow ([`MAX_STRING_CHARS`](crate::toolcall::MAX_STRING_CHARS))
/// at a few characters per token.
pub const DEFAULT_ARG_BUDGET: usize = 1024;
/// The request an adapter-less choice is calibrated against: one that asks for nothing, so the
/// scores after it are the model's preference for each name regardless of the request.
pub const CONTENT_FREE_REQUEST: &str = "N/A";
/// Most baselines kept (tool sets × cues) before the store starts over.
const MAX_BASELINES: usize = 256;
/// Most tokens the free monolithic mode generates (a call, not an essay).
const MAX_FREE_CALL_TOKENS: usize = 512;

/// Adapters for a tool set: one selector, one argument adapter per tool (each optional).
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    /// Chooses the tool.
    pub selector: Option<ActiveAdapter>,
    /// Writes a tool's arguments, by tool name.
    pub arguments: HashMap<String, ActiveAdapter>,
    /// The tools the selector was trained to choose among (empty: not recorded).
    pub selector_tools: Vec<String>,
    /// Writes the final answer after `finish`, from the conversation with the tools' results.
    pub answer: Option<ActiveAdapter>,
}

impl AdapterSet {
    /// The adapters that apply to a catalog of `tools` that someone else chose (a server
    /// request): every listed tool's argument adapter, and the selector and the answer adapter
    /// only when the set was trained on a tool set containing all of them (an answer adapter
    /// learned to quote its own tools' results).
    pub fn for_tools(&self, tools: &[&str]) -> AdapterSet {
        let covered = !self.selector_tools.is_empty() && tools.iter().all(|t| self.selector_tools.iter().any(|s| s == t));
        AdapterSet {
            selector: self.selector.filter(|_| covered),
            arguments: self.arguments.iter().filter(|(name, _)| tools.contains(&name.as_str())).map(|(n, a)| (n.clone(), *a)).collect(),
            selector_tools: self.selector_tools.clone(),
            answer: self.answer.filter(|_| covered),
        }
    }
}

/// Which calls are allowed (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// A tool or `finish`, as the model chooses.
    #[default]
    Auto,
    /// A tool, never `finish`.
    Required,
    /// This tool: only its arguments are generated.
    Function(String),
}

/// Progress of a call, reported as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEvent<'a> {
    /// The tool (or `finish`) is chosen; its arguments come next.
    Chosen(&'a str),
    /// One more token of the arguments' JSON.
    ArgumentToken(u32),
}

/// A call laid out token for token (see [`ToolCaller::call_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallLayout {
    /// Every token: prefix, choice, and for a tool its schema and arguments.
    pub tokens: Vec<u32>,
    /// Tokens of the prefix (computed with the base weights; the selector is activated here).
    pub prefix_len: usize,
    /// The names the selector writes (the server's with a hierarchy, then the tool's or
    /// `finish`), each with its newline.
    pub choice_spans: Vec<Range<usize>>,
    /// Where the `schema:` cue starts, for a tool.
    pub schema_at: Option<usize>,
    /// Where the `args:` cue starts, for a tool.
    pub args_cue_at: Option<usize>,
    /// The arguments' tokens, for a tool.
    pub args_span: Option<Range<usize>>,
}

impl CallLayout {
    /// Where an argument adapter activated at `cue` starts, for a tool.
    pub fn argument_activation(&self, cue: ArgumentCue) -> Option<usize> {
        match cue {
            ArgumentCue::Schema => self.schema_at,
            ArgumentCue::Args => self.args_cue_at,
        }
    }
}

/// A final answer as the answer adapter learns it: the prompt [`ToolCaller::answer`] continues,
/// then the answer's text and the end of the turn.
#[derive(Debug, Clone)]
pub struct AnswerLayout {
    /// Every token: prefix, `call: finish`, the answer, a stop token.
    pub tokens: Vec<u32>,
    /// Where the answer adapter is activated (the choice cue, as the selector).
    pub from: usize,
    /// The answer's tokens and the stop token after them.
    pub answer_span: Range<usize>,
}

/// Time and tokens of one call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CallStats {
    /// Tokens of the shared prefix.
    pub prefix_tokens: usize,
    /// Milliseconds: laying out the prompt (the conversation's new tokens are computed in the
    /// selection's pass, so their time is in `select_ms`), selection, arguments.
    pub prefix_ms: f64,
    /// Milliseconds selecting the tool.
    pub select_ms: f64,
    /// Milliseconds writing the arguments.
    pub args_ms: f64,
    /// Tokens of the chosen name (as the selector stage wrote it).
    pub name_tokens: usize,
    /// Argument tokens generated.
    pub arg_tokens: usize,
    /// Of those, tokens the schema forced that were appended in chunks (jump-forward) instead of
    /// one forward pass each.
    pub arg_forced: usize,
    /// Forward passes of the argument stage (its prompt's, then one per decoding step or chunk).
    pub arg_passes: usize,
    /// The session's counters for this call.
    pub session: SessionStats,
}

/// A chosen tool call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ToolCall {
    /// Tool name, or `finish`.
    pub name: String,
    /// Arguments (valid for the tool's schema; `{}` for `finish`).
    pub arguments: Value,
    /// Probability of the chosen tool among the candidates (`None` in the monolithic modes,
    /// which generate the name instead of scoring it).
    pub confidence: Option<f64>,
    /// Probability of every candidate; with a hierarchy, `finish` and the chosen server's tools,
    /// each P(server) · P(tool | server) (the other servers' tools are not scored). Without a
    /// selector adapter, calibrated ([`ToolCaller::set_calibration`]).
    pub candidates: BTreeMap<String, f64>,
    /// Timings and token counts.
    pub stats: CallStats,
    /// The generated text, in the monolithic modes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// How the decoupled call chooses and what its stages share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The most probable candidate under the trie; every stage continues the one KV cache.
    #[default]
    Shared,
    /// The paper's public code, emulated for comparison: the choice is a majority vote of
    /// `samples` draws at temperature 1 (from the candidates' probabilities, so every draw is a
    /// real name), and each stage starts from an empty cache, as when the whole conversation is
    /// sent again to a server for every adapter.
    Reference {
        /// Selector draws.
        samples: usize,
        /// Seed of the draws.
        seed: u64,
    },
}

/// Everything a call needs besides the session: tokenizer, chat template, constraints.
pub struct ToolCaller {
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    constraints: ConstraintFactory,
    hierarchy: bool,
    strategy: Strategy,
    jump_forward: bool,
    arg_budget: usize,
    calibrated: bool,
    /// Each adapter-less choice's scores after the content-free request, by its prompt and
    /// candidates: a tool set's are computed once.
    baselines: Mutex<HashMap<BaselineKey, Vec<f64>>>,
}

impl ToolCaller {
    /// A caller for a model's tokenizer and chat template.
    pub fn new(tokenizer: Arc<Tokenizer>, template: Option<ChatTemplate>) -> Result<Self> {
        let constraints = ConstraintFactory::new(tokenizer.clone())?;
        Ok(Self {
            tokenizer,
            template,
            constraints,
            hierarchy: true,
            strategy: Strategy::Shared,
            jump_forward: true,
            arg_budget: DEFAULT_ARG_BUDGET,
            calibrated: true,
            baselines: Mutex::new(HashMap::new()),
        })
    }

    /// How decoupled calls choose and whether their stages share the cache ([`Strategy`]).
    pub fn set_strategy(&mut self, strategy: Strategy) {
        self.strategy = strategy;
    }

    /// Under [`Strategy::Reference`] a stage starts from nothing cached.
    fn resend(&self, session: &mut Session) {
        if let Strategy::Reference { .. } = self.strategy {
            session.truncate(0);
        }
    }

    /// Append the tokens the argument schema forces in one forward pass each run (the default),
    /// or decode them one by one. The output is the same either way (each forced token is kept
    /// only where greedy decoding would have chosen it); only the number of passes differs.
    pub fn set_jump_forward(&mut self, on: bool) {
        self.jump_forward = on;
    }

    /// Most tokens a call's arguments may take ([`DEFAULT_ARG_BUDGET`] unless set). A call that
    /// reaches it, or the end of the context, fails with [`Error::ModelOutput`] naming the tool
    /// and the field being written, instead of running on.
    pub fn set_arg_budget(&mut self, tokens: usize) {
        self.arg_budget = tokens;
    }

    /// Without a selector adapter, rank the candidates by their probability after the
    /// conversation divided by their probability after a content-free request (the default),
    /// or by the first alone. A base model favours some names whatever is asked — the first
    /// listed, the short ones, `finish` — and the division takes that preference out (contextual
    /// calibration). The content-free scores are computed once per tool list and cue. A trained
    /// selector is never calibrated: its probabilities are what it was trained to give.
    pub fn set_calibration(&mut self, on: bool) {
        self.calibrated = on;
    }

    /// Choose the server first when there are several (the default), or among every tool at once.
    pub fn set_hierarchy(&mut self, on: bool) {
        self.hierarchy = on;
    }

    fn hierarchical(&self, catalog: &Catalog) -> bool {
        self.hierarchy && catalog.groups.len() > 1
    }

    /// The cue of the first choice: `server:` (hierarchical) or `call:`.
    fn first_cue(&self, catalog: &Catalog) -> &'static str {
        if self.hierarchical(catalog) {
            SERVER_CUE
        } else {
            SELECT_CUE
        }
    }

    /// Plain text of the call layout (tool names, descriptions and schemas come from servers:
    /// special-token text in them stays text).
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_text(text)
    }

    /// The system message listing the first choice's candidates: every tool, or with a
    /// hierarchy every server with its tool names.
    pub fn system_text(&self, catalog: &Catalog) -> String {
        let mut s = String::from("You are an assistant that calls tools. For the user's latest request, choose the one tool that does it, or finish when no tool is needed (the request is done or needs no tool).\n");
        if self.hierarchical(catalog) {
            s.push_str("Servers and their tools:\n");
            for g in &catalog.groups {
                let names: Vec<&str> = g.tools.iter().map(|t| t.name.as_str()).collect();
                s.push_str(&format!("- {}: {}\n", g.server, names.join(", ")));
            }
        } else {
            s.push_str("Tools:\n");
            s.push_str(&tool_lines(catalog.groups.iter().flat_map(|g| &g.tools)));
        }
        s.push_str(&format!("- {FINISH}: answer the user directly without a tool.\n"));
        s
    }

    /// Tokens of the prefix: system text, the conversation, and the assistant turn's start.
    pub fn prefix_tokens(&self, catalog: &Catalog, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.chat_tokens(Some(&self.system_text(catalog)), messages)
    }

    /// Tokens of a chat up to the assistant turn's start. `system` opens it; a system message
    /// of the conversation's own is appended to that text, so there is one system turn (what
    /// every chat template accepts).
    fn chat_tokens(&self, system: Option<&str>, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let mut all = Vec::with_capacity(messages.len() + 1);
        let rest = match (system, messages.first()) {
            (Some(ours), Some(m)) if m.role == "system" => {
                all.push(ChatMessage::new("system", &format!("{ours}{}", m.content)));
                &messages[1..]
            }
            (Some(ours), _) => {
                all.push(ChatMessage::new("system", ours));
                messages
            }
            (None, _) => messages,
        };
        all.extend_from_slice(rest);
        match &self.template {
            Some(t) => t.tokens(&self.tokenizer, &all, true),
            None => {
                let text = all.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect::<String>() + "assistant: ";
                Ok([self.tokenizer.encode("", true)?, self.tokenizer.encode_text(&text)?].concat())
            }
        }
    }

    /// Tokens of one candidate as the choice writes it (` NAME\n`).
    fn candidate_tokens(&self, name: &str) -> Result<Vec<u32>> {
        self.encode(&format!(" {name}\n"))
    }

    /// A server's tool list and the tool cue, after the server was chosen.
    fn server_tools_tokens(&self, group: &crate::toolcall::ToolGroup) -> Result<Vec<u32>> {
        let mut t = self.encode(&format!("tools:\n{}", tool_lines(&group.tools)))?;
        t.extend(self.encode(SELECT_CUE)?);
        Ok(t)
    }

    /// Score `names` (each as ` NAME\n`) after `prompt` in one token-tree pass: the names, their
    /// tokens and probabilities, and the best one's index. With a `baseline` (a choice without
    /// a selector adapter) each name's log-probability after the content-free request is
    /// subtracted first.
    fn choose(
        &self,
        session: &mut Session,
        prompt: &[u32],
        names: Vec<String>,
        plan: Option<Activation>,
        baseline: Option<&Baseline>,
    ) -> Result<Choice> {
        let tokens = names.iter().map(|n| self.candidate_tokens(n)).collect::<Result<Vec<_>>>()?;
        let trie = TokenTrie::new(&tokens);
        // First, as it moves the cache away from the conversation, which the next pass restores.
        let prior = baseline.map(|b| self.baseline_scores(session, prompt, &names, &trie, b)).transpose()?;
        // What the prompt adds to the cache and the candidates, in one pass.
        let (root, nodes) = session.prefill_tree(prompt, plan, &trie.tokens, &trie.parents)?;
        let mut scores = trie.log_probs(&root, &nodes, root.len());
        if let Some(prior) = prior {
            scores.iter_mut().zip(prior).for_each(|(s, p)| *s -= p);
        }
        let probs = normalise(&scores);
        let best = match self.strategy {
            Strategy::Shared => (0..names.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap_or(0),
            // Seeded by the prompt's length, so a rerun of the same example votes the same.
            Strategy::Reference { samples, seed } => {
                majority_vote(&probs, samples, &mut SplitMix64(seed ^ (prompt.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            }
        };
        Ok(Choice { names, tokens, probs, best })
    }

    /// The candidates' log-probabilities after `prompt` with its conversation replaced by the
    /// content-free request: how much the model favours each name whatever is asked (its place
    /// in the list, its length). Kept per prompt and candidates, so a tool set pays once.
    fn baseline_scores(
        &self,
        session: &mut Session,
        prompt: &[u32],
        names: &[String],
        trie: &TokenTrie,
        baseline: &Baseline,
    ) -> Result<Vec<f64>> {
        let mut content_free = baseline.content_free.clone();
        content_free.extend_from_slice(prompt.get(baseline.conversation_end..).unwrap_or_default());
        let key = (content_free, names.to_vec());
        if let Some(scores) = self.baselines.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(scores.clone());
        }
        let (root, nodes) = session.prefill_tree(&key.0, None, &trie.tokens, &trie.parents)?;
        let scores = trie.log_probs(&root, &nodes, root.len());
        let mut kept = self.baselines.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX_BASELINES {
            kept.clear();
        }
        kept.insert(key, scores.clone());
        Ok(scores)
    }

    /// The baseline of an adapter-less choice after `prefix` (the prompt up to the first cue):
    /// the same prefix with the content-free request as the whole conversation (after the
    /// conversation's own system message, if any). `None` where the choice is not calibrated.
    fn baseline(&self, catalog: &Catalog, messages: &[ChatMessage], prefix: &[u32], plan: Option<Activation>) -> Result<Option<Baseline>> {
        if !self.calibrated || plan.is_some() || self.strategy != Strategy::Shared {
            return Ok(None);
        }
        let mut free: Vec<ChatMessage> = messages.iter().take_while(|m| m.role == "system").take(1).cloned().collect();
        free.push(ChatMessage::new("user", CONTENT_FREE_REQUEST));
        Ok(Some(Baseline { conversation_end: prefix.len(), content_free: self.prefix_tokens(catalog, &free)? }))
    }

    /// Choose a tool for the conversation and write its arguments, continuing `session` (which
    /// may already hold an earlier turn of the same conversation; whatever still matches is
    /// reused).
    pub fn call(&self, session: &mut Session, catalog: &Catalog, messages: &[ChatMessage], adapters: &AdapterSet) -> Result<ToolCall> {
        self.call_with(session, catalog, messages, adapters, &ToolChoice::Auto, |_| ControlFlow::Continue(()))
    }

    /// [`call`](Self::call) restricted by `choice`, reporting the choice and each argument token
    /// to `on_event` as they happen. `on_event` returning `Break` stops the call there (a client
    /// that left) with [`Error::Cancelled`].
    pub fn call_with(
        &self,
        session: &mut Session,
        catalog: &Catalog,
        messages: &[ChatMessage],
        adapters: &AdapterSet,
        choice: &ToolChoice,
        mut on_event: impl FnMut(CallEvent) -> ControlFlow<()>,
    ) -> Result<ToolCall> {
        let before = session.stats();
        let t0 = Instant::now();
        let prefix = self.prefix_tokens(catalog, messages)?;
        // The selection's pass computes what the cache lacks of the conversation (with the base
        // weights, before the selector's invocation) together with the candidates; under
        // Strategy::Reference from nothing cached, as a request that re-sends everything.
        self.resend(session);
        let prefix_ms = ms(t0);

        let t1 = Instant::now();
        let mut prompt = prefix.clone();
        prompt.extend(self.encode(self.first_cue(catalog))?);
        let plan = adapters.selector.map(|a| Activation { adapter: a, from: prefix.len() });
        // A named tool is written, not chosen: nothing to calibrate.
        let baseline = match choice {
            ToolChoice::Function(_) => None,
            _ => self.baseline(catalog, messages, &prefix, plan)?,
        };
        let (name, confidence, candidates) = self.select(session, catalog, &mut prompt, plan, baseline.as_ref(), choice)?;
        let name_tokens = prompt.len() - prefix.len();
        let select_ms = ms(t1);
        if on_event(CallEvent::Chosen(&name)).is_break() {
            return Err(Error::Cancelled);
        }

        // Arguments: the chosen tool's schema, then JSON under it.
        let t2 = Instant::now();
        let mut arguments = Value::Object(Default::default());
        let mut written = Written::default();
        if let Some((_, tool)) = catalog.find(&name) {
            let (schema_at, args_cue_at) = self.open_arguments(tool, &mut prompt)?;
            let plan = match adapters.arguments.get(&name) {
                Some(&adapter) => {
                    let info = session.model().adapter_info(adapter.id)?;
                    let from =
                        argument_activation(&prompt, schema_at, args_cue_at, info.invocation_tokens.as_deref()).ok_or_else(|| {
                            Error::InvalidOption(format!(
                                "the argument adapter of {name} ({}) is invoked by tokens {:?}, which open neither `{SCHEMA_CUE}` nor `{}`",
                                info.name,
                                info.invocation_tokens.unwrap_or_default(),
                                ARGS_CUE.trim()
                            ))
                        })?;
                    Some(Activation { adapter, from })
                }
                None => None,
            };
            self.resend(session);
            written = self.arguments(session, &prompt, plan, &name, &tool.input_schema, &mut |t| on_event(CallEvent::ArgumentToken(t)))?;
            arguments = written.value.clone();
        }
        let args_ms = ms(t2);
        let session_stats = session.stats() - before;
        Ok(ToolCall {
            name,
            arguments,
            confidence,
            candidates,
            stats: CallStats {
                prefix_tokens: prefix.len(),
                prefix_ms,
                select_ms,
                args_ms,
                name_tokens,
                arg_tokens: written.tokens,
                arg_forced: written.forced,
                arg_passes: written.passes,
                session: session_stats,
            },
            output: None,
        })
    }

    /// Write the choice of `name` (a tool or `finish`) after the first cue as the selector
    /// writes it: with a hierarchy the server's name, its tool list and the tool cue first.
    /// Returns the spans of the names written (what the selector is trained to produce).
    fn write_choice(&self, catalog: &Catalog, prompt: &mut Vec<u32>, name: &str) -> Result<Vec<Range<usize>>> {
        let put = |prompt: &mut Vec<u32>, t: Vec<u32>| {
            let start = prompt.len();
            prompt.extend(t);
            start..prompt.len()
        };
        if name == FINISH {
            return Ok(vec![put(prompt, self.candidate_tokens(FINISH)?)]);
        }
        let (group, _) = catalog.find(name).ok_or_else(|| Error::InvalidOption(format!("'{name}' is not among the tools")))?;
        let mut spans = Vec::new();
        if self.hierarchical(catalog) {
            spans.push(put(prompt, self.candidate_tokens(&group.server)?));
            prompt.extend(self.server_tools_tokens(group)?);
        }
        spans.push(put(prompt, self.candidate_tokens(name)?));
        Ok(spans)
    }

    /// Append what opens the argument stage to `tokens` — the tool's schema after its cue, then
    /// the arguments cue — and return where each of the two cues starts.
    fn open_arguments(&self, tool: &crate::mcp::Tool, tokens: &mut Vec<u32>) -> Result<(usize, usize)> {
        let schema_at = tokens.len();
        tokens.extend(self.encode(&format!("{SCHEMA_CUE} {}", tool.input_schema))?);
        let args_cue_at = tokens.len();
        tokens.extend(self.encode(ARGS_CUE)?);
        Ok((schema_at, args_cue_at))
    }

    /// A whole call of `name` with `arguments` laid out token for token as inference lays it
    /// out, with the positions training needs (the trainer's prompts are inference's prompts).
    /// Arguments are written as compact JSON with keys in the schema's order, the one form the
    /// schema constraint produces.
    pub fn call_layout(&self, catalog: &Catalog, messages: &[ChatMessage], name: &str, arguments: &Value) -> Result<CallLayout> {
        let mut tokens = self.prefix_tokens(catalog, messages)?;
        let prefix_len = tokens.len();
        tokens.extend(self.encode(self.first_cue(catalog))?);
        let choice_spans = self.write_choice(catalog, &mut tokens, name)?;
        let (mut schema_at, mut args_cue_at, mut args_span) = (None, None, None);
        if let Some((_, tool)) = catalog.find(name) {
            let (schema, args_cue) = self.open_arguments(tool, &mut tokens)?;
            (schema_at, args_cue_at) = (Some(schema), Some(args_cue));
            let start = tokens.len();
            tokens.extend(self.encode(&super::schema::canonical(arguments, &tool.input_schema).to_string())?);
            args_span = Some(start..tokens.len());
        }
        Ok(CallLayout { tokens, prefix_len, choice_spans, schema_at, args_cue_at, args_span })
    }

    /// The selector stage after `prompt` (the prefix and the first cue): the chosen name, its
    /// probability and every candidate's. `prompt` is extended with what was chosen, up to the
    /// chosen tool's name.
    fn select(
        &self,
        session: &mut Session,
        catalog: &Catalog,
        prompt: &mut Vec<u32>,
        plan: Option<Activation>,
        baseline: Option<&Baseline>,
        choice: &ToolChoice,
    ) -> Result<(String, Option<f64>, BTreeMap<String, f64>)> {
        let maybe_finish = |mut v: Vec<String>| {
            if *choice == ToolChoice::Auto {
                v.push(FINISH.to_string());
            }
            v
        };
        if let ToolChoice::Function(name) = choice {
            // Forced: written into the prompt as the selector would have written it.
            self.write_choice(catalog, prompt, name)?;
            return Ok((name.clone(), None, BTreeMap::new()));
        }
        if catalog.names().is_empty() && *choice == ToolChoice::Required {
            return Err(Error::InvalidOption("a tool call is required but there are no tools".into()));
        }
        if !self.hierarchical(catalog) {
            let tools =
                self.choose(session, prompt, maybe_finish(catalog.names().into_iter().map(str::to_string).collect()), plan, baseline)?;
            prompt.extend_from_slice(&tools.tokens[tools.best]);
            return Ok((
                tools.names[tools.best].clone(),
                Some(tools.probs[tools.best]),
                tools.names.into_iter().zip(tools.probs).collect(),
            ));
        }
        let servers =
            self.choose(session, prompt, maybe_finish(catalog.groups.iter().map(|g| g.server.clone()).collect()), plan, baseline)?;
        let mut candidates = BTreeMap::new();
        if *choice == ToolChoice::Auto {
            candidates.insert(FINISH.to_string(), servers.probs[servers.names.len() - 1]);
        }
        let p_server = servers.probs[servers.best];
        let Some(group) = catalog.groups.iter().find(|g| g.server == servers.names[servers.best]) else {
            return Ok((FINISH.to_string(), Some(p_server), candidates));
        };
        prompt.extend_from_slice(&servers.tokens[servers.best]);
        prompt.extend(self.server_tools_tokens(group)?);
        let tools = self.choose(session, prompt, group.tools.iter().map(|t| t.name.clone()).collect(), plan, baseline)?;
        prompt.extend_from_slice(&tools.tokens[tools.best]);
        candidates.extend(tools.names.iter().cloned().zip(tools.probs.iter().map(|p| p * p_server)));
        Ok((tools.names[tools.best].clone(), Some(p_server * tools.probs[tools.best]), candidates))
    }

    /// The assistant message that records `call` in the conversation (the same layout the
    /// prompt cues use, so a later turn sees its own earlier calls as it would write them).
    pub fn call_message(call: &ToolCall) -> ChatMessage {
        Self::call_message_for(&call.name, &call.arguments)
    }

    /// The assistant message that records a call of `name` with `arguments` (compact JSON right
    /// after the cue, as the argument stage writes it).
    pub fn call_message_for(name: &str, arguments: &Value) -> ChatMessage {
        ChatMessage::new("assistant", &format!("{SELECT_CUE} {name}{ARGS_CUE}{arguments}"))
    }

    /// The message that hands a tool's output back to the model (as a user turn: every chat
    /// template accepts one), cut to `max_chars`.
    pub fn result_message(name: &str, text: &str, max_chars: usize) -> ChatMessage {
        let mut t: String = text.chars().take(max_chars).collect();
        if t.len() < text.len() {
            t.push_str(" …[truncated]");
        }
        ChatMessage::new("user", &format!("Result of {name}:\n{t}"))
    }

    /// The final answer after the model chose `finish`: free text continuing the same assistant
    /// turn (`call: finish` then the answer), reusing the cached conversation; written by
    /// `adapter` (an answer adapter, activated at the choice cue) where given.
    pub fn answer(
        &self,
        session: &mut Session,
        catalog: &Catalog,
        messages: &[ChatMessage],
        adapter: Option<ActiveAdapter>,
        opts: &GenerateOptions,
        on_token: impl FnMut(u32),
    ) -> Result<String> {
        let prompt = self.answer_prompt(catalog, messages)?;
        let plan = self.answer_activation(catalog, messages, adapter)?;
        let g = session.generate(&prompt, plan, opts, on_token)?;
        let text: Vec<u32> = g.tokens.into_iter().filter(|t| !self.tokenizer.is_stop(*t)).collect();
        Ok(before_call_layout(&self.tokenizer.decode(&text, true)?).trim().to_string())
    }

    /// Where an answer adapter applies in the answer to `messages`: from the choice cue (where
    /// the selector applies), the conversation before it computed with the base weights.
    pub fn answer_activation(
        &self,
        catalog: &Catalog,
        messages: &[ChatMessage],
        adapter: Option<ActiveAdapter>,
    ) -> Result<Option<Activation>> {
        match adapter {
            Some(adapter) => Ok(Some(Activation { adapter, from: self.prefix_tokens(catalog, messages)?.len() })),
            None => Ok(None),
        }
    }

    /// The prompt of a plain chat turn (no tools, no system text of ours), up to the assistant
    /// turn's start.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.chat_tokens(None, messages)
    }

    /// The layout of `answer` as the answer to `messages`: what the answer adapter is trained on.
    pub fn answer_layout(&self, catalog: &Catalog, messages: &[ChatMessage], answer: &str) -> Result<AnswerLayout> {
        let from = self.prefix_tokens(catalog, messages)?.len();
        let mut tokens = self.answer_prompt(catalog, messages)?;
        let start = tokens.len();
        tokens.extend(self.encode(answer)?);
        tokens.extend(self.tokenizer.stop.first());
        Ok(AnswerLayout { answer_span: start..tokens.len(), tokens, from })
    }

    /// The prompt of an answer without a tool: the tool prefix and `call: finish` (what
    /// [`answer`](Self::answer) continues).
    pub fn answer_prompt(&self, catalog: &Catalog, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let mut prompt = self.prefix_tokens(catalog, messages)?;
        prompt.extend(self.encode(&format!("{} {FINISH}\n", self.first_cue(catalog)))?);
        Ok(prompt)
    }

    /// The monolithic baseline: the base model sees every tool's schema in its prompt and writes
    /// the whole call as `{"name":..,"arguments":{..}}` — freely (parsed afterwards; it may fail
    /// to parse or to validate), or with `constrained` under one schema covering every tool.
    pub fn call_monolithic(
        &self,
        session: &mut Session,
        catalog: &Catalog,
        messages: &[ChatMessage],
        constrained: bool,
    ) -> Result<ToolCall> {
        let before = session.stats();
        let t0 = Instant::now();
        let tools: Vec<Value> = catalog
            .groups
            .iter()
            .flat_map(|g| &g.tools)
            .map(|t| serde_json::json!({"name": t.name, "description": t.description, "parameters": t.input_schema}))
            .collect();
        let system = format!(
            "You are an assistant that calls tools. Tools:\n{}\nReply with only a JSON object {{\"name\": tool name, \"arguments\": {{...}}}} for the user's latest request, or {{\"name\": \"{FINISH}\", \"arguments\": {{}}}} when no tool is needed.",
            Value::Array(tools)
        );
        let prompt = self.chat_tokens(Some(&system), messages)?;
        let (text, n) = if constrained {
            let one_of: Vec<Value> = catalog
                .groups
                .iter()
                .flat_map(|g| &g.tools)
                .map(|t| (t.name.as_str(), t.input_schema.clone()))
                .chain([(FINISH, serde_json::json!({"type": "object", "properties": {}}))])
                .map(|(name, schema)| serde_json::json!({"type": "object", "properties": {"name": {"const": name}, "arguments": schema}, "required": ["name", "arguments"]}))
                .collect();
            let schema = serde_json::json!({"anyOf": one_of});
            let v = self.arguments(session, &prompt, None, "the monolithic call", &schema, &mut |_| ControlFlow::Continue(()))?;
            (v.value.to_string(), v.tokens)
        } else {
            let opts = GenerateOptions::greedy(MAX_FREE_CALL_TOKENS, &self.tokenizer);
            let g = session.generate(&prompt, None, &opts, |_| {})?;
            let ids: Vec<u32> = g.tokens.iter().copied().filter(|t| !self.tokenizer.is_stop(*t)).collect();
            (self.tokenizer.decode(&ids, true)?, g.tokens.len())
        };
        let parsed = first_json_object(&text);
        let name = parsed.as_ref().and_then(|v| v["name"].as_str()).unwrap_or("").to_string();
        let arguments = parsed.map(|v| v["arguments"].clone()).unwrap_or(Value::Null);
        Ok(ToolCall {
            name,
            arguments,
            confidence: None,
            candidates: BTreeMap::new(),
            stats: CallStats {
                prefix_tokens: prompt.len(),
                args_ms: ms(t0),
                arg_tokens: n,
                session: session.stats() - before,
                ..Default::default()
            },
            output: Some(text),
        })
    }

    /// Greedy decoding of one JSON value under `schema` after `prompt`. With jump-forward, the
    /// tokens of what the schema forces after a chosen token (a draft: [`JsonConstraint::forced`])
    /// are appended with it in one forward pass, then checked token by token against the greedy
    /// choice under the constraint at each position (the logits of that pass): the agreeing
    /// prefix is kept, the rest dropped from the cache, and decoding goes on from the first
    /// disagreement — so the output is the step-by-step output. `what` names the value in errors.
    fn arguments(
        &self,
        session: &mut Session,
        prompt: &[u32],
        plan: Option<Activation>,
        what: &str,
        schema: &Value,
        on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Written> {
        let mut constraint = self.constraints.json(schema)?;
        let mut logits = session.prefill(prompt, plan)?;
        let n_vocab = logits.len();
        let mut out = Vec::new();
        let (mut forced_kept, mut passes) = (0, 1);
        // The greedy choice under the constraint; `None` at the end of the value.
        let choose = |constraint: &mut JsonConstraint, logits: &[f32]| -> Result<Option<u32>> {
            let allowed = constraint.allowed(n_vocab)?;
            let next = (0..n_vocab).filter(|&t| allowed[t]).max_by(|&a, &b| logits[a].total_cmp(&logits[b]));
            match next.map(|t| t as u32) {
                None => Err(Error::ModelOutput("the argument constraint allows no token".into())),
                Some(t) if t == constraint.eos() => Ok(None),
                Some(t) => Ok(Some(t)),
            }
        };
        let too_long = |constraint: &JsonConstraint, limit: String| {
            let field = constraint.field();
            let at = if field.is_empty() { String::new() } else { format!(", writing `{field}`") };
            Error::ModelOutput(format!("the arguments of `{what}` did not finish within {limit}{at}"))
        };
        'decode: while let Some(next) = choose(&mut constraint, &logits)? {
            if out.len() >= self.arg_budget {
                return Err(too_long(&constraint, format!("the argument budget of {} tokens", self.arg_budget)));
            }
            constraint.consume(next)?;
            out.push(next);
            if on_token(next).is_break() {
                return Err(Error::Cancelled);
            }
            if constraint.is_done() {
                break;
            }
            if session.len() >= session.n_ctx() {
                return Err(too_long(&constraint, format!("the context of {} tokens", session.n_ctx())));
            }
            let forced = if self.jump_forward { constraint.forced()? } else { Vec::new() };
            // Within the token budget and the context: where step-by-step decoding would stop,
            // so does the chunk.
            let room = self.arg_budget.saturating_sub(out.len()).min(session.n_ctx().saturating_sub(session.len() + 1));
            let forced = &forced[..forced.len().min(room)];
            passes += 1;
            if forced.is_empty() {
                logits = session.step(next, plan)?;
                continue;
            }
            let start = session.len();
            let chunk: Vec<u32> = std::iter::once(next).chain(forced.iter().copied()).collect();
            let rows = session.extend(&chunk, plan)?;
            let row = |i: usize| &rows[i * n_vocab..(i + 1) * n_vocab];
            for (i, &f) in forced.iter().enumerate() {
                if choose(&mut constraint, row(i))? != Some(f) {
                    // Greedy decoding parts from the forced run here: keep what agreed.
                    session.truncate(start + 1 + i);
                    logits = row(i).to_vec();
                    continue 'decode;
                }
                constraint.consume(f)?;
                out.push(f);
                forced_kept += 1;
                if on_token(f).is_break() {
                    return Err(Error::Cancelled);
                }
                if constraint.is_done() {
                    break 'decode;
                }
            }
            logits = row(forced.len()).to_vec();
        }
        let text = self.tokenizer.decode(&out, true)?;
        let value: Value = serde_json::from_str(text.trim())
            .map_err(|e| Error::ModelOutput(format!("the arguments of `{what}` are not JSON ({e}): {text}")))?;
        Ok(Written { value, tokens: out.len(), forced: forced_kept, passes })
    }
}

/// `text` up to where it starts writing the call layout (a line opening with one of its cues, or
/// arguments after `args:`): a small model answering after `call: finish` may go on with another
/// call, which is not part of the answer.
fn before_call_layout(text: &str) -> &str {
    let line_cue = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(0))
        .filter(|&i| [SELECT_CUE, SERVER_CUE, SCHEMA_CUE].iter().any(|cue| text[i..].trim_start().starts_with(cue)))
        .min();
    let cue = ARGS_CUE.trim_start();
    let args = text.match_indices(cue).map(|(i, _)| i).find(|&i| !text[..i].ends_with(|c: char| c.is_alphanumeric()));
    let end = [line_cue, args].into_iter().flatten().min().unwrap_or(text.len());
    &text[..end]
}

/// Arguments written under a schema, and what writing them took.
#[derive(Default)]
struct Written {
    value: Value,
    tokens: usize,
    /// Forced tokens kept from jump-forward chunks.
    forced: usize,
    /// Forward passes, the prompt's included.
    passes: usize,
}

/// The first JSON object in `text` (models often wrap it in prose or code fences).
/// The candidate drawn most often in `samples` draws from `probs` (ties: the first to reach the
/// count; at least one draw).
fn majority_vote(probs: &[f64], samples: usize, rng: &mut SplitMix64) -> usize {
    let mut votes = vec![0usize; probs.len()];
    let mut best = 0;
    for _ in 0..samples.max(1) {
        let u = rng.next_f32() as f64;
        let mut acc = 0.0;
        let drawn = probs.iter().position(|p| {
            acc += p;
            u < acc
        });
        let i = drawn.unwrap_or(probs.len().saturating_sub(1));
        votes[i] += 1;
        if votes[i] > votes[best] {
            best = i;
        }
    }
    best
}

fn first_json_object(text: &str) -> Option<Value> {
    text.match_indices('{')
        .find_map(|(i, _)| serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>().next().and_then(|r| r.ok()))
}

/// The outcome of one scored choice.
/// A content-free prompt and the candidates scored after it.
type BaselineKey = (Vec<u32>, Vec<String>);

/// What an adapter-less choice is calibrated against ([`ToolCaller::baseline`]).
struct Baseline {
    /// Where the conversation ends in the real prompt (the first cue follows).
    conversation_end: usize,
    /// The prompt's prefix with the content-free request as the conversation.
    content_free: Vec<u32>,
}

struct Choice {
    names: Vec<String>,
    tokens: Vec<Vec<u32>>,
    probs: Vec<f64>,
    best: usize,
}

/// One `- name: description` line per tool.
fn tool_lines<'a>(tools: impl IntoIterator<Item = &'a crate::mcp::Tool>) -> String {
    tools.into_iter().map(|t| format!("- {}: {}\n", t.name, short_description(&t.description, 100))).collect()
}

/// Where an argument adapter invoked by `invocation` applies from in a call's `prompt`, whose
/// `schema:` cue starts at `schema_at` and `args:` cue at `args_cue_at`: the cue its invocation
/// opens, or for a standard adapter (no invocation) the schema's. `None` where it opens neither.
fn argument_activation(prompt: &[u32], schema_at: usize, args_cue_at: usize, invocation: Option<&[u32]>) -> Option<usize> {
    match invocation {
        None | Some([]) => Some(schema_at),
        Some(inv) => [schema_at, args_cue_at].into_iter().find(|&p| prompt[p..].starts_with(inv)),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_stops_where_the_call_layout_starts() {
        let answer = "The file says: buy milk.";
        assert_eq!(before_call_layout(answer), answer);
        assert_eq!(before_call_layout(&format!("{answer}\ncall: read_text_file\nargs:{{\"path\":\"x\"}}")), format!("{answer}\n"));
        assert_eq!(before_call_layout(&format!("{answer} args:{{\"path\":\"/tmp\"}}")), format!("{answer} "));
        assert_eq!(before_call_layout("server: filesystem\n"), "");
        assert_eq!(before_call_layout("Recall: the call went well; cargs: none."), "Recall: the call went well; cargs: none.");
    }

    #[test]
    fn majority_vote_follows_the_distribution() {
        // A certain candidate always wins; with many draws the mode wins (law of large numbers).
        assert_eq!(majority_vote(&[0.0, 1.0, 0.0], 10, &mut SplitMix64(3)), 1);
        for seed in 0..20 {
            assert_eq!(majority_vote(&[0.35, 0.45, 0.2], 2001, &mut SplitMix64(seed)), 1, "seed {seed}");
        }
        // Ten draws from a 0.6 / 0.4 split: the minority wins some votes but fewer than a
        // single draw would (binomial: P(≥ 6 of 10 for 0.4) ≈ 0.17, plus half the 5–5 ties at most).
        let wins = (0..2000).filter(|&s| majority_vote(&[0.6, 0.4], 10, &mut SplitMix64(s)) == 1).count();
        assert!((200..600).contains(&wins), "{wins} of 2000 votes went to the 0.4 candidate");
    }

    #[test]
    fn an_argument_adapter_applies_from_the_cue_its_invocation_opens() {
        // schema: {…} \nargs: {…}, as token ids: the schema cue at 2, the arguments cue at 6.
        let prompt = [1, 2, 40, 41, 30, 31, 50, 51, 60];
        assert_eq!(argument_activation(&prompt, 2, 6, Some(&[40, 41])), Some(2));
        assert_eq!(argument_activation(&prompt, 2, 6, Some(&[50, 51])), Some(6));
        // A standard adapter reads the schema too, as before invocation tokens were recorded.
        assert_eq!(argument_activation(&prompt, 2, 6, None), Some(2));
        // Tokens that occur in the prompt but open neither cue.
        assert_eq!(argument_activation(&prompt, 2, 6, Some(&[30, 31])), None);
        assert_eq!(argument_activation(&prompt, 2, 6, Some(&[51, 60, 61])), None);
    }
}
