//! PEFT adapter files: round trip, Hugging Face row order of q/k, and every refusal names what is wrong.

use agentflux::gguf::{BlockFormat, GgufFile};
use agentflux::hparams::ModelConfig;
use agentflux::lora::{LoraAdapter, LoraLimits, Proj, SavedDtype};
use agentflux::reference::{tiny_model, TinyModelSpec};
use std::path::PathBuf;

fn config(arch: &'static str) -> ModelConfig {
    // One file per call: tests run in parallel threads of one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("agentflux-lora-{arch}-{}-{n}.gguf", std::process::id()));
    std::fs::write(&p, tiny_model(&TinyModelSpec::new(arch, BlockFormat::Q8_0), 1)).unwrap();
    let c = ModelConfig::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
    std::fs::remove_file(p).ok();
    c
}

fn random_adapter(c: &ModelConfig, rank: usize, seed: u64) -> LoraAdapter {
    let mut a = agentflux::reference::random_adapter(&mut agentflux::decode::SplitMix64(seed), c, rank, &Proj::ALL, 0.1);
    a.invocation_tokens = Some(vec![5, 9]);
    a.alpha = 16.0;
    a
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("agentflux-peft-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

#[test]
fn save_then_load_is_identity_for_every_architecture() {
    for arch in ["llama", "qwen2", "gemma3"] {
        let c = config(arch);
        let a = random_adapter(&c, 4, 7);
        let d = tmp_dir(arch);
        a.save_peft(&d, &c).unwrap();
        let b = LoraAdapter::load_peft(&d, &c, &LoraLimits::default()).unwrap();
        assert_eq!(a, b, "{arch}");
        assert_eq!(b.scale(), 4.0);
        std::fs::remove_dir_all(d).ok();
    }
}

/// Saved as f16: the file holds F16 tensors, loading gives each value rounded to f16 (the
/// independent reference: `half`'s rounding of the original), and a value beyond f16's range is
/// refused with the tensor's name instead of being written as infinity.
#[test]
fn f16_export_rounds_each_value_and_refuses_overflow() {
    let c = config("llama");
    let a = random_adapter(&c, 4, 11);
    let d = tmp_dir("f16");
    a.save_peft_as(&d, &c, SavedDtype::F16).unwrap();
    let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::F16));
    let f32_size = {
        let d32 = tmp_dir("f32");
        a.save_peft(&d32, &c).unwrap();
        let n = std::fs::metadata(d32.join("adapter_model.safetensors")).unwrap().len();
        std::fs::remove_dir_all(d32).ok();
        n
    };
    assert!((bytes.len() as u64) < f32_size * 6 / 10, "{} bytes in f16, {f32_size} in f32", bytes.len());
    let b = LoraAdapter::load_peft(&d, &c, &LoraLimits::default()).unwrap();
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect() };
    for (key, w) in &a.targets {
        assert_eq!(b.targets[key].a, round(&w.a), "{key:?} A");
        assert_eq!(b.targets[key].b, round(&w.b), "{key:?} B");
    }
    assert!(a.targets.values().any(|w| w.a != round(&w.a)), "the test values are not all exact in f16");
    let mut big = a.clone();
    big.targets.get_mut(&(1, Proj::Up)).unwrap().b[3] = 1e6;
    let e = big.save_peft_as(&d, &c, SavedDtype::F16).unwrap_err().to_string();
    assert!(e.contains("layers.1.mlp.up_proj.lora_B") && e.contains("1000000"), "{e}");
    std::fs::remove_dir_all(d).ok();
}

/// llama GGUF q/k rows are llama.cpp's permutation of Hugging Face's: per head, HF row j·half + i
/// (j ∈ {0,1}, i < half) is GGUF row 2i + j. The file keeps HF order; the engine gets GGUF order.
#[test]
fn llama_q_rows_are_permuted_like_the_base_weights() {
    let c = config("llama");
    let mut a = random_adapter(&c, 2, 3);
    a.targets.retain(|(l, p), _| *l == 0 && *p == Proj::Q);
    let d = tmp_dir("perm");
    a.save_peft(&d, &c).unwrap();
    let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let hf: Vec<f32> =
        bytemuck::pod_collect_to_vec(st.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").unwrap().data());
    let gguf = &a.targets[&(0, Proj::Q)].b;
    let (head, half, r) = (c.head_dim, c.head_dim / 2, 2);
    for h in 0..c.n_heads {
        for i in 0..half {
            for j in 0..2 {
                let (hf_row, gg_row) = (h * head + j * half + i, h * head + 2 * i + j);
                assert_eq!(hf[hf_row * r..][..r], gguf[gg_row * r..][..r]);
            }
        }
    }
    std::fs::remove_dir_all(d).ok();
}

fn expect_error(d: &PathBuf, c: &ModelConfig, limits: &LoraLimits, needles: &[&str]) {
    let e = LoraAdapter::load_peft(d, c, limits).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} does not mention {n:?}");
    }
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let c = config("llama");
    let a = random_adapter(&c, 4, 11);
    let d = tmp_dir("bad");
    a.save_peft(&d, &c).unwrap();
    let limits = LoraLimits::default();

    // Rank over the configured limit.
    expect_error(&d, &c, &LoraLimits { max_rank: 2, ..LoraLimits::default() }, &["rank r = 4", "1..=2"]);

    // Another base model: the shapes differ and the error names the tensor and both shapes.
    let mut other = c.clone();
    other.d_model *= 2;
    // (Sorted names: layer 0's down_proj A, 4 × ffn, is checked first and its `in` is unchanged; its B is not.)
    expect_error(
        &d,
        &other,
        &limits,
        &["layers.0.mlp.down_proj.lora_B.weight", "has shape [64, 4]", "needs [128, 4]", "another base model"],
    );

    // Unknown target module in the config.
    let cfg_path = d.join("adapter_config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("\"v_proj\"", "\"w_proj\"")).unwrap();
    expect_error(&d, &c, &limits, &["unknown target module 'w_proj'"]);

    // PEFT features the engine does not implement are refused, not silently ignored.
    for (field, value, named) in [
        ("use_dora", "true", "DoRA"),
        ("rank_pattern", r#"{"q_proj": 16}"#, "rank_pattern"),
        ("modules_to_save", r#"["lm_head"]"#, "modules_to_save"),
        ("bias", r#""all""#, "bias"),
    ] {
        let mut edited: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        edited[field] = serde_json::from_str(value).unwrap();
        std::fs::write(&cfg_path, edited.to_string()).unwrap();
        expect_error(&d, &c, &limits, &[named, "not supported"]);
    }
    std::fs::write(&cfg_path, &cfg).unwrap();

    // A NaN weight.
    let mut nan = a.clone();
    nan.targets.get_mut(&(1, Proj::Down)).unwrap().a[3] = f32::NAN;
    nan.save_peft(&d, &c).unwrap();
    expect_error(&d, &c, &limits, &["layers.1.mlp.down_proj.lora_A.weight", "non-finite"]);

    // Missing weights file.
    std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
    expect_error(&d, &c, &limits, &["cannot read adapter_model.safetensors"]);
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn f16_and_bf16_tensors_load() {
    let c = config("qwen2");
    let (out, inp) = Proj::V.shape(&c);
    let d = tmp_dir("half");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["v_proj"]}"#).unwrap();
    let a: Vec<u8> = (0..2 * inp).flat_map(|i| half::f16::from_f32(i as f32 / 64.0).to_le_bytes()).collect();
    let b: Vec<u8> = (0..out * 2).flat_map(|i| half::bf16::from_f32(i as f32 / 8.0).to_le_bytes()).collect();
    let views = vec![
        (
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2, inp], &a).unwrap(),
        ),
        (
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![out, 2], &b).unwrap(),
        ),
    ];
    std::fs::write(d.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let ad = LoraAdapter::load_peft(&d, &c, &LoraLimits::default()).unwrap();
    let w = &ad.targets[&(1, Proj::V)];
    assert_eq!(w.a[5], 5.0 / 64.0);
    assert_eq!(w.b[7], 7.0 / 8.0);
    assert_eq!(ad.scale(), 2.0);
    std::fs::remove_dir_all(d).ok();
}
