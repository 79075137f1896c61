//! Model files and adapters are untrusted: mutated GGUF files (bytes flipped, header values set to
//! extremes, truncations, each metadata value of a tiny model with its own small tokenizer
//! rewritten) are read, validated, tokenized and loaded onto the GPU, and mutated PEFT adapters
//! (every `adapter_config.json` field set to values of every JSON type, the safetensors header's
//! length, dtypes, shapes and offsets set to extremes, random bytes flipped, truncations) are
//! loaded and made resident; every one either loads or is refused with a typed error — no panic,
//! no abort.
//!
//! `AGENTFLUX_FUZZ_ITERS` sets the number of random mutants of each kind (CI: 300; the long run
//! in docs/security.md: `AGENTFLUX_FUZZ_ITERS=1000000 cargo test --release --test fuzz`).

mod common;

use agentflux::decode::SplitMix64;
use agentflux::gguf::{BlockFormat, GgufFile, MetaValue};
use agentflux::hparams::ModelConfig;
use agentflux::lora::{LoraAdapter, LoraLimits, Proj, SavedDtype};
use agentflux::model::{Logits, Model, Sequence};
use agentflux::reference::{random_adapter, tiny_model, TinyModelSpec};
use agentflux::text::{ChatTemplate, Tokenizer};
use common::{ctx, rng};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A tiny model with a small byte-level tokenizer and a ChatML template: every reader has
/// something to read.
fn seed_file(seed: u64) -> Vec<u8> {
    let mut spec = TinyModelSpec::new("llama", BlockFormat::Q4_0);
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    tokens.extend((b'a'..=b'z').chain(b'A'..=b'Z').map(|c| (c as char).to_string()));
    tokens.extend(["Ġ", "Ċ", "ab", "abc", "ĠHi", "Hi", "user", "!"].map(String::from));
    tokens.truncate(spec.n_vocab);
    while tokens.len() < spec.n_vocab {
        tokens.push(format!("t{}", tokens.len()));
    }
    let types: Vec<MetaValue> = (0..tokens.len()).map(|i| MetaValue::I32(if i < 3 { 3 } else { 1 })).collect();
    let chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    spec.extra_meta = vec![
        ("tokenizer.ggml.model".into(), MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), MetaValue::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect())),
        ("tokenizer.ggml.token_type".into(), MetaValue::Array(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Array(["a b", "ab c", "Ġ Hi", "H i"].map(|m| MetaValue::String(m.into())).to_vec())),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2)),
        ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1)),
        ("tokenizer.chat_template".into(), MetaValue::String(chatml.into())),
    ];
    tiny_model(&spec, seed)
}

/// Read, validate, tokenize and (when `load`) load `bytes`: whether every step took the file; a
/// panic is returned as its message.
fn exercise(bytes: &[u8], path: &std::path::Path, load: bool) -> Result<bool, String> {
    std::fs::write(path, bytes).unwrap();
    catch_unwind(AssertUnwindSafe(|| {
        let Ok(f) = GgufFile::open(path) else { return false };
        let config = ModelConfig::from_gguf(&f).is_ok();
        let tokenized = Tokenizer::from_gguf(&f).is_ok_and(|tok| {
            let text = tok.encode("Hi <|im_end|> abc!", true).and_then(|ids| tok.decode(&ids, false)).is_ok();
            let chat = match ChatTemplate::from_gguf(&f, &tok) {
                Ok(Some(t)) => t.tokens(&tok, &[agentflux::text::ChatMessage::new("user", "Hi")], true).is_ok(),
                _ => false,
            };
            text && chat
        });
        config && tokenized && (!load || Model::load(ctx(), &f).is_ok())
    }))
    .map_err(|p| p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())
}

/// Where each metadata value of `bytes` lies: (key, offset of the type tag).
fn metadata_values(bytes: &[u8], keys: &[String]) -> Vec<(String, usize)> {
    keys.iter()
        .filter_map(|k| {
            let needle = [&(k.len() as u64).to_le_bytes()[..], k.as_bytes()].concat();
            bytes.windows(needle.len()).position(|w| w == needle.as_slice()).map(|p| (k.clone(), p + needle.len()))
        })
        .collect()
}

/// Values a header field is set to (as an integer of its width; a float field gets the float of
/// the same index in `FLOAT_EXTREMES`).
const EXTREMES: [u64; 9] = [0, 1, 2, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 40, u64::MAX, 1 << 63];
const FLOAT_EXTREMES: [f64; 9] = [0.0, -1.0, 1e-45, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30, -0.0, f64::MAX];

/// Inputs tried, taken whole, and the panics met (each with what was tried).
#[derive(Default)]
struct Tally {
    tried: usize,
    taken: usize,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, what: String, outcome: Result<bool, String>) {
        self.tried += 1;
        match outcome {
            Ok(t) => self.taken += t as usize,
            Err(p) => self.failures.push(format!("{what}: {p}")),
        }
    }

    fn assert_no_panic(&self) {
        assert!(self.failures.is_empty(), "{} panics:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

/// Random mutants of each kind a fuzz test makes (`AGENTFLUX_FUZZ_ITERS`, CI: 300).
fn fuzz_iters() -> usize {
    std::env::var("AGENTFLUX_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// Mutant `i` of `original`, by turns: 1–4 bits flipped within its first `flip_span` bytes, an
/// extreme 8-byte word written within its first `word_span`, or a truncation.
fn mutant(original: &[u8], i: usize, flip_span: usize, word_span: usize, r: &mut SplitMix64) -> Vec<u8> {
    let mut m = original.to_vec();
    let pick = |r: &mut SplitMix64, n: usize| (r.next_u64() % n.max(1) as u64) as usize;
    match i % 3 {
        0 => {
            for _ in 0..1 + pick(r, 4) {
                let at = pick(r, flip_span);
                m[at] ^= 1 << pick(r, 8);
            }
        }
        1 => {
            let at = pick(r, word_span.saturating_sub(8));
            m[at..at + 8].copy_from_slice(&EXTREMES[pick(r, EXTREMES.len())].to_le_bytes());
        }
        _ => m.truncate(pick(r, original.len())),
    }
    m
}

/// Write `v` over the metadata value of GGUF type `ty` that starts at `at`: integers at their
/// width, floats from `FLOAT_EXTREMES`, a string's length, an array's element count.
fn set_value(m: &mut [u8], at: usize, ty: u32, v: u64) {
    let float = FLOAT_EXTREMES[EXTREMES.iter().position(|&e| e == v).unwrap_or(0)];
    let bytes: Vec<u8> = match ty {
        0 | 1 | 7 => vec![v as u8],
        2 | 3 => (v as u16).to_le_bytes().to_vec(),
        4 | 5 => (v as u32).to_le_bytes().to_vec(),
        6 => (float as f32).to_le_bytes().to_vec(),
        12 => float.to_le_bytes().to_vec(),
        9 => return m[at + 4..at + 12].copy_from_slice(&v.to_le_bytes()),
        _ => v.to_le_bytes().to_vec(),
    };
    m[at..at + bytes.len()].copy_from_slice(&bytes);
}

#[test]
fn mutated_model_files_load_or_are_refused() {
    let mut r = rng("fuzz-gguf");
    let original = seed_file(r.next_u64());
    let path = std::env::temp_dir().join(format!("agentflux-fuzz-{}.gguf", std::process::id()));
    assert_eq!(exercise(&original, &path, true), Ok(true), "the unmutated file is read, tokenized and loaded");
    let f = GgufFile::open({
        std::fs::write(&path, &original).unwrap();
        &path
    })
    .unwrap();
    let keys: Vec<String> = f.metadata.keys().cloned().collect();
    let header_len = f.tensors().iter().map(|t| t.file_offset).min().unwrap_or(original.len() as u64) as usize;
    drop(f);
    let mut tally = Tally::default();
    let values = metadata_values(&original, &keys);
    assert_eq!(values.len(), keys.len(), "every metadata key found in the file");

    // Every metadata value set to every extreme of its type (a string's or an array's length
    // too), and its type tag set to each type id.
    for (key, at) in values {
        let ty = u32::from_le_bytes(original[at..at + 4].try_into().unwrap());
        for v in EXTREMES {
            let mut m = original.clone();
            set_value(&mut m, at + 4, ty, v);
            tally.record(format!("{key} (type {ty}) = {v:#x}"), exercise(&m, &path, true));
        }
        for ty in 0..16u32 {
            let mut m = original.clone();
            m[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            tally.record(format!("{key} with type {ty}"), exercise(&m, &path, false));
        }
    }

    // Random mutants of the header: flipped bytes, extreme words, truncations.
    let iters = fuzz_iters();
    for i in 0..iters {
        let m = mutant(&original, i, header_len, header_len, &mut r);
        tally.record(format!("mutant {i}"), exercise(&m, &path, i % 10 == 0));
    }
    std::fs::remove_file(&path).ok();
    eprintln!(
        "{} files ({} metadata values × {} extremes and 16 type tags, {iters} random mutants): {} taken whole, the rest refused",
        tally.tried,
        keys.len(),
        EXTREMES.len(),
        tally.taken
    );
    tally.assert_no_panic();
}

/// Load the adapter directory `dir` as `model`'s and make it resident; when it is taken, run a
/// pass with it (every 10th time, `forward`). Whether it was taken; a panic as its message.
fn exercise_adapter(model: &Model, dir: &std::path::Path, forward: bool) -> Result<bool, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let Ok(adapter) = LoraAdapter::load_peft(dir, &model.config, &LoraLimits::default()) else { return false };
        let Ok(id) = model.add_adapter("fuzzed", &adapter) else { return false };
        let ran = !forward || {
            let mut kv = model.new_cache(8).unwrap();
            let active = agentflux::lora::ActiveAdapter::new(id);
            model.forward_seqs(&mut [Sequence::adapted(&mut kv, &[1, 2, 3], Some(active), 0)], Logits::Last).is_ok()
        };
        model.remove_adapter(id).unwrap();
        ran
    }))
    .map_err(|p| p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())
}

/// JSON values of every type and size a field is set to.
fn json_extremes() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1e308),
        json!(-1e308),
        json!(u64::MAX),
        json!("q_proj"),
        json!("x".repeat(100_000)),
        json!([]),
        json!(["q_proj", 7, null]),
        json!({}),
        json!({"nested": {"deeper": [1, 2, 3]}}),
    ]
}

#[test]
fn mutated_adapters_load_or_are_refused() {
    let mut r = rng("fuzz-adapter");
    let model_path = std::env::temp_dir().join(format!("agentflux-fuzz-adapter-{}.gguf", std::process::id()));
    std::fs::write(&model_path, seed_file(r.next_u64())).unwrap();
    let model = Model::load(ctx(), &GgufFile::open(&model_path).unwrap()).unwrap();
    std::fs::remove_file(&model_path).ok();
    let c = model.config.clone();
    let dir = std::env::temp_dir().join(format!("agentflux-fuzz-adapter-{}", std::process::id()));
    let adapter = random_adapter(&mut r, &c, 4, &[Proj::Q, Proj::V, Proj::Down], 0.5);
    let mut tally = Tally::default();
    for dtype in [SavedDtype::F32, SavedDtype::F16] {
        std::fs::remove_dir_all(&dir).ok();
        adapter.save_peft_as(&dir, &c, dtype).unwrap();
        let config_path = dir.join("adapter_config.json");
        let weights_path = dir.join("adapter_model.safetensors");
        let (config, weights) = (std::fs::read(&config_path).unwrap(), std::fs::read(&weights_path).unwrap());
        assert_eq!(exercise_adapter(&model, &dir, true), Ok(true), "the unmutated adapter ({dtype:?}) loads and runs");

        // Every field of adapter_config.json set to every kind of JSON value, and removed.
        let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&config).unwrap();
        for key in fields.keys() {
            for v in json_extremes().into_iter().map(Some).chain([None]) {
                let mut m = fields.clone();
                match &v {
                    Some(v) => m.insert(key.clone(), v.clone()),
                    None => m.remove(key),
                };
                std::fs::write(&config_path, serde_json::to_vec(&m).unwrap()).unwrap();
                let shown: String = format!("{v:?}").chars().take(40).collect();
                tally.record(format!("{dtype:?} config {key} = {shown}"), exercise_adapter(&model, &dir, false));
            }
        }
        std::fs::write(&config_path, &config).unwrap();

        // The safetensors header: its length word, then each tensor's dtype, shape and offsets.
        let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        for v in EXTREMES {
            let mut m = weights.clone();
            m[..8].copy_from_slice(&v.to_le_bytes());
            std::fs::write(&weights_path, &m).unwrap();
            tally.record(format!("{dtype:?} header length {v:#x}"), exercise_adapter(&model, &dir, false));
        }
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
        let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").take(3).collect();
        let replacements: [(&str, Vec<serde_json::Value>); 3] = [
            ("dtype", ["F64", "I8", "BOOL", "F8_E4M3", "XYZ"].map(serde_json::Value::from).to_vec()),
            (
                "shape",
                vec![
                    serde_json::json!([]),
                    serde_json::json!([0, 0]),
                    serde_json::json!([u64::MAX, 2]),
                    serde_json::json!([1u64 << 40, 1u64 << 40]),
                    serde_json::json!([4]),
                ],
            ),
            (
                "data_offsets",
                vec![
                    serde_json::json!([0, 0]),
                    serde_json::json!([8, 4]),
                    serde_json::json!([0, u64::MAX]),
                    serde_json::json!([u64::MAX, u64::MAX]),
                ],
            ),
        ];
        for name in names {
            for (field, values) in &replacements {
                for v in values {
                    let mut h = header.clone();
                    h[name.as_str()][*field] = v.clone();
                    let text = serde_json::to_vec(&h).unwrap();
                    let m = [&(text.len() as u64).to_le_bytes()[..], &text, &weights[8 + header_len..]].concat();
                    std::fs::write(&weights_path, &m).unwrap();
                    tally.record(format!("{dtype:?} {name}.{field} = {v}"), exercise_adapter(&model, &dir, true));
                }
            }
        }

        // Random mutants of the whole file: flipped bits in the header, extreme words
        // anywhere, truncations.
        for i in 0..fuzz_iters() {
            let m = mutant(&weights, i, 8 + header_len, weights.len(), &mut r);
            std::fs::write(&weights_path, &m).unwrap();
            tally.record(format!("{dtype:?} mutant {i}"), exercise_adapter(&model, &dir, i % 10 == 0));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("{} adapters: {} taken and made resident, the rest refused", tally.tried, tally.taken);
    tally.assert_no_panic();
}
