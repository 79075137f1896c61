//! Adapter sets on disk: `adapters/<toolset>/manifest.json` names the base model they were
//! trained for, the selector adapter (and the tools it chooses among), one argument adapter per
//! tool and optionally an answer adapter (directories relative to the manifest, each a PEFT
//! adapter).
//!
//! ```json
//! {"base_model": "SmolLM2-135M-Instruct.Q4_1.gguf",
//!  "selector": "selector",
//!  "tools": ["read_text_file", "write_file"],
//!  "arguments": {"read_text_file": "args/read_text_file"},
//!  "answer": "answer"}
//! ```

use super::AdapterSet;
use crate::error::{Error, Result};
use crate::lora::ActiveAdapter;
use crate::model::Model;
use std::collections::BTreeMap;
use std::path::Path;

/// The manifest file's contents.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// File name of the GGUF model the adapters were trained on.
    pub base_model: String,
    /// Directory of the selector adapter.
    #[serde(default)]
    pub selector: Option<String>,
    /// Tool name → directory of its argument adapter.
    #[serde(default)]
    pub arguments: BTreeMap<String, String>,
    /// Every tool the selector was trained to choose among.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Directory of the answer adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// The manifest's file name inside an adapter-set directory.
pub const MANIFEST_FILE: &str = "manifest.json";

impl Manifest {
    /// Read `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(&p, e))
    }

    /// Write `dir/manifest.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join(MANIFEST_FILE);
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Engine(format!("manifest: {e}")))?;
        std::fs::write(&p, json + "\n").map_err(|e| Error::io(&p, e))
    }
}

impl AdapterSet {
    /// Load every adapter an adapter-set directory names onto `model`. A set trained for another
    /// base model is refused (by file name, then by every adapter's shapes).
    pub fn load(model: &Model, dir: &Path) -> Result<Self> {
        let m = Manifest::read(dir)?;
        let ours = model.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !m.base_model.is_empty() && m.base_model != ours {
            return Err(Error::InvalidOption(format!(
                "{}: adapters trained for {} cannot run on {ours}",
                dir.join(MANIFEST_FILE).display(),
                m.base_model
            )));
        }
        let load = |rel: &str| model.load_adapter(dir.join(rel)).map(ActiveAdapter::new);
        let selector = m.selector.as_deref().map(load).transpose()?;
        let arguments = m.arguments.iter().map(|(tool, rel)| Ok((tool.clone(), load(rel)?))).collect::<Result<_>>()?;
        let answer = m.answer.as_deref().map(load).transpose()?;
        Ok(Self { selector, arguments, selector_tools: m.tools, answer })
    }
}
