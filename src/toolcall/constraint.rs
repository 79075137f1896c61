//! Schema-constrained decoding: llguidance computes, at every step, which tokens keep the output
//! a prefix of a JSON value valid for the tool's input schema.

use crate::error::{Error, Result};
use crate::text::Tokenizer;
use crate::toolcall::json_cursor::JsonCursor;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// The vocabulary as llguidance sees it: every token's bytes, and our tokenizer for text.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer.encode_text(&String::from_utf8_lossy(s)).unwrap_or_default()
    }
}

/// Builds per-schema constraints for one tokenizer (the vocabulary is indexed once).
pub struct ConstraintFactory {
    factory: ParserFactory,
    tokenizer: Arc<Tokenizer>,
    /// Every token's bytes, by id (to follow the text and try tokens against number bounds).
    token_bytes: Arc<Vec<Vec<u8>>>,
    eos: u32,
}

impl ConstraintFactory {
    /// Index `tokenizer`'s vocabulary.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let eos =
            tokenizer.eos.or_else(|| tokenizer.stop.first().copied()).ok_or_else(|| Error::Tokenizer("no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(tokenizer.n_vocab() as u32, eos);
        let token_bytes = Arc::new(tokenizer.token_bytes());
        let trie = TokTrie::from(&info, &token_bytes);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer: tokenizer.clone() });
        let caps = InferenceCapabilities { ff_tokens: false, backtrack: false, conditional_ff_tokens: false, fork: false };
        let mut factory = ParserFactory::new(&env, caps, &SlicedBiasComputer::general_slices())
            .map_err(|e| Error::Tokenizer(format!("constraint vocabulary: {e}")))?;
        factory.quiet();
        Ok(Self { factory, tokenizer, token_bytes, eos })
    }

    /// A constraint producing one compact JSON value (no whitespace between tokens, as
    /// `serde_json::to_string` writes it) valid for `schema` (JSON Schema: types, required keys,
    /// enums, nested objects and arrays), without undeclared keys, strings, arrays and numbers
    /// bounded (see [`MAX_STRING_CHARS`], [`MAX_ARRAY_ITEMS`], [`MAX_INTEGER_DIGITS`](crate::toolcall::MAX_INTEGER_DIGITS)). Keywords llguidance does not
    /// implement (`format`, say) are ignored rather than refused: real servers' schemas use them.
    pub fn json(&self, schema: &serde_json::Value) -> Result<JsonConstraint> {
        let mut schema = schema.clone();
        tighten(&mut schema, MAX_STRING_CHARS);
        if let Some(m) = schema.as_object_mut() {
            m.insert("x-guidance".into(), serde_json::json!({"whitespace_flexible": false, "lenient": true}));
        }
        let grammar = TopLevelGrammar::from_json_schema(schema);
        let parser = self.factory.create_parser(grammar).map_err(|e| Error::InvalidOption(format!("tool input schema: {e}")))?;
        Ok(JsonConstraint {
            matcher: Matcher::new(Ok(parser)),
            tokenizer: self.tokenizer.clone(),
            token_bytes: self.token_bytes.clone(),
            cursor: JsonCursor::default(),
            eos: self.eos,
        })
    }
}

/// Longest string a schema without `maxLength` lets the model write at the top level: a bound on
/// a small model that repeats itself inside a string, long enough for paths, queries and short
/// file contents. Inside an array, its items share the bound of their array (at least [`MIN_STRING_CHARS`]).
pub const MAX_STRING_CHARS: u64 = 512;
/// Shortest implicit string bound, however deep the arrays around it.
pub const MIN_STRING_CHARS: u64 = 64;
/// Most items of an array whose schema has no `maxItems`, for the same reason.
pub const MAX_ARRAY_ITEMS: u64 = 8;

/// Objects without `additionalProperties` get `false` (the model writes the declared keys only;
/// a schema that allows more says so), arrays without `maxItems` get [`MAX_ARRAY_ITEMS`], and
/// strings without `maxLength` get `string_chars`: [`MAX_STRING_CHARS`] at the top level, split
/// among the items of each array around them (at least [`MIN_STRING_CHARS`]) — so a list of
/// lists of strings stays about as long as one string, not 64 times longer. Numbers are bounded
/// while decoding ([`MAX_INTEGER_DIGITS`](crate::toolcall::MAX_INTEGER_DIGITS)): JSON Schema cannot say how many digits.
fn tighten(v: &mut serde_json::Value, string_chars: u64) {
    match v {
        serde_json::Value::Object(m) => {
            let ty = m.get("type").and_then(|t| t.as_str()).map(str::to_string);
            if ty.as_deref() == Some("object") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), serde_json::Value::Bool(false));
            }
            if ty.as_deref() == Some("string") && !["maxLength", "enum", "const", "pattern", "format"].iter().any(|k| m.contains_key(*k)) {
                m.insert("maxLength".into(), string_chars.into());
            }
            if ty.as_deref() == Some("array") && !m.contains_key("maxItems") {
                m.insert("maxItems".into(), MAX_ARRAY_ITEMS.into());
            }
            let items = m.get("maxItems").and_then(|n| n.as_u64()).unwrap_or(MAX_ARRAY_ITEMS).clamp(1, MAX_ARRAY_ITEMS);
            let per_item = (string_chars / items).max(MIN_STRING_CHARS);
            for (k, v) in m.iter_mut() {
                tighten(v, if k == "items" || k == "prefixItems" { per_item } else { string_chars });
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|v| tighten(v, string_chars)),
        _ => {}
    }
}

/// The state of one constrained generation.
pub struct JsonConstraint {
    matcher: Matcher,
    tokenizer: Arc<Tokenizer>,
    token_bytes: Arc<Vec<Vec<u8>>>,
    /// Where the text written so far stands.
    cursor: JsonCursor,
    eos: u32,
}

impl JsonConstraint {
    /// Tokens allowed next (`true` per id); the end-of-sequence token once the value is complete.
    /// Tokens that would give a number more digits than its bounds are left out, unless the
    /// schema allows nothing else (a `minimum` of 10^20, say).
    pub fn allowed(&mut self, n_vocab: usize) -> Result<Vec<bool>> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| Error::Engine(format!("constraint: {e}")))?;
        let grammar: Vec<bool> = (0..n_vocab as u32).map(|t| mask.is_allowed(t)).collect();
        let lexeme = self.cursor.lexeme();
        // Only a digit can take a number past its bounds, so tokens without one pass unread.
        let within = |b: &Vec<u8>| !b.iter().any(u8::is_ascii_digit) || lexeme.accepts(b);
        let bounded: Vec<bool> =
            grammar.iter().enumerate().map(|(t, &ok)| ok && (t as u32 == self.eos || self.token_bytes.get(t).is_none_or(within))).collect();
        Ok(if bounded.contains(&true) { bounded } else { grammar })
    }

    /// Advance past `token`.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| Error::Engine(format!("constraint: {e}")))?;
        if let Some(b) = self.token_bytes.get(token as usize) {
            self.cursor.push(b);
        }
        Ok(())
    }

    /// The field being written (`entities[3].observations[0]`; empty at the top level).
    pub fn field(&self) -> String {
        self.cursor.path()
    }

    /// Tokens for what the schema forces next whatever the model prefers (a key's name, `":"`,
    /// the rest of the only enum value that fits); none consumed. Empty where the continuation
    /// is open.
    ///
    /// These are the tokenizer's tokens for the forced bytes — a draft: greedy decoding may split
    /// the same bytes otherwise, or join their end with what follows, so a caller that wants the
    /// step-by-step output keeps a drafted token only where the greedy choice agrees.
    pub fn forced(&mut self) -> Result<Vec<u32>> {
        let bytes = self.matcher.compute_ff_bytes();
        match std::str::from_utf8(&bytes) {
            Ok(text) if !text.is_empty() => self.tokenizer.encode_text(text),
            _ => Ok(Vec::new()),
        }
    }

    /// Whether the value is complete (nothing more may follow).
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The end-of-sequence token the mask offers when the value is complete.
    pub fn eos(&self) -> u32 {
        self.eos
    }
}
