//! Tokenizers built from GGUF metadata with the `tokenizers` crate.
//!
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE with the file's merges; the pre-tokenizer
//!   follows `tokenizer.ggml.pre` as llama.cpp does (e.g. `smollm` splits digits one by one).
//! - `tokenizer.ggml.model = llama`: SentencePiece BPE (Gemma, Llama 2). Merges are derived from the
//!   token scores: a pair merges when its concatenation is a token, higher scores first — the rule
//!   llama.cpp's SPM tokenizer applies. Unknown characters fall back to byte tokens.
//!
//! Control and user-defined tokens (`<|im_start|>`, `<start_of_turn>`) are special tokens: found in
//! text as whole units, as llama.cpp does with `parse_special`.

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetaValue};
use tokenizers::decoders::{
    byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse, sequence::Sequence as DecoderSeq, DecoderWrapper,
};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{replace::Replace, NormalizerWrapper};
use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence, split::Split, PreTokenizerWrapper};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer regexes of the gpt2-style vocabularies, keyed by `tokenizer.ggml.pre`.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer and the special tokens the engine needs.
pub struct Tokenizer {
    /// Finds special-token text as the special token (for a template's markup).
    inner: tokenizers::Tokenizer,
    /// The same vocabulary without control-token matching (for text from users and tools).
    plain: tokenizers::Tokenizer,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Tokens that end a generation (EOS, end-of-turn).
    pub stop: Vec<u32>,
    /// Whether a BOS token starts every encoded prompt.
    pub add_bos: bool,
    tokens: Vec<String>,
    /// Per token: whether it is a control or user-defined (special) token.
    special: Vec<bool>,
    /// Per token: whether it is a control token (a turn marker, BOS, EOS).
    control: Vec<bool>,
    /// How vocabulary strings spell bytes.
    spelling: Spelling,
}

/// How a vocabulary string spells the bytes of its token.
#[derive(Clone, Copy)]
enum Spelling {
    /// GPT-2's byte-to-printable-character map.
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xNN>` for a raw byte.
    SentencePiece,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Build the tokenizer a GGUF file describes.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = f.str_array("tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
        let types: Vec<i64> = match f.meta("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            _ => vec![1; tokens.len()],
        };
        let id_of = |key: &str| -> Result<Option<u32>> {
            match f.meta(key).and_then(|v| v.as_u64()) {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(Error::Model {
                    path: f.path().to_path_buf(),
                    msg: format!("{key} is {id}, outside the vocabulary of {} tokens", tokens.len()),
                }),
                None => Ok(None),
            }
        };
        let (bos, eos) = (id_of("tokenizer.ggml.bos_token_id")?, id_of("tokenizer.ggml.eos_token_id")?);
        let mut inner = match model {
            "gpt2" => gpt2(f, &tokens)?,
            "llama" => spm(f, &tokens)?,
            other => {
                return Err(Error::Model {
                    path: f.path().to_path_buf(),
                    msg: format!("tokenizer model '{}' is not supported (supported: gpt2, llama)", other.escape_debug()),
                })
            }
        };
        let added = |kind: i64| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == kind)
                .map(|(s, _)| AddedToken::from(s.clone(), true).normalized(false))
                .collect()
        };
        // User-defined tokens (Gemma's whitespace runs and markup) are found in any text, as
        // llama.cpp does; control tokens (turn markers, BOS/EOS) only in markup.
        inner.add_special_tokens(&added(TYPE_USER_DEFINED));
        let plain = inner.clone();
        inner.add_special_tokens(&added(TYPE_CONTROL));
        let add_bos = f.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for name in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = tokens.iter().position(|t| t == name) {
                if !stop.contains(&(id as u32)) {
                    stop.push(id as u32);
                }
            }
        }
        let of_type = |kinds: &[i64]| -> Vec<bool> {
            types.iter().map(|t| kinds.contains(t)).chain(std::iter::repeat(false)).take(tokens.len()).collect()
        };
        let (special, control) = (of_type(&[TYPE_CONTROL, TYPE_USER_DEFINED]), of_type(&[TYPE_CONTROL]));
        let spelling = if model == "gpt2" { Spelling::ByteLevel } else { Spelling::SentencePiece };
        Ok(Self { inner, plain, bos, eos, stop, add_bos, tokens, special, control, spelling })
    }

    /// Token ids of `text` as markup: special-token text (`<|im_start|>`) becomes the special
    /// token, as in a chat template's output or a raw prompt its author wrote. With
    /// `add_special`, a BOS starts it where the model wants one. Text from users, documents or
    /// tool servers goes through [`encode_text`](Self::encode_text) instead.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(&self.inner, text, add_special)
    }

    /// Token ids of `text` as plain text: control-token text stays text (`<|im_end|>` in a
    /// message is spelled with ordinary tokens), so content cannot close its turn or open a
    /// system turn. User-defined tokens (Gemma's whitespace runs) are still found, as in any
    /// text.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(&self.plain, text, false)
    }

    fn encode_with(&self, t: &tokenizers::Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = t.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Whether `text` holds the text of a control token (what [`encode`](Self::encode) would
    /// turn into one and [`encode_text`](Self::encode_text) would not).
    pub fn has_control_text(&self, text: &str) -> bool {
        self.tokens.iter().zip(&self.control).any(|(t, &c)| c && !t.is_empty() && text.contains(t.as_str()))
    }

    /// Whether `id` is a control token (a turn marker, BOS, EOS).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Text of `ids`; special tokens are rendered unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// The raw vocabulary string of a token.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is a control or user-defined token (`<|im_end|>`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes each token stands for, indexed by id (what a constrained decoder matches
    /// text against). Special tokens are their text behind a 0xFF marker byte, which no text
    /// contains, so a grammar over text never produces them by accident.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let byte_of: std::collections::HashMap<char, u8> = match self.spelling {
            Spelling::ByteLevel => byte_level_alphabet().into_iter().map(|(b, c)| (c, b)).collect(),
            Spelling::SentencePiece => Default::default(),
        };
        self.tokens
            .iter()
            .zip(&self.special)
            .map(|(t, &special)| {
                if special {
                    return [&[0xFFu8][..], t.as_bytes()].concat();
                }
                match self.spelling {
                    Spelling::ByteLevel => {
                        t.chars().map(|c| byte_of.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| t.as_bytes().to_vec())
                    }
                    Spelling::SentencePiece => {
                        match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                            Some(b) if t.len() == 6 => vec![b],
                            _ => t.replace('\u{2581}', " ").into_bytes(),
                        }
                    }
                }
            })
            .collect()
    }

    /// Whether `id` ends a generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.contains(&id)
    }
}

/// GPT-2's map from each byte to the printable character byte-level vocabularies spell it with:
/// printable Latin-1 bytes stand for themselves, the rest take code points from 256 up, in order.
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b, b as char)
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                (b, c)
            }
        })
        .collect()
}

fn gpt2(f: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let merges = f
        .str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("merge '{m}' is not two tokens separated by a space")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(false).build().map_err(tok_err)?;
    let pre =
        f.meta("tokenizer.ggml.pre").and_then(|v| if let MetaValue::String(s) = v { Some(s.as_str()) } else { None }).unwrap_or("default");
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(tokenizers::pre_tokenizers::split::SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(tok_err)?
            .into())
    };
    let byte_level = |regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, false, regex).into() };
    let steps: Vec<PreTokenizerWrapper> = match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => {
            vec![Digits::new(true).into(), byte_level(true)]
        }
        "llama-bpe" | "llama3" | "smaug-bpe" | "falcon3" => vec![split(LLAMA3_REGEX)?, byte_level(false)],
        "qwen2" | "deepseek-r1-qwen" | "qwen35" => vec![split(QWEN2_REGEX)?, byte_level(false)],
        "gpt-2" | "gpt2" | "default" => vec![split(GPT2_REGEX)?, byte_level(false)],
        other => {
            tracing::warn!(pre = other, "unknown pre-tokenizer; using GPT-2's");
            vec![split(GPT2_REGEX)?, byte_level(false)]
        }
    };
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(Sequence::new(steps)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(t)
}

fn spm(f: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let scores: Vec<f32> = f.array("tokenizer.ggml.scores")?.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    // Every split of a token into two tokens is a merge, ranked by the token's score.
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        for (cut, _) in tok.char_indices().skip(1) {
            let (a, b) = tok.split_at(cut);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), id as u32, a.to_string(), b.to_string()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let unk = f.meta("tokenizer.ggml.unknown_token_id").and_then(|v| v.as_u64()).and_then(|i| tokens.get(i as usize)).cloned();
    let mut b = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(u) = unk {
        b = b.unk_token(u);
    }
    let bpe = b.build().map_err(tok_err)?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    let add_space = f.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space {
        norms.push(tokenizers::normalizers::prepend::Prepend::new("▁".into()).into());
    }
    norms.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
    t.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)));
    let dec: Vec<DecoderWrapper> = vec![Replace::new("▁", " ").map_err(tok_err)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    t.with_decoder(Some(DecoderSeq::new(dec)));
    Ok(t)
}
