//! LoRA adapters in PEFT format: load, validate against a base model, save.
//!
//! A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules,
//! and for activated LoRA `alora_invocation_tokens`) and `adapter_model.safetensors` with tensors
//! named `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`
//! (A: `r × in`, B: `out × r`; f32, f16 or bf16). Adapters are never merged into base weights.
//!
//! llama-family GGUF files store q/k projection rows permuted for their rotary layout (llama.cpp's
//! converter does it); the rows of `lora_B` for q_proj/k_proj are permuted the same way on load
//! and back on save, so PEFT adapters trained on Hugging Face weights apply unchanged.

use crate::hparams::{Arch, ModelConfig};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;

mod registry;
pub use registry::{AdapterInfo, AdapterRegistry};

/// A resident adapter's handle. Ids are never reused within a registry, so a stale id cannot
/// silently name another adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct AdapterId(pub u32);

impl std::fmt::Display for AdapterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "adapter#{}", self.0)
    }
}

/// An adapter as it is applied: which one, and a multiplier on its own `alpha/r` scale
/// (1 = as trained, 0 = the base model). Batching and KV-cache reuse key on this value.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ActiveAdapter {
    /// The adapter.
    pub id: AdapterId,
    /// Multiplier of its trained scale.
    pub scale: f32,
}

impl ActiveAdapter {
    /// `id` at its trained scale.
    pub fn new(id: AdapterId) -> Self {
        Self { id, scale: 1.0 }
    }
}

// Compared and hashed by bit pattern: two activations are interchangeable only when every
// weight they apply is bit-identical.
impl PartialEq for ActiveAdapter {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id && self.scale.to_bits() == o.scale.to_bits()
    }
}
impl Eq for ActiveAdapter {}
impl std::hash::Hash for ActiveAdapter {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.id.hash(h);
        self.scale.to_bits().hash(h);
    }
}

/// A projection an adapter can target, by its Hugging Face module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Proj {
    /// Query projection (`q_proj`).
    Q,
    /// Key projection (`k_proj`).
    K,
    /// Value projection (`v_proj`).
    V,
    /// Attention output projection (`o_proj`).
    O,
    /// Feed-forward gate (`gate_proj`).
    Gate,
    /// Feed-forward up projection (`up_proj`).
    Up,
    /// Feed-forward down projection (`down_proj`).
    Down,
}

impl Proj {
    /// Every projection.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The PEFT/Hugging Face module name.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The projection of a module name.
    pub fn from_module(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.module() == name)
    }

    fn parent(self) -> &'static str {
        match self {
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
            _ => "self_attn",
        }
    }

    /// (out, in) of this projection in a model shaped like `c`.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.d_model),
            Proj::K | Proj::V => (c.kv_dim(), c.d_model),
            Proj::O => (c.d_model, c.q_dim()),
            Proj::Gate | Proj::Up => (c.ffn_dim, c.d_model),
            Proj::Down => (c.d_model, c.ffn_dim),
        }
    }
}

/// Typed limits on adapters.
#[derive(Debug, Clone, Copy)]
pub struct LoraLimits {
    /// Largest rank accepted.
    pub max_rank: usize,
    /// Most adapters resident on the GPU at once.
    pub max_adapters: usize,
    /// Most bytes of packed A (and, separately, B) matrices on the GPU; also capped by the
    /// device's largest binding, since a kernel binds each pack whole.
    pub max_bytes: u64,
}

impl Default for LoraLimits {
    fn default() -> Self {
        Self { max_rank: 64, max_adapters: 64, max_bytes: 256 << 20 }
    }
}

/// Why an adapter was refused.
#[derive(Debug, thiserror::Error)]
#[error("adapter {adapter}: {msg}")]
pub struct LoraError {
    /// The adapter: its directory, or the name it was registered under.
    pub adapter: String,
    /// What is wrong, naming the file, field or tensor.
    pub msg: String,
}

/// One targeted projection of one layer: `ΔW = scale · B · A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    /// `rank × in`, row-major.
    pub a: Vec<f32>,
    /// `out × rank`, row-major, rows in the GGUF (engine) order.
    pub b: Vec<f32>,
}

/// A LoRA adapter ready to be placed on the GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// Rank r.
    pub rank: usize,
    /// lora_alpha.
    pub alpha: f32,
    /// Whether the scale is alpha/√r (rsLoRA) instead of alpha/r.
    pub use_rslora: bool,
    /// Activated LoRA: the token sequence after which the adapter applies; `None` = every token.
    pub invocation_tokens: Option<Vec<u32>>,
    /// (layer, projection) → weights.
    pub targets: BTreeMap<(usize, Proj), LoraWeights>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PeftConfig {
    #[serde(default = "lora_type")]
    peft_type: String,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    use_rslora: bool,
    target_modules: TargetModules,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alora_invocation_tokens: Option<Vec<u32>>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default = "causal_lm")]
    task_type: String,
    #[serde(default = "none_bias")]
    bias: String,
    // PEFT features this engine does not implement; read only to refuse them clearly.
    #[serde(default, skip_serializing)]
    use_dora: bool,
    #[serde(default, skip_serializing)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing)]
    modules_to_save: Option<Vec<String>>,
}

fn lora_type() -> String {
    "LORA".into()
}
fn causal_lm() -> String {
    "CAUSAL_LM".into()
}
fn none_bias() -> String {
    "none".into()
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn tensor_name(layer: usize, p: Proj, ab: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight", p.parent(), p.module())
}

/// Move rows between Hugging Face order and llama-GGUF order for q/k (`forward` = HF → GGUF).
fn permute_rows(b: &[f32], rank: usize, n_heads: usize, forward: bool) -> Vec<f32> {
    let rows = b.len() / rank;
    let head = rows / n_heads;
    let half = head / 2;
    let mut out = vec![0f32; b.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                // HF row h·head + j·half + i  ↔  GGUF row h·head + 2i + j.
                let hf = h * head + j * half + i;
                let gg = h * head + 2 * i + j;
                let (src, dst) = if forward { (hf, gg) } else { (gg, hf) };
                out[dst * rank..(dst + 1) * rank].copy_from_slice(&b[src * rank..(src + 1) * rank]);
            }
        }
    }
    out
}

fn qk_heads(c: &ModelConfig, p: Proj) -> Option<usize> {
    match (c.arch, p) {
        (Arch::Llama, Proj::Q) => Some(c.n_heads),
        (Arch::Llama, Proj::K) => Some(c.n_kv_heads),
        _ => None,
    }
}

impl LoraAdapter {
    /// An adapter of `rank` on `projs` of every layer of a model shaped like `c`, its A and B
    /// matrices filled by `values(n)` (n values each; random ones for benchmarks and tests), with
    /// alpha = 2·rank (a trained multiplier of 2).
    pub fn filled(c: &ModelConfig, rank: usize, projs: &[Proj], mut values: impl FnMut(usize) -> Vec<f32>) -> Self {
        let mut targets = BTreeMap::new();
        for layer in 0..c.n_layers {
            for &p in projs {
                let (out, inp) = p.shape(c);
                targets.insert((layer, p), LoraWeights { a: values(rank * inp), b: values(out * rank) });
            }
        }
        LoraAdapter { rank, alpha: 2.0 * rank as f32, use_rslora: false, invocation_tokens: None, targets }
    }

    /// The multiplier of `B·A` (alpha/r, or alpha/√r for rsLoRA).
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Check an adapter against the base model `c` and `limits` before it is made resident:
    /// rank, a finite scale, invocation tokens within the vocabulary, every shape, finite values.
    pub fn check(&self, c: &ModelConfig, limits: &LoraLimits) -> Result<(), String> {
        if self.rank == 0 || self.rank > limits.max_rank {
            return Err(format!("rank {} outside 1..={} (the configured limit)", self.rank, limits.max_rank));
        }
        if self.targets.is_empty() {
            return Err("targets no projection".into());
        }
        let scale = self.scale();
        if !(self.alpha.is_finite() && scale.is_finite()) {
            return Err(format!("lora_alpha {} gives the scale {scale}; it must be finite", self.alpha));
        }
        match &self.invocation_tokens {
            Some(inv) if inv.is_empty() => {
                return Err("alora_invocation_tokens is empty (leave it out for an adapter that applies everywhere)".into())
            }
            Some(inv) => {
                if let Some(t) = inv.iter().find(|&&t| t as usize >= c.n_vocab) {
                    return Err(format!("alora_invocation_tokens holds {t}, outside the base model's vocabulary of {} tokens", c.n_vocab));
                }
            }
            None => {}
        }
        for (&(layer, proj), w) in &self.targets {
            let name = |ab| tensor_name(layer, proj, ab);
            if layer >= c.n_layers {
                return Err(format!(
                    "'{}' is for layer {layer} but the base model has {} layers (adapter for another base model?)",
                    name('A'),
                    c.n_layers
                ));
            }
            let (out, inp) = proj.shape(c);
            for (ab, v, want) in [('A', &w.a, [self.rank, inp]), ('B', &w.b, [out, self.rank])] {
                if v.len() != want[0] * want[1] {
                    return Err(format!(
                        "'{}' holds {} values, the base model needs {want:?} (adapter for another base model?)",
                        name(ab),
                        v.len()
                    ));
                }
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(format!("'{}' holds a non-finite value ({}) at element {i}", name(ab), v[i]));
                }
            }
        }
        Ok(())
    }

    /// Activated LoRA: the position where this adapter starts to apply in `tokens` — the start of
    /// the last occurrence of its invocation sequence (so the invocation tokens themselves are
    /// adapted, as in PEFT). `Some(0)` for a standard adapter; `None` when the invocation
    /// sequence does not occur.
    pub fn activation_start(&self, tokens: &[u32]) -> Option<usize> {
        match &self.invocation_tokens {
            None => Some(0),
            Some(inv) if inv.is_empty() => Some(0),
            Some(inv) => tokens.windows(inv.len()).rposition(|w| w == inv.as_slice()),
        }
    }

    /// Load a PEFT adapter directory and check it against the base model `c`.
    pub fn load_peft(dir: impl AsRef<Path>, c: &ModelConfig, limits: &LoraLimits) -> Result<Self, LoraError> {
        let dir = dir.as_ref().to_path_buf();
        let err = |msg: String| LoraError { adapter: dir.display().to_string(), msg };
        let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| err(format!("cannot read {f}: {e}")));
        let cfg: PeftConfig = serde_json::from_slice(&read(CONFIG_FILE)?).map_err(|e| err(format!("{CONFIG_FILE}: {e}")))?;
        if cfg.peft_type != "LORA" {
            return Err(err(format!("{CONFIG_FILE}: peft_type '{}' is not LORA", cfg.peft_type)));
        }
        if cfg.r == 0 || cfg.r > limits.max_rank {
            return Err(err(format!("{CONFIG_FILE}: rank r = {} outside 1..={} (the configured limit)", cfg.r, limits.max_rank)));
        }
        let unsupported = [
            (cfg.fan_in_fan_out, "fan_in_fan_out (GPT-2 Conv1D layers)"),
            (cfg.use_dora, "use_dora (DoRA)"),
            (!cfg.rank_pattern.is_empty(), "rank_pattern (per-module ranks)"),
            (!cfg.alpha_pattern.is_empty(), "alpha_pattern (per-module alphas)"),
            (cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()), "modules_to_save (fully trained extra modules)"),
            (cfg.bias != "none", "bias other than \"none\" (trained biases)"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(err(format!("{CONFIG_FILE}: {what} is not supported by this engine")));
        }
        let modules = match &cfg.target_modules {
            TargetModules::List(v) => v.clone(),
            TargetModules::Pattern(s) => vec![s.clone()],
        };
        for m in &modules {
            if Proj::from_module(m).is_none() {
                return Err(err(format!(
                    "{CONFIG_FILE}: unknown target module '{m}' (known: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"
                )));
            }
        }
        let bytes = read(WEIGHTS_FILE)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(format!("{WEIGHTS_FILE}: {e}")))?;
        let mut targets = BTreeMap::new();
        let mut tensors = st.tensors();
        // Sorted, so the first problem reported is the same on every run.
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            let parsed = parse_name(&name).ok_or_else(|| {
                err(format!("{WEIGHTS_FILE}: unexpected tensor '{name}' (not a PEFT LoRA A/B weight of a decoder layer)"))
            })?;
            let (layer, proj, ab) = parsed;
            if layer >= c.n_layers {
                return Err(err(format!(
                    "tensor '{name}' is for layer {layer} but the base model has {} layers (adapter for another base model?)",
                    c.n_layers
                )));
            }
            if !modules.iter().any(|m| m == proj.module()) {
                return Err(err(format!(
                    "tensor '{name}' targets {} which adapter_config.json's target_modules does not list",
                    proj.module()
                )));
            }
            let (out, inp) = proj.shape(c);
            let want = if ab == 'A' { [cfg.r, inp] } else { [out, cfg.r] };
            if view.shape() != want {
                return Err(err(format!(
                    "tensor '{name}' has shape {:?}, the base model needs {want:?} (adapter for another base model?)",
                    view.shape()
                )));
            }
            let values = to_f32(&view).map_err(|m| err(format!("tensor '{name}': {m}")))?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(err(format!("tensor '{name}' holds a non-finite value ({}) at element {i}", values[i])));
            }
            let e = targets.entry((layer, proj)).or_insert(LoraWeights { a: Vec::new(), b: Vec::new() });
            if ab == 'A' {
                e.a = values;
            } else {
                e.b = match qk_heads(c, proj) {
                    Some(h) => permute_rows(&values, cfg.r, h, true),
                    None => values,
                };
            }
        }
        for ((layer, proj), w) in &targets {
            if w.a.is_empty() || w.b.is_empty() {
                let missing = if w.a.is_empty() { 'A' } else { 'B' };
                return Err(err(format!("tensor '{}' is missing", tensor_name(*layer, *proj, missing))));
            }
        }
        if targets.is_empty() {
            return Err(err(format!("{WEIGHTS_FILE} holds no LoRA tensors")));
        }
        Ok(Self { rank: cfg.r, alpha: cfg.lora_alpha, use_rslora: cfg.use_rslora, invocation_tokens: cfg.alora_invocation_tokens, targets })
    }

    /// Write the adapter as a PEFT directory (f32 tensors) for a base model shaped like `c`.
    pub fn save_peft(&self, dir: impl AsRef<Path>, c: &ModelConfig) -> Result<(), LoraError> {
        self.save_peft_as(dir, c, SavedDtype::F32)
    }

    /// [`Self::save_peft`] with the weights stored as `dtype` (f16 halves the file; a value
    /// beyond f16's range is refused rather than saved as infinity).
    pub fn save_peft_as(&self, dir: impl AsRef<Path>, c: &ModelConfig, dtype: SavedDtype) -> Result<(), LoraError> {
        let dir = dir.as_ref();
        let err = |msg: String| LoraError { adapter: dir.display().to_string(), msg };
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create the directory: {e}")))?;
        let mut modules: Vec<String> = self.targets.keys().map(|(_, p)| p.module().to_string()).collect();
        modules.sort();
        modules.dedup();
        let cfg = PeftConfig {
            peft_type: lora_type(),
            r: self.rank,
            lora_alpha: self.alpha,
            use_rslora: self.use_rslora,
            target_modules: TargetModules::List(modules),
            alora_invocation_tokens: self.invocation_tokens.clone(),
            fan_in_fan_out: false,
            task_type: causal_lm(),
            bias: none_bias(),
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
        };
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join(CONFIG_FILE), json).map_err(|e| err(format!("cannot write {CONFIG_FILE}: {e}")))?;
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for ((layer, proj), w) in &self.targets {
            let (out, inp) = proj.shape(c);
            let b = match qk_heads(c, *proj) {
                Some(h) => permute_rows(&w.b, self.rank, h, false),
                None => w.b.clone(),
            };
            for (ab, shape, values) in [('A', vec![self.rank, inp], &w.a), ('B', vec![out, self.rank], &b)] {
                let name = tensor_name(*layer, *proj, ab);
                let bytes = dtype.encode(values).map_err(|v| err(format!("{name}: {v} does not fit in {dtype:?}")))?;
                data.push((name, shape, bytes));
            }
        }
        let views = data
            .iter()
            .map(|(n, s, b)| safetensors::tensor::TensorView::new(dtype.safetensors(), s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        let bytes = safetensors::serialize(views, None).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join(WEIGHTS_FILE), bytes).map_err(|e| err(format!("cannot write {WEIGHTS_FILE}: {e}")))
    }
}

/// How [`LoraAdapter::save_peft_as`] stores the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedDtype {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (half the size; PEFT's usual choice).
    F16,
}

impl SavedDtype {
    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
        }
    }

    /// Little-endian bytes of `values`, or the first value that does not fit.
    fn encode(self, values: &[f32]) -> Result<Vec<u8>, f32> {
        match self {
            Self::F32 => Ok(bytemuck::cast_slice(values).to_vec()),
            Self::F16 => {
                let mut out = Vec::with_capacity(values.len() * 2);
                for &v in values {
                    let h = f16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        return Err(v);
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
                Ok(out)
            }
        }
    }
}

fn parse_name(name: &str) -> Option<(usize, Proj, char)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let mut parts = rest.split('.');
    let parent = parts.next()?;
    let proj = Proj::from_module(parts.next()?)?;
    let ab = match parts.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    (parts.next()? == "weight" && parts.next().is_none() && parent == proj.parent()).then_some(())?;
    Some((layer.parse().ok()?, proj, ab))
}

fn to_f32(v: &safetensors::tensor::TensorView) -> Result<Vec<f32>, String> {
    let d = v.data();
    Ok(match v.dtype() {
        safetensors::Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        safetensors::Dtype::F16 => d.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        safetensors::Dtype::BF16 => d.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    })
}
