//! The `agentflux` binary as a user runs it: JSON output of `generate` and `info`, and the
//! messages for a missing, corrupt or truncated model.

mod common;

use common::agentflux;
use serde_json::Value;
use std::process::Command;

fn default_model_cached() -> bool {
    let cached = agentflux::resolve_model("default").is_ok();
    if !cached {
        assert!(std::env::var("CI").is_err(), "the default model is missing under CI: tools/test fetches it");
        eprintln!("SKIPPED: default model not cached (run tools/fetch-model)");
    }
    cached
}

#[derive(serde::Deserialize)]
struct Golden {
    generate: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    prompt_tokens: Vec<u32>,
    greedy_tokens: Vec<u32>,
    top5: Vec<Top5>,
}

#[derive(serde::Deserialize)]
struct Top5 {
    position: usize,
    logits: Vec<f32>,
}

#[test]
fn generate_json_matches_llama_cpp_greedy() {
    if !default_model_cached() {
        return;
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden/SmolLM2-135M-Instruct.Q4_1.json");
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = golden.generate.iter().find(|c| c.prompt == "The quick brown fox").unwrap();
    let (ok, out, err) =
        agentflux(&["generate", "--model", "default", "--prompt", &case.prompt, "--max-tokens", "16", "--ignore-eos", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"));
    let ids = |k: &str| -> Vec<u32> { v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    assert_eq!(ids("prompt_tokens"), case.prompt_tokens);
    // Equal to llama.cpp's greedy tokens up to the first step where llama.cpp's own top-2 logits
    // are within 1.0 (the rule and its reason: tests/golden.rs).
    let tokens = ids("tokens");
    assert_eq!(tokens.len(), 16);
    let same = tokens.iter().zip(&case.greedy_tokens).take_while(|(a, b)| a == b).count();
    if same < tokens.len() {
        let at = case.prompt_tokens.len() - 1 + same;
        let t = case.top5.iter().find(|t| t.position == at).unwrap();
        assert!(t.logits[0] - t.logits[1] <= 1.0, "token {same} differs from llama.cpp's at a clear margin");
    }
    assert!(same >= 2, "only {same} tokens equal llama.cpp's");
    assert!(!v["text"].as_str().unwrap().is_empty());
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0 && v["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert!(!v["device"].as_str().unwrap().is_empty());
}

#[test]
fn info_json_describes_model_and_device() {
    if !default_model_cached() {
        return;
    }
    let (ok, out, err) = agentflux(&["--gpu", "0", "info", "--model", "default", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    // The device is named with its driver, as the device list names device 0 (lavapipe says
    // which Mesa it is: figures measured on it depend on that).
    let (ok, gpus, err) = agentflux(&["info", "--gpus"]);
    assert!(ok, "{err}");
    let device = v["device"].as_str().unwrap();
    assert_eq!(gpus.lines().next(), Some(format!("0: {device}").as_str()));
    if device.starts_with("llvmpipe") {
        assert!(device.contains(", driver Mesa "), "{device}");
    }
    // The subgroups' lanes, smallest and largest: lavapipe's follow its vector width (the bits
    // its name states), 32 bits a lane.
    let sizes: Vec<u64> = v["subgroup_sizes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert!(sizes.len() == 2 && sizes[0] <= sizes[1] && sizes[0].is_power_of_two(), "{sizes:?}");
    if let Some((head, _)) = device.strip_prefix("llvmpipe").and_then(|d| d.split_once(" bits)")) {
        let bits: u64 = head.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(sizes, [bits / 32; 2], "{device}");
    }
    assert_eq!(v["config"]["arch"], "Llama");
    assert_eq!(v["config"]["n_layers"], 30);
    assert_eq!(v["tensor_types"]["Q4_1"]["tensors"], 210);
    assert!(v["max_storage_binding"].as_u64().unwrap() > 0);
}

/// `info` says whether a file will run: a tensor in a block format no kernel decodes (here the
/// output norm's type set to IQ2_XXS, ggml type 16) is named.
#[test]
fn info_says_what_would_stop_a_model() {
    let mut bytes =
        agentflux::reference::tiny_model(&agentflux::reference::TinyModelSpec::new("llama", agentflux::gguf::BlockFormat::Q8_0), 9);
    let dir = std::env::temp_dir();
    let ok_path = dir.join(format!("agentflux-cli-runs-{}.gguf", std::process::id()));
    std::fs::write(&ok_path, &bytes).unwrap();
    let (ok, out, err) = agentflux(&["info", "--model", ok_path.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["runs"], true);
    // The tensor record: name (u64 length, bytes), 1 dimension (u32), its size (u64), the type (u32).
    let name = b"output_norm.weight";
    let needle = [&(name.len() as u64).to_le_bytes()[..], name].concat();
    let at = bytes.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() + needle.len() + 4 + 8;
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    let bad_path = dir.join(format!("agentflux-cli-iq2-{}.gguf", std::process::id()));
    std::fs::write(&bad_path, &bytes).unwrap();
    let (ok, out, err) = agentflux(&["info", "--model", bad_path.to_str().unwrap()]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.starts_with("runs")).unwrap_or_default().to_string();
    assert!(line.contains("no: 1 tensors") && line.contains("output_norm.weight is IQ2_XXS") && line.contains("q3_k"), "{line}");
    std::fs::remove_file(ok_path).ok();
    std::fs::remove_file(bad_path).ok();
}

#[test]
fn bad_model_files_give_clear_errors() {
    let (ok, _, err) = agentflux(&["info", "--model", "/nonexistent/model.gguf"]);
    assert!(!ok && err.contains("/nonexistent/model.gguf") && err.contains("cannot open"), "{err}");

    let dir = std::env::temp_dir();
    let junk = dir.join(format!("agentflux-cli-junk-{}.gguf", std::process::id()));
    std::fs::write(&junk, b"not a model at all").unwrap();
    let (ok, _, err) = agentflux(&["generate", "--model", junk.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!ok && err.contains("bad magic") && err.contains(junk.to_str().unwrap()), "{err}");

    // A real-shaped file cut in its data section: the error names a tensor.
    let tiny = agentflux::reference::tiny_model(&agentflux::reference::TinyModelSpec::new("llama", agentflux::gguf::BlockFormat::Q8_0), 5);
    let cut = dir.join(format!("agentflux-cli-cut-{}.gguf", std::process::id()));
    std::fs::write(&cut, &tiny[..tiny.len() - 100]).unwrap();
    let (ok, _, err) = agentflux(&["info", "--model", cut.to_str().unwrap()]);
    assert!(!ok && err.contains("tensor '") && err.contains("past the end of the file"), "{err}");
    std::fs::remove_file(junk).ok();
    std::fs::remove_file(cut).ok();
}

/// `generate --lora`: a PEFT-layout adapter for the default model (written by
/// tools/make-peft-fixture) at scale 0 generates the base model's tokens; at scale 1 it changes
/// them from its invocation on; a missing directory is a clear error.
#[test]
fn generate_with_an_activated_adapter() {
    if !default_model_cached() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("agentflux-cli-lora-{}", std::process::id()));
    // SmolLM2-135M: 30 layers, d_model 576, 9 heads / 3 KV heads of 64, FFN 1536.
    let status = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/make-peft-fixture"))
        .arg(&dir)
        .args(["--layers", "30", "--hidden", "576", "--q-dim", "576", "--kv-dim", "192", "--ffn", "1536", "--rank", "2", "--alpha", "64"])
        .args(["--modules", "v_proj,o_proj", "--invocation", "27003"])
        .status()
        .expect("python3 runs tools/make-peft-fixture");
    assert!(status.success());
    let d = dir.to_str().unwrap();
    let prompt = "The quick brown fox jumps";
    let ids = |out: &str| -> Vec<u64> {
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        v["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    };
    let base = agentflux(&["generate", "--prompt", prompt, "--max-tokens", "6", "--ignore-eos", "--json"]);
    assert!(base.0, "{}", base.2);
    // The invocation token must occur in the prompt: " jumps" is 27003 in SmolLM2's vocabulary.
    let zero =
        agentflux(&["generate", "--prompt", prompt, "--max-tokens", "6", "--ignore-eos", "--json", "--lora", d, "--lora-scale", "0"]);
    assert!(zero.0, "{}", zero.2);
    assert_eq!(ids(&zero.1), ids(&base.1), "scale 0 must be the base model");
    let on = agentflux(&["generate", "--prompt", prompt, "--max-tokens", "6", "--ignore-eos", "--json", "--lora", d]);
    assert!(on.0, "{}", on.2);
    assert_ne!(ids(&on.1), ids(&base.1), "a strong random adapter changes the greedy tokens");
    let missing = agentflux(&["generate", "--prompt", prompt, "--max-tokens", "2", "--lora", "/nonexistent/lora"]);
    assert!(!missing.0 && missing.2.contains("/nonexistent/lora") && missing.2.contains("adapter_config.json"), "{}", missing.2);
    std::fs::remove_dir_all(&dir).ok();
}

/// `--gpu` picks the device by index or name; `--adapter` (its former name) still does, and
/// `info --gpus` (formerly `--adapters`) lists the devices those indices count.
#[test]
fn gpu_flag_and_its_former_name_choose_the_device() {
    let list = |args: &[&str]| {
        let (ok, out, err) = agentflux(args);
        assert!(ok, "{args:?}: {err}");
        out
    };
    let gpus = list(&["info", "--gpus"]);
    assert!(gpus.starts_with("0: "), "{gpus}");
    assert_eq!(list(&["--gpu", "0", "info", "--gpus"]), gpus);
    assert_eq!(list(&["--adapter", "0", "info", "--adapters"]), gpus);
    let (ok, _, err) = agentflux(&["--gpu", "no-such-device", "info"]);
    assert!(!ok && err.contains("no device matches 'no-such-device'"), "{err}");
}
